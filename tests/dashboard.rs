//! `/dashboard` in a real browser: the release binary's page, headless
//! Chromium, a live daemon with auth on and data in it. The test checks the
//! rendered DOM (not the HTML served) for that data on the overview and on a
//! subject's page, that without a token the page asks for one, and saves
//! screenshots in target/dashboard/. Chromium comes from Debian's `chromium`
//! package (`.ci/run` installs it); without it the test says so and passes,
//! except under CI=true, where it fails.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_quotad");
const TOKEN: &str = "dashboard-test-admin-token";

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("QUOTAD_CHROMIUM") {
        return Some(p.into());
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            Command::new(name)
                .arg("--version")
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|_| PathBuf::from(name))
        })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: q\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    (out[9..12].parse().unwrap(), out)
}

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Chromium's rendered DOM of `url`, and a screenshot into `shot`.
fn render(browser: &Path, url: &str, shot: &Path, profile: &Path) -> String {
    let common = |c: &mut Command| {
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--virtual-time-budget=10000",
            "--window-size=1280,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .stderr(Stdio::null());
    };
    let mut dump = Command::new(browser);
    common(&mut dump);
    let out = dump.arg("--dump-dom").arg(url).output().expect("chromium runs");
    assert!(out.status.success(), "chromium --dump-dom failed");
    let mut cap = Command::new(browser);
    common(&mut cap);
    let status = cap
        .arg(format!("--screenshot={}", shot.display()))
        .arg(url)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success() && shot.exists(), "chromium --screenshot failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_dashboard_shows_live_data_in_a_real_browser() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var("CI").is_err(),
            "CI=true but no chromium: .ci/run installs Debian's chromium package"
        );
        eprintln!("chromium is not installed: the dashboard was not tested in a browser");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("quotad.toml")).unwrap();
    let config = shipped
        .replace("127.0.0.1:7878", &format!("127.0.0.1:{port}"))
        .replace(
            "\"unix:./quotad.sock\"",
            &format!("\"unix:{}\"", dir.path().join("q.sock").display()),
        )
        .replace(
            "data_dir = \"./data\"",
            &format!("data_dir = \"{}\"", dir.path().join("data").display()),
        )
        + &format!("\n[auth]\ntokens = [{{ role = \"admin\", token = \"{TOKEN}\" }}]\n");
    std::fs::write(dir.path().join("quotad.toml"), config).unwrap();
    let _daemon = Daemon(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(dir.path().join("quotad.toml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() || http(port, "GET", "/readyz", "").0 != 200 {
        assert!(Instant::now() < deadline, "the daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Data: five users on gpt-4o, user:5 past 80 % of its daily tokens, and
    // the spend breaker opened by hand.
    for i in 1..=5u64 {
        let body = format!(
            r#"{{"subject":"user:{i}","event":"llm.chat","attributes":{{"model":"gpt-4o"}},"amounts":{{"tokens":{}}}}}"#,
            i * 17_000
        );
        assert_eq!(http(port, "POST", "/v1/consume", &body).0, 200);
    }
    assert_eq!(http(port, "POST", "/v1/breakers/spend-surge/open", "").0, 200);

    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard");
    std::fs::create_dir_all(&out).unwrap();
    let base = format!("http://127.0.0.1:{port}/dashboard");

    let overview = render(
        &browser,
        &format!("{base}#token={TOKEN}"),
        &out.join("overview.png"),
        &dir.path().join("p1"),
    );
    for shown in [
        "user:5",            // top subjects today
        "85,000",            // its tokens
        "spend-surge",       // the breaker, open
        "threshold.crossed", // the event of user:5's 80 %
        "$1,000.00",         // the global money cap
    ] {
        assert!(overview.contains(shown), "the overview lacks {shown:?}:\n{overview}");
    }
    assert!(overview.contains(r#"class="pill open""#), "the breaker shows as open");

    let subject = render(
        &browser,
        &format!("{base}#token={TOKEN}&subject=user:5"),
        &out.join("subject.png"),
        &dir.path().join("p2"),
    );
    for shown in [
        "tokens-per-day",
        "85,000 / 100,000",
        "spend-per-month",
        "85,000 tokens over 30 days",
        "<rect",
    ] {
        assert!(subject.contains(shown), "the subject page lacks {shown:?}:\n{subject}");
    }

    // Without a token the page asks for one (and shows no data).
    let login = render(&browser, &base, &out.join("login.png"), &dir.path().join("p3"));
    assert!(
        login.contains(r#"<section id="login" class="card">"#),
        "the sign-in form is shown:\n{login}"
    );
    assert!(!login.contains("user:5"));
    eprintln!("dashboard screenshots: {}", out.display());
}
