//! Snapshots in redb: every shard of the engine state (counters, subjects, open
//! and finished reservations, idempotency keys, each with the LSN it is as of),
//! written in one transaction. Layout:
//!
//! - table `meta` (`&str` → `u64`): `format_version`, `shard_count`, `created_ms` (the
//!   engine time it was written at: time resumes from it at start);
//! - table `shards` (`u32` → bytes): shard index → codec-encoded shard.

use std::path::Path;

use redb::{Database, ReadableDatabase, TableDefinition};

use super::codec;
use crate::engine::Shard;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SHARDS: TableDefinition<u32, &[u8]> = TableDefinition::new("shards");

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
    /// When it was written.
    pub created_ms: u64,
}

/// The snapshot file. Clones share it.
#[derive(Clone)]
pub struct SnapshotStore {
    db: std::sync::Arc<Database>,
    path: String,
}

impl SnapshotStore {
    /// Opens or creates the file.
    pub fn open(path: &Path) -> Result<SnapshotStore, SnapshotError> {
        let p = path.display().to_string();
        let db = Database::create(path).map_err(|e| SnapshotError {
            path: p.clone(),
            message: e.to_string(),
        })?;
        Ok(SnapshotStore { db: db.into(), path: p })
    }

    /// Opens an existing file without creating one; `None` if there is none.
    pub fn open_existing(path: &Path) -> Result<Option<SnapshotStore>, SnapshotError> {
        if !path.exists() {
            return Ok(None);
        }
        let p = path.display().to_string();
        let db = Database::open(path).map_err(|e| SnapshotError {
            path: p.clone(),
            message: e.to_string(),
        })?;
        Ok(Some(SnapshotStore { db: db.into(), path: p }))
    }

    /// A store kept in memory, for tests: it outlives a simulated crash as long
    /// as a clone is kept, like a committed file would.
    pub fn in_memory() -> SnapshotStore {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .expect("an in-memory database opens");
        SnapshotStore {
            db: db.into(),
            path: "<memory>".into(),
        }
    }

    fn err(&self, e: impl std::fmt::Display) -> SnapshotError {
        SnapshotError {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Reads the snapshot; `None` if none was ever written.
    pub fn load(&self) -> Result<Option<Loaded>, SnapshotError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
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
        let version = u16::try_from(get("format_version")?).map_err(|e| self.err(e))?;
        let count = get("shard_count")? as usize;
        let created_ms = get("created_ms")?;
        let table = txn.open_table(SHARDS).map_err(|e| self.err(e))?;
        let mut shards = Vec::with_capacity(count);
        for i in 0..count {
            let bytes = table
                .get(i as u32)
                .map_err(|e| self.err(e))?
                .ok_or_else(|| self.err(format!("shard {i} is missing")))?;
            let shard = codec::decode_shard(version, bytes.value()).map_err(|e| self.err(format!("shard {i}: {e}")))?;
            shards.push(shard);
        }
        Ok(Some(Loaded { shards, created_ms }))
    }

    /// Replaces the snapshot with `shards` (already encoded) in one durable transaction.
    pub fn write(&self, shards: &[Vec<u8>], created_ms: u64) -> Result<(), SnapshotError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(SHARDS).map_err(|e| self.err(e))?;
            table.retain(|_, _| false).map_err(|e| self.err(e))?;
            for (i, bytes) in shards.iter().enumerate() {
                table.insert(i as u32, bytes.as_slice()).map_err(|e| self.err(e))?;
            }
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            meta.insert("format_version", u64::from(codec::FORMAT_VERSION))
                .map_err(|e| self.err(e))?;
            meta.insert("shard_count", shards.len() as u64)
                .map_err(|e| self.err(e))?;
            meta.insert("created_ms", created_ms).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }
}
