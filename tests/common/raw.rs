//! A raw HTTP/1.1 connection to a test server: bytes exactly as written,
//! answers read head by head, and whether the server closes.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::TestServer;

/// Generous: the requirements here are about seconds, not milliseconds.
pub const CLOSED_WITHIN: Duration = Duration::from_secs(5);

pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A raw connection to the server, and what was read past the last answer.
pub struct Raw {
    /// The socket.
    pub io: Box<dyn Stream>,
    /// Bytes read and not yet taken.
    pub buf: Vec<u8>,
}

pub async fn raw(s: &TestServer) -> Raw {
    let io: Box<dyn Stream> = match s.socket_path() {
        Some(p) => Box::new(tokio::net::UnixStream::connect(p).await.unwrap()),
        None => Box::new(tokio::net::TcpStream::connect(s.cli_target()[1].clone()).await.unwrap()),
    };
    Raw { io, buf: Vec::new() }
}

impl Raw {
    pub async fn send(&mut self, bytes: &str) {
        self.io.write_all(bytes.as_bytes()).await.unwrap();
    }

    /// Reads until `buf` holds `n` bytes; false at EOF.
    pub async fn fill(&mut self, n: usize) -> bool {
        while self.buf.len() < n {
            let mut chunk = [0u8; 4096];
            match self.io.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
            }
        }
        true
    }

    /// The next head, `100 Continue` included.
    pub async fn head(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..i + 4]).to_string();
                self.buf.drain(..i + 4);
                return head;
            }
            let len = self.buf.len();
            assert!(
                self.fill(len + 1).await,
                "closed before an answer: {}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    /// The next final answer: (status, head, body).
    pub async fn answer(&mut self) -> (u16, String, String) {
        loop {
            let head = self.head().await;
            let status: u16 = head[9..12].parse().unwrap();
            if status == 100 {
                continue;
            }
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            assert!(self.fill(length).await, "closed inside an answer");
            let body = String::from_utf8_lossy(&self.buf[..length]).to_string();
            self.buf.drain(..length);
            return (status, head, body);
        }
    }

    /// Waits for `100 Continue`: the server has begun the request and reads its body.
    pub async fn continued(&mut self) {
        let head = self.head().await;
        assert!(head.starts_with("HTTP/1.1 100"), "{head}");
    }

    /// Whether the server closes the connection (EOF or reset) within
    /// `CLOSED_WITHIN`; what it sends first is returned.
    pub async fn closed(&mut self) -> Option<String> {
        let all = tokio::time::timeout(CLOSED_WITHIN, self.fill(usize::MAX)).await;
        all.ok().map(|_| String::from_utf8_lossy(&self.buf).to_string())
    }
}
