//! Stored answers, packed. Every retained idempotency key keeps the answer it
//! was given, to repeat it on a retry; retries are rare and keys are many
//! (`engine.max_idempotency_keys`, default ten million), so the answer is kept
//! as a compact byte string and unpacked only when a retry asks for it. The
//! same bytes are what the WAL and snapshots store (format version 2).
//!
//! Packed: bincode of [`Packed`]. A counter's `remaining` is derived from
//! `max` and `used`, a subject-scoped counter's scope is the subject, and the
//! reset times are offsets from the earliest one.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::types::{Cost, CounterView, Decision, Outcome, Reason, ReasonCode, StoredAnswer};
use crate::clock::Millis;
use crate::engine::policy::{MaxValue, Mode};

/// A [`StoredAnswer`] as compact bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct PackedAnswer(Box<[u8]>);

#[derive(Serialize, Deserialize)]
enum Packed {
    Decision(Box<PackedDecision>),
    Deleted {
        subject: String,
        existed: bool,
    },
    Policy {
        version: u64,
        previous_version: u64,
        dropped: Vec<(String, String)>,
    },
}

#[derive(Serialize, Deserialize)]
struct PackedDecision {
    allowed: bool,
    decision: Outcome,
    subject: String,
    plan: String,
    /// The earliest `resets_at`; counters store theirs as offsets from it.
    resets_base_ms: Millis,
    counters: Vec<PackedCounter>,
    reasons: Vec<(Option<String>, ReasonCode, Option<u64>)>,
    retry_after_ms: Option<u64>,
    reservation_id: Option<String>,
    expires_at: Option<Millis>,
    /// (micro-units, currency, price, explicit).
    cost: Option<(u64, String, Option<String>, bool)>,
}

#[derive(Serialize, Deserialize)]
struct PackedCounter {
    limit: String,
    metric: String,
    /// `None`: the subject itself.
    scope: Option<String>,
    /// `None`: unlimited.
    max: Option<u64>,
    used: u64,
    /// Offset from `resets_base_ms`; `None` for lifetime limits.
    resets_in: Option<u64>,
    mode: Mode,
}

/// A claimed length inside damaged bytes must not make the decoder allocate
/// it: no answer comes near this size.
const ANSWER_BYTES_MAX: usize = 1 << 20;

fn codec() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<ANSWER_BYTES_MAX>()
}

impl PackedAnswer {
    /// Packs an answer.
    pub fn pack(answer: &StoredAnswer) -> PackedAnswer {
        let packed = match answer {
            StoredAnswer::Decision(d) => Packed::Decision(Box::new(pack_decision(d))),
            StoredAnswer::Deleted { subject, existed } => Packed::Deleted {
                subject: subject.clone(),
                existed: *existed,
            },
            StoredAnswer::Policy {
                version,
                previous_version,
                dropped,
            } => Packed::Policy {
                version: *version,
                previous_version: *previous_version,
                dropped: dropped.clone(),
            },
        };
        let bytes = bincode::serde::encode_to_vec(&packed, codec()).expect("answers encode");
        PackedAnswer(bytes.into_boxed_slice())
    }

    /// The answer of a decision.
    pub fn decision(d: &Decision) -> PackedAnswer {
        let bytes = bincode::serde::encode_to_vec(Packed::Decision(Box::new(pack_decision(d))), codec())
            .expect("answers encode");
        PackedAnswer(bytes.into_boxed_slice())
    }

    /// The answer as it was given. The bytes were checked when they were read
    /// from disk ([`PackedAnswer::from_bytes`]) or made here, so this cannot fail.
    pub fn unpack(&self) -> StoredAnswer {
        Self::try_unpack(&self.0).expect("packed answers were checked when made or read")
    }

    /// The packed bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Takes bytes read from disk, checking that they unpack.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<PackedAnswer, String> {
        Self::try_unpack(&bytes)?;
        Ok(PackedAnswer(bytes.into_boxed_slice()))
    }

    fn try_unpack(bytes: &[u8]) -> Result<StoredAnswer, String> {
        let (packed, used): (Packed, usize) =
            bincode::serde::decode_from_slice(bytes, codec()).map_err(|e| format!("stored answer: {e}"))?;
        if used != bytes.len() {
            return Err(format!("stored answer: {} trailing bytes", bytes.len() - used));
        }
        Ok(match packed {
            Packed::Decision(p) => StoredAnswer::Decision(unpack_decision(*p)),
            Packed::Deleted { subject, existed } => StoredAnswer::Deleted { subject, existed },
            Packed::Policy {
                version,
                previous_version,
                dropped,
            } => StoredAnswer::Policy {
                version,
                previous_version,
                dropped,
            },
        })
    }
}

fn pack_decision(d: &Decision) -> PackedDecision {
    let base = d.counters.iter().filter_map(|c| c.resets_at).min().unwrap_or(0);
    PackedDecision {
        allowed: d.allowed,
        decision: d.decision,
        subject: d.subject.clone(),
        plan: d.plan.to_string(),
        resets_base_ms: base,
        counters: d
            .counters
            .iter()
            .map(|c| PackedCounter {
                limit: c.limit.to_string(),
                metric: c.metric.to_string(),
                scope: (*c.scope != *d.subject).then(|| c.scope.to_string()),
                max: match c.max {
                    MaxValue::Finite(m) => Some(m),
                    MaxValue::Unlimited => None,
                },
                used: c.used,
                resets_in: c.resets_at.map(|r| r - base),
                mode: c.mode,
            })
            .collect(),
        reasons: d
            .reasons
            .iter()
            .map(|r| (r.limit.as_deref().map(str::to_string), r.code, r.retry_after_ms))
            .collect(),
        retry_after_ms: d.retry_after_ms,
        reservation_id: d.reservation_id.clone(),
        expires_at: d.expires_at,
        cost: d.cost.as_ref().map(|c| {
            (
                c.amount_micros,
                c.currency.to_string(),
                c.price.as_deref().map(str::to_string),
                c.explicit,
            )
        }),
    }
}

fn unpack_decision(p: PackedDecision) -> Decision {
    let subject: Arc<str> = p.subject.as_str().into();
    Decision {
        allowed: p.allowed,
        decision: p.decision,
        plan: p.plan.into(),
        counters: p
            .counters
            .into_iter()
            .map(|c| {
                let max = c.max.map_or(MaxValue::Unlimited, MaxValue::Finite);
                CounterView {
                    limit: c.limit.into(),
                    metric: c.metric.into(),
                    scope: c.scope.map_or_else(|| subject.clone(), Arc::from),
                    max,
                    used: c.used,
                    remaining: match max {
                        MaxValue::Finite(m) => Some(m.saturating_sub(c.used)),
                        MaxValue::Unlimited => None,
                    },
                    resets_at: c.resets_in.map(|r| p.resets_base_ms + r),
                    mode: c.mode,
                }
            })
            .collect(),
        reasons: p
            .reasons
            .into_iter()
            .map(|(limit, code, retry_after_ms)| Reason {
                limit: limit.map(Arc::from),
                code,
                retry_after_ms,
            })
            .collect(),
        subject: p.subject,
        retry_after_ms: p.retry_after_ms,
        replayed: false,
        reservation_id: p.reservation_id,
        expires_at: p.expires_at,
        cost: p.cost.map(|(amount_micros, currency, price, explicit)| Cost {
            amount_micros,
            currency: currency.into(),
            price: price.map(Arc::from),
            explicit,
        }),
        waited_ms: None,
    }
}

impl std::fmt::Debug for PackedAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.unpack().fmt(f)
    }
}

/// Binary formats store the bytes; text formats (`wal dump`, the state
/// digest) show the answer itself.
impl Serialize for PackedAnswer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            self.unpack().serialize(s)
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for PackedAnswer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            Ok(PackedAnswer::pack(&StoredAnswer::deserialize(d)?))
        } else {
            let bytes: Vec<u8> = serde_bytes_vec(d)?;
            PackedAnswer::from_bytes(bytes).map_err(serde::de::Error::custom)
        }
    }
}

/// Reads a byte string (bincode writes `serialize_bytes` as a length and the
/// bytes, which `Vec<u8>`'s own impl would read as a sequence anyway).
fn serde_bytes_vec<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte string")
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
            while let Some(b) = seq.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }
    d.deserialize_byte_buf(V)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision() -> Decision {
        let view = |limit: &str, scope: &str, max: MaxValue, used: u64, resets_at: Option<u64>| CounterView {
            limit: limit.into(),
            metric: "tokens".into(),
            scope: scope.into(),
            max,
            used,
            remaining: match max {
                MaxValue::Finite(m) => Some(m.saturating_sub(used)),
                MaxValue::Unlimited => None,
            },
            resets_at,
            mode: Mode::Degrade,
        };
        Decision {
            allowed: false,
            decision: Outcome::Deny,
            subject: "user:42".into(),
            plan: "free".into(),
            counters: vec![
                view("day", "user:42", MaxValue::Finite(100), 150, Some(1_795_305_600_000)),
                view("global", "global", MaxValue::Unlimited, 7, Some(1_795_255_260_000)),
                view("credits", "model=gpt-4o", MaxValue::Finite(5), 1, None),
            ],
            reasons: vec![
                Reason {
                    limit: Some("day".into()),
                    code: ReasonCode::LimitExceeded,
                    retry_after_ms: Some(99),
                },
                Reason {
                    limit: None,
                    code: ReasonCode::Unmatched,
                    retry_after_ms: None,
                },
            ],
            retry_after_ms: Some(99),
            replayed: false,
            reservation_id: Some("rsv_1".into()),
            expires_at: Some(5),
            cost: Some(Cost {
                amount_micros: 12,
                currency: "USD".into(),
                price: Some("gpt-4o".into()),
                explicit: false,
            }),
            waited_ms: None,
        }
    }

    #[test]
    fn answers_round_trip_through_their_packed_bytes() {
        let d = decision();
        let p = PackedAnswer::decision(&d);
        assert_eq!(p.unpack(), StoredAnswer::Decision(d.clone()));
        assert!(p.as_bytes().len() < 160, "{} bytes", p.as_bytes().len());
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["Decision"]["subject"], "user:42", "text formats show the answer");
        let back: PackedAnswer = serde_json::from_value(json).unwrap();
        assert_eq!(back, p);
        let del = StoredAnswer::Deleted {
            subject: "s".into(),
            existed: true,
        };
        assert_eq!(PackedAnswer::pack(&del).unpack(), del);
        assert!(PackedAnswer::from_bytes(vec![9, 9, 9]).is_err());
        let mut b = p.as_bytes().to_vec();
        b.push(0);
        assert!(PackedAnswer::from_bytes(b).is_err(), "trailing bytes are refused");
    }
}
