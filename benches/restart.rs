//! Restart of a store with many subjects: time to recover and resident memory,
//! from a snapshot and from the WAL alone. Run with
//! `cargo bench --bench restart` (QUOTAD_BENCH_SUBJECTS sets the size, default
//! 1_000_000 subjects × 3 counters). Recovery is measured in a fresh child
//! process so memory is not polluted by building the store.

// The daemon's allocator, so figures match what it does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use quotad::config::Config;
use quotad::engine::{DecideOp, DecisionRequest, Policy};
use quotad::storage::Storage;

const CONFIG: &str = r#"
[storage]
snapshot_every_records = 100000000
[[plans]]
name = "p"
default = true
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 100000
  [[plans.limits]]
  name = "requests-per-minute"
  algorithm = "token_bucket"
  max = 100
  refill = 1
  period = "1h"
  [[plans.limits]]
  name = "credits"
  algorithm = "lifetime"
  max = 1000
"#;
const NOW: u64 = 1_795_255_200_000;

fn config(dir: &Path) -> Config {
    let mut c = Config::from_toml(CONFIG, "bench.toml").unwrap();
    c.storage.data_dir = dir.to_path_buf();
    c
}

/// (VmRSS, VmHWM) in bytes.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn recover(dir: &Path) {
    let (rss0, _) = memory();
    let c = config(dir);
    let t = Instant::now();
    let (engine, storage, report) =
        Storage::open(&c.storage, Policy::from_config(&c).unwrap(), Default::default()).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let (rss, hwm) = memory();
    let stats = engine.stats();
    println!(
        "{{\"seconds\":{secs:.3},\"snapshot\":{},\"replayed_records\":{},\"subjects\":{},\"counters\":{},\
         \"rss_bytes\":{rss},\"rss_growth_bytes\":{},\"peak_rss_bytes\":{hwm}}}",
        report.snapshot_loaded,
        report.replayed_records,
        stats.subjects,
        stats.counters,
        rss - rss0
    );
    std::mem::forget(engine); // skip freeing 1M entries; the process ends here
    drop(storage);
}

fn child(mode: &str, dir: &Path) -> serde_json::Value {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([mode, dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 3 && args[1] == "--recover" {
        return recover(Path::new(&args[2]));
    }
    let n: u64 = std::env::var("QUOTAD_BENCH_SUBJECTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let tmp = tempfile::tempdir_in(std::env::var("QUOTAD_BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    let c = config(tmp.path());
    let (engine, storage, _) = Storage::open(&c.storage, Policy::from_config(&c).unwrap(), Default::default()).unwrap();
    let t = Instant::now();
    let mut last = 0;
    for i in 0..n {
        let req = DecisionRequest {
            subject: format!("user:{i}"),
            event: None,
            attributes: BTreeMap::new(),
            amounts: BTreeMap::from([("tokens".to_string(), 1 + i % 1000)]),
            idempotency_key: None,
            ttl_ms: None,
            priority: None,
        };
        last = engine.decide(DecideOp::Consume, &req, NOW).unwrap().lsn.unwrap();
    }
    storage.journal().wait_durable_blocking(last).unwrap();
    let build = t.elapsed().as_secs_f64();
    let wal_bytes: u64 = std::fs::read_dir(tmp.path().join("wal"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    // A copy of the whole log, for the WAL-only measurement (the snapshot deletes
    // the segments it covers).
    let wal_only = tempfile::tempdir_in(tmp.path().parent().unwrap()).unwrap();
    std::fs::create_dir_all(wal_only.path().join("wal")).unwrap();
    for e in std::fs::read_dir(tmp.path().join("wal")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), wal_only.path().join("wal").join(e.file_name())).unwrap();
    }
    let t = Instant::now();
    let snap = storage.snapshot(&engine, NOW).unwrap();
    let snapshot_secs = t.elapsed().as_secs_f64();
    drop(storage);
    let counters = engine.stats().counters;
    drop(engine);
    println!("store: {n} subjects, {counters} counters");
    println!(
        "build: {n} durable consumes through engine + WAL in {build:.2} s ({:.0}/s), WAL {wal_bytes} bytes",
        n as f64 / build
    );
    println!("snapshot: {} bytes in {snapshot_secs:.2} s", snap.bytes);
    let r = child("--recover", tmp.path());
    println!("restart from snapshot: {r}");
    let per = r["rss_growth_bytes"].as_f64().unwrap() / r["counters"].as_f64().unwrap();
    println!(
        "  {:.2} s, resident growth {:.0} bytes per live counter",
        r["seconds"].as_f64().unwrap(),
        per
    );
    let r = child("--recover", wal_only.path());
    println!("restart from WAL only: {r}");
    println!(
        "  {:.0} records/s replayed",
        r["replayed_records"].as_f64().unwrap() / r["seconds"].as_f64().unwrap()
    );
    println!("  ({} segments were deleted by the snapshot)", snap.segments_removed);
}
