//! Envoy's rate limit service (`ShouldRateLimit` over gRPC) through a real
//! gRPC client, over TCP and a Unix socket: OK then OVER_LIMIT, the
//! request's and a descriptor's `hits_addend`, 0 hits checking without
//! counting, several descriptors decided one by one, attributes matched by
//! limits, the binding limit's figures (`current_limit`, `limit_remaining`,
//! `duration_until_reset`), tokens in the call's metadata, and plain errors
//! for bad requests with nothing charged.

mod common;

use common::{TestServer, Transport};
use quotad::config::ListenAddr;
use quotad::gateway::envoy::pb::envoy::extensions::common::ratelimit::v3::{
    rate_limit_descriptor, RateLimitDescriptor,
};
use quotad::gateway::envoy::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use quotad::gateway::envoy::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use quotad::gateway::envoy::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use quotad::gateway::envoy::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tonic::transport::{Channel, Endpoint};

const LIMITS: &str = r#"
[[plans]]
name = "free"
default = true
unmatched = "allow"
  [[plans.limits]]
  name = "per-minute"
  match = { event = "api" }
  period = "1m"
  max = 5
  [[plans.limits]]
  name = "uploads-hourly"
  match = { event = "api", attributes = { path = "/upload" } }
  period = "1h"
  max = 2
  [[plans.limits]]
  name = "per-15-minutes"
  match = { event = "search" }
  period = "15m"
  max = 100
"#;

fn config(grpc_listen: &str, tokens: bool) -> String {
    let auth = if tokens {
        "[auth]\ntokens = [{ token = \"client-secret-0123456789\", role = \"client\" }, { token = \"admin-secret-0123456789\", role = \"admin\" }]\n"
    } else {
        ""
    };
    format!("{auth}[gateway]\ngrpc_listen = \"{grpc_listen}\"\n{LIMITS}")
}

async fn client(addr: &ListenAddr) -> RateLimitServiceClient<Channel> {
    let channel = match addr {
        ListenAddr::Tcp(a) => Endpoint::from_shared(format!("http://{a}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
        ListenAddr::Unix(p) => {
            let p = p.clone();
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_| {
                    let p = p.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(p).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
                .await
                .unwrap()
        }
    };
    RateLimitServiceClient::new(channel)
}

fn descriptor(entries: &[(&str, &str)], hits: Option<u64>) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| rate_limit_descriptor::Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        hits_addend: hits,
        ..Default::default()
    }
}

fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors,
        hits_addend: hits,
    }
}

async fn ask(c: &mut RateLimitServiceClient<Channel>, r: RateLimitRequest) -> RateLimitResponse {
    c.should_rate_limit(r).await.expect("an answer").into_inner()
}

/// A server whose gRPC listener is on `transport` (a socket in `dir`).
async fn start(t: Transport, dir: &std::path::Path, tokens: bool) -> TestServer {
    let listen = match t {
        Transport::Tcp => "127.0.0.1:0".to_string(),
        Transport::Unix => format!("unix:{}", dir.join("rls.sock").display()),
    };
    TestServer::start(&config(&listen, tokens), t).await
}

#[tokio::test]
async fn ok_then_over_limit_with_the_binding_limits_figures() {
    for t in common::TRANSPORTS {
        let dir = tempfile::tempdir().unwrap();
        let s = start(t, dir.path(), false).await;
        let mut c = client(s.grpc.as_ref().expect("grpc listener")).await;
        let alice = || vec![descriptor(&[("subject", "alice")], None)];

        let r = ask(&mut c, request("api", alice(), 0)).await;
        assert_eq!(r.overall_code, Code::Ok as i32, "{t:?}");
        let st = &r.statuses[0];
        assert_eq!(st.code, Code::Ok as i32);
        let limit = st.current_limit.as_ref().expect("current_limit");
        assert_eq!((limit.name.as_str(), limit.requests_per_unit), ("per-minute", 5));
        assert_eq!(limit.unit, Unit::Minute as i32);
        assert_eq!(st.limit_remaining, 4);
        let reset = st.duration_until_reset.as_ref().expect("duration_until_reset");
        let reset_ms = reset.seconds * 1000 + i64::from(reset.nanos) / 1_000_000;
        assert!(reset_ms > 0 && reset_ms <= 60_000, "{reset:?}");

        // The request's hits_addend: 3 more (4 of 5 used).
        let r = ask(&mut c, request("api", alice(), 3)).await;
        assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (Code::Ok as i32, 1));
        // A descriptor's hits_addend outranks the request's: 2 do not fit in 1.
        let r = ask(
            &mut c,
            request("api", vec![descriptor(&[("subject", "alice")], Some(2))], 1),
        )
        .await;
        assert_eq!(r.overall_code, Code::OverLimit as i32);
        assert_eq!(r.statuses[0].code, Code::OverLimit as i32);
        assert_eq!(r.statuses[0].limit_remaining, 1);
        assert_eq!(r.statuses[0].current_limit.as_ref().unwrap().name, "per-minute");
        // 0 hits asks without counting: the last one is still there.
        for _ in 0..3 {
            let r = ask(
                &mut c,
                request("api", vec![descriptor(&[("subject", "alice")], Some(0))], 0),
            )
            .await;
            assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (Code::Ok as i32, 1));
        }
        let r = ask(&mut c, request("api", alice(), 0)).await;
        assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (Code::Ok as i32, 0));
        let r = ask(&mut c, request("api", alice(), 0)).await;
        assert_eq!(r.overall_code, Code::OverLimit as i32);
        // The same counters as the HTTP API: alice used 5 of 5.
        let v = s.get("/v1/subjects/alice").await;
        assert_eq!(v.status, 200, "{}", v.text);
        let used = v.body["counters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["limit"] == "per-minute")
            .map(|c| c["used"].clone());
        assert_eq!(used, Some(serde_json::json!(5)), "{}", v.text);
        // A new minute: allowed again.
        s.clock.advance(60_000);
        let r = ask(&mut c, request("api", alice(), 0)).await;
        assert_eq!(r.overall_code, Code::Ok as i32);
        // 9 descriptors decided (2 over the limit); no errors.
        let m = s.get("/metrics").await.text;
        for line in [
            "quotad_rls_descriptors_total{code=\"ok\"} 7",
            "quotad_rls_descriptors_total{code=\"over_limit\"} 2",
            "quotad_rls_errors_total 0",
        ] {
            assert!(m.contains(line), "{t:?}: no {line:?} in:\n{m}");
        }
        drop(c);
        s.stop().await;
    }
}

#[tokio::test]
async fn descriptors_are_decided_one_by_one_with_attributes() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(Transport::Tcp, dir.path(), false).await;
    let mut c = client(s.grpc.as_ref().unwrap()).await;
    let upload = |who: &'static str| descriptor(&[("subject", who), ("path", "/upload")], None);
    let plain = |who: &'static str| descriptor(&[("subject", who)], None);
    // The upload descriptor meets the hourly limit on path=/upload (2 an
    // hour), which binds before the per-minute one.
    let r = ask(&mut c, request("api", vec![upload("bob"), plain("carol")], 0)).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(r.statuses.len(), 2);
    let names: Vec<_> = r
        .statuses
        .iter()
        .map(|s| s.current_limit.as_ref().unwrap().name.clone())
        .collect();
    assert_eq!(names, ["uploads-hourly", "per-minute"]);
    assert_eq!(r.statuses[0].current_limit.as_ref().unwrap().unit, Unit::Hour as i32);
    assert_eq!((r.statuses[0].limit_remaining, r.statuses[1].limit_remaining), (1, 4));
    ask(&mut c, request("api", vec![upload("bob")], 0)).await;
    // bob's uploads are used up; carol in the same request is still fine.
    let r = ask(&mut c, request("api", vec![upload("bob"), plain("carol")], 0)).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(r.statuses[0].code, Code::OverLimit as i32);
    assert_eq!(r.statuses[1].code, Code::Ok as i32);
    assert_eq!(r.statuses[1].limit_remaining, 3);
    // A period Envoy has no unit for: UNKNOWN, with the figures still given.
    let r = ask(&mut c, request("search", vec![plain("dave")], 0)).await;
    let l = r.statuses[0].current_limit.as_ref().unwrap();
    assert_eq!((l.unit, l.requests_per_unit), (Unit::Unknown as i32, 100));
    assert_eq!(r.statuses[0].limit_remaining, 99);
    // No limit matches: OK and no figures.
    let r = ask(&mut c, request("other", vec![plain("erin")], 0)).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert!(r.statuses[0].current_limit.is_none());
    drop(c);
    s.stop().await;
}

#[tokio::test]
async fn bad_requests_are_refused_in_plain_words_and_charge_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(Transport::Tcp, dir.path(), false).await;
    let mut c = client(s.grpc.as_ref().unwrap()).await;
    let cases: Vec<(RateLimitRequest, &str)> = vec![
        (
            request("", vec![descriptor(&[("subject", "a")], None)], 0),
            "domain: is required",
        ),
        (request("api", vec![], 0), "descriptors: has none"),
        (
            // The first descriptor is fine; nothing is charged for it either.
            request(
                "api",
                vec![
                    descriptor(&[("subject", "alice")], None),
                    descriptor(&[("path", "/x")], None),
                ],
                0,
            ),
            "descriptors[1].entries: has no \"subject\" entry",
        ),
        (
            request("api", vec![descriptor(&[("subject", "a"), ("subject", "b")], None)], 0),
            "descriptors[0].entries[1]: a second \"subject\" entry",
        ),
        (
            request(
                "api",
                vec![descriptor(&[("subject", "a"), ("k", "1"), ("k", "2")], None)],
                0,
            ),
            "descriptors[0].entries[2]: the key \"k\" appears twice",
        ),
        (
            RateLimitRequest {
                domain: "api".into(),
                descriptors: vec![RateLimitDescriptor {
                    is_negative_hits: true,
                    ..descriptor(&[("subject", "a")], Some(1))
                }],
                hits_addend: 0,
            },
            "descriptors[0].is_negative_hits",
        ),
    ];
    for (req, says) in cases {
        let e = c.should_rate_limit(req).await.expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(says), "{:?} should say {says:?}", e.message());
    }
    let m = s.get("/metrics").await.text;
    assert!(m.contains("quotad_rls_errors_total 6"), "{m}");
    let v = s.get("/v1/subjects/alice").await;
    let used: u64 = v.body["counters"]
        .as_array()
        .map(|cs| cs.iter().map(|c| c["used"].as_u64().unwrap()).sum())
        .unwrap_or(0);
    assert_eq!(used, 0, "{}", v.text);
    drop(c);
    s.stop().await;
}

#[tokio::test]
async fn a_token_goes_in_the_calls_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(Transport::Tcp, dir.path(), true).await;
    let mut c = client(s.grpc.as_ref().unwrap()).await;
    let req = || request("api", vec![descriptor(&[("subject", "alice")], None)], 0);
    let e = c.should_rate_limit(req()).await.expect_err("no token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let mut wrong = tonic::Request::new(req());
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    let e = c.should_rate_limit(wrong).await.expect_err("wrong token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let mut right = tonic::Request::new(req());
    right
        .metadata_mut()
        .insert("authorization", "Bearer client-secret-0123456789".parse().unwrap());
    let r = c.should_rate_limit(right).await.unwrap().into_inner();
    assert_eq!(r.overall_code, Code::Ok as i32);
    drop(c);
    s.stop().await;
}

#[tokio::test]
async fn grpc_alone_needs_no_upstreams_and_bad_settings_are_named() {
    use quotad::config::Config;
    let check = |text: &str| Config::from_toml(text, "t.toml").and_then(|c| c.sanitize().map(|_| c));
    assert!(check("[gateway]\ngrpc_listen = \"127.0.0.1:0\"\n").is_ok());
    let e = check("[gateway]\n").unwrap_err().to_string();
    assert!(e.contains("gateway") && e.contains("grpc_listen"), "{e}");
    let e = check("[gateway]\ngrpc_listen = \"0.0.0.0:8081\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("gateway.grpc_listen") && e.contains("auth.tokens"), "{e}");
    let e = check("[gateway]\ngrpc_listen = \"127.0.0.1:8081\"\ngrpc_subject_key = \"\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("gateway.grpc_subject_key"), "{e}");
    let e = check("[gateway]\ngrpc_listen = \"nowhere\"\n").unwrap_err().to_string();
    assert!(e.contains("gateway.grpc_listen"), "{e}");
}

#[test]
fn one_address_for_two_listeners_is_refused_naming_both() {
    use quotad::config::Config;
    let text = "[server]\nlisten = [\"127.0.0.1:7878\"]\n[gateway]\ngrpc_listen = \"127.0.0.1:7878\"\n";
    let e = Config::from_toml(text, "t.toml")
        .and_then(|c| c.sanitize())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("gateway.grpc_listen") && e.contains("server.listen[0]") && e.contains("127.0.0.1:7878"),
        "{e}"
    );
}
