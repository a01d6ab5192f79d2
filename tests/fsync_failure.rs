//! An answer only after its record's fdatasync: with the simulated disk's
//! syncs held, a consume's record (or five pipelined consumes' records) is
//! written but unsynced and no byte of an answer comes; released, the
//! answers come and the records are durable.
//!
//! A failed fsync or a short write (a full disk), injected through the
//! simulated WAL directory under the real HTTP server: the request whose batch
//! failed and every later write get 503 (nothing acknowledged, and nothing of
//! theirs replayed after a restart), the server stops with a storage error (the binary
//! exits non-zero), and recovery afterwards is clean and keeps every
//! acknowledged write.

mod common;

use std::sync::Arc;

use futures_util::FutureExt;
use quotad::clock::ManualClock;
use quotad::config::Config;
use quotad::server::{Server, ServerError, StorageOpener};
use quotad::storage::io::{Faults, SimDir};
use quotad::storage::snapshot::SnapshotStore;
use quotad::storage::Storage;
use serde_json::json;

const CONFIG: &str = r#"
[[plans]]
name = "p"
default = true
  [[plans.limits]]
  name = "total"
  metric = "tokens"
  algorithm = "lifetime"
  max = "unlimited"
"#;

fn opener(config: &Config, dir: &SimDir, snaps: &SnapshotStore) -> StorageOpener {
    let (storage, dir, snaps) = (config.storage.clone(), dir.clone(), snaps.clone());
    Box::new(move |policy, metrics| Storage::open_with(&storage, policy, Arc::new(dir), snaps, None, metrics))
}

#[tokio::test]
async fn failed_fsync_is_never_acknowledged_stops_the_daemon_and_recovers_cleanly() {
    // (the n-th write or sync fails, whether a short write or a failed sync,
    // whether the crash image keeps the bytes that were never synced)
    // The first write and sync are the start's: the policy's version 1.
    for (fail_at, short_write, keep_unsynced) in [
        (5u64, false, false),
        (5, false, true),
        (2, false, false),
        (10, false, true),
        (5, true, true),
        (2, true, true),
    ] {
        let sock_dir = tempfile::tempdir().unwrap();
        let mut config = Config::from_toml(CONFIG, "t.toml").unwrap();
        config.server.listen = vec![format!("unix:{}", sock_dir.path().join("q.sock").display())];
        let dir = SimDir::new();
        let snaps = SnapshotStore::in_memory();
        dir.set_faults(if short_write {
            Faults {
                short_append_at: Some(fail_at),
                ..Faults::default()
            }
        } else {
            Faults {
                fail_sync_at: Some(fail_at),
                ..Faults::default()
            }
        });
        let clock = ManualClock::new(common::T0);
        let server = Server::bind_with_storage(&config, Arc::new(clock.clone()), opener(&config, &dir, &snaps))
            .await
            .unwrap();
        let sock = sock_dir.path().join("q.sock");
        let run = tokio::spawn(server.run(std::future::pending()));
        wait_ready(&sock).await;

        // Sequential writes: each is its own batch and its own fsync.
        let mut acked = Vec::new();
        let mut refused = 0;
        for i in 0..15u64 {
            let body =
                json!({"subject": "u", "amounts": {"tokens": i + 1}, "idempotency_key": format!("k{i}")}).to_string();
            let r = raw(&sock, &body).await;
            match r {
                Some((200, _)) => acked.push(i),
                Some((503, text)) => {
                    assert!(text.contains("\"unavailable\""), "{text}");
                    refused += 1;
                }
                Some((503..=504, _)) | None => refused += 1, // the daemon went away
                Some((s, text)) => panic!("unexpected {s}: {text}"),
            }
        }
        assert_eq!(
            acked,
            (0..fail_at - 2).collect::<Vec<_>>(),
            "exactly the writes before the failed sync"
        );
        assert!(refused > 0);
        let err = tokio::time::timeout(std::time::Duration::from_secs(10), run)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, ServerError::Storage(_)), "{err}");
        assert_eq!(quotad::cli::exit_code(&err), quotad::cli::EXIT_STORAGE);
        assert_ne!(quotad::cli::EXIT_STORAGE, 0);

        // Restart on what the disk holds (with or without the bytes whose sync failed).
        let image = dir.crash_image(|_, pending| if keep_unsynced { pending } else { 0 });
        let sock2 = sock_dir.path().join("q2.sock");
        config.server.listen = vec![format!("unix:{}", sock2.display())];
        let server = Server::bind_with_storage(&config, Arc::new(clock.clone()), opener(&config, &image, &snaps))
            .await
            .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        let mut applied = 0;
        for i in 0..15u64 {
            let body =
                json!({"subject": "u", "amounts": {"tokens": i + 1}, "idempotency_key": format!("k{i}")}).to_string();
            let (status, text) = loop {
                if let Some(r) = raw(&sock2, &body).await.filter(|r| r.0 != 503) {
                    break r;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            };
            assert_eq!(status, 200, "{text}");
            let replayed = text.contains("\"replayed\":true");
            if acked.contains(&i) {
                assert!(replayed, "acknowledged k{i} survived");
            }
            applied += u64::from(replayed);
        }
        // A 503 meant nothing was applied: the failed batch was cut off the
        // log before that answer, even where its bytes had landed.
        assert_eq!(applied, acked.len() as u64, "exactly the acknowledged writes");
        let _ = stop.send(());
        run.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_write_is_answered_only_after_its_record_is_synced() {
    let sock_dir = tempfile::tempdir().unwrap();
    let (config, sock) = on_socket(sock_dir.path());
    let (dir, snaps) = (SimDir::new(), SnapshotStore::in_memory());
    let server = Server::bind_with_storage(
        &config,
        Arc::new(ManualClock::new(common::T0)),
        opener(&config, &dir, &snaps),
    )
    .await
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    wait_ready(&sock).await;
    let durable = |dir: &SimDir| dir.durable_files().values().map(Vec::len).sum::<usize>();

    // One request, then five pipelined in one write (answered together).
    for n in [1usize, 5] {
        let before = durable(&dir);
        dir.hold_syncs();
        let bodies: Vec<String> = (0..n)
            .map(|i| {
                json!({"subject": "u", "amounts": {"tokens": 7}, "idempotency_key": format!("held-{n}-{i}")})
                    .to_string()
            })
            .collect();
        let (first_byte, got_first) = tokio::sync::oneshot::channel();
        let answers = tokio::spawn({
            let sock = sock.clone();
            async move { pipelined(&sock, &bodies, first_byte).await }
        });
        // The records reach the file, unsynced; the writer waits in its sync.
        let segment = loop {
            let names: Vec<String> = dir.durable_files().into_keys().collect();
            if let Some(n) = names.iter().find(|n| dir.unsynced_bytes(n) > 0) {
                break n.clone();
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        };
        // However long the sync takes, not a byte of any answer comes before it.
        tokio::pin!(got_first);
        for _ in 0..20 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            assert!(
                got_first.as_mut().now_or_never().is_none(),
                "{n}: answered while its record was not synced"
            );
        }
        assert_eq!(durable(&dir), before, "{n}: nothing synced yet");

        dir.release_syncs();
        let text = answers.await.unwrap().expect("answers");
        assert_eq!(text.matches("HTTP/1.1 200 OK").count(), n, "{text}");
        assert!(durable(&dir) > before, "{n}: the records are durable once answered");
        assert_eq!(dir.unsynced_bytes(&segment), 0);
    }
    let _ = stop.send(());
    run.await.unwrap().unwrap();
}

/// The test config, listening on a socket in `dir` only.
fn on_socket(dir: &std::path::Path) -> (Config, std::path::PathBuf) {
    let mut config = Config::from_toml(CONFIG, "t.toml").unwrap();
    let sock = dir.join("q.sock");
    config.server.listen = vec![format!("unix:{}", sock.display())];
    (config, sock)
}

async fn wait_ready(sock: &std::path::Path) {
    for _ in 0..500 {
        if let Some((200, _)) = request(sock, "GET", "/readyz", "").await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("not ready");
}

/// A consume over a fresh connection: (status, body), or None if the daemon is gone.
/// Sends `bodies` as consumes in one write (the last says `Connection:
/// close`), signals `first_byte` when any answer's first byte arrives, and
/// returns everything read to the end.
async fn pipelined(
    sock: &std::path::Path,
    bodies: &[String],
    first_byte: tokio::sync::oneshot::Sender<()>,
) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(sock).await.ok()?;
    let mut req = String::new();
    for (i, body) in bodies.iter().enumerate() {
        let close = if i + 1 == bodies.len() {
            "Connection: close\r\n"
        } else {
            ""
        };
        req.push_str(&format!(
            "POST /v1/consume HTTP/1.1\r\nHost: q\r\n{close}Content-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    }
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = vec![0; 1];
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_exact(&mut out))
        .await
        .ok()?
        .ok()?;
    let _ = first_byte.send(());
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    String::from_utf8(out).ok()
}

async fn raw(sock: &std::path::Path, body: &str) -> Option<(u16, String)> {
    request(sock, "POST", "/v1/consume", body).await
}

async fn request(sock: &std::path::Path, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(sock).await.ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: q\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = String::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    let status = out.get(9..12)?.parse().ok()?;
    Some((status, out))
}

#[tokio::test]
async fn only_health_answers_until_recovery_has_finished() {
    let sock_dir = tempfile::tempdir().unwrap();
    let (config, sock) = on_socket(sock_dir.path());
    let (dir, snaps) = (SimDir::new(), SnapshotStore::in_memory());
    // Recovery that waits for the test's go-ahead.
    let (go, gate) = std::sync::mpsc::channel::<()>();
    let inner = opener(&config, &dir, &snaps);
    let slow: StorageOpener = Box::new(move |policy, metrics| {
        gate.recv().unwrap();
        inner(policy, metrics)
    });
    let server = Server::bind_with_storage(&config, Arc::new(ManualClock::new(common::T0)), slow)
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let health = loop {
        if let Some(r) = request(&sock, "GET", "/healthz", "").await {
            break r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    assert_eq!(health.0, 200);
    assert_eq!(request(&sock, "GET", "/readyz", "").await.unwrap().0, 503);
    let r = raw(&sock, r#"{"subject":"u"}"#).await.unwrap();
    assert_eq!(r.0, 503, "{}", r.1);
    assert!(r.1.contains("recovering"), "{}", r.1);
    go.send(()).unwrap();
    wait_ready(&sock).await;
    assert_eq!(raw(&sock, r#"{"subject":"u"}"#).await.unwrap().0, 200);
    let _ = stop.send(());
    run.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_failed_sync_of_the_starting_policy_version_refuses_the_start() {
    let sock_dir = tempfile::tempdir().unwrap();
    let mut config = Config::from_toml(CONFIG, "t.toml").unwrap();
    config.server.listen = vec![format!("unix:{}", sock_dir.path().join("q.sock").display())];
    let (dir, snaps) = (SimDir::new(), SnapshotStore::in_memory());
    dir.set_faults(Faults {
        fail_sync_at: Some(1),
        ..Faults::default()
    });
    let server = Server::bind_with_storage(
        &config,
        Arc::new(ManualClock::new(common::T0)),
        opener(&config, &dir, &snaps),
    )
    .await
    .unwrap();
    let err = tokio::time::timeout(std::time::Duration::from_secs(10), server.run(std::future::pending()))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, ServerError::Storage(_)), "{err}");
    assert!(err.to_string().contains("cannot store the policy"), "{err}");
    assert_eq!(quotad::cli::exit_code(&err), quotad::cli::EXIT_STORAGE);
}
