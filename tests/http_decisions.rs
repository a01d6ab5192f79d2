//! How matched limits combine: stacking, attribute matching and scope, global
//! scope, the three modes, `unmatched`, `unlimited`, and `check` changing nothing.

mod common;

use common::{TestServer, TRANSPORTS};
use serde_json::json;

const CONFIG: &str = r#"
[[limits]]
name = "provider-tokens"
metric = "tokens"
scope = "global"
algorithm = "fixed"
period = "1m"
max = 1000

[[plans]]
name = "free"
default = true
unmatched = "allow"
  [[plans.limits]]
  name = "per-minute"
  match = { event = "llm.*" }
  period = "1m"
  max = 5
  [[plans.limits]]
  name = "per-day"
  match = { event = "llm.*" }
  period = "1d"
  max = 3
  [[plans.limits]]
  name = "gpt4o-tokens"
  metric = "tokens"
  match = { event = "llm.*", attributes = { model = "gpt-4o*" } }
  period = "1h"
  max = 100
  [[plans.limits]]
  name = "per-model"
  metric = "tokens"
  scope = "attribute:model"
  match = { event = "llm.*" }
  period = "1h"
  max = 300
  [[plans.limits]]
  name = "watch-images"
  match = { event = "image.*" }
  period = "1h"
  max = 1
  mode = "monitor"
  [[plans.limits]]
  name = "soft-images"
  match = { event = "image.*" }
  period = "1h"
  max = 2
  mode = "degrade"
  [[plans.limits]]
  name = "hard-images"
  match = { event = "image.*" }
  period = "1h"
  max = 3
  [[plans.limits]]
  name = "unlimited-embeds"
  match = { event = "embed" }
  period = "1d"
  max = "unlimited"

[[plans]]
name = "strict"
unmatched = "deny"
  [[plans.limits]]
  name = "per-minute"
  match = { event = "llm.*" }
  period = "1m"
  max = 5
"#;

#[tokio::test]
async fn stacked_limits_the_tighter_one_denies_and_is_named() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        for _ in 0..3 {
            assert!(s.consume(json!({"subject": "u", "event": "llm.chat"})).await.allowed());
        }
        let r = s.consume(json!({"subject": "u", "event": "llm.chat"})).await;
        assert!(!r.allowed());
        assert_eq!(r.body["decision"], "deny");
        let reasons = r.body["reasons"].as_array().unwrap();
        assert_eq!(reasons.len(), 1, "only the day limit denied: {}", r.body);
        assert_eq!(reasons[0]["limit"], "per-day");
        assert_eq!(reasons[0]["code"], "limit_exceeded");
        // Headers come from the denying day limit, not the minute limit that passed.
        assert_eq!(r.header("x-ratelimit-limit").as_deref(), Some("3"));
        assert_eq!(r.header("x-ratelimit-remaining").as_deref(), Some("0"));
        let day_end = common::ms("2026-11-22T00:00:00Z");
        assert_eq!(r.header("x-ratelimit-reset").unwrap(), (day_end / 1000).to_string());
        assert_eq!(r.body["retry_after_ms"].as_u64().unwrap(), day_end - common::T0);
        // A denied call charges nothing, to any limit.
        assert_eq!(r.used("per-minute"), 3);
        assert_eq!(r.used("per-day"), 3);
        // When all pass, headers come from the one with the least remaining.
        let r = s.consume(json!({"subject": "w", "event": "llm.chat"})).await;
        assert_eq!(r.header("x-ratelimit-limit").as_deref(), Some("3"));
        assert_eq!(r.header("x-ratelimit-remaining").as_deref(), Some("2"));
        s.stop().await;
    }
}

#[tokio::test]
async fn attribute_match_and_attribute_scope() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        let call = |model: &str, tokens: u64| json!({"subject": "u", "event": "llm.chat", "attributes": {"model": model}, "amounts": {"tokens": tokens}});
        let r = s.consume(call("gpt-4o-mini", 80)).await;
        assert!(r.allowed());
        assert_eq!(r.used("gpt4o-tokens"), 80, "glob gpt-4o* matches gpt-4o-mini");
        assert_eq!(r.counter("per-model")["scope"], "model=gpt-4o-mini");
        let r = s.consume(call("claude", 90)).await;
        assert!(r.allowed());
        assert!(r.body["counters"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["limit"] != "gpt4o-tokens"));
        assert_eq!(r.used("per-model"), 90, "each model value has its own counter");
        let r = s.consume(call("gpt-4o", 30)).await;
        assert!(!r.allowed());
        assert_eq!(r.body["reasons"][0]["limit"], "gpt4o-tokens");
        // Attribute-scoped counters are shared by subjects.
        let r = s
            .consume(json!({"subject": "other", "event": "llm.chat", "attributes": {"model": "claude"}, "amounts": {"tokens": 10}}))
            .await;
        assert_eq!(r.used("per-model"), 100);
        // No model attribute: the attribute-scoped limit does not apply.
        let r = s
            .consume(json!({"subject": "x", "event": "llm.chat", "amounts": {"tokens": 1}}))
            .await;
        assert!(r.body["counters"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["limit"] != "per-model"));
        s.stop().await;
    }
}

#[tokio::test]
async fn global_limit_is_shared_by_all_subjects_and_plans() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        assert_eq!(s.put("/v1/subjects/s2", json!({"plan": "strict"})).await.status, 200);
        let r = s
            .consume(json!({"subject": "s1", "event": "embed", "amounts": {"tokens": 600}}))
            .await;
        assert_eq!(r.counter("provider-tokens")["scope"], "global");
        assert_eq!(r.used("provider-tokens"), 600);
        let r = s
            .consume(json!({"subject": "s2", "event": "llm.x", "amounts": {"tokens": 500}}))
            .await;
        assert!(!r.allowed());
        assert_eq!(r.body["reasons"][0]["limit"], "provider-tokens");
        let r = s
            .consume(json!({"subject": "s2", "event": "llm.x", "amounts": {"tokens": 400}}))
            .await;
        assert!(r.allowed());
        assert_eq!(r.used("provider-tokens"), 1000);
        let g = s.get("/v1/subjects/s3").await;
        assert_eq!(g.used("provider-tokens"), 1000);
        s.stop().await;
    }
}

#[tokio::test]
async fn monitor_degrade_and_enforce_modes() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        let img = json!({"subject": "u", "event": "image.render"});
        let r = s.consume(img.clone()).await;
        assert_eq!((r.allowed(), r.body["decision"].as_str()), (true, Some("allow")));
        // Second: the monitor limit (max 1) would deny; the call is allowed.
        let r = s.consume(img.clone()).await;
        assert_eq!((r.allowed(), r.body["decision"].as_str()), (true, Some("allow")));
        assert_eq!(
            r.body["reasons"],
            json!([{"limit": "watch-images", "code": "would_deny", "retry_after_ms": 3_600_000}])
        );
        assert_eq!(r.used("watch-images"), 2, "monitor limits still count");
        // Third: the degrade limit (max 2) is exhausted: allowed with decision degrade.
        let r = s.consume(img.clone()).await;
        assert_eq!((r.allowed(), r.body["decision"].as_str()), (true, Some("degrade")));
        let codes: Vec<_> = r.body["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["code"].as_str().unwrap())
            .collect();
        assert_eq!(codes, ["would_deny", "degraded"]);
        assert_eq!(r.used("soft-images"), 3, "used may exceed max in degrade mode");
        assert_eq!(r.counter("soft-images")["remaining"], 0, "remaining never below 0");
        assert!(r.header("retry-after").is_none());
        // Fourth: the enforced limit (max 3) denies, and wins over degrade.
        let r = s.consume(img.clone()).await;
        assert_eq!((r.allowed(), r.body["decision"].as_str()), (false, Some("deny")));
        let codes: Vec<_> = r.body["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["code"].as_str().unwrap())
            .collect();
        assert_eq!(codes, ["would_deny", "limit_exceeded"], "degraded is moot when denied");
        assert_eq!(
            r.header("x-ratelimit-limit").as_deref(),
            Some("3"),
            "headers from the enforced limit"
        );
        s.stop().await;
    }
}

#[tokio::test]
async fn unmatched_events_and_unlimited() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        // free: unmatched = allow; only the global limit applies.
        let r = s.consume(json!({"subject": "u", "event": "video.make"})).await;
        assert!(r.allowed());
        assert_eq!(r.body["counters"].as_array().unwrap().len(), 1);
        // strict: unmatched = deny.
        s.put("/v1/subjects/s", json!({"plan": "strict"})).await;
        let r = s.consume(json!({"subject": "s", "event": "video.make"})).await;
        assert!(!r.allowed());
        assert_eq!(r.body["reasons"], json!([{"code": "unmatched"}]));
        assert!(s.consume(json!({"subject": "s", "event": "llm.chat"})).await.allowed());
        // unlimited always allows and still counts.
        for _ in 0..5 {
            assert!(s.consume(json!({"subject": "u", "event": "embed"})).await.allowed());
        }
        let r = s.consume(json!({"subject": "u", "event": "embed"})).await;
        let c = r.counter("unlimited-embeds");
        assert_eq!((c["max"].as_str(), c["used"].as_u64()), (Some("unlimited"), Some(6)));
        assert!(c.get("remaining").is_none());
        s.stop().await;
    }
}

#[tokio::test]
async fn check_decides_without_charging() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        for _ in 0..5 {
            let r = s.post("/v1/check", json!({"subject": "u", "event": "llm.chat"})).await;
            assert!(r.allowed());
            assert_eq!(r.used("per-day"), 0);
        }
        for _ in 0..3 {
            s.consume(json!({"subject": "u", "event": "llm.chat"})).await;
        }
        let r = s.post("/v1/check", json!({"subject": "u", "event": "llm.chat"})).await;
        assert!(!r.allowed());
        assert_eq!(r.used("per-day"), 3);
        assert!(r.header("retry-after").is_some());
        s.stop().await;
    }
}
