//! Jepsen-style: three real `quotad` processes on loopback, under load from
//! clients that retry every unknown outcome with the same idempotency key (on
//! the next node), while faults are injected: SIGKILL of the leader and of a
//! follower, SIGSTOP/SIGCONT of the leader past the election timeout, and a
//! partition that leaves the leader in the minority (peer traffic dropped at
//! the listeners, through the test hooks `QUOTAD_CLUSTER_TEST_HOOKS=1` turns
//! on). Then every node must reach the same digest, and the history must show
//! no acknowledged write lost, no capped counter past its max, no key counted
//! twice (every key asked again answers as it first did), events numbered
//! without gaps with engine time never going back, and each subject's history
//! linearizable (checked by [`check_counter`], itself tested on broken
//! histories).
//!
//! CI runs each fault once. `QUOTAD_CLUSTER_FAULTS=100 cargo test --release
//! --test cluster_faults -- --nocapture` runs 100, cycling through the kinds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_quotad");
const SECRET: &str = "fault-test-secret-0123456789";
/// The lifetime cap of each `capped:` subject: reached during the run, so
/// denials are part of the history. `open:` subjects have a cap never
/// reached, so writes go on through every fault.
const CAP: u64 = 40;
const OPEN_CAP: u64 = 1_000_000_000;
const SUBJECTS: usize = 4;
const WORKERS: usize = 6;
const ELECTION_MS: u64 = 500;

// ---------- the checker ----------

/// What one call came to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Counted: the counter's `used` after it.
    Allowed(u64),
    /// Refused at the cap: `used` as the answer showed it.
    Denied(u64),
    /// No definite answer before the client gave up.
    Unknown,
}

/// One call: when it was sent (first attempt) and answered (last attempt),
/// in µs since the start.
#[derive(Debug, Clone)]
struct Op {
    key: String,
    invoke: u64,
    complete: u64,
    outcome: Outcome,
}

/// Checks one subject's history against a capped counter that every allowed
/// consume raises by one, `final_used` read after the run. Returns what is
/// wrong, if anything.
///
/// Each allowed call returns a distinct `used` (1, 2, …), so a history is
/// linearizable exactly when that order agrees with real time: a call that
/// finished before another began must have the smaller `used`, and a denial
/// (the cap reached, for good) must not precede an allowed call.
fn check_counter(ops: &[Op], cap: u64, final_used: u64) -> Vec<String> {
    let mut errors = Vec::new();
    let allowed: Vec<&Op> = ops
        .iter()
        .filter(|o| matches!(o.outcome, Outcome::Allowed(_)))
        .collect();
    let used = |o: &Op| match o.outcome {
        Outcome::Allowed(u) | Outcome::Denied(u) => u,
        Outcome::Unknown => 0,
    };
    let unknown = ops.iter().filter(|o| o.outcome == Outcome::Unknown).count() as u64;
    let mut seen = BTreeMap::new();
    for o in &allowed {
        if let Some(other) = seen.insert(used(o), &o.key) {
            errors.push(format!("{} and {} both counted as used = {}", other, o.key, used(o)));
        }
        if used(o) > cap {
            errors.push(format!(
                "{} was allowed at used = {} past the cap {cap}",
                o.key,
                used(o)
            ));
        }
    }
    for o in ops.iter().filter(|o| matches!(o.outcome, Outcome::Denied(_))) {
        if used(o) < cap {
            errors.push(format!(
                "{} was denied at used = {} below the cap {cap}",
                o.key,
                used(o)
            ));
        }
    }
    let acked = allowed.len() as u64;
    if final_used < acked {
        errors.push(format!(
            "{acked} calls were acknowledged but only {final_used} are counted: writes were lost"
        ));
    }
    if final_used > acked + unknown {
        errors.push(format!(
            "{final_used} are counted but only {acked} were acknowledged and {unknown} are unknown: something was \
             counted that nobody asked for, or twice"
        ));
    }
    if final_used > cap {
        errors.push(format!("the counter ended at {final_used}, past the cap {cap}"));
    }
    // Real-time order: sweep calls by invocation, knowing the largest
    // `used` (and whether a denial) among calls that completed before.
    let mut by_complete: Vec<&Op> = ops.iter().filter(|o| o.outcome != Outcome::Unknown).collect();
    by_complete.sort_by_key(|o| o.complete);
    let mut by_invoke: Vec<&Op> = allowed.clone();
    by_invoke.sort_by_key(|o| o.invoke);
    let (mut i, mut max_before, mut denied_before) = (0, (0, ""), None::<&str>);
    for b in by_invoke {
        while i < by_complete.len() && by_complete[i].complete < b.invoke {
            let a = by_complete[i];
            match a.outcome {
                Outcome::Allowed(u) if u > max_before.0 => max_before = (u, &a.key),
                Outcome::Denied(_) => denied_before = denied_before.or(Some(&a.key)),
                _ => {}
            }
            i += 1;
        }
        if max_before.0 >= used(b) {
            errors.push(format!(
                "not linearizable: {} (used = {}) finished before {} (used = {}) began",
                max_before.1,
                max_before.0,
                b.key,
                used(b)
            ));
        }
        if let Some(d) = denied_before {
            errors.push(format!(
                "not linearizable: {d} was denied at the cap before {} was allowed",
                b.key
            ));
        }
    }
    errors
}

fn op(key: &str, invoke: u64, complete: u64, outcome: Outcome) -> Op {
    Op {
        key: key.into(),
        invoke,
        complete,
        outcome,
    }
}

#[test]
fn the_checker_passes_a_good_history_and_catches_broken_ones() {
    let good = [
        op("a", 0, 10, Outcome::Allowed(1)),
        op("b", 5, 20, Outcome::Allowed(3)),
        op("c", 6, 15, Outcome::Allowed(2)),
        op("d", 30, 40, Outcome::Denied(3)),
        op("e", 31, 50, Outcome::Unknown),
    ];
    assert_eq!(check_counter(&good, 3, 3), Vec::<String>::new());
    // A stale read: b began after a finished but saw an older count.
    let stale = [
        op("a", 0, 10, Outcome::Allowed(2)),
        op("b", 11, 20, Outcome::Allowed(1)),
    ];
    assert!(check_counter(&stale, 5, 2)[0].contains("not linearizable"));
    // Two keys counted as the same step.
    let twice = [op("a", 0, 10, Outcome::Allowed(1)), op("b", 0, 10, Outcome::Allowed(1))];
    assert!(check_counter(&twice, 5, 2).iter().any(|e| e.contains("both counted")));
    // An acknowledged write missing from the final count.
    let lost = [
        op("a", 0, 10, Outcome::Allowed(1)),
        op("b", 11, 20, Outcome::Allowed(2)),
    ];
    assert!(check_counter(&lost, 5, 1)[0].contains("lost"));
    // More counted than asked for.
    let phantom = [op("a", 0, 10, Outcome::Allowed(1))];
    assert!(check_counter(&phantom, 5, 2)[0].contains("nobody asked"));
    // Past the cap, and a denial below it.
    let over = [
        op("a", 0, 10, Outcome::Allowed(1)),
        op("b", 11, 20, Outcome::Allowed(2)),
    ];
    assert!(check_counter(&over, 1, 2).iter().any(|e| e.contains("past the cap")));
    let early = [op("a", 0, 10, Outcome::Denied(0))];
    assert!(check_counter(&early, 1, 0)[0].contains("below the cap"));
    // Allowed after a denial at the cap had finished.
    let revived = [op("a", 0, 10, Outcome::Denied(1)), op("b", 11, 20, Outcome::Allowed(2))];
    assert!(check_counter(&revived, 2, 2)
        .iter()
        .any(|e| e.contains("denied at the cap before")));
}

// ---------- the cluster ----------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

struct Proc {
    id: u64,
    api: u16,
    raft: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("QUOTAD_CLUSTER_TEST_HOOKS", "1")
            .env("RUST_LOG", "warn,openraft=error")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("quotad starts");
        self.child = Some(child);
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.api)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal("-CONT");
        self.kill();
    }
}

struct Cluster {
    _dir: tempfile::TempDir,
    procs: Vec<Proc>,
    /// Each node's OpenAI gateway and Envoy rate limit service ports.
    gateways: Vec<(u16, u16)>,
    /// Where the gateways' upstream is expected (nothing listens unless a
    /// test starts it).
    upstream: u16,
    http: reqwest::Client,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("dir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, SECRET).expect("secret");
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let gateways: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let upstream = free_port();
        let peers: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (api, raft))| {
                format!(
                    "{{ id = {}, raft = \"127.0.0.1:{raft}\", api = \"http://127.0.0.1:{api}\" }}",
                    i + 1
                )
            })
            .collect();
        let mut procs = Vec::new();
        for (i, (api, raft)) in ports.iter().enumerate() {
            let id = i as u64 + 1;
            let config = dir.path().join(format!("node{id}.toml"));
            std::fs::write(
                &config,
                format!(
                    r#"
[server]
listen = ["127.0.0.1:{api}"]
[storage]
data_dir = "{data}"
snapshot_every_records = 1000
[policy]
source = "api"
[cluster]
node_id = {id}
raft_listen = "127.0.0.1:{raft}"
secret_file = "{secret}"
peers = [{peers}]
heartbeat = "50ms"
election_timeout = "{ELECTION_MS}ms"
[gateway]
listen = ["127.0.0.1:{gateway}"]
grpc_listen = "127.0.0.1:{grpc}"
[[gateway.upstreams]]
name = "fake"
base_url = "http://127.0.0.1:{upstream}/v1"
models = ["*"]
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "capped"
  match = {{ event = "capped" }}
  algorithm = "lifetime"
  max = {CAP}
  alerts = [0.5, 1.0]
  [[plans.limits]]
  name = "open"
  match = {{ event = "open" }}
  algorithm = "lifetime"
  max = {OPEN_CAP}
  [[plans.limits]]
  name = "gateway-tokens"
  metric = "tokens"
  match = {{ event = "llm.chat" }}
  algorithm = "lifetime"
  max = {OPEN_CAP}
"#,
                    gateway = gateways[i].0,
                    grpc = gateways[i].1,
                    data = dir.path().join(format!("node{id}")).display(),
                    secret = secret.display(),
                    peers = peers.join(", "),
                ),
            )
            .expect("config");
            let mut p = Proc {
                id,
                api: *api,
                raft: *raft,
                config,
                log: dir.path().join(format!("node{id}.log")),
                child: None,
            };
            p.start();
            procs.push(p);
        }
        Cluster {
            _dir: dir,
            procs,
            gateways,
            upstream,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("client"),
        }
    }

    async fn get(&self, i: usize, path: &str) -> Option<Value> {
        let r = self.http.get(self.procs[i].url(path)).send().await.ok()?;
        if !r.status().is_success() {
            return None;
        }
        serde_json::from_slice(&r.bytes().await.ok()?).ok()
    }

    /// Waits (up to 30 s) until every running node has recovered, answers
    /// as a member of the cluster and knows the leader (a node that does not
    /// yet rightly answers 503, retry).
    async fn all_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0..self.procs.len() {
            while self.procs[i].child.is_some()
                && self
                    .get(i, "/v1/cluster")
                    .await
                    .is_none_or(|v| v["leader"]["id"].as_u64().is_none())
            {
                assert!(
                    Instant::now() < deadline,
                    "node {i} is not up within 30 s; logs: {}",
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// The index of the node that leads and takes writes, waiting up to 30 s.
    async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for i in 0..self.procs.len() {
                if self.procs[i].child.is_none() {
                    continue;
                }
                if let Some(v) = self.get(i, "/v1/cluster").await {
                    if v["serving"] == true {
                        return i;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no leader within 30 s; logs: {}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Cuts peer traffic between node `i` and the others (or heals it all).
    async fn isolate(&self, i: Option<usize>) {
        for (j, p) in self.procs.iter().enumerate() {
            let drop: Vec<u64> = match i {
                None => vec![],
                Some(i) if i == j => self.procs.iter().filter(|q| q.id != p.id).map(|q| q.id).collect(),
                Some(i) => vec![self.procs[i].id],
            };
            let _ = self
                .http
                .post(format!("http://127.0.0.1:{}/raft/test/isolate", p.raft))
                .header("quotad-cluster-secret", SECRET)
                .body(serde_json::to_vec(&drop).expect("json"))
                .send()
                .await;
        }
    }

    fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                format!(
                    "\n--- node {} ---\n{}",
                    p.id,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect()
    }
}

/// A consume with `key`, sent to node after node until one answers 200 or 20 s pass.
async fn call(http: &reqwest::Client, urls: &[String], start_node: usize, subject: &str, key: &str) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(20);
    let event = subject.split(':').next().expect("kind:n");
    let body = json!({"subject": subject, "event": event, "idempotency_key": key});
    for attempt in 0.. {
        if Instant::now() > deadline {
            return Outcome::Unknown;
        }
        let url = &urls[(start_node + attempt) % urls.len()];
        let req = http
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_string());
        match req.send().await {
            Ok(r) if r.status() == 200 => {
                let Ok(bytes) = r.bytes().await else { continue };
                let v: Value = serde_json::from_slice(&bytes).expect("a 200 is JSON");
                let used = v["counters"][0]["used"].as_u64().expect("used");
                return if v["allowed"] == true {
                    Outcome::Allowed(used)
                } else {
                    Outcome::Denied(used)
                };
            }
            Ok(r) if r.status() == 503 => {}
            Ok(r) => panic!("unexpected answer {} to {key}: {:?}", r.status(), r.text().await),
            Err(_) => {} // unknown outcome: the same key again, elsewhere
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    unreachable!()
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillLeader,
    KillFollower,
    PauseLeader,
    PartitionLeader,
}

const FAULTS: [Fault; 4] = [
    Fault::KillLeader,
    Fault::PartitionLeader,
    Fault::PauseLeader,
    Fault::KillFollower,
];

async fn inject(c: &mut Cluster, fault: Fault) {
    let l = c.leader().await;
    let pause = Duration::from_millis(ELECTION_MS * 3);
    match fault {
        Fault::KillLeader => {
            c.procs[l].kill();
            tokio::time::sleep(pause).await;
            c.procs[l].start();
        }
        Fault::KillFollower => {
            let f = (l + 1) % c.procs.len();
            c.procs[f].kill();
            tokio::time::sleep(pause).await;
            c.procs[f].start();
        }
        Fault::PauseLeader => {
            c.procs[l].signal("-STOP");
            tokio::time::sleep(pause).await;
            c.procs[l].signal("-CONT");
        }
        Fault::PartitionLeader => {
            c.isolate(Some(l)).await;
            tokio::time::sleep(pause).await;
            c.isolate(None).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_write_is_lost_under_faults() {
    let faults: usize = std::env::var("QUOTAD_CLUSTER_FAULTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(FAULTS.len());
    let mut c = Cluster::start();
    c.leader().await;
    let urls: Vec<String> = c.procs.iter().map(|p| p.url("/v1/consume")).collect();
    let started = Instant::now();
    let history: Arc<Mutex<BTreeMap<String, Vec<Op>>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (urls, history, stop, http) = (urls.clone(), history.clone(), stop.clone(), c.http.clone());
        workers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                // One call in four to a capped subject.
                let kind = if n % 4 == 0 { "capped" } else { "open" };
                let subject = format!("{kind}:{}", (w + n) % SUBJECTS);
                let key = format!("w{w}-{n}");
                let invoke = started.elapsed().as_micros() as u64;
                let outcome = call(&http, &urls, w + n, &subject, &key).await;
                let complete = started.elapsed().as_micros() as u64;
                history.lock().unwrap().entry(subject).or_default().push(Op {
                    key,
                    invoke,
                    complete,
                    outcome,
                });
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    for i in 0..faults {
        let fault = FAULTS[i % FAULTS.len()];
        eprintln!("fault {}/{faults}: {fault:?}", i + 1);
        inject(&mut c, fault).await;
        tokio::time::sleep(Duration::from_millis(ELECTION_MS * 2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    c.isolate(None).await;

    // Every node reaches the same state.
    let deadline = Instant::now() + Duration::from_secs(30);
    let digests = loop {
        let mut views = Vec::new();
        for i in 0..c.procs.len() {
            let lsn = c.get(i, "/v1/cluster").await.map(|v| v["applied_lsn"].clone());
            let digest = c.get(i, "/v1/admin/digest").await;
            views.push((lsn, digest));
        }
        let same = views.iter().all(|v| v.0.is_some() && *v == views[0]);
        if same {
            break views;
        }
        assert!(
            Instant::now() < deadline,
            "nodes did not converge: {views:?}{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("converged at {:?}", digests[0]);

    // The cluster figures are on /metrics (of a cluster node only).
    let metrics = c
        .http
        .get(c.procs[c.leader().await].url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for want in [
        "quotad_cluster_role{role=\"leader\"} 1",
        "quotad_cluster_term ",
        "quotad_cluster_commit_lsn ",
    ] {
        assert!(metrics.contains(want), "/metrics lacks {want}");
    }
    assert!(
        metrics.contains("quotad_cluster_peer_lag{peer="),
        "/metrics lacks the peers' lag"
    );

    // The history per subject.
    let history = history.lock().unwrap().clone();
    let l = c.leader().await;
    let mut errors = Vec::new();
    let mut totals = (0, 0, 0);
    for (subject, ops) in &history {
        let view = c.get(l, &format!("/v1/subjects/{subject}")).await.expect("subject");
        let (limit, cap) = if subject.starts_with("capped") {
            ("capped", CAP)
        } else {
            ("open", OPEN_CAP)
        };
        let final_used = view["counters"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["limit"] == limit))
            .and_then(|c| c["used"].as_u64())
            .unwrap_or(0);
        for e in check_counter(ops, cap, final_used) {
            errors.push(format!("{subject}: {e}"));
        }
        for o in ops {
            match o.outcome {
                Outcome::Allowed(_) => totals.0 += 1,
                Outcome::Denied(_) => totals.1 += 1,
                Outcome::Unknown => totals.2 += 1,
            }
        }
        // Every key asked again answers as it first did: counted once.
        for o in ops.iter().filter(|o| o.outcome != Outcome::Unknown) {
            let again = call(&c.http, &urls, 0, subject, &o.key).await;
            if again != o.outcome {
                errors.push(format!(
                    "{subject}: {} answered {:?}, asked again {again:?}",
                    o.key, o.outcome
                ));
            }
        }
    }
    eprintln!(
        "{} calls: {} allowed, {} denied, {} unknown",
        totals.0 + totals.1 + totals.2,
        totals.0,
        totals.1,
        totals.2
    );
    assert!(totals.0 > 0 && totals.1 > 0, "the run reached the caps: {totals:?}");

    // Events: one gap-free seq, engine time never back, the same on every node.
    let events = c.get(l, "/v1/events?limit=1000").await.expect("events");
    let events = events["events"].as_array().expect("events").clone();
    let mut last_at = None;
    for (i, e) in events.iter().enumerate() {
        if e["seq"].as_u64() != Some(i as u64 + 1) {
            errors.push(format!("event {i} has seq {}", e["seq"]));
        }
        let at: jiff::Timestamp = e["at"].as_str().expect("at").parse().expect("a time");
        if last_at.is_some_and(|l| at < l) {
            errors.push(format!("event {} went back in time", e["seq"]));
        }
        last_at = Some(at);
    }
    let crossed: BTreeSet<(String, String)> = events
        .iter()
        .filter(|e| e["type"] == "threshold.crossed")
        .map(|e| (e["subject"].to_string(), e["threshold"].to_string()))
        .collect();
    if crossed.len() != events.iter().filter(|e| e["type"] == "threshold.crossed").count() {
        errors.push("a threshold was crossed twice".into());
    }
    assert!(
        errors.is_empty(),
        "{} problems:\n{}\n{}",
        errors.len(),
        errors.join("\n"),
        c.logs()
    );
}

/// The membership endpoints over HTTP, sent to a follower (which forwards):
/// bad input gets a JSON error naming the field, a removed node leaves the
/// member list and the two left still take writes, and the node added back
/// catches up to the same digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_removed_and_added_back_over_http() {
    let c = Cluster::start();
    let l = c.leader().await;
    // The follower asked below must be up, not still starting.
    c.all_up().await;
    let f = (l + 1) % 3;
    let other = (l + 2) % 3;
    let send = |req: reqwest::RequestBuilder| async move {
        let r = req.send().await.expect("answer");
        let status = r.status().as_u16();
        let v: Value = serde_json::from_slice(&r.bytes().await.expect("body")).expect("a JSON body");
        (status, v)
    };
    let names = |v: &Value, field: &str| {
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with(&format!("{field}: ")))
    };

    for (path, field) in [("abc", "id"), ("0", "id"), ("null%2Cnull", "id")] {
        let (s, v) = send(c.http.delete(c.procs[f].url(&format!("/v1/cluster/members/{path}")))).await;
        assert_eq!(s, 400, "{path}: {v}");
        assert!(names(&v, field), "{path}: {v}");
    }
    let (s, v) = send(c.http.delete(c.procs[f].url("/v1/cluster/members/9"))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("unknown_node")), "{v}");
    for (body, field) in [
        (
            json!({"id": 0, "raft": "127.0.0.1:1", "api": "http://127.0.0.1:2"}),
            "id",
        ),
        (json!({"id": 4, "raft": "nowhere", "api": "http://127.0.0.1:2"}), "raft"),
        (json!({"id": 4, "raft": "127.0.0.1:1", "api": "ftp://x"}), "api"),
    ] {
        let (s, v) = send(
            c.http
                .post(c.procs[f].url("/v1/cluster/members"))
                .header("content-type", "application/json")
                .body(body.to_string()),
        )
        .await;
        assert_eq!(s, 400, "{body}: {v}");
        assert!(names(&v, field), "{body}: {v}");
    }

    // Forward-auth through a follower: decided by the leader.
    let r = c
        .http
        .get(c.procs[f].url("/v1/authorize"))
        .header("x-quotad-subject", "open:9")
        .header("x-quotad-event", "open")
        .send()
        .await
        .expect("authorize");
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["quotad-node"], c.procs[l].id.to_string().as_str());

    // Remove `other` through the follower.
    let gone = c.procs[other].id;
    let (s, v) = send(c.http.delete(c.procs[f].url(&format!("/v1/cluster/members/{gone}")))).await;
    assert_eq!(s, 200, "{v}");
    let ids: Vec<u64> = v["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["id"].as_u64())
        .collect();
    assert!(!ids.contains(&gone), "node {gone} is still listed: {v}");
    let urls = [c.procs[l].url("/v1/consume"), c.procs[f].url("/v1/consume")];
    for n in 0..5 {
        let out = call(&c.http, &urls, n, "open:0", &format!("two-{n}")).await;
        assert!(
            matches!(out, Outcome::Allowed(_)),
            "two nodes still take writes: {out:?}"
        );
    }

    // Add it back: it catches up.
    let p = &c.procs[other];
    let body =
        json!({"id": p.id, "raft": format!("127.0.0.1:{}", p.raft), "api": format!("http://127.0.0.1:{}", p.api)});
    let (s, v) = send(
        c.http
            .post(c.procs[f].url("/v1/cluster/members"))
            .header("content-type", "application/json")
            .body(body.to_string()),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = c.get(l, "/v1/admin/digest").await;
        let b = c.get(other, "/v1/admin/digest").await;
        if a.is_some() && a == b {
            break;
        }
        assert!(Instant::now() < deadline, "node {} did not catch up{}", p.id, c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The OpenAI gateway and Envoy's rate limit service on a follower: the
/// leader decides (the follower's engine takes no writes), the gateway's
/// commit reaches the leader's counters with the upstream's usage, and a
/// failed upstream call's hold is released there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_and_envoys_service_on_a_follower_ask_the_leader() {
    use axum::routing::post;
    use quotad::gateway::envoy::pb::envoy::extensions::common::ratelimit::v3::{
        rate_limit_descriptor::Entry, RateLimitDescriptor,
    };
    use quotad::gateway::envoy::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
    use quotad::gateway::envoy::pb::envoy::service::ratelimit::v3::RateLimitRequest;

    let c = Cluster::start();
    let upstream = tokio::net::TcpListener::bind(("127.0.0.1", c.upstream))
        .await
        .expect("bind upstream");
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(|body: String| async move {
            let v: Value = serde_json::from_str(&body).unwrap_or_default();
            if v["model"] == "fail" {
                return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "{}".to_string());
            }
            let answer = json!({
                "id": "c1", "object": "chat.completion", "model": v["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
            });
            (axum::http::StatusCode::OK, answer.to_string())
        }),
    );
    let server = tokio::spawn(async move {
        let _ = axum::serve(upstream, app).await;
    });
    let l = c.leader().await;
    c.all_up().await;
    let f = (l + 1) % 3;
    let leader_used = |subject: &'static str, limit: &'static str| {
        let c = &c;
        async move {
            let v = c.get(l, &format!("/v1/subjects/{subject}")).await.expect("subject");
            v["counters"]
                .as_array()
                .and_then(|cs| cs.iter().find(|x| x["limit"] == limit))
                .and_then(|x| x["used"].as_u64())
                .unwrap_or(0)
        }
    };

    let chat = |model: &str| {
        c.http
            .post(format!("http://127.0.0.1:{}/v1/chat/completions", c.gateways[f].0))
            .header("x-quotad-subject", "gw-user")
            .header("content-type", "application/json")
            .body(
                json!({"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "hello"}]})
                    .to_string(),
            )
            .send()
    };
    let r = chat("any").await.expect("gateway answers");
    assert_eq!(r.status(), 200, "{}", c.logs());
    assert!(r.headers().contains_key("x-quotad-reservation"));
    // Committed on the leader with the usage: 7 + 5, not the 100+ held.
    assert_eq!(leader_used("gw-user", "gateway-tokens").await, 12);
    let r = chat("fail").await.expect("gateway answers");
    assert_eq!(r.status(), 500);
    assert_eq!(
        leader_used("gw-user", "gateway-tokens").await,
        12,
        "the failed call's hold is released"
    );

    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", c.gateways[f].1))
        .expect("uri")
        .connect()
        .await
        .expect("grpc connects");
    let mut rls = RateLimitServiceClient::new(channel);
    let ask = RateLimitRequest {
        domain: "capped".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: "subject".into(),
                value: "rls-user".into(),
            }],
            ..Default::default()
        }],
        hits_addend: 3,
    };
    let answer = rls.should_rate_limit(ask).await.expect("decided").into_inner();
    assert_eq!(answer.statuses[0].limit_remaining as u64, CAP - 3);
    assert_eq!(leader_used("rls-user", "capped").await, 3);
    server.abort();
}
