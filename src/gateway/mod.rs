//! The OpenAI-compatible gateway: `POST /v1/chat/completions` (streamed and
//! not) and `POST /v1/embeddings` on a listener of its own. For each call it
//! counts the prompt's tokens, reserves them with the most the answer may
//! take, forwards the call to the upstream that serves the model (with the
//! upstream's key: callers never hold it), and commits what the upstream
//! reports in `usage`, or releases the hold when the call fails. Like
//! `api/`, an outer layer: it decides, commits and releases through the same
//! calls the HTTP API makes ([`crate::api::decide_call`],
//! [`crate::api::finish_call`]).
//!
//! - [`config`]: `[gateway]` and its upstreams.
//! - [`tokens`]: counting a request's tokens before it is sent.
//! - [`stream`]: passing a streamed answer on event by event while reading
//!   its usage.
//! - [`envoy`]: Envoy's rate limit service over gRPC (`grpc_listen`).

pub mod config;
pub mod envoy;
mod stream;
pub mod tokens;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};

use crate::api::authorize::{single, waiting_headers};
use crate::api::{decide_call, finish_call, rate_headers, ApiError, AppState};
use crate::config::Role;
use crate::engine::policy::Priority;
use crate::engine::{DecideOp, Decision, DecisionRequest, Finish, Outcome};
use crate::metrics::GatewayMetrics;
use config::{Checked, Upstream};

/// The gateway's state: the daemon's (engine, tokens, clock) and its own.
pub struct Gateway {
    st: Arc<AppState>,
    cfg: Checked,
    http: reqwest::Client,
    metrics: Arc<GatewayMetrics>,
}

/// Which endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Embeddings,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Chat => "chat/completions",
            Kind::Embeddings => "embeddings",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Chat => "chat",
            Kind::Embeddings => "embeddings",
        }
    }
}

/// The gateway's router.
pub fn router(st: Arc<AppState>, cfg: Checked, metrics: Arc<GatewayMetrics>) -> Result<Router, String> {
    let http = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| format!("cannot build the gateway's HTTP client: {e}"))?;
    let limit = cfg.max_body_bytes;
    let gw = Arc::new(Gateway { st, cfg, http, metrics });
    Ok(Router::new()
        .route(
            "/v1/chat/completions",
            post(|State(g), h, b| counted(g, Kind::Chat, h, b)),
        )
        .route(
            "/v1/embeddings",
            post(|State(g), h, b| counted(g, Kind::Embeddings, h, b)),
        )
        .fallback(|| async {
            oai_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found",
                "the gateway serves POST /v1/chat/completions and POST /v1/embeddings",
            )
        })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(gw))
}

/// An error in OpenAI's shape, which their SDKs read.
fn oai_error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// A quotad error, in OpenAI's shape.
fn from_api(e: ApiError) -> Response {
    let (status, code) = e.status_and_code();
    let kind = match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_exceeded",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    };
    let mut r = oai_error(status, kind, code, &e.to_string());
    if let ApiError::NoLeader(_) = e {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// Appended to a call's idempotency key for the hold of its degraded model.
const DEGRADED_SUFFIX: &str = ":degraded";

/// An answer that ends a call early (boxed: a `Response` is large).
type Refused = Box<Response>;

fn invalid(message: impl Into<String>) -> Refused {
    Box::new(oai_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "invalid_request",
        &message.into(),
    ))
}

fn refused(e: ApiError) -> Refused {
    Box::new(from_api(e))
}

/// What was asked: the parsed body and what the reservation needs.
struct Asked {
    /// The request body: a JSON object.
    body: Value,
    model: String,
    subject: String,
    stream: bool,
    /// The caller asked for the usage chunk itself.
    wants_usage: bool,
    priority: Option<Priority>,
    wait_ms: u64,
    idempotency_key: Option<String>,
    /// The caller's token: a cluster follower asks the leader with it.
    authorization: Option<HeaderValue>,
}

impl Gateway {
    fn asked(&self, kind: Kind, headers: &HeaderMap, bytes: &[u8], max_priority: Priority) -> Result<Asked, Refused> {
        let body: serde_json::Map<String, Value> = serde_json::from_slice(bytes)
            .map_err(|e| invalid(format!("the request body is not a JSON object: {e}")))?;
        let body = Value::Object(body);
        let model = match body.get("model") {
            Some(Value::String(m)) if !m.is_empty() && m.len() <= 256 => m.clone(),
            _ => return Err(invalid("model: required, a model name")),
        };
        let header = self.cfg.subject_header.as_str();
        let subject = single(headers, header)
            .map_err(refused)?
            .filter(|s| !s.is_empty())
            .ok_or_else(|| invalid(format!("the {header} header is required: it names who is charged")))?;
        crate::api::check_text(&format!("{header} header"), subject, crate::api::bounds::SUBJECT_BYTES)
            .map_err(refused)?;
        let stream = kind == Kind::Chat && body.get("stream") == Some(&Value::Bool(true));
        let wants_usage = body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let (priority, wait_ms) = waiting_headers(&self.st, headers, max_priority).map_err(refused)?;
        single(headers, "idempotency-key").map_err(refused)?;
        let idempotency_key = crate::api::idempotency_key(headers, None).map_err(refused)?;
        // A degraded call is held again under "<key>:degraded": room for it.
        if idempotency_key
            .as_ref()
            .is_some_and(|k| k.len() + DEGRADED_SUFFIX.len() > crate::api::bounds::IDEMPOTENCY_KEY_BYTES)
        {
            return Err(invalid(format!(
                "the Idempotency-Key header is longer than {} bytes, the most the gateway takes",
                crate::api::bounds::IDEMPOTENCY_KEY_BYTES - DEGRADED_SUFFIX.len()
            )));
        }
        Ok(Asked {
            body,
            model,
            subject: subject.to_string(),
            stream,
            wants_usage,
            priority,
            wait_ms,
            idempotency_key,
            authorization: headers.get(header::AUTHORIZATION).cloned(),
        })
    }

    /// The upstream that serves `model`.
    fn upstream(&self, model: &str) -> Option<&Upstream> {
        self.cfg.upstreams.iter().find(|u| u.serves(model))
    }

    /// The amounts to hold, of the metrics the policy knows (others would
    /// be refused as unknown).
    fn amounts(&self, input: u64, output: u64) -> Result<BTreeMap<String, u64>, Refused> {
        let policy = self.st.engine().map_err(refused)?.policy();
        let mut a = BTreeMap::new();
        for (metric, v) in [
            ("input_tokens", input),
            ("output_tokens", output),
            ("tokens", input + output),
        ] {
            if policy.metrics.contains(metric) {
                a.insert(metric.to_string(), v);
            }
        }
        Ok(a)
    }

    /// Reserves for `asked` on `upstream` with `model`'s tokens counted.
    async fn reserve(
        &self,
        kind: Kind,
        asked: &Asked,
        upstream: &Upstream,
        model: &str,
        key: Option<String>,
    ) -> Result<(Decision, u64), Refused> {
        let input = match kind {
            Kind::Chat => tokens::count_chat(model, &asked.body),
            Kind::Embeddings => tokens::count_embeddings(model, &asked.body),
        };
        let output = match kind {
            Kind::Embeddings => 0,
            Kind::Chat => ["max_completion_tokens", "max_tokens"]
                .iter()
                .find_map(|k| asked.body.get(*k).and_then(Value::as_u64))
                .unwrap_or(self.cfg.default_max_output_tokens),
        };
        let mut attributes = BTreeMap::new();
        attributes.insert("model".to_string(), model.to_string());
        attributes.insert("upstream".to_string(), upstream.name.to_string());
        let req = DecisionRequest {
            subject: asked.subject.clone(),
            event: Some(upstream.event.clone()),
            attributes,
            amounts: self.amounts(input, output)?,
            idempotency_key: key,
            ttl_ms: None,
            priority: asked.priority,
        };
        let d = decide_call(
            &self.st,
            DecideOp::Reserve,
            req,
            asked.wait_ms,
            asked.authorization.as_ref(),
        )
        .await
        .map_err(refused)?;
        Ok((d, input))
    }

    /// Gives a hold back; a failure is logged (the hold expires by itself).
    async fn release(&self, id: &str, authorization: Option<&HeaderValue>) {
        if let Err(e) = finish_call(&self.st, id, Finish::Release, authorization).await {
            tracing::warn!(reservation = id, error = %e, "the gateway could not release a hold; it expires by itself");
        }
    }

    /// Charges what the upstream reported: (prompt, completion) tokens, or
    /// without a report what was held.
    async fn commit(
        &self,
        id: &str,
        authorization: Option<&HeaderValue>,
        usage: Option<(u64, u64)>,
    ) -> Option<crate::engine::FinishAnswer> {
        let amounts = match usage {
            Some((input, output)) => self.amounts(input, output).ok()?,
            None => BTreeMap::new(),
        };
        match finish_call(&self.st, id, Finish::Commit(amounts), authorization).await {
            Ok(a) => {
                if let Some((input, output)) = usage {
                    self.metrics.tokens(input, output);
                }
                Some(a)
            }
            Err(e) => {
                tracing::warn!(reservation = id, error = %e, "the gateway could not commit a call's usage");
                None
            }
        }
    }
}

/// A denial in OpenAI's shape, with `Retry-After` and the rate headers.
fn denied(d: &Decision) -> Response {
    let reason = d
        .reasons
        .iter()
        .find(|r| r.code != crate::engine::ReasonCode::Degraded)
        .or(d.reasons.first());
    let code = reason
        .and_then(|r| {
            serde_json::to_value(r.code)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
        })
        .unwrap_or_else(|| "denied".into());
    let limit = reason.and_then(|r| r.limit.as_deref()).unwrap_or("a limit");
    let message = match d.retry_after_ms {
        Some(ms) => format!(
            "{} is over {limit} ({code}); retry in {} s",
            d.subject,
            ms.div_ceil(1000)
        ),
        None => format!("{} is over {limit} ({code})", d.subject),
    };
    let mut r = oai_error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", &code, &message);
    r.headers_mut().extend(rate_headers(d));
    r.headers_mut()
        .insert("x-quotad-decision", HeaderValue::from_static(d.decision.as_str()));
    r
}

/// The headers every forwarded answer carries.
fn quotad_headers(d: &Decision, id: &str, cost_micros: Option<u64>) -> HeaderMap {
    let mut h = rate_headers(d);
    h.insert("x-quotad-decision", HeaderValue::from_static(d.decision.as_str()));
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert("x-quotad-reservation", v);
    }
    if let Some(c) = cost_micros {
        h.insert("x-quotad-cost-micros", HeaderValue::from(c));
    }
    h
}

/// `usage` of an answer: (prompt, completion) tokens.
fn usage_of(v: &Value) -> Option<(u64, u64)> {
    let u = v.get("usage")?;
    let prompt = u.get("prompt_tokens")?.as_u64()?;
    let completion = u.get("completion_tokens").and_then(Value::as_u64).unwrap_or(0);
    Some((prompt, completion))
}

/// A call, counted in `quotad_gateway_calls_total` by how it ended.
async fn counted(gw: Arc<Gateway>, kind: Kind, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let r = call(gw.clone(), kind, headers, body).await;
    let status = r.status();
    let result = if status.is_success() {
        "forwarded"
    } else if r.headers().contains_key("x-quotad-reservation") || status == StatusCode::BAD_GATEWAY {
        // Held, then the upstream failed: the hold went back.
        "upstream_error"
    } else if status == StatusCode::TOO_MANY_REQUESTS && r.headers().contains_key("x-quotad-decision") {
        "denied"
    } else if status == StatusCode::SERVICE_UNAVAILABLE {
        // quotad could not decide: shutting down, storage, no leader.
        "unavailable"
    } else {
        "refused"
    };
    gw.metrics.call(kind.label(), result);
    r
}

async fn call(gw: Arc<Gateway>, kind: Kind, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let grant = match gw.st.authorize(&headers, Role::Client) {
        Ok(g) => g,
        Err(e) => return from_api(e),
    };
    let bytes = match body {
        Ok(b) => b,
        Err(e) => {
            return oai_error(
                e.status(),
                "invalid_request_error",
                "invalid_request",
                &format!("the request body could not be read: {e} (gateway.max_body_bytes)"),
            )
        }
    };
    let mut asked = match gw.asked(kind, &headers, &bytes, grant.max_priority) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let Some(upstream) = gw.upstream(&asked.model) else {
        return oai_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            &format!(
                "no upstream serves the model {:?} (gateway.upstreams[].models)",
                asked.model
            ),
        );
    };
    let (mut decision, mut input) = match gw
        .reserve(kind, &asked, upstream, &asked.model, asked.idempotency_key.clone())
        .await
    {
        Ok(d) => d,
        Err(r) => return *r,
    };
    if !decision.allowed {
        return denied(&decision);
    }
    // Degraded: the call goes to the cheaper model, and is held and charged
    // as that model (its prices and limits), not as the one asked for.
    if decision.decision == Outcome::Degrade {
        if let Some(to) = upstream.degrade_to.get(&asked.model).cloned() {
            if let Some(id) = decision.reservation_id.clone() {
                gw.release(&id, asked.authorization.as_ref()).await;
            }
            let key = asked.idempotency_key.as_ref().map(|k| format!("{k}{DEGRADED_SUFFIX}"));
            match gw.reserve(kind, &asked, upstream, &to, key).await {
                Ok((d, i)) if d.allowed => {
                    decision = Decision {
                        decision: Outcome::Degrade,
                        ..d
                    };
                    input = i;
                }
                Ok((d, _)) => return denied(&d),
                Err(r) => return *r,
            }
            asked.body["model"] = Value::String(to.clone());
            asked.model = to;
        }
    }
    let Some(id) = decision.reservation_id.clone() else {
        return oai_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "internal",
            "the reservation has no id",
        );
    };
    if asked.stream {
        // Ask for the usage chunk: it is what the commit charges.
        match asked.body.get_mut("stream_options") {
            Some(Value::Object(o)) => {
                o.insert("include_usage".into(), Value::Bool(true));
            }
            _ => asked.body["stream_options"] = json!({"include_usage": true}),
        }
    }
    let url = format!("{}/{}", upstream.base_url, kind.path());
    let mut req = gw
        .http
        .post(&url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(asked.body.to_string());
    if !asked.stream {
        req = req.timeout(gw.cfg.upstream_timeout);
    }
    if let Some(k) = &upstream.api_key {
        req = req.bearer_auth(k);
    }
    // A stream's timeout covers its headers only: the answer may run long.
    let started = std::time::Instant::now();
    let sent = if asked.stream {
        match tokio::time::timeout(gw.cfg.upstream_timeout, req.send()).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", gw.cfg.upstream_timeout)),
        }
    } else {
        req.send().await.map_err(|e| e.to_string())
    };
    let resp = match sent {
        Ok(r) => {
            gw.metrics.upstream(&upstream.name, started.elapsed());
            r
        }
        Err(e) => {
            gw.release(&id, asked.authorization.as_ref()).await;
            tracing::warn!(upstream = %upstream.name, error = %e, "the upstream could not be reached");
            return oai_error(
                StatusCode::BAD_GATEWAY,
                "api_error",
                "upstream_unreachable",
                &format!(
                    "the upstream {:?} could not be reached; nothing was charged",
                    upstream.name
                ),
            );
        }
    };
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = resp.headers().get(reqwest::header::CONTENT_TYPE).cloned();
    let is_sse = content_type
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/event-stream"));
    if status.is_success() && asked.stream && is_sse {
        let held_cost = decision.cost.as_ref().map(|c| c.amount_micros);
        let mut headers = quotad_headers(&decision, &id, held_cost);
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        let body = stream::metered(
            gw.clone(),
            resp,
            stream::Tally::new(
                id,
                asked.authorization.clone(),
                asked.model.clone(),
                input,
                asked.wants_usage,
            ),
        );
        return (status, headers, Body::from_stream(body)).into_response();
    }
    let bytes = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => {
            gw.release(&id, asked.authorization.as_ref()).await;
            tracing::warn!(upstream = %upstream.name, error = %e, "the upstream's answer was cut off");
            return oai_error(
                StatusCode::BAD_GATEWAY,
                "api_error",
                "upstream_failed",
                &format!(
                    "the upstream {:?} stopped before it answered; nothing was charged",
                    upstream.name
                ),
            );
        }
    };
    if !status.is_success() {
        gw.release(&id, asked.authorization.as_ref()).await;
        let mut r = (status, bytes).into_response();
        if let Some(ct) = content_type {
            r.headers_mut().insert(header::CONTENT_TYPE, ct);
        }
        r.headers_mut().extend(quotad_headers(&decision, &id, None));
        return r;
    }
    let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
    let answer = gw
        .commit(&id, asked.authorization.as_ref(), parsed.as_ref().and_then(usage_of))
        .await;
    let cost = answer.as_ref().and_then(|a| a.cost.as_ref()).map(|c| c.amount_micros);
    let mut r = (status, bytes).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or(HeaderValue::from_static("application/json")),
    );
    r.headers_mut().extend(quotad_headers(&decision, &id, cost));
    r
}
