//! Outgoing webhooks: every event POSTed as JSON to configured URLs, signed with HMAC-SHA256
//! (`X-Cib-Signature-256: sha256=<hex>`, as GitHub signs its own), retried with backoff.
//!
//! Each URL has its own queue and task, so a slow or dead receiver delays only itself. Events
//! carry their sequence number, which receivers use to drop duplicates after a restart.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use cib_core::event::Event;
use cib_core::ports::{Notifier, NotifyError};
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;
use tokio::sync::mpsc;

/// The signature header value for `body`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| {
        // HMAC takes keys of any length; this branch cannot run, and an empty key still signs.
        <Hmac<Sha256> as Mac>::new_from_slice(&[0]).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
    });
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Delivers events to one URL.
#[derive(Debug)]
pub struct WebhookNotifier {
    tx: mpsc::UnboundedSender<Event>,
}

impl WebhookNotifier {
    pub fn new(url: String, secret: String) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(deliver(url, secret, rx));
        WebhookNotifier { tx }
    }
}

#[async_trait]
impl Notifier for WebhookNotifier {
    async fn publish(&self, event: &Event) -> Result<(), NotifyError> {
        self.tx.send(event.clone()).map_err(|_| NotifyError::Permanent("the webhook sender stopped".into()))
    }
}

async fn deliver(url: String, secret: String, mut rx: mpsc::UnboundedReceiver<Event>) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: http::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(%url, error = %e, "an outgoing webhook URL is invalid; its events are dropped");
            return;
        }
    };
    while let Some(event) = rx.recv().await {
        let body = Bytes::from(serde_json::to_vec(&event).unwrap_or_default());
        let signature = sign(secret.as_bytes(), &body);
        let mut delay = Duration::from_millis(500);
        for attempt in 1..=6 {
            let request = http::Request::post(uri.clone())
                .header(http::header::CONTENT_TYPE, "application/json")
                .header("x-cib-signature-256", &signature)
                .header("x-cib-event-seq", event.seq.to_string())
                .body(Full::new(body.clone()));
            let Ok(request) = request else { break };
            match tokio::time::timeout(Duration::from_secs(10), client.request(request)).await {
                Ok(Ok(response)) if response.status().is_success() => break,
                // A 4xx other than 429 says the receiver will never take it.
                Ok(Ok(response))
                    if response.status().is_client_error()
                        && response.status() != http::StatusCode::TOO_MANY_REQUESTS =>
                {
                    tracing::warn!(%url, status = %response.status(), seq = event.seq, "a webhook receiver refused an event");
                    break;
                }
                other => {
                    tracing::debug!(%url, attempt, ?other, "webhook delivery failed; retrying");
                    if attempt == 6 {
                        tracing::warn!(%url, seq = event.seq, "giving up on an event after 6 attempts");
                        break;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sign;

    #[test]
    fn signatures_match_github_known_answer() {
        // GitHub's documented example: the same scheme GitHub uses for its own deliveries.
        assert_eq!(
            sign(b"It's a Secret to Everybody", b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }
}
