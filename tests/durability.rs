//! State survives restarts through the real server: graceful restarts keep the
//! digest, crashes (no final snapshot) replay the WAL, reservations and
//! idempotency keys live on, and two daemons cannot share a data directory.

mod common;

use common::{TestServer, Transport, TRANSPORTS};
use serde_json::json;

const CONFIG: &str = r#"
[engine]
idempotency_retention = "1h"
[[limits]]
name = "global-tokens"
metric = "tokens"
scope = "global"
algorithm = "sliding"
period = "1h"
max = 1000000

[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  timezone = "Europe/Berlin"
  max = 100000
  [[plans.limits]]
  name = "burst"
  algorithm = "token_bucket"
  max = 50
  refill = 10
  period = "1m"
  [[plans.limits]]
  name = "credits"
  algorithm = "lifetime"
  match = { event = "image" }
  max = 5
  [[plans.limits]]
  name = "per-model"
  metric = "tokens"
  scope = "attribute:model"
  match = { event = "llm" }
  period = "1h"
  max = 100000

[[plans]]
name = "pro"
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  timezone = "Europe/Berlin"
  max = 1000000
"#;

/// Builds varied state: plans, overrides, every algorithm, attribute and global
/// counters, open and finished reservations, idempotency keys, a credit, a reset.
async fn populate(s: &TestServer) -> String {
    for i in 0..20 {
        let r = s
            .consume(json!({"subject": format!("user:{i}"), "event": "llm", "attributes": {"model": if i % 2 == 0 {"a"} else {"b"}},
                "amounts": {"tokens": 100 + i}, "idempotency_key": format!("k{i}")}))
            .await;
        assert!(r.allowed());
    }
    s.put(
        "/v1/subjects/user:1",
        json!({"plan": "pro", "overrides": {"burst": {"max": 500}}}),
    )
    .await;
    s.consume(json!({"subject": "user:2", "event": "image"})).await;
    s.post("/v1/subjects/user:2/credit", json!({"limit": "credits", "amount": 3}))
        .await;
    s.post("/v1/subjects/user:3/reset", json!({"limit": "tokens-per-day"}))
        .await;
    let open = s
        .post(
            "/v1/reserve",
            json!({"subject": "user:4", "amounts": {"tokens": 700}, "ttl_ms": 600000}),
        )
        .await;
    let done = s
        .post("/v1/reserve", json!({"subject": "user:5", "amounts": {"tokens": 900}}))
        .await;
    let done_id = done.body["reservation_id"].as_str().unwrap();
    let c = s
        .post(
            &format!("/v1/reservations/{done_id}/commit"),
            json!({"amounts": {"tokens": 400}}),
        )
        .await;
    assert_eq!(c.status, 200);
    s.req("DELETE", "/v1/subjects/user:6", None, &[]).await;
    open.body["reservation_id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn graceful_restart_keeps_the_digest() {
    for t in TRANSPORTS {
        let dir = tempfile::tempdir().unwrap();
        let s = TestServer::start_durable(CONFIG, t, common::T0, dir.path()).await;
        let hold = populate(&s).await;
        let before = s.digest().await;
        assert!(before["counters"].as_u64().unwrap() > 40, "{before}");
        s.stop().await; // final snapshot
        let s = TestServer::start_durable(CONFIG, t, common::T0, dir.path()).await;
        assert_eq!(
            s.digest().await,
            before,
            "{t:?}: state after restart equals state before"
        );
        // More writes after the snapshot, then a second restart replays them from the WAL.
        s.consume(json!({"subject": "user:7", "amounts": {"tokens": 5}, "idempotency_key": "late"}))
            .await;
        let c = s
            .post(
                &format!("/v1/reservations/{hold}/commit"),
                json!({"amounts": {"tokens": 650}}),
            )
            .await;
        assert_eq!(c.status, 200, "{}", c.text);
        let before = s.digest().await;
        s.stop().await;
        let s = TestServer::start_durable(CONFIG, t, common::T0, dir.path()).await;
        assert_eq!(s.digest().await, before);
        let again = s
            .consume(json!({"subject": "user:7", "amounts": {"tokens": 5}, "idempotency_key": "late"}))
            .await;
        assert_eq!(again.body["replayed"], true, "keys survive restarts");
        let c2 = s
            .post(
                &format!("/v1/reservations/{hold}/commit"),
                json!({"amounts": {"tokens": 650}}),
            )
            .await;
        assert_eq!(c2.body, c.body, "a repeated commit after restart answers the same");
        s.stop().await;
    }
}

#[tokio::test]
async fn without_a_final_snapshot_the_wal_alone_rebuilds_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_durable(CONFIG, Transport::Unix, common::T0, dir.path()).await;
    populate(&s).await;
    let before = s.digest().await;
    s.stop().await;
    // Remove the snapshot: recovery must replay everything from the log.
    std::fs::remove_file(dir.path().join("snapshot.redb")).unwrap();
    let s = TestServer::start_durable(CONFIG, Transport::Unix, common::T0, dir.path()).await;
    assert_eq!(s.digest().await, before);
    s.stop().await;
}

#[tokio::test]
async fn holds_expire_after_a_restart_and_usage_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_durable(CONFIG, Transport::Tcp, common::T0, dir.path()).await;
    let r = s
        .post(
            "/v1/reserve",
            json!({"subject": "u", "amounts": {"tokens": 700}, "ttl_ms": 60000}),
        )
        .await;
    assert!(r.allowed());
    s.consume(json!({"subject": "u", "amounts": {"tokens": 50}})).await;
    s.stop().await;
    let s = TestServer::start_durable(CONFIG, Transport::Tcp, common::T0 + 30_000, dir.path()).await;
    assert_eq!(
        s.get("/v1/subjects/u").await.used("tokens-per-day"),
        750,
        "the hold is still held"
    );
    s.clock.advance(30_000);
    assert_eq!(
        s.get("/v1/subjects/u").await.used("tokens-per-day"),
        50,
        "released at its expiry"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_second_daemon_cannot_open_the_same_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_durable(CONFIG, Transport::Tcp, common::T0, dir.path()).await;
    let mut config = quotad::config::Config::from_toml(CONFIG, "t.toml").unwrap();
    config.server.listen = vec!["127.0.0.1:0".into()];
    config.storage.data_dir = dir.path().to_path_buf();
    let server = quotad::server::Server::bind(&config, std::sync::Arc::new(quotad::clock::SystemClock))
        .await
        .unwrap();
    let err = server.run(std::future::pending()).await.unwrap_err();
    assert!(err.to_string().contains("in use by another quotad"), "{err}");
    s.stop().await;
}

#[tokio::test]
async fn batch_durability_answers_before_the_sync_and_keeps_state_across_a_restart() {
    let config = format!("[storage]\ndurability = \"batch\"\nflush_interval_ms = 50\n{CONFIG}");
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_durable(&config, Transport::Tcp, common::T0, dir.path()).await;
    for i in 0..20 {
        let r = s
            .consume(json!({"subject": "u", "amounts": {"tokens": 10}, "idempotency_key": format!("b{i}")}))
            .await;
        assert!(r.allowed());
    }
    let before = s.digest().await;
    s.stop().await; // closing the log writes what is queued
    let s = TestServer::start_durable(&config, Transport::Tcp, common::T0, dir.path()).await;
    assert_eq!(s.digest().await, before);
    assert_eq!(s.get("/v1/subjects/u").await.used("tokens-per-day"), 200);
    let again = s
        .consume(json!({"subject": "u", "amounts": {"tokens": 10}, "idempotency_key": "b3"}))
        .await;
    assert_eq!(again.body["replayed"], true);
    s.stop().await;
}
