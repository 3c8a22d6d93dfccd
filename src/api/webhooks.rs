//! Alert intake: Alertmanager webhook v4 and the generic alert JSON. An alert is answered 200
//! only once it is recorded; a store failure answers 503 so that Alertmanager retries.

use super::{ApiError, AppState};
use crate::alert::{Alert, AlertmanagerPayload, parse_generic};
use crate::store::Outcome;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use serde::Serialize;

/// The answer to a webhook.
#[derive(Debug, Serialize)]
pub struct IntakeResponse {
    /// Alerts recorded.
    pub alerts: usize,
    /// What each matched playbook did, per alert (same order as the payload).
    pub outcomes: Vec<Vec<Outcome>>,
}

/// `POST /api/v1/webhooks/alertmanager`
pub async fn alertmanager(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<IntakeResponse>, ApiError> {
    let body = body?;
    let de = &mut serde_json::Deserializer::from_slice(&body);
    let payload: AlertmanagerPayload = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." || path == "?" {
            String::new()
        } else {
            format!("at {path}: ")
        };
        ApiError::BadRequest(format!(
            "invalid Alertmanager payload: {at}{}",
            e.into_inner()
        ))
    })?;
    if payload.truncated_alerts > 0 {
        tracing::warn!(
            truncated = payload.truncated_alerts,
            group_key = %payload.group_key,
            "Alertmanager truncated this group (max_alerts); the left-out alerts were not received"
        );
    }
    let alerts = payload
        .into_alerts()
        .map_err(|e| ApiError::BadRequest(format!("invalid Alertmanager payload: {e}")))?;
    record(&state, alerts).await
}

/// `POST /api/v1/webhooks/generic`
pub async fn generic(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<IntakeResponse>, ApiError> {
    let body = body?;
    let now = crate::time::rfc3339(crate::time::now_ms());
    let alerts = parse_generic(&body, &now)
        .map_err(|e| ApiError::BadRequest(format!("invalid alert: {e}")))?;
    record(&state, alerts).await
}

async fn record(state: &AppState, alerts: Vec<Alert>) -> Result<Json<IntakeResponse>, ApiError> {
    let n = alerts.len();
    let outcomes = state.engine.intake(alerts).await?;
    Ok(Json(IntakeResponse {
        alerts: n,
        outcomes,
    }))
}
