//! Signals end to end: threshold alerts once per window, the event log and
//! its SSE stream (with resume), gap-free seq across restarts, webhooks
//! (signature, order, retry, cursor across a restart), circuit breakers
//! (learned baseline, critical traffic, cooldown, the kill switch, per
//! attribute) and anomaly flags (spike vs steady growth, three actions,
//! clearing). Engine time is the test's manual clock.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{ms, TestServer, Transport, T0, TRANSPORTS};
use quotad::clock::Clock;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOUR: u64 = 3_600_000;
const DAY: u64 = 24 * HOUR;

const ALERTS: &str = r#"
metrics = ["tokens"]
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 1000
  alerts = [0.5, 1.0]
  [[plans.limits]]
  name = "credits"
  metric = "tokens"
  match = { event = "credit" }
  algorithm = "lifetime"
  max = 100
  alerts = [0.8]
"#;

async fn events(s: &TestServer, query: &str) -> Vec<Value> {
    let r = s.get(&format!("/v1/events{query}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["events"].as_array().unwrap().clone()
}

fn consume_tokens(subject: &str, n: u64) -> Value {
    json!({"subject": subject, "amounts": {"tokens": n}})
}

#[tokio::test]
async fn thresholds_fire_once_per_window_and_again_in_the_next() {
    for t in TRANSPORTS {
        let s = TestServer::start(ALERTS, t).await;
        assert!(s.consume(consume_tokens("u1", 400)).await.allowed());
        assert!(events(&s, "").await.is_empty());
        assert!(s.consume(consume_tokens("u1", 200)).await.allowed()); // 600: crosses 0.5
        assert!(s.consume(consume_tokens("u1", 100)).await.allowed()); // 700: nothing new
        let e = events(&s, "").await;
        assert_eq!(e.len(), 1, "{e:?}");
        let first = &e[0];
        assert_eq!(first["type"], "threshold.crossed");
        assert_eq!(first["seq"], 1);
        assert_eq!(first["id"], "evt_1");
        assert_eq!(first["subject"], "u1");
        assert_eq!(first["limit"], "tokens-per-day");
        assert_eq!(first["metric"], "tokens");
        assert_eq!(first["scope"], "u1");
        assert_eq!(first["threshold"], 0.5);
        assert_eq!(first["used"], 600);
        assert_eq!(first["max"], 1000);
        assert_eq!(first["resets_at"], "2026-11-22T00:00:00Z");
        assert_eq!(first["at"], "2026-11-21T10:00:00Z");
        // One call crossing both... only 1.0 is left.
        assert!(s.consume(consume_tokens("u1", 300)).await.allowed()); // 1000
                                                                       // A denied call records nothing.
        assert!(!s.consume(consume_tokens("u1", 1)).await.allowed());
        let e = events(&s, "").await;
        assert_eq!(e.len(), 2);
        assert_eq!(e[1]["threshold"], 1.0);
        assert_eq!(e[1]["seq"], 2);
        // Another subject has its own counters and events.
        assert!(s.consume(consume_tokens("u2", 1000)).await.allowed()); // both at once
        let e = events(&s, "?after=2").await;
        assert_eq!(
            e.iter().map(|e| e["threshold"].as_f64().unwrap()).collect::<Vec<_>>(),
            [0.5, 1.0]
        );
        assert!(e.iter().all(|e| e["subject"] == "u2"));
        // The next day: the window is new, so each threshold fires again.
        s.clock.advance(DAY);
        assert!(s.consume(consume_tokens("u1", 600)).await.allowed());
        let e = events(&s, "?after=4").await;
        assert_eq!(e.len(), 1);
        assert_eq!(e[0]["threshold"], 0.5);
        assert_eq!(e[0]["resets_at"], "2026-11-23T00:00:00Z");
        // Lifetime: once, then again only after a credit brings it back below.
        for _ in 0..3 {
            assert!(
                s.consume(json!({"subject":"u3","event":"credit","amounts":{"tokens":40}}))
                    .await
                    .status
                    == 200
            );
        }
        let lifetime = |e: &Vec<Value>| e.iter().filter(|e| e["limit"] == "credits").count();
        assert_eq!(lifetime(&events(&s, "").await), 1);
        let r = s
            .post("/v1/subjects/u3/credit", json!({"limit":"credits","amount":100}))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(s
            .consume(json!({"subject":"u3","event":"credit","amounts":{"tokens":80}}))
            .await
            .allowed());
        assert_eq!(lifetime(&events(&s, "").await), 2);
        s.stop().await;
    }
}

#[tokio::test]
async fn event_pages_filter_and_bad_queries() {
    let s = TestServer::start(ALERTS, Transport::Tcp).await;
    for i in 0..5 {
        assert!(s.consume(consume_tokens(&format!("p{i}"), 1000)).await.allowed());
    }
    let all = events(&s, "?limit=1000").await;
    assert_eq!(all.len(), 10);
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    let r = s.get("/v1/events?after=3&limit=4").await;
    assert_eq!(r.body["next_after"], 7);
    assert_eq!(r.body["events"][0]["seq"], 4);
    let r = s.get("/v1/events?after=10").await;
    assert_eq!(r.body["events"], json!([]));
    assert_eq!(r.body["next_after"], 10);
    assert_eq!(events(&s, "?type=threshold.*").await.len(), 10);
    assert_eq!(events(&s, "?type=breaker.*").await.len(), 0);
    for path in ["/v1/breakers?x=1", "/v1/anomalies?x=1", "/v1/webhooks?x=1"] {
        let r = s.get(path).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text);
        assert!(
            r.body["error"]["message"].as_str().unwrap().starts_with('x'),
            "{path}: {}",
            r.text
        );
    }
    for (q, field) in [
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?after=-1", "after"),
        ("?type=nope", "type"),
        ("?color=red", "color"),
    ] {
        let r = s.get(&format!("/v1/events{q}")).await;
        assert_eq!(r.status, 400, "{q}: {}", r.text);
        assert!(
            r.body["error"]["message"].as_str().unwrap().starts_with(field),
            "{q}: {}",
            r.text
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn seq_has_no_gaps_across_restarts_and_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let mut now = T0;
    for round in 0..3u64 {
        let s = TestServer::start_durable(ALERTS, Transport::Tcp, now, dir.path()).await;
        for i in 0..3 {
            assert!(s.consume(consume_tokens(&format!("r{round}-{i}"), 600)).await.allowed());
        }
        let e = events(&s, "?limit=1000").await;
        let seqs: Vec<u64> = e.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=3 * (round + 1)).collect::<Vec<_>>(), "round {round}");
        now = s.clock.now_ms();
        s.stop().await; // writes a snapshot: older events are read from it
    }
}

/// Reads an SSE stream until `n` events arrived; returns (id, event, data).
async fn read_sse<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut sock: S,
    last_id: Option<u64>,
    n: usize,
) -> Vec<(u64, String, Value)> {
    let extra = last_id.map_or(String::new(), |id| format!("Last-Event-ID: {id}\r\n"));
    let req = format!("GET /v1/events/stream HTTP/1.1\r\nHost: q\r\nAccept: text/event-stream\r\n{extra}\r\n");
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while out.len() < n {
        let mut chunk = [0u8; 4096];
        let got = tokio::time::timeout_at(deadline, sock.read(&mut chunk))
            .await
            .expect("events arrive on the stream")
            .unwrap();
        assert!(got > 0, "stream closed early");
        buf.extend_from_slice(&chunk[..got]);
        let text = String::from_utf8_lossy(&buf).to_string();
        out.clear();
        for block in text.split("\n\n") {
            let (mut id, mut ev, mut data) = (None, None, None);
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("event:") {
                    ev = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = serde_json::from_str(v.trim()).ok();
                }
            }
            if let (Some(id), Some(ev), Some(data)) = (id, ev, data) {
                out.push((id, ev, data));
            }
        }
    }
    out
}

#[tokio::test]
async fn sse_stream_resumes_after_last_event_id_over_both_transports() {
    for t in TRANSPORTS {
        let s = Arc::new(TestServer::start(ALERTS, t).await);
        assert!(s.consume(consume_tokens("a", 1000)).await.allowed()); // events 1, 2
        assert!(s.consume(consume_tokens("b", 1000)).await.allowed()); // events 3, 4
        let got = match (t, s.socket_path()) {
            (Transport::Unix, Some(p)) => read_sse(tokio::net::UnixStream::connect(p).await.unwrap(), Some(2), 2).await,
            _ => {
                let addr = s.cli_target()[1].clone();
                read_sse(tokio::net::TcpStream::connect(addr).await.unwrap(), Some(2), 2).await
            }
        };
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [3, 4]);
        assert!(got.iter().all(|g| g.1 == "threshold.crossed" && g.2["subject"] == "b"));
        assert_eq!(got[0].2["seq"], 3);
        // Live: a stream opened without an id gets what happens next.
        let s2 = s.clone();
        let live = tokio::spawn(async move {
            match (t, s2.socket_path()) {
                (Transport::Unix, Some(p)) => {
                    read_sse(tokio::net::UnixStream::connect(p).await.unwrap(), None, 1).await
                }
                _ => {
                    read_sse(
                        tokio::net::TcpStream::connect(s2.cli_target()[1].clone())
                            .await
                            .unwrap(),
                        None,
                        1,
                    )
                    .await
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(s.consume(consume_tokens("c", 500)).await.allowed()); // event 5
        let got = live.await.unwrap();
        assert_eq!(got[0].0, 5);
        Arc::try_unwrap(s).ok().unwrap().stop().await;
    }
}

// ---- webhooks -----------------------------------------------------------

/// One received POST: lower-cased headers and the body.
type Received = (Vec<(String, String)>, String);

/// A receiver: records (headers, body) of each POST; answers with the next
/// status from `script` (200 once it runs out); a status of 0 never answers.
struct Receiver {
    addr: String,
    got: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

async fn receiver(script: Vec<u16>) -> Receiver {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let got = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(Mutex::new(std::collections::VecDeque::from(script)));
    let g = got.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = l.accept().await else { return };
            let (g, script) = (g.clone(), script.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 8192];
                    let n = match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let headers: Vec<(String, String)> = head
                        .lines()
                        .skip(1)
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                        .collect();
                    let len: usize = headers
                        .iter()
                        .find(|h| h.0 == "content-length")
                        .map_or(0, |h| h.1.parse().unwrap());
                    if buf.len() < end + 4 + len {
                        continue;
                    }
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                    buf.drain(..end + 4 + len);
                    let status = script.lock().unwrap().pop_front().unwrap_or(200);
                    g.lock().unwrap().push((headers, body));
                    if status == 0 {
                        std::future::pending::<()>().await;
                    }
                    let resp = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
                    if sock.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Receiver { addr, got, task }
}

fn webhook_config(addr: &str, secret_file: &std::path::Path, events: &str) -> String {
    format!(
        "{ALERTS}\n[[webhooks]]\nname = \"ops\"\nurl = \"http://{addr}/hook\"\nsecret_file = \"{}\"\n{events}\n",
        secret_file.display()
    )
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> &'a str {
    h.iter().find(|x| x.0 == name).map_or("", |x| x.1.as_str())
}

#[tokio::test]
async fn webhooks_are_signed_ordered_retried_and_resume_from_a_durable_cursor() {
    use hmac::Mac;
    let dir = tempfile::tempdir().unwrap();
    let secret = "a-long-enough-webhook-secret";
    let secret_file = dir.path().join("hook.secret");
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    // The first attempt fails with 500, the second with 503; then 200s.
    let rx = receiver(vec![500, 503]).await;
    let cfg = webhook_config(&rx.addr, &secret_file, "events = [\"threshold.*\"]");
    let data = dir.path().join("data");
    let s = TestServer::start_durable(&cfg, Transport::Tcp, T0, &data).await;
    assert!(s.consume(consume_tokens("w", 600)).await.allowed()); // evt 1
    assert!(s.consume(consume_tokens("w", 400)).await.allowed()); // evt 2
    until("two deliveries after two failures", || {
        rx.got.lock().unwrap().len() >= 4
    })
    .await;
    let got = rx.got.lock().unwrap().clone();
    let ids: Vec<&str> = got.iter().map(|g| header(&g.0, "quotad-event-id")).collect();
    // In order: event 2 waits until event 1 is through.
    assert_eq!(ids, ["evt_1", "evt_1", "evt_1", "evt_2"]);
    for (h, body) in &got {
        let sig = header(h, "quotad-signature");
        let (t, v1) = sig.split_once(",v1=").unwrap();
        let t = t.strip_prefix("t=").unwrap();
        assert_eq!(t.parse::<u64>().unwrap(), T0 / 1000);
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.{body}").as_bytes());
        assert_eq!(hex::encode(mac.finalize().into_bytes()), v1, "signature of {body}");
        assert_eq!(header(h, "content-type"), "application/json");
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["id"], header(h, "quotad-event-id"));
    }
    until("cursor at 2", || {
        s.state.core.get().unwrap().webhooks.views()[0].delivered_seq == 2
    })
    .await;
    let r = s.get("/v1/webhooks").await;
    assert_eq!(r.status, 200);
    let w = &r.body["webhooks"][0];
    assert_eq!(w["name"], "ops");
    assert_eq!(w["delivered_seq"], 2);
    assert_eq!(w["pending"], 0);
    assert_eq!(w["last_error"], Value::Null);
    assert!(w["last_attempt_at"].is_string());
    let m = s.get("/metrics").await.text;
    assert!(
        m.contains("quotad_webhook_attempts_total{webhook=\"ops\",outcome=\"failed\"} 2"),
        "{m}"
    );
    assert!(m.contains("quotad_webhook_delivered_seq{webhook=\"ops\"} 2"), "{m}");
    s.stop().await;
    rx.task.abort();

    // A receiver that never answers: event 3 stays in flight when the
    // daemon stops; after the restart only it is sent again.
    let rx2 = receiver(vec![0]).await;
    let cfg = webhook_config(&rx2.addr, &secret_file, "");
    let s = TestServer::start_durable(&cfg, Transport::Tcp, T0, &data).await;
    assert!(s.consume(consume_tokens("x", 600)).await.allowed()); // evt 3
    until("event 3 in flight", || rx2.got.lock().unwrap().len() == 1).await;
    let r = s.get("/v1/webhooks").await;
    assert_eq!(r.body["webhooks"][0]["delivered_seq"], 2);
    assert_eq!(r.body["webhooks"][0]["pending"], 1);
    s.stop().await;
    rx2.task.abort();
    let rx3 = receiver(vec![]).await;
    let cfg = webhook_config(&rx3.addr, &secret_file, "");
    let s = TestServer::start_durable(&cfg, Transport::Tcp, T0, &data).await;
    until("event 3 redelivered", || rx3.got.lock().unwrap().len() == 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = rx3.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "only the in-flight event is sent again");
    assert_eq!(header(&got[0].0, "quotad-event-id"), "evt_3");
    s.stop().await;
}

#[tokio::test]
async fn webhook_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.secret");
    std::fs::write(&short, "tiny").unwrap();
    let good = dir.path().join("good.secret");
    std::fs::write(&good, "0123456789abcdef0123").unwrap();
    let cases = [
        (
            format!(
                "[[webhooks]]\nname=\"a\"\nurl=\"ftp://x\"\nsecret_file=\"{}\"",
                good.display()
            ),
            "webhooks[0].url",
        ),
        (
            "[[webhooks]]\nname=\"a\"\nurl=\"http://127.0.0.1:1/\"\nsecret_file=\"/no/such/file\"".to_string(),
            "webhooks[0].secret_file",
        ),
        (
            format!(
                "[[webhooks]]\nname=\"a\"\nurl=\"http://127.0.0.1:1/\"\nsecret_file=\"{}\"",
                short.display()
            ),
            "webhooks[0].secret_file",
        ),
        (
            format!(
                "[[webhooks]]\nname=\"a\"\nurl=\"http://127.0.0.1:1/\"\nsecret_file=\"{}\"\nevents=[\"nope.*\"]",
                good.display()
            ),
            "webhooks[0].events[0]",
        ),
    ];
    // Type errors are in words, and ranges in the config's own units.
    for (text, words) in [
        (
            "[[breakers]]\nname=\"b\"\nwindow=\"10m\"\nnormal_per_hour=1\nratio=\"3\"",
            "expected a number",
        ),
        (
            "[[anomalies]]\nname=\"a\"\nratio=2.0\nbaseline_periods=-1",
            "expected a whole number, 0 or more",
        ),
        ("[events]\nretention=\"10s\"", "between 1m and 400d"),
    ] {
        let e = match quotad::config::Config::from_toml(text, "t.toml") {
            Err(e) => e,
            Ok(c) => quotad::engine::Policy::from_config(&c).unwrap_err(),
        }
        .to_string();
        assert!(e.contains(words) && !e.contains("f64") && !e.contains("u32"), "{e}");
    }
    for (text, key) in cases {
        let config = quotad::config::Config::from_toml(&text, "t.toml").unwrap();
        let e = quotad::webhooks::load_webhooks(&config).unwrap_err();
        assert!(e.to_string().contains(key), "{key}: {e}");
    }
}

// ---- circuit breakers ---------------------------------------------------

const BREAKER: &str = r#"
[[plans]]
name = "p"
default = true
  [[plans.limits]]
  name = "calls"
  period = "1d"
  max = 1000000

[[breakers]]
name = "surge"
metric = "requests"
match = { event = "llm.*" }
window = "10m"
baseline = "1h"
ratio = 3.0
min_amount = 20
cooldown = "15m"
pass_priority = "critical"

[[breakers]]
name = "per-model"
metric = "requests"
match = { event = "image.*" }
scope = "attribute:model"
window = "10m"
normal_per_hour = 6000
ratio = 2.0
min_amount = 1000000
"#;

async fn call(s: &TestServer, event: &str, priority: &str) -> Value {
    let r = s
        .consume(json!({"subject":"app","event":event,"priority":priority,"attributes":{"model":"m1"}}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body
}

async fn breaker(s: &TestServer, name: &str, scope: &str) -> Value {
    let r = s.get("/v1/breakers").await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name && b["scope"] == scope)
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn breaker_learns_a_baseline_opens_on_a_surge_passes_critical_and_closes_after_cooldown() {
    let s = TestServer::start(BREAKER, Transport::Tcp).await;
    // A surge before a full baseline has been watched opens nothing.
    for _ in 0..50 {
        assert_eq!(call(&s, "llm.chat", "normal").await["allowed"], true);
    }
    assert_eq!(breaker(&s, "surge", "global").await["state"], "closed");
    // 80 minutes of steady traffic: 10 calls a minute... then 10 per 10 min.
    for _ in 0..8 {
        s.clock.advance(10 * 60_000);
        for _ in 0..10 {
            call(&s, "llm.chat", "normal").await;
        }
    }
    assert_eq!(breaker(&s, "surge", "global").await["state"], "closed");
    // A surge: 3× the normal 10 per window is 30; the call that passes it is
    // the one that opens the breaker, and is denied.
    let mut denied_at = None;
    for i in 0..40 {
        let d = call(&s, "llm.chat", "normal").await;
        if d["allowed"] == false {
            assert_eq!(d["reasons"][0]["code"], "circuit_open", "{d}");
            assert_eq!(d["reasons"][0]["limit"], "surge");
            assert_eq!(d["retry_after_ms"], 15 * 60_000);
            denied_at = Some(i);
            break;
        }
    }
    assert!(denied_at.is_some(), "the surge opened the breaker");
    let b = breaker(&s, "surge", "global").await;
    assert_eq!(b["state"], "open", "{b}");
    assert_eq!(b["reason"], "rate");
    // The call that tipped it over was denied, so the window holds 3 × normal.
    assert_eq!(
        (b["recent"].as_u64(), b["normal"].as_u64()),
        (Some(30), Some(10)),
        "{b}"
    );
    assert!(b["opened_at"].is_string());
    // Critical traffic passes; other events are not watched by it.
    assert_eq!(call(&s, "llm.chat", "critical").await["allowed"], true);
    assert_eq!(call(&s, "other", "low").await["allowed"], true);
    assert_eq!(call(&s, "llm.chat", "high").await["allowed"], false);
    let e = events(&s, "?type=breaker.*").await;
    assert_eq!(e.len(), 1);
    assert_eq!(e[0]["type"], "breaker.opened");
    assert_eq!(e[0]["breaker"], "surge");
    // After the cooldown, with the surge gone from the window, it closes by
    // itself (the maintenance tick), and an event says so.
    s.clock.advance(16 * 60_000);
    until_async(|| async { breaker(&s, "surge", "global").await["state"] == "closed" }).await;
    assert_eq!(call(&s, "llm.chat", "normal").await["allowed"], true);
    let e = events(&s, "?type=breaker.*").await;
    assert_eq!(
        e.iter().map(|e| e["type"].as_str().unwrap()).collect::<Vec<_>>(),
        ["breaker.opened", "breaker.closed"]
    );
    s.stop().await;
}

async fn until_async<F: std::future::Future<Output = bool>>(mut f: impl FnMut() -> F) {
    for _ in 0..500 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out");
}

#[tokio::test]
async fn the_kill_switch_opens_by_hand_per_scope_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_durable(BREAKER, Transport::Unix, T0, dir.path()).await;
    let r = s.post("/v1/breakers/per-model/open", json!({"scope":"model=m1"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["breaker"]["state"], "open");
    assert_eq!(r.body["breaker"]["reason"], "manual");
    assert_eq!(r.body["breaker"]["scope"], "model=m1");
    let d = call(&s, "image.render", "normal").await;
    assert_eq!(d["allowed"], false);
    assert_eq!(d["reasons"][0]["code"], "circuit_open");
    assert!(d["retry_after_ms"].is_null(), "a manual open has no end: {d}");
    let m = s.get("/metrics").await.text;
    assert!(
        m.contains("quotad_breaker_open{breaker=\"per-model\",scope=\"model=m1\"} 1"),
        "{m}"
    );
    // Another model is not stopped.
    let r = s
        .consume(json!({"subject":"app","event":"image.render","attributes":{"model":"m2"}}))
        .await;
    assert!(r.allowed());
    // Errors name what is wrong.
    let r = s.post("/v1/breakers/nope/open", json!({})).await;
    assert_eq!((r.status, r.error_code()), (404, "unknown_breaker"), "{}", r.text);
    assert!(r.text.contains("nope") && r.text.contains("surge"), "{}", r.text);
    let r = s.post("/v1/breakers/per-model/open", json!({})).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("scope"), "{}", r.text);
    let r = s.post("/v1/breakers/surge/open", json!({"scope":"model=m1"})).await;
    assert_eq!(r.status, 400, "{}", r.text);
    let r = s.post("/v1/breakers/surge/open", json!({"scpe":"x"})).await;
    assert_eq!(r.status, 400, "{}", r.text);
    s.stop().await;

    let s = TestServer::start_durable(BREAKER, Transport::Unix, T0 + 3_600_000, dir.path()).await;
    let b = breaker(&s, "per-model", "model=m1").await;
    assert_eq!(b["state"], "open", "{b}");
    assert_eq!(b["reason"], "manual");
    assert_eq!(call(&s, "image.render", "normal").await["allowed"], false);
    let r = s
        .post("/v1/breakers/per-model/close", json!({"scope":"model=m1"}))
        .await;
    assert_eq!(r.body["breaker"]["state"], "closed", "{}", r.text);
    assert_eq!(call(&s, "image.render", "normal").await["allowed"], true);
    let kinds: Vec<String> = events(&s, "")
        .await
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["breaker.opened", "breaker.closed"]);
    // The global breaker is opened with an empty body too.
    let r = s.req("POST", "/v1/breakers/surge/open", None, &[]).await;
    assert_eq!(r.body["breaker"]["state"], "open", "{}", r.text);
    assert_eq!(call(&s, "llm.chat", "normal").await["allowed"], false);
    assert_eq!(call(&s, "llm.chat", "critical").await["allowed"], true);
    s.stop().await;
}

// ---- anomaly flags ------------------------------------------------------

fn anomaly_config(action: &str) -> String {
    format!(
        r#"
[[plans]]
name = "p"
default = true
  [[plans.limits]]
  name = "calls"
  period = "1d"
  max = 1000000

[[anomalies]]
name = "usage-spike"
metric = "requests"
match = {{ event = "llm.*" }}
period = "1d"
baseline_periods = 3
ratio = 5.0
min_amount = 20
action = "{action}"
"#
    )
}

async fn calls(s: &TestServer, subject: &str, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = s.consume(json!({"subject":subject,"event":"llm.chat"})).await;
        assert_eq!(r.status, 200, "{}", r.text);
        out.push(r.body);
    }
    out
}

#[tokio::test]
async fn anomaly_flags_a_spike_not_steady_growth_and_not_new_subjects() {
    let s = TestServer::start_at(&anomaly_config("flag"), Transport::Tcp, ms("2026-11-21T00:30:00Z")).await;
    // A new subject with no history is never compared.
    calls(&s, "newbie", 60).await;
    // Three days of history: 10 a day for the spiker, growing for the grower.
    for (day, grow) in [(0, 10), (1, 14), (2, 18)] {
        if day > 0 {
            s.clock.advance(DAY);
        }
        calls(&s, "spiker", 10).await;
        calls(&s, "grower", grow).await;
    }
    s.clock.advance(DAY);
    calls(&s, "grower", 24).await; // steady growth: 24 < 5 × 14
    let got = calls(&s, "spiker", 60).await; // 60 > 5 × 10 and ≥ 20
    assert!(got.iter().all(|d| d["allowed"] == true), "flag only flags");
    let r = s.get("/v1/anomalies").await;
    let flags = r.body["flags"].as_array().unwrap();
    assert_eq!(flags.len(), 1, "{}", r.text);
    assert_eq!(flags[0]["subject"], "spiker");
    assert_eq!(flags[0]["anomaly"], "usage-spike");
    assert_eq!(flags[0]["used"], 51);
    assert_eq!(flags[0]["baseline"], 10);
    assert_eq!(flags[0]["until"], "2026-11-25T00:00:00Z");
    let m = s.get("/metrics").await.text;
    assert!(m.contains("quotad_anomaly_flags{anomaly=\"usage-spike\"} 1"), "{m}");
    let e = events(&s, "?type=anomaly.detected").await;
    assert_eq!(e.len(), 1, "raised once per period: {e:?}");
    assert_eq!(e[0]["subject"], "spiker");
    let subj = s.get("/v1/subjects/spiker").await;
    assert_eq!(subj.body["flags"][0]["anomaly"], "usage-spike", "{}", subj.text);
    assert!(s.get("/v1/subjects/grower").await.body["flags"]
        .as_array()
        .unwrap()
        .is_empty());
    // Cleared by hand: gone from the lists, and not raised again this period.
    let r = s
        .req("DELETE", "/v1/subjects/spiker/flags/usage-spike", None, &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["flags"], json!([]));
    calls(&s, "spiker", 10).await;
    assert_eq!(s.get("/v1/anomalies").await.body["flags"], json!([]));
    let m = s.get("/metrics").await.text;
    assert!(m.contains("quotad_anomaly_flags{anomaly=\"usage-spike\"} 0"), "{m}");
    // Clearing what is not raised is fine; an unknown rule is 404.
    let r = s
        .req("DELETE", "/v1/subjects/grower/flags/usage-spike", None, &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s.req("DELETE", "/v1/subjects/grower/flags/nope", None, &[]).await;
    assert_eq!((r.status, r.error_code()), (404, "unknown_anomaly"), "{}", r.text);
    s.stop().await;
}

#[tokio::test]
async fn anomaly_actions_degrade_and_deny_until_cleared_or_the_period_ends() {
    for action in ["degrade", "deny"] {
        let s = TestServer::start_at(&anomaly_config(action), Transport::Tcp, ms("2026-11-21T00:30:00Z")).await;
        for day in 0..3 {
            if day > 0 {
                s.clock.advance(DAY);
            }
            calls(&s, "u", 4).await;
        }
        s.clock.advance(DAY);
        let got = calls(&s, "u", 25).await;
        let (ok, rest) = got.split_at(20);
        assert!(
            ok.iter().all(|d| d["allowed"] == true && d["decision"] == "allow"),
            "{ok:?}"
        );
        for d in rest {
            assert_eq!(d["reasons"][0]["code"], "anomaly", "{action}: {d}");
            assert_eq!(d["reasons"][0]["limit"], "usage-spike");
            match action {
                "degrade" => assert_eq!(
                    (d["allowed"].clone(), d["decision"].clone()),
                    (json!(true), json!("degrade")),
                    "{d}"
                ),
                _ => assert_eq!(d["allowed"], false, "{d}"),
            }
        }
        let r = s.req("DELETE", "/v1/subjects/u/flags/usage-spike", None, &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(calls(&s, "u", 1).await[0]["decision"], "allow");
        s.stop().await;
    }
}
