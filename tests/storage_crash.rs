//! Crash safety of engine + WAL + recovery on a simulated directory that keeps
//! the durable image apart from unsynced writes. Thousands of seeded runs: random
//! operations, random write and fsync failures, a crash that keeps a random
//! prefix of whatever was not synced, then recovery. Every acknowledged change
//! must survive, nothing refused may appear, and retrying every operation with
//! its idempotency key must apply each exactly once.

use std::collections::BTreeMap;
use std::sync::Arc;

use quotad::config::{Config, StorageConfig};
use quotad::engine::{DecideOp, DecisionRequest, Engine, EngineError, Finish, Policy};
use quotad::storage::io::{Faults, SimDir};
use quotad::storage::snapshot::SnapshotStore;
use quotad::storage::Storage;

const CONFIG: &str = r#"
[engine]
shards = 8
reservation_ttl_max = "1h"
reservation_ttl_default = "1h"
[[plans]]
name = "p"
default = true
  [[plans.limits]]
  name = "total"
  metric = "tokens"
  algorithm = "lifetime"
  max = "unlimited"
  [[plans.limits]]
  name = "day"
  metric = "tokens"
  period = "1d"
  max = 1000000000
"#;

/// Runs in CI; `QUOTAD_CRASH_SEEDS` raises it for a long run.
fn seeds() -> u64 {
    std::env::var("QUOTAD_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn policy() -> Policy {
    Policy::from_config(&Config::from_toml(CONFIG, "t.toml").unwrap()).unwrap()
}

fn open(dir: &SimDir, snaps: &SnapshotStore) -> (Engine, Storage) {
    let config = StorageConfig {
        segment_bytes_max: 1 << 20,
        ..StorageConfig::default()
    };
    let (engine, storage, _) = Storage::open_with(
        &config,
        policy(),
        Arc::new(dir.clone()),
        snaps.clone(),
        None,
        Default::default(),
    )
    .expect("a crashed log always recovers");
    (engine, storage)
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Fate {
    /// Answered after its record was durable.
    Acked,
    /// Refused (journal failure): nothing applied.
    Refused,
    /// Sent, answer not awaited: may or may not have been applied.
    Unknown,
}

struct Op {
    req: DecisionRequest,
    /// For reserve-then-commit operations: the committed amount.
    commit: Option<u64>,
    fate: Fate,
}

fn request(subject: String, tokens: u64, key: String) -> DecisionRequest {
    DecisionRequest {
        subject,
        event: None,
        attributes: BTreeMap::new(),
        amounts: BTreeMap::from([("tokens".to_string(), tokens)]),
        idempotency_key: Some(key),
        ttl_ms: None,
        priority: None,
    }
}

fn total(engine: &Engine, subject: &str, now: u64) -> u64 {
    let v = engine.subject(subject, now).unwrap();
    v.counters.iter().find(|c| &*c.limit == "total").unwrap().used
}

fn run_seed(seed: u64) -> (usize, usize, u64) {
    let mut rng = Rng(seed);
    let dir = SimDir::new();
    let snaps = SnapshotStore::in_memory();
    match rng.below(4) {
        0 => dir.set_faults(Faults {
            fail_sync_at: Some(1 + rng.below(30)),
            ..Faults::default()
        }),
        1 => dir.set_faults(Faults {
            fail_append_at: Some(1 + rng.below(30)),
            ..Faults::default()
        }),
        _ => {}
    }
    let (engine, storage) = open(&dir, &snaps);
    let mut now = 1_795_255_200_000u64;
    let mut ops: Vec<Op> = Vec::new();
    for j in 0..(5 + rng.below(50)) {
        let reserve = rng.below(5) == 0;
        let subject = if reserve {
            format!("r{}", rng.below(2))
        } else {
            format!("c{}", rng.below(3))
        };
        let tokens = 1 + rng.below(9);
        let req = request(subject, tokens, format!("k{j}"));
        let wait = rng.below(4) != 0;
        let op = if reserve { DecideOp::Reserve } else { DecideOp::Consume };
        let commit = reserve.then(|| rng.below(12));
        let fate = match engine.decide(op, &req, now) {
            Err(EngineError::Unavailable(_)) => Fate::Refused,
            Err(e) => panic!("seed {seed}: {e}"),
            Ok(applied) => {
                let mut durable = !wait || storage.journal().wait_durable_blocking(applied.lsn.unwrap()).is_ok();
                if let (Some(actual), true) = (commit, durable) {
                    let id = applied.value.reservation_id.clone().unwrap();
                    let done = engine.finish(&id, Finish::Commit(BTreeMap::from([("tokens".into(), actual)])), now);
                    durable = match done {
                        Ok(a) => !wait || storage.journal().wait_durable_blocking(a.lsn.unwrap()).is_ok(),
                        Err(_) => false,
                    };
                }
                match (wait, durable) {
                    (true, true) => Fate::Acked,
                    _ => Fate::Unknown,
                }
            }
        };
        ops.push(Op { req, commit, fate });
        if rng.below(15) == 0 {
            let _ = storage.snapshot(&engine, now);
        }
        now += rng.below(2_000);
    }
    // Crash: keep a random prefix of what was written but not synced.
    let image = dir.crash_image(|_, pending| rng.below(pending as u64 + 1) as usize);
    drop(storage);
    drop(engine);

    let (engine, storage) = open(&image, &snaps);
    let before: BTreeMap<String, u64> = ["c0", "c1", "c2"]
        .iter()
        .map(|s| (s.to_string(), total(&engine, s, now)))
        .collect();
    // Retry every consume with its key: replayed ones were applied before the crash.
    let mut applied_sum: BTreeMap<String, u64> = BTreeMap::new();
    let mut acked_sum: BTreeMap<String, u64> = BTreeMap::new();
    let mut attempted_sum: BTreeMap<String, u64> = BTreeMap::new();
    for op in ops.iter().filter(|o| o.commit.is_none()) {
        let s = op.req.subject.clone();
        let tokens = op.req.amounts["tokens"];
        *attempted_sum.entry(s.clone()).or_default() += tokens;
        let r = engine.decide(DecideOp::Consume, &op.req, now).unwrap().value;
        match op.fate {
            Fate::Acked => {
                assert!(
                    r.replayed,
                    "seed {seed}: acknowledged {:?} was lost",
                    op.req.idempotency_key
                );
                *acked_sum.entry(s.clone()).or_default() += tokens;
            }
            Fate::Refused => assert!(
                !r.replayed,
                "seed {seed}: refused {:?} was applied",
                op.req.idempotency_key
            ),
            Fate::Unknown => {}
        }
        if r.replayed {
            *applied_sum.entry(s).or_default() += tokens;
        }
    }
    for (s, used) in &before {
        let acked = acked_sum.get(s).copied().unwrap_or(0);
        let attempted = attempted_sum.get(s).copied().unwrap_or(0);
        let applied = applied_sum.get(s).copied().unwrap_or(0);
        assert!(
            acked <= *used && *used <= attempted,
            "seed {seed}: {s}: {acked} <= {used} <= {attempted}"
        );
        assert_eq!(
            *used, applied,
            "seed {seed}: {s}: the counter is exactly the operations whose keys survived"
        );
        assert_eq!(
            total(&engine, s, now),
            attempted,
            "seed {seed}: {s}: after retries each applied exactly once"
        );
    }
    // Reserve-then-commit: retrying reserve replays the same hold; committing it
    // again ends with exactly the committed amount per operation.
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for op in ops.iter().filter(|o| o.commit.is_some()) {
        let r = engine.decide(DecideOp::Reserve, &op.req, now).unwrap().value;
        if op.fate == Fate::Acked {
            assert!(r.replayed, "seed {seed}: acknowledged reserve lost");
        }
        let actual = op.commit.unwrap();
        let id = r.reservation_id.unwrap();
        engine
            .finish(&id, Finish::Commit(BTreeMap::from([("tokens".into(), actual)])), now)
            .unwrap();
        *want.entry(op.req.subject.clone()).or_default() += actual;
    }
    for (s, w) in want {
        assert_eq!(
            total(&engine, &s, now),
            w,
            "seed {seed}: {s}: committed amounts exactly once"
        );
    }
    drop(storage);
    let (appends, syncs) = image.io_counts();
    (
        ops.len(),
        ops.iter().filter(|o| o.fate == Fate::Acked).count(),
        appends + syncs,
    )
}

#[test]
fn seeded_crashes_never_lose_or_repeat_an_acknowledged_change() {
    let (mut ops, mut acked) = (0, 0);
    let n = seeds();
    for seed in 0..n {
        let (o, a, _) = run_seed(seed);
        ops += o;
        acked += a;
    }
    println!("crash simulation: {n} seeded crashes, {ops} operations, {acked} acknowledged, all checked");
    assert!(acked > ops / 4, "the runs acknowledge enough to mean something");
}
