//! The OpenAI-compatible gateway against a local fake OpenAI server: chat
//! (streamed and not) and embeddings charged exactly from the upstream's
//! `usage`, a denial that never reaches the upstream, degrade rewriting the
//! model, an upstream 5xx and a dropped connection releasing the hold, a
//! stream cut short charging what was streamed, the usage chunk hidden from
//! callers who did not ask for it, and the provider key never leaving
//! quotad.

mod common;

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::{TestServer, Transport};
use quotad::config::ListenAddr;
use serde_json::{json, Value};

const PROVIDER_KEY: &str = "sk-upstream-secret-do-not-leak";

/// What the fake upstream was sent: (path, Authorization header, body).
type Seen = Arc<Mutex<Vec<(String, Option<String>, Value)>>>;

fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn chunk(content: &str) -> String {
    format!(
        "data: {}\n\n",
        json!({"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}}]})
    )
}

/// The items one by one, 10 ms apart, so each goes out on its own (as an
/// upstream's would) and a failure comes after what was sent before it.
fn paced(
    items: Vec<Result<String, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<String, std::io::Error>> + Send {
    use futures_util::StreamExt;
    futures_util::stream::iter(items).then(|i| async move {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        i
    })
}

/// Notes a call the fake upstream was sent; returns its body.
fn record(seen: &Seen, path: &str, headers: &HeaderMap, body: &str) -> Value {
    let v: Value = serde_json::from_str(body).unwrap();
    let auth = headers.get("authorization").map(|a| a.to_str().unwrap().to_string());
    seen.lock().unwrap().push((path.into(), auth, v.clone()));
    v
}

async fn fake_chat(State(seen): State<Seen>, headers: HeaderMap, body: String) -> Response {
    let v = record(&seen, "chat", &headers, &body);
    let model = v["model"].as_str().unwrap().to_string();
    let stream = v["stream"] == true;
    match model.as_str() {
        "fail-500" => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                [("content-type", "application/json")],
                json!({"error": {"message": "upstream broke", "type": "server_error"}}).to_string(),
            )
                .into_response()
        }
        "drop" => {
            // Headers and part of the body, then the connection fails.
            let s = paced(vec![Ok("{\"id\":".to_string()), Err(std::io::Error::other("gone"))]);
            return Response::builder()
                .header("content-type", "application/json")
                .body(Body::from_stream(s))
                .unwrap();
        }
        _ => {}
    }
    if !stream {
        let answer = json!({
            "id": "c1", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi there"}, "finish_reason": "stop"}],
            "usage": usage(11, 7),
        });
        return ([("content-type", "application/json")], answer.to_string()).into_response();
    }
    let mut events: Vec<Result<String, std::io::Error>> = vec![Ok(chunk("hello")), Ok(chunk(" world"))];
    if model == "cut" {
        events.push(Err(std::io::Error::other("cut")));
    } else {
        if v["stream_options"]["include_usage"] == true {
            events.push(Ok(format!(
                "data: {}\n\n",
                json!({"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": usage(12, 2)})
            )));
        }
        events.push(Ok("data: [DONE]\n\n".into()));
    }
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(paced(events)))
        .unwrap()
}

async fn fake_embeddings(State(seen): State<Seen>, headers: HeaderMap, body: String) -> Response {
    record(&seen, "embeddings", &headers, &body);
    let answer = json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
        "usage": {"prompt_tokens": 5, "total_tokens": 5}});
    ([("content-type", "application/json")], answer.to_string()).into_response()
}

struct Setup {
    s: TestServer,
    seen: Seen,
    gateway: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn setup(extra: &str) -> Setup {
    let seen: Seen = Arc::default();
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(fake_chat))
        .route("/v1/embeddings", post(fake_embeddings))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("provider.key");
    std::fs::write(&key, format!("{PROVIDER_KEY}\n")).unwrap();
    let config = format!(
        r#"
metrics = ["input_tokens", "output_tokens"]
[[plans]]
name = "free"
default = true
unmatched = "allow"
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  match = {{ event = "llm.*" }}
  period = "1d"
  max = 1000000
  [[plans.limits]]
  name = "input"
  metric = "input_tokens"
  match = {{ event = "llm.*" }}
  period = "1d"
  max = 1000000
  [[plans.limits]]
  name = "big-model"
  match = {{ event = "llm.*", attributes = {{ model = "gpt-4o" }} }}
  period = "1d"
  max = 2
  mode = "degrade"
  [[plans.limits]]
  name = "capped"
  match = {{ event = "llm.*", attributes = {{ model = "gpt-4-capped" }} }}
  period = "1m"
  max = 1
{extra}
[gateway]
listen = ["127.0.0.1:0"]
[[gateway.upstreams]]
name = "fake"
base_url = "http://127.0.0.1:{port}/v1/"
api_key_file = "{key}"
models = ["*"]
degrade_to = {{ "gpt-4o" = "gpt-4o-mini" }}
"#,
        key = key.display()
    );
    let s = TestServer::start(&config, Transport::Tcp).await;
    let gateway = match &s.gateway[0] {
        ListenAddr::Tcp(a) => format!("http://{a}"),
        other => panic!("gateway on {other:?}"),
    };
    Setup {
        s,
        seen,
        gateway,
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

impl Setup {
    async fn post(&self, path: &str, subject: Option<&str>, body: Value) -> (u16, HeaderMap, String) {
        let mut req = self
            .http
            .post(format!("{}{path}", self.gateway))
            .header("content-type", "application/json")
            .header("authorization", "Bearer caller-key")
            .body(body.to_string());
        if let Some(s) = subject {
            req = req.header("x-quotad-subject", s);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let mut h = HeaderMap::new();
        for (k, v) in r.headers() {
            h.insert(
                k.as_str().parse::<axum::http::HeaderName>().unwrap(),
                v.to_str().unwrap().parse().unwrap(),
            );
        }
        let text = r.text().await.unwrap_or_default();
        assert!(!text.contains(PROVIDER_KEY), "the provider key leaked: {text}");
        for v in h.values() {
            assert!(
                !v.to_str().unwrap().contains(PROVIDER_KEY),
                "the provider key leaked in a header"
            );
        }
        (status, h, text)
    }

    async fn used(&self, subject: &str, limit: &str) -> u64 {
        let r = self.s.get(&format!("/v1/subjects/{subject}")).await;
        r.body["counters"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["limit"] == limit))
            .and_then(|c| c["used"].as_u64())
            .unwrap_or(0)
    }

    fn open_holds(&self) -> usize {
        self.s.state.engine().unwrap().stats().open_reservations
    }

    fn calls(&self) -> Vec<(String, Option<String>, Value)> {
        self.seen.lock().unwrap().clone()
    }
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 50})
}

#[tokio::test]
async fn a_chat_is_forwarded_with_the_provider_key_and_charged_its_usage() {
    let g = setup("").await;
    let (status, h, text) = g.post("/v1/chat/completions", Some("alice"), chat("gpt-4o-mini")).await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "hi there");
    assert!(h.get("x-quotad-reservation").is_some());
    assert_eq!(h["x-quotad-decision"], "allow");
    assert!(h.get("x-ratelimit-remaining").is_some());
    let calls = g.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].1.as_deref(), Some(format!("Bearer {PROVIDER_KEY}").as_str()));
    // Charged exactly what the upstream reported, not the estimate.
    assert_eq!(g.used("alice", "tokens-per-day").await, 18);
    assert_eq!(g.used("alice", "input").await, 11);
    assert_eq!(g.open_holds(), 0);
}

#[tokio::test]
async fn a_stream_passes_chunk_by_chunk_and_hides_the_usage_chunk() {
    let g = setup("").await;
    let mut body = chat("gpt-4o-mini");
    body["stream"] = json!(true);
    let (status, h, text) = g.post("/v1/chat/completions", Some("bob"), body.clone()).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(h["content-type"], "text/event-stream");
    assert!(
        text.contains("hello") && text.contains(" world") && text.contains("[DONE]"),
        "{text}"
    );
    assert!(!text.contains("usage"), "the caller did not ask for usage: {text}");
    // quotad asked the upstream for it.
    assert_eq!(g.calls()[0].2["stream_options"]["include_usage"], true);
    assert_eq!(g.used("bob", "tokens-per-day").await, 14);
    // A caller who asks for usage gets the chunk.
    body["stream_options"] = json!({"include_usage": true});
    let (_, _, text) = g.post("/v1/chat/completions", Some("bob"), body).await;
    assert!(text.contains("\"usage\""), "{text}");
    assert_eq!(g.used("bob", "tokens-per-day").await, 28);
    assert_eq!(g.open_holds(), 0);
}

#[tokio::test]
async fn embeddings_are_charged_their_usage() {
    let g = setup("").await;
    let body = json!({"model": "text-embedding-3-small", "input": ["hello world"]});
    let (status, _, text) = g.post("/v1/embeddings", Some("carol"), body).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(g.used("carol", "tokens-per-day").await, 5);
    assert_eq!(g.calls()[0].0, "embeddings");
}

#[tokio::test]
async fn a_denial_is_a_429_in_openai_shape_and_never_reaches_the_upstream() {
    let g = setup("").await;
    assert_eq!(
        g.post("/v1/chat/completions", Some("dan"), chat("gpt-4-capped"))
            .await
            .0,
        200
    );
    let (status, h, text) = g.post("/v1/chat/completions", Some("dan"), chat("gpt-4-capped")).await;
    assert_eq!(status, 429, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_exceeded");
    assert_eq!(v["error"]["code"], "limit_exceeded");
    assert!(v["error"]["message"].as_str().unwrap().contains("capped"), "{text}");
    assert!(h.get("retry-after").is_some());
    assert_eq!(h["x-ratelimit-remaining"], "0");
    assert_eq!(g.calls().len(), 1, "the denied call was not sent");
}

#[tokio::test]
async fn degrade_sends_the_cheaper_model_and_charges_it() {
    let g = setup("").await;
    for _ in 0..2 {
        let (_, h, _) = g.post("/v1/chat/completions", Some("erin"), chat("gpt-4o")).await;
        assert_eq!(h["x-quotad-decision"], "allow");
    }
    let (status, h, text) = g.post("/v1/chat/completions", Some("erin"), chat("gpt-4o")).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(h["x-quotad-decision"], "degrade");
    assert_eq!(g.calls()[2].2["model"], "gpt-4o-mini");
    // Held and charged as the model that served it.
    assert_eq!(g.used("erin", "big-model").await, 2);
    assert_eq!(g.open_holds(), 0);
}

#[tokio::test]
async fn an_upstream_error_or_a_dropped_connection_releases_the_hold() {
    let g = setup("").await;
    let (status, _, text) = g.post("/v1/chat/completions", Some("fay"), chat("fail-500")).await;
    assert_eq!(status, 500);
    assert!(text.contains("upstream broke"), "the upstream's body: {text}");
    let (status, _, text) = g.post("/v1/chat/completions", Some("fay"), chat("drop")).await;
    assert_eq!(status, 502, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], "upstream_failed");
    assert_eq!(g.used("fay", "tokens-per-day").await, 0, "nothing charged");
    assert_eq!(g.open_holds(), 0, "both holds released");
}

#[tokio::test]
async fn a_stream_cut_short_charges_what_was_streamed() {
    let g = setup("").await;
    let mut body = chat("cut");
    body["stream"] = json!(true);
    let (_, _, text) = g.post("/v1/chat/completions", Some("gus"), body.clone()).await;
    assert!(text.contains("hello"), "{text}");
    let input = quotad::gateway::tokens::count_chat("cut", &body);
    let output = quotad::gateway::tokens::count_text("cut", "hello world");
    for _ in 0..100 {
        if g.open_holds() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(g.used("gus", "tokens-per-day").await, input + output);
}

#[tokio::test]
async fn bad_calls_get_openai_shaped_errors() {
    let g = setup("").await;
    let (status, _, text) = g.post("/v1/chat/completions", None, chat("gpt-4o-mini")).await;
    assert_eq!(status, 400);
    assert!(text.contains("x-quotad-subject"), "{text}");
    let (status, _, text) = g.post("/v1/chat/completions", Some("h"), json!({"messages": []})).await;
    assert_eq!(status, 400);
    assert!(text.contains("model"), "{text}");
    let (status, _, _) = g.post("/v1/nothing", Some("h"), json!({})).await;
    assert_eq!(status, 404);
    // Idempotency keys are checked as the API checks them, with room left
    // for the ":degraded" key of a degraded call.
    for (key, says) in [("", "idempotency_key"), (&*"k".repeat(250), "longer than 246 bytes")] {
        let r = g
            .http
            .post(format!("{}/v1/chat/completions", g.gateway))
            .header("x-quotad-subject", "h")
            .header("idempotency-key", key)
            .body(chat("gpt-4o-mini").to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let text = r.text().await.unwrap();
        assert!(text.contains(says), "{text}");
    }
    assert!(g.calls().is_empty());
}

#[test]
fn a_bad_gateway_section_is_refused_naming_the_key() {
    let base = "[[plans]]\nname = \"free\"\ndefault = true\n";
    let cases = [
        ("[gateway]\nlisten = []\nupstreams = []\n", "gateway.listen"),
        (
            "[gateway]\nlisten = [\"0.0.0.0:7880\"]\n[[gateway.upstreams]]\nname = \"a\"\nbase_url = \"http://x\"\nmodels = [\"*\"]\n",
            "gateway.listen[0]",
        ),
        ("[gateway]\nlisten = [\"127.0.0.1:7880\"]\nupstreams = []\n", "gateway.upstreams"),
        (
            "[gateway]\nlisten = [\"127.0.0.1:7880\"]\n[[gateway.upstreams]]\nname = \"a\"\nbase_url = \"ftp://x\"\nmodels = [\"*\"]\n",
            "gateway.upstreams[0].base_url",
        ),
        (
            "[gateway]\nlisten = [\"127.0.0.1:7880\"]\n[[gateway.upstreams]]\nname = \"a\"\nbase_url = \"http://x\"\nmodels = []\n",
            "gateway.upstreams[0].models",
        ),
        (
            "[gateway]\nlisten = [\"127.0.0.1:7880\"]\n[[gateway.upstreams]]\nname = \"a\"\nbase_url = \"http://x\"\nmodels = [\"*\"]\napi_key_file = \"/nonexistent/key\"\n",
            "gateway.upstreams[0].api_key_file",
        ),
        (
            "[gateway]\nlisten = [\"127.0.0.1:7880\"]\nupstream_timeout = \"soon\"\n[[gateway.upstreams]]\nname = \"a\"\nbase_url = \"http://x\"\nmodels = [\"*\"]\n",
            "gateway.upstream_timeout",
        ),
    ];
    for (gateway, key) in cases {
        let text = format!("{base}{gateway}");
        let err = quotad::config::Config::from_toml(&text, "t.toml")
            .and_then(|c| c.sanitize().map(|_| c))
            .expect_err(key);
        assert_eq!(err.key, key, "{gateway}: {}", err.message);
        assert!(!err.message.contains("::"), "{}", err.message);
    }
}

/// `quotad_gateway_*`: calls by how they ended, tokens charged, upstream
/// time; none of it without `[gateway]`.
#[tokio::test]
async fn gateway_metrics_count_calls_by_result_and_tokens_charged() {
    let g = setup("").await;
    assert_eq!(
        g.post("/v1/chat/completions", Some("gus"), chat("gpt-4o-mini")).await.0,
        200
    );
    assert_eq!(
        g.post("/v1/chat/completions", Some("gus"), chat("gpt-4-capped"))
            .await
            .0,
        200
    );
    assert_eq!(
        g.post("/v1/chat/completions", Some("gus"), chat("gpt-4-capped"))
            .await
            .0,
        429
    );
    assert_eq!(
        g.post("/v1/chat/completions", Some("gus"), chat("fail-500")).await.0,
        500
    );
    assert_eq!(g.post("/v1/chat/completions", None, chat("gpt-4o-mini")).await.0, 400);
    let m = g.s.get("/metrics").await.text;
    for line in [
        "quotad_gateway_calls_total{endpoint=\"chat\",result=\"forwarded\"} 2",
        "quotad_gateway_calls_total{endpoint=\"chat\",result=\"denied\"} 1",
        "quotad_gateway_calls_total{endpoint=\"chat\",result=\"upstream_error\"} 1",
        "quotad_gateway_calls_total{endpoint=\"chat\",result=\"refused\"} 1",
        // Two charged calls of 11 prompt and 7 completion tokens.
        "quotad_gateway_tokens_total{kind=\"input\"} 22",
        "quotad_gateway_tokens_total{kind=\"output\"} 14",
        "quotad_gateway_upstream_seconds_count{upstream=\"fake\"} 3",
    ] {
        assert!(m.contains(line), "no {line:?} in:\n{m}");
    }
    let plain = TestServer::start("", Transport::Tcp).await;
    let m = plain.get("/metrics").await.text;
    assert!(!m.contains("quotad_gateway_") && !m.contains("quotad_rls_"), "{m}");
}
