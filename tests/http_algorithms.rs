//! Each algorithm at its window boundaries, with injected time, over TCP and the
//! Unix socket: calendar months, leap years, DST days in a non-UTC zone.

mod common;

use common::{ms, TestServer, Transport, TRANSPORTS};
use serde_json::json;

const CONFIG: &str = r#"
[[plans]]
name = "p"
default = true
  [[plans.limits]]
  name = "per-minute"
  match = { event = "fixed.minute" }
  period = "1m"
  max = 2
  [[plans.limits]]
  name = "per-day-ny"
  match = { event = "fixed.day" }
  period = "1d"
  timezone = "America/New_York"
  max = 1
  [[plans.limits]]
  name = "per-month"
  match = { event = "fixed.month" }
  period = "1mo"
  max = 1
  [[plans.limits]]
  name = "per-week"
  match = { event = "fixed.week" }
  period = "1w"
  max = 1
  [[plans.limits]]
  name = "sliding"
  match = { event = "sliding" }
  algorithm = "sliding"
  period = "1m"
  max = 3
  [[plans.limits]]
  name = "bucket"
  match = { event = "bucket" }
  algorithm = "token_bucket"
  max = 20
  refill = 10
  period = "1m"
  [[plans.limits]]
  name = "credits"
  match = { event = "lifetime" }
  algorithm = "lifetime"
  max = 2
"#;

async fn start(t: Transport, at: &str) -> TestServer {
    TestServer::start_at(CONFIG, t, ms(at)).await
}

async fn hit(s: &TestServer, event: &str) -> common::Resp {
    s.consume(json!({"subject": "u", "event": event})).await
}

#[tokio::test]
async fn fixed_minute_window_rolls_exactly_at_the_boundary() {
    for t in TRANSPORTS {
        let s = start(t, "2026-11-21T10:00:59.000Z").await;
        assert!(hit(&s, "fixed.minute").await.allowed());
        assert!(hit(&s, "fixed.minute").await.allowed());
        s.clock.set(ms("2026-11-21T10:00:59.999Z"));
        let r = hit(&s, "fixed.minute").await;
        assert!(!r.allowed(), "{t:?}");
        assert_eq!(r.body["retry_after_ms"], 1);
        assert_eq!(r.header("retry-after").as_deref(), Some("1"));
        assert_eq!(r.header("x-ratelimit-remaining").as_deref(), Some("0"));
        assert_eq!(
            r.header("x-ratelimit-reset").unwrap(),
            (ms("2026-11-21T10:01:00Z") / 1000).to_string()
        );
        assert_eq!(r.counter("per-minute")["resets_at"], "2026-11-21T10:01:00Z");
        s.clock.set(ms("2026-11-21T10:01:00Z"));
        let r = hit(&s, "fixed.minute").await;
        assert!(r.allowed());
        assert_eq!(r.used("per-minute"), 1);
        s.stop().await;
    }
}

#[tokio::test]
async fn day_windows_follow_new_york_midnight_across_dst() {
    for t in TRANSPORTS {
        // 23:59:59 EST on 2026-03-07; the next day is 23 hours long (spring forward).
        let s = start(t, "2026-03-08T04:59:59Z").await;
        let r = hit(&s, "fixed.day").await;
        assert!(r.allowed());
        assert_eq!(r.counter("per-day-ny")["resets_at"], "2026-03-08T05:00:00Z");
        let r = hit(&s, "fixed.day").await;
        assert_eq!((r.allowed(), r.body["retry_after_ms"].as_u64()), (false, Some(1000)));
        s.clock.set(ms("2026-03-08T05:00:00Z"));
        let r = hit(&s, "fixed.day").await;
        assert!(r.allowed());
        assert_eq!(
            r.counter("per-day-ny")["resets_at"],
            "2026-03-09T04:00:00Z",
            "a 23-hour day"
        );
        // Fall back: 2026-11-01 is 25 hours long, 04:00Z to 05:00Z next day.
        s.clock.set(ms("2026-11-01T04:30:00Z"));
        let r = hit(&s, "fixed.day").await;
        assert!(r.allowed());
        assert_eq!(
            r.counter("per-day-ny")["resets_at"],
            "2026-11-02T05:00:00Z",
            "a 25-hour day"
        );
        s.clock.set(ms("2026-11-02T04:59:59.999Z"));
        assert!(!hit(&s, "fixed.day").await.allowed(), "still the same 25-hour day");
        s.clock.set(ms("2026-11-02T05:00:00Z"));
        assert!(hit(&s, "fixed.day").await.allowed());
        s.stop().await;
    }
}

#[tokio::test]
async fn month_windows_end_on_the_last_day_including_leap_years() {
    for t in TRANSPORTS {
        let s = start(t, "2026-01-31T23:59:59.999Z").await;
        let r = hit(&s, "fixed.month").await;
        assert!(r.allowed());
        assert_eq!(r.counter("per-month")["resets_at"], "2026-02-01T00:00:00Z");
        assert!(!hit(&s, "fixed.month").await.allowed());
        s.clock.set(ms("2026-02-01T00:00:00Z"));
        let r = hit(&s, "fixed.month").await;
        assert!(r.allowed());
        assert_eq!(
            r.counter("per-month")["resets_at"],
            "2026-03-01T00:00:00Z",
            "28-day February"
        );
        // 2028 is a leap year: February has 29 days.
        s.clock.set(ms("2028-02-29T23:59:59.999Z"));
        let r = hit(&s, "fixed.month").await;
        assert!(r.allowed());
        assert_eq!(r.counter("per-month")["resets_at"], "2028-03-01T00:00:00Z");
        let r = hit(&s, "fixed.month").await;
        assert_eq!((r.allowed(), r.body["retry_after_ms"].as_u64()), (false, Some(1)));
        s.clock.set(ms("2028-03-01T00:00:00Z"));
        assert!(hit(&s, "fixed.month").await.allowed());
        // Weeks start on Monday.
        s.clock.set(ms("2028-03-05T23:59:59Z")); // a Sunday
        let r = hit(&s, "fixed.week").await;
        assert_eq!(r.counter("per-week")["resets_at"], "2028-03-06T00:00:00Z");
        s.stop().await;
    }
}

#[tokio::test]
async fn sliding_window_forgets_events_one_period_after_their_sub_window() {
    for t in TRANSPORTS {
        let s = start(t, "2026-11-21T10:00:00.500Z").await;
        for _ in 0..3 {
            assert!(hit(&s, "sliding").await.allowed());
        }
        let r = hit(&s, "sliding").await;
        assert!(!r.allowed());
        // The sub-window [10:00:00, 10:00:01) leaves the window at 10:01:01.
        assert_eq!(r.body["retry_after_ms"], 60_500);
        assert_eq!(r.header("retry-after").as_deref(), Some("61"));
        s.clock.set(ms("2026-11-21T10:01:00.999Z"));
        assert!(!hit(&s, "sliding").await.allowed(), "still inside the window");
        s.clock.set(ms("2026-11-21T10:01:01Z"));
        let r = hit(&s, "sliding").await;
        assert!(r.allowed());
        assert_eq!(r.used("sliding"), 1);
        s.stop().await;
    }
}

#[tokio::test]
async fn token_bucket_bursts_then_refills_continuously() {
    for t in TRANSPORTS {
        let s = start(t, "2026-11-21T10:00:00Z").await;
        for i in 0..20 {
            assert!(hit(&s, "bucket").await.allowed(), "burst request {i}");
        }
        let r = hit(&s, "bucket").await;
        assert!(!r.allowed());
        assert_eq!(r.body["retry_after_ms"], 6_000, "10 per minute is one every 6 s");
        s.clock.set(ms("2026-11-21T10:00:05.999Z"));
        assert!(!hit(&s, "bucket").await.allowed());
        s.clock.set(ms("2026-11-21T10:00:06Z"));
        assert!(hit(&s, "bucket").await.allowed());
        assert!(!hit(&s, "bucket").await.allowed());
        // An amount above the capacity can never succeed: no retry time at all.
        let r = s
            .consume(json!({"subject": "v", "event": "bucket", "amounts": {"requests": 21}}))
            .await;
        assert!(!r.allowed());
        assert_eq!(r.body["reasons"][0]["code"], "exceeds_capacity");
        assert!(r.body.get("retry_after_ms").is_none(), "{}", r.body);
        assert!(r.header("retry-after").is_none());
        // Two minutes later the bucket is full again.
        s.clock.set(ms("2026-11-21T10:02:06Z"));
        let r = hit(&s, "bucket").await;
        assert_eq!(r.used("bucket"), 1);
        s.stop().await;
    }
}

#[tokio::test]
async fn lifetime_never_resets() {
    for t in TRANSPORTS {
        let s = start(t, "2026-11-21T10:00:00Z").await;
        assert!(hit(&s, "lifetime").await.allowed());
        let r = hit(&s, "lifetime").await;
        assert!(r.allowed());
        assert!(r.counter("credits").get("resets_at").is_none());
        s.clock.set(ms("2031-01-01T00:00:00Z"));
        let r = hit(&s, "lifetime").await;
        assert!(!r.allowed());
        assert_eq!(r.body["reasons"][0]["code"], "limit_exceeded");
        assert!(r.body.get("retry_after_ms").is_none());
        assert!(r.header("retry-after").is_none());
        assert_eq!(r.header("x-ratelimit-remaining").as_deref(), Some("0"));
        s.stop().await;
    }
}
