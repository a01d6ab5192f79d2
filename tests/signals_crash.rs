//! Events and their causes are one WAL record: the real binary is killed
//! with SIGKILL while clients charge subjects whose every charge crosses an
//! alert, then restarted. After each restart, every subject with usage has
//! exactly one `threshold.crossed` event and no event exists without its
//! charge; every acknowledged charge is there; seq runs 1..n without gaps.
//! `QUOTAD_CRASH_RESTARTS=50 cargo test --release --test signals_crash` is
//! the long run. A second test kills the daemon while a webhook is being
//! delivered to: every event arrives, in order, and each kill repeats at most
//! the one event that was in flight.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_quotad");

fn http(sock: &Path, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: q\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.get(9..12)?.parse().ok()?;
    Some((status, out[out.find("\r\n\r\n")? + 4..].to_string()))
}

fn get_json(sock: &Path, path: &str) -> Value {
    let (status, body) = http(sock, "GET", path, "").unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn start(config: &Path, log: &Path, sock: &Path) -> Child {
    let logf = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::from(logf))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some((200, _)) = http(sock, "GET", "/readyz", "") {
            return child;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "daemon exited with {status}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "daemon not ready:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// Every event, paging through the log.
fn all_events(sock: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = get_json(sock, &format!("/v1/events?after={after}&limit=1000"));
        let events = page["events"].as_array().unwrap();
        if events.is_empty() {
            return out;
        }
        out.extend(events.iter().cloned());
        after = page["next_after"].as_u64().unwrap();
    }
}

/// Requests in the usage export of yesterday to tomorrow (UTC), all pages.
fn history_requests(sock: &Path) -> u64 {
    let today = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC).date();
    let (from, to) = (today.yesterday().unwrap(), today.tomorrow().unwrap());
    let mut total = 0;
    let mut after = String::new();
    loop {
        let page = get_json(sock, &format!("/v1/usage?from={from}&to={to}&limit=1000{after}"));
        for row in page["rows"].as_array().unwrap() {
            total += row["amounts"]["requests"].as_u64().unwrap_or(0);
        }
        match page["next_after"].as_str() {
            Some(n) => after = format!("&after={n}"),
            None => return total,
        }
    }
}

fn used(sock: &Path, subject: &str) -> u64 {
    let v = get_json(sock, &format!("/v1/subjects/{subject}"));
    v["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["limit"] == "calls")
        .map_or(0, |c| c["used"].as_u64().unwrap())
}

#[test]
fn sigkill_never_splits_an_event_from_its_charge() {
    let restarts: usize = std::env::var("QUOTAD_CRASH_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("q.sock");
    let log = dir.path().join("daemon.log");
    let config = dir.path().join("quotad.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = ["unix:{}"]
[storage]
data_dir = "{}"
# Small, so snapshots (which move events into the snapshot file) happen mid-run.
snapshot_every_records = 1000
[[plans]]
name = "p"
default = true
  [[plans.limits]]
  name = "calls"
  period = "1d"
  max = 1
  alerts = [1.0]
"#,
            sock.display(),
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    // Subjects charged and acknowledged, over every round.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let attempted = Arc::new(Mutex::new(Vec::<String>::new()));
    let next = Arc::new(AtomicUsize::new(0));
    for round in 0..restarts {
        let mut child = start(&config, &log, &sock);
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let (sock, stop, next, acked, attempted) = (
                    sock.clone(),
                    stop.clone(),
                    next.clone(),
                    acked.clone(),
                    attempted.clone(),
                );
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let s = format!("s{}", next.fetch_add(1, Ordering::Relaxed));
                        attempted.lock().unwrap().push(s.clone());
                        let body = format!(r#"{{"subject":"{s}"}}"#);
                        if let Some((200, text)) = http(&sock, "POST", "/v1/consume", &body) {
                            assert!(text.contains("\"allowed\":true"), "{text}");
                            acked.lock().unwrap().push(s);
                        }
                    }
                })
            })
            .collect();
        // Over a second, so the snapshot check (every second) runs mid-round.
        std::thread::sleep(Duration::from_millis(1300 + 311 * (round as u64 % 3)));
        child.kill().unwrap(); // SIGKILL
        let _ = child.wait();
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }

        let child = start(&config, &log, &sock);
        let events = all_events(&sock);
        let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "round {round}: seq without gaps"
        );
        let with_event: std::collections::BTreeSet<String> = events
            .iter()
            .map(|e| e["subject"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(with_event.len(), events.len(), "round {round}: one event per subject");
        for s in acked.lock().unwrap().iter() {
            assert!(
                with_event.contains(s),
                "round {round}: acknowledged charge of {s} has no event"
            );
        }
        for s in attempted.lock().unwrap().iter() {
            let u = used(&sock, s);
            assert_eq!(
                u == 1,
                with_event.contains(s),
                "round {round}: {s} used {u}, event {}",
                with_event.contains(s)
            );
        }
        assert!(!events.is_empty(), "round {round}: some charges were made");
        // Usage history agrees: one request per charged subject, no more, no less.
        let charged = attempted
            .lock()
            .unwrap()
            .iter()
            .filter(|s| with_event.contains(*s))
            .count() as u64;
        assert_eq!(
            history_requests(&sock),
            charged,
            "round {round}: usage history sums what was charged"
        );
        let mut child = child;
        child.kill().unwrap();
        let _ = child.wait();
    }
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!(
        "signals crash loop: {} SIGKILL restarts, {} subjects charged, {} acknowledged, {} snapshots taken mid-run",
        restarts * 2,
        next.load(Ordering::Relaxed),
        acked.lock().unwrap().len(),
        log.matches("snapshot written").count()
    );
}

/// A receiver on 127.0.0.1 that answers every POST 200 after `delay`, and
/// records the `Quotad-Event-Id` of each in arrival order.
fn slow_receiver(delay: Duration) -> (String, Arc<Mutex<Vec<u64>>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            let g = g.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 8192];
                    let n = match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        if buf.len() < end + 4 + len {
                            break;
                        }
                        let id: u64 = head
                            .lines()
                            .find_map(|l| l.strip_prefix("quotad-event-id: evt_"))
                            .map(|v| v.trim().parse().unwrap())
                            .unwrap();
                        buf.drain(..end + 4 + len);
                        std::thread::sleep(delay);
                        g.lock().unwrap().push(id);
                        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, got)
}

#[test]
fn sigkill_during_webhook_delivery_repeats_at_most_the_event_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("q.sock");
    let log = dir.path().join("daemon.log");
    let config = dir.path().join("quotad.toml");
    let secret = dir.path().join("hook.secret");
    std::fs::write(&secret, "crash-test-webhook-secret").unwrap();
    let (addr, got) = slow_receiver(Duration::from_millis(20));
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = ["unix:{}"]
[storage]
data_dir = "{}"
[[plans]]
name = "p"
default = true
  [[plans.limits]]
  name = "calls"
  period = "1d"
  max = 1
  alerts = [1.0]
[[webhooks]]
name = "crash"
url = "http://{addr}/hook"
secret_file = "{}"
"#,
            sock.display(),
            dir.path().join("data").display(),
            secret.display()
        ),
    )
    .unwrap();
    let rounds = 3;
    let per_round = 40;
    let mut total = 0;
    for round in 0..rounds {
        let mut child = start(&config, &log, &sock);
        for i in 0..per_round {
            let body = format!(r#"{{"subject":"w{round}-{i}"}}"#);
            let (status, text) = http(&sock, "POST", "/v1/consume", &body).unwrap();
            assert_eq!(status, 200, "{text}");
        }
        total += per_round;
        // Kill while deliveries (20 ms each) are under way.
        std::thread::sleep(Duration::from_millis(150 + 70 * round as u64));
        child.kill().unwrap(); // SIGKILL
        let _ = child.wait();
    }
    // A last start delivers the rest.
    let mut child = start(&config, &log, &sock);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let hooks = get_json(&sock, "/v1/webhooks");
        if hooks["webhooks"][0]["delivered_seq"] == total as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "not delivered in time: {hooks}");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    let _ = child.wait();
    let got = got.lock().unwrap().clone();
    let mut dedup = got.clone();
    dedup.dedup();
    assert_eq!(
        dedup,
        (1..=total as u64).collect::<Vec<_>>(),
        "every event, in seq order: {got:?}"
    );
    let repeats = got.len() - dedup.len();
    assert!(
        repeats <= rounds,
        "{repeats} repeats over {rounds} kills: only the event in flight may be sent again"
    );
    eprintln!(
        "webhook crash test: {total} events, {} POSTs, {repeats} sent again over {rounds} SIGKILLs",
        got.len()
    );
}
