//! Admission latency of a waiting call after capacity returns. Run with
//! `cargo bench --bench waiting` (QUOTAD_BENCH_ROUNDS sets the count, default
//! 2000; QUOTAD_BENCH_DURABILITY=batch for the batch mode).
//!
//! A daemon in this process, with durable storage in a temp dir (fsync by
//! default), listens on 127.0.0.1. Each round: a reserve takes the only unit
//! of a fixed one-minute limit (its end is always within the wait), a
//! consume with `wait_ms` parks behind it, and a release
//! gives the unit back. Measured: from sending the release to the waiter's
//! answer (the waiter's admission is a durable decision of its own), and, as
//! the baseline of the same run, the release's own round trip.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quotad::client::{Conn, Target};
use quotad::clock::SystemClock;
use quotad::config::{Config, ListenAddr};
use quotad::server::Server;

const CONFIG: &str = r#"
[engine]
max_wait_ms = 600000

[[plans]]
name = "p"
default = true
  [[plans.limits]]
  name = "one-at-a-time"
  period = "1m"
  max = 1
"#;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

async fn exchange(c: &mut Conn, method: &str, path: &str, body: &str) -> serde_json::Value {
    let status = c.exchange(None, method, path, body.as_bytes()).await.expect("answer");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(c.body()));
    serde_json::from_slice(c.body()).expect("json")
}

fn main() {
    let rounds: usize = std::env::var("QUOTAD_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let durability = std::env::var("QUOTAD_BENCH_DURABILITY").unwrap_or_else(|_| "fsync".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::from_toml(CONFIG, "bench.toml").unwrap();
        config.server.listen = vec!["127.0.0.1:0".into()];
        config.storage.data_dir = dir.path().join("data");
        config.storage.durability = match durability.as_str() {
            "batch" => quotad::config::Durability::Batch,
            _ => quotad::config::Durability::Fsync,
        };
        let server = Server::bind(&config, Arc::new(SystemClock)).await.unwrap();
        let ListenAddr::Tcp(addr) = server.local_addrs().remove(0) else {
            unreachable!()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        let target = Target::Tcp(addr);
        let mut admin = loop {
            if let Ok(c) = Conn::open(&target).await {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        loop {
            if admin.exchange(None, "GET", "/readyz", b"").await == Ok(200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut waiter = Conn::open(&target).await.unwrap();
        let mut admitted = Vec::with_capacity(rounds);
        let mut release_rtt = Vec::with_capacity(rounds);
        for i in 0..rounds {
            let subject = format!("s{i}");
            let held = exchange(
                &mut admin,
                "POST",
                "/v1/reserve",
                &format!(r#"{{"subject":"{subject}"}}"#),
            )
            .await;
            let id = held["reservation_id"].as_str().unwrap().to_string();
            let body = format!(r#"{{"subject":"{subject}","wait_ms":600000}}"#);
            let (tx, rx) = tokio::sync::oneshot::channel();
            let mut w = std::mem::replace(&mut waiter, Conn::open(&target).await.unwrap());
            tokio::spawn(async move {
                let status = w.exchange(None, "POST", "/v1/consume", body.as_bytes()).await.unwrap();
                let at = Instant::now();
                let v: serde_json::Value = serde_json::from_slice(w.body()).unwrap();
                assert_eq!(status, 200);
                assert_eq!(v["allowed"], true, "{v}");
                let _ = tx.send(at);
            });
            // Parked: a check now answers limit_exceeded (the unit is held).
            tokio::time::sleep(Duration::from_millis(2)).await;
            let t0 = Instant::now();
            exchange(&mut admin, "POST", &format!("/v1/reservations/{id}/release"), "{}").await;
            release_rtt.push(t0.elapsed());
            let at = rx.await.unwrap();
            admitted.push(at.duration_since(t0));
        }
        admitted.sort();
        release_rtt.sort();
        println!(
            "waiting/{durability}: {rounds} rounds; admission after release: p50 {:.0} µs, p99 {:.0} µs; \
             release round trip (baseline): p50 {:.0} µs, p99 {:.0} µs",
            percentile(&admitted, 0.5),
            percentile(&admitted, 0.99),
            percentile(&release_rtt, 0.5),
            percentile(&release_rtt, 0.99),
        );
        let _ = stop.send(());
        let _ = handle.await;
    });
}
