//! Streaming a host directory as a tar archive, to copy the checkout into a workspace volume.
//!
//! The archive goes to the daemon through the API rather than as a bind mount, so the host path
//! never needs to be visible to the daemon (a remote daemon, or a Swarm node, sees only the
//! bytes). It is written on a blocking thread and handed over in chunks through a bounded
//! channel, so a large checkout is never held in memory whole.

use std::io::{self, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const CHUNK: usize = 256 * 1024;

/// A `Write` that sends what it gets in chunks over a channel.
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload of the workspace stopped reading"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// The marker of a whole workspace, relative to the workspace: the last entry of the archive
/// that fills it, so that it exists exactly when every file before it was extracted.
pub const FILLED_MARKER: &str = ".cib/filled";

/// A file or directory to put in an upload next to the checkout, owned by root.
#[derive(Debug, Clone)]
pub enum Extra {
    Dir { path: String, mode: u32 },
    File { path: String, mode: u32, data: Vec<u8> },
}

/// What one upload to `/` of a new container holds: `extras` (the warm directory, a step's
/// script), then the checkout under `workspace/`, then the marker. One upload rather than
/// several, because each upload into a container that is not running mounts its file system
/// and volumes in the daemon and unmounts them again.
#[derive(Debug, Clone)]
pub struct Upload {
    pub extras: Vec<Extra>,
    /// The checkout to copy, or `None` when the volume is filled already.
    pub checkout: Option<PathBuf>,
}

fn root_header(mode: u32, size: u64, kind: tar::EntryType) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_uid(0);
    header.set_gid(0);
    header
}

fn write_archive(upload: &Upload, writer: ChannelWriter) -> io::Result<ChannelWriter> {
    let mut tar = tar::Builder::new(writer);
    for extra in &upload.extras {
        match extra {
            Extra::Dir { path, mode } => {
                tar.append_data(&mut root_header(*mode, 0, tar::EntryType::Directory), path, io::empty())?;
            }
            Extra::File { path, mode, data } => {
                let mut header = root_header(*mode, data.len() as u64, tar::EntryType::Regular);
                tar.append_data(&mut header, path, data.as_slice())?;
            }
        }
    }
    if let Some(dir) = &upload.checkout {
        let root = Path::new(crate::containers::WORKSPACE.trim_start_matches('/'));
        append_tree(&mut tar, dir, root)?;
        // Written last: the marker says that everything before it is there.
        let marker = root.join(FILLED_MARKER);
        if let Some(parent) = marker.parent() {
            tar.append_data(&mut root_header(0o755, 0, tar::EntryType::Directory), parent, io::empty())?;
        }
        tar.append_data(&mut root_header(0o644, 0, tar::EntryType::Regular), marker, io::empty())?;
    }
    tar.into_inner()
}

/// Appends `dir` and everything under it as `name`, in name order.
///
/// The walk is our own rather than `Builder::append_dir_all`, to set the owner of every entry
/// to root: the host's user ids mean nothing in the container, and the daemon gives the files
/// to the image's user (`copyUIDGID`) only when the image names one. Modes and times are kept,
/// since builds look at both. A symbolic link stays a link: following it could copy files of
/// the host that the repository merely points at (`ln -s /etc/shadow`).
fn append_tree<W: Write>(tar: &mut tar::Builder<W>, dir: &Path, name: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(dir)?;
    tar.append_data(&mut header(&meta), name, io::empty())?;
    let mut entries = std::fs::read_dir(dir)?.collect::<io::Result<Vec<_>>>()?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let path = entry.path();
        let inner = name.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&path)?;
        let kind = meta.file_type();
        if kind.is_dir() {
            append_tree(tar, &path, &inner)?;
        } else if kind.is_file() {
            tar.append_data(&mut header(&meta), &inner, std::fs::File::open(&path)?)?;
        } else if kind.is_symlink() {
            tar.append_link(&mut header(&meta), &inner, std::fs::read_link(&path)?)?;
        } else {
            let what = if kind.is_socket() {
                "a socket"
            } else if kind.is_fifo() {
                "a named pipe"
            } else {
                "a device"
            };
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is {what}, which cannot be copied into a workspace", path.display()),
            ));
        }
    }
    Ok(())
}

fn header(meta: &std::fs::Metadata) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
    header.set_uid(0);
    header.set_gid(0);
    // Names that agree with the ids, for extractors that prefer names (GNU tar does).
    let _ = header.set_username("root");
    let _ = header.set_groupname("root");
    header
}

/// Unpacks a workspace archive from Docker (entries under one top directory, `./` or
/// `workspace/`) into `dest`, the top directory stripped. An entry that would land outside
/// `dest` is skipped.
pub fn unpack(archive: &Path, dest: &Path) -> io::Result<()> {
    let mut tar = tar::Archive::new(std::fs::File::open(archive)?);
    tar.set_overwrite(true);
    for entry in tar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let rel: PathBuf = path.components().skip(1).collect();
        if rel.as_os_str().is_empty() || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            continue;
        }
        // cib's own mark in the volume, not something a step made.
        if rel == Path::new(FILLED_MARKER) {
            continue;
        }
        let target = dest.join(&rel);
        if entry.header().entry_type().is_dir() {
            std::fs::create_dir_all(&target)?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        entry.unpack(&target)?;
    }
    Ok(())
}

/// Starts archiving `upload` and returns the archive as a stream, with the task that writes it.
///
/// A failure while archiving reaches the stream as an error, so that the upload fails instead
/// of leaving a partial workspace; the task returns the same error for a clearer message.
pub fn archive(upload: Upload) -> (impl Stream<Item = io::Result<Bytes>> + Send + 'static, JoinHandle<io::Result<()>>) {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    let task = tokio::task::spawn_blocking(move || {
        let writer = ChannelWriter { tx: tx.clone(), buf: Vec::with_capacity(CHUNK) };
        match write_archive(&upload, writer).and_then(|mut w| w.flush()) {
            Ok(()) => Ok(()),
            Err(e) => {
                let what =
                    upload.checkout.as_deref().map_or_else(|| "the upload".to_owned(), |d| d.display().to_string());
                let report = io::Error::new(e.kind(), format!("archiving {what}: {e}"));
                // The receiver may be gone already; then the upload has failed anyway.
                let _ = tx.blocking_send(Err(io::Error::new(e.kind(), report.to_string())));
                Err(report)
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    (stream, task)
}

/// A tar archive of the paths of `root` (relative, each a file or a directory kept whole),
/// named by those paths, for a cache; paths that do not exist are left out. `None` when none
/// exists.
pub fn pack_paths(root: &Path, paths: &[String]) -> io::Result<Option<Vec<u8>>> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut any = false;
    for path in paths {
        let full = root.join(path);
        let Ok(meta) = std::fs::symlink_metadata(&full) else { continue };
        any = true;
        if meta.is_dir() {
            append_tree(&mut tar, &full, Path::new(path))?;
        } else if meta.is_file() {
            tar.append_data(&mut header(&meta), path, std::fs::File::open(&full)?)?;
        } else if meta.file_type().is_symlink() {
            tar.append_link(&mut header(&meta), path, std::fs::read_link(&full)?)?;
        }
    }
    if !any {
        return Ok(None);
    }
    tar.into_inner().map(Some)
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    #[tokio::test]
    async fn archives_files_and_keeps_links_as_links() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        std::fs::create_dir(dir.path().join("src")).unwrap_or_else(|e| panic!("mkdir: {e}"));
        std::fs::write(dir.path().join("src/main.rs"), "fn main() {}").unwrap_or_else(|e| panic!("write: {e}"));
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("leak")).unwrap_or_else(|e| panic!("link: {e}"));
        let upload = Upload {
            extras: vec![Extra::Dir { path: ".cib/".into(), mode: 0o1777 }],
            checkout: Some(dir.path().to_path_buf()),
        };
        let (stream, task) = archive(upload);
        let chunks: Vec<io::Result<Bytes>> = stream.collect().await;
        task.await.unwrap_or_else(|e| panic!("join: {e}")).unwrap_or_else(|e| panic!("archive: {e}"));
        let bytes: Vec<u8> =
            chunks.into_iter().flat_map(|c| c.unwrap_or_else(|e| panic!("chunk: {e}")).to_vec()).collect();
        let mut archive = tar::Archive::new(bytes.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap_or_else(|e| panic!("entries: {e}")) {
            let entry = entry.unwrap_or_else(|e| panic!("entry: {e}"));
            let path = entry.path().map(|p| p.display().to_string()).unwrap_or_default();
            assert_eq!(entry.header().uid().ok(), Some(0), "{path} must belong to root");
            seen.push((path, entry.header().entry_type()));
        }
        assert!(seen.iter().any(|(p, t)| p == "workspace/src/main.rs" && *t == tar::EntryType::Regular), "{seen:?}");
        assert!(seen.iter().any(|(p, t)| p == "workspace/leak" && *t == tar::EntryType::Symlink), "{seen:?}");
        assert_eq!(seen.first().map(|(p, _)| p.as_str()), Some(".cib/"), "the extras come first");
        // The marker comes last, so that it exists only when the whole checkout does.
        assert_eq!(seen.last().map(|(p, _)| p.as_str()), Some("workspace/.cib/filled"), "{seen:?}");
    }

    #[tokio::test]
    async fn a_missing_directory_fails_the_stream() {
        let upload = Upload { extras: Vec::new(), checkout: Some(PathBuf::from("/nonexistent/cib/workspace")) };
        let (stream, task) = archive(upload);
        let chunks: Vec<io::Result<Bytes>> = stream.collect().await;
        assert!(chunks.iter().any(Result::is_err), "the stream must carry the error");
        let err = task.await.unwrap_or_else(|e| panic!("join: {e}")).err();
        assert!(err.is_some_and(|e| e.to_string().contains("/nonexistent/cib/workspace")));
    }
}
