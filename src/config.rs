//! `quotad.toml`: the daemon's settings with their defaults and bounds, parsing,
//! and `sanitize()`, which rejects contradictions with the file, key and problem.
//! The policy sections of the file (limits, plans, prices, breakers, anomaly
//! rules) are the engine's types ([`crate::engine::policy`]); this module reads
//! them as part of the file and hands them over as a [`PolicyDoc`].

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::policy::{
    AnomalyConfig, BreakerConfig, LimitConfig, PlanConfig, PolicyDoc, PricingConfig, Priority,
};
use crate::period::Period;

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
    /// Where the policy comes from: this file, or the API (stored in the data directory).
    pub policy: PolicySettings,
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
    /// One node of a Raft cluster (absent: a single node, as before).
    pub cluster: Option<ClusterConfig>,
    /// The OpenAI-compatible gateway (absent: none).
    pub gateway: Option<crate::gateway::config::GatewayConfig>,
}

/// `[cluster]`: this daemon is one node of a three- or five-node cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id among `peers`; unique, never reused.
    pub node_id: u64,
    /// Where peer traffic is taken (`host:port`).
    pub raft_listen: String,
    /// A file holding the secret every node shares; peers without it get 401.
    pub secret_file: PathBuf,
    /// The initial voters; every node lists the same.
    pub peers: Vec<PeerConfig>,
    /// Leader heartbeat interval. Default `"100ms"`.
    #[serde(default = "default_heartbeat")]
    pub heartbeat: String,
    /// A follower that hears no leader this long (up to twice it) starts an
    /// election. Default `"1s"`.
    #[serde(default = "default_election_timeout")]
    pub election_timeout: String,
}

/// One entry of `cluster.peers`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The node's id.
    pub id: u64,
    /// Its peer listener (`host:port`).
    pub raft: String,
    /// Its HTTP API (`http://host:port`), where requests are forwarded to it.
    pub api: String,
}

fn default_heartbeat() -> String {
    "100ms".into()
}

fn default_election_timeout() -> String {
    "1s".into()
}

/// `[cluster]` with durations resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterTiming {
    /// Heartbeat interval in ms.
    pub heartbeat_ms: u64,
    /// Election timeout in ms.
    pub election_timeout_ms: u64,
}

impl ClusterConfig {
    /// Checks the section against the rest of the file and resolves durations.
    pub fn check(&self, config: &Config) -> Result<ClusterTiming, ConfigError> {
        if config.storage.durability == Durability::Batch {
            return Err(ConfigError::new(
                "storage.durability",
                "\"batch\" is not allowed in a cluster: a write is acknowledged once a majority has it on disk; \
                 use \"fsync\"",
            ));
        }
        if config.policy.source == PolicySource::File {
            return Err(ConfigError::new(
                "policy.source",
                "must be \"api\" in a cluster: the policy is replicated state, changed through the API on any \
                 node (this file's policy seeds version 1 of a new cluster)",
            ));
        }
        let heartbeat_ms = duration_ms("cluster.heartbeat", &self.heartbeat, 10, 10_000)?;
        let election_timeout_ms = duration_ms("cluster.election_timeout", &self.election_timeout, 100, 60_000)?;
        if election_timeout_ms < 3 * heartbeat_ms {
            return Err(ConfigError::new(
                "cluster.election_timeout",
                format!(
                    "{:?} must be at least three heartbeats ({}), or followers start elections while the \
                     leader is fine",
                    self.election_timeout,
                    short_duration(3 * heartbeat_ms)
                ),
            ));
        }
        if self.node_id == 0 {
            return Err(ConfigError::new("cluster.node_id", "must be 1 or more"));
        }
        ListenAddr::parse(&self.raft_listen)
            .ok()
            .filter(|a| matches!(a, ListenAddr::Tcp(_)))
            .ok_or_else(|| {
                ConfigError::new(
                    "cluster.raft_listen",
                    format!("{:?} is not host:port", self.raft_listen),
                )
            })?;
        if self.secret_file.as_os_str().is_empty() {
            return Err(ConfigError::new("cluster.secret_file", "must name a file"));
        }
        if !matches!(self.peers.len(), 1 | 3 | 5 | 7) {
            return Err(ConfigError::new(
                "cluster.peers",
                format!(
                    "lists {} nodes; a cluster has 3 or 5 voters (an even number survives no more failures than one \
                     fewer, and 1 is a single node)",
                    self.peers.len()
                ),
            ));
        }
        for (i, p) in self.peers.iter().enumerate() {
            let key = format!("cluster.peers[{i}]");
            if p.id == 0 {
                return Err(ConfigError::new(key + ".id", "must be 1 or more"));
            }
            if let Some(j) = self.peers[..i].iter().position(|q| q.id == p.id) {
                return Err(ConfigError::new(
                    key + ".id",
                    format!("{} is also the id of cluster.peers[{j}]", p.id),
                ));
            }
            if !matches!(ListenAddr::parse(&p.raft), Ok(ListenAddr::Tcp(_))) {
                return Err(ConfigError::new(
                    key + ".raft",
                    format!("{:?} is not host:port", p.raft),
                ));
            }
            if !(p.api.starts_with("http://") || p.api.starts_with("https://")) {
                return Err(ConfigError::new(
                    key + ".api",
                    format!("{:?} must be a URL such as \"http://10.0.0.1:7878\"", p.api),
                ));
            }
        }
        Ok(ClusterTiming {
            heartbeat_ms,
            election_timeout_ms,
        })
    }

    /// The shared secret, read from `secret_file` (surrounding whitespace dropped).
    pub fn secret(&self) -> Result<Vec<u8>, ConfigError> {
        let text = std::fs::read_to_string(&self.secret_file).map_err(|e| {
            ConfigError::new(
                "cluster.secret_file",
                format!("cannot read {}: {e}", self.secret_file.display()),
            )
        })?;
        let secret = text.trim();
        if secret.len() < 16 {
            return Err(ConfigError::new(
                "cluster.secret_file",
                format!(
                    "{} holds {} characters; the secret needs at least 16",
                    self.secret_file.display(),
                    secret.len()
                ),
            ));
        }
        Ok(secret.as_bytes().to_vec())
    }
}

/// `[policy]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySettings {
    /// Where the policy comes from. Default `file`.
    pub source: PolicySource,
}

/// Where the policy in force comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicySource {
    /// This file is the truth: a reload writes its policy as a new version;
    /// the API's policy writes answer 409 `policy_from_file`.
    #[default]
    File,
    /// Stored in the data directory and changed through the API; the file
    /// seeds version 1 on an empty data directory and is ignored afterwards.
    Api,
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
    /// Attributes whose values usage is also kept per (`["model"]`): the
    /// usage endpoints group by them. Default none, at most 4.
    pub dimensions: Vec<String>,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            hourly_retention: "14d".into(),
            daily_retention: "400d".into(),
            max_exports: 2,
            dimensions: Vec::new(),
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
        if self.dimensions.len() > 4 {
            return Err(ConfigError::new("history.dimensions", "at most 4 attributes"));
        }
        for (i, d) in self.dimensions.iter().enumerate() {
            if d.is_empty() || d.len() > 64 || d.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(ConfigError::new(
                    "history.dimensions",
                    format!("{d:?} is not an attribute name (1 to 64 bytes, no spaces or control characters)"),
                ));
            }
            if self.dimensions[..i].contains(d) {
                return Err(ConfigError::new("history.dimensions", format!("{d:?} is listed twice")));
            }
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
    /// With `durability = "fsync"`, under load (a sync covered 8 records or
    /// more) the writer holds the next sync briefly to gather more writes
    /// into it. Default true.
    pub gather_commits: bool,
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
            gather_commits: true,
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
    /// Who holds it: recorded as the actor of the policy changes it makes.
    /// Default `auth.tokens[i]`.
    pub name: Option<String>,
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

pub(crate) fn duration_ms(key: &str, value: &str, min_ms: u64, max_ms: u64) -> Result<u64, ConfigError> {
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
pub(crate) fn plain_types(msg: &str) -> String {
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
        if let Some(c) = &self.cluster {
            c.check(self)?;
        }
        if let Some(g) = &self.gateway {
            g.check(!self.auth.tokens.is_empty())?;
        }
        self.no_address_twice()?;
        for (i, t) in self.auth.tokens.iter().enumerate() {
            let key = format!("auth.tokens[{i}]");
            if let Some(name) = &t.name {
                if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
                    return Err(ConfigError::new(
                        key + ".name",
                        "must be 1-64 characters without control characters",
                    ));
                }
                if let Some(j) = self.auth.tokens[..i].iter().position(|u| u.name.as_ref() == Some(name)) {
                    return Err(ConfigError::new(
                        key + ".name",
                        format!("{name:?} is already the name of auth.tokens[{j}]; names say who changed the policy, so each must be unique"),
                    ));
                }
            }
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

    /// The file's policy sections.
    pub fn policy_doc(&self) -> PolicyDoc {
        PolicyDoc {
            metrics: self.metrics.clone(),
            pricing: self.pricing.clone(),
            limits: self.limits.clone(),
            plans: self.plans.clone(),
            breakers: self.breakers.clone(),
            anomalies: self.anomalies.clone(),
        }
    }

    /// Refuses one address given to two listeners of this daemon, which
    /// would otherwise fail at start with a bare "address in use".
    fn no_address_twice(&self) -> Result<(), ConfigError> {
        let mut all: Vec<(String, &str)> = Vec::new();
        all.extend(
            self.server
                .listen
                .iter()
                .enumerate()
                .map(|(i, l)| (format!("server.listen[{i}]"), l.as_str())),
        );
        if let Some(g) = &self.gateway {
            all.extend(
                g.listen
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (format!("gateway.listen[{i}]"), l.as_str())),
            );
            all.extend(
                g.grpc_listen
                    .iter()
                    .map(|l| ("gateway.grpc_listen".to_string(), l.as_str())),
            );
        }
        if let Some(c) = &self.cluster {
            all.push(("cluster.raft_listen".into(), c.raft_listen.as_str()));
        }
        let parsed: Vec<(String, ListenAddr)> = all
            .into_iter()
            .filter_map(|(k, l)| ListenAddr::parse(l).ok().map(|a| (k, a)))
            // Port 0: the system picks a free port for each.
            .filter(|(_, a)| !matches!(a, ListenAddr::Tcp(t) if t.ends_with(":0")))
            .collect();
        for (i, (key, addr)) in parsed.iter().enumerate() {
            if let Some((first, _)) = parsed[..i].iter().find(|(_, a)| a == addr) {
                return Err(ConfigError::new(
                    key,
                    format!("{addr} is also {first}: each listener needs an address of its own"),
                ));
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
}
