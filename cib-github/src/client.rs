//! The GitHub REST client behind [`crate::GithubVcs`] and [`crate::GithubNotifier`]: octocrab
//! with cib's authentication, and answers classified into cib's error kinds.
//!
//! Requests go through octocrab's raw methods (`_get`, `_post`, `_patch`) so that cib sees every
//! status and header: the notifier needs `Retry-After` and the rate-limit headers to back off,
//! which octocrab's typed errors drop. octocrab's own retry layer is turned off for the same
//! reason: cib's retries are its own, visible in tests and bounded by its configuration.
//!
//! Authentication is a token (a personal access token, or any token an operator provides) or a
//! GitHub App. For an App, octocrab signs a JWT (RS256) with the App's private key, exchanges it
//! for an installation token, caches that token and mints a new one once it is within 30 seconds
//! of expiry, so a long-running server never sends an expired token.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cib_core::ports::ErrorKind;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;
use octocrab::Octocrab;
use octocrab::service::middleware::retry::RetryConfig;
use serde_json::Value;

/// How cib authenticates to GitHub.
#[derive(Clone)]
pub enum Auth {
    /// A token sent as `Authorization: Bearer <token>`.
    Token(String),
    /// A GitHub App acting as one of its installations.
    App {
        app_id: u64,
        /// The App's private key in PEM (PKCS#1 or PKCS#8), as GitHub hands it out.
        private_key_pem: Vec<u8>,
        installation_id: u64,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Neither the token nor the key reaches a log line.
        match self {
            Auth::Token(_) => f.write_str("Auth::Token(..)"),
            Auth::App { app_id, installation_id, .. } => f
                .debug_struct("Auth::App")
                .field("app_id", app_id)
                .field("installation_id", installation_id)
                .finish_non_exhaustive(),
        }
    }
}

/// Why a client could not be built: always a setup problem.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the GitHub client: {0}")]
pub struct SetupError(String);

/// A request that did not get a successful answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    /// The HTTP status, or `None` when no answer arrived.
    pub status: Option<u16>,
    /// How long GitHub asked us to wait, for rate limits.
    pub retry_after: Option<Duration>,
    pub message: String,
}

/// A successful answer.
#[derive(Debug)]
pub struct ApiResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl ApiResponse {
    pub fn json(&self) -> Result<Value, ApiError> {
        serde_json::from_slice(&self.body).map_err(|e| ApiError {
            kind: ErrorKind::Permanent,
            status: Some(self.status.as_u16()),
            retry_after: None,
            message: format!("GitHub answered something that is not JSON: {e}"),
        })
    }
}

/// GitHub's REST API as cib uses it. Cheap to clone.
#[derive(Clone)]
pub struct GithubClient {
    octo: Octocrab,
}

impl std::fmt::Debug for GithubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GithubClient").finish_non_exhaustive()
    }
}

/// The public API's base URI.
pub const GITHUB_API: &str = "https://api.github.com";

impl GithubClient {
    /// A client for the API at `base_uri` (`https://api.github.com`, a GitHub Enterprise
    /// Server's `https://host/api/v3`, or a fake's loopback address in tests).
    pub fn new(base_uri: &str, auth: Auth) -> Result<GithubClient, SetupError> {
        let setup = |e: &dyn std::fmt::Display| SetupError(e.to_string());
        let builder = Octocrab::builder()
            .base_uri(base_uri)
            .map_err(|e| setup(&e))?
            .add_retry_config(RetryConfig::None)
            .set_connect_timeout(Some(Duration::from_secs(10)))
            .set_read_timeout(Some(Duration::from_secs(60)))
            .set_write_timeout(Some(Duration::from_secs(60)));
        let octo = match auth {
            Auth::Token(token) => builder.personal_token(token).build().map_err(|e| setup(&e))?,
            Auth::App { app_id, private_key_pem, installation_id } => {
                let key = octocrab::EncodingKey::from_rsa_pem(&private_key_pem)
                    .map_err(|e| SetupError(format!("the GitHub App's private key: {e}")))?;
                builder
                    .app(octocrab::models::AppId(app_id), key)
                    .build()
                    .map_err(|e| setup(&e))?
                    .installation(octocrab::models::InstallationId(installation_id))
                    .map_err(|e| setup(&e))?
            }
        };
        Ok(GithubClient { octo })
    }

    /// Sends a request to `path` (with its query) and returns a 2xx answer, or the error it
    /// means. Redirects are followed.
    pub async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Result<ApiResponse, ApiError> {
        let result = match method {
            Method::GET => self.octo._get(path).await,
            Method::POST => self.octo._post(path, body).await,
            Method::PATCH => self.octo._patch(path, body).await,
            Method::PUT => self.octo._put(path, body).await,
            Method::DELETE => self.octo._delete(path, body).await,
            other => {
                return Err(ApiError {
                    kind: ErrorKind::Permanent,
                    status: None,
                    retry_after: None,
                    message: format!("cib does not send {other} requests"),
                });
            }
        };
        let response = result.map_err(|e| match e {
            // The installation token exchange happens inside octocrab, which reports GitHub's
            // refusal as an error of its own; it is classified like any other answer.
            octocrab::Error::GitHub { source, .. } => {
                let body = serde_json::json!({ "message": source.message }).to_string();
                let mut error = classify(source.status_code, &source.headers.unwrap_or_default(), body.as_bytes());
                error.message = format!("while getting an installation token: {}", error.message);
                error
            }
            other => transport(&other),
        })?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| transport(&e))?.to_bytes();
        if parts.status.is_success() {
            return Ok(ApiResponse { status: parts.status, headers: parts.headers, body });
        }
        Err(classify(parts.status, &parts.headers, &body))
    }
}

/// No answer arrived (connection refused, timeout, reset): worth another try.
fn transport(e: &dyn std::fmt::Display) -> ApiError {
    ApiError {
        kind: ErrorKind::Transient,
        status: None,
        retry_after: None,
        message: format!("GitHub did not answer: {e}"),
    }
}

/// What an unsuccessful answer means for cib: server errors and rate limits pass, a missing or
/// invalid object stays, and bad credentials or missing permissions need a person.
pub fn classify(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> ApiError {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect());
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let retry_after =
        header("retry-after").and_then(|v| v.parse::<u64>().ok()).map(Duration::from_secs).or_else(|| {
            // A primary rate limit says when the window resets rather than how long to wait.
            (header("x-ratelimit-remaining") == Some("0"))
                .then(|| header("x-ratelimit-reset").and_then(|v| v.parse::<u64>().ok()))
                .flatten()
                .map(|reset| {
                    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                    Duration::from_secs(reset.saturating_sub(now).max(1))
                })
        });
    // GitHub answers rate limits with 403 as well as 429; only the headers or the message tell
    // them from a real refusal.
    let rate_limited = status == StatusCode::TOO_MANY_REQUESTS
        || (status == StatusCode::FORBIDDEN
            && (retry_after.is_some()
                || header("x-ratelimit-remaining") == Some("0")
                || message.to_ascii_lowercase().contains("rate limit")));
    let kind = if status.is_server_error() || rate_limited {
        ErrorKind::Transient
    } else if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        ErrorKind::Misconfigured
    } else {
        ErrorKind::Permanent
    };
    ApiError {
        kind,
        status: Some(status.as_u16()),
        retry_after: if rate_limited { retry_after } else { None },
        message: format!("GitHub answered {}: {message}", status.as_u16()),
    }
}

/// Percent-encodes `s` for a URI path, keeping `/` when `keep_slash` (file paths, refs in
/// multi-segment parameters).
pub(crate) fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `owner/name` split and encoded for a path, or a permanent error for anything else.
pub(crate) fn repo_path(repo: &str) -> Result<String, ApiError> {
    match repo.split_once('/') {
        Some((owner, name)) if !owner.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(format!("/repos/{}/{}", encode(owner, false), encode(name, false)))
        }
        _ => Err(ApiError {
            kind: ErrorKind::Permanent,
            status: None,
            retry_after: None,
            message: format!("`{repo}` is not a GitHub repository name (owner/name)"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().expect("header value"));
        }
        h
    }

    #[test]
    fn answers_are_classified() {
        let kind = |status: u16, h: &[(&'static str, &str)], body: &str| {
            classify(StatusCode::from_u16(status).expect("status"), &headers(h), body.as_bytes())
        };
        assert_eq!(kind(502, &[], "").kind, ErrorKind::Transient);
        assert_eq!(kind(404, &[], r#"{"message":"Not Found"}"#).kind, ErrorKind::Permanent);
        assert_eq!(kind(422, &[], "{}").kind, ErrorKind::Permanent);
        assert_eq!(kind(401, &[], "{}").kind, ErrorKind::Misconfigured);
        assert_eq!(kind(403, &[], r#"{"message":"Resource not accessible"}"#).kind, ErrorKind::Misconfigured);
        let secondary = kind(403, &[("retry-after", "7")], r#"{"message":"secondary rate limit"}"#);
        assert_eq!((secondary.kind, secondary.retry_after), (ErrorKind::Transient, Some(Duration::from_secs(7))));
        let by_message = kind(403, &[], r#"{"message":"You have exceeded a secondary rate limit."}"#);
        assert_eq!(by_message.kind, ErrorKind::Transient);
        assert_eq!(kind(429, &[], "").kind, ErrorKind::Transient);
    }

    #[test]
    fn paths_are_encoded() {
        assert_eq!(encode("feature/a b", true), "feature/a%20b");
        assert_eq!(encode("a/b", false), "a%2Fb");
        assert!(repo_path("o/r").is_ok());
        assert!(repo_path("o/r/x").is_err());
        assert!(repo_path("o").is_err());
    }
}
