//! Who is asking: bearer tokens checked in constant time, and the role a route needs enforced
//! by a layer that the route table puts on every protected route, so no handler checks roles
//! by hand.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header;
use http::request::Parts;
use sha2::{Digest, Sha256};

use crate::config::{Role, TokenConfig};
use crate::error::ApiError;
use crate::state::AppState;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone: health, the API description.
    Public,
    /// Anyone whose request is signed with the webhook secret; the handler checks the
    /// signature over the raw body, since the body is what is signed.
    Signed,
    /// A bearer token with at least this role.
    Role(Role),
    /// A web page anyone may open (the sign-in form, the static assets). Pages are HTML, not
    /// part of the API, and left out of its description.
    Page,
    /// A web page or a form's action for a person signed in (a session cookie) whose token
    /// has at least this role; a POST must also carry the session's CSRF token. Checked by
    /// `web::session::layer`, which the route table puts on the route.
    Session(Role),
}

impl Access {
    /// Whether the route belongs to the API (and so to its OpenAPI description), rather than
    /// to the web pages.
    pub fn in_api(self) -> bool {
        !matches!(self, Access::Page | Access::Session(_))
    }
}

/// The person behind an authenticated request, as the role layer found them.
#[derive(Debug, Clone)]
pub struct Caller(pub TokenConfig);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // The role layer inserts the caller; a handler on a route without one has nobody to
        // act for, which is the same as no token.
        parts.extensions.get::<Caller>().cloned().ok_or(ApiError::Unauthorized)
    }
}

/// The token a request carries in `Authorization: Bearer`, if the server knows it.
pub fn authenticate<'a>(state: &'a AppState, headers: &http::HeaderMap) -> Option<&'a TokenConfig> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let given = value.strip_prefix("Bearer ")?.trim();
    // Digests are compared rather than tokens: they have one length, so timing reveals
    // neither a prefix nor a token's length, and a file may hold only the digest
    // (`token_sha256`). Every token is compared, so timing does not tell which matched.
    let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
    let mut found = None;
    for t in &state.config.tokens {
        let Some(expected) = token_digest(t) else { continue };
        if constant_time_eq(&expected, &given) && found.is_none() {
            found = Some(t);
        }
    }
    found
}

/// The SHA-256 a token is known by: the configured digest, or the plain token's.
fn token_digest(t: &TokenConfig) -> Option<[u8; 32]> {
    match &t.token_sha256 {
        Some(hex_digest) => crate::config::digest_bytes(hex_digest),
        None if t.token.is_empty() => None,
        None => Some(Sha256::digest(t.token.as_bytes()).into()),
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token when it holds at least `role`, or the refusal.
pub fn require(state: &AppState, headers: &http::HeaderMap, role: Role) -> Result<TokenConfig, ApiError> {
    match authenticate(state, headers) {
        None => Err(ApiError::Unauthorized),
        Some(t) => has_role(t, role).map(|()| t.clone()),
    }
}

/// Whether `t` holds at least `role`; the refusal in the words every frontend shows.
pub fn has_role(t: &TokenConfig, role: Role) -> Result<(), ApiError> {
    if t.role < role {
        return Err(ApiError::Forbidden(format!("'{}' may not do this: it needs the {role:?} role", t.name)));
    }
    Ok(())
}

/// A request made inside the server on behalf of a person authenticated another way (a chat
/// user, by a verified Slack signature or Zulip token, mapped through `[[people]]` to one of
/// their tokens). Only code in this process can attach it: an HTTP client cannot set a
/// request's extensions. The role layer then checks this token's role as it checks a bearer's.
#[derive(Debug, Clone)]
pub struct OnBehalfOf(pub TokenConfig);

/// The layer's function: checks the role before the handler runs, and hands the handler the
/// caller.
pub async fn layer(State((state, role)): State<(Arc<AppState>, Role)>, mut req: Request, next: Next) -> Response {
    let found = match req.extensions_mut().remove::<OnBehalfOf>() {
        Some(OnBehalfOf(token)) => has_role(&token, role).map(|()| token),
        None => require(&state, req.headers(), role),
    };
    match found {
        Ok(token) => {
            req.extensions_mut().insert(Caller(token));
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}
