//! One error type for every handler: 4xx carry a message for the caller; 5xx are logged once
//! here and answered generically.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An API error.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed or of the wrong shape.
    #[error("{0}")]
    BadRequest(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 409: the request conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// 413: the body is over the configured limit.
    #[error("{0}")]
    TooLarge(String),
    /// 503: cannot record right now; senders should retry.
    #[error("{0}")]
    Unavailable(String),
    /// Any other status with a message (e.g. a body rejection).
    #[error("{1}")]
    Status(StatusCode, String),
    /// 422: the request was understood but what it asks for is invalid; one detail per error.
    #[error("{0}")]
    Invalid(String, Vec<String>),
}

/// How every error is answered: `{"error": {"status": 404, "message": "…"}}`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// An error's status and message.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// The HTTP status.
    pub status: u16,
    /// What went wrong, and what to do about it.
    pub message: String,
    /// One line per problem (422 only).
    pub details: Option<Vec<String>>,
}

impl ApiError {
    /// The HTTP status it is answered with.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Status(s, _) => *s,
            ApiError::Invalid(..) => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), error = %self, "request failed");
        }
        let mut body =
            json!({ "error": { "status": status.as_u16(), "message": self.to_string() } });
        if let ApiError::Invalid(_, details) = &self {
            body["error"]["details"] = json!(details);
        }
        (status, Json(body)).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::Unavailable(format!(
            "the store is unavailable ({}); retry later",
            e.metric_label()
        ))
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(r: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::BadRequest(r.body_text())
    }
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(r: axum::extract::rejection::PathRejection) -> Self {
        ApiError::BadRequest(r.body_text())
    }
}

impl From<crate::engine::manual::ManualError> for ApiError {
    fn from(e: crate::engine::manual::ManualError) -> Self {
        use crate::engine::manual::ManualError as M;
        match e {
            M::NoPlaybook(_) | M::NoRun(_) => ApiError::NotFound(e.to_string()),
            M::NotRetryable { .. }
            | M::StepGone(_)
            | M::StillLive { .. }
            | M::NothingToUndo { .. } => ApiError::Conflict(e.to_string()),
            M::Store(e) => e.into(),
        }
    }
}
