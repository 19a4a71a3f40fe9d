//! Child processes for the crash test: this test binary runs itself again with
//! `CIB_GITHUB_CHILD` naming what the child does, so the child is the same code, with no extra
//! binary to build or find (as in cib-store's tests).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;

const MODE: &str = "CIB_GITHUB_CHILD";

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

/// The child's complete report lines (those that start with `C `), as they come.
pub fn lines(child: &mut Child) -> (mpsc::Receiver<String>, JoinHandle<()>) {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
            if let Some(report) = line.trim_end().strip_prefix("C ") {
                let _ = tx.send(report.to_owned());
            }
            line.clear();
        }
    });
    (rx, thread)
}

/// Writes one report line in a single write.
pub fn report(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("\nC {line}\n").as_bytes());
    let _ = out.flush();
}

/// The child's entry point; run as an ordinary test (without `CIB_GITHUB_CHILD`) it does nothing.
#[test]
fn child_process_entry() {
    match std::env::var(MODE).as_deref() {
        Ok("notify-then-hang") => crate::notifier::child_main(),
        Ok(other) => panic!("unknown child mode {other}"),
        Err(_) => {}
    }
}
