//! A full disk, for real, on a small tmpfs. First the log itself: a batch
//! that fills the disk midway is written short (whole records of it land,
//! then `ENOSPC`), and before the fix those records were replayed at the next
//! start although their requests had been answered 503. Then the daemon
//! under load: many clients consuming with idempotency keys until a WAL
//! write fails; every request answered 503 must have applied nothing (after a
//! restart on a larger tmpfs none of their keys replays) and every
//! acknowledged one must replay. (On tmpfs, where a sync costs nothing, the
//! daemon's batches are mostly single records, so the first test is the one
//! that makes a short write land whole records.) Both need root to mount a
//! tmpfs; they say so and pass otherwise.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_quotad");
const CLIENTS: usize = 64;

fn http(sock: &Path, body: &str) -> Option<(u16, String)> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let req = format!(
        "POST /v1/consume HTTP/1.1\r\nHost: q\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some((out.get(9..12)?.parse().ok()?, out))
}

/// Unmounts the tmpfs and stops the daemon, whatever happens in the test.
struct Cleanup {
    mount: PathBuf,
    child: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

fn mount_tmpfs(at: &Path, size: &str, remount: bool) -> bool {
    let opts = if remount {
        format!("remount,size={size}")
    } else {
        format!("size={size}")
    };
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
        .arg(at)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn start(config: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap()
}

fn wait_ready(sock: &Path, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if UnixStream::connect(sock).is_ok() {
            if let Some((200, _)) = http(sock, r#"{"subject":"probe"}"#) {
                return;
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "daemon exited with {status}:\n{}",
                std::fs::read_to_string(log).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("daemon not ready:\n{}", std::fs::read_to_string(log).unwrap());
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Outcome {
    Acked,
    Refused,
    Unknown,
}

#[test]
fn no_request_answered_503_on_a_full_disk_is_applied_after_the_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mount = tmp.path().join("disk");
    std::fs::create_dir(&mount).unwrap();
    if !mount_tmpfs(&mount, "2m", false) {
        println!("skipped: cannot mount a tmpfs here (needs root); CI runs this as root");
        return;
    }
    let mut guard = Cleanup {
        mount: mount.clone(),
        child: None,
    };
    let sock = tmp.path().join("q.sock");
    let config = tmp.path().join("quotad.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"unix:{}\"]\n[storage]\ndata_dir = \"{}\"\nsnapshot_every_records = 100000000\n\
             snapshot_every_bytes = 1073741824\n[[plans]]\nname = \"p\"\ndefault = true\n  [[plans.limits]]\n  \
             name = \"t\"\n  metric = \"tokens\"\n  algorithm = \"lifetime\"\n  max = \"unlimited\"\n",
            sock.display(),
            mount.join("data").display()
        ),
    )
    .unwrap();
    let log = tmp.path().join("daemon.log");
    guard.child = Some(start(&config, &log));
    wait_ready(&sock, guard.child.as_mut().unwrap(), &log);

    // Clients consume until the daemon stops answering.
    let ledger: Arc<Mutex<Vec<(String, String, Outcome)>>> = Arc::default();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (sock, ledger) = (sock.clone(), ledger.clone());
            std::thread::spawn(move || {
                let mut gone = 0;
                for i in 0..100_000 {
                    let key = format!("c{c}-k{i}");
                    let body = format!(
                        r#"{{"subject":"c{c}","amounts":{{"tokens":{}}},"idempotency_key":"{key}"}}"#,
                        i + 1
                    );
                    let outcome = match http(&sock, &body) {
                        Some((200, _)) => Outcome::Acked,
                        Some((503, text)) => {
                            assert!(text.contains("\"unavailable\""), "{text}");
                            Outcome::Refused
                        }
                        Some((s, text)) => panic!("unexpected {s}: {text}"),
                        None => Outcome::Unknown,
                    };
                    ledger.lock().unwrap().push((key, body, outcome));
                    if outcome != Outcome::Acked {
                        gone += 1;
                        if gone > 3 {
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let status = guard.child.as_mut().unwrap().wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(5), "exits with the storage status:\n{text}");
    assert!(text.contains("WAL write failed"), "{text}");
    if std::env::var_os("QUOTAD_SHOW_LOG").is_some() {
        println!("{text}");
    }

    // More room, and a restart on what the disk holds.
    assert!(mount_tmpfs(&mount, "64m", true), "remount larger");
    guard.child = Some(start(&config, &log));
    wait_ready(&sock, guard.child.as_mut().unwrap(), &log);
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    let count = |o: Outcome| ledger.iter().filter(|(_, _, x)| *x == o).count();
    let (acked, refused, unknown) = (count(Outcome::Acked), count(Outcome::Refused), count(Outcome::Unknown));
    assert!(acked > 1000, "the disk filled after some work: {acked} acknowledged");
    assert!(refused > 0, "some requests were answered 503");
    let mut replayed_unknown = 0;
    for (key, body, outcome) in &ledger {
        let (status, text) = http(&sock, body).expect("the restarted daemon answers");
        assert_eq!(status, 200, "{key}: {text}");
        let replayed = text.contains("\"replayed\":true");
        match outcome {
            Outcome::Acked => assert!(replayed, "acknowledged {key} was lost"),
            Outcome::Refused => assert!(!replayed, "{key} was answered 503 but had been applied"),
            Outcome::Unknown => replayed_unknown += usize::from(replayed),
        }
    }
    println!(
        "disk full: {acked} acknowledged (all kept), {refused} answered 503 (none applied), {unknown} unknown \
         ({replayed_unknown} of them applied)"
    );
}

#[test]
fn a_batch_that_fills_the_disk_midway_is_cut_off_the_log() {
    use quotad::storage::io::FsDir;
    use quotad::storage::wal::{frame, Wal, WalError};
    let tmp = tempfile::tempdir().unwrap();
    let mount = tmp.path().join("disk");
    std::fs::create_dir(&mount).unwrap();
    if !mount_tmpfs(&mount, "1m", false) {
        println!("skipped: cannot mount a tmpfs here (needs root); CI runs this as root");
        return;
    }
    let _guard = Cleanup {
        mount: mount.clone(),
        child: None,
    };
    let dir = Arc::new(FsDir::new(&mount.join("wal")).unwrap());
    let (mut wal, _) = Wal::open(dir.clone(), 0, 1 << 20, 4, &mut |_, _, _| Ok(())).unwrap();
    let mut buf = Vec::new();
    frame(1, &[1u8; 100], &mut buf);
    wal.write(&buf, 1, 1).unwrap();
    // Fill every page of the disk: only the rest of the log's last page is free.
    let mut filler = std::fs::File::create(mount.join("filler")).unwrap();
    while filler.write_all(&[0u8; 4096]).is_ok() {}
    // Ten records of about 1 KiB: three fit in what is left of the page.
    buf.clear();
    for lsn in 2..=11 {
        frame(lsn, &[lsn as u8; 1000], &mut buf);
    }
    let err = wal.write(&buf, 2, 11).unwrap_err();
    assert!(matches!(err, WalError::Io { .. }), "{err}");
    drop(wal);
    std::fs::remove_file(mount.join("filler")).unwrap();
    let mut seen = Vec::new();
    Wal::open(dir, 0, 1 << 20, 4, &mut |lsn, _, _| {
        seen.push(lsn);
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, [1], "nothing of the failed batch is replayed");
}
