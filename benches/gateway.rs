//! What the OpenAI gateway adds to a call. Run with
//! `cargo bench --bench gateway` (QUOTAD_BENCH_CALLS: calls per latency
//! series, default 2000; QUOTAD_BENCH_ROUNDS: rounds, default 3;
//! QUOTAD_BENCH_CONCURRENCY for the throughput series, default 32).
//!
//! A fake OpenAI server in this process answers at once (a fixed chat
//! completion with `usage`, or a stream of five chunks and the usage chunk).
//! The daemon is the real binary, durability "fsync", with a per-subject
//! token limit, so each gateway call is a durable reserve (prompt counted
//! with tiktoken) and a durable commit around the forward. Each round, in
//! this order, the same calls are sent straight to the fake server and
//! through the gateway:
//!
//! - non-streamed chat, one at a time: latency p50/p99;
//! - streamed chat, one at a time: time to the first chunk, p50/p99;
//! - non-streamed chat from `CONCURRENCY` callers: calls per second.
//!
//! The median of the rounds is printed for each figure.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_quotad");

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn chunk(content: &str) -> String {
    let c = json!({"id": "c1", "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content}}]});
    format!("data: {c}\n\n")
}

async fn fake_chat(body: String) -> Response {
    let v: Value = serde_json::from_str(&body).unwrap();
    let usage = json!({"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14});
    if v["stream"] == true {
        let mut events: Vec<Result<String, std::io::Error>> =
            ["Hel", "lo", " the", "re", "!"].iter().map(|c| Ok(chunk(c))).collect();
        let u = json!({"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": usage});
        events.push(Ok(format!("data: {u}\n\n")));
        events.push(Ok("data: [DONE]\n\n".into()));
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(futures_util::stream::iter(events)))
            .unwrap();
    }
    let answer = json!({"id": "c1", "object": "chat.completion", "model": v["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there!"}, "finish_reason": "stop"}],
        "usage": usage});
    ([("content-type", "application/json")], answer.to_string()).into_response()
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn body(i: usize, stream: bool) -> String {
    json!({"model": "gpt-4o-mini", "max_tokens": 64, "stream": stream,
        "messages": [{"role": "user", "content": "Say hello to the person reading this, briefly."}],
        "user": format!("u{}", i % 1000)})
    .to_string()
}

/// One call: (time to the whole answer, or to the first chunk of a stream).
async fn call(http: &reqwest::Client, url: &str, i: usize, stream: bool) -> Duration {
    let t = Instant::now();
    let mut r = http
        .post(url)
        .header("content-type", "application/json")
        .header("x-quotad-subject", format!("user-{}", i % 1000))
        .body(body(i, stream))
        .send()
        .await
        .expect("an answer");
    assert_eq!(r.status(), 200, "{url}");
    if stream {
        let first = r.chunk().await.expect("a chunk").expect("not empty");
        assert!(first.starts_with(b"data:"));
        let took = t.elapsed();
        while r.chunk().await.expect("the rest").is_some() {}
        took
    } else {
        let b = r.bytes().await.expect("the body");
        assert!(b.len() > 10);
        t.elapsed()
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

/// (p50 ms, p99 ms) of `n` calls one at a time.
async fn latency(http: &reqwest::Client, url: &str, n: usize, stream: bool) -> (f64, f64) {
    let mut d = Vec::with_capacity(n);
    for i in 0..n {
        d.push(call(http, url, i, stream).await);
    }
    d.sort();
    (pct(&d, 0.5), pct(&d, 0.99))
}

/// Calls per second of `n` calls from `c` callers.
async fn throughput(http: &reqwest::Client, url: &str, n: usize, c: usize) -> f64 {
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let tasks: Vec<_> = (0..c)
        .map(|_| {
            let (http, url, next) = (http.clone(), url.to_string(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    call(&http, &url, i, false).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let calls = env_or("QUOTAD_BENCH_CALLS", 2000);
    let rounds = env_or("QUOTAD_BENCH_ROUNDS", 3);
    let concurrency = env_or("QUOTAD_BENCH_CONCURRENCY", 32);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let app = axum::Router::new().route("/v1/chat/completions", post(fake_chat));
            axum::serve(upstream, app).await.unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let (api, gw) = (free_port(), free_port());
        let config = dir.path().join("quotad.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[server]
listen = ["127.0.0.1:{api}"]
[storage]
data_dir = "{data}"
durability = "fsync"
[log]
level = "warn"
[gateway]
listen = ["127.0.0.1:{gw}"]
[[gateway.upstreams]]
name = "fake"
base_url = "http://{up}/v1"
models = ["*"]
[[plans]]
name = "bench"
default = true
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  match = {{ event = "llm.*" }}
  period = "1d"
  max = 1000000000
"#,
                data = dir.path().join("data").display()
            ),
        )
        .unwrap();
        let _daemon = Daemon(
            Command::new(BIN)
                .args(["serve", "--config"])
                .arg(&config)
                .stdout(Stdio::null())
                .spawn()
                .expect("quotad starts"),
        );
        let http = reqwest::Client::builder().tcp_nodelay(true).build().unwrap();
        let ready = format!("http://127.0.0.1:{api}/readyz");
        for _ in 0..200 {
            if http.get(&ready).send().await.is_ok_and(|r| r.status() == 200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let direct = format!("http://{up}/v1/chat/completions");
        let gateway = format!("http://127.0.0.1:{gw}/v1/chat/completions");
        // Warm up: connections, the tokenizer, the page cache.
        latency(&http, &gateway, 200, false).await;
        latency(&http, &direct, 200, false).await;

        let mut figures: Vec<(&str, Vec<f64>)> = [
            "direct non-streamed p50 ms",
            "direct non-streamed p99 ms",
            "gateway non-streamed p50 ms",
            "gateway non-streamed p99 ms",
            "direct first chunk p50 ms",
            "direct first chunk p99 ms",
            "gateway first chunk p50 ms",
            "gateway first chunk p99 ms",
            "direct calls/s",
            "gateway calls/s",
        ]
        .into_iter()
        .map(|n| (n, Vec::new()))
        .collect();
        for round in 0..rounds {
            let mut got = Vec::new();
            for stream in [false, true] {
                for url in [&direct, &gateway] {
                    let (p50, p99) = latency(&http, url, calls, stream).await;
                    got.extend([p50, p99]);
                }
            }
            for url in [&direct, &gateway] {
                got.push(throughput(&http, url, calls * 5, concurrency).await);
            }
            println!("round {}: {:?}", round + 1, got.iter().map(|g| format!("{g:.2}")).collect::<Vec<_>>());
            for (f, g) in figures.iter_mut().zip(got) {
                f.1.push(g);
            }
        }
        println!("\nmedians of {rounds} rounds ({calls} calls per latency series, {} calls from {concurrency} callers for throughput):", calls * 5);
        for (name, v) in figures {
            println!("  {name:<30} {:>10.2}   {:?}", median(v.clone()), v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>());
        }
    });
}
