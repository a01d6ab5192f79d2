//! Durable storage: the WAL, snapshots and recovery. [`Storage::open`] locks
//! the data directory, loads the snapshot, replays the WAL after it into an
//! engine and starts the group-commit writer; [`Storage::snapshot`] writes a
//! new snapshot without stopping requests and deletes the segments it covers.
//!
//! Layout of `storage.data_dir`: `LOCK` (held while running), `snapshot.redb`,
//! `wal/wal-<first LSN>.log`.

pub mod codec;
pub mod io;
pub mod journal;
pub mod snapshot;
pub mod wal;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::Millis;
use crate::config::StorageConfig;
use crate::engine::{Engine, Policy};
use crate::journal::{Journal, NullJournal};
use crate::metrics::StorageMetrics;
use io::{FsDir, WalDir};
use journal::{WalJournal, WriterConfig};
use snapshot::SnapshotStore;
use wal::{ScanReport, Wal, WalError};

/// Why storage could not be opened or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The log or snapshot is damaged: the daemon must not start.
    #[error("{0}")]
    Corrupt(String),
    /// Another process holds the data directory.
    #[error("data directory {0} is in use by another quotad (its LOCK file is held)")]
    Locked(String),
    /// The filesystem failed.
    #[error("{0}")]
    Io(String),
}

impl From<WalError> for StorageError {
    fn from(e: WalError) -> Self {
        match e {
            WalError::Corrupt(_) => StorageError::Corrupt(e.to_string()),
            _ => StorageError::Io(e.to_string()),
        }
    }
}

/// What recovery found and did.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// A snapshot was loaded.
    pub snapshot_loaded: bool,
    /// When the loaded snapshot was written (engine time, ms since the epoch).
    pub snapshot_created_ms: Option<u64>,
    /// The snapshot's shard count.
    pub snapshot_shards: usize,
    /// Every shard of the snapshot holds the changes up to this LSN (0: no snapshot).
    pub snapshot_min_lsn: u64,
    /// Records replayed from the WAL (those after the snapshot).
    pub replayed_records: u64,
    /// The WAL scan.
    pub scan: ScanReport,
    /// Time from open to ready.
    pub duration: Duration,
}

/// What a snapshot did.
#[derive(Debug, Clone, Default)]
pub struct SnapshotReport {
    /// Every shard is at least as of this LSN.
    pub min_lsn: u64,
    /// Encoded size.
    pub bytes: usize,
    /// WAL segments deleted.
    pub segments_removed: usize,
    /// Wall time.
    pub duration: Duration,
}

/// Open storage.
pub struct Storage {
    /// The WAL writer, which is also the engine's journal.
    journal: Arc<WalJournal>,
    /// The snapshot file.
    snapshots: SnapshotStore,
    /// Snapshot thresholds.
    config: StorageConfig,
    /// Snapshot and WAL figures.
    metrics: Arc<StorageMetrics>,
    /// With `storage.wal_retention`: (LSN, engine time) of each snapshot
    /// whose covered segments are not deleted yet, oldest first.
    covered: std::sync::Mutex<std::collections::VecDeque<(u64, u64)>>,
    /// `storage.wal_retention` in ms (0: delete covered segments at once).
    wal_retention_ms: u64,
    /// Events at or below this seq have reached every webhook, so retention
    /// may drop them (`u64::MAX` when no webhook is configured).
    event_floor: Arc<AtomicU64>,
    /// Held for the life of the process: two daemons on one directory would
    /// interleave their logs (none for simulated directories).
    _lock: Option<File>,
}

/// Creates `dir` (and its parents) as needed; directories it creates are
/// 0700: what quotad stores is nobody else's to read.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Makes a file quotad just created readable and writable by its owner alone
/// (for files a library creates, such as redb's).
pub fn restrict_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

pub fn lock_dir(dir: &Path) -> Result<File, StorageError> {
    use std::os::unix::fs::OpenOptionsExt;
    create_private_dir(dir).map_err(|e| StorageError::Io(format!("cannot create {}: {e}", dir.display())))?;
    let path = dir.join("LOCK");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| StorageError::Io(format!("cannot open {}: {e}", path.display())))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(StorageError::Locked(dir.display().to_string())),
        Err(std::fs::TryLockError::Error(e)) => Err(StorageError::Io(format!("cannot lock {}: {e}", path.display()))),
    }
}

/// Paths inside a data directory.
pub fn wal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("wal")
}

/// The snapshot file of a data directory.
pub fn snapshot_path(data_dir: &Path) -> PathBuf {
    data_dir.join("snapshot.redb")
}

/// Loads the snapshot (if any) and replays `wal` after it into a new engine.
/// Used by `open` and by the read-only `quotad wal verify`.
pub fn recover(
    snapshots: Option<&SnapshotStore>,
    wal_dir: Arc<dyn WalDir>,
    policy: Policy,
    segment_bytes_max: u64,
    read_only: bool,
) -> Result<(Engine, Option<Wal>, RecoveryReport), StorageError> {
    let started = Instant::now();
    let mut report = RecoveryReport::default();
    let loaded = match snapshots {
        Some(s) => s.load().map_err(|e| StorageError::Corrupt(e.to_string()))?,
        None => None,
    };
    let (shards, snapshot_ms, snapshot_lsn, signals, policy_log) = loaded
        .map(|l| (l.shards, l.created_ms, l.last_lsn, l.signals, l.policy))
        .unwrap_or_default();
    report.snapshot_loaded = !shards.is_empty();
    report.snapshot_created_ms = report.snapshot_loaded.then_some(snapshot_ms);
    report.snapshot_shards = shards.len();
    let mut engine = Engine::from_snapshot(policy, Arc::new(NullJournal::default()), shards);
    if let Some(blob) = signals {
        engine.load_signals(codec::decode_signals(&blob).map_err(|e| StorageError::Corrupt(e.to_string()))?);
    }
    if let Some(blob) = policy_log {
        let log = codec::decode_policy_log(&blob).map_err(|e| {
            StorageError::Corrupt(format!(
                "snapshot: table policy, key \"versions\": does not decode: {e}"
            ))
        })?;
        engine.load_policy_log(log);
    }
    // Engine time resumes where the snapshot left it, whatever the wall clock says.
    engine.time(snapshot_ms);
    let after = engine.replay_from();
    report.snapshot_min_lsn = after;
    let mut replayed = 0u64;
    let mut on_record = |lsn, version, payload: &[u8]| {
        let (at_ms, muts) = codec::decode_record(version, payload).map_err(|e| e.to_string())?;
        engine.replay(lsn, at_ms, &muts);
        replayed += 1;
        Ok(())
    };
    let wal = if read_only {
        report.scan = wal::verify(wal_dir.as_ref(), after, &mut on_record)?;
        None
    } else {
        let (wal, scan) = Wal::open(wal_dir, after, segment_bytes_max, codec::FORMAT_VERSION, &mut on_record)?;
        report.scan = scan;
        Some(wal)
    };
    // The snapshot was committed only once the log was durable up to its
    // newest record, so a log that ends before it has lost segments: starting
    // would hand out LSNs that replay later skips.
    let log_end = report.scan.last_lsn.unwrap_or(0).max(after);
    if snapshot_lsn > log_end {
        return Err(StorageError::Corrupt(format!(
            "the WAL ends at LSN {log_end} but the snapshot holds changes up to LSN {snapshot_lsn}: segments \
             of the log are missing (deleted or restored from an older backup); restore the wal directory \
             that belongs with this snapshot"
        )));
    }
    report.replayed_records = replayed;
    engine.finish_recovery();
    report.duration = started.elapsed();
    Ok((engine, wal, report))
}

/// What [`write_engine_snapshot`] wrote.
#[derive(Debug, Clone, Copy, Default)]
pub struct Written {
    /// Every shard is at least as of this LSN.
    pub min_lsn: u64,
    /// Encoded size of the shards.
    pub bytes: usize,
    /// The engine time it was written at.
    pub created_ms: Millis,
}

/// Writes a snapshot of `engine` into `snapshots`, at engine time `now_ms`
/// or later:
/// shards one at a time under their own lock (requests to other shards go
/// on), then the signals, policy versions and usage taken from them. It is
/// committed only once `wait_durable` says the newest record it holds is
/// durable (on a cluster node: committed), so it never holds a change the
/// log might lose. `delivered_seq` bounds event retention; `raft` is a
/// cluster node's Raft state, stored with it (empty on a single node).
/// After the locked part, the file is written on a thread of its own at
/// background priority (see [`background_priority`]) while the caller waits.
pub fn write_engine_snapshot(
    snapshots: &SnapshotStore,
    engine: &Engine,
    now_ms: Millis,
    wait_durable: &(dyn Fn(u64) -> Result<(), StorageError> + Sync),
    delivered_seq: u64,
    raft: Vec<u8>,
) -> Result<Written, StorageError> {
    let mut encoded = Vec::new();
    let (mut min_lsn, mut max_lsn) = (u64::MAX, 0);
    let mut usage = crate::engine::UsageDeltas::new();
    // Usage readers wait while buckets are out of memory and not yet in the file.
    let _moving = engine.usage_move();
    let taken = engine.for_each_shard_taking_usage(|_, shard, deltas| {
        crate::engine::merge_usage(&mut usage, deltas);
        encoded.push(codec::encode_shard(shard).map_err(|e| StorageError::Io(e.to_string()))?);
        min_lsn = min_lsn.min(shard.applied_lsn);
        max_lsn = max_lsn.max(shard.applied_lsn);
        Ok::<(), StorageError>(())
    });
    // Whatever goes wrong from here, the usage taken out goes back.
    let r = taken.and_then(|()| {
        let taken = Taken {
            encoded: &encoded,
            max_lsn,
            usage: &usage,
        };
        write_taken(snapshots, engine, now_ms, taken, wait_durable, delivered_seq, raft)
    });
    if r.is_err() {
        engine.restore_usage(usage);
    }
    r.map(|created_ms| Written {
        min_lsn,
        bytes: encoded.iter().map(Vec::len).sum(),
        created_ms,
    })
}

/// Lowers the calling thread's CPU priority to the lowest (nice 19): for
/// a thread that only writes a snapshot file and then ends. Linux keeps a
/// nice value per thread, so the daemon's other threads are untouched.
fn background_priority() {
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19) {
        tracing::debug!(error = %e, "the snapshot writer keeps its priority");
    }
}

/// The shards and usage a snapshot took out of the engine.
struct Taken<'a> {
    encoded: &'a [Vec<u8>],
    max_lsn: u64,
    usage: &'a crate::engine::UsageDeltas,
}

/// Writes what was taken; returns the engine time it was written at (read
/// after the wait, so no change it holds is later than it).
fn write_taken(
    snapshots: &SnapshotStore,
    engine: &Engine,
    now_ms: Millis,
    taken: Taken<'_>,
    wait_durable: &(dyn Fn(u64) -> Result<(), StorageError> + Sync),
    delivered_seq: u64,
    raft: Vec<u8>,
) -> Result<Millis, StorageError> {
    // Captured after the shards: signals and policy versions are applied
    // before a record's shard effects are released, so these cover every
    // change the shards hold (replay skips what they already have).
    let (signals, events) = engine.signals_for_snapshot();
    let policy_log = engine.policy_log();
    let policy = engine.policy();
    // The file write is most of a snapshot's CPU and takes no lock a
    // request needs: it runs at background priority, so on a busy daemon
    // answers go first and the snapshot takes the idle time. What does take
    // such a lock (the signals' in `events_stored`, the log's when segments
    // are deleted) stays on the caller's thread and priority.
    let write = || -> Result<Millis, StorageError> {
        background_priority();
        let policy_bytes = codec::encode_policy_log(&policy_log).map_err(|e| StorageError::Io(e.to_string()))?;
        let state = codec::encode_signals(&signals).map_err(|e| StorageError::Io(e.to_string()))?;
        wait_durable(taken.max_lsn.max(signals.applied_lsn).max(policy_log.applied_lsn))?;
        let json: Vec<Vec<u8>> = events.iter().map(|e| e.to_json().to_string().into_bytes()).collect();
        let now = engine.time(now_ms);
        let part = snapshot::SignalsPart {
            state,
            events: events
                .iter()
                .zip(&json)
                .map(|(e, j)| (e.seq, e.at_ms, j.as_slice()))
                .collect(),
            retain_after_ms: now.saturating_sub(policy.events_retention_ms),
            delivered_seq,
            policy: policy_bytes,
            raft: raft.clone(),
        };
        let (hours_kept, days_kept) = policy.history_retention_ms;
        let usage = snapshot::UsagePart {
            deltas: taken.usage,
            hours_before_ms: now.saturating_sub(hours_kept),
            days_before_ms: now.saturating_sub(days_kept),
        };
        snapshots
            .write(taken.encoded, now, taken.max_lsn, &part, &usage)
            .map_err(|e| StorageError::Io(e.to_string()))?;
        Ok(now)
    };
    let now = std::thread::scope(|s| {
        match std::thread::Builder::new()
            .name("quotad-snapshot".into())
            .spawn_scoped(s, write)
        {
            Ok(h) => h
                .join()
                .unwrap_or_else(|_| Err(StorageError::Io("the snapshot writer panicked".into()))),
            // No thread to spare: written here, at this thread's priority.
            Err(_) => write(),
        }
    })?;
    if let Some(last) = events.last() {
        engine.events_stored(last.seq);
    }
    Ok(now)
}

impl Storage {
    /// Opens `config.data_dir` on the real filesystem and recovers the state.
    pub fn open(
        config: &StorageConfig,
        policy: Policy,
        metrics: Arc<StorageMetrics>,
    ) -> Result<(Engine, Storage, RecoveryReport), StorageError> {
        let lock = lock_dir(&config.data_dir)?;
        let dir = FsDir::preallocating(
            &wal_dir(&config.data_dir),
            io::write_ahead_bytes(config.segment_bytes_max),
        )
        .map_err(|e| StorageError::Io(e.to_string()))?;
        let path = snapshot_path(&config.data_dir);
        // Checked read-only first, so that a refusal to start leaves the file
        // as it was: opened for writing, redb rewrites its header.
        let checked = SnapshotStore::check_in_place(&path).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        let mut snapshots = SnapshotStore::open(&path).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        if checked {
            snapshots = snapshots.values_checked();
        }
        Self::open_with(config, policy, Arc::new(dir), snapshots, Some(lock), metrics)
    }

    /// As `open`, with the WAL in `dir` (tests use a simulated one).
    pub fn open_with(
        config: &StorageConfig,
        policy: Policy,
        dir: Arc<dyn WalDir>,
        snapshots: SnapshotStore,
        lock: Option<File>,
        metrics: Arc<StorageMetrics>,
    ) -> Result<(Engine, Storage, RecoveryReport), StorageError> {
        let (mut engine, wal, report) = recover(Some(&snapshots), dir, policy, config.segment_bytes_max, false)?;
        let (started_after, started_ms) = (report.snapshot_min_lsn, engine.time(0));
        let writer = WriterConfig {
            durability: config.durability,
            flush_interval: Duration::from_millis(config.flush_interval_ms),
            gather: config.gather_commits,
            gather_max: journal::GATHER_MAX,
            queue_bytes_max: config.queue_bytes_max,
            metrics: metrics.clone(),
        };
        metrics.recovery_seconds.set(report.duration.as_secs_f64());
        metrics.recovery_torn_tail_bytes.set(report.scan.torn_tail_bytes as i64);
        metrics.recovery_replayed_records.set(report.replayed_records as i64);
        if let Some(ms) = report.snapshot_created_ms {
            metrics.snapshot_timestamp_seconds.set(ms as f64 / 1000.0);
        }
        let journal = Arc::new(WalJournal::start(wal.expect("opened for writing"), writer));
        engine.set_journal(journal.clone() as Arc<dyn Journal>);
        Ok((
            engine,
            Storage {
                journal,
                snapshots,
                config: config.clone(),
                metrics,
                event_floor: Arc::new(AtomicU64::new(u64::MAX)),
                // What the log held before this start counts as covered now:
                // kept at least a full retention from here (never less).
                covered: std::sync::Mutex::new(std::collections::VecDeque::from([(started_after, started_ms)])),
                wal_retention_ms: config.wal_retention_ms().map_err(|e| StorageError::Io(e.to_string()))?,
                _lock: lock,
            },
            report,
        ))
    }

    /// The WAL writer (journal of the engine).
    pub fn journal(&self) -> &Arc<WalJournal> {
        &self.journal
    }

    /// The snapshot file: events older than memory holds are read from it.
    pub fn snapshots(&self) -> &SnapshotStore {
        &self.snapshots
    }

    /// Where webhook delivery publishes the newest seq every webhook has: the
    /// snapshot keeps events above it whatever their age.
    pub fn event_floor(&self) -> Arc<AtomicU64> {
        self.event_floor.clone()
    }

    /// Usage buckets memory may hold before a snapshot moves them to disk.
    pub const USAGE_BACKLOG_MAX: usize = 200_000;
    /// Events memory may hold before a snapshot moves them to disk.
    pub const EVENT_BACKLOG_MAX: usize = 100_000;

    /// Whether enough has been logged since the last snapshot to take another.
    /// Also when memory holds [`Self::USAGE_BACKLOG_MAX`] usage buckets or
    /// [`Self::EVENT_BACKLOG_MAX`] events: a snapshot is what moves them to disk.
    pub fn snapshot_due(&self, engine: &Engine) -> bool {
        let (records, bytes) = self.journal.since_snapshot();
        records >= self.config.snapshot_every_records
            || bytes >= self.config.snapshot_every_bytes
            || Self::backlog_due(engine)
    }

    /// Whether memory holds enough usage buckets or events that a snapshot
    /// should move them to disk.
    pub fn backlog_due(engine: &Engine) -> bool {
        (engine.policy().history && engine.usage_backlog() >= Self::USAGE_BACKLOG_MAX)
            || engine.recent_event_count() >= Self::EVENT_BACKLOG_MAX
    }

    /// Writes a snapshot of `engine` and deletes the WAL segments it covers.
    /// Shards are encoded one at a time under their own lock, so requests to
    /// other shards go on; the snapshot is committed only once the WAL is durable
    /// up to the newest record it contains, so it never holds an unacknowledged
    /// change the log might lose.
    pub fn snapshot(&self, engine: &Engine, now_ms: Millis) -> Result<SnapshotReport, StorageError> {
        let r = self.write_snapshot(engine, now_ms);
        if r.is_err() {
            self.metrics.snapshot_failures.inc();
        }
        r
    }

    fn write_snapshot(&self, engine: &Engine, now_ms: Millis) -> Result<SnapshotReport, StorageError> {
        let started = Instant::now();
        self.journal.mark_snapshot();
        let wait = |lsn| {
            self.journal
                .wait_durable_blocking(lsn)
                .map_err(|e| StorageError::Io(e.to_string()))
        };
        let written = write_engine_snapshot(
            &self.snapshots,
            engine,
            now_ms,
            &wait,
            self.event_floor.load(Ordering::Acquire),
            Vec::new(),
        )?;
        let segments_removed = match self.removable_through(written.min_lsn, written.created_ms) {
            Some(lsn) => self
                .journal
                .wal()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove_through(lsn)?,
            None => 0,
        };
        let report = SnapshotReport {
            min_lsn: written.min_lsn,
            bytes: written.bytes,
            segments_removed,
            duration: started.elapsed(),
        };
        let m = &self.metrics;
        m.snapshots.inc();
        m.snapshot_seconds.set(report.duration.as_secs_f64());
        m.snapshot_bytes.set(report.bytes as i64);
        m.snapshot_timestamp_seconds.set(now_ms as f64 / 1000.0);
        Ok(report)
    }

    /// Through which LSN covered segments may go now that a snapshot at
    /// engine time `now` covers `min_lsn`: all of it without retention, else
    /// what snapshots at least `wal_retention` old covered.
    fn removable_through(&self, min_lsn: u64, now: u64) -> Option<u64> {
        if self.wal_retention_ms == 0 {
            return Some(min_lsn);
        }
        let mut covered = self.covered.lock().unwrap_or_else(|e| e.into_inner());
        covered.push_back((min_lsn, now));
        let cutoff = now.saturating_sub(self.wal_retention_ms);
        let mut through = None;
        while covered.front().is_some_and(|&(_, at)| at <= cutoff) {
            through = covered.pop_front().map(|(lsn, _)| lsn);
        }
        through
    }

    /// Writes out what is queued and stops the writer.
    pub fn close(&self) -> Result<(), StorageError> {
        self.journal.close().map_err(|e| StorageError::Io(e.to_string()))
    }
}
