//! The CSV billing export streams in bounded memory. A month of 150,000
//! subjects' usage (300,000 CSV lines) is written straight into a data
//! directory's snapshot file, the real binary starts on it, and its peak RSS
//! during one CSV export must stay within 64 MiB of what it was before.
//! Before streaming, an export collected every row first: a 500,000-subject
//! month added 464 MB. The million-line figure is in BENCHMARKS.md
//! (`benches/export_rss.sh`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quotad::engine::{signals::Signals, Shard, UsageDeltas};
use quotad::storage::codec;
use quotad::storage::snapshot::{SignalsPart, SnapshotStore, UsagePart};

const BIN: &str = env!("CARGO_BIN_EXE_quotad");
const SUBJECTS: usize = 150_000;
/// 2026-11-10T00:00:00Z, inside the month exported.
const DAY: u64 = 1_794_268_800_000;

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap()
}

#[test]
fn a_csv_export_of_300000_lines_stays_within_64_mib() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("wal")).unwrap();
    {
        // One day's bucket per subject: requests and tokens.
        let (requests, tokens): (Arc<str>, Arc<str>) = ("requests".into(), "tokens".into());
        let mut deltas = UsageDeltas::new();
        for i in 0..SUBJECTS {
            let subject: Arc<str> = format!("customer:{i:08}").into();
            deltas.insert(
                (subject.into(), DAY),
                vec![(requests.clone(), 3), (tokens.clone(), 1000 + i as u64)],
            );
        }
        let store = SnapshotStore::open(&data.join("snapshot.redb")).unwrap();
        let shards: Vec<Vec<u8>> = (0..64)
            .map(|_| codec::encode_shard(&Shard::default()).unwrap())
            .collect();
        let signals = SignalsPart {
            state: codec::encode_signals(&Signals::default()).unwrap(),
            ..SignalsPart::default()
        };
        let usage = UsagePart {
            deltas: &deltas,
            hours_before_ms: 0,
            days_before_ms: 0,
        };
        store.write(&shards, DAY, 0, &signals, &usage).unwrap();
    }
    let sock = dir.path().join("q.sock");
    let config = dir.path().join("quotad.toml");
    std::fs::write(
        &config,
        format!(
            "metrics = [\"tokens\"]\n[server]\nlisten = [\"unix:{}\"]\n[storage]\ndata_dir = \"{}\"\n[log]\n\
             level = \"warn\"\n[[plans]]\nname = \"p\"\ndefault = true\n",
            sock.display(),
            data.display()
        ),
    )
    .unwrap();
    let daemon = Daemon(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = daemon.0.id();
    let get = |path: &str| -> Option<(String, usize)> {
        let mut s = UnixStream::connect(&sock).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\n").ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).ok()?;
        let head_end = out.windows(4).position(|w| w == b"\r\n\r\n")?;
        let body_lines = out[head_end..].iter().filter(|&&b| b == b'\n').count();
        Some((String::from_utf8_lossy(&out[..head_end]).into_owned(), body_lines))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !get("/readyz").is_some_and(|(h, _)| h.starts_with("HTTP/1.1 200")) {
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = kib(pid, "VmRSS:");
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap(); // resets VmHWM
    let (head, lines) =
        get("/v1/usage?from=2026-11-01&to=2026-12-01&granularity=month&format=csv").expect("the export answers");
    let peak = kib(pid, "VmHWM:");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Chunked transfer: the body's lines, plus the chunk-size lines.
    assert!(lines > 2 * SUBJECTS, "every row: {lines} lines");
    let grown_mib = peak.saturating_sub(before) / 1024;
    println!(
        "CSV export of {} lines: RSS {} MiB before, peak {} MiB during (+{grown_mib} MiB)",
        2 * SUBJECTS,
        before / 1024,
        peak / 1024
    );
    assert!(grown_mib <= 64, "the export added {grown_mib} MiB");
    drop(daemon);
}
