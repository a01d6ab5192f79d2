//! The direct request path (decisions answered without hyper and the router)
//! against the router's path, byte for byte where it matters: the same
//! answers and refusals, a connection handed to hyper mid-stream keeping its
//! order and its framing checks, pipelined requests, `Connection: close`,
//! timeouts and shutdown. Over TCP and the Unix socket.

mod common;

use common::raw::{raw, Raw};
use common::{TestServer, TRANSPORTS};
use serde_json::Value;

const CONFIG: &str = r#"
[auth]
tokens = [{ role = "client", token = "client-token-0123456789" }]

[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 1000
"#;

const AUTH: &str = "Authorization: Bearer client-token-0123456789\r\n";

fn post(path: &str, extra: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: q\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A connection moved to hyper: its first request is one the direct path
/// leaves to the router.
async fn on_hyper(s: &TestServer) -> Raw {
    let mut c = raw(s).await;
    c.send(&format!("GET /healthz HTTP/1.1\r\nHost: q\r\n{AUTH}\r\n")).await;
    assert_eq!(c.answer().await.0, 200);
    c
}

/// An answer's head without its `Date`, lower case, headers sorted.
fn comparable(head: &str) -> Vec<String> {
    let mut lines: Vec<String> = head
        .lines()
        .filter(|l| !l.is_empty() && !l.to_ascii_lowercase().starts_with("date:"))
        .map(str::to_ascii_lowercase)
        .collect();
    lines[1..].sort();
    lines
}

#[tokio::test]
async fn both_paths_answer_alike() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        let cases = [
            post("/v1/check", AUTH, r#"{"subject":"a","amounts":{"tokens":10}}"#),
            post("/v1/check", AUTH, r#"{"subject":"a","amounts":{"tokens":5000}}"#),
            post(
                "/v1/check",
                AUTH,
                r#"{"subject":"a","amounts":{"tokens":1},"subject":"b"}"#,
            ),
            post("/v1/check", AUTH, r#"{"subject":"#),
            post("/v1/check", AUTH, r#"{"subject":"a","colour":"red"}"#),
            post("/v1/check", AUTH, ""),
            post(
                "/v1/reserve",
                AUTH,
                r#"{"subject":"a","amounts":{"tokens":10},"ttl_ms":0}"#,
            ),
            post("/v1/consume", AUTH, r#"{"subject":"a","amounts":{"tokens":-1}}"#),
        ];
        for case in &cases {
            let mut direct = raw(&s).await;
            direct.send(case).await;
            let (status, head, body) = direct.answer().await;
            let mut routed = on_hyper(&s).await;
            routed.send(case).await;
            let (status2, head2, body2) = routed.answer().await;
            assert_eq!((status, &body), (status2, &body2), "{t:?} {case}");
            assert_eq!(comparable(&head), comparable(&head2), "{t:?} {case}");
            assert!(head.to_ascii_lowercase().contains("\r\ndate: "), "{head}");
        }
        // Consumes charge alike: three on each path, in turn.
        let mut direct = raw(&s).await;
        let mut routed = on_hyper(&s).await;
        let consume = post("/v1/consume", AUTH, r#"{"subject":"c","amounts":{"tokens":7}}"#);
        for i in 0..3 {
            direct.send(&consume).await;
            let (_, _, body) = direct.answer().await;
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["counters"][0]["used"], 7 * (2 * i + 1), "{body}");
            routed.send(&consume).await;
            let (_, _, body) = routed.answer().await;
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["counters"][0]["used"], 7 * (2 * i + 2), "{body}");
        }
        // Reservations: committed and released alike, and the same refusals.
        for (action, body) in [("commit", r#"{"amounts":{"tokens":20}}"#), ("release", "{}")] {
            let mut answers = Vec::new();
            for (i, c) in [&mut direct, &mut routed].into_iter().enumerate() {
                // A subject of its own on each path, named alike in the answer.
                let subject = format!("r-{action}-{i}");
                let reserve = format!(r#"{{"subject":"{subject}","amounts":{{"tokens":50}},"ttl_ms":60000}}"#);
                c.send(&post("/v1/reserve", AUTH, &reserve)).await;
                let (_, _, text) = c.answer().await;
                let v: Value = serde_json::from_str(&text).unwrap();
                let id = v["reservation_id"].as_str().unwrap().to_string();
                c.send(&post(&format!("/v1/reservations/{id}/{action}"), AUTH, body))
                    .await;
                let (status, head, text) = c.answer().await;
                answers.push((
                    status,
                    comparable(&head),
                    text.replace(&id, "ID").replace(&subject, "S"),
                ));
            }
            assert_eq!(answers[0], answers[1], "{t:?} {action}");
            assert_eq!(answers[0].0, 200, "{t:?} {action}: {}", answers[0].2);
        }
        for case in [
            post("/v1/reservations/nope/commit", AUTH, "{}"),
            post("/v1/reservations/nope/release", AUTH, r#"{"amounts":{}}"#),
            post("/v1/reservations/nope/commit", AUTH, r#"{"amounts":{"tokens":-1}}"#),
        ] {
            direct.send(&case).await;
            let (status, head, body) = direct.answer().await;
            routed.send(&case).await;
            let (status2, head2, body2) = routed.answer().await;
            assert_eq!((status, &body), (status2, &body2), "{t:?} {case}");
            assert_eq!(comparable(&head), comparable(&head2), "{t:?} {case}");
        }
        // The direct path's requests are in the request metrics.
        let mut m = on_hyper(&s).await;
        m.send(&format!("GET /metrics HTTP/1.1\r\nHost: q\r\n{AUTH}\r\n")).await;
        let (_, _, metrics) = m.answer().await;
        let count = |route: &str| -> f64 {
            metrics
                .lines()
                .find(|l| {
                    l.starts_with("quotad_http_request_duration_seconds_count")
                        && l.contains(&format!("route=\"{route}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .map_or(0.0, |v| v.parse().unwrap())
        };
        assert_eq!(count("/v1/check"), 12.0, "{metrics}");
        assert_eq!(count("/v1/reserve"), 6.0, "{metrics}");
        assert_eq!(count("/v1/reservations/{id}/commit"), 6.0, "{metrics}");
        assert_eq!(count("/v1/reservations/{id}/release"), 4.0, "{metrics}");
        assert_eq!(count("/v1/consume"), 8.0, "{metrics}");
        s.stop().await;
    }
}

#[tokio::test]
async fn refusals_on_the_direct_path_close_the_connection() {
    let cfg = format!("[server]\nbody_timeout_ms = 300\nmax_body_bytes = 1024\n{CONFIG}");
    for t in TRANSPORTS {
        let s = TestServer::start(&cfg, t).await;
        // No token: 401, with the scheme to use.
        let mut c = raw(&s).await;
        c.send(&post("/v1/consume", "", r#"{"subject":"a"}"#)).await;
        let (status, head, _) = c.answer().await;
        assert_eq!(status, 401, "{t:?}");
        let head = head.to_ascii_lowercase();
        assert!(
            head.contains("www-authenticate: bearer") && head.contains("connection: close"),
            "{head}"
        );
        assert!(c.closed().await.is_some(), "{t:?}");
        // A body over the limit is refused before it is read.
        let mut c = raw(&s).await;
        c.send(&format!(
            "POST /v1/consume HTTP/1.1\r\nHost: q\r\n{AUTH}Content-Length: 5000\r\n\r\n"
        ))
        .await;
        let (status, head, body) = c.answer().await;
        assert_eq!(status, 413, "{t:?} {body}");
        assert!(body.contains("server.max_body_bytes"), "{body}");
        assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
        assert!(c.closed().await.is_some(), "{t:?}");
        // A body that stops coming: 408 after body_timeout_ms.
        let mut c = raw(&s).await;
        c.send(&format!(
            "POST /v1/consume HTTP/1.1\r\nHost: q\r\n{AUTH}Content-Length: 40\r\n\r\n{{\"subject\""
        ))
        .await;
        let (status, _, body) = c.answer().await;
        assert_eq!(status, 408, "{t:?} {body}");
        assert!(body.contains("server.body_timeout_ms"), "{body}");
        assert!(c.closed().await.is_some(), "{t:?}");
        // The client's own `Connection: close` is kept.
        let mut c = raw(&s).await;
        c.send(&post(
            "/v1/consume",
            &format!("{AUTH}Connection: close\r\n"),
            r#"{"subject":"a"}"#,
        ))
        .await;
        let (status, head, _) = c.answer().await;
        assert_eq!(status, 200, "{t:?}");
        assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
        assert!(c.closed().await.is_some(), "{t:?}");
        // Nothing was charged by the refused ones.
        let mut c = on_hyper(&s).await;
        c.send(&format!("GET /v1/subjects/a HTTP/1.1\r\nHost: q\r\n{AUTH}\r\n"))
            .await;
        let (_, _, body) = c.answer().await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["counters"][0]["used"], 0, "{body}");
        s.stop().await;
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_across_the_hand_off() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        let body = r#"{"subject":"p","amounts":{"tokens":5}}"#;
        let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
        let consume = post("/v1/consume", AUTH, body);
        let read = format!("GET /v1/subjects/p HTTP/1.1\r\nHost: q\r\n{AUTH}\r\n");
        let chunked_consume =
            format!("POST /v1/consume HTTP/1.1\r\nHost: q\r\n{AUTH}Transfer-Encoding: chunked\r\n\r\n{chunked}");
        // Two requests on the direct path, then one it hands to hyper, then
        // more (hyper's now): all in one write.
        let mut c = raw(&s).await;
        c.send(&format!("{consume}{consume}{read}{consume}{chunked_consume}{consume}"))
            .await;
        for (i, used) in [5, 10, 10, 15, 20, 25].into_iter().enumerate() {
            let (status, _, text) = c.answer().await;
            assert_eq!(status, 200, "{t:?} answer {i}: {text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["counters"][0]["used"], used, "{t:?} answer {i}: {text}");
        }
        // The framing check counts requests from the connection's start: the
        // third request with both lengths is the one refused, after two the
        // direct path answered.
        let mut c = raw(&s).await;
        let both = format!(
            "POST /v1/consume HTTP/1.1\r\nHost: q\r\n{AUTH}Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n{chunked}"
        );
        c.send(&format!("{consume}{consume}{both}{consume}")).await;
        assert_eq!(c.answer().await.0, 200);
        assert_eq!(c.answer().await.0, 200);
        let (status, head, text) = c.answer().await;
        assert_eq!(status, 400, "{t:?} {text}");
        assert!(text.contains("Transfer-Encoding"), "{text}");
        assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
        assert!(c.closed().await.is_some(), "{t:?}");
        let mut c = on_hyper(&s).await;
        c.send(&read).await;
        let (_, _, text) = c.answer().await;
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["counters"][0]["used"], 35, "{t:?}: {text}");
        s.stop().await;
    }
}

#[tokio::test]
async fn an_idle_direct_connection_times_out_and_closes_on_shutdown() {
    let cfg = format!("[server]\nheader_timeout_ms = 300\n{CONFIG}");
    for t in TRANSPORTS {
        let s = TestServer::start(&cfg, t).await;
        let before = s.state.metrics.connections.header_timeouts.get();
        // Kept alive after a decision, then silent: closed by the header timeout.
        let mut kept = raw(&s).await;
        kept.send(&post("/v1/consume", AUTH, r#"{"subject":"k"}"#)).await;
        let (status, head, _) = kept.answer().await;
        assert_eq!(status, 200);
        assert!(!head.to_ascii_lowercase().contains("connection: close"), "{head}");
        assert!(kept.closed().await.is_some(), "{t:?}: stayed open");
        // Half a head: the same.
        let mut half = raw(&s).await;
        half.send(&format!("POST /v1/consume HTTP/1.1\r\nHost: q\r\n{AUTH}"))
            .await;
        assert!(half.closed().await.is_some(), "{t:?}: half a head stayed open");
        assert_eq!(s.state.metrics.connections.header_timeouts.get() - before, 2);
        s.stop().await;
    }
    // Shutdown closes an idle kept-alive connection at once.
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        let mut kept = raw(&s).await;
        kept.send(&post("/v1/consume", AUTH, r#"{"subject":"k"}"#)).await;
        assert_eq!(kept.answer().await.0, 200);
        let stopped = tokio::spawn(s.stop());
        assert!(kept.closed().await.is_some(), "{t:?}: stayed open through shutdown");
        tokio::time::timeout(std::time::Duration::from_secs(5), stopped)
            .await
            .expect("stopped in time")
            .unwrap();
    }
}

#[tokio::test]
async fn decisions_stay_on_the_direct_path_until_another_request() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        // The harness's own readiness checks were handed off before.
        let before = s.state.metrics.connections.handed_off.get();
        let handed_off = || s.state.metrics.connections.handed_off.get() - before;
        let mut c = raw(&s).await;
        for path in ["/v1/consume", "/v1/check", "/v1/reserve"] {
            c.send(&post(path, AUTH, r#"{"subject":"d","amounts":{"tokens":1}}"#))
                .await;
            let (status, _, text) = c.answer().await;
            assert_eq!(status, 200, "{t:?} {path}");
            if path == "/v1/reserve" {
                let v: Value = serde_json::from_str(&text).unwrap();
                let id = v["reservation_id"].as_str().unwrap();
                c.send(&post(&format!("/v1/reservations/{id}/commit"), AUTH, "{}"))
                    .await;
                assert_eq!(c.answer().await.0, 200, "{t:?} commit");
            }
        }
        assert_eq!(handed_off(), 0, "{t:?}: a decision left the direct path");
        c.send(&format!("GET /v1/subjects/d HTTP/1.1\r\nHost: q\r\n{AUTH}\r\n"))
            .await;
        assert_eq!(c.answer().await.0, 200);
        assert_eq!(handed_off(), 1, "{t:?}");
        // A query string is the router's to check.
        let mut q = raw(&s).await;
        q.send(&post("/v1/consume?x=1&x=2", AUTH, r#"{"subject":"d"}"#)).await;
        assert_eq!(q.answer().await.0, 400, "{t:?}");
        assert_eq!(handed_off(), 2, "{t:?}");
        // So is a reservation id the router would percent-decode.
        let mut p = raw(&s).await;
        p.send(&post("/v1/reservations/a%20b/commit", AUTH, "{}")).await;
        let (status, _, text) = p.answer().await;
        assert_eq!(status, 404, "{t:?} {text}");
        assert_eq!(handed_off(), 3, "{t:?}");
        s.stop().await;
    }
}

#[tokio::test]
async fn a_client_that_pipelines_then_half_closes_gets_every_answer() {
    for t in TRANSPORTS {
        let s = TestServer::start(CONFIG, t).await;
        let mut c = raw(&s).await;
        let consume = post("/v1/consume", AUTH, r#"{"subject":"h","amounts":{"tokens":2}}"#);
        c.send(&format!("{consume}{consume}{consume}")).await;
        tokio::io::AsyncWriteExt::shutdown(&mut c.io).await.unwrap();
        for used in [2, 4, 6] {
            let (status, _, text) = c.answer().await;
            assert_eq!(status, 200, "{t:?} {text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["counters"][0]["used"], used, "{t:?} {text}");
        }
        assert!(c.closed().await.is_some(), "{t:?}");
        s.stop().await;
    }
}

#[tokio::test]
async fn a_request_finished_after_eviction_or_shutdown_began_is_answered_then_closed() {
    let cfg = format!("[server]\nmax_connections = 2\nheader_timeout_ms = 60000\n{CONFIG}");
    let rest = format!("{AUTH}\r\n");
    for t in TRANSPORTS {
        let s = TestServer::start(&cfg, t).await;
        // Half a head for another endpoint; two newer connections evict it.
        let mut half = raw(&s).await;
        half.send("GET /v1/subjects/e HTTP/1.1\r\nHost: q\r\n").await;
        let others = [raw(&s).await, raw(&s).await];
        for _ in 0..100 {
            if s.state.metrics.connections.evicted.get() >= 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        half.send(&rest).await;
        let (status, head, _) = half.answer().await;
        assert_eq!(status, 200, "{t:?}");
        assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
        assert!(
            half.closed().await.is_some(),
            "{t:?}: an evicted connection stayed open"
        );
        drop(others);
        // Half a head when shutdown begins: finished, it is answered.
        let mut half = raw(&s).await;
        half.send("GET /v1/subjects/e HTTP/1.1\r\nHost: q\r\n").await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let stopped = tokio::spawn(s.stop());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        half.send(&rest).await;
        let (status, head, _) = half.answer().await;
        assert_eq!(status, 200, "{t:?}");
        assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
        assert!(half.closed().await.is_some(), "{t:?}: stayed open through shutdown");
        tokio::time::timeout(std::time::Duration::from_secs(5), stopped)
            .await
            .expect("stopped in time")
            .unwrap();
    }
}

/// [`CONFIG`]'s plan with no tokens, so a test reads `/metrics` too.
fn open() -> &'static str {
    &CONFIG[CONFIG.find("[[plans]]").expect("CONFIG has a plan")..]
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in:\n{text}"))
}

#[tokio::test]
async fn pipelined_decisions_are_decided_in_order_and_synced_together() {
    const N: u64 = 20;
    for t in TRANSPORTS {
        let s = TestServer::start(open(), t).await;
        let syncs = || async { metric(&s.get("/metrics").await.text, "quotad_wal_fsync_duration_seconds_count") };
        let before = syncs().await;
        let consume = post("/v1/consume", "", r#"{"subject":"p","amounts":{"tokens":1}}"#);
        let mut c = raw(&s).await;
        c.send(&consume.repeat(N as usize)).await;
        for used in 1..=N {
            let (status, head, text) = c.answer().await;
            assert_eq!(status, 200, "{t:?} {text}");
            assert!(!head.to_ascii_lowercase().contains("connection: close"), "{head}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["counters"][0]["used"], used, "{t:?}: answered out of order: {text}");
        }
        // One at a time, each would wait for its own sync. Decided together,
        // they share one or two (the log may take the first alone).
        let took = syncs().await - before;
        assert!(
            took < (N / 2) as f64,
            "{t:?}: {N} pipelined decisions took {took} syncs"
        );
        s.stop().await;
    }
}

#[tokio::test]
async fn a_pipeline_stops_at_a_call_that_may_wait_and_at_connection_close() {
    const WAIT: &str = r#"
[engine]
max_wait_ms = 120000
max_waiters_per_subject = 10

[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "tokens-per-minute"
  metric = "tokens"
  period = "1m"
  max = 10
"#;
    for t in TRANSPORTS {
        let s = TestServer::start(WAIT, t).await;
        // The field's name as such, and spelled with an escape.
        for (k, wait_ms) in ["wait_ms", "wait\\u005fms"].into_iter().enumerate() {
            let subject = format!("w{k}");
            let consume = |tokens: u32, extra: &str| {
                post(
                    "/v1/consume",
                    extra,
                    &format!(r#"{{"subject":"{subject}","amounts":{{"tokens":{tokens}}}}}"#),
                )
            };
            // 5 fit; 6 more do not and wait for the next minute. The 5 behind
            // them are decided only once the wait ends, in the new minute,
            // where 6 + 5 do not fit: decided before it, they would have.
            let waits = post(
                "/v1/consume",
                "",
                &format!(r#"{{"subject":"{subject}","amounts":{{"tokens":6}},"{wait_ms}":90000}}"#),
            );
            let mut c = raw(&s).await;
            c.send(&format!(
                "{}{waits}{}{}{}",
                consume(5, ""),
                consume(5, ""),
                consume(1, "Connection: close\r\n"),
                consume(1, "")
            ))
            .await;
            let waiting = &s.state.core.get().unwrap().waiting;
            for _ in 0..500 {
                if waiting.len() == 1 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            assert_eq!(
                waiting.len(),
                1,
                "{t:?} {wait_ms}: the call over the cap is not waiting"
            );
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            s.clock.advance(60_000);
            waiting.poke();
            for (i, (allowed, used)) in [(true, 5), (true, 6), (false, 6), (true, 7)].into_iter().enumerate() {
                let (status, head, text) = c.answer().await;
                assert_eq!(status, 200, "{t:?} {wait_ms} answer {i}: {text}");
                let v: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(v["allowed"], allowed, "{t:?} {wait_ms} answer {i}: {text}");
                assert_eq!(v["counters"][0]["used"], used, "{t:?} {wait_ms} answer {i}: {text}");
                let closes = head.to_ascii_lowercase().contains("connection: close");
                assert_eq!(closes, i == 3, "{t:?} {wait_ms} answer {i}: {head}");
            }
            assert!(c.closed().await.is_some(), "{t:?}");
            // The request after `Connection: close` was never decided.
            let mut c = raw(&s).await;
            c.send(&post("/v1/check", "", &format!(r#"{{"subject":"{subject}"}}"#)))
                .await;
            let (_, _, text) = c.answer().await;
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["counters"][0]["used"], 7, "{t:?} {wait_ms}: {text}");
        }
        s.stop().await;
    }
}
