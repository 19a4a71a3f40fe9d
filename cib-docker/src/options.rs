//! Settings of the Docker executor, with safe defaults.

use std::time::Duration;

/// Capabilities added back after dropping all of them.
///
/// Dropping everything breaks ordinary build commands: package managers change file owners
/// (`CHOWN`, `FOWNER`, `FSETID`), run as root on files they do not own (`DAC_OVERRIDE`) and drop
/// to unprivileged users (`SETUID`, `SETGID`); service images switch users the same way, bind
/// ports below 1024 (`NET_BIND_SERVICE`) and signal their own workers (`KILL`). Everything else
/// in Docker's default set stays off: raw sockets (`NET_RAW`, which allows ARP and DNS spoofing
/// on the build network), `MKNOD`, `SYS_CHROOT`, `SETFCAP`, `SETPCAP` and `AUDIT_WRITE`. With
/// `no-new-privileges`, none of these can be gained back through a setuid binary.
pub const DEFAULT_CAPABILITIES: &[&str] =
    &["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "NET_BIND_SERVICE"];

/// Resource limits applied when the spec sets none.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DefaultLimits {
    /// Memory in bytes; swap is not allowed on top of it, so that the limit is real and an
    /// excess ends as out-of-memory instead of a slow crawl.
    pub memory: u64,
    /// CPUs (fractions allowed). Capped at the daemon's CPU count, which Docker insists on.
    pub cpus: f64,
    /// Processes and threads: what stops a fork bomb.
    pub pids: u32,
}

impl Default for DefaultLimits {
    fn default() -> Self {
        DefaultLimits { memory: 2 << 30, cpus: 2.0, pids: 1024 }
    }
}

/// How to reach the daemon and how to run containers.
#[derive(Debug, Clone)]
pub struct DockerOptions {
    /// The daemon's address (`unix:///var/run/docker.sock`, `tcp://host:2375`). `None` means
    /// `DOCKER_HOST`, or the local socket when that is unset.
    pub host: Option<String>,
    /// The value of the `org.cib.engine` label on everything this executor creates. Two
    /// engines sharing a daemon must use different values: reconcile removes whatever carries
    /// its own value and belongs to no live build.
    pub instance: String,
    /// Limits for steps and services that set none.
    pub default_limits: DefaultLimits,
    /// Time between SIGTERM and SIGKILL when a step is stopped.
    pub stop_grace: Duration,
    /// Capabilities added back after `cap_drop: ALL`.
    pub capabilities: Vec<String>,
    /// Time limit of each ordinary API request (not of waiting for a step or reading its logs).
    pub api_timeout: Duration,
    /// Time limit of pulling a missing image.
    pub pull_timeout: Duration,
    /// How long to keep reading a step's output after it exited, before giving up on the rest.
    pub log_drain_timeout: Duration,
    /// The most bytes of caches kept per repository: after a save that goes past it, the least
    /// recently used caches of the repository are removed until the rest fit. `None` keeps all.
    pub cache_budget: Option<u64>,
}

impl DockerOptions {
    /// Defaults for an engine instance: 2 GiB, 2 CPUs and 1024 processes per container, a 10 s
    /// grace period, and [`DEFAULT_CAPABILITIES`].
    pub fn new(instance: impl Into<String>) -> Self {
        DockerOptions {
            host: None,
            instance: instance.into(),
            default_limits: DefaultLimits::default(),
            stop_grace: Duration::from_secs(10),
            capabilities: DEFAULT_CAPABILITIES.iter().map(|c| (*c).to_owned()).collect(),
            api_timeout: Duration::from_secs(120),
            pull_timeout: Duration::from_secs(600),
            log_drain_timeout: Duration::from_secs(10),
            cache_budget: None,
        }
    }
}
