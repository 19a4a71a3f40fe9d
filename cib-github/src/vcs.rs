//! [`Vcs`] on GitHub's REST API: specs through the contents API, workspaces from tarballs,
//! comparisons, fast-forwards, permissions and pull request reviews.
//!
//! A workspace is, by default, a Git checkout of the exact commit, fetched over HTTPS with the
//! client's token (an App's installation token) and `--depth 50` (configurable), with the tags
//! that point into that history, so that `git describe`, `setuptools-scm` and the like work in
//! steps. The token reaches `git` for the fetch only, as an `http.extraHeader` passed through the
//! `GIT_CONFIG_*` environment of that one process: it is never in a command line (which other
//! users can read), in `.git/config`, or in a step's environment. The remote's URL, which has no
//! credentials, stays in `.git/config`.
//!
//! Without a Git URL ([`GithubVcs::with_git`]), a workspace is the tarball of the commit
//! (`GET /repos/{owner}/{repo}/tarball/{ref}`, which redirects to a short-lived codeload URL),
//! unpacked into the destination: no `git` binary is needed, and there is no `.git` directory.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use cib_core::ports::{Comparison, ErrorKind, Permission, Vcs, VcsError};
use http::Method;
use serde_json::{Value, json};

use crate::client::{ApiError, GithubClient, encode, repo_path};

/// Where cib reads its spec in a repository.
pub const SPEC_PATH: &str = ".cib.yml";

/// The largest tarball cib unpacks, compressed, so that a huge repository fails clearly.
const MAX_TARBALL: usize = 1 << 30;

impl From<ApiError> for VcsError {
    fn from(e: ApiError) -> Self {
        match e.kind {
            ErrorKind::Transient => VcsError::Transient(e.message),
            ErrorKind::Permanent => VcsError::Permanent(e.message),
            ErrorKind::Misconfigured => VcsError::Misconfigured(e.message),
        }
    }
}

/// The version control port on GitHub.
#[derive(Debug, Clone)]
pub struct GithubVcs {
    client: GithubClient,
    spec_path: String,
    git: Option<GitFetch>,
    teams: Arc<Mutex<TeamCache>>,
}

/// Team memberships already asked: (organisation, team, user) to the answer and when it was
/// given.
type TeamCache = HashMap<(String, String, String), (bool, Instant)>;

/// Where and how deep workspaces are fetched with git.
#[derive(Debug, Clone)]
struct GitFetch {
    base: String,
    depth: u32,
}

/// The history a workspace fetch takes by default: enough for `git describe` to find a recent
/// tag, small enough to stay quick on a large repository.
pub const DEFAULT_CLONE_DEPTH: u32 = 50;

/// How long a team membership answer is trusted before GitHub is asked again.
const TEAM_TTL: Duration = Duration::from_secs(300);

fn bad_answer(what: &str) -> VcsError {
    VcsError::Permanent(format!("GitHub's answer lacks {what}"))
}

impl GithubVcs {
    pub fn new(client: GithubClient) -> Self {
        GithubVcs { client, spec_path: SPEC_PATH.to_owned(), git: None, teams: Arc::default() }
    }

    /// Fetches workspaces with git from `<base>/<owner>/<repo>.git` (`https://github.com`, or a
    /// GitHub Enterprise Server's address), `depth` commits deep (at least 1).
    pub fn with_git(mut self, base: &str, depth: u32) -> Self {
        self.git = Some(GitFetch { base: base.trim_end_matches('/').to_owned(), depth: depth.max(1) });
        self
    }

    /// Whether `user` is an active member of `team` in `org`, cached for five minutes. A
    /// pending invitation is not membership.
    async fn member(&self, repo: &str, org: &str, team: &str, user: &str) -> Result<bool, VcsError> {
        let key = (org.to_ascii_lowercase(), team.to_ascii_lowercase(), user.to_ascii_lowercase());
        if let Some((answer, at)) = self.teams.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
            && at.elapsed() < TEAM_TTL
        {
            return Ok(*answer);
        }
        let path =
            format!("/orgs/{}/teams/{}/memberships/{}", encode(org, false), encode(team, false), encode(user, false));
        let answer = match self.client.send_for(Some(repo), Method::GET, &path, None).await {
            Ok(answer) => answer.json()?.get("state").and_then(Value::as_str) == Some("active"),
            // GitHub answers 404 for a user who is not a member (and for a team it hides).
            Err(e) if e.status == Some(404) => false,
            Err(e) => return Err(e.into()),
        };
        self.teams.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (answer, Instant::now()));
        Ok(answer)
    }

    /// Fetches `rev` of `repo` into the empty directory `dest` with git, and checks it out.
    async fn fetch(&self, git: &GitFetch, repo: &str, rev: &str, dest: &Path) -> Result<(), VcsError> {
        repo_path(repo)?;
        let token = self.client.git_token(repo).await?;
        let url = format!("{}/{repo}.git", git.base);
        let header = format!(
            "Authorization: Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"))
        );
        run_git(dest, &["init", "-q", "."], None).await?;
        run_git(dest, &["remote", "add", "origin", &url], None).await?;
        // git follows the tags that point into the fetched history only when the fetch stores
        // a ref (a commit id alone stores none), hence the destination ref.
        let depth = format!("--depth={}", git.depth);
        let refspec = format!("+{rev}:refs/remotes/origin/cib-build");
        run_git(dest, &["fetch", "-q", "--no-recurse-submodules", &depth, "origin", &refspec], Some(&header)).await?;
        run_git(dest, &["-c", "advice.detachedHead=false", "checkout", "-q", "--detach", "FETCH_HEAD"], None).await
    }

    /// Reads the spec from another path than [`SPEC_PATH`].
    pub fn with_spec_path(mut self, path: &str) -> Self {
        self.spec_path = path.to_owned();
        self
    }

    /// The users whose latest review of pull request `number` approves it at `head`, sorted.
    /// A review of an earlier commit does not count, and neither does an approval its author
    /// later replaced by a request for changes; comments leave a user's verdict as it was.
    pub async fn approvals(&self, repo: &str, number: u64, head: &str) -> Result<Vec<String>, VcsError> {
        self.approving(repo, number, head).await
    }

    async fn approving(&self, repo: &str, number: u64, head: &str) -> Result<Vec<String>, VcsError> {
        let base = format!("{}/pulls/{number}/reviews", repo_path(repo)?);
        let mut verdicts: BTreeMap<String, (String, String)> = BTreeMap::new();
        for page in 1.. {
            let answer = self.client.send(Method::GET, &format!("{base}?per_page=100&page={page}"), None).await?;
            let Value::Array(reviews) = answer.json()? else { return Err(bad_answer("a list of reviews")) };
            for review in &reviews {
                let (Some(user), Some(state)) = (
                    review.pointer("/user/login").and_then(Value::as_str),
                    review.get("state").and_then(Value::as_str),
                ) else {
                    continue;
                };
                if matches!(state, "APPROVED" | "CHANGES_REQUESTED" | "DISMISSED") {
                    let commit = review.get("commit_id").and_then(Value::as_str).unwrap_or_default();
                    verdicts.insert(user.to_owned(), (state.to_owned(), commit.to_owned()));
                }
            }
            if reviews.len() < 100 {
                break;
            }
        }
        Ok(verdicts
            .into_iter()
            .filter(|(_, (state, commit))| state == "APPROVED" && commit == head)
            .map(|(user, _)| user)
            .collect())
    }

    async fn comparison(&self, repo: &str, base: &str, head: &str) -> Result<Comparison, VcsError> {
        let path = format!("{}/compare/{}...{}?per_page=1", repo_path(repo)?, encode(base, true), encode(head, true));
        let answer = self.client.send(Method::GET, &path, None).await?.json()?;
        let count = |key: &str| answer.get(key).and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok());
        match (count("ahead_by"), count("behind_by")) {
            (Some(ahead), Some(behind)) => Ok(Comparison { ahead, behind }),
            _ => Err(bad_answer("ahead_by and behind_by")),
        }
    }
}

#[async_trait]
impl Vcs for GithubVcs {
    async fn read_spec(&self, repo: &str, rev: &str) -> Result<Option<String>, VcsError> {
        let path =
            format!("{}/contents/{}?ref={}", repo_path(repo)?, encode(&self.spec_path, true), encode(rev, false));
        let answer = match self.client.send(Method::GET, &path, None).await {
            Ok(answer) => answer.json()?,
            Err(e) if e.status == Some(404) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        // A directory (an array) or a symlink at the spec's path is no spec.
        if answer.get("type").and_then(Value::as_str) != Some("file") {
            return Err(VcsError::Permanent(format!("{} in {repo} at {rev} is not a file", self.spec_path)));
        }
        let content = answer.get("content").and_then(Value::as_str).ok_or_else(|| bad_answer("the file's content"))?;
        // GitHub wraps the base64 text every 60 characters.
        let compact: String = content.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map_err(|e| VcsError::Permanent(format!("the spec's content is not base64: {e}")))?;
        String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| VcsError::Permanent(format!("{} in {repo} at {rev} is not UTF-8", self.spec_path)))
    }

    async fn prepare_workspace(&self, repo: &str, rev: &str, dest: &Path) -> Result<(), VcsError> {
        if let Some(git) = &self.git {
            return self.fetch(git, repo, rev, dest).await;
        }
        let path = format!("{}/tarball/{}", repo_path(repo)?, encode(rev, true));
        let answer = self.client.send(Method::GET, &path, None).await?;
        if answer.body.len() > MAX_TARBALL {
            return Err(VcsError::Permanent(format!("the tarball of {repo} at {rev} is over 1 GiB")));
        }
        let dest = dest.to_owned();
        tokio::task::spawn_blocking(move || unpack(&answer.body, &dest))
            .await
            .map_err(|e| VcsError::Transient(format!("the unpacking task failed: {e}")))?
    }

    async fn compare(&self, repo: &str, base: &str, head: &str) -> Result<Comparison, VcsError> {
        self.comparison(repo, base, head).await
    }

    async fn fast_forward(&self, repo: &str, branch: &str, to: &str) -> Result<(), VcsError> {
        // The ref update wants a full commit id; resolving also fails early on a bad `to`.
        let to = self.resolve(repo, to).await?;
        let comparison = self.comparison(repo, branch, &to).await?;
        if !comparison.can_fast_forward() {
            return Err(VcsError::Permanent(format!(
                "{branch} in {repo} has {} commits that {to} lacks: not a fast-forward",
                comparison.behind
            )));
        }
        // `force: false` makes GitHub refuse anything else too, should the branch move between
        // the comparison and the update.
        let path = format!("{}/git/refs/heads/{}", repo_path(repo)?, encode(branch, true));
        match self.client.send(Method::PATCH, &path, Some(&json!({"sha": to, "force": false}))).await {
            Ok(_) => Ok(()),
            Err(e) if e.status == Some(422) && e.message.to_ascii_lowercase().contains("fast forward") => {
                Err(VcsError::Permanent(format!("{branch} in {repo} moved: {to} is no longer a fast-forward")))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn resolve(&self, repo: &str, rev: &str) -> Result<String, VcsError> {
        let path = format!("{}/commits/{}?per_page=1", repo_path(repo)?, encode(rev, true));
        let answer = self.client.send(Method::GET, &path, None).await?.json()?;
        answer.get("sha").and_then(Value::as_str).map(str::to_owned).ok_or_else(|| bad_answer("the commit's sha"))
    }

    async fn approving_reviews(&self, repo: &str, pull: u64, head: &str) -> Result<Option<Vec<String>>, VcsError> {
        self.approving(repo, pull, head).await.map(Some)
    }

    /// The GitHub account GitHub links to the commit's author (by the author's verified
    /// email), never the name written in the commit, which anyone can set. `None` when GitHub
    /// links no account.
    async fn author(&self, repo: &str, rev: &str) -> Result<Option<String>, VcsError> {
        let path = format!("{}/commits/{}?per_page=1", repo_path(repo)?, encode(rev, true));
        let answer = self.client.send(Method::GET, &path, None).await?.json()?;
        Ok(answer.pointer("/author/login").and_then(Value::as_str).map(str::to_owned))
    }

    async fn team_member(&self, repo: &str, team: &str, user: &str) -> Result<Option<bool>, VcsError> {
        // `org/team` names another organisation's team; a bare slug is a team of the
        // repository's owner.
        let (org, slug) = match team.split_once('/') {
            Some((org, slug)) => (org.to_owned(), slug.to_owned()),
            None => (repo.split('/').next().unwrap_or_default().to_owned(), team.to_owned()),
        };
        if org.is_empty() || slug.is_empty() {
            return Ok(Some(false));
        }
        self.member(repo, &org, &slug, user).await.map(Some)
    }

    async fn permission(&self, repo: &str, user: &str) -> Result<Permission, VcsError> {
        let path = format!("{}/collaborators/{}/permission", repo_path(repo)?, encode(user, false));
        let answer = match self.client.send(Method::GET, &path, None).await {
            Ok(answer) => answer.json()?,
            // GitHub answers 404 for a user it does not know: such a user has no access.
            Err(e) if e.status == Some(404) => return Ok(Permission::None),
            Err(e) => return Err(e.into()),
        };
        // The legacy `permission` field folds `maintain` into `write` and `triage` into `read`;
        // `role_name` is read first for the finer answer.
        let role = answer.get("role_name").and_then(Value::as_str);
        let legacy = answer.get("permission").and_then(Value::as_str);
        Ok(match role.or(legacy) {
            Some("admin") => Permission::Admin,
            Some("maintain" | "write") => Permission::Write,
            Some("triage" | "read") => Permission::Read,
            _ => match legacy {
                Some("admin") => Permission::Admin,
                Some("write") => Permission::Write,
                Some("read") => Permission::Read,
                _ => Permission::None,
            },
        })
    }
}

/// Runs one git command in `dir` with no configuration but the repository's own (no system or
/// user file, no prompt), and with `header` as an `http.extraHeader` given through the
/// environment of this process only.
async fn run_git(dir: &Path, args: &[&str], header: Option<&str>) -> Result<(), VcsError> {
    let mut command = tokio::process::Command::new("git");
    command
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env_remove("GIT_ASKPASS")
        .env_remove("SSH_ASKPASS")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match header {
        Some(header) => {
            command
                .env("GIT_CONFIG_COUNT", "1")
                .env("GIT_CONFIG_KEY_0", "http.extraHeader")
                .env("GIT_CONFIG_VALUE_0", header);
        }
        None => {
            command.env_remove("GIT_CONFIG_COUNT");
        }
    }
    let output = command
        .output()
        .await
        .map_err(|e| VcsError::Misconfigured(format!("cannot run git for the workspace: {e}")))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let message = format!("git {} failed: {}", args.first().copied().unwrap_or_default(), stderr.trim());
    // A network failure or a 5xx passes; a missing commit or a refused token does not.
    let lower = stderr.to_ascii_lowercase();
    // A refused token shows as git asking for a user name, which it may not.
    let refused = ["authentication failed", "could not read username", "terminal prompts disabled", "403", "401"];
    Err(if refused.iter().any(|r| lower.contains(r)) {
        VcsError::Misconfigured(message)
    } else if lower.contains("not our ref") || lower.contains("couldn't find remote ref") || lower.contains("not found")
    {
        VcsError::Permanent(message)
    } else {
        VcsError::Transient(message)
    })
}

/// Unpacks a codeload tarball into `dest`, dropping its single top directory. Entries that would
/// land outside `dest` (absolute paths, `..`) and links are refused: the archive comes from the
/// network and a repository's content is not trusted.
fn unpack(gz: &[u8], dest: &Path) -> Result<(), VcsError> {
    let bad = |e: std::io::Error| VcsError::Permanent(format!("cannot unpack the tarball: {e}"));
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(gz));
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.into_owned();
        let mut components = path.components();
        components.next();
        let relative: PathBuf = components.as_path().to_owned();
        if relative.as_os_str().is_empty() {
            continue;
        }
        if !relative.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(VcsError::Permanent(format!("the tarball holds an unsafe path: {}", path.display())));
        }
        let target = dest.join(&relative);
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            std::fs::create_dir_all(&target).map_err(bad)?;
        } else if kind.is_file() {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(bad)?;
            }
            let mode = entry.header().mode().unwrap_or(0o644);
            let mut data = Vec::new();
            entry.read_to_end(&mut data).map_err(bad)?;
            std::fs::write(&target, data).map_err(bad)?;
            set_mode(&target, mode).map_err(bad)?;
        } else if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            // Codeload puts the commit id in a global header; nothing to write.
        } else {
            tracing::debug!(path = %path.display(), "skipped a tarball entry that is not a file or directory");
        }
    }
    Ok(())
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // Only the executable bits matter for a build; nothing is made setuid or world-writable.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(if mode & 0o111 != 0 { 0o755 } else { 0o644 }))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> std::io::Result<()> {
    Ok(())
}
