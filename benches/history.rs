//! Usage history on disk and its queries. Run with `cargo bench --bench
//! history` (QUOTAD_BENCH_SUBJECTS sets the subject count, default 100000;
//! QUOTAD_BENCH_DIMENSIONS=model keeps usage per model too, each subject's
//! calls on one of two models).
//! A day of traffic: every subject charged once an hour for 24 hours, a
//! snapshot after each hour (what moves buckets to disk), then the size the
//! history added to snapshot.redb per subject and day, one subject's 30-day
//! query, and the month export of every subject, each timed.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::time::Instant;

use quotad::config::Config;
use quotad::engine::{DecideOp, DecisionRequest, Policy};
use quotad::storage::snapshot::Grain;
use quotad::storage::Storage;

/// 2026-11-01T00:00:00Z.
const T0: u64 = 1_793_491_200_000;
const HOUR: u64 = 3_600_000;
const DAY: u64 = 24 * HOUR;

fn main() {
    let n: usize = std::env::var("QUOTAD_BENCH_SUBJECTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let dims = std::env::var("QUOTAD_BENCH_DIMENSIONS").unwrap_or_default();
    let dir = tempfile::tempdir().unwrap();
    let history = if dims.is_empty() {
        String::new()
    } else {
        format!("[history]\ndimensions = [\"{dims}\"]\n")
    };
    let text = format!(
        "metrics = [\"tokens\"]\n{history}[storage]\ndata_dir = \"{}\"\ndurability = \"batch\"\n\
         [[plans]]\nname = \"p\"\ndefault = true\n[[plans.limits]]\nname = \"d\"\nmetric = \"tokens\"\nperiod = \"1d\"\nmax = 9000000000000\n",
        dir.path().display()
    );
    let config = Config::from_toml(&text, "bench").unwrap();
    let (engine, storage, _) = Storage::open(
        &config.storage,
        Policy::from_config(&config).unwrap(),
        Default::default(),
    )
    .unwrap();
    let snapshot_file = dir.path().join("snapshot.redb");
    // A first snapshot of the subjects without history, for the baseline size.
    let charge = |hour: u64| {
        for i in 0..n {
            let req = DecisionRequest {
                subject: format!("user:{i:08}"),
                event: None,
                attributes: if dims.is_empty() {
                    BTreeMap::new()
                } else {
                    let value = if i % 2 == 0 { "gpt-4o" } else { "gpt-4o-mini" };
                    BTreeMap::from([(dims.clone(), value.to_string())])
                },
                amounts: BTreeMap::from([("tokens".to_string(), 1000 + i as u64 % 500)]),
                idempotency_key: None,
                ttl_ms: None,
                priority: None,
            };
            assert!(
                engine
                    .decide(DecideOp::Consume, &req, T0 + hour * HOUR + 1)
                    .unwrap()
                    .value
                    .allowed
            );
        }
    };
    charge(0);
    storage.snapshot(&engine, T0 + HOUR - 1).unwrap();
    let base = std::fs::metadata(&snapshot_file).unwrap().len();
    let started = Instant::now();
    // The file against its live data after each snapshot (it is compacted
    // past twice the live data).
    let mut worst: (f64, u64, u64) = (0.0, 0, 0);
    for hour in 1..24 {
        charge(hour);
        storage.snapshot(&engine, T0 + hour * HOUR + HOUR - 1).unwrap();
        let file = std::fs::metadata(&snapshot_file).unwrap().len();
        let live = storage.snapshots().live_bytes().unwrap();
        if file as f64 / live as f64 > worst.0 {
            worst = (file as f64 / live as f64, file, live);
        }
    }
    let day_secs = started.elapsed().as_secs_f64();
    let size = std::fs::metadata(&snapshot_file).unwrap().len();
    let live = storage.snapshots().live_bytes().unwrap();
    let store = storage.snapshots();

    // One subject's 30 days, per day (what the dashboard asks for).
    let q = Instant::now();
    let rounds = 1000;
    let mut rows = 0;
    for i in 0..rounds {
        let s = format!("user:{:08}", (i * 7919) % n);
        rows += store.usage_of(Grain::Day, &s, T0 - 29 * DAY, T0 + DAY).unwrap().len();
        rows += store.usage_of(Grain::Hour, &s, T0, T0 + DAY).unwrap().len();
    }
    let per_query_us = q.elapsed().as_secs_f64() * 1e6 / rounds as f64;

    // The month export: every subject's daily buckets of November.
    let e = Instant::now();
    let all = store.usage_all(Grain::Day, T0, T0 + 30 * DAY).unwrap();
    let export_ms = e.elapsed().as_secs_f64() * 1e3;
    assert_eq!(all.len(), n, "one daily bucket per subject");
    let requests: u64 = all.iter().map(|r| r.2.get("requests").copied().unwrap_or(0)).sum();
    assert_eq!(requests, 24 * n as u64, "the buckets add up to every charge");

    println!(
        "{n} subjects, one charge an hour for 24 hours, a snapshot each hour (durability batch){}",
        if dims.is_empty() {
            String::new()
        } else {
            format!(", usage also per {dims}")
        }
    );
    println!("  23 hours of charges and snapshots: {day_secs:.1} s");
    println!(
        "  snapshot.redb: {base} bytes after hour 1, {size} after hour 24: {:.0} bytes per subject and day \
         (24 hourly buckets, 1 daily, their indexes)",
        (size.saturating_sub(base)) as f64 / n as f64 * 24.0 / 23.0
    );
    println!(
        "  snapshot.redb after hour 24: {size} bytes for {live} bytes of live data ({:.2}x); the largest ratio \
         after any of the 24 snapshots: {:.2}x ({} for {})",
        size as f64 / live as f64,
        worst.0,
        worst.1,
        worst.2
    );
    println!("  one subject's usage (30 days per day + today per hour): {per_query_us:.0} µs ({rows} buckets read)");
    println!(
        "  month export of {n} subjects from disk: {export_ms:.0} ms ({} rows)",
        all.len()
    );
    storage.close().unwrap();
    drop(engine);
    drop(storage);

    // A start checks every stored value: what that costs on this file.
    let r = Instant::now();
    let (_, storage, report) = Storage::open(
        &config.storage,
        Policy::from_config(&config).unwrap(),
        Default::default(),
    )
    .unwrap();
    println!(
        "  start on it (every value of the file checked, then {} log records replayed): {:.2} s",
        report.replayed_records,
        r.elapsed().as_secs_f64()
    );
    storage.close().unwrap();
}
