//! The sinks: Slack (incoming webhook, or a bot token: see `threaded`), Mattermost (Slack-style
//! webhook, or a bot token), Microsoft Teams (workflow webhook with an Adaptive Card), and a
//! generic JSON webhook. Secrets (webhook URLs, tokens) come from the environment or files and
//! never appear in logs or errors.

use super::config::{SinkConfig, SinkKind};
use super::threaded::{MattermostApi, SlackApi, Threaded};
use super::{DeliveryError, Event, Markup, Sink};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Characters of evidence text in a message (Mattermost, Teams, webhooks).
pub(super) const WEBHOOK_LIMIT: usize = 4_000;
/// Slack's section blocks hold 3,000 characters.
pub(super) const SLACK_LIMIT: usize = 2_800;

/// A sink that cannot be built from its config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("notify sink {sink:?}: {why}")]
pub struct SinkError {
    /// The sink's name.
    pub sink: String,
    /// What is wrong.
    pub why: String,
}

fn secret(
    cfg: &SinkConfig,
    what: &str,
    value: &Option<String>,
    env: &Option<String>,
    file: &Option<std::path::PathBuf>,
) -> Result<String, SinkError> {
    cfg.secret_ref(what, value, env, file)
        .and_then(|r| r.read())
        .map_err(|why| SinkError {
            sink: cfg.name.clone(),
            why,
        })
}

/// Builds a sink from its config (reading its secrets).
pub fn build_sink(
    cfg: &SinkConfig,
    timeout: Duration,
    buttons: bool,
    mattermost: Option<&MattermostButtons>,
    store: Option<&crate::store::Store>,
) -> Result<Arc<dyn Sink>, SinkError> {
    let http = crate::executors::upstream_client(Some(timeout));
    let token = || secret(cfg, "token", &None, &cfg.token_env, &cfg.token_file);
    let channel = || {
        cfg.channel.clone().ok_or_else(|| SinkError {
            sink: cfg.name.clone(),
            why: "a bot sink needs a channel".into(),
        })
    };
    let api_url = |default: Option<&str>| {
        (cfg.api_url.clone().or(default.map(str::to_string)))
            .map(|u| u.trim_end_matches('/').to_string())
            .ok_or_else(|| SinkError {
                sink: cfg.name.clone(),
                why: "mattermost_bot needs api_url (the server, https://mattermost.example.com)"
                    .into(),
            })
    };
    Ok(match cfg.kind {
        SinkKind::SlackBot => {
            let api = SlackApi {
                http,
                api_url: api_url(Some("https://slack.com/api"))?,
                token: token()?,
                channel: channel()?,
                buttons,
            };
            Arc::new(Threaded::new(api, &cfg.name, store))
        }
        SinkKind::MattermostBot => {
            let api = MattermostApi {
                http,
                base: api_url(None)?,
                token: token()?,
                channel: channel()?,
                buttons: mattermost.cloned(),
            };
            Arc::new(Threaded::new(api, &cfg.name, store))
        }
        kind => Arc::new(Webhook {
            http,
            kind,
            buttons,
            mattermost: mattermost.cloned(),
            url: secret(cfg, "url", &cfg.url, &cfg.url_env, &cfg.url_file)?,
        }),
    })
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    bearer: Option<&str>,
    body: &Value,
) -> Result<Value, DeliveryError> {
    let mut req = http.post(url).json(body);
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    send(req).await
}

/// Sends a request; its JSON answer (null when not JSON), or what went wrong, with whether it
/// is worth trying again (429, 5xx, no connection) and after how long the receiver asked.
pub(super) async fn send(req: reqwest::RequestBuilder) -> Result<Value, DeliveryError> {
    // reqwest's error text can include the URL, which holds the secret of a webhook: say less.
    let resp = req.send().await.map_err(|e| DeliveryError {
        retry: true,
        retry_after: None,
        message: if e.is_timeout() {
            "timed out".into()
        } else if e.is_connect() {
            "cannot connect".into()
        } else {
            "request failed".into()
        },
    })?;
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.min(300)));
    if status.is_success() {
        return Ok(resp.json().await.unwrap_or(Value::Null));
    }
    Err(DeliveryError {
        retry: status.as_u16() == 429 || status.is_server_error(),
        retry_after,
        message: format!("HTTP {}", status.as_u16()),
    })
}

/// Slack and Mattermost incoming webhooks, Teams workflows, generic JSON webhooks.
struct Webhook {
    http: reqwest::Client,
    kind: SinkKind,
    /// Approval messages carry Approve and Deny buttons (Slack, with `notify.slack_app`).
    buttons: bool,
    /// Mattermost approval buttons (with `notify.mattermost_app`).
    mattermost: Option<MattermostButtons>,
    url: String,
}

/// The Teams message: an Adaptive Card with the title and the text.
fn teams_card(event: &Event) -> Value {
    let title = match event.run() {
        Some(run) => format!(
            "Reflex: {} ({})",
            run.playbook,
            event.kind().replace('_', " ")
        ),
        None => format!("Reflex: {}", event.kind().replace('_', " ")),
    };
    json!({
        "type": "message",
        "attachments": [{
            "contentType": "application/vnd.microsoft.card.adaptive",
            "contentUrl": null,
            "content": {
                "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                "type": "AdaptiveCard",
                "version": "1.4",
                "body": [
                    { "type": "TextBlock", "text": title, "weight": "Bolder", "size": "Medium", "wrap": true },
                    { "type": "TextBlock", "text": event.message_for(Markup::Markdown, WEBHOOK_LIMIT), "wrap": true }
                ]
            }
        }]
    })
}

#[async_trait::async_trait]
impl Sink for Webhook {
    async fn deliver(&self, event: &Event) -> Result<(), DeliveryError> {
        let body = match self.kind {
            SinkKind::Slack => with_buttons(
                json!({ "text": event.message_for(Markup::Slack, SLACK_LIMIT) }),
                Some(event),
                self.buttons,
            ),
            SinkKind::Mattermost => mattermost_buttons(
                json!({ "text": event.message_for(Markup::Markdown, WEBHOOK_LIMIT), "username": "reflex" }),
                event,
                self.mattermost.as_ref(),
            ),
            SinkKind::Teams => teams_card(event),
            SinkKind::Webhook | SinkKind::SlackBot | SinkKind::MattermostBot => {
                let mut v = serde_json::to_value(event).unwrap_or(Value::Null);
                v["text"] = json!(event.message_for(Markup::Plain, WEBHOOK_LIMIT));
                v
            }
        };
        post(&self.http, &self.url, None, &body).await.map(drop)
    }
}

/// Where Mattermost buttons call back, and the secret they carry.
#[derive(Debug, Clone)]
pub struct MattermostButtons {
    /// `notify.mattermost_app.callback_url`.
    pub url: String,
    /// The shared secret.
    pub secret: String,
}

/// A Mattermost approval message with Approve and Deny buttons (interactive message
/// actions): each carries the approval, the hash of the action shown, and the shared secret.
fn mattermost_buttons(mut body: Value, event: &Event, app: Option<&MattermostButtons>) -> Value {
    let text = body["text"].as_str().unwrap_or_default().to_string();
    if let Some(attachments) = mattermost_attachments(&text, event, app) {
        body["attachments"] = attachments;
        body["text"] = json!("");
    }
    body
}

/// The attachment of a Mattermost approval message: its text and the two buttons; none for
/// any other event, or without `notify.mattermost_app`.
pub(super) fn mattermost_attachments(
    text: &str,
    event: &Event,
    app: Option<&MattermostButtons>,
) -> Option<Value> {
    let (
        Event::ApprovalNeeded {
            approval_id,
            action_hash,
            ..
        },
        Some(app),
    ) = (event, app)
    else {
        return None;
    };
    let button = |id: &str, name: &str| {
        json!({ "id": id, "name": name, "integration": { "url": app.url, "context": {
            "action": id, "approval": approval_id, "hash": action_hash, "secret": app.secret,
        }}})
    };
    Some(json!([{
        "text": text,
        "actions": [button("approve", "Approve"), button("deny", "Deny")],
    }]))
}

/// An approval message with Approve and Deny buttons (Block Kit). Each button's value names
/// the approval and the hash of the action the message shows, so that a click decides on
/// exactly that.
pub(super) fn with_buttons(mut body: Value, event: Option<&Event>, buttons: bool) -> Value {
    let Some(Event::ApprovalNeeded {
        approval_id,
        action_hash,
        ..
    }) = event
    else {
        return body;
    };
    if !buttons {
        return body;
    }
    let value = format!("{approval_id}:{action_hash}");
    body["blocks"] = json!([
        { "type": "section", "text": { "type": "mrkdwn", "text": body["text"] } },
        { "type": "actions", "block_id": "reflex_approval", "elements": [
            { "type": "button", "action_id": "approve", "style": "primary",
              "text": { "type": "plain_text", "text": "Approve" }, "value": value },
            { "type": "button", "action_id": "deny", "style": "danger",
              "text": { "type": "plain_text", "text": "Deny" }, "value": value },
        ]},
    ]);
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approval() -> Event {
        Event::ApprovalNeeded {
            run: crate::notify::RunInfo {
                id: 7,
                dry_run: false,
                playbook: "rollback".into(),
                target: "api".into(),
                title: "Errors on api".into(),
                url: None,
                runbook_url: None,
                source_url: None,
            },
            evidence: Vec::new(),
            approval_id: 3,
            action: json!({"target": "api", "steps": []}),
            action_hash: "ab12".into(),
            required: 1,
            approvers: vec![],
            expires_at: crate::time::Timestamp::parse("2026-11-23T12:00:00.000Z").unwrap(),
        }
    }

    #[test]
    fn approval_messages_carry_buttons_for_exactly_the_action_shown_only_when_configured() {
        let body = with_buttons(json!({"text": "Approve?"}), Some(&approval()), true);
        let buttons = &body["blocks"][1]["elements"];
        assert_eq!(buttons[0]["action_id"], "approve");
        assert_eq!(buttons[1]["action_id"], "deny");
        assert_eq!(buttons[0]["value"], "3:ab12");
        assert_eq!(body["blocks"][0]["text"]["text"], "Approve?");
        let plain = with_buttons(json!({"text": "Approve?"}), Some(&approval()), false);
        assert_eq!(plain, json!({"text": "Approve?"}));
    }

    #[test]
    fn mattermost_approval_messages_carry_actions_with_the_approval_hash_and_secret() {
        let app = MattermostButtons {
            url: "https://reflex.example/api/v1/chat/mattermost/actions".into(),
            secret: "s".into(),
        };
        let body = mattermost_buttons(json!({"text": "Approve?"}), &approval(), Some(&app));
        let actions = &body["attachments"][0]["actions"];
        assert_eq!(body["attachments"][0]["text"], "Approve?");
        assert_eq!(actions[0]["integration"]["url"], app.url);
        assert_eq!(
            actions[1]["integration"]["context"],
            json!({"action": "deny", "approval": 3, "hash": "ab12", "secret": "s"})
        );
        let plain = mattermost_buttons(json!({"text": "x"}), &approval(), None);
        assert_eq!(plain, json!({"text": "x"}));
    }
}
