//! cib-publish against real servers: pypiserver and Debian's docker-registry, installed and
//! started by `scripts/publish-services` on loopback, and the real Docker daemon.

mod docker;
mod pypi;
