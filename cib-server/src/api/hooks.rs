//! Webhook receivers. A delivery is verified over its raw bytes, stored durably (deduplicated
//! by its id) and answered at once; processing happens afterwards, from the inbox.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use cib_core::ports::Delivery;
use http::{HeaderMap, StatusCode};
use serde::Serialize;
use serde_json::json;

use crate::error::{ApiError, json_response};
use crate::openapi::{DocGen, Op, Param};
use crate::state::AppState;

/// A stored delivery.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Accepted {
    pub delivery: String,
    /// Whether this delivery id was stored before (then nothing new happens).
    pub duplicate: bool,
}

/// The answer to GitHub's `ping`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Pong {
    pub pong: bool,
}

/// `POST /hooks/github`.
pub async fn github(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let Some(secret) = state.config.github.webhook_secret.clone() else {
        return Err(ApiError::NotFound("GitHub webhooks are not configured on this server".into()));
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = crate::extract::read_body(body, state.config.max_body_bytes).await?;
    // The signature covers the raw bytes; nothing is parsed before it is checked.
    if let Err(e) = cib_github::webhook::verify(secret.as_bytes(), &body, header("x-hub-signature-256").as_deref()) {
        return Err(ApiError::BadSignature(format!("signature check failed: {e}")));
    }
    let Some(event) = header("x-github-event") else {
        return Err(ApiError::BadRequest("the X-GitHub-Event header is missing".into()));
    };
    let Some(id) = header("x-github-delivery") else {
        return Err(ApiError::BadRequest("the X-GitHub-Delivery header is missing".into()));
    };
    if event == "ping" {
        return Ok(json_response(StatusCode::OK, &Pong { pong: true }));
    }
    // Malformed payloads are refused now, with the reason, rather than stored and dropped later.
    if let Err(e) = cib_github::webhook::parse(&event, &body) {
        return Err(ApiError::BadRequest(format!("the {event} payload is malformed: {e}")));
    }
    let delivery = Delivery {
        id: id.clone(),
        source: "github".into(),
        event,
        received_at: state.clock.now(),
        body: body.to_vec(),
    };
    let new = state
        .store
        .insert_delivery(&delivery)
        .await
        .map_err(|e| ApiError::Unavailable(format!("the delivery could not be stored: {e}")))?;
    if new {
        state.inbox.notify_one();
    }
    Ok(json_response(StatusCode::ACCEPTED, &Accepted { delivery: id, duplicate: !new }))
}

pub fn github_doc(g: &mut DocGen) -> Op {
    let text = json!({ "type": "string" });
    Op::new("A webhook delivery from GitHub.")
        .describe("Signed with the configured webhook secret (`X-Hub-Signature-256` over the raw body). The body is read up to 25 MB.")
        .param(Param::header("X-Hub-Signature-256", "`sha256=` and the HMAC-SHA256 of the body, in hex.", text.clone()))
        .param(Param::header("X-GitHub-Event", "The event's name.", text.clone()))
        .param(Param::header("X-GitHub-Delivery", "The delivery's unique id.", text))
        .optional_body(json!({}))
        .json(200, "A ping, answered.", g.schema::<Pong>())
        .json(202, "The delivery was stored (or had been).", g.schema::<Accepted>())
        .error(g, 400, "A header is missing, or the payload is malformed.")
        .error(g, 401, "The signature is missing, malformed or wrong.")
        .error(g, 404, "GitHub webhooks are not configured on this server.")
        .error(g, 413, "The body is larger than 25 MB.")
        .error(g, 503, "The delivery could not be stored; GitHub retries.")
}
