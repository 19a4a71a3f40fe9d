//! What the Swarm executor asks the manager to create: service specs for a step, a build's
//! service and a workspace fill, and the placement constraints of `runs_on`.
//!
//! Pure functions of the job and the options, unit-tested here, so that the hardening and the
//! placement are checked without a swarm.

use std::collections::{BTreeMap, HashMap};

use bollard::models::{
    EndpointSpec, EndpointSpecModeEnum, HealthConfig, Limit, Mount, NetworkAttachmentConfig, ResourceObject,
    ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated, ServiceSpecModeReplicatedJob, TaskSpec,
    TaskSpecContainerSpec, TaskSpecContainerSpecFile, TaskSpecContainerSpecSecrets, TaskSpecPlacement,
    TaskSpecResources, TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum,
};
use cib_core::spec::{self, RunsOn};

use crate::containers::{self, Resources};
use crate::naming::{BuildNames, LABEL_ATTEMPT, LABEL_SERVICE, LABEL_STEP, Role};
use crate::options::DockerOptions;

/// Where the step's secrets are mounted, one file per secret named `cib.<NAME>` (tmpfs, in the
/// task's container only); the wrapper exports each as the variable `NAME`.
pub const SECRETS_DIR: &str = "/run/secrets";

/// What the wrapper prints last on stdout when the step failed and the kernel killed something
/// in its cgroup for memory. The executor takes it out of the output before masking.
pub const OOM_TOKEN: &[u8] = b"\x1ecib:oom\x1e";

/// The main process of a step's task: it exports the step's secrets from their files (values
/// kept byte for byte, trailing newlines too), runs the script (`$1`) with `sh -e`, and, when
/// the script failed, reads the cgroup's `oom_kill` counter (cgroup v2 `memory.events`, or v1
/// `memory.oom_control`) and prints [`OOM_TOKEN`] when it grew. Swarm's task status carries
/// the exit code but not the kernel's out-of-memory flag, and a manager cannot inspect a
/// container on another node, so the container reports it itself.
pub const STEP_WRAPPER: &str = r#"for f in /run/secrets/cib.*; do
  [ -e "$f" ] || continue
  v=$(cat "$f"; printf x)
  export "${f#/run/secrets/cib.}=${v%x}"
done
unset f v
sh -e -c "$1" cib-step </dev/null
code=$?
if [ "$code" -ne 0 ]; then
  n=0
  for f in /sys/fs/cgroup/memory.events /sys/fs/cgroup/memory/memory.oom_control; do
    [ -r "$f" ] || continue
    while read -r k v; do [ "$k" = oom_kill ] && n=$v; done < "$f"
  done
  [ "$n" -gt 0 ] && printf '\036cib:oom\036'
fi
exit "$code""#;

/// The main process of a workspace fill: it downloads the checkout's tar archive from the
/// executor's workspace server (`$1` is its address, or empty for the task's default gateway,
/// which is the node itself when the executor runs there; `$2` its port; `$3` the one-time
/// token) and unpacks it into `/`, where the workspace volume is mounted at `/workspace`.
pub const FILL_SCRIPT: &str = r#"set -e
a=$1
if [ -z "$a" ]; then
  a=$(ip route | while read -r x y z r; do [ "$x" = default ] && echo "$z" && break; done):$2
fi
wget -q -O /workspace/.cib-fill.tar "http://$a/$3"
tar -x -f /workspace/.cib-fill.tar -C /
rm -f /workspace/.cib-fill.tar"#;

/// The placement constraints of a step: its `runs_on` labels as node labels, its `os` as the
/// node's platform, and the node its build is pinned to.
pub fn constraints(runs_on: Option<&RunsOn>, node: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(r) = runs_on {
        if let Some(os) = &r.os {
            out.push(format!("node.platform.os=={os}"));
        }
        out.extend(r.labels.iter().map(|(k, v)| format!("node.labels.{k}=={v}")));
    }
    if let Some(id) = node {
        out.push(format!("node.id=={id}"));
    }
    out
}

/// What a node offers for placement: its id, name, platform os, labels and whether it takes
/// tasks (ready and active).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    pub id: String,
    pub hostname: String,
    pub os: String,
    pub labels: BTreeMap<String, String>,
    pub available: bool,
}

/// Why no node can take a step with this `runs_on` (and pinned `node`), or `None` when one can.
pub fn unplaceable(nodes: &[NodeFacts], runs_on: Option<&RunsOn>, node: Option<&str>) -> Option<String> {
    let fits = |n: &NodeFacts| {
        node.is_none_or(|id| n.id == id)
            && runs_on.is_none_or(|r| {
                r.os.as_ref().is_none_or(|os| &n.os == os)
                    && r.labels.iter().all(|(k, v)| n.labels.get(k).is_some_and(|have| have == v))
            })
    };
    if nodes.iter().any(|n| n.available && fits(n)) {
        return None;
    }
    let wanted = runs_on.map_or_else(String::new, |r| {
        let mut parts: Vec<String> = r.os.iter().map(|os| format!("os {os}")).collect();
        parts.extend(r.labels.iter().map(|(k, v)| format!("{k}={v}")));
        parts.join(", ")
    });
    Some(match node {
        Some(id) => {
            let name = nodes.iter().find(|n| n.id == id).map_or(id, |n| n.hostname.as_str());
            if nodes.iter().any(|n| n.id == id && n.available) {
                format!(
                    "runs_on ({wanted}) does not fit node {name}, which holds this build's workspace: the steps of \
                     one build run on the node its first step ran on"
                )
            } else {
                format!("node {name}, which holds this build's workspace, is down or drained")
            }
        }
        None if nodes.iter().any(fits) => format!("every Swarm node with {wanted} is down or drained"),
        None => format!("no Swarm node has {wanted} (set node labels with `docker node update --label-add`)"),
    })
}

fn nanos(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// Limits from the spec or the defaults, and reservations of what the spec itself asks for:
/// a step that says `cpus: 2` is placed on a node with two CPUs not reserved by other tasks,
/// while a step that says nothing reserves nothing and may share a node's CPUs.
fn resources(limits: &spec::Limits, options: &DockerOptions, host_cpus: Option<f64>) -> TaskSpecResources {
    let r: Resources = containers::resources(limits, &options.default_limits, host_cpus);
    let reservations = ResourceObject {
        nano_cpus: limits.cpus.map(|_| r.nano_cpus),
        memory_bytes: limits.memory.map(|_| r.memory),
        generic_resources: None,
    };
    TaskSpecResources {
        limits: Some(Limit { nano_cpus: Some(r.nano_cpus), memory_bytes: Some(r.memory), pids: Some(r.pids) }),
        reservations: Some(reservations),
        ..Default::default()
    }
}

fn job_mode() -> ServiceSpecMode {
    ServiceSpecMode {
        replicated_job: Some(ServiceSpecModeReplicatedJob { max_concurrent: Some(1), total_completions: Some(1) }),
        ..Default::default()
    }
}

/// A job never restarts: its one task's end is the step's end.
fn no_restart() -> TaskSpecRestartPolicy {
    TaskSpecRestartPolicy { condition: Some(TaskSpecRestartPolicyConditionEnum::NONE), ..Default::default() }
}

/// The hardened container spec every task gets: all capabilities dropped but the allowed few,
/// an init process (so that a removal's SIGTERM reaches the shell), never privileged (Swarm
/// cannot ask for it), no host paths mounted.
fn hardened(options: &DockerOptions, image: &str, labels: HashMap<String, String>) -> TaskSpecContainerSpec {
    TaskSpecContainerSpec {
        image: Some(image.to_owned()),
        labels: Some(labels),
        init: Some(true),
        capability_drop: Some(vec!["ALL".to_owned()]),
        capability_add: Some(options.capabilities.iter().map(|c| format!("CAP_{c}")).collect()),
        stop_grace_period: Some(nanos(options.stop_grace)),
        ..Default::default()
    }
}

/// Everything a step's service needs besides its name.
#[derive(Debug)]
pub struct StepService<'a> {
    pub run: &'a cib_core::ports::StepRun,
    pub image: &'a str,
    pub names: &'a BuildNames,
    pub options: &'a DockerOptions,
    pub host_cpus: Option<f64>,
    /// The node the build is pinned to.
    pub node: &'a str,
    /// The build's overlay network, when the step reaches services.
    pub network: Option<String>,
    /// The Swarm secrets made for this attempt: (secret id, secret name, variable name).
    pub secrets: &'a [(String, String, String)],
}

/// The service of one step attempt: a `replicated-job` of one task, pinned to the build's
/// node, mounting the build's workspace volume there.
pub fn step_service(s: &StepService<'_>, name: &str) -> Result<ServiceSpec, cib_core::ports::ExecError> {
    let job = &s.run.job;
    let mut labels = s.names.labels(Role::Step);
    labels.insert(LABEL_STEP.to_owned(), job.step.name.clone());
    labels.insert(LABEL_ATTEMPT.to_owned(), job.attempt.to_string());
    let commands = match &job.step.action {
        spec::Action::Run { commands, .. } => commands.clone(),
        spec::Action::Gate(_) => Vec::new(),
    };
    let mut env = job.env.clone();
    // Secrets never go into the spec (where `docker service inspect` would show them): they
    // arrive as Swarm secrets, files the wrapper reads into the environment.
    for (_, _, var) in s.secrets {
        env.remove(var);
    }
    let mut container = hardened(s.options, s.image, labels.clone());
    container.command = Some(vec!["sh".to_owned(), "-c".to_owned(), STEP_WRAPPER.to_owned(), "cib-wrapper".to_owned()]);
    container.args = Some(vec![containers::script(&commands)]);
    container.env = Some(containers::env_list(&env, &BTreeMap::new()));
    container.dir = Some(containers::workdir(&job.step)?);
    container.mounts = Some(vec![workspace_mount(s.names, s.image)]);
    container.secrets = Some(
        s.secrets
            .iter()
            .map(|(id, secret, var)| TaskSpecContainerSpecSecrets {
                file: Some(TaskSpecContainerSpecFile {
                    name: Some(format!("cib.{var}")),
                    uid: Some("0".to_owned()),
                    gid: Some("0".to_owned()),
                    // Readable by whatever user the image runs as: only this task sees the file.
                    mode: Some(0o444),
                }),
                secret_id: Some(id.clone()),
                secret_name: Some(secret.clone()),
            })
            .collect(),
    );
    let networks =
        s.network.as_ref().map(|n| vec![NetworkAttachmentConfig { target: Some(n.clone()), ..Default::default() }]);
    Ok(ServiceSpec {
        name: Some(name.to_owned()),
        labels: Some(labels),
        task_template: Some(TaskSpec {
            container_spec: Some(container),
            resources: Some(resources(&job.step.limits, s.options, s.host_cpus)),
            restart_policy: Some(no_restart()),
            placement: Some(TaskSpecPlacement {
                constraints: Some(constraints(job.step.runs_on.as_ref(), Some(s.node))),
                ..Default::default()
            }),
            networks,
            ..Default::default()
        }),
        mode: Some(job_mode()),
        ..Default::default()
    })
}

/// The workspace volume, created by Swarm on the node the task lands on, with the build's
/// labels (so that cleanup and reconcile find it there).
pub fn workspace_mount(names: &BuildNames, image: &str) -> Mount {
    containers::workspace_mount(names, image)
}

/// What a workspace fill needs: where the archive is (`address`, empty for the task's gateway,
/// `port`, `token`), the helper image, and the step whose node it picks.
#[derive(Debug)]
pub struct Fill<'a> {
    pub names: &'a BuildNames,
    pub options: &'a DockerOptions,
    pub helper: &'a str,
    /// The first step's image, which the volume's label remembers.
    pub image: &'a str,
    pub runs_on: Option<&'a RunsOn>,
    pub address: &'a str,
    pub port: u16,
    pub token: &'a str,
}

/// The job that fills the build's workspace volume on the node Swarm picks for the build's
/// first step (placed by that step's `runs_on`).
pub fn fill_service(f: &Fill<'_>, name: &str) -> ServiceSpec {
    let Fill { names, options, helper, image, runs_on, address, port, token } = *f;
    let labels = names.labels(Role::Populate);
    let mut container = hardened(options, helper, labels.clone());
    container.command = Some(vec![
        "sh".to_owned(),
        "-c".to_owned(),
        FILL_SCRIPT.to_owned(),
        "cib-fill".to_owned(),
        address.to_owned(),
        port.to_string(),
        token.to_owned(),
    ]);
    // The volume remembers the step's image (as with one daemon), not the helper's.
    container.mounts = Some(vec![workspace_mount(names, image)]);
    let small = spec::Limits { memory: None, cpus: Some(1.0), pids: Some(64) };
    ServiceSpec {
        name: Some(name.to_owned()),
        labels: Some(labels),
        task_template: Some(TaskSpec {
            container_spec: Some(container),
            resources: Some(TaskSpecResources { reservations: None, ..resources(&small, options, None) }),
            restart_policy: Some(no_restart()),
            placement: Some(TaskSpecPlacement { constraints: Some(constraints(runs_on, None)), ..Default::default() }),
            ..Default::default()
        }),
        mode: Some(job_mode()),
        ..Default::default()
    }
}

/// A build's service (a database and the like): one replica on the build's overlay network,
/// reachable from steps by its name, and "running" in Swarm's task status only once its
/// readiness command passes (Swarm holds a task in `starting` until its health check does).
pub fn build_service(
    service: &spec::Service,
    names: &BuildNames,
    options: &DockerOptions,
    host_cpus: Option<f64>,
    network: &str,
    name: &str,
) -> ServiceSpec {
    let mut labels = names.labels(Role::Service);
    labels.insert(LABEL_SERVICE.to_owned(), service.name.clone());
    let mut container = hardened(options, &service.image, labels.clone());
    container.env = Some(containers::env_list(&service.env, &BTreeMap::new()));
    container.command = service.command.clone();
    container.health_check = service.ready.as_ref().map(|r| HealthConfig {
        test: Some(vec!["CMD-SHELL".to_owned(), r.command.clone()]),
        interval: Some(nanos(r.interval.as_std().max(std::time::Duration::from_millis(100)))),
        timeout: Some(nanos(r.interval.as_std().max(std::time::Duration::from_secs(1)))),
        // The executor keeps its own deadline; Swarm only needs a count it accepts (an int32).
        retries: Some(1_000_000),
        start_period: Some(0),
        start_interval: None,
    });
    ServiceSpec {
        name: Some(name.to_owned()),
        labels: Some(labels),
        task_template: Some(TaskSpec {
            container_spec: Some(container),
            resources: Some(resources(&spec::Limits::default(), options, host_cpus)),
            restart_policy: Some(no_restart()),
            networks: Some(vec![NetworkAttachmentConfig {
                target: Some(network.to_owned()),
                aliases: Some(vec![service.name.clone()]),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
            ..Default::default()
        }),
        // The name resolves to the container itself rather than to a virtual IP: one replica
        // needs no load balancing, and a database client sees its server's own address.
        endpoint_spec: Some(EndpointSpec { mode: Some(EndpointSpecModeEnum::DNSRR), ports: None }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs_on(os: Option<&str>, labels: &[(&str, &str)]) -> RunsOn {
        RunsOn {
            os: os.map(str::to_owned),
            labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        }
    }

    fn node(id: &str, labels: &[(&str, &str)], available: bool) -> NodeFacts {
        NodeFacts {
            id: id.to_owned(),
            hostname: format!("host-{id}"),
            os: "linux".to_owned(),
            labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            available,
        }
    }

    #[test]
    fn runs_on_becomes_node_constraints() {
        let r = runs_on(Some("linux"), &[("gpu", "yes"), ("zone", "eu")]);
        assert_eq!(
            constraints(Some(&r), Some("n1")),
            ["node.platform.os==linux", "node.labels.gpu==yes", "node.labels.zone==eu", "node.id==n1"]
        );
        assert!(constraints(None, None).is_empty());
    }

    #[test]
    fn a_label_no_node_has_is_named() {
        let nodes = [node("a", &[("gpu", "no")], true)];
        let why = unplaceable(&nodes, Some(&runs_on(None, &[("gpu", "yes")])), None);
        assert_eq!(
            why.as_deref(),
            Some("no Swarm node has gpu=yes (set node labels with `docker node update --label-add`)")
        );
        assert_eq!(unplaceable(&nodes, Some(&runs_on(Some("linux"), &[("gpu", "no")])), None), None);
        let down = [node("a", &[("gpu", "yes")], false)];
        assert_eq!(
            unplaceable(&down, Some(&runs_on(None, &[("gpu", "yes")])), None).as_deref(),
            Some("every Swarm node with gpu=yes is down or drained")
        );
    }

    #[test]
    fn a_pinned_build_names_its_node() {
        let nodes = [node("a", &[], true), node("b", &[("gpu", "yes")], true)];
        let why = unplaceable(&nodes, Some(&runs_on(None, &[("gpu", "yes")])), Some("a")).unwrap_or_default();
        assert!(why.contains("does not fit node host-a") && why.contains("first step"), "{why}");
        assert_eq!(unplaceable(&nodes, None, Some("a")), None);
    }

    #[test]
    fn steps_are_jobs_with_limits_reservations_and_no_secret_values() {
        let mut job = cib_core::testing::conformance_job("b", "s", "busybox", &["echo hi"]);
        job.step.limits.cpus = Some(1.0);
        job.step.runs_on = Some(runs_on(None, &[("gpu", "yes")]));
        job.env.insert("TOKEN".into(), "from-env".into());
        let run = cib_core::ports::StepRun {
            job,
            secrets: BTreeMap::from([("TOKEN".to_owned(), "s3cr3t".to_owned())]),
            mask: Vec::new(),
            workspace: std::path::PathBuf::from("/tmp"),
        };
        let options = DockerOptions::new("eng");
        let names = BuildNames::new("eng", &run.job.build);
        let secrets = [("sid".to_owned(), "sname".to_owned(), "TOKEN".to_owned())];
        let s = StepService {
            run: &run,
            image: "busybox",
            names: &names,
            options: &options,
            host_cpus: Some(2.0),
            node: "n1",
            network: None,
            secrets: &secrets,
        };
        let spec = step_service(&s, "svc").unwrap_or_else(|e| panic!("{e}"));
        let text = serde_json::to_string(&spec).unwrap_or_default();
        assert!(!text.contains("s3cr3t") && !text.contains("from-env"), "{text}");
        assert!(text.contains("\"MaxConcurrent\":1") && text.contains("\"TotalCompletions\":1"), "{text}");
        let task = spec.task_template.unwrap_or_default();
        let res = task.resources.unwrap_or_default();
        assert_eq!(res.limits.and_then(|l| l.nano_cpus), Some(1_000_000_000));
        assert_eq!(res.reservations.as_ref().and_then(|r| r.nano_cpus), Some(1_000_000_000));
        assert_eq!(res.reservations.and_then(|r| r.memory_bytes), None, "no memory asked, none reserved");
        let constraints = task.placement.and_then(|p| p.constraints).unwrap_or_default();
        assert_eq!(constraints, ["node.labels.gpu==yes", "node.id==n1"]);
        let container = task.container_spec.unwrap_or_default();
        assert_eq!(container.capability_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(container.init, Some(true));
    }
}
