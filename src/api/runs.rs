//! Run history and control: list, detail, cancel, retry.

use super::error::ErrorBody;
use super::{ApiError, AppState};
use crate::engine::CancelResult;
use crate::store::{RunFilter, RunState, RunView};
use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Default and largest page size.
const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 500;

/// Query of `GET /api/v1/runs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only this playbook.
    pub playbook: Option<String>,
    /// Only this state.
    pub state: Option<String>,
    /// Only this target.
    pub target: Option<String>,
    /// Cursor: runs with an id below this.
    pub before: Option<i64>,
    /// Page size (1..=500, default 50).
    pub limit: Option<u32>,
}

/// A page of runs.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RunPage {
    /// Runs, newest first.
    pub runs: Vec<RunView>,
    /// Pass as `before` for the next page; absent on the last page.
    pub next_before: Option<i64>,
}

/// `GET /api/v1/runs`
#[utoipa::path(
    get,
    path = "/api/v1/runs",
    tag = "viewer",
    description = "Runs, newest first; `next_before` pages. Role: viewer.",
    params(("playbook" = Option<String>, Query, description = "Only this playbook"), ("state" = Option<String>, Query, description = "Only this state"), ("target" = Option<String>, Query, description = "Only this target"), ("before" = Option<i64>, Query, description = "Runs with a smaller id"), ("limit" = Option<u32>, Query, description = "Page size, 1-500")),
    responses((status = 200, description = "A page of runs", body = RunPage), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(("bearer" = ["viewer"]))
)]
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<RunPage>, ApiError> {
    let Query(q) = query?;
    let run_state = match q.state.as_deref() {
        None => None,
        Some(s) => Some(RunState::parse(s).ok_or_else(|| {
            let known: Vec<_> = RunState::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::BadRequest(format!("unknown state {s:?} (known: {})", known.join(", ")))
        })?),
    };
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    let mut runs = state
        .store
        .list_runs(RunFilter {
            playbook: q.playbook,
            state: run_state,
            target: q.target,
            before: q.before,
            limit,
        })
        .await?;
    for run in &mut runs {
        state.engine.show_live(run);
    }
    let next_before = (runs.len() == limit as usize)
        .then(|| runs.last().map(|r| r.id))
        .flatten();
    Ok(Json(RunPage { runs, next_before }))
}

/// `GET /api/v1/runs/{id}`
#[utoipa::path(
    get,
    path = "/api/v1/runs/{id}",
    tag = "viewer",
    description = "One run with its steps. Role: viewer.",
    params(("id" = i64, Path, description = "Run id")),
    responses((status = 200, description = "The run", body = crate::store::RunView), (status = 404, description = "Not found", body = ErrorBody), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(("bearer" = ["viewer"]))
)]
pub async fn get(
    State(state): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<RunView>, ApiError> {
    let Path(id) = id?;
    let mut run = (state.store.get_run(id).await?)
        .ok_or_else(|| ApiError::NotFound(format!("no run {id}")))?;
    state.engine.show_live(&mut run);
    Ok(Json(run))
}

/// `GET /api/v1/runs/{id}/artifacts/{name}`
#[utoipa::path(
    get,
    path = "/api/v1/runs/{id}/artifacts/{name}",
    tag = "viewer",
    description = "One artifact of a run (a graph, a log), as its steps' `artifacts` list it, with its own content type. Role: viewer.",
    params(("id" = i64, Path, description = "Run id"), ("name" = String, Path, description = "Artifact name")),
    responses((status = 200, description = "The artifact's bytes"), (status = 404, description = "No such run, or no artifact of that name in it", body = ErrorBody), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(("bearer" = ["viewer"]))
)]
pub async fn artifact(
    State(state): State<AppState>,
    path: Result<Path<(i64, String)>, PathRejection>,
) -> Result<axum::response::Response, ApiError> {
    let Path((id, name)) = path?;
    serve_artifact(&state.store, id, &name).await
}

/// An artifact's bytes with its content type. What a step produced is shown, never run: the
/// browser may not guess another type, and a document served here has no script.
pub(super) async fn serve_artifact(
    store: &crate::store::Store,
    id: i64,
    name: &str,
) -> Result<axum::response::Response, ApiError> {
    use axum::http::header;
    let (content_type, data) = store
        .artifact(id, name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("run {id} has no artifact {name:?}")))?;
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
            (header::CONTENT_SECURITY_POLICY, "sandbox".to_string()),
            (header::CACHE_CONTROL, "private, max-age=3600".to_string()),
        ],
        data,
    )
        .into_response())
}

/// `POST /api/v1/runs/{id}/cancel`
#[utoipa::path(
    post,
    path = "/api/v1/runs/{id}/cancel",
    tag = "operator",
    description = "Cancels a run: at once if it has not started; a running run stops its step under way (an SSH command's remote processes, an HTTP request, a wait or a poll) and shows `cancelling` until it has. Role: operator.",
    params(("id" = i64, Path, description = "Run id")),
    responses((status = 200, description = "Cancelled, or the run stops before its next step", body = Object), (status = 404, description = "Not found", body = ErrorBody), (status = 409, description = "Conflicts with the current state", body = ErrorBody), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(("bearer" = ["operator"]))
)]
pub async fn cancel(
    State(state): State<AppState>,
    axum::Extension(who): axum::Extension<super::auth::Identity>,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(id) = id?;
    match state.engine.cancel_by(id, &who.name).await? {
        CancelResult::NotFound => Err(ApiError::NotFound(format!("no run {id}"))),
        CancelResult::Cancelled => Ok(Json(json!({ "id": id, "state": RunState::Cancelled }))),
        CancelResult::Requested => Ok(Json(
            json!({ "id": id, "state": RunState::Cancelling, "message": "the step under way is being stopped; the run ends cancelled" }),
        )),
        CancelResult::AlreadyFinished(s) => {
            Err(ApiError::Conflict(format!("run {id} already ended: {s}")))
        }
    }
}

/// The body of a retry (optional).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryBody {
    /// Repeat every step, not only from the one that did not succeed.
    #[serde(default)]
    pub from_start: bool,
}

/// `POST /api/v1/runs/{id}/retry`: a new run from a failed, interrupted, expired or killed one.
#[utoipa::path(
    post,
    path = "/api/v1/runs/{id}/retry",
    tag = "operator",
    description = "A new run from a failed, interrupted, expired or killed one. Role: operator.",
    params(("id" = i64, Path, description = "Run id")),
    request_body = Option<RetryBody>,
    responses((status = 200, description = "What intake recorded", body = crate::store::Outcome), (status = 404, description = "Not found", body = ErrorBody), (status = 409, description = "Conflicts with the current state", body = ErrorBody), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(("bearer" = ["operator"]))
)]
pub async fn retry(
    State(state): State<AppState>,
    axum::Extension(who): axum::Extension<super::auth::Identity>,
    id: Result<Path<i64>, PathRejection>,
    body: axum::body::Bytes,
) -> Result<Json<crate::store::Outcome>, ApiError> {
    let Path(id) = id?;
    let body: RetryBody = super::optional_body(&body)?;
    let retry = crate::engine::manual::Retry {
        run_id: id,
        from_start: body.from_start,
    };
    Ok(Json(state.engine.retry(retry, &who.name).await?))
}

/// The body of an undo (optional).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UndoBody {
    /// Overwrite fields changed since the run (admin only); otherwise such a step is refused.
    #[serde(default)]
    pub force: bool,
}

/// What an undo recorded, and what it does and leaves alone.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct UndoAnswer {
    /// The undo run, as intake recorded it.
    pub outcome: crate::store::Outcome,
    /// Its steps and the run's steps it leaves alone.
    pub undo: crate::engine::undo::UndoPlan,
}

/// `POST /api/v1/runs/{id}/undo`: a new run that takes back what a run changed.
#[utoipa::path(
    post,
    path = "/api/v1/runs/{id}/undo",
    tag = "operator",
    description = "A new run (\"undo of #ID\") that restores what each step of an ended run changed, last change first, each only if the object still holds the value the run left (`force`, admin only, overwrites). Actions that cannot be undone are listed in `undo.skipped`. It passes the kill switch, the breaker and the gates of the steps it reverses. Role: operator (admin with `force`).",
    params(("id" = i64, Path, description = "Run id")),
    request_body = Option<UndoBody>,
    responses((status = 200, description = "What intake recorded, and the undo's plan", body = UndoAnswer), (status = 404, description = "Not found", body = ErrorBody), (status = 409, description = "Still live, or nothing to undo", body = ErrorBody), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(("bearer" = ["operator"]))
)]
pub async fn undo(
    State(state): State<AppState>,
    axum::Extension(who): axum::Extension<super::auth::Identity>,
    id: Result<Path<i64>, PathRejection>,
    body: axum::body::Bytes,
) -> Result<Json<UndoAnswer>, ApiError> {
    let Path(id) = id?;
    let body: UndoBody = super::optional_body(&body)?;
    if body.force && !super::auth::allows(who.role, crate::config::Role::Admin) {
        return Err(ApiError::Status(
            axum::http::StatusCode::FORBIDDEN,
            "force overwrites changes made since the run: it needs the admin role".into(),
        ));
    }
    let (outcome, undo) = state.engine.undo(id, body.force, &who.name).await?;
    Ok(Json(UndoAnswer { outcome, undo }))
}
