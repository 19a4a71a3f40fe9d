//! Webhook receivers. A delivery is verified over its raw bytes, stored durably (deduplicated
//! by its id) and answered at once; processing happens afterwards, from the inbox.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use cib_core::ports::{Delivery, Intake};
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
    let parsed = match cib_github::webhook::parse(&event, &body) {
        Ok(parsed) => parsed,
        Err(e) => return Err(ApiError::BadRequest(format!("the {event} payload is malformed: {e}"))),
    };
    let settled = crate::inbox::set_aside(&state.config, &parsed, &event);
    let delivery = Delivery {
        id: id.clone(),
        source: "github".into(),
        event,
        received_at: state.clock.now(),
        body: body.to_vec(),
    };
    store(&state, delivery, settled).await
}

/// How long a body is remembered, so that a captured body replayed under a new delivery id
/// builds nothing.
const REPLAY_WINDOW: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// Stores a verified delivery, deduplicated by its id and by its body's digest, and wakes the
/// inbox for a new one. A delivery `settled` already (one that can never build anything) is
/// stored done, with the outcome it is counted under and its reason.
async fn store(
    state: &AppState,
    delivery: Delivery,
    settled: Option<(&'static str, String)>,
) -> Result<Response, ApiError> {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(&delivery.body);
    let window = REPLAY_WINDOW.as_millis() as u64;
    let since = cib_core::time::Timestamp(delivery.received_at.millis().saturating_sub(window));
    let intake = state
        .store
        .insert_delivery_once(&delivery, &digest, since, settled.as_ref().map(|(_, reason)| reason.as_str()))
        .await
        .map_err(|e| ApiError::Unavailable(format!("the delivery could not be stored: {e}")))?;
    let new = intake == Intake::New;
    state.metrics.delivery(&delivery.event, if new { "accepted" } else { "duplicate" });
    tracing::info!(delivery = %delivery.id, source = %delivery.source, event = %delivery.event, new, "delivery received");
    if let (true, Some((outcome, reason))) = (new, &settled) {
        state.metrics.delivery(&delivery.event, outcome);
        tracing::info!(delivery = %delivery.id, reason = %reason, "delivery done without processing");
    } else if new {
        state.inbox.notify_one();
    } else {
        tracing::info!(delivery = %delivery.id, ?intake, "duplicate delivery answered and dropped");
    }
    Ok(json_response(StatusCode::ACCEPTED, &Accepted { delivery: delivery.id, duplicate: !new }))
}

/// `POST /hooks/git`: a push from a plain Git server (a `post-receive` hook), signed with the
/// repository's own secret like GitHub's deliveries.
pub async fn git(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = crate::extract::read_body(body, crate::extract::api_body_limit(&state)).await?;
    // An unsigned push is refused before its body is looked at. The repository's name is
    // needed to find its secret, so a signed body is parsed next; nothing it says is acted on
    // before the signature is checked.
    if headers.get("x-cib-signature-256").is_none() {
        return Err(ApiError::BadSignature("the X-Cib-Signature-256 header is missing".into()));
    }
    let push: crate::inbox::GitPush =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("the push is malformed: {e}")))?;
    let secret = state
        .config
        .repos
        .iter()
        .find(|r| r.name == push.repo)
        .and_then(|r| r.webhook_secret.clone())
        .ok_or_else(|| ApiError::BadSignature(format!("'{}' has no webhook_secret on this server", push.repo)))?;
    cib_github::webhook::verify(secret.as_bytes(), &body, header("x-cib-signature-256").as_deref())
        .map_err(|e| ApiError::BadSignature(format!("signature check failed: {e}")))?;
    let Some(id) = header("x-cib-delivery") else {
        return Err(ApiError::BadRequest("the X-Cib-Delivery header is missing".into()));
    };
    let delivery = Delivery {
        id,
        source: "git".into(),
        event: "push".into(),
        received_at: state.clock.now(),
        body: body.to_vec(),
    };
    // The repository has a secret here, so this server builds it: nothing to set aside.
    store(&state, delivery, None).await
}

pub fn git_doc(g: &mut DocGen) -> Op {
    let text = json!({ "type": "string" });
    Op::new("A push from a plain Git server.")
        .describe("Signed with the repository's `webhook_secret` (`X-Cib-Signature-256: sha256=<HMAC-SHA256 of the body, hex>`), identified by `X-Cib-Delivery`. Processed through the same inbox as GitHub's deliveries.")
        .param(Param::header("X-Cib-Signature-256", "`sha256=` and the HMAC-SHA256 of the body, in hex.", text.clone()))
        .param(Param::header("X-Cib-Delivery", "A unique id for this delivery.", text))
        .body(g.schema::<crate::inbox::GitPush>())
        .json(202, "The push was stored (or had been).", g.schema::<Accepted>())
        .error(g, 400, "The body or a header is malformed.")
        .error(g, 401, "The signature is missing or wrong, or the repository has no secret here.")
        .error(g, 413, "The body is too large.")
        .error(g, 503, "The push could not be stored; send it again.")
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
