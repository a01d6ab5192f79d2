//! `/v1/authorize`: forward-auth for proxies (nginx `auth_request`, Traefik
//! ForwardAuth, Envoy `ext_authz` over HTTP). The call is described by
//! headers, not a body, because that is all these proxies send: it consumes,
//! and the answer is a status a proxy understands (204 allowed, 429 or the
//! asked `deny_status` denied) with the `X-RateLimit-*` headers.
//!
//! Any method is taken: Traefik and Envoy send the original request's. Under
//! `/v1/authorize/...` the rest of the path and the query belong to the
//! original request (Envoy appends them to its `path_prefix`) and are ignored.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::{
    bounds, check_amounts, check_attribute, check_text, check_wait, decide_request, form_urlencoded_pairs,
    idempotency_key, rate_headers, settle, ApiError, AppState,
};
use crate::config::Role;
use crate::engine::policy::Priority;
use crate::engine::{DecideOp, DecisionRequest};

const SUBJECT: &str = "x-quotad-subject";
const EVENT: &str = "x-quotad-event";
const ATTRIBUTE: &str = "x-quotad-attribute-";
const AMOUNT: &str = "x-quotad-amount-";
const PRIORITY: &str = "x-quotad-priority";
const WAIT: &str = "x-quotad-wait-ms";

/// `GET|POST|… /v1/authorize[/…]`.
pub(super) async fn authorize(
    State(st): State<Arc<AppState>>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let grant = st.authorize(&headers, Role::Client)?;
    let deny_status = if uri.path() == "/v1/authorize" {
        deny_status(uri.query().unwrap_or(""))?
    } else {
        StatusCode::TOO_MANY_REQUESTS
    };
    let (req, wait_ms) = request(&st, &headers, grant.max_priority)?;
    let decided = decide_request(&st, DecideOp::Consume, req, wait_ms)?;
    let d = settle(&st, DecideOp::Consume, decided).await?;
    let mut h = rate_headers(&d);
    h.insert("x-quotad-decision", HeaderValue::from_static(d.decision.as_str()));
    if d.allowed {
        return Ok((StatusCode::NO_CONTENT, h).into_response());
    }
    Ok((deny_status, h, super::json_response(&d, 512)).into_response())
}

/// `?deny_status=`: 429 unless asked otherwise. nginx's `auth_request`
/// treats any answer but 2xx, 401 and 403 as an error of its own.
fn deny_status(query: &str) -> Result<StatusCode, ApiError> {
    let mut status = StatusCode::TOO_MANY_REQUESTS;
    for (k, v) in form_urlencoded_pairs(query)? {
        match k.as_str() {
            "deny_status" => {
                status = match v.as_str() {
                    "429" => StatusCode::TOO_MANY_REQUESTS,
                    "403" => StatusCode::FORBIDDEN,
                    "401" => StatusCode::UNAUTHORIZED,
                    _ => {
                        return Err(ApiError::invalid(
                            "deny_status",
                            format!("{v:?} is not one of 429, 403, 401"),
                        ))
                    }
                }
            }
            _ => {
                return Err(ApiError::invalid(
                    &k,
                    "is not a query parameter of /v1/authorize (it takes deny_status)",
                ))
            }
        }
    }
    Ok(status)
}

/// A header's value as text, or a 400 naming the header.
fn text<'h>(name: &str, v: &'h HeaderValue) -> Result<&'h str, ApiError> {
    std::str::from_utf8(v.as_bytes()).map_err(|_| ApiError::invalid(&format!("{name} header"), "is not UTF-8 text"))
}

/// The one value of header `name`, if sent; twice is a 400.
pub(crate) fn single<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, ApiError> {
    let mut values = headers.get_all(name).iter();
    let Some(v) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(ApiError::invalid(
            &format!("{name} header"),
            "is sent more than once; send it once",
        ));
    }
    text(name, v).map(Some)
}

/// `x-quotad-priority` (up to the token's `max_priority`) and
/// `x-quotad-wait-ms` (up to `engine.max_wait_ms`): how a call described by
/// headers waits. Shared with the gateway.
pub(crate) fn waiting_headers(
    st: &AppState,
    headers: &HeaderMap,
    max_priority: Priority,
) -> Result<(Option<Priority>, u64), ApiError> {
    let priority = match single(headers, PRIORITY)? {
        None => None,
        Some(p) => {
            let p: Priority = serde_json::from_value(serde_json::Value::String(p.to_string())).map_err(|_| {
                ApiError::invalid(
                    &format!("{PRIORITY} header"),
                    format!("{p:?} is not one of low, normal, high, critical"),
                )
            })?;
            if p > max_priority {
                return Err(ApiError::Forbidden(format!(
                    "{PRIORITY}: {:?} is above what this token may ask for ({:?}, its max_priority in [[auth.tokens]])",
                    p.as_str(),
                    max_priority.as_str()
                )));
            }
            Some(p)
        }
    };
    let wait_ms = match single(headers, WAIT)? {
        None => 0,
        Some(w) => {
            let w: u64 = w.trim().parse().map_err(|_| {
                ApiError::invalid(&format!("{WAIT} header"), format!("{w:?} is not a whole number of ms"))
            })?;
            check_wait(st, &format!("{WAIT} header"), w)?
        }
    };
    Ok((priority, wait_ms))
}

/// The consume the headers describe, and how long it may wait.
fn request(st: &AppState, headers: &HeaderMap, max_priority: Priority) -> Result<(DecisionRequest, u64), ApiError> {
    let subject = single(headers, SUBJECT)?
        .ok_or_else(|| ApiError::invalid(&format!("{SUBJECT} header"), "is required: it names who is charged"))?;
    check_text(&format!("{SUBJECT} header"), subject, bounds::SUBJECT_BYTES)?;
    let event = single(headers, EVENT)?;
    if let Some(e) = event {
        check_text(&format!("{EVENT} header"), e, bounds::EVENT_BYTES)?;
    }
    let mut attributes = BTreeMap::new();
    let mut amounts = BTreeMap::new();
    for name in headers.keys() {
        // Header names arrive lowercase: so are attribute and metric names.
        let n = name.as_str();
        if let Some(key) = n.strip_prefix(ATTRIBUTE) {
            let v = single(headers, n)?.unwrap_or_default();
            check_attribute(&format!("{n} header"), key, v)?;
            attributes.insert(key.to_string(), v.to_string());
        } else if let Some(metric) = n.strip_prefix(AMOUNT) {
            let v = single(headers, n)?.unwrap_or_default();
            let amount: u64 = v
                .trim()
                .parse()
                .map_err(|_| ApiError::invalid(&format!("{n} header"), format!("{v:?} is not a whole number")))?;
            amounts.insert(metric.to_string(), amount);
        }
    }
    if attributes.len() > bounds::ATTRIBUTES {
        return Err(ApiError::invalid(
            "x-quotad-attribute-* headers",
            format!("at most {} of them, got {}", bounds::ATTRIBUTES, attributes.len()),
        ));
    }
    check_amounts("x-quotad-amount-* headers", &amounts)?;
    let (priority, wait_ms) = waiting_headers(st, headers, max_priority)?;
    let req = DecisionRequest {
        subject: subject.to_string(),
        event: event.map(str::to_string),
        attributes,
        amounts,
        idempotency_key: idempotency_key(headers, None)?,
        ttl_ms: None,
        priority,
    };
    Ok((req, wait_ms))
}
