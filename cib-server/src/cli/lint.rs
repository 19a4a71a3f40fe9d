//! `cib lint`: every problem of a spec, in the form compilers and editors understand.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

/// Exit 0 when the spec is valid, 1 when it is not, 2 when it cannot be read.
pub fn run(path: &Path, short: bool) -> ExitCode {
    let shown = path.display().to_string();
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => {
            eprintln_safe(&format!("{shown}: error: cannot read the spec: {e}"));
            return ExitCode::from(2);
        }
    };
    // Text that is too long or not UTF-8 is a mistake in the spec like any other, shown at
    // its place; the lossy text is only for showing the line.
    let source = String::from_utf8_lossy(&bytes);
    match cib_core::spec::parse_bytes(&bytes) {
        Ok(spec) => {
            let steps: usize = spec.pipelines.iter().map(|p| p.steps.len()).sum();
            eprintln_safe(&format!("{shown}: ok ({} pipelines, {steps} steps)", spec.pipelines.len()));
            ExitCode::SUCCESS
        }
        Err(diags) => {
            let mut out = std::io::stdout().lock();
            for d in &diags {
                let text = if short { d.line(&shown) } else { d.render(&shown, &source) };
                let _ = writeln!(out, "{text}");
            }
            eprintln_safe(&format!("{shown}: {} error{}", diags.len(), if diags.len() == 1 { "" } else { "s" }));
            ExitCode::from(1)
        }
    }
}

fn eprintln_safe(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}
