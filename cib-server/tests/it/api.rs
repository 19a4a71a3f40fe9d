//! The API's front door: the route table against the router (every route × every role), the
//! generated OpenAPI description (committed, served, printed, and held to the server's real
//! answers by a property test over generated requests).

use std::collections::BTreeSet;

use bytes::Bytes;
use cib_server::auth::Access;
use cib_server::config::Role;
use http_body_util::Full;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{Value, json};

use super::openapi_check::{check_answer, document, valid};
use super::server::{GIT_SECRET, SECRET, TestServer, token};

const SPEC: &str = r#"
pipelines:
  test:
    on: [push, manual]
    steps:
      - { name: talk, image: busybox, commands: ["echo hello"] }
"#;

fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_committed_description_is_the_generated_one() {
    let committed = std::fs::read_to_string(repo_root().join("docs/openapi.json")).expect("docs/openapi.json");
    let generated = cib_server::routes::document_text();
    assert!(
        committed == generated,
        "docs/openapi.json is stale: run `cargo run -p cib-server -- openapi > docs/openapi.json`"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cib")).arg("openapi").output().expect("cib runs");
    assert!(out.status.success(), "cib openapi: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), generated, "cib openapi prints the description");
}

#[test]
fn the_description_is_valid_and_covers_the_table() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    let table = cib_server::routes::table();
    let mut seen = BTreeSet::new();
    for route in &table {
        assert!(seen.insert((route.method.to_string(), route.path)), "{} {} is listed twice", route.method, route.path);
        if !route.access.in_api() {
            // The web pages are HTML for people, not the API: the description leaves them out.
            assert!(
                doc["paths"][route.path][route.method.as_str().to_lowercase()].is_null(),
                "the page {} {} is described as if it were the API",
                route.method,
                route.path
            );
            continue;
        }
        let op = &doc["paths"][route.path][route.method.as_str().to_lowercase()];
        assert!(op.is_object(), "{} {} has no description", route.method, route.path);
        // Every schema the description uses compiles.
        for (status, answer) in op["responses"].as_object().expect("responses") {
            if let Some(schema) = answer.pointer("/content/application~1json/schema") {
                valid(schema, &json!(null)).map(|_| ()).unwrap_or_else(|e| {
                    assert!(!e.starts_with("bad schema"), "{} {} {status}: {e}", route.method, route.path)
                });
            }
        }
        if let Access::Role(role) = route.access {
            let expected = format!("{role:?}").to_lowercase();
            assert_eq!(op["x-cib-role"], expected.as_str(), "{} {}", route.method, route.path);
            assert!(op["responses"]["401"].is_object() && op["responses"]["403"].is_object());
        }
    }
    let described: usize =
        doc["paths"].as_object().expect("paths").values().map(|v| v.as_object().map_or(0, |m| m.len())).sum();
    let api = table.iter().filter(|r| r.access.in_api()).count();
    assert_eq!(described, api, "the description has exactly the table's API operations");
}

/// Every handler in `src/api/` is in the route table: a handler added without its entry (and so
/// without its role and its description) fails here.
#[test]
fn every_handler_is_in_the_route_table() {
    let routes = std::fs::read_to_string(repo_root().join("cib-server/src/routes.rs")).expect("routes.rs");
    let dir = repo_root().join("cib-server/src/api");
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("api dir") {
        let path = entry.expect("entry").path();
        let module = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
        if module == "mod" {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("source");
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("pub async fn ") {
                let name = rest.split(['(', '<']).next().unwrap_or_default();
                if !routes.contains(&format!("{module}::{name},")) {
                    missing.push(format!("{module}::{name}"));
                }
            }
        }
    }
    assert!(missing.is_empty(), "handlers without a route table entry: {missing:?}");
}

/// A concrete path for a template: every parameter becomes `nope`, so nothing is found.
fn concrete(template: &str) -> String {
    template.split('/').map(|s| if s.starts_with('{') { "nope" } else { s }).collect::<Vec<_>>().join("/")
}

/// Sends a request and returns the status and headers, reading the body only when it is not a
/// stream that never ends.
async fn send(
    s: &TestServer,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> (u16, http::HeaderMap, Option<Bytes>) {
    use http_body_util::BodyExt;
    let mut req = http::Request::builder().method(method).uri(format!("{}{path}", s.url));
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let response = s.client.request(req.body(Full::new(Bytes::from(body))).expect("request")).await.expect("answer");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let streaming = headers.get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let body = if streaming { None } else { Some(response.into_body().collect().await.expect("body").to_bytes()) };
    (status, headers, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_every_role_as_the_table_says() {
    let s = TestServer::start(SPEC).await;
    let roles = [None, Some(Role::Read), Some(Role::Trigger), Some(Role::Approve), Some(Role::Admin)];
    let mut cells = 0;
    for route in cib_server::routes::table() {
        let path = concrete(route.path);
        for role in roles {
            let mut headers = vec![("content-type", "application/json".to_owned())];
            if let Some(r) = role {
                headers.push(("authorization", format!("Bearer {}", token(r))));
            }
            let (status, answer_headers, _) = send(&s, route.method.as_str(), &path, &headers, b"{}".to_vec()).await;
            let who = role.map_or("no token".to_owned(), |r| format!("{r:?}"));
            match route.access {
                Access::Role(needed) => match role {
                    None => {
                        assert_eq!(status, 401, "{} {} with {who}", route.method, route.path);
                        assert_eq!(answer_headers.get("www-authenticate").map(|v| v.as_bytes()), Some(&b"Bearer"[..]));
                    }
                    Some(r) if r < needed => assert_eq!(status, 403, "{} {} with {who}", route.method, route.path),
                    Some(_) => assert!(
                        status != 401 && status != 403 && status < 500,
                        "{} {} with {who}: {status}",
                        route.method,
                        route.path
                    ),
                },
                Access::Public => assert_eq!(status, 200, "{} {} with {who}", route.method, route.path),
                // Unsigned, whatever the token: the signature is the only credential.
                Access::Signed => assert_eq!(status, 401, "{} {} with {who}", route.method, route.path),
                // Pages anyone may open: the sign-in form, and assets (none is named `nope`).
                // A sign-in post without the form's own CSRF cookie is refused.
                Access::Page => {
                    let expected = match (route.method.as_str(), route.path) {
                        ("GET", "/login") => 200,
                        ("GET", _) => 404,
                        _ => 403,
                    };
                    assert_eq!(status, expected, "{} {} with {who}", route.method, route.path);
                }
                // A bearer token is no session: pages send the browser to sign in, and posts
                // are refused before their handler runs.
                Access::Session(_) => {
                    if route.method == http::Method::GET {
                        assert_eq!(status, 303, "{} {} with {who}", route.method, route.path);
                        let location = answer_headers.get("location").and_then(|v| v.to_str().ok()).unwrap_or_default();
                        assert!(location.starts_with("/login?next="), "{} {}: to {location}", route.method, route.path);
                    } else {
                        assert_eq!(status, 403, "{} {} with {who}", route.method, route.path);
                    }
                }
            }
            cells += 1;
        }
        if route.path == "/hooks/github" {
            let body = br#"{"zen": "hi", "hook_id": 1}"#.to_vec();
            let headers = vec![
                ("x-hub-signature-256", cib_server::outgoing::sign(SECRET.as_bytes(), &body)),
                ("x-github-event", "ping".to_owned()),
                ("x-github-delivery", "matrix-ping".to_owned()),
            ];
            let (status, _, _) = send(&s, route.method.as_str(), &path, &headers, body).await;
            assert_eq!(status, 200, "a signed ping is answered");
        } else if route.path == "/hooks/git" {
            let body = serde_json::to_vec(&json!({
                "repo": "acme/shop", "ref": "refs/heads/x", "before": "0".repeat(40), "after": "0".repeat(40)
            }))
            .expect("json");
            let headers = vec![
                ("x-cib-signature-256", cib_server::outgoing::sign(GIT_SECRET.as_bytes(), &body)),
                ("x-cib-delivery", "matrix-push".to_owned()),
            ];
            let (status, _, _) = send(&s, route.method.as_str(), &path, &headers, body).await;
            assert_eq!(status, 202, "a signed push is taken");
        } else if route.path.starts_with("/chat/") {
            // Chat is not configured here, so nothing can verify a request: 401. Signed chat
            // requests are answered in `chat.rs`, on a server with chat.
            let headers: Vec<(&str, String)> = Vec::new();
            let (status, _, _) = send(&s, route.method.as_str(), &path, &headers, b"{}".to_vec()).await;
            assert_eq!(status, 401, "{}: chat without configuration verifies nothing", route.path);
        } else if route.path.starts_with("/api/v1/worker/") {
            // A server without `[broker]` knows no job: every job-scoped token is refused.
            let headers = vec![("authorization", "Bearer 0123456789abcdef".to_owned())];
            let (status, _, _) = send(&s, route.method.as_str(), &path, &headers, b"{}".to_vec()).await;
            assert_eq!(status, 401, "{}: no broker, no job", route.path);
        } else {
            assert_ne!(route.access, Access::Signed, "{}: a signed route without a check here", route.path);
        }
    }
    assert_eq!(cells, cib_server::routes::table().len() * roles.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_methods_get_405_with_allow() {
    let s = TestServer::start(SPEC).await;
    let doc = document();
    for (template, item) in doc["paths"].as_object().expect("paths") {
        let allowed: Vec<String> = item.as_object().expect("item").keys().map(|m| m.to_uppercase()).collect();
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            if allowed.iter().any(|m| m == method) {
                continue;
            }
            let (status, headers, body) = send(&s, method, &concrete(template), &[], Vec::new()).await;
            assert_eq!(status, 405, "{method} {template}");
            let allow = headers.get("allow").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            for m in &allowed {
                assert!(allow.contains(m.as_str()), "{method} {template}: Allow '{allow}' lacks {m}");
            }
            let body: Value = serde_json::from_slice(&body.unwrap_or_default()).expect("a JSON error");
            assert_eq!(body["code"], "method_not_allowed");
        }
    }
}

/// A number below `n`, drawn by the runner.
fn pick(rng: &mut TestRunner, n: usize) -> usize {
    (0..n.max(1)).new_tree(rng).map(|t| t.current()).unwrap_or(0)
}

/// Resolves a `$ref` into the description's components.
fn resolve(schema: &Value) -> Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => resolve(document().pointer(r.trim_start_matches('#')).unwrap_or(&Value::Null)),
        None => schema.clone(),
    }
}

/// A value the schema most likely accepts (the classification below decides).
fn likely_valid(schema: &Value, rng: &mut TestRunner, depth: usize) -> Value {
    let schema = resolve(schema);
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        return options[pick(rng, options.len())].clone();
    }
    if let Some(any) = schema.get("anyOf").or_else(|| schema.get("oneOf")).and_then(Value::as_array) {
        let pick = &any[pick(rng, any.len())];
        return likely_valid(pick, rng, depth);
    }
    let kind = match schema.get("type") {
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(ts)) => {
            ts.iter().filter_map(Value::as_str).find(|t| *t != "null").unwrap_or("null").to_owned()
        }
        _ => "string".to_owned(),
    };
    match kind.as_str() {
        "object" if depth < 4 => {
            let mut out = serde_json::Map::new();
            let required: Vec<&str> = schema
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (name, sub) in props {
                    if required.contains(&name.as_str()) || pick(rng, 2) == 0 {
                        out.insert(name.clone(), likely_valid(sub, rng, depth + 1));
                    }
                }
            }
            Value::Object(out)
        }
        "object" => json!({}),
        "array" => {
            let n = pick(rng, 3);
            let items = schema.get("items").cloned().unwrap_or(json!({}));
            Value::Array((0..n).map(|_| likely_valid(&items, rng, depth + 1)).collect())
        }
        "integer" => {
            let min = schema.get("minimum").and_then(Value::as_i64).unwrap_or(-5);
            let max = schema.get("maximum").and_then(Value::as_i64).unwrap_or(min + 1000).min(min + 1000);
            json!((min..=max).new_tree(rng).map(|t| t.current()).unwrap_or(min))
        }
        "number" => json!(pick(rng, 100) as f64 / 3.0),
        "boolean" => json!(pick(rng, 2) == 0),
        "null" => Value::Null,
        _ => Value::String(likely_string(&schema, rng)),
    }
}

fn likely_string(schema: &Value, rng: &mut TestRunner) -> String {
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        // Lookaheads are beyond the generator; without them it still mostly hits.
        let plain = pattern.replace("(?=.*[1-9])", "");
        let plain = plain.trim_start_matches('^').trim_end_matches('$');
        if let Ok(tree) = proptest::string::string_regex(plain).map(|st| st.new_tree(rng))
            && let Ok(tree) = tree
        {
            return tree.current();
        }
    }
    let words = ["nope", "acme/shop", "feature/x", "test", "a", "x-1"];
    words[pick(rng, words.len())].to_owned()
}

/// Text that schemas of strings often refuse.
fn junk(rng: &mut TestRunner) -> String {
    let junk =
        ["", "-1", "0", "abc", "99999999999999999999", "1h1h", "0s", " 5", "%zz", "true", "{", "501", "1:", ":x"];
    junk[pick(rng, junk.len())].to_owned()
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Generated requests for every operation, valid and invalid: the server's answers must agree
/// with the description. No 5xx, no undocumented status, a valid request never answered 400,
/// an invalid one never accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_requests_get_the_answers_the_description_promises() {
    let s = TestServer::start(SPEC).await;
    let mut runner = TestRunner::new_with_rng(Config::default(), TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    let doc = document();
    let admin = format!("Bearer {}", token(Role::Admin));
    let (mut valid_sent, mut invalid_sent) = (0, 0);
    for (template, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("item") {
            if template == "/hooks/github" {
                continue; // Signed bodies: covered by the webhook tests.
            }
            for case in 0..48 {
                let mut is_valid = true;
                let mut path = String::new();
                let mut query = Vec::new();
                let mut headers = vec![("authorization", admin.clone())];
                for param in op["parameters"].as_array().cloned().unwrap_or_default() {
                    let name = param["name"].as_str().unwrap_or_default().to_owned();
                    let schema = &param["schema"];
                    let value =
                        if case % 3 == 0 { junk(&mut runner) } else { likely_string(&resolve(schema), &mut runner) };
                    let ok = valid(schema, &Value::String(value.clone())).is_ok();
                    match param["in"].as_str() {
                        Some("path") => {
                            // An empty segment is another path, not this route.
                            let value = if value.is_empty() { "nope".to_owned() } else { value };
                            path = if path.is_empty() { template.clone() } else { path };
                            path = path.replace(&format!("{{{name}}}"), &encode(&value));
                        }
                        Some("query") if case % 4 != 1 => {
                            is_valid &= ok;
                            query.push(format!("{}={}", name, encode(&value)));
                        }
                        Some("header") if case % 4 == 2 && http::HeaderValue::from_str(&value).is_ok() => {
                            is_valid &= ok;
                            headers.push(("last-event-id", value));
                        }
                        _ => {}
                    }
                }
                if path.is_empty() {
                    path = template.clone();
                }
                let mut body = Vec::new();
                if let Some(request) = op.get("requestBody") {
                    let schema = &request["content"]["application/json"]["schema"];
                    let required = request["required"].as_bool().unwrap_or(false);
                    let value = match case % 5 {
                        0 => Some(json!({ "unexpected": 1 })),
                        1 => None,
                        2 => Some(json!([1, "two"])),
                        _ => Some(likely_valid(schema, &mut runner, 0)),
                    };
                    match value {
                        Some(v) => {
                            is_valid &= valid(schema, &v).is_ok();
                            body = serde_json::to_vec(&v).expect("json");
                        }
                        None => is_valid &= !required,
                    }
                    if case % 7 == 3 {
                        body = b"{not json".to_vec();
                        is_valid = false;
                    }
                }
                let full = if query.is_empty() { path.clone() } else { format!("{path}?{}", query.join("&")) };
                let method_upper = method.to_uppercase();
                let (status, answer_headers, answer_body) =
                    send(&s, &method_upper, &full, &headers, body.clone()).await;
                let ct = answer_headers.get("content-type").and_then(|v| v.to_str().ok());
                let shown = String::from_utf8_lossy(&body).into_owned();
                assert!(status < 500, "{method_upper} {full} {shown}: {status}");
                check_answer(&method_upper, &full, status, ct, answer_body.as_deref().unwrap_or(b"\"stream\""));
                if is_valid {
                    valid_sent += 1;
                    assert_ne!(
                        status, 400,
                        "{method_upper} {full} {shown}: valid, yet refused as malformed: {answer_body:?}"
                    );
                } else {
                    invalid_sent += 1;
                    assert!(
                        !(200..300).contains(&status),
                        "{method_upper} {full} {shown}: invalid, yet accepted ({status})"
                    );
                }
            }
        }
    }
    // Both kinds were really exercised.
    assert!(valid_sent > 100 && invalid_sent > 100, "valid {valid_sent}, invalid {invalid_sent}");
}

/// 200 connections sending their request a byte a second hold nothing up: a normal API call
/// still answers at once, and the slow ones are cut off once the header timeout passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_hold_up_nobody() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start(SPEC).await;
    let address = s.url.trim_start_matches("http://").to_owned();
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut conn = tokio::net::TcpStream::connect(&address).await.expect("connect");
        conn.write_all(b"G").await.expect("a first byte");
        slow.push(conn);
    }
    let trickle = tokio::spawn(async move {
        for _ in 0..3 {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            for conn in &mut slow {
                let _ = conn.write_all(b"E").await;
            }
        }
        slow
    });
    let mut took = Vec::new();
    for _ in 0..7 {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let started = std::time::Instant::now();
        let answer = s.request("GET", "/api/v1/builds", Some(&token(Role::Read)), b"").await;
        took.push(started.elapsed());
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    took.sort();
    let median = took[took.len() / 2];
    assert!(median < std::time::Duration::from_millis(100), "API calls beside 200 slow clients took {took:?}");
    let mut slow = trickle.await.expect("trickle");
    // Past the header timeout, the server has closed them (or answered 408 and closed).
    tokio::time::sleep(cib_server::server::HEADER_READ_TIMEOUT).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), slow[0].read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the slow connection is closed by the server");
    assert!(buf.is_empty() || buf.starts_with(b"HTTP/1.1 408"), "{}", String::from_utf8_lossy(&buf));
}
