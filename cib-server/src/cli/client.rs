//! Talking to a running server: where it is and who is asking (flags, `CIB_*` variables or a
//! profile), one request at a time, and the exit codes every client command shares.
//!
//! Exit codes: 0 done; 1 the server said no (its reasons, one per line, on standard error);
//! 2 the command line or the profile is wrong; 3 the server cannot be reached, failed (5xx), or
//! does not know the token.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

/// The server `cib` talks to when nothing names one.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// Where the server is and who is asking.
#[derive(Debug, Clone)]
pub struct Remote {
    pub server: String,
    pub token: Option<String>,
}

/// What the command line (and its `CIB_SERVER`, `CIB_TOKEN`, `CIB_PROFILE`) said; the profile
/// fills in what it left out.
#[derive(Debug, Clone, Default)]
pub struct RemoteFlags {
    pub server: Option<String>,
    pub token: Option<String>,
    pub profile: Option<String>,
}

/// `config.toml`: named profiles, and which one to use when none is named.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    default: Option<String>,
    #[serde(default)]
    profiles: std::collections::BTreeMap<String, Profile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    server: Option<String>,
    token: Option<String>,
}

/// `$XDG_CONFIG_HOME/cib/config.toml`, else `$HOME/.config/cib/config.toml`.
pub fn config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("cib").join("config.toml"))
}

impl Remote {
    /// The flags first, then the profile (named, else the file's `default`, else the one called
    /// `default`), then the local default server. The file is read only when a flag is missing,
    /// so a broken profile never stands in the way of explicit flags.
    pub fn resolve(flags: RemoteFlags) -> Result<Remote, ExitCode> {
        let mut server = flags.server.filter(|s| !s.is_empty());
        let mut token = flags.token.filter(|t| !t.is_empty());
        if server.is_none() || token.is_none() || flags.profile.is_some() {
            let profile = load_profile(flags.profile.as_deref())?;
            server = server.or(profile.server);
            token = token.or(profile.token);
        }
        let server = server.unwrap_or_else(|| DEFAULT_SERVER.to_owned());
        if !(server.starts_with("http://") || server.starts_with("https://")) {
            err(&format!("cib: the server '{server}' is not an http:// or https:// address"));
            return Err(ExitCode::from(2));
        }
        Ok(Remote { server, token })
    }
}

fn load_profile(named: Option<&str>) -> Result<Profile, ExitCode> {
    let Some(path) = config_path() else {
        return match named {
            Some(name) => usage(&format!("cib: no profile '{name}': neither XDG_CONFIG_HOME nor HOME is set")),
            None => Ok(Profile::default()),
        };
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && named.is_none() => return Ok(Profile::default()),
        Err(e) => return usage(&format!("cib: cannot read {}: {e}", path.display())),
    };
    let mut file: ConfigFile = match toml::from_str(&text) {
        Ok(file) => file,
        Err(e) => return usage(&format!("cib: {}: {}", path.display(), e.message())),
    };
    let name = named.map(str::to_owned).or(file.default.clone()).unwrap_or_else(|| "default".to_owned());
    match file.profiles.remove(&name) {
        Some(profile) => {
            if profile.token.is_some() {
                warn_if_readable_by_others(&path);
            }
            Ok(profile)
        }
        None if named.is_none() && file.default.is_none() => Ok(Profile::default()),
        None => {
            let known: Vec<&str> = file.profiles.keys().map(String::as_str).collect();
            usage(&format!(
                "cib: {} has no profile '{name}' (it has: {})",
                path.display(),
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            ))
        }
    }
}

/// A token in a file others can read is a token others have: say so, as ssh does.
fn warn_if_readable_by_others(path: &std::path::Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            err(&format!("cib: warning: {} holds a token and others may read it; run chmod 600 on it", path.display()));
        }
    }
}

fn usage<T>(message: &str) -> Result<T, ExitCode> {
    err(message);
    Err(ExitCode::from(2))
}

pub(crate) fn out(text: &str) {
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

pub(crate) fn err(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// Why a client command did not succeed, with the exit code each reason has.
#[derive(Debug)]
pub enum Failure {
    /// The command line is wrong (exit 2).
    Usage(String),
    /// The server said no; every line of its reasons (exit 1).
    Refused(Vec<String>),
    /// The server cannot be reached, failed, or does not take the token (exit 3).
    Unreachable(String),
}

impl Failure {
    pub fn exit(self) -> ExitCode {
        match self {
            Failure::Usage(message) => {
                err(&format!("cib: {message}"));
                ExitCode::from(2)
            }
            Failure::Refused(lines) => {
                for line in lines {
                    err(&line);
                }
                ExitCode::from(1)
            }
            Failure::Unreachable(message) => {
                err(&format!("cib: {message}"));
                ExitCode::from(3)
            }
        }
    }
}

/// Runs a client command to its exit code.
pub fn block(command: impl std::future::Future<Output = Result<(), Failure>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return Failure::Unreachable(format!("cannot start the runtime: {e}")).exit(),
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.exit(),
    }
}

pub(crate) type Http = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An HTTP client for `http://` and `https://` servers, trusting Mozilla's roots, on the ring
/// provider alone (the one provider in the whole build).
pub(crate) fn http_client() -> Result<Http, Failure> {
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::Unreachable(format!("TLS settings: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

impl Remote {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.trim_end_matches('/'))
    }

    /// A request to `path` with the token and, when given, a JSON body and headers.
    pub(crate) fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        headers: &[(&str, String)],
    ) -> Result<http::Request<Full<Bytes>>, Failure> {
        let mut request = http::Request::builder().method(method).uri(self.url(path));
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        request.body(Full::new(bytes)).map_err(|e| Failure::Usage(format!("cannot make the request: {e}")))
    }

    fn unreachable(&self, e: impl std::fmt::Display) -> Failure {
        Failure::Unreachable(format!("cannot reach {}: {e}", self.server))
    }

    /// The error with its causes (`client error (Connect): tcp connect error: Connection
    /// refused`): the outermost one alone says too little to act on.
    pub(crate) fn transport(&self, e: &(dyn std::error::Error + 'static)) -> Failure {
        self.unreachable(chain(e))
    }

    /// Sends a request and reads its JSON answer; any answer but 2xx becomes a [`Failure`].
    pub async fn json(
        &self,
        client: &Http,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, Failure> {
        let request = self.request(method, path, body.as_ref(), &[])?;
        let response = tokio::time::timeout(Duration::from_secs(60), client.request(request))
            .await
            .map_err(|_| self.unreachable("no answer within 60 s"))?
            .map_err(|e| self.transport(&e))?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.map_err(|e| self.unreachable(e))?.to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        if (200..300).contains(&status) {
            return Ok(value);
        }
        Err(self.answer_failure(status, &value))
    }

    /// What a refusing answer means for the person: its reasons, one per line.
    pub(crate) fn answer_failure(&self, status: u16, value: &serde_json::Value) -> Failure {
        let reason = value["error"].as_str().map(str::to_owned).unwrap_or_else(|| match value {
            serde_json::Value::Null => "no reason given".to_owned(),
            other => other.to_string(),
        });
        if status == 401 {
            let how = if self.token.is_some() {
                "the server does not know this token"
            } else {
                "no token: pass --token, set CIB_TOKEN, or add one to a profile"
            };
            return Failure::Unreachable(format!("{how} ({status}: {reason})"));
        }
        if status >= 500 {
            return Failure::Unreachable(format!("the server failed ({status}): {reason}"));
        }
        let mut lines: Vec<String> = Vec::new();
        for (i, line) in reason.lines().enumerate() {
            lines.push(if i == 0 { format!("cib: the server answered {status}: {line}") } else { line.to_owned() });
        }
        for d in value["diagnostics"].as_array().into_iter().flatten() {
            lines.push(d.as_str().map(str::to_owned).unwrap_or_else(|| d.to_string()));
        }
        Failure::Refused(lines)
    }
}

/// An error and its causes, joined with `: `.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// Sends one request; the answer's status and JSON body. (The `pool`, `lease` and `secret`
/// commands; the others use [`Remote::json`].)
pub(crate) fn call(
    remote: &Remote,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, serde_json::Value), Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Unreachable(e.to_string()))?;
    runtime.block_on(async {
        let client = http_client()?;
        match remote.json(&client, method, path, body).await {
            Ok(value) => Ok((200, value)),
            Err(failure) => Err(failure),
        }
    })
}

pub(crate) fn finish(result: Result<(u16, serde_json::Value), Failure>, show: impl Fn(&serde_json::Value)) -> ExitCode {
    match result {
        Ok((_, value)) => {
            show(&value);
            ExitCode::SUCCESS
        }
        Err(failure) => failure.exit(),
    }
}

/// `owner/name` as the API's two path segments, or a usage error.
pub(crate) fn repo_path(repo: &str) -> Result<String, Failure> {
    match repo.split_once('/') {
        Some((owner, name)) if !owner.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(format!("{}/{}", encode(owner), encode(name)))
        }
        _ => Err(Failure::Usage(format!("'{repo}' is not a repository: write owner/name"))),
    }
}

/// Percent-encodes one path segment or query value: everything but unreserved characters.
pub(crate) fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn when(ms: Option<u64>) -> String {
    ms.map(|ms| format!("t={}s", ms / 1000)).unwrap_or_else(|| "-".into())
}

/// `cib pool list`.
pub fn pool_list(remote: &Remote) -> ExitCode {
    finish(call(remote, "GET", "/api/v1/pools", None), |v| {
        for p in v["pools"].as_array().into_iter().flatten() {
            let pool = &p["pool"];
            out(&format!("{}: {} of {} free", pool["name"].as_str().unwrap_or("?"), pool["free"], pool["capacity"]));
            for unit in pool["units"].as_array().into_iter().flatten() {
                let holder = unit["held_by"]["lease"].as_str();
                let lease = p["leases"].as_array().into_iter().flatten().find(|l| l["lease"].as_str() == holder);
                let who = lease.and_then(|l| l["holder"].as_str()).unwrap_or("");
                let until = lease.and_then(|l| l["expires_at"].as_u64());
                match holder {
                    Some(id) => out(&format!(
                        "  {:<16} held by {who} ({id}) until {}",
                        unit["name"].as_str().unwrap_or("?"),
                        when(until)
                    )),
                    None => out(&format!("  {:<16} free", unit["name"].as_str().unwrap_or("?"))),
                }
            }
            for w in p["waiting"].as_array().into_iter().flatten() {
                out(&format!(
                    "  waiting #{}: {} ({})",
                    w["position"],
                    w["holder"].as_str().unwrap_or("?"),
                    w["lease"].as_str().unwrap_or("?")
                ));
            }
        }
    })
}

fn show_lease(v: &serde_json::Value) {
    let id = v["lease"].as_str().unwrap_or("?");
    if v["granted"].as_bool() == Some(true) {
        out(&format!("{id}: granted until {} (token {})", when(v["expires_at"].as_u64()), v["token"]));
        for u in v["units"].as_array().into_iter().flatten() {
            out(&format!("  {}: {}", u["pool"].as_str().unwrap_or("?"), u["units"]));
        }
    } else if v["granted"].as_bool() == Some(false) {
        for p in v["positions"].as_array().into_iter().flatten() {
            out(&format!("{id}: waiting, #{} in the queue of {}", p["position"], p["pool"].as_str().unwrap_or("?")));
        }
    } else {
        out(&v.to_string());
    }
}

/// `cib lease take POOL --for 2h --reason ...`.
pub fn take(remote: &Remote, pool: &str, count: u32, duration: &str, reason: &str) -> ExitCode {
    let body = serde_json::json!({ "pool": pool, "count": count, "for": duration, "reason": reason });
    finish(call(remote, "POST", "/api/v1/leases", Some(body)), show_lease)
}

/// `cib lease extend ID --for 1h`.
pub fn extend(remote: &Remote, id: &str, duration: &str) -> ExitCode {
    finish(
        call(
            remote,
            "POST",
            &format!("/api/v1/leases/{}/extend", encode(id)),
            Some(serde_json::json!({ "for": duration })),
        ),
        show_lease,
    )
}

/// `cib lease return ID`.
pub fn give_back(remote: &Remote, id: &str) -> ExitCode {
    finish(call(remote, "POST", &format!("/api/v1/leases/{}/return", encode(id)), None), |_| {
        out(&format!("{id}: returned"))
    })
}

/// `cib lease revoke ID` (admins).
pub fn revoke(remote: &Remote, id: &str) -> ExitCode {
    finish(call(remote, "POST", &format!("/api/v1/leases/{}/revoke", encode(id)), None), |_| {
        out(&format!("{id}: revoked"))
    })
}
