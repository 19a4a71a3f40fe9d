//! Masking of secret values in a stream of output that arrives in arbitrary pieces.
//!
//! A container writes whenever it likes, and the Docker API hands the bytes over in frames
//! whose boundaries mean nothing: a secret can start in one frame and end in the next. The
//! masker therefore holds back the end of each piece while it could still be the beginning of a
//! secret (at most the longest secret's length minus one byte), and decides once more bytes
//! arrive or the stream ends.
//!
//! A secret leaks just as well encoded, so each value is masked in the forms a script most
//! often prints it in (see [`variants`]): each line of a multi-line value, base64 (standard and
//! URL-safe, at each of the three alignments inside a longer base64 stream, with and without
//! padding), percent-encoding (upper- and lower-case hex) and JSON string escaping.

/// What a secret value is replaced with.
pub const REPLACEMENT: &[u8] = b"***";

/// Derived forms (a line of a multi-line value, an encoding) shorter than this are not masked:
/// a line such as `}` or a few base64 characters turn up by chance in ordinary output, and
/// masking them would garble logs while hiding nothing. The value itself is always masked.
pub const MIN_DERIVED_LEN: usize = 6;

const BASE64_STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const BASE64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64 of `data` with `=` padding.
fn base64(data: &[u8], alphabet: &[u8; 64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize]);
            } else {
                out.push(b'=');
            }
        }
    }
    out
}

/// The forms of `secret` that are masked: the value, each line of a multi-line value, and its
/// encodings, each derived form at least [`MIN_DERIVED_LEN`] bytes long.
pub fn variants(secret: &[u8]) -> Vec<Vec<u8>> {
    let mut derived: Vec<Vec<u8>> = Vec::new();
    if secret.contains(&b'\n') {
        for line in secret.split(|b| *b == b'\n') {
            derived.push(line.strip_suffix(b"\r").unwrap_or(line).to_vec());
        }
    }
    for alphabet in [BASE64_STD, BASE64_URL] {
        // Inside a longer stream the secret starts at byte 0, 1 or 2 of a 3-byte group. For
        // each, the characters that encode only the secret's bits are the same whatever the
        // neighbours are: from the first character starting at or after the secret's first bit
        // to the last one ending at or before its last bit.
        for pad in 0..3usize {
            let mut padded = vec![0u8; pad];
            padded.extend_from_slice(secret);
            let encoded = base64(&padded, alphabet);
            let start = (8 * pad).div_ceil(6);
            let end = (8 * (pad + secret.len())) / 6;
            if start < end {
                derived.push(encoded[start..end].to_vec());
            }
            // When the secret ends the stream, the last character and the padding are its own.
            let unpadded = encoded.iter().rposition(|b| *b != b'=').map_or(0, |i| i + 1);
            if start < unpadded {
                derived.push(encoded[start..unpadded].to_vec());
                derived.push(encoded[start..].to_vec());
            }
        }
    }
    for hex in [b"0123456789ABCDEF", b"0123456789abcdef"] {
        let mut encoded = Vec::with_capacity(secret.len() * 3);
        for &b in secret {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                encoded.push(b);
            } else {
                encoded.extend_from_slice(&[b'%', hex[usize::from(b >> 4)], hex[usize::from(b & 15)]]);
            }
        }
        derived.push(encoded);
    }
    if let Ok(text) = std::str::from_utf8(secret)
        && let Ok(json) = serde_json::to_string(text)
    {
        let inner = &json.as_bytes()[1..json.len() - 1];
        derived.push(inner.to_vec());
    }
    let mut out = vec![secret.to_vec()];
    out.extend(derived.into_iter().filter(|v| v.len() >= MIN_DERIVED_LEN));
    out.retain(|v| !v.is_empty());
    out.sort();
    out.dedup();
    out
}

/// Replaces every occurrence of any secret, and of its [`variants`], in a stream of bytes with
/// [`REPLACEMENT`].
///
/// Feed it with [`Masker::push`] as pieces arrive and call [`Masker::finish`] once at the end;
/// the concatenation of what they return is the masked stream.
#[derive(Clone)]
pub struct Masker {
    /// Longest first, so that where two secrets match at one place the longer one wins.
    secrets: Vec<Vec<u8>>,
    /// Bytes that could be the start of a secret, kept until we know.
    pending: Vec<u8>,
    /// For each byte, the secrets starting with it (indices into `secrets`, longest first):
    /// most bytes start none and pass at once, the others are compared with few secrets.
    by_first: Vec<Vec<usize>>,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secrets themselves never reach a debug line.
        f.debug_struct("Masker").field("secrets", &self.secrets.len()).field("pending", &self.pending.len()).finish()
    }
}

impl Masker {
    /// A masker for these values and their [`variants`]. Empty values are ignored, since
    /// masking them would mean masking nothing everywhere.
    pub fn new<I, S>(secrets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        let mut secrets: Vec<Vec<u8>> =
            secrets.into_iter().filter(|s| !s.as_ref().is_empty()).flat_map(|s| variants(s.as_ref())).collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        let mut by_first = vec![Vec::new(); 256];
        for (i, s) in secrets.iter().enumerate() {
            by_first[usize::from(s[0])].push(i);
        }
        Masker { secrets, pending: Vec::new(), by_first }
    }

    /// Whether there is nothing to mask, so that callers can skip the copying.
    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// Takes the next piece of the stream and returns what can be released already, masked.
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        if self.secrets.is_empty() {
            return data.to_vec();
        }
        self.pending.extend_from_slice(data);
        self.drain(false)
    }

    /// Ends the stream and returns the rest, masked.
    pub fn finish(&mut self) -> Vec<u8> {
        self.drain(true)
    }

    fn drain(&mut self, at_end: bool) -> Vec<u8> {
        let buf = std::mem::take(&mut self.pending);
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        while i < buf.len() {
            let candidates = &self.by_first[usize::from(buf[i])];
            if candidates.is_empty() {
                // Copy the whole run of bytes that cannot start a secret in one go.
                let run =
                    buf[i..].iter().position(|b| !self.by_first[usize::from(*b)].is_empty()).unwrap_or(buf.len() - i);
                out.extend_from_slice(&buf[i..i + run]);
                i += run;
                continue;
            }
            let rest = &buf[i..];
            let mut secrets = candidates.iter().map(|&c| &self.secrets[c]);
            // A secret that the rest could still grow into must wait for more bytes, even if a
            // shorter secret matches here already: otherwise the longer one would leak its tail.
            if !at_end && secrets.clone().any(|s| s.len() > rest.len() && s.starts_with(rest)) {
                break;
            }
            if let Some(secret) = secrets.find(|s| rest.starts_with(s)) {
                out.extend_from_slice(REPLACEMENT);
                i += secret.len();
            } else {
                out.push(buf[i]);
                i += 1;
            }
        }
        self.pending = buf[i..].to_vec();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_in_pieces(secrets: &[&str], pieces: &[&[u8]]) -> String {
        let mut m = Masker::new(secrets);
        let mut out = Vec::new();
        for p in pieces {
            out.extend(m.push(p));
        }
        out.extend(m.finish());
        String::from_utf8(out).unwrap_or_else(|e| panic!("masked output is not UTF-8: {e}"))
    }

    #[test]
    fn masks_whole_values() {
        assert_eq!(mask_in_pieces(&["hunter2"], &[b"pw=hunter2;"]), "pw=***;");
        assert_eq!(mask_in_pieces(&["ab"], &[b"abab-ab"]), "******-***");
        assert_eq!(mask_in_pieces(&[], &[b"nothing to hide"]), "nothing to hide");
        assert_eq!(mask_in_pieces(&[""], &[b"empty secrets mask nothing"]), "empty secrets mask nothing");
    }

    #[test]
    fn a_secret_split_at_every_point_is_masked() {
        let secret = "s3cr3t-value";
        let text = format!("before {secret} middle {secret}{secret} after\n");
        let expected = "before *** middle ****** after\n";
        let bytes = text.as_bytes();
        for a in 0..=bytes.len() {
            for b in a..=bytes.len() {
                let got = mask_in_pieces(&[secret], &[&bytes[..a], &bytes[a..b], &bytes[b..]]);
                assert_eq!(got, expected, "split at {a} and {b}");
            }
        }
    }

    #[test]
    fn one_byte_at_a_time() {
        let text = b"x=topsecret, y=topsecret";
        let pieces: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(mask_in_pieces(&["topsecret"], &pieces), "x=***, y=***");
    }

    #[test]
    fn the_longer_of_two_overlapping_secrets_wins_even_when_split() {
        // "abc" matches first, but "abcdef" is still possible until the next piece arrives.
        assert_eq!(mask_in_pieces(&["abc", "abcdef"], &[b"<abc", b"def>"]), "<***>");
        assert_eq!(mask_in_pieces(&["abc", "abcdef"], &[b"<abc", b"dx>"]), "<***dx>");
        assert_eq!(mask_in_pieces(&["abc", "abcdef"], &[b"<abc"]), "<***");
    }

    #[test]
    fn holds_back_only_what_could_start_a_secret() {
        let mut m = Masker::new(["secret"]);
        assert_eq!(m.push(b"hello sec"), b"hello ");
        assert_eq!(m.push(b"ond"), b"second");
        assert_eq!(m.push(b" secre"), b" ");
        assert_eq!(m.finish(), b"secre", "an unfinished prefix is released at the end");
    }

    #[test]
    fn a_false_start_inside_a_secret_is_found() {
        // The first "aab" attempt fails at the third byte, and the real match starts one later.
        assert_eq!(mask_in_pieces(&["aab"], &[b"a", b"a", b"a", b"b"]), "a***");
    }

    /// Masks `text` cut into three pieces at every pair of points, and checks each result.
    fn at_every_split(secret: &str, text: &str, check: impl Fn(&str)) {
        let bytes = text.as_bytes();
        for a in 0..=bytes.len() {
            for b in a..=bytes.len() {
                let got = mask_in_pieces(&[secret], &[&bytes[..a], &bytes[a..b], &bytes[b..]]);
                check(&got);
            }
        }
    }

    const AWKWARD: &str = "p@ss w0rd/+?=&~é\"quoted\"";

    #[test]
    fn base64_forms_are_masked_whole_and_inside_longer_streams() {
        use base64::Engine as _;
        use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
        for engine in [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD] {
            // Alone, the whole encoding goes, padding and all.
            let alone = engine.encode(AWKWARD);
            at_every_split(AWKWARD, &format!("<{alone}>\n"), |got| assert_eq!(got, "<***>\n", "{alone}"));
            // Inside a longer stream, at each alignment, only the characters that mix the
            // secret's bits with its neighbours' remain.
            for before in ["", "x", "xy"] {
                let encoded = engine.encode(format!("{before}{AWKWARD}tail"));
                let start = (8 * before.len()).div_ceil(6);
                let end = 8 * (before.len() + AWKWARD.len()) / 6;
                let expected = format!("<{}***{}>\n", &encoded[..start], &encoded[end..]);
                at_every_split(AWKWARD, &format!("<{encoded}>\n"), |got| assert_eq!(got, expected, "{encoded}"));
            }
        }
    }

    #[test]
    fn percent_encoded_forms_are_masked() {
        let upper = "p%40ss%20w0rd%2F%2B%3F%3D%26~%C3%A9%22quoted%22";
        at_every_split(AWKWARD, &format!("url={upper}&x\n"), |got| assert_eq!(got, "url=***&x\n"));
        let lower = upper.replace("%2F", "%2f").replace("%2B", "%2b").replace("%3F", "%3f").replace("%3D", "%3d");
        let lower = lower.replace("%C3%A9", "%c3%a9");
        at_every_split(AWKWARD, &format!("url={lower}&x\n"), |got| assert_eq!(got, "url=***&x\n"));
    }

    #[test]
    fn json_escaped_forms_are_masked() {
        let secret = "line one\n\t\"two\"\\";
        let json = serde_json::to_string(secret).unwrap_or_default();
        assert_eq!(json, r#""line one\n\t\"two\"\\""#);
        at_every_split(secret, &format!("{{\"v\":{json}}}\n"), |got| assert_eq!(got, "{\"v\":\"***\"}\n"));
    }

    #[test]
    fn each_line_of_a_multi_line_secret_is_masked_on_its_own() {
        let secret = "-----BEGIN KEY-----\r\nMIIBOgIBAAJBAK\nab\n-----END KEY-----\n";
        for line in ["-----BEGIN KEY-----", "MIIBOgIBAAJBAK", "-----END KEY-----"] {
            at_every_split(secret, &format!("> {line}\n"), |got| assert_eq!(got, "> ***\n", "{line}"));
        }
        // A line shorter than MIN_DERIVED_LEN would mask ordinary output: it is left alone.
        assert_eq!(mask_in_pieces(&[secret], &[b"ab cd\n"]), "ab cd\n");
        assert_eq!(mask_in_pieces(&[secret], &[secret.as_bytes()]), "***");
    }

    #[test]
    fn variants_are_deduplicated_and_short_ones_dropped() {
        // Percent-encoding and JSON leave this value as it is: it appears once.
        let v = variants(b"plainvalue");
        assert_eq!(v.iter().filter(|x| x.as_slice() == b"plainvalue").count(), 1);
        let mut sorted = v.clone();
        sorted.dedup();
        assert_eq!(sorted.len(), v.len());
        // A short value is masked as itself, but none of its encodings is short.
        let v = variants(b"ab");
        assert!(v.contains(&b"ab".to_vec()));
        assert!(v.iter().all(|x| x.as_slice() == b"ab" || x.len() >= MIN_DERIVED_LEN), "{v:?}");
    }

    #[test]
    fn debug_does_not_show_secrets() {
        let m = Masker::new(["hunter2"]);
        assert!(!format!("{m:?}").contains("hunter2"));
    }
}
