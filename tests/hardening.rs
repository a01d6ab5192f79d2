//! Defects found by an adversarial run, each reproduced and held fixed:
//! counters that could not deny refusing charges (one call blocking every
//! subject), reservations without a bound per subject, a subject with many
//! holds that could not be deleted, formula injection in the CSV export,
//! client tokens claiming any priority, waits that ignored expiring holds,
//! and data files readable by everyone.

mod common;

use common::{TestServer, Transport, TRANSPORTS};
use serde_json::json;

const MAX_SAFE: u64 = (1 << 53) - 1;

/// Global counters that cannot deny: unlimited, monitor and degrade.
const SATURATING: &str = r#"
[[limits]]
name = "all-tokens"
metric = "tokens"
scope = "global"
max = "unlimited"
period = "1d"

[[limits]]
name = "watched-tokens"
metric = "tokens"
scope = "global"
algorithm = "sliding"
period = "1h"
max = 1000
mode = "monitor"

[[limits]]
name = "soft-tokens"
metric = "tokens"
scope = "global"
algorithm = "token_bucket"
max = 1000
period = "1m"
mode = "degrade"

[[limits]]
name = "lifetime-tokens"
metric = "tokens"
scope = "global"
algorithm = "lifetime"
max = "unlimited"

[[plans]]
name = "free"
default = true
"#;

#[tokio::test]
async fn a_counter_that_cannot_deny_saturates_instead_of_blocking_everyone() {
    for t in TRANSPORTS {
        let s = TestServer::start(SATURATING, t).await;
        // One client charges (almost) the largest amount there is...
        let r = s
            .consume(json!({"subject": "mallory", "amounts": {"tokens": MAX_SAFE - 100}}))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        // ...and every other subject's calls still pass, again and again.
        for i in 0..3 {
            let r = s
                .consume(json!({"subject": format!("user:{i}"), "amounts": {"tokens": 200}}))
                .await;
            assert_eq!(r.status, 200, "{}", r.text);
            assert_ne!(r.body["decision"], "deny", "{}", r.text);
            for limit in ["all-tokens", "watched-tokens", "soft-tokens", "lifetime-tokens"] {
                assert_eq!(r.used(limit), MAX_SAFE, "{limit}: {}", r.text);
            }
        }
        // A reservation and a commit larger than its hold saturate too.
        let r = s
            .post("/v1/reserve", json!({"subject": "user:9", "amounts": {"tokens": 5}}))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let id = r.body["reservation_id"].as_str().unwrap().to_string();
        let r = s
            .post(
                &format!("/v1/reservations/{id}/commit"),
                json!({"amounts": {"tokens": MAX_SAFE}}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let r = s.consume(json!({"subject": "user:10", "amounts": {"tokens": 1}})).await;
        assert_eq!((r.status, r.used("all-tokens")), (200, MAX_SAFE), "{}", r.text);
        s.stop().await;
    }
}

const HOLDS: &str = r#"
[engine]
max_reservations_per_subject = 3
reservation_ttl_max = "1h"

[[limits]]
name = "shared-tokens"
metric = "tokens"
scope = "global"
max = 1000000000
period = "1d"

[[plans]]
name = "free"
default = true
"#;

#[tokio::test]
async fn a_subject_holds_at_most_max_reservations_per_subject() {
    for t in TRANSPORTS {
        let s = TestServer::start(HOLDS, t).await;
        let mut ids = Vec::new();
        for _ in 0..3 {
            let r = s
                .post("/v1/reserve", json!({"subject": "u", "amounts": {"tokens": 1}}))
                .await;
            assert!(r.allowed(), "{}", r.text);
            ids.push(r.body["reservation_id"].as_str().unwrap().to_string());
        }
        let r = s
            .post("/v1/reserve", json!({"subject": "u", "amounts": {"tokens": 1}}))
            .await;
        assert_eq!((r.status, r.allowed()), (200, false), "{}", r.text);
        assert_eq!(r.body["reasons"][0]["code"], "too_many_reservations", "{}", r.text);
        assert!(r.body["reasons"][0].get("limit").is_none(), "{}", r.text);
        assert!(r.body.get("retry_after_ms").is_none_or(|v| v.is_null()), "{}", r.text);
        assert_eq!(r.used("shared-tokens"), 3, "nothing charged: {}", r.text);
        // Other subjects and consumes are not affected.
        assert!(s.post("/v1/reserve", json!({"subject": "v"})).await.allowed());
        assert!(s
            .consume(json!({"subject": "u", "amounts": {"tokens": 1}}))
            .await
            .allowed());
        // A release makes room again.
        let r = s.post(&format!("/v1/reservations/{}/release", ids[0]), json!({})).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(s.post("/v1/reserve", json!({"subject": "u"})).await.allowed());
        s.stop().await;
    }
}

#[tokio::test]
async fn a_subject_with_60000_holds_can_be_deleted_and_the_delete_survives_a_restart() {
    const HOLD_COUNT: usize = 60_000;
    let config = HOLDS
        .replace(
            "max_reservations_per_subject = 3",
            "max_reservations_per_subject = 100000",
        )
        .replace("[engine]", "[storage]\ndurability = \"batch\"\n[engine]");
    let data = tempfile::tempdir().unwrap();
    let s = TestServer::start_durable(&config, Transport::Tcp, common::T0, data.path()).await;
    for _ in 0..HOLD_COUNT / 1000 {
        let ops: Vec<_> = (0..1000)
            .map(|_| json!({"op": "reserve", "subject": "hoarder", "amounts": {"tokens": 2}, "ttl_ms": 3_600_000}))
            .collect();
        let r = s.post("/v1/batch", json!({ "operations": ops })).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(r.body["results"].as_array().unwrap().iter().all(|x| x["status"] == 200));
    }
    let r = s.consume(json!({"subject": "other", "amounts": {"tokens": 5}})).await;
    assert_eq!(r.used("shared-tokens"), 2 * HOLD_COUNT as u64 + 5, "{}", r.text);

    let r = s
        .req("DELETE", "/v1/subjects/hoarder", None, &[("Idempotency-Key", "del-1")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // The holds' share of the global counter is refunded.
    let r = s.consume(json!({"subject": "other", "amounts": {"tokens": 1}})).await;
    assert_eq!(r.used("shared-tokens"), 6, "{}", r.text);
    s.stop().await;

    // Replay reaches the same state, and the delete's key answers as before.
    let s = TestServer::start_durable(&config, Transport::Tcp, common::T0, data.path()).await;
    let r = s.consume(json!({"subject": "other", "amounts": {"tokens": 1}})).await;
    assert_eq!(r.used("shared-tokens"), 7, "{}", r.text);
    let r = s
        .req("DELETE", "/v1/subjects/hoarder", None, &[("Idempotency-Key", "del-1")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(s.post("/v1/reserve", json!({"subject": "hoarder"})).await.allowed());
    s.stop().await;
}
