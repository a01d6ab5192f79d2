//! Usage history: what goes into the buckets (consumes, commits at their
//! reserve time; not releases, expiries, denials or replays), sums across a
//! restart, the billing export (JSON pages that cover every subject once,
//! CSV with the same totals), time zones, retention and bad queries.

mod common;

use std::collections::BTreeMap;

use common::{TestServer, Transport, T0, TRANSPORTS};
use quotad::clock::Clock;
use serde_json::{json, Value};

const HOUR: u64 = 3_600_000;
const DAY: u64 = 24 * HOUR;

const CONFIG: &str = r#"
metrics = ["tokens"]
[history]
hourly_retention = "2d"
[engine]
reservation_ttl_max = "1h"
[[plans]]
name = "p"
default = true
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 10000
"#;

fn totals(body: &Value) -> BTreeMap<String, u64> {
    let mut t = BTreeMap::new();
    for b in body["buckets"].as_array().unwrap() {
        for (m, a) in b["amounts"].as_object().unwrap() {
            *t.entry(m.clone()).or_default() += a.as_u64().unwrap();
        }
    }
    t
}

async fn usage(s: &TestServer, subject: &str, q: &str) -> Value {
    let r = s.get(&format!("/v1/subjects/{subject}/usage?{q}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

const TODAY: &str = "from=2026-11-21&to=2026-11-22";

#[tokio::test]
async fn charges_go_into_buckets_and_nothing_else_does() {
    for t in TRANSPORTS {
        let s = TestServer::start_at(CONFIG, t, common::ms("2026-11-21T10:40:00Z")).await;
        let r = s
            .consume(json!({"subject":"u","amounts":{"tokens":1200},"idempotency_key":"k1"}))
            .await;
        assert!(r.allowed());
        // A replay adds nothing; a denial adds nothing.
        assert!(s
            .consume(json!({"subject":"u","amounts":{"tokens":1200},"idempotency_key":"k1"}))
            .await
            .allowed());
        assert!(!s
            .consume(json!({"subject":"u","amounts":{"tokens":99999}}))
            .await
            .allowed());
        // A reservation made now and committed in the next hour counts now, at its actual amount.
        let r = s
            .post(
                "/v1/reserve",
                json!({"subject":"u","amounts":{"tokens":900},"ttl_ms":3600000}),
            )
            .await;
        let id = r.body["reservation_id"].as_str().unwrap().to_string();
        // Released and expired holds add nothing.
        let r = s
            .post("/v1/reserve", json!({"subject":"u","amounts":{"tokens":5000}}))
            .await;
        let released = r.body["reservation_id"].as_str().unwrap().to_string();
        assert_eq!(
            s.post(&format!("/v1/reservations/{released}/release"), json!({}))
                .await
                .status,
            200
        );
        s.post(
            "/v1/reserve",
            json!({"subject":"u","amounts":{"tokens":700},"ttl_ms":1000}),
        )
        .await;
        s.clock.advance(HOUR / 2); // 11:10
        s.state.core.get().unwrap().engine.expire_due(s.clock.now_ms());
        let r = s
            .post(
                &format!("/v1/reservations/{id}/commit"),
                json!({"amounts":{"tokens":300}}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);

        let hours = usage(&s, "u", &format!("{TODAY}&granularity=hour")).await;
        assert_eq!(hours["subject"], "u");
        assert_eq!(hours["granularity"], "hour");
        assert_eq!(hours["timezone"], "UTC");
        let b = hours["buckets"].as_array().unwrap();
        assert_eq!(b.len(), 1, "both charges are in the hour they were decided: {hours}");
        assert_eq!(b[0]["start"], "2026-11-21T10:00:00Z");
        assert_eq!(b[0]["amounts"], json!({"requests": 2, "tokens": 1500}));
        let days = usage(&s, "u", TODAY).await;
        assert_eq!(totals(&days), totals(&hours));
        assert_eq!(days["buckets"][0]["start"], "2026-11-21T00:00:00Z");
        // Other subjects are separate; one with nothing has no buckets.
        assert_eq!(usage(&s, "nobody", TODAY).await["buckets"], json!([]));
        s.stop().await;
    }
}

#[tokio::test]
async fn sums_survive_restarts_and_retention_drops_old_hours() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_durable(CONFIG, Transport::Tcp, T0, dir.path()).await;
    for i in 0..5 {
        assert!(s
            .consume(json!({"subject":"r","amounts":{"tokens":10 + i}}))
            .await
            .allowed());
    }
    s.stop().await; // a snapshot moves the buckets to disk
    let s = TestServer::start_durable(CONFIG, Transport::Tcp, T0 + HOUR, dir.path()).await;
    assert!(s
        .consume(json!({"subject":"r","amounts":{"tokens":100}}))
        .await
        .allowed());
    let t = totals(&usage(&s, "r", &format!("{TODAY}&granularity=hour")).await);
    assert_eq!(t, BTreeMap::from([("requests".into(), 6), ("tokens".into(), 160)]));
    // Three days on: hourly buckets (kept 2 days) are gone after the next
    // snapshot, daily ones stay.
    s.clock.advance(3 * DAY);
    s.stop().await;
    let s = TestServer::start_durable(CONFIG, Transport::Tcp, T0 + 3 * DAY + HOUR, dir.path()).await;
    s.stop().await;
    let s = TestServer::start_durable(CONFIG, Transport::Tcp, T0 + 3 * DAY + HOUR, dir.path()).await;
    let hours = usage(&s, "r", &format!("{TODAY}&granularity=hour")).await;
    assert_eq!(hours["buckets"], json!([]), "hourly buckets past retention are dropped");
    let t = totals(&usage(&s, "r", TODAY).await);
    assert_eq!(t, BTreeMap::from([("requests".into(), 6), ("tokens".into(), 160)]));
    s.stop().await;
}

#[tokio::test]
async fn time_zones_move_bucket_edges() {
    // 23:30 UTC on the 21st is the 22nd in Paris (UTC+1 in November).
    let s = TestServer::start_at(CONFIG, Transport::Tcp, common::ms("2026-11-21T23:30:00Z")).await;
    assert!(s.consume(json!({"subject":"z","amounts":{"tokens":5}})).await.allowed());
    let utc = usage(&s, "z", "from=2026-11-20&to=2026-11-24").await;
    assert_eq!(utc["buckets"][0]["start"], "2026-11-21T00:00:00Z");
    let paris = usage(&s, "z", "from=2026-11-20&to=2026-11-24&timezone=Europe/Paris").await;
    assert_eq!(paris["timezone"], "Europe/Paris");
    assert_eq!(paris["buckets"][0]["start"], "2026-11-21T23:00:00Z", "{paris}");
    let month = usage(&s, "z", "from=2026-11-01&to=2026-12-01&granularity=month").await;
    assert_eq!(month["buckets"][0]["start"], "2026-11-01T00:00:00Z");
    s.stop().await;
}

#[tokio::test]
async fn export_pages_cover_every_subject_once_and_csv_agrees() {
    let s = TestServer::start(CONFIG, Transport::Unix).await;
    for i in 0..7u64 {
        for _ in 0..=i {
            assert!(s
                .consume(json!({"subject":format!("e{i}"),"amounts":{"tokens":3}}))
                .await
                .allowed());
        }
    }
    let mut seen = Vec::new();
    let mut json_total: BTreeMap<String, u64> = BTreeMap::new();
    let mut after: Option<String> = None;
    for _ in 0..10 {
        let q = match &after {
            Some(a) => format!("/v1/usage?{TODAY}&limit=3&after={a}"),
            None => format!("/v1/usage?{TODAY}&limit=3"),
        };
        let r = s.get(&q).await;
        assert_eq!(r.status, 200, "{}", r.text);
        for row in r.body["rows"].as_array().unwrap() {
            let subject = row["subject"].as_str().unwrap().to_string();
            if seen.last() != Some(&subject) {
                seen.push(subject.clone());
            }
            for (m, a) in row["amounts"].as_object().unwrap() {
                *json_total.entry(format!("{subject}/{m}")).or_default() += a.as_u64().unwrap();
            }
        }
        match r.body["next_after"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    assert_eq!(
        seen,
        (0..7).map(|i| format!("e{i}")).collect::<Vec<_>>(),
        "each subject once, in order"
    );
    let csv = s.get(&format!("/v1/usage?{TODAY}&format=csv")).await;
    assert_eq!(csv.status, 200);
    assert!(csv.header("content-type").unwrap().starts_with("text/csv"));
    let mut lines = csv.text.lines();
    assert_eq!(lines.next(), Some("subject,start,metric,amount"));
    let mut csv_total: BTreeMap<String, u64> = BTreeMap::new();
    for l in lines {
        let f: Vec<&str> = l.split(',').collect();
        *csv_total.entry(format!("{}/{}", f[0], f[2])).or_default() += f[3].parse::<u64>().unwrap();
    }
    assert_eq!(csv_total, json_total);
    assert_eq!(json_total["e6/tokens"], 21);
    assert_eq!(json_total["e6/requests"], 7);
    // Client tokens may not export.
    s.stop().await;
}

#[tokio::test]
async fn bad_queries_name_the_field() {
    let s = TestServer::start(CONFIG, Transport::Tcp).await;
    for (path, field) in [
        ("/v1/subjects/u/usage?to=2026-11-22", "from"),
        ("/v1/subjects/u/usage?from=2026-11-21", "to"),
        ("/v1/subjects/u/usage?from=yesterday&to=2026-11-22", "from"),
        ("/v1/subjects/u/usage?from=2026-11-22&to=2026-11-21", "to"),
        (
            "/v1/subjects/u/usage?from=2026-11-21&to=2026-11-22&granularity=week",
            "granularity",
        ),
        (
            "/v1/subjects/u/usage?from=2026-11-21&to=2026-11-22&timezone=Mars/Olympus",
            "timezone",
        ),
        (
            "/v1/subjects/u/usage?from=2026-01-01&to=2026-03-01&granularity=hour",
            "to",
        ),
        (
            "/v1/subjects/u/usage?from=2026-11-21&to=2026-11-22&format=csv",
            "format",
        ),
        (
            "/v1/usage?from=2026-11-21&to=2026-11-22&granularity=hour",
            "granularity",
        ),
        ("/v1/usage?from=2026-11-21&to=2026-11-22&format=xml", "format"),
        ("/v1/usage?from=2026-11-21&to=2026-11-22&limit=0", "limit"),
        ("/v1/subjects/u/usage?from=2026-11-21T00:00:00&to=2026-11-22", "from"),
    ] {
        let r = s.get(path).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text);
        assert_eq!(r.error_code(), "invalid_request");
        let msg = r.body["error"]["message"].as_str().unwrap();
        assert!(msg.starts_with(field), "{path}: {msg}");
    }
    s.stop().await;
}

/// All pages of the JSON export of `q`: subjects in order, and whether any
/// page but the last was empty.
async fn export_subjects(s: &TestServer, q: &str, limit: usize) -> (Vec<String>, bool) {
    let mut seen: Vec<String> = Vec::new();
    let mut empty_before_end = false;
    let mut after: Option<String> = None;
    for _ in 0..50 {
        let path = match &after {
            Some(a) => format!("/v1/usage?{q}&limit={limit}&after={a}"),
            None => format!("/v1/usage?{q}&limit={limit}"),
        };
        let r = s.get(&path).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let rows = r.body["rows"].as_array().unwrap();
        for row in rows {
            let subject = row["subject"].as_str().unwrap().to_string();
            if seen.last() != Some(&subject) {
                seen.push(subject);
            }
        }
        match r.body["next_after"].as_str() {
            Some(n) => {
                empty_before_end |= rows.is_empty();
                after = Some(n.to_string());
            }
            None => break,
        }
    }
    (seen, empty_before_end)
}

#[tokio::test]
async fn export_pages_read_disk_and_memory_and_pass_over_subjects_without_usage() {
    let dir = tempfile::tempdir().unwrap();
    // Forty days ago: a subject with usage only then.
    let s = TestServer::start_durable(CONFIG, Transport::Tcp, T0 - 40 * DAY, dir.path()).await;
    assert!(s
        .consume(json!({"subject":"e3x","amounts":{"tokens":1}}))
        .await
        .allowed());
    s.stop().await;
    // Today: seven subjects, moved to disk by the stop's snapshot...
    let s = TestServer::start_durable(CONFIG, Transport::Tcp, T0, dir.path()).await;
    for i in 0..7 {
        assert!(s
            .consume(json!({"subject":format!("e{i}"),"amounts":{"tokens":2}}))
            .await
            .allowed());
    }
    s.stop().await;
    // ...and two more only in memory, one of them also on disk.
    let s = TestServer::start_durable(CONFIG, Transport::Tcp, T0 + 1, dir.path()).await;
    for subject in ["e9", "e2"] {
        assert!(s
            .consume(json!({"subject":subject,"amounts":{"tokens":5}}))
            .await
            .allowed());
    }
    let want: Vec<String> = ["e0", "e1", "e2", "e3", "e4", "e5", "e6", "e9"]
        .map(String::from)
        .to_vec();
    for limit in [1, 2, 3, 1000] {
        let (seen, empty) = export_subjects(&s, TODAY, limit).await;
        assert_eq!(
            seen, want,
            "limit {limit}: each subject with usage in the range once, in order"
        );
        assert!(!empty, "limit {limit}: no empty page before the last");
    }
    let r = s.get(&format!("/v1/usage?{TODAY}&limit=1000")).await;
    let e2: u64 = r.body["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["subject"] == "e2")
        .map(|r| r["amounts"]["tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(e2, 7, "disk and memory add up");
    s.stop().await;
}
