//! `cib run` end to end: a temporary Git repository, real Docker, and the command as a user
//! runs it, with its output and exit codes.

use std::path::Path;
use std::process::{Command, Output};

use super::server::git;

/// A repository on branch `feature/e2e` holding `spec` and a script.
fn project(spec: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    git(dir.path(), &["init", "-q", "-b", "feature/e2e"]);
    std::fs::write(dir.path().join(".cib.yml"), spec).expect("write spec");
    std::fs::write(dir.path().join("check.sh"), "#!/bin/sh\necho \"checking $1\"\n").expect("write script");
    std::fs::set_permissions(dir.path().join("check.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    git(dir.path(), &["add", "."]);
    git(dir.path(), &["commit", "-q", "-m", "start"]);
    dir
}

fn cib_run(dir: &Path, args: &[&str]) -> Output {
    cib_run_with_pid(dir, args).0
}

/// Runs `cib run` and returns its output and its process id (which names it in Docker).
fn cib_run_with_pid(dir: &Path, args: &[&str]) -> (Output, u32) {
    let child = Command::new(env!("CARGO_BIN_EXE_cib"))
        .arg("run")
        .args(args)
        .current_dir(dir)
        .env("CIB_DATA_DIR", dir.join(".cib-data"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run cib");
    let pid = child.id();
    (child.wait_with_output().expect("cib ends"), pid)
}

/// What a `cib run` process left in Docker: containers, volumes and networks with its name.
fn left_in_docker(pid: u32) -> Vec<String> {
    let label = format!("label=org.cib.engine=cib-run-{pid}");
    let mut left = Vec::new();
    for kind in [
        &["ps", "-a", "--format", "container {{.Names}} {{.Status}}"][..],
        &["volume", "ls", "--format", "volume {{.Name}}"][..],
        &["network", "ls", "--format", "network {{.Name}}"][..],
    ] {
        let out = Command::new("docker").args(kind).args(["--filter", &label]).output().expect("docker answers");
        left.extend(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned));
    }
    left
}

const SPEC: &str = r#"
pipelines:
  test:
    services:
      web:
        image: busybox
        command: ["sh", "-c", "mkdir -p /www && echo hello-from-web > /www/index.html && exec httpd -f -p 8080 -h /www"]
        ready: wget -q -O /dev/null http://localhost:8080/
    steps:
      - name: lint
        image: busybox
        services: []
        commands: [./check.sh lint, "echo lint-done"]
      - name: unit
        image: busybox
        secrets: [API_TOKEN]
        commands:
          - ./check.sh unit
          - wget -q -O - http://web:8080/
          - echo "token is $API_TOKEN"
      - name: flaky
        image: busybox
        services: []
        commands: ["echo about to fail", "exit 3"]
      - name: package
        image: busybox
        depends_on: [lint, unit]
        services: []
        commands: ["echo packaged by $CIB_STEP with MODE=$MODE"]
      - name: after-flaky
        image: busybox
        depends_on: [flaky]
        services: []
        commands: ["echo never"]
"#;

#[test]
fn a_run_with_parallel_steps_a_service_a_secret_and_a_failure() {
    let dir = project(SPEC);
    let (out, pid) =
        cib_run_with_pid(dir.path(), &["--secret", "API_TOKEN=sup3r-s3cret", "--env", "MODE=e2e", "--color", "never"]);
    assert!(left_in_docker(pid).is_empty(), "cib run left {:?} in Docker", left_in_docker(pid));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "a failing step fails the run\n{stdout}\n{stderr}");
    assert!(stdout.starts_with("cib run: push on feature/e2e → test\n"), "{stdout}");
    // Output is prefixed by its step, the service answered by name, and the secret is masked.
    assert!(stdout.contains("lint | checking lint"), "{stdout}");
    assert!(stdout.contains("unit | hello-from-web"), "{stdout}");
    assert!(stdout.contains("unit | token is ***"), "{stdout}");
    assert!(!stdout.contains("sup3r-s3cret") && !stderr.contains("sup3r-s3cret"), "the secret leaked");
    assert!(stdout.contains("package | packaged by package with MODE=e2e"), "{stdout}");
    assert!(stdout.contains("flaky | about to fail"), "{stdout}");
    assert!(stdout.contains("web ● service ready"), "{stdout}");
    assert!(!stdout.contains("never"), "a step after a failure does not run: {stdout}");
    // The summary: one row per step, and the pipeline's conclusion.
    let summary: Vec<&str> = stdout.lines().skip_while(|l| !l.starts_with("STEP")).collect();
    assert!(summary[0].starts_with("STEP") && summary[0].contains("RESULT"), "{stdout}");
    let row = |step: &str| summary.iter().find(|l| l.starts_with(&format!("{step} "))).copied().unwrap_or_default();
    assert!(row("lint").contains("success"), "{stdout}");
    assert!(row("unit").contains("success"), "{stdout}");
    assert!(row("package").contains("success"), "{stdout}");
    assert!(row("flaky").contains("failed") && row("flaky").contains("exit code 3"), "{stdout}");
    assert!(row("after-flaky").contains("skipped"), "{stdout}");
    assert!(stdout.contains("pipeline test failed in"), "{stdout}");
}

#[test]
fn only_the_chosen_step_runs_and_success_exits_0() {
    let dir = project(SPEC);
    let out = cib_run(dir.path(), &["--step", "lint", "--color", "never"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("lint | lint-done"), "{stdout}");
    assert!(!stdout.contains("unit"), "{stdout}");
    assert!(stdout.contains("pipeline test succeeded"), "{stdout}");
}

#[test]
fn a_broken_spec_gives_its_diagnostics_and_exit_2() {
    let dir = project("pipelines:\n  test:\n    steps:\n      - name: a\n        imag: busybox\n");
    let out = cib_run(dir.path(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains(".cib.yml:5:9: error: unknown key 'imag' (did you mean 'image'?)"), "{stderr}");
}

#[test]
fn a_missing_secret_is_a_usage_error() {
    let dir = project(SPEC);
    let out = cib_run(dir.path(), &["--step", "unit"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs the secret API_TOKEN"));
}

#[test]
fn no_docker_daemon_gives_a_clear_message_and_exit_3() {
    let dir = project(SPEC);
    let out = Command::new(env!("CARGO_BIN_EXE_cib"))
        .args(["run", "--step", "lint"])
        .current_dir(dir.path())
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .output()
        .expect("run cib");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("cannot use Docker") && stderr.contains("Start a Docker daemon"), "{stderr}");
}

#[test]
fn a_clean_checkout_of_a_commit_ignores_the_working_tree() {
    let dir = project(SPEC);
    std::fs::write(dir.path().join("check.sh"), "#!/bin/sh\necho \"edited $1\"\n").expect("edit");
    let out = cib_run(dir.path(), &["--step", "lint", "--commit", "HEAD", "--color", "never"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("lint | checking lint"), "the committed script ran: {stdout}");
    let out = cib_run(dir.path(), &["--step", "lint", "--color", "never"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("lint | edited lint"), "the working tree ran");
}

#[test]
fn a_step_over_the_limits_is_refused_and_one_without_a_timeout_gets_the_default() {
    // Over the built-in maximum of a day: refused before anything runs.
    let long = "pipelines:\n  test:\n    on: { push: {} }\n    steps:\n      - { name: a, image: busybox, commands: [\"true\"], timeout: 2d }\n";
    let dir = project(long);
    let out = cib_run(dir.path(), &["--color", "never"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(".cib.yml:5:65: error: pipelines.test.steps.a.timeout is 2d, over this server's limit of 1d"),
        "{stderr}"
    );

    // A configuration's default step timeout ends a step whose spec gives none, in real Docker.
    let sleepy = "pipelines:\n  test:\n    on: { push: {} }\n    steps:\n      - { name: nap, image: busybox, commands: [\"sleep 60\"] }\n";
    let dir = project(sleepy);
    let config = dir.path().join("cib.toml");
    std::fs::write(&config, "[limits]\nstep_timeout = \"2s\"\n").expect("config");
    let started = std::time::Instant::now();
    let (out, pid) = cib_run_with_pid(dir.path(), &["--color", "never", "--config", config.to_str().expect("path")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("timed out") || stdout.contains("timed_out"), "{stdout}");
    assert!(started.elapsed() < std::time::Duration::from_secs(45), "the step was stopped, not left to sleep");
    assert!(left_in_docker(pid).is_empty(), "{:?}", left_in_docker(pid));
}

const MATRIX: &str = r#"
pipelines:
  test:
    steps:
      - name: unit
        image: "{{ matrix.image }}"
        matrix:
          image: [busybox]
          a: [x, y]
          b: ["1", "2"]
          exclude: [{ a: y, b: "2" }]
          include: [{ image: busybox, a: z, b: "3" }]
        commands:
          - echo "cell $MATRIX_A-$MATRIX_B as $CIB_STEP"
          - test "$MATRIX_A" != z
      - name: after
        image: busybox
        depends_on: [unit]
        allow_failure: true
        commands: ["echo after all cells"]
"#;

/// The summary's row for a step, by the step's name.
fn summary_row<'a>(stdout: &'a str, step: &str) -> &'a str {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with("STEP"))
        .find(|l| l.starts_with(&format!("{step} ")))
        .unwrap_or_default()
}

#[test]
fn a_two_by_two_matrix_with_one_exclude_and_one_include_runs_four_cells_each_with_its_own_status() {
    let dir = project(MATRIX);
    let (out, pid) = cib_run_with_pid(dir.path(), &["--color", "never"]);
    assert!(left_in_docker(pid).is_empty(), "cib run left {:?} in Docker", left_in_docker(pid));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "the z cell fails the run\n{stdout}");
    for (a, b, status) in [("x", "1", "success"), ("x", "2", "success"), ("y", "1", "success"), ("z", "3", "failed")] {
        let cell = format!("unit (image=busybox, a={a}, b={b})");
        let cell = cell.as_str();
        assert!(stdout.contains(&format!("cell {a}-{b} as {cell}")), "{cell} ran with its values\n{stdout}");
        assert!(summary_row(&stdout, cell).contains(status), "{cell} is {status}\n{stdout}");
    }
    assert!(!stdout.contains("a=y, b=2"), "the excluded cell does not exist\n{stdout}");
    assert!(summary_row(&stdout, "after").contains("skipped"), "after waits for every cell\n{stdout}");
}

#[test]
fn fail_fast_cancels_the_other_cells() {
    let spec = r#"
pipelines:
  test:
    steps:
      - name: unit
        image: busybox
        matrix: { n: ["1", "2", "3"] }
        fail_fast: true
        commands:
          - if [ "$MATRIX_N" = 1 ]; then sleep 1; exit 4; fi
          - sleep 60
"#;
    let dir = project(spec);
    let started = std::time::Instant::now();
    let (out, pid) = cib_run_with_pid(dir.path(), &["--color", "never"]);
    assert!(left_in_docker(pid).is_empty(), "cib run left {:?} in Docker", left_in_docker(pid));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(45),
        "the sleeping cells were not left to run\n{stdout}"
    );
    assert!(summary_row(&stdout, "unit (n=1)").contains("failed"), "{stdout}");
    assert!(summary_row(&stdout, "unit (n=2)").contains("cancelled"), "{stdout}");
    assert!(summary_row(&stdout, "unit (n=3)").contains("cancelled"), "{stdout}");
}

#[test]
fn a_matrix_of_257_cells_is_refused_at_its_line_by_lint_plan_and_run() {
    let values = |p: &str| (0..16).map(|i| format!("{p}{i}")).collect::<Vec<_>>().join(", ");
    let spec = format!(
        "pipelines:\n  test:\n    steps:\n      - name: unit\n        image: busybox\n        commands: [true]\n        matrix:\n          a: [{}]\n          b: [{}]\n          include: [{{ a: extra, b: extra }}]\n",
        values("a"),
        values("b")
    );
    let dir = project(&spec);
    let lint = Command::new(env!("CARGO_BIN_EXE_cib")).arg("lint").current_dir(dir.path()).output().expect("lint");
    let stdout = String::from_utf8_lossy(&lint.stdout).into_owned() + &String::from_utf8_lossy(&lint.stderr);
    assert_eq!(lint.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains(".cib.yml:7:9: error: the matrix makes 257 cells, over the limit of 256"), "{stdout}");
    let out = cib_run(dir.path(), &["--color", "never"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("7:9: error: the matrix makes 257 cells"), "{text}");
}

/// A build that leaves much to remove: a network, a service, the workspace volume, warm
/// containers of two settings and the container of an isolated step.
const MANY_KINDS: &str = r#"
pipelines:
  test:
    services:
      web:
        image: busybox
        command: ["sh", "-c", "mkdir -p /www && echo up > /www/index.html && exec httpd -f -p 8080 -h /www"]
        ready: wget -q -O /dev/null http://localhost:8080/
    steps:
      - { name: a, image: busybox, commands: ["wget -q -O /dev/null http://web:8080/"] }
      - { name: b, image: busybox, isolated: true, services: [], commands: ["true"] }
      - { name: c, image: busybox, network: none, services: [], commands: ["true"], depends_on: [a] }
      - { name: d, image: busybox, network: none, services: [], commands: ["true"], depends_on: [c] }
      - { name: e, image: busybox, network: none, services: [], commands: ["true"], depends_on: [d] }
"#;

#[test]
fn a_run_killed_during_its_background_cleanup_leaves_nothing_once_reconciled() {
    use std::io::BufRead;
    let dir = project(MANY_KINDS);
    // The outcome is reported before the cleanup ends, so a kill right after the report lands
    // during the cleanup; should the cleanup have been quicker than the kill, the run is tried
    // again, since a kill after it proves nothing.
    for _ in 0..3 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cib"))
            .args(["run", "--color", "never"])
            .current_dir(dir.path())
            .env("CIB_DATA_DIR", dir.path().join(".cib-data"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run cib");
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout");
        let mut seen = String::new();
        let mut reported = false;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            seen.push_str(&line);
            seen.push('\n');
            if line.starts_with("pipeline test succeeded") {
                reported = true;
                break;
            }
        }
        // SIGKILL: no destructor and no cleanup run, as when the machine loses power.
        child.kill().expect("kill cib");
        let _ = child.wait();
        assert!(reported, "the run did not succeed:\n{seen}");
        let left = left_in_docker(pid);
        if left.is_empty() {
            continue;
        }
        // The next `cib run` reconciles what runs that no longer exist left behind.
        let (out, next) = cib_run_with_pid(dir.path(), &["--color", "never", "--step", "b"]);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
        assert!(left_in_docker(pid).is_empty(), "after the reconcile, the killed run left {:?}", left_in_docker(pid));
        assert!(left_in_docker(next).is_empty(), "the second run left {:?}", left_in_docker(next));
        return;
    }
    panic!("in three runs the kill never landed before the cleanup ended");
}
