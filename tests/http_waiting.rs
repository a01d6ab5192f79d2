//! `wait_ms`: calls parked instead of denied and admitted as capacity returns
//! (refill, release, reset), in priority order, exactly, within their bounds;
//! over TCP and the Unix socket. Engine time is the test's manual clock: the
//! test moves it and pokes the driver, which otherwise sleeps in real time.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestServer, Transport, TRANSPORTS};
use quotad::clock::Clock;
use serde_json::{json, Value};

const CONFIG: &str = r#"
[engine]
max_wait_ms = 120000
max_waiters_per_subject = 100

[[plans]]
name = "p"
default = true
  [[plans.limits]]
  name = "bucket"
  match = { event = "bucket" }
  algorithm = "token_bucket"
  max = 2
  refill = 2
  period = "1m"
  [[plans.limits]]
  name = "minute"
  match = { event = "fixed" }
  period = "1m"
  max = 1
  [[plans.limits]]
  name = "credits"
  match = { event = "lifetime" }
  algorithm = "lifetime"
  max = 1
  [[plans.limits]]
  name = "shared"
  match = { event = "shared" }
  scope = "global"
  algorithm = "token_bucket"
  max = 10
  refill = 10
  period = "1m"
  [[plans.limits]]
  name = "fast"
  match = { event = "fast" }
  algorithm = "token_bucket"
  max = 1
  refill = 1
  period = "1s"
  [[plans.limits]]
  name = "sliding"
  match = { event = "sliding" }
  algorithm = "sliding"
  period = "1m"
  max = 1
"#;

async fn start(t: Transport) -> Arc<TestServer> {
    Arc::new(TestServer::start_in_memory(CONFIG, t, common::T0).await)
}

fn poke(s: &TestServer) {
    s.state.core.get().unwrap().waiting.poke();
}

fn waiters(s: &TestServer) -> usize {
    s.state.core.get().unwrap().waiting.len()
}

/// Waits (bounded) until `n` calls are parked.
async fn until_parked(s: &TestServer, n: usize) {
    for _ in 0..500 {
        if waiters(s) == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("expected {n} waiters, have {}", waiters(s));
}

fn spawn_consume(s: &Arc<TestServer>, body: Value) -> tokio::task::JoinHandle<common::Resp> {
    let s = s.clone();
    tokio::spawn(async move { s.consume(body).await })
}

#[tokio::test]
async fn a_waiting_call_is_admitted_when_the_bucket_refills() {
    for t in TRANSPORTS {
        let s = start(t).await;
        for _ in 0..2 {
            assert!(s.consume(json!({"subject": "u", "event": "bucket"})).await.allowed());
        }
        let call = spawn_consume(&s, json!({"subject": "u", "event": "bucket", "wait_ms": 60000}));
        until_parked(&s, 1).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!call.is_finished(), "no token yet: the call waits");
        s.clock.advance(30_000); // one token
        poke(&s);
        let r = call.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(r.allowed(), "{}", r.text);
        assert!(r.body["waited_ms"].as_u64().is_some(), "{}", r.text);
        assert_eq!(r.used("bucket"), 2);
        assert_eq!(waiters(&s), 0);
    }
}

#[tokio::test]
async fn an_allowed_call_that_could_wait_says_it_waited_zero() {
    let s = start(Transport::Tcp).await;
    let r = s
        .consume(json!({"subject": "u", "event": "bucket", "wait_ms": 1000}))
        .await;
    assert!(r.allowed());
    assert_eq!(r.body["waited_ms"], 0);
    let r = s.consume(json!({"subject": "u", "event": "bucket"})).await;
    assert!(
        r.body.get("waited_ms").is_none(),
        "absent when no wait was asked: {}",
        r.text
    );
}

#[tokio::test]
async fn denials_no_wait_can_cure_answer_at_once() {
    for t in TRANSPORTS {
        let s = start(t).await;
        assert!(s.consume(json!({"subject": "u", "event": "lifetime"})).await.allowed());
        let r = s
            .consume(json!({"subject": "u", "event": "lifetime", "wait_ms": 60000}))
            .await;
        assert!(!r.allowed());
        assert_eq!(r.body["waited_ms"], 0, "{}", r.text);
        // Larger than the bucket can ever hold.
        let r = s
            .consume(json!({"subject": "u", "event": "bucket", "amounts": {"requests": 3}, "wait_ms": 60000}))
            .await;
        assert_eq!(r.body["reasons"][0]["code"], "exceeds_capacity");
        assert_eq!(r.body["waited_ms"], 0);
        // The window ends later than the call would wait.
        assert!(s.consume(json!({"subject": "u", "event": "fixed"})).await.allowed());
        let r = s
            .consume(json!({"subject": "u", "event": "fixed", "wait_ms": 10}))
            .await;
        assert!(!r.allowed());
        assert_eq!(r.body["waited_ms"], 0);
        assert_eq!(waiters(&s), 0);
    }
}

#[tokio::test]
async fn a_release_admits_a_waiter_without_any_poke() {
    for t in TRANSPORTS {
        let s = start(t).await;
        // Half a minute into the window: its end is 30 s away, within the wait.
        s.clock.advance(30_000);
        let held = s.post("/v1/reserve", json!({"subject": "u", "event": "fixed"})).await;
        assert!(held.allowed(), "{}", held.text);
        let id = held.body["reservation_id"].as_str().unwrap().to_string();
        let call = spawn_consume(&s, json!({"subject": "u", "event": "fixed", "wait_ms": 60000}));
        until_parked(&s, 1).await;
        let r = s.post(&format!("/v1/reservations/{id}/release"), json!({})).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let r = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("admitted")
            .unwrap();
        assert!(r.allowed(), "{}", r.text);
        assert_eq!(r.used("minute"), 1);
    }
}

#[tokio::test]
async fn a_reset_and_a_sliding_window_ageing_out_admit_waiters() {
    let s = start(Transport::Unix).await;
    s.clock.advance(30_000);
    assert!(s.consume(json!({"subject": "u", "event": "fixed"})).await.allowed());
    let call = spawn_consume(&s, json!({"subject": "u", "event": "fixed", "wait_ms": 60000}));
    until_parked(&s, 1).await;
    let r = s.post("/v1/subjects/u/reset", json!({"limit": "minute"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .unwrap()
        .unwrap()
        .allowed());

    assert!(s.consume(json!({"subject": "v", "event": "sliding"})).await.allowed());
    let call = spawn_consume(&s, json!({"subject": "v", "event": "sliding", "wait_ms": 90000}));
    until_parked(&s, 1).await;
    s.clock.advance(30_000);
    poke(&s);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!call.is_finished(), "the charge is still inside the window");
    s.clock.advance(31_000);
    poke(&s);
    let r = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .unwrap()
        .unwrap();
    assert!(r.allowed(), "{}", r.text);
}

#[tokio::test]
async fn waiters_are_admitted_by_priority_then_arrival() {
    let s = start(Transport::Tcp).await;
    assert!(s.consume(json!({"subject": "u", "event": "fast"})).await.allowed());
    let mut calls = Vec::new();
    for (i, p) in ["low", "normal", "critical", "normal"].iter().enumerate() {
        calls.push((
            i,
            spawn_consume(
                &s,
                json!({"subject": "u", "event": "fast", "priority": p, "wait_ms": 60000}),
            ),
        ));
        until_parked(&s, i + 1).await;
    }
    let mut order = Vec::new();
    for _ in 0..4 {
        s.clock.advance(1_000); // one token each time
        poke(&s);
        for _ in 0..400 {
            if let Some(pos) = calls.iter().position(|(_, c)| c.is_finished()) {
                let (i, c) = calls.remove(pos);
                assert!(c.await.unwrap().allowed());
                order.push(i);
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(
        order,
        vec![2, 1, 3, 0],
        "critical, then the normals in arrival order, then low"
    );
}

#[tokio::test]
async fn a_new_call_does_not_take_capacity_waiters_are_owed() {
    let s = start(Transport::Tcp).await;
    for _ in 0..2 {
        assert!(s.consume(json!({"subject": "u", "event": "bucket"})).await.allowed());
    }
    let call = spawn_consume(&s, json!({"subject": "u", "event": "bucket", "wait_ms": 60000}));
    until_parked(&s, 1).await;
    s.clock.advance(30_000); // a token, not yet handed to the waiter
    let r = s.consume(json!({"subject": "u", "event": "bucket"})).await;
    assert!(!r.allowed(), "the token is owed to the waiter: {}", r.text);
    assert_eq!(r.body["reasons"][0]["code"], "limit_exceeded");
    let r = s
        .consume(json!({"subject": "u", "event": "bucket", "priority": "critical"}))
        .await;
    assert!(r.allowed(), "a higher priority goes first: {}", r.text);
    s.clock.advance(30_000);
    poke(&s);
    assert!(call.await.unwrap().allowed());
}

#[tokio::test]
async fn sixty_four_waiters_on_a_global_bucket_are_admitted_exactly() {
    let s = start(Transport::Tcp).await;
    for i in 0..10 {
        assert!(s
            .consume(json!({"subject": format!("s{i}"), "event": "shared"}))
            .await
            .allowed());
    }
    let calls: Vec<_> = (0..64)
        .map(|i| {
            spawn_consume(
                &s,
                json!({"subject": format!("w{i}"), "event": "shared", "wait_ms": 7000}),
            )
        })
        .collect();
    until_parked(&s, 64).await;
    s.clock.advance(30_000); // five tokens
    poke(&s);
    let mut admitted = 0;
    for c in calls {
        let r = c.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text);
        if r.allowed() {
            admitted += 1;
        } else {
            // Denied once the next token is further away than its wait has left.
            assert!(r.body["waited_ms"].as_u64().is_some(), "{}", r.text);
        }
    }
    assert_eq!(admitted, 5);
    let r = s.get("/v1/subjects/w0").await;
    let c = r.body["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["limit"] == "shared")
        .unwrap();
    assert_eq!(c["used"], 10, "never more than the bucket holds: {c}");
}

#[tokio::test]
async fn a_wait_that_runs_out_is_denied_with_the_time_waited() {
    let s = start(Transport::Unix).await;
    s.consume(json!({"subject": "u", "event": "fast"})).await;
    // The next token is 1 s of engine time away, within the wait; the test's
    // clock never gets there, so the wait runs out.
    let r = s
        .consume(json!({"subject": "u", "event": "fast", "wait_ms": 1200}))
        .await;
    assert!(!r.allowed(), "{}", r.text);
    assert!(r.body["waited_ms"].as_u64().unwrap() >= 1200, "{}", r.text);
    assert_eq!(r.body["reasons"][0]["code"], "limit_exceeded");
    assert_eq!(waiters(&s), 0);
}

#[tokio::test]
async fn bounds_duplicate_keys_disconnects_and_shutdown() {
    let config = CONFIG.replace("max_waiters_per_subject = 100", "max_waiters_per_subject = 2");
    let s = Arc::new(TestServer::start_in_memory(&config, Transport::Tcp, common::T0).await);
    for _ in 0..2 {
        s.consume(json!({"subject": "u", "event": "bucket"})).await;
    }
    let a = spawn_consume(
        &s,
        json!({"subject": "u", "event": "bucket", "wait_ms": 60000, "idempotency_key": "k1"}),
    );
    until_parked(&s, 1).await;
    let r = s
        .consume(json!({"subject": "u", "event": "bucket", "wait_ms": 60000, "idempotency_key": "k1"}))
        .await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(r.error_code(), "request_in_progress");
    let b = spawn_consume(&s, json!({"subject": "u", "event": "bucket", "wait_ms": 60000}));
    until_parked(&s, 2).await;
    let r = s
        .consume(json!({"subject": "u", "event": "bucket", "wait_ms": 60000}))
        .await;
    assert!(!r.allowed());
    assert!(
        r.body["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["code"] == "queue_full"),
        "{}",
        r.text
    );
    // A client that leaves is taken out with nothing charged.
    b.abort();
    let _ = b.await;
    until_parked(&s, 1).await;
    // The admitted call replays under its key.
    s.clock.advance(30_000);
    poke(&s);
    let r = a.await.unwrap();
    assert!(r.allowed(), "{}", r.text);
    let again = s
        .consume(json!({"subject": "u", "event": "bucket", "wait_ms": 60000, "idempotency_key": "k1"}))
        .await;
    assert_eq!(again.body["replayed"], true, "{}", again.text);
    s.clock.advance(30_000);
    let r = s.get("/v1/subjects/u").await;
    let c = r.body["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["limit"] == "bucket")
        .unwrap();
    assert_eq!(c["used"], 1, "the cancelled call charged nothing: {c}");
    // Shutdown answers waiters 503.
    for _ in 0..2 {
        s.consume(json!({"subject": "x", "event": "bucket"})).await;
    }
    let mut c = s.connect().await;
    let w = tokio::spawn(async move {
        c.post(
            "/v1/consume",
            &json!({"subject": "x", "event": "bucket", "wait_ms": 60000}),
        )
        .await
    });
    until_parked(&s, 1).await;
    let s = Arc::try_unwrap(s).ok().expect("only this test holds the server");
    let stopping = tokio::spawn(s.stop());
    let r = tokio::time::timeout(Duration::from_secs(10), w).await.unwrap().unwrap();
    assert_eq!(r.status, 503, "{}", r.text);
    stopping.await.unwrap();
}

#[tokio::test]
async fn bad_waits_are_refused_naming_the_field() {
    let s = start(Transport::Tcp).await;
    let r = s.consume(json!({"subject": "u", "wait_ms": 120001})).await;
    assert_eq!(r.status, 400);
    assert!(
        r.text.contains("wait_ms") && r.text.contains("engine.max_wait_ms"),
        "{}",
        r.text
    );
    let r = s.post("/v1/check", json!({"subject": "u", "wait_ms": 10})).await;
    assert_eq!(r.status, 400);
    assert!(r.text.contains("wait_ms"), "{}", r.text);
    let r = s
        .post("/v1/check", json!({"subject": "u", "idempotency_key": "k"}))
        .await;
    assert_eq!(r.status, 400);
    assert!(r.text.contains("idempotency_key"), "{}", r.text);
    let r = s.consume(json!({"subject": "u", "priority": "urgent"})).await;
    assert_eq!(r.status, 400);
    assert!(r.text.contains("priority"), "{}", r.text);
    let r = s
        .post(
            "/v1/batch",
            json!({"operations": [{"op": "consume", "subject": "u", "wait_ms": 5}]}),
        )
        .await;
    assert!(r.text.contains("wait_ms"), "{}", r.text);
}

#[tokio::test]
async fn an_admitted_wait_replays_under_its_key_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(TestServer::start_durable(CONFIG, Transport::Unix, common::T0, dir.path()).await);
    for _ in 0..2 {
        s.consume(json!({"subject": "u", "event": "bucket"})).await;
    }
    let body = json!({"subject": "u", "event": "bucket", "wait_ms": 60000, "idempotency_key": "w-1"});
    let call = spawn_consume(&s, body.clone());
    until_parked(&s, 1).await;
    s.clock.advance(30_000);
    poke(&s);
    let first = call.await.unwrap();
    assert!(first.allowed(), "{}", first.text);
    let now = s.clock.now_ms();
    Arc::try_unwrap(s)
        .ok()
        .expect("only this test holds the server")
        .stop()
        .await;
    // Waiters are not kept across a restart, but what was admitted is.
    let s = TestServer::start_durable(CONFIG, Transport::Unix, now, dir.path()).await;
    assert_eq!(waiters(&s), 0);
    let again = s.consume(body).await;
    assert_eq!(again.body["replayed"], true, "{}", again.text);
    assert_eq!(again.used("bucket"), first.used("bucket"));
    s.stop().await;
}

/// Capacity held by a reservation comes back when the hold expires: a
/// denial's `retry_after_ms` says so, and a call that may wait that long
/// waits for it (it was answered at once before, from the window's end or,
/// for a lifetime limit, with no retry time at all).
#[tokio::test]
async fn capacity_a_hold_frees_when_it_expires_counts_as_returning() {
    for t in TRANSPORTS {
        let s = start(t).await;
        for event in ["fixed", "lifetime"] {
            let r = s
                .post("/v1/reserve", json!({"subject": "h", "event": event, "ttl_ms": 5000}))
                .await;
            assert!(r.allowed(), "{}", r.text);
            let r = s.consume(json!({"subject": "h", "event": event})).await;
            assert!(!r.allowed(), "{}", r.text);
            assert_eq!(r.body["retry_after_ms"], 5000, "{event}: {}", r.text);
            assert_eq!(r.body["reasons"][0]["retry_after_ms"], 5000, "{event}: {}", r.text);

            let call = spawn_consume(&s, json!({"subject": "h", "event": event, "wait_ms": 10000}));
            until_parked(&s, 1).await;
            s.clock.advance(5_000); // the hold expires; the sweep gives it back
            let r = tokio::time::timeout(Duration::from_secs(10), call)
                .await
                .unwrap()
                .unwrap();
            assert!(r.allowed(), "{event}: {}", r.text);
            assert!(r.body["waited_ms"].as_u64().is_some(), "{}", r.text);
            assert_eq!(waiters(&s), 0);
        }
    }
}
