//! The everyday client commands: builds, one build, starting, cancelling and retrying builds,
//! deciding at gates, merging, approving and promoting, environments, and who the token is.
//! Each is one or two requests to the API (`docs/api.md`); `--json` prints the server's answer.

use cib_core::time::Timestamp;

use super::client::{Failure, Http, Remote, encode, http_client, out, repo_path};

fn text<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("-")
}

/// `2026-11-29 05:59:13` (UTC), or `-`.
fn time(v: &serde_json::Value) -> String {
    match v.as_u64() {
        Some(ms) => Timestamp(ms).rfc3339_secs().replace('T', " ").trim_end_matches('Z').to_owned(),
        None => "-".to_owned(),
    }
}

/// `850ms`, `4.2s`, `3m05s`, `2h03m`.
fn took(from: &serde_json::Value, to: &serde_json::Value) -> String {
    let (Some(a), Some(b)) = (from.as_u64(), to.as_u64()) else { return "-".to_owned() };
    let ms = b.saturating_sub(a);
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

fn short(commit: &str) -> &str {
    commit.get(..10).unwrap_or(commit)
}

/// Prints rows under headers, each column as wide as its widest cell.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0).max(headers[i].len()))
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out(padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row.clone());
    }
}

pub(crate) fn pretty(v: &serde_json::Value) {
    out(&serde_json::to_string_pretty(v).unwrap_or_default());
}

struct Ctx {
    remote: Remote,
    http: Http,
}

impl Ctx {
    fn new(remote: &Remote) -> Result<Ctx, Failure> {
        Ok(Ctx { remote: remote.clone(), http: http_client()? })
    }

    async fn get(&self, path: &str) -> Result<serde_json::Value, Failure> {
        self.remote.json(&self.http, "GET", path, None).await
    }

    async fn post(&self, path: &str, body: Option<serde_json::Value>) -> Result<serde_json::Value, Failure> {
        self.remote.json(&self.http, "POST", path, body).await
    }
}

/// The build statuses a filter may name, as the API spells them.
pub const STATUSES: [&str; 10] =
    ["queued", "waiting", "running", "cancelling", "success", "neutral", "failed", "cancelled", "timed_out", "errored"];

/// What `cib builds` asks for.
#[derive(Debug, Default)]
pub struct BuildsQuery {
    pub repo: Option<String>,
    pub branch: Option<String>,
    pub status: Vec<String>,
    pub limit: Option<u32>,
}

/// `cib builds [--repo R] [--branch B] [--status S] [--limit N] [--json]`.
pub async fn builds(remote: &Remote, q: BuildsQuery, json: bool) -> Result<(), Failure> {
    for s in &q.status {
        if !STATUSES.contains(&s.as_str()) {
            return Err(Failure::Usage(format!("unknown status '{s}': use one of {}", STATUSES.join(", "))));
        }
    }
    let mut params = Vec::new();
    if let Some(repo) = &q.repo {
        params.push(format!("repo={}", encode(repo)));
    }
    if let Some(branch) = &q.branch {
        params.push(format!("branch={}", encode(branch)));
    }
    if !q.status.is_empty() {
        params.push(format!("status={}", q.status.join(",")));
    }
    if let Some(limit) = q.limit {
        params.push(format!("limit={limit}"));
    }
    let path =
        if params.is_empty() { "/api/v1/builds".to_owned() } else { format!("/api/v1/builds?{}", params.join("&")) };
    let ctx = Ctx::new(remote)?;
    let v = ctx.get(&path).await?;
    if json {
        pretty(&v);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = v["builds"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            vec![
                text(b, "id").to_owned(),
                text(b, "repo").to_owned(),
                text(b, "branch").to_owned(),
                text(b, "pipeline").to_owned(),
                text(b, "status").to_owned(),
                short(text(b, "commit")).to_owned(),
                time(&b["queued_at"]),
                took(&b["started_at"], &b["finished_at"]),
            ]
        })
        .collect();
    if rows.is_empty() {
        out("no builds");
        return Ok(());
    }
    table(&["ID", "REPO", "BRANCH", "PIPELINE", "STATUS", "COMMIT", "QUEUED (UTC)", "TOOK"], &rows);
    Ok(())
}

/// `cib build ID [--json]`: the build, its step attempts, gates and deliverables.
pub async fn build(remote: &Remote, id: &str, json: bool) -> Result<(), Failure> {
    let ctx = Ctx::new(remote)?;
    let v = ctx.get(&format!("/api/v1/builds/{}", encode(id))).await?;
    if json {
        pretty(&v);
        return Ok(());
    }
    let b = &v["build"];
    out(&format!("build     {}", text(b, "id")));
    out(&format!("pipeline  {} of {}", text(b, "pipeline"), text(b, "repo")));
    out(&format!("commit    {} ({})", text(b, "commit"), b["branch"].as_str().unwrap_or("no branch")));
    out(&format!("status    {}", text(b, "status")));
    out(&format!(
        "queued    {}, started {}, finished {} (took {})",
        time(&b["queued_at"]),
        time(&b["started_at"]),
        time(&b["finished_at"]),
        took(&b["started_at"], &b["finished_at"])
    ));
    out("");
    let rows: Vec<Vec<String>> = v["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            vec![
                text(s, "name").to_owned(),
                s["attempt"].to_string(),
                text(s, "status").to_owned(),
                took(&s["started_at"], &s["finished_at"]),
                s["detail"].as_str().unwrap_or("").to_owned(),
            ]
        })
        .collect();
    if rows.is_empty() {
        out("no step has started");
    } else {
        table(&["STEP", "ATTEMPT", "STATUS", "TOOK", "DETAIL"], &rows);
    }
    let gates = v["gates"].as_array().cloned().unwrap_or_default();
    if !gates.is_empty() {
        out("");
        out("gates:");
        for g in &gates {
            let approved: Vec<&str> =
                g["approved_by"].as_array().into_iter().flatten().filter_map(|a| a.as_str()).collect();
            let mut who: Vec<String> = Vec::new();
            for (key, label) in [("users", "users"), ("teams", "teams")] {
                let names: Vec<&str> = g[key].as_array().into_iter().flatten().filter_map(|a| a.as_str()).collect();
                if !names.is_empty() {
                    who.push(format!("{label} {}", names.join(", ")));
                }
            }
            let from = if who.is_empty() { "anyone with write access".to_owned() } else { who.join("; ") };
            let line = if g["kind"] == "approval" {
                format!(
                    "  {} (approval): {} of {} approvals{}; from {from}",
                    text(g, "step"),
                    approved.len(),
                    g["approvals"],
                    if approved.is_empty() { String::new() } else { format!(" ({})", approved.join(", ")) }
                )
            } else {
                format!("  {} ({}): from {from}", text(g, "step"), text(g, "kind"))
            };
            out(&line);
            if let Some(instructions) = g["instructions"].as_str() {
                out(&format!("    {instructions}"));
            }
        }
    }
    let deliverables = v["deliverables"].as_array().cloned().unwrap_or_default();
    if !deliverables.is_empty() {
        out("");
        out("deliverables:");
        for d in &deliverables {
            let what = match d["files"].as_str() {
                Some(files) => format!("files {files}"),
                None => {
                    let tags: Vec<&str> =
                        d["tags"].as_array().into_iter().flatten().filter_map(|t| t.as_str()).collect();
                    format!("tags {}", tags.join(", "))
                }
            };
            out(&format!("  {} {} ({what})", text(d, "kind"), text(d, "target")));
        }
    }
    Ok(())
}

/// `K=V` pairs; the value may hold `=`.
fn inputs(items: &[String]) -> Result<serde_json::Map<String, serde_json::Value>, Failure> {
    let mut map = serde_json::Map::new();
    for item in items {
        match item.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                map.insert(k.trim().to_owned(), serde_json::Value::String(v.to_owned()));
            }
            _ => return Err(Failure::Usage(format!("--input '{item}' is not NAME=VALUE"))),
        }
    }
    Ok(map)
}

/// `cib trigger REPO PIPELINE [--ref REF] [--input K=V]...`.
pub async fn trigger(
    remote: &Remote,
    repo: &str,
    pipeline: &str,
    reference: &str,
    given: &[String],
    json: bool,
) -> Result<(), Failure> {
    repo_path(repo)?;
    let variables = inputs(given)?;
    let body = serde_json::json!({ "repo": repo, "ref": reference, "pipeline": pipeline, "variables": variables });
    let ctx = Ctx::new(remote)?;
    let v = ctx.post("/api/v1/builds", Some(body)).await?;
    if json {
        pretty(&v);
    } else {
        out(text(&v, "build"));
    }
    Ok(())
}

/// `cib cancel ID`.
pub async fn cancel(remote: &Remote, id: &str, json: bool) -> Result<(), Failure> {
    let ctx = Ctx::new(remote)?;
    let v = ctx.post(&format!("/api/v1/builds/{}/cancel", encode(id)), None).await?;
    if json {
        pretty(&v)
    } else {
        out(&format!("{id}: cancelling"))
    }
    Ok(())
}

/// `cib retry ID`: prints the new build's id.
pub async fn retry(remote: &Remote, id: &str, json: bool) -> Result<(), Failure> {
    let ctx = Ctx::new(remote)?;
    let v = ctx.post(&format!("/api/v1/builds/{}/retry", encode(id)), None).await?;
    if json {
        pretty(&v)
    } else {
        out(text(&v, "build"))
    }
    Ok(())
}

/// `cib approve ID STEP` and `cib reject ID STEP`.
pub async fn decide(
    remote: &Remote,
    id: &str,
    step: &str,
    approve: bool,
    comment: Option<&str>,
    json: bool,
) -> Result<(), Failure> {
    let ctx = Ctx::new(remote)?;
    let verb = if approve { "approve" } else { "reject" };
    let body = comment.map(|c| serde_json::json!({ "comment": c }));
    let v = ctx.post(&format!("/api/v1/builds/{}/gates/{}/{verb}", encode(id), encode(step)), body).await?;
    if json {
        pretty(&v);
    } else if approve {
        out(&format!("{id}/{step}: approved ({} of {})", v["count"], v["needed"]));
    } else {
        out(&format!("{id}/{step}: rejected"));
    }
    Ok(())
}

fn ids(v: &serde_json::Value) -> String {
    let list: Vec<&str> = v["builds"].as_array().into_iter().flatten().filter_map(|b| b.as_str()).collect();
    if list.is_empty() { "no builds".to_owned() } else { list.join(", ") }
}

/// `cib merge REPO HEAD`.
pub async fn merge(remote: &Remote, repo: &str, head: &str, json: bool) -> Result<(), Failure> {
    let path = format!("/api/v1/repos/{}/merge", repo_path(repo)?);
    let ctx = Ctx::new(remote)?;
    let v = ctx.post(&path, Some(serde_json::json!({ "head": head }))).await?;
    if json {
        pretty(&v);
    } else {
        out(&format!("merged {} into {} by fast-forward; started: {}", text(&v, "merged"), text(&v, "into"), ids(&v)));
    }
    Ok(())
}

/// `cib promote REPO COMMIT`.
pub async fn promote(remote: &Remote, repo: &str, commit: &str, json: bool) -> Result<(), Failure> {
    let path = format!("/api/v1/repos/{}/promote", repo_path(repo)?);
    let ctx = Ctx::new(remote)?;
    let v = ctx.post(&path, Some(serde_json::json!({ "commit": commit }))).await?;
    if json {
        pretty(&v);
    } else {
        out(&format!("promoted {} to {}; started: {}", text(&v, "promoted"), text(&v, "to"), ids(&v)));
    }
    Ok(())
}

/// `cib approvals REPO COMMIT`: records your approval of promoting that exact commit
/// (`POST /api/v1/repos/{repo}/approvals`).
pub async fn approvals(remote: &Remote, repo: &str, commit: &str, json: bool) -> Result<(), Failure> {
    let path = format!("/api/v1/repos/{}/approvals", repo_path(repo)?);
    let ctx = Ctx::new(remote)?;
    let v = ctx.post(&path, Some(serde_json::json!({ "commit": commit }))).await?;
    if json {
        pretty(&v);
    } else {
        out(&format!("{}: promotion approved by {}", text(&v, "approved"), text(&v, "by")));
    }
    Ok(())
}

/// `cib envs REPO`: which commit is where.
pub async fn envs(remote: &Remote, repo: &str, json: bool) -> Result<(), Failure> {
    let path = format!("/api/v1/repos/{}/environments", repo_path(repo)?);
    let ctx = Ctx::new(remote)?;
    let v = ctx.get(&path).await?;
    if json {
        pretty(&v);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = v["environments"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, e)| {
            let approved: Vec<&str> =
                e["approved_by"].as_array().into_iter().flatten().filter_map(|a| a.as_str()).collect();
            vec![
                name.clone(),
                short(text(e, "commit")).to_owned(),
                time(&e["since"]),
                text(e, "by").to_owned(),
                if approved.is_empty() { "-".to_owned() } else { approved.join(", ") },
                e["build"].as_str().unwrap_or("-").to_owned(),
            ]
        })
        .collect();
    if rows.is_empty() {
        out(&format!("{repo}: no environment on record yet"));
        return Ok(());
    }
    table(&["ENVIRONMENT", "COMMIT", "SINCE (UTC)", "BY", "APPROVED BY", "BUILD"], &rows);
    Ok(())
}

/// `cib whoami`: the token's name, person, role and teams, and the server.
pub async fn whoami(remote: &Remote, json: bool) -> Result<(), Failure> {
    let ctx = Ctx::new(remote)?;
    let v = ctx.get("/api/v1/whoami").await?;
    if json {
        pretty(&v);
        return Ok(());
    }
    let teams: Vec<&str> = v["teams"].as_array().into_iter().flatten().filter_map(|t| t.as_str()).collect();
    let person = text(&v, "person");
    let name = text(&v, "name");
    let who = if person == name { name.to_owned() } else { format!("{name} (person: {person})") };
    out(&format!(
        "{who}, role {}{} on {}",
        text(&v, "role"),
        if teams.is_empty() { String::new() } else { format!(", teams {}", teams.join(", ")) },
        remote.server
    ));
    Ok(())
}
