//! Error answers in plain words (issue 10, "Error texts leak Rust types"): for
//! bad input to every endpoint that takes a body, the message names the field
//! and says what is wanted without Rust type names or parser positions; an
//! empty body is "subject: is required"; unknown fields are answered with
//! the endpoint's own fields, unknown metrics with the metrics there are.

mod common;

use common::{TestServer, Transport};

const CONFIG: &str = r#"
metrics = ["images"]
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 1000
"#;

/// Words that only a Rust programmer (or serde) would write.
const RUST_WORDS: &[&str] = &[
    "u64",
    "u32",
    "usize",
    "i64",
    "f64",
    "struct ",
    "enum ",
    "Option",
    "Vec<",
    "BTreeMap",
    "HashMap",
    "String",
    "::",
    "at line ",
    "line 1 column",
    "invalid type",
    "a map",
    "a sequence",
];

async fn error_message(s: &TestServer, method: &str, path: &str, body: &str) -> (u16, String) {
    let r = s.req(method, path, Some(body), &[]).await;
    let msg = r.body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{method} {path} {body}: no error message in {}", r.text))
        .to_string();
    (r.status, msg)
}

#[tokio::test]
async fn bad_input_is_answered_in_plain_words_naming_the_field() {
    let s = TestServer::start(CONFIG, Transport::Tcp).await;
    let cases: &[(&str, &str, &str, &str)] = &[
        ("POST", "/v1/consume", "", "subject: is required"),
        ("POST", "/v1/consume", "{}", "subject: is required"),
        ("POST", "/v1/check", "", "subject: is required"),
        ("POST", "/v1/reserve", "", "subject: is required"),
        ("POST", "/v1/consume", "[]", "a JSON object"),
        ("POST", "/v1/consume", r#"{"subject":1}"#, "subject"),
        (
            "POST",
            "/v1/consume",
            r#"{"subject":"a","amounts":{"tokens":-1}}"#,
            "amounts.tokens: negative number `-1`, expected a whole number from 0",
        ),
        (
            "POST",
            "/v1/consume",
            r#"{"subject":"a","amounts":{"tokens":"x"}}"#,
            "amounts.tokens: wrong type: string \"x\", expected a whole number from 0",
        ),
        (
            "POST",
            "/v1/consume",
            r#"{"subject":"a","attributes":{"m":1}}"#,
            "attributes.m: wrong type: integer `1`, expected a string",
        ),
        ("POST", "/v1/reserve", r#"{"subject":"a","ttl_ms":-1}"#, "ttl_ms"),
        (
            "POST",
            "/v1/consume",
            r#"{"subject":"a","ttl_ms":5}"#,
            "ttl_ms: only reserve takes a TTL",
        ),
        (
            "POST",
            "/v1/consume",
            r#"{"subject":"a","op":"consume"}"#,
            "op: names an operation only inside POST /v1/batch",
        ),
        (
            "POST",
            "/v1/reservations/x/commit",
            r#"{"amounts":5}"#,
            "amounts: wrong type: integer `5`, expected an object",
        ),
        (
            "POST",
            "/v1/reservations/x/release",
            r#"{"x":1}"#,
            "this body takes no fields",
        ),
        (
            "PUT",
            "/v1/subjects/a",
            r#"{"plan":7}"#,
            "plan: wrong type: integer `7`, expected a string",
        ),
        (
            "PUT",
            "/v1/subjects/a",
            r#"{"overrides":{"tokens-per-day":5}}"#,
            "expected an object",
        ),
        (
            "PUT",
            "/v1/subjects/a",
            r#"{"overrides":{"x":{"max":-1}}}"#,
            "overrides.x.max",
        ),
        (
            "PUT",
            "/v1/subjects/a",
            r#"{"overrides":{"x":{"maxx":1}}}"#,
            "the fields are max",
        ),
        ("POST", "/v1/subjects/a/reset", r#"{"limit":5}"#, "limit: wrong type"),
        ("POST", "/v1/subjects/a/credit", "", "limit: is required"),
        (
            "POST",
            "/v1/subjects/a/credit",
            r#"{"limit":"x","amount":-5}"#,
            "amount: negative number",
        ),
        ("POST", "/v1/batch", "{}", "operations: is required"),
    ];
    let mut problems = Vec::new();
    for (method, path, body, says) in cases {
        let (status, msg) = error_message(&s, method, path, body).await;
        if status != 400 || !msg.contains(says) {
            problems.push(format!(
                "{method} {path} {body:?}: {status} {msg:?}, wanted 400 saying {says:?}"
            ));
        }
        if let Some(w) = RUST_WORDS.iter().find(|w| msg.contains(*w)) {
            problems.push(format!("{method} {path} {body:?}: {msg:?} says {w:?}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    s.stop().await;
}

/// serde calls JSON arrays "sequence" and objects "map": answers say array and object.
#[tokio::test]
async fn wrong_types_name_json_types() {
    let s = TestServer::start(CONFIG, Transport::Tcp).await;
    for (path, body) in [
        ("/v1/consume", r#"{"subject":"a","amounts":[1]}"#),
        ("/v1/batch", r#"{"operations":{}}"#),
    ] {
        let (_, msg) = error_message(&s, "POST", path, body).await;
        assert!(!msg.contains("sequence") && !msg.contains("map,"), "{path}: {msg}");
    }
    s.stop().await;
}

/// One body type serves check, consume, reserve and batch operations; an
/// unknown field is answered with the fields of the endpoint it was sent to.
#[tokio::test]
async fn unknown_fields_list_only_what_the_endpoint_takes() {
    let s = TestServer::start(CONFIG, Transport::Tcp).await;
    let body = r#"{"subject":"a","colour":"red"}"#;
    let (_, consume) = error_message(&s, "POST", "/v1/consume", body).await;
    assert!(
        consume.contains("idempotency_key") && !consume.contains("ttl_ms") && !consume.contains("op,"),
        "{consume}"
    );
    let (_, check) = error_message(&s, "POST", "/v1/check", body).await;
    assert!(
        !check.contains("idempotency_key") && !check.contains("ttl_ms"),
        "{check}"
    );
    let (_, reserve) = error_message(&s, "POST", "/v1/reserve", body).await;
    assert!(reserve.contains("ttl_ms") && !reserve.contains("op,"), "{reserve}");
    s.stop().await;
}

/// An unknown metric is answered with the metrics there are.
#[tokio::test]
async fn unknown_metric_lists_the_metrics() {
    let s = TestServer::start(CONFIG, Transport::Tcp).await;
    let r = s
        .req(
            "POST",
            "/v1/consume",
            Some(r#"{"subject":"a","amounts":{"tokenz":1}}"#),
            &[],
        )
        .await;
    assert_eq!(r.error_code(), "unknown_metric");
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("images") && msg.contains("requests") && msg.contains("tokens"),
        "{msg}"
    );
    s.stop().await;
}

/// `/v1/check` changes nothing, so an idempotency key there (body or header)
/// is a mistake to report, as `ttl_ms` on consume is.
#[tokio::test]
async fn check_rejects_an_idempotency_key() {
    let s = TestServer::start(CONFIG, Transport::Tcp).await;
    let r = s
        .req(
            "POST",
            "/v1/check",
            Some(r#"{"subject":"a","idempotency_key":"k"}"#),
            &[],
        )
        .await;
    assert_eq!((r.status, r.error_code()), (400, "invalid_request"), "{}", r.text);
    let r = s
        .req(
            "POST",
            "/v1/check",
            Some(r#"{"subject":"a"}"#),
            &[("idempotency-key", "k")],
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    s.stop().await;
}
