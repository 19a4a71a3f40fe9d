//! cib's [`Executor`](cib_core::ports::Executor) on the Docker Engine API: every step runs in a
//! container of the image its spec names, and nothing is left behind.
//!
//! - **Per build**: a workspace volume holding the checkout, copied in through the archive API
//!   (so the daemon never needs to see the host's path), and a private bridge network on which
//!   services are reachable by their names. Both are created on first use and removed by
//!   `cleanup`.
//! - **Per step**: an `exec` in a warm container of the build that consecutive steps with the
//!   same image, limits, network and services share (see the `warm` module: a wrapper kills
//!   every process a step leaves before the next one starts), or, for `isolated: true`, a
//!   container of its own running the step's commands with `sh -e` from a script copied into
//!   it. Either way variables and secrets arrive as environment variables of that step only,
//!   never in the script, and output is streamed to the log sink with secrets masked, even
//!   across read boundaries.
//! - **Safety by default**: memory (without swap), CPU and process limits, `no-new-privileges`,
//!   all capabilities dropped but a few build commands need ([`DEFAULT_CAPABILITIES`]), never
//!   privileged, no host paths mounted (so never the Docker socket), `network: none` on request.
//! - **Outcomes**: the exit code; out of memory; total and no-output timeouts and stops, each
//!   ending with SIGTERM and, after a grace period, SIGKILL.
//! - **Labels**: everything carries `org.cib.engine` and `org.cib.build`, which `cleanup` and
//!   `reconcile` query, so a crashed engine's leftovers are found without any saved state.
//!
//! Decisions worth knowing:
//! - The workspace is filled once per build, by the build's first container: creating it
//!   creates the labelled volume (one of its mounts), and before it starts, one upload through
//!   the archive API puts the checkout into the volume (files belong to root, or to the image's
//!   user when it names one: `copyUIDGID`) together with what the container itself needs (the
//!   warm directory, or the step's script), with a marker file (`.cib/filled` in the workspace)
//!   written last. A volume without its marker was left half-filled and is filled again. Steps
//!   of one build share the volume: what one step writes, the next one sees.
//! - A step runs warm only when a step that has not started yet could use its container after
//!   it (`StepJob::upcoming`, the machine's hint), or one is idle for it already; otherwise it
//!   runs as the main process of a container of its own, which saves the exec. While a step
//!   runs, the warm container of a step that depends on it alone is made (pipelining).
//! - Containers a step is done with are removed in the background, after its outcome is
//!   reported; `cleanup` waits for those removals of its build before it lists what is left.
//! - Steps run under Docker's small init (`--init`), so SIGTERM reaches the shell, and with the
//!   `none` log driver, since the executor streams the output itself through an attach made
//!   before the start (nothing is lost at the beginning).
//! - Out of memory is reported when the kernel killed something for memory *and* the step
//!   failed; a script that survives a killed command (`|| true`) succeeded.
//! - The log sink receives bytes as the process wrote them, without timestamps: the port has
//!   no place for them, and writing them into the text would change what the step printed.

pub mod cache;
mod containers;
mod errors;
mod executor;
mod image;
pub use cib_core::mask;
pub mod naming;
mod options;
pub mod swarm;
mod warm;
mod workspace;

pub use containers::{SCRIPT_PATH, WORKSPACE};
pub use executor::{DockerExecutor, Resource, ResourceKind};
pub use options::{DEFAULT_CAPABILITIES, DefaultLimits, DockerOptions};
pub use swarm::{SwarmExecutor, SwarmOptions};
