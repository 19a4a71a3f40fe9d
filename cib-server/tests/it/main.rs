//! cib-server's integration tests, in one binary: the `cib` command as a user runs it.

mod api;
mod artifacts;
mod chat;
mod cli;
mod client;
mod deliver;
mod github_app;
mod github_flow;
mod inbox;
mod limits;
mod local;
mod metrics;
mod openapi_check;
mod outgoing;
mod packaging;
mod plan;
mod pools;
mod restart;
mod run;
mod schedule;
mod server;
mod trust;
mod web;
mod web_browser;
mod workflow;
