//! The registry HTTP API (distribution's v2), for what the Docker daemon does not do: reading
//! a manifest by digest and putting it under another tag (a re-tag moves no layer), mounting
//! blobs across repositories of one registry, and listing tags. Basic auth, and the bearer
//! token dance of Docker Hub and GHCR when the registry asks for it.

use bytes::Bytes;
use cib_core::ports::ErrorKind;
use http::{Method, StatusCode};
use sha2::{Digest as _, Sha256};
use tokio::sync::Mutex;

use crate::http::{Answer, HttpClient, HttpError, basic_auth, status_kind};

/// The manifest types asked for: a re-tag must get the manifest exactly as pushed.
const ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";

/// An image repository: `127.0.0.1:5000/app` is registry `127.0.0.1:5000`, repository `app`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub registry: String,
    pub repository: String,
}

impl ImageRef {
    /// Whether `image` names its registry, as Docker reads a name: a first component with a dot
    /// or a colon, or `localhost`. A name without one is on the daemon's default registry.
    pub fn names_registry(image: &str) -> bool {
        let image = image.split('@').next().unwrap_or(image);
        match image.split_once('/') {
            Some((first, _)) => first.contains(['.', ':']) || first == "localhost",
            None => false,
        }
    }

    /// Reads an image name as Docker does. A name that does not name its registry
    /// ([`ImageRef::names_registry`]) is on `default`, the daemon's default registry (see
    /// [`registry_of_index`]), under `library/` when it has no namespace; cib names no
    /// registry of its own.
    pub fn parse(image: &str, default: &str) -> ImageRef {
        let image = image.split('@').next().unwrap_or(image);
        let (registry, path) = if Self::names_registry(image) {
            let (first, rest) = image.split_once('/').unwrap_or(("", image));
            (first.to_owned(), rest.to_owned())
        } else {
            let path = if image.contains('/') { image.to_owned() } else { format!("library/{image}") };
            (default.to_owned(), path)
        };
        // A tag after the last slash is not part of the repository.
        let repository = match path.rsplit_once('/') {
            Some((head, last)) => format!("{head}/{}", last.split(':').next().unwrap_or(last)),
            None => path.split(':').next().unwrap_or(&path).to_owned(),
        };
        ImageRef { registry, repository }
    }

    /// The registry's base URL: plain http on loopback (as dockerd allows), https elsewhere.
    pub fn base_url(&self) -> String {
        let host = self.registry.split(':').next().unwrap_or(&self.registry);
        let local = matches!(host, "127.0.0.1" | "localhost" | "[::1]");
        format!("{}://{}", if local { "http" } else { "https" }, self.registry)
    }
}

/// The registry host of the daemon's default index, from the `IndexServerAddress` of its
/// `GET /info` (a URL such as `https://<host>/v1/`): where names without a registry go, as the
/// `docker` client sends them.
pub fn registry_of_index(address: &str) -> Option<String> {
    let rest = address.split_once("://").map_or(address, |(_, rest)| rest);
    let host = rest.split('/').next().unwrap_or_default();
    (!host.is_empty()).then(|| host.to_owned())
}

/// A manifest as the registry holds it.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub content_type: String,
    pub bytes: Bytes,
    /// `sha256:<hex>` of the bytes.
    pub digest: String,
}

/// One repository of a registry, with credentials.
#[derive(Debug)]
pub struct Registry {
    client: HttpClient,
    pub image: ImageRef,
    credentials: Option<(String, String)>,
    token: Mutex<Option<String>>,
}

impl Registry {
    pub fn new(client: HttpClient, image: ImageRef, credentials: Option<(String, String)>) -> Self {
        Registry { client, image, credentials, token: Mutex::new(None) }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<Answer, HttpError> {
        let url = format!("{}{path}", self.image.base_url());
        for round in 0..2 {
            let mut all: Vec<(&str, String)> = headers.to_vec();
            if let Some(token) = self.token.lock().await.clone() {
                all.push(("authorization", format!("Bearer {token}")));
            } else if let Some((user, password)) = &self.credentials {
                all.push(("authorization", basic_auth(user, password)));
            }
            let answer = self.client.send(method.clone(), &url, &all, body.clone()).await?;
            if answer.status == StatusCode::UNAUTHORIZED
                && round == 0
                && let Some(challenge) = answer.header("www-authenticate").filter(|c| c.starts_with("Bearer "))
            {
                let token = self.bearer_token(challenge).await?;
                *self.token.lock().await = Some(token);
                continue;
            }
            return Ok(answer);
        }
        Err(HttpError { kind: ErrorKind::Misconfigured, message: format!("{method} {url}: still unauthorized") })
    }

    /// The token a `Bearer realm=…,service=…,scope=…` challenge asks for, from its realm.
    async fn bearer_token(&self, challenge: &str) -> Result<String, HttpError> {
        let mut realm = String::new();
        let mut query = Vec::new();
        for part in challenge.trim_start_matches("Bearer ").split(',') {
            if let Some((k, v)) = part.trim().split_once('=') {
                let v = v.trim_matches('"');
                if k == "realm" {
                    realm = v.to_owned();
                } else {
                    query.push(format!("{k}={v}"));
                }
            }
        }
        let url = if query.is_empty() { realm } else { format!("{realm}?{}", query.join("&")) };
        let headers: Vec<(&str, String)> =
            self.credentials.iter().map(|(u, p)| ("authorization", basic_auth(u, p))).collect();
        let answer = self.client.send(Method::GET, &url, &headers, Bytes::new()).await?;
        if !answer.status.is_success() {
            return Err(HttpError {
                kind: status_kind(answer.status),
                message: format!("the token service {url} answered {}", answer.status),
            });
        }
        let value: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
        value["token"]
            .as_str()
            .or(value["access_token"].as_str())
            .map(str::to_owned)
            .ok_or(HttpError { kind: ErrorKind::Permanent, message: format!("the token service {url} gave no token") })
    }

    fn unexpected(&self, what: &str, answer: &Answer) -> HttpError {
        HttpError {
            kind: status_kind(answer.status),
            message: format!(
                "{what} on {}/{} was answered {}: {}",
                self.image.registry,
                self.image.repository,
                answer.status,
                answer.snippet()
            ),
        }
    }

    /// The manifest under a tag or digest, `None` when there is none.
    pub async fn manifest(&self, reference: &str) -> Result<Option<Manifest>, HttpError> {
        let path = format!("/v2/{}/manifests/{reference}", self.image.repository);
        let answer = self.send(Method::GET, &path, &[("accept", ACCEPT.to_owned())], Bytes::new()).await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !answer.status.is_success() {
            return Err(self.unexpected(&format!("reading manifest {reference}"), &answer));
        }
        let content_type = answer.header("content-type").unwrap_or_default().to_owned();
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&answer.body)));
        Ok(Some(Manifest { content_type, bytes: answer.body, digest }))
    }

    /// Puts a manifest under a tag; answers the digest the registry gives it.
    pub async fn put_manifest(&self, tag: &str, manifest: &Manifest) -> Result<String, HttpError> {
        let path = format!("/v2/{}/manifests/{tag}", self.image.repository);
        let headers = [("content-type", manifest.content_type.clone())];
        let answer = self.send(Method::PUT, &path, &headers, manifest.bytes.clone()).await?;
        if !answer.status.is_success() {
            return Err(self.unexpected(&format!("tagging {tag}"), &answer));
        }
        Ok(answer.header("docker-content-digest").unwrap_or(&manifest.digest).to_owned())
    }

    /// Makes a blob of another repository of the same registry available in this one, without
    /// moving its bytes.
    pub async fn mount(&self, digest: &str, from: &str) -> Result<(), HttpError> {
        let path = format!("/v2/{}/blobs/uploads/?mount={digest}&from={from}", self.image.repository);
        let answer = self.send(Method::POST, &path, &[], Bytes::new()).await?;
        if answer.status == StatusCode::CREATED {
            return Ok(());
        }
        Err(self.unexpected(&format!("mounting {digest} from {from}"), &answer))
    }

    /// The repository's tags.
    pub async fn tags(&self) -> Result<Vec<String>, HttpError> {
        let path = format!("/v2/{}/tags/list", self.image.repository);
        let answer = self.send(Method::GET, &path, &[], Bytes::new()).await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        if !answer.status.is_success() {
            return Err(self.unexpected("listing tags", &answer));
        }
        let value: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
        Ok(value["tags"]
            .as_array()
            .map(|t| t.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect())
            .unwrap_or_default())
    }
}

/// The blobs an image manifest refers to (its config and layers), for a mount.
pub fn blobs_of(manifest: &Manifest) -> Vec<String> {
    let value: serde_json::Value = serde_json::from_slice(&manifest.bytes).unwrap_or_default();
    let mut out: Vec<String> = value["config"]["digest"].as_str().map(str::to_owned).into_iter().collect();
    if let Some(layers) = value["layers"].as_array() {
        out.extend(layers.iter().filter_map(|l| l["digest"].as_str().map(str::to_owned)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_with_a_registry_keeps_it_and_one_without_goes_to_the_default() {
        let own = ImageRef::parse("127.0.0.1:5000/team/app:1.2", "index.example");
        assert_eq!(own, ImageRef { registry: "127.0.0.1:5000".into(), repository: "team/app".into() });
        let local = ImageRef::parse("localhost/app@sha256:00", "index.example");
        assert_eq!(local, ImageRef { registry: "localhost".into(), repository: "app".into() });
        let team = ImageRef::parse("acme/app:latest", "index.example");
        assert_eq!(team, ImageRef { registry: "index.example".into(), repository: "acme/app".into() });
        let official = ImageRef::parse("busybox", "index.example");
        assert_eq!(official, ImageRef { registry: "index.example".into(), repository: "library/busybox".into() });
        assert!(!ImageRef::names_registry("acme/app"));
        assert!(ImageRef::names_registry("registry.example/acme/app"));
    }

    #[test]
    fn the_default_registry_is_the_host_of_the_daemons_index_address() {
        assert_eq!(registry_of_index("https://index.example/v1/").as_deref(), Some("index.example"));
        assert_eq!(registry_of_index("index.example:443").as_deref(), Some("index.example:443"));
        assert_eq!(registry_of_index("https:///v1/"), None);
        assert_eq!(registry_of_index(""), None);
    }
}
