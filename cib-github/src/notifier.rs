//! [`Notifier`] on GitHub: per pipeline, a check run (with a GitHub App) or a commit status
//! (with a token), named `cib/<pipeline>`, following the build's events and delivered through a
//! durable outbox.
//!
//! Check runs need an App (GitHub refuses them to other tokens), and say more than a status: a
//! summary with every step, its result and duration, the failing step's last log lines (as the
//! store keeps them, masked), and annotations on `.cib.yml` (a spec's diagnostics at their line
//! and column; a failed step at the line that defines it). A check run is created once
//! (`POST .../check-runs`) and then changed in place (`PATCH .../check-runs/{id}`); its id is
//! kept in the outbox directory until its final state is delivered. A crash between GitHub's
//! answer to the creation and that id being written makes a second run of the same name, the
//! newer of which GitHub shows. Annotations ride on the final update only, because GitHub
//! appends each request's annotations to those already there.
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
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use cib_core::event::{BuildId, Conclusion, Event, EventBody, StepConclusion};
use cib_core::ports::{ErrorKind, LogKey, Notifier, NotifyError, Store};
use cib_core::workflow::DownstreamState;
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
    /// Check runs instead of commit statuses for pipelines and broken specs. GitHub accepts
    /// them from an App only; [`GithubNotifier::new`] turns this on for an App's client.
    pub check_runs: bool,
    /// How many of the failing step's last log lines a check run's summary shows.
    pub log_lines: usize,
}

impl Default for NotifierConfig {
    fn default() -> Self {
        NotifierConfig {
            context_prefix: "cib".into(),
            target_url: None,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            coalesce: Duration::from_millis(200),
            check_runs: false,
            log_lines: 20,
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

/// One annotation of a check run, on a file of the repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Annotation {
    pub path: String,
    pub line: u64,
    pub column: Option<u64>,
    /// `notice`, `warning` or `failure`.
    pub level: String,
    pub message: String,
    pub details: Option<String>,
}

/// The state a check run should have, as the outbox keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckUpdate {
    pub repo: String,
    pub sha: String,
    /// The run's name, `cib/<pipeline>` or `cib/spec`.
    pub name: String,
    /// What the run reports on: the build id, or `spec@<commit>`. A `rerequested` event names
    /// it, which is how a re-run finds its build.
    pub external_id: String,
    /// `queued`, `in_progress` or `completed`.
    pub status: String,
    pub conclusion: Option<String>,
    pub title: String,
    pub summary: String,
    pub annotations: Vec<Annotation>,
    pub details_url: Option<String>,
}

impl CheckUpdate {
    fn key(&self) -> String {
        let digest = Sha256::digest(format!("{}\0{}\0check", self.repo, self.external_id).as_bytes());
        hex::encode(&digest[..16])
    }
}

/// What the outbox holds: a status or a check run. Untagged, so that files written before check
/// runs existed (statuses) are still read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
enum Update {
    Status(StatusUpdate),
    Check(CheckUpdate),
}

impl Update {
    fn key(&self) -> String {
        match self {
            Update::Status(s) => s.key(),
            Update::Check(c) => c.key(),
        }
    }

    fn repo_sha(&self) -> (&str, &str) {
        match self {
            Update::Status(s) => (&s.repo, &s.sha),
            Update::Check(c) => (&c.repo, &c.sha),
        }
    }
}

/// How one step went, for a check run's summary.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StepReport {
    started_ms: Option<u64>,
    finished_ms: Option<u64>,
    detail: String,
    /// The failing attempt's last log lines.
    tail: Option<String>,
    /// The line of `.cib.yml` that defines the step, once it failed.
    line: Option<u64>,
}

/// What the notifier remembers of a running build.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BuildInfo {
    repo: String,
    commit: String,
    pipeline: String,
    /// How each finished step ended (its last attempt).
    steps: BTreeMap<String, StepConclusion>,
    /// Times, details and log tails of the steps, for check runs.
    #[serde(default)]
    reports: BTreeMap<String, StepReport>,
}

#[derive(Debug)]
struct Pending {
    update: Update,
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
    /// Check run ids GitHub gave, by outbox key.
    check_ids: HashMap<String, u64>,
}

/// The store, behind a `Debug` that says only that it is there.
struct StoreRef(Arc<dyn Store>);

impl std::fmt::Debug for StoreRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreRef(..)")
    }
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
    /// Where the logs and the enqueued specs are read from, for check runs' summaries.
    store: OnceLock<StoreRef>,
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
        let mut config = config;
        config.check_runs |= client.is_app();
        let (outbox, builds, checks) = (dir.join("outbox"), dir.join("builds"), dir.join("checks"));
        for d in [&outbox, &builds, &checks] {
            std::fs::create_dir_all(d).map_err(|e| io_error("create", e))?;
        }
        let mut state = State::default();
        for (path, id) in read_dir_json::<u64>(&checks).map_err(|e| io_error("read", e))? {
            if let Some(key) = path.file_stem().and_then(|s| s.to_str()) {
                state.check_ids.insert(key.to_owned(), id);
            }
        }
        for (_, update) in read_dir_json::<Update>(&outbox).map_err(|e| io_error("read", e))? {
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
            store: OnceLock::new(),
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

    /// Reads the failing steps' logs (and the specs builds were enqueued with) from `store`,
    /// for check runs' summaries and annotations. Without it, check runs name the failed steps
    /// but show no log lines.
    pub fn with_store(self, store: Arc<dyn Store>) -> Self {
        let _ = self.inner.store.set(StoreRef(store));
        self
    }

    /// The status updates not yet delivered.
    pub fn pending(&self) -> Vec<StatusUpdate> {
        let state = lock(&self.inner.state);
        state
            .pending
            .values()
            .filter_map(|p| match &p.update {
                Update::Status(s) => Some(s.clone()),
                Update::Check(_) => None,
            })
            .collect()
    }

    /// The check run updates not yet delivered.
    pub fn pending_checks(&self) -> Vec<CheckUpdate> {
        let state = lock(&self.inner.state);
        state
            .pending
            .values()
            .filter_map(|p| match &p.update {
                Update::Check(c) => Some(c.clone()),
                Update::Status(_) => None,
            })
            .collect()
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

    fn check_path(&self, key: &str) -> PathBuf {
        self.dir.join("checks").join(format!("{key}.json"))
    }

    fn details_url(&self, build: &BuildId) -> Option<String> {
        self.config
            .target_url
            .as_ref()
            .map(|base| format!("{}/builds/{}", base.trim_end_matches('/'), encode(&build.0, false)))
    }

    /// The check run a build's event implies.
    fn check(
        &self,
        build: &BuildId,
        info: &BuildInfo,
        status: &str,
        conclusion: Option<&str>,
        title: String,
    ) -> CheckUpdate {
        CheckUpdate {
            repo: info.repo.clone(),
            sha: info.commit.clone(),
            name: format!("{}/{}", self.config.context_prefix, info.pipeline),
            external_id: build.0.clone(),
            status: status.to_owned(),
            conclusion: conclusion.map(str::to_owned),
            title: truncate(&title, 200),
            summary: check_summary(info),
            annotations: Vec::new(),
            details_url: self.details_url(build),
        }
    }

    /// The last `log_lines` lines of a step attempt's stored log, which the engine masked
    /// before storing.
    async fn log_tail(&self, build: &BuildId, step: &str, attempt: u32) -> Option<String> {
        let store = &self.store.get()?.0;
        let key = LogKey { build: build.clone(), step: step.to_owned(), attempt };
        let end = store.read_log(&key, u64::MAX, 1).await.ok()?.next_offset;
        let read = store.read_log(&key, end.saturating_sub(8192), 8192).await.ok()?;
        let text = String::from_utf8_lossy(&read.data);
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(self.config.log_lines)..].join("\n");
        Some(tail)
    }

    /// The line of `.cib.yml` that names `step`, from the spec text the build was enqueued with.
    async fn step_line(&self, build: &BuildId, step: &str) -> Option<u64> {
        let store = &self.store.get()?.0;
        let stored = store.enqueued(build).await.ok()??;
        let cib_core::pipeline::Input::Enqueue { spec, .. } = stored.input else { return None };
        step_line(&spec, step)
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

    /// Puts `update` in the outbox in place of any older one for the same status or run.
    fn enqueue(&self, state: &mut State, update: impl Into<Update>) -> Result<(), NotifyError> {
        let update = update.into();
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

impl From<StatusUpdate> for Update {
    fn from(s: StatusUpdate) -> Self {
        Update::Status(s)
    }
}

impl From<CheckUpdate> for Update {
    fn from(c: CheckUpdate) -> Self {
        Update::Check(c)
    }
}

/// The line in a spec's text where the step `step` is named (`name: step`, quoted or not, in
/// block or flow style), for an annotation. A matrix cell (`unit (python=3.12)`) is found by its
/// matrix step's name. `None` when no line names it.
fn step_line(spec: &str, step: &str) -> Option<u64> {
    let base = step.split(" (").next().unwrap_or(step);
    for (i, line) in spec.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("name:") {
            let value = rest[at + 5..].trim_start();
            let value = value.trim_start_matches(['"', '\'']);
            if let Some(after) = value.strip_prefix(base)
                && after.chars().next().is_none_or(|c| matches!(c, '"' | '\'' | ',' | '}' | ' ' | '#'))
            {
                return Some(i as u64 + 1);
            }
            rest = &rest[at + 5..];
        }
    }
    None
}

/// A diagnostic line (`PATH:LINE:COL: error: MESSAGE`, as `Diagnostic::line` writes it) as an
/// annotation at its place.
fn diagnostic_annotation(line: &str) -> Option<Annotation> {
    let mut parts = line.splitn(4, ':');
    let (path, row, col, rest) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let row: u64 = row.trim().parse().ok()?;
    let col: u64 = col.trim().parse().ok()?;
    let message = rest.trim_start().strip_prefix("error:").unwrap_or(rest).trim();
    Some(Annotation {
        path: path.to_owned(),
        line: row.max(1),
        column: Some(col.max(1)),
        level: "failure".into(),
        message: message.to_owned(),
        details: None,
    })
}

/// One failure annotation per failed step whose line in `.cib.yml` is known, carrying the
/// step's last log lines.
fn failed_annotations(info: &BuildInfo) -> Vec<Annotation> {
    info.reports
        .iter()
        .filter(|(name, _)| {
            info.steps.get(*name).is_some_and(|c| !matches!(c, StepConclusion::Success | StepConclusion::Skipped))
        })
        .filter_map(|(name, report)| {
            Some(Annotation {
                path: cib_core::spec::FILE_NAME.to_owned(),
                line: report.line?,
                column: None,
                level: "failure".into(),
                message: truncate(&format!("step {name} failed: {}", report.detail), 1000),
                details: report.tail.clone(),
            })
        })
        .take(50)
        .collect()
}

/// The check run conclusion of a build's conclusion.
fn check_conclusion(conclusion: Conclusion) -> &'static str {
    match conclusion {
        Conclusion::Success => "success",
        Conclusion::Failed | Conclusion::Errored => "failure",
        Conclusion::TimedOut => "timed_out",
        Conclusion::Cancelled => "cancelled",
        // Check runs have a neutral conclusion, which branch protection does not count as a
        // pass: a build whose secret steps were skipped proves nothing.
        Conclusion::Neutral => "neutral",
    }
}

/// `1m 05s`, `3.2s`: a step's duration for a summary.
fn duration(ms: u64) -> String {
    if ms >= 60_000 {
        format!("{}m {:02}s", ms / 60_000, (ms % 60_000) / 1000)
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}

/// A check run's summary in Markdown: a table of the steps, then the failing steps' last lines.
fn check_summary(info: &BuildInfo) -> String {
    let mut names: Vec<&String> = info.reports.keys().collect();
    for name in info.steps.keys() {
        if !info.reports.contains_key(name) {
            names.push(name);
        }
    }
    let mut out = format!("**{}**\n\n| step | result | duration |\n|---|---|---|\n", summary(&info.steps));
    for name in &names {
        let report = info.reports.get(*name).cloned().unwrap_or_default();
        let result = match info.steps.get(*name) {
            Some(c) => format!("{c:?}").to_lowercase(),
            None => "running".into(),
        };
        let took = match (report.started_ms, report.finished_ms) {
            (Some(a), Some(b)) => duration(b.saturating_sub(a)),
            _ => String::new(),
        };
        let detail = if report.detail.is_empty() { String::new() } else { format!(" ({})", report.detail) };
        out.push_str(&format!("| {} | {result}{} | {took} |\n", markdown_cell(name), markdown_cell(&detail)));
    }
    for name in names {
        if let Some(tail) = info.reports.get(name).and_then(|r| r.tail.as_ref()) {
            out.push_str(&format!(
                "\n**{}**: the last lines of its log\n\n```\n{}\n```\n",
                markdown_cell(name),
                tail.replace("```", "``\u{200b}`")
            ));
        }
    }
    truncate(&out, 65_000)
}

fn markdown_cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
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
            // A downstream repository's pipeline against an upstream commit: a status of its
            // own on that commit, whichever mode reports the builds (a check run belongs to the
            // App's own runs of the commit's repository; a status names any context).
            EventBody::DownstreamReported { build, upstream_repo, upstream_commit, repo, pipeline, state } => {
                let (state_name, description) = downstream_status(*state, repo, pipeline);
                let update = StatusUpdate {
                    repo: upstream_repo.clone(),
                    sha: upstream_commit.clone(),
                    context: format!("{}/downstream/{repo}/{pipeline}", inner.config.context_prefix),
                    state: state_name.to_owned(),
                    description: truncate(&description, 140),
                    target_url: inner.details_url(build),
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
                let check = inner.config.check_runs.then(|| {
                    let mut summary = format!(
                        "cib built nothing: `{}` has {} problem(s).\n\n```\n",
                        cib_core::spec::FILE_NAME,
                        diagnostics.len()
                    );
                    for d in diagnostics {
                        summary.push_str(d);
                        summary.push('\n');
                    }
                    summary.push_str("```\n");
                    CheckUpdate {
                        repo: repo.clone(),
                        sha: commit.clone(),
                        name: format!("{}/spec", inner.config.context_prefix),
                        external_id: format!("spec@{commit}"),
                        status: "completed".into(),
                        conclusion: Some("failure".into()),
                        title: truncate(first, 200),
                        summary: truncate(&summary, 65_000),
                        // GitHub takes 50 annotations per request; the summary lists them all.
                        annotations: diagnostics.iter().filter_map(|d| diagnostic_annotation(d)).take(50).collect(),
                        details_url: None,
                    }
                });
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
                return match check {
                    Some(check) => inner.enqueue(&mut state, check),
                    None => inner.enqueue(&mut state, update),
                };
            }
            _ => {}
        }
        // A failed step's log tail and line are read before the state is locked, since the
        // store is async.
        let mut failure: Option<(String, Option<String>, Option<u64>)> = None;
        if inner.config.check_runs
            && let EventBody::StepFinished { build, step, attempt, conclusion, will_retry: false, .. } = &event.body
            && !matches!(conclusion, StepConclusion::Success | StepConclusion::Skipped)
        {
            let tail = inner.log_tail(build, step, *attempt).await;
            let line = inner.step_line(build, step).await;
            failure = Some((step.clone(), tail, line));
        }
        let mut state = lock(&inner.state);
        let Some(build) = event.body.build().cloned() else { return Ok(()) };
        if let EventBody::BuildQueued { repo, commit, pipeline, .. } = &event.body {
            let info = BuildInfo {
                repo: repo.clone(),
                commit: commit.clone(),
                pipeline: pipeline.clone(),
                steps: BTreeMap::new(),
                reports: BTreeMap::new(),
            };
            write_atomic(&inner.build_path(&build), &(&build, &info)).map_err(|e| io_error("write", e))?;
            state.builds.insert(build.clone(), info);
        }
        let Some(info) = state.builds.get_mut(&build) else {
            // A build queued before this notifier's outbox existed: nothing says where it goes.
            tracing::debug!(%build, seq = event.seq, "no BuildQueued seen for this build; status skipped");
            return Ok(());
        };
        let at = event.at.millis();
        match &event.body {
            EventBody::StepStarted { step, .. } => {
                let report = info.reports.entry(step.clone()).or_default();
                report.started_ms = Some(at);
                report.finished_ms = None;
            }
            EventBody::StepFinished { step, detail, will_retry: false, .. } => {
                let report = info.reports.entry(step.clone()).or_default();
                report.finished_ms = Some(at);
                report.detail = detail.clone();
                if let Some((failed, tail, line)) = &failure
                    && failed == step
                {
                    report.tail = tail.clone();
                    report.line = *line;
                }
            }
            EventBody::StepSkipped { step, reason, .. } => {
                info.reports.entry(step.clone()).or_default().detail = reason.clone();
            }
            _ => {}
        }
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
        // What the steps did is kept on disk as it changes, so that a restart's summary still
        // lists every step with its duration.
        if matches!(
            &event.body,
            EventBody::StepStarted { .. } | EventBody::StepFinished { .. } | EventBody::StepSkipped { .. }
        ) {
            write_atomic(&inner.build_path(&build), &(&build, &info)).map_err(|e| io_error("write", e))?;
        }
        if inner.config.check_runs {
            let check = match &event.body {
                EventBody::BuildQueued { .. } | EventBody::BuildWaitingForTurn { .. } => {
                    inner.check(&build, &info, "queued", None, description)
                }
                EventBody::BuildFinished { conclusion, .. } => {
                    let mut check =
                        inner.check(&build, &info, "completed", Some(check_conclusion(*conclusion)), description);
                    check.annotations = failed_annotations(&info);
                    check
                }
                _ => inner.check(&build, &info, "in_progress", None, description),
            };
            inner.enqueue(&mut state, check)?;
        } else {
            let update = inner.status(&build, &info, state_name, description);
            inner.enqueue(&mut state, update)?;
        }
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
        let found = {
            let state = lock(&inner.state);
            state.pending.get(&key).map(|p| (p.update.clone(), p.generation, state.check_ids.get(&key).copied()))
        };
        let Some((update, generation, check_id)) = found else { continue };
        let result = match &update {
            Update::Status(status) => send(&inner.client, status).await,
            Update::Check(check) => match send_check(&inner.client, check, check_id).await {
                Ok(Some(id)) => {
                    // The id is durable before the update leaves the outbox, so the next update
                    // (or a restart) changes this run rather than making another.
                    if let Err(e) = write_atomic(&inner.check_path(&key), &id) {
                        tracing::warn!(error = %e, "a check run's id was not stored; its next update makes another run");
                    }
                    lock(&inner.state).check_ids.insert(key.clone(), id);
                    Ok(())
                }
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            },
        };
        let (repo, sha) = update.repo_sha();
        let mut state = lock(&inner.state);
        let Some(pending) = state.pending.get_mut(&key) else { continue };
        match result {
            Ok(()) => {
                if pending.generation == generation {
                    state.pending.remove(&key);
                    if let Err(e) = std::fs::remove_file(inner.outbox_path(&key)) {
                        tracing::warn!(error = %e, "a delivered status stays in the outbox and will be sent again");
                    }
                    // A completed run changes no more; its id is no longer needed.
                    if matches!(&update, Update::Check(c) if c.status == "completed") {
                        state.check_ids.remove(&key);
                        let _ = std::fs::remove_file(inner.check_path(&key));
                    }
                }
            }
            Err(e) if e.kind == ErrorKind::Permanent => {
                tracing::error!(error = %e, %repo, %sha, "GitHub refused an update; dropped");
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

/// The commit status of a downstream pipeline on the upstream commit.
fn downstream_status(state: DownstreamState, repo: &str, pipeline: &str) -> (&'static str, String) {
    let what = format!("{repo}'s {pipeline} pipeline");
    match state {
        DownstreamState::Running => ("pending", format!("{what} is running against this commit")),
        DownstreamState::Success => ("success", format!("{what} passed against this commit")),
        DownstreamState::Failed => ("failure", format!("{what} failed against this commit")),
        DownstreamState::TimedOut => ("failure", format!("{what} timed out against this commit")),
        // As for a build's own status, a neutral result must never satisfy a required check.
        DownstreamState::Neutral => ("failure", format!("{what} skipped steps (neutral)")),
        DownstreamState::Cancelled => ("error", format!("{what} was cancelled")),
        DownstreamState::Errored => ("error", format!("{what} hit an infrastructure error")),
    }
}

/// Creates the check run (answering its new id) or changes the one GitHub already has.
async fn send_check(
    client: &GithubClient,
    check: &CheckUpdate,
    id: Option<u64>,
) -> Result<Option<u64>, crate::client::ApiError> {
    let annotations: Vec<serde_json::Value> = check
        .annotations
        .iter()
        .map(|a| {
            let mut v = serde_json::json!({
                "path": a.path, "start_line": a.line, "end_line": a.line,
                "annotation_level": a.level, "message": a.message,
            });
            // GitHub takes columns only on a one-line annotation, which these are.
            if let Some(column) = a.column {
                v["start_column"] = column.into();
                v["end_column"] = column.into();
            }
            if let Some(details) = &a.details {
                v["raw_details"] = truncate(details, 60_000).into();
            }
            v
        })
        .collect();
    let mut body = serde_json::json!({
        "name": check.name,
        "external_id": check.external_id,
        "status": check.status,
        "output": { "title": check.title, "summary": check.summary, "annotations": annotations },
    });
    if let Some(conclusion) = &check.conclusion {
        body["conclusion"] = conclusion.clone().into();
    }
    if let Some(url) = &check.details_url {
        body["details_url"] = url.clone().into();
    }
    let base = format!("{}/check-runs", repo_path(&check.repo)?);
    match id {
        Some(id) => client.send(Method::PATCH, &format!("{base}/{id}"), Some(&body)).await.map(|_| None),
        None => {
            body["head_sha"] = check.sha.clone().into();
            let answer = client.send(Method::POST, &base, Some(&body)).await?.json()?;
            Ok(answer.get("id").and_then(serde_json::Value::as_u64))
        }
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
    fn diagnostics_and_steps_are_placed_on_lines() {
        let a =
            diagnostic_annotation(".cib.yml:3:5: error: unknown key 'stepz' (did you mean 'steps'?)").expect("parsed");
        assert_eq!((a.path.as_str(), a.line, a.column), (".cib.yml", 3, Some(5)));
        assert_eq!(a.message, "unknown key 'stepz' (did you mean 'steps'?)");
        assert!(diagnostic_annotation("no place here").is_none());
        let spec = "pipelines:\n  t:\n    steps:\n      - { name: lint, image: x }\n      - name: \"unit\"\n        image: x\n";
        assert_eq!(step_line(spec, "lint"), Some(4));
        assert_eq!(step_line(spec, "unit (python=3.12)"), Some(5), "a matrix cell is found by its step");
        assert_eq!(step_line(spec, "uni"), None, "a prefix is not a name");
    }

    #[test]
    fn a_downstream_result_reads_as_a_status_of_the_upstream_commit() {
        let (state, description) = downstream_status(DownstreamState::Failed, "acme/client", "test");
        assert_eq!(
            (state, description.as_str()),
            ("failure", "acme/client's test pipeline failed against this commit")
        );
        assert_eq!(downstream_status(DownstreamState::Running, "acme/client", "test").0, "pending");
        assert_eq!(downstream_status(DownstreamState::Success, "acme/client", "test").0, "success");
        assert_eq!(downstream_status(DownstreamState::Neutral, "acme/client", "test").0, "failure");
    }

    #[test]
    fn a_neutral_build_never_reports_success() {
        let (state, description) = finished_state(Conclusion::Neutral, "1 passed, 1 skipped");
        assert_eq!(state, "failure");
        assert!(description.starts_with("neutral: steps needing secrets were skipped"), "{description}");
        assert_eq!(finished_state(Conclusion::Success, "1 passed").0, "success");
    }
}
