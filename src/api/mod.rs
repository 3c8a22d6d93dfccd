//! The HTTP API (axum): alert intake and operator control. `router(state)` builds it so that
//! tests can drive it without a socket.

mod error;
mod playbooks;
mod runs;
mod webhooks;

pub use error::ApiError;

use crate::engine::Engine;
use crate::store::Store;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use std::sync::Arc;

/// State shared by all handlers.
#[derive(Clone)]
pub struct AppState {
    /// The engine.
    pub engine: Arc<Engine>,
    /// The store.
    pub store: Store,
    /// Largest webhook body accepted (`intake.max_body_bytes`).
    pub max_body_bytes: usize,
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    // Webhooks read their bodies themselves (see `webhooks::read_body`); this bounds the rest.
    let max_body_bytes = state.max_body_bytes;
    Router::new()
        .route(
            "/api/v1/webhooks/alertmanager",
            post(webhooks::alertmanager),
        )
        .route("/api/v1/webhooks/generic", post(webhooks::generic))
        .route("/api/v1/runs", get(runs::list))
        .route("/api/v1/runs/{id}", get(runs::get))
        .route("/api/v1/runs/{id}/cancel", post(runs::cancel))
        .route("/api/v1/playbooks", get(playbooks::list))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Ready when the store answers.
async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable"),
    }
}
