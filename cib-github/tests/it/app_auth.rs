//! GitHub App authentication against the fake: a JWT signed with the App's key (the fake checks
//! the signature with the public half), installation tokens cached and replaced before expiry.

use std::time::Duration;

use cib_core::ports::Vcs;
use cib_github::GithubVcs;
use cib_github::client::{Auth, GithubClient};
use cib_github::testing::FakeGithub;

const KEY: &[u8] = include_bytes!("../fixtures/app/test-app-key.pem");
const PUBLIC: &[u8] = include_bytes!("../fixtures/app/test-app-key.pub.pem");

#[tokio::test]
async fn installation_tokens_are_minted_cached_and_refreshed() {
    let fake = FakeGithub::start().await.expect("fake");
    let sha = fake.commit("o/r", &[], &[("a", "1")], "one");
    fake.set_branch("o/r", "main", &sha);
    // octocrab replaces a token 30 s before it expires: a 32 s token is fresh for about 2 s.
    fake.enable_app(42, PUBLIC, 7, Duration::from_secs(32));
    let auth = Auth::App { app_id: 42, private_key_pem: KEY.to_vec(), installation_id: Some(7) };
    let vcs = GithubVcs::new(GithubClient::new(fake.url(), auth).expect("client"));

    let first = vcs.resolve("o/r", "main").await;
    assert_eq!(first, Ok(sha.clone()), "{:#?}", fake.requests());
    assert_eq!(vcs.resolve("o/r", "main").await.expect("resolve"), sha);
    assert_eq!(fake.tokens_issued(), 1, "the token is cached");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(vcs.resolve("o/r", "main").await.expect("resolve"), sha);
    assert_eq!(fake.tokens_issued(), 2, "a token near expiry is replaced");

    let auths: Vec<String> = fake
        .requests()
        .iter()
        .filter(|r| r.operation.as_deref() == Some("repos/get-commit"))
        .filter_map(|r| r.authorization.clone())
        .collect();
    assert_eq!(auths.len(), 3);
    assert_eq!(auths[0], auths[1]);
    assert_ne!(auths[1], auths[2]);
    fake.assert_no_violations();
}

#[tokio::test]
async fn a_jwt_signed_with_another_key_is_refused() {
    let fake = FakeGithub::start().await.expect("fake");
    fake.commit("o/r", &[], &[("a", "1")], "one");
    // The fake trusts a different public key than the one that signs.
    let other = b"-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAu1SU1LfVLPHCozMxH2Mo\n4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u\n+qKhbwKfBstIs+bMY2Zkp18gnTxKLxoS2tFczGkPLPgizskuemMghRniWaoLcyeh\nkd3qqGElvW/VDL5AaWTg0nLVkjRo9z+40RQzuVaE8AkAFmxZzow3x+VJYKdjykkJ\n0iT9wCS0DRTXu269V264Vf/3jvredZiKRkgwlL9xNAwxXFg0x/XFw005UWVRIkdg\ncKWTjpBP2dPwVZ4WWC+9aGVd+Gyn1o0CLelf4rEjGoXbAAEgAqeGUxrcIlbjXfbc\nmwIDAQAB\n-----END PUBLIC KEY-----\n";
    fake.enable_app(42, other, 7, Duration::from_secs(3600));
    let auth = Auth::App { app_id: 42, private_key_pem: KEY.to_vec(), installation_id: Some(7) };
    let vcs = GithubVcs::new(GithubClient::new(fake.url(), auth).expect("client"));
    let e = vcs.resolve("o/r", "main").await.expect_err("refused");
    assert_eq!(fake.tokens_issued(), 0, "{e}");
    assert_eq!(e.kind(), cib_core::ports::ErrorKind::Misconfigured, "{e}");
    fake.assert_no_violations();
}

/// Without a configured installation, each repository's is asked of GitHub once and its token
/// cached per installation; a repository the App is not installed on is a clear error.
#[tokio::test]
async fn each_repository_finds_its_installation_and_an_uninstalled_one_is_refused_clearly() {
    let fake = FakeGithub::start().await.expect("fake");
    for repo in ["o/a", "p/b"] {
        let sha = fake.commit(repo, &[], &[("a", "1")], "one");
        fake.set_branch(repo, "main", &sha);
    }
    fake.enable_app(42, PUBLIC, 7, Duration::from_secs(3600));
    fake.install("p/b", 9);
    let auth = Auth::App { app_id: 42, private_key_pem: KEY.to_vec(), installation_id: None };
    let vcs = GithubVcs::new(GithubClient::new(fake.url(), auth).expect("client"));
    for _ in 0..2 {
        vcs.resolve("o/a", "main").await.expect("o/a through installation 7");
        vcs.resolve("p/b", "main").await.expect("p/b through installation 9");
    }
    assert_eq!((fake.tokens_of(7), fake.tokens_of(9)), (1, 1), "one token per installation");
    assert_eq!(fake.count("apps/get-repo-installation"), 2, "each installation asked once");
    let e = vcs.resolve("q/none", "main").await.expect_err("not installed");
    assert_eq!(e.kind(), cib_core::ports::ErrorKind::Permanent, "{e}");
    assert!(e.to_string().contains("installation for q/none"), "{e}");
    fake.assert_no_violations();
}
