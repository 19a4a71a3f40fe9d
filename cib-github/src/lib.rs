//! GitHub for cib: webhook deliveries turned into [`cib_core::forge::ForgeEvent`]s, and the
//! [`cib_core::ports::Vcs`] and [`cib_core::ports::Notifier`] ports on GitHub's REST API.
//!
//! Only this crate knows GitHub's payloads and API (invariant 2): the server hands it the raw
//! body and the `X-GitHub-Event` and `X-Hub-Signature-256` headers and gets back domain events
//! or a typed reason to refuse the delivery; the engine reaches GitHub only through [`GithubVcs`]
//! and [`GithubNotifier`], built on one [`GithubClient`] authenticated by a token or as a GitHub
//! App. [`ForkGate`] keeps the approvals that let a fork's pull request see secrets.
//!
//! With the `testing` feature, [`testing::FakeGithub`] is a loopback GitHub that checks every
//! request against GitHub's published OpenAPI description.

pub mod client;
pub mod fork;
pub mod notifier;
#[cfg(feature = "testing")]
pub mod testing;
pub mod vcs;
pub mod webhook;

pub use client::{Auth, GithubClient};
pub use fork::{ForkGate, PullRef};
pub use notifier::{GithubNotifier, NotifierConfig};
pub use vcs::GithubVcs;
