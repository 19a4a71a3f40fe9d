//! A load test on loopback: signed GitHub deliveries posted by concurrent clients to a real
//! server with a SQLite store; prints persisted webhooks per second and latency percentiles.
//!
//! Run with `cargo bench -p cib-server --bench load`.

// Benchmarks exist to print their figures.
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cib_core::testing::FakeExecutor;
use cib_git::GitVcs;
use cib_server::config::{GithubConfig, ServerConfig};
use cib_server::outgoing::sign;
use cib_server::server;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const CLIENTS: usize = 16;
const PER_CLIENT: usize = 250;
const SECRET: &str = "load-test-secret";

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    // A benchmark usually runs right after its build, while the kernel is still writing the
    // build's output back to disk; every fsync then waits behind it. Flushing first measures
    // the receiver's own durable writes rather than the compiler's.
    let flushed = std::process::Command::new("sync").status().expect("sync runs");
    assert!(flushed.success(), "sync failed: {flushed}");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = ServerConfig {
            data_dir: dir.path().to_path_buf(),
            github: GithubConfig { webhook_secret: Some(SECRET.into()), ..Default::default() },
            ..ServerConfig::default()
        };
        let store = Arc::new(
            cib_store::SqliteStore::open(dir.path().join("cib.db"), cib_store::SqliteOptions::default()).expect("store"),
        );
        let running = server::start(config, FakeExecutor::new(), store.clone(), Arc::new(GitVcs::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hooks/github", listener.local_addr().expect("address"));
        tokio::spawn(server::serve(running.state.clone(), listener, std::future::pending()));

        // An event cib stores and ignores, so the figure is the receiver's: verify, store, answer.
        // Each delivery has its own body, as real ones do, so each is a durable insert.
        let body_for = |c: usize, i: usize| {
            Bytes::from(format!(
                r#"{{"action":"started","repository":{{"full_name":"acme/shop"}},"sender":{{"login":"octocat"}},"n":"{c}-{i}"}}"#
            ))
        };
        let started = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..CLIENTS {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
                let mut latencies = Vec::with_capacity(PER_CLIENT);
                for i in 0..PER_CLIENT {
                    let body = body_for(c, i);
                    let signature = sign(SECRET.as_bytes(), &body);
                    let request = http::Request::post(&url)
                        .header("x-github-event", "watch")
                        .header("x-github-delivery", format!("load-{c}-{i}"))
                        .header("x-hub-signature-256", &signature)
                        .body(Full::new(body))
                        .expect("request");
                    let sent = Instant::now();
                    let response = client.request(request).await.expect("response");
                    assert_eq!(response.status(), 202);
                    let _ = response.into_body().collect().await;
                    latencies.push(sent.elapsed());
                }
                latencies
            }));
        }
        let mut latencies: Vec<Duration> = Vec::new();
        for t in tasks {
            latencies.extend(t.await.expect("client"));
        }
        let elapsed = started.elapsed();
        latencies.sort();
        let total = latencies.len();
        let at = |p: f64| latencies[((total as f64 * p) as usize).min(total - 1)];
        // Every answered delivery is in the store.
        for c in [0, CLIENTS - 1] {
            let id = format!("load-{c}-{}", PER_CLIENT - 1);
            assert!(cib_core::ports::Store::delivery(&*store, &id).await.expect("read").is_some(), "{id} persisted");
        }
        println!(
            "webhooks: {total} signed deliveries from {CLIENTS} clients, each stored before its 202, in {:.2} s: {:.0}/s",
            elapsed.as_secs_f64(),
            total as f64 / elapsed.as_secs_f64()
        );
        println!(
            "webhooks: latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            at(0.50).as_secs_f64() * 1e3,
            at(0.99).as_secs_f64() * 1e3,
            latencies[total - 1].as_secs_f64() * 1e3
        );
    });
}
