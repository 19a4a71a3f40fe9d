//! Trust policy: which secrets a build gets, who a person is across their identities, who may
//! pass a gate, and which pipelines a person may start by hand with which inputs. Pure, like
//! `workflow`: callers gather the facts and get back a yes, or every reason for a no, so the
//! API, chat, comments and the machine all give the same answer in the same words.

// Pure code: no clock, environment, files or threads (see clippy.toml).
#![deny(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::spec::{EventKind, Gate, GateKind, Glob, Pipeline};
use crate::time::Timestamp;
use crate::workflow::Refusal;

// ---- secrets ----------------------------------------------------------------------------------

/// Where a secret may go. The repository is required; every other list, when not empty,
/// narrows it further.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretScope {
    pub repo: String,
    /// Branch globs (`production` for a deploy key). Empty: any branch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub branches: Vec<Glob>,
    /// Pipeline names. Empty: any pipeline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pipelines: Vec<String>,
    /// Environments (a deploy pipeline or a branch cib moves). Empty: any, or none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environments: Vec<String>,
}

impl SecretScope {
    /// A scope of the whole repository.
    pub fn repo(repo: impl Into<String>) -> Self {
        SecretScope { repo: repo.into(), branches: Vec::new(), pipelines: Vec::new(), environments: Vec::new() }
    }
}

/// What a secret's scope is checked against: the build, as the machine knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildFacts<'a> {
    pub repo: &'a str,
    /// The branch built; `None` for a tag or a bare commit.
    pub branch: Option<&'a str>,
    /// A pull request's build. Its head branch is named by whoever opened it, so a branch
    /// scope never matches it: a branch called `production` in a fork is not production.
    pub pull_request: bool,
    pub pipeline: &'a str,
    /// The environment the build deploys to, if any.
    pub environment: Option<&'a str>,
    /// False for a fork's pull request that no maintainer approved at its head.
    pub trusted: bool,
}

/// One reason a build does not get a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum SecretDenied {
    /// The secret belongs to another repository.
    OtherRepository { repo: String },
    /// The build's branch is not one of the scope's.
    Branch { branch: Option<String> },
    /// The build's pipeline is not one of the scope's.
    Pipeline { pipeline: String },
    /// The build does not deploy to one of the scope's environments.
    Environment { environment: Option<String> },
    /// The build runs code nobody trusted yet.
    Untrusted,
    /// No step of the build asks for it.
    NotAsked,
}

impl fmt::Display for SecretDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretDenied::OtherRepository { repo } => write!(f, "it belongs to {repo}"),
            SecretDenied::Branch { branch: Some(b) } => write!(f, "branch '{b}' is not in its scope"),
            SecretDenied::Branch { branch: None } => {
                f.write_str("it is scoped to branches, and this build is not of a branch cib can vouch for")
            }
            SecretDenied::Pipeline { pipeline } => write!(f, "pipeline '{pipeline}' is not in its scope"),
            SecretDenied::Environment { environment: Some(e) } => write!(f, "environment '{e}' is not in its scope"),
            SecretDenied::Environment { environment: None } => {
                f.write_str("it is scoped to environments, and this build deploys to none")
            }
            SecretDenied::Untrusted => f.write_str("the build runs code no maintainer has trusted"),
            SecretDenied::NotAsked => f.write_str("no step asks for it"),
        }
    }
}

/// Whether a build gets a secret: the scope matches its repository, branch, pipeline and
/// environment, the build is trusted, and a step asks for it (`asked`). Every reason for a no.
pub fn check_secret(scope: &SecretScope, facts: &BuildFacts<'_>, asked: bool) -> Result<(), Vec<SecretDenied>> {
    let mut out = Vec::new();
    if scope.repo != facts.repo {
        out.push(SecretDenied::OtherRepository { repo: scope.repo.clone() });
    }
    if !scope.branches.is_empty() {
        let branch = facts.branch.filter(|_| !facts.pull_request);
        if !branch.is_some_and(|b| scope.branches.iter().any(|g| g.is_match(b))) {
            out.push(SecretDenied::Branch { branch: branch.map(str::to_owned) });
        }
    }
    if !scope.pipelines.is_empty() && !scope.pipelines.iter().any(|p| p == facts.pipeline) {
        out.push(SecretDenied::Pipeline { pipeline: facts.pipeline.to_owned() });
    }
    if !scope.environments.is_empty() && !facts.environment.is_some_and(|e| scope.environments.iter().any(|s| s == e)) {
        out.push(SecretDenied::Environment { environment: facts.environment.map(str::to_owned) });
    }
    if !facts.trusted {
        out.push(SecretDenied::Untrusted);
    }
    if !asked {
        out.push(SecretDenied::NotAsked);
    }
    if out.is_empty() { Ok(()) } else { Err(out) }
}

/// [`check_secret`] as a yes or no.
pub fn secret_allowed(scope: &SecretScope, facts: &BuildFacts<'_>, asked: bool) -> bool {
    check_secret(scope, facts, asked).is_ok()
}

// ---- people -----------------------------------------------------------------------------------

/// One person and every identity they act under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Person {
    /// The person's name in cib: what decisions are recorded against.
    pub name: String,
    #[serde(default)]
    pub github: Option<String>,
    /// Names of API tokens.
    #[serde(default)]
    pub tokens: Vec<String>,
    #[serde(default)]
    pub slack: Option<String>,
    #[serde(default)]
    pub zulip: Option<String>,
    #[serde(default)]
    pub teams: Vec<String>,
}

/// An identity as an authenticated source gives it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum Identity {
    /// An API token, by its configured name.
    Token(String),
    /// A GitHub login.
    Github(String),
    /// A Slack user id.
    Slack(String),
    /// A Zulip user id.
    Zulip(String),
}

impl Identity {
    /// GitHub logins are case-insensitive, so `Alice` and `alice` are one identity.
    fn normalized(&self) -> Identity {
        match self {
            Identity::Github(login) => Identity::Github(login.to_ascii_lowercase()),
            other => other.clone(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Token(id) => write!(f, "token:{id}"),
            Identity::Github(id) => write!(f, "github:{id}"),
            Identity::Slack(id) => write!(f, "slack:{id}"),
            Identity::Zulip(id) => write!(f, "zulip:{id}"),
        }
    }
}

/// The people directory: from any identity to the one person behind it, so that two
/// identities of one person count once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct People {
    people: Vec<Person>,
    by_identity: BTreeMap<Identity, usize>,
}

impl People {
    /// A directory of these people. Refused, with every problem, when two people share a name
    /// or claim the same identity: then an approval could not be pinned on one person.
    pub fn new(people: Vec<Person>) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let mut by_identity = BTreeMap::new();
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, p) in people.iter().enumerate() {
            if p.name.trim().is_empty() {
                problems.push(format!("person #{} has no name", i + 1));
            }
            if names.insert(&p.name, i).is_some() {
                problems.push(format!("two people are named '{}'", p.name));
            }
            let identities = p
                .github
                .iter()
                .map(|g| Identity::Github(g.clone()))
                .chain(p.tokens.iter().map(|t| Identity::Token(t.clone())))
                .chain(p.slack.iter().map(|s| Identity::Slack(s.clone())))
                .chain(p.zulip.iter().map(|z| Identity::Zulip(z.clone())));
            for identity in identities {
                if let Some(other) = by_identity.insert(identity.normalized(), i)
                    && other != i
                {
                    problems.push(format!("{identity} belongs to both '{}' and '{}'", people[other].name, p.name));
                }
            }
        }
        if problems.is_empty() { Ok(People { people, by_identity }) } else { Err(problems) }
    }

    /// The person behind an identity, when the directory knows them.
    pub fn find(&self, identity: &Identity) -> Option<&Person> {
        self.by_identity.get(&identity.normalized()).map(|&i| &self.people[i])
    }

    /// What a decision by this identity is recorded against: the person's name, or for an
    /// identity nobody claimed, the identity itself (`github:alice`), which is a person of its
    /// own and can never be mistaken for a configured name.
    pub fn person_id(&self, identity: &Identity) -> String {
        match self.find(identity) {
            Some(p) => p.name.clone(),
            None => identity.normalized().to_string(),
        }
    }

    /// The teams of the person behind an identity, from the directory.
    pub fn teams(&self, identity: &Identity) -> &[String] {
        self.find(identity).map(|p| p.teams.as_slice()).unwrap_or_default()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Person> {
        self.people.iter()
    }
}

// ---- gates ------------------------------------------------------------------------------------

/// The facts of one decision at a gate.
#[derive(Debug, Clone, Copy)]
pub struct GateFacts<'a> {
    pub gate: &'a Gate,
    /// The person deciding, as the directory names them (the login when it does not).
    pub person: &'a str,
    /// The deciding identity as authenticated: a login or a token name.
    pub login: &'a str,
    /// The decider's teams, from the authenticated source.
    pub teams: &'a [String],
    /// Write access to the repository, from the forge's permission API.
    pub can_write: bool,
    /// An approval (true) or a rejection.
    pub approve: bool,
    /// The person who started the build, when known.
    pub build_actor: Option<&'a str>,
    /// The person who wrote the commit, when known.
    pub commit_author: Option<&'a str>,
    /// The people whose approvals the gate already counted.
    pub approved_by: &'a [String],
}

/// Whether a decision at a gate counts. Only people the gate asks may answer; an approval gate
/// takes no approval from the person who started the build or wrote the commit (unless the
/// gate says `self_approval: true`), and one approval per person, whichever identity they use.
///
/// A rejection is always taken from an allowed person, even the author: stopping one's own
/// deploy is never a risk. Hold gates are passed by whoever tests by hand, often the author,
/// so the exclusion applies to approval gates only.
pub fn check_gate_approval(facts: &GateFacts<'_>) -> Result<(), Vec<Refusal>> {
    let gate = facts.gate;
    let mut out = Vec::new();
    let allowed = if gate.from.users.is_empty() && gate.from.teams.is_empty() {
        facts.can_write
    } else {
        gate.from.users.iter().any(|u| u == facts.login || u == facts.person)
            || facts.teams.iter().any(|t| gate.from.teams.contains(t))
    };
    if !allowed {
        out.push(Refusal::NotAnApprover { by: facts.login.to_owned() });
    }
    if facts.approve && gate.kind == GateKind::Approval {
        // The build's actor may be recorded under a login or a person's name, depending on
        // the frontend that started it: either counts as the same person.
        let me = |who: Option<&str>| who.is_some_and(|w| w == facts.person || w == facts.login);
        if !gate.self_approval {
            if me(facts.build_actor) {
                out.push(Refusal::OwnBuild { by: facts.login.to_owned() });
            }
            if me(facts.commit_author) {
                out.push(Refusal::OwnCommit { by: facts.login.to_owned() });
            }
        }
        if facts.approved_by.iter().any(|p| p == facts.person) {
            out.push(Refusal::AlreadyApproved { by: facts.login.to_owned() });
        }
    }
    if out.is_empty() { Ok(()) } else { Err(out) }
}

// ---- manual triggers --------------------------------------------------------------------------

/// Whether a person may start `pipeline` by hand with the event kind and variables given, on
/// `branch`. Yes comes with the step variables to pass: each declared input as `INPUT_<NAME>`,
/// defaults filled in. Only those names are ever returned, so a trigger cannot change the
/// spec's own variables (`PATH`, say).
pub fn check_trigger(
    pipeline: &Pipeline,
    event: EventKind,
    branch: Option<&str>,
    given: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, Vec<Refusal>> {
    let mut out = Vec::new();
    match &pipeline.triggers.manual {
        None => out.push(Refusal::NotManual { pipeline: pipeline.name.clone() }),
        Some(filter) => {
            if let Some(b) = branch
                && !filter.matches(b)
            {
                out.push(Refusal::BranchNotAllowed { pipeline: pipeline.name.clone(), branch: b.to_owned() });
            }
        }
    }
    if event != EventKind::Manual {
        let event = serde_json::to_value(event).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        out.push(Refusal::NotManualEvent { event });
    }
    let allowed: Vec<String> = pipeline.inputs.iter().map(|i| i.name.clone()).collect();
    for name in given.keys() {
        if !pipeline.inputs.iter().any(|i| &i.name == name) {
            out.push(Refusal::UnknownInput { name: name.clone(), allowed: allowed.clone() });
        }
    }
    let mut env = BTreeMap::new();
    for input in &pipeline.inputs {
        let value = match (given.get(&input.name), &input.default) {
            (Some(v), _) => {
                if let Err(why) = input.check(v) {
                    out.push(Refusal::InvalidInput { name: input.name.clone(), why });
                    continue;
                }
                v.clone()
            }
            (None, _) if input.required => {
                out.push(Refusal::MissingInput { name: input.name.clone() });
                continue;
            }
            (None, Some(default)) => default.clone(),
            // An optional input without a default is simply absent, so a step can tell.
            (None, None) => continue,
        };
        env.insert(input.env_name(), value);
    }
    if out.is_empty() { Ok(env) } else { Err(out) }
}

/// Where a build's caches are written and read from (issue 19). Only a trusted build that is
/// not a pull request (a push, a promotion, a schedule, a trigger by hand) writes the shared
/// namespace `trusted`; a pull request writes its own (`pr-<n>`, or `fork-pr-<n>` while
/// untrusted), and any other untrusted build one of its commit. Every build reads its own
/// namespace first, then `trusted`: a fork can use what trusted builds cached, and never writes
/// what a trusted build reads.
pub fn cache_namespaces(context: &crate::pipeline::BuildContext) -> (String, Vec<String>) {
    const TRUSTED: &str = "trusted";
    let own = match (context.pull_request, context.trusted) {
        (None, true) => return (TRUSTED.to_owned(), vec![TRUSTED.to_owned()]),
        (Some(n), true) => format!("pr-{n}"),
        (Some(n), false) => format!("fork-pr-{n}"),
        (None, false) => format!("untrusted-{}", context.commit),
    };
    (own.clone(), vec![own, TRUSTED.to_owned()])
}

/// A kept cache of one repository, as eviction sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheUse {
    pub namespace: String,
    pub key: String,
    /// Its size in bytes, as saved.
    pub bytes: u64,
    /// When a build last restored it, else when it was saved.
    pub last_used: Timestamp,
}

/// Which of a repository's caches go so that the rest fit in `budget` bytes: the least recently
/// used first (ties: the older key first). The most recently used cache always stays, even
/// alone over the budget, so that the cache a build just saved or restored is there for the
/// next one. Answers indexes into `caches`.
pub fn caches_to_evict(caches: &[CacheUse], budget: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..caches.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&caches[a], &caches[b]);
        (a.last_used, &a.namespace, &a.key).cmp(&(b.last_used, &b.namespace, &b.key))
    });
    let mut total: u64 = caches.iter().map(|c| c.bytes).sum();
    let mut out = Vec::new();
    // The newest is the last of the order; it is never taken.
    for &i in order.iter().take(order.len().saturating_sub(1)) {
        if total <= budget {
            break;
        }
        total -= caches[i].bytes;
        out.push(i);
    }
    out
}
