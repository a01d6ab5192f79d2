//! Usage history over HTTP: one subject's buckets
//! (`GET /v1/subjects/{s}/usage`) and every subject's for billing
//! (`GET /v1/usage`, JSON pages or CSV). Buckets come from the snapshot file
//! and from what memory holds since the last snapshot, added together.

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

fn parse_query(q: Option<&str>, export: bool) -> Result<Query, ApiError> {
    let mut raw: BTreeMap<String, String> = BTreeMap::new();
    let known: &[&str] = if export {
        &["from", "to", "granularity", "timezone", "format", "after", "limit"]
    } else {
        &["from", "to", "granularity", "timezone"]
    };
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
    let limit = match raw.get("limit") {
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

/// Bucket start → metric → amount.
type SubjectBuckets = BTreeMap<u64, BTreeMap<String, u64>>;
/// Subject → its buckets.
type Buckets = BTreeMap<String, SubjectBuckets>;

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
    /// These subjects (sorted), with the usage memory holds, already read.
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

#[derive(Serialize)]
struct BucketOut {
    start: String,
    amounts: BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct SubjectUsage {
    subject: String,
    granularity: &'static str,
    timezone: String,
    buckets: Vec<BucketOut>,
}

/// `GET /v1/subjects/{subject}/usage`.
pub(super) async fn subject_usage(
    State(st): State<Arc<AppState>>,
    Path(subject): Path<String>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Client)?;
    subject_path(&subject)?;
    let q = parse_query(q.as_deref(), false)?;
    let mut all = collect(&st, &q, Some(&subject))?;
    let buckets = all
        .remove(&subject)
        .unwrap_or_default()
        .into_iter()
        .map(|(start, amounts)| BucketOut {
            start: rfc3339(start),
            amounts,
        })
        .collect();
    Ok(Json(SubjectUsage {
        subject,
        granularity: q.granularity.as_str(),
        timezone: q.tz_name,
        buckets,
    })
    .into_response())
}

#[derive(Serialize)]
struct ExportRow {
    subject: String,
    start: String,
    amounts: BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct ExportPage {
    rows: Vec<ExportRow>,
    next_after: Option<String>,
}

/// `GET /v1/usage`: every subject's buckets, for billing (admin).
pub(super) async fn export(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    st.authorize(&headers, Role::Admin)?;
    let q = parse_query(q.as_deref(), true)?;
    if q.csv {
        let all = collect(&st, &q, None)?;
        let after = q.after.clone();
        let subjects = all
            .into_iter()
            .filter(move |(s, _)| after.as_deref().is_none_or(|a| s.as_str() > a));
        // Streamed a few subjects at a time.
        let rows: Vec<(String, SubjectBuckets)> = subjects.collect();
        let header_line = std::iter::once(Ok::<_, std::convert::Infallible>(axum::body::Bytes::from_static(
            b"subject,start,metric,amount\n",
        )));
        let chunks = rows.chunks(100).map(csv_chunk).collect::<Vec<_>>();
        let stream = futures_util::stream::iter(header_line.chain(chunks.into_iter().map(Ok)));
        let mut resp = Body::from_stream(stream).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/csv; charset=utf-8"),
        );
        return Ok(resp);
    }
    // A page reads only its own subjects: the next ones on disk and in memory.
    // Subjects with nothing in the range are passed over, so that a page is
    // empty only at the end (clients stop at an empty page).
    let core = st.core()?;
    // What memory holds is read once for every page this request looks at.
    let memory = core.engine.usage_deltas(None);
    let mut cursor = q.after.clone();
    let (page, next_after) = loop {
        let mut candidates: std::collections::BTreeSet<String> = match &core.snapshots {
            Some(store) => store
                .usage_subjects_after(cursor.as_deref(), q.limit + 1)
                .map_err(|e| ApiError::Unavailable(format!("cannot read the usage history: {e}")))?
                .into_iter()
                .collect(),
            None => Default::default(),
        };
        candidates.extend(
            memory
                .keys()
                .filter(|(s, _)| cursor.as_deref().is_none_or(|a| &**s > a))
                .map(|(s, _)| s.to_string()),
        );
        let more = candidates.len() > q.limit;
        let chosen: Vec<String> = candidates.into_iter().take(q.limit).collect();
        let last = chosen.last().cloned();
        // Sorted (a set's order), as `Who::Some` needs.
        let page: Vec<(String, SubjectBuckets)> =
            collect_for(&st, &q, Who::Some(&chosen, &memory))?.into_iter().collect();
        if !page.is_empty() || !more {
            break (page, if more { last } else { None });
        }
        cursor = last;
    };
    let rows = page
        .into_iter()
        .flat_map(|(subject, buckets)| {
            buckets.into_iter().map(move |(start, amounts)| ExportRow {
                subject: subject.clone(),
                start: rfc3339(start),
                amounts,
            })
        })
        .collect();
    Ok(Json(ExportPage { rows, next_after }).into_response())
}

/// CSV lines of some subjects: `subject,start,metric,amount`, fields quoted
/// when they hold a comma, a quote or a line break.
fn csv_chunk(rows: &[(String, SubjectBuckets)]) -> axum::body::Bytes {
    fn field(s: &str) -> std::borrow::Cow<'_, str> {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\"")).into()
        } else {
            s.into()
        }
    }
    let mut out = String::new();
    for (subject, buckets) in rows {
        for (start, amounts) in buckets {
            let start = rfc3339(*start);
            for (m, a) in amounts {
                out.push_str(&format!("{},{start},{},{a}\n", field(subject), field(m)));
            }
        }
    }
    out.into()
}
