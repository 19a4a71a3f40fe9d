//! The trust policy: which secrets a build gets, who a person is, who may pass a gate, and
//! which manual triggers are allowed, with the words each refusal gives.

use std::collections::BTreeMap;

use cib_core::policy::{
    BuildFacts, GateFacts, Identity, People, Person, SecretDenied, SecretScope, check_gate_approval, check_secret,
    check_trigger, secret_allowed,
};
use cib_core::spec::{self, Action, EventKind, Gate, Glob};
use cib_core::workflow::{Refusal, explain};

fn glob(text: &str) -> Glob {
    Glob::parse(text).expect("glob")
}

fn build<'a>(repo: &'a str, branch: &'a str, pipeline: &'a str) -> BuildFacts<'a> {
    BuildFacts { repo, branch: Some(branch), pull_request: false, pipeline, environment: None, trusted: true }
}

#[test]
fn a_secret_reaches_only_its_repository() {
    let scope = SecretScope::repo("acme/a");
    assert!(secret_allowed(&scope, &build("acme/a", "feature", "test"), true));
    assert_eq!(
        check_secret(&scope, &build("acme/b", "feature", "test"), true),
        Err(vec![SecretDenied::OtherRepository { repo: "acme/a".into() }])
    );
}

#[test]
fn a_production_secret_never_reaches_a_test_pipeline_on_a_feature_branch() {
    let scope = SecretScope {
        branches: vec![glob("production")],
        pipelines: vec!["production".into()],
        ..SecretScope::repo("acme/a")
    };
    assert!(secret_allowed(&scope, &build("acme/a", "production", "production"), true));
    let denied = check_secret(&scope, &build("acme/a", "feature/x", "test"), true).expect_err("denied");
    assert_eq!(
        denied,
        [SecretDenied::Branch { branch: Some("feature/x".into()) }, SecretDenied::Pipeline { pipeline: "test".into() }]
    );
    let words: Vec<String> = denied.iter().map(ToString::to_string).collect();
    assert_eq!(words, ["branch 'feature/x' is not in its scope", "pipeline 'test' is not in its scope"]);
}

#[test]
fn a_branch_scope_never_matches_a_pull_request_whatever_its_branch_is_called() {
    let scope = SecretScope { branches: vec![glob("production")], ..SecretScope::repo("acme/a") };
    let pr = BuildFacts { pull_request: true, ..build("acme/a", "production", "test") };
    assert_eq!(check_secret(&scope, &pr, true), Err(vec![SecretDenied::Branch { branch: None }]));
}

#[test]
fn untrusted_builds_and_steps_that_do_not_ask_get_nothing() {
    let scope = SecretScope::repo("acme/a");
    let fork = BuildFacts { trusted: false, ..build("acme/a", "feature", "test") };
    assert_eq!(check_secret(&scope, &fork, true), Err(vec![SecretDenied::Untrusted]));
    assert_eq!(check_secret(&scope, &build("acme/a", "feature", "test"), false), Err(vec![SecretDenied::NotAsked]));
}

#[test]
fn an_environment_scope_needs_that_environment() {
    let scope = SecretScope { environments: vec!["staging".into()], ..SecretScope::repo("acme/a") };
    let staging = BuildFacts { environment: Some("staging"), ..build("acme/a", "master", "staging") };
    assert!(secret_allowed(&scope, &staging, true));
    let test = build("acme/a", "master", "test");
    assert_eq!(check_secret(&scope, &test, true), Err(vec![SecretDenied::Environment { environment: None }]));
}

#[test]
fn a_scope_round_trips_through_json_with_its_globs() {
    let scope = SecretScope { branches: vec![glob("release-*")], ..SecretScope::repo("acme/a") };
    let json = serde_json::to_string(&scope).expect("json");
    assert_eq!(json, r#"{"repo":"acme/a","branches":["release-*"]}"#);
    assert_eq!(serde_json::from_str::<SecretScope>(&json).expect("back"), scope);
}

fn alice() -> Person {
    Person {
        name: "alice".into(),
        github: Some("Alice-GH".into()),
        tokens: vec!["alice-laptop".into(), "alice-ci".into()],
        slack: Some("U123".into()),
        zulip: None,
        teams: vec!["release".into()],
    }
}

#[test]
fn every_identity_of_a_person_finds_the_person() {
    let people = People::new(vec![alice()]).expect("directory");
    for identity in [
        Identity::Github("alice-gh".into()),
        Identity::Github("ALICE-GH".into()),
        Identity::Token("alice-laptop".into()),
        Identity::Token("alice-ci".into()),
        Identity::Slack("U123".into()),
    ] {
        assert_eq!(people.person_id(&identity), "alice", "{identity}");
    }
    assert_eq!(people.teams(&Identity::Token("alice-ci".into())), ["release"]);
    // Unknown identities are people of their own, named so they cannot pass for a configured one.
    assert_eq!(people.person_id(&Identity::Github("Mallory".into())), "github:mallory");
    assert_eq!(people.person_id(&Identity::Token("alice".into())), "token:alice");
    assert!(people.find(&Identity::Zulip("U123".into())).is_none(), "a Slack id is not a Zulip id");
}

#[test]
fn an_identity_claimed_by_two_people_is_refused() {
    let bob = Person { name: "bob".into(), github: Some("alice-gh".into()), tokens: vec![], slack: None, ..alice() };
    let twin = Person { tokens: vec![], github: None, slack: None, ..alice() };
    let problems = People::new(vec![alice(), bob, twin]).expect_err("refused");
    assert_eq!(problems, ["github:alice-gh belongs to both 'alice' and 'bob'", "two people are named 'alice'"]);
}

fn gate(text: &str) -> Gate {
    let source = format!(
        "pipelines:\n  staging:\n    steps:\n      - {{ name: deploy, image: busybox, commands: [x] }}\n      - {{ name: ok, gate: {text} }}\n"
    );
    let spec = spec::parse(&source).expect("valid spec");
    match &spec.pipelines[0].steps[1].action {
        Action::Gate(g) => g.clone(),
        other => panic!("not a gate: {other:?}"),
    }
}

fn facts<'a>(gate: &'a Gate, login: &'a str, person: &'a str) -> GateFacts<'a> {
    GateFacts {
        gate,
        person,
        login,
        teams: &[],
        can_write: true,
        approve: true,
        build_actor: Some("dana"),
        commit_author: Some("erin"),
        approved_by: &[],
    }
}

#[test]
fn a_gate_refuses_the_build_actor_and_the_author_unless_it_allows_self_approval() {
    let strict = gate("{ kind: approval }");
    assert_eq!(check_gate_approval(&facts(&strict, "carol", "carol")), Ok(()));
    assert_eq!(
        check_gate_approval(&facts(&strict, "dana-token", "dana")),
        Err(vec![Refusal::OwnBuild { by: "dana-token".into() }])
    );
    let both = GateFacts { commit_author: Some("dana"), ..facts(&strict, "dana", "dana") };
    let refused = check_gate_approval(&both).expect_err("refused");
    insta::assert_snapshot!(explain("approve this gate", &refused), @r"
    cib cannot approve this gate:
    - the person who started the build may not approve it (the gate has no self_approval)
    - the commit's author may not approve it (the gate has no self_approval)
    ");
    let relaxed = gate("{ kind: approval, self_approval: true }");
    assert_eq!(check_gate_approval(&facts(&relaxed, "dana", "dana")), Ok(()));
    assert_eq!(check_gate_approval(&facts(&relaxed, "erin", "erin")), Ok(()));
}

#[test]
fn a_gate_takes_one_approval_per_person_and_only_from_those_it_asks() {
    let g = gate("{ kind: approval, approvals: 2, from: { users: [alice, bob], teams: [release] } }");
    let already = vec!["alice".to_owned()];
    let again = GateFacts { approved_by: &already, ..facts(&g, "alice-gh", "alice") };
    assert_eq!(check_gate_approval(&again), Err(vec![Refusal::AlreadyApproved { by: "alice-gh".into() }]));
    // A user listed by their person's name may approve under any identity.
    assert_eq!(check_gate_approval(&facts(&g, "alice-gh", "alice")), Ok(()));
    let teams = vec!["release".to_owned()];
    assert_eq!(check_gate_approval(&GateFacts { teams: &teams, ..facts(&g, "carol", "carol") }), Ok(()));
    assert_eq!(
        check_gate_approval(&facts(&g, "mallory", "mallory")),
        Err(vec![Refusal::NotAnApprover { by: "mallory".into() }])
    );
    // Write access alone is not enough when the gate names its people.
    let writer = GateFacts { can_write: true, approve: false, ..facts(&g, "mallory", "mallory") };
    assert_eq!(check_gate_approval(&writer), Err(vec![Refusal::NotAnApprover { by: "mallory".into() }]));
}

#[test]
fn a_hold_gate_may_be_passed_by_the_person_who_tests_it() {
    let hold = gate("{ kind: hold }");
    assert_eq!(check_gate_approval(&facts(&hold, "dana", "dana")), Ok(()));
}

const DEPLOY: &str = r#"
pipelines:
  deploy:
    on: { manual: { branches: [master] } }
    env: { PATH: /usr/bin }
    inputs:
      version: { type: string, required: true, description: The version to deploy. }
      dry_run: { type: bool, default: false }
      region: { type: choice, options: [eu, us], default: eu }
      note: { type: string }
    steps: [{ name: go, image: busybox, commands: ["./deploy.sh"] }]
  test:
    steps: [{ name: unit, image: busybox, commands: [make test] }]
"#;

fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

#[test]
fn a_manual_trigger_gets_its_inputs_as_input_variables_with_defaults() {
    let spec = spec::parse(DEPLOY).expect("valid spec");
    let deploy = spec.pipeline("deploy").expect("deploy");
    let env = check_trigger(deploy, EventKind::Manual, Some("master"), &vars(&[("version", "1.2.3")]));
    assert_eq!(env, Ok(vars(&[("INPUT_DRY_RUN", "false"), ("INPUT_REGION", "eu"), ("INPUT_VERSION", "1.2.3")])));
    let env = check_trigger(
        deploy,
        EventKind::Manual,
        None,
        &vars(&[("version", "2"), ("dry_run", "true"), ("region", "us"), ("note", "hi")]),
    );
    assert_eq!(
        env,
        Ok(vars(&[("INPUT_DRY_RUN", "true"), ("INPUT_NOTE", "hi"), ("INPUT_REGION", "us"), ("INPUT_VERSION", "2")]))
    );
}

#[test]
fn a_trigger_is_refused_for_every_reason_at_once() {
    let spec = spec::parse(DEPLOY).expect("valid spec");
    let deploy = spec.pipeline("deploy").expect("deploy");
    let given = vars(&[("PATH", "/tmp/evil"), ("dry_run", "yes"), ("region", "mars")]);
    let refused = check_trigger(deploy, EventKind::Push, Some("feature"), &given).expect_err("refused");
    insta::assert_snapshot!(explain("start pipeline 'deploy'", &refused), @r"
    cib cannot start pipeline 'deploy':
    - pipeline 'deploy' may not be started by hand on branch 'feature'
    - a build started by hand is a 'manual' event, not 'push'
    - 'PATH' is not an input of this pipeline; its inputs are version, dry_run, region, note
    - input 'version' is required
    - input 'dry_run': 'yes' is not a bool: use true or false
    - input 'region': 'mars' is not one of eu, us
    ");
    let test = spec.pipeline("test").expect("test");
    let refused = check_trigger(test, EventKind::Manual, None, &vars(&[("x", "1")])).expect_err("refused");
    insta::assert_snapshot!(explain("start pipeline 'test'", &refused), @r"
    cib cannot start pipeline 'test':
    - pipeline 'test' has no 'manual' trigger, so it cannot be started by hand
    - 'x' is not an input of this pipeline, which declares none
    ");
}

#[test]
fn cache_eviction_takes_the_least_recently_used_until_the_rest_fit() {
    use cib_core::policy::{CacheUse, caches_to_evict};
    let cache = |key: &str, bytes: u64, used: u64| CacheUse {
        namespace: "trusted".into(),
        key: key.into(),
        bytes,
        last_used: cib_core::time::Timestamp(used),
    };
    let caches = [cache("a", 100, 30), cache("b", 100, 10), cache("c", 100, 20), cache("d", 100, 40)];
    assert_eq!(caches_to_evict(&caches, 400), Vec::<usize>::new(), "within the budget nothing goes");
    assert_eq!(caches_to_evict(&caches, 300), [1], "b was used least recently");
    assert_eq!(caches_to_evict(&caches, 150), [1, 2, 0]);
    // The most recently used cache stays even alone over the budget.
    assert_eq!(caches_to_evict(&caches, 0), [1, 2, 0]);
    assert_eq!(caches_to_evict(&[cache("big", 1_000, 5)], 10), Vec::<usize>::new());
    assert_eq!(caches_to_evict(&[], 10), Vec::<usize>::new());
}
