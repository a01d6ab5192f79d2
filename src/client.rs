//! A small HTTP/1.1 client over TCP or a Unix socket, for the `quotad` CLI
//! subcommands and the Docker health check.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;

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
        let err = |m: String| ClientError {
            target: self.target.to_string(),
            message: m,
        };
        tokio::time::timeout(self.timeout, self.send(method, path, body))
            .await
            .map_err(|_| err(format!("no answer within {} ms", self.timeout.as_millis())))?
            .map_err(err)
    }

    async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Answer, String> {
        let mut b = Request::builder().method(method).uri(path).header("host", "quotad");
        if let Some(t) = &self.token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let payload = body.map(|v| v.to_string()).unwrap_or_default();
        if body.is_some() {
            b = b.header("content-type", "application/json");
        }
        let req = b.body(Full::new(Bytes::from(payload))).map_err(|e| e.to_string())?;
        let resp = match &self.target {
            Target::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                exchange(TokioIo::new(s), req).await?
            }
            Target::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p).await.map_err(|e| e.to_string())?;
                exchange(TokioIo::new(s), req).await?
            }
        };
        Ok(resp)
    }
}

async fn exchange<T>(io: T, req: Request<Full<Bytes>>) -> Result<Answer, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Answer {
        status,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    })
}
