//! Envoy's rate limit service over gRPC
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`), for
//! Envoy's `ratelimit` HTTP filter (`rate_limit_service` in its config).
//!
//! A request's `domain` is the event; each descriptor is one consume: its
//! entry named `[gateway] grpc_subject_key` (default `subject`) is the
//! subject, its other entries are attributes, and its `hits_addend` (else the
//! request's, else 1) is the `requests` amount. A `hits_addend` of 0 on a
//! descriptor checks without charging. Each descriptor is decided on its
//! own, in order; the answer is `OVER_LIMIT` when any is denied, and every
//! status carries the binding limit's figures. Like the HTTP API it decides
//! through [`crate::api::decide_call`].

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::api::{binding_counter, bounds, check_attribute, check_text, decide_call, ApiError, AppState};
use crate::config::Role;
use crate::engine::policy::MaxValue;
use crate::engine::{DecideOp, Decision, DecisionRequest};
use crate::metrics::GatewayMetrics;
use crate::period::{Period, Unit as PeriodUnit};

/// Envoy's protos, compiled by the build script (`src/gateway/build.rs`).
#[allow(clippy::all, missing_docs, rustdoc::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/envoy_rls.rs"));
}

use pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus, RateLimit};
use pb::envoy::service::ratelimit::v3::rate_limit_service_server::{RateLimitService, RateLimitServiceServer};
use pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};

/// Descriptors in one request at most: each is a decision.
const MAX_DESCRIPTORS: usize = 64;

/// The service.
pub struct Rls {
    st: Arc<AppState>,
    subject_key: String,
    metrics: Arc<GatewayMetrics>,
}

/// The gRPC service over the daemon's state.
pub fn service(st: Arc<AppState>, subject_key: String, metrics: Arc<GatewayMetrics>) -> RateLimitServiceServer<Rls> {
    RateLimitServiceServer::new(Rls {
        st,
        subject_key,
        metrics,
    })
}

/// A quotad error as a gRPC status. Envoy treats any error per its
/// `failure_mode_deny` setting; the message says what was wrong.
fn status_of(e: ApiError) -> Status {
    let message = e.to_string();
    match e {
        ApiError::Unauthorized(_) => Status::unauthenticated(message),
        ApiError::Forbidden(_) => Status::permission_denied(message),
        ApiError::Unavailable(_) | ApiError::NoLeader(_) | ApiError::Busy(..) => Status::unavailable(message),
        ApiError::RequestTimeout(_) => Status::deadline_exceeded(message),
        ApiError::InvalidRequest(_) | ApiError::UnknownMetric(_) | ApiError::Unpriced(_) => {
            Status::invalid_argument(message)
        }
        _ => match e.status_and_code().0.as_u16() {
            400..=499 => Status::failed_precondition(message),
            _ => Status::internal(message),
        },
    }
}

fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

#[tonic::async_trait]
impl RateLimitService for Rls {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let answer = self.decide(request).await;
        if answer.is_err() {
            self.metrics.rls_error();
        }
        answer
    }
}

impl Rls {
    async fn decide(&self, request: Request<RateLimitRequest>) -> Result<Response<RateLimitResponse>, Status> {
        // Envoy sends a token as `initial_metadata` of its grpc_service.
        let headers = request.metadata().clone().into_headers();
        self.st.authorize(&headers, Role::Client).map_err(status_of)?;
        let authorization = headers.get(http::header::AUTHORIZATION);
        let req = request.into_inner();
        let decisions = self.requests(&req)?;
        let mut statuses = Vec::with_capacity(decisions.len());
        let mut over = false;
        for (op, one) in decisions {
            let d = decide_call(&self.st, op, one, 0, authorization)
                .await
                .map_err(status_of)?;
            over |= !d.allowed;
            statuses.push(self.status(&d));
        }
        for s in &statuses {
            self.metrics.rls_descriptor(s.code == Code::OverLimit as i32);
        }
        let overall = if over { Code::OverLimit } else { Code::Ok };
        Ok(Response::new(RateLimitResponse {
            overall_code: overall as i32,
            statuses,
            ..Default::default()
        }))
    }

    /// The decisions a request asks for, each checked; a bad one refuses the
    /// whole request before anything is charged.
    fn requests(&self, req: &RateLimitRequest) -> Result<Vec<(DecideOp, DecisionRequest)>, Status> {
        let domain = req.domain.as_str();
        if domain.is_empty() {
            return Err(invalid("domain", "is required: it is the event counted"));
        }
        check_text("domain", domain, bounds::EVENT_BYTES).map_err(status_of)?;
        if req.descriptors.is_empty() {
            return Err(invalid("descriptors", "has none; send at least one"));
        }
        if req.descriptors.len() > MAX_DESCRIPTORS {
            return Err(invalid(
                "descriptors",
                format!("at most {MAX_DESCRIPTORS} per request, got {}", req.descriptors.len()),
            ));
        }
        let request_hits = match req.hits_addend {
            0 => 1,
            n => u64::from(n),
        };
        let mut out = Vec::with_capacity(req.descriptors.len());
        for (i, d) in req.descriptors.iter().enumerate() {
            let at = |what: &str| format!("descriptors[{i}].{what}");
            if d.is_negative_hits {
                return Err(invalid(
                    &at("is_negative_hits"),
                    "giving hits back is not supported; quotad refunds through a reservation's release",
                ));
            }
            let mut subject = None;
            let mut attributes = BTreeMap::new();
            for (j, e) in d.entries.iter().enumerate() {
                let field = at(&format!("entries[{j}]"));
                if e.key == self.subject_key {
                    if subject.is_some() {
                        return Err(invalid(
                            &field,
                            format!("a second {:?} entry; send one", self.subject_key),
                        ));
                    }
                    check_text(&field, &e.value, bounds::SUBJECT_BYTES).map_err(status_of)?;
                    subject = Some(e.value.clone());
                } else {
                    check_attribute(&field, &e.key, &e.value).map_err(status_of)?;
                    if attributes.insert(e.key.clone(), e.value.clone()).is_some() {
                        return Err(invalid(&field, format!("the key {:?} appears twice", e.key)));
                    }
                }
            }
            let Some(subject) = subject.filter(|s| !s.is_empty()) else {
                return Err(invalid(
                    &at("entries"),
                    format!(
                        "has no {:?} entry: it names who is charged (gateway.grpc_subject_key)",
                        self.subject_key
                    ),
                ));
            };
            if attributes.len() > bounds::ATTRIBUTES {
                return Err(invalid(
                    &at("entries"),
                    format!("at most {} entries besides the subject", bounds::ATTRIBUTES),
                ));
            }
            let hits = d.hits_addend.unwrap_or(request_hits);
            if hits > crate::engine::policy::MAX_SAFE_INTEGER {
                return Err(invalid(&at("hits_addend"), "is above 2^53-1"));
            }
            // 0 hits: Envoy's way to ask without counting.
            let op = if hits == 0 { DecideOp::Check } else { DecideOp::Consume };
            let amounts = BTreeMap::from([("requests".to_string(), hits.max(1))]);
            out.push((
                op,
                DecisionRequest {
                    subject,
                    event: Some(domain.to_string()),
                    attributes,
                    amounts,
                    idempotency_key: None,
                    ttl_ms: None,
                    priority: None,
                },
            ));
        }
        Ok(out)
    }

    /// A descriptor's status: its code and the binding limit's figures.
    fn status(&self, d: &Decision) -> DescriptorStatus {
        let code = if d.allowed { Code::Ok } else { Code::OverLimit };
        let mut s = DescriptorStatus {
            code: code as i32,
            ..Default::default()
        };
        let Some(c) = binding_counter(d) else { return s };
        if let MaxValue::Finite(max) = c.max {
            s.current_limit = Some(RateLimit {
                name: c.limit.to_string(),
                requests_per_unit: u32::try_from(max).unwrap_or(u32::MAX),
                unit: self.unit(&c.limit) as i32,
            });
        }
        s.limit_remaining = c.remaining.map_or(u32::MAX, |r| u32::try_from(r).unwrap_or(u32::MAX));
        if let Some(at) = c.resets_at {
            let ms = at.saturating_sub(self.st.now());
            s.duration_until_reset = Some(prost_types::Duration {
                seconds: (ms / 1000) as i64,
                nanos: ((ms % 1000) * 1_000_000) as i32,
            });
        }
        s
    }

    /// Envoy's unit for a limit's period: one of its units, else UNKNOWN
    /// (a period of "15m", or a lifetime limit).
    fn unit(&self, limit: &str) -> Unit {
        let Ok(engine) = self.st.engine() else {
            return Unit::Unknown;
        };
        let policy = engine.policy();
        let Some(period) = policy.shapes.get(limit).and_then(|s| s.period.as_deref()) else {
            return Unit::Unknown;
        };
        match Period::parse(period) {
            Ok(Period { count: 1, unit }) => match unit {
                PeriodUnit::Second => Unit::Second,
                PeriodUnit::Minute => Unit::Minute,
                PeriodUnit::Hour => Unit::Hour,
                PeriodUnit::Day => Unit::Day,
                PeriodUnit::Week => Unit::Week,
                PeriodUnit::Month => Unit::Month,
                PeriodUnit::Millisecond => Unit::Unknown,
            },
            _ => Unit::Unknown,
        }
    }
}
