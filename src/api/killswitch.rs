//! The kill switch, global and per playbook.

use super::auth::Identity;
use super::error::ErrorBody;
use super::{ApiError, AppState, json_body};
use crate::store::{GLOBAL, Switch, playbook_scope};
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

/// Body of `PUT …/killswitch`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchBody {
    /// Engage (true) or release (false).
    pub engaged: bool,
    /// Why; required to engage.
    pub reason: Option<String>,
    /// Release automatically at this time (RFC 3339).
    pub until: Option<String>,
    /// Release automatically after this long (e.g. `2h`).
    #[serde(rename = "for")]
    pub for_: Option<String>,
    /// Engage a switch that is engaged already, replacing its reason and end (otherwise 409).
    pub replace: Option<bool>,
}

/// The switches in force.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SwitchState {
    /// The global switch.
    pub global: Switch,
    /// Per-playbook switches that were ever set.
    pub playbooks: Vec<Switch>,
}

pub(crate) fn released(scope: &str) -> Switch {
    Switch {
        scope: scope.to_string(),
        engaged: false,
        reason: None,
        actor: None,
        changed_at: None,
        until: None,
    }
}

pub(crate) async fn current(state: &AppState) -> Result<SwitchState, ApiError> {
    let all = state.store.switches().await?;
    let (global, playbooks): (Vec<Switch>, Vec<Switch>) =
        all.into_iter().partition(|s| s.scope == GLOBAL);
    Ok(SwitchState {
        global: global
            .into_iter()
            .next()
            .unwrap_or_else(|| released(GLOBAL)),
        playbooks,
    })
}

/// `GET /api/v1/killswitch`
#[utoipa::path(
    get,
    path = "/api/v1/killswitch",
    tag = "viewer",
    description = "The kill switches. Role: viewer.",
    responses((status = 200, description = "Global and per-playbook switches", body = SwitchState), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(("bearer" = ["viewer"]))
)]
pub async fn get(State(state): State<AppState>) -> Result<Json<SwitchState>, ApiError> {
    Ok(Json(current(&state).await?))
}

/// `PUT /api/v1/killswitch`
#[utoipa::path(
    put,
    path = "/api/v1/killswitch",
    tag = "admin",
    description = "Engages or releases the global kill switch. Role: admin.",
    request_body = SwitchBody,
    responses((status = 200, description = "The switches after the change", body = SwitchState), (status = 409, description = "Engaged already (send replace)", body = ErrorBody), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(("bearer" = ["admin"]))
)]
pub async fn put(
    state: State<AppState>,
    who: Extension<Identity>,
    body: Bytes,
) -> Result<Json<SwitchState>, ApiError> {
    set(state, who, GLOBAL.to_string(), body).await
}

/// `GET /api/v1/playbooks/{name}/killswitch`
#[utoipa::path(
    get,
    path = "/api/v1/playbooks/{name}/killswitch",
    tag = "viewer",
    description = "One playbook's kill switch. Role: viewer.",
    params(("name" = String, Path, description = "Playbook name")),
    responses((status = 200, description = "The switch", body = crate::store::Switch), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(("bearer" = ["viewer"]))
)]
pub async fn get_playbook(
    State(state): State<AppState>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Switch>, ApiError> {
    let Path(name) = name?;
    let scope = playbook_scope(&name);
    let all = state.store.switches().await?;
    Ok(Json(
        all.into_iter()
            .find(|s| s.scope == scope)
            .unwrap_or_else(|| released(&scope)),
    ))
}

/// `PUT /api/v1/playbooks/{name}/killswitch`
#[utoipa::path(
    put,
    path = "/api/v1/playbooks/{name}/killswitch",
    tag = "admin",
    description = "Engages or releases one playbook's kill switch. Role: admin.",
    params(("name" = String, Path, description = "Playbook name")),
    request_body = SwitchBody,
    responses((status = 200, description = "The switches after the change", body = SwitchState), (status = 404, description = "Not found", body = ErrorBody), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(("bearer" = ["admin"]))
)]
pub async fn put_playbook(
    state: State<AppState>,
    who: Extension<Identity>,
    name: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Result<Json<SwitchState>, ApiError> {
    let Path(name) = name?;
    if state.engine.playbooks().get(&name).is_none() {
        return Err(ApiError::NotFound(format!("no playbook {name:?}")));
    }
    set(state, who, playbook_scope(&name), body).await
}

async fn set(
    State(state): State<AppState>,
    Extension(who): Extension<Identity>,
    scope: String,
    body: Bytes,
) -> Result<Json<SwitchState>, ApiError> {
    apply(&state, &who.name, scope, json_body(&body)?).await?;
    Ok(Json(current(&state).await?))
}

/// Engages or releases the switch of `scope` as `body` asks (shared by the API and the
/// console).
pub(crate) async fn apply(
    state: &AppState,
    who: &str,
    scope: String,
    body: SwitchBody,
) -> Result<(), ApiError> {
    let reason = body.reason.unwrap_or_default().trim().to_string();
    if reason.len() > super::MAX_TEXT_BYTES {
        return Err(ApiError::BadRequest(format!(
            "the reason is {} bytes; at most {} are kept",
            reason.len(),
            super::MAX_TEXT_BYTES
        )));
    }
    if body.engaged && reason.is_empty() {
        return Err(ApiError::BadRequest(
            "a reason is required to engage the kill switch".into(),
        ));
    }
    let until = match (body.until.as_deref(), body.for_.as_deref()) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "give `until` or `for`, not both".into(),
            ));
        }
        (Some(t), None) => {
            let t = crate::time::Timestamp::parse(t)
                .map_err(|e| ApiError::BadRequest(format!("until: {e}")))?;
            Some(t.ms())
        }
        (None, Some(d)) => {
            let d = crate::time::parse_duration(d).map_err(ApiError::BadRequest)?;
            // An absurd duration ends never, rather than overflowing.
            let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
            Some(state.store.now_ms().saturating_add(ms))
        }
        (None, None) => None,
    };
    if !body.engaged && until.is_some() {
        return Err(ApiError::BadRequest(
            "`until`/`for` only apply when engaging".into(),
        ));
    }
    let reason = if reason.is_empty() {
        "released".to_string()
    } else {
        reason
    };
    let replace = body.replace.unwrap_or(false);
    if let Some(held) = (state.engine)
        .set_switch(crate::store::SwitchChange {
            scope,
            engaged: body.engaged,
            reason,
            actor: who.to_string(),
            until,
            replace,
        })
        .await?
    {
        return Err(ApiError::Conflict(format!(
            "{held}; nothing was changed (send \"replace\": true, or `reflex kill --replace`, \
             to replace its reason)"
        )));
    }
    Ok(())
}
