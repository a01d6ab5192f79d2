//! Snapshots in redb: every shard of the engine state (counters, subjects, open
//! and finished reservations, idempotency keys, each with the LSN it is as of),
//! written in one transaction. Layout:
//!
//! - table `meta` (`&str` → `u64`): `format_version`, `shard_count`, `created_ms` (the
//!   engine time it was written at: time resumes from it at start), and from
//!   version 2 `last_lsn` (the newest record any shard holds: the log must reach
//!   it, and new records are numbered after it) and `meta_crc` (CRC-32 of the
//!   four values, little-endian, in that order);
//! - table `shards` (`u32` → bytes): shard index → from version 2, CRC-32 of
//!   the encoded shard (4 bytes, little-endian) followed by it; version 1 has
//!   the encoded shard alone.
//!
//! - from version 3, table `signals` (`&str` → bytes): `state` → CRC-32 (4
//!   bytes, little-endian) and the encoded signals state (threshold marks,
//!   breakers, flags, the newest event's seq and the LSN it is as of);
//! - table `events` (`u64` → bytes): seq → from version 4, CRC-32 (4 bytes,
//!   little-endian, of the seq, the time and the JSON), then engine time in
//!   ms (8 bytes, little-endian) and the event's JSON. Events are moved here
//!   from memory by each snapshot and dropped past `events.retention` once
//!   every webhook delivered them.
//! - tables `usage_hours` and `usage_days` ((subject, hour or UTC-day start)
//!   → amounts, from version 4 behind a CRC-32 of the key and the amounts)
//!   with `…_by_time` indexes ((start, subject) → ()): usage history, merged
//!   in from the shards' in-memory deltas by each snapshot, in the same
//!   transaction as the shards they were taken from. An index carries no
//!   value: it is checked against its table (the same keys, one for one).
//!
//! redb keeps the file consistent across crashes but does not checksum the
//! values it stores: the CRCs are what turns a flipped bit in a stored value
//! into a refusal to start (naming the file, table and key) instead of a
//! silently different state. Every value is checked when the file is loaded
//! at start (and by `quotad wal verify`), and again whenever it is read.
//! A version 3 file is rewritten to version 4 when the daemon opens it.
//!
//! redb reuses freed pages but does not give them back: a file that grows
//! past twice its live data (and past [`COMPACT_FLOOR_BYTES`]) is compacted
//! after a snapshot.

use std::collections::BTreeMap;
use std::path::Path;

use std::sync::{RwLock, RwLockReadGuard};

use redb::{
    Database, ReadOnlyDatabase, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};

use super::codec;
use crate::engine::{Lsn, Shard};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SHARDS: TableDefinition<u32, &[u8]> = TableDefinition::new("shards");
const SIGNALS: TableDefinition<&str, &[u8]> = TableDefinition::new("signals");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// The policy's stored versions under "versions" (format 5), checksummed.
const POLICY: TableDefinition<&str, &[u8]> = TableDefinition::new("policy");
/// A cluster node's Raft state under "state" (the last log id the snapshot
/// covers and the membership), checksummed; absent on a single node.
const RAFT: TableDefinition<&str, &[u8]> = TableDefinition::new("raft");
/// Usage history: (subject, hour start) → amounts.
const USAGE_HOURS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("usage_hours");
/// Usage history: (subject, UTC day start) → amounts.
const USAGE_DAYS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("usage_days");
/// The same keys by time first, for retention and the billing export.
const USAGE_HOURS_BY_TIME: TableDefinition<(u64, &str), ()> = TableDefinition::new("usage_hours_by_time");
const USAGE_DAYS_BY_TIME: TableDefinition<(u64, &str), ()> = TableDefinition::new("usage_days_by_time");

const DAY_MS: u64 = 86_400_000;

/// The snapshot format from which event and usage values carry checksums.
const CHECKED_VALUES_VERSION: u64 = 4;

/// redb's page cache for the snapshot file. Its default (1 GiB) let the
/// start-up check of every value, which reads the whole file, keep up to a
/// gigabyte of it in memory for good; queries read little at a time.
const CACHE_BYTES: usize = 64 << 20;

/// Files smaller than this are never compacted: redb's own overhead is a
/// large share of a small file.
pub const COMPACT_FLOOR_BYTES: u64 = 4 << 20;

/// A table that may not exist yet (a file written before it): `None` then.
fn optional<T>(table: Result<T, redb::TableError>) -> Result<Option<T>, redb::TableError> {
    match table {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A stored value that fails its check: which table and key.
fn damaged(table: &str, key: impl std::fmt::Display, what: &str) -> String {
    format!("table {table}, key {key}: {what}: the file is damaged; restore it from a backup")
}

fn usage_crc(subject: &str, start: u64, amounts: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&(subject.len() as u32).to_le_bytes());
    h.update(subject.as_bytes());
    h.update(&start.to_le_bytes());
    h.update(amounts);
    h.finalize()
}

/// A usage bucket as stored: CRC-32 of its key and amounts, then the amounts.
pub fn seal_usage(subject: &str, start: u64, amounts: &BTreeMap<String, u64>) -> Vec<u8> {
    let body = encode_amounts(amounts);
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&usage_crc(subject, start, &body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Checks and decodes a stored usage bucket.
pub fn open_usage(table: &str, subject: &str, start: u64, value: &[u8]) -> Result<BTreeMap<String, u64>, String> {
    let key = || format!("({subject:?}, {start})");
    let (crc, body) = value
        .split_first_chunk::<4>()
        .ok_or_else(|| damaged(table, key(), "too short for its checksum"))?;
    if u32::from_le_bytes(*crc) != usage_crc(subject, start, body) {
        return Err(damaged(table, key(), "fails its checksum"));
    }
    decode_amounts(body).ok_or_else(|| damaged(table, key(), "does not decode"))
}

fn event_crc(seq: u64, rest: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(rest);
    h.finalize()
}

/// An event as stored: CRC-32 of its seq, time and JSON, then the time and the JSON.
pub fn seal_event(seq: u64, at_ms: u64, json: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&at_ms.to_le_bytes());
    out.extend_from_slice(json);
    let crc = event_crc(seq, &out[4..]);
    out[..4].copy_from_slice(&crc.to_le_bytes());
}

/// Checks a stored event: (engine time, JSON).
pub fn open_event(seq: u64, value: &[u8]) -> Result<(u64, &[u8]), String> {
    let (crc, rest) = value
        .split_first_chunk::<4>()
        .filter(|(_, rest)| rest.len() >= 8)
        .ok_or_else(|| damaged("events", seq, "too short for its checksum and time"))?;
    if u32::from_le_bytes(*crc) != event_crc(seq, rest) {
        return Err(damaged("events", seq, "fails its checksum"));
    }
    let (at, json) = rest.split_first_chunk::<8>().expect("length checked");
    Ok((u64::from_le_bytes(*at), json))
}

/// Usage amounts as stored: per metric, its name's length (1 byte), the
/// name, and the amount (8 bytes, little-endian).
fn encode_amounts(amounts: &BTreeMap<String, u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(amounts.len() * 24);
    for (m, a) in amounts {
        let name = &m.as_bytes()[..m.len().min(255)];
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&a.to_le_bytes());
    }
    out
}

fn decode_amounts(mut b: &[u8]) -> Option<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    while let Some((&n, rest)) = b.split_first() {
        let (name, rest) = rest.split_at_checked(n as usize)?;
        let (amount, rest) = rest.split_first_chunk::<8>()?;
        out.insert(String::from_utf8(name.to_vec()).ok()?, u64::from_le_bytes(*amount));
        b = rest;
    }
    Some(out)
}

/// Which history buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    /// Hourly buckets.
    Hour,
    /// Daily (UTC) buckets.
    Day,
}

impl Grain {
    /// The table of this grain's buckets, with its name.
    fn table(
        self,
    ) -> (
        &'static str,
        TableDefinition<'static, (&'static str, u64), &'static [u8]>,
    ) {
        match self {
            Grain::Hour => ("usage_hours", USAGE_HOURS),
            Grain::Day => ("usage_days", USAGE_DAYS),
        }
    }
}

/// Usage to add to the history in a snapshot, and what retention drops.
pub struct UsagePart<'a> {
    /// (subject, hour start) → metric → amount.
    pub deltas: &'a crate::engine::UsageDeltas,
    /// Hourly buckets that start before this go.
    pub hours_before_ms: u64,
    /// Daily buckets that start before this go.
    pub days_before_ms: u64,
}

/// One stored bucket: subject, start, amounts.
pub type UsageRow = (String, u64, BTreeMap<String, u64>);
/// One subject's stored bucket: start, amounts.
pub type UsageBucket = (u64, BTreeMap<String, u64>);

/// What a snapshot writes besides the shards.
#[derive(Debug, Default)]
pub struct SignalsPart<'a> {
    /// The encoded signals state.
    pub state: Vec<u8>,
    /// Events to add: (seq, engine time, JSON).
    pub events: Vec<(u64, u64, &'a [u8])>,
    /// Events older than this engine time may be dropped...
    pub retain_after_ms: u64,
    /// ...if their seq is at most this (every webhook delivered them).
    pub delivered_seq: u64,
    /// The encoded policy versions; empty stores none.
    pub policy: Vec<u8>,
    /// A cluster node's Raft state; empty on a single node, which writes
    /// no `raft` table at all.
    pub raft: Vec<u8>,
}

/// Snapshot failures.
#[derive(Debug, thiserror::Error)]
#[error("snapshot {path}: {message}")]
pub struct SnapshotError {
    /// The snapshot file.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

/// A snapshot read back.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The shards, in index order.
    pub shards: Vec<Shard>,
    /// Engine time when it was written.
    pub created_ms: u64,
    /// The newest LSN any shard holds.
    pub last_lsn: Lsn,
    /// The encoded signals state (version 3 and later).
    pub signals: Option<Vec<u8>>,
    /// The encoded policy versions (version 5 and later).
    pub policy: Option<Vec<u8>>,
    /// A cluster node's Raft state.
    pub raft: Option<Vec<u8>>,
}

/// Opened for writing (the daemon) or only for reading (`quotad wal verify`,
/// which must not change a byte of a directory it inspects).
enum Db {
    ReadWrite(Database),
    ReadOnly(ReadOnlyDatabase),
    /// A repaired private copy of a file that was not closed cleanly; the
    /// copy is deleted with it.
    Copy {
        db: Database,
        _file: PrivateCopy,
    },
}

impl Db {
    fn begin_read(&self) -> Result<redb::ReadTransaction, redb::TransactionError> {
        match self {
            Db::ReadWrite(d) | Db::Copy { db: d, .. } => d.begin_read(),
            Db::ReadOnly(d) => d.begin_read(),
        }
    }
}

/// A copy of a redb file in the temp directory, deleted when dropped: where
/// a read-only check repairs a file that was not closed cleanly.
pub(crate) struct PrivateCopy(pub(crate) std::path::PathBuf);

impl PrivateCopy {
    pub(crate) fn of(path: &Path) -> std::io::Result<PrivateCopy> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let to = std::env::temp_dir().join(format!("quotad-verify-{}-{n}.redb", std::process::id()));
        std::fs::copy(path, &to)?;
        Ok(PrivateCopy(to))
    }
}

impl Drop for PrivateCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The snapshot file. Clones share it.
#[derive(Clone)]
pub struct SnapshotStore {
    /// Read transactions hold the read side for as long as they live;
    /// compaction takes the write side, since redb compacts only a database
    /// with no transaction open.
    db: std::sync::Arc<RwLock<Db>>,
    path: String,
    /// The event and usage values were checked before this store was opened
    /// for writing: `load` skips that full read.
    values_checked: bool,
    /// Counts the writes that changed the file's content (snapshots, a
    /// replaced file): a reader may keep what it computed from the file
    /// while this stays the same.
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

fn meta_crc(version: u64, count: u64, created_ms: u64, last_lsn: u64) -> u64 {
    let mut h = crc32fast::Hasher::new();
    for v in [version, count, created_ms, last_lsn] {
        h.update(&v.to_le_bytes());
    }
    u64::from(h.finalize())
}

impl SnapshotStore {
    /// Opens or creates the file.
    pub fn open(path: &Path) -> Result<SnapshotStore, SnapshotError> {
        let p = path.display().to_string();
        let fresh = !path.exists();
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| SnapshotError {
                path: p.clone(),
                message: e.to_string(),
            })?;
        if fresh {
            crate::storage::restrict_file(path).map_err(|e| SnapshotError {
                path: p.clone(),
                message: e.to_string(),
            })?;
        }
        let store = SnapshotStore {
            db: std::sync::Arc::new(RwLock::new(Db::ReadWrite(db))),
            path: p,
            values_checked: false,
            generation: Default::default(),
        };
        store.upgrade()?;
        Ok(store)
    }

    /// Copies the file as it stands to `to` (synced): what a cluster node
    /// sends a peer that needs a snapshot. No write runs meanwhile.
    pub fn copy_to(&self, to: &Path) -> Result<(), SnapshotError> {
        let _no_writes = self.db.write().unwrap_or_else(|e| e.into_inner());
        let copy = || -> std::io::Result<()> {
            std::fs::copy(&self.path, to)?;
            std::fs::File::open(to)?.sync_all()
        };
        copy().map_err(|e| self.err(format!("cannot copy it to {}: {e}", to.display())))
    }

    /// Puts the complete snapshot file `from` (a cluster node's installed
    /// snapshot, synced) in place of this one, durably, and reads and writes
    /// it from now on.
    pub fn replace_with(&self, from: &Path) -> Result<(), SnapshotError> {
        let mut guard = self.db.write().unwrap_or_else(|e| e.into_inner());
        let path = Path::new(&self.path);
        std::fs::rename(from, path).map_err(|e| self.err(format!("cannot move {} over it: {e}", from.display())))?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| self.err(format!("cannot sync {}: {e}", dir.display())))?;
        }
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| self.err(e))?;
        *guard = Db::ReadWrite(db);
        self.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Opens an existing file without changing a byte of it; `None` if there
    /// is none. A file that was not closed cleanly (the daemon was killed)
    /// needs redb's repair before it can be read: that repair is done on a
    /// private copy in the temp directory, never on the file itself.
    pub fn open_read_only(path: &Path) -> Result<Option<SnapshotStore>, SnapshotError> {
        if !path.exists() {
            return Ok(None);
        }
        let p = path.display().to_string();
        let err = |e: &dyn std::fmt::Display| SnapshotError {
            path: p.clone(),
            message: e.to_string(),
        };
        match ReadOnlyDatabase::open(path) {
            Ok(db) => Ok(Some(SnapshotStore {
                db: std::sync::Arc::new(RwLock::new(Db::ReadOnly(db))),
                path: p,
                values_checked: false,
                generation: Default::default(),
            })),
            Err(redb::DatabaseError::RepairAborted) => {
                let copy = PrivateCopy::of(path).map_err(|e| err(&e))?;
                let db = Database::open(&copy.0).map_err(|e| err(&e))?;
                Ok(Some(SnapshotStore {
                    db: std::sync::Arc::new(RwLock::new(Db::Copy { db, _file: copy })),
                    path: p,
                    values_checked: false,
                    generation: Default::default(),
                }))
            }
            Err(e) => Err(err(&e)),
        }
    }

    /// A store kept in memory, for tests: it outlives a simulated crash as long
    /// as a clone is kept, like a committed file would.
    pub fn in_memory() -> SnapshotStore {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .expect("an in-memory database opens");
        SnapshotStore {
            db: std::sync::Arc::new(RwLock::new(Db::ReadWrite(db))),
            path: "<memory>".into(),
            values_checked: false,
            generation: Default::default(),
        }
    }

    /// A read transaction, with the guard that keeps compaction out while it
    /// lives (bind both: `let (_db, txn) = ...`).
    fn read(&self) -> Result<(RwLockReadGuard<'_, Db>, ReadTransaction), SnapshotError> {
        let db = self.db.read().unwrap_or_else(|e| e.into_inner());
        let txn = db.begin_read().map_err(|e| self.err(e))?;
        Ok((db, txn))
    }

    fn err(&self, e: impl std::fmt::Display) -> SnapshotError {
        SnapshotError {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Reads the snapshot; `None` if none was ever written.
    pub fn load(&self) -> Result<Option<Loaded>, SnapshotError> {
        self.read_snapshot(true, !self.values_checked)
    }

    /// Checks a snapshot file without changing a byte of it: the metadata,
    /// every shard's checksum and every stored value, as a load does, but
    /// without decoding the shards. `Ok(false)` when there is no file, or
    /// when it was not closed cleanly (redb must repair it first, which the
    /// daemon's own open does; the load then checks the values).
    pub fn check_in_place(path: &Path) -> Result<bool, SnapshotError> {
        if !path.exists() {
            return Ok(false);
        }
        let db = match ReadOnlyDatabase::open(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::RepairAborted) => return Ok(false),
            Err(e) => {
                return Err(SnapshotError {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })
            }
        };
        let store = SnapshotStore {
            db: std::sync::Arc::new(RwLock::new(Db::ReadOnly(db))),
            path: path.display().to_string(),
            values_checked: false,
            generation: Default::default(),
        };
        store.read_snapshot(false, true).map(|_| true)
    }

    /// This store's values were checked by [`Self::check_in_place`]: its
    /// load need not read them all again.
    pub fn values_checked(mut self) -> SnapshotStore {
        self.values_checked = true;
        self
    }

    /// Reads the snapshot, decoding the shards only with `decode` and
    /// checking every event and usage value only with `check_values`.
    fn read_snapshot(&self, decode: bool, check_values: bool) -> Result<Option<Loaded>, SnapshotError> {
        let (_db, txn) = self.read()?;
        let meta = match txn.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        let get = |k: &str| -> Result<u64, SnapshotError> {
            meta.get(k)
                .map_err(|e| self.err(e))?
                .map(|v| v.value())
                .ok_or_else(|| self.err(format!("metadata key {k:?} is missing")))
        };
        let version = get("format_version")?;
        let count = get("shard_count")?;
        let created_ms = get("created_ms")?;
        let stored_last = if version >= 2 {
            let last = get("last_lsn")?;
            if get("meta_crc")? != meta_crc(version, count, created_ms, last) {
                return Err(self.err(
                    "metadata checksum mismatch (table meta): the file is damaged; restore it from a backup, \
                     or move it away to recover from the WAL alone if the WAL still starts at LSN 1",
                ));
            }
            Some(last)
        } else {
            None
        };
        let version = u16::try_from(version).map_err(|_| self.err(format!("format version {version} is unknown")))?;
        let count = usize::try_from(count)
            .ok()
            .filter(|&c| c <= 1 << 16)
            .ok_or_else(|| self.err(format!("shard count {count} is out of range")))?;
        let table = txn.open_table(SHARDS).map_err(|e| self.err(e))?;
        let mut shards = Vec::with_capacity(count);
        for i in 0..count {
            let value = table
                .get(i as u32)
                .map_err(|e| self.err(e))?
                .ok_or_else(|| self.err(format!("table shards, key {i}: the shard is missing")))?;
            let bytes = value.value();
            let encoded = if version >= 2 {
                let (crc, rest) = bytes.split_first_chunk::<4>().ok_or_else(|| {
                    self.err(format!(
                        "table shards, key {i}: the shard is {} bytes, too short for its checksum",
                        bytes.len()
                    ))
                })?;
                if u32::from_le_bytes(*crc) != crc32fast::hash(rest) {
                    return Err(self.err(format!(
                        "table shards, key {i}: the shard ({} bytes) fails its checksum: the file is damaged; restore it from a \
                         backup",
                        bytes.len()
                    )));
                }
                rest
            } else {
                bytes
            };
            if !decode {
                continue;
            }
            let shard = codec::decode_shard(version, encoded).map_err(|e| {
                self.err(format!(
                    "table shards, key {i}: the shard ({} bytes) does not decode: {e}",
                    bytes.len()
                ))
            })?;
            shards.push(shard);
        }
        let last_lsn = shards.iter().map(|s| s.applied_lsn).max().unwrap_or(0);
        if let Some(stored) = stored_last.filter(|&l| decode && l != last_lsn) {
            return Err(self.err(format!(
                "metadata says the newest record is LSN {stored}, the shards say {last_lsn}: the file is damaged"
            )));
        }
        let signals = self.read_sealed(&txn, SIGNALS, "signals", "state", "the signals state")?;
        let policy = self.read_sealed(&txn, POLICY, "policy", "versions", "the policy's versions")?;
        let raft = self.read_sealed(&txn, RAFT, "raft", "state", "the Raft state")?;
        if check_values {
            self.verify_values(&txn, u64::from(version))?;
        }
        Ok(Some(Loaded {
            shards,
            created_ms,
            last_lsn,
            signals,
            policy,
            raft,
        }))
    }

    /// A value stored behind its CRC-32, checked; `None` when the table or
    /// key does not exist (a file written before it).
    fn read_sealed(
        &self,
        txn: &ReadTransaction,
        def: TableDefinition<&str, &[u8]>,
        table: &str,
        key: &str,
        what: &str,
    ) -> Result<Option<Vec<u8>>, SnapshotError> {
        let Some(t) = optional(txn.open_table(def)).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        let Some(v) = t.get(key).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        let bytes = v.value();
        let ok = bytes
            .split_first_chunk::<4>()
            .filter(|(crc, rest)| u32::from_le_bytes(**crc) == crc32fast::hash(rest));
        let Some((_, rest)) = ok else {
            return Err(self.err(format!(
                "table {table}, key {key:?}: {what} ({} bytes) fails its checksum: the file is damaged; restore it \
                 from a backup",
                bytes.len()
            )));
        };
        Ok(Some(rest.to_vec()))
    }

    /// Checks every stored event and usage bucket (their checksums from
    /// version 4, that they decode before it) and that each usage index
    /// holds exactly its table's keys.
    fn verify_values(&self, txn: &ReadTransaction, version: u64) -> Result<(), SnapshotError> {
        let checked = version >= CHECKED_VALUES_VERSION;
        if let Some(table) = optional(txn.open_table(EVENTS)).map_err(|e| self.err(e))? {
            for item in table.iter().map_err(|e| self.err(e))? {
                let (k, v) = item.map_err(|e| self.err(e))?;
                if checked {
                    open_event(k.value(), v.value()).map_err(|m| self.err(m))?;
                } else if v.value().len() < 8 {
                    return Err(self.err(damaged("events", k.value(), "too short for its time")));
                }
            }
        }
        for (name, def, index_name, index_def) in [
            ("usage_hours", USAGE_HOURS, "usage_hours_by_time", USAGE_HOURS_BY_TIME),
            ("usage_days", USAGE_DAYS, "usage_days_by_time", USAGE_DAYS_BY_TIME),
        ] {
            let table = optional(txn.open_table(def)).map_err(|e| self.err(e))?;
            let index = optional(txn.open_table(index_def)).map_err(|e| self.err(e))?;
            let (table, index) = match (table, index) {
                (Some(t), Some(i)) => (t, i),
                (None, None) => continue,
                // One without the other: fine only while both are empty.
                (Some(t), None) if t.is_empty().map_err(|e| self.err(e))? => continue,
                (None, Some(i)) if i.is_empty().map_err(|e| self.err(e))? => continue,
                _ => {
                    return Err(self.err(format!(
                        "table {name} and its index {index_name} do not both exist: the file is damaged; restore \
                         it from a backup"
                    )))
                }
            };
            for item in table.iter().map_err(|e| self.err(e))? {
                let (k, v) = item.map_err(|e| self.err(e))?;
                let (subject, start) = k.value();
                if checked {
                    open_usage(name, subject, start, v.value()).map_err(|m| self.err(m))?;
                } else if decode_amounts(v.value()).is_none() {
                    return Err(self.err(damaged(name, format!("({subject:?}, {start})"), "does not decode")));
                }
            }
            // Every index key names a bucket; with as many keys as the table,
            // that is the table's keys one for one.
            for item in index.iter().map_err(|e| self.err(e))? {
                let (k, _) = item.map_err(|e| self.err(e))?;
                let (start, subject) = k.value();
                if table.get((subject, start)).map_err(|e| self.err(e))?.is_none() {
                    return Err(self.err(damaged(
                        index_name,
                        format!("({start}, {subject:?})"),
                        &format!("names no bucket of table {name}"),
                    )));
                }
            }
            let (n, ni) = (
                table.len().map_err(|e| self.err(e))?,
                index.len().map_err(|e| self.err(e))?,
            );
            if n != ni {
                return Err(self.err(format!(
                    "table {index_name} has {ni} keys but table {name} has {n}: the file is damaged; restore it \
                     from a backup"
                )));
            }
        }
        Ok(())
    }

    /// Rewrites a version 3 file's event and usage values with their
    /// checksums (version 4; shards encode the same in both). Files older
    /// than version 3 have no such tables and are rewritten whole by the next
    /// snapshot.
    fn upgrade(&self) -> Result<(), SnapshotError> {
        let meta: Option<[u64; 4]> = {
            let (_db, txn) = self.read()?;
            match txn.open_table(META) {
                Ok(t) => {
                    let get = |k: &str| t.get(k).ok().flatten().map(|v| v.value());
                    match (
                        get("format_version"),
                        get("shard_count"),
                        get("created_ms"),
                        get("last_lsn"),
                    ) {
                        (Some(v), Some(c), Some(t), Some(l)) => Some([v, c, t, l]),
                        _ => None,
                    }
                }
                Err(_) => None,
            }
        };
        // Anything else (no file yet, damage) is for `load` to report.
        let Some([3, count, created_ms, last_lsn]) = meta else {
            return Ok(());
        };
        let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
        let Db::ReadWrite(db) = &*guard else {
            return Ok(());
        };
        let txn = db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut events = txn.open_table(EVENTS).map_err(|e| self.err(e))?;
            let old: Vec<(u64, Vec<u8>)> = events
                .iter()
                .map_err(|e| self.err(e))?
                .map(|item| item.map(|(k, v)| (k.value(), v.value().to_vec())))
                .collect::<Result<_, _>>()
                .map_err(|e| self.err(e))?;
            let mut value = Vec::new();
            for (seq, bytes) in old {
                let (at, json) = bytes
                    .split_first_chunk::<8>()
                    .ok_or_else(|| self.err(damaged("events", seq, "too short for its time")))?;
                seal_event(seq, u64::from_le_bytes(*at), json, &mut value);
                events.insert(seq, value.as_slice()).map_err(|e| self.err(e))?;
            }
            for (name, def) in [("usage_hours", USAGE_HOURS), ("usage_days", USAGE_DAYS)] {
                let mut table = txn.open_table(def).map_err(|e| self.err(e))?;
                let old: Vec<(String, u64, Vec<u8>)> = table
                    .iter()
                    .map_err(|e| self.err(e))?
                    .map(|item| item.map(|(k, v)| (k.value().0.to_string(), k.value().1, v.value().to_vec())))
                    .collect::<Result<_, _>>()
                    .map_err(|e| self.err(e))?;
                for (subject, start, bytes) in old {
                    let amounts = decode_amounts(&bytes)
                        .ok_or_else(|| self.err(damaged(name, format!("({subject:?}, {start})"), "does not decode")))?;
                    table
                        .insert(
                            (subject.as_str(), start),
                            seal_usage(&subject, start, &amounts).as_slice(),
                        )
                        .map_err(|e| self.err(e))?;
                }
            }
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            let v = CHECKED_VALUES_VERSION;
            meta.insert("format_version", v).map_err(|e| self.err(e))?;
            meta.insert("meta_crc", meta_crc(v, count, created_ms, last_lsn))
                .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))?;
        tracing::info!(path = %self.path, "snapshot file upgraded to format 4 (checksummed event and usage values)");
        Ok(())
    }

    /// Stored events with seq > `after`, oldest first, at most `limit` that
    /// `keep` accepts: (seq, JSON).
    pub fn events_after(
        &self,
        after: u64,
        limit: usize,
        keep: &dyn Fn(&[u8]) -> bool,
    ) -> Result<Vec<(u64, Vec<u8>)>, SnapshotError> {
        let (_db, txn) = self.read()?;
        let table = match txn.open_table(EVENTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(e)),
        };
        let mut out = Vec::new();
        for item in table.range(after.saturating_add(1)..).map_err(|e| self.err(e))? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(|e| self.err(e))?;
            let (_, json) = open_event(k.value(), v.value()).map_err(|m| self.err(m))?;
            if keep(json) {
                out.push((k.value(), json.to_vec()));
            }
        }
        Ok(out)
    }

    /// Up to `limit` stored events before `before`, newest first.
    pub fn events_before(&self, before: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, SnapshotError> {
        let (_db, txn) = self.read()?;
        let table = match txn.open_table(EVENTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(e)),
        };
        let mut out = Vec::new();
        for item in table.range(..before).map_err(|e| self.err(e))?.rev() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(|e| self.err(e))?;
            let (_, json) = open_event(k.value(), v.value()).map_err(|m| self.err(m))?;
            out.push((k.value(), json.to_vec()));
        }
        Ok(out)
    }

    /// The newest stored event's seq (0: none).
    pub fn last_event_seq(&self) -> Result<u64, SnapshotError> {
        let (_db, txn) = self.read()?;
        let table = match txn.open_table(EVENTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(e) => return Err(self.err(e)),
        };
        let last = table.last().map_err(|e| self.err(e))?;
        Ok(last.map_or(0, |(k, _)| k.value()))
    }

    /// Adds `usage` to the history tables and drops buckets past retention.
    fn write_usage(&self, txn: &redb::WriteTransaction, usage: &UsagePart<'_>) -> Result<(), SnapshotError> {
        let mut hours = txn.open_table(USAGE_HOURS).map_err(|e| self.err(e))?;
        let mut days = txn.open_table(USAGE_DAYS).map_err(|e| self.err(e))?;
        let mut hours_t = txn.open_table(USAGE_HOURS_BY_TIME).map_err(|e| self.err(e))?;
        let mut days_t = txn.open_table(USAGE_DAYS_BY_TIME).map_err(|e| self.err(e))?;
        for ((subject, hour), amounts) in usage.deltas {
            let day = hour - hour % DAY_MS;
            for (name, table, index, start) in [
                ("usage_hours", &mut hours, &mut hours_t, *hour),
                ("usage_days", &mut days, &mut days_t, day),
            ] {
                let mut merged = match table.get((&**subject, start)).map_err(|e| self.err(e))? {
                    Some(v) => open_usage(name, subject, start, v.value()).map_err(|m| self.err(m))?,
                    None => BTreeMap::new(),
                };
                for (m, a) in amounts {
                    let v = merged.entry(m.to_string()).or_default();
                    *v = v.saturating_add(*a).min(crate::engine::policy::MAX_SAFE_INTEGER);
                }
                table
                    .insert((&**subject, start), seal_usage(subject, start, &merged).as_slice())
                    .map_err(|e| self.err(e))?;
                index.insert((start, &**subject), ()).map_err(|e| self.err(e))?;
            }
        }
        for (table, index, before) in [
            (&mut hours, &mut hours_t, usage.hours_before_ms),
            (&mut days, &mut days_t, usage.days_before_ms),
        ] {
            let old: Vec<(u64, String)> = index
                .range(..(before, ""))
                .map_err(|e| self.err(e))?
                .map(|item| item.map(|(k, _)| (k.value().0, k.value().1.to_string())))
                .collect::<Result<_, _>>()
                .map_err(|e| self.err(e))?;
            for (start, subject) in old {
                table.remove((subject.as_str(), start)).map_err(|e| self.err(e))?;
                index.remove((start, subject.as_str())).map_err(|e| self.err(e))?;
            }
        }
        Ok(())
    }

    /// One subject's stored buckets of `grain` starting in `from..to`.
    pub fn usage_of(&self, grain: Grain, subject: &str, from: u64, to: u64) -> Result<Vec<UsageBucket>, SnapshotError> {
        let (_db, txn) = self.read()?;
        let (name, def) = grain.table();
        let table = match txn.open_table(def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(e)),
        };
        let mut out = Vec::new();
        for item in table.range((subject, from)..(subject, to)).map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let start = k.value().1;
            out.push((
                start,
                open_usage(name, subject, start, v.value()).map_err(|m| self.err(m))?,
            ));
        }
        Ok(out)
    }

    /// Up to `n` subjects with stored usage, in byte order after `after`:
    /// one index lookup each, so an export page costs what its subjects do.
    pub fn usage_subjects_after(&self, after: Option<&str>, n: usize) -> Result<Vec<String>, SnapshotError> {
        let (_db, txn) = self.read()?;
        let table = match txn.open_table(USAGE_DAYS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(e)),
        };
        let mut out: Vec<String> = Vec::new();
        while out.len() < n {
            // The first key past every bucket of the previous subject.
            let from = out.last().map(String::as_str).or(after);
            let mut range = match from {
                Some(s) => table.range((s, u64::MAX)..).map_err(|e| self.err(e))?,
                None => table.range::<(&str, u64)>(..).map_err(|e| self.err(e))?,
            };
            let next = loop {
                match range.next() {
                    Some(item) => {
                        let (k, _) = item.map_err(|e| self.err(e))?;
                        let subject = k.value().0;
                        if from != Some(subject) {
                            break Some(subject.to_string());
                        }
                    }
                    None => break None,
                }
            };
            match next {
                Some(s) => out.push(s),
                None => break,
            }
        }
        Ok(out)
    }

    /// As [`Self::usage_of`] for several subjects, in one read transaction.
    pub fn usage_of_many(
        &self,
        grain: Grain,
        subjects: &[String],
        from: u64,
        to: u64,
    ) -> Result<Vec<UsageRow>, SnapshotError> {
        let (_db, txn) = self.read()?;
        let (name, def) = grain.table();
        let table = match txn.open_table(def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(e)),
        };
        let mut out = Vec::new();
        for subject in subjects {
            let s = subject.as_str();
            for item in table.range((s, from)..(s, to)).map_err(|e| self.err(e))? {
                let (k, v) = item.map_err(|e| self.err(e))?;
                let start = k.value().1;
                let amounts = open_usage(name, s, start, v.value()).map_err(|m| self.err(m))?;
                out.push((subject.clone(), start, amounts));
            }
        }
        Ok(out)
    }

    /// Every subject's stored buckets of `grain` starting in `from..to`.
    pub fn usage_all(&self, grain: Grain, from: u64, to: u64) -> Result<Vec<UsageRow>, SnapshotError> {
        let (_db, txn) = self.read()?;
        let (name, def) = grain.table();
        let index = if grain == Grain::Hour {
            USAGE_HOURS_BY_TIME
        } else {
            USAGE_DAYS_BY_TIME
        };
        let (table, index) = match (txn.open_table(def), txn.open_table(index)) {
            (Ok(t), Ok(i)) => (t, i),
            (Err(redb::TableError::TableDoesNotExist(_)), _) | (_, Err(redb::TableError::TableDoesNotExist(_))) => {
                return Ok(Vec::new())
            }
            (Err(e), _) | (_, Err(e)) => return Err(self.err(e)),
        };
        let mut out = Vec::new();
        for item in index.range((from, "")..(to, "")).map_err(|e| self.err(e))? {
            let (k, _) = item.map_err(|e| self.err(e))?;
            let (start, subject) = k.value();
            if let Some(v) = table.get((subject, start)).map_err(|e| self.err(e))? {
                let amounts = open_usage(name, subject, start, v.value()).map_err(|m| self.err(m))?;
                out.push((subject.to_string(), start, amounts));
            }
        }
        Ok(out)
    }

    /// Every subject with stored buckets in `parts` (grain, bucket starts
    /// `from..to`), in byte order, with `metric` summed over those buckets:
    /// `f` is called once per subject. The by-time index is read as one
    /// sorted run per bucket start, merged, so memory holds one iterator per
    /// bucket start in the range, never a row per subject.
    pub fn usage_totals(
        &self,
        metric: &str,
        parts: &[(Grain, u64, u64)],
        mut f: impl FnMut(&str, u64),
    ) -> Result<(), SnapshotError> {
        use std::cmp::Reverse;
        let (_db, txn) = self.read()?;
        let open = |grain: Grain| -> Result<Option<_>, SnapshotError> {
            let (name, def) = grain.table();
            let index = if grain == Grain::Hour {
                USAGE_HOURS_BY_TIME
            } else {
                USAGE_DAYS_BY_TIME
            };
            match (txn.open_table(def), txn.open_table(index)) {
                (Ok(t), Ok(i)) => Ok(Some((name, t, i))),
                (Err(redb::TableError::TableDoesNotExist(_)), _) | (_, Err(redb::TableError::TableDoesNotExist(_))) => {
                    Ok(None)
                }
                (Err(e), _) | (_, Err(e)) => Err(self.err(e)),
            }
        };
        let tables = [open(Grain::Hour)?, open(Grain::Day)?];
        /// One bucket start's subjects, in order.
        struct Run<'t> {
            name: &'static str,
            table: &'t redb::ReadOnlyTable<(&'static str, u64), &'static [u8]>,
            start: u64,
            subjects: redb::Range<'static, (u64, &'static str), ()>,
        }
        let mut runs = Vec::new();
        for &(grain, from, to) in parts {
            let Some((name, table, index)) = &tables[usize::from(grain == Grain::Day)] else {
                continue;
            };
            let mut at = from;
            while at < to {
                let first = index.range((at, "")..(to, "")).map_err(|e| self.err(e))?.next();
                let Some(item) = first else { break };
                let start = item.map_err(|e| self.err(e))?.0.value().0;
                let subjects = index.range((start, "")..(start + 1, "")).map_err(|e| self.err(e))?;
                runs.push(Run {
                    name,
                    table,
                    start,
                    subjects,
                });
                at = start + 1;
            }
        }
        let next = |run: &mut Run<'_>| -> Result<Option<String>, SnapshotError> {
            match run.subjects.next() {
                Some(item) => Ok(Some(item.map_err(|e| self.err(e))?.0.value().1.to_string())),
                None => Ok(None),
            }
        };
        let mut heads = std::collections::BinaryHeap::new();
        for (i, run) in runs.iter_mut().enumerate() {
            if let Some(s) = next(run)? {
                heads.push(Reverse((s, i)));
            }
        }
        let mut current: Option<(String, u64)> = None;
        while let Some(Reverse((subject, i))) = heads.pop() {
            let run = &mut runs[i];
            let amount = match run.table.get((subject.as_str(), run.start)).map_err(|e| self.err(e))? {
                Some(v) => open_usage(run.name, &subject, run.start, v.value())
                    .map_err(|m| self.err(m))?
                    .get(metric)
                    .copied()
                    .unwrap_or(0),
                None => 0,
            };
            if let Some(s) = next(run)? {
                heads.push(Reverse((s, i)));
            }
            match &mut current {
                Some((s, total)) if *s == subject => *total = total.saturating_add(amount),
                _ => {
                    if let Some((s, total)) = current.take() {
                        f(&s, total);
                    }
                    current = Some((subject, amount));
                }
            }
        }
        if let Some((s, total)) = current {
            f(&s, total);
        }
        Ok(())
    }

    /// `metric` summed over the stored buckets in `parts` of each of
    /// `subjects`: a range read per subject and part.
    pub fn usage_totals_of<'a>(
        &self,
        metric: &str,
        parts: &[(Grain, u64, u64)],
        subjects: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<(&'a str, u64)>, SnapshotError> {
        let (_db, txn) = self.read()?;
        let mut tables = Vec::new();
        for &(grain, from, to) in parts {
            let (name, def) = grain.table();
            match txn.open_table(def) {
                Ok(t) => tables.push((name, t, from, to)),
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(self.err(e)),
            }
        }
        let mut out = Vec::new();
        for s in subjects {
            let mut total = 0u64;
            for (name, table, from, to) in &tables {
                if from >= to {
                    continue;
                }
                for item in table.range((s, *from)..(s, *to)).map_err(|e| self.err(e))? {
                    let (k, v) = item.map_err(|e| self.err(e))?;
                    let amounts = open_usage(name, s, k.value().1, v.value()).map_err(|m| self.err(m))?;
                    total = total.saturating_add(amounts.get(metric).copied().unwrap_or(0));
                }
            }
            out.push((s, total));
        }
        Ok(out)
    }

    /// Replaces the snapshot with `shards` (already encoded) in one durable
    /// transaction. `last_lsn` is the newest LSN any of them holds.
    pub fn write(
        &self,
        shards: &[Vec<u8>],
        created_ms: u64,
        last_lsn: Lsn,
        signals: &SignalsPart<'_>,
        usage: &UsagePart<'_>,
    ) -> Result<(), SnapshotError> {
        let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
        let Db::ReadWrite(db) = &*guard else {
            return Err(self.err("opened read-only"));
        };
        let txn = db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(SHARDS).map_err(|e| self.err(e))?;
            table.retain(|_, _| false).map_err(|e| self.err(e))?;
            let mut value = Vec::new();
            for (i, bytes) in shards.iter().enumerate() {
                value.clear();
                value.extend_from_slice(&crc32fast::hash(bytes).to_le_bytes());
                value.extend_from_slice(bytes);
                table.insert(i as u32, value.as_slice()).map_err(|e| self.err(e))?;
            }
            for (def, key, bytes) in [
                (SIGNALS, "state", &signals.state),
                (POLICY, "versions", &signals.policy),
            ] {
                // No policy versions (a store written by a tool, not a daemon):
                // no key, read back as none.
                if bytes.is_empty() {
                    txn.open_table(def)
                        .map_err(|e| self.err(e))?
                        .remove(key)
                        .map_err(|e| self.err(e))?;
                    continue;
                }
                let mut sealed = Vec::with_capacity(bytes.len() + 4);
                sealed.extend_from_slice(&crc32fast::hash(bytes).to_le_bytes());
                sealed.extend_from_slice(bytes);
                txn.open_table(def)
                    .map_err(|e| self.err(e))?
                    .insert(key, sealed.as_slice())
                    .map_err(|e| self.err(e))?;
            }
            // A single node's file has no raft table at all.
            if !signals.raft.is_empty() {
                let mut sealed = Vec::with_capacity(signals.raft.len() + 4);
                sealed.extend_from_slice(&crc32fast::hash(&signals.raft).to_le_bytes());
                sealed.extend_from_slice(&signals.raft);
                txn.open_table(RAFT)
                    .map_err(|e| self.err(e))?
                    .insert("state", sealed.as_slice())
                    .map_err(|e| self.err(e))?;
            }
            let mut events = txn.open_table(EVENTS).map_err(|e| self.err(e))?;
            for (seq, at_ms, json) in &signals.events {
                seal_event(*seq, *at_ms, json, &mut value);
                events.insert(*seq, value.as_slice()).map_err(|e| self.err(e))?;
            }
            // Retention: oldest first, stopping at the first event still kept.
            let mut drop_through = None;
            for item in events.iter().map_err(|e| self.err(e))? {
                let (k, v) = item.map_err(|e| self.err(e))?;
                let (at, _) = open_event(k.value(), v.value()).map_err(|m| self.err(m))?;
                if at >= signals.retain_after_ms || k.value() > signals.delivered_seq {
                    break;
                }
                drop_through = Some(k.value());
            }
            if let Some(last) = drop_through {
                events.retain_in(..=last, |_, _| false).map_err(|e| self.err(e))?;
            }
            drop(events);
            self.write_usage(&txn, usage)?;
            let version = u64::from(codec::FORMAT_VERSION);
            let count = shards.len() as u64;
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            for (k, v) in [
                ("format_version", version),
                ("shard_count", count),
                ("created_ms", created_ms),
                ("last_lsn", last_lsn),
                ("meta_crc", meta_crc(version, count, created_ms, last_lsn)),
            ] {
                meta.insert(k, v).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))?;
        self.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
        drop(guard);
        self.compact_if_bloated()
    }

    /// Changes whenever a write changed the file's content.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Compacts the file when it has grown past twice its live data (and
    /// past [`COMPACT_FLOOR_BYTES`]): redb reuses freed pages but never
    /// shrinks the file by itself.
    fn compact_if_bloated(&self) -> Result<(), SnapshotError> {
        let Ok(file_bytes) = std::fs::metadata(&self.path).map(|m| m.len()) else {
            return Ok(()); // in memory
        };
        if file_bytes <= COMPACT_FLOOR_BYTES {
            return Ok(());
        }
        let live = self.live_bytes()?;
        if file_bytes <= live.saturating_mul(2) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let mut guard = self.db.write().unwrap_or_else(|e| e.into_inner());
        let Db::ReadWrite(db) = &mut *guard else {
            return Ok(());
        };
        // Each pass moves what it can; a few are enough in practice.
        for _ in 0..8 {
            if !db.compact().map_err(|e| self.err(e))? {
                break;
            }
        }
        drop(guard);
        let after = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        tracing::info!(
            path = %self.path, before_bytes = file_bytes, after_bytes = after, live_bytes = live,
            ms = started.elapsed().as_millis() as u64, "snapshot file compacted"
        );
        Ok(())
    }

    /// Bytes of live data in the file: stored values and keys, and the
    /// trees' own pages.
    pub fn live_bytes(&self) -> Result<u64, SnapshotError> {
        let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
        let Db::ReadWrite(db) = &*guard else {
            return Err(self.err("opened read-only"));
        };
        let txn = db.begin_write().map_err(|e| self.err(e))?;
        let stats = txn.stats().map_err(|e| self.err(e))?;
        txn.abort().map_err(|e| self.err(e))?;
        Ok(stats.stored_bytes() + stats.metadata_bytes())
    }
}
