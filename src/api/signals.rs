//! Signals over HTTP: the event log (`GET /v1/events`, the SSE stream),
//! webhook status, circuit breakers (list, open, close) and anomaly flags
//! (list, clear). All admin.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{body_bytes, check_text, form_urlencoded_pairs, parse, subject_answer, subject_path, ApiError, AppState};
use crate::config::Role;
use crate::engine::signals::EVENT_TYPES;
use crate::engine::{BreakerView, FlagView};
use crate::events::{type_matches, FeedEvent};
use crate::period::rfc3339;

/// Events per page at most.
const EVENTS_LIMIT: usize = 1000;
/// An idle stream sends a comment this often, so proxies keep it open.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// Checks an event type filter: an exact type, a prefix ending in `*`, or `*`.
fn type_filter(v: &str) -> Result<String, ApiError> {
    if !EVENT_TYPES.iter().any(|t| type_matches(v, t)) {
        return Err(ApiError::invalid(
            "type",
            format!(
                "{v:?} matches no event type; use one of {} or a prefix such as breaker.*",
                EVENT_TYPES.join(", ")
            ),
        ));
    }
    Ok(v.to_string())
}

/// The admin lists without parameters (webhooks, breakers, anomalies): an
/// admin token, and no query parameter (said, not ignored).
fn admin_list(st: &AppState, headers: &HeaderMap, q: Option<&str>) -> Result<(), ApiError> {
    st.authorize(headers, Role::Admin)?;
    match form_urlencoded_pairs(q.unwrap_or(""))?.into_iter().next() {
        Some((k, _)) => Err(ApiError::invalid(
            &k,
            "unknown query parameter; this endpoint takes none",
        )),
        None => Ok(()),
    }
}

fn seq_param(field: &str, v: &str) -> Result<u64, ApiError> {
    v.trim()
        .parse()
        .map_err(|_| ApiError::invalid(field, format!("{v:?} is not an event seq (a whole number, 0 or more)")))
}

#[derive(Serialize)]
struct EventsPage {
    events: Vec<Box<RawValue>>,
    next_after: u64,
    /// With `order=desc`: the seq to page back from (`null` at the oldest).
    #[serde(skip_serializing_if = "Option::is_none")]
    next_before: Option<Option<u64>>,
}

fn raw(e: &FeedEvent) -> Result<Box<RawValue>, ApiError> {
    RawValue::from_string(e.json.to_string())
        .map_err(|_| ApiError::Unavailable(format!("event {} in the event log is damaged", e.seq)))
}

/// `GET /v1/events?after=&limit=&type=`, or newest first with
/// `order=desc&before=`.
pub(super) async fn list_events(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    let (mut after, mut before, mut limit, mut pattern, mut desc) = (None, None, 100usize, "*".to_string(), false);
    for (k, v) in form_urlencoded_pairs(q.as_deref().unwrap_or(""))? {
        match k.as_str() {
            "after" => after = Some(seq_param("after", &v)?),
            "before" => before = Some(seq_param("before", &v)?),
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=EVENTS_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid("limit", format!("must be a whole number from 1 to {EVENTS_LIMIT}"))
                    })?
            }
            "type" => pattern = type_filter(&v)?,
            "order" => {
                desc = match v.as_str() {
                    "asc" => false,
                    "desc" => true,
                    _ => return Err(ApiError::invalid("order", format!("{v:?} is not asc or desc"))),
                }
            }
            other => {
                return Err(ApiError::invalid(
                    other,
                    "unknown query parameter; use after, before, limit, order and type",
                ));
            }
        }
    }
    let feed = &st.core()?.feed;
    let unreadable = |e| ApiError::Unavailable(format!("cannot read the event log: {e}"));
    if desc {
        if after.is_some() {
            return Err(ApiError::invalid(
                "after",
                "pages forward, oldest first; with order=desc page back with before",
            ));
        }
        let (events, next_before) = feed.page_before(before, limit, &pattern).map_err(unreadable)?;
        let next_after = events
            .first()
            .map_or(before.map_or(0, |b| b.saturating_sub(1)), |e| e.seq);
        return Ok(Json(EventsPage {
            events: events.iter().map(raw).collect::<Result<_, _>>()?,
            next_after,
            next_before: Some(next_before),
        })
        .into_response());
    }
    if before.is_some() {
        return Err(ApiError::invalid(
            "before",
            "pages back, newest first: use it with order=desc",
        ));
    }
    let page = feed.page(after.unwrap_or(0), limit, &pattern).map_err(unreadable)?;
    let events = page.events.iter().map(raw).collect::<Result<_, _>>()?;
    Ok(Json(EventsPage {
        events,
        next_after: page.next_after,
        next_before: None,
    })
    .into_response())
}

/// `GET /v1/events/stream`: live events as Server-Sent Events, after
/// `Last-Event-ID` (or `?after=`) when given, else from now on.
pub(super) async fn stream_events(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    let core = st.core()?;
    let mut after = None;
    let mut pattern = "*".to_string();
    for (k, v) in form_urlencoded_pairs(q.as_deref().unwrap_or(""))? {
        match k.as_str() {
            "after" => after = Some(seq_param("after", &v)?),
            "type" => pattern = type_filter(&v)?,
            other => return Err(ApiError::invalid(other, "unknown query parameter; use after and type")),
        }
    }
    if let Some(v) = headers.get("last-event-id") {
        let v = v
            .to_str()
            .map_err(|_| ApiError::invalid("Last-Event-ID", "is not text"))?;
        after = Some(seq_param("Last-Event-ID", v)?);
    }
    let feed = core.feed.clone();
    let cursor = after.unwrap_or_else(|| feed.last_seq());
    let rx = feed.subscribe();
    let stop = core.stop.clone();
    struct S {
        feed: crate::events::EventFeed,
        rx: tokio::sync::watch::Receiver<()>,
        stop: tokio::sync::watch::Receiver<bool>,
        cursor: u64,
        pattern: String,
        buf: VecDeque<FeedEvent>,
    }
    let init = S {
        feed,
        rx,
        stop,
        cursor,
        pattern,
        buf: VecDeque::new(),
    };
    let stream = futures_util::stream::unfold(init, |mut s| async move {
        loop {
            if let Some(e) = s.buf.pop_front() {
                let ev = SseEvent::default()
                    .id(e.seq.to_string())
                    .event(e.kind.as_str())
                    .data(&*e.json);
                return Some((Ok::<_, Infallible>(ev), s));
            }
            if *s.stop.borrow() {
                return None;
            }
            let page = match s.feed.page(s.cursor, 256, &s.pattern) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "event stream cannot read events");
                    return None;
                }
            };
            s.cursor = page.next_after;
            if page.events.is_empty() {
                let S {
                    feed, rx, stop, cursor, ..
                } = &mut s;
                tokio::select! {
                    r = feed.wait_after(*cursor, rx) => if r.is_err() { return None },
                    _ = stop.changed() => return None,
                }
            }
            s.buf.extend(page.events);
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEPALIVE))
        .into_response())
}

#[derive(Serialize)]
struct Webhooks {
    webhooks: Vec<crate::webhooks::WebhookView>,
}

/// `GET /v1/webhooks`.
pub(super) async fn webhooks(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    admin_list(&st, &headers, q.as_deref())?;
    Ok(Json(Webhooks {
        webhooks: st.core()?.webhooks.views(),
    })
    .into_response())
}

/// One breaker scope value on the wire.
#[derive(Serialize)]
struct BreakerOut {
    name: Arc<str>,
    scope: Arc<str>,
    state: &'static str,
    recent: u64,
    normal: u64,
    opened_at: Option<String>,
    reason: Option<&'static str>,
    closes_at: Option<String>,
    watched_since: Option<String>,
}

impl From<BreakerView> for BreakerOut {
    fn from(v: BreakerView) -> Self {
        BreakerOut {
            name: v.name,
            scope: v.scope,
            state: if v.open { "open" } else { "closed" },
            recent: v.rates.recent,
            normal: v.rates.normal,
            opened_at: v.opened_at_ms.map(rfc3339),
            reason: v.reason.map(|r| r.as_str()),
            closes_at: v.closes_at_ms.map(rfc3339),
            watched_since: v.since_ms.map(rfc3339),
        }
    }
}

#[derive(Serialize)]
struct BreakerList {
    breakers: Vec<BreakerOut>,
}

/// `GET /v1/breakers`.
pub(super) async fn breakers(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    admin_list(&st, &headers, q.as_deref())?;
    let list = st.engine()?.breakers(st.now());
    Ok(Json(BreakerList {
        breakers: list.into_iter().map(BreakerOut::from).collect(),
    })
    .into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BreakerBody {
    #[serde(default)]
    scope: Option<String>,
}

#[derive(Serialize)]
struct BreakerOne {
    breaker: BreakerOut,
}

/// `POST /v1/breakers/{name}/open` and `/close`.
pub(super) async fn set_breaker(
    st: Arc<AppState>,
    name: String,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    open: bool,
) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    check_text("name", &name, 128)?;
    let bytes = body_bytes(body, st.max_body_bytes)?;
    let b: BreakerBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        BreakerBody::default()
    } else {
        parse(&bytes)?
    };
    if let Some(s) = &b.scope {
        check_text("scope", s, 512)?;
    }
    st.writable()?;
    let (view, lsn) = st.engine()?.set_breaker(&name, b.scope.as_deref(), open, st.now())?;
    if let Some(lsn) = lsn {
        st.wait(lsn).await?;
    }
    Ok(Json(BreakerOne { breaker: view.into() }).into_response())
}

/// One flag on the wire.
#[derive(Serialize)]
struct FlagOut {
    subject: Arc<str>,
    anomaly: Arc<str>,
    since: String,
    used: u64,
    baseline: u64,
    action: crate::engine::policy::AnomalyAction,
    until: String,
}

impl From<FlagView> for FlagOut {
    fn from(v: FlagView) -> Self {
        FlagOut {
            subject: v.subject,
            anomaly: v.anomaly,
            since: rfc3339(v.flag.since_ms),
            used: v.flag.used,
            baseline: v.flag.baseline,
            action: v.flag.action,
            until: rfc3339(v.period_end_ms),
        }
    }
}

#[derive(Serialize)]
struct FlagList {
    flags: Vec<FlagOut>,
}

/// `GET /v1/anomalies`: every raised flag.
pub(super) async fn anomalies(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    admin_list(&st, &headers, q.as_deref())?;
    let flags = st.engine()?.flags(None, st.now());
    Ok(Json(FlagList {
        flags: flags.into_iter().map(FlagOut::from).collect(),
    })
    .into_response())
}

/// `DELETE /v1/subjects/{subject}/flags/{anomaly}`: answers the subject.
pub(super) async fn clear_flag(
    State(st): State<Arc<AppState>>,
    Path((subject, anomaly)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    subject_path(&subject)?;
    check_text("anomaly", &anomaly, 128)?;
    st.writable()?;
    if let Some(Some(lsn)) = st.engine()?.clear_flag(&subject, &anomaly, st.now())? {
        st.wait(lsn).await?;
    }
    subject_answer(&st, &subject, false)
}
