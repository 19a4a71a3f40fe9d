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
use cib_core::ports::{Delivery, DeliveryOutcome, ErrorKind, Permission};
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

/// The teams of the person behind a forge login: those the operator's directory gives, and
/// those of `named` (the teams a rule lets decide) that the forge says the login belongs to.
/// Only the named teams are asked, so a comment costs a request per team the rule names, and
/// the forge's answers are cached by its backend. A forge that cannot answer adds no team: the
/// rule then refuses rather than trusting a name.
async fn teams_of(state: &Arc<AppState>, repo: &str, login: &str, named: &[String]) -> Vec<String> {
    let mut teams = state.teams_of_login(login);
    for team in named {
        if teams.contains(team) {
            continue;
        }
        match state.vcs.team_member(repo, team, login).await {
            Ok(Some(true)) => teams.push(team.clone()),
            Ok(_) => {}
            Err(error) => tracing::warn!(%repo, %team, %login, %error, "cannot ask the forge about a team"),
        }
    }
    teams
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
            crate::workflow::try_promote(state, &c.repo, commit, &c.sender, Some(c.number))
                .await
                .map(|p| format!("Promoted: {} is now {}.", p.to, p.promoted))
        }
        (["approve", commit], _) if permission >= Permission::Write => {
            // Recorded against the person, so their other identities do not approve twice.
            let named = crate::workflow::promotion_teams(state, &c.repo).await;
            let actor = Actor {
                login: state.person_of_login(&c.sender),
                teams: teams_of(state, &c.repo, &c.sender, &named).await,
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
                                |s| match b.pipeline.step(&s.name).map(|x| &x.action) {
                                    Some(spec::Action::Gate(g)) if g.kind == spec::GateKind::Hold => {
                                        Some((b.id.clone(), s.name.clone(), g.from.teams.clone()))
                                    }
                                    _ => None,
                                },
                            )
                        })
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default();
            let [(build, step, named)] = waiting.as_slice() else {
                return format!("{} manual tests wait in {}; pass or fail one through the API.", waiting.len(), c.repo);
            };
            let approve = words[0] == "pass";
            let mut events = state.engine.subscribe();
            let actor = Actor {
                login: c.sender.clone(),
                teams: teams_of(state, &c.repo, &c.sender, named).await,
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
            // A push that lands a promotion cib made (the forge reports the fast-forward as a
            // push) starts the branch's pipelines as that promotion.
            let promoted = match &push.branch {
                Some(branch) => {
                    let (repo, branch, commit) = (push.repo.clone(), branch.clone(), push.after.clone());
                    engine
                        .query(move |m| {
                            m.environments(&repo).get(&branch).is_some_and(|e| e.promoted && e.commit == commit)
                        })
                        .await
                        .unwrap_or(false)
                }
                None => false,
            };
            let trigger = TriggerEvent {
                kind: if promoted { spec::EventKind::Promotion } else { spec::EventKind::Push },
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
        ForgeEvent::Rerun { repo, sender, commit, name, external_id } => {
            return rerun(state, delivery_id, &repo, &sender, &commit, &name, external_id).await;
        }
        ForgeEvent::Ignored { event, .. } => return Ok(Processed::Nothing(format!("{event} is ignored"))),
    };
    // A branch push moves the branch: repositories downstream of it test the new commit.
    let moved = (pull_request.is_none() && trigger.tag.is_none()).then(|| branch.clone()).flatten();
    let planned = Planned {
        repo: repo.clone(),
        commit: commit.clone(),
        trigger,
        branch,
        pull_request,
        actor: actor.clone(),
        spec_rev,
        trusted,
    };
    let processed = enqueue(state, delivery_id, planned).await?;
    let Some(branch) = moved else { return Ok(processed) };
    let downstream = crate::downstream::start(state, &repo, &branch, &commit, &actor).await;
    if downstream.is_empty() {
        return Ok(processed);
    }
    Ok(match processed {
        Processed::Builds(mut builds) => {
            builds.extend(downstream);
            Processed::Builds(builds)
        }
        Processed::Nothing(_) => Processed::Builds(downstream),
    })
}

/// A check run's "Re-run": builds the pipeline of the build the run reports on again, at the
/// same commit and with the spec stored with that build. The run names its build through its
/// `external_id` (cib's notifier sets it); the build must be of this repository and commit,
/// and the person asking needs write access, as the forge's permission API says. The new
/// build's id comes from the delivery, so a redelivery builds nothing twice.
async fn rerun(
    state: &Arc<AppState>,
    delivery_id: &str,
    repo: &str,
    sender: &str,
    commit: &str,
    name: &str,
    external_id: Option<String>,
) -> Result<Processed, InboxError> {
    let Some(id) = external_id.filter(|id| !id.starts_with("spec@")) else {
        return Ok(Processed::Nothing(format!("the check run {name} names no cib build to run again")));
    };
    let id = BuildId(id);
    let context = match state
        .engine
        .query({
            let id = id.clone();
            move |m| m.build(&id).map(|b| b.context.clone())
        })
        .await
        .map_err(engine_error)?
    {
        Some(context) => Some(context),
        None => match state.store.enqueued(&id).await.map_err(|e| InboxError::Engine(e.to_string()))? {
            Some(cib_core::ports::StoredInput { input: Input::Enqueue { context, .. }, .. }) => Some(context),
            _ => None,
        },
    };
    // The external id comes from the payload: it must name a build of this very check.
    match context {
        Some(c) if c.repo == repo && c.commit == commit => {}
        _ => return Ok(Processed::Nothing(format!("{id} is not a build of {repo} at {commit}; nothing re-run"))),
    }
    let permission =
        state.vcs.permission(repo, sender).await.map_err(|source| InboxError::Vcs { repo: repo.to_owned(), source })?;
    if permission < Permission::Write {
        return Ok(Processed::Nothing(format!("{sender} has no write permission on {repo}; nothing re-run")));
    }
    let new = BuildId(format!("{}-rerun-{}", id.0, build_id(delivery_id, "check").0));
    match crate::workflow::retry_build(state, &id, new, state.person_of_login(sender)).await {
        Ok(Some((new, _))) => Ok(Processed::Builds(vec![new])),
        Ok(None) => Ok(Processed::Nothing(format!("no build {id} to run again"))),
        Err(e) => Err(InboxError::Engine(e.to_string())),
    }
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
    let text: Arc<str> = Arc::from(source.as_str());
    let parsed = match crate::workflow::parse_blocking(text.clone(), state.config.operator_limits()).await {
        Ok(s) => s,
        Err(diags) => {
            // The people who pushed hear of it, through the notifiers, rather than seeing
            // nothing happen.
            let diagnostics: Vec<String> = diags.iter().map(|d| d.line(spec::FILE_NAME)).collect();
            let first = diagnostics.first().cloned().unwrap_or_default();
            tracing::info!(delivery = %delivery_id, %repo, commit = %spec_rev, errors = diagnostics.len(), first = %first, "the pushed spec is invalid");
            let input = Input::SpecInvalid { repo: repo.clone(), commit: commit.clone(), pull_request, diagnostics };
            engine.submit(input).await.map_err(engine_error)?;
            return Ok(Processed::Nothing(format!("the spec of {repo} at {spec_rev} is invalid: {first}")));
        }
    };
    let planned = parsed.plan(&trigger);
    if planned.is_empty() {
        return Ok(Processed::Nothing("no pipeline matches".into()));
    }
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
            upstream: None,
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

/// Why a stored delivery can never be processed: it is done at once, with this reason.
#[derive(Debug, thiserror::Error)]
pub enum Unreadable {
    #[error("unreadable: {0}")]
    Github(#[from] cib_github::webhook::ParseError),
    #[error("unreadable: {0}")]
    Git(#[from] serde_json::Error),
    #[error("unreadable: deliveries from '{0}' are not known")]
    Source(String),
}

/// A push from a plain Git server, as `POST /hooks/git` takes it.
#[derive(Debug, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitPush {
    /// The repository, as named in `[[repos]]`.
    pub repo: String,
    /// The ref pushed: `refs/heads/<branch>` or `refs/tags/<tag>`.
    #[serde(rename = "ref")]
    pub reference: String,
    /// The commit before the push (forty zeros for a new ref).
    pub before: String,
    /// The commit after the push (forty zeros for a deleted ref).
    pub after: String,
    /// Who pushed, as the Git server authenticated them.
    #[serde(default)]
    pub pusher: Option<String>,
}

impl GitPush {
    /// The push in domain terms.
    pub fn event(self) -> ForgeEvent {
        let zero = |c: &str| !c.is_empty() && c.bytes().all(|b| b == b'0');
        let (branch, tag) =
            match (self.reference.strip_prefix("refs/heads/"), self.reference.strip_prefix("refs/tags/")) {
                (Some(b), _) => (Some(b.to_owned()), None),
                (_, Some(t)) => (None, Some(t.to_owned())),
                _ => (Some(self.reference.clone()), None),
            };
        ForgeEvent::Push(cib_core::forge::Push {
            repo: self.repo,
            branch,
            tag,
            created: zero(&self.before),
            deleted: zero(&self.after),
            before: self.before,
            after: self.after,
            forced: false,
            changed_paths: None,
            sender: self.pusher.unwrap_or_else(|| "git".to_owned()),
        })
    }
}

/// Parses a stored delivery into a forge event, by where it came from.
pub fn parse_delivery(delivery: &Delivery) -> Result<ForgeEvent, Unreadable> {
    match delivery.source.as_str() {
        "github" => Ok(cib_github::webhook::parse(&delivery.event, &delivery.body)?),
        "git" => Ok(serde_json::from_slice::<GitPush>(&delivery.body)?.event()),
        other => Err(Unreadable::Source(other.to_owned())),
    }
}

/// The repository an event is about, when it is about one.
fn repo_of(event: &ForgeEvent) -> Option<&str> {
    match event {
        ForgeEvent::Push(p) => Some(&p.repo),
        ForgeEvent::PullRequest(pr) => Some(&pr.repo),
        ForgeEvent::Command(c) => Some(&c.repo),
        ForgeEvent::Rerun { repo, .. } => Some(repo),
        ForgeEvent::Ping { .. } | ForgeEvent::Ignored { .. } => None,
    }
}

/// Whether a readable delivery can never build anything, and if so the outcome it is counted
/// under and the reason it is set aside with: an event about no repository, or about one this
/// server does not build. The receiver asks this before storing, so that such deliveries (an
/// organisation webhook sends them all day) are stored done and never cost the inbox a pass.
pub fn set_aside(
    config: &crate::config::ServerConfig,
    event: &ForgeEvent,
    name: &str,
) -> Option<(&'static str, String)> {
    match repo_of(event) {
        Some(repo) if !config.serves(repo) => Some(("unserved", NOT_SERVED.to_owned())),
        Some(_) => None,
        None => Some(("ignored", format!("{name} builds nothing"))),
    }
}

/// The reason a delivery for a repository this server does not build is set aside with.
pub const NOT_SERVED: &str = "not a repository this server builds";

/// How long after a failed attempt the next one comes: the base, doubling, up to the maximum.
fn backoff(config: &crate::config::InboxConfig, failed: u32) -> std::time::Duration {
    let factor = 1u64.checked_shl(failed.saturating_sub(1)).unwrap_or(u64::MAX);
    std::time::Duration::from_millis(config.retry_base_ms.saturating_mul(factor).min(config.retry_max_ms))
}

/// Records a delivery's outcome, logging a store that fails (the delivery then stays pending
/// and is tried again, which processing allows: it is idempotent).
async fn finish(state: &AppState, id: &str, outcome: DeliveryOutcome) {
    if let Err(e) = state.store.finish_delivery(id, outcome).await {
        tracing::warn!(delivery = %id, error = %e, "cannot record a delivery's outcome");
    }
}

/// Processes one delivery and records its outcome. A delivery that fails is tried again
/// later, after its backoff; it does not hold up the ones after it, so one broken delivery
/// never jams its repository.
async fn process_one(state: &Arc<AppState>, repo: &str, delivery: Delivery, failed_before: u32, event: ForgeEvent) {
    let id = delivery.id.clone();
    match process(state, &id, event).await {
        Ok(result) => {
            tracing::info!(delivery = %id, %repo, ?result, "delivery processed");
            let reason = match result {
                Processed::Builds(builds) => {
                    state.metrics.delivery(&delivery.event, "built");
                    for build in &builds {
                        tracing::info!(delivery = %id, %repo, build = %build.0, "build enqueued");
                        state.metrics.build_from_delivery(build, delivery.received_at);
                    }
                    None
                }
                Processed::Nothing(why) => {
                    state.metrics.delivery(&delivery.event, "nothing");
                    Some(why)
                }
            };
            finish(state, &id, DeliveryOutcome::Done { reason }).await;
        }
        Err(e) => {
            let failed = failed_before + 1;
            let reason = e.to_string();
            let outcome = if failed >= state.config.inbox.max_attempts { "dead" } else { "retry" };
            state.metrics.delivery(&delivery.event, outcome);
            if failed >= state.config.inbox.max_attempts {
                tracing::warn!(delivery = %id, %repo, attempts = failed, error = %e, "delivery set aside as dead");
                finish(state, &id, DeliveryOutcome::Dead { reason }).await;
            } else {
                let wait = backoff(&state.config.inbox, failed);
                let at = state.clock.now() + wait;
                tracing::warn!(
                    delivery = %id, %repo, attempts = failed, kind = ?e.kind(), error = %e,
                    retry_in_ms = wait.as_millis() as u64, "delivery failed; it will be tried again"
                );
                finish(state, &id, DeliveryOutcome::Retry { at, reason }).await;
            }
        }
    }
}

/// The most deliveries the inbox holds in hand (queued behind their repository or being
/// processed) before it reads more from the store.
const IN_HAND: usize = 1_000;

/// How often, at most, the inbox reads the store for due deliveries: webhooks arriving within
/// this time are read together.
const READ_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// What the inbox holds in hand: the ids being worked on, and each busy repository's queue.
/// A repository with an entry has a task working through its queue; the task removes the
/// entry, under the same lock, when it finds the queue empty.
#[derive(Default)]
struct InHand {
    ids: std::collections::HashSet<String>,
    queues: std::collections::HashMap<String, std::collections::VecDeque<(Delivery, u32, ForgeEvent)>>,
    /// The delivery each busy repository's task is processing.
    working: std::collections::HashMap<String, String>,
    /// Deliveries let go of since the current read of the store began: the read may have
    /// begun before their outcome was stored, and so list them as due when they are not.
    let_go: std::collections::HashSet<String>,
}

impl InHand {
    /// Lets go of a repository whose task died: its deliveries are due in the store still,
    /// and the next read picks them up again.
    fn release(&mut self, repo: &str) {
        for (delivery, _, _) in self.queues.remove(repo).unwrap_or_default() {
            self.ids.remove(&delivery.id);
        }
        if let Some(id) = self.working.remove(repo) {
            self.ids.remove(&id);
        }
    }
}

fn lock(hand: &std::sync::Mutex<InHand>) -> std::sync::MutexGuard<'_, InHand> {
    hand.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Works through one repository's queue in arrival order, one delivery at a time, each
/// holding one of the inbox's `concurrency` permits while it is processed.
async fn work_repo(
    state: Arc<AppState>,
    repo: String,
    hand: Arc<std::sync::Mutex<InHand>>,
    gate: Arc<tokio::sync::Semaphore>,
    freed: Arc<tokio::sync::Notify>,
) {
    loop {
        let next = {
            let mut hand = lock(&hand);
            let next = hand.queues.get_mut(&repo).and_then(std::collections::VecDeque::pop_front);
            match &next {
                Some((delivery, _, _)) => {
                    hand.working.insert(repo.clone(), delivery.id.clone());
                }
                None => {
                    hand.queues.remove(&repo);
                    hand.working.remove(&repo);
                }
            }
            next
        };
        let Some((delivery, failed, event)) = next else { return };
        let id = delivery.id.clone();
        {
            let _permit = gate.acquire().await;
            process_one(&state, &repo, delivery, failed, event).await;
        }
        // Only once its outcome is stored: until then the store still lists it as due, and
        // the id in hand keeps it from being picked up twice.
        let mut held = lock(&hand);
        held.ids.remove(&id);
        held.let_go.insert(id);
        drop(held);
        freed.notify_one();
    }
}

/// Works through the due deliveries as they come: those that can never build anything
/// (unreadable, for a repository this server does not build, ignored events) are set aside at
/// once and together; the rest go to their repository's queue, processed in arrival order
/// within a repository and concurrently across repositories (`[inbox] concurrency` at once).
/// The store is read again as soon as webhooks arrive or work is done (at most every
/// `READ_EVERY`), not after a whole round: a webhook waits for the deliveries of its own
/// repository before it, not for the slowest delivery of a batch.
pub async fn run(state: Arc<AppState>) {
    let gate = Arc::new(tokio::sync::Semaphore::new(state.config.inbox.concurrency));
    let hand = Arc::new(std::sync::Mutex::new(InHand::default()));
    let freed = Arc::new(tokio::sync::Notify::new());
    // The repositories' tasks belong to this one: they end when the inbox is stopped.
    let mut workers = tokio::task::JoinSet::new();
    let mut working_on: std::collections::HashMap<tokio::task::Id, String> = Default::default();
    loop {
        while let Some(ended) = workers.try_join_next_with_id() {
            match ended {
                Ok((task, ())) => {
                    working_on.remove(&task);
                }
                Err(e) => {
                    tracing::error!(error = %e, "a repository's inbox task failed");
                    if let Some(repo) = working_on.remove(&e.id()) {
                        lock(&hand).release(&repo);
                    }
                }
            }
        }
        let notified = state.inbox.notified();
        let in_hand = {
            let mut held = lock(&hand);
            held.let_go.clear();
            held.ids.len()
        };
        let due = if in_hand >= IN_HAND {
            Vec::new()
        } else {
            // The deliveries in hand are due too (their outcome is not stored yet): the read
            // asks for that many more.
            match state.store.due_deliveries(state.clock.now(), in_hand + 200).await {
                Ok(due) => due,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the inbox");
                    Vec::new()
                }
            }
        };
        let mut at_once = Vec::new();
        let mut fresh = 0usize;
        {
            let mut held = lock(&hand);
            for (delivery, failed) in due {
                if held.ids.contains(&delivery.id) || held.let_go.contains(&delivery.id) {
                    continue;
                }
                fresh += 1;
                match parse_delivery(&delivery) {
                    Err(e) => {
                        state.metrics.delivery(&delivery.event, "unreadable");
                        at_once.push((delivery.id, Some(e.to_string())));
                    }
                    Ok(event) => match set_aside(&state.config, &event, &delivery.event) {
                        Some((outcome, reason)) => {
                            state.metrics.delivery(&delivery.event, outcome);
                            at_once.push((delivery.id, Some(reason)));
                        }
                        None => {
                            let repo = repo_of(&event).unwrap_or_default().to_owned();
                            held.ids.insert(delivery.id.clone());
                            match held.queues.get_mut(&repo) {
                                Some(queue) => queue.push_back((delivery, failed, event)),
                                None => {
                                    held.queues.insert(repo.clone(), [(delivery, failed, event)].into());
                                    let task = workers.spawn(work_repo(
                                        state.clone(),
                                        repo.clone(),
                                        hand.clone(),
                                        gate.clone(),
                                        freed.clone(),
                                    ));
                                    working_on.insert(task.id(), repo);
                                }
                            }
                        }
                    },
                }
            }
        }
        // Set aside a few at a time: the store commits them together, and webhooks arriving
        // meanwhile are not queued behind hundreds of writes.
        let state_ref = &state;
        futures_util::StreamExt::for_each_concurrent(
            futures_util::stream::iter(at_once),
            16,
            |(id, reason)| async move {
                tracing::info!(delivery = %id, reason = reason.as_deref().unwrap_or(""), "delivery done without processing");
                finish(state_ref, &id, DeliveryOutcome::Done { reason }).await;
            },
        )
        .await;
        // Each read returns the deliveries in hand too, so reads are spaced out more as more
        // are in hand: every 20 ms when few are, about every 200 ms with a thousand.
        let pause = READ_EVERY * (1 + u32::try_from(in_hand / 100).unwrap_or(u32::MAX));
        if fresh > 0 {
            // More may be waiting than one read takes; read again soon.
            tokio::time::sleep(pause).await;
            continue;
        }
        // Retries come due with time, so the inbox looks again soon even when nothing new
        // arrives.
        tokio::select! {
            () = notified => {}
            () = freed.notified() => {
                // Room was made for more of a backlog; the deliveries ending meanwhile are
                // answered by the same read.
                tokio::time::sleep(pause).await;
            }
            () = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
        }
    }
}
