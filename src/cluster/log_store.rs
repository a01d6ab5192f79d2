//! A cluster node's Raft log, kept in the WAL's segments (flagged as Raft
//! segments, so a single node never mistakes them for its own log): the
//! entry at Raft index `i` is WAL record `i + 1`. One writer thread writes
//! what openraft appends, a batch per write and fdatasync, and only then
//! tells openraft it is durable; truncation and purge go through the same
//! thread, so every change reaches the disk in the order openraft made it.
//!
//! Unpurged entries are also kept in memory (openraft purges them once a
//! snapshot covers them). The vote, the committed log id and the purged log
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
}

/// Entries in memory, and the ends of the log.
#[derive(Debug, Default)]
struct Cache {
    entries: BTreeMap<u64, Entry>,
    purged: Option<LogId>,
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
        let mut entries = BTreeMap::new();
        let mut on_record = |lsn: u64, _version: u16, payload: &[u8]| {
            let e: Entry = codec::decode_raft(payload, "Raft entry").map_err(|e| e.to_string())?;
            if e.log_id.index + 1 != lsn {
                return Err(format!("holds the entry of index {}, not {}", e.log_id.index, lsn - 1));
            }
            entries.insert(e.log_id.index, e);
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
            entries.clear();
        }
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("quotad-raft-log".into())
            .spawn(move || write_loop(log, rx))
            .map_err(|e| format!("cannot start the Raft log writer: {e}"))?;
        Ok(LogStore {
            shared: Arc::new(Shared {
                cache: Mutex::new(Cache {
                    entries,
                    purged: meta.purged,
                }),
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
    async fn ask(&self, make: impl FnOnce(mpsc::SyncSender<Result<(), String>>) -> Op) -> Result<(), String> {
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

    /// The entries in memory within `range` (every unpurged one).
    pub fn cached<RB: RangeBounds<u64>>(&self, range: RB) -> Vec<Entry> {
        lock(&self.shared.cache)
            .entries
            .range(range)
            .map(|(_, e)| e.clone())
            .collect()
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
        Ok(self.cached(range))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let c = lock(&self.shared.cache);
        let last = c.entries.values().next_back().map(|e| e.log_id).or(c.purged);
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
                let bytes = codec::encode_raft(&e).map_err(|err| io_error(IoError::write_logs, err))?;
                wal::frame(lsn, &bytes, &mut framed);
                first.get_or_insert(lsn);
                last = lsn;
                c.entries.insert(lsn - 1, e);
            }
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
        lock(&self.shared.cache).entries.split_off(&log_id.index);
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
