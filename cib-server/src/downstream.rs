//! Downstream repositories (`on: upstream`): when a branch of a repository moves (a push, or
//! cib's own merge or promotion), the pipelines of the other served repositories that watch it
//! start at their own default branch's tip, with `UPSTREAM_REPO` and `UPSTREAM_COMMIT`.
//!
//! The machine records each such build's state against the upstream commit (journaled with the
//! enqueue and the finish, so it survives restarts and snapshots) and announces it as a
//! `downstream_reported` event, which notifiers show on the upstream commit as the status
//! `cib/downstream/<repo>/<pipeline>`. A promotion that lists the repository under
//! `promotion.requires.downstream` asks `cib_core::workflow::check_promotion` about it.
//!
//! Candidates are the repositories this server knows by name: every `[[repos]]` entry, and the
//! `[github] repos` entries that are plain names rather than globs (a glob cannot be listed).

use std::sync::Arc;

use cib_core::event::BuildId;
use cib_core::pipeline::{BuildContext, Input, Upstream};
use cib_core::spec::{self, EventKind, TriggerEvent};

use crate::state::AppState;

/// The status context a downstream result is reported under on the upstream commit.
pub fn context(repo: &str, pipeline: &str) -> String {
    format!("cib/downstream/{repo}/{pipeline}")
}

/// The repositories a move may start downstream pipelines in: those served by name.
pub fn candidates(state: &AppState) -> Vec<String> {
    let mut out: Vec<String> = state.config.repos.iter().map(|r| r.name.clone()).collect();
    for g in &state.config.github.repos {
        if !g.contains(['*', '?', '[', '{']) && !out.contains(g) {
            out.push(g.clone());
        }
    }
    out
}

/// The id of the downstream build of `pipeline` in `repo` for `upstream_commit`: derived from
/// them, so that a push webhook for a move cib made itself (or a redelivery) starts nothing
/// twice, since the engine drops an enqueue of an id it already holds.
pub fn build_id(upstream_commit: &str, repo: &str, pipeline: &str) -> BuildId {
    let clean =
        |s: &str| s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect::<String>();
    BuildId(format!(
        "downstream-{}-{}-{}",
        clean(upstream_commit.get(..12).unwrap_or(upstream_commit)),
        clean(repo),
        clean(pipeline)
    ))
}

/// The default branch of `repo` and its tip, with the spec there: what a downstream build runs.
async fn default_tip(state: &AppState, repo: &str) -> Option<(String, String, Arc<str>, spec::Spec)> {
    let branch = match state.vcs.default_branch(repo).await {
        Ok(Some(b)) => b,
        _ => spec::DEFAULT_INTEGRATION_BRANCH.to_owned(),
    };
    let tip = state.vcs.resolve(repo, &branch).await.ok()?;
    let source = state.vcs.read_spec(repo, &tip).await.ok()??;
    let text: Arc<str> = Arc::from(source.as_str());
    let parsed = crate::workflow::parse_blocking(text.clone(), state.config.operator_limits()).await.ok()?;
    Some((branch, tip, text, parsed))
}

/// Starts, in every other served repository, the pipelines that watch `branch` of `upstream`,
/// now at `commit`; `by` is who moved it. Returns the builds enqueued (or already there).
pub async fn start(state: &AppState, upstream: &str, branch: &str, commit: &str, by: &str) -> Vec<BuildId> {
    let mut ids = Vec::new();
    for repo in candidates(state).into_iter().filter(|r| r != upstream) {
        let Some((default, tip, text, parsed)) = default_tip(state, &repo).await else { continue };
        for p in parsed.downstream_of(upstream, branch) {
            let id = build_id(commit, &repo, &p.name);
            let input = Input::Enqueue {
                build: id.clone(),
                spec: text.clone(),
                pipeline: p.name.clone(),
                context: context_at(&repo, &default, &tip, by, upstream, commit),
                only: None,
                variables: Default::default(),
            };
            match state.engine.submit(input).await {
                Ok(()) => ids.push(id),
                Err(e) => {
                    tracing::warn!(%repo, pipeline = %p.name, error = %e, "a downstream build could not be enqueued")
                }
            }
        }
    }
    if !ids.is_empty() {
        tracing::info!(%upstream, %branch, %commit, builds = ids.len(), "downstream pipelines started");
    }
    ids
}

fn context_at(repo: &str, branch: &str, tip: &str, by: &str, upstream: &str, commit: &str) -> BuildContext {
    BuildContext {
        repo: repo.to_owned(),
        commit: tip.to_owned(),
        branch: Some(branch.to_owned()),
        pull_request: None,
        event: TriggerEvent::of(EventKind::Upstream, branch),
        actor: Some(by.to_owned()),
        // The downstream repository's own default branch: trusted as a push to it would be.
        trusted: true,
        upstream: Some(Upstream { repo: upstream.to_owned(), commit: commit.to_owned() }),
    }
}

/// A re-run of a downstream build: the same pipeline against the same upstream commit, but at
/// the downstream repository's default branch tip as it is now, with the spec there, since the
/// point of running it again is to try a fix made there. `None` when the repository or its
/// spec can no longer be read, or the pipeline is gone from it.
pub async fn rerun_input(
    state: &AppState,
    context: &BuildContext,
    pipeline: &str,
    new: &BuildId,
    actor: String,
) -> Option<(Input, BuildContext)> {
    let up = context.upstream.as_ref()?;
    let (default, tip, text, parsed) = default_tip(state, &context.repo).await?;
    parsed.pipeline(pipeline)?;
    let context = context_at(&context.repo, &default, &tip, &actor, &up.repo, &up.commit);
    let input = Input::Enqueue {
        build: new.clone(),
        spec: text,
        pipeline: pipeline.to_owned(),
        context: context.clone(),
        only: None,
        variables: Default::default(),
    };
    Some((input, context))
}
