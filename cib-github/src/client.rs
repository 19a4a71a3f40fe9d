//! The GitHub REST client behind [`crate::GithubVcs`] and [`crate::GithubNotifier`]: octocrab
//! with cib's authentication, and answers classified into cib's error kinds.
//!
//! Requests go through octocrab's raw methods (`_get`, `_post`, `_patch`) so that cib sees every
//! status and header: the notifier needs `Retry-After` and the rate-limit headers to back off,
//! which octocrab's typed errors drop. octocrab's own retry layer is turned off for the same
//! reason: cib's retries are its own, visible in tests and bounded by its configuration.
//!
//! Authentication is a token (a personal access token, or any token an operator provides) or a
//! GitHub App. For an App, the client signs a JWT (RS256, through octocrab) with the App's
//! private key, finds the installation of each repository it talks to
//! (`GET /repos/{owner}/{repo}/installation`, remembered), exchanges the JWT for that
//! installation's token and caches the token per installation until it is within 30 seconds of
//! expiry, so one server serves repositories of several installations and never sends an
//! expired token. The client mints the tokens itself rather than through octocrab's
//! `installation()`, because `git fetch` needs the token's text and octocrab keeps it private.

use std::collections::HashMap;
use std::sync::Arc;
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
    /// A GitHub App acting as its installations.
    App {
        app_id: u64,
        /// The App's private key in PEM (PKCS#1 or PKCS#8), as GitHub hands it out.
        private_key_pem: Vec<u8>,
        /// One installation for every repository; `None` finds each repository's own.
        installation_id: Option<u64>,
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
    inner: Arc<ClientInner>,
}

enum ClientInner {
    Token { octo: Octocrab, token: String },
    App(AppClient),
}

/// An App's state: the JWT-signing client, the repositories' installations and the
/// installations' tokens.
struct AppClient {
    base_uri: String,
    /// Signs every request with a fresh JWT; used for the installation lookups and the token
    /// exchanges only.
    jwt: Octocrab,
    fixed: Option<u64>,
    /// Repository (`owner/name`, lowercased) to installation id.
    installations: std::sync::Mutex<HashMap<String, u64>>,
    /// Installation id to its current token. An async mutex, so that two requests needing a
    /// token at once mint one rather than two.
    tokens: tokio::sync::Mutex<HashMap<u64, Installed>>,
}

#[derive(Clone)]
struct Installed {
    token: String,
    expires: SystemTime,
    octo: Octocrab,
}

/// A token is replaced this long before GitHub's expiry, so that no request carries one that
/// expires on the way.
const TOKEN_MARGIN: Duration = Duration::from_secs(30);

impl std::fmt::Debug for GithubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GithubClient").finish_non_exhaustive()
    }
}

/// The public API's base URI.
pub const GITHUB_API: &str = "https://api.github.com";

fn builder(
    base_uri: &str,
) -> Result<
    octocrab::OctocrabBuilder<
        octocrab::NoSvc,
        octocrab::DefaultOctocrabBuilderConfig,
        octocrab::NoAuth,
        octocrab::NotLayerReady,
    >,
    SetupError,
> {
    Ok(Octocrab::builder()
        .base_uri(base_uri)
        .map_err(|e| SetupError(e.to_string()))?
        .add_retry_config(RetryConfig::None)
        .set_connect_timeout(Some(Duration::from_secs(10)))
        .set_read_timeout(Some(Duration::from_secs(60)))
        .set_write_timeout(Some(Duration::from_secs(60))))
}

fn token_client(base_uri: &str, token: &str) -> Result<Octocrab, SetupError> {
    builder(base_uri)?.personal_token(token.to_owned()).build().map_err(|e| SetupError(e.to_string()))
}

fn permanent(message: String) -> ApiError {
    ApiError { kind: ErrorKind::Permanent, status: None, retry_after: None, message }
}

impl GithubClient {
    /// A client for the API at `base_uri` (`https://api.github.com`, a GitHub Enterprise
    /// Server's `https://host/api/v3`, or a fake's loopback address in tests).
    pub fn new(base_uri: &str, auth: Auth) -> Result<GithubClient, SetupError> {
        let inner = match auth {
            Auth::Token(token) => ClientInner::Token { octo: token_client(base_uri, &token)?, token },
            Auth::App { app_id, private_key_pem, installation_id } => {
                let key = octocrab::EncodingKey::from_rsa_pem(&private_key_pem)
                    .map_err(|e| SetupError(format!("the GitHub App's private key: {e}")))?;
                let jwt = builder(base_uri)?
                    .app(octocrab::models::AppId(app_id), key)
                    .build()
                    .map_err(|e| SetupError(e.to_string()))?;
                ClientInner::App(AppClient {
                    base_uri: base_uri.to_owned(),
                    jwt,
                    fixed: installation_id,
                    installations: std::sync::Mutex::new(HashMap::new()),
                    tokens: tokio::sync::Mutex::new(HashMap::new()),
                })
            }
        };
        Ok(GithubClient { inner: Arc::new(inner) })
    }

    /// Whether the client acts as a GitHub App, which is what check runs need.
    pub fn is_app(&self) -> bool {
        matches!(*self.inner, ClientInner::App(_))
    }

    /// Sends a request to `path` (with its query) and returns a 2xx answer, or the error it
    /// means. Redirects are followed. An App acts as the installation of the repository the
    /// path names (`/repos/{owner}/{repo}/...`).
    pub async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Result<ApiResponse, ApiError> {
        let repo = path.strip_prefix("/repos/").and_then(|rest| {
            let mut parts = rest.splitn(3, '/');
            let (owner, name) = (parts.next()?, parts.next()?);
            let name = name.split('?').next()?;
            Some(format!("{}/{}", percent_decode(owner), percent_decode(name)))
        });
        self.send_for(repo.as_deref(), method, path, body).await
    }

    /// Sends a request on behalf of `repo`: an App uses that repository's installation, which
    /// is how paths that name no repository (an organisation's teams) find theirs.
    pub async fn send_for(
        &self,
        repo: Option<&str>,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<ApiResponse, ApiError> {
        let octo = match &*self.inner {
            ClientInner::Token { octo, .. } => octo.clone(),
            ClientInner::App(app) => app.installed(repo).await?.octo,
        };
        raw(&octo, method, path, body).await
    }

    /// The token that reads `repo` with git over HTTPS: the operator's token, or the
    /// installation token of the repository's installation. Callers hand it to `git` for one
    /// fetch and keep it out of files and step environments.
    pub async fn git_token(&self, repo: &str) -> Result<String, ApiError> {
        match &*self.inner {
            ClientInner::Token { token, .. } => Ok(token.clone()),
            ClientInner::App(app) => Ok(app.installed(Some(repo)).await?.token),
        }
    }
}

impl AppClient {
    /// The installation serving `repo`: the configured one, or GitHub's answer, remembered.
    async fn installation(&self, repo: Option<&str>) -> Result<u64, ApiError> {
        if let Some(id) = self.fixed {
            return Ok(id);
        }
        let Some(repo) = repo else {
            return Err(permanent("a GitHub App without installation_id needs a repository to act for".into()));
        };
        let key = repo.to_ascii_lowercase();
        if let Some(id) = lock(&self.installations).get(&key) {
            return Ok(*id);
        }
        let path = format!("{}/installation", repo_path(repo)?);
        let answer = raw(&self.jwt, Method::GET, &path, None).await.map_err(|mut e| {
            e.message = format!("while finding the App's installation for {repo}: {}", e.message);
            e
        })?;
        let id = answer
            .json()?
            .get("id")
            .and_then(Value::as_u64)
            .ok_or_else(|| permanent(format!("GitHub's installation of {repo} has no id")))?;
        lock(&self.installations).insert(key, id);
        Ok(id)
    }

    /// A client holding a fresh token of the installation serving `repo`.
    async fn installed(&self, repo: Option<&str>) -> Result<Installed, ApiError> {
        let id = self.installation(repo).await?;
        let mut tokens = self.tokens.lock().await;
        if let Some(found) = tokens.get(&id)
            && found.expires > SystemTime::now() + TOKEN_MARGIN
        {
            return Ok(found.clone());
        }
        let path = format!("/app/installations/{id}/access_tokens");
        let answer = raw(&self.jwt, Method::POST, &path, None).await.map_err(|mut e| {
            e.message = format!("while getting an installation token: {}", e.message);
            e
        })?;
        let value = answer.json()?;
        let token = value
            .get("token")
            .and_then(Value::as_str)
            .ok_or_else(|| permanent("GitHub's installation token answer has no token".into()))?
            .to_owned();
        // GitHub says when the token expires; an unreadable date is taken as the documented
        // hour, less the margin, rather than trusted forever.
        let expires = value
            .get("expires_at")
            .and_then(Value::as_str)
            .and_then(parse_utc)
            .map(|secs| UNIX_EPOCH + Duration::from_secs(secs))
            .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(3600));
        let octo = token_client(&self.base_uri, &token).map_err(|e| permanent(e.to_string()))?;
        let installed = Installed { token, expires, octo };
        tokens.insert(id, installed.clone());
        Ok(installed)
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` (GitHub's form of `expires_at`) as Unix seconds.
fn parse_utc(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| text.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    // Days from the civil date (Howard Hinnant's algorithm), valid for every Gregorian date.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps are replaced entry by entry, so they stay usable if a holder panicked.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Decodes `%XX` escapes, as in a URL's path segments; a malformed escape stays as it is.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One request through `octo`, its answer read whole and classified.
async fn raw(octo: &Octocrab, method: Method, path: &str, body: Option<&Value>) -> Result<ApiResponse, ApiError> {
    let result = match method {
        Method::GET => octo._get(path).await,
        Method::POST => octo._post(path, body).await,
        Method::PATCH => octo._patch(path, body).await,
        Method::PUT => octo._put(path, body).await,
        Method::DELETE => octo._delete(path, body).await,
        other => return Err(permanent(format!("cib does not send {other} requests"))),
    };
    let response = result.map_err(|e| match e {
        octocrab::Error::GitHub { source, .. } => {
            let body = serde_json::json!({ "message": source.message }).to_string();
            classify(source.status_code, &source.headers.unwrap_or_default(), body.as_bytes())
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
    fn expiry_dates_are_read() {
        assert_eq!(parse_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_utc("2023-11-14T22:13:20Z"), Some(1_700_000_000));
        assert_eq!(parse_utc("2024-02-29T00:00:00Z"), Some(1_709_164_800));
        assert_eq!(parse_utc("tomorrow"), None);
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
