//! Databases for tests, one per test, on the PostgreSQL cluster that `scripts/ensure-postgres`
//! runs (or on the server `CIB_TEST_POSTGRES` names), so that tests run in parallel without
//! seeing each other's rows. Behind cib-store's `testing` feature.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_postgres::NoTls;

/// The script that installs and starts the test cluster, found from this crate's sources.
const ENSURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/ensure-postgres");

/// The URL of the test cluster's `postgres` database: `CIB_TEST_POSTGRES` when set, else the
/// URL `scripts/ensure-postgres` prints once it answers (it starts the cluster, and installs
/// PostgreSQL when missing, the first time a process asks).
pub fn cluster_url() -> Result<String, String> {
    static URL: OnceLock<Result<String, String>> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("CIB_TEST_POSTGRES") {
            return Ok(url);
        }
        let out = std::process::Command::new(ENSURE)
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run {ENSURE}: {e}"))?;
        if !out.status.success() {
            return Err(format!("{ENSURE} failed ({}); see its messages above", out.status));
        }
        let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if url.is_empty() { Err(format!("{ENSURE} printed no URL")) } else { Ok(url) }
    })
    .clone()
}

/// A database of its own, dropped (with whatever is still connected to it) when this is.
#[derive(Debug)]
pub struct TestDatabase {
    /// The database's URL, for [`crate::PgStore::connect`] or `store = "..."`.
    pub url: String,
    name: String,
    admin: String,
}

/// `url` with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> Result<String, String> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).ok_or_else(|| format!("{url} is not a URL"))?;
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    Ok(match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    })
}

impl TestDatabase {
    /// Makes a new, empty database on the test cluster.
    pub async fn create() -> Result<TestDatabase, String> {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let admin = cluster_url()?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let name = format!("cib_test_{}_{}_{nanos}", std::process::id(), COUNT.fetch_add(1, Ordering::Relaxed));
        let (client, connection) =
            tokio_postgres::connect(&admin, NoTls).await.map_err(|e| format!("cannot connect to {admin}: {e}"))?;
        let connection = tokio::spawn(connection);
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.map_err(|e| format!("CREATE DATABASE: {e}"))?;
        drop(client);
        let _ = connection.await;
        Ok(TestDatabase { url: with_database(&admin, &name)?, name, admin })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot be blocked on; a thread with a
        // runtime of its own drops the database, and the test waits for it.
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let (client, connection) = tokio_postgres::connect(&admin, NoTls).await.ok()?;
                let connection = tokio::spawn(connection);
                let done = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
                drop(client);
                let _ = connection.await;
                done.ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            tracing::warn!(database = %self.name, "a test database could not be dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn a_url_gets_another_database_and_keeps_its_options() {
        assert_eq!(with_database("postgres://u@h:5/postgres", "x").unwrap(), "postgres://u@h:5/x");
        assert_eq!(with_database("postgres://u@h:5", "x").unwrap(), "postgres://u@h:5/x");
        assert_eq!(
            with_database("postgres://u@h/db?sslmode=disable", "x").unwrap(),
            "postgres://u@h/x?sslmode=disable"
        );
        assert!(with_database("nothing", "x").is_err());
    }
}
