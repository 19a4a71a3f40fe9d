//! Warm steps: consecutive steps of one build that would get identical containers run as
//! `exec`s in one long-lived container instead, which saves a whole container lifecycle
//! (create, start, wait, remove) per step.
//!
//! How a warm container works:
//! - **PID 1 is a keeper shell**, `sh -c` looping on `sleep`, with no Docker init in front of
//!   it. Being PID 1 is what makes the sweeps below one system call: `kill -KILL -1` signals
//!   every process the caller may signal except PID 1 and the caller, so a step's processes can
//!   all be killed without telling the keeper apart from them (with `sleep infinity` under
//!   Docker's init, that `kill` would take the keeper too and end the container). As PID 1 the
//!   shell also reaps the orphans a step leaves: its `wait` collects any child.
//! - **Each step is one `exec`** of [`WRAPPER`] with the step's own environment (its variables
//!   and only the secrets it asked for), its working directory, and the script in
//!   `CIB_STEP_SCRIPT` (unset before the script runs) or, when too long for one variable, in an
//!   uploaded file named by `CIB_STEP_FILE`. The wrapper records its pid in
//!   `/.cib/wrapper.pid`, kills whatever an earlier step left, runs the script with `sh -e`, then
//!   kills every process left (a backgrounded server, a daemonised tool) before it exits with
//!   the script's status. So when the next step starts, nothing of the previous one runs, and no
//!   process holding its environment (its secrets) is left to read in `/proc/*/environ`.
//! - **One step at a time**: a warm container is taken by one step and given back when that
//!   step ended cleanly. Parallel steps of a build each take their own.
//! - **Stopping a step** (cancel, timeout, no output) runs [`TERM_SWEEP`] in a second exec:
//!   SIGTERM to every process but PID 1, the sweeper and the wrapper (read from
//!   `/.cib/wrapper.pid`), so the step's shell and its children hear it and may trap it. Once the
//!   grace period is over the container is removed (SIGKILL to everything in it). A stopped
//!   step's container is never reused.
//! - **Out of memory**: Docker only flags an OOM kill when the container itself ends, not when
//!   the kernel kills a process of an exec, so the wrapper reads the container's cgroup counter
//!   (`oom_kill` in `memory.events` with cgroup v2, `memory.oom_control` with v1) before and
//!   after the script and leaves `/.cib/oom-killed` when it grew. A failing step that left it
//!   is out of memory. That container is then thrown away, and so is one that is no longer
//!   running (its keeper was killed, or Docker's own OOM flag is set); the next step gets a new
//!   one.
//! - **Restarts**: Docker keeps no copy of an exec's output, so an engine that restarts cannot
//!   re-attach to a warm step. Such a step is reported gone, which the engine records as
//!   interrupted (re-run once, never for a deploy pipeline); the warm containers the previous
//!   process left for that build are removed first, so the old run cannot overlap the new one.

use std::collections::BTreeMap;

use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig};
use cib_core::pipeline::StepJob;
use cib_core::spec::{self, Network};

use crate::containers::{Resources, hardened, resources, workspace_mount};
use crate::naming::{BuildNames, Role};
use crate::options::DockerOptions;

/// The keeper: PID 1 of a warm container. `wait` returns when the sweeps kill its `sleep`, and
/// the loop starts another; SIGTERM (a `docker stop`) ends it.
pub const KEEPER: &str = "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done";

/// The directory for the wrapper's files: writable by any user the image runs as, sticky.
pub const WARM_DIR: &str = ".cib";

/// Scripts longer than this go in a file, since one environment variable holds at most 128 KiB.
pub const INLINE_SCRIPT_MAX: usize = 64 * 1024;

/// Runs one step in a warm container (see the module documentation). Every `kill` is the
/// shell's builtin, so no image tool is needed.
pub const WRAPPER: &str = r#"echo $$ > /.cib/wrapper.pid
kill -KILL -1 2>/dev/null
rm -f /.cib/oom-killed
oom() { n=0; for c in /sys/fs/cgroup/memory.events /sys/fs/cgroup/memory/memory.oom_control; do if [ -r "$c" ]; then while read k v; do if [ "$k" = oom_kill ]; then n=$v; fi; done < "$c"; break; fi; done; }
oom; before=$n
if [ -n "${CIB_STEP_FILE:-}" ]; then f=$CIB_STEP_FILE; else f=/.cib/step-$$.sh; printf '%s' "$CIB_STEP_SCRIPT" > "$f"; fi
unset CIB_STEP_SCRIPT CIB_STEP_FILE
mkdir -p "$CIB_STEP_WORKDIR" && cd "$CIB_STEP_WORKDIR" || exit 1
unset CIB_STEP_WORKDIR
sh -e "$f"
s=$?
kill -KILL -1 2>/dev/null
oom; if [ "$n" != "$before" ]; then : > /.cib/oom-killed; fi
rm -f /.cib/step-$$.sh
exit $s"#;

/// SIGTERM to the running step: every process but PID 1 (the keeper), this sweeper and the
/// wrapper, which must outlive the step to sweep after it.
pub const TERM_SWEEP: &str = r#"read w < /.cib/wrapper.pid
for p in /proc/[0-9]*; do p=${p#/proc/}; [ "$p" = 1 ] || [ "$p" = "$$" ] || [ "$p" = "$w" ] || kill -TERM "$p" 2>/dev/null; done
exit 0"#;

/// What must be equal for two steps to share a warm container: everything that is fixed when
/// a container is created.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmKey {
    pub image: String,
    pub resources: Resources,
    pub network: Network,
    pub services: Vec<String>,
}

impl WarmKey {
    pub fn of(step: &spec::Step, image: &str, options: &DockerOptions, host_cpus: Option<f64>) -> Self {
        let mut services = step.services.clone();
        services.sort();
        WarmKey {
            image: image.to_owned(),
            resources: resources(&step.limits, &options.default_limits, host_cpus),
            network: step.network,
            services,
        }
    }
}

/// A warm container: the image's user, the key's limits and network, the workspace mounted,
/// hardened like every step container, and the keeper as PID 1.
pub fn warm_body(key: &WarmKey, names: &BuildNames, options: &DockerOptions) -> ContainerCreateBody {
    let network = match key.network {
        Network::None => "none".to_owned(),
        Network::Bridge => names.network(),
    };
    let host_config = HostConfig {
        network_mode: Some(network),
        mounts: Some(vec![workspace_mount(names, &key.image)]),
        // No Docker init: the keeper must be PID 1 (see the module documentation).
        init: Some(false),
        // The keeper prints nothing, and exec output never reaches the container's log.
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".to_owned()),
            config: Some([("max-size".to_owned(), "1m".to_owned()), ("max-file".to_owned(), "1".to_owned())].into()),
        }),
        ..hardened(options, key.resources)
    };
    ContainerCreateBody {
        image: Some(key.image.clone()),
        entrypoint: Some(vec!["sh".to_owned(), "-c".to_owned(), KEEPER.to_owned()]),
        cmd: Some(Vec::new()),
        env: Some(Vec::new()),
        working_dir: Some(crate::containers::WORKSPACE.to_owned()),
        labels: Some(names.labels(Role::Warm)),
        attach_stdout: Some(false),
        attach_stderr: Some(false),
        tty: Some(false),
        stop_timeout: Some(1),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// The environment of one step's exec: its variables, its secrets (which win over a variable of
/// the same name), the resources file when it holds units, and its script.
pub fn exec_env(job: &StepJob, secrets: &BTreeMap<String, String>, script: &str, workdir: &str) -> Vec<String> {
    let mut env = crate::containers::env_list(&job.env, secrets);
    // Made by the wrapper when missing, as Docker does for a container's working directory
    // (an exec's own must exist already).
    env.push(format!("CIB_STEP_WORKDIR={workdir}"));
    if !job.resources.is_empty() {
        env.push(format!("CIB_RESOURCES_FILE={}", crate::containers::RESOURCES_FILE));
    }
    if script.len() <= INLINE_SCRIPT_MAX {
        env.push(format!("CIB_STEP_SCRIPT={script}"));
    } else {
        env.push(format!("CIB_STEP_FILE={}", crate::containers::SCRIPT_PATH));
    }
    env
}

/// Whether a step may run in a warm container at all.
pub fn eligible(step: &spec::Step) -> bool {
    !step.isolated
}

#[cfg(test)]
mod tests {
    use cib_core::testing::conformance_job;

    use super::*;

    #[test]
    fn steps_with_the_same_container_settings_share_a_key_and_others_do_not() {
        let options = DockerOptions::new("t");
        let a = conformance_job("b", "a", "busybox", &["true"]);
        let mut b = conformance_job("b", "b", "busybox", &["false"]);
        b.env.insert("X".into(), "1".into());
        b.step.secrets.push("TOKEN".into());
        assert_eq!(
            WarmKey::of(&a.step, "busybox", &options, Some(2.0)),
            WarmKey::of(&b.step, "busybox", &options, Some(2.0))
        );
        let mut c = a.clone();
        c.step.network = Network::None;
        assert_ne!(WarmKey::of(&a.step, "busybox", &options, None), WarmKey::of(&c.step, "busybox", &options, None));
        let mut d = a.clone();
        d.step.limits.memory = Some(spec::Memory(64 << 20));
        assert_ne!(WarmKey::of(&a.step, "busybox", &options, None), WarmKey::of(&d.step, "busybox", &options, None));
        assert_ne!(
            WarmKey::of(&a.step, "busybox", &options, None),
            WarmKey::of(&a.step, "python:3.12-slim", &options, None)
        );
        let mut e = a.clone();
        e.step.services.push("db".into());
        assert_ne!(WarmKey::of(&a.step, "busybox", &options, None), WarmKey::of(&e.step, "busybox", &options, None));
    }

    #[test]
    fn the_warm_container_is_hardened_and_runs_the_keeper_as_pid_1() {
        let options = DockerOptions::new("t");
        let job = conformance_job("b", "a", "busybox", &["true"]);
        let names = BuildNames::new("t", &job.build);
        let body = warm_body(&WarmKey::of(&job.step, "busybox", &options, Some(2.0)), &names, &options);
        let hc = body.host_config.unwrap_or_default();
        assert_eq!(hc.init, Some(false));
        assert_eq!(hc.privileged, Some(false));
        assert_eq!(hc.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(hc.security_opt, Some(vec!["no-new-privileges".to_owned()]));
        assert_eq!(hc.memory, Some(2 << 30));
        assert!(hc.binds.is_none());
        assert_eq!(body.env, Some(Vec::new()), "no step's variables or secrets on the container itself");
        assert_eq!(body.entrypoint.unwrap_or_default().last().map(String::as_str), Some(KEEPER));
    }

    #[test]
    fn secrets_and_the_script_go_in_the_exec_environment_and_long_scripts_in_a_file() {
        let job = conformance_job("b", "a", "busybox", &["true"]);
        let secrets = BTreeMap::from([("TOKEN".to_owned(), "v".to_owned())]);
        let env = exec_env(&job, &secrets, "echo hi\n", "/workspace");
        assert!(env.contains(&"TOKEN=v".to_owned()), "{env:?}");
        assert!(env.contains(&"CIB_STEP_SCRIPT=echo hi\n".to_owned()), "{env:?}");
        let long = "x".repeat(INLINE_SCRIPT_MAX + 1);
        let env = exec_env(&job, &secrets, &long, "/workspace");
        assert!(env.iter().all(|e| !e.starts_with("CIB_STEP_SCRIPT=")), "{env:?}");
        assert!(env.contains(&format!("CIB_STEP_FILE={}", crate::containers::SCRIPT_PATH)));
    }

    #[test]
    fn isolated_steps_are_not_eligible() {
        let mut job = conformance_job("b", "a", "busybox", &["true"]);
        assert!(eligible(&job.step));
        job.step.isolated = true;
        assert!(!eligible(&job.step));
    }
}
