//! Sealed secrets: nothing readable on disk, a wrong or missing key named in a clear error,
//! rekeying that keeps every value, and lists without values.

use std::path::Path;

use base64::Engine as _;
use cib_core::policy::SecretScope;
use cib_core::ports::{ErrorKind, NewSecret, SecretError, SecretKey, SecretStore, SecretValue};
use cib_core::spec::Glob;
use cib_core::time::Timestamp;
use cib_store::{SqliteOptions, load_or_create_key_file, parse_key, read_key_file};

use crate::open;

const DEPLOY_KEY: &str = "deploy-key-4f1c9a7e-plaintext-marker";
const PYPI_TOKEN: &str = "pypi-AgEIcHlwaS5vcmctoken-marker";

fn secret(repo: &str, name: &str, value: &str) -> NewSecret {
    NewSecret {
        name: name.into(),
        value: SecretValue::new(value),
        scope: SecretScope { branches: vec![Glob::parse("production").expect("glob")], ..SecretScope::repo(repo) },
        by: "admin".into(),
        at: Timestamp(1_000),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every file of the database (the main file, its WAL and shared memory), read whole.
fn database_bytes(db: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let path = format!("{}{suffix}", db.display());
        if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
    out
}

#[tokio::test]
async fn the_database_holds_no_secret_plaintext() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("cib.db");
    let key = load_or_create_key_file(&dir.path().join("secret.key")).expect("key");
    let store = open(&db, SqliteOptions::default());
    store.set_secret(&key, &secret("acme/app", "DEPLOY_KEY", DEPLOY_KEY)).await.expect("set");
    store.set_secret(&key, &secret("acme/app", "PYPI_TOKEN", PYPI_TOKEN)).await.expect("set");
    let opened = store.open_secrets(&key, "acme/app").await.expect("open");
    let values: Vec<&str> = opened.iter().map(|s| s.value.expose()).collect();
    assert_eq!(values, [DEPLOY_KEY, PYPI_TOKEN], "the values are stored, sealed");
    // Checked while the store is open (the rows are in the WAL), and after it closed (they
    // were checkpointed into the main file).
    assert_no_plaintext(&db, &key, "open");
    drop(store);
    assert_no_plaintext(&db, &key, "closed");
}

fn assert_no_plaintext(db: &Path, key: &SecretKey, phase: &str) {
    let files = database_bytes(db);
    assert!(files.iter().any(|(_, b)| !b.is_empty()), "the database was written");
    for (path, bytes) in files {
        for value in [DEPLOY_KEY, PYPI_TOKEN, "deploy-key-4f1c9a7e"] {
            assert!(!contains(&bytes, value.as_bytes()), "{path} ({phase}) holds the plaintext {value:?}");
        }
        assert!(!contains(&bytes, key.bytes()), "{path} ({phase}) holds the key");
    }
}

#[tokio::test]
async fn a_wrong_or_missing_key_is_a_clear_error_naming_the_key_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir.path().join("cib.db"), SqliteOptions::default());
    a_wrong_or_missing_key_is_a_clear_error_naming_the_key_file_on(&store, dir.path()).await;
}

/// The check, on a store of any kind; key files go in `dir`.
pub(crate) async fn a_wrong_or_missing_key_is_a_clear_error_naming_the_key_file_on(
    store: &dyn SecretStore,
    dir: &Path,
) {
    let key = load_or_create_key_file(&dir.join("first.key")).expect("key");
    store.set_secret(&key, &secret("acme/app", "DEPLOY_KEY", DEPLOY_KEY)).await.expect("set");

    // The key file was lost, and a new one made in its place.
    let lost = dir.join("replaced.key");
    let other = load_or_create_key_file(&lost).expect("a new key");
    let error = store.open_secrets(&other, "acme/app").await.expect_err("another key does not open them");
    let text = error.to_string();
    assert!(matches!(error, SecretError::WrongKey { .. }), "{error:?}");
    assert_eq!(error.kind(), ErrorKind::Misconfigured);
    assert!(text.contains(&format!("the secrets cannot be opened with the key in {}", lost.display())), "{text}");
    assert!(text.contains("rotated"), "{text}");
    // Nor may it seal new secrets beside the old ones: they could never all be opened again.
    let refused = store.set_secret(&other, &secret("acme/app", "OTHER", PYPI_TOKEN)).await;
    assert!(matches!(refused, Err(SecretError::WrongKey { .. })), "{refused:?}");
    assert_eq!(store.list_secrets(None).await.expect("list").len(), 1, "nothing was stored");

    let missing = dir.join("nowhere.key");
    let error = read_key_file(&missing).expect_err("no key file");
    assert!(error.to_string().contains(&missing.display().to_string()), "{error}");
}

#[tokio::test]
async fn rekey_keeps_every_value_readable_and_the_old_key_then_fails() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir.path().join("cib.db"), SqliteOptions::default());
    rekey_keeps_every_value_readable_and_the_old_key_then_fails_on(&store, dir.path()).await;
}

/// The check, on a store of any kind; key files go in `dir`.
pub(crate) async fn rekey_keeps_every_value_readable_and_the_old_key_then_fails_on(
    store: &dyn SecretStore,
    dir: &Path,
) {
    let old = load_or_create_key_file(&dir.join("old.key")).expect("key");
    let new = load_or_create_key_file(&dir.join("new.key")).expect("key");
    assert_ne!(old.bytes(), new.bytes(), "two new key files hold different keys");
    store.set_secret(&old, &secret("acme/app", "DEPLOY_KEY", DEPLOY_KEY)).await.expect("set");
    store.set_secret(&old, &secret("acme/app", "PYPI_TOKEN", PYPI_TOKEN)).await.expect("set");
    store.set_secret(&old, &secret("acme/lib", "PYPI_TOKEN", "another-token-value")).await.expect("set");

    // A rekey from a key that does not open them changes nothing.
    let refused = store.rekey(&new, &old).await;
    assert!(matches!(refused, Err(SecretError::WrongKey { .. })), "{refused:?}");
    assert_eq!(store.open_secrets(&old, "acme/app").await.expect("still opens").len(), 2);

    assert_eq!(store.rekey(&old, &new).await.expect("rekey"), 3);
    let app: Vec<String> =
        store.open_secrets(&new, "acme/app").await.expect("open").iter().map(|s| s.value.expose().into()).collect();
    assert_eq!(app, [DEPLOY_KEY, PYPI_TOKEN]);
    let lib = store.open_secrets(&new, "acme/lib").await.expect("open");
    assert_eq!(lib[0].value.expose(), "another-token-value");
    let stale = store.open_secrets(&old, "acme/app").await;
    assert!(matches!(stale, Err(SecretError::WrongKey { .. })), "{stale:?}");
}

#[tokio::test]
async fn a_list_says_names_scopes_and_who_set_them_never_values() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir.path().join("cib.db"), SqliteOptions::default());
    a_list_says_names_scopes_and_who_set_them_never_values_on(&store, dir.path()).await;
}

/// The check, on a store of any kind; key files go in `dir`.
pub(crate) async fn a_list_says_names_scopes_and_who_set_them_never_values_on(store: &dyn SecretStore, dir: &Path) {
    let key = load_or_create_key_file(&dir.join("secret.key")).expect("key");
    store.set_secret(&key, &secret("acme/app", "DEPLOY_KEY", DEPLOY_KEY)).await.expect("set");
    store.set_secret(&key, &secret("acme/lib", "PYPI_TOKEN", PYPI_TOKEN)).await.expect("set");
    let all = store.list_secrets(None).await.expect("list");
    let json = serde_json::to_string(&all).expect("json");
    assert!(!json.contains(DEPLOY_KEY) && !json.contains(PYPI_TOKEN), "{json}");
    assert!(!format!("{all:?}").contains(DEPLOY_KEY), "{all:?}");
    let names: Vec<(&str, &str)> = all.iter().map(|s| (s.scope.repo.as_str(), s.name.as_str())).collect();
    assert_eq!(names, [("acme/app", "DEPLOY_KEY"), ("acme/lib", "PYPI_TOKEN")]);
    assert_eq!(all[0].scope.branches, [Glob::parse("production").expect("glob")]);
    assert_eq!((all[0].set_by.as_str(), all[0].set_at), ("admin", Timestamp(1_000)));
    assert_eq!(store.list_secrets(Some("acme/lib")).await.expect("list").len(), 1);
    // Opened values do not show in Debug either, and neither does the key.
    let opened = store.open_secrets(&key, "acme/app").await.expect("open");
    assert!(!format!("{opened:?}").contains(DEPLOY_KEY), "{opened:?}");
    assert!(!format!("{key:?}").contains(&hex::encode(key.bytes())), "{key:?}");
    assert!(store.remove_secret("acme/app", "DEPLOY_KEY").await.expect("remove"));
    assert!(!store.remove_secret("acme/app", "DEPLOY_KEY").await.expect("remove again"));
    assert_eq!(store.list_secrets(None).await.expect("list").len(), 1);
}

#[tokio::test]
async fn short_values_and_bad_names_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(&dir.path().join("cib.db"), SqliteOptions::default());
    short_values_and_bad_names_are_refused_on(&store, dir.path()).await;
}

/// The check, on a store of any kind; key files go in `dir`.
pub(crate) async fn short_values_and_bad_names_are_refused_on(store: &dyn SecretStore, dir: &Path) {
    let key = load_or_create_key_file(&dir.join("secret.key")).expect("key");
    let error = store.set_secret(&key, &secret("acme/app", "PIN", "12345")).await.expect_err("too short");
    assert_eq!(
        error.to_string(),
        "secret 'PIN' is 5 bytes long: values shorter than 6 bytes cannot be masked safely in logs"
    );
    let error = store.set_secret(&key, &secret("acme/app", "not-a-name", DEPLOY_KEY)).await.expect_err("bad name");
    assert!(error.to_string().contains("named like environment variables"), "{error}");
    store.set_secret(&key, &secret("acme/app", "PIN", "123456")).await.expect("six bytes are enough");
}

#[tokio::test]
async fn a_sealed_row_copied_to_another_name_does_not_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("cib.db");
    let store = open(&db, SqliteOptions::default());
    let key = load_or_create_key_file(&dir.path().join("secret.key")).expect("key");
    store.set_secret(&key, &secret("acme/app", "DEPLOY_KEY", DEPLOY_KEY)).await.expect("set");
    let conn = rusqlite::Connection::open(&db).expect("open");
    conn.execute(
        "INSERT INTO secrets (repo, name, scope, nonce, ciphertext, set_at, set_by)
         SELECT 'acme/fork', name, scope, nonce, ciphertext, set_at, set_by FROM secrets",
        [],
    )
    .expect("copy the row to another repository");
    let moved = store.open_secrets(&key, "acme/fork").await;
    assert!(matches!(moved, Err(SecretError::WrongKey { .. })), "{moved:?}");
    assert_eq!(store.open_secrets(&key, "acme/app").await.expect("the original opens").len(), 1);
}

#[test]
fn a_key_file_is_made_once_readable_by_its_owner_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("secret.key");
    let first = load_or_create_key_file(&path).expect("created");
    let again = load_or_create_key_file(&path).expect("read");
    assert_eq!(first.bytes(), again.bytes(), "a second start reads the same key");
    assert_eq!(first.origin(), format!("the key in {}", path.display()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn a_key_value_is_hex_or_base64_of_32_bytes() {
    let bytes: [u8; 32] = std::array::from_fn(|i| (i * 7 + 3) as u8);
    let hex = hex::encode(bytes);
    let std_b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    let url_b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    for text in [hex.as_str(), std_b64.as_str(), url_b64.as_str()] {
        let key: SecretKey = parse_key(&format!("{text}\n"), "CIB_SECRET_KEY").expect("parses");
        assert_eq!(key.bytes(), &bytes, "{text}");
    }
    let short = parse_key(&hex[..62], "CIB_SECRET_KEY").expect_err("31 bytes");
    assert_eq!(short.to_string(), "CIB_SECRET_KEY holds 31 bytes; a key is 32 bytes");
    let junk = parse_key("not a key!", "CIB_SECRET_KEY").expect_err("junk");
    assert_eq!(junk.to_string(), "CIB_SECRET_KEY is not 32 bytes in hex or base64");
}
