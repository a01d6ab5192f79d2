//! The decision endpoints (`POST /v1/check`, `/v1/consume`, `/v1/reserve`) as
//! the direct request path answers them (`crate::connections::direct` reads
//! the requests and writes the answers). Everything a request meets through
//! the router is here too, from the same functions: the gate's token checks,
//! the body limit and timeout, the handler and the request metrics. Only the
//! routing, the middleware chain and the building of a routed request are
//! left out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, Method};
use axum::response::{IntoResponse, Response};

pub(crate) use super::rate_figures;
use super::{body_timed_out, decide_body, refuse_head, too_large, AppState};
use crate::engine::{DecideOp, Decision};

/// The API as the direct path sees it.
pub struct DirectApi {
    st: Arc<AppState>,
}

impl DirectApi {
    /// The direct path of the API served from `st`.
    pub fn new(st: Arc<AppState>) -> DirectApi {
        DirectApi { st }
    }

    /// The decision endpoint a request line names, when this daemon answers
    /// it on the direct path: a single node whose engine is loaded. A cluster
    /// node's requests go through the router, which forwards them to the
    /// leader and stamps the node that answered. A query string goes through
    /// the router too, which checks it.
    pub fn endpoint(&self, method: &str, target: &str) -> Option<(DecideOp, &'static str)> {
        if method != "POST" {
            return None;
        }
        let found = match target {
            "/v1/consume" => (DecideOp::Consume, "/v1/consume"),
            "/v1/check" => (DecideOp::Check, "/v1/check"),
            "/v1/reserve" => (DecideOp::Reserve, "/v1/reserve"),
            _ => return None,
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

    /// Decides a request whose head the gate admitted and whose body was read
    /// whole, and counts it in the request metrics as the router does.
    pub async fn answer(&self, op: DecideOp, route: &'static str, headers: &HeaderMap, body: &[u8]) -> Answer {
        let started = Instant::now();
        let (answer, status) = match decide_body(&self.st, headers, body, op).await {
            Ok(d) => (Answer::Decision(d), 200),
            Err(e) => {
                let resp = e.into_response();
                let status = resp.status().as_u16();
                (Answer::Other(resp), status)
            }
        };
        self.st.metrics.http("POST", route, status, started.elapsed());
        answer
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
