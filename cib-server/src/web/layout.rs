//! The frame every page shares (head, navigation, who is signed in, sign-out), the answers'
//! headers, and small pieces of markup used across pages (statuses, times, durations).

use axum::response::{IntoResponse, Response};
use cib_core::time::Timestamp;
use http::{HeaderValue, StatusCode, header};
use maud::{DOCTYPE, Markup, html};

use crate::error::ApiError;

use super::assets;
use super::session::WebUser;

/// What the frame needs to know of a page.
#[derive(Debug, Default)]
pub struct Page {
    pub title: String,
    /// Which navigation entry is this page's.
    pub nav: &'static str,
    /// The event sequence number the page was rendered at: its script follows the event
    /// stream from there and refreshes the page's live part when something happens.
    pub live_from: Option<u64>,
    /// Only events naming this build refresh the page.
    pub live_build: Option<String>,
}

impl Page {
    pub fn new(title: impl Into<String>) -> Self {
        Page { title: title.into(), ..Page::default() }
    }

    pub fn nav(mut self, nav: &'static str) -> Self {
        self.nav = nav;
        self
    }

    pub fn live(mut self, from: u64) -> Self {
        self.live_from = Some(from);
        self
    }
}

/// A whole page.
pub fn page(p: &Page, user: Option<&WebUser>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                title { (p.title) " · cib" }
                link rel="stylesheet" href=(assets::css_path());
                script src=(assets::js_path()) defer {}
            }
            body data-live-from=[p.live_from] data-live-build=[p.live_build.as_deref()] {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    nav aria-label="Main" {
                        a.brand href="/" { "cib" }
                        @if user.is_some() {
                            a href="/" aria-current=[(p.nav == "dashboard").then_some("page")] { "Dashboard" }
                            a href="/builds" aria-current=[(p.nav == "builds").then_some("page")] { "Builds" }
                            a href="/pools" aria-current=[(p.nav == "pools").then_some("page")] { "Pools" }
                        }
                    }
                    @if let Some(u) = user {
                        div.who {
                            span { (u.person) " · " (format!("{:?}", u.token.role).to_lowercase()) }
                            form method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(u.csrf);
                                button.link type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main #main {
                    (body)
                }
            }
        }
    }
}

/// An HTML answer with the headers every page carries: no caching (pages show live state and
/// a person's buttons), no framing, scripts and styles from this server only.
pub fn html(status: StatusCode, markup: Markup) -> Response {
    let mut response = (status, markup.into_string()).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    response
}

/// A page that says why something was not done.
pub fn refusal(status: StatusCode, user: Option<&WebUser>, message: &str) -> Response {
    let body = html! {
        section.refusal {
            h1 { (status.canonical_reason().unwrap_or("Refused")) }
            p.problem role="alert" { (message) }
            p { a href="/" { "Back to the dashboard" } }
        }
    };
    html(status, page(&Page::new(status.canonical_reason().unwrap_or("Refused")), user, body))
}

/// An API error as a page: its status, its words, and every reason of a refusal.
pub fn error_page(e: &ApiError, user: Option<&WebUser>) -> Response {
    let body = html! {
        section.refusal {
            h1 { (e.status().canonical_reason().unwrap_or("Refused")) }
            (error_words(e))
            p { a href="/" { "Back to the dashboard" } }
        }
    };
    html(e.status(), page(&Page::new("Not done"), user, body))
}

/// An API error's message as the API gives it, line by line.
pub fn error_words(e: &ApiError) -> Markup {
    let text = e.to_string();
    html! {
        div.problem role="alert" {
            @for line in text.lines() { p { (line) } }
        }
    }
}

/// A status as a small coloured label.
pub fn status(text: &str) -> Markup {
    html! { span class=(format!("st st-{text}")) { (text.replace('_', " ")) } }
}

/// A time as `2026-12-02 05:01:02`, the whole stamp in a `<time>` element.
pub fn time(t: Option<Timestamp>) -> Markup {
    match t {
        None => html! { span.muted { "—" } },
        Some(t) => {
            let full = t.rfc3339();
            let short = full.get(..19).unwrap_or(&full).replace('T', " ");
            html! { time datetime=(full) { (short) } }
        }
    }
}

/// How long from `from` to `to` (or to now): `1m 05s`.
pub fn duration(from: Option<Timestamp>, to: Option<Timestamp>, now: Timestamp) -> String {
    let Some(from) = from else { return String::new() };
    let end = to.unwrap_or(now);
    let secs = end.millis().saturating_sub(from.millis()) / 1000;
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {:02}s", s / 60, s % 60),
        s => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// The first 8 characters of a commit.
pub fn short(commit: &str) -> &str {
    commit.get(..8).unwrap_or(commit)
}
