//! The real `quotad` binary: invalid configs fail at start naming file, key and
//! problem with exit code 2; the shipped config checks clean; the daemon serves
//! on a Unix socket, replaces a stale socket file, and exits 0 on SIGTERM
//! removing its socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_quotad");

fn check_config(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(stderr.contains(&path.display().to_string()), "names the file: {stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

const LIMIT: &str = "[[plans]]\nname = \"free\"\n[[plans.limits]]\nname = \"x\"\nmax = 1\n";

#[test]
fn invalid_configs_fail_at_start_naming_file_key_and_problem() {
    let cases = [
        ("[server]\nlisten = [\"127.0.0.1:0\"]\ncolour = \"red\"\n", "colour"),
        (&format!("{LIMIT}period = \"1x\"\n") as &str, "plans[0].limits[0].period"),
        (&format!("{LIMIT}period = \"1d\"\ntimezone = \"Europe/Atlantis\"\n"), "plans[0].limits[0].timezone"),
        (&format!("{LIMIT}period = \"1d\"\nrefill = 5\n"), "plans[0].limits[0].refill"),
        (
            &format!("{LIMIT}period = \"1d\"\n[[plans]]\nname = \"pro\"\n[[plans.limits]]\nname = \"x\"\nmax = 1\nperiod = \"1d\"\nmetric = \"tokens\"\n"),
            "plans[1].limits[0].metric",
        ),
        (
            &format!("{LIMIT}period = \"1d\"\n[[plans]]\nname = \"pro\"\n[[plans.limits]]\nname = \"x\"\nmax = 1\nperiod = \"1d\"\nscope = \"global\"\n"),
            "plans[1].limits[0].scope",
        ),
        ("[[plans]]\nname = \"a\"\ndefault = true\n[[plans]]\nname = \"b\"\ndefault = true\n", "plans[1].default"),
        ("[storage]\ndurability = \"sometimes\"\n", "durability"),
        (&format!("{LIMIT}period = \"1d\"\nmax = 2\n"), "max"),
        (
            "[auth]\ntokens = [{ role = \"admin\", token_file = \"/nonexistent/quotad-token\" }]\n",
            ": auth.tokens[0].token_file: cannot read /nonexistent/quotad-token",
        ),
    ];
    for (text, key) in cases {
        let (code, stderr) = check_config(text);
        assert_eq!(code, 2, "{text}\n{stderr}");
        assert!(stderr.contains(key), "should name {key}: {stderr}");
        assert_eq!(stderr.matches("bad.toml").count(), 1, "said once: {stderr}");
    }
}

#[test]
fn the_shipped_config_checks_clean() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("quotad.toml");
    let out = Command::new(BIN)
        .args(["config", "check"])
        .arg(&shipped)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("default plan: free"));
}

/// One request; an empty answer if the daemon is not (yet) there to answer.
fn http(sock: &Path, request: &str) -> String {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut out = String::new();
    if s.write_all(request.as_bytes()).is_err() || s.read_to_string(&mut out).is_err() {
        return String::new();
    }
    out
}

#[test]
fn daemon_serves_replaces_stale_socket_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("q.sock");
    // A socket file left behind by a dead process.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let config = dir.path().join("q.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"unix:{}\"]\n[storage]\ndata_dir = \"{}\"\n\
             [[plans]]\nname = \"free\"\ndefault = true\n[[plans.limits]]\nname = \"d\"\nperiod = \"1d\"\nmax = 1\n",
            sock.display(),
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ready = String::new();
    while Instant::now() < deadline {
        if UnixStream::connect(&sock).is_ok() {
            ready = http(&sock, "GET /readyz HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\n");
            if ready.starts_with("HTTP/1.1 200") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ready.starts_with("HTTP/1.1 200"), "daemon became ready: {ready}");
    let body = r#"{"subject":"u"}"#;
    let req = format!(
        "POST /v1/consume HTTP/1.1\r\nHost: q\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    assert!(http(&sock, &req).contains("\"allowed\":true"));
    let denied = http(&sock, &req);
    assert!(
        denied.contains("\"allowed\":false") && denied.to_lowercase().contains("retry-after:"),
        "{denied}"
    );

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        assert!(Instant::now() < deadline, "daemon did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0));
    assert!(!sock.exists(), "socket file removed at shutdown");
}

#[test]
fn refuses_a_socket_path_that_is_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-a-socket");
    std::fs::write(&path, "precious").unwrap();
    let config = dir.path().join("q.toml");
    std::fs::write(&config, format!("[server]\nlisten = [\"unix:{}\"]\n", path.display())).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "precious",
        "nothing overwritten"
    );
}
