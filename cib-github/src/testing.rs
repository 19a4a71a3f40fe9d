//! A fake GitHub on loopback for tests, which checks every request it gets against GitHub's own
//! OpenAPI description of the operations cib uses (`tests/fixtures/openapi/operations.json`,
//! extracted from `@octokit/openapi` by `scripts/extract-openapi.mjs`).
//!
//! A request whose method and path match no operation, that lacks a required parameter, carries
//! an unknown query parameter or a body that does not validate against the operation's request
//! schema is recorded as a [`Violation`] and answered 400 or 404; tests end with
//! [`FakeGithub::assert_no_violations`]. The fake's own answers are validated against the
//! response schema of their status too, and a mismatch is a violation as well, so the fake
//! cannot drift into answering what GitHub never would.
//!
//! Error answers that the description does not list for an operation (401, 403, 5xx) are allowed:
//! GitHub can send them from any endpoint, and the description documents them unevenly.
//!
//! The state is small and in memory: repositories with commits (each a full snapshot of files,
//! with parents), branches, commit statuses, check runs, comments, collaborators' permissions,
//! pull request reviews, organisation teams and App installations. Faults can be injected per
//! operation to test retries.
//!
//! A repository imported from a local bare repository ([`FakeGithub::import_bare`]) is also
//! served to `git` over the smart HTTP protocol at `<url>/<owner>/<repo>.git`, through Git's own
//! `git http-backend`, and only to a client that authenticates as `x-access-token` with a token
//! the fake accepts, as GitHub does. That part is Git's protocol, not the REST API, so it is not
//! checked against the OpenAPI description; `git` itself checks it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::client::percent_decode;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The extracted description: operations and the component schemas they refer to.
const OPERATIONS_JSON: &str = include_str!("../tests/fixtures/openapi/operations.json");

#[derive(Debug, Deserialize)]
struct Description {
    operations: Vec<Operation>,
    components: Value,
}

#[derive(Debug, Deserialize)]
struct Operation {
    id: String,
    method: String,
    path: String,
    parameters: Vec<Parameter>,
    request_body: Option<RequestBody>,
    responses: BTreeMap<String, Option<Value>>,
}

#[derive(Debug, Deserialize)]
struct Parameter {
    name: String,
    #[serde(rename = "in")]
    location: String,
    required: bool,
    multi_segment: bool,
    schema: Value,
}

#[derive(Debug, Deserialize)]
struct RequestBody {
    required: bool,
    schema: Value,
}

/// The parsed description and its compiled validators, shared by every fake in the process
/// because compiling the schemas is the slow part.
struct Api {
    description: Description,
    validators: Mutex<HashMap<String, Arc<jsonschema::Validator>>>,
}

fn api() -> &'static Api {
    static API: OnceLock<Api> = OnceLock::new();
    API.get_or_init(|| Api {
        // The file is committed with the crate; a parse failure is a broken checkout.
        description: serde_json::from_str(OPERATIONS_JSON).expect("operations.json is valid"),
        validators: Mutex::new(HashMap::new()),
    })
}

impl Api {
    fn operation(&self, id: &str) -> Option<&Operation> {
        self.description.operations.iter().find(|op| op.id == id)
    }

    /// Validates `instance` against `schema`, whose `$ref`s point into the components; returns
    /// the problems found. `key` names the schema for the validator cache.
    fn check(&self, key: &str, schema: &Value, instance: &Value) -> Vec<String> {
        let validator = {
            let mut cache = lock(&self.validators);
            match cache.get(key) {
                Some(v) => v.clone(),
                None => {
                    // `$ref: "#/components/schemas/x"` resolves against the document root, so
                    // the root carries the components next to the schema itself.
                    let root = json!({ "components": self.description.components, "allOf": [schema] });
                    match jsonschema::validator_for(&root) {
                        Ok(v) => {
                            let v = Arc::new(v);
                            cache.insert(key.to_owned(), v.clone());
                            v
                        }
                        Err(e) => return vec![format!("schema {key} does not compile: {e}")],
                    }
                }
            }
        };
        validator.iter_errors(instance).map(|e| format!("{} at {}", e, e.instance_path())).collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread poisons the lock; the state is still usable for the report.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A request that did not conform to GitHub's description, or an answer of the fake that did not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub method: String,
    pub path: String,
    pub problem: String,
}

/// One request the fake received, after routing.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The path and query as sent.
    pub uri: String,
    /// The operation it matched, or `None` (unknown, or the fake's codeload download).
    pub operation: Option<String>,
    pub status: u16,
    pub body: Option<Value>,
    pub authorization: Option<String>,
}

/// A check run as the fake stored it, with every update applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckRunRecord {
    pub id: u64,
    pub name: String,
    pub head_sha: String,
    pub status: String,
    pub conclusion: Option<String>,
    pub external_id: Option<String>,
    pub details_url: Option<String>,
    pub title: Option<String>,
    pub summary: Option<String>,
    pub text: Option<String>,
    /// Every annotation sent, in order: GitHub appends each update's annotations.
    pub annotations: Vec<AnnotationRecord>,
    /// How many requests created or changed it.
    pub writes: u32,
}

/// One annotation of a check run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationRecord {
    pub path: String,
    pub start_line: u64,
    pub end_line: u64,
    pub start_column: Option<u64>,
    pub end_column: Option<u64>,
    pub level: String,
    pub message: String,
    pub title: Option<String>,
}

/// A commit status as the fake stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRecord {
    pub sha: String,
    pub state: String,
    pub context: String,
    pub description: Option<String>,
    pub target_url: Option<String>,
}

#[derive(Debug, Clone)]
struct Fault {
    operation: String,
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
    /// How many more requests it answers; `None` is every one until cleared.
    remaining: Option<usize>,
}

#[derive(Debug, Clone)]
struct FakeCommit {
    parents: Vec<String>,
    files: BTreeMap<String, Vec<u8>>,
    message: String,
    /// The GitHub account GitHub links to the commit's author, if any.
    author: Option<String>,
}

#[derive(Debug, Clone)]
struct FakeReview {
    id: u64,
    user: String,
    state: String,
    commit: String,
}

#[derive(Debug, Default)]
struct Repo {
    /// A local bare Git repository this one mirrors: its ref updates are applied there too.
    bare: Option<std::path::PathBuf>,
    commits: BTreeMap<String, FakeCommit>,
    /// Full ref names without `refs/`: `heads/main`, `tags/v1`.
    refs: BTreeMap<String, String>,
    statuses: Vec<StatusRecord>,
    check_runs: Vec<CheckRunRecord>,
    comments: Vec<(u64, String)>,
    permissions: BTreeMap<String, String>,
    reviews: BTreeMap<u64, Vec<FakeReview>>,
}

#[derive(Debug)]
struct App {
    id: u64,
    public_key_pem: Vec<u8>,
    installation: u64,
    /// Repositories installed on another installation than `installation`.
    installed: BTreeMap<String, u64>,
    token_lifetime: Duration,
}

impl App {
    fn installation_of(&self, repo: &str) -> u64 {
        self.installed.get(repo).copied().unwrap_or(self.installation)
    }
}

#[derive(Debug, Default)]
struct State {
    repos: BTreeMap<String, Repo>,
    violations: Vec<Violation>,
    requests: Vec<Recorded>,
    faults: VecDeque<Fault>,
    tokens: BTreeSet<String>,
    /// Installation tokens: when each expires (Unix seconds) and its installation.
    installation_tokens: BTreeMap<String, (u64, u64)>,
    /// Team memberships: (organisation, team slug) to user to state (`active`, `pending`).
    teams: BTreeMap<(String, String), BTreeMap<String, String>>,
    app: Option<App>,
    next_id: u64,
}

impl State {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// The fake GitHub server. Dropping it stops accepting connections.
#[derive(Debug)]
pub struct FakeGithub {
    url: String,
    state: Arc<Mutex<State>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGithub {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The token the fake accepts from the start.
pub const TEST_TOKEN: &str = "ghp_cibtesttoken";

impl FakeGithub {
    /// Starts a fake on a free loopback port that accepts [`TEST_TOKEN`].
    pub async fn start() -> std::io::Result<FakeGithub> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(Mutex::new(State::default()));
        lock(&state).tokens.insert(TEST_TOKEN.to_owned());
        let (shared, base) = (state.clone(), url.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (state, base) = (shared.clone(), base.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (state, base) = (state.clone(), base.clone());
                        async move { Ok::<_, std::convert::Infallible>(serve(&state, &base, req).await) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        Ok(FakeGithub { url, state, accept })
    }

    /// The base URI to give the client (`http://127.0.0.1:port`).
    pub fn url(&self) -> &str {
        &self.url
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Accepts another personal access token.
    pub fn accept_token(&self, token: &str) {
        self.state().tokens.insert(token.to_owned());
    }

    /// Makes the fake a GitHub App host: JWTs signed with the key whose public half is
    /// `public_key_pem` may create tokens for `installation`, which live `token_lifetime`.
    pub fn enable_app(&self, app_id: u64, public_key_pem: &[u8], installation: u64, token_lifetime: Duration) {
        self.state().app = Some(App {
            id: app_id,
            public_key_pem: public_key_pem.to_vec(),
            installation,
            installed: BTreeMap::new(),
            token_lifetime,
        });
    }

    /// Installs the App on `repo` through `installation` (another than [`Self::enable_app`]'s):
    /// `GET /repos/{owner}/{repo}/installation` names it, and only its tokens reach the
    /// repository, as on GitHub, where another installation's token gets a 404.
    pub fn install(&self, repo: &str, installation: u64) {
        if let Some(app) = self.state().app.as_mut() {
            app.installed.insert(repo.to_owned(), installation);
        }
    }

    /// Installation tokens issued per installation.
    pub fn tokens_of(&self, installation: u64) -> usize {
        self.state().installation_tokens.values().filter(|(_, i)| *i == installation).count()
    }

    /// Sets `user`'s membership of `org`'s team `team` (`active`, or `pending` for an
    /// invitation not yet accepted).
    pub fn set_team_member(&self, org: &str, team: &str, user: &str, state_name: &str) {
        let mut state = self.state();
        let members = state.teams.entry((org.to_owned(), team.to_owned())).or_default();
        members.insert(user.to_owned(), state_name.to_owned());
    }

    /// The check runs of the repository, oldest first.
    pub fn check_runs(&self, repo: &str) -> Vec<CheckRunRecord> {
        self.state().repos.get(repo).map(|r| r.check_runs.clone()).unwrap_or_default()
    }

    /// How many installation tokens the fake has issued.
    pub fn tokens_issued(&self) -> usize {
        self.state().installation_tokens.len()
    }

    /// Serves a local bare Git repository as `repo`: every commit with its real id, parents,
    /// files and message, and its branches and tags. From then on, refs the API moves are moved
    /// in the bare repository too (with `git update-ref`'s compare-and-swap), so that the
    /// repository on disk is what a test checks.
    pub fn import_bare(&self, repo: &str, path: &std::path::Path) -> std::io::Result<()> {
        let git = |args: &[&str]| -> std::io::Result<Vec<u8>> {
            let out = std::process::Command::new("git").arg("-C").arg(path).args(args).output()?;
            if out.status.success() {
                Ok(out.stdout)
            } else {
                Err(std::io::Error::other(String::from_utf8_lossy(&out.stderr).into_owned()))
            }
        };
        let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
        let mut commits = BTreeMap::new();
        for line in text(git(&["rev-list", "--all", "--parents"])?).lines() {
            let mut ids = line.split_whitespace().map(str::to_owned);
            let Some(sha) = ids.next() else { continue };
            let parents: Vec<String> = ids.collect();
            let mut files = BTreeMap::new();
            for name in text(git(&["ls-tree", "-r", "--name-only", &sha])?).lines() {
                files.insert(name.to_owned(), git(&["cat-file", "blob", &format!("{sha}:{name}")])?);
            }
            let message = text(git(&["log", "-1", "--format=%B", &sha])?).trim().to_owned();
            commits.insert(sha, FakeCommit { parents, files, message, author: None });
        }
        let mut refs = BTreeMap::new();
        for line in
            text(git(&["for-each-ref", "--format=%(refname) %(objectname)", "refs/heads", "refs/tags"])?).lines()
        {
            if let Some((name, sha)) = line.split_once(' ') {
                refs.insert(name.trim_start_matches("refs/").to_owned(), sha.to_owned());
            }
        }
        let mut state = self.state();
        let r = state.repos.entry(repo.to_owned()).or_default();
        r.commits.extend(commits);
        r.refs.extend(refs);
        r.bare = Some(path.to_path_buf());
        Ok(())
    }

    pub fn create_repo(&self, repo: &str) {
        self.state().repos.entry(repo.to_owned()).or_default();
    }

    /// Adds a commit whose files are its first parent's with `files` written over them, and
    /// returns its id.
    pub fn commit(&self, repo: &str, parents: &[&str], files: &[(&str, &str)], message: &str) -> String {
        let mut state = self.state();
        let repo = state.repos.entry(repo.to_owned()).or_default();
        let mut tree = parents.first().and_then(|p| repo.commits.get(*p)).map(|c| c.files.clone()).unwrap_or_default();
        for (path, content) in files {
            tree.insert((*path).to_owned(), content.as_bytes().to_vec());
        }
        let mut hasher = Sha256::new();
        for parent in parents {
            hasher.update(parent.as_bytes());
        }
        for (path, content) in &tree {
            hasher.update(path.as_bytes());
            hasher.update([0]);
            hasher.update(content);
        }
        hasher.update(message.as_bytes());
        let sha = hex::encode(&hasher.finalize()[..20]);
        let parents = parents.iter().map(|p| (*p).to_owned()).collect();
        repo.commits
            .insert(sha.clone(), FakeCommit { parents, files: tree, message: message.to_owned(), author: None });
        sha
    }

    /// Links the commit's author to a GitHub account, as GitHub does by the author's email.
    pub fn set_commit_author(&self, repo: &str, sha: &str, login: &str) {
        if let Some(c) = self.state().repos.get_mut(repo).and_then(|r| r.commits.get_mut(sha)) {
            c.author = Some(login.to_owned());
        }
    }

    pub fn set_branch(&self, repo: &str, branch: &str, sha: &str) {
        self.state().repos.entry(repo.to_owned()).or_default().refs.insert(format!("heads/{branch}"), sha.to_owned());
    }

    pub fn branch(&self, repo: &str, branch: &str) -> Option<String> {
        self.state().repos.get(repo)?.refs.get(&format!("heads/{branch}")).cloned()
    }

    /// Sets a user's permission (`admin`, `write`, `read`, `none`).
    pub fn set_permission(&self, repo: &str, user: &str, permission: &str) {
        let mut state = self.state();
        state.repos.entry(repo.to_owned()).or_default().permissions.insert(user.to_owned(), permission.to_owned());
    }

    /// Adds a review (`APPROVED`, `CHANGES_REQUESTED`, `COMMENTED`) of a pull request at a commit.
    pub fn add_review(&self, repo: &str, pull: u64, user: &str, state_name: &str, commit: &str) {
        let mut state = self.state();
        let id = state.id();
        let review = FakeReview { id, user: user.to_owned(), state: state_name.to_owned(), commit: commit.to_owned() };
        state.repos.entry(repo.to_owned()).or_default().reviews.entry(pull).or_default().push(review);
    }

    /// Answers the next `times` requests for `operation` with `status`, `headers` and `body`
    /// instead of handling them; `times` of `None` answers every one until [`Self::clear_faults`].
    pub fn inject(&self, operation: &str, status: u16, headers: &[(&str, &str)], body: Value, times: Option<usize>) {
        let headers = headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        self.state().faults.push_back(Fault {
            operation: operation.to_owned(),
            status,
            headers,
            body,
            remaining: times,
        });
    }

    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }

    /// Every commit status set on the repository, oldest first.
    pub fn statuses(&self, repo: &str) -> Vec<StatusRecord> {
        self.state().repos.get(repo).map(|r| r.statuses.clone()).unwrap_or_default()
    }

    /// Comments posted, as `(issue number, body)`.
    pub fn comments(&self, repo: &str) -> Vec<(u64, String)> {
        self.state().repos.get(repo).map(|r| r.comments.clone()).unwrap_or_default()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
    }

    /// How many requests matched `operation` (whatever the answer).
    pub fn count(&self, operation: &str) -> usize {
        self.state().requests.iter().filter(|r| r.operation.as_deref() == Some(operation)).count()
    }

    pub fn violations(&self) -> Vec<Violation> {
        self.state().violations.clone()
    }

    /// Panics listing every violation, if there was any.
    pub fn assert_no_violations(&self) {
        let violations = self.violations();
        assert!(
            violations.is_empty(),
            "requests or answers that do not conform to GitHub's description: {violations:#?}"
        );
    }
}

/// Validates a JSON value against the response schema of `operation` at `status`, for tests that
/// check documents the fake did not produce. `None` when the description has no such answer.
pub fn check_response(operation: &str, status: u16, body: &Value) -> Option<Vec<String>> {
    let api = api();
    let schema = api.operation(operation)?.responses.get(&status.to_string())?.as_ref()?;
    Some(api.check(&format!("{operation}/{status}"), schema, body))
}

/// What a handler answers.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: AnswerBody,
}

enum AnswerBody {
    Json(Value),
    Bytes(&'static str, Vec<u8>),
    Empty,
}

fn answer(status: u16, body: Value) -> Answer {
    Answer { status, headers: Vec::new(), body: AnswerBody::Json(body) }
}

fn not_found() -> Answer {
    answer(404, json!({"message": "Not Found", "documentation_url": "https://docs.github.com/rest"}))
}

fn unprocessable(message: &str) -> Answer {
    answer(422, json!({"message": message, "documentation_url": "https://docs.github.com/rest"}))
}

async fn serve(state: &Arc<Mutex<State>>, base: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_owned();
    let uri = req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into());
    let authorization = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let git_headers = [header("content-type"), header("content-encoding"), header("git-protocol")];
    let path = req.uri().path().to_owned();
    let raw_query = req.uri().query().unwrap_or("").to_owned();
    let query = parse_query(&raw_query);
    let raw = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let body: Option<Value> = if raw.is_empty() { None } else { serde_json::from_slice(&raw).ok() };

    // Git's smart HTTP protocol runs a process, so it is answered outside the state's lock.
    let answer = match git_repo(&path) {
        Some((repo, rest)) => {
            let bare = {
                let st = lock(state);
                let allowed = git_authorized(&st, &repo, authorization.as_deref());
                st.repos.get(&repo).and_then(|r| r.bare.clone()).map(|b| (b, allowed))
            };
            Some(match bare {
                None => not_found(),
                Some((_, false)) => Answer {
                    status: 401,
                    headers: vec![("www-authenticate".into(), "Basic realm=\"GitHub\"".into())],
                    body: AnswerBody::Empty,
                },
                Some((bare, true)) => git_http_backend(&bare, &method, &rest, &raw_query, &git_headers, &raw).await,
            })
        }
        None => None,
    };

    let mut st = lock(state);
    let (operation, answer) = match answer {
        Some(answer) => (None, answer),
        None => route(&mut st, base, &method, &path, &query, &raw, body.as_ref(), authorization.as_deref()),
    };
    st.requests.push(Recorded {
        method,
        uri,
        operation: operation.clone(),
        status: answer.status,
        body,
        authorization,
    });
    drop(st);

    let mut response = Response::builder().status(StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK));
    for (k, v) in &answer.headers {
        response = response.header(k, v);
    }
    let bytes = match answer.body {
        AnswerBody::Json(v) => {
            response = response.header("content-type", "application/json; charset=utf-8");
            serde_json::to_vec(&v).unwrap_or_default()
        }
        AnswerBody::Bytes(content_type, b) => {
            response = response.header("content-type", content_type);
            b
        }
        AnswerBody::Empty => Vec::new(),
    };
    response.body(Full::new(Bytes::from(bytes))).unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// Matches, checks and answers one request. Returns the operation matched and the answer.
#[allow(clippy::too_many_arguments)]
fn route(
    st: &mut State,
    base: &str,
    method: &str,
    path: &str,
    query: &[(String, String)],
    raw: &[u8],
    body: Option<&Value>,
    authorization: Option<&str>,
) -> (Option<String>, Answer) {
    let violation = |st: &mut State, problem: String| {
        st.violations.push(Violation { method: method.to_owned(), path: path.to_owned(), problem });
    };
    // The tarball download GitHub redirects to lives on codeload, not on the API.
    if let Some(rest) = path.strip_prefix("/_codeload/") {
        return (None, codeload(st, rest));
    }
    let api = api();
    let Some((op, params)) = api.description.operations.iter().find_map(|op| {
        (op.method == method).then(|| match_path(&op.path, path, &op.parameters).map(|p| (op, p))).flatten()
    }) else {
        violation(st, "no operation in GitHub's description matches this method and path".into());
        return (None, not_found());
    };
    let id = op.id.clone();
    let mut problems = Vec::new();

    // Query parameters: required ones present, none unknown, values of the right type.
    for (name, value) in query {
        match op.parameters.iter().find(|p| p.location == "query" && &p.name == name) {
            None => problems.push(format!("unknown query parameter `{name}`")),
            Some(p) => {
                let value = typed(&p.schema, value);
                for e in api.check(&format!("{id}/query/{name}"), &p.schema, &value) {
                    problems.push(format!("query parameter `{name}`: {e}"));
                }
            }
        }
    }
    for p in op.parameters.iter().filter(|p| p.required) {
        let present = match p.location.as_str() {
            "query" => query.iter().any(|(n, _)| n == &p.name),
            _ => params.get(&p.name).is_some_and(|v| !v.is_empty()),
        };
        if !present {
            problems.push(format!("required {} parameter `{}` is missing", p.location, p.name));
        }
    }
    for p in op.parameters.iter().filter(|p| p.location == "path") {
        if let Some(value) = params.get(&p.name) {
            for e in api.check(&format!("{id}/path/{}", p.name), &p.schema, &typed(&p.schema, value)) {
                problems.push(format!("path parameter `{}`: {e}", p.name));
            }
        }
    }
    // The body: valid JSON against the schema when the operation takes one, absent otherwise.
    match (&op.request_body, body) {
        (Some(rb), Some(value)) => {
            for e in api.check(&format!("{id}/request"), &rb.schema, value) {
                problems.push(format!("request body: {e}"));
            }
        }
        (Some(rb), None) if rb.required || !raw.is_empty() => {
            problems.push("the request body is missing or is not JSON".into());
        }
        (None, _) if !raw.is_empty() => problems.push("this operation takes no request body".into()),
        _ => {}
    }
    if !problems.is_empty() {
        for p in &problems {
            violation(st, format!("{id}: {p}"));
        }
        return (Some(id), answer(400, json!({"message": problems.join("; "), "documentation_url": ""})));
    }

    // Injected faults come after the checks, so a retried request is still checked each time.
    if let Some(i) = st.faults.iter().position(|f| f.operation == id) {
        let fault = st.faults[i].clone();
        match fault.remaining {
            Some(n) if n <= 1 => {
                st.faults.remove(i);
            }
            Some(n) => st.faults[i].remaining = Some(n - 1),
            None => {}
        }
        return (Some(id), Answer { status: fault.status, headers: fault.headers, body: AnswerBody::Json(fault.body) });
    }

    let answer = if id == "apps/create-installation-access-token" {
        create_installation_token(st, &params, authorization)
    } else if id == "apps/get-repo-installation" {
        repo_installation(st, base, &params, authorization)
    } else if !authorized(st, authorization) {
        answer(401, json!({"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"}))
    } else if !installation_reaches(st, &params, authorization) {
        // GitHub hides a repository from an installation that does not have it.
        not_found()
    } else if id == "teams/get-membership-for-user-in-org" {
        team_membership(st, base, &params)
    } else {
        handle(st, base, &id, &params, query, body)
    };

    // The fake's answer must be one GitHub could give.
    if let (AnswerBody::Json(value), Some(Some(schema))) = (&answer.body, op.responses.get(&answer.status.to_string()))
    {
        for e in api.check(&format!("{id}/{}", answer.status), schema, value) {
            violation(st, format!("{id}: the fake's {} answer: {e}", answer.status));
        }
    } else if answer.status < 400 && !op.responses.contains_key(&answer.status.to_string()) {
        violation(st, format!("{id}: the fake answered {}, which the description does not list", answer.status));
    }
    (Some(id), answer)
}

/// The path parameters if `path` matches `template`. A multi-segment parameter (a file path, a
/// ref such as `heads/feature/x`) takes one or more segments.
fn match_path(template: &str, path: &str, parameters: &[Parameter]) -> Option<HashMap<String, String>> {
    let template: Vec<&str> = template.trim_start_matches('/').split('/').collect();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut params = HashMap::new();
    if match_segments(&template, &segments, parameters, &mut params) { Some(params) } else { None }
}

fn match_segments(
    template: &[&str],
    segments: &[&str],
    parameters: &[Parameter],
    params: &mut HashMap<String, String>,
) -> bool {
    let Some((first, rest)) = template.split_first() else { return segments.is_empty() };
    let Some(name) = first.strip_prefix('{').and_then(|s| s.strip_suffix('}')) else {
        return segments.first() == Some(first) && match_segments(rest, &segments[1..], parameters, params);
    };
    let multi = parameters.iter().any(|p| p.name == name && p.multi_segment);
    let most = if multi { segments.len().saturating_sub(rest.len()) } else { 1.min(segments.len()) };
    for take in (1..=most).rev() {
        if match_segments(rest, &segments[take..], parameters, params) {
            let value = segments[..take].iter().map(|s| percent_decode(s)).collect::<Vec<_>>().join("/");
            params.insert(name.to_owned(), value);
            return true;
        }
    }
    false
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(&k.replace('+', " ")), percent_decode(&v.replace('+', " ")))
        })
        .collect()
}

/// A parameter's text as the JSON value its schema expects, so that `per_page=abc` fails an
/// integer schema while `ref=main` passes a string one.
fn typed(schema: &Value, text: &str) -> Value {
    match schema.get("type").and_then(Value::as_str) {
        Some("integer") => text.parse::<i64>().map(Value::from).unwrap_or_else(|_| Value::from(text)),
        Some("boolean") => match text {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => Value::from(text),
        },
        _ => Value::from(text),
    }
}

fn bearer(authorization: Option<&str>) -> Option<&str> {
    let a = authorization?;
    a.strip_prefix("Bearer ").or_else(|| a.strip_prefix("token "))
}

fn authorized(st: &State, authorization: Option<&str>) -> bool {
    let Some(token) = bearer(authorization) else { return false };
    token_valid(st, token)
}

fn token_valid(st: &State, token: &str) -> bool {
    st.tokens.contains(token) || st.installation_tokens.get(token).is_some_and(|(exp, _)| *exp > unix_now())
}

/// Whether an installation token may reach the repository a request names: only the
/// installation the repository is installed on may. Other tokens are not limited here.
fn installation_reaches(st: &State, params: &HashMap<String, String>, authorization: Option<&str>) -> bool {
    let (Some(app), Some(token)) = (&st.app, bearer(authorization)) else { return true };
    let Some((_, installation)) = st.installation_tokens.get(token) else { return true };
    match (params.get("owner"), params.get("repo")) {
        (Some(owner), Some(repo)) => app.installation_of(&format!("{owner}/{repo}")) == *installation,
        _ => true,
    }
}

/// `/<owner>/<repo>.git/<rest>`: the repository and the rest of the path, for Git's protocol.
fn git_repo(path: &str) -> Option<(String, String)> {
    let mut parts = path.trim_start_matches('/').splitn(3, '/');
    let (owner, name, rest) = (parts.next()?, parts.next()?, parts.next()?);
    let name = name.strip_suffix(".git")?;
    if owner.is_empty() || name.is_empty() || owner.starts_with('_') {
        return None;
    }
    Some((format!("{owner}/{name}"), format!("/{rest}")))
}

/// Git authenticates over HTTP with Basic auth; GitHub takes a token as the password (the
/// user name `x-access-token` for an installation token, anything for a personal one).
fn git_authorized(st: &State, repo: &str, authorization: Option<&str>) -> bool {
    let Some(encoded) = authorization.and_then(|a| a.strip_prefix("Basic ")) else { return false };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else { return false };
    let text = String::from_utf8_lossy(&decoded);
    let Some((_, token)) = text.split_once(':') else { return false };
    if !token_valid(st, token) {
        return false;
    }
    match (&st.app, st.installation_tokens.get(token)) {
        (Some(app), Some((_, installation))) => app.installation_of(repo) == *installation,
        _ => true,
    }
}

/// Where Git's `http-backend` is: next to the `git` on the path, or where Debian puts it.
fn http_backend() -> std::path::PathBuf {
    let exec_path = std::process::Command::new("git")
        .arg("--exec-path")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| std::path::PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("git-http-backend"));
    match exec_path {
        Some(path) if path.exists() => path,
        _ => std::path::PathBuf::from("/usr/lib/git-core/git-http-backend"),
    }
}

/// Runs `git http-backend` as a CGI program over the bare repository and turns its output into
/// an answer.
async fn git_http_backend(
    bare: &std::path::Path,
    method: &str,
    path_info: &str,
    query: &str,
    headers: &[Option<String>; 3],
    body: &[u8],
) -> Answer {
    use tokio::io::AsyncWriteExt;
    let failed = |m: String| answer(500, json!({"message": m}));
    let mut command = tokio::process::Command::new(http_backend());
    command
        .env_clear()
        .env("GIT_PROJECT_ROOT", bare)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", path_info)
        .env("REQUEST_METHOD", method)
        .env("QUERY_STRING", query)
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_USER", "x-access-token")
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (name, value) in ["CONTENT_TYPE", "HTTP_CONTENT_ENCODING", "GIT_PROTOCOL"].iter().zip(headers) {
        if let Some(value) = value {
            command.env(name, value);
        }
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return failed(format!("git http-backend: {e} (scripts/ensure-git-http-backend installs it)")),
    };
    // The request is written while the answer is read, so that neither side waits on a full
    // pipe.
    if let Some(mut stdin) = child.stdin.take() {
        let body = body.to_vec();
        tokio::spawn(async move {
            let _ = stdin.write_all(&body).await;
        });
    }
    let output = match child.wait_with_output().await {
        Ok(output) => output,
        Err(e) => return failed(format!("git http-backend: {e}")),
    };
    let out = output.stdout;
    let Some(split) = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| out.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)))
    else {
        return failed(format!("git http-backend: {}", String::from_utf8_lossy(&output.stderr)));
    };
    let (head, rest) = (String::from_utf8_lossy(&out[..split.0]).into_owned(), out[split.0 + split.1..].to_vec());
    let mut status = 200;
    let mut answer_headers = Vec::new();
    let mut content_type = "application/octet-stream";
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            status = value.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(500);
        } else if name.eq_ignore_ascii_case("content-type") {
            // The content types git sends are a handful of fixed strings.
            content_type = match value {
                "application/x-git-upload-pack-advertisement" => "application/x-git-upload-pack-advertisement",
                "application/x-git-upload-pack-result" => "application/x-git-upload-pack-result",
                "text/plain" => "text/plain",
                _ => "application/octet-stream",
            };
        } else {
            answer_headers.push((name.to_owned(), value.to_owned()));
        }
    }
    Answer { status, headers: answer_headers, body: AnswerBody::Bytes(content_type, rest) }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[derive(Debug, Deserialize)]
struct Claims {
    iss: Value,
}

/// Checks that the request carries a JWT of the fake's App, as GitHub does for the App's own
/// endpoints; the refusal is the answer to give.
fn app_jwt<'a>(st: &'a State, authorization: Option<&str>) -> Result<&'a App, Answer> {
    let unauthorized =
        |m: &str| answer(401, json!({"message": m, "documentation_url": "https://docs.github.com/rest"}));
    let Some(app) = &st.app else { return Err(unauthorized("this fake is not a GitHub App host")) };
    let Some(jwt) = bearer(authorization) else { return Err(unauthorized("a JWT is required")) };
    let key = match octocrab::jsonwebtoken::DecodingKey::from_rsa_pem(&app.public_key_pem) {
        Ok(k) => k,
        Err(e) => return Err(unauthorized(&format!("the test's public key: {e}"))),
    };
    let mut validation = octocrab::jsonwebtoken::Validation::new(octocrab::jsonwebtoken::Algorithm::RS256);
    validation.set_required_spec_claims(&["exp", "iat"]);
    let claims = match octocrab::jsonwebtoken::decode::<Claims>(jwt, &key, &validation) {
        Ok(data) => data.claims,
        Err(e) => return Err(unauthorized(&format!("A JSON web token could not be decoded: {e}"))),
    };
    let iss = match &claims.iss {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    };
    if iss != Some(app.id) {
        return Err(unauthorized("the JWT's issuer is not this app"));
    }
    Ok(app)
}

/// `GET /repos/{owner}/{repo}/installation`, with the App's JWT.
fn repo_installation(st: &State, base: &str, params: &HashMap<String, String>, authorization: Option<&str>) -> Answer {
    let app = match app_jwt(st, authorization) {
        Ok(app) => app,
        Err(refused) => return refused,
    };
    let p = |name: &str| params.get(name).cloned().unwrap_or_default();
    let repo = format!("{}/{}", p("owner"), p("repo"));
    if !st.repos.contains_key(&repo) {
        return not_found();
    }
    let id = app.installation_of(&repo);
    let now = rfc3339(unix_now());
    answer(
        200,
        json!({
            "id": id, "account": user_json(base, &p("owner")), "repository_selection": "selected",
            "access_tokens_url": format!("{base}/app/installations/{id}/access_tokens"),
            "repositories_url": format!("{base}/installation/repositories"),
            "html_url": format!("{base}/html/settings/installations/{id}"),
            "app_id": app.id, "app_slug": "cib", "target_id": 1, "target_type": "Organization",
            "permissions": {"checks": "write", "contents": "read", "members": "read", "metadata": "read"},
            "events": ["check_run", "issue_comment", "pull_request", "push"],
            "created_at": now, "updated_at": now, "single_file_name": null,
            "suspended_by": null, "suspended_at": null,
        }),
    )
}

/// `GET /orgs/{org}/teams/{team_slug}/memberships/{username}`: 404 for a non-member.
fn team_membership(st: &State, base: &str, params: &HashMap<String, String>) -> Answer {
    let p = |name: &str| params.get(name).cloned().unwrap_or_default();
    let (org, team, user) = (p("org"), p("team_slug"), p("username"));
    match st.teams.get(&(org.clone(), team.clone())).and_then(|m| m.get(&user)) {
        Some(state_name) => answer(
            200,
            json!({
                "url": format!("{base}/orgs/{org}/teams/{team}/memberships/{user}"),
                "role": "member", "state": state_name,
            }),
        ),
        None => not_found(),
    }
}

fn create_installation_token(st: &mut State, params: &HashMap<String, String>, authorization: Option<&str>) -> Answer {
    let unauthorized =
        |m: &str| answer(401, json!({"message": m, "documentation_url": "https://docs.github.com/rest"}));
    let Some(app) = &st.app else { return unauthorized("this fake is not a GitHub App host") };
    let Some(jwt) = bearer(authorization) else { return unauthorized("a JWT is required") };
    let key = match octocrab::jsonwebtoken::DecodingKey::from_rsa_pem(&app.public_key_pem) {
        Ok(k) => k,
        Err(e) => return unauthorized(&format!("the test's public key: {e}")),
    };
    let mut validation = octocrab::jsonwebtoken::Validation::new(octocrab::jsonwebtoken::Algorithm::RS256);
    // GitHub puts the App id in `iss` as a number, which the library's issuer check does not read;
    // it is compared below instead.
    validation.set_required_spec_claims(&["exp", "iat"]);
    let claims = match octocrab::jsonwebtoken::decode::<Claims>(jwt, &key, &validation) {
        Ok(data) => data.claims,
        Err(e) => return unauthorized(&format!("A JSON web token could not be decoded: {e}")),
    };
    let iss = match &claims.iss {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    };
    if iss != Some(app.id) {
        return unauthorized("the JWT's issuer is not this app");
    }
    let installation = params.get("installation_id").and_then(|s| s.parse::<u64>().ok());
    let Some(installation) =
        installation.filter(|i| *i == app.installation || app.installed.values().any(|other| other == i))
    else {
        return not_found();
    };
    let expires = unix_now() + app.token_lifetime.as_secs();
    let n = st.id();
    let token = format!("ghs_installation{n}");
    st.installation_tokens.insert(token.clone(), (expires, installation));
    // GitHub always lists the token's permissions, and octocrab's model requires them.
    let permissions = json!({
        "checks": "write", "contents": "read", "members": "read", "metadata": "read",
        "pull_requests": "read", "statuses": "write",
    });
    answer(
        201,
        json!({"token": token, "expires_at": rfc3339(expires), "permissions": permissions, "repository_selection": "all"}),
    )
}

fn handle(
    st: &mut State,
    base: &str,
    id: &str,
    params: &HashMap<String, String>,
    query: &[(String, String)],
    body: Option<&Value>,
) -> Answer {
    let p = |name: &str| params.get(name).cloned().unwrap_or_default();
    let repo_name = format!("{}/{}", p("owner"), p("repo"));
    let new_id = st.id();
    let Some(repo) = st.repos.get_mut(&repo_name) else { return not_found() };
    let urls = Urls { base: base.to_owned(), repo: repo_name.clone() };
    match id {
        "repos/get-content" => {
            let reference = query.iter().find(|(k, _)| k == "ref").map(|(_, v)| v.clone());
            let Some(sha) = resolve(repo, reference.as_deref().unwrap_or("main")) else { return not_found() };
            let path = p("path");
            let Some(content) = repo.commits.get(&sha).and_then(|c| c.files.get(&path)) else { return not_found() };
            let blob = hex::encode(&Sha256::digest(content)[..20]);
            let self_url = format!("{}/contents/{path}", urls.api());
            answer(
                200,
                json!({
                    "type": "file", "encoding": "base64", "size": content.len(),
                    "name": path.rsplit('/').next().unwrap_or(&path), "path": path,
                    "content": base64::engine::general_purpose::STANDARD.encode(content),
                    "sha": blob, "url": self_url,
                    "git_url": format!("{}/git/blobs/{blob}", urls.api()),
                    "html_url": format!("{}/blob/{sha}/{path}", urls.html()),
                    "download_url": null,
                    "_links": {"self": self_url, "git": null, "html": null},
                }),
            )
        }
        "repos/download-tarball-archive" => {
            let Some(sha) = resolve(repo, &p("ref")) else { return not_found() };
            Answer {
                status: 302,
                headers: vec![("location".into(), format!("{base}/_codeload/{repo_name}/legacy.tar.gz/{sha}"))],
                body: AnswerBody::Empty,
            }
        }
        "repos/compare-commits-with-basehead" => {
            let basehead = p("basehead");
            let Some((b, h)) = basehead.split_once("...") else { return not_found() };
            let (Some(b), Some(h)) = (resolve(repo, b), resolve(repo, h)) else { return not_found() };
            let from_base = ancestors(repo, &b);
            let from_head = ancestors(repo, &h);
            let ahead: Vec<&String> = from_head.iter().filter(|c| !from_base.contains(*c)).collect();
            let behind = from_base.iter().filter(|c| !from_head.contains(*c)).count();
            let merge_base = merge_base(repo, &h, &from_base).unwrap_or_else(|| b.clone());
            let status = match (ahead.len(), behind) {
                (0, 0) => "identical",
                (_, 0) => "ahead",
                (0, _) => "behind",
                _ => "diverged",
            };
            let commits: Vec<Value> = ahead.iter().map(|c| commit_json(repo, &urls, c)).collect();
            let compare = format!("{}/compare/{basehead}", urls.html());
            answer(
                200,
                json!({
                    "url": format!("{}/compare/{basehead}", urls.api()), "html_url": compare,
                    "permalink_url": compare, "diff_url": format!("{compare}.diff"), "patch_url": format!("{compare}.patch"),
                    "base_commit": commit_json(repo, &urls, &b), "merge_base_commit": commit_json(repo, &urls, &merge_base),
                    "status": status, "ahead_by": ahead.len(), "behind_by": behind, "total_commits": ahead.len(),
                    "commits": commits,
                }),
            )
        }
        "repos/get-commit" => match resolve(repo, &p("ref")) {
            Some(sha) => answer(200, commit_json(repo, &urls, &sha)),
            None => unprocessable(&format!("No commit found for SHA: {}", p("ref"))),
        },
        "git/update-ref" => {
            let reference = p("ref");
            let Some(current) = repo.refs.get(&reference).cloned() else {
                return unprocessable("Reference does not exist");
            };
            let to = body.and_then(|b| b.get("sha")).and_then(Value::as_str).unwrap_or_default().to_owned();
            let force = body.and_then(|b| b.get("force")).and_then(Value::as_bool).unwrap_or(false);
            if !repo.commits.contains_key(&to) {
                return unprocessable("Object does not exist");
            }
            if !force && !ancestors(repo, &to).contains(&current) {
                return unprocessable("Update is not a fast forward");
            }
            if let Some(bare) = &repo.bare {
                // The repository on disk moves first, and only from the value this fake holds.
                let full = format!("refs/{reference}");
                let moved = std::process::Command::new("git")
                    .arg("-C")
                    .arg(bare)
                    .args(["update-ref", &full, &to, &current])
                    .status()
                    .is_ok_and(|s| s.success());
                if !moved {
                    return unprocessable("Reference cannot be updated");
                }
            }
            repo.refs.insert(reference.clone(), to.clone());
            answer(
                200,
                json!({
                    "ref": format!("refs/{reference}"), "node_id": format!("REF_{new_id}"),
                    "url": format!("{}/git/refs/{reference}", urls.api()),
                    "object": {"type": "commit", "sha": to, "url": format!("{}/git/commits/{to}", urls.api())},
                }),
            )
        }
        "repos/get-collaborator-permission-level" => {
            let user = p("username");
            let permission = repo.permissions.get(&user).cloned().unwrap_or_else(|| "none".into());
            let mut collaborator = user_json(base, &user);
            collaborator["role_name"] = Value::from(permission.clone());
            answer(200, json!({"permission": permission, "role_name": permission, "user": collaborator}))
        }
        "pulls/list-reviews" => {
            let pull: u64 = p("pull_number").parse().unwrap_or(0);
            let page: usize = query.iter().find(|(k, _)| k == "page").and_then(|(_, v)| v.parse().ok()).unwrap_or(1);
            let per_page: usize =
                query.iter().find(|(k, _)| k == "per_page").and_then(|(_, v)| v.parse().ok()).unwrap_or(30);
            let reviews = repo.reviews.get(&pull).cloned().unwrap_or_default();
            let pull_url = format!("{}/pulls/{pull}", urls.html());
            let list: Vec<Value> = reviews
                .iter()
                .skip(page.saturating_sub(1) * per_page)
                .take(per_page)
                .map(|r| {
                    let html = format!("{pull_url}#pullrequestreview-{}", r.id);
                    json!({
                        "id": r.id, "node_id": format!("PRR_{}", r.id), "user": user_json(base, &r.user),
                        "body": "", "state": r.state, "commit_id": r.commit, "html_url": html,
                        "pull_request_url": format!("{}/pulls/{pull}", urls.api()),
                        "_links": {"html": {"href": html}, "pull_request": {"href": format!("{}/pulls/{pull}", urls.api())}},
                        "author_association": "MEMBER", "submitted_at": rfc3339(unix_now()),
                    })
                })
                .collect();
            answer(200, Value::Array(list))
        }
        "repos/create-commit-status" => {
            let sha = p("sha");
            if !repo.commits.contains_key(&sha) {
                return unprocessable(&format!("No commit found for SHA: {sha}"));
            }
            let field = |k: &str| body.and_then(|b| b.get(k)).and_then(Value::as_str).map(str::to_owned);
            let record = StatusRecord {
                sha: sha.clone(),
                state: field("state").unwrap_or_default(),
                context: field("context").unwrap_or_else(|| "default".into()),
                description: field("description"),
                target_url: field("target_url"),
            };
            repo.statuses.push(record.clone());
            let now = rfc3339(unix_now());
            answer(
                201,
                json!({
                    "url": format!("{}/statuses/{sha}", urls.api()), "avatar_url": null, "id": new_id,
                    "node_id": format!("SC_{new_id}"), "state": record.state, "description": record.description,
                    "target_url": record.target_url, "context": record.context, "created_at": now,
                    "updated_at": now, "creator": user_json(base, "cib[bot]"),
                }),
            )
        }
        "checks/create" | "checks/update" => {
            let field = |k: &str| body.and_then(|b| b.get(k)).and_then(Value::as_str).map(str::to_owned);
            let output = |k: &str| {
                body.and_then(|b| b.pointer(&format!("/output/{k}"))).and_then(Value::as_str).map(str::to_owned)
            };
            let index = if id == "checks/create" {
                let head_sha = field("head_sha").unwrap_or_default();
                if !repo.commits.contains_key(&head_sha) {
                    return unprocessable(&format!("No commit found for SHA: {head_sha}"));
                }
                repo.check_runs.push(CheckRunRecord {
                    id: new_id,
                    name: field("name").unwrap_or_default(),
                    head_sha,
                    status: "queued".into(),
                    conclusion: None,
                    external_id: None,
                    details_url: None,
                    title: None,
                    summary: None,
                    text: None,
                    annotations: Vec::new(),
                    writes: 0,
                });
                repo.check_runs.len() - 1
            } else {
                let wanted: u64 = p("check_run_id").parse().unwrap_or(0);
                match repo.check_runs.iter().position(|c| c.id == wanted) {
                    Some(i) => i,
                    None => return not_found(),
                }
            };
            let run = &mut repo.check_runs[index];
            run.writes += 1;
            if let Some(name) = field("name") {
                run.name = name;
            }
            if let Some(status) = field("status") {
                run.status = status;
            }
            if let Some(conclusion) = field("conclusion") {
                // GitHub completes a run that is given a conclusion.
                run.conclusion = Some(conclusion);
                run.status = "completed".into();
            }
            for (slot, key) in [(&mut run.external_id, "external_id"), (&mut run.details_url, "details_url")] {
                if let Some(value) = field(key) {
                    *slot = Some(value);
                }
            }
            for (slot, key) in [(&mut run.title, "title"), (&mut run.summary, "summary"), (&mut run.text, "text")] {
                if let Some(value) = output(key) {
                    *slot = Some(value);
                }
            }
            let annotations = body.and_then(|b| b.pointer("/output/annotations")).and_then(Value::as_array);
            for a in annotations.into_iter().flatten() {
                let text = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_owned);
                let number = |k: &str| a.get(k).and_then(Value::as_u64);
                run.annotations.push(AnnotationRecord {
                    path: text("path").unwrap_or_default(),
                    start_line: number("start_line").unwrap_or(0),
                    end_line: number("end_line").unwrap_or(0),
                    start_column: number("start_column"),
                    end_column: number("end_column"),
                    level: text("annotation_level").unwrap_or_default(),
                    message: text("message").unwrap_or_default(),
                    title: text("title"),
                });
            }
            let run = run.clone();
            let url = format!("{}/check-runs/{}", urls.api(), run.id);
            let now = rfc3339(unix_now());
            let completed = run.status == "completed";
            answer(
                if id == "checks/create" { 201 } else { 200 },
                json!({
                    "id": run.id, "head_sha": run.head_sha, "node_id": format!("CR_{}", run.id),
                    "external_id": run.external_id, "url": url,
                    "html_url": format!("{}/runs/{}", urls.html(), run.id), "details_url": run.details_url,
                    "status": run.status, "conclusion": run.conclusion, "started_at": now,
                    "completed_at": if completed { Value::from(now.clone()) } else { Value::Null },
                    "output": {
                        "title": run.title, "summary": run.summary, "text": run.text,
                        "annotations_count": run.annotations.len(), "annotations_url": format!("{url}/annotations"),
                    },
                    "name": run.name, "check_suite": {"id": 1}, "app": null, "pull_requests": [],
                }),
            )
        }
        "issues/create-comment" => {
            let number: u64 = p("issue_number").parse().unwrap_or(0);
            let text = body.and_then(|b| b.get("body")).and_then(Value::as_str).unwrap_or_default().to_owned();
            repo.comments.push((number, text.clone()));
            let now = rfc3339(unix_now());
            answer(
                201,
                json!({
                    "id": new_id, "node_id": format!("IC_{new_id}"), "body": text,
                    "html_url": format!("{}/issues/{number}#issuecomment-{new_id}", urls.html()),
                    "issue_url": format!("{}/issues/{number}", urls.api()),
                    "url": format!("{}/issues/comments/{new_id}", urls.api()),
                    "user": user_json(base, "cib[bot]"), "created_at": now, "updated_at": now,
                    "author_association": "NONE",
                }),
            )
        }
        _ => answer(501, json!({"message": format!("the fake does not implement {id}"), "documentation_url": ""})),
    }
}

struct Urls {
    base: String,
    repo: String,
}

impl Urls {
    fn api(&self) -> String {
        format!("{}/repos/{}", self.base, self.repo)
    }
    fn html(&self) -> String {
        format!("{}/html/{}", self.base, self.repo)
    }
}

/// The commit a ref names: a full commit id, a branch, `heads/<branch>` or `tags/<tag>`.
fn resolve(repo: &Repo, reference: &str) -> Option<String> {
    if repo.commits.contains_key(reference) {
        return Some(reference.to_owned());
    }
    let short = reference.strip_prefix("refs/").unwrap_or(reference);
    [short.to_owned(), format!("heads/{short}"), format!("tags/{short}")].iter().find_map(|r| repo.refs.get(r).cloned())
}

/// The commit and every commit reachable from it through parents.
fn ancestors(repo: &Repo, sha: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![sha.to_owned()];
    while let Some(c) = todo.pop() {
        if seen.insert(c.clone())
            && let Some(commit) = repo.commits.get(&c)
        {
            todo.extend(commit.parents.iter().cloned());
        }
    }
    seen
}

/// The nearest commit reachable from `head` that `base` reaches too, breadth first.
fn merge_base(repo: &Repo, head: &str, from_base: &BTreeSet<String>) -> Option<String> {
    let mut queue = VecDeque::from([head.to_owned()]);
    let mut seen = BTreeSet::new();
    while let Some(c) = queue.pop_front() {
        if from_base.contains(&c) {
            return Some(c);
        }
        if seen.insert(c.clone())
            && let Some(commit) = repo.commits.get(&c)
        {
            queue.extend(commit.parents.iter().cloned());
        }
    }
    None
}

fn commit_json(repo: &Repo, urls: &Urls, sha: &str) -> Value {
    let (parents, message) = repo.commits.get(sha).map(|c| (c.parents.clone(), c.message.clone())).unwrap_or_default();
    let author = match repo.commits.get(sha).and_then(|c| c.author.as_deref()) {
        Some(login) => user_json(urls.base.as_str(), login),
        None => Value::Null,
    };
    let person = json!({"name": "Test Author", "email": "author@example.com", "date": "2026-01-01T00:00:00Z"});
    json!({
        "url": format!("{}/commits/{sha}", urls.api()), "sha": sha, "node_id": format!("C_{sha}"),
        "html_url": format!("{}/commit/{sha}", urls.html()),
        "comments_url": format!("{}/commits/{sha}/comments", urls.api()),
        "commit": {
            "url": format!("{}/git/commits/{sha}", urls.api()), "author": person, "committer": person,
            "message": message, "comment_count": 0,
            "tree": {"sha": sha, "url": format!("{}/git/trees/{sha}", urls.api())},
        },
        "author": author, "committer": null,
        "parents": parents.iter().map(|p| json!({
            "sha": p, "url": format!("{}/commits/{p}", urls.api()), "html_url": format!("{}/commit/{p}", urls.html()),
        })).collect::<Vec<_>>(),
    })
}

fn user_json(base: &str, login: &str) -> Value {
    let url = format!("{base}/users/{login}");
    let id = u64::from_str_radix(&hex::encode(&Sha256::digest(login.as_bytes())[..3]), 16).unwrap_or(1);
    json!({
        "login": login, "id": id, "node_id": format!("U_{login}"), "avatar_url": format!("{base}/avatars/{login}"),
        "gravatar_id": "", "url": url, "html_url": format!("{base}/html/{login}"),
        "followers_url": format!("{url}/followers"), "following_url": format!("{url}/following{{/other_user}}"),
        "gists_url": format!("{url}/gists{{/gist_id}}"), "starred_url": format!("{url}/starred{{/owner}}{{/repo}}"),
        "subscriptions_url": format!("{url}/subscriptions"), "organizations_url": format!("{url}/orgs"),
        "repos_url": format!("{url}/repos"), "events_url": format!("{url}/events{{/privacy}}"),
        "received_events_url": format!("{url}/received_events"), "type": "User", "site_admin": false,
    })
}

/// `owner/repo/legacy.tar.gz/<sha>`: a gzipped tarball with one top directory, as codeload sends.
fn codeload(st: &State, rest: &str) -> Answer {
    let parts: Vec<&str> = rest.split('/').collect();
    let [owner, name, "legacy.tar.gz", sha] = parts.as_slice() else { return not_found() };
    let Some(commit) = st.repos.get(&format!("{owner}/{name}")).and_then(|r| r.commits.get(*sha)) else {
        return not_found();
    };
    let top = format!("{owner}-{name}-{}", &sha[..7.min(sha.len())]);
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut builder = tar::Builder::new(encoder);
    for (path, content) in &commit.files {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        if builder.append_data(&mut header, format!("{top}/{path}"), content.as_slice()).is_err() {
            return answer(500, json!({"message": "tar"}));
        }
    }
    match builder.into_inner().and_then(|gz| gz.finish()) {
        Ok(bytes) => Answer { status: 200, headers: Vec::new(), body: AnswerBody::Bytes("application/x-gzip", bytes) },
        Err(_) => answer(500, json!({"message": "gzip"})),
    }
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub(crate) fn rfc3339(secs: u64) -> String {
    cib_core::time::Timestamp::from_secs(secs).rfc3339_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_formatted_like_github() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn multi_segment_parameters_take_several_segments() {
        let op = api().operation("git/update-ref").expect("in the description");
        let params = match_path(&op.path, "/repos/o/r/git/refs/heads/feature/x", &op.parameters).expect("matches");
        assert_eq!(params["ref"], "heads/feature/x");
        assert!(match_path(&op.path, "/repos/o/r/git/refs", &op.parameters).is_none());
    }
}
