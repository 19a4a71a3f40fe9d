//! For tests (feature `testing`): the real servers, started per test on free loopback ports by
//! `scripts/publish-services` (which installs them when missing) and killed when the test's
//! handle drops; a wheel builder; a proxy that counts blob uploads to a registry; and one that
//! refuses an index's first uploads with 503.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// `scripts/publish-services` of this source tree.
pub fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/publish-services")
}

/// Installs the servers once per test process; panics with the script's output when it fails.
pub fn install() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let out = Command::new(script()).arg("install").output().expect("run scripts/publish-services install");
        assert!(
            out.status.success(),
            "scripts/publish-services install failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new(script()).arg("pip-image").output().expect("run scripts/publish-services pip-image");
        assert!(
            out.status.success(),
            "scripts/publish-services pip-image failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A running server: killed, and its files removed, when dropped.
#[derive(Debug)]
pub struct Service {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub user: String,
    pub password: String,
}

impl Service {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    /// `user:password`, as a secret holds it.
    pub fn secret(&self) -> String {
        format!("{}:{}", self.user, self.password)
    }

    /// Stops the server (as if it went down); its files stay for a restart.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the same server again on the same port and files.
    pub fn restart(&mut self, kind: &str) {
        self.stop();
        self.child = spawn(kind, &self.dir, self.port, &self.user, &self.password);
        wait_for(self.port, kind, &mut self.child);
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(kind: &str, dir: &tempfile::TempDir, port: u16, user: &str, password: &str) -> Child {
    Command::new(script())
        .args([kind, &dir.path().to_string_lossy(), &port.to_string(), user, password])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(dir.path().join("server.log")).expect("log file")))
        .spawn()
        .expect("start the server")
}

fn wait_for(port: u16, kind: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{kind} exited at start with {status}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{kind} did not listen on port {port} within a minute");
}

fn start(kind: &str, user: &str, password: &str) -> Service {
    install();
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let mut child = spawn(kind, &dir, port, user, password);
    wait_for(port, kind, &mut child);
    Service { child, port, dir, user: user.into(), password: password.into() }
}

/// pypiserver 2.4.2, uploads with `user`/`password`, `--overwrite` off.
pub fn pypiserver(user: &str, password: &str) -> Service {
    start("pypiserver", user, password)
}

/// Debian's docker-registry with htpasswd authentication.
pub fn registry(user: &str, password: &str) -> Service {
    start("registry", user, password)
}

/// A wheel of `app` at `version`, built with Python's zipfile (deflated, as wheels are);
/// `body` goes into its module so that two wheels can differ.
pub fn wheel(dir: &std::path::Path, version: &str, body: &str) -> PathBuf {
    let name = format!("app-{version}-py3-none-any.whl");
    let path = dir.join(&name);
    let script = r#"
import sys, zipfile
path, version, body = sys.argv[1:4]
info = f"app-{version}.dist-info"
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("app/__init__.py", body)
    z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: app\nVersion: {version}\nSummary: a test app\n\nThe description.\n")
    z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: cib-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr(f"{info}/RECORD", f"app/__init__.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
"#;
    let status = Command::new("python3")
        .args(["-c", script, &path.to_string_lossy(), version, body])
        .status()
        .expect("python3 runs");
    assert!(status.success(), "building the wheel failed");
    path
}

/// A pass-through proxy counting the requests that write blobs (uploads).
#[derive(Debug)]
pub struct Counting {
    pub port: u16,
    pub blob_writes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Counting {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Counting {
    pub async fn start(target: u16) -> Counting {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let blob_writes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = blob_writes.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { return };
                    pipe(client, server, move |chunk| {
                        let text = String::from_utf8_lossy(chunk);
                        for line in text.lines() {
                            if (line.starts_with("POST ") || line.starts_with("PUT ") || line.starts_with("PATCH "))
                                && line.contains("/blobs/uploads")
                            {
                                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                        }
                        true
                    })
                    .await;
                });
            }
        });
        Counting { port, blob_writes, task }
    }
}

/// A proxy in front of an index that answers 503 to the first `failures` uploads (POSTs), and
/// passes everything else through; it counts the uploads that reached the index.
#[derive(Debug)]
pub struct Flaky {
    pub port: u16,
    pub passed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Flaky {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Flaky {
    pub async fn start(target: u16, failures: usize) -> Flaky {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let refused = std::sync::Arc::new(AtomicUsize::new(0));
        let passed = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = passed.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let refused = refused.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    // Read the head to see the method; one request per connection.
                    let mut head = vec![0u8; 4];
                    if client.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    if &head == b"POST" {
                        if refused.fetch_add(1, Ordering::SeqCst) < failures {
                            let _ = client
                                .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbusy")
                                .await;
                            return;
                        }
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { return };
                    if server.write_all(&head).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        Flaky { port, passed, task }
    }
}

/// Copies both ways; `upstream` sees every chunk going to the server and may stop the copy.
pub async fn pipe(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    mut upstream: impl FnMut(&[u8]) -> bool + Send + 'static,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if !upstream(&buf[..n]) || sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    let down = async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}
