//! The `cib` command: the reference frontend of the cib engine.

use std::path::PathBuf;
use std::process::ExitCode;

use cib_core::spec::EventKind;
use clap::{CommandFactory, Parser, Subcommand};

mod cli;

use cli::{client, init, lint, logs, manual, plan, remote, run, secret, serve, store, worker};

/// `0.1.0 (commit 0123456789ab, 2026-12-01)`: the commit comes from `build.rs`.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("CIB_BUILD_COMMIT_TEXT"), ")");

#[derive(Debug, Parser)]
#[command(
    name = "cib",
    version = VERSION,
    about = "cib: continuous integration and delivery that follows your branches",
    after_help = "Client commands (builds, logs, trigger, ...) talk to a server: --server and --token, \
                  CIB_SERVER and CIB_TOKEN, or a profile in $XDG_CONFIG_HOME/cib/config.toml \
                  (~/.config/cib/config.toml). Exit codes: 0 done, 1 failed or refused, 2 usage error, \
                  3 infrastructure (server unreachable, bad token, no Docker)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a build spec and print every problem as PATH:LINE:COL: error: MESSAGE.
    Lint {
        /// The spec to check.
        #[arg(default_value = cib_core::spec::FILE_NAME)]
        path: PathBuf,
        /// Print only the one-line form of each problem, without the source excerpt.
        #[arg(long)]
        short: bool,
        /// `text` for people, or `json`: {"path", "valid", "diagnostics": [{"path", "line",
        /// "column", "message", "suggestion"}]}.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        format: String,
    },
    /// Write a starting .cib.yml for the project here (Python, Node, Rust, Go or shell).
    Init {
        /// The project's directory.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// The kind of project (default: found from pyproject.toml, package.json, Cargo.toml or go.mod).
        #[arg(long, value_enum)]
        kind: Option<init::Kind>,
        /// Replace an existing .cib.yml.
        #[arg(long)]
        force: bool,
    },
    /// Print the shell completion script for bash, zsh or fish (and elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or write one page per command into a directory.
    Man {
        /// Write cib.1, cib-builds.1, ... here instead.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Print the JSON Schema of the build spec, for editors and validators.
    Schema,
    /// Print the OpenAPI description of the server's HTTP API.
    Openapi,
    /// Run the spec here, with the engine itself, in Docker containers.
    Run {
        /// The repository (default: the current directory).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The event to run for: push, pull_request, promotion, manual, schedule or upstream.
        #[arg(long, value_parser = parse_event)]
        event: Option<EventKind>,
        /// The branch (default: the current one).
        #[arg(long)]
        branch: Option<String>,
        /// Run this pipeline whatever its triggers (repeatable).
        #[arg(long = "pipeline")]
        pipelines: Vec<String>,
        /// Run only this step and what it depends on (repeatable).
        #[arg(long = "step")]
        steps: Vec<String>,
        /// A variable for every step, NAME=VALUE (repeatable).
        #[arg(long = "env")]
        env: Vec<String>,
        /// A secret, NAME=VALUE (repeatable). It is masked in the output.
        #[arg(long = "secret")]
        secrets: Vec<String>,
        /// A file of NAME=VALUE lines holding secrets.
        #[arg(long)]
        secrets_file: Option<PathBuf>,
        /// Run a clean checkout of this commit instead of the working tree as it is.
        #[arg(long)]
        commit: Option<String>,
        /// Keep the store and workspaces here (default: a temporary directory).
        #[arg(long, env = "CIB_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Colour and a progress line: auto (on a terminal), always or never.
        #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
        color: String,
        /// Also write the engine's log lines to standard error (repeat for more detail).
        #[arg(short, long, action = clap::ArgAction::Count)]
        verbose: u8,
        /// A server configuration file whose `[limits]` apply (default: the built-in limits).
        #[arg(long, env = "CIB_CONFIG")]
        config: Option<PathBuf>,
        /// One JSON object per line on standard output: the engine's events, output lines
        /// (`"type": "output"`), and a closing `run_finished` with the exit code.
        #[arg(long)]
        json: bool,
    },
    /// Serve webhooks, the REST API and the event stream (configuration: a TOML file and CIB_* variables).
    Serve {
        /// The configuration file.
        #[arg(long, env = "CIB_CONFIG")]
        config: Option<PathBuf>,
        /// Log lines for people (`text`) or one JSON object per line (`json`). The level filter
        /// comes from `CIB_LOG`, in `RUST_LOG`'s syntax (default `info`).
        #[arg(long, env = "CIB_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
    },
    /// Run steps for a server on this machine: consume jobs for these labels from the broker and
    /// run each as a process here (see docs/scaling.md).
    Worker {
        /// The broker: amqp://user:password@host:5672/vhost, or amqps:// with TLS.
        #[arg(long, env = "CIB_BROKER_URL")]
        broker: String,
        /// What this machine offers, as KEY=VALUE pairs: os=macos,arch=arm64. Steps whose
        /// `runs_on` asks for these (or some of them) come here.
        #[arg(long)]
        labels: String,
        /// This worker's name in the steps' logs (default: the host name).
        #[arg(long, env = "CIB_WORKER_NAME")]
        name: Option<String>,
        /// Keep a file per job this worker holds here (readable by its owner only), so that an
        /// operator can tell which jobs a worker held when it died.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Log lines for people (`text`) or one JSON object per line (`json`).
        #[arg(long, env = "CIB_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
    },
    /// The server's store itself, for operators: copy a SQLite store into PostgreSQL.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// List builds on a server, newest first.
    Builds {
        /// Only this repository (owner/name).
        #[arg(long)]
        repo: Option<String>,
        /// Only this branch.
        #[arg(long)]
        branch: Option<String>,
        /// Only these statuses (repeat or separate with commas): queued, waiting, running,
        /// cancelling, success, neutral, failed, cancelled, timed_out, errored.
        #[arg(long, value_delimiter = ',')]
        status: Vec<String>,
        /// At most this many builds (1 to 500; the server's default is 50).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=500))]
        limit: Option<u32>,
        /// Print the server's JSON answer.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Show one build: its steps and attempts, gates and deliverables.
    Build {
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// List the artifacts a build kept, or download one with --get (checked against its sha256).
    Artifacts {
        id: String,
        /// Download this artifact (a step's name) as a .tar.gz.
        #[arg(long, value_name = "NAME")]
        get: Option<String>,
        /// Where the download goes (default: NAME.tar.gz here).
        #[arg(short, long, requires = "get")]
        output: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// A repository's caches: list them, or remove a key's (admin).
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Print a step's log; -f follows it until the step ends, resuming after dropped connections.
    Logs {
        id: String,
        step: String,
        /// Follow the log as it grows, until the step ends.
        #[arg(short, long)]
        follow: bool,
        /// This attempt of the step (default: the latest).
        #[arg(long)]
        attempt: Option<u32>,
        /// Start each line with when it was printed (UTC).
        #[arg(long)]
        timestamps: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Start a pipeline (one with `on: manual`) by hand; prints the build's id.
    Trigger {
        /// The repository, owner/name.
        repo: String,
        pipeline: String,
        /// The branch, tag or commit to build.
        #[arg(long = "ref", default_value = "master")]
        reference: String,
        /// An input the pipeline declares, NAME=VALUE (repeatable); steps read it as INPUT_NAME.
        #[arg(long = "input")]
        inputs: Vec<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Cancel a running build.
    Cancel {
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Run a build's pipeline again at the same commit; prints the new build's id.
    Retry {
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Approve a build's gate.
    Approve {
        id: String,
        step: String,
        #[arg(long)]
        comment: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Reject a build's gate: it fails.
    Reject {
        id: String,
        step: String,
        #[arg(long)]
        comment: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Fast-forward master to a branch, when the merge policy allows; every reason when not.
    Merge {
        repo: String,
        /// The branch (or commit) to merge.
        head: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Promote a commit to production, when the promotion policy allows; every reason when not.
    Promote {
        repo: String,
        commit: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Approve promoting an exact commit (one of the approvals `cib promote` needs).
    Approvals {
        repo: String,
        commit: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Which commit is in which environment, since when, moved and approved by whom.
    Envs {
        repo: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Who the token is on the server: name, person, role and teams.
    Whoami {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Resource pools on a server: `cib pool list`.
    Pool {
        #[command(subcommand)]
        command: PoolCommand,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Take, extend, return or revoke units of a pool on a server, for manual testing.
    Lease {
        #[command(subcommand)]
        command: LeaseCommand,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// The server's encrypted secrets (admin token): set, list, remove, rekey.
    Secret {
        #[command(subcommand)]
        command: SecretCommand,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Show which pipelines and steps an event would start.
    Plan {
        /// The spec to read.
        #[arg(default_value = cib_core::spec::FILE_NAME)]
        path: PathBuf,
        /// The event: push, pull_request, promotion, manual, schedule or upstream.
        #[arg(long, default_value = "push", value_parser = parse_event)]
        event: EventKind,
        /// The branch (for a pull request, its base branch). Default: the current git branch.
        #[arg(long)]
        branch: Option<String>,
        /// A tag push instead of a branch push.
        #[arg(long, conflicts_with = "branch")]
        tag: Option<String>,
        /// Changed files, for path filters (repeat or separate with commas). Default: unknown.
        #[arg(long, value_delimiter = ',')]
        changed: Option<Vec<String>>,
        /// Print JSON instead of a tree.
        #[arg(long)]
        json: bool,
        /// A server configuration file whose `[limits]` apply (default: the built-in limits).
        #[arg(long, env = "CIB_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct RemoteArgs {
    /// The server's address (default: the profile's, else http://127.0.0.1:8080).
    #[arg(long, env = "CIB_SERVER", global = true)]
    server: Option<String>,
    /// Your API token (default: the profile's).
    #[arg(long, env = "CIB_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// The profile of $XDG_CONFIG_HOME/cib/config.toml to use (default: its `default`).
    #[arg(long, env = "CIB_PROFILE", global = true)]
    profile: Option<String>,
}

impl RemoteArgs {
    fn resolve(self) -> Result<client::Remote, ExitCode> {
        client::Remote::resolve(client::RemoteFlags { server: self.server, token: self.token, profile: self.profile })
    }
}

/// Resolves the server and token, then runs a client command to its exit code.
fn remote<F, Fut>(args: RemoteArgs, command: F) -> ExitCode
where
    F: FnOnce(client::Remote) -> Fut,
    Fut: std::future::Future<Output = Result<(), client::Failure>>,
{
    match args.resolve() {
        Ok(r) => client::block(command(r)),
        Err(code) => code,
    }
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// The repository's caches, newest first: key, namespace and when each was saved.
    List {
        repo: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Removes the repository's caches of KEY, in every namespace.
    Rm {
        repo: String,
        key: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// Each pool's units, who holds what until when, and who waits in which position.
    List,
}

#[derive(Debug, Subcommand)]
enum LeaseCommand {
    /// Take units of a pool now, or wait in its queue.
    Take {
        pool: String,
        /// How long: 30m, 2h, 1d.
        #[arg(long = "for")]
        duration: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Keep a lease longer: it now ends this long from now.
    Extend {
        lease: String,
        #[arg(long = "for")]
        duration: String,
    },
    /// Give units back (or leave the queue).
    Return { lease: String },
    /// End anyone's lease (admins).
    Revoke { lease: String },
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Copy everything of a SQLite store (journal, snapshots, builds, logs, inbox, sealed
    /// secrets) into an empty PostgreSQL database, then check every table's row count and
    /// checksum; a database that holds anything is refused. Stop the server first.
    Copy {
        /// The SQLite store: sqlite:PATH (the server's is sqlite:<data_dir>/cib.db).
        #[arg(long)]
        from: String,
        /// The PostgreSQL database: postgres://user:password@host:port/database.
        #[arg(long)]
        to: String,
    },
}

#[derive(Debug, Subcommand)]
enum SecretCommand {
    /// Set a secret of REPO (owner/name); the value is read from standard input.
    Set {
        repo: String,
        name: String,
        /// Only builds of branches matching this glob get it (repeatable); pull requests never.
        #[arg(long = "branch")]
        branches: Vec<String>,
        /// Only these pipelines get it (repeatable).
        #[arg(long = "pipeline")]
        pipelines: Vec<String>,
        /// Only deploy pipelines of these environments get it (repeatable).
        #[arg(long = "environment")]
        environments: Vec<String>,
    },
    /// List secrets (names, scopes, when and by whom set; never values).
    List {
        repo: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove a secret.
    Rm { repo: String, name: String },
    /// Seal every secret under a new key. The server makes it and replaces its key file; with
    /// CIB_SECRET_KEY, give the new key on standard input with --key-stdin.
    Rekey {
        #[arg(long)]
        key_stdin: bool,
    },
}

fn parse_event(text: &str) -> Result<EventKind, String> {
    serde_json::from_value(serde_json::Value::String(text.replace('-', "_")))
        .map_err(|_| format!("unknown event '{text}': use push, pull_request, promotion, manual, schedule or upstream"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Lint { path, short, format } => {
            lint::run(&path, if format == "json" { lint::Format::Json } else { lint::Format::Text { short } })
        }
        Command::Init { dir, kind, force } => init::run(&dir, kind, force),
        Command::Completions { shell } => manual::completions(Cli::command(), shell),
        Command::Man { dir } => manual::man(Cli::command(), dir.as_deref()),
        Command::Builds { repo, branch, status, limit, json, remote: r } => {
            remote(
                r,
                |r| async move { remote::builds(&r, remote::BuildsQuery { repo, branch, status, limit }, json).await },
            )
        }
        Command::Build { id, json, remote: r } => remote(r, |r| async move { remote::build(&r, &id, json).await }),
        Command::Artifacts { id, get, output, json, remote: r } => remote(r, |r| async move {
            cli::artifacts::artifacts(&r, cli::artifacts::ArtifactsArgs { build: id, get, output, json }).await
        }),
        Command::Cache { command: CacheCommand::List { repo, json, remote: r } } => {
            remote(r, |r| async move { cli::artifacts::cache_list(&r, &repo, json).await })
        }
        Command::Cache { command: CacheCommand::Rm { repo, key, remote: r } } => {
            remote(r, |r| async move { cli::artifacts::cache_remove(&r, &repo, &key).await })
        }
        Command::Logs { id, step, follow, attempt, timestamps, remote: r } => remote(r, |r| async move {
            logs::logs(&r, logs::LogsArgs { build: id, step, follow, attempt, timestamps }).await
        }),
        Command::Trigger { repo, pipeline, reference, inputs, json, remote: r } => {
            remote(r, |r| async move { remote::trigger(&r, &repo, &pipeline, &reference, &inputs, json).await })
        }
        Command::Cancel { id, json, remote: r } => remote(r, |r| async move { remote::cancel(&r, &id, json).await }),
        Command::Retry { id, json, remote: r } => remote(r, |r| async move { remote::retry(&r, &id, json).await }),
        Command::Approve { id, step, comment, json, remote: r } => {
            remote(r, |r| async move { remote::decide(&r, &id, &step, true, comment.as_deref(), json).await })
        }
        Command::Reject { id, step, comment, json, remote: r } => {
            remote(r, |r| async move { remote::decide(&r, &id, &step, false, comment.as_deref(), json).await })
        }
        Command::Merge { repo, head, json, remote: r } => {
            remote(r, |r| async move { remote::merge(&r, &repo, &head, json).await })
        }
        Command::Promote { repo, commit, json, remote: r } => {
            remote(r, |r| async move { remote::promote(&r, &repo, &commit, json).await })
        }
        Command::Approvals { repo, commit, json, remote: r } => {
            remote(r, |r| async move { remote::approvals(&r, &repo, &commit, json).await })
        }
        Command::Envs { repo, json, remote: r } => remote(r, |r| async move { remote::envs(&r, &repo, json).await }),
        Command::Whoami { json, remote: r } => remote(r, |r| async move { remote::whoami(&r, json).await }),
        Command::Run {
            dir,
            event,
            branch,
            pipelines,
            steps,
            env,
            secrets,
            secrets_file,
            commit,
            data_dir,
            color,
            verbose,
            config,
            json,
        } => {
            if verbose > 0 {
                cli::init_logs("text", Some(if verbose == 1 { "info" } else { "debug" }));
            }
            let color = match color.as_str() {
                "always" => Some(true),
                "never" => Some(false),
                _ => None,
            };
            run::run(run::RunArgs {
                dir,
                event,
                branch,
                pipelines,
                steps,
                env,
                secrets,
                secrets_file,
                commit,
                data_dir,
                color,
                config,
                json,
            })
        }
        Command::Serve { config, log_format } => serve::run(config.as_deref(), &log_format),
        Command::Worker { broker, labels, name, state_dir, log_format } => {
            worker::run(&broker, &labels, name, state_dir, &log_format)
        }
        Command::Store { command: StoreCommand::Copy { from, to } } => store::copy(&from, &to),
        Command::Pool { command: PoolCommand::List, remote } => match remote.resolve() {
            Ok(remote) => client::pool_list(&remote),
            Err(code) => code,
        },
        Command::Lease { command, remote } => {
            let remote = match remote.resolve() {
                Ok(remote) => remote,
                Err(code) => return code,
            };
            match command {
                LeaseCommand::Take { pool, duration, count, reason } => {
                    client::take(&remote, &pool, count, &duration, &reason)
                }
                LeaseCommand::Extend { lease, duration } => client::extend(&remote, &lease, &duration),
                LeaseCommand::Return { lease } => client::give_back(&remote, &lease),
                LeaseCommand::Revoke { lease } => client::revoke(&remote, &lease),
            }
        }
        Command::Secret { command, remote } => {
            let remote = match remote.resolve() {
                Ok(remote) => remote,
                Err(code) => return code,
            };
            match command {
                SecretCommand::Set { repo, name, branches, pipelines, environments } => {
                    secret::set(&remote, &repo, &name, &branches, &pipelines, &environments)
                }
                SecretCommand::List { repo, json } => secret::list(&remote, repo.as_deref(), json),
                SecretCommand::Rm { repo, name } => secret::remove(&remote, &repo, &name),
                SecretCommand::Rekey { key_stdin } => secret::rekey(&remote, key_stdin),
            }
        }
        Command::Plan { path, event, branch, tag, changed, json, config } => {
            plan::run(plan::PlanArgs { path: &path, event, branch, tag, changed, json, config: config.as_deref() })
        }
        Command::Schema => cli::schema(),
        Command::Openapi => cli::openapi(),
    }
}
