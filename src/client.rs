//! A small HTTP/1.1 client over TCP or a Unix socket, for the `quotad` CLI
//! subcommands, the Docker health check and `quotad bench`.

use std::path::PathBuf;
use std::time::Duration;

use std::io::Write as _;

use hyper::Method;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Where the daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `host:port`.
    Tcp(String),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp(a) => f.write_str(a),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach quotad at {target}: {message}")]
pub struct ClientError {
    /// Where.
    pub target: String,
    /// What happened.
    pub message: String,
}

/// An answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The JSON body (Null if it was not JSON).
    pub body: Value,
}

/// A client for one daemon.
#[derive(Debug, Clone)]
pub struct Client {
    /// Where to connect.
    pub target: Target,
    /// Bearer token, if the daemon wants one.
    pub token: Option<String>,
    /// Limit on connecting plus answering.
    pub timeout: Duration,
}

impl Client {
    /// Sends one request on a fresh connection.
    pub async fn request(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Answer, ClientError> {
        self.request_with(method, path, body, &[]).await
    }

    /// Sends one request with extra headers (`If-Match`, …).
    pub async fn request_with(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Answer, ClientError> {
        let err = |m: String| ClientError {
            target: self.target.to_string(),
            message: m,
        };
        tokio::time::timeout(self.timeout, self.send(method, path, body, headers))
            .await
            .map_err(|_| err(format!("no answer within {} ms", self.timeout.as_millis())))?
            .map_err(err)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Answer, String> {
        let payload = body.map(|v| v.to_string()).unwrap_or_default();
        let mut conn = Conn::open(&self.target).await?;
        conn.headers = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        let status = conn
            .exchange(self.token.as_deref(), method.as_str(), path, payload.as_bytes())
            .await?;
        Ok(Answer {
            status,
            body: serde_json::from_slice(conn.body()).unwrap_or(Value::Null),
        })
    }
}

impl Client {
    /// GETs `path` and copies the answer's body into `out` as it arrives,
    /// whatever its length or framing (the streamed CSV export), with
    /// reqwest rather than [`Conn`], which reads whole answers with a
    /// length. Answers the status; for an error status, the body is read as
    /// JSON into the answer instead of being copied. `Ok(None)` when `out`
    /// stopped taking bytes (a closed pipe): the copy ended early, on purpose.
    pub async fn download(&self, path: &str, out: &mut dyn std::io::Write) -> Result<Option<Answer>, ClientError> {
        let err = |m: String| ClientError {
            target: self.target.to_string(),
            message: m,
        };
        let builder = reqwest::Client::builder()
            .connect_timeout(self.timeout)
            .read_timeout(self.timeout)
            .redirect(reqwest::redirect::Policy::none());
        let (builder, base) = match &self.target {
            Target::Tcp(a) => (builder, format!("http://{a}")),
            Target::Unix(p) => (builder.unix_socket(p.as_path()), "http://localhost".to_string()),
        };
        let http = builder.build().map_err(|e| err(e.to_string()))?;
        let mut req = http.get(format!("{base}{path}"));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let mut resp = req.send().await.map_err(|e| err(plain(&e)))?;
        let status = resp.status().as_u16();
        if status >= 400 {
            let bytes = resp.bytes().await.map_err(|e| err(plain(&e)))?;
            return Ok(Some(Answer {
                status,
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            }));
        }
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| err(format!("the answer broke off: {}", plain(&e))))?
        {
            if out.write_all(&chunk).is_err() {
                return Ok(None);
            }
        }
        if out.flush().is_err() {
            return Ok(None);
        }
        Ok(Some(Answer {
            status,
            body: Value::Null,
        }))
    }
}

/// A reqwest error with its causes, in words.
fn plain(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

/// One keep-alive connection speaking just enough HTTP/1.1 for quotad's own
/// answers (always with a content length): a request is written with one
/// syscall and the answer is read into a reused buffer. The CLI sends one
/// request on it; `quotad bench` sends many, as wrk and redis-benchmark do, so
/// the load generator's CPU per request stays small on a machine it shares
/// with the daemon.
pub struct Conn {
    io: Box<dyn Io>,
    /// Request being written.
    out: Vec<u8>,
    /// Bytes read and not yet consumed.
    inp: Vec<u8>,
    /// The last answer's body.
    body: Vec<u8>,
    /// The server said it closes the connection after the last answer.
    closed: bool,
    /// Extra header lines sent with every request, each ending in CRLF.
    headers: String,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Conn {
    /// Connects (TCP with Nagle off, or a Unix socket).
    pub async fn open(target: &Target) -> Result<Conn, String> {
        let io: Box<dyn Io> = match target {
            Target::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            Target::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await.map_err(|e| e.to_string())?),
        };
        Ok(Conn {
            io,
            out: Vec::with_capacity(512),
            inp: Vec::with_capacity(4096),
            body: Vec::with_capacity(4096),
            closed: false,
            headers: String::new(),
        })
    }

    /// Sends one request and reads its answer into `self.body`; returns the status.
    /// An error means the connection is no longer usable; so does an answer
    /// after which [`Conn::closed`] is true.
    pub async fn exchange(
        &mut self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<u16, String> {
        self.queue(token, method, path, body);
        self.send().await?;
        self.answer().await
    }

    /// Adds a request to those [`Conn::send`] sends.
    pub fn queue(&mut self, token: Option<&str>, method: &str, path: &str, body: &[u8]) {
        let _ = write!(self.out, "{method} {path} HTTP/1.1\r\nhost: quotad\r\n");
        if let Some(t) = token {
            let _ = write!(self.out, "authorization: Bearer {t}\r\n");
        }
        self.out.extend_from_slice(self.headers.as_bytes());
        if !body.is_empty() {
            let _ = write!(
                self.out,
                "content-type: application/json\r\ncontent-length: {}\r\n",
                body.len()
            );
        }
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(body);
    }

    /// Writes the queued requests in one write.
    pub async fn send(&mut self) -> Result<(), String> {
        let sent = self.io.write_all(&self.out).await.map_err(|e| e.to_string());
        self.out.clear();
        sent
    }

    /// Reads the next answer into `self.body`; returns the status.
    pub async fn answer(&mut self) -> Result<u16, String> {
        // Head: read until it parses.
        let (status, head_len, content_length, close) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.inp).map_err(|e| format!("bad answer: {e}"))? {
                httparse::Status::Complete(n) => {
                    let mut length = None;
                    let mut close = false;
                    for h in resp.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            length = std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.trim().parse::<usize>().ok());
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            return Err("chunked answers are not supported by the benchmark client".into());
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            close = h.value.eq_ignore_ascii_case(b"close");
                        }
                    }
                    break (resp.code.unwrap_or(0), n, length.unwrap_or(0), close);
                }
                httparse::Status::Partial => self.fill().await?,
            }
        };
        while self.inp.len() < head_len + content_length {
            self.fill().await?;
        }
        self.body.clear();
        self.body
            .extend_from_slice(&self.inp[head_len..head_len + content_length]);
        self.inp.drain(..head_len + content_length);
        self.closed = close;
        Ok(status)
    }

    /// Whether the server closed the connection after the last answer.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// The last answer's body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    async fn fill(&mut self) -> Result<(), String> {
        if self.inp.len() > 16 << 20 {
            return Err("answer over 16 MiB".into());
        }
        let n = self.io.read_buf(&mut self.inp).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the server closed the connection".into());
        }
        Ok(())
    }
}
