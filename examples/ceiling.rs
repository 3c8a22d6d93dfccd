//! The ceiling for the load harness: a bare axum handler that parses an Alertmanager webhook
//! and answers 200, nothing else. `scripts/loadtest` measures Reflex against it in the same run.
//!
//! `cargo run --release --example ceiling -- 127.0.0.1:9199`

use axum::Json;
use axum::routing::post;
use reflex::alert::AlertmanagerPayload;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9199".into());
    let app = axum::Router::new().route(
        "/api/v1/webhooks/alertmanager",
        post(|Json(p): Json<AlertmanagerPayload>| async move { Json(p.alerts.len()) }),
    );
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    axum::serve(listener, app).await.expect("serve");
}
