//! The worker API: what `cib worker` processes call while they run a job. Every request
//! carries a job-scoped token as a bearer token (the job token to claim, then the claim token),
//! which `cib_worker::BrokerExecutor` checks; API tokens open nothing here. The tokens expire
//! with the step, and only the newest claim's token is accepted (fencing).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use cib_core::ports::Stream;
use cib_worker::JobError;
use cib_worker::protocol::{ClaimRequest, ErrorBody, HeartbeatAnswer, OutputAck, ResultBody};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::error::json_response;
use crate::openapi::{DocGen, Op, Param};
use crate::state::AppState;

/// A chunk of output is at most this large.
const MAX_CHUNK: usize = 4 * 1024 * 1024;

fn refuse(error: &JobError) -> Response {
    let status = match error {
        JobError::Unauthorized => StatusCode::UNAUTHORIZED,
        JobError::Held { .. } | JobError::Fenced { .. } | JobError::Offset { .. } => StatusCode::CONFLICT,
        JobError::Ended => StatusCode::GONE,
        JobError::BadRequest(_) => StatusCode::BAD_REQUEST,
        JobError::Internal(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let body = ErrorBody {
        code: error.code().into(),
        message: error.to_string(),
        offset: match error {
            JobError::Offset { expected } => Some(*expected),
            _ => None,
        },
        retry_ms: match error {
            JobError::Held { retry } => Some(u64::try_from(retry.as_millis()).unwrap_or(u64::MAX)),
            _ => None,
        },
    };
    let mut response = json_response(status, &body);
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
    }
    response
}

/// The broker executor and the bearer token, or the refusal: a server without `[broker]`
/// knows no job, so every token is refused as unknown.
fn opened(state: &AppState, headers: &HeaderMap) -> Result<(Arc<cib_worker::BrokerExecutor>, String), Response> {
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    match (state.workers.get(), token) {
        (Some(broker), Some(token)) => Ok((broker.clone(), token.to_owned())),
        _ => Err(refuse(&JobError::Unauthorized)),
    }
}

async fn body_bytes(body: axum::body::Body, limit: usize) -> Result<bytes::Bytes, Response> {
    crate::extract::read_body(body, limit)
        .await
        .map_err(|e| refuse(&JobError::BadRequest(format!("cannot read the body: {e:?}"))))
}

/// A small JSON body of the shape `T`; a body that is not one is refused with `shape`, the
/// form it should have.
async fn json_body<T: serde::de::DeserializeOwned>(body: axum::body::Body, shape: &str) -> Result<T, Response> {
    let bytes = body_bytes(body, 64 * 1024).await?;
    serde_json::from_slice(&bytes).map_err(|e| refuse(&JobError::BadRequest(format!("{shape}: {e}"))))
}

/// `POST /api/v1/worker/jobs/{job}/claim`.
pub async fn claim(
    State(state): State<Arc<AppState>>,
    Path(job): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let (broker, token) = match opened(&state, &headers) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let request: ClaimRequest = match json_body(body, "the claim must be {\"worker\": NAME}").await {
        Ok(r) => r,
        Err(r) => return r,
    };
    match broker.claim(&job, &token, &request.worker) {
        Ok(claim) => json_response(StatusCode::OK, &claim),
        Err(e) => refuse(&e),
    }
}

pub fn claim_doc(_g: &mut DocGen) -> Op {
    Op::new("A worker claims a job, with the job token from the broker's message.")
        .describe(
            "Answers the step's commands, environment (secrets included), the values to mask, its \
             timeouts and a claim token with its fencing number. 409 `held` while another worker's \
             claim still heartbeats (ask again after `retry_ms`); 410 `ended` once the step is over.",
        )
        .param(Param::path("job", "The job's id, from the broker's message."))
        .body(json!({"type": "object", "required": ["worker"], "properties": {"worker": {"type": "string"}}}))
        .json(200, "The claim.", json!({"type": "object"}))
        .json(401, "The token does not open this job.", error_schema())
        .json(409, "Another worker holds the job.", error_schema())
        .json(410, "The step has ended.", error_schema())
        .json(503, "The job's record could not be read or written; try again.", error_schema())
}

/// `GET /api/v1/worker/jobs/{job}/workspace`.
pub async fn workspace(State(state): State<Arc<AppState>>, Path(job): Path<String>, headers: HeaderMap) -> Response {
    let (broker, token) = match opened(&state, &headers) {
        Ok(o) => o,
        Err(r) => return r,
    };
    match broker.workspace(&job, &token).await {
        Ok(archive) => {
            let mut response = Response::new(axum::body::Body::from(archive));
            response
                .headers_mut()
                .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/gzip"));
            response
        }
        Err(e) => refuse(&e),
    }
}

pub fn workspace_doc(_g: &mut DocGen) -> Op {
    Op::new("The step's workspace, as a gzip-compressed tar archive, for the claim token.")
        .param(Param::path("job", "The job's id."))
        .text(200, "The archive.", "application/gzip")
        .json(409, "The claim was taken over (fenced).", error_schema())
        .json(410, "The step has ended.", error_schema())
        .json(401, "The token does not open this job.", error_schema())
        .json(503, "The job's record could not be read or written; try again.", error_schema())
}

#[derive(Debug, Deserialize)]
pub struct OutputQuery {
    offset: u64,
    #[serde(default)]
    stream: Option<String>,
}

/// `POST /api/v1/worker/jobs/{job}/output?offset=N&stream=stdout`.
pub async fn output(
    State(state): State<Arc<AppState>>,
    Path(job): Path<String>,
    query: Result<Query<OutputQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let (broker, token) = match opened(&state, &headers) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let Ok(Query(query)) = query else {
        return refuse(&JobError::BadRequest("offset=N (and stream=stdout or stderr) are required".into()));
    };
    let stream = match query.stream.as_deref() {
        None | Some("stdout") => Stream::Stdout,
        Some("stderr") => Stream::Stderr,
        Some(other) => return refuse(&JobError::BadRequest(format!("stream '{other}': stdout or stderr"))),
    };
    let bytes = match body_bytes(body, MAX_CHUNK).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match broker.output(&job, &token, query.offset, stream, &bytes) {
        Ok(offset) => json_response(StatusCode::OK, &OutputAck { offset }),
        Err(e) => refuse(&e),
    }
}

pub fn output_doc(_g: &mut DocGen) -> Op {
    Op::new("A chunk of the step's output, from byte `offset` of this claim's output.")
        .describe(
            "Bytes the server holds already are skipped, so a chunk whose answer was lost can be sent \
             again; a gap is refused with 409 `offset` and the offset expected.",
        )
        .param(Param::path("job", "The job's id."))
        .param(
            Param::query("offset", "Where the chunk starts in this claim's output.", json!({"type": "integer"}))
                .required(),
        )
        .param(Param::query("stream", "`stdout` (the default) or `stderr`.", json!({"type": "string"})))
        .json(
            200,
            "How many bytes of this claim's output the server holds.",
            json!({"type": "object", "properties": {"offset": {"type": "integer"}}}),
        )
        .json(400, "The offset or the stream is malformed, or the chunk is too large.", error_schema())
        .json(409, "Fenced, or the wrong offset.", error_schema())
        .json(410, "The step has ended.", error_schema())
        .json(401, "The token does not open this job.", error_schema())
        .json(503, "The job's record could not be read or written; try again.", error_schema())
}

/// `POST /api/v1/worker/jobs/{job}/heartbeat`.
pub async fn heartbeat(State(state): State<Arc<AppState>>, Path(job): Path<String>, headers: HeaderMap) -> Response {
    let (broker, token) = match opened(&state, &headers) {
        Ok(o) => o,
        Err(r) => return r,
    };
    match broker.heartbeat(&job, &token) {
        Ok(stop) => json_response(StatusCode::OK, &HeartbeatAnswer { stop }),
        Err(e) => refuse(&e),
    }
}

pub fn heartbeat_doc(_g: &mut DocGen) -> Op {
    Op::new(
        "The claim's worker still runs the step. Answers whether to stop it (`cancelled`, `timed_out`, `no_output`).",
    )
    .param(Param::path("job", "The job's id."))
    .json(200, "Whether to stop.", json!({"type": "object", "properties": {"stop": {"type": ["string", "null"]}}}))
    .json(409, "The claim was taken over (fenced): stop.", error_schema())
    .json(410, "The step has ended: stop.", error_schema())
    .json(401, "The token does not open this job.", error_schema())
    .json(503, "The job's record could not be read or written; try again.", error_schema())
}

/// `POST /api/v1/worker/jobs/{job}/result`.
pub async fn result(
    State(state): State<Arc<AppState>>,
    Path(job): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let (broker, token) = match opened(&state, &headers) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let shape = "the result must be {\"outcome\": {\"exited\": CODE}} or a word such as \"timed_out\"";
    let result: ResultBody = match json_body(body, shape).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let blocking = tokio::task::spawn_blocking(move || broker.finish(&job, &token, result.outcome)).await;
    match blocking {
        Ok(Ok(())) => json_response(StatusCode::OK, &json!({"recorded": true})),
        Ok(Err(e)) => refuse(&e),
        Err(e) => refuse(&JobError::Internal(e.to_string())),
    }
}

pub fn result_doc(_g: &mut DocGen) -> Op {
    Op::new("How the step ended, for the claim token. Answered once the result is recorded durably.")
        .describe(
            "Acknowledge the broker's message only after this answered 200. A claim that was taken over \
             is refused (409 `fenced`): its result counts for nothing.",
        )
        .param(Param::path("job", "The job's id."))
        .body(json!({"type": "object", "required": ["outcome"], "properties": {"outcome": {}}}))
        .json(200, "Recorded.", json!({"type": "object", "properties": {"recorded": {"type": "boolean"}}}))
        .json(409, "The claim was taken over (fenced).", error_schema())
        .json(410, "The step has ended.", error_schema())
        .json(401, "The token does not open this job.", error_schema())
        .json(503, "The job's record could not be read or written; try again.", error_schema())
}

fn error_schema() -> serde_json::Value {
    json!({
        "type": "object",
        "required": ["code", "message"],
        "properties": {
            "code": {"type": "string", "enum": ["unauthorized", "held", "fenced", "ended", "offset", "bad_request", "internal"]},
            "message": {"type": "string"},
            "offset": {"type": "integer"},
            "retry_ms": {"type": "integer"}
        }
    })
}
