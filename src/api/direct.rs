//! The decision endpoints (`POST /v1/check`, `/v1/consume`, `/v1/reserve`)
//! and a reservation's commit and release, as the direct request path
//! answers them (`crate::connections::direct` reads
//! the requests and writes the answers). Everything a request meets through
//! the router is here too, from the same functions: the gate's token checks,
//! the body limit and timeout, the handler and the request metrics. Only the
//! routing, the middleware chain and the building of a routed request are
//! left out.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use axum::Json;

pub(crate) use super::rate_figures;
use super::{
    body_timed_out, decide_body_now, finish_body_now, finish_settle, refuse_head, settle, too_large, ApiError,
    AppState, Decided,
};
use crate::engine::{Applied, DecideOp, Decision, FinishAnswer};

/// The API as the direct path sees it.
pub struct DirectApi {
    st: Arc<AppState>,
}

impl DirectApi {
    /// The direct path of the API served from `st`.
    pub fn new(st: Arc<AppState>) -> DirectApi {
        DirectApi { st }
    }

    /// The endpoint a request line names, when this daemon answers it on the
    /// direct path: a single node whose engine is loaded. A cluster node's
    /// requests go through the router, which forwards them to the leader and
    /// stamps the node that answered. A query string, or a reservation id
    /// with anything but letters, digits and `-_.~` (the router would
    /// percent-decode it), goes through the router too.
    pub fn endpoint(&self, method: &str, target: &str) -> Option<Endpoint> {
        if method != "POST" {
            return None;
        }
        let found = match target {
            "/v1/consume" => Endpoint::Decide(DecideOp::Consume, "/v1/consume"),
            "/v1/check" => Endpoint::Decide(DecideOp::Check, "/v1/check"),
            "/v1/reserve" => Endpoint::Decide(DecideOp::Reserve, "/v1/reserve"),
            _ => {
                let (id, action) = target.strip_prefix("/v1/reservations/")?.split_once('/')?;
                let plain = |c: u8| c.is_ascii_alphanumeric() || b"-_.~".contains(&c);
                if id.is_empty() || !id.bytes().all(plain) {
                    return None;
                }
                match action {
                    "commit" => Endpoint::Finish(id.to_string(), true),
                    "release" => Endpoint::Finish(id.to_string(), false),
                    _ => return None,
                }
            }
        };
        let core = self.st.core.get()?;
        core.cluster.is_none().then_some(found)
    }

    /// `server.max_body_bytes`.
    pub fn max_body_bytes(&self) -> usize {
        self.st.max_body_bytes
    }

    /// `server.body_timeout_ms`.
    pub fn body_timeout(&self) -> Duration {
        self.st.body_timeout
    }

    /// The gate's checks on the head of a request to `route`: the answer
    /// that refuses it (closing the connection when the token was not
    /// accepted), if any.
    pub fn refuse(&self, route: &str, headers: &HeaderMap) -> Option<Response> {
        refuse_head(&self.st, &Method::POST, route, headers)
    }

    /// The answer to a body over `server.max_body_bytes`.
    pub fn too_large(&self) -> Response {
        too_large(self.st.max_body_bytes, "server.max_body_bytes")
    }

    /// The answer to a body that did not arrive within `server.body_timeout_ms`.
    pub fn body_timed_out(&self) -> Response {
        body_timed_out(self.st.body_timeout)
    }

    /// Answers a request whose head the gate admitted and whose body was
    /// read whole, and counts it in the request metrics as the router does.
    ///
    /// The request is decided here, on the call, and the future returned
    /// only waits (for capacity when the body asks to wait, then for the
    /// record to be durable): requests that arrived together are decided
    /// in the order of the calls, and their waits overlap.
    pub fn answer<'a>(
        &'a self,
        endpoint: &Endpoint,
        headers: &HeaderMap,
        body: &[u8],
    ) -> impl Future<Output = Answer> + Send + 'a {
        let started = Instant::now();
        let route = endpoint.route();
        let now = match endpoint {
            Endpoint::Decide(op, _) => Now::Decided(*op, decide_body_now(&self.st, headers, body, *op)),
            Endpoint::Finish(id, commit) => {
                Now::Finished(*commit, finish_body_now(&self.st, id, headers, body, *commit))
            }
        };
        async move {
            let answer = match now {
                Now::Decided(op, Ok(decided)) => match settle(&self.st, op, decided).await {
                    Ok(d) => Answer::Decision(d),
                    Err(e) => Answer::Other(e.into_response()),
                },
                Now::Finished(commit, Ok(applied)) => match finish_settle(&self.st, applied, commit).await {
                    Ok(a) => Answer::Other(Json(a).into_response()),
                    Err(e) => Answer::Other(e.into_response()),
                },
                Now::Decided(_, Err(e)) | Now::Finished(_, Err(e)) => Answer::Other(e.into_response()),
            };
            let status = match &answer {
                Answer::Decision(_) => 200,
                Answer::Other(r) => r.status().as_u16(),
            };
            self.st.metrics.http("POST", route, status, started.elapsed());
            answer
        }
    }
}

/// What [`DirectApi::answer`] did at once.
// It lives in the answer's future, which holds the decision either way:
// boxing the larger variant would only add an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Now {
    Decided(DecideOp, Result<Decided, ApiError>),
    Finished(bool, Result<Applied<FinishAnswer>, ApiError>),
}

/// An endpoint the direct path answers.
pub enum Endpoint {
    /// `/v1/check`, `/v1/consume` or `/v1/reserve` (the route).
    Decide(DecideOp, &'static str),
    /// `/v1/reservations/{id}/commit` (true) or `/release` (false).
    Finish(String, bool),
}

impl Endpoint {
    /// The route pattern, as the router's metrics label it.
    pub fn route(&self) -> &'static str {
        match self {
            Endpoint::Decide(_, route) => route,
            Endpoint::Finish(_, true) => "/v1/reservations/{id}/commit",
            Endpoint::Finish(_, false) => "/v1/reservations/{id}/release",
        }
    }
}

/// What the direct path answers.
pub enum Answer {
    /// 200 with the decision as JSON and its rate-limit headers
    /// ([`rate_figures`]), as the router's handler answers it.
    Decision(Decision),
    /// Anything else, as the router would send it.
    Other(Response),
}
