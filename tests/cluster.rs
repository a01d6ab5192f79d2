//! Three cluster nodes in one process, on loopback: a leader is elected,
//! its decisions reach every follower's engine (the same digest), followers
//! decide nothing themselves, and after the leader stops the other two
//! elect a new one that carries on from the same state.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quotad::cluster::state_machine::Compile;
use quotad::cluster::types::Peer;
use quotad::cluster::{Node, NodeOptions};
use quotad::config::Config;
use quotad::engine::{DecideOp, DecisionRequest, Policy};

const CONFIG: &str = r#"
[engine]
shards = 4
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "daily"
  period = "1d"
  max = 1000
"#;

fn config() -> Config {
    Config::from_toml(CONFIG, "cluster.toml").expect("config")
}

fn compile() -> Compile {
    let config = config();
    Arc::new(move |v| {
        let doc = v.policy_doc()?;
        Policy::compile(&doc, &config).map_err(|e| format!("{}: {}", e.key, e.message))
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

struct Cluster {
    dirs: Vec<tempfile::TempDir>,
    options: Vec<NodeOptions>,
    nodes: Vec<Option<Node>>,
}

impl Cluster {
    async fn start(n: usize) -> Cluster {
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let peers: BTreeMap<u64, Peer> = ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (
                    i as u64 + 1,
                    Peer {
                        raft: format!("127.0.0.1:{p}"),
                        api: format!("http://127.0.0.1:{}", 9000 + i),
                    },
                )
            })
            .collect();
        let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().expect("dir")).collect();
        let options: Vec<NodeOptions> = (0..n)
            .map(|i| NodeOptions {
                node_id: i as u64 + 1,
                raft_listen: format!("127.0.0.1:{}", ports[i]).parse().expect("addr"),
                secret: Arc::from(&b"test-secret"[..]),
                peers: peers.clone(),
                heartbeat: Duration::from_millis(50),
                election_timeout: Duration::from_millis(300),
                snapshot_every: 100,
                logs_kept: 10,
                data_dir: dirs[i].path().to_path_buf(),
                segment_bytes_max: 1 << 20,
                test_hooks: true,
                exit_on_fatal: false,
            })
            .collect();
        let mut c = Cluster {
            dirs,
            options,
            nodes: Vec::new(),
        };
        for i in 0..n {
            let node = c.boot(i).await;
            c.nodes.push(Some(node));
        }
        c
    }

    /// Starts one more node on an empty directory, not among the initial peers.
    async fn add_node(&mut self) {
        let mut o = self.options[0].clone();
        let dir = tempfile::tempdir().expect("dir");
        o.node_id = self.options.len() as u64 + 1;
        o.raft_listen = "127.0.0.1:0".parse().expect("addr");
        o.data_dir = dir.path().to_path_buf();
        self.dirs.push(dir);
        self.options.push(o);
        let node = self.boot(self.options.len() - 1).await;
        self.nodes.push(Some(node));
    }

    async fn boot(&self, i: usize) -> Node {
        let policy = Policy::from_config(&config()).expect("policy");
        Node::start(self.options[i].clone(), policy, compile())
            .await
            .expect("node starts")
    }

    /// The index of the node that leads and takes writes, waiting up to 10 s.
    async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(i) = self.nodes.iter().position(|n| n.as_ref().is_some_and(Node::serving)) {
                return i;
            }
            assert!(Instant::now() < deadline, "no leader within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every running node has applied what node `i` has, then
    /// checks that their digests are equal.
    async fn converged(&self, i: usize, now: u64) {
        let want = self.nodes[i].as_ref().expect("running").state_machine.applied_lsn();
        let deadline = Instant::now() + Duration::from_secs(10);
        for n in self.nodes.iter().flatten() {
            while n.state_machine.applied_lsn() < want {
                assert!(Instant::now() < deadline, "node {} did not catch up", n.options.node_id);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let d0 = self.nodes[i].as_ref().expect("running").engine.digest(now);
        for n in self.nodes.iter().flatten() {
            assert_eq!(n.engine.digest(now), d0, "node {} differs", n.options.node_id);
        }
    }
}

fn consume(subject: &str, key: Option<String>) -> DecisionRequest {
    DecisionRequest {
        subject: subject.into(),
        event: None,
        attributes: BTreeMap::new(),
        amounts: BTreeMap::new(),
        idempotency_key: key,
        ttl_ms: None,
        priority: None,
    }
}

impl Cluster {
    /// Consumes on whichever node leads and waits until it is committed,
    /// retrying with the same key as a client would when the outcome is
    /// unknown (leadership moved mid-call); returns the counter's `used`.
    async fn decide(&self, subject: &str, key: &str, now: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let node = self.nodes[self.leader().await].as_ref().expect("running");
            let req = consume(subject, Some(key.to_string()));
            let outcome = match node.engine.decide(DecideOp::Consume, &req, now) {
                Ok(applied) => match applied.lsn {
                    Some(lsn) => node
                        .engine
                        .durable_watch()
                        .wait(lsn)
                        .await
                        .map(|()| applied)
                        .map_err(|e| e.to_string()),
                    None => Ok(applied),
                },
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(applied) => return applied.value.counters[0].used,
                Err(e) => {
                    assert!(Instant::now() < deadline, "no answer for {key} within 20 s: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_decisions_and_survive_the_leader() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut c = Cluster::start(3).await;
    let now = 1_800_000_000_000;
    for i in 0..150 {
        c.decide(&format!("user:{}", i % 5), &format!("k{i}"), now + i).await;
    }
    let l = c.leader().await;
    c.converged(l, now + 1000).await;

    // A follower takes no writes of its own.
    let f = (l + 1) % 3;
    let follower = c.nodes[f].as_ref().expect("running");
    let err = follower
        .engine
        .decide(DecideOp::Consume, &consume("user:0", None), now + 200)
        .expect_err("a follower refuses");
    assert!(err.to_string().contains("leader"), "{err}");

    // The leader stops: the other two elect one and carry on.
    c.nodes[l].take().expect("running").shutdown().await;
    let l2 = c.leader().await;
    assert_ne!(l2, l);
    let used = c.decide("user:0", "after", now + 2000).await;
    assert_eq!(used, 31, "30 before the failover, and this one");
    // A retry of a key decided before the failover is answered, not counted.
    let used = c.decide("user:0", "k0", now + 2001).await;
    assert_eq!(used, 1, "the stored answer of k0");
    let l2 = c.leader().await;
    c.converged(l2, now + 3000).await;

    // The old leader comes back and catches up (from the log, or a snapshot).
    let node = c.boot(l).await;
    c.nodes[l] = Some(node);
    c.converged(l2, now + 3000).await;

    // A fourth node on an empty directory is added: the log before the last
    // snapshot is purged, so it starts from an installed snapshot.
    c.add_node().await;
    let l = c.leader().await;
    let peer = Peer {
        raft: c.nodes[3].as_ref().expect("running").raft_addr.to_string(),
        api: "http://127.0.0.1:9003".into(),
    };
    c.nodes[l]
        .as_ref()
        .expect("running")
        .add_member(4, peer)
        .await
        .expect("added");
    let used = c.decide("user:1", "with-four", now + 4000).await;
    assert_eq!(used, 31);
    c.converged(l, now + 5000).await;
    let snapshot = c.nodes[3].as_ref().expect("running").raft.metrics().borrow().snapshot;
    assert!(snapshot.is_some(), "the new node installed a snapshot");
    for n in c.nodes.into_iter().flatten() {
        n.shutdown().await;
    }
    drop(c.dirs);
}

/// A leader cut off from the others takes a write it can never commit: once
/// it has not heard from a majority for an election timeout, that write's
/// caller is told its outcome is unknown, the node takes no more writes and
/// goes back to committed state. The majority elects a new leader and goes
/// on; when the partition heals, the old leader drops the record that never
/// committed and ends with the same state as the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_gives_up_what_never_committed() {
    let c = Cluster::start(3).await;
    let now = 1_800_000_000_000;
    for i in 0..20 {
        c.decide("user:a", &format!("k{i}"), now + i).await;
    }
    let l = c.leader().await;
    let others: Vec<u64> = (1..=3).filter(|&id| id != l as u64 + 1).collect();
    let old = c.nodes[l].as_ref().expect("running");
    old.isolate(others.clone());
    for n in c.nodes.iter().flatten().filter(|n| n.options.node_id != l as u64 + 1) {
        n.isolate([l as u64 + 1]);
    }
    let applied = old
        .engine
        .decide(DecideOp::Consume, &consume("user:a", Some("lost".into())), now + 100)
        .expect("still leads when asked");
    assert_eq!(applied.value.counters[0].used, 21, "applied on the old leader");
    let waited = tokio::time::timeout(
        Duration::from_secs(10),
        old.engine.durable_watch().wait(applied.lsn.expect("journaled")),
    )
    .await
    .expect("the wait ends");
    let err = waited.expect_err("never committed");
    assert!(err.to_string().contains("outcome is unknown"), "{err}");
    assert!(!old.serving(), "the old leader takes no writes");
    // Its engine goes back to what was committed (rebuilt just after the
    // waiters are told).
    let deadline = Instant::now() + Duration::from_secs(10);
    while old.engine.subject("user:a", now + 100).expect("subject").counters[0].used != 20 {
        assert!(Instant::now() < deadline, "the old leader was not rebuilt");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The majority goes on without it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let new = loop {
        if let Some(n) = c
            .nodes
            .iter()
            .flatten()
            .find(|n| n.serving() && n.options.node_id != l as u64 + 1)
        {
            break n;
        }
        assert!(Instant::now() < deadline, "no new leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let applied = new
        .engine
        .decide(DecideOp::Consume, &consume("user:a", Some("won".into())), now + 200)
        .expect("the new leader decides");
    new.engine
        .durable_watch()
        .wait(applied.lsn.expect("journaled"))
        .await
        .expect("committed");
    assert_eq!(applied.value.counters[0].used, 21);

    // Healed: everyone ends with the new leader's state.
    for n in c.nodes.iter().flatten() {
        n.isolate([]);
    }
    let nl = c
        .nodes
        .iter()
        .position(|n| n.as_ref().is_some_and(|n| n.options.node_id == new.options.node_id));
    c.converged(nl.expect("found"), now + 1000).await;
    for n in c.nodes.into_iter().flatten() {
        n.shutdown().await;
    }
}
