//! Caches as Docker volumes (issue 19): one volume per repository, namespace and key, held by a
//! marker container (created, never started) whose name is derived from the three. A save
//! fills a fresh volume through a container of a unique name and then renames that container
//! to the marker's name: the daemon lets only one container have a name, so of two saves of
//! one key exactly one wins, and the loser removes its container and volume. A marker thus
//! always stands for a whole cache. Caches carry no engine or build label, so a build's cleanup
//! and the reconcile loop leave them alone.

use std::collections::HashMap;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, ContainerSummary, HostConfig, Mount, MountType};
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptions};
use cib_core::ports::{CacheJob, ExecError};
use sha2::{Digest, Sha256};

use crate::errors::{exec_error, is_not_found};

/// Labels of a cache's marker and volume.
pub const LABEL_CACHE_REPO: &str = "org.cib.cache.repo";
pub const LABEL_CACHE_NAMESPACE: &str = "org.cib.cache.namespace";
pub const LABEL_CACHE_KEY: &str = "org.cib.cache.key";
/// The size in bytes of the archive a cache was filled from, on its marker.
pub const LABEL_CACHE_SIZE: &str = "org.cib.cache.size";

/// A file in the marker's own file system (not in the cache's volume, so never restored into a
/// workspace) holding the time it was last restored, in milliseconds since the epoch. Labels
/// cannot change after creation, so the last use is written here instead.
pub const USED_FILE: &str = "cib-cache-used";

/// Where a cache's volume is mounted in its marker.
pub const CACHE_DIR: &str = "/cache";

/// The marker container's name of a cache: a digest of the repository, namespace and key, so
/// that any text is a valid and distinct name.
pub fn marker_name(repo: &str, namespace: &str, key: &str) -> String {
    let digest = Sha256::digest(format!("{repo}\0{namespace}\0{key}").as_bytes());
    format!("cib-cache-{}", &hex(&digest)[..40])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn labels(repo: &str, namespace: &str, key: &str) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_CACHE_REPO.to_owned(), repo.to_owned()),
        (LABEL_CACHE_NAMESPACE.to_owned(), namespace.to_owned()),
        (LABEL_CACHE_KEY.to_owned(), key.to_owned()),
    ])
}

/// The body of a container holding a cache's volume at [`CACHE_DIR`]; it is never started.
pub fn holder_body(image: &str, volume: &str, labels: HashMap<String, String>) -> ContainerCreateBody {
    ContainerCreateBody {
        image: Some(image.to_owned()),
        entrypoint: Some(vec!["true".to_owned()]),
        cmd: Some(Vec::new()),
        labels: Some(labels),
        host_config: Some(HostConfig {
            network_mode: Some("none".to_owned()),
            mounts: Some(vec![Mount {
                target: Some(CACHE_DIR.to_owned()),
                source: Some(volume.to_owned()),
                typ: Some(MountType::VOLUME),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub async fn exists(docker: &Docker, name: &str) -> Result<bool, ExecError> {
    match docker.inspect_container(name, None::<InspectContainerOptions>).await {
        Ok(_) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(exec_error("looking for a cache", e)),
    }
}

/// The markers of `repo`'s caches: (container, namespace, key).
pub async fn markers(docker: &Docker, repo: &str) -> Result<Vec<(ContainerSummary, String, String)>, ExecError> {
    let filters = HashMap::from([("label".to_owned(), vec![format!("{LABEL_CACHE_REPO}={repo}")])]);
    let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
    let listed = docker.list_containers(Some(options)).await.map_err(|e| exec_error("listing caches", e))?;
    // Only markers count: a save still filling its volume has another name.
    Ok(listed
        .into_iter()
        .filter_map(|c| {
            let labels = c.labels.as_ref()?;
            let (ns, key) = (labels.get(LABEL_CACHE_NAMESPACE)?.clone(), labels.get(LABEL_CACHE_KEY)?.clone());
            let marker = format!("/{}", marker_name(repo, &ns, &key));
            c.names.as_ref()?.contains(&marker).then_some((c, ns, key))
        })
        .collect())
}

/// The marker to restore from and its key: the exact key in the first namespace that has it,
/// else, for each restore prefix in order, the newest cache of a readable namespace (the
/// build's own first) whose key starts with it.
pub async fn find(docker: &Docker, cache: &CacheJob) -> Result<Option<(String, String)>, ExecError> {
    for namespace in &cache.reads {
        let name = marker_name(&cache.repo, namespace, &cache.key);
        if exists(docker, &name).await? {
            return Ok(Some((name, cache.key.clone())));
        }
    }
    if cache.restore_keys.is_empty() {
        return Ok(None);
    }
    let found = markers(docker, &cache.repo).await?;
    let markers: Vec<(&ContainerSummary, &str, &str)> =
        found.iter().map(|(c, ns, key)| (c, ns.as_str(), key.as_str())).collect();
    for prefix in &cache.restore_keys {
        for namespace in &cache.reads {
            let newest = markers
                .iter()
                .filter(|(_, ns, key)| ns == namespace && key.starts_with(prefix.as_str()))
                .max_by_key(|(c, _, key)| (c.created.unwrap_or(0), key.to_owned()));
            if let Some((_, ns, key)) = newest {
                return Ok(Some((marker_name(&cache.repo, ns, key), (*key).to_owned())));
            }
        }
    }
    Ok(None)
}

/// Notes that the cache of `marker` was used now, for least-recently-used eviction.
pub async fn touch(docker: &Docker, marker: &str, now_ms: u64) -> Result<(), ExecError> {
    let text = now_ms.to_string();
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(text.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder
        .append_data(&mut header, USED_FILE, text.as_bytes())
        .map_err(|e| ExecError::Transient(format!("noting a cache's use: {e}")))?;
    let archive = builder.into_inner().map_err(|e| ExecError::Transient(format!("noting a cache's use: {e}")))?;
    let options = bollard::query_parameters::UploadToContainerOptions { path: "/".to_owned(), ..Default::default() };
    docker
        .upload_to_container(marker, Some(options), bollard::body_full(archive.into()))
        .await
        .map_err(|e| exec_error("noting a cache's use", e))
}

/// When the cache of `marker` was last restored, in milliseconds, if it ever was.
pub async fn last_used(docker: &Docker, marker: &str) -> Option<u64> {
    use futures_util::TryStreamExt;
    let options = bollard::query_parameters::DownloadFromContainerOptions { path: format!("/{USED_FILE}") };
    let chunks: Vec<bytes::Bytes> = docker.download_from_container(marker, Some(options)).try_collect().await.ok()?;
    let archive = chunks.concat();
    let mut reader = tar::Archive::new(archive.as_slice());
    let mut entry = reader.entries().ok()?.next()?.ok()?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut entry, &mut text).ok()?;
    text.trim().parse().ok()
}
