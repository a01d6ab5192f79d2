//! Process metrics in the Prometheus/OpenMetrics text format (`GET /metrics`):
//! decisions by endpoint, outcome, plan and limit; HTTP latency by route; WAL
//! fsync latency, batch sizes and bytes; snapshot duration, size and time;
//! recovery duration and torn-tail bytes; readiness; open, evicted, refused and
//! timed-out connections; live counters, subjects, holds and idempotency keys
//! (read from the engine at scrape time); with `[gateway]` the gateway's and
//! Envoy's rate limit service's figures, and in a cluster Raft's.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::engine::{Decision, FastMap, Outcome, ReasonCode, Stats};

/// Labels of `quotad_decisions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    op: &'static str,
    outcome: &'static str,
    plan: Arc<str>,
}

/// Labels of `quotad_limit_decisions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: Arc<str>,
    plan: Arc<str>,
    outcome: &'static str,
}

/// Labels of `quotad_spend_micros_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CurrencyLabels {
    currency: Arc<str>,
}

/// Labels of the HTTP metrics.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    route: &'static str,
}

/// Labels of `quotad_http_responses_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    code: u16,
}

fn latency_buckets() -> Histogram {
    // 10 µs to ~40 s.
    Histogram::new(exponential_buckets(0.000_01, 2.0, 22))
}

/// Metrics written by the storage layer (WAL writer thread, snapshotter, recovery).
#[derive(Debug)]
pub struct StorageMetrics {
    /// Seconds per WAL write+fdatasync.
    pub fsync_seconds: Histogram,
    /// Records per group-commit batch.
    pub batch_records: Histogram,
    /// Bytes written to the WAL.
    pub wal_bytes: Counter,
    /// Records written to the WAL.
    pub wal_records: Counter,
    /// Batches the writer held to gather more records (fsync mode, under load).
    pub wal_gathers: Counter,
    /// Of those, the holds that ended because the records waited for arrived
    /// (the others ran their time out).
    pub wal_gathers_filled: Counter,
    /// Seconds the last snapshot took.
    pub snapshot_seconds: Gauge<f64, AtomicU64>,
    /// Encoded size of the last snapshot.
    pub snapshot_bytes: Gauge,
    /// Unix time of the last successful snapshot (age = now - this): the one
    /// loaded at start, else the start itself until the first is written, so
    /// that a fresh daemon does not look a lifetime overdue.
    pub snapshot_timestamp_seconds: Gauge<f64, AtomicU64>,
    /// Snapshots written.
    pub snapshots: Counter,
    /// Snapshots that failed (the WAL still holds everything; the log grows).
    pub snapshot_failures: Counter,
    /// Seconds the last recovery took.
    pub recovery_seconds: Gauge<f64, AtomicU64>,
    /// Bytes of torn WAL tail truncated at the last start.
    pub recovery_torn_tail_bytes: Gauge,
    /// Records replayed at the last start.
    pub recovery_replayed_records: Gauge,
}

impl Default for StorageMetrics {
    fn default() -> Self {
        Self {
            fsync_seconds: latency_buckets(),
            batch_records: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            wal_bytes: Counter::default(),
            wal_records: Counter::default(),
            wal_gathers: Counter::default(),
            wal_gathers_filled: Counter::default(),
            snapshot_seconds: Gauge::default(),
            snapshot_bytes: Gauge::default(),
            snapshot_timestamp_seconds: Gauge::default(),
            snapshots: Counter::default(),
            snapshot_failures: Counter::default(),
            recovery_seconds: Gauge::default(),
            recovery_torn_tail_bytes: Gauge::default(),
            recovery_replayed_records: Gauge::default(),
        }
    }
}

/// Engine gauges, set from `Engine::stats` at each scrape.
#[derive(Debug, Default)]
struct EngineGauges {
    subjects: Gauge,
    counters: Gauge,
    open_reservations: Gauge,
    reservations: Gauge,
    idempotency_keys: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BreakerLabels {
    breaker: Arc<str>,
    scope: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnomalyLabels {
    anomaly: Arc<str>,
}

/// Circuit breakers and anomaly flags now, read from the engine at scrape
/// time (no series without `[[breakers]]` or `[[anomalies]]`).
#[derive(Debug, Default)]
struct SignalGauges {
    breaker_open: Family<BreakerLabels, Gauge>,
    anomaly_flags: Family<AnomalyLabels, Gauge>,
}

/// What [`SignalGauges`] shows: each breaker scope and whether it is open;
/// each anomaly rule and how many subjects it has flagged now.
#[derive(Debug, Default)]
pub struct SignalsNow {
    /// (breaker, scope value, open).
    pub breakers: Vec<(Arc<str>, Arc<str>, bool)>,
    /// (anomaly rule, subjects flagged).
    pub flags: Vec<(Arc<str>, u64)>,
}

/// Labels of the waiting metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PriorityLabels {
    priority: &'static str,
}

/// Labels of `quotad_wait_outcomes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WaitOutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GatewayCallLabels {
    endpoint: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: &'static str,
}

/// The OpenAI gateway's and Envoy's rate limit service's figures: registered
/// only when `[gateway]` is configured.
#[derive(Debug)]
pub struct GatewayMetrics {
    calls: Family<GatewayCallLabels, Counter>,
    tokens: Family<KindLabels, Counter>,
    upstream_seconds: Family<UpstreamLabels, Histogram, fn() -> Histogram>,
    rls_descriptors: Family<CodeLabels, Counter>,
    rls_errors: Counter,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        GatewayMetrics {
            calls: Family::default(),
            tokens: Family::default(),
            upstream_seconds: Family::new_with_constructor(latency_buckets),
            rls_descriptors: Family::default(),
            rls_errors: Counter::default(),
        }
    }
}

impl GatewayMetrics {
    /// One gateway call ended.
    pub fn call(&self, endpoint: &'static str, result: &'static str) {
        self.calls.get_or_create(&GatewayCallLabels { endpoint, result }).inc();
    }

    /// Tokens charged at a commit.
    pub fn tokens(&self, input: u64, output: u64) {
        self.tokens.get_or_create(&KindLabels { kind: "input" }).inc_by(input);
        self.tokens.get_or_create(&KindLabels { kind: "output" }).inc_by(output);
    }

    /// How long an upstream took to its headers.
    pub fn upstream(&self, upstream: &Arc<str>, took: Duration) {
        self.upstream_seconds
            .get_or_create(&UpstreamLabels {
                upstream: upstream.clone(),
            })
            .observe(took.as_secs_f64());
    }

    /// A descriptor decided by the rate limit service.
    pub fn rls_descriptor(&self, over_limit: bool) {
        let code = if over_limit { "over_limit" } else { "ok" };
        self.rls_descriptors.get_or_create(&CodeLabels { code }).inc();
    }

    /// A rate limit request refused with an error.
    pub fn rls_error(&self) {
        self.rls_errors.inc();
    }
}

/// A cluster node's figures: registered only when `[cluster]` is configured,
/// and set from Raft's own metrics when `/metrics` is read.
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    role: Family<RoleLabels, Gauge>,
    term: Gauge,
    commit_lsn: Gauge,
    peer_lag: Family<PeerLabels, Gauge>,
}

/// The roles `quotad_cluster_role` reports, one series each.
const ROLES: [&str; 4] = ["leader", "follower", "learner", "candidate"];

impl ClusterMetrics {
    /// Sets the figures: this node's `role`, `term` and `commit_lsn`, and
    /// on the leader each peer's lag (entries committed here and not yet
    /// known on its disk).
    pub fn set(&self, role: &str, term: u64, commit_lsn: u64, lags: &[(u64, u64)]) {
        for r in ROLES {
            self.role
                .get_or_create(&RoleLabels { role: r })
                .set(i64::from(r == role));
        }
        self.term.set(term as i64);
        self.commit_lsn.set(commit_lsn as i64);
        self.peer_lag.clear();
        for &(peer, lag) in lags {
            self.peer_lag.get_or_create(&PeerLabels { peer }).set(lag as i64);
        }
    }
}

/// Calls that wait for capacity (`wait_ms`).
#[derive(Debug)]
pub struct WaitMetrics {
    /// Waiting calls by priority.
    depth: Family<PriorityLabels, Gauge>,
    /// How long calls waited, admitted or not.
    wait_seconds: Histogram,
    /// admitted, expired (the wait ran out), queue_full, cancelled (the
    /// client left), failed.
    outcomes: Family<WaitOutcomeLabels, Counter>,
}

impl Default for WaitMetrics {
    fn default() -> Self {
        WaitMetrics {
            depth: Family::default(),
            wait_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            outcomes: Family::default(),
        }
    }
}

impl WaitMetrics {
    /// Waiters per priority, lowest first.
    pub fn set_depth(&self, depth: [usize; 4]) {
        for (p, n) in ["low", "normal", "high", "critical"].into_iter().zip(depth) {
            self.depth
                .get_or_create(&PriorityLabels { priority: p })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// One wait ended this way.
    pub fn outcome(&self, outcome: &'static str) {
        self.outcomes.get_or_create(&WaitOutcomeLabels { outcome }).inc();
    }

    /// One wait lasted this long.
    pub fn waited(&self, d: Duration) {
        self.wait_seconds.observe(d.as_secs_f64());
    }
}

/// Connections, written by the connection registry (on accept and close, never per request).
#[derive(Debug, Default)]
pub struct ConnectionMetrics {
    /// Connections open now.
    pub open: Gauge,
    /// Idle connections closed to make room for a new one at `server.max_connections`.
    pub evicted: Counter,
    /// New connections closed at once because every open one had a request in flight.
    pub refused: Counter,
    /// Connections closed because no whole request head came within `server.header_timeout_ms`.
    pub header_timeouts: Counter,
    /// Connections the direct path for decisions handed to the general HTTP
    /// stack (their first request was for another endpoint, or not plain).
    pub handed_off: Counter,
}

/// Labels of the webhook gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabels {
    webhook: String,
}

/// Labels of `quotad_webhook_attempts_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookAttemptLabels {
    webhook: String,
    outcome: &'static str,
}

/// Webhook delivery, per webhook.
#[derive(Debug, Default)]
pub struct WebhookMetrics {
    /// Attempts by outcome: delivered, failed.
    attempts: Family<WebhookAttemptLabels, Counter>,
    /// Events recorded after the cursor.
    pending: Family<WebhookLabels, Gauge>,
    /// The cursor: every event up to it is dealt with.
    delivered_seq: Family<WebhookLabels, Gauge>,
}

impl WebhookMetrics {
    /// One attempt ended this way.
    pub fn attempt(&self, webhook: &str, outcome: &'static str) {
        let l = WebhookAttemptLabels {
            webhook: webhook.to_string(),
            outcome,
        };
        self.attempts.get_or_create(&l).inc();
    }

    /// Events still to deal with.
    pub fn set_pending(&self, webhook: &str, n: u64) {
        let l = WebhookLabels {
            webhook: webhook.to_string(),
        };
        self.pending.get_or_create(&l).set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The cursor moved.
    pub fn set_delivered(&self, webhook: &str, seq: u64) {
        let l = WebhookLabels {
            webhook: webhook.to_string(),
        };
        self.delivered_seq
            .get_or_create(&l)
            .set(i64::try_from(seq).unwrap_or(i64::MAX));
    }
}

/// The decision counters' handles (they share their value with the family's
/// series) by label set, for [`Metrics::decision`]: a family hashes its labels
/// with SipHash and takes its lock once per series, which on a plan with six
/// limits was 6 % of a decision's instructions; here one read lock covers a
/// decision and the hash is foldhash. Label sets are bounded by the policy
/// (limit × plan × outcome), as the families' are.
#[derive(Default)]
struct DecisionSeries {
    decisions: FastMap<DecisionLabels, Counter>,
    limits: FastMap<LimitLabels, Counter>,
}

/// Handles into the request families, found by a cheaper hash than the
/// families' own (SipHash under a lock per family): two series per request.
#[derive(Default)]
struct HttpSeries {
    seconds: FastMap<RouteLabels, Histogram>,
    responses: FastMap<StatusLabels, Counter>,
}

/// The handle of `labels`' series in `handles`, made in `family` and kept on
/// first use (a clone shares the family's series).
fn kept<'a, L, M, C>(handles: &'a mut FastMap<L, M>, family: &Family<L, M, C>, labels: L) -> &'a M
where
    L: Clone + std::hash::Hash + Eq,
    M: Clone,
    C: prometheus_client::metrics::family::MetricConstructor<M>,
{
    handles
        .entry(labels)
        .or_insert_with_key(|l| family.get_or_create(l).clone())
}

/// A series [`DecisionSeries`] does not hold yet.
enum NewSeries {
    Decision(DecisionLabels),
    Limit(LimitLabels),
}

/// Everything `GET /metrics` shows.
pub struct Metrics {
    /// Owns the descriptions; encoding needs exclusive access to nothing but this.
    registry: Mutex<Registry>,
    decisions: Family<DecisionLabels, Counter>,
    limit_decisions: Family<LimitLabels, Counter>,
    /// Handles into the two families above, found by a cheaper hash.
    decision_series: RwLock<DecisionSeries>,
    replays: Counter,
    spend: Family<CurrencyLabels, Counter>,
    http_seconds: Family<RouteLabels, Histogram, fn() -> Histogram>,
    http_responses: Family<StatusLabels, Counter>,
    /// Handles into the two families above.
    http_series: RwLock<HttpSeries>,
    engine: EngineGauges,
    signals: SignalGauges,
    /// 1 while the daemon serves (recovered, not shutting down). Set by the
    /// server; `/metrics` answers during recovery too, so a scrape can tell
    /// "recovering" from "down".
    pub ready: Gauge,
    /// Shared with the storage layer.
    pub storage: Arc<StorageMetrics>,
    /// Shared with the keeper of waiting calls.
    pub waiting: Arc<WaitMetrics>,
    /// Shared with webhook delivery.
    pub webhooks: Arc<WebhookMetrics>,
    /// Shared with the connection registry.
    pub connections: Arc<ConnectionMetrics>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("quotad");
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            decisions: Family::default(),
            limit_decisions: Family::default(),
            decision_series: RwLock::default(),
            http_series: RwLock::default(),
            replays: Counter::default(),
            spend: Family::default(),
            http_seconds: Family::new_with_constructor(latency_buckets),
            http_responses: Family::default(),
            engine: EngineGauges::default(),
            signals: SignalGauges::default(),
            ready: Gauge::default(),
            storage: Arc::new(StorageMetrics::default()),
            waiting: Arc::new(WaitMetrics::default()),
            webhooks: Arc::new(WebhookMetrics::default()),
            connections: Arc::new(ConnectionMetrics::default()),
        };
        r.register(
            "decisions",
            "Decisions by endpoint, outcome and plan",
            m.decisions.clone(),
        );
        r.register(
            "limit_decisions",
            "Per matched limit: allow, deny, degrade or would_deny, by plan",
            m.limit_decisions.clone(),
        );
        r.register(
            "idempotent_replays",
            "Answers replayed for a repeated idempotency key",
            m.replays.clone(),
        );
        r.register(
            "spend_micros",
            "Money charged, in millionths of the currency: allowed consumes and commits (pricing only)",
            m.spend.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "Request latency by route",
            m.http_seconds.clone(),
        );
        r.register("http_responses", "Responses by status code", m.http_responses.clone());
        r.register(
            "ready",
            "1 once recovery has finished and until shutdown begins (GET /readyz is 200)",
            m.ready.clone(),
        );
        let g = &m.engine;
        r.register(
            "subjects",
            "Subjects with a plan, overrides, counters or holds",
            g.subjects.clone(),
        );
        r.register("counters", "Live counters", g.counters.clone());
        r.register(
            "reservations_open",
            "Active reservations (holds)",
            g.open_reservations.clone(),
        );
        r.register(
            "reservations_kept",
            "Reservations kept, active or finished",
            g.reservations.clone(),
        );
        r.register("idempotency_keys", "Idempotency keys kept", g.idempotency_keys.clone());
        r.register(
            "breaker_open",
            "1 while a circuit breaker is open for a scope value, else 0",
            m.signals.breaker_open.clone(),
        );
        r.register(
            "anomaly_flags",
            "Subjects an anomaly rule has flagged now (until cleared or the period ends)",
            m.signals.anomaly_flags.clone(),
        );
        let s = &m.storage;
        r.register(
            "wal_fsync_duration_seconds",
            "WAL write + fdatasync per batch",
            s.fsync_seconds.clone(),
        );
        r.register(
            "wal_batch_records",
            "Records per group-commit batch",
            s.batch_records.clone(),
        );
        r.register("wal_bytes", "Bytes written to the WAL", s.wal_bytes.clone());
        r.register("wal_records", "Records written to the WAL", s.wal_records.clone());
        r.register(
            "wal_gathers",
            "Batches the WAL writer held under load to gather more records into one sync",
            s.wal_gathers.clone(),
        );
        r.register(
            "wal_gathers_filled",
            "Gathers that ended because the records waited for arrived, not by time",
            s.wal_gathers_filled.clone(),
        );
        r.register(
            "snapshot_duration_seconds",
            "Duration of the last snapshot",
            s.snapshot_seconds.clone(),
        );
        r.register(
            "snapshot_bytes",
            "Encoded size of the last snapshot",
            s.snapshot_bytes.clone(),
        );
        r.register(
            "snapshot_timestamp_seconds",
            "Unix time of the last successful snapshot (before the first one: the start)",
            s.snapshot_timestamp_seconds.clone(),
        );
        r.register("snapshots", "Snapshots written", s.snapshots.clone());
        r.register(
            "snapshot_failures",
            "Snapshots that failed (the WAL keeps everything and grows)",
            s.snapshot_failures.clone(),
        );
        r.register(
            "recovery_duration_seconds",
            "Duration of the last recovery",
            s.recovery_seconds.clone(),
        );
        r.register(
            "recovery_torn_tail_bytes",
            "Bytes of torn WAL tail truncated at the last start",
            s.recovery_torn_tail_bytes.clone(),
        );
        r.register(
            "recovery_replayed_records",
            "WAL records replayed at the last start",
            s.recovery_replayed_records.clone(),
        );
        let w = &m.waiting;
        w.set_depth([0; 4]);
        r.register("waiters", "Calls waiting for capacity, by priority", w.depth.clone());
        r.register(
            "wait_duration_seconds",
            "How long calls waited for capacity, admitted or not",
            w.wait_seconds.clone(),
        );
        r.register(
            "wait_outcomes",
            "How waits ended: admitted, expired, queue_full, cancelled, failed",
            w.outcomes.clone(),
        );
        let wh = &m.webhooks;
        r.register(
            "webhook_attempts",
            "Webhook delivery attempts by webhook and outcome (delivered, failed)",
            wh.attempts.clone(),
        );
        r.register(
            "webhook_pending_events",
            "Events recorded after a webhook's delivery cursor",
            wh.pending.clone(),
        );
        r.register(
            "webhook_delivered_seq",
            "A webhook's delivery cursor: every event up to this seq is dealt with",
            wh.delivered_seq.clone(),
        );
        let c = &m.connections;
        r.register("connections_open", "Connections open now", c.open.clone());
        r.register(
            "connections_evicted",
            "Idle connections closed to make room for a new one at server.max_connections",
            c.evicted.clone(),
        );
        r.register(
            "connections_refused",
            "New connections closed at server.max_connections because every open one had a request in flight",
            c.refused.clone(),
        );
        r.register(
            "connections_header_timeouts",
            "Connections closed because no whole request head came within server.header_timeout_ms",
            c.header_timeouts.clone(),
        );
        r.register(
            "connections_handed_off",
            "Connections moved from the direct path for decisions to the general HTTP stack at their first other request",
            c.handed_off.clone(),
        );
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = r;
        m
    }

    /// A commit or release answered: its money counts once (not for a
    /// repeat answered from the stored answer).
    pub fn committed(&self, answer: &crate::engine::FinishAnswer) {
        if answer.first {
            self.spent(answer.cost.as_ref());
        }
    }

    /// Money charged: an allowed consume's cost, or a commit's.
    fn spent(&self, cost: Option<&crate::engine::Cost>) {
        if let Some(c) = cost.filter(|c| c.amount_micros > 0) {
            self.spend
                .get_or_create(&CurrencyLabels {
                    currency: c.currency.clone(),
                })
                .inc_by(c.amount_micros);
        }
    }

    /// Counts one decision answer. Labels share the engine's names (`Arc`
    /// clones), so counting allocates nothing once a series exists.
    pub fn decision(&self, op: &'static str, d: &Decision) {
        let outcome = match d.decision {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::Degrade => "degrade",
        };
        if d.replayed {
            self.replays.inc();
            return;
        }
        if op == "consume" && d.allowed {
            self.spent(d.cost.as_ref());
        }
        let labels = DecisionLabels {
            op,
            outcome,
            plan: d.plan.clone(),
        };
        let limits = d.counters.iter().map(|c| {
            let reason = d
                .reasons
                .iter()
                .find(|r| r.limit.as_ref() == Some(&c.limit))
                .map(|r| r.code);
            let outcome = match reason {
                Some(ReasonCode::LimitExceeded | ReasonCode::ExceedsCapacity) => "deny",
                Some(ReasonCode::Degraded) => "degrade",
                Some(ReasonCode::WouldDeny) => "would_deny",
                _ => "allow",
            };
            LimitLabels {
                limit: c.limit.clone(),
                plan: d.plan.clone(),
                outcome,
            }
        });
        let mut missing = Vec::new();
        {
            let series = self.decision_series.read().unwrap_or_else(|e| e.into_inner());
            match series.decisions.get(&labels) {
                Some(c) => {
                    c.inc();
                }
                None => missing.push(NewSeries::Decision(labels)),
            }
            for l in limits {
                match series.limits.get(&l) {
                    Some(c) => {
                        c.inc();
                    }
                    None => missing.push(NewSeries::Limit(l)),
                }
            }
        }
        if !missing.is_empty() {
            // A series' first decision: made in its family, its handle kept.
            let mut series = self.decision_series.write().unwrap_or_else(|e| e.into_inner());
            for m in missing {
                match m {
                    NewSeries::Decision(labels) => kept(&mut series.decisions, &self.decisions, labels).inc(),
                    NewSeries::Limit(l) => kept(&mut series.limits, &self.limit_decisions, l).inc(),
                };
            }
        }
    }

    /// Records one answered request.
    pub fn http(&self, method: &'static str, route: &'static str, status: u16, elapsed: Duration) {
        let route = RouteLabels { method, route };
        let status = StatusLabels { code: status };
        {
            let series = self.http_series.read().unwrap_or_else(|e| e.into_inner());
            if let (Some(h), Some(c)) = (series.seconds.get(&route), series.responses.get(&status)) {
                h.observe(elapsed.as_secs_f64());
                c.inc();
                return;
            }
        }
        // A route's or a status's first request.
        let mut series = self.http_series.write().unwrap_or_else(|e| e.into_inner());
        kept(&mut series.seconds, &self.http_seconds, route).observe(elapsed.as_secs_f64());
        kept(&mut series.responses, &self.http_responses, status).inc();
    }

    /// Registers the cluster figures (a cluster node only, so that a single
    /// node's `/metrics` is unchanged).
    pub fn register_cluster(&self) -> Arc<ClusterMetrics> {
        let c = Arc::new(ClusterMetrics::default());
        let mut r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let sub = r.sub_registry_with_prefix("cluster");
        sub.register("role", "1 for this node's Raft role, 0 for the others", c.role.clone());
        sub.register("term", "The Raft term this node is in", c.term.clone());
        sub.register(
            "commit_lsn",
            "Log position (Raft index + 1) of the newest entry this node applied, all of it committed",
            c.commit_lsn.clone(),
        );
        sub.register(
            "peer_lag",
            "On the leader: entries applied here that a peer is not yet known to have on disk",
            c.peer_lag.clone(),
        );
        c
    }

    /// Registers the gateway's figures (only when `[gateway]` is configured).
    pub fn register_gateway(&self) -> Arc<GatewayMetrics> {
        let g = Arc::new(GatewayMetrics::default());
        let mut r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let sub = r.sub_registry_with_prefix("gateway");
        sub.register(
            "calls",
            "Gateway calls by endpoint and result: forwarded (2xx from the upstream), denied (429 from quotad), \
             upstream_error (the upstream failed or answered an error; the hold was released), unavailable \
             (quotad could not decide: no leader, storage, shutting down), refused (a bad call, a token or an \
             unknown model; nothing was held)",
            g.calls.clone(),
        );
        sub.register(
            "tokens",
            "Tokens charged from upstreams' reported usage (or counted from a stream cut short), by kind",
            g.tokens.clone(),
        );
        sub.register(
            "upstream_seconds",
            "Seconds until an upstream's answer headers arrived, by upstream",
            g.upstream_seconds.clone(),
        );
        let rls = r.sub_registry_with_prefix("rls");
        rls.register(
            "descriptors",
            "Descriptors Envoy's rate limit service decided, by code (ok, over_limit)",
            g.rls_descriptors.clone(),
        );
        rls.register(
            "errors",
            "Rate limit requests refused with a gRPC error (bad request, token, no leader)",
            g.rls_errors.clone(),
        );
        g
    }

    /// Renders everything, with the engine's gauges as of now.
    pub fn render(&self, stats: &Stats, signals: &SignalsNow) -> String {
        // Held from the refill to the encoding: two scrapes at once must not
        // clear each other's breaker and anomaly series.
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Cleared first: a breaker scope or rule that went away has no series.
        self.signals.breaker_open.clear();
        for (breaker, scope, open) in &signals.breakers {
            self.signals
                .breaker_open
                .get_or_create(&BreakerLabels {
                    breaker: breaker.clone(),
                    scope: scope.clone(),
                })
                .set(i64::from(*open));
        }
        self.signals.anomaly_flags.clear();
        for (anomaly, n) in &signals.flags {
            self.signals
                .anomaly_flags
                .get_or_create(&AnomalyLabels {
                    anomaly: anomaly.clone(),
                })
                .set(*n as i64);
        }
        let g = &self.engine;
        g.subjects.set(stats.subjects as i64);
        g.counters.set(stats.counters as i64);
        g.open_reservations.set(stats.open_reservations as i64);
        g.reservations.set(stats.reservations as i64);
        g.idempotency_keys.set(stats.idempotency_keys as i64);
        let mut out = String::with_capacity(8192);
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String cannot fail");
        out
    }
}
