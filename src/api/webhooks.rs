//! Alert intake: Alertmanager webhook v4 and the generic alert JSON. An alert is answered 200
//! only once it is recorded; a store failure answers 503 so that Alertmanager retries.

use super::error::ErrorBody;
use super::{ApiError, AppState};
use crate::alert::{Alert, AlertmanagerPayload, parse_generic, parse_json};
use crate::store::Outcome;
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::HeaderMap;
use http_body_util::BodyExt;
use serde::Serialize;

/// The answer to a webhook.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IntakeResponse {
    /// Alerts recorded.
    pub alerts: usize,
    /// What each matched playbook did, per alert planned in time (same order as the payload).
    pub outcomes: Vec<Vec<Outcome>>,
    /// The alerts after those: their playbooks took longer to evaluate than
    /// `intake.plan_request_budget`, so they were stored and are planned after this answer
    /// (their runs show in `GET /api/v1/runs`). Retrying changes nothing.
    pub deferred: usize,
}

/// `POST /api/v1/webhooks/alertmanager`
#[utoipa::path(
    post,
    path = "/api/v1/webhooks/alertmanager",
    tag = "webhook",
    description = "Alertmanager webhook payload, version 4. Role: webhook.",
    request_body = Object,
    responses((status = 200, description = "Recorded", body = IntakeResponse), (status = 413, description = "Body over intake.max_body_bytes", body = ErrorBody), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(("bearer" = ["webhook"]))
)]
pub async fn alertmanager(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<IntakeResponse>, ApiError> {
    let received_us = crate::time::now_us();
    let body = read_body(&headers, body, state.max_body_bytes).await?;
    let payload: AlertmanagerPayload = parse_json(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid Alertmanager payload: {e}")))?;
    if payload.truncated_alerts > 0 {
        state.engine.note_truncated(payload.truncated_alerts);
        tracing::warn!(
            truncated = payload.truncated_alerts,
            group_key = %payload.group_key,
            "Alertmanager truncated this group (max_alerts); the left-out alerts were not received"
        );
    }
    let alerts = payload
        .into_alerts()
        .map_err(|e| ApiError::BadRequest(format!("invalid Alertmanager payload: {e}")))?;
    record(&state, alerts, received_us).await
}

/// `POST /api/v1/webhooks/generic`
#[utoipa::path(
    post,
    path = "/api/v1/webhooks/generic",
    tag = "webhook",
    description = "One generic alert object, or a list. Role: webhook.",
    request_body = Object,
    responses((status = 200, description = "Recorded", body = IntakeResponse), (status = 413, description = "Body over intake.max_body_bytes", body = ErrorBody), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(("bearer" = ["webhook"]))
)]
pub async fn generic(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<IntakeResponse>, ApiError> {
    let received_us = crate::time::now_us();
    let body = read_body(&headers, body, state.max_body_bytes).await?;
    let now = crate::time::rfc3339(state.store.now_ms());
    let alerts = parse_generic(&body, &now)
        .map_err(|e| ApiError::BadRequest(format!("invalid alert: {e}")))?;
    record(&state, alerts, received_us).await
}

async fn record(
    state: &AppState,
    alerts: Vec<Alert>,
    received_us: i64,
) -> Result<Json<IntakeResponse>, ApiError> {
    let n = alerts.len();
    let intake = state.engine.intake(alerts, received_us).await?;
    Ok(Json(IntakeResponse {
        alerts: n,
        outcomes: intake.outcomes,
        deferred: intake.deferred,
    }))
}

/// An oversized body is still read (and dropped) up to this many times the limit, so that the
/// sender gets the 413 and its message rather than a connection reset mid-upload; beyond
/// that the connection is closed unread, bounding the work a sender can cause.
const DRAIN_FACTOR: usize = 8;

/// Reads a body of at most `limit` bytes.
async fn read_body(headers: &HeaderMap, mut body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::TooLarge(format!(
            "request body is over the limit of {limit} bytes (intake.max_body_bytes)"
        ))
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit.saturating_mul(DRAIN_FACTOR)) {
        return Err(too_large());
    }
    let mut buf = Vec::with_capacity(declared.unwrap_or(0).min(limit));
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::BadRequest(format!("cannot read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        if seen > limit.saturating_mul(DRAIN_FACTOR) {
            return Err(too_large());
        }
        if seen <= limit {
            buf.extend_from_slice(&data);
        }
    }
    if seen > limit {
        return Err(too_large());
    }
    Ok(buf.into())
}
