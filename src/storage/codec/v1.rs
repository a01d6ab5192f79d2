//! Format version 1, frozen: the types as they were when version 1 was the
//! format written, and their conversion to today's. Nothing here may change;
//! the golden files in `tests/golden/v1` are read through it.
//!
//! Version 2 added the price a reservation was made under and the engine time
//! of every WAL record, and keeps stored answers packed instead of as JSON.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use crate::clock::Millis;
use crate::engine::{
    json_text, Counter, CounterKey, FastMap, FinishAnswer, Hold, IdempotencyEntry, Lsn, Mutation, Override,
    PackedAnswer, Reservation, ReservationStatus, Shard, Slot, StoredAnswer, Subjects,
};

/// An idempotency entry of version 1: the answer as JSON text.
#[derive(Deserialize)]
pub struct IdempotencyEntryV1 {
    fingerprint: u64,
    #[serde(with = "json_text")]
    answer: StoredAnswer,
    expires_ms: Millis,
}

impl From<IdempotencyEntryV1> for IdempotencyEntry {
    fn from(e: IdempotencyEntryV1) -> IdempotencyEntry {
        IdempotencyEntry {
            fingerprint: e.fingerprint,
            answer: PackedAnswer::pack(&e.answer),
            expires_ms: e.expires_ms,
        }
    }
}

/// A reservation of version 1: no price.
#[derive(Deserialize)]
pub struct ReservationV1 {
    id: String,
    subject: Arc<str>,
    amounts: BTreeMap<String, u64>,
    holds: Vec<Hold>,
    created_ms: Millis,
    expires_ms: Millis,
    status: ReservationStatus,
    finished_ms: Option<Millis>,
    #[serde(with = "json_text")]
    answer: Option<FinishAnswer>,
}

impl From<ReservationV1> for Reservation {
    fn from(r: ReservationV1) -> Reservation {
        Reservation {
            id: r.id,
            subject: r.subject,
            amounts: r.amounts,
            holds: r.holds,
            created_ms: r.created_ms,
            expires_ms: r.expires_ms,
            status: r.status,
            finished_ms: r.finished_ms,
            answer: r.answer,
            price: None,
        }
    }
}

/// The mutations of version 1, in their order (bincode encodes the variant index).
#[derive(Deserialize)]
pub enum MutationV1 {
    Charge {
        counter: CounterKey,
        slot: Slot,
        delta: i64,
        at_ms: Millis,
    },
    ResetCounter {
        counter: CounterKey,
    },
    Credit {
        counter: CounterKey,
        slot: Slot,
        amount: u64,
        at_ms: Millis,
    },
    SetSubject {
        subject: Arc<str>,
        plan: Option<String>,
        overrides: BTreeMap<String, Override>,
    },
    DeleteSubject {
        subject: Arc<str>,
    },
    PutReservation(Box<ReservationV1>),
    DropReservation {
        id: String,
        active_subject: Option<Arc<str>>,
    },
    PutIdempotency {
        key: String,
        entry: Box<IdempotencyEntryV1>,
    },
    DropIdempotency {
        key: String,
    },
}

impl From<MutationV1> for Mutation {
    fn from(m: MutationV1) -> Mutation {
        match m {
            MutationV1::Charge {
                counter,
                slot,
                delta,
                at_ms,
            } => Mutation::Charge {
                counter,
                slot,
                delta,
                at_ms,
            },
            MutationV1::ResetCounter { counter } => Mutation::ResetCounter { counter },
            MutationV1::Credit {
                counter,
                slot,
                amount,
                at_ms,
            } => Mutation::Credit {
                counter,
                slot,
                amount,
                at_ms,
            },
            MutationV1::SetSubject {
                subject,
                plan,
                overrides,
            } => Mutation::SetSubject {
                subject,
                plan,
                overrides,
            },
            MutationV1::DeleteSubject { subject } => Mutation::DeleteSubject { subject },
            MutationV1::PutReservation(r) => Mutation::PutReservation(Box::new((*r).into())),
            MutationV1::DropReservation { id, active_subject } => Mutation::DropReservation { id, active_subject },
            MutationV1::PutIdempotency { key, entry } => Mutation::PutIdempotency {
                key,
                entry: Box::new((*entry).into()),
            },
            MutationV1::DropIdempotency { key } => Mutation::DropIdempotency { key },
        }
    }
}

/// Version 1 records carry no time of their own: the latest time any of
/// their mutations names stands in for it.
pub fn record_time(muts: &[Mutation]) -> Millis {
    muts.iter()
        .map(|m| match m {
            Mutation::Charge { at_ms, .. } | Mutation::Credit { at_ms, .. } => *at_ms,
            Mutation::PutReservation(r) => r.finished_ms.unwrap_or(r.created_ms).max(r.created_ms),
            _ => 0,
        })
        .max()
        .unwrap_or(0)
}

/// A snapshot shard of version 1.
#[derive(Deserialize)]
pub struct ShardV1 {
    applied_lsn: Lsn,
    subjects: Subjects,
    shared: FastMap<CounterKey, Counter>,
    reservations: FastMap<String, (ReservationV1, Lsn)>,
    idempotency: FastMap<String, (IdempotencyEntryV1, Lsn)>,
}

impl From<ShardV1> for Shard {
    fn from(s: ShardV1) -> Shard {
        Shard {
            applied_lsn: s.applied_lsn,
            subjects: s.subjects,
            shared: s.shared,
            reservations: s
                .reservations
                .into_iter()
                .map(|(k, (r, lsn))| (k, (r.into(), lsn)))
                .collect(),
            idempotency: s
                .idempotency
                .into_iter()
                .map(|(k, (e, lsn))| (k, (e.into(), lsn)))
                .collect(),
            usage: Default::default(),
            hold_expiries: Default::default(),
        }
    }
}
