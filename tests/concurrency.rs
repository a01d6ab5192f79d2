//! Exactness under concurrency over real HTTP: 64 clients racing on one subject,
//! and many subjects racing on one global limit, never get more than `max`.

mod common;

use std::sync::Arc;

use common::{TestServer, Transport, TRANSPORTS};
use serde_json::json;

const CLIENTS: usize = 64;

async fn race(s: &Arc<TestServer>, per_client: usize, subject_of: fn(usize) -> String) -> (usize, usize) {
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = s.connect().await;
            let (mut allowed, mut denied) = (0, 0);
            for _ in 0..per_client {
                let r = conn
                    .post("/v1/consume", &json!({"subject": subject_of(c), "event": "e"}))
                    .await;
                assert_eq!(r.status, 200, "{}", r.text);
                if r.body["allowed"].as_bool().unwrap() {
                    allowed += 1;
                } else {
                    denied += 1;
                }
            }
            (allowed, denied)
        }));
    }
    let mut total = (0, 0);
    for t in tasks {
        let (a, d) = t.await.unwrap();
        total.0 += a;
        total.1 += d;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_clients_on_one_subject_get_exactly_max() {
    let config = r#"
[[plans]]
name = "p"
default = true
  [[plans.limits]]
  name = "per-day"
  period = "1d"
  max = 1000
  [[plans.limits]]
  name = "per-minute"
  algorithm = "token_bucket"
  max = 5000
  refill = 1
  period = "1h"
"#;
    for t in TRANSPORTS {
        let s = Arc::new(TestServer::start(config, t).await);
        let (allowed, denied) = race(&s, 20, |_| "hot".to_string()).await;
        assert_eq!(allowed, 1000, "{t:?}: exactly max allowed");
        assert_eq!(denied, CLIENTS * 20 - 1000);
        let g = s.get("/v1/subjects/hot").await;
        assert_eq!(g.used("per-day"), 1000);
        assert_eq!(
            g.used("per-minute"),
            1000,
            "the stacked bucket was charged exactly as often"
        );
        Arc::into_inner(s).unwrap().stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_global_limit_shared_by_many_subjects_is_exact() {
    let config = r#"
[[limits]]
name = "provider"
scope = "global"
period = "1d"
max = 1000

[[plans]]
name = "p"
default = true
  [[plans.limits]]
  name = "per-subject"
  period = "1d"
  max = 30
"#;
    for t in [Transport::Tcp, Transport::Unix] {
        let s = Arc::new(TestServer::start(config, t).await);
        // 64 clients x 25 requests, each client its own subject plus 8 subjects shared
        // by pairs of clients, so subject and global shards are locked in every mix.
        let (allowed, _) = race(&s, 25, |c| format!("user:{}", c % 48)).await;
        assert_eq!(allowed, 1000, "{t:?}: the global cap holds exactly");
        assert_eq!(s.get("/v1/subjects/user:0").await.used("provider"), 1000);
        let mut per_subject_total = 0;
        for i in 0..48 {
            let used = s.get(&format!("/v1/subjects/user:{i}")).await.used("per-subject");
            assert!(used <= 30, "user:{i} used {used}");
            per_subject_total += used;
        }
        assert_eq!(per_subject_total, 1000, "every allowed call charged its subject once");
        Arc::into_inner(s).unwrap().stop().await;
    }
}
