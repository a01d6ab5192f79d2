//! `quotad policy get|apply|diff`: the running daemon's policy as TOML, for
//! people who keep it in git. A file is read and validated exactly as the
//! daemon reads its configuration; only its policy sections are sent.

use std::path::Path;
use std::process::ExitCode;

use hyper::Method;
use serde_json::{json, Value};

use super::{connected, Connect, PolicyAction, EXIT_CONFIG, EXIT_DENIED, EXIT_REQUEST};
use crate::client::{Answer, Client};
use crate::config::Config;
use crate::engine::policy::{counter_changes, PolicyDoc};
use crate::engine::Policy;

pub(super) fn run(action: PolicyAction, config_path: Option<&Path>) -> ExitCode {
    let connect = match &action {
        PolicyAction::Get { connect, .. }
        | PolicyAction::Apply { connect, .. }
        | PolicyAction::Diff { connect, .. } => connect.clone(),
    };
    let (client, runtime) = match connected(&connect.reach, config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = runtime.block_on(async {
        match action {
            PolicyAction::Get { version, .. } => get(&client, &connect, version).await,
            PolicyAction::Apply { file, if_version, .. } => apply(&client, &connect, &file, if_version).await,
            PolicyAction::Diff { file, .. } => diff(&client, &connect, &file).await,
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Failed::Usage(m)) => {
            eprintln!("quotad: {m}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failed::Request(m)) => {
            if !m.is_empty() {
                eprintln!("quotad: {m}");
            }
            ExitCode::from(EXIT_REQUEST)
        }
    }
}

enum Failed {
    /// A bad file or argument (exit 2).
    Usage(String),
    /// The request failed or was refused (exit 3); already reported if empty.
    Request(String),
}

/// Sends a request; an error answer is reported and fails.
async fn call(
    client: &Client,
    connect: &Connect,
    method: Method,
    path: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> Result<Answer, Failed> {
    // Reported by `answered`.
    super::answered(client, connect, method, path, body, headers)
        .await
        .map_err(|_| Failed::Request(String::new()))
}

/// The daemon's current version: its number, who made it and its policy.
async fn current(client: &Client, connect: &Connect, version: Option<u64>) -> Result<(Answer, PolicyDoc), Failed> {
    let path = match version {
        Some(v) => format!("/v1/policy?version={v}"),
        None => "/v1/policy".to_string(),
    };
    let a = call(client, connect, Method::GET, &path, None, &[]).await?;
    let doc = serde_json::from_value(a.body["policy"].clone())
        .map_err(|e| Failed::Request(format!("the daemon's policy does not read as a policy: {e}")))?;
    Ok((a, doc))
}

/// A file's policy, validated as the daemon validates its configuration.
fn read_file(file: &Path) -> Result<(Config, PolicyDoc), Failed> {
    let text = std::fs::read_to_string(file).map_err(|e| Failed::Usage(format!("{}: {e}", file.display())))?;
    let config = Config::from_toml(&text, &file.display().to_string()).map_err(|e| Failed::Usage(e.to_string()))?;
    let doc = config.policy_doc();
    Policy::compile(&doc, &config)
        .map_err(|e| Failed::Usage(format!("{}: {}: {}", file.display(), e.key, e.message)))?;
    Ok((config, doc))
}

/// The policy as TOML, defaults filled in, each `match` written inline as
/// in the shipped quotad.toml.
fn to_toml(doc: &PolicyDoc) -> Result<String, Failed> {
    let failed = |e: &dyn std::fmt::Display| Failed::Request(format!("cannot write the policy as TOML: {e}"));
    let text = toml::to_string(doc).map_err(|e| failed(&e))?;
    let mut edit: toml_edit::DocumentMut = text.parse().map_err(|e| failed(&e))?;
    inline_matches(edit.as_table_mut());
    Ok(edit.to_string())
}

fn inline_matches(table: &mut toml_edit::Table) {
    if let Some(toml_edit::Item::Table(t)) = table.remove("match") {
        let mut inline = t.into_inline_table();
        inline.fmt();
        table.insert("match", toml_edit::value(inline));
    }
    for (_, item) in table.iter_mut() {
        match item {
            toml_edit::Item::Table(t) => inline_matches(t),
            toml_edit::Item::ArrayOfTables(a) => a.iter_mut().for_each(inline_matches),
            _ => {}
        }
    }
}

fn stamp(a: &Answer) -> String {
    format!(
        "version {}, changed {} by {}",
        a.body["version"],
        a.body["changed_at"].as_str().unwrap_or("?"),
        a.body["actor"].as_str().unwrap_or("?")
    )
}

async fn get(client: &Client, connect: &Connect, version: Option<u64>) -> Result<u8, Failed> {
    let (a, doc) = current(client, connect, version).await?;
    if connect.json {
        say!("{}", a.body);
    } else {
        say!("# quotad policy {}\n{}", stamp(&a), to_toml(&doc)?);
    }
    Ok(0)
}

async fn apply(client: &Client, connect: &Connect, file: &Path, if_version: Option<u64>) -> Result<u8, Failed> {
    let (_, doc) = read_file(file)?;
    let (now, in_force) = current(client, connect, None).await?;
    if in_force.same_as(&doc) && if_version.is_none_or(|v| now.body["version"].as_u64() == Some(v)) {
        if connect.json {
            say!("{}", json!({"version": now.body["version"], "changed": false}));
        } else {
            say!(
                "unchanged: the daemon's policy ({}) is {}'s",
                stamp(&now),
                file.display()
            );
        }
        return Ok(0);
    }
    let if_match = if_version.map(|v| format!("\"{v}\""));
    let headers: Vec<(&str, &str)> = if_match.iter().map(|v| ("if-match", v.as_str())).collect();
    let body = json!({"policy": doc.to_json()});
    let a = call(client, connect, Method::PUT, "/v1/policy", Some(&body), &headers).await?;
    if connect.json {
        say!("{}", a.body);
        return Ok(0);
    }
    say!(
        "policy version {} (was {}), by {}",
        a.body["version"],
        a.body["previous_version"],
        a.body["actor"].as_str().unwrap_or("?")
    );
    for r in a.body["counters_reset"].as_array().into_iter().flatten() {
        say!(
            "  counters reset: {} ({})",
            r["limit"].as_str().unwrap_or("?"),
            r["reason"].as_str().unwrap_or("?")
        );
    }
    Ok(0)
}

async fn diff(client: &Client, connect: &Connect, file: &Path) -> Result<u8, Failed> {
    let (config, doc) = read_file(file)?;
    let (now, in_force) = current(client, connect, None).await?;
    // Compiled under the file's settings: what the counters' identity needs.
    let resets = match (Policy::compile(&in_force, &config), Policy::compile(&doc, &config)) {
        (Ok(old), Ok(new)) => counter_changes(&old, &new),
        _ => Default::default(),
    };
    let (old, new) = (to_toml(&in_force)?, to_toml(&doc)?);
    let same = in_force.same_as(&doc);
    if connect.json {
        let resets: Vec<Value> = resets.iter().map(|(l, r)| json!({"limit": l, "reason": r})).collect();
        say!(
            "{}",
            json!({"version": now.body["version"], "same": same, "counters_reset": resets,
                   "diff": unified(&old, &new, &now, file)})
        );
    } else if same {
        say!(
            "no difference: the daemon's policy ({}) is {}'s",
            stamp(&now),
            file.display()
        );
    } else {
        print!("{}", unified(&old, &new, &now, file));
        for (limit, reason) in &resets {
            say!("counters reset: {limit} ({reason})");
        }
    }
    Ok(if same { 0 } else { EXIT_DENIED })
}

fn unified(old: &str, new: &str, now: &Answer, file: &Path) -> String {
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(
            &format!("daemon (version {})", now.body["version"]),
            &file.display().to_string(),
        )
        .to_string()
}
