//! Artifacts end to end on Docker: `test` builds a wheel and keeps it, `staging` on the same
//! commit installs that very wheel with pip, and the archive is downloadable through the API
//! and `cib artifacts` with the SHA-256 the server recorded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cib_core::ports::{BuildStatus, Store};
use cib_server::config::Role;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

use super::server::{TestServer, git, token};

const SPEC: &str = r#"
pipelines:
  test:
    on: { manual: {} }
    steps:
      - name: package
        image: python:3.11-slim
        commands: ["python3 build_wheel.py 2.0.1"]
        artifacts: { paths: ["dist/*.whl"], expire: 7d }
  staging:
    on: { manual: {} }
    steps:
      # A first step fills the workspace volume, so the wheel is copied into a volume in use.
      - { name: check, image: python:3.11-slim, commands: ["test ! -e dist"] }
      - name: install
        depends_on: [check]
        image: cib-test/python-pip:latest
        needs_artifacts: [{ pipeline: test, step: package }]
        commands:
          - pip install --no-index --no-cache-dir --disable-pip-version-check dist/app-2.0.1-py3-none-any.whl
          - python3 -c 'import importlib.metadata as m; print("installed app", m.version("app"))'
"#;

fn example(file: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/image-app").join(file)
}

async fn trigger(s: &TestServer, pipeline: &str) -> String {
    let body = serde_json::json!({ "repo": "acme/shop", "ref": "master", "pipeline": pipeline });
    let answer = s.request("POST", "/api/v1/builds", Some(&token(Role::Trigger)), body.to_string().as_bytes()).await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    let v: serde_json::Value = serde_json::from_str(&answer.body).expect("json");
    v["build"].as_str().expect("a build id").to_owned()
}

async fn finished(s: &TestServer, id: &str) -> BuildStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let record = s.store.build(&cib_core::event::BuildId(id.to_owned())).await.expect("store");
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

/// The raw bytes of a GET, with the answer's `x-cib-sha256`.
async fn download(s: &TestServer, path: &str) -> (u16, Option<String>, Vec<u8>) {
    let request = http::Request::get(format!("{}{path}", s.url))
        .header("authorization", format!("Bearer {}", token(Role::Read)))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let response = s.client.request(request).await.expect("response");
    let status = response.status().as_u16();
    let digest = response.headers().get("x-cib-sha256").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = response.into_body().collect().await.expect("body").to_bytes().to_vec();
    super::openapi_check::check_answer("GET", path, status, content_type.as_deref(), &body);
    (status, digest, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wheel_test_built_is_installed_by_staging_and_downloadable_with_its_sha256() {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let instance =
        format!("cib-artifacts-{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let executor = cib_docker::DockerExecutor::connect(cib_docker::DockerOptions::new(instance.clone()))
        .await
        .expect("a Docker daemon answers (scripts/ensure-docker starts one)");
    let s = TestServer::start_full(
        SPEC,
        |c| c.instance = instance.clone(),
        cib_store::SqliteOptions::default(),
        Arc::new(executor),
        &[],
    )
    .await;
    let repo = &s.repo_path;
    for file in ["build_wheel.py", "app/__init__.py"] {
        std::fs::create_dir_all(repo.join(file).parent().expect("dir")).expect("mkdir");
        std::fs::copy(example(file), repo.join(file)).expect("copy");
    }
    git(repo, &["add", "."]);
    git(repo, &["commit", "-q", "-m", "the app"]);
    let commit = git(repo, &["rev-parse", "HEAD"]);
    // Policy is read from the integration branch, so master holds the spec (and this commit).
    git(repo, &["branch", "master"]);

    // Before `test` ran on this commit there is nothing to install: staging fails and says why.
    let early = trigger(&s, "staging").await;
    assert_ne!(finished(&s, &early).await, BuildStatus::Success);
    let checked = log(&s, &early, "check").await;
    assert!(!checked.contains("cib:"), "the first step ran and passed: {checked}");
    let why = log(&s, &early, "install").await;
    assert!(why.contains("the artifacts of test/package on commit") && why.contains("are not there"), "{why}");

    let test = trigger(&s, "test").await;
    assert_eq!(finished(&s, &test).await, BuildStatus::Success, "{}", log(&s, &test, "package").await);
    assert!(log(&s, &test, "package").await.contains("cib: kept 1 files as artifact 'package'"));

    let staging = trigger(&s, "staging").await;
    let done = finished(&s, &staging).await;
    assert_eq!(done, BuildStatus::Success, "{}", log(&s, &staging, "install").await);
    let installed = log(&s, &staging, "install").await;
    assert!(
        installed.contains(&format!("cib: restored the artifacts of test/package from build {test}")),
        "{installed}"
    );
    assert!(installed.contains("installed app 2.0.1"), "{installed}");

    // The list names the archive's digest; the download has exactly those bytes.
    let answer = s.request("GET", &format!("/api/v1/builds/{test}/artifacts"), Some(&token(Role::Read)), b"").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let listed: serde_json::Value = serde_json::from_str(&answer.body).expect("json");
    let artifact = &listed["artifacts"][0];
    assert_eq!(artifact["name"], "package");
    assert_eq!(artifact["commit"], commit.as_str());
    assert_eq!(artifact["files"], 1);
    let sha = artifact["sha256"].as_str().expect("sha256").to_owned();
    let (status, header, body) = download(&s, &format!("/api/v1/builds/{test}/artifacts/package")).await;
    assert_eq!(status, 200);
    assert_eq!(hex::encode(Sha256::digest(&body)), sha);
    assert_eq!(header.as_deref(), Some(sha.as_str()));
    assert_eq!(artifact["size"], body.len());
    // It is the wheel: a gzip-compressed tar holding dist/app-2.0.1-py3-none-any.whl.
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("package.tar.gz"), &body).expect("write");
    let listing = std::process::Command::new("tar").arg("-tzf").arg(dir.path().join("package.tar.gz")).output();
    let listing = String::from_utf8_lossy(&listing.expect("tar runs").stdout).into_owned();
    assert_eq!(listing.trim(), "dist/app-2.0.1-py3-none-any.whl");

    // Unknown names and builds are 404s.
    assert_eq!(download(&s, &format!("/api/v1/builds/{test}/artifacts/nothing")).await.0, 404);
    assert_eq!(download(&s, "/api/v1/builds/no-such-build/artifacts").await.0, 404);

    // `cib artifacts` lists it, and `--get` downloads and checks it.
    let (url, out) = (s.url.clone(), dir.path().join("got.tar.gz"));
    let (id, out_arg) = (test.clone(), out.clone());
    let ran = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| {
            std::process::Command::new(env!("CARGO_BIN_EXE_cib"))
                .args(args)
                .env("HOME", out_arg.parent().expect("dir"))
                .env("CIB_SERVER", &url)
                .env("CIB_TOKEN", token(Role::Read))
                .env_remove("CIB_PROFILE")
                .output()
                .expect("cib runs")
        };
        let out_text = out_arg.to_str().expect("utf-8").to_owned();
        (run(&["artifacts", &id]), run(&["artifacts", &id, "--get", "package", "-o", &out_text]))
    })
    .await
    .expect("cib");
    let listing = String::from_utf8_lossy(&ran.0.stdout);
    assert!(ran.0.status.success() && listing.contains("package") && listing.contains(&sha), "{listing}");
    assert!(ran.1.status.success(), "{}", String::from_utf8_lossy(&ran.1.stderr));
    assert_eq!(std::fs::read(&out).expect("downloaded"), body);
}

const CACHED: &str = r#"
pipelines:
  test:
    on: { manual: {} }
    steps:
      - name: deps
        image: busybox
        cache: [{ key: "deps-{{ checksum 'lock.txt' }}", paths: [deps], restore_keys: [deps-] }]
        commands:
          - if [ -f deps/who ]; then echo "found $(cat deps/who)"; else mkdir -p deps; echo "$CIB_BUILD" > deps/who; echo fresh; fi
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_build_restores_the_cache_the_first_saved_under_the_lock_files_checksum() {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let instance = format!("cib-cache-{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let executor = cib_docker::DockerExecutor::connect(cib_docker::DockerOptions::new(instance.clone()))
        .await
        .expect("a Docker daemon answers (scripts/ensure-docker starts one)");
    let docker = executor.docker().clone();
    let s = TestServer::start_full(
        CACHED,
        |c| c.instance = instance.clone(),
        cib_store::SqliteOptions::default(),
        Arc::new(executor),
        &[],
    )
    .await;
    // Caches outlive builds and servers, so the lock file is unique to this run: its checksum
    // is a key no other run has used.
    let lock = format!("{instance}-{:?}\n", std::time::SystemTime::now());
    std::fs::write(s.repo_path.join("lock.txt"), &lock).expect("lock");
    git(&s.repo_path, &["add", "."]);
    git(&s.repo_path, &["commit", "-q", "-m", "deps"]);
    git(&s.repo_path, &["branch", "master"]);
    let key = format!("deps-{}", hex::encode(Sha256::digest(lock.as_bytes())));

    let first = trigger(&s, "test").await;
    assert_eq!(finished(&s, &first).await, BuildStatus::Success, "{}", log(&s, &first, "deps").await);
    let text = log(&s, &first, "deps").await;
    assert!(text.contains("fresh") && text.contains(&format!("cib: saved the cache '{key}'")), "{text}");
    let second = trigger(&s, "test").await;
    assert_eq!(finished(&s, &second).await, BuildStatus::Success, "{}", log(&s, &second, "deps").await);
    let text = log(&s, &second, "deps").await;
    assert!(text.contains(&format!("cib: restored the cache '{key}'")), "{text}");
    assert!(text.contains(&format!("found {first}")), "the second build sees the first one's file: {text}");
    assert!(!text.contains("saved the cache"), "an exact hit saves nothing: {text}");

    // The API lists it, and an admin removes it (its marker and its volume).
    let answer = s.request("GET", "/api/v1/caches/acme/shop", Some(&token(Role::Read)), b"").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let listed: serde_json::Value = serde_json::from_str(&answer.body).expect("json");
    let mine: Vec<&serde_json::Value> =
        listed["caches"].as_array().expect("caches").iter().filter(|c| c["key"] == key.as_str()).collect();
    assert_eq!(mine.len(), 1, "{listed}");
    assert_eq!(mine[0]["namespace"], "trusted");
    let path = format!("/api/v1/caches/acme/shop/{key}");
    assert_eq!(s.request("DELETE", &path, Some(&token(Role::Read)), b"").await.status, 403);
    let answer = s.request("DELETE", &path, Some(&token(Role::Admin)), b"").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let removed: serde_json::Value = serde_json::from_str(&answer.body).expect("json");
    assert_eq!(removed, serde_json::json!({ "removed": 1 }));
    assert_eq!(s.request("DELETE", &path, Some(&token(Role::Admin)), b"").await.status, 404);
    let filters = std::collections::HashMap::from([(
        "label".to_owned(),
        vec![format!("{}={key}", cib_docker::cache::LABEL_CACHE_KEY)],
    )]);
    let all = bollard::query_parameters::ListContainersOptions {
        all: true,
        filters: Some(filters.clone()),
        ..Default::default()
    };
    assert!(docker.list_containers(Some(all)).await.expect("list").is_empty(), "the marker is gone");
    let volumes = docker.list_volumes(Some(bollard::query_parameters::ListVolumesOptions { filters: Some(filters) }));
    assert!(volumes.await.expect("volumes").volumes.unwrap_or_default().is_empty(), "the volume is gone");
}
