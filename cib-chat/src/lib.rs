//! Chat for cib: Slack and Zulip. Nothing else in cib knows either.
//!
//! - [`verify`] checks that a request came from Slack (its signing secret) or Zulip (the
//!   outgoing webhook's token), in constant time, and refuses replays and stale requests.
//! - [`command`] parses what a person typed (`/cib approve 42 deploy`, `@cib builds`) into a
//!   [`command::Command`]; the server runs it as the person the chat user maps to.
//! - [`payload`] reads Slack's slash commands and block actions and Zulip's outgoing webhook.
//! - [`notifier`] is the [`cib_core::ports::Notifier`]: one message per build, posted when it
//!   is queued and edited in place, through a durable outbox that honours `Retry-After`.
//! - [`testing`] (feature `testing`) holds a fake Slack that checks every request against
//!   Slack's published Web API description, and a fake Zulip that follows Zulip's documented
//!   formats.

pub mod api;
pub mod command;
pub mod notice;
pub mod notifier;
pub mod payload;
#[cfg(feature = "testing")]
pub mod testing;
pub mod verify;

pub use notifier::{ChatConfig, ChatNotifier, ChatTarget, SlackAccount, ZulipAccount};
