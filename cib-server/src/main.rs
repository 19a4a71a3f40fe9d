//! The `cib` command: the reference frontend of the cib engine.

use std::path::PathBuf;
use std::process::ExitCode;

use cib_core::spec::EventKind;
use clap::{Parser, Subcommand};

mod cli;

use cli::{client, lint, plan, run, secret, serve};

#[derive(Debug, Parser)]
#[command(name = "cib", version, about = "cib: continuous integration and delivery that follows your branches")]
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
        /// The event to run for: push, pull_request, promotion, manual or schedule.
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
        /// The event: push, pull_request, promotion, manual or schedule.
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
    /// The server's address.
    #[arg(long, env = "CIB_SERVER", default_value = "http://127.0.0.1:8080", global = true)]
    server: String,
    /// Your API token.
    #[arg(long, env = "CIB_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
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
        .map_err(|_| format!("unknown event '{text}': use push, pull_request, promotion, manual or schedule"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Lint { path, short } => lint::run(&path, short),
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
            })
        }
        Command::Serve { config, log_format } => serve::run(config.as_deref(), &log_format),
        Command::Pool { command: PoolCommand::List, remote } => {
            client::pool_list(&client::Remote { server: remote.server, token: remote.token })
        }
        Command::Lease { command, remote } => {
            let remote = client::Remote { server: remote.server, token: remote.token };
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
            let remote = client::Remote { server: remote.server, token: remote.token };
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
