//! The in-memory state held in each shard, and [`apply`], the one function that
//! changes it: live commands and replay both go through it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::counter::{apply_charge, apply_credit, Counter};
use super::types::{CounterKey, IdempotencyEntry, Lsn, Mutation, Override, Reservation, ReservationStatus, ScopeKey};

/// What is known about one subject.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectState {
    /// Assigned plan; `None` means the default plan.
    pub plan: Option<String>,
    /// Per-limit overrides.
    pub overrides: BTreeMap<String, Override>,
    /// Subject-scoped counters by limit name.
    pub counters: HashMap<Arc<str>, Counter>,
    /// Ids of its active reservations.
    pub holds: BTreeSet<String>,
}

impl SubjectState {
    /// Nothing worth keeping: the subject can be forgotten.
    pub fn is_empty(&self) -> bool {
        self.plan.is_none() && self.overrides.is_empty() && self.counters.is_empty() && self.holds.is_empty()
    }
}

/// One shard of the state. Which shard an item lives in is a hash of its key
/// (see `Engine::shard_of_*`); a mutation is applied to the shard of its key.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Shard {
    /// Every record at or below this LSN that touched this shard is applied here;
    /// a snapshot of the shard is as of this LSN, and replay skips what it covers.
    pub applied_lsn: Lsn,
    /// Subjects by name, ordered for listing.
    pub subjects: BTreeMap<Arc<str>, SubjectState>,
    /// Counters of global and attribute scope.
    pub shared: HashMap<CounterKey, Counter>,
    /// Reservations by id, active and recently finished, with the LSN of the
    /// record that last changed them (a repeated answer waits for it).
    pub reservations: HashMap<String, (Reservation, Lsn)>,
    /// Idempotency entries by key, with the LSN of the record that stored them.
    pub idempotency: HashMap<String, (IdempotencyEntry, Lsn)>,
}

/// Gives `apply` the shard an item lives in. Implemented by the engine's lock
/// guard (live) and by plain access during replay.
pub trait ShardAccess {
    /// The shard of a subject.
    fn subject_shard(&mut self, subject: &str) -> &mut Shard;
    /// The shard of a global or attribute counter.
    fn shared_shard(&mut self, key: &CounterKey) -> &mut Shard;
    /// The shard of a reservation.
    fn reservation_shard(&mut self, id: &str) -> &mut Shard;
    /// The shard of an idempotency key.
    fn idempotency_shard(&mut self, key: &str) -> &mut Shard;
}

/// Effects of `apply` that live outside the shards.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Change in the number of active reservations.
    pub open_reservations_delta: isize,
}

fn counter_slot<'a, A: ShardAccess>(access: &'a mut A, key: &CounterKey) -> CounterSlot<'a> {
    match &key.scope {
        ScopeKey::Subject(s) => {
            let shard = access.subject_shard(s);
            let st = shard.subjects.entry(s.clone()).or_default();
            CounterSlot::Subject(st, key.limit.clone())
        }
        _ => CounterSlot::Shared(access.shared_shard(key), key.clone()),
    }
}

enum CounterSlot<'a> {
    Subject(&'a mut SubjectState, Arc<str>),
    Shared(&'a mut Shard, CounterKey),
}

impl CounterSlot<'_> {
    fn update(self, f: impl FnOnce(&mut Option<Counter>)) {
        match self {
            CounterSlot::Subject(st, limit) => {
                let mut c = st.counters.remove(&limit);
                f(&mut c);
                if let Some(c) = c {
                    st.counters.insert(limit, c);
                }
            }
            CounterSlot::Shared(shard, key) => {
                let mut c = shard.shared.remove(&key);
                f(&mut c);
                if let Some(c) = c {
                    shard.shared.insert(key, c);
                }
            }
        }
    }
}

fn tidy_subject<A: ShardAccess>(access: &mut A, subject: &str) {
    let shard = access.subject_shard(subject);
    if shard.subjects.get(subject).is_some_and(SubjectState::is_empty) {
        shard.subjects.remove(subject);
    }
}

/// Applies one mutation. `lsn` is the record it belongs to.
pub fn apply<A: ShardAccess>(access: &mut A, m: &Mutation, lsn: Lsn) -> Applied {
    let mut out = Applied::default();
    match m {
        Mutation::Charge {
            counter,
            slot,
            delta,
            at_ms,
        } => {
            counter_slot(access, counter).update(|c| apply_charge(c, slot, *delta, *at_ms));
            if let ScopeKey::Subject(s) = &counter.scope {
                tidy_subject(access, s);
            }
        }
        Mutation::Credit {
            counter,
            slot,
            amount,
            at_ms,
        } => {
            counter_slot(access, counter).update(|c| apply_credit(c, slot, *amount, *at_ms));
            if let ScopeKey::Subject(s) = &counter.scope {
                tidy_subject(access, s);
            }
        }
        Mutation::ResetCounter { counter } => {
            counter_slot(access, counter).update(|c| *c = None);
            if let ScopeKey::Subject(s) = &counter.scope {
                tidy_subject(access, s);
            }
        }
        Mutation::SetSubject {
            subject,
            plan,
            overrides,
        } => {
            let st = access
                .subject_shard(subject)
                .subjects
                .entry(subject.clone())
                .or_default();
            st.plan = plan.clone();
            st.overrides = overrides.clone();
            tidy_subject(access, subject);
        }
        Mutation::DeleteSubject { subject } => {
            access.subject_shard(subject).subjects.remove(&**subject);
        }
        Mutation::PutReservation(r) => {
            let was_active = access
                .reservation_shard(&r.id)
                .reservations
                .insert(r.id.clone(), ((**r).clone(), lsn))
                .is_some_and(|(old, _)| old.status == ReservationStatus::Active);
            let is_active = r.status == ReservationStatus::Active;
            out.open_reservations_delta = isize::from(is_active) - isize::from(was_active);
            let st = access
                .subject_shard(&r.subject)
                .subjects
                .entry(r.subject.clone())
                .or_default();
            if is_active {
                st.holds.insert(r.id.clone());
            } else {
                st.holds.remove(&r.id);
            }
            tidy_subject(access, &r.subject);
        }
        Mutation::DropReservation { id, active_subject } => {
            if let Some((r, _)) = access.reservation_shard(id).reservations.remove(id) {
                if r.status == ReservationStatus::Active {
                    out.open_reservations_delta = -1;
                }
            }
            // Only an active reservation is listed in its subject, so dropping a
            // finished one (garbage collection) touches the reservation's shard alone.
            if let Some(subject) = active_subject {
                if let Some(st) = access.subject_shard(subject).subjects.get_mut(&**subject) {
                    st.holds.remove(id);
                }
                tidy_subject(access, subject);
            }
        }
        Mutation::PutIdempotency { key, entry } => {
            access
                .idempotency_shard(key)
                .idempotency
                .insert(key.clone(), ((**entry).clone(), lsn));
        }
        Mutation::DropIdempotency { key } => {
            access.idempotency_shard(key).idempotency.remove(key);
        }
    }
    out
}
