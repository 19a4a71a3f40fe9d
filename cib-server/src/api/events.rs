//! The event stream: every typed event, from a sequence number on, then live.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use http::{HeaderMap, Uri};
use serde_json::json;

use crate::error::ApiError;
use crate::openapi::{DocGen, Op, Param};
use crate::state::AppState;

/// `GET /api/v1/events`.
pub async fn stream(State(state): State<Arc<AppState>>, headers: HeaderMap, uri: Uri) -> Result<Response, ApiError> {
    let from = crate::sse::resume_point(&headers, &uri).map_err(ApiError::BadRequest)?;
    Ok(crate::sse::event_stream(state, from).map(axum::body::Body::new))
}

pub fn stream_doc(g: &mut DocGen) -> Op {
    let number = json!({ "type": "string", "pattern": "^[0-9]{1,19}$" });
    Op::new("Every typed event as server-sent events, from `Last-Event-ID` on, then live.")
        .describe("`event: event`, `id:` the sequence number, data the event as JSON (`{\"seq\", \"at\", \"type\", ...}`). Idle streams get a comment every 15 seconds.")
        .param(Param::header("Last-Event-ID", "The last sequence number seen.", number.clone()))
        .param(Param::query("from", "The last sequence number seen, when no header can be sent.", number))
        .text(200, "The stream.", "text/event-stream")
        .error(g, 400, "A parameter is malformed.")
}
