//! Defects found by an adversarial run, each reproduced and held fixed:
//! counters that could not deny refusing charges (one call blocking every
//! subject), reservations without a bound per subject, a subject with many
//! holds that could not be deleted, formula injection in the CSV export,
//! client tokens claiming any priority, waits that ignored expiring holds,
//! and data files readable by everyone.

mod common;

use common::{TestServer, Transport, TRANSPORTS};
use serde_json::json;

const MAX_SAFE: u64 = (1 << 53) - 1;

/// Global counters that cannot deny: unlimited, monitor and degrade.
const SATURATING: &str = r#"
[[limits]]
name = "all-tokens"
metric = "tokens"
scope = "global"
max = "unlimited"
period = "1d"

[[limits]]
name = "watched-tokens"
metric = "tokens"
scope = "global"
algorithm = "sliding"
period = "1h"
max = 1000
mode = "monitor"

[[limits]]
name = "soft-tokens"
metric = "tokens"
scope = "global"
algorithm = "token_bucket"
max = 1000
period = "1m"
mode = "degrade"

[[limits]]
name = "lifetime-tokens"
metric = "tokens"
scope = "global"
algorithm = "lifetime"
max = "unlimited"

[[plans]]
name = "free"
default = true
"#;

#[tokio::test]
async fn a_counter_that_cannot_deny_saturates_instead_of_blocking_everyone() {
    for t in TRANSPORTS {
        let s = TestServer::start(SATURATING, t).await;
        // One client charges (almost) the largest amount there is...
        let r = s
            .consume(json!({"subject": "mallory", "amounts": {"tokens": MAX_SAFE - 100}}))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        // ...and every other subject's calls still pass, again and again.
        for i in 0..3 {
            let r = s
                .consume(json!({"subject": format!("user:{i}"), "amounts": {"tokens": 200}}))
                .await;
            assert_eq!(r.status, 200, "{}", r.text);
            assert_ne!(r.body["decision"], "deny", "{}", r.text);
            for limit in ["all-tokens", "watched-tokens", "soft-tokens", "lifetime-tokens"] {
                assert_eq!(r.used(limit), MAX_SAFE, "{limit}: {}", r.text);
            }
        }
        // A reservation and a commit larger than its hold saturate too.
        let r = s
            .post("/v1/reserve", json!({"subject": "user:9", "amounts": {"tokens": 5}}))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let id = r.body["reservation_id"].as_str().unwrap().to_string();
        let r = s
            .post(
                &format!("/v1/reservations/{id}/commit"),
                json!({"amounts": {"tokens": MAX_SAFE}}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let r = s.consume(json!({"subject": "user:10", "amounts": {"tokens": 1}})).await;
        assert_eq!((r.status, r.used("all-tokens")), (200, MAX_SAFE), "{}", r.text);
        s.stop().await;
    }
}

const HOLDS: &str = r#"
[engine]
max_reservations_per_subject = 3
reservation_ttl_max = "1h"

[[limits]]
name = "shared-tokens"
metric = "tokens"
scope = "global"
max = 1000000000
period = "1d"

[[plans]]
name = "free"
default = true
"#;

#[tokio::test]
async fn a_subject_holds_at_most_max_reservations_per_subject() {
    for t in TRANSPORTS {
        let s = TestServer::start(HOLDS, t).await;
        let mut ids = Vec::new();
        for _ in 0..3 {
            let r = s
                .post("/v1/reserve", json!({"subject": "u", "amounts": {"tokens": 1}}))
                .await;
            assert!(r.allowed(), "{}", r.text);
            ids.push(r.body["reservation_id"].as_str().unwrap().to_string());
        }
        let r = s
            .post("/v1/reserve", json!({"subject": "u", "amounts": {"tokens": 1}}))
            .await;
        assert_eq!((r.status, r.allowed()), (200, false), "{}", r.text);
        assert_eq!(r.body["reasons"][0]["code"], "too_many_reservations", "{}", r.text);
        assert!(r.body["reasons"][0].get("limit").is_none(), "{}", r.text);
        assert!(r.body.get("retry_after_ms").is_none_or(|v| v.is_null()), "{}", r.text);
        assert_eq!(r.used("shared-tokens"), 3, "nothing charged: {}", r.text);
        // Other subjects and consumes are not affected.
        assert!(s.post("/v1/reserve", json!({"subject": "v"})).await.allowed());
        assert!(s
            .consume(json!({"subject": "u", "amounts": {"tokens": 1}}))
            .await
            .allowed());
        // A release makes room again.
        let r = s.post(&format!("/v1/reservations/{}/release", ids[0]), json!({})).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(s.post("/v1/reserve", json!({"subject": "u"})).await.allowed());
        s.stop().await;
    }
}

#[tokio::test]
async fn a_subject_with_60000_holds_can_be_deleted_and_the_delete_survives_a_restart() {
    const HOLD_COUNT: usize = 60_000;
    let config = HOLDS
        .replace(
            "max_reservations_per_subject = 3",
            "max_reservations_per_subject = 100000",
        )
        .replace("[engine]", "[storage]\ndurability = \"batch\"\n[engine]");
    let data = tempfile::tempdir().unwrap();
    let s = TestServer::start_durable(&config, Transport::Tcp, common::T0, data.path()).await;
    for _ in 0..HOLD_COUNT / 1000 {
        let ops: Vec<_> = (0..1000)
            .map(|_| json!({"op": "reserve", "subject": "hoarder", "amounts": {"tokens": 2}, "ttl_ms": 3_600_000}))
            .collect();
        let r = s.post("/v1/batch", json!({ "operations": ops })).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(r.body["results"].as_array().unwrap().iter().all(|x| x["status"] == 200));
    }
    let r = s.consume(json!({"subject": "other", "amounts": {"tokens": 5}})).await;
    assert_eq!(r.used("shared-tokens"), 2 * HOLD_COUNT as u64 + 5, "{}", r.text);

    let r = s
        .req("DELETE", "/v1/subjects/hoarder", None, &[("Idempotency-Key", "del-1")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // The holds' share of the global counter is refunded.
    let r = s.consume(json!({"subject": "other", "amounts": {"tokens": 1}})).await;
    assert_eq!(r.used("shared-tokens"), 6, "{}", r.text);
    s.stop().await;

    // Replay reaches the same state, and the delete's key answers as before.
    let s = TestServer::start_durable(&config, Transport::Tcp, common::T0, data.path()).await;
    let r = s.consume(json!({"subject": "other", "amounts": {"tokens": 1}})).await;
    assert_eq!(r.used("shared-tokens"), 7, "{}", r.text);
    let r = s
        .req("DELETE", "/v1/subjects/hoarder", None, &[("Idempotency-Key", "del-1")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(s.post("/v1/reserve", json!({"subject": "hoarder"})).await.allowed());
    s.stop().await;
}

const EXPORTS: &str = r#"
[history]
max_exports = 2
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 1000000
"#;

#[tokio::test]
async fn csv_cells_that_a_spreadsheet_would_run_are_quoted_as_text() {
    for t in TRANSPORTS {
        let s = TestServer::start(EXPORTS, t).await;
        let subjects = [
            "=HYPERLINK(\"http://x.test\",\"click\")",
            "@SUM(1+1)",
            "+1+2",
            "-2+3",
            "plain",
        ];
        for subject in subjects {
            let r = s.consume(json!({"subject": subject, "amounts": {"tokens": 7}})).await;
            assert_eq!(r.status, 200, "{}", r.text);
        }
        let r = s
            .get("/v1/usage?from=2026-11-01&to=2026-12-01&format=csv&granularity=month")
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let lines: Vec<&str> = r.text.lines().collect();
        assert_eq!(lines[0], "subject,start,metric,amount");
        for line in &lines[1..] {
            assert!(
                !line.starts_with(['=', '+', '-', '@']) && !line.starts_with("\"=") && !line.starts_with("\"@"),
                "a cell a spreadsheet would run: {line}"
            );
        }
        assert!(
            r.text
                .contains("\"'=HYPERLINK(\"\"http://x.test\"\",\"\"click\"\")\",2026-11-01T00:00:00Z,tokens,7"),
            "{}",
            r.text
        );
        for want in ["'@SUM(1+1),", "'+1+2,", "'-2+3,", "\nplain,"] {
            assert!(r.text.contains(want), "{want}: {}", r.text);
        }
        // JSON answers carry the subject as it is: only CSV cells are escaped.
        let r = s.get("/v1/usage?from=2026-11-01&to=2026-12-01&granularity=month").await;
        assert!(r.text.contains("\"subject\":\"+1+2\""), "{}", r.text);
        s.stop().await;
    }
}

/// Sends a request over the Unix socket and reads only the head of the answer.
async fn head_only(sock: &std::path::Path, path: &str) -> (tokio::net::UnixStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::UnixStream::connect(sock).await.unwrap();
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: q\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = c.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the head: {}", String::from_utf8_lossy(&head));
        head.extend_from_slice(&buf[..n]);
    }
    (c, String::from_utf8_lossy(&head).into_owned())
}

#[tokio::test]
async fn at_most_max_exports_csv_exports_stream_at_once() {
    let s = TestServer::start(EXPORTS, Transport::Unix).await;
    // Enough rows that an export cannot fit in the socket buffers at once,
    // so one whose client stops reading stays open.
    for batch in 0..20 {
        let ops: Vec<_> = (0..1000)
            .map(|i| json!({"op": "consume", "subject": format!("customer-with-a-long-name:{batch:02}:{i:04}"), "amounts": {"tokens": 5}}))
            .collect();
        let r = s.post("/v1/batch", json!({ "operations": ops })).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let sock = s.socket_path().unwrap();
    let path = "/v1/usage?from=2026-11-01&to=2026-12-01&format=csv";
    let (first, head) = head_only(&sock, path).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (_second, head) = head_only(&sock, path).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The third is turned away while two stream.
    let r = s.get(path).await;
    assert_eq!((r.status, r.error_code()), (503, "busy"), "{}", r.text);
    assert_eq!(r.header("retry-after").as_deref(), Some("5"));
    assert!(r.text.contains("history.max_exports"), "{}", r.text);
    // JSON pages are not exports that stream: they still answer.
    assert_eq!(s.get("/v1/usage?from=2026-11-01&to=2026-12-01").await.status, 200);
    // A client that goes away gives its slot back.
    drop(first);
    let mut ok = false;
    for _ in 0..200 {
        let r = s.get(path).await;
        if r.status == 200 {
            assert_eq!(r.text.lines().count(), 1 + 20_000 * 2, "every row: requests and tokens");
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ok, "the slot came back");
    s.stop().await;
}

const TOKENS: &str = r#"
[[auth.tokens]]
role = "client"
token = "client-token-0123456789"
[[auth.tokens]]
role = "client"
token = "batch-jobs-token-0123456789"
max_priority = "low"
[[auth.tokens]]
role = "admin"
token = "admin-token-0123456789"

[[plans]]
name = "free"
default = true
"#;

#[tokio::test]
async fn a_client_token_asks_for_priority_up_to_its_max_priority() {
    for t in TRANSPORTS {
        let s = TestServer::start(TOKENS, t).await;
        let call = |token: &'static str, priority: &'static str| {
            let body = json!({"subject": "u", "priority": priority}).to_string();
            let s = &s;
            async move {
                s.req(
                    "POST",
                    "/v1/consume",
                    Some(&body),
                    &[("Authorization", &format!("Bearer {token}"))],
                )
                .await
            }
        };
        for (token, priority, status) in [
            ("client-token-0123456789", "high", 200),
            ("client-token-0123456789", "critical", 403),
            ("batch-jobs-token-0123456789", "low", 200),
            ("batch-jobs-token-0123456789", "normal", 403),
            ("admin-token-0123456789", "critical", 200),
        ] {
            let r = call(token, priority).await;
            assert_eq!(r.status, status, "{token} {priority}: {}", r.text);
            if status == 403 {
                assert_eq!(r.error_code(), "forbidden");
                assert!(
                    r.text.contains("priority") && r.text.contains("max_priority"),
                    "{}",
                    r.text
                );
            }
        }
        // Inside a batch, the operation is refused on its own.
        let body = json!({"operations": [
            {"op": "consume", "subject": "u", "priority": "critical"},
            {"op": "consume", "subject": "u", "priority": "high"}]})
        .to_string();
        let r = s
            .req(
                "POST",
                "/v1/batch",
                Some(&body),
                &[("Authorization", "Bearer client-token-0123456789")],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["results"][0]["status"], 403, "{}", r.text);
        assert_eq!(r.body["results"][1]["status"], 200, "{}", r.text);
        s.stop().await;
    }
}

#[test]
fn one_token_under_two_entries_is_a_config_error() {
    let text = r#"
[[auth.tokens]]
role = "client"
token = "the-same-token-0123456789"
[[auth.tokens]]
role = "admin"
token = "the-same-token-0123456789"
"#;
    let config = quotad::config::Config::from_toml(text, "t.toml").unwrap();
    let err = quotad::api::load_tokens(&config).unwrap_err().to_string();
    assert!(
        err.contains("auth.tokens[1]") && err.contains("same token as auth.tokens[0]"),
        "{err}"
    );
}
