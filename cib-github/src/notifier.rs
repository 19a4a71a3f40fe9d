//! [`Notifier`] on GitHub commit statuses: one status context per pipeline (`cib/test`), its state
//! and description following the build's events, delivered through a durable outbox.
//!
//! `publish` never talks to GitHub. It works out the status the event implies, writes it to the
//! outbox (one small JSON file per repository, commit and context, replaced in place) and wakes
//! a delivery task. Three things follow from that:
//! - Updates coalesce: the latest status per (repository, commit, context) wins, so a burst of
//!   step events ends in one or two API calls rather than one per event.
//! - The engine is never held up: it awaits notifiers one after another on one task, and a
//!   status stuck behind a rate limit would otherwise delay every other notifier.
//! - The final status lands after a crash: a file is deleted only once GitHub accepted what it
//!   holds, and a new notifier over the same directory sends whatever is left.
//!
//! Delivery is one request at a time (GitHub asks integrations not to send concurrently, to stay
//! clear of secondary rate limits) and retries transient failures with exponential backoff,
//! waiting at least as long as a `Retry-After` header says.
//!
//! The repository and commit of a build come from its `BuildQueued` event, so the notifier keeps
//! them per build, in the same directory, until the build's final status is in the outbox.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use cib_core::event::{BuildId, Conclusion, Event, EventBody, StepConclusion};
use cib_core::ports::{ErrorKind, Notifier, NotifyError};
use http::Method;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::client::{GithubClient, encode, repo_path};

/// How the notifier names and links statuses and how it retries.
#[derive(Debug, Clone)]
pub struct NotifierConfig {
    /// Statuses are named `<prefix>/<pipeline>`.
    pub context_prefix: String,
    /// Where a build's page is: `<target_url>/builds/<id>` is linked from the status.
    pub target_url: Option<String>,
    /// The first retry's delay; each failure doubles it, up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// How long the delivery task waits after being woken, so that a burst coalesces.
    pub coalesce: Duration,
}

impl Default for NotifierConfig {
    fn default() -> Self {
        NotifierConfig {
            context_prefix: "cib".into(),
            target_url: None,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            coalesce: Duration::from_millis(200),
        }
    }
}

/// One commit status to set, as the outbox keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusUpdate {
    pub repo: String,
    pub sha: String,
    pub context: String,
    /// `pending`, `success`, `failure` or `error`.
    pub state: String,
    pub description: String,
    pub target_url: Option<String>,
}

impl StatusUpdate {
    fn key(&self) -> String {
        let digest = Sha256::digest(format!("{}\0{}\0{}", self.repo, self.sha, self.context).as_bytes());
        hex::encode(&digest[..16])
    }
}

/// What the notifier remembers of a running build.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BuildInfo {
    repo: String,
    commit: String,
    pipeline: String,
    /// How each finished step ended (its last attempt).
    steps: BTreeMap<String, StepConclusion>,
}

#[derive(Debug)]
struct Pending {
    update: StatusUpdate,
    /// Bumped by every replacement, so that a delivery of an older version does not delete a
    /// newer one that arrived meanwhile.
    generation: u64,
    attempts: u32,
    not_before: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    builds: HashMap<BuildId, BuildInfo>,
    pending: BTreeMap<String, Pending>,
    generation: u64,
}

#[derive(Debug)]
struct Inner {
    client: GithubClient,
    dir: PathBuf,
    config: NotifierConfig,
    state: Mutex<State>,
    wake: Notify,
    /// How many updates wait, for [`GithubNotifier::flush`].
    waiting: watch::Sender<usize>,
}

/// The GitHub commit status notifier. Dropping it stops delivery; what was not delivered stays
/// in the outbox for the next one.
#[derive(Debug)]
pub struct GithubNotifier {
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GithubNotifier {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // The state is replaced field by field under the lock, so it is consistent even if a
    // holder panicked.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn io_error(what: &str, e: std::io::Error) -> NotifyError {
    NotifyError::Transient(format!("the GitHub notifier's outbox: {what}: {e}"))
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

fn read_dir_json<T: for<'de> Deserialize<'de>>(dir: &Path) -> std::io::Result<Vec<(PathBuf, T)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            match std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
                Some(value) => out.push((path, value)),
                // Only a crash between create and rename leaves a bad file, and then under
                // the `.tmp` name; anything else unreadable is reported and left for a person.
                None => tracing::warn!(path = %path.display(), "an unreadable outbox file was skipped"),
            }
        }
    }
    Ok(out)
}

impl GithubNotifier {
    /// A notifier keeping its outbox in `dir` (created if missing). Updates left there by an
    /// earlier process are sent again. Must be called within a Tokio runtime.
    pub fn new(client: GithubClient, dir: &Path, config: NotifierConfig) -> Result<GithubNotifier, NotifyError> {
        let (outbox, builds) = (dir.join("outbox"), dir.join("builds"));
        for d in [&outbox, &builds] {
            std::fs::create_dir_all(d).map_err(|e| io_error("create", e))?;
        }
        let mut state = State::default();
        for (_, update) in read_dir_json::<StatusUpdate>(&outbox).map_err(|e| io_error("read", e))? {
            state.generation += 1;
            let pending = Pending { update, generation: state.generation, attempts: 0, not_before: None };
            state.pending.insert(pending.update.key(), pending);
        }
        for (path, info) in read_dir_json::<(BuildId, BuildInfo)>(&builds).map_err(|e| io_error("read", e))? {
            tracing::debug!(path = %path.display(), build = %info.0, "build restored");
            state.builds.insert(info.0, info.1);
        }
        let (waiting, _) = watch::channel(state.pending.len());
        let inner = Arc::new(Inner {
            client,
            dir: dir.to_owned(),
            config,
            state: Mutex::new(state),
            wake: Notify::new(),
            waiting,
        });
        let task = tokio::spawn(deliver(inner.clone()));
        inner.wake.notify_one();
        Ok(GithubNotifier { inner, task })
    }

    /// Waits until the outbox is empty, at most `timeout`; `true` when it is.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let mut rx = self.inner.waiting.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0)).await.is_ok_and(|r| r.is_ok())
    }

    /// The updates not yet delivered.
    pub fn pending(&self) -> Vec<StatusUpdate> {
        lock(&self.inner.state).pending.values().map(|p| p.update.clone()).collect()
    }
}

impl Inner {
    fn build_path(&self, build: &BuildId) -> PathBuf {
        let digest = Sha256::digest(build.0.as_bytes());
        self.dir.join("builds").join(format!("{}.json", hex::encode(&digest[..16])))
    }

    fn outbox_path(&self, key: &str) -> PathBuf {
        self.dir.join("outbox").join(format!("{key}.json"))
    }

    fn status(&self, build: &BuildId, info: &BuildInfo, state: &str, description: String) -> StatusUpdate {
        StatusUpdate {
            repo: info.repo.clone(),
            sha: info.commit.clone(),
            context: format!("{}/{}", self.config.context_prefix, info.pipeline),
            state: state.to_owned(),
            description: truncate(&description, 140),
            target_url: self
                .config
                .target_url
                .as_ref()
                .map(|base| format!("{}/builds/{}", base.trim_end_matches('/'), encode(&build.0, false))),
        }
    }

    /// Puts `update` in the outbox in place of any older one for the same status.
    fn enqueue(&self, state: &mut State, update: StatusUpdate) -> Result<(), NotifyError> {
        let key = update.key();
        if state.pending.get(&key).is_some_and(|p| p.update == update) {
            return Ok(());
        }
        write_atomic(&self.outbox_path(&key), &update).map_err(|e| io_error("write", e))?;
        state.generation += 1;
        let generation = state.generation;
        let entry = state.pending.entry(key).or_insert(Pending {
            update: update.clone(),
            generation,
            attempts: 0,
            not_before: None,
        });
        entry.update = update;
        entry.generation = generation;
        self.waiting.send_replace(state.pending.len());
        self.wake.notify_one();
        Ok(())
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max - 1).collect();
    out.push('…');
    out
}

/// `3 passed, 1 failed (lint)`: how the finished steps ended.
fn summary(steps: &BTreeMap<String, StepConclusion>) -> String {
    let mut passed = 0;
    let mut failed = Vec::new();
    let mut skipped = 0;
    for (name, conclusion) in steps {
        match conclusion {
            StepConclusion::Success => passed += 1,
            StepConclusion::Skipped => skipped += 1,
            _ => failed.push(name.as_str()),
        }
    }
    let mut parts = vec![format!("{passed} passed")];
    if !failed.is_empty() {
        parts.push(format!("{} failed ({})", failed.len(), failed.join(", ")));
    }
    if skipped > 0 {
        parts.push(format!("{skipped} skipped"));
    }
    parts.join(", ")
}

/// Posts a comment on an issue or pull request, in the background, with a few retries. A
/// replay after a crash may post it again, which says nothing wrong.
fn post_comment(client: GithubClient, repo: String, number: u64, text: String) {
    tokio::spawn(async move {
        let Ok(path) = repo_path(&repo) else { return };
        let path = format!("{path}/issues/{number}/comments");
        let body = serde_json::json!({ "body": text });
        let mut delay = Duration::from_millis(500);
        for _ in 0..5 {
            match client.send(Method::POST, &path, Some(&body)).await {
                Ok(_) => return,
                Err(e) if e.kind == cib_core::ports::ErrorKind::Transient => {
                    tokio::time::sleep(delay.max(e.retry_after.unwrap_or_default())).await;
                    delay *= 2;
                }
                Err(e) => {
                    tracing::warn!(%repo, number, error = %e.message, "a comment could not be posted");
                    return;
                }
            }
        }
    });
}

#[async_trait]
impl Notifier for GithubNotifier {
    fn name(&self) -> &str {
        "github"
    }

    fn outbox_depth(&self) -> Option<usize> {
        Some(lock(&self.inner.state).pending.len())
    }

    async fn publish(&self, event: &Event) -> Result<(), NotifyError> {
        let inner = &self.inner;
        match &event.body {
            // The second status of a pull request: does its head contain its base's tip?
            EventBody::UpToDate { repo, commit, base, up_to_date, behind, .. } => {
                let description = if *up_to_date {
                    format!("contains the tip of {base}")
                } else {
                    format!("{behind} commit(s) behind {base}: rebase before merging")
                };
                let update = StatusUpdate {
                    repo: repo.clone(),
                    sha: commit.clone(),
                    context: format!("{}/up-to-date", inner.config.context_prefix),
                    state: if *up_to_date { "success" } else { "failure" }.to_owned(),
                    description: truncate(&description, 140),
                    target_url: None,
                };
                let mut state = lock(&inner.state);
                return inner.enqueue(&mut state, update);
            }
            // Answers to `/cib` commands become comments on the pull request. They are sent
            // once, with a few retries; a replay after a crash may post an answer again,
            // which says nothing wrong.
            EventBody::CommandAnswered { repo, number, text } => {
                post_comment(inner.client.clone(), repo.clone(), *number, text.clone());
                return Ok(());
            }
            // A spec that cannot be read fails its own status on the commit, naming the first
            // problem; a pull request also gets every problem in a comment.
            EventBody::SpecInvalid { repo, commit, pull_request, diagnostics } => {
                let first = diagnostics.first().map(String::as_str).unwrap_or("the spec is invalid");
                let update = StatusUpdate {
                    repo: repo.clone(),
                    sha: commit.clone(),
                    context: format!("{}/spec", inner.config.context_prefix),
                    state: "failure".to_owned(),
                    description: truncate(first, 140),
                    target_url: None,
                };
                if let Some(number) = pull_request {
                    let mut text = format!(
                        "cib built nothing for {}: its `{}` has {} problem(s).\n\n```\n",
                        commit.get(..12).unwrap_or(commit),
                        cib_core::spec::FILE_NAME,
                        diagnostics.len()
                    );
                    for d in diagnostics {
                        text.push_str(d);
                        text.push('\n');
                    }
                    text.push_str("```\n");
                    post_comment(inner.client.clone(), repo.clone(), *number, text);
                }
                let mut state = lock(&inner.state);
                return inner.enqueue(&mut state, update);
            }
            _ => {}
        }
        let mut state = lock(&inner.state);
        let Some(build) = event.body.build().cloned() else { return Ok(()) };
        if let EventBody::BuildQueued { repo, commit, pipeline, .. } = &event.body {
            let info = BuildInfo {
                repo: repo.clone(),
                commit: commit.clone(),
                pipeline: pipeline.clone(),
                steps: BTreeMap::new(),
            };
            write_atomic(&inner.build_path(&build), &(&build, &info)).map_err(|e| io_error("write", e))?;
            state.builds.insert(build.clone(), info);
        }
        let Some(info) = state.builds.get_mut(&build) else {
            // A build queued before this notifier's outbox existed: nothing says where it goes.
            tracing::debug!(%build, seq = event.seq, "no BuildQueued seen for this build; status skipped");
            return Ok(());
        };
        let mut finished = false;
        let (state_name, description) = match &event.body {
            EventBody::BuildQueued { .. } => ("pending", "queued".to_owned()),
            EventBody::BuildWaitingForTurn { .. } => ("pending", "waiting for an earlier deploy".to_owned()),
            EventBody::BuildStarted { .. } => ("pending", "running".to_owned()),
            EventBody::BuildCancelling { by, .. } => ("pending", format!("cancelling (by {by})")),
            EventBody::StepStarted { step, .. } => ("pending", format!("running {step}; {}", summary(&info.steps))),
            EventBody::StepFinished { step, conclusion, will_retry, .. } => {
                if !will_retry {
                    info.steps.insert(step.clone(), *conclusion);
                }
                ("pending", format!("running; {}", summary(&info.steps)))
            }
            EventBody::StepSkipped { step, .. } => {
                info.steps.insert(step.clone(), StepConclusion::Skipped);
                ("pending", format!("running; {}", summary(&info.steps)))
            }
            EventBody::GateWaiting { step, .. } => ("pending", format!("waiting for approval of {step}")),
            EventBody::BuildFinished { conclusion, .. } => {
                finished = true;
                finished_state(*conclusion, &summary(&info.steps))
            }
            // Approvals, services and superseding show in the next status-changing event.
            _ => return Ok(()),
        };
        let info = info.clone();
        let update = inner.status(&build, &info, state_name, description);
        inner.enqueue(&mut state, update)?;
        if finished {
            // The final status is durable in the outbox; the build's record is no longer needed.
            state.builds.remove(&build);
            if let Err(e) = std::fs::remove_file(inner.build_path(&build)) {
                tracing::debug!(%build, error = %e, "the build's record was already gone");
            }
        }
        Ok(())
    }
}

/// The delivery task: sends what is due, one request at a time, until dropped.
async fn deliver(inner: Arc<Inner>) {
    loop {
        let next = {
            let state = lock(&inner.state);
            let now = Instant::now();
            let due = state.pending.iter().find(|(_, p)| p.not_before.is_none_or(|t| t <= now)).map(|(k, _)| k.clone());
            let later = state.pending.values().filter_map(|p| p.not_before).min();
            (due, later)
        };
        let key = match next {
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
                // Let a burst of events land so that only the latest status is sent.
                tokio::time::sleep(inner.config.coalesce).await;
                continue;
            }
        };
        let Some((update, generation)) = lock(&inner.state).pending.get(&key).map(|p| (p.update.clone(), p.generation))
        else {
            continue;
        };
        let result = send(&inner.client, &update).await;
        let mut state = lock(&inner.state);
        let Some(pending) = state.pending.get_mut(&key) else { continue };
        match result {
            Ok(()) => {
                if pending.generation == generation {
                    state.pending.remove(&key);
                    if let Err(e) = std::fs::remove_file(inner.outbox_path(&key)) {
                        tracing::warn!(error = %e, "a delivered status stays in the outbox and will be sent again");
                    }
                }
            }
            Err(e) if e.kind == ErrorKind::Permanent => {
                tracing::error!(error = %e, repo = %update.repo, sha = %update.sha, "GitHub refused a commit status; dropped");
                if pending.generation == generation {
                    state.pending.remove(&key);
                    let _ = std::fs::remove_file(inner.outbox_path(&key));
                }
            }
            Err(e) => {
                pending.attempts += 1;
                let backoff = inner
                    .config
                    .retry_base
                    .saturating_mul(1 << pending.attempts.saturating_sub(1).min(16))
                    .min(inner.config.retry_max);
                // A misconfiguration waits for a person: retry slowly rather than give up, so a
                // fixed token delivers without a restart.
                let wait = match e.kind {
                    ErrorKind::Misconfigured => inner.config.retry_max,
                    _ => backoff.max(e.retry_after.unwrap_or_default()),
                };
                tracing::warn!(error = %e, attempt = pending.attempts, wait_ms = wait.as_millis() as u64, "commit status not delivered; will retry");
                pending.not_before = Some(Instant::now() + wait);
            }
        }
        inner.waiting.send_replace(state.pending.len());
    }
}

/// The commit status of a finished build: its state and description.
fn finished_state(conclusion: Conclusion, steps: &str) -> (&'static str, String) {
    match conclusion {
        Conclusion::Success => ("success", format!("passed: {steps}")),
        Conclusion::Failed => ("failure", format!("failed: {steps}")),
        Conclusion::TimedOut => ("failure", format!("timed out: {steps}")),
        Conclusion::Cancelled => ("error", format!("cancelled: {steps}")),
        Conclusion::Errored => ("error", format!("infrastructure error: {steps}")),
        // Commit statuses have no neutral state. A skipped secret step proves nothing, so the
        // status must never satisfy a required check: "failure", with the reason in words.
        Conclusion::Neutral => ("failure", format!("neutral: steps needing secrets were skipped; {steps}")),
    }
}

async fn send(client: &GithubClient, update: &StatusUpdate) -> Result<(), crate::client::ApiError> {
    let path = format!("{}/statuses/{}", repo_path(&update.repo)?, encode(&update.sha, false));
    let mut body = serde_json::json!({
        "state": update.state,
        "context": update.context,
        "description": update.description,
    });
    if let Some(url) = &update.target_url {
        body["target_url"] = serde_json::Value::from(url.clone());
    }
    client.send(Method::POST, &path, Some(&body)).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_name_the_failed_steps() {
        let mut steps = BTreeMap::new();
        steps.insert("build".to_owned(), StepConclusion::Success);
        steps.insert("lint".to_owned(), StepConclusion::Failed);
        steps.insert("docs".to_owned(), StepConclusion::Skipped);
        assert_eq!(summary(&steps), "1 passed, 1 failed (lint), 1 skipped");
        assert_eq!(truncate(&"x".repeat(200), 140).chars().count(), 140);
    }

    #[test]
    fn a_neutral_build_never_reports_success() {
        let (state, description) = finished_state(Conclusion::Neutral, "1 passed, 1 skipped");
        assert_eq!(state, "failure");
        assert!(description.starts_with("neutral: steps needing secrets were skipped"), "{description}");
        assert_eq!(finished_state(Conclusion::Success, "1 passed").0, "success");
    }
}
