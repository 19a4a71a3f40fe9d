//! `cib worker`: consumes jobs for its labels from the broker and runs each with the host
//! executor, talking to the server's worker API over HTTP(S) with the job's tokens.
//!
//! For each job message: claim it (waiting while another worker still heartbeats on it),
//! fetch the workspace into a fresh directory, run the step, stream its output in chunks at
//! explicit offsets (a chunk whose answer was lost is sent again and skipped by the server),
//! heartbeat while it runs (the answer may ask for a stop; a `fenced` or `ended` answer kills
//! the step), report the result, and only then acknowledge the message. A worker that dies
//! acknowledges nothing, so the broker hands the job to another worker.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cib_core::pipeline::StopReason;
use cib_core::ports::{Outcome, Stream};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use tokio::sync::{mpsc, watch};

use crate::host::{self, HostJob, StepDir};
use crate::protocol::{
    Claim, ClaimRequest, ErrorBody, HeartbeatAnswer, JobMessage, Labels, OutputAck, ResultBody, worker_queues,
};

/// How `cib worker` runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub broker: String,
    pub labels: Labels,
    /// This worker's name in the steps' logs (the host name by default).
    pub name: String,
    /// When set, the claims this worker holds are written here (one file per job, readable by
    /// its owner only) and removed once reported, so that an operator can tell which jobs a
    /// dead worker held.
    pub state_dir: Option<PathBuf>,
}

/// How many times (a second apart) a worker tries to reach the server to claim a job before it
/// gives the job back.
const CLAIM_TRIES: u32 = 30;

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

fn http_client() -> Result<HttpClient, String> {
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    // The provider is named rather than taken from the process default, so that no other
    // crate's choice can change it.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS settings: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// An answer of the worker API that is not a success.
#[derive(Debug)]
enum ApiError {
    /// The server could not be reached or answered garbage: worth trying again.
    Network(String),
    /// The server refused, with its code.
    Refused { status: u16, body: ErrorBody },
}

impl ApiError {
    fn code(&self) -> &str {
        match self {
            ApiError::Network(_) => "network",
            ApiError::Refused { body, .. } => &body.code,
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiError::Network(e) => write!(f, "{e}"),
            ApiError::Refused { status, body } => write!(f, "{status} {}: {}", body.code, body.message),
        }
    }
}

/// The worker API of one server, for one job.
#[derive(Clone)]
struct Api {
    client: HttpClient,
    base: String,
    job: String,
}

impl Api {
    async fn call(
        &self,
        method: http::Method,
        path: &str,
        token: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Bytes, ApiError> {
        let url = format!("{}/api/v1/worker/jobs/{}/{path}", self.base.trim_end_matches('/'), self.job);
        let request = http::Request::builder()
            .method(method)
            .uri(&url)
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(http::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ApiError::Network(format!("bad request to {url}: {e}")))?;
        let response = tokio::time::timeout(Duration::from_secs(60), self.client.request(request))
            .await
            .map_err(|_| ApiError::Network(format!("{url}: no answer within 60 s")))?
            .map_err(|e| ApiError::Network(format!("{url}: {e}")))?;
        let status = response.status();
        let bytes =
            response.into_body().collect().await.map_err(|e| ApiError::Network(format!("{url}: {e}")))?.to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(ApiError::Refused { status: status.as_u16(), body }),
            Err(_) if status.is_server_error() => Err(ApiError::Network(format!("{url}: {status}"))),
            Err(_) => Err(ApiError::Refused {
                status: status.as_u16(),
                body: ErrorBody {
                    code: "unknown".into(),
                    message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
                    offset: None,
                    retry_ms: None,
                },
            }),
        }
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        token: &str,
        body: &impl serde::Serialize,
    ) -> Result<T, ApiError> {
        let body = serde_json::to_vec(body).map_err(|e| ApiError::Network(e.to_string()))?;
        let bytes = self.call(http::Method::POST, path, token, "application/json", body).await?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError::Network(format!("{path}: bad answer: {e}")))
    }
}

/// Runs the worker until `shutdown` resolves: consumes, runs, reports, and connects again
/// whenever the broker goes away.
pub async fn run(options: WorkerOptions, shutdown: impl std::future::Future<Output = ()>) -> Result<(), String> {
    let client = http_client()?;
    if let Some(dir) = &options.state_dir {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let queues = worker_queues(&options.labels);
    let options = Arc::new(options);
    let consume = async {
        loop {
            match consume_once(&options, &queues, &client).await {
                Ok(()) => {}
                Err(error) => tracing::warn!(%error, "the broker connection ended; connecting again in a second"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    tokio::select! {
        () = consume => Ok(()),
        () = shutdown => Ok(()),
    }
}

/// How often a worker looks again for a job queue the server has not made yet.
const QUEUE_LOOK_INTERVAL: Duration = Duration::from_secs(1);

async fn consume_once(options: &Arc<WorkerOptions>, queues: &[String], client: &HttpClient) -> Result<(), String> {
    let connection = crate::broker::connect(&options.broker, 5, &format!("cib worker {}", options.name)).await?;
    let connection = Arc::new(connection);
    let channel = crate::broker::consume_channel(&connection).await?;
    // One task per queue: it waits until the server made the queue (only the server declares
    // job queues, with its max_tries), then consumes it, and starts over if the broker cancels
    // the consumer (the queue was deleted). Deliveries and failures come here; the tasks end
    // with this call (the set aborts them when dropped).
    let (sender, mut deliveries) = mpsc::unbounded_channel::<Result<Delivery, String>>();
    let mut tasks = tokio::task::JoinSet::new();
    for queue in queues {
        let (connection, channel, sender, queue) = (connection.clone(), channel.clone(), sender.clone(), queue.clone());
        let tag = format!("{}:{queue}", options.name);
        tasks.spawn(async move {
            let failed = loop {
                match crate::broker::job_queue_waiting(&connection, &queue).await {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        tokio::time::sleep(QUEUE_LOOK_INTERVAL).await;
                        continue;
                    }
                    Err(error) => break error,
                }
                let consumer = channel
                    .basic_consume(
                        queue.as_str().into(),
                        tag.as_str().into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await;
                let mut consumer = match consumer {
                    Ok(c) => c,
                    Err(e) => break format!("cannot consume {queue}: {e}"),
                };
                tracing::info!(%queue, "consuming jobs");
                while let Some(delivery) = consumer.next().await {
                    let delivery = delivery.map_err(|e| format!("the consumer of {queue} stopped: {e}"));
                    let stop = delivery.is_err();
                    if sender.send(delivery).is_err() || stop {
                        return;
                    }
                }
                tracing::info!(%queue, "the broker ended the consumer; looking for the queue again");
            };
            let _ = sender.send(Err(failed));
        });
    }
    drop(sender);
    tracing::info!(worker = %options.name, ?queues, "waiting for jobs");
    while let Some(delivery) = deliveries.recv().await {
        tokio::spawn(handle(options.clone(), client.clone(), delivery?));
    }
    Err("the broker closed the consumers".into())
}

async fn handle(options: Arc<WorkerOptions>, client: HttpClient, delivery: Delivery) {
    let message: JobMessage = match serde_json::from_slice(&delivery.data) {
        Ok(m) => m,
        Err(error) => {
            // Not a job: it can never run, so it goes to the dead letters rather than around.
            tracing::warn!(%error, "a message that is no job is rejected");
            let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
            return;
        }
    };
    let api = Api { client, base: message.server.clone(), job: message.job.clone() };
    let reported = run_job(&options, &api, &message).await;
    if let Err(error) = &reported {
        // Given back to its queue (this counts as a delivery, so a job whose server stays
        // away ends dead-lettered instead of blocking a worker's queue for ever).
        tracing::warn!(job = %message.job, %error, "the job is given back");
        let _ = delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await;
    }
    if reported.is_ok() {
        // The server recorded the result (or the job is over): the message can go. When the
        // connection it came on is gone, the ack fails and the broker hands it out again; the
        // next claim is then answered `ended` and acknowledged.
        if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
            tracing::info!(job = %message.job, %error, "cannot acknowledge the job");
        }
    }
}

/// Claims, runs and reports one job. `Ok` when the message may be acknowledged.
async fn run_job(options: &WorkerOptions, api: &Api, message: &JobMessage) -> Result<(), String> {
    let request = ClaimRequest { worker: options.name.clone() };
    let mut unreachable = 0u32;
    let claim: Claim = loop {
        match api.json::<Claim>("claim", &message.token, &request).await {
            Ok(claim) => break claim,
            Err(ApiError::Refused { body, .. }) if body.code == "held" => {
                tokio::time::sleep(Duration::from_millis(body.retry_ms.unwrap_or(1000).clamp(100, 30_000))).await;
            }
            Err(ApiError::Network(error)) => {
                unreachable += 1;
                if unreachable >= CLAIM_TRIES {
                    return Err(format!("the server cannot be reached to claim the job: {error}"));
                }
                tracing::info!(job = %message.job, %error, "cannot reach the server; claiming again in a second");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => {
                // `ended` or `unauthorized`: the job is over, or not ours to run.
                tracing::info!(job = %message.job, %error, "the job is not run");
                return Ok(());
            }
        }
    };
    tracing::info!(job = %message.job, build = %message.build, step = %message.step, fence = claim.fence, "running a job");
    let record = options.state_dir.as_ref().map(|d| d.join(format!("{}.claim", message.job)));
    if let Some(path) = &record {
        write_private(
            path,
            &serde_json::json!({"job": message.job, "server": message.server, "fence": claim.fence, "claim": claim.claim}),
        );
    }
    let result = run_claimed(api, &claim).await;
    if let Some(path) = &record {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn write_private(path: &std::path::Path, value: &serde_json::Value) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(path);
    if let Ok(mut file) = file {
        let _ = file.write_all(value.to_string().as_bytes());
    }
}

async fn run_claimed(api: &Api, claim: &Claim) -> Result<(), String> {
    let token = claim.claim.clone();
    let dir = StepDir::new().map_err(|e| format!("cannot make the step's directory: {e}"))?;
    let (stop_tx, stop_rx) = watch::channel(None);
    let fenced = Arc::new(AtomicBool::new(false));
    // The workspace, as the server packed it.
    let outcome = match fetch_workspace(api, &token, &dir).await {
        Ok(()) => None,
        Err(ApiError::Refused { body, .. }) if matches!(body.code.as_str(), "fenced" | "ended") => return Ok(()),
        Err(error) => {
            // A workspace that cannot be had fails the step as an infrastructure error would:
            // the message says why, and the step ends rather than going around.
            let text = format!("cib worker: cannot fetch the workspace: {error}\n");
            let _ = api
                .call(
                    http::Method::POST,
                    "output?offset=0&stream=stderr",
                    &token,
                    "application/octet-stream",
                    text.into_bytes(),
                )
                .await;
            Some(Outcome::Exited(125))
        }
    };
    let heartbeat = tokio::spawn(heartbeats(api.clone(), token.clone(), claim.heartbeat_ms, stop_tx, fenced.clone()));
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let uploader = tokio::spawn(upload(api.clone(), token.clone(), out_rx, fenced.clone()));
    let outcome = match outcome {
        Some(o) => o,
        None => {
            let job = HostJob {
                commands: claim.commands.clone(),
                env: claim.env.clone(),
                workdir: claim.workdir.clone(),
                timeout: claim.timeout_ms.map(Duration::from_millis),
                no_output_timeout: claim.no_output_timeout_ms.map(Duration::from_millis),
                mask: claim.mask.clone(),
            };
            match host::run(&job, &dir, out_tx.clone(), stop_rx).await {
                Ok(outcome) => outcome,
                Err(error) => {
                    let _ = out_tx.send((Stream::Stderr, format!("cib worker: {error}\n").into_bytes()));
                    Outcome::Exited(125)
                }
            }
        }
    };
    drop(out_tx);
    // Every byte of output is with the server before the result is.
    let _ = uploader.await;
    heartbeat.abort();
    if fenced.load(Ordering::SeqCst) {
        return Ok(());
    }
    loop {
        match api.json::<serde_json::Value>("result", &token, &ResultBody { outcome }).await {
            Ok(_) => return Ok(()),
            Err(ApiError::Network(error)) => {
                tracing::info!(%error, "cannot report the result; trying again in a second");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => {
                // Fenced or ended: another claim's result counts, or the step is over.
                tracing::info!(%error, code = error.code(), "the result is refused");
                return Ok(());
            }
        }
    }
}

async fn fetch_workspace(api: &Api, token: &str, dir: &StepDir) -> Result<(), ApiError> {
    let mut tries = 0;
    let archive = loop {
        match api.call(http::Method::GET, "workspace", token, "application/octet-stream", Vec::new()).await {
            Ok(bytes) => break bytes,
            Err(ApiError::Network(error)) if tries < 10 => {
                tries += 1;
                tracing::info!(%error, "cannot fetch the workspace; trying again in a second");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => return Err(error),
        }
    };
    let dest = dir.workspace();
    tokio::task::spawn_blocking(move || {
        // `unpack` refuses entries that would land outside the destination.
        tar::Archive::new(flate2::read::GzDecoder::new(&archive[..])).unpack(&dest)
    })
    .await
    .map_err(|e| ApiError::Network(e.to_string()))?
    .map_err(|e| ApiError::Network(format!("cannot unpack the workspace: {e}")))
}

async fn heartbeats(
    api: Api,
    token: String,
    every_ms: u64,
    stop: watch::Sender<Option<StopReason>>,
    fenced: Arc<AtomicBool>,
) {
    let every = Duration::from_millis(every_ms.clamp(100, 60_000));
    loop {
        tokio::time::sleep(every).await;
        match api.json::<HeartbeatAnswer>("heartbeat", &token, &serde_json::json!({})).await {
            Ok(HeartbeatAnswer { stop: Some(reason) }) => {
                stop.send_replace(Some(reason));
            }
            Ok(_) => {}
            Err(ApiError::Network(error)) => tracing::info!(%error, "a heartbeat did not reach the server"),
            Err(error) => {
                // Another worker holds the job now, or the step is over: this run counts for
                // nothing, so it stops.
                tracing::warn!(%error, "the claim is gone; stopping the step");
                fenced.store(true, Ordering::SeqCst);
                stop.send_replace(Some(StopReason::Cancelled));
                return;
            }
        }
    }
}

/// Sends output in order, each chunk at its offset, until the step's output ends.
async fn upload(api: Api, token: String, mut rx: mpsc::UnboundedReceiver<(Stream, Vec<u8>)>, fenced: Arc<AtomicBool>) {
    let mut offset: u64 = 0;
    let mut pending: Option<(Stream, Vec<u8>)> = None;
    loop {
        let (stream, mut bytes) = match pending.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        // Whatever else is waiting on the same stream goes in the same request.
        while bytes.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok((s, more)) if s == stream => bytes.extend(more),
                Ok(other) => {
                    pending = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        send_chunk(&api, &token, &mut offset, stream, &bytes, &fenced).await;
    }
}

async fn send_chunk(api: &Api, token: &str, offset: &mut u64, stream: Stream, bytes: &[u8], fenced: &AtomicBool) {
    let name = match stream {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
    };
    let mut start = *offset;
    let mut tries = 0u32;
    while *offset < start + bytes.len() as u64 && !fenced.load(Ordering::SeqCst) {
        let skip = usize::try_from(*offset - start).unwrap_or(0);
        let path = format!("output?offset={}&stream={name}", *offset);
        match api.call(http::Method::POST, &path, token, "application/octet-stream", bytes[skip..].to_vec()).await {
            Ok(answer) => match serde_json::from_slice::<OutputAck>(&answer) {
                Ok(ack) => *offset = ack.offset.max(*offset),
                Err(_) => *offset = start + bytes.len() as u64,
            },
            Err(ApiError::Refused { body, .. }) if body.code == "offset" => {
                // The server holds a different count than we sent from: go on from its
                // count. Within this chunk, the bytes it has are skipped; before it, the chunk
                // is sent whole from there (the bytes in between were never acknowledged).
                let expected = body.offset.unwrap_or(start);
                if expected < start {
                    start = expected;
                }
                *offset = expected;
            }
            Err(ApiError::Network(error)) => {
                tries += 1;
                if tries > 30 {
                    tracing::warn!(%error, "output is dropped after 30 tries");
                    *offset = start + bytes.len() as u64;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(_) => {
                // Fenced or ended: nothing more of this claim is taken.
                fenced.store(true, Ordering::SeqCst);
                return;
            }
        }
    }
}
