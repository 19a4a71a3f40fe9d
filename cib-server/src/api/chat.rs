//! Chat commands: Slack's slash command and buttons, and Zulip's outgoing webhook. Each request
//! is verified first (Slack's signature, timestamp and replay; Zulip's token), its chat user is
//! mapped through `[[people]]` to a person, and the command runs as that person: the server
//! sends itself the API request the command stands for, carrying the person's token
//! ([`OnBehalfOf`]), so the role layer and the handler refuse exactly as they refuse the API,
//! in the same words. The chat services themselves are known only to `cib-chat`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use cib_chat::command::{self, Command};
use cib_chat::verify;
use cib_core::policy::Identity;
use http::{HeaderMap, Method, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::auth::OnBehalfOf;
use crate::config::{ServerConfig, TokenConfig};
use crate::error::{ApiError, json_response};
use crate::openapi::{DocGen, Op, Param};
use crate::state::AppState;

/// How long a Slack request may take before it is answered "working on it" (Slack waits 3 s).
const SLACK_DEADLINE: Duration = Duration::from_millis(2500);

/// The notifier's configuration from `[chat]`, or none when no chat service is configured.
pub fn notifier_config(config: &ServerConfig) -> Option<cib_chat::ChatConfig> {
    let chat = &config.chat;
    if chat.slack.is_none() && chat.zulip.is_none() {
        return None;
    }
    let target = |r: &crate::config::ChatRepoConfig| cib_chat::ChatTarget {
        channel: r.channel.clone(),
        stream: r.stream.clone(),
        topic: r.topic.clone(),
    };
    Some(cib_chat::ChatConfig {
        slack: chat.slack.as_ref().and_then(|s| {
            Some(cib_chat::SlackAccount { api_url: s.api_url.clone(), bot_token: s.bot_token.as_ref()?.0.clone() })
        }),
        zulip: chat.zulip.as_ref().and_then(|z| {
            Some(cib_chat::ZulipAccount {
                site: z.site.clone(),
                bot_email: z.bot_email.clone(),
                api_key: z.api_key.as_ref()?.0.clone(),
            })
        }),
        repos: chat.repos.iter().map(|r| (r.name.clone(), target(r))).collect(),
        default_target: chat.default.as_ref().map(target),
        public_url: config.github.public_url.clone(),
        people: config.people_directory(),
        ..cib_chat::ChatConfig::default()
    })
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Checks a Slack request's signature, age and novelty; the refusal is a 401.
fn verify_slack(state: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    let Some(secret) = state.config.chat.slack.as_ref().and_then(|s| s.signing_secret.as_ref()) else {
        // Without a signing secret no request can be verified, which is what 401 says.
        return Err(ApiError::BadSignature("Slack is not configured on this server".into()));
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (timestamp, signature) = (header("x-slack-request-timestamp"), header("x-slack-signature"));
    let now = now_secs();
    verify::verify_slack(secret.0.as_bytes(), timestamp, signature, body, now)
        .and_then(|()| {
            let at = timestamp.and_then(|t| t.parse().ok()).unwrap_or(now);
            state.slack_replays.check(signature.unwrap_or_default(), at, now)
        })
        .map_err(|e| ApiError::BadSignature(format!("Slack request refused: {e}")))
}

/// The token a chat user acts with: the strongest of the tokens their `[[people]]` entry
/// lists. The refusal says how to be added.
fn token_of(state: &AppState, identity: &Identity) -> Result<TokenConfig, String> {
    let Some(person) = state.people.find(identity) else {
        let (service, id) = match identity {
            Identity::Slack(id) => ("slack", id.as_str()),
            Identity::Zulip(id) => ("zulip", id.as_str()),
            _ => ("chat", ""),
        };
        return Err(format!(
            "Sorry, cib does not know you ({identity}). Ask a cib admin to add `{service} = \"{id}\"` to your [[people]] entry in cib's configuration."
        ));
    };
    state
        .config
        .tokens
        .iter()
        .filter(|t| person.tokens.contains(&t.name))
        .fold(None::<&TokenConfig>, |best, t| match best {
            Some(b) if b.role >= t.role => Some(b),
            _ => Some(t),
        })
        .cloned()
        .ok_or_else(|| {
            format!(
                "Sorry, {} has no API token in cib's configuration, so cib cannot tell what they may do. Ask a cib admin to list one in their [[people]] entry.",
                person.name
            )
        })
}

/// One path segment, percent-encoded.
fn seg(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `owner/name` as the API's two segments.
fn repo_path(repo: &str) -> String {
    match repo.split_once('/') {
        Some((owner, name)) => format!("{}/{}", seg(owner), seg(name)),
        None => seg(repo),
    }
}

/// Sends the server an API request as `token`; answers the status and the JSON body.
async fn call(
    state: &Arc<AppState>,
    token: &TokenConfig,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let Some(make) = state.api_router.get() else {
        return (StatusCode::SERVICE_UNAVAILABLE, json!({ "error": "the server is starting; try again" }));
    };
    let router = make(state.clone());
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.map(|b| b.to_string()).unwrap_or_default()));
    let Ok(mut request) = request else {
        return (StatusCode::BAD_REQUEST, json!({ "error": format!("'{path}' is not a valid request") }));
    };
    request.extensions_mut().insert(OnBehalfOf(token.clone()));
    let Ok(response) = router.oneshot(request).await;
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap_or_default();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// The words of an API answer: the error's own message on a refusal, else `ok`.
fn refusal(status: StatusCode, body: &Value) -> Option<String> {
    if status.is_success() {
        return None;
    }
    Some(body.get("error").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| format!("refused ({status})")))
}

fn builds_text(body: &Value) -> String {
    let builds = body.get("builds").and_then(Value::as_array).cloned().unwrap_or_default();
    if builds.is_empty() {
        return "No builds.".into();
    }
    let field = |b: &Value, k: &str| b.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    builds
        .iter()
        .take(15)
        .map(|b| {
            let status =
                b.get("conclusion").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| field(b, "status"));
            format!("`{}` {} {} {}", field(b, "id"), field(b, "repo"), field(b, "pipeline"), status)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The manual test (hold gate) a build waits at.
async fn waiting_hold(state: &AppState, build: &str) -> Option<String> {
    let build = build.to_owned();
    state
        .engine
        .query(move |m| {
            m.builds().filter(|b| b.id.0 == build).find_map(|b| {
                b.steps.iter().filter(|s| s.status == cib_core::pipeline::StepStatus::AtGate).find_map(|s| {
                    match b.pipeline.step(&s.name).map(|x| &x.action) {
                        Some(cib_core::spec::Action::Gate(g)) if g.kind == cib_core::spec::GateKind::Hold => {
                            Some(s.name.clone())
                        }
                        _ => None,
                    }
                })
            })
        })
        .await
        .ok()
        .flatten()
}

/// Runs one command as `token`, answering what to say.
async fn run(state: &Arc<AppState>, token: &TokenConfig, command: Command) -> String {
    let post = Method::POST;
    let (status, body, done) = match command {
        Command::Help => return command::HELP.to_owned(),
        Command::Builds { repo } => {
            let query = repo.map(|r| format!("&repo={}", seg(&r))).unwrap_or_default();
            let (status, body) =
                call(state, token, Method::GET, &format!("/api/v1/builds?limit=15{query}"), None).await;
            return refusal(status, &body).unwrap_or_else(|| builds_text(&body));
        }
        Command::Status { repo } => {
            // The newest build of each pipeline, among the last page of builds (newest first).
            let query = repo.map(|r| format!("&repo={}", seg(&r))).unwrap_or_default();
            let (status, mut body) =
                call(state, token, Method::GET, &format!("/api/v1/builds?limit=500{query}"), None).await;
            if let Some(builds) = body.get_mut("builds").and_then(Value::as_array_mut) {
                let mut seen = std::collections::BTreeSet::new();
                builds.retain(|b| {
                    let key = |k: &str| b.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                    seen.insert((key("repo"), key("pipeline")))
                });
            }
            return refusal(status, &body).unwrap_or_else(|| builds_text(&body));
        }
        Command::Retry { build } => {
            let (s, b) = call(state, token, post, &format!("/api/v1/builds/{}/retry", seg(&build)), None).await;
            (s, b, format!("Retrying {build}."))
        }
        Command::Cancel { build } => {
            let (s, b) = call(state, token, post, &format!("/api/v1/builds/{}/cancel", seg(&build)), None).await;
            (s, b, format!("Cancelling {build}."))
        }
        Command::Approve { build, gate } => {
            let path = format!("/api/v1/builds/{}/gates/{}/approve", seg(&build), seg(&gate));
            let (s, b) = call(state, token, post, &path, None).await;
            (s, b, format!("Approved {gate} of {build}."))
        }
        Command::Reject { build, gate } => {
            let path = format!("/api/v1/builds/{}/gates/{}/reject", seg(&build), seg(&gate));
            let (s, b) = call(state, token, post, &path, None).await;
            (s, b, format!("Rejected {gate} of {build}."))
        }
        Command::Pass { build } | Command::Fail { build } if waiting_hold(state, &build).await.is_none() => {
            return format!("{build} waits at no manual test.");
        }
        Command::Pass { build } => {
            let gate = waiting_hold(state, &build).await.unwrap_or_default();
            let path = format!("/api/v1/builds/{}/gates/{}/approve", seg(&build), seg(&gate));
            let (s, b) = call(state, token, post, &path, None).await;
            (s, b, format!("Manual test {gate} of {build} marked as passed."))
        }
        Command::Fail { build } => {
            let gate = waiting_hold(state, &build).await.unwrap_or_default();
            let path = format!("/api/v1/builds/{}/gates/{}/reject", seg(&build), seg(&gate));
            let (s, b) = call(state, token, post, &path, None).await;
            (s, b, format!("Manual test {gate} of {build} marked as failed."))
        }
        Command::Merge { repo, branch } => {
            let path = format!("/api/v1/repos/{}/merge", repo_path(&repo));
            let (s, b) = call(state, token, post, &path, Some(json!({ "head": branch }))).await;
            let into = b.get("into").and_then(Value::as_str).unwrap_or("its integration branch").to_owned();
            (s, b, format!("Merged {branch} into {into} of {repo}."))
        }
        Command::ApproveRelease { repo, commit } => {
            let path = format!("/api/v1/repos/{}/approvals", repo_path(&repo));
            let (s, b) = call(state, token, post, &path, Some(json!({ "commit": commit }))).await;
            (s, b, format!("Approved the release of {commit} in {repo}."))
        }
        Command::Promote { repo, commit } => {
            let path = format!("/api/v1/repos/{}/promote", repo_path(&repo));
            let (s, b) = call(state, token, post, &path, Some(json!({ "commit": commit }))).await;
            let to = b.get("to").and_then(Value::as_str).unwrap_or("production").to_owned();
            (s, b, format!("Promoted {commit} of {repo} to {to}."))
        }
        Command::LeaseTake { pool, duration } => {
            let (s, b) =
                call(state, token, post, "/api/v1/leases", Some(json!({ "pool": pool, "for": duration }))).await;
            let id = b.get("id").or_else(|| b.get("lease")).and_then(Value::as_str).unwrap_or("?").to_owned();
            (s, b, format!("Lease {id} of {pool} for {duration}."))
        }
        Command::LeaseReturn { id } => {
            let (s, b) = call(state, token, post, &format!("/api/v1/leases/{}/return", seg(&id)), None).await;
            (s, b, format!("Returned lease {id}."))
        }
    };
    refusal(status, &body).unwrap_or(done)
}

/// Parses and runs a command line as the chat user `identity`.
async fn answer(state: &Arc<AppState>, identity: &Identity, text: &str) -> String {
    let token = match token_of(state, identity) {
        Ok(t) => t,
        Err(polite) => return polite,
    };
    match command::parse(text) {
        Ok(command) => run(state, &token, command).await,
        Err(usage) => usage,
    }
}

/// Whether a `response_url` is Slack's (the configured prefix), so that cib posts nowhere else.
fn response_url_allowed(state: &AppState, url: &str) -> bool {
    state.config.chat.slack.as_ref().is_some_and(|s| !url.is_empty() && url.starts_with(&s.response_url_prefix))
}

/// Answers Slack within its deadline: the work's answer, or "working on it" and the answer
/// later through `response_url`.
async fn within_deadline(
    state: Arc<AppState>,
    identity: Identity,
    text: String,
    response_url: Option<String>,
) -> Value {
    let work = {
        let state = state.clone();
        tokio::spawn(async move { answer(&state, &identity, &text).await })
    };
    let mut work = work;
    match tokio::time::timeout(SLACK_DEADLINE, &mut work).await {
        Ok(done) => {
            json!({ "response_type": "ephemeral", "text": done.unwrap_or_else(|_| "cib failed to answer; see its log.".into()) })
        }
        Err(_) => {
            if let Some(url) = response_url.filter(|u| response_url_allowed(&state, u)) {
                tokio::spawn(async move {
                    let text = work.await.unwrap_or_else(|_| "cib failed to answer; see its log.".into());
                    let client = cib_chat::api::HttpClient::default();
                    if let Err(e) = client.post_json(&url, &json!({ "response_type": "ephemeral", "text": text })).await
                    {
                        tracing::warn!(error = %e, "a late answer could not be posted to Slack");
                    }
                });
            }
            json!({ "response_type": "ephemeral", "text": "Working on it…" })
        }
    }
}

/// `POST /chat/slack/commands`: `/cib <command>`.
pub async fn slack_command(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = crate::extract::read_body(body, 64 * 1024).await?;
    verify_slack(&state, &headers, &body)?;
    let c = cib_chat::payload::slash_command(&body).map_err(ApiError::BadRequest)?;
    let answer = within_deadline(state.clone(), Identity::Slack(c.user_id), c.text, Some(c.response_url)).await;
    Ok(json_response(StatusCode::OK, &answer))
}

/// `POST /chat/slack/actions`: a button on one of cib's messages (Approve, Reject, Promote).
/// Slack takes the request's answer as an acknowledgement only, so the result also goes to the
/// `response_url`, as a reply visible to the person who pressed.
pub async fn slack_action(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = crate::extract::read_body(body, 64 * 1024).await?;
    verify_slack(&state, &headers, &body)?;
    let a = cib_chat::payload::block_action(&body).map_err(ApiError::BadRequest)?;
    let text = match a.action_id.as_str() {
        "approve" | "reject" | "promote" => format!("{} {}", a.action_id, a.value),
        other => return Err(ApiError::BadRequest(format!("cib has no button '{other}'"))),
    };
    let answer = within_deadline(state.clone(), Identity::Slack(a.user_id), text, a.response_url.clone()).await;
    if let Some(url) = a.response_url.filter(|u| response_url_allowed(&state, u)) {
        let reply = json!({ "response_type": "ephemeral", "replace_original": false, "text": answer["text"] });
        let client = cib_chat::api::HttpClient::default();
        if let Err(e) = client.post_json(&url, &reply).await {
            tracing::warn!(error = %e, "a button's answer could not be posted to Slack");
        }
    }
    Ok(json_response(StatusCode::OK, &json!({})))
}

/// `POST /chat/zulip`: Zulip's outgoing webhook. The answer goes in the response body
/// (`{"content": ...}`), which Zulip posts as the bot's reply.
pub async fn zulip(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let Some(expected) = state.config.chat.zulip.as_ref().and_then(|z| z.webhook_token.clone()) else {
        return Err(ApiError::BadSignature("Zulip is not configured on this server".into()));
    };
    let body = crate::extract::read_body(body, 256 * 1024).await?;
    // The token is in the body, so the body is read as JSON first, but nothing in it is used
    // before the token matched.
    let hook = cib_chat::payload::zulip_webhook(&body).map_err(ApiError::BadRequest)?;
    verify::verify_zulip_token(&expected.0, &hook.token)
        .map_err(|e| ApiError::BadSignature(format!("Zulip request refused: {e}")))?;
    let identity = Identity::Zulip(hook.message.sender_id.to_string());
    let content = answer(&state, &identity, &hook.command_text()).await;
    Ok(json_response(StatusCode::OK, &json!({ "content": content })))
}

fn slack_doc(g: &mut DocGen, summary: &'static str) -> Op {
    let text = json!({ "type": "string" });
    Op::new(summary)
        .describe("Signed by Slack: `X-Slack-Signature` is `v0=` and the HMAC-SHA256, under the app's signing secret, of `v0:<X-Slack-Request-Timestamp>:<body>`. The timestamp must be within 5 minutes, and a request seen before is refused. The body is a form (`application/x-www-form-urlencoded`).")
        .param(Param::header("X-Slack-Signature", "`v0=` and the signature in hex.", text.clone()))
        .param(Param::header("X-Slack-Request-Timestamp", "When Slack sent it, in seconds since the epoch.", text))
        .optional_body(json!({}))
        .json(200, "The answer, for Slack to show.", json!({ "type": "object" }))
        .error(g, 400, "The form lacks a field Slack always sends.")
        .error(g, 401, "The signature is missing, wrong or stale, the request was replayed, or Slack is not configured.")
}

pub fn slack_command_doc(g: &mut DocGen) -> Op {
    slack_doc(g, "A Slack slash command (`/cib <command>`).")
}

pub fn slack_action_doc(g: &mut DocGen) -> Op {
    slack_doc(g, "A button pressed on one of cib's Slack messages (block actions).")
}

pub fn zulip_doc(g: &mut DocGen) -> Op {
    Op::new("Zulip's outgoing webhook: a mention of the bot, or a direct message to it.")
        .describe("The payload's `token` must be the bot's outgoing-webhook token (compared in constant time).")
        .optional_body(json!({ "type": "object" }))
        .json(
            200,
            "The reply, which Zulip posts as the bot.",
            json!({ "type": "object", "properties": { "content": { "type": "string" } } }),
        )
        .error(g, 400, "The payload is not Zulip's outgoing webhook format.")
        .error(g, 401, "The token does not match, or Zulip is not configured.")
}
