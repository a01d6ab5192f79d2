//! The byte encoding of WAL record payloads and snapshot shards: bincode 2.0.1
//! (serde, standard config) behind `FORMAT_VERSION`. Every WAL segment header
//! and snapshot carries the version it was written with; decoding dispatches on
//! it, and older versions decode through their frozen types ([`v1`]) into
//! today's (the golden files in `tests/golden` hold it to that).
//!
//! Version 2: a record is `(engine time in ms, mutations)`; reservations keep
//! the price they were made under; stored answers are packed bytes
//! ([`crate::engine::PackedAnswer`]) instead of JSON text.
//!
//! Version 3 adds, at the ends of their enums (so version 2 bytes decode
//! unchanged): `Mutation::Signal` (events, threshold marks, breaker and flag
//! changes), `Counter::Periods` and `Slot::Periods` (anomaly history). A
//! version 2 build cannot read version 3 records, hence the new number.
//!
//! Version 4 changes no encoding here: records and shards are as in version
//! 3. It marks the snapshot file's event and usage values as checksummed
//! (see `storage::snapshot`), which a version 3 build would misread.
//!
//! Version 5 adds `Mutation::SetPolicy` (a new version of the policy, and
//! the counters it drops), the stored answer of a policy write, the
//! `policy.changed` event, and the snapshot's `policy` table (the versions
//! kept). Version 4 bytes decode unchanged.

pub mod v1;

use crate::clock::Millis;
use crate::engine::{Mutation, Shard};

/// The format written by this build.
pub const FORMAT_VERSION: u16 = 5;

/// Largest shard decoded: a corrupt length inside a shard cannot make the
/// decoder allocate more than this.
const SHARD_LIMIT_BYTES: usize = 1 << 30;
/// Largest record decoded, as the WAL frames them (`wal::MAX_PAYLOAD_BYTES`).
const RECORD_LIMIT_BYTES: usize = 4 << 20;

/// Why bytes could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(pub String);

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<SHARD_LIMIT_BYTES>()
}

fn record_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<RECORD_LIMIT_BYTES>()
}

fn unknown_version(version: u16) -> CodecError {
    CodecError(format!(
        "format version {version} is not known to this build (it reads versions 1 to {FORMAT_VERSION}); \
         use the quotad that wrote it"
    ))
}

/// Decodes a whole slice as `T`: trailing bytes are damage, not padding.
fn decode_exact<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
    config: impl bincode::config::Config,
) -> Result<T, CodecError> {
    let (value, used): (T, usize) =
        bincode::serde::decode_from_slice(bytes, config).map_err(|e| CodecError(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError(format!(
            "{} trailing bytes after the {what}",
            bytes.len() - used
        )));
    }
    Ok(value)
}

/// Appends the payload of one record (the engine time and the mutations of
/// one operation) to `out`.
pub fn encode_record(at_ms: Millis, muts: &[Mutation], out: &mut Vec<u8>) -> Result<(), CodecError> {
    bincode::serde::encode_into_std_write((at_ms, muts), out, record_config())
        .map(|_| ())
        .map_err(|e| CodecError(e.to_string()))
}

/// Decodes one record payload written with `version`: its engine time and
/// mutations. The whole slice must be used.
pub fn decode_record(version: u16, bytes: &[u8]) -> Result<(Millis, Vec<Mutation>), CodecError> {
    match version {
        1 => {
            let muts: Vec<v1::MutationV1> = decode_exact(bytes, "record", record_config())?;
            let muts: Vec<Mutation> = muts.into_iter().map(Mutation::from).collect();
            Ok((v1::record_time(&muts), muts))
        }
        2..=5 => decode_exact(bytes, "record", record_config()),
        v => Err(unknown_version(v)),
    }
}

/// Largest Raft value decoded: a log entry, or a message between peers
/// (entries sent in one batch).
const RAFT_LIMIT_BYTES: usize = 64 << 20;

/// Encodes a cluster node's Raft value: a log entry, its stored state, or a
/// message to a peer.
pub fn encode_raft<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|e| CodecError(e.to_string()))
}

/// Decodes a whole slice written by [`encode_raft`]; `what` names it in errors.
pub fn decode_raft<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, CodecError> {
    decode_exact(
        bytes,
        what,
        bincode::config::standard().with_limit::<RAFT_LIMIT_BYTES>(),
    )
}

/// Encodes the signals state (events' tail excluded) for a snapshot.
pub fn encode_signals(signals: &crate::engine::signals::Signals) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(signals, config()).map_err(|e| CodecError(e.to_string()))
}

/// Decodes the signals state of a version 3 snapshot.
pub fn decode_signals(bytes: &[u8]) -> Result<crate::engine::signals::Signals, CodecError> {
    decode_exact(bytes, "signals state", config())
}

/// Encodes the policy's stored versions for a snapshot.
pub fn encode_policy_log(log: &crate::engine::PolicyLog) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(log, config()).map_err(|e| CodecError(e.to_string()))
}

/// Decodes the policy's stored versions of a version 5 snapshot.
pub fn decode_policy_log(bytes: &[u8]) -> Result<crate::engine::PolicyLog, CodecError> {
    decode_exact(bytes, "policy versions", config())
}

/// Encodes one shard for a snapshot.
pub fn encode_shard(shard: &Shard) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(shard, config()).map_err(|e| CodecError(e.to_string()))
}

/// Decodes one snapshot shard written with `version`.
pub fn decode_shard(version: u16, bytes: &[u8]) -> Result<Shard, CodecError> {
    match version {
        1 => decode_exact::<v1::ShardV1>(bytes, "shard", config()).map(Shard::from),
        2..=5 => decode_exact(bytes, "shard", config()),
        v => Err(unknown_version(v)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::engine::policy::{MaxValue, Mode};
    use crate::engine::*;

    fn decision() -> Decision {
        Decision {
            allowed: true,
            decision: Outcome::Degrade,
            subject: "u".into(),
            plan: "free".into(),
            counters: vec![
                CounterView {
                    limit: "l".into(),
                    metric: "tokens".into(),
                    scope: "u".into(),
                    max: MaxValue::Unlimited,
                    used: 5,
                    remaining: None,
                    resets_at: Some(1_795_255_200_000),
                    mode: Mode::Degrade,
                },
                // A lifetime counter: no `resets_at`, no `remaining` (unlimited).
                CounterView {
                    limit: "life".into(),
                    metric: "requests".into(),
                    scope: "global".into(),
                    max: MaxValue::Unlimited,
                    used: 1,
                    remaining: None,
                    resets_at: None,
                    mode: Mode::Enforce,
                },
            ],
            reasons: vec![Reason {
                limit: None,
                code: ReasonCode::Unmatched,
                retry_after_ms: None,
            }],
            retry_after_ms: None,
            replayed: false,
            reservation_id: Some("rsv_1".into()),
            expires_at: Some(1),
            cost: Some(Cost {
                amount_micros: 7,
                currency: "USD".into(),
                price: Some("gpt-4o".into()),
                explicit: false,
            }),
            waited_ms: None,
        }
    }

    #[test]
    fn every_mutation_round_trips() {
        let key = CounterKey {
            limit: "l".into(),
            scope: ScopeKey::Attribute {
                name: "model".into(),
                value: "m".into(),
            },
        };
        let muts = vec![
            Mutation::Charge {
                counter: key.clone(),
                slot: Slot::Sliding {
                    bucket: 7,
                    bucket_ms: 1000,
                    period_ms: 60_000,
                },
                delta: -3,
                at_ms: 9,
            },
            Mutation::ResetCounter {
                counter: CounterKey {
                    limit: "x".into(),
                    scope: ScopeKey::Global,
                },
            },
            Mutation::Credit {
                counter: key.clone(),
                slot: Slot::Lifetime,
                amount: 4,
                at_ms: 1,
            },
            Mutation::SetSubject {
                subject: "s".into(),
                plan: Some("pro".into()),
                overrides: BTreeMap::from([
                    (
                        "a".to_string(),
                        Override {
                            max: MaxValue::Finite(3),
                        },
                    ),
                    (
                        "b".to_string(),
                        Override {
                            max: MaxValue::Unlimited,
                        },
                    ),
                ]),
            },
            Mutation::DeleteSubject { subject: "s".into() },
            Mutation::PutReservation(Box::new(Reservation {
                id: "rsv_1".into(),
                subject: "s".into(),
                amounts: BTreeMap::from([("tokens".to_string(), 5)]),
                holds: vec![Hold {
                    counter: key,
                    metric: "tokens".into(),
                    slot: Slot::Bucket {
                        period_ms: 1,
                        refill: 2,
                    },
                    amount: 5,
                }],
                created_ms: 1,
                expires_ms: 2,
                status: ReservationStatus::Committed,
                finished_ms: Some(2),
                answer: Some(FinishAnswer {
                    reservation_id: "rsv_1".into(),
                    subject: "s".into(),
                    status: ReservationStatus::Committed,
                    expired: false,
                    held: BTreeMap::new(),
                    charged: BTreeMap::new(),
                    counters: decision().counters,
                    cost: None,
                    first: false,
                }),
                price: Some(std::sync::Arc::new(PriceRates {
                    name: "gpt-4o".into(),
                    metric: "cost_micros".into(),
                    currency: "USD".into(),
                    rates: vec![("input_tokens".into(), 5), ("output_tokens".into(), 20)],
                    den: 2,
                })),
            })),
            Mutation::DropReservation {
                id: "rsv_1".into(),
                active_subject: Some("s".into()),
            },
            Mutation::PutIdempotency {
                key: "k".into(),
                entry: Box::new(IdempotencyEntry {
                    fingerprint: 1,
                    answer: PackedAnswer::decision(&decision()),
                    expires_ms: 3,
                }),
            },
            Mutation::DropIdempotency { key: "k".into() },
        ];
        let mut bytes = Vec::new();
        encode_record(42, &muts, &mut bytes).unwrap();
        assert_eq!(decode_record(FORMAT_VERSION, &bytes).unwrap(), (42, muts));
        assert!(
            decode_record(FORMAT_VERSION + 1, &bytes).is_err(),
            "unknown versions are refused"
        );
        bytes.push(0);
        assert!(
            decode_record(FORMAT_VERSION, &bytes).is_err(),
            "trailing bytes are refused"
        );
    }
}
