//! Engine decisions (consume) on one core, no I/O: 1 and 3 stacked limits, over
//! 10k and 1M subjects. `cargo bench --bench engine`.

// The daemon's allocator, so figures match what it does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use quotad::config::Config;
use quotad::engine::{DecideOp, DecisionRequest, Engine, Policy};
use quotad::journal::NullJournal;

const ONE: &str =
    "metrics = [\"tokens\"]\n[[plans]]\nname = \"p\"\ndefault = true\n[[plans.limits]]\nname = \"day\"\nperiod = \"1d\"\nmax = 1000000000\n";
const THREE: &str = r#"
[[plans]]
name = "p"
default = true
  [[plans.limits]]
  name = "per-minute"
  algorithm = "token_bucket"
  max = 1000000000
  period = "1m"
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 1000000000
  [[plans.limits]]
  name = "credits"
  algorithm = "lifetime"
  max = 1000000000
"#;
const NOW: u64 = 1_795_255_200_000;

fn engine(toml: &str) -> Engine {
    Engine::new(
        Policy::from_config(&Config::from_toml(toml, "b.toml").unwrap()).unwrap(),
        Arc::new(NullJournal::default()),
    )
}

fn requests(subjects: u64) -> Vec<DecisionRequest> {
    // A fixed pseudo-random order of subjects, prepared outside the timed loop.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            DecisionRequest {
                subject: format!("user:{}", x % subjects),
                event: None,
                attributes: BTreeMap::new(),
                amounts: BTreeMap::from([("tokens".to_string(), 10)]),
                idempotency_key: None,
                ttl_ms: None,
                priority: None,
            }
        })
        .collect()
}

fn decisions(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine_consume");
    g.throughput(Throughput::Elements(1));
    for (name, toml) in [("1_limit", ONE), ("3_limits", THREE)] {
        for subjects in [10_000u64, 1_000_000] {
            let e = engine(toml);
            // Warm the state: every subject has its counters.
            let mut r = requests(1).remove(0);
            for i in 0..subjects {
                r.subject = format!("user:{i}");
                e.decide(DecideOp::Consume, &r, NOW).unwrap();
            }
            let reqs = requests(subjects);
            let mut i = 0;
            g.bench_function(BenchmarkId::new(name, subjects), |b| {
                b.iter(|| {
                    i = (i + 1) % reqs.len();
                    e.decide(DecideOp::Consume, &reqs[i], NOW).unwrap()
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
