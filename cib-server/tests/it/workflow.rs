//! The master/production workflow end to end on a local Git repository: tests on a branch,
//! review, merge by fast-forward, staging with its unit and manual QA, approvals, promotion by
//! fast-forward and production; and each refusal, explained.

use std::time::{Duration, Instant};

use cib_core::ports::BuildStatus;
use cib_server::config::{PoolFileConfig, Role, UnitConfig};

use super::server::{TestServer, git, token};

const SPEC: &str = r#"
pipelines:
  test:
    on: { push: { branches: ["**"], branches_ignore: [master, production] }, manual: {} }
    steps: [{ name: unit, image: busybox, commands: ["echo tests pass"] }]
  staging:
    on: { push: { branches: [master] } }
    resources: [{ pool: staging-env }]
    steps:
      - { name: deploy, image: busybox, commands: ["echo deploying to $CIB_RESOURCE_STAGING_ENV_0_NAME"] }
      - { name: e2e, image: busybox, commands: ["echo e2e pass"], depends_on: [deploy] }
      - name: manual-qa
        depends_on: [e2e]
        gate: { kind: hold, from: { users: [approve] }, instructions: Click through checkout. }
  production:
    on: { push: { branches: [production] } }
    steps: [{ name: deploy, image: busybox, commands: ["echo deploying to production"] }]
promotion:
  requires:
    pipelines: [staging]
    approvals: { count: 2, from: { users: [approve, admin, carol] }, expires: 1d }
merge:
  requires: { pipelines: [test], reviews: 1 }
"#;

const CAROL: &str = "carol-token-0123456789";

struct Flow {
    s: TestServer,
}

impl Flow {
    async fn post(&self, path: &str, role: Role, body: serde_json::Value) -> (u16, serde_json::Value) {
        let answer = self.s.request("POST", path, Some(&token(role)), body.to_string().as_bytes()).await;
        (answer.status, serde_json::from_str(&answer.body).unwrap_or(serde_json::Value::Null))
    }

    fn rev(&self, what: &str) -> String {
        git(&self.s.repo_path, &["rev-parse", what])
    }

    async fn wait_status(&self, id: &str, status: BuildStatus) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let builds = self.s.wait_builds(|_| true).await;
            if builds.iter().any(|b| b.id.0 == id && b.status == status) {
                return;
            }
            assert!(Instant::now() < deadline, "{id} never reached {status:?}: {builds:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn refusals(&self, path: &str, role: Role, body: serde_json::Value) -> String {
        let (status, answer) = self.post(path, role, body).await;
        assert_eq!(status, 409, "{answer}");
        answer["error"].as_str().expect("a reason").to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_goes_from_a_branch_to_production_by_fast_forwards_only() {
    let pool = PoolFileConfig {
        name: "staging-env".into(),
        units: vec![UnitConfig { name: "stage-1".into(), metadata: Default::default() }],
        capacity: None,
    };
    let s = TestServer::start_configured(SPEC, |c| {
        c.pools = vec![pool];
        c.tokens.push(cib_server::config::TokenConfig {
            name: "carol".into(),
            token: CAROL.into(),
            token_sha256: None,
            role: Role::Approve,
            teams: Vec::new(),
        });
    })
    .await;
    let repo = s.repo_path.clone();
    // master holds the spec; feature/x adds a commit written by `admin`.
    git(&repo, &["branch", "master"]);
    let base = git(&repo, &["rev-parse", "master"]);
    std::fs::write(repo.join("feature.txt"), "new\n").expect("write");
    git(&repo, &["add", "feature.txt"]);
    git(
        &repo,
        &["-c", "user.name=admin", "commit", "-q", "--author", "admin <admin@example.invalid>", "-m", "feature"],
    );
    let flow = Flow { s };
    let head = flow.rev("feature/x");
    let r = "/api/v1/repos/acme/shop";

    // Tests run on the branch.
    let (status, answer) = flow
        .post(
            "/api/v1/builds",
            Role::Trigger,
            serde_json::json!({ "repo": "acme/shop", "ref": "feature/x", "pipeline": "test" }),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    flow.wait_status(answer["build"].as_str().expect("id"), BuildStatus::Success).await;

    // No review yet: refused, with the reason.
    let why = flow.refusals(&format!("{r}/merge"), Role::Trigger, serde_json::json!({ "head": "feature/x" })).await;
    assert_eq!(why, "cib cannot merge this branch:\n- 0 approving review(s), 1 needed");
    assert_eq!(flow.rev("master"), base, "a refused merge moves nothing");
    let (status, _) = flow.post(&format!("{r}/reviews"), Role::Approve, serde_json::json!({ "commit": head })).await;
    assert_eq!(status, 201);

    // Merged by fast-forward: master is the branch's head, and staging runs.
    let (status, merged) =
        flow.post(&format!("{r}/merge"), Role::Trigger, serde_json::json!({ "head": "feature/x" })).await;
    assert_eq!(status, 200, "{merged}");
    assert_eq!(flow.rev("master"), head, "no merge commit: master is the branch's head");
    let staging = merged["builds"][0].as_str().expect("a staging build").to_owned();
    assert!(staging.ends_with("-staging"), "{merged}");

    // A branch made before the merge is now stale.
    git(&repo, &["checkout", "-q", "-b", "late", &base]);
    std::fs::write(repo.join("late.txt"), "late\n").expect("write");
    git(&repo, &["add", "late.txt"]);
    git(&repo, &["commit", "-q", "-m", "late"]);
    let why = flow.refusals(&format!("{r}/merge"), Role::Trigger, serde_json::json!({ "head": "late" })).await;
    assert!(why.contains("the branch is 1 commit(s) behind master: rebase it on master first"), "{why}");
    assert!(why.contains("pipeline 'test' has never run on this commit"), "{why}");

    // Staging waits at manual QA; promotion is refused until it passes and is approved.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = flow
            .post(
                &format!("/api/v1/builds/{staging}/gates/manual-qa/approve"),
                Role::Approve,
                serde_json::json!({ "comment": "checkout works" }),
            )
            .await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the manual QA gate never waited");
        let why = flow.refusals(&format!("{r}/promote"), Role::Trigger, serde_json::json!({ "commit": head })).await;
        assert!(why.contains("pipeline 'staging' has never run on this commit"), "{why}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    flow.wait_status(&staging, BuildStatus::Success).await;

    // Approvals: the author's does not count, nor one for another commit.
    let why = flow.refusals(&format!("{r}/promote"), Role::Trigger, serde_json::json!({ "commit": head })).await;
    assert_eq!(why, "cib cannot promote this commit:\n- 0 valid approval(s), 2 needed");
    for (role, commit) in [(Role::Admin, &head), (Role::Approve, &head), (Role::Trigger, &base)] {
        let (status, answer) =
            flow.post(&format!("{r}/approvals"), role, serde_json::json!({ "commit": commit })).await;
        assert!(status == 201 || (role == Role::Trigger && status == 403), "{role:?}: {status} {answer}");
    }
    let (status, _) = flow.post(&format!("{r}/approvals"), Role::Admin, serde_json::json!({ "commit": base })).await;
    assert_eq!(status, 201);
    let why = flow.refusals(&format!("{r}/promote"), Role::Trigger, serde_json::json!({ "commit": head })).await;
    assert!(why.contains("the approval by admin does not count: the commit's author may not approve it"), "{why}");
    assert!(why.contains("1 valid approval(s), 2 needed"), "{why}");
    assert!(why.contains("it approves another commit"), "{why}");
    assert!(flow.s.request("GET", "/api/v1/builds", Some(&token(Role::Read)), b"").await.body.contains("staging"));

    // Approving twice counts once.
    let (status, _) = flow.post(&format!("{r}/approvals"), Role::Approve, serde_json::json!({ "commit": head })).await;
    assert_eq!(status, 201);
    let why = flow.refusals(&format!("{r}/promote"), Role::Trigger, serde_json::json!({ "commit": head })).await;
    assert!(why.contains("1 valid approval(s), 2 needed"), "the same person twice counts once: {why}");

    // A second allowed approver: promoted by fast-forward, and production deploys.
    let answer = flow
        .s
        .request(
            "POST",
            &format!("{r}/approvals"),
            Some(CAROL),
            serde_json::json!({ "commit": head }).to_string().as_bytes(),
        )
        .await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    let (status, promoted) =
        flow.post(&format!("{r}/promote"), Role::Trigger, serde_json::json!({ "commit": head })).await;
    assert_eq!(status, 200, "{promoted}");
    assert_eq!(flow.rev("production"), head, "production moved to the commit by fast-forward");
    let production = promoted["builds"][0].as_str().expect("a production build").to_owned();
    flow.wait_status(&production, BuildStatus::Success).await;

    // Environments on record: what is where, since when, moved and approved by whom.
    let answer = flow.s.request("GET", &format!("{r}/environments"), Some(&token(Role::Read)), b"").await;
    let envs: serde_json::Value = serde_json::from_str(&answer.body).expect("json");
    let envs = &envs["environments"];
    assert_eq!(envs["staging"]["commit"], head.as_str(), "{envs:#}");
    assert_eq!(envs["production"]["commit"], head.as_str(), "{envs:#}");
    assert_eq!(envs["production"]["approved_by"], serde_json::json!(["approve", "carol"]), "{envs:#}");
    assert_eq!(envs["master"]["by"], "trigger", "{envs:#}");

    // Production moves only by fast-forward: a commit made there by hand blocks the next one.
    git(&repo, &["checkout", "-q", "production"]);
    std::fs::write(repo.join("hotfix.txt"), "by hand\n").expect("write");
    git(&repo, &["add", "hotfix.txt"]);
    git(&repo, &["commit", "-q", "-m", "hotfix by hand"]);
    let why = flow.refusals(&format!("{r}/promote"), Role::Trigger, serde_json::json!({ "commit": head })).await;
    assert_eq!(
        why,
        "cib cannot promote this commit:\n- production has commits this commit does not contain: it cannot move by fast-forward"
    );
}

fn pull_request(action: &str, number: u64, head_branch: &str, head: &str, base_sha: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "action": action,
        "pull_request": {
            "number": number,
            "merged": false,
            "user": { "login": "dev" },
            "base": { "ref": "master", "sha": base_sha, "repo": { "full_name": "acme/shop" } },
            "head": { "ref": head_branch, "sha": head, "repo": { "full_name": "acme/shop" } }
        },
        "repository": { "full_name": "acme/shop" },
        "sender": { "login": "dev" }
    }))
    .expect("json")
}

fn comment(number: u64, body: &str, by: &str) -> Vec<u8> {
    // Every comment GitHub sends has its own id (the same body twice is a replay).
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(100);
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    serde_json::to_vec(&serde_json::json!({
        "action": "created",
        "issue": { "number": number, "pull_request": { "url": "x" } },
        "comment": { "id": id, "body": body },
        "repository": { "full_name": "acme/shop" },
        "sender": { "login": by }
    }))
    .expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_requests_get_an_up_to_date_status_and_are_merged_by_a_comment() {
    let spec = SPEC.replace(
        r#"on: { push: { branches: ["**"], branches_ignore: [master, production] }, manual: {} }"#,
        r#"on: { pull_request: { branches: [master] } }"#,
    );
    let s = TestServer::start_configured(&spec, |c| {
        c.pools = vec![PoolFileConfig { name: "staging-env".into(), units: vec![], capacity: Some(1) }]
    })
    .await;
    let repo = s.repo_path.clone();
    git(&repo, &["branch", "master"]);
    let base = git(&repo, &["rev-parse", "master"]);
    std::fs::write(repo.join("a.txt"), "a\n").expect("write");
    git(&repo, &["add", "a.txt"]);
    git(&repo, &["commit", "-q", "-m", "a"]);
    let head = git(&repo, &["rev-parse", "HEAD"]);
    git(&repo, &["checkout", "-q", "-b", "other", &base]);
    std::fs::write(repo.join("b.txt"), "b\n").expect("write");
    git(&repo, &["add", "b.txt"]);
    git(&repo, &["commit", "-q", "-m", "b"]);
    let other = git(&repo, &["rev-parse", "HEAD"]);
    let flow = Flow { s };
    let hook = |event: &'static str, delivery: String, body: Vec<u8>| {
        let s = &flow.s;
        async move {
            let signature = cib_server::outgoing::sign(super::server::SECRET.as_bytes(), &body);
            let answer = s.hook(event, &delivery, &body, Some(&signature)).await;
            assert_eq!(answer.status, 202, "{}", answer.body);
        }
    };
    hook("pull_request", "pr-7".into(), pull_request("opened", 7, "feature/x", &head, &base)).await;
    hook("pull_request", "pr-8".into(), pull_request("opened", 8, "other", &other, &base)).await;
    let builds = flow.s.wait_builds(|b| b.len() == 2 && b.iter().all(|x| x.status == BuildStatus::Success)).await;
    assert!(builds.iter().all(|b| b.pipeline == "test"), "{builds:#?}");
    let events = |flow: &Flow| {
        let store = flow.s.store.clone();
        async move { cib_core::ports::Store::events_after(&*store, 0, 10_000).await.expect("events") }
    };
    let up_to_date = |events: &[cib_core::event::Event], number: u64| {
        events.iter().rev().find_map(|e| match &e.body {
            cib_core::event::EventBody::UpToDate { number: n, up_to_date, behind, .. } if *n == number => {
                Some((*up_to_date, *behind))
            }
            _ => None,
        })
    };
    let now = events(&flow).await;
    assert_eq!(up_to_date(&now, 7), Some((true, 0)));
    assert_eq!(up_to_date(&now, 8), Some((true, 0)));

    // No review: the comment is answered with the reason, and nothing moves.
    hook("issue_comment", "c-1".into(), comment(7, "/cib merge", "dev")).await;
    let answered = |text: &'static str| {
        let flow = &flow;
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let found = events(flow).await.iter().find_map(|e| match &e.body {
                    cib_core::event::EventBody::CommandAnswered { text: t, .. } if t.contains(text) => Some(t.clone()),
                    _ => None,
                });
                if let Some(t) = found {
                    return t;
                }
                assert!(Instant::now() < deadline, "no answer containing {text:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let answer = answered("approving review").await;
    assert_eq!(answer, "cib cannot merge this branch:\n- 0 approving review(s), 1 needed");
    let (status, _) =
        flow.post("/api/v1/repos/acme/shop/reviews", Role::Approve, serde_json::json!({ "commit": head })).await;
    assert_eq!(status, 201);
    hook("issue_comment", "c-2".into(), comment(7, "Looks good.\n/cib merge", "dev")).await;
    let answer = answered("Merged by fast-forward").await;
    assert_eq!(answer, format!("Merged by fast-forward: master is now {head}."));
    assert_eq!(flow.rev("master"), head);
    // Master moved: the other pull request is re-evaluated and is now behind.
    let deadline = Instant::now() + Duration::from_secs(20);
    while up_to_date(&events(&flow).await, 8) != Some((false, 1)) {
        assert!(Instant::now() < deadline, "PR 8 was not re-evaluated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hook("issue_comment", "c-3".into(), comment(7, "/cib dance", "dev")).await;
    answered("cib knows").await;
}

fn fork_pull_request(action: &str, number: u64, head: &str, base_sha: &str) -> Vec<u8> {
    let mut v: serde_json::Value =
        serde_json::from_slice(&pull_request(action, number, "patch-1", head, base_sha)).expect("json");
    v["pull_request"]["head"]["repo"]["full_name"] = "stranger/shop".into();
    v["pull_request"]["user"]["login"] = "stranger".into();
    serde_json::to_vec(&v).expect("json")
}

const FORK_SPEC: &str = r#"
merge:
  requires: { pipelines: [test] }
pipelines:
  test:
    on: { pull_request: { branches: [master] } }
    steps:
      - { name: plain, image: busybox, commands: ["echo plain"] }
      - { name: with-secret, image: busybox, secrets: [TOKEN], commands: ["echo token=$TOKEN"] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forks_pull_request_gets_no_secrets_until_a_maintainer_approves_its_head() {
    let s = TestServer::start_configured(FORK_SPEC, |c| {
        c.secrets.insert(
            "TOKEN".into(),
            cib_server::config::ConfigSecret::Scoped(cib_server::config::ScopedSecret {
                value: "t0ps3cret".into(),
                repos: vec!["acme/shop".into()],
                branches: Vec::new(),
                pipelines: Vec::new(),
                environments: Vec::new(),
            }),
        );
    })
    .await;
    let repo = s.repo_path.clone();
    git(&repo, &["branch", "master"]);
    let base = git(&repo, &["rev-parse", "master"]);
    let commit_as = |file: &str| {
        std::fs::write(repo.join(file), "x\n").expect("write");
        git(&repo, &["add", file]);
        git(&repo, &["commit", "-q", "-m", file]);
        git(&repo, &["rev-parse", "HEAD"])
    };
    // The fork's own spec adds a step that asks for the secret: no build of it may run.
    std::fs::write(
        repo.join(".cib.yml"),
        format!(
            "{FORK_SPEC}      - {{ name: fork-step, image: busybox, secrets: [TOKEN], commands: [\"echo stolen=$TOKEN\"] }}\n"
        ),
    )
    .expect("write");
    git(&repo, &["add", ".cib.yml"]);
    let first = commit_as("one.txt");
    let flow = Flow { s };
    let hook = |event: &'static str, delivery: &'static str, body: Vec<u8>| {
        let s = &flow.s;
        async move {
            let signature = cib_server::outgoing::sign(super::server::SECRET.as_bytes(), &body);
            assert_eq!(s.hook(event, delivery, &body, Some(&signature)).await.status, 202);
        }
    };
    let events = || {
        let store = flow.s.store.clone();
        async move { cib_core::ports::Store::events_after(&*store, 0, 10_000).await.expect("events") }
    };
    let step_outcome = |events: &[cib_core::event::Event], build_prefix: &str| -> Option<String> {
        events.iter().find_map(|e| match &e.body {
            cib_core::event::EventBody::StepSkipped { build, step, reason }
                if step == "with-secret" && build.0.starts_with(build_prefix) =>
            {
                Some(format!("skipped: {reason}"))
            }
            cib_core::event::EventBody::StepFinished { build, step, conclusion, .. }
                if step == "with-secret" && build.0.starts_with(build_prefix) =>
            {
                Some(format!("{conclusion:?}"))
            }
            _ => None,
        })
    };
    let wait_outcome = |prefix: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(o) = step_outcome(&events().await, prefix) {
                return o;
            }
            assert!(Instant::now() < deadline, "no outcome for {prefix}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    hook("pull_request", "fork-1", fork_pull_request("opened", 3, &first, &base)).await;
    let outcome = wait_outcome("fork-1").await;
    assert_eq!(
        outcome,
        "skipped: a fork's pull request runs no step with secrets until a maintainer approves its head"
    );

    // The build that skipped the secret step is neutral, not a success. It is waited for
    // before the trust, whose build would supersede it.
    let builds = flow
        .s
        .wait_builds(|b| {
            b.iter().any(|x| {
                x.id.0.starts_with("fork-1")
                    && !matches!(x.status, cib_core::ports::BuildStatus::Queued | cib_core::ports::BuildStatus::Running)
            })
        })
        .await;
    let fork_1 = builds.iter().find(|x| x.id.0.starts_with("fork-1")).expect("fork-1");
    assert_eq!(fork_1.status, cib_core::ports::BuildStatus::Neutral, "{fork_1:#?}");

    // The author cannot approve their own; a maintainer can, for this head.
    let trust_first = format!("/cib trust {}", &first[..7]);
    hook("issue_comment", "trust-by-author", comment(3, &trust_first, "stranger")).await;
    hook("issue_comment", "trust-by-maintainer", comment(3, &trust_first, "maintainer")).await;
    let outcome = wait_outcome("trust-3-").await;
    assert_eq!(outcome, "Success");
    let texts: Vec<String> = events()
        .await
        .iter()
        .filter_map(|e| match &e.body {
            cib_core::event::EventBody::CommandAnswered { text, .. } => Some(text.clone()),
            _ => None,
        })
        .collect();
    assert!(texts[0].contains("cannot approve it for secrets"), "{texts:?}");
    assert!(texts[1].starts_with("Approved"), "{texts:?}");
    let short = &first[..12];
    let answer = flow
        .s
        .request(
            "GET",
            &format!("/api/v1/builds/trust-3-{short}-test/steps/with-secret/log"),
            Some(&token(Role::Read)),
            b"",
        )
        .await;
    assert_eq!(answer.body, "token=***\n", "the secret reached the step, masked in its log");

    // A retry of the trusted build runs the base's spec again, never the fork's. The build has
    // finished, so the engine no longer holds it: the spec comes from the store.
    let trusted = format!("trust-3-{short}-test");
    let cancelled =
        flow.s.request("POST", &format!("/api/v1/builds/{trusted}/cancel"), Some(&token(Role::Trigger)), b"").await;
    assert_eq!(cancelled.status, 409, "a finished build cannot be cancelled: {}", cancelled.body);
    let retried =
        flow.s.request("POST", &format!("/api/v1/builds/{trusted}/retry"), Some(&token(Role::Trigger)), b"").await;
    assert_eq!(retried.status, 201, "{}", retried.body);
    let retry_id = serde_json::from_str::<serde_json::Value>(&retried.body).expect("json")["build"]
        .as_str()
        .expect("id")
        .to_owned();
    for id in [&trusted, &retry_id] {
        let record = flow.s.request("GET", &format!("/api/v1/builds/{id}"), Some(&token(Role::Read)), b"").await;
        assert!(record.body.contains("with-secret"), "{}", record.body);
        assert!(!record.body.contains("fork-step"), "{id} ran the fork's spec: {}", record.body);
    }

    // A new push needs a new approval.
    let second = commit_as("two.txt");
    hook("pull_request", "fork-2", fork_pull_request("synchronize", 3, &second, &base)).await;
    let outcome = wait_outcome("fork-2").await;
    assert!(outcome.starts_with("skipped"), "{outcome}");

    // Trusting the old head, which a maintainer read before the push, trusts nothing; and a
    // trust without a commit is refused too.
    hook("issue_comment", "trust-old", comment(3, &trust_first, "maintainer")).await;
    hook("issue_comment", "trust-bare", comment(3, "/cib trust", "maintainer")).await;
    // The head's build was neutral: it does not satisfy the required `test` for a merge.
    hook("issue_comment", "merge-neutral", comment(3, "/cib merge", "maintainer")).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let texts = loop {
        let texts: Vec<String> = events()
            .await
            .iter()
            .filter_map(|e| match &e.body {
                cib_core::event::EventBody::CommandAnswered { text, .. } => Some(text.clone()),
                _ => None,
            })
            .collect();
        if texts.len() >= 5 {
            break texts;
        }
        assert!(Instant::now() < deadline, "no answers: {texts:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(texts[2].starts_with("Not trusted") && texts[2].contains(&second[..12]), "{texts:?}");
    assert!(texts[3].contains("Name the commit"), "{texts:?}");
    assert!(texts[4].starts_with("cib cannot merge") && texts[4].contains("test"), "{texts:?}");
    let builds = flow.s.wait_builds(|_| true).await;
    assert!(
        !builds.iter().any(|b| b.id.0.starts_with("trust-3-") && b.id.0.contains(&second[..12])),
        "no build trusted the new head: {builds:#?}"
    );
}

/// Branch names come from the spec: `main` and `release` here, with the default pipelines'
/// triggers, merge, promotion and the environments all following them.
const NAMED_BRANCHES: &str = r#"
pipelines:
  test:
    on: { manual: {} }
    steps: [{ name: unit, image: busybox, commands: ["echo tests pass"] }]
  staging:
    steps: [{ name: deploy, image: busybox, commands: ["echo staging"] }]
  production:
    steps: [{ name: deploy, image: busybox, commands: ["echo production"] }]
promotion:
  from: main
  to: release
  requires: { pipelines: [staging] }
merge:
  requires: { pipelines: [test] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_that_names_its_branches_merges_and_promotes_on_them() {
    let executor = cib_core::testing::FakeExecutor::new();
    let s = TestServer::start_full(NAMED_BRANCHES, |_| {}, cib_store::SqliteOptions::default(), executor.clone(), &[])
        .await;
    let repo = s.repo_path.clone();
    git(&repo, &["branch", "main"]);
    let base = git(&repo, &["rev-parse", "main"]);
    std::fs::write(repo.join("feature.txt"), "new\n").expect("write");
    git(&repo, &["add", "feature.txt"]);
    git(&repo, &["commit", "-q", "-m", "feature"]);
    let flow = Flow { s };
    let head = flow.rev("feature/x");
    let r = "/api/v1/repos/acme/shop";

    let (status, answer) = flow
        .post(
            "/api/v1/builds",
            Role::Trigger,
            serde_json::json!({ "repo": "acme/shop", "ref": "feature/x", "pipeline": "test" }),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    flow.wait_status(answer["build"].as_str().expect("id"), BuildStatus::Success).await;

    // The merge goes into main, which the spec names, and main's default staging runs.
    let (status, merged) =
        flow.post(&format!("{r}/merge"), Role::Trigger, serde_json::json!({ "head": "feature/x" })).await;
    assert_eq!(status, 200, "{merged}");
    assert_eq!(merged["into"], "main", "{merged}");
    assert_eq!(flow.rev("main"), head, "main moved by fast-forward");
    assert!(git(&repo, &["branch", "--list", "master"]).is_empty(), "no master branch was made or needed");
    let staging = merged["builds"][0].as_str().expect("a staging build").to_owned();
    assert!(staging.ends_with("-staging"), "{merged}");
    flow.wait_status(&staging, BuildStatus::Success).await;

    // Promotion goes from main to release, and starts release's production pipeline as a
    // promotion.
    let (status, promoted) =
        flow.post(&format!("{r}/promote"), Role::Trigger, serde_json::json!({ "commit": head })).await;
    assert_eq!(status, 200, "{promoted}");
    assert_eq!(promoted["to"], "release", "{promoted}");
    assert_eq!(flow.rev("release"), head, "release moved to the commit");
    assert_ne!(flow.rev("release"), base);
    let production = promoted["builds"][0].as_str().expect("a production build").to_owned();
    assert!(production.ends_with("-production"), "{promoted}");
    flow.wait_status(&production, BuildStatus::Success).await;
    let runs = executor.runs();
    let deploy =
        runs.iter().find(|j| j.build.0 == production).unwrap_or_else(|| panic!("the production step ran: {runs:#?}"));
    assert_eq!(deploy.env.get("CIB_EVENT").map(String::as_str), Some("promotion"), "{deploy:#?}");
    assert_eq!(deploy.env.get("CIB_BRANCH").map(String::as_str), Some("release"), "{deploy:#?}");
    let staged = runs.iter().find(|j| j.build.0 == staging).expect("the staging step ran");
    assert_eq!(staged.env.get("CIB_EVENT").map(String::as_str), Some("push"));

    // The environments on record are the spec's branches.
    let answer = flow.s.request("GET", &format!("{r}/environments"), Some(&token(Role::Read)), b"").await;
    let envs: serde_json::Value = serde_json::from_str(&answer.body).expect("json");
    assert_eq!(envs["environments"]["release"]["commit"], head.as_str(), "{envs:#}");
    assert_eq!(envs["environments"]["main"]["commit"], head.as_str(), "{envs:#}");
    assert!(envs["environments"].get("master").is_none(), "{envs:#}");
}

/// A spec whose one step keeps `deps/` in a cache under `key`, and prints who filled it.
fn cache_spec(key: &str) -> String {
    format!(
        r#"
pipelines:
  test:
    on: {{ pull_request: {{ branches: [master] }}, manual: {{}} }}
    steps:
      - name: deps
        image: busybox
        cache: [{{ key: "{key}", paths: [deps], restore_keys: ["{key}"] }}]
        commands:
          - 'if [ -f deps/who ]; then echo "found $(cat deps/who)"; else mkdir -p deps; echo "$CIB_BUILD" > deps/who; echo fresh; fi'
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forks_pull_request_writes_its_own_cache_and_a_trusted_build_never_sees_it() {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let instance = format!("cib-fork-cache-{}-{n}", std::process::id());
    // A key of this run alone: caches belong to the repository, and outlive the server.
    let key = format!("deps-{}-{n}", std::process::id());
    let executor = cib_docker::DockerExecutor::connect(cib_docker::DockerOptions::new(instance.clone()))
        .await
        .expect("a Docker daemon answers (scripts/ensure-docker starts one)");
    let s = TestServer::start_full(
        &cache_spec(&key),
        |c| c.instance = instance.clone(),
        cib_store::SqliteOptions::default(),
        std::sync::Arc::new(executor),
        &[],
    )
    .await;
    let repo = s.repo_path.clone();
    git(&repo, &["branch", "master"]);
    let base = git(&repo, &["rev-parse", "master"]);
    std::fs::write(repo.join("patch.txt"), "x\n").expect("write");
    git(&repo, &["add", "patch.txt"]);
    git(&repo, &["commit", "-q", "-m", "a fork's patch"]);
    let head = git(&repo, &["rev-parse", "HEAD"]);
    let flow = &Flow { s };
    let log = move |id: String| {
        let s = &flow.s;
        async move {
            let answer =
                s.request("GET", &format!("/api/v1/builds/{id}/steps/deps/log"), Some(&token(Role::Read)), b"").await;
            assert_eq!(answer.status, 200, "{}", answer.body);
            answer.body
        }
    };

    // The fork's pull request builds first and saves a cache under the very key trusted
    // builds use.
    let body = fork_pull_request("opened", 3, &head, &base);
    let signature = cib_server::outgoing::sign(super::server::SECRET.as_bytes(), &body);
    assert_eq!(flow.s.hook("pull_request", "fork-cache-1", &body, Some(&signature)).await.status, 202);
    let builds =
        flow.s.wait_builds(|b| b.iter().any(|x| x.id.0.starts_with("fork-cache-1") && x.status.is_finished())).await;
    let fork = builds.iter().find(|x| x.id.0.starts_with("fork-cache-1")).expect("the fork's build");
    let said = log(fork.id.0.clone()).await;
    assert!(said.contains("fresh"), "{said}");
    let answer = flow.s.request("GET", "/api/v1/caches/acme/shop", Some(&token(Role::Read)), b"").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let listed: serde_json::Value = serde_json::from_str(&answer.body).expect("json");
    let namespaces: Vec<&str> = listed["caches"]
        .as_array()
        .expect("caches")
        .iter()
        .filter(|c| c["key"] == key.as_str())
        .filter_map(|c| c["namespace"].as_str())
        .collect();
    assert_eq!(namespaces, ["fork-pr-3"], "the fork wrote its own namespace only: {listed}");

    // A trusted build of the base branch never sees the fork's file: it starts fresh, and
    // saves the shared cache, which the next trusted build finds.
    let trusted = move |n: u32| {
        let s = &flow.s;
        async move {
            let body = serde_json::json!({ "repo": "acme/shop", "ref": "master", "pipeline": "test" });
            let answer =
                s.request("POST", "/api/v1/builds", Some(&token(Role::Trigger)), body.to_string().as_bytes()).await;
            assert_eq!(answer.status, 201, "{n}: {}", answer.body);
            let id = serde_json::from_str::<serde_json::Value>(&answer.body).expect("json")["build"]
                .as_str()
                .expect("id")
                .to_owned();
            flow.wait_status(&id, BuildStatus::Success).await;
            id
        }
    };
    let first = trusted(1).await;
    let said = log(first.clone()).await;
    assert!(said.contains("fresh") && !said.contains(&fork.id.0), "{said}");
    let second = trusted(2).await;
    let said = log(second).await;
    assert!(said.contains(&format!("found {first}")), "the shared cache is the trusted build's: {said}");

    let answer =
        flow.s.request("DELETE", &format!("/api/v1/caches/acme/shop/{key}"), Some(&token(Role::Admin)), b"").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
}
