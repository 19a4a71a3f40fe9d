//! `on: schedule` in the server: a task that, every second, reads each served repository's
//! schedules from the spec on its integration branch and starts the pipelines whose slot is due
//! (by [`cib_core::schedule::due`], in the configured time zone, against the server's `Clock`).
//!
//! A slot runs at most once: the build's id is derived from the repository, pipeline, schedule
//! and slot ([`cib_core::schedule::build_id`]); the engine journals the enqueue before any effect
//! and drops an enqueue of an id the store already holds, so a restart in the middle of a slot,
//! or a second tick of the same slot, starts nothing new. Each slot's build runs the spec at the
//! scheduled branch's tip, so a push that changes the schedule moves it from the next tick on.

use std::sync::Arc;
use std::time::Duration;

use cib_core::event::BuildId;
use cib_core::pipeline::{BuildContext, Input};
use cib_core::schedule;
use cib_core::spec::{self, EventKind, TriggerEvent};
use cib_core::time::Timestamp;
use serde::Serialize;

use crate::state::AppState;

/// How often the scheduler looks at the clock.
pub const TICK: Duration = Duration::from_secs(1);

/// One schedule of one pipeline, as `GET /api/v1/schedules` shows it.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct ScheduleInfo {
    /// The repository, as the forge names it.
    pub repo: String,
    pub pipeline: String,
    /// The branch whose tip each run builds.
    pub branch: String,
    /// The cron expression, read in `time_zone`.
    pub cron: String,
    /// Whether slots missed while the server was down run once when it is back.
    pub catch_up: bool,
    /// The server's time zone for schedules: `UTC` or an offset such as `+02:00`.
    pub time_zone: String,
    /// The next run times, in milliseconds since the Unix epoch, soonest first.
    pub next: Vec<u64>,
}

/// The schedules of every served repository, read from the spec on its integration branch
/// (the spec's `merge.into`, else `promotion.from`, else `master`). A repository whose spec
/// cannot be read or is invalid has none.
pub async fn schedules(state: &AppState, now: Timestamp, next: usize) -> Vec<ScheduleInfo> {
    let zone = state.config.schedule_zone();
    let mut out = Vec::new();
    for repo in &state.config.repos {
        let Some(parsed) = integration_spec(state, &repo.name).await else { continue };
        for p in &parsed.pipelines {
            for s in &p.triggers.schedule {
                out.push(ScheduleInfo {
                    repo: repo.name.clone(),
                    pipeline: p.name.clone(),
                    branch: s.branch.clone(),
                    cron: s.cron.as_str().to_owned(),
                    catch_up: s.catch_up,
                    time_zone: zone.to_string().replace("+00:00", "UTC"),
                    next: schedule::next_slots(&s.cron, zone, now, next).iter().map(|t| t.millis()).collect(),
                });
            }
        }
    }
    out
}

async fn spec_at(state: &AppState, repo: &str, rev: &str) -> Option<(Arc<str>, spec::Spec)> {
    let source = state.vcs.read_spec(repo, rev).await.ok()??;
    let text: Arc<str> = Arc::from(source.as_str());
    let parsed = crate::workflow::parse_blocking(text.clone(), state.config.operator_limits()).await.ok()?;
    Some((text, parsed))
}

async fn integration_spec(state: &AppState, repo: &str) -> Option<spec::Spec> {
    let home = spec::DEFAULT_INTEGRATION_BRANCH;
    let (_, parsed) = spec_at(state, repo, home).await?;
    if parsed.integration_branch() == home {
        return Some(parsed);
    }
    let other = parsed.integration_branch().to_owned();
    spec_at(state, repo, &other).await.map(|(_, p)| p)
}

/// Starts the build of every slot due at `now`; the ids of the builds submitted.
pub async fn tick(state: &AppState, now: Timestamp) -> Vec<BuildId> {
    let zone = state.config.schedule_zone();
    let mut started = Vec::new();
    for info in schedules(state, now, 0).await {
        let Ok(cron) = spec::Cron::parse(&info.cron) else { continue };
        let Some(slot) = schedule::due(&cron, zone, info.catch_up, now) else { continue };
        let id = schedule::build_id(&info.repo, &info.pipeline, &info.cron, &info.branch, slot);
        // The engine drops a repeated id too; asking first spares it the spec and the journal.
        if matches!(state.store.build(&id).await, Ok(Some(_))) {
            continue;
        }
        let Ok(commit) = state.vcs.resolve(&info.repo, &info.branch).await else {
            tracing::warn!(repo = %info.repo, branch = %info.branch, "a scheduled branch does not resolve");
            continue;
        };
        // The run builds the branch's own spec, which must still schedule this pipeline.
        let Some((text, parsed)) = spec_at(state, &info.repo, &commit).await else { continue };
        let event = TriggerEvent::of(EventKind::Schedule, &info.branch);
        if parsed.pipeline(&info.pipeline).is_none_or(|p| !p.triggers.matches(&event)) {
            continue;
        }
        let input = Input::Enqueue {
            build: id.clone(),
            spec: text,
            pipeline: info.pipeline.clone(),
            context: BuildContext {
                repo: info.repo.clone(),
                commit,
                branch: Some(info.branch.clone()),
                pull_request: None,
                event,
                actor: Some("cib".into()),
                trusted: true,
                upstream: None,
            },
            only: None,
            variables: Default::default(),
        };
        match state.engine.submit(input).await {
            Ok(()) => started.push(id),
            Err(error) => tracing::warn!(%error, "the engine refused a scheduled build"),
        }
    }
    started
}

/// Ticks until the engine stops.
pub async fn run(state: Arc<AppState>) {
    loop {
        let now = state.clock.now();
        tick(&state, now).await;
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            () = state.stopping.notified() => return,
        }
    }
}
