//! What cib says in chat, as text: pure functions from what a build did to the words of its
//! message, its failure reply and the messages of gates, leases and promotions.

use std::collections::BTreeMap;

use cib_core::event::{Conclusion, StepConclusion};
use serde::{Deserialize, Serialize};

/// A button on a Slack message: its `action_id` and `value`, which come back when pressed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Button {
    pub action_id: String,
    pub text: String,
    pub value: String,
    /// `primary` or `danger`, or none.
    pub style: Option<String>,
}

/// Which service a text is for: they write mentions differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chat {
    Slack,
    Zulip,
}

/// Who started a build, as the people directory knows them: their chat ids, when listed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pusher {
    /// The person's name in cib, or the login or token name nobody in `[[people]]` claims.
    pub name: String,
    /// Their Slack user id (`U024BE7LH`).
    pub slack: Option<String>,
    /// Their Zulip user id (`7`).
    pub zulip: Option<String>,
}

impl Pusher {
    /// How `chat` mentions them: Slack's `<@U…>`, Zulip's `@**|id**` (Zulip's mention by user
    /// id, which it shows as `@Full Name` and which, unlike `@**Full Name**`, still works after
    /// a rename), or their name in plain text when that service's id is not known.
    pub fn mention(&self, chat: Chat) -> String {
        match (chat, &self.slack, &self.zulip) {
            (Chat::Slack, Some(id), _) => format!("<@{id}>"),
            (Chat::Zulip, _, Some(id)) => format!("@**|{id}**"),
            _ => self.name.replace(['*', '<', '>', '`', '@'], ""),
        }
    }
}

/// What the notifier remembers of a build for its message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildView {
    pub build: String,
    pub repo: String,
    pub pipeline: String,
    pub commit: String,
    pub branch: Option<String>,
    /// How each finished step ended.
    pub steps: BTreeMap<String, StepConclusion>,
    /// The step running now, if any.
    pub running: Option<String>,
    /// A gate the build waits at.
    pub waiting: Option<String>,
    pub conclusion: Option<Conclusion>,
    /// Who pushed (or started) it, mentioned in its message.
    #[serde(default)]
    pub pusher: Option<Pusher>,
}

fn short(commit: &str) -> &str {
    commit.get(..8).unwrap_or(commit)
}

fn icon(c: StepConclusion) -> &'static str {
    match c {
        StepConclusion::Success => "✅",
        StepConclusion::Skipped => "⏭",
        _ => "❌",
    }
}

/// The one message of a build, in Markdown both services read (bold with `*`, code with
/// backticks; Zulip reads `*x*` as italics, which is still legible), mentioning its pusher as
/// `chat` writes mentions.
pub fn build_text(view: &BuildView, link: Option<&str>, chat: Chat) -> String {
    let state = match (view.conclusion, &view.waiting, &view.running) {
        (Some(Conclusion::Success), ..) => "✅ passed".to_owned(),
        (Some(Conclusion::Failed), ..) => "❌ failed".to_owned(),
        (Some(Conclusion::TimedOut), ..) => "⏱ timed out".to_owned(),
        (Some(Conclusion::Cancelled), ..) => "⛔ cancelled".to_owned(),
        (Some(Conclusion::Errored), ..) => "⚠ infrastructure error".to_owned(),
        (Some(Conclusion::Neutral), ..) => "➖ neutral (steps needing secrets were skipped)".to_owned(),
        (None, Some(gate), _) => format!("⏸ waiting at {gate}"),
        (None, None, Some(step)) => format!("🔄 running {step}"),
        (None, None, None) => "🕒 queued".to_owned(),
    };
    let on = view.branch.as_deref().map(|b| format!(" on {b}")).unwrap_or_default();
    let by = view.pusher.as_ref().map(|p| format!(" by {}", p.mention(chat))).unwrap_or_default();
    let mut text =
        format!("*{}* {} `{}`{on} @ `{}`{by}: {state}", view.repo, view.pipeline, view.build, short(&view.commit));
    if !view.steps.is_empty() {
        let steps: Vec<String> = view.steps.iter().map(|(name, c)| format!("{} {name}", icon(*c))).collect();
        text.push_str(&format!("\n{}", steps.join("  ")));
    }
    if let Some(link) = link {
        text.push_str(&format!("\n{link}"));
    }
    text
}

/// The thread reply of a failed step: its detail and its last log lines (masked when stored).
pub fn failure_text(step: &str, detail: &str, tail: &str, link: Option<&str>) -> String {
    let tail = tail.replace("```", "``\u{200b}`");
    let mut text = format!("❌ *{step}* failed ({detail}). The last lines of its log:\n```\n{tail}\n```");
    if let Some(link) = link {
        text.push_str(&format!("\n{link}"));
    }
    text
}

/// The message of a gate that waits for people, and its buttons.
pub fn gate_text(
    view: &BuildView,
    gate: &str,
    instructions: Option<&str>,
    link: Option<&str>,
) -> (String, Vec<Button>) {
    let mut text = format!("⏸ *{}* {} `{}` waits for approval at *{gate}*.", view.repo, view.pipeline, view.build);
    if let Some(i) = instructions {
        text.push_str(&format!("\n{i}"));
    }
    text.push_str(&format!("\nIn chat: `approve {0} {gate}` or `reject {0} {gate}`.", view.build));
    if let Some(link) = link {
        text.push_str(&format!("\n{link}"));
    }
    let value = format!("{} {gate}", view.build);
    let buttons = vec![
        Button {
            action_id: "approve".into(),
            text: "Approve".into(),
            value: value.clone(),
            style: Some("primary".into()),
        },
        Button { action_id: "reject".into(), text: "Reject".into(), value, style: Some("danger".into()) },
    ];
    (text, buttons)
}

/// The button under a passed build's message that promotes its commit.
pub fn promote_button(view: &BuildView) -> Button {
    Button {
        action_id: "promote".into(),
        text: "Promote".into(),
        value: format!("{} {}", view.repo, view.commit),
        style: None,
    }
}

/// Slack's blocks for a message: the text, then its buttons.
pub fn slack_blocks(text: &str, buttons: &[Button]) -> serde_json::Value {
    let mut blocks = vec![serde_json::json!({
        "type": "section",
        "text": { "type": "mrkdwn", "text": text.chars().take(3000).collect::<String>() }
    })];
    if !buttons.is_empty() {
        let elements: Vec<serde_json::Value> = buttons
            .iter()
            .map(|b| {
                let mut e = serde_json::json!({
                    "type": "button",
                    "action_id": b.action_id,
                    "text": { "type": "plain_text", "text": b.text },
                    "value": b.value,
                });
                if let Some(style) = &b.style {
                    e["style"] = style.clone().into();
                }
                e
            })
            .collect();
        blocks.push(serde_json::json!({ "type": "actions", "elements": elements }));
    }
    serde_json::Value::Array(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_build_text_follows_the_build() {
        let mut view = BuildView {
            build: "b-1".into(),
            repo: "acme/shop".into(),
            pipeline: "test".into(),
            commit: "0123456789abcdef".into(),
            branch: Some("main".into()),
            ..BuildView::default()
        };
        assert_eq!(build_text(&view, None, Chat::Slack), "*acme/shop* test `b-1` on main @ `01234567`: 🕒 queued");
        view.running = Some("lint".into());
        assert!(build_text(&view, None, Chat::Zulip).ends_with("🔄 running lint"));
        view.steps.insert("lint".into(), StepConclusion::Success);
        view.steps.insert("unit".into(), StepConclusion::Failed);
        view.conclusion = Some(Conclusion::Failed);
        assert_eq!(
            build_text(&view, Some("http://ci/builds/b-1"), Chat::Slack),
            "*acme/shop* test `b-1` on main @ `01234567`: ❌ failed\n✅ lint  ❌ unit\nhttp://ci/builds/b-1"
        );
        // The pusher is mentioned as each service mentions people, or named when it cannot.
        view.pusher = Some(Pusher { name: "paula".into(), slack: Some("U024BE7LH".into()), zulip: Some("7".into()) });
        assert!(build_text(&view, None, Chat::Slack).contains("@ `01234567` by <@U024BE7LH>: ❌ failed"));
        assert!(build_text(&view, None, Chat::Zulip).contains("@ `01234567` by @**|7**: ❌ failed"));
        view.pusher = Some(Pusher { name: "octo*cat".into(), slack: None, zulip: None });
        assert!(build_text(&view, None, Chat::Slack).contains(" by octocat: "));
        let (text, buttons) = gate_text(&view, "deploy", None, None);
        assert!(text.contains("`approve b-1 deploy`"), "{text}");
        assert_eq!(buttons[0].value, "b-1 deploy");
        let blocks = slack_blocks(&text, &buttons);
        assert_eq!(blocks[1]["elements"][1]["action_id"], "reject");
    }
}
