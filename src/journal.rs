//! The seam between the engine and durable storage. The engine hands every
//! applied change to a [`Journal`] while it still holds the locks of the state it
//! changed (so records touching the same state are in apply order), and the API
//! layer waits on [`DurableWatch`] before it answers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::oneshot;

use crate::clock::Millis;
use crate::engine::{Lsn, Mutation};

/// Why the journal cannot take or confirm a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("journal unavailable: {0}")]
pub struct JournalError(pub String);

/// How far the journal is durable, and who waits for it: requests are woken
/// exactly when a sync covers them (a shared watch would wake every waiter on
/// every sync, which costs O(waiters) per batch); threads block on a condvar.
#[derive(Debug, Default)]
pub struct Waiters {
    inner: Mutex<WaitersInner>,
    /// Wakes threads in [`Waiters::wait_blocking`].
    changed: Condvar,
}

#[derive(Debug, Default)]
struct WaitersInner {
    /// Every LSN at or below this is durable.
    durable: Lsn,
    /// Set once the journal failed: every waiter above `durable` gets it.
    failed: Option<String>,
    /// (lsn, ticket) → who waits for it.
    waiting: std::collections::BTreeMap<(Lsn, u64), oneshot::Sender<Result<(), JournalError>>>,
    /// Makes keys unique.
    ticket: u64,
    /// Threads in `wait_blocking`: only then is `changed` signalled.
    blocking: usize,
    /// Bumped by [`Waiters::abort_waiting`], with its message: threads
    /// blocked before it return that message.
    aborts: u64,
    aborted: String,
}

impl Waiters {
    /// Waiters with everything up to `durable` already durable.
    pub fn new(durable: Lsn) -> Waiters {
        let w = Waiters::default();
        w.lock().durable = durable;
        w
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WaitersInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Everything up to `lsn` is durable: wakes those waiting for it.
    pub fn advance(&self, lsn: Lsn) {
        let done = {
            let mut w = self.lock();
            w.durable = w.durable.max(lsn);
            if w.blocking > 0 {
                self.changed.notify_all();
            }
            let rest = w.waiting.split_off(&(lsn + 1, 0));
            std::mem::replace(&mut w.waiting, rest)
        };
        for tx in done.into_values() {
            let _ = tx.send(Ok(()));
        }
    }

    /// The journal failed: every waiter above the durable LSN gets `message`.
    pub fn fail(&self, message: &str) {
        let all = {
            let mut w = self.lock();
            w.failed = Some(message.to_string());
            self.changed.notify_all();
            std::mem::take(&mut w.waiting)
        };
        for tx in all.into_values() {
            let _ = tx.send(Err(JournalError(message.to_string())));
        }
    }

    /// Fails everyone waiting now with `message`, without failing the
    /// journal: a cluster node that lost leadership while records it applied
    /// were not committed (their outcome is unknown to it).
    pub fn abort_waiting(&self, message: &str) {
        let all = {
            let mut w = self.lock();
            w.aborts += 1;
            w.aborted = message.to_string();
            self.changed.notify_all();
            std::mem::take(&mut w.waiting)
        };
        for tx in all.into_values() {
            let _ = tx.send(Err(JournalError(message.to_string())));
        }
    }

    /// Blocks the thread until `lsn` is durable; errors once the journal
    /// failed, or when the wait is aborted.
    pub fn wait_blocking(&self, lsn: Lsn) -> Result<(), JournalError> {
        let mut w = self.lock();
        let aborts = w.aborts;
        loop {
            if let Some(f) = &w.failed {
                return Err(JournalError(f.clone()));
            }
            if w.durable >= lsn {
                return Ok(());
            }
            if w.aborts != aborts {
                return Err(JournalError(w.aborted.clone()));
            }
            w.blocking += 1;
            w = self.changed.wait(w).unwrap_or_else(|e| e.into_inner());
            w.blocking -= 1;
        }
    }

    fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// Resolves when the journal fails (never, if it does not).
    pub async fn failed(&self) {
        // No LSN reaches the maximum, so this wait ends only in failure.
        let _ = self.wait(Lsn::MAX).await;
        if self.failure().is_none() {
            std::future::pending::<()>().await; // the writer stopped cleanly
        }
    }

    async fn wait(&self, lsn: Lsn) -> Result<(), JournalError> {
        let rx = {
            let mut w = self.lock();
            if w.durable >= lsn {
                return Ok(());
            }
            if let Some(f) = &w.failed {
                return Err(JournalError(f.clone()));
            }
            let (tx, rx) = oneshot::channel();
            w.ticket += 1;
            let t = w.ticket;
            w.waiting.insert((lsn, t), tx);
            rx
        };
        rx.await
            .unwrap_or_else(|_| Err(JournalError("the journal writer stopped".into())))
    }
}

/// Waits for records to become durable.
#[derive(Debug, Clone)]
pub enum DurableWatch {
    /// Everything is durable at once (journals that keep nothing, `batch` mode).
    Always,
    /// Woken by the journal's writer.
    Waiters(Arc<Waiters>),
}

impl DurableWatch {
    /// A watch that reports everything durable: for journals that keep nothing.
    pub fn always() -> Self {
        DurableWatch::Always
    }

    /// Every LSN at or below this is durable now.
    pub fn durable_lsn(&self) -> Lsn {
        match self {
            DurableWatch::Always => Lsn::MAX,
            DurableWatch::Waiters(w) => w.lock().durable,
        }
    }

    /// Resolves once `lsn` is durable, or with an error if the journal failed first.
    pub async fn wait(&self, lsn: Lsn) -> Result<(), JournalError> {
        match self {
            DurableWatch::Always => Ok(()),
            DurableWatch::Waiters(w) => w.wait(lsn).await,
        }
    }
}

/// Takes records of applied mutations.
pub trait Journal: Send + Sync + 'static {
    /// Queues one record, made at engine time `at_ms`, and returns its LSN.
    /// Called with engine locks held: it must not do I/O, and must hand out
    /// LSNs in call order.
    fn append(&self, at_ms: Millis, mutations: &[Mutation]) -> Result<Lsn, JournalError>;

    /// Does what `append` left for after the engine's locks: waking the
    /// writer that takes the new records. The engine calls it once it has
    /// released the locks it appended under, so that a wake-up (a system
    /// call) is not made while other calls wait for those locks.
    fn wake(&self) {}

    /// Where callers wait for durability.
    fn watch(&self) -> DurableWatch;
}

/// A journal that keeps nothing: state lives only in memory.
#[derive(Debug, Default)]
pub struct NullJournal {
    /// Last LSN handed out.
    lsn: AtomicU64,
}

impl Journal for NullJournal {
    fn append(&self, _at_ms: Millis, _mutations: &[Mutation]) -> Result<Lsn, JournalError> {
        Ok(self.lsn.fetch_add(1, Ordering::Relaxed) + 1)
    }

    fn watch(&self) -> DurableWatch {
        DurableWatch::always()
    }
}

/// Records in LSN order, each the engine time and mutations of one operation.
type Records = Vec<(Lsn, Millis, Vec<Mutation>)>;

/// A journal that keeps every record in memory: tests replay it to check that
/// replay rebuilds the same state.
#[derive(Debug, Default, Clone)]
pub struct MemoryJournal {
    /// Records in LSN order.
    records: Arc<Mutex<Records>>,
}

impl MemoryJournal {
    /// A copy of the records so far.
    pub fn records(&self) -> Records {
        self.records.lock().expect("journal lock").clone()
    }
}

impl Journal for MemoryJournal {
    fn append(&self, at_ms: Millis, mutations: &[Mutation]) -> Result<Lsn, JournalError> {
        let mut records = self.records.lock().expect("journal lock");
        let lsn = records.last().map_or(1, |(l, _, _)| l + 1);
        records.push((lsn, at_ms, mutations.to_vec()));
        Ok(lsn)
    }

    fn watch(&self) -> DurableWatch {
        DurableWatch::always()
    }
}
