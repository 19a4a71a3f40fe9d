//! Caches on a real daemon: what one build saves the next restores; a fork's build writes only
//! its own namespace, so a trusted build never sees its files; two saves of one key at once
//! leave one whole cache. The steps run as the engine runs them: restore, run, save.

use std::sync::Arc;

use cib_core::pipeline::BuildContext;
use cib_core::policy::cache_namespaces;
use cib_core::ports::{CacheJob, Executor, StopSignal, Stream};
use cib_docker::DockerExecutor;
use cib_docker::cache::{LABEL_CACHE_REPO, marker_name};

use crate::common::{Sink, executor, job, step_run, tempdir};

/// A repository name of this test and process, so parallel runs never share caches.
fn repo(test: &str) -> String {
    format!("cache-it/{test}-{}", std::process::id())
}

fn cache_job(repo: &str, context: &BuildContext, key: &str, restore_keys: &[&str]) -> CacheJob {
    let (write, reads) = cache_namespaces(context);
    CacheJob {
        repo: repo.to_owned(),
        key: key.to_owned(),
        restore_keys: restore_keys.iter().map(|k| (*k).to_owned()).collect(),
        paths: vec!["deps".to_owned()],
        write,
        reads,
    }
}

/// Runs one step of a build of its own as the engine does: restore the cache, run, save it
/// after success. Answers the key restored, the step's output and whether it saved.
async fn build(
    exec: &Arc<DockerExecutor>,
    id: &str,
    trusted: bool,
    pull_request: Option<u64>,
    cache: impl Fn(&BuildContext) -> CacheJob,
    commands: &[&str],
) -> (Option<String>, String, bool) {
    let dir = tempdir();
    let mut job = job(id, "step", commands);
    job.context.trusted = trusted;
    job.context.pull_request = pull_request;
    let cache = cache(&job.context);
    let run = step_run(job, dir.path());
    let restored = exec.restore_cache(&run, &cache).await.expect("restore");
    let sink = Sink::new();
    let (_stop, signal) = StopSignal::new();
    let outcome = exec.run(&run, sink.clone(), signal).await.expect("run");
    assert_eq!(outcome, cib_core::ports::Outcome::Exited(0), "{}", sink.text(Stream::Stderr));
    let saved = exec.save_cache(&run, &cache).await.expect("save");
    exec.cleanup(&run.job.build).await.expect("cleanup");
    (restored, sink.text(Stream::Stdout), saved)
}

/// Removes every cache of `repo`: markers, holders and their volumes.
async fn remove_caches(exec: &DockerExecutor, repo: &str) {
    let docker = exec.docker();
    let filters = std::collections::HashMap::from([("label".to_owned(), vec![format!("{LABEL_CACHE_REPO}={repo}")])]);
    let all = bollard::query_parameters::ListContainersOptions {
        all: true,
        filters: Some(filters.clone()),
        ..Default::default()
    };
    for c in docker.list_containers(Some(all)).await.expect("list") {
        let force = bollard::query_parameters::RemoveContainerOptions { force: true, ..Default::default() };
        docker.remove_container(c.id.as_deref().unwrap_or_default(), Some(force)).await.expect("remove");
    }
    let volumes =
        docker.list_volumes(Some(bollard::query_parameters::ListVolumesOptions { filters: Some(filters) })).await;
    for v in volumes.expect("volumes").volumes.unwrap_or_default() {
        docker.remove_volume(&v.name, None::<bollard::query_parameters::RemoveVolumeOptions>).await.expect("remove");
    }
}

/// Prints what the cache held, or fills it with `id`.
fn fill(id: &str) -> String {
    format!(
        "if [ -f deps/who ]; then echo \"found $(cat deps/who)\"; else mkdir -p deps; echo {id} > deps/who; echo fresh; fi"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_build_restores_what_the_first_saved_and_a_prefix_finds_the_newest() {
    let exec = executor("cache-restore").await;
    let repo = repo("restore");
    let (restored, out, saved) =
        build(&exec, "c-1", true, None, |c| cache_job(&repo, c, "deps-aaa", &[]), &[&fill("c-1")]).await;
    assert_eq!((restored, out.trim(), saved), (None, "fresh", true));
    let (restored, out, saved) =
        build(&exec, "c-2", true, None, |c| cache_job(&repo, c, "deps-aaa", &[]), &[&fill("c-2")]).await;
    assert_eq!((restored.as_deref(), out.trim(), saved), (Some("deps-aaa"), "found c-1", false), "exact key");
    // Another key falls back on the prefix and saves its own cache.
    let cache = |c: &BuildContext| cache_job(&repo, c, "deps-bbb", &["deps-"]);
    let (restored, out, saved) = build(&exec, "c-3", true, None, cache, &[&fill("c-3")]).await;
    assert_eq!((restored.as_deref(), out.trim(), saved), (Some("deps-aaa"), "found c-1", true));
    remove_caches(&exec, &repo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forks_build_cannot_poison_a_trusted_builds_cache() {
    let exec = executor("cache-fork").await;
    let repo = repo("fork");
    let poison = "mkdir -p deps && echo poisoned > deps/who && echo wrote";
    // The fork's pull request, untrusted, saves under the very key trusted builds use.
    let (restored, _, saved) =
        build(&exec, "f-1", false, Some(7), |c| cache_job(&repo, c, "deps-k", &["deps-"]), &[poison]).await;
    assert_eq!((restored, saved), (None, true));
    // The trusted build neither finds it by the key nor by the prefix: it starts fresh.
    let (restored, out, saved) =
        build(&exec, "t-1", true, None, |c| cache_job(&repo, c, "deps-k", &["deps-"]), &[&fill("t-1")]).await;
    assert_eq!((restored, out.trim(), saved), (None, "fresh", true));
    // A fork reads what trusted builds cached (its own namespace first).
    let (restored, out, _) =
        build(&exec, "f-2", false, Some(8), |c| cache_job(&repo, c, "deps-k", &[]), &[&fill("f-2")]).await;
    assert_eq!((restored.as_deref(), out.trim()), (Some("deps-k"), "found t-1"));
    remove_caches(&exec, &repo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_saves_of_one_key_at_once_leave_one_whole_cache() {
    let exec = executor("cache-race").await;
    let repo = repo("race");
    // Two builds fill the same key with 2 MiB of different bytes, then save at the same time.
    let mut runs = Vec::new();
    let dirs = [tempdir(), tempdir()];
    for (i, dir) in dirs.iter().enumerate() {
        let id = format!("r-{i}");
        let fill =
            format!("mkdir -p deps && head -c 2097152 /dev/zero | tr '\\0' '{i}' > deps/blob && echo {id} > deps/who");
        let job = job(&id, "step", &[&fill]);
        let run = step_run(job, dir.path());
        let (_stop, signal) = StopSignal::new();
        let outcome = exec.run(&run, Sink::new(), signal).await.expect("run");
        assert_eq!(outcome, cib_core::ports::Outcome::Exited(0));
        runs.push(run);
    }
    let cache = cache_job(&repo, &runs[0].job.context, "deps-same", &[]);
    let (a, b) = tokio::join!(exec.save_cache(&runs[0], &cache), exec.save_cache(&runs[1], &cache));
    let saved = [a.expect("save"), b.expect("save")];
    assert_eq!(saved.iter().filter(|s| **s).count(), 1, "exactly one save commits: {saved:?}");
    for run in &runs {
        exec.cleanup(&run.job.build).await.expect("cleanup");
    }
    // One marker, one volume: the loser removed its own.
    let docker = exec.docker();
    let filters = std::collections::HashMap::from([("label".to_owned(), vec![format!("{LABEL_CACHE_REPO}={repo}")])]);
    let all = bollard::query_parameters::ListContainersOptions {
        all: true,
        filters: Some(filters.clone()),
        ..Default::default()
    };
    let containers = docker.list_containers(Some(all)).await.expect("list");
    let names: Vec<String> = containers.iter().flat_map(|c| c.names.clone().unwrap_or_default()).collect();
    assert_eq!(names, [format!("/{}", marker_name(&repo, "trusted", "deps-same"))]);
    let volumes =
        docker.list_volumes(Some(bollard::query_parameters::ListVolumesOptions { filters: Some(filters) })).await;
    assert_eq!(volumes.expect("volumes").volumes.unwrap_or_default().len(), 1);
    // The cache is whole: one writer's blob and its name, never a mix.
    let check = "who=$(cat deps/who); c=${who#r-}; test \"$(tr -d \"$c\" < deps/blob | wc -c)\" = 0 && test \"$(wc -c < deps/blob)\" = 2097152 && echo whole $who";
    let (restored, out, _) =
        build(&exec, "r-check", true, None, |c| cache_job(&repo, c, "deps-same", &[]), &[check]).await;
    assert_eq!(restored.as_deref(), Some("deps-same"));
    assert!(out.trim() == "whole r-0" || out.trim() == "whole r-1", "{out}");
    remove_caches(&exec, &repo).await;
}

/// A cache restored before a later step of a build goes into the workspace volume that the
/// first step's container made and filled, where that step then finds it beside what the
/// first step wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_restored_before_a_later_step_lands_in_the_builds_volume() {
    let exec = executor("cache-later").await;
    let repo = repo("later");
    let (_, out, saved) =
        build(&exec, "l-1", true, None, |c| cache_job(&repo, c, "deps-l", &[]), &[&fill("l-1")]).await;
    assert_eq!((out.trim(), saved), ("fresh", true));
    let dir = tempdir();
    let first = step_run(job("l-2", "one", &["echo one > one.txt"]), dir.path());
    let (_stop, signal) = StopSignal::new();
    let sink = Sink::new();
    let outcome = exec.run(&first, sink.clone(), signal).await.expect("run");
    assert_eq!(outcome, cib_core::ports::Outcome::Exited(0), "{}", sink.text(Stream::Stderr));
    let second = step_run(job("l-2", "two", &["cat one.txt", &fill("l-2")]), dir.path());
    let cache = cache_job(&repo, &second.job.context, "deps-l", &[]);
    let restored = exec.restore_cache(&second, &cache).await.expect("restore");
    assert_eq!(restored.as_deref(), Some("deps-l"));
    let (_stop, signal) = StopSignal::new();
    let sink = Sink::new();
    let outcome = exec.run(&second, sink.clone(), signal).await.expect("run");
    assert_eq!(outcome, cib_core::ports::Outcome::Exited(0), "{}", sink.text(Stream::Stderr));
    assert_eq!(sink.text(Stream::Stdout), "one\nfound l-1\n");
    exec.cleanup(&second.job.build).await.expect("cleanup");
    remove_caches(&exec, &repo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_budget_repository_loses_its_least_recently_used_cache_first() {
    // Room for two caches of about 100 kB each, not three.
    let exec = crate::common::executor_with("cache-evict", |o| o.cache_budget = Some(250_000)).await;
    let repo = repo("evict");
    let fill = "mkdir -p deps && dd if=/dev/zero of=deps/blob bs=1000 count=100 2>/dev/null && echo filled";
    let keys = |caches: Vec<cib_core::ports::CacheInfo>| {
        let mut keys: Vec<String> = caches.into_iter().map(|c| c.key).collect();
        keys.sort();
        keys
    };
    for (id, key) in [("e-1", "deps-a"), ("e-2", "deps-b")] {
        let (_, out, saved) = build(&exec, id, true, None, |c| cache_job(&repo, c, key, &[]), &[fill]).await;
        assert_eq!((out.trim(), saved), ("filled", true));
    }
    assert_eq!(keys(exec.list_caches(&repo).await.expect("list")), ["deps-a", "deps-b"], "both fit");
    // deps-a is used again, so deps-b is now the least recently used.
    let (restored, _, saved) =
        build(&exec, "e-3", true, None, |c| cache_job(&repo, c, "deps-a", &[]), &["test -f deps/blob"]).await;
    assert_eq!((restored.as_deref(), saved), (Some("deps-a"), false));
    // A third cache goes over the budget: deps-b goes, the two used most recently stay.
    let (_, _, saved) = build(&exec, "e-4", true, None, |c| cache_job(&repo, c, "deps-c", &[]), &[fill]).await;
    assert!(saved);
    assert_eq!(keys(exec.list_caches(&repo).await.expect("list")), ["deps-a", "deps-c"]);
    // Its volume went with it: nothing of deps-b is left on the daemon.
    let marker = marker_name(&repo, "trusted", "deps-b");
    assert!(exec.docker().inspect_container(&marker, None).await.is_err(), "the marker is gone");
    let filters = std::collections::HashMap::from([("label".to_owned(), vec!["org.cib.cache.key=deps-b".to_owned()])]);
    let volumes = exec
        .docker()
        .list_volumes(Some(bollard::query_parameters::ListVolumesOptions { filters: Some(filters) }))
        .await
        .expect("volumes")
        .volumes
        .unwrap_or_default();
    assert!(volumes.iter().all(|v| v.labels.get(LABEL_CACHE_REPO).is_none_or(|r| *r != repo)), "{volumes:?}");
    remove_caches(&exec, &repo).await;
}
