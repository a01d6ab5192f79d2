//! Listeners and lifecycle: binds TCP and Unix sockets, serves the API router on
//! each accepted connection (at most `server.max_connections` at once), runs the
//! maintenance task (reservation expiry, garbage collection), and shuts down
//! gracefully when the `shutdown` future resolves.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};

use crate::api::{self, AppState, Token};
use crate::clock::Clock;
use crate::config::{Config, ConfigError, ListenAddr};
use crate::engine::{Engine, Policy};
use crate::journal::{Journal, NullJournal};
use crate::metrics::Metrics;

/// How often due reservations are expired even when no request arrives.
const EXPIRY_TICK: Duration = Duration::from_millis(250);
/// How often garbage collection runs.
const GC_TICK: Duration = Duration::from_secs(10);
/// Items dropped per shard per GC pass, so one pass never stalls requests long.
const GC_BUDGET: usize = 10_000;
/// A client must finish sending request headers within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

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
}

enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A bound, not yet running server.
pub struct Server {
    /// Shared with every handler.
    state: Arc<AppState>,
    /// Bound sockets.
    listeners: Vec<Bound>,
    /// How long shutdown waits for open requests.
    grace: Duration,
    /// Open connections at most.
    max_connections: usize,
}

fn load_tokens(config: &Config) -> Result<Vec<Token>, ConfigError> {
    config
        .auth
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let secret = match (&t.token, &t.token_file) {
                (Some(s), _) => s.clone(),
                (None, Some(path)) => {
                    let s = std::fs::read_to_string(path).map_err(|e| {
                        ConfigError::new(
                            format!("auth.tokens[{i}].token_file"),
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?;
                    let s = s.trim().to_string();
                    if s.len() < 16 {
                        return Err(ConfigError::new(
                            format!("auth.tokens[{i}].token_file"),
                            format!("{} holds a token shorter than 16 characters", path.display()),
                        ));
                    }
                    s
                }
                (None, None) => unreachable!("sanitize requires one"),
            };
            Ok(Token {
                secret: secret.into_bytes(),
                role: t.role,
            })
        })
        .collect()
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
    /// Compiles the config, builds the engine and binds every listen address.
    pub async fn bind(config: &Config, clock: Arc<dyn Clock>) -> Result<Server, ServerError> {
        Self::bind_with_journal(config, clock, Arc::new(NullJournal::default())).await
    }

    /// As [`Server::bind`], with the journal the engine writes to.
    pub async fn bind_with_journal(
        config: &Config,
        clock: Arc<dyn Clock>,
        journal: Arc<dyn Journal>,
    ) -> Result<Server, ServerError> {
        config.sanitize()?;
        let policy = Policy::compile(config)?;
        let tokens = load_tokens(config)?;
        let engine = Arc::new(Engine::new(policy, journal));
        let mut listeners = Vec::new();
        for addr in config.listen_addrs() {
            let bind_err = |source| ServerError::Bind {
                addr: addr.to_string(),
                source,
            };
            let bound = match &addr {
                ListenAddr::Tcp(a) => Bound::Tcp(TcpListener::bind(a.as_str()).await.map_err(bind_err)?),
                ListenAddr::Unix(path) => {
                    clear_stale_socket(path).await.map_err(bind_err)?;
                    Bound::Unix(UnixListener::bind(path).map_err(bind_err)?, path.clone())
                }
            };
            listeners.push(bound);
        }
        let state = Arc::new(AppState {
            durable: engine.durable_watch(),
            engine,
            clock,
            tokens,
            metrics: Metrics::default(),
            ready: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            max_body_bytes: config.server.max_body_bytes,
        });
        Ok(Server {
            state,
            listeners,
            grace: Duration::from_millis(config.server.shutdown_grace_ms),
            max_connections: config.server.max_connections,
        })
    }

    /// The addresses actually bound (TCP port 0 resolved).
    pub fn local_addrs(&self) -> Vec<ListenAddr> {
        self.listeners
            .iter()
            .map(|l| match l {
                Bound::Tcp(t) => ListenAddr::Tcp(t.local_addr().map(|a| a.to_string()).unwrap_or_default()),
                Bound::Unix(_, p) => ListenAddr::Unix(p.clone()),
            })
            .collect()
    }

    /// Handler state (engine, metrics), for embedding and tests.
    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting, refuses new writes,
    /// waits up to the grace period for open requests and removes socket files.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        let Server {
            state,
            listeners,
            grace,
            max_connections,
        } = self;
        let router = api::router(state.clone());
        let graceful = Arc::new(GracefulShutdown::new());
        let permits = Arc::new(Semaphore::new(max_connections));
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut sockets = Vec::new();
        let mut accept_tasks = Vec::new();
        for l in listeners {
            if let Bound::Unix(_, p) = &l {
                sockets.push(p.clone());
            }
            let router = router.clone();
            let permits = permits.clone();
            let mut stop = stop_rx.clone();
            let graceful = graceful.clone();
            accept_tasks.push(tokio::spawn(async move {
                loop {
                    let permit = tokio::select! {
                        p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
                        _ = stop.changed() => break,
                    };
                    let svc = TowerToHyperService::new(router.clone());
                    let builder = {
                        let mut b = hyper::server::conn::http1::Builder::new();
                        b.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
                        b
                    };
                    let conn_fut: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = tokio::select! {
                        r = accept(&l) => match r {
                            Ok(Accepted::Tcp(s)) => {
                                let _ = s.set_nodelay(true);
                                let c = builder.serve_connection(TokioIo::new(s), svc);
                                let c = graceful.watch(c);
                                Box::pin(async move { let _ = c.await; })
                            }
                            Ok(Accepted::Unix(s)) => {
                                let c = builder.serve_connection(TokioIo::new(s), svc);
                                let c = graceful.watch(c);
                                Box::pin(async move { let _ = c.await; })
                            }
                            Err(e) => {
                                // EMFILE and friends: back off rather than spin.
                                tracing::warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        },
                        _ = stop.changed() => break,
                    };
                    tokio::spawn(async move {
                        conn_fut.await;
                        drop(permit);
                    });
                }
            }));
        }

        let maintenance = tokio::spawn(maintain(state.clone(), stop_rx.clone()));
        state.ready.store(true, Ordering::Release);
        tracing::info!("ready");

        shutdown.await;
        tracing::info!("shutting down");
        state.shutting_down.store(true, Ordering::Release);
        let _ = stop_tx.send(true);
        for t in accept_tasks {
            let _ = t.await;
        }
        let _ = maintenance.await;
        // Every accept task has ended and dropped its handle, so this one is the last.
        let graceful = Arc::try_unwrap(graceful).expect("accept tasks have finished");
        if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "open connections did not finish within the grace period"
            );
        }
        for p in sockets {
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!(path = %p.display(), error = %e, "could not remove socket file");
            }
        }
        Ok(())
    }
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

/// Expires due reservations without waiting for a request, and collects garbage.
async fn maintain(state: Arc<AppState>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ticks_per_gc = (GC_TICK.as_millis() / EXPIRY_TICK.as_millis()) as u64;
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let now = state.clock.now_ms();
        state.engine.expire_due(now);
        n += 1;
        if n % ticks_per_gc == 0 {
            if let Err(e) = state.engine.gc(now, GC_BUDGET) {
                tracing::error!(error = %e, "garbage collection failed");
            }
        }
    }
}
