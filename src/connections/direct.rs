//! The direct request path: every API connection starts here. Requests to the
//! decision endpoints and to commit or release a reservation
//! (`crate::api::direct`) are read with httparse into one
//! reused buffer and answered in place, with no dispatcher, router or
//! middleware chain between the socket and the decision: the hot loop of the
//! durable consume path. The first request this path does not take (another
//! endpoint, a chunked body, `Expect`, `Upgrade`, HTTP/1.0, a query string, a
//! head httparse refuses, a cluster node) hands the connection and the bytes
//! already read to hyper, which serves it from there on. Whole requests
//! that arrived together (pipelined) are decided in order at once and
//! answered in one write, so that one sync makes them all durable.
//!
//! What hyper does for a connection is kept: the head of every request
//! (a kept-alive connection's wait for its next one included) must arrive
//! within `server.header_timeout_ms`; an evicted or draining connection
//! closes when no request is in flight and answers the one that is first;
//! answers carry `Date` and `Content-Length`; `Connection: close` from
//! either side ends the connection after the answer.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::response::Response;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{InFlight, Slot, EVICT_LINGER};
use crate::api::direct::{rate_figures, Answer, DirectApi, Endpoint};
use crate::engine::Decision;
use crate::metrics::ConnectionMetrics;

/// A head longer than this goes to hyper, which has its own limit and answer.
const MAX_HEAD: usize = 16 * 1024;
/// Headers httparse reads on this path; a request with more goes to hyper.
const MAX_HEADERS: usize = 32;

/// How a connection left the direct path.
pub(super) enum End<S> {
    /// hyper serves it from here on: the socket, the bytes read and not yet
    /// answered, and how many requests were answered here (hyper's framing
    /// scanner numbers requests on from there).
    HandOff {
        io: S,
        read: Vec<u8>,
        answered: u32,
        evicted: bool,
    },
    /// The connection is done.
    Closed,
}

/// A request head this path answers.
struct Head {
    /// What it asks for.
    endpoint: Endpoint,
    /// Its headers but for `Content-Length` and `Connection`, which are
    /// read into `body` and `close`.
    headers: HeaderMap,
    /// The head's length in bytes.
    len: usize,
    /// The body's `Content-Length` (0 when absent).
    body: u64,
    /// `Connection: close`.
    close: bool,
}

/// What the bytes read so far hold.
enum Parsed {
    /// A whole head this path answers.
    Ours(Head),
    /// A head that is not whole yet.
    Partial,
    /// A request (or bytes) for hyper.
    Theirs,
}

/// Parses the head at the start of `buf`.
fn parse(api: &DirectApi, buf: &[u8]) -> Parsed {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut raw);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Parsed::Partial,
        _ => return Parsed::Theirs,
    };
    if req.version != Some(1) {
        return Parsed::Theirs;
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Parsed::Theirs;
    };
    let Some(endpoint) = api.endpoint(method, target) else {
        return Parsed::Theirs;
    };
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    let mut body = None;
    let mut close = false;
    for h in req.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            return Parsed::Theirs;
        };
        if name == header::CONTENT_LENGTH {
            // Exactly one, of digits only: anything else is hyper's to refuse.
            let digits = h.value.iter().all(u8::is_ascii_digit) && !h.value.is_empty() && h.value.len() <= 18;
            if body.is_some() || !digits {
                return Parsed::Theirs;
            }
            body = std::str::from_utf8(h.value).ok().and_then(|v| v.parse::<u64>().ok());
            // Framing is this path's own: the answer reads `body`, not the map.
            continue;
        } else if name == header::CONNECTION {
            match h.value {
                v if v.eq_ignore_ascii_case(b"close") => close = true,
                v if v.eq_ignore_ascii_case(b"keep-alive") => {}
                _ => return Parsed::Theirs,
            }
            continue;
        } else if name == header::TRANSFER_ENCODING || name == header::EXPECT || name == header::UPGRADE {
            return Parsed::Theirs;
        }
        let Ok(value) = HeaderValue::from_bytes(h.value) else {
            return Parsed::Theirs;
        };
        headers.append(name, value);
    }
    Parsed::Ours(Head {
        endpoint,
        headers,
        len,
        body: body.unwrap_or(0),
        close,
    })
}

/// Serves `io` until it closes or needs hyper.
pub(super) async fn serve<S>(
    api: &DirectApi,
    mut io: S,
    slot: &Arc<Slot>,
    drain: &mut watch::Receiver<bool>,
    header_timeout: Duration,
    metrics: &ConnectionMetrics,
) -> End<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    let mut json: Vec<u8> = Vec::with_capacity(512);
    // What arrives while a request is decided.
    let mut early: Vec<u8> = Vec::new();
    let mut answered: u32 = 0;
    let mut closing = *drain.borrow_and_update();
    // One timer for the connection, re-armed only when it fires before the
    // head it guards is late (so not once per request).
    let timer = tokio::time::sleep(header_timeout);
    tokio::pin!(timer);
    loop {
        // The head of the next request.
        let mut deadline = Instant::now() + header_timeout;
        let head = loop {
            if !buf.is_empty() {
                match parse(api, &buf) {
                    Parsed::Ours(h) => break h,
                    Parsed::Theirs => {
                        return End::HandOff {
                            io,
                            read: buf,
                            answered,
                            evicted: slot.evicted.load(Ordering::Relaxed),
                        }
                    }
                    Parsed::Partial => {}
                }
            } else if closing {
                return End::Closed;
            }
            tokio::select! {
                biased;
                r = io.read_buf(&mut buf) => match r {
                    Ok(0) | Err(_) => return End::Closed,
                    Ok(_) => {}
                },
                () = &mut timer => {
                    if Instant::now() >= deadline {
                        if !slot.evicted.load(Ordering::Relaxed) {
                            metrics.header_timeouts.inc();
                        }
                        return End::Closed;
                    }
                    timer.as_mut().reset(deadline);
                }
                _ = slot.evict.notified(), if !closing => {
                    // A connection chosen while a head is half sent gets a
                    // moment to finish it, as hyper's graceful close does.
                    closing = true;
                    deadline = deadline.min(Instant::now() + EVICT_LINGER);
                    timer.as_mut().reset(deadline);
                }
                _ = drain.changed(), if !closing => closing = true,
            }
        };
        slot.begin();
        answered = answered.wrapping_add(1);
        let in_flight = InFlight(slot.clone());
        // Whole requests read behind this one (pipelined), decided at once
        // and answered in the same write: (answer, `Connection: close`),
        // and each one's place in the connection's requests in flight.
        let mut more = Vec::new();
        let mut flights = Vec::new();
        let mut consumed = head.len + head.body as usize;

        let (answer, body_read) = match api.refuse(head.endpoint.route(), &head.headers) {
            Some(refused) => (Answer::Other(refused), false),
            None if head.body > api.max_body_bytes() as u64 => (Answer::Other(api.too_large()), false),
            None => {
                let end = consumed;
                match read_to(&mut io, &mut buf, end, api.body_timeout()).await {
                    Ok(true) => {
                        // A client that leaves while its call waits for
                        // capacity is taken out of the queue, as through
                        // hyper: the call is dropped when the socket closes.
                        // Only a call that may wait (its body names
                        // `wait_ms`) is watched, so a client that pipelined
                        // and then half-closed gets its other answers; and
                        // only while nothing past it is buffered, so a client
                        // that sends faster than it is answered meets TCP's
                        // backpressure, not a growing buffer.
                        let body = &buf[head.len..end];
                        let may_wait = may_ask_to_wait(body);
                        let watch = buf.len() == end && may_wait;
                        let answer = api.answer(&head.endpoint, &head.headers, body);
                        // The requests behind it are decided now, in order,
                        // so that one sync makes them all durable; but not
                        // past a call that may wait, which must be admitted
                        // before anything after it is decided, nor on a
                        // connection that ends with this answer.
                        if !may_wait && !head.close && !closing {
                            let found = pipelined(api, &buf, end);
                            more.reserve_exact(found.len());
                            flights.reserve_exact(found.len());
                            for (next, body) in found {
                                consumed = body.end;
                                slot.begin();
                                answered = answered.wrapping_add(1);
                                flights.push(InFlight(slot.clone()));
                                // Boxed: an answer's future is large, and one
                                // in place is not copied again on its way to
                                // being awaited.
                                let answer = Box::pin(api.answer(&next.endpoint, &next.headers, &buf[body]));
                                more.push((answer, next.close));
                            }
                        }
                        tokio::pin!(answer);
                        let answer = loop {
                            tokio::select! {
                                biased;
                                a = &mut answer => break a,
                                r = io.read_buf(&mut early), if watch && early.is_empty() => match r {
                                    Ok(0) | Err(_) => return End::Closed,
                                    Ok(_) => {}
                                },
                            }
                        };
                        (answer, true)
                    }
                    Ok(false) => (Answer::Other(api.body_timed_out()), false),
                    Err(_) => return End::Closed,
                }
            }
        };
        // The last answer written says whether the connection ends; a
        // refusal before the body was read leaves it unread, so the
        // connection ends with it.
        let ends = |answer: &Answer, asked: bool, last: bool| {
            let refused = matches!(answer, Answer::Other(r) if is_closing(r));
            let evicted = slot.evicted.load(Ordering::Relaxed);
            refused || (last && (asked || !body_read || closing || evicted || *drain.borrow()))
        };
        out.clear();
        let mut close = ends(&answer, head.close, more.is_empty());
        encode_answer(answer, close, &mut out, &mut json).await;
        let n = more.len();
        for (i, (next, asked)) in more.into_iter().enumerate() {
            if close {
                // Decided and not answered, as when a client goes away
                // mid-pipeline (a retry with its idempotency key is safe);
                // the decision endpoints' answers never end a connection,
                // so this is a guard, not a path.
                break;
            }
            let next = next.await;
            close = ends(&next, asked, i + 1 == n);
            encode_answer(next, close, &mut out, &mut json).await;
        }
        let written = io.write_all(&out).await;
        drop(in_flight);
        drop(flights);
        if written.is_err() || close {
            let _ = io.shutdown().await;
            return End::Closed;
        }
        buf.drain(..consumed);
        buf.append(&mut early);
    }
}

/// Requests pipelined in at most one write of answers.
const MAX_PIPELINED: usize = 32;

/// Whether a body may ask to wait for capacity: it names `wait_ms`, or holds
/// a `\u` escape, which could spell the name another way.
fn may_ask_to_wait(body: &[u8]) -> bool {
    body.windows(9).any(|w| w == b"\"wait_ms\"") || body.windows(2).any(|w| w == b"\\u")
}

/// The whole requests in `buf` from `from` on, with where their bodies
/// lie, until one this path does not answer at once (a partial one, another
/// endpoint, a refusal, a body over the limit, a call that may wait for
/// capacity), one that says `Connection: close`, or [`MAX_PIPELINED`] in
/// all with the one before `from`.
fn pipelined(api: &DirectApi, buf: &[u8], mut from: usize) -> Vec<(Head, std::ops::Range<usize>)> {
    let mut found = Vec::new();
    while from < buf.len() && found.len() + 1 < MAX_PIPELINED {
        let Parsed::Ours(head) = parse(api, &buf[from..]) else {
            break;
        };
        if head.body > api.max_body_bytes() as u64 || api.refuse(head.endpoint.route(), &head.headers).is_some() {
            break;
        }
        let body = from + head.len..from + head.len + head.body as usize;
        if body.end > buf.len() || may_ask_to_wait(&buf[body.clone()]) {
            break;
        }
        from = body.end;
        let close = head.close;
        found.push((head, body));
        if close {
            break;
        }
    }
    found
}

/// Writes a direct answer into `out`.
async fn encode_answer(answer: Answer, close: bool, out: &mut Vec<u8>, json: &mut Vec<u8>) {
    match answer {
        Answer::Decision(d) => encode_decision(&d, close, out, json),
        Answer::Other(resp) => encode(resp, close, out).await,
    }
}

/// Reads until `buf` holds `end` bytes, within `timeout`: false when it ran out.
async fn read_to<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
    end: usize,
    timeout: Duration,
) -> io::Result<bool> {
    if buf.len() >= end {
        return Ok(true);
    }
    buf.reserve(end - buf.len());
    let read = async {
        while buf.len() < end {
            if io.read_buf(buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(r) => r.map(|()| true),
        Err(_) => Ok(false),
    }
}

/// Whether an answer ends its connection.
fn is_closing(resp: &Response) -> bool {
    resp.headers()
        .get(header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"))
}

/// Writes a decision as the router's handler answers it (200, JSON, the
/// rate-limit headers) into `out`, with no header map or body in between;
/// `json` is scratch space.
fn encode_decision(d: &Decision, close: bool, out: &mut Vec<u8>, json: &mut Vec<u8>) {
    json.clear();
    super::decision_json::write_decision(d, json);
    out.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n");
    let mut digits = itoa::Buffer::new();
    for (name, value) in rate_figures(d).into_iter().flatten() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(digits.format(value).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    end_head(json.len(), close, out);
    out.extend_from_slice(json);
}

/// Writes `resp` as an HTTP/1.1 answer into `out`, saying `Connection: close`
/// when it is the connection's last.
async fn encode(resp: Response, close: bool, out: &mut Vec<u8>) {
    let (parts, body) = resp.into_parts();
    // The API's answers here are whole buffers: this does not wait.
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH || name == header::DATE || name == header::CONNECTION {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    end_head(body.len(), close, out);
    out.extend_from_slice(&body);
}

/// The head's last lines: `Connection: close` for the last answer, the
/// body's length and the date.
fn end_head(body: usize, close: bool, out: &mut Vec<u8>) {
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(body).as_bytes());
    out.extend_from_slice(b"\r\ndate: ");
    date(out);
    out.extend_from_slice(b"\r\n\r\n");
}

/// Appends the current time as an HTTP date, formatted once a second per thread.
fn date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHED: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|(at, text)| {
        if *at != secs {
            *at = secs;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(text.as_bytes());
    });
}
