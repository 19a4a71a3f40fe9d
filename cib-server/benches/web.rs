//! The web pages' server-side render time with 10,000 builds in the store: `/builds` (the
//! first page, and one filtered by repository) and a build's page, through real HTTP with a
//! signed-in session; prints p50 and p99 and fails above the 50 ms the issue allows.
//!
//! Run with `cargo bench -p cib-server --bench web`.

// Benchmarks exist to print their figures.
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cib_core::event::{BuildId, Conclusion, Event, EventBody, StepConclusion};
use cib_core::ports::{SessionRecord, SessionStore, Store};
use cib_core::testing::FakeExecutor;
use cib_core::time::Timestamp;
use cib_git::GitVcs;
use cib_server::config::{Role, ServerConfig, TokenConfig};
use cib_server::server;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const BUILDS: u64 = 10_000;
const ROUNDS: usize = 200;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(
            cib_store::SqliteStore::open(dir.path().join("cib.db"), cib_store::SqliteOptions::default())
                .expect("store"),
        );
        // 10,000 finished builds of three repositories, each with two steps, written as the
        // engine writes them: as events, which the store turns into build records.
        let start = Timestamp(1_790_000_000_000);
        let mut seq = 0u64;
        let mut batch = Vec::new();
        for n in 0..BUILDS {
            let build = BuildId(format!("b{n:05}"));
            let at = Timestamp(start.millis() + n * 1000);
            let repo = format!("acme/repo{}", n % 3);
            let mut push = |body: EventBody| {
                seq += 1;
                batch.push(Event { seq, at, body });
            };
            push(EventBody::BuildQueued {
                build: build.clone(),
                pipeline: "test".into(),
                repo,
                commit: format!("{n:040x}"),
                branch: Some(format!("feature/{}", n % 17)),
            });
            for step in ["compile", "unit"] {
                push(EventBody::StepStarted { build: build.clone(), step: step.into(), attempt: 1 });
                push(EventBody::StepFinished {
                    build: build.clone(),
                    step: step.into(),
                    attempt: 1,
                    conclusion: StepConclusion::Success,
                    detail: "exit code 0".into(),
                    will_retry: false,
                });
            }
            push(EventBody::BuildFinished { build: build.clone(), conclusion: Conclusion::Success });
            if batch.len() >= 2000 {
                store.append_events(&batch).await.expect("events");
                batch.clear();
            }
        }
        store.append_events(&batch).await.expect("events");

        let config = ServerConfig {
            data_dir: dir.path().to_path_buf(),
            tokens: vec![TokenConfig {
                name: "reader".into(),
                token: "reader-token-0123456789".into(),
                token_sha256: None,
                role: Role::Read,
                teams: Vec::new(),
            }],
            ..ServerConfig::default()
        };
        let running = server::start(config, FakeExecutor::new(), store.clone(), Arc::new(GitVcs::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(server::serve(running.state.clone(), listener, std::future::pending()));
        // A session as `/login` makes one.
        let id = "ab".repeat(32);
        let now = Timestamp(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_millis() as u64,
        );
        let record = SessionRecord { token_name: "reader".into(), created_at: now, last_seen: now };
        store.create_session(&cib_server::web::session::digest(&id), &record).await.expect("session");
        let cookie = format!("cib_session={id}");
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();

        for (name, path) in [
            ("/builds", "/builds".to_owned()),
            ("/builds?repo=acme/repo1&status=success", "/builds?repo=acme%2Frepo1&status=success".to_owned()),
            ("/builds/{id}", format!("/builds/b{:05}", BUILDS / 2)),
        ] {
            let mut took = Vec::with_capacity(ROUNDS);
            for _ in 0..ROUNDS {
                let request = http::Request::get(format!("{url}{path}"))
                    .header("cookie", &cookie)
                    .body(Full::new(Bytes::new()))
                    .expect("request");
                let sent = Instant::now();
                let response = client.request(request).await.expect("response");
                assert_eq!(response.status(), 200, "{path}");
                let body = response.into_body().collect().await.expect("body").to_bytes();
                took.push(sent.elapsed());
                assert!(body.len() > 1000, "{path} rendered a page");
            }
            took.sort();
            let p = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
            let (p50, p99) = (p(0.50), p(0.99));
            println!("web: {name} with {BUILDS} builds: p50 {:.1} ms, p99 {:.1} ms", ms(p50), ms(p99));
            assert!(p99 < Duration::from_millis(50), "{name}: p99 {p99:?} is over 50 ms");
        }
    });
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
