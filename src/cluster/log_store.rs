//! A cluster node's Raft log, kept in the WAL's segments (flagged as Raft
//! segments, so a single node never mistakes them for its own log): the
//! entry at Raft index `i` is WAL record `i + 1`. One writer thread writes
//! what openraft appends, a batch per write and fdatasync, and only then
//! tells openraft it is durable; truncation and purge go through the same
//! thread, so every change reaches the disk in the order openraft made it.
//!
//! The newest [`CACHE_ENTRIES`] entries are also kept in memory: openraft
//! reads recent entries all the time (to replicate and apply them), older
//! ones only for a peer far behind, which are read back from the segments. The vote, the committed log id and the purged log
//! id live in `raft-state.json`, replaced atomically (temporary file, fsync,
//! rename, directory fsync); the committed id is written only along with the
//! others, since an older committed id is still a committed one.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogId, RaftLogReader, Vote};
use serde::{Deserialize, Serialize};

use super::types::{io_error, Entry, IoError, LogId, StorageError, TypeConfig};
use crate::storage::codec;
use crate::storage::io::WalDir;
use crate::storage::wal::{self, Wal, FLAG_RAFT};

/// The file holding the vote, the committed and the purged log ids.
pub const STATE_FILE: &str = "raft-state.json";

/// Entries kept in memory (the newest): some 20 MB of typical records.
pub const CACHE_ENTRIES: usize = 100_000;

/// What lives beside the log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    vote: Option<Vote<u64>>,
    committed: Option<LogId>,
    purged: Option<LogId>,
}

/// What the writer thread does, in the order openraft asked.
enum Op {
    /// Write framed entries `first..=last` (WAL numbering) and report.
    Append {
        framed: Vec<u8>,
        first: u64,
        last: u64,
        done: LogFlushed<TypeConfig>,
    },
    /// Cut WAL records `from..` off.
    Truncate {
        from: u64,
        reply: std::sync::mpsc::SyncSender<Result<(), String>>,
    },
    /// Drop WAL segments holding only records `..=through`; when the log
    /// ends before `through`, start it again after it.
    Purge {
        through: u64,
        reply: std::sync::mpsc::SyncSender<Result<(), String>>,
    },
    /// Read WAL records `from..to` back (entries no longer in memory).
    Read {
        from: u64,
        to: u64,
        reply: std::sync::mpsc::SyncSender<Result<Vec<Vec<u8>>, String>>,
    },
}

/// The newest entries in memory, and the ends of the log.
#[derive(Debug, Default)]
struct Cache {
    entries: BTreeMap<u64, Entry>,
    purged: Option<LogId>,
    /// The last entry, also when it is no longer in memory.
    last: Option<LogId>,
}

impl Cache {
    /// Keeps the newest [`CACHE_ENTRIES`] in memory.
    fn trim(&mut self) {
        while self.entries.len() > CACHE_ENTRIES {
            self.entries.pop_first();
        }
    }

    /// The first index held in memory (every later one is).
    fn first_cached(&self) -> Option<u64> {
        self.entries.keys().next().copied()
    }
}

struct Shared {
    cache: Mutex<Cache>,
    meta: Mutex<Meta>,
    meta_path: PathBuf,
    ops: Mutex<mpsc::Sender<Op>>,
}

/// The log store; clones share it (openraft reads through clones).
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LogStore {
    /// Opens the log in `wal_dir` with its state file in `state_dir`: reads
    /// the state, checks and loads every unpurged entry, and starts the
    /// writer thread.
    pub fn open(wal_dir: Arc<dyn WalDir>, state_dir: &Path, segment_bytes_max: u64) -> Result<LogStore, String> {
        let meta_path = state_dir.join(STATE_FILE);
        let meta: Meta = match std::fs::read(&meta_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("{} is damaged ({e}): restore it from a backup", meta_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Meta::default(),
            Err(e) => return Err(format!("cannot read {}: {e}", meta_path.display())),
        };
        let after = meta.purged.map_or(0, |p| p.index + 1);
        let mut cache = Cache {
            purged: meta.purged,
            ..Cache::default()
        };
        let mut on_record = |lsn: u64, _version: u16, payload: &[u8]| {
            let e: Entry = codec::decode_raft(payload, "Raft entry").map_err(|e| e.to_string())?;
            if e.log_id.index + 1 != lsn {
                return Err(format!("holds the entry of index {}, not {}", e.log_id.index, lsn - 1));
            }
            cache.last = Some(e.log_id);
            cache.entries.insert(e.log_id.index, e);
            cache.trim();
            Ok(())
        };
        let (mut log, _) = Wal::open_flagged(
            wal_dir,
            after,
            segment_bytes_max,
            codec::FORMAT_VERSION,
            FLAG_RAFT,
            &mut on_record,
        )
        .map_err(|e| e.to_string())?;
        // Purged past the end of the log (an installed snapshot), and stopped
        // before the log was started again after it: start it again now.
        if log.next_lsn() <= after {
            log.reset_after(after).map_err(|e| e.to_string())?;
            cache.entries.clear();
            cache.last = None;
        }
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("quotad-raft-log".into())
            .spawn(move || write_loop(log, rx))
            .map_err(|e| format!("cannot start the Raft log writer: {e}"))?;
        Ok(LogStore {
            shared: Arc::new(Shared {
                cache: Mutex::new(cache),
                meta: Mutex::new(meta),
                meta_path,
                ops: Mutex::new(tx),
            }),
        })
    }

    fn send(&self, op: Op) -> Result<(), String> {
        lock(&self.shared.ops)
            .send(op)
            .map_err(|_| "the Raft log writer stopped".to_string())
    }

    /// Sends an op that answers, and waits for its answer off the runtime.
    async fn ask<T: Send + 'static>(
        &self,
        make: impl FnOnce(mpsc::SyncSender<Result<T, String>>) -> Op,
    ) -> Result<T, String> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(make(tx))?;
        tokio::task::spawn_blocking(move || rx.recv())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|_| "the Raft log writer stopped".to_string())?
    }

    /// Changes the stored state with `f` and writes it durably.
    async fn save_meta(&self, f: impl FnOnce(&mut Meta)) -> Result<(), String> {
        let (bytes, path) = {
            let mut m = lock(&self.shared.meta);
            f(&mut m);
            (
                serde_json::to_vec(&*m).map_err(|e| e.to_string())?,
                self.shared.meta_path.clone(),
            )
        };
        tokio::task::spawn_blocking(move || write_atomically(&path, &bytes))
            .await
            .map_err(|e| e.to_string())?
    }
}

impl LogStore {
    /// Decodes entries read back from the segments.
    fn decode(records: Vec<Vec<u8>>) -> Result<Vec<Entry>, String> {
        records
            .iter()
            .map(|r| codec::decode_raft(r, "Raft entry").map_err(|e| e.to_string()))
            .collect()
    }

    /// Where the entries of `range` are: the part only on disk (as WAL
    /// LSNs `from..to`), if any, and the entries in memory.
    fn split<RB: RangeBounds<u64>>(&self, range: &RB) -> (Option<(u64, u64)>, Vec<Entry>) {
        use std::ops::Bound;
        let c = lock(&self.shared.cache);
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        }
        .max(c.purged.map_or(0, |p| p.index + 1));
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        let first = c.first_cached().unwrap_or(u64::MAX);
        let disk = (start < first && start < end).then(|| (start + 1, first.min(end).saturating_add(1)));
        let from = start.max(first);
        let cached = if from < end {
            c.entries.range(from..end).map(|(_, e)| e.clone()).collect()
        } else {
            Vec::new()
        };
        (disk, cached)
    }

    /// The entries of `range`, from memory or the segments, blocking the
    /// thread (the engine's rebuild runs off the async workers).
    pub fn read_blocking<RB: RangeBounds<u64>>(&self, range: RB) -> Result<Vec<Entry>, String> {
        let (disk, cached) = self.split(&range);
        let mut out = match disk {
            Some((from, to)) => {
                let (tx, rx) = mpsc::sync_channel(1);
                self.send(Op::Read { from, to, reply: tx })?;
                Self::decode(rx.recv().map_err(|_| "the Raft log writer stopped".to_string())??)?
            }
            None => Vec::new(),
        };
        out.extend(cached);
        Ok(out)
    }

    /// The entries of `range`, from memory or the segments.
    async fn read<RB: RangeBounds<u64>>(&self, range: RB) -> Result<Vec<Entry>, String> {
        let (disk, cached) = self.split(&range);
        let mut out = match disk {
            Some((from, to)) => Self::decode(self.ask(|reply| Op::Read { from, to, reply }).await?)?,
            None => Vec::new(),
        };
        out.extend(cached);
        Ok(out)
    }
}

/// Replaces `path` with `bytes`: a temporary file, synced, renamed over it,
/// and the directory synced, so a crash leaves the old file or the new one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The writer thread: consecutive appends are written together, with one
/// fdatasync. After a failure nothing more is written and every later op
/// fails: the node stops serving (openraft shuts down on a storage error).
fn write_loop(mut log: Wal, rx: mpsc::Receiver<Op>) {
    let mut next: Option<Op> = None;
    loop {
        let op = match next.take() {
            Some(op) => op,
            None => match rx.recv() {
                Ok(op) => op,
                Err(_) => return,
            },
        };
        match op {
            Op::Append {
                mut framed,
                first,
                mut last,
                done,
            } => {
                let mut dones = vec![done];
                while let Ok(op) = rx.try_recv() {
                    match op {
                        Op::Append {
                            framed: more,
                            first: f,
                            last: l,
                            done,
                        } if f == last + 1 => {
                            framed.extend_from_slice(&more);
                            last = l;
                            dones.push(done);
                        }
                        other => {
                            next = Some(other);
                            break;
                        }
                    }
                }
                // Entries after a gap: everything before it is covered by a
                // snapshot (its purge may reach this thread later).
                // Entries over existing ones replace them and all after them.
                let r = if first > log.next_lsn() {
                    log.reset_after(first - 1)
                } else if first < log.next_lsn() {
                    log.truncate_from(first)
                } else {
                    Ok(())
                }
                .and_then(|()| log.write(&framed, first, last));
                for d in dones {
                    d.log_io_completed(r.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string())));
                }
                if let Err(e) = r {
                    tracing::error!(error = %e, "the Raft log cannot be written; this node stops serving");
                }
            }
            Op::Truncate { from, reply } => {
                let _ = reply.send(log.truncate_from(from).map_err(|e| e.to_string()));
            }
            Op::Read { from, to, reply } => {
                let r = log
                    .read_range(from, to)
                    .map(|records| records.into_iter().map(|(_, _, payload)| payload).collect());
                let _ = reply.send(r.map_err(|e| e.to_string()));
            }
            Op::Purge { through, reply } => {
                let r = if log.next_lsn() <= through + 1 {
                    log.reset_after(through)
                } else {
                    log.remove_through(through).map(|_| ())
                };
                let _ = reply.send(r.map_err(|e| e.to_string()));
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.read(range).await.map_err(|e| io_error(IoError::read_logs, e))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let c = lock(&self.shared.cache);
        let last = c.last.max(c.purged);
        Ok(LogState {
            last_purged_log_id: c.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        let v = *vote;
        self.save_meta(|m| m.vote = Some(v))
            .await
            .map_err(|e| io_error(IoError::write_vote, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        Ok(lock(&self.shared.meta).vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Kept in memory and written with the next vote or purge: a committed
        // id read back older than the newest is still committed.
        lock(&self.shared.meta).committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(lock(&self.shared.meta).committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut framed = Vec::new();
        let (mut first, mut last) = (None, 0);
        {
            let mut c = lock(&self.shared.cache);
            for e in entries {
                let lsn = e.get_log_id().index + 1;
                if first.is_none() {
                    c.entries.split_off(&(lsn - 1));
                }
                c.last = Some(*e.get_log_id());
                let bytes = codec::encode_raft(&e).map_err(|err| io_error(IoError::write_logs, err))?;
                wal::frame(lsn, &bytes, &mut framed);
                first.get_or_insert(lsn);
                last = lsn;
                c.entries.insert(lsn - 1, e);
            }
            c.trim();
        }
        let Some(first) = first else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        self.send(Op::Append {
            framed,
            first,
            last,
            done: callback,
        })
        .map_err(|e| io_error(IoError::write_logs, e))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let before = log_id.index.checked_sub(1);
        let last = {
            let mut c = lock(&self.shared.cache);
            c.entries.split_off(&log_id.index);
            c.entries.values().next_back().map(|e| e.log_id)
        };
        // The entry before the cut, also when it is no longer in memory.
        let last = match (last, before) {
            (Some(l), _) => Some(l),
            (None, None) => None,
            (None, Some(b)) => self
                .read(b..=b)
                .await
                .map_err(|e| io_error(IoError::read_logs, e))?
                .first()
                .map(|e| e.log_id),
        };
        lock(&self.shared.cache).last = last;
        self.ask(|reply| Op::Truncate {
            from: log_id.index + 1,
            reply,
        })
        .await
        .map_err(|e| io_error(IoError::write_logs, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // The state first: a crash before the segments go leaves them to the
        // next start, which skips what the state says is purged.
        self.save_meta(|m| m.purged = Some(log_id))
            .await
            .map_err(|e| io_error(IoError::write_logs, e))?;
        {
            let mut c = lock(&self.shared.cache);
            c.purged = Some(log_id);
            let rest = c.entries.split_off(&(log_id.index + 1));
            c.entries = rest;
        }
        self.ask(|reply| Op::Purge {
            through: log_id.index + 1,
            reply,
        })
        .await
        .map_err(|e| io_error(IoError::write_logs, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::storage::RaftLogStorageExt;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn blank(i: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), i),
            payload: EntryPayload::Blank,
        }
    }

    fn open(dir: &Path) -> LogStore {
        let wal = crate::storage::io::FsDir::new(&dir.join("wal")).expect("wal dir");
        LogStore::open(Arc::new(wal), dir, 1 << 20).expect("opens")
    }

    fn indexes(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|e| e.log_id.index).collect()
    }

    /// Entries older than the newest CACHE_ENTRIES are read back from the
    /// segments, alone or together with cached ones; a cut far back finds
    /// the new last entry on disk; all of it holds after a reopen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entries_beyond_the_cache_are_read_from_disk() {
        let dir = tempfile::tempdir().expect("dir");
        let mut log = open(dir.path());
        let n = CACHE_ENTRIES as u64 + 10;
        log.blocking_append((0..n).map(blank)).await.expect("appends");
        assert_eq!(lock(&log.shared.cache).first_cached(), Some(10));
        assert_eq!(
            indexes(&log.try_get_log_entries(0..5).await.unwrap()),
            vec![0, 1, 2, 3, 4]
        );
        assert_eq!(
            indexes(&log.try_get_log_entries(5..15).await.unwrap()),
            (5..15).collect::<Vec<_>>()
        );
        assert_eq!(
            indexes(&log.try_get_log_entries(n - 2..).await.unwrap()),
            vec![n - 2, n - 1]
        );
        assert_eq!(
            log.get_log_state().await.unwrap().last_log_id,
            Some(blank(n - 1).log_id)
        );
        log.truncate(blank(3).log_id).await.expect("truncates");
        assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(blank(2).log_id));
        drop(log);
        let mut log = open(dir.path());
        assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(blank(2).log_id));
        assert_eq!(indexes(&log.try_get_log_entries(0..10).await.unwrap()), vec![0, 1, 2]);
    }
}
