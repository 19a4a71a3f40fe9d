//! A small HTTP client for indexes and registries: http or https (rustls with Mozilla's roots,
//! the ring provider the rest of cib uses), whole bodies in and out, and errors sorted into
//! what is worth trying again and what is not.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cib_core::ports::ErrorKind;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The longest a request may take, upload included.
const TIMEOUT: Duration = Duration::from_secs(600);

/// The largest answer read (a registry manifest or an index page is far smaller).
const MAX_ANSWER: usize = 64 << 20;

/// An answer, read whole.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The body as text, cut short for a message.
    pub fn snippet(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let text = text.trim();
        let cut: String = text.chars().take(300).collect();
        if cut.len() < text.len() { format!("{cut}…") } else { cut }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A request that could not be made or answered.
#[derive(Debug, Clone)]
pub struct HttpError {
    pub kind: ErrorKind,
    pub message: String,
}

/// The kind of a status that is not a success: 5xx, 429 and 408 may pass, the rest will not.
pub fn status_kind(status: StatusCode) -> ErrorKind {
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT {
        ErrorKind::Transient
    } else if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        ErrorKind::Misconfigured
    } else {
        ErrorKind::Permanent
    }
}

#[derive(Clone)]
pub struct HttpClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient").finish_non_exhaustive()
    }
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    pub fn new() -> Self {
        let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        // The provider is named rather than taken from the process default, so that no other
        // crate's choice can change it.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports rustls's default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let https =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
        HttpClient { client: Client::builder(TokioExecutor::new()).build(https) }
    }

    /// Sends a request and reads the whole answer. A failure to connect or to read is
    /// transient (the server may be back soon); a malformed URL is permanent.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<Answer, HttpError> {
        let mut request = Request::builder().method(method.clone()).uri(url);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| HttpError { kind: ErrorKind::Permanent, message: format!("invalid request to {url}: {e}") })?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| HttpError {
                kind: ErrorKind::Transient,
                message: format!("{method} {url}: {}", describe(&e)),
            })?;
            let (parts, body) = response.into_parts();
            let body = http_body_util::Limited::new(body, MAX_ANSWER).collect().await.map_err(|e| HttpError {
                kind: ErrorKind::Transient,
                message: format!("{method} {url}: the answer could not be read: {e}"),
            })?;
            Ok(Answer { status: parts.status, headers: parts.headers, body: body.to_bytes() })
        };
        tokio::time::timeout(TIMEOUT, exchange).await.unwrap_or_else(|_| {
            Err(HttpError { kind: ErrorKind::Transient, message: format!("{method} {url}: no answer in {TIMEOUT:?}") })
        })
    }
}

/// The innermost cause of a client error ("connection refused"), which is what a person needs.
fn describe(error: &hyper_util::client::legacy::Error) -> String {
    let mut source: Option<&dyn std::error::Error> = Some(error);
    let mut last = error.to_string();
    while let Some(e) = source {
        last = e.to_string();
        source = e.source();
    }
    last
}

/// `user:password` from a secret's value; a value without a colon is an API token, which
/// indexes take as the password of the user `__token__`.
pub fn split_credentials(value: &str) -> (String, String) {
    match value.split_once(':') {
        Some((user, password)) => (user.to_owned(), password.to_owned()),
        None => ("__token__".to_owned(), value.to_owned()),
    }
}

/// The `Authorization` header of HTTP basic auth.
pub fn basic_auth(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}
