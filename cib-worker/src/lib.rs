//! cib's remote workers, for steps that must run on another operating system (or on hosts with
//! labels the Docker side lacks), over RabbitMQ.
//!
//! - [`dispatch::BrokerExecutor`]: the server's side, an `Executor` that publishes a step as a
//!   job and follows it through the worker API;
//! - [`route::RoutingExecutor`]: picks Docker or the broker for each step by its `runs_on`;
//! - [`worker`]: `cib worker`, which consumes jobs and runs them with the [`host`] executor;
//! - [`protocol`]: the messages and bodies both sides share; [`broker`]: the RabbitMQ topology.
//!
//! Only this crate knows AMQP; the HTTP routes of the worker API live in `cib-server`, which
//! calls [`dispatch::BrokerExecutor`]'s methods.

pub mod broker;
pub mod dispatch;
pub mod host;
pub use cib_core::mask;
pub mod protocol;
pub mod route;
pub mod worker;

pub use dispatch::{BrokerConfig, BrokerExecutor, JobError};
pub use route::{LocalOffer, RoutingExecutor};
