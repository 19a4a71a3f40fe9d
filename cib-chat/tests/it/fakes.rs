//! The fakes keep to the published contracts: a wrong request is caught, and Zulip's recorded
//! payloads read.

use cib_chat::testing::{FakeSlack, FakeZulip, check_slack_request, slack_contract};

fn form_headers(token: Option<&str>) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded".parse().unwrap());
    if let Some(t) = token {
        h.insert(http::header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
    }
    h
}

#[test]
fn chat_fake_slack_catches_wrong_requests() {
    let contract = slack_contract();
    let post = http::Method::POST;
    let good = b"channel=C1&text=hello&blocks=%5B%5D";
    assert_eq!(
        check_slack_request(&contract, &post, "chat.postMessage", &form_headers(Some("xoxb-1")), good),
        Vec::<String>::new()
    );
    // Each of these breaks Slack's description in one way, and each is caught.
    let cases: Vec<(&str, http::HeaderMap, &[u8], &str)> = vec![
        ("chat.postMessage", form_headers(None), good, "no token"),
        ("chat.postMessage", form_headers(Some("x")), b"text=hello", "'channel' is missing"),
        ("chat.update", form_headers(Some("x")), b"channel=C1&text=hi", "'ts' is missing"),
        ("chat.postMessage", form_headers(Some("x")), b"channel=C1&colour=red", "'colour' is not a parameter"),
        ("chat.postMessage", form_headers(Some("x")), b"channel=C1&mrkdwn=perhaps", "'mrkdwn' is not a \"boolean\""),
        ("chat.postMessage", form_headers(Some("x")), b"channel=C1&blocks=hello", "'blocks' is not a JSON array"),
        ("chat.postMesage", form_headers(Some("x")), good, "is not in Slack's Web API"),
    ];
    for (method, headers, body, expected) in cases {
        let problems = check_slack_request(&contract, &post, method, &headers, body);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{method} {}: {problems:?}",
            String::from_utf8_lossy(body)
        );
    }
    let mut json = form_headers(Some("x"));
    json.insert(http::header::CONTENT_TYPE, "text/plain".parse().unwrap());
    let problems = check_slack_request(&contract, &post, "chat.postMessage", &json, good);
    assert!(problems.iter().any(|p| p.contains("content type")), "{problems:?}");
    let problems =
        check_slack_request(&contract, &http::Method::GET, "chat.postMessage", &form_headers(Some("x")), good);
    assert!(!problems.is_empty(), "a GET of chat.postMessage is not in the description");
}

#[tokio::test]
async fn chat_fake_slack_records_a_violation_over_http() {
    let slack = FakeSlack::start().await.unwrap();
    let client = cib_chat::api::Slack { http: Default::default(), api_url: slack.api_url(), token: "xoxb-test".into() };
    let answer = client.call("chat.postMessage", &[("channel", "C1"), ("text", "hi")]).await.unwrap();
    assert_eq!(answer["ok"], true);
    assert!(slack.violations().is_empty());
    let refused = client.call("chat.postMessage", &[("text", "no channel")]).await.unwrap_err();
    assert!(refused.message.contains("invalid_arguments"), "{refused}");
    assert_eq!(slack.violations(), vec!["chat.postMessage: the required field 'channel' is missing".to_owned()]);
}

#[tokio::test]
async fn chat_fake_slack_refuses_another_bot_token() {
    let slack = FakeSlack::start_for("xoxb-right").await.unwrap();
    let client =
        |token: &str| cib_chat::api::Slack { http: Default::default(), api_url: slack.api_url(), token: token.into() };
    let refused = client("xoxb-wrong").call("chat.postMessage", &[("channel", "C1"), ("text", "hi")]).await;
    let refused = refused.unwrap_err();
    assert!(refused.message.contains("invalid_auth"), "{refused}");
    assert_eq!(refused.kind, cib_core::ports::ErrorKind::Misconfigured);
    assert!(slack.messages().is_empty(), "nothing was posted");
    client("xoxb-right").call("chat.postMessage", &[("channel", "C1"), ("text", "hi")]).await.unwrap();
    assert_eq!(slack.messages().len(), 1);
}

#[tokio::test]
async fn chat_fake_zulip_checks_auth_and_fields() {
    let zulip = FakeZulip::start("cib-bot@example.com", "key1").await.unwrap();
    let good = cib_chat::api::Zulip {
        http: Default::default(),
        site: zulip.site(),
        email: "cib-bot@example.com".into(),
        api_key: "key1".into(),
    };
    let id = good.send("builds", "shop", "hello").await.unwrap();
    good.edit(id, "hello again").await.unwrap();
    let messages = zulip.messages();
    assert_eq!(
        (messages[0].place.as_str(), messages[0].text.as_str(), messages[0].edits),
        ("builds/shop", "hello again", 1)
    );
    let bad = cib_chat::api::Zulip { api_key: "wrong".into(), ..good.clone() };
    let e = bad.send("builds", "shop", "x").await.unwrap_err();
    assert_eq!(e.kind, cib_core::ports::ErrorKind::Misconfigured, "{e}");
    assert!(good.edit(999, "x").await.is_err(), "an unknown message cannot be edited");
    assert!(zulip.violations().is_empty(), "{:?}", zulip.violations());
}

#[test]
fn chat_zulip_recorded_payloads_read() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let body = std::fs::read(format!("{dir}/zulip_outgoing_mention.json")).unwrap();
    let hook = cib_chat::payload::zulip_webhook(&body).unwrap();
    assert_eq!(
        (hook.trigger.as_str(), hook.message.sender_id, hook.token.as_str()),
        ("mention", 5, "xvOzfurIutdRRVLzpXrIIHXJvNfaJLJ0")
    );
    assert_eq!(hook.command_text(), "Zulip is the world\u{2019}s most productive group chat!");
    let sent: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{dir}/zulip_send_message_response.json")).unwrap()).unwrap();
    assert_eq!(sent["id"], 42);
    assert!(cib_chat::payload::zulip_webhook(b"{\"data\": 1}").is_err());
}
