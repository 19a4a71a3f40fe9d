//! The ways of installing cib that the docs give: `cargo install --locked` and the systemd
//! unit in `docs/cib.service`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// The unit's settings as `(section, key, value)`, in order.
fn settings(unit: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else {
            let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not a setting: {line}"));
            out.push((section.clone(), key.to_owned(), value.to_owned()));
        }
    }
    out
}

fn setting<'a>(all: &'a [(String, String, String)], key: &str) -> Option<&'a str> {
    all.iter().find(|(s, k, _)| s == "Service" && k == key).map(|(_, _, v)| v.as_str())
}

/// The unit with its `ExecStart` pointing at the binary these tests built, since the
/// installed path does not exist here and `systemd-analyze verify` checks that it does.
fn unit_for_this_build(dir: &Path) -> PathBuf {
    let unit = read("docs/cib.service");
    assert!(unit.contains("ExecStart=/usr/local/bin/cib "), "the unit runs /usr/local/bin/cib");
    let path = dir.join("cib.service");
    std::fs::write(
        &path,
        unit.replace("ExecStart=/usr/local/bin/cib ", &format!("ExecStart={} ", env!("CARGO_BIN_EXE_cib"))),
    )
    .expect("write unit");
    path
}

#[test]
fn the_service_unit_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().expect("temp dir");
    let unit = unit_for_this_build(dir.path());
    // `verify` reports unknown keys and values it cannot parse as warnings with exit 0, so
    // any output at all counts as a failure.
    let out = Command::new("systemd-analyze").arg("verify").arg(&unit).output().expect("systemd-analyze runs");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
}

#[test]
fn the_service_unit_restarts_hardens_and_serves() {
    let all = settings(&read("docs/cib.service"));
    for (key, value) in [
        ("Restart", "on-failure"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ReadWritePaths", "/var/lib/cib"),
        ("StateDirectory", "cib"),
        ("SupplementaryGroups", "docker"),
    ] {
        assert_eq!(setting(&all, key), Some(value), "{key}");
    }
    // The stop allows more than the default shutdown_grace of 30 s, as docs/operations.md asks.
    let stop = setting(&all, "TimeoutStopSec").expect("TimeoutStopSec");
    let seconds: u64 = stop.trim_end_matches('s').parse().expect("seconds");
    assert!(seconds > 30, "TimeoutStopSec={stop}");

    // ExecStart is `cib serve` with options the real binary accepts: run it with `--help`.
    let exec = setting(&all, "ExecStart").expect("ExecStart");
    let words: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(&words[..2], ["/usr/local/bin/cib", "serve"], "{exec}");
    let help = Command::new(env!("CARGO_BIN_EXE_cib")).args(&words[1..]).arg("--help").output().expect("cib runs");
    assert!(help.status.success(), "{}", String::from_utf8_lossy(&help.stderr));
    for option in words[2..].iter().filter(|w| w.starts_with("--")) {
        assert!(String::from_utf8_lossy(&help.stdout).contains(option), "cib serve has no {option}");
    }
}

#[test]
fn the_docs_give_the_install_command_and_the_unit() {
    let install = "cargo install --locked --path cib-server";
    for doc in ["README.md", "docs/operations.md", "docs/cib.service"] {
        assert!(read(doc).contains(install), "{doc} does not say {install}");
    }
    assert!(read("README.md").contains("docs/cib.service"));
    assert!(read("docs/operations.md").contains("(cib.service)"));
    // The unit's data directory is the one docs/operations.md configures.
    assert!(read("docs/operations.md").contains("data_dir = \"/var/lib/cib\""));
}

/// `--locked` refuses to build when `Cargo.lock` does not match the manifests, so the
/// documented install works only while the lock file is up to date.
#[test]
fn the_lock_file_is_up_to_date_for_a_locked_install() {
    let out = Command::new(env!("CARGO"))
        // `tree` resolves like `install` does, for this machine's platform only, so it needs no
        // crate that the build does not need.
        .args(["tree", "--locked", "--offline", "-p", "cib-server", "-e", "normal"])
        .current_dir(root())
        .output()
        .expect("cargo runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The commit this checkout is at, which the image is told to show in `cib --version`.
fn head_commit() -> String {
    let out = Command::new("git").args(["rev-parse", "HEAD"]).current_dir(root()).output().expect("git runs");
    assert!(out.status.success(), "git rev-parse HEAD: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8").trim().to_owned()
}

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker").args(args).output().unwrap_or_else(|e| panic!("docker {args:?}: {e}"))
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The socket the daemon answers on, from `DOCKER_HOST` when it names one.
fn docker_socket() -> String {
    match std::env::var("DOCKER_HOST") {
        Ok(host) if host.starts_with("unix://") => host.trim_start_matches("unix://").to_owned(),
        _ => "/var/run/docker.sock".to_owned(),
    }
}

/// `GET /healthz` over plain HTTP/1.1: the status code, or why there is none yet.
fn healthz(port: u16) -> Result<u16, String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5))).map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|e| e.to_string())?;
    let status = answer.split_whitespace().nth(1).ok_or_else(|| format!("no status line in '{answer}'"))?;
    status.parse().map_err(|_| format!("status '{status}' in '{answer}'"))
}

/// Removes the container and the volume whatever the test's outcome, so a failed run leaves
/// nothing behind on the daemon.
struct Running {
    container: String,
    volume: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.container]);
        let _ = docker(&["volume", "rm", "-f", &self.volume]);
    }
}

/// The repository's `Dockerfile` builds, from the local stand-ins of its two Debian bookworm
/// bases (`scripts/build-test-images` makes them; nothing can be pulled here), and the image
/// runs `cib serve` as the docs say: its data directory on a volume and the host's Docker
/// through the mounted socket, which `cib serve` connects to before it listens. So an answer on
/// `/healthz` proves the binary, the user, the volume and the socket all work.
#[test]
fn the_docker_image_builds_and_answers_healthz() {
    let images = Command::new("bash").arg(root().join("scripts/build-test-images")).output().expect("bash runs");
    assert!(images.status.success(), "build-test-images: {}", String::from_utf8_lossy(&images.stderr));
    let commit = head_commit();
    let tag = "cib-test/cib:suite";
    let commit_arg = format!("CIB_BUILD_COMMIT={commit}");
    let root = root();
    let context = root.to_str().expect("utf-8 path");
    docker_ok(&[
        "build",
        "--quiet",
        // A failed step's container is removed too, so a broken build leaves nothing behind.
        "--force-rm",
        "--build-arg",
        "BUILDER=rust:1.95",
        "--build-arg",
        "RUNTIME=python:3.11-slim",
        "--build-arg",
        &commit_arg,
        "--build-arg",
        "CARGO_PROFILE=image-test",
        "--label",
        "org.cib.test=packaging",
        "-t",
        tag,
        context,
    ]);

    // The version names the commit, and the process is not root.
    let version = docker_ok(&["run", "--rm", "--entrypoint", "cib", tag, "--version"]);
    assert!(version.contains(&commit[..12]), "cib --version in the image says '{version}', not {commit}");
    assert_eq!(docker_ok(&["run", "--rm", "--entrypoint", "id", tag, "-un"]), "cib");

    let name = format!("cib-packaging-{}", std::process::id());
    let run = Running { container: name.clone(), volume: format!("{name}-data") };
    let socket = docker_socket();
    let gid = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&socket).unwrap_or_else(|e| panic!("{socket}: {e}")).gid().to_string()
    };
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &run.container,
        "-p",
        "127.0.0.1::8080",
        "-v",
        &format!("{}:/var/lib/cib", run.volume),
        "-v",
        &format!("{socket}:/var/run/docker.sock"),
        "--group-add",
        &gid,
        tag,
    ]);
    let port: u16 = docker_ok(&["port", &run.container, "8080/tcp"])
        .lines()
        .next()
        .and_then(|l| l.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("a published port");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let last = match healthz(port) {
            Ok(200) => break,
            Ok(code) => format!("status {code}"),
            Err(e) => e,
        };
        let state = docker_ok(&["inspect", "--format", "{{.State.Status}}", &run.container]);
        assert!(
            state == "running",
            "the container is {state}; its output:\n{}",
            String::from_utf8_lossy(&docker(&["logs", &run.container]).stderr)
        );
        assert!(std::time::Instant::now() < deadline, "no 200 from /healthz within 60 s: {last}");
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    // The server wrote its database into the volume, not into the container's own layer.
    let files = docker_ok(&["run", "--rm", "-v", &format!("{}:/data", run.volume), "--entrypoint", "ls", tag, "/data"]);
    assert!(files.lines().any(|f| f == "cib.db"), "the data volume holds {files:?}");
}

/// The recipe the Dockerfile's `plan` stage makes from a context, as one digest of its files'
/// names and contents: what decides whether the dependency layer is reused (`COPY --from` is
/// cached by content).
fn recipe_digest(context: &Path, tag: &str, made: &mut Vec<String>) -> String {
    let context = context.to_str().expect("utf-8 path");
    made.push(docker_ok(&[
        "build",
        "--quiet",
        "--force-rm",
        "--target",
        "plan",
        "--build-arg",
        "BUILDER=rust:1.95",
        "-t",
        tag,
        context,
    ]));
    docker_ok(&[
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        tag,
        "-c",
        "cd /recipe && find . -type f | sort | xargs sha256sum | sha256sum",
    ])
}

/// The docs' claim about the image's dependency layer: a change to a source file leaves the
/// recipe the dependencies are built from as it was, so they are not compiled again, while a
/// change to a manifest makes a new recipe. The recipe holds no line of cib's sources.
#[test]
fn the_images_dependency_layer_outlives_a_source_change_but_not_a_manifest_change() {
    let images = Command::new("bash").arg(root().join("scripts/build-test-images")).output().expect("bash runs");
    assert!(images.status.success(), "build-test-images: {}", String::from_utf8_lossy(&images.stderr));
    let context = tempfile::tempdir().expect("temp dir");
    let archive =
        Command::new("git").args(["archive", "--format=tar", "HEAD"]).current_dir(root()).output().expect("git");
    assert!(archive.status.success(), "git archive: {}", String::from_utf8_lossy(&archive.stderr));
    let mut untar = Command::new("tar")
        .args(["-x", "-C"])
        .arg(context.path())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("tar");
    std::io::Write::write_all(untar.stdin.as_mut().expect("stdin"), &archive.stdout).expect("untar");
    drop(untar.stdin.take());
    assert!(untar.wait().expect("tar").success());

    let tag = format!("cib-test/recipe:{}", std::process::id());
    // Every image the test builds is removed, the untagged earlier ones too.
    struct Remove(Vec<String>);
    impl Drop for Remove {
        fn drop(&mut self) {
            for image in &self.0 {
                let _ = docker(&["rmi", "-f", image]);
            }
        }
    }
    let mut made = Remove(Vec::new());
    let before = recipe_digest(context.path(), &tag, &mut made.0);

    let lib = context.path().join("cib-core/src/lib.rs");
    let mut source = std::fs::read_to_string(&lib).expect("lib.rs");
    source.push_str("\n// a change to a source file\npub const RECIPE_PROBE: u8 = 1;\n");
    std::fs::write(&lib, source).expect("write lib.rs");
    assert_eq!(recipe_digest(context.path(), &tag, &mut made.0), before, "a source change made a new recipe");
    let stubs = docker_ok(&["run", "--rm", "--entrypoint", "cat", &tag, "/recipe/cib-core/src/lib.rs"]);
    assert_eq!(stubs, "pub fn main() {}", "the recipe holds sources");

    let manifest = context.path().join("cib-core/Cargo.toml");
    let mut text = std::fs::read_to_string(&manifest).expect("Cargo.toml");
    text.push_str("\n# a change to a manifest\n");
    std::fs::write(&manifest, text).expect("write Cargo.toml");
    assert_ne!(recipe_digest(context.path(), &tag, &mut made.0), before, "a manifest change kept the recipe");
}
