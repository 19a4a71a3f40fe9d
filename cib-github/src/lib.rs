//! GitHub for cib: webhook deliveries verified and turned into [`cib_core::forge::ForgeEvent`]s.
//!
//! Only this crate knows GitHub's payloads (invariant 2): the server hands it the raw body and
//! the `X-GitHub-Event` and `X-Hub-Signature-256` headers, and gets back domain events or a
//! typed reason to refuse the delivery. The `Vcs` and `Notifier` ports on GitHub's API (issue 8,
//! items 2 to 5) will live here too.

pub mod webhook;
