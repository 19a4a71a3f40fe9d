//! The host executor: a step's commands run by `sh -e` as a process of this machine, in a
//! directory of its own, with only the step's environment, under a timeout, a no-output
//! timeout and a stop, and with every secret masked out of what it prints.
//!
//! It is what a worker on macOS or Windows would run natively. On Linux it stands in for an
//! operating system the Docker daemon does not have, which is how the tests exercise workers
//! on one machine. It isolates nothing beyond a process group and a fresh directory: a worker
//! host runs trusted code only (see `docs/scaling.md`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cib_core::pipeline::StopReason;
use cib_core::ports::{Outcome, Stream};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};

use crate::mask::Masker;

/// One step to run on this host.
#[derive(Clone)]
pub struct HostJob {
    pub commands: Vec<String>,
    /// The whole environment of the step: nothing of the worker's own is passed on, except
    /// `PATH` when the job does not set it.
    pub env: BTreeMap<String, String>,
    /// Relative to the workspace.
    pub workdir: Option<String>,
    pub timeout: Option<Duration>,
    pub no_output_timeout: Option<Duration>,
    /// Values masked out of the output.
    pub mask: Vec<String>,
}

impl std::fmt::Debug for HostJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secret values never reach a log line, even a debug one.
        f.debug_struct("HostJob")
            .field("commands", &self.commands.len())
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A directory a step runs in, removed with everything in it when dropped: `workspace` (the
/// checkout), and a home and a temporary directory of the step's own.
#[derive(Debug)]
pub struct StepDir {
    dir: tempfile::TempDir,
}

impl StepDir {
    pub fn new() -> std::io::Result<StepDir> {
        let dir = tempfile::Builder::new().prefix("cib-step-").tempdir()?;
        for sub in ["workspace", "home", "tmp", "cib"] {
            std::fs::create_dir(dir.path().join(sub))?;
        }
        Ok(StepDir { dir })
    }

    pub fn workspace(&self) -> PathBuf {
        self.dir.path().join("workspace")
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Output as it is printed, masked, in order per stream.
pub type OutputTx = mpsc::UnboundedSender<(Stream, Vec<u8>)>;

/// Runs `job` in `dir`, sending its masked output to `out`, until it exits, runs past a
/// timeout, or `stop` asks it to end (the reason given decides the outcome). Every process
/// of the step is killed before this returns. `Err` means the step could not be started.
pub async fn run(
    job: &HostJob,
    dir: &StepDir,
    out: OutputTx,
    mut stop: watch::Receiver<Option<StopReason>>,
) -> Result<Outcome, String> {
    let script = dir.path().join("cib").join("step.sh");
    let mut text = String::from("# The step's commands, run by `sh -e`: the first one that fails ends the step.\n");
    for command in &job.commands {
        text.push_str(command);
        if !command.ends_with('\n') {
            text.push('\n');
        }
    }
    std::fs::write(&script, text).map_err(|e| format!("cannot write the step's script: {e}"))?;
    let workdir = match &job.workdir {
        Some(w) if Path::new(w).components().all(|c| matches!(c, std::path::Component::Normal(_))) => {
            dir.workspace().join(w)
        }
        Some(w) => return Err(format!("workdir '{w}' is not a relative path inside the workspace")),
        None => dir.workspace(),
    };
    std::fs::create_dir_all(&workdir).map_err(|e| format!("cannot make the workdir: {e}"))?;
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-e")
        .arg(&script)
        .current_dir(&workdir)
        .env_clear()
        .env("HOME", dir.path().join("home"))
        .env("TMPDIR", dir.path().join("tmp"))
        .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()))
        .envs(&job.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A group of its own, so that a stop kills the step's children too.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| format!("cannot start sh: {e}"))?;
    let pid = child.id();
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let (seen_tx, mut seen_rx) = watch::channel(());
    let readers = [
        tokio::spawn(pump(stdout, Stream::Stdout, job.mask.clone(), out.clone(), seen_tx.clone())),
        tokio::spawn(pump(stderr, Stream::Stderr, job.mask.clone(), out, seen_tx)),
    ];
    let deadline = job.timeout.map(|t| tokio::time::Instant::now() + t);
    let ended = async {
        loop {
            let quiet = async {
                match job.no_output_timeout {
                    Some(t) => tokio::time::sleep(t).await,
                    None => std::future::pending().await,
                }
            };
            let past = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                status = child.wait() => {
                    return match status {
                        Ok(s) => Ok(Outcome::Exited(exit_code(s))),
                        Err(e) => Err(format!("cannot wait for the step: {e}")),
                    };
                }
                _ = seen_rx.changed() => continue,
                () = quiet => return Ok(Outcome::NoOutput),
                () = past => return Ok(Outcome::TimedOut),
                reason = stopped(&mut stop) => {
                    return Ok(match reason {
                        StopReason::Cancelled => Outcome::Cancelled,
                        StopReason::TimedOut => Outcome::TimedOut,
                        StopReason::NoOutput => Outcome::NoOutput,
                    });
                }
            }
        }
    };
    let outcome = ended.await;
    // Whatever ended it, nothing of the step may outlive it: the whole group is killed (a
    // group that is gone already makes `kill` fail, which is what we want).
    if let Some(pid) = pid {
        let _ = tokio::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
    }
    let _ = child.kill().await;
    // The pipes close once every process holding them is gone; waiting for the readers makes
    // sure all the output was sent before the outcome is.
    for reader in readers {
        let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
    }
    outcome
}

async fn stopped(stop: &mut watch::Receiver<Option<StopReason>>) -> StopReason {
    loop {
        if let Some(reason) = *stop.borrow_and_update() {
            return reason;
        }
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    // A signal is reported as a shell would: 128 plus its number.
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

async fn pump(
    mut pipe: impl tokio::io::AsyncRead + Unpin,
    stream: Stream,
    mask: Vec<String>,
    out: OutputTx,
    seen: watch::Sender<()>,
) {
    let secrets: Vec<&str> = mask.iter().map(String::as_str).collect();
    let mut masker = Masker::new(&secrets);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let _ = seen.send(());
                let masked = masker.push(&buf[..n]);
                if !masked.is_empty() {
                    let _ = out.send((stream, masked));
                }
            }
        }
    }
    let rest = masker.finish();
    if !rest.is_empty() {
        let _ = out.send((stream, rest));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(commands: &[&str]) -> HostJob {
        HostJob {
            commands: commands.iter().map(|c| (*c).to_owned()).collect(),
            env: BTreeMap::from([("GREETING".into(), "hello".into()), ("TOKEN".into(), "s3cr3t-value".into())]),
            workdir: None,
            timeout: Some(Duration::from_secs(20)),
            no_output_timeout: None,
            mask: vec!["s3cr3t-value".into()],
        }
    }

    async fn collect(job: HostJob) -> (Result<Outcome, String>, String, PathBuf) {
        let dir = StepDir::new().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (_stop_tx, stop) = watch::channel(None);
        let outcome = run(&job, &dir, tx, stop).await;
        let mut text = Vec::new();
        while let Ok((_, bytes)) = rx.try_recv() {
            text.extend(bytes);
        }
        (outcome, String::from_utf8_lossy(&text).into_owned(), dir.path().to_owned())
    }

    #[tokio::test]
    async fn runs_in_its_own_directory_with_its_own_environment_masked() {
        // SAFETY of the test: a variable of the worker's own must not reach the step.
        let (outcome, text, dir) = collect(job(&[
            "echo \"$GREETING from $(pwd)\"",
            "echo \"token $TOKEN\"",
            "echo \"cargo ${CARGO_PKG_NAME:-unset}\"",
            "exit 3",
        ]))
        .await;
        assert_eq!(outcome, Ok(Outcome::Exited(3)));
        assert!(text.contains(&format!("hello from {}", dir.join("workspace").display())), "{text}");
        assert!(text.contains("token ***"), "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(text.contains("cargo unset"), "{text}");
        assert!(!dir.exists(), "the step's directory is removed");
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_group() {
        let mut j = job(&["sleep 30 & echo $! > \"$HOME/pid\"", "sleep 30"]);
        j.timeout = Some(Duration::from_millis(500));
        let dir = StepDir::new().unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        let (_stop_tx, stop) = watch::channel(None);
        let started = std::time::Instant::now();
        assert_eq!(run(&j, &dir, tx, stop).await, Ok(Outcome::TimedOut));
        assert!(started.elapsed() < Duration::from_secs(10));
        let pid = std::fs::read_to_string(dir.path().join("home/pid")).unwrap();
        let alive = std::path::Path::new(&format!("/proc/{}", pid.trim())).exists()
            && !std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default().contains(") Z ");
        assert!(!alive, "the background sleep was killed");
    }

    #[tokio::test]
    async fn a_stop_ends_the_step_with_its_reason() {
        let j = job(&["echo started", "sleep 30"]);
        let dir = StepDir::new().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (stop_tx, stop) = watch::channel(None);
        let running = tokio::spawn(async move { run(&j, &dir, tx, stop).await });
        let (_, first) = rx.recv().await.unwrap();
        assert_eq!(first, b"started\n");
        stop_tx.send(Some(StopReason::Cancelled)).unwrap();
        assert_eq!(running.await.unwrap(), Ok(Outcome::Cancelled));
    }

    #[tokio::test]
    async fn silence_past_the_no_output_timeout_ends_the_step() {
        let mut j = job(&["echo one", "sleep 30"]);
        j.no_output_timeout = Some(Duration::from_millis(400));
        let (outcome, text, _) = collect(j).await;
        assert_eq!(outcome, Ok(Outcome::NoOutput));
        assert_eq!(text, "one\n");
    }
}
