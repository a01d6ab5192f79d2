//! The engine's [`Journal`] on a cluster node. On the leader, once it is
//! ready (the first entry of its term applied, so the engine holds all that
//! was committed before), each record gets the next engine LSN and goes to
//! one proposer task that hands records to Raft in that order: the Raft log
//! holds them in the order the leader applied them. Requests wait until the
//! state machine applies their record, that is until it is committed on a
//! majority's disk. On any other node, or a leader not ready, `append`
//! refuses, so the engine applies nothing of its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

use super::types::Record;
use crate::clock::Millis;
use crate::engine::{Lsn, Mutation};
use crate::journal::{DurableWatch, Journal, JournalError, Waiters};
use crate::storage::codec;

/// A record on its way to Raft, with the leadership it was made under.
pub type Proposal = (u64, Record);

struct State {
    /// The leadership (a number that grows with each) records are made
    /// under, while this node leads and is ready.
    serving: Option<u64>,
    /// Bumped at every open.
    epoch: u64,
    /// The LSN the next record gets.
    next_lsn: Lsn,
    /// Why appends are refused now.
    refusal: String,
}

/// See the module documentation.
pub struct RaftJournal {
    state: Mutex<State>,
    proposals: mpsc::UnboundedSender<Proposal>,
    waiters: Arc<Waiters>,
    /// The newest LSN handed out (shared with the state machine, which does
    /// not apply again what this node applied as leader).
    speculated: Arc<AtomicU64>,
}

impl RaftJournal {
    /// A journal that refuses until [`RaftJournal::open`]; proposals come
    /// out of the receiver.
    pub fn new(waiters: Arc<Waiters>, speculated: Arc<AtomicU64>) -> (RaftJournal, mpsc::UnboundedReceiver<Proposal>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let j = RaftJournal {
            state: Mutex::new(State {
                serving: None,
                epoch: 0,
                next_lsn: 1,
                refusal: "no leader is elected yet".into(),
            }),
            proposals: tx,
            waiters,
            speculated,
        };
        (j, rx)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This node leads and its state machine has applied everything up to
    /// engine LSN `applied`: records are numbered after it from now on.
    /// Returns the leadership's number.
    pub fn open(&self, applied: Lsn) -> u64 {
        let mut s = self.lock();
        s.epoch += 1;
        s.serving = Some(s.epoch);
        s.next_lsn = applied + 1;
        self.speculated.fetch_max(applied, Ordering::AcqRel);
        s.epoch
    }

    /// Refuses appends from now on, saying `why`. Returns true when records
    /// were handed out that are not durable yet: their outcome is unknown
    /// here, and the engine is ahead of the log.
    pub fn close(&self, why: &str) -> bool {
        let mut s = self.lock();
        s.refusal = why.to_string();
        let was = s.serving.take().is_some();
        was && self.speculated.load(Ordering::Acquire) > self.waiters_durable()
    }

    fn waiters_durable(&self) -> Lsn {
        DurableWatch::Waiters(self.waiters.clone()).durable_lsn()
    }

    /// The leadership records are made under now, if any.
    pub fn serving(&self) -> Option<u64> {
        self.lock().serving
    }

    /// Where requests wait for their records.
    pub fn waiters(&self) -> &Arc<Waiters> {
        &self.waiters
    }
}

impl Journal for RaftJournal {
    fn append(&self, at_ms: Millis, mutations: &[Mutation]) -> Result<Lsn, JournalError> {
        let mut bytes = Vec::new();
        codec::encode_record(at_ms, mutations, &mut bytes).map_err(|e| JournalError(e.to_string()))?;
        let mut s = self.lock();
        let Some(epoch) = s.serving else {
            return Err(JournalError(s.refusal.clone()));
        };
        let lsn = s.next_lsn;
        let record = Record {
            lsn,
            version: codec::FORMAT_VERSION,
            bytes,
        };
        self.proposals
            .send((epoch, record))
            .map_err(|_| JournalError("the Raft proposer stopped".into()))?;
        s.next_lsn += 1;
        self.speculated.fetch_max(lsn, Ordering::AcqRel);
        Ok(lsn)
    }

    fn watch(&self) -> DurableWatch {
        DurableWatch::Waiters(self.waiters.clone())
    }
}
