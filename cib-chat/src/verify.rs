//! Is this request from Slack, or from our Zulip bot? Pure functions over the raw body and the
//! headers, plus a small memory of recent signatures against replays.
//!
//! Slack signs `v0:<X-Slack-Request-Timestamp>:<body>` with HMAC-SHA256 under the app's
//! signing secret and sends `X-Slack-Signature: v0=<hex>`. The timestamp must be within five
//! minutes of now, and a signature seen before within that window is a replay. Zulip puts the
//! outgoing webhook's token in the JSON body; it is compared in constant time.

use std::collections::BTreeMap;
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// How far a Slack request's timestamp may be from now, in seconds (Slack's own advice).
pub const MAX_SKEW_SECS: i64 = 5 * 60;

/// Why a request was refused. Each is answered 401 and changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the request has no {0} header")]
    MissingHeader(&'static str),
    #[error("the {0} header is malformed")]
    Malformed(&'static str),
    #[error("the request's timestamp is {0} s from now, more than the 5 minutes allowed")]
    Stale(i64),
    #[error("the signature does not match")]
    BadSignature,
    #[error("this request was already received")]
    Replayed,
    #[error("the token does not match")]
    BadToken,
}

/// The signature Slack would send for `body` at `timestamp`: `v0=<hex>`.
pub fn slack_signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let mut mac = mac(secret);
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(body);
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

fn mac(secret: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length, so this never fails.
    <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
}

/// Checks a Slack request: the timestamp within five minutes of `now_secs`, then the
/// signature over the raw body, compared in constant time (`Mac::verify_slice`).
pub fn verify_slack(
    secret: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now_secs: i64,
) -> Result<(), VerifyError> {
    let timestamp = timestamp.ok_or(VerifyError::MissingHeader("X-Slack-Request-Timestamp"))?;
    let signature = signature.ok_or(VerifyError::MissingHeader("X-Slack-Signature"))?;
    let at: i64 = timestamp.trim().parse().map_err(|_| VerifyError::Malformed("X-Slack-Request-Timestamp"))?;
    let skew = now_secs - at;
    if skew.abs() > MAX_SKEW_SECS {
        return Err(VerifyError::Stale(skew));
    }
    let hex_part = signature.strip_prefix("v0=").ok_or(VerifyError::Malformed("X-Slack-Signature"))?;
    let given = hex::decode(hex_part).map_err(|_| VerifyError::Malformed("X-Slack-Signature"))?;
    let mut mac = mac(secret);
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(body);
    mac.verify_slice(&given).map_err(|_| VerifyError::BadSignature)
}

/// Compares a Zulip outgoing webhook's token with the configured one in constant time
/// (digests are compared, so neither a prefix nor the length leaks).
pub fn verify_zulip_token(expected: &str, given: &str) -> Result<(), VerifyError> {
    let a: [u8; 32] = Sha256::digest(expected.as_bytes()).into();
    let b: [u8; 32] = Sha256::digest(given.as_bytes()).into();
    let diff = a.iter().zip(&b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    if diff == 0 && !expected.is_empty() { Ok(()) } else { Err(VerifyError::BadToken) }
}

/// The signatures of Slack requests accepted within the last five minutes: the same signed
/// request again is a replay. Older entries can go, since the timestamp check refuses them.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    seen: Mutex<BTreeMap<String, i64>>,
}

impl ReplayGuard {
    /// Records `signature` (seen at `timestamp`); `Err(Replayed)` when it was already seen.
    pub fn check(&self, signature: &str, timestamp: i64, now_secs: i64) -> Result<(), VerifyError> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, at| now_secs - *at <= MAX_SKEW_SECS + 60);
        if seen.contains_key(signature) {
            return Err(VerifyError::Replayed);
        }
        seen.insert(signature.to_owned(), timestamp);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slack's published example, from "Verifying requests from Slack".
    const BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    const SECRET: &[u8] = b"8f742231b10e8888abcd99yyyzzz85a5";
    const EXPECTED: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

    #[test]
    fn chat_slack_known_answer() {
        assert_eq!(slack_signature(SECRET, "1531420618", BODY.as_bytes()), EXPECTED);
        assert_eq!(verify_slack(SECRET, Some("1531420618"), Some(EXPECTED), BODY.as_bytes(), 1531420618 + 10), Ok(()));
    }

    #[test]
    fn chat_slack_refusals() {
        let at = 1531420618;
        let body = BODY.as_bytes();
        let mut tampered = BODY.to_owned();
        tampered.push('x');
        assert_eq!(
            verify_slack(SECRET, Some("1531420618"), Some(EXPECTED), tampered.as_bytes(), at),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            verify_slack(b"other", Some("1531420618"), Some(EXPECTED), body, at),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            verify_slack(SECRET, Some("1531420618"), Some(EXPECTED), body, at + 360),
            Err(VerifyError::Stale(360))
        );
        assert_eq!(
            verify_slack(SECRET, Some("1531420618"), Some(EXPECTED), body, at - 360),
            Err(VerifyError::Stale(-360))
        );
        assert_eq!(
            verify_slack(SECRET, None, Some(EXPECTED), body, at),
            Err(VerifyError::MissingHeader("X-Slack-Request-Timestamp"))
        );
        assert_eq!(
            verify_slack(SECRET, Some("soon"), Some(EXPECTED), body, at),
            Err(VerifyError::Malformed("X-Slack-Request-Timestamp"))
        );
        assert_eq!(
            verify_slack(SECRET, Some("1531420618"), Some("v1=00"), body, at),
            Err(VerifyError::Malformed("X-Slack-Signature"))
        );
        assert_eq!(
            verify_slack(SECRET, Some("1531420618"), Some("v0=zz"), body, at),
            Err(VerifyError::Malformed("X-Slack-Signature"))
        );
    }

    #[test]
    fn chat_replays_are_refused() {
        let guard = ReplayGuard::default();
        assert_eq!(guard.check(EXPECTED, 100, 100), Ok(()));
        assert_eq!(guard.check(EXPECTED, 100, 150), Err(VerifyError::Replayed));
        assert_eq!(guard.check("v0=other", 100, 150), Ok(()));
    }

    #[test]
    fn chat_zulip_token() {
        assert_eq!(verify_zulip_token("xvOzfurIutdRRVLzpXrIIHXJvNfaJLJ0", "xvOzfurIutdRRVLzpXrIIHXJvNfaJLJ0"), Ok(()));
        assert_eq!(
            verify_zulip_token("xvOzfurIutdRRVLzpXrIIHXJvNfaJLJ0", "xvOzfurIutdRRVLzpXrIIHXJvNfaJLJ"),
            Err(VerifyError::BadToken)
        );
        assert_eq!(verify_zulip_token("", ""), Err(VerifyError::BadToken), "an unset token never matches");
    }
}
