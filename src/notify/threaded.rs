//! Chat through a bot (Slack's Web API, Mattermost's REST API), the way a colleague reports: one
//! message per run, edited in place as the run advances (started, waiting for approval, ended);
//! the details (a step that failed, what the evidence steps found) as replies in its thread,
//! images uploaded into that thread. The message a run's thread hangs on is recorded in the
//! store, so every replica (and a restarted daemon) edits the same one.

use super::sinks::{MattermostButtons, send};
use super::{DeliveryError, Event, Markup, Sink, evidence_text};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// Threads remembered per sink; beyond this the oldest are forgotten (read again from the store).
const MAX_THREADS: usize = 10_000;

/// One chat's API: post, edit, upload.
#[async_trait::async_trait]
pub(super) trait ChatApi: Send + Sync {
    /// Its markup.
    fn markup(&self) -> Markup;
    /// Characters of evidence text shown in one reply.
    fn limit(&self) -> usize;
    /// Posts a message (with approval buttons when `buttons` is an approval event), at the top
    /// or as a reply in `thread`; returns what finds it again.
    async fn post(
        &self,
        text: &str,
        buttons: Option<&Event>,
        thread: Option<&str>,
    ) -> Result<String, DeliveryError>;
    /// Replaces the text (and buttons) of a message `post` returned.
    async fn update(
        &self,
        message: &str,
        text: &str,
        buttons: Option<&Event>,
    ) -> Result<(), DeliveryError>;
    /// Uploads a file into `thread`.
    async fn upload(
        &self,
        thread: &str,
        name: &str,
        content_type: &str,
        data: Vec<u8>,
    ) -> Result<(), DeliveryError>;
}

/// A bot sink: one message per run, its thread for the details.
pub(super) struct Threaded<C> {
    pub(super) api: C,
    /// The sink's name (threads are kept per sink).
    pub(super) name: String,
    /// Where threads are recorded for every replica, and artifacts read; `None` in tests
    /// without a store.
    pub(super) store: Option<crate::store::Store>,
    pub(super) threads: Mutex<HashMap<i64, String>>,
    /// Evidence steps already shown, by run (an approval's evidence is not repeated at the end).
    pub(super) shown: Mutex<HashSet<(i64, String)>>,
}

impl<C: ChatApi> Threaded<C> {
    pub(super) fn new(api: C, name: &str, store: Option<&crate::store::Store>) -> Self {
        Threaded {
            api,
            name: name.to_string(),
            store: store.cloned(),
            threads: Mutex::new(HashMap::new()),
            shown: Mutex::new(HashSet::new()),
        }
    }

    /// The message a run's thread hangs on: known here, or recorded by another replica.
    async fn thread(&self, run_id: i64) -> Option<String> {
        let known = (self.threads.lock().unwrap_or_else(|p| p.into_inner()))
            .get(&run_id)
            .cloned();
        if known.is_some() {
            return known;
        }
        match self.store.as_ref()?.chat_thread(&self.name, run_id).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, run_id, "cannot read the run's chat thread; posting a new message");
                None
            }
        }
    }

    /// Keeps the message a run's first event posted (the one recorded first, when another
    /// replica posted one too); returns the one in force.
    async fn keep_thread(&self, run_id: i64, message: &str) -> String {
        let message = match &self.store {
            Some(store) => match store.set_chat_thread(&self.name, run_id, message).await {
                Ok(in_force) => in_force,
                Err(e) => {
                    tracing::warn!(error = %e, run_id, "cannot record the run's chat thread");
                    message.to_string()
                }
            },
            None => message.to_string(),
        };
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        if threads.len() >= MAX_THREADS {
            threads.clear();
        }
        threads.insert(run_id, message.clone());
        message
    }

    /// Replies with the evidence not shown yet: its text, and its images uploaded.
    async fn evidence(&self, event: &Event, thread: &str) -> Result<(), DeliveryError> {
        let Some(run) = event.run() else {
            return Ok(());
        };
        for ev in event.evidence() {
            let key = (run.id, ev.step.clone());
            if (self.shown.lock().unwrap_or_else(|p| p.into_inner())).contains(&key) {
                continue;
            }
            let text = evidence_text(self.api.markup(), run, ev, self.api.limit());
            self.api.post(&text, None, Some(thread)).await?;
            for a in ev
                .artifacts
                .iter()
                .filter(|a| a.content_type.starts_with("image/"))
            {
                let Some(store) = &self.store else { continue };
                let data = match store.artifact(run.id, &a.name).await {
                    Ok(Some((_, data))) => data,
                    Ok(None) => continue,
                    Err(e) => {
                        return Err(DeliveryError {
                            retry: true,
                            retry_after: None,
                            message: format!("cannot read artifact {}: {e}", a.name),
                        });
                    }
                };
                self.api
                    .upload(thread, &a.name, &a.content_type, data)
                    .await?;
            }
            // Shown once all of it went: a delivery tried again shows what did not.
            let mut shown = self.shown.lock().unwrap_or_else(|p| p.into_inner());
            if shown.len() >= MAX_THREADS {
                shown.clear();
            }
            shown.insert(key);
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl<C: ChatApi> Sink for Threaded<C> {
    async fn deliver(&self, event: &Event) -> Result<(), DeliveryError> {
        let text = event.text_for(self.api.markup());
        let Some(run) = event.run() else {
            return self.api.post(&text, None, None).await.map(drop);
        };
        let buttons = matches!(event, Event::ApprovalNeeded { .. }).then_some(event);
        let thread = match self.thread(run.id).await {
            // A failed step the run goes on after is a detail: a reply, the run's message stays.
            Some(t) if matches!(event, Event::StepFailed { .. }) => {
                self.api.post(&text, None, Some(&t)).await?;
                t
            }
            Some(t) => {
                self.api.update(&t, &text, buttons).await?;
                t
            }
            None => {
                let posted = self.api.post(&text, buttons, None).await?;
                self.keep_thread(run.id, &posted).await
            }
        };
        self.evidence(event, &thread).await
    }
}

/// An answer of Slack's Web API: `ok`, or the error it names.
fn slack_ok(answer: Value) -> Result<Value, DeliveryError> {
    if answer["ok"] == true {
        return Ok(answer);
    }
    let error = answer["error"].as_str().unwrap_or("unknown error");
    Err(DeliveryError {
        retry: error == "ratelimited",
        retry_after: None,
        message: format!("slack: {error}"),
    })
}

/// Slack with a bot token.
pub(super) struct SlackApi {
    pub(super) http: reqwest::Client,
    pub(super) api_url: String,
    pub(super) token: String,
    pub(super) channel: String,
    /// Approval messages carry Approve and Deny buttons (with `notify.slack_app`).
    pub(super) buttons: bool,
}

impl SlackApi {
    async fn call(&self, method: &str, body: &Value) -> Result<Value, DeliveryError> {
        let req = (self.http.post(format!("{}/{method}", self.api_url)))
            .bearer_auth(&self.token)
            .json(body);
        slack_ok(send(req).await?)
    }

    /// A message Slack returned: `channel ts` (the channel's id, which `chat.update` needs);
    /// a bare `ts` (recorded before) is in the configured channel.
    fn locate<'a>(&'a self, message: &'a str) -> (&'a str, &'a str) {
        message.split_once(' ').unwrap_or((&self.channel, message))
    }

    /// The text as blocks (with Approve and Deny buttons for an approval): an edit replaces the
    /// blocks, so buttons go once the approval is answered.
    fn blocks(&self, text: &str, buttons: Option<&Event>) -> Value {
        let with = super::sinks::with_buttons(json!({ "text": text }), buttons, self.buttons);
        with.get("blocks").cloned().unwrap_or_else(
            || json!([{ "type": "section", "text": { "type": "mrkdwn", "text": text } }]),
        )
    }
}

#[async_trait::async_trait]
impl ChatApi for SlackApi {
    fn markup(&self) -> Markup {
        Markup::Slack
    }

    fn limit(&self) -> usize {
        super::sinks::SLACK_LIMIT
    }

    async fn post(
        &self,
        text: &str,
        buttons: Option<&Event>,
        thread: Option<&str>,
    ) -> Result<String, DeliveryError> {
        let mut body =
            json!({ "channel": self.channel, "text": text, "blocks": self.blocks(text, buttons) });
        if let Some(t) = thread {
            let (channel, ts) = self.locate(t);
            body["channel"] = json!(channel);
            body["thread_ts"] = json!(ts);
        }
        let answer = self.call("chat.postMessage", &body).await?;
        let channel = answer["channel"].as_str().unwrap_or(&self.channel);
        let ts = answer["ts"].as_str().unwrap_or_default();
        Ok(format!("{channel} {ts}"))
    }

    async fn update(
        &self,
        message: &str,
        text: &str,
        buttons: Option<&Event>,
    ) -> Result<(), DeliveryError> {
        let (channel, ts) = self.locate(message);
        let body = json!({ "channel": channel, "ts": ts, "text": text, "blocks": self.blocks(text, buttons) });
        self.call("chat.update", &body).await.map(drop)
    }

    async fn upload(
        &self,
        thread: &str,
        name: &str,
        _content_type: &str,
        data: Vec<u8>,
    ) -> Result<(), DeliveryError> {
        let (channel, ts) = self.locate(thread);
        // Slack's file upload: ask where to put it, put it there, then share it in the thread.
        let length = data.len().to_string();
        let req = (self
            .http
            .post(format!("{}/files.getUploadURLExternal", self.api_url)))
        .bearer_auth(&self.token)
        .form(&[("filename", name), ("length", length.as_str())]);
        let slot = slack_ok(send(req).await?)?;
        let (Some(url), Some(file_id)) = (slot["upload_url"].as_str(), slot["file_id"].as_str())
        else {
            return Err(DeliveryError {
                retry: false,
                retry_after: None,
                message: "slack: no upload_url in files.getUploadURLExternal's answer".into(),
            });
        };
        send(self.http.post(url).body(data)).await?;
        let body = json!({ "files": [{ "id": file_id, "title": name }], "channel_id": channel, "thread_ts": ts });
        self.call("files.completeUploadExternal", &body)
            .await
            .map(drop)
    }
}

/// Mattermost with a bot's personal access token (API v4).
pub(super) struct MattermostApi {
    pub(super) http: reqwest::Client,
    /// The server (`https://mattermost.example.com`).
    pub(super) base: String,
    pub(super) token: String,
    /// The channel's id.
    pub(super) channel: String,
    /// Approve and Deny buttons (with `notify.mattermost_app`).
    pub(super) buttons: Option<MattermostButtons>,
}

impl MattermostApi {
    fn props(&self, text: &str, buttons: Option<&Event>) -> Value {
        let attachments = buttons
            .and_then(|e| super::sinks::mattermost_attachments(text, e, self.buttons.as_ref()));
        json!({ "attachments": attachments.unwrap_or_else(|| json!([])) })
    }
}

#[async_trait::async_trait]
impl ChatApi for MattermostApi {
    fn markup(&self) -> Markup {
        Markup::Markdown
    }

    fn limit(&self) -> usize {
        super::sinks::WEBHOOK_LIMIT
    }

    async fn post(
        &self,
        text: &str,
        buttons: Option<&Event>,
        thread: Option<&str>,
    ) -> Result<String, DeliveryError> {
        let mut body = json!({ "channel_id": self.channel, "message": text, "props": self.props(text, buttons) });
        if let Some(root) = thread {
            body["root_id"] = json!(root);
        }
        let req = (self.http.post(format!("{}/api/v4/posts", self.base)))
            .bearer_auth(&self.token)
            .json(&body);
        let answer = send(req).await?;
        Ok(answer["id"].as_str().unwrap_or_default().to_string())
    }

    async fn update(
        &self,
        message: &str,
        text: &str,
        buttons: Option<&Event>,
    ) -> Result<(), DeliveryError> {
        let body = json!({ "message": text, "props": self.props(text, buttons) });
        let req = (self
            .http
            .put(format!("{}/api/v4/posts/{message}/patch", self.base)))
        .bearer_auth(&self.token)
        .json(&body);
        send(req).await.map(drop)
    }

    async fn upload(
        &self,
        thread: &str,
        name: &str,
        content_type: &str,
        data: Vec<u8>,
    ) -> Result<(), DeliveryError> {
        let part = reqwest::multipart::Part::bytes(data)
            .file_name(name.to_string())
            .mime_str(content_type)
            .map_err(|e| DeliveryError {
                retry: false,
                retry_after: None,
                message: format!("mattermost: {e}"),
            })?;
        let form = reqwest::multipart::Form::new()
            .text("channel_id", self.channel.clone())
            .part("files", part);
        let req = (self.http.post(format!("{}/api/v4/files", self.base)))
            .bearer_auth(&self.token)
            .multipart(form);
        let answer = send(req).await?;
        let id = answer["file_infos"][0]["id"].as_str().unwrap_or_default();
        let body = json!({ "channel_id": self.channel, "root_id": thread, "message": name, "file_ids": [id] });
        let req = (self.http.post(format!("{}/api/v4/posts", self.base)))
            .bearer_auth(&self.token)
            .json(&body);
        send(req).await.map(drop)
    }
}
