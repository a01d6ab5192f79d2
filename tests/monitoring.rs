//! The monitoring files in packaging/ speak of metrics `/metrics` really
//! exports: every `quotad_*` name in the Grafana dashboard, the Prometheus alert
//! rules and their unit tests is a series of a family the daemon registers (a
//! counter's `_total`, a histogram's `_bucket`/`_sum`/`_count`), and every
//! label they select on is one that family carries. Also: `quotad_ready` and
//! `quotad_snapshot_timestamp_seconds` say something true from the first
//! scrape. (.ci/promtool.sh checks the PromQL itself.)

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{TestServer, Transport};
use serde_json::json;

const CONFIG: &str = r#"
metrics = ["tokens"]
# Registers the gateway's families (the dashboard has a panel for them).
[gateway]
listen = ["127.0.0.1:0"]
grpc_listen = "127.0.0.1:0"
[[gateway.upstreams]]
name = "nowhere"
base_url = "http://127.0.0.1:9/v1"
models = ["*"]
[pricing]
currency = "USD"
[[pricing.prices]]
name = "llm"
match = { event = "llm.chat" }
tokens = "1.00/1M"
[[breakers]]
name = "surge"
metric = "requests"
match = { event = "llm.chat" }
window = "10m"
baseline = "24h"
ratio = 3.0
min_amount = 1000
cooldown = "15m"
[[anomalies]]
name = "spike"
metric = "requests"
period = "1d"
baseline_periods = 7
ratio = 10.0
min_amount = 500
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "per-day"
  period = "1d"
  max = 2
  [[plans.limits]]
  name = "watch"
  period = "1d"
  max = 1
  mode = "monitor"
"#;

fn repo_file(p: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(p)).unwrap()
}

/// Series name → the label names seen on it, from an exposition text, plus the
/// family names declared by `# TYPE` lines with the series each type gives.
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').unwrap();
            let series: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            for s in series {
                out.entry(format!("{family}{s}")).or_default();
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let name_end = line.find(['{', ' ']).unwrap();
            let labels = out.entry(line[..name_end].to_string()).or_default();
            if line[name_end..].starts_with('{') {
                let inner = &line[name_end + 1..line.find('}').unwrap()];
                for pair in inner.split(',').filter(|p| !p.is_empty()) {
                    labels.insert(pair.split_once('=').unwrap().0.to_string());
                }
            }
        }
    }
    out
}

/// Every `quotad_*` name in `text`, with the labels of a `{…}` selector right
/// after it (matchers `=`, `!=`, `=~`, `!~`).
fn used(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while let Some(off) = text[i..].find("quotad_") {
        let start = i + off;
        let mut end = start;
        while end < bytes.len() && ident(bytes[end]) {
            end += 1;
        }
        i = end;
        // Part of a longer word (e.g. a path or `my_quotad_x`): not a metric.
        if start > 0 && (ident(bytes[start - 1]) || bytes[start - 1] == b'/' || bytes[start - 1] == b'.') {
            continue;
        }
        let mut labels = Vec::new();
        if bytes.get(end) == Some(&b'{') {
            let close = text[end..].find('}').map(|c| end + c).unwrap();
            for m in text[end + 1..close].split(',') {
                let name: String = m
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    labels.push(name);
                }
            }
        }
        out.push((text[start..end].to_string(), labels));
    }
    out
}

#[tokio::test]
async fn every_metric_and_label_in_the_monitoring_files_is_exported() {
    // A webhook nobody receives: its pending count and failed attempts.
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hook.secret");
    std::fs::write(&secret, "monitoring-test-secret-0123").unwrap();
    let config = format!(
        "{CONFIG}\n[[webhooks]]\nname = \"hook\"\nurl = \"http://127.0.0.1:9/\"\nsecret_file = \"{}\"\n",
        secret.display()
    );
    let s = TestServer::start(&config, Transport::Tcp).await;
    // Traffic that gives every labelled family a series: allow, deny,
    // would_deny, a replay, a reservation, check, a priced call, an event
    // for the webhook.
    for _ in 0..3 {
        s.consume(json!({"subject": "u"})).await;
    }
    s.consume(json!({"subject": "v", "idempotency_key": "k"})).await;
    s.consume(json!({"subject": "v", "idempotency_key": "k"})).await;
    s.post("/v1/check", json!({"subject": "w"})).await;
    s.post("/v1/reserve", json!({"subject": "w"})).await;
    s.consume(json!({"subject": "x", "event": "llm.chat", "amounts": {"tokens": 1000}}))
        .await;
    s.post("/v1/breakers/surge/open", json!({})).await;
    // A gateway call without a subject: refused, and counted.
    let quotad::config::ListenAddr::Tcp(gw) = &s.gateway[0] else {
        panic!("the gateway listens on TCP")
    };
    let r = reqwest::Client::new()
        .post(format!("http://{gw}/v1/chat/completions"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let mut text = String::new();
    for _ in 0..200 {
        text = s.get("/metrics").await.text;
        if text.contains("quotad_webhook_attempts_total{") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let exported = exported(&text);
    assert!(exported.contains_key("quotad_decisions_total"), "{text}");

    let files = [
        "packaging/grafana-dashboard.json",
        "packaging/prometheus-rules.yml",
        "packaging/prometheus-rules.test.yml",
    ];
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for f in files {
        let body = repo_file(f);
        let names = used(&body);
        assert!(!names.is_empty(), "{f} names no quotad metric");
        for (name, labels) in names {
            seen.insert(name.clone());
            let Some(known) = exported.get(&name) else {
                problems.push(format!("{f}: {name} is not exported by /metrics"));
                continue;
            };
            for l in labels {
                // job and instance are Prometheus's target labels.
                if l != "job" && l != "instance" && l != "le" && !known.contains(&l) {
                    problems.push(format!("{f}: {name} has no label {l:?} (it has {known:?})"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}\n\n/metrics:\n{text}", problems.join("\n"));
    // The dashboard and rules cover the families an operator needs.
    for must in [
        "quotad_ready",
        "quotad_decisions_total",
        "quotad_limit_decisions_total",
        "quotad_http_request_duration_seconds_bucket",
        "quotad_http_responses_total",
        "quotad_wal_fsync_duration_seconds_bucket",
        "quotad_snapshot_timestamp_seconds",
        "quotad_snapshot_failures_total",
        "quotad_recovery_torn_tail_bytes",
        "quotad_spend_micros_total",
        "quotad_breaker_open",
        "quotad_anomaly_flags",
        "quotad_waiters",
        "quotad_webhook_pending_events",
        "quotad_gateway_calls_total",
    ] {
        assert!(seen.contains(must), "nothing watches {must}");
    }
    s.stop().await;
}

#[test]
fn the_checker_catches_a_wrong_name_and_a_wrong_label() {
    let text = "# TYPE quotad_decisions counter\nquotad_decisions_total{op=\"consume\",plan=\"free\"} 1\n";
    let e = exported(text);
    let u = used(r#"rate(quotad_decisions_total{job="q", colour="red"}[5m]) + quotad_decision_total"#);
    assert_eq!(
        u,
        vec![
            (
                "quotad_decisions_total".to_string(),
                vec!["job".to_string(), "colour".to_string()]
            ),
            ("quotad_decision_total".to_string(), vec![]),
        ]
    );
    assert!(!e["quotad_decisions_total"].contains("colour"));
    assert!(!e.contains_key("quotad_decision_total"));
    // Paths and file names are not metrics.
    assert!(used("/etc/prometheus/quotad_rules.yml and docs.quotad_x").is_empty());
}

#[tokio::test]
async fn readiness_and_snapshot_time_are_true_from_the_first_scrape() {
    let s = TestServer::start(CONFIG, Transport::Tcp).await;
    let text = s.get("/metrics").await.text;
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
    };
    assert_eq!(value("quotad_ready"), 1.0);
    // No snapshot yet: the start (the harness's clock), not 1970.
    assert_eq!(value("quotad_snapshot_timestamp_seconds"), common::T0 as f64 / 1000.0);
    assert_eq!(value("quotad_snapshot_failures_total"), 0.0);
    s.stop().await;
}
