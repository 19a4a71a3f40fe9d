//! The `cib` command's subcommands: local ones (`lint`, `schema`, `openapi`, `plan`, `run`,
//! `init`, `completions`, `man`), the server (`serve`) and its store (`store copy`), a remote worker (`worker`), and client commands that talk to a
//! server (`builds`, `build`, `logs`, `trigger`, `cancel`, `retry`, `approve`, `reject`,
//! `merge`, `promote`, `approvals`, `envs`, `whoami`, `artifacts`, `pool`, `lease`, `secret`).

pub mod artifacts;
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
pub mod store;
pub mod worker;

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

/// The commit naming of `build.rs`, run here on directories with and without Git.
#[cfg(test)]
mod build_version {
    include!("../../build/version.rs");

    fn git(dir: &std::path::Path, args: &[&str]) {
        let ok = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "Test")
            .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
            .env("GIT_COMMITTER_NAME", "Test")
            .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "git {args:?}");
    }

    #[test]
    fn a_tree_without_git_says_unknown_and_a_given_commit_wins() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert_eq!(commit_text(dir.path(), None), "commit unknown");
        assert_eq!(commit_text(dir.path(), Some("  ")), "commit unknown", "an empty value is none");
        assert_eq!(commit_text(dir.path(), Some("abc123\n")), "commit abc123");

        git(dir.path(), &["init", "-q"]);
        assert_eq!(commit_text(dir.path(), None), "commit unknown", "a repository without commits");
        std::fs::write(dir.path().join("f"), "x").expect("write");
        git(dir.path(), &["add", "f"]);
        git(dir.path(), &["commit", "-q", "-m", "one"]);
        let text = commit_text(dir.path(), None);
        let head = git_in(dir.path(), &["rev-parse", "--short=12", "HEAD"]).expect("HEAD");
        assert!(text.starts_with(&format!("commit {head}, 20")), "{text}");
        assert_eq!(commit_text(dir.path(), Some("given")), "commit given");
    }
}
