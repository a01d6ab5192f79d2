//! Money: the price table, exact costs with rounding, spend caps at their
//! boundary and under 64 concurrent clients, reservations trued up at the
//! price of their reserve time (across a reload), explicit costs, unpriced
//! calls, replays and restarts, and config errors that name the key.

mod common;

use std::sync::Arc;

use common::{TestServer, Transport, T0, TRANSPORTS};
use quotad::config::Config;
use quotad::engine::Policy;
use serde_json::{json, Value};

const PRICES: &str = r#"
metrics = ["input_tokens", "output_tokens", "images"]

[pricing]
currency = "USD"
unpriced = "reject"

[[pricing.prices]]
name = "gpt-4o"
match = { event = "llm.*", attributes = { model = "gpt-4o" } }
input_tokens = "2.50/1M"
output_tokens = "10.00/1M"

[[pricing.prices]]
name = "gpt-4o-mini"
match = { event = "llm.*", attributes = { model = "gpt-4o-mini" } }
input_tokens = "0.15/1M"
output_tokens = "0.60/1M"

[[pricing.prices]]
name = "flux-pro"
match = { event = "image.render", attributes = { model = "flux-pro" } }
images = "0.05"
"#;

/// $0.05 per user per month, $1 a day for everybody.
fn config() -> String {
    format!(
        r#"{PRICES}
[engine]
reservation_ttl_default = "60s"

[[limits]]
name = "spend-per-day"
metric = "cost_micros"
scope = "global"
period = "1d"
max = 1000000

[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "spend-per-month"
  metric = "cost_micros"
  period = "1mo"
  max = 50000
"#
    )
}

fn call(subject: &str, model: &str, input: u64, output: u64) -> Value {
    json!({"subject": subject, "event": "llm.chat", "attributes": {"model": model},
           "amounts": {"input_tokens": input, "output_tokens": output}})
}

fn cost(r: &common::Resp) -> u64 {
    r.body["cost"]["amount_micros"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cost in {}", r.text))
}

#[tokio::test]
async fn costs_are_exact_and_rounded_up_per_call() {
    for t in TRANSPORTS {
        let s = TestServer::start(&config(), t).await;
        // 1000 × 2.5 µ$ + 500 × 10 µ$ = 7500 µ$.
        let r = s.consume(call("a", "gpt-4o", 1000, 500)).await;
        assert!(r.allowed(), "{}", r.text);
        assert_eq!(
            r.body["cost"],
            json!({"amount_micros": 7500, "currency": "USD", "price": "gpt-4o"})
        );
        assert_eq!(r.used("spend-per-month"), 7500);
        assert_eq!(r.used("spend-per-day"), 7500);
        // One input token is 2.5 µ$: the call is rounded up to 3, once.
        let r = s.consume(call("b", "gpt-4o", 1, 1)).await;
        assert_eq!(cost(&r), 13, "2.5 + 10 = 12.5 → 13, not 3 + 10");
        // 7 × 0.15 + 3 × 0.60 = 2.85 → 3.
        let r = s.consume(call("c", "gpt-4o-mini", 7, 3)).await;
        assert_eq!((cost(&r), r.body["cost"]["price"].as_str()), (3, Some("gpt-4o-mini")));
        // A round million: no rounding at all.
        let r = s.consume(call("d", "gpt-4o-mini", 1_000_000, 0)).await;
        assert_eq!(cost(&r), 150_000);
        assert!(!r.allowed(), "150000 µ$ is over d's 50000 µ$ a month");
        // Images: 0.05 each; a call with no priced metric costs nothing.
        let img = |n: u64| {
            json!({"subject": "e", "event": "image.render", "attributes": {"model": "flux-pro"},
                   "amounts": {"images": n}})
        };
        assert_eq!(cost(&s.consume(img(1)).await), 50_000);
        let r = s
            .consume(json!({"subject": "f", "event": "llm.chat", "attributes": {"model": "gpt-4o"}}))
            .await;
        assert_eq!((r.allowed(), cost(&r)), (true, 0));
        // check answers the estimate and charges nothing.
        let r = s.post("/v1/check", call("g", "gpt-4o", 2000, 1000)).await;
        assert_eq!((r.allowed(), cost(&r), r.used("spend-per-month")), (true, 15_000, 0));
        assert_eq!(s.get("/v1/subjects/g").await.used("spend-per-month"), 0);
        s.stop().await;
    }
}

#[tokio::test]
async fn a_money_cap_denies_exactly_at_its_boundary() {
    for t in TRANSPORTS {
        let s = TestServer::start(&config(), t).await;
        // 12500 µ$ a call: four make the 50000 µ$ month exactly, the fifth is denied.
        for i in 0..4 {
            let r = s.consume(call("u", "gpt-4o", 1000, 1000)).await;
            assert!(r.allowed(), "call {i}: {}", r.text);
        }
        let r = s.consume(call("u", "gpt-4o", 1000, 1000)).await;
        assert!(!r.allowed());
        assert_eq!(r.body["reasons"][0]["code"], "limit_exceeded");
        assert_eq!(r.body["reasons"][0]["limit"], "spend-per-month");
        assert_eq!(r.counter("spend-per-month")["remaining"], 0);
        // Retry when the month turns: 2026-12-01T00:00Z.
        let month_end = common::ms("2026-12-01T00:00:00Z");
        assert_eq!(r.body["retry_after_ms"].as_u64(), Some(month_end - T0));
        assert_eq!(r.header("x-ratelimit-limit").as_deref(), Some("50000"));
        // The denial cost nothing, and the cost is still reported.
        assert_eq!((cost(&r), r.used("spend-per-month")), (12_500, 50_000));
        // The cheapest call still fits nowhere: the cap is spent.
        assert!(!s.consume(call("u", "gpt-4o-mini", 1, 0)).await.allowed());
        // A call that costs nothing needs room left too (the counter is exhausted).
        let free = json!({"subject": "u", "event": "llm.chat", "attributes": {"model": "gpt-4o"}});
        assert!(!s.consume(free).await.allowed());
        s.stop().await;
    }
}

#[tokio::test]
async fn sixty_four_clients_spend_exactly_the_global_cap() {
    // $1 a day for everybody at 7500 µ$ a call: floor(1000000 / 7500) = 133 calls.
    let cfg = format!(
        "{PRICES}\n[[limits]]\nname = \"spend-per-day\"\nmetric = \"cost_micros\"\nscope = \"global\"\n\
         period = \"1d\"\nmax = 1000000\n[[plans]]\nname = \"free\"\ndefault = true\n"
    );
    for t in TRANSPORTS {
        let s = Arc::new(TestServer::start(&cfg, t).await);
        let mut tasks = Vec::new();
        for c in 0..64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut conn = s.connect().await;
                let mut allowed = 0u64;
                for i in 0..4 {
                    let body = call(&format!("user:{c}:{i}"), "gpt-4o", 1000, 500);
                    let r = conn.post("/v1/consume", &body).await;
                    assert_eq!(r.status, 200, "{}", r.text);
                    allowed += u64::from(r.body["allowed"].as_bool().unwrap());
                }
                allowed
            }));
        }
        let mut allowed = 0;
        for task in tasks {
            allowed += task.await.unwrap();
        }
        assert_eq!(allowed, 1_000_000 / 7_500, "{t:?}");
        let r = s.post("/v1/check", call("x", "gpt-4o", 0, 0)).await;
        assert_eq!(r.used("spend-per-day"), 133 * 7_500);
        // /metrics counts the money of allowed calls only, not checks or denials.
        let m = s.get("/metrics").await.text;
        let want = format!("quotad_spend_micros_total{{currency=\"USD\"}} {}", 133 * 7_500);
        assert!(m.contains(&want), "{t:?}: no {want:?} in\n{m}");
        Arc::try_unwrap(s).ok().unwrap().stop().await;
    }
}

async fn reserve(
    s: &TestServer,
    subject: &str,
    input: u64,
    output: u64,
    ttl_ms: Option<u64>,
) -> (String, common::Resp) {
    let mut body = call(subject, "gpt-4o", input, output);
    if let Some(ttl) = ttl_ms {
        body["ttl_ms"] = json!(ttl);
    }
    let r = s.post("/v1/reserve", body).await;
    assert!(r.allowed(), "{}", r.text);
    (r.body["reservation_id"].as_str().unwrap().to_string(), r)
}

async fn spent(s: &TestServer, subject: &str) -> u64 {
    s.get(&format!("/v1/subjects/{subject}")).await.used("spend-per-month")
}

#[tokio::test]
async fn reservations_hold_the_estimate_and_commit_trues_up() {
    for t in TRANSPORTS {
        let s = TestServer::start(&config(), t).await;
        // Hold 1000 in + 2000 out = 2500 + 20000 = 22500 µ$.
        let (id, r) = reserve(&s, "u", 1000, 2000, None).await;
        assert_eq!((cost(&r), r.used("spend-per-month")), (22_500, 22_500));
        // Commit less output: 1000 in (held) + 600 out = 2500 + 6000 = 8500 µ$.
        let c = s
            .post(
                &format!("/v1/reservations/{id}/commit"),
                json!({"amounts": {"output_tokens": 600}}),
            )
            .await;
        assert_eq!(c.status, 200, "{}", c.text);
        assert_eq!(c.body["held"]["cost_micros"], 22_500);
        assert_eq!(c.body["charged"]["cost_micros"], 8_500);
        assert_eq!(c.body["charged"]["input_tokens"], 1000);
        assert_eq!(
            c.body["cost"],
            json!({"amount_micros": 8500, "currency": "USD", "price": "gpt-4o"})
        );
        assert_eq!(spent(&s, "u").await, 8_500, "the difference went back");
        // The same commit again answers the same.
        let again = s
            .post(
                &format!("/v1/reservations/{id}/commit"),
                json!({"amounts": {"output_tokens": 600}}),
            )
            .await;
        assert_eq!(again.body, c.body);
        // A reserve charges nothing in /metrics; its commit, once, what it cost.
        let m = s.get("/metrics").await.text;
        assert!(m.contains("quotad_spend_micros_total{currency=\"USD\"} 8500"), "{m}");

        // Commit more than held: recorded anyway, past the cap.
        let (id, _) = reserve(&s, "v", 1000, 1000, None).await; // 12500
        let c = s
            .post(
                &format!("/v1/reservations/{id}/commit"),
                json!({"amounts": {"output_tokens": 5000}}),
            )
            .await;
        assert_eq!(c.body["charged"]["cost_micros"], 52_500);
        let v = s.get("/v1/subjects/v").await;
        assert_eq!(
            (
                v.used("spend-per-month"),
                v.counter("spend-per-month")["remaining"].as_u64()
            ),
            (52_500, Some(0))
        );

        // Release gives the whole estimate back.
        let (id, _) = reserve(&s, "w", 4000, 0, None).await;
        assert_eq!(spent(&s, "w").await, 10_000);
        let r = s.post(&format!("/v1/reservations/{id}/release"), json!({})).await;
        assert_eq!((r.status, r.body["cost"]["amount_micros"].as_u64()), (200, Some(0)));
        assert_eq!(spent(&s, "w").await, 0);

        // Commit after expiry: the hold is gone, the actual usage is recorded.
        let (id, _) = reserve(&s, "x", 1000, 1000, Some(1_000)).await;
        s.clock.advance(2_000);
        assert_eq!(spent(&s, "x").await, 0, "expired holds are released");
        let c = s
            .post(
                &format!("/v1/reservations/{id}/commit"),
                json!({"amounts": {"input_tokens": 400}}),
            )
            .await;
        assert_eq!(
            (c.body["expired"].as_bool(), c.body["charged"]["cost_micros"].as_u64()),
            (Some(true), Some(11_000))
        );
        assert_eq!(spent(&s, "x").await, 11_000);

        // A commit that names the cost uses it as given.
        let (id, _) = reserve(&s, "y", 1000, 0, None).await;
        let c = s
            .post(
                &format!("/v1/reservations/{id}/commit"),
                json!({"amounts": {"cost_micros": 777}}),
            )
            .await;
        assert_eq!(c.body["charged"]["cost_micros"], 777);
        assert_eq!(c.body["cost"]["explicit"], true);
        assert_eq!(spent(&s, "y").await, 777);
        s.stop().await;
    }
}

#[tokio::test]
async fn a_reload_between_reserve_and_commit_keeps_the_reserve_time_price() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quotad.toml");
    std::fs::write(&path, config()).unwrap();
    let s = TestServer::start_file(&path, Transport::Tcp).await;
    let (id, r) = reserve(&s, "u", 1000, 1000, None).await;
    assert_eq!(cost(&r), 12_500);
    // The price of gpt-4o doubles.
    let doubled = config()
        .replace("input_tokens = \"2.50/1M\"", "input_tokens = \"5.00/1M\"")
        .replace("output_tokens = \"10.00/1M\"", "output_tokens = \"20.00/1M\"");
    std::fs::write(&path, doubled).unwrap();
    let reload = s.post("/v1/admin/reload", json!({})).await;
    assert_eq!(reload.status, 200, "{}", reload.text);
    // New calls pay the new price...
    assert_eq!(
        cost(&s.post("/v1/check", call("v", "gpt-4o", 1000, 1000)).await),
        25_000
    );
    // ...the hold made before is committed at the old one.
    let c = s
        .post(
            &format!("/v1/reservations/{id}/commit"),
            json!({"amounts": {"output_tokens": 2000}}),
        )
        .await;
    assert_eq!(c.body["charged"]["cost_micros"], 2_500 + 20_000);
    assert_eq!(spent(&s, "u").await, 22_500);
    s.stop().await;
}

#[tokio::test]
async fn explicit_costs_and_unpriced_calls() {
    for t in TRANSPORTS {
        let s = TestServer::start(&config(), t).await;
        // The app knows a discount: its cost is used as given, no price needed.
        let mut body = call("u", "gpt-5", 1000, 1000);
        body["amounts"]["cost_micros"] = json!(999);
        let r = s.consume(body).await;
        assert!(r.allowed(), "{}", r.text);
        assert_eq!(
            r.body["cost"],
            json!({"amount_micros": 999, "currency": "USD", "explicit": true})
        );
        assert_eq!(r.used("spend-per-month"), 999);
        // No price for gpt-5 and no cost given: refused, naming event and attributes.
        let r = s.consume(call("u", "gpt-5", 1000, 1000)).await;
        assert_eq!((r.status, r.error_code()), (400, "unpriced"), "{}", r.text);
        let msg = r.body["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("\"llm.chat\"") && msg.contains("\"model\":\"gpt-5\""),
            "{msg}"
        );
        assert_eq!(spent(&s, "u").await, 999, "nothing was charged");
        // No priced metric at all: costs nothing, priced or not.
        let r = s.consume(json!({"subject": "u", "event": "search"})).await;
        assert_eq!((r.allowed(), cost(&r)), (true, 0));
        assert!(r.body["cost"].get("price").is_none());
        // Negative amounts or oversize costs never reach a counter.
        let mut body = call("u", "gpt-4o", 1, 1);
        body["amounts"]["cost_micros"] = json!(-1);
        assert_eq!(s.consume(body).await.status, 400);
        s.stop().await;
    }
    // unpriced = "zero": the same call is free.
    let zero = config().replace("unpriced = \"reject\"", "unpriced = \"zero\"");
    let s = TestServer::start(&zero, Transport::Tcp).await;
    let r = s.consume(call("u", "gpt-5", 1000, 1000)).await;
    assert_eq!((r.allowed(), cost(&r)), (true, 0));
    s.stop().await;
}

#[tokio::test]
async fn replays_and_batches_carry_the_cost_and_charge_once() {
    let s = TestServer::start(&config(), Transport::Tcp).await;
    let mut body = call("u", "gpt-4o", 1000, 500);
    body["idempotency_key"] = json!("k-1");
    let first = s.consume(body.clone()).await;
    let again = s.consume(body).await;
    assert_eq!(again.body["replayed"], true);
    assert_eq!(again.body["cost"], first.body["cost"]);
    assert_eq!(spent(&s, "u").await, 7_500);
    let mut op = call("u", "gpt-4o-mini", 1_000_000, 0);
    op["op"] = json!("consume");
    let b = s.post("/v1/batch", json!({"operations": [op]})).await;
    assert_eq!(b.body["results"][0]["body"]["cost"]["amount_micros"], 150_000);
    s.stop().await;
}

#[tokio::test]
async fn money_counters_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_durable(&config(), Transport::Tcp, T0, dir.path()).await;
    assert!(s.consume(call("u", "gpt-4o", 1000, 1000)).await.allowed());
    let (id, _) = reserve(&s, "u", 1000, 1000, Some(600_000)).await;
    s.stop().await;
    let s = TestServer::start_durable(&config(), Transport::Tcp, T0 + 1_000, dir.path()).await;
    assert_eq!(spent(&s, "u").await, 25_000);
    // The hold kept its price across the restart: commit prices it the same way.
    let c = s
        .post(
            &format!("/v1/reservations/{id}/commit"),
            json!({"amounts": {"output_tokens": 0}}),
        )
        .await;
    assert_eq!(c.body["charged"]["cost_micros"], 2_500);
    assert_eq!(spent(&s, "u").await, 15_000);
    s.stop().await;
}

fn compile_err(text: &str) -> (String, String) {
    let e = Config::from_toml(text, "q.toml")
        .and_then(|c| Policy::from_config(&c).map(|_| ()))
        .unwrap_err();
    (e.key, e.message)
}

#[test]
fn bad_price_tables_are_refused_naming_the_key() {
    let base = "metrics = [\"tokens\"]\n[pricing]\ncurrency = \"USD\"\n";
    let cases = [
        ("[[pricing.prices]]\nname=\"a\"\ntokens = \"2,50/1M\"\n", "pricing.prices[0].tokens", "not a price"),
        ("[[pricing.prices]]\nname=\"a\"\ntokens = \"1/0\"\n", "pricing.prices[0].tokens", "not a price"),
        ("[[pricing.prices]]\nname=\"a\"\ntokens = 0.05\n", "pricing.prices[0].tokens", "string"),
        ("[[pricing.prices]]\nname=\"a\"\ntokenz = \"1\"\n", "pricing.prices[0].tokenz", "typo"),
        ("[[pricing.prices]]\nname=\"a\"\ncost_micros = \"1\"\n", "pricing.prices[0].cost_micros", "cost metric"),
        ("[[pricing.prices]]\nname=\"a\"\nmatch = {}\ntokens = \"1\"\n", "pricing.prices[0].match", "empty"),
        (
            "[[pricing.prices]]\nname=\"a\"\nmatch = { event = \"\" }\ntokens = \"1\"\n",
            "pricing.prices[0].match.event",
            "glob",
        ),
        ("[[pricing.prices]]\nname=\"a\"\n", "pricing.prices[0]", "names no metric"),
        (
            "[[pricing.prices]]\nname=\"a\"\ntokens = \"1\"\n[[pricing.prices]]\nname=\"b\"\nmatch = { event = \"x\" }\ntokens = \"1\"\n",
            "pricing.prices[1]",
            "can never be used",
        ),
        (
            "[[pricing.prices]]\nname=\"a\"\nmatch = { event = \"x\" }\ntokens = \"1\"\n[[pricing.prices]]\nname=\"a\"\ntokens = \"1\"\n",
            "pricing.prices[1].name",
            "already",
        ),
    ];
    for (prices, key, words) in cases {
        let (k, m) = compile_err(&format!("{base}{prices}"));
        assert_eq!(k, key, "{prices}: {m}");
        assert!(m.contains(words), "{prices}: {m}");
    }
    let (k, m) = compile_err("[pricing]\ncurrency = \"dollars\"\n[[pricing.prices]]\nname=\"a\"\nrequests = \"1\"\n");
    assert_eq!(k, "pricing.currency", "{m}");
    let (k, _) = compile_err("[pricing]\ncurrency = \"USD\"\n");
    assert_eq!(k, "pricing.prices");
    let (k, _) = compile_err(
        "[pricing]\ncurrency = \"USD\"\nmetric = \"requests\"\n[[pricing.prices]]\nname=\"a\"\nrequests = \"1\"\n",
    );
    assert_eq!(k, "pricing.metric");
    let (k, m) = compile_err("[pricing]\ncurrency = \"USD\"\nunpriced = \"free\"\n");
    assert_eq!(k, "parse");
    assert!(m.contains("unpriced"), "{m}");
}
