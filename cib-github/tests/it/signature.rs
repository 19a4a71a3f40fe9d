//! `X-Hub-Signature-256` verification: GitHub's published example, tampering, malformed headers.

use cib_github::webhook::{VerifyError, sign, verify};

// From GitHub's documentation, "Validating webhook deliveries".
const SECRET: &[u8] = b"It's a Secret to Everybody";
const PAYLOAD: &[u8] = b"Hello, World!";
const EXPECTED: &str = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

#[test]
fn githubs_published_example_verifies() {
    assert_eq!(verify(SECRET, PAYLOAD, Some(EXPECTED)), Ok(()));
}

#[test]
fn sign_reproduces_githubs_published_example() {
    assert_eq!(sign(SECRET, PAYLOAD), EXPECTED);
}

#[test]
fn every_flipped_body_byte_fails() {
    for index in 0..PAYLOAD.len() {
        let mut body = PAYLOAD.to_vec();
        body[index] ^= 0x01;
        assert_eq!(verify(SECRET, &body, Some(EXPECTED)), Err(VerifyError::Mismatch), "byte {index}");
    }
}

#[test]
fn extra_or_missing_body_bytes_fail() {
    assert_eq!(verify(SECRET, b"Hello, World!\n", Some(EXPECTED)), Err(VerifyError::Mismatch));
    assert_eq!(verify(SECRET, b"Hello, World", Some(EXPECTED)), Err(VerifyError::Mismatch));
    assert_eq!(verify(SECRET, b"", Some(EXPECTED)), Err(VerifyError::Mismatch));
}

#[test]
fn another_secret_fails() {
    assert_eq!(verify(b"It's a Secret to Everybody!", PAYLOAD, Some(EXPECTED)), Err(VerifyError::Mismatch));
}

#[test]
fn a_flipped_signature_digit_fails() {
    let mut header = EXPECTED.to_owned();
    header.replace_range(10..11, "8");
    assert_ne!(header, EXPECTED);
    assert_eq!(verify(SECRET, PAYLOAD, Some(&header)), Err(VerifyError::Mismatch));
}

#[test]
fn a_missing_header_fails() {
    assert_eq!(verify(SECRET, PAYLOAD, None), Err(VerifyError::MissingHeader));
}

#[test]
fn a_wrong_prefix_fails() {
    let digest = EXPECTED.trim_start_matches("sha256=");
    for header in [digest.to_owned(), format!("sha1={digest}"), format!("SHA256={digest}"), format!("sha256:{digest}")]
    {
        assert_eq!(verify(SECRET, PAYLOAD, Some(&header)), Err(VerifyError::WrongPrefix), "{header}");
    }
    assert_eq!(verify(SECRET, PAYLOAD, Some("")), Err(VerifyError::WrongPrefix));
}

#[test]
fn a_wrong_length_fails() {
    assert_eq!(verify(SECRET, PAYLOAD, Some("sha256=")), Err(VerifyError::WrongLength { found: 0 }));
    assert_eq!(verify(SECRET, PAYLOAD, Some(&EXPECTED[..70])), Err(VerifyError::WrongLength { found: 63 }));
    assert_eq!(verify(SECRET, PAYLOAD, Some(&format!("{EXPECTED}0"))), Err(VerifyError::WrongLength { found: 65 }));
    // A SHA-1 digest (40 hex digits) under the SHA-256 prefix.
    let sha1 = format!("sha256={}", "a".repeat(40));
    assert_eq!(verify(SECRET, PAYLOAD, Some(&sha1)), Err(VerifyError::WrongLength { found: 40 }));
}

#[test]
fn bad_hex_fails() {
    let header = format!("sha256={}", "zz".repeat(32));
    assert_eq!(verify(SECRET, PAYLOAD, Some(&header)), Err(VerifyError::BadHex));
    // 64 bytes, but not all of them ASCII: refused as hex, not sliced mid-character.
    let header = format!("sha256={}é", "a".repeat(62));
    assert_eq!(verify(SECRET, PAYLOAD, Some(&header)), Err(VerifyError::BadHex));
}

#[test]
fn surrounding_whitespace_is_tolerated_but_not_inner_whitespace() {
    assert_eq!(verify(SECRET, PAYLOAD, Some(&format!("  {EXPECTED}\t"))), Ok(()));
    let inner = EXPECTED.replacen("sha256=", "sha256= ", 1);
    assert_eq!(verify(SECRET, PAYLOAD, Some(&inner)), Err(VerifyError::WrongLength { found: 65 }));
}

#[test]
fn upper_case_hex_is_the_same_digest() {
    let upper = format!("sha256={}", EXPECTED.trim_start_matches("sha256=").to_uppercase());
    assert_eq!(verify(SECRET, PAYLOAD, Some(&upper)), Ok(()));
}

#[test]
fn an_empty_secret_trusts_nothing() {
    // Even a signature that is right for the empty key is refused: anyone could have made it.
    let forged = sign(b"", PAYLOAD);
    assert_eq!(verify(b"", PAYLOAD, Some(&forged)), Err(VerifyError::EmptySecret));
}

#[test]
fn signatures_round_trip_for_any_secret_length() {
    // HMAC hashes keys longer than SHA-256's 64-byte block; both sides of that boundary verify.
    for len in [1, 63, 64, 65, 200] {
        let secret = vec![b'k'; len];
        let header = sign(&secret, PAYLOAD);
        assert_eq!(verify(&secret, PAYLOAD, Some(&header)), Ok(()), "secret of {len} bytes");
    }
}

#[test]
fn errors_read_as_sentences() {
    assert_eq!(VerifyError::MissingHeader.to_string(), "the X-Hub-Signature-256 header is missing");
    assert_eq!(
        VerifyError::WrongLength { found: 40 }.to_string(),
        "the signature is 40 bytes long, expected 64 hex digits"
    );
}
