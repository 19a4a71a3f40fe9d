//! Server-sent event streams: the typed events, and a step's log as it grows.
//!
//! Both resume with `Last-Event-ID`: for events it is the last sequence number seen, for logs
//! the byte offset reached, so a cut stream picks up with nothing lost and nothing repeated.
//! A reader that falls behind the live channel is served from the store instead, so a slow
//! client costs reads, never lost data. Comments every 15 seconds keep proxies from closing
//! an idle stream.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cib_core::event::Event;
use cib_core::ports::LogKey;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::mpsc;

use crate::http::{Body, query};
use crate::state::AppState;

const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Where a stream resumes: the `Last-Event-ID` header, else the `from` query parameter. Either,
/// when present, must be a whole number.
pub fn resume_point(headers: &http::HeaderMap, uri: &http::Uri) -> Result<Option<u64>, String> {
    let number = |v: &str| {
        if !v.is_empty() && v.len() <= 19 && v.bytes().all(|b| b.is_ascii_digit()) { v.parse().ok() } else { None }
    };
    // Both are checked when both are sent, so that no malformed value passes unseen.
    let from = match query(uri).get("from") {
        Some(v) => Some(number(v).ok_or_else(|| format!("'from' ('{v}') is not a whole number"))?),
        None => None,
    };
    if let Some(v) = headers.get("last-event-id") {
        let text = v.to_str().map_err(|_| "Last-Event-ID is not text".to_owned())?;
        // HTTP allows whitespace around a header's value; a query value is taken as it is.
        return number(text.trim()).map(Some).ok_or_else(|| format!("Last-Event-ID '{text}' is not a whole number"));
    }
    Ok(from)
}

/// A streaming response fed by a channel of ready-made SSE frames.
fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|bytes| (Ok::<_, Infallible>(Frame::data(bytes)), rx))
    });
    let mut response = Response::new(StreamBody::new(stream).boxed());
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn frame(id: u64, event: &str, data: &str) -> Bytes {
    // `data` is one line of JSON, so it needs no splitting.
    Bytes::from(format!("id: {id}\nevent: {event}\ndata: {data}\n\n"))
}

/// `GET /api/v1/events`: every event after `Last-Event-ID`, then live ones.
pub fn event_stream(state: Arc<AppState>, last_event: Option<u64>) -> Response<Body> {
    let stopping = state.stopping.clone();
    let mut last = last_event.unwrap_or(0);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let mut live = state.engine.subscribe();
        let send = |event: &Event| frame(event.seq, "event", &serde_json::to_string(event).unwrap_or_default());
        loop {
            // Catch up from the store: it has every event, in order.
            let stored = match state.store.events_after(last, 500).await {
                Ok(events) => events,
                Err(_) => return,
            };
            if !stored.is_empty() {
                for event in &stored {
                    if tx.send(send(event)).await.is_err() {
                        return;
                    }
                    last = event.seq;
                }
                continue;
            }
            // Caught up: follow the live channel until it is behind us or ends.
            loop {
                tokio::select! {
                    received = live.recv() => match received {
                        Ok(event) if event.seq <= last => {}
                        Ok(event) if event.seq == last + 1 => {
                            if tx.send(send(&event)).await.is_err() {
                                return;
                            }
                            last = event.seq;
                        }
                        // A gap or a lag: the store fills it.
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    () = tokio::time::sleep(KEEP_ALIVE) => {
                        if tx.send(Bytes::from_static(b": keep-alive\n\n")).await.is_err() {
                            return;
                        }
                    }
                    () = stopping.notified() => return,
                }
            }
        }
    });
    stream_response(rx)
}

/// The longest prefix of `data` that is whole UTF-8, unless the log is complete and this is
/// its end (then invalid bytes are sent as they are, as numbers).
fn split_text(data: &[u8]) -> usize {
    match std::str::from_utf8(data) {
        Ok(_) => data.len(),
        Err(e) => e.valid_up_to(),
    }
}

/// `GET .../steps/{step}/log/stream`: the log from `Last-Event-ID` (a byte offset), growing
/// until the step ends.
pub fn log_stream(state: Arc<AppState>, key: LogKey, from: Option<u64>) -> Response<Body> {
    let stopping = state.stopping.clone();
    let mut offset = from.unwrap_or(0);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let mut idle = Duration::ZERO;
        loop {
            let read = match state.store.read_log(&key, offset, 64 * 1024).await {
                Ok(r) => r,
                Err(_) => return,
            };
            if !read.data.is_empty() {
                idle = Duration::ZERO;
                let valid = split_text(&read.data);
                let (payload, taken) = if valid > 0 {
                    let text = String::from_utf8_lossy(&read.data[..valid]).into_owned();
                    (serde_json::json!({ "offset": offset, "text": text }), valid)
                } else if read.data.len() >= 4 || read.complete {
                    // Bytes that are not text, and cannot become text with more bytes: send
                    // them as numbers rather than alter them.
                    let n = read.data.iter().position(|b| b.is_ascii()).unwrap_or(read.data.len()).max(1);
                    (serde_json::json!({ "offset": offset, "bytes": read.data[..n].to_vec() }), n)
                } else {
                    // The start of a character whose rest is not stored yet: wait for it.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let next = if taken == read.data.len() {
                    read.next_offset
                } else if read.next_offset - offset == read.data.len() as u64 {
                    offset + taken as u64
                } else {
                    // The read holds an omitted marker, so its bytes do not map one to one
                    // onto the log's offsets: read the part taken again (a read never cuts a
                    // marker, and the cut is never inside one, which is ASCII) to learn where
                    // it ends in the log.
                    match state.store.read_log(&key, offset, taken).await {
                        Ok(again) => again.next_offset,
                        Err(_) => return,
                    }
                };
                if tx.send(frame(next, "log", &payload.to_string())).await.is_err() {
                    return;
                }
                offset = next;
                continue;
            }
            if read.complete {
                let _ = tx.send(frame(offset, "end", "{}")).await;
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    idle += Duration::from_millis(200);
                    if idle >= KEEP_ALIVE {
                        idle = Duration::ZERO;
                        if tx.send(Bytes::from_static(b": keep-alive\n\n")).await.is_err() {
                            return;
                        }
                    }
                }
                () = stopping.notified() => return,
            }
        }
    });
    stream_response(rx)
}
