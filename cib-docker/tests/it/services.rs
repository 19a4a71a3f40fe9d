//! Services: reachable by name once ready, waited for, and named when they fail.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cib_core::event::BuildId;
use cib_core::ports::{ErrorKind, Executor, Outcome, StopSignal, Stream};
use cib_core::spec;

use crate::common::*;

fn service(name: &str, script: &str, check: Option<(&str, u64)>) -> spec::Service {
    spec::Service {
        name: name.to_owned(),
        image: IMAGE.to_owned(),
        env: BTreeMap::new(),
        command: Some(vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()]),
        ready: check.map(|(command, timeout)| spec::Readiness {
            command: command.to_owned(),
            interval: spec::Duration::from_secs(1),
            timeout: spec::Duration::from_secs(timeout),
        }),
    }
}

/// A web server that takes two seconds to come up.
const SLOW_WEB: &str =
    "sleep 2; mkdir -p /www && echo hello-from-web > /www/index.html && exec httpd -f -p 8080 -h /www";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_is_reachable_by_name_once_ready() {
    let exec = executor("service").await;
    let build = BuildId::from("svc");
    let web = service("web", SLOW_WEB, Some(("wget -q -O /dev/null http://localhost:8080/", 30)));
    let started = Instant::now();
    exec.start_services(&build, &[web]).await.unwrap_or_else(|(name, e)| panic!("service {name}: {e}"));
    assert!(started.elapsed() >= Duration::from_secs(2), "returned before the service could be ready");

    let dir = tempdir();
    let sink = Sink::new();
    let (_keep, stop) = StopSignal::new();
    let client = job("svc", "client", &["wget -q -O- http://web:8080/"]);
    assert_eq!(exec.run(&step_run(client, dir.path()), sink.clone(), stop).await.ok(), Some(Outcome::Exited(0)));
    assert_eq!(sink.text(Stream::Stdout), "hello-from-web\n");

    // A step without a network cannot reach it.
    let sink = Sink::new();
    let (_keep, stop) = StopSignal::new();
    let mut isolated = job("svc", "isolated", &["wget -q -O- http://web:8080/"]);
    isolated.step.network = spec::Network::None;
    let outcome = exec.run(&step_run(isolated, dir.path()), sink.clone(), stop).await;
    assert!(matches!(outcome, Ok(Outcome::Exited(code)) if code != 0), "{outcome:?}");
    assert!(!sink.text(Stream::Stdout).contains("hello-from-web"));

    exec.cleanup(&build).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_never_gets_ready_is_named() {
    let exec = executor("service-unready").await;
    let build = BuildId::from("unready");
    let fine = service("fine", "exec sleep 300", None);
    let never = service("never", "exec sleep 300", Some(("echo not yet; false", 2)));
    let started = Instant::now();
    let (name, e) = exec.start_services(&build, &[fine, never]).await.err().unwrap_or_else(|| panic!("it got ready"));
    assert_eq!(name, "never");
    assert_eq!(e.kind(), ErrorKind::Permanent);
    assert!(e.message().contains("service never was not ready within 2 s"), "{e}");
    assert!(e.message().contains("not yet"), "the check's output explains it: {e}");
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    exec.cleanup(&build).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    assert_nothing_left(&exec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_exits_is_reported_with_its_output() {
    let exec = executor("service-exits").await;
    let build = BuildId::from("exits");
    let dying = service("dying", "echo cannot open config; exit 3", Some(("true", 30)));
    let started = Instant::now();
    let (name, e) = exec.start_services(&build, &[dying]).await.err().unwrap_or_else(|| panic!("it got ready"));
    assert_eq!(name, "dying");
    assert!(e.message().contains("exited with code 3"), "{e}");
    assert!(e.message().contains("cannot open config"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10), "a dead service must fail at once: {:?}", started.elapsed());
    exec.cleanup(&build).await.unwrap_or_else(|e| panic!("cleanup: {e}"));
    assert_nothing_left(&exec).await;
}
