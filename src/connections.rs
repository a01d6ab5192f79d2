//! Open connections: the registry that holds them to `server.max_connections`,
//! and what each one is served through. At the cap a new connection closes
//! the one idle longest with no request in flight (never-used connections
//! included), so connections that send nothing cannot lock the listener out;
//! only when every open connection has a request in flight is the new one
//! closed at once. Each connection counts its requests in flight (a wrapper
//! around the router and its answer bodies) and has its incoming bytes
//! followed by [`framing`], which marks a request whose head carried both
//! `Content-Length` and `Transfer-Encoding` for the API to refuse.

mod decision_json;
pub(crate) mod direct;
mod framing;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify};
use tower::ServiceExt;

use crate::api::direct::DirectApi;
use crate::metrics::ConnectionMetrics;
use framing::Scanner;

/// How long an evicted connection may still take to write out an answer
/// hyper had buffered (its request is done) before it is dropped.
const EVICT_LINGER: Duration = Duration::from_millis(100);

/// Set in `Slot::conflicting` next to the number of the request that had both lengths.
const CONFLICT_FLAG: u64 = 1 << 32;

/// In the extensions of a request whose head carried both `Content-Length`
/// and `Transfer-Encoding` (hyper keeps only the latter).
#[derive(Debug, Clone, Copy)]
pub struct ConflictingLengths;

/// Every open connection, for eviction and shutdown.
pub struct Connections {
    /// Open connections by id: locked on accept and close, never per request.
    open: Mutex<Open>,
    /// `server.max_connections`.
    max: usize,
    /// Idle times are counted from here.
    epoch: Instant,
    /// Turns true when shutdown begins; every connection task holds a receiver.
    drain: watch::Sender<bool>,
    /// Open, evicted and refused connections.
    metrics: Arc<ConnectionMetrics>,
}

/// The registry's locked part.
struct Open {
    /// Each open connection's shared state.
    slots: HashMap<u64, Arc<Slot>>,
    /// The id of the next connection.
    next_id: u64,
}

/// What a connection shares with the registry.
struct Slot {
    /// Its key in the registry.
    id: u64,
    /// Requests begun (high 32 bits, wrapping) and requests in flight (low
    /// 32 bits): one atomic add starts a request.
    activity: AtomicU64,
    /// When the last request ended, or the connection opened, in µs after the
    /// registry's epoch.
    idle_since: AtomicU64,
    /// `CONFLICT_FLAG` | the number of the request whose head had both lengths; 0 if none.
    conflicting: AtomicU64,
    /// Told when the registry evicts the connection.
    evict: Notify,
    /// Set when the registry evicts the connection (the direct path checks
    /// it between pipelined requests, where it does not wait on `evict`).
    evicted: AtomicBool,
    /// The registry's epoch.
    epoch: Instant,
}

impl Slot {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn in_flight(&self) -> u64 {
        self.activity.load(Ordering::Relaxed) & 0xffff_ffff
    }

    /// Starts a request; returns its number on the connection (1 for the first, wrapping).
    fn begin(&self) -> u32 {
        let before = self.activity.fetch_add((1 << 32) | 1, Ordering::Relaxed);
        ((before >> 32) as u32).wrapping_add(1)
    }
}

/// A request in flight; dropping it (its answer is written, or the
/// connection is gone) ends it.
struct InFlight(Arc<Slot>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.idle_since.store(self.0.now(), Ordering::Relaxed);
        self.0.activity.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connections {
    /// A registry for at most `max` connections.
    pub fn new(max: usize, metrics: Arc<ConnectionMetrics>) -> Arc<Connections> {
        Arc::new(Connections {
            open: Mutex::new(Open {
                slots: HashMap::new(),
                next_id: 0,
            }),
            max,
            epoch: Instant::now(),
            drain: watch::channel(false).0,
            metrics,
        })
    }

    /// Registers a new connection, at the cap evicting the one idle longest
    /// with no request in flight; `None` when every one has a request in flight.
    fn admit(&self) -> Option<Arc<Slot>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.slots.len() >= self.max {
            // A scan (O(open), under the lock) only at the cap, so that a
            // request touches nothing but its own connection's counters.
            let victim = open
                .slots
                .values()
                .filter(|s| s.in_flight() == 0)
                .min_by_key(|s| s.idle_since.load(Ordering::Relaxed))
                .map(|s| s.id)?;
            if let Some(v) = open.slots.remove(&victim) {
                v.evicted.store(true, Ordering::Relaxed);
                v.evict.notify_one();
                self.metrics.evicted.inc();
            }
        }
        let id = open.next_id;
        open.next_id += 1;
        let slot = Arc::new(Slot {
            id,
            activity: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            conflicting: AtomicU64::new(0),
            evict: Notify::new(),
            evicted: AtomicBool::new(false),
            epoch: self.epoch,
        });
        // Idle from the moment it opened: one that never sends a request goes first.
        slot.idle_since.store(slot.now(), Ordering::Relaxed);
        open.slots.insert(id, slot.clone());
        self.metrics.open.set(open.slots.len() as i64);
        Some(slot)
    }

    fn close(&self, id: u64) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.slots.remove(&id);
        self.metrics.open.set(open.slots.len() as i64);
    }

    /// Serves an accepted connection with `router` on a task of its own, or
    /// closes it at once when every open connection has a request in flight.
    ///
    /// With `direct`, the connection starts on the direct path
    /// ([`direct`]), which hands it to hyper at its first request for
    /// another endpoint.
    pub fn serve<S>(
        self: &Arc<Self>,
        io: S,
        router: &Router,
        builder: &http1::Builder,
        direct: Option<(&Arc<DirectApi>, Duration)>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some(slot) = self.admit() else {
            self.metrics.refused.inc();
            tracing::debug!(
                max_connections = self.max,
                "refused a connection: every open connection has a request in flight"
            );
            return;
        };
        let service = Tracked {
            router: router.clone(),
            slot: slot.clone(),
        };
        let (registry, mut builder) = (self.clone(), builder.clone());
        let mut drain = self.drain.subscribe();
        let direct = direct.map(|(api, header_timeout)| (api.clone(), header_timeout));
        tokio::spawn(async move {
            let (io, read, answered, start) = match direct {
                None => (io, Vec::new(), 0, Start::Fresh),
                Some((api, header_timeout)) => {
                    match direct::serve(&api, io, &slot, &mut drain, header_timeout, &registry.metrics).await {
                        direct::End::HandOff {
                            io,
                            read,
                            answered,
                            evicted,
                        } => {
                            registry.metrics.handed_off.inc();
                            // A request already read must be answered, which
                            // hyper's graceful close would not do (it has read
                            // nothing yet): hyper answers it and closes instead.
                            let start = if evicted {
                                Start::Closing(Some(tokio::time::Instant::now() + EVICT_LINGER))
                            } else if *drain.borrow_and_update() {
                                Start::Closing(None)
                            } else {
                                Start::Fresh
                            };
                            (io, read, answered, start)
                        }
                        direct::End::Closed => {
                            registry.close(slot.id);
                            return;
                        }
                    }
                }
            };
            let io = TokioIo::new(Scanned {
                io,
                pre: read.into(),
                scanner: Scanner::after(answered),
                slot: slot.clone(),
            });
            let conn = match start {
                Start::Fresh => builder.serve_connection(io, service),
                Start::Closing(_) => builder.keep_alive(false).serve_connection(io, service),
            };
            if let Err(e) = drive(conn, &slot, drain, start).await {
                if e.is_timeout() {
                    registry.metrics.header_timeouts.inc();
                }
            }
            registry.close(slot.id);
        });
    }

    /// Asks every connection to finish its request in flight and close, and
    /// waits until all have (idle ones close at once).
    pub async fn drain(&self) {
        self.drain.send_replace(true);
        self.drain.closed().await;
    }
}

/// How hyper takes a connection over.
#[derive(Clone, Copy)]
enum Start {
    /// Served until it ends, is evicted or is drained.
    Fresh,
    /// Evicted or drained on the direct path: served without keep-alive
    /// (its request answered, then closed), within the linger if evicted.
    Closing(Option<tokio::time::Instant>),
}

/// Polls a connection until it ends, is evicted or is drained.
async fn drive<S>(
    conn: http1::Connection<TokioIo<Scanned<S>>, Tracked>,
    slot: &Slot,
    mut drain: watch::Receiver<bool>,
    start: Start,
) -> Result<(), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::pin!(conn);
    let (mut closing, mut linger) = match start {
        Start::Closing(linger) => (true, linger),
        Start::Fresh => (*drain.borrow_and_update(), None),
    };
    if closing && matches!(start, Start::Fresh) {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        // Only polled while there is a linger.
        let deadline = linger.unwrap_or_else(tokio::time::Instant::now);
        tokio::select! {
            r = conn.as_mut() => return r,
            _ = slot.evict.notified(), if !closing => {
                // Idle and fresh connections close at once; one whose request
                // began since it was chosen answers it first.
                conn.as_mut().graceful_shutdown();
                closing = true;
                linger = Some(tokio::time::Instant::now() + EVICT_LINGER);
            }
            _ = drain.changed(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tokio::time::sleep_until(deadline), if linger.is_some() => {
                // A head half sent holds hyper's graceful close; nothing is in
                // flight to lose.
                if slot.in_flight() == 0 {
                    return Ok(());
                }
                linger = None;
            }
        }
    }
}

/// The router, counting the connection's requests in flight until their
/// answers have been written, and marking a request with both lengths.
#[derive(Clone)]
struct Tracked {
    /// The API.
    router: Router,
    /// The connection's state.
    slot: Arc<Slot>,
}

impl hyper::service::Service<http::Request<Incoming>> for Tracked {
    type Response = http::Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut req: http::Request<Incoming>) -> Self::Future {
        let number = self.slot.begin();
        let in_flight = InFlight(self.slot.clone());
        if self.slot.conflicting.load(Ordering::Relaxed) == CONFLICT_FLAG | u64::from(number) {
            req.extensions_mut().insert(ConflictingLengths);
        }
        let answer = self.router.clone().oneshot(req);
        Box::pin(async move {
            let Ok(resp) = answer.await;
            Ok(resp.map(|body| TrackedBody {
                body,
                in_flight: Some(in_flight),
            }))
        })
    }
}

/// An answer body that ends its request when it has been sent whole.
struct TrackedBody {
    /// The answer.
    body: Body,
    /// Dropped at the end of the body.
    in_flight: Option<InFlight>,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.in_flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A socket whose incoming bytes pass the framing scanner; its first reads
/// return the bytes the direct path read before handing it over.
struct Scanned<S> {
    /// The socket.
    io: S,
    /// Read by the direct path and not yet taken.
    pre: Bytes,
    /// The request framing so far.
    scanner: Scanner,
    /// Where a request with both lengths is marked.
    slot: Arc<Slot>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Scanned<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = if this.pre.is_empty() {
            Pin::new(&mut this.io).poll_read(cx, buf)
        } else {
            let taken = this.pre.split_to(this.pre.len().min(buf.remaining()));
            buf.put_slice(&taken);
            if this.pre.is_empty() {
                this.pre = Bytes::new(); // lets the direct path's buffer go
            }
            Poll::Ready(Ok(()))
        };
        if let Some(n) = this.scanner.feed(&buf.filled()[before..]) {
            // hyper closes the connection after that request: the first one counts.
            let _ = this.slot.conflicting.compare_exchange(
                0,
                CONFLICT_FLAG | u64::from(n),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Scanned<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_evicts_the_longest_idle_connection_without_a_request() {
        let reg = Connections::new(3, Arc::new(ConnectionMetrics::default()));
        let a = reg.admit().unwrap();
        let b = reg.admit().unwrap();
        let c = reg.admit().unwrap();
        // a is the oldest but busy; b is idle longer than c.
        a.begin();
        c.idle_since
            .store(b.idle_since.load(Ordering::Relaxed) + 10, Ordering::Relaxed);
        let d = reg.admit().unwrap();
        assert_eq!(reg.metrics.evicted.get(), 1);
        let open = reg.open.lock().unwrap();
        assert!(open.slots.contains_key(&a.id) && open.slots.contains_key(&c.id) && open.slots.contains_key(&d.id));
        assert!(!open.slots.contains_key(&b.id));
        drop(open);
        // Every one busy: the new connection is refused.
        c.begin();
        d.begin();
        assert!(reg.admit().is_none());
        // A request ends: its connection can go.
        drop(InFlight(c.clone()));
        assert!(reg.admit().is_some());
        assert!(!reg.open.lock().unwrap().slots.contains_key(&c.id));
    }

    #[test]
    fn requests_are_numbered_from_one() {
        let reg = Connections::new(1, Arc::new(ConnectionMetrics::default()));
        let s = reg.admit().unwrap();
        assert_eq!(s.begin(), 1);
        drop(InFlight(s.clone()));
        assert_eq!(s.begin(), 2);
        assert_eq!(s.in_flight(), 1);
    }
}
