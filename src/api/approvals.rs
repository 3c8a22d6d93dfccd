//! Approval requests: list, show, approve, deny.

use super::auth::Identity;
use super::{ApiError, AppState, json_body};
use crate::store::{ApprovalState, ApprovalView, Decision};
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use serde::Deserialize;

/// Query of `GET /api/v1/approvals`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// `pending`, `approved`, `denied`, `expired`, `cancelled`.
    pub state: Option<String>,
    /// At most this many (default 100, at most 500).
    pub limit: Option<u32>,
}

/// Body of approve and deny.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionBody {
    /// Recorded with the decision.
    pub comment: Option<String>,
}

/// `GET /api/v1/approvals`
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Vec<ApprovalView>>, ApiError> {
    let Query(q) = query?;
    let wanted = match q.state.as_deref() {
        None => None,
        Some(s) => Some(ApprovalState::parse(s).ok_or_else(|| {
            let known: Vec<&str> = ApprovalState::ALL.iter().map(|a| a.as_str()).collect();
            ApiError::BadRequest(format!("unknown state {s:?} (known: {})", known.join(", ")))
        })?),
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest(
            "limit must be between 1 and 500".into(),
        ));
    }
    Ok(Json(state.store.list_approvals(wanted, limit).await?))
}

/// `GET /api/v1/approvals/{id}`
pub async fn get(
    State(state): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<ApprovalView>, ApiError> {
    let Path(id) = id?;
    state
        .store
        .get_approval(id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no approval {id}")))
}

/// `POST /api/v1/approvals/{id}/approve`
pub async fn approve(
    state: State<AppState>,
    who: Extension<Identity>,
    id: Result<Path<i64>, PathRejection>,
    body: Bytes,
) -> Result<Json<ApprovalView>, ApiError> {
    decide(state, who, id, body, true).await
}

/// `POST /api/v1/approvals/{id}/deny`
pub async fn deny(
    state: State<AppState>,
    who: Extension<Identity>,
    id: Result<Path<i64>, PathRejection>,
    body: Bytes,
) -> Result<Json<ApprovalView>, ApiError> {
    decide(state, who, id, body, false).await
}

async fn decide(
    State(state): State<AppState>,
    Extension(who): Extension<Identity>,
    id: Result<Path<i64>, PathRejection>,
    body: Bytes,
    approve: bool,
) -> Result<Json<ApprovalView>, ApiError> {
    let Path(id) = id?;
    // The body is optional: no comment.
    let body: DecisionBody = if body.iter().all(u8::is_ascii_whitespace) {
        DecisionBody::default()
    } else {
        json_body(&body)?
    };
    let decision = state
        .engine
        .decide(id, who.name.clone(), approve, body.comment)
        .await?;
    match decision {
        Decision::NotFound => return Err(ApiError::NotFound(format!("no approval {id}"))),
        Decision::NotPending(s) => {
            return Err(ApiError::Conflict(format!("approval {id} is already {s}")));
        }
        Decision::Expired => {
            return Err(ApiError::Conflict(format!(
                "approval {id} has expired; its run ended without acting"
            )));
        }
        Decision::Killed(reason) => {
            return Err(ApiError::Conflict(format!(
                "nothing can be approved now: {reason}"
            )));
        }
        Decision::NotAllowed => {
            return Err(ApiError::Status(
                axum::http::StatusCode::FORBIDDEN,
                format!(
                    "{} is not among the approvers this playbook names",
                    who.name
                ),
            ));
        }
        Decision::AlreadyApproved => {
            return Err(ApiError::Conflict(format!(
                "{} has already approved; another approver is needed",
                who.name
            )));
        }
        Decision::Recorded { .. } | Decision::Approved | Decision::Denied => {}
    }
    state
        .store
        .get_approval(id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no approval {id}")))
}
