//! The pure heart of cib: the build spec, the pipeline state machine, the resource lease table,
//! the typed events, and the ports through which the engine reaches the world.
//!
//! `spec`, `pipeline` and `lease` do no I/O, spawn nothing and read no clock: time and
//! identifiers come in as arguments, so every scenario is a deterministic unit test.

pub mod engine;
pub mod event;
pub mod forge;
pub mod lease;
pub mod mask;
pub mod pipeline;
pub mod policy;
pub mod ports;
pub mod publish;
pub mod schedule;
pub mod spec;
#[cfg(feature = "testing")]
pub mod testing;
pub mod time;
pub mod workflow;
