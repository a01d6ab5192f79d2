//! Resident memory per retained idempotency key and per subject, on the
//! shipped `quotad.toml`. Run with `cargo bench --bench memory`
//! (QUOTAD_BENCH_CALLS sets the count, default 200000). Each figure is
//! measured in a fresh child process: N consumes on N subjects without keys
//! (memory per subject), and the same with a new key each (the difference is
//! memory per key). Calls are `llm.chat` on `gpt-4o-mini` with 5 tokens, so a
//! free-plan subject's stored answer carries the six counters it matches.

// The daemon's allocator, so figures match what it does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::sync::Arc;

use quotad::config::Config;
use quotad::engine::{DecideOp, DecisionRequest, Engine, Policy};
use quotad::journal::NullJournal;

const NOW: u64 = 1_795_255_200_000;

fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn run(n: u64, keys: bool) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("quotad.toml");
    let config = Config::load(&path).unwrap();
    let engine = Engine::new(Policy::compile(&config).unwrap(), Arc::new(NullJournal::default()));
    let before = rss();
    let mut counters = 0;
    for i in 0..n {
        let req = DecisionRequest {
            subject: format!("user:{i:08}"),
            event: Some("llm.chat".into()),
            attributes: BTreeMap::from([("model".to_string(), "gpt-4o-mini".to_string())]),
            amounts: BTreeMap::from([("tokens".to_string(), 5)]),
            idempotency_key: keys.then(|| format!("9f1c2e7a-4b3d-4e8f-a1b2-{i:012}")),
            ttl_ms: None,
            priority: None,
        };
        let d = engine.decide(DecideOp::Consume, &req, NOW).unwrap().value;
        assert!(d.allowed, "{d:?}");
        counters = d.counters.len();
    }
    let stats = engine.stats();
    println!(
        "{{\"growth\":{},\"keys\":{},\"subjects\":{},\"counters_per_answer\":{counters}}}",
        rss() - before,
        stats.idempotency_keys,
        stats.subjects
    );
    std::mem::forget(engine);
}

fn child(n: u64, keys: bool) -> serde_json::Value {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--child", &n.to_string(), if keys { "keys" } else { "nokeys" }])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 4 && args[1] == "--child" {
        return run(args[2].parse().unwrap(), args[3] == "keys");
    }
    let n: u64 = std::env::var("QUOTAD_BENCH_CALLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let plain = child(n, false);
    let keyed = child(n, true);
    let per_subject = plain["growth"].as_f64().unwrap() / n as f64;
    let per_key = (keyed["growth"].as_f64().unwrap() - plain["growth"].as_f64().unwrap()) / n as f64;
    println!(
        "{n} consumes on the shipped quotad.toml, {} counters per answer",
        plain["counters_per_answer"]
    );
    println!("  without keys: {plain}");
    println!("  with keys:    {keyed}");
    println!("  resident memory per subject: {per_subject:.0} bytes");
    println!("  resident memory per retained idempotency key: {per_key:.0} bytes");
}
