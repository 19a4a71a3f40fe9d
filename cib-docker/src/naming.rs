//! Names and labels of everything the executor creates.
//!
//! Labels are how the executor finds its own resources again: after a crash nothing in memory
//! remembers what was created, so every container, volume and network carries the engine
//! instance and the build it belongs to, and cleanup and reconcile query by label. Names are
//! for people reading `docker ps`, and to keep concurrent builds apart; they are derived from
//! the build id but also carry a hash of it, since sanitising can map two ids to one name.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use cib_core::event::BuildId;

/// The engine instance that created a resource.
pub const LABEL_ENGINE: &str = "org.cib.engine";
/// The build a resource belongs to.
pub const LABEL_BUILD: &str = "org.cib.build";
/// The image of the container that created a workspace volume.
pub const LABEL_IMAGE: &str = "org.cib.image";
/// What a resource is for: see [`Role`].
pub const LABEL_ROLE: &str = "org.cib.role";
/// The step a step container runs.
pub const LABEL_STEP: &str = "org.cib.step";
/// The attempt of the step a step container runs.
pub const LABEL_ATTEMPT: &str = "org.cib.attempt";
/// Set on a step container filled through its stdin, whose output begins with a token.
pub const LABEL_STDIN: &str = "org.cib.stdin";
/// The service a service container runs.
pub const LABEL_SERVICE: &str = "org.cib.service";

/// What a resource is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A container running one attempt of a step.
    Step,
    /// A sidecar container running a service.
    Service,
    /// A container that is never started, made only to read the workspace volume through the
    /// archive API (`export_workspace`), and removed right after.
    Populate,
    /// The build's workspace volume.
    Workspace,
    /// The build's private network.
    Network,
    /// A long-lived container in which consecutive steps run as `exec`s (see `warm`).
    Warm,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Step => "step",
            Role::Service => "service",
            Role::Populate => "populate",
            Role::Workspace => "workspace",
            Role::Network => "network",
            Role::Warm => "warm",
        }
    }
}

/// Keeps the characters Docker allows in names (`[a-zA-Z0-9_.-]`), replaces the others with
/// `-`, and cuts the result to `max` characters.
pub fn sanitize(text: &str, max: usize) -> String {
    let s: String = text
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' { c } else { '-' })
        .take(max)
        .collect();
    if s.is_empty() { "x".to_owned() } else { s }
}

/// FNV-1a: a small stable hash, so that names stay the same across processes and versions
/// (the standard library's hasher promises neither).
pub fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// A short suffix unique within this process and very likely across processes, for names that
/// must not collide with a leftover of an earlier run (a retried attempt, a restarted engine).
pub fn nonce() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()) ^ d.as_secs())
        .unwrap_or(0);
    let mixed = fnv1a(&format!("{}-{n}-{nanos}", std::process::id()));
    format!("{:08x}", mixed & 0xffff_ffff)
}

/// Names and labels for one build of one engine instance.
#[derive(Debug, Clone)]
pub struct BuildNames {
    instance: String,
    build: BuildId,
    prefix: String,
}

impl BuildNames {
    pub fn new(instance: &str, build: &BuildId) -> Self {
        let prefix =
            format!("cib-{}-{}-{:08x}", sanitize(instance, 24), sanitize(&build.0, 40), fnv1a(&build.0) & 0xffff_ffff);
        BuildNames { instance: instance.to_owned(), build: build.clone(), prefix }
    }

    pub fn volume(&self) -> String {
        format!("{}-ws", self.prefix)
    }

    pub fn network(&self) -> String {
        format!("{}-net", self.prefix)
    }

    pub fn step_container(&self, step: &str, attempt: u32) -> String {
        format!("{}-{}-{attempt}-{}", self.prefix, sanitize(step, 40), nonce())
    }

    pub fn service_container(&self, service: &str) -> String {
        format!("{}-svc-{}-{}", self.prefix, sanitize(service, 40), nonce())
    }

    pub fn warm_container(&self) -> String {
        format!("{}-warm-{}", self.prefix, nonce())
    }

    pub fn populate_container(&self) -> String {
        format!("{}-populate-{}", self.prefix, nonce())
    }

    /// The labels every resource of this build carries, plus its role.
    pub fn labels(&self, role: Role) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_ENGINE.to_owned(), self.instance.clone()),
            (LABEL_BUILD.to_owned(), self.build.0.clone()),
            (LABEL_ROLE.to_owned(), role.as_str().to_owned()),
        ])
    }
}

/// A Docker `filters` value selecting what carries all these labels.
pub fn label_filter(labels: &[(&str, &str)]) -> HashMap<String, Vec<String>> {
    HashMap::from([("label".to_owned(), labels.iter().map(|(k, v)| format!("{k}={v}")).collect())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_docker_safe_and_tell_builds_apart() {
        let a = BuildNames::new("engine one", &BuildId::from("org/repo#12"));
        let b = BuildNames::new("engine one", &BuildId::from("org/repo 12"));
        assert!(a.volume().starts_with("cib-engine-one-org-repo-12-"), "{}", a.volume());
        assert_ne!(a.volume(), b.volume(), "sanitising alone would have merged these builds");
        let ok = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        for name in [a.volume(), a.network(), a.step_container("build & test", 2), a.service_container("db")] {
            assert!(ok(&name), "{name}");
        }
    }

    #[test]
    fn container_names_do_not_repeat() {
        let n = BuildNames::new("e", &BuildId::from("b"));
        assert_ne!(n.step_container("s", 1), n.step_container("s", 1));
    }

    #[test]
    fn sanitize_cuts_and_never_returns_empty() {
        assert_eq!(sanitize("abcdef", 3), "abc");
        assert_eq!(sanitize("", 3), "x");
        assert_eq!(sanitize("a/b:c", 10), "a-b-c");
    }

    #[test]
    fn labels_name_engine_build_and_role() {
        let labels = BuildNames::new("eng", &BuildId::from("b-1")).labels(Role::Network);
        assert_eq!(labels.get(LABEL_ENGINE).map(String::as_str), Some("eng"));
        assert_eq!(labels.get(LABEL_BUILD).map(String::as_str), Some("b-1"));
        assert_eq!(labels.get(LABEL_ROLE).map(String::as_str), Some("network"));
    }
}
