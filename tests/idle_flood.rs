//! The flood that locked the listener, against the real binary with its
//! default limits: 10,600 TCP connections that send nothing (more than
//! `server.max_connections`, 10,000), then a new client must be answered
//! within a second. Before the fix `/healthz` took 25.6 s, then nothing.
//! The daemon runs as its own process so that each side holds only its own
//! ends of the connections (the machine's open-file limit is 20,000). The
//! listen backlog is 4096 (it was 128): opening the flood took 72 s before,
//! each overflow of the backlog costing a client a one-second SYN retry.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_quotad");
const IDLE: usize = 10_600;

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn healthz(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(1024)
}

#[test]
fn ten_thousand_idle_connections_do_not_lock_out_a_new_client() {
    if open_files_limit() < IDLE + 512 {
        println!(
            "skipped: the open-file limit is {}, the test needs {} (raise `ulimit -n`)",
            open_files_limit(),
            IDLE + 512
        );
        return;
    }
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("quotad.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\n[storage]\ndata_dir = \"{}\"\n[log]\nlevel = \"warn\"\n\
             [[plans]]\nname = \"p\"\ndefault = true\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let _daemon = Daemon(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while healthz(addr).is_none() {
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let opened = Instant::now();
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connection {} refused: {e}", idle.len()),
        }
    }
    let opening = opened.elapsed();
    let started = Instant::now();
    let answer = healthz(addr).expect("the new client is answered");
    let took = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(took < Duration::from_secs(1), "answered after {took:?}");
    println!("{IDLE} idle connections opened in {opening:?}; a new client answered in {took:?}");
    drop(idle);
}
