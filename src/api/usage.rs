//! Usage over HTTP: one subject's buckets (`GET /v1/subjects/{s}/usage`),
//! every subject's for billing (`GET /v1/usage`, JSON pages or CSV), the
//! biggest users of a metric (`GET /v1/usage/top`) and the fullest counters
//! (`GET /v1/counters`). Buckets come from the snapshot file and from what
//! memory holds since the last snapshot, added together.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use jiff::tz::TimeZone;
use serde::Serialize;

use super::{form_urlencoded_pairs, subject_path, ApiError, AppState};
use crate::config::Role;
use crate::period::{rfc3339, Period, Unit};
use crate::storage::snapshot::Grain;

const HOUR: u64 = 3_600_000;
const DAY: u64 = 86_400_000;
/// Most buckets one query may ask for (hourly: 31 days).
const MAX_BUCKETS: u64 = 744;
/// Subjects per export page at most.
const EXPORT_LIMIT: usize = 1000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Granularity {
    Hour,
    Day,
    Month,
}

impl Granularity {
    fn as_str(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
            Granularity::Month => "month",
        }
    }
}

/// Which endpoint a query is for: each takes its own parameters.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Subject,
    Export,
    Top,
}

/// A checked usage query.
struct Query {
    from: u64,
    to: u64,
    granularity: Granularity,
    tz_name: String,
    tz: TimeZone,
    csv: bool,
    after: Option<String>,
    limit: usize,
    /// `/v1/usage/top`: the metric to rank by.
    metric: String,
    /// A `history.dimensions` attribute to split buckets by.
    group_by: Option<String>,
}

/// `from`/`to`: RFC 3339, or `YYYY-MM-DD` (midnight in the query's time zone).
fn instant(field: &str, v: &str, tz: &TimeZone) -> Result<u64, ApiError> {
    let bad = || {
        ApiError::invalid(
            field,
            format!("{v:?} is not a time: use RFC 3339 (2026-11-21T10:00:00Z) or a date (2026-11-21)"),
        )
    };
    let ms = if let Ok(ts) = v.parse::<jiff::Timestamp>() {
        ts.as_millisecond()
    } else if v.len() != 10 {
        // A date and time without an offset names no instant.
        return Err(bad());
    } else {
        let d: jiff::civil::Date = v.parse().map_err(|_| bad())?;
        d.to_zoned(tz.clone()).map_err(|_| bad())?.timestamp().as_millisecond()
    };
    u64::try_from(ms).map_err(|_| ApiError::invalid(field, format!("{v:?} is before 1970")))
}

fn parse_query(q: Option<&str>, endpoint: Endpoint) -> Result<Query, ApiError> {
    let mut raw: BTreeMap<String, String> = BTreeMap::new();
    let known: &[&str] = match endpoint {
        Endpoint::Subject => &["from", "to", "granularity", "timezone", "group_by"],
        Endpoint::Export => &[
            "from",
            "to",
            "granularity",
            "timezone",
            "format",
            "after",
            "limit",
            "group_by",
        ],
        Endpoint::Top => &["metric", "from", "to", "timezone", "limit"],
    };
    let export = endpoint == Endpoint::Export;
    for (k, v) in form_urlencoded_pairs(q.unwrap_or(""))? {
        if !known.contains(&k.as_str()) {
            return Err(ApiError::invalid(
                &k,
                format!("unknown query parameter; use {}", known.join(", ")),
            ));
        }
        raw.insert(k, v);
    }
    let tz_name = raw.get("timezone").cloned().unwrap_or_else(|| "UTC".into());
    let tz = TimeZone::get(&tz_name).map_err(|_| {
        ApiError::invalid(
            "timezone",
            format!("{tz_name:?} is not an IANA time zone name such as Europe/Paris"),
        )
    })?;
    let granularity = match raw.get("granularity").map(String::as_str) {
        None | Some("day") => Granularity::Day,
        Some("month") => Granularity::Month,
        Some("hour") if !export => Granularity::Hour,
        Some(g) => {
            let allowed = if export { "day or month" } else { "hour, day or month" };
            return Err(ApiError::invalid(
                "granularity",
                format!("{g:?} is not one of {allowed}"),
            ));
        }
    };
    let from = raw
        .get("from")
        .ok_or_else(|| ApiError::invalid("from", "is required (RFC 3339 or YYYY-MM-DD)"))?;
    let to = raw
        .get("to")
        .ok_or_else(|| ApiError::invalid("to", "is required (RFC 3339 or YYYY-MM-DD; exclusive)"))?;
    let (from, to) = (instant("from", from, &tz)?, instant("to", to, &tz)?);
    if to <= from {
        return Err(ApiError::invalid("to", "must be after from"));
    }
    let span_max = match granularity {
        Granularity::Hour => MAX_BUCKETS * HOUR,
        _ => 3660 * DAY,
    };
    if to - from > span_max {
        return Err(ApiError::invalid(
            "to",
            format!(
                "the range is too long for {} buckets: at most {} days",
                granularity.as_str(),
                span_max / DAY
            ),
        ));
    }
    let csv = match raw.get("format").map(String::as_str) {
        None | Some("json") => false,
        Some("csv") => true,
        Some(f) => return Err(ApiError::invalid("format", format!("{f:?} is not json or csv"))),
    };
    let metric = match (endpoint, raw.get("metric")) {
        (Endpoint::Top, None) => {
            return Err(ApiError::invalid(
                "metric",
                "is required: the metric to rank subjects by, such as requests or tokens",
            ))
        }
        (_, m) => m.cloned().unwrap_or_default(),
    };
    let limit = match raw.get("limit") {
        None if endpoint == Endpoint::Top => 10,
        None => 100,
        Some(v) => v
            .parse()
            .ok()
            .filter(|n| (1..=EXPORT_LIMIT).contains(n))
            .ok_or_else(|| ApiError::invalid("limit", format!("must be a whole number from 1 to {EXPORT_LIMIT}")))?,
    };
    Ok(Query {
        from,
        to,
        granularity,
        tz_name,
        tz,
        csv,
        after: raw.get("after").cloned(),
        limit,
        metric,
        group_by: raw.get("group_by").cloned(),
    })
}

/// The start of the bucket that holds `ms`.
fn bucket(q: &Query, ms: u64) -> u64 {
    match q.granularity {
        Granularity::Hour => {
            Period {
                count: 1,
                unit: Unit::Hour,
            }
            .window(&q.tz, ms)
            .0
        }
        Granularity::Day => {
            Period {
                count: 1,
                unit: Unit::Day,
            }
            .window(&q.tz, ms)
            .0
        }
        Granularity::Month => {
            Period {
                count: 1,
                unit: Unit::Month,
            }
            .window(&q.tz, ms)
            .0
        }
    }
}

/// Where a query switches from daily to hourly stored buckets: day and month
/// buckets use the UTC daily ones for whole days before the hourly retention
/// began, and hourly ones from then on (exact in any time zone); hour buckets
/// use hourly ones only.
fn hours_from(q: &Query, now: u64, hourly_kept: u64) -> u64 {
    if q.granularity == Granularity::Hour {
        return 0;
    }
    let c = now.saturating_sub(hourly_kept);
    c.div_ceil(DAY) * DAY
}

/// The stored bucket ranges a query reads: daily buckets for whole days
/// before hourly retention began, hourly ones from then on (as
/// [`collect_for`] reads them); and where memory's hourly deltas switch.
fn parts(q: &Query, cut: u64) -> [(Grain, u64, u64); 2] {
    [
        (Grain::Day, q.from, q.to.min(cut)),
        (Grain::Hour, q.from.max(cut), q.to),
    ]
}

/// Bucket start → metric → amount.
type SubjectBuckets = BTreeMap<u64, BTreeMap<String, u64>>;
/// Subject → its buckets.
type Buckets = BTreeMap<String, SubjectBuckets>;
/// Some subjects' buckets, in subject order.
type Page = Vec<(String, SubjectBuckets)>;

fn add(into: &mut Buckets, q: &Query, subject: &str, start: u64, amounts: impl IntoIterator<Item = (String, u64)>) {
    if start < q.from || start >= q.to {
        return;
    }
    let b = into
        .entry(subject.to_string())
        .or_default()
        .entry(bucket(q, start))
        .or_default();
    for (m, a) in amounts {
        let v = b.entry(m).or_default();
        *v = v.saturating_add(a);
    }
}

/// Whose buckets to read.
enum Who<'a> {
    One(&'a str),
    /// These subjects (sorted), with the usage memory holds, read under the
    /// caller's usage read guard.
    Some(&'a [String], &'a crate::engine::UsageDeltas),
    All,
}

/// Every bucket of `subject` (or of every subject) in the query's range.
fn collect(st: &AppState, q: &Query, subject: Option<&str>) -> Result<Buckets, ApiError> {
    collect_for(st, q, subject.map_or(Who::All, Who::One))
}

fn collect_for(st: &AppState, q: &Query, who: Who<'_>) -> Result<Buckets, ApiError> {
    let core = st.core()?;
    let policy = core.engine.policy();
    let cut = hours_from(q, st.now(), policy.history_retention_ms.0);
    let unavailable = |e: crate::storage::snapshot::SnapshotError| {
        ApiError::Unavailable(format!("cannot read the usage history: {e}"))
    };
    // The file and memory as of one moment (`Who::Some` was read under the
    // caller's guard, which is held on through this read).
    let _reading = match who {
        Who::Some(..) => None,
        _ => Some(core.engine.usage_read()),
    };
    let mut out = Buckets::new();
    // Stored buckets start at their hour or UTC day: read from a day early so
    // a local day that began the UTC day before is whole.
    let (lo, hi) = (q.from.saturating_sub(DAY), q.to);
    if let Some(store) = &core.snapshots {
        for (grain, from, to) in [(Grain::Day, lo, hi.min(cut)), (Grain::Hour, lo.max(cut), hi)] {
            if from >= to {
                continue;
            }
            match who {
                Who::One(s) => {
                    for (start, amounts) in store.usage_of(grain, s, from, to).map_err(unavailable)? {
                        add(&mut out, q, s, start, amounts);
                    }
                }
                Who::Some(list, _) => {
                    for (s, start, amounts) in store.usage_of_many(grain, list, from, to).map_err(unavailable)? {
                        add(&mut out, q, &s, start, amounts);
                    }
                }
                Who::All => {
                    for (s, start, amounts) in store.usage_all(grain, from, to).map_err(unavailable)? {
                        add(&mut out, q, &s, start, amounts);
                    }
                }
            }
        }
    }
    let deltas = match who {
        Who::One(s) => core.engine.usage_deltas(Some(s)),
        Who::Some(list, memory) => memory
            .iter()
            .filter(|((s, _), _)| list.binary_search_by(|x| x.as_str().cmp(s)).is_ok())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        Who::All => core.engine.usage_deltas(None),
    };
    for ((s, hour), amounts) in deltas {
        let start = if hour < cut { hour - hour % DAY } else { hour };
        add(
            &mut out,
            q,
            &s,
            start,
            amounts.into_iter().map(|(m, a)| (m.to_string(), a)),
        );
    }
    Ok(out)
}

/// Checks `group_by` against `history.dimensions`.
fn check_group_by(st: &AppState, q: &Query) -> Result<(), ApiError> {
    let Some(g) = &q.group_by else { return Ok(()) };
    let dims = st.core()?.engine.policy().history_dimensions.clone();
    if dims.iter().any(|d| **d == **g) {
        return Ok(());
    }
    let kept = if dims.is_empty() {
        "none is (history.dimensions is empty)".to_string()
    } else {
        format!(
            "only {} (history.dimensions)",
            dims.iter().map(|d| format!("{d:?}")).collect::<Vec<_>>().join(", ")
        )
    };
    Err(ApiError::invalid(
        "group_by",
        format!(
            "usage is not kept per {g:?}: {kept}; add it to [history] dimensions to keep usage per value from then on"
        ),
    ))
}

/// One bucket's amounts as shown: the plain metrics (the totals), or with
/// `group_by` one entry per value of that attribute, then `None` for the
/// usage of calls that did not carry it (so the groups add up to the totals).
fn shown(amounts: BTreeMap<String, u64>, group_by: Option<&str>) -> Vec<(Option<String>, BTreeMap<String, u64>)> {
    use crate::engine::dimensions::split_usage_key;
    let mut plain = BTreeMap::new();
    let mut groups: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for (k, a) in amounts {
        match split_usage_key(&k) {
            None => {
                plain.insert(k, a);
            }
            Some((metric, d, value)) if Some(d) == group_by => {
                let v = groups
                    .entry(value.to_string())
                    .or_default()
                    .entry(metric.to_string())
                    .or_default();
                *v = v.saturating_add(a);
            }
            Some(_) => {}
        }
    }
    if group_by.is_none() {
        return vec![(None, plain)];
    }
    let mut rest = plain;
    for g in groups.values() {
        for (m, a) in g {
            if let Some(r) = rest.get_mut(m) {
                *r = r.saturating_sub(*a);
            }
        }
    }
    rest.retain(|_, a| *a > 0);
    let mut out: Vec<(Option<String>, BTreeMap<String, u64>)> = groups.into_iter().map(|(v, g)| (Some(v), g)).collect();
    if !rest.is_empty() {
        out.push((None, rest));
    }
    out
}

/// The grouping column of a shown bucket: `{"model": "gpt-4o"}` (or null),
/// nothing without `group_by`.
fn group_field(group_by: Option<&str>, value: Option<String>) -> BTreeMap<String, Option<String>> {
    group_by.map(|g| (g.to_string(), value)).into_iter().collect()
}

#[derive(Serialize)]
struct BucketOut {
    start: String,
    #[serde(flatten)]
    group: BTreeMap<String, Option<String>>,
    amounts: BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct SubjectUsage {
    subject: String,
    granularity: &'static str,
    timezone: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    group_by: Option<String>,
    buckets: Vec<BucketOut>,
}

/// `GET /v1/subjects/{subject}/usage`.
pub(super) async fn subject_usage(
    State(st): State<Arc<AppState>>,
    Path(subject): Path<String>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    subject_path(&subject)?;
    st.authorize_subject(&headers, &subject)?;
    let q = parse_query(q.as_deref(), Endpoint::Subject)?;
    check_group_by(&st, &q)?;
    let (mut all, q, subject) = off_the_workers(move || {
        let all = collect(&st, &q, Some(&subject))?;
        Ok((all, q, subject))
    })
    .await?;
    let g = q.group_by.as_deref();
    let buckets = all
        .remove(&subject)
        .unwrap_or_default()
        .into_iter()
        .flat_map(|(start, amounts)| {
            let start = rfc3339(start);
            shown(amounts, g).into_iter().map(move |(value, amounts)| BucketOut {
                start: start.clone(),
                group: group_field(g, value),
                amounts,
            })
        })
        .collect();
    Ok(Json(SubjectUsage {
        subject,
        granularity: q.granularity.as_str(),
        timezone: q.tz_name,
        group_by: q.group_by.clone(),
        buckets,
    })
    .into_response())
}

#[derive(Serialize)]
struct ExportRow {
    subject: String,
    start: String,
    #[serde(flatten)]
    group: BTreeMap<String, Option<String>>,
    amounts: BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct ExportPage {
    rows: Vec<ExportRow>,
    next_after: Option<String>,
}

/// Subjects per CSV chunk: a chunk is read, written out and dropped before
/// the next, so an export's memory does not grow with its length.
const CSV_PAGE_SUBJECTS: usize = 256;
/// `Retry-After` when every export slot is taken, in seconds.
const EXPORT_BUSY_RETRY_S: u64 = 5;

/// `GET /v1/usage`: every subject's buckets, for billing (admin).
pub(super) async fn export(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    let q = parse_query(q.as_deref(), Endpoint::Export)?;
    check_group_by(&st, &q)?;
    if q.csv {
        return export_csv(st, q);
    }
    let (page, next_after, q) = off_the_workers(move || {
        let (page, next) = export_page(&st, &q, q.after.clone(), q.limit)?;
        Ok((page, next, q))
    })
    .await?;
    let g = q.group_by.as_deref();
    let mut rows = Vec::new();
    for (subject, buckets) in page {
        for (start, amounts) in buckets {
            let start = rfc3339(start);
            for (value, amounts) in shown(amounts, g) {
                rows.push(ExportRow {
                    subject: subject.clone(),
                    start: start.clone(),
                    group: group_field(g, value),
                    amounts,
                });
            }
        }
    }
    Ok(Json(ExportPage { rows, next_after }).into_response())
}

/// The next subjects after `after` that have usage in the range, at most
/// `limit` of them, with their buckets; and the cursor of the page after
/// (`None` at the end). A page reads only its own subjects, on disk and in
/// memory, both under one usage read guard, so a snapshot between pages
/// neither hides a bucket nor counts it twice. Subjects with nothing in the
/// range are passed over, so that a page is empty only at the end (clients
/// stop at an empty page).
fn export_page(
    st: &AppState,
    q: &Query,
    mut cursor: Option<String>,
    limit: usize,
) -> Result<(Page, Option<String>), ApiError> {
    let core = st.core()?;
    loop {
        let _reading = core.engine.usage_read();
        let mut candidates: std::collections::BTreeSet<String> = match &core.snapshots {
            Some(store) => store
                .usage_subjects_after(cursor.as_deref(), limit + 1)
                .map_err(|e| ApiError::Unavailable(format!("cannot read the usage history: {e}")))?
                .into_iter()
                .collect(),
            None => Default::default(),
        };
        // Memory's first `limit + 1` subjects after the cursor, and their usage.
        let memory = core.engine.usage_deltas_after(cursor.as_deref(), limit + 1);
        candidates.extend(memory.keys().map(|(s, _)| s.to_string()));
        let more = candidates.len() > limit;
        let chosen: Vec<String> = candidates.into_iter().take(limit).collect();
        let last = chosen.last().cloned();
        // Sorted (a set's order), as `Who::Some` needs.
        let page: Page = collect_for(st, q, Who::Some(&chosen, &memory))?.into_iter().collect();
        if !page.is_empty() || !more {
            return Ok((page, if more { last } else { None }));
        }
        cursor = last;
    }
}

/// Runs a usage read on a blocking thread. It may wait while a snapshot moves
/// buckets from memory to the file, and it reads that file: neither belongs
/// on the threads that answer decisions.
async fn off_the_workers<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(read)
        .await
        .map_err(|e| ApiError::Unavailable(format!("the usage read failed: {e}")))?
}

/// The CSV export: streamed a page of subjects at a time, at most
/// `history.max_exports` at once.
fn export_csv(st: Arc<AppState>, q: Query) -> Result<Response, ApiError> {
    let permit = st.exports.clone().try_acquire_owned().map_err(|_| {
        ApiError::Busy(
            format!(
                "{} CSV exports are running, the configured maximum (history.max_exports); retry shortly",
                st.started_config.history.max_exports
            ),
            EXPORT_BUSY_RETRY_S,
        )
    })?;
    struct Export {
        st: Arc<AppState>,
        q: Arc<Query>,
        /// Where the next page starts; `None` with `done` at the end.
        cursor: Option<String>,
        header: bool,
        done: bool,
        /// Held until the stream ends or the client goes away.
        _permit: tokio::sync::OwnedSemaphorePermit,
    }
    let state = Export {
        st,
        cursor: q.after.clone(),
        q: Arc::new(q),
        header: true,
        done: false,
        _permit: permit,
    };
    let stream = futures_util::stream::unfold(state, |mut x| async move {
        if x.header {
            x.header = false;
            let header = match &x.q.group_by {
                Some(g) => format!("subject,start,{},metric,amount\n", csv_field(g)),
                None => "subject,start,metric,amount\n".to_string(),
            };
            return Some((Ok(axum::body::Bytes::from(header)), x));
        }
        loop {
            if x.done {
                return None;
            }
            let (st, q, cursor) = (x.st.clone(), x.q.clone(), x.cursor.take());
            match off_the_workers(move || export_page(&st, &q, cursor, CSV_PAGE_SUBJECTS)).await {
                Ok((page, next)) => {
                    x.done = next.is_none();
                    x.cursor = next;
                    if !page.is_empty() {
                        return Some((Ok(csv_chunk(&page, x.q.group_by.as_deref())), x));
                    }
                }
                Err(e) => {
                    // The answer has begun: all that is left is to cut it short,
                    // so the client sees a broken transfer, not a short file.
                    tracing::error!(error = %e, "usage export failed midway");
                    x.done = true;
                    return Some((Err(std::io::Error::other(e.to_string())), x));
                }
            }
        }
    });
    let mut resp = Body::from_stream(stream).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    Ok(resp)
}

/// A CSV field: a text that a spreadsheet would take for a formula (it
/// begins with `=`, `+`, `-`, `@`, a tab or a carriage return) gets a
/// leading `'`; a field holding a comma, a quote or a line break is quoted.
fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    let s: std::borrow::Cow<'_, str> = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}").into()
    } else {
        s.into()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\"")).into()
    } else {
        s
    }
}

/// CSV lines of some subjects: `subject,start,metric,amount`, or with
/// `group_by` `subject,start,<value>,metric,amount` (the value empty for
/// calls without it).
fn csv_chunk(rows: &[(String, SubjectBuckets)], group_by: Option<&str>) -> axum::body::Bytes {
    let mut out = String::new();
    for (subject, buckets) in rows {
        let subject = csv_field(subject);
        for (start, amounts) in buckets {
            let start = rfc3339(*start);
            for (value, amounts) in shown(amounts.clone(), group_by) {
                let value = match (&value, group_by) {
                    (Some(v), _) => format!("{},", csv_field(v)),
                    (None, Some(_)) => ",".to_string(),
                    (None, None) => String::new(),
                };
                for (m, a) in amounts {
                    out.push_str(&format!("{subject},{start},{value}{},{a}\n", csv_field(&m)));
                }
            }
        }
    }
    out.into()
}

#[derive(Serialize)]
struct TopRow {
    subject: String,
    amount: u64,
}

#[derive(Serialize)]
struct Top {
    metric: String,
    rows: Vec<TopRow>,
}

/// `GET /v1/usage/top`: the subjects with the most of a metric in a range
/// (admin). Exact: every stored bucket in the range is read (merged in
/// subject order, so memory holds only the `limit` best, not a row per
/// subject) and what memory holds since the last snapshot is added. A scan
/// is one pass over the range's buckets, kept until the next snapshot; it
/// runs off the async threads and shares `history.max_exports` with the
/// CSV exports.
pub(super) async fn top(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    let q = parse_query(q.as_deref(), Endpoint::Top)?;
    let permit = st.exports.clone().try_acquire_owned().map_err(|_| {
        ApiError::Busy(
            format!(
                "{} usage scans (exports and top lists) are running, the configured maximum (history.max_exports); retry shortly",
                st.started_config.history.max_exports
            ),
            EXPORT_BUSY_RETRY_S,
        )
    })?;
    let rows = off_the_workers(move || {
        let _permit = permit;
        top_rows(&st, &q)
    })
    .await?;
    Ok(Json(rows).into_response())
}

/// The best `limit` subjects offered so far: most first, ties by name.
struct Ranking {
    limit: usize,
    /// The root is the one to drop next (least amount, then the last name).
    best: std::collections::BinaryHeap<std::cmp::Reverse<(u64, std::cmp::Reverse<String>)>>,
}

impl Ranking {
    fn new(limit: usize) -> Ranking {
        Ranking {
            limit,
            best: Default::default(),
        }
    }

    fn offer(&mut self, subject: &str, amount: u64) {
        use std::cmp::Reverse;
        if amount == 0 {
            return;
        }
        if self.best.len() == self.limit {
            match self.best.peek() {
                Some(Reverse((a, Reverse(s)))) if (amount, Reverse(subject)) > (*a, Reverse(s.as_str())) => {
                    self.best.pop();
                }
                _ => return,
            }
        }
        self.best.push(Reverse((amount, Reverse(subject.to_string()))));
    }

    fn rows(self) -> Vec<(String, u64)> {
        let mut rows: Vec<(String, u64)> = self
            .best
            .into_iter()
            .map(|std::cmp::Reverse((amount, std::cmp::Reverse(subject)))| (subject, amount))
            .collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        rows
    }
}

/// What a top list of the snapshot file alone is kept under.
#[derive(Clone, PartialEq, Eq)]
pub struct TopKey {
    metric: String,
    parts: [(Grain, u64, u64); 2],
    limit: usize,
}

/// Top lists of the snapshot file alone, each with the file's generation it
/// was computed from: the file changes only when a snapshot is written, so
/// until then a repeated top list (a dashboard's refresh) reads only what
/// memory adds, not every bucket again.
#[derive(Default)]
pub struct TopCache(std::sync::Mutex<std::collections::VecDeque<(TopKey, u64, Ranked)>>);

/// A top list: subject and amount, most first.
type Ranked = Arc<Vec<(String, u64)>>;

/// Top lists kept at most.
const TOP_CACHE_ENTRIES: usize = 16;

impl TopCache {
    fn get(&self, key: &TopKey, generation: u64) -> Option<Ranked> {
        let entries = self.0.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .iter()
            .find(|(k, g, _)| k == key && *g == generation)
            .map(|(_, _, rows)| rows.clone())
    }

    fn put(&self, key: TopKey, generation: u64, rows: Ranked) {
        let mut entries = self.0.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|(k, _, _)| *k != key);
        if entries.len() >= TOP_CACHE_ENTRIES {
            entries.pop_front();
        }
        entries.push_back((key, generation, rows));
    }
}

/// The top list: the file's own top `limit` (scanned, or kept from an
/// earlier scan of the same file), with the subjects memory adds to
/// re-ranked on their whole totals (their stored part read one by one). A
/// subject memory does not touch and that is not in the file's top `limit`
/// has `limit` others at least as far ahead in the file, so it cannot rank.
fn top_rows(st: &AppState, q: &Query) -> Result<Top, ApiError> {
    let core = st.core()?;
    let cut = hours_from(q, st.now(), core.engine.policy().history_retention_ms.0);
    let parts = parts(q, cut);
    let unreadable = |e: crate::storage::snapshot::SnapshotError| {
        ApiError::Unavailable(format!("cannot read the usage history: {e}"))
    };
    // The file and memory as of one moment: a snapshot waits for this.
    let _reading = core.engine.usage_read();
    // What memory holds, per subject, in the range.
    let mut memory: BTreeMap<Arc<str>, u64> = BTreeMap::new();
    for ((s, hour), amounts) in core.engine.usage_deltas(None) {
        let start = if hour < cut { hour - hour % DAY } else { hour };
        if start < q.from || start >= q.to {
            continue;
        }
        if let Some((_, a)) = amounts.iter().find(|(m, _)| **m == *q.metric) {
            let v = memory.entry(s.name().clone()).or_default();
            *v = v.saturating_add(*a);
        }
    }
    let mut ranking = Ranking::new(q.limit);
    match &core.snapshots {
        Some(store) => {
            let key = TopKey {
                metric: q.metric.clone(),
                parts,
                limit: q.limit,
            };
            // Read before the scan: a file replaced meanwhile only makes
            // the kept list look older than it is.
            let generation = store.generation();
            let stored = match st.top_cache.get(&key, generation) {
                Some(rows) => rows,
                None => {
                    let mut file = Ranking::new(q.limit);
                    store
                        .usage_totals(&q.metric, &parts, |s, amount| file.offer(s, amount))
                        .map_err(unreadable)?;
                    let rows = Arc::new(file.rows());
                    st.top_cache.put(key, generation, rows.clone());
                    rows
                }
            };
            for (s, amount) in stored.iter() {
                if !memory.contains_key(s.as_str()) {
                    ranking.offer(s, *amount);
                }
            }
            let totals = store
                .usage_totals_of(&q.metric, &parts, memory.keys().map(|s| &**s))
                .map_err(unreadable)?;
            for (s, stored) in totals {
                ranking.offer(s, stored.saturating_add(memory[s]));
            }
        }
        None => {
            for (s, a) in &memory {
                ranking.offer(s, *a);
            }
        }
    }
    Ok(Top {
        metric: q.metric.clone(),
        rows: ranking
            .rows()
            .into_iter()
            .map(|(subject, amount)| TopRow { subject, amount })
            .collect(),
    })
}

#[derive(Serialize)]
struct FullCounter {
    #[serde(flatten)]
    counter: crate::engine::CounterView,
    /// `used / max`.
    fraction: f64,
}

#[derive(Serialize)]
struct Fullest {
    counters: Vec<FullCounter>,
}

/// Most counters `GET /v1/counters` lists.
const COUNTERS_LIMIT: usize = 1000;

/// `GET /v1/counters?min_fraction=&limit=`: counters at or above a fraction
/// of their max, fullest first (admin). One pass over the counters in
/// memory, off the async threads.
pub(super) async fn counters(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    let (mut min_fraction, mut limit) = (0.8f64, 100usize);
    for (k, v) in form_urlencoded_pairs(q.as_deref().unwrap_or(""))? {
        match k.as_str() {
            "min_fraction" => {
                min_fraction = v
                    .trim()
                    .parse()
                    .ok()
                    .filter(|f: &f64| f.is_finite() && *f > 0.0)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "min_fraction",
                            format!("{v:?} is not a number above 0 (0.8 lists counters at 80% of their max or more)"),
                        )
                    })?
            }
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=COUNTERS_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid("limit", format!("must be a whole number from 1 to {COUNTERS_LIMIT}"))
                    })?
            }
            other => {
                return Err(ApiError::invalid(
                    other,
                    "unknown query parameter; use min_fraction and limit",
                ))
            }
        }
    }
    let engine = st.core()?.engine.clone();
    let now = st.now();
    let found = tokio::task::spawn_blocking(move || engine.fullest_counters(min_fraction, limit, now))
        .await
        .map_err(|e| ApiError::Unavailable(format!("the counter scan failed: {e}")))?;
    Ok(Json(Fullest {
        counters: found
            .into_iter()
            .map(|(fraction, counter)| FullCounter { counter, fraction })
            .collect(),
    })
    .into_response())
}
