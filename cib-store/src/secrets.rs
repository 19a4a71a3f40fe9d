//! Sealed secrets: XChaCha20-Poly1305 with a random 24-byte nonce per value, stored beside the
//! ciphertext, and the secret's repository and name as associated data, so a row copied under
//! another name or repository does not open. The key never enters the database: it comes from
//! a key file or from a value the caller read (`CIB_SECRET_KEY`), and is passed to each call.

use std::io::Write as _;
use std::path::Path;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use cib_core::ports::{SecretError, SecretKey};

/// Bytes of an XChaCha20 nonce.
pub(crate) const NONCE_LEN: usize = 24;

/// What binds a sealed value to its place: the format's name, the repository and the name,
/// separated by NUL, which neither may contain.
fn associated_data(repo: &str, name: &str) -> Vec<u8> {
    let mut aad = b"cib-secret-v1\0".to_vec();
    aad.extend_from_slice(repo.as_bytes());
    aad.push(0);
    aad.extend_from_slice(name.as_bytes());
    aad
}

/// Seals a value for `repo`/`name`: the nonce and the ciphertext (with its tag).
pub(crate) fn seal(key: &SecretKey, repo: &str, name: &str, value: &[u8]) -> Result<(Vec<u8>, Vec<u8>), SecretError> {
    let cipher = XChaCha20Poly1305::new(key.bytes().into());
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let aad = associated_data(repo, name);
    let sealed = cipher
        .encrypt(&nonce, Payload { msg: value, aad: &aad })
        .map_err(|_| SecretError::Key("the secret could not be sealed".into()))?;
    Ok((nonce.to_vec(), sealed))
}

/// Opens a value sealed for `repo`/`name`. A wrong key, a damaged row or a row moved to
/// another name all fail the tag check, and are reported as the key's problem, naming it.
pub(crate) fn open(
    key: &SecretKey,
    repo: &str,
    name: &str,
    nonce: &[u8],
    sealed: &[u8],
) -> Result<String, SecretError> {
    let wrong = |detail: String| SecretError::WrongKey { origin: key.origin().to_owned(), detail };
    if nonce.len() != NONCE_LEN {
        return Err(wrong(format!("secret '{name}' of {repo} has a nonce of {} bytes", nonce.len())));
    }
    let cipher = XChaCha20Poly1305::new(key.bytes().into());
    let aad = associated_data(repo, name);
    let plain = cipher
        .decrypt(XNonce::from_slice(nonce), Payload { msg: sealed, aad: &aad })
        .map_err(|_| wrong(format!("secret '{name}' of {repo} does not open with it")))?;
    String::from_utf8(plain).map_err(|_| wrong(format!("secret '{name}' of {repo} opened to bytes that are not text")))
}

/// A key from a `CIB_SECRET_KEY`-style value: 32 bytes written as 64 hexadecimal digits, or
/// in base64 (standard or URL-safe, padded or not). `origin` names where the text came from.
pub fn parse_key(text: &str, origin: &str) -> Result<SecretKey, SecretError> {
    let text = text.trim();
    // 32 bytes in base64 are 43 or 44 characters; any other run of hex digits is hex, so that
    // a key one digit short is reported by its length rather than as unreadable.
    let hex_like = text.len().is_multiple_of(2) && !matches!(text.len(), 43 | 44);
    let bytes = if hex_like && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(text).ok()
    } else {
        let engines = [
            &base64::engine::general_purpose::STANDARD,
            &base64::engine::general_purpose::STANDARD_NO_PAD,
            &base64::engine::general_purpose::URL_SAFE,
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ];
        engines.iter().find_map(|e| e.decode(text).ok())
    };
    match bytes.map(<[u8; 32]>::try_from) {
        Some(Ok(bytes)) => Ok(SecretKey::new(bytes, origin)),
        Some(Err(v)) => Err(SecretError::Key(format!("{origin} holds {} bytes; a key is 32 bytes", v.len()))),
        None => Err(SecretError::Key(format!("{origin} is not 32 bytes in hex or base64"))),
    }
}

/// A new random key.
pub fn generate_key(origin: &str) -> SecretKey {
    let key = XChaCha20Poly1305::generate_key(&mut OsRng);
    let mut bytes = [0u8; 32];
    bytes.copy_from_slice(&key);
    SecretKey::new(bytes, origin)
}

/// Where a key file's key comes from, in the words errors use.
fn file_origin(path: &Path) -> String {
    format!("the key in {}", path.display())
}

/// Reads the key in a key file (64 hexadecimal digits). A missing file is an error that names
/// it: commands that only read secrets must not make a new key.
pub fn read_key_file(path: &Path) -> Result<SecretKey, SecretError> {
    let origin = file_origin(path);
    let text = std::fs::read_to_string(path)
        .map_err(|e| SecretError::Key(format!("cannot read the secret key file {}: {e}", path.display())))?;
    parse_key(&text, &origin)
}

/// Reads the key file, or creates it with a new random key, readable by its owner only (mode
/// 0600), when it does not exist. Creation never replaces a file another process made first.
pub fn load_or_create_key_file(path: &Path) -> Result<SecretKey, SecretError> {
    if path.exists() {
        return read_key_file(path);
    }
    let origin = file_origin(path);
    let key = generate_key(&origin);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let created = options.open(path).and_then(|mut f| {
        f.write_all(format!("{}\n", hex::encode(key.bytes())).as_bytes())?;
        f.sync_all()
    });
    match created {
        Ok(()) => Ok(key),
        // Another process made it between the check and the create: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_key_file(path),
        Err(e) => Err(SecretError::Key(format!("cannot create the secret key file {}: {e}", path.display()))),
    }
}
