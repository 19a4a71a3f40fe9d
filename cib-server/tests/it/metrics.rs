//! `/metrics` read as Prometheus reads it: the text is parsed by a real Prometheus text
//! parser, and the families the operations guide lists are there, with plausible values, after
//! a build and a few deliveries.

use std::collections::BTreeMap;

use cib_core::ports::BuildStatus;
use cib_server::config::{PoolFileConfig, Role, UnitConfig};
use cib_server::outgoing::sign;
use prometheus_parse::{Sample, Scrape, Value};

use super::server::{SECRET, TestServer, token};

const SPEC: &str = r#"
pipelines:
  test:
    on: { manual: {} }
    resources: [{ pool: envs }]
    steps:
      - { name: one, image: busybox, commands: ["echo one"], retry: { count: 1, on: [infrastructure] } }
      - { name: two, image: busybox, commands: ["echo two"], depends_on: [one] }
"#;

pub(crate) async fn scrape(s: &TestServer) -> Scrape {
    let answer = s.request("GET", "/metrics", None, b"").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    Scrape::parse(answer.body.lines().map(|l| Ok(l.to_owned()))).expect("the Prometheus text parser reads /metrics")
}

/// The samples of one metric, by their labels.
fn samples<'a>(scrape: &'a Scrape, name: &str) -> Vec<&'a Sample> {
    scrape.samples.iter().filter(|s| s.metric == name).collect()
}

fn number(sample: &Sample) -> f64 {
    match &sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        Value::Histogram(buckets) => buckets.iter().map(|b| b.count).fold(0.0, f64::max),
        Value::Summary(_) => f64::NAN,
    }
}

pub(crate) fn labelled(scrape: &Scrape, name: &str, label: &str) -> BTreeMap<String, f64> {
    samples(scrape, name).into_iter().filter_map(|s| s.labels.get(label).map(|v| (v.to_owned(), number(s)))).collect()
}

pub(crate) fn single(scrape: &Scrape, name: &str) -> f64 {
    let found = samples(scrape, name);
    assert_eq!(found.len(), 1, "one sample of {name}: {found:?}");
    number(found[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_what_happened() {
    let pool = PoolFileConfig {
        name: "envs".into(),
        units: vec![UnitConfig { name: "env-1".into(), metadata: Default::default() }],
        capacity: None,
    };
    // The first attempt of `one` cannot start (an executor error); its retry succeeds.
    let executor = cib_core::testing::FakeExecutor::new();
    executor.fail_infrastructure("one", 1);
    let s = TestServer::start_full(
        SPEC,
        |c| c.pools = vec![pool],
        cib_store::SqliteOptions::default(),
        executor.clone(),
        &[],
    )
    .await;

    // A build, start to finish.
    let body = serde_json::json!({ "repo": "acme/shop", "ref": "feature/x", "pipeline": "test" });
    let answer = s.request("POST", "/api/v1/builds", Some(&token(Role::Trigger)), body.to_string().as_bytes()).await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    s.wait_builds(|b| b.iter().any(|b| b.status == BuildStatus::Success)).await;
    // A delivery cib ignores, and one for a repository it does not build.
    for (event, id, repo) in [("watch", "m-1", "acme/shop"), ("push", "m-2", "someone/else")] {
        let body = serde_json::to_vec(&serde_json::json!({
            "ref": "refs/heads/main", "before": "0".repeat(40), "after": "1".repeat(40),
            "created": false, "deleted": false, "forced": false, "commits": [],
            "action": "started",
            "repository": { "full_name": repo }, "sender": { "login": "octocat" }
        }))
        .expect("json");
        let answer = s.hook(event, id, &body, Some(&sign(SECRET.as_bytes(), &body))).await;
        assert_eq!(answer.status, 202, "{}", answer.body);
    }

    // The step histogram is fed from the event stream, just after the build is stored as
    // finished: wait for it rather than race it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let scrape = loop {
        let scrape = scrape(&s).await;
        if labelled(&scrape, "cib_builds_total", "status").get("success").copied().unwrap_or(0.0) >= 1.0 {
            break scrape;
        }
        assert!(std::time::Instant::now() < deadline, "the finished build was never counted");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };

    // Every family the operations guide lists is there.
    for family in [
        "cib_deliveries",
        "cib_builds",
        "cib_build_queue_wait_seconds",
        "cib_step_duration_seconds",
        "cib_hook_to_start_seconds",
        "cib_steps_running",
        "cib_executor_errors",
        "cib_inbox_pending",
        "cib_inbox_dead",
        "cib_inbox_oldest_pending_age_seconds",
        "cib_lease_queue_length",
        "cib_journal_length",
    ] {
        assert!(
            scrape.docs.contains_key(family) || scrape.samples.iter().any(|s| s.metric.starts_with(family)),
            "{family} is missing: {:?}",
            scrape.docs.keys().collect::<Vec<_>>()
        );
    }

    // Plausible values.
    let builds = labelled(&scrape, "cib_builds_total", "status");
    assert_eq!(builds.get("queued"), Some(&1.0), "{builds:?}");
    assert_eq!(builds.get("success"), Some(&1.0), "{builds:?}");
    let deliveries: BTreeMap<(String, String), f64> = samples(&scrape, "cib_deliveries_total")
        .into_iter()
        .map(|s| {
            (
                (s.labels.get("event").unwrap_or("").to_owned(), s.labels.get("outcome").unwrap_or("").to_owned()),
                number(s),
            )
        })
        .collect();
    assert_eq!(deliveries.get(&("watch".into(), "ignored".into())), Some(&1.0), "{deliveries:?}");
    assert_eq!(deliveries.get(&("push".into(), "unserved".into())), Some(&1.0), "{deliveries:?}");
    assert_eq!(deliveries.get(&("push".into(), "accepted".into())), Some(&1.0), "{deliveries:?}");
    assert_eq!(single(&scrape, "cib_steps_running"), 0.0, "nothing runs after the build");
    assert_eq!(single(&scrape, "cib_inbox_pending"), 0.0);
    assert_eq!(single(&scrape, "cib_inbox_dead"), 0.0);
    assert_eq!(single(&scrape, "cib_inbox_oldest_pending_age_seconds"), 0.0);
    let steps = single(&scrape, "cib_step_duration_seconds_count");
    assert_eq!(steps, 3.0, "three step attempts ran: one twice, two once");
    let errors = labelled(&scrape, "cib_executor_errors_total", "kind");
    assert_eq!(errors.get("errored"), Some(&1.0), "the attempt that could not start: {errors:?}");
    let waits = single(&scrape, "cib_build_queue_wait_seconds_count");
    assert_eq!(waits, 1.0, "one build waited in the queue");
    let queues = labelled(&scrape, "cib_lease_queue_length", "pool");
    assert_eq!(queues.get("envs"), Some(&0.0), "the pool's queue is empty again: {queues:?}");
    let journal = single(&scrape, "cib_journal_length");
    let stored = cib_core::ports::Store::inputs_after(&*s.store, 0, 100_000).await.expect("inputs").len() as f64;
    assert!(journal >= 1.0 && journal <= stored, "the journal's length, {journal}, is what was journaled: {stored}");
}
