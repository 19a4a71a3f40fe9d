//! `cib worker`: a remote worker, consuming jobs for its labels from the broker and running them
//! with the host executor (`cib_worker::worker`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

fn eprint(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

pub fn run(broker: &str, labels: &str, name: Option<String>, state_dir: Option<PathBuf>, log_format: &str) -> ExitCode {
    super::init_logs(log_format, None);
    let labels = match cib_worker::protocol::parse_labels(labels) {
        Ok(l) => l,
        Err(e) => {
            eprint(&format!("cib worker: --labels: {e}"));
            return ExitCode::from(2);
        }
    };
    if !(broker.starts_with("amqp://") || broker.starts_with("amqps://")) {
        eprint("cib worker: --broker must start with amqp:// or amqps://");
        return ExitCode::from(2);
    }
    let name = name.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "worker".into())
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprint(&format!("cib worker: cannot start the runtime: {e}"));
            return ExitCode::from(3);
        }
    };
    let options = cib_worker::worker::WorkerOptions { broker: broker.to_owned(), labels, name, state_dir };
    eprint(&format!(
        "cib worker: {} taking jobs for {} from {}",
        options.name,
        cib_worker::protocol::queue_name(&options.labels),
        cib_worker::broker::redact(broker)
    ));
    let result = runtime.block_on(async move {
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
        };
        cib_worker::worker::run(options, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprint(&format!("cib worker: {e}"));
            ExitCode::from(3)
        }
    }
}
