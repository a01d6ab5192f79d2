//! The request edge, as an adversarial run found it: a lower-case `bearer`
//! was 401. Over TCP and the Unix socket.

mod common;

use common::{TestServer, TRANSPORTS};

const CONFIG: &str = r#"
[[plans]]
name = "free"
default = true
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 1000
"#;

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let cfg = format!("[auth]\ntokens = [{{ role = \"client\", token = \"client-token-0123456789\" }}]\n{CONFIG}");
    for t in TRANSPORTS {
        let s = TestServer::start(&cfg, t).await;
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            let auth = format!("{scheme} client-token-0123456789");
            let r = s.req("GET", "/v1/plans", None, &[("authorization", &auth)]).await;
            assert_eq!(r.status, 200, "{t:?} {scheme}: {}", r.text);
        }
        for auth in [
            "Basic client-token-0123456789",
            "bearerclient-token-0123456789",
            "bearer",
            "client-token-0123456789",
        ] {
            let r = s.req("GET", "/v1/plans", None, &[("authorization", auth)]).await;
            assert_eq!(
                (r.status, r.error_code()),
                (401, "unauthorized"),
                "{t:?} {auth}: {}",
                r.text
            );
        }
        s.stop().await;
    }
}
