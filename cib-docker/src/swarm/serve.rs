//! The workspace server: how a build's checkout reaches the node Swarm picked for it.
//!
//! The executor packs the checkout into a tar archive and offers it here under a random
//! one-time token; the fill job on the node downloads it with `wget` and unpacks it into the
//! workspace volume. A token serves one download and is dropped when the fill ends, whatever
//! its outcome, so a leaked URL (it is visible in `docker service inspect` while the fill job
//! exists) is worth nothing afterwards. Plain HTTP/1.0 is enough for one GET: nothing else is
//! spoken, and a request that is not `GET /<token>` is answered 404.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Offers archives under one-time tokens, on a port of its own.
#[derive(Debug, Clone)]
pub struct WorkspaceServer {
    offers: Arc<Mutex<HashMap<String, Bytes>>>,
    port: u16,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// 128 random bits from the kernel, in hex.
pub fn token() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl WorkspaceServer {
    /// Listens on `bind` and serves until the process ends.
    pub async fn start(bind: std::net::SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(bind).await?;
        let port = listener.local_addr()?.port();
        let offers: Arc<Mutex<HashMap<String, Bytes>>> = Arc::default();
        let served = offers.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let offers = served.clone();
                tokio::spawn(async move {
                    // A client that does not finish its request in time is dropped.
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), serve(stream, offers)).await;
                });
            }
        });
        Ok(WorkspaceServer { offers, port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Offers `archive` under a fresh token, until it is downloaded or withdrawn.
    pub fn offer(&self, archive: Bytes) -> std::io::Result<String> {
        let token = token()?;
        lock(&self.offers).insert(token.clone(), archive);
        Ok(token)
    }

    pub fn withdraw(&self, token: &str) {
        lock(&self.offers).remove(token);
    }
}

async fn serve(mut stream: tokio::net::TcpStream, offers: Arc<Mutex<HashMap<String, Bytes>>>) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 8192 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let found = match (parts.next(), parts.next()) {
        (Some("GET"), Some(path)) => lock(&offers).remove(path.trim_start_matches('/')),
        _ => None,
    };
    match found {
        Some(body) => {
            let header = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: application/x-tar\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            stream.write_all(header.as_bytes()).await?;
            stream.write_all(&body).await?;
        }
        None => {
            stream.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await?;
        }
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(port: u16, path: &str) -> Vec<u8> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap_or_else(|e| panic!("{e}"));
        s.write_all(format!("GET /{path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap_or_else(|e| panic!("{e}"));
        out
    }

    #[tokio::test]
    async fn a_token_serves_once_and_nothing_else_is_served() {
        let server = WorkspaceServer::start("127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}")))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let token = server.offer(Bytes::from_static(b"archive")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(token.len(), 32);
        let first = get(server.port(), &token).await;
        assert!(first.starts_with(b"HTTP/1.0 200") && first.ends_with(b"\r\n\r\narchive"), "{first:?}");
        assert!(get(server.port(), &token).await.starts_with(b"HTTP/1.0 404"), "a token serves once");
        let other = server.offer(Bytes::from_static(b"x")).unwrap_or_else(|e| panic!("{e}"));
        server.withdraw(&other);
        assert!(get(server.port(), &other).await.starts_with(b"HTTP/1.0 404"), "a withdrawn token serves nothing");
        assert!(get(server.port(), "").await.starts_with(b"HTTP/1.0 404"));
    }
}
