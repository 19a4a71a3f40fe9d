//! Making sure a step's image is there: the local one when present, else a pull.
//!
//! A local image is used as it is, even for a moving tag such as `latest`: builds then run on
//! what the operator put on the machine, and machines without a registry work at all. When the
//! image is missing and cannot be pulled, the error says exactly that, in words a person
//! reading a failed build understands.

use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::CreateImageOptions;
use cib_core::ports::ExecError;
use futures_util::TryStreamExt;

use crate::errors::{exec_error, is_not_found};

/// Splits an image reference into what the pull API calls the image and the tag.
///
/// Without a tag the API pulls every tag of the repository, so a missing tag means `latest`,
/// as on the command line. A digest (`name@sha256:…`) stays in the image part.
pub fn split_reference(reference: &str) -> (String, Option<String>) {
    if reference.contains('@') {
        return (reference.to_owned(), None);
    }
    let last_slash = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[last_slash..].rfind(':') {
        Some(colon) => {
            let at = last_slash + colon;
            (reference[..at].to_owned(), Some(reference[at + 1..].to_owned()))
        }
        None => (reference.to_owned(), Some("latest".to_owned())),
    }
}

/// What the executor needs to know of an image: the user it runs as (`USER`, empty for root).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageFacts {
    pub user: String,
}

impl ImageFacts {
    fn of(inspected: &bollard::models::ImageInspect) -> Self {
        ImageFacts { user: inspected.config.as_ref().and_then(|c| c.user.clone()).unwrap_or_default() }
    }

    /// Whether the image runs as root: no `USER`, or `root` or uid 0, with any group.
    pub fn runs_as_root(&self) -> bool {
        let user = self.user.split(':').next().unwrap_or_default();
        user.is_empty() || user == "root" || user == "0"
    }
}

/// Ensures `image` is present, pulling it when it is not, and says what it runs as.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn ensure(docker: &Docker, image: &str, pull_timeout: Duration) -> Result<ImageFacts, ExecError> {
    match docker.inspect_image(image).await {
        Ok(inspected) => return Ok(ImageFacts::of(&inspected)),
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(exec_error(&format!("inspecting image {image}"), e)),
    }
    let (from_image, tag) = split_reference(image);
    let options = CreateImageOptions { from_image: Some(from_image), tag, ..Default::default() };
    let pull = docker.create_image(Some(options), None, None).try_collect::<Vec<_>>();
    let cause = match tokio::time::timeout(pull_timeout, pull).await {
        Ok(Ok(_)) => {
            return docker
                .inspect_image(image)
                .await
                .map(|inspected| ImageFacts::of(&inspected))
                .map_err(|e| exec_error(&format!("inspecting image {image}"), e));
        }
        Ok(Err(bollard::errors::Error::DockerResponseServerError { message, .. })) => message,
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("the pull took longer than {} s", pull_timeout.as_secs()),
    };
    Err(ExecError::Permanent(format!("image {image} is not present locally and could not be pulled: {cause}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(r: &str) -> (String, Option<String>) {
        split_reference(r)
    }

    #[test]
    fn references_split_into_image_and_tag() {
        assert_eq!(split("busybox"), ("busybox".into(), Some("latest".into())));
        assert_eq!(split("busybox:1.36"), ("busybox".into(), Some("1.36".into())));
        assert_eq!(split("registry:5000/team/app"), ("registry:5000/team/app".into(), Some("latest".into())));
        assert_eq!(split("registry:5000/team/app:v2"), ("registry:5000/team/app".into(), Some("v2".into())));
        assert_eq!(split("app@sha256:abcd"), ("app@sha256:abcd".into(), None));
    }

    #[test]
    fn only_an_image_without_a_user_or_with_root_runs_as_root() {
        let facts = |user: &str| ImageFacts { user: user.to_owned() };
        assert!(facts("").runs_as_root());
        assert!(facts("root").runs_as_root());
        assert!(facts("0:0").runs_as_root());
        assert!(facts("root:staff").runs_as_root());
        assert!(!facts("node").runs_as_root());
        assert!(!facts("1000").runs_as_root());
        assert!(!facts("1000:0").runs_as_root());
    }
}
