//! Masking of secret values in a stream of output that arrives in arbitrary pieces.
//!
//! A container writes whenever it likes, and the Docker API hands the bytes over in frames
//! whose boundaries mean nothing: a secret can start in one frame and end in the next. The
//! masker therefore holds back the end of each piece while it could still be the beginning of a
//! secret (at most the longest secret's length minus one byte), and decides once more bytes
//! arrive or the stream ends.

/// What a secret value is replaced with.
pub const REPLACEMENT: &[u8] = b"***";

/// Replaces every occurrence of any secret in a stream of bytes with [`REPLACEMENT`].
///
/// Feed it with [`Masker::push`] as pieces arrive and call [`Masker::finish`] once at the end;
/// the concatenation of what they return is the masked stream.
#[derive(Clone)]
pub struct Masker {
    /// Longest first, so that where two secrets match at one place the longer one wins.
    secrets: Vec<Vec<u8>>,
    /// Bytes that could be the start of a secret, kept until we know.
    pending: Vec<u8>,
    /// Whether a byte can start any secret: a quick test that lets most bytes through at once.
    starts: [bool; 256],
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secrets themselves never reach a debug line.
        f.debug_struct("Masker").field("secrets", &self.secrets.len()).field("pending", &self.pending.len()).finish()
    }
}

impl Masker {
    /// A masker for these values. Empty values are ignored, since masking them would mean
    /// masking nothing everywhere.
    pub fn new<I, S>(secrets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        let mut secrets: Vec<Vec<u8>> =
            secrets.into_iter().map(|s| s.as_ref().to_vec()).filter(|s| !s.is_empty()).collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        secrets.dedup();
        let mut starts = [false; 256];
        for s in &secrets {
            starts[usize::from(s[0])] = true;
        }
        Masker { secrets, pending: Vec::new(), starts }
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
            if !self.starts[usize::from(buf[i])] {
                // Copy the whole run of bytes that cannot start a secret in one go.
                let run = buf[i..].iter().position(|b| self.starts[usize::from(*b)]).unwrap_or(buf.len() - i);
                out.extend_from_slice(&buf[i..i + run]);
                i += run;
                continue;
            }
            let rest = &buf[i..];
            // A secret that the rest could still grow into must wait for more bytes, even if a
            // shorter secret matches here already: otherwise the longer one would leak its tail.
            if !at_end && self.secrets.iter().any(|s| s.len() > rest.len() && s.starts_with(rest)) {
                break;
            }
            if let Some(secret) = self.secrets.iter().find(|s| rest.starts_with(s)) {
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

    #[test]
    fn debug_does_not_show_secrets() {
        let m = Masker::new(["hunter2"]);
        assert!(!format!("{m:?}").contains("hunter2"));
    }
}
