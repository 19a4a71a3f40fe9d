//! The web pages: server-rendered HTML for people, beside the API (`/api/v1`) and routed
//! through the same route table, so each page and each form's action has its role written
//! next to it. Pages work without JavaScript; a small script (`static/app.js`, no framework)
//! makes them live over the server's event streams. See `docs/web.md`.
//!
//! - `session`: signing in with an API token, the session cookie, the CSRF token, and the
//!   layer that checks them (and the role) before any page or action runs.
//! - `pages`: the dashboard, builds, a build, pools, a repository's environments.
//! - `logpage`: a step's log, its earlier lines by offset, and the raw download.
//! - `actions`: the forms' targets, each calling the API's own handler.
//! - `layout`, `ansi`, `assets`: the frame of every page, colours in logs, the embedded style
//!   sheet and script under content-hashed names.

pub mod actions;
pub mod ansi;
pub mod assets;
pub mod layout;
pub mod logpage;
pub mod pages;
pub mod session;

use crate::openapi::{DocGen, Op};

/// The description of a page's route. Pages are not in the API's OpenAPI document
/// (`routes::document` leaves out every `Access::Page` and `Access::Session` route), but the
/// route table wants one for every entry.
pub fn page_doc(_g: &mut DocGen) -> Op {
    Op::new("A web page or a form's action (HTML), not part of the API.")
}
