//! `GET /v1/openapi.json`: the API as an OpenAPI 3.1 document.
//!
//! This module owns serving the document; the document itself is
//! `openapi.json` beside this file, written by hand and compiled into the
//! binary, so the daemon serves exactly the text in the source tree.
//! `tests/openapi.rs` checks that its paths and methods are the router's and
//! that every reference in it resolves; `.ci/openapi.sh` checks it against a
//! running daemon with schemathesis. Change it together with the handlers.
//!
//! The handler needs no state: authentication happens before it, in the
//! router's gate, as for every other client endpoint.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The document, as served.
pub const DOCUMENT: &str = include_str!("openapi.json");

/// `GET /v1/openapi.json`.
pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT).into_response()
}
