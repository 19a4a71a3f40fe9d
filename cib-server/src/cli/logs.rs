//! `cib logs ID STEP [-f] [--attempt K] [--timestamps]`: a step's log, read once or followed.
//!
//! Following reads the server-sent event stream of the log; every `log` event carries the byte
//! offset after it as its id, so a dropped connection (a proxy's timeout, a server restart) is
//! picked up again with `Last-Event-ID`, with nothing lost and nothing printed twice. With
//! `--timestamps` it follows the text route instead, which stamps lines, from the byte offset it
//! reached. The attempt is fixed when following starts, so a retry of the step never splices a
//! second attempt's bytes into the first one's.

use std::io::Write;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;

use super::client::{Failure, Http, Remote, encode, err, http_client};

/// How long following keeps trying to reach a server that went away before giving up (exit 3),
/// unless `CIB_FOLLOW_RETRY_FOR` (seconds) says otherwise.
const GIVE_UP_AFTER: Duration = Duration::from_secs(120);

fn give_up_after() -> Duration {
    std::env::var("CIB_FOLLOW_RETRY_FOR")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(GIVE_UP_AFTER, Duration::from_secs)
}

#[derive(Debug)]
pub struct LogsArgs {
    pub build: String,
    pub step: String,
    pub follow: bool,
    pub attempt: Option<u32>,
    pub timestamps: bool,
}

fn write_out(bytes: &[u8]) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`cib logs -f | head`) ends the command quietly.
    if stdout.write_all(bytes).and_then(|()| stdout.flush()).is_err() {
        std::process::exit(0);
    }
    Ok(())
}

struct Follower {
    remote: Remote,
    http: Http,
    args: LogsArgs,
}

/// What one request found.
enum Got {
    Answer(http::response::Parts, hyper::body::Incoming),
    /// The server could not be reached, or answered 5xx: worth trying again.
    Transient(String),
}

impl Follower {
    /// Following waits out a server that went away; reading once does not.
    fn trouble(&self) -> Trouble {
        Trouble {
            since: None,
            pause: Duration::ZERO,
            limit: if self.args.follow { give_up_after() } else { Duration::ZERO },
        }
    }

    fn base(&self) -> String {
        format!("/api/v1/builds/{}/steps/{}/log", encode(&self.args.build), encode(&self.args.step))
    }

    async fn send(&self, path: &str, headers: &[(&str, String)]) -> Result<Got, Failure> {
        let request = self.remote.request("GET", path, None, headers)?;
        match tokio::time::timeout(Duration::from_secs(30), self.http.request(request)).await {
            Err(_) => Ok(Got::Transient("no answer within 30 s".into())),
            Ok(Err(e)) => Ok(Got::Transient(super::client::chain(&e))),
            Ok(Ok(response)) => {
                let (parts, body) = response.into_parts();
                if parts.status.is_success() {
                    return Ok(Got::Answer(parts, body));
                }
                let status = parts.status.as_u16();
                let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                if status >= 500 {
                    return Ok(Got::Transient(format!("the server answered {status}")));
                }
                Err(self.remote.answer_failure(status, &value))
            }
        }
    }

    /// The build's record, or why the server cannot be reached now.
    async fn record(&self) -> Result<Result<serde_json::Value, String>, Failure> {
        match self.send(&format!("/api/v1/builds/{}", encode(&self.args.build)), &[]).await? {
            Got::Answer(_, body) => match body.collect().await {
                Ok(b) => {
                    Ok(serde_json::from_slice(&b.to_bytes()).map_err(|e| format!("an answer that is not JSON: {e}")))
                }
                Err(e) => Ok(Err(super::client::chain(&e))),
            },
            Got::Transient(why) => Ok(Err(why)),
        }
    }

    /// The attempt to read: the one asked for, else the step's latest, waiting for the step to
    /// start when following.
    async fn attempt(&self) -> Result<u32, Failure> {
        if let Some(a) = self.args.attempt {
            return Ok(a);
        }
        let mut told = false;
        let mut trouble = self.trouble();
        loop {
            let v = match self.record().await? {
                Ok(v) => v,
                Err(why) => {
                    trouble.wait(&format!("cannot reach {}: {why}", self.remote.server)).await?;
                    continue;
                }
            };
            trouble = self.trouble();
            let latest = v["steps"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| s["name"].as_str() == Some(self.args.step.as_str()))
                .filter_map(|s| s["attempt"].as_u64())
                .max();
            if let Some(a) = latest {
                return Ok(a as u32);
            }
            let finished = v["build"]["finished_at"].as_u64().is_some();
            if finished || !self.args.follow {
                let why = if finished { "did not run" } else { "has not started (follow it with -f)" };
                return Err(Failure::Refused(vec![format!(
                    "cib: step '{}' of build '{}' {why}",
                    self.args.step, self.args.build
                )]));
            }
            if !told {
                err(&format!("cib: waiting for step '{}' to start", self.args.step));
                told = true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Reads the text route from `offset` until the log is complete (`follow`) or until its
    /// current end.
    async fn read_text(&self, attempt: u32) -> Result<(), Failure> {
        let mut offset = 0u64;
        let mut at_line_start = true;
        let mut trouble = self.trouble();
        loop {
            let mut path = format!("{}?attempt={attempt}&offset={offset}", self.base());
            if self.args.timestamps {
                path.push_str("&timestamps=true");
            }
            let (parts, body) = match self.send(&path, &[]).await? {
                Got::Answer(parts, body) => (parts, body),
                Got::Transient(why) => {
                    trouble.wait(&format!("cannot reach {}: {why}", self.remote.server)).await?;
                    continue;
                }
            };
            let data = match body.collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    trouble.wait(&e.to_string()).await?;
                    continue;
                }
            };
            trouble = self.trouble();
            let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let next = header("x-cib-next-offset").and_then(|v| v.parse::<u64>().ok()).unwrap_or(offset);
            let complete = header("x-cib-complete").as_deref() == Some("true");
            let mut shown: &[u8] = &data;
            // Each answer stamps the line it starts in, even when that line began in the
            // previous answer: such a stamp is dropped, so each line has its first one.
            if self.args.timestamps
                && !at_line_start
                && shown.first() == Some(&b'[')
                && let Some(end) = shown.windows(2).position(|w| w == b"] ")
            {
                shown = &shown[end + 2..];
            }
            if !shown.is_empty() {
                write_out(shown)?;
            }
            if !data.is_empty() {
                at_line_start = data.ends_with(b"\n");
            }
            let moved = next != offset;
            offset = next;
            if complete && !moved {
                return Ok(());
            }
            if !moved {
                if !self.args.follow {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    /// Follows the event stream to its `end`, reconnecting from the last offset after a drop.
    async fn follow_stream(&self, attempt: u32) -> Result<(), Failure> {
        let mut last: Option<u64> = None;
        let mut reconnecting = false;
        let mut trouble = self.trouble();
        loop {
            // A reconnection names where it resumes, from 0 when nothing came before the cut.
            let headers: Vec<(&str, String)> =
                if reconnecting { vec![("last-event-id", last.unwrap_or(0).to_string())] } else { Vec::new() };
            reconnecting = true;
            let path = format!("{}/stream?attempt={attempt}", self.base());
            let mut body = match self.send(&path, &headers).await? {
                Got::Answer(_, body) => body,
                Got::Transient(why) => {
                    trouble.wait(&format!("cannot reach {}: {why}", self.remote.server)).await?;
                    continue;
                }
            };
            let mut parser = SseParser::default();
            let ended = loop {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        let Ok(data) = frame.into_data() else { continue };
                        for event in parser.feed(&data) {
                            trouble = self.trouble();
                            match event.kind.as_str() {
                                "log" => {
                                    let payload: serde_json::Value =
                                        serde_json::from_str(&event.data).unwrap_or(serde_json::Value::Null);
                                    if let Some(text) = payload["text"].as_str() {
                                        write_out(text.as_bytes())?;
                                    } else if let Some(bytes) = payload["bytes"].as_array() {
                                        let raw: Vec<u8> =
                                            bytes.iter().filter_map(|b| b.as_u64()).map(|b| b as u8).collect();
                                        write_out(&raw)?;
                                    }
                                    if let Some(id) = event.id.as_deref().and_then(|i| i.parse().ok()) {
                                        last = Some(id);
                                    }
                                }
                                "end" => return Ok(()),
                                _ => {}
                            }
                        }
                    }
                    Some(Err(e)) => break e.to_string(),
                    None => break "the stream ended before the step did".to_owned(),
                }
            };
            err(&format!("cib: the log stream was cut ({ended}); resuming at byte {}", last.unwrap_or(0)));
            trouble.wait(&ended).await?;
        }
    }
}

/// Tries again with a growing pause, and gives up once the trouble has lasted `limit`.
#[derive(Debug)]
struct Trouble {
    since: Option<Instant>,
    pause: Duration,
    limit: Duration,
}

impl Trouble {
    async fn wait(&mut self, why: &str) -> Result<(), Failure> {
        if self.limit.is_zero() {
            return Err(Failure::Unreachable(why.to_owned()));
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.limit {
            return Err(Failure::Unreachable(format!(
                "gave up following the log after {}s: {why}",
                self.limit.as_secs()
            )));
        }
        self.pause = (self.pause * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
        tokio::time::sleep(self.pause).await;
        Ok(())
    }
}

/// One server-sent event.
#[derive(Debug, Default, PartialEq)]
struct SseEvent {
    id: Option<String>,
    kind: String,
    data: String,
}

/// Server-sent events from a byte stream cut anywhere: lines end with `\n` (or `\r\n`), an
/// empty line dispatches, `:` starts a comment.
#[derive(Debug, Default)]
struct SseParser {
    buffer: Vec<u8>,
    current: SseEvent,
    has_data: bool,
}

impl SseParser {
    fn feed(&mut self, bytes: &Bytes) -> Vec<SseEvent> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = self.buffer.drain(..=end).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            if line.is_empty() {
                if self.has_data || !self.current.kind.is_empty() {
                    let mut event = std::mem::take(&mut self.current);
                    if event.kind.is_empty() {
                        event.kind = "message".into();
                    }
                    events.push(event);
                }
                self.has_data = false;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((&line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => self.current.id = Some(value.to_owned()),
                "event" => self.current.kind = value.to_owned(),
                "data" => {
                    if self.has_data {
                        self.current.data.push('\n');
                    }
                    self.current.data.push_str(value);
                    self.has_data = true;
                }
                _ => {}
            }
        }
        events
    }
}

/// `cib logs`.
pub async fn logs(remote: &Remote, args: LogsArgs) -> Result<(), Failure> {
    let follower = Follower { remote: remote.clone(), http: http_client()?, args };
    let attempt = follower.attempt().await?;
    if follower.args.follow && !follower.args.timestamps {
        follower.follow_stream(attempt).await
    } else {
        follower.read_text(attempt).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_cut_anywhere_are_put_back_together() {
        let text = b": keep-alive\n\nid: 6\nevent: log\ndata: {\"offset\":0,\"text\":\"hello\\n\"}\n\nid: 6\r\nevent: end\r\ndata: {}\r\n\r\n";
        for cut in 0..text.len() {
            let mut parser = SseParser::default();
            let mut events = parser.feed(&Bytes::copy_from_slice(&text[..cut]));
            events.extend(parser.feed(&Bytes::copy_from_slice(&text[cut..])));
            assert_eq!(events.len(), 2, "cut at {cut}: {events:?}");
            assert_eq!(events[0].id.as_deref(), Some("6"));
            assert_eq!(events[0].kind, "log");
            assert_eq!(events[0].data, "{\"offset\":0,\"text\":\"hello\\n\"}");
            assert_eq!(events[1].kind, "end");
        }
    }
}
