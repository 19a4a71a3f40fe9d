//! What the executor asks Docker to create: container bodies for steps, services and the
//! workspace's reader, with the limits and hardening every one of them gets.
//!
//! These are pure functions of the job and the options, so the safety settings are unit-tested
//! here and only checked once more against a real daemon in the integration tests.

use std::collections::BTreeMap;

use bollard::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, HostConfigLogConfig, Mount, MountType, MountVolumeOptions,
    NetworkingConfig,
};
use cib_core::pipeline::StepJob;
use cib_core::ports::ExecError;
use cib_core::spec::{self, Network};

use crate::naming::{BuildNames, LABEL_ATTEMPT, LABEL_IMAGE, LABEL_SERVICE, LABEL_STDIN, LABEL_STEP, Role};
use crate::options::{DefaultLimits, DockerOptions};

/// Where the workspace volume is mounted in step containers.
pub const WORKSPACE: &str = "/workspace";
/// The directory the step's script is copied into, in the container's own file system.
pub const SCRIPT_DIR: &str = ".cib";
/// Where a step finds the resource units it holds, as JSON, inside the workspace.
pub const RESOURCES_FILE: &str = "/workspace/.cib/resources.json";
/// The script's path in the container.
pub const SCRIPT_PATH: &str = "/.cib/step.sh";

/// What the container's main process prints first on stdout once it has unpacked what arrived on
/// its stdin (see [`STDIN_WRAPPER`]). The executor takes it out of the output, so no log shows
/// it; nothing of the step runs before it, so a step cannot forge it.
pub const UNPACKED: &[u8] = b"\x1ecib:unpacked\x1e";
/// What the container's main process prints first instead when the image has no `tar`: it then
/// exits without running anything, and the executor makes the step's container again, filled
/// through the archive API.
pub const NO_TAR: &[u8] = b"\x1ecib:no-tar\x1e";

/// The main process of a step's own container that is filled through its stdin: it unpacks the
/// tar arriving there into `/` (the step's script under `/.cib`, and the checkout under
/// `/workspace` when the volume needs it), says so on stdout, and replaces itself with `sh -e`
/// on the script, whose stdin is empty as in any other step. `tar` runs as root (only images
/// that run as root are filled this way), so entries keep the owner and mode the archive gives
/// them. Its messages are kept back unless it fails, so that a warning does not land in the
/// step's log. The tokens are written with `printf` octal escapes (`\036` is the byte 0x1e).
pub const STDIN_WRAPPER: &str = r#"command -v tar >/dev/null 2>&1 || { printf '\036cib:no-tar\036'; exit 0; }
if ! e=$(tar -xf - -C / 2>&1); then printf 'cib: the workspace could not be unpacked in the step container: %s\n' "$e" >&2; exit 1; fi
printf '\036cib:unpacked\036'
exec sh -e /.cib/step.sh </dev/null"#;

/// The limits one container gets, in Docker's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    pub memory: i64,
    pub nano_cpus: i64,
    pub pids: i64,
}

/// The spec's limits, or the defaults where it sets none. CPUs are capped at what the daemon
/// has (`host_cpus`), since Docker refuses a container asking for more.
pub fn resources(limits: &spec::Limits, defaults: &DefaultLimits, host_cpus: Option<f64>) -> Resources {
    let memory = limits.memory.map_or(defaults.memory, |m| m.0);
    let mut cpus = limits.cpus.unwrap_or(defaults.cpus);
    if let Some(host) = host_cpus
        && host > 0.0
    {
        cpus = cpus.min(host);
    }
    // Docker's smallest CPU share is 0.01.
    let cpus = cpus.max(0.01);
    let pids = limits.pids.unwrap_or(defaults.pids);
    Resources {
        memory: i64::try_from(memory).unwrap_or(i64::MAX),
        nano_cpus: (cpus * 1e9).round() as i64,
        pids: i64::from(pids),
    }
}

/// The host configuration every container gets: limits, no privileges, all capabilities
/// dropped but the few build commands need, and no mounts but the ones given. The Docker socket
/// is never among them: nothing here mounts a host path at all.
pub fn hardened(options: &DockerOptions, r: Resources) -> HostConfig {
    HostConfig {
        memory: Some(r.memory),
        // Swap equal to memory means no swap: the limit holds, and an excess ends as OOM.
        memory_swap: Some(r.memory),
        nano_cpus: Some(r.nano_cpus),
        pids_limit: Some(r.pids),
        privileged: Some(false),
        security_opt: Some(vec!["no-new-privileges".to_owned()]),
        cap_drop: Some(vec!["ALL".to_owned()]),
        cap_add: Some(options.capabilities.clone()),
        binds: None,
        auto_remove: Some(false),
        ..Default::default()
    }
}

/// The step's working directory in the container: `/workspace` or a directory under it. A path
/// leaving the workspace is refused.
pub fn workdir(step: &spec::Step) -> Result<String, ExecError> {
    let Some(dir) = step.workdir.as_deref().map(|d| d.trim_matches('/')).filter(|d| !d.is_empty()) else {
        return Ok(WORKSPACE.to_owned());
    };
    if dir.split('/').any(|part| part == "..") {
        return Err(ExecError::Permanent(format!("step {}: workdir {dir:?} leaves the workspace", step.name)));
    }
    Ok(format!("{WORKSPACE}/{dir}"))
}

/// The script a step runs: its commands in order, one after the other. It is copied into the
/// container rather than passed on the command line, so that it shows neither in `ps` nor in
/// `docker inspect`, and no length limit applies. Values never appear in it: environment
/// variables and secrets reach the commands through the environment.
pub fn script(commands: &[String]) -> String {
    let mut text = String::from("# The step's commands, run by `sh -e`: the first one that fails ends the step.\n");
    for command in commands {
        text.push_str(command);
        if !command.ends_with('\n') {
            text.push('\n');
        }
    }
    text
}

/// A tar archive holding the script at [`SCRIPT_PATH`], to upload to `/`.
pub fn script_archive(script: &str) -> std::io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    dir.set_uid(0);
    dir.set_gid(0);
    tar.append_data(&mut dir, format!("{SCRIPT_DIR}/"), std::io::empty())?;
    let mut file = tar::Header::new_gnu();
    file.set_entry_type(tar::EntryType::Regular);
    // Readable by whatever user the image runs as; `sh` reads it, nobody executes it.
    file.set_mode(0o644);
    file.set_size(script.len() as u64);
    file.set_uid(0);
    file.set_gid(0);
    tar.append_data(&mut file, format!("{SCRIPT_DIR}/step.sh"), script.as_bytes())?;
    tar.into_inner()
}

/// A tar archive holding the units a step holds (`[{pool, unit, metadata}]`), to upload into
/// the workspace, so that tools can read them without parsing variable names.
pub fn resources_archive(units: &[cib_core::pipeline::GrantedUnit]) -> std::io::Result<Vec<u8>> {
    let json = serde_json::to_vec_pretty(units).map_err(std::io::Error::other)?;
    let mut tar = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    tar.append_data(&mut dir, format!("{SCRIPT_DIR}/"), std::io::empty())?;
    let mut file = tar::Header::new_gnu();
    file.set_entry_type(tar::EntryType::Regular);
    file.set_mode(0o644);
    file.set_size(json.len() as u64);
    tar.append_data(&mut file, format!("{SCRIPT_DIR}/resources.json"), json.as_slice())?;
    tar.into_inner()
}

/// The workspace volume, created with the build's labels and the image of the container that
/// created it (which `export_workspace` reads the volume through, with no container of the
/// build left).
pub(crate) fn workspace_mount(names: &BuildNames, image: &str) -> Mount {
    let mut labels = names.labels(Role::Workspace);
    labels.insert(LABEL_IMAGE.to_owned(), image.to_owned());
    Mount {
        target: Some(WORKSPACE.to_owned()),
        source: Some(names.volume()),
        typ: Some(MountType::VOLUME),
        read_only: Some(false),
        volume_options: Some(MountVolumeOptions {
            // The checkout is the content; whatever the image has at the mount point is not.
            no_copy: Some(true),
            labels: Some(labels),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(crate) fn env_list(env: &BTreeMap<String, String>, secrets: &BTreeMap<String, String>) -> Vec<String> {
    let mut merged = env.clone();
    // A secret wins over a variable of the same name: it is what the spec asked for by name.
    merged.extend(secrets.iter().map(|(k, v)| (k.clone(), v.clone())));
    merged.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// Everything a step container needs besides its name.
#[derive(Debug)]
pub struct StepContainer<'a> {
    pub job: &'a StepJob,
    pub image: &'a str,
    pub secrets: &'a BTreeMap<String, String>,
    pub names: &'a BuildNames,
    pub options: &'a DockerOptions,
    pub host_cpus: Option<f64>,
    /// Filled through its stdin ([`STDIN_WRAPPER`]) rather than an upload before it starts.
    pub stdin_fill: bool,
}

impl StepContainer<'_> {
    /// The container body: the image, `sh -e` on the script, the workspace mounted, the build's
    /// network or none, and the hardened host configuration.
    pub fn body(&self) -> Result<ContainerCreateBody, ExecError> {
        let step = &self.job.step;
        let mut labels = self.names.labels(Role::Step);
        labels.insert(LABEL_STEP.to_owned(), step.name.clone());
        labels.insert(LABEL_ATTEMPT.to_owned(), self.job.attempt.to_string());
        if self.stdin_fill {
            // Read by `attach`, which must take the token out of the daemon's copy of the output
            // just as the first reader did.
            labels.insert(LABEL_STDIN.to_owned(), "1".to_owned());
        }
        let r = resources(&step.limits, &self.options.default_limits, self.host_cpus);
        let network = match step.network {
            Network::None => "none".to_owned(),
            Network::Bridge => self.names.network(),
        };
        let host_config = HostConfig {
            network_mode: Some(network),
            mounts: Some(vec![workspace_mount(self.names, self.image)]),
            // A small init as PID 1 forwards SIGTERM to the shell and reaps orphans: `sh` as
            // PID 1 would ignore SIGTERM, and every stop would wait out the grace period.
            init: Some(true),
            // The executor streams the output itself, but the daemon keeps a bounded copy too:
            // an engine that restarts while the step runs reads the output it missed from there
            // (see `Executor::attach`). Two files of 32 MiB hold as much as the store keeps.
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".to_owned()),
                config: Some(
                    [("max-size".to_owned(), "32m".to_owned()), ("max-file".to_owned(), "2".to_owned())].into(),
                ),
            }),
            ..hardened(self.options, r)
        };
        Ok(ContainerCreateBody {
            image: Some(self.image.to_owned()),
            // The entrypoint is replaced, not prefixed: images whose entrypoint is a program
            // (`git`, `docker`) would otherwise receive the shell as arguments.
            entrypoint: Some(if self.stdin_fill {
                vec!["sh".to_owned(), "-c".to_owned(), STDIN_WRAPPER.to_owned(), "cib-step".to_owned()]
            } else {
                vec!["sh".to_owned(), "-e".to_owned(), SCRIPT_PATH.to_owned()]
            }),
            cmd: Some(Vec::new()),
            env: Some({
                let mut env = env_list(&self.job.env, self.secrets);
                if !self.job.resources.is_empty() {
                    env.push(format!("CIB_RESOURCES_FILE={RESOURCES_FILE}"));
                }
                env
            }),
            working_dir: Some(workdir(step)?),
            labels: Some(labels),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            attach_stdin: Some(self.stdin_fill),
            open_stdin: Some(self.stdin_fill),
            // The wrapper's `tar` sees the end of its input when the executor closes its side.
            stdin_once: Some(self.stdin_fill),
            tty: Some(false),
            stop_timeout: Some(i64::try_from(self.options.stop_grace.as_secs()).unwrap_or(i64::MAX)),
            host_config: Some(host_config),
            ..Default::default()
        })
    }
}

/// A service container: its image with its own entrypoint, on the build's network under its
/// name, with the default limits and the same hardening as steps.
pub fn service_body(
    service: &spec::Service,
    names: &BuildNames,
    options: &DockerOptions,
    host_cpus: Option<f64>,
) -> ContainerCreateBody {
    let mut labels = names.labels(Role::Service);
    labels.insert(LABEL_SERVICE.to_owned(), service.name.clone());
    let r = resources(&spec::Limits::default(), &options.default_limits, host_cpus);
    let network = names.network();
    let endpoint = EndpointSettings { aliases: Some(vec![service.name.clone()]), ..Default::default() };
    let host_config = HostConfig {
        network_mode: Some(network.clone()),
        // Kept small and local, so that a service that never becomes ready can be explained
        // with its last lines.
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".to_owned()),
            config: Some([("max-size".to_owned(), "1m".to_owned()), ("max-file".to_owned(), "1".to_owned())].into()),
        }),
        ..hardened(options, r)
    };
    ContainerCreateBody {
        image: Some(service.image.clone()),
        cmd: service.command.clone(),
        env: Some(env_list(&service.env, &BTreeMap::new())),
        hostname: Some(service.name.clone()),
        labels: Some(labels),
        tty: Some(false),
        host_config: Some(host_config),
        networking_config: Some(NetworkingConfig { endpoints_config: Some([(network, endpoint)].into()) }),
        ..Default::default()
    }
}

/// A container that reads the workspace volume for `export_workspace`: created with the volume
/// mounted and read through the archive API, never started, so nothing of the image runs.
pub fn populate_body(image: &str, names: &BuildNames, options: &DockerOptions) -> ContainerCreateBody {
    let r = resources(&spec::Limits::default(), &options.default_limits, None);
    ContainerCreateBody {
        image: Some(image.to_owned()),
        entrypoint: Some(vec!["true".to_owned()]),
        cmd: Some(Vec::new()),
        labels: Some(names.labels(Role::Populate)),
        host_config: Some(HostConfig {
            network_mode: Some("none".to_owned()),
            mounts: Some(vec![workspace_mount(names, image)]),
            ..hardened(options, Resources { nano_cpus: r.nano_cpus.min(1_000_000_000), ..r })
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use cib_core::event::BuildId;
    use cib_core::testing::conformance_job;

    use super::*;

    fn body_of(job: &StepJob, secrets: &BTreeMap<String, String>) -> ContainerCreateBody {
        let names = BuildNames::new("t", &job.build);
        let options = DockerOptions::new("t");
        let c = StepContainer {
            job,
            image: "busybox",
            secrets,
            names: &names,
            options: &options,
            host_cpus: Some(2.0),
            stdin_fill: false,
        };
        c.body().unwrap_or_else(|e| panic!("body: {e}"))
    }

    #[test]
    fn defaults_apply_when_the_spec_sets_no_limits() {
        let job = conformance_job("b", "s", "busybox", &["true"]);
        let hc = body_of(&job, &BTreeMap::new()).host_config.unwrap_or_default();
        assert_eq!(hc.memory, Some(2 << 30));
        assert_eq!(hc.memory_swap, Some(2 << 30));
        assert_eq!(hc.nano_cpus, Some(2_000_000_000));
        assert_eq!(hc.pids_limit, Some(1024));
        assert_eq!(hc.privileged, Some(false));
        assert_eq!(hc.security_opt, Some(vec!["no-new-privileges".to_owned()]));
        assert_eq!(hc.cap_drop, Some(vec!["ALL".to_owned()]));
        assert!(hc.binds.is_none());
        let mounts = hc.mounts.unwrap_or_default();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].target.as_deref(), Some(WORKSPACE));
        assert_eq!(mounts[0].typ, Some(MountType::VOLUME));
        assert_eq!(hc.network_mode, Some(BuildNames::new("t", &BuildId::from("b")).network()));
    }

    #[test]
    fn spec_limits_win_and_cpus_are_capped_at_the_host() {
        let mut job = conformance_job("b", "s", "busybox", &["true"]);
        job.step.limits = spec::Limits { memory: Some(spec::Memory(64 << 20)), cpus: Some(8.0), pids: Some(50) };
        job.step.network = Network::None;
        let hc = body_of(&job, &BTreeMap::new()).host_config.unwrap_or_default();
        assert_eq!(hc.memory, Some(64 << 20));
        assert_eq!(hc.nano_cpus, Some(2_000_000_000), "8 CPUs asked, 2 on the host");
        assert_eq!(hc.pids_limit, Some(50));
        assert_eq!(hc.network_mode.as_deref(), Some("none"));
    }

    #[test]
    fn secrets_are_in_the_environment_and_not_in_the_script() {
        let mut job = conformance_job("b", "s", "busybox", &["echo $TOKEN", "make"]);
        job.env.insert("A".into(), "1".into());
        let secrets = BTreeMap::from([("TOKEN".to_owned(), "v4lue".to_owned())]);
        let body = body_of(&job, &secrets);
        let env = body.env.unwrap_or_default();
        assert!(env.contains(&"A=1".to_owned()) && env.contains(&"TOKEN=v4lue".to_owned()), "{env:?}");
        let spec::Action::Run { commands, .. } = &job.step.action else { panic!("not a run step") };
        let text = script(commands);
        assert!(text.ends_with("echo $TOKEN\nmake\n") && !text.contains("v4lue"), "{text}");
        assert_eq!(body.entrypoint, Some(vec!["sh".to_owned(), "-e".to_owned(), SCRIPT_PATH.to_owned()]));
    }

    #[test]
    fn a_container_filled_through_stdin_opens_it_once_and_runs_the_wrapper() {
        let job = conformance_job("b", "s", "busybox", &["true"]);
        let names = BuildNames::new("t", &job.build);
        let options = DockerOptions::new("t");
        let secrets = BTreeMap::new();
        let mut c = StepContainer {
            job: &job,
            image: "busybox",
            secrets: &secrets,
            names: &names,
            options: &options,
            host_cpus: None,
            stdin_fill: true,
        };
        let body = c.body().unwrap_or_else(|e| panic!("body: {e}"));
        assert_eq!((body.open_stdin, body.stdin_once, body.attach_stdin), (Some(true), Some(true), Some(true)));
        assert_eq!(body.entrypoint.unwrap_or_default().get(2).map(String::as_str), Some(STDIN_WRAPPER));
        assert_eq!(body.labels.unwrap_or_default().get(LABEL_STDIN).map(String::as_str), Some("1"));
        c.stdin_fill = false;
        let body = c.body().unwrap_or_else(|e| panic!("body: {e}"));
        assert_eq!((body.open_stdin, body.stdin_once), (Some(false), Some(false)), "stdin stays closed otherwise");
        assert!(!body.labels.unwrap_or_default().contains_key(LABEL_STDIN));
    }

    #[test]
    fn workdir_stays_inside_the_workspace() {
        let mut job = conformance_job("b", "s", "busybox", &["true"]);
        assert_eq!(workdir(&job.step).ok().as_deref(), Some("/workspace"));
        job.step.workdir = Some("/sub/dir/".into());
        assert_eq!(workdir(&job.step).ok().as_deref(), Some("/workspace/sub/dir"));
        job.step.workdir = Some("sub/../../etc".into());
        assert!(workdir(&job.step).is_err());
    }

    #[test]
    fn the_script_archive_holds_the_script() {
        let bytes = script_archive("echo hi\n").unwrap_or_else(|e| panic!("archive: {e}"));
        let mut archive = tar::Archive::new(bytes.as_slice());
        let paths: Vec<String> = archive
            .entries()
            .unwrap_or_else(|e| panic!("entries: {e}"))
            .map(|e| e.map(|e| e.path().map(|p| p.display().to_string()).unwrap_or_default()).unwrap_or_default())
            .collect();
        assert_eq!(paths, [".cib/", ".cib/step.sh"]);
    }
}
