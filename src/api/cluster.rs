//! The HTTP API on a cluster node: any node takes any request. The leader
//! decides; before a read it confirms it still leads (so reads are
//! linearizable). Another node forwards the request to the leader and relays
//! its answer. Answers carry `Quotad-Node`, the id of the node that decided.
//! Also `GET /v1/cluster` and membership changes.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use openraft::ServerState;
use serde::Deserialize;
use serde_json::json;

use super::{body_bytes, parse, ApiError, AppState};
use crate::cluster::types::Peer;
use crate::cluster::Node;
use crate::config::Role;

/// Names the node that decided a request.
pub const NODE_HEADER: &str = "quotad-node";
/// Marks a request a follower forwarded: it is not forwarded again.
const FORWARDED_HEADER: &str = "quotad-forwarded-by";

/// A cluster node as the API sees it.
pub struct ClusterApi {
    /// The node.
    pub node: Node,
    /// Forwards requests to the leader.
    pub http: reqwest::Client,
    /// The cluster figures of `/metrics`.
    metrics: Arc<crate::metrics::ClusterMetrics>,
}

impl ClusterApi {
    /// The API over a running node.
    pub fn new(node: Node, metrics: Arc<crate::metrics::ClusterMetrics>) -> Result<ClusterApi, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(2))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("cannot build the forwarding HTTP client: {e}"))?;
        Ok(ClusterApi { node, http, metrics })
    }

    /// Sets the cluster figures of `/metrics` from Raft's metrics.
    pub fn update_metrics(&self) {
        let m = self.node.raft.metrics().borrow().clone();
        let commit = m.last_applied.map_or(0, |l| l.index + 1);
        let lags: Vec<(u64, u64)> = m
            .replication
            .iter()
            .flatten()
            .filter(|(id, _)| **id != self.id())
            .map(|(id, matched)| (*id, commit.saturating_sub(matched.map_or(0, |l| l.index + 1))))
            .collect();
        self.metrics.set(role_name(m.state), m.current_term, commit, &lags);
    }

    fn id(&self) -> u64 {
        self.node.options.node_id
    }

    /// The leader and its API address, if one is known.
    fn leader(&self) -> Option<(u64, String)> {
        let m = self.node.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let peer = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, peer.api))
    }
}

/// Endpoints every node answers itself: about the node, not the state.
fn local(path: &str) -> bool {
    matches!(
        path,
        "/healthz"
            | "/readyz"
            | "/metrics"
            | "/dashboard"
            | "/v1/openapi.json"
            | "/v1/cluster"
            | "/v1/events/stream"
            | "/v1/admin/digest"
    )
}

/// Requests that only read: the leader confirms it leads before answering.
fn read_only(method: &Method, path: &str) -> bool {
    // Forward-auth consumes whatever the proxy's method.
    if path == "/v1/authorize" || path.starts_with("/v1/authorize/") {
        return false;
    }
    method == Method::GET || path == "/v1/check" || path == "/v1/batch"
}

/// Routes a request on a cluster node (called by the gate once the body is
/// read): answered here, or forwarded to the leader.
pub async fn route(st: &Arc<AppState>, req: Request, next: Next) -> Response {
    let Some(c) = st.core.get().and_then(|core| core.cluster.clone()) else {
        return next.run(req).await;
    };
    let path = req.uri().path().to_string();
    if local(&path) {
        return stamped(next.run(req).await, c.id());
    }
    if c.node.serving() {
        if read_only(req.method(), &path) {
            if let Err(e) = c.node.raft.ensure_linearizable().await {
                return ApiError::NoLeader(format!(
                    "this node could not confirm it still leads ({e}); retry, on any node"
                ))
                .into_response();
            }
        }
        return stamped(next.run(req).await, c.id());
    }
    if req.headers().contains_key(FORWARDED_HEADER) {
        return ApiError::NoLeader("the leader moved while the request was forwarded; retry, on any node".into())
            .into_response();
    }
    match c.leader() {
        Some((id, _)) if id == c.id() => {
            ApiError::NoLeader("this node was just elected and is catching up; retry in a moment".into())
                .into_response()
        }
        Some((id, api)) => forward(&c, id, &api, req).await,
        None => {
            ApiError::NoLeader("no leader is elected now (a majority of the cluster is not reachable); retry".into())
                .into_response()
        }
    }
}

fn stamped(mut resp: Response, id: u64) -> Response {
    resp.headers_mut()
        .insert(HeaderName::from_static(NODE_HEADER), HeaderValue::from(id));
    resp
}

/// Headers that belong to one connection, not to the request.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "transfer-encoding" | "te" | "upgrade" | "host" | "content-length"
    )
}

/// Sends the request to the leader and relays its answer.
async fn forward(c: &ClusterApi, leader: u64, api: &str, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    // The gate has read the body already (within its limit).
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return ApiError::InvalidRequest("the request body could not be read".into()).into_response();
    };
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("{}{target}", api.trim_end_matches('/'));
    let mut out = c.http.request(parts.method.clone(), &url).body(bytes);
    for (name, value) in parts.headers.iter().filter(|(n, _)| !hop_by_hop(n)) {
        out = out.header(name, value);
    }
    out = out.header(FORWARDED_HEADER, c.id());
    let resp = match out.send().await {
        Ok(r) => r,
        Err(e) => return not_sent(&e, leader, api, parts.method != Method::GET).into_response(),
    };
    let status = resp.status();
    let mut headers = HeaderMap::new();
    for (name, value) in resp.headers().iter().filter(|(n, _)| !hop_by_hop(n)) {
        headers.append(name.clone(), value.clone());
    }
    match resp.bytes().await {
        Ok(body) => {
            let mut r = Response::new(Body::from(body));
            *r.status_mut() = status;
            *r.headers_mut() = headers;
            r
        }
        Err(e) => ApiError::Unavailable(format!(
            "the leader's answer (node {leader} at {api}) was cut off; if the request changed anything, retry it \
             with the same idempotency key: {e}"
        ))
        .into_response(),
    }
}

/// The leader to ask, for a call this node took on a listener of its own
/// (the gateway, Envoy's service): `None` when this node decides it (not a
/// cluster, or the leader serving).
pub(crate) fn leader_elsewhere(st: &AppState) -> Result<Option<(Arc<ClusterApi>, u64, String)>, ApiError> {
    let Some(c) = st.core.get().and_then(|core| core.cluster.clone()) else {
        return Ok(None);
    };
    if c.node.serving() {
        return Ok(None);
    }
    match c.leader() {
        Some((id, _)) if id == c.id() => Err(ApiError::NoLeader(
            "this node was just elected and is catching up; retry in a moment".into(),
        )),
        Some((id, api)) => Ok(Some((c, id, api))),
        None => Err(ApiError::NoLeader(
            "no leader is elected now (a majority of the cluster is not reachable); retry".into(),
        )),
    }
}

/// POSTs `body` to `path` of the leader's HTTP API with the caller's
/// `Authorization`, and reads its answer: the leader decides and stores
/// exactly as for a request sent to it.
pub(crate) async fn post_to_leader<T: serde::de::DeserializeOwned>(
    (c, leader, api): (Arc<ClusterApi>, u64, String),
    path: &str,
    body: &serde_json::Value,
    authorization: Option<&HeaderValue>,
    timeout: std::time::Duration,
) -> Result<T, ApiError> {
    let url = format!("{}{path}", api.trim_end_matches('/'));
    let mut out = c
        .http
        .post(&url)
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .header(FORWARDED_HEADER, c.id())
        .timeout(timeout)
        .body(body.to_string());
    if let Some(a) = authorization {
        out = out.header(axum::http::header::AUTHORIZATION, a);
    }
    let resp = out.send().await.map_err(|e| not_sent(&e, leader, &api, true))?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| {
        ApiError::Unavailable(format!(
            "the leader's answer (node {leader} at {api}) was cut off; if the request changed anything, retry it \
             with the same idempotency key: {e}"
        ))
    })?;
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::Unavailable(format!(
                "the leader (node {leader} at {api}) answered something unreadable: {e}"
            ))
        });
    }
    Err(relayed(status.as_u16(), &bytes))
}

/// The leader's error answer as this node's own.
fn relayed(status: u16, body: &[u8]) -> ApiError {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let code = v["error"]["code"].as_str().unwrap_or("");
    let message = v["error"]["message"].as_str().map_or_else(
        || format!("the leader answered {status}: {}", String::from_utf8_lossy(body)),
        str::to_string,
    );
    // The codes are the API's own: look each up to keep it `'static`.
    let known = |codes: &[&'static str]| codes.iter().copied().find(|c| *c == code);
    match status {
        400 => match code {
            "unknown_metric" => ApiError::UnknownMetric(message),
            "unpriced" => ApiError::Unpriced(message),
            _ => ApiError::InvalidRequest(message),
        },
        401 => ApiError::Unauthorized(message),
        403 => ApiError::Forbidden(message),
        404 => ApiError::NotFound(
            known(&[
                "unknown_reservation",
                "unknown_subject",
                "unknown_plan",
                "unknown_limit",
            ])
            .unwrap_or("not_found"),
            message,
        ),
        409 => ApiError::Conflict(
            known(&["reservation_finished", "idempotency_conflict", "request_in_progress"]).unwrap_or("conflict"),
            message,
        ),
        503 if code == "no_leader" => ApiError::NoLeader(message),
        503 if code == "busy" => ApiError::Busy(message, 1),
        _ => ApiError::Unavailable(message),
    }
}

/// A forward that failed before an answer came back.
fn not_sent(e: &reqwest::Error, leader: u64, api: &str, writes: bool) -> ApiError {
    if e.is_connect() {
        // Nothing was sent: the leader is down or cut off, and an election
        // is probably under way.
        return ApiError::NoLeader(format!(
            "the leader this node knows (node {leader} at {api}) cannot be reached; an election is probably \
             under way: retry, on any node"
        ));
    }
    let unknown = if writes {
        " if it was sent, its outcome is unknown: retry with the same idempotency key;"
    } else {
        ""
    };
    ApiError::Unavailable(format!(
        "the leader (node {leader} at {api}) did not answer:{unknown} {e}"
    ))
}

fn role_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Learner => "learner",
        ServerState::Candidate => "candidate",
        ServerState::Shutdown => "shutdown",
    }
}

fn cluster_of(st: &AppState) -> Result<Arc<ClusterApi>, ApiError> {
    if st.started_config.cluster.is_some() {
        // A node still starting is a cluster node all the same: say so.
        return st
            .core()?
            .cluster
            .clone()
            .ok_or_else(|| ApiError::Unavailable("this node is still joining its cluster; retry shortly".into()));
    }
    Err(ApiError::NotFound(
        "not_a_cluster",
        "this daemon runs as a single node (no [cluster] section in its configuration)".into(),
    ))
}

/// `GET /v1/cluster`: this node's view of the cluster.
pub async fn status(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    let c = cluster_of(&st)?;
    let m = c.node.raft.metrics().borrow().clone();
    let role = role_name(m.state);
    let membership = m.membership_config.membership();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    let matched = m.replication.as_ref();
    let members: Vec<_> = membership
        .nodes()
        .map(|(id, p)| {
            json!({
                "id": id,
                "raft": p.raft,
                "api": p.api,
                "voter": voters.contains(id),
                "matched_lsn": matched.and_then(|r| r.get(id)).and_then(|l| l.as_ref()).map(|l| l.index + 1),
            })
        })
        .collect();
    let leader = m
        .current_leader
        .and_then(|id| membership.get_node(&id).map(|p| json!({"id": id, "api": p.api})));
    Ok(Json(json!({
        "node_id": c.id(),
        "role": role,
        "serving": c.node.serving(),
        "leader": leader,
        "term": m.current_term,
        "commit_lsn": m.last_applied.map_or(0, |l| l.index + 1),
        "applied_lsn": c.node.state_machine.applied_lsn(),
        "members": members,
    }))
    .into_response())
}

/// Body of `POST /v1/cluster/members`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    id: u64,
    raft: String,
    api: String,
}

/// `POST /v1/cluster/members`: adds a node (on the leader; others forward).
pub async fn add_member(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    let c = cluster_of(&st)?;
    let m: AddMember = parse(&body_bytes(body, st.max_body_bytes)?)?;
    if m.id == 0 {
        return Err(ApiError::invalid("id", "must be 1 or more"));
    }
    if crate::config::ListenAddr::parse(&m.raft).is_err() {
        return Err(ApiError::invalid("raft", format!("{:?} is not host:port", m.raft)));
    }
    if !(m.api.starts_with("http://") || m.api.starts_with("https://")) {
        return Err(ApiError::invalid("api", format!("{:?} is not an http:// URL", m.api)));
    }
    c.node
        .add_member(
            m.id,
            Peer {
                raft: m.raft,
                api: m.api,
            },
        )
        .await
        .map_err(ApiError::Unavailable)?;
    status(State(st), headers).await
}

/// `DELETE /v1/cluster/members/{id}`: removes a node.
pub async fn remove_member(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    let c = cluster_of(&st)?;
    // Parsed here, not by the extractor, so a bad id gets the JSON error body.
    let id: u64 = match id.parse() {
        Ok(n) if n > 0 => n,
        _ => {
            return Err(ApiError::invalid(
                "id",
                format!("{id:?} is not a node id (a whole number, 1 or more)"),
            ))
        }
    };
    let known = c
        .node
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .get_node(&id)
        .is_some();
    if !known {
        return Err(ApiError::NotFound(
            "unknown_node",
            format!("node {id} is not a member of the cluster"),
        ));
    }
    c.node.remove_member(id).await.map_err(ApiError::Unavailable)?;
    status(State(st), headers).await
}
