//! The operator's `[limits]` on the real server: a spec over a maximum is refused at plan time,
//! naming the key, the value and the limit (422 from the trigger route, a `spec_invalid` event
//! for a push), and a step whose spec gives no timeout runs with the default.

use std::time::{Duration, Instant};

use cib_core::event::EventBody;
use cib_core::ports::{BuildStatus, Store};
use cib_core::testing::FakeExecutor;
use cib_server::config::{LimitsConfig, Role};
use cib_server::outgoing::sign;
use serde_json::Value;

use super::server::{SECRET, TestServer, push_payload, token};

const OVER: &str = r#"
pipelines:
  test:
    on: { push: {}, manual: {} }
    steps:
      - { name: quick, image: busybox, commands: ["echo quick"] }
      - name: long
        image: busybox
        commands: ["echo long"]
        timeout: 2h
        limits: { memory: 8g }
"#;

const FITS: &str = r#"
pipelines:
  test:
    on: { manual: {} }
    steps:
      - { name: quick, image: busybox, commands: ["echo quick"] }
"#;

fn limits() -> LimitsConfig {
    LimitsConfig {
        step_timeout: Some(cib_core::spec::Duration::from_secs(7 * 60)),
        max_step_timeout: Some(cib_core::spec::Duration::from_secs(3_600)),
        max_memory: Some(cib_core::spec::Memory(4 << 30)),
        memory: Some(cib_core::spec::Memory(1 << 30)),
        ..LimitsConfig::default()
    }
}

fn trigger() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "repo": "acme/shop", "ref": "feature/x", "pipeline": "test" }))
        .expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trigger_route_refuses_a_spec_over_a_maximum_with_422_naming_key_and_limit() {
    let s = TestServer::start_configured(OVER, |c| c.limits = limits()).await;
    let answer = s.request("POST", "/api/v1/builds", Some(&token(Role::Trigger)), &trigger()).await;
    assert_eq!(answer.status, 422, "{}", answer.body);
    let body: Value = serde_json::from_str(&answer.body).expect("json");
    assert_eq!(body["code"], "invalid_spec", "{body}");
    let diagnostics: Vec<&str> =
        body["diagnostics"].as_array().expect("diagnostics").iter().filter_map(Value::as_str).collect();
    assert_eq!(
        diagnostics,
        [
            ".cib.yml:10:18: error: pipelines.test.steps.long.timeout is 2h, over this server's limit of 1h \
             (max_step_timeout in its [limits]): ask for 1h or less",
            ".cib.yml:11:27: error: pipelines.test.steps.long.limits.memory is 8g, over this server's limit of 4g \
             (max_memory in its [limits]): ask for 4g or less",
        ]
    );
    assert!(s.wait_builds(|_| true).await.is_empty(), "nothing was built");

    // The same spec on a server with the built-in limits (a day at most, no memory cap) runs.
    let s = TestServer::start(OVER).await;
    let answer = s.request("POST", "/api/v1/builds", Some(&token(Role::Trigger)), &trigger()).await;
    assert_eq!(answer.status, 201, "{}", answer.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_spec_over_a_maximum_is_a_spec_invalid_event_and_builds_nothing() {
    let s = TestServer::start_configured(OVER, |c| c.limits = limits()).await;
    let body = push_payload(&s.commit);
    let answer = s.hook("push", "over-the-limit", &body, Some(&sign(SECRET.as_bytes(), &body))).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    let deadline = Instant::now() + Duration::from_secs(20);
    let diagnostics = loop {
        let events = s.store.events_after(0, 10_000).await.expect("events");
        let found = events.iter().find_map(|e| match &e.body {
            EventBody::SpecInvalid { diagnostics, .. } => Some(diagnostics.clone()),
            _ => None,
        });
        if let Some(found) = found {
            break found;
        }
        assert!(Instant::now() < deadline, "no spec_invalid event: {events:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(diagnostics.len(), 2, "{diagnostics:?}");
    assert!(diagnostics[0].contains("pipelines.test.steps.long.timeout is 2h"), "{diagnostics:?}");
    assert!(diagnostics[0].contains("limit of 1h (max_step_timeout"), "{diagnostics:?}");
    assert!(diagnostics[1].contains("pipelines.test.steps.long.limits.memory is 8g"), "{diagnostics:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(s.wait_builds(|_| true).await.is_empty(), "nothing was built");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_without_a_timeout_runs_with_the_default() {
    let executor = FakeExecutor::new();
    let s = TestServer::start_full(
        FITS,
        |c| c.limits = limits(),
        cib_store::SqliteOptions::default(),
        executor.clone(),
        &[],
    )
    .await;
    let answer = s.request("POST", "/api/v1/builds", Some(&token(Role::Trigger)), &trigger()).await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    s.wait_builds(|b| b.len() == 1 && b[0].status == BuildStatus::Success).await;
    let runs = executor.runs();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let step = &runs[0].step;
    assert_eq!(step.timeout, Some(cib_core::spec::Duration::from_secs(7 * 60)), "the default step timeout");
    assert_eq!(step.limits.memory, Some(cib_core::spec::Memory(1 << 30)), "the default memory");
    assert_eq!(step.limits.pids, Some(cib_core::spec::limits::DEFAULT_PIDS), "the built-in process limit");
}
