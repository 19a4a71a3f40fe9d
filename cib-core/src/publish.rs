//! Deliverables: what a pipeline publishes once its ordinary steps have passed (Python
//! distributions to a package index, images to a registry), the records kept of what was
//! published, and the `Publisher` port that does the publishing.
//!
//! The machine decides *when* to publish and *what* (including, for a promotion, which records
//! of another pipeline to publish again); the publisher only carries it out and reports what it
//! published. Its report comes back as a journaled input, so a replay reaches the same records.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::event::BuildId;
use crate::pipeline::BuildContext;
use crate::ports::{ErrorKind, LogSink};
use crate::spec;
use crate::time::Timestamp;

/// How many times the machine tries a publish that fails transiently (a refused connection, a
/// 5xx, a 429) before the build fails.
pub const MAX_PUBLISH_ATTEMPTS: u32 = 5;

/// The wait before attempt `next` (2, 3, ...) of a publish: 1 s, then doubling, at most 60 s.
pub fn publish_backoff(next: u32) -> Duration {
    let exp = next.saturating_sub(2).min(6);
    Duration::from_secs(1u64 << exp).min(Duration::from_secs(60))
}

/// One thing a publisher put somewhere: a distribution file on an index, or an image manifest
/// under tags in a registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Artifact {
    /// `pypi` or `docker`.
    pub kind: String,
    /// The package's name, or the image's repository (with its registry host).
    pub name: String,
    /// The package's version; none for an image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The distribution's file name; none for an image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The image's tags; empty for a package.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// `sha256:<hex>`: the file's digest, or the image manifest's.
    pub digest: String,
    /// Where it was published: the index's upload URL, or the registry and repository.
    pub location: String,
    /// The build that first produced these bytes, when they were promoted from it; `None`
    /// when this publish built them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_build: Option<BuildId>,
}

/// A record of one artifact published by a build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeliverableRecord {
    #[serde(flatten)]
    pub artifact: Artifact,
    /// The build that published it here.
    pub build: BuildId,
    pub repo: String,
    pub pipeline: String,
    pub commit: String,
    /// When the publish was reported.
    pub at: Timestamp,
    /// The build that first produced these bytes (this build, unless it promoted them).
    pub first_build: BuildId,
}

/// What the machine asks a publisher to do: publish one build's deliverables.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PublishJob {
    pub build: BuildId,
    pub pipeline: String,
    pub attempt: u32,
    pub context: BuildContext,
    pub deliverables: Vec<spec::Deliverable>,
    /// For deliverables with `from`, what the named pipelines published for this commit,
    /// from the machine's records: promoted, never rebuilt.
    pub promoted: Vec<DeliverableRecord>,
}

/// How a publish ended, as the publisher reports it to the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum PublishOutcome {
    Published {
        artifacts: Vec<Artifact>,
    },
    Failed {
        /// The deliverable that failed, as `kind target` (`pypi https://index/`).
        deliverable: String,
        message: String,
        /// Worth trying again later (a refused connection, a 5xx, a 429).
        transient: bool,
        /// What was published before the failure (kept in the records: it is there).
        #[serde(default)]
        artifacts: Vec<Artifact>,
    },
}

/// A publish as the publisher gets it: the job, the workspace the steps left, and the
/// credentials by secret name. Credentials come from the secret store under the build's scope
/// and go to the publisher only, never into a step's environment.
#[derive(Clone)]
pub struct PublishRun {
    pub job: PublishJob,
    pub workspace: PathBuf,
    pub credentials: BTreeMap<String, String>,
}

impl std::fmt::Debug for PublishRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Credential values never reach a log line, even a debug one.
        f.debug_struct("PublishRun")
            .field("job", &self.job)
            .field("workspace", &self.workspace)
            .field("credentials", &self.credentials.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Why a deliverable could not be published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{deliverable}: {message}")]
pub struct PublishError {
    pub kind: ErrorKind,
    /// `kind target`, e.g. `pypi http://127.0.0.1:8080/`.
    pub deliverable: String,
    pub message: String,
    /// What was published before the failure.
    pub published: Vec<Artifact>,
}

/// Publishes deliverables. Implementations must be idempotent: publishing the same bytes again
/// is a success that changes nothing, since after a restart the engine publishes again what it
/// cannot know was finished.
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes every deliverable of the job, writing what it does to `logs` (the log of the
    /// build's `publish` step), and answers what it published.
    async fn publish(&self, run: &PublishRun, logs: Arc<dyn LogSink>) -> Result<Vec<Artifact>, PublishError>;
}

/// A publisher for engines that publish nothing (`cib run`, embedders without one): every
/// publish fails, saying so.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPublisher;

#[async_trait]
impl Publisher for NoPublisher {
    async fn publish(&self, run: &PublishRun, _logs: Arc<dyn LogSink>) -> Result<Vec<Artifact>, PublishError> {
        let first = run.job.deliverables.first();
        Err(PublishError {
            kind: ErrorKind::Misconfigured,
            deliverable: first.map(|d| format!("{} {}", d.kind(), d.target())).unwrap_or_default(),
            message: "this engine has no publisher configured".into(),
            published: Vec::new(),
        })
    }
}

impl From<Result<Vec<Artifact>, PublishError>> for PublishOutcome {
    fn from(result: Result<Vec<Artifact>, PublishError>) -> Self {
        match result {
            Ok(artifacts) => PublishOutcome::Published { artifacts },
            Err(e) => PublishOutcome::Failed {
                transient: e.kind == ErrorKind::Transient,
                deliverable: e.deliverable,
                message: e.message,
                artifacts: e.published,
            },
        }
    }
}

/// `{{commit}}`, `{{short_commit}}` and `{{branch}}` in an image tag, replaced. A branch name
/// may hold characters a tag may not: they become `-`.
pub fn expand_tag(tag: &str, context: &BuildContext) -> String {
    let short: String = context.commit.chars().take(12).collect();
    let branch: String = context
        .branch
        .as_deref()
        .unwrap_or("detached")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '-' })
        .collect();
    tag.replace("{{commit}}", &context.commit).replace("{{short_commit}}", &short).replace("{{branch}}", &branch)
}
