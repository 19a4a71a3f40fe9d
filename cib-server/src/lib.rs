//! The reference frontend of cib: the server behind `cib serve` (webhook receiver, REST API,
//! event and log streams, outgoing webhooks). The `cib` binary adds the local commands.

pub mod config;
pub mod http;
pub mod inbox;
pub mod openapi;
pub mod outgoing;
pub mod pools;
pub mod server;
pub mod sse;
