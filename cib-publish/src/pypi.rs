//! Python distributions to a package index, with the upload protocol `twine` speaks: a
//! `multipart/form-data` POST with `:action=file_upload`, `protocol_version=1`, the metadata
//! fields read from the wheel's `METADATA` or the sdist's `PKG-INFO`, the file's SHA-256, and
//! HTTP basic auth.
//!
//! Idempotent by digest: before uploading, the index's simple page is read; a file of the same
//! name with the same SHA-256 is a success that changes nothing, and one with another SHA-256
//! is refused with both digests (an index must never serve two files under one name).

use std::io::Read as _;

use bytes::Bytes;
use cib_core::ports::ErrorKind;
use http::Method;
use sha2::{Digest as _, Sha256};

use crate::Failure;
use crate::http::{Answer, HttpClient, basic_auth, status_kind};

/// The metadata an upload carries, read from the distribution itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub name: String,
    pub version: String,
    pub metadata_version: String,
    /// `bdist_wheel` or `sdist`.
    pub filetype: &'static str,
    /// The wheel's Python tag (`py3`), or `source` for an sdist.
    pub pyversion: String,
}

/// A distribution file ready to upload.
#[derive(Debug, Clone)]
pub struct Distribution {
    pub file_name: String,
    pub bytes: Bytes,
    pub sha256: String,
    pub metadata: Metadata,
}

impl Distribution {
    /// Reads a wheel or an sdist's metadata from its bytes.
    pub fn read(file_name: &str, bytes: Bytes) -> Result<Distribution, String> {
        let metadata = metadata_of(file_name, &bytes)?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        Ok(Distribution { file_name: file_name.to_owned(), bytes, sha256, metadata })
    }
}

/// `Foo_Bar.baz` becomes `foo-bar-baz`, the name an index files a project under (PEP 503).
pub fn normalize(name: &str) -> String {
    let mut out = String::new();
    let mut dash = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            dash = true;
        } else {
            if dash && !out.is_empty() {
                out.push('-');
            }
            dash = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

fn metadata_of(file_name: &str, bytes: &[u8]) -> Result<Metadata, String> {
    if let Some(stem) = file_name.strip_suffix(".whl") {
        // name-version(-build)?-python-abi-platform
        let parts: Vec<&str> = stem.split('-').collect();
        if parts.len() < 5 {
            return Err(format!("'{file_name}' is not a wheel's name (name-version-python-abi-platform.whl)"));
        }
        let pyversion = parts[parts.len() - 3].to_owned();
        let text = zip_member(bytes, |path| path.ends_with(".dist-info/METADATA") && path.matches('/').count() == 1)
            .map_err(|e| format!("'{file_name}' cannot be read as a wheel: {e}"))?;
        let fields = parse_fields(&text);
        metadata(file_name, &fields, "bdist_wheel", pyversion)
    } else if file_name.ends_with(".tar.gz") {
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
        let entries = archive.entries().map_err(|e| format!("'{file_name}' cannot be read as an sdist: {e}"))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| format!("'{file_name}' cannot be read as an sdist: {e}"))?;
            let path = entry.path().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
            if path.ends_with("/PKG-INFO") && path.matches('/').count() == 1 {
                let mut text = String::new();
                entry.read_to_string(&mut text).map_err(|e| format!("'{file_name}': PKG-INFO: {e}"))?;
                return metadata(file_name, &parse_fields(&text), "sdist", "source".to_owned());
            }
        }
        Err(format!("'{file_name}' holds no PKG-INFO at its top"))
    } else {
        Err(format!("'{file_name}' is neither a wheel (.whl) nor an sdist (.tar.gz)"))
    }
}

fn metadata(
    file_name: &str,
    fields: &[(String, String)],
    filetype: &'static str,
    pyversion: String,
) -> Result<Metadata, String> {
    let get = |key: &str| fields.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v.clone());
    let missing = |key: &str| format!("the metadata of '{file_name}' has no '{key}'");
    Ok(Metadata {
        name: get("Name").ok_or_else(|| missing("Name"))?,
        version: get("Version").ok_or_else(|| missing("Version"))?,
        metadata_version: get("Metadata-Version").ok_or_else(|| missing("Metadata-Version"))?,
        filetype,
        pyversion,
    })
}

/// The header fields of a metadata file (an email-like header; the body after the first
/// blank line is the description).
fn parse_fields(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && !line.starts_with(char::is_whitespace)
        {
            out.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    out
}

/// The text of the first member of a zip archive whose path `wanted` accepts. Wheels are
/// plain zip files: stored or deflated members, a central directory at the end.
fn zip_member(data: &[u8], wanted: impl Fn(&str) -> bool) -> Result<String, String> {
    let u16_at = |at: usize| data.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |at: usize| data.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let short = || "the archive is cut short".to_owned();
    // The end-of-central-directory record is in the last 64 KiB + 22 bytes.
    let floor = data.len().saturating_sub(65_557);
    let eocd = (floor..data.len().saturating_sub(21))
        .rev()
        .find(|&i| data[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        .ok_or("no zip directory found")?;
    let count = u16_at(eocd + 10).ok_or_else(short)?;
    let mut at = u32_at(eocd + 16).ok_or_else(short)?;
    for _ in 0..count {
        if u32_at(at) != Some(0x0201_4b50) {
            return Err("a malformed zip directory".into());
        }
        let method = u16_at(at + 10).ok_or_else(short)?;
        let size = u32_at(at + 20).ok_or_else(short)?;
        let name_len = u16_at(at + 28).ok_or_else(short)?;
        let extra_len = u16_at(at + 30).ok_or_else(short)?;
        let comment_len = u16_at(at + 32).ok_or_else(short)?;
        let local = u32_at(at + 42).ok_or_else(short)?;
        let name = String::from_utf8_lossy(data.get(at + 46..at + 46 + name_len).ok_or_else(short)?).into_owned();
        at += 46 + name_len + extra_len + comment_len;
        if !wanted(&name) {
            continue;
        }
        if u32_at(local) != Some(0x0403_4b50) {
            return Err(format!("a malformed zip entry '{name}'"));
        }
        let start = local + 30 + u16_at(local + 26).ok_or_else(short)? + u16_at(local + 28).ok_or_else(short)?;
        let raw = data.get(start..start + size).ok_or_else(short)?;
        let mut text = String::new();
        match method {
            0 => text = String::from_utf8_lossy(raw).into_owned(),
            8 => {
                flate2::read::DeflateDecoder::new(raw)
                    .read_to_string(&mut text)
                    .map_err(|e| format!("'{name}': {e}"))?;
            }
            other => return Err(format!("'{name}' uses zip compression method {other}, which wheels do not")),
        }
        return Ok(text);
    }
    Err("no .dist-info/METADATA in it".into())
}

/// An index to upload to: its upload URL, and the secret whose value authenticates.
#[derive(Debug, Clone)]
pub struct Index<'a> {
    pub url: &'a str,
    pub secret: &'a str,
    pub user: String,
    pub password: String,
}

impl Index<'_> {
    fn failure(&self, kind: ErrorKind, message: String) -> Failure {
        Failure { kind, deliverable: format!("pypi {}", self.url), message }
    }
}

/// The simple page of a project on the index whose upload URL is `index`.
pub fn simple_url(index: &str, name: &str) -> String {
    format!("{}/simple/{}/", index.trim_end_matches('/'), normalize(name))
}

/// What the index holds under a file name: its SHA-256 and URL, when it lists it.
pub async fn existing(
    client: &HttpClient,
    index_url: &str,
    name: &str,
    file_name: &str,
    auth: Option<&str>,
) -> Result<Option<(Option<String>, String)>, crate::http::HttpError> {
    let url = simple_url(index_url, name);
    let headers: Vec<(&str, String)> = auth.map(|a| vec![("authorization", a.to_owned())]).unwrap_or_default();
    let answer = client.send(Method::GET, &url, &headers, Bytes::new()).await?;
    // A redirect is an index handing an unknown project to its upstream (pypiserver's
    // fallback): it does not hold the project itself.
    if answer.status == http::StatusCode::NOT_FOUND || answer.status.is_redirection() {
        return Ok(None);
    }
    if !answer.status.is_success() {
        return Err(crate::http::HttpError {
            kind: status_kind(answer.status),
            message: format!("GET {url} answered {}: {}", answer.status, answer.snippet()),
        });
    }
    let page = String::from_utf8_lossy(&answer.body);
    for piece in page.split("href=\"").skip(1) {
        let Some(href) = piece.split('"').next() else { continue };
        let path = href.split('#').next().unwrap_or(href);
        if path.rsplit('/').next() != Some(file_name) {
            continue;
        }
        let digest = href.split_once("#sha256=").map(|(_, d)| d.to_ascii_lowercase());
        return Ok(Some((digest, join_url(&url, path))));
    }
    Ok(None)
}

/// `href` read relative to the page at `base`.
pub fn join_url(base: &str, href: &str) -> String {
    if href.starts_with("http://") || href.starts_with("https://") {
        return href.to_owned();
    }
    let (scheme, rest) = base.split_once("://").unwrap_or(("http", base));
    let host = rest.split('/').next().unwrap_or(rest);
    if let Some(absolute) = href.strip_prefix('/') {
        return format!("{scheme}://{host}/{absolute}");
    }
    let mut parts: Vec<&str> = rest.split('/').skip(1).collect();
    parts.pop(); // the page's own name (empty for a directory)
    for segment in href.split('/') {
        match segment {
            ".." => {
                parts.pop();
            }
            "." => {}
            s => parts.push(s),
        }
    }
    format!("{scheme}://{host}/{}", parts.join("/"))
}

/// Uploads one distribution, unless the index has it already with the same SHA-256. Answers
/// whether it uploaded.
pub async fn upload(client: &HttpClient, index: &Index<'_>, dist: &Distribution) -> Result<bool, Failure> {
    let auth = basic_auth(&index.user, &index.password);
    let check = || async {
        existing(client, index.url, &dist.metadata.name, &dist.file_name, Some(&auth))
            .await
            .map_err(|e| index.failure(e.kind, e.message))
    };
    let compare = |found: Option<String>| -> Result<bool, Failure> {
        match found {
            Some(d) if d == dist.sha256 => Ok(false),
            Some(d) => Err(index.failure(
                ErrorKind::Permanent,
                format!(
                    "{} {} is on the index already as '{}' with sha256 {d}; this build's file has sha256 {}: \
                     an index never serves two files under one name, so bump the version",
                    dist.metadata.name, dist.metadata.version, dist.file_name, dist.sha256
                ),
            )),
            None => Err(index.failure(
                ErrorKind::Permanent,
                format!("'{}' is on the index already, and the index does not say its sha256", dist.file_name),
            )),
        }
    };
    if let Some((digest, _)) = check().await? {
        return compare(digest);
    }
    let boundary = format!("cib-{}", &dist.sha256[..32]);
    let body = multipart(&boundary, dist);
    let headers = [
        ("authorization", auth.clone()),
        ("content-type", format!("multipart/form-data; boundary={boundary}")),
        ("user-agent", "cib-publish".to_owned()),
    ];
    let answer =
        client.send(Method::POST, index.url, &headers, body).await.map_err(|e| index.failure(e.kind, e.message))?;
    if answer.status.is_success() {
        return Ok(true);
    }
    refused(index, &answer)?;
    // Someone else uploaded the same name meanwhile (409), or the index says it exists (400):
    // the digest decides.
    if (answer.status == http::StatusCode::CONFLICT || answer.status == http::StatusCode::BAD_REQUEST)
        && let Some((digest, _)) = check().await?
    {
        return compare(digest);
    }
    Err(index.failure(
        status_kind(answer.status),
        format!("uploading '{}' was answered {}: {}", dist.file_name, answer.status, answer.snippet()),
    ))
}

/// A clear error for refused credentials: the index and the secret's name, never its value.
fn refused(index: &Index<'_>, answer: &Answer) -> Result<(), Failure> {
    if answer.status == http::StatusCode::UNAUTHORIZED || answer.status == http::StatusCode::FORBIDDEN {
        return Err(index.failure(
            ErrorKind::Misconfigured,
            format!(
                "the index {} refused the credentials in secret '{}' ({}); check the secret's user and password or token",
                index.url, index.secret, answer.status
            ),
        ));
    }
    Ok(())
}

/// The form `twine` sends: metadata fields, then the file as `content`.
fn multipart(boundary: &str, dist: &Distribution) -> Bytes {
    let m = &dist.metadata;
    let fields: [(&str, &str); 8] = [
        (":action", "file_upload"),
        ("protocol_version", "1"),
        ("name", &m.name),
        ("version", &m.version),
        ("filetype", m.filetype),
        ("pyversion", &m.pyversion),
        ("metadata_version", &m.metadata_version),
        ("sha256_digest", &dist.sha256),
    ];
    let mut out = Vec::with_capacity(dist.bytes.len() + 2048);
    for (name, value) in fields {
        out.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
        );
    }
    out.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"content\"; filename=\"{}\"\r\nContent-Type: application/octet-stream\r\n\r\n",
            dist.file_name
        )
        .as_bytes(),
    );
    out.extend_from_slice(&dist.bytes);
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    Bytes::from(out)
}

/// Downloads a file a record names from the index it was published to, and checks that its
/// bytes are the ones recorded.
pub async fn fetch_recorded(
    client: &HttpClient,
    record: &cib_core::publish::DeliverableRecord,
    deliverable: &str,
) -> Result<Distribution, Failure> {
    let a = &record.artifact;
    let fail = |kind, message| Failure { kind, deliverable: deliverable.to_owned(), message };
    let file = a.file.clone().unwrap_or_default();
    let found = existing(client, &a.location, &a.name, &file, None).await.map_err(|e| fail(e.kind, e.message))?;
    let Some((_, url)) = found else {
        return Err(fail(
            ErrorKind::Permanent,
            format!("'{file}', which build {} published, is no longer on {}", record.first_build, a.location),
        ));
    };
    let answer = client.send(Method::GET, &url, &[], Bytes::new()).await.map_err(|e| fail(e.kind, e.message))?;
    if !answer.status.is_success() {
        return Err(fail(status_kind(answer.status), format!("GET {url} answered {}", answer.status)));
    }
    let dist = Distribution::read(&file, answer.body).map_err(|m| fail(ErrorKind::Permanent, m))?;
    let recorded = a.digest.trim_start_matches("sha256:");
    if dist.sha256 != recorded {
        return Err(fail(
            ErrorKind::Permanent,
            format!(
                "'{file}' on {} has sha256 {}, but build {} published sha256 {recorded}: it is not the file staging tested",
                a.location, dist.sha256, record.first_build
            ),
        ));
    }
    Ok(dist)
}
