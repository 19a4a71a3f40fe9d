//! The reference frontend of cib: the server behind `cib serve` (webhook receiver, REST API,
//! event and log streams, outgoing webhooks). The `cib` binary adds the local commands.

// Handlers answer with a whole response on every path, errors included, and pass those
// answers up as `Err`; boxing them would only add noise.
#![allow(clippy::result_large_err)]

pub mod api;
pub mod auth;
pub mod config;
pub mod downstream;
pub mod error;
pub mod extract;
pub mod forge;
pub mod http;
pub mod inbox;
pub mod metrics;
pub mod openapi;
pub mod outgoing;
pub mod retention;
pub mod routes;
pub mod scheduler;
pub mod secrets;
pub mod server;
pub mod sse;
pub mod ssrf;
pub mod state;
pub mod web;
pub mod workflow;
