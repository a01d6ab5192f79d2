//! Signals: what the engine records besides answers. Events (threshold
//! crossings, breaker transitions, anomaly flags, expired holds), the marks
//! that make a threshold fire once per window, circuit-breaker state and
//! anomaly flags. Pure data and rules: the engine decides under its shard
//! locks, and every change here travels in the same WAL record as the change
//! that caused it ([`SignalChange`] inside `Mutation::Signal`), so replay
//! rebuilds it exactly and `seq` has no gaps.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

use super::counter::{evaluate, Counter};
use super::policy::{Kind, Matcher, Scope, WindowCache};
use super::types::{CounterKey, Lsn, Mutation, ScopeKey};
use crate::clock::Millis;
use crate::engine::policy::{AnomalyAction, MaxValue, Priority};
use crate::period::{rfc3339, Period};

/// Internal counters (breaker rates, anomaly history) are named with this
/// prefix, which no configured limit name can contain, and are never listed.
pub const HIDDEN_PREFIX: char = '\u{1}';

/// Whether a counter belongs to a breaker or anomaly rule, not a limit.
pub fn is_hidden(limit: &str) -> bool {
    limit.starts_with(HIDDEN_PREFIX)
}

/// One recorded event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the event log: 1, 2, 3… with no gaps, across restarts.
    pub seq: u64,
    /// Engine time of the change that caused it.
    pub at_ms: Millis,
    /// What happened.
    pub body: EventBody,
}

/// What an event says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventBody {
    /// A charge moved a counter's usage to or past a threshold.
    ThresholdCrossed {
        /// The subject whose call crossed it.
        subject: Arc<str>,
        /// The limit.
        limit: Arc<str>,
        /// Its metric.
        metric: Arc<str>,
        /// The counter's scope value.
        scope: Arc<str>,
        /// The threshold, in millionths of `max`.
        threshold_ppm: u32,
        /// Usage after the charge.
        used: u64,
        /// The cap in force.
        max: u64,
        /// When the window ends (none for lifetime counters).
        resets_at: Option<Millis>,
    },
    /// A breaker opened.
    BreakerOpened {
        /// The breaker.
        breaker: Arc<str>,
        /// Its scope value ("global" or "name=value").
        scope: Arc<str>,
        /// Total over the window.
        recent: u64,
        /// Normal total over a window.
        normal: u64,
        /// Why.
        reason: BreakerReason,
    },
    /// A breaker closed.
    BreakerClosed {
        /// The breaker.
        breaker: Arc<str>,
        /// Its scope value.
        scope: Arc<str>,
        /// Total over the window.
        recent: u64,
        /// Normal total over a window.
        normal: u64,
        /// Why: `rate` (the cooldown passed and the surge ended) or `manual`.
        reason: BreakerReason,
    },
    /// A subject's usage in a period ran far above its own past.
    AnomalyDetected {
        /// The subject.
        subject: Arc<str>,
        /// The rule.
        anomaly: Arc<str>,
        /// Its metric.
        metric: Arc<str>,
        /// Usage this period.
        used: u64,
        /// Average over the baseline periods.
        baseline: u64,
        /// The period flagged.
        period_start_ms: Millis,
        /// Its end: the flag lapses then.
        period_end_ms: Millis,
        /// What the flag does.
        action: AnomalyAction,
    },
    /// A reservation's TTL passed: its hold went back.
    ReservationExpired {
        /// The subject.
        subject: Arc<str>,
        /// The reservation.
        reservation_id: String,
        /// What it held, by metric.
        held: BTreeMap<String, u64>,
    },
    /// A new version of the policy is in force.
    PolicyChanged {
        /// The new version.
        version: u64,
        /// The one it replaced (0: none).
        previous_version: u64,
        /// Who changed it: a token's name, or `file`.
        actor: Arc<str>,
    },
}

/// Why a breaker is open or closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BreakerReason {
    /// The recent rate against the normal one.
    Rate,
    /// An operator's open or close.
    Manual,
}

impl BreakerReason {
    /// API name.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerReason::Rate => "rate",
            BreakerReason::Manual => "manual",
        }
    }
}

/// Every event type, as the API names them.
pub const EVENT_TYPES: [&str; 6] = [
    "threshold.crossed",
    "breaker.opened",
    "breaker.closed",
    "anomaly.detected",
    "reservation.expired",
    "policy.changed",
];

/// A threshold in millionths as the decimal the config wrote.
fn ppm_decimal(ppm: u32) -> serde_json::Value {
    serde_json::Number::from_f64(f64::from(ppm) / 1e6).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

impl Event {
    /// The event type.
    pub fn kind(&self) -> &'static str {
        match self.body {
            EventBody::ThresholdCrossed { .. } => EVENT_TYPES[0],
            EventBody::BreakerOpened { .. } => EVENT_TYPES[1],
            EventBody::BreakerClosed { .. } => EVENT_TYPES[2],
            EventBody::AnomalyDetected { .. } => EVENT_TYPES[3],
            EventBody::ReservationExpired { .. } => EVENT_TYPES[4],
            EventBody::PolicyChanged { .. } => EVENT_TYPES[5],
        }
    }

    /// The event as the API, the stream and webhooks show it.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let mut v = json!({
            "id": format!("evt_{}", self.seq),
            "seq": self.seq,
            "type": self.kind(),
            "at": rfc3339(self.at_ms),
        });
        let extra = match &self.body {
            EventBody::ThresholdCrossed {
                subject,
                limit,
                metric,
                scope,
                threshold_ppm,
                used,
                max,
                resets_at,
            } => json!({
                "subject": subject, "limit": limit, "metric": metric, "scope": scope,
                "threshold": ppm_decimal(*threshold_ppm), "used": used, "max": max,
                "resets_at": resets_at.map(rfc3339),
            }),
            EventBody::BreakerOpened {
                breaker,
                scope,
                recent,
                normal,
                reason,
            }
            | EventBody::BreakerClosed {
                breaker,
                scope,
                recent,
                normal,
                reason,
            } => json!({
                "breaker": breaker, "scope": scope, "recent": recent, "normal": normal,
                "reason": reason.as_str(),
            }),
            EventBody::AnomalyDetected {
                subject,
                anomaly,
                metric,
                used,
                baseline,
                period_start_ms,
                period_end_ms,
                action,
            } => json!({
                "subject": subject, "anomaly": anomaly, "metric": metric, "used": used,
                "baseline": baseline, "period_start": rfc3339(*period_start_ms),
                "period_end": rfc3339(*period_end_ms), "action": action,
            }),
            EventBody::ReservationExpired {
                subject,
                reservation_id,
                held,
            } => json!({"subject": subject, "reservation_id": reservation_id, "held": held}),
            EventBody::PolicyChanged {
                version,
                previous_version,
                actor,
            } => json!({"version": version, "previous_version": previous_version, "actor": actor}),
        };
        if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        v
    }
}

/// A breaker that is open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenState {
    /// When it opened.
    pub at_ms: Millis,
    /// Why.
    pub reason: BreakerReason,
}

/// One breaker scope value's state.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BreakerState {
    /// When this scope value was first watched: a learned baseline needs a full span.
    pub since_ms: Millis,
    /// Set while open.
    pub open: Option<OpenState>,
    /// A manual close holds it closed until then (one cooldown), so a surge
    /// that goes on does not reopen it at once.
    pub closed_until_ms: Millis,
}

/// A raised anomaly flag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flag {
    /// When it was raised.
    pub since_ms: Millis,
    /// Usage in the period when raised.
    pub used: u64,
    /// The subject's average over its baseline periods.
    pub baseline: u64,
    /// What it does.
    pub action: AnomalyAction,
}

/// One subject's state under one anomaly rule, for the period it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlagState {
    /// The period.
    pub period_start_ms: Millis,
    /// Its end: the state lapses then.
    pub period_end_ms: Millis,
    /// The flag; `None` once cleared (not raised again this period).
    pub flag: Option<Flag>,
}

/// A change to the signals, recorded like every other change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignalChange {
    /// Append an event.
    Event(Event),
    /// A threshold of a counter fired: not again before `until_ms`.
    Mark {
        /// The counter.
        counter: CounterKey,
        /// The threshold, in millionths.
        threshold_ppm: u32,
        /// Re-armed then (window end; `u64::MAX` for lifetime counters).
        until_ms: Millis,
    },
    /// A breaker scope value is watched from now on.
    BreakerWatch {
        /// The breaker.
        breaker: Arc<str>,
        /// Its scope value.
        scope: Arc<str>,
        /// Since when.
        since_ms: Millis,
    },
    /// A breaker opened or closed.
    BreakerSet {
        /// The breaker.
        breaker: Arc<str>,
        /// Its scope value.
        scope: Arc<str>,
        /// Open, or closed.
        open: Option<OpenState>,
        /// Held closed until then.
        closed_until_ms: Millis,
    },
    /// A subject's anomaly state for a period: raised, or cleared.
    FlagSet {
        /// The subject.
        subject: Arc<str>,
        /// The rule.
        anomaly: Arc<str>,
        /// The new state.
        state: FlagState,
    },
}

/// The signals state: the event log's tail and counters, marks, breakers and
/// flags. Snapshotted whole; the events themselves move to the snapshot store
/// and only the ones not yet there stay in `recent`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Signals {
    /// Every signal change in a record at or below this LSN is applied here.
    pub applied_lsn: Lsn,
    /// The newest event's seq (0: none yet).
    pub last_seq: u64,
    /// (counter, threshold) → re-armed at.
    pub marks: BTreeMap<(CounterKey, u32), Millis>,
    /// (breaker, scope value) → state.
    pub breakers: BTreeMap<(Arc<str>, Arc<str>), BreakerState>,
    /// (subject, anomaly) → state of the current period.
    pub flags: BTreeMap<(Arc<str>, Arc<str>), FlagState>,
    /// Events not yet in the snapshot store, oldest first, with their LSN.
    #[serde(skip)]
    pub recent: VecDeque<(Lsn, Arc<Event>)>,
}

impl Signals {
    /// Applies one record's part at `lsn`: its signal changes, and what
    /// resets, credits and deletions do to marks and flags.
    pub fn apply(&mut self, lsn: Lsn, m: &Mutation) {
        match m {
            Mutation::Signal(c) => match &**c {
                SignalChange::Event(e) => {
                    debug_assert_eq!(e.seq, self.last_seq + 1, "events are numbered without gaps");
                    self.last_seq = e.seq;
                    self.recent.push_back((lsn, Arc::new(e.clone())));
                }
                SignalChange::Mark {
                    counter,
                    threshold_ppm,
                    until_ms,
                } => {
                    self.marks.insert((counter.clone(), *threshold_ppm), *until_ms);
                }
                SignalChange::BreakerWatch {
                    breaker,
                    scope,
                    since_ms,
                } => {
                    self.breakers
                        .entry((breaker.clone(), scope.clone()))
                        .or_default()
                        .since_ms = *since_ms;
                }
                SignalChange::BreakerSet {
                    breaker,
                    scope,
                    open,
                    closed_until_ms,
                } => {
                    let st = self.breakers.entry((breaker.clone(), scope.clone())).or_default();
                    st.open = open.clone();
                    st.closed_until_ms = *closed_until_ms;
                }
                SignalChange::FlagSet {
                    subject,
                    anomaly,
                    state,
                } => {
                    self.flags.insert((subject.clone(), anomaly.clone()), state.clone());
                }
            },
            // A reset or credit brings a counter back below its thresholds: they re-arm.
            Mutation::ResetCounter { counter } | Mutation::Credit { counter, .. } => self.clear_marks(counter),
            Mutation::DeleteSubject { subject } => {
                self.marks
                    .retain(|(k, _), _| !matches!(&k.scope, ScopeKey::Subject(s) if s == subject));
                self.flags.retain(|(s, _), _| s != subject);
            }
            _ => {}
        }
        self.applied_lsn = self.applied_lsn.max(lsn);
    }

    fn clear_marks(&mut self, counter: &CounterKey) {
        if self.marks.is_empty() {
            return;
        }
        let keys: Vec<_> = self
            .marks
            .range((counter.clone(), 0)..=(counter.clone(), u32::MAX))
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.marks.remove(&k);
        }
    }

    /// Whether a threshold of `counter` may fire at `now`.
    pub fn armed(&self, counter: &CounterKey, threshold_ppm: u32, now: Millis) -> bool {
        self.marks
            .get(&(counter.clone(), threshold_ppm))
            .is_none_or(|&until| until <= now)
    }

    /// The flag in force for (subject, anomaly) at `now`, if any.
    pub fn flag(&self, subject: &Arc<str>, anomaly: &Arc<str>, now: Millis) -> Option<&FlagState> {
        self.flags
            .get(&(subject.clone(), anomaly.clone()))
            .filter(|f| f.period_end_ms > now)
    }

    /// Active flags, for counting and listing.
    pub fn active_flags(&self, now: Millis) -> impl Iterator<Item = (&(Arc<str>, Arc<str>), &FlagState)> {
        self.flags
            .iter()
            .filter(move |(_, f)| f.period_end_ms > now && f.flag.is_some())
    }

    /// Drops marks and flag states that lapsed by `now`: bounded memory.
    pub fn prune(&mut self, now: Millis) {
        self.marks.retain(|_, until| *until > now);
        self.flags.retain(|_, f| f.period_end_ms > now);
    }

    /// Whether a mutation needs the signals part of a record applied.
    pub fn touches(m: &Mutation) -> bool {
        matches!(
            m,
            Mutation::Signal(_)
                | Mutation::ResetCounter { .. }
                | Mutation::Credit { .. }
                | Mutation::DeleteSubject { .. }
        )
    }
}

/// A compiled `[[breakers]]` entry.
#[derive(Debug)]
pub struct Breaker {
    /// Name.
    pub name: Arc<str>,
    /// Metric watched.
    pub metric: Arc<str>,
    /// Calls watched and stopped.
    pub matcher: Matcher,
    /// Global or per attribute value.
    pub scope: Scope,
    /// Recent span.
    pub window_ms: u64,
    /// Learned baseline span (`None`: a fixed normal rate).
    pub baseline_ms: Option<u64>,
    /// Fixed normal rate per hour.
    pub normal_per_hour: Option<u64>,
    /// Opens when recent > ratio × normal.
    pub ratio: f64,
    /// ...and recent ≥ this.
    pub min_amount: u64,
    /// Open at least this long.
    pub cooldown_ms: u64,
    /// Passes while open.
    pub pass_priority: Priority,
    /// Hidden counter of the recent span.
    pub recent_limit: Arc<str>,
    /// Hidden counter of baseline + window (learned baselines only).
    pub long_limit: Arc<str>,
    /// Sliding window over the recent span.
    pub recent_kind: Kind,
    /// Sliding window over baseline + window.
    pub long_kind: Kind,
    /// Scope values tracked at most (per-attribute breakers): beyond it new
    /// values are not watched, which bounds memory.
    pub max_scopes: usize,
    /// As written, for `GET /v1/breakers`.
    pub source: crate::engine::policy::BreakerConfig,
}

/// What a breaker reads for one scope value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    /// Total over the window.
    pub recent: u64,
    /// Normal total over a window.
    pub normal: u64,
}

impl Breaker {
    /// The hidden counters' scope for a call; `None` when the call lacks the attribute.
    pub fn scope_key(&self, attributes: &BTreeMap<String, String>) -> Option<ScopeKey> {
        match &self.scope {
            Scope::Attribute(name) => Some(ScopeKey::Attribute {
                name: name.clone(),
                value: attributes.get(&**name)?.as_str().into(),
            }),
            _ => Some(ScopeKey::Global),
        }
    }

    /// Scope value as the API writes it: "global" or "model=gpt-4o".
    pub fn scope_text(scope: &ScopeKey) -> Arc<str> {
        match scope {
            ScopeKey::Attribute { name, value } => format!("{name}={value}").into(),
            _ => "global".into(),
        }
    }

    /// The scope key named by API text, checked against this breaker.
    pub fn parse_scope(&self, text: Option<&str>) -> Result<ScopeKey, String> {
        match (&self.scope, text) {
            (Scope::Attribute(name), Some(t)) => match t.split_once('=') {
                Some((n, v)) if n == &**name && !v.is_empty() => Ok(ScopeKey::Attribute {
                    name: name.clone(),
                    value: v.into(),
                }),
                _ => Err(format!(
                    "scope: {t:?} is not a scope of breaker {:?}; write \"{name}=<value>\"",
                    self.name
                )),
            },
            (Scope::Attribute(name), None) => Err(format!(
                "scope: breaker {:?} has one state per {name}; name one, e.g. {{\"scope\":\"{name}=<value>\"}}",
                self.name
            )),
            (_, None) => Ok(ScopeKey::Global),
            (_, Some("global")) => Ok(ScopeKey::Global),
            (_, Some(t)) => Err(format!(
                "scope: breaker {:?} is global; {t:?} is not one of its scopes (leave scope out)",
                self.name
            )),
        }
    }

    /// The hidden counter keys (recent, long).
    pub fn keys(&self, scope: &ScopeKey) -> (CounterKey, CounterKey) {
        (
            CounterKey {
                limit: self.recent_limit.clone(),
                scope: scope.clone(),
            },
            CounterKey {
                limit: self.long_limit.clone(),
                scope: scope.clone(),
            },
        )
    }

    /// Recent and normal totals at `now`, given the hidden counters, plus
    /// `extra` (the call being decided) in the recent total.
    pub fn rates(&self, recent: Option<&Counter>, long: Option<&Counter>, now: Millis, extra: u64) -> Rates {
        let total = |kind: &Kind, c: Option<&Counter>| evaluate(kind, c, now, 0, MaxValue::Unlimited).0.used;
        let r = total(&self.recent_kind, recent);
        let normal = match (self.normal_per_hour, self.baseline_ms) {
            (Some(per_hour), _) => {
                (u128::from(per_hour) * u128::from(self.window_ms) / 3_600_000).min(u128::from(u64::MAX)) as u64
            }
            (None, Some(b)) => {
                let before = total(&self.long_kind, long).saturating_sub(r);
                (u128::from(before) * u128::from(self.window_ms) / u128::from(b.max(1))) as u64
            }
            (None, None) => 0,
        };
        Rates {
            recent: r.saturating_add(extra),
            normal,
        }
    }

    /// Whether the rates say open: recent above ratio × normal and at least
    /// the floor, and (learned baselines) a full baseline span watched.
    pub fn surging(&self, rates: Rates, since_ms: Millis, now: Millis) -> bool {
        let learned_ready = match self.baseline_ms {
            Some(b) if self.normal_per_hour.is_none() => now.saturating_sub(since_ms) >= b + self.window_ms,
            _ => true,
        };
        learned_ready
            && rates.recent >= self.min_amount.max(1)
            && rates.recent as f64 > self.ratio * rates.normal as f64
    }
}

/// A compiled `[[anomalies]]` entry.
#[derive(Debug)]
pub struct Anomaly {
    /// Name.
    pub name: Arc<str>,
    /// Metric compared.
    pub metric: Arc<str>,
    /// Calls counted.
    pub matcher: Matcher,
    /// Calendar period.
    pub period: Period,
    /// Its zone.
    pub tz: TimeZone,
    /// The current period, cached.
    pub window: WindowCache,
    /// Baseline periods.
    pub baseline_periods: u32,
    /// Flagged above ratio × average.
    pub ratio: f64,
    /// ...and at least this much.
    pub min_amount: u64,
    /// What a flag does.
    pub action: AnomalyAction,
    /// The hidden per-subject counter of period totals.
    pub limit: Arc<str>,
    /// As written, for listings.
    pub source: crate::engine::policy::AnomalyConfig,
}

impl Anomaly {
    /// The period containing `now`.
    pub fn current(&self, now: Millis) -> (Millis, Millis) {
        self.window.window(&self.period, &self.tz, now)
    }

    /// The subject's average over the `baseline_periods` periods before the one
    /// starting at `start`; `None` while it has less history than that.
    pub fn baseline(&self, counter: Option<&Counter>, start: Millis) -> Option<u64> {
        let Some(Counter::Periods { first_ms, buckets, .. }) = counter else {
            return None;
        };
        let mut s = start;
        let mut sum = 0u64;
        for _ in 0..self.baseline_periods {
            s = self.period.window(&self.tz, s.checked_sub(1)?).0;
            sum = sum.saturating_add(buckets.iter().find(|(b, _)| *b == s).map_or(0, |(_, u)| *u));
        }
        (*first_ms <= s).then(|| sum / u64::from(self.baseline_periods.max(1)))
    }

    /// Usage in the period starting at `start`.
    pub fn used(counter: Option<&Counter>, start: Millis) -> u64 {
        match counter {
            Some(Counter::Periods { buckets, .. }) => {
                buckets.iter().rev().find(|(b, _)| *b == start).map_or(0, |(_, u)| *u)
            }
            _ => 0,
        }
    }

    /// Whether `used` this period is a spike over `baseline`.
    pub fn spiking(&self, used: u64, baseline: u64) -> bool {
        used >= self.min_amount.max(1) && used as f64 > self.ratio * baseline as f64
    }
}
