// Shared by `build.rs` (through `include!`) and the tests of `cli` (which check the fallbacks),
// so the logic that names the commit is tested as it runs.

/// `git` in `dir`, its trimmed output when it succeeds with some.
fn git_in(dir: &std::path::Path, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git").arg("-C").arg(dir).args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// What `--version` says of the commit: `commit 0123456789ab, 2026-12-01` from `given` (the
/// builder's `CIB_BUILD_COMMIT`) or else from Git in `dir`, or `commit unknown` with neither.
fn commit_text(dir: &std::path::Path, given: Option<&str>) -> String {
    if let Some(commit) = given.map(str::trim).filter(|c| !c.is_empty()) {
        return format!("commit {commit}");
    }
    match git_in(dir, &["rev-parse", "--short=12", "HEAD"]) {
        Some(commit) => match git_in(dir, &["log", "-1", "--format=%cs", "HEAD"]) {
            Some(date) => format!("commit {commit}, {date}"),
            None => format!("commit {commit}"),
        },
        None => "commit unknown".to_owned(),
    }
}
