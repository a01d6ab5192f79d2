//! `POST /v1/batch`: each operation answered as its single call would be, bad
//! operations answered alone, bounds on the batch; and `quotad bench` driving a
//! server, over TCP and the Unix socket.

mod common;

use common::{TestServer, TRANSPORTS};
use serde_json::json;

const CONFIG: &str = r#"
metrics = ["tokens"]
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "per-day"
  period = "1d"
  max = 3
"#;

#[tokio::test]
async fn each_operation_is_answered_like_its_single_call() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        let hold = s.post("/v1/reserve", json!({"subject": "h"})).await;
        let id = hold.body["reservation_id"].as_str().unwrap().to_string();
        let r = s
            .post(
                "/v1/batch",
                json!({"operations": [
                    {"op": "consume", "subject": "u"},
                    {"op": "consume", "subject": "u", "idempotency_key": "k"},
                    {"op": "consume", "subject": "u", "idempotency_key": "k"},
                    {"op": "check", "subject": "u"},
                    {"op": "consume", "subject": "u"},
                    {"op": "consume", "subject": "u"},
                    {"op": "commit", "reservation_id": id},
                    {"op": "release", "reservation_id": "rsv_nope"},
                    {"op": "consume", "subject": ""},
                    {"op": "consume", "subject": "u", "amounts": {"bogus": 1}},
                    {"op": "teleport", "subject": "u"},
                    {"subject": "u"},
                ]}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let res = r.body["results"].as_array().unwrap();
        let status: Vec<u64> = res.iter().map(|x| x["status"].as_u64().unwrap()).collect();
        assert_eq!(
            status,
            [200, 200, 200, 200, 200, 200, 200, 404, 400, 400, 400, 400],
            "{}",
            r.text
        );
        let allowed: Vec<_> = res[..6]
            .iter()
            .map(|x| x["body"]["allowed"].as_bool().unwrap())
            .collect();
        assert_eq!(
            allowed,
            [true, true, true, true, true, false],
            "max 3: the sixth is denied"
        );
        assert_eq!(
            res[2]["body"]["replayed"], true,
            "a repeated key inside a batch replays"
        );
        assert_eq!(res[4]["body"]["counters"][0]["used"], 3);
        assert_eq!(res[6]["body"]["status"], "committed");
        assert_eq!(res[7]["body"]["error"]["code"], "unknown_reservation");
        assert_eq!(res[9]["body"]["error"]["code"], "unknown_metric");
        assert!(res[10]["body"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("teleport"));
        // The batch changed exactly what the single calls would have.
        assert_eq!(s.get("/v1/subjects/u").await.used("per-day"), 3);
        // Bounds and shape.
        assert_eq!(s.post("/v1/batch", json!({"operations": []})).await.status, 400);
        let many: Vec<_> = (0..1001).map(|_| json!({"op": "check", "subject": "u"})).collect();
        assert_eq!(s.post("/v1/batch", json!({"operations": many})).await.status, 400);
        assert_eq!(s.post("/v1/batch", json!({"ops": []})).await.status, 400);
        // `op` belongs to batches only.
        let r = s.consume(json!({"op": "consume", "subject": "u"})).await;
        assert_eq!((r.status, r.error_code()), (400, "invalid_request"));
        s.stop().await;
    }
}

/// Runs `quotad bench ARGS --subjects 50 --json` against `s`; its report.
async fn bench(s: &TestServer, args: &[&str]) -> serde_json::Value {
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.extend(["--subjects", "50", "--json"].map(String::from));
    args.extend(s.cli_target());
    // The server runs on this test's thread: run the client off it.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_quotad"))
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The `d` counters of subjects `{prefix}0` to `{prefix}49`, summed.
async fn used_by(s: &TestServer, prefix: &str) -> u64 {
    let mut used = 0;
    for i in 0..50 {
        used += s.get(&format!("/v1/subjects/{prefix}{i}")).await.used("d");
    }
    used
}

#[tokio::test]
async fn quotad_bench_drives_a_server_and_reports() {
    for t in TRANSPORTS {
        let s = TestServer::start(
            "metrics = [\"tokens\"]\n[[plans]]\nname = \"p\"\ndefault = true\n\
             [[plans.limits]]\nname = \"d\"\nperiod = \"1d\"\nmax = 2\n",
            t,
        )
        .await;
        let r = bench(&s, &["bench", "-c", "4", "-n", "300"]).await;
        assert_eq!(
            (r["operations"].as_u64(), r["errors"].as_u64()),
            (Some(300), Some(0)),
            "{r}"
        );
        let denied = r["denied"].as_u64().unwrap();
        assert!(denied >= 200, "50 subjects with max 2 allow at most 100: {r}");
        // The server's counters hold exactly the allowed ones.
        assert_eq!(used_by(&s, "user:").await, 300 - denied);
        assert!(r["p50_us"].as_u64().unwrap() > 0 && r["p99_us"].as_u64() >= r["p50_us"].as_u64());
        // Pipelined, 8 at a time: exactly the operations asked for, each
        // answered and counted once.
        let r = bench(
            &s,
            &["bench", "-c", "4", "-P", "8", "-n", "300", "--subject-prefix", "pipe:"],
        )
        .await;
        assert_eq!(
            (r["operations"].as_u64(), r["errors"].as_u64(), r["pipeline"].as_u64()),
            (Some(300), Some(0), Some(8)),
            "{r}"
        );
        let denied = r["denied"].as_u64().unwrap();
        assert!(denied >= 200, "{r}");
        assert_eq!(used_by(&s, "pipe:").await, 300 - denied, "{r}");
        s.stop().await;
    }
}
