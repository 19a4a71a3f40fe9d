//! Deliverables for cib: Python distributions uploaded to a package index and Docker images
//! built and pushed to a registry, behind cib-core's [`Publisher`] port.
//!
//! Promotions (`from:` in the spec) never rebuild: a package is downloaded from the index the
//! source pipeline published it to, its SHA-256 checked against the record, and uploaded byte
//! for byte; an image's manifest is read by digest and put under the new tags (no layer moves).
//!
//! Like cib-docker, this crate speaks to the Docker Engine API through bollard (to build and
//! push); the registry and index are plain HTTP.

pub mod http;
pub mod pypi;
pub mod registry;
#[cfg(feature = "testing")]
pub mod testing;

use std::path::Path;
use std::sync::Arc;

use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::query_parameters::{BuildImageOptions, PushImageOptions, RemoveImageOptions};
use bytes::Bytes;
use cib_core::ports::{ErrorKind, LogSink, Stream};
use cib_core::publish::{Artifact, PublishError, PublishRun, Publisher, expand_tag};
use cib_core::spec::Deliverable;
use futures_util::StreamExt as _;

use crate::http::{HttpClient, split_credentials};
use crate::registry::{ImageRef, Registry};

/// Why one deliverable failed.
#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: ErrorKind,
    /// `kind target`, e.g. `pypi http://127.0.0.1:8080/`.
    pub deliverable: String,
    pub message: String,
}

/// The publisher: indexes and registries over HTTP, images built by the Docker daemon.
pub struct DeliveryPublisher {
    http: HttpClient,
    docker_host: Option<String>,
    docker: tokio::sync::OnceCell<Docker>,
    /// The daemon's default registry, asked once, for image names that name none.
    default_registry: tokio::sync::OnceCell<String>,
}

impl std::fmt::Debug for DeliveryPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryPublisher").field("docker_host", &self.docker_host).finish_non_exhaustive()
    }
}

impl DeliveryPublisher {
    /// A publisher building images on the daemon at `docker_host` (Docker's defaults when
    /// `None`). Nothing connects until an image is built.
    pub fn new(docker_host: Option<String>) -> Self {
        DeliveryPublisher {
            http: HttpClient::new(),
            docker_host,
            docker: tokio::sync::OnceCell::new(),
            default_registry: tokio::sync::OnceCell::new(),
        }
    }

    async fn docker(&self, deliverable: &str) -> Result<&Docker, Failure> {
        let fail = |m: String| Failure { kind: ErrorKind::Transient, deliverable: deliverable.to_owned(), message: m };
        self.docker
            .get_or_try_init(|| async {
                let docker = match &self.docker_host {
                    Some(host) => Docker::connect_with_host(host),
                    None => Docker::connect_with_defaults(),
                }
                .map_err(|e| fail(format!("cannot reach the Docker daemon: {e}")))?;
                docker.negotiate_version().await.map_err(|e| fail(format!("cannot reach the Docker daemon: {e}")))
            })
            .await
    }

    /// Where `image` is: its own registry, or the daemon's default one (asked of the daemon
    /// once), since the registry API needs a host and cib names none of its own.
    async fn image_ref(&self, deliverable: &str, image: &str) -> Result<ImageRef, Failure> {
        if ImageRef::names_registry(image) {
            return Ok(ImageRef::parse(image, ""));
        }
        let docker = self.docker(deliverable).await?;
        let default = self
            .default_registry
            .get_or_try_init(|| async {
                let info = docker.info().await.map_err(|e| Failure {
                    kind: ErrorKind::Transient,
                    deliverable: deliverable.to_owned(),
                    message: format!("cannot ask the Docker daemon for its default registry: {e}"),
                })?;
                info.index_server_address.as_deref().and_then(registry::registry_of_index).ok_or_else(|| Failure {
                    kind: ErrorKind::Misconfigured,
                    deliverable: deliverable.to_owned(),
                    message: format!(
                        "{image} names no registry, and the Docker daemon has no default one: write the registry \
                         in the image's name"
                    ),
                })
            })
            .await?;
        Ok(ImageRef::parse(image, default))
    }

    /// Publishes one deliverable.
    async fn one(&self, run: &PublishRun, d: &Deliverable, logs: &Arc<dyn LogSink>) -> Result<Vec<Artifact>, Failure> {
        let name = format!("{} {}", d.kind(), d.target());
        let credentials = match d.credentials() {
            Some(secret) => Some((
                secret,
                run.credentials.get(secret).map(|v| split_credentials(v)).ok_or_else(|| Failure {
                    kind: ErrorKind::Misconfigured,
                    deliverable: name.clone(),
                    message: format!("secret '{secret}' has no value for this build"),
                })?,
            )),
            None => None,
        };
        match d {
            Deliverable::Pypi { index, files, from: None, .. } => {
                let (secret, (user, password)) = credentials.unwrap_or_default();
                let index = pypi::Index { url: index, secret, user, password };
                let mut out = Vec::new();
                let found = find_files(&run.workspace, files);
                if found.is_empty() {
                    return Err(Failure {
                        kind: ErrorKind::Permanent,
                        deliverable: name,
                        message: format!("no file in the workspace matches '{}'", files.as_str()),
                    });
                }
                for path in found {
                    let bytes = tokio::fs::read(run.workspace.join(&path)).await.map_err(|e| Failure {
                        kind: ErrorKind::Permanent,
                        deliverable: name.clone(),
                        message: format!("cannot read {path}: {e}"),
                    })?;
                    let file_name = path.rsplit('/').next().unwrap_or(&path);
                    let dist = pypi::Distribution::read(file_name, Bytes::from(bytes)).map_err(|m| Failure {
                        kind: ErrorKind::Permanent,
                        deliverable: name.clone(),
                        message: m,
                    })?;
                    out.push(self.upload(&index, dist, None, logs).await?);
                }
                Ok(out)
            }
            Deliverable::Pypi { index, from: Some(from), .. } => {
                let (secret, (user, password)) = credentials.unwrap_or_default();
                let index = pypi::Index { url: index, secret, user, password };
                let records: Vec<_> =
                    run.job.promoted.iter().filter(|r| &r.pipeline == from && r.artifact.kind == "pypi").collect();
                if records.is_empty() {
                    return Err(nothing_to_promote(&name, from, &run.job.context.commit));
                }
                let mut out = Vec::new();
                for record in records {
                    let dist = pypi::fetch_recorded(&self.http, record, &name).await?;
                    out.push(self.upload(&index, dist, Some(record.first_build.clone()), logs).await?);
                }
                Ok(out)
            }
            Deliverable::Docker { image, context, dockerfile, tags, from: None, .. } => {
                let tags: Vec<String> = tags.iter().map(|t| expand_tag(t, &run.job.context)).collect();
                let creds = credentials.map(|(s, c)| (s.to_owned(), c));
                self.build_and_push(run, &name, image, context, dockerfile, &tags, creds, logs).await.map(|a| vec![a])
            }
            Deliverable::Docker { image, tags, from: Some(from), .. } => {
                let tags: Vec<String> = tags.iter().map(|t| expand_tag(t, &run.job.context)).collect();
                let records: Vec<_> =
                    run.job.promoted.iter().filter(|r| &r.pipeline == from && r.artifact.kind == "docker").collect();
                let record = match records.as_slice() {
                    [] => return Err(nothing_to_promote(&name, from, &run.job.context.commit)),
                    [one] => *one,
                    many => many.iter().find(|r| r.artifact.name == *image).copied().ok_or_else(|| Failure {
                        kind: ErrorKind::Permanent,
                        deliverable: name.clone(),
                        message: format!("'{from}' published several images for this commit and none is {image}"),
                    })?,
                };
                let creds = credentials.map(|(s, c)| (s.to_owned(), c));
                self.retag(&name, record, image, &tags, creds, logs).await.map(|a| vec![a])
            }
        }
    }

    async fn upload(
        &self,
        index: &pypi::Index<'_>,
        dist: pypi::Distribution,
        first_build: Option<cib_core::event::BuildId>,
        logs: &Arc<dyn LogSink>,
    ) -> Result<Artifact, Failure> {
        say(logs, &format!("uploading {} (sha256 {}) to {}", dist.file_name, dist.sha256, index.url));
        let uploaded = pypi::upload(&self.http, index, &dist).await?;
        if !uploaded {
            say(logs, &format!("{} is on {} already with the same sha256: nothing to do", dist.file_name, index.url));
        }
        Ok(Artifact {
            kind: "pypi".into(),
            name: dist.metadata.name.clone(),
            version: Some(dist.metadata.version.clone()),
            file: Some(dist.file_name.clone()),
            tags: Vec::new(),
            digest: format!("sha256:{}", dist.sha256),
            location: index.url.to_owned(),
            first_build,
        })
    }

    /// Builds the image from a tar of the workspace's context, pushes its first tag (the daemon
    /// puts the manifest last, so a push that fails midway leaves no tag), then puts the
    /// manifest under the other tags by digest.
    #[allow(clippy::too_many_arguments)]
    async fn build_and_push(
        &self,
        run: &PublishRun,
        name: &str,
        image: &str,
        context: &str,
        dockerfile: &str,
        tags: &[String],
        credentials: Option<(String, (String, String))>,
        logs: &Arc<dyn LogSink>,
    ) -> Result<Artifact, Failure> {
        let fail = |kind, message: String| Failure { kind, deliverable: name.to_owned(), message };
        let docker = self.docker(name).await?;
        let dir = run.workspace.join(context);
        if !dir.starts_with(&run.workspace) || context.split('/').any(|c| c == "..") {
            return Err(fail(ErrorKind::Permanent, format!("the context '{context}' is outside the workspace")));
        }
        let archive = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut builder = tar::Builder::new(Vec::new());
            builder.follow_symlinks(false);
            builder.append_dir_all(".", &dir)?;
            builder.into_inner()
        })
        .await
        .map_err(|e| fail(ErrorKind::Transient, format!("packing the context: {e}")))?
        .map_err(|e| fail(ErrorKind::Permanent, format!("cannot pack the context '{context}': {e}")))?;
        let first = tags.first().cloned().unwrap_or_else(|| run.job.context.commit.clone());
        let local = format!("{image}:{first}");
        say(logs, &format!("building {local} from '{context}' ({} bytes of context)", archive.len()));
        let options = BuildImageOptions {
            dockerfile: dockerfile.to_owned(),
            t: Some(local.clone()),
            rm: true,
            forcerm: true,
            labels: Some([("org.cib.build".to_owned(), run.job.build.0.clone())].into()),
            ..Default::default()
        };
        let mut stream = docker.build_image(options, None, Some(bollard::body_full(archive.into())));
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(text) = info.stream.or(info.status) {
                        logs.write(Stream::Stdout, text.as_bytes());
                    }
                    if let Some(error) = info.error_detail.and_then(|e| e.message) {
                        return Err(fail(ErrorKind::Permanent, format!("the image did not build: {error}")));
                    }
                }
                // The daemon answers a bad context or Dockerfile with an error status: the
                // build's own fault, not worth trying again. A failure to reach it may pass.
                Err(e @ bollard::errors::Error::DockerResponseServerError { .. }) => {
                    return Err(fail(ErrorKind::Permanent, format!("the image did not build: {e}")));
                }
                Err(e) => return Err(fail(ErrorKind::Transient, format!("the image did not build: {e}"))),
            }
        }
        let reference = self.image_ref(name, image).await?;
        let secret = credentials.as_ref().map(|(s, _)| s.clone());
        let auth = credentials.as_ref().map(|(_, (user, password))| DockerCredentials {
            username: Some(user.clone()),
            password: Some(password.clone()),
            serveraddress: Some(reference.registry.clone()),
            ..Default::default()
        });
        say(logs, &format!("pushing {local}"));
        let pushed = self.push(docker, image, &first, auth, logs).await;
        // The local tag goes whatever happened: the registry holds the image now, or should not.
        let _ = docker.remove_image(&local, None::<RemoveImageOptions>, None).await;
        let digest = pushed.map_err(|(kind, m)| {
            let m = match (&secret, kind) {
                (Some(s), ErrorKind::Misconfigured) => {
                    format!("the registry {} refused the credentials in secret '{s}': {m}", reference.registry)
                }
                _ => format!("the push to {} failed: {m}", reference.registry),
            };
            fail(kind, m)
        })?;
        let registry = Registry::new(self.http.clone(), reference.clone(), credentials.map(|(_, c)| c));
        let digest = match digest {
            Some(d) => d,
            None => {
                registry.manifest(&first).await.map_err(|e| fail(e.kind, e.message))?.map(|m| m.digest).ok_or_else(
                    || fail(ErrorKind::Transient, format!("{image}:{first} is not in the registry after its push")),
                )?
            }
        };
        say(logs, &format!("pushed {image}@{digest}"));
        if tags.len() > 1 {
            let manifest = registry
                .manifest(&digest)
                .await
                .map_err(|e| fail(e.kind, e.message))?
                .ok_or_else(|| fail(ErrorKind::Transient, format!("{image}@{digest} is not in the registry")))?;
            for tag in &tags[1..] {
                registry.put_manifest(tag, &manifest).await.map_err(|e| fail(e.kind, e.message))?;
                say(logs, &format!("tagged {image}:{tag} as {digest}"));
            }
        }
        Ok(Artifact {
            kind: "docker".into(),
            name: image.to_owned(),
            version: None,
            file: None,
            tags: tags.to_vec(),
            digest,
            location: format!("{}/{}", reference.registry, reference.repository),
            first_build: None,
        })
    }

    /// Pushes one tag, writing the daemon's progress to the log; answers the manifest digest
    /// when the daemon said it.
    async fn push(
        &self,
        docker: &Docker,
        image: &str,
        tag: &str,
        auth: Option<DockerCredentials>,
        logs: &Arc<dyn LogSink>,
    ) -> Result<Option<String>, (ErrorKind, String)> {
        let options = PushImageOptions { tag: Some(tag.to_owned()), ..Default::default() };
        let mut stream = docker.push_image(image, Some(options), auth);
        let mut digest = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(error) = info.error_detail.and_then(|e| e.message) {
                        return Err((docker_kind(&error), error));
                    }
                    if let Some(status) = info.status {
                        // "<tag>: digest: sha256:… size: 527", the daemon's last word on a push.
                        if let Some(rest) = status.split("digest: ").nth(1) {
                            digest = rest.split_whitespace().next().map(str::to_owned);
                        }
                        // Progress lines repeat per layer; only the ones that say something go to the log.
                        if !matches!(status.as_str(), "Pushing" | "Waiting" | "Preparing") {
                            logs.write(Stream::Stdout, format!("{status}\n").as_bytes());
                        }
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    return Err((docker_kind(&message), message));
                }
            }
        }
        Ok(digest)
    }

    /// Puts the manifest a record names under this deliverable's tags: read by digest (and its
    /// digest checked), then PUT under each tag. Across repositories of one registry, the
    /// blobs are mounted first; no layer is pushed.
    async fn retag(
        &self,
        name: &str,
        record: &cib_core::publish::DeliverableRecord,
        image: &str,
        tags: &[String],
        credentials: Option<(String, (String, String))>,
        logs: &Arc<dyn LogSink>,
    ) -> Result<Artifact, Failure> {
        let fail = |kind, message: String| Failure { kind, deliverable: name.to_owned(), message };
        let source = self.image_ref(name, &record.artifact.name).await?;
        let target = self.image_ref(name, image).await?;
        if source.registry != target.registry {
            return Err(fail(
                ErrorKind::Permanent,
                format!(
                    "{} is on registry {}, and a promotion tags within one registry (this one is {})",
                    record.artifact.name, source.registry, target.registry
                ),
            ));
        }
        let secret = credentials.as_ref().map(|(s, _)| s.clone());
        let creds = credentials.map(|(_, c)| c);
        let refused = |e: crate::http::HttpError| match (&secret, e.kind) {
            (Some(s), ErrorKind::Misconfigured) => fail(
                e.kind,
                format!("the registry {} refused the credentials in secret '{s}': {}", target.registry, e.message),
            ),
            _ => fail(e.kind, e.message),
        };
        let from = Registry::new(self.http.clone(), source.clone(), creds.clone());
        let digest = &record.artifact.digest;
        let manifest = from.manifest(digest).await.map_err(refused)?.ok_or_else(|| {
            fail(
                ErrorKind::Permanent,
                format!("{}@{digest}, which build {} pushed, is gone", record.artifact.name, record.first_build),
            )
        })?;
        if &manifest.digest != digest {
            return Err(fail(
                ErrorKind::Permanent,
                format!("the registry served {} for {digest}: not the image staging tested", manifest.digest),
            ));
        }
        let to = Registry::new(self.http.clone(), target.clone(), creds);
        if source.repository != target.repository {
            for blob in registry::blobs_of(&manifest) {
                to.mount(&blob, &source.repository).await.map_err(refused)?;
            }
        }
        for tag in tags {
            to.put_manifest(tag, &manifest).await.map_err(refused)?;
            say(logs, &format!("tagged {image}:{tag} as {digest} (promoted from build {})", record.first_build));
        }
        Ok(Artifact {
            kind: "docker".into(),
            name: image.to_owned(),
            version: None,
            file: None,
            tags: tags.to_vec(),
            digest: digest.clone(),
            location: format!("{}/{}", target.registry, target.repository),
            first_build: Some(record.first_build.clone()),
        })
    }
}

#[async_trait::async_trait]
impl Publisher for DeliveryPublisher {
    async fn publish(&self, run: &PublishRun, logs: Arc<dyn LogSink>) -> Result<Vec<Artifact>, PublishError> {
        let mut published = Vec::new();
        for d in &run.job.deliverables {
            match self.one(run, d, &logs).await {
                Ok(artifacts) => published.extend(artifacts),
                Err(f) => {
                    say(&logs, &format!("{}: {}", f.deliverable, f.message));
                    return Err(PublishError {
                        kind: f.kind,
                        deliverable: f.deliverable,
                        message: f.message,
                        published,
                    });
                }
            }
        }
        Ok(published)
    }
}

fn say(logs: &Arc<dyn LogSink>, line: &str) {
    logs.write(Stream::Stdout, format!("cib: {line}\n").as_bytes());
}

fn nothing_to_promote(name: &str, from: &str, commit: &str) -> Failure {
    Failure {
        kind: ErrorKind::Permanent,
        deliverable: name.to_owned(),
        message: format!("'{from}' published nothing of this kind for commit {commit}, so there is nothing to promote"),
    }
}

/// What a daemon's push or build error is: unauthorized is a person's to fix, a connection
/// or server problem may pass.
fn docker_kind(message: &str) -> ErrorKind {
    let m = message.to_ascii_lowercase();
    if m.contains("unauthorized") || m.contains("authentication required") || m.contains("denied") {
        ErrorKind::Misconfigured
    } else if [
        "connection refused",
        "connection reset",
        "eof",
        "timeout",
        "503",
        "502",
        "500",
        "429",
        "toomanyrequests",
        "broken pipe",
    ]
    .iter()
    .any(|t| m.contains(t))
    {
        ErrorKind::Transient
    } else {
        ErrorKind::Permanent
    }
}

/// The workspace's files (relative paths, sorted) that the glob matches; `.git` is skipped.
pub fn find_files(root: &Path, glob: &cib_core::spec::Glob) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                if entry.file_name() != ".git" {
                    stack.push(path);
                }
            } else if kind.is_file()
                && let Ok(relative) = path.strip_prefix(root)
            {
                let relative = relative.to_string_lossy().into_owned();
                if glob.is_match(&relative) {
                    out.push(relative);
                }
            }
        }
    }
    out.sort();
    out
}
