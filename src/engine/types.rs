//! Commands the engine takes, answers it gives, and the [`Mutation`]s it applies.
//! A mutation is the applied effect of a command: replaying the same mutations
//! in the same order rebuilds the same state without re-deciding anything.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::clock::Millis;
use crate::engine::policy::{MaxValue, Mode, Priority};

/// Log sequence number of a journal record.
pub type Lsn = u64;

/// A decision request (`check`, `consume`, `reserve`), already validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRequest {
    /// Who is metered.
    pub subject: String,
    /// What happened, if said.
    pub event: Option<String>,
    /// Attributes limits can match on.
    pub attributes: BTreeMap<String, String>,
    /// Metric to amount; `requests` defaults to 1.
    pub amounts: BTreeMap<String, u64>,
    /// Retry key for consume and reserve.
    pub idempotency_key: Option<String>,
    /// Reservation lifetime (reserve only); `None` takes the configured default.
    pub ttl_ms: Option<u64>,
    /// Who goes first; `None` takes the plan's. Not part of the request's
    /// identity: a retry may raise it under the same idempotency key.
    #[serde(skip)]
    pub priority: Option<Priority>,
}

/// Which decision endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DecideOp {
    /// Evaluate only.
    Check,
    /// Evaluate and charge.
    Consume,
    /// Evaluate and hold.
    Reserve,
}

/// The overall outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Allowed.
    Allow,
    /// Denied by an enforced limit (or an unmatched event).
    Deny,
    /// Allowed, but a degrade-mode limit is exhausted.
    Degrade,
}

impl Outcome {
    /// Its name in answers (`X-Quotad-Decision`, the `decision` field).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::Degrade => "degrade",
        }
    }
}

/// Why a limit appears in `reasons`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasonCode {
    /// An enforced limit has no room.
    LimitExceeded,
    /// The amount is larger than the limit's maximum: it can never succeed.
    ExceedsCapacity,
    /// A monitor-mode limit would have denied.
    WouldDeny,
    /// A degrade-mode limit is exhausted.
    Degraded,
    /// The plan has `unmatched = "deny"` and no plan limit matched the event.
    Unmatched,
    /// The call asked to wait, but `engine.max_waiters` (or the per-subject
    /// cap) calls already wait.
    QueueFull,
    /// A circuit breaker is open and the call's priority is below its `pass_priority`.
    CircuitOpen,
    /// An anomaly flag with `degrade` or `deny` is raised on the subject.
    Anomaly,
    /// A reserve while the subject holds `engine.max_reservations_per_subject`
    /// open reservations.
    TooManyReservations,
}

impl ReasonCode {
    /// Its name in answers (the `code` field).
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::LimitExceeded => "limit_exceeded",
            ReasonCode::ExceedsCapacity => "exceeds_capacity",
            ReasonCode::WouldDeny => "would_deny",
            ReasonCode::Degraded => "degraded",
            ReasonCode::Unmatched => "unmatched",
            ReasonCode::QueueFull => "queue_full",
            ReasonCode::CircuitOpen => "circuit_open",
            ReasonCode::Anomaly => "anomaly",
            ReasonCode::TooManyReservations => "too_many_reservations",
        }
    }
}

/// One entry of `reasons`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    /// The limit (absent for `unmatched`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<Arc<str>>,
    /// Why.
    pub code: ReasonCode,
    /// When the call could first succeed as far as this limit goes; absent when never.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// The state of one counter as shown to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterView {
    /// Limit name.
    pub limit: Arc<str>,
    /// Metric counted.
    pub metric: Arc<str>,
    /// Scope value: the subject, "global", or "<attribute>=<value>".
    pub scope: Arc<str>,
    /// Effective cap (after overrides and credits).
    pub max: MaxValue,
    /// Usage in the current window, holds included.
    pub used: u64,
    /// `max - used`, never below 0; absent when unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    /// When usage next returns to zero, RFC 3339; absent for lifetime limits.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_rfc3339")]
    pub resets_at: Option<Millis>,
    /// The limit's mode.
    pub mode: Mode,
}

/// Serializes milliseconds as RFC 3339 text.
mod opt_rfc3339 {
    use super::Millis;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Millis>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(ms) => crate::period::with_rfc3339(*ms, |t| s.serialize_str(t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Millis>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| {
            s.parse::<jiff::Timestamp>()
                .map(|t| t.as_millisecond().max(0) as Millis)
                .map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}

/// Serializes a value as itself in text formats and as its JSON text in binary
/// ones: API answers use serde attributes (skipped fields, RFC 3339 times) that
/// a non-self-describing format like bincode cannot read back.
pub mod json_text {
    use serde::de::{DeserializeOwned, Error as _};
    use serde::ser::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            v.serialize(s)
        } else {
            s.serialize_str(&serde_json::to_string(v).map_err(S::Error::custom)?)
        }
    }

    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        if d.is_human_readable() {
            T::deserialize(d)
        } else {
            let text = String::deserialize(d)?;
            serde_json::from_str(&text).map_err(D::Error::custom)
        }
    }
}

fn no_plan() -> Arc<str> {
    "".into()
}

/// The answer to check, consume and reserve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Whether the caller may proceed.
    pub allowed: bool,
    /// allow, deny or degrade.
    pub decision: Outcome,
    /// Echo of the subject.
    pub subject: String,
    /// The plan the decision was made under.
    #[serde(default = "no_plan")]
    pub plan: Arc<str>,
    /// Every matched limit, after the charge when allowed.
    pub counters: Vec<CounterView>,
    /// Limits that denied, degraded or would have denied.
    pub reasons: Vec<Reason>,
    /// When the call could first succeed (denials only; absent when never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// True when this answer is a stored one returned for a repeated idempotency key.
    pub replayed: bool,
    /// Set by a successful reserve.
    pub reservation_id: Option<String>,
    /// When the reservation expires, RFC 3339.
    #[serde(default, with = "opt_rfc3339")]
    pub expires_at: Option<Millis>,
    /// What the call costs, when `[pricing]` is configured (for check: the estimate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
    /// How long the call waited for capacity (calls that asked to wait).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<u64>,
}

/// The cost of a call in money.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cost {
    /// Millionths of the currency, rounded up per call.
    pub amount_micros: u64,
    /// ISO 4217 code.
    pub currency: Arc<str>,
    /// The price used; absent when the app sent the cost or no price matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<Arc<str>>,
    /// True when the app sent the cost itself in `amounts`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub explicit: bool,
}

/// Where a reservation stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationStatus {
    /// Holding.
    Active,
    /// The TTL passed first; the hold was released.
    Expired,
    /// Finished with the actual amounts.
    Committed,
    /// Finished with nothing charged.
    Released,
}

/// The answer to commit and release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishAnswer {
    /// The reservation.
    pub reservation_id: String,
    /// Its subject.
    pub subject: String,
    /// committed or released.
    pub status: ReservationStatus,
    /// True when the TTL had passed before this call.
    pub expired: bool,
    /// What was held.
    pub held: BTreeMap<String, u64>,
    /// What was charged in the end (empty for release).
    pub charged: BTreeMap<String, u64>,
    /// The held limits' counters after the call.
    pub counters: Vec<CounterView>,
    /// What was charged in money, when the reservation was priced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
    /// This call finished the reservation (false for a repeat answered from
    /// the stored answer): what `/metrics` counts. Never stored or sent.
    #[serde(skip)]
    pub first: bool,
}

/// Per-subject override of a limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    /// Replaces the plan's `max` for this subject.
    pub max: MaxValue,
}

/// The answer to subject reads and writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectView {
    /// The subject.
    pub subject: String,
    /// Its plan (the default plan when unassigned).
    pub plan: String,
    /// Whether the plan was assigned explicitly.
    pub assigned: bool,
    /// Per-limit overrides.
    pub overrides: BTreeMap<String, Override>,
    /// A counter for every limit of the plan and the top-level limits.
    pub counters: Vec<CounterView>,
    /// Anomaly flags raised on it now.
    pub flags: Vec<SubjectFlag>,
    /// With `[pricing]`: the metric money is counted in (millionths of
    /// `currency`), so that a reader without access to the plans (a subject
    /// token) can show its money counters as money.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_metric: Option<Arc<str>>,
    /// With `[pricing]`: its currency code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<Arc<str>>,
}

/// An anomaly flag as a subject's answer lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectFlag {
    /// The rule.
    pub anomaly: Arc<str>,
    /// When it was raised (RFC 3339).
    pub since: String,
    /// Usage in the period when raised.
    pub used: u64,
    /// The subject's average over its baseline periods.
    pub baseline: u64,
    /// What it does: flag, degrade or deny.
    pub action: crate::engine::policy::AnomalyAction,
    /// When it lapses: the end of the period (RFC 3339).
    pub until: String,
}

/// A stored answer, replayed for a repeated idempotency key (kept packed:
/// see [`super::packed`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredAnswer {
    /// consume / reserve.
    Decision(Decision),
    /// An admin write (PUT, reset, credit, DELETE of a subject). Their replays
    /// answer the subject as it is now; a DELETE's answers whether it existed.
    Deleted {
        /// The subject written.
        subject: String,
        /// DELETE: whether the subject was known.
        #[serde(default)]
        existed: bool,
    },
    /// A policy write: the version it answered, and what it did.
    Policy {
        /// That version.
        version: u64,
        /// The version before it (equal when nothing changed).
        previous_version: u64,
        /// Counters it dropped: limit name and why.
        dropped: Vec<(String, String)>,
    },
}

/// Identity of a counter: (limit name, scope value).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CounterKey {
    /// Limit name.
    #[serde(deserialize_with = "super::state::deserialize_interned")]
    pub limit: Arc<str>,
    /// Scope value.
    pub scope: ScopeKey,
}

/// Scope value of a counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ScopeKey {
    /// One counter per subject.
    Subject(Arc<str>),
    /// One counter for everybody.
    Global,
    /// One counter per value of an attribute.
    Attribute {
        /// Attribute name.
        name: Arc<str>,
        /// Its value.
        value: Arc<str>,
    },
}

impl ScopeKey {
    /// Text form used in responses.
    pub fn display(&self) -> Arc<str> {
        // Shared, not copied: a decision shows the scope of every counter it touched.
        static GLOBAL: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
        match self {
            ScopeKey::Subject(s) => s.clone(),
            ScopeKey::Global => GLOBAL.get_or_init(|| Arc::from("global")).clone(),
            ScopeKey::Attribute { name, value } => format!("{name}={value}").into(),
        }
    }
}

/// Where a charge lands; carries what is needed to apply it without the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Slot {
    /// A calendar window `[start_ms, end_ms)`.
    Fixed {
        /// Window start.
        start_ms: Millis,
        /// Window end.
        end_ms: Millis,
    },
    /// A sub-window of a sliding window.
    Sliding {
        /// Index of the sub-window: `time / bucket_ms`.
        bucket: u64,
        /// Sub-window width.
        bucket_ms: u64,
        /// Window length.
        period_ms: u64,
    },
    /// A token bucket.
    Bucket {
        /// Refill period.
        period_ms: u64,
        /// Tokens refilled per period.
        refill: u64,
    },
    /// A never-resetting counter.
    Lifetime,
    /// A calendar period of an anomaly rule's per-subject history.
    Periods {
        /// Period start.
        start_ms: Millis,
        /// Period end.
        end_ms: Millis,
        /// Periods kept: the baseline's and the current one.
        keep: u32,
    },
}

/// One held amount of a reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The counter held in.
    pub counter: CounterKey,
    /// Metric of the limit.
    pub metric: Arc<str>,
    /// The window it was held in.
    pub slot: Slot,
    /// Amount held.
    pub amount: u64,
}

/// A reservation and its lifecycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// Opaque id given to the client.
    pub id: String,
    /// Its subject.
    pub subject: Arc<str>,
    /// The amounts requested (with `requests` defaulted).
    pub amounts: BTreeMap<String, u64>,
    /// What was held, one per matched limit.
    pub holds: Vec<Hold>,
    /// When it was made.
    pub created_ms: Millis,
    /// When it expires if not finished.
    pub expires_ms: Millis,
    /// Where it stands.
    pub status: ReservationStatus,
    /// When it was finished or expired; drives garbage collection.
    pub finished_ms: Option<Millis>,
    /// The answer to a finished commit/release, repeated on a repeat call.
    #[serde(with = "json_text")]
    pub answer: Option<FinishAnswer>,
    /// The price in force when it was made: its commit is priced with it,
    /// whatever a reload did since. `None` when unpriced or the app sent the cost.
    pub price: Option<Arc<super::pricing::PriceRates>>,
}

/// A stored idempotency entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyEntry {
    /// Hash of the canonical request: a different body under the same key is a conflict.
    pub fingerprint: u64,
    /// The original answer.
    pub answer: super::packed::PackedAnswer,
    /// Kept until then.
    pub expires_ms: Millis,
}

/// A change to the state. Applying a list of these is the only way state changes,
/// live or during replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mutation {
    /// Add (or with a negative delta, refund) usage in a slot.
    Charge {
        /// The counter.
        counter: CounterKey,
        /// The window or bucket.
        slot: Slot,
        /// Amount; negative refunds, never below zero.
        delta: i64,
        /// Engine time of the change.
        at_ms: Millis,
    },
    /// Zero a counter.
    ResetCounter {
        /// The counter.
        counter: CounterKey,
    },
    /// Give back usage (windows) or raise the cap (lifetime).
    Credit {
        /// The counter.
        counter: CounterKey,
        /// The window or bucket, to create the counter if absent.
        slot: Slot,
        /// How much.
        amount: u64,
        /// Engine time of the change.
        at_ms: Millis,
    },
    /// Assign a plan and overrides.
    SetSubject {
        /// The subject.
        subject: Arc<str>,
        /// Plan name; `None` keeps the subject on the default plan.
        plan: Option<String>,
        /// Overrides in force.
        overrides: BTreeMap<String, Override>,
    },
    /// Forget a subject and its counters.
    DeleteSubject {
        /// The subject.
        subject: Arc<str>,
    },
    /// Store a new or changed reservation.
    PutReservation(Box<Reservation>),
    /// Forget a reservation.
    DropReservation {
        /// Its id.
        id: String,
        /// Its subject when it was active (its id leaves the subject's holds), so
        /// each shard's part of the mutation stands on its own during replay.
        active_subject: Option<Arc<str>>,
    },
    /// Store an answer under an idempotency key.
    PutIdempotency {
        /// The key.
        key: String,
        /// What is stored.
        entry: Box<IdempotencyEntry>,
    },
    /// Forget an idempotency key.
    DropIdempotency {
        /// The key.
        key: String,
    },
    /// An event, threshold mark, breaker or flag change (format version 3).
    Signal(Box<super::signals::SignalChange>),
    /// What one charge added to a subject's usage history: a consume's
    /// amounts, or a commit's actual ones, at the time the call was decided
    /// (a reservation: when it was made).
    Usage {
        /// The subject.
        subject: Arc<str>,
        /// Decision time.
        at_ms: Millis,
        /// Metric → amount (zeros left out).
        amounts: Vec<(Arc<str>, u64)>,
    },
    /// A new version of the policy, and the counters it drops (format version 5).
    SetPolicy(Box<super::policy::PolicyChange>),
}

/// Errors the engine answers with (mapped to HTTP by the api layer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The subject has no plan and there is no default plan.
    #[error("subject {0:?} has no plan and no plan is marked default")]
    UnknownSubject(String),
    /// No plan by that name.
    #[error("no plan named {0:?}")]
    UnknownPlan(String),
    /// No limit by that name.
    #[error("no limit named {0:?}")]
    UnknownLimit(String),
    /// No reservation with that id.
    #[error("no reservation with id {0:?}")]
    UnknownReservation(String),
    /// The reservation was already finished differently.
    #[error("{0}")]
    ReservationFinished(String),
    /// Same key, different request.
    #[error("idempotency key {0:?} was already used with a different request")]
    IdempotencyConflict(String),
    /// A metric no limit uses and the config does not declare.
    #[error("metric {0:?} is not used by any limit nor declared in `metrics`; the metrics are {1}")]
    UnknownMetric(String, String),
    /// No price matches a call that carries priced metrics (`unpriced = "reject"`).
    #[error("{0}")]
    Unpriced(String),
    /// A request that is well-formed but not acceptable (names the field).
    #[error("{0}")]
    InvalidRequest(String),
    /// The journal failed or the engine is shutting down: nothing was applied.
    #[error("{0}")]
    Unavailable(String),
    /// A call with the same idempotency key is waiting for capacity.
    #[error("{0}")]
    RequestInProgress(String),
    /// `If-Match` named another version than the one in force.
    #[error("the policy is at version {current}, not {given}; read it again and apply your change to that version")]
    VersionMismatch {
        /// The version in force.
        current: u64,
        /// The version the request was made against.
        given: u64,
    },
    /// A plan that subjects are assigned to (or the default plan) cannot go.
    #[error("{0}")]
    PlanInUse(String),
    /// No breaker by that name (the second field lists them).
    #[error("no breaker named {0:?}; {1}")]
    UnknownBreaker(String, String),
    /// No anomaly rule by that name (the second field lists them).
    #[error("no anomaly rule named {0:?}; {1}")]
    UnknownAnomaly(String, String),
}

/// An answer and the journal position that must be durable before it is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied<T> {
    /// The answer.
    pub value: T,
    /// Wait until this LSN is durable before answering (None: nothing to wait for).
    pub lsn: Option<Lsn>,
}
