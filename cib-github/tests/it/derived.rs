//! Cases the recordings lack (forks, merges, base changes, `/cib` commands, long pushes), made by
//! editing a recorded payload so that everything but the field under test stays as GitHub sends it.

use cib_core::forge::{Command, ForgeEvent, PullRequest, PullRequestAction, Push};
use serde_json::{Value, json};

use super::{fixture, parse_value};

/// Sets the value at a JSON pointer that must already exist (or whose parent object must).
fn set(payload: &mut Value, pointer: &str, value: Value) {
    if let Some(slot) = payload.pointer_mut(pointer) {
        *slot = value;
        return;
    }
    let (parent, key) = pointer.rsplit_once('/').expect("a pointer has a slash");
    let object = payload.pointer_mut(parent).and_then(Value::as_object_mut);
    object.unwrap_or_else(|| panic!("no object at {parent}")).insert(key.to_owned(), value);
}

fn remove(payload: &mut Value, pointer: &str) {
    let (parent, key) = pointer.rsplit_once('/').expect("a pointer has a slash");
    let object = payload.pointer_mut(parent).and_then(Value::as_object_mut);
    object.unwrap_or_else(|| panic!("no object at {parent}")).remove(key).unwrap_or_else(|| panic!("no {pointer}"));
}

fn pull_request(payload: &Value) -> PullRequest {
    match parse_value("pull_request", payload) {
        Ok(ForgeEvent::PullRequest(pr)) => pr,
        other => panic!("expected a pull request, got {other:?}"),
    }
}

fn push(payload: &Value) -> Push {
    match parse_value("push", payload) {
        Ok(ForgeEvent::Push(push)) => push,
        other => panic!("expected a push, got {other:?}"),
    }
}

fn command(payload: &Value) -> Command {
    match parse_value("issue_comment", payload) {
        Ok(ForgeEvent::Command(command)) => command,
        other => panic!("expected a command, got {other:?}"),
    }
}

fn ignored(event: &str, action: Option<&str>) -> ForgeEvent {
    ForgeEvent::Ignored { event: event.to_owned(), action: action.map(str::to_owned) }
}

/// A recorded `opened` pull request within one repository (Codertocat/Hello-World).
fn opened() -> Value {
    let payload = fixture("pull_request", "dotcom-00");
    assert_eq!(payload["action"], "opened");
    payload
}

// Pull requests: forks.

#[test]
fn a_head_in_another_repository_is_a_fork() {
    let mut payload = opened();
    set(&mut payload, "/pull_request/head/repo/full_name", json!("mallory/Hello-World"));
    let pr = pull_request(&payload);
    assert!(pr.from_fork);
    assert_eq!(pr.head_repo.as_deref(), Some("mallory/Hello-World"));
    assert_eq!(pr.repo, "Codertocat/Hello-World");
}

#[test]
fn a_deleted_head_repository_counts_as_a_fork() {
    let mut payload = opened();
    set(&mut payload, "/pull_request/head/repo", Value::Null);
    let pr = pull_request(&payload);
    assert!(pr.from_fork);
    assert_eq!(pr.head_repo, None);
}

#[test]
fn names_do_not_make_a_fork_look_trusted() {
    // A fork whose branch, label and owner's login all imitate the base: only the repository
    // GitHub names for the head decides.
    let mut payload = opened();
    set(&mut payload, "/pull_request/head/repo/full_name", json!("Codertocat/Hello-World-fork"));
    set(&mut payload, "/pull_request/head/ref", json!("master"));
    set(&mut payload, "/pull_request/head/label", json!("Codertocat:master"));
    set(&mut payload, "/pull_request/head/user/login", json!("Codertocat"));
    assert!(pull_request(&payload).from_fork);
}

#[test]
fn a_branch_in_the_same_repository_is_not_a_fork_whoever_pushed_it() {
    let mut payload = opened();
    set(&mut payload, "/pull_request/user/login", json!("first-time-contributor"));
    set(&mut payload, "/pull_request/head/ref", json!("untrusted-looking-name"));
    let pr = pull_request(&payload);
    assert!(!pr.from_fork);
    assert_eq!(pr.author, "first-time-contributor");
}

// Pull requests: actions.

#[test]
fn closed_by_merging_is_merged() {
    let mut payload = fixture("pull_request", "dotcom-03");
    assert_eq!(payload["action"], "closed");
    assert_eq!(pull_request(&payload).action, PullRequestAction::Closed);
    set(&mut payload, "/pull_request/merged", json!(true));
    assert_eq!(pull_request(&payload).action, PullRequestAction::Merged);
    set(&mut payload, "/pull_request/merged", Value::Null);
    assert_eq!(pull_request(&payload).action, PullRequestAction::Closed);
}

#[test]
fn editing_the_base_is_base_changed_and_other_edits_are_ignored() {
    let mut payload = opened();
    set(&mut payload, "/action", json!("edited"));
    set(&mut payload, "/changes", json!({ "base": { "ref": { "from": "develop" }, "sha": { "from": "0123abc" } } }));
    assert_eq!(pull_request(&payload).action, PullRequestAction::BaseChanged);

    set(&mut payload, "/changes", json!({ "title": { "from": "An older title" } }));
    assert_eq!(parse_value("pull_request", &payload), Ok(ignored("pull_request", Some("edited"))));
    remove(&mut payload, "/changes");
    assert_eq!(parse_value("pull_request", &payload), Ok(ignored("pull_request", Some("edited"))));
}

#[test]
fn acted_on_actions_map_one_to_one() {
    for (action, expected) in [
        ("opened", PullRequestAction::Opened),
        ("synchronize", PullRequestAction::Synchronize),
        ("reopened", PullRequestAction::Reopened),
    ] {
        let mut payload = opened();
        set(&mut payload, "/action", json!(action));
        assert_eq!(pull_request(&payload).action, expected);
    }
}

#[test]
fn ignored_actions_need_no_other_field() {
    // `labeled` is not acted on, so a payload without a pull request is still a well-formed delivery.
    let payload = json!({ "action": "labeled" });
    assert_eq!(parse_value("pull_request", &payload), Ok(ignored("pull_request", Some("labeled"))));
}

// Comments.

/// A recorded `created` comment on an issue (not a pull request).
fn comment(body: &str) -> Value {
    let mut payload = fixture("issue_comment", "dotcom-00");
    assert_eq!(payload["action"], "created");
    set(&mut payload, "/comment/body", json!(body));
    payload
}

#[test]
fn a_cib_line_in_a_new_comment_is_a_command() {
    let payload = comment("Thanks, looks good.\r\n/cib promote v1.2.3 \r\n");
    assert_eq!(
        command(&payload),
        Command {
            repo: "Codertocat/Hello-World".into(),
            number: 1,
            is_pull_request: false,
            sender: "Codertocat".into(),
            comment_id: 492700400,
            words: vec!["promote".into(), "v1.2.3".into()],
        }
    );
}

#[test]
fn a_comment_on_a_pull_request_says_so() {
    let mut payload = comment("/cib merge");
    set(
        &mut payload,
        "/issue/pull_request",
        json!({ "url": "https://api.github.com/repos/Codertocat/Hello-World/pulls/1" }),
    );
    assert!(command(&payload).is_pull_request);
    set(&mut payload, "/issue/pull_request", Value::Null);
    assert!(!command(&payload).is_pull_request);
}

#[test]
fn comments_without_a_command_line_are_ignored() {
    for body in ["LGTM", "please /cib merge", "/cibmerge", "> /cib merge", ""] {
        assert_eq!(
            parse_value("issue_comment", &comment(body)),
            Ok(ignored("issue_comment", Some("created"))),
            "{body:?}"
        );
    }
}

#[test]
fn edited_and_deleted_comments_are_not_commands() {
    for action in ["edited", "deleted"] {
        let mut payload = comment("/cib merge");
        set(&mut payload, "/action", json!(action));
        assert_eq!(parse_value("issue_comment", &payload), Ok(ignored("issue_comment", Some(action))));
    }
}

// Pushes.

/// The recorded push that created `master` with one commit, turned into a plain fast-forward.
fn update(commits: Value) -> Value {
    let mut payload = fixture("push", "dotcom-04");
    assert_eq!(payload["ref"], "refs/heads/master");
    set(&mut payload, "/created", json!(false));
    set(&mut payload, "/before", json!("a10867b14bb761a232cd80139fbd4c0d33264240"));
    set(&mut payload, "/commits", commits);
    payload
}

fn commit(added: &[&str], modified: &[&str], removed: &[&str]) -> Value {
    json!({ "id": "6113728f27ae82c7b1a177c8d03f9e96e0adf246", "added": added, "modified": modified, "removed": removed })
}

#[test]
fn changed_paths_are_the_union_of_the_commits_sorted_without_repeats() {
    let payload = update(json!([
        commit(&["src/b.rs", "README.md"], &[], &[]),
        commit(&[], &["src/b.rs", "Cargo.toml"], &["old.txt"]),
        commit(&[], &["README.md"], &[]),
    ]));
    let push = push(&payload);
    assert_eq!(push.branch.as_deref(), Some("master"));
    assert_eq!(
        push.changed_paths,
        Some(vec!["Cargo.toml".into(), "README.md".into(), "old.txt".into(), "src/b.rs".into()])
    );
}

#[test]
fn nineteen_commits_are_listed_and_twenty_may_be_truncated() {
    let many = |n: usize| Value::Array((0..n).map(|i| commit(&[&format!("file{i:02}")], &[], &[])).collect());
    assert_eq!(push(&update(many(19))).changed_paths.map(|paths| paths.len()), Some(19));
    assert_eq!(push(&update(many(20))).changed_paths, None);
    assert_eq!(push(&update(many(21))).changed_paths, None);
}

#[test]
fn a_push_without_a_commit_list_has_unknown_paths() {
    let mut payload = update(json!([]));
    remove(&mut payload, "/commits");
    assert_eq!(push(&payload).changed_paths, None);
    set(&mut payload, "/commits", Value::Null);
    assert_eq!(push(&payload).changed_paths, None);
}

#[test]
fn a_commit_with_no_listed_files_makes_the_paths_unknown() {
    // GitHub leaves the lists empty when a commit is too large to list in time.
    let payload = update(json!([commit(&["a"], &[], &[]), commit(&[], &[], &[])]));
    assert_eq!(push(&payload).changed_paths, None);
    let mut payload = update(json!([commit(&["a"], &[], &[])]));
    remove(&mut payload, "/commits/0/removed");
    assert_eq!(push(&payload).changed_paths, None);
}

#[test]
fn created_deleted_and_forced_pushes_have_unknown_paths() {
    for flag in ["created", "deleted", "forced"] {
        let mut payload = update(json!([commit(&["a"], &[], &[])]));
        set(&mut payload, &format!("/{flag}"), json!(true));
        let push = push(&payload);
        assert_eq!(push.changed_paths, None, "{flag}");
    }
}

#[test]
fn branch_and_tag_names_keep_their_slashes() {
    let mut payload = update(json!([]));
    set(&mut payload, "/ref", json!("refs/heads/release/1.x"));
    assert_eq!(push(&payload).branch.as_deref(), Some("release/1.x"));
    set(&mut payload, "/ref", json!("refs/tags/v1/rc"));
    let tag = push(&payload);
    assert_eq!((tag.branch, tag.tag.as_deref()), (None, Some("v1/rc")));
}

#[test]
fn pushes_to_refs_that_are_neither_branch_nor_tag_are_ignored() {
    let mut payload = update(json!([]));
    set(&mut payload, "/ref", json!("refs/notes/commits"));
    assert_eq!(parse_value("push", &payload), Ok(ignored("push", None)));
}

// Check runs and other events.

#[test]
fn a_rerequested_check_run_is_a_rerun() {
    let payload = fixture("check_run", "dotcom-07");
    assert_eq!(payload["action"], "rerequested");
    assert_eq!(
        parse_value("check_run", &payload),
        Ok(ForgeEvent::Rerun {
            repo: "github/hello-world".into(),
            sender: "octocat".into(),
            commit: "d6fde92930d4715a2b49857d24b940956b26d2d3".into(),
            name: "randscape".into(),
            external_id: None,
        })
    );
}

#[test]
fn unknown_events_are_ignored_with_their_action_when_it_can_be_read() {
    let body = json!({ "action": "submitted", "review": {} });
    assert_eq!(parse_value("pull_request_review", &body), Ok(ignored("pull_request_review", Some("submitted"))));
    assert_eq!(parse_value("create", &json!({ "ref": "x" })), Ok(ignored("create", None)));
    // Nothing reads an unknown event's body, so even a body that is not JSON is only ignored.
    assert_eq!(cib_github::webhook::parse("fork", b"\xff not json"), Ok(ignored("fork", None)));
}
