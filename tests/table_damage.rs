//! A flipped bit inside any value quotad stores in redb refuses start and
//! names the file, the table and the key: events, usage buckets and their
//! indexes, shards, the policy's versions (and the rest of `snapshot.redb`), and the webhook
//! delivery cursors of `delivery.redb`, which also refuse start when they
//! point past the newest recorded event. `quotad wal verify` reports the
//! same. Before these checks a flip in a usage value was served as
//! `requests = 1152921504606847528`, and a flipped cursor skipped events.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use quotad::clock::ManualClock;
use quotad::config::Config;
use quotad::engine::{DecideOp, DecisionRequest, Engine, Policy};
use quotad::server::{Server, ServerError};
use quotad::storage::{Storage, StorageError};

const BIN: &str = env!("CARGO_BIN_EXE_quotad");

const CONFIG: &str = r#"
[engine]
shards = 4
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 10000000000000
  alerts = [0.000001]
[[plans]]
name = "damage-target-plan"
"#;

/// 2026-11-21T10:00:00Z.
const T0: u64 = 1_795_255_200_000;
/// A charge whose 8 little-endian bytes are easy to find in the file.
const AMOUNT: u64 = 0x0000_0071_6a5b_4c3d;
const SUBJECT: &str = "damage-target-subject";

fn config(dir: &Path) -> Config {
    let mut c = Config::from_toml(CONFIG, "t.toml").unwrap();
    c.storage.data_dir = dir.to_path_buf();
    c
}

fn open(dir: &Path) -> Result<(Engine, Storage), StorageError> {
    let c = config(dir);
    Storage::open(&c.storage, Policy::from_config(&c).unwrap(), Default::default()).map(|(e, s, _)| (e, s))
}

/// A snapshot holding one subject's counter, usage buckets, one event and
/// the policy's first version.
fn build(dir: &Path) {
    let (e, s) = open(dir).unwrap();
    let lsn = quotad::api::policy::adopt_at_start(&e, &config(dir), T0)
        .unwrap()
        .unwrap();
    s.journal().wait_durable_blocking(lsn).unwrap();
    let req = DecisionRequest {
        subject: SUBJECT.into(),
        event: None,
        attributes: BTreeMap::new(),
        amounts: BTreeMap::from([("tokens".to_string(), AMOUNT)]),
        idempotency_key: None,
        ttl_ms: None,
        priority: None,
    };
    let a = e.decide(DecideOp::Consume, &req, T0).unwrap();
    assert!(a.value.allowed);
    s.journal().wait_durable_blocking(a.lsn.unwrap()).unwrap();
    s.snapshot(&e, T0).unwrap();
    s.close().unwrap();
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

fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

/// The table a refusal names (`table NAME, key ...`, or the shard message).
fn table_named(message: &str) -> Option<String> {
    if let Some(i) = message.find("table ") {
        let rest = &message[i + 6..];
        let end = rest.find([',', ' ', ')']).unwrap_or(rest.len());
        return Some(rest[..end].to_string());
    }
    None
}

#[test]
fn a_flip_in_any_stored_value_refuses_start_naming_file_table_and_key() {
    let base = tempfile::tempdir().unwrap();
    build(base.path());
    let snapshot = std::fs::read(base.path().join("snapshot.redb")).unwrap();
    // Where the stored values are: the amount (usage buckets and the shard's
    // counter), the event (its type is only in the event's JSON), and the
    // subject (in every key naming it: shards, usage keys, both indexes).
    let mut targets: Vec<(usize, &str)> = Vec::new();
    for (needle, what) in [
        (AMOUNT.to_le_bytes().to_vec(), "amount"),
        (b"threshold.crossed".to_vec(), "event"),
        (SUBJECT.as_bytes().to_vec(), "subject"),
        (b"damage-target-plan".to_vec(), "policy"),
    ] {
        let found = find_all(&snapshot, &needle);
        assert!(!found.is_empty(), "{what} is in the file");
        // Flip a bit in the middle of each occurrence.
        targets.extend(found.into_iter().map(|at| (at + needle.len() / 2, what)));
    }
    let mut named = BTreeSet::new();
    for (at, what) in &targets {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(base.path(), dir.path());
        let mut bytes = snapshot.clone();
        bytes[*at] ^= 0x10;
        std::fs::write(dir.path().join("snapshot.redb"), &bytes).unwrap();
        let err = match open(dir.path()) {
            Ok(_) => panic!("a flip in the {what} at byte {at} was not detected"),
            Err(e) => e,
        };
        let message = err.to_string();
        assert!(matches!(err, StorageError::Corrupt(_)), "{what} at {at}: {message}");
        assert!(
            std::fs::read(dir.path().join("snapshot.redb")).unwrap() == bytes,
            "a refused start changed no byte of the damaged file"
        );
        assert!(message.contains("snapshot.redb"), "names the file: {message}");
        let table = table_named(&message).unwrap_or_else(|| panic!("names no table: {message}"));
        assert!(message.contains("key "), "names the key: {message}");
        named.insert(table.clone());
        // `quotad wal verify` reports the same damage, exit status 4.
        if *what != "subject" || table.contains("by_time") {
            let out = Command::new(BIN)
                .args(["wal", "verify"])
                .arg(dir.path())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(4), "{text}");
            assert!(text.contains(&format!("table {table}")), "{text}");
        }
    }
    println!("{} flips refused, naming tables {named:?}", targets.len());
    for t in [
        "events",
        "usage_hours",
        "usage_days",
        "usage_hours_by_time",
        "usage_days_by_time",
        "shards",
        "policy",
    ] {
        assert!(named.contains(t), "a flip in table {t} was refused by name: {named:?}");
    }
}

const HOOK_CONFIG: &str = r#"
[storage]
durability = "fsync"
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "calls"
  period = "1d"
  max = 1000
  alerts = [0.001, 0.002, 0.003]
"#;

fn hook_config(dir: &Path) -> Config {
    let secret = dir.join("secret");
    std::fs::write(&secret, "a-webhook-secret-of-some-length").unwrap();
    let text = format!(
        "{HOOK_CONFIG}\n[[webhooks]]\nname = \"ops\"\nurl = \"http://127.0.0.1:9/hook\"\nsecret_file = \"{}\"\n",
        secret.display()
    );
    let mut c = Config::from_toml(&text, "t.toml").unwrap();
    c.storage.data_dir = dir.join("data");
    c.server.listen = vec![format!("unix:{}", dir.join("q.sock").display())];
    c
}

/// Starts the daemon in-process and stops it once ready; its error if it refused.
async fn start_and_stop(config: &Config) -> Result<(), ServerError> {
    let server = Server::bind(config, Arc::new(ManualClock::new(T0))).await.unwrap();
    let state = server.state();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    for _ in 0..500 {
        if run.is_finished() || state.ready.load(std::sync::atomic::Ordering::Acquire) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let _ = stop.send(());
    run.await.unwrap()
}

/// Writes a cursor as quotad does (seq and CRC-32 of name and seq), with
/// `flip` XORed into the stored seq afterwards.
fn write_cursor(path: &Path, name: &str, seq: u64, flip: u64) {
    const CURSORS: redb::TableDefinition<&str, (u64, u32)> = redb::TableDefinition::new("cursors_checked");
    let mut h = crc32fast::Hasher::new();
    h.update(name.as_bytes());
    h.update(&seq.to_le_bytes());
    let crc = h.finalize();
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(CURSORS)
        .unwrap()
        .insert(name, (seq ^ flip, crc))
        .unwrap();
    txn.commit().unwrap();
}

#[tokio::test]
async fn a_damaged_or_too_far_delivery_cursor_refuses_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = hook_config(dir.path());
    // Three events recorded (three thresholds crossed), none delivered.
    {
        let (e, s) = {
            let p = Policy::from_config(&config).unwrap();
            Storage::open(&config.storage, p, Default::default())
                .map(|(e, s, _)| (e, s))
                .unwrap()
        };
        let req = DecisionRequest {
            subject: "u".into(),
            event: None,
            attributes: BTreeMap::new(),
            amounts: BTreeMap::new(),
            idempotency_key: None,
            ttl_ms: None,
            priority: None,
        };
        for _ in 0..3 {
            let a = e.decide(DecideOp::Consume, &req, T0).unwrap();
            s.journal().wait_durable_blocking(a.lsn.unwrap()).unwrap();
        }
        assert_eq!(e.last_event().0, 3);
        s.close().unwrap();
    }
    let cursors = dir.path().join("data/delivery.redb");
    start_and_stop(&config).await.expect("a clean start");
    let data_mode = std::fs::metadata(&cursors).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        data_mode.permissions().mode() & 0o777,
        0o600,
        "delivery.redb is private"
    );

    // A cursor at an event that exists is fine.
    write_cursor(&cursors, "ops", 2, 0);
    start_and_stop(&config).await.expect("cursor 2 of 3");

    // A flipped bit in a stored cursor: refused, naming file, table and key.
    write_cursor(&cursors, "ops", 2, 1 << 6);
    let err = start_and_stop(&config).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ServerError::Recovery(_)), "{text}");
    assert_eq!(quotad::cli::exit_code(&err), quotad::cli::EXIT_CORRUPT);
    for part in ["delivery.redb", "table cursors_checked", "key \"ops\"", "checksum"] {
        assert!(text.contains(part), "{part}: {text}");
    }
    let out = Command::new(BIN)
        .args(["wal", "verify"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("key \"ops\""));

    // A well-formed cursor beyond the newest event (a file from other data,
    // or damage that kept its checksum): refused too.
    write_cursor(&cursors, "ops", 73, 0);
    let err = start_and_stop(&config).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("beyond the newest") && text.contains("73"), "{text}");
    let out = Command::new(BIN)
        .args(["wal", "verify"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("beyond the newest"));

    // Back to a sound cursor: starts again.
    write_cursor(&cursors, "ops", 3, 0);
    start_and_stop(&config).await.expect("cursor 3 of 3");
}

#[test]
fn data_files_and_directories_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let base = tempfile::tempdir().unwrap();
    let data = base.path().join("new/data");
    build(&data);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("wal")), 0o700);
    assert_eq!(mode(&data.join("snapshot.redb")), 0o600);
    assert_eq!(mode(&data.join("LOCK")), 0o600);
    for seg in std::fs::read_dir(data.join("wal")).unwrap() {
        assert_eq!(mode(&seg.unwrap().path()), 0o600);
    }
}
