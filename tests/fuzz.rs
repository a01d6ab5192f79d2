//! Fuzzing with proptest: random and mangled request bodies against every
//! endpoint that reads one (never a 5xx, never a crash, always the error
//! shape), and random and bit-flipped bytes into the WAL record, snapshot
//! shard and stored-answer decoders (an error or a value, never a panic).
//! CI runs the default case counts; `QUOTAD_FUZZ_CASES=100000 cargo test
//! --release --test fuzz -- --nocapture` runs a longer search.

mod common;

use std::collections::BTreeMap;

use common::{TestServer, Transport};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use quotad::engine::{
    CounterKey, DecideOp, DecisionRequest, Engine, Mutation, PackedAnswer, Policy, ScopeKey, Shard, Slot,
};
use quotad::storage::codec;
use serde_json::{json, Value};

fn cases(default: u32) -> u32 {
    std::env::var("QUOTAD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const CONFIG: &str = r#"
metrics = ["input_tokens"]
[pricing]
currency = "USD"
[[pricing.prices]]
name = "m"
match = { event = "llm.*" }
tokens = "2.50/1M"
[[limits]]
name = "g"
metric = "tokens"
scope = "attribute:model"
period = "1h"
max = 1000000
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "d"
  metric = "tokens"
  period = "1d"
  max = 100000
  [[plans.limits]]
  name = "b"
  algorithm = "token_bucket"
  max = 50
  period = "1m"
  [[plans.limits]]
  name = "life"
  algorithm = "lifetime"
  max = 10
  match = { event = "img" }
[[plans]]
name = "pro"
"#;

const FIELDS: &[&str] = &[
    "subject",
    "event",
    "attributes",
    "amounts",
    "idempotency_key",
    "ttl_ms",
    "op",
    "operations",
    "reservation_id",
    "plan",
    "overrides",
    "limit",
    "amount",
    "tokens",
    "model",
    "max",
    "cost_micros",
];

/// Any JSON value, biased towards the shapes and names the API uses.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![
            Just(9_007_199_254_740_991u64),
            Just(9_007_199_254_740_992u64),
            Just(0u64)
        ]
        .prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[a-z:.*_\\-]{0,12}".prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        "\\PC{0,300}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (prop::sample::select(FIELDS).prop_map(str::to_string), inner.clone()),
                0..6
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            prop::collection::vec(("\\PC{0,20}", inner), 0..4).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A request body: raw bytes, any JSON, a plausible decision with odd values,
/// or a valid body followed by junk.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        (
            "[a-z:0-9]{1,10}",
            prop::option::of(prop::sample::select(&["llm.chat", "img", "other"][..])),
            prop::collection::btree_map(
                prop::sample::select(&["tokens", "requests", "input_tokens", "cost_micros", "bogus"][..]),
                any::<u64>(),
                0..4
            ),
            prop::option::of(json_value()),
        )
            .prop_map(|(s, e, amounts, extra)| {
                let mut v = json!({"subject": s, "amounts": amounts, "attributes": {"model": "gpt-4o"}});
                if let Some(e) = e {
                    v["event"] = json!(e);
                }
                if let Some(x) = extra {
                    v["ttl_ms"] = x;
                }
                v.to_string().into_bytes()
            }),
        ("\\PC{0,40}", prop::collection::vec(any::<u8>(), 1..20)).prop_map(|(s, junk)| {
            let mut b = json!({"subject": s}).to_string().into_bytes();
            b.extend(junk);
            b
        }),
    ]
}

const ENDPOINTS: &[(&str, &str)] = &[
    ("POST", "/v1/check"),
    ("POST", "/v1/consume"),
    ("POST", "/v1/reserve"),
    ("POST", "/v1/batch"),
    ("POST", "/v1/reservations/rsv_x/commit"),
    ("POST", "/v1/reservations/rsv_x/release"),
    ("PUT", "/v1/subjects/fuzz"),
    ("POST", "/v1/subjects/fuzz/reset"),
    ("POST", "/v1/subjects/fuzz/credit"),
];

#[test]
fn random_request_bodies_get_a_clear_answer_never_a_server_error() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(TestServer::start_in_memory(CONFIG, Transport::Tcp, common::T0));
    // TestRunner::run takes an Fn: the connection and tallies live in cells.
    let conn = std::cell::RefCell::new(rt.block_on(s.connect()));
    let n = cases(1500);
    let mut runner = TestRunner::new(RunnerConfig {
        cases: n,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let statuses: std::cell::RefCell<BTreeMap<u16, u64>> = Default::default();
    runner
        .run(&(prop::sample::select(ENDPOINTS), body()), |((method, path), bytes)| {
            let text = String::from_utf8_lossy(&bytes).to_string();
            let r = rt.block_on(conn.borrow_mut().req(method, path, Some(&text), &[]));
            *statuses.borrow_mut().entry(r.status).or_default() += 1;
            prop_assert!(
                matches!(r.status, 200 | 400 | 404 | 409 | 413),
                "{method} {path} {text:?} -> {} {}",
                r.status,
                r.text
            );
            if r.status != 200 {
                prop_assert!(r.body["error"]["code"].is_string(), "{}", r.text);
                let msg = r.body["error"]["message"].as_str().unwrap_or("");
                prop_assert!(!msg.is_empty(), "{}", r.text);
                for rust in ["u64", "i64", "struct ", "Option<", "Vec<", "BTreeMap"] {
                    prop_assert!(!msg.contains(rust), "a Rust type name in {msg:?} for {text:?}");
                }
            }
            Ok(())
        })
        .unwrap();
    println!("request fuzz: {n} cases, statuses {:?}", statuses.borrow());
    let r = rt.block_on(s.get("/healthz"));
    assert_eq!(r.status, 200);
    rt.block_on(s.stop());
}

/// Valid encodings to mangle: a record of every mutation kind, a shard, an answer.
fn samples() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let config = quotad::config::Config::from_toml(CONFIG, "f.toml").unwrap();
    let journal = std::sync::Arc::new(quotad::journal::MemoryJournal::default());
    let e = Engine::new(Policy::from_config(&config).unwrap(), journal.clone());
    let req = |ttl: Option<u64>, key: &str| DecisionRequest {
        subject: "u".into(),
        event: Some("llm.chat".into()),
        attributes: BTreeMap::from([("model".to_string(), "gpt-4o".to_string())]),
        amounts: BTreeMap::from([("tokens".to_string(), 100)]),
        idempotency_key: Some(key.into()),
        ttl_ms: ttl,
        priority: None,
    };
    let d = e
        .decide(DecideOp::Reserve, &req(Some(1000), "k1"), common::T0)
        .unwrap()
        .value;
    e.decide(DecideOp::Consume, &req(None, "k2"), common::T0).unwrap();
    e.credit("u", "life", 3, Some("c"), common::T0).unwrap();
    let mut muts: Vec<Mutation> = journal.records().into_iter().flat_map(|(_, _, m)| m).collect();
    muts.push(Mutation::ResetCounter {
        counter: CounterKey {
            limit: "d".into(),
            scope: ScopeKey::Global,
        },
    });
    muts.push(Mutation::Charge {
        counter: CounterKey {
            limit: "b".into(),
            scope: ScopeKey::Subject("u".into()),
        },
        slot: Slot::Bucket {
            period_ms: 60_000,
            refill: 50,
        },
        delta: -1,
        at_ms: 1,
    });
    let mut record = Vec::new();
    codec::encode_record(common::T0, &muts, &mut record).unwrap();
    let mut shard = None;
    e.for_each_shard(|_, s| -> Result<(), ()> {
        if !s.idempotency.is_empty() && shard.is_none() {
            shard = Some(codec::encode_shard(s).unwrap());
        }
        Ok(())
    })
    .unwrap();
    let answer = PackedAnswer::decision(&d).as_bytes().to_vec();
    (
        record,
        shard.unwrap_or_else(|| codec::encode_shard(&Shard::default()).unwrap()),
        answer,
    )
}

#[test]
fn the_storage_decoders_never_panic_on_damaged_bytes() {
    let (record, shard, answer) = samples();
    assert!(codec::decode_record(codec::FORMAT_VERSION, &record).is_ok());
    let n = cases(3000);
    let mut runner = TestRunner::new(RunnerConfig {
        cases: n,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let input = prop_oneof![
        // Random bytes.
        prop::collection::vec(any::<u8>(), 0..300).prop_map(|b| (0usize, b)),
        // A valid encoding with flipped bits, cut short, or grown.
        (
            0usize..3,
            prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..4),
            any::<prop::sample::Index>(),
            0u8..3
        )
            .prop_map(move |(which, flips, cut, how)| {
                let mut b = [&record, &shard, &answer][which].clone();
                for (at, bit) in flips {
                    let i = at.index(b.len());
                    b[i] ^= 1 << bit;
                }
                match how {
                    0 => b.truncate(cut.index(b.len())),
                    1 => b.extend_from_slice(&[0xff; 9]),
                    _ => {}
                }
                (which, b)
            }),
    ];
    let ok: [std::cell::Cell<u64>; 3] = Default::default();
    runner
        .run(&input, |(_, bytes)| {
            let count = |i: usize, yes: bool| ok[i].set(ok[i].get() + u64::from(yes));
            for version in [1, 2] {
                count(0, codec::decode_record(version, &bytes).is_ok());
                count(1, codec::decode_shard(version, &bytes).is_ok());
            }
            count(2, PackedAnswer::from_bytes(bytes).is_ok());
            Ok(())
        })
        .unwrap();
    println!(
        "decoder fuzz: {n} inputs, each through the record, shard and answer decoders of both versions; \
         decoded without error: {:?} (the rest were refused); no panic",
        ok.iter().map(|c| c.get()).collect::<Vec<_>>()
    );
}

/// The checked values of the snapshot file's event and usage tables: a
/// sealed value with bits flipped is always refused (CRC-32 finds every
/// error of up to three bits in values this short), one cut short or grown
/// is refused or decodes, and nothing panics.
#[test]
fn stored_event_and_usage_values_refuse_damage() {
    use quotad::storage::snapshot::{open_event, open_usage, seal_event, seal_usage};
    let amounts = BTreeMap::from([("requests".to_string(), 3u64), ("tokens".to_string(), 3600)]);
    let usage = seal_usage("user:42", common::T0, &amounts);
    assert_eq!(
        open_usage("usage_hours", "user:42", common::T0, &usage).unwrap(),
        amounts
    );
    let mut event = Vec::new();
    let json = br#"{"id":"evt_7","seq":7,"type":"threshold.crossed","used":80100}"#;
    seal_event(7, common::T0, json, &mut event);
    assert_eq!(open_event(7, &event).unwrap(), (common::T0, &json[..]));
    // A value stored under another key is refused as well.
    assert!(open_usage("usage_hours", "user:43", common::T0, &usage).is_err());
    assert!(open_event(8, &event).is_err());

    let n = cases(3000);
    let mut runner = TestRunner::new(RunnerConfig {
        cases: n,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let input = (
        any::<bool>(),
        prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 0..4),
        any::<prop::sample::Index>(),
        0u8..3,
    );
    let (refused, flipped) = (std::cell::Cell::new(0u64), std::cell::Cell::new(0u64));
    runner
        .run(&input, |(is_event, flips, cut, how)| {
            let original = if is_event { &event } else { &usage };
            let mut b = original.clone();
            for (at, bit) in &flips {
                let i = at.index(b.len());
                b[i] ^= 1 << bit;
            }
            let reshaped = match how {
                0 if !b.is_empty() => {
                    b.truncate(cut.index(b.len()));
                    true
                }
                1 => {
                    b.extend_from_slice(&[0xff; 9]);
                    true
                }
                _ => false,
            };
            let ok = if is_event {
                open_event(7, &b).is_ok()
            } else {
                open_usage("usage_hours", "user:42", common::T0, &b).is_ok()
            };
            refused.set(refused.get() + u64::from(!ok));
            if !reshaped {
                flipped.set(flipped.get() + 1);
                prop_assert_eq!(ok, &b == original, "a flipped value passed its check");
            }
            Ok(())
        })
        .unwrap();
    println!(
        "stored value fuzz: {n} inputs ({} with flips alone), {} refused; no flipped value passed, no panic",
        flipped.get(),
        refused.get()
    );
}
