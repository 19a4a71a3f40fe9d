//! The `cib` command: the reference frontend of the cib engine.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod lint;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Lint { path, short } => lint::run(&path, short),
        Command::Schema => {
            let schema = cib_core::spec::schema();
            let text = serde_json::to_string_pretty(&schema).unwrap_or_default();
            #[allow(clippy::print_stdout)]
            {
                println!("{text}");
            }
            ExitCode::SUCCESS
        }
    }
}
