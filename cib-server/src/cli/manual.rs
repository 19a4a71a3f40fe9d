//! `cib completions SHELL` and `cib man`: generated from the same clap definitions the parser
//! uses, so they cannot fall behind the commands.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use super::client::err;

/// Prints the completion script for `shell` to standard output.
pub fn completions(mut command: clap::Command, shell: clap_complete::Shell) -> ExitCode {
    let mut text = Vec::new();
    clap_complete::generate(shell, &mut command, "cib", &mut text);
    write_stdout(&text)
}

/// Prints the manual page of `cib` (roff) to standard output, or, with a directory, writes one
/// page per command there (`cib.1`, `cib-builds.1`, ...).
pub fn man(command: clap::Command, dir: Option<&Path>) -> ExitCode {
    match dir {
        Some(dir) => {
            if let Err(e) = std::fs::create_dir_all(dir).and_then(|()| clap_mangen::generate_to(command, dir)) {
                err(&format!("cib man: cannot write the pages to {}: {e}", dir.display()));
                return ExitCode::from(2);
            }
            ExitCode::SUCCESS
        }
        None => {
            let mut text = Vec::new();
            if let Err(e) = clap_mangen::Man::new(command).render(&mut text) {
                err(&format!("cib man: {e}"));
                return ExitCode::from(3);
            }
            write_stdout(&text)
        }
    }
}

fn write_stdout(bytes: &[u8]) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(3),
    }
}
