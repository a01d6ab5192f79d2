//! The `quotad` binary as a newcomer meets it: shell completions and the man
//! page, `--addr` written as a URL, what a 401/403 tells the user to do,
//! `health`'s exit codes as its help states them, `bench --help`, plain-text
//! logs when stderr is a file, a word when it starts with no plans, and a
//! reload logged in words.
//! Answers come from a canned HTTP server where the daemon's own would be hard
//! to provoke (a 503 "not ready", a 403).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_quotad");

fn quotad(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("QUOTAD_TOKEN")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// An HTTP server on 127.0.0.1 answering every request with `status` and
/// `body`; returns its `host:port` and the request heads it saw.
fn canned(status: u16, body: &'static str) -> (String, std::sync::mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut head = String::new();
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                head.push_str(&line);
            }
            let mut body_in = vec![0; length];
            let _ = reader.read_exact(&mut body_in);
            let _ = tx.send(head);
            let reply = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes());
        }
    });
    (addr, rx)
}

#[test]
fn completions_for_every_shell_name_the_subcommands() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let o = quotad(&["completions", shell]);
        let script = text(&o.stdout);
        assert!(o.status.success(), "{shell}: {}", text(&o.stderr));
        for word in ["quotad", "consume", "set-plan", "token-file", "completions"] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    // The bash script is valid bash.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quotad.bash");
    std::fs::write(&path, quotad(&["completions", "bash"]).stdout).unwrap();
    let o = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(o.status.success(), "bash -n: {}", text(&o.stderr));
    let o = quotad(&["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("possible values"), "{}", text(&o.stderr));
}

#[test]
fn the_man_page_documents_every_subcommand_and_the_exit_codes() {
    let o = quotad(&["man"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let page = text(&o.stdout);
    assert!(page.contains(".TH quotad 1"), "{page}");
    // clap_mangen's sections, then the ones `quotad man` adds.
    for section in ["NAME", "SYNOPSIS", "OPTIONS", "SUBCOMMANDS"] {
        assert!(page.contains(&format!(".SH {section}\n")), "no section {section}");
    }
    for section in ["EXIT STATUS", "FILES", "ENVIRONMENT", "SIGNALS"] {
        assert!(page.contains(&format!(".SH \"{section}\"\n")), "no section {section}");
    }
    for sub in [
        "serve",
        "config",
        "wal",
        "consume",
        "check",
        "usage",
        "set-plan",
        "reset",
        "credit",
        "reload",
        "bench",
        "health",
        "completions",
        "man",
    ] {
        assert!(
            page.contains(&format!("quotad\\-{}(1)", sub.replace('-', "\\-"))),
            "{sub} missing"
        );
    }
    assert!(page.contains("QUOTAD_TOKEN") && page.contains("6 a running daemon holds"));
    // Rendered by man(1) without complaint, where man is installed.
    if Command::new("man").arg("--version").output().is_ok() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("quotad.1");
        std::fs::write(&file, &o.stdout).unwrap();
        let r = Command::new("man")
            .arg("-l")
            .arg(&file)
            .env("MANWIDTH", "80")
            .env("MAN_KEEP_STDERR", "1")
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", text(&r.stderr));
        let shown = text(&r.stdout);
        assert!(shown.contains("EXIT STATUS") && shown.contains("consume"), "{shown}");
        assert!(text(&r.stderr).trim().is_empty(), "man -l: {}", text(&r.stderr));
    }
    // --dir: quotad.1 (with the added sections) and one page per subcommand.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    let o = quotad(&["man", "--dir", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    for page in [
        "quotad.1",
        "quotad-consume.1",
        "quotad-wal-verify.1",
        "quotad-completions.1",
    ] {
        assert!(out.join(page).exists(), "{page} not written");
    }
    assert_eq!(std::fs::read(out.join("quotad.1")).unwrap(), quotad(&["man"]).stdout);
    assert!(text(&std::fs::read(out.join("quotad-health.1")).unwrap()).contains("not ready"));
}

#[test]
fn addr_takes_host_port_or_an_http_url_and_refuses_the_rest_in_words() {
    let (addr, seen) = canned(200, r#"{"status":"ready"}"#);
    for form in [addr.clone(), format!("http://{addr}"), format!("http://{addr}/")] {
        let o = quotad(&["health", "--addr", &form]);
        assert!(o.status.success(), "{form}: {}", text(&o.stderr));
        assert!(seen
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .starts_with("GET /readyz "));
    }
    for (bad, says) in [
        ("https://127.0.0.1:7878", "plain HTTP"),
        ("localhost", "host:port"),
        ("http://127.0.0.1:7878/v1/consume", "without a path"),
        ("unix:///run/quotad.sock", "host:port"),
    ] {
        let o = quotad(&["health", "--addr", bad]);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains(says), "{bad}: {err}");
        assert!(!err.contains("lookup") && !err.contains("os error"), "{bad}: {err}");
    }
}

#[test]
fn a_401_or_403_says_how_to_give_the_token() {
    let unauthorized = r#"{"error":{"code":"unauthorized","message":"send `Authorization: Bearer <token>`"}}"#;
    let (addr, _seen) = canned(401, unauthorized);
    let o = quotad(&["usage", "u", "--addr", &addr]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("401 unauthorized"), "{err}");
    assert!(err.contains("--token-file") && err.contains("QUOTAD_TOKEN"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("client.token");
    std::fs::write(&token, "a-token-of-sixteen+\n").unwrap();
    let o = quotad(&["usage", "u", "--addr", &addr, "--token-file", token.to_str().unwrap()]);
    let err = text(&o.stderr);
    assert!(
        err.contains(&format!("the token in {}", token.display())) && err.contains("not one"),
        "{err}"
    );

    let o = Command::new(BIN)
        .args(["usage", "u", "--addr", &addr])
        .env("QUOTAD_TOKEN", "a-token-of-sixteen+")
        .output()
        .unwrap();
    assert!(
        text(&o.stderr).contains("the token in QUOTAD_TOKEN"),
        "{}",
        text(&o.stderr)
    );

    let forbidden =
        r#"{"error":{"code":"forbidden","message":"this token's role is client; this endpoint needs admin"}}"#;
    let (addr, seen) = canned(403, forbidden);
    let o = quotad(&["reload", "--addr", &addr, "--token-file", token.to_str().unwrap()]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("needs an admin token"), "{err}");
    let head = seen.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(head.contains("authorization: Bearer a-token-of-sixteen+\r\n"), "{head}");

    let o = quotad(&["usage", "u", "--addr", &addr, "--token-file", "/nonexistent/token"]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot read the token file /nonexistent/token"), "{err}");
}

#[test]
fn health_exits_as_its_help_says() {
    let help = text(&quotad(&["health", "--help"]).stdout);
    assert!(
        help.contains("exit 0 if the daemon is ready, 1 if it answers but is not ready")
            && help.contains("3 if it cannot be reached"),
        "{help}"
    );
    let (ready, _a) = canned(200, r#"{"status":"ready"}"#);
    assert_eq!(quotad(&["health", "--addr", &ready]).status.code(), Some(0));
    let not_ready =
        r#"{"error":{"code":"unavailable","message":"not ready: recovery is running or shutdown has begun"}}"#;
    let (recovering, _b) = canned(503, not_ready);
    let o = quotad(&["health", "--addr", &recovering]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("not ready"));
    // Nothing listens on a port just released.
    let free = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let o = quotad(&["health", "--addr", &free]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("cannot reach quotad"));
}

#[test]
fn bench_help_describes_its_own_json() {
    let help = text(&quotad(&["bench", "--help"]).stdout);
    let json = &help[help.find("--json").unwrap()..];
    let json = &json[..json.find("\n\n").unwrap_or(json.len())];
    assert!(json.contains("report as one JSON object"), "{json}");
    assert!(!help.contains("daemon's JSON answer"), "{help}");
}

/// Runs the daemon in `dir` with `args` and stderr to a file, until `until`
/// appears in it or it exits; then stops it. Returns what it logged.
fn run_until(dir: &Path, args: &[&str], until: &str) -> String {
    let log = dir.join("stderr.log");
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("QUOTAD_LOG")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        if logged.contains(until) || child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "never logged {until:?}: {logged}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn human_logs_into_a_file_are_plain_text_and_no_plans_is_said() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("empty.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"unix:{}\"]\n[storage]\ndata_dir = \"{}\"\n",
            dir.path().join("q.sock").display(),
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let logged = run_until(
        dir.path(),
        &["serve", "--config", config.to_str().unwrap(), "--log-format", "human"],
        "ready",
    );
    assert!(!logged.contains('\u{1b}'), "colour codes in a file: {logged:?}");
    assert!(logged.contains(" INFO ") && logged.contains("ready"), "{logged}");
    assert!(
        logged.contains("defines no plans") && logged.contains("404 unknown_subject"),
        "{logged}"
    );
}

/// Plain `quotad` where there is no quotad.toml says it runs on the built-in
/// defaults. (It may fail to bind 127.0.0.1:7878 if something else holds the
/// port; the warning comes first either way, and the test stops it then.)
#[test]
fn plain_quotad_outside_the_repository_says_it_has_no_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let logged = run_until(dir.path(), &["--log-format", "json"], "no configuration file");
    assert!(
        logged.contains("no configuration file") && logged.contains("built-in defaults") && logged.contains("no plans"),
        "{logged}"
    );
    let cwd = dir.path().canonicalize().unwrap();
    assert!(
        logged.contains(&cwd.display().to_string()),
        "names where it looked: {logged}"
    );
}

/// A reload is logged as a sentence (what is in force, what needs a restart),
/// not as the Rust value `ReloadReport { … }`.
#[test]
fn a_sighup_reload_is_logged_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("quotad.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"unix:{}\"]\n[storage]\ndata_dir = \"{}\"\n[[plans]]\nname = \"free\"\ndefault = true\n",
            dir.path().join("q.sock").display(),
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    let mut child = Command::new(BIN)
        .args(["serve", "--log-format", "json", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let wait_for = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let logged = std::fs::read_to_string(&log).unwrap_or_default();
            if logged.contains(what) {
                return logged;
            }
            assert!(Instant::now() < deadline, "never logged {what:?}: {logged}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for("\"ready\"");
    Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    let logged = wait_for("configuration reloaded");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert!(
        logged.contains("SIGHUP: configuration reloaded: 1 plan(s), 0 limit(s), 0 token(s) in force"),
        "{logged}"
    );
    assert!(
        !logged.contains("ReloadReport") && !logged.contains("restart_required:"),
        "{logged}"
    );
}

/// `check --key` is refused in words, before anything is sent (the API
/// refuses keys on check; the key was once dropped silently).
#[test]
fn check_refuses_an_idempotency_key() {
    let o = quotad(&["check", "alice", "--key", "k1", "--addr", "127.0.0.1:9"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("check does not take --key"),
        "{}",
        text(&o.stderr)
    );
}
