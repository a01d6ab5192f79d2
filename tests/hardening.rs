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
