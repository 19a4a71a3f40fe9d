//! The fake GitHub itself: requests outside GitHub's description are violations, and its
//! answers validate against the description's response schemas.

use cib_github::client::{Auth, GithubClient};
use cib_github::testing::{FakeGithub, TEST_TOKEN, check_response};
use http::Method;
use serde_json::json;

#[tokio::test]
async fn requests_outside_the_description_are_violations() {
    let fake = FakeGithub::start().await.expect("fake");
    fake.create_repo("o/r");
    let sha = fake.commit("o/r", &[], &[("a", "1")], "first");
    let client = GithubClient::new(fake.url(), Auth::Token(TEST_TOKEN.into())).expect("client");

    // An operation GitHub does not have.
    let e = client.send(Method::GET, "/repos/o/r/no-such-thing", None).await.expect_err("refused");
    assert_eq!(e.status, Some(404));
    // A status without its required `state`, and one with a misspelt field.
    let path = format!("/repos/o/r/statuses/{sha}");
    let e = client.send(Method::POST, &path, Some(&json!({"context": "cib/test"}))).await.expect_err("refused");
    assert_eq!(e.status, Some(400));
    let bad = json!({"state": "success", "desciption": "typo"});
    client.send(Method::POST, &path, Some(&bad)).await.expect_err("refused");
    // A state the enum does not allow, and an unknown query parameter.
    client.send(Method::POST, &path, Some(&json!({"state": "passed"}))).await.expect_err("refused");
    client.send(Method::GET, "/repos/o/r/compare/a...b?color=red", None).await.expect_err("refused");

    let problems: Vec<String> = fake.violations().into_iter().map(|v| v.problem).collect();
    assert_eq!(problems.len(), 5, "{problems:#?}");
    assert!(problems[0].contains("no operation"), "{problems:#?}");
    assert!(problems[1].contains("state"), "{problems:#?}");
    assert!(problems[2].contains("desciption"), "{problems:#?}");
    assert!(problems[4].contains("color"), "{problems:#?}");
    assert!(fake.statuses("o/r").is_empty());
}

#[test]
fn response_schemas_are_enforced() {
    // A status answer without most of its required fields does not pass.
    let problems = check_response("repos/create-commit-status", 201, &json!({"state": "success"})).expect("listed");
    assert!(!problems.is_empty());
    assert!(check_response("repos/create-commit-status", 418, &json!({})).is_none());
}

#[tokio::test]
async fn requests_without_credentials_are_refused() {
    let fake = FakeGithub::start().await.expect("fake");
    fake.create_repo("o/r");
    let client = GithubClient::new(fake.url(), Auth::Token("wrong".into())).expect("client");
    let e = client.send(Method::GET, "/repos/o/r/commits/main", None).await.expect_err("refused");
    assert_eq!((e.status, e.kind), (Some(401), cib_core::ports::ErrorKind::Misconfigured));
    fake.assert_no_violations();
}
