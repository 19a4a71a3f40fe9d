//! The `X-Hub-Signature-256` check: an HMAC-SHA256 of the raw body under the webhook's secret.
//!
//! Every way a header can be wrong has its own [`VerifyError`] variant, so the operator's log says
//! whether a sender forgot the secret, used the old SHA-1 header, or sent a forged signature. All
//! of them are answered alike (401); the distinction is for people, not for control flow.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The prefix GitHub puts before the hex digest.
const PREFIX: &str = "sha256=";
/// An HMAC-SHA256 is 32 bytes, so 64 hex digits.
const HEX_LEN: usize = 64;

/// Why a delivery's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The webhook secret is empty; anyone could sign with it, so nothing is accepted. This is an
    /// operator's misconfiguration, not a bad delivery.
    #[error("no webhook secret is configured, so no delivery can be trusted")]
    EmptySecret,
    /// The delivery has no `X-Hub-Signature-256` header (is a secret set on GitHub's side?).
    #[error("the X-Hub-Signature-256 header is missing")]
    MissingHeader,
    /// The header does not start with `sha256=` (for example the SHA-1 `sha1=` form).
    #[error("the X-Hub-Signature-256 header does not start with `sha256=`")]
    WrongPrefix,
    /// The digest after the prefix is not 64 bytes long (64 hex digits make an HMAC-SHA256).
    #[error("the signature is {found} bytes long, expected 64 hex digits")]
    WrongLength { found: usize },
    /// The digest has the right length but is not hexadecimal.
    #[error("the signature is not hexadecimal")]
    BadHex,
    /// The digest is well formed but does not match the body under our secret.
    #[error("the signature does not match the body")]
    Mismatch,
}

/// Checks `signature_header` (the value of `X-Hub-Signature-256`) against `body` under `secret`.
///
/// `body` must be the bytes exactly as received. The comparison is constant-time
/// ([`Mac::verify_slice`]), so the time taken does not reveal how much of a forged digest was right.
pub fn verify(secret: &[u8], body: &[u8], signature_header: Option<&str>) -> Result<(), VerifyError> {
    if secret.is_empty() {
        return Err(VerifyError::EmptySecret);
    }
    let header = signature_header.ok_or(VerifyError::MissingHeader)?;
    // Proxies may leave spaces around a header value; they are never part of the digest.
    let digest = header.trim().strip_prefix(PREFIX).ok_or(VerifyError::WrongPrefix)?;
    if digest.len() != HEX_LEN {
        return Err(VerifyError::WrongLength { found: digest.len() });
    }
    let expected = hex::decode(digest).map_err(|_| VerifyError::BadHex)?;
    mac(secret, body).verify_slice(&expected).map_err(|_| VerifyError::Mismatch)
}

/// The `X-Hub-Signature-256` value GitHub would send for `body` under `secret`.
///
/// For tests and for a fake GitHub that delivers webhooks; the receiver only ever calls [`verify`].
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    format!("{PREFIX}{}", hex::encode(mac(secret, body).finalize().into_bytes()))
}

fn mac(secret: &[u8], body: &[u8]) -> HmacSha256 {
    // HMAC hashes keys longer than a block and pads shorter ones, so every key length is valid and
    // this cannot fail whatever the input.
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    mac
}
