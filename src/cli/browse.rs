//! `quotad subjects list`, `quotad events list|tail` and `quotad usage
//! export|top`: reading a running daemon's subjects, events and usage page
//! by page (or streamed), for operators at a shell. One line per item
//! (`--json`: one JSON object per line, for `jq`).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use hyper::Method;
use serde_json::Value;

use super::{connected, path_segment, report_error, Connect, EventsAction, SubjectsAction, UsageAction, UsageRange};
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
        // The newest event now, read newest first.
        None => match get(client, connect, "/v1/events?order=desc&limit=1").await {
            Ok(body) => body["next_after"].as_u64().unwrap_or(0),
            Err(code) => return code,
        },
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

/// The query of a usage range.
fn range_query(r: &UsageRange) -> String {
    let mut q = format!("from={}&to={}", path_segment(&r.from), path_segment(&r.to));
    if let Some(tz) = &r.timezone {
        q.push_str(&format!("&timezone={}", path_segment(tz)));
    }
    q
}

pub(super) fn usage(action: UsageAction, config_path: Option<&Path>) -> ExitCode {
    let connect = match &action {
        UsageAction::Export { connect, .. } | UsageAction::Top { connect, .. } => connect.clone(),
    };
    let (client, runtime) = match connected(&connect.reach, config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    runtime.block_on(async {
        match action {
            UsageAction::Top {
                metric, range, limit, ..
            } => {
                let path = format!(
                    "/v1/usage/top?metric={}&{}&limit={limit}",
                    path_segment(&metric),
                    range_query(&range)
                );
                let body = match get(&client, &connect, &path).await {
                    Ok(b) => b,
                    Err(code) => return code,
                };
                for row in body["rows"].as_array().into_iter().flatten() {
                    let line = if connect.json {
                        row.to_string()
                    } else {
                        format!("{}\t{}", row["amount"], row["subject"].as_str().unwrap_or(""))
                    };
                    if !emit(&line) {
                        break;
                    }
                }
                ExitCode::SUCCESS
            }
            UsageAction::Export {
                range,
                granularity,
                group_by,
                after,
                ..
            } => {
                let mut query = format!("{}&granularity={granularity}", range_query(&range));
                if let Some(g) = &group_by {
                    query.push_str(&format!("&group_by={}", path_segment(g)));
                }
                if connect.json {
                    return export_rows(&client, &connect, &query, after).await;
                }
                if let Some(a) = &after {
                    query.push_str(&format!("&after={}", path_segment(a)));
                }
                let mut out = std::io::stdout().lock();
                match client
                    .download(&format!("/v1/usage?{query}&format=csv"), &mut out)
                    .await
                {
                    Err(e) => {
                        eprintln!("quotad: {e}");
                        ExitCode::from(super::EXIT_REQUEST)
                    }
                    Ok(Some(a)) if a.status >= 400 => {
                        report_error(&a, &connect);
                        ExitCode::from(super::EXIT_REQUEST)
                    }
                    // Done, or the reader went away (`| head`).
                    Ok(_) => ExitCode::SUCCESS,
                }
            }
        }
    })
}

/// The export as JSON rows, one per line, page after page.
async fn export_rows(client: &Client, connect: &Connect, query: &str, mut after: Option<String>) -> ExitCode {
    loop {
        let mut path = format!("/v1/usage?{query}&limit={PAGE}");
        if let Some(a) = &after {
            path.push_str(&format!("&after={}", path_segment(a)));
        }
        let page = match get(client, connect, &path).await {
            Ok(p) => p,
            Err(code) => return code,
        };
        for row in page["rows"].as_array().into_iter().flatten() {
            if !emit(&row.to_string()) {
                return ExitCode::SUCCESS;
            }
        }
        match page["next_after"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => return ExitCode::SUCCESS,
        }
    }
}
