//! Child processes for the crash and large-log tests: this test binary runs itself again with
//! `CIB_STORE_CHILD` naming what the child does, so the child is the same code, with no extra
//! binary to build or find.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;

const MODE: &str = "CIB_STORE_CHILD";

/// Starts this binary again as a child running `mode`, with `env` set and stdout piped.
pub fn spawn(mode: &str, env: &[(&str, String)], stderr: &Path) -> Child {
    let exe = std::env::current_exe().expect("the test binary's path");
    let stderr = std::fs::File::create(stderr).expect("stderr file");
    let mut command = Command::new(exe);
    command
        .args(["--exact", "child::child_process_entry", "--nocapture", "--test-threads", "1"])
        .env(MODE, mode)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    for (k, v) in env {
        command.env(k, v);
    }
    command.spawn().expect("spawn the child")
}

/// Collects the child's complete report lines (those that start with `C `) as they come; a
/// line cut short by a kill is dropped, since the child had not finished reporting it.
pub fn lines(child: &mut Child) -> (mpsc::Receiver<String>, JoinHandle<()>) {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line.last() == Some(&b'\n') => {
                    let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                    if let Some(report) = text.strip_prefix("C ") {
                        let _ = tx.send(report.to_owned());
                    }
                }
                Ok(_) => return,
            }
        }
    });
    (rx, thread)
}

/// Writes one report line in a single write, so that a kill leaves whole lines or a cut last
/// one, never two mixed.
pub fn report(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("C {line}\n").as_bytes());
    let _ = out.flush();
}

/// The child's entry point. Run as an ordinary test (without `CIB_STORE_CHILD`), it runs the
/// crash workload briefly in this process and checks the result with the crash test's checks,
/// which tests the workload and the checks themselves.
#[test]
fn child_process_entry() {
    let mode = std::env::var(MODE);
    if mode.is_ok() {
        // libtest has printed `test child::child_process_entry ... ` without a newline; the
        // reports must start lines of their own.
        let _ = std::io::stdout().lock().write_all(b"\n");
    }
    match mode.as_deref() {
        Ok("crash-writer") => crate::crash::child_main(),
        Ok("big-log") => crate::big_log::child_main(),
        Ok(other) => panic!("unknown child mode {other}"),
        Err(_) => crate::crash::in_process_run(),
    }
}
