//! The seam between the engine and durable storage. The engine hands every
//! applied change to a [`Journal`] while it still holds the locks of the state it
//! changed (so records touching the same state are in apply order), and the API
//! layer waits on [`DurableWatch`] before it answers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::engine::{Lsn, Mutation};

/// Why the journal cannot take or confirm a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("journal unavailable: {0}")]
pub struct JournalError(pub String);

/// How far the journal is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurableState {
    /// Every record at or below this LSN is durable.
    pub durable_lsn: Lsn,
    /// The journal failed; nothing above `durable_lsn` will ever be.
    pub failed: bool,
}

/// Waits for records to become durable.
#[derive(Debug, Clone)]
pub struct DurableWatch {
    /// Updated by the journal after every sync.
    rx: watch::Receiver<DurableState>,
}

impl DurableWatch {
    /// Wraps a receiver the journal publishes to.
    pub fn new(rx: watch::Receiver<DurableState>) -> Self {
        Self { rx }
    }

    /// A watch that reports everything durable: for journals that keep nothing.
    pub fn always() -> Self {
        let (tx, rx) = watch::channel(DurableState {
            durable_lsn: Lsn::MAX,
            failed: false,
        });
        // The value never changes, so the sender can go.
        drop(tx);
        Self { rx }
    }

    /// Resolves once `lsn` is durable, or with an error if the journal failed first.
    pub async fn wait(&self, lsn: Lsn) -> Result<(), JournalError> {
        if self.rx.borrow().durable_lsn >= lsn {
            return Ok(());
        }
        let mut rx = self.rx.clone();
        let state = *rx
            .wait_for(|s| s.failed || s.durable_lsn >= lsn)
            .await
            .map_err(|_| JournalError("the journal writer stopped".into()))?;
        if state.durable_lsn >= lsn {
            Ok(())
        } else {
            Err(JournalError("the write could not be made durable".into()))
        }
    }
}

/// Takes records of applied mutations.
pub trait Journal: Send + Sync + 'static {
    /// Queues one record and returns its LSN. Called with engine locks held: it must
    /// not do I/O, and must hand out LSNs in call order.
    fn append(&self, mutations: &[Mutation]) -> Result<Lsn, JournalError>;

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
    fn append(&self, _mutations: &[Mutation]) -> Result<Lsn, JournalError> {
        Ok(self.lsn.fetch_add(1, Ordering::Relaxed) + 1)
    }

    fn watch(&self) -> DurableWatch {
        DurableWatch::always()
    }
}

/// Records in LSN order, each the mutations of one operation.
type Records = Vec<(Lsn, Vec<Mutation>)>;

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
    fn append(&self, mutations: &[Mutation]) -> Result<Lsn, JournalError> {
        let mut records = self.records.lock().expect("journal lock");
        let lsn = records.last().map_or(1, |(l, _)| l + 1);
        records.push((lsn, mutations.to_vec()));
        Ok(lsn)
    }

    fn watch(&self) -> DurableWatch {
        DurableWatch::always()
    }
}
