//! The requests chat services send cib, read into plain values: Slack's slash command (a form),
//! Slack's block actions (a form whose `payload` field is JSON), and Zulip's outgoing webhook
//! (JSON). Every error names what is missing, for a 400.

use serde::Deserialize;

/// A Slack slash command: `/cib <text>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlashCommand {
    pub user_id: String,
    pub user_name: String,
    pub channel_id: String,
    pub command: String,
    pub text: String,
    pub response_url: String,
}

fn form(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

fn field(fields: &[(String, String)], name: &str) -> Option<String> {
    fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

/// Reads a slash command's form body.
pub fn slash_command(body: &[u8]) -> Result<SlashCommand, String> {
    let fields = form(body);
    let need = |name: &str| field(&fields, name).ok_or_else(|| format!("the slash command has no '{name}' field"));
    Ok(SlashCommand {
        user_id: need("user_id")?,
        user_name: field(&fields, "user_name").unwrap_or_default(),
        channel_id: field(&fields, "channel_id").unwrap_or_default(),
        command: need("command")?,
        text: field(&fields, "text").unwrap_or_default(),
        response_url: field(&fields, "response_url").unwrap_or_default(),
    })
}

/// A button pressed on one of cib's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockAction {
    pub user_id: String,
    /// The button's `action_id`: `approve`, `reject` or `promote`.
    pub action_id: String,
    /// The button's `value`, which cib set: `<build> <gate>` or `<repo> <commit>`.
    pub value: String,
    pub response_url: Option<String>,
}

#[derive(Deserialize)]
struct RawActions {
    #[serde(rename = "type")]
    kind: String,
    user: RawUser,
    #[serde(default)]
    actions: Vec<RawAction>,
    #[serde(default)]
    response_url: Option<String>,
}

#[derive(Deserialize)]
struct RawUser {
    id: String,
}

#[derive(Deserialize)]
struct RawAction {
    action_id: String,
    #[serde(default)]
    value: String,
}

/// Reads an interactivity request (`payload=<json>`); only `block_actions` with one action.
pub fn block_action(body: &[u8]) -> Result<BlockAction, String> {
    let fields = form(body);
    let payload = field(&fields, "payload").ok_or("the interaction has no 'payload' field")?;
    let raw: RawActions = serde_json::from_str(&payload).map_err(|e| format!("the interaction's payload: {e}"))?;
    if raw.kind != "block_actions" {
        return Err(format!("cib answers block_actions, not {}", raw.kind));
    }
    let action = raw.actions.into_iter().next().ok_or("the interaction names no action")?;
    Ok(BlockAction {
        user_id: raw.user.id,
        action_id: action.action_id,
        value: action.value,
        response_url: raw.response_url,
    })
}

/// Zulip's outgoing webhook payload ("Outgoing webhook payloads" in Zulip's API docs).
#[derive(Debug, Clone, Deserialize)]
pub struct ZulipWebhook {
    pub bot_email: String,
    #[serde(default)]
    pub bot_full_name: String,
    /// The message's Markdown, with the bot's mention when it was mentioned.
    pub data: String,
    pub token: String,
    /// `mention` or `direct_message` (`private_message` before Zulip 8.0).
    pub trigger: String,
    pub message: ZulipMessage,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ZulipMessage {
    pub sender_id: u64,
    #[serde(default)]
    pub sender_email: String,
    #[serde(default)]
    pub sender_full_name: String,
    #[serde(rename = "type", default)]
    pub kind: String,
}

/// Reads an outgoing webhook's JSON body.
pub fn zulip_webhook(body: &[u8]) -> Result<ZulipWebhook, String> {
    serde_json::from_slice(body).map_err(|e| format!("the outgoing webhook's payload: {e}"))
}

impl ZulipWebhook {
    /// The command in the message: the text without the bot's mention (`@**cib**`, or
    /// `@_**cib**` for a silent one) wherever it stands.
    pub fn command_text(&self) -> String {
        let mut text = self.data.clone();
        for mention in [format!("@**{}**", self.bot_full_name), format!("@_**{}**", self.bot_full_name)] {
            if !self.bot_full_name.is_empty() {
                text = text.replace(&mention, " ");
            }
        }
        text.trim().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_slash_command_from_slack_example() {
        let body = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        let c = slash_command(body.as_bytes()).expect("parsed");
        assert_eq!(c.user_id, "U2CERLKJA");
        assert_eq!(c.command, "/webhook-collect");
        assert_eq!(c.response_url, "https://hooks.slack.com/commands/T1DC2JH3J/397700885554/96rGlfmibIGlgcZRskXaIFfN");
        assert_eq!(slash_command(b"text=hi").unwrap_err(), "the slash command has no 'user_id' field");
    }

    #[test]
    fn chat_block_action() {
        let payload = serde_json::json!({
            "type": "block_actions", "user": {"id": "U1", "username": "a"},
            "actions": [{"action_id": "approve", "value": "b-1 deploy", "type": "button"}],
            "response_url": "https://hooks.slack.com/actions/T/1/x"
        });
        let body: String =
            form_urlencoded::Serializer::new(String::new()).append_pair("payload", &payload.to_string()).finish();
        let a = block_action(body.as_bytes()).expect("parsed");
        assert_eq!((a.user_id.as_str(), a.action_id.as_str(), a.value.as_str()), ("U1", "approve", "b-1 deploy"));
        assert!(block_action(b"payload=%7B%7D").unwrap_err().starts_with("the interaction's payload"));
    }
}
