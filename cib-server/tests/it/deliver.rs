//! Deliverables end to end, with real Docker, two real pypiservers (staging and production) and
//! a real docker-registry, on a local repository with the master/production workflow: the
//! `examples/image-app` spec (its ports put in) publishes a wheel and an image on staging, an
//! approved promotion puts the very same bytes in production, pip installs the wheel from the
//! production index, and the daemon pulls the image by digest. No credential reaches a step.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cib_core::ports::{BuildStatus, Store as _};
use cib_publish::testing::{Counting, Flaky, Service, pypiserver, registry};
use cib_server::config::Role;
use cib_server::outgoing::sign;
use sha2::{Digest, Sha256};

use super::server::{GIT_SECRET, TestServer, git, token};

const STAGING_VALUE: &str = "uploader:staging-pass-7f3a91";
const PRODUCTION_VALUE: &str = "uploader:production-pass-c20e55";
const REGISTRY_VALUE: &str = "pusher:registry-pass-5b8d10";

fn example(file: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/image-app").join(file)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

async fn wait_for(s: &TestServer, pipeline: &str, secs: u64) -> cib_core::ports::BuildSummary {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let builds = s
            .store
            .builds(&cib_core::ports::BuildFilter::default(), cib_core::ports::Page::first(100))
            .await
            .expect("builds");
        if let Some(b) = builds
            .iter()
            .find(|b| b.pipeline == pipeline && !matches!(b.status, BuildStatus::Queued | BuildStatus::Running))
        {
            return b.clone();
        }
        assert!(Instant::now() < deadline, "{pipeline} did not finish: {builds:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn get(s: &TestServer, path: &str) -> serde_json::Value {
    let answer = s.request("GET", path, Some(&token(Role::Read)), b"").await;
    assert_eq!(answer.status, 200, "{path}: {}", answer.body);
    serde_json::from_str(&answer.body).expect("json")
}

async fn logs_of(s: &TestServer, build: &str) -> Vec<(String, String)> {
    let detail = get(s, &format!("/api/v1/builds/{build}")).await;
    let mut out = Vec::new();
    for step in detail["steps"].as_array().cloned().unwrap_or_default() {
        let name = step["name"].as_str().unwrap_or_default().to_owned();
        let answer =
            s.request("GET", &format!("/api/v1/builds/{build}/steps/{name}/log"), Some(&token(Role::Read)), b"").await;
        out.push((name, answer.body));
    }
    out
}

/// Tells the server, as the local repository's hook would, that master moved to `head`.
async fn push_master(s: &TestServer, head: &str) {
    let body = serde_json::to_vec(&serde_json::json!({
        "repo": "acme/shop", "ref": "refs/heads/master",
        "before": "0000000000000000000000000000000000000000", "after": head, "pusher": "alice",
    }))
    .expect("json");
    let req = http::Request::post(format!("{}/hooks/git", s.url))
        .header("content-type", "application/json")
        .header("x-cib-signature-256", sign(GIT_SECRET.as_bytes(), &body))
        .header("x-cib-delivery", format!("push-master-{head}"))
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .expect("request");
    assert_eq!(s.client.request(req).await.expect("response").status(), 202);
}

/// Approves and promotes `commit` to production, as two people would.
async fn approve_and_promote(s: &TestServer, commit: &str) {
    let r = "/api/v1/repos/acme/shop";
    let body = serde_json::json!({ "commit": commit }).to_string();
    let answer = s.request("POST", &format!("{r}/approvals"), Some(&token(Role::Approve)), body.as_bytes()).await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    let answer = s.request("POST", &format!("{r}/promote"), Some(&token(Role::Trigger)), body.as_bytes()).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
}

/// Stores a secret for `acme/shop` through the API, as an admin would, for every branch.
async fn store_secret(s: &TestServer, name: &str, value: &str) {
    let body = serde_json::json!({ "value": value, "branches": [] }).to_string();
    let path = format!("/api/v1/secrets/acme/shop/{name}");
    let answer = s.request("PUT", &path, Some(&token(Role::Admin)), body.as_bytes()).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
}

/// A server for `spec` whose steps run on the real Docker daemon, under an instance name of its
/// own so that its leftovers are its own.
async fn docker_server(spec: &str) -> TestServer {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let instance =
        format!("cib-deliver-{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let executor = cib_docker::DockerExecutor::connect(cib_docker::DockerOptions::new(instance.clone()))
        .await
        .expect("a Docker daemon answers (scripts/ensure-docker starts one)");
    TestServer::start_full(
        spec,
        |c| c.instance = instance,
        cib_store::SqliteOptions::default(),
        Arc::new(executor),
        &[],
    )
    .await
}

fn the_file(index: &Service) -> Vec<u8> {
    std::fs::read(index.dir.path().join("packages/app-1.2.3-py3-none-any.whl")).expect("the wheel is on the index")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_publishes_and_an_approved_promotion_puts_the_same_bytes_in_production() {
    let staging_index = pypiserver("uploader", "staging-pass-7f3a91");
    let production_index = pypiserver("uploader", "production-pass-c20e55");
    let reg = registry("pusher", "registry-pass-5b8d10");
    // The daemon reaches the registry through a proxy that counts blob uploads.
    let counting = Counting::start(reg.port).await;
    // The staging index is busy at first: its first two uploads are answered 503, which the
    // machine retries with backoff, so the wheel lands once.
    let flaky = Flaky::start(staging_index.port, 2).await;
    let spec = std::fs::read_to_string(example(".cib.yml"))
        .expect("the example's spec")
        .replace("http://127.0.0.1:8081/", &format!("http://127.0.0.1:{}/", flaky.port))
        .replace("http://127.0.0.1:8082/", &production_index.url())
        .replace("127.0.0.1:5000", &format!("127.0.0.1:{}", counting.port));
    let s = docker_server(&spec).await;
    let admin = token(Role::Admin);
    for (name, value, branches) in [
        ("STAGING_INDEX", STAGING_VALUE, serde_json::json!(["master"])),
        ("PRODUCTION_INDEX", PRODUCTION_VALUE, serde_json::json!(["production"])),
        ("REGISTRY", REGISTRY_VALUE, serde_json::json!([])),
    ] {
        let body = serde_json::json!({ "value": value, "branches": branches });
        let path = format!("/api/v1/secrets/acme/shop/{name}");
        let answer = s.request("PUT", &path, Some(&admin), &serde_json::to_vec(&body).expect("json")).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    // production starts at the spec's first commit; master gets the example's files on top.
    let repo = &s.repo_path;
    git(repo, &["branch", "production"]);
    for file in ["Dockerfile", "build_wheel.py", "app/__init__.py"] {
        std::fs::create_dir_all(repo.join(file).parent().expect("dir")).expect("mkdir");
        std::fs::copy(example(file), repo.join(file)).expect("copy");
    }
    git(repo, &["add", "."]);
    git(repo, &["commit", "-q", "-m", "the app"]);
    let head = git(repo, &["rev-parse", "HEAD"]);
    git(repo, &["branch", "master"]);

    // A push to master runs staging.
    push_master(&s, &head).await;
    let staging = wait_for(&s, "staging", 180).await;
    let staging_logs = logs_of(&s, &staging.id.0).await;
    let detail = get(&s, &format!("/api/v1/builds/{}", staging.id)).await;
    assert_eq!(staging.status, BuildStatus::Success, "{detail:#}\n{staging_logs:#?}");
    let publish_log = &staging_logs.iter().find(|(n, _)| n == "publish").expect("a publish step").1;
    assert!(
        publish_log.contains("COPY dist/ /opt/app/dist/"),
        "the build output is in the publish step's log: {publish_log}"
    );
    assert_eq!(flaky.passed.load(std::sync::atomic::Ordering::SeqCst), 1, "the wheel reached the index once");
    let attempts = detail["steps"]
        .as_array()
        .map(|steps| steps.iter().filter(|s| s["name"] == "publish").count())
        .unwrap_or_default();
    assert_eq!(attempts, 3, "two attempts refused with 503, then one that landed: {detail:#}");

    // Staging's records: the wheel (sha256) and the image (manifest digest), first produced here.
    let records = get(&s, &format!("/api/v1/builds/{}/deliverables", staging.id)).await;
    let published = records["published"].as_array().cloned().expect("published");
    assert_eq!(published.len(), 2, "{records:#}");
    let wheel = published.iter().find(|r| r["kind"] == "pypi").expect("the wheel");
    let image = published.iter().find(|r| r["kind"] == "docker").expect("the image");
    assert_eq!(wheel["file"], "app-1.2.3-py3-none-any.whl");
    assert_eq!(wheel["version"], "1.2.3");
    assert_eq!(wheel["first_build"], staging.id.0);
    let staged = the_file(&staging_index);
    assert_eq!(wheel["digest"], format!("sha256:{}", sha256_hex(&staged)));
    assert_eq!(image["tags"][0], head);
    let digest = image["digest"].as_str().expect("digest").to_owned();
    let blob_writes = counting.blob_writes.load(std::sync::atomic::Ordering::SeqCst);
    assert!(blob_writes > 0, "staging pushed layers");

    // The promotion, approved, moves production and runs its pipeline.
    approve_and_promote(&s, &head).await;
    let r = "/api/v1/repos/acme/shop";
    let production = wait_for(&s, "production", 120).await;
    let production_logs = logs_of(&s, &production.id.0).await;
    assert_eq!(production.status, BuildStatus::Success, "{production_logs:#?}");

    // The byte-identical wheel on the production index, and the same manifest under production.
    assert_eq!(sha256_hex(&the_file(&production_index)), sha256_hex(&staged), "production has the very wheel");
    let records = get(&s, &format!("/api/v1/builds/{}/deliverables", production.id)).await;
    let promoted = records["published"].as_array().cloned().expect("published");
    assert_eq!(promoted.len(), 2, "{records:#}");
    for r in &promoted {
        assert_eq!(r["first_build"], staging.id.0, "first produced by staging: {r}");
    }
    let registry_api = cib_publish::registry::Registry::new(
        cib_publish::http::HttpClient::new(),
        cib_publish::registry::ImageRef::parse(&format!("127.0.0.1:{}/app", reg.port), ""),
        Some(("pusher".into(), "registry-pass-5b8d10".into())),
    );
    let tagged = registry_api.manifest("production").await.expect("read").expect("app:production exists");
    assert_eq!(tagged.digest, digest, "app:production is the manifest staging pushed");
    assert_eq!(
        counting.blob_writes.load(std::sync::atomic::Ordering::SeqCst),
        blob_writes,
        "no layer was pushed again"
    );
    let environments = get(&s, &format!("{r}/environments")).await;
    let in_production = environments["deliverables"]["production"].as_array().cloned().unwrap_or_default();
    assert_eq!(in_production.len(), 2, "{environments:#}");
    let events = s.store.events_after(0, 10_000).await.expect("events");
    let published_events =
        events.iter().filter(|e| matches!(e.body, cib_core::event::EventBody::DeliverablePublished { .. })).count();
    assert_eq!(published_events, 4, "one deliverable_published event per artifact and build");

    // pip installs the wheel from the production index in a container, and the daemon pulls
    // the image by digest.
    let docker = bollard::Docker::connect_with_defaults().expect("docker");
    let script = format!(
        "pip install --index-url http://127.0.0.1:{}/simple/ app==1.2.3 && python3 -c 'import app; print(app.VERSION)'",
        production_index.port
    );
    let name = format!("cib-deliver-pip-{}", std::process::id());
    let config = bollard::models::ContainerCreateBody {
        image: Some("cib-test/python-pip:latest".into()),
        cmd: Some(vec!["sh".into(), "-c".into(), script]),
        host_config: Some(bollard::models::HostConfig { network_mode: Some("host".into()), ..Default::default() }),
        ..Default::default()
    };
    let options = bollard::query_parameters::CreateContainerOptions { name: Some(name.clone()), ..Default::default() };
    docker.create_container(Some(options), config).await.expect("create the pip container");
    docker.start_container(&name, None::<bollard::query_parameters::StartContainerOptions>).await.expect("start");
    use futures_util::StreamExt as _;
    let exit =
        docker.wait_container(&name, None::<bollard::query_parameters::WaitContainerOptions>).next().await.map(|r| {
            r.map(|w| w.status_code).unwrap_or_else(|e| match e {
                bollard::errors::Error::DockerContainerWaitError { code, .. } => code,
                _ => -1,
            })
        });
    let mut output = String::new();
    let mut stream = docker
        .logs(&name, Some(bollard::query_parameters::LogsOptions { stdout: true, stderr: true, ..Default::default() }));
    while let Some(Ok(chunk)) = stream.next().await {
        output.push_str(&chunk.to_string());
    }
    let _ = docker
        .remove_container(
            &name,
            Some(bollard::query_parameters::RemoveContainerOptions { force: true, ..Default::default() }),
        )
        .await;
    assert_eq!(exit, Some(0), "pip install from the production index: {output}");
    assert!(output.contains("Successfully installed app-1.2.3") && output.trim_end().ends_with("1.2.3"), "{output}");
    let by_digest = format!("127.0.0.1:{}/app@{digest}", reg.port);
    let credentials = bollard::auth::DockerCredentials {
        username: Some("pusher".into()),
        password: Some("registry-pass-5b8d10".into()),
        serveraddress: Some(format!("127.0.0.1:{}", reg.port)),
        ..Default::default()
    };
    let options =
        bollard::query_parameters::CreateImageOptions { from_image: Some(by_digest.clone()), ..Default::default() };
    let mut pull = docker.create_image(Some(options), None, Some(credentials));
    while let Some(item) = pull.next().await {
        item.unwrap_or_else(|e| panic!("pulling {by_digest}: {e}"));
    }
    let inspected = docker.inspect_image(&by_digest).await.expect("the pulled image");
    assert!(inspected.repo_digests.unwrap_or_default().iter().any(|d| d.ends_with(&digest)), "pulled by digest");
    let _ = docker.remove_image(&by_digest, None::<bollard::query_parameters::RemoveImageOptions>, None).await;

    // No credential reached any step: each step printed the sha256 of each of its environment's
    // values; none is a credential's.
    for value in [STAGING_VALUE, PRODUCTION_VALUE, REGISTRY_VALUE] {
        let digest = sha256_hex(value.as_bytes());
        for (step, log) in staging_logs.iter().chain(&production_logs) {
            assert!(!log.contains(&digest) && !log.contains(value), "a credential reached step {step}: {log}");
        }
    }
    for (step, log) in staging_logs.iter().chain(&production_logs).filter(|(n, _)| n != "publish") {
        let lines = log.lines().filter(|l| l.ends_with("  -")).count();
        assert!(lines > 5, "step {step} printed the digests of its environment: {log}");
    }
}

/// A fork's pull request is built with the base's spec, whose test pipeline publishes a wheel to
/// a real index with a credential the repository holds: the fork's steps run, but its build
/// publishes nothing, says why on its `publish` step, and is neutral rather than green.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forks_build_publishes_nothing_and_says_why() {
    let index = pypiserver("uploader", "fork-pass-41d2e0");
    let spec = format!(
        r#"
pipelines:
  test:
    on: {{ pull_request: {{ branches: [master] }} }}
    steps:
      - {{ name: wheel, image: python:3.11-slim, commands: ["python3 build_wheel.py 3.0.0", "ls dist/"] }}
    deliverables:
      - pypi: {{ index: "{}", credentials: FORK_INDEX, files: "dist/*.whl" }}
"#,
        index.url()
    );
    let s = docker_server(&spec).await;
    store_secret(&s, "FORK_INDEX", "uploader:fork-pass-41d2e0").await;
    let repo = s.repo_path.clone();
    git(&repo, &["branch", "master"]);
    let base = git(&repo, &["rev-parse", "master"]);
    for file in ["build_wheel.py", "app/__init__.py"] {
        std::fs::create_dir_all(repo.join(file).parent().expect("dir")).expect("mkdir");
        std::fs::copy(example(file), repo.join(file)).expect("copy");
    }
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "a fork's change"]);
    let head = git(&repo, &["rev-parse", "HEAD"]);
    let body = serde_json::to_vec(&serde_json::json!({
        "action": "opened",
        "pull_request": {
            "number": 5,
            "merged": false,
            "user": { "login": "stranger" },
            "base": { "ref": "master", "sha": base, "repo": { "full_name": "acme/shop" } },
            "head": { "ref": "patch-1", "sha": head, "repo": { "full_name": "stranger/shop" } }
        },
        "repository": { "full_name": "acme/shop" },
        "sender": { "login": "stranger" }
    }))
    .expect("json");
    let signature = sign(super::server::SECRET.as_bytes(), &body);
    assert_eq!(s.hook("pull_request", "fork-pr-5", &body, Some(&signature)).await.status, 202);
    let build = wait_for(&s, "test", 120).await;
    let detail = get(&s, &format!("/api/v1/builds/{}", build.id)).await;
    assert_eq!(build.status, BuildStatus::Neutral, "{detail:#}");
    let steps = detail["steps"].as_array().cloned().unwrap_or_default();
    let wheel = steps.iter().find(|s| s["name"] == "wheel").expect("the wheel step");
    assert_eq!(wheel["status"], "success", "the fork's own step ran: {detail:#}");
    let publish = steps.iter().find(|s| s["name"] == "publish").expect("the publish step");
    assert_eq!(publish["status"], "skipped", "{detail:#}");
    assert!(
        publish["detail"].as_str().unwrap_or_default().contains("an untrusted build"),
        "the reason is recorded: {publish}"
    );
    let records = get(&s, &format!("/api/v1/builds/{}/deliverables", build.id)).await;
    assert_eq!(records["published"], serde_json::json!([]), "{records:#}");
    let packages = std::fs::read_dir(index.dir.path().join("packages")).map(|d| d.count()).unwrap_or_default();
    assert_eq!(packages, 0, "nothing reached the index");
}

/// `examples/python-app` as it is, its index URLs put in: master's staging pipeline builds the
/// wheel and sdist with `python -m build`, installs the wheel, holds until a person continues,
/// and publishes both to the staging index; the approved promotion gives the production index
/// the very same files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_app_example_stages_and_promotes_its_wheel() {
    let staging_index = pypiserver("uploader", "staging-pass-7f3a91");
    let production_index = pypiserver("uploader", "production-pass-c20e55");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python-app");
    let spec = std::fs::read_to_string(root.join(".cib.yml"))
        .expect("the example's spec")
        .replace("http://127.0.0.1:8081/", &staging_index.url())
        .replace("http://127.0.0.1:8082/", &production_index.url());
    let s = docker_server(&spec).await;
    store_secret(&s, "STAGING_INDEX", STAGING_VALUE).await;
    store_secret(&s, "PRODUCTION_INDEX", PRODUCTION_VALUE).await;
    let repo = &s.repo_path;
    git(repo, &["branch", "production"]);
    for file in ["pyproject.toml", "src/shop/__init__.py", "tests/conftest.py", "tests/test_pricing.py"] {
        std::fs::create_dir_all(repo.join(file).parent().expect("dir")).expect("mkdir");
        std::fs::copy(root.join(file), repo.join(file)).expect("copy");
    }
    git(repo, &["add", "."]);
    git(repo, &["commit", "-q", "-m", "the shop"]);
    let head = git(repo, &["rev-parse", "HEAD"]);
    git(repo, &["branch", "master"]);
    push_master(&s, &head).await;

    // The hold waits for a person once the wheel has been installed and tried.
    let deadline = Instant::now() + Duration::from_secs(300);
    let build = loop {
        let builds = s
            .store
            .builds(&cib_core::ports::BuildFilter::default(), cib_core::ports::Page::first(10))
            .await
            .expect("builds");
        if let Some(b) = builds.iter().find(|b| b.pipeline == "staging") {
            let path = format!("/api/v1/builds/{}/gates/manual-qa/approve", b.id);
            if s.request("POST", &path, Some(&token(Role::Approve)), b"").await.status == 200 {
                break b.id.0.clone();
            }
            assert!(
                matches!(b.status, BuildStatus::Queued | BuildStatus::Running),
                "staging ended before its hold: {:#}",
                get(&s, &format!("/api/v1/builds/{}", b.id)).await
            );
        }
        assert!(Instant::now() < deadline, "staging never reached its hold: {builds:#?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let staging = wait_for(&s, "staging", 120).await;
    let logs = logs_of(&s, &build).await;
    assert_eq!(
        staging.status,
        BuildStatus::Success,
        "{:#}\n{logs:#?}",
        get(&s, &format!("/api/v1/builds/{build}")).await["steps"]
    );
    let smoke = &logs.iter().find(|(n, _)| n == "smoke").expect("the smoke step").1;
    assert!(smoke.contains("Successfully installed shop-0.1.0") && smoke.contains("1745"), "{smoke}");
    let files = |index: &Service| -> Vec<(String, String)> {
        let mut files: Vec<(String, String)> = std::fs::read_dir(index.dir.path().join("packages"))
            .expect("the index's packages")
            .map(|e| e.expect("entry").path())
            .map(|p| {
                let name = p.file_name().expect("name").to_string_lossy().into_owned();
                (name, sha256_hex(&std::fs::read(&p).expect("read")))
            })
            .collect();
        files.sort();
        files
    };
    let staged = files(&staging_index);
    let names: Vec<&str> = staged.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["shop-0.1.0-py3-none-any.whl", "shop-0.1.0.tar.gz"]);

    approve_and_promote(&s, &head).await;
    let production = wait_for(&s, "production", 120).await;
    assert_eq!(production.status, BuildStatus::Success, "{:#?}", logs_of(&s, &production.id.0).await);
    assert_eq!(files(&production_index), staged, "production has the very files staging tested");
}
