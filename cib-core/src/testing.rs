//! Fakes of every port and the conformance suites real backends must pass too.
//!
//! The fakes are real implementations of the ports, kept in memory: an executor that plays a
//! tiny shell (`echo`, `exit`, `sleep`, `true`, `false`), a VCS of in-memory repositories, a
//! notifier that records, a store in memory and a clock that moves only when told. The
//! conformance suites state what every backend must do; running them against the fakes keeps
//! the fakes honest, and against the real backends keeps those honest.

pub mod hostile;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::event::{BuildId, Event};
use crate::pipeline::{BuildContext, Input, StepJob, StopReason};
use crate::ports::*;
use crate::spec;
use crate::time::Timestamp;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic in another test thread must not hide this one's result behind a poisoned lock.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---- clock ---------------------------------------------------------------------------------

/// A clock that moves only when a test says so.
#[derive(Debug)]
pub struct ManualClock {
    now: tokio::sync::watch::Sender<Timestamp>,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> Arc<Self> {
        let (now, _) = tokio::sync::watch::channel(start);
        Arc::new(ManualClock { now })
    }

    pub fn advance(&self, by: Duration) {
        self.now.send_modify(|t| *t = *t + by);
    }

    pub fn set(&self, to: Timestamp) {
        self.now.send_modify(|t| *t = (*t).max(to));
    }
}

#[async_trait]
impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.now.borrow()
    }

    async fn sleep_until(&self, at: Timestamp) {
        let mut rx = self.now.subscribe();
        loop {
            if *rx.borrow_and_update() >= at {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// The wall clock, for tests that run in real time.
pub use crate::engine::SystemClock;

// ---- secrets -------------------------------------------------------------------------------

/// Secrets from a map, the same for every repository.
#[derive(Debug, Default, Clone)]
pub struct StaticSecrets(pub BTreeMap<String, String>);

#[async_trait]
impl Secrets for StaticSecrets {
    async fn for_step(
        &self,
        _build: &crate::policy::BuildFacts<'_>,
        asked: &[String],
    ) -> Result<crate::ports::StepSecrets, String> {
        Ok(crate::ports::StepSecrets::pick(&self.0, asked))
    }
}

// ---- executor ------------------------------------------------------------------------------

/// An executor that plays a tiny shell over the step's commands, without containers.
///
/// It knows `echo WORDS` (with `$NAME` expansion, and `>&2` for stderr), `exit N`, `sleep
/// SECONDS` (in real time, interruptible), `true` and `false`, and fails a command it does not
/// know with exit code 127, as `sh` does. Secret values are masked as `***` in the output.
/// An infrastructure error can be scripted per step name.
///
/// Each attempt it runs plays on by itself, like a container, when the engine that started it
/// goes away: a later engine re-attaches to it (`attach`) until `lose` throws it away, as a
/// daemon restart would.
#[derive(Debug, Default)]
pub struct FakeExecutor {
    infra_errors: Mutex<HashMap<String, u32>>,
    runs: Mutex<Vec<StepJob>>,
    live: Mutex<BTreeMap<BuildId, u32>>,
    cleaned: Mutex<Vec<BuildId>>,
    attempts: Mutex<BTreeMap<LogKey, Arc<FakeAttempt>>>,
    attached: Mutex<Vec<LogKey>>,
}

/// One attempt as the fake keeps it: its masked output so far and, once it ended, how.
#[derive(Debug)]
struct FakeAttempt {
    output: Mutex<Vec<(Stream, Vec<u8>)>>,
    /// The engine that started the attempt is gone: its output reaches only the copy kept here,
    /// and its run never reports back, as with a process that died.
    severed: std::sync::atomic::AtomicBool,
    /// Bumped on every write and set at the end, so that a follower wakes for each.
    state: tokio::sync::watch::Sender<(u64, Option<Outcome>)>,
}

/// Writes to the engine's sink and keeps a copy, for a later engine to re-attach to.
struct Tee {
    inner: Arc<dyn LogSink>,
    attempt: Arc<FakeAttempt>,
}

impl LogSink for Tee {
    fn write(&self, stream: Stream, bytes: &[u8]) {
        if !self.attempt.severed.load(std::sync::atomic::Ordering::SeqCst) {
            self.inner.write(stream, bytes);
        }
        lock(&self.attempt.output).push((stream, bytes.to_vec()));
        self.attempt.state.send_modify(|(n, _)| *n += 1);
    }
}

impl FakeExecutor {
    pub fn new() -> Arc<Self> {
        Arc::new(FakeExecutor::default())
    }

    /// The next `times` attempts of steps named `step` fail as infrastructure errors.
    pub fn fail_infrastructure(&self, step: &str, times: u32) {
        lock(&self.infra_errors).insert(step.to_owned(), times);
    }

    /// Every job run so far.
    pub fn runs(&self) -> Vec<StepJob> {
        lock(&self.runs).clone()
    }

    /// Builds cleaned up so far.
    pub fn cleaned(&self) -> Vec<BuildId> {
        lock(&self.cleaned).clone()
    }

    /// Marks `build` as holding something, as a crash that lost its cleanup would leave it.
    pub fn leak(&self, build: &str) {
        *lock(&self.live).entry(BuildId::from(build)).or_default() += 1;
    }

    /// Builds with something still allocated (a step run or services).
    pub fn live_builds(&self) -> Vec<BuildId> {
        lock(&self.live).keys().cloned().collect()
    }

    /// Throws away every attempt of the build kept for re-attaching, as a daemon restart
    /// would: a later engine finds nothing of them.
    pub fn lose(&self, build: &BuildId) {
        lock(&self.attempts).retain(|k, _| k.build != *build);
    }

    /// Cuts every attempt running now off from the engine that started it, as that engine's
    /// process dying would: they play on, and a later engine can re-attach to them.
    pub fn sever(&self) {
        for attempt in lock(&self.attempts).values() {
            attempt.severed.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The attempts a later engine re-attached to, in order.
    pub fn attached(&self) -> Vec<LogKey> {
        lock(&self.attached).clone()
    }
}

fn expand(text: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let braced = chars.peek() == Some(&'{');
        if braced {
            chars.next();
        }
        let mut name = String::new();
        while let Some(&n) = chars.peek() {
            if n.is_ascii_alphanumeric() || n == '_' {
                name.push(n);
                chars.next();
            } else {
                break;
            }
        }
        if braced && chars.peek() == Some(&'}') {
            chars.next();
        }
        out.push_str(env.get(&name).map(String::as_str).unwrap_or_default());
    }
    out.replace(['"', '\''], "")
}

fn mask<'a>(text: &str, secrets: impl Iterator<Item = &'a String>) -> String {
    secrets.filter(|v| !v.is_empty()).fold(text.to_owned(), |t, v| t.replace(v.as_str(), "***"))
}

#[async_trait]
impl Executor for FakeExecutor {
    async fn healthcheck(&self) -> Result<(), ExecError> {
        Ok(())
    }

    async fn run(&self, run: &StepRun, logs: Arc<dyn LogSink>, mut stop: StopSignal) -> Result<Outcome, ExecError> {
        let job = &run.job;
        lock(&self.runs).push(job.clone());
        {
            let mut errors = lock(&self.infra_errors);
            if let Some(left) = errors.get_mut(&job.step.name)
                && *left > 0
            {
                *left -= 1;
                return Err(ExecError::Transient(format!("scripted infrastructure error in {}", job.step.name)));
            }
        }
        *lock(&self.live).entry(job.build.clone()).or_default() += 1;
        let attempt = Arc::new(FakeAttempt {
            output: Mutex::new(Vec::new()),
            severed: std::sync::atomic::AtomicBool::new(false),
            state: tokio::sync::watch::Sender::new((0, None)),
        });
        let key = LogKey { build: job.build.clone(), step: job.step.name.clone(), attempt: job.attempt };
        lock(&self.attempts).insert(key, attempt.clone());
        let logs: Arc<dyn LogSink> = Arc::new(Tee { inner: logs, attempt: attempt.clone() });
        let mut env = job.env.clone();
        env.extend(run.secrets.clone());
        let commands = match &job.step.action {
            spec::Action::Run { commands, .. } => commands.clone(),
            spec::Action::Gate(_) => Vec::new(),
        };
        let mut outcome = Outcome::Exited(0);
        'script: for command in commands {
            for line in command.lines() {
                let line = line.trim();
                let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
                match word {
                    "" => {}
                    "echo" => {
                        let (text, stream) = match rest.trim_end().strip_suffix(">&2") {
                            Some(t) => (t.trim_end(), Stream::Stderr),
                            None => (rest, Stream::Stdout),
                        };
                        let text = mask(&format!("{}\n", expand(text, &env)), run.secrets.values().chain(&run.mask));
                        logs.write(stream, text.as_bytes());
                    }
                    "true" => {}
                    "false" => {
                        outcome = Outcome::Exited(1);
                        break 'script;
                    }
                    "exit" => {
                        outcome = Outcome::Exited(rest.trim().parse().unwrap_or(2));
                        break 'script;
                    }
                    "sleep" => {
                        let secs: f64 = rest.trim().parse().unwrap_or(0.0);
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs_f64(secs.max(0.0))) => {}
                            reason = stop.stopped() => {
                                outcome = match reason {
                                    StopReason::Cancelled => Outcome::Cancelled,
                                    StopReason::TimedOut => Outcome::TimedOut,
                                    StopReason::NoOutput => Outcome::NoOutput,
                                };
                                break 'script;
                            }
                        }
                    }
                    other => {
                        logs.write(Stream::Stderr, format!("sh: {other}: not found\n").as_bytes());
                        outcome = Outcome::Exited(127);
                        break 'script;
                    }
                }
            }
        }
        attempt.state.send_modify(|(_, end)| *end = Some(outcome));
        {
            let mut live = lock(&self.live);
            if let Some(n) = live.get_mut(&job.build) {
                *n -= 1;
                if *n == 0 {
                    live.remove(&job.build);
                }
            }
        }
        if attempt.severed.load(std::sync::atomic::Ordering::SeqCst) {
            // Nobody is left to hear it; a later engine reads the outcome through `attach`.
            std::future::pending::<()>().await;
        }
        Ok(outcome)
    }

    async fn attach(
        &self,
        run: &StepRun,
        offset: u64,
        logs: Arc<dyn LogSink>,
        mut stop: StopSignal,
    ) -> Result<Attached, ExecError> {
        let key = LogKey { build: run.job.build.clone(), step: run.job.step.name.clone(), attempt: run.job.attempt };
        let Some(attempt) = lock(&self.attempts).get(&key).cloned() else { return Ok(Attached::Gone) };
        lock(&self.attached).push(key);
        let mut state = attempt.state.subscribe();
        let was_running = state.borrow().1.is_none();
        // Bytes of output (both streams, in order) already handed to the sink.
        let mut sent = 0u64;
        let mut chunks = 0usize;
        loop {
            let end = state.borrow_and_update().1;
            let new: Vec<(Stream, Vec<u8>)> = lock(&attempt.output)[chunks..].to_vec();
            chunks += new.len();
            for (stream, bytes) in new {
                let len = bytes.len() as u64;
                let skip = usize::try_from(offset.saturating_sub(sent).min(len)).unwrap_or(bytes.len());
                if skip < bytes.len() {
                    logs.write(stream, &bytes[skip..]);
                }
                sent += len;
            }
            if let Some(outcome) = end {
                return Ok(Attached::Ended { outcome, was_running });
            }
            tokio::select! {
                changed = state.changed() => if changed.is_err() {
                    return Ok(Attached::Gone);
                },
                reason = stop.stopped() => {
                    let outcome = match reason {
                        StopReason::Cancelled => Outcome::Cancelled,
                        StopReason::TimedOut => Outcome::TimedOut,
                        StopReason::NoOutput => Outcome::NoOutput,
                    };
                    return Ok(Attached::Ended { outcome, was_running });
                }
            }
        }
    }

    async fn start_services(&self, build: &BuildId, services: &[spec::Service]) -> Result<(), (String, ExecError)> {
        for s in services {
            if s.image.contains("broken") {
                return Err((s.name.clone(), ExecError::Permanent(format!("service {} never became ready", s.name))));
            }
        }
        if !services.is_empty() {
            *lock(&self.live).entry(build.clone()).or_default() += 1;
        }
        Ok(())
    }

    fn detach(&self) {
        self.sever();
    }

    async fn cleanup(&self, build: &BuildId) -> Result<(), ExecError> {
        lock(&self.live).remove(build);
        lock(&self.attempts).retain(|k, _| k.build != *build);
        lock(&self.cleaned).push(build.clone());
        Ok(())
    }

    async fn reconcile(&self, live: &[BuildId]) -> Result<usize, ExecError> {
        lock(&self.attempts).retain(|k, _| live.contains(&k.build));
        let mut held = lock(&self.live);
        let before = held.len();
        held.retain(|b, _| live.contains(b));
        Ok(before - held.len())
    }
}

// ---- VCS -----------------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct FakeRepo {
    /// Commit id to (parent, files).
    commits: BTreeMap<String, (Option<String>, BTreeMap<String, String>)>,
    branches: BTreeMap<String, String>,
    permissions: BTreeMap<String, Permission>,
}

/// Repositories in memory, with linear histories: enough for specs, workspaces, comparisons
/// and fast-forwards.
#[derive(Debug, Default)]
pub struct FakeVcs {
    repos: Mutex<BTreeMap<String, FakeRepo>>,
}

impl FakeVcs {
    pub fn new() -> Arc<Self> {
        Arc::new(FakeVcs::default())
    }

    /// Adds a commit on `branch` with these files (the whole tree) and returns its id.
    pub fn commit(&self, repo: &str, branch: &str, files: &[(&str, &str)]) -> String {
        let mut repos = lock(&self.repos);
        let r = repos.entry(repo.to_owned()).or_default();
        let parent = r.branches.get(branch).cloned();
        let id = format!("{:040x}", r.commits.len() + 1);
        let files = files.iter().map(|(p, c)| ((*p).to_owned(), (*c).to_owned())).collect();
        r.commits.insert(id.clone(), (parent, files));
        r.branches.insert(branch.to_owned(), id.clone());
        id
    }

    /// Points `branch` at `commit` (creating the branch), as a push would.
    pub fn set_branch(&self, repo: &str, branch: &str, commit: &str) {
        lock(&self.repos).entry(repo.to_owned()).or_default().branches.insert(branch.to_owned(), commit.to_owned());
    }

    pub fn grant(&self, repo: &str, user: &str, permission: Permission) {
        lock(&self.repos).entry(repo.to_owned()).or_default().permissions.insert(user.to_owned(), permission);
    }

    pub fn branch(&self, repo: &str, branch: &str) -> Option<String> {
        lock(&self.repos).get(repo).and_then(|r| r.branches.get(branch).cloned())
    }
}

impl FakeRepo {
    fn resolve(&self, rev: &str) -> Option<String> {
        self.branches.get(rev).cloned().or_else(|| self.commits.contains_key(rev).then(|| rev.to_owned()))
    }

    fn ancestors(&self, commit: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut at = Some(commit.to_owned());
        while let Some(c) = at {
            at = self.commits.get(&c).and_then(|(p, _)| p.clone());
            out.push(c);
        }
        out
    }
}

#[async_trait]
impl Vcs for FakeVcs {
    async fn read_spec(&self, repo: &str, rev: &str) -> Result<Option<String>, VcsError> {
        let repos = lock(&self.repos);
        let r = repos.get(repo).ok_or_else(|| VcsError::Permanent(format!("no repository {repo}")))?;
        let commit = r.resolve(rev).ok_or_else(|| VcsError::Permanent(format!("no revision {rev} in {repo}")))?;
        Ok(r.commits.get(&commit).and_then(|(_, files)| files.get(spec::FILE_NAME).cloned()))
    }

    async fn prepare_workspace(&self, repo: &str, rev: &str, dest: &Path) -> Result<(), VcsError> {
        let files = {
            let repos = lock(&self.repos);
            let r = repos.get(repo).ok_or_else(|| VcsError::Permanent(format!("no repository {repo}")))?;
            let commit = r.resolve(rev).ok_or_else(|| VcsError::Permanent(format!("no revision {rev} in {repo}")))?;
            r.commits.get(&commit).map(|(_, f)| f.clone()).unwrap_or_default()
        };
        for (path, content) in files {
            let target = dest.join(&path);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| VcsError::Transient(e.to_string()))?;
            }
            std::fs::write(&target, content).map_err(|e| VcsError::Transient(e.to_string()))?;
        }
        Ok(())
    }

    async fn compare(&self, repo: &str, base: &str, head: &str) -> Result<Comparison, VcsError> {
        let repos = lock(&self.repos);
        let r = repos.get(repo).ok_or_else(|| VcsError::Permanent(format!("no repository {repo}")))?;
        let base = r.resolve(base).ok_or_else(|| VcsError::Permanent(format!("no revision {base}")))?;
        let head = r.resolve(head).ok_or_else(|| VcsError::Permanent(format!("no revision {head}")))?;
        let base_line = r.ancestors(&base);
        let head_line = r.ancestors(&head);
        let ahead = head_line.iter().filter(|c| !base_line.contains(c)).count();
        let behind = base_line.iter().filter(|c| !head_line.contains(c)).count();
        Ok(Comparison { ahead: ahead as u32, behind: behind as u32 })
    }

    async fn fast_forward(&self, repo: &str, branch: &str, to: &str) -> Result<(), VcsError> {
        let mut repos = lock(&self.repos);
        let r = repos.get_mut(repo).ok_or_else(|| VcsError::Permanent(format!("no repository {repo}")))?;
        let target = r.resolve(to).ok_or_else(|| VcsError::Permanent(format!("no revision {to}")))?;
        if let Some(current) = r.branches.get(branch)
            && !r.ancestors(&target).contains(current)
        {
            return Err(VcsError::Permanent(format!("{branch} cannot be fast-forwarded to {to}")));
        }
        r.branches.insert(branch.to_owned(), target);
        Ok(())
    }

    async fn resolve(&self, repo: &str, rev: &str) -> Result<String, VcsError> {
        let repos = lock(&self.repos);
        repos
            .get(repo)
            .and_then(|r| r.resolve(rev))
            .ok_or_else(|| VcsError::Permanent(format!("no revision {rev} in {repo}")))
    }

    async fn permission(&self, repo: &str, user: &str) -> Result<Permission, VcsError> {
        let repos = lock(&self.repos);
        Ok(repos.get(repo).and_then(|r| r.permissions.get(user).copied()).unwrap_or(Permission::None))
    }
}

// ---- notifier ------------------------------------------------------------------------------

/// Records every event it is given, keyed by sequence number so that a replay is idempotent.
#[derive(Debug, Default)]
pub struct RecordingNotifier {
    events: Mutex<BTreeMap<u64, Event>>,
    notify: tokio::sync::Notify,
}

impl RecordingNotifier {
    pub fn new() -> Arc<Self> {
        Arc::new(RecordingNotifier::default())
    }

    pub fn events(&self) -> Vec<Event> {
        lock(&self.events).values().cloned().collect()
    }

    /// Waits until an event satisfies `pred`, or the timeout passes.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&Event) -> bool) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            if let Some(e) = lock(&self.events).values().find(|e| pred(e)) {
                return Some(e.clone());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

#[async_trait]
impl Notifier for RecordingNotifier {
    async fn publish(&self, event: &Event) -> Result<(), NotifyError> {
        lock(&self.events).insert(event.seq, event.clone());
        self.notify.notify_waiters();
        Ok(())
    }
}

// ---- store ---------------------------------------------------------------------------------

/// One log in memory: the head, and the tail as a ring that drops its oldest bytes.
#[derive(Debug)]
struct MemoryLog {
    limit: LogLimit,
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    length: u64,
    done: bool,
}

impl MemoryLog {
    fn new(limit: LogLimit) -> Self {
        MemoryLog { limit, head: Vec::new(), tail: Default::default(), length: 0, done: false }
    }

    fn append(&mut self, data: &[u8]) {
        let head_room = usize::try_from(self.limit.head.saturating_sub(self.length)).unwrap_or(usize::MAX);
        let (head, rest) = data.split_at(head_room.min(data.len()));
        self.head.extend_from_slice(head);
        let keep = usize::try_from(self.limit.tail).unwrap_or(usize::MAX);
        // Only the last `keep` bytes of `rest` can survive, so the rest is never copied.
        let rest = &rest[rest.len().saturating_sub(keep)..];
        self.tail.extend(rest);
        let excess = self.tail.len().saturating_sub(keep);
        self.tail.drain(..excess);
        self.length += data.len() as u64;
    }

    fn read(&self, offset: u64, max: usize) -> LogRead {
        let length = self.length;
        let tail_start = length - self.tail.len() as u64;
        let copied = self.limit.read(length, offset, max, |pos, end, data| {
            if pos < self.head.len() as u64 {
                let to = (self.head.len() as u64).min(end);
                data.extend_from_slice(&self.head[pos as usize..to as usize]);
                Ok::<_, std::convert::Infallible>(to)
            } else {
                data.extend(self.tail.range((pos - tail_start) as usize..(end - tail_start) as usize));
                Ok(end)
            }
        });
        let (data, next_offset) = match copied {
            Ok(read) => read,
            Err(never) => match never {},
        };
        LogRead { data, next_offset, complete: self.done && next_offset == length }
    }
}

/// One build in memory, with its steps and the sequence number that first recorded each.
#[derive(Debug)]
struct MemoryBuild {
    summary: BuildSummary,
    steps: Vec<(u64, StepRecord)>,
}

#[derive(Debug, Default)]
struct Memory {
    inputs: BTreeMap<u64, StoredInput>,
    journal_writes: usize,
    last_input: u64,
    snapshot: Option<(u64, Vec<u8>)>,
    /// The input that enqueued each build.
    enqueues: BTreeMap<BuildId, StoredInput>,
    events: BTreeMap<u64, Event>,
    logs: BTreeMap<LogKey, MemoryLog>,
    log_times: BTreeMap<LogKey, BTreeMap<u64, Timestamp>>,
    /// Each delivery, with its bookkeeping and its body's digest.
    deliveries: BTreeMap<String, (Delivery, DeliveryInfo, Vec<u8>)>,
    builds: BTreeMap<BuildId, MemoryBuild>,
    /// Outgoing webhook receivers' cursors, by receiver name.
    webhook_cursors: BTreeMap<String, u64>,
}

impl Memory {
    fn apply(&mut self, seq: u64, update: BuildUpdate) {
        match update {
            BuildUpdate::Queued(summary) => {
                self.builds.entry(summary.id.clone()).or_insert(MemoryBuild { summary, steps: Vec::new() });
            }
            BuildUpdate::Status { build, status, at } => {
                let Some(b) = self.builds.get_mut(&build) else { return };
                let summary = &mut b.summary;
                if summary.status.is_finished() {
                    return;
                }
                summary.status = status;
                if status == BuildStatus::Running && summary.started_at.is_none() {
                    summary.started_at = Some(at);
                }
                if status.is_finished() {
                    summary.finished_at = Some(at);
                }
            }
            BuildUpdate::Step { build, step } => {
                let Some(b) = self.builds.get_mut(&build) else { return };
                match b.steps.iter_mut().find(|(_, s)| s.name == step.name && s.attempt == step.attempt) {
                    Some((_, stored)) => {
                        stored.status = step.status;
                        stored.detail = step.detail.or(stored.detail.take());
                        stored.started_at = stored.started_at.or(step.started_at);
                        stored.finished_at = step.finished_at.or(stored.finished_at);
                    }
                    None => b.steps.push((seq, step)),
                }
            }
        }
    }
}

/// A store in memory: what a process keeps when it does not need to survive itself.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Memory>,
    log_limit: LogLimit,
}

impl MemoryStore {
    pub fn new() -> Arc<Self> {
        Arc::new(MemoryStore::default())
    }

    /// A store that keeps at most `limit` bytes of each log.
    pub fn with_log_limit(limit: u64) -> Arc<Self> {
        Arc::new(MemoryStore { inner: Mutex::default(), log_limit: LogLimit::new(limit) })
    }

    /// How many inputs are stored.
    pub fn input_count(&self) -> usize {
        lock(&self.inner).inputs.len()
    }

    /// How many times [`Store::append_journal`] was called: the engine's writes of batches.
    pub fn journal_writes(&self) -> usize {
        lock(&self.inner).journal_writes
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn append_input(&self, input: &StoredInput) -> Result<u64, StoreError> {
        let mut m = lock(&self.inner);
        m.last_input += 1;
        let seq = m.last_input;
        m.inputs.insert(seq, input.clone());
        if let Input::Enqueue { build, .. } = &input.input {
            m.enqueues.entry(build.clone()).or_insert_with(|| input.clone());
        }
        Ok(seq)
    }

    async fn inputs_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, StoredInput)>, StoreError> {
        let m = lock(&self.inner);
        Ok(m.inputs.range(after.saturating_add(1)..).take(limit).map(|(seq, s)| (*seq, s.clone())).collect())
    }

    async fn save_snapshot(&self, seq: u64, data: &[u8]) -> Result<(), StoreError> {
        let mut m = lock(&self.inner);
        m.snapshot = Some((seq, data.to_vec()));
        m.inputs.retain(|s, _| *s > seq);
        Ok(())
    }

    async fn latest_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(lock(&self.inner).snapshot.clone())
    }

    async fn enqueued(&self, build: &BuildId) -> Result<Option<StoredInput>, StoreError> {
        Ok(lock(&self.inner).enqueues.get(build).cloned())
    }

    async fn append_journal(&self, inputs: &[StoredInput], events: &[Event]) -> Result<Option<u64>, StoreError> {
        lock(&self.inner).journal_writes += 1;
        let mut last = None;
        for input in inputs {
            last = Some(self.append_input(input).await?);
        }
        self.append_events(events).await?;
        Ok(last)
    }

    async fn append_events(&self, events: &[Event]) -> Result<(), StoreError> {
        let mut m = lock(&self.inner);
        for e in events {
            if m.events.contains_key(&e.seq) {
                continue;
            }
            m.events.insert(e.seq, e.clone());
            if let Some(update) = BuildUpdate::from_event(e) {
                m.apply(e.seq, update);
            }
        }
        Ok(())
    }

    async fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let m = lock(&self.inner);
        Ok(m.events.range(after.saturating_add(1)..).take(limit).map(|(_, e)| e.clone()).collect())
    }

    async fn append_log(&self, key: &LogKey, data: &[u8]) -> Result<u64, StoreError> {
        let mut m = lock(&self.inner);
        let log = m.logs.entry(key.clone()).or_insert_with(|| MemoryLog::new(self.log_limit));
        if log.done {
            return Err(StoreError::Permanent(format!(
                "the log of {}/{}#{} is finished",
                key.build, key.step, key.attempt
            )));
        }
        log.append(data);
        Ok(log.length)
    }

    async fn finish_log(&self, key: &LogKey) -> Result<(), StoreError> {
        lock(&self.inner).logs.entry(key.clone()).or_insert_with(|| MemoryLog::new(self.log_limit)).done = true;
        Ok(())
    }

    async fn mark_log_time(&self, key: &LogKey, offset: u64, at: Timestamp) -> Result<(), StoreError> {
        lock(&self.inner).log_times.entry(key.clone()).or_default().entry(offset).or_insert(at);
        Ok(())
    }

    async fn log_times(&self, key: &LogKey, from: u64, limit: usize) -> Result<Vec<(u64, Timestamp)>, StoreError> {
        let m = lock(&self.inner);
        Ok(m.log_times
            .get(key)
            .map(|t| t.range(from..).take(limit).map(|(o, a)| (*o, *a)).collect())
            .unwrap_or_default())
    }

    async fn read_log(&self, key: &LogKey, offset: u64, max: usize) -> Result<LogRead, StoreError> {
        let m = lock(&self.inner);
        Ok(match m.logs.get(key) {
            Some(log) => log.read(offset, max),
            None => LogRead { data: Vec::new(), next_offset: 0, complete: false },
        })
    }

    async fn insert_delivery(&self, delivery: &Delivery) -> Result<bool, StoreError> {
        Ok(self.insert_delivery_once(delivery, b"", Timestamp(u64::MAX), None).await? == Intake::New)
    }

    async fn insert_delivery_once(
        &self,
        delivery: &Delivery,
        digest: &[u8],
        since: Timestamp,
        done: Option<&str>,
    ) -> Result<Intake, StoreError> {
        let mut m = lock(&self.inner);
        // The body is looked at first, as SQLite's does: a replay is a replay under any id.
        if !digest.is_empty()
            && m.deliveries.values().any(|(d, _, dg)| dg.as_slice() == digest && d.received_at >= since)
        {
            return Ok(Intake::DuplicateBody);
        }
        if m.deliveries.contains_key(&delivery.id) {
            return Ok(Intake::DuplicateId);
        }
        let info = DeliveryInfo {
            id: delivery.id.clone(),
            source: delivery.source.clone(),
            event: delivery.event.clone(),
            received_at: delivery.received_at,
            state: if done.is_some() { DeliveryState::Done } else { DeliveryState::Pending },
            attempts: 0,
            next_attempt_at: Timestamp(0),
            reason: done.map(str::to_owned),
        };
        m.deliveries.insert(delivery.id.clone(), (delivery.clone(), info, digest.to_vec()));
        Ok(Intake::New)
    }

    async fn delivery(&self, id: &str) -> Result<Option<Delivery>, StoreError> {
        Ok(lock(&self.inner).deliveries.get(id).map(|(d, _, _)| d.clone()))
    }

    async fn pending_deliveries(&self, limit: usize) -> Result<Vec<Delivery>, StoreError> {
        Ok(self.due_deliveries(Timestamp(u64::MAX), limit).await?.into_iter().map(|(d, _)| d).collect())
    }

    async fn due_deliveries(&self, now: Timestamp, limit: usize) -> Result<Vec<(Delivery, u32)>, StoreError> {
        let m = lock(&self.inner);
        let mut pending: Vec<(&Delivery, u32)> = m
            .deliveries
            .values()
            .filter(|(_, i, _)| i.state == DeliveryState::Pending && i.next_attempt_at <= now)
            .map(|(d, i, _)| (d, i.attempts))
            .collect();
        pending.sort_by(|(a, _), (b, _)| (a.received_at, &a.id).cmp(&(b.received_at, &b.id)));
        Ok(pending.into_iter().take(limit).map(|(d, n)| (d.clone(), n)).collect())
    }

    async fn mark_delivery_done(&self, id: &str) -> Result<(), StoreError> {
        self.finish_delivery(id, DeliveryOutcome::Done { reason: None }).await
    }

    async fn finish_delivery(&self, id: &str, outcome: DeliveryOutcome) -> Result<(), StoreError> {
        if let Some((_, info, _)) = lock(&self.inner).deliveries.get_mut(id) {
            match outcome {
                DeliveryOutcome::Done { reason } => {
                    info.state = DeliveryState::Done;
                    info.reason = reason;
                }
                DeliveryOutcome::Retry { at, reason } => {
                    info.attempts += 1;
                    info.next_attempt_at = at;
                    info.reason = Some(reason);
                }
                DeliveryOutcome::Dead { reason } => {
                    info.attempts += 1;
                    info.state = DeliveryState::Dead;
                    info.reason = Some(reason);
                }
            }
        }
        Ok(())
    }

    async fn deliveries(&self, state: Option<DeliveryState>, limit: usize) -> Result<Vec<DeliveryInfo>, StoreError> {
        let m = lock(&self.inner);
        let mut found: Vec<&DeliveryInfo> =
            m.deliveries.values().map(|(_, i, _)| i).filter(|i| state.is_none_or(|s| i.state == s)).collect();
        found.sort_by(|a, b| (b.received_at, &b.id).cmp(&(a.received_at, &a.id)));
        Ok(found.into_iter().take(limit).cloned().collect())
    }

    async fn redeliver(&self, id: &str) -> Result<bool, StoreError> {
        Ok(match lock(&self.inner).deliveries.get_mut(id) {
            Some((_, info, _)) => {
                info.state = DeliveryState::Pending;
                info.attempts = 0;
                info.next_attempt_at = Timestamp(0);
                true
            }
            None => false,
        })
    }

    async fn inbox_depth(&self) -> Result<InboxDepth, StoreError> {
        let m = lock(&self.inner);
        let mut depth = InboxDepth::default();
        for (_, info, _) in m.deliveries.values() {
            match info.state {
                DeliveryState::Pending => {
                    depth.pending += 1;
                    depth.oldest_pending =
                        Some(depth.oldest_pending.map_or(info.received_at, |o| o.min(info.received_at)));
                }
                DeliveryState::Dead => depth.dead += 1,
                DeliveryState::Done => {}
            }
        }
        Ok(depth)
    }

    async fn builds(&self, filter: &BuildFilter, page: Page) -> Result<Vec<BuildSummary>, StoreError> {
        let m = lock(&self.inner);
        let mut found: Vec<&BuildSummary> = m
            .builds
            .values()
            .map(|b| &b.summary)
            .filter(|b| filter.repo.as_ref().is_none_or(|r| *r == b.repo))
            .filter(|b| filter.branch.is_none() || filter.branch == b.branch)
            .filter(|b| filter.commit.as_ref().is_none_or(|c| *c == b.commit))
            .filter(|b| filter.statuses.is_empty() || filter.statuses.contains(&b.status))
            .filter(|b| filter.queued_from.is_none_or(|t| b.queued_at >= t))
            .filter(|b| filter.queued_until.is_none_or(|t| b.queued_at < t))
            .filter(|b| page.after.as_ref().is_none_or(|c| b.cursor() < *c))
            .collect();
        found.sort_by_key(|b| std::cmp::Reverse(b.cursor()));
        Ok(found.into_iter().take(page.limit).cloned().collect())
    }

    async fn build(&self, id: &BuildId) -> Result<Option<BuildRecord>, StoreError> {
        let m = lock(&self.inner);
        Ok(m.builds.get(id).map(|b| {
            let mut steps = b.steps.clone();
            steps.sort_by_key(|(seq, s)| (*seq, s.attempt));
            BuildRecord { build: b.summary.clone(), steps: steps.into_iter().map(|(_, s)| s).collect() }
        }))
    }

    async fn last_event_seq(&self) -> Result<u64, StoreError> {
        Ok(lock(&self.inner).events.keys().next_back().copied().unwrap_or(0))
    }

    async fn webhook_cursor(&self, receiver: &str) -> Result<Option<u64>, StoreError> {
        Ok(lock(&self.inner).webhook_cursors.get(receiver).copied())
    }

    async fn advance_webhook_cursor(&self, receiver: &str, seq: u64) -> Result<(), StoreError> {
        let mut m = lock(&self.inner);
        let cursor = m.webhook_cursors.entry(receiver.to_owned()).or_insert(seq);
        *cursor = (*cursor).max(seq);
        Ok(())
    }
}

/// An input that enqueues `build` of pipeline `test` of `spec`, on a push to `master` of
/// `conformance/repo`, for tests of stores and engines.
pub fn enqueue_input(build: &str, spec: &str) -> Input {
    Input::Enqueue {
        build: BuildId::from(build),
        spec: Arc::from(spec),
        pipeline: "test".into(),
        context: conformance_job(build, "step", "busybox", &[]).context,
        only: None,
        variables: BTreeMap::from([("A".to_owned(), "1".to_owned())]),
    }
}

// ---- conformance suites --------------------------------------------------------------------

/// A job for the executor conformance suite, with the image the backend runs commands in.
pub fn conformance_job(build: &str, step: &str, image: &str, commands: &[&str]) -> StepJob {
    let spec_step = spec::Step {
        name: step.to_owned(),
        action: spec::Action::Run {
            image: image.to_owned(),
            commands: commands.iter().map(|c| (*c).to_owned()).collect(),
        },
        env: BTreeMap::new(),
        secrets: Vec::new(),
        workdir: None,
        timeout: None,
        no_output_timeout: None,
        retry: spec::RetryPolicy::default(),
        network: spec::Network::Bridge,
        limits: spec::Limits::default(),
        depends_on: Vec::new(),
        when: spec::Condition::default(),
        services: Vec::new(),
        resources: Vec::new(),
        allow_failure: false,
        isolated: false,
        matrix: None,
        artifacts: None,
        needs_artifacts: Vec::new(),
        cache: Vec::new(),
        runs_on: None,
    };
    StepJob {
        build: BuildId::from(build),
        pipeline: "conformance".into(),
        step: spec_step,
        attempt: 1,
        context: BuildContext {
            repo: "conformance/repo".into(),
            commit: "0000000000000000000000000000000000000001".into(),
            branch: Some("master".into()),
            pull_request: None,
            event: spec::TriggerEvent::push("master"),
            actor: None,
            trusted: true,
            upstream: None,
        },
        env: BTreeMap::new(),
        resources: Vec::new(),
        upcoming: Vec::new(),
    }
}

/// Collects what an executor writes, for the conformance suite.
#[derive(Debug, Default)]
pub struct CollectingSink {
    out: Mutex<Vec<(Stream, Vec<u8>)>>,
}

impl CollectingSink {
    pub fn new() -> Arc<Self> {
        Arc::new(CollectingSink::default())
    }

    pub fn text(&self, stream: Stream) -> String {
        let out = lock(&self.out);
        String::from_utf8_lossy(
            &out.iter().filter(|(s, _)| *s == stream).flat_map(|(_, b)| b.clone()).collect::<Vec<u8>>(),
        )
        .into_owned()
    }
}

impl LogSink for CollectingSink {
    fn write(&self, stream: Stream, bytes: &[u8]) {
        lock(&self.out).push((stream, bytes.to_vec()));
    }
}

fn check(ok: bool, what: impl Into<String>) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what.into()) }
}

/// What every [`Executor`] must do. `image` is an image the backend can run `sh` in; `workspace`
/// an empty directory. Returns the first broken promise.
pub async fn executor_conformance(executor: Arc<dyn Executor>, image: &str, workspace: &Path) -> Result<(), String> {
    executor.healthcheck().await.map_err(|e| format!("healthcheck: {e}"))?;
    let run = |job: StepJob, secrets: BTreeMap<String, String>| StepRun {
        job,
        secrets,
        mask: Vec::new(),
        workspace: workspace.to_path_buf(),
    };
    let no_stop = || StopSignal::new();

    // Output reaches the sink, on the right stream, and the exit code is the outcome.
    let sink = CollectingSink::new();
    let (_keep, stop) = no_stop();
    let job = conformance_job("conf-1", "hello", image, &["echo hello", "echo oops >&2", "exit 3"]);
    let outcome = executor.run(&run(job, BTreeMap::new()), sink.clone(), stop).await.map_err(|e| e.to_string())?;
    check(outcome == Outcome::Exited(3), format!("exit 3 gave {outcome:?}"))?;
    check(sink.text(Stream::Stdout).contains("hello"), format!("stdout was {:?}", sink.text(Stream::Stdout)))?;
    check(sink.text(Stream::Stderr).contains("oops"), format!("stderr was {:?}", sink.text(Stream::Stderr)))?;

    // Commands stop at the first failure, as with `sh -e`.
    let sink = CollectingSink::new();
    let (_keep, stop) = no_stop();
    let job = conformance_job("conf-2", "stops", image, &["false", "echo unreachable"]);
    let outcome = executor.run(&run(job, BTreeMap::new()), sink.clone(), stop).await.map_err(|e| e.to_string())?;
    check(outcome == Outcome::Exited(1), format!("false gave {outcome:?}"))?;
    check(!sink.text(Stream::Stdout).contains("unreachable"), "a command ran after a failure")?;

    // Environment variables arrive; secret values arrive too but never reach the sink, and
    // neither do the build's other secrets, which the step does not get.
    let sink = CollectingSink::new();
    let (_keep, stop) = no_stop();
    let mut job = conformance_job(
        "conf-3",
        "env",
        image,
        &["echo \"greeting=$GREETING\"", "echo \"token=$API_TOKEN\"", "echo other=other-s3cr3t"],
    );
    job.env.insert("GREETING".into(), "bonjour".into());
    job.step.secrets = vec!["API_TOKEN".into()];
    let secrets = BTreeMap::from([("API_TOKEN".to_owned(), "s3cr3t-value".to_owned())]);
    let mut with_mask = run(job, secrets);
    with_mask.mask = vec!["other-s3cr3t".to_owned()];
    let outcome = executor.run(&with_mask, sink.clone(), stop).await.map_err(|e| e.to_string())?;
    let out = sink.text(Stream::Stdout);
    check(outcome == Outcome::Exited(0), format!("env step gave {outcome:?}"))?;
    check(out.contains("greeting=bonjour"), format!("env not passed: {out:?}"))?;
    check(out.contains("token=***") && !out.contains("s3cr3t-value"), format!("secret not masked: {out:?}"))?;
    check(out.contains("other=***") && !out.contains("other-s3cr3t"), format!("build secret not masked: {out:?}"))?;

    // A stop ends a running step promptly with the reason asked.
    let sink = CollectingSink::new();
    let (handle, stop) = StopSignal::new();
    let job = conformance_job("conf-4", "sleeper", image, &["echo started", "sleep 60"]);
    let started = std::time::Instant::now();
    let stopper = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        handle.stop(StopReason::Cancelled);
    };
    let sleeper = run(job, BTreeMap::new());
    let (outcome, ()) = tokio::join!(executor.run(&sleeper, sink.clone(), stop), stopper);
    let outcome = outcome.map_err(|e| e.to_string())?;
    check(outcome == Outcome::Cancelled, format!("stop gave {outcome:?}"))?;
    check(started.elapsed() < Duration::from_secs(30), format!("stop took {:?}", started.elapsed()))?;

    // A stop asked before the step runs ends it at once, and its reason is the outcome.
    let (handle, stop) = StopSignal::new();
    handle.stop(StopReason::TimedOut);
    let job = conformance_job("conf-5", "late", image, &["sleep 60"]);
    let started = std::time::Instant::now();
    let outcome =
        executor.run(&run(job, BTreeMap::new()), CollectingSink::new(), stop).await.map_err(|e| e.to_string())?;
    check(outcome == Outcome::TimedOut, format!("an early timeout gave {outcome:?}"))?;
    check(started.elapsed() < Duration::from_secs(30), format!("an early stop took {:?}", started.elapsed()))?;

    // Cleanup and reconcile leave nothing of these builds, and may be repeated.
    for build in ["conf-1", "conf-2", "conf-3", "conf-4", "conf-5"] {
        executor.cleanup(&BuildId::from(build)).await.map_err(|e| format!("cleanup: {e}"))?;
        executor.cleanup(&BuildId::from(build)).await.map_err(|e| format!("second cleanup: {e}"))?;
    }
    executor.reconcile(&[]).await.map_err(|e| format!("reconcile: {e}"))?;
    Ok(())
}

/// What every [`Store`] must do. `store` must be empty. Returns the first broken promise.
pub async fn store_conformance(store: Arc<dyn Store>) -> Result<(), String> {
    let err = |e: StoreError| e.to_string();
    // The journal numbers inputs from 1, in order, and pages.
    for i in 0..5u64 {
        let seq = store
            .append_input(&StoredInput { at: Timestamp(i), input: crate::pipeline::Input::Tick })
            .await
            .map_err(err)?;
        check(seq == i + 1, format!("input {i} got sequence {seq}"))?;
    }
    let page = store.inputs_after(1, 2).await.map_err(err)?;
    check(page.iter().map(|(s, _)| *s).collect::<Vec<_>>() == [2, 3], format!("page after 1: {page:?}"))?;
    check(page[0].1.at == Timestamp(1), "inputs keep their time")?;
    check(store.inputs_after(5, 10).await.map_err(err)?.is_empty(), "nothing after the last input")?;

    // A snapshot replaces the inputs it covers; numbering goes on, and the newest one is read.
    check(store.latest_snapshot().await.map_err(err)?.is_none(), "an empty store has no snapshot")?;
    store.save_snapshot(3, b"first").await.map_err(err)?;
    let left: Vec<u64> = store.inputs_after(0, 10).await.map_err(err)?.into_iter().map(|(s, _)| s).collect();
    check(left == [4, 5], format!("inputs left after a snapshot at 3: {left:?}"))?;
    let seq = store.append_input(&StoredInput { at: Timestamp(6), input: Input::Tick }).await.map_err(err)?;
    check(seq == 6, format!("the input after a snapshot got sequence {seq}, not 6"))?;
    store.save_snapshot(5, b"second").await.map_err(err)?;
    let newest = store.latest_snapshot().await.map_err(err)?;
    check(newest == Some((5, b"second".to_vec())), format!("the newest snapshot: {newest:?}"))?;
    let left: Vec<u64> = store.inputs_after(0, 10).await.map_err(err)?.into_iter().map(|(s, _)| s).collect();
    check(left == [6], format!("inputs left after a snapshot at 5: {left:?}"))?;

    // The input that enqueued a build outlives the journal, with its spec text intact; the
    // same spec enqueued twice reads back the same.
    let spec_text = "pipelines:\n  test:\n    steps:\n      - name: unit\n        run: true\n";
    let enqueue = |build: &str| StoredInput { at: Timestamp(7), input: enqueue_input(build, spec_text) };
    let first = store.append_input(&enqueue("e1")).await.map_err(err)?;
    store.append_input(&enqueue("e2")).await.map_err(err)?;
    let replayed = store.inputs_after(first - 1, 10).await.map_err(err)?;
    check(
        replayed.len() == 2 && replayed[0].1 == enqueue("e1") && replayed[1].1 == enqueue("e2"),
        format!("enqueues read back from the journal: {replayed:?}"),
    )?;
    store.save_snapshot(first + 1, b"third").await.map_err(err)?;
    let kept = store.enqueued(&BuildId::from("e2")).await.map_err(err)?;
    check(kept == Some(enqueue("e2")), format!("the enqueue of e2 after the snapshot: {kept:?}"))?;
    check(store.enqueued(&BuildId::from("nope")).await.map_err(err)?.is_none(), "an unknown build's enqueue")?;

    // Events are kept once per sequence number.
    check(store.last_event_seq().await.map_err(err)? == 0, "an empty store's last event is 0")?;
    let event = |seq: u64| Event {
        seq,
        at: Timestamp(seq),
        body: crate::event::EventBody::BuildStarted { build: BuildId::from("b") },
    };
    store.append_events(&[event(1), event(2)]).await.map_err(err)?;
    store.append_events(&[event(2), event(3)]).await.map_err(err)?;
    let events = store.events_after(0, 10).await.map_err(err)?;
    check(events.iter().map(|e| e.seq).collect::<Vec<_>>() == [1, 2, 3], format!("events: {events:?}"))?;
    check(store.events_after(2, 10).await.map_err(err)?.len() == 1, "events after 2")?;
    let last = store.last_event_seq().await.map_err(err)?;
    check(last == 3, format!("the last event is 3, not {last}"))?;

    // Logs grow by appends and are read from any offset; finishing marks the end.
    let key = LogKey { build: BuildId::from("b"), step: "s".into(), attempt: 1 };
    check(store.append_log(&key, b"hello ").await.map_err(err)? == 6, "log length after one append")?;
    check(store.append_log(&key, b"world\n").await.map_err(err)? == 12, "log length after two appends")?;
    let read = store.read_log(&key, 6, 100).await.map_err(err)?;
    check(read.data == b"world\n" && read.next_offset == 12 && !read.complete, format!("read from 6: {read:?}"))?;
    let read = store.read_log(&key, 0, 5).await.map_err(err)?;
    check(read.data == b"hello" && read.next_offset == 5, format!("read 5 bytes: {read:?}"))?;
    // Time marks, when the store keeps them, come back in order from any offset.
    store.mark_log_time(&key, 0, Timestamp(1_000)).await.map_err(err)?;
    store.mark_log_time(&key, 6, Timestamp(2_000)).await.map_err(err)?;
    store.mark_log_time(&key, 6, Timestamp(9_000)).await.map_err(err)?;
    let marks = store.log_times(&key, 0, 10).await.map_err(err)?;
    check(
        marks.is_empty() || marks == [(0, Timestamp(1_000)), (6, Timestamp(2_000))],
        format!("time marks: {marks:?}"),
    )?;
    if !marks.is_empty() {
        let later = store.log_times(&key, 1, 10).await.map_err(err)?;
        check(later == [(6, Timestamp(2_000))], format!("time marks from offset 1: {later:?}"))?;
    }
    store.finish_log(&key).await.map_err(err)?;
    let read = store.read_log(&key, 12, 100).await.map_err(err)?;
    check(read.data.is_empty() && read.complete, format!("read at the end of a finished log: {read:?}"))?;
    let other = LogKey { attempt: 2, ..key.clone() };
    let read = store.read_log(&other, 0, 100).await.map_err(err)?;
    check(read.data.is_empty() && !read.complete, "an unknown log reads empty")?;

    // A delivery is stored once; a second copy does not replace the first.
    let delivery = |body: &[u8]| Delivery {
        id: "d-1".into(),
        source: "github".into(),
        event: "push".into(),
        received_at: Timestamp(1),
        body: body.to_vec(),
    };
    check(store.insert_delivery(&delivery(b"first")).await.map_err(err)?, "a new delivery is new")?;
    check(!store.insert_delivery(&delivery(b"second")).await.map_err(err)?, "a repeated delivery is not new")?;
    let kept = store.delivery("d-1").await.map_err(err)?;
    check(kept.map(|d| d.body) == Some(b"first".to_vec()), "the first copy of a delivery is kept")?;

    // Concurrent copies of one delivery: exactly one is new.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let d = Delivery {
                id: "d-race".into(),
                source: "github".into(),
                event: "push".into(),
                received_at: Timestamp(i),
                body: vec![],
            };
            store.insert_delivery(&d).await
        }));
    }
    let mut new = 0;
    for t in tasks {
        if t.await.map_err(|e| e.to_string())?.map_err(err)? {
            new += 1;
        }
    }
    check(new == 1, format!("{new} of 20 concurrent copies were stored as new"))?;

    // Deliveries stay pending, oldest first, until marked done; a done one is still not new.
    let at = |id: &str, t: u64| Delivery { id: id.into(), received_at: Timestamp(t), ..delivery(b"") };
    check(store.insert_delivery(&at("d-0", 0)).await.map_err(err)?, "an early delivery is new")?;
    check(store.insert_delivery(&at("d-2", 1)).await.map_err(err)?, "a delivery received with d-1 is new")?;
    // (`d-race` was received at a random time, so it is left out of the order.)
    let ids = |v: Vec<Delivery>| v.into_iter().map(|d| d.id).filter(|id| id != "d-race").collect::<Vec<_>>();
    let pending = ids(store.pending_deliveries(10).await.map_err(err)?);
    check(pending == ["d-0", "d-1", "d-2"], format!("pending: {pending:?}"))?;
    check(ids(store.pending_deliveries(1).await.map_err(err)?) == ["d-0"], "the oldest pending delivery")?;
    store.mark_delivery_done("d-1").await.map_err(err)?;
    store.mark_delivery_done("d-1").await.map_err(err)?;
    store.mark_delivery_done("no-such-delivery").await.map_err(err)?;
    let pending = ids(store.pending_deliveries(10).await.map_err(err)?);
    check(pending == ["d-0", "d-2"], format!("pending after d-1 is done: {pending:?}"))?;
    check(!store.insert_delivery(&delivery(b"again")).await.map_err(err)?, "a done delivery is not new again")?;
    check(store.delivery("d-1").await.map_err(err)?.is_some(), "a done delivery stays stored")?;

    // A finished log takes no more output.
    let refused = store.append_log(&key, b"late").await;
    check(
        refused.as_ref().is_err_and(|e| e.kind() == ErrorKind::Permanent),
        format!("appending to a finished log gave {refused:?}"),
    )?;
    let never = LogKey { step: "never-ran".into(), ..key.clone() };
    store.finish_log(&never).await.map_err(err)?;
    let read = store.read_log(&never, 0, 100).await.map_err(err)?;
    check(read.data.is_empty() && read.complete, format!("a finished empty log: {read:?}"))?;

    inbox_conformance(store.as_ref()).await?;
    webhook_cursor_conformance(store.as_ref()).await?;
    build_records_conformance(store.as_ref()).await
}

/// Outgoing webhook receivers' cursors: absent until set, one per receiver, never moving back.
async fn webhook_cursor_conformance(store: &dyn Store) -> Result<(), String> {
    let err = |e: StoreError| e.to_string();
    check(store.webhook_cursor("chat").await.map_err(err)?.is_none(), "an unknown receiver has no cursor")?;
    store.advance_webhook_cursor("chat", 0).await.map_err(err)?;
    let cursor = store.webhook_cursor("chat").await.map_err(err)?;
    check(cursor == Some(0), format!("a cursor set at 0 is there, at 0: {cursor:?}"))?;
    store.advance_webhook_cursor("chat", 5).await.map_err(err)?;
    store.advance_webhook_cursor("dashboard", 2).await.map_err(err)?;
    store.advance_webhook_cursor("chat", 3).await.map_err(err)?;
    let cursor = store.webhook_cursor("chat").await.map_err(err)?;
    check(cursor == Some(5), format!("a cursor never moves back: {cursor:?}"))?;
    let other = store.webhook_cursor("dashboard").await.map_err(err)?;
    check(other == Some(2), format!("each receiver has its own cursor: {other:?}"))?;
    store.advance_webhook_cursor("chat", 6).await.map_err(err)?;
    let cursor = store.webhook_cursor("chat").await.map_err(err)?;
    check(cursor == Some(6), format!("a cursor moves forward: {cursor:?}"))?;
    check(store.webhook_cursor("Chat").await.map_err(err)?.is_none(), "receiver names are compared exactly")?;
    Ok(())
}

/// The inbox's bookkeeping: replays by body, retries when due, dead deliveries, redelivery.
async fn inbox_conformance(store: &dyn Store) -> Result<(), String> {
    let err = |e: StoreError| e.to_string();
    let at = |id: &str, t: u64, body: &[u8]| Delivery {
        id: id.into(),
        source: "github".into(),
        event: "push".into(),
        received_at: Timestamp(t),
        body: body.to_vec(),
    };
    let since = Timestamp(1_000);
    let first = store.insert_delivery_once(&at("i-1", 2_000, b"one"), b"digest-one", since, None).await.map_err(err)?;
    check(first == Intake::New, format!("a new delivery: {first:?}"))?;
    let again = store.insert_delivery_once(&at("i-1", 2_001, b"two"), b"digest-two", since, None).await.map_err(err)?;
    check(again == Intake::DuplicateId, format!("the same id again: {again:?}"))?;
    let replay =
        store.insert_delivery_once(&at("i-2", 2_002, b"one"), b"digest-one", since, None).await.map_err(err)?;
    check(replay == Intake::DuplicateBody, format!("the same body under a new id: {replay:?}"))?;
    check(store.delivery("i-2").await.map_err(err)?.is_none(), "a replay is not stored")?;
    let later = Timestamp(3_000);
    let old = store.insert_delivery_once(&at("i-3", 3_000, b"one"), b"digest-one", later, None).await.map_err(err)?;
    check(old == Intake::New, format!("the same body after the window: {old:?}"))?;
    let settled = store
        .insert_delivery_once(&at("i-4", 3_000, b"four"), b"digest-four", since, Some("ignored"))
        .await
        .map_err(err)?;
    check(settled == Intake::New, format!("a delivery stored done: {settled:?}"))?;
    let done = store.deliveries(Some(DeliveryState::Done), 100).await.map_err(err)?;
    check(
        done.iter().any(|d| d.id == "i-4" && d.reason.as_deref() == Some("ignored") && d.attempts == 0),
        format!("a delivery stored done is done with its reason: {done:?}"),
    )?;

    let due = |v: Vec<(Delivery, u32)>| {
        v.into_iter().map(|(d, _)| d.id).filter(|id| id.starts_with("i-")).collect::<Vec<_>>()
    };
    check(due(store.due_deliveries(Timestamp(5_000), 100).await.map_err(err)?) == ["i-1", "i-3"], "both are due")?;
    let retry = DeliveryOutcome::Retry { at: Timestamp(10_000), reason: "busy".into() };
    store.finish_delivery("i-1", retry).await.map_err(err)?;
    let now = due(store.due_deliveries(Timestamp(5_000), 100).await.map_err(err)?);
    check(now == ["i-3"], format!("a delivery waiting for its retry is not due: {now:?}"))?;
    let then = store.due_deliveries(Timestamp(10_000), 100).await.map_err(err)?;
    check(
        then.iter().any(|(d, attempts)| d.id == "i-1" && *attempts == 1),
        format!("it is due at its time, with its attempt counted: {then:?}"),
    )?;
    let then = due(then);
    check(then == ["i-1", "i-3"], format!("it is due at its time: {then:?}"))?;
    store.finish_delivery("i-1", DeliveryOutcome::Dead { reason: "gone for good".into() }).await.map_err(err)?;
    store.finish_delivery("i-3", DeliveryOutcome::Done { reason: Some("not served".into()) }).await.map_err(err)?;
    store.finish_delivery("no-such", DeliveryOutcome::Done { reason: None }).await.map_err(err)?;
    check(due(store.due_deliveries(Timestamp(u64::MAX), 100).await.map_err(err)?).is_empty(), "nothing is due")?;
    let dead = store.deliveries(Some(DeliveryState::Dead), 100).await.map_err(err)?;
    let dead: Vec<&DeliveryInfo> = dead.iter().filter(|d| d.id.starts_with("i-")).collect();
    check(
        dead.len() == 1
            && dead[0].id == "i-1"
            && dead[0].attempts == 2
            && dead[0].reason.as_deref() == Some("gone for good"),
        format!("the dead delivery with its attempts and reason: {dead:?}"),
    )?;
    let done = store.deliveries(Some(DeliveryState::Done), 100).await.map_err(err)?;
    check(
        done.iter().any(|d| d.id == "i-3" && d.reason.as_deref() == Some("not served")),
        format!("the done delivery with its reason: {done:?}"),
    )?;
    let depth = store.inbox_depth().await.map_err(err)?;
    check(depth.dead >= 1, format!("the dead delivery is counted: {depth:?}"))?;
    check(store.redeliver("i-1").await.map_err(err)?, "a known delivery is redelivered")?;
    check(!store.redeliver("no-such").await.map_err(err)?, "an unknown one is not")?;
    let again = due(store.due_deliveries(Timestamp(0), 100).await.map_err(err)?);
    check(again == ["i-1"], format!("a redelivered delivery is due at once: {again:?}"))?;
    let info = store.deliveries(Some(DeliveryState::Pending), 100).await.map_err(err)?;
    check(
        info.iter().any(|d| d.id == "i-1" && d.attempts == 0),
        format!("redelivery starts the attempts again: {info:?}"),
    )?;
    store.mark_delivery_done("i-1").await.map_err(err)?;
    Ok(())
}

/// The build records kept from events, their filters and their pages.
async fn build_records_conformance(store: &dyn Store) -> Result<(), String> {
    use crate::event::{Conclusion, EventBody, StepConclusion};
    let err = |e: StoreError| e.to_string();
    let b = |id: &str| BuildId::from(id);
    let at = |secs: u64| Timestamp::from_secs(secs);
    let ev = |seq: u64, body: EventBody| Event { seq, at: at(seq), body };
    let queued = |build: &str, repo: &str, branch: Option<&str>| EventBody::BuildQueued {
        build: b(build),
        pipeline: "test".into(),
        repo: repo.into(),
        commit: format!("c-{build}"),
        branch: branch.map(Into::into),
    };
    let step_finished = |step: &str, attempt, conclusion, detail: &str| EventBody::StepFinished {
        build: b("b1"),
        step: step.into(),
        attempt,
        conclusion,
        detail: detail.into(),
        will_retry: false,
    };
    let events = vec![
        ev(10, queued("b1", "acme/app", Some("main"))),
        ev(11, EventBody::BuildStarted { build: b("b1") }),
        ev(12, EventBody::StepStarted { build: b("b1"), step: "unit".into(), attempt: 1 }),
        ev(13, step_finished("unit", 1, StepConclusion::Failed, "exit code 1")),
        ev(14, EventBody::StepStarted { build: b("b1"), step: "unit".into(), attempt: 2 }),
        ev(15, step_finished("unit", 2, StepConclusion::Success, "exit code 0")),
        ev(16, EventBody::StepSkipped { build: b("b1"), step: "docs".into(), reason: "only on tags".into() }),
        ev(
            17,
            EventBody::GateWaiting {
                build: b("b1"),
                step: "release".into(),
                kind: "approval".into(),
                instructions: None,
                approvals: 2,
            },
        ),
        ev(
            18,
            EventBody::Approved {
                build: b("b1"),
                step: "release".into(),
                by: "alice".into(),
                comment: None,
                count: 1,
                needed: 2,
            },
        ),
        ev(19, EventBody::Rejected { build: b("b1"), step: "release".into(), by: "bob".into(), comment: None }),
        ev(20, EventBody::BuildFinished { build: b("b1"), conclusion: Conclusion::Failed }),
        ev(21, queued("b2", "acme/app", Some("feature"))),
        ev(22, EventBody::BuildStarted { build: b("b2") }),
        ev(23, queued("b3", "acme/lib", Some("main"))),
        ev(24, EventBody::BuildCancelling { build: b("b3"), by: "carol".into(), reason: "oops".into() }),
        ev(25, EventBody::BuildFinished { build: b("b3"), conclusion: Conclusion::Cancelled }),
        // A finished build stays finished, whatever comes after.
        ev(26, EventBody::BuildStarted { build: b("b3") }),
        Event { seq: 27, at: at(27), body: queued("b4", "acme/app", Some("main")) },
        // Queued at the same moment as b4: the id breaks the tie.
        Event { seq: 28, at: at(27), body: queued("b5", "acme/app", None) },
    ];
    store.append_events(&events[..5]).await.map_err(err)?;
    store.append_events(&events[5..]).await.map_err(err)?;

    let running = store.build(&b("b2")).await.map_err(err)?.ok_or("b2 is not recorded")?;
    check(running.build.status == BuildStatus::Running, format!("b2: {running:?}"))?;
    check(running.build.started_at == Some(at(22)) && running.build.finished_at.is_none(), "b2's times")?;

    let record = store.build(&b("b1")).await.map_err(err)?.ok_or("b1 is not recorded")?;
    let summary = BuildSummary {
        id: b("b1"),
        repo: "acme/app".into(),
        branch: Some("main".into()),
        commit: "c-b1".into(),
        pipeline: "test".into(),
        status: BuildStatus::Failed,
        queued_at: at(10),
        started_at: Some(at(11)),
        finished_at: Some(at(20)),
    };
    check(record.build == summary, format!("b1's summary: {:?}", record.build))?;
    let step = |name: &str, attempt, status, detail: &str, started: Option<u64>, finished: Option<u64>| StepRecord {
        name: name.into(),
        attempt,
        status,
        detail: Some(detail.into()),
        started_at: started.map(at),
        finished_at: finished.map(at),
    };
    let steps = vec![
        step("unit", 1, StepRecordStatus::Failed, "exit code 1", Some(12), Some(13)),
        step("unit", 2, StepRecordStatus::Success, "exit code 0", Some(14), Some(15)),
        step("docs", 0, StepRecordStatus::Skipped, "only on tags", None, Some(16)),
        step("release", 0, StepRecordStatus::Rejected, "rejected by bob", Some(17), Some(19)),
    ];
    check(record.steps == steps, format!("b1's steps: {:#?}", record.steps))?;

    // Replayed events change nothing, whether the whole history or a few early events alone
    // (which, applied again, would move a finished step back to running), and a second
    // BuildQueued for an id does not replace it.
    store.append_events(&events).await.map_err(err)?;
    store.append_events(&[events[2].clone(), events[7].clone()]).await.map_err(err)?;
    store.append_events(&[ev(29, queued("b1", "elsewhere/repo", None))]).await.map_err(err)?;
    let again = store.build(&b("b1")).await.map_err(err)?;
    check(again.as_ref() == Some(&record), format!("b1 after a replay: {again:?}"))?;
    check(store.build(&b("b")).await.map_err(err)?.is_none(), "events of a build never queued make no record")?;
    check(store.build(&b("nope")).await.map_err(err)?.is_none(), "an unknown build has no record")?;
    let b3 = store.build(&b("b3")).await.map_err(err)?.ok_or("b3 is not recorded")?;
    check(b3.build.status == BuildStatus::Cancelled && b3.build.started_at.is_none(), format!("b3: {b3:?}"))?;

    // Listings: newest first, filtered, and paged without gaps or repeats.
    let list = |filter: BuildFilter, page: Page| async move {
        store.builds(&filter, page).await.map(|v| v.into_iter().map(|s| s.id.0).collect::<Vec<_>>())
    };
    let all = BuildFilter::default();
    let cases: Vec<(BuildFilter, Vec<&str>)> = vec![
        (all.clone(), vec!["b5", "b4", "b3", "b2", "b1"]),
        (BuildFilter { repo: Some("acme/lib".into()), ..all.clone() }, vec!["b3"]),
        (BuildFilter { commit: Some("c-b2".into()), ..all.clone() }, vec!["b2"]),
        (BuildFilter { branch: Some("main".into()), ..all.clone() }, vec!["b4", "b3", "b1"]),
        (BuildFilter { repo: Some("acme/app".into()), branch: Some("main".into()), ..all.clone() }, vec!["b4", "b1"]),
        (
            BuildFilter { statuses: vec![BuildStatus::Running, BuildStatus::Queued], ..all.clone() },
            vec!["b5", "b4", "b2"],
        ),
        (BuildFilter { statuses: vec![BuildStatus::Success], ..all.clone() }, vec![]),
        (BuildFilter { queued_from: Some(at(21)), queued_until: Some(at(27)), ..all.clone() }, vec!["b3", "b2"]),
        (BuildFilter { queued_from: Some(at(27)), ..all.clone() }, vec!["b5", "b4"]),
    ];
    for (filter, expected) in cases {
        let got = list(filter.clone(), Page::first(100)).await.map_err(err)?;
        check(got == expected, format!("builds matching {filter:?}: {got:?}, expected {expected:?}"))?;
        // Walking pages of two gives the same list.
        let mut walked = Vec::new();
        let mut page = Page::first(2);
        loop {
            let batch = store.builds(&filter, page.clone()).await.map_err(err)?;
            check(batch.len() <= 2, format!("a page of two held {}", batch.len()))?;
            let Some(last) = batch.last() else { break };
            page = Page::after(2, last);
            walked.extend(batch.iter().map(|s| s.id.0.clone()));
        }
        check(walked == expected, format!("pages of {filter:?}: {walked:?}, expected {expected:?}"))?;
    }
    check(list(all, Page::first(0)).await.map_err(err)?.is_empty(), "a page of zero is empty")?;
    Ok(())
}

/// The byte at `offset` of the logs the log limit suite writes.
fn log_byte(offset: u64) -> u8 {
    b"0123456789abcdefghijklmnopqrstuvwxyz\n"[(offset % 37) as usize]
}

fn log_bytes(range: std::ops::Range<u64>) -> Vec<u8> {
    range.map(log_byte).collect()
}

/// What every [`Store`] must do with logs that outgrow its limit. `store` must keep at most
/// 100 bytes of each log. Returns the first broken promise.
pub async fn store_log_limit_conformance(store: Arc<dyn Store>) -> Result<(), String> {
    let err = |e: StoreError| e.to_string();
    let key = LogKey { build: BuildId::from("limited"), step: "loud".into(), attempt: 1 };
    let mut length = 0u64;
    let mut append = async |n: u64| -> Result<u64, String> {
        let got = store.append_log(&key, &log_bytes(length..length + n)).await.map_err(err)?;
        length += n;
        check(got == length, format!("length {got} after appending up to {length}"))?;
        Ok(length)
    };
    let expect = |length: u64| -> Vec<u8> {
        let mut v = log_bytes(0..50.min(length));
        if length > 100 {
            v.extend_from_slice(omitted_marker(length - 100).as_bytes());
        }
        v.extend(log_bytes(50.max(length.saturating_sub(50)).min(length)..length));
        v
    };
    let read_all = async |key: &LogKey| store.read_log(key, 0, 1 << 20).await.map_err(err);

    // Within the limit, everything is kept.
    append(30).await?;
    append(70).await?;
    let read = read_all(&key).await?;
    check(read.data == log_bytes(0..100) && read.next_offset == 100, format!("100 bytes: {read:?}"))?;

    // One byte over: the head, a marker and the tail.
    append(1).await?;
    let read = read_all(&key).await?;
    check(read.data == expect(101), format!("101 bytes read {:?}", String::from_utf8_lossy(&read.data)))?;
    check(read.next_offset == 101, format!("next offset {}", read.next_offset))?;

    // Readers that follow see the marker once, where the gap starts, and offsets never move.
    append(29).await?;
    let read = store.read_log(&key, 40, 5).await.map_err(err)?;
    check(read.data == log_bytes(40..45) && read.next_offset == 45, format!("read at 40: {read:?}"))?;
    let read = store.read_log(&key, 45, 10).await.map_err(err)?;
    check(read.data == log_bytes(45..50) && read.next_offset == 50, "a marker that does not fit waits")?;
    let read = store.read_log(&key, 50, 1).await.map_err(err)?;
    let marker = omitted_marker(30);
    check(read.data == marker.as_bytes() && read.next_offset == 80, format!("the marker alone: {read:?}"))?;
    let read = store.read_log(&key, 60, 1000).await.map_err(err)?;
    let mut want = omitted_marker(20).into_bytes();
    want.extend(log_bytes(80..130));
    check(read.data == want && read.next_offset == 130, format!("read inside the gap: {read:?}"))?;
    check(read_all(&key).await?.data == expect(130), "130 bytes")?;

    // A large write keeps only its end; many small ones move the tail along.
    append(1000).await?;
    check(read_all(&key).await?.data == expect(1130), "after a large write")?;
    for _ in 0..300 {
        append(1).await?;
    }
    for _ in 0..20 {
        append(7).await?;
    }
    let read = read_all(&key).await?;
    check(read.data == expect(length), format!("after small writes: {:?}", String::from_utf8_lossy(&read.data)))?;
    check(!read.complete, "not finished yet")?;

    // Finishing keeps it all readable; the log reads the same in pieces of any size.
    store.finish_log(&key).await.map_err(err)?;
    for max in [1usize, 7, 49, 50, 64, 1 << 20] {
        let mut offset = 0;
        let mut data = Vec::new();
        loop {
            let read = store.read_log(&key, offset, max).await.map_err(err)?;
            check(read.next_offset > offset || read.complete, format!("no progress at {offset} with max {max}"))?;
            data.extend_from_slice(&read.data);
            offset = read.next_offset;
            if read.complete {
                break;
            }
        }
        check(data == expect(length), format!("reading in pieces of {max}: {:?}", String::from_utf8_lossy(&data)))?;
    }
    Ok(())
}

/// What every [`Store`] that prunes ([`Store::prune`]) must delete, and what it must keep: logs
/// only of builds finished before the cutoff, visited once each in queue order; events only
/// before the cutoff, up to the receivers' lowest cursor, covered by the snapshot, and never
/// the newest; deliveries only when processed. `store` must be empty. Returns the first broken
/// promise.
pub async fn store_retention_conformance(store: Arc<dyn Store>) -> Result<(), String> {
    use crate::event::{Conclusion, EventBody};
    let err = |e: StoreError| e.to_string();
    // The journal: inputs at 100, 200 and 300; a snapshot covers the first two.
    for at in [100, 200, 300] {
        store.append_input(&StoredInput { at: Timestamp(at), input: Input::Tick }).await.map_err(err)?;
    }
    store.save_snapshot(2, b"snapshot").await.map_err(err)?;

    // Builds, in queue order: `old` (queued 10, finished 20), `running` (queued 15, never
    // finished), `late` (queued 30, finished 400) and `new` (queued 500, finished 510).
    let queued = |seq: u64, at: u64, build: &str| Event {
        seq,
        at: Timestamp(at),
        body: EventBody::BuildQueued {
            build: BuildId::from(build),
            pipeline: "test".into(),
            repo: "acme/app".into(),
            commit: "c0ffee".into(),
            branch: Some("main".into()),
        },
    };
    let finished = |seq: u64, at: u64, build: &str| Event {
        seq,
        at: Timestamp(at),
        body: EventBody::BuildFinished { build: BuildId::from(build), conclusion: Conclusion::Success },
    };
    let events = [
        queued(1, 10, "old"),
        queued(2, 15, "running"),
        finished(3, 20, "old"),
        queued(4, 30, "late"),
        finished(5, 400, "late"),
        queued(6, 500, "new"),
        finished(7, 510, "new"),
    ];
    store.append_events(&events).await.map_err(err)?;
    let key = |build: &str| LogKey { build: BuildId::from(build), step: "unit".into(), attempt: 1 };
    for build in ["old", "running", "late", "new"] {
        store.append_log(&key(build), format!("{build} says hello\n").as_bytes()).await.map_err(err)?;
        if build != "running" {
            store.finish_log(&key(build)).await.map_err(err)?;
        }
    }
    let delivery = |id: &str, at: u64| Delivery {
        id: id.into(),
        source: "github".into(),
        event: "push".into(),
        received_at: Timestamp(at),
        body: b"{}".to_vec(),
    };
    for (id, at) in [("d-old", 10), ("d-dead", 10), ("d-pending", 10), ("d-new", 500)] {
        store.insert_delivery(&delivery(id, at)).await.map_err(err)?;
    }
    store.mark_delivery_done("d-old").await.map_err(err)?;
    store.mark_delivery_done("d-new").await.map_err(err)?;
    store.finish_delivery("d-dead", DeliveryOutcome::Dead { reason: "kept failing".into() }).await.map_err(err)?;

    let has_log = async |build: &str| -> Result<bool, String> {
        Ok(!store.read_log(&key(build), 0, 100).await.map_err(err)?.data.is_empty())
    };
    let event_seqs = async || -> Result<Vec<u64>, String> {
        Ok(store.events_after(0, 100).await.map_err(err)?.into_iter().map(|e| e.seq).collect())
    };
    let rules = |batch: usize| Prune { events_keep_after: u64::MAX, batch, ..Prune::default() };

    // Nothing asked, nothing deleted.
    let pruned = store.prune(&rules(100)).await.map_err(err)?;
    check(pruned == Pruned::default(), format!("a round with no ages deleted {pruned:?}"))?;

    // Logs: the batch bounds the builds visited, and the cursor says where the next round goes on.
    let pruned = store.prune(&Prune { logs_before: Some(Timestamp(100)), ..rules(1) }).await.map_err(err)?;
    check(pruned.logs == 1 && pruned.more, format!("a batch of one: {pruned:?}"))?;
    check(pruned.logs_after == Some((Timestamp(10), BuildId::from("old"))), format!("cursor: {pruned:?}"))?;
    check(!has_log("old").await?, "the log of a build finished before the cutoff is deleted")?;
    let read = store.read_log(&key("old"), 0, 100).await.map_err(err)?;
    check(read.data.is_empty() && read.next_offset == 0, format!("a pruned log reads as unknown: {read:?}"))?;
    let pruned = store
        .prune(&Prune { logs_before: Some(Timestamp(100)), logs_after: pruned.logs_after, ..rules(100) })
        .await
        .map_err(err)?;
    // `running` is passed over, and `late`, finished after the cutoff, stops the cursor.
    check(pruned.logs == 0 && !pruned.more, format!("the second round: {pruned:?}"))?;
    check(pruned.logs_after == Some((Timestamp(15), BuildId::from("running"))), format!("cursor: {pruned:?}"))?;
    for build in ["running", "late", "new"] {
        check(has_log(build).await?, format!("the log of {build} is kept"))?;
    }
    let pruned = store
        .prune(&Prune { logs_before: Some(Timestamp(1_000)), logs_after: pruned.logs_after, ..rules(100) })
        .await
        .map_err(err)?;
    check(pruned.logs == 2, format!("later, late and new go: {pruned:?}"))?;
    check(!has_log("late").await? && !has_log("new").await?, "the logs of late and new are deleted")?;
    check(has_log("running").await?, "a running build's log is never deleted")?;
    let record = store.build(&BuildId::from("old")).await.map_err(err)?;
    check(record.is_some_and(|b| b.build.status == BuildStatus::Success), "build records are kept")?;

    // Events: not after the receivers' lowest cursor, not at or after the cutoff, a bounded
    // range per round, not what the journal's tail would make again, never the newest.
    let pruned =
        store.prune(&Prune { events_before: Some(Timestamp(1_000)), ..rules(100) }.keep(2)).await.map_err(err)?;
    check(pruned.events == 2, format!("up to a cursor at 2: {pruned:?}"))?;
    check(event_seqs().await? == [3, 4, 5, 6, 7], "events left after a cursor at 2")?;
    let pruned = store.prune(&Prune { events_before: Some(Timestamp(25)), ..rules(100) }).await.map_err(err)?;
    check(pruned.events == 1, format!("before 25: {pruned:?}"))?;
    let pruned = store.prune(&Prune { events_before: Some(Timestamp(1_000)), ..rules(1) }).await.map_err(err)?;
    check(pruned.events == 1 && pruned.more, format!("a batch of one: {pruned:?}"))?;
    check(event_seqs().await? == [5, 6, 7], "events left after a batch of one")?;
    let pruned = store.prune(&Prune { events_before: Some(Timestamp(1_000)), ..rules(100) }).await.map_err(err)?;
    check(pruned.events == 0, format!("events after the journal's oldest input (300) are kept: {pruned:?}"))?;
    store.save_snapshot(3, b"later").await.map_err(err)?;
    let pruned = store.prune(&Prune { events_before: Some(Timestamp(1_000)), ..rules(100) }).await.map_err(err)?;
    check(pruned.events == 2, format!("once a snapshot covers the journal: {pruned:?}"))?;
    check(event_seqs().await? == [7], "the newest event is kept")?;
    check(store.last_event_seq().await.map_err(err)? == 7, "numbering goes on from the newest event")?;

    // Deliveries: only processed ones received before the cutoff.
    let pruned = store.prune(&Prune { deliveries_before: Some(Timestamp(100)), ..rules(100) }).await.map_err(err)?;
    check(pruned.deliveries == 1, format!("deliveries: {pruned:?}"))?;
    check(store.delivery("d-old").await.map_err(err)?.is_none(), "a processed old delivery is deleted")?;
    for id in ["d-dead", "d-pending", "d-new"] {
        check(store.delivery(id).await.map_err(err)?.is_some(), format!("{id} is kept"))?;
    }
    let pending: Vec<String> = store.pending_deliveries(10).await.map_err(err)?.into_iter().map(|d| d.id).collect();
    check(pending == ["d-pending"], format!("the pending delivery is still pending: {pending:?}"))?;
    Ok(())
}
