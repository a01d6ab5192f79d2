//! Clusters: three or five quotad nodes holding one state through Raft
//! (openraft). The leader decides exactly as a single node does; the record
//! its engine writes becomes a Raft entry, and followers apply it through
//! the replay path (effects are replicated, not commands).
//!
//! - [`types`]: what an entry carries, how nodes are named;
//! - [`log_store`]: the Raft log over the WAL's segments;
//! - [`state_machine`]: the engine, and its redb snapshot as Raft's;
//! - [`journal`]: the engine's journal on a node (numbering and proposing);
//! - [`network`]: peer traffic and its listener.
//!
//! [`Node::start`] opens a data directory as a cluster node and runs it.

pub mod journal;
pub mod log_store;
pub mod network;
pub mod state_machine;
pub mod types;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use openraft::{ServerState, SnapshotPolicy};
use tokio::task::JoinHandle;

use crate::engine::{Engine, Policy};
use crate::journal::{Journal, Waiters};
use crate::storage::io::FsDir;
use crate::storage::snapshot::SnapshotStore;
use crate::storage::{codec, snapshot_path, wal_dir};
use journal::{Proposal, RaftJournal};
use log_store::LogStore;
use network::{Isolation, Network};
use state_machine::{Compile, Parts, StateMachine};
use types::{Peer, Raft};

/// How a node runs.
#[derive(Clone)]
pub struct NodeOptions {
    /// This node's id: unique in the cluster, never reused.
    pub node_id: u64,
    /// Where peer traffic is taken.
    pub raft_listen: std::net::SocketAddr,
    /// The shared secret every peer call carries.
    pub secret: Arc<[u8]>,
    /// The initial voters, this node among them.
    pub peers: BTreeMap<u64, Peer>,
    /// Leader heartbeat interval.
    pub heartbeat: Duration,
    /// A follower that hears no leader for this long (up to twice it,
    /// randomised) starts an election.
    pub election_timeout: Duration,
    /// A Raft snapshot is built after this many entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot, so that a peer a little
    /// behind catches up from the log rather than a whole snapshot.
    pub logs_kept: u64,
    /// The data directory (locked by the caller).
    pub data_dir: PathBuf,
    /// WAL segment size.
    pub segment_bytes_max: u64,
    /// Fault tests may cut this node's peer traffic ([`Node::isolate`]).
    pub test_hooks: bool,
    /// Stop the process (exit status 5) when Raft stops on a storage error,
    /// so a supervisor sees it; tests running nodes in-process keep going.
    pub exit_on_fatal: bool,
}

/// A running cluster node.
pub struct Node {
    /// The Raft handle.
    pub raft: Raft,
    /// The engine (its journal is [`Node::journal`]).
    pub engine: Arc<Engine>,
    /// The engine's journal.
    pub journal: Arc<RaftJournal>,
    /// The state machine.
    pub state_machine: StateMachine,
    /// The log.
    pub log: LogStore,
    /// Its options.
    pub options: NodeOptions,
    /// Where peer traffic is taken (the bound address).
    pub raft_addr: std::net::SocketAddr,
    isolation: Arc<Isolation>,
    tasks: Vec<JoinHandle<()>>,
}

impl Node {
    /// Opens `options.data_dir` as a cluster node: loads the engine from
    /// its snapshot, opens the Raft log, starts Raft and the peer listener,
    /// and, on an empty directory, proposes the initial membership (every
    /// node of a new cluster does; the first to win an election forms it).
    /// `policy` is the configuration's, in force until the stored one
    /// arrives; `compile` compiles replicated versions.
    pub async fn start(options: NodeOptions, policy: Policy, compile: Compile) -> Result<Node, String> {
        let snapshots = SnapshotStore::open(&snapshot_path(&options.data_dir)).map_err(|e| e.to_string())?;
        let loaded = snapshots.load().map_err(|e| e.to_string())?.unwrap_or_default();
        let waiters = Arc::new(Waiters::new(0));
        let speculated = Arc::new(AtomicU64::new(0));
        let (journal, proposals) = RaftJournal::new(waiters.clone(), speculated.clone());
        let journal = Arc::new(journal);
        let mut engine = Engine::from_snapshot(policy.clone(), journal.clone() as Arc<dyn Journal>, loaded.shards);
        if let Some(b) = &loaded.signals {
            engine.load_signals(codec::decode_signals(b).map_err(|e| format!("snapshot: the signals state: {e}"))?);
        }
        if let Some(b) = &loaded.policy {
            engine.load_policy_log(codec::decode_policy_log(b).map_err(|e| format!("snapshot: the policy: {e}"))?);
        }
        engine.time(loaded.created_ms);
        engine.finish_recovery();
        if let Some(v) = engine.policy_version() {
            engine.install_recovered(compile(&v)?);
        }
        let engine = Arc::new(engine);
        let dir = FsDir::preallocating(
            &wal_dir(&options.data_dir),
            crate::storage::io::write_ahead_bytes(options.segment_bytes_max),
        )
        .map_err(|e| e.to_string())?;
        let log = LogStore::open(Arc::new(dir), &options.data_dir, options.segment_bytes_max)?;
        let state_machine = StateMachine::new(
            Parts {
                engine: engine.clone(),
                log: log.clone(),
                snapshots,
                data_dir: options.data_dir.clone(),
                compile,
                initial_policy: policy,
                waiters,
                speculated,
                event_floor: Arc::new(AtomicU64::new(u64::MAX)),
            },
            loaded.raft.as_deref(),
        )?;
        let heartbeat = options.heartbeat.as_millis() as u64;
        let election = options.election_timeout.as_millis() as u64;
        let config = openraft::Config {
            cluster_name: "quotad".into(),
            heartbeat_interval: heartbeat,
            election_timeout_min: election,
            election_timeout_max: election * 2,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(options.snapshot_every),
            max_in_snapshot_log_to_keep: options.logs_kept,
            ..Default::default()
        }
        .validate()
        .map_err(|e| format!("cluster timing: {e}"))?;
        let isolation = Isolation::new(options.test_hooks);
        let network = Network::new(options.node_id, options.secret.clone(), isolation.clone())?;
        let raft = Raft::new(
            options.node_id,
            Arc::new(config),
            network,
            log.clone(),
            state_machine.clone(),
        )
        .await
        .map_err(|e| format!("cannot start Raft: {e}"))?;
        let listener = tokio::net::TcpListener::bind(options.raft_listen)
            .await
            .map_err(|e| format!("cluster.raft_listen {}: cannot listen: {e}", options.raft_listen))?;
        let raft_addr = listener.local_addr().map_err(|e| e.to_string())?;
        let app = network::router(raft.clone(), options.secret.clone(), isolation.clone());
        let mut tasks = vec![tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the cluster listener stopped");
            }
        })];
        tasks.push(tokio::spawn(propose(raft.clone(), journal.clone(), proposals)));
        tasks.push(tokio::spawn(watch_role(
            raft.clone(),
            journal.clone(),
            state_machine.clone(),
            log.clone(),
            options.election_timeout,
            options.exit_on_fatal,
        )));
        // A node added later is not among the initial voters: it waits to be
        // added (POST /v1/cluster/members on the leader).
        let initial = options.peers.contains_key(&options.node_id);
        if initial && !raft.is_initialized().await.map_err(|e| e.to_string())? {
            match raft.initialize(options.peers.clone()).await {
                Ok(()) => tracing::info!(peers = options.peers.len(), "proposed the initial cluster membership"),
                Err(e) => tracing::info!(error = %e, "the cluster is already formed"),
            }
        }
        Ok(Node {
            raft,
            engine,
            journal,
            state_machine,
            log,
            options,
            raft_addr,
            isolation,
            tasks,
        })
    }

    /// Stops Raft and the node's tasks.
    pub async fn shutdown(self) {
        let _ = self.raft.shutdown().await;
        for t in self.tasks {
            t.abort();
        }
    }

    /// Whether this node leads and takes writes now.
    pub fn serving(&self) -> bool {
        self.journal.serving().is_some()
    }

    /// Drops this node's peer traffic from and to `ids` (none: heals), when
    /// started with test hooks: a network partition, for fault tests.
    pub fn isolate(&self, ids: impl IntoIterator<Item = u64>) {
        self.isolation.set(ids.into_iter().collect());
    }

    /// Adds node `id`, reached at `peer` (on the leader): it catches up as a
    /// learner (from the log, or a snapshot), then votes.
    pub async fn add_member(&self, id: u64, peer: Peer) -> Result<(), String> {
        self.raft
            .add_learner(id, peer, true)
            .await
            .map_err(|e| format!("cannot add node {id} as a learner: {e}"))?;
        self.raft
            .change_membership(openraft::ChangeMembers::AddVoterIds([id].into()), false)
            .await
            .map_err(|e| format!("cannot make node {id} a voter: {e}"))?;
        Ok(())
    }

    /// Removes node `id` from the cluster (on the leader).
    pub async fn remove_member(&self, id: u64) -> Result<(), String> {
        self.raft
            .change_membership(openraft::ChangeMembers::RemoveVoters([id].into()), false)
            .await
            .map_err(|e| format!("cannot remove node {id}: {e}"))?;
        Ok(())
    }
}

/// Records in one entry at most: bounds an AppendEntries payload and what a
/// follower decodes at once.
const BATCH_RECORDS: usize = 4096;
/// Bytes of records in one entry at most (one larger record goes alone).
const BATCH_BYTES: usize = 1 << 20;
/// Entries handed to Raft and not yet committed. Raft appends one entry at a
/// time with an fsync each; while these are on their way, new records queue
/// here and go in the next entry together. Two keep the leader's disk busy
/// while the previous entry is replicated (measured against one and four in
/// BENCHMARKS.md).
const IN_FLIGHT: usize = 2;

/// Hands records to Raft in the order they were numbered, those queued
/// together in one entry; records of an earlier leadership (made before this
/// node stopped leading) are dropped. The state machine is what marks
/// records durable; the replies here only pace the proposals.
async fn propose(raft: Raft, journal: Arc<RaftJournal>, mut proposals: tokio::sync::mpsc::UnboundedReceiver<Proposal>) {
    type Reply = tokio::sync::oneshot::Receiver<
        Result<openraft::raft::ClientWriteResponse<types::TypeConfig>, openraft::error::ClientWriteError<u64, Peer>>,
    >;
    let mut in_flight: std::collections::VecDeque<(u64, Reply)> = Default::default();
    let mut next: Option<Proposal> = None;
    loop {
        while in_flight.len() >= IN_FLIGHT {
            let (epoch, mut rx) = in_flight.pop_front().expect("in flight");
            // An entry of a leadership that ended may stay unanswered until
            // the next leader overwrites it: stop waiting for it then.
            loop {
                tokio::select! {
                    r = &mut rx => {
                        if let Ok(Err(e)) = r {
                            tracing::debug!(error = %e, "a proposed entry was not committed by this leader");
                        }
                        break;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {
                        if journal.serving() != Some(epoch) {
                            break;
                        }
                    }
                }
            }
        }
        let (epoch, first) = match next.take() {
            Some(p) => p,
            None => match proposals.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut bytes = first.bytes.len();
        let mut batch = vec![first];
        while batch.len() < BATCH_RECORDS && bytes < BATCH_BYTES {
            match proposals.try_recv() {
                Ok((e, r)) if e == epoch && bytes + r.bytes.len() <= BATCH_BYTES => {
                    bytes += r.bytes.len();
                    batch.push(r);
                }
                Ok(p) => {
                    next = Some(p);
                    break;
                }
                Err(_) => break,
            }
        }
        if journal.serving() != Some(epoch) {
            continue;
        }
        match raft.client_write_ff(batch).await {
            Ok(rx) => in_flight.push_back((epoch, rx)),
            Err(e) => {
                tracing::error!(error = %e, "Raft stopped; this node takes no more writes");
                journal.close("Raft stopped on this node");
                return;
            }
        }
    }
}

/// Opens the journal when this node becomes a ready leader, and closes it
/// when it stops leading or has not heard from a majority for an election
/// timeout (a new leader may have been elected behind a partition: it must
/// not take writes that cannot commit). A leader that stops with records not
/// committed rebuilds its engine from committed state.
///
/// Ready means every entry of its log is applied and the last is of its own
/// term: the engine then holds all that was committed before, and LSNs are
/// numbered after every record in the log.
async fn watch_role(
    raft: Raft,
    journal: Arc<RaftJournal>,
    sm: StateMachine,
    log: LogStore,
    election: Duration,
    exit_on_fatal: bool,
) {
    let mut metrics = raft.metrics();
    let node_id = metrics.borrow().id;
    let mut term = 0;
    let tick = (election / 4).max(Duration::from_millis(10));
    loop {
        // `acked`: when the metrics were read, and the ms since a majority
        // acknowledged this leader then.
        let (state, current_term, applied, last_index, acked) = {
            let m = metrics.borrow_and_update();
            if let Err(e) = &m.running_state {
                journal.close("Raft stopped on this node after a storage error");
                tracing::error!(error = %e, "Raft stopped on this node after a storage error");
                if exit_on_fatal {
                    std::process::exit(crate::storage::journal::EXIT_UNRECOVERABLE);
                }
                return;
            }
            let acked = m.millis_since_quorum_ack.map(|ms| (tokio::time::Instant::now(), ms));
            (m.state, m.current_term, m.last_applied, m.last_log_index, acked)
        };
        loop {
            let leading = state == ServerState::Leader;
            let unheard = acked.is_none_or(|(at, ms)| Duration::from_millis(ms) + at.elapsed() > election);
            match journal.serving() {
                None if leading
                    && !unheard
                    && applied.is_some_and(|a| a.leader_id.term == current_term && Some(a.index) == last_index) =>
                {
                    sm.leading(openraft::LeaderId::new(current_term, node_id));
                    journal.open(sm.applied_lsn());
                    term = current_term;
                    tracing::info!(term, "this node leads and takes writes");
                }
                Some(_) if !leading || current_term != term || unheard => {
                    let why = if leading && current_term == term {
                        "this node has not heard from a majority of the cluster"
                    } else {
                        "this node is not the leader"
                    };
                    if journal.close(why) {
                        let (sm, log, journal) = (sm.clone(), log.clone(), journal.clone());
                        let _ = tokio::task::spawn_blocking(move || sm.rebuild_after_loss(&log, &journal)).await;
                    }
                    tracing::warn!(term = current_term, why, "this node no longer takes writes");
                }
                _ => {}
            }
            tokio::select! {
                changed = metrics.changed() => {
                    if changed.is_err() {
                        journal.close("Raft stopped on this node");
                        return;
                    }
                    break;
                }
                () = tokio::time::sleep(tick) => {}
            }
        }
    }
}

impl StateMachine {
    /// After leadership was lost with records not committed: their callers
    /// learn the outcome is unknown, and the engine goes back to committed
    /// state. If that fails the process stops (restarting recovers the same
    /// way, from the snapshot and the log).
    fn rebuild_after_loss(&self, log: &LogStore, journal: &RaftJournal) {
        journal.waiters().abort_waiting(state_machine::LOST);
        if let Err(e) = self.rebuild(log) {
            tracing::error!(error = %e, "cannot rebuild the engine after losing leadership; stopping");
            std::process::exit(crate::storage::journal::EXIT_UNRECOVERABLE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    fn policy() -> Policy {
        let config = crate::config::Config::from_toml("", "test.toml").expect("an empty config is valid");
        Policy::from_config(&config).expect("compiles")
    }

    /// A fresh log store and state machine in a temporary directory.
    struct Builder;

    impl StoreBuilder<types::TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), types::StorageError> {
            let dir = tempfile::tempdir().expect("temp dir");
            let fail = |e: String| types::io_error(types::IoError::read_logs, e);
            let wal = FsDir::new(&wal_dir(dir.path())).map_err(|e| fail(e.to_string()))?;
            let log = LogStore::open(Arc::new(wal), dir.path(), 1 << 20).map_err(fail)?;
            let snapshots = SnapshotStore::open(&snapshot_path(dir.path())).map_err(|e| fail(e.to_string()))?;
            let waiters = Arc::new(Waiters::new(0));
            let speculated = Arc::new(AtomicU64::new(0));
            let (journal, _) = RaftJournal::new(waiters.clone(), speculated.clone());
            let engine = Arc::new(Engine::new(policy(), Arc::new(journal)));
            let sm = StateMachine::new(
                Parts {
                    engine,
                    log: log.clone(),
                    snapshots,
                    data_dir: dir.path().to_path_buf(),
                    compile: Arc::new(|_| Ok(policy())),
                    initial_policy: policy(),
                    waiters,
                    speculated,
                    event_floor: Arc::new(AtomicU64::new(u64::MAX)),
                },
                None,
            )
            .map_err(fail)?;
            Ok((dir, log, sm))
        }
    }

    /// Openraft's own conformance suite for log stores and state machines.
    #[test]
    fn the_log_store_and_state_machine_pass_openraft_s_suite() {
        Suite::test_all(Builder).expect("the suite passes");
    }
}
