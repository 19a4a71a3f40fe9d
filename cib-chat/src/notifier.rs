//! [`Notifier`] on Slack and Zulip: one message per build in the repository's channel and
//! stream, posted when the build is queued and edited in place as it runs (Slack
//! `chat.update`, Zulip `PATCH /api/v1/messages/{id}`); a thread reply with a failed step's
//! last log lines; messages of their own for gates waiting for people, lease deadlines and
//! promotions.
//!
//! `publish` never talks to a chat service. It works out the message the event implies, writes
//! it to the outbox (one small JSON file per message, replaced atomically) and wakes the
//! delivery task, so a slow or rate-limited chat never holds up the engine, and a burst of step
//! events coalesces into one edit.
//!
//! The outbox is what makes a restart safe. A message's file holds the text wanted, the
//! version of it each service has, the message id each service gave (Slack's `ts`, Zulip's
//! `id`) and how many thread replies each has received. The id is written before anything
//! else is sent, so after a restart the next change edits the message it names instead of
//! posting another, and replies already sent are not sent again. Files of delivered messages
//! stay (a few hundred bytes each) so that an event replayed after a crash finds its message
//! already there and changes nothing; they are removed after seven days. What cannot be
//! avoided, as with GitHub's check runs: a crash between the service's answer to a new message
//! and its id reaching the disk posts that message again.
//!
//! Delivery is one request at a time. A failure waits a doubling backoff, and at least as long
//! as a `Retry-After` header says; a refused credential or channel retries slowly (a person must
//! fix it), and a refusal of the message itself is logged and dropped.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use cib_core::event::{BuildId, Conclusion, Event, EventBody, StepConclusion};
use cib_core::policy::Identity;
use cib_core::ports::{ErrorKind, LogKey, Notifier, NotifyError, Store};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::api::{ApiError, HttpClient, Slack, Zulip};
use crate::notice::{self, BuildView, Button, Chat, Pusher};

/// A Slack workspace cib posts to as a bot.
#[derive(Clone)]
pub struct SlackAccount {
    /// `https://slack.com/api` unless a test points it elsewhere.
    pub api_url: String,
    pub bot_token: String,
}

impl std::fmt::Debug for SlackAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlackAccount").field("api_url", &self.api_url).field("bot_token", &"<redacted>").finish()
    }
}

/// A Zulip organisation cib posts to as a bot.
#[derive(Clone)]
pub struct ZulipAccount {
    pub site: String,
    pub bot_email: String,
    pub api_key: String,
}

impl std::fmt::Debug for ZulipAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZulipAccount")
            .field("site", &self.site)
            .field("bot_email", &self.bot_email)
            .field("api_key", &"<redacted>")
            .finish()
    }
}

/// Where a repository's messages go.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatTarget {
    /// A Slack channel id (`C0123…`) or name.
    pub channel: Option<String>,
    pub stream: Option<String>,
    pub topic: Option<String>,
}

/// The notifier's configuration.
#[derive(Debug, Clone)]
pub struct ChatConfig {
    pub slack: Option<SlackAccount>,
    pub zulip: Option<ZulipAccount>,
    /// Per repository.
    pub repos: HashMap<String, ChatTarget>,
    /// Where messages not about one repository go (leases); none when unset.
    pub default_target: Option<ChatTarget>,
    /// `<public_url>/builds/<id>` is linked from each message.
    pub public_url: Option<String>,
    /// How many of a failed step's last log lines its reply shows.
    pub log_lines: usize,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// How long the delivery task waits after being woken, so that a burst coalesces.
    pub coalesce: Duration,
    /// Who is who (`[[people]]`), so that a build's message mentions the person who pushed.
    pub people: cib_core::policy::People,
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            slack: None,
            zulip: None,
            repos: HashMap::new(),
            default_target: None,
            public_url: None,
            log_lines: 30,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            coalesce: Duration::from_millis(100),
            people: cib_core::policy::People::default(),
        }
    }
}

/// What one service has of a message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    /// Slack's `ts` or Zulip's message id, once posted; empty when the service refused the
    /// message for good, so that nothing more is sent for it.
    pub id: Option<String>,
    /// The version of the text it shows.
    pub version: u64,
    /// How many of the thread replies it has.
    pub replies: usize,
}

/// One message as the outbox keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub key: String,
    pub target: ChatTarget,
    /// The text, as Slack gets it.
    pub text: String,
    /// The text as Zulip gets it, when it differs (a mention); `text` when none.
    #[serde(default)]
    pub zulip_text: Option<String>,
    pub buttons: Vec<Button>,
    /// Bumped by each change of `text` or `buttons`.
    pub version: u64,
    pub replies: Vec<String>,
    /// What each reply is about (a step), so that a replayed event adds none twice.
    pub reply_keys: Vec<String>,
    pub slack: Delivered,
    pub zulip: Delivered,
    /// The build's view, for its message; none for messages of their own.
    pub view: Option<BuildView>,
}

impl Message {
    fn wants_slack(&self, config: &ChatConfig) -> bool {
        config.slack.is_some() && self.target.channel.is_some()
    }

    fn wants_zulip(&self, config: &ChatConfig) -> bool {
        config.zulip.is_some() && self.target.stream.is_some()
    }

    fn slack_due(&self, config: &ChatConfig) -> bool {
        self.wants_slack(config)
            && self.slack.id.as_deref() != Some("")
            && (self.slack.version < self.version || self.slack.replies < self.replies.len())
    }

    fn zulip_due(&self, config: &ChatConfig) -> bool {
        self.wants_zulip(config)
            && self.zulip.id.as_deref() != Some("")
            && (self.zulip.version < self.version || self.zulip.replies < self.replies.len())
    }

    fn due(&self, config: &ChatConfig) -> bool {
        self.slack_due(config) || self.zulip_due(config)
    }
}

#[derive(Debug, Default)]
struct State {
    messages: BTreeMap<String, Message>,
    not_before: HashMap<String, Instant>,
    attempts: HashMap<String, u32>,
}

struct StoreRef(Arc<dyn Store>);

impl std::fmt::Debug for StoreRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreRef(..)")
    }
}

#[derive(Debug)]
struct Inner {
    config: ChatConfig,
    slack: Option<Slack>,
    zulip: Option<Zulip>,
    dir: PathBuf,
    state: Mutex<State>,
    wake: Notify,
    waiting: watch::Sender<usize>,
    store: OnceLock<StoreRef>,
}

/// The chat notifier. Dropping it stops delivery; what was not delivered stays in the outbox
/// for the next one.
#[derive(Debug)]
pub struct ChatNotifier {
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ChatNotifier {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn io_error(what: &str, e: std::io::Error) -> NotifyError {
    NotifyError::Transient(format!("the chat notifier's outbox: {what}: {e}"))
}

/// Writes `value` to `path` so that a crash leaves the old file or the new one, never half.
fn write_atomic(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    {
        let mut file = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut file, &bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// How long delivered messages are kept against replays.
const KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

impl ChatNotifier {
    /// A notifier keeping its outbox in `dir` (created if missing). Messages left there by an
    /// earlier process are delivered. Must be called within a Tokio runtime.
    pub fn new(config: ChatConfig, dir: &Path) -> Result<ChatNotifier, NotifyError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error("create", e))?;
        let http = HttpClient::default();
        let slack = config.slack.as_ref().map(|a| Slack {
            http: http.clone(),
            api_url: a.api_url.clone(),
            token: a.bot_token.clone(),
        });
        let zulip = config.zulip.as_ref().map(|a| Zulip {
            http: http.clone(),
            site: a.site.clone(),
            email: a.bot_email.clone(),
            api_key: a.api_key.clone(),
        });
        let mut state = State::default();
        for entry in std::fs::read_dir(dir).map_err(|e| io_error("read", e))? {
            let path = entry.map_err(|e| io_error("read", e))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let old = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > KEEP);
            match std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Message>(&b).ok()) {
                Some(m) if old && !m.due(&config) => {
                    let _ = std::fs::remove_file(&path);
                }
                Some(m) => {
                    state.messages.insert(m.key.clone(), m);
                }
                None => tracing::warn!(path = %path.display(), "an unreadable chat outbox file was skipped"),
            }
        }
        let due = state.messages.values().filter(|m| m.due(&config)).count();
        let (waiting, _) = watch::channel(due);
        let inner = Arc::new(Inner {
            config,
            slack,
            zulip,
            dir: dir.to_owned(),
            state: Mutex::new(state),
            wake: Notify::new(),
            waiting,
            store: OnceLock::new(),
        });
        let task = tokio::spawn(deliver(inner.clone()));
        inner.wake.notify_one();
        Ok(ChatNotifier { inner, task })
    }

    /// Reads failed steps' logs from `store` for the failure replies.
    pub fn with_store(self, store: Arc<dyn Store>) -> Self {
        let _ = self.inner.store.set(StoreRef(store));
        self
    }

    /// Waits until nothing is left to deliver, at most `timeout`; `true` when so.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let mut rx = self.inner.waiting.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0)).await.is_ok_and(|r| r.is_ok())
    }

    /// The messages the outbox knows, delivered or not.
    pub fn messages(&self) -> Vec<Message> {
        lock(&self.inner.state).messages.values().cloned().collect()
    }
}

impl Inner {
    fn path(&self, key: &str) -> PathBuf {
        let digest = Sha256::digest(key.as_bytes());
        self.dir.join(format!("{}.json", hex::encode(&digest[..16])))
    }

    fn link(&self, build: &str) -> Option<String> {
        self.config.public_url.as_ref().map(|base| format!("{}/builds/{build}", base.trim_end_matches('/')))
    }

    fn target(&self, repo: &str) -> Option<ChatTarget> {
        self.config.repos.get(repo).cloned()
    }

    /// Stores `message` and wakes the delivery task.
    fn save(&self, state: &mut State, message: Message) -> Result<(), NotifyError> {
        if state.messages.get(&message.key) == Some(&message) {
            return Ok(());
        }
        write_atomic(&self.path(&message.key), &message).map_err(|e| io_error("write", e))?;
        state.messages.insert(message.key.clone(), message);
        let due = state.messages.values().filter(|m| m.due(&self.config)).count();
        self.waiting.send_replace(due);
        self.wake.notify_one();
        Ok(())
    }

    /// A message of its own (a gate, a lease, a promotion), posted once under `key`.
    fn post_once(
        &self,
        state: &mut State,
        key: String,
        target: ChatTarget,
        text: String,
        buttons: Vec<Button>,
    ) -> Result<(), NotifyError> {
        if state.messages.contains_key(&key) {
            return Ok(());
        }
        let message = Message {
            key,
            target,
            text,
            zulip_text: None,
            buttons,
            version: 1,
            replies: Vec::new(),
            reply_keys: Vec::new(),
            slack: Delivered::default(),
            zulip: Delivered::default(),
            view: None,
        };
        self.save(state, message)
    }

    /// The person who started `build` (its context's actor: a person's name, a GitHub login or
    /// a token's name), with their chat ids from the people directory.
    async fn pusher(&self, build: &BuildId) -> Option<Pusher> {
        let store = self.store.get()?;
        let stored = match store.0.enqueued(build).await {
            Ok(stored) => stored?,
            Err(error) => {
                tracing::warn!(%error, build = %build.0, "who started the build cannot be read; it is not mentioned");
                return None;
            }
        };
        let cib_core::pipeline::Input::Enqueue { context, .. } = stored.input else { return None };
        let actor = context.actor?;
        let people = &self.config.people;
        let person = people
            .iter()
            .find(|p| p.name == actor)
            .or_else(|| people.find(&Identity::Github(actor.clone())))
            .or_else(|| people.find(&Identity::Token(actor.clone())));
        Some(match person {
            Some(p) => Pusher { name: p.name.clone(), slack: p.slack.clone(), zulip: p.zulip.clone() },
            None => Pusher { name: actor, slack: None, zulip: None },
        })
    }

    async fn log_tail(&self, build: &BuildId, step: &str, attempt: u32) -> String {
        let Some(store) = self.store.get() else { return "(no log available)".into() };
        let key = LogKey { build: build.clone(), step: step.to_owned(), attempt };
        let Ok(end) = store.0.read_log(&key, u64::MAX, 1).await.map(|r| r.next_offset) else {
            return "(no log available)".into();
        };
        let Ok(read) = store.0.read_log(&key, end.saturating_sub(16384), 16384).await else {
            return "(no log available)".into();
        };
        let text = String::from_utf8_lossy(&read.data);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(self.config.log_lines)..].join("\n")
    }
}

fn build_key(build: &BuildId) -> String {
    format!("build:{}", build.0)
}

#[async_trait]
impl Notifier for ChatNotifier {
    fn name(&self) -> &str {
        "chat"
    }

    fn outbox_depth(&self) -> Option<usize> {
        let state = lock(&self.inner.state);
        Some(state.messages.values().filter(|m| m.due(&self.inner.config)).count())
    }

    async fn publish(&self, event: &Event) -> Result<(), NotifyError> {
        let inner = &self.inner;
        // Messages of their own, not about one build's progress.
        match &event.body {
            EventBody::LeaseWarning { lease, holder, deadline } => {
                let Some(target) = inner.config.default_target.clone() else { return Ok(()) };
                let text = format!(
                    "⏰ The lease `{lease}` of {holder} ends at {deadline}. Extend it or give it back: `lease return {lease}`."
                );
                let mut state = lock(&inner.state);
                return inner.post_once(
                    &mut state,
                    format!("lease-warning:{lease}:{}", deadline.millis()),
                    target,
                    text,
                    Vec::new(),
                );
            }
            EventBody::BranchMoved { repo, branch, commit, by, promotion: true } => {
                let Some(target) = inner.target(repo) else { return Ok(()) };
                let text = format!("🚀 *{repo}*: {by} promoted `{}` to {branch}.", commit.get(..8).unwrap_or(commit));
                let mut state = lock(&inner.state);
                return inner.post_once(
                    &mut state,
                    format!("promoted:{repo}:{branch}:{commit}"),
                    target,
                    text,
                    Vec::new(),
                );
            }
            _ => {}
        }
        let Some(build) = event.body.build().cloned() else { return Ok(()) };
        let key = build_key(&build);
        // A failed step's log tail is read before the state is locked, since the store is async.
        let mut failure = None;
        if let EventBody::StepFinished { step, attempt, conclusion, detail, will_retry: false, .. } = &event.body
            && !matches!(conclusion, StepConclusion::Success | StepConclusion::Skipped)
        {
            let known = lock(&inner.state).messages.get(&key).is_some_and(|m| !m.reply_keys.contains(step));
            if known {
                let tail = inner.log_tail(&build, step, *attempt).await;
                failure =
                    Some((step.clone(), notice::failure_text(step, detail, &tail, inner.link(&build.0).as_deref())));
            }
        }
        // Who started a new build is in the input that enqueued it, stored before its events.
        let mut pusher = None;
        if matches!(event.body, EventBody::BuildQueued { .. }) && !lock(&inner.state).messages.contains_key(&key) {
            pusher = inner.pusher(&build).await;
        }
        let mut state = lock(&inner.state);
        let mut message = match (&event.body, state.messages.get(&key)) {
            (_, Some(m)) => m.clone(),
            (EventBody::BuildQueued { repo, pipeline, commit, branch, .. }, None) => {
                let Some(target) = inner.target(repo) else { return Ok(()) };
                Message {
                    key: key.clone(),
                    target,
                    text: String::new(),
                    zulip_text: None,
                    buttons: Vec::new(),
                    version: 0,
                    replies: Vec::new(),
                    reply_keys: Vec::new(),
                    slack: Delivered::default(),
                    zulip: Delivered::default(),
                    view: Some(BuildView {
                        build: build.0.clone(),
                        repo: repo.clone(),
                        pipeline: pipeline.clone(),
                        commit: commit.clone(),
                        branch: branch.clone(),
                        pusher: pusher.clone(),
                        ..BuildView::default()
                    }),
                }
            }
            // A build queued before this notifier existed, or in a repository without chat.
            (_, None) => return Ok(()),
        };
        let Some(mut view) = message.view.clone() else { return Ok(()) };
        let mut buttons = message.buttons.clone();
        match &event.body {
            EventBody::StepStarted { step, .. } => view.running = Some(step.clone()),
            EventBody::StepFinished { step, conclusion, will_retry: false, .. } => {
                view.steps.insert(step.clone(), *conclusion);
                if view.running.as_deref() == Some(step) {
                    view.running = None;
                }
            }
            EventBody::StepSkipped { step, .. } => {
                view.steps.insert(step.clone(), StepConclusion::Skipped);
            }
            EventBody::GateWaiting { step, instructions, .. } => {
                view.waiting = Some(step.clone());
                let (text, gate_buttons) =
                    notice::gate_text(&view, step, instructions.as_deref(), inner.link(&build.0).as_deref());
                inner.post_once(
                    &mut state,
                    format!("gate:{}:{step}", build.0),
                    message.target.clone(),
                    text,
                    gate_buttons,
                )?;
            }
            // A decided gate is no longer waited for (only the one the notice shows).
            EventBody::Approved { step, count, needed, .. }
                if count >= needed && view.waiting.as_deref() == Some(step) =>
            {
                view.waiting = None;
            }
            EventBody::Rejected { step, .. } | EventBody::GateExpired { step, .. }
                if view.waiting.as_deref() == Some(step) =>
            {
                view.waiting = None;
            }
            EventBody::BuildFinished { conclusion, .. } => {
                view.conclusion = Some(*conclusion);
                view.running = None;
                view.waiting = None;
                if *conclusion == Conclusion::Success {
                    buttons = vec![notice::promote_button(&view)];
                }
            }
            _ => {}
        }
        if let Some((step, text)) = failure
            && !message.reply_keys.contains(&step)
        {
            message.reply_keys.push(step);
            message.replies.push(text);
        }
        let link = inner.link(&build.0);
        let text = notice::build_text(&view, link.as_deref(), Chat::Slack);
        let zulip_text = Some(notice::build_text(&view, link.as_deref(), Chat::Zulip)).filter(|z| *z != text);
        if text != message.text || zulip_text != message.zulip_text || buttons != message.buttons {
            message.text = text;
            message.zulip_text = zulip_text;
            message.buttons = buttons;
            message.version += 1;
        }
        message.view = Some(view);
        inner.save(&mut state, message)
    }
}

/// What to do next for one message on one service.
enum Step {
    Post,
    Edit(String),
    Reply(String, usize),
}

fn next_step(m: &Message, d: &Delivered) -> Option<Step> {
    match &d.id {
        None => Some(Step::Post),
        Some(id) if d.version < m.version => Some(Step::Edit(id.clone())),
        Some(id) if d.replies < m.replies.len() => Some(Step::Reply(id.clone(), d.replies)),
        Some(_) => None,
    }
}

/// One request to Slack for `m`; answers the new delivery state.
async fn slack_step(slack: &Slack, m: &Message, d: &Delivered) -> Result<Option<Delivered>, ApiError> {
    let Some(channel) = m.target.channel.as_deref() else { return Ok(None) };
    let Some(step) = next_step(m, d) else { return Ok(None) };
    let blocks = notice::slack_blocks(&m.text, &m.buttons).to_string();
    let mut next = d.clone();
    match step {
        Step::Post => {
            let answer =
                slack.call("chat.postMessage", &[("channel", channel), ("text", &m.text), ("blocks", &blocks)]).await?;
            next.id = answer.get("ts").and_then(|v| v.as_str()).map(str::to_owned);
            if next.id.is_none() {
                return Err(ApiError {
                    kind: ErrorKind::Transient,
                    message: "Slack's answer has no ts".into(),
                    retry_after: None,
                });
            }
            next.version = m.version;
        }
        Step::Edit(ts) => {
            // `chat.update` answers the channel's id, which is what later calls must use;
            // cib keeps the configured channel, which Slack accepts for both.
            slack
                .call("chat.update", &[("channel", channel), ("ts", &ts), ("text", &m.text), ("blocks", &blocks)])
                .await?;
            next.version = m.version;
        }
        Step::Reply(ts, i) => {
            slack
                .call("chat.postMessage", &[("channel", channel), ("thread_ts", &ts), ("text", &m.replies[i])])
                .await?;
            next.replies = i + 1;
        }
    }
    Ok(Some(next))
}

/// One request to Zulip for `m`. Zulip's threads are topics, so a reply is a message in the
/// same stream and topic.
async fn zulip_step(zulip: &Zulip, m: &Message, d: &Delivered) -> Result<Option<Delivered>, ApiError> {
    let Some(stream) = m.target.stream.as_deref() else { return Ok(None) };
    let topic = m.target.topic.as_deref().unwrap_or("cib");
    let Some(step) = next_step(m, d) else { return Ok(None) };
    let mut next = d.clone();
    match step {
        Step::Post => {
            next.id = Some(zulip.send(stream, topic, m.zulip_text.as_ref().unwrap_or(&m.text)).await?.to_string());
            next.version = m.version;
        }
        Step::Edit(id) => {
            let id: u64 = id.parse().map_err(|_| ApiError {
                kind: ErrorKind::Permanent,
                message: format!("a Zulip message id '{id}' is not a number"),
                retry_after: None,
            })?;
            zulip.edit(id, m.zulip_text.as_ref().unwrap_or(&m.text)).await?;
            next.version = m.version;
        }
        Step::Reply(_, i) => {
            zulip.send(stream, topic, &m.replies[i]).await?;
            next.replies = i + 1;
        }
    }
    Ok(Some(next))
}

/// The delivery task: one request at a time, until dropped.
async fn deliver(inner: Arc<Inner>) {
    loop {
        let (due, later) = {
            let state = lock(&inner.state);
            let now = Instant::now();
            let due = state
                .messages
                .values()
                .find(|m| m.due(&inner.config) && state.not_before.get(&m.key).is_none_or(|t| *t <= now))
                .map(|m| m.key.clone());
            let later = state
                .messages
                .values()
                .filter(|m| m.due(&inner.config))
                .filter_map(|m| state.not_before.get(&m.key).copied())
                .min();
            (due, later)
        };
        let key = match (due, later) {
            (Some(key), _) => key,
            (None, Some(at)) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = inner.wake.notified() => {}
                }
                continue;
            }
            (None, None) => {
                inner.wake.notified().await;
                tokio::time::sleep(inner.config.coalesce).await;
                continue;
            }
        };
        let Some(message) = lock(&inner.state).messages.get(&key).cloned() else { continue };
        let (service, result) = if message.slack_due(&inner.config)
            && let Some(slack) = &inner.slack
        {
            ("slack", slack_step(slack, &message, &message.slack).await)
        } else if let Some(zulip) = &inner.zulip {
            ("zulip", zulip_step(zulip, &message, &message.zulip).await)
        } else {
            continue;
        };
        let mut state = lock(&inner.state);
        match result {
            Ok(next) => {
                state.attempts.remove(&key);
                state.not_before.remove(&key);
                if let (Some(next), Some(current)) = (next, state.messages.get_mut(&key)) {
                    // The id and counts go to disk before the next request, so that a restart
                    // edits this message instead of posting another.
                    match service {
                        "slack" => current.slack = next,
                        _ => current.zulip = next,
                    }
                    let snapshot = current.clone();
                    if let Err(e) = write_atomic(&inner.path(&key), &snapshot) {
                        tracing::warn!(error = %e, "a chat message's delivery state was not stored");
                    }
                }
            }
            Err(e) if e.kind == ErrorKind::Permanent => {
                tracing::error!(error = %e, service, key, "the chat service refused a message; dropped");
                if let Some(current) = state.messages.get_mut(&key) {
                    let skip =
                        Delivered { id: Some(String::new()), version: current.version, replies: current.replies.len() };
                    let d = if service == "slack" { &mut current.slack } else { &mut current.zulip };
                    // Keep an id already given, so that later edits still reach the message.
                    *d = Delivered { id: d.id.clone().or(skip.id), ..skip };
                    let snapshot = current.clone();
                    let _ = write_atomic(&inner.path(&key), &snapshot);
                }
            }
            Err(e) => {
                let attempts = state.attempts.entry(key.clone()).or_default();
                *attempts += 1;
                let backoff =
                    inner.config.retry_base.saturating_mul(1 << (*attempts - 1).min(16)).min(inner.config.retry_max);
                let wait = match e.kind {
                    ErrorKind::Misconfigured => inner.config.retry_max,
                    _ => backoff.max(e.retry_after.unwrap_or_default()),
                };
                tracing::warn!(error = %e, service, wait_ms = wait.as_millis() as u64, "chat message not delivered; will retry");
                state.not_before.insert(key.clone(), Instant::now() + wait);
            }
        }
        let due = state.messages.values().filter(|m| m.due(&inner.config)).count();
        inner.waiting.send_replace(due);
    }
}
