//! The HTTP/JSON API (docs/api.md): decoding and validating requests, auth, calling
//! the engine, waiting for durability, and encoding answers with the
//! `X-RateLimit-*` headers. The only layer that knows HTTP.

pub(crate) mod authorize;
mod batch;
pub mod cluster;
pub mod direct;
mod error;
mod json;
mod openapi;
pub mod policy;
mod signals;
mod subject_tokens;
mod usage;
pub use subject_tokens::SubjectKey;
pub use usage::TopCache;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

pub use error::ApiError;

use crate::clock::Clock;
use crate::config::{Config, ConfigError, Role};
use crate::engine::policy::{MaxValue, Priority, MAX_SAFE_INTEGER};
use crate::engine::{
    Applied, CounterView, DecideOp, DecideOpts, Decision, DecisionNotes, DecisionRequest, Engine, EngineError, Finish,
    FinishAnswer, Lsn, Override, Policy, ReasonCode,
};
use crate::journal::DurableWatch;
use crate::metrics::Metrics;
use crate::waiting::{WaitEnd, Waiting};

/// Bounds on request fields, as docs/api.md states them.
pub mod bounds {
    /// Subject length in bytes.
    pub const SUBJECT_BYTES: usize = 256;
    /// Event length in bytes.
    pub const EVENT_BYTES: usize = 128;
    /// Attribute pairs per request.
    pub const ATTRIBUTES: usize = 16;
    /// Attribute key length.
    pub const ATTRIBUTE_KEY_BYTES: usize = 64;
    /// Attribute value length.
    pub const ATTRIBUTE_VALUE_BYTES: usize = 256;
    /// Metrics per request.
    pub const AMOUNTS: usize = 32;
    /// Metric name length.
    pub const METRIC_BYTES: usize = 64;
    /// Idempotency key length.
    pub const IDEMPOTENCY_KEY_BYTES: usize = 255;
    /// Subjects per list page.
    pub const LIST_LIMIT: usize = 1000;
}

/// A configured bearer token.
#[derive(Clone)]
pub struct Token {
    /// The secret.
    pub secret: Vec<u8>,
    /// What it may do.
    pub role: Role,
    /// The highest priority its calls may ask for.
    pub max_priority: Priority,
    /// Who it is in the policy's history (`name`, or `auth.tokens[i]`).
    pub name: Arc<str>,
}

/// Who policy changes are recorded as when auth is off.
pub const ACTOR_WITHOUT_AUTH: &str = "api";

/// What the request's token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Its role.
    pub role: Role,
    /// The highest `priority` it may ask for.
    pub max_priority: Priority,
    /// The token's name, recorded as the actor of policy changes; `None`
    /// without tokens (see [`Grant::actor`]).
    actor: Option<Arc<str>>,
    /// A subject token's subject: it reads that subject and nothing else.
    pub subject: Option<Arc<str>>,
}

impl Grant {
    /// Who acts, as policy changes record it.
    pub fn actor(&self) -> &str {
        self.actor.as_deref().unwrap_or(ACTOR_WITHOUT_AUTH)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// What exists once recovery has finished.
pub struct Core {
    /// The engine.
    pub engine: Arc<Engine>,
    /// Where to wait for durability.
    pub durable: DurableWatch,
    /// Calls waiting for capacity.
    pub waiting: Arc<Waiting>,
    /// Recorded events, for the event endpoints.
    pub feed: crate::events::EventFeed,
    /// Webhook delivery, for its status.
    pub webhooks: Arc<crate::webhooks::Webhooks>,
    /// Turns true when shutdown begins: ends event streams.
    pub stop: tokio::sync::watch::Receiver<bool>,
    /// The snapshot file, for usage history (none when state is kept in memory).
    pub snapshots: Option<crate::storage::snapshot::SnapshotStore>,
    /// This node's cluster, when `[cluster]` is configured.
    pub cluster: Option<Arc<cluster::ClusterApi>>,
}

/// Shared state of all handlers.
pub struct AppState {
    /// Set when recovery has finished; until then requests get 503.
    pub core: OnceLock<Core>,
    /// Time source.
    pub clock: Arc<dyn Clock>,
    /// Accepted tokens; empty disables auth. Swapped whole on reload.
    pub tokens: RwLock<Arc<Vec<Token>>>,
    /// The configuration in force, and the file it came from (reload re-reads it).
    pub config: RwLock<(Config, Option<PathBuf>)>,
    /// The configuration the process started with: settings that only a
    /// restart applies are compared against it, on every reload.
    pub started_config: Config,
    /// Request counters.
    pub metrics: Metrics,
    /// Set once recovery has finished.
    pub ready: AtomicBool,
    /// Set when shutdown starts: writes are refused with 503 from then on.
    pub shutting_down: AtomicBool,
    /// Body size limit.
    pub max_body_bytes: usize,
    /// Body size limit of `/v1/batch`.
    pub max_batch_bytes: usize,
    /// A body must arrive whole within this long.
    pub body_timeout: std::time::Duration,
    /// One permit per CSV export streaming now (`history.max_exports`).
    pub exports: Arc<tokio::sync::Semaphore>,
    /// Signs and checks subject tokens.
    pub subject_key: SubjectKey,
    /// Top lists of the snapshot file, kept until it changes.
    pub top_cache: TopCache,
}

impl AppState {
    /// What the request's bearer token allows; everything when auth is off.
    fn authenticate(&self, headers: &HeaderMap) -> Result<Grant, ApiError> {
        let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner()).clone();
        if tokens.is_empty() {
            // Every call of a daemon without tokens comes here, twice: no
            // allocation, and no reference count that both workers touch.
            return Ok(Grant {
                role: Role::Admin,
                max_priority: Priority::Critical,
                actor: None,
                subject: None,
            });
        }
        // The scheme name is case-insensitive (RFC 9110 11.1): bearer, BEARER.
        let presented = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token)
            .ok_or_else(|| ApiError::Unauthorized("send `Authorization: Bearer <token>`".into()))?;
        if presented.trim().starts_with(subject_tokens::PREFIX) {
            let subject = self
                .subject_key
                .verify(presented.trim(), self.now())
                .map_err(|m| ApiError::Unauthorized(m.into()))?;
            return Ok(Grant {
                role: Role::Client,
                max_priority: Priority::Low,
                actor: Some("subject token".into()),
                subject: Some(subject.into()),
            });
        }
        // Compare against every token so timing does not tell which one was close.
        let mut grant: Option<Grant> = None;
        for t in tokens.iter() {
            if bool::from(t.secret.as_slice().ct_eq(presented.trim().as_bytes())) {
                let g = grant.get_or_insert(Grant {
                    role: t.role,
                    max_priority: t.max_priority,
                    actor: Some(t.name.clone()),
                    subject: None,
                });
                g.role = g.role.max(t.role);
                g.max_priority = g.max_priority.max(t.max_priority);
            }
        }
        grant.ok_or_else(|| ApiError::Unauthorized("the bearer token is not valid".into()))
    }

    /// Whether `[auth]` tokens are configured (else every caller is admin).
    pub(crate) fn tokens_configured(&self) -> bool {
        !self.tokens.read().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    /// What the request's token allows, if its role is at least `need`.
    pub(crate) fn authorize(&self, headers: &HeaderMap, need: Role) -> Result<Grant, ApiError> {
        match self.authenticate(headers)? {
            Grant { subject: Some(s), .. } => Err(ApiError::Forbidden(format!(
                "this is a read-only token for subject {s:?}: it reads that subject and its usage, nothing else"
            ))),
            g if g.role >= need => Ok(g),
            _ => Err(ApiError::Forbidden(
                "this token's role is client; this endpoint needs admin".into(),
            )),
        }
    }

    /// What the request's token allows on the read endpoints of `subject`:
    /// a client or admin token, or a subject token for that subject.
    pub(crate) fn authorize_subject(&self, headers: &HeaderMap, subject: &str) -> Result<Grant, ApiError> {
        match self.authenticate(headers)? {
            Grant { subject: Some(s), .. } if &*s != subject => Err(ApiError::Forbidden(format!(
                "this is a read-only token for subject {s:?}, not {subject:?}"
            ))),
            g => Ok(g),
        }
    }

    /// Re-reads the configuration file and puts its limits, plans, engine settings
    /// and tokens in force. An invalid file changes nothing. Settings that need a
    /// restart (listeners, storage, shard count) are reported, not applied.
    ///
    /// With `policy.source = "file"` (as the file now says) the file's policy
    /// becomes a new stored version (when it changed), answered once durable;
    /// with `"api"` the stored policy stays, recompiled under the new settings.
    pub async fn reload(&self) -> Result<ReloadReport, ConfigError> {
        let (report, lsn) = self.reload_now()?;
        if let Some(lsn) = lsn {
            self.wait(lsn)
                .await
                .map_err(|e| ConfigError::new("reload", e.to_string()))?;
        }
        Ok(report)
    }

    /// The synchronous part of [`AppState::reload`]: what to wait for, if a
    /// version was written.
    fn reload_now(&self) -> Result<(ReloadReport, Option<Lsn>), ConfigError> {
        let path = self.config.read().unwrap_or_else(|e| e.into_inner()).1.clone();
        let Some(path) = path else {
            return Err(ConfigError {
                file: "<built-in defaults>".into(),
                key: "file".into(),
                message: "quotad was started without a configuration file; there is nothing to re-read".into(),
            });
        };
        let new = Config::load(&path)?;
        let file = path.display().to_string();
        let with_file = |mut e: ConfigError| {
            e.file = file.clone();
            e
        };
        // The source may change on reload: to "api", the version in force
        // becomes the API's to change; to "file", the file's policy becomes a
        // new version if it differs.
        let source = new.policy.source;
        let engine = self.engine().map_err(|e| ConfigError::new("reload", e.to_string()))?;
        let doc = match (source, engine.policy_version()) {
            (crate::config::PolicySource::Api, Some(v)) => v.policy_doc().map_err(|m| ConfigError::new("policy", m))?,
            _ => new.policy_doc(),
        };
        let policy = Policy::compile(&doc, &new).map_err(with_file)?;
        let tokens = load_tokens(&new).map_err(with_file)?;
        let mut guard = self.config.write().unwrap_or_else(|e| e.into_inner());
        // Against what runs, not the last reload: a change that still waits
        // for a restart is reported on every reload until then.
        let running = &self.started_config;
        let mut restart_required = Vec::new();
        if running.server.listen != new.server.listen {
            restart_required.push("server.listen");
        }
        if running.server.max_connections != new.server.max_connections {
            restart_required.push("server.max_connections");
        }
        if running.server.header_timeout_ms != new.server.header_timeout_ms {
            restart_required.push("server.header_timeout_ms");
        }
        if format!("{:?}", running.storage) != format!("{:?}", new.storage) {
            restart_required.push("storage");
        }
        if running.engine.shards != new.engine.shards {
            restart_required.push("engine.shards");
        }
        if format!("{:?}", running.webhooks) != format!("{:?}", new.webhooks) {
            restart_required.push("webhooks");
        }
        // Its listeners, upstreams and keys are set up at start.
        if format!("{:?}", running.gateway) != format!("{:?}", new.gateway) {
            restart_required.push("gateway");
        }
        let old_policy = engine.policy();
        let mut usage_reset: Vec<String> = old_policy
            .shapes
            .iter()
            .filter_map(|(name, old)| {
                let why = old.resets_under(policy.shapes.get(name)?)?;
                Some(format!("{name}: {why}"))
            })
            .collect();
        usage_reset.sort();
        let report = ReloadReport {
            plans: policy.plans.len(),
            limits: policy.shapes.len(),
            tokens: tokens.len(),
            restart_required: restart_required.iter().map(|s| s.to_string()).collect(),
            usage_reset,
        };
        let s = policy.settings;
        let lsn = match source {
            crate::config::PolicySource::Api => {
                engine.install_recovered(policy);
                None
            }
            crate::config::PolicySource::File => {
                let applied = engine
                    .change_policy(
                        crate::engine::PolicyRequest {
                            doc: &doc,
                            compiled: policy,
                            actor: policy::ACTOR_FILE,
                            if_version: None,
                            idempotency: None,
                            refuse_plans_in_use: false,
                            skip_if_same: true,
                        },
                        self.now(),
                    )
                    .map_err(|e| ConfigError::new("reload", e.to_string()))?;
                applied.lsn
            }
        };
        if let Some(c) = self.core.get() {
            c.waiting.set_bounds(s.max_waiters, s.max_waiters_per_subject);
        }
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tokens);
        guard.0 = new;
        Ok((report, lsn))
    }

    /// The engine, once recovery has finished.
    pub fn engine(&self) -> Result<&Arc<Engine>, ApiError> {
        self.core().map(|c| &c.engine)
    }

    /// What exists once recovery has finished.
    fn core(&self) -> Result<&Core, ApiError> {
        self.core
            .get()
            .ok_or_else(|| ApiError::Unavailable("quotad is recovering its state; retry shortly".into()))
    }

    fn writable(&self) -> Result<(), ApiError> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(ApiError::Unavailable(
                "quotad is shutting down; nothing was applied, retry elsewhere or later".into(),
            ));
        }
        Ok(())
    }

    async fn durable<T>(&self, applied: Applied<T>) -> Result<T, ApiError> {
        if let Some(lsn) = applied.lsn {
            self.wait(lsn).await?;
        }
        Ok(applied.value)
    }

    async fn wait(&self, lsn: Lsn) -> Result<(), ApiError> {
        self.core
            .get()
            .expect("a write had an engine")
            .durable
            .wait(lsn)
            .await
            .map_err(|e| ApiError::Unavailable(format!("{e}; the change was not acknowledged")))
    }

    pub(crate) fn now(&self) -> u64 {
        self.clock.now_ms()
    }
}

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// Plans now in force.
    pub plans: usize,
    /// Distinct limit names now in force.
    pub limits: usize,
    /// Tokens now accepted.
    pub tokens: usize,
    /// Changed settings that only take effect after a restart.
    pub restart_required: Vec<String>,
    /// Limits whose counters start again from zero because what they count
    /// changed (algorithm, period, time zone, scope or metric).
    pub usage_reset: Vec<String>,
}

impl std::fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} plan(s), {} limit(s), {} token(s) in force",
            self.plans, self.limits, self.tokens
        )?;
        if !self.restart_required.is_empty() {
            write!(f, "; needs a restart to apply: {}", self.restart_required.join(", "))?;
        }
        if !self.usage_reset.is_empty() {
            write!(f, "; usage starts from zero for: {}", self.usage_reset.join("; "))?;
        }
        Ok(())
    }
}

/// Reads the configured tokens (inline or from files).
pub fn load_tokens(config: &Config) -> Result<Vec<Token>, ConfigError> {
    let tokens: Vec<Token> = config
        .auth
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let secret = match (&t.token, &t.token_file) {
                (Some(s), _) => s.clone(),
                (None, Some(path)) => {
                    let key = format!("auth.tokens[{i}].token_file");
                    let s = std::fs::read_to_string(path)
                        .map_err(|e| ConfigError::new(&key, format!("cannot read {}: {e}", path.display())))?;
                    let s = s.trim().to_string();
                    if s.len() < 16 {
                        return Err(ConfigError::new(
                            key,
                            format!("{} holds a token shorter than 16 characters", path.display()),
                        ));
                    }
                    s
                }
                (None, None) => {
                    return Err(ConfigError::new(
                        format!("auth.tokens[{i}]"),
                        "needs token or token_file",
                    ))
                }
            };
            Ok(Token {
                secret: secret.into_bytes(),
                role: t.role,
                max_priority: t.max_priority(),
                name: t.name.clone().unwrap_or_else(|| format!("auth.tokens[{i}]")).into(),
            })
        })
        .collect::<Result<_, _>>()?;
    // One secret under two entries would hold the rights of the stronger one,
    // whatever the weaker entry says.
    for (i, t) in tokens.iter().enumerate() {
        if let Some(j) = tokens[..i].iter().position(|u| u.secret == t.secret) {
            return Err(ConfigError::new(
                format!("auth.tokens[{i}]"),
                format!("is the same token as auth.tokens[{j}]; give each role and max_priority its own token"),
            ));
        }
    }
    Ok(tokens)
}

/// `GET /dashboard`: one self-contained page (HTML, CSS, JS, SVG charts)
/// that reads the JSON API; its content security policy lets it talk to
/// this daemon only.
async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; \
                 img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("dashboard.html"),
    )
        .into_response()
}

/// Builds the router.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    let batch_limit = state.max_batch_bytes;
    Router::new()
        .route(
            "/v1/batch",
            post(batch::batch).layer(DefaultBodyLimit::max(batch_limit)),
        )
        .route("/v1/check", post(|State(st), h, b| decide(st, h, b, DecideOp::Check)))
        .route(
            "/v1/consume",
            post(|State(st), h, b| decide(st, h, b, DecideOp::Consume)),
        )
        .route(
            "/v1/reserve",
            post(|State(st), h, b| decide(st, h, b, DecideOp::Reserve)),
        )
        .route("/v1/authorize", any(authorize::authorize))
        .route("/v1/authorize/{*path}", any(authorize::authorize))
        .route("/v1/reservations/{id}/commit", post(commit))
        .route("/v1/reservations/{id}/release", post(release))
        .route("/v1/subjects", get(list_subjects))
        .route(
            "/v1/subjects/{subject}",
            get(get_subject).put(put_subject).delete(delete_subject),
        )
        .route("/v1/subjects/{subject}/reset", post(reset))
        .route("/v1/subjects/{subject}/credit", post(credit))
        .route("/v1/subjects/{subject}/flags/{anomaly}", delete(signals::clear_flag))
        .route("/v1/subjects/{subject}/usage", get(usage::subject_usage))
        .route("/v1/subjects/{subject}/tokens", post(subject_tokens::mint))
        .route("/v1/usage", get(usage::export))
        .route("/v1/usage/top", get(usage::top))
        .route("/v1/counters", get(usage::counters))
        .route("/v1/events", get(signals::list_events))
        .route("/v1/events/stream", get(signals::stream_events))
        .route("/v1/webhooks", get(signals::webhooks))
        .route("/v1/breakers", get(signals::breakers))
        .route(
            "/v1/breakers/{name}/open",
            post(|State(st), Path(n), h, b| signals::set_breaker(st, n, h, b, true)),
        )
        .route(
            "/v1/breakers/{name}/close",
            post(|State(st), Path(n), h, b| signals::set_breaker(st, n, h, b, false)),
        )
        .route("/v1/anomalies", get(signals::anomalies))
        .route("/v1/plans", get(plans))
        .route(
            "/v1/plans/{name}",
            get(|State(st), Path(n), h| policy::get_one(st, policy::Item::Plan, n, h))
                .put(|State(st), Path(n), h, b| policy::put_one(st, policy::Item::Plan, n, h, b))
                .delete(|State(st), Path(n), h| policy::delete_one(st, policy::Item::Plan, n, h)),
        )
        .route(
            "/v1/limits/{name}",
            get(|State(st), Path(n), h| policy::get_one(st, policy::Item::Limit, n, h))
                .put(|State(st), Path(n), h, b| policy::put_one(st, policy::Item::Limit, n, h, b))
                .delete(|State(st), Path(n), h| policy::delete_one(st, policy::Item::Limit, n, h)),
        )
        .route("/v1/policy", get(policy::get_policy).put(policy::put_policy))
        .route("/v1/policy/versions", get(policy::list_versions))
        .route("/v1/admin/digest", get(digest))
        .route("/v1/cluster", get(cluster::status))
        .route("/v1/cluster/members", post(cluster::add_member))
        .route("/v1/cluster/members/{id}", delete(cluster::remove_member))
        .route("/v1/admin/reload", post(reload))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi::openapi))
        .route("/dashboard", get(dashboard))
        .fallback(|| async {
            ApiError::NotFound(
                "not_found",
                "no such endpoint; the endpoints are listed in docs/api.md".into(),
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed("this endpoint does not take that method".into())
        })
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), gate))
        .with_state(state)
}

/// What every request passes before any handler: a head with both
/// `Content-Length` and `Transfer-Encoding` is 400 (a proxy in front may have
/// framed it the other way), the token is checked before a byte of the body
/// is read, a `Content-Length` over the limit is 413 at once, and the body
/// must arrive whole within `server.body_timeout_ms` (else 408), so that
/// neither strangers nor stalled uploads can hold the connection slots.
/// These refusals close the connection.
async fn gate(State(st): State<Arc<AppState>>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if req
        .extensions()
        .get::<crate::connections::ConflictingLengths>()
        .is_some()
    {
        let e = ApiError::InvalidRequest(
            "the request has both Content-Length and Transfer-Encoding; send one of them".into(),
        );
        return closing(e.into_response());
    }
    let path = req.uri().path();
    if let Some(refused) = refuse_head(&st, req.method(), path, req.headers()) {
        return refused;
    }
    // A parameter given twice is refused on every endpoint, also on those that
    // read no query (which of two values was meant is a guess).
    if let Some(q) = req.uri().query() {
        if let Err(e) = form_urlencoded_pairs(q) {
            return e.into_response();
        }
    }
    let (limit, setting) = if path == "/v1/batch" {
        (st.max_batch_bytes, "server.max_batch_bytes")
    } else {
        (st.max_body_bytes, "server.max_body_bytes")
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large(limit, setting);
    }
    if declared == Some(0) || (declared.is_none() && !req.headers().contains_key(header::TRANSFER_ENCODING)) {
        return cluster::route(&st, req, next).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(st.body_timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => return too_large(limit, setting),
        Err(_) => return body_timed_out(st.body_timeout),
    };
    cluster::route(
        &st,
        axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes)),
        next,
    )
    .await
}

/// The gate's checks on a request head: its token (a refusal closes the
/// connection), and a subject token only for reading its subject. The
/// refusal, if any. Also the direct path's ([`direct`]).
fn refuse_head(st: &AppState, method: &axum::http::Method, path: &str, headers: &HeaderMap) -> Option<Response> {
    // The dashboard page holds no data: it asks for a token and sends it with
    // each API call, which a browser's navigation to it cannot.
    if path == "/healthz" || path == "/readyz" || path == "/dashboard" {
        return None;
    }
    match st.authenticate(headers) {
        Err(e) => Some(closing(e.into_response())),
        Ok(Grant { subject: Some(s), .. }) if !subject_read(method, path) => Some(
            ApiError::Forbidden(format!(
                "this is a read-only token for subject {s:?}: it reads that subject (GET /v1/subjects/{{subject}}) and its usage, nothing else"
            ))
            .into_response(),
        ),
        Ok(_) => None,
    }
}

/// 413 for a body over `limit` (named by its `setting`); closes the connection.
fn too_large(limit: usize, setting: &str) -> Response {
    closing(
        ApiError::PayloadTooLarge(format!("the request body is larger than {limit} bytes ({setting})")).into_response(),
    )
}

/// 408 for a body that did not arrive in time; closes the connection.
fn body_timed_out(timeout: std::time::Duration) -> Response {
    closing(
        ApiError::RequestTimeout(format!(
            "the request body did not arrive within {} ms (server.body_timeout_ms)",
            timeout.as_millis()
        ))
        .into_response(),
    )
}

/// Marks an answer as the last on its connection.
fn closing(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Every route pattern of the router: metric labels borrow these.
const ROUTES: &[&str] = &[
    "/v1/batch",
    "/v1/check",
    "/v1/consume",
    "/v1/reserve",
    "/v1/authorize",
    "/v1/authorize/{*path}",
    "/v1/reservations/{id}/commit",
    "/v1/reservations/{id}/release",
    "/v1/subjects",
    "/v1/subjects/{subject}",
    "/v1/subjects/{subject}/reset",
    "/v1/subjects/{subject}/credit",
    "/v1/subjects/{subject}/flags/{anomaly}",
    "/v1/subjects/{subject}/usage",
    "/v1/subjects/{subject}/tokens",
    "/v1/usage",
    "/v1/usage/top",
    "/v1/counters",
    "/v1/events",
    "/v1/events/stream",
    "/v1/webhooks",
    "/v1/breakers",
    "/v1/breakers/{name}/open",
    "/v1/breakers/{name}/close",
    "/v1/anomalies",
    "/v1/plans",
    "/v1/plans/{name}",
    "/v1/limits/{name}",
    "/v1/policy",
    "/v1/policy/versions",
    "/v1/admin/digest",
    "/v1/cluster",
    "/v1/cluster/members",
    "/v1/cluster/members/{id}",
    "/v1/admin/reload",
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/openapi.json",
    "/dashboard",
];

fn static_method(m: &axum::http::Method) -> &'static str {
    match *m {
        axum::http::Method::GET => "GET",
        axum::http::Method::POST => "POST",
        axum::http::Method::PUT => "PUT",
        axum::http::Method::DELETE => "DELETE",
        _ => "other",
    }
}

/// Times every routed request, labelled by its route pattern (not the raw path,
/// which would make one series per subject).
async fn observe(
    State(st): State<Arc<AppState>>,
    route: axum::extract::MatchedPath,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = Instant::now();
    let method = static_method(req.method());
    let route = ROUTES.iter().copied().find(|r| *r == route.as_str()).unwrap_or("other");
    let resp = next.run(req).await;
    st.metrics
        .http(method, route, resp.status().as_u16(), started.elapsed());
    resp
}

// ---------- decoding ----------

fn body_bytes(body: Result<Bytes, BytesRejection>, max: usize) -> Result<Bytes, ApiError> {
    body_bytes_named(body, max, "server.max_body_bytes")
}

fn body_bytes_named(body: Result<Bytes, BytesRejection>, max: usize, setting: &str) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!("the request body is larger than {max} bytes ({setting})"))
        } else {
            ApiError::InvalidRequest(format!("could not read the request body: {e}"))
        }
    })
}

/// Whether a subject token may ask for this at all: a GET of one subject or
/// of its usage (the handler then checks it is the token's subject).
fn subject_read(method: &axum::http::Method, path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/v1/subjects/") else {
        return false;
    };
    method == axum::http::Method::GET
        && match rest.split_once('/') {
            None => !rest.is_empty(),
            Some((s, "usage")) => !s.is_empty(),
            Some(_) => false,
        }
}

/// Parses a JSON body, naming the field path of any error. An empty body is
/// `{}`. A key repeated in any object is an error too: serde would keep the
/// last of a map's and the client may have meant the first.
fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if let Some(repeated) = json::repeated_key(bytes) {
        return Err(ApiError::InvalidRequest(repeated));
    }
    decode(bytes)
}

/// As [`parse`], for a part of a body that `parse` has already checked
/// (an operation of a batch).
fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    // serde would also take a struct from an array; the API only speaks objects.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::InvalidRequest(
            "invalid JSON body: expected a JSON object".into(),
        ));
    }
    // The common case parses once without tracking the path; only a body that
    // fails is parsed again to say where it went wrong.
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let top_level = matches!(path.as_str(), "." | "?" | "");
        let what = plain_words(&inner);
        match inner.classify() {
            serde_json::error::Category::Data if inner.to_string().starts_with("missing field") => {
                ApiError::InvalidRequest(what)
            }
            serde_json::error::Category::Data if !top_level => ApiError::InvalidRequest(format!("{path}: {what}")),
            serde_json::error::Category::Data => ApiError::InvalidRequest(what),
            _ if top_level => ApiError::InvalidRequest(format!("invalid JSON body: {what}")),
            _ => ApiError::InvalidRequest(format!("invalid JSON body (at {path}): {what}")),
        }
    })?;
    // The fast path above checks this too (from_slice); a body that only
    // parsed here must still be one JSON value and nothing after it.
    de.end().map_err(|e| {
        ApiError::InvalidRequest(format!(
            "invalid JSON body: the body must be exactly one JSON object, but more follows it at line {} column {}",
            e.line(),
            e.column()
        ))
    })?;
    Ok(value)
}

/// serde's message in words a client author can act on: no Rust type names,
/// and the position only where it helps (syntax errors).
fn plain_words(e: &serde_json::Error) -> String {
    let raw = e.to_string();
    // serde appends " at line L column C"; for data errors the path says where.
    let msg = match e.classify() {
        serde_json::error::Category::Data => raw
            .rsplit_once(" at line ")
            .map_or(raw.as_str(), |(m, _)| m)
            .to_string(),
        _ => raw.clone(),
    };
    if let Some(field) = msg.strip_prefix("missing field `").and_then(|f| f.strip_suffix('`')) {
        return format!("{field}: is required");
    }
    if let Some(field) = msg.strip_prefix("duplicate field `").and_then(|f| f.strip_suffix('`')) {
        return format!("{field}: {}", json::TWICE);
    }
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let (field, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let expected = expected
            .trim_start_matches(", expected ")
            .trim_start_matches("one of ")
            .replace('`', "");
        return if expected.contains("there are no fields") {
            format!("unknown field {field:?}: this body takes no fields")
        } else {
            format!("unknown field {field:?}: the fields are {expected}")
        };
    }
    let mut m = msg;
    for (rust, words) in [
        ("u64", "a whole number from 0"),
        ("u32", "a whole number from 0"),
        ("usize", "a whole number from 0"),
        ("i64", "a whole number"),
        ("a string", "a string"),
        ("a boolean", "true or false"),
        ("a map", "an object"),
        ("a sequence", "an array"),
    ] {
        m = m.replace(&format!("expected {rust}"), &format!("expected {words}"));
    }
    if let Some(i) = m.find("expected struct ") {
        m.truncate(i);
        m.push_str("expected an object");
    }
    m.replace("invalid type: sequence", "wrong type: an array")
        .replace("invalid type: map", "wrong type: an object")
        .replace("invalid type: ", "wrong type: ")
        .replace("invalid value: integer `-", "negative number `-")
}

pub(crate) fn check_text(field: &str, s: &str, max_bytes: usize) -> Result<(), ApiError> {
    if s.is_empty() || s.len() > max_bytes {
        return Err(ApiError::invalid(
            field,
            format!("must be 1 to {max_bytes} bytes, got {}", s.len()),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(ApiError::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

fn check_amounts(field: &str, amounts: &BTreeMap<String, u64>) -> Result<(), ApiError> {
    if amounts.len() > bounds::AMOUNTS {
        return Err(ApiError::invalid(
            field,
            format!("at most {} metrics per request", bounds::AMOUNTS),
        ));
    }
    for (metric, v) in amounts {
        check_text(&format!("{field} key"), metric, bounds::METRIC_BYTES)?;
        if *v > MAX_SAFE_INTEGER {
            return Err(ApiError::invalid(
                &format!("{field}.{metric}"),
                format!("{v} is above the largest allowed amount {MAX_SAFE_INTEGER} (2^53-1)"),
            ));
        }
    }
    Ok(())
}

/// The idempotency key from the body and/or the `Idempotency-Key` header.
pub(crate) fn idempotency_key(headers: &HeaderMap, body_key: Option<String>) -> Result<Option<String>, ApiError> {
    // A name made once: `get` with a &str parses and lower-cases it each call.
    const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
    let header = match headers.get(&IDEMPOTENCY_KEY) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::invalid("Idempotency-Key header", "must be visible ASCII"))?
                .to_string(),
        ),
        None => None,
    };
    let key = match (header, body_key) {
        (Some(h), Some(b)) if h != b => {
            return Err(ApiError::invalid(
                "idempotency_key",
                "differs from the Idempotency-Key header; send one or make them equal",
            ))
        }
        (h, b) => h.or(b),
    };
    if let Some(k) = &key {
        check_text("idempotency_key", k, bounds::IDEMPOTENCY_KEY_BYTES)?;
    }
    Ok(key)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    /// Only inside `/v1/batch`, where it names the operation.
    #[serde(default)]
    op: Option<String>,
    subject: String,
    #[serde(default)]
    event: Option<String>,
    #[serde(default, deserialize_with = "json::unique_map")]
    attributes: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "json::unique_map")]
    amounts: BTreeMap<String, u64>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    ttl_ms: Option<u64>,
    #[serde(default)]
    priority: Option<Priority>,
    #[serde(default)]
    wait_ms: Option<u64>,
}

/// A decision request and how long it may wait for capacity.
struct Asked {
    req: DecisionRequest,
    /// 0: answer at once.
    wait_ms: u64,
}

/// Parses a decision body; `in_batch` allows the `op` field.
fn decision_request(
    st: &AppState,
    headers: &HeaderMap,
    bytes: &[u8],
    op: DecideOp,
    in_batch: bool,
    max_priority: Priority,
) -> Result<Asked, ApiError> {
    // No walk for repeated keys on the hot path: a decision body refuses them
    // while it is decoded (serde's own check on its fields, `unique_map` on
    // its two maps), and a batch was checked whole.
    let b: DecisionBody = decode(bytes).map_err(|e| own_fields(e, op, in_batch))?;
    if let Some(p) = b.priority.filter(|&p| p > max_priority) {
        return Err(ApiError::Forbidden(format!(
            "priority: {:?} is above what this token may ask for ({:?}, its max_priority in [[auth.tokens]])",
            p.as_str(),
            max_priority.as_str()
        )));
    }
    if b.op.is_some() && !in_batch {
        return Err(ApiError::invalid("op", "names an operation only inside POST /v1/batch"));
    }
    let wait_ms = match b.wait_ms {
        None => 0,
        Some(_) if in_batch => {
            return Err(ApiError::invalid(
                "wait_ms",
                "calls inside a batch are answered at once; send a call that may wait on its own",
            ))
        }
        Some(_) if op == DecideOp::Check => {
            return Err(ApiError::invalid(
                "wait_ms",
                "check answers at once; only consume and reserve can wait",
            ))
        }
        Some(w) => check_wait(st, "wait_ms", w)?,
    };
    check_text("subject", &b.subject, bounds::SUBJECT_BYTES)?;
    if let Some(e) = &b.event {
        check_text("event", e, bounds::EVENT_BYTES)?;
    }
    if b.attributes.len() > bounds::ATTRIBUTES {
        return Err(ApiError::invalid(
            "attributes",
            format!("at most {} pairs, got {}", bounds::ATTRIBUTES, b.attributes.len()),
        ));
    }
    for (k, v) in &b.attributes {
        check_attribute(&format!("attributes.{k}"), k, v)?;
    }
    check_amounts("amounts", &b.amounts)?;
    let req = DecisionRequest {
        subject: b.subject,
        event: b.event,
        attributes: b.attributes,
        amounts: b.amounts,
        idempotency_key: idempotency_key(headers, b.idempotency_key)?,
        ttl_ms: b.ttl_ms,
        priority: b.priority,
    };
    if op == DecideOp::Check && req.idempotency_key.is_some() {
        return Err(ApiError::invalid(
            "idempotency_key",
            "check changes nothing, so it takes no idempotency key; send it on consume or reserve",
        ));
    }
    Ok(Asked { req, wait_ms })
}

/// `w` ms of waiting, if within `engine.max_wait_ms`.
pub(crate) fn check_wait(st: &AppState, field: &str, w: u64) -> Result<u64, ApiError> {
    let max = st.engine()?.policy().settings.max_wait_ms;
    if w > max {
        return Err(ApiError::invalid(
            field,
            format!("{w} is more than the longest wait allowed, {max} (engine.max_wait_ms)"),
        ));
    }
    Ok(w)
}

/// One attribute (`field` names it in the error).
pub(crate) fn check_attribute(field: &str, key: &str, value: &str) -> Result<(), ApiError> {
    check_text("attributes key", key, bounds::ATTRIBUTE_KEY_BYTES)?;
    if value.len() > bounds::ATTRIBUTE_VALUE_BYTES || value.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            format!(
                "values are at most {} bytes without control characters",
                bounds::ATTRIBUTE_VALUE_BYTES
            ),
        ));
    }
    Ok(())
}

fn subject_path(s: &str) -> Result<(), ApiError> {
    check_text("subject (path)", s, bounds::SUBJECT_BYTES)
}

// ---------- encoding ----------

/// The `X-RateLimit-*` and `Retry-After` headers of a decision: from the limit that
/// denied (the one with the longest wait), else the one with the least remaining.
pub(crate) fn rate_headers(d: &Decision) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in rate_figures(d).into_iter().flatten() {
        h.insert(name, HeaderValue::from(value));
    }
    h
}

/// The rate-limit headers of a decision as (name, value), in answer order:
/// `X-RateLimit-Limit`, `-Remaining`, `-Reset` (seconds since the epoch) of
/// the binding counter, and `Retry-After` (seconds) of a denial.
pub(crate) fn rate_figures(d: &Decision) -> [Option<(HeaderName, u64)>; 4] {
    const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
    const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
    const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
    let mut out = [None, None, None, None];
    if let Some(c) = binding_counter(d) {
        if let MaxValue::Finite(m) = c.max {
            out[0] = Some((LIMIT, m));
        }
        out[1] = c.remaining.map(|r| (REMAINING, r));
        out[2] = c.resets_at.map(|at| (RESET, at.div_ceil(1000)));
    }
    if !d.allowed {
        out[3] = d.retry_after_ms.map(|ms| (header::RETRY_AFTER, ms.div_ceil(1000)));
    }
    out
}

/// The limit a decision's rate figures come from: when allowed, the counter
/// with the least remaining; when denied, the denying limit that clears last.
pub(crate) fn binding_counter(d: &Decision) -> Option<&CounterView> {
    if d.allowed {
        d.counters
            .iter()
            .filter(|c| c.remaining.is_some())
            .min_by_key(|c| c.remaining)
    } else {
        d.reasons
            .iter()
            .filter(|r| matches!(r.code, ReasonCode::LimitExceeded | ReasonCode::ExceedsCapacity))
            // A denial that never clears outranks any finite wait.
            .max_by_key(|r| r.retry_after_ms.map_or(u128::MAX, u128::from))
            .and_then(|r| d.counters.iter().find(|c| Some(&c.limit) == r.limit.as_ref()))
    }
}

fn decision_response(d: Decision) -> Response {
    let headers = rate_headers(&d);
    (headers, json_response(&d, 512)).into_response()
}

/// A JSON answer serialized into a buffer of about the expected size. axum's
/// `Json` starts at 128 bytes of `BytesMut` and grows it write by write, which
/// was 10% of the daemon's CPU under batch load (`put_slice` and `memmove`).
pub(super) fn json_response<T: Serialize>(value: &T, capacity: usize) -> Response {
    let mut buf = Vec::with_capacity(capacity);
    match serde_json::to_writer(&mut buf, value) {
        Ok(()) => ([(header::CONTENT_TYPE, "application/json")], buf).into_response(),
        // As axum's `Json` does; our answer types always encode.
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the answer: {e}"),
        )
            .into_response(),
    }
}

// ---------- handlers ----------

/// Validates and decides one check/consume/reserve; the answer may still wait
/// for durability. Shared by the single endpoints and `/v1/batch` (`in_batch`
/// allows the body's `op` field).
fn decide_now(
    st: &AppState,
    headers: &HeaderMap,
    bytes: &[u8],
    op: DecideOp,
    in_batch: bool,
    max_priority: Priority,
) -> Result<Decided, ApiError> {
    let Asked { req, wait_ms } = decision_request(st, headers, bytes, op, in_batch, max_priority)?;
    decide_request(st, op, req, wait_ms)
}

/// Decides a validated request: the path every decision takes, whatever
/// built the request (a JSON body, forward-auth headers).
fn decide_request(st: &AppState, op: DecideOp, req: DecisionRequest, wait_ms: u64) -> Result<Decided, ApiError> {
    if op != DecideOp::Check {
        st.writable()?;
    }
    let core = st.core()?;
    if let Some(k) = &req.idempotency_key {
        in_progress(&core.waiting, k)?;
    }
    let (applied, notes) = core.engine.decide_with(op, &req, st.now(), DecideOpts::default())?;
    Ok(Decided {
        applied,
        notes,
        req,
        wait_ms,
    })
}

/// A decision made on arrival, with what parking it needs.
struct Decided {
    applied: Applied<Decision>,
    notes: DecisionNotes,
    req: DecisionRequest,
    /// 0: answer at once.
    wait_ms: u64,
}

/// An unknown-field error names the fields of this endpoint only: one body
/// type serves check, consume, reserve and batch operations.
fn own_fields(e: ApiError, op: DecideOp, in_batch: bool) -> ApiError {
    let ApiError::InvalidRequest(msg) = &e else { return e };
    let Some((head, _)) = msg.split_once(": the fields are ") else {
        return e;
    };
    let mut fields = vec![];
    if in_batch {
        fields.push("op");
    }
    fields.extend(["subject", "event", "attributes", "amounts", "priority"]);
    if op != DecideOp::Check {
        fields.push("idempotency_key");
        if !in_batch {
            fields.push("wait_ms");
        }
    }
    if op == DecideOp::Reserve {
        fields.push("ttl_ms");
    }
    ApiError::InvalidRequest(format!("{head}: the fields are {}", fields.join(", ")))
}

/// 409 while a call with this idempotency key waits for capacity: deciding
/// it here too could charge it twice.
fn in_progress(waiting: &Waiting, key: &str) -> Result<(), ApiError> {
    if waiting.in_progress(key) {
        return Err(EngineError::RequestInProgress(format!(
            "a call with idempotency key {key:?} is waiting for capacity; its answer comes on that call \
             (retry this one after it is answered)"
        ))
        .into());
    }
    Ok(())
}

/// Counts a decision that is about to be answered.
fn note_decision(st: &AppState, op: DecideOp, d: &Decision) {
    let op_name = match op {
        DecideOp::Check => "check",
        DecideOp::Consume => "consume",
        DecideOp::Reserve => "reserve",
    };
    st.metrics.decision(op_name, d);
    if !d.allowed {
        tracing::debug!(subject = %d.subject, ?op, reasons = ?d.reasons, "denied");
    }
}

async fn decide(
    st: Arc<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    op: DecideOp,
) -> Result<Response, ApiError> {
    let bytes = body_bytes(body, st.max_body_bytes)?;
    decide_bytes(&st, &headers, &bytes, op).await
}

/// `/v1/check`, `/v1/consume` or `/v1/reserve` on a body read whole: the
/// handler's work, shared by the router and the direct path ([`direct`]).
async fn decide_bytes(st: &AppState, headers: &HeaderMap, bytes: &[u8], op: DecideOp) -> Result<Response, ApiError> {
    Ok(decision_response(decide_body(st, headers, bytes, op).await?))
}

/// The decision [`decide_bytes`] answers with.
async fn decide_body(st: &AppState, headers: &HeaderMap, bytes: &[u8], op: DecideOp) -> Result<Decision, ApiError> {
    settle(st, op, decide_body_now(st, headers, bytes, op)?).await
}

/// The part of [`decide_body`] that runs at once: checks and the decision,
/// before any wait for capacity or durability.
fn decide_body_now(st: &AppState, headers: &HeaderMap, bytes: &[u8], op: DecideOp) -> Result<Decided, ApiError> {
    let grant = st.authorize(headers, Role::Client)?;
    decide_now(st, headers, bytes, op, false, grant.max_priority)
}

/// A decision for a request built outside this module (the gateway):
/// decided, waited for and made durable as `/v1/consume` and `/v1/reserve` are.
///
/// On a cluster node that does not lead, the call goes to the leader's HTTP
/// API with the caller's `Authorization`, as a request to this node's API
/// would be forwarded.
pub(crate) async fn decide_call(
    st: &AppState,
    op: DecideOp,
    req: DecisionRequest,
    wait_ms: u64,
    authorization: Option<&HeaderValue>,
) -> Result<Decision, ApiError> {
    if let Some(leader) = cluster::leader_elsewhere(st)? {
        let path = match op {
            DecideOp::Check => "/v1/check",
            DecideOp::Consume => "/v1/consume",
            DecideOp::Reserve => "/v1/reserve",
        };
        let mut body = serde_json::json!({
            "subject": req.subject,
            "attributes": req.attributes,
            "amounts": req.amounts,
        });
        let optional = [
            ("event", req.event.map(serde_json::Value::from)),
            ("idempotency_key", req.idempotency_key.map(serde_json::Value::from)),
            ("ttl_ms", req.ttl_ms.map(serde_json::Value::from)),
            ("priority", req.priority.map(|p| p.as_str().into())),
            ("wait_ms", (wait_ms > 0).then_some(wait_ms.into())),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                body[k] = v;
            }
        }
        // The leader may hold the call for its wait, then answers.
        let timeout = std::time::Duration::from_millis(wait_ms) + FORWARD_TIMEOUT;
        return cluster::post_to_leader(leader, path, &body, forwarded_auth(st, authorization), timeout).await;
    }
    settle(st, op, decide_request(st, op, req, wait_ms)?).await
}

/// How long a call forwarded to the leader may take, besides its wait.
const FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The caller's `Authorization` to forward, only when tokens are configured:
/// without them it is no quotad token (for the gateway, perhaps a provider
/// key) and must not travel to another node.
fn forwarded_auth<'h>(st: &AppState, authorization: Option<&'h HeaderValue>) -> Option<&'h HeaderValue> {
    authorization.filter(|_| st.tokens_configured())
}

/// Commits or releases a reservation as `/v1/reservations/{id}/…` does (on
/// the leader, when this cluster node does not lead).
pub(crate) async fn finish_call(
    st: &AppState,
    id: &str,
    action: Finish,
    authorization: Option<&HeaderValue>,
) -> Result<FinishAnswer, ApiError> {
    if let Some(leader) = cluster::leader_elsewhere(st)? {
        reservation_path(id)?;
        let (path, body) = match &action {
            Finish::Commit(amounts) => (
                format!("/v1/reservations/{id}/commit"),
                serde_json::json!({ "amounts": amounts }),
            ),
            Finish::Release => (format!("/v1/reservations/{id}/release"), serde_json::json!({})),
            // Expiry is the leader's own record, never asked for.
            Finish::Expire => {
                return Err(ApiError::InvalidRequest(
                    "a reservation expires by itself; it cannot be asked to".into(),
                ))
            }
        };
        return cluster::post_to_leader(leader, &path, &body, forwarded_auth(st, authorization), FORWARD_TIMEOUT).await;
    }
    st.writable()?;
    let applied = st.engine()?.finish(id, action, st.now())?;
    let answer = st.durable(applied).await?;
    st.metrics.committed(&answer);
    Ok(answer)
}

/// Waits for capacity when the call asked to, then for durability: the
/// decision as it is answered.
async fn settle(st: &AppState, op: DecideOp, decided: Decided) -> Result<Decision, ApiError> {
    let Decided {
        mut applied,
        notes,
        req,
        wait_ms,
    } = decided;
    if wait_ms > 0 {
        applied.value.waited_ms = Some(0);
        if Waiting::worth_waiting(&applied.value, &notes, wait_ms) {
            applied = match st.core()?.waiting.wait(op, req, applied.value, notes, wait_ms).await? {
                WaitEnd::Admitted(a) => a,
                WaitEnd::Denied(d) => Applied { value: d, lsn: None },
            };
        }
    }
    let d = st.durable(applied).await?;
    note_decision(st, op, &d);
    Ok(d)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitBody {
    #[serde(default)]
    amounts: BTreeMap<String, u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {}

fn reservation_path(id: &str) -> Result<(), ApiError> {
    check_text("reservation id (path)", id, 128)
}

async fn commit(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_bytes(body, st.max_body_bytes)?;
    Ok(Json(finish_body(&st, &id, &headers, &bytes, true).await?).into_response())
}

async fn release(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_bytes(body, st.max_body_bytes)?;
    Ok(Json(finish_body(&st, &id, &headers, &bytes, false).await?).into_response())
}

/// `/v1/reservations/{id}/commit` (`commit`) or `/release` on a body read
/// whole: the handlers' work, shared by the router and the direct path.
async fn finish_body(
    st: &AppState,
    id: &str,
    headers: &HeaderMap,
    bytes: &[u8],
    commit: bool,
) -> Result<FinishAnswer, ApiError> {
    let applied = finish_body_now(st, id, headers, bytes, commit)?;
    finish_settle(st, applied, commit).await
}

/// The part of [`finish_body`] that runs at once: checks and the engine's
/// change, before the wait for durability.
fn finish_body_now(
    st: &AppState,
    id: &str,
    headers: &HeaderMap,
    bytes: &[u8],
    commit: bool,
) -> Result<Applied<FinishAnswer>, ApiError> {
    st.authorize(headers, Role::Client)?;
    reservation_path(id)?;
    let action = if commit {
        let b: CommitBody = parse(bytes)?;
        check_amounts("amounts", &b.amounts)?;
        Finish::Commit(b.amounts)
    } else {
        let _: ReleaseBody = parse(bytes)?;
        Finish::Release
    };
    st.writable()?;
    Ok(st.engine()?.finish(id, action, st.now())?)
}

/// Answers a commit or release once its change is durable.
async fn finish_settle(st: &AppState, applied: Applied<FinishAnswer>, commit: bool) -> Result<FinishAnswer, ApiError> {
    let answer = st.durable(applied).await?;
    if commit {
        st.metrics.committed(&answer);
    }
    Ok(answer)
}

async fn get_subject(
    State(st): State<Arc<AppState>>,
    Path(subject): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    subject_path(&subject)?;
    st.authorize_subject(&headers, &subject)?;
    Ok(Json(st.engine()?.subject(&subject, st.now())?).into_response())
}

/// Answers an admin write with the subject as it is now; marks replays.
fn subject_answer(st: &AppState, subject: &str, replayed: bool) -> Result<Response, ApiError> {
    let view = st.engine()?.subject(subject, st.now())?;
    let mut resp = Json(view).into_response();
    if replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutSubjectBody {
    #[serde(default)]
    plan: Option<String>,
    #[serde(default)]
    overrides: Option<BTreeMap<String, Override>>,
}

async fn put_subject(
    State(st): State<Arc<AppState>>,
    Path(subject): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    subject_path(&subject)?;
    let b: PutSubjectBody = parse(&body_bytes(body, st.max_body_bytes)?)?;
    if let Some(p) = &b.plan {
        check_text("plan", p, 128)?;
    }
    if b.overrides.as_ref().is_some_and(|o| o.len() > 64) {
        return Err(ApiError::invalid("overrides", "at most 64 entries"));
    }
    let key = idempotency_key(&headers, None)?;
    st.writable()?;
    let applied = st.engine()?.put_subject(
        &subject,
        b.plan.as_deref(),
        b.overrides.as_ref(),
        key.as_deref(),
        st.now(),
    )?;
    let replayed = st.durable(applied).await?;
    subject_answer(&st, &subject, replayed)
}

#[derive(Serialize)]
struct Deleted<'a> {
    subject: &'a str,
    deleted: bool,
}

async fn delete_subject(
    State(st): State<Arc<AppState>>,
    Path(subject): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    subject_path(&subject)?;
    let key = idempotency_key(&headers, None)?;
    st.writable()?;
    let applied = st.engine()?.delete_subject(&subject, key.as_deref(), st.now())?;
    let (existed, replayed) = st.durable(applied).await?;
    let mut resp = Json(Deleted {
        subject: &subject,
        deleted: existed,
    })
    .into_response();
    if replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetBody {
    #[serde(default)]
    limit: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

async fn reset(
    State(st): State<Arc<AppState>>,
    Path(subject): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    subject_path(&subject)?;
    let b: ResetBody = parse(&body_bytes(body, st.max_body_bytes)?)?;
    if let Some(l) = &b.limit {
        check_text("limit", l, 128)?;
    }
    let key = idempotency_key(&headers, b.idempotency_key)?;
    st.writable()?;
    let applied = st
        .engine()?
        .reset(&subject, b.limit.as_deref(), key.as_deref(), st.now())?;
    let replayed = st.durable(applied).await?;
    subject_answer(&st, &subject, replayed)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreditBody {
    limit: String,
    amount: u64,
    #[serde(default)]
    idempotency_key: Option<String>,
}

async fn credit(
    State(st): State<Arc<AppState>>,
    Path(subject): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    subject_path(&subject)?;
    let b: CreditBody = parse(&body_bytes(body, st.max_body_bytes)?)?;
    check_text("limit", &b.limit, 128)?;
    if b.amount == 0 || b.amount > MAX_SAFE_INTEGER {
        return Err(ApiError::invalid(
            "amount",
            format!("must be between 1 and {MAX_SAFE_INTEGER}, got {}", b.amount),
        ));
    }
    let key = idempotency_key(&headers, b.idempotency_key)?;
    st.writable()?;
    let applied = st
        .engine()?
        .credit(&subject, &b.limit, b.amount, key.as_deref(), st.now())?;
    let replayed = st.durable(applied).await?;
    subject_answer(&st, &subject, replayed)
}

#[derive(Serialize)]
struct SubjectEntry {
    subject: String,
    /// The plan in force, as `GET /v1/subjects/{s}` shows it.
    plan: Option<String>,
    /// Whether that plan was assigned (else it is the default plan).
    assigned: bool,
}

#[derive(Serialize)]
struct SubjectPage {
    subjects: Vec<SubjectEntry>,
    /// Pass as `after` for the next page; null on the last page.
    next_after: Option<String>,
}

async fn list_subjects(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    let mut after = None;
    let mut limit = 100usize;
    for (k, v) in form_urlencoded_pairs(q.as_deref().unwrap_or(""))? {
        match k.as_str() {
            "after" => after = Some(v),
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=bounds::LIST_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "limit",
                            format!("must be a whole number from 1 to {}", bounds::LIST_LIMIT),
                        )
                    })?
            }
            other => return Err(ApiError::invalid(other, "unknown query parameter; use after and limit")),
        }
    }
    let rows = st.engine()?.list_subjects(after.as_deref(), limit);
    let next_after = (rows.len() == limit)
        .then(|| rows.last().map(|r| r.0.clone()))
        .flatten();
    let subjects = rows
        .into_iter()
        .map(|(subject, plan, assigned)| SubjectEntry {
            subject,
            plan,
            assigned,
        })
        .collect();
    Ok(Json(SubjectPage { subjects, next_after }).into_response())
}

/// Decodes `a=b&c=d` with percent-escapes and `+` as space; a name given
/// twice is 400.
fn form_urlencoded_pairs(q: &str) -> Result<Vec<(String, String)>, ApiError> {
    fn unescape(s: &str) -> Result<String, ApiError> {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                    let v = hex
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .ok_or_else(|| ApiError::invalid("query", "bad percent-escape"))?;
                    out.push(v);
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).map_err(|_| ApiError::invalid("query", "is not UTF-8"))
    }
    let pairs: Vec<(String, String)> = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((unescape(k)?, unescape(v)?))
        })
        .collect::<Result<_, ApiError>>()?;
    // Which of two values was meant is a guess: refused here, for every endpoint.
    let mut names: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(ApiError::invalid(
            w[0],
            "is given more than once; give each query parameter once",
        ));
    }
    Ok(pairs)
}

#[derive(Serialize)]
struct PlanView {
    name: String,
    default: bool,
    unmatched: crate::engine::policy::Unmatched,
    /// Priority of its calls that name none.
    priority: Priority,
    limits: Vec<crate::engine::policy::LimitConfig>,
}

#[derive(Serialize)]
struct PlansView {
    plans: Vec<PlanView>,
    limits: Vec<crate::engine::policy::LimitConfig>,
    metrics: Vec<String>,
    /// The price table as written, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pricing: Option<crate::engine::policy::PricingConfig>,
}

async fn plans(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Client)?;
    let p = st.engine()?.policy();
    let mut metrics: Vec<String> = p.metrics.iter().cloned().collect();
    metrics.sort();
    let view = PlansView {
        plans: p
            .plans
            .iter()
            .map(|pl| PlanView {
                name: pl.name.to_string(),
                default: pl.default,
                unmatched: pl.unmatched,
                priority: pl.priority,
                limits: pl
                    .all
                    .iter()
                    .filter(|(_, own)| *own)
                    .map(|(l, _)| l.source.clone())
                    .collect(),
            })
            .collect(),
        limits: p.top_limits.iter().map(|l| l.source.clone()).collect(),
        metrics,
        pricing: p.doc.pricing.clone(),
    };
    Ok(Json(view).into_response())
}

async fn healthz() -> Response {
    Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    if st.ready.load(Ordering::Acquire) && !st.shutting_down.load(Ordering::Acquire) {
        Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        ApiError::Unavailable("not ready: recovery is running or shutdown has begun".into()).into_response()
    }
}

async fn metrics(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Client)?;
    let stats = st.engine().map(|e| e.stats()).unwrap_or_default();
    if let Some(c) = st.core.get().and_then(|c| c.cluster.as_ref()) {
        c.update_metrics();
    }
    let signals = st.engine().map(|e| signals_now(e, st.now())).unwrap_or_default();
    let body = st.metrics.render(&stats, &signals);
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    Ok(([(axum::http::header::CONTENT_TYPE, content_type)], body).into_response())
}

/// Breakers and anomaly flags for `/metrics`.
fn signals_now(engine: &Engine, now: u64) -> crate::metrics::SignalsNow {
    let policy = engine.policy();
    if policy.breakers.is_empty() && policy.anomalies.is_empty() {
        return crate::metrics::SignalsNow::default();
    }
    let breakers = engine
        .breakers(now)
        .into_iter()
        .map(|b| (b.name, b.scope, b.open))
        .collect();
    let mut flags: Vec<(Arc<str>, u64)> = policy.anomalies.iter().map(|a| (a.name.clone(), 0)).collect();
    for f in engine.flags(None, now) {
        if let Some(n) = flags.iter_mut().find(|(a, _)| *a == f.anomaly) {
            n.1 += 1;
        }
    }
    crate::metrics::SignalsNow { breakers, flags }
}

async fn digest(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    Ok(Json(st.engine()?.digest(st.now())).into_response())
}

async fn reload(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    match st.reload().await {
        Ok(report) => {
            if report.usage_reset.is_empty() {
                tracing::info!("configuration reloaded: {report}");
            } else {
                tracing::warn!("configuration reloaded: {report}");
            }
            Ok(Json(report).into_response())
        }
        Err(e) => {
            tracing::warn!(error = %e, "reload rejected; the previous configuration stays in force");
            Err(ApiError::InvalidRequest(format!(
                "reload rejected, the previous configuration stays in force: {e}"
            )))
        }
    }
}
