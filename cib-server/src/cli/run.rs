//! `cib run`: the spec run locally by the engine itself, with the Docker executor and a store
//! in a temporary directory, so that what passes here passes on the server.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cib_core::engine::{Engine, EngineConfig, EngineHandle, LogLine, Ports, SystemClock};
use cib_core::event::{BuildId, Conclusion, EventBody, StepConclusion};
use cib_core::pipeline::{BuildContext, Config, Input};
use cib_core::ports::{Clock, Secrets, StepRecord, StepRecordStatus, Store, Vcs};
use cib_core::spec::{self, EventKind, TriggerEvent};
use cib_git::{GitVcs, WorkingTree};
use tokio::sync::broadcast::error::RecvError;

/// The exit codes of `cib run`, each with a meaning a script can rely on.
pub mod exit {
    pub const SUCCESS: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const INFRASTRUCTURE: u8 = 3;
}

#[derive(Debug, Default)]
pub struct RunArgs {
    pub dir: PathBuf,
    pub event: Option<EventKind>,
    pub branch: Option<String>,
    pub pipelines: Vec<String>,
    pub steps: Vec<String>,
    pub env: Vec<String>,
    pub secrets: Vec<String>,
    pub secrets_file: Option<PathBuf>,
    pub commit: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub color: Option<bool>,
    /// The server's configuration, whose `[limits]` apply; the built-in limits when `None`.
    pub config: Option<PathBuf>,
    /// One JSON object per line on standard output instead of text for people.
    pub json: bool,
}

struct Failure {
    code: u8,
    message: String,
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure { code, message: message.into() }
}

fn eprint(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// Secrets given on the command line, for every repository.
struct CliSecrets(BTreeMap<String, String>);

// `cib run` builds the one working tree on the user's own machine, with the secrets they
// gave for it, so no scope applies.
#[async_trait::async_trait]
impl Secrets for CliSecrets {
    async fn for_step(
        &self,
        _build: &cib_core::policy::BuildFacts<'_>,
        asked: &[String],
    ) -> Result<cib_core::ports::StepSecrets, String> {
        Ok(cib_core::ports::StepSecrets::pick(&self.0, asked))
    }
}

/// `NAME=VALUE` pairs; the value may contain `=`.
fn pairs(items: &[String], what: &str) -> Result<BTreeMap<String, String>, Failure> {
    let mut out = BTreeMap::new();
    for item in items {
        let Some((name, value)) = item.split_once('=') else {
            return Err(fail(exit::USAGE, format!("{what} '{item}' is not NAME=VALUE")));
        };
        out.insert(name.trim().to_owned(), value.to_owned());
    }
    Ok(out)
}

/// A file of `NAME=VALUE` lines; blank lines and `#` comments are skipped, and a value may be
/// quoted.
fn secrets_file(path: &Path) -> Result<BTreeMap<String, String>, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| fail(exit::USAGE, format!("cannot read the secrets file {}: {e}", path.display())))?;
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((name, value)) = line.split_once('=') else {
            return Err(fail(exit::USAGE, format!("{}:{}: expected NAME=VALUE", path.display(), n + 1)));
        };
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value);
        out.insert(name.trim().to_owned(), value.to_owned());
    }
    Ok(out)
}

fn git_output(dir: &Path, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git").arg("-C").arg(dir).args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// One selected pipeline, with the steps asked for.
struct Planned {
    build: BuildId,
    pipeline: String,
    only: Option<Vec<String>>,
    /// The steps that will run, in the spec's order, for the summary.
    steps: Vec<String>,
}

pub fn run(args: RunArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprint(&format!("cib run: cannot start the runtime: {e}"));
            return ExitCode::from(exit::INFRASTRUCTURE);
        }
    };
    match runtime.block_on(run_async(args)) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprint(&format!("cib run: {}", failure.message));
            ExitCode::from(failure.code)
        }
    }
}

async fn run_async(args: RunArgs) -> Result<u8, Failure> {
    // The project is the nearest directory holding a spec, up to the repository's top.
    let start = args.dir.canonicalize().unwrap_or(args.dir.clone());
    let top = git_output(&start, &["rev-parse", "--show-toplevel"]).map(PathBuf::from);
    let root = start
        .ancestors()
        .take_while(|d| top.as_ref().is_none_or(|t| d.starts_with(t)))
        .find(|d| d.join(spec::FILE_NAME).is_file())
        .map(Path::to_path_buf)
        .unwrap_or(start.clone());
    let repo = root.to_string_lossy().into_owned();

    // The spec and the code: the working tree as it is, or a clean checkout of a commit.
    let (vcs, commit): (Arc<dyn Vcs>, String) = match &args.commit {
        Some(rev) => {
            let git = GitVcs::new();
            let commit = git
                .resolve(&repo, rev)
                .await
                .map_err(|e| fail(exit::USAGE, format!("cannot find commit {rev}: {e}")))?;
            (Arc::new(git), commit)
        }
        None => {
            let head = git_output(&root, &["rev-parse", "HEAD"]).unwrap_or_else(|| "0".repeat(40));
            let mut tree = WorkingTree::new(&root);
            // A data directory inside the project must not be copied into its own workspaces.
            if let Some(data) = &args.data_dir {
                let data = data.canonicalize().unwrap_or(data.clone());
                tree = tree.excluding(data);
            }
            (Arc::new(tree), head)
        }
    };
    let shown = root.join(spec::FILE_NAME).display().to_string();
    let source = vcs
        .read_spec(&repo, &commit)
        .await
        .map_err(|e| fail(exit::USAGE, format!("cannot read the spec: {e}")))?
        .ok_or_else(|| {
            fail(exit::USAGE, format!("no {} in {}: write one (see docs/spec.md)", spec::FILE_NAME, root.display()))
        })?;
    let (limits_table, limits) =
        super::plan::limits_config(args.config.as_deref()).map_err(|e| fail(exit::USAGE, e))?;
    let parsed = match spec::parse_limited(&source, &limits) {
        Ok(s) => s,
        Err(diags) => {
            for d in &diags {
                eprint(&d.render(&shown, &source));
            }
            return Err(fail(exit::USAGE, format!("{} is not valid ({} errors)", spec::FILE_NAME, diags.len())));
        }
    };

    // What to run.
    let branch = args
        .branch
        .clone()
        .or_else(|| git_output(&root, &["symbolic-ref", "--short", "HEAD"]))
        .unwrap_or_else(|| parsed.integration_branch().to_owned());
    let kind = args.event.unwrap_or(EventKind::Push);
    let event = TriggerEvent::of(kind, &branch);
    let mut chosen: Vec<&spec::Pipeline> = if args.pipelines.is_empty() {
        parsed.plan(&event)
    } else {
        let mut out = Vec::new();
        for name in &args.pipelines {
            let p = parsed.pipeline(name).ok_or_else(|| {
                let names: Vec<&str> = parsed.pipelines.iter().map(|p| p.name.as_str()).collect();
                fail(exit::USAGE, format!("no pipeline '{name}' in the spec (it has: {})", names.join(", ")))
            })?;
            out.push(p);
        }
        out
    };
    if !args.steps.is_empty() {
        for step in &args.steps {
            if !chosen.iter().any(|p| p.step(step).is_some()) {
                return Err(fail(exit::USAGE, format!("no step '{step}' in the pipelines that run")));
            }
        }
        chosen.retain(|p| args.steps.iter().any(|s| p.step(s).is_some()));
    }
    if chosen.is_empty() {
        let kind_text = serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        let text = format!("no pipeline runs for a {kind_text} on {branch}; choose one with --pipeline");
        let line = if args.json {
            serde_json::json!({ "type": "run_finished", "pipelines": [], "steps": [], "exit": exit::SUCCESS, "note": text })
                .to_string()
        } else {
            text
        };
        let _ = writeln!(std::io::stdout(), "{line}");
        return Ok(exit::SUCCESS);
    }

    // Secrets and variables.
    let mut secrets = match &args.secrets_file {
        Some(path) => secrets_file(path)?,
        None => BTreeMap::new(),
    };
    secrets.extend(pairs(&args.secrets, "--secret")?);
    let env = pairs(&args.env, "--env")?;
    for p in &chosen {
        let running: Vec<&spec::Step> = if args.steps.is_empty() {
            p.steps.iter().collect()
        } else {
            let names: Vec<&str> = args.steps.iter().map(String::as_str).collect();
            p.closure(&names)
        };
        for s in running {
            for name in &s.secrets {
                if !secrets.contains_key(name) {
                    return Err(fail(
                        exit::USAGE,
                        format!(
                            "step '{}' needs the secret {name}: pass --secret {name}=VALUE or --secrets-file FILE",
                            s.name
                        ),
                    ));
                }
            }
        }
    }

    // The engine, on real Docker and a store of its own.
    // Each local run has its own name in Docker, so that two runs at once never take each
    // other's containers for leftovers.
    let instance = format!("cib-run-{}", std::process::id());
    let executor =
        cib_docker::DockerExecutor::connect(super::serve::docker_options(instance, &limits)).await.map_err(|e| {
            fail(
                exit::INFRASTRUCTURE,
                format!("cannot use Docker: {e}\nStart a Docker daemon (or set DOCKER_HOST), then run again."),
            )
        })?;
    let (_temp, data_dir) = match &args.data_dir {
        Some(dir) => (None, dir.clone()),
        None => {
            let temp = tempfile::tempdir()
                .map_err(|e| fail(exit::INFRASTRUCTURE, format!("cannot make a temporary directory: {e}")))?;
            let path = temp.path().to_path_buf();
            (Some(temp), path)
        }
    };
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| fail(exit::INFRASTRUCTURE, format!("cannot create {}: {e}", data_dir.display())))?;
    let executor: Arc<cib_docker::DockerExecutor> = Arc::new(executor);
    remove_leftovers_of_dead_runs(&executor).await;
    let store = cib_store::SqliteStore::open(data_dir.join("cib.db"), super::serve::store_options(&limits_table))
        .map_err(|e| fail(exit::INFRASTRUCTURE, format!("cannot open the store: {e}")))?;
    let store = Arc::new(store);
    // With `--data-dir`, artifacts outlive the run, so a later run of another pipeline of the
    // same commit finds them (`needs_artifacts`).
    let artifacts = Arc::new(cib_store::FileArtifacts::new(data_dir.join("artifacts"), store.clone()));
    let store: Arc<dyn Store> = store;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let ports = Ports {
        executor: executor.clone(),
        vcs,
        store: store.clone(),
        notifiers: Vec::new(),
        clock: clock.clone(),
        secrets: Arc::new(CliSecrets(secrets)),
        publisher: Arc::new(cib_core::publish::NoPublisher),
        artifacts,
    };
    let config = EngineConfig {
        machine: Config { max_running_steps: 4, limits: limits.clone(), ..Config::default() },
        workspace_root: data_dir.join("workspaces"),
        tick_every: Duration::from_secs(30),
        reconcile_every: cib_core::engine::RECONCILE_EVERY,
        snapshots: cib_core::engine::SnapshotPolicy::default(),
    };
    let (engine, future) = Engine::start(ports, config);
    let engine_task = tokio::spawn(future);
    let events = engine.subscribe();
    let logs = engine.subscribe_logs();

    let run_id = clock.now().millis();
    let planned: Vec<Planned> = chosen
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let only: Option<Vec<String>> =
                (!args.steps.is_empty()).then(|| args.steps.iter().filter(|s| p.step(s).is_some()).cloned().collect());
            let steps = match &only {
                Some(names) => {
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    let keep: Vec<String> = p.closure(&names).iter().map(|s| s.name.clone()).collect();
                    p.steps.iter().filter(|s| keep.contains(&s.name)).map(|s| s.name.clone()).collect()
                }
                None => p.steps.iter().map(|s| s.name.clone()).collect(),
            };
            Planned { build: BuildId(format!("local-{run_id}-{}", i + 1)), pipeline: p.name.clone(), only, steps }
        })
        .collect();
    let color = !args.json && args.color.unwrap_or_else(|| std::io::stdout().is_terminal());
    let mut printer = Printer::new(color, args.json, &planned);
    printer.header(&event, &planned);
    let spec_text: Arc<str> = Arc::from(source.as_str());
    for p in &planned {
        let mut context = BuildContext {
            repo: repo.clone(),
            commit: commit.clone(),
            branch: Some(branch.clone()),
            pull_request: None,
            event: event.clone(),
            actor: std::env::var("USER").ok(),
            trusted: true,
            upstream: None,
        };
        context.event.changed_paths = None;
        let input = Input::Enqueue {
            build: p.build.clone(),
            spec: spec_text.clone(),
            pipeline: p.pipeline.clone(),
            context,
            only: p.only.clone(),
            variables: env.clone(),
        };
        engine.submit(input).await.map_err(|e| fail(exit::INFRASTRUCTURE, format!("the engine stopped: {e}")))?;
    }
    let conclusions = watch(&engine, events, logs, &mut printer, &planned).await;
    let code = if conclusions.values().any(|c| *c == Conclusion::Errored) {
        exit::INFRASTRUCTURE
    } else if conclusions.values().all(|c| *c == Conclusion::Success) && conclusions.len() == planned.len() {
        exit::SUCCESS
    } else {
        exit::FAILED
    };
    printer.summary(store.as_ref(), &planned, &conclusions, code).await;
    // The engine removes each build's containers, volume and network on a task of its own;
    // this process is about to end, so wait for that (then make sure), leaving nothing behind.
    for p in &planned {
        let deadline = Instant::now() + Duration::from_secs(30);
        while executor.resources(Some(&p.build)).await.is_ok_and(|r| !r.is_empty()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Err(e) = cib_core::ports::Executor::cleanup(&*executor, &p.build).await {
            eprint(&format!("cib run: could not remove everything of {}: {e}", p.build));
        }
    }
    engine.shutdown().await;
    let _ = engine_task.await;
    Ok(code)
}

/// Each `cib run` names itself in Docker after its process; one that was killed left its
/// containers, volumes and networks behind. Those of processes that no longer exist are removed.
async fn remove_leftovers_of_dead_runs(executor: &cib_docker::DockerExecutor) {
    let Ok(instances) = executor.instances().await else { return };
    for instance in instances {
        let Some(pid) = instance.strip_prefix("cib-run-").and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(dead) = cib_docker::DockerExecutor::connect(cib_docker::DockerOptions::new(instance)).await {
            let _ = cib_core::ports::Executor::reconcile(&dead, &[]).await;
        }
    }
}

/// Prints events and output until every build has finished; Ctrl-C cancels the builds, and a
/// second Ctrl-C stops waiting.
async fn watch(
    engine: &EngineHandle,
    mut events: tokio::sync::broadcast::Receiver<cib_core::event::Event>,
    mut logs: tokio::sync::broadcast::Receiver<LogLine>,
    printer: &mut Printer,
    planned: &[Planned],
) -> BTreeMap<BuildId, Conclusion> {
    let mut done: BTreeMap<BuildId, Conclusion> = BTreeMap::new();
    let mut interrupts = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while done.len() < planned.len() {
        tokio::select! {
            event = events.recv() => match event {
                Ok(event) => {
                    if let EventBody::BuildFinished { build, conclusion } = &event.body
                        && planned.iter().any(|p| p.build == *build)
                    {
                        done.insert(build.clone(), *conclusion);
                    }
                    printer.event(&event);
                }
                Err(RecvError::Lagged(n)) => printer.note(&format!("({n} events skipped: the terminal is slower than the build)")),
                Err(RecvError::Closed) => break,
            },
            line = logs.recv() => match line {
                Ok(line) => printer.output(&line),
                Err(RecvError::Lagged(n)) => printer.note(&format!("({n} pieces of output skipped on screen; the store has them)")),
                Err(RecvError::Closed) => break,
            },
            _ = tokio::signal::ctrl_c() => {
                interrupts += 1;
                if interrupts > 1 {
                    printer.note("stopped waiting; containers are removed by the next run's reconcile");
                    break;
                }
                printer.note("cancelling (press Ctrl-C again to stop waiting)");
                for p in planned {
                    let _ = engine.submit(Input::Cancel { build: p.build.clone(), by: "you".into(), reason: "interrupted".into() }).await;
                }
            },
            _ = tick.tick() => printer.progress(),
        }
    }
    printer.clear_progress();
    done
}

const PALETTE: [&str; 6] = ["36", "35", "33", "32", "34", "91"];

/// Everything `cib run` shows: prefixed output, step lines, a progress line on a terminal, and
/// the closing summary.
struct Printer {
    color: bool,
    /// JSON lines instead of text: every event as the server's event stream has it, output
    /// line by line, and a closing `run_finished`.
    json: bool,
    multi: bool,
    colors: HashMap<String, &'static str>,
    partial: HashMap<(BuildId, String, u32), Vec<u8>>,
    running: BTreeMap<(BuildId, String), Instant>,
    progress_shown: bool,
    started: Instant,
    pipelines: HashMap<BuildId, String>,
}

impl Printer {
    fn new(color: bool, json: bool, planned: &[Planned]) -> Self {
        Printer {
            color,
            json,
            multi: planned.len() > 1,
            colors: HashMap::new(),
            partial: HashMap::new(),
            running: BTreeMap::new(),
            progress_shown: false,
            started: Instant::now(),
            pipelines: planned.iter().map(|p| (p.build.clone(), p.pipeline.clone())).collect(),
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color { format!("\x1b[{code}m{text}\x1b[0m") } else { text.to_owned() }
    }

    fn label(&mut self, build: &BuildId, step: &str) -> String {
        let name = if self.multi {
            format!("{}/{step}", self.pipelines.get(build).map(String::as_str).unwrap_or("?"))
        } else {
            step.to_owned()
        };
        let next = PALETTE[self.colors.len() % PALETTE.len()];
        let code = *self.colors.entry(name.clone()).or_insert(next);
        self.paint(code, &name)
    }

    fn write(&mut self, text: &str) {
        self.clear_progress();
        let _ = writeln!(std::io::stdout().lock(), "{text}");
    }

    fn note(&mut self, text: &str) {
        if self.json {
            self.write(&serde_json::json!({ "type": "note", "text": text }).to_string());
            return;
        }
        let text = self.paint("2", text);
        self.write(&text);
    }

    fn header(&mut self, event: &TriggerEvent, planned: &[Planned]) {
        let names: Vec<&str> = planned.iter().map(|p| p.pipeline.as_str()).collect();
        let kind =
            serde_json::to_value(event.kind).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        if self.json {
            let pipelines: Vec<serde_json::Value> = planned
                .iter()
                .map(|p| serde_json::json!({ "pipeline": p.pipeline, "build": p.build, "steps": p.only }))
                .collect();
            let line = serde_json::json!({
                "type": "run_started",
                "event": kind,
                "branch": event.branch,
                "pipelines": pipelines,
            });
            self.write(&line.to_string());
            return;
        }
        let text = format!("cib run: {kind} on {} → {}", event.branch.as_deref().unwrap_or("-"), names.join(", "));
        let text = self.paint("1", &text);
        self.write(&text);
    }

    fn output(&mut self, line: &LogLine) {
        let key = (line.key.build.clone(), line.key.step.clone(), line.key.attempt);
        let mut buf = self.partial.remove(&key).unwrap_or_default();
        buf.extend_from_slice(&line.data);
        let mut lines: Vec<String> = Vec::new();
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let rest = buf.split_off(pos + 1);
            lines.push(String::from_utf8_lossy(&buf[..pos]).trim_end_matches('\r').to_owned());
            buf = rest;
        }
        if !buf.is_empty() {
            self.partial.insert(key.clone(), buf);
        }
        for text in lines {
            self.line_of(&key.0, &key.1, key.2, &text);
        }
    }

    /// One line a step printed.
    fn line_of(&mut self, build: &BuildId, step: &str, attempt: u32, text: &str) {
        if self.json {
            let line = serde_json::json!({
                "type": "output",
                "build": build,
                "pipeline": self.pipelines.get(build),
                "step": step,
                "attempt": attempt,
                "text": text,
            });
            self.write(&line.to_string());
            return;
        }
        let label = self.label(build, step);
        self.write(&format!("{label} | {text}"));
    }

    fn flush_partial(&mut self, build: &BuildId, step: &str, attempt: u32) {
        if let Some(buf) = self.partial.remove(&(build.clone(), step.to_owned(), attempt)) {
            self.line_of(build, step, attempt, &String::from_utf8_lossy(&buf));
        }
    }

    fn event(&mut self, event: &cib_core::event::Event) {
        let body = &event.body;
        if self.json {
            // A step's last partial line belongs before the step's end.
            if let EventBody::StepFinished { build, step, attempt, .. } = body {
                self.flush_partial(build, step, *attempt);
            }
            self.write(&serde_json::to_string(event).unwrap_or_default());
            return;
        }
        match body {
            EventBody::StepStarted { build, step, attempt } => {
                self.running.insert((build.clone(), step.clone()), Instant::now());
                let label = self.label(build, step);
                let again = if *attempt > 1 { format!(" (attempt {attempt})") } else { String::new() };
                let text = self.paint("2", &format!("started{again}"));
                self.write(&format!("{label} ▶ {text}"));
            }
            EventBody::StepFinished { build, step, attempt, conclusion, detail, will_retry } => {
                self.flush_partial(build, step, *attempt);
                let took = self.running.remove(&(build.clone(), step.clone())).map(|t| t.elapsed()).unwrap_or_default();
                let label = self.label(build, step);
                let (code, word) = conclusion_style(*conclusion);
                let mut text = format!("{label} ■ {} in {} ({detail})", self.paint(code, word), human(took));
                if *will_retry {
                    text.push_str(", trying again");
                }
                self.write(&text);
            }
            EventBody::StepSkipped { build, step, reason } => {
                let label = self.label(build, step);
                let text = self.paint("2", &format!("skipped: {reason}"));
                self.write(&format!("{label} ○ {text}"));
            }
            EventBody::ServiceReady { build, service } => {
                let label = self.label(build, service);
                let text = self.paint("2", "service ready");
                self.write(&format!("{label} ● {text}"));
            }
            EventBody::GateWaiting { step, kind, instructions, .. } => {
                let text = format!(
                    "{step} waits at a {kind} gate{} (a local run has nobody to answer; cancel with Ctrl-C)",
                    instructions.as_ref().map(|i| format!(": {i}")).unwrap_or_default()
                );
                self.note(&text);
            }
            EventBody::BuildCancelling { reason, .. } => self.note(&format!("cancelling: {reason}")),
            EventBody::LeaseWaiting { lease, .. } => {
                self.note(&format!("{lease} waits for resources (a local run has no resource pools)"))
            }
            _ => {}
        }
    }

    fn progress(&mut self) {
        if !self.color || self.running.is_empty() {
            return;
        }
        let parts: Vec<String> = self
            .running
            .iter()
            .map(|((build, step), since)| {
                let name = if self.multi {
                    format!("{}/{step}", self.pipelines.get(build).map(String::as_str).unwrap_or("?"))
                } else {
                    step.clone()
                };
                format!("{name} {}", human(since.elapsed()))
            })
            .collect();
        let spinner = ["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"]
            [(self.started.elapsed().as_millis() / 250 % 10) as usize];
        let _ = write!(std::io::stdout().lock(), "\r\x1b[2K{spinner} running: {}", parts.join(", "));
        let _ = std::io::stdout().flush();
        self.progress_shown = true;
    }

    fn clear_progress(&mut self) {
        if self.progress_shown {
            let _ = write!(std::io::stdout().lock(), "\r\x1b[2K");
            self.progress_shown = false;
        }
    }

    async fn summary(
        &mut self,
        store: &dyn Store,
        planned: &[Planned],
        conclusions: &BTreeMap<BuildId, Conclusion>,
        code: u8,
    ) {
        // What `--json` closes with: each step's result, from the same records as the table.
        let mut steps_json: Vec<serde_json::Value> = Vec::new();
        let mut rows: Vec<[String; 5]> = Vec::new();
        for p in planned {
            // The engine forgets a finished build; its record in the store has every attempt.
            let records = match store.build(&p.build).await {
                Ok(Some(record)) => record.steps,
                _ => Vec::new(),
            };
            for step in &p.steps {
                let attempts: Vec<&StepRecord> = records.iter().filter(|r| r.name == *step).collect();
                let last = attempts.iter().max_by_key(|r| r.attempt);
                let took = last
                    .and_then(|a| Some(a.finished_at?.since(a.started_at?)))
                    .map(human)
                    .unwrap_or_else(|| "-".into());
                // A step that never ran (its build ended first) is shown cancelled.
                let result = last.map_or("cancelled", |a| record_style(a.status).1);
                let name = if self.multi { format!("{}/{step}", p.pipeline) } else { step.clone() };
                let tries = attempts.iter().filter(|a| a.attempt > 0).count();
                steps_json.push(serde_json::json!({
                    "pipeline": p.pipeline,
                    "step": step,
                    "result": last.map(|a| a.status),
                    "attempts": tries,
                    "duration_ms": last.and_then(|a| Some(a.finished_at?.since(a.started_at?).as_millis() as u64)),
                    "detail": last.and_then(|a| a.detail.clone()),
                }));
                rows.push([
                    name,
                    result.to_owned(),
                    took,
                    tries.to_string(),
                    last.and_then(|a| a.detail.clone()).unwrap_or_default(),
                ]);
            }
        }
        if self.json {
            self.json_summary(steps_json, planned, conclusions, code);
            return;
        }
        let headers = ["STEP", "RESULT", "TIME", "TRIES", "DETAIL"];
        let widths: Vec<usize> = (0..5)
            .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0).max(headers[i].len()))
            .collect();
        self.write("");
        let head: Vec<String> = headers.iter().zip(&widths).map(|(h, w)| format!("{h:<w$}")).collect();
        let head = self.paint("1", head.join("  ").trim_end());
        self.write(&head);
        for row in rows {
            let (code, _) = conclusion_style(match row[1].as_str() {
                "success" => StepConclusion::Success,
                "skipped" => StepConclusion::Skipped,
                _ => StepConclusion::Failed,
            });
            let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            let mut line = cells.join("  ").trim_end().to_owned();
            if self.color {
                line = line.replacen(&row[1], &self.paint(code, &row[1]), 1);
            }
            self.write(&line);
        }
        self.write("");
        for p in planned {
            let conclusion = conclusions.get(&p.build).copied();
            let word = match conclusion {
                Some(Conclusion::Success) => self.paint("32;1", "succeeded"),
                Some(Conclusion::Failed) => self.paint("31;1", "failed"),
                Some(Conclusion::TimedOut) => self.paint("31;1", "timed out"),
                Some(Conclusion::Cancelled) => self.paint("33;1", "was cancelled"),
                Some(Conclusion::Errored) => self.paint("31;1", "errored (infrastructure)"),
                Some(Conclusion::Neutral) => self.paint("33;1", "was neutral (steps needing secrets were skipped)"),
                None => self.paint("33;1", "did not finish"),
            };
            let text = format!("pipeline {} {word} in {}", p.pipeline, human(self.started.elapsed()));
            self.write(&text);
        }
    }
}

fn record_style(status: StepRecordStatus) -> (&'static str, &'static str) {
    match status {
        StepRecordStatus::Waiting => ("33", "waiting"),
        StepRecordStatus::Running => ("33", "running"),
        StepRecordStatus::Success => conclusion_style(StepConclusion::Success),
        StepRecordStatus::Failed => conclusion_style(StepConclusion::Failed),
        StepRecordStatus::TimedOut => conclusion_style(StepConclusion::TimedOut),
        StepRecordStatus::Cancelled => conclusion_style(StepConclusion::Cancelled),
        StepRecordStatus::Errored => conclusion_style(StepConclusion::Errored),
        StepRecordStatus::Skipped => conclusion_style(StepConclusion::Skipped),
        StepRecordStatus::Rejected => conclusion_style(StepConclusion::Rejected),
        StepRecordStatus::Interrupted => conclusion_style(StepConclusion::Interrupted),
    }
}

impl Printer {
    /// The closing line of `--json`: each pipeline's conclusion, each step's result, and the
    /// exit code.
    fn json_summary(
        &mut self,
        steps: Vec<serde_json::Value>,
        planned: &[Planned],
        conclusions: &BTreeMap<BuildId, Conclusion>,
        code: u8,
    ) {
        let pipelines: Vec<serde_json::Value> = planned
            .iter()
            .map(|p| {
                let conclusion = conclusions.get(&p.build).and_then(|c| serde_json::to_value(c).ok());
                serde_json::json!({ "pipeline": p.pipeline, "build": p.build, "conclusion": conclusion })
            })
            .collect();
        let line = serde_json::json!({
            "type": "run_finished",
            "pipelines": pipelines,
            "steps": steps,
            "exit": code,
            "duration_ms": self.started.elapsed().as_millis() as u64,
        });
        self.write(&line.to_string());
    }
}

fn conclusion_style(c: StepConclusion) -> (&'static str, &'static str) {
    match c {
        StepConclusion::Success => ("32", "success"),
        StepConclusion::Failed => ("31", "failed"),
        StepConclusion::TimedOut => ("31", "timed out"),
        StepConclusion::Cancelled => ("33", "cancelled"),
        StepConclusion::Errored => ("31", "errored"),
        StepConclusion::Skipped => ("2", "skipped"),
        StepConclusion::Rejected => ("31", "rejected"),
        StepConclusion::Interrupted => ("33", "interrupted"),
    }
}

/// `850ms`, `4.2s`, `3m05s`.
fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    }
}
