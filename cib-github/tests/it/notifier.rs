//! `GithubNotifier` against the fake GitHub: statuses per pipeline, coalescing, retries through
//! 502 and secondary rate limits, and an outbox that survives a killed process.

use std::time::{Duration, Instant};

use cib_core::event::{BuildId, Conclusion, Event, EventBody, StepConclusion};
use cib_core::ports::Notifier;
use cib_core::time::Timestamp;
use cib_github::client::{Auth, GithubClient};
use cib_github::testing::{FakeGithub, TEST_TOKEN};
use cib_github::{GithubNotifier, NotifierConfig};
use serde_json::json;

pub fn config() -> NotifierConfig {
    NotifierConfig {
        context_prefix: "cib".into(),
        target_url: Some("https://ci.example.com".into()),
        retry_base: Duration::from_millis(50),
        retry_max: Duration::from_secs(2),
        coalesce: Duration::from_millis(50),
        ..NotifierConfig::default()
    }
}

pub fn event(seq: u64, body: EventBody) -> Event {
    Event { seq, at: Timestamp(seq * 1000), body }
}

pub fn queued(sha: &str) -> EventBody {
    EventBody::BuildQueued {
        build: BuildId::from("b1"),
        pipeline: "test".into(),
        repo: "o/r".into(),
        commit: sha.into(),
        branch: Some("main".into()),
    }
}

pub fn finished(conclusion: Conclusion) -> EventBody {
    EventBody::BuildFinished { build: BuildId::from("b1"), conclusion }
}

pub fn client(fake_url: &str) -> GithubClient {
    GithubClient::new(fake_url, Auth::Token(TEST_TOKEN.into())).expect("client")
}

#[tokio::test]
async fn a_burst_of_events_coalesces_into_few_statuses() {
    let fake = FakeGithub::start().await.expect("fake");
    let sha = fake.commit("o/r", &[], &[("a", "1")], "one");
    let dir = tempfile::tempdir().expect("tempdir");
    let notifier = GithubNotifier::new(client(fake.url()), dir.path(), config()).expect("notifier");

    let mut seq = 0;
    let mut next = |body| {
        seq += 1;
        event(seq, body)
    };
    notifier.publish(&next(queued(&sha))).await.expect("publish");
    notifier.publish(&next(EventBody::BuildStarted { build: "b1".into() })).await.expect("publish");
    for i in 0..30 {
        let step = format!("step{i}");
        let build = BuildId::from("b1");
        notifier
            .publish(&next(EventBody::StepStarted { build: build.clone(), step: step.clone(), attempt: 1 }))
            .await
            .expect("publish");
        let conclusion = if i == 7 { StepConclusion::Failed } else { StepConclusion::Success };
        let detail = "exit code 0".to_owned();
        let body = EventBody::StepFinished { build, step, attempt: 1, conclusion, detail, will_retry: false };
        notifier.publish(&next(body)).await.expect("publish");
    }
    notifier.publish(&next(finished(Conclusion::Failed))).await.expect("publish");
    assert!(notifier.flush(Duration::from_secs(10)).await, "delivered");

    let statuses = fake.statuses("o/r");
    assert!(statuses.len() <= 3, "62 events made {} API calls", statuses.len());
    let last = statuses.last().expect("a status");
    assert_eq!((last.state.as_str(), last.context.as_str()), ("failure", "cib/test"));
    assert_eq!(last.description.as_deref(), Some("failed: 29 passed, 1 failed (step7)"));
    assert_eq!(last.target_url.as_deref(), Some("https://ci.example.com/builds/b1"));
    assert_eq!(std::fs::read_dir(dir.path().join("outbox")).expect("outbox").count(), 0);
    fake.assert_no_violations();
}

#[tokio::test]
async fn a_status_lands_through_a_502_and_a_secondary_rate_limit() {
    let fake = FakeGithub::start().await.expect("fake");
    let sha = fake.commit("o/r", &[], &[("a", "1")], "one");
    fake.inject("repos/create-commit-status", 502, &[], json!({"message": "Bad Gateway"}), Some(1));
    let limited = json!({
        "message": "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
        "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api",
    });
    fake.inject("repos/create-commit-status", 403, &[("retry-after", "1")], limited, Some(1));
    let dir = tempfile::tempdir().expect("tempdir");
    let notifier = GithubNotifier::new(client(fake.url()), dir.path(), config()).expect("notifier");

    let started = Instant::now();
    notifier.publish(&event(1, queued(&sha))).await.expect("publish");
    notifier.publish(&event(2, finished(Conclusion::Success))).await.expect("publish");
    assert!(notifier.flush(Duration::from_secs(20)).await, "delivered");

    let answers: Vec<u16> = fake
        .requests()
        .iter()
        .filter(|r| r.operation.as_deref() == Some("repos/create-commit-status"))
        .map(|r| r.status)
        .collect();
    assert_eq!(answers, vec![502, 403, 201]);
    assert!(started.elapsed() >= Duration::from_secs(1), "Retry-After was honoured");
    let statuses = fake.statuses("o/r");
    assert_eq!(statuses.len(), 1);
    assert_eq!(statuses[0].state, "success");
    fake.assert_no_violations();
}

#[tokio::test]
async fn a_killed_process_delivers_its_final_status_after_restart() {
    let fake = FakeGithub::start().await.expect("fake");
    let sha = fake.commit("o/r", &[], &[("a", "1")], "one");
    // GitHub is down while the first process runs.
    fake.inject("repos/create-commit-status", 502, &[], json!({"message": "Bad Gateway"}), None);
    let dir = tempfile::tempdir().expect("tempdir");
    let stderr = dir.path().join("child.stderr");

    let env = [
        ("CIB_GITHUB_FAKE", fake.url().to_owned()),
        ("CIB_GITHUB_DIR", dir.path().join("data").display().to_string()),
        ("CIB_GITHUB_SHA", sha.clone()),
    ];
    let mut child = crate::child::spawn("notify-then-hang", &env, &stderr);
    let (lines, reader) = crate::child::lines(&mut child);
    let line = lines.recv_timeout(Duration::from_secs(60));
    assert_eq!(
        line.as_deref(),
        Ok("published"),
        "child stderr: {}",
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );
    // Let it fail at least once, then kill it before anything could land.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.count("repos/create-commit-status") == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().expect("kill");
    let _ = child.wait();
    let _ = reader.join();
    assert!(fake.statuses("o/r").is_empty());

    // GitHub is back; a new notifier over the same directory sends what is left.
    fake.clear_faults();
    let notifier = GithubNotifier::new(client(fake.url()), &dir.path().join("data"), config()).expect("notifier");
    assert!(notifier.flush(Duration::from_secs(10)).await, "delivered after restart");
    let statuses = fake.statuses("o/r");
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    assert_eq!((statuses[0].state.as_str(), statuses[0].sha.as_str()), ("success", sha.as_str()));
    fake.assert_no_violations();
}

/// The child's side of the crash test: publish a build to its end, say so, and keep trying to
/// deliver until killed.
pub fn child_main() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set by the parent"));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let dir = std::path::PathBuf::from(var("CIB_GITHUB_DIR"));
        let notifier = GithubNotifier::new(client(&var("CIB_GITHUB_FAKE")), &dir, config()).expect("notifier");
        let sha = var("CIB_GITHUB_SHA");
        notifier.publish(&event(1, queued(&sha))).await.expect("publish");
        notifier.publish(&event(2, EventBody::BuildStarted { build: "b1".into() })).await.expect("publish");
        notifier.publish(&event(3, finished(Conclusion::Success))).await.expect("publish");
        crate::child::report("published");
        tokio::time::sleep(Duration::from_secs(120)).await;
    });
}

#[tokio::test]
async fn up_to_date_statuses_and_command_answers_reach_the_pull_request() {
    let fake = FakeGithub::start().await.expect("fake");
    let sha = fake.commit("o/r", &[], &[("a", "1")], "one");
    let dir = tempfile::tempdir().expect("tempdir");
    let notifier = GithubNotifier::new(client(fake.url()), dir.path(), config()).expect("notifier");
    let behind = EventBody::UpToDate {
        repo: "o/r".into(),
        number: 4,
        commit: sha.clone(),
        base: "master".into(),
        up_to_date: false,
        behind: 2,
    };
    notifier.publish(&event(1, behind)).await.expect("publish");
    let answer = EventBody::CommandAnswered {
        repo: "o/r".into(),
        number: 4,
        text: "cib cannot merge this branch:\n- 0 approving review(s), 1 needed".into(),
    };
    notifier.publish(&event(2, answer)).await.expect("publish");
    assert!(notifier.flush(Duration::from_secs(10)).await, "delivered");
    let statuses = fake.statuses("o/r");
    let last = statuses.last().expect("a status");
    assert_eq!((last.state.as_str(), last.context.as_str()), ("failure", "cib/up-to-date"));
    assert_eq!(last.description.as_deref(), Some("2 commit(s) behind master: rebase before merging"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.comments("o/r").is_empty() {
        assert!(Instant::now() < deadline, "the answer was never posted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let comments = fake.comments("o/r");
    assert_eq!(comments[0].0, 4, "on the pull request");
    assert!(comments[0].1.contains("0 approving review(s), 1 needed"), "{comments:?}");
    fake.assert_no_violations();
}

fn app_client(fake: &FakeGithub) -> GithubClient {
    const KEY: &[u8] = include_bytes!("../fixtures/app/test-app-key.pem");
    const PUBLIC: &[u8] = include_bytes!("../fixtures/app/test-app-key.pub.pem");
    fake.enable_app(42, PUBLIC, 7, Duration::from_secs(3600));
    GithubClient::new(fake.url(), Auth::App { app_id: 42, private_key_pem: KEY.to_vec(), installation_id: None })
        .expect("client")
}

/// An App's check run goes through the same durable outbox as statuses: created through a 502,
/// its id kept on disk, so that a new notifier over the same directory (after a restart)
/// finishes that run in place instead of making another.
#[tokio::test]
async fn a_check_run_is_created_through_a_502_and_finished_in_place_after_a_restart() {
    let fake = FakeGithub::start().await.expect("fake");
    let sha = fake.commit("o/r", &[], &[("a", "1")], "one");
    fake.inject("checks/create", 502, &[], json!({"message": "Bad Gateway"}), Some(1));
    let dir = tempfile::tempdir().expect("tempdir");
    let notifier = GithubNotifier::new(app_client(&fake), dir.path(), config()).expect("notifier");
    notifier.publish(&event(1, queued(&sha))).await.expect("publish");
    let step = EventBody::StepStarted { build: "b1".into(), step: "unit".into(), attempt: 1 };
    notifier.publish(&event(2, step)).await.expect("publish");
    assert!(notifier.flush(Duration::from_secs(20)).await, "delivered");
    assert!(fake.statuses("o/r").is_empty(), "an App reports check runs, not statuses");
    let runs = fake.check_runs("o/r");
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!((runs[0].name.as_str(), runs[0].status.as_str()), ("cib/test", "in_progress"));
    assert_eq!(runs[0].external_id.as_deref(), Some("b1"));
    assert_eq!(runs[0].details_url.as_deref(), Some("https://ci.example.com/builds/b1"));
    drop(notifier);

    let notifier = GithubNotifier::new(app_client(&fake), dir.path(), config()).expect("notifier again");
    let body = EventBody::StepFinished {
        build: "b1".into(),
        step: "unit".into(),
        attempt: 1,
        conclusion: StepConclusion::Success,
        detail: "exit code 0".into(),
        will_retry: false,
    };
    notifier.publish(&event(3, body)).await.expect("publish");
    notifier.publish(&event(4, finished(Conclusion::Neutral))).await.expect("publish");
    assert!(notifier.flush(Duration::from_secs(20)).await, "delivered");
    let runs = fake.check_runs("o/r");
    assert_eq!(runs.len(), 1, "the same run, finished in place: {runs:#?}");
    assert_eq!(runs[0].conclusion.as_deref(), Some("neutral"), "neutral never passes");
    let summary = runs[0].summary.clone().unwrap_or_default();
    assert!(summary.contains("| unit | success (exit code 0) | 1.0s |"), "{summary}");
    let creates: Vec<u16> =
        fake.requests().iter().filter(|r| r.operation.as_deref() == Some("checks/create")).map(|r| r.status).collect();
    assert_eq!(creates, vec![502, 201]);
    assert_eq!(
        std::fs::read_dir(dir.path().join("checks")).expect("checks").count(),
        0,
        "a finished run's id is let go"
    );
    fake.assert_no_violations();
}
