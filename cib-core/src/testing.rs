//! Fakes of every port and the conformance suites real backends must pass too.
//!
//! The fakes are real implementations of the ports, kept in memory: an executor that plays a
//! tiny shell (`echo`, `exit`, `sleep`, `true`, `false`), a VCS of in-memory repositories, a
//! notifier that records, a store in memory and a clock that moves only when told. The
//! conformance suites state what every backend must do; running them against the fakes keeps
//! the fakes honest, and against the real backends keeps those honest.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::event::{BuildId, Event};
use crate::pipeline::{BuildContext, StepJob, StopReason};
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

/// The wall clock.
#[derive(Debug, Default)]
pub struct SystemClock;

#[async_trait]
impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Timestamp(millis)
    }

    async fn sleep_until(&self, at: Timestamp) {
        let now = self.now();
        if at > now {
            tokio::time::sleep(at.since(now)).await;
        }
    }
}

// ---- secrets -------------------------------------------------------------------------------

/// Secrets from a map, the same for every repository.
#[derive(Debug, Default, Clone)]
pub struct StaticSecrets(pub BTreeMap<String, String>);

impl Secrets for StaticSecrets {
    fn get(&self, _repo: &str, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

// ---- executor ------------------------------------------------------------------------------

/// An executor that plays a tiny shell over the step's commands, without containers.
///
/// It knows `echo WORDS` (with `$NAME` expansion, and `>&2` for stderr), `exit N`, `sleep
/// SECONDS` (in real time, interruptible), `true` and `false`, and fails a command it does not
/// know with exit code 127, as `sh` does. Secret values are masked as `***` in the output.
/// An infrastructure error can be scripted per step name.
#[derive(Debug, Default)]
pub struct FakeExecutor {
    infra_errors: Mutex<HashMap<String, u32>>,
    runs: Mutex<Vec<StepJob>>,
    live: Mutex<BTreeMap<BuildId, u32>>,
    cleaned: Mutex<Vec<BuildId>>,
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

    /// Builds with something still allocated (a step run or services).
    pub fn live_builds(&self) -> Vec<BuildId> {
        lock(&self.live).keys().cloned().collect()
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

fn mask(text: &str, secrets: &BTreeMap<String, String>) -> String {
    secrets.values().filter(|v| !v.is_empty()).fold(text.to_owned(), |t, v| t.replace(v.as_str(), "***"))
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
                        let text = mask(&format!("{}\n", expand(text, &env)), &run.secrets);
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
        let mut live = lock(&self.live);
        if let Some(n) = live.get_mut(&job.build) {
            *n -= 1;
            if *n == 0 {
                live.remove(&job.build);
            }
        }
        Ok(outcome)
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

    async fn cleanup(&self, build: &BuildId) -> Result<(), ExecError> {
        lock(&self.live).remove(build);
        lock(&self.cleaned).push(build.clone());
        Ok(())
    }

    async fn reconcile(&self, live: &[BuildId]) -> Result<usize, ExecError> {
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

#[derive(Debug, Default)]
struct Memory {
    inputs: Vec<StoredInput>,
    events: BTreeMap<u64, Event>,
    logs: BTreeMap<LogKey, (Vec<u8>, bool)>,
    deliveries: BTreeMap<String, Delivery>,
}

/// A store in memory: what a process keeps when it does not need to survive itself.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Memory>,
}

impl MemoryStore {
    pub fn new() -> Arc<Self> {
        Arc::new(MemoryStore::default())
    }

    /// How many inputs are stored.
    pub fn input_count(&self) -> usize {
        lock(&self.inner).inputs.len()
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn append_input(&self, input: &StoredInput) -> Result<u64, StoreError> {
        let mut m = lock(&self.inner);
        m.inputs.push(input.clone());
        Ok(m.inputs.len() as u64)
    }

    async fn inputs_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, StoredInput)>, StoreError> {
        let m = lock(&self.inner);
        let start = usize::try_from(after).unwrap_or(usize::MAX).min(m.inputs.len());
        Ok(m.inputs[start..].iter().take(limit).enumerate().map(|(i, s)| ((start + i + 1) as u64, s.clone())).collect())
    }

    async fn append_events(&self, events: &[Event]) -> Result<(), StoreError> {
        let mut m = lock(&self.inner);
        for e in events {
            m.events.entry(e.seq).or_insert_with(|| e.clone());
        }
        Ok(())
    }

    async fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let m = lock(&self.inner);
        Ok(m.events.range(after.saturating_add(1)..).take(limit).map(|(_, e)| e.clone()).collect())
    }

    async fn append_log(&self, key: &LogKey, data: &[u8]) -> Result<u64, StoreError> {
        let mut m = lock(&self.inner);
        let (buf, done) = m.logs.entry(key.clone()).or_default();
        if *done {
            return Err(StoreError::Permanent(format!(
                "the log of {}/{}#{} is finished",
                key.build, key.step, key.attempt
            )));
        }
        buf.extend_from_slice(data);
        Ok(buf.len() as u64)
    }

    async fn finish_log(&self, key: &LogKey) -> Result<(), StoreError> {
        lock(&self.inner).logs.entry(key.clone()).or_default().1 = true;
        Ok(())
    }

    async fn read_log(&self, key: &LogKey, offset: u64, max: usize) -> Result<LogRead, StoreError> {
        let m = lock(&self.inner);
        let (buf, done) = m.logs.get(key).map(|(b, d)| (b.as_slice(), *d)).unwrap_or((&[], false));
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(buf.len());
        let end = start.saturating_add(max).min(buf.len());
        Ok(LogRead { data: buf[start..end].to_vec(), next_offset: end as u64, complete: done && end == buf.len() })
    }

    async fn insert_delivery(&self, delivery: &Delivery) -> Result<bool, StoreError> {
        let mut m = lock(&self.inner);
        if m.deliveries.contains_key(&delivery.id) {
            return Ok(false);
        }
        m.deliveries.insert(delivery.id.clone(), delivery.clone());
        Ok(true)
    }

    async fn delivery(&self, id: &str) -> Result<Option<Delivery>, StoreError> {
        Ok(lock(&self.inner).deliveries.get(id).cloned())
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
        },
        env: BTreeMap::new(),
        resources: Vec::new(),
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
    let run =
        |job: StepJob, secrets: BTreeMap<String, String>| StepRun { job, secrets, workspace: workspace.to_path_buf() };
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

    // Environment variables arrive; secret values arrive too but never reach the sink.
    let sink = CollectingSink::new();
    let (_keep, stop) = no_stop();
    let mut job =
        conformance_job("conf-3", "env", image, &["echo \"greeting=$GREETING\"", "echo \"token=$API_TOKEN\""]);
    job.env.insert("GREETING".into(), "bonjour".into());
    job.step.secrets = vec!["API_TOKEN".into()];
    let secrets = BTreeMap::from([("API_TOKEN".to_owned(), "s3cr3t-value".to_owned())]);
    let outcome = executor.run(&run(job, secrets), sink.clone(), stop).await.map_err(|e| e.to_string())?;
    let out = sink.text(Stream::Stdout);
    check(outcome == Outcome::Exited(0), format!("env step gave {outcome:?}"))?;
    check(out.contains("greeting=bonjour"), format!("env not passed: {out:?}"))?;
    check(out.contains("token=***") && !out.contains("s3cr3t-value"), format!("secret not masked: {out:?}"))?;

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

    // Cleanup and reconcile leave nothing of these builds, and may be repeated.
    for build in ["conf-1", "conf-2", "conf-3", "conf-4"] {
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

    // Events are kept once per sequence number.
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

    // Logs grow by appends and are read from any offset; finishing marks the end.
    let key = LogKey { build: BuildId::from("b"), step: "s".into(), attempt: 1 };
    check(store.append_log(&key, b"hello ").await.map_err(err)? == 6, "log length after one append")?;
    check(store.append_log(&key, b"world\n").await.map_err(err)? == 12, "log length after two appends")?;
    let read = store.read_log(&key, 6, 100).await.map_err(err)?;
    check(read.data == b"world\n" && read.next_offset == 12 && !read.complete, format!("read from 6: {read:?}"))?;
    let read = store.read_log(&key, 0, 5).await.map_err(err)?;
    check(read.data == b"hello" && read.next_offset == 5, format!("read 5 bytes: {read:?}"))?;
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
    Ok(())
}
