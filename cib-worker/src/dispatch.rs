//! The server's side of remote workers: [`BrokerExecutor`], an [`Executor`] that runs a step by
//! publishing a job to the broker and waiting for a worker to claim it, stream its output and
//! report its result through the worker API (whose HTTP handlers, in `cib-server`, call the
//! `claim`, `workspace`, `output`, `heartbeat` and `finish` methods here).
//!
//! At least once, with fencing:
//! - the job is published persistent to a quorum queue, with publisher confirms, and published
//!   again (after a wait) while the broker cannot be reached;
//! - a worker acknowledges the message only after [`BrokerExecutor::finish`] answered, which it
//!   does once the result is written and synced to the job's file under the state directory
//!   (so [`Executor::attach`] finds it after a restart);
//! - a worker that dies loses its connection and the broker hands the job to another worker,
//!   whose claim waits until the first one's heartbeats are stale, then gets the next fencing
//!   number: from then on the first claim's token is refused (`fenced`), so its late output and
//!   result count for nothing;
//! - after [`BrokerConfig::max_tries`] tries (the first delivery and `max_tries - 1`
//!   redeliveries) the broker dead-letters the job; the server reads the dead-letter queue and
//!   the step fails with that reason.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cib_core::event::BuildId;
use cib_core::pipeline::StopReason;
use cib_core::ports::{Attached, ExecError, Executor, LogSink, Outcome, StepRun, StopSignal, Stream};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::sync::watch;

use crate::broker::DeclareError;
use crate::protocol::{Claim, JobMessage, Labels, queue_name};

/// How the server reaches the broker and how it paces workers.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// `amqp://user:password@host:port/vhost` (or `amqps://`).
    pub url: String,
    /// The base URL at which workers reach this server's API (`https://cib.example.com`).
    pub server_url: String,
    /// Where each job's file is kept (its state and result, synced before a result is
    /// acknowledged).
    pub state_dir: PathBuf,
    /// How often a worker reports that it still runs a job.
    pub heartbeat: Duration,
    /// A claim whose last heartbeat is older than this is lost: another worker may take the
    /// job over. Three heartbeats by default.
    pub stale_after: Duration,
    /// How many tries a job gets before the broker dead-letters it (the job queues'
    /// `x-delivery-limit` is one less).
    pub max_tries: u32,
}

impl BrokerConfig {
    pub fn new(url: impl Into<String>, server_url: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        BrokerConfig {
            url: url.into(),
            server_url: server_url.into(),
            state_dir: state_dir.into(),
            heartbeat: Duration::from_secs(5),
            stale_after: Duration::from_secs(15),
            max_tries: crate::protocol::DEFAULT_MAX_TRIES,
        }
    }
}

/// Why a worker's request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// The token is not the job's, nor its current claim's.
    #[error("the token does not open this job")]
    Unauthorized,
    /// Another worker holds a live claim; ask again after `retry`.
    #[error("another worker runs this job and still heartbeats")]
    Held { retry: Duration },
    /// This claim was superseded by a newer one (fencing): its output and result are refused.
    #[error("this claim was taken over by a newer one (fence {current}); its result is refused")]
    Fenced { current: u64 },
    /// The step is over (or this server does not know the job): nothing more is accepted.
    #[error("the step has ended: the job's tokens have expired")]
    Ended,
    /// Output at the wrong offset: the server holds `expected` bytes of this claim's output.
    #[error("output must continue at offset {expected}")]
    Offset { expected: u64 },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Internal(String),
}

impl JobError {
    /// The code in the API's error body.
    pub fn code(&self) -> &'static str {
        match self {
            JobError::Unauthorized => "unauthorized",
            JobError::Held { .. } => "held",
            JobError::Fenced { .. } => "fenced",
            JobError::Ended => "ended",
            JobError::Offset { .. } => "offset",
            JobError::BadRequest(_) => "bad_request",
            JobError::Internal(_) => "internal",
        }
    }
}

/// What is written to a job's file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct JobRecord {
    job: String,
    build: String,
    step: String,
    attempt: u32,
    fence: u64,
    worker: Option<String>,
    outcome: Option<Outcome>,
}

struct ClaimState {
    token_digest: [u8; 32],
    fence: u64,
    worker: String,
    last_beat: Instant,
    /// Bytes of this claim's output the server holds.
    received: u64,
}

struct JobState {
    fence: u64,
    claim: Option<ClaimState>,
    stop: Option<StopReason>,
    ended: bool,
}

struct Job {
    id: String,
    token_digest: [u8; 32],
    run: StepRun,
    logs: Arc<dyn LogSink>,
    state: Mutex<JobState>,
    /// The result, once a worker reported it (or the job was dead-lettered).
    done: watch::Sender<Option<Result<Outcome, String>>>,
}

/// The executor that hands steps to remote workers through the broker.
pub struct BrokerExecutor {
    config: BrokerConfig,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    publisher: tokio::sync::Mutex<Option<(lapin::Connection, lapin::Channel)>>,
    /// The job queues declared on the publisher's connection.
    declared: Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for BrokerExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerExecutor")
            .field("broker", &crate::broker::redact(&self.config.url))
            .field("server_url", &self.config.server_url)
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// Compares two digests in constant time.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new random token, 32 bytes in hex.
pub fn new_token() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(|e| format!("no randomness from the system: {e}"))?;
    Ok(hex::encode(bytes))
}

/// The job of one step attempt: the same id for the same attempt, so that a restarted server
/// finds its file again.
pub fn job_id(build: &BuildId, step: &str, attempt: u32) -> String {
    let digest = sha2::Sha256::digest(format!("{}\n{step}\n{attempt}", build.0).as_bytes());
    hex::encode(&digest[..16])
}

impl BrokerExecutor {
    /// Makes the executor and starts reading the dead-letter queue (on the current runtime).
    pub fn start(config: BrokerConfig) -> Result<Arc<BrokerExecutor>, String> {
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|e| format!("cannot create {}: {e}", config.state_dir.display()))?;
        let executor = Arc::new(BrokerExecutor {
            config,
            jobs: Mutex::new(HashMap::new()),
            publisher: tokio::sync::Mutex::new(None),
            declared: Mutex::new(std::collections::HashSet::new()),
        });
        tokio::spawn(read_dead_letters(Arc::downgrade(&executor)));
        Ok(executor)
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    fn job(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    /// Publishes a job message, connecting first when there is no connection.
    async fn publish(&self, queue: &str, body: &[u8]) -> Result<(), DeclareError> {
        let mut publisher = self.publisher.lock().await;
        if publisher.as_ref().is_none_or(|(c, ch)| !c.status().connected() || !ch.status().connected()) {
            self.declared.lock().unwrap_or_else(|e| e.into_inner()).clear();
            let connection =
                crate::broker::connect(&self.config.url, 5, "cib-server").await.map_err(DeclareError::Other)?;
            let channel = crate::broker::confirm_channel(&connection).await.map_err(DeclareError::Other)?;
            *publisher = Some((connection, channel));
        }
        let Some((connection, channel)) = publisher.as_ref() else {
            return Err(DeclareError::Other("no channel".into()));
        };
        let result = async {
            // Declared once per connection: a queue deleted since makes the publish fail
            // (the job comes back unroutable), and the next try connects and declares again.
            if !self.declared.lock().unwrap_or_else(|e| e.into_inner()).contains(queue) {
                crate::broker::declare_job_queue(connection, queue, self.config.max_tries).await?;
                self.declared.lock().unwrap_or_else(|e| e.into_inner()).insert(queue.to_owned());
            }
            crate::broker::publish(channel, queue, body).await.map_err(DeclareError::Other)
        }
        .await;
        if result.is_err() {
            // The next try connects again.
            *publisher = None;
            self.declared.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        result
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.config.state_dir.join(format!("{id}.json"))
    }

    /// Writes the job's file and syncs it, so that what it says survives a crash.
    fn write_record(&self, record: &JobRecord) -> Result<(), String> {
        let path = self.record_path(&record.job);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec(record).map_err(|e| e.to_string())?;
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&text)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.config.state_dir)?.sync_all()
        };
        write().map_err(|e| format!("cannot record the job in {}: {e}", path.display()))
    }

    fn read_record(&self, id: &str) -> Option<JobRecord> {
        let text = std::fs::read(self.record_path(id)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// A worker claims the job with the job token. The first claim, or one taking over from a
    /// worker whose heartbeats stopped, gets the next fencing number and a new claim token;
    /// while the holder still heartbeats, [`JobError::Held`].
    pub fn claim(&self, id: &str, job_token: &str, worker: &str) -> Result<Claim, JobError> {
        let Some(job) = self.job(id) else { return Err(JobError::Ended) };
        if !same(&job.token_digest, &digest(job_token)) {
            return Err(JobError::Unauthorized);
        }
        let worker: String = worker.chars().filter(|c| !c.is_control()).take(100).collect();
        let token = new_token().map_err(JobError::Internal)?;
        let (fence, previous) = {
            let mut state = job.state.lock().unwrap_or_else(|e| e.into_inner());
            if state.ended || state.stop.is_some() {
                return Err(JobError::Ended);
            }
            if let Some(claim) = &state.claim
                && claim.last_beat.elapsed() < self.config.stale_after
            {
                let retry = self.config.stale_after.saturating_sub(claim.last_beat.elapsed());
                return Err(JobError::Held { retry: retry.min(self.config.heartbeat).max(Duration::from_millis(100)) });
            }
            state.fence += 1;
            let previous = state.claim.take().map(|c| c.worker);
            state.claim = Some(ClaimState {
                token_digest: digest(&token),
                fence: state.fence,
                worker: worker.clone(),
                last_beat: Instant::now(),
                received: 0,
            });
            (state.fence, previous)
        };
        let line = match previous {
            Some(lost) => format!(
                "cib: worker {lost} stopped heartbeating; worker {worker} takes the step over (claim {fence})\n"
            ),
            None => format!("cib: running on worker {worker}\n"),
        };
        job.logs.write(Stream::Stderr, line.as_bytes());
        let record = JobRecord {
            job: job.id.clone(),
            build: job.run.job.build.0.clone(),
            step: job.run.job.step.name.clone(),
            attempt: job.run.job.attempt,
            fence,
            worker: Some(worker),
            outcome: None,
        };
        self.write_record(&record).map_err(JobError::Internal)?;
        let step = &job.run.job.step;
        let commands = match &step.action {
            cib_core::spec::Action::Run { commands, .. } => commands.clone(),
            cib_core::spec::Action::Gate(_) => return Err(JobError::BadRequest("a gate runs no commands".into())),
        };
        let mut env = job.run.job.env.clone();
        env.extend(job.run.secrets.clone());
        let mut mask: Vec<String> = job.run.secrets.values().cloned().collect();
        mask.extend(job.run.mask.iter().cloned());
        Ok(Claim {
            claim: token,
            fence,
            heartbeat_ms: u64::try_from(self.config.heartbeat.as_millis()).unwrap_or(u64::MAX),
            commands,
            env,
            mask,
            workdir: step.workdir.clone(),
            timeout_ms: step.timeout.map(|d| u64::try_from(d.as_std().as_millis()).unwrap_or(u64::MAX)),
            no_output_timeout_ms: step
                .no_output_timeout
                .map(|d| u64::try_from(d.as_std().as_millis()).unwrap_or(u64::MAX)),
        })
    }

    /// Checks a claim token: the job, if it is the current claim's.
    fn current(&self, id: &str, claim_token: &str) -> Result<Arc<Job>, JobError> {
        let Some(job) = self.job(id) else { return Err(JobError::Ended) };
        let state = job.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.ended {
            return Err(JobError::Ended);
        }
        match &state.claim {
            Some(claim) if same(&claim.token_digest, &digest(claim_token)) => {}
            _ if same(&job.token_digest, &digest(claim_token)) => return Err(JobError::Unauthorized),
            // A token that is neither the job's nor the current claim's: a superseded claim,
            // or a stranger. Both are refused; the answer says fenced so that a worker that
            // was taken over stops.
            _ => return Err(JobError::Fenced { current: state.fence }),
        }
        drop(state);
        Ok(job)
    }

    /// The step's workspace as a gzip-compressed tar archive.
    pub async fn workspace(&self, id: &str, claim_token: &str) -> Result<Vec<u8>, JobError> {
        let job = self.current(id, claim_token)?;
        let dir = job.run.workspace.clone();
        tokio::task::spawn_blocking(move || pack(&dir))
            .await
            .map_err(|e| JobError::Internal(e.to_string()))?
            .map_err(|e| JobError::Internal(format!("cannot pack the workspace: {e}")))
    }

    /// Output of the claim, from byte `offset` of its output. Bytes the server holds already
    /// are skipped (a retry after a lost answer); a gap is refused with the offset expected.
    /// Answers how many bytes of the claim's output the server holds now.
    pub fn output(
        &self,
        id: &str,
        claim_token: &str,
        offset: u64,
        stream: Stream,
        bytes: &[u8],
    ) -> Result<u64, JobError> {
        let job = self.current(id, claim_token)?;
        let mut state = job.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(claim) = state.claim.as_mut() else { return Err(JobError::Ended) };
        if offset > claim.received {
            return Err(JobError::Offset { expected: claim.received });
        }
        let skip = usize::try_from(claim.received - offset).unwrap_or(usize::MAX);
        if skip < bytes.len() {
            // Written while the lock is held, so that two requests of one claim cannot
            // interleave their bytes.
            job.logs.write(stream, &bytes[skip..]);
            claim.received += (bytes.len() - skip) as u64;
        }
        claim.last_beat = Instant::now();
        Ok(claim.received)
    }

    /// The claim is alive. Answers whether the server wants the step stopped.
    pub fn heartbeat(&self, id: &str, claim_token: &str) -> Result<Option<StopReason>, JobError> {
        let job = self.current(id, claim_token)?;
        let mut state = job.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(claim) = state.claim.as_mut() {
            claim.last_beat = Instant::now();
        }
        Ok(state.stop)
    }

    /// The claim's result. Answers once it is written and synced to the job's file; after
    /// that the job is over and every token of it is refused ([`JobError::Ended`]), except
    /// that the same claim reporting again is answered the same (its first answer may have
    /// been lost).
    pub fn finish(&self, id: &str, claim_token: &str, outcome: Outcome) -> Result<(), JobError> {
        let Some(job) = self.job(id) else { return Err(JobError::Ended) };
        let fence = {
            let mut state = job.state.lock().unwrap_or_else(|e| e.into_inner());
            let current = state.claim.as_ref().filter(|c| same(&c.token_digest, &digest(claim_token)));
            let Some(claim) = current else {
                return Err(if state.ended { JobError::Ended } else { JobError::Fenced { current: state.fence } });
            };
            if state.ended {
                return Ok(());
            }
            let fence = claim.fence;
            let worker = claim.worker.clone();
            self.write_record(&JobRecord {
                job: job.id.clone(),
                build: job.run.job.build.0.clone(),
                step: job.run.job.step.name.clone(),
                attempt: job.run.job.attempt,
                fence,
                worker: Some(worker),
                outcome: Some(outcome),
            })
            .map_err(JobError::Internal)?;
            state.ended = true;
            fence
        };
        tracing::debug!(job = %id, fence, ?outcome, "a worker reported a result");
        job.done.send_replace(Some(Ok(outcome)));
        Ok(())
    }

    /// A dead-lettered job: the step fails with the reason.
    fn dead_lettered(&self, message: &JobMessage, deliveries: u64) {
        let Some(job) = self.job(&message.job) else {
            tracing::warn!(job = %message.job, "a dead-lettered job this server does not run is dropped");
            return;
        };
        let claims = {
            let mut state = job.state.lock().unwrap_or_else(|e| e.into_inner());
            if state.ended {
                return;
            }
            state.ended = true;
            state.fence
        };
        // The dead-lettered copy carries no delivery count of its own; the claims the server
        // handed out count the tries that reached a worker.
        let tries = claims.max(deliveries);
        let reason = format!(
            "the job was dead-lettered after {tries} tries ({} redeliveries): every worker that took it was lost before reporting a result",
            tries.saturating_sub(1)
        );
        job.logs.write(Stream::Stderr, format!("cib: {reason}\n").as_bytes());
        job.done.send_replace(Some(Err(reason)));
    }
}

/// Packs a directory into a gzip-compressed tar archive (symbolic links kept as links).
fn pack(dir: &Path) -> std::io::Result<Vec<u8>> {
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(encoder);
    tar.follow_symlinks(false);
    if dir.exists() {
        tar.append_dir_all(".", dir)?;
    }
    tar.into_inner()?.finish()
}

/// Reads the dead-letter queue for as long as the executor lives, connecting again after the
/// broker went away.
async fn read_dead_letters(executor: Weak<BrokerExecutor>) {
    loop {
        let Some(url) = executor.upgrade().map(|e| e.config.url.clone()) else { return };
        let result = async {
            let connection = crate::broker::connect(&url, 5, "cib-server dead letters").await?;
            let channel = crate::broker::consume_channel(&connection).await?;
            let mut consumer = channel
                .basic_consume(
                    crate::protocol::DEAD_LETTER_QUEUE.into(),
                    "cib-server".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("cannot consume the dead letters: {e}"))?;
            while let Some(delivery) = consumer.next().await {
                let delivery = delivery.map_err(|e| format!("the dead-letter consumer stopped: {e}"))?;
                let Some(executor) = executor.upgrade() else { return Ok(()) };
                match serde_json::from_slice::<JobMessage>(&delivery.data) {
                    Ok(message) => {
                        let deliveries = crate::broker::delivery_count(&delivery.properties).max(1);
                        executor.dead_lettered(&message, deliveries);
                    }
                    Err(error) => tracing::warn!(%error, "a dead letter that is no job is dropped"),
                }
                delivery.ack(BasicAckOptions::default()).await.map_err(|e| format!("cannot acknowledge: {e}"))?;
            }
            Err::<(), String>("the dead-letter consumer ended".into())
        }
        .await;
        match result {
            Ok(()) => return,
            Err(error) => tracing::warn!(%error, "reading the dead-letter queue again in a second"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[async_trait]
impl Executor for BrokerExecutor {
    async fn healthcheck(&self) -> Result<(), ExecError> {
        let connection = crate::broker::connect(&self.config.url, 5, "cib-server healthcheck")
            .await
            .map_err(ExecError::Transient)?;
        let _ = connection.close(200, "OK".into()).await;
        Ok(())
    }

    async fn run(&self, run: &StepRun, logs: Arc<dyn LogSink>, mut stop: StopSignal) -> Result<Outcome, ExecError> {
        let labels = crate::route::step_labels(&run.job.step);
        self.run_on(run, &labels, logs, &mut stop).await
    }

    async fn start_services(
        &self,
        _build: &BuildId,
        services: &[cib_core::spec::Service],
    ) -> Result<(), (String, ExecError)> {
        match services.first() {
            None => Ok(()),
            Some(s) => Err((s.name.clone(), ExecError::Permanent("remote workers run no services".into()))),
        }
    }

    async fn cleanup(&self, build: &BuildId) -> Result<(), ExecError> {
        let ids: Vec<String> = {
            let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            jobs.values().filter(|j| &j.run.job.build == build).map(|j| j.id.clone()).collect()
        };
        for id in ids {
            let _ = std::fs::remove_file(self.record_path(&id));
        }
        Ok(())
    }

    async fn reconcile(&self, live: &[BuildId]) -> Result<usize, ExecError> {
        // Job files of builds that are over are removed; the broker's messages of such jobs
        // are answered `ended` when a worker claims them, and acknowledged.
        let mut removed = 0;
        let Ok(entries) = std::fs::read_dir(&self.config.state_dir) else { return Ok(0) };
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(record) = std::fs::read(&path).ok().and_then(|t| serde_json::from_slice::<JobRecord>(&t).ok())
            else {
                continue;
            };
            if !live.iter().any(|b| b.0 == record.build) && std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn attach(
        &self,
        run: &StepRun,
        _offset: u64,
        _logs: Arc<dyn LogSink>,
        _stop: StopSignal,
    ) -> Result<Attached, ExecError> {
        // A result recorded before the restart is the step's outcome; a job without one was
        // lost with the process (its worker's tokens are unknown now and refused), so the step
        // is interrupted and runs again.
        let id = job_id(&run.job.build, &run.job.step.name, run.job.attempt);
        Ok(match self.read_record(&id).and_then(|r| r.outcome) {
            Some(outcome) => Attached::Ended { outcome, was_running: false },
            None => Attached::Gone,
        })
    }
}

impl BrokerExecutor {
    /// Runs `run` on a worker with `labels`.
    pub async fn run_on(
        &self,
        run: &StepRun,
        labels: &Labels,
        logs: Arc<dyn LogSink>,
        stop: &mut StopSignal,
    ) -> Result<Outcome, ExecError> {
        let id = job_id(&run.job.build, &run.job.step.name, run.job.attempt);
        let token = new_token().map_err(ExecError::Misconfigured)?;
        let (done, mut result) = watch::channel(None);
        let job = Arc::new(Job {
            id: id.clone(),
            token_digest: digest(&token),
            run: run.clone(),
            logs: logs.clone(),
            state: Mutex::new(JobState { fence: 0, claim: None, stop: None, ended: false }),
            done,
        });
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone(), job.clone());
        // However this ends, the job is forgotten and its tokens expire with the step.
        let _forget = Forget { executor: self, id: id.clone(), job: job.clone() };
        let message = JobMessage {
            job: id.clone(),
            server: self.config.server_url.clone(),
            token,
            build: run.job.build.0.clone(),
            step: run.job.step.name.clone(),
            attempt: run.job.attempt,
            labels: labels.clone(),
        };
        let body = serde_json::to_vec(&message).map_err(|e| ExecError::Permanent(e.to_string()))?;
        let queue = queue_name(labels);
        // The job is published before anything waits on it; while the broker cannot be
        // reached, it is tried again every second (a broker restart loses no step), until the
        // step is stopped.
        let mut warned = false;
        loop {
            match self.publish(&queue, &body).await {
                Ok(()) => break,
                // The queue's arguments disagree with max_tries: no retry can mend that, so the
                // step fails now with the reason rather than wait for ever.
                Err(DeclareError::Inequivalent(reason)) => {
                    logs.write(Stream::Stderr, format!("cib: {reason}\n").as_bytes());
                    return Err(ExecError::Misconfigured(reason));
                }
                Err(DeclareError::Other(error)) => {
                    if !warned {
                        logs.write(Stream::Stderr, format!("cib: waiting for the broker: {error}\n").as_bytes());
                        warned = true;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        reason = stop.stopped() => return Ok(stopped_outcome(reason)),
                    }
                }
            }
        }
        logs.write(Stream::Stderr, format!("cib: queued for a worker with {}\n", label_text(labels)).as_bytes());
        tokio::select! {
            r = result.wait_for(Option::is_some) => return finished(r.map(|r| r.clone()).ok().flatten()),
            reason = stop.stopped() => {
                let claimed = {
                    let mut state = job.state.lock().unwrap_or_else(|e| e.into_inner());
                    state.stop = Some(reason);
                    if state.claim.is_none() {
                        // Nobody runs it: the job ends here, and the worker that takes its
                        // message later is told so and acknowledges it.
                        state.ended = true;
                    }
                    state.claim.is_some()
                };
                if !claimed {
                    return Ok(stopped_outcome(reason));
                }
            }
        }
        // The worker learns of the stop at its next heartbeat and reports how the step ended;
        // a worker that does not within a few heartbeats is not waited for.
        let grace = self.config.stale_after + self.config.heartbeat * 2;
        match tokio::time::timeout(grace, result.wait_for(Option::is_some)).await {
            Ok(r) => finished(r.map(|r| r.clone()).ok().flatten()),
            Err(_) => {
                job.state.lock().unwrap_or_else(|e| e.into_inner()).ended = true;
                Ok(stopped_outcome(stop.reason().unwrap_or(StopReason::Cancelled)))
            }
        }
    }
}

struct Forget<'a> {
    executor: &'a BrokerExecutor,
    id: String,
    job: Arc<Job>,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.job.state.lock().unwrap_or_else(|e| e.into_inner()).ended = true;
        self.executor.jobs.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

fn finished(result: Option<Result<Outcome, String>>) -> Result<Outcome, ExecError> {
    match result {
        Some(Ok(outcome)) => Ok(outcome),
        Some(Err(reason)) => Err(ExecError::Permanent(reason)),
        None => Err(ExecError::Transient("the job ended without a result".into())),
    }
}

fn stopped_outcome(reason: StopReason) -> Outcome {
    match reason {
        StopReason::Cancelled => Outcome::Cancelled,
        StopReason::TimedOut => Outcome::TimedOut,
        StopReason::NoOutput => Outcome::NoOutput,
    }
}

pub(crate) fn label_text(labels: &Labels) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}
