//! Crash loop against the real binary: client threads consume with idempotency
//! keys over a Unix socket, the daemon is killed with SIGKILL at a random moment,
//! restarted, and checked: for every counter, acknowledged ≤ value ≤ attempted.
//! Then every request whose outcome is unknown is retried with the same key, and
//! the counter must equal exactly the sum of acknowledged requests (no key
//! applied twice). A third of the clients pipeline: each sends 8 consumes on
//! one connection before reading answers, and counts as acknowledged only the
//! answers it read before the kill. CI runs a few restarts; `QUOTAD_CRASH_RESTARTS=200 cargo test
//! --release --test crash_loop -- --nocapture` is the long run.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_quotad");
/// Enough clients that the WAL writer's syncs reach the size at which it
/// gathers (8 records), so kills also land while it holds a batch.
const CLIENTS: usize = 12;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Outcome {
    Acked,
    Unknown,
}

#[derive(Default)]
struct Ledger {
    /// Per client: (key, amount, outcome).
    requests: Vec<Vec<(String, u64, Outcome)>>,
}

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
    Some((out.get(9..12)?.parse().ok()?, out))
}

fn start(config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap()
}

fn wait_ready(sock: &Path, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some((200, _)) = http(sock, "GET", "/readyz", "") {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "daemon exited with {status} during start:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!(
        "daemon not ready:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

fn used(sock: &Path, client: usize) -> u64 {
    let (status, text) = http(sock, "GET", &format!("/v1/subjects/c{client}"), "").unwrap();
    assert_eq!(status, 200, "{text}");
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["limit"] == "total")
        .unwrap()["used"]
        .as_u64()
        .unwrap()
}

fn consume(sock: &Path, client: usize, key: &str, amount: u64) -> Option<bool> {
    let body = format!(r#"{{"subject":"c{client}","amounts":{{"tokens":{amount}}},"idempotency_key":"{key}"}}"#);
    match http(sock, "POST", "/v1/consume", &body) {
        Some((200, text)) => Some(text.contains("\"replayed\":true")),
        _ => None,
    }
}

/// Requests a pipelining client sends at once.
const PIPELINE: usize = 8;

/// Whether client `c` pipelines.
fn pipelines(c: usize) -> bool {
    c % 3 == 2
}

/// Sends `reqs` (key, amount) on one connection in one write, then reads
/// answers in order: how many were answered 200 before the connection ended.
fn consume_pipelined(sock: &Path, client: usize, reqs: &[(String, u64)]) -> usize {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut out = String::new();
    for (key, amount) in reqs {
        let body = format!(r#"{{"subject":"c{client}","amounts":{{"tokens":{amount}}},"idempotency_key":"{key}"}}"#);
        out.push_str(&format!(
            "POST /v1/consume HTTP/1.1\r\nHost: q\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    }
    if s.write_all(out.as_bytes()).is_err() {
        return 0;
    }
    let mut r = BufReader::new(s);
    for answered in 0..reqs.len() {
        let mut status = String::new();
        if r.read_line(&mut status).unwrap_or(0) == 0 || !status.starts_with("HTTP/1.1 200") {
            return answered;
        }
        let mut length = None;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return answered;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse::<usize>().ok();
            }
        }
        let mut body = vec![0; length.unwrap_or(0)];
        if length.is_none() || r.read_exact(&mut body).is_err() {
            return answered;
        }
    }
    reqs.len()
}

/// Checks bounds, retries unknown outcomes, checks exactness.
fn settle(sock: &Path, ledger: &Mutex<Ledger>, round: usize) {
    let mut l = ledger.lock().unwrap();
    for (c, reqs) in l.requests.iter_mut().enumerate() {
        let acked: u64 = reqs.iter().filter(|r| r.2 == Outcome::Acked).map(|r| r.1).sum();
        let attempted: u64 = reqs.iter().map(|r| r.1).sum();
        let value = used(sock, c);
        assert!(
            acked <= value && value <= attempted,
            "round {round}, c{c}: {acked} <= {value} <= {attempted}"
        );
        for r in reqs.iter_mut().filter(|r| r.2 == Outcome::Unknown) {
            consume(sock, c, &r.0, r.1).unwrap_or_else(|| panic!("retry of {} failed", r.0));
            r.2 = Outcome::Acked;
        }
        let total: u64 = reqs.iter().map(|r| r.1).sum();
        assert_eq!(
            used(sock, c),
            total,
            "round {round}, c{c}: after retries every key applied exactly once"
        );
    }
}

#[test]
fn sigkill_loop_never_loses_or_repeats_an_acknowledged_consume() {
    let restarts: usize = std::env::var("QUOTAD_CRASH_RESTARTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let sock: PathBuf = dir.path().join("q.sock");
    let config = dir.path().join("q.toml");
    let log = dir.path().join("quotad.log");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"unix:{}\"]\n[storage]\ndata_dir = \"{}\"\nsnapshot_every_records = 1000\n\
             [[plans]]\nname = \"p\"\ndefault = true\n[[plans.limits]]\nname = \"total\"\nmetric = \"tokens\"\n\
             algorithm = \"lifetime\"\nmax = \"unlimited\"\n",
            sock.display(),
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let ledger = Arc::new(Mutex::new(Ledger {
        requests: vec![Vec::new(); CLIENTS],
    }));
    let mut seed: u64 = 0x5eed ^ std::process::id() as u64;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let started = Instant::now();
    let mut sent = 0usize;
    // Batches the writer held to gather, summed over the runs (read just
    // before each kill).
    let mut gathers = 0u64;
    for round in 0..restarts {
        let mut child = start(&config, &log);
        wait_ready(&sock, &mut child, &log);
        settle(&sock, &ledger, round);
        let threads: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (sock, ledger) = (sock.clone(), ledger.clone());
                std::thread::spawn(move || {
                    let mut n = 0;
                    while pipelines(c) {
                        let reqs: Vec<(String, u64)> = {
                            let mut l = ledger.lock().unwrap();
                            (0..PIPELINE)
                                .map(|_| {
                                    let i = l.requests[c].len();
                                    let (key, amount) = (format!("c{c}-{i}"), (i % 7 + 1) as u64);
                                    l.requests[c].push((key.clone(), amount, Outcome::Unknown));
                                    (key, amount)
                                })
                                .collect()
                        };
                        let answered = consume_pipelined(&sock, c, &reqs);
                        let mut l = ledger.lock().unwrap();
                        let from = l.requests[c].len() - PIPELINE;
                        for r in &mut l.requests[c][from..from + answered] {
                            r.2 = Outcome::Acked;
                        }
                        n += answered;
                        if answered < PIPELINE {
                            return n; // the daemon is gone
                        }
                    }
                    loop {
                        let (key, amount) = {
                            let mut l = ledger.lock().unwrap();
                            let i = l.requests[c].len();
                            let key = format!("c{c}-{i}");
                            let amount = (i % 7 + 1) as u64;
                            l.requests[c].push((key.clone(), amount, Outcome::Unknown));
                            (key, amount)
                        };
                        let ok = consume(&sock, c, &key, amount);
                        let mut l = ledger.lock().unwrap();
                        match ok {
                            Some(_) => l.requests[c].last_mut().unwrap().2 = Outcome::Acked,
                            None => return n, // the daemon is gone
                        }
                        n += 1;
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20 + rand(200)));
        gathers += http(&sock, "GET", "/metrics", "")
            .and_then(|(_, text)| {
                let line = text.lines().find(|l| l.starts_with("quotad_wal_gathers_total "))?;
                line.split_whitespace().nth(1)?.parse::<f64>().ok()
            })
            .unwrap_or(0.0) as u64;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for t in threads {
            sent += t.join().unwrap();
        }
    }
    let mut child = start(&config, &log);
    wait_ready(&sock, &mut child, &log);
    settle(&sock, &ledger, restarts);
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    let l = ledger.lock().unwrap();
    let total: usize = l.requests.iter().map(Vec::len).sum();
    let piped: usize = (0..CLIENTS)
        .filter(|&c| pipelines(c))
        .map(|c| l.requests[c].len())
        .sum();
    println!(
        "crash loop: {restarts} SIGKILL restarts, {total} requests ({piped} of them pipelined {PIPELINE} at a \
         time; {sent} acknowledged before a kill, {gathers} gathered batches seen), {:.1} s; every counter \
         within bounds after each restart and exact after retries",
        started.elapsed().as_secs_f64()
    );
}
