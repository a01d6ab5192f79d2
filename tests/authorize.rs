//! `/v1/authorize`: a consume described by headers, answered with a status a
//! proxy understands (204, 429 or the asked `deny_status`), over TCP and the
//! Unix socket. The nginx test in `tests/nginx.rs` runs the documented
//! configuration against a real nginx.

mod common;

use common::{TestServer, TRANSPORTS};

const CONFIG: &str = r#"
[engine]
max_wait_ms = 120000

[[plans]]
name = "free"
default = true
unmatched = "allow"
  [[plans.limits]]
  name = "per-minute"
  match = { event = "llm.*" }
  period = "1m"
  max = 2
  [[plans.limits]]
  name = "tokens"
  metric = "tokens"
  match = { event = "llm.*", attributes = { model = "gpt-4o" } }
  period = "1h"
  max = 1000
  [[plans.limits]]
  name = "images"
  match = { event = "image.*" }
  period = "1h"
  max = 1
  mode = "degrade"
"#;

#[tokio::test]
async fn allowed_is_204_and_denied_is_429_with_the_rate_headers() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        let h = [("x-quotad-subject", "alice"), ("x-quotad-event", "llm.chat")];
        for (i, method) in ["GET", "POST"].iter().enumerate() {
            let r = s.req(method, "/v1/authorize", None, &h).await;
            assert_eq!(r.status, 204, "{t:?} {method}: {}", r.text);
            assert_eq!(r.header("x-ratelimit-limit").as_deref(), Some("2"));
            assert_eq!(r.header("x-ratelimit-remaining"), Some((1 - i).to_string()));
            assert_eq!(r.header("x-quotad-decision").as_deref(), Some("allow"));
            assert!(r.text.is_empty());
        }
        let r = s.req("GET", "/v1/authorize", None, &h).await;
        assert_eq!(r.status, 429, "{}", r.text);
        assert_eq!(r.header("retry-after").as_deref(), Some("60"));
        assert_eq!(r.header("x-ratelimit-remaining").as_deref(), Some("0"));
        assert_eq!(r.header("x-quotad-decision").as_deref(), Some("deny"));
        assert_eq!(r.body["reasons"][0]["code"], "limit_exceeded");
        // nginx's auth_request only passes 401 and 403 on.
        let r = s.req("GET", "/v1/authorize?deny_status=403", None, &h).await;
        assert_eq!(r.status, 403, "{}", r.text);
        assert_eq!(r.header("retry-after").as_deref(), Some("60"));
        // Counted like a consume: the subject shows it.
        assert_eq!(s.get("/v1/subjects/alice").await.used("per-minute"), 2);
        s.stop().await;
    }
}

#[tokio::test]
async fn attributes_amounts_and_idempotency_keys_come_from_headers() {
    let s = TestServer::start(CONFIG, common::Transport::Tcp).await;
    let h = [
        ("x-quotad-subject", "bob"),
        ("x-quotad-event", "llm.chat"),
        ("X-Quotad-Attribute-Model", "gpt-4o"),
        ("x-quotad-amount-tokens", "300"),
        ("idempotency-key", "call-1"),
    ];
    assert_eq!(s.req("POST", "/v1/authorize", None, &h).await.status, 204);
    // The same key again is answered from its stored answer: counted once.
    assert_eq!(s.req("POST", "/v1/authorize", None, &h).await.status, 204);
    let v = s.get("/v1/subjects/bob").await;
    assert_eq!(v.used("tokens"), 300);
    assert_eq!(v.used("per-minute"), 1);
    // Envoy's ext_authz appends the original path (and query) to the prefix.
    let h2 = [("x-quotad-subject", "carol"), ("x-quotad-event", "llm.chat")];
    let r = s.req("GET", "/v1/authorize/api/chat?stream=1&x=y", None, &h2).await;
    assert_eq!(r.status, 204, "{}", r.text);
    // A degrade is allowed, and says so.
    let h3 = [("x-quotad-subject", "dan"), ("x-quotad-event", "image.gen")];
    assert_eq!(s.req("GET", "/v1/authorize", None, &h3).await.status, 204);
    let r = s.req("GET", "/v1/authorize", None, &h3).await;
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(r.header("x-quotad-decision").as_deref(), Some("degrade"));
    s.stop().await;
}

#[tokio::test]
async fn a_call_may_wait_for_capacity() {
    let s = std::sync::Arc::new(TestServer::start(CONFIG, common::Transport::Tcp).await);
    let mut holds = Vec::new();
    for _ in 0..2 {
        let r = s
            .post(
                "/v1/reserve",
                serde_json::json!({"subject": "erin", "event": "llm.chat"}),
            )
            .await;
        assert!(r.allowed(), "{}", r.text);
        holds.push(r.body["reservation_id"].as_str().unwrap().to_string());
    }
    // Without waiting: denied at once.
    let h = [("x-quotad-subject", "erin"), ("x-quotad-event", "llm.chat")];
    assert_eq!(s.req("GET", "/v1/authorize", None, &h).await.status, 429);
    // With a wait (the window ends within it), the call parks until a hold
    // is released, then is admitted.
    let s2 = s.clone();
    let call = tokio::spawn(async move {
        let h = [
            ("x-quotad-subject", "erin"),
            ("x-quotad-event", "llm.chat"),
            ("x-quotad-wait-ms", "90000"),
            ("x-quotad-priority", "high"),
        ];
        s2.req("GET", "/v1/authorize", None, &h).await
    });
    let core = s.state.core.get().unwrap();
    for _ in 0..500 {
        if core.waiting.len() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(core.waiting.len(), 1, "the call waits");
    let r = s
        .post(&format!("/v1/reservations/{}/release", holds[0]), serde_json::json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = tokio::time::timeout(std::time::Duration::from_secs(5), call)
        .await
        .expect("admitted")
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.text);
}

#[tokio::test]
async fn bad_headers_are_400_naming_them_and_nothing_is_counted() {
    let s = TestServer::start(CONFIG, common::Transport::Tcp).await;
    let before = s.digest().await;
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (vec![("x-quotad-event", "llm.chat")], "", "x-quotad-subject header"),
        (
            vec![
                ("x-quotad-subject", "z"),
                ("x-quotad-event", "llm.chat"),
                ("x-quotad-amount-tokens", "many"),
            ],
            "",
            "x-quotad-amount-tokens header",
        ),
        (
            vec![
                ("x-quotad-subject", "z"),
                ("x-quotad-event", "llm.chat"),
                ("x-quotad-amount-tokens", "-1"),
            ],
            "",
            "x-quotad-amount-tokens header",
        ),
        (
            vec![
                ("x-quotad-subject", "z"),
                ("x-quotad-event", "llm.chat"),
                ("x-quotad-priority", "urgent"),
            ],
            "",
            "x-quotad-priority header",
        ),
        (
            vec![
                ("x-quotad-subject", "z"),
                ("x-quotad-event", "llm.chat"),
                ("x-quotad-wait-ms", "999999999999"),
            ],
            "",
            "x-quotad-wait-ms header",
        ),
        (
            vec![("x-quotad-subject", "z"), ("x-quotad-event", "llm.chat")],
            "?deny_status=500",
            "deny_status",
        ),
        (
            vec![("x-quotad-subject", "z"), ("x-quotad-event", "llm.chat")],
            "?status=403",
            "status",
        ),
        (
            vec![
                ("x-quotad-subject", "z"),
                ("x-quotad-event", "llm.chat"),
                ("x-quotad-subject", "y"),
            ],
            "",
            "x-quotad-subject header",
        ),
    ];
    for (headers, query, names) in cases {
        let r = s.req("GET", &format!("/v1/authorize{query}"), None, &headers).await;
        assert_eq!(r.status, 400, "{headers:?}{query}: {}", r.text);
        assert_eq!(r.error_code(), "invalid_request");
        let msg = r.body["error"]["message"].as_str().unwrap();
        assert!(msg.starts_with(names), "{headers:?}: {msg}");
        assert!(!msg.contains("::"), "no type names: {msg}");
    }
    assert_eq!(s.digest().await, before, "nothing was counted");
    s.stop().await;
}

#[tokio::test]
async fn tokens_are_checked_and_priority_is_bounded_by_the_token() {
    let config = format!(
        r#"{CONFIG}
[[auth.tokens]]
name = "proxy"
token = "proxy-token-0123456789abcdef"
role = "client"
max_priority = "normal"
"#
    );
    let s = TestServer::start(&config, common::Transport::Tcp).await;
    let h = [("x-quotad-subject", "fay"), ("x-quotad-event", "llm.chat")];
    let r = s.req("GET", "/v1/authorize", None, &h).await;
    assert_eq!(r.status, 401, "{}", r.text);
    let auth = ("authorization", "Bearer proxy-token-0123456789abcdef");
    let r = s.req("GET", "/v1/authorize", None, &[h[0], h[1], auth]).await;
    assert_eq!(r.status, 204, "{}", r.text);
    let r = s
        .req(
            "GET",
            "/v1/authorize",
            None,
            &[h[0], h[1], auth, ("x-quotad-priority", "high")],
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.text.contains("x-quotad-priority"), "{}", r.text);
    s.stop().await;
}
