//! GitHub webhook deliveries: check the signature on the raw bytes, then parse them into forge events.
//!
//! Both steps are pure functions so the server's receiver, the tests and a replay of the inbox
//! all use the same code. The receiver must call [`verify`] on the exact bytes it received before
//! [`parse`]: re-serialising a parsed body would not reproduce the bytes GitHub signed.
//!
//! How the server answers follows from the result: a [`VerifyError`] is a 401, a [`ParseError`]
//! is a 400 carrying [`ParseError`]'s message, and [`ForgeEvent::Ignored`] is a 202.
//!
//! ```
//! use cib_core::forge::ForgeEvent;
//! use cib_github::webhook;
//!
//! let secret = b"It's a Secret to Everybody";
//! let body = br#"{"zen": "Keep it logically awesome.", "hook_id": 42}"#;
//! // What GitHub sends in `X-Hub-Signature-256` for this body.
//! let signature = webhook::sign(secret, body);
//!
//! webhook::verify(secret, body, Some(&signature))?;
//! assert_eq!(webhook::parse("ping", body)?, ForgeEvent::Ping { hook_id: Some(42) });
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`ForgeEvent::Ignored`]: cib_core::forge::ForgeEvent::Ignored

mod parse;
mod payload;
mod signature;

pub use parse::{ParseError, parse};
pub use signature::{VerifyError, sign, verify};

/// The header naming the event type (`push`, `pull_request`, ...).
pub const EVENT_HEADER: &str = "X-GitHub-Event";
/// The header carrying `sha256=<hex HMAC of the body>`.
pub const SIGNATURE_HEADER: &str = "X-Hub-Signature-256";
/// The header carrying a unique id per delivery; redeliveries keep it, so the inbox dedupes on it.
pub const DELIVERY_HEADER: &str = "X-GitHub-Delivery";
