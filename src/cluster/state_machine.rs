//! The Raft state machine of a cluster node: the engine. Committed entries
//! reach it in log order; a record this node applied itself while it led
//! (the leader decides and applies before the entry commits) is only marked
//! durable, any other is applied through [`Engine::apply_replicated`].
//!
//! A record is this node's own when its entry carries this node's current
//! leadership (term and node id), not by its LSN: a leader that lost its
//! leadership with records that never committed numbered them with LSNs the
//! next leader hands out again. When another leader's record arrives while
//! records of this node's are still uncommitted, those are lost: their
//! callers are told the outcome is unknown and the engine is rebuilt from
//! committed state before the record is applied.
//!
//! Its snapshot is the engine's redb snapshot, with the Raft state (the last
//! log id it covers, the membership, the engine LSN there) in its `raft`
//! table. It holds committed state only: it is written once every record in
//! it is committed. A peer gets a synced copy of the file; an installed one
//! is received into a temporary file, synced, renamed into place and loaded.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder, Snapshot, SnapshotMeta};
use serde::{Deserialize, Serialize};

use super::log_store::LogStore;
use super::types::{io_error, Entry, IoError, LogId, Peer, StorageError, StoredMembership, TypeConfig};
use crate::engine::policy::PolicyVersion;
use crate::engine::{Engine, InstalledState, Lsn, Mutation, Policy};
use crate::journal::Waiters;
use crate::storage::snapshot::SnapshotStore;
use crate::storage::{codec, StorageError as DiskError};

/// What callers of records that never committed are told.
pub const LOST: &str = "leadership was lost before this change was committed; its outcome is unknown: retry with the \
                        same idempotency key";

/// Compiles a stored policy version under this node's configuration.
pub type Compile = Arc<dyn Fn(&PolicyVersion) -> Result<Policy, String> + Send + Sync>;

/// The Raft state stored in a snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SnapshotRaft {
    meta: SnapshotMeta<u64, Peer>,
    /// The engine LSN of the last record at or before `meta.last_log_id`.
    lsn: Lsn,
}

/// Where the state machine is.
#[derive(Debug, Default)]
struct Applied {
    last: Option<LogId>,
    membership: StoredMembership,
    /// The engine LSN of the last record applied (or marked durable).
    lsn: Lsn,
}

/// What the state machine and its snapshot builders share.
pub struct Shared {
    engine: Arc<Engine>,
    /// The log, to apply committed entries again after a rebuild.
    log: LogStore,
    snapshots: SnapshotStore,
    data_dir: PathBuf,
    compile: Compile,
    /// The policy an empty node runs (the configuration's) before version 1
    /// is written.
    initial_policy: Policy,
    applied: Mutex<Applied>,
    /// Durable (committed and applied) engine LSNs; the leader's requests wait here.
    waiters: Arc<Waiters>,
    /// The newest engine LSN this node applied itself as leader.
    speculated: Arc<AtomicU64>,
    /// The leadership (term, this node) whose records the engine applied
    /// when they were decided; none once it is over.
    leading: Mutex<Option<openraft::LeaderId<u64>>>,
    /// The snapshot in place (built or installed), if any; held while the
    /// file is written, copied or replaced. Lock order: before `applied`.
    snapshot_file: Mutex<Option<SnapshotMeta<u64, Peer>>>,
    /// Names temporary copies.
    copies: AtomicU64,
    /// Events at or below this seq reached every webhook.
    event_floor: Arc<AtomicU64>,
}

/// The state machine handle openraft owns; clones share it.
#[derive(Clone)]
pub struct StateMachine {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn sm_error(e: impl std::fmt::Display) -> StorageError {
    io_error(IoError::write_state_machine, e)
}

fn snapshot_error(e: impl std::fmt::Display) -> StorageError {
    io_error(|x| IoError::write_snapshot(None, x), e)
}

/// What a node needs to build its state machine.
pub struct Parts {
    /// The engine, loaded from the snapshot (not replayed: the log is Raft's).
    pub engine: Arc<Engine>,
    /// The log.
    pub log: LogStore,
    /// Its snapshot file.
    pub snapshots: SnapshotStore,
    /// The data directory (temporary snapshot files go there).
    pub data_dir: PathBuf,
    /// Compiles replicated policy versions.
    pub compile: Compile,
    /// The configuration's policy.
    pub initial_policy: Policy,
    /// Shared with the journal.
    pub waiters: Arc<Waiters>,
    /// Shared with the journal.
    pub speculated: Arc<AtomicU64>,
    /// Bounds event retention in snapshots.
    pub event_floor: Arc<AtomicU64>,
}

impl StateMachine {
    /// The state machine over an engine loaded from its snapshot (`raft`:
    /// that snapshot's Raft state, if it has one).
    pub fn new(parts: Parts, raft: Option<&[u8]>) -> Result<StateMachine, String> {
        let mut applied = Applied::default();
        let mut snapshot = None;
        if let Some(bytes) = raft {
            let r: SnapshotRaft = codec::decode_raft(bytes, "Raft state").map_err(|e| {
                format!("the snapshot's Raft state does not decode ({e}): restore the data directory from a backup")
            })?;
            applied.last = r.meta.last_log_id;
            applied.membership = r.meta.last_membership.clone();
            applied.lsn = r.lsn;
            snapshot = Some(r.meta);
            parts.waiters.advance(r.lsn);
        }
        Ok(StateMachine {
            shared: Arc::new(Shared {
                engine: parts.engine,
                log: parts.log,
                snapshots: parts.snapshots,
                data_dir: parts.data_dir,
                compile: parts.compile,
                initial_policy: parts.initial_policy,
                applied: Mutex::new(applied),
                waiters: parts.waiters,
                speculated: parts.speculated,
                leading: Mutex::new(None),
                snapshot_file: Mutex::new(snapshot),
                copies: AtomicU64::new(0),
                event_floor: parts.event_floor,
            }),
        })
    }

    /// The snapshot file (older events and usage history are read from it).
    pub fn snapshots(&self) -> &SnapshotStore {
        &self.shared.snapshots
    }

    /// Where webhook delivery publishes the newest seq every webhook has.
    pub fn event_floor(&self) -> Arc<AtomicU64> {
        self.shared.event_floor.clone()
    }

    /// The engine LSN of the last record applied.
    pub fn applied_lsn(&self) -> Lsn {
        lock(&self.shared.applied).lsn
    }

    /// The last log id applied.
    pub fn last_applied(&self) -> Option<LogId> {
        lock(&self.shared.applied).last
    }

    /// This node leads as `leader` from now on: entries carrying it are
    /// records its engine applied when they were decided.
    pub fn leading(&self, leader: openraft::LeaderId<u64>) {
        *lock(&self.shared.leading) = Some(leader);
    }

    /// Whether `e` is another leader's record arriving while records this
    /// node applied as leader are not all committed: those are lost.
    fn diverges(&self, e: &Entry) -> bool {
        if !matches!(e.payload, EntryPayload::Normal(_)) {
            return false;
        }
        let ours = *lock(&self.shared.leading) == Some(e.log_id.leader_id);
        !ours && self.shared.speculated.load(Ordering::Acquire) > lock(&self.shared.applied).lsn
    }

    /// Applies one committed entry.
    fn apply_one(&self, e: &Entry) -> Result<(), String> {
        let s = &self.shared;
        let mut a = lock(&s.applied);
        match &e.payload {
            EntryPayload::Blank => {}
            EntryPayload::Membership(m) => {
                a.membership = StoredMembership::new(Some(e.log_id), m.clone());
            }
            EntryPayload::Normal(records) => {
                let ours = *lock(&s.leading) == Some(e.log_id.leader_id);
                for r in records {
                    if r.lsn <= a.lsn {
                        continue;
                    }
                    // This node's own records are in the engine already.
                    if !ours {
                        self.apply_record(r)?;
                    }
                    a.lsn = r.lsn;
                }
                s.waiters.advance(a.lsn);
            }
        }
        a.last = Some(e.log_id);
        Ok(())
    }

    /// Puts the engine back to committed state: after this node led and
    /// lost leadership with records it applied that never committed, its
    /// memory is ahead of the log. Loads its last snapshot (committed state
    /// only) and applies the committed entries after it from `log`.
    pub fn rebuild(&self, log: &LogStore) -> Result<(), String> {
        let s = &self.shared;
        // Applies wait meanwhile. The snapshot file holds committed state
        // only, with the Raft position it covers: read without its lock.
        let mut applied = lock(&s.applied);
        let loaded = s.snapshots.load().map_err(|e| e.to_string())?;
        let (state, raft) = match loaded {
            Some(l) => {
                let raft: Option<SnapshotRaft> = l
                    .raft
                    .as_deref()
                    .map(|b| codec::decode_raft(b, "Raft state").map_err(|e| e.to_string()))
                    .transpose()?;
                (self.state_of(l)?, raft)
            }
            None => (
                InstalledState {
                    shards: (0..s.engine.shard_count()).map(|_| Default::default()).collect(),
                    policy: Some(s.initial_policy.clone()),
                    ..InstalledState::default()
                },
                None,
            ),
        };
        s.engine.install_state(state)?;
        let from = raft
            .as_ref()
            .and_then(|r| r.meta.last_log_id)
            .map_or(0, |l| l.index + 1);
        let through = applied.last.map_or(0, |l| l.index + 1);
        for e in log.read_blocking(from..through)? {
            if let EntryPayload::Normal(records) = &e.payload {
                for r in records {
                    self.apply_record(r)?;
                }
            }
        }
        applied.lsn = applied.lsn.max(raft.as_ref().map_or(0, |r| r.lsn));
        s.speculated.store(applied.lsn, Ordering::Release);
        *lock(&s.leading) = None;
        tracing::warn!(
            applied = ?applied.last,
            "rebuilt the engine from the last snapshot and the committed log"
        );
        Ok(())
    }

    /// An engine state from a loaded snapshot.
    fn state_of(&self, l: crate::storage::snapshot::Loaded) -> Result<InstalledState, String> {
        let signals = match &l.signals {
            Some(b) => codec::decode_signals(b).map_err(|e| e.to_string())?,
            None => Default::default(),
        };
        let policy_log = match &l.policy {
            Some(b) => codec::decode_policy_log(b).map_err(|e| e.to_string())?,
            None => Default::default(),
        };
        let policy = match policy_log.current() {
            Some(v) => (self.shared.compile)(v)?,
            None => self.shared.initial_policy.clone(),
        };
        Ok(InstalledState {
            shards: l.shards,
            created_ms: l.created_ms,
            signals,
            policy_log,
            policy: Some(policy),
        })
    }

    /// Applies one record to the engine (compiling a policy it sets).
    fn apply_record(&self, r: &super::types::Record) -> Result<(), String> {
        let (at_ms, muts) = codec::decode_record(r.version, &r.bytes)
            .map_err(|e| format!("the record of LSN {} does not decode: {e}", r.lsn))?;
        let policy = muts
            .iter()
            .find_map(|m| match m {
                Mutation::SetPolicy(c) => Some(&c.version),
                _ => None,
            })
            .map(|v| (self.shared.compile)(v))
            .transpose()
            .map_err(|e| format!("the policy of LSN {} does not compile on this node: {e}", r.lsn))?;
        self.shared.engine.apply_replicated(r.lsn, at_ms, &muts, policy);
        Ok(())
    }

    /// Builds a snapshot of committed state.
    async fn build(&self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.build_blocking())
            .await
            .map_err(snapshot_error)?
            .map_err(snapshot_error)
    }

    /// A snapshot waits until every record it holds is committed. If this
    /// node loses its leadership meanwhile, the wait ends in error and the
    /// engine is rebuilt: the snapshot is then taken again, from that.
    fn build_blocking(&self) -> Result<Snapshot<TypeConfig>, String> {
        let mut tries = 0;
        loop {
            match self.build_once() {
                Err(e) if tries < 3 => {
                    tries += 1;
                    tracing::warn!(error = %e, "a snapshot could not be taken; taking it again");
                }
                r => return r,
            }
        }
    }

    fn build_once(&self) -> Result<Snapshot<TypeConfig>, String> {
        let s = &self.shared;
        let mut current = lock(&s.snapshot_file);
        // Everything up to here is in the engine; later records may be too,
        // which replay after `last` skips shard by shard.
        let (last, membership, lsn) = {
            let a = lock(&s.applied);
            (a.last, a.membership.clone(), a.lsn)
        };
        let n = s.copies.fetch_add(1, Ordering::Relaxed);
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: membership,
            snapshot_id: format!(
                "{}-{}-{n}",
                last.map_or(0, |l| l.leader_id.term),
                last.map_or(0, |l| l.index)
            ),
        };
        let raft = codec::encode_raft(&SnapshotRaft {
            meta: meta.clone(),
            lsn,
        })
        .map_err(|e| e.to_string())?;
        let waiters = s.waiters.clone();
        let wait = move |l: u64| waiters.wait_blocking(l).map_err(|e| DiskError::Io(e.to_string()));
        crate::storage::write_engine_snapshot(
            &s.snapshots,
            &s.engine,
            // Engine time as far as records took it: a follower's own clock
            // plays no part in its state.
            0,
            &wait,
            s.event_floor.load(Ordering::Acquire),
            raft,
        )
        .map_err(|e| e.to_string())?;
        *current = Some(meta.clone());
        let file = self.copy_file()?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }

    /// A synced private copy of the snapshot file, open for reading and
    /// already unlinked (it goes when the reader closes it).
    fn copy_file(&self) -> Result<tokio::fs::File, String> {
        let s = &self.shared;
        let n = s.copies.fetch_add(1, Ordering::Relaxed);
        let path = s.data_dir.join(format!("raft-send-{n}.redb"));
        s.snapshots.copy_to(&path).map_err(|e| e.to_string())?;
        let f = std::fs::File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let _ = std::fs::remove_file(&path);
        Ok(tokio::fs::File::from_std(f))
    }

    fn receive_path(&self) -> PathBuf {
        self.shared.data_dir.join("raft-receive.redb")
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        self.build().await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let a = lock(&self.shared.applied);
        Ok((a.last, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        for e in entries {
            if self.diverges(&e) {
                self.shared.waiters.abort_waiting(LOST);
                let (this, log) = (self.clone(), self.shared.log.clone());
                tokio::task::spawn_blocking(move || this.rebuild(&log))
                    .await
                    .map_err(sm_error)?
                    .map_err(sm_error)?;
            }
            self.apply_one(&e).map_err(sm_error)?;
            out.push(());
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let path = self.receive_path();
        // Read back at install: open for both.
        let f = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await
            .map_err(|e| snapshot_error(format!("cannot create {}: {e}", path.display())))?;
        Ok(Box::new(f))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, Peer>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        // Copied from the handle openraft gives back (the file received,
        // or any other), then synced: what is renamed into place is whole.
        let mut from = snapshot;
        let path = self.shared.data_dir.join("raft-install.redb");
        let copy = async {
            use tokio::io::AsyncSeekExt;
            from.seek(std::io::SeekFrom::Start(0)).await?;
            let mut to = tokio::fs::File::create(&path).await?;
            tokio::io::copy(&mut *from, &mut to).await?;
            to.sync_all().await
        };
        copy.await
            .map_err(|e| snapshot_error(format!("cannot store the received snapshot in {}: {e}", path.display())))?;
        drop(from);
        let _ = tokio::fs::remove_file(self.receive_path()).await;
        let this = self.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || this.install_blocking(meta))
            .await
            .map_err(snapshot_error)?
            .map_err(snapshot_error)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let current = lock(&this.shared.snapshot_file);
            let Some(meta) = current.clone() else {
                return Ok::<_, String>(None);
            };
            let file = this.copy_file()?;
            Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(file),
            }))
        })
        .await
        .map_err(snapshot_error)?
        .map_err(snapshot_error)
    }
}

impl StateMachine {
    fn install_blocking(&self, meta: SnapshotMeta<u64, Peer>) -> Result<(), String> {
        let s = &self.shared;
        let mut current = lock(&s.snapshot_file);
        let mut a = lock(&s.applied);
        s.snapshots
            .replace_with(&self.shared.data_dir.join("raft-install.redb"))
            .map_err(|e| e.to_string())?;
        let loaded = s
            .snapshots
            .load()
            .map_err(|e| e.to_string())?
            .ok_or("the received snapshot is empty")?;
        let raft: SnapshotRaft = codec::decode_raft(
            loaded
                .raft
                .as_deref()
                .ok_or("the received snapshot has no Raft state")?,
            "Raft state",
        )
        .map_err(|e| e.to_string())?;
        s.engine.install_state(self.state_of(loaded)?)?;
        a.last = meta.last_log_id;
        a.membership = meta.last_membership.clone();
        a.lsn = raft.lsn;
        *current = Some(meta);
        s.speculated.store(0, Ordering::Release);
        s.waiters.advance(raft.lsn);
        Ok(())
    }
}
