//! `cib pool` and `cib lease`: a person's commands against a running server's API.

use std::io::Write;
use std::process::ExitCode;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Where the server is and who is asking.
#[derive(Debug, Clone)]
pub struct Remote {
    pub server: String,
    pub token: Option<String>,
}

pub(crate) fn out(text: &str) {
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

pub(crate) fn err(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// Sends one request; the answer's status and JSON body.
pub(crate) fn call(
    remote: &Remote,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, serde_json::Value), String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let url = format!("{}{path}", remote.server.trim_end_matches('/'));
        let mut request = http::Request::builder().method(method).uri(&url).header("content-type", "application/json");
        if let Some(token) = &remote.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let request = request.body(Full::new(bytes)).map_err(|e| format!("bad request: {e}"))?;
        let response = client.request(request).await.map_err(|e| format!("cannot reach {}: {e}", remote.server))?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        let value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        Ok((status, value))
    })
}

pub(crate) fn finish(result: Result<(u16, serde_json::Value), String>, show: impl Fn(&serde_json::Value)) -> ExitCode {
    match result {
        Ok((status, value)) if (200..300).contains(&status) => {
            show(&value);
            ExitCode::SUCCESS
        }
        Ok((status, value)) => {
            let reason = value["error"].as_str().map(str::to_owned).unwrap_or_else(|| value.to_string());
            err(&format!("cib: the server answered {status}: {reason}"));
            ExitCode::from(1)
        }
        Err(e) => {
            err(&format!("cib: {e}"));
            ExitCode::from(3)
        }
    }
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
        call(remote, "POST", &format!("/api/v1/leases/{id}/extend"), Some(serde_json::json!({ "for": duration }))),
        show_lease,
    )
}

/// `cib lease return ID`.
pub fn give_back(remote: &Remote, id: &str) -> ExitCode {
    finish(call(remote, "POST", &format!("/api/v1/leases/{id}/return"), None), |_| out(&format!("{id}: returned")))
}

/// `cib lease revoke ID` (admins).
pub fn revoke(remote: &Remote, id: &str) -> ExitCode {
    finish(call(remote, "POST", &format!("/api/v1/leases/{id}/revoke"), None), |_| out(&format!("{id}: revoked")))
}
