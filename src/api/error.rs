//! `ApiError`: the one place that maps failures to HTTP status codes and the
//! `{"error":{"code","message"}}` body that docs/api.md describes.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::engine::EngineError;

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400: malformed or out-of-range input; the message names the field.
    #[error("{0}")]
    InvalidRequest(String),
    /// 400: a metric nobody declared.
    #[error("{0}")]
    UnknownMetric(String),
    /// 400: the call carries priced metrics but no price matches it.
    #[error("{0}")]
    Unpriced(String),
    /// 401: no or unknown token.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: the token's role may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// 404 with one of the unknown_* codes.
    #[error("{1}")]
    NotFound(&'static str, String),
    /// 405.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409 with idempotency_conflict or reservation_finished.
    #[error("{1}")]
    Conflict(&'static str, String),
    /// 413.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 408: the body did not arrive in time.
    #[error("{0}")]
    RequestTimeout(String),
    /// 412: `If-Match` names another version than the one in force.
    #[error("{0}")]
    PreconditionFailed(String),
    /// 400 `invalid_policy`: the policy fails validation; the message names the path.
    #[error("{0}")]
    InvalidPolicy(String),
    /// 503: storage failed or shutting down; nothing was applied.
    #[error("{0}")]
    Unavailable(String),
    /// 503 with `Retry-After`: too many of this kind of request run at once.
    #[error("{0}")]
    Busy(String, u64),
    /// 503 `no_leader` with `Retry-After`: a cluster node knows no leader
    /// that takes the request now.
    #[error("{0}")]
    NoLeader(String),
}

impl ApiError {
    /// HTTP status and the `code` string.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::UnknownMetric(_) => (StatusCode::BAD_REQUEST, "unknown_metric"),
            ApiError::Unpriced(_) => (StatusCode::BAD_REQUEST, "unpriced"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(code, _) => (StatusCode::NOT_FOUND, code),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Conflict(code, _) => (StatusCode::CONFLICT, code),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::PreconditionFailed(_) => (StatusCode::PRECONDITION_FAILED, "version_mismatch"),
            ApiError::InvalidPolicy(_) => (StatusCode::BAD_REQUEST, "invalid_policy"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Busy(..) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            ApiError::NoLeader(_) => (StatusCode::SERVICE_UNAVAILABLE, "no_leader"),
        }
    }

    /// Shorthand for a 400 naming a field.
    pub fn invalid(field: &str, problem: impl std::fmt::Display) -> ApiError {
        ApiError::InvalidRequest(format!("{field}: {problem}"))
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let msg = e.to_string();
        match e {
            EngineError::UnknownSubject(_) => ApiError::NotFound("unknown_subject", msg),
            EngineError::UnknownPlan(_) => ApiError::NotFound("unknown_plan", msg),
            EngineError::UnknownLimit(_) => ApiError::NotFound("unknown_limit", msg),
            EngineError::UnknownReservation(_) => ApiError::NotFound("unknown_reservation", msg),
            EngineError::ReservationFinished(_) => ApiError::Conflict("reservation_finished", msg),
            EngineError::IdempotencyConflict(_) => ApiError::Conflict("idempotency_conflict", msg),
            EngineError::UnknownMetric(..) => ApiError::UnknownMetric(msg),
            EngineError::Unpriced(_) => ApiError::Unpriced(msg),
            EngineError::InvalidRequest(_) => ApiError::InvalidRequest(msg),
            EngineError::Unavailable(_) => ApiError::Unavailable(msg),
            EngineError::RequestInProgress(_) => ApiError::Conflict("request_in_progress", msg),
            EngineError::UnknownBreaker(..) => ApiError::NotFound("unknown_breaker", msg),
            EngineError::UnknownAnomaly(..) => ApiError::NotFound("unknown_anomaly", msg),
            EngineError::VersionMismatch { .. } => ApiError::PreconditionFailed(msg),
            EngineError::PlanInUse(_) => ApiError::Conflict("plan_in_use", msg),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let body = json!({"error": {"code": code, "message": self.to_string()}});
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        }
        if let ApiError::Busy(_, retry_after_s) = self {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from(retry_after_s));
        }
        if let ApiError::NoLeader(_) = self {
            resp.headers_mut().insert("retry-after", HeaderValue::from(1));
        }
        resp
    }
}
