//! The byte encoding of WAL record payloads and snapshot shards: bincode 2.0.1
//! (serde, standard config) behind `FORMAT_VERSION`. Every WAL segment header
//! and snapshot carries the version it was written with; decoding dispatches on
//! it, so a future codec adds a version here and keeps reading version 1 (the
//! golden files in `tests/golden` hold it to that).

use crate::engine::{Mutation, Shard};

/// The format written by this build.
pub const FORMAT_VERSION: u16 = 1;

/// Largest payload decoded: a corrupt length inside a payload cannot make the
/// decoder allocate more than this.
const DECODE_LIMIT_BYTES: usize = 1 << 30;

/// Why bytes could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(pub String);

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT_BYTES>()
}

fn check_version(version: u16) -> Result<(), CodecError> {
    if version == 1 {
        Ok(())
    } else {
        Err(CodecError(format!(
            "format version {version} is not known to this build (it reads version 1); use the quotad that wrote it"
        )))
    }
}

/// Appends the payload of one record (the mutations of one operation) to `out`.
pub fn encode_mutations(muts: &[Mutation], out: &mut Vec<u8>) -> Result<(), CodecError> {
    bincode::serde::encode_into_std_write(muts, out, config())
        .map(|_| ())
        .map_err(|e| CodecError(e.to_string()))
}

/// Decodes one record payload written with `version`; the whole slice must be used.
pub fn decode_mutations(version: u16, bytes: &[u8]) -> Result<Vec<Mutation>, CodecError> {
    check_version(version)?;
    let (muts, used): (Vec<Mutation>, usize) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| CodecError(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError(format!(
            "{} trailing bytes after the record",
            bytes.len() - used
        )));
    }
    Ok(muts)
}

/// Encodes one shard for a snapshot.
pub fn encode_shard(shard: &Shard) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(shard, config()).map_err(|e| CodecError(e.to_string()))
}

/// Decodes one snapshot shard written with `version`.
pub fn decode_shard(version: u16, bytes: &[u8]) -> Result<Shard, CodecError> {
    check_version(version)?;
    let (shard, used): (Shard, usize) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| CodecError(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError(format!(
            "{} trailing bytes after the shard",
            bytes.len() - used
        )));
    }
    Ok(shard)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{MaxValue, Mode};
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
                }),
            })),
            Mutation::DropReservation {
                id: "rsv_1".into(),
                active_subject: Some("s".into()),
            },
            Mutation::PutIdempotency {
                key: "k".into(),
                entry: Box::new(IdempotencyEntry {
                    fingerprint: 1,
                    answer: StoredAnswer::Decision(decision()),
                    expires_ms: 3,
                }),
            },
            Mutation::DropIdempotency { key: "k".into() },
        ];
        let mut bytes = Vec::new();
        encode_mutations(&muts, &mut bytes).unwrap();
        assert_eq!(decode_mutations(1, &bytes).unwrap(), muts);
        assert!(decode_mutations(2, &bytes).is_err(), "unknown versions are refused");
        bytes.push(0);
        assert!(decode_mutations(1, &bytes).is_err(), "trailing bytes are refused");
    }
}
