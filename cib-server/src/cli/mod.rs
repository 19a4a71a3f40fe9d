//! The `cib` command's subcommands: local ones (`lint`, `schema`, `openapi`, `plan`, `run`,
//! `init`, `completions`, `man`), the server (`serve`), and client commands that talk to a
//! server (`builds`, `build`, `logs`, `trigger`, `cancel`, `retry`, `approve`, `reject`,
//! `merge`, `promote`, `approvals`, `envs`, `whoami`, `pool`, `lease`, `secret`).

pub mod client;
pub mod init;
pub mod lint;
pub mod logs;
pub mod manual;
pub mod plan;
pub mod remote;
pub mod run;
pub mod secret;
pub mod serve;

use std::io::Write;
use std::process::ExitCode;

fn print(text: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}") {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(3),
    }
}

/// `cib schema`: the JSON Schema of the build spec.
pub fn schema() -> ExitCode {
    print(&serde_json::to_string_pretty(&cib_core::spec::schema()).unwrap_or_default())
}

/// `cib openapi`: the server's OpenAPI description, as served at `/api/v1/openapi.json` and
/// committed as `docs/openapi.json`.
pub fn openapi() -> ExitCode {
    print(cib_server::routes::document_text().trim_end())
}

/// Installs the log subscriber: lines to standard error, for people or as JSON, filtered by
/// `CIB_LOG` (in `RUST_LOG`'s syntax), else by `default`, else `info`.
pub fn init_logs(format: &str, default: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CIB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default.unwrap_or("info")));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if format == "json" {
        builder.json().flatten_event(true).with_current_span(false).try_init()
    } else {
        builder.try_init()
    };
    if let Err(e) = result {
        let _ = writeln!(std::io::stderr(), "cib: cannot install the log subscriber: {e}");
    }
}
