//! The connection and request edge, as an adversarial run found it: idle
//! connections that locked the listener, heads that never finish, a request
//! with both Content-Length and Transfer-Encoding, a lower-case `bearer`,
//! keys repeated inside nested JSON objects and repeated query parameters.
//! Over TCP and the Unix socket.
//!
//! The test process may hold 20,000 files (`ulimit -n`), and it holds both
//! ends of every connection, so the flood is 2,000 idle connections against
//! `server.max_connections = 1000`: the same eviction as 10,600 against the
//! default 10,000.

mod common;

use std::time::Duration;

use common::raw::{raw, Raw};
use common::{TestServer, TRANSPORTS};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

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

/// A consume that announces its body and waits for `100 Continue` before
/// sending it: in flight from then on, until `finish`.
async fn upload_begun(s: &TestServer, subject: &str) -> (Raw, String) {
    let body = json!({"subject": subject, "amounts": {"tokens": 1}}).to_string();
    let mut c = raw(s).await;
    c.send(&format!(
        "POST /v1/consume HTTP/1.1\r\nHost: q\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    ))
    .await;
    c.continued().await;
    (c, body)
}

async fn finish(mut c: Raw, body: &str) {
    c.send(body).await;
    let (status, _, text) = c.answer().await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["allowed"], true, "{text}");
}

async fn healthz_within_a_second(s: &TestServer) {
    let r = tokio::time::timeout(Duration::from_secs(1), s.get("/healthz"))
        .await
        .expect("GET /healthz was answered within 1 s");
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test]
async fn idle_connections_make_room_for_a_new_client() {
    let cfg = format!("[server]\nmax_connections = 1000\n{CONFIG}");
    for t in TRANSPORTS {
        let s = TestServer::start(&cfg, t).await;
        let mut idle = Vec::with_capacity(2000);
        for _ in 0..2000 {
            idle.push(raw(&s).await);
        }
        healthz_within_a_second(&s).await;
        let evicted = s.state.metrics.connections.evicted.get();
        assert!(evicted >= 1000, "{t:?}: {evicted} evicted");
        // The oldest were closed for the newest.
        assert!(idle[0].closed().await.is_some(), "{t:?}");
        let metrics = s.get("/metrics").await.text;
        assert!(metrics.contains("quotad_connections_evicted_total"), "{metrics}");
        drop(idle);
        s.stop().await;
    }
}

#[tokio::test]
async fn a_head_that_does_not_come_in_time_closes_the_connection() {
    let cfg = format!("[server]\nheader_timeout_ms = 200\n{CONFIG}");
    for t in TRANSPORTS {
        let s = TestServer::start(&cfg, t).await;
        // A connection that sends nothing.
        let mut silent = raw(&s).await;
        assert!(
            silent.closed().await.is_some(),
            "{t:?}: a silent connection stayed open"
        );
        // One that sends half a head.
        let mut half = raw(&s).await;
        half.send("GET /healthz HTTP/1.1\r\nHost: q\r\n").await;
        assert!(half.closed().await.is_some(), "{t:?}: half a head stayed open");
        // A kept-alive connection waiting for its next request.
        let mut kept = raw(&s).await;
        kept.send("GET /healthz HTTP/1.1\r\nHost: q\r\n\r\n").await;
        let (status, head, _) = kept.answer().await;
        assert_eq!(status, 200);
        assert!(!head.to_ascii_lowercase().contains("connection: close"), "{head}");
        assert!(
            kept.closed().await.is_some(),
            "{t:?}: a kept-alive connection stayed open"
        );
        assert!(s.state.metrics.connections.header_timeouts.get() >= 3);
        s.stop().await;
    }
}

#[tokio::test]
async fn a_connection_with_a_request_in_flight_is_not_evicted() {
    let cfg = format!("[server]\nmax_connections = 4\nbody_timeout_ms = 60000\n{CONFIG}");
    for t in TRANSPORTS {
        let s = TestServer::start(&cfg, t).await;
        let (upload, body) = upload_begun(&s, "uploader").await;
        // Far more idle connections than the cap: each evicts an idle one.
        let mut idle = Vec::new();
        for _ in 0..12 {
            idle.push(raw(&s).await);
        }
        healthz_within_a_second(&s).await;
        assert!(s.state.metrics.connections.evicted.get() >= 9);
        // The upload was in flight all along: it is answered.
        finish(upload, &body).await;
        s.stop().await;
    }
}

#[tokio::test]
async fn half_a_head_does_not_hold_a_connection_at_the_cap() {
    // The header timeout is long here: the eviction closes it, not the timeout.
    let cfg = format!("[server]\nmax_connections = 2\nheader_timeout_ms = 60000\n{CONFIG}");
    for t in TRANSPORTS {
        let s = TestServer::start(&cfg, t).await;
        let mut half = raw(&s).await;
        half.send("POST /v1/consume HTTP/1.1\r\nHost: q\r\n").await;
        // Four newer connections through a cap of two: at least two of them
        // are evicted, and the half head, idle longer, before them.
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(raw(&s).await);
        }
        healthz_within_a_second(&s).await;
        assert!(half.closed().await.is_some(), "{t:?}: half a head kept its connection");
        assert!(idle[0].closed().await.is_some(), "{t:?}");
        s.stop().await;
    }
}

#[tokio::test]
async fn when_every_connection_is_busy_a_new_one_is_closed() {
    let cfg = format!("[server]\nmax_connections = 2\nbody_timeout_ms = 60000\n{CONFIG}");
    for t in TRANSPORTS {
        let s = TestServer::start(&cfg, t).await;
        let (a, a_body) = upload_begun(&s, "a").await;
        let (b, b_body) = upload_begun(&s, "b").await;
        let mut third = raw(&s).await;
        let _ = third.io.write_all(b"GET /healthz HTTP/1.1\r\nHost: q\r\n\r\n").await;
        assert_eq!(
            third.closed().await.as_deref(),
            Some(""),
            "{t:?}: not closed at once, or answered"
        );
        assert_eq!(s.state.metrics.connections.refused.get(), 1);
        // Neither busy connection was touched; once one is done, new ones are served.
        finish(a, &a_body).await;
        finish(b, &b_body).await;
        healthz_within_a_second(&s).await;
        s.stop().await;
    }
}

#[tokio::test]
async fn both_content_length_and_transfer_encoding_is_400_and_closes() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        let body = r#"{"subject":"smuggled","amounts":{"tokens":5}}"#;
        let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
        for headers in [
            format!("Content-Length: {}\r\nTransfer-Encoding: chunked", body.len()),
            format!("transfer-encoding: chunked\r\ncontent-length: {}", body.len()),
        ] {
            let mut c = raw(&s).await;
            c.send(&format!(
                "POST /v1/consume HTTP/1.1\r\nHost: q\r\n{headers}\r\n\r\n{chunked}"
            ))
            .await;
            let (status, head, text) = c.answer().await;
            assert_eq!(status, 400, "{t:?} {headers}: {text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["error"]["code"], "invalid_request");
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(
                msg.contains("Content-Length") && msg.contains("Transfer-Encoding"),
                "{msg}"
            );
            assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
            assert!(c.closed().await.is_some(), "{t:?}: the connection stayed open");
        }
        // A chunked request alone is fine, and so is the next one on its
        // connection; a request with both lengths pipelined after them is the
        // one refused.
        let mut c = raw(&s).await;
        let ok = format!("POST /v1/consume HTTP/1.1\r\nHost: q\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}");
        let plain = format!(
            "POST /v1/check HTTP/1.1\r\nHost: q\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let both = format!(
            "POST /v1/consume HTTP/1.1\r\nHost: q\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n{chunked}"
        );
        c.send(&format!("{ok}{plain}{both}")).await;
        assert_eq!(c.answer().await.0, 200);
        assert_eq!(c.answer().await.0, 200);
        assert_eq!(c.answer().await.0, 400);
        // Only the plain chunked consume was charged.
        let r = s.get("/v1/subjects/smuggled").await;
        assert_eq!(r.used("tokens-per-day"), 5, "{}", r.text);
        s.stop().await;
    }
}

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
            // Endpoints that read no query refuse a repeat too.
            ("/healthz?x=1&x=2".into(), "x"),
            ("/v1/plans?x&x".into(), "x"),
            ("/v1/subjects/u?y=1&y=1".into(), "y"),
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
        // A write with a repeated parameter is refused and applies nothing.
        let r = s
            .req(
                "POST",
                "/v1/consume?x=1&x=2",
                Some(r#"{"subject":"u","amounts":{"tokens":7}}"#),
                &[],
            )
            .await;
        assert_eq!(r.status, 400, "{}", r.text);
        assert_eq!(s.get("/v1/subjects/u").await.used("tokens-per-day"), 0);
        // Given once each, the same queries are answered.
        assert_eq!(s.get("/v1/subjects?limit=1").await.status, 200);
        assert_eq!(s.get(&format!("/v1/subjects/u/usage?{day}")).await.status, 200);
        s.stop().await;
    }
}
