//! The failures found by trying to break quotad, each reproduced and held
//! fixed: clock steps while running and a restart under a clock behind the
//! log, stalled request bodies, bodies with trailing data, counters that
//! saturate at what JSON reads exactly, a plan removed by reload, and reloads that reset usage.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestServer, Transport, T0, TRANSPORTS};
use quotad::clock::{ManualSource, SteadyClock};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONFIG: &str = r#"
[engine]
idempotency_retention = "1h"
reservation_ttl_default = "60s"
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "burst"
  algorithm = "token_bucket"
  max = 2
  refill = 2
  period = "10s"
  [[plans.limits]]
  name = "per-minute"
  period = "1m"
  max = 5
  [[plans.limits]]
  name = "tokens"
  metric = "tokens"
  algorithm = "lifetime"
  max = "unlimited"
[[plans]]
name = "pro"
"#;

fn steady(wall_ms: u64) -> (ManualSource, Arc<SteadyClock<ManualSource>>) {
    let src = ManualSource::new(wall_ms);
    (src.clone(), Arc::new(SteadyClock::new(src)))
}

#[tokio::test]
async fn wall_clock_steps_while_running_change_nothing() {
    for t in TRANSPORTS {
        let dir = tempfile::tempdir().unwrap();
        let (src, clock) = steady(T0);
        let s = TestServer::start_on_clock(CONFIG, t, clock, dir.path()).await;
        let call = json!({"subject": "u"});
        assert!(s.consume(call.clone()).await.allowed());
        assert!(s.consume(call.clone()).await.allowed());
        assert!(!s.consume(call.clone()).await.allowed(), "the bucket is empty");
        let r = s.post("/v1/reserve", json!({"subject": "v", "ttl_ms": 60_000})).await;
        let id = r.body["reservation_id"].as_str().unwrap().to_string();

        // The wall clock jumps back an hour; five real seconds pass.
        src.step_wall(T0 - 3_600_000);
        src.advance(5_000);
        assert!(s.consume(call.clone()).await.allowed(), "the bucket refilled one token");
        // A minute later the hold has expired, whatever the wall clock says.
        src.advance(61_000);
        let c = s.post(&format!("/v1/reservations/{id}/commit"), json!({})).await;
        assert_eq!(c.body["expired"], true, "{}", c.text);

        // The wall clock jumps two days ahead: a retry within the hour is still a replay.
        let keyed = json!({"subject": "w", "idempotency_key": "k-1"});
        assert_eq!(s.consume(keyed.clone()).await.body["replayed"], false);
        src.step_wall(T0 + 2 * 86_400_000);
        src.advance(1_000);
        let again = s.consume(keyed).await;
        assert_eq!(again.body["replayed"], true, "{}", again.text);
        s.stop().await;
    }
}

#[tokio::test]
async fn a_restart_under_a_clock_behind_the_log_counts_every_charge() {
    let dir = tempfile::tempdir().unwrap();
    // Five calls on a 1-minute limit under a clock two minutes ahead, then kill -9 / SIGTERM alike.
    let (_, ahead) = steady(T0 + 120_000);
    let per_minute = "[[plans]]\nname = \"free\"\ndefault = true\n[[plans.limits]]\nname = \"per-minute\"\nperiod = \"1m\"\nmax = 5\n";
    let s = TestServer::start_on_clock(per_minute, Transport::Tcp, ahead, dir.path()).await;
    for _ in 0..5 {
        assert!(s.consume(json!({"subject": "u"})).await.allowed());
    }
    s.stop().await;
    // The real clock is behind the log: time resumes from the log.
    let (src, real) = steady(T0);
    let s = TestServer::start_on_clock(per_minute, Transport::Tcp, real, dir.path()).await;
    for _ in 0..7 {
        let r = s.consume(json!({"subject": "u"})).await;
        assert!(!r.allowed(), "a sixth call in that minute: {}", r.text);
        assert_eq!(r.used("per-minute"), 5);
    }
    // And time goes on from there: a minute later the window has turned.
    src.advance(60_000);
    assert!(s.consume(json!({"subject": "u"})).await.allowed());
    s.stop().await;
}

/// Opens a raw connection and sends headers announcing a body it never finishes.
async fn stalled(s: &TestServer, headers: &str) -> Box<dyn Stream> {
    let mut conn: Box<dyn Stream> = match s.socket_path() {
        Some(p) => Box::new(tokio::net::UnixStream::connect(p).await.unwrap()),
        None => {
            let addr = s.cli_target()[1].clone();
            Box::new(tokio::net::TcpStream::connect(addr).await.unwrap())
        }
    };
    conn.write_all(headers.as_bytes()).await.unwrap();
    conn
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

async fn read_answer(conn: &mut Box<dyn Stream>) -> String {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).to_string()
}

#[tokio::test]
async fn stalled_bodies_time_out_and_others_are_served_meanwhile() {
    let cfg = format!("[server]\nmax_connections = 8\nbody_timeout_ms = 400\n{CONFIG}");
    for t in TRANSPORTS {
        let s = TestServer::start(&cfg, t).await;
        // Six uploads that send one byte of a 100-byte body and stop.
        let head = "POST /v1/consume HTTP/1.1\r\nHost: q\r\nContent-Length: 100\r\n\r\n{";
        let mut slow = Vec::new();
        for _ in 0..6 {
            slow.push(stalled(&s, head).await);
        }
        // The two slots left still serve others, at once.
        for i in 0..3 {
            assert!(s.consume(json!({"subject": format!("other-{i}")})).await.allowed());
        }
        // Each stalled upload gets 408 and its connection is closed.
        for conn in &mut slow {
            let answer = read_answer(conn).await;
            assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
            assert!(answer.contains("server.body_timeout_ms"), "{answer}");
        }
        // Nothing was charged by them.
        let list = s.get("/v1/subjects").await;
        assert_eq!(list.body["subjects"].as_array().unwrap().len(), 3, "{}", list.text);
        s.stop().await;
    }
}

#[tokio::test]
async fn tokens_and_sizes_are_checked_before_the_body_is_read() {
    let cfg = format!(
        "[auth]\ntokens = [{{ role = \"client\", token = \"client-token-0123456789\" }}]\n\
         [server]\nbody_timeout_ms = 60000\n{CONFIG}"
    );
    for t in TRANSPORTS {
        let s = TestServer::start(&cfg, t).await;
        // No token, a body announced and never sent: 401 now, not after the body timeout.
        let mut c = stalled(&s, "POST /v1/consume HTTP/1.1\r\nHost: q\r\nContent-Length: 50\r\n\r\n").await;
        let started = std::time::Instant::now();
        let answer = read_answer(&mut c).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(30));
        // Too large by Content-Length: 413 before a byte of it arrives.
        let mut c = stalled(
            &s,
            "POST /v1/consume HTTP/1.1\r\nHost: q\r\nAuthorization: Bearer client-token-0123456789\r\n\
             Content-Length: 99999999\r\n\r\n",
        )
        .await;
        let answer = read_answer(&mut c).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("server.max_body_bytes"), "{answer}");
        // Unknown paths need the token too: nothing is told to strangers.
        let r = s.get("/v1/nothing-here").await;
        assert_eq!(r.status, 401);
        s.stop().await;
    }
}

#[tokio::test]
async fn a_body_is_exactly_one_json_value() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        for body in [
            r#"{"subject":"a"}xyz"#,
            r#"{"subject":"a"}{"subject":"b","foo":1}"#,
            r#"{"subject":"a"} 1"#,
        ] {
            let r = s.req("POST", "/v1/consume", Some(body), &[]).await;
            assert_eq!(
                (r.status, r.error_code()),
                (400, "invalid_request"),
                "{body}: {}",
                r.text
            );
            assert!(r.text.contains("exactly one JSON object"), "{}", r.text);
        }
        let r = s
            .req("POST", "/v1/consume", Some("{\"subject\":\"a\"}\n \t"), &[])
            .await;
        assert!(r.allowed(), "trailing whitespace is fine");
        assert_eq!(
            s.get("/v1/subjects/a").await.used("per-minute"),
            1,
            "only the valid call counted"
        );
        let r = s.req("PUT", "/v1/subjects/a", Some(r#"{"plan":"pro"}]]]"#), &[]).await;
        assert_eq!(r.status, 400, "{}", r.text);
        assert_eq!(
            s.get("/v1/subjects/a").await.body["plan"],
            "free",
            "nothing was applied"
        );
        // Plain words, no Rust types.
        let r = s.req("POST", "/v1/consume", Some(""), &[]).await;
        assert_eq!(r.body["error"]["message"], "subject: is required");
        let r = s
            .req(
                "POST",
                "/v1/consume",
                Some(r#"{"subject":"a","amounts":{"tokens":"x"}}"#),
                &[],
            )
            .await;
        assert!(!r.text.contains("u64"), "{}", r.text);
        assert!(r.text.contains("amounts.tokens"), "{}", r.text);
        s.stop().await;
    }
}

#[tokio::test]
async fn counters_stay_readable_by_json_clients() {
    let s = TestServer::start(CONFIG, Transport::Tcp).await;
    let max = (1u64 << 53) - 1;
    let r = s.consume(json!({"subject": "u", "amounts": {"tokens": max}})).await;
    assert!(r.allowed(), "{}", r.text);
    // An unlimited counter saturates at 2^53-1 instead of refusing the charge.
    let r = s.consume(json!({"subject": "u", "amounts": {"tokens": 1}})).await;
    assert!(r.allowed(), "{}", r.text);
    assert_eq!(r.used("tokens"), max, "{}", r.text);
    assert_eq!(s.get("/v1/subjects/u").await.used("tokens"), max);
    s.stop().await;
}

#[tokio::test]
async fn reload_reports_what_it_resets_and_a_removed_plan_reads_the_same_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quotad.toml");
    std::fs::write(&path, CONFIG).unwrap();
    let s = TestServer::start_file(&path, Transport::Tcp).await;
    assert_eq!(s.put("/v1/subjects/p", json!({"plan": "pro"})).await.status, 200);
    assert!(s.consume(json!({"subject": "u"})).await.allowed());
    // per-minute becomes a sliding window, and plan pro goes away.
    let changed = CONFIG
        .replace(
            "  name = \"per-minute\"\n  period = \"1m\"",
            "  name = \"per-minute\"\n  algorithm = \"sliding\"\n  period = \"1m\"",
        )
        .replace("[[plans]]\nname = \"pro\"\n", "");
    std::fs::write(&path, changed).unwrap();
    let r = s.post("/v1/admin/reload", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["usage_reset"], json!(["per-minute: algorithm fixed -> sliding"]));
    let one = s.get("/v1/subjects/p").await;
    let list = s.get("/v1/subjects").await;
    let entry = list.body["subjects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["subject"] == "p")
        .unwrap()
        .clone();
    assert_eq!(
        (one.body["plan"].clone(), one.body["assigned"].clone()),
        (json!("free"), json!(false))
    );
    assert_eq!(entry, json!({"subject": "p", "plan": "free", "assigned": false}));
    s.stop().await;
}

#[tokio::test]
async fn retained_keys_are_bounded_and_expired_ones_go_first() {
    let cfg = "[engine]\nmax_idempotency_keys = 3\nidempotency_retention = \"10s\"\n\
               [[plans]]\nname = \"free\"\ndefault = true\n";
    for t in TRANSPORTS {
        let s = TestServer::start(cfg, t).await;
        let keyed = |k: &str| json!({"subject": "u", "idempotency_key": k});
        for k in ["k1", "k2", "k3"] {
            assert!(s.consume(keyed(k)).await.allowed());
        }
        // Full: a new key is refused, naming the setting, and nothing is applied.
        let r = s.consume(keyed("k4")).await;
        assert_eq!((r.status, r.error_code()), (503, "unavailable"), "{}", r.text);
        assert!(r.text.contains("engine.max_idempotency_keys"), "{}", r.text);
        let r = s
            .req("DELETE", "/v1/subjects/u", None, &[("idempotency-key", "k5")])
            .await;
        assert_eq!(r.status, 503, "{}", r.text);
        // Retries of kept keys and calls without a key still work.
        assert_eq!(s.consume(keyed("k1")).await.body["replayed"], true);
        assert!(s.consume(json!({"subject": "u"})).await.allowed());
        // Once the kept keys pass their retention they make room.
        s.clock.advance(11_000);
        let r = s.consume(keyed("k4")).await;
        assert!(r.allowed(), "{}", r.text);
        assert_eq!(r.body["replayed"], false);
        s.stop().await;
    }
}

#[tokio::test]
async fn a_repeated_delete_answers_what_the_first_did() {
    let s = TestServer::start(CONFIG, Transport::Tcp).await;
    let h = [("idempotency-key", "d-1")];
    let first = s.req("DELETE", "/v1/subjects/never-seen", None, &h).await;
    let again = s.req("DELETE", "/v1/subjects/never-seen", None, &h).await;
    assert_eq!(first.body, json!({"subject": "never-seen", "deleted": false}));
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
    s.stop().await;
}

/// A lifetime top-up raises the cap, and the cap must stay at most 2^53-1,
/// like every count an answer carries: a credit past it is 400 naming
/// `amount`, and nothing changes.
#[tokio::test]
async fn a_credit_cannot_raise_a_lifetime_cap_past_2_pow_53() {
    const CREDITS: &str = r#"
[[plans]]
name = "p"
default = true
  [[plans.limits]]
  name = "image-credits"
  algorithm = "lifetime"
  max = 50
"#;
    let s = TestServer::start(CREDITS, Transport::Tcp).await;
    let big = 9_007_199_254_740_991u64 - 50;
    let r = s
        .post(
            "/v1/subjects/u/credit",
            json!({"limit": "image-credits", "amount": big}),
        )
        .await;
    assert_eq!(r.status, 200, "exactly at the bound is fine: {}", r.text);
    assert_eq!(r.counter("image-credits")["max"], 9_007_199_254_740_991u64);
    let r = s
        .post("/v1/subjects/u/credit", json!({"limit": "image-credits", "amount": 1}))
        .await;
    assert_eq!((r.status, r.error_code()), (400, "invalid_request"), "{}", r.text);
    assert!(r.text.contains("amount"), "{}", r.text);
    let r = s.get("/v1/subjects/u").await;
    assert_eq!(
        r.counter("image-credits")["max"],
        9_007_199_254_740_991u64,
        "nothing changed"
    );
    s.stop().await;
}
