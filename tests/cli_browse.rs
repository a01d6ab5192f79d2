//! `quotad subjects list`, `quotad events list` and `quotad events tail`
//! against a running daemon, over TCP and the Unix socket: what they print,
//! paging, `--json`, type filters, and a tail that sees an event recorded
//! after it started.

mod common;

use std::process::{Command, Output, Stdio};

use common::{TestServer, TRANSPORTS};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_quotad");

const CONFIG: &str = r#"
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "per-day"
  period = "1d"
  max = 4
  alerts = [0.5, 1.0]
[[plans]]
name = "pro"
  [[plans.limits]]
  name = "per-day"
  period = "1d"
  max = 100
"#;

async fn cli(s: &TestServer, list: &[&str]) -> Output {
    let mut args: Vec<String> = list.iter().map(|x| x.to_string()).collect();
    args.extend(s.cli_target());
    // The server runs on this test's thread: run the client off it.
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(&args)
            .env_remove("QUOTAD_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn lines(o: &Output) -> Vec<String> {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect()
}

#[tokio::test]
async fn subjects_list_pages_and_prints_plans() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        for who in ["carol", "alice", "bob"] {
            s.consume(json!({"subject": who})).await;
        }
        assert_eq!(s.put("/v1/subjects/bob", json!({"plan": "pro"})).await.status, 200);
        let out = lines(&cli(&s, &["subjects", "list"]).await);
        assert_eq!(
            out,
            ["alice\tfree\tdefault", "bob\tpro\tassigned", "carol\tfree\tdefault"],
            "{t:?}"
        );
        // A page of 2 says where the next starts.
        let o = cli(&s, &["subjects", "list", "--limit", "2"]).await;
        assert_eq!(lines(&o).len(), 2);
        assert!(String::from_utf8_lossy(&o.stderr).contains("--after \"bob\""), "{o:?}");
        let o = cli(&s, &["subjects", "list", "--after", "bob"]).await;
        assert_eq!(lines(&o), ["carol\tfree\tdefault"]);
        // --all --json: every subject, a JSON object per line.
        let all: Vec<Value> = lines(&cli(&s, &["subjects", "list", "--all", "--json"]).await)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(all.len(), 3);
        assert_eq!(all[1]["subject"], "bob");
        let o = cli(&s, &["subjects", "list", "--limit", "0"]).await;
        assert_eq!(o.status.code(), Some(2), "{o:?}");
        s.stop().await;
    }
}

#[tokio::test]
async fn events_list_filters_and_tail_follows_new_events() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        // alice crosses 50% and 100% of per-day: two threshold.crossed events.
        for _ in 0..4 {
            s.consume(json!({"subject": "alice"})).await;
        }
        let out = lines(&cli(&s, &["events", "list", "--type", "threshold.*"]).await);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(
            out[0].starts_with("1\t") && out[0].contains("\tthreshold.crossed\talice\t"),
            "{out:?}"
        );
        assert!(out[1].contains("\"threshold\":1.0"), "{out:?}");
        let json_out = lines(&cli(&s, &["events", "list", "--json", "--after", "1"]).await);
        let e: Value = serde_json::from_str(&json_out[0]).unwrap();
        assert_eq!((e["seq"].as_u64(), e["threshold"].as_f64()), (Some(2), Some(1.0)));
        let o = cli(&s, &["events", "list", "--type", "no.such.*"]).await;
        assert_eq!(o.status.code(), Some(3), "the daemon's 400 is reported: {o:?}");
        assert!(String::from_utf8_lossy(&o.stderr).contains("400"), "{o:?}");

        // From the start: both, then it stops at --count.
        let out = lines(&cli(&s, &["events", "tail", "--after", "0", "--count", "2"]).await);
        assert_eq!(out.len(), 2);
        // From now: nothing old; an event recorded later is printed.
        let mut args = vec!["events", "tail", "--count", "1", "--interval", "0.05"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        args.extend(s.cli_target());
        let child = Command::new(BIN)
            .args(&args)
            .env_remove("QUOTAD_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Let it find the newest event first.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        for _ in 0..2 {
            s.consume(json!({"subject": "bob"})).await;
        }
        let pid = child.id();
        let waited = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()),
        )
        .await;
        let Ok(o) = waited else {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("events tail printed nothing within 20 s");
        };
        let o = o.unwrap();
        let out = lines(&o);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out[0].starts_with("3\t") && out[0].contains("\tbob\t"), "{out:?}");

        // `| head -1`: once the reader is gone, tail ends instead of polling on.
        let mut args: Vec<String> = ["events", "tail", "--after", "0", "--interval", "0.05"]
            .into_iter()
            .map(String::from)
            .collect();
        args.extend(s.cli_target());
        let mut child = Command::new(BIN)
            .args(&args)
            .env_remove("QUOTAD_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let first = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
            line // the reader (and the pipe) is dropped here
        })
        .await
        .unwrap();
        assert!(first.starts_with("1\t"), "{first:?}");
        for _ in 0..20 {
            s.consume(json!({"subject": "carol"})).await;
        }
        let pid = child.id();
        let ended = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            tokio::task::spawn_blocking(move || child.wait().unwrap()),
        )
        .await;
        if ended.is_err() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("events tail went on after its reader closed the pipe");
        }
        assert!(ended.unwrap().unwrap().success());
        s.stop().await;
    }
}
