//! The nginx configuration printed in docs/integrations.md, run by a real
//! nginx in front of a small app, with quotad in this process: allowed
//! requests reach the app with `X-RateLimit-Remaining`, the one past the
//! limit is a 429 with `Retry-After` and the rate headers, and a request
//! without a subject never reaches the app. Over TCP and over the Unix
//! socket (the `server unix:` line the docs mention).
//!
//! nginx comes from Debian's `nginx-light` (`.ci/run` installs it); without
//! it the test says so and passes, except under CI=true, where it fails.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestServer, Transport, TRANSPORTS};

const CONFIG: &str = r#"
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "api-per-minute"
  match = { event = "api.call" }
  period = "1m"
  max = 2
"#;

fn nginx() -> Option<String> {
    let bin = std::env::var("QUOTAD_NGINX").unwrap_or_else(|_| "nginx".into());
    let ok = Command::new(&bin)
        .arg("-v")
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(bin);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "nginx is not installed (.ci/run installs Debian's nginx-light)"
    );
    eprintln!("SKIPPED: nginx is not installed (apt-get install nginx-light); the nginx test did not run");
    None
}

/// The first ```nginx block of docs/integrations.md.
fn documented_config() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/integrations.md")).unwrap();
    let start = doc.find("```nginx\n").expect("an nginx block in docs/integrations.md") + 9;
    let end = start + doc[start..].find("```").unwrap();
    doc[start..end].to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Nginx(Child);
impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nginx in the foreground on the documented site, its addresses replaced.
fn start_nginx(bin: &str, dir: &Path, quotad: &str, app: u16, listen: u16) -> Nginx {
    let site = documented_config();
    for needle in [
        "server 127.0.0.1:7878;",
        "proxy_pass http://127.0.0.1:8000;",
        "listen 8080;",
    ] {
        assert!(site.contains(needle), "the documented config has `{needle}`");
    }
    let site = site
        .replace("server 127.0.0.1:7878;", &format!("server {quotad};"))
        .replace(
            "proxy_pass http://127.0.0.1:8000;",
            &format!("proxy_pass http://127.0.0.1:{app};"),
        )
        .replace("listen 8080;", &format!("listen 127.0.0.1:{listen};"));
    std::fs::write(dir.join("site.conf"), site).unwrap();
    let d = dir.display();
    let main = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         include {d}/site.conf;\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), main).unwrap();
    let child = Command::new(bin)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("nginx starts");
    let n = Nginx(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", listen)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nginx did not listen: {}",
            std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    n
}

/// The app behind nginx: answers every request, and counts them.
async fn start_app() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            "hello from the app"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_nginx_config_turns_denials_into_429() {
    let Some(bin) = nginx() else { return };
    let http = reqwest::Client::new();
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        let quotad = match t {
            Transport::Tcp => s.cli_target()[1].clone(),
            Transport::Unix => format!("unix:{}", s.socket_path().unwrap().display()),
        };
        let (app, hits) = start_app().await;
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let _nginx = start_nginx(&bin, dir.path(), &quotad, app, port);
        let url = format!("http://127.0.0.1:{port}/api/chat");

        for remaining in ["1", "0"] {
            let r = http.get(&url).header("x-user-id", "alice").send().await.unwrap();
            assert_eq!(r.status(), 200, "{t:?}");
            let h = r.headers().clone();
            assert_eq!(r.text().await.unwrap(), "hello from the app");
            assert_eq!(h["x-ratelimit-remaining"], remaining, "{t:?}");
        }
        let r = http.get(&url).header("x-user-id", "alice").send().await.unwrap();
        assert_eq!(r.status(), 429, "{t:?}");
        let h = r.headers().clone();
        assert_eq!(h["retry-after"], "60");
        assert_eq!(h["x-ratelimit-limit"], "2");
        assert_eq!(h["x-ratelimit-remaining"], "0");
        assert!(h["x-ratelimit-reset"].to_str().unwrap().parse::<u64>().is_ok());
        let body: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "rate_limited");
        // Another user is not affected; no user is no pass.
        let r = http.get(&url).header("x-user-id", "bob").send().await.unwrap();
        assert_eq!(r.status(), 200);
        let r = http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 500);
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            3,
            "{t:?}: denied calls never reach the app"
        );
        assert_eq!(s.get("/v1/subjects/alice").await.used("api-per-minute"), 2);
        s.stop().await;
    }
}
