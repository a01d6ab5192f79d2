//! `[gateway]` in `quotad.toml`: where the OpenAI-compatible gateway listens,
//! who is charged, and the upstreams it forwards to (with their keys, which
//! callers never hold).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::config::{ConfigError, ListenAddr};

/// `[gateway]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Addresses of the gateway's own listener (`host:port` or `unix:/path`).
    #[serde(default)]
    pub listen: Vec<String>,
    /// Where Envoy's rate limit service (gRPC) listens (`host:port` or
    /// `unix:/path`); none: not served.
    #[serde(default)]
    pub grpc_listen: Option<String>,
    /// The descriptor entry that names the subject in a rate limit request.
    #[serde(default = "default_grpc_subject_key")]
    pub grpc_subject_key: String,
    /// The request header that names the subject charged for a call.
    #[serde(default = "default_subject_header")]
    pub subject_header: String,
    /// Output tokens reserved when a request sets no `max_tokens`.
    #[serde(default = "default_max_output_tokens")]
    pub default_max_output_tokens: u64,
    /// Largest request body taken, in bytes (prompts can be long). Default 4 MiB.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// How long an upstream may take to answer (the whole answer for
    /// non-streamed calls, the headers for streams), e.g. `"10m"`.
    #[serde(default = "default_upstream_timeout")]
    pub upstream_timeout: String,
    /// Where the models are served; the first that lists a model serves it.
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
}

/// One `[[gateway.upstreams]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Its name: the `upstream` attribute of every call it serves.
    pub name: String,
    /// Base URL of an OpenAI-compatible API, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// A file holding the API key sent upstream (none: no `Authorization`).
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// The event of the calls it serves.
    #[serde(default = "default_event")]
    pub event: String,
    /// Model names it serves; `"*"` for any.
    pub models: Vec<String>,
    /// What a model becomes when the decision is `degrade`.
    #[serde(default)]
    pub degrade_to: BTreeMap<String, String>,
}

fn default_subject_header() -> String {
    "x-quotad-subject".into()
}
fn default_grpc_subject_key() -> String {
    "subject".into()
}
fn default_max_output_tokens() -> u64 {
    4096
}
fn default_max_body_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_upstream_timeout() -> String {
    "10m".into()
}
fn default_event() -> String {
    "llm.chat".into()
}

/// One upstream, checked and with its key read.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: std::sync::Arc<str>,
    /// Without a trailing `/`.
    pub base_url: String,
    pub api_key: Option<String>,
    pub event: String,
    pub models: Vec<String>,
    pub degrade_to: BTreeMap<String, String>,
}

impl Upstream {
    /// Whether it serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == "*" || m == model)
    }
}

/// `[gateway]` checked: listeners parsed, keys read, durations resolved.
#[derive(Debug, Clone)]
pub struct Checked {
    pub listen: Vec<ListenAddr>,
    pub grpc_listen: Option<ListenAddr>,
    pub grpc_subject_key: String,
    pub subject_header: axum::http::HeaderName,
    pub default_max_output_tokens: u64,
    pub max_body_bytes: usize,
    pub upstream_timeout: std::time::Duration,
    pub upstreams: Vec<Upstream>,
}

impl GatewayConfig {
    /// Checks every key, naming the one that is wrong; reads the key files.
    /// `open_listeners`: whether tokens are configured (else the gateway
    /// listens only on loopback or a socket, as the API does).
    pub fn check(&self, tokens_configured: bool) -> Result<Checked, ConfigError> {
        if self.listen.is_empty() && self.grpc_listen.is_none() {
            return Err(ConfigError::new(
                "gateway.listen",
                "is empty and there is no grpc_listen: add listen (the OpenAI-compatible gateway), grpc_listen (Envoy's rate limit \
                 service), or both",
            ));
        }
        let local_or_tokens = |key: String, l: &str| -> Result<ListenAddr, ConfigError> {
            let addr = ListenAddr::parse(l).map_err(|m| ConfigError::new(&key, m))?;
            if !addr.is_local() && !tokens_configured {
                return Err(ConfigError::new(
                    key,
                    format!(
                        "{l:?} is reachable from other hosts; configure auth.tokens before listening on it \
                         (callers then send a client token)"
                    ),
                ));
            }
            Ok(addr)
        };
        let mut listen = Vec::new();
        for (i, l) in self.listen.iter().enumerate() {
            listen.push(local_or_tokens(format!("gateway.listen[{i}]"), l)?);
        }
        let grpc_listen = match &self.grpc_listen {
            Some(l) => Some(local_or_tokens("gateway.grpc_listen".into(), l)?),
            None => None,
        };
        if self.grpc_subject_key.is_empty() || self.grpc_subject_key.len() > 64 {
            return Err(ConfigError::new(
                "gateway.grpc_subject_key",
                "must be 1 to 64 characters",
            ));
        }
        let subject_header = axum::http::HeaderName::from_bytes(self.subject_header.to_ascii_lowercase().as_bytes())
            .map_err(|_| {
                ConfigError::new(
                    "gateway.subject_header",
                    format!("{:?} is not a header name", self.subject_header),
                )
            })?;
        if !(1..=10_000_000).contains(&self.default_max_output_tokens) {
            return Err(ConfigError::new(
                "gateway.default_max_output_tokens",
                "must be between 1 and 10000000",
            ));
        }
        if !(1024..=256 * 1024 * 1024).contains(&self.max_body_bytes) {
            return Err(ConfigError::new(
                "gateway.max_body_bytes",
                "must be between 1024 and 268435456",
            ));
        }
        let timeout_ms =
            crate::config::duration_ms("gateway.upstream_timeout", &self.upstream_timeout, 1_000, 86_400_000)?;
        if self.upstreams.is_empty() && !self.listen.is_empty() {
            return Err(ConfigError::new(
                "gateway.upstreams",
                "needs at least one [[gateway.upstreams]] for gateway.listen to forward to",
            ));
        }
        if !self.upstreams.is_empty() && self.listen.is_empty() {
            return Err(ConfigError::new(
                "gateway.listen",
                "is empty, so nothing uses gateway.upstreams: add an address for the OpenAI-compatible gateway",
            ));
        }
        let mut upstreams = Vec::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let key = |k: &str| format!("gateway.upstreams[{i}].{k}");
            if u.name.is_empty() || u.name.len() > 64 {
                return Err(ConfigError::new(key("name"), "must be 1 to 64 characters"));
            }
            if self.upstreams[..i].iter().any(|o| o.name == u.name) {
                return Err(ConfigError::new(key("name"), format!("{:?} is used twice", u.name)));
            }
            let parsed = reqwest::Url::parse(&u.base_url)
                .map_err(|e| ConfigError::new(key("base_url"), format!("{:?} is not a URL: {e}", u.base_url)))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(ConfigError::new(key("base_url"), "must be an http:// or https:// URL"));
            }
            if u.models.is_empty() {
                return Err(ConfigError::new(key("models"), "lists no model (\"*\" for any)"));
            }
            if u.event.is_empty() {
                return Err(ConfigError::new(key("event"), "must not be empty"));
            }
            let api_key = match &u.api_key_file {
                None => None,
                Some(p) => {
                    let text = std::fs::read_to_string(p).map_err(|e| {
                        ConfigError::new(key("api_key_file"), format!("cannot read {}: {e}", p.display()))
                    })?;
                    let k = text.trim().to_string();
                    if k.is_empty() || k.chars().any(|c| c.is_control() || c == ' ') {
                        return Err(ConfigError::new(
                            key("api_key_file"),
                            format!("{} must hold one key on one line", p.display()),
                        ));
                    }
                    Some(k)
                }
            };
            upstreams.push(Upstream {
                name: u.name.as_str().into(),
                base_url: u.base_url.trim_end_matches('/').to_string(),
                api_key,
                event: u.event.clone(),
                models: u.models.clone(),
                degrade_to: u.degrade_to.clone(),
            });
        }
        Ok(Checked {
            listen,
            grpc_listen,
            grpc_subject_key: self.grpc_subject_key.clone(),
            subject_header,
            default_max_output_tokens: self.default_max_output_tokens,
            max_body_bytes: self.max_body_bytes,
            upstream_timeout: std::time::Duration::from_millis(timeout_ms),
            upstreams,
        })
    }
}
