//! `notify:` in reflex.yaml: the chat and webhook sinks and how they deliver.

use crate::secret::SecretRef;
use crate::time::duration_str;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// Notification sinks.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// Where messages go.
    pub sinks: Vec<SinkConfig>,
    /// Attempts per message (429 and 5xx are retried with backoff, honouring Retry-After).
    pub max_attempts: usize,
    /// Timeout of one attempt.
    #[serde(with = "duration_str")]
    pub timeout: Duration,
    /// A run that ends within this long of its start, needing no one, is told once, at its
    /// end; a longer run, or one that waits for a person, is told as it starts (`0s`: always).
    #[serde(with = "duration_str")]
    pub quiet_for: Duration,
    /// Approve and Deny buttons in Slack approval messages, answered at
    /// `/api/v1/chat/slack/interactions`.
    pub slack_app: Option<SlackApp>,
    /// Approve and Deny buttons in Mattermost approval messages, answered at
    /// `/api/v1/chat/mattermost/actions`.
    pub mattermost_app: Option<MattermostApp>,
}

/// Mattermost interactive message buttons.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MattermostApp {
    /// The URL Mattermost calls, as it reaches Reflex
    /// (`https://reflex.example.internal/api/v1/chat/mattermost/actions`).
    pub callback_url: String,
    /// Environment variable holding the shared secret the buttons carry back.
    pub secret_env: Option<String>,
    /// File holding the shared secret.
    pub secret_file: Option<PathBuf>,
    /// Mattermost user id -> the approver identity (token name) it decides as.
    #[serde(default)]
    pub users: std::collections::BTreeMap<String, String>,
}

/// A Slack app whose interactivity requests come to Reflex.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackApp {
    /// Environment variable holding the app's signing secret.
    pub signing_secret_env: Option<String>,
    /// File holding the app's signing secret.
    pub signing_secret_file: Option<PathBuf>,
    /// Slack user id -> the approver identity (token name) it decides as. Users not listed
    /// cannot decide from Slack.
    #[serde(default)]
    pub users: std::collections::BTreeMap<String, String>,
    /// Where Slack's `response_url` may point (the message is updated there).
    #[serde(default = "slack_hooks")]
    pub response_url_prefix: String,
}

impl SlackApp {
    /// Where the signing secret comes from.
    pub fn secret_ref(&self) -> Result<SecretRef, String> {
        SecretRef::from_fields(
            "signing_secret",
            &None,
            &self.signing_secret_env,
            &self.signing_secret_file,
        )?
        .ok_or_else(|| "notify.slack_app needs signing_secret_env or signing_secret_file".into())
    }
}

impl MattermostApp {
    /// Where the shared secret comes from.
    pub fn secret_ref(&self) -> Result<SecretRef, String> {
        SecretRef::from_fields("secret", &None, &self.secret_env, &self.secret_file)?
            .ok_or_else(|| "notify.mattermost_app needs secret_env or secret_file".into())
    }
}

impl SinkConfig {
    /// Where one of the sink's secrets (`url` or `token`) comes from: exactly one of `what`,
    /// `what_env`, `what_file`.
    pub fn secret_ref(
        &self,
        what: &str,
        value: &Option<String>,
        env: &Option<String>,
        file: &Option<PathBuf>,
    ) -> Result<SecretRef, String> {
        SecretRef::from_fields(what, value, env, file)?
            .ok_or_else(|| format!("give one of {what}, {what}_env, {what}_file"))
    }
}

fn slack_hooks() -> String {
    "https://hooks.slack.com/".into()
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            slack_app: None,
            mattermost_app: None,
            sinks: Vec::new(),
            max_attempts: 5,
            timeout: Duration::from_secs(10),
            quiet_for: Duration::from_secs(10),
        }
    }
}

/// Kinds of sinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// Slack incoming webhook.
    Slack,
    /// Slack bot token (Web API): one message per run, edited in place, with a thread.
    SlackBot,
    /// Mattermost incoming webhook (Slack-compatible).
    Mattermost,
    /// Mattermost bot token (API v4): one post per run, edited, with a thread.
    MattermostBot,
    /// Microsoft Teams workflow webhook (Adaptive Card).
    Teams,
    /// Any HTTP endpoint: the event as JSON, with `text`.
    Webhook,
}

/// Event names sinks can filter on.
pub const EVENTS: &[&str] = &[
    "run_started",
    "approval_needed",
    "step_failed",
    "run_finished",
    "killswitch",
    "reload",
    "autonomy",
];

/// One sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Name, for metrics and logs.
    pub name: String,
    /// Kind.
    #[serde(rename = "type")]
    pub kind: SinkKind,
    /// Webhook URL (a secret: prefer `url_env` or `url_file`).
    pub url: Option<String>,
    /// Environment variable holding the webhook URL.
    pub url_env: Option<String>,
    /// File holding the webhook URL.
    pub url_file: Option<PathBuf>,
    /// Environment variable holding the bot's token (Slack, Mattermost).
    pub token_env: Option<String>,
    /// File holding the bot's token.
    pub token_file: Option<PathBuf>,
    /// The channel (bot mode): Slack's name or id, Mattermost's id.
    pub channel: Option<String>,
    /// The API (bot mode): Slack's (default `https://slack.com/api`), or the Mattermost server.
    pub api_url: Option<String>,
    /// Only these playbooks (default: all).
    #[serde(default)]
    pub playbooks: Vec<String>,
    /// Only these events (default: all): run_started, approval_needed, step_failed,
    /// run_finished, killswitch.
    #[serde(default)]
    pub events: Vec<String>,
}
