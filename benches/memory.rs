//! Resident memory per retained idempotency key, per subject and per
//! breaker scope value, on the shipped `quotad.toml`. Run with `cargo bench
//! --bench memory` (QUOTAD_BENCH_CALLS sets the count, default 200000). Each
//! figure is measured in a fresh child process: N consumes on N subjects
//! without keys (memory per subject), the same with a new key each (the
//! difference is memory per key), the same with the shipped alerts, breaker
//! and anomaly rule taken out (the difference is what signals cost per
//! subject), and N calls with N values of a per-model breaker's attribute
//! (memory per breaker scope value), and the subjects again without usage
//! per model (`history.dimensions`). Calls are `llm.chat` on `gpt-4o-mini`
//! with 5 tokens, so a free-plan subject's stored answer carries the six
//! counters it matches.

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

fn run(n: u64, mode: &str) {
    let keys = mode == "keys";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("quotad.toml");
    let mut config = Config::load(&path).unwrap();
    if mode == "nodims" {
        config.history.dimensions.clear();
    }
    if mode == "nosignals" || mode == "scopes" {
        config.breakers.clear();
        config.anomalies.clear();
        for p in &mut config.plans {
            for l in &mut p.limits {
                l.alerts.clear();
            }
        }
    }
    if mode == "scopes" {
        // Only a per-model breaker: no limit is charged per call.
        config = Config::from_toml(
            "[[plans]]\nname = \"p\"\ndefault = true\n\
             [[breakers]]\nname = \"per-model\"\nmetric = \"requests\"\nscope = \"attribute:model\"\n\
             window = \"10m\"\nbaseline = \"24h\"\nratio = 3.0\nmin_amount = 1000000000\n",
            "bench",
        )
        .unwrap();
    }
    let engine = Engine::new(Policy::from_config(&config).unwrap(), Arc::new(NullJournal::default()));
    let before = rss();
    let mut counters = 0;
    for i in 0..n {
        let (subject, model) = match mode {
            "scopes" => ("user:1".to_string(), format!("model-{i:08}")),
            _ => (format!("user:{i:08}"), "gpt-4o-mini".to_string()),
        };
        let req = DecisionRequest {
            subject,
            event: Some(if mode == "scopes" {
                "other".into()
            } else {
                "llm.chat".into()
            }),
            attributes: BTreeMap::from([("model".to_string(), model)]),
            amounts: if mode == "scopes" {
                BTreeMap::new()
            } else {
                BTreeMap::from([("tokens".to_string(), 5)])
            },
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
        "{{\"growth\":{},\"keys\":{},\"subjects\":{},\"counters\":{},\"breaker_scopes\":{},\"counters_per_answer\":{counters}}}",
        rss() - before,
        stats.idempotency_keys,
        stats.subjects,
        stats.counters,
        engine.breakers(NOW).len()
    );
    std::mem::forget(engine);
}

fn child(n: u64, mode: &str) -> serde_json::Value {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--child", &n.to_string(), mode])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 4 && args[1] == "--child" {
        return run(args[2].parse().unwrap(), &args[3]);
    }
    let n: u64 = std::env::var("QUOTAD_BENCH_CALLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let plain = child(n, "nokeys");
    let keyed = child(n, "keys");
    let bare = child(n, "nosignals");
    let scopes = child(n, "scopes");
    let nodims = child(n, "nodims");
    let per_subject = plain["growth"].as_f64().unwrap() / n as f64;
    let per_key = (keyed["growth"].as_f64().unwrap() - plain["growth"].as_f64().unwrap()) / n as f64;
    let per_subject_bare = bare["growth"].as_f64().unwrap() / n as f64;
    let per_subject_nodims = nodims["growth"].as_f64().unwrap() / n as f64;
    // Per value watched: past the cap (10,000 per breaker) values are not.
    let per_scope = scopes["growth"].as_f64().unwrap() / scopes["breaker_scopes"].as_f64().unwrap().max(1.0);
    println!(
        "{n} consumes on the shipped quotad.toml, {} counters per answer",
        plain["counters_per_answer"]
    );
    println!("  without keys: {plain}");
    println!("  with keys:    {keyed}");
    println!("  no signals:   {bare}");
    println!("  scopes:       {scopes}");
    println!("  no dims:      {nodims}");
    println!("  resident memory per subject: {per_subject:.0} bytes");
    println!(
        "  of which the shipped alerts, breaker and anomaly rule: {:.0} bytes (without them: {per_subject_bare:.0})",
        per_subject - per_subject_bare
    );
    println!(
        "  of which usage per model (history.dimensions = [\"model\"]), until a snapshot moves it to disk: \
         {:.0} bytes (without it: {per_subject_nodims:.0})",
        per_subject - per_subject_nodims
    );
    println!("  resident memory per breaker scope value: {per_scope:.0} bytes");
    println!("  resident memory per retained idempotency key: {per_key:.0} bytes");
}
