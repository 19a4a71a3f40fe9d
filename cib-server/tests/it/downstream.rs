//! Downstream repositories end to end, on Docker with two local repositories on one server:
//! `acme/shop` (the API) and `acme/client`, whose `test` pipeline watches the API's master. A
//! push to the API's master runs the client's pipeline with `UPSTREAM_COMMIT`; its failure is
//! reported on the API's commit and holds the API's promotion, with the reason; after a fix in
//! the client and a re-run, the promotion goes through.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cib_core::event::{BuildId, EventBody};
use cib_core::ports::{BuildStatus, Store};
use cib_core::workflow::DownstreamState;
use cib_server::config::{RepoConfig, Role};

use super::server::{GIT_SECRET, TestServer, git, token};

const API: &str = r#"
pipelines:
  test:
    on: { push: { branches: [master] } }
    steps: [{ name: unit, image: busybox, commands: ["echo the api passes its own tests"] }]
promotion:
  requires: { downstream: [acme/client] }
"#;

const CLIENT: &str = r#"
pipelines:
  test:
    on: { upstream: { repo: acme/shop, branch: master } }
    steps:
      - name: against-api
        image: busybox
        commands:
          - echo "testing the client against $UPSTREAM_REPO at $UPSTREAM_COMMIT"
          - test -f fixed
"#;

async fn finished(s: &TestServer, id: &str) -> BuildStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let record = s.store.build(&BuildId(id.to_owned())).await.expect("store");
        if let Some(r) = &record
            && r.build.status.is_finished()
        {
            return r.build.status;
        }
        assert!(Instant::now() < deadline, "build {id} did not finish: {record:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn log(s: &TestServer, id: &str, step: &str) -> String {
    let answer =
        s.request("GET", &format!("/api/v1/builds/{id}/steps/{step}/log"), Some(&token(Role::Read)), b"").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.body
}

async fn post(s: &TestServer, path: &str, role: Role, body: serde_json::Value) -> (u16, serde_json::Value) {
    let answer = s.request("POST", path, Some(&token(role)), body.to_string().as_bytes()).await;
    (answer.status, serde_json::from_str(&answer.body).unwrap_or(serde_json::Value::Null))
}

async fn downstream_of(s: &TestServer, commit: &str) -> serde_json::Value {
    let path = format!("/api/v1/repos/acme/shop/commits/{commit}/downstream");
    let answer = s.request("GET", &path, Some(&token(Role::Read)), b"").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    serde_json::from_str(&answer.body).expect("json")
}

/// A push of `branch` at `commit` of `acme/shop`, as a plain Git server's hook sends it.
async fn push(s: &TestServer, delivery: &str, branch: &str, commit: &str) {
    let body = serde_json::to_vec(&serde_json::json!({
        "repo": "acme/shop",
        "ref": format!("refs/heads/{branch}"),
        "before": "0000000000000000000000000000000000000000",
        "after": commit,
        "pusher": "alice",
    }))
    .expect("json");
    let req = http::Request::post(format!("{}/hooks/git", s.url))
        .header("content-type", "application/json")
        .header("x-cib-delivery", delivery)
        .header("x-cib-signature-256", cib_server::outgoing::sign(GIT_SECRET.as_bytes(), &body))
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .expect("request");
    let response = s.client.request(req).await.expect("response");
    assert_eq!(response.status().as_u16(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_downstream_client_holds_the_api_promotion_until_a_fix_passes() {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let instance =
        format!("cib-downstream-{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let executor = cib_docker::DockerExecutor::connect(cib_docker::DockerOptions::new(instance.clone()))
        .await
        .expect("a Docker daemon answers (scripts/ensure-docker starts one)");
    let notifier = cib_core::testing::RecordingNotifier::new();
    let s = TestServer::start_notifying(
        API,
        |c| {
            c.instance = instance.clone();
            // Both repositories are served by this server.
            let client = c.data_dir.parent().expect("the test's directory").join("client");
            c.repos.push(RepoConfig { name: "acme/client".into(), path: client, webhook_secret: None });
        },
        cib_store::SqliteOptions::default(),
        Arc::new(executor),
        &[("client", CLIENT)],
        None,
        vec![notifier.clone()],
    )
    .await;
    // Each repository's master is its default branch and holds its spec.
    let client = s.data_dir.parent().expect("the test's directory").join("client");
    git(&client, &["checkout", "-q", "-b", "master"]);
    git(&s.repo_path, &["checkout", "-q", "-b", "master"]);
    git(&s.repo_path, &["branch", "production"]);
    std::fs::write(s.repo_path.join("api.txt"), "v2\n").expect("write");
    git(&s.repo_path, &["add", "api.txt"]);
    git(&s.repo_path, &["commit", "-q", "-m", "the api changes"]);
    let api = git(&s.repo_path, &["rev-parse", "HEAD"]);
    let client_tip = git(&client, &["rev-parse", "HEAD"]);

    // Before anything ran against it, the promotion is refused for want of a result.
    let (status, answer) =
        post(&s, "/api/v1/repos/acme/shop/promote", Role::Trigger, serde_json::json!({ "commit": api })).await;
    assert_eq!(status, 409, "{answer}");
    let reason = answer["error"].as_str().expect("a reason");
    assert!(reason.contains("acme/client has no downstream result"), "{reason}");

    // A push to the API's master runs the client's pipeline against that commit.
    push(&s, "push-api-1", "master", &api).await;
    let first = cib_server::downstream::build_id(&api, "acme/client", "test").0;
    assert_eq!(finished(&s, &first).await, BuildStatus::Failed);
    let record = s.store.build(&BuildId(first.clone())).await.expect("store").expect("the build");
    assert_eq!(record.build.repo, "acme/client");
    assert_eq!(record.build.commit, client_tip, "it ran at the client's default branch tip");
    let said = log(&s, &first, "against-api").await;
    assert!(said.contains(&format!("testing the client against acme/shop at {api}")), "{said}");

    // The failure shows on the API's commit, under its status name.
    let seen = downstream_of(&s, &api).await;
    assert_eq!(seen["commit"], api.as_str());
    assert_eq!(seen["downstream"][0]["context"], "cib/downstream/acme/client/test");
    assert_eq!(seen["downstream"][0]["state"], "failed");
    assert_eq!(seen["downstream"][0]["build"], first.as_str());
    let reported = notifier
        .wait_for(Duration::from_secs(10), |e| {
            matches!(&e.body, EventBody::DownstreamReported { upstream_commit, state: DownstreamState::Failed, .. } if *upstream_commit == api)
        })
        .await;
    assert!(reported.is_some(), "the notifiers heard of the failure on the upstream commit");
    assert_eq!(downstream_of(&s, "production").await["downstream"], serde_json::json!([]), "another commit has none");

    // The promotion of that commit is refused, with the reason.
    let (status, answer) =
        post(&s, "/api/v1/repos/acme/shop/promote", Role::Trigger, serde_json::json!({ "commit": api })).await;
    assert_eq!(status, 409, "{answer}");
    let reason = answer["error"].as_str().expect("a reason");
    assert!(reason.contains(&format!("acme/client's test pipeline failed on this commit: build {first}")), "{reason}");

    // The client is fixed, and its pipeline re-run: at the new tip, against the same commit.
    std::fs::write(client.join("fixed"), "yes\n").expect("write");
    git(&client, &["add", "fixed"]);
    git(&client, &["commit", "-q", "-m", "the fix"]);
    let fixed_tip = git(&client, &["rev-parse", "HEAD"]);
    let (status, answer) =
        post(&s, &format!("/api/v1/builds/{first}/retry"), Role::Trigger, serde_json::json!({})).await;
    assert_eq!(status, 201, "{answer}");
    let second = answer["build"].as_str().expect("a build").to_owned();
    assert_eq!(finished(&s, &second).await, BuildStatus::Success, "{}", log(&s, &second, "against-api").await);
    let record = s.store.build(&BuildId(second.clone())).await.expect("store").expect("the build");
    assert_eq!(record.build.commit, fixed_tip);
    assert!(log(&s, &second, "against-api").await.contains(&format!("at {api}")));
    assert_eq!(downstream_of(&s, &api).await["downstream"][0]["state"], "success");

    let (status, answer) =
        post(&s, "/api/v1/repos/acme/shop/promote", Role::Trigger, serde_json::json!({ "commit": api })).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(git(&s.repo_path, &["rev-parse", "production"]), api);
}
