//! Listeners and lifecycle. `bind` checks the config and binds every TCP and
//! Unix socket; `run` serves right away (health checks answer, everything else
//! is 503 until ready), recovers the state from disk, then serves requests
//! with at most `server.max_connections` connections (see [`crate::connections`]:
//! at the cap the one idle longest makes room), expires holds, collects
//! garbage and snapshots in the background, and on shutdown stops accepting,
//! refuses new writes, drains open requests, takes a final snapshot and closes
//! the WAL. If the WAL fails, it stops taking writes and returns an error
//! (the process exits non-zero; restart replays the log).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioTimer;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::api::{self, load_tokens, AppState, Core};
use crate::clock::Clock;
use crate::config::{Config, ConfigError, ListenAddr, StorageConfig};
use crate::connections::Connections;
use crate::engine::{Engine, Policy};
use crate::journal::Journal;
use crate::metrics::{Metrics, StorageMetrics};
use crate::storage::{RecoveryReport, Storage, StorageError};
use crate::waiting::Waiting;
use crate::webhooks::{WebhookSpec, Webhooks};

/// How often due reservations are expired even when no request arrives.
const EXPIRY_TICK: Duration = Duration::from_millis(crate::engine::EXPIRY_SWEEP_MS);
/// How often garbage collection runs.
const GC_TICK: Duration = Duration::from_secs(10);
/// How often the snapshot thresholds are checked.
const SNAPSHOT_CHECK_TICK: Duration = Duration::from_secs(1);
/// Items dropped per shard per GC pass, so one pass never stalls requests long.
const GC_BUDGET: usize = 10_000;

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Invalid configuration.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The gateway could not be set up.
    #[error("gateway: {0}")]
    Gateway(String),
    /// Recovery failed: the data is damaged or cannot be read.
    #[error("cannot recover the state: {0}")]
    Recovery(StorageError),
    /// The WAL failed while running; unacknowledged writes were refused.
    #[error("storage failed: {0}")]
    Storage(String),
}

enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// Opens storage and recovers the engine, given the compiled policy: the real
/// data directory, or (in tests) a simulated WAL directory.
pub type StorageOpener = Box<
    dyn FnOnce(Policy, Arc<StorageMetrics>) -> Result<(Engine, Storage, RecoveryReport), StorageError> + Send + 'static,
>;

/// Where state is kept.
enum Backing {
    /// WAL and snapshots, opened when `run` starts.
    Durable(StorageOpener),
    /// In memory, journaling to the given journal (tests, embedding).
    Memory(Arc<dyn Journal>),
    /// One node of a Raft cluster, started when `run` starts.
    Cluster(Box<crate::cluster::NodeOptions>),
}

/// A bound, not yet running server.
pub struct Server {
    /// Shared with every handler.
    state: Arc<AppState>,
    /// Bound sockets.
    listeners: Vec<Bound>,
    /// The gateway's configuration and bound sockets, when `[gateway]` is set.
    gateway: Option<(crate::gateway::config::Checked, Vec<Bound>)>,
    /// Envoy's rate limit service (`[gateway] grpc_listen`), bound.
    grpc: Option<(String, Bound)>,
    /// How long shutdown waits for open requests.
    grace: Duration,
    /// Open connections at most.
    max_connections: usize,
    /// A connection must send a whole request head within this long of
    /// opening or of its previous answer.
    header_timeout: Duration,
    /// The compiled limits and plans.
    policy: Policy,
    /// Webhooks, checked and their secrets read.
    webhooks: Vec<WebhookSpec>,
    /// Where state is kept.
    backing: Backing,
}

/// Connections the kernel queues for `accept`: std's and tokio's 128
/// overflows in a burst of connects (each dropped SYN costs its client a
/// second), so ask for more; the kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: i32 = 4096;

/// Binds a TCP listener with [`LISTEN_BACKLOG`], trying each address the
/// name resolves to, as std's `bind` does.
async fn listen_tcp(addr: &str) -> io::Result<TcpListener> {
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "the address resolves to nothing");
    for a in tokio::net::lookup_host(addr).await? {
        let socket = socket2::Socket::new(socket2::Domain::for_address(a), socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        match socket.bind(&a.into()).and_then(|()| socket.listen(LISTEN_BACKLOG)) {
            Ok(()) => return TcpListener::from_std(socket.into()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Binds a Unix socket listener with [`LISTEN_BACKLOG`].
fn listen_unix(path: &Path) -> io::Result<UnixListener> {
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.bind(&socket2::SockAddr::unix(path)?)?;
    socket.listen(LISTEN_BACKLOG)?;
    UnixListener::from_std(std::os::unix::net::UnixListener::from(std::os::fd::OwnedFd::from(
        socket,
    )))
}

/// Gives a socket file its configured mode and group, so that only members of
/// the group (the app's user) can connect.
fn restrict_socket(path: &Path, mode: &str, group: Option<&str>) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = u32::from_str_radix(mode, 8).map_err(|_| io::Error::other("bad socket_mode"))?;
    if let Some(group) = group {
        let gid = resolve_group(group)?;
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// A group name or numeric id to a gid. Names are looked up in /etc/group
/// (local groups; give the number for groups from a directory service).
fn resolve_group(group: &str) -> io::Result<u32> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group")?;
    groups
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(group)).then(|| f.nth(1)?.parse().ok()).flatten()
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("server.socket_group: no group {group:?} in /etc/group"),
            )
        })
}

/// Removes a socket file left by a daemon that died, refusing if one still answers
/// there or the path is not a socket.
async fn clear_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if !m.file_type().is_socket() => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket; refusing to replace it",
        )),
        Ok(_) => match tokio::net::UnixStream::connect(path).await {
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process is serving on this socket",
            )),
            Err(_) => {
                tracing::info!(path = %path.display(), "removing stale socket file");
                std::fs::remove_file(path)
            }
        },
    }
}

impl Server {
    /// Checks the config and binds every listen address; state is recovered from
    /// `storage.data_dir` when `run` starts.
    pub async fn bind(config: &Config, clock: Arc<dyn Clock>) -> Result<Server, ServerError> {
        if let Some(c) = &config.cluster {
            let options = cluster_options(config, c)?;
            return Self::bind_inner(config, clock, Backing::Cluster(Box::new(options))).await;
        }
        let storage: StorageConfig = config.storage.clone();
        let opener: StorageOpener = Box::new(move |policy, metrics| Storage::open(&storage, policy, metrics));
        Self::bind_inner(config, clock, Backing::Durable(opener)).await
    }

    /// As [`Server::bind`], opening storage with `opener` (tests inject faults here).
    pub async fn bind_with_storage(
        config: &Config,
        clock: Arc<dyn Clock>,
        opener: StorageOpener,
    ) -> Result<Server, ServerError> {
        Self::bind_inner(config, clock, Backing::Durable(opener)).await
    }

    /// As [`Server::bind`], keeping state in memory and journaling to `journal`.
    pub async fn bind_with_journal(
        config: &Config,
        clock: Arc<dyn Clock>,
        journal: Arc<dyn Journal>,
    ) -> Result<Server, ServerError> {
        Self::bind_inner(config, clock, Backing::Memory(journal)).await
    }

    async fn bind_inner(config: &Config, clock: Arc<dyn Clock>, backing: Backing) -> Result<Server, ServerError> {
        config.sanitize()?;
        let policy = Policy::from_config(config)?;
        let tokens = load_tokens(config)?;
        let webhooks = crate::webhooks::load_webhooks(config)?;
        let listeners = bind_all(config, &config.listen_addrs()).await?;
        let (gateway, grpc) = match &config.gateway {
            Some(g) => {
                let checked = g.check(!config.auth.tokens.is_empty())?;
                let bound = bind_all(config, &checked.listen).await?;
                let grpc = match &checked.grpc_listen {
                    Some(a) => bind_all(config, std::slice::from_ref(a))
                        .await?
                        .pop()
                        .map(|b| (checked.grpc_subject_key.clone(), b)),
                    None => None,
                };
                (Some((checked, bound)).filter(|(c, _)| !c.listen.is_empty()), grpc)
            }
            None => (None, None),
        };
        let subject_key = match (&config.cluster, &backing) {
            (Some(c), _) => Ok(crate::api::SubjectKey::from_secret(&c.secret()?)),
            (None, Backing::Memory(_)) => crate::api::SubjectKey::random(),
            (None, _) => crate::api::SubjectKey::in_dir(&config.storage.data_dir),
        }
        .map_err(|e| ServerError::Storage(format!("the key of subject tokens: {e}")))?;
        let state = Arc::new(AppState {
            core: std::sync::OnceLock::new(),
            subject_key,
            top_cache: Default::default(),
            clock,
            tokens: std::sync::RwLock::new(Arc::new(tokens)),
            config: std::sync::RwLock::new((config.clone(), None)),
            started_config: config.clone(),
            metrics: Metrics::default(),
            ready: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            max_body_bytes: config.server.max_body_bytes,
            max_batch_bytes: config.server.max_batch_bytes,
            body_timeout: Duration::from_millis(config.server.body_timeout_ms),
            exports: Arc::new(tokio::sync::Semaphore::new(config.history.max_exports)),
        });
        Ok(Server {
            state,
            listeners,
            gateway,
            grpc,
            grace: Duration::from_millis(config.server.shutdown_grace_ms),
            max_connections: config.server.max_connections,
            header_timeout: Duration::from_millis(config.server.header_timeout_ms),
            policy,
            backing,
            webhooks,
        })
    }

    /// Names the file the config came from, so SIGHUP and `POST /v1/admin/reload`
    /// can re-read it.
    pub fn with_config_path(self, path: PathBuf) -> Server {
        self.state.config.write().unwrap_or_else(|e| e.into_inner()).1 = Some(path);
        self
    }

    /// The addresses actually bound (TCP port 0 resolved).
    pub fn local_addrs(&self) -> Vec<ListenAddr> {
        bound_addrs(&self.listeners)
    }

    /// The gateway's addresses actually bound (none without `[gateway]`).
    pub fn gateway_addrs(&self) -> Vec<ListenAddr> {
        self.gateway.as_ref().map(|(_, l)| bound_addrs(l)).unwrap_or_default()
    }

    /// Where Envoy's rate limit service is bound (none without `grpc_listen`).
    pub fn grpc_addr(&self) -> Option<ListenAddr> {
        self.grpc
            .as_ref()
            .and_then(|(_, b)| bound_addrs(std::slice::from_ref(b)).pop())
    }

    /// Handler state (engine, metrics), for embedding and tests.
    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves (or the WAL fails), then shuts down.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        let Server {
            state,
            listeners,
            gateway,
            grpc,
            grace,
            max_connections,
            header_timeout,
            policy,
            backing,
            webhooks,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let connections = Connections::new(max_connections, state.metrics.connections.clone());
        let sockets: Vec<PathBuf> = listeners
            .iter()
            .chain(gateway.iter().flat_map(|(_, l)| l.iter()))
            .chain(grpc.iter().map(|(_, b)| b))
            .filter_map(|l| match l {
                Bound::Unix(_, p) => Some(p.clone()),
                Bound::Tcp(_) => None,
            })
            .collect();
        let gw_metrics = match gateway.is_some() || grpc.is_some() {
            true => state.metrics.register_gateway(),
            false => Arc::default(),
        };
        let mut accept_tasks = spawn_accept_loops(
            api::router(state.clone()),
            Some(Arc::new(api::direct::DirectApi::new(state.clone()))),
            listeners,
            &connections,
            header_timeout,
            &stop_rx,
        );
        if let Some((checked, bound)) = gateway {
            let router =
                crate::gateway::router(state.clone(), checked, gw_metrics.clone()).map_err(ServerError::Gateway)?;
            accept_tasks.extend(spawn_accept_loops(
                router,
                None,
                bound,
                &connections,
                header_timeout,
                &stop_rx,
            ));
        }
        let grpc_task = grpc
            .map(|(subject_key, bound)| spawn_grpc(state.clone(), subject_key, bound, gw_metrics.clone(), &stop_rx));

        let (engine, storage, cluster) = match backing {
            Backing::Memory(journal) => (Arc::new(Engine::new(policy, journal)), None, None),
            Backing::Cluster(options) => match start_node(*options, policy, &state.started_config).await {
                Ok((node, lock)) => {
                    std::mem::forget(lock); // held for the life of the process
                    (node.engine.clone(), None, Some(node))
                }
                Err(e) => {
                    let _ = stop_tx.send(true);
                    for t in accept_tasks {
                        let _ = t.await;
                    }
                    remove_sockets(&sockets);
                    return Err(e);
                }
            },
            Backing::Durable(opener) => {
                let metrics = state.metrics.storage.clone();
                let opened = tokio::task::spawn_blocking(move || opener(policy, metrics))
                    .await
                    .expect("recovery does not panic");
                match opened {
                    Ok((engine, storage, report)) => {
                        tracing::info!(
                            snapshot = report.snapshot_loaded,
                            replayed_records = report.replayed_records,
                            wal_records = report.scan.records,
                            first_lsn = report.scan.first_lsn,
                            last_lsn = report.scan.last_lsn,
                            torn_tail_bytes = report.scan.torn_tail_bytes,
                            duration_ms = report.duration.as_millis() as u64,
                            "recovered"
                        );
                        if report.scan.torn_tail_bytes > 0 {
                            tracing::warn!(
                                file = report.scan.torn_tail_file.as_deref().unwrap_or(""),
                                bytes = report.scan.torn_tail_bytes,
                                "truncated a torn WAL tail: a write cut short by a crash (never acknowledged with durability = \"fsync\"; with \"batch\", the loss window of that mode)"
                            );
                        }
                        if report.snapshot_created_ms.is_none() {
                            // No snapshot yet: everything since this start is in the log.
                            let m = &state.metrics.storage;
                            m.snapshot_timestamp_seconds.set(state.clock.now_ms() as f64 / 1000.0);
                        }
                        (Arc::new(engine), Some(Arc::new(storage)), None)
                    }
                    Err(e) => {
                        let _ = stop_tx.send(true);
                        for t in accept_tasks {
                            let _ = t.await;
                        }
                        remove_sockets(&sockets);
                        return Err(ServerError::Recovery(e));
                    }
                }
            }
        };
        // Time goes on from the latest time the log recorded, if the clock is behind it.
        state.clock.resume_from(engine.time(0));
        let cluster = match cluster
            .map(|node| crate::api::cluster::ClusterApi::new(node, state.metrics.register_cluster()))
            .transpose()
        {
            Ok(c) => c.map(Arc::new),
            Err(e) => return Err(ServerError::Storage(e)),
        };
        // A cluster's policy is seeded by its first leader (see `maintain`).
        let adopted = match cluster.is_some() {
            true => Ok(None),
            false => crate::api::policy::adopt_at_start(&engine, &state.started_config, state.clock.now_ms()),
        };
        let adopted = match adopted {
            Ok(Some(lsn)) => engine
                .durable_watch()
                .wait(lsn)
                .await
                .map_err(|e| ServerError::Storage(format!("cannot store the policy: {e}"))),
            Ok(None) => Ok(()),
            Err(crate::api::policy::AdoptError::Policy(m)) => Err(ServerError::Config(ConfigError::new("policy", m))),
            Err(crate::api::policy::AdoptError::Storage(m)) => {
                Err(ServerError::Storage(format!("cannot store the policy: {m}")))
            }
        };
        if let Err(e) = adopted {
            let _ = stop_tx.send(true);
            for t in accept_tasks {
                let _ = t.await;
            }
            remove_sockets(&sockets);
            return Err(e);
        }
        let waiting = Waiting::install(engine.clone(), state.clock.clone(), state.metrics.waiting.clone());
        let waiter_task = tokio::spawn(waiting.clone().run(stop_rx.clone()));
        let snapshots = match (&storage, &cluster) {
            (Some(s), _) => Some(s.snapshots().clone()),
            (None, Some(c)) => Some(c.node.state_machine.snapshots().clone()),
            (None, None) => None,
        };
        let feed = crate::events::EventFeed::new(engine.clone(), snapshots.clone());
        let floor = match (&storage, &cluster) {
            (Some(s), _) => s.event_floor(),
            (None, Some(c)) => c.node.state_machine.event_floor(),
            (None, None) => Arc::new(AtomicU64::new(u64::MAX)),
        };
        let data_dir = (storage.is_some() || cluster.is_some()).then(|| state.started_config.storage.data_dir.clone());
        let webhooks = match Webhooks::start(
            webhooks,
            data_dir.as_deref(),
            feed.clone(),
            floor,
            state.clock.clone(),
            state.metrics.webhooks.clone(),
            state.started_config.storage.durability,
        ) {
            Ok(w) => Arc::new(match &cluster {
                Some(c) => {
                    let c = c.clone();
                    w.only_while(Arc::new(move || c.node.serving()))
                }
                None => w,
            }),
            Err(e) => {
                let _ = stop_tx.send(true);
                for t in accept_tasks {
                    let _ = t.await;
                }
                let _ = waiter_task.await;
                remove_sockets(&sockets);
                return Err(match e {
                    StorageError::Corrupt(_) => ServerError::Recovery(e),
                    e => ServerError::Storage(e.to_string()),
                });
            }
        };
        let webhook_task = tokio::spawn(webhooks.clone().run(stop_rx.clone()));
        let _ = state.core.set(Core {
            durable: engine.durable_watch(),
            engine: engine.clone(),
            waiting,
            feed,
            webhooks,
            stop: stop_rx.clone(),
            snapshots,
            cluster: cluster.clone(),
        });
        state.ready.store(true, Ordering::Release);
        state.metrics.ready.set(1);
        tracing::info!("ready");
        crate::notify::notify("READY=1\nSTATUS=serving");

        let maintenance = tokio::spawn(maintain(
            state.clone(),
            storage.clone(),
            cluster.clone(),
            stop_rx.clone(),
        ));
        let storage_failed = async {
            match &storage {
                Some(s) => s.journal().failed().await,
                None => std::future::pending().await,
            }
        };
        let failure = tokio::select! {
            _ = shutdown => None,
            _ = storage_failed => storage.as_ref().and_then(|s| s.journal().failure()),
        };
        match &failure {
            None => tracing::info!("shutting down"),
            Some(f) => tracing::error!(error = %f, "stopping: the WAL failed"),
        }
        state.shutting_down.store(true, Ordering::Release);
        state.metrics.ready.set(0);
        crate::notify::notify("STOPPING=1\nSTATUS=shutting down");
        let _ = stop_tx.send(true);
        for t in accept_tasks {
            let _ = t.await;
        }
        if let Some(mut t) = grpc_task {
            // Open gRPC calls finish; Envoy's idle connections are told to go.
            if tokio::time::timeout(grace, &mut t).await.is_err() {
                t.abort();
            }
        }
        let _ = maintenance.await;
        let _ = waiter_task.await;
        let _ = webhook_task.await;
        // Every accept task has ended: no connection is added from here on.
        if tokio::time::timeout(grace, connections.drain()).await.is_err() {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "open connections did not finish within the grace period"
            );
        }
        let mut result = failure.map_or(Ok(()), |f| Err(ServerError::Storage(f)));
        if let Some(c) = cluster {
            // Raft stops; the log and the last snapshot hold everything committed.
            let _ = c.node.raft.shutdown().await;
        }
        if let Some(storage) = storage {
            let now = state.clock.now_ms();
            let closed = tokio::task::spawn_blocking(move || {
                // No snapshot after a WAL failure: memory may hold changes that
                // were refused (503) and must not become durable now.
                if storage.journal().failure().is_none() {
                    match storage.snapshot(&engine, now) {
                        Ok(r) => tracing::info!(min_lsn = r.min_lsn, bytes = r.bytes, "final snapshot written"),
                        Err(e) => tracing::error!(error = %e, "final snapshot failed; the WAL still has everything"),
                    }
                }
                storage.close()
            })
            .await
            .expect("closing storage does not panic");
            if let (Err(e), Ok(())) = (closed, &result) {
                result = Err(ServerError::Storage(e.to_string()));
            }
        }
        remove_sockets(&sockets);
        result
    }
}

fn remove_sockets(sockets: &[PathBuf]) {
    for p in sockets {
        if let Err(e) = std::fs::remove_file(p) {
            tracing::warn!(path = %p.display(), error = %e, "could not remove socket file");
        }
    }
}

/// Binds every address of `addrs` (sockets get the configured mode and group).
async fn bind_all(config: &Config, addrs: &[ListenAddr]) -> Result<Vec<Bound>, ServerError> {
    let mut listeners = Vec::new();
    for addr in addrs {
        let bind_err = |source| ServerError::Bind {
            addr: addr.to_string(),
            source,
        };
        let bound = match addr {
            ListenAddr::Tcp(a) => Bound::Tcp(listen_tcp(a).await.map_err(bind_err)?),
            ListenAddr::Unix(path) => {
                clear_stale_socket(path).await.map_err(bind_err)?;
                let l = listen_unix(path).map_err(bind_err)?;
                restrict_socket(path, &config.server.socket_mode, config.server.socket_group.as_deref())
                    .map_err(bind_err)?;
                Bound::Unix(l, path.clone())
            }
        };
        listeners.push(bound);
    }
    Ok(listeners)
}

fn bound_addrs(listeners: &[Bound]) -> Vec<ListenAddr> {
    listeners
        .iter()
        .map(|l| match l {
            Bound::Tcp(t) => ListenAddr::Tcp(t.local_addr().map(|a| a.to_string()).unwrap_or_default()),
            Bound::Unix(_, p) => ListenAddr::Unix(p.clone()),
        })
        .collect()
}

/// Accepted connections as a stream, for tonic. Accept errors (EMFILE and
/// friends) are logged and waited out rather than ending the server.
fn incoming<L, IO, F>(listener: L, accept: F) -> impl futures_util::Stream<Item = std::io::Result<IO>>
where
    L: Send + 'static,
    F: for<'a> Fn(&'a L) -> futures_util::future::BoxFuture<'a, std::io::Result<IO>> + Send + 'static,
{
    futures_util::stream::unfold((listener, accept), |(l, accept)| async move {
        loop {
            match accept(&l).await {
                Ok(io) => return Some((Ok(io), (l, accept))),
                Err(e) => {
                    tracing::warn!(error = %e, "the gRPC listener could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// Serves Envoy's rate limit service on `bound` until `stop_rx` turns true.
fn spawn_grpc(
    state: Arc<AppState>,
    subject_key: String,
    bound: Bound,
    metrics: Arc<crate::metrics::GatewayMetrics>,
    stop_rx: &watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let svc = crate::gateway::envoy::service(state, subject_key, metrics).max_decoding_message_size(1 << 20);
    let mut stop = stop_rx.clone();
    tokio::spawn(async move {
        let signal = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .concurrency_limit_per_connection(1024)
            .add_service(svc);
        let served = match bound {
            Bound::Tcp(l) => {
                let conns = incoming(l, |l: &TcpListener| {
                    Box::pin(async move {
                        let (s, _) = l.accept().await?;
                        let _ = s.set_nodelay(true);
                        Ok(s)
                    })
                });
                server.serve_with_incoming_shutdown(conns, signal).await
            }
            Bound::Unix(l, _) => {
                let conns = incoming(l, |l: &UnixListener| Box::pin(async move { Ok(l.accept().await?.0) }));
                server.serve_with_incoming_shutdown(conns, signal).await
            }
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "Envoy's rate limit service stopped");
        }
    })
}

fn spawn_accept_loops(
    router: axum::Router,
    direct: Option<Arc<api::direct::DirectApi>>,
    listeners: Vec<Bound>,
    connections: &Arc<Connections>,
    header_timeout: Duration,
    stop_rx: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut builder = hyper::server::conn::http1::Builder::new();
    // With a timer, hyper times the head of every request: on a fresh
    // connection and on a kept-alive one waiting for its next request.
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    listeners
        .into_iter()
        .map(|l| {
            let (router, builder, connections) = (router.clone(), builder.clone(), connections.clone());
            let direct = direct.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        r = accept(&l) => match r {
                            Ok(Accepted::Tcp(s)) => {
                                let _ = s.set_nodelay(true);
                                connections.serve(s, &router, &builder, direct.as_ref().map(|d| (d, header_timeout)));
                            }
                            Ok(Accepted::Unix(s)) => {
                                connections.serve(s, &router, &builder, direct.as_ref().map(|d| (d, header_timeout)))
                            }
                            Err(e) => {
                                // EMFILE and friends: back off rather than spin.
                                tracing::warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        },
                        _ = stop.changed() => break,
                    }
                }
            })
        })
        .collect()
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Bound) -> io::Result<Accepted> {
    match l {
        Bound::Tcp(t) => t.accept().await.map(|(s, _)| Accepted::Tcp(s)),
        Bound::Unix(u, _) => u.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

/// Expires due reservations without waiting for a request, collects garbage,
/// and takes a snapshot when enough has been logged since the last one.
async fn maintain(
    state: Arc<AppState>,
    storage: Option<Arc<Storage>>,
    cluster: Option<Arc<api::cluster::ClusterApi>>,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(engine) = state.engine().cloned() else { return };
    // On a cluster node, expiry, garbage collection and breaker ticks are the
    // leader's records; other nodes apply them when they arrive.
    let leads = || cluster.as_ref().is_none_or(|c| c.node.serving());
    let mut led = false;
    let mut expiry = tokio::time::interval(EXPIRY_TICK);
    let mut gc = tokio::time::interval(GC_TICK);
    let mut snap = tokio::time::interval(SNAPSHOT_CHECK_TICK);
    for t in [&mut expiry, &mut gc, &mut snap] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = expiry.tick() => {
                if !leads() {
                    if std::mem::take(&mut led) {
                        if let Some(core) = state.core.get() {
                            core.waiting.abort_all(
                                "this node stopped leading while the call waited; nothing was charged: retry, on any \
                                 node",
                            );
                        }
                    }
                    continue;
                }
                led = true;
                if let Some(c) = &cluster {
                    seed_policy(&state, c, &engine).await;
                }
                engine.expire_due(state.clock.now_ms());
                if let Err(e) = engine.tick_signals(state.clock.now_ms()) {
                    tracing::error!(error = %e, "closing due circuit breakers failed");
                }
            }
            _ = gc.tick() => {
                if !leads() {
                    continue;
                }
                if let Err(e) = engine.gc(state.clock.now_ms(), GC_BUDGET) {
                    tracing::error!(error = %e, "garbage collection failed");
                }
            }
            _ = snap.tick() => {
                if let Some(c) = &cluster {
                    // Raft snapshots by entry count; memory backlogs ask for one too.
                    if Storage::backlog_due(&engine) {
                        let _ = c.node.raft.trigger().snapshot().await;
                    }
                    continue;
                }
                let Some(storage) = storage.clone().filter(|s| s.snapshot_due(&engine)) else { continue };
                let (engine, now) = (engine.clone(), state.clock.now_ms());
                // Blocking work off the async workers; requests keep being served.
                let r = tokio::task::spawn_blocking(move || storage.snapshot(&engine, now)).await;
                match r {
                    Ok(Ok(r)) => tracing::info!(min_lsn = r.min_lsn, bytes = r.bytes, segments_removed = r.segments_removed,
                        duration_ms = r.duration.as_millis() as u64, "snapshot written"),
                    Ok(Err(e)) => tracing::error!(error = %e, "snapshot failed; the WAL still has everything"),
                    Err(e) => tracing::error!(error = %e, "snapshot task panicked"),
                }
            }
        }
    }
}

/// A cluster node's options from `[cluster]` (its secret read).
fn cluster_options(
    config: &Config,
    c: &crate::config::ClusterConfig,
) -> Result<crate::cluster::NodeOptions, ServerError> {
    let timing = c.check(config)?;
    let secret = c.secret()?;
    let raft_listen = std::net::ToSocketAddrs::to_socket_addrs(&c.raft_listen)
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ConfigError::new("cluster.raft_listen", format!("{:?} does not resolve", c.raft_listen)))?;
    Ok(crate::cluster::NodeOptions {
        node_id: c.node_id,
        raft_listen,
        secret: Arc::from(secret),
        peers: c
            .peers
            .iter()
            .map(|p| {
                (
                    p.id,
                    crate::cluster::types::Peer {
                        raft: p.raft.clone(),
                        api: p.api.clone(),
                    },
                )
            })
            .collect(),
        heartbeat: Duration::from_millis(timing.heartbeat_ms),
        election_timeout: Duration::from_millis(timing.election_timeout_ms),
        snapshot_every: config.storage.snapshot_every_records,
        logs_kept: 1000,
        data_dir: config.storage.data_dir.clone(),
        segment_bytes_max: config.storage.segment_bytes_max,
        test_hooks: std::env::var("QUOTAD_CLUSTER_TEST_HOOKS").is_ok_and(|v| v == "1"),
        exit_on_fatal: true,
    })
}

/// Locks the data directory and starts the cluster node on it.
async fn start_node(
    options: crate::cluster::NodeOptions,
    policy: Policy,
    config: &Config,
) -> Result<(crate::cluster::Node, std::fs::File), ServerError> {
    let lock = crate::storage::lock_dir(&options.data_dir).map_err(ServerError::Recovery)?;
    let daemon = config.clone();
    let compile: crate::cluster::state_machine::Compile = Arc::new(move |v| {
        let doc = v.policy_doc()?;
        Policy::compile(&doc, &daemon).map_err(|e| format!("{}: {}", e.key, e.message))
    });
    let node = crate::cluster::Node::start(options, policy, compile)
        .await
        .map_err(|e| ServerError::Storage(format!("cannot start the cluster node: {e}")))?;
    tracing::info!(node_id = node.options.node_id, raft = %node.raft_addr, "cluster node started");
    Ok((node, lock))
}

/// On a cluster's leader with no stored policy yet (a new cluster): the
/// configuration file's policy becomes version 1.
async fn seed_policy(state: &AppState, c: &api::cluster::ClusterApi, engine: &Engine) {
    if engine.policy_version().is_some() || !c.node.serving() {
        return;
    }
    match crate::api::policy::adopt_at_start(engine, &state.started_config, state.clock.now_ms()) {
        Ok(Some(lsn)) => match engine.durable_watch().wait(lsn).await {
            Ok(()) => tracing::info!("the configuration file's policy is version 1 of this cluster"),
            Err(e) => tracing::warn!(error = %e, "storing the cluster's first policy failed; retrying"),
        },
        Ok(None) => {}
        Err(e) => tracing::warn!(error = ?e, "storing the cluster's first policy failed; retrying"),
    }
}
