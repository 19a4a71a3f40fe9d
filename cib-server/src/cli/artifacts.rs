//! `cib artifacts ID [--get NAME]`: the artifacts a build kept, and the download of one archive,
//! checked against the SHA-256 the server recorded before it is kept; and `cib cache list|rm`.

use std::path::{Path, PathBuf};

use http_body_util::BodyExt as _;
use sha2::{Digest, Sha256};

use super::client::{Failure, Remote, encode, http_client, out};
use super::remote::{pretty, table};

/// What `cib artifacts` was asked.
#[derive(Debug)]
pub struct ArtifactsArgs {
    pub build: String,
    /// Download this artifact rather than list them.
    pub get: Option<String>,
    /// Where the download goes (default: the artifact's name with `.tar.gz`, here).
    pub output: Option<PathBuf>,
    pub json: bool,
}

/// `cib artifacts`.
pub async fn artifacts(remote: &Remote, args: ArtifactsArgs) -> Result<(), Failure> {
    let base = format!("/api/v1/builds/{}/artifacts", encode(&args.build));
    let http = http_client()?;
    let Some(name) = args.get else {
        let v = remote.json(&http, "GET", &base, None).await?;
        if args.json {
            pretty(&v);
            return Ok(());
        }
        let rows: Vec<Vec<String>> = v["artifacts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                vec![
                    a["name"].as_str().unwrap_or("-").to_owned(),
                    a["files"].to_string(),
                    a["size"].to_string(),
                    a["sha256"].as_str().unwrap_or("-").to_owned(),
                    a["expires_at"].as_u64().map_or("-".into(), |t| cib_core::time::Timestamp(t).rfc3339_secs()),
                ]
            })
            .collect();
        if rows.is_empty() {
            out(&format!("build {} kept no artifacts", args.build));
        } else {
            table(&["NAME", "FILES", "BYTES", "SHA256", "EXPIRES (UTC)"], &rows);
        }
        return Ok(());
    };
    let path = format!("{base}/{}", encode(&name));
    let request = remote.request("GET", &path, None, &[])?;
    let response = http.request(request).await.map_err(|e| remote.transport(&e))?;
    let status = response.status().as_u16();
    let expected = response.headers().get("x-cib-sha256").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut body = response.into_body();
    if !(200..300).contains(&status) {
        let bytes = body.collect().await.map_err(|e| remote.transport(&e))?.to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        return Err(remote.answer_failure(status, &value));
    }
    let dest = args.output.unwrap_or_else(|| PathBuf::from(format!("{}.tar.gz", file_name(&name))));
    // Written beside the destination and renamed when whole and checked, so a failed download
    // never leaves a file that looks like the artifact.
    let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let temp = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| Failure::Usage(format!("cannot write in {}: {e}", dir.display())))?;
    let mut file = tokio::fs::File::from_std(
        temp.reopen().map_err(|e| Failure::Usage(format!("cannot write in {}: {e}", dir.display())))?,
    );
    let mut hash = Sha256::new();
    let mut size = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| remote.transport(&e))?;
        if let Some(chunk) = frame.data_ref() {
            hash.update(chunk);
            size += chunk.len() as u64;
            tokio::io::AsyncWriteExt::write_all(&mut file, chunk)
                .await
                .map_err(|e| Failure::Usage(format!("cannot write {}: {e}", dest.display())))?;
        }
    }
    tokio::io::AsyncWriteExt::flush(&mut file)
        .await
        .map_err(|e| Failure::Usage(format!("cannot write {}: {e}", dest.display())))?;
    let got = hex::encode(hash.finalize());
    if let Some(expected) = &expected
        && *expected != got
    {
        return Err(Failure::Unreachable(format!(
            "the download of '{name}' is damaged: sha256 {got}, the server recorded {expected}"
        )));
    }
    temp.persist(&dest).map_err(|e| Failure::Usage(format!("cannot keep {}: {e}", dest.display())))?;
    out(&format!("{}  {size} bytes  sha256 {got}", dest.display()));
    Ok(())
}

/// The artifact's name as a file name in the current directory: matrix cells have spaces and
/// parentheses, which are kept, and `/` never appears in a step's name but is replaced anyway.
fn file_name(name: &str) -> String {
    let cleaned: String = name.chars().map(|c| if c == '/' || c.is_control() { '_' } else { c }).collect();
    if cleaned.starts_with('.') { format!("_{cleaned}") } else { cleaned }
}

/// `cib cache list REPO`.
pub async fn cache_list(remote: &Remote, repo: &str, json: bool) -> Result<(), Failure> {
    let http = http_client()?;
    let path = format!("/api/v1/caches/{}", super::client::repo_path(repo)?);
    let v = remote.json(&http, "GET", &path, None).await?;
    if json {
        pretty(&v);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = v["caches"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                c["key"].as_str().unwrap_or("-").to_owned(),
                c["namespace"].as_str().unwrap_or("-").to_owned(),
                c["created_at"].as_u64().map_or("-".into(), |t| cib_core::time::Timestamp(t).rfc3339_secs()),
            ]
        })
        .collect();
    if rows.is_empty() {
        out(&format!("{repo} has no caches"));
    } else {
        table(&["KEY", "NAMESPACE", "SAVED (UTC)"], &rows);
    }
    Ok(())
}

/// `cib cache rm REPO KEY`.
pub async fn cache_remove(remote: &Remote, repo: &str, key: &str) -> Result<(), Failure> {
    let http = http_client()?;
    let path = format!("/api/v1/caches/{}/{}", super::client::repo_path(repo)?, encode(key));
    let v = remote.json(&http, "DELETE", &path, None).await?;
    out(&format!("removed {} cache(s) of '{key}'", v["removed"]));
    Ok(())
}
