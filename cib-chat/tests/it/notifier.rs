//! The chat notifier against the fakes: one message per build edited in place, a failure's
//! reply with the log tail, `Retry-After` honoured, and a restart that neither loses nor
//! doubles a message.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cib_chat::testing::{FakeSlack, FakeZulip};
use cib_chat::{ChatConfig, ChatNotifier, ChatTarget, SlackAccount, ZulipAccount};
use cib_core::event::{BuildId, Conclusion, Event, EventBody, StepConclusion};
use cib_core::ports::{LogKey, Notifier, Store};
use cib_core::time::Timestamp;

fn config(slack: &FakeSlack, zulip: &FakeZulip) -> ChatConfig {
    let mut repos = HashMap::new();
    repos.insert(
        "acme/shop".to_owned(),
        ChatTarget { channel: Some("C0SHOP".into()), stream: Some("builds".into()), topic: Some("shop".into()) },
    );
    ChatConfig {
        slack: Some(SlackAccount { api_url: slack.api_url(), bot_token: "xoxb-test".into() }),
        zulip: Some(ZulipAccount {
            site: zulip.site(),
            bot_email: "cib-bot@example.com".into(),
            api_key: "key1".into(),
        }),
        repos,
        public_url: Some("http://ci.example.com".into()),
        retry_base: Duration::from_millis(50),
        coalesce: Duration::from_millis(10),
        ..ChatConfig::default()
    }
}

fn event(seq: u64, body: EventBody) -> Event {
    Event { seq, at: Timestamp::from_secs(1_800_000_000 + seq), body }
}

fn b() -> BuildId {
    BuildId("b-1".into())
}

fn queued() -> EventBody {
    EventBody::BuildQueued {
        build: b(),
        pipeline: "test".into(),
        repo: "acme/shop".into(),
        commit: "0123456789abcdef".into(),
        branch: Some("main".into()),
    }
}

fn finished_step(step: &str, conclusion: StepConclusion) -> EventBody {
    EventBody::StepFinished {
        build: b(),
        step: step.into(),
        attempt: 1,
        conclusion,
        detail: "exit code 1".into(),
        will_retry: false,
    }
}

async fn fakes() -> (FakeSlack, FakeZulip) {
    (FakeSlack::start().await.unwrap(), FakeZulip::start("cib-bot@example.com", "key1").await.unwrap())
}

#[tokio::test]
async fn chat_one_message_per_build_edited_to_success() {
    let (slack, zulip) = fakes().await;
    let dir = tempfile::tempdir().unwrap();
    let notifier = ChatNotifier::new(config(&slack, &zulip), dir.path()).unwrap();
    let events = [
        queued(),
        EventBody::BuildStarted { build: b() },
        EventBody::StepStarted { build: b(), step: "lint".into(), attempt: 1 },
        finished_step("lint", StepConclusion::Success),
        EventBody::StepStarted { build: b(), step: "unit".into(), attempt: 1 },
        finished_step("unit", StepConclusion::Success),
        EventBody::BuildFinished { build: b(), conclusion: Conclusion::Success },
    ];
    for (i, body) in events.into_iter().enumerate() {
        notifier.publish(&event(i as u64 + 1, body)).await.unwrap();
        // Let some of the events be delivered one by one, so that edits happen.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(notifier.flush(Duration::from_secs(10)).await);
    let s = slack.messages();
    assert_eq!(s.len(), 1, "{s:?}");
    assert!(s[0].edits >= 1, "the message was edited in place: {s:?}");
    assert!(s[0].text.contains("✅ passed") && s[0].text.contains("✅ lint  ✅ unit"), "{}", s[0].text);
    assert!(s[0].text.contains("http://ci.example.com/builds/b-1"));
    assert!(s[0].blocks.as_deref().is_some_and(|b| b.contains("\"promote\"")), "a passed build offers Promote");
    let z = zulip.messages();
    assert_eq!(z.len(), 1, "{z:?}");
    assert_eq!(z[0].place, "builds/shop");
    assert!(z[0].edits >= 1 && z[0].text.contains("✅ passed"), "{z:?}");
    assert!(slack.violations().is_empty(), "{:?}", slack.violations());
    assert!(zulip.violations().is_empty(), "{:?}", zulip.violations());
    // Replaying every event (as after a crash) changes nothing.
    let before = (slack.requests().len(), zulip.requests().len());
    notifier.publish(&event(1, queued())).await.unwrap();
    notifier
        .publish(&event(7, EventBody::BuildFinished { build: b(), conclusion: Conclusion::Success }))
        .await
        .unwrap();
    assert!(notifier.flush(Duration::from_secs(5)).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!((slack.requests().len(), zulip.requests().len()), before);
}

#[tokio::test]
async fn chat_failure_gets_a_thread_reply_with_the_log_tail() {
    let (slack, zulip) = fakes().await;
    let dir = tempfile::tempdir().unwrap();
    let store = cib_core::testing::MemoryStore::new();
    let key = LogKey { build: b(), step: "unit".into(), attempt: 1 };
    let mut log = String::new();
    for i in 1..=50 {
        log.push_str(&format!("line {i}\n"));
    }
    // The engine masks secrets before it stores a log; the reply shows what the store holds.
    log.push_str("password is ***\n");
    store.append_log(&key, log.as_bytes()).await.unwrap();
    let notifier =
        ChatNotifier::new(config(&slack, &zulip), dir.path()).unwrap().with_store(store.clone() as Arc<dyn Store>);
    notifier.publish(&event(1, queued())).await.unwrap();
    notifier.publish(&event(2, finished_step("unit", StepConclusion::Failed))).await.unwrap();
    notifier.publish(&event(3, EventBody::BuildFinished { build: b(), conclusion: Conclusion::Failed })).await.unwrap();
    // A replay adds no second reply.
    notifier.publish(&event(2, finished_step("unit", StepConclusion::Failed))).await.unwrap();
    assert!(notifier.flush(Duration::from_secs(10)).await);
    let s = slack.messages();
    assert_eq!(s.len(), 2, "{s:?}");
    let reply = &s[1];
    assert_eq!(reply.thread.as_deref(), Some(s[0].id.as_str()), "the reply is in the build message's thread");
    assert!(reply.text.contains("*unit* failed (exit code 1)"), "{}", reply.text);
    // 50 lines and the masked one: the last 30 begin at line 22.
    assert!(reply.text.contains("```\nline 22\n") && !reply.text.contains("line 21\n"), "30 lines: {}", reply.text);
    assert!(reply.text.contains("password is ***"));
    assert!(s[0].text.contains("❌ failed"));
    let z = zulip.messages();
    assert_eq!(z.len(), 2);
    assert!(z[1].text.contains("line 50") && z[1].place == "builds/shop");
    assert!(slack.violations().is_empty() && zulip.violations().is_empty());
}

#[tokio::test]
async fn chat_outbox_honours_retry_after() {
    let (slack, zulip) = fakes().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&slack, &zulip);
    config.zulip = None;
    slack.fail_next(429, Some(2));
    let notifier = ChatNotifier::new(config, dir.path()).unwrap();
    let start = Instant::now();
    notifier.publish(&event(1, queued())).await.unwrap();
    assert!(notifier.flush(Duration::from_secs(10)).await);
    let took = start.elapsed();
    assert!(took >= Duration::from_secs(2), "the retry waited for Retry-After (2 s), not the 50 ms backoff: {took:?}");
    assert_eq!(slack.requests().len(), 2, "one refused, one delivered: {:?}", slack.requests());
    assert_eq!(slack.messages().len(), 1);

    // Zulip's 429 is honoured the same way.
    let mut config = self::config(&slack, &zulip);
    config.slack = None;
    zulip.fail_next(429, Some(1));
    let dir = tempfile::tempdir().unwrap();
    let notifier = ChatNotifier::new(config, dir.path()).unwrap();
    let start = Instant::now();
    notifier.publish(&event(1, queued())).await.unwrap();
    assert!(notifier.flush(Duration::from_secs(10)).await);
    assert!(start.elapsed() >= Duration::from_secs(1), "{:?}", start.elapsed());
    assert_eq!(zulip.messages().len(), 1);
}

#[tokio::test]
async fn chat_restart_between_post_and_edit_neither_loses_nor_doubles() {
    let (slack, zulip) = fakes().await;
    let dir = tempfile::tempdir().unwrap();
    {
        // A long backoff: the refused edit is not tried again before this process ends.
        let notifier =
            ChatNotifier::new(ChatConfig { retry_base: Duration::from_secs(30), ..config(&slack, &zulip) }, dir.path())
                .unwrap();
        notifier.publish(&event(1, queued())).await.unwrap();
        assert!(notifier.flush(Duration::from_secs(10)).await);
        assert_eq!((slack.messages().len(), zulip.messages().len()), (1, 1));
        // The edit is in the outbox, but both services refuse for now; then the process dies.
        slack.fail_next(503, None);
        zulip.fail_next(503, None);
        notifier
            .publish(&event(2, EventBody::BuildFinished { build: b(), conclusion: Conclusion::Success }))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!slack.messages()[0].text.contains("passed"), "the edit was not delivered before the crash");
    }
    // A new process over the same outbox delivers the edit to the same messages.
    let notifier = ChatNotifier::new(config(&slack, &zulip), dir.path()).unwrap();
    // The engine replays the events it had not acknowledged.
    notifier.publish(&event(1, queued())).await.unwrap();
    notifier
        .publish(&event(2, EventBody::BuildFinished { build: b(), conclusion: Conclusion::Success }))
        .await
        .unwrap();
    assert!(notifier.flush(Duration::from_secs(10)).await);
    let (s, z) = (slack.messages(), zulip.messages());
    assert_eq!((s.len(), z.len()), (1, 1), "no second message: {s:?} {z:?}");
    assert!(s[0].text.contains("✅ passed") && z[0].text.contains("✅ passed"), "nothing lost: {s:?} {z:?}");
    assert!(slack.violations().is_empty() && zulip.violations().is_empty());
}

#[tokio::test]
async fn chat_gates_leases_and_promotions_get_their_own_messages() {
    let (slack, zulip) = fakes().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&slack, &zulip);
    config.default_target =
        Some(ChatTarget { channel: Some("C0OPS".into()), stream: Some("ops".into()), topic: Some("leases".into()) });
    let notifier = ChatNotifier::new(config, dir.path()).unwrap();
    notifier.publish(&event(1, queued())).await.unwrap();
    let gate = EventBody::GateWaiting {
        build: b(),
        step: "deploy".into(),
        kind: "approval".into(),
        instructions: Some("Check staging first.".into()),
        approvals: 1,
    };
    notifier.publish(&event(2, gate.clone())).await.unwrap();
    notifier.publish(&event(2, gate)).await.unwrap();
    notifier
        .publish(&event(
            3,
            EventBody::LeaseWarning {
                lease: "L-1".into(),
                holder: "alice".into(),
                deadline: Timestamp::from_secs(1_800_000_600),
            },
        ))
        .await
        .unwrap();
    notifier
        .publish(&event(
            4,
            EventBody::BranchMoved {
                repo: "acme/shop".into(),
                branch: "production".into(),
                commit: "0123456789abcdef".into(),
                by: "bob".into(),
                promotion: true,
            },
        ))
        .await
        .unwrap();
    assert!(notifier.flush(Duration::from_secs(10)).await);
    let s = slack.messages();
    assert_eq!(s.len(), 4, "the build, its gate, the lease, the promotion: {s:?}");
    let gate = s.iter().find(|m| m.text.contains("waits for approval at *deploy*")).expect("a gate message");
    let blocks = gate.blocks.as_deref().unwrap();
    assert!(blocks.contains("\"approve\"") && blocks.contains("\"b-1 deploy\""), "{blocks}");
    assert!(s.iter().any(|m| m.place == "C0OPS" && m.text.contains("`L-1`")));
    assert!(s.iter().any(|m| m.text.contains("bob promoted `01234567` to production")));
    assert!(s[0].text.contains("⏸ waiting at deploy"), "{}", s[0].text);
    assert_eq!(zulip.messages().len(), 4);
    assert!(slack.violations().is_empty() && zulip.violations().is_empty());
}
