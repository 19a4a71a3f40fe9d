//! `on: schedule` in the server, on a clock the test moves by hand (the `Clock` port): an
//! every-minute schedule fires once per minute, a restart in the middle of a slot does not fire
//! it again, and a server down for three slots fires none of them, or one with `catch_up`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cib_core::event::BuildId;
use cib_core::ports::{BuildFilter, Page, Store};
use cib_core::testing::{FakeExecutor, ManualClock};
use cib_core::time::Timestamp;
use cib_git::GitVcs;
use cib_server::config::{RepoConfig, ServerConfig};
use cib_server::server::{self, Running};

use super::server::{git, tokens};

const SPEC: &str = "pipelines:
  nightly:
    on:
      schedule: [{ cron: \"*/1 * * * *\", branch: master CATCH_UP }]
    steps:
      - { name: tick, image: busybox, commands: [echo tick] }
";

/// A repository whose `master` holds the spec, with or without `catch_up`.
fn project(dir: &Path, catch_up: bool) {
    let repo = dir.join("shop");
    std::fs::create_dir_all(&repo).expect("mkdir");
    git(&repo, &["init", "-q", "-b", "master"]);
    let spec = SPEC.replace(" CATCH_UP", if catch_up { ", catch_up: true" } else { "" });
    std::fs::write(repo.join(".cib.yml"), spec).expect("spec");
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "spec"]);
}

fn start(dir: &Path, clock: Arc<ManualClock>) -> (Running, Arc<cib_store::SqliteStore>) {
    let config = ServerConfig {
        data_dir: dir.join("data"),
        tokens: tokens(),
        repos: vec![RepoConfig { name: "acme/shop".into(), path: dir.join("shop"), webhook_secret: None }],
        ..ServerConfig::default()
    };
    std::fs::create_dir_all(&config.data_dir).expect("data dir");
    let store = Arc::new(
        cib_store::SqliteStore::open(config.data_dir.join("cib.db"), cib_store::SqliteOptions::default())
            .expect("store"),
    );
    let vcs = Arc::new(GitVcs::new().with_repo("acme/shop", dir.join("shop")));
    let running = server::start_clocked(config, FakeExecutor::new(), store.clone(), vcs, Vec::new(), clock);
    (running, store)
}

async fn stop(running: Running) {
    running.scheduler_task.abort();
    let _ = running.scheduler_task.await;
    running.state.engine.shutdown().await;
    running.inbox_task.abort();
    let _ = running.engine_task.await;
}

/// The ids of the scheduled builds the store holds, oldest slot first.
async fn scheduled(store: &cib_store::SqliteStore) -> Vec<String> {
    let builds = store.builds(&BuildFilter::default(), Page::first(100)).await.expect("builds");
    let mut ids: Vec<String> = builds.into_iter().map(|b| b.id.0).filter(|id| id.starts_with("schedule-")).collect();
    ids.sort();
    ids
}

fn slot_of(id: &str) -> u64 {
    id.rsplit('-').next().and_then(|n| n.parse().ok()).expect("a slot")
}

fn minute(n: u64) -> Timestamp {
    // A day after the epoch, so that no slot is before time began.
    Timestamp(86_400_000 + n * 60_000)
}

fn plus(t: Timestamp, secs: u64) -> Timestamp {
    Timestamp(t.millis() + secs * 1000)
}

/// Waits (in real time) until the scheduler has ticked at the clock's time and the store
/// holds `count` scheduled builds, then a little longer to see that no more come.
async fn settle(store: &cib_store::SqliteStore, count: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ids = scheduled(store).await;
        if ids.len() >= count || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Two more ticks: nothing new may appear for the same slots.
    tokio::time::sleep(cib_server::scheduler::TICK * 2 + Duration::from_millis(300)).await;
    scheduled(store).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_every_minute_schedule_fires_once_per_slot_and_a_restart_mid_slot_does_not_fire_it_again() {
    let dir = tempfile::tempdir().expect("temp dir");
    project(dir.path(), false);
    let clock = ManualClock::new(plus(minute(0), 40));
    let (running, store) = start(dir.path(), clock.clone());
    // 40 s after a slot: past the grace, so nothing runs.
    assert_eq!(settle(&store, 0).await, Vec::<String>::new());
    clock.set(minute(1));
    let ids = settle(&store, 1).await;
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(slot_of(&ids[0]), minute(1).millis());
    clock.set(plus(minute(1), 20));
    assert_eq!(settle(&store, 1).await.len(), 1, "still one build in the same minute");
    clock.set(plus(minute(2), 1));
    let ids = settle(&store, 2).await;
    assert_eq!(ids.iter().map(|i| slot_of(i)).collect::<Vec<_>>(), [minute(1).millis(), minute(2).millis()]);
    let build = store.build(&BuildId(ids[1].clone())).await.expect("read").expect("the build");
    assert_eq!(build.build.pipeline, "nightly");

    // A restart in the middle of the slot of minute 2 does not fire it a second time.
    stop(running).await;
    drop(store);
    clock.set(plus(minute(2), 10));
    let (running, store) = start(dir.path(), clock.clone());
    assert_eq!(settle(&store, 2).await.len(), 2, "the slot of minute 2 ran once");

    // The schedules route shows the next run times.
    let schedules =
        cib_server::scheduler::schedules(&running.state, cib_core::ports::Clock::now(clock.as_ref()), 3).await;
    assert_eq!(schedules.len(), 1);
    assert_eq!(schedules[0].next, [minute(3).millis(), minute(4).millis(), minute(5).millis()]);
    assert_eq!(schedules[0].time_zone, "UTC");
    stop(running).await;
}

async fn down_for_three_slots(catch_up: bool) -> Vec<u64> {
    let dir = tempfile::tempdir().expect("temp dir");
    project(dir.path(), catch_up);
    let clock = ManualClock::new(plus(minute(1), 5));
    let (running, store) = start(dir.path(), clock.clone());
    assert_eq!(settle(&store, 1).await.len(), 1, "minute 1 runs");
    stop(running).await;
    drop(store);
    // Down through the slots of minutes 2, 3 and 4; back at 4:45, past the grace of minute 4.
    clock.set(plus(minute(4), 45));
    let (running, store) = start(dir.path(), clock.clone());
    let ids = settle(&store, if catch_up { 2 } else { 1 }).await;
    stop(running).await;
    ids.iter().map(|i| slot_of(i)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_down_for_three_slots_fires_none_of_them_by_default() {
    assert_eq!(down_for_three_slots(false).await, [minute(1).millis()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_down_for_three_slots_fires_one_with_catch_up() {
    assert_eq!(down_for_three_slots(true).await, [minute(1).millis(), minute(4).millis()]);
}
