//! Fakes of Slack and Zulip on loopback, for tests.
//!
//! [`FakeSlack`] checks every Web API request cib makes against Slack's own description
//! (`../shared/contracts/slack/slack_web_openapi_v2.json`, OpenAPI 2.0): the method exists
//! and is a POST, the content type is one it consumes, the token is there (in
//! `Authorization: Bearer`, where Slack's current documentation puts the spec's `token`
//! header), every form or JSON field is a declared parameter of the right type, and every
//! required one is present. A mismatch is recorded as a violation, which a test asserts empty,
//! and answered as Slack would (`ok: false`). It also takes `response_url` posts, under
//! `/response/`, which the Web API description does not cover.
//!
//! [`FakeZulip`] follows Zulip's documented formats: `POST /api/v1/messages` (form fields
//! `type`, `to`, `topic`, `content`), `PATCH /api/v1/messages/{id}`, HTTP basic auth with the
//! bot's email and API key, and its JSON answers (`{"result": "success", "msg": "", "id": N}`).
//!
//! Both can be told to answer the next requests with a status and a `Retry-After`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A message as the fake keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeMessage {
    /// Slack's `ts`, or Zulip's id.
    pub id: String,
    /// Slack's channel, or Zulip's `stream/topic`.
    pub place: String,
    pub text: String,
    /// Slack's `blocks` as sent (JSON text).
    pub blocks: Option<String>,
    /// The parent's `ts` of a Slack thread reply.
    pub thread: Option<String>,
    /// How many times it was edited.
    pub edits: u32,
}

#[derive(Debug, Default)]
struct Recorded {
    messages: Vec<FakeMessage>,
    violations: Vec<String>,
    /// Each request: method and path.
    requests: Vec<String>,
    /// Status and `Retry-After` for the next requests.
    failures: VecDeque<(u16, Option<u64>)>,
    /// JSON bodies posted to response URLs.
    responses: Vec<serde_json::Value>,
    next_id: u64,
}

type Shared = Arc<Mutex<Recorded>>;

fn lock(r: &Shared) -> std::sync::MutexGuard<'_, Recorded> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

fn json(status: u16, value: serde_json::Value, retry_after: Option<u64>) -> http::Response<Full<Bytes>> {
    let mut b = http::Response::builder().status(status).header(http::header::CONTENT_TYPE, "application/json");
    if let Some(s) = retry_after {
        b = b.header(http::header::RETRY_AFTER, s.to_string());
    }
    b.body(Full::new(Bytes::from(value.to_string()))).unwrap_or_default()
}

async fn serve<F, Fut>(handler: F) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)>
where
    F: Fn(http::Method, String, http::HeaderMap, Bytes) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<Full<Bytes>>> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: http::Request<Incoming>| {
                    let handler = handler.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let path = parts.uri.path().to_owned();
                        Ok::<_, Infallible>(handler(parts.method, path, parts.headers, body).await)
                    }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok((addr, task))
}

/// Slack's Web API description, from the shared contracts.
pub fn slack_contract() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/contracts/slack/slack_web_openapi_v2.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("Slack's Web API description at {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("Slack's Web API description: {e}"))
}

/// Every way `request` breaks Slack's description of `method`: an empty list when it keeps it.
pub fn check_slack_request(
    contract: &serde_json::Value,
    http_method: &http::Method,
    method: &str,
    headers: &http::HeaderMap,
    body: &[u8],
) -> Vec<String> {
    let mut problems = Vec::new();
    let verb = http_method.as_str().to_ascii_lowercase();
    let Some(op) = contract["paths"].get(format!("/{method}")).and_then(|p| p.get(&verb)) else {
        return vec![format!("{http_method} /api/{method} is not in Slack's Web API")];
    };
    let content_type = headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim();
    let consumes: Vec<&str> =
        op["consumes"].as_array().map(|a| a.iter().filter_map(|v| v.as_str()).collect()).unwrap_or_default();
    if !consumes.is_empty() && !consumes.contains(&media) {
        problems.push(format!("{method}: content type '{media}' is not one of {consumes:?}"));
    }
    let fields: Vec<(String, serde_json::Value)> = if media == "application/json" {
        match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(serde_json::Value::Object(map)) => map.into_iter().collect(),
            _ => {
                problems.push(format!("{method}: the JSON body is not an object"));
                Vec::new()
            }
        }
    } else {
        form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), serde_json::Value::String(v.into_owned()))).collect()
    };
    let params = op["parameters"].as_array().cloned().unwrap_or_default();
    for p in &params {
        let name = p["name"].as_str().unwrap_or("");
        let required = p["required"].as_bool() == Some(true);
        match p["in"].as_str() {
            Some("header") if name == "token" => {
                let bearer = headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.strip_prefix("Bearer ").is_some_and(|t| !t.trim().is_empty()));
                let field = fields.iter().any(|(k, _)| k == "token");
                if required && !bearer && !field {
                    problems.push(format!("{method}: no token (Authorization: Bearer)"));
                }
            }
            Some("formData") | Some("query") if required && !fields.iter().any(|(k, _)| k == name) => {
                problems.push(format!("{method}: the required field '{name}' is missing"));
            }
            _ => {}
        }
    }
    for (k, v) in &fields {
        let Some(p) = params.iter().find(|p| p["name"] == k.as_str() && p["in"] != "header") else {
            if k != "token" {
                problems.push(format!("{method}: '{k}' is not a parameter of {method}"));
            }
            continue;
        };
        let ok = match (p["type"].as_str(), v) {
            (Some("boolean"), serde_json::Value::String(s)) => matches!(s.as_str(), "true" | "false" | "1" | "0"),
            (Some("boolean"), v) => v.is_boolean(),
            (Some("integer"), serde_json::Value::String(s)) => s.parse::<i64>().is_ok(),
            (Some("integer"), v) => v.is_i64() || v.is_u64(),
            (Some("string"), v) => v.is_string(),
            _ => true,
        };
        if !ok {
            problems.push(format!("{method}: '{k}' is not a {}", p["type"]));
        }
        // Fields the description calls "JSON-based arrays" must be JSON arrays.
        if matches!(k.as_str(), "blocks" | "attachments")
            && let serde_json::Value::String(s) = v
            && !serde_json::from_str::<serde_json::Value>(s).is_ok_and(|j| j.is_array())
        {
            problems.push(format!("{method}: '{k}' is not a JSON array"));
        }
    }
    problems
}

/// A fake Slack on loopback.
#[derive(Debug)]
pub struct FakeSlack {
    pub addr: SocketAddr,
    recorded: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeSlack {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeSlack {
    /// A Slack that takes any bot token.
    pub async fn start() -> std::io::Result<FakeSlack> {
        Self::start_inner(None).await
    }

    /// A Slack whose bot token is `token`: a Web API call with another is answered
    /// `invalid_auth`, as Slack answers it.
    pub async fn start_for(token: &str) -> std::io::Result<FakeSlack> {
        Self::start_inner(Some(format!("Bearer {token}"))).await
    }

    async fn start_inner(expected: Option<String>) -> std::io::Result<FakeSlack> {
        let contract = Arc::new(slack_contract());
        let recorded: Shared = Arc::default();
        let r = recorded.clone();
        let expected = Arc::new(expected);
        let (addr, task) = serve(move |method, path, headers, body| {
            let (r, contract, expected) = (r.clone(), contract.clone(), expected.clone());
            async move {
                let auth = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
                if let Some(expected) = expected.as_deref()
                    && path.starts_with("/api/")
                    && auth != Some(expected)
                {
                    lock(&r).requests.push(format!("{method} {path} (refused: invalid_auth)"));
                    return json(200, serde_json::json!({ "ok": false, "error": "invalid_auth" }), None);
                }
                slack_answer(&r, &contract, method, &path, &headers, &body)
            }
        })
        .await?;
        Ok(FakeSlack { addr, recorded, task })
    }

    /// The Web API's base URL, for `[chat.slack] api_url`.
    pub fn api_url(&self) -> String {
        format!("http://{}/api", self.addr)
    }

    /// A response URL on this fake, as Slack would give one with a command.
    pub fn response_url(&self, id: &str) -> String {
        format!("http://{}/response/{id}", self.addr)
    }

    pub fn messages(&self) -> Vec<FakeMessage> {
        lock(&self.recorded).messages.clone()
    }

    pub fn violations(&self) -> Vec<String> {
        lock(&self.recorded).violations.clone()
    }

    pub fn requests(&self) -> Vec<String> {
        lock(&self.recorded).requests.clone()
    }

    pub fn responses(&self) -> Vec<serde_json::Value> {
        lock(&self.recorded).responses.clone()
    }

    /// Answers the next request with `status` (429, say) and `Retry-After: retry_after`.
    pub fn fail_next(&self, status: u16, retry_after: Option<u64>) {
        lock(&self.recorded).failures.push_back((status, retry_after));
    }
}

fn slack_answer(
    r: &Shared,
    contract: &serde_json::Value,
    method: http::Method,
    path: &str,
    headers: &http::HeaderMap,
    body: &[u8],
) -> http::Response<Full<Bytes>> {
    let mut rec = lock(r);
    rec.requests.push(format!("{method} {path}"));
    if let Some((status, retry_after)) = rec.failures.pop_front() {
        let error = if status == 429 { "ratelimited" } else { "internal_error" };
        return json(status, serde_json::json!({ "ok": false, "error": error }), retry_after);
    }
    if path.starts_with("/response/") {
        match serde_json::from_slice(body) {
            Ok(v) => rec.responses.push(v),
            Err(e) => rec.violations.push(format!("a response URL got a body that is not JSON: {e}")),
        }
        return json(200, serde_json::json!({ "ok": true }), None);
    }
    let Some(api_method) = path.strip_prefix("/api/") else {
        rec.violations.push(format!("{method} {path} is not under /api/"));
        return json(404, serde_json::json!({ "ok": false, "error": "unknown_method" }), None);
    };
    let problems = check_slack_request(contract, &method, api_method, headers, body);
    if !problems.is_empty() {
        rec.violations.extend(problems);
        return json(200, serde_json::json!({ "ok": false, "error": "invalid_arguments" }), None);
    }
    let fields: Vec<(String, String)> =
        form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let channel = get("channel").unwrap_or_default();
    match api_method {
        "chat.postMessage" => {
            rec.next_id += 1;
            let ts = format!("1700000000.{:06}", rec.next_id);
            rec.messages.push(FakeMessage {
                id: ts.clone(),
                place: channel.clone(),
                text: get("text").unwrap_or_default(),
                blocks: get("blocks"),
                thread: get("thread_ts"),
                edits: 0,
            });
            json(200, serde_json::json!({ "ok": true, "channel": channel, "ts": ts }), None)
        }
        "chat.update" => {
            let ts = get("ts").unwrap_or_default();
            match rec.messages.iter_mut().find(|m| m.id == ts && m.place == channel) {
                Some(m) => {
                    m.text = get("text").unwrap_or_default();
                    m.blocks = get("blocks");
                    m.edits += 1;
                    json(200, serde_json::json!({ "ok": true, "channel": channel, "ts": ts }), None)
                }
                None => json(200, serde_json::json!({ "ok": false, "error": "message_not_found" }), None),
            }
        }
        _ => json(200, serde_json::json!({ "ok": true }), None),
    }
}

/// A fake Zulip on loopback, for one bot.
#[derive(Debug)]
pub struct FakeZulip {
    pub addr: SocketAddr,
    recorded: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeZulip {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeZulip {
    /// A Zulip that accepts the bot `email` with `api_key`.
    pub async fn start(email: &str, api_key: &str) -> std::io::Result<FakeZulip> {
        let recorded: Shared = Arc::default();
        let r = recorded.clone();
        let expected =
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{email}:{api_key}")));
        let (addr, task) = serve(move |method, path, headers, body| {
            let (r, expected) = (r.clone(), expected.clone());
            async move { zulip_answer(&r, &expected, method, &path, &headers, &body) }
        })
        .await?;
        Ok(FakeZulip { addr, recorded, task })
    }

    /// The organisation's URL, for `[chat.zulip] site`.
    pub fn site(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn messages(&self) -> Vec<FakeMessage> {
        lock(&self.recorded).messages.clone()
    }

    pub fn violations(&self) -> Vec<String> {
        lock(&self.recorded).violations.clone()
    }

    pub fn requests(&self) -> Vec<String> {
        lock(&self.recorded).requests.clone()
    }

    pub fn fail_next(&self, status: u16, retry_after: Option<u64>) {
        lock(&self.recorded).failures.push_back((status, retry_after));
    }
}

fn zulip_error(status: u16, msg: &str, code: &str) -> http::Response<Full<Bytes>> {
    json(status, serde_json::json!({ "result": "error", "msg": msg, "code": code }), None)
}

fn zulip_answer(
    r: &Shared,
    expected_auth: &str,
    method: http::Method,
    path: &str,
    headers: &http::HeaderMap,
    body: &[u8],
) -> http::Response<Full<Bytes>> {
    let mut rec = lock(r);
    rec.requests.push(format!("{method} {path}"));
    let auth = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    if auth != expected_auth {
        return zulip_error(401, "Invalid API key", "INVALID_API_KEY");
    }
    if let Some((status, retry_after)) = rec.failures.pop_front() {
        let v = serde_json::json!({ "result": "error", "msg": "API usage exceeded rate limit", "code": "RATE_LIMIT_HIT", "retry-after": retry_after });
        return json(status, v, retry_after);
    }
    let media = headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !media.starts_with("application/x-www-form-urlencoded") {
        rec.violations.push(format!("{method} {path}: content type '{media}' is not a form"));
    }
    let fields: Vec<(String, String)> =
        form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let known = |allowed: &[&str], rec: &mut Recorded| {
        for (k, _) in &fields {
            if !allowed.contains(&k.as_str()) {
                rec.violations.push(format!("{method} {path}: '{k}' is not a documented parameter"));
            }
        }
    };
    if method == http::Method::POST && path == "/api/v1/messages" {
        known(&["type", "to", "topic", "content", "queue_id", "local_id", "read_by_sender"], &mut rec);
        let (Some(kind), Some(to), Some(content)) = (get("type"), get("to"), get("content")) else {
            rec.violations.push("POST /api/v1/messages needs type, to and content".into());
            return zulip_error(400, "Missing 'content' argument", "REQUEST_VARIABLE_MISSING");
        };
        if !matches!(kind.as_str(), "stream" | "channel" | "private" | "direct") {
            rec.violations.push(format!("POST /api/v1/messages: type '{kind}' is not documented"));
        }
        let topic = get("topic").unwrap_or_default();
        if matches!(kind.as_str(), "stream" | "channel") && topic.is_empty() {
            rec.violations.push("POST /api/v1/messages: a stream message needs a topic".into());
        }
        rec.next_id += 1;
        let id = rec.next_id;
        rec.messages.push(FakeMessage {
            id: id.to_string(),
            place: format!("{to}/{topic}"),
            text: content,
            blocks: None,
            thread: None,
            edits: 0,
        });
        return json(200, serde_json::json!({ "id": id, "msg": "", "result": "success" }), None);
    }
    if method == http::Method::PATCH
        && let Some(id) = path.strip_prefix("/api/v1/messages/")
    {
        known(
            &[
                "content",
                "topic",
                "propagate_mode",
                "send_notification_to_old_thread",
                "send_notification_to_new_thread",
                "stream_id",
                "prev_content_sha256",
            ],
            &mut rec,
        );
        let Some(m) = rec.messages.iter_mut().find(|m| m.id == id) else {
            return zulip_error(400, "Invalid message(s)", "BAD_REQUEST");
        };
        if let Some(content) = get("content") {
            m.text = content;
        }
        m.edits += 1;
        return json(200, serde_json::json!({ "msg": "", "result": "success" }), None);
    }
    rec.violations.push(format!("{method} {path} is not a documented endpoint cib uses"));
    zulip_error(404, "Endpoint not found", "BAD_REQUEST")
}
