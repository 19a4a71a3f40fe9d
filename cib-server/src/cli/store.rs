//! `cib store copy --from sqlite:PATH --to postgres://...`: moving a server from its SQLite
//! file to PostgreSQL (see `cib_store::copy_sqlite_to_postgres` for what is copied and checked).

use std::io::Write;
use std::process::ExitCode;

use cib_core::ports::ErrorKind;
use cib_server::config::StoreLocation;

fn eprint(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// Copies, and prints one line per table: its rows and the checksum both databases agree on.
/// Exit codes: 0 copied and checked; 1 refused (the target is not empty, or the copy did not
/// check out, and nothing was committed); 2 a `--from` or `--to` that is not what is asked
/// for; 3 a database that cannot be reached or read.
pub fn copy(from: &str, to: &str) -> ExitCode {
    let path = match StoreLocation::parse(from) {
        Ok(StoreLocation::Sqlite(path)) => path,
        Ok(StoreLocation::Postgres(_)) => {
            eprint("cib store copy: --from must be a SQLite store, sqlite:PATH (copies go from SQLite to PostgreSQL)");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprint(&format!("cib store copy: --from: {e}"));
            return ExitCode::from(2);
        }
    };
    let url = match StoreLocation::parse(to) {
        Ok(StoreLocation::Postgres(url)) => url,
        Ok(StoreLocation::Sqlite(_)) => {
            eprint("cib store copy: --to must be a PostgreSQL database, postgres://user:password@host:port/database");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprint(&format!("cib store copy: --to: {e}"));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprint(&format!("cib store copy: cannot start the runtime: {e}"));
            return ExitCode::from(3);
        }
    };
    let target = cib_store::redact_url(&url);
    match runtime.block_on(cib_store::copy_sqlite_to_postgres(&path, &url)) {
        Ok(report) => {
            let mut out = std::io::stdout().lock();
            let mut lines = vec![format!("{:<18} {:>10}  sha256", "table", "rows")];
            for table in &report.tables {
                lines.push(format!("{:<18} {:>10}  {}", table.table, table.rows, table.sha256));
            }
            lines.push(format!(
                "copied {} rows from {} to {target}; every table's rows and checksum match",
                report.rows(),
                path.display()
            ));
            match writeln!(out, "{}", lines.join("\n")) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::from(3),
            }
        }
        Err(e) => {
            eprint(&format!("cib store copy: {e}"));
            match e.kind() {
                ErrorKind::Transient => ExitCode::from(3),
                ErrorKind::Misconfigured if e.to_string().contains("not empty") => ExitCode::from(1),
                ErrorKind::Misconfigured => ExitCode::from(3),
                _ => ExitCode::from(1),
            }
        }
    }
}
