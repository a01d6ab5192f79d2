//! The policy as written: everything that decides (`metrics`, `[pricing]`,
//! `[[limits]]`, `[[plans]]`, `[[breakers]]`, `[[anomalies]]`) in the shape and
//! names of the TOML file, which is also its JSON shape in the API and in the
//! WAL. [`PolicyDoc`] is one whole policy; [`super::Policy::compile`] checks it.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

/// Largest amount or `max` the API accepts: 2^53 - 1, exact in a JSON double.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// One whole policy, in the shape and names of the file's sections. Sections
/// left out are empty, as in the file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyDoc {
    /// Metrics that no limit uses but requests may carry.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<String>,
    /// The price table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pricing: Option<PricingConfig>,
    /// Limits every subject has, whatever its plan.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<LimitConfig>,
    /// Plans subjects are assigned to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plans: Vec<PlanConfig>,
    /// Circuit breakers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub breakers: Vec<BreakerConfig>,
    /// Anomaly rules.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub anomalies: Vec<AnomalyConfig>,
}

impl PolicyDoc {
    /// The canonical JSON form: what versions store and compare.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a policy always serializes")
    }

    /// Whether two policies say the same thing (as written, defaults filled in).
    pub fn same_as(&self, other: &PolicyDoc) -> bool {
        self.to_json() == other.to_json()
    }
}

/// One `[[breakers]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Name: the `limit` of `circuit_open` denials.
    pub name: String,
    /// Metric whose rate is watched. Default "requests".
    #[serde(default = "default_metric")]
    pub metric: String,
    /// Which calls it watches and stops; all when absent.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub match_: Option<MatchConfig>,
    /// "global" (default) or "attribute:<name>": one breaker per value.
    #[serde(default = "default_global")]
    pub scope: String,
    /// The recent rate: the total over this span.
    pub window: String,
    /// Learned normal rate: the average over this span before the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    /// A fixed normal rate per hour instead of a learned one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normal_per_hour: Option<u64>,
    /// Opens when recent > ratio x normal.
    pub ratio: f64,
    /// ...and the window holds at least this much.
    #[serde(default)]
    pub min_amount: u64,
    /// Stays open at least this long. Default "15m".
    #[serde(default = "default_cooldown")]
    pub cooldown: String,
    /// Calls of this priority and above pass while open. Default "critical".
    #[serde(default = "default_pass")]
    pub pass_priority: Priority,
}

fn default_global() -> String {
    "global".into()
}

fn default_cooldown() -> String {
    "15m".into()
}

fn default_pass() -> Priority {
    Priority::Critical
}

/// One `[[anomalies]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalyConfig {
    /// Name in flags and events.
    pub name: String,
    /// Metric compared. Default "requests".
    #[serde(default = "default_metric")]
    pub metric: String,
    /// Which calls count; all when absent.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub match_: Option<MatchConfig>,
    /// Calendar period compared, like a fixed window's. Default "1d".
    #[serde(default = "default_day")]
    pub period: String,
    /// IANA zone of the periods. Default "UTC".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// The subject's average over this many previous periods is its normal. Default 7, 1..=90.
    #[serde(default = "default_baseline_periods")]
    pub baseline_periods: u32,
    /// Flagged when this period's usage > ratio x that average.
    pub ratio: f64,
    /// ...and at least this much.
    #[serde(default)]
    pub min_amount: u64,
    /// What a flag does until cleared or the period ends.
    #[serde(default)]
    pub action: AnomalyAction,
}

fn default_day() -> String {
    "1d".into()
}

fn default_baseline_periods() -> u32 {
    7
}

/// What a raised anomaly flag does to the subject's matching calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyAction {
    /// Nothing but the event and the flag.
    #[default]
    Flag,
    /// Allowed, answered `degrade` with reason `anomaly`.
    Degrade,
    /// Denied with reason `anomaly`.
    Deny,
}

/// `[pricing]`: how metered amounts become money.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PricingConfig {
    /// ISO 4217 code shown in answers ("USD"); three capital letters.
    pub currency: String,
    /// The derived metric the cost is counted in, in millionths of the currency. Default "cost_micros".
    #[serde(default = "default_cost_metric")]
    pub metric: String,
    /// What a call that no price matches gets. Default `reject`.
    #[serde(default)]
    pub unpriced: Unpriced,
    /// Prices in file order; the first that matches a call is used.
    #[serde(default)]
    pub prices: Vec<PriceConfig>,
}

fn default_cost_metric() -> String {
    "cost_micros".into()
}

/// What happens to a call that carries priced metrics but matches no price.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unpriced {
    /// 400 `unpriced`: a call the price table forgot must not pass for free.
    #[default]
    Reject,
    /// Costs nothing.
    Zero,
}

/// One `[[pricing.prices]]` entry: a name, a matcher, and a price per metric
/// (`input_tokens = "2.50/1M"`). Not `deny_unknown_fields`: every other key is a
/// metric, checked when the policy is compiled.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PriceConfig {
    /// Shown in answers as `cost.price`.
    pub name: String,
    /// Which calls it prices; every call when absent.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub match_: Option<MatchConfig>,
    /// Metric to price text, as written.
    #[serde(flatten)]
    pub rates: BTreeMap<String, toml::Value>,
}

/// One `[[limits]]` or `[[plans.limits]]` entry, as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Counter identity with the scope value; shared by same-named limits of other plans.
    pub name: String,
    /// What is counted. Default "requests".
    #[serde(default = "default_metric")]
    pub metric: String,
    /// "subject" (default), "global" or "attribute:<name>".
    #[serde(default = "default_scope")]
    pub scope: String,
    /// Counting algorithm. Default `fixed`.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// The cap, or "unlimited".
    pub max: MaxValue,
    /// Token bucket only: tokens added per period. Default: `max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refill: Option<u64>,
    /// Window or refill period; required except for `lifetime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<String>,
    /// IANA time zone of calendar windows (fixed limits of a day or longer). Default "UTC".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Which events the limit applies to; all when absent.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub match_: Option<MatchConfig>,
    /// What happens when the limit is exceeded. Default `enforce`.
    #[serde(default)]
    pub mode: Mode,
    /// Fractions of `max` whose crossing records a `threshold.crossed` event.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<f64>,
}

fn default_metric() -> String {
    "requests".into()
}

fn default_scope() -> String {
    "subject".into()
}

/// `match = { event = "llm.*", attributes = { model = "gpt-4o" } }`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// Glob over the event name (`*` any run, `?` one character).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Attributes that must be present with a value matching the glob.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

/// Counting algorithm of a limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Calendar-aligned windows.
    #[default]
    Fixed,
    /// Rolling window of `period`.
    Sliding,
    /// Continuous refill.
    TokenBucket,
    /// Never resets.
    Lifetime,
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::Fixed => "fixed",
            Algorithm::Sliding => "sliding",
            Algorithm::TokenBucket => "token_bucket",
            Algorithm::Lifetime => "lifetime",
        })
    }
}

/// What a limit does when exceeded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Deny the call.
    #[default]
    Enforce,
    /// Allow, and report `would_deny`.
    Monitor,
    /// Allow with decision "degrade".
    Degrade,
}

impl Mode {
    /// The name used in the API and the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Monitor => "monitor",
            Mode::Degrade => "degrade",
        }
    }
}

/// One `[[plans]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// Plan name used in `PUT /v1/subjects/{s}`.
    pub name: String,
    /// Whether unassigned subjects get this plan (at most one plan).
    #[serde(default, skip_serializing_if = "is_false")]
    pub default: bool,
    /// What to do with events that match none of the plan's limits. Default `allow`.
    #[serde(default)]
    pub unmatched: Unmatched,
    /// Priority of its subjects' calls when a call names none. Default `normal`.
    #[serde(default)]
    pub priority: Priority,
    /// The plan's limits.
    #[serde(default)]
    pub limits: Vec<LimitConfig>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Who goes first: among calls waiting for the same counters, and (with
/// circuit breakers) who passes an open breaker. Ordered lowest first, so
/// `a > b` means a goes before b.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Background work that can always wait.
    Low,
    /// Ordinary calls.
    #[default]
    Normal,
    /// Paid or interactive traffic.
    High,
    /// Calls that must go through.
    Critical,
}

impl Priority {
    /// The name used in the API and the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Critical => "critical",
        }
    }
}

/// Policy for events that match no limit of the plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmatched {
    /// Allow them (top-level limits still apply).
    #[default]
    Allow,
    /// Deny them with reason `unmatched`.
    Deny,
}

/// A cap: a whole number up to 2^53-1, or "unlimited". Text formats (TOML, JSON)
/// write a number or "unlimited"; binary formats an optional number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MaxValue {
    /// At most this much.
    Finite(u64),
    /// Always allows, still counts.
    Unlimited,
}

/// Wire form of [`MaxValue`].
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum MaxRepr {
    /// A number.
    Number(u64),
    /// The word "unlimited".
    Word(String),
}

impl<'de> Deserialize<'de> for MaxRepr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaxRepr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number from 0 to 9007199254740991 or \"unlimited\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<MaxRepr, E> {
                Ok(MaxRepr::Number(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<MaxRepr, E> {
                u64::try_from(v)
                    .map(MaxRepr::Number)
                    .map_err(|_| E::custom(format!("{v} is negative")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MaxRepr, E> {
                Ok(MaxRepr::Word(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for MaxValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            MaxRepr::from(*self).serialize(s)
        } else {
            match self {
                MaxValue::Finite(n) => Some(*n),
                MaxValue::Unlimited => None,
            }
            .serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for MaxValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            MaxValue::try_from(MaxRepr::deserialize(d)?).map_err(de::Error::custom)
        } else {
            Ok(Option::<u64>::deserialize(d)?.map_or(MaxValue::Unlimited, MaxValue::Finite))
        }
    }
}

impl From<MaxValue> for MaxRepr {
    fn from(m: MaxValue) -> Self {
        match m {
            MaxValue::Finite(n) => MaxRepr::Number(n),
            MaxValue::Unlimited => MaxRepr::Word("unlimited".into()),
        }
    }
}

impl TryFrom<MaxRepr> for MaxValue {
    type Error = String;
    fn try_from(r: MaxRepr) -> Result<Self, String> {
        match r {
            MaxRepr::Number(n) if n <= MAX_SAFE_INTEGER => Ok(MaxValue::Finite(n)),
            MaxRepr::Number(n) => Err(format!("{n} is above the largest allowed value {MAX_SAFE_INTEGER}")),
            MaxRepr::Word(w) if w == "unlimited" => Ok(MaxValue::Unlimited),
            MaxRepr::Word(w) => Err(format!("{w:?} is neither a whole number nor \"unlimited\"")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_value_forms() {
        #[derive(Deserialize)]
        struct W {
            m: MaxValue,
        }
        let w: W = toml::from_str("m = 5").unwrap();
        assert_eq!(w.m, MaxValue::Finite(5));
        let w: W = toml::from_str("m = \"unlimited\"").unwrap();
        assert_eq!(w.m, MaxValue::Unlimited);
        assert!(toml::from_str::<W>("m = -1").is_err());
        assert!(toml::from_str::<W>("m = \"lots\"").is_err());
        assert!(toml::from_str::<W>("m = 9007199254740992").is_err());
    }
}
