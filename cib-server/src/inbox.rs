//! From stored deliveries to builds. The receiver stores a delivery and answers at once; this
//! turns it into forge events, reads the spec at the right commit, plans, and enqueues.
//!
//! Processing is idempotent: a build's id is derived from the delivery's id and the pipeline,
//! and the machine ignores an enqueue of an id it has, so a delivery processed twice (after a
//! crash between enqueue and marking it done) still makes each build once.

use std::sync::Arc;

use cib_core::engine::EngineHandle;
use cib_core::event::BuildId;
use cib_core::forge::{ForgeEvent, PullRequestAction};
use cib_core::pipeline::{BuildContext, Input};
use cib_core::ports::{Delivery, Vcs};
use cib_core::spec::{self, TriggerEvent};

/// What processing one delivery did, for the operator's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed {
    Builds(Vec<BuildId>),
    Nothing(String),
}

/// A build id built from things that are stable across retries of the same delivery.
pub fn build_id(delivery: &str, pipeline: &str) -> BuildId {
    let clean =
        |s: &str| s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect::<String>();
    BuildId(format!("{}-{}", clean(delivery), clean(pipeline)))
}

/// Turns a forge event into builds.
pub async fn process(
    engine: &EngineHandle,
    vcs: &Arc<dyn Vcs>,
    delivery_id: &str,
    event: ForgeEvent,
) -> Result<Processed, String> {
    let (repo, commit, trigger, branch, pull_request, actor, spec_rev) = match event {
        ForgeEvent::Push(push) => {
            if push.deleted {
                return Ok(Processed::Nothing("a deleted ref builds nothing".into()));
            }
            let trigger = TriggerEvent {
                kind: spec::EventKind::Push,
                branch: push.branch.clone(),
                tag: push.tag.clone(),
                changed_paths: push.changed_paths.clone(),
            };
            (push.repo, push.after.clone(), trigger, push.branch, None, push.sender, push.after)
        }
        ForgeEvent::PullRequest(pr) => {
            if !matches!(
                pr.action,
                PullRequestAction::Opened | PullRequestAction::Synchronize | PullRequestAction::Reopened
            ) {
                return Ok(Processed::Nothing(format!("pull request action {:?} builds nothing", pr.action)));
            }
            // Policy comes from the protected branch for a fork: its own spec could ask for
            // secrets or privileged steps.
            let spec_rev = if pr.from_fork { pr.base_commit.clone() } else { pr.head_commit.clone() };
            let trigger = TriggerEvent::pull_request(&pr.base_branch);
            (pr.repo, pr.head_commit, trigger, Some(pr.head_branch), Some(pr.number), pr.sender, spec_rev)
        }
        ForgeEvent::Ping { .. } => return Ok(Processed::Nothing("ping".into())),
        ForgeEvent::Command(c) => {
            return Ok(Processed::Nothing(format!("command {:?} is handled by the workflow", c.words)));
        }
        ForgeEvent::Rerun { .. } => return Ok(Processed::Nothing("re-runs are handled by the workflow".into())),
        ForgeEvent::Ignored { event, .. } => return Ok(Processed::Nothing(format!("{event} is ignored"))),
    };
    let source =
        match vcs.read_spec(&repo, &spec_rev).await.map_err(|e| format!("cannot read the spec of {repo}: {e}"))? {
            Some(text) => text,
            None => return Ok(Processed::Nothing(format!("{repo} has no {} at {spec_rev}", spec::FILE_NAME))),
        };
    let parsed = match spec::parse(&source) {
        Ok(s) => s,
        Err(diags) => {
            let first = diags.first().map(|d| d.line(spec::FILE_NAME)).unwrap_or_default();
            return Ok(Processed::Nothing(format!("the spec of {repo} at {spec_rev} is invalid: {first}")));
        }
    };
    let planned = parsed.plan(&trigger);
    if planned.is_empty() {
        return Ok(Processed::Nothing("no pipeline matches".into()));
    }
    let text: Arc<str> = Arc::from(source.as_str());
    let mut builds = Vec::new();
    for p in planned {
        let id = build_id(delivery_id, &p.name);
        let context = BuildContext {
            repo: repo.clone(),
            commit: commit.clone(),
            branch: branch.clone(),
            pull_request,
            event: trigger.clone(),
            actor: Some(actor.clone()),
        };
        let input = Input::Enqueue {
            build: id.clone(),
            spec: text.clone(),
            pipeline: p.name.clone(),
            context,
            only: None,
            variables: Default::default(),
        };
        engine.submit(input).await.map_err(|e| e.to_string())?;
        builds.push(id);
    }
    Ok(Processed::Builds(builds))
}

/// Parses a stored delivery from GitHub into a forge event.
pub fn parse_github(delivery: &Delivery) -> Result<ForgeEvent, String> {
    cib_github::webhook::parse(&delivery.event, &delivery.body).map_err(|e| e.to_string())
}
