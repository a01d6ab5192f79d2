//! Storage: WAL append with group commit on a real file, snapshot write and
//! load of 1M counters, and replay speed. `cargo bench --bench storage`.

// The daemon's allocator, so figures match what it does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use quotad::config::{Config, StorageConfig};
use quotad::engine::{CounterKey, DecideOp, DecisionRequest, Engine, Mutation, Policy, ScopeKey, Slot};
use quotad::journal::Journal;
use quotad::storage::Storage;

const CONFIG: &str =
    "[[plans]]\nname = \"p\"\ndefault = true\n[[plans.limits]]\nname = \"day\"\nperiod = \"1d\"\nmax = 1000000000\n";
const NOW: u64 = 1_795_255_200_000;

fn policy() -> Policy {
    Policy::from_config(&Config::from_toml(CONFIG, "b.toml").unwrap()).unwrap()
}

fn open(dir: &std::path::Path) -> (Engine, Storage) {
    let config = StorageConfig {
        data_dir: dir.to_path_buf(),
        ..StorageConfig::default()
    };
    let (e, s, _) = Storage::open(&config, policy(), Default::default()).unwrap();
    (e, s)
}

fn charge(i: u64) -> Vec<Mutation> {
    vec![Mutation::Charge {
        counter: CounterKey {
            limit: "day".into(),
            scope: ScopeKey::Subject(format!("user:{i}").into()),
        },
        slot: Slot::Fixed {
            start_ms: NOW - NOW % 86_400_000,
            end_ms: NOW - NOW % 86_400_000 + 86_400_000,
        },
        delta: 1,
        at_ms: NOW,
    }]
}

fn wal_group_commit(c: &mut Criterion) {
    let mut g = c.benchmark_group("wal");
    // 64 appenders' worth of records, then one wait: what 64 concurrent
    // requests cost when they share group commits.
    for batch in [1u64, 64] {
        g.throughput(Throughput::Elements(batch));
        let dir = tempfile::tempdir_in(".").unwrap();
        let (_engine, storage) = open(dir.path());
        let journal = storage.journal().clone();
        let mut i = 0;
        g.bench_function(format!("append_{batch}_then_fdatasync"), |b| {
            b.iter(|| {
                let mut last = 0;
                for _ in 0..batch {
                    i += 1;
                    last = journal.append(NOW, &charge(i)).unwrap();
                }
                journal.wait_durable_blocking(last).unwrap();
            })
        });
    }
    g.finish();
}

/// A store of `n` subjects with one counter each, built through the engine.
fn store(n: u64) -> (tempfile::TempDir, Engine, Storage) {
    let dir = tempfile::tempdir_in(".").unwrap();
    let (engine, storage) = open(dir.path());
    let mut last = 0;
    for i in 0..n {
        let req = DecisionRequest {
            subject: format!("user:{i}"),
            event: None,
            attributes: BTreeMap::new(),
            amounts: BTreeMap::new(),
            idempotency_key: None,
            ttl_ms: None,
            priority: None,
        };
        last = engine.decide(DecideOp::Consume, &req, NOW).unwrap().lsn.unwrap();
    }
    storage.journal().wait_durable_blocking(last).unwrap();
    (dir, engine, storage)
}

fn snapshot_and_replay(c: &mut Criterion) {
    const N: u64 = 1_000_000;
    let (dir, engine, storage) = store(N);
    let mut g = c.benchmark_group("store_1m_counters");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Elements(N));
    g.bench_function("snapshot_write", |b| b.iter(|| storage.snapshot(&engine, NOW).unwrap()));
    drop(storage);
    drop(engine);
    g.bench_function("snapshot_load", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let (e, s) = open(dir.path());
                total += t.elapsed();
                assert_eq!(e.stats().counters, N as usize);
                drop(s);
            }
            total
        })
    });
    g.finish();

    // Replay: the same records applied to a fresh engine, without disk reads.
    let records: Vec<Vec<Mutation>> = (0..N).map(charge).collect();
    let mut g = c.benchmark_group("replay");
    g.sample_size(10);
    g.throughput(Throughput::Elements(N));
    g.bench_function("apply_1m_records", |b| {
        b.iter(|| {
            let mut e = Engine::new(policy(), Arc::new(quotad::journal::NullJournal::default()));
            for (i, r) in records.iter().enumerate() {
                e.replay(i as u64 + 1, NOW, r);
            }
            e.finish_recovery();
            e
        })
    });
    g.finish();
}

criterion_group!(benches, wal_group_commit, snapshot_and_replay);
criterion_main!(benches);
