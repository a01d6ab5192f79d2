//! The request edge, as an adversarial run found it: a lower-case `bearer`
//! was 401, a repeated query parameter was taken (one value of the two) and
//! so was a key repeated inside a nested JSON object. Over TCP and the Unix
//! socket.

mod common;

use common::{TestServer, TRANSPORTS};
use serde_json::json;

const CONFIG: &str = r#"
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 1000
"#;

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let cfg = format!("[auth]\ntokens = [{{ role = \"client\", token = \"client-token-0123456789\" }}]\n{CONFIG}");
    for t in TRANSPORTS {
        let s = TestServer::start(&cfg, t).await;
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            let auth = format!("{scheme} client-token-0123456789");
            let r = s.req("GET", "/v1/plans", None, &[("authorization", &auth)]).await;
            assert_eq!(r.status, 200, "{t:?} {scheme}: {}", r.text);
        }
        for auth in [
            "Basic client-token-0123456789",
            "bearerclient-token-0123456789",
            "bearer",
            "client-token-0123456789",
        ] {
            let r = s.req("GET", "/v1/plans", None, &[("authorization", auth)]).await;
            assert_eq!(
                (r.status, r.error_code()),
                (401, "unauthorized"),
                "{t:?} {auth}: {}",
                r.text
            );
        }
        s.stop().await;
    }
}

#[tokio::test]
async fn keys_repeated_at_any_depth_are_400_naming_them() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        let cases = [
            ("POST", "/v1/consume", r#"{"subject":"u","subject":"v"}"#, "subject"),
            (
                "POST",
                "/v1/consume",
                r#"{"subject":"u","amounts":{"tokens":1,"tokens":900}}"#,
                "amounts.tokens",
            ),
            (
                "POST",
                "/v1/check",
                r#"{"subject":"u","attributes":{"model":"a","model":"b"}}"#,
                "attributes.model",
            ),
            (
                "POST",
                "/v1/reserve",
                r#"{"subject":"u","amounts":{"tokens":1,"tok\u0065ns":900}}"#,
                "amounts.tokens",
            ),
            (
                "PUT",
                "/v1/subjects/u",
                r#"{"overrides":{"tokens-per-day":{"max":5,"max":9}}}"#,
                "overrides.tokens-per-day.max",
            ),
            (
                "POST",
                "/v1/batch",
                r#"{"operations":[{"op":"check","subject":"u"},{"op":"consume","subject":"u","amounts":{"tokens":1,"tokens":2}}]}"#,
                "operations[1].amounts.tokens",
            ),
        ];
        for (method, path, body, key) in cases {
            let r = s.req(method, path, Some(body), &[]).await;
            assert_eq!(
                (r.status, r.error_code()),
                (400, "invalid_request"),
                "{t:?} {body}: {}",
                r.text
            );
            let msg = r.body["error"]["message"].as_str().unwrap();
            assert_eq!(msg, format!("{key}: appears twice; give each key once"), "{body}");
        }
        // Nothing was charged, and equal keys in different objects are fine.
        let r = s
            .consume(json!({"subject": "u", "amounts": {"tokens": 2}, "attributes": {"subject": "x"}}))
            .await;
        assert!(r.allowed());
        assert_eq!(r.used("tokens-per-day"), 2, "{}", r.text);
        s.stop().await;
    }
}

#[tokio::test]
async fn repeated_query_parameters_are_400_naming_them() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        assert!(s.consume(json!({"subject": "u"})).await.allowed());
        let day = "from=2026-11-21&to=2026-11-22";
        let cases = [
            ("/v1/subjects?limit=1&limit=2".to_string(), "limit"),
            ("/v1/subjects?after=a&limit=5&after=b".into(), "after"),
            ("/v1/events?type=*&type=reservation.*".into(), "type"),
            ("/v1/events/stream?after=0&after=0".into(), "after"),
            ("/v1/webhooks?x=1&x=1".into(), "x"),
            ("/v1/breakers?x&x".into(), "x"),
            ("/v1/anomalies?a=1&a=2".into(), "a"),
            (format!("/v1/usage?{day}&limit=1&limit=2"), "limit"),
            (
                format!("/v1/subjects/u/usage?{day}&granularity=day&granularity=hour"),
                "granularity",
            ),
            (format!("/v1/subjects/u/usage?{day}&to=2026-11-23"), "to"),
        ];
        for (path, name) in cases {
            let r = s.get(&path).await;
            assert_eq!(
                (r.status, r.error_code()),
                (400, "invalid_request"),
                "{t:?} {path}: {}",
                r.text
            );
            let msg = r.body["error"]["message"].as_str().unwrap();
            assert!(
                msg.starts_with(&format!("{name}: ")) && msg.contains("more than once"),
                "{path}: {msg}"
            );
        }
        // Given once each, the same queries are answered.
        assert_eq!(s.get("/v1/subjects?limit=1").await.status, 200);
        assert_eq!(s.get(&format!("/v1/subjects/u/usage?{day}")).await.status, 200);
        s.stop().await;
    }
}
