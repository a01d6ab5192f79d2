//! Idempotency keys: replay with `replayed: true` and no charge, 409 on a
//! different body, the header form, denials not stored, retention.

mod common;

use common::{TestServer, TRANSPORTS};
use serde_json::json;

const CONFIG: &str = r#"
[engine]
idempotency_retention = "1h"
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "per-day"
  period = "1d"
  max = 2
  [[plans.limits]]
  name = "credits"
  algorithm = "lifetime"
  match = { event = "never" }
  max = 0
"#;

#[tokio::test]
async fn replay_answers_the_original_and_charges_nothing() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        let body = json!({"subject": "u", "idempotency_key": "k1"});
        let first = s.consume(body.clone()).await;
        assert!(first.allowed());
        assert_eq!(first.body["replayed"], false);
        let second = s.consume(body.clone()).await;
        assert_eq!(second.body["replayed"], true);
        let mut expected = first.body.clone();
        expected["replayed"] = json!(true);
        assert_eq!(second.body, expected, "the original answer, counters included");
        assert_eq!(s.get("/v1/subjects/u").await.used("per-day"), 1);
        // Same key, other body: 409.
        let r = s
            .consume(json!({"subject": "u", "idempotency_key": "k1", "amounts": {"requests": 2}}))
            .await;
        assert_eq!((r.status, r.error_code()), (409, "idempotency_conflict"));
        // Keys are not per subject: another subject under the same key conflicts too.
        let r = s.consume(json!({"subject": "v", "idempotency_key": "k1"})).await;
        assert_eq!(r.status, 409);
        // `requests` defaults to 1, so spelling it out is the same request.
        let r = s
            .consume(json!({"subject": "u", "idempotency_key": "k1", "amounts": {"requests": 1}}))
            .await;
        assert_eq!(r.body["replayed"], true);
        s.stop().await;
    }
}

#[tokio::test]
async fn header_key_and_reserve_replay() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        let body = json!({"subject": "u"}).to_string();
        let h = [("idempotency-key", "hk")];
        let a = s.req("POST", "/v1/reserve", Some(&body), &h).await;
        let b = s.req("POST", "/v1/reserve", Some(&body), &h).await;
        assert_eq!(a.body["reservation_id"], b.body["reservation_id"]);
        assert_eq!(b.body["replayed"], true);
        assert_eq!(s.get("/v1/subjects/u").await.used("per-day"), 1);
        // Header and body key must agree.
        let r = s
            .req(
                "POST",
                "/v1/consume",
                Some(r#"{"subject":"u","idempotency_key":"other"}"#),
                &h,
            )
            .await;
        assert_eq!((r.status, r.error_code()), (400, "invalid_request"));
        // The same key on consume is a different request than on reserve.
        let r = s.req("POST", "/v1/consume", Some(&body), &h).await;
        assert_eq!(r.status, 409);
        s.stop().await;
    }
}

#[tokio::test]
async fn denials_are_not_stored_and_keys_expire_after_retention() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        s.consume(json!({"subject": "u"})).await;
        s.consume(json!({"subject": "u"})).await;
        let denied = s.consume(json!({"subject": "u", "idempotency_key": "d"})).await;
        assert!(!denied.allowed());
        // The day rolls over; the same key is evaluated afresh because the denial was not stored.
        s.clock.advance(14 * 3_600_000);
        let r = s.consume(json!({"subject": "u", "idempotency_key": "d"})).await;
        assert!(r.allowed());
        assert_eq!(r.body["replayed"], false);
        // Within retention it replays; after it, it is a new request.
        s.clock.advance(3_599_000);
        assert_eq!(
            s.consume(json!({"subject": "u", "idempotency_key": "d"})).await.body["replayed"],
            true
        );
        s.clock.advance(1_000);
        let r = s.consume(json!({"subject": "u", "idempotency_key": "d"})).await;
        assert_eq!(
            (r.allowed(), &r.body["replayed"]),
            (true, &json!(false)),
            "retention is over"
        );
        assert_eq!(r.used("per-day"), 2);
        s.stop().await;
    }
}

#[tokio::test]
async fn admin_writes_are_idempotent_too() {
    for t in TRANSPORTS {
        let s = TestServer::start(
            r#"
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "credits"
  algorithm = "lifetime"
  max = 1
"#,
            t,
        )
        .await;
        let body = json!({"limit": "credits", "amount": 5}).to_string();
        let h = [("idempotency-key", "topup-1")];
        let a = s.req("POST", "/v1/subjects/u/credit", Some(&body), &h).await;
        assert_eq!(a.status, 200, "{}", a.text);
        let b = s.req("POST", "/v1/subjects/u/credit", Some(&body), &h).await;
        assert_eq!(b.header("idempotent-replayed").as_deref(), Some("true"));
        assert_eq!(b.counter("credits")["max"], 6, "credited once, not twice");
        let c = s
            .req(
                "POST",
                "/v1/subjects/u/credit",
                Some(r#"{"limit":"credits","amount":6}"#),
                &h,
            )
            .await;
        assert_eq!((c.status, c.error_code()), (409, "idempotency_conflict"));
        s.stop().await;
    }
}
