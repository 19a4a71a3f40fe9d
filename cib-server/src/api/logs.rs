//! Step logs: read from an offset, or followed as a server-sent event stream.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use cib_core::event::BuildId;
use cib_core::ports::LogKey;
use http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use serde_json::json;

use crate::error::ApiError;
use crate::extract::{PathParams, QueryMap};
use crate::openapi::{DocGen, Op, Param};
use crate::state::AppState;

/// The log a request names: `?attempt=N`, or the step's latest attempt.
async fn log_key(state: &AppState, q: &QueryMap, id: &str, step: &str) -> Result<LogKey, ApiError> {
    let attempt = match q.whole::<u32>("attempt", "a number", 9)? {
        Some(a) => a,
        None => {
            let record = state
                .store
                .build(&BuildId(id.to_owned()))
                .await
                .map_err(ApiError::unavailable)?
                .ok_or_else(|| ApiError::NotFound(format!("no build '{id}'")))?;
            record
                .steps
                .iter()
                .filter(|s| s.name == step)
                .map(|s| s.attempt)
                .max()
                .ok_or_else(|| ApiError::NotFound(format!("step '{step}' of build '{id}' has not started")))?
        }
    };
    Ok(LogKey { build: BuildId(id.to_owned()), step: step.to_owned(), attempt })
}

/// `GET /api/v1/builds/{build}/steps/{step}/log`.
pub async fn read(
    State(state): State<Arc<AppState>>,
    PathParams((id, step)): PathParams<(String, String)>,
    q: QueryMap,
) -> Result<Response, ApiError> {
    let key = log_key(&state, &q, &id, &step).await?;
    let offset = q.whole::<u64>("offset", "a byte offset", 19)?.unwrap_or(0);
    let stamped = q.get("timestamps").is_some_and(|v| v == "true" || v.is_empty());
    let read = state.store.read_log(&key, offset, 4 * 1024 * 1024).await.map_err(ApiError::unavailable)?;
    let body = if stamped {
        let marks = state.store.log_times(&key, 0, 1_000_000).await.unwrap_or_default();
        stamp_lines(&read.data, offset, &marks)
    } else {
        read.data
    };
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if let Ok(v) = HeaderValue::from_str(&read.next_offset.to_string()) {
        headers.insert("x-cib-next-offset", v);
    }
    headers.insert("x-cib-complete", HeaderValue::from_static(if read.complete { "true" } else { "false" }));
    Ok(response)
}

fn number() -> serde_json::Value {
    json!({ "type": "string", "pattern": "^[0-9]{1,19}$" })
}

fn attempt() -> Param {
    Param::query(
        "attempt",
        "The attempt (default: the latest).",
        json!({ "type": "string", "pattern": "^0*[0-9]{1,9}$" }),
    )
}

pub fn read_doc(g: &mut DocGen) -> Op {
    Op::new("A step's log as text, from a byte offset.")
        .param(Param::path("build", "The build's id."))
        .param(Param::path("step", "The step's name."))
        .param(attempt())
        .param(Param::query(
            "offset",
            "The byte offset to start at (default 0).",
            json!({ "type": "string", "pattern": "^0*[0-9]{1,19}$" }),
        ))
        .param(Param::query(
            "timestamps",
            "`true` (or empty) starts each line with when it was printed.",
            json!({ "type": "string" }),
        ))
        .text(200, "The log from the offset.", "text/plain; charset=utf-8")
        .header("X-Cib-Next-Offset", "Where to read on.", json!({ "type": "string", "pattern": "^[0-9]+$" }))
        .header(
            "X-Cib-Complete",
            "`true` once the step has ended and this is the end.",
            json!({ "enum": ["true", "false"] }),
        )
        .error(g, 400, "A parameter is malformed.")
        .error(g, 404, "No such build, or the step has not started.")
}

/// `GET /api/v1/builds/{build}/steps/{step}/log/stream`.
pub async fn stream(
    State(state): State<Arc<AppState>>,
    PathParams((id, step)): PathParams<(String, String)>,
    q: QueryMap,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let key = log_key(&state, &q, &id, &step).await?;
    let from = crate::sse::resume_point(&headers, &uri).map_err(ApiError::BadRequest)?;
    Ok(crate::sse::log_stream(state.clone(), key, from).map(axum::body::Body::new))
}

pub fn stream_doc(g: &mut DocGen) -> Op {
    Op::new("A step's log as server-sent events, growing until the step ends.")
        .describe(
            "`event: log` with data `{\"offset\", \"text\"}` (or `\"bytes\"` for output that is not UTF-8), each with `id:` the byte offset after it; `event: end` when the step has ended. Resume with `Last-Event-ID`.",
        )
        .param(Param::path("build", "The build's id."))
        .param(Param::path("step", "The step's name."))
        .param(attempt())
        .param(Param::header("Last-Event-ID", "The byte offset to resume from.", number()))
        .param(Param::query("from", "The byte offset to resume from, when no header can be sent.", number()))
        .text(200, "The stream.", "text/event-stream")
        .error(g, 400, "A parameter is malformed.")
        .error(g, 404, "No such build, or the step has not started.")
}

/// Prefixes each line of `data` (which starts at byte `offset` of its log) with the time of
/// the last mark at or before the line's start: `[2026-11-29T05:59:13.123Z] text`.
fn stamp_lines(data: &[u8], offset: u64, marks: &[(u64, cib_core::time::Timestamp)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 8);
    let mut start = 0usize;
    while start < data.len() {
        let end = data[start..].iter().position(|b| *b == b'\n').map_or(data.len(), |i| start + i + 1);
        let at = offset + start as u64;
        // Marks come in offset order, so the last one at or before the line is found by halving.
        match marks.partition_point(|(o, _)| *o <= at).checked_sub(1).map(|i| &marks[i]) {
            Some((_, t)) => out.extend_from_slice(format!("[{}] ", t.rfc3339()).as_bytes()),
            None => out.extend_from_slice(b"[unknown time] "),
        }
        out.extend_from_slice(&data[start..end]);
        start = end;
    }
    out
}
