//! `storage.wal_retention`: segments a snapshot covers are kept that long, so
//! `quotad wal dump` holds every charge over the span; with the default
//! "0s" they go at once. Also across a restart (what was covered before it
//! is kept a full retention from the restart), and bad values are refused
//! naming the key.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use quotad::config::Config;
use quotad::engine::{DecideOp, DecisionRequest, Engine, Policy};
use quotad::storage::Storage;

const BIN: &str = env!("CARGO_BIN_EXE_quotad");
const T0: u64 = 1_795_255_200_000;
const HOUR: u64 = 3_600_000;
/// Charges per round: about 1.2 MiB of log, more than one 1 MiB segment.
const N: usize = 8000;

fn config(dir: &Path, retention: &str) -> Config {
    let text = format!(
        "[storage]\ndata_dir = \"{}\"\nsegment_bytes_max = 1048576\nwal_retention = \"{retention}\"\n\
         [[plans]]\nname = \"p\"\ndefault = true\n[[plans.limits]]\nname = \"d\"\nmetric = \"tokens\"\nperiod = \"1d\"\nmax = 9000000000000\n",
        dir.display()
    );
    Config::from_toml(&text, "t.toml").unwrap()
}

fn open(dir: &Path, retention: &str) -> (Engine, Storage) {
    let c = config(dir, retention);
    let (engine, storage, _) = Storage::open(&c.storage, Policy::from_config(&c).unwrap(), Default::default()).unwrap();
    (engine, storage)
}

/// `n` consumes with keys (big records, so segments fill), then a snapshot at `now`.
fn charge_and_snapshot(engine: &Engine, storage: &Storage, from: usize, n: usize, now: u64) {
    for i in from..from + n {
        let req = DecisionRequest {
            subject: format!("user:{}", i % 50),
            event: None,
            attributes: BTreeMap::from([("note".to_string(), "x".repeat(200))]),
            amounts: BTreeMap::from([("tokens".to_string(), 1)]),
            idempotency_key: Some(format!("charge-{i:08}")),
            ttl_ms: None,
            priority: None,
        };
        assert!(engine.decide(DecideOp::Consume, &req, now).unwrap().value.allowed);
    }
    storage.snapshot(engine, now).unwrap();
}

/// Consumes in `quotad wal dump`'s output: each is one record with the key.
fn dumped_charges(dir: &Path) -> usize {
    let out = Command::new(BIN).args(["wal", "dump"]).arg(dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().matches("\"charge-").count()
}

fn segments(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("wal")).unwrap().count()
}

/// Opens the data directory, runs `f`, and closes it (a dump needs the LOCK free).
fn with_storage(dir: &Path, retention: &str, f: impl FnOnce(&Engine, &Storage)) {
    let (engine, storage) = open(dir, retention);
    f(&engine, &storage);
    storage.close().unwrap();
}

#[test]
fn covered_segments_are_kept_for_the_retention_then_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Three snapshots half an hour apart, each after N charges (a segment or more).
    with_storage(d, "2h", |e, s| {
        for round in 0..3u64 {
            charge_and_snapshot(e, s, round as usize * N, N, T0 + round * HOUR / 2);
        }
    });
    assert!(segments(d) > 3, "the charges span several segments");
    assert_eq!(
        dumped_charges(d),
        3 * N,
        "every charge of the last 2 hours is in the log"
    );
    // After a restart, what was covered before it is kept 2 h from the restart.
    with_storage(d, "2h", |e, s| charge_and_snapshot(e, s, 3 * N, 10, T0 + 2 * HOUR));
    assert_eq!(
        dumped_charges(d),
        3 * N + 10,
        "a restart does not shorten the retention"
    );
    // Past the retention, the next snapshot deletes what the old ones covered.
    with_storage(d, "2h", |e, s| {
        charge_and_snapshot(e, s, 3 * N + 10, 10, T0 + 4 * HOUR + 1)
    });
    let left = dumped_charges(d);
    assert!(
        left < 3 * N + 20,
        "covered segments older than the retention were deleted: {left} left"
    );
}

#[test]
fn without_retention_covered_segments_go_at_once() {
    let dir = tempfile::tempdir().unwrap();
    with_storage(dir.path(), "0s", |e, s| {
        charge_and_snapshot(e, s, 0, 2 * N, T0);
        charge_and_snapshot(e, s, 2 * N, 10, T0 + 1);
    });
    let left = dumped_charges(dir.path());
    assert!(left < 2 * N + 10, "covered segments were deleted: {left} left");
}

#[test]
fn bad_retention_names_the_key() {
    for bad in ["-1s", "forever", "1mo", "4000d"] {
        let text = format!("[storage]\nwal_retention = \"{bad}\"\n");
        let e = Config::from_toml(&text, "t.toml")
            .and_then(|c| c.sanitize().map(|_| c))
            .unwrap_err();
        assert!(e.to_string().contains("storage.wal_retention"), "{bad}: {e}");
    }
}
