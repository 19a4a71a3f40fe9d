//! Kept artifacts: the files a step lists in `artifacts`, packed as a gzip-compressed tar
//! archive under a directory of the data directory and indexed in the store
//! ([`cib_core::ports::ArtifactIndex`]), so that later pipelines of the same commit can unpack
//! them and people can download them.
//!
//! An archive is written to a temporary file in the same directory and renamed into place
//! whole, and only then indexed, so that a crash leaves either nothing or an unindexed file
//! (overwritten by the step's next attempt), never an index entry for half an archive. Packing
//! never follows a symbolic link (it is kept as a link), so a link in the workspace cannot copy
//! a file of the host into an artifact; unpacking writes nothing outside its destination.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use cib_core::event::BuildId;
use cib_core::ports::{ArtifactError, ArtifactIndex, ArtifactQuery, ArtifactRecord, Artifacts, NewArtifact};
use cib_core::spec::Glob;
use cib_core::time::Timestamp;
use sha2::{Digest, Sha256};

/// Artifacts as files under `dir`, indexed by a store.
pub struct FileArtifacts {
    dir: PathBuf,
    index: Arc<dyn ArtifactIndex>,
}

impl std::fmt::Debug for FileArtifacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileArtifacts").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl FileArtifacts {
    /// Keeps archives under `dir` (made when the first one is kept) and their index in `index`.
    pub fn new(dir: impl Into<PathBuf>, index: Arc<dyn ArtifactIndex>) -> Self {
        FileArtifacts { dir: dir.into(), index }
    }
}

/// A file name that holds `text` and nothing that a path could read as a separator or a
/// parent: letters, digits, `-` and `_` as they are, every other byte as `%XX`. Two names
/// never share an encoding.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn archive_path(dir: &Path, build: &BuildId, name: &str) -> PathBuf {
    dir.join(format!("b-{}", encode(&build.0))).join(format!("a-{}.tar.gz", encode(name)))
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    size: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The paths under `root` to pack, relative and with `/` separators, in name order: files and
/// links whose path matches a glob, and everything under a directory whose path matches one.
fn select(root: &Path, paths: &[Glob]) -> io::Result<Vec<(String, PathBuf, std::fs::Metadata)>> {
    fn walk(
        dir: &Path,
        rel: &str,
        taken: bool,
        paths: &[Glob],
        out: &mut Vec<(String, PathBuf, std::fs::Metadata)>,
    ) -> io::Result<()> {
        let mut entries = std::fs::read_dir(dir)?.collect::<io::Result<Vec<_>>>()?;
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for entry in entries {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
            let rel = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let meta = std::fs::symlink_metadata(entry.path())?;
            let matched = taken || paths.iter().any(|g| g.is_match(&rel));
            if meta.is_dir() {
                walk(&entry.path(), &rel, matched, paths, out)?;
            } else if matched && (meta.is_file() || meta.file_type().is_symlink()) {
                out.push((rel, entry.path(), meta));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, "", false, paths, &mut out)?;
    Ok(out)
}

/// Packs the selected files of `root` into `out` as a gzip-compressed tar: its digest, size and
/// the number of files.
fn pack(root: &Path, paths: &[Glob], out: std::fs::File) -> Result<(String, u64, u64), ArtifactError> {
    let failed = |e: io::Error| ArtifactError::Transient(format!("cannot pack the artifacts: {e}"));
    let chosen = select(root, paths).map_err(failed)?;
    if chosen.is_empty() {
        let globs: Vec<&str> = paths.iter().map(Glob::as_str).collect();
        return Err(ArtifactError::Permanent(format!("no file of the workspace matches {}", globs.join(", "))));
    }
    let hashing = Hashing { inner: io::BufWriter::new(out), hash: Sha256::new(), size: 0 };
    let gz = flate2::write::GzEncoder::new(hashing, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    for (rel, path, meta) in &chosen {
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(meta, tar::HeaderMode::Deterministic);
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(path).map_err(failed)?;
            tar.append_link(&mut header, rel, target).map_err(failed)?;
        } else {
            let file = std::fs::File::open(path).map_err(failed)?;
            tar.append_data(&mut header, rel, file).map_err(failed)?;
        }
    }
    let gz = tar.into_inner().map_err(failed)?;
    let mut hashing = gz.finish().map_err(failed)?;
    hashing.flush().map_err(failed)?;
    let file = hashing.inner.into_inner().map_err(|e| failed(e.into_error()))?;
    file.sync_all().map_err(failed)?;
    Ok((hex::encode(hashing.hash.finalize()), hashing.size, chosen.len() as u64))
}

/// Unpacks an archive over `dest`: entries that would land outside it are refused by `tar`.
fn unpack(archive: &Path, dest: &Path) -> Result<u64, ArtifactError> {
    let failed = |e: io::Error| ArtifactError::Transient(format!("cannot unpack {}: {e}", archive.display()));
    let file = std::fs::File::open(archive).map_err(failed)?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(io::BufReader::new(file)));
    tar.set_overwrite(true);
    tar.set_preserve_permissions(true);
    let mut files = 0;
    for entry in tar.entries().map_err(failed)? {
        let mut entry = entry.map_err(failed)?;
        if entry.header().entry_type().is_file() {
            files += 1;
        }
        entry.unpack_in(dest).map_err(failed)?;
    }
    Ok(files)
}

fn blocking_failed(e: tokio::task::JoinError) -> ArtifactError {
    ArtifactError::Transient(format!("the artifact task failed: {e}"))
}

#[async_trait]
impl Artifacts for FileArtifacts {
    async fn save(&self, new: NewArtifact, dir: &Path, paths: &[Glob]) -> Result<ArtifactRecord, ArtifactError> {
        let target = archive_path(&self.dir, &new.build, &new.name);
        let (root, paths, store) = (dir.to_path_buf(), paths.to_vec(), self.dir.clone());
        let (sha256, size, files) = tokio::task::spawn_blocking(move || {
            let parent = target.parent().unwrap_or(&store);
            std::fs::create_dir_all(parent).map_err(|e| {
                ArtifactError::Misconfigured(format!("cannot create the artifact directory {}: {e}", parent.display()))
            })?;
            let temp = tempfile::NamedTempFile::new_in(parent).map_err(|e| {
                ArtifactError::Misconfigured(format!(
                    "cannot write in the artifact directory {}: {e}",
                    parent.display()
                ))
            })?;
            let out = temp.reopen().map_err(|e| ArtifactError::Transient(format!("cannot write the archive: {e}")))?;
            let packed = pack(&root, &paths, out)?;
            // Whole or not at all: the rename replaces an earlier attempt's archive in one step.
            temp.persist(&target)
                .map_err(|e| ArtifactError::Transient(format!("cannot keep the archive {}: {e}", target.display())))?;
            Ok::<_, ArtifactError>(packed)
        })
        .await
        .map_err(blocking_failed)??;
        let record = ArtifactRecord {
            build: new.build,
            name: new.name,
            repo: new.repo,
            commit: new.commit,
            pipeline: new.pipeline,
            trusted: new.trusted,
            sha256,
            size,
            files,
            created_at: new.created_at,
            expires_at: new.expires_at,
        };
        self.index.put_artifact(&record).await?;
        Ok(record)
    }

    async fn list(&self, build: &BuildId) -> Result<Vec<ArtifactRecord>, ArtifactError> {
        Ok(self.index.artifacts(build).await?)
    }

    async fn find(&self, query: &ArtifactQuery<'_>, now: Timestamp) -> Result<Option<ArtifactRecord>, ArtifactError> {
        Ok(self.index.find_artifact(query, now).await?)
    }

    fn archive_path(&self, record: &ArtifactRecord) -> PathBuf {
        archive_path(&self.dir, &record.build, &record.name)
    }

    async fn unpack(&self, record: &ArtifactRecord, dest: &Path) -> Result<u64, ArtifactError> {
        let (archive, dest) = (self.archive_path(record), dest.to_path_buf());
        tokio::task::spawn_blocking(move || unpack(&archive, &dest)).await.map_err(blocking_failed)?
    }

    async fn remove_expired(&self, now: Timestamp) -> Result<usize, ArtifactError> {
        let removed = self.index.expire_artifacts(now).await?;
        for record in &removed {
            let path = self.archive_path(record);
            if let Err(e) = tokio::fs::remove_file(&path).await
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove an expired artifact");
            }
            // The build's directory goes with its last archive; one still holding others stays.
            if let Some(parent) = path.parent() {
                let _ = tokio::fs::remove_dir(parent).await;
            }
        }
        Ok(removed.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_names_stay_in_their_directory_and_never_collide() {
        assert_eq!(encode(".."), "%2E%2E");
        assert_eq!(encode("unit (a=1)"), "unit%20%28a%3D1%29");
        assert_ne!(encode("a_b"), encode("a%5Fb"));
        let path = archive_path(Path::new("/data/artifacts"), &BuildId::from("../x"), "..");
        assert_eq!(path, Path::new("/data/artifacts/b-%2E%2E%2Fx/a-%2E%2E.tar.gz"));
    }
}
