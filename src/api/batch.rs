//! `POST /v1/batch`: up to 1000 decision and reservation operations in one
//! request. Each is answered exactly as its single call would be (operations are
//! not atomic together); all of them are made durable by one wait on the WAL, so
//! a batch costs one group commit instead of one per operation.
//!
//! ```json
//! {"operations":[{"op":"consume","subject":"u","amounts":{"tokens":5}},
//!                {"op":"commit","reservation_id":"rsv_…","amounts":{"tokens":3}}]}
//! → {"results":[{"status":200,"body":{…decision…}}, {"status":404,"body":{"error":{…}}}]}
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{
    body_bytes_named, check_amounts, check_text, decide_now, decode, note_decision, parse, ApiError, AppState,
};
use crate::config::Role;
use crate::engine::policy::Priority;
use crate::engine::{Applied, DecideOp, Decision, Finish, FinishAnswer, Lsn};

/// Operations per batch at most.
pub const BATCH_OPERATIONS_MAX: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    operations: Vec<Box<RawValue>>,
}

/// Just the operation name; the rest is parsed by the operation's own rules.
#[derive(Deserialize)]
struct OpName {
    op: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FinishOp {
    #[allow(dead_code)]
    op: String,
    reservation_id: String,
    #[serde(default)]
    amounts: BTreeMap<String, u64>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum ResultBody {
    Decision(Decision),
    Finish(FinishAnswer),
    Error(serde_json::Value),
}

#[derive(Serialize)]
struct OpResult {
    status: u16,
    body: ResultBody,
}

#[derive(Serialize)]
struct BatchAnswer {
    results: Vec<OpResult>,
}

fn error_result(e: &ApiError) -> OpResult {
    let (status, code) = e.status_and_code();
    OpResult {
        status: status.as_u16(),
        body: ResultBody::Error(serde_json::json!({"error": {"code": code, "message": e.to_string()}})),
    }
}

/// Runs one operation up to (not including) its durable wait.
fn run_op(
    st: &AppState,
    raw: &RawValue,
    max_priority: Priority,
) -> Result<(ResultBody, Option<Lsn>, Option<DecideOp>), ApiError> {
    let text = raw.get().as_bytes();
    // The batch body was checked whole for repeated keys.
    let name: OpName = decode(text)?;
    let no_headers = HeaderMap::new();
    let decide = |op: DecideOp| -> Result<_, ApiError> {
        let Applied { value, lsn } = decide_now(st, &no_headers, text, op, true, max_priority)?.applied;
        Ok((ResultBody::Decision(value), lsn, Some(op)))
    };
    match name.op.as_deref() {
        Some("check") => decide(DecideOp::Check),
        Some("consume") => decide(DecideOp::Consume),
        Some("reserve") => decide(DecideOp::Reserve),
        Some(op @ ("commit" | "release")) => {
            let f: FinishOp = decode(text)?;
            check_text("reservation_id", &f.reservation_id, 128)?;
            check_amounts("amounts", &f.amounts)?;
            let action = if op == "commit" {
                Finish::Commit(f.amounts)
            } else if f.amounts.is_empty() {
                Finish::Release
            } else {
                return Err(ApiError::invalid("amounts", "release takes no amounts"));
            };
            st.writable()?;
            let Applied { value, lsn } = st.engine()?.finish(&f.reservation_id, action, st.now())?;
            Ok((ResultBody::Finish(value), lsn, None))
        }
        Some(other) => Err(ApiError::invalid(
            "op",
            format!("unknown operation {other:?}; use consume, check, reserve, commit or release"),
        )),
        None => Err(ApiError::invalid(
            "op",
            "is required: consume, check, reserve, commit or release",
        )),
    }
}

/// `POST /v1/batch`.
pub(super) async fn batch(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let grant = st.authorize(&headers, Role::Client)?;
    let bytes = body_bytes_named(body, st.max_batch_bytes, "server.max_batch_bytes")?;
    let b: BatchBody = parse(&bytes)?;
    if b.operations.is_empty() || b.operations.len() > BATCH_OPERATIONS_MAX {
        return Err(ApiError::invalid(
            "operations",
            format!(
                "must hold 1 to {BATCH_OPERATIONS_MAX} operations, got {}",
                b.operations.len()
            ),
        ));
    }
    let mut results = Vec::with_capacity(b.operations.len());
    let mut decided = Vec::new();
    let mut max_lsn: Option<Lsn> = None;
    for (i, raw) in b.operations.iter().enumerate() {
        match run_op(&st, raw, grant.max_priority) {
            Ok((body, lsn, op)) => {
                max_lsn = max_lsn.max(lsn);
                if let Some(op) = op {
                    decided.push((i, op));
                }
                results.push(OpResult { status: 200, body });
            }
            Err(e) => results.push(error_result(&e)),
        }
    }
    // One wait covers every operation: LSNs are durable in order.
    if let Some(lsn) = max_lsn {
        st.wait(lsn).await?;
    }
    for (i, op) in decided {
        if let ResultBody::Decision(d) = &results[i].body {
            note_decision(&st, op, d);
        }
    }
    for r in &results {
        if let ResultBody::Finish(f) = &r.body {
            st.metrics.committed(f);
        }
    }
    let capacity = 512 * results.len();
    Ok(super::json_response(&BatchAnswer { results }, capacity))
}
