//! Signing in to the web pages: an API token, given once on `/login`, becomes a session.
//!
//! The session's id is 32 random bytes from the operating system, kept only in the person's
//! cookie (`HttpOnly`, `SameSite=Strict`, `Secure` when the public URL is https); the store
//! keys the session by the id's SHA-256, so a copy of the database opens nothing. A session
//! ends after 12 hours without use, or at sign-out. Its CSRF token is derived from the id (a
//! second, domain-separated hash), so it needs no storage and cannot be guessed without the
//! cookie; every POST must carry it, and [`layer`] checks it, with the role, before any
//! handler runs. The sign-in form has its own token, in a short-lived cookie of its own, so
//! that another site cannot sign a browser in under someone else's token.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use cib_core::ports::SessionRecord;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use maud::html;
use sha2::{Digest, Sha256};

use crate::auth::Caller;
use crate::config::{Role, TokenConfig};
use crate::state::AppState;

use super::layout::{self, Page};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "cib_session";
/// The sign-in form's own cookie, holding that form's CSRF token.
pub const LOGIN_COOKIE: &str = "cib_login";
/// A session unused for this long has ended.
pub const IDLE: Duration = Duration::from_secs(12 * 60 * 60);
/// A session's last use is written at most this often, so that reading pages costs no write.
const TOUCH_EVERY: Duration = Duration::from_secs(60);
/// The largest form a page posts.
const FORM_LIMIT: usize = 64 * 1024;

/// The signed-in person, as the session layer found them.
#[derive(Debug, Clone)]
pub struct WebUser {
    pub token: TokenConfig,
    /// The person behind the token, as decisions record them.
    pub person: String,
    /// This session's CSRF token, which every form of the page carries.
    pub csrf: String,
}

impl WebUser {
    /// Whether the person's role allows `role`'s actions, so that a page shows only the
    /// buttons that would be accepted (the layer checks again on every POST).
    pub fn can(&self, role: Role) -> bool {
        self.token.role >= role
    }
}

impl<S: Send + Sync> FromRequestParts<S> for WebUser {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<WebUser>().cloned().ok_or_else(|| StatusCode::FORBIDDEN.into_response())
    }
}

/// A posted form's fields, read by the layer (which needed the CSRF token from it).
#[derive(Debug, Clone, Default)]
pub struct Form(pub BTreeMap<String, String>);

impl Form {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str).filter(|v| !v.is_empty())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Form {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<Form>().cloned().unwrap_or_default())
    }
}

/// Hex of `n` random bytes from the operating system.
fn random_hex(n: usize) -> Option<String> {
    let mut bytes = vec![0u8; n];
    getrandom::getrandom(&mut bytes).ok()?;
    Some(hex::encode(bytes))
}

/// What the store keys a session by.
pub fn digest(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

/// The CSRF token of a session: a hash of its id, apart from the store's digest.
pub fn csrf_of(id: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"cib web csrf token\0");
    h.update(id.as_bytes());
    hex::encode(h.finalize())
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A cookie's value from the request's `Cookie` headers.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name && !v.is_empty()).then(|| v.to_owned())
    })
}

/// Whether cookies must be `Secure`: when people reach the server over https.
fn secure(state: &AppState) -> bool {
    state.config.github.public_url.as_deref().is_some_and(|u| u.to_ascii_lowercase().starts_with("https://"))
}

fn set_cookie(state: &AppState, name: &str, value: &str, path: &str, max_age: Option<u64>) -> HeaderValue {
    let mut text = format!("{name}={value}; Path={path}; HttpOnly; SameSite=Strict");
    if let Some(age) = max_age {
        text.push_str(&format!("; Max-Age={age}"));
    }
    if secure(state) {
        text.push_str("; Secure");
    }
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("cib_invalid=1"))
}

/// The signed-in person of a request, if their session is alive and their token still
/// configured. An idle session is removed here.
pub async fn current(state: &AppState, headers: &HeaderMap) -> Option<WebUser> {
    let id = cookie(headers, SESSION_COOKIE)?;
    // A session id is 64 hex digits; anything else is not worth a read.
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let key = digest(&id);
    let record = state.sessions.session(&key).await.ok()??;
    let now = state.clock.now();
    let idle = now.millis().saturating_sub(record.last_seen.millis());
    if idle > IDLE.as_millis() as u64 {
        let _ = state.sessions.remove_session(&key).await;
        return None;
    }
    if idle > TOUCH_EVERY.as_millis() as u64 {
        // A failed touch costs at most an earlier expiry, never a refused page.
        let _ = state.sessions.touch_session(&key, now).await;
    }
    let token = state.config.tokens.iter().find(|t| t.name == record.token_name)?.clone();
    Some(WebUser { person: state.person_of_token(&token.name), csrf: csrf_of(&id), token })
}

/// Where a page sends a person who must sign in first: back here afterwards.
fn to_login(uri: &Uri) -> Response {
    let back = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let location = format!("/login?next={}", encode(back));
    redirect(&location)
}

/// `303 See Other` to a path of this server.
pub fn redirect(location: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
}

/// Percent-encodes a value for a query string.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Only a path of this server may follow a sign-in: never another site (`//host`).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.to_owned(),
        _ => "/".to_owned(),
    }
}

/// The route table's layer for `Access::Session(role)`: a page without a session goes to the
/// sign-in form; a POST needs a session, the role and the session's CSRF token, or it is
/// refused with 403 before its handler runs.
pub async fn layer(State((state, role)): State<(Arc<AppState>, Role)>, req: Request, next: Next) -> Response {
    let safe = matches!(*req.method(), Method::GET | Method::HEAD);
    let user = current(&state, req.headers()).await;
    let Some(user) = user else {
        if safe {
            return to_login(req.uri());
        }
        return layout::refusal(StatusCode::FORBIDDEN, None, "Sign in first: this action needs a signed-in person.");
    };
    if user.token.role < role {
        let role_name = format!("{role:?}").to_lowercase();
        let message = format!("'{}' may not do this: it needs the {role_name} role.", user.token.name);
        return layout::refusal(StatusCode::FORBIDDEN, Some(&user), &message);
    }
    let (mut parts, body) = req.into_parts();
    if !safe {
        let bytes = match crate::http::read_body(body, FORM_LIMIT).await {
            Ok(b) => b,
            Err(_) => return layout::refusal(StatusCode::PAYLOAD_TOO_LARGE, Some(&user), "The form is too large."),
        };
        let form = crate::http::pairs(std::str::from_utf8(&bytes).unwrap_or_default());
        let given = form
            .get("csrf")
            .cloned()
            .or_else(|| parts.headers.get("x-csrf-token").and_then(|v| v.to_str().ok()).map(str::to_owned));
        if !given.is_some_and(|g| same(&g, &user.csrf)) {
            return layout::refusal(
                StatusCode::FORBIDDEN,
                Some(&user),
                "This form's CSRF token is missing or wrong: reload the page and try again.",
            );
        }
        parts.extensions.insert(Form(form));
    }
    parts.extensions.insert(Caller(user.token.clone()));
    parts.extensions.insert(user);
    next.run(Request::from_parts(parts, Body::empty())).await
}

/// `GET /login`: the sign-in form, with a fresh token of its own in a cookie.
pub async fn login_form(State(state): State<Arc<AppState>>, uri: Uri) -> Response {
    let q = crate::http::query(&uri);
    login_page(&state, StatusCode::OK, q.get("next").map(String::as_str), None)
}

fn login_page(state: &AppState, status: StatusCode, next: Option<&str>, problem: Option<&str>) -> Response {
    let Some(nonce) = random_hex(32) else {
        return layout::refusal(StatusCode::SERVICE_UNAVAILABLE, None, "No randomness is available for a session.");
    };
    let next = safe_next(next);
    let body = html! {
        section.login {
            h1 { "Sign in to cib" }
            @if let Some(p) = problem { p.problem role="alert" { (p) } }
            form method="post" action="/login" {
                input type="hidden" name="csrf" value=(nonce);
                input type="hidden" name="next" value=(next);
                label for="token" { "API token" }
                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                p.hint { "The token an operator gave you (the one the " code { "cib" } " command uses). It is sent once; the page then keeps a session for 12 hours of use." }
                button.primary type="submit" { "Sign in" }
            }
        }
    };
    let mut response = layout::html(status, layout::page(&Page::new("Sign in"), None, body));
    response.headers_mut().append(header::SET_COOKIE, set_cookie(state, LOGIN_COOKIE, &nonce, "/login", Some(3600)));
    response
}

/// `POST /login`: a known token becomes a session.
pub async fn login(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let Ok(bytes) = crate::http::read_body(body, FORM_LIMIT).await else {
        return layout::refusal(StatusCode::PAYLOAD_TOO_LARGE, None, "The form is too large.");
    };
    let form = crate::http::pairs(std::str::from_utf8(&bytes).unwrap_or_default());
    let expected = cookie(&headers, LOGIN_COOKIE);
    let given = form.get("csrf");
    if !matches!((&expected, given), (Some(e), Some(g)) if same(e, g)) {
        return layout::refusal(
            StatusCode::FORBIDDEN,
            None,
            "This sign-in form's CSRF token is missing or wrong: open the sign-in page again.",
        );
    }
    let next = form.get("next").map(String::as_str);
    let token_text = form.get("token").map(|t| t.trim()).unwrap_or_default();
    let mut probe = HeaderMap::new();
    let known = HeaderValue::from_str(&format!("Bearer {token_text}"))
        .ok()
        .and_then(|v| {
            probe.insert(header::AUTHORIZATION, v);
            crate::auth::authenticate(&state, &probe)
        })
        .filter(|_| !token_text.is_empty())
        .cloned();
    let Some(token) = known else {
        return login_page(&state, StatusCode::UNAUTHORIZED, next, Some("That token is not known to this server."));
    };
    let Some(id) = random_hex(32) else {
        return layout::refusal(StatusCode::SERVICE_UNAVAILABLE, None, "No randomness is available for a session.");
    };
    let now = state.clock.now();
    // Old sessions are swept here, the one moment sessions are made, rather than by a timer.
    let _ = state.sessions.expire_sessions(now - IDLE).await;
    let record = SessionRecord { token_name: token.name.clone(), created_at: now, last_seen: now };
    if let Err(e) = state.sessions.create_session(&digest(&id), &record).await {
        return layout::refusal(StatusCode::SERVICE_UNAVAILABLE, None, &format!("The session cannot be stored: {e}"));
    }
    tracing::info!(token = %token.name, "signed in to the web pages");
    let mut response = redirect(&safe_next(next));
    let headers = response.headers_mut();
    headers.append(header::SET_COOKIE, set_cookie(&state, SESSION_COOKIE, &id, "/", None));
    headers.append(header::SET_COOKIE, set_cookie(&state, LOGIN_COOKIE, "", "/login", Some(0)));
    response
}

/// `POST /logout`: the session ends, here and in the store.
pub async fn logout(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers, SESSION_COOKIE) {
        let _ = state.sessions.remove_session(&digest(&id)).await;
    }
    let mut response = redirect("/login");
    response.headers_mut().append(header::SET_COOKIE, set_cookie(&state, SESSION_COOKIE, "", "/", Some(0)));
    response
}
