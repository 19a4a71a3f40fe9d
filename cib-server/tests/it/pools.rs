//! Resource pools through the real server and SQLite: contention, queue positions, people's
//! leases, and who may do what.

use std::time::{Duration, Instant};

use cib_core::event::EventBody;
use cib_core::ports::{BuildStatus, Store};
use cib_server::config::{PoolFileConfig, Role, UnitConfig};

use super::server::{TestServer, token};

fn devices(n: usize) -> PoolFileConfig {
    PoolFileConfig {
        name: "devices".into(),
        units: (1..=n)
            .map(|i| UnitConfig { name: format!("d{i}"), metadata: [("serial".into(), format!("SN{i}"))].into() })
            .collect(),
        capacity: None,
    }
}

async fn trigger(s: &TestServer) -> String {
    let body = serde_json::to_vec(&serde_json::json!({ "repo": "acme/shop", "ref": "feature/x", "pipeline": "test" }))
        .expect("json");
    let answer = s.request("POST", "/api/v1/builds", Some(&token(Role::Trigger)), &body).await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    serde_json::from_str::<serde_json::Value>(&answer.body).expect("json")["build"].as_str().expect("id").to_owned()
}

async fn pools(s: &TestServer) -> serde_json::Value {
    let answer = s.request("GET", "/api/v1/pools", Some(&token(Role::Read)), b"").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    serde_json::from_str(&answer.body).expect("json")
}

/// The holders of `devices` and its waiting queue, as the API shows them.
async fn devices_view(s: &TestServer) -> (Vec<String>, Vec<(String, u64)>) {
    let v = pools(s).await;
    let pool = &v["pools"][0];
    let holders =
        pool["leases"].as_array().into_iter().flatten().map(|l| l["lease"].as_str().unwrap_or("").to_owned()).collect();
    let waiting = pool["waiting"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| (w["lease"].as_str().unwrap_or("").to_owned(), w["position"].as_u64().unwrap_or(99)))
        .collect();
    (holders, waiting)
}

async fn wait_until<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const CONTENDED: &str = r#"
pipelines:
  test:
    on: { manual: {} }
    resources: [{ pool: devices }]
    steps:
      - { name: use, image: busybox, commands: ["echo using $CIB_RESOURCE_DEVICES_0_NAME", "sleep 0.05"] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_pipelines_contending_for_three_units_never_hold_more_and_are_served_in_order() {
    let s = TestServer::start_configured(CONTENDED, |c| c.pools = vec![devices(3)]).await;
    let mut ids = Vec::new();
    for _ in 0..50 {
        ids.push(trigger(&s).await);
    }
    s.wait_builds(|b| b.len() == 50 && b.iter().all(|x| x.status == BuildStatus::Success)).await;
    let events = s.store.events_after(0, 100_000).await.expect("events");
    let mut held: i64 = 0;
    let mut most = 0;
    let mut granted_order = Vec::new();
    for e in &events {
        match &e.body {
            EventBody::LeaseGranted { lease, units, .. } if units.contains_key("devices") => {
                held += units["devices"].len() as i64;
                most = most.max(held);
                granted_order.push(lease.clone());
            }
            EventBody::LeaseReleased { lease, .. }
            | EventBody::LeaseExpired { lease, .. }
            | EventBody::LeaseRevoked { lease, .. }
                if granted_order.contains(lease) =>
            {
                held -= 1;
            }
            _ => {}
        }
    }
    assert!(most <= 3, "{most} units held at once");
    assert_eq!(most, 3, "the pool was used fully");
    assert_eq!(held, 0, "every unit came back");
    assert_eq!(granted_order, ids, "first come, first served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persons_lease_blocks_builds_and_the_api_shows_the_queue_at_every_step() {
    let spec = r#"
pipelines:
  test:
    on: { manual: {} }
    resources: [{ pool: devices }]
    steps:
      - { name: use, image: busybox, commands: ["sleep 0.4"] }
"#;
    let s = TestServer::start_configured(spec, |c| c.pools = vec![devices(1)]).await;
    let take =
        serde_json::to_vec(&serde_json::json!({ "pool": "devices", "for": "1h", "reason": "trying checkout by hand" }))
            .expect("json");
    let answer = s.request("POST", "/api/v1/leases", Some(&token(Role::Trigger)), &take).await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    let mine: serde_json::Value = serde_json::from_str(&answer.body).expect("json");
    assert_eq!(mine["granted"], true);
    let lease = mine["lease"].as_str().expect("id").to_owned();

    let b1 = trigger(&s).await;
    let b2 = trigger(&s).await;
    let b3 = trigger(&s).await;
    let (holders, waiting) = devices_view(&s).await;
    assert_eq!(holders, std::slice::from_ref(&lease));
    assert_eq!(waiting, [(b1.clone(), 0), (b2.clone(), 1), (b3.clone(), 2)]);
    // Someone else may not give it back; the holder may.
    let answer = s.request("POST", &format!("/api/v1/leases/{lease}/return"), Some(&token(Role::Approve)), b"").await;
    assert_eq!(answer.status, 403, "{}", answer.body);
    let answer = s.request("POST", &format!("/api/v1/leases/{lease}/return"), Some(&token(Role::Trigger)), b"").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    // Each build in turn: the API shows the holder and the rest of the queue, shifted.
    for (i, (current, rest)) in
        [(b1.clone(), vec![b2.clone(), b3.clone()]), (b2.clone(), vec![b3.clone()]), (b3.clone(), vec![])]
            .into_iter()
            .enumerate()
    {
        wait_until("the next build holds the unit", || {
            let current = current.clone();
            let s = &s;
            async move { devices_view(s).await.0 == [current] }
        })
        .await;
        let (_, waiting) = devices_view(&s).await;
        let expected: Vec<(String, u64)> = rest.iter().enumerate().map(|(p, b)| (b.clone(), p as u64)).collect();
        assert_eq!(waiting, expected, "step {i}");
    }
    s.wait_builds(|b| b.iter().filter(|x| x.status == BuildStatus::Success).count() == 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_extended_revoked_and_refused_with_reasons() {
    let s = TestServer::start_configured(CONTENDED, |c| c.pools = vec![devices(2)]).await;
    let take = |body: serde_json::Value| serde_json::to_vec(&body).expect("json");
    let t = token(Role::Trigger);
    for (body, status) in [
        (serde_json::json!({ "pool": "phones", "for": "1h" }), 422),
        (serde_json::json!({ "pool": "devices", "count": 3, "for": "1h" }), 422),
        (serde_json::json!({ "pool": "devices", "for": "soon" }), 400),
        (serde_json::json!({ "pool": "devices" }), 400),
    ] {
        let answer = s.request("POST", "/api/v1/leases", Some(&t), &take(body.clone())).await;
        assert_eq!(answer.status, status, "{body}: {}", answer.body);
        assert!(answer.body.contains("error"));
    }
    let answer = s
        .request("POST", "/api/v1/leases", Some(&t), &take(serde_json::json!({ "pool": "devices", "for": "10m" })))
        .await;
    let lease = serde_json::from_str::<serde_json::Value>(&answer.body).expect("json")["lease"]
        .as_str()
        .expect("id")
        .to_owned();
    let before =
        serde_json::from_str::<serde_json::Value>(&answer.body).expect("json")["expires_at"].as_u64().expect("expiry");
    let answer = s
        .request("POST", &format!("/api/v1/leases/{lease}/extend"), Some(&t), &take(serde_json::json!({ "for": "2h" })))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let after =
        serde_json::from_str::<serde_json::Value>(&answer.body).expect("json")["expires_at"].as_u64().expect("expiry");
    assert!(after >= before + 100 * 60 * 1000, "extended from {before} to {after}");
    let answer = s.request("POST", &format!("/api/v1/leases/{lease}/revoke"), Some(&token(Role::Approve)), b"").await;
    assert_eq!(answer.status, 403, "only admins revoke");
    let answer = s.request("POST", &format!("/api/v1/leases/{lease}/revoke"), Some(&token(Role::Admin)), b"").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let answer = s.request("GET", &format!("/api/v1/leases/{lease}"), Some(&token(Role::Read)), b"").await;
    assert_eq!(answer.status, 404, "a revoked lease is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_commands_talk_to_the_server() {
    let s = TestServer::start_configured(CONTENDED, |c| c.pools = vec![devices(1)]).await;
    let cib = |args: Vec<String>, role: Role| {
        let url = s.url.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_cib"))
                    .args(&args)
                    .env("CIB_SERVER", url)
                    .env("CIB_TOKEN", token(role))
                    .output()
                    .expect("run cib")
            })
            .await
            .expect("join")
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let out = cib(args(&["lease", "take", "devices", "--for", "30m", "--reason", "poking at it"]), Role::Trigger).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(": granted until"), "{text}");
    let lease = text.split(':').next().expect("the lease id").to_owned();
    let out = cib(args(&["pool", "list"]), Role::Read).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("devices: 0 of 1 free") && text.contains(&format!("held by trigger ({lease})")), "{text}");
    let out = cib(args(&["lease", "revoke", &lease]), Role::Trigger).await;
    assert_eq!(out.status.code(), Some(1), "only admins revoke");
    assert!(String::from_utf8_lossy(&out.stderr).contains("403"));
    let out = cib(args(&["lease", "extend", &lease, "--for", "2h"]), Role::Trigger).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cib(args(&["lease", "return", &lease]), Role::Trigger).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cib(args(&["pool", "list"]), Role::Read).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("devices: 1 of 1 free"));
}
