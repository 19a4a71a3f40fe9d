//! Integration tests of the Docker executor against a real daemon.
//!
//! They never skip: without a daemon every test fails and says how to start one
//! (`scripts/ensure-docker`, which `scripts/test` runs first). Each test uses its own engine
//! instance label, so tests running in parallel never see, reconcile or remove each other's
//! containers, and "nothing is left" is checked by querying Docker for that label directly.

mod cache;
mod common;
mod conformance;
mod fill;
mod images;
mod lifecycle;
mod logs;
mod safety;
mod services;
mod swarm;
mod warm;
