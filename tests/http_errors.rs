//! Every error code of the API (docs/api.md), and bad input of every kind: 400 naming the field,
//! never a 500, and nothing stored is changed. Over TCP and the Unix socket.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{TestServer, TRANSPORTS};
use quotad::engine::{Lsn, Mutation};
use quotad::journal::{DurableWatch, Journal, JournalError, NullJournal};
use serde_json::json;

const CONFIG: &str = r#"
[server]
max_body_bytes = 2048
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 1000
"#;

const NO_DEFAULT: &str = r#"
[[plans]]
name = "paid"
  [[plans.limits]]
  name = "per-day"
  period = "1d"
  max = 10
"#;

async fn assert_400(s: &TestServer, path: &str, body: &str, field: &str) {
    let r = s.req("POST", path, Some(body), &[]).await;
    assert_eq!(
        (r.status, r.error_code()),
        (400, "invalid_request"),
        "{body}: {}",
        r.text
    );
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains(field), "message {msg:?} should name {field:?} for {body}");
}

#[tokio::test]
async fn malformed_and_out_of_range_input_is_400_naming_the_field() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        let long = "x".repeat(257);
        let cases: Vec<(String, &str)> = vec![
            ("{\"subject\":".into(), "invalid JSON"),
            ("not json".into(), "invalid JSON"),
            ("[1,2]".into(), "invalid JSON"),
            ("{}".into(), "subject"),
            ("{\"subject\":\"\"}".into(), "subject"),
            (format!("{{\"subject\":\"{long}\"}}"), "subject"),
            ("{\"subject\":\"a\\u0007b\"}".into(), "subject"),
            ("{\"subject\":42}".into(), "subject"),
            ("{\"subject\":\"u\",\"event\":\"\"}".into(), "event"),
            (
                format!("{{\"subject\":\"u\",\"event\":\"{}\"}}", "e".repeat(129)),
                "event",
            ),
            (
                "{\"subject\":\"u\",\"amounts\":{\"tokens\":-1}}".into(),
                "amounts.tokens",
            ),
            (
                "{\"subject\":\"u\",\"amounts\":{\"tokens\":1.5}}".into(),
                "amounts.tokens",
            ),
            (
                "{\"subject\":\"u\",\"amounts\":{\"tokens\":\"5\"}}".into(),
                "amounts.tokens",
            ),
            (
                "{\"subject\":\"u\",\"amounts\":{\"tokens\":9007199254740992}}".into(),
                "amounts.tokens",
            ),
            (
                "{\"subject\":\"u\",\"amounts\":{\"tokens\":18446744073709551616}}".into(),
                "amounts.tokens",
            ),
            ("{\"subject\":\"u\",\"amounts\":[1]}".into(), "amounts"),
            (
                "{\"subject\":\"u\",\"attributes\":{\"model\":1}}".into(),
                "attributes.model",
            ),
            (
                format!(
                    "{{\"subject\":\"u\",\"attributes\":{{\"model\":\"{}\"}}}}",
                    "m".repeat(257)
                ),
                "attributes.model",
            ),
            (
                format!("{{\"subject\":\"u\",\"attributes\":{{\"{}\":\"v\"}}}}", "k".repeat(65)),
                "attributes",
            ),
            (
                format!(
                    "{{\"subject\":\"u\",\"attributes\":{{{}}}}}",
                    (0..17).map(|i| format!("\"k{i}\":\"v\"")).collect::<Vec<_>>().join(",")
                ),
                "attributes",
            ),
            ("{\"subject\":\"u\",\"colour\":\"red\"}".into(), "colour"),
            ("{\"subject\":\"u\",\"idempotency_key\":\"\"}".into(), "idempotency_key"),
            ("{\"subject\":\"u\",\"ttl_ms\":-3}".into(), "ttl_ms"),
        ];
        for (body, field) in &cases {
            assert_400(&s, "/v1/consume", body, field).await;
        }
        assert_400(
            &s,
            "/v1/reservations/x/commit",
            "{\"amounts\":{\"tokens\":-1}}",
            "amounts.tokens",
        )
        .await;
        assert_400(&s, "/v1/reservations/x/commit", "{\"amount\":{}}", "amount").await;
        assert_400(&s, "/v1/subjects/u/credit", "{\"limit\":\"tokens-per-day\"}", "amount").await;
        assert_400(
            &s,
            "/v1/subjects/u/credit",
            "{\"limit\":\"tokens-per-day\",\"amount\":9007199254740992}",
            "amount",
        )
        .await;
        let r = s.req("PUT", "/v1/subjects/u", Some("{\"plan\":7}"), &[]).await;
        assert_eq!(r.status, 400);
        // None of this changed anything.
        assert_eq!(s.get("/v1/subjects/u").await.used("tokens-per-day"), 0);
        assert_eq!(s.get("/v1/subjects?limit=10").await.body["subjects"], json!([]));
        s.stop().await;
    }
}

#[tokio::test]
async fn not_found_codes_and_unknown_metric() {
    for t in TRANSPORTS {
        let s = TestServer::start(NO_DEFAULT, t).await;
        let r = s.consume(json!({"subject": "nobody"})).await;
        assert_eq!((r.status, r.error_code()), (404, "unknown_subject"));
        assert_eq!(s.get("/v1/subjects/nobody").await.status, 404);
        assert_eq!(
            s.put("/v1/subjects/u", json!({"plan": "nope"})).await.error_code(),
            "unknown_plan"
        );
        assert_eq!(s.put("/v1/subjects/u", json!({"plan": "paid"})).await.status, 200);
        let r = s.post("/v1/subjects/u/reset", json!({"limit": "nope"})).await;
        assert_eq!((r.status, r.error_code()), (404, "unknown_limit"));
        let r = s.post("/v1/reservations/rsv_0/release", json!({})).await;
        assert_eq!((r.status, r.error_code()), (404, "unknown_reservation"));
        let r = s.consume(json!({"subject": "u", "amounts": {"tokns": 3}})).await;
        assert_eq!((r.status, r.error_code()), (400, "unknown_metric"));
        assert!(r.body["error"]["message"].as_str().unwrap().contains("tokns"));
        let r = s.get("/v2/nothing").await;
        assert_eq!((r.status, r.error_code()), (404, "not_found"));
        let r = s.req("DELETE", "/v1/consume", None, &[]).await;
        assert_eq!((r.status, r.error_code()), (405, "method_not_allowed"));
        s.stop().await;
    }
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        let big = format!("{{\"subject\":\"u\",\"event\":\"{}\"}}", "e".repeat(4096));
        let r = s.req("POST", "/v1/consume", Some(&big), &[]).await;
        assert_eq!((r.status, r.error_code()), (413, "payload_too_large"), "{}", r.text);
        s.stop().await;
    }
}

#[tokio::test]
async fn auth_roles_401_and_403() {
    let config = format!(
        "{CONFIG}\n[auth]\ntokens = [{{ role = \"client\", token = \"client-token-0123456789\" }}, \
         {{ role = \"admin\", token = \"admin-token-0123456789ab\" }}]\n"
    );
    for t in TRANSPORTS {
        let s = TestServer::start(&config, t).await;
        let body = r#"{"subject":"u"}"#;
        let client = [("authorization", "Bearer client-token-0123456789")];
        let admin = [("authorization", "Bearer admin-token-0123456789ab")];
        let bad = [("authorization", "Bearer client-token-0123456788")];
        let r = s.req("POST", "/v1/consume", Some(body), &[]).await;
        assert_eq!((r.status, r.error_code()), (401, "unauthorized"));
        assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
        assert_eq!(s.req("POST", "/v1/consume", Some(body), &bad).await.status, 401);
        assert_eq!(s.req("POST", "/v1/consume", Some(body), &client).await.status, 200);
        assert_eq!(s.req("GET", "/v1/subjects/u", None, &client).await.status, 200);
        let r = s.req("PUT", "/v1/subjects/u", Some("{}"), &client).await;
        assert_eq!((r.status, r.error_code()), (403, "forbidden"));
        assert_eq!(s.req("POST", "/v1/subjects/u/reset", None, &client).await.status, 403);
        assert_eq!(s.req("PUT", "/v1/subjects/u", Some("{}"), &admin).await.status, 200);
        assert_eq!(s.req("POST", "/v1/consume", Some(body), &admin).await.status, 200);
        // Health checks need no token.
        assert_eq!(s.get("/healthz").await.status, 200);
        assert_eq!(s.get("/readyz").await.status, 200);
        s.stop().await;
    }
}

/// A journal whose appends fail once told to.
#[derive(Default)]
struct BreakableJournal {
    broken: AtomicBool,
    inner: NullJournal,
}

impl Journal for BreakableJournal {
    fn append(&self, at_ms: u64, m: &[Mutation]) -> Result<Lsn, JournalError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(JournalError("injected write failure".into()));
        }
        self.inner.append(at_ms, m)
    }
    fn watch(&self) -> DurableWatch {
        self.inner.watch()
    }
}

#[tokio::test]
async fn storage_failure_and_shutdown_are_503_with_nothing_applied() {
    for t in TRANSPORTS {
        let journal = Arc::new(BreakableJournal::default());
        let s = TestServer::start_with(CONFIG, t, common::T0, journal.clone()).await;
        assert!(s
            .consume(json!({"subject": "u", "amounts": {"tokens": 10}}))
            .await
            .allowed());
        journal.broken.store(true, Ordering::SeqCst);
        let r = s
            .consume(json!({"subject": "u", "amounts": {"tokens": 10}, "idempotency_key": "k"}))
            .await;
        assert_eq!((r.status, r.error_code()), (503, "unavailable"), "{}", r.text);
        let r = s
            .post("/v1/reserve", json!({"subject": "u", "amounts": {"tokens": 10}}))
            .await;
        assert_eq!(r.status, 503);
        assert_eq!(
            s.post("/v1/subjects/u/credit", json!({"limit": "tokens-per-day", "amount": 5}))
                .await
                .status,
            503
        );
        assert_eq!(s.put("/v1/subjects/u", json!({"plan": "free"})).await.status, 503);
        journal.broken.store(false, Ordering::SeqCst);
        let g = s.get("/v1/subjects/u").await;
        assert_eq!(
            (g.used("tokens-per-day"), g.body["assigned"].as_bool()),
            (10, Some(false)),
            "nothing was applied"
        );
        let r = s
            .consume(json!({"subject": "u", "amounts": {"tokens": 10}, "idempotency_key": "k"}))
            .await;
        assert_eq!(r.body["replayed"], false, "the failed attempt stored no key");
        // Shutting down: writes are refused, reads still answer.
        s.state.shutting_down.store(true, Ordering::SeqCst);
        let r = s.consume(json!({"subject": "u"})).await;
        assert_eq!((r.status, r.error_code()), (503, "unavailable"));
        assert_eq!(s.get("/readyz").await.status, 503);
        assert_eq!(s.post("/v1/check", json!({"subject": "u"})).await.status, 200);
        s.stop().await;
    }
}
