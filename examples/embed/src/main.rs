//! Embedding cib: runs one pipeline of a directory's `.cib.yml` with cib-core's engine, on
//! Docker (`cib-docker`), with a SQLite store (`cib-store`) and a notifier of its own that
//! prints every event as a line of JSON.
//!
//! ```text
//! cib-embed DIR [PIPELINE]
//! ```
//!
//! It exits 0 when the build succeeds, 1 when it concludes otherwise, and 2 when it cannot
//! start (no spec, no such pipeline, no Docker). `docs/embedding.md` walks through this file.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use cib_core::engine::{Engine, EngineConfig, Ports, SnapshotPolicy, SystemClock};
use cib_core::event::{BuildId, Conclusion, Event, EventBody};
use cib_core::pipeline::{BuildContext, Config, Input};
use cib_core::policy::BuildFacts;
use cib_core::ports::{Executor, Notifier, NotifyError, Secrets, StepSecrets, Vcs};
use cib_core::spec::{self, EventKind, TriggerEvent};
use tokio::sync::mpsc;

// ANCHOR: notifier
/// A notifier that prints each event as one line of JSON on standard output, and tells the
/// program when the build has finished.
///
/// The engine calls `publish` for every event, in order, after the event is stored. The port
/// asks that publishing an event twice leave the same result, since events may be replayed
/// after a crash: printing a line again is harmless.
struct PrintingNotifier {
    finished: mpsc::UnboundedSender<Conclusion>,
}

#[async_trait::async_trait]
impl Notifier for PrintingNotifier {
    async fn publish(&self, event: &Event) -> Result<(), NotifyError> {
        let line = serde_json::to_string(event).map_err(|e| NotifyError::Permanent(e.to_string()))?;
        writeln!(std::io::stdout().lock(), "{line}").map_err(|e| NotifyError::Transient(e.to_string()))?;
        if let EventBody::BuildFinished { conclusion, .. } = &event.body {
            // The receiver is gone only when the program is already ending.
            let _ = self.finished.send(*conclusion);
        }
        Ok(())
    }

    fn name(&self) -> &str {
        "print"
    }
}
// ANCHOR_END: notifier

// ANCHOR: secrets
/// The secrets a step gets. This program has none to give, so a step that asks for one is
/// told, in its log, that no secret of that name is configured. A server would check each
/// secret's scope against the build's facts here (`cib_core::policy::check_secret`).
struct NoSecrets;

#[async_trait::async_trait]
impl Secrets for NoSecrets {
    async fn for_step(&self, _build: &BuildFacts<'_>, asked: &[String]) -> Result<StepSecrets, String> {
        Ok(StepSecrets::pick(&BTreeMap::new(), asked))
    }
}
// ANCHOR_END: secrets

fn say(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "cib-embed: {text}");
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        say("usage: cib-embed DIR [PIPELINE]");
        return ExitCode::from(2);
    };
    let pipeline = args.next().map(|p| p.to_string_lossy().into_owned());
    match run(dir, pipeline).await {
        Ok(Conclusion::Success) => ExitCode::SUCCESS,
        Ok(other) => {
            say(&format!("the build concluded {other:?}"));
            ExitCode::from(1)
        }
        Err(message) => {
            say(&message);
            ExitCode::from(2)
        }
    }
}

async fn run(dir: PathBuf, pipeline: Option<String>) -> Result<Conclusion, String> {
    let dir = dir.canonicalize().map_err(|e| format!("cannot open {}: {e}", dir.display()))?;
    let repo = dir.to_string_lossy().into_owned();

    // ANCHOR: ports
    // The version control port: the directory's files as they are, Git or not.
    let vcs = Arc::new(cib_git::WorkingTree::new(&dir));
    let source = vcs
        .read_spec(&repo, "HEAD")
        .await
        .map_err(|e| format!("cannot read the spec: {e}"))?
        .ok_or_else(|| format!("no {} in {}", spec::FILE_NAME, dir.display()))?;
    let parsed = spec::parse(&source).map_err(|diags| {
        let shown = dir.join(spec::FILE_NAME).display().to_string();
        diags.iter().map(|d| d.render(&shown, &source)).collect::<Vec<_>>().join("\n")
    })?;
    let pipeline = match pipeline {
        Some(name) => parsed.pipeline(&name).ok_or_else(|| format!("no pipeline '{name}' in the spec"))?,
        None => parsed.pipelines.first().ok_or("the spec has no pipeline")?,
    };

    // The executor: every step in a container. The instance name labels what it makes in
    // Docker, so two programs on one daemon never remove each other's containers.
    let instance = format!("cib-embed-{}", std::process::id());
    let executor = cib_docker::DockerExecutor::connect(cib_docker::DockerOptions::new(instance))
        .await
        .map_err(|e| format!("cannot use Docker: {e}"))?;
    let executor = Arc::new(executor);

    // The store: the journal, events and logs in one SQLite file, here a temporary one.
    let data = tempfile::tempdir().map_err(|e| format!("cannot make a temporary directory: {e}"))?;
    let store = cib_store::SqliteStore::open(data.path().join("cib.db"), cib_store::SqliteOptions::default())
        .map_err(|e| format!("cannot open the store: {e}"))?;

    let (finished, mut conclusions) = mpsc::unbounded_channel();
    let ports = Ports {
        executor: executor.clone(),
        vcs,
        store: Arc::new(store),
        notifiers: vec![Arc::new(PrintingNotifier { finished })],
        clock: Arc::new(SystemClock),
        secrets: Arc::new(NoSecrets),
        publisher: Arc::new(cib_core::publish::NoPublisher),
        artifacts: Arc::new(cib_core::ports::NoArtifacts),
    };
    // ANCHOR_END: ports

    // ANCHOR: engine
    let config = EngineConfig {
        machine: Config { max_running_steps: 2, ..Config::default() },
        workspace_root: data.path().join("workspaces"),
        tick_every: Duration::from_secs(30),
        reconcile_every: cib_core::engine::RECONCILE_EVERY,
        snapshots: SnapshotPolicy::default(),
    };
    // `start` gives a handle and the engine's loop, which runs until `shutdown`.
    let (engine, future) = Engine::start(ports, config);
    let engine_task = tokio::spawn(future);

    let build = BuildId(format!("embed-{}", std::process::id()));
    let branch = parsed.integration_branch().to_owned();
    let enqueue = Input::Enqueue {
        build: build.clone(),
        spec: Arc::from(source.as_str()),
        pipeline: pipeline.name.clone(),
        context: BuildContext {
            repo,
            commit: "0".repeat(40),
            branch: Some(branch.clone()),
            pull_request: None,
            event: TriggerEvent::of(EventKind::Push, &branch),
            actor: None,
            // A build of one's own directory is trusted: its steps may be given secrets.
            trusted: true,
            upstream: None,
        },
        only: None,
        variables: BTreeMap::new(),
    };
    engine.submit(enqueue).await.map_err(|e| format!("the engine stopped: {e}"))?;

    // The notifier says when the build is over.
    let conclusion = conclusions.recv().await.ok_or("the engine stopped before the build finished")?;
    // ANCHOR_END: engine

    // ANCHOR: stop
    // The engine removes a finished build's containers, volume and network on a task of its
    // own. This program is about to end, so it waits for that, then asks once more itself
    // (cleanup may be repeated), so that nothing is left in Docker.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while executor.resources(Some(&build)).await.is_ok_and(|r| !r.is_empty()) && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Executor::cleanup(&*executor, &build).await.map_err(|e| format!("could not remove everything of {build}: {e}"))?;
    engine.shutdown().await;
    let _ = engine_task.await;
    // ANCHOR_END: stop
    Ok(conclusion)
}
