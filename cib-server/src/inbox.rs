//! From stored deliveries to builds. The receiver stores a delivery and answers at once; this
//! turns it into forge events, reads the spec at the right commit, plans, and enqueues.
//!
//! Processing is idempotent: a build's id is derived from the delivery's id and the pipeline,
//! and the machine ignores an enqueue of an id it has, so a delivery processed twice (after a
//! crash between enqueue and marking it done) still makes each build once.

use std::sync::Arc;

use cib_core::event::BuildId;
use cib_core::forge::{Command, ForgeEvent, PullRequestAction};
use cib_core::pipeline::{Actor, BuildContext, Input};
use cib_core::ports::{Delivery, ErrorKind, Permission};
use cib_core::spec::{self, TriggerEvent};

use crate::state::AppState;
use crate::workflow::reevaluate;

/// Why a delivery could not be processed. `kind()` says whether trying again may help, so the
/// inbox can retry what is transient and set aside what never will work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InboxError {
    /// The engine did not take an input (it is stopping, or its queue is gone).
    #[error("the engine did not take the input: {0}")]
    Engine(String),
    /// The repository could not be read.
    #[error("cannot read the spec of {repo}: {source}")]
    Vcs {
        repo: String,
        #[source]
        source: cib_core::ports::VcsError,
    },
}

impl InboxError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            InboxError::Engine(_) => ErrorKind::Transient,
            InboxError::Vcs { source, .. } => source.kind(),
        }
    }
}

fn engine_error(e: impl std::fmt::Display) -> InboxError {
    InboxError::Engine(e.to_string())
}

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

/// Answers a `/cib` command: merge, promote, approve, or help. The answer goes out as an event
/// (the forge's notifier posts it as a comment); the identity is the comment's authenticated
/// author, and their permission comes from the forge.
async fn command(state: &Arc<AppState>, c: Command) -> String {
    let permission = state.vcs.permission(&c.repo, &c.sender).await.unwrap_or(Permission::None);
    let pr = {
        let (repo, number) = (c.repo.clone(), c.number);
        state.engine.query(move |m| m.pull_requests(&repo).get(&number).cloned()).await.ok().flatten()
    };
    let words: Vec<&str> = c.words.iter().map(String::as_str).collect();
    let answer = match (words.as_slice(), pr) {
        (["merge"], Some(pr)) => {
            crate::workflow::try_merge(state, &c.repo, &pr.head_commit, Some(c.number), &c.sender, permission)
                .await
                .map(|m| format!("Merged by fast-forward: {} is now {}.", m.into, m.merged))
        }
        (["merge"], None) => return "cib can only merge an open pull request it knows of.".into(),
        (["promote", commit], _) if permission >= Permission::Write => {
            crate::workflow::try_promote(state, &c.repo, commit, &c.sender)
                .await
                .map(|p| format!("Promoted: {} is now {}.", p.to, p.promoted))
        }
        (["approve", commit], _) if permission >= Permission::Write => {
            // Recorded against the person, so their other identities do not approve twice.
            let actor = Actor {
                login: state.person_of_login(&c.sender),
                teams: state.teams_of_login(&c.sender),
                can_write: true,
            };
            crate::workflow::try_approve(state, &c.repo, commit, actor, true).await.map(|r| match r {
                crate::workflow::Recorded::Approval { approved, .. }
                | crate::workflow::Recorded::Review { reviewed: approved, .. } => {
                    format!("Approved {approved} for promotion.")
                }
            })
        }
        (["trust"], _) => {
            return "Name the commit you reviewed: `/cib trust <commit>` (at least 7 hexadecimal digits). \
                    Only the pull request's current head can be trusted."
                .into();
        }
        (["trust", sha], Some(pr)) => {
            if permission < Permission::Write {
                return format!("{} has no write permission on {}.", c.sender, c.repo);
            }
            if !pr.from_fork {
                return "This pull request is not from a fork: its builds are trusted already.".into();
            }
            // The comment names what the maintainer read, so a push racing the comment can
            // never be trusted in its place.
            let sha = sha.to_ascii_lowercase();
            if sha.len() < 7 || sha.len() > 40 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return format!(
                    "`{sha}` is not a commit: give at least 7 hexadecimal digits of the head you reviewed."
                );
            }
            if !pr.head_commit.to_ascii_lowercase().starts_with(&sha) {
                let head = pr.head_commit.get(..12).unwrap_or(&pr.head_commit);
                return format!(
                    "Not trusted: {sha} is not this pull request's head, which is now {head}. \
                     Review the head and trust it by its commit."
                );
            }
            if pr.author == c.sender {
                return "The author of a pull request cannot approve it for secrets; another maintainer must.".into();
            }
            let input = Input::TrustFork {
                repo: c.repo.clone(),
                number: c.number,
                head_commit: pr.head_commit.clone(),
                by: c.sender.clone(),
            };
            if state.engine.submit(input).await.is_err() {
                return "cib could not record the approval; try again.".into();
            }
            // Build again, now with secrets: the approval holds for this head only.
            let spec_rev = state.vcs.resolve(&c.repo, &pr.base).await.unwrap_or_else(|_| pr.base.clone());
            let planned = Planned {
                repo: c.repo.clone(),
                commit: pr.head_commit.clone(),
                trigger: TriggerEvent::pull_request(&pr.base),
                branch: Some(pr.head_branch.clone()),
                pull_request: Some(c.number),
                actor: c.sender.clone(),
                spec_rev,
                trusted: true,
            };
            let short = pr.head_commit.get(..12).unwrap_or(&pr.head_commit).to_owned();
            let tag = format!("trust-{}-{short}", c.number);
            return match Box::pin(enqueue(state, &tag, planned)).await {
                Ok(_) => format!(
                    "Approved {short} of this fork's pull request: its builds run with secrets until the next push."
                ),
                Err(e) => format!("Approved, but the build could not start: {e}"),
            };
        }
        (["pass" | "fail"], _) => {
            // The manual test waiting in this repository (a hold gate), passed or failed by a
            // person the gate allows; the gate itself checks who may answer.
            let repo = c.repo.clone();
            let waiting = state
                .engine
                .query(move |m| {
                    m.builds()
                        .filter(|b| b.context.repo == repo && b.finished_at.is_none())
                        .flat_map(|b| {
                            b.steps.iter().filter(|s| s.status == cib_core::pipeline::StepStatus::AtGate).filter_map(
                                |s| {
                                    let hold = matches!(
                                        b.pipeline.step(&s.name).map(|x| &x.action),
                                        Some(spec::Action::Gate(g)) if g.kind == spec::GateKind::Hold
                                    );
                                    hold.then(|| (b.id.clone(), s.name.clone()))
                                },
                            )
                        })
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default();
            let [(build, step)] = waiting.as_slice() else {
                return format!("{} manual tests wait in {}; pass or fail one through the API.", waiting.len(), c.repo);
            };
            let approve = words[0] == "pass";
            let mut events = state.engine.subscribe();
            let actor = Actor {
                login: c.sender.clone(),
                teams: state.teams_of_login(&c.sender),
                can_write: permission >= Permission::Write,
            };
            let person = state.person_of_login(&c.sender);
            let input =
                Input::DecideAs { build: build.clone(), step: step.clone(), actor, person, approve, comment: None };
            if state.engine.submit(input).await.is_err() {
                return "cib could not record the result; try again.".into();
            }
            while let Ok(event) = events.try_recv() {
                if let cib_core::event::EventBody::DecisionRefused { reason, .. } = event.body {
                    return format!("The manual test {step} of {build} was not marked: {reason}.");
                }
            }
            return format!("Manual test {step} of {build} marked as {}.", if approve { "passed" } else { "failed" });
        }
        (["promote" | "approve", _], _) => return format!("{} has no write permission on {}.", c.sender, c.repo),
        _ => {
            return "cib knows `/cib merge`, `/cib trust <commit>`, `/cib pass`, `/cib fail`, `/cib approve <commit>` and `/cib promote <commit>`.".into();
        }
    };
    // A refusal's message lists every reason, in the words the API uses.
    answer.unwrap_or_else(|e| e.to_string())
}

/// Turns a forge event into builds (and the workflow's records).
pub async fn process(state: &Arc<AppState>, delivery_id: &str, event: ForgeEvent) -> Result<Processed, InboxError> {
    let (engine, vcs) = (&state.engine, &state.vcs);
    let (repo, commit, trigger, branch, pull_request, actor, spec_rev, trusted) = match event {
        ForgeEvent::Push(push) => {
            if push.deleted {
                return Ok(Processed::Nothing("a deleted ref builds nothing".into()));
            }
            if let Some(branch) = &push.branch {
                reevaluate(state, &push.repo, branch).await;
            }
            let trigger = TriggerEvent {
                kind: spec::EventKind::Push,
                branch: push.branch.clone(),
                tag: push.tag.clone(),
                changed_paths: push.changed_paths.clone(),
            };
            (push.repo, push.after.clone(), trigger, push.branch, None, push.sender, push.after, true)
        }
        ForgeEvent::PullRequest(pr) => {
            let open = matches!(
                pr.action,
                PullRequestAction::Opened
                    | PullRequestAction::Synchronize
                    | PullRequestAction::Reopened
                    | PullRequestAction::BaseChanged
            );
            let record = Input::PullRequest {
                repo: pr.repo.clone(),
                number: pr.number,
                base: pr.base_branch.clone(),
                head_branch: pr.head_branch.clone(),
                head_commit: pr.head_commit.clone(),
                open,
                author: pr.author.clone(),
                from_fork: pr.from_fork,
            };
            engine.submit(record).await.map_err(engine_error)?;
            if open && let Ok(c) = vcs.compare(&pr.repo, &pr.base_branch, &pr.head_commit).await {
                let input = Input::UpToDate {
                    repo: pr.repo.clone(),
                    number: pr.number,
                    head_commit: pr.head_commit.clone(),
                    base: pr.base_branch.clone(),
                    behind: c.behind,
                };
                engine.submit(input).await.map_err(engine_error)?;
            }
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
            // A fork's code is trusted with secrets only once a maintainer approved this head.
            let trusted = !pr.from_fork || {
                let (repo, number, head) = (pr.repo.clone(), pr.number, pr.head_commit.clone());
                engine.query(move |m| m.fork_trusted(&repo, number, &head)).await.unwrap_or(false)
            };
            (pr.repo, pr.head_commit, trigger, Some(pr.head_branch), Some(pr.number), pr.sender, spec_rev, trusted)
        }
        ForgeEvent::Ping { .. } => return Ok(Processed::Nothing("ping".into())),
        ForgeEvent::Command(c) => {
            let (repo, number) = (c.repo.clone(), c.number);
            let text = command(state, c).await;
            engine.submit(Input::Answer { repo, number, text: text.clone() }).await.map_err(engine_error)?;
            return Ok(Processed::Nothing(format!("answered: {text}")));
        }
        ForgeEvent::Rerun { .. } => return Ok(Processed::Nothing("re-runs are handled by the workflow".into())),
        ForgeEvent::Ignored { event, .. } => return Ok(Processed::Nothing(format!("{event} is ignored"))),
    };
    let planned = Planned { repo, commit, trigger, branch, pull_request, actor, spec_rev, trusted };
    enqueue(state, delivery_id, planned).await
}

/// What an event asks to build, before the spec is read.
struct Planned {
    repo: String,
    commit: String,
    trigger: TriggerEvent,
    branch: Option<String>,
    pull_request: Option<u64>,
    actor: String,
    /// Where the policy (the spec) is read from.
    spec_rev: String,
    trusted: bool,
}

/// Reads the spec, plans, and enqueues one build per pipeline, with ids derived from `tag`.
async fn enqueue(state: &Arc<AppState>, tag: &str, planned: Planned) -> Result<Processed, InboxError> {
    let Planned { repo, commit, trigger, branch, pull_request, actor, spec_rev, trusted } = planned;
    let (engine, vcs) = (&state.engine, &state.vcs);
    let delivery_id = tag;
    let source =
        match vcs.read_spec(&repo, &spec_rev).await.map_err(|source| InboxError::Vcs { repo: repo.clone(), source })? {
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
            trusted,
        };
        let input = Input::Enqueue {
            build: id.clone(),
            spec: text.clone(),
            pipeline: p.name.clone(),
            context,
            only: None,
            variables: Default::default(),
        };
        engine.submit(input).await.map_err(engine_error)?;
        builds.push(id);
    }
    Ok(Processed::Builds(builds))
}

/// Parses a stored delivery from GitHub into a forge event.
pub fn parse_github(delivery: &Delivery) -> Result<ForgeEvent, cib_github::webhook::ParseError> {
    cib_github::webhook::parse(&delivery.event, &delivery.body)
}

/// Works through stored deliveries: all pending ones at start (a crash may have left some),
/// then each new one as the receiver stores it.
pub async fn run(state: Arc<AppState>) {
    loop {
        let notified = state.inbox.notified();
        match state.store.pending_deliveries(100).await {
            Ok(pending) if !pending.is_empty() => {
                for delivery in pending {
                    let outcome = match parse_github(&delivery) {
                        Ok(event) => process(&state, &delivery.id, event).await,
                        Err(reason) => Ok(Processed::Nothing(format!("unreadable: {reason}"))),
                    };
                    match outcome {
                        Ok(result) => {
                            tracing::info!(delivery = %delivery.id, ?result, "delivery processed");
                            if let Err(e) = state.store.mark_delivery_done(&delivery.id).await {
                                tracing::warn!(error = %e, "cannot mark a delivery done");
                            }
                        }
                        Err(e) => {
                            // Left pending: a transient failure (the repository was busy) gets
                            // another try at the next wake-up.
                            tracing::warn!(delivery = %delivery.id, error = %e, kind = ?e.kind(), "delivery not processed");
                            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        }
                    }
                }
                continue;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the inbox"),
        }
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep(std::time::Duration::from_secs(30)) => {}
        }
    }
}
