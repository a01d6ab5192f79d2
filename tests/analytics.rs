//! Analytics computed by the server: the top users of a metric
//! (`/v1/usage/top`), the fullest counters (`/v1/counters`) and events newest
//! first (`/v1/events?order=desc`), each checked exactly against what the
//! test sent, across the snapshot file and memory, at 100,000 subjects with
//! over 20,000 events, and while snapshots move buckets; usage per model
//! (`history.dimensions`, `group_by`) adding up to the totals; and subject
//! tokens: their scope, their expiry and what they cannot do.

mod common;

use std::collections::BTreeMap;

use common::{TestServer, Transport, T0, TRANSPORTS};
use quotad::clock::Clock;
use serde_json::{json, Value};

const CONFIG: &str = r#"
metrics = ["tokens"]
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 1000
  alerts = [0.5]
  [[plans.limits]]
  name = "all-tokens"
  metric = "tokens"
  scope = "global"
  period = "1d"
  max = 100000000
[[plans]]
name = "watched"
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 1000
  mode = "monitor"
"#;

const TODAY: &str = "from=2026-11-21&to=2026-11-22";

async fn ok(s: &TestServer, path: &str) -> Value {
    let r = s.get(path).await;
    assert_eq!(r.status, 200, "GET {path}: {}", r.text);
    r.body
}

async fn bad(s: &TestServer, path: &str, field: &str) {
    let r = s.get(path).await;
    assert_eq!(r.status, 400, "GET {path}: {}", r.text);
    assert!(r.text.contains(field), "GET {path} names {field}: {}", r.text);
}

/// Runs `ops` (consumes) through `/v1/batch`, 1000 at a time; all must be allowed.
async fn load(s: &TestServer, ops: &[Value]) {
    let mut c = s.connect().await;
    for chunk in ops.chunks(1000) {
        let r = c.post("/v1/batch", &json!({ "operations": chunk })).await;
        assert_eq!(r.status, 200, "{}", r.text);
        for (i, res) in r.body["results"].as_array().unwrap().iter().enumerate() {
            assert_eq!(res["status"], 200, "op {i}: {res}");
            assert_eq!(res["body"]["allowed"], true, "op {i}: {res}");
        }
    }
}

fn consume(subject: &str, tokens: u64) -> Value {
    json!({"op": "consume", "subject": subject, "amounts": {"tokens": tokens}})
}

fn top_rows(body: &Value) -> Vec<(String, u64)> {
    body["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["subject"].as_str().unwrap().to_string(),
                r["amount"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Per subject, the sum of `metric` over every row of the JSON export.
async fn export_totals(s: &TestServer, range: &str, metric: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let cursor = after.as_ref().map_or(String::new(), |a| format!("&after={a}"));
        let page = ok(s, &format!("/v1/usage?{range}&limit=1000{cursor}")).await;
        for row in page["rows"].as_array().unwrap() {
            if let Some(a) = row["amounts"][metric].as_u64() {
                *out.entry(row["subject"].as_str().unwrap().to_string()).or_default() += a;
            }
        }
        match page["next_after"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => return out,
        }
    }
}

/// The expected top `n`: most first, then by name.
fn expected_top(totals: &BTreeMap<String, u64>, n: usize) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = totals
        .iter()
        .filter(|(_, a)| **a > 0)
        .map(|(s, a)| (s.clone(), *a))
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

fn seqs(body: &Value) -> Vec<u64> {
    body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect()
}

/// Every event, newest first, paged back `limit` at a time.
async fn newest_first(s: &TestServer, limit: usize, extra: &str) -> Vec<u64> {
    let mut out = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let cursor = before.map_or(String::new(), |b| format!("&before={b}"));
        let page = ok(s, &format!("/v1/events?order=desc&limit={limit}{extra}{cursor}")).await;
        out.extend(seqs(&page));
        match page["next_before"].as_u64() {
            Some(b) => before = Some(b),
            None => return out,
        }
    }
}

#[tokio::test]
async fn top_is_exact_across_the_snapshot_file_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let at = common::ms("2026-11-21T10:30:00Z");
    // Stored: twenty subjects with 10..=200 tokens, then a restart moves them to disk.
    let s = TestServer::start_durable(CONFIG, Transport::Tcp, at, dir.path()).await;
    let ops: Vec<Value> = (1..=20).map(|i| consume(&format!("u{i:02}"), i * 10)).collect();
    load(&s, &ops).await;
    let now = s.clock.now_ms();
    s.stop().await;
    for t in TRANSPORTS {
        let s = TestServer::start_durable(CONFIG, t, now, dir.path()).await;
        if t == Transport::Tcp {
            // In memory only: u03 climbs past everyone, u05 ties u20, a newcomer.
            load(&s, &[consume("u03", 400), consume("u05", 150), consume("new", 170)]).await;
        }
        let totals = export_totals(&s, TODAY, "tokens").await;
        assert_eq!(totals["u03"], 430);
        for n in [1, 3, 5, 1000] {
            let top = ok(&s, &format!("/v1/usage/top?metric=tokens&{TODAY}&limit={n}")).await;
            assert_eq!(top["metric"], "tokens");
            assert_eq!(top_rows(&top), expected_top(&totals, n), "limit {n}");
        }
        let top = top_rows(&ok(&s, &format!("/v1/usage/top?metric=tokens&{TODAY}&limit=4")).await);
        assert_eq!(
            top,
            [("u03", 430), ("u05", 200), ("u20", 200), ("u19", 190)].map(|(s, a)| (s.to_string(), a))
        );
        // requests: everyone 1, u03 and u05 2: ties go by name.
        let top = top_rows(&ok(&s, &format!("/v1/usage/top?metric=requests&{TODAY}&limit=3")).await);
        assert_eq!(
            top,
            [("u03", 2), ("u05", 2), ("new", 1)].map(|(s, a)| (s.to_string(), a))
        );
        // Another day, another metric: nothing.
        let none = ok(&s, "/v1/usage/top?metric=tokens&from=2026-11-20&to=2026-11-21").await;
        assert_eq!(top_rows(&none), []);
        assert_eq!(
            top_rows(&ok(&s, &format!("/v1/usage/top?metric=images&{TODAY}")).await),
            []
        );
        // Hour ranges read hourly buckets: the 10:00 hour has everything.
        let hour = "from=2026-11-21T10:00:00Z&to=2026-11-21T11:00:00Z";
        assert_eq!(
            top_rows(&ok(&s, &format!("/v1/usage/top?metric=tokens&{hour}&limit=1000")).await),
            expected_top(&totals, 1000)
        );
        if t == Transport::Unix {
            // A repeated top list reuses the file's ranking (kept until the
            // next snapshot) and still sees what memory adds since: u01,
            // last in the file, overtakes everyone.
            let again = format!("/v1/usage/top?metric=tokens&{TODAY}&limit=3");
            let before = top_rows(&ok(&s, &again).await);
            assert!(before.iter().all(|(s, _)| s != "u01"), "{before:?}");
            load(&s, &[consume("u01", 500)]).await;
            let totals = export_totals(&s, TODAY, "tokens").await;
            let after = top_rows(&ok(&s, &again).await);
            assert_eq!(after, expected_top(&totals, 3));
            assert_eq!(after[0], ("u01".to_string(), 510));
        }
        bad(&s, &format!("/v1/usage/top?{TODAY}"), "metric").await;
        bad(&s, &format!("/v1/usage/top?metric=tokens&{TODAY}&limit=0"), "limit").await;
        bad(&s, &format!("/v1/usage/top?metric=tokens&{TODAY}&limit=1001"), "limit").await;
        bad(&s, "/v1/usage/top?metric=tokens&from=2026-11-21", "to").await;
        bad(
            &s,
            &format!("/v1/usage/top?metric=tokens&{TODAY}&granularity=day"),
            "granularity",
        )
        .await;
        s.stop().await;
    }
}

#[tokio::test]
async fn fullest_counters_come_first_with_overrides_and_monitor_mode() {
    for t in TRANSPORTS {
        let s = TestServer::start_at(CONFIG, t, common::ms("2026-11-21T10:30:00Z")).await;
        // A subject whose override makes 500 tokens 100% full.
        let r = s
            .put(
                "/v1/subjects/big",
                json!({"overrides": {"tokens-per-day": {"max": 500}}}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let r = s.put("/v1/subjects/mon", json!({"plan": "watched"})).await;
        assert_eq!(r.status, 200, "{}", r.text);
        load(
            &s,
            &[
                consume("half", 500),
                consume("eighty", 800),
                consume("ninety5", 950),
                consume("big", 500),
                consume("mon", 700),
                consume("mon", 700), // monitor mode: allowed past max, 140%
                consume("low", 10),
            ],
        )
        .await;
        let body = ok(&s, "/v1/counters?min_fraction=0.8").await;
        let got: Vec<(String, String, f64)> = body["counters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["scope"].as_str().unwrap().to_string(),
                    c["limit"].as_str().unwrap().to_string(),
                    c["fraction"].as_f64().unwrap(),
                )
            })
            .collect();
        let want = [("mon", 1.4), ("big", 1.0), ("ninety5", 0.95), ("eighty", 0.8)]
            .map(|(s, f)| (s.to_string(), "tokens-per-day".to_string(), f));
        assert_eq!(got, want);
        let first = &body["counters"][0];
        assert_eq!(first["used"], 1400);
        assert_eq!(first["max"], 1000);
        assert_eq!(first["metric"], "tokens");
        assert_eq!(first["mode"], "monitor");
        // The global counter is 4,160 of 100,000,000: listed only at a tiny fraction.
        let body = ok(&s, "/v1/counters?min_fraction=0.00001").await;
        let scopes: Vec<&str> = body["counters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["scope"].as_str().unwrap())
            .collect();
        assert_eq!(scopes, ["mon", "big", "ninety5", "eighty", "half", "low", "global"]);
        let body = ok(&s, "/v1/counters?min_fraction=0.5&limit=2").await;
        assert_eq!(body["counters"].as_array().unwrap().len(), 2);
        assert_eq!(body["counters"][1]["scope"], "big");
        // Nothing at 2x.
        assert_eq!(ok(&s, "/v1/counters?min_fraction=2").await["counters"], json!([]));
        // Tomorrow the daily windows are empty.
        s.clock.advance(86_400_000);
        assert_eq!(ok(&s, "/v1/counters?min_fraction=0.5").await["counters"], json!([]));
        for q in [
            "min_fraction=0",
            "min_fraction=-1",
            "min_fraction=abc",
            "min_fraction=inf",
        ] {
            bad(&s, &format!("/v1/counters?{q}"), "min_fraction").await;
        }
        bad(&s, "/v1/counters?limit=0", "limit").await;
        bad(&s, "/v1/counters?fraction=0.5", "fraction").await;
        s.stop().await;
    }
}

#[tokio::test]
async fn events_page_back_newest_first_through_memory_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut now = T0;
    // Thirty events go to the snapshot file, twenty stay in memory.
    for (round, n) in [(0, 30), (1, 20)] {
        let s = TestServer::start_durable(CONFIG, Transport::Tcp, now, dir.path()).await;
        let ops: Vec<Value> = (0..n).map(|i| consume(&format!("r{round}-{i}"), 600)).collect();
        load(&s, &ops).await;
        now = s.clock.now_ms();
        if round == 0 {
            s.stop().await;
            continue;
        }
        let all: Vec<u64> = (1..=50).rev().collect();
        for limit in [1, 7, 20, 50, 1000] {
            assert_eq!(newest_first(&s, limit, "").await, all, "limit {limit}");
        }
        let page = ok(&s, "/v1/events?order=desc&limit=3").await;
        assert_eq!(seqs(&page), [50, 49, 48]);
        assert_eq!(page["next_before"], 48);
        assert_eq!(page["next_after"], 50);
        assert_eq!(page["events"][0]["subject"], "r1-19");
        let page = ok(&s, "/v1/events?order=desc&before=32&limit=5").await;
        assert_eq!(seqs(&page), [31, 30, 29, 28, 27]);
        let page = ok(&s, "/v1/events?order=desc&before=3").await;
        assert_eq!(seqs(&page), [2, 1]);
        assert_eq!(page["next_before"], Value::Null);
        assert_eq!(seqs(&ok(&s, "/v1/events?order=desc&before=1").await), Vec::<u64>::new());
        // A type filter that matches nothing scans to the end.
        let page = ok(&s, "/v1/events?order=desc&type=breaker.*").await;
        assert_eq!(seqs(&page), Vec::<u64>::new());
        assert_eq!(page["next_before"], Value::Null);
        assert_eq!(newest_first(&s, 9, "&type=threshold.*").await, all);
        // Oldest first is unchanged and has no next_before.
        let page = ok(&s, "/v1/events?limit=2").await;
        assert_eq!(seqs(&page), [1, 2]);
        assert!(page.get("next_before").is_none());
        bad(&s, "/v1/events?before=5", "before").await;
        bad(&s, "/v1/events?order=desc&after=5", "after").await;
        bad(&s, "/v1/events?order=newest", "order").await;
        s.stop().await;
    }
}

/// 100,000 subjects and 50,000 events: the top, the fullest counters and the
/// newest events are exactly what was sent, from memory and then from the
/// snapshot file after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_100000_subjects_top_counters_and_newest_events_are_exact() {
    const SUBJECTS: u64 = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let at = common::ms("2026-11-21T10:30:00Z");
    // Tokens spread over 1..=990, and three whales with more, named to sort last.
    let tokens = |i: u64| (i * 7919) % 990 + 1;
    let mut sent: BTreeMap<String, u64> = (0..SUBJECTS).map(|i| (format!("user:{i:06}"), tokens(i))).collect();
    for (w, n) in [("zz:whale-a", 997), ("zz:whale-b", 998), ("zz:whale-c", 1000)] {
        sent.insert(w.to_string(), n);
    }
    let ops: Vec<Value> = sent.iter().map(|(s, n)| consume(s, *n)).collect();
    // Events: one per subject crossing half of 1000, in the order sent.
    let crossing: Vec<&String> = sent.iter().filter(|(_, n)| **n >= 500).map(|(s, _)| s).collect();
    assert!(crossing.len() > 20_000);

    let s = TestServer::start_durable(CONFIG, Transport::Tcp, at, dir.path()).await;
    load(&s, &ops).await;
    let now = s.clock.now_ms();
    check_scale(&s, &sent, &crossing).await;
    s.stop().await;
    // From the snapshot file.
    let s = TestServer::start_durable(CONFIG, Transport::Unix, now, dir.path()).await;
    check_scale(&s, &sent, &crossing).await;
    s.stop().await;
}

async fn check_scale(s: &TestServer, sent: &BTreeMap<String, u64>, crossing: &[&String]) {
    let top = ok(s, &format!("/v1/usage/top?metric=tokens&{TODAY}&limit=25")).await;
    let want = expected_top(sent, 25);
    assert_eq!(want[0], ("zz:whale-c".to_string(), 1000));
    assert_eq!(top_rows(&top), want);

    let full = ok(s, "/v1/counters?min_fraction=0.988&limit=1000").await;
    let got: Vec<(String, u64)> = full["counters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["scope"].as_str().unwrap().to_string(), c["used"].as_u64().unwrap()))
        .collect();
    let mut want: Vec<(String, u64)> = sent
        .iter()
        .filter(|(_, n)| **n >= 988)
        .map(|(s, n)| (s.clone(), *n))
        .collect();
    want.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    assert_eq!(got, want);

    let newest = ok(s, "/v1/events?order=desc&limit=5").await;
    let n = crossing.len() as u64;
    assert_eq!(seqs(&newest), (n - 4..=n).rev().collect::<Vec<_>>());
    let subjects: Vec<&str> = newest["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["subject"].as_str().unwrap())
        .collect();
    let last5: Vec<&str> = crossing.iter().rev().take(5).map(|s| s.as_str()).collect();
    assert_eq!(subjects, last5);
}

const AUTH: &str = r#"
metrics = ["tokens"]
[[auth.tokens]]
name = "web-app"
role = "client"
token = "client-token-0123456789"
[[auth.tokens]]
name = "ops"
role = "admin"
token = "admin-token-0123456789"
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 1000
"#;

const ADMIN: (&str, &str) = ("authorization", "Bearer admin-token-0123456789");
const CLIENT: (&str, &str) = ("authorization", "Bearer client-token-0123456789");

async fn mint(s: &TestServer, subject: &str, body: &str, auth: (&str, &str)) -> common::Resp {
    s.req("POST", &format!("/v1/subjects/{subject}/tokens"), Some(body), &[auth])
        .await
}

#[tokio::test]
async fn a_subject_token_reads_its_subject_alone_until_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let mut now = common::ms("2026-11-21T10:30:00Z");
    let mut kept = String::new();
    for t in TRANSPORTS {
        let s = TestServer::start_durable(AUTH, t, now, dir.path()).await;
        let r = s
            .req(
                "POST",
                "/v1/consume",
                Some(r#"{"subject":"user:42","amounts":{"tokens":300}}"#),
                &[CLIENT],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);

        let r = mint(&s, "user:42", r#"{"ttl":"1h"}"#, ADMIN).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["subject"], "user:42");
        assert_eq!(
            common::ms(r.body["expires_at"].as_str().unwrap()),
            s.clock.now_ms() + 3_600_000
        );
        let token = r.body["token"].as_str().unwrap().to_string();
        assert!(token.starts_with("qst_"), "{token}");
        let mine = ("authorization", format!("Bearer {token}"));
        let mine = (mine.0, mine.1.as_str());

        // What it may do: its subject and its usage.
        let r = s.req("GET", "/v1/subjects/user:42", None, &[mine]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            r.body["counters"][0]["used"].as_u64(),
            Some(if t == Transport::Tcp { 300 } else { 600 })
        );
        let r = s
            .req("GET", &format!("/v1/subjects/user:42/usage?{TODAY}"), None, &[mine])
            .await;
        assert_eq!(r.status, 200, "{}", r.text);

        // Nothing else: another subject, decisions, writes, admin reads, minting.
        let other = s.req("GET", "/v1/subjects/user:43", None, &[mine]).await;
        assert_eq!(other.status, 403, "{}", other.text);
        let msg = other.body["error"]["message"].as_str().unwrap();
        assert!(msg.contains("\"user:42\"") && msg.contains("\"user:43\""), "{msg}");
        for (method, path, body) in [
            ("POST", "/v1/consume", Some(r#"{"subject":"user:42"}"#)),
            ("POST", "/v1/check", Some(r#"{"subject":"user:42"}"#)),
            ("POST", "/v1/reserve", Some(r#"{"subject":"user:42"}"#)),
            ("POST", "/v1/batch", Some(r#"{"operations":[]}"#)),
            ("GET", "/v1/authorize", None),
            ("PUT", "/v1/subjects/user:42", Some(r#"{"plan":"free"}"#)),
            ("DELETE", "/v1/subjects/user:42", None),
            ("POST", "/v1/subjects/user:42/reset", Some("{}")),
            (
                "POST",
                "/v1/subjects/user:42/credit",
                Some(r#"{"limit":"tokens-per-day","amount":1}"#),
            ),
            ("POST", "/v1/subjects/user:42/tokens", Some("{}")),
            ("GET", "/v1/subjects", None),
            ("GET", "/v1/plans", None),
            ("GET", "/v1/events", None),
            ("GET", &format!("/v1/usage?{TODAY}"), None),
            ("GET", &format!("/v1/usage/top?metric=tokens&{TODAY}"), None),
            ("GET", "/v1/counters", None),
            ("GET", "/metrics", None),
            ("GET", "/v1/openapi.json", None),
            ("GET", "/v1/admin/digest", None),
        ] {
            let r = s.req(method, path, body, &[mine]).await;
            assert_eq!(r.status, 403, "{method} {path}: {}", r.text);
            assert!(
                r.text.contains("read-only token for subject"),
                "{method} {path}: {}",
                r.text
            );
        }
        // Still only 300 (then 600) charged: nothing above went through.
        let r = s.req("GET", "/v1/subjects/user:42", None, &[ADMIN]).await;
        assert_eq!(
            r.body["counters"][0]["used"].as_u64(),
            Some(if t == Transport::Tcp { 300 } else { 600 })
        );

        // Only an admin mints, for 1m to 30d.
        let r = mint(&s, "user:42", "{}", CLIENT).await;
        assert_eq!(r.status, 403, "{}", r.text);
        for ttl in [r#""30s""#, r#""31d""#, r#""1mo""#, r#""soon""#, "5"] {
            let r = mint(&s, "user:42", &format!(r#"{{"ttl":{ttl}}}"#), ADMIN).await;
            assert_eq!(r.status, 400, "{ttl}: {}", r.text);
            assert!(r.text.contains("ttl"), "{ttl}: {}", r.text);
        }
        let r = mint(&s, "user:42", r#"{"ttl":"1h","scope":"all"}"#, ADMIN).await;
        assert_eq!(r.status, 400, "{}", r.text);
        // The default is an hour.
        let r = mint(&s, "user:42", "", ADMIN).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            common::ms(r.body["expires_at"].as_str().unwrap()),
            s.clock.now_ms() + 3_600_000
        );

        // A changed token is not valid.
        let (head, _) = token.rsplit_once('.').unwrap();
        let forged = format!("{head}.{}", "0".repeat(64));
        let r = read_with(&s, "/v1/subjects/user:42", &forged).await;
        assert_eq!(r.status, 401, "{}", r.text);
        let retargeted = token.replacen(&hex_of("user:42"), &hex_of("user:43"), 1);
        let r = read_with(&s, "/v1/subjects/user:43", &retargeted).await;
        assert_eq!(r.status, 401, "{}", r.text);

        if t == Transport::Tcp {
            // Kept for after the restart: the key is in the data directory.
            kept = token.clone();
            // A two-minute token, two minutes later.
            let short = mint(&s, "user:42", r#"{"ttl":"2m"}"#, ADMIN).await.body["token"]
                .as_str()
                .unwrap()
                .to_string();
            s.clock.advance(120_000);
            let r = read_with(&s, "/v1/subjects/user:42", &short).await;
            assert_eq!(r.status, 401, "{}", r.text);
            assert!(r.text.contains("expired"), "{}", r.text);
        } else {
            // The first round's token still holds after a restart, until its hour is up.
            let old = format!("Bearer {kept}");
            let r = s
                .req("GET", "/v1/subjects/user:42", None, &[("authorization", &old)])
                .await;
            assert_eq!(r.status, 200, "{}", r.text);
            s.clock.advance(3_600_000);
            let r = s
                .req("GET", "/v1/subjects/user:42", None, &[("authorization", &old)])
                .await;
            assert_eq!(r.status, 401, "{}", r.text);
        }
        now = s.clock.now_ms();
        s.stop().await;
    }
}

/// A GET with `token` as the bearer token.
async fn read_with(s: &TestServer, path: &str, token: &str) -> common::Resp {
    s.req("GET", path, None, &[("authorization", &format!("Bearer {token}"))])
        .await
}

fn hex_of(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

const DIMENSIONS: &str = r#"
metrics = ["tokens"]
[history]
dimensions = ["model"]
[engine]
reservation_ttl_max = "1h"
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 1000000
"#;

fn call(subject: &str, model: Option<&str>, tokens: u64) -> Value {
    match model {
        Some(m) => {
            json!({"op": "consume", "subject": subject, "attributes": {"model": m}, "amounts": {"tokens": tokens}})
        }
        None => json!({"op": "consume", "subject": subject, "amounts": {"tokens": tokens}}),
    }
}

/// (model or null) → metric → sum over every bucket of a grouped answer.
fn by_model(buckets: &[Value]) -> BTreeMap<Option<String>, BTreeMap<String, u64>> {
    let mut out: BTreeMap<Option<String>, BTreeMap<String, u64>> = BTreeMap::new();
    for b in buckets {
        let model = b["model"].as_str().map(str::to_string);
        assert!(b.get("model").is_some(), "a grouped bucket names its model: {b}");
        for (m, a) in b["amounts"].as_object().unwrap() {
            *out.entry(model.clone()).or_default().entry(m.clone()).or_default() += a.as_u64().unwrap();
        }
    }
    out
}

fn plain_totals(buckets: &[Value]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for b in buckets {
        assert!(b.get("model").is_none(), "{b}");
        for (m, a) in b["amounts"].as_object().unwrap() {
            *out.entry(m.clone()).or_default() += a.as_u64().unwrap();
        }
    }
    out
}

#[tokio::test]
async fn usage_per_model_adds_up_to_the_totals() {
    let dir = tempfile::tempdir().unwrap();
    let mut now = common::ms("2026-11-21T10:30:00Z");
    for round in 0..2 {
        let s = TestServer::start_durable(DIMENSIONS, Transport::Tcp, now, dir.path()).await;
        load(
            &s,
            &[
                call("u", Some("gpt-4o"), 100),
                call("u", Some("gpt-4o-mini"), 10),
                call("u", None, 1),
                call("v", Some("gpt-4o"), 7),
            ],
        )
        .await;
        // A reservation made for gpt-4o and committed with other amounts.
        let r = s
            .post(
                "/v1/reserve",
                json!({"subject": "u", "attributes": {"model": "gpt-4o"}, "amounts": {"tokens": 500}, "ttl_ms": 60000}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let id = r.body["reservation_id"].as_str().unwrap().to_string();
        let r = s
            .post(
                &format!("/v1/reservations/{id}/commit"),
                json!({"amounts": {"tokens": 300}}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        // The reservation's answer shows only what was asked for.
        assert_eq!(r.body["held"], json!({"requests": 1, "tokens": 500}), "{}", r.text);
        now = s.clock.now_ms();
        if round == 0 {
            s.stop().await; // the first round's buckets go to the snapshot file
            continue;
        }
        for granularity in ["hour", "day", "month"] {
            let q = format!("{TODAY}&granularity={granularity}");
            let plain = ok(&s, &format!("/v1/subjects/u/usage?{q}")).await;
            let totals = plain_totals(plain["buckets"].as_array().unwrap());
            assert_eq!(
                totals,
                [("requests".to_string(), 8), ("tokens".to_string(), 822)].into()
            );
            let grouped = ok(&s, &format!("/v1/subjects/u/usage?{q}&group_by=model")).await;
            assert_eq!(grouped["group_by"], "model");
            let groups = by_model(grouped["buckets"].as_array().unwrap());
            let want: BTreeMap<Option<String>, BTreeMap<String, u64>> =
                [(Some("gpt-4o"), 4, 800), (Some("gpt-4o-mini"), 2, 20), (None, 2, 2)]
                    .into_iter()
                    .map(|(m, r, t)| {
                        (
                            m.map(str::to_string),
                            [("requests".to_string(), r), ("tokens".to_string(), t)].into(),
                        )
                    })
                    .collect();
            assert_eq!(groups, want, "{granularity}");
            // Per bucket too: the groups add up to the bucket's totals.
            for b in plain["buckets"].as_array().unwrap() {
                let mut sum: BTreeMap<String, u64> = BTreeMap::new();
                for g in grouped["buckets"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|g| g["start"] == b["start"])
                {
                    for (m, a) in g["amounts"].as_object().unwrap() {
                        *sum.entry(m.clone()).or_default() += a.as_u64().unwrap();
                    }
                }
                let want: BTreeMap<String, u64> = serde_json::from_value(b["amounts"].clone()).unwrap();
                assert_eq!(sum, want, "bucket {}", b["start"]);
            }
        }
        // The export: a model field per row, and the same sums.
        let page = ok(&s, &format!("/v1/usage?{TODAY}&group_by=model")).await;
        let rows = page["rows"].as_array().unwrap();
        let v_rows: Vec<&Value> = rows.iter().filter(|r| r["subject"] == "v").collect();
        assert_eq!(v_rows.len(), 1);
        assert_eq!(v_rows[0]["model"], "gpt-4o");
        assert_eq!(v_rows[0]["amounts"], json!({"requests": 2, "tokens": 14}));
        let plain = ok(&s, &format!("/v1/usage?{TODAY}")).await;
        assert!(plain["rows"][0].get("model").is_none());
        let csv = s.get(&format!("/v1/usage?{TODAY}&group_by=model&format=csv")).await;
        assert_eq!(csv.status, 200, "{}", csv.text);
        let lines: Vec<&str> = csv.text.lines().collect();
        assert_eq!(lines[0], "subject,start,model,metric,amount");
        assert!(lines.contains(&"u,2026-11-21T00:00:00Z,gpt-4o,tokens,800"), "{lines:?}");
        assert!(lines.contains(&"u,2026-11-21T00:00:00Z,,tokens,2"), "{lines:?}");
        let plain_csv = s.get(&format!("/v1/usage?{TODAY}&format=csv")).await;
        assert!(
            plain_csv
                .text
                .lines()
                .all(|l| l.split(',').count() == 4 && !l.contains('\u{1f}')),
            "{}",
            plain_csv.text
        );
        // Only configured dimensions.
        bad(
            &s,
            &format!("/v1/subjects/u/usage?{TODAY}&group_by=region"),
            "history.dimensions",
        )
        .await;
        bad(&s, &format!("/v1/usage?{TODAY}&group_by=region"), "group_by").await;
        s.stop().await;
    }
    // Without dimensions, group_by says what to configure.
    let s = TestServer::start(CONFIG, Transport::Tcp).await;
    let r = s.get(&format!("/v1/subjects/u/usage?{TODAY}&group_by=model")).await;
    assert_eq!(r.status, 400);
    assert!(r.text.contains("history.dimensions is empty"), "{}", r.text);
    s.stop().await;
}

#[test]
fn dimensions_are_checked_in_the_config() {
    for (dims, says) in [
        (r#"["model", "model"]"#, "listed twice"),
        (r#"["a", "b", "c", "d", "e"]"#, "at most 4"),
        (r#"["has space"]"#, "not an attribute name"),
        (r#"[""]"#, "not an attribute name"),
    ] {
        let text = DIMENSIONS.replace(r#"dimensions = ["model"]"#, &format!("dimensions = {dims}"));
        let config = quotad::config::Config::from_toml(&text, "q.toml").unwrap();
        let e = quotad::engine::policy::Policy::from_config(&config)
            .unwrap_err()
            .to_string();
        assert!(e.contains("history.dimensions") && e.contains(says), "{dims}: {e}");
    }
}

/// Snapshots move buckets from memory to the file while usage is read: a
/// read sees each charge once, never zero times or twice. A writer charges
/// one token at a time; every read must see at least what was acknowledged
/// before it was sent and at most what was sent before it was answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reads_stay_exact_while_snapshots_move_buckets() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let config = format!("{DIMENSIONS}\n[storage]\nsnapshot_every_records = 1000\n");
    let s = Arc::new(TestServer::start_at(&config, Transport::Tcp, common::ms("2026-11-21T10:30:00Z")).await);
    let (sent, acked, done) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let writer = {
        let (s, sent, acked, done) = (s.clone(), sent.clone(), acked.clone(), done.clone());
        tokio::spawn(async move {
            let mut c = s.connect().await;
            // Until four snapshots ran during the reads (at most 20,000 calls).
            for i in 0..20_000 {
                if i % 500 == 0 && snapshots(&s).await >= 4.0 {
                    break;
                }
                sent.fetch_add(1, Ordering::SeqCst);
                let r = c
                    .post("/v1/consume", &json!({"subject": "w", "amounts": {"tokens": 1}}))
                    .await;
                assert!(r.allowed(), "{}", r.text);
                acked.fetch_add(1, Ordering::SeqCst);
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut c = s.connect().await;
    let (mut reads, mut checked) = (0u64, 0u64);
    // Bounded: the writer ends (or fails, which ends this too).
    while !done.load(Ordering::SeqCst) && !writer.is_finished() {
        let low = acked.load(Ordering::SeqCst);
        let (path, subject_usage) = if reads % 2 == 0 {
            (format!("/v1/subjects/w/usage?{TODAY}"), true)
        } else {
            (format!("/v1/usage/top?metric=tokens&{TODAY}&limit=1"), false)
        };
        let r = c.req("GET", &path, None, &[]).await;
        let high = sent.load(Ordering::SeqCst);
        assert_eq!(r.status, 200, "{}", r.text);
        let seen = if subject_usage {
            r.body["buckets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["amounts"]["tokens"].as_u64().unwrap())
                .sum()
        } else {
            r.body["rows"][0]["amount"].as_u64().unwrap_or(0)
        };
        assert!(
            low <= seen && seen <= high,
            "{path}: saw {seen} tokens with {low} acknowledged and {high} sent"
        );
        reads += 1;
        checked += u64::from(low > 0);
    }
    writer.await.unwrap();
    assert!(checked > 100, "only {checked} reads overlapped the writes");
    let n = snapshots(&s).await;
    assert!(n >= 4.0, "snapshots ran while reading: {n}");
    Arc::try_unwrap(s).ok().unwrap().stop().await;
}

/// A usage read waits while a snapshot moves buckets to the file. It waits
/// on a blocking thread, not on one of the runtime's workers: with more
/// reads waiting than there are workers, decisions are still answered, and
/// the reads finish once the move is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reads_waiting_for_a_snapshot_do_not_hold_up_decisions() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let s = TestServer::start_at(DIMENSIONS, Transport::Tcp, common::ms("2026-11-21T10:30:00Z")).await;
    let r = s.consume(json!({"subject": "u", "amounts": {"tokens": 7}})).await;
    assert!(r.allowed(), "{}", r.text);
    // A thread holds the guard as a snapshot does from taking buckets out
    // of memory until the file has them, until told to let go or for 20 s
    // at most (so that a failure is a failed assertion, not a hang).
    let engine = s.state.engine().unwrap().clone();
    let released = Arc::new(AtomicBool::new(false));
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = {
        let released = released.clone();
        std::thread::spawn(move || {
            let moving = engine.usage_move();
            held_tx.send(()).unwrap();
            let _ = release_rx.recv_timeout(std::time::Duration::from_secs(20));
            released.store(true, Ordering::SeqCst);
            drop(moving);
        })
    };
    held_rx.recv().unwrap();
    let paths = [
        format!("/v1/subjects/u/usage?{TODAY}"),
        format!("/v1/subjects/u/usage?{TODAY}"),
        format!("/v1/usage?{TODAY}"),
        format!("/v1/usage?{TODAY}&format=csv"),
    ];
    let mut reads = Vec::new();
    for path in &paths {
        let (mut c, path) = (s.connect().await, path.clone());
        reads.push(tokio::spawn(async move { c.req("GET", &path, None, &[]).await }));
    }
    let held_up = "the runtime stood still until the waiting usage reads could go on";
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!released.load(Ordering::SeqCst), "{held_up}");
    assert!(reads.iter().all(|r| !r.is_finished()), "the reads wait for the move");
    let decided = s.consume(json!({"subject": "v", "amounts": {"tokens": 1}})).await;
    assert!(!released.load(Ordering::SeqCst), "{held_up}");
    assert!(decided.allowed(), "{}", decided.text);
    release.send(()).unwrap();
    holder.join().unwrap();
    for (path, read) in paths.iter().zip(reads) {
        let r = read.await.unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        assert!(r.text.contains('7'), "{path} shows the charge: {}", r.text);
    }
    s.stop().await;
}

async fn snapshots(s: &TestServer) -> f64 {
    s.get("/metrics")
        .await
        .text
        .lines()
        .find(|l| l.starts_with("quotad_snapshots_total"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
