//! Peer traffic: Raft's three calls (append entries, vote, install snapshot
//! chunk) as HTTP POSTs between nodes, bodies in the log's own binary
//! encoding. Every call carries the cluster's shared secret; a listener
//! answers 401 to a call without it, compared in constant time. All framing
//! of peer traffic is here, so TLS can be added in one place.
//!
//! For fault tests only, a node started with test hooks (the daemon: with
//! `QUOTAD_CLUSTER_TEST_HOOKS=1` in its environment) also takes `POST /raft/test/isolate` (a JSON list of node ids whose
//! traffic it drops, both ways): a network partition at the listener.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::types::{Peer, Raft, TypeConfig};
use crate::storage::codec;

/// The header carrying the shared secret.
const SECRET_HEADER: &str = "quotad-cluster-secret";
/// The header naming the calling node.
const FROM_HEADER: &str = "quotad-node";
/// Largest call body: a batch of entries, or a snapshot chunk.
const BODY_LIMIT: usize = 64 << 20;

/// Peers whose traffic is dropped (fault tests only).
#[derive(Debug, Default)]
pub struct Isolation {
    enabled: bool,
    from: Mutex<BTreeSet<u64>>,
}

impl Isolation {
    /// Isolation that is honoured only when `enabled` (fault tests).
    pub fn new(enabled: bool) -> Arc<Isolation> {
        Arc::new(Isolation {
            enabled,
            from: Mutex::default(),
        })
    }

    /// Drops traffic from and to `ids` from now on (none: heals); ignored
    /// unless enabled.
    pub fn set(&self, ids: BTreeSet<u64>) {
        *self.from.lock().unwrap_or_else(|e| e.into_inner()) = ids;
    }

    fn dropped(&self, node: u64) -> bool {
        self.enabled && self.from.lock().unwrap_or_else(|e| e.into_inner()).contains(&node)
    }
}

#[derive(Clone)]
struct Listener {
    raft: Raft,
    secret: Arc<[u8]>,
    isolation: Arc<Isolation>,
}

/// 401 unless the call carries the shared secret (compared in constant time).
fn holds_secret(l: &Listener, headers: &HeaderMap) -> Result<(), StatusCode> {
    use subtle::ConstantTimeEq;
    let given = headers.get(SECRET_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
    match bool::from(given.ct_eq(&l.secret)) {
        true => Ok(()),
        false => Err(StatusCode::UNAUTHORIZED),
    }
}

/// Why a call is refused before Raft sees it.
fn admitted(l: &Listener, headers: &HeaderMap) -> Result<(), StatusCode> {
    holds_secret(l, headers)?;
    let from = headers
        .get(FROM_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if from.is_some_and(|n| l.isolation.dropped(n)) {
        return Err(StatusCode::SERVICE_UNAVAILABLE);
    }
    Ok(())
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, (StatusCode, String)> {
    codec::decode_raft(body, "peer call").map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, (StatusCode, String)> {
    codec::encode_raft(value).map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// The routes of the peer listener.
pub fn router(raft: Raft, secret: Arc<[u8]>, isolation: Arc<Isolation>) -> Router {
    let l = Listener {
        raft,
        secret,
        isolation,
    };
    Router::new()
        .route(
            "/raft/append",
            post(|State(l): State<Listener>, h: HeaderMap, body: Bytes| async move {
                admitted(&l, &h).map_err(|s| (s, String::new()))?;
                let req: AppendEntriesRequest<TypeConfig> = decode(&body)?;
                encode(&l.raft.append_entries(req).await)
            }),
        )
        .route(
            "/raft/vote",
            post(|State(l): State<Listener>, h: HeaderMap, body: Bytes| async move {
                admitted(&l, &h).map_err(|s| (s, String::new()))?;
                let req: VoteRequest<u64> = decode(&body)?;
                encode(&l.raft.vote(req).await)
            }),
        )
        .route(
            "/raft/snapshot",
            post(|State(l): State<Listener>, h: HeaderMap, body: Bytes| async move {
                admitted(&l, &h).map_err(|s| (s, String::new()))?;
                let req: InstallSnapshotRequest<TypeConfig> = decode(&body)?;
                encode(&l.raft.install_snapshot(req).await)
            }),
        )
        .route(
            "/raft/test/isolate",
            post(|State(l): State<Listener>, h: HeaderMap, body: Bytes| async move {
                if !l.isolation.enabled {
                    return Err((StatusCode::NOT_FOUND, String::new()));
                }
                holds_secret(&l, &h).map_err(|s| (s, String::new()))?;
                let ids: BTreeSet<u64> =
                    serde_json::from_slice(&body).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
                l.isolation.set(ids);
                Ok(Vec::new())
            }),
        )
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(l)
}

/// Makes clients to peers.
#[derive(Clone)]
pub struct Network {
    /// This node's id, sent with every call.
    pub node_id: u64,
    /// The shared secret.
    pub secret: Arc<[u8]>,
    /// Peers this node drops traffic to (fault tests).
    pub isolation: Arc<Isolation>,
    /// One HTTP client for all peers (it pools connections per host).
    pub http: reqwest::Client,
}

impl Network {
    /// A network for node `node_id`.
    pub fn new(node_id: u64, secret: Arc<[u8]>, isolation: Arc<Isolation>) -> Result<Network, String> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(4)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("cannot build the peer HTTP client: {e}"))?;
        Ok(Network {
            node_id,
            secret,
            isolation,
            http,
        })
    }
}

/// A client to one peer.
pub struct PeerClient {
    net: Network,
    target: u64,
    node: Peer,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &Peer) -> PeerClient {
        PeerClient {
            net: self.clone(),
            target,
            node: node.clone(),
        }
    }
}

impl PeerClient {
    /// Posts `req` to `path` and decodes the peer's answer.
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, Peer, RaftError<u64, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        if self.net.isolation.dropped(self.target) {
            return Err(RPCError::Unreachable(Unreachable::new(&std::io::Error::other(
                "peer traffic to this node is dropped (test isolation)",
            ))));
        }
        let body = codec::encode_raft(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let url = format!("http://{}{path}", self.node.raft);
        let resp = self
            .net
            .http
            .post(url)
            .header(SECRET_HEADER, &*self.net.secret)
            .header(FROM_HEADER, self.net.node_id.to_string())
            .timeout(option.hard_ttl())
            .body(body)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    RPCError::Unreachable(Unreachable::new(&e))
                } else {
                    RPCError::Network(NetworkError::new(&e))
                }
            })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if !status.is_success() {
            let why = std::io::Error::other(format!(
                "peer {} answered {status}{}",
                self.target,
                if status == StatusCode::UNAUTHORIZED {
                    ": the cluster secrets differ"
                } else {
                    ""
                }
            ));
            return Err(RPCError::Unreachable(Unreachable::new(&why)));
        }
        let answer: Result<Resp, RaftError<u64, E>> =
            codec::decode_raft(&bytes, "peer answer").map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new_with_node(self.target, self.node.clone(), e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, Peer, RaftError<u64>>> {
        self.call("/raft/append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, Peer, RaftError<u64, InstallSnapshotError>>> {
        self.call("/raft/snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, Peer, RaftError<u64>>> {
        self.call("/raft/vote", &rpc, &option).await
    }
}
