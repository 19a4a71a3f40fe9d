//! `cib secret`: the encrypted secret store of a running server, through `/api/v1/secrets`
//! (admin tokens only). The server holds the key; this command never sees it, and a value
//! is read from standard input, never from the command line, where `ps` and shell history
//! would show it.

use std::io::Read;
use std::process::ExitCode;

use super::client::{Remote, call, err, finish, out};

/// `owner/name` as the two path segments the API takes.
fn repo_path(repo: &str) -> Result<String, ExitCode> {
    match repo.split_once('/') {
        Some((owner, name)) if !owner.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(format!("{owner}/{name}"))
        }
        _ => {
            err(&format!("cib: '{repo}' is not a repository: write owner/name"));
            Err(ExitCode::from(2))
        }
    }
}

/// `cib secret set REPO NAME [--branch GLOB]... [--pipeline NAME]... [--environment NAME]...`.
pub fn set(
    remote: &Remote,
    repo: &str,
    name: &str,
    branches: &[String],
    pipelines: &[String],
    environments: &[String],
) -> ExitCode {
    let path = match repo_path(repo) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut value = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut value) {
        err(&format!("cib: cannot read the value from standard input: {e}"));
        return ExitCode::from(2);
    }
    // `echo value | cib secret set` and a file ending in a newline both mean the value
    // without it; a value that needs a final newline is rare enough to be typed with two.
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    let body = serde_json::json!({
        "value": value,
        "branches": branches,
        "pipelines": pipelines,
        "environments": environments,
    });
    finish(call(remote, "PUT", &format!("/api/v1/secrets/{path}/{name}"), Some(body)), |v| {
        out(&format!("{repo}: secret {} set{}", v["name"].as_str().unwrap_or(name), scope_text(v)));
    })
}

fn list_text(v: &serde_json::Value, key: &str) -> Vec<String> {
    v[key].as_array().into_iter().flatten().filter_map(|x| x.as_str().map(str::to_owned)).collect()
}

fn scope_text(v: &serde_json::Value) -> String {
    let mut parts = Vec::new();
    for (key, label) in [("branches", "branches"), ("pipelines", "pipelines"), ("environments", "environments")] {
        let items = list_text(v, key);
        if !items.is_empty() {
            parts.push(format!("{label} {}", items.join(",")));
        }
    }
    if parts.is_empty() { String::new() } else { format!(" ({})", parts.join("; ")) }
}

/// `cib secret list [REPO] [--json]`.
pub fn list(remote: &Remote, repo: Option<&str>, json: bool) -> ExitCode {
    let path = match repo {
        Some(r) => match repo_path(r) {
            Ok(p) => format!("/api/v1/secrets?repo={}", p.replace('/', "%2F")),
            Err(code) => return code,
        },
        None => "/api/v1/secrets".to_owned(),
    };
    finish(call(remote, "GET", &path, None), |v| {
        if json {
            out(&serde_json::to_string_pretty(v).unwrap_or_default());
            return;
        }
        for s in v["secrets"].as_array().into_iter().flatten() {
            out(&format!(
                "{} {}{} set by {} at t={}s",
                s["repo"].as_str().unwrap_or("?"),
                s["name"].as_str().unwrap_or("?"),
                scope_text(s),
                s["set_by"].as_str().unwrap_or("?"),
                s["set_at"].as_u64().unwrap_or(0) / 1000
            ));
        }
    })
}

/// `cib secret rm REPO NAME`.
pub fn remove(remote: &Remote, repo: &str, name: &str) -> ExitCode {
    let path = match repo_path(repo) {
        Ok(p) => p,
        Err(code) => return code,
    };
    finish(call(remote, "DELETE", &format!("/api/v1/secrets/{path}/{name}"), None), |_| {
        out(&format!("{repo}: secret {name} removed"));
    })
}

/// `cib secret rekey`: the server makes a new key, re-seals every secret and replaces its key
/// file. With `CIB_SECRET_KEY`, `--key-stdin` sends the new key, read from standard input.
pub fn rekey(remote: &Remote, key_stdin: bool) -> ExitCode {
    let body = if key_stdin {
        let mut key = String::new();
        if let Err(e) = std::io::stdin().read_to_string(&mut key) {
            err(&format!("cib: cannot read the key from standard input: {e}"));
            return ExitCode::from(2);
        }
        Some(serde_json::json!({ "key": key.trim() }))
    } else {
        None
    };
    finish(call(remote, "POST", "/api/v1/secrets/rekey", body), |v| match v["key_file"].as_str() {
        Some(file) => out(&format!("{} secrets sealed under the new key in {file}", v["resealed"])),
        None => out(&format!(
            "{} secrets sealed under the new key; set CIB_SECRET_KEY to it before the next start",
            v["resealed"]
        )),
    })
}
