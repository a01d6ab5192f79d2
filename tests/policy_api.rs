//! Policy as data over HTTP: `GET|PUT /v1/policy`, the version history,
//! `GET|PUT|DELETE /v1/plans/{name}` and `/v1/limits/{name}`, with live
//! counters (kept on a `max` change, afresh on a period change, dropped on
//! removal), `If-Match`, validation naming the path with nothing changed,
//! `plan_in_use`, idempotent repeats, auth and actors, events, both policy
//! sources, and durability (restart, replay after snapshots, kill -9 of the
//! real binary after a 200).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Resp, TestServer, Transport, T0, TRANSPORTS};
use serde_json::{json, Value};

const POLICY: &str = r#"
[[limits]]
name = "global-tokens"
metric = "tokens"
scope = "global"
period = "1d"
max = 1000000

[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "per-day"
  period = "1d"
  max = 10
  [[plans.limits]]
  name = "burst"
  algorithm = "token_bucket"
  max = 100
  refill = 100
  period = "1m"
"#;

fn api_config() -> String {
    format!("[policy]\nsource = \"api\"\n{POLICY}")
}

async fn consume(s: &TestServer, subject: &str) -> Resp {
    let r = s.consume(json!({"subject": subject, "amounts": {"tokens": 5}})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r
}

async fn put_with(s: &TestServer, path: &str, body: &Value, headers: &[(&str, &str)]) -> Resp {
    s.req("PUT", path, Some(&body.to_string()), headers).await
}

async fn version(s: &TestServer) -> u64 {
    let r = s.get("/v1/policy").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("etag"), Some(format!("\"{}\"", r.body["version"])));
    r.body["version"].as_u64().unwrap()
}

fn resets(r: &Resp) -> Vec<(String, String)> {
    r.body["counters_reset"]
        .as_array()
        .unwrap_or_else(|| panic!("no counters_reset: {}", r.text))
        .iter()
        .map(|c| {
            (
                c["limit"].as_str().unwrap().into(),
                c["reason"].as_str().unwrap().into(),
            )
        })
        .collect()
}

#[tokio::test]
async fn plans_and_limits_change_through_the_api_with_live_counters() {
    for transport in TRANSPORTS {
        let s = TestServer::start(&api_config(), transport).await;
        // The file seeded version 1.
        let v1 = s.get("/v1/policy").await;
        assert_eq!(v1.status, 200, "{}", v1.text);
        assert_eq!(
            (v1.body["version"].as_u64(), v1.body["actor"].as_str()),
            (Some(1), Some("file"))
        );
        assert_eq!(v1.header("etag").as_deref(), Some("\"1\""));
        assert_eq!(v1.body["policy"]["plans"][0]["limits"][0]["name"], "per-day");
        for _ in 0..3 {
            consume(&s, "u").await;
        }

        // A raised max keeps the usage.
        let mut free = s.get("/v1/plans/free").await.body;
        free["limits"][0]["max"] = json!(20);
        let r = s.put("/v1/plans/free", free.clone()).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            (r.body["version"].as_u64(), r.body["previous_version"].as_u64()),
            (Some(2), Some(1))
        );
        assert_eq!(r.header("etag").as_deref(), Some("\"2\""));
        assert_eq!(resets(&r), []);
        assert_eq!(r.body["plan"]["limits"][0]["max"], 20);
        let c = consume(&s, "u").await;
        assert_eq!((c.used("per-day"), c.counter("per-day")["max"].as_u64()), (4, Some(20)));

        // A changed period starts afresh, and says so.
        free["limits"][0]["period"] = json!("1h");
        let r = s.put("/v1/plans/free", free.clone()).await;
        assert_eq!(resets(&r), [("per-day".to_string(), "period 1d -> 1h".to_string())]);
        let c = consume(&s, "u").await;
        assert_eq!(c.used("per-day"), 1, "{}", c.text);
        assert_eq!(c.used("global-tokens"), 25, "other counters kept");

        // A removed limit's counters are dropped.
        free["limits"].as_array_mut().unwrap().remove(1);
        let r = s.put("/v1/plans/free", free.clone()).await;
        assert_eq!(resets(&r), [("burst".to_string(), "removed".to_string())]);
        let view = s.get("/v1/subjects/u").await;
        assert!(!view.text.contains("\"burst\""), "{}", view.text);

        // Top-level limits: create, raise, remove.
        let r = s
            .put(
                "/v1/limits/calls-per-hour",
                json!({"scope": "global", "period": "1h", "max": 100}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["limit"]["name"], "calls-per-hour");
        assert_eq!(consume(&s, "v").await.used("calls-per-hour"), 1);
        let r = s
            .put(
                "/v1/limits/calls-per-hour",
                json!({"scope": "global", "period": "1h", "max": 200}),
            )
            .await;
        assert_eq!(resets(&r), []);
        let c = consume(&s, "v").await;
        assert_eq!(
            (c.used("calls-per-hour"), c.counter("calls-per-hour")["max"].as_u64()),
            (2, Some(200))
        );
        let got = s.get("/v1/limits/calls-per-hour").await;
        assert_eq!((got.status, got.body["max"].as_u64()), (200, Some(200)));
        let r = s.req("DELETE", "/v1/limits/calls-per-hour", None, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(resets(&r), [("calls-per-hour".to_string(), "removed".to_string())]);
        assert!(r.body.get("limit").is_none(), "{}", r.text);
        let gone = s.get("/v1/limits/calls-per-hour").await;
        assert_eq!((gone.status, gone.error_code()), (404, "unknown_limit"));
        assert!(!consume(&s, "v").await.text.contains("calls-per-hour"));

        // A new plan, a subject on it, and its removal refused while in use.
        let r = s
            .put(
                "/v1/plans/team",
                json!({"limits": [{"name": "team-day", "period": "1d", "max": 1000}]}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let a = s.put("/v1/subjects/acme", json!({"plan": "team"})).await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(consume(&s, "acme").await.used("team-day"), 1);
        let before = version(&s).await;
        let r = s.req("DELETE", "/v1/plans/team", None, &[]).await;
        assert_eq!((r.status, r.error_code()), (409, "plan_in_use"), "{}", r.text);
        assert!(r.text.contains("1 subject"), "{}", r.text);
        let r = s.req("DELETE", "/v1/plans/free", None, &[]).await;
        assert_eq!((r.status, r.error_code()), (409, "plan_in_use"), "{}", r.text);
        assert!(r.text.contains("default"), "{}", r.text);
        // Replacing the whole policy without the plan is refused the same way.
        let mut doc = s.get("/v1/policy").await.body["policy"].clone();
        doc["plans"].as_array_mut().unwrap().retain(|p| p["name"] != "team");
        let r = s.put("/v1/policy", json!({"policy": doc})).await;
        assert_eq!((r.status, r.error_code()), (409, "plan_in_use"), "{}", r.text);
        assert_eq!(version(&s).await, before, "nothing changed");
        // Once the subject moves, the plan goes.
        assert_eq!(s.put("/v1/subjects/acme", json!({"plan": "free"})).await.status, 200);
        let r = s.req("DELETE", "/v1/plans/team", None, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(resets(&r), [("team-day".to_string(), "removed".to_string())]);

        // The history, newest first, and an earlier version read back.
        let now = version(&s).await;
        let list = s.get("/v1/policy/versions").await;
        let versions: Vec<u64> = list
            .body
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["version"].as_u64().unwrap())
            .collect();
        assert_eq!(versions, (1..=now).rev().collect::<Vec<_>>());
        assert!(list
            .body
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["changed_at"].is_string()));
        let old = s.get("/v1/policy?version=1").await;
        assert_eq!(old.body["policy"], v1.body["policy"]);
        assert_eq!(old.header("etag").as_deref(), Some("\"1\""));
        let none = s.get("/v1/policy?version=999").await;
        assert_eq!((none.status, none.error_code()), (404, "unknown_version"));

        // Every change after the first is a policy.changed event.
        let ev = s.get("/v1/events?type=policy.changed").await;
        let evs = ev.body["events"].as_array().unwrap();
        assert_eq!(evs.len() as u64, now - 1, "{}", ev.text);
        assert_eq!(
            (
                evs[0]["version"].as_u64(),
                evs[0]["previous_version"].as_u64(),
                evs[0]["actor"].as_str()
            ),
            (Some(2), Some(1), Some("api"))
        );
        s.stop().await;
    }
}

#[tokio::test]
async fn a_stale_if_match_is_412_and_changes_nothing() {
    let s = TestServer::start(&api_config(), Transport::Tcp).await;
    let plan = json!({"limits": [{"name": "d", "period": "1d", "max": 5}]});
    let r = put_with(&s, "/v1/plans/a", &plan, &[("if-match", "\"1\"")]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    for stale in ["\"1\"", "1", "W/\"1\""] {
        let r = put_with(&s, "/v1/plans/b", &plan, &[("if-match", stale)]).await;
        assert_eq!((r.status, r.error_code()), (412, "version_mismatch"), "{}", r.text);
        assert!(r.text.contains("version 2"), "{}", r.text);
    }
    let r = s.req("DELETE", "/v1/plans/a", None, &[("if-match", "\"7\"")]).await;
    assert_eq!(r.status, 412, "{}", r.text);
    assert_eq!(s.get("/v1/plans/b").await.status, 404);
    assert_eq!(s.get("/v1/plans/a").await.status, 200);
    assert_eq!(version(&s).await, 2);
    // The current version, or *, passes.
    let r = put_with(&s, "/v1/plans/b", &plan, &[("if-match", "\"2\"")]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = put_with(&s, "/v1/plans/c", &plan, &[("if-match", "*")]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = put_with(&s, "/v1/plans/d", &plan, &[("if-match", "seven")]).await;
    assert_eq!((r.status, r.error_code()), (400, "invalid_request"), "{}", r.text);
    assert!(r.text.contains("If-Match"), "{}", r.text);
    s.stop().await;
}

#[tokio::test]
async fn an_invalid_policy_is_400_naming_the_path_and_nothing_changes() {
    let s = TestServer::start(&api_config(), Transport::Unix).await;
    consume(&s, "u").await;
    let before_policy = s.get("/v1/policy").await.body;
    let plan = |limits: Value| json!({"policy": {"plans": [{"name": "x", "default": true, "limits": limits}]}});
    let cases: Vec<(&str, String, &str, &str)> = vec![
        // (path, body, code, what the message names)
        ("/v1/policy", "{\"policy\":".into(), "invalid_request", "JSON"),
        (
            "/v1/policy",
            plan(json!([{"name": "a", "max": true}])).to_string(),
            "invalid_policy",
            "plans[0].limits[0].max: ",
        ),
        (
            "/v1/policy",
            plan(json!([{"name": "a", "max": -1}])).to_string(),
            "invalid_policy",
            "plans[0].limits[0].max: ",
        ),
        (
            "/v1/policy",
            plan(json!([{"name": "a", "max": 1, "period": "1x"}])).to_string(),
            "invalid_policy",
            "plans[0].limits[0].period: ",
        ),
        (
            "/v1/policy",
            plan(json!([{"name": "a", "max": 1, "period": "1d", "colour": "red"}])).to_string(),
            "invalid_policy",
            "plans[0].limits[0].colour: ",
        ),
        (
            "/v1/policy",
            plan(json!([{"name": "a", "max": 1, "period": "1d", "algorithm": "hourly"}])).to_string(),
            "invalid_policy",
            "plans[0].limits[0].algorithm: ",
        ),
        (
            "/v1/policy",
            json!({"policy": {"plans": [{"name": "x", "default": true}, {"name": "x"}]}}).to_string(),
            "invalid_policy",
            "plans[1].name: ",
        ),
        (
            "/v1/policy",
            json!({"policy": {"plans": [{"name": "x", "default": true}, {"name": "y", "default": true}]}}).to_string(),
            "invalid_policy",
            "plans[1].default: ",
        ),
        (
            "/v1/policy",
            json!({"policy": {"limits": [{"name": "g", "max": 1, "period": "1d", "scope": "attribute:"}]}}).to_string(),
            "invalid_policy",
            "limits[0].scope: ",
        ),
        (
            "/v1/policy",
            json!({"policy": {"pricing": {"currency": "USD", "prices": [{"name": "p", "requests": "abc"}]}}})
                .to_string(),
            "invalid_policy",
            "pricing.prices[0].requests: ",
        ),
        (
            "/v1/policy",
            json!({"policy": {"breakers": [{"name": "b", "window": "10m", "ratio": 3.0}]}}).to_string(),
            "invalid_policy",
            "breakers[0].baseline: ",
        ),
        (
            "/v1/policy",
            json!({"plans": []}).to_string(),
            "invalid_policy",
            "plans: unknown field",
        ),
        ("/v1/policy", "{}".into(), "invalid_policy", "policy: is required"),
        // One plan or limit: paths relative to the body.
        (
            "/v1/plans/free",
            json!({"name": "other"}).to_string(),
            "invalid_policy",
            "name: ",
        ),
        (
            "/v1/plans/free",
            json!({"default": true, "limits": [{"name": "a", "max": 1, "period": "zz"}]}).to_string(),
            "invalid_policy",
            "limits[0].period: ",
        ),
        (
            "/v1/limits/g",
            json!({"max": 1, "period": "zz"}).to_string(),
            "invalid_policy",
            "period: ",
        ),
        (
            "/v1/limits/g",
            json!({"period": "1d"}).to_string(),
            "invalid_policy",
            "max",
        ),
        (
            "/v1/limits/g",
            json!({"max": 1, "period": "1d", "mode": "loud"}).to_string(),
            "invalid_policy",
            "mode: ",
        ),
    ];
    for (path, body, code, names) in cases {
        let r = s.req("PUT", path, Some(&body), &[]).await;
        assert_eq!((r.status, r.error_code()), (400, code), "{path} {body}: {}", r.text);
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(names),
            "{path} {body}: the message names {names:?}: {message}"
        );
        assert!(!message.contains("::"), "no Rust type names: {message}");
    }
    let after = s.get("/v1/policy").await.body;
    assert_eq!(after, before_policy, "nothing changed");
    assert_eq!(consume(&s, "u").await.used("per-day"), 2, "counters kept");
    s.stop().await;
}

#[tokio::test]
async fn idempotent_repeats_answer_the_first_change() {
    let s = TestServer::start(&api_config(), Transport::Tcp).await;
    let plan = json!({"limits": [{"name": "d", "period": "1d", "max": 5}]});
    let key = [("idempotency-key", "contract-42")];
    let first = put_with(&s, "/v1/plans/contract-42", &plan, &key).await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(first.header("idempotent-replayed"), None);
    // Another change in between: the repeat still answers the first one.
    let other = s.put("/v1/plans/other", plan.clone()).await;
    assert_eq!(other.body["version"], 3);
    let again = put_with(&s, "/v1/plans/contract-42", &plan, &key).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(again.body["version"], first.body["version"]);
    assert_eq!(version(&s).await, 3, "the repeat wrote nothing");
    // The same key with another request is a conflict.
    let changed = json!({"limits": [{"name": "d", "period": "1d", "max": 6}]});
    let r = put_with(&s, "/v1/plans/contract-42", &changed, &key).await;
    assert_eq!((r.status, r.error_code()), (409, "idempotency_conflict"), "{}", r.text);
    // A delete repeated with its key is answered once, the same way.
    let del = [("idempotency-key", "drop-other")];
    let d1 = s.req("DELETE", "/v1/plans/other", None, &del).await;
    let d2 = s.req("DELETE", "/v1/plans/other", None, &del).await;
    assert_eq!((d1.status, d2.status), (200, 200), "{} {}", d1.text, d2.text);
    assert_eq!(d1.body, d2.body);
    assert_eq!(resets(&d2), [], "plan contract-42 still has a limit named d");
    assert_eq!(version(&s).await, 4);
    // Writing what is already in force makes no version and no event.
    let same = s.put("/v1/plans/contract-42", plan.clone()).await;
    assert_eq!(same.status, 200, "{}", same.text);
    assert_eq!(
        (same.body["version"].as_u64(), same.body["previous_version"].as_u64()),
        (Some(4), Some(4))
    );
    let whole = s.get("/v1/policy").await.body["policy"].clone();
    let r = put_with(
        &s,
        "/v1/policy",
        &json!({"policy": whole}),
        &[("idempotency-key", "noop")],
    )
    .await;
    assert_eq!((r.status, r.body["version"].as_u64()), (200, Some(4)), "{}", r.text);
    assert_eq!(version(&s).await, 4);
    let ev = s.get("/v1/events?type=policy.changed").await;
    assert_eq!(ev.body["events"].as_array().unwrap().len(), 3, "{}", ev.text);
    // ...and its key still answers it after a later change.
    assert_eq!(s.put("/v1/plans/later", plan.clone()).await.body["version"], 5);
    let again = put_with(
        &s,
        "/v1/policy",
        &json!({"policy": whole}),
        &[("idempotency-key", "noop")],
    )
    .await;
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(again.body["version"], 4);
    assert_eq!(
        s.get("/v1/plans/later").await.status,
        200,
        "the repeat did not undo the later change"
    );
    s.stop().await;
}

const AUTH: &str = r#"
[[auth.tokens]]
name = "web-app"
role = "client"
token = "client-token-0123456789"
[[auth.tokens]]
name = "billing"
role = "admin"
token = "billing-token-0123456789"
"#;

#[tokio::test]
async fn writes_need_an_admin_token_and_name_it_as_the_actor() {
    let s = TestServer::start(&format!("{AUTH}{}", api_config()), Transport::Unix).await;
    let client = [("authorization", "Bearer client-token-0123456789")];
    let admin = [("authorization", "Bearer billing-token-0123456789")];
    let plan = json!({"limits": [{"name": "d", "period": "1d", "max": 5}]}).to_string();
    assert_eq!(s.req("PUT", "/v1/plans/p", Some(&plan), &[]).await.status, 401);
    let r = s.req("PUT", "/v1/plans/p", Some(&plan), &client).await;
    assert_eq!((r.status, r.error_code()), (403, "forbidden"), "{}", r.text);
    assert_eq!(s.req("GET", "/v1/policy", None, &client).await.status, 403);
    assert_eq!(s.req("GET", "/v1/policy/versions", None, &client).await.status, 403);
    assert_eq!(s.req("DELETE", "/v1/plans/free", None, &client).await.status, 403);
    // A client reads one plan (as it reads /v1/plans).
    assert_eq!(s.req("GET", "/v1/plans/free", None, &client).await.status, 200);
    let r = s.req("PUT", "/v1/plans/p", Some(&plan), &admin).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["actor"], "billing");
    let versions = s.req("GET", "/v1/policy/versions", None, &admin).await;
    assert_eq!(versions.body[0]["actor"], "billing");
    assert_eq!(versions.body[1]["actor"], "file");
    let ev = s.req("GET", "/v1/events?type=policy.changed", None, &admin).await;
    assert_eq!(ev.body["events"][0]["actor"], "billing", "{}", ev.text);
    s.stop().await;
}

#[tokio::test]
async fn with_the_file_as_source_writes_are_refused_and_reload_makes_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quotad.toml");
    std::fs::write(&path, POLICY).unwrap();
    let s = TestServer::start_file(&path, Transport::Tcp).await;
    assert_eq!(version(&s).await, 1);
    for (method, p) in [
        ("PUT", "/v1/plans/x"),
        ("DELETE", "/v1/plans/free"),
        ("PUT", "/v1/limits/g"),
        ("PUT", "/v1/policy"),
    ] {
        let r = s.req(method, p, Some("{}"), &[]).await;
        assert_eq!(
            (r.status, r.error_code()),
            (409, "policy_from_file"),
            "{method} {p}: {}",
            r.text
        );
        assert!(r.text.contains("reload"), "{}", r.text);
    }
    consume(&s, "u").await;
    // An unchanged file makes no version.
    assert_eq!(s.post("/v1/admin/reload", json!(null)).await.status, 200);
    assert_eq!(version(&s).await, 1);
    // A changed file does, by "file", with the same counter rules.
    std::fs::write(&path, POLICY.replace("max = 10\n", "max = 30\n")).unwrap();
    let r = s.req("POST", "/v1/admin/reload", None, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(version(&s).await, 2);
    let versions = s.get("/v1/policy/versions").await;
    assert_eq!(versions.body[0]["actor"], "file");
    let c = consume(&s, "u").await;
    assert_eq!((c.used("per-day"), c.counter("per-day")["max"].as_u64()), (2, Some(30)));
    let ev = s.get("/v1/events?type=policy.changed").await;
    assert_eq!(ev.body["events"][0]["actor"], "file", "{}", ev.text);
    s.stop().await;
}

#[tokio::test]
async fn api_policy_survives_restarts_and_a_changed_file_is_ignored() {
    let data = tempfile::tempdir().unwrap();
    let s = TestServer::start_durable(&api_config(), Transport::Tcp, T0, data.path()).await;
    let r = s
        .put(
            "/v1/plans/pro",
            json!({"limits": [{"name": "per-day", "period": "1d", "max": 1000}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(s.put("/v1/subjects/p1", json!({"plan": "pro"})).await.status, 200);
    consume(&s, "p1").await;
    s.stop().await;
    // The file now says something else: the stored policy stays in force.
    let edited = api_config().replace("max = 10\n", "max = 99\n");
    let s = TestServer::start_durable(&edited, Transport::Tcp, T0, data.path()).await;
    assert_eq!(version(&s).await, 2);
    assert_eq!(s.get("/v1/plans/free").await.body["limits"][0]["max"], 10);
    let c = consume(&s, "p1").await;
    assert_eq!(
        (c.used("per-day"), c.counter("per-day")["max"].as_u64()),
        (2, Some(1000))
    );
    s.stop().await;
}

/// Replay after snapshots: versions before a snapshot come from it, later
/// ones from the log, and the counters they dropped stay dropped.
#[test]
fn versions_and_dropped_counters_replay_after_snapshots() {
    use quotad::config::Config;
    use quotad::engine::{DecideOp, DecisionRequest, Policy, PolicyRequest};
    use quotad::storage::Storage;
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config::from_toml(&api_config(), "t.toml").unwrap();
    c.storage.data_dir = dir.path().to_path_buf();
    let open = || Storage::open(&c.storage, Policy::from_config(&c).unwrap(), Default::default()).unwrap();
    let req = DecisionRequest {
        subject: "u".into(),
        event: None,
        attributes: Default::default(),
        amounts: [("tokens".to_string(), 5)].into(),
        idempotency_key: None,
        ttl_ms: None,
        priority: None,
    };
    let mut doc = c.policy_doc();
    {
        let (engine, storage, _) = open();
        let wait = |lsn: Option<u64>| storage.journal().wait_durable_blocking(lsn.unwrap()).unwrap();
        wait(quotad::api::policy::adopt_at_start(&engine, &c, T0).unwrap());
        let change = |doc: &quotad::engine::policy::PolicyDoc, at: u64| {
            let a = engine
                .change_policy(
                    PolicyRequest {
                        doc,
                        compiled: Policy::compile(doc, &c).unwrap(),
                        actor: "test",
                        if_version: None,
                        idempotency: None,
                        refuse_plans_in_use: true,
                        skip_if_same: false,
                    },
                    at,
                )
                .unwrap();
            wait(a.lsn);
            a.value
        };
        for _ in 0..3 {
            wait(engine.decide(DecideOp::Consume, &req, T0).unwrap().lsn);
        }
        // v2 (before the first snapshot): per-day's max raised, usage kept.
        doc.plans[0].limits[0].max = quotad::engine::policy::MaxValue::Finite(50);
        assert!(change(&doc, T0 + 1).dropped.is_empty());
        storage.snapshot(&engine, T0 + 2).unwrap();
        // v3 (between snapshots): burst removed.
        doc.plans[0].limits.remove(1);
        assert_eq!(change(&doc, T0 + 3).dropped.len(), 1);
        wait(engine.decide(DecideOp::Consume, &req, T0 + 4).unwrap().lsn);
        storage.snapshot(&engine, T0 + 5).unwrap();
        // v4 (only in the log): per-day's period changed, so it starts afresh.
        doc.plans[0].limits[0].period = Some("12h".into());
        assert_eq!(change(&doc, T0 + 6).dropped.len(), 1);
        wait(engine.decide(DecideOp::Consume, &req, T0 + 7).unwrap().lsn);
        // A crash: no final snapshot.
    }
    let (engine, _storage, report) = open();
    assert!(report.snapshot_loaded, "{report:?}");
    let log = engine.policy_log();
    let versions: Vec<(u64, &str)> = log.versions.iter().map(|v| (v.version, v.actor.as_str())).collect();
    assert_eq!(versions, [(1, "file"), (2, "test"), (3, "test"), (4, "test")]);
    let stored = engine.policy_version().unwrap().policy_doc().unwrap();
    assert!(stored.same_as(&doc));
    engine.install_recovered(Policy::compile(&stored, &c).unwrap());
    let view = serde_json::to_value(engine.subject("u", T0 + 8).unwrap()).unwrap();
    let used = |limit: &str| {
        view["counters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["limit"] == limit)
            .map(|x| x["used"].as_u64().unwrap())
    };
    assert_eq!(used("per-day"), Some(1), "afresh after v4: {view}");
    assert_eq!(used("burst"), None, "dropped by v3: {view}");
    assert_eq!(used("global-tokens"), Some(25), "kept throughout: {view}");
}

// ---- the real binary, killed with SIGKILL after a 200 ----

const BIN: &str = env!("CARGO_BIN_EXE_quotad");

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let mut s = UnixStream::connect(sock).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: q\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let json = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(json).unwrap_or(Value::Null))
}

fn start_binary(dir: &Path) -> Daemon {
    let sock = dir.join("q.sock");
    let config = dir.join("quotad.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"unix:{}\"]\n[storage]\ndata_dir = \"{}\"\n[log]\nlevel = \"warn\"\n{}",
            sock.display(),
            dir.join("data").display(),
            api_config()
        ),
    )
    .unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(UnixStream::connect(&sock).is_ok() && http(&sock, "GET", "/readyz", None).0 == 200) {
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    Daemon(child)
}

#[test]
fn sigkill_after_a_200_keeps_the_change() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("q.sock");
    let mut answered = Vec::new();
    {
        let _d = start_binary(dir.path());
        for i in 0..3u64 {
            let (st, _) = http(&sock, "POST", "/v1/consume", Some(r#"{"subject":"u"}"#));
            assert_eq!(st, 200);
            let plan = json!({"limits": [{"name": format!("l{i}"), "period": "1d", "max": 10 + i}]}).to_string();
            let (st, v) = http(&sock, "PUT", &format!("/v1/plans/p{i}"), Some(&plan));
            assert_eq!(st, 200, "{v}");
            answered.push(v["version"].as_u64().unwrap());
        }
        let (st, v) = http(&sock, "DELETE", "/v1/plans/p0", None);
        assert_eq!(st, 200, "{v}");
        answered.push(v["version"].as_u64().unwrap());
        // Dropped here: SIGKILL, no final snapshot.
    }
    let _d = start_binary(dir.path());
    let (_, v) = http(&sock, "GET", "/v1/policy", None);
    assert_eq!(v["version"].as_u64(), answered.last().copied(), "{v}");
    assert_eq!(http(&sock, "GET", "/v1/plans/p0", None).0, 404);
    let (st, p2) = http(&sock, "GET", "/v1/plans/p2", None);
    assert_eq!((st, p2["limits"][0]["max"].as_u64()), (200, Some(12)), "{p2}");
    let (_, list) = http(&sock, "GET", "/v1/policy/versions", None);
    assert_eq!(list.as_array().unwrap().len(), 5, "{list}");
    let (_, c) = http(&sock, "POST", "/v1/consume", Some(r#"{"subject":"u"}"#));
    let per_day = c["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["limit"] == "per-day")
        .cloned();
    assert_eq!(per_day.unwrap()["used"], 4, "{c}");
}

// ---- quotad policy get|apply|diff against a running daemon ----

async fn cli(args: Vec<String>) -> std::process::Output {
    // The server runs on this test's thread: run the client off it.
    tokio::task::spawn_blocking(move || Command::new(BIN).args(&args).output().unwrap())
        .await
        .unwrap()
}

fn args(s: &TestServer, list: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = list.iter().map(|x| x.to_string()).collect();
    a.extend(s.cli_target());
    a
}

#[tokio::test]
async fn the_policy_cli_gets_diffs_and_applies_a_file() {
    for transport in TRANSPORTS {
        let s = TestServer::start(&api_config(), transport).await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.toml");
        let path = file.display().to_string();

        // get: TOML that reads back as the same policy.
        let out = cli(args(&s, &["policy", "get"])).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let toml_text = String::from_utf8(out.stdout).unwrap();
        assert!(
            toml_text.starts_with("# quotad policy version 1, changed "),
            "{toml_text}"
        );
        assert!(
            toml_text.contains("[[plans.limits]]\nname = \"per-day\""),
            "{toml_text}"
        );
        std::fs::write(&file, &toml_text).unwrap();
        let out = cli(args(&s, &["policy", "diff", &path])).await;
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
        assert!(String::from_utf8_lossy(&out.stdout).contains("no difference"));
        let out = cli(args(&s, &["policy", "apply", &path])).await;
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("unchanged"), "{out:?}");
        assert_eq!(version(&s).await, 1, "an unchanged apply writes nothing");

        // Edit the file: raise a max, change a period.
        let edited = toml_text
            .replace("max = 10\n", "max = 25\n")
            .replace("period = \"1m\"", "period = \"2m\"");
        std::fs::write(&file, &edited).unwrap();
        let out = cli(args(&s, &["policy", "diff", &path])).await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "differs: {text}");
        assert!(text.contains("-max = 10\n+max = 25"), "{text}");
        assert!(text.contains("counters reset: burst (period 1m -> 2m)"), "{text}");
        assert!(!text.contains("counters reset: per-day"), "{text}");

        // apply with a stale --if-version is refused, with the current one it goes in.
        let out = cli(args(&s, &["policy", "apply", &path, "--if-version", "7"])).await;
        assert_eq!(out.status.code(), Some(3));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("412 version_mismatch"),
            "{out:?}"
        );
        assert_eq!(version(&s).await, 1);
        let out = cli(args(&s, &["policy", "apply", &path, "--if-version", "1"])).await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        assert!(text.contains("policy version 2 (was 1)"), "{text}");
        assert!(text.contains("counters reset: burst (period 1m -> 2m)"), "{text}");
        assert_eq!(s.get("/v1/plans/free").await.body["limits"][0]["max"], 25);

        // get --version reads the old one; a bad file is exit 2 naming the key.
        let out = cli(args(&s, &["policy", "get", "--version", "1"])).await;
        assert!(String::from_utf8_lossy(&out.stdout).contains("max = 10\n"));
        std::fs::write(
            &file,
            "[[plans]]\nname = \"x\"\n  [[plans.limits]]\n  name = \"a\"\n  max = 1\n  period = \"1x\"\n",
        )
        .unwrap();
        let out = cli(args(&s, &["policy", "apply", &path])).await;
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("plans[0].limits[0].period"),
            "{out:?}"
        );
        assert_eq!(version(&s).await, 2, "nothing sent");
        s.stop().await;
    }
}
