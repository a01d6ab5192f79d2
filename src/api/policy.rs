//! Policy as data: `GET|PUT /v1/policy`, `GET /v1/policy/versions`,
//! `GET|PUT|DELETE /v1/plans/{name}` and `/v1/limits/{name}`; and how the
//! file's policy becomes a stored version at start and on reload. Every
//! change goes through [`Engine::change_policy`], one WAL record each.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{body_bytes, form_urlencoded_pairs, idempotency_key, parse, ApiError, AppState};
use crate::config::{plain_types, Config, ConfigError, PolicySource, Role};
use crate::engine::policy::{LimitConfig, PlanConfig, VERSIONS_KEPT};
use crate::engine::{Applied, Engine, EngineError, Policy, PolicyDoc, PolicyOutcome, PolicyRequest, PolicyVersion};
use crate::period::rfc3339;

/// The actor of changes that come from the configuration file.
pub const ACTOR_FILE: &str = "file";

/// How often a plan or limit write retries when another change landed
/// between reading the policy and writing it.
const MERGE_ATTEMPTS: usize = 8;

#[derive(Serialize)]
struct VersionView {
    version: u64,
    changed_at: String,
    actor: String,
    /// Where the policy is changed: `"file"` (edit the file, reload) or
    /// `"api"` (the policy endpoints), as the daemon runs now.
    source: &'static str,
    policy: serde_json::Value,
}

#[derive(Serialize)]
struct VersionEntry {
    version: u64,
    changed_at: String,
    actor: String,
}

#[derive(Serialize)]
struct CounterReset {
    limit: String,
    reason: String,
}

#[derive(Serialize)]
struct Written {
    version: u64,
    previous_version: u64,
    changed_at: String,
    actor: String,
    /// Counters the change dropped (their usage starts from zero).
    counters_reset: Vec<CounterReset>,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plan: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<serde_json::Value>,
}

/// The version in force and its policy: from the stored log, or (an engine
/// that never stored one) the compiled policy's own text as version 0.
fn current(engine: &Engine) -> Result<(u64, PolicyDoc, Option<PolicyVersion>), ApiError> {
    match engine.policy_version() {
        Some(v) => {
            let doc = v.policy_doc().map_err(ApiError::Unavailable)?;
            Ok((v.version, doc, Some(v)))
        }
        None => Ok((0, (*engine.policy().doc).clone(), None)),
    }
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("digits are a valid header")
}

fn with_etag(mut resp: Response, version: u64) -> Response {
    resp.headers_mut().insert("etag", etag(version));
    resp
}

/// `If-Match: "N"` (also `N` and `W/"N"`); `*` matches any version.
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get("if-match") else {
        return Ok(None);
    };
    let text = v
        .to_str()
        .map_err(|_| ApiError::invalid("If-Match header", "must be visible ASCII"))?
        .trim();
    if text == "*" {
        return Ok(None);
    }
    let bare = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    bare.parse::<u64>().map(Some).map_err(|_| {
        ApiError::invalid(
            "If-Match header",
            format!("{text:?} is not a policy version; send the ETag of GET /v1/policy, such as \"7\""),
        )
    })
}

/// The `policy` of a `{"policy": {...}}` body.
fn policy_of(body: &serde_json::Value) -> Result<&serde_json::Value, ApiError> {
    let fields = body
        .as_object()
        .ok_or_else(|| ApiError::invalid("body", "expected a JSON object"))?;
    if let Some(other) = fields.keys().find(|k| *k != "policy") {
        return Err(ApiError::InvalidPolicy(format!(
            "{other}: unknown field; the body is {{\"policy\": {{...}}}}, the policy as GET /v1/policy shows it"
        )));
    }
    fields.get("policy").ok_or_else(|| {
        ApiError::InvalidPolicy(
            "policy: is required; the body is {\"policy\": {...}}, the policy as GET /v1/policy shows it".into(),
        )
    })
}

/// Decodes a policy part of a body, naming the path of what is wrong (under
/// `prefix`, the part's place in the policy) as `invalid_policy`.
fn decode_part<T: DeserializeOwned>(value: serde_json::Value, prefix: &str) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = plain_types(&e.inner().to_string());
        let at = match (prefix.is_empty(), path.as_str()) {
            (_, ".") => prefix.to_string(),
            (true, p) => p.to_string(),
            (false, p) => format!("{prefix}.{p}"),
        };
        if at.is_empty() {
            ApiError::InvalidPolicy(inner)
        } else {
            ApiError::InvalidPolicy(format!("{at}: {inner}"))
        }
    })
}

/// A compile error as the API says it: the key's path, relative to the
/// body when the body is one plan or limit (`rebase` turns the policy's
/// path of it into the body's).
fn invalid(e: ConfigError, rebase: Option<(&str, &str)>) -> ApiError {
    let mut key = e.key;
    if let Some((from, to)) = rebase {
        if key == from {
            key = to.to_string();
        } else if let Some(rest) = key.strip_prefix(&format!("{from}.")) {
            key = if to.is_empty() {
                rest.to_string()
            } else {
                format!("{to}.{rest}")
            };
        }
    }
    if key.is_empty() {
        ApiError::InvalidPolicy(e.message)
    } else {
        ApiError::InvalidPolicy(format!("{key}: {}", e.message))
    }
}

fn refuse_when_from_file(st: &AppState) -> Result<(), ApiError> {
    if st.config().policy.source == PolicySource::File {
        return Err(ApiError::Conflict(
            "policy_from_file",
            "the policy comes from the configuration file (policy.source = \"file\"): edit the file and reload \
             (SIGHUP or POST /v1/admin/reload), or set policy.source = \"api\" to change it through the API"
                .into(),
        ));
    }
    Ok(())
}

impl AppState {
    fn config(&self) -> Config {
        self.config.read().unwrap_or_else(|e| e.into_inner()).0.clone()
    }
}

/// One policy write: compile, journal, wait for durability, answer.
struct Write<'a> {
    doc: PolicyDoc,
    actor: &'a str,
    if_version: Option<u64>,
    key: Option<&'a str>,
    fingerprint: u64,
    rebase: Option<(String, String)>,
}

async fn write(st: &AppState, w: Write<'_>) -> Result<PolicyOutcome, ApiError> {
    let compiled = Policy::compile(&w.doc, &st.config())
        .map_err(|e| invalid(e, w.rebase.as_ref().map(|(a, b)| (a.as_str(), b.as_str()))))?;
    st.writable()?;
    let applied: Applied<PolicyOutcome> = st.engine()?.change_policy(
        PolicyRequest {
            doc: &w.doc,
            compiled,
            actor: w.actor,
            if_version: w.if_version,
            idempotency: w.key.map(|k| (k, w.fingerprint)),
            refuse_plans_in_use: true,
            skip_if_same: true,
        },
        st.now(),
    )?;
    let outcome = st.durable(applied).await?;
    if !outcome.replayed {
        tracing::info!(
            version = outcome.version,
            previous_version = outcome.previous_version,
            actor = w.actor,
            counters_reset = outcome.dropped.len(),
            "policy changed"
        );
    }
    Ok(outcome)
}

fn written(engine: &Engine, outcome: &PolicyOutcome) -> Result<(Written, PolicyDoc), ApiError> {
    let log = engine.policy_log();
    let v = log.get(outcome.version).ok_or_else(|| {
        ApiError::Unavailable(format!(
            "version {} is no longer kept (the last {VERSIONS_KEPT} are)",
            outcome.version
        ))
    })?;
    let doc = v.policy_doc().map_err(ApiError::Unavailable)?;
    Ok((
        Written {
            version: v.version,
            previous_version: outcome.previous_version,
            changed_at: rfc3339(v.changed_at_ms),
            actor: v.actor.clone(),
            counters_reset: outcome
                .dropped
                .iter()
                .filter(|(name, _)| !crate::engine::signals::is_hidden(name))
                .map(|(name, why)| CounterReset {
                    limit: name.to_string(),
                    reason: why.clone(),
                })
                .collect(),
            policy: None,
            plan: None,
            limit: None,
        },
        doc,
    ))
}

/// The answer of an earlier write with this key and request, if any.
async fn replay(
    st: &AppState,
    key: Option<&str>,
    fingerprint: u64,
    item: Option<(Item, &str)>,
    whole: bool,
) -> Result<Option<Response>, ApiError> {
    let Some(key) = key else { return Ok(None) };
    let engine = st.engine()?;
    let Some(applied) = engine.policy_replay(key, fingerprint, st.now())? else {
        return Ok(None);
    };
    let outcome = st.durable(applied).await?;
    let (mut w, doc) = written(engine, &outcome)?;
    if whole {
        w.policy = Some(doc.to_json());
    }
    if let Some((item, name)) = item {
        let v = item.position(&doc, name).map(|i| item.get(&doc, i));
        match item {
            Item::Plan => w.plan = v,
            Item::Limit => w.limit = v,
        }
    }
    Ok(Some(respond(w, true)))
}

fn respond(w: Written, replayed: bool) -> Response {
    let version = w.version;
    let mut resp = with_etag(Json(w).into_response(), version);
    if replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    resp
}

/// `GET /v1/policy[?version=K]`.
pub(super) async fn get_policy(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    let mut wanted = None;
    for (k, v) in form_urlencoded_pairs(q.as_deref().unwrap_or(""))? {
        match k.as_str() {
            "version" => {
                wanted = Some(
                    v.parse::<u64>()
                        .map_err(|_| ApiError::invalid("version", format!("{v:?} is not a whole number")))?,
                )
            }
            other => return Err(ApiError::invalid(other, "unknown query parameter; use version")),
        }
    }
    let engine = st.engine()?;
    let (version, doc, stored) = current(engine)?;
    let source = match st.config().policy.source {
        PolicySource::File => "file",
        PolicySource::Api => "api",
    };
    let view = match (wanted, stored) {
        (Some(k), _) if k != version => {
            let log = engine.policy_log();
            let v = log.get(k).ok_or_else(|| {
                let kept = match (log.versions.front(), log.versions.back()) {
                    (Some(a), Some(b)) => format!("versions {} to {} are kept", a.version, b.version),
                    _ => "no versions are stored".to_string(),
                };
                ApiError::NotFound("unknown_version", format!("policy version {k} is not kept; {kept}"))
            })?;
            VersionView {
                version: v.version,
                changed_at: rfc3339(v.changed_at_ms),
                actor: v.actor.clone(),
                source,
                policy: v.policy_doc().map_err(ApiError::Unavailable)?.to_json(),
            }
        }
        (_, Some(v)) => VersionView {
            version,
            changed_at: rfc3339(v.changed_at_ms),
            actor: v.actor,
            source,
            policy: doc.to_json(),
        },
        (_, None) => VersionView {
            version,
            changed_at: rfc3339(0),
            actor: ACTOR_FILE.into(),
            source,
            policy: doc.to_json(),
        },
    };
    let v = view.version;
    Ok(with_etag(Json(view).into_response(), v))
}

/// `GET /v1/policy/versions`: newest first.
pub(super) async fn list_versions(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    let log = st.engine()?.policy_log();
    let list: Vec<VersionEntry> = log
        .versions
        .iter()
        .rev()
        .map(|v| VersionEntry {
            version: v.version,
            changed_at: rfc3339(v.changed_at_ms),
            actor: v.actor.clone(),
        })
        .collect();
    Ok(Json(list).into_response())
}

/// `PUT /v1/policy`: replaces the whole policy.
pub(super) async fn put_policy(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let grant = st.authorize(&headers, Role::Admin)?;
    refuse_when_from_file(&st)?;
    let bytes = body_bytes(body, st.max_body_bytes)?;
    let value: serde_json::Value = parse(&bytes)?;
    // Paths are the policy's own (`plans[1].limits[0].period`), as in the file.
    let doc: PolicyDoc = decode_part(policy_of(&value)?.clone(), "")?;
    let key = idempotency_key(&headers, None)?;
    let if_version = if_match(&headers)?;
    let fingerprint = crate::engine::fingerprint_of("put_policy", &(if_version, &value));
    if let Some(resp) = replay(&st, key.as_deref(), fingerprint, None, true).await? {
        return Ok(resp);
    }
    let outcome = write(
        &st,
        Write {
            doc,
            actor: grant.actor(),
            if_version,
            key: key.as_deref(),
            fingerprint,
            rebase: None,
        },
    )
    .await?;
    let engine = st.engine()?;
    let (mut w, doc) = written(engine, &outcome)?;
    w.policy = Some(doc.to_json());
    Ok(respond(w, outcome.replayed))
}

/// Which list of the policy an item endpoint edits.
#[derive(Clone, Copy)]
pub(super) enum Item {
    Plan,
    Limit,
}

impl Item {
    fn noun(self) -> &'static str {
        match self {
            Item::Plan => "plan",
            Item::Limit => "limit",
        }
    }

    fn list(self) -> &'static str {
        match self {
            Item::Plan => "plans",
            Item::Limit => "limits",
        }
    }

    fn position(self, doc: &PolicyDoc, name: &str) -> Option<usize> {
        match self {
            Item::Plan => doc.plans.iter().position(|p| p.name == name),
            Item::Limit => doc.limits.iter().position(|l| l.name == name),
        }
    }

    fn get(self, doc: &PolicyDoc, i: usize) -> serde_json::Value {
        match self {
            Item::Plan => serde_json::to_value(&doc.plans[i]),
            Item::Limit => serde_json::to_value(&doc.limits[i]),
        }
        .expect("policy items serialize")
    }

    fn not_found(self, doc: &PolicyDoc, name: &str) -> ApiError {
        let names: Vec<&str> = match self {
            Item::Plan => doc.plans.iter().map(|p| p.name.as_str()).collect(),
            Item::Limit => doc.limits.iter().map(|l| l.name.as_str()).collect(),
        };
        let known = if names.is_empty() {
            format!("there are no top-level {}", self.list())
        } else {
            format!("the {} are {}", self.list(), names.join(", "))
        };
        let (code, what) = match self {
            Item::Plan => ("unknown_plan", "plan"),
            Item::Limit => ("unknown_limit", "top-level limit"),
        };
        ApiError::NotFound(code, format!("no {what} named {name:?}; {known}"))
    }
}

/// The body of an item PUT as the item, its `name` filled in from the path
/// (a different one is refused).
fn item_body(item: Item, name: &str, bytes: &[u8]) -> Result<serde_json::Value, ApiError> {
    let mut value: serde_json::Value = parse(bytes)?;
    let obj = value.as_object_mut().expect("parse takes only objects");
    match obj.get("name") {
        None => {
            obj.insert("name".into(), name.into());
        }
        Some(serde_json::Value::String(n)) if n == name => {}
        Some(other) => {
            return Err(ApiError::InvalidPolicy(format!(
                "name: {other} differs from the {} named in the path, {name:?}; leave it out or make them equal",
                item.noun()
            )))
        }
    }
    Ok(value)
}

/// A PUT (`Some(body)`) or DELETE (`None`) of one plan or top-level limit:
/// read the version in force, edit it, write it against that version (so a
/// concurrent change is never overwritten), retrying if one landed between.
async fn write_item(
    st: &AppState,
    headers: &HeaderMap,
    item: Item,
    name: &str,
    body: Option<serde_json::Value>,
) -> Result<Response, ApiError> {
    let grant = st.authorize(headers, Role::Admin)?;
    refuse_when_from_file(st)?;
    let decoded_plan: Option<PlanConfig>;
    let decoded_limit: Option<LimitConfig>;
    match (&body, item) {
        (Some(v), Item::Plan) => {
            decoded_plan = Some(decode_part(v.clone(), "")?);
            decoded_limit = None;
        }
        (Some(v), Item::Limit) => {
            decoded_limit = Some(decode_part(v.clone(), "")?);
            decoded_plan = None;
        }
        (None, _) => {
            decoded_plan = None;
            decoded_limit = None;
        }
    }
    let key = idempotency_key(headers, None)?;
    let client_if = if_match(headers)?;
    let op = if body.is_some() { "put" } else { "delete" };
    let fingerprint = crate::engine::fingerprint_of(&format!("{op}_{}", item.noun()), &(name, client_if, &body));
    let with_item = body.is_some().then_some((item, name));
    if let Some(resp) = replay(st, key.as_deref(), fingerprint, with_item, false).await? {
        return Ok(resp);
    }
    let engine = st.engine()?;
    for _ in 0..MERGE_ATTEMPTS {
        let (version, mut doc, _) = current(engine)?;
        if let Some(given) = client_if.filter(|&v| v != version) {
            return Err(EngineError::VersionMismatch {
                current: version,
                given,
            }
            .into());
        }
        let at = item.position(&doc, name);
        let index = match (item, at) {
            (_, None) if body.is_none() => return Err(item.not_found(&doc, name)),
            (Item::Plan, Some(i)) if body.is_none() && doc.plans[i].default => {
                return Err(ApiError::Conflict(
                    "plan_in_use",
                    format!(
                        "plan {name:?} is the default plan: unassigned subjects are on it; mark another plan \
                         default first"
                    ),
                ))
            }
            (_, at) => at,
        };
        let index = match (index, &decoded_plan, &decoded_limit) {
            (Some(i), None, None) => {
                match item {
                    Item::Plan => drop(doc.plans.remove(i)),
                    Item::Limit => drop(doc.limits.remove(i)),
                }
                i
            }
            (None, None, None) => unreachable!("a DELETE of a missing item was answered 404"),
            (at, Some(p), _) => {
                let i = at.unwrap_or(doc.plans.len());
                if at.is_some() {
                    doc.plans[i] = p.clone();
                } else {
                    doc.plans.push(p.clone());
                }
                i
            }
            (at, None, Some(l)) => {
                let i = at.unwrap_or(doc.limits.len());
                if at.is_some() {
                    doc.limits[i] = l.clone();
                } else {
                    doc.limits.push(l.clone());
                }
                i
            }
        };
        let rebase = body
            .is_some()
            .then(|| (format!("{}[{index}]", item.list()), String::new()));
        let r = write(
            st,
            Write {
                doc,
                actor: grant.actor(),
                if_version: Some(version),
                key: key.as_deref(),
                fingerprint,
                rebase,
            },
        )
        .await;
        let outcome = match r {
            Err(ApiError::PreconditionFailed(_)) if client_if.is_none() => continue,
            r => r?,
        };
        let (mut w, doc) = written(engine, &outcome)?;
        if body.is_some() {
            let v = item.position(&doc, name).map(|i| item.get(&doc, i));
            match item {
                Item::Plan => w.plan = v,
                Item::Limit => w.limit = v,
            }
        }
        return Ok(respond(w, outcome.replayed));
    }
    Err(ApiError::Busy(
        "the policy kept changing while this write was merged into it; retry".into(),
        1,
    ))
}

/// `GET /v1/plans/{name}` and `GET /v1/limits/{name}`.
pub(super) async fn get_one(
    st: Arc<AppState>,
    item: Item,
    name: String,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Client)?;
    let (version, doc, _) = current(st.engine()?)?;
    let i = item.position(&doc, &name).ok_or_else(|| item.not_found(&doc, &name))?;
    Ok(with_etag(Json(item.get(&doc, i)).into_response(), version))
}

/// `PUT /v1/plans/{name}` and `PUT /v1/limits/{name}`.
pub(super) async fn put_one(
    st: Arc<AppState>,
    item: Item,
    name: String,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    let value = item_body(item, &name, &body_bytes(body, st.max_body_bytes)?)?;
    write_item(&st, &headers, item, &name, Some(value)).await
}

/// `DELETE /v1/plans/{name}` and `DELETE /v1/limits/{name}`.
pub(super) async fn delete_one(
    st: Arc<AppState>,
    item: Item,
    name: String,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    write_item(&st, &headers, item, &name, None).await
}

/// Why the policy could not be put in force at start.
#[derive(Debug)]
pub enum AdoptError {
    /// The stored or configured policy does not compile.
    Policy(String),
    /// Its new version could not be written.
    Storage(String),
}

/// Makes the configuration's policy the stored one after recovery, or puts
/// the stored one in force: with `policy.source = "file"` the file's policy
/// becomes a new version when it differs from the stored one; with `"api"`
/// the file only seeds version 1 of an empty data directory. Returns the
/// LSN to wait for, if a version was written.
pub fn adopt_at_start(engine: &Engine, config: &Config, now_ms: u64) -> Result<Option<crate::engine::Lsn>, AdoptError> {
    let file_doc = config.policy_doc();
    let stored = engine.policy_version();
    match (config.policy.source, stored) {
        (PolicySource::Api, Some(v)) => {
            let doc = v.policy_doc().map_err(AdoptError::Policy)?;
            let compiled = Policy::compile(&doc, config).map_err(|e| {
                AdoptError::Policy(format!(
                    "the stored policy (version {}) does not compile under this configuration: {}: {}",
                    v.version, e.key, e.message
                ))
            })?;
            if !doc.same_as(&file_doc) {
                tracing::info!(
                    version = v.version,
                    "policy.source = \"api\": the stored policy is in force; the configuration file's policy \
                     sections differ from it and are ignored"
                );
            }
            engine.install_recovered(compiled);
            Ok(None)
        }
        (source, _) => {
            let compiled = Policy::compile(&file_doc, config)
                .map_err(|e| AdoptError::Policy(format!("{}: {}", e.key, e.message)))?;
            let applied = engine
                .change_policy(
                    PolicyRequest {
                        doc: &file_doc,
                        compiled,
                        actor: ACTOR_FILE,
                        if_version: None,
                        idempotency: None,
                        refuse_plans_in_use: false,
                        skip_if_same: source == PolicySource::File,
                    },
                    now_ms,
                )
                .map_err(|e| AdoptError::Storage(e.to_string()))?;
            if applied.value.version != applied.value.previous_version {
                tracing::info!(
                    version = applied.value.version,
                    "the configuration file's policy is stored as a new version"
                );
            }
            Ok(applied.lsn)
        }
    }
}
