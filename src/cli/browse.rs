//! `quotad subjects list`, `quotad events list` and `quotad events tail`:
//! reading a running daemon's subjects and events page by page, for
//! operators at a shell. One line per item (`--json`: one JSON object per
//! line, for `jq`).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use hyper::Method;
use serde_json::Value;

use super::{connected, path_segment, Connect, EventsAction, SubjectsAction};
use crate::client::Client;

/// Pages the daemon answers at most (its `limit` bound).
const PAGE: u32 = 1000;

pub(super) fn subjects(action: SubjectsAction, config_path: Option<&Path>) -> ExitCode {
    let SubjectsAction::List {
        after,
        limit,
        all,
        connect,
    } = action;
    let (client, runtime) = match connected(&connect.reach, config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    runtime.block_on(async {
        let mut after = after;
        loop {
            let mut path = format!("/v1/subjects?limit={}", if all { PAGE } else { limit });
            if let Some(a) = &after {
                path.push_str(&format!("&after={}", path_segment(a)));
            }
            let page = match get(&client, &connect, &path).await {
                Ok(p) => p,
                Err(code) => return code,
            };
            for s in page["subjects"].as_array().into_iter().flatten() {
                let line = if connect.json {
                    s.to_string()
                } else {
                    let plan = s["plan"].as_str().unwrap_or("(no plan)");
                    let how = if s["assigned"] == true { "assigned" } else { "default" };
                    format!("{}\t{plan}\t{how}", s["subject"].as_str().unwrap_or(""))
                };
                if !emit(&line) {
                    return ExitCode::SUCCESS;
                }
            }
            match page["next_after"].as_str() {
                Some(next) if all => after = Some(next.to_string()),
                Some(next) => {
                    eprintln!("quotad: more after {next:?} (--after {next:?}, or --all)");
                    return ExitCode::SUCCESS;
                }
                None => return ExitCode::SUCCESS,
            }
        }
    })
}

pub(super) fn events(action: EventsAction, config_path: Option<&Path>) -> ExitCode {
    let connect = match &action {
        EventsAction::List { connect, .. } | EventsAction::Tail { connect, .. } => connect.clone(),
    };
    let (client, runtime) = match connected(&connect.reach, config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    runtime.block_on(async {
        match action {
            EventsAction::List { after, limit, kind, .. } => {
                match page(&client, &connect, after.unwrap_or(0), limit, kind.as_deref()).await {
                    Ok((events, next)) => {
                        for e in &events {
                            if !print_event(e, connect.json) {
                                return ExitCode::SUCCESS;
                            }
                        }
                        if events.len() == limit as usize {
                            eprintln!("quotad: more after {next} (--after {next})");
                        }
                        ExitCode::SUCCESS
                    }
                    Err(code) => code,
                }
            }
            EventsAction::Tail {
                after,
                kind,
                count,
                interval,
                ..
            } => tail(&client, &connect, after, kind.as_deref(), count, interval).await,
        }
    })
}

/// Follows new events (after `after`, else after the newest now), polling
/// every `interval` seconds while there is nothing new; stops after `count`.
async fn tail(
    client: &Client,
    connect: &Connect,
    after: Option<u64>,
    kind: Option<&str>,
    count: Option<u64>,
    interval: f64,
) -> ExitCode {
    let mut after = match after {
        Some(a) => a,
        // The newest event now: page through what is kept (bounded by
        // events.retention) without printing it.
        None => {
            let mut at = 0;
            loop {
                match page(client, connect, at, PAGE, None).await {
                    Ok((_, next)) if next == at => break at,
                    Ok((_, next)) => at = next,
                    Err(code) => return code,
                }
            }
        }
    };
    let mut printed = 0u64;
    loop {
        let (events, next) = match page(client, connect, after, PAGE, kind).await {
            Ok(p) => p,
            Err(code) => return code,
        };
        for e in &events {
            if count.is_some_and(|c| printed >= c) {
                return ExitCode::SUCCESS;
            }
            if !print_event(e, connect.json) {
                // The reader went away (`| head`): done, not an error.
                return ExitCode::SUCCESS;
            }
            printed += 1;
        }
        if count.is_some_and(|c| printed >= c) {
            return ExitCode::SUCCESS;
        }
        if next == after {
            tokio::time::sleep(Duration::from_secs_f64(interval)).await;
        }
        after = next;
    }
}

/// One page of `GET /v1/events`: its events and `next_after`.
async fn page(
    client: &Client,
    connect: &Connect,
    after: u64,
    limit: u32,
    kind: Option<&str>,
) -> Result<(Vec<Value>, u64), ExitCode> {
    let mut path = format!("/v1/events?after={after}&limit={limit}");
    if let Some(k) = kind {
        path.push_str(&format!("&type={}", path_segment(k)));
    }
    let body = get(client, connect, &path).await?;
    let events = body["events"].as_array().cloned().unwrap_or_default();
    Ok((events, body["next_after"].as_u64().unwrap_or(after)))
}

async fn get(client: &Client, connect: &Connect, path: &str) -> Result<Value, ExitCode> {
    super::answered(client, connect, Method::GET, path, None, &[])
        .await
        .map(|a| a.body)
}

/// Writes a line to stdout; false once stdout is closed (`| head`), which
/// `say!` would ignore and a `tail` would then poll into forever.
fn emit(line: &str) -> bool {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}

/// `seq  at  type  subject  the other fields`, or the event as JSON; false
/// once stdout is closed.
fn print_event(e: &Value, json: bool) -> bool {
    if json {
        return emit(&e.to_string());
    }
    let mut rest = e.clone();
    let field = |rest: &mut Value, k: &str| {
        rest.as_object_mut()
            .and_then(|o| o.remove(k))
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
            .unwrap_or_else(|| "-".into())
    };
    let seq = field(&mut rest, "seq");
    let at = field(&mut rest, "at");
    let kind = field(&mut rest, "type");
    let subject = field(&mut rest, "subject");
    rest.as_object_mut().map(|o| o.remove("id"));
    emit(&format!("{seq}\t{at}\t{kind}\t{subject}\t{rest}"))
}
