//! `cib lint`: every problem of a spec, in the form compilers and editors understand, or as
//! JSON for tools.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

/// How `cib lint` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `PATH:LINE:COL: error: MESSAGE` and the source excerpt (or only the first line).
    Text { short: bool },
    /// One JSON object: `{"path", "valid", "diagnostics": [{"path", "line", "column",
    /// "message", "suggestion"}]}`.
    Json,
}

/// Exit 0 when the spec is valid, 1 when it is not, 2 when it cannot be read.
pub fn run(path: &Path, format: Format) -> ExitCode {
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
    let result = cib_core::spec::parse_bytes(&bytes);
    if format == Format::Json {
        let diags = result.as_ref().err().map(Vec::as_slice).unwrap_or_default();
        let list: Vec<serde_json::Value> = diags
            .iter()
            .map(|d| {
                serde_json::json!({
                    "path": shown,
                    "line": d.pos.line,
                    "column": d.pos.col,
                    "message": d.message,
                    "suggestion": d.suggestion(),
                })
            })
            .collect();
        let doc = serde_json::json!({ "path": shown, "valid": result.is_ok(), "diagnostics": list });
        let _ = writeln!(std::io::stdout().lock(), "{doc}");
        return if result.is_ok() { ExitCode::SUCCESS } else { ExitCode::from(1) };
    }
    let short = matches!(format, Format::Text { short: true });
    match result {
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
