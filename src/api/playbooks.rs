//! The playbooks in force.

use super::error::ErrorBody;
use super::{ApiError, AppState};
use axum::Json;
use axum::extract::State;
use serde::Serialize;

/// A playbook as listed by the API.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PlaybookView {
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Source file.
    pub file: String,
    /// Matchers, in Alertmanager syntax.
    pub matchers: Vec<String>,
    /// Statuses acted on.
    #[schema(value_type = Vec<String>)]
    pub statuses: Vec<&'static str>,
    /// Has a `when` condition.
    pub has_when: bool,
    /// Cooldown in seconds.
    pub cooldown_seconds: u64,
    /// Shadow mode: records without acting.
    #[serde(rename = "shadow")]
    pub dry_run: bool,
    /// Steps as `name (action)`.
    pub steps: Vec<String>,
    /// Autonomy earned by verified runs, and where the playbook stands (absent: the playbook
    /// does not earn it; its gates are what it says).
    pub autonomy: Option<AutonomyView>,
}

/// A playbook's autonomy.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AutonomyView {
    /// Its rules.
    pub rules: crate::policy::AutonomyRules,
    /// Its level, and its verified and failed runs in a row.
    #[serde(flatten)]
    pub standing: crate::policy::Standing,
    /// When its level last changed (absent: never).
    #[schema(value_type = Option<String>, format = DateTime)]
    pub changed_at: Option<crate::time::Timestamp>,
}

/// Where each playbook that earns autonomy stands (those without a row stand at the start).
pub(crate) async fn autonomy_views(
    state: &AppState,
) -> Result<std::collections::HashMap<String, AutonomyView>, ApiError> {
    let stored = state.store.standings().await?;
    let set = state.engine.playbooks();
    Ok((set.playbooks.iter())
        .filter_map(|p| {
            let rules = p.autonomy?;
            let row = stored.iter().find(|s| s.playbook == p.name);
            Some((
                p.name.clone(),
                AutonomyView {
                    rules,
                    standing: row.map(|r| r.standing).unwrap_or_default(),
                    changed_at: row.and_then(|r| r.changed_at),
                },
            ))
        })
        .collect())
}

/// `GET /api/v1/playbooks`
#[utoipa::path(
    get,
    path = "/api/v1/playbooks",
    tag = "viewer",
    description = "The playbooks in force. Role: viewer.",
    responses((status = 200, description = "Playbooks", body = Vec<PlaybookView>), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(("bearer" = ["viewer"]))
)]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<PlaybookView>>, ApiError> {
    let mut autonomy = autonomy_views(&state).await?;
    let set = state.engine.playbooks();
    Ok(Json(
        set.playbooks
            .iter()
            .map(|p| PlaybookView {
                name: p.name.clone(),
                description: p.description.clone(),
                file: p.file.display().to_string(),
                matchers: p.matchers.iter().map(ToString::to_string).collect(),
                statuses: p.statuses.iter().map(|s| s.as_str()).collect(),
                has_when: p.when.is_some(),
                cooldown_seconds: p.cooldown.as_secs(),
                dry_run: p.dry_run,
                steps: p
                    .steps
                    .iter()
                    .map(|s| format!("{} ({})", s.name, s.action.name()))
                    .collect(),
                autonomy: autonomy.remove(&p.name),
            })
            .collect(),
    ))
}

/// `POST /api/v1/playbooks/{name}/autonomy/reset`: back behind approval, counting from zero.
#[utoipa::path(
    post,
    path = "/api/v1/playbooks/{name}/autonomy/reset",
    tag = "admin",
    description = "Puts a playbook that earns autonomy back behind approval with a fresh count; audited and told in chat. Role: admin.",
    params(("name" = String, Path, description = "Playbook name")),
    responses((status = 200, description = "Where it stands now", body = crate::policy::Standing), (status = 404, description = "No such playbook", body = ErrorBody), (status = 409, description = "The playbook does not earn autonomy", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(("bearer" = ["admin"]))
)]
pub async fn reset_autonomy(
    State(state): State<AppState>,
    axum::Extension(who): axum::Extension<super::auth::Identity>,
    name: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<crate::policy::Standing>, ApiError> {
    let axum::extract::Path(name) = name?;
    match state.engine.playbooks().get(&name) {
        None => return Err(ApiError::NotFound(format!("no playbook {name:?}"))),
        Some(p) if p.autonomy.is_none() => {
            return Err(ApiError::Conflict(format!(
                "playbook {name:?} does not earn autonomy (it has no autonomy:)"
            )));
        }
        Some(_) => {}
    }
    Ok(Json(state.engine.reset_autonomy(&name, &who.name).await?))
}

/// `POST /api/v1/playbooks/reload`: 200 with the count, or 422 with every error (the set in
/// force stays).
#[utoipa::path(
    post,
    path = "/api/v1/playbooks/reload",
    tag = "admin",
    description = "Reloads reflex.yaml (tokens, sinks, inventory, clusters, windows, limits, retention) and the playbook directory, all or nothing: any error, or a change that takes a restart, changes nothing and is answered 422 with each error. Role: admin.",
    responses((status = 200, description = "How many were loaded", body = Object), (status = 422, description = "The new set is invalid; the previous one stays", body = ErrorBody), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(("bearer" = ["admin"]))
)]
pub async fn reload(
    State(state): State<AppState>,
    axum::Extension(who): axum::Extension<super::auth::Identity>,
) -> Result<Json<serde_json::Value>, super::ApiError> {
    match state.reloader.reload(&state, "api", &who.name).await {
        Ok(r) => Ok(Json(
            serde_json::json!({ "loaded": r.playbooks, "config": r.config }),
        )),
        Err(errors) => Err(super::ApiError::Invalid(
            "the new configuration is invalid; nothing changed".into(),
            errors,
        )),
    }
}

/// The body of a manual trigger.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggerBody {
    /// The labels the playbook's templates see (each key once, as in webhooks).
    #[serde(default, deserialize_with = "crate::alert::unique_map")]
    pub labels: crate::alert::Labels,
    /// Its annotations (each key once).
    #[serde(default, deserialize_with = "crate::alert::unique_map")]
    pub annotations: crate::alert::Labels,
}

/// `POST /api/v1/playbooks/{name}/runs`: runs a playbook for an operator, without an alert.
#[utoipa::path(
    post,
    path = "/api/v1/playbooks/{name}/runs",
    tag = "operator",
    description = "Runs a playbook without an alert; gates and the kill switch apply. Role: operator.",
    params(("name" = String, Path, description = "Playbook name")),
    request_body = TriggerBody,
    responses((status = 200, description = "What intake recorded", body = crate::store::Outcome), (status = 404, description = "Not found", body = ErrorBody), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(("bearer" = ["operator"]))
)]
pub async fn trigger(
    axum::extract::State(state): axum::extract::State<AppState>,
    axum::Extension(who): axum::Extension<super::auth::Identity>,
    name: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
    body: axum::body::Bytes,
) -> Result<axum::Json<crate::store::Outcome>, ApiError> {
    let axum::extract::Path(name) = name?;
    let mut body: TriggerBody = super::json_body(&body)?;
    // Chat and the console name a run by its alert's name: without one, the playbook's.
    body.labels
        .entry("alertname".into())
        .or_insert_with(|| name.clone());
    crate::alert::validate_labels(&body.labels, &body.annotations).map_err(ApiError::BadRequest)?;
    let outcome = (state.engine)
        .trigger(&name, body.labels, body.annotations, &who.name)
        .await?;
    Ok(axum::Json(outcome))
}
