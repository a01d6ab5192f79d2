//! Damage the snapshot and the log the way disks and operators do, and check
//! that quotad either refuses to start or recovers exactly the state it had:
//! random bit flips in `snapshot.redb` (counted: refused or harmless, never a
//! silently different state), a WAL whose segments were deleted next to a
//! snapshot that needs them, engine time resumed from the log when the clock
//! is behind it, and `wal verify` changing no byte.

use std::collections::BTreeMap;
use std::path::Path;

use quotad::config::Config;
use quotad::engine::{DecideOp, DecisionRequest, Engine, Policy, StateDigest};
use quotad::storage::{Storage, StorageError};

const CONFIG: &str = r#"
[engine]
shards = 8
[[limits]]
name = "global"
metric = "tokens"
scope = "global"
period = "1d"
max = 100000000
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "per-minute"
  period = "1m"
  max = 5
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 1000000
  [[plans.limits]]
  name = "burst"
  algorithm = "token_bucket"
  max = 50
  refill = 10
  period = "1m"
"#;

/// 2026-11-21T10:00:00Z.
const T0: u64 = 1_795_255_200_000;

fn open(dir: &Path) -> Result<(Engine, Storage), StorageError> {
    let mut c = Config::from_toml(CONFIG, "t.toml").unwrap();
    c.storage.data_dir = dir.to_path_buf();
    Storage::open(&c.storage, Policy::from_config(&c).unwrap(), Default::default()).map(|(e, s, _)| (e, s))
}

fn consume(e: &Engine, s: &Storage, subject: &str, tokens: u64, key: Option<String>, now: u64) -> bool {
    let req = DecisionRequest {
        subject: subject.into(),
        event: None,
        attributes: BTreeMap::new(),
        amounts: BTreeMap::from([("tokens".to_string(), tokens)]),
        idempotency_key: key,
        ttl_ms: None,
        priority: None,
    };
    let a = e.decide(DecideOp::Consume, &req, now).unwrap();
    if let Some(lsn) = a.lsn {
        s.journal().wait_durable_blocking(lsn).unwrap();
    }
    a.value.allowed
}

/// A data directory with a snapshot of 40 subjects' counters and keys.
fn build(dir: &Path) -> StateDigest {
    let (e, s) = open(dir).unwrap();
    for i in 0..40 {
        consume(&e, &s, &format!("user:{i}"), 10 + i, Some(format!("k{i}")), T0);
    }
    s.snapshot(&e, T0).unwrap();
    s.close().unwrap();
    e.digest(T0 + 1)
}

/// xorshift: a fixed sequence of flips, the same on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else if e.file_name() != "LOCK" {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Every flipped bit in the snapshot is refused or changes nothing; run with
/// `QUOTAD_FLIP_TRIALS=5000` for a longer search (CI runs 300).
#[test]
fn snapshot_bit_flips_are_refused_or_harmless() {
    // redb's own panics on damaged pages are expected here: keep the output readable.
    std::panic::set_hook(Box::new(|_| {}));
    let trials: usize = std::env::var("QUOTAD_FLIP_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let base = tempfile::tempdir().unwrap();
    let want = build(base.path());
    let snapshot = std::fs::read(base.path().join("snapshot.redb")).unwrap();
    let written = snapshot.iter().rposition(|&b| b != 0).unwrap() + 1;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut refused, mut harmless) = (0, 0);
    for trial in 0..trials {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(base.path(), dir.path());
        let mut bytes = snapshot.clone();
        // Flips land in the pages redb has written, not the zeroed rest of the file.
        let bit = (rng.next() % (written as u64 * 8)) as usize;
        bytes[bit / 8] ^= 1 << (bit % 8);
        std::fs::write(dir.path().join("snapshot.redb"), &bytes).unwrap();
        // redb panics on some damaged structures (the daemon then aborts before
        // serving anything): a refusal too. Dropped inside, as drop may panic.
        let opened = std::panic::catch_unwind(|| open(dir.path()).map(|(e, _s)| e.digest(T0 + 1)));
        match opened {
            Ok(Ok(got)) => {
                assert_eq!(
                    got, want,
                    "trial {trial}: bit {bit} changed the state and was not detected"
                );
                harmless += 1;
            }
            Ok(Err(StorageError::Corrupt(_) | StorageError::Io(_))) | Err(_) => refused += 1,
            Ok(Err(e)) => panic!("trial {trial}: unexpected {e}"),
        }
    }
    let _ = std::panic::take_hook();
    println!(
        "snapshot bit flips: {trials} trials in the {written} written bytes of a {}-byte file: {refused} refused, \
         {harmless} harmless (state identical)",
        snapshot.len()
    );
    assert_eq!(refused + harmless, trials);
    assert!(refused > 0, "some flips land in stored data");
}

#[test]
fn a_log_that_ends_before_the_snapshot_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (e, s) = open(dir.path()).unwrap();
        // Only a few shards are touched: the snapshot's shards are as of
        // different LSNs, so it needs the log after the oldest of them.
        for i in 0..5 {
            consume(&e, &s, "user:1", 10, Some(format!("a{i}")), T0);
        }
        s.snapshot(&e, T0).unwrap();
        for i in 0..5 {
            consume(&e, &s, "user:2", 10, Some(format!("b{i}")), T0);
        }
        // Killed: no final snapshot.
    }
    // An operator "cleans up" the log.
    for f in std::fs::read_dir(dir.path().join("wal")).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    match open(dir.path()) {
        Err(StorageError::Corrupt(m)) => {
            assert!(m.contains("segments of the log are missing"), "{m}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("started on a log that lost acknowledged records"),
    }
}

#[test]
fn new_records_are_numbered_after_everything_the_snapshot_holds() {
    let dir = tempfile::tempdir().unwrap();
    let want = {
        let (e, s) = open(dir.path()).unwrap();
        for i in 0..20 {
            consume(&e, &s, &format!("user:{}", i % 3), 10, Some(format!("a{i}")), T0);
        }
        // Graceful: every shard as of the same LSN, so the log may be empty.
        s.snapshot(&e, T0).unwrap();
        s.close().unwrap();
        e.digest(T0 + 1)
    };
    let (e, s) = open(dir.path()).unwrap();
    assert_eq!(e.digest(T0 + 1), want);
    for i in 0..30 {
        consume(&e, &s, &format!("user:{}", i % 7), 1, Some(format!("b{i}")), T0 + 1);
    }
    let after = e.digest(T0 + 2);
    drop((e, s)); // crash: the 30 new records are only in the log
    let (e, _s) = open(dir.path()).unwrap();
    assert_eq!(e.digest(T0 + 2), after, "no new record was skipped on replay");
}

#[test]
fn engine_time_resumes_from_the_log_when_the_clock_is_behind_it() {
    let dir = tempfile::tempdir().unwrap();
    // Five calls on a 1-minute limit under a clock 2 minutes ahead.
    let ahead = T0 + 120_000;
    {
        let (e, s) = open(dir.path()).unwrap();
        for i in 0..5 {
            assert!(consume(&e, &s, "u", 1, Some(format!("k{i}")), ahead));
        }
    }
    // Restart with the real clock: the charges still count.
    let (e, s) = open(dir.path()).unwrap();
    assert_eq!(e.time(T0), ahead, "engine time never goes back across a restart");
    assert!(
        !consume(&e, &s, "u", 1, None, T0),
        "the sixth call in that minute is denied"
    );
    let v = e.subject("u", T0).unwrap();
    let c = v.counters.iter().find(|c| &*c.limit == "per-minute").unwrap();
    assert_eq!(c.used, 5);
}
