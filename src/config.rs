//! `quotad.toml`: the settings structs with their defaults and bounds, parsing,
//! and `sanitize()`, which rejects contradictions with the file, key and problem.
//! Limits and plans are compiled into an engine [`Policy`](crate::engine::Policy)
//! by the engine; this module only checks the settings that are not limits.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::period::Period;

/// Largest amount or `max` the API accepts: 2^53 - 1, exact in a JSON double.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listeners and HTTP limits.
    pub server: ServerConfig,
    /// Where and how state is persisted.
    pub storage: StorageConfig,
    /// Reservation and idempotency settings, sharding.
    pub engine: EngineConfig,
    /// Bearer tokens; empty means no authentication.
    pub auth: AuthConfig,
    /// Log format and level.
    pub log: LogConfig,
    /// Metrics that no limit uses but requests may carry (others are `unknown_metric`).
    pub metrics: Vec<String>,
    /// Limits that apply to every subject, whatever its plan.
    pub limits: Vec<LimitConfig>,
    /// Plans that subjects are assigned to.
    pub plans: Vec<PlanConfig>,
    /// The price table that turns metered amounts into a cost; none by default.
    pub pricing: Option<PricingConfig>,
    /// How long events are kept.
    pub events: EventsConfig,
    /// Per-subject usage history.
    pub history: HistoryConfig,
    /// Receivers of events, each POSTed every event it subscribes to.
    pub webhooks: Vec<WebhookConfig>,
    /// Circuit breakers on a metric's recent rate.
    pub breakers: Vec<BreakerConfig>,
    /// Per-subject usage spikes against the subject's own past.
    pub anomalies: Vec<AnomalyConfig>,
}

/// `[history]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Record every charge into per-subject hourly and daily buckets. Default true.
    pub enabled: bool,
    /// Hourly buckets are kept this long. Default "14d", 1d..=400d.
    pub hourly_retention: String,
    /// Daily buckets are kept this long. Default "400d", 1d..=3650d.
    pub daily_retention: String,
    /// CSV exports (`GET /v1/usage?format=csv`) streaming at once; more are
    /// 503 `busy`. Default 2, 1..=64.
    pub max_exports: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            hourly_retention: "14d".into(),
            daily_retention: "400d".into(),
            max_exports: 2,
        }
    }
}

impl HistoryConfig {
    /// (hourly, daily) retention in ms, checked.
    pub fn retention_ms(&self) -> Result<(u64, u64), ConfigError> {
        const DAY: u64 = 86_400_000;
        if !(1..=64).contains(&self.max_exports) {
            return Err(ConfigError::new("history.max_exports", "must be between 1 and 64"));
        }
        Ok((
            duration_ms("history.hourly_retention", &self.hourly_retention, DAY, 400 * DAY)?,
            duration_ms("history.daily_retention", &self.daily_retention, DAY, 3650 * DAY)?,
        ))
    }
}

/// `[events]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Events are kept at least this long (and until every webhook delivered them). Default "7d", 1m..=400d.
    pub retention: String,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self { retention: "7d".into() }
    }
}

impl EventsConfig {
    /// The retention in ms, checked.
    pub fn retention_ms(&self) -> Result<u64, ConfigError> {
        duration_ms("events.retention", &self.retention, 60_000, 400 * 86_400_000)
    }
}

/// One `[[webhooks]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Name in `GET /v1/webhooks` and metrics.
    pub name: String,
    /// `http://` or `https://` address POSTed to.
    pub url: String,
    /// File holding the signing secret (trailing whitespace ignored).
    pub secret_file: PathBuf,
    /// Event types or globs (`breaker.*`) it receives; all when absent.
    #[serde(default)]
    pub events: Option<Vec<String>>,
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

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Addresses to listen on: `host:port` or `unix:/path/to.sock`. Default `["127.0.0.1:7878"]`.
    pub listen: Vec<String>,
    /// Largest request body accepted, in bytes; larger is 413. Default 65536, 1024..=16 MiB.
    pub max_body_bytes: usize,
    /// Largest `/v1/batch` body, in bytes. Default 1 MiB, 1024..=64 MiB.
    pub max_batch_bytes: usize,
    /// Open connections at most. At the cap a new connection closes the one
    /// idle longest with no request in flight; when every connection has one
    /// in flight, the new one is closed. Default 10000, 1..=1_000_000.
    pub max_connections: usize,
    /// A connection must send a whole request head within this many ms of
    /// opening or of its previous answer, else it is closed. Default 5000, 100..=600000.
    pub header_timeout_ms: u64,
    /// How long graceful shutdown waits for open requests, in ms. Default 10000.
    pub shutdown_grace_ms: u64,
    /// A request body must arrive whole within this many ms of its headers,
    /// else 408 and the connection is closed. Default 10000, 100..=600000.
    pub body_timeout_ms: u64,
    /// Permissions of Unix socket files, octal. Default "0660": owner and group.
    pub socket_mode: String,
    /// Group (name or numeric id) given to Unix socket files, so that only the
    /// app's user (a member) can connect. Default: the daemon's own group.
    pub socket_group: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: vec!["127.0.0.1:7878".to_string()],
            max_body_bytes: 64 * 1024,
            max_batch_bytes: 1024 * 1024,
            max_connections: 10_000,
            header_timeout_ms: 5_000,
            shutdown_grace_ms: 10_000,
            body_timeout_ms: 10_000,
            socket_mode: "0660".into(),
            socket_group: None,
        }
    }
}

/// `[storage]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory of the WAL and snapshot. Default `./data`.
    pub data_dir: PathBuf,
    /// `fsync` (default): answer after the write is synced. `batch`: answer first, sync every `flush_interval_ms`.
    pub durability: Durability,
    /// Sync interval for `durability = "batch"`, in ms. Default 10, 1..=10000.
    pub flush_interval_ms: u64,
    /// A new WAL segment is started beyond this size. Default 64 MiB, 1 MiB..=1 GiB.
    pub segment_bytes_max: u64,
    /// Take a snapshot after this many WAL records. Default 1_000_000, at least 1000.
    pub snapshot_every_records: u64,
    /// Take a snapshot after this many WAL bytes. Default 256 MiB, at least 1 MiB.
    pub snapshot_every_bytes: u64,
    /// Writes wait (backpressure) while this many bytes wait for the WAL writer.
    /// Default 16 MiB, 64 KiB..=1 GiB.
    pub queue_bytes_max: usize,
    /// WAL segments a snapshot covers are kept this long before they are
    /// deleted, so `quotad wal dump` shows every change over that span.
    /// Default "0s" (deleted at once), at most "3650d".
    pub wal_retention: String,
}

impl StorageConfig {
    /// `wal_retention` in ms, checked.
    pub fn wal_retention_ms(&self) -> Result<u64, ConfigError> {
        if matches!(self.wal_retention.trim(), "0" | "0s" | "0ms" | "0m" | "0h" | "0d") {
            return Ok(0);
        }
        duration_ms("storage.wal_retention", &self.wal_retention, 1_000, 3650 * 86_400_000)
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            durability: Durability::Fsync,
            flush_interval_ms: 10,
            segment_bytes_max: 64 << 20,
            snapshot_every_records: 1_000_000,
            snapshot_every_bytes: 256 << 20,
            queue_bytes_max: 16 << 20,
            wal_retention: "0s".into(),
        }
    }
}

/// When a write is acknowledged relative to its fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Acknowledge after fdatasync.
    Fsync,
    /// Acknowledge before the periodic sync.
    Batch,
}

/// `[engine]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// How long idempotency keys and finished reservations are kept. Default "24h", 1s..=30d.
    pub idempotency_retention: String,
    /// Reservation TTL when a request gives none. Default "60s".
    pub reservation_ttl_default: String,
    /// Longest reservation TTL a request may ask for. Default "1h", at most 7d.
    pub reservation_ttl_max: String,
    /// Number of state shards (lock stripes). Default 64, 1..=4096.
    pub shards: usize,
    /// Open reservations at most, across all subjects; beyond it reserve is 503. Default 1_000_000.
    pub max_open_reservations: usize,
    /// Open reservations one subject may hold; beyond it a reserve is denied
    /// with `too_many_reservations`. Default 10_000, 1..=1_000_000.
    pub max_reservations_per_subject: usize,
    /// Idempotency keys kept at most; when full, a write with a new key is 503
    /// (keys past retention are dropped first). Default 10_000_000, 1..=1_000_000_000.
    pub max_idempotency_keys: usize,
    /// Longest `wait_ms` a consume or reserve may ask for. Default 30000, at most 600000.
    pub max_wait_ms: u64,
    /// Calls waiting for capacity at most, across all subjects; beyond it a
    /// call that would wait is denied with `queue_full`. Default 10000, 1..=1_000_000.
    pub max_waiters: usize,
    /// Calls one subject may have waiting at once. Default 100, at least 1.
    pub max_waiters_per_subject: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            idempotency_retention: "24h".into(),
            reservation_ttl_default: "60s".into(),
            reservation_ttl_max: "1h".into(),
            shards: 64,
            max_open_reservations: 1_000_000,
            max_reservations_per_subject: 10_000,
            max_idempotency_keys: 10_000_000,
            max_wait_ms: 30_000,
            max_waiters: 10_000,
            max_waiters_per_subject: 100,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `auto` (default: human on a terminal, JSON lines otherwise), `human` or `json`.
    pub format: LogFormat,
    /// Level filter, as `QUOTAD_LOG` would take it ("info", "quotad=debug", …). Default "info".
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Auto,
            level: "info".into(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human on a terminal, JSON otherwise.
    #[default]
    Auto,
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// `[auth]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Accepted bearer tokens and their roles.
    pub tokens: Vec<TokenConfig>,
}

/// One accepted bearer token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// What the token may do.
    pub role: Role,
    /// The token itself (prefer `token_file` outside tests).
    pub token: Option<String>,
    /// A file whose trimmed content is the token.
    pub token_file: Option<PathBuf>,
    /// The highest `priority` a call made with this token may ask for (a
    /// higher one is 403). Default "high" for client tokens, "critical" for
    /// admin tokens: passing an open breaker is the operator's call.
    pub max_priority: Option<Priority>,
}

impl TokenConfig {
    /// `max_priority`, or the role's default.
    pub fn max_priority(&self) -> Priority {
        self.max_priority.unwrap_or(match self.role {
            Role::Client => Priority::High,
            Role::Admin => Priority::Critical,
        })
    }
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Decisions, reservations and reading a subject.
    Client,
    /// Everything.
    Admin,
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

/// One `[[plans]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// Plan name used in `PUT /v1/subjects/{s}`.
    pub name: String,
    /// Whether unassigned subjects get this plan (at most one plan).
    #[serde(default)]
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

/// A configuration problem: which file, which key, what is wrong.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    /// The file read (or "<built-in defaults>").
    pub file: String,
    /// Dotted path of the offending key, e.g. `plans[0].limits[1].period`.
    pub key: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl ConfigError {
    /// Builds an error for `key` (the file is filled in by the loader).
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: String::new(),
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Durations of `[engine]` resolved to milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineSettings {
    /// Idempotency key and finished-reservation retention.
    pub idempotency_retention_ms: u64,
    /// Default reservation TTL.
    pub reservation_ttl_default_ms: u64,
    /// Largest reservation TTL accepted.
    pub reservation_ttl_max_ms: u64,
    /// Shard count.
    pub shards: usize,
    /// Cap on open reservations.
    pub max_open_reservations: usize,
    /// Cap on one subject's open reservations.
    pub max_reservations_per_subject: usize,
    /// Cap on retained idempotency keys.
    pub max_idempotency_keys: usize,
    /// Longest wait a call may ask for.
    pub max_wait_ms: u64,
    /// Cap on waiting calls.
    pub max_waiters: usize,
    /// Cap on waiting calls per subject.
    pub max_waiters_per_subject: usize,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineConfig::default().settings().expect("defaults are valid")
    }
}

/// A bound as the config would write it: "1d", "10m", "500ms".
fn short_duration(ms: u64) -> String {
    for (unit, len) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms >= len && ms.is_multiple_of(len) {
            return format!("{}{unit}", ms / len);
        }
    }
    format!("{ms}ms")
}

fn duration_ms(key: &str, value: &str, min_ms: u64, max_ms: u64) -> Result<u64, ConfigError> {
    let p = Period::parse_duration(value).map_err(|e| ConfigError::new(key, e.to_string()))?;
    let ms = p
        .fixed_ms()
        .ok_or_else(|| ConfigError::new(key, "months have no fixed length; use days (\"30d\")"))?;
    if !(min_ms..=max_ms).contains(&ms) {
        return Err(ConfigError::new(
            key,
            format!(
                "{value:?} is out of range: must be between {} and {}",
                short_duration(min_ms),
                short_duration(max_ms)
            ),
        ));
    }
    Ok(ms)
}

impl EngineConfig {
    /// Checks bounds and resolves durations.
    pub fn settings(&self) -> Result<EngineSettings, ConfigError> {
        const DAY: u64 = 86_400_000;
        let s = EngineSettings {
            idempotency_retention_ms: duration_ms(
                "engine.idempotency_retention",
                &self.idempotency_retention,
                1_000,
                30 * DAY,
            )?,
            reservation_ttl_default_ms: duration_ms(
                "engine.reservation_ttl_default",
                &self.reservation_ttl_default,
                1,
                7 * DAY,
            )?,
            reservation_ttl_max_ms: duration_ms("engine.reservation_ttl_max", &self.reservation_ttl_max, 1, 7 * DAY)?,
            shards: self.shards,
            max_open_reservations: self.max_open_reservations,
            max_reservations_per_subject: self.max_reservations_per_subject,
            max_idempotency_keys: self.max_idempotency_keys,
            max_wait_ms: self.max_wait_ms,
            max_waiters: self.max_waiters,
            max_waiters_per_subject: self.max_waiters_per_subject,
        };
        if s.reservation_ttl_default_ms > s.reservation_ttl_max_ms {
            return Err(ConfigError::new(
                "engine.reservation_ttl_default",
                "is longer than engine.reservation_ttl_max",
            ));
        }
        if !(1..=4096).contains(&s.shards) {
            return Err(ConfigError::new("engine.shards", "must be between 1 and 4096"));
        }
        if s.max_open_reservations == 0 {
            return Err(ConfigError::new("engine.max_open_reservations", "must be at least 1"));
        }
        if !(1..=1_000_000).contains(&s.max_reservations_per_subject) {
            return Err(ConfigError::new(
                "engine.max_reservations_per_subject",
                "must be between 1 and 1000000",
            ));
        }
        if !(1..=1_000_000_000).contains(&s.max_idempotency_keys) {
            return Err(ConfigError::new(
                "engine.max_idempotency_keys",
                "must be between 1 and 1000000000",
            ));
        }
        if s.max_wait_ms > 600_000 {
            return Err(ConfigError::new(
                "engine.max_wait_ms",
                format!("{} is out of range: must be at most 600000 (10 minutes)", s.max_wait_ms),
            ));
        }
        if !(1..=1_000_000).contains(&s.max_waiters) {
            return Err(ConfigError::new("engine.max_waiters", "must be between 1 and 1000000"));
        }
        if s.max_waiters_per_subject == 0 {
            return Err(ConfigError::new("engine.max_waiters_per_subject", "must be at least 1"));
        }
        Ok(s)
    }
}

/// Where the daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `host:port`.
    Tcp(String),
    /// `unix:/path`.
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => f.write_str(a),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl ListenAddr {
    /// Whether only this host can reach it: a Unix socket or a loopback address.
    pub fn is_local(&self) -> bool {
        match self {
            ListenAddr::Unix(_) => true,
            ListenAddr::Tcp(a) => {
                let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
            }
        }
    }

    /// Parses one entry of `server.listen`.
    pub fn parse(s: &str) -> Result<ListenAddr, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("a unix socket address needs a path, as in \"unix:/run/quotad/quotad.sock\"".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(ListenAddr::Tcp(s.into())),
            _ => Err(format!("{s:?} is neither host:port nor unix:/path")),
        }
    }
}

/// The parser names the Rust type it wanted ("expected u64"): say it in words.
fn plain_types(msg: &str) -> String {
    let mut out = msg.to_string();
    for (rust, words) in [
        ("expected u8", "expected a whole number, 0 or more"),
        ("expected u16", "expected a whole number, 0 or more"),
        ("expected u32", "expected a whole number, 0 or more"),
        ("expected u64", "expected a whole number, 0 or more"),
        ("expected usize", "expected a whole number, 0 or more"),
        ("expected i64", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
    ] {
        out = out.replace(rust, words);
    }
    out
}

impl Config {
    /// Parses TOML text; `file` names it in errors. Checks everything but the
    /// limits and plans, which [`crate::engine::Policy::compile`] checks.
    pub fn from_toml(text: &str, file: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            file: file.to_string(),
            key: "parse".into(),
            message: plain_types(e.to_string().trim_end()),
        })?;
        config.sanitize().map_err(|mut e| {
            e.file = file.to_string();
            e
        })?;
        Ok(config)
    }

    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "file".into(),
            message: format!("cannot read: {e}"),
        })?;
        Self::from_toml(&text, &file)
    }

    /// Rejects out-of-range settings and contradictions (limits are checked by the engine).
    pub fn sanitize(&self) -> Result<(), ConfigError> {
        if self.server.listen.is_empty() {
            return Err(ConfigError::new("server.listen", "needs at least one address"));
        }
        for (i, l) in self.server.listen.iter().enumerate() {
            let addr = ListenAddr::parse(l).map_err(|m| ConfigError::new(format!("server.listen[{i}]"), m))?;
            if !addr.is_local() && self.auth.tokens.is_empty() {
                return Err(ConfigError::new(
                    format!("server.listen[{i}]"),
                    format!(
                        "{l:?} is reachable from other hosts; configure auth.tokens before listening on it \
                         (or listen on 127.0.0.1 or a unix: socket)"
                    ),
                ));
            }
        }
        if u32::from_str_radix(&self.server.socket_mode, 8).map_or(true, |m| m > 0o777) {
            return Err(ConfigError::new(
                "server.socket_mode",
                "must be an octal mode such as \"0660\"",
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.server.max_body_bytes) {
            return Err(ConfigError::new(
                "server.max_body_bytes",
                "must be between 1024 and 16777216",
            ));
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.server.max_batch_bytes) {
            return Err(ConfigError::new(
                "server.max_batch_bytes",
                "must be between 1024 and 67108864",
            ));
        }
        if !(1..=1_000_000).contains(&self.server.max_connections) {
            return Err(ConfigError::new(
                "server.max_connections",
                "must be between 1 and 1000000",
            ));
        }
        if !(100..=600_000).contains(&self.server.header_timeout_ms) {
            return Err(ConfigError::new(
                "server.header_timeout_ms",
                "must be between 100 and 600000",
            ));
        }
        if !(100..=600_000).contains(&self.server.body_timeout_ms) {
            return Err(ConfigError::new(
                "server.body_timeout_ms",
                "must be between 100 and 600000",
            ));
        }
        if !(1..=10_000).contains(&self.storage.flush_interval_ms) {
            return Err(ConfigError::new(
                "storage.flush_interval_ms",
                "must be between 1 and 10000",
            ));
        }
        if !((1 << 20)..=(1 << 30)).contains(&self.storage.segment_bytes_max) {
            return Err(ConfigError::new(
                "storage.segment_bytes_max",
                "must be between 1 MiB and 1 GiB",
            ));
        }
        if self.storage.snapshot_every_records < 1000 {
            return Err(ConfigError::new(
                "storage.snapshot_every_records",
                "must be at least 1000",
            ));
        }
        self.storage.wal_retention_ms()?;
        if self.storage.snapshot_every_bytes < (1 << 20) {
            return Err(ConfigError::new(
                "storage.snapshot_every_bytes",
                "must be at least 1 MiB",
            ));
        }
        if !((64 << 10)..=(1 << 30)).contains(&self.storage.queue_bytes_max) {
            return Err(ConfigError::new(
                "storage.queue_bytes_max",
                "must be between 64 KiB and 1 GiB",
            ));
        }
        if self.storage.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::new("storage.data_dir", "must not be empty"));
        }
        self.engine.settings()?;
        for (i, t) in self.auth.tokens.iter().enumerate() {
            let key = format!("auth.tokens[{i}]");
            match (&t.token, &t.token_file) {
                (Some(_), Some(_)) => return Err(ConfigError::new(key, "give either token or token_file, not both")),
                (None, None) => return Err(ConfigError::new(key, "needs token or token_file")),
                (Some(tok), None) if tok.len() < 16 => {
                    return Err(ConfigError::new(key + ".token", "must be at least 16 characters"))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The parsed listen addresses (valid after `sanitize`).
    pub fn listen_addrs(&self) -> Vec<ListenAddr> {
        self.server
            .listen
            .iter()
            .filter_map(|l| ListenAddr::parse(l).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::from_toml("", "t.toml").unwrap();
        assert_eq!(c.server.listen, vec!["127.0.0.1:7878"]);
        assert_eq!(c.engine.settings().unwrap().idempotency_retention_ms, 86_400_000);
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = Config::from_toml("[server]\nlisten = [\"nope\"]\n", "q.toml").unwrap_err();
        assert_eq!(e.file, "q.toml");
        assert_eq!(e.key, "server.listen[0]");
        let e = Config::from_toml("[server]\nbogus = 1\n", "q.toml").unwrap_err();
        assert!(e.to_string().contains("unknown field `bogus`"), "{e}");
        let e = Config::from_toml("[engine]\nidempotency_retention = \"1x\"\n", "q.toml").unwrap_err();
        assert_eq!(e.key, "engine.idempotency_retention");
    }

    #[test]
    fn non_loopback_listeners_need_tokens() {
        let e = Config::from_toml("[server]\nlisten = [\"0.0.0.0:7878\"]\n", "q.toml").unwrap_err();
        assert_eq!(e.key, "server.listen[0]");
        assert!(e.message.contains("auth.tokens"), "{e}");
        Config::from_toml(
            "[server]\nlisten = [\"[::1]:7878\", \"localhost:1\", \"unix:/x\"]\n",
            "q.toml",
        )
        .unwrap();
        Config::from_toml(
            "[server]\nlisten = [\"0.0.0.0:7878\"]\n[auth]\ntokens = [{ role = \"admin\", token = \"0123456789abcdef\" }]\n",
            "q.toml",
        )
        .unwrap();
        let e = Config::from_toml("[server]\nsocket_mode = \"0999\"\n", "q.toml").unwrap_err();
        assert_eq!(e.key, "server.socket_mode");
    }

    #[test]
    fn header_timeout_has_bounds() {
        assert_eq!(Config::default().server.header_timeout_ms, 5000);
        for bad in [0, 99, 600_001] {
            let e = Config::from_toml(&format!("[server]\nheader_timeout_ms = {bad}\n"), "q.toml").unwrap_err();
            assert_eq!(e.key, "server.header_timeout_ms");
            assert_eq!(e.message, "must be between 100 and 600000");
        }
        for good in [100, 600_000] {
            Config::from_toml(&format!("[server]\nheader_timeout_ms = {good}\n"), "q.toml").unwrap();
        }
    }

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
