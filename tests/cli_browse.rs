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

const USAGE: &str = r#"
metrics = ["tokens"]
[history]
dimensions = ["model"]
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 100000
"#;

#[tokio::test]
async fn usage_export_streams_csv_and_usage_top_ranks() {
    let day = |ms: u64| quotad::period::rfc3339(ms)[..10].to_string();
    let (from, to) = (day(common::T0), day(common::T0 + 86_400_000));
    for t in TRANSPORTS {
        let s = TestServer::start(USAGE, t).await;
        // 600 subjects: more than one page of the export's streaming.
        for i in 0..600u64 {
            let model = if i % 2 == 0 { "gpt-4o" } else { "gpt-4o-mini" };
            let r = s
                .consume(json!({"subject": format!("u{i:03}"), "attributes": {"model": model}, "amounts": {"tokens": i + 1}}))
                .await;
            assert!(r.allowed(), "{}", r.text);
        }
        let csv = lines(&cli(&s, &["usage", "export", "--from", &from, "--to", &to]).await);
        assert_eq!(csv[0], "subject,start,metric,amount");
        assert_eq!(csv.len(), 1 + 600 * 2, "{t:?}");
        assert!(
            csv.contains(&format!("u599,{from}T00:00:00Z,tokens,600")),
            "{:?}",
            &csv[..4]
        );
        let total: u64 = csv[1..]
            .iter()
            .filter(|l| l.contains(",tokens,"))
            .map(|l| l.rsplit(',').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(total, 600 * 601 / 2);
        // Per model: a column, and the same total.
        let by = lines(
            &cli(
                &s,
                &["usage", "export", "--from", &from, "--to", &to, "--group-by", "model"],
            )
            .await,
        );
        assert_eq!(by[0], "subject,start,model,metric,amount");
        assert!(
            by.contains(&format!("u001,{from}T00:00:00Z,gpt-4o-mini,tokens,2")),
            "{:?}",
            &by[..4]
        );
        // JSON rows, one per line, after a subject.
        let rows = lines(
            &cli(
                &s,
                &[
                    "usage", "export", "--from", &from, "--to", &to, "--after", "u597", "--json",
                ],
            )
            .await,
        );
        assert_eq!(rows.len(), 2);
        let row: Value = serde_json::from_str(&rows[1]).unwrap();
        assert_eq!(row["subject"], "u599");
        assert_eq!(row["amounts"]["tokens"], 600);
        // A closed pipe ends the export quietly.
        let args: Vec<String> = ["usage", "export", "--from", &from, "--to", &to]
            .iter()
            .map(|x| x.to_string())
            .chain(s.cli_target())
            .collect();
        let head = tokio::task::spawn_blocking(move || {
            let mut child = Command::new(BIN)
                .args(&args)
                .env_remove("QUOTAD_TOKEN")
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut out = child.stdout.take().unwrap();
            let mut first = [0u8; 16];
            std::io::Read::read_exact(&mut out, &mut first).unwrap();
            drop(out);
            child.wait().unwrap()
        })
        .await
        .unwrap();
        assert!(head.success(), "{head:?}");

        let top = lines(
            &cli(
                &s,
                &[
                    "usage", "top", "--metric", "tokens", "--from", &from, "--to", &to, "--limit", "3",
                ],
            )
            .await,
        );
        assert_eq!(top, ["600\tu599", "599\tu598", "598\tu597"]);
        // Errors are the daemon's, in words, exit 3; bad arguments exit 2.
        let o = cli(&s, &["usage", "export", "--from", &to, "--to", &from]).await;
        assert_eq!(o.status.code(), Some(3), "{o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("must be after from"),
            "{o:?}"
        );
        let o = cli(
            &s,
            &["usage", "export", "--from", &from, "--to", &to, "--group-by", "region"],
        )
        .await;
        assert_eq!(o.status.code(), Some(3), "{o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("history.dimensions"),
            "{o:?}"
        );
        let o = cli(&s, &["usage", "export", "--from", &from]).await;
        assert_eq!(o.status.code(), Some(2), "{o:?}");
        // `quotad usage SUBJECT` still shows the subject.
        let o = lines(&cli(&s, &["usage", "u001"]).await);
        assert!(o.iter().any(|l| l.contains("tokens-per-day")), "{o:?}");
        s.stop().await;
    }
}
