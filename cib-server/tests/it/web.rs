//! The web pages over plain HTTP, as a browser without JavaScript sees them: signing in and
//! the session cookie's flags, CSRF tokens, buttons by role and the server's own check, and
//! logs whose markup and escapes stay text. `web_browser.rs` drives a real browser.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cib_core::event::BuildId;
use cib_core::ports::{LogKey, SessionStore, Store};
use cib_server::config::Role;
use http_body_util::{BodyExt, Full};

use super::server::{SPEC, TestServer, token};

/// A client that keeps cookies, like a browser, and never follows redirects.
pub struct Visitor<'a> {
    pub server: &'a TestServer,
    pub cookies: BTreeMap<String, String>,
}

pub struct Page {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Page {
    pub fn location(&self) -> &str {
        self.headers.get("location").and_then(|v| v.to_str().ok()).unwrap_or_default()
    }

    /// The value of the first `name="csrf"` field of the page.
    pub fn csrf(&self) -> String {
        hidden(&self.body, "csrf").expect("the page has a form with a CSRF token")
    }
}

/// The value of the first hidden field `name` in some HTML.
pub fn hidden(html: &str, name: &str) -> Option<String> {
    let at = html.find(&format!("name=\"{name}\" value=\""))?;
    let rest = &html[at + name.len() + 15..];
    Some(rest[..rest.find('"')?].to_owned())
}

pub fn form(fields: &[(&str, &str)]) -> Vec<u8> {
    fields
        .iter()
        .map(|(k, v)| format!("{k}={}", cib_server::web::session::encode(v).replace('/', "%2F")))
        .collect::<Vec<_>>()
        .join("&")
        .into_bytes()
}

impl<'a> Visitor<'a> {
    pub fn new(server: &'a TestServer) -> Self {
        Visitor { server, cookies: BTreeMap::new() }
    }

    pub async fn send(&mut self, method: &str, path: &str, body: Vec<u8>) -> Page {
        let mut req = http::Request::builder().method(method).uri(format!("{}{path}", self.server.url));
        if !self.cookies.is_empty() {
            let jar: Vec<String> = self.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
            req = req.header("cookie", jar.join("; "));
        }
        if method == "POST" {
            req = req.header("content-type", "application/x-www-form-urlencoded");
        }
        let response =
            self.server.client.request(req.body(Full::new(Bytes::from(body))).expect("request")).await.expect("answer");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        for set in headers.get_all("set-cookie") {
            let text = set.to_str().expect("cookie text");
            let (pair, attributes) = text.split_once(';').unwrap_or((text, ""));
            let (k, v) = pair.split_once('=').expect("name=value");
            if v.is_empty() || attributes.contains("Max-Age=0") {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.to_owned(), v.to_owned());
            }
        }
        let body =
            String::from_utf8_lossy(&response.into_body().collect().await.expect("body").to_bytes()).into_owned();
        Page { status, headers, body }
    }

    pub async fn get(&mut self, path: &str) -> Page {
        self.send("GET", path, Vec::new()).await
    }

    pub async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Page {
        self.send("POST", path, form(fields)).await
    }

    /// Signs in with the token of `role`; returns the answer to the sign-in.
    pub async fn sign_in(&mut self, role: Role) -> Page {
        let login = self.get("/login?next=/builds").await;
        assert_eq!(login.status, 200, "{}", login.body);
        let csrf = login.csrf();
        let answer = self.post("/login", &[("csrf", &csrf), ("next", "/builds"), ("token", &token(role))]).await;
        assert_eq!(answer.status, 303, "{}", answer.body);
        answer
    }
}

/// Starts a build of `test` (a step, then an approval gate) and waits for its gate.
pub async fn build_at_gate(s: &TestServer) -> String {
    let body = serde_json::json!({ "repo": "acme/shop", "ref": "feature/x", "pipeline": "test" });
    let answer = s.request("POST", "/api/v1/builds", Some(&token(Role::Trigger)), body.to_string().as_bytes()).await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    let id = serde_json::from_str::<serde_json::Value>(&answer.body).expect("json")["build"]
        .as_str()
        .expect("id")
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let record = s.store.build(&BuildId(id.clone())).await.expect("read").expect("build");
        if record.steps.iter().any(|st| st.name == "sign-off" && format!("{:?}", st.status) == "Waiting") {
            return id;
        }
        assert!(Instant::now() < deadline, "the gate never waited: {record:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_in_sets_a_hashed_session_with_strict_cookie_flags() {
    let s = TestServer::start(SPEC).await;
    let mut v = Visitor::new(&s);
    // Without a session, a page sends the browser to sign in, and back afterwards.
    let page = v.get("/builds?repo=acme%2Fshop").await;
    assert_eq!(page.status, 303);
    assert_eq!(page.location(), "/login?next=/builds%3Frepo%3Dacme%252Fshop");
    // An unknown token is refused on the form, with no session.
    let login = v.get("/login").await;
    let wrong = v.post("/login", &[("csrf", &login.csrf()), ("token", "not-a-token")]).await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("That token is not known"), "{}", wrong.body);
    assert!(!v.cookies.contains_key("cib_session"));
    // The sign-in form's own CSRF token is required too.
    let forged = v.post("/login", &[("csrf", "0000"), ("token", &token(Role::Read))]).await;
    assert_eq!(forged.status, 403, "{}", forged.body);

    let answer = v.sign_in(Role::Approve).await;
    assert_eq!(answer.location(), "/builds");
    let cookie = answer
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|c| c.to_str().expect("text").to_owned())
        .find(|c| c.starts_with("cib_session="))
        .expect("a session cookie");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.split("; ").any(|f| f == flag), "{flag} in {cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain http has no Secure flag: {cookie}");
    let id = v.cookies["cib_session"].clone();
    assert_eq!(id.len(), 64, "32 random bytes");
    // The store knows the session by its digest only.
    assert!(s.store.session(&id).await.expect("read").is_none(), "the raw id is not stored");
    let stored = s.store.session(&cib_server::web::session::digest(&id)).await.expect("read").expect("stored");
    assert_eq!(stored.token_name, "approve");
    let db = std::fs::read(s.data_dir.join("cib.db")).expect("db");
    assert!(!db.windows(id.len()).any(|w| w == id.as_bytes()), "the id is nowhere in the database file");

    let page = v.get("/builds").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("approve · approve"), "who is signed in is shown");

    // After 12 hours without use the session has ended, and is removed.
    let digest = cib_server::web::session::digest(&id);
    let long_ago = cib_core::time::Timestamp(stored.last_seen.millis() - 12 * 3600 * 1000 - 1000);
    s.store.touch_session(&digest, long_ago).await.expect("touch");
    assert_eq!(v.get("/builds").await.status, 303, "an idle session is over");
    assert!(s.store.session(&digest).await.expect("read").is_none());

    // Behind an https public URL, the cookies are Secure.
    let secure =
        TestServer::start_configured(SPEC, |c| c.github.public_url = Some("https://ci.example.org".into())).await;
    let mut v = Visitor::new(&secure);
    let answer = v.sign_in(Role::Read).await;
    let cookie =
        answer.headers.get_all("set-cookie").iter().map(|c| c.to_str().expect("text").to_owned()).collect::<Vec<_>>();
    assert!(cookie.iter().any(|c| c.starts_with("cib_session=") && c.ends_with("; Secure")), "{cookie:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_need_the_sessions_csrf_token_and_the_role() {
    let s = TestServer::start(SPEC).await;
    let id = build_at_gate(&s).await;
    let approve = format!("/builds/{id}/gates/sign-off/approve");

    let mut reader = Visitor::new(&s);
    reader.sign_in(Role::Read).await;
    let page = reader.get(&format!("/builds/{id}")).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("sign-off"), "the gate is shown: {}", page.body);
    for button in ["Approve", "Reject", "Cancel build", "Retry"] {
        assert!(!page.body.contains(&format!(">{button}</button>")), "a reader sees no {button} button");
    }
    // The reader's post is refused by the server, CSRF token and all.
    let csrf = page.csrf();
    let refused = reader.post(&approve, &[("csrf", &csrf)]).await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(refused.body.contains("it needs the approve role"), "{}", refused.body);
    let pools = reader.get("/pools").await;
    assert!(!pools.body.contains(">Take</button>"), "no Take button for a reader");
    assert_eq!(reader.post("/pools/take", &[("csrf", &csrf), ("pool", "x")]).await.status, 403);

    let mut approver = Visitor::new(&s);
    approver.sign_in(Role::Approve).await;
    let page = approver.get(&format!("/builds/{id}")).await;
    assert!(page.body.contains(">Approve</button>") && page.body.contains(">Reject</button>"), "{}", page.body);
    // Without the token, or with another session's, the post is refused before it is done.
    assert_eq!(approver.post(&approve, &[]).await.status, 403);
    assert_eq!(
        approver.post(&approve, &[("csrf", &csrf)]).await.status,
        403,
        "the reader's token is not this session's"
    );
    let wrong = approver.post(&approve, &[("csrf", &"0".repeat(64))]).await;
    assert_eq!(wrong.status, 403);
    assert!(wrong.body.contains("CSRF token is missing or wrong"), "{}", wrong.body);
    let record = s.store.build(&BuildId(id.clone())).await.expect("read").expect("build");
    assert_eq!(format!("{:?}", record.build.status), "Running", "nothing was approved");
    // With it, the approval is counted and the browser goes back to the build.
    let done = approver.post(&approve, &[("csrf", &page.csrf())]).await;
    assert_eq!(done.status, 303, "{}", done.body);
    assert_eq!(done.location(), format!("/builds/{id}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let record = s.store.build(&BuildId(id.clone())).await.expect("read").expect("build");
        if format!("{:?}", record.build.status) == "Success" {
            break;
        }
        assert!(Instant::now() < deadline, "the build never finished: {record:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Signing out ends the session: the page wants a sign-in again, and a post is refused.
    let csrf = approver.get("/").await.csrf();
    let out = approver.post("/logout", &[("csrf", &csrf)]).await;
    assert_eq!(out.status, 303);
    assert!(!approver.cookies.contains_key("cib_session"), "the cookie is cleared");
    assert_eq!(approver.get(&format!("/builds/{id}")).await.status, 303);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_with_markup_and_escapes_renders_as_text() {
    let s = TestServer::start(SPEC).await;
    let id = build_at_gate(&s).await;
    let key = LogKey { build: BuildId(id.clone()), step: "talk".into(), attempt: 9 };
    let text = "plain line\n<script>alert('owned')</script>\n\u{1b}[1;31mERROR\u{1b}[0m: it \u{1b}]0;title\u{7}failed & stopped\n";
    s.store.append_log(&key, text.as_bytes()).await.expect("append");
    s.store.finish_log(&key).await.expect("finish");
    let mut v = Visitor::new(&s);
    v.sign_in(Role::Read).await;
    let page = v.get(&format!("/builds/{id}/steps/talk?attempt=9")).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("&lt;script&gt;alert('owned')&lt;/script&gt;"), "{}", page.body);
    assert!(!page.body.contains("<script>alert"), "no markup of the log reaches the page");
    assert!(!page.body.contains('\u{1b}') && !page.body.contains('\u{7}'), "no escape byte reaches the page");
    assert!(page.body.contains("<span class=\"f1 b\">ERROR</span>: it failed &amp; stopped"), "{}", page.body);
    // Line anchors, and the first error found.
    assert!(page.body.contains("id=\"L3\""), "{}", page.body);
    assert!(page.body.contains("href=\"#L3\">Jump to first error (line 3)"), "{}", page.body);
    // The raw log is the bytes as they were written.
    let raw = v.get(&format!("/builds/{id}/steps/talk/raw?attempt=9")).await;
    assert_eq!(raw.status, 200);
    assert_eq!(raw.body, text);
    assert!(raw.headers["content-disposition"].to_str().expect("text").starts_with("attachment;"));
    // Pages forbid scripts from elsewhere and inline ones.
    let csp = page.headers["content-security-policy"].to_str().expect("text");
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_log_shows_its_last_lines_first_and_earlier_ones_by_offset() {
    let s = TestServer::start(SPEC).await;
    let id = build_at_gate(&s).await;
    let key = LogKey { build: BuildId(id.clone()), step: "talk".into(), attempt: 5 };
    let mut text = String::new();
    for n in 1..=5000 {
        text.push_str(&format!("line {n}\n"));
    }
    s.store.append_log(&key, text.as_bytes()).await.expect("append");
    s.store.finish_log(&key).await.expect("finish");
    let mut v = Visitor::new(&s);
    v.sign_in(Role::Read).await;
    let page = v.get(&format!("/builds/{id}/steps/talk?attempt=5")).await;
    assert_eq!(page.body.matches("class=\"l\"").count(), 2000, "the last 2,000 lines");
    assert!(page.body.contains("id=\"L3001\"") && page.body.contains("line 3001<"), "numbered from 3001");
    assert!(page.body.contains("id=\"L5000\"") && !page.body.contains("id=\"L3000\""));
    assert!(page.body.contains("Show earlier lines (3000 more)"), "{}", &page.body[..2000.min(page.body.len())]);
    // The page without script pages back by offset; the script's fragment does the same.
    let start = text.find("line 3001\n").expect("offset");
    let earlier = v.get(&format!("/builds/{id}/steps/talk?attempt=5&before={start}")).await;
    assert!(earlier.body.contains("id=\"L1001\"") && earlier.body.contains("id=\"L3000\""));
    assert!(!earlier.body.contains("id=\"L3001\""));
    let lines = v.get(&format!("/builds/{id}/steps/talk/lines?attempt=5&before={start}&line=3001")).await;
    assert_eq!(lines.status, 200);
    assert_eq!(lines.headers["x-cib-first-line"], "1001");
    assert_eq!(lines.headers["x-cib-start"], text.find("line 1001\n").expect("offset").to_string().as_str());
    assert_eq!(lines.body.matches("class=\"l\"").count(), 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_build_page_lists_its_artifacts_with_download_links() {
    use cib_core::ports::{Artifacts, NewArtifact};
    use sha2::Digest;
    let s = TestServer::start(SPEC).await;
    let id = build_at_gate(&s).await;
    let mut visitor = Visitor::new(&s);
    visitor.sign_in(Role::Read).await;
    let page = visitor.get(&format!("/builds/{id}")).await;
    assert_eq!(page.status, 200);
    assert!(!page.body.contains("<h2>Artifacts</h2>"), "a build that kept nothing lists nothing");

    // The build keeps an artifact, as the engine would after its step: the server's own store.
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(dir.path().join("dist")).expect("mkdir");
    std::fs::write(dir.path().join("dist/app-1.0.whl"), b"a wheel <b>not bold</b>").expect("write");
    let artifacts = cib_store::FileArtifacts::new(s.data_dir.join("artifacts"), s.store.clone());
    let now = cib_core::time::Timestamp::from_secs(1_900_000_000);
    let new = NewArtifact {
        build: BuildId(id.clone()),
        name: "talk".into(),
        repo: "acme/shop".into(),
        commit: s.commit.clone(),
        pipeline: "test".into(),
        trusted: true,
        created_at: now,
        expires_at: now,
    };
    let record = artifacts
        .save(new, dir.path(), &[cib_core::spec::Glob::parse("dist/*.whl").expect("glob")])
        .await
        .expect("kept");

    let page = visitor.get(&format!("/builds/{id}")).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<h2>Artifacts</h2>"), "{}", page.body);
    let link = format!("/builds/{id}/artifacts/talk");
    assert!(page.body.contains(&format!("href=\"{link}\"")), "a download link: {}", page.body);
    assert!(page.body.contains(&record.sha256), "the SHA-256 is shown");
    assert!(page.body.contains(&format!("{} B", record.size)) || page.body.contains("KiB"), "the size is shown");

    // The link downloads the archive for a signed-in person, with the digest the page shows.
    let download = visitor.get(&link).await;
    assert_eq!(download.status, 200);
    assert_eq!(download.headers.get("x-cib-sha256").and_then(|v| v.to_str().ok()), Some(record.sha256.as_str()));
    let bytes = std::fs::read(artifacts.archive_path(&record)).expect("the archive");
    assert_eq!(hex(&sha2::Sha256::digest(&bytes)), record.sha256);
    // Without a session the archive is not given out.
    let stranger = Visitor::new(&s).get(&link).await;
    assert_ne!(stranger.status, 200);
    let missing = visitor.get(&format!("/builds/{id}/artifacts/nothing")).await;
    assert_eq!(missing.status, 404);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
