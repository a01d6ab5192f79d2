//! Golden files: a snapshot and WAL of every format version, checked into
//! `tests/golden/v<N>`, with the state they must recover to. Any later change
//! of the encoding must keep reading them (the version in each segment header
//! and snapshot decides how). `regenerate_golden_files` writes the files of
//! the version this build writes: `cargo test --test golden -- --ignored
//! regenerate`, only when adding a version (never over an older one).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use quotad::config::Config;
use quotad::engine::policy::{MaxValue, PolicyDoc};
use quotad::engine::PolicyRequest;
use quotad::engine::{DecideOp, DecisionRequest, Engine, Finish, Policy};
use quotad::storage::Storage;
use serde_json::{json, Value};

const CONFIG: &str = r#"
[engine]
shards = 8
[[limits]]
name = "global-tokens"
metric = "tokens"
scope = "global"
algorithm = "sliding"
period = "1h"
max = 1000000
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  timezone = "America/New_York"
  max = 100000
  [[plans.limits]]
  name = "burst"
  algorithm = "token_bucket"
  max = 20
  refill = 10
  period = "1m"
  [[plans.limits]]
  name = "credits"
  algorithm = "lifetime"
  match = { event = "image" }
  max = 5
  [[plans.limits]]
  name = "per-model"
  metric = "tokens"
  scope = "attribute:model"
  match = { event = "llm" }
  period = "1h"
  max = 50000
[[plans]]
name = "pro"
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  timezone = "America/New_York"
  max = 1000000
"#;

/// 2026-11-21T10:00:00Z.
const T0: u64 = 1_795_255_200_000;
/// When the recovered state is read: inside every window used above.
const T_CHECK: u64 = T0 + 120_000;
const SUBJECTS: [&str; 4] = ["user:1", "user:2", "user:3", "user:4"];

/// Version 2 added prices: its files hold priced reservations and spend.
const PRICING: &str = r#"
metrics = ["images"]
[pricing]
currency = "EUR"
[[pricing.prices]]
name = "gpt-4o"
match = { event = "llm", attributes = { model = "gpt-4o" } }
tokens = "2.50/1M"
[[pricing.prices]]
name = "images"
match = { event = "image" }
requests = "0.04"
[[limits]]
name = "spend-per-month"
metric = "cost_micros"
scope = "global"
period = "1mo"
max = 1000000
"#;

fn golden_dir(version: u16) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/v{version}"))
}

fn config_text(version: u16) -> String {
    match version {
        1 => CONFIG.to_string(),
        _ => format!("{PRICING}{CONFIG}"),
    }
}

fn config(data_dir: &Path, version: u16) -> Config {
    let mut c = Config::from_toml(&config_text(version), "golden.toml").unwrap();
    c.storage.data_dir = data_dir.to_path_buf();
    c
}

fn open(data_dir: &Path, version: u16) -> (Engine, Storage) {
    let c = config(data_dir, version);
    let (engine, storage, _) = Storage::open(&c.storage, Policy::from_config(&c).unwrap(), Default::default()).unwrap();
    (engine, storage)
}

fn req(subject: &str, event: &str, tokens: u64, key: Option<&str>) -> DecisionRequest {
    DecisionRequest {
        subject: subject.into(),
        event: Some(event.into()),
        attributes: BTreeMap::from([("model".to_string(), "gpt-4o".to_string())]),
        amounts: BTreeMap::from([("tokens".to_string(), tokens)]),
        idempotency_key: key.map(str::to_string),
        ttl_ms: None,
        priority: None,
    }
}

fn state(engine: &Engine) -> Value {
    let views: Vec<Value> = SUBJECTS
        .iter()
        .map(|s| {
            let mut v = serde_json::to_value(engine.subject(s, T_CHECK).unwrap()).unwrap();
            // Added after the v1 and v2 files were recorded; none is ever raised here.
            assert_eq!(v.as_object_mut().unwrap().remove("flags"), Some(json!([])));
            // Added with the dashboard's money display, where the policy has
            // prices (EUR from v2 on): read from the policy, not stored state.
            let o = v.as_object_mut().unwrap();
            let money = (o.remove("currency"), o.remove("cost_metric"));
            assert!(
                money == (None, None) || money == (Some(json!("EUR")), Some(json!("cost_micros"))),
                "{money:?}"
            );
            v
        })
        .collect();
    let d = engine.digest(T_CHECK);
    json!({"subjects": views, "counts": [d.subjects, d.counters, d.reservations, d.idempotency_keys]})
}

/// The policy's version 2 in the v5 files.
fn policy_v2(c: &Config) -> PolicyDoc {
    let mut doc = c.policy_doc();
    let free = doc.plans.iter_mut().find(|p| p.name == "free").unwrap();
    for l in &mut free.limits {
        match l.name.as_str() {
            "burst" => l.period = Some("2m".into()),
            "tokens-per-day" => l.max = MaxValue::Finite(200_000),
            _ => {}
        }
    }
    doc
}

fn policy_versions(engine: &Engine) -> Value {
    let log = engine.policy_log();
    let versions: Vec<Value> = log
        .versions
        .iter()
        .map(|v| json!({"version": v.version, "changed_at_ms": v.changed_at_ms, "actor": v.actor}))
        .collect();
    json!({"applied_lsn": log.applied_lsn, "versions": versions})
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
#[ignore = "writes tests/golden/v<FORMAT_VERSION>; run only to add a new format version"]
fn regenerate_golden_files() {
    let version = quotad::storage::codec::FORMAT_VERSION;
    let tmp = tempfile::tempdir().unwrap();
    let (engine, storage) = open(tmp.path(), version);
    let wait = |lsn: Option<u64>| storage.journal().wait_durable_blocking(lsn.unwrap()).unwrap();
    let conf = config(tmp.path(), version);
    // Before the snapshot (from version 5: the policy's version 1 first, as a daemon's start writes it).
    wait(quotad::api::policy::adopt_at_start(&engine, &conf, T0).unwrap());
    for (i, s) in SUBJECTS.iter().enumerate() {
        wait(
            engine
                .decide(
                    DecideOp::Consume,
                    &req(s, "llm", 100 * (i as u64 + 1), Some(&format!("a{i}"))),
                    T0,
                )
                .unwrap()
                .lsn,
        );
    }
    wait(engine.put_subject("user:2", Some("pro"), None, None, T0).unwrap().lsn);
    wait(
        engine
            .decide(DecideOp::Consume, &req("user:3", "image", 0, None), T0)
            .unwrap()
            .lsn,
    );
    wait(engine.credit("user:3", "credits", 2, Some("topup"), T0).unwrap().lsn);
    storage.snapshot(&engine, T0 + 1).unwrap();
    // After it: only in the WAL.
    let mut r = req("user:4", "llm", 700, Some("hold-1"));
    r.ttl_ms = Some(3_600_000);
    let hold = engine.decide(DecideOp::Reserve, &r, T0 + 60_000).unwrap();
    wait(hold.lsn);
    let mut r = req("user:1", "llm", 900, Some("hold-2"));
    r.ttl_ms = Some(600_000);
    let done = engine
        .decide(DecideOp::Reserve, &r, T0 + 60_000)
        .unwrap()
        .value
        .reservation_id
        .unwrap();
    let c = engine
        .finish(
            &done,
            Finish::Commit(BTreeMap::from([("tokens".into(), 250)])),
            T0 + 61_000,
        )
        .unwrap();
    wait(c.lsn);
    wait(engine.reset("user:2", Some("burst"), None, T0 + 62_000).unwrap().lsn);
    wait(
        engine
            .decide(DecideOp::Consume, &req("user:2", "llm", 5000, Some("b1")), T0 + 63_000)
            .unwrap()
            .lsn,
    );
    // Version 2 of the policy, only in the WAL: "burst" refills per 2 minutes
    // (its counters start afresh), the per-day cap is raised (kept).
    let doc = policy_v2(&conf);
    let changed = engine
        .change_policy(
            PolicyRequest {
                doc: &doc,
                compiled: Policy::compile(&doc, &conf).unwrap(),
                actor: "billing",
                if_version: Some(1),
                idempotency: Some(("policy-2", 7)),
                refuse_plans_in_use: true,
                skip_if_same: false,
            },
            T0 + 64_000,
        )
        .unwrap();
    assert_eq!(
        changed.value.dropped.keys().map(|k| &**k).collect::<Vec<_>>(),
        ["burst"]
    );
    wait(changed.lsn);
    let expected = json!({
        "state": state(&engine),
        "replay_key": "hold-1",
        "replay_reservation_id": hold.value.reservation_id,
        "committed_reservation_id": done,
        "policy": policy_versions(&engine),
    });
    drop(storage); // no final snapshot: the WAL holds what came after the first one
    drop(engine);
    let out = golden_dir(version);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(out.join("wal")).unwrap();
    std::fs::copy(tmp.path().join("snapshot.redb"), out.join("snapshot.redb")).unwrap();
    copy_dir(&tmp.path().join("wal"), &out.join("wal"));
    std::fs::write(
        out.join("expected.json"),
        serde_json::to_string_pretty(&expected).unwrap() + "\n",
    )
    .unwrap();
}

fn check_golden(version: u16) {
    let dir = golden_dir(version);
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&dir, tmp.path());
    let (engine, storage) = open(tmp.path(), version);
    if version >= 5 {
        // The version in force is the stored one (as with policy.source = "api").
        let stored = engine.policy_version().unwrap().policy_doc().unwrap();
        engine.install_recovered(Policy::compile(&stored, &config(tmp.path(), version)).unwrap());
    }
    assert_eq!(
        state(&engine),
        expected["state"],
        "the v{version} files recover to the recorded state"
    );
    // The idempotency key stored in the WAL replays the original reservation.
    let mut r = req("user:4", "llm", 700, Some("hold-1"));
    r.ttl_ms = Some(3_600_000);
    let again = engine.decide(DecideOp::Reserve, &r, T_CHECK).unwrap().value;
    assert!(again.replayed);
    assert_eq!(json!(again.reservation_id), expected["replay_reservation_id"]);
    let committed = expected["committed_reservation_id"].as_str().unwrap();
    let repeat = engine
        .finish(
            committed,
            Finish::Commit(BTreeMap::from([("tokens".into(), 250)])),
            T_CHECK,
        )
        .unwrap();
    assert_eq!(
        repeat.value.charged["tokens"], 250,
        "the finished reservation kept its answer"
    );
    if version >= 5 {
        assert_eq!(
            policy_versions(&engine),
            expected["policy"],
            "the policy's versions recover"
        );
        let doc = policy_v2(&config(tmp.path(), version));
        assert!(engine.policy_version().unwrap().policy_doc().unwrap().same_as(&doc));
    }
    if version >= 2 {
        // 250 tokens at 2.50 EUR per million, rounded up: 625 µEUR.
        assert_eq!(repeat.value.charged["cost_micros"], 625);
        // The open hold kept its price: committing 400 of its 700 tokens costs 1000 µEUR.
        let hold = expected["replay_reservation_id"].as_str().unwrap();
        let c = engine
            .finish(hold, Finish::Commit(BTreeMap::from([("tokens".into(), 400)])), T_CHECK)
            .unwrap();
        assert_eq!(c.value.charged["cost_micros"], 1_000);
        assert_eq!(c.value.cost.unwrap().price.as_deref(), Some("gpt-4o"));
    }
    drop(storage);
}

#[test]
fn golden_v1_files_still_read() {
    check_golden(1);
}

#[test]
fn golden_v2_files_still_read() {
    check_golden(2);
}

#[test]
fn golden_v3_files_still_read() {
    check_golden(3);
}

#[test]
fn golden_v4_files_still_read() {
    check_golden(4);
}

#[test]
fn golden_v5_files_still_read() {
    check_golden(5);
}
