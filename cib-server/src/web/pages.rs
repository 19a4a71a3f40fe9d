//! The pages that show state: the dashboard, the list of builds, one build, the pools, and a
//! repository's environments. Each reads what the API reads (the store, the engine's machine,
//! the workflow's checks) and shows it as HTML; buttons appear only for the roles the server
//! would accept them from.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use cib_core::event::BuildId;
use cib_core::pipeline::{Environment, Input, StepStatus};
use cib_core::ports::{BuildFilter, BuildStatus, BuildSummary, Page as StorePage, StoredInput};
use cib_core::time::Timestamp;
use http::{StatusCode, Uri};
use maud::{Markup, html};

use crate::api::builds::GateInfo;
use crate::api::pools::PoolView;
use crate::config::Role;
use crate::error::ApiError;
use crate::extract::PathParams;
use crate::state::AppState;

use super::layout::{self, Page, duration, short, status, time};
use super::session::{WebUser, encode};

/// The text of a status as the API writes it (`timed_out`).
pub fn status_text<T: serde::Serialize>(s: &T) -> String {
    serde_json::to_value(s).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

async fn last_seq(state: &AppState) -> u64 {
    state.store.last_event_seq().await.unwrap_or(0)
}

fn fail(e: ApiError, user: &WebUser) -> Response {
    layout::error_page(&e, Some(user))
}

/// The repositories with a name of their own (not a pattern such as `acme/*`).
fn served_repos(state: &AppState) -> Vec<String> {
    let mut repos: Vec<String> = state.config.repos.iter().map(|r| r.name.clone()).collect();
    repos.extend(state.config.github.repos.iter().filter(|r| !r.contains(['*', '?', '['])).cloned());
    repos.sort();
    repos.dedup();
    repos
}

/// A link to the commit on its forge, when the repository is on GitHub.
fn commit_link(state: &AppState, repo: &str, commit: &str) -> Markup {
    if state.is_local(repo) {
        html! { code title=(commit) { (short(commit)) } }
    } else {
        html! { a href=(format!("https://github.com/{repo}/commit/{commit}")) { code title=(commit) { (short(commit)) } } }
    }
}

fn builds_table(state: &AppState, builds: &[BuildSummary], id: &str) -> Markup {
    let now = state.clock.now();
    html! {
        table.builds #(id) data-live-part {
            thead { tr { th { "Build" } th { "Status" } th { "Repository" } th { "Branch" } th { "Commit" } th { "Pipeline" } th { "Queued" } th { "Took" } } }
            tbody {
                @for b in builds {
                    tr {
                        td { a href=(format!("/builds/{}", encode(&b.id.0))) { (b.id.0) } }
                        td { (status(&status_text(&b.status))) }
                        td { a href=(format!("/repos/{}", b.repo)) { (b.repo) } }
                        td { (b.branch.as_deref().unwrap_or("")) }
                        td { (commit_link(state, &b.repo, &b.commit)) }
                        td { (b.pipeline) }
                        td { (time(Some(b.queued_at))) }
                        td.num { (duration(b.started_at, b.finished_at, now)) }
                    }
                }
                @if builds.is_empty() {
                    tr { td colspan="8" .muted { "No builds." } }
                }
            }
        }
    }
}

/// `GET /`: repositories and their environments, what runs and waits, and the pools.
pub async fn dashboard(State(state): State<Arc<AppState>>, user: WebUser) -> Response {
    let seq = last_seq(&state).await;
    let active = BuildFilter {
        statuses: vec![BuildStatus::Queued, BuildStatus::Waiting, BuildStatus::Running, BuildStatus::Cancelling],
        ..BuildFilter::default()
    };
    let running = match state.store.builds(&active, StorePage::first(50)).await {
        Ok(b) => b,
        Err(e) => return fail(ApiError::unavailable(e), &user),
    };
    let repos = served_repos(&state);
    let (environments, gates) = {
        let repos = repos.clone();
        let found = state
            .engine
            .query(move |m| {
                let envs: Vec<(String, BTreeMap<String, Environment>)> =
                    repos.iter().map(|r| (r.clone(), m.environments(r))).collect();
                let gates: Vec<(String, String, String)> = m
                    .builds()
                    .flat_map(|b| {
                        b.steps
                            .iter()
                            .filter(|s| matches!(s.status, StepStatus::AtGate))
                            .map(|s| (b.id.0.clone(), b.context.repo.clone(), s.name.clone()))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                (envs, gates)
            })
            .await;
        match found {
            Ok(f) => f,
            Err(e) => return fail(ApiError::unavailable(e), &user),
        }
    };
    let pools = pool_views(&state).await.unwrap_or_default();
    let body = html! {
        h1 { "Dashboard" }
        div #dash data-live-part {
            section {
                h2 { "Repositories" }
                table {
                    thead { tr { th { "Repository" } th { "Environments" } } }
                    tbody {
                        @for (repo, envs) in &environments {
                            tr {
                                td { a href=(format!("/repos/{repo}")) { (repo) } }
                                td {
                                    @if envs.is_empty() { span.muted { "nothing on record yet" } }
                                    @for (name, env) in envs {
                                        span.env { b { (name) } " " (commit_link(&state, repo, &env.commit)) " " }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Waiting for approval" }
                @if gates.is_empty() { p.muted { "No gate is waiting." } }
                ul {
                    @for (build, repo, step) in &gates {
                        li { a href=(format!("/builds/{}", encode(build))) { (build) } " (" (repo) "): gate " b { (step) } }
                    }
                }
            }
            section {
                h2 { "Running and queued" }
                (builds_table(&state, &running, "running"))
            }
            section {
                h2 { "Pools" }
                @if pools.is_empty() { p.muted { "No pools are configured." } }
                ul {
                    @for p in &pools {
                        li { a href="/pools" { (p.pool.name) } ": " (p.pool.free) " of " (p.pool.capacity) " free" }
                    }
                }
            }
        }
    };
    layout::html(StatusCode::OK, layout::page(&Page::new("Dashboard").nav("dashboard").live(seq), Some(&user), body))
}

/// The filters of `/builds`, as given.
#[derive(Debug, Default)]
struct Filters {
    repo: String,
    branch: String,
    status: String,
    pipeline: String,
}

/// `GET /builds`: filters, a page of builds, and a link to the next page by the API's cursor.
pub async fn builds(State(state): State<Arc<AppState>>, user: WebUser, uri: Uri) -> Response {
    let q = crate::http::query(&uri);
    let f = Filters {
        repo: q.get("repo").cloned().unwrap_or_default(),
        branch: q.get("branch").cloned().unwrap_or_default(),
        status: q.get("status").cloned().unwrap_or_default(),
        pipeline: q.get("pipeline").cloned().unwrap_or_default(),
    };
    let seq = last_seq(&state).await;
    let mut filter = BuildFilter {
        repo: Some(f.repo.clone()).filter(|s| !s.is_empty()),
        branch: Some(f.branch.clone()).filter(|s| !s.is_empty()),
        ..BuildFilter::default()
    };
    if !f.status.is_empty() {
        match serde_json::from_value::<BuildStatus>(serde_json::Value::String(f.status.clone())) {
            Ok(s) => filter.statuses.push(s),
            Err(_) => return fail(ApiError::BadRequest(format!("unknown status '{}'", f.status)), &user),
        }
    }
    const PER_PAGE: usize = 50;
    let mut after = None;
    if let Some(text) = q.get("after").filter(|t| !t.is_empty()) {
        match text.split_once(':').and_then(|(at, id)| Some((at.parse::<u64>().ok()?, id))) {
            Some((at, id)) if !id.is_empty() => {
                after = Some(cib_core::ports::BuildCursor { queued_at: Timestamp(at), id: BuildId(id.to_owned()) })
            }
            _ => return fail(ApiError::BadRequest("'after' is the cursor of a previous page".into()), &user),
        }
    }
    // The pipeline is not a filter of the store: pages are read until one is full of matches
    // (a few reads at most for a pipeline that is not rare).
    let mut shown: Vec<BuildSummary> = Vec::new();
    let mut more = false;
    for _ in 0..20 {
        let page = StorePage { limit: PER_PAGE, after: after.clone() };
        let got = match state.store.builds(&filter, page).await {
            Ok(b) => b,
            Err(e) => return fail(ApiError::unavailable(e), &user),
        };
        let full = got.len() == PER_PAGE;
        after = got.last().map(BuildSummary::cursor);
        for b in got {
            if shown.len() == PER_PAGE {
                more = true;
                break;
            }
            if f.pipeline.is_empty() || b.pipeline == f.pipeline {
                shown.push(b);
            }
        }
        if shown.len() == PER_PAGE {
            more = more || full;
            break;
        }
        if !full {
            break;
        }
    }
    let next = if more {
        shown.last().map(|b| {
            let mut link = format!("/builds?after={}", encode(&format!("{}:{}", b.queued_at.millis(), b.id.0)));
            for (k, v) in [("repo", &f.repo), ("branch", &f.branch), ("status", &f.status), ("pipeline", &f.pipeline)] {
                if !v.is_empty() {
                    link.push_str(&format!("&{k}={}", encode(v)));
                }
            }
            link
        })
    } else {
        None
    };
    let statuses = [
        "queued",
        "waiting",
        "running",
        "cancelling",
        "success",
        "neutral",
        "failed",
        "cancelled",
        "timed_out",
        "errored",
    ];
    let body = html! {
        h1 { "Builds" }
        form.filters method="get" action="/builds" role="search" {
            label { "Repository " input type="text" name="repo" value=(f.repo) list="repos"; }
            datalist #repos { @for r in served_repos(&state) { option value=(r) {} } }
            label { "Branch " input type="text" name="branch" value=(f.branch); }
            label { "Status "
                select name="status" {
                    option value="" { "any" }
                    @for s in statuses { option value=(s) selected[f.status == s] { (s.replace('_', " ")) } }
                }
            }
            label { "Pipeline " input type="text" name="pipeline" value=(f.pipeline); }
            button type="submit" { "Filter" }
        }
        (builds_table(&state, &shown, "build-list"))
        nav.pager aria-label="Pages" {
            @if q.contains_key("after") { a href="/builds" { "Newest" } }
            @if let Some(n) = next { a rel="next" href=(n) { "Older builds" } }
        }
    };
    // Live only on the first page: newer builds appear there, and older pages stay put.
    let mut page = Page::new("Builds").nav("builds");
    if !q.contains_key("after") {
        page = page.live(seq);
    }
    layout::html(StatusCode::OK, layout::page(&page, Some(&user), body))
}

/// What the build page knows of a build's pipeline: each step with what it depends on.
struct StepNode {
    name: String,
    depends_on: Vec<String>,
    gate: bool,
}

/// The pipeline a build was planned from, with its context, from the enqueue the store keeps.
async fn planned(
    state: &AppState,
    id: &BuildId,
) -> Result<Option<(Vec<StepNode>, cib_core::pipeline::BuildContext)>, ApiError> {
    let Some(StoredInput { input: Input::Enqueue { spec, pipeline, context, .. }, .. }) =
        state.store.enqueued(id).await.map_err(ApiError::unavailable)?
    else {
        return Ok(None);
    };
    let steps = cib_core::spec::parse(&spec)
        .ok()
        .and_then(|s| s.pipeline(&pipeline).cloned())
        .map(|p| {
            p.steps
                .iter()
                .map(|s| StepNode {
                    name: s.name.clone(),
                    depends_on: s.depends_on.clone(),
                    gate: matches!(s.action, cib_core::spec::Action::Gate(_)),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Some((steps, context)))
}

/// Each step's column in the graph: one more than the deepest step it depends on.
fn levels(steps: &[StepNode]) -> BTreeMap<String, usize> {
    let mut level: BTreeMap<String, usize> = BTreeMap::new();
    // Steps are checked acyclic by the spec's validation; the bound keeps a bad one finite.
    for _ in 0..=steps.len() {
        let mut changed = false;
        for s in steps {
            let l = s.depends_on.iter().map(|d| level.get(d).map_or(1, |l| l + 1)).max().unwrap_or(0);
            if level.get(&s.name) != Some(&l) {
                level.insert(s.name.clone(), l);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    level
}

/// `GET /builds/{build}`: the step graph, gates, actions, and where the build came from.
pub async fn build(State(state): State<Arc<AppState>>, user: WebUser, PathParams(id): PathParams<String>) -> Response {
    let seq = last_seq(&state).await;
    let bid = BuildId(id.clone());
    let record = match state.store.build(&bid).await {
        Ok(Some(r)) => r,
        Ok(None) => return fail(ApiError::NotFound(format!("no build '{id}'")), &user),
        Err(e) => return fail(ApiError::unavailable(e), &user),
    };
    let gates: Vec<GateInfo> = match crate::api::builds::declared(&state, &bid).await {
        Ok((g, _)) => g,
        Err(e) => return fail(e, &user),
    };
    let (nodes, context) = match planned(&state, &bid).await {
        Ok(Some((n, c))) => (n, Some(c)),
        Ok(None) => (Vec::new(), None),
        Err(e) => return fail(e, &user),
    };
    // What the build's steps kept; the page works without them when the index cannot answer.
    let artifacts = state.artifacts.list(&bid).await.unwrap_or_default();
    let b = &record.build;
    let now = state.clock.now();
    let finished = b.finished_at.is_some();
    let level = levels(&nodes);
    // The latest attempt of each step, and how many it had.
    let mut latest: BTreeMap<&str, (&cib_core::ports::StepRecord, u32)> = BTreeMap::new();
    for s in &record.steps {
        let e = latest.entry(s.name.as_str()).or_insert((s, 0));
        if s.attempt >= e.0.attempt {
            e.0 = s;
        }
        e.1 += 1;
    }
    let columns = level.values().copied().max().map_or(1, |m| m + 1);
    let mut rows_in: BTreeMap<usize, usize> = BTreeMap::new();
    let forge = !state.is_local(&b.repo);
    let pr = context.as_ref().and_then(|c| c.pull_request);
    let actor = context.as_ref().and_then(|c| c.actor.clone());
    let waiting: Vec<&GateInfo> = gates
        .iter()
        .filter(|g| latest.get(g.step.as_str()).is_some_and(|(s, _)| status_text(&s.status) == "waiting"))
        .collect();
    let mut page = Page::new(format!("Build {id}"));
    page.live_from = (!finished).then_some(seq);
    page.live_build = Some(id.clone());
    let body = html! {
        div #build-head data-live-part {
            h1 { "Build " (id) " " (status(&status_text(&b.status))) }
            dl.facts {
                dt { "Repository" } dd { a href=(format!("/repos/{}", b.repo)) { (b.repo) } }
                dt { "Pipeline" } dd { (b.pipeline) }
                dt { "Branch" } dd {
                    @if let Some(branch) = &b.branch {
                        @if forge { a href=(format!("https://github.com/{}/tree/{branch}", b.repo)) { (branch) } } @else { (branch) }
                    } @else { span.muted { "—" } }
                }
                dt { "Commit" } dd { (commit_link(&state, &b.repo, &b.commit)) }
                @if let Some(n) = pr {
                    dt { "Pull request" } dd { @if forge { a href=(format!("https://github.com/{}/pull/{n}", b.repo)) { "#" (n) } } @else { "#" (n) } }
                }
                dt { "Started by" } dd {
                    @if let Some(a) = &actor {
                        @if forge { a href=(format!("https://github.com/{a}")) { (a) } } @else { (a) }
                    } @else { span.muted { "—" } }
                }
                dt { "Queued" } dd { (time(Some(b.queued_at))) }
                dt { "Took" } dd { (duration(b.started_at, b.finished_at, now)) }
            }
            div.actions {
                @if user.can(Role::Trigger) {
                    @if !finished {
                        form method="post" action=(format!("/builds/{}/cancel", encode(&id))) {
                            input type="hidden" name="csrf" value=(user.csrf);
                            button.danger type="submit" { "Cancel build" }
                        }
                    }
                    form method="post" action=(format!("/builds/{}/retry", encode(&id))) {
                        input type="hidden" name="csrf" value=(user.csrf);
                        button type="submit" { "Retry" }
                    }
                }
            }
        }
        section #gates data-live-part {
            @if !gates.is_empty() { h2 { "Gates" } }
            @for g in &gates {
                @let is_waiting = waiting.iter().any(|w| w.step == g.step);
                div.gate data-gate=(g.step) {
                    h3 { (g.step) " " @if let Some((s, _)) = latest.get(g.step.as_str()) { (status(&status_text(&s.status))) } }
                    @if let Some(text) = &g.instructions { p { (text) } }
                    p {
                        @if g.kind == "approval" {
                            (g.approvals) " approval(s) needed"
                            @if !g.approved_by.is_empty() { "; approved by " (g.approved_by.join(", ")) }
                            @if !g.users.is_empty() || !g.teams.is_empty() {
                                "; from " (g.users.iter().chain(&g.teams).cloned().collect::<Vec<_>>().join(", "))
                            }
                        } @else { "A hold: anyone allowed may release it." }
                        @if let Some((s, _)) = latest.get(g.step.as_str()) { @if let Some(d) = &s.detail { " (" (d) ")" } }
                    }
                    @if is_waiting && user.can(Role::Approve) {
                        div.actions {
                            form method="post" action=(format!("/builds/{}/gates/{}/approve", encode(&id), encode(&g.step))) {
                                input type="hidden" name="csrf" value=(user.csrf);
                                button.primary type="submit" { "Approve" }
                            }
                            form method="post" action=(format!("/builds/{}/gates/{}/reject", encode(&id), encode(&g.step))) {
                                input type="hidden" name="csrf" value=(user.csrf);
                                button.danger type="submit" { "Reject" }
                            }
                        }
                    }
                }
            }
        }
        section #graph data-live-part {
            h2 { "Steps" }
            ol.dag style=(format!("grid-template-columns: repeat({columns}, minmax(11rem, 1fr))")) {
                @for n in &nodes {
                    @let col = level.get(&n.name).copied().unwrap_or(0);
                    @let row = { let r = rows_in.entry(col).or_insert(0); *r += 1; *r };
                    @let found = latest.get(n.name.as_str());
                    @let st = found.map_or("pending".to_owned(), |(s, _)| status_text(&s.status));
                    li class=(format!("node st-{st}")) style=(format!("grid-column: {}; grid-row: {row}", col + 1)) {
                        @if let Some((s, attempts)) = found {
                            @if n.gate || s.attempt == 0 {
                                span.name { (n.name) }
                            } @else {
                                a.name href=(format!("/builds/{}/steps/{}", encode(&id), encode(&n.name))) { (n.name) }
                            }
                            span.meta { (st.replace('_', " ")) " · " (duration(s.started_at, s.finished_at, now)) @if *attempts > 1 { " · " (attempts) " attempts" } }
                        } @else {
                            span.name { (n.name) }
                            span.meta { "pending" }
                        }
                        @if !n.depends_on.is_empty() { span.deps { "after " (n.depends_on.join(", ")) } }
                    }
                }
            }
            @if nodes.is_empty() {
                ul { @for s in &record.steps { li { a href=(format!("/builds/{}/steps/{}", encode(&id), encode(&s.name))) { (s.name) } " " (status(&status_text(&s.status))) } } }
            }
        }
        section #artifacts data-live-part {
            @if !artifacts.is_empty() {
                h2 { "Artifacts" }
                table.artifacts {
                    thead { tr { th { "Name" } th { "Size" } th { "Files" } th { "SHA-256" } th { "Expires" } } }
                    tbody {
                        @for a in &artifacts {
                            tr data-artifact=(a.name) {
                                td { a href=(format!("/builds/{}/artifacts/{}", encode(&id), encode(&a.name))) download=(format!("{}.tar.gz", a.name)) { (a.name) } }
                                td { (size_text(a.size)) }
                                td { (a.files) }
                                td { code.sha256 { (a.sha256) } }
                                td { (time(Some(a.expires_at))) }
                            }
                        }
                    }
                }
            }
        }
    };
    layout::html(StatusCode::OK, layout::page(&page, Some(&user), body))
}

/// A size in bytes as people read it: `812 B`, `14.2 KiB`, `3.0 MiB`.
fn size_text(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Every pool as the API shows it.
pub async fn pool_views(state: &Arc<AppState>) -> Result<Vec<PoolView>, ApiError> {
    crate::api::pools::views(state).await
}

/// `GET /pools`: units, holders, deadlines and queues; take, extend and return.
pub async fn pools(State(state): State<Arc<AppState>>, user: WebUser) -> Response {
    let seq = last_seq(&state).await;
    let pools = match pool_views(&state).await {
        Ok(p) => p,
        Err(e) => return fail(e, &user),
    };
    // People's leases are held in their token's name (`pools::take`).
    let me = user.token.name.clone();
    let body = html! {
        h1 { "Pools" }
        div #pools data-live-part {
            @if pools.is_empty() { p.muted { "No pools are configured." } }
            @for p in &pools {
                section.pool data-pool=(p.pool.name) {
                    h2 { (p.pool.name) " " span.muted { (p.pool.free) " of " (p.pool.capacity) " free" } }
                    @if !p.pool.units.is_empty() {
                        table {
                            thead { tr { th { "Unit" } th { "Held by" } th { "Until" } th { "Details" } } }
                            tbody {
                                @for u in &p.pool.units {
                                    @let lease = u.held_by.as_ref().and_then(|h| p.leases.iter().find(|l| l.lease == h.lease.0));
                                    tr data-unit=(u.name) {
                                        td { (u.name) }
                                        td { @if let Some(l) = lease { (l.holder) } @else { span.free { "free" } } }
                                        td { @if let Some(l) = lease { (time(Some(Timestamp(l.deadline.unwrap_or(l.expires_at))))) } }
                                        td { @for (k, v) in &u.metadata { code { (k) "=" (v) } " " } }
                                    }
                                }
                            }
                        }
                    }
                    @if !p.leases.is_empty() {
                        h3 { "Leases" }
                        ul.leases {
                            @for l in &p.leases {
                                li data-lease=(l.lease) {
                                    b { (l.holder) } " holds "
                                    (l.units.iter().map(|u| u.units.join(", ")).collect::<Vec<_>>().join("; "))
                                    @if !l.reason.is_empty() { " for “" (l.reason) "”" }
                                    " until " (time(Some(Timestamp(l.deadline.unwrap_or(l.expires_at)))))
                                    @if user.can(Role::Trigger) && (l.holder == me || user.can(Role::Admin)) {
                                        form.inline method="post" action=(format!("/leases/{}/extend", encode(&l.lease))) {
                                            input type="hidden" name="csrf" value=(user.csrf);
                                            label { span.sr { "Extend by" } select name="for" { option value="30m" { "30 min" } option value="1h" selected { "1 hour" } option value="4h" { "4 hours" } } }
                                            button type="submit" { "Extend" }
                                        }
                                        form.inline method="post" action=(format!("/leases/{}/return", encode(&l.lease))) {
                                            input type="hidden" name="csrf" value=(user.csrf);
                                            button type="submit" { "Return" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                    @if !p.waiting.is_empty() {
                        h3 { "Waiting" }
                        ol { @for w in &p.waiting { li { (w.holder) @if !w.reason.is_empty() { " for “" (w.reason) "”" } } } }
                    }
                    @if user.can(Role::Trigger) && p.pool.configured {
                        form.take method="post" action="/pools/take" {
                            input type="hidden" name="csrf" value=(user.csrf);
                            input type="hidden" name="pool" value=(p.pool.name);
                            label { "Units " input type="number" name="count" value="1" min="1" max=(p.pool.capacity.max(1)); }
                            label { "For " select name="for" { option value="30m" { "30 min" } option value="1h" selected { "1 hour" } option value="4h" { "4 hours" } option value="1d" { "1 day" } } }
                            label { "Reason " input type="text" name="reason" placeholder="manual testing"; }
                            button.primary type="submit" { "Take" }
                        }
                    }
                }
            }
        }
    };
    layout::html(StatusCode::OK, layout::page(&Page::new("Pools").nav("pools").live(seq), Some(&user), body))
}

/// `GET /repos/{owner}/{name}`: which commit is where, and whether the candidate on the
/// integration branch may be promoted, with the refusals exactly as the API words them.
pub async fn repo(
    State(state): State<Arc<AppState>>,
    user: WebUser,
    PathParams((owner, name)): PathParams<(String, String)>,
) -> Response {
    let repo = format!("{owner}/{name}");
    if !state.config.serves(&repo) {
        return fail(ApiError::NotFound(format!("this server does not build '{repo}'")), &user);
    }
    let seq = last_seq(&state).await;
    let (environments, approvals) = {
        let r = repo.clone();
        match state.engine.query(move |m| (m.environments(&r), m.approvals(&r).to_vec())).await {
            Ok(found) => found,
            Err(e) => return fail(ApiError::unavailable(e), &user),
        }
    };
    let policy = crate::workflow::promotion_policy(&state, &repo).await;
    let candidate = match &policy {
        Ok(Some(p)) => {
            let check = crate::workflow::check_promotable(&state, &repo, p, &p.from).await;
            let commit = match &check {
                Ok((c, _)) => Some(c.clone()),
                Err(_) => state.vcs.resolve(&repo, &p.from).await.ok(),
            };
            Some((p.clone(), commit, check))
        }
        _ => None,
    };
    let builds = match &candidate {
        Some((_, Some(commit), _)) => {
            let f = BuildFilter { repo: Some(repo.clone()), commit: Some(commit.clone()), ..BuildFilter::default() };
            state.store.builds(&f, StorePage::first(20)).await.unwrap_or_default()
        }
        _ => Vec::new(),
    };
    let body = html! {
        h1 { (repo) }
        div #repo data-live-part {
            section {
                h2 { "Environments" }
                @if environments.is_empty() { p.muted { "Nothing on record yet." } }
                table {
                    thead { tr { th { "Branch" } th { "Commit" } th { "Since" } th { "Moved by" } th { "Approved by" } } }
                    tbody {
                        @for (branch, env) in &environments {
                            tr data-env=(branch) {
                                td { b { (branch) } }
                                td { (commit_link(&state, &repo, &env.commit)) }
                                td { (time(Some(env.since))) }
                                td { (env.by) }
                                td { (if env.approved_by.is_empty() { "—".to_owned() } else { env.approved_by.join(", ") }) }
                            }
                        }
                    }
                }
            }
            @match &candidate {
                None => { p.muted { "The spec on the integration branch has no promotion policy." } }
                Some((policy, commit, check)) => {
                    section.candidate {
                        h2 { "Candidate on " (policy.from) " for " (policy.to) }
                        @if let Some(c) = commit {
                            p { "Commit " (commit_link(&state, &repo, c)) }
                            h3 { "Results on this commit" }
                            @if builds.is_empty() { p.muted { "No builds of this commit yet." } }
                            ul { @for b in &builds { li { a href=(format!("/builds/{}", encode(&b.id.0))) { (b.pipeline) } " " (status(&status_text(&b.status))) } } }
                            h3 { "Approvals so far" }
                            @let mine: Vec<_> = approvals.iter().filter(|a| &a.commit == c).collect();
                            @if mine.is_empty() { p.muted { "None." } }
                            ul { @for a in &mine { li { (a.by) " at " (time(Some(a.at))) } } }
                        }
                        @match check {
                            Ok(_) => { p.ok #promotable { "This commit may be promoted." } }
                            Err(e) => { div #refusal { h3 { "Not yet" } (layout::error_words(e)) } }
                        }
                        div.actions {
                            @if let Some(c) = commit {
                                @if user.can(Role::Approve) {
                                    form method="post" action=(format!("/repos/{repo}/approve")) {
                                        input type="hidden" name="csrf" value=(user.csrf);
                                        input type="hidden" name="commit" value=(c);
                                        button type="submit" { "Approve promotion" }
                                    }
                                }
                                @if user.can(Role::Trigger) {
                                    form method="post" action=(format!("/repos/{repo}/promote")) {
                                        input type="hidden" name="csrf" value=(user.csrf);
                                        input type="hidden" name="commit" value=(c);
                                        button.primary type="submit" { "Promote to " (policy.to) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    layout::html(StatusCode::OK, layout::page(&Page::new(repo.clone()).live(seq), Some(&user), body))
}
