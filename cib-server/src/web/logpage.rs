//! A step's log as a page: the last 2,000 lines rendered on the server (so a 64 MiB log costs
//! the browser no more than a short one), earlier lines by offset on demand, the live tail over
//! the log's event stream, line anchors, timestamps, the raw download and the first error.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use cib_core::event::BuildId;
use cib_core::ports::LogKey;
use cib_core::time::Timestamp;
use http::{HeaderValue, StatusCode, Uri, header};
use maud::{Markup, html};

use crate::error::ApiError;
use crate::extract::PathParams;
use crate::state::AppState;

use super::ansi;
use super::layout::{self, Page};
use super::session::{WebUser, encode};

/// Lines rendered at once: the tail first, then this many more per step back.
pub const WINDOW_LINES: usize = 2000;
/// The most bytes one window reads, so that a log of very long lines stays bounded.
const WINDOW_BYTES: u64 = 8 << 20;
/// The store's largest single read.
const READ_MAX: usize = 4 << 20;

/// The log a request names: `?attempt=N`, or the step's latest attempt.
async fn log_key(
    state: &AppState,
    q: &std::collections::BTreeMap<String, String>,
    id: &str,
    step: &str,
) -> Result<LogKey, ApiError> {
    let attempt = match q.get("attempt").filter(|a| !a.is_empty()) {
        Some(a) => a.parse::<u32>().map_err(|_| ApiError::BadRequest("'attempt' is a whole number".into()))?,
        None => state
            .store
            .build(&BuildId(id.to_owned()))
            .await
            .map_err(ApiError::unavailable)?
            .ok_or_else(|| ApiError::NotFound(format!("no build '{id}'")))?
            .steps
            .iter()
            .filter(|s| s.name == step)
            .map(|s| s.attempt)
            .max()
            .ok_or_else(|| ApiError::NotFound(format!("step '{step}' of build '{id}' has not started")))?,
    };
    Ok(LogKey { build: BuildId(id.to_owned()), step: step.to_owned(), attempt })
}

fn offset_param(q: &std::collections::BTreeMap<String, String>, key: &str) -> Result<Option<u64>, ApiError> {
    match q.get(key).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| ApiError::BadRequest(format!("'{key}' is a whole number"))),
    }
}

/// Reads `[from, to)` of a log.
async fn read_range(state: &AppState, key: &LogKey, from: u64, to: u64) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::new();
    let mut at = from;
    while at < to {
        let want = ((to - at) as usize).min(READ_MAX);
        let read = state.store.read_log(key, at, want).await.map_err(ApiError::unavailable)?;
        if read.next_offset <= at {
            break;
        }
        out.extend_from_slice(&read.data);
        at = read.next_offset;
    }
    Ok(out)
}

type CountKey = (String, String, u32, u64);

/// Line counts already made, by log and offset: bytes before an offset never change (logs only
/// grow, and their offsets never move), so a count stays true. Bounded; cleared when full.
fn counts() -> &'static std::sync::Mutex<std::collections::HashMap<CountKey, u64>> {
    static COUNTS: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<CountKey, u64>>> =
        std::sync::OnceLock::new();
    COUNTS.get_or_init(Default::default)
}

fn count_key(key: &LogKey, offset: u64) -> CountKey {
    (key.build.0.clone(), key.step.clone(), key.attempt, offset)
}

fn cached_count(key: &LogKey, offset: u64) -> Option<u64> {
    counts().lock().ok()?.get(&count_key(key, offset)).copied()
}

/// The lines before `offset`, counted (or remembered).
async fn count_lines(state: &AppState, key: &LogKey, offset: u64) -> Result<u64, ApiError> {
    if let Some(n) = cached_count(key, offset) {
        return Ok(n);
    }
    let n = lines_before(state, key, offset).await?;
    if let Ok(mut map) = counts().lock() {
        if map.len() >= 4096 {
            map.clear();
        }
        map.insert(count_key(key, offset), n);
    }
    Ok(n)
}

/// How many lines end before `offset`: the number of the line that starts there, less one.
async fn lines_before(state: &AppState, key: &LogKey, offset: u64) -> Result<u64, ApiError> {
    let mut count = 0u64;
    let mut at = 0;
    while at < offset {
        let want = ((offset - at) as usize).min(READ_MAX);
        let read = state.store.read_log(key, at, want).await.map_err(ApiError::unavailable)?;
        if read.next_offset <= at {
            break;
        }
        count += memchr::memchr_iter(b'\n', &read.data).count() as u64;
        at = read.next_offset;
    }
    Ok(count)
}

/// The lines of a log ending at `end`: whole lines only, at most [`WINDOW_LINES`].
#[derive(Debug)]
struct Window {
    /// Each line's offset and text (without its newline).
    lines: Vec<(u64, String)>,
    /// Where the first line starts.
    start: u64,
    /// Where the last whole line ends: the live tail resumes here.
    end: u64,
}

async fn window(state: &AppState, key: &LogKey, end: u64, complete: bool) -> Result<Window, ApiError> {
    let mut span = 256 * 1024u64;
    loop {
        let start = end.saturating_sub(span);
        let data = read_range(state, key, start, end).await?;
        let mut lines: Vec<(u64, String)> = Vec::new();
        let mut pos = 0usize;
        while pos < data.len() {
            let stop = data[pos..].iter().position(|b| *b == b'\n').map(|i| pos + i);
            match stop {
                Some(s) => {
                    lines.push((start + pos as u64, String::from_utf8_lossy(&data[pos..s]).into_owned()));
                    pos = s + 1;
                }
                None => {
                    // A line still being written: the live tail sends it whole. A finished log
                    // may end without a newline, and then its last line is shown as it is.
                    if complete {
                        lines.push((start + pos as u64, String::from_utf8_lossy(&data[pos..]).into_owned()));
                        pos = data.len();
                    }
                    break;
                }
            }
        }
        let whole_end = start + pos as u64;
        // The first piece is part of a line that began earlier, unless the window starts the log.
        if start > 0 && !lines.is_empty() {
            lines.remove(0);
        }
        if lines.len() > WINDOW_LINES || start == 0 || span >= WINDOW_BYTES {
            let skip = lines.len().saturating_sub(WINDOW_LINES);
            lines.drain(..skip);
            let first = lines.first().map_or(whole_end, |(o, _)| *o);
            return Ok(Window { lines, start: first, end: whole_end.max(first) });
        }
        span *= 4;
    }
}

fn is_error(text: &str) -> bool {
    let lower = ansi::plain(text).to_lowercase();
    lower.contains("error") || lower.contains("fail") || lower.contains("panicked")
}

/// The time of the last mark at or before `offset`.
fn stamp(marks: &[(u64, Timestamp)], offset: u64) -> Option<Timestamp> {
    marks.partition_point(|(o, _)| *o <= offset).checked_sub(1).map(|i| marks[i].1)
}

/// The lines as markup: numbered from `first_number`, or, while the count is pending, known by
/// their offsets (`#O123`) until the script numbers them.
fn lines_markup(lines: &[(u64, String)], first_number: Option<u64>, marks: &[(u64, Timestamp)]) -> Markup {
    html! {
        @for (i, (offset, text)) in lines.iter().enumerate() {
            @if let Some(first) = first_number {
                @let n = first + i as u64;
                div.l id=(format!("L{n}")) data-o=(offset) {
                    a.n href=(format!("#L{n}")) aria-label=(format!("line {n}")) { (n) }
                    span.ts { (stamp(marks, *offset).map(|t| t.rfc3339()).unwrap_or_default()) }
                    span.c { (ansi::line(text)) }
                }
            } @else {
                div.l id=(format!("O{offset}")) data-o=(offset) {
                    span.n {}
                    span.ts { (stamp(marks, *offset).map(|t| t.rfc3339()).unwrap_or_default()) }
                    span.c { (ansi::line(text)) }
                }
            }
        }
    }
}

/// `GET /builds/{build}/steps/{step}`: the page, ending at `?before=` or at the log's end.
pub async fn log_page(
    State(state): State<Arc<AppState>>,
    user: WebUser,
    PathParams((id, step)): PathParams<(String, String)>,
    uri: Uri,
) -> Response {
    match render(&state, &user, &id, &step, &uri).await {
        Ok(r) => r,
        Err(e) => layout::error_page(&e, Some(&user)),
    }
}

async fn render(state: &AppState, user: &WebUser, id: &str, step: &str, uri: &Uri) -> Result<Response, ApiError> {
    let q = crate::http::query(uri);
    let key = log_key(state, &q, id, step).await?;
    let head = state.store.read_log(&key, u64::MAX, 0).await.map_err(ApiError::unavailable)?;
    let length = head.next_offset;
    let complete = head.complete;
    let before = offset_param(&q, "before")?.map(|b| b.min(length));
    let w = window(state, &key, before.unwrap_or(length), complete && before.is_none()).await?;
    // Counting the lines before a window deep in a long log means reading all of it (1.4 s for
    // 64 MiB in a debug build), so the page does not wait for it: the lines come unnumbered,
    // and the script asks for the count and numbers them. Without the script, `?numbered=1`
    // counts first. Counts are cached, so the next view is numbered at once.
    let force = q.get("numbered").is_some_and(|v| v == "1");
    let first_number = match cached_count(&key, w.start) {
        Some(n) => Some(n + 1),
        None if force || w.start <= READ_MAX as u64 => Some(count_lines(state, &key, w.start).await? + 1),
        None => None,
    };
    let marks = state.store.log_times(&key, w.start.saturating_sub(1 << 20), 100_000).await.unwrap_or_default();
    let first_error = w.lines.iter().find(|(_, t)| is_error(t)).map(|(o, _)| *o);
    let anchor = |offset: u64| match first_number {
        Some(first) => {
            let i = w.lines.iter().position(|(o, _)| *o == offset).unwrap_or(0) as u64;
            (format!("#L{}", first + i), format!(" (line {})", first + i))
        }
        None => (format!("#O{offset}"), String::new()),
    };
    let stamps = q.get("timestamps").is_some_and(|v| v == "1" || v == "true");
    let base = format!("/builds/{}/steps/{}", encode(id), encode(step));
    let attempt = format!("attempt={}", key.attempt);
    let live = !complete && before.is_none();
    let body = html! {
        nav.crumbs aria-label="Breadcrumb" { a href=(format!("/builds/{}", encode(id))) { "Build " (id) } " / " (step) " / attempt " (key.attempt) }
        h1 { "Log of " (step) }
        div.toolbar {
            a href=(format!("{base}/raw?{attempt}")) download { "Raw log" }
            @if stamps {
                a #ts-toggle href=(format!("{base}?{attempt}")) role="button" aria-pressed="true" { "Hide timestamps" }
            } @else {
                a #ts-toggle href=(format!("{base}?{attempt}&timestamps=1")) role="button" aria-pressed="false" { "Show timestamps" }
            }
            @if let Some(o) = first_error {
                @let (href, which) = anchor(o);
                a #first-error href=(href) { "Jump to first error" (which) }
            } @else {
                a #first-error hidden href="#" { "Jump to first error" }
            }
            span #log-state.muted role="status" { @if live { "Following…" } @else if complete { "Finished." } @else { "" } }
        }
        @if w.start > 0 {
            p.earlier {
                a #earlier href=(format!("{base}?{attempt}&before={}", w.start)) data-before=(w.start) data-line=[first_number] {
                    "Show earlier lines"
                    @if let Some(first) = first_number { " (" (first - 1) " more)" }
                }
            }
        }
        div #log class=(if stamps { "log show-ts" } else { "log" })
            data-stream=(format!("{base}/stream?{attempt}"))
            data-lines=(format!("{base}/lines?{attempt}"))
            data-end=(w.end)
            data-next-line=[first_number.map(|f| f + w.lines.len() as u64)]
            data-count=[first_number.is_none().then(|| format!("{base}/count?{attempt}&before={}", w.start))]
            data-live=(if live { "true" } else { "false" }) {
            (lines_markup(&w.lines, first_number, &marks))
        }
        @if before.is_some() { p { a href=(format!("{base}?{attempt}")) { "Go to the end of the log" } } }
    };
    let page = Page::new(format!("{step} · build {id}"));
    Ok(layout::html(StatusCode::OK, layout::page(&page, Some(user), body)))
}

/// `GET /builds/{build}/steps/{step}/lines?before=OFFSET&line=N`: the lines before an offset,
/// as the page's markup, for the page's script to put above what it shows; `line` is the
/// number of the line at `before`. The start of the window and its first line's number are in
/// `X-Cib-Start` and `X-Cib-First-Line`.
pub async fn log_lines(
    State(state): State<Arc<AppState>>,
    PathParams((id, step)): PathParams<(String, String)>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let q = crate::http::query(&uri);
    let key = log_key(&state, &q, &id, &step).await?;
    let before = offset_param(&q, "before")?.ok_or_else(|| ApiError::BadRequest("'before' is required".into()))?;
    let line = offset_param(&q, "line")?.ok_or_else(|| ApiError::BadRequest("'line' is required".into()))?;
    let w = window(&state, &key, before, false).await?;
    let first = line.saturating_sub(w.lines.len() as u64).max(1);
    let marks = state.store.log_times(&key, w.start.saturating_sub(1 << 20), 100_000).await.unwrap_or_default();
    let mut response = (StatusCode::OK, lines_markup(&w.lines, Some(first), &marks).into_string()).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&w.start.to_string()) {
        h.insert("x-cib-start", v);
    }
    if let Ok(v) = HeaderValue::from_str(&first.to_string()) {
        h.insert("x-cib-first-line", v);
    }
    Ok(response)
}

/// `GET /builds/{build}/steps/{step}/count?before=OFFSET`: how many lines end before the
/// offset, as text, for the page's script to number a window of a long log.
pub async fn count(
    State(state): State<Arc<AppState>>,
    PathParams((id, step)): PathParams<(String, String)>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let q = crate::http::query(&uri);
    let key = log_key(&state, &q, &id, &step).await?;
    let before = offset_param(&q, "before")?.ok_or_else(|| ApiError::BadRequest("'before' is required".into()))?;
    let n = count_lines(&state, &key, before).await?;
    let mut response = (StatusCode::OK, n.to_string()).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// `GET /builds/{build}/steps/{step}/raw`: the whole log as a file, streamed in the store's
/// largest reads.
pub async fn raw(
    State(state): State<Arc<AppState>>,
    PathParams((id, step)): PathParams<(String, String)>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let q = crate::http::query(&uri);
    let key = log_key(&state, &q, &id, &step).await?;
    let name: String = format!("{id}-{step}-{}.log", key.attempt)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' })
        .collect();
    let stream = futures_util::stream::unfold((state, key, 0u64, false), |(state, key, at, done)| async move {
        if done {
            return None;
        }
        match state.store.read_log(&key, at, READ_MAX).await {
            Ok(read) if read.next_offset > at => {
                let next = read.next_offset;
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(read.data)), (state, key, next, false)))
            }
            Ok(_) => None,
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), (state, key, at, true))),
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    Ok(response)
}
