//! The pages' style sheet and script, compiled into the binary and served under names that
//! carry a hash of their content (`/assets/app.3f2a9c1e0b.css`), so that browsers may keep them
//! for a year and still never run an old script against a new page.

use std::sync::OnceLock;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use sha2::{Digest, Sha256};

use crate::extract::PathParams;

const CSS: &str = include_str!("static/app.css");
const JS: &str = include_str!("static/app.js");

struct Asset {
    path: String,
    body: &'static str,
    media: &'static str,
}

fn named(stem: &str, ext: &str, body: &'static str, media: &'static str) -> Asset {
    let hash = hex::encode(Sha256::digest(body.as_bytes()));
    Asset { path: format!("/assets/{stem}.{}.{ext}", &hash[..12]), body, media }
}

fn assets() -> &'static [Asset; 2] {
    static ASSETS: OnceLock<[Asset; 2]> = OnceLock::new();
    ASSETS.get_or_init(|| {
        [named("app", "css", CSS, "text/css; charset=utf-8"), named("app", "js", JS, "text/javascript; charset=utf-8")]
    })
}

/// Where the style sheet is served.
pub fn css_path() -> &'static str {
    &assets()[0].path
}

/// Where the script is served.
pub fn js_path() -> &'static str {
    &assets()[1].path
}

/// `GET /assets/{file}`: only the current names answer, so a stale name is a 404 rather than
/// new content under an old name.
pub async fn serve(PathParams(file): PathParams<String>) -> Response {
    let wanted = format!("/assets/{file}");
    let Some(asset) = assets().iter().find(|a| a.path == wanted) else {
        return (StatusCode::NOT_FOUND, "no such asset").into_response();
    };
    let mut response = (StatusCode::OK, asset.body).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.media));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=31536000, immutable"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}
