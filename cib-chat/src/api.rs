//! The two chat APIs cib calls: Slack's Web API (`chat.postMessage`, `chat.update`, form
//! bodies, `Authorization: Bearer <bot token>`) and Zulip's REST API (`POST /api/v1/messages`,
//! `PATCH /api/v1/messages/{id}`, form bodies, HTTP basic auth with the bot's email and API
//! key). Every answer becomes `Ok` or an [`ApiError`] with a kind, so the outbox knows whether
//! to retry, and how long `Retry-After` asks it to wait.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use cib_core::ports::ErrorKind;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A failed call, with what the outbox needs to decide.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// How long the service asked to wait (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl ApiError {
    fn transient(message: impl Into<String>) -> Self {
        ApiError { kind: ErrorKind::Transient, message: message.into(), retry_after: None }
    }
}

/// An http and https client (rustls with the ring provider and Mozilla's roots, as the rest of
/// cib), shared by both services.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpClient(..)")
    }
}

impl Default for HttpClient {
    fn default() -> Self {
        let roots = rustls::RootCertStore { roots: webpki_roots() };
        let tls =
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map(|b| b.with_root_certificates(roots).with_no_client_auth());
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let https = match tls {
            Ok(tls) => hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls),
            // The ring provider supports the default versions; this cannot fail, but if it
            // did, no roots means https fails per request with a clear error.
            Err(_) => hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
                rustls::ClientConfig::builder()
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
            ),
        }
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
        HttpClient { client: Client::builder(TokioExecutor::new()).build(https) }
    }
}

fn webpki_roots() -> Vec<rustls::pki_types::TrustAnchor<'static>> {
    webpki_roots::TLS_SERVER_ROOTS.to_vec()
}

/// One answer: status, `Retry-After` and body.
struct Answer {
    status: http::StatusCode,
    retry_after: Option<Duration>,
    body: Bytes,
}

impl HttpClient {
    async fn send(&self, request: http::Request<Full<Bytes>>) -> Result<Answer, ApiError> {
        let call = self.client.request(request);
        let response = tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .map_err(|_| ApiError::transient("no answer within 30 s"))?
            .map_err(|e| ApiError::transient(format!("cannot reach the chat service: {e}")))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ApiError::transient(format!("the answer broke off: {e}")))?
            .to_bytes();
        Ok(Answer { status, retry_after, body })
    }

    /// POSTs JSON to a Slack `response_url` (an answer to a slash command or a button).
    pub async fn post_json(&self, url: &str, body: &serde_json::Value) -> Result<(), ApiError> {
        let request = http::Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| ApiError {
                kind: ErrorKind::Permanent,
                message: format!("bad URL {url}: {e}"),
                retry_after: None,
            })?;
        let answer = self.send(request).await?;
        status_error(&answer, "the response URL")
    }
}

/// The error an HTTP status means: 429 and 5xx are transient (with `Retry-After`), 401 and
/// 403 a misconfigured credential, other 4xx permanent.
fn status_error(answer: &Answer, what: &str) -> Result<(), ApiError> {
    let status = answer.status;
    if status.is_success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&answer.body);
    let text: String = text.chars().take(300).collect();
    let kind = match status.as_u16() {
        429 | 500..=599 => ErrorKind::Transient,
        401 | 403 => ErrorKind::Misconfigured,
        _ => ErrorKind::Permanent,
    };
    Err(ApiError { kind, message: format!("{what} answered {status}: {text}"), retry_after: answer.retry_after })
}

fn form_body(fields: &[(&str, &str)]) -> Full<Bytes> {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in fields {
        s.append_pair(k, v);
    }
    Full::new(Bytes::from(s.finish()))
}

/// Slack's Web API as a bot.
#[derive(Clone)]
pub struct Slack {
    pub http: HttpClient,
    /// `https://slack.com/api` by default.
    pub api_url: String,
    pub token: String,
}

impl std::fmt::Debug for Slack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slack").field("api_url", &self.api_url).field("token", &"<redacted>").finish()
    }
}

impl Slack {
    /// Calls a Web API method with form fields; answers the JSON (`ok: true`), or the error.
    /// Slack answers most failures 200 with `ok: false` and an `error` code; `ratelimited` and
    /// 429 wait for `Retry-After`.
    pub async fn call(&self, method: &str, fields: &[(&str, &str)]) -> Result<serde_json::Value, ApiError> {
        let url = format!("{}/{method}", self.api_url.trim_end_matches('/'));
        let request = http::Request::post(&url)
            .header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(http::header::AUTHORIZATION, format!("Bearer {}", self.token))
            .body(form_body(fields))
            .map_err(|e| ApiError {
                kind: ErrorKind::Misconfigured,
                message: format!("bad Slack URL {url}: {e}"),
                retry_after: None,
            })?;
        let answer = self.http.send(request).await?;
        status_error(&answer, &format!("Slack's {method}"))?;
        let json: serde_json::Value = serde_json::from_slice(&answer.body)
            .map_err(|e| ApiError::transient(format!("Slack's {method} answered something that is not JSON: {e}")))?;
        if json.get("ok").and_then(serde_json::Value::as_bool) == Some(true) {
            return Ok(json);
        }
        let code = json.get("error").and_then(serde_json::Value::as_str).unwrap_or("unknown_error").to_owned();
        let kind = match code.as_str() {
            "ratelimited" | "internal_error" | "fatal_error" | "service_unavailable" | "request_timeout" => {
                ErrorKind::Transient
            }
            "not_authed" | "invalid_auth" | "account_inactive" | "token_revoked" | "missing_scope"
            | "not_in_channel" | "channel_not_found" => ErrorKind::Misconfigured,
            _ => ErrorKind::Permanent,
        };
        Err(ApiError { kind, message: format!("Slack's {method} refused: {code}"), retry_after: answer.retry_after })
    }
}

/// Zulip's REST API as a bot.
#[derive(Clone)]
pub struct Zulip {
    pub http: HttpClient,
    /// The organisation's address, `https://chat.example.com`.
    pub site: String,
    pub email: String,
    pub api_key: String,
}

impl std::fmt::Debug for Zulip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zulip")
            .field("site", &self.site)
            .field("email", &self.email)
            .field("api_key", &"<redacted>")
            .finish()
    }
}

impl Zulip {
    async fn call(
        &self,
        method: http::Method,
        path: &str,
        fields: &[(&str, &str)],
    ) -> Result<serde_json::Value, ApiError> {
        let url = format!("{}/api/v1/{path}", self.site.trim_end_matches('/'));
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", self.email, self.api_key));
        let request = http::Request::builder()
            .method(method)
            .uri(&url)
            .header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(http::header::AUTHORIZATION, format!("Basic {auth}"))
            .body(form_body(fields))
            .map_err(|e| ApiError {
                kind: ErrorKind::Misconfigured,
                message: format!("bad Zulip URL {url}: {e}"),
                retry_after: None,
            })?;
        let answer = self.http.send(request).await?;
        status_error(&answer, &format!("Zulip's {path}"))?;
        serde_json::from_slice(&answer.body)
            .map_err(|e| ApiError::transient(format!("Zulip's {path} answered something that is not JSON: {e}")))
    }

    /// Sends a stream message; answers its id.
    pub async fn send(&self, stream: &str, topic: &str, content: &str) -> Result<u64, ApiError> {
        let json = self
            .call(
                http::Method::POST,
                "messages",
                &[("type", "stream"), ("to", stream), ("topic", topic), ("content", content)],
            )
            .await?;
        json.get("id")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| ApiError::transient("Zulip's answer to a new message has no id"))
    }

    /// Replaces a message's content.
    pub async fn edit(&self, id: u64, content: &str) -> Result<(), ApiError> {
        self.call(http::Method::PATCH, &format!("messages/{id}"), &[("content", content)]).await.map(|_| ())
    }
}
