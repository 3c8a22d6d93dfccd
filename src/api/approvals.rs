//! Approval requests: list, show, approve, deny.

use super::auth::{Identity, allows};
use super::auth_config::Role;
use super::error::ErrorBody;
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
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecisionBody {
    /// Recorded with the decision.
    pub comment: Option<String>,
}

/// `GET /api/v1/approvals`
#[utoipa::path(
    get,
    path = "/api/v1/approvals",
    tag = "viewer",
    description = "Approval requests. Role: viewer.",
    params(("state" = Option<String>, Query, description = "pending, approved, denied, expired, cancelled"), ("limit" = Option<u32>, Query, description = "At most this many")),
    responses((status = 200, description = "Approvals", body = Vec<crate::store::ApprovalView>), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(("bearer" = ["viewer"]))
)]
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
#[utoipa::path(
    get,
    path = "/api/v1/approvals/{id}",
    tag = "viewer",
    description = "One approval request. Role: viewer.",
    params(("id" = i64, Path, description = "Approval id")),
    responses((status = 200, description = "The approval", body = crate::store::ApprovalView), (status = 404, description = "Not found", body = ErrorBody), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(("bearer" = ["viewer"]))
)]
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
#[utoipa::path(
    post,
    path = "/api/v1/approvals/{id}/approve",
    tag = "approver",
    description = "Approves exactly the action shown. Role: approver.",
    params(("id" = i64, Path, description = "Approval id")),
    request_body = DecisionBody,
    responses((status = 200, description = "The approval after the decision", body = crate::store::ApprovalView), (status = 404, description = "Not found", body = ErrorBody), (status = 409, description = "Conflicts with the current state", body = ErrorBody), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(("bearer" = ["approver"]))
)]
pub async fn approve(
    state: State<AppState>,
    who: Extension<Identity>,
    id: Result<Path<i64>, PathRejection>,
    body: Bytes,
) -> Result<Json<ApprovalView>, ApiError> {
    decide(state, who, id, body, true).await
}

/// `POST /api/v1/approvals/{id}/deny`
#[utoipa::path(
    post,
    path = "/api/v1/approvals/{id}/deny",
    tag = "approver",
    description = "Denies; the run ends without acting. Role: approver.",
    params(("id" = i64, Path, description = "Approval id")),
    request_body = DecisionBody,
    responses((status = 200, description = "The approval after the decision", body = crate::store::ApprovalView), (status = 404, description = "Not found", body = ErrorBody), (status = 409, description = "Conflicts with the current state", body = ErrorBody), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(("bearer" = ["approver"]))
)]
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
    decide_one(
        &state,
        DecisionRequest {
            id,
            who: &who,
            approve,
            comment: body.comment,
            shown_hash: None,
        },
    )
    .await?;
    state
        .store
        .get_approval(id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no approval {id}")))
}

/// An approver's decision, from wherever it comes (the API, the console, a chat button).
pub(super) struct DecisionRequest<'a> {
    /// The approval.
    pub id: i64,
    /// Who decides, with their role now.
    pub who: &'a Identity,
    /// Approve, or deny.
    pub approve: bool,
    /// Recorded with it.
    pub comment: Option<String>,
    /// The action hash the decider was shown (chat buttons carry it): another action than
    /// that is not decided.
    pub shown_hash: Option<&'a str>,
}

/// The one path of every approval decision: the comment's length, the role, the action
/// shown, then the store's rules (approvers, distinct approvals, expiry, the kill switch).
/// `Ok` when recorded (a vote, or the decision); else why not, as the API answers it, for
/// each edge to render.
pub(super) async fn decide_one(state: &AppState, r: DecisionRequest<'_>) -> Result<(), ApiError> {
    let (id, who) = (r.id, &r.who.name);
    check_comment(r.comment.as_deref())?;
    if !allows(r.who.role, Role::Approver) {
        return Err(ApiError::Status(
            axum::http::StatusCode::FORBIDDEN,
            format!(
                "{who} has the {} role; deciding needs the approver role",
                super::console::role_name(r.who.role)
            ),
        ));
    }
    if let Some(hash) = r.shown_hash {
        let approval = (state.store.get_approval(id).await?)
            .ok_or_else(|| ApiError::NotFound(format!("no approval {id}")))?;
        if approval.action_hash != hash {
            return Err(ApiError::Conflict(format!(
                "approval {id} covers another action than the one shown; nothing was decided"
            )));
        }
    }
    let decision = (state.engine)
        .decide(id, who.clone(), r.approve, r.comment)
        .await?;
    match refusal(id, who, decision) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A comment longer than [`super::MAX_TEXT_BYTES`] is refused (nothing is decided).
pub(super) fn check_comment(comment: Option<&str>) -> Result<(), ApiError> {
    match comment {
        Some(c) if c.len() > super::MAX_TEXT_BYTES => Err(ApiError::BadRequest(format!(
            "the comment is {} bytes; at most {} are kept",
            c.len(),
            super::MAX_TEXT_BYTES
        ))),
        _ => Ok(()),
    }
}

/// Why a decision was not recorded, as the API answers it; `None` when it was.
fn refusal(id: i64, who: &str, decision: Decision) -> Option<ApiError> {
    Some(match decision {
        Decision::NotFound => ApiError::NotFound(format!("no approval {id}")),
        Decision::NotPending(s) => ApiError::Conflict(format!("approval {id} is already {s}")),
        Decision::Expired => ApiError::Conflict(format!(
            "approval {id} has expired; its run ended without acting"
        )),
        Decision::Killed(reason) => {
            ApiError::Conflict(format!("nothing can be approved now: {reason}"))
        }
        Decision::NotAllowed => ApiError::Status(
            axum::http::StatusCode::FORBIDDEN,
            format!("{who} is not among the approvers this playbook names"),
        ),
        Decision::AlreadyApproved => ApiError::Conflict(format!(
            "{who} has already approved; another approver is needed"
        )),
        Decision::Recorded { .. } | Decision::Approved | Decision::Denied => return None,
    })
}
