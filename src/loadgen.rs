//! `quotad bench`: a load generator shipped in the binary, as redis-benchmark
//! ships with Redis. Keep-alive HTTP/1.1 connections over TCP or a Unix socket
//! send decisions for random subjects; it reports throughput, latency
//! percentiles (hdrhistogram), denials and errors, as text or JSON.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::client::{Conn, Target};

/// What each request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchOp {
    /// `POST /v1/consume`.
    Consume,
    /// `POST /v1/check`.
    Check,
    /// `POST /v1/reserve` then `POST /v1/reservations/{id}/commit` (one operation).
    ReserveCommit,
    /// `POST /v1/batch` of `--batch-size` consumes.
    Batch,
    /// `GET /healthz`: the HTTP ceiling of the same server.
    Noop,
}

impl BenchOp {
    /// Whether requests of this operation can be pipelined (`--pipeline`):
    /// each is one request whose answer nothing after it needs.
    pub fn pipelines(self) -> bool {
        matches!(self, BenchOp::Noop | BenchOp::Consume | BenchOp::Check)
    }
}

/// Load settings.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The daemon.
    pub target: Target,
    /// Concurrent keep-alive connections.
    pub connections: usize,
    /// Stop after this long (after the warm-up)…
    pub duration: Option<Duration>,
    /// …or after this many operations.
    pub requests: Option<u64>,
    /// Not measured, at the start.
    pub warmup: Duration,
    /// Subjects are `{prefix}0` .. `{prefix}{subjects-1}`, picked at random.
    pub subjects: u64,
    /// Prefix of the subject names (`user:` by default).
    pub subject_prefix: String,
    /// The operation.
    pub op: BenchOp,
    /// Consumes per batch request.
    pub batch_size: usize,
    /// Requests a connection sends before reading their answers (consume,
    /// check and noop; 1 for the others).
    pub pipeline: usize,
    /// Tokens per decision (0: only `requests` is sent).
    pub tokens: u64,
    /// Event of every decision.
    pub event: Option<String>,
    /// Attributes of every decision.
    pub attributes: std::collections::BTreeMap<String, String>,
    /// Bearer token.
    pub token: Option<String>,
    /// Client threads.
    pub threads: usize,
    /// Show progress on stderr.
    pub progress: bool,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The operation.
    pub op: BenchOp,
    /// Where.
    pub target: String,
    /// Connections.
    pub connections: usize,
    /// Operations completed in the measured interval.
    pub operations: u64,
    /// Decisions in them (batch: operations × batch size).
    pub decisions: u64,
    /// Measured interval.
    pub seconds: f64,
    /// Operations per second.
    pub ops_per_sec: f64,
    /// Decisions per second.
    pub decisions_per_sec: f64,
    /// Requests each connection sent at once (pipelined).
    pub pipeline: usize,
    /// Latency percentiles of one operation (with pipelining, of the
    /// group it was sent in), in microseconds.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Slowest.
    pub max_us: u64,
    /// Denied decisions.
    pub denied: u64,
    /// Failed operations (non-200 answers, connection errors).
    pub errors: u64,
}

struct Shared {
    stop: AtomicBool,
    /// Operations started, for `--requests`.
    started: AtomicU64,
    /// Operations completed (progress).
    done: AtomicU64,
    measure_from: Instant,
}

struct ConnStats {
    hist: Histogram<u64>,
    ops: u64,
    denied: u64,
    errors: u64,
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        // xorshift64*: cheap, and good enough to spread subjects.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

fn count(haystack: &[u8], needle: &[u8]) -> u64 {
    haystack.windows(needle.len()).filter(|w| *w == needle).count() as u64
}

fn decision_body(cfg: &BenchConfig, rng: &mut Rng, op: Option<&str>) -> String {
    let subject = rng.below(cfg.subjects);
    let op = op.map_or(String::new(), |o| format!("\"op\":\"{o}\","));
    let mut extra = String::new();
    if let Some(e) = &cfg.event {
        extra.push_str(&format!(",\"event\":{}", serde_json::Value::from(e.as_str())));
    }
    if !cfg.attributes.is_empty() {
        extra.push_str(&format!(
            ",\"attributes\":{}",
            serde_json::to_string(&cfg.attributes).expect("strings serialize")
        ));
    }
    if cfg.tokens > 0 {
        extra.push_str(&format!(",\"amounts\":{{\"tokens\":{}}}", cfg.tokens));
    }
    let prefix = serde_json::to_string(&cfg.subject_prefix).expect("strings serialize");
    let prefix = &prefix[1..prefix.len() - 1];
    format!("{{{op}\"subject\":\"{prefix}{subject}\"{extra}}}")
}

/// What a round trip did.
#[derive(Default)]
struct Trip {
    /// Operations answered.
    ops: u64,
    /// Operations that failed: answered with another status than 200, or
    /// never answered.
    failed: u64,
    /// Denied decisions among the answered.
    denied: u64,
}

impl Trip {
    fn one(ok: bool, denied: u64) -> Trip {
        Trip {
            ops: 1,
            failed: u64::from(!ok),
            denied,
        }
    }
}

/// One round trip of `trip` requests (more than one only pipelined: consume,
/// check and noop). An error means the connection is no longer usable; it
/// carries what the round trip did up to then.
async fn one(cfg: &BenchConfig, c: &mut Conn, rng: &mut Rng, trip: u64) -> Result<Trip, Trip> {
    let token = cfg.token.as_deref();
    let denied = |b: &[u8]| count(b, b"\"allowed\":false");
    let broken = || Trip {
        failed: 1,
        ..Trip::default()
    };
    match cfg.op {
        op @ (BenchOp::Noop | BenchOp::Consume | BenchOp::Check) => {
            let (method, path) = match op {
                BenchOp::Noop => ("GET", "/healthz"),
                BenchOp::Consume => ("POST", "/v1/consume"),
                _ => ("POST", "/v1/check"),
            };
            for _ in 0..trip {
                let body = if cfg.op == BenchOp::Noop {
                    String::new()
                } else {
                    decision_body(cfg, rng, None)
                };
                c.queue(token, method, path, body.as_bytes());
            }
            let mut done = Trip::default();
            if c.send().await.is_ok() {
                for _ in 0..trip {
                    let Ok(st) = c.answer().await else {
                        break;
                    };
                    done.ops += 1;
                    done.failed += u64::from(st != 200);
                    done.denied += denied(c.body());
                }
            }
            if done.ops < trip {
                done.failed += trip - done.ops;
                return Err(done);
            }
            Ok(done)
        }
        BenchOp::Batch => {
            let ops: Vec<String> = (0..cfg.batch_size)
                .map(|_| decision_body(cfg, rng, Some("consume")))
                .collect();
            let body = format!("{{\"operations\":[{}]}}", ops.join(","));
            let st = c
                .exchange(token, "POST", "/v1/batch", body.as_bytes())
                .await
                .map_err(|_| broken())?;
            Ok(Trip::one(
                st == 200 && count(c.body(), b"\"status\":200") == cfg.batch_size as u64,
                denied(c.body()),
            ))
        }
        BenchOp::ReserveCommit => {
            let st = c
                .exchange(token, "POST", "/v1/reserve", decision_body(cfg, rng, None).as_bytes())
                .await
                .map_err(|_| broken())?;
            if st != 200 {
                return Ok(Trip::one(false, 0));
            }
            let text = String::from_utf8_lossy(c.body());
            let Some(id) = text
                .split("\"reservation_id\":\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
            else {
                return Ok(Trip::one(true, denied(c.body()))); // denied: nothing to commit
            };
            let path = format!("/v1/reservations/{id}/commit");
            let st = c.exchange(token, "POST", &path, b"{}").await.map_err(|_| broken())?;
            Ok(Trip::one(st == 200, 0))
        }
    }
}

async fn connection(cfg: Arc<BenchConfig>, shared: Arc<Shared>, seed: u64) -> ConnStats {
    let mut stats = ConnStats {
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
        ops: 0,
        denied: 0,
        errors: 0,
    };
    let mut rng = Rng(seed | 1);
    let mut conn = None;
    let per_trip = if cfg.op.pipelines() {
        cfg.pipeline.max(1) as u64
    } else {
        1
    };
    while !shared.stop.load(Ordering::Relaxed) {
        // The last round trip of a `--requests` run takes what is left.
        let mut trip = per_trip;
        if let Some(n) = cfg.requests {
            let before = shared.started.fetch_add(per_trip, Ordering::Relaxed);
            if before >= n {
                break;
            }
            trip = per_trip.min(n - before);
        }
        let s = match &mut conn {
            Some(s) => s,
            None => match Conn::open(&cfg.target).await {
                Ok(s) => conn.insert(s),
                Err(_) => {
                    // The requests this round trip took are not sent: failed.
                    stats.errors += trip;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let t0 = Instant::now();
        let r = one(&cfg, s, &mut rng, trip).await;
        if s.closed() {
            conn = None;
        }
        let measured = t0 >= shared.measure_from;
        if r.is_err() {
            conn = None;
        }
        if measured {
            let (Ok(t) | Err(t)) = r;
            stats.ops += t.ops;
            stats.denied += t.denied;
            stats.errors += t.failed;
            if t.ops > 0 {
                let _ = stats.hist.record_n((t0.elapsed().as_micros() as u64).max(1), t.ops);
            }
        }
        shared.done.fetch_add(trip, Ordering::Relaxed);
    }
    stats
}

/// Runs the load and reports.
pub fn run(cfg: BenchConfig) -> BenchReport {
    // One thread (the default) is a current-thread runtime: no cross-thread
    // wake-ups, like single-threaded redis-benchmark.
    let runtime = if cfg.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.threads)
            .enable_all()
            .build()
    }
    .expect("a runtime");
    runtime.block_on(async move {
        let cfg = Arc::new(cfg);
        let start = Instant::now();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            started: AtomicU64::new(0),
            done: AtomicU64::new(0),
            measure_from: start + cfg.warmup,
        });
        let tasks: Vec<_> = (0..cfg.connections)
            .map(|i| tokio::spawn(connection(cfg.clone(), shared.clone(), 0x9e37_79b9 ^ (i as u64) << 20)))
            .collect();
        let progress = {
            let (cfg, shared) = (cfg.clone(), shared.clone());
            tokio::spawn(async move {
                let mut last = 0;
                let end = cfg.duration.map(|d| start + cfg.warmup + d);
                let mut tick = start + Duration::from_secs(1);
                loop {
                    // Wake at the next progress tick or at the end, whichever
                    // is first: a fractional warm-up or duration must not
                    // stretch the run to the next whole second.
                    let wake = end.map_or(tick, |e| e.min(tick));
                    tokio::time::sleep_until(wake.into()).await;
                    if end.is_some_and(|e| Instant::now() >= e) {
                        shared.stop.store(true, Ordering::Relaxed);
                        break;
                    }
                    tick += Duration::from_secs(1);
                    let done = shared.done.load(Ordering::Relaxed);
                    if cfg.progress {
                        eprint!("\r  {done} operations, {} /s      ", done - last);
                    }
                    last = done;
                }
            })
        };
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
        let (mut ops, mut denied, mut errors) = (0, 0, 0);
        for t in tasks {
            let s = t.await.expect("connection task");
            hist.add(&s.hist).expect("same bounds");
            ops += s.ops;
            denied += s.denied;
            errors += s.errors;
        }
        progress.abort();
        if cfg.progress {
            eprintln!();
        }
        let seconds = shared.measure_from.elapsed().as_secs_f64().max(1e-9);
        let per_op = if cfg.op == BenchOp::Batch {
            cfg.batch_size as u64
        } else {
            1
        };
        BenchReport {
            op: cfg.op,
            target: cfg.target.to_string(),
            connections: cfg.connections,
            pipeline: cfg.pipeline,
            operations: ops,
            decisions: ops * per_op,
            seconds,
            ops_per_sec: ops as f64 / seconds,
            decisions_per_sec: (ops * per_op) as f64 / seconds,
            p50_us: hist.value_at_quantile(0.50),
            p90_us: hist.value_at_quantile(0.90),
            p99_us: hist.value_at_quantile(0.99),
            p999_us: hist.value_at_quantile(0.999),
            max_us: hist.max(),
            denied,
            errors,
        }
    })
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |us: u64| us as f64 / 1000.0;
        writeln!(
            f,
            "quotad bench: {:?}, {} connections{}, {}",
            self.op,
            self.connections,
            if self.pipeline > 1 {
                format!(" of {} pipelined requests", self.pipeline)
            } else {
                String::new()
            },
            self.target
        )?;
        writeln!(
            f,
            "  {} operations in {:.2} s: {:.0} ops/s, {:.0} decisions/s",
            self.operations, self.seconds, self.ops_per_sec, self.decisions_per_sec
        )?;
        writeln!(
            f,
            "  latency: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
            ms(self.p50_us),
            ms(self.p90_us),
            ms(self.p99_us),
            ms(self.p999_us),
            ms(self.max_us)
        )?;
        write!(f, "  denied {}, errors {}", self.denied, self.errors)
    }
}
