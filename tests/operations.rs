//! Operating quotad: bearer-token auth for every role and endpoint class,
//! configuration reload (good and bad files), Unix socket permissions, and
//! Prometheus metrics that move as requests are made.

mod common;

use common::{TestServer, Transport, TRANSPORTS};
use serde_json::json;

const CLIENT: &str = "client-token-0123456789";
const ADMIN: &str = "admin-token-0123456789ab";

fn config(max: u64, tokens_dir: &std::path::Path) -> String {
    std::fs::write(tokens_dir.join("admin.token"), format!("{ADMIN}\n")).unwrap();
    format!(
        r#"
[auth]
tokens = [
  {{ role = "client", token = "{CLIENT}" }},
  {{ role = "admin", token_file = "{}" }},
]
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "per-day"
  period = "1d"
  max = {max}
[[plans]]
name = "pro"
  [[plans.limits]]
  name = "per-day"
  period = "1d"
  max = 1000
"#,
        tokens_dir.join("admin.token").display()
    )
}

/// Which role an endpoint needs: None (public), Some(false) client, Some(true) admin.
const ENDPOINTS: &[(&str, &str, &str, Option<bool>)] = &[
    ("GET", "/healthz", "", None),
    ("GET", "/readyz", "", None),
    ("POST", "/v1/check", r#"{"subject":"u"}"#, Some(false)),
    ("POST", "/v1/consume", r#"{"subject":"u"}"#, Some(false)),
    ("POST", "/v1/reserve", r#"{"subject":"u"}"#, Some(false)),
    ("POST", "/v1/reservations/rsv_x/commit", "{}", Some(false)),
    ("POST", "/v1/reservations/rsv_x/release", "{}", Some(false)),
    ("GET", "/v1/subjects/u", "", Some(false)),
    ("GET", "/v1/plans", "", Some(false)),
    ("GET", "/metrics", "", Some(false)),
    ("GET", "/v1/subjects", "", Some(true)),
    ("PUT", "/v1/subjects/u", r#"{"plan":"free"}"#, Some(true)),
    ("POST", "/v1/subjects/u/reset", "{}", Some(true)),
    (
        "POST",
        "/v1/subjects/u/credit",
        r#"{"limit":"per-day","amount":1}"#,
        Some(true),
    ),
    ("DELETE", "/v1/subjects/u", "", Some(true)),
    ("GET", "/v1/admin/digest", "", Some(true)),
    ("POST", "/v1/admin/reload", "", Some(true)),
];

#[tokio::test]
async fn every_role_against_every_endpoint_class() {
    for t in TRANSPORTS {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quotad.toml");
        std::fs::write(&path, config(100, dir.path())).unwrap();
        let s = TestServer::start_file(&path, t).await;
        let bearer = |tok: &str| format!("Bearer {tok}");
        let (client, admin) = (bearer(CLIENT), bearer(ADMIN));
        let bad = bearer("client-token-0123456780");
        for &(method, path, body, need) in ENDPOINTS {
            let body = (!body.is_empty()).then_some(body);
            let call = |auth: Option<String>| {
                let s = &s;
                async move {
                    let h: Vec<(&str, &str)> = auth.as_deref().map(|a| vec![("authorization", a)]).unwrap_or_default();
                    s.req(method, path, body, &h).await
                }
            };
            let none = call(None).await;
            let wrong = call(Some(bad.clone())).await;
            let basic = call(Some("Basic YWRtaW46YWRtaW4=".into())).await;
            let as_client = call(Some(client.clone())).await;
            let as_admin = call(Some(admin.clone())).await;
            let ctx = format!("{t:?} {method} {path}");
            match need {
                None => {
                    for r in [&none, &wrong, &as_client, &as_admin] {
                        assert_eq!(r.status, 200, "{ctx}: public: {}", r.text);
                    }
                }
                Some(admin_only) => {
                    for r in [&none, &wrong, &basic] {
                        assert_eq!((r.status, r.error_code()), (401, "unauthorized"), "{ctx}: {}", r.text);
                    }
                    if admin_only {
                        assert_eq!((as_client.status, as_client.error_code()), (403, "forbidden"), "{ctx}");
                    } else {
                        assert!(
                            ![401, 403].contains(&as_client.status),
                            "{ctx}: client: {}",
                            as_client.text
                        );
                    }
                    assert!(
                        ![401, 403].contains(&as_admin.status),
                        "{ctx}: admin: {}",
                        as_admin.text
                    );
                }
            }
        }
        s.stop().await;
    }
}

#[tokio::test]
async fn reload_applies_a_good_file_and_keeps_the_old_one_on_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quotad.toml");
    std::fs::write(&path, config(2, dir.path())).unwrap();
    let s = TestServer::start_file(&path, Transport::Unix).await;
    let admin = [("authorization", "Bearer admin-token-0123456789ab")];
    let client = [("authorization", "Bearer client-token-0123456789")];
    let body = r#"{"subject":"u"}"#;
    assert_eq!(
        s.req("POST", "/v1/consume", Some(body), &client).await.body["allowed"],
        true
    );
    assert_eq!(
        s.req("POST", "/v1/consume", Some(body), &client).await.body["allowed"],
        true
    );
    assert_eq!(
        s.req("POST", "/v1/consume", Some(body), &client).await.body["allowed"],
        false
    );
    // A good file: the free plan's max goes up; today's usage of the counter is kept.
    std::fs::write(&path, config(5, dir.path())).unwrap();
    let r = s.req("POST", "/v1/admin/reload", None, &admin).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // The harness listens and stores elsewhere than the file says: those need a restart.
    assert_eq!(
        (r.body["plans"].as_u64(), r.body["restart_required"].clone()),
        (Some(2), json!(["server.listen", "storage"]))
    );
    let r = s.req("POST", "/v1/consume", Some(body), &client).await;
    assert_eq!((r.body["allowed"].as_bool(), r.used("per-day")), (Some(true), 3));
    // A bad file: rejected with the reason; the previous configuration stays.
    std::fs::write(
        &path,
        config(5, dir.path()).replace("period = \"1d\"\n  max = 5", "period = \"1x\"\n  max = 5"),
    )
    .unwrap();
    let r = s.req("POST", "/v1/admin/reload", None, &admin).await;
    assert_eq!(r.status, 400, "{}", r.text);
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("quotad.toml") && msg.contains("plans[0].limits[0].period") && msg.contains("stays in force"),
        "{msg}"
    );
    assert_eq!(
        s.req("POST", "/v1/consume", Some(body), &client).await.body["allowed"],
        true,
        "max 5 still in force"
    );
    // Reload also re-reads tokens: a rotated admin token file.
    std::fs::write(&path, config(5, dir.path())).unwrap();
    std::fs::write(dir.path().join("admin.token"), "rotated-admin-token-000\n").unwrap();
    let r = s.req("POST", "/v1/admin/reload", None, &admin).await;
    assert_eq!(r.status, 200);
    // Compared with what runs, not with the last reload: a change that still
    // waits for a restart is reported on every reload until then.
    assert_eq!(
        r.body["restart_required"],
        json!(["server.listen", "storage"]),
        "{}",
        r.text
    );
    assert_eq!(
        s.req("GET", "/v1/admin/digest", None, &admin).await.status,
        401,
        "the old token is gone"
    );
    let rotated = [("authorization", "Bearer rotated-admin-token-000")];
    let d = s.req("GET", "/v1/admin/digest", None, &rotated).await;
    assert_eq!(d.status, 200);
    // Its subject count is not /metrics' quotad_subjects, and it says so.
    assert!(
        d.body["note"].as_str().is_some_and(|n| n.contains("quotad_subjects")),
        "{}",
        d.text
    );
    // A [gateway] added to the file is set up only at start: reported.
    std::fs::write(
        &path,
        format!("{}\n[gateway]\ngrpc_listen = \"127.0.0.1:0\"\n", config(5, dir.path())),
    )
    .unwrap();
    let r = s.req("POST", "/v1/admin/reload", None, &rotated).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body["restart_required"],
        json!(["server.listen", "storage", "gateway"]),
        "{}",
        r.text
    );
    s.stop().await;
}

#[tokio::test]
async fn unix_socket_gets_the_configured_mode_and_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = running_as_root();
    let group = if root { "\nsocket_group = \"1\"" } else { "" };
    let s = TestServer::start(&format!("[server]\nsocket_mode = \"0640\"{group}\n"), Transport::Unix).await;
    let meta = std::fs::metadata(s.socket_path().unwrap()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    if root {
        assert_eq!(meta.gid(), 1);
    }
    s.stop().await;
    // An unknown group name refuses to start.
    let mut c =
        quotad::config::Config::from_toml("[server]\nsocket_group = \"no-such-group-xyz\"\n", "t.toml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    c.server.listen = vec![format!("unix:{}", dir.path().join("s.sock").display())];
    let err = quotad::server::Server::bind(&c, std::sync::Arc::new(quotad::clock::SystemClock))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("no-such-group-xyz"), "{err}");
}

fn running_as_root() -> bool {
    // The owner of a file we create is our effective uid.
    use std::os::unix::fs::MetadataExt;
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().metadata().unwrap().uid() == 0
}

fn metric(text: &str, line_prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_move_as_requests_are_made() {
    let s = TestServer::start(
        "[[plans]]\nname = \"free\"\ndefault = true\n[[plans.limits]]\nname = \"per-day\"\nperiod = \"1d\"\nmax = 3\n",
        Transport::Tcp,
    )
    .await;
    let before = s.get("/metrics").await;
    assert!(before.header("content-type").unwrap().contains("openmetrics"));
    for _ in 0..4 {
        s.consume(json!({"subject": "u", "idempotency_key": null})).await;
    }
    s.post("/v1/reserve", json!({"subject": "w", "idempotency_key": "r1"}))
        .await;
    s.post("/v1/reserve", json!({"subject": "w", "idempotency_key": "r1"}))
        .await;
    let after = s.get("/metrics").await.text;
    for name in [
        "quotad_decisions_total",
        "quotad_http_request_duration_seconds",
        "quotad_wal_fsync_duration_seconds",
        "quotad_wal_batch_records",
        "quotad_wal_bytes_total",
        "quotad_wal_gathers_total",
        "quotad_wal_gathers_filled_total",
        "quotad_snapshot_duration_seconds",
        "quotad_snapshot_timestamp_seconds",
        "quotad_recovery_duration_seconds",
        "quotad_recovery_torn_tail_bytes",
        "quotad_counters",
        "quotad_subjects",
        "quotad_reservations_open",
        "quotad_idempotency_keys",
    ] {
        let family = name.trim_end_matches("_total");
        assert!(after.contains(&format!("# TYPE {family} ")), "{name} missing:\n{after}");
    }
    // One record before any request: the policy's version 1.
    assert_eq!(metric(&before.text, "quotad_wal_records_total"), 1.0);
    let m = |p: &str| metric(&after, p);
    assert_eq!(
        m("quotad_decisions_total{op=\"consume\",outcome=\"allow\",plan=\"free\"}"),
        3.0,
        "{after}"
    );
    assert_eq!(
        m("quotad_decisions_total{op=\"consume\",outcome=\"deny\",plan=\"free\"}"),
        1.0
    );
    assert_eq!(
        m("quotad_limit_decisions_total{limit=\"per-day\",plan=\"free\",outcome=\"deny\"}"),
        1.0
    );
    assert_eq!(m("quotad_idempotent_replays_total"), 1.0);
    assert_eq!(
        m("quotad_wal_records_total"),
        5.0,
        "the policy's version, 3 consumes and 1 reserve were logged"
    );
    assert!(m("quotad_wal_bytes_total") > 100.0);
    assert!(m("quotad_wal_fsync_duration_seconds_count") >= 1.0);
    assert_eq!(
        m("quotad_http_request_duration_seconds_count{method=\"POST\",route=\"/v1/consume\"}"),
        4.0
    );
    assert!(m("quotad_http_responses_total{code=\"200\"}") >= 6.0);
    assert_eq!(
        (
            m("quotad_counters"),
            m("quotad_subjects"),
            m("quotad_reservations_open")
        ),
        (2.0, 2.0, 1.0)
    );
    assert_eq!(m("quotad_idempotency_keys"), 1.0);
    s.stop().await;
}
