//! Test harness: runs the real server in-process on a TCP port or a Unix socket
//! in a temp dir, with an injected clock, and talks HTTP/1.1 to it with hyper.
#![allow(dead_code)]

pub mod raw;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{HeaderMap, Method, Request};
use hyper_util::rt::TokioIo;
use quotad::api::AppState;
use quotad::clock::ManualClock;
use quotad::config::{Config, ListenAddr};
use quotad::journal::{Journal, NullJournal};
use quotad::server::Server;
use serde_json::Value;
use tokio::sync::oneshot;

/// Both transports, for tests that must pass over each.
pub const TRANSPORTS: [Transport; 2] = [Transport::Tcp, Transport::Unix];

/// 2026-11-21T10:00:00Z, a Saturday.
pub const T0: u64 = 1_795_255_200_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Unix,
}

/// Milliseconds since the epoch of an RFC 3339 time.
pub fn ms(s: &str) -> u64 {
    s.parse::<jiff::Timestamp>().unwrap().as_millisecond() as u64
}

pub struct TestServer {
    pub clock: ManualClock,
    pub state: Arc<AppState>,
    pub transport: Transport,
    /// The gateway's addresses (empty without `[gateway]`).
    pub gateway: Vec<ListenAddr>,
    /// Envoy's rate limit service (none without `grpc_listen`).
    pub grpc: Option<ListenAddr>,
    addr: ListenAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| v.to_str().unwrap().to_string())
    }
    pub fn error_code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    /// The counter of `limit` in a decision or subject answer.
    pub fn counter(&self, limit: &str) -> &Value {
        self.body["counters"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["limit"] == limit))
            .unwrap_or_else(|| panic!("no counter {limit} in {}", self.body))
    }
    pub fn used(&self, limit: &str) -> u64 {
        self.counter(limit)["used"].as_u64().unwrap()
    }
    pub fn allowed(&self) -> bool {
        assert_eq!(self.status, 200, "{}", self.text);
        self.body["allowed"].as_bool().unwrap()
    }
}

impl TestServer {
    pub async fn start(toml_text: &str, transport: Transport) -> TestServer {
        Self::start_at(toml_text, transport, T0).await
    }

    /// A server with durable storage (WAL and snapshots) in a temp dir.
    pub async fn start_at(toml_text: &str, transport: Transport, now_ms: u64) -> TestServer {
        Self::start_inner(toml_text, transport, now_ms, None, None).await
    }

    /// A server keeping its state in `data_dir`, so a test can stop and restart it.
    pub async fn start_durable(
        toml_text: &str,
        transport: Transport,
        now_ms: u64,
        data_dir: &std::path::Path,
    ) -> TestServer {
        Self::start_inner(toml_text, transport, now_ms, None, Some(data_dir)).await
    }

    /// A server started from a config file (its listen addresses are replaced),
    /// so that reload re-reads that file.
    pub async fn start_file(path: &std::path::Path, transport: Transport) -> TestServer {
        let text = std::fs::read_to_string(path).unwrap();
        Self::start_full(&text, transport, T0, None, None, Some(path.to_path_buf())).await
    }

    /// A server keeping state in memory only.
    pub async fn start_in_memory(toml_text: &str, transport: Transport, now_ms: u64) -> TestServer {
        Self::start_with(toml_text, transport, now_ms, Arc::new(NullJournal::default())).await
    }

    /// A server keeping state in memory, journaling to `journal`.
    pub async fn start_with(
        toml_text: &str,
        transport: Transport,
        now_ms: u64,
        journal: Arc<dyn Journal>,
    ) -> TestServer {
        Self::start_inner(toml_text, transport, now_ms, Some(journal), None).await
    }

    async fn start_inner(
        toml_text: &str,
        transport: Transport,
        now_ms: u64,
        journal: Option<Arc<dyn Journal>>,
        data_dir: Option<&std::path::Path>,
    ) -> TestServer {
        Self::start_full(toml_text, transport, now_ms, journal, data_dir, None).await
    }

    /// A durable server on `clock` (then `self.clock` is not the server's).
    pub async fn start_on_clock(
        toml_text: &str,
        transport: Transport,
        clock: Arc<dyn quotad::clock::Clock>,
        data_dir: &std::path::Path,
    ) -> TestServer {
        Self::start_any(toml_text, transport, T0, None, Some(data_dir), None, Some(clock)).await
    }

    async fn start_full(
        toml_text: &str,
        transport: Transport,
        now_ms: u64,
        journal: Option<Arc<dyn Journal>>,
        data_dir: Option<&std::path::Path>,
        config_path: Option<std::path::PathBuf>,
    ) -> TestServer {
        Self::start_any(toml_text, transport, now_ms, journal, data_dir, config_path, None).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn start_any(
        toml_text: &str,
        transport: Transport,
        now_ms: u64,
        journal: Option<Arc<dyn Journal>>,
        data_dir: Option<&std::path::Path>,
        config_path: Option<std::path::PathBuf>,
        server_clock: Option<Arc<dyn quotad::clock::Clock>>,
    ) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::from_toml(toml_text, "test.toml").expect("test config is valid");
        config.server.listen = vec![match transport {
            Transport::Tcp => "127.0.0.1:0".to_string(),
            Transport::Unix => format!("unix:{}", dir.path().join("q.sock").display()),
        }];
        config.storage.data_dir = data_dir.map_or_else(|| dir.path().join("data"), |d| d.to_path_buf());
        let clock = ManualClock::new(now_ms);
        let server_clock = server_clock.unwrap_or_else(|| Arc::new(clock.clone()));
        let server = match journal {
            Some(j) => Server::bind_with_journal(&config, server_clock, j).await,
            None => Server::bind(&config, server_clock).await,
        }
        .expect("server binds");
        let server = match config_path {
            Some(p) => server.with_config_path(p),
            None => server,
        };
        let addr = server.local_addrs().remove(0);
        let gateway = server.gateway_addrs();
        let grpc = server.grpc_addr();
        let state = server.state();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            server
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        let s = TestServer {
            clock,
            state,
            transport,
            gateway,
            grpc,
            addr,
            stop: Some(stop),
            handle: Some(handle),
            _dir: dir,
        };
        s.ready().await;
        s
    }

    /// CLI arguments that reach this server: `--addr A` or `--socket P`.
    pub fn cli_target(&self) -> Vec<String> {
        match &self.addr {
            ListenAddr::Tcp(a) => vec!["--addr".into(), a.clone()],
            ListenAddr::Unix(p) => vec!["--socket".into(), p.display().to_string()],
        }
    }

    pub fn socket_path(&self) -> Option<std::path::PathBuf> {
        match &self.addr {
            ListenAddr::Unix(p) => Some(p.clone()),
            ListenAddr::Tcp(_) => None,
        }
    }

    /// A new keep-alive connection.
    pub async fn connect(&self) -> Client {
        let sender = match &self.addr {
            ListenAddr::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a.as_str()).await.unwrap();
                handshake(TokioIo::new(s)).await
            }
            ListenAddr::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p).await.unwrap();
                handshake(TokioIo::new(s)).await
            }
        };
        Client { sender }
    }

    pub async fn req(&self, method: &str, path: &str, body: Option<&str>, headers: &[(&str, &str)]) -> Resp {
        self.connect().await.req(method, path, body, headers).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Resp {
        self.req("POST", path, Some(&body.to_string()), &[]).await
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.req("GET", path, None, &[]).await
    }

    pub async fn put(&self, path: &str, body: Value) -> Resp {
        self.req("PUT", path, Some(&body.to_string()), &[]).await
    }

    pub async fn consume(&self, body: Value) -> Resp {
        self.post("/v1/consume", body).await
    }

    /// Waits until recovery has finished (bounded).
    pub async fn ready(&self) {
        for _ in 0..1000 {
            if self.get("/readyz").await.status == 200 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("server did not become ready");
    }

    pub async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.handle.take().unwrap().await.unwrap();
    }

    /// The state digest (admin endpoint).
    pub async fn digest(&self) -> serde_json::Value {
        let r = self.get("/v1/admin/digest").await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.body
    }
}

async fn handshake<T>(io: T) -> SendRequest<Full<Bytes>>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

pub struct Client {
    sender: SendRequest<Full<Bytes>>,
}

impl Client {
    pub async fn req(&mut self, method: &str, path: &str, body: Option<&str>, headers: &[(&str, &str)]) -> Resp {
        let mut b = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(path)
            .header("host", "quotad");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::from(body.unwrap_or("").to_string()))).unwrap();
        self.sender.ready().await.unwrap();
        let resp = self.sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).to_string();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            body,
            text,
        }
    }

    pub async fn post(&mut self, path: &str, body: &Value) -> Resp {
        self.req("POST", path, Some(&body.to_string()), &[]).await
    }
}
