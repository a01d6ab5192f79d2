//! The real binary's storage behaviour: `quotad wal verify` and `wal dump` on a
//! stopped daemon's data; a corrupt log refuses to start with exit code 4 naming
//! the file and offset; a torn tail is truncated and logged with its size.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_quotad");

fn write_config(dir: &Path) -> std::path::PathBuf {
    let config = dir.join("q.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"unix:{}\"]\n[storage]\ndata_dir = \"{}\"\n\
             [[plans]]\nname = \"p\"\ndefault = true\n[[plans.limits]]\nname = \"d\"\nmetric = \"tokens\"\nperiod = \"1d\"\nmax = 100000\n",
            dir.join("q.sock").display(),
            dir.join("data").display()
        ),
    )
    .unwrap();
    config
}

fn spawn(config: &Path, stderr: &Path) -> Child {
    Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(stderr).unwrap()))
        .spawn()
        .unwrap()
}

fn post(sock: &Path, path: &str, body: &str) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: q\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn run_and_stop(dir: &Path, requests: usize, tag: &str) {
    let config = write_config(dir);
    let mut child = spawn(&config, &dir.join("run.log"));
    let sock = dir.join("q.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !UnixStream::connect(&sock).is_ok_and(|mut s| {
        let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\n");
        let mut o = String::new();
        let _ = s.read_to_string(&mut o);
        o.starts_with("HTTP/1.1 200")
    }) {
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    for i in 0..requests {
        let r = post(
            &sock,
            "/v1/consume",
            &format!(
                r#"{{"subject":"u{}","amounts":{{"tokens":5}},"idempotency_key":"{tag}key-{i}"}}"#,
                i % 3
            ),
        );
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    // SIGKILL: no final snapshot, everything is in the WAL.
    child.kill().unwrap();
    child.wait().unwrap();
}

fn quotad(args: &[&str], dir: &Path) -> Output {
    Command::new(BIN).args(args).arg(dir).output().unwrap()
}

fn segment(dir: &Path) -> std::path::PathBuf {
    std::fs::read_dir(dir.join("data/wal"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
}

#[test]
fn verify_and_dump_a_stopped_daemons_data() {
    let dir = tempfile::tempdir().unwrap();
    run_and_stop(dir.path(), 12, "");
    let data = dir.path().join("data");
    let out = quotad(&["wal", "verify"], &data);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    // The first record is the policy's version 1, written at the first start.
    assert!(text.contains("13 record(s), LSN 1..13"), "{text}");
    assert!(text.contains("state digest:"), "{text}");
    let out = quotad(&["wal", "verify", "--json"], &data);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["ok"].as_bool(), v["records"].as_u64(), v["last_lsn"].as_u64()),
        (Some(true), Some(13), Some(13))
    );
    // dump: one JSON line per record, each carrying its idempotency key.
    let out = quotad(&["wal", "dump"], &data);
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 13);
    assert!(lines[0].to_string().contains("SetPolicy"), "{}", lines[0]);
    for (i, l) in lines[1..].iter().enumerate() {
        assert_eq!(l["lsn"], i as u64 + 2);
        assert!(l.to_string().contains(&format!("\"key\":\"key-{i}\"")), "{l}");
    }
    // verify changed nothing: the daemon still starts on it and sees the state.
    assert_eq!(quotad(&["wal", "verify"], &data).status.code(), Some(0));
}

#[test]
fn a_corrupt_log_refuses_to_start_with_exit_code_4() {
    let dir = tempfile::tempdir().unwrap();
    run_and_stop(dir.path(), 6, "");
    let seg = segment(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&seg, &bytes).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(write_config(dir.path()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    let name = seg.file_name().unwrap().to_str().unwrap();
    assert!(
        stderr.contains(name) && stderr.contains("at byte"),
        "names file and offset: {stderr}"
    );
    let v = quotad(&["wal", "verify"], &dir.path().join("data"));
    assert_eq!(v.status.code(), Some(4));
    assert_eq!(std::fs::read(&seg).unwrap(), bytes, "nothing was changed");
}

#[test]
fn a_torn_tail_is_truncated_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    run_and_stop(dir.path(), 4, "");
    let seg = segment(dir.path());
    let len = std::fs::metadata(&seg).unwrap().len();
    // Half a record header right after the last record: a write cut short by
    // the crash, in a file that ends there (the zeros the daemon writes
    // ahead of the log's end are cut off, as on a disk that lost them).
    let bytes = std::fs::read(&seg).unwrap();
    let mut end = 24;
    while let Some(field) = bytes.get(end..end + 4) {
        let len = u32::from_le_bytes(field.try_into().unwrap()) & 0x00FF_FFFF;
        if len == 0 {
            break;
        }
        end += 16 + len as usize;
    }
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(end as u64).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[7, 0, 0], end as u64).unwrap();
    let v = quotad(&["wal", "verify"], &dir.path().join("data"));
    assert!(String::from_utf8_lossy(&v.stdout).contains("torn tail: 3 byte(s)"));
    run_and_stop(dir.path(), 1, "second-");
    let log = std::fs::read_to_string(dir.path().join("run.log")).unwrap();
    assert!(log.contains("torn") && log.contains("\"bytes\":3"), "{log}");
    // A torn write was never acknowledged with fsync durability; with batch
    // it may have been, so the warning must not call it "unacknowledged".
    assert!(
        !log.contains("unacknowledged") && log.contains("never acknowledged with durability = \\\"fsync\\\""),
        "{log}"
    );
    let v = quotad(&["wal", "verify", "--json"], &dir.path().join("data"));
    let j: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!(
        (j["records"].as_u64(), j["torn_tail_bytes"].as_u64()),
        (Some(6), Some(0)) // the policy's version, 4 and 1 consumes
    );
    assert!(std::fs::metadata(&seg).unwrap().len() > len);
}

fn get(sock: &Path, path: &str) -> String {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return String::new();
    };
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out[out.find("\r\n\r\n").unwrap() + 4..].to_string()
}

fn wait_ready(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // "not ready" also contains "ready": match the exact ready answer.
        if UnixStream::connect(sock).is_ok() && get(sock, "/readyz").contains("\"status\":\"ready\"") {
            return;
        }
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn digest_before_sigterm_equals_digest_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let sock = dir.path().join("q.sock");
    let mut child = spawn(&config, &dir.path().join("a.log"));
    wait_ready(&sock);
    for i in 0..50 {
        let body = format!(
            r#"{{"subject":"u{}","amounts":{{"tokens":{}}},"idempotency_key":"d{i}"}}"#,
            i % 7,
            i + 1
        );
        assert!(post(&sock, "/v1/consume", &body).starts_with("HTTP/1.1 200"));
    }
    let before = get(&sock, "/v1/admin/digest");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    let mut child = spawn(&config, &dir.path().join("b.log"));
    wait_ready(&sock);
    assert_eq!(get(&sock, "/v1/admin/digest"), before);
    let log = std::fs::read_to_string(dir.path().join("b.log")).unwrap();
    assert!(
        log.contains("\"snapshot\":true"),
        "the graceful stop left a snapshot: {log}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

fn file_bytes(dir: &Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn verify_changes_no_byte_and_tells_a_running_daemon_from_damage() {
    let dir = tempfile::tempdir().unwrap();
    // Killed: the snapshot file was never closed cleanly and the log has a tail.
    run_and_stop(dir.path(), 300, "");
    let data = dir.path().join("data");
    let before = file_bytes(&data);
    let out = quotad(&["wal", "verify"], &data);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("301 record(s)"));
    assert_eq!(file_bytes(&data), before, "wal verify changed the data directory");

    // `wal dump | head`: the reader stops early, which is not damage.
    let piped = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; '{BIN}' wal dump '{}' | head -n 2",
            data.display()
        ))
        .output()
        .unwrap();
    assert!(piped.status.success(), "{}", String::from_utf8_lossy(&piped.stderr));
    assert_eq!(String::from_utf8_lossy(&piped.stdout).lines().count(), 2);
    assert!(piped.stderr.is_empty(), "{}", String::from_utf8_lossy(&piped.stderr));
    assert_eq!(file_bytes(&data), before, "wal dump changed the data directory");

    // While a daemon runs on the directory: its own exit code, not "damaged".
    let config = write_config(dir.path());
    let mut child = spawn(&config, &dir.path().join("run2.log"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !data.join("LOCK").exists()
        || std::fs::read_to_string(dir.path().join("run2.log")).is_ok_and(|l| !l.contains("ready"))
    {
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    for args in [["wal", "verify"], ["wal", "dump"]] {
        let out = quotad(&args, &data);
        assert_eq!(out.status.code(), Some(6), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("in use by a running quotad"));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
