//! Approval buttons answered from chat: Slack (`POST /api/v1/chat/slack/interactions`) and
//! Mattermost (`POST /api/v1/chat/mattermost/actions`).
//!
//! Slack signs each request with the app's signing secret: `X-Slack-Signature` is
//! `v0=` and the hex HMAC-SHA256 of `v0:{X-Slack-Request-Timestamp}:{body}`. A request is
//! taken only when that signature verifies (compared in constant time), its timestamp is
//! within five minutes, and it was not seen before (a replay within the window is refused).
//! The Slack user must be mapped to a token name in `notify.slack_app.users`; the decision is
//! then exactly the one `reflex approve` with that token would get, under the config in force
//! at the click (the token's role, the playbook's approvers, distinct approvals, expiry, the
//! kill switch), on the action the message showed (the button carries its hash). The message
//! is then updated in place through Slack's `response_url`, saying who decided; a refusal is
//! answered to the one who clicked only, counted and audited (bounded, as every refusal).

use super::auth::Identity;
use super::{ApiError, AppState};
use crate::notify::config::SlackApp;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{KeyInit, Mac};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Mutex;

/// How old a signed request may be.
const WINDOW_SECS: i64 = 300;

/// What verifying and answering Slack's requests needs.
pub struct Slack {
    secret: Vec<u8>,
    users: std::collections::BTreeMap<String, String>,
    response_url_prefix: String,
    /// Signatures seen within the window (replay protection), with their timestamps.
    seen: Mutex<HashMap<String, i64>>,
    http: reqwest::Client,
}

impl Slack {
    /// From `notify.slack_app`, reading the signing secret now.
    pub fn from_config(app: &SlackApp) -> Result<Slack, String> {
        let secret = app.secret_ref()?.read()?;
        Ok(Slack {
            secret: secret.into_bytes(),
            users: app.users.clone(),
            response_url_prefix: app.response_url_prefix.clone(),
            seen: Mutex::new(HashMap::new()),
            http: crate::executors::upstream_client(Some(std::time::Duration::from_secs(10))),
        })
    }

    /// Checks the signature, the timestamp and that the request is new.
    fn verify(&self, headers: &HeaderMap, body: &[u8], now_s: i64) -> Result<(), ApiError> {
        let unauthorized = |why: &str| ApiError::Status(StatusCode::UNAUTHORIZED, why.into());
        let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
        let ts = header("x-slack-request-timestamp")
            .and_then(|t| t.parse::<i64>().ok())
            .ok_or_else(|| unauthorized("no X-Slack-Request-Timestamp"))?;
        if (now_s - ts).abs() > WINDOW_SECS {
            return Err(unauthorized("the request is older than five minutes"));
        }
        let signature = header("x-slack-signature")
            .and_then(|s| s.strip_prefix("v0="))
            .and_then(|s| hex::decode(s).ok())
            .ok_or_else(|| unauthorized("no valid X-Slack-Signature"))?;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.secret)
            .map_err(|_| unauthorized("bad signing secret"))?;
        mac.update(format!("v0:{ts}:").as_bytes());
        mac.update(body);
        mac.verify_slice(&signature)
            .map_err(|_| unauthorized("the signature does not verify"))?;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, t| (now_s - *t).abs() <= WINDOW_SECS);
        if seen.insert(hex::encode(&signature), ts).is_some() {
            return Err(unauthorized("this request was already received (replay)"));
        }
        Ok(())
    }
}

/// `POST /api/v1/chat/slack/interactions`
#[utoipa::path(
    post,
    path = "/api/v1/chat/slack/interactions",
    tag = "chat",
    description = "Slack's interactivity callback (Approve and Deny buttons), form-encoded \
                   `payload`. Authenticated by Slack's request signature, not a token; the Slack \
                   user decides as the identity `notify.slack_app.users` maps it to.",
    request_body(content = String, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "Decided", body = Object),
        (status = 401, description = "Bad, old or replayed signature", body = super::error::ErrorBody),
        (status = 403, description = "The Slack user is not mapped, or not an approver here", body = super::error::ErrorBody),
        (status = 404, description = "No such approval, or Slack is not configured", body = super::error::ErrorBody),
        (status = 409, description = "Already decided, expired, or another action than shown", body = super::error::ErrorBody)
    ),
    security(())
)]
pub async fn slack_interactions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<axum::Json<Value>, ApiError> {
    let Some(slack) = state.slack.as_deref() else {
        return Err(ApiError::NotFound(
            "Slack interactivity is not configured (notify.slack_app)".into(),
        ));
    };
    slack.verify(&headers, &body, state.store.now_ms() / 1000)?;
    let payload = form_urlencoded::parse(&body)
        .find(|(k, _)| k == "payload")
        .map(|(_, v)| v.into_owned())
        .ok_or_else(|| ApiError::BadRequest("no payload field".into()))?;
    let payload: Value = serde_json::from_str(&payload)
        .map_err(|e| ApiError::BadRequest(format!("invalid payload: {e}")))?;
    let action = &payload["actions"][0];
    let approve = match action["action_id"].as_str() {
        Some("approve") => true,
        Some("deny") => false,
        other => return Err(ApiError::BadRequest(format!("unknown action {other:?}"))),
    };
    let (id, hash) = (action["value"].as_str())
        .and_then(|v| v.split_once(':'))
        .and_then(|(id, hash)| Some((id.parse::<i64>().ok()?, hash.to_string())))
        .ok_or_else(|| ApiError::BadRequest("the button carries no approval".into()))?;
    let user = payload["user"]["id"].as_str().unwrap_or_default();
    let response_url = (payload["response_url"].as_str())
        .filter(|url| url.starts_with(&slack.response_url_prefix));
    let decided = match slack.users.get(user) {
        Some(who) => decide(&state, id, &hash, who, approve, "from Slack").await,
        None => Err(ApiError::Status(
            StatusCode::FORBIDDEN,
            format!("Slack user {user} is not mapped to an approver (notify.slack_app.users)"),
        )),
    };
    let who = slack.users.get(user).map_or("", String::as_str);
    let verb = match decided {
        Ok(verb) => verb,
        Err(e) => {
            refused(&state, &format!("slack:{user}"), who, id, &e).await;
            // Answered in chat to the one who clicked only; the message stays as it was.
            if let Some(url) = response_url {
                let text = format!(
                    "Not decided: {}",
                    crate::notify::Markup::Slack.escape(&e.to_string())
                );
                let answer = json!({ "response_type": "ephemeral", "replace_original": false, "text": text });
                if let Err(e) = slack.http.post(url).json(&answer).send().await {
                    tracing::warn!(error = %e, "cannot answer in Slack");
                }
            }
            return Err(e);
        }
    };
    // The message, updated in place: what it asked, then who decided.
    if let Some(url) = response_url {
        let original = payload["message"]["text"].as_str().unwrap_or_default();
        let text = format!(
            "{original}\n{verb} by {} (approval {id}).",
            crate::notify::Markup::Slack.escape(who)
        );
        let update = json!({ "replace_original": true, "text": text });
        if let Err(e) = slack.http.post(url).json(&update).send().await {
            tracing::warn!(error = %e, "cannot update the Slack message");
        }
    }
    Ok(axum::Json(
        json!({ "approval": id, "decision": verb.to_lowercase(), "by": who }),
    ))
}

/// Counts and audits (bounded) a chat click that decided nothing.
async fn refused(state: &AppState, chat_user: &str, who: &str, id: i64, e: &ApiError) {
    let actor = if who.is_empty() {
        chat_user.to_string()
    } else {
        format!("{who} ({chat_user})")
    };
    let why = format!("approval {id}: {}: {e}", e.status().as_u16());
    let action = "chat decision";
    super::refusals::record(
        state,
        None,
        &actor,
        action,
        super::refusals::Reason::Chat,
        &why,
    )
    .await;
}

/// A decision from a chat button: on the action the message showed (`hash`), as the token
/// named `who` would decide, under the config in force at the click. Returns "Approved" or
/// "Denied".
async fn decide(
    state: &AppState,
    id: i64,
    hash: &str,
    who: &str,
    approve: bool,
    from: &str,
) -> Result<&'static str, ApiError> {
    let role = state.auth.load().role_by_name(who).ok_or_else(|| {
        ApiError::Status(
            StatusCode::FORBIDDEN,
            format!("{who} is not the name of a token in auth.tokens; nothing was decided"),
        )
    })?;
    let who = Identity {
        name: who.to_string(),
        role,
    };
    let request = super::approvals::DecisionRequest {
        id,
        who: &who,
        approve,
        comment: Some(from.to_string()),
        shown_hash: Some(hash),
    };
    super::approvals::decide_one(state, request).await?;
    Ok(if approve { "Approved" } else { "Denied" })
}

/// What answering Mattermost's button calls needs.
pub struct Mattermost {
    secret: String,
    users: std::collections::BTreeMap<String, String>,
}

impl Mattermost {
    /// From `notify.mattermost_app`, reading the shared secret now.
    pub fn from_config(app: &crate::notify::config::MattermostApp) -> Result<Mattermost, String> {
        let secret = app.secret_ref()?.read()?;
        Ok(Mattermost {
            secret,
            users: app.users.clone(),
        })
    }
}

/// Equal, in time that does not depend on where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /api/v1/chat/mattermost/actions`
#[utoipa::path(
    post,
    path = "/api/v1/chat/mattermost/actions",
    tag = "chat",
    description = "Mattermost's interactive message action (Approve and Deny buttons). \
                   Authenticated by the shared secret the button carries, not a token; the \
                   Mattermost user decides as the identity `notify.mattermost_app.users` maps it to.",
    request_body = Object,
    responses(
        (status = 200, description = "Decided (the post is updated), or refused (`refused`, with the status the API would give, and `ephemeral_text` for the one who clicked)", body = Object),
        (status = 401, description = "Missing or wrong secret", body = super::error::ErrorBody),
        (status = 404, description = "Mattermost is not configured", body = super::error::ErrorBody)
    ),
    security(())
)]
pub async fn mattermost_actions(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<axum::Json<Value>, ApiError> {
    let Some(mm) = state.mattermost.as_deref() else {
        return Err(ApiError::NotFound(
            "Mattermost actions are not configured (notify.mattermost_app)".into(),
        ));
    };
    let call: Value = super::json_body(&body)?;
    let context = &call["context"];
    let given = context["secret"].as_str().unwrap_or_default();
    if !constant_time_eq(given.as_bytes(), mm.secret.as_bytes()) {
        return Err(ApiError::Status(
            StatusCode::UNAUTHORIZED,
            "the action does not carry the shared secret".into(),
        ));
    }
    let approve = match context["action"].as_str() {
        Some("approve") => true,
        Some("deny") => false,
        other => return Err(ApiError::BadRequest(format!("unknown action {other:?}"))),
    };
    let (Some(id), Some(hash)) = (context["approval"].as_i64(), context["hash"].as_str()) else {
        return Err(ApiError::BadRequest(
            "the button carries no approval".into(),
        ));
    };
    let user = call["user_id"].as_str().unwrap_or_default();
    let decided = match mm.users.get(user) {
        Some(who) => decide(&state, id, hash, who, approve, "from Mattermost").await,
        None => Err(ApiError::Status(
            StatusCode::FORBIDDEN,
            format!(
                "Mattermost user {user} is not mapped to an approver (notify.mattermost_app.users)"
            ),
        )),
    };
    let who = mm.users.get(user).map_or("", String::as_str);
    match decided {
        Ok(verb) => {
            let by = crate::notify::Markup::Markdown.escape(who);
            Ok(axum::Json(json!({
                "update": { "message": format!("{verb} by {by} (approval {id}).") },
            })))
        }
        Err(e) => {
            refused(&state, &format!("mattermost:{user}"), who, id, &e).await;
            // Mattermost shows `ephemeral_text` to the one who clicked, and only on a 200; the
            // post stays as it was. `refused` carries the status the API would have given.
            let text = crate::notify::Markup::Markdown.escape(&e.to_string());
            Ok(axum::Json(json!({
                "ephemeral_text": format!("Not decided: {text}"),
                "refused": { "status": e.status().as_u16(), "message": e.to_string() },
            })))
        }
    }
}
