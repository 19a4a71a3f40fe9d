//! The engine: the async driver around the pure machine.
//!
//! One loop: store the input, hand it to the machine, carry out the effects through the ports,
//! and feed completions back as inputs. It is a value (`Engine::start` returns a handle and a
//! future) so an embedder chooses the runtime. On start it replays the stored inputs to rebuild
//! the machine exactly, then reconciles with the executor: steps that were running when the
//! previous process stopped are re-attached to (followed from the output already stored to
//! their exit), and those of which nothing is left are reported interrupted. Stopping drains:
//! no step starts, running ones get a grace period, and whatever still runs is left running
//! for the next start.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::event::{BuildId, Event};
use crate::lease::LeaseError;
use crate::pipeline::{Config, Effect, Input, Machine, StepJob, StepResult, StepStatus, TimerId};
use crate::ports::{
    Attached, CacheJob, Clock, Executor, LogKey, LogSink, Notifier, Outcome, Secrets, StepRun, StopHandle, StopSignal,
    Store, StoreError, StoredInput, Stream, Vcs,
};
use crate::time::Timestamp;

/// The backends the engine works through.
#[derive(Clone)]
pub struct Ports {
    pub executor: Arc<dyn Executor>,
    pub vcs: Arc<dyn Vcs>,
    pub store: Arc<dyn Store>,
    pub notifiers: Vec<Arc<dyn Notifier>>,
    pub clock: Arc<dyn Clock>,
    pub secrets: Arc<dyn Secrets>,
    /// Publishes deliverables; [`crate::publish::NoPublisher`] for engines that publish nothing.
    pub publisher: Arc<dyn crate::publish::Publisher>,
    /// Keeps the files steps list in `artifacts`; [`crate::ports::NoArtifacts`] for engines
    /// that keep none.
    pub artifacts: Arc<dyn crate::ports::Artifacts>,
}

impl std::fmt::Debug for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ports").field("notifiers", &self.notifiers.len()).finish_non_exhaustive()
    }
}

/// Settings of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub machine: Config,
    /// Where build workspaces are checked out, one directory per build.
    pub workspace_root: PathBuf,
    /// How often time is told to the machine, so that leases are renewed and expired.
    pub tick_every: Duration,
    /// How often the executor removes what it holds for builds that are no longer live
    /// (containers, networks and volumes a crash or a lost cleanup left). Checked on ticks.
    pub reconcile_every: Duration,
    /// When the engine writes a snapshot of its state and drops the journal before it.
    pub snapshots: SnapshotPolicy,
}

/// The default for [`EngineConfig::reconcile_every`].
pub const RECONCILE_EVERY: Duration = Duration::from_secs(300);

/// When to write a snapshot: after `every_inputs` inputs, or after `every` when at least one
/// input came since the last one. A restart then replays at most that many inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotPolicy {
    pub every_inputs: u64,
    pub every: Duration,
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        SnapshotPolicy { every_inputs: 10_000, every: Duration::from_secs(600) }
    }
}

/// What a snapshot holds besides the machine: the timers the machine armed, which the engine
/// keeps. Timers are keyed by a tagged value, so they are written as pairs.
#[derive(serde::Serialize, serde::Deserialize)]
struct EngineSnapshot {
    timers: Vec<(TimerId, Timestamp)>,
    machine: serde_json::Value,
}

/// Why the engine stopped or refused an input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error("the store failed: {0}")]
    Store(#[from] StoreError),
    #[error("the resource pools are misconfigured: {0}")]
    Pools(#[from] LeaseError),
    #[error("the engine has stopped")]
    Stopped,
    /// The newest snapshot cannot be read; the journal before it is gone, so the engine does
    /// not start rather than start from a state that is not the real one.
    #[error("the stored snapshot cannot be read ({0}); restore the database from a backup, or start with an empty one")]
    Snapshot(String),
}

type Query = Box<dyn FnOnce(&Machine) + Send>;
type Reply = oneshot::Sender<Result<(), EngineError>>;

/// The most inputs the engine handles between two writes to the store.
const BATCH: usize = 256;

enum Command {
    Input(Box<Input>, Reply),
    Query(Query),
    Shutdown(oneshot::Sender<()>),
}

/// A piece of a step's output, as live readers see it (already masked by the executor).
#[derive(Debug, Clone)]
pub struct LogLine {
    pub key: LogKey,
    pub stream: Stream,
    pub data: Arc<[u8]>,
}

/// Talks to a running engine. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<Command>,
    events: broadcast::Sender<Event>,
    logs: broadcast::Sender<LogLine>,
    journal: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle").finish_non_exhaustive()
    }
}

impl EngineHandle {
    /// Hands an input to the engine; returns once it is stored and handled.
    pub async fn submit(&self, input: Input) -> Result<(), EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Input(Box::new(input), reply)).map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Live events from now on. A subscriber that falls behind misses events (the receiver
    /// says how many); the store has them all, for a resumable read.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Live output of every step from now on. Like events, a reader that falls behind misses
    /// pieces; the store has them all.
    pub fn subscribe_logs(&self) -> broadcast::Receiver<LogLine> {
        self.logs.subscribe()
    }

    /// How many inputs a restart would replay: the journal's length since the last snapshot.
    pub fn journal_length(&self) -> u64 {
        self.journal.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads the machine's state.
    pub async fn query<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Machine) -> R + Send + 'static,
    ) -> Result<R, EngineError> {
        let (reply, rx) = oneshot::channel();
        let query: Query = Box::new(move |m| {
            let _ = reply.send(f(m));
        });
        self.tx.send(Command::Query(query)).map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// Stops starting steps and waits up to `grace` for the running ones to finish. Returns
    /// whether none runs any more. Steps that outlast the grace period are left running: after
    /// [`EngineHandle::shutdown`] the next start re-attaches to them. A drained engine starts no
    /// step until it is started again.
    pub async fn drain(&self, grace: Duration) -> Result<bool, EngineError> {
        // Subscribed before the drain is stored, so that no step's end can slip between the
        // count and the wait.
        let mut events = self.events.subscribe();
        self.submit(Input::Drain).await?;
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            if self.query(Machine::running_steps).await? == 0 {
                return Ok(true);
            }
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Err(_) => return Ok(false),
                Ok(Err(broadcast::error::RecvError::Closed)) => return Err(EngineError::Stopped),
                // Any event (or a lag) is a reason to count again.
                Ok(_) => {}
            }
        }
    }

    /// Stops the engine loop after the input in hand. Steps still running are left running
    /// (the executor is told to detach from them); the next start re-attaches to them.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown(reply)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// The engine itself.
#[derive(Debug)]
pub struct Engine;

enum LogMessage {
    /// Output, and when it arrived.
    Data(LogKey, Vec<u8>, Timestamp),
    Finish(LogKey, oneshot::Sender<()>),
}

/// Output seen per step attempt: when last, and whether the machine has heard.
type OutputSeen = Arc<Mutex<HashMap<LogKey, (Timestamp, bool)>>>;

struct EngineSink {
    key: LogKey,
    tx: mpsc::UnboundedSender<LogMessage>,
    live: broadcast::Sender<LogLine>,
    clock: Arc<dyn Clock>,
    seen: OutputSeen,
}

impl LogSink for EngineSink {
    fn write(&self, stream: Stream, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let now = self.clock.now();
        if let Ok(mut seen) = self.seen.lock() {
            seen.insert(self.key.clone(), (now, false));
        }
        let _ = self.tx.send(LogMessage::Data(self.key.clone(), bytes.to_vec(), now));
        if self.live.receiver_count() > 0 {
            let _ = self.live.send(LogLine { key: self.key.clone(), stream, data: Arc::from(bytes) });
        }
    }
}

struct Runner {
    ports: Ports,
    config: EngineConfig,
    machine: Machine,
    timers: BTreeMap<TimerId, Timestamp>,
    stops: HashMap<(BuildId, String, u32), StopHandle>,
    workspaces: HashMap<BuildId, Arc<tokio::sync::OnceCell<Result<PathBuf, String>>>>,
    internal: mpsc::UnboundedSender<Input>,
    logs: mpsc::UnboundedSender<LogMessage>,
    seen: OutputSeen,
    events: broadcast::Sender<Event>,
    live_logs: broadcast::Sender<LogLine>,
    notify: mpsc::UnboundedSender<Event>,
    /// The journal's length since the last snapshot, for [`EngineHandle::journal_length`].
    journal: Arc<std::sync::atomic::AtomicU64>,
    /// The sequence number of the last input journaled, and that of the last snapshot.
    last_seq: u64,
    snapshot_seq: u64,
    /// When the last snapshot was written (or the engine started).
    snapshot_at: Timestamp,
}

impl Engine {
    /// Builds an engine. Drive the returned future (spawn it) and talk through the handle.
    pub fn start(ports: Ports, config: EngineConfig) -> (EngineHandle, impl Future<Output = Result<(), EngineError>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(4096);
        let (logs, _) = broadcast::channel(16384);
        let journal = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let handle = EngineHandle { tx, events: events.clone(), logs: logs.clone(), journal: journal.clone() };
        (handle, run(ports, config, rx, events, logs, journal))
    }
}

async fn run(
    ports: Ports,
    config: EngineConfig,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: broadcast::Sender<Event>,
    live_logs: broadcast::Sender<LogLine>,
    journal: Arc<std::sync::atomic::AtomicU64>,
) -> Result<(), EngineError> {
    let machine = Machine::new(config.machine.clone())?;
    let (internal, mut completions) = mpsc::unbounded_channel();
    let (logs, log_rx) = mpsc::unbounded_channel();
    let (notify, notify_rx) = mpsc::unbounded_channel();
    tokio::spawn(write_logs(ports.store.clone(), log_rx));
    tokio::spawn(notify_all(ports.notifiers.clone(), notify_rx));
    let mut runner = Runner {
        ports,
        config,
        machine,
        timers: BTreeMap::new(),
        stops: HashMap::new(),
        workspaces: HashMap::new(),
        internal,
        logs,
        seen: Arc::new(Mutex::new(HashMap::new())),
        events,
        live_logs,
        notify,
        journal,
        last_seq: 0,
        snapshot_seq: 0,
        snapshot_at: Timestamp(0),
    };
    runner.recover().await?;
    let mut next_tick = runner.ports.clock.now() + runner.config.tick_every;
    let mut next_reconcile = runner.ports.clock.now() + runner.config.reconcile_every;
    loop {
        let next_timer = runner.timers.values().min().copied();
        let wake = next_timer.map_or(next_tick, |t| t.min(next_tick)).min(next_reconcile);
        let clock = runner.ports.clock.clone();
        tokio::select! {
            command = commands.recv() => {
                // Inputs that are already waiting are handled as one batch with one write to
                // the store (see `process_batch`); a query or a shutdown waits for the inputs
                // sent before it, as callers expect.
                let Some(first) = command else { return Ok(()) };
                let mut batch = Vec::new();
                let mut after = None;
                match first {
                    Command::Input(input, reply) => batch.push((*input, Some(reply))),
                    other => after = Some(other),
                }
                while after.is_none() && batch.len() < BATCH {
                    match commands.try_recv() {
                        Ok(Command::Input(input, reply)) => batch.push((*input, Some(reply))),
                        Ok(other) => after = Some(other),
                        Err(_) => break,
                    }
                }
                while batch.len() < BATCH {
                    match completions.try_recv() {
                        Ok(input) => batch.push((input, None)),
                        Err(_) => break,
                    }
                }
                if !batch.is_empty() {
                    runner.process_batch(batch).await?;
                }
                match after {
                    Some(Command::Query(query)) => query(&runner.machine),
                    Some(Command::Shutdown(reply)) => {
                        runner.ports.executor.detach();
                        let _ = reply.send(());
                        return Ok(());
                    }
                    // Inputs all went into the batch.
                    Some(Command::Input(..)) | None => {}
                }
            },
            Some(input) = completions.recv() => {
                let mut batch = vec![(input, None)];
                while batch.len() < BATCH {
                    match completions.try_recv() {
                        Ok(input) => batch.push((input, None)),
                        Err(_) => break,
                    }
                }
                runner.process_batch(batch).await?;
            }
            () = clock.sleep_until(wake) => {
                let now = runner.ports.clock.now();
                if now >= next_tick {
                    next_tick = now + runner.config.tick_every;
                    runner.process(Input::Tick).await?;
                }
                if now >= next_reconcile {
                    next_reconcile = now + runner.config.reconcile_every;
                    runner.reconcile().await;
                }
                runner.fire_timers(now).await?;
                runner.snapshot_if_due(now).await?;
            }
        }
    }
}

impl Runner {
    /// Replays the journal into the machine, then repairs what the previous process left.
    async fn recover(&mut self) -> Result<(), EngineError> {
        let mut after = 0;
        if let Some((seq, data)) = self.ports.store.latest_snapshot().await? {
            let snapshot: EngineSnapshot =
                serde_json::from_slice(&data).map_err(|e| EngineError::Snapshot(e.to_string()))?;
            self.machine = Machine::restore(snapshot.machine).map_err(|e| EngineError::Snapshot(e.to_string()))?;
            self.timers = snapshot.timers.into_iter().collect();
            after = seq;
            self.snapshot_seq = seq;
        }
        let mut replayed_inputs = 0usize;
        // Events the previous process derived but did not store before it stopped are stored
        // now; those the store has are not written again, so a replay costs reads, not writes.
        let stored_events = self.ports.store.last_event_seq().await?;
        loop {
            let batch = self.ports.store.inputs_after(after, 1000).await?;
            if batch.is_empty() {
                break;
            }
            let mut missing = Vec::new();
            for (seq, stored) in batch {
                after = seq;
                replayed_inputs += 1;
                for effect in self.machine.handle(stored.input, stored.at) {
                    match effect {
                        Effect::ArmTimer { timer, at } => {
                            self.timers.insert(timer, at);
                        }
                        Effect::CancelTimer { timer } => {
                            self.timers.remove(&timer);
                        }
                        Effect::Publish(event) if event.seq > stored_events => missing.push(event),
                        _ => {}
                    }
                }
                // As the live engine did after this input.
                self.machine.forget_finished();
            }
            self.ports.store.append_events(&missing).await?;
        }
        self.last_seq = after;
        self.snapshot_at = self.ports.clock.now();
        self.journal.store(after - self.snapshot_seq, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            snapshot = self.snapshot_seq,
            replayed = replayed_inputs,
            live_builds = self.machine.builds().count(),
            "the engine's state is restored"
        );
        // A server started with other settings than the snapshot's says so to the machine, in
        // the journal, so that a later replay sees the same change at the same place.
        if self.machine.config() != &self.config.machine {
            self.process(Input::Configure { config: self.config.machine.clone() }).await?;
        }
        let live: Vec<BuildId> =
            self.machine.builds().filter(|b| b.finished_at.is_none()).map(|b| b.id.clone()).collect();
        if let Err(error) = self.ports.executor.reconcile(&live).await {
            tracing::warn!(%error, "reconcile after restart failed");
        }
        // Steps that were running are followed again where they are; the executor says when
        // nothing of one is left, and the machine then decides whether it runs again.
        let running: Vec<(BuildId, String, u32)> = self
            .machine
            .builds()
            .flat_map(|b| {
                b.steps.iter().filter_map(|s| match s.status {
                    StepStatus::Running { attempt } => Some((b.id.clone(), s.name.clone(), attempt)),
                    _ => None,
                })
            })
            .collect();
        for (build, step, attempt) in running {
            // The machine rebuilds the job from what the build holds: exactly the job the
            // previous process started the attempt with.
            match self.machine.running_job(&build, &step, attempt) {
                Some(job) => self.spawn_step(job, Mode::Attach),
                None => {
                    let result =
                        StepResult::Interrupted("the engine restarted and the step's job was not found".into());
                    self.process(Input::StepFinished { build, step, attempt, result }).await?;
                }
            }
        }
        // A publish that was running when the process stopped is done again: publishers are
        // idempotent (the same bytes again change nothing), and how far it got is unknown.
        let publishing: Vec<crate::publish::PublishJob> =
            self.machine.builds().filter_map(|b| self.machine.running_publish(&b.id)).collect();
        for job in publishing {
            self.spawn_publish(job);
        }
        // Services being started when the process stopped never said they were ready; whatever
        // was starting them died with it.
        let waiting: Vec<(BuildId, Vec<crate::spec::Service>)> = self
            .machine
            .builds()
            .map(|b| (b.id.clone(), b.services_waiting()))
            .filter(|(_, services)| !services.is_empty())
            .collect();
        for (build, services) in waiting {
            self.execute(Effect::StartServices { build, services });
        }
        if self.machine.draining() {
            self.process(Input::Resume).await?;
        }
        Ok(())
    }

    /// Removes what the executor holds for builds that are no longer live. It runs inside the
    /// engine's loop, which takes no input meanwhile: no build can start between reading the
    /// live builds and the executor's listing, so nothing a new build made is removed.
    async fn reconcile(&mut self) {
        let live: Vec<BuildId> =
            self.machine.builds().filter(|b| b.finished_at.is_none()).map(|b| b.id.clone()).collect();
        match self.ports.executor.reconcile(&live).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, live = live.len(), "removed what finished builds left behind"),
            Err(error) => tracing::warn!(%error, "the periodic reconcile failed"),
        }
    }

    async fn fire_timers(&mut self, now: Timestamp) -> Result<(), EngineError> {
        let due: Vec<TimerId> = self.timers.iter().filter(|(_, at)| **at <= now).map(|(t, _)| t.clone()).collect();
        for timer in due {
            self.timers.remove(&timer);
            if let TimerId::NoOutput { build, step, attempt } = &timer {
                // Tell the machine about output it has not heard of, so it judges the quiet
                // period from the last line rather than from when the timer was armed.
                let key = LogKey { build: build.clone(), step: step.clone(), attempt: *attempt };
                let unreported = self.seen.lock().ok().and_then(|mut seen| {
                    seen.get_mut(&key).filter(|(_, reported)| !reported).map(|entry| {
                        entry.1 = true;
                        entry.0
                    })
                });
                if let Some(at) = unreported {
                    let input = Input::StepOutput { build: build.clone(), step: step.clone(), attempt: *attempt, at };
                    self.process(input).await?;
                }
            }
            self.process(Input::TimerFired { timer }).await?;
        }
        Ok(())
    }

    /// Stores an input, hands it to the machine and carries out the effects.
    async fn process(&mut self, input: Input) -> Result<(), EngineError> {
        self.process_batch(vec![(input, None)]).await
    }

    /// Hands inputs to the machine in order, then stores their journal entries and the events
    /// they made in one write ([`Store::append_journal`]), and only then carries out the
    /// effects and answers the senders: nothing happens outside that a replay of the durable
    /// journal would not do again. One write per batch rather than two per input is what lets
    /// a busy engine keep up when a commit is a round trip and a flush away (a database server).
    ///
    /// An enqueue of a build that already ran is answered at once and not journaled. If the
    /// write fails, the machine has moved past the journal: every sender hears the error and
    /// the engine stops, so that a restart rebuilds the machine from what is stored.
    async fn process_batch(&mut self, batch: Vec<(Input, Option<Reply>)>) -> Result<(), EngineError> {
        // Which enqueued builds already ran is read before the machine moves, so that a failed
        // read leaves nothing half done. The machine forgets finished builds, so the store says.
        let mut ran = std::collections::HashSet::new();
        let mut inputs = Vec::with_capacity(batch.len());
        for (input, reply) in batch {
            if let Input::Enqueue { build, .. } = &input
                && self.machine.build(build).is_none()
                && !ran.contains(build)
            {
                match self.ports.store.build(build).await {
                    Ok(Some(_)) => {
                        ran.insert(build.clone());
                    }
                    Ok(None) => {}
                    Err(e) => {
                        match reply {
                            Some(reply) => {
                                let _ = reply.send(Err(e.into()));
                            }
                            None => return Err(e.into()),
                        }
                        continue;
                    }
                }
            }
            inputs.push((input, reply));
        }
        let mut journal = Vec::with_capacity(inputs.len());
        let mut effects = Vec::new();
        let mut events = Vec::new();
        let mut replies = Vec::with_capacity(inputs.len());
        for (input, reply) in inputs {
            let now = self.ports.clock.now();
            let from = effects.len();
            match input {
                // Time is an argument of every input, so a tick that changed nothing need not
                // be journaled: replaying without it gives the same machine. One that renewed
                // or expired a lease is journaled, after the fact, at the time it was handled.
                Input::Tick => {
                    let before = self.machine.clone();
                    let made = self.machine.handle(Input::Tick, now);
                    if made.is_empty() && self.machine == before {
                        replies.extend(reply);
                        continue;
                    }
                    journal.push(StoredInput { at: now, input: Input::Tick });
                    effects.extend(made);
                }
                Input::Enqueue { ref build, .. } if self.machine.build(build).is_none() && ran.contains(build) => {
                    // A replayed delivery must not run its build again.
                    tracing::debug!(%build, "a build with this id already ran; the input is ignored");
                    replies.extend(reply);
                    continue;
                }
                input => {
                    journal.push(StoredInput { at: now, input: input.clone() });
                    effects.extend(self.machine.handle(input, now));
                }
            }
            replies.extend(reply);
            // After every input, as a replay does, so that the machine a replay rebuilds is
            // this one. A build that finishes here is also one that already ran, for an
            // enqueue later in the batch: the store does not have its record yet.
            for effect in &effects[from..] {
                if let Effect::Publish(Event { body: crate::event::EventBody::BuildFinished { build, .. }, .. }) =
                    effect
                {
                    ran.insert(build.clone());
                }
            }
            self.machine.forget_finished();
        }
        let mut rest = Vec::with_capacity(effects.len());
        for effect in effects {
            match effect {
                Effect::Publish(event) => events.push(event),
                other => rest.push(other),
            }
        }
        if !journal.is_empty() || !events.is_empty() {
            match self.ports.store.append_journal(&journal, &events).await {
                Ok(last) => {
                    if let Some(last) = last {
                        self.last_seq = last;
                    }
                    let length = self.last_seq.saturating_sub(self.snapshot_seq);
                    self.journal.store(length, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!(error = %e, inputs = journal.len(), "cannot store the journal; the engine stops");
                    for reply in replies {
                        let _ = reply.send(Err(e.clone().into()));
                    }
                    return Err(e.into());
                }
            }
        }
        for effect in rest {
            self.execute(effect);
        }
        for event in events {
            let _ = self.events.send(event.clone());
            let _ = self.notify.send(event);
        }
        for reply in replies {
            let _ = reply.send(Ok(()));
        }
        if self.last_seq.saturating_sub(self.snapshot_seq) >= self.config.snapshots.every_inputs {
            self.snapshot().await?;
        }
        Ok(())
    }

    /// Writes a snapshot when the time for one has come and inputs came since the last.
    async fn snapshot_if_due(&mut self, now: Timestamp) -> Result<(), EngineError> {
        if self.last_seq > self.snapshot_seq && now.since(self.snapshot_at) >= self.config.snapshots.every {
            self.snapshot().await?;
        }
        Ok(())
    }

    /// Stores the machine and the armed timers as they are after the last input journaled, and
    /// drops the journal up to it. Called between inputs only, so the state matches `last_seq`.
    async fn snapshot(&mut self) -> Result<(), EngineError> {
        let snapshot = EngineSnapshot {
            timers: self.timers.iter().map(|(t, at)| (t.clone(), *at)).collect(),
            machine: self.machine.snapshot(),
        };
        let data = serde_json::to_vec(&snapshot).map_err(|e| EngineError::Snapshot(e.to_string()))?;
        self.ports.store.save_snapshot(self.last_seq, &data).await?;
        tracing::info!(seq = self.last_seq, bytes = data.len(), "wrote a snapshot of the engine's state");
        self.snapshot_seq = self.last_seq;
        self.snapshot_at = self.ports.clock.now();
        self.journal.store(0, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn workspace(&mut self, build: &BuildId) -> Arc<tokio::sync::OnceCell<Result<PathBuf, String>>> {
        self.workspaces.entry(build.clone()).or_default().clone()
    }

    fn execute(&mut self, effect: Effect) {
        match effect {
            Effect::Publish(_) => {}
            Effect::ArmTimer { timer, at } => {
                self.timers.insert(timer, at);
            }
            Effect::CancelTimer { timer } => {
                self.timers.remove(&timer);
            }
            Effect::StartStep(job) => self.spawn_step(*job, Mode::Run),
            Effect::PublishDeliverables(job) => self.spawn_publish(*job),
            Effect::StopStep { build, step, attempt, reason } => {
                if let Some(handle) = self.stops.get(&(build, step, attempt)) {
                    handle.stop(reason);
                }
            }
            Effect::StartServices { build, services } => {
                let executor = self.ports.executor.clone();
                let internal = self.internal.clone();
                tokio::spawn(async move {
                    match executor.start_services(&build, &services).await {
                        Ok(()) => {
                            for s in services {
                                let _ = internal.send(Input::ServiceReady { build: build.clone(), service: s.name });
                            }
                        }
                        Err((service, error)) => {
                            let message = error.to_string();
                            let _ = internal.send(Input::ServiceFailed { build, service, message });
                        }
                    }
                });
            }
            Effect::Cleanup { build } => {
                self.stops.retain(|(b, _, _), _| *b != build);
                self.workspaces.remove(&build);
                // The directory is removed by its path, not only when this process prepared it:
                // a build whose steps were all re-attached after a restart never prepares it
                // again, yet the previous process left it there.
                let dir = self.config.workspace_root.join(safe_dir_name(&build.0));
                let executor = self.ports.executor.clone();
                tokio::spawn(async move {
                    if let Err(error) = executor.cleanup(&build).await {
                        tracing::warn!(%build, %error, "cleanup failed; reconcile will retry");
                    }
                    if tokio::fs::try_exists(&dir).await.unwrap_or(false) {
                        let _ = tokio::fs::remove_dir_all(&dir).await;
                    }
                });
            }
        }
    }

    /// The sink a step's (or the publish phase's) output goes through: to the store's log
    /// writer, the live readers and the output-seen timer.
    fn sink(&self, key: &LogKey) -> Arc<EngineSink> {
        Arc::new(EngineSink {
            key: key.clone(),
            tx: self.logs.clone(),
            live: self.live_logs.clone(),
            clock: self.ports.clock.clone(),
            seen: self.seen.clone(),
        })
    }

    /// Publishes a build's deliverables on a task of its own, which reports back as an input.
    /// Its output goes to the log of the build's `publish` step.
    fn spawn_publish(&mut self, job: crate::publish::PublishJob) {
        let key = LogKey { build: job.build.clone(), step: crate::spec::PUBLISH_STEP.to_owned(), attempt: job.attempt };
        let workspace = self.workspace(&job.build);
        let dir = self.config.workspace_root.join(safe_dir_name(&job.build.0));
        let ports = self.ports.clone();
        let internal = self.internal.clone();
        let logs = self.logs.clone();
        let sink = self.sink(&key);
        let environment = self
            .machine
            .build(&job.build)
            .filter(|b| b.pipeline.kind == crate::spec::PipelineKind::Deploy)
            .map(|b| b.pipeline.name.clone());
        tokio::spawn(async move {
            let (build, attempt) = (job.build.clone(), job.attempt);
            let result = publish(&ports, job, environment, workspace, dir, sink).await;
            let (done, finished) = oneshot::channel();
            let _ = logs.send(LogMessage::Finish(key, done));
            let _ = finished.await;
            let _ = internal.send(Input::Published { build, attempt, outcome: result.into() });
        });
    }

    /// Runs a step attempt (or, after a restart, follows one already running) on a task of its
    /// own, which reports the result back as an input.
    fn spawn_step(&mut self, job: StepJob, mode: Mode) {
        let key = LogKey { build: job.build.clone(), step: job.step.name.clone(), attempt: job.attempt };
        let (handle, stop) = StopSignal::new();
        self.stops.insert((job.build.clone(), job.step.name.clone(), job.attempt), handle);
        let workspace = self.workspace(&job.build);
        let dir = self.config.workspace_root.join(safe_dir_name(&job.build.0));
        let ports = self.ports.clone();
        let internal = self.internal.clone();
        let logs = self.logs.clone();
        let sink = self.sink(&key);
        let seen = self.seen.clone();
        // Every secret any step of the build asks for is masked in every step's output.
        let mut build_secrets: Vec<String> = self
            .machine
            .build(&job.build)
            .map(|b| b.pipeline.steps.iter().flat_map(|s| s.secrets.iter().cloned()).collect())
            .unwrap_or_default();
        build_secrets.sort();
        build_secrets.dedup();
        // A deploy pipeline's environment is named after it, as in the machine's record of
        // what runs where; secrets scoped to environments match that name.
        let environment = self
            .machine
            .build(&job.build)
            .filter(|b| b.pipeline.kind == crate::spec::PipelineKind::Deploy)
            .map(|b| b.pipeline.name.clone());
        tokio::spawn(async move {
            let result = match mode {
                Mode::Run => {
                    run_step(&ports, job.clone(), &build_secrets, environment, workspace, dir, sink, stop).await
                }
                Mode::Attach => attach_step(&ports, job.clone(), &build_secrets, environment, dir, sink, stop).await,
            };
            let (done, finished) = oneshot::channel();
            let _ = logs.send(LogMessage::Finish(key.clone(), done));
            let _ = finished.await;
            if let Ok(mut seen) = seen.lock() {
                seen.remove(&key);
            }
            let input = Input::StepFinished { build: job.build, step: job.step.name, attempt: job.attempt, result };
            let _ = internal.send(input);
        });
    }
}

/// Whether a step task starts the attempt or follows one that an earlier process started.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Run,
    Attach,
}

/// Finds a step attempt that an earlier process started and follows it to its end, with its
/// output from where the store's copy stops.
async fn attach_step(
    ports: &Ports,
    job: StepJob,
    build_secrets: &[String],
    environment: Option<String>,
    dir: PathBuf,
    sink: Arc<EngineSink>,
    stop: StopSignal,
) -> StepResult {
    let key = LogKey { build: job.build.clone(), step: job.step.name.clone(), attempt: job.attempt };
    // The read is clamped to the log's length, so this asks for where the stored output ends.
    let offset = match ports.store.read_log(&key, u64::MAX, 1).await {
        Ok(read) => read.next_offset,
        Err(error) => {
            tracing::warn!(%error, build = %key.build, step = %key.step, "cannot read how much output is stored");
            0
        }
    };
    // The same secrets as the first run, so that the output is masked the same way and the
    // stored offset falls at the same place in it.
    let (secrets, mask, notice) = match step_secrets(ports, &job, build_secrets, environment.as_deref()).await {
        Ok(found) => found,
        Err(message) => return StepResult::Interrupted(message),
    };
    // The stored log begins with cib's own notice, which the step's output does not hold.
    let offset = offset.saturating_sub(notice.len() as u64);
    let run = StepRun { job, secrets, mask, workspace: dir };
    match ports.executor.attach(&run, offset, sink, stop).await {
        Ok(Attached::Ended { outcome, was_running }) => {
            tracing::info!(build = %key.build, step = %key.step, attempt = key.attempt, was_running, ?outcome, "re-attached to a step after a restart");
            outcome_result(Ok(outcome))
        }
        Ok(Attached::Gone) => {
            StepResult::Interrupted("the engine stopped while the step ran, and nothing of it was left".into())
        }
        // Whether the step ran cannot be told, which is what interrupted means.
        Err(error) => StepResult::Interrupted(format!("the step could not be found again: {error}")),
    }
}

fn outcome_result(outcome: Result<Outcome, crate::ports::ExecError>) -> StepResult {
    match outcome {
        Ok(Outcome::Exited(code)) => StepResult::Exited(code),
        Ok(Outcome::TimedOut) => StepResult::TimedOut,
        Ok(Outcome::NoOutput) => StepResult::NoOutput,
        Ok(Outcome::OutOfMemory) => StepResult::OutOfMemory,
        Ok(Outcome::Cancelled) => StepResult::Cancelled,
        Err(error) => StepResult::Infrastructure(error.to_string()),
    }
}

/// Prepares the build's workspace (once per build, whoever asks first) and answers its path.
async fn prepare_workspace(
    ports: &Ports,
    workspace: &tokio::sync::OnceCell<Result<PathBuf, String>>,
    dir: &std::path::Path,
    repo: &str,
    commit: &str,
) -> Result<PathBuf, String> {
    workspace
        .get_or_init(|| async {
            // A directory left by a previous process (a restart mid-build) is started afresh:
            // a checkout needs an empty directory, and stale files must not leak into the build.
            if tokio::fs::try_exists(dir).await.unwrap_or(false) {
                let _ = tokio::fs::remove_dir_all(dir).await;
            }
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| format!("cannot create the workspace {}: {e}", dir.display()))?;
            ports
                .vcs
                .prepare_workspace(repo, commit, dir)
                .await
                .map_err(|e| format!("cannot check out {repo} at {commit}: {e}"))?;
            Ok(dir.to_path_buf())
        })
        .await
        .clone()
}

/// Publishes a build's deliverables: the credentials they name come from the secret store,
/// decided on the build's facts like a step's secrets, and go to the publisher alone.
async fn publish(
    ports: &Ports,
    job: crate::publish::PublishJob,
    environment: Option<String>,
    workspace: Arc<tokio::sync::OnceCell<Result<PathBuf, String>>>,
    dir: PathBuf,
    sink: Arc<EngineSink>,
) -> Result<Vec<crate::publish::Artifact>, crate::publish::PublishError> {
    use crate::ports::ErrorKind;
    use crate::publish::{PublishError, PublishRun};
    let fail =
        |kind, deliverable: String, message: String| PublishError { kind, deliverable, message, published: Vec::new() };
    // A promotion needs no workspace: it publishes what another build published.
    let builds_here = job.deliverables.iter().any(|d| d.from().is_none());
    let workspace = if builds_here {
        let dir = prepare_workspace(ports, &workspace, &dir, &job.context.repo, &job.context.commit)
            .await
            .map_err(|m| fail(ErrorKind::Transient, "workspace".into(), m))?;
        // What the steps made (a wheel in dist/) is where the steps ran, which may not be here.
        ports.executor.export_workspace(&job.build, &dir).await.map_err(|e| {
            fail(e.kind(), "workspace".into(), format!("cannot read what the steps left in the workspace: {e}"))
        })?;
        dir
    } else {
        dir
    };
    let facts = crate::policy::BuildFacts {
        repo: &job.context.repo,
        branch: job.context.branch.as_deref(),
        pull_request: job.context.pull_request.is_some(),
        pipeline: &job.pipeline,
        environment: environment.as_deref(),
        trusted: job.context.trusted,
    };
    let mut names: Vec<String> = job.deliverables.iter().filter_map(|d| d.credentials().map(str::to_owned)).collect();
    names.sort();
    names.dedup();
    // The machine publishes nothing for an untrusted build; no credential is even looked up.
    let credentials = if names.is_empty() || !job.context.trusted {
        BTreeMap::new()
    } else {
        let found =
            ports.secrets.for_step(&facts, &names).await.map_err(|m| {
                fail(ErrorKind::Transient, "credentials".into(), format!("cannot read the secrets: {m}"))
            })?;
        if let Some((name, why)) = found.withheld.first() {
            let d = job.deliverables.iter().find(|d| d.credentials() == Some(name.as_str()));
            let deliverable = d.map(|d| format!("{} {}", d.kind(), d.target())).unwrap_or_default();
            return Err(fail(ErrorKind::Misconfigured, deliverable, format!("secret '{name}' is withheld: {why}")));
        }
        found.values
    };
    let run = PublishRun { job, workspace, credentials };
    ports.publisher.publish(&run, sink).await
}

/// Prepares the build's workspace once, resolves the step's secrets and runs it, with the
/// values of the build's other secrets (`build_secrets`, names) to mask in its output.
// The step's context comes in parts the loop already holds; bundling them into a struct would
// only move the same list elsewhere.
#[allow(clippy::too_many_arguments)]
async fn run_step(
    ports: &Ports,
    job: StepJob,
    build_secrets: &[String],
    environment: Option<String>,
    workspace: Arc<tokio::sync::OnceCell<Result<PathBuf, String>>>,
    dir: PathBuf,
    sink: Arc<EngineSink>,
    stop: StopSignal,
) -> StepResult {
    let prepared = prepare_workspace(ports, &workspace, &dir, &job.context.repo, &job.context.commit).await;
    let workspace = match prepared {
        Ok(dir) => dir,
        Err(message) => return StepResult::Infrastructure(message),
    };
    let (secrets, mask, notice) = match step_secrets(ports, &job, build_secrets, environment.as_deref()).await {
        Ok(found) => found,
        Err(message) => return StepResult::Infrastructure(message),
    };
    sink.write(Stream::Stderr, notice.as_bytes());
    let run = StepRun { job, secrets, mask, workspace };
    if let Err(message) = restore_artifacts(ports, &run, sink.as_ref()).await {
        sink.write(Stream::Stderr, format!("cib: {message}\n").as_bytes());
        return StepResult::Infrastructure(message);
    }
    let caches = match restore_caches(ports, &run, sink.as_ref()).await {
        Ok(caches) => caches,
        Err(message) => {
            sink.write(Stream::Stderr, format!("cib: {message}\n").as_bytes());
            return StepResult::Infrastructure(message);
        }
    };
    let outcome = ports.executor.run(&run, sink.clone(), stop).await;
    if matches!(outcome, Ok(Outcome::Exited(0))) {
        save_caches(ports, &run, &caches, sink.as_ref()).await;
    }
    if matches!(outcome, Ok(Outcome::Exited(0)))
        && let Err(message) = keep_artifacts(ports, &run, sink.as_ref()).await
    {
        // The step's work is not whole without its artifacts: later pipelines would miss them.
        sink.write(Stream::Stderr, format!("cib: {message}\n").as_bytes());
        return StepResult::Infrastructure(message);
    }
    outcome_result(outcome)
}

/// Resolves the step's cache keys against the checkout (`{{ checksum 'path' }}` is the file's
/// SHA-256) and restores each cache; answers the caches with whether their exact key was hit.
/// A key that names a missing file fails the step: its cache could never be right.
async fn restore_caches(ports: &Ports, run: &StepRun, sink: &dyn LogSink) -> Result<Vec<(CacheJob, bool)>, String> {
    use sha2::Digest as _;
    let job = &run.job;
    let (write, reads) = crate::policy::cache_namespaces(&job.context);
    let mut out = Vec::new();
    for cache in &job.step.cache {
        let mut key = String::new();
        for part in &cache.key {
            match part {
                crate::spec::CacheKeyPart::Text(text) => key.push_str(text),
                crate::spec::CacheKeyPart::Checksum(path) => {
                    let bytes = tokio::fs::read(run.workspace.join(path))
                        .await
                        .map_err(|e| format!("the cache key's checksum of '{path}': {e}"))?;
                    key.push_str(&hex::encode(sha2::Sha256::digest(&bytes)));
                }
            }
        }
        let cache = CacheJob {
            repo: job.context.repo.clone(),
            key,
            restore_keys: cache.restore_keys.clone(),
            paths: cache.paths.clone(),
            write: write.clone(),
            reads: reads.clone(),
        };
        let restored = ports
            .executor
            .restore_cache(run, &cache)
            .await
            .map_err(|e| format!("cannot restore the cache '{}': {e}", cache.key))?;
        let line = match &restored {
            Some(found) if *found == cache.key => format!("cib: restored the cache '{found}'\n"),
            Some(found) => format!("cib: restored the cache '{found}' for the key '{}'\n", cache.key),
            None => format!("cib: no cache for the key '{}'\n", cache.key),
        };
        sink.write(Stream::Stderr, line.as_bytes());
        let hit = restored.as_deref() == Some(cache.key.as_str());
        out.push((cache, hit));
    }
    Ok(out)
}

/// Saves the caches whose key was not restored exactly. A cache that cannot be saved is worth
/// a line in the log, not a failed step: the next build only runs slower.
async fn save_caches(ports: &Ports, run: &StepRun, caches: &[(CacheJob, bool)], sink: &dyn LogSink) {
    for (cache, hit) in caches {
        if *hit {
            continue;
        }
        let line = match ports.executor.save_cache(run, cache).await {
            Ok(true) => format!("cib: saved the cache '{}'\n", cache.key),
            Ok(false) => format!("cib: the cache '{}' was saved already\n", cache.key),
            Err(e) => format!("cib: cannot save the cache '{}': {e}\n", cache.key),
        };
        sink.write(Stream::Stderr, line.as_bytes());
    }
}

/// Unpacks the artifacts the step needs (`needs_artifacts`: other pipelines' steps on the same
/// commit) into its workspace. A trusted build takes only what trusted builds made.
async fn restore_artifacts(ports: &Ports, run: &StepRun, sink: &dyn LogSink) -> Result<(), String> {
    let job = &run.job;
    for need in &job.step.needs_artifacts {
        let query = crate::ports::ArtifactQuery {
            repo: &job.context.repo,
            commit: &job.context.commit,
            pipeline: &need.pipeline,
            step: &need.step,
            trusted_only: job.context.trusted,
        };
        let what = format!("the artifacts of {}/{}", need.pipeline, need.step);
        let record = ports
            .artifacts
            .find(&query, ports.clock.now())
            .await
            .map_err(|e| format!("cannot look for {what}: {e}"))?
            .ok_or_else(|| {
                format!(
                    "{what} on commit {} are not there: run pipeline '{}' on this commit first (or they expired)",
                    job.context.commit, need.pipeline
                )
            })?;
        let files =
            ports.artifacts.unpack(&record, &run.workspace).await.map_err(|e| format!("cannot unpack {what}: {e}"))?;
        let archive = ports.artifacts.archive_path(&record);
        ports
            .executor
            .import_archive(run, &archive)
            .await
            .map_err(|e| format!("cannot copy {what} into the workspace: {e}"))?;
        sink.write(
            Stream::Stderr,
            format!("cib: restored {what} from build {} ({files} files, sha256 {})\n", record.build, record.sha256)
                .as_bytes(),
        );
    }
    Ok(())
}

/// Packs and keeps the files the step lists in `artifacts`, once it succeeded. The executor
/// first copies what the step left into the host workspace, which the store packs from.
async fn keep_artifacts(ports: &Ports, run: &StepRun, sink: &dyn LogSink) -> Result<(), String> {
    let job = &run.job;
    let Some(kept) = &job.step.artifacts else { return Ok(()) };
    ports
        .executor
        .export_workspace(&job.build, &run.workspace)
        .await
        .map_err(|e| format!("cannot read what the step left in the workspace: {e}"))?;
    let now = ports.clock.now();
    let new = crate::ports::NewArtifact {
        build: job.build.clone(),
        name: job.step.name.clone(),
        repo: job.context.repo.clone(),
        commit: job.context.commit.clone(),
        pipeline: job.pipeline.clone(),
        trusted: job.context.trusted,
        created_at: now,
        expires_at: now + kept.expire.as_std(),
    };
    let record = ports
        .artifacts
        .save(new, &run.workspace, &kept.paths)
        .await
        .map_err(|e| format!("cannot keep the artifacts: {e}"))?;
    sink.write(
        Stream::Stderr,
        format!(
            "cib: kept {} files as artifact '{}' ({} bytes, sha256 {}), until {}\n",
            record.files,
            record.name,
            record.size,
            record.sha256,
            record.expires_at.rfc3339_secs()
        )
        .as_bytes(),
    );
    Ok(())
}

/// The values of the step's secrets, those of the build's other secrets to mask, and the notice
/// that goes at the head of the step's log, naming the secrets withheld and why.
async fn step_secrets(
    ports: &Ports,
    job: &StepJob,
    build_secrets: &[String],
    environment: Option<&str>,
) -> Result<(BTreeMap<String, String>, Vec<String>, String), String> {
    let facts = crate::policy::BuildFacts {
        repo: &job.context.repo,
        branch: job.context.branch.as_deref(),
        pull_request: job.context.pull_request.is_some(),
        pipeline: &job.pipeline,
        environment,
        trusted: job.context.trusted,
    };
    // Defence in depth: the machine already skips such steps, but an untrusted build never
    // has a secret looked up at all.
    let names: &[String] = if job.context.trusted { &job.step.secrets } else { &[] };
    let mut notice = String::new();
    let secrets = if names.is_empty() {
        BTreeMap::new()
    } else {
        match ports.secrets.for_step(&facts, names).await {
            Ok(found) => {
                // A withheld secret is absent from the step's environment, as on other CI
                // services; the log says which and why, so a failing deploy explains itself.
                for (name, why) in &found.withheld {
                    notice.push_str(&format!("cib: secret '{name}' is withheld: {why}\n"));
                }
                found.values
            }
            Err(message) => return Err(format!("cannot read the secrets: {message}")),
        }
    };
    // The build's other secrets, those this build may have, are only masked: the step does
    // not get them, but its output cannot show them either.
    let others: Vec<String> = if job.context.trusted {
        build_secrets.iter().filter(|name| !secrets.contains_key(*name)).cloned().collect()
    } else {
        Vec::new()
    };
    let mask: Vec<String> = if others.is_empty() {
        Vec::new()
    } else {
        match ports.secrets.for_step(&facts, &others).await {
            Ok(found) => found.values.into_values().collect(),
            Err(message) => return Err(format!("cannot read the secrets: {message}")),
        }
    };
    Ok((secrets, mask, notice))
}

/// Build ids are chosen by callers; a directory name must not escape the workspace root.
fn safe_dir_name(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// Writes output to the store in batches: whatever arrived while the last write ran goes in
/// the next one, so a chatty step costs few writes.
/// How many logs the writer appends to at once. Appends to different logs are independent;
/// a store with a pool (PostgreSQL) or a group commit (SQLite's writer) turns several at once
/// into fewer commits, and a step's end waits for its log, so one append at a time made steps
/// finish at the pace of the store's commits under load.
const LOG_WRITES_AT_ONCE: usize = 16;

/// How long output may wait in memory to be joined with more of the same log before it is
/// stored. Readers of the stored log (the API's log stream polls every 200 ms) see it that
/// much later; live readers get every piece at once through [`EngineHandle::subscribe_logs`].
/// A step's end stores its output at once. Under load this turns a chatty step's many small
/// appends, each a transaction, into a few.
const LOG_WINDOW: Duration = Duration::from_millis(100);

/// Output held for longer than [`LOG_WINDOW`] is stored even sooner when this many bytes wait.
const LOG_HELD_BYTES: usize = 4 << 20;

async fn write_logs(store: Arc<dyn Store>, mut rx: mpsc::UnboundedReceiver<LogMessage>) {
    // When each log was last marked with a time: marks are kept to about one a second.
    let mut marked: HashMap<LogKey, Timestamp> = HashMap::new();
    // Output not stored yet, each log's pieces joined in order, with the time of the first.
    let mut held: HashMap<LogKey, (Vec<u8>, Timestamp)> = HashMap::new();
    let mut held_bytes = 0usize;
    let mut held_since: Option<tokio::time::Instant> = None;
    loop {
        let message = match held_since {
            Some(since) => tokio::select! {
                message = rx.recv() => message,
                () = tokio::time::sleep_until(since + LOG_WINDOW) => {
                    flush(&store, held.drain().collect(), &mut marked).await;
                    (held_bytes, held_since) = (0, None);
                    continue;
                }
            },
            None => rx.recv().await,
        };
        let Some(first) = message else {
            flush(&store, held.drain().collect(), &mut marked).await;
            return;
        };
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
            if batch.len() >= 1024 {
                break;
            }
        }
        let mut finishes = Vec::new();
        for message in batch {
            match message {
                LogMessage::Data(key, data, at) => {
                    held_bytes += data.len();
                    held_since.get_or_insert_with(tokio::time::Instant::now);
                    held.entry(key).or_insert_with(|| (Vec::new(), at)).0.extend_from_slice(&data);
                }
                LogMessage::Finish(key, done) => finishes.push((key, done)),
            }
        }
        if held_bytes >= LOG_HELD_BYTES {
            flush(&store, held.drain().collect(), &mut marked).await;
            (held_bytes, held_since) = (0, None);
        }
        if finishes.is_empty() {
            continue;
        }
        // A log's end follows its output: what is held of the finishing logs is stored first.
        let ending: Vec<(LogKey, (Vec<u8>, Timestamp))> =
            finishes.iter().filter_map(|(key, _)| held.remove_entry(key)).collect();
        held_bytes = held.values().map(|(data, _)| data.len()).sum();
        if held.is_empty() {
            held_since = None;
        }
        flush(&store, ending, &mut marked).await;
        let finished = futures_util::stream::iter(finishes)
            .map(|(key, done)| {
                let store = store.clone();
                async move {
                    if let Err(error) = store.finish_log(&key).await {
                        tracing::warn!(%error, "cannot finish a log");
                    }
                    (key, done)
                }
            })
            .buffer_unordered(LOG_WRITES_AT_ONCE)
            .collect::<Vec<_>>()
            .await;
        for (key, done) in finished {
            marked.remove(&key);
            let _ = done.send(());
        }
    }
}

/// Appends each log's output, several logs at once, and marks the time of those not marked
/// for a second.
async fn flush(
    store: &Arc<dyn Store>,
    pending: Vec<(LogKey, (Vec<u8>, Timestamp))>,
    marked: &mut HashMap<LogKey, Timestamp>,
) {
    let writes = pending.into_iter().map(|(key, (data, at))| {
        let due = marked.get(&key).is_none_or(|last| at.since(*last) >= Duration::from_secs(1));
        let store = store.clone();
        async move {
            match store.append_log(&key, &data).await {
                Ok(length) if due => {
                    let start = length.saturating_sub(data.len() as u64);
                    if let Err(error) = store.mark_log_time(&key, start, at).await {
                        tracing::debug!(%error, "cannot mark a log's time");
                    }
                    Some((key, at))
                }
                Ok(_) => None,
                Err(error) => {
                    tracing::warn!(%error, build = %key.build, step = %key.step, "cannot store output");
                    None
                }
            }
        }
    });
    let marks: Vec<Option<(LogKey, Timestamp)>> =
        futures_util::stream::iter(writes).buffer_unordered(LOG_WRITES_AT_ONCE).collect().await;
    marked.extend(marks.into_iter().flatten());
}

/// Sends events to every notifier in order; a failing notifier is logged, never blocks the engine.
async fn notify_all(notifiers: Vec<Arc<dyn Notifier>>, mut rx: mpsc::UnboundedReceiver<Event>) {
    while let Some(event) = rx.recv().await {
        for notifier in &notifiers {
            if let Err(error) = notifier.publish(&event).await {
                tracing::warn!(%error, seq = event.seq, "a notifier failed");
            }
        }
    }
}

/// The wall clock, for engines that run for real.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

#[async_trait::async_trait]
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
