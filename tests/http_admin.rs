//! Subject administration: plan changes keep usage, overrides, reset, credit,
//! delete, listing, and the plans in force, over TCP and the Unix socket.

mod common;

use common::{TestServer, TRANSPORTS};
use serde_json::json;

const CONFIG: &str = r#"
[[limits]]
name = "global-calls"
scope = "global"
period = "1d"
max = 1000000

[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 1000
  [[plans.limits]]
  name = "image-credits"
  algorithm = "lifetime"
  match = { event = "image.render" }
  max = 2

[[plans]]
name = "pro"
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 10000
"#;

#[tokio::test]
async fn plan_change_keeps_todays_usage_and_applies_the_new_max() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        assert!(s
            .consume(json!({"subject": "u", "amounts": {"tokens": 900}}))
            .await
            .allowed());
        assert!(!s
            .consume(json!({"subject": "u", "amounts": {"tokens": 200}}))
            .await
            .allowed());
        let r = s.put("/v1/subjects/u", json!({"plan": "pro"})).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            (r.body["plan"].as_str(), r.body["assigned"].as_bool()),
            (Some("pro"), Some(true))
        );
        let c = r.counter("tokens-per-day");
        assert_eq!((c["used"].as_u64(), c["max"].as_u64()), (Some(900), Some(10000)));
        assert!(s
            .consume(json!({"subject": "u", "amounts": {"tokens": 200}}))
            .await
            .allowed());
        // Downgrade: usage stays, the lower max applies again.
        s.put("/v1/subjects/u", json!({"plan": "free"})).await;
        assert!(!s
            .consume(json!({"subject": "u", "amounts": {"tokens": 1}}))
            .await
            .allowed());
        let r = s.put("/v1/subjects/u", json!({"plan": "gold"})).await;
        assert_eq!((r.status, r.error_code()), (404, "unknown_plan"));
        s.stop().await;
    }
}

#[tokio::test]
async fn overrides_replace_max_for_one_subject() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        let r = s
            .put(
                "/v1/subjects/vip",
                json!({"overrides": {"tokens-per-day": {"max": 5000}}}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["overrides"], json!({"tokens-per-day": {"max": 5000}}));
        assert_eq!(r.body["plan"], "free");
        assert!(s
            .consume(json!({"subject": "vip", "amounts": {"tokens": 4000}}))
            .await
            .allowed());
        assert!(!s
            .consume(json!({"subject": "other", "amounts": {"tokens": 4000}}))
            .await
            .allowed());
        // A plan change without overrides keeps them; unlimited is allowed.
        let r = s.put("/v1/subjects/vip", json!({"plan": "pro"})).await;
        assert_eq!(r.body["overrides"]["tokens-per-day"]["max"], 5000);
        let r = s
            .put(
                "/v1/subjects/vip",
                json!({"overrides": {"tokens-per-day": {"max": "unlimited"}}}),
            )
            .await;
        assert_eq!(r.counter("tokens-per-day")["max"], "unlimited");
        let r = s
            .put("/v1/subjects/vip", json!({"overrides": {"nope": {"max": 1}}}))
            .await;
        assert_eq!((r.status, r.error_code()), (404, "unknown_limit"));
        let r = s
            .put("/v1/subjects/vip", json!({"overrides": {"global-calls": {"max": 1}}}))
            .await;
        assert_eq!((r.status, r.error_code()), (400, "invalid_request"));
        let r = s
            .put(
                "/v1/subjects/vip",
                json!({"overrides": {"tokens-per-day": {"max": -5}}}),
            )
            .await;
        assert_eq!(r.status, 400);
        s.stop().await;
    }
}

#[tokio::test]
async fn reset_and_credit() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        s.consume(json!({"subject": "u", "amounts": {"tokens": 700}})).await;
        s.consume(json!({"subject": "u", "event": "image.render"})).await;
        s.consume(json!({"subject": "u", "event": "image.render"})).await;
        assert!(!s
            .consume(json!({"subject": "u", "event": "image.render"}))
            .await
            .allowed());
        // Top-up: the lifetime cap grows by the credit.
        let r = s
            .post("/v1/subjects/u/credit", json!({"limit": "image-credits", "amount": 3}))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let c = r.counter("image-credits");
        assert_eq!(
            (c["max"].as_u64(), c["used"].as_u64(), c["remaining"].as_u64()),
            (Some(5), Some(2), Some(3))
        );
        assert!(s
            .consume(json!({"subject": "u", "event": "image.render"}))
            .await
            .allowed());
        // Credit on a window gives usage back.
        let r = s
            .post(
                "/v1/subjects/u/credit",
                json!({"limit": "tokens-per-day", "amount": 200}),
            )
            .await;
        assert_eq!(r.used("tokens-per-day"), 500);
        // Reset one limit, then all.
        let r = s.post("/v1/subjects/u/reset", json!({"limit": "tokens-per-day"})).await;
        assert_eq!((r.used("tokens-per-day"), r.used("image-credits")), (0, 3));
        let r = s.req("POST", "/v1/subjects/u/reset", None, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.used("image-credits"), 0);
        assert_eq!(
            r.used("global-calls"),
            4,
            "reset touches only the subject's own counters"
        );
        let r = s.post("/v1/subjects/u/reset", json!({"limit": "global-calls"})).await;
        assert_eq!((r.status, r.error_code()), (400, "invalid_request"));
        let r = s.post("/v1/subjects/u/reset", json!({"limit": "nope"})).await;
        assert_eq!((r.status, r.error_code()), (404, "unknown_limit"));
        let r = s
            .post("/v1/subjects/u/credit", json!({"limit": "image-credits", "amount": 0}))
            .await;
        assert_eq!(r.status, 400);
        s.stop().await;
    }
}

#[tokio::test]
async fn delete_forgets_counters_and_holds() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        s.put("/v1/subjects/u", json!({"plan": "pro"})).await;
        s.consume(json!({"subject": "u", "amounts": {"tokens": 700}})).await;
        let hold = s
            .post("/v1/reserve", json!({"subject": "u", "amounts": {"tokens": 100}}))
            .await;
        let id = hold.body["reservation_id"].as_str().unwrap().to_string();
        assert_eq!(s.get("/v1/subjects/u").await.used("global-calls"), 2);
        let r = s.req("DELETE", "/v1/subjects/u", None, &[]).await;
        assert_eq!((r.status, &r.body), (200, &json!({"subject": "u", "deleted": true})));
        let g = s.get("/v1/subjects/u").await;
        assert_eq!(
            (g.body["plan"].as_str(), g.body["assigned"].as_bool()),
            (Some("free"), Some(false))
        );
        assert_eq!(g.used("tokens-per-day"), 0);
        assert_eq!(g.used("global-calls"), 1, "the hold on the global counter was refunded");
        let c = s.post(&format!("/v1/reservations/{id}/commit"), json!({})).await;
        assert_eq!((c.status, c.error_code()), (404, "unknown_reservation"));
        let r = s.req("DELETE", "/v1/subjects/u", None, &[]).await;
        assert_eq!(r.body["deleted"], false);
        s.stop().await;
    }
}

#[tokio::test]
async fn listing_subjects_in_pages_and_plans() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        for i in 0..25 {
            s.consume(json!({"subject": format!("user:{i:02}"), "amounts": {"tokens": 1}}))
                .await;
        }
        s.put("/v1/subjects/user:07", json!({"plan": "pro"})).await;
        let mut seen = Vec::new();
        let mut after = String::new();
        loop {
            let path = if after.is_empty() {
                "/v1/subjects?limit=10".to_string()
            } else {
                format!("/v1/subjects?limit=10&after={after}")
            };
            let r = s.get(&path).await;
            assert_eq!(r.status, 200, "{}", r.text);
            for e in r.body["subjects"].as_array().unwrap() {
                seen.push(e["subject"].as_str().unwrap().to_string());
                if e["subject"] == "user:07" {
                    assert_eq!(e["plan"], "pro");
                }
            }
            match r.body["next_after"].as_str() {
                Some(a) => after = a.to_string(),
                None => break,
            }
        }
        let expected: Vec<String> = (0..25).map(|i| format!("user:{i:02}")).collect();
        assert_eq!(seen, expected);
        assert_eq!(s.get("/v1/subjects?limit=0").await.status, 400);
        assert_eq!(s.get("/v1/subjects?limit=abc").await.status, 400);
        assert_eq!(s.get("/v1/subjects?color=red").await.status, 400);
        let p = s.get("/v1/plans").await;
        assert_eq!(p.body["plans"][0]["name"], "free");
        assert_eq!(p.body["plans"][0]["default"], true);
        assert_eq!(p.body["plans"][1]["limits"][0]["max"], 10000);
        assert_eq!(p.body["limits"][0]["scope"], "global");
        s.stop().await;
    }
}

#[tokio::test]
async fn subjects_with_slashes_and_unicode_in_the_path() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        s.consume(json!({"subject": "org/acme ü", "amounts": {"tokens": 5}}))
            .await;
        let r = s.get("/v1/subjects/org%2Facme%20%C3%BC").await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["subject"], "org/acme ü");
        assert_eq!(r.used("tokens-per-day"), 5);
        s.stop().await;
    }
}
