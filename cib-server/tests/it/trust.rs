//! Trust boundaries on the real server (SQLite, local Git): the secret store through the API
//! and `cib secret`, scopes checked inside real containers, manual triggers, and decisions
//! counted per person.

use std::sync::Arc;

use cib_core::ports::BuildStatus;
use cib_server::config::{Role, TokenConfig};
use sha2::{Digest, Sha256};

use super::server::{TestServer, git, token};

const SHOP_VALUE: &str = "shop-token-4d1f9a7c";
const DEPLOY_VALUE: &str = "deploy-key-88e2b0aa";

/// Every file under the data directory, as bytes.
fn data_bytes(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("data dir").flatten() {
        let path = entry.path();
        if path.is_file() {
            out.push((path.display().to_string(), std::fs::read(&path).expect("read")));
        }
    }
    out
}

fn holds(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

async fn trigger(s: &TestServer, who: &str, body: serde_json::Value) -> super::server::Answer {
    s.request("POST", "/api/v1/builds", Some(who), &serde_json::to_vec(&body).expect("json")).await
}

/// Waits for a build to finish; returns its status.
async fn finished(s: &TestServer, id: &str) -> BuildStatus {
    let b = s
        .wait_builds(|b| {
            b.iter().any(|x| x.id.0 == id && !matches!(x.status, BuildStatus::Queued | BuildStatus::Running))
        })
        .await;
    b.into_iter().find(|x| x.id.0 == id).map(|x| x.status).expect("the build")
}

async fn log(s: &TestServer, build: &str, step: &str) -> String {
    s.request("GET", &format!("/api/v1/builds/{build}/steps/{step}/log"), Some(&token(Role::Read)), b"").await.body
}

const SECRET_SPEC: &str = r#"
pipelines:
  test:
    on: { manual: {} }
    steps:
      - { name: use, image: busybox, secrets: [TOKEN], commands: ["echo token=$TOKEN"] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_set_listed_rekeyed_and_removed_by_admins_only_and_never_shown() {
    let s = TestServer::start(SECRET_SPEC).await;
    let admin = token(Role::Admin);
    let put = |who: String, value: &'static str| {
        let s = &s;
        async move {
            let body = serde_json::json!({ "value": value });
            s.request("PUT", "/api/v1/secrets/acme/shop/TOKEN", Some(&who), &serde_json::to_vec(&body).expect("json"))
                .await
        }
    };
    assert_eq!(put(token(Role::Approve), SHOP_VALUE).await.status, 403, "approvers may not set secrets");
    let short = put(admin.clone(), "12345").await;
    assert_eq!(short.status, 422, "{}", short.body);
    assert!(short.body.contains("cannot be masked safely"), "{}", short.body);
    let set = put(admin.clone(), SHOP_VALUE).await;
    assert_eq!(set.status, 200, "{}", set.body);
    assert!(!set.body.contains(SHOP_VALUE), "{}", set.body);

    let listed = s.request("GET", "/api/v1/secrets?repo=acme/shop", Some(&admin), b"").await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    let v = json(&listed.body);
    assert_eq!(v["secrets"][0]["name"], "TOKEN", "{v}");
    assert_eq!(v["secrets"][0]["set_by"], "admin", "{v}");
    assert!(!listed.body.contains(SHOP_VALUE));
    assert_eq!(s.request("GET", "/api/v1/secrets", Some(&token(Role::Approve)), b"").await.status, 403);

    let run = |n: u32| {
        let s = &s;
        async move {
            let answer = trigger(
                s,
                &token(Role::Trigger),
                serde_json::json!({ "repo": "acme/shop", "ref": "feature/x", "pipeline": "test" }),
            )
            .await;
            assert_eq!(answer.status, 201, "run {n}: {}", answer.body);
            let id = json(&answer.body)["build"].as_str().expect("id").to_owned();
            finished(s, &id).await;
            log(s, &id, "use").await
        }
    };
    assert_eq!(run(1).await, "token=***\n", "the step got the value, masked in its log");

    // The key file changes and every value still opens.
    let key_file = s.data_dir.join("secret.key");
    let before = std::fs::read(&key_file).expect("the key file was made on start");
    let rekeyed = s.request("POST", "/api/v1/secrets/rekey", Some(&admin), b"").await;
    assert_eq!(rekeyed.status, 200, "{}", rekeyed.body);
    assert_eq!(json(&rekeyed.body)["resealed"], 1);
    assert_ne!(std::fs::read(&key_file).expect("key file"), before);
    assert_eq!(run(2).await, "token=***\n", "the value opens under the new key");

    for (file, bytes) in data_bytes(&s.data_dir) {
        assert!(!holds(&bytes, SHOP_VALUE), "{file} holds the secret in plain text");
    }

    let path = "/api/v1/secrets/acme/shop/TOKEN";
    assert_eq!(s.request("DELETE", path, Some(&admin), b"").await.status, 200);
    assert_eq!(s.request("DELETE", path, Some(&admin), b"").await.status, 404);
    let without = run(3).await;
    assert!(without.contains("cib: secret 'TOKEN' is withheld: no secret of that name is stored"), "{without}");
    assert!(without.ends_with("token=\n"), "{without}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cib_secret_sets_from_standard_input_and_the_database_holds_no_plaintext() {
    let s = TestServer::start(SECRET_SPEC).await;
    let cib = |args: &[&str], input: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cib"))
            .args(args)
            .args(["--server", &s.url, "--token", &token(Role::Admin)])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("cib runs");
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write");
        child.wait_with_output().expect("cib ends")
    };
    let out = tokio::task::block_in_place(|| {
        cib(&["secret", "set", "acme/shop", "DEPLOY_KEY", "--branch", "production"], &format!("{DEPLOY_VALUE}\n"))
    });
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let out = tokio::task::block_in_place(|| cib(&["secret", "list", "acme/shop", "--json"], ""));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!listed.contains(DEPLOY_VALUE));
    let v = json(&listed);
    assert_eq!(v["secrets"][0]["name"], "DEPLOY_KEY", "{listed}");
    assert_eq!(v["secrets"][0]["branches"][0], "production", "{listed}");
    let out = tokio::task::block_in_place(|| cib(&["secret", "set", "acme/shop", "TINY"], "12345"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be masked safely"));
    for (file, bytes) in data_bytes(&s.data_dir) {
        assert!(!holds(&bytes, DEPLOY_VALUE), "{file} holds the secret in plain text");
    }
    let out = tokio::task::block_in_place(|| cib(&["secret", "rekey"], ""));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("1 secrets sealed under the new key in "));
    let out = tokio::task::block_in_place(|| cib(&["secret", "rm", "acme/shop", "DEPLOY_KEY"], ""));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let out = tokio::task::block_in_place(|| cib(&["secret", "list", "acme/shop"], ""));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "nothing is left");
}

const TRIGGER_SPEC: &str = r#"
pipelines:
  test:
    on: { push: {} }
    steps: [{ name: unit, image: busybox, commands: ["echo unit"] }]
  release:
    on: { manual: {} }
    env: { PATH: /usr/bin }
    inputs:
      version: { type: string, required: true }
      dry_run: { type: bool, default: false }
    steps: [{ name: show, image: busybox, commands: ["echo v=$INPUT_VERSION dry=$INPUT_DRY_RUN path=$PATH"] }]
  production:
    on: { manual: {} }
    steps: [{ name: deploy, image: busybox, commands: ["echo deploying"] }]
promotion:
  requires:
    approvals: { count: 1 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trigger_api_starts_only_manual_pipelines_with_declared_inputs_on_own_commits() {
    let s = TestServer::start(TRIGGER_SPEC).await;
    let repo = s.repo_path.clone();
    git(&repo, &["branch", "master"]);
    let t = token(Role::Trigger);
    let refused = |body: serde_json::Value, expect: &'static str, status: u16| {
        let s = &s;
        let t = t.clone();
        async move {
            let answer = trigger(s, &t, body.clone()).await;
            assert_eq!(answer.status, status, "{body}: {}", answer.body);
            assert!(answer.body.contains(expect), "{body}: {}", answer.body);
        }
    };
    let base = serde_json::json!({ "repo": "acme/shop", "ref": "feature/x" });
    let with = |extra: serde_json::Value| {
        let mut b = base.clone();
        for (k, v) in extra.as_object().expect("object") {
            b[k] = v.clone();
        }
        b
    };
    refused(with(serde_json::json!({ "pipeline": "test" })), "has no 'manual' trigger", 422).await;
    refused(
        with(serde_json::json!({ "pipeline": "release", "event": "push", "variables": { "version": "1" } })),
        "not 'push'",
        422,
    )
    .await;
    refused(
        with(serde_json::json!({ "pipeline": "release", "variables": { "version": "1", "PATH": "/evil" } })),
        "'PATH' is not an input of this pipeline; its inputs are",
        422,
    )
    .await;
    refused(
        with(serde_json::json!({ "pipeline": "release", "variables": { "version": "1", "dry_run": "maybe" } })),
        "input 'dry_run'",
        422,
    )
    .await;
    // A deploy pipeline answers to the promotion rules: nobody approved this commit.
    refused(with(serde_json::json!({ "pipeline": "production" })), "approval", 409).await;

    // A fork's head: a commit the repository holds only under a pull request's ref.
    git(&repo, &["checkout", "-q", "--detach"]);
    std::fs::write(repo.join("fork.txt"), "from a fork\n").expect("write");
    git(&repo, &["add", "fork.txt"]);
    git(&repo, &["commit", "-q", "-m", "fork"]);
    let fork = git(&repo, &["rev-parse", "HEAD"]);
    git(&repo, &["update-ref", "refs/pull/3/head", &fork]);
    git(&repo, &["checkout", "-q", "feature/x"]);
    for reference in [fork.clone(), fork[..7].to_owned()] {
        refused(
            serde_json::json!({ "repo": "acme/shop", "ref": reference, "pipeline": "release", "variables": { "version": "1" } }),
            "on no branch of acme/shop",
            422,
        )
        .await;
    }

    // Declared inputs reach the step as INPUT_*, and the spec's own PATH stays.
    let answer =
        trigger(&s, &t, with(serde_json::json!({ "pipeline": "release", "variables": { "version": "1.2" } }))).await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    let id = json(&answer.body)["build"].as_str().expect("id").to_owned();
    assert_eq!(finished(&s, &id).await, BuildStatus::Success);
    assert_eq!(log(&s, &id, "show").await, "v=1.2 dry=false path=/usr/bin\n");
}

const GATE_SPEC: &str = r#"
pipelines:
  release:
    on: { manual: {} }
    steps:
      - { name: build, image: busybox, commands: ["echo built"] }
      - name: sign-off
        depends_on: [build]
        gate: { kind: approval, approvals: 2 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_count_per_person_and_the_person_who_started_a_build_cannot_approve_it() {
    const CAROL_A: &str = "carol-token-a-0123456789";
    const CAROL_B: &str = "carol-token-b-0123456789";
    let s = TestServer::start_configured(GATE_SPEC, |c| {
        for (name, token) in [("carol-laptop", CAROL_A), ("carol-ci", CAROL_B)] {
            c.tokens.push(TokenConfig {
                name: name.into(),
                token: token.into(),
                token_sha256: None,
                role: Role::Approve,
                teams: Vec::new(),
            });
        }
        c.people = vec![cib_core::policy::Person {
            name: "carol".into(),
            github: None,
            tokens: vec!["carol-laptop".into(), "carol-ci".into()],
            slack: None,
            zulip: None,
            teams: Vec::new(),
        }];
    })
    .await;
    let start = |who: &'static str| {
        let s = &s;
        async move {
            let body = serde_json::json!({ "repo": "acme/shop", "ref": "feature/x", "pipeline": "release" });
            let answer = trigger(s, who, body).await;
            assert_eq!(answer.status, 201, "{}", answer.body);
            let id = json(&answer.body)["build"].as_str().expect("id").to_owned();
            // The gate waits once the build step is done.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            loop {
                let record = s.request("GET", &format!("/api/v1/builds/{id}"), Some(&token(Role::Read)), b"").await;
                if record.body.contains("\"waiting\"") {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "the gate never waited: {}", record.body);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            id
        }
    };
    let approve = |id: String, who: &'static str| {
        let s = &s;
        async move { s.request("POST", &format!("/api/v1/builds/{id}/gates/sign-off/approve"), Some(who), b"").await }
    };

    // Carol started it with one token; her other token is still Carol.
    let hers = start(CAROL_A).await;
    let answer = approve(hers.clone(), CAROL_B).await;
    assert_eq!(answer.status, 409, "{}", answer.body);
    assert!(answer.body.contains("started"), "{}", answer.body);

    // On someone else's build, her two tokens give one approval.
    let theirs = start(super::server::token(Role::Trigger).leak()).await;
    let first = approve(theirs.clone(), CAROL_A).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(json(&first.body)["count"], 1);
    let second = approve(theirs.clone(), CAROL_B).await;
    assert_eq!(second.status, 409, "{}", second.body);
    let other = approve(theirs.clone(), token(Role::Approve).leak()).await;
    assert_eq!(json(&other.body)["count"], 2, "{}", other.body);
    assert_eq!(finished(&s, &theirs).await, BuildStatus::Success);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashed_tokens_are_accepted_and_their_plain_text_need_not_be_configured() {
    const PLAIN: &str = "hashed-token-0123456789abcdef";
    let digest = hex::encode(Sha256::digest(PLAIN.as_bytes()));
    let s = TestServer::start_configured(SECRET_SPEC, |c| {
        c.tokens.push(TokenConfig {
            name: "robot".into(),
            token: String::new(),
            token_sha256: Some(digest.clone()),
            role: Role::Read,
            teams: Vec::new(),
        });
    })
    .await;
    assert_eq!(s.request("GET", "/api/v1/builds", Some(PLAIN), b"").await.status, 200);
    assert_eq!(s.request("GET", "/api/v1/builds", Some(&digest), b"").await.status, 401, "the digest is no token");
    // Debug of the configuration shows no token, digest or secret.
    let config = cib_server::config::ServerConfig::parse(&format!(
        "[[tokens]]\nname = \"a\"\ntoken = \"{PLAIN}\"\nrole = \"read\"\n\n[[tokens]]\nname = \"b\"\ntoken_sha256 = \"{digest}\"\nrole = \"read\"\n\n[github]\nwebhook_secret = \"{SHOP_VALUE}\"\n\n[secrets.TOKEN]\nvalue = \"{DEPLOY_VALUE}\"\nrepos = [\"acme/shop\"]\n"
    ))
    .expect("config");
    let shown = format!("{config:?}");
    for hidden in [PLAIN, digest.as_str(), SHOP_VALUE, DEPLOY_VALUE] {
        assert!(!shown.contains(hidden), "Debug shows {hidden}: {shown}");
    }
    let key = "cd".repeat(32);
    let env: std::collections::BTreeMap<String, String> = [("CIB_SECRET_KEY".to_owned(), key.clone())].into();
    let config = cib_server::config::ServerConfig::load(None, &env).expect("config");
    assert_eq!(config.secret_key.as_ref().map(|k| k.0.as_str()), Some(key.as_str()));
    assert!(!format!("{config:?}").contains(&key), "Debug shows the key");
}

#[test]
fn flat_secrets_in_the_configuration_are_refused_with_the_shape_to_use() {
    let env = std::collections::BTreeMap::new();
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("cib.toml");
    std::fs::write(&path, format!("[secrets]\nTOKEN = \"{SHOP_VALUE}\"\n")).expect("write");
    let err = cib_server::config::ServerConfig::load(Some(&path), &env).expect_err("refused");
    assert!(err.contains("[secrets.TOKEN]") && err.contains("repos"), "{err}");
    std::fs::write(&path, format!("[secrets.TOKEN]\nvalue = \"{SHOP_VALUE}\"\n")).expect("write");
    let err = cib_server::config::ServerConfig::load(Some(&path), &env).expect_err("refused");
    assert!(err.contains("needs repos"), "{err}");
    std::fs::write(&path, format!("[secrets.TOKEN]\nvalue = \"{SHOP_VALUE}\"\nrepos = [\"acme/shop\"]\n"))
        .expect("write");
    assert!(cib_server::config::ServerConfig::load(Some(&path), &env).is_ok());
}

// ---- inside real containers --------------------------------------------------------------------

const LOOK: &str = r#"
pipelines:
  test:
    on: { manual: {} }
    steps:
      - name: look
        image: busybox
        secrets: [SHOP_TOKEN, DEPLOY_KEY]
        commands: ["env | grep -E '^(SHOP_TOKEN|DEPLOY_KEY)=' | sort | sha256sum"]
"#;

fn digest_of(env: &str) -> String {
    format!("{}  -\n", hex::encode(Sha256::digest(env.as_bytes())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_reach_only_their_repository_branch_and_pipeline_inside_the_container() {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let instance = format!("cib-trust-{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let executor = cib_docker::DockerExecutor::connect(cib_docker::DockerOptions::new(instance.clone()))
        .await
        .expect("a Docker daemon answers (scripts/ensure-docker starts one)");
    let s = TestServer::start_full(
        LOOK,
        |c| c.instance = instance.clone(),
        cib_store::SqliteOptions::default(),
        Arc::new(executor),
        &[("other", LOOK)],
    )
    .await;
    git(&s.repo_path, &["branch", "production"]);
    let admin = token(Role::Admin);
    for (name, value, branches) in [
        ("SHOP_TOKEN", SHOP_VALUE, serde_json::json!([])),
        ("DEPLOY_KEY", DEPLOY_VALUE, serde_json::json!(["production"])),
    ] {
        let body = serde_json::json!({ "value": value, "branches": branches });
        let path = format!("/api/v1/secrets/acme/shop/{name}");
        let answer = s.request("PUT", &path, Some(&admin), &serde_json::to_vec(&body).expect("json")).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    let look = |repo: &'static str, branch: &'static str| {
        let s = &s;
        async move {
            let body = serde_json::json!({ "repo": repo, "ref": branch, "pipeline": "test" });
            let answer = trigger(s, &token(Role::Trigger), body).await;
            assert_eq!(answer.status, 201, "{}", answer.body);
            let id = json(&answer.body)["build"].as_str().expect("id").to_owned();
            let status = finished(s, &id).await;
            assert_eq!(status, BuildStatus::Success, "{}", log(s, &id, "look").await);
            log(s, &id, "look").await
        }
    };
    // Repository A's secret never reaches repository B's build.
    let other = look("acme/other", "feature/x").await;
    assert!(other.ends_with(&digest_of("")), "{other}");
    assert!(other.contains("'SHOP_TOKEN' is withheld"), "{other}");
    // A production-only key never reaches a feature branch's test build.
    let feature = look("acme/shop", "feature/x").await;
    assert!(feature.ends_with(&digest_of(&format!("SHOP_TOKEN={SHOP_VALUE}\n"))), "{feature}");
    assert!(feature.contains("'DEPLOY_KEY' is withheld: branch 'feature/x' is not in its scope"), "{feature}");
    // On production, both.
    let production = look("acme/shop", "production").await;
    assert!(
        production.ends_with(&digest_of(&format!("DEPLOY_KEY={DEPLOY_VALUE}\nSHOP_TOKEN={SHOP_VALUE}\n"))),
        "{production}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_lost_key_is_named_when_the_server_checks_it() {
    use cib_core::ports::SecretStore;
    let dir = tempfile::tempdir().expect("dir");
    let store =
        cib_store::SqliteStore::open(dir.path().join("cib.db"), cib_store::SqliteOptions::default()).expect("store");
    let config = cib_server::config::ServerConfig { data_dir: dir.path().to_path_buf(), ..Default::default() };
    cib_server::secrets::check_key(&config, &store).await.expect("an empty store takes the new key");
    let key = cib_server::secrets::load_key(&config).expect("the key file made on the first check");
    let secret = cib_core::ports::NewSecret {
        name: "TOKEN".into(),
        value: cib_core::ports::SecretValue::new(SHOP_VALUE),
        scope: cib_core::policy::SecretScope::repo("acme/shop"),
        by: "admin".into(),
        at: cib_core::time::Timestamp(0),
    };
    store.set_secret(&key, &secret).await.expect("set");
    cib_server::secrets::check_key(&config, &store).await.expect("the same key opens them");

    // The key file is lost: a new one is made, and it opens nothing.
    let key_file = dir.path().join("secret.key");
    std::fs::remove_file(&key_file).expect("lose the key");
    let err = cib_server::secrets::check_key(&config, &store).await.expect_err("refused");
    assert!(err.contains(&key_file.display().to_string()), "{err}");
    // A wrong key from the environment is named as such.
    let wrong = cib_server::config::ServerConfig {
        secret_key: Some(cib_server::config::SecretText("11".repeat(32))),
        ..config.clone()
    };
    let err = cib_server::secrets::check_key(&wrong, &store).await.expect_err("refused");
    assert!(err.contains("CIB_SECRET_KEY"), "{err}");
    let malformed = cib_server::config::ServerConfig {
        secret_key: Some(cib_server::config::SecretText("not a key".into())),
        ..config
    };
    let err = cib_server::secrets::check_key(&malformed, &store).await.expect_err("refused");
    assert!(err.contains("CIB_SECRET_KEY"), "{err}");
}

const AUTHOR_SPEC: &str = r#"
merge:
  requires: { reviews: 1 }
pipelines:
  release:
    on: { manual: {} }
    steps:
      - { name: build, image: busybox, commands: ["echo built"] }
      - name: sign-off
        depends_on: [build]
        gate: { kind: approval }
"#;

const OCTO: &str = "octo-token-0123456789";

/// A server whose `acme/app` lives on the fake GitHub, its commits made by `commit_with`
/// (which returns the one the test is about), and a person "Octo Cat" behind the GitHub login
/// `octocat` and the token `OCTO`.
async fn github_server(
    commit_with: impl FnOnce(&cib_github::testing::FakeGithub) -> String,
) -> (cib_github::testing::FakeGithub, TestServer, String) {
    use cib_github::testing::{FakeGithub, TEST_TOKEN};
    let fake = FakeGithub::start().await.expect("fake GitHub");
    let commit = commit_with(&fake);
    let github = cib_server::config::GithubConfig {
        webhook_secret: Some(super::server::SECRET.into()),
        api_url: Some(fake.url().to_owned()),
        token: Some(TEST_TOKEN.into()),
        ..Default::default()
    };
    let client = cib_server::forge::github_client(&cib_server::config::ServerConfig {
        github: github.clone(),
        ..Default::default()
    })
    .expect("config")
    .expect("a client");
    let vcs: Arc<dyn cib_core::ports::Vcs> = Arc::new(cib_github::GithubVcs::new(client));
    let s = TestServer::start_with_vcs(
        AUTHOR_SPEC,
        |c| {
            c.github = github;
            c.tokens.push(TokenConfig {
                name: "octo".into(),
                token: OCTO.into(),
                token_sha256: None,
                role: Role::Approve,
                teams: Vec::new(),
            });
            c.people = vec![cib_core::policy::Person {
                name: "Octo Cat".into(),
                github: Some("OctoCat".into()),
                tokens: vec!["octo".into()],
                slack: None,
                zulip: None,
                teams: Vec::new(),
            }];
        },
        cib_store::SqliteOptions::default(),
        cib_core::testing::FakeExecutor::new(),
        &[],
        Some(vcs),
    )
    .await;
    (fake, s, commit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_github_the_commits_author_is_the_linked_account_and_may_not_approve_its_gate() {
    let (fake, s, commit) = github_server(|fake| {
        let commit = fake.commit("acme/app", &[], &[(".cib.yml", AUTHOR_SPEC)], "start");
        fake.set_branch("acme/app", "master", &commit);
        fake.set_commit_author("acme/app", &commit, "octocat");
        commit
    })
    .await;
    // GitHub's API does not say which branches hold a commit, and it serves forks' commits
    // through the base repository: a bare commit is refused there.
    let body = serde_json::json!({ "repo": "acme/app", "ref": commit, "pipeline": "release" });
    let answer = trigger(&s, &token(Role::Trigger), body).await;
    assert_eq!(answer.status, 422, "{}", answer.body);
    assert!(answer.body.contains("start it by the branch's name"), "{}", answer.body);
    let body = serde_json::json!({ "repo": "acme/app", "ref": "master", "pipeline": "release" });
    let answer = trigger(&s, &token(Role::Trigger), body).await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    let id = json(&answer.body)["build"].as_str().expect("id").to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let record = s.request("GET", &format!("/api/v1/builds/{id}"), Some(&token(Role::Read)), b"").await;
        if record.body.contains("\"waiting\"") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the gate never waited: {}", record.body);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let approve = |who: &'static str| {
        let s = &s;
        let id = id.clone();
        async move { s.request("POST", &format!("/api/v1/builds/{id}/gates/sign-off/approve"), Some(who), b"").await }
    };
    // The token belongs to the person GitHub names as the commit's author.
    let own = approve(OCTO).await;
    assert_eq!(own.status, 409, "{}", own.body);
    assert!(own.body.contains("the commit's author may not approve it"), "{}", own.body);
    let other = approve(token(Role::Approve).leak()).await;
    assert_eq!(other.status, 200, "{}", other.body);
    fake.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_review_by_the_commits_author_does_not_count_toward_a_merge() {
    let (fake, s, _) = github_server(|fake| {
        let base = fake.commit("acme/app", &[], &[(".cib.yml", AUTHOR_SPEC)], "start");
        fake.set_branch("acme/app", "master", &base);
        let head = fake.commit("acme/app", &[&base], &[("feature.txt", "new\n")], "feature");
        fake.set_branch("acme/app", "feature", &head);
        fake.set_commit_author("acme/app", &head, "octocat");
        head
    })
    .await;
    let head = fake.branch("acme/app", "feature").expect("feature");
    let merge = || {
        let s = &s;
        async move {
            let body = serde_json::to_vec(&serde_json::json!({ "head": "feature", "pull": 1 })).expect("json");
            s.request("POST", "/api/v1/repos/acme/app/merge", Some(&token(Role::Trigger)), &body).await
        }
    };
    fake.add_review("acme/app", 1, "octocat", "APPROVED", &head);
    let refused = merge().await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert!(refused.body.contains("0 approving review(s), 1 needed"), "{}", refused.body);
    fake.add_review("acme/app", 1, "alice", "APPROVED", &head);
    let merged = merge().await;
    assert_eq!(merged.status, 200, "{}", merged.body);
    assert_eq!(fake.branch("acme/app", "master").as_deref(), Some(head.as_str()));
    fake.assert_no_violations();
}
