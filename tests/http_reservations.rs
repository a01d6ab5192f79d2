//! Reserve, commit (less, more, after expiry), release, automatic expiry, and the
//! 404/409 answers, over TCP and the Unix socket.

mod common;

use common::{TestServer, TRANSPORTS};
use serde_json::json;

const CONFIG: &str = r#"
[engine]
reservation_ttl_default = "60s"
reservation_ttl_max = "10m"

[[limits]]
name = "global-tokens"
metric = "tokens"
scope = "global"
period = "1d"
max = 100000

[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 1000
  [[plans.limits]]
  name = "calls-per-day"
  period = "1d"
  max = 100
"#;

async fn reserve(s: &TestServer, tokens: u64, ttl_ms: Option<u64>) -> (String, common::Resp) {
    let mut body = json!({"subject": "u", "event": "llm.chat", "amounts": {"tokens": tokens}});
    if let Some(t) = ttl_ms {
        body["ttl_ms"] = json!(t);
    }
    let r = s.post("/v1/reserve", body).await;
    assert!(r.allowed(), "{}", r.text);
    (r.body["reservation_id"].as_str().unwrap().to_string(), r)
}

async fn used(s: &TestServer, limit: &str) -> u64 {
    s.get("/v1/subjects/u").await.used(limit)
}

#[tokio::test]
async fn holds_count_as_used_and_commit_trues_up() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        let (id, r) = reserve(&s, 800, None).await;
        assert!(id.starts_with("rsv_"));
        assert_eq!(r.used("tokens-per-day"), 800);
        assert_eq!(r.body["expires_at"], "2026-11-21T10:01:00Z", "default TTL 60 s");
        // The hold blocks what would not fit beside it.
        let denied = s.consume(json!({"subject": "u", "amounts": {"tokens": 300}})).await;
        assert!(!denied.allowed());
        // Commit less: the difference is refunded.
        let c = s
            .post(
                &format!("/v1/reservations/{id}/commit"),
                json!({"amounts": {"tokens": 500}}),
            )
            .await;
        assert_eq!(c.status, 200, "{}", c.text);
        assert_eq!(c.body["status"], "committed");
        assert_eq!(c.body["expired"], false);
        assert_eq!(c.body["charged"]["tokens"], 500);
        assert_eq!(c.body["charged"]["requests"], 1, "unnamed metrics keep what was held");
        assert_eq!(used(&s, "tokens-per-day").await, 500);
        assert_eq!(used(&s, "global-tokens").await, 500);
        // Repeating the same commit answers the same.
        let again = s
            .post(
                &format!("/v1/reservations/{id}/commit"),
                json!({"amounts": {"tokens": 500}}),
            )
            .await;
        assert_eq!((again.status, &again.body), (200, &c.body));
        assert_eq!(
            used(&s, "tokens-per-day").await,
            500,
            "a repeated commit charges nothing"
        );
        // A second commit with other amounts, or a release after commit: 409.
        let other = s
            .post(
                &format!("/v1/reservations/{id}/commit"),
                json!({"amounts": {"tokens": 501}}),
            )
            .await;
        assert_eq!((other.status, other.error_code()), (409, "reservation_finished"));
        let rel = s.post(&format!("/v1/reservations/{id}/release"), json!({})).await;
        assert_eq!((rel.status, rel.error_code()), (409, "reservation_finished"));
        s.stop().await;
    }
}

#[tokio::test]
async fn commit_more_than_held_is_recorded_past_max() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        let (id, _) = reserve(&s, 900, None).await;
        let c = s
            .post(
                &format!("/v1/reservations/{id}/commit"),
                json!({"amounts": {"tokens": 1500}}),
            )
            .await;
        assert_eq!(c.status, 200, "{}", c.text);
        let counter = c.counter("tokens-per-day");
        assert_eq!(
            (counter["used"].as_u64(), counter["remaining"].as_u64()),
            (Some(1500), Some(0))
        );
        assert_eq!(used(&s, "tokens-per-day").await, 1500);
        assert!(!s
            .consume(json!({"subject": "u", "amounts": {"tokens": 1}}))
            .await
            .allowed());
        s.stop().await;
    }
}

#[tokio::test]
async fn release_refunds_and_repeats() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        let (id, _) = reserve(&s, 700, None).await;
        let r = s.post(&format!("/v1/reservations/{id}/release"), json!({})).await;
        assert_eq!((r.status, r.body["status"].as_str()), (200, Some("released")));
        assert_eq!(used(&s, "tokens-per-day").await, 0);
        assert_eq!(used(&s, "calls-per-day").await, 0);
        let again = s
            .req("POST", &format!("/v1/reservations/{id}/release"), None, &[])
            .await;
        assert_eq!((again.status, &again.body), (200, &r.body));
        let c = s.post(&format!("/v1/reservations/{id}/commit"), json!({})).await;
        assert_eq!((c.status, c.error_code()), (409, "reservation_finished"));
        let unknown = s.post("/v1/reservations/rsv_nope/commit", json!({})).await;
        assert_eq!((unknown.status, unknown.error_code()), (404, "unknown_reservation"));
        s.stop().await;
    }
}

#[tokio::test]
async fn holds_expire_automatically_and_late_commits_still_record() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        let (id, r) = reserve(&s, 600, Some(5_000)).await;
        assert_eq!(r.body["expires_at"], "2026-11-21T10:00:05Z");
        s.clock.advance(4_999);
        assert_eq!(used(&s, "tokens-per-day").await, 600, "still held");
        s.clock.advance(1);
        assert_eq!(used(&s, "tokens-per-day").await, 0, "released at expiry");
        assert_eq!(used(&s, "global-tokens").await, 0);
        // The work was done anyway: a commit after expiry records the actual usage.
        let c = s
            .post(
                &format!("/v1/reservations/{id}/commit"),
                json!({"amounts": {"tokens": 450}}),
            )
            .await;
        assert_eq!(c.status, 200, "{}", c.text);
        assert_eq!(
            (c.body["expired"].as_bool(), c.body["status"].as_str()),
            (Some(true), Some("committed"))
        );
        assert_eq!(used(&s, "tokens-per-day").await, 450);
        assert_eq!(used(&s, "calls-per-day").await, 1);
        // A release after expiry is answered as released, expired.
        let (id2, _) = reserve(&s, 100, Some(1_000)).await;
        s.clock.advance(1_000);
        let rel = s.post(&format!("/v1/reservations/{id2}/release"), json!({})).await;
        assert_eq!(
            (rel.body["status"].as_str(), rel.body["expired"].as_bool()),
            (Some("released"), Some(true))
        );
        assert_eq!(used(&s, "tokens-per-day").await, 450);
        s.stop().await;
    }
}

#[tokio::test]
async fn expiry_runs_without_any_request() {
    let s = TestServer::start(CONFIG, common::Transport::Tcp).await;
    let (_id, _) = reserve(&s, 600, Some(1_000)).await;
    s.clock.advance(1_000);
    // The maintenance task expires it on its own (it ticks every 250 ms).
    let mut open = u64::MAX;
    for _ in 0..100 {
        let m = s.get("/metrics").await.text;
        open = m
            .lines()
            .find_map(|l| l.strip_prefix("quotad_reservations_open "))
            .unwrap()
            .parse()
            .unwrap();
        if open == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(open, 0);
    s.stop().await;
}

#[tokio::test]
async fn reserve_validates_ttl() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        let r = s.post("/v1/reserve", json!({"subject": "u", "ttl_ms": 600_001})).await;
        assert_eq!((r.status, r.error_code()), (400, "invalid_request"));
        assert!(r.body["error"]["message"].as_str().unwrap().contains("ttl_ms"));
        let r = s.post("/v1/reserve", json!({"subject": "u", "ttl_ms": 0})).await;
        assert_eq!(r.status, 400);
        let r = s.consume(json!({"subject": "u", "ttl_ms": 10})).await;
        assert_eq!(r.status, 400, "ttl_ms is for reserve only");
        let r = s
            .post("/v1/reservations/x/commit", json!({"amounts": {"bogus": 1}}))
            .await;
        assert_eq!((r.status, r.error_code()), (400, "unknown_metric"));
        s.stop().await;
    }
}
