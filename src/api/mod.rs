//! The HTTP API (axum): alert intake and operator control. `router(state)` builds it so that
//! tests can drive it without a socket.

mod approvals;
pub mod auth;
pub mod auth_config;
pub mod chat;
pub mod console;
mod error;
mod killswitch;
pub mod openapi;
mod playbooks;
pub mod refusals;
mod runs;
pub mod server;
pub mod throttle;
mod webhooks;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;

pub use error::ApiError;
use error::ErrorBody;

use crate::engine::Engine;
use crate::store::Store;
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use std::sync::Arc;

/// State shared by all handlers: one pointer, so that the clone each extractor and middleware
/// takes of it costs one reference count, not one for each of its parts.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    /// The handlers' state made of its parts.
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What the handlers share (see [`AppState`]).
pub struct Shared {
    /// The engine.
    pub engine: Arc<Engine>,
    /// The store.
    pub store: Store,
    /// Largest webhook body accepted (`intake.max_body_bytes`).
    pub max_body_bytes: usize,
    /// Tokens and roles (replaced whole by a reload).
    pub auth: Arc<arc_swap::ArcSwap<auth::Auth>>,
    /// Reloads `reflex.yaml` and the playbooks (SIGHUP, the API, the console).
    pub reloader: Arc<crate::reload::Reloader>,
    /// Slack's signed approval callbacks, when `notify.slack_app` is configured.
    pub slack: Option<Arc<chat::Slack>>,
    /// Mattermost's approval actions, when `notify.mattermost_app` is configured.
    pub mattermost: Option<Arc<chat::Mattermost>>,
    /// Refused requests in the current window, by source (the audit log stays bounded).
    pub refusals: Arc<refusals::Refusals>,
    /// Host names requests may carry (`Config::allowed_hosts`).
    pub allowed_hosts: Arc<[String]>,
    /// Failed token attempts, per source and name.
    pub throttle: Arc<throttle::Throttle>,
    /// The console's live streams, bounded apart from requests.
    pub streams: Arc<console::streams::Streams>,
}

/// The address a request came from, when the server knows it (not in `oneshot` tests).
pub(crate) fn peer(extensions: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())
}

/// Longest free text a caller may leave on the record (a kill switch's reason, an approval's
/// comment): enough for an incident reference and a paragraph, bounded so that the audit log
/// and chat stay readable.
pub(crate) const MAX_TEXT_BYTES: usize = 4096;

/// Parses a small JSON control body.
/// An optional control body: none (or white space) is the default.
pub(crate) fn optional_body<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        json_body(body)
    }
}

pub(crate) fn json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // Every control body is an object (serde would also fill a struct from an array).
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::BadRequest(
            "invalid request body: expected a JSON object".into(),
        ));
    }
    let parsed = crate::alert::parse_json(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))?;
    // JSON writes NUL only as `\u0000`: the bytes tell whether to look.
    if body.windows(5).any(|w| w == b"u0000")
        && serde_json::from_slice(body).is_ok_and(|v| holds_nul(&v))
    {
        return Err(ApiError::BadRequest(NUL_IN_BODY.into()));
    }
    Ok(parsed)
}

/// Why a control body holding a NUL is refused.
const NUL_IN_BODY: &str = "invalid request body: a string holds a NUL character (\\u0000), which no name, reason or \
     label may hold";

/// Whether a key or string anywhere in `v` holds a NUL: text that PostgreSQL cannot store or
/// compare (SQLite can), so a control body or URL with one is refused on either store.
fn holds_nul(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(holds_nul),
        Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

/// A URL holding a NUL (`%00`) is refused before anything reads it: no name, id or filter holds
/// one, and PostgreSQL cannot compare text with it (SQLite can), so the answer is the same 400
/// on either store instead of a 503 on one.
async fn no_nul_in_url(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let url = req.uri().path_and_query().map_or("", |p| p.as_str());
    if url.contains("%00") {
        let why = "the URL holds a NUL character (%00), which no name, id or filter holds";
        if req.uri().path().starts_with("/ui") {
            return console::Page::error(StatusCode::BAD_REQUEST, why.into()).into_response();
        }
        return ApiError::BadRequest(why.into()).into_response();
    }
    next.run(req).await
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    // Webhooks read their bodies themselves (see `webhooks::read_body`); this bounds the rest.
    let max_body_bytes = state.max_body_bytes;
    let layer = |f| from_fn_with_state(state.clone(), f);
    let intake = Router::new()
        .route(
            "/api/v1/webhooks/alertmanager",
            post(webhooks::alertmanager),
        )
        .route("/api/v1/webhooks/generic", post(webhooks::generic))
        .route_layer(from_fn_with_state(state.clone(), auth::webhook));
    let read = Router::new()
        .route("/api/v1/runs", get(runs::list))
        .route("/api/v1/runs/{id}", get(runs::get))
        .route("/api/v1/runs/{id}/artifacts/{name}", get(runs::artifact))
        .route("/api/v1/approvals", get(approvals::list))
        .route("/api/v1/approvals/{id}", get(approvals::get))
        .route("/api/v1/killswitch", get(killswitch::get))
        .route("/api/v1/playbooks", get(playbooks::list))
        .route(
            "/api/v1/playbooks/{name}/killswitch",
            get(killswitch::get_playbook),
        )
        .route("/api/v1/audit", get(audit))
        .route_layer(layer(auth::viewer));
    let approve = Router::new()
        .route("/api/v1/approvals/{id}/approve", post(approvals::approve))
        .route("/api/v1/approvals/{id}/deny", post(approvals::deny))
        .route_layer(from_fn_with_state(state.clone(), auth::approver));
    let operate = Router::new()
        .route("/api/v1/runs/{id}/cancel", post(runs::cancel))
        .route("/api/v1/runs/{id}/retry", post(runs::retry))
        .route("/api/v1/runs/{id}/undo", post(runs::undo))
        .route("/api/v1/playbooks/{name}/runs", post(playbooks::trigger))
        .route_layer(from_fn_with_state(state.clone(), auth::operator));
    let admin = Router::new()
        .route("/api/v1/playbooks/reload", post(playbooks::reload))
        .route(
            "/api/v1/playbooks/{name}/autonomy/reset",
            post(playbooks::reset_autonomy),
        )
        .route("/api/v1/killswitch", axum::routing::put(killswitch::put))
        .route(
            "/api/v1/playbooks/{name}/killswitch",
            axum::routing::put(killswitch::put_playbook),
        )
        .route_layer(from_fn_with_state(state.clone(), auth::admin));
    // Authenticated by Slack's signature, not by a token.
    let chat = Router::new()
        .route(
            "/api/v1/chat/slack/interactions",
            post(chat::slack_interactions),
        )
        .route(
            "/api/v1/chat/mattermost/actions",
            post(chat::mattermost_actions),
        );
    let health = Router::new()
        .route("/healthz", get(healthz))
        .route("/api/v1/openapi.json", get(openapi::document))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route_layer(from_fn_with_state(state.clone(), auth::health));
    Router::new()
        .merge(intake)
        .merge(read)
        .merge(approve)
        .merge(operate)
        .merge(admin)
        .merge(health)
        .merge(chat)
        .merge(console::router())
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(from_fn_with_state(state.clone(), same_origin_json))
        .layer(axum::middleware::from_fn(no_nul_in_url))
        .layer(from_fn_with_state(state.clone(), allowed_host))
        .with_state(state)
}

/// A request naming another host than Reflex's is answered 421 on the console always, and
/// everywhere when the API is open: a site whose name an attacker rebinds to Reflex's address
/// (DNS rebinding) is same-origin to the browser, but its `Host` header still names that site.
async fn allowed_host(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let console = req.uri().path() == "/" || req.uri().path().starts_with("/ui");
    if !console && state.auth.load().enabled() {
        return next.run(req).await;
    }
    let host = req
        .headers()
        .get(axum::http::header::HOST)
        .map(|h| h.to_str().map(crate::text::host_of));
    match host {
        // No Host header (HTTP/1.0, a client on the socket): no browser is involved.
        None => next.run(req).await,
        Some(Ok(h)) if state.allowed_hosts.contains(&h) => next.run(req).await,
        Some(h) => {
            let shown = refusals::truncate(&h.unwrap_or_default(), 100);
            let why = format!(
                "Host {shown:?} is not one Reflex answers to; add it to server.allowed_hosts \
                 if clients reach Reflex by that name"
            );
            if req.method() != axum::http::Method::GET {
                let (action, source) = refusals::about(&req);
                let reason = refusals::Reason::Host;
                refusals::record(&state, source, "unauthenticated", &action, reason, &why).await;
            }
            ApiError::Status(StatusCode::MISDIRECTED_REQUEST, why).into_response()
        }
    }
}

/// Mutating requests must not come from another site's page, and outside the console they must
/// be JSON.
///
/// A browser sends a cross-site form or `text/plain` POST without asking first (a "simple"
/// request), with the user's network position and cookies; requiring
/// `Content-Type: application/json` forces a CORS preflight, which Reflex never answers, and a
/// foreign `Origin` (or `Sec-Fetch-Site: cross-site`) is refused outright.
async fn same_origin_json(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{Method, header};
    use axum::response::IntoResponse;
    // Safe methods, and Slack's signed callbacks (form-encoded, from Slack's servers).
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
        || req.uri().path() == "/api/v1/chat/slack/interactions"
    {
        return next.run(req).await;
    }
    let headers = req.headers();
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &axum::http::HeaderValue| v.to_str().ok())
    };
    let cross_site = text("sec-fetch-site").is_some_and(|s| s == "cross-site" || s == "same-site");
    let foreign_origin = match (text(header::ORIGIN.as_str()), text(header::HOST.as_str())) {
        (Some(origin), Some(host)) => {
            let authority = origin.split_once("://").map_or("", |(_, a)| a);
            origin == "null" || !authority.eq_ignore_ascii_case(host)
        }
        (Some(_), None) => true,
        (None, _) => false,
    };
    if cross_site || foreign_origin {
        let why = "cross-origin request refused: Reflex's API takes mutating calls from its own \
                   origin or from non-browser clients only";
        let (action, source) = refusals::about(&req);
        let reason = refusals::Reason::CrossOrigin;
        refusals::record(&state, source, "unauthenticated", &action, reason, why).await;
        return ApiError::Status(StatusCode::FORBIDDEN, why.into()).into_response();
    }
    // The console's forms are form-encoded: each carries its session's CSRF token, checked
    // by the console before anything else.
    if req.uri().path().starts_with("/ui/") {
        return next.run(req).await;
    }
    let json = text(header::CONTENT_TYPE.as_str())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| {
            let essence = essence.trim().to_ascii_lowercase();
            essence == "application/json" || essence.ends_with("+json")
        });
    if !json {
        return ApiError::Status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send Content-Type: application/json (with a JSON body, `{}` when there is nothing to say)"
                .into(),
        )
        .into_response();
    }
    next.run(req).await
}

/// Query of `GET /api/v1/audit`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    before: Option<i64>,
    limit: Option<u32>,
    actor: Option<String>,
    action: Option<String>,
    since: Option<String>,
}

/// `GET /api/v1/audit`: newest first.
#[utoipa::path(
    get,
    path = "/api/v1/audit",
    tag = "viewer",
    description = "The audit log, newest first. Role: viewer.",
    params(("before" = Option<i64>, Query, description = "Rows with a smaller id"), ("limit" = Option<u32>, Query, description = "1-1000, default 100"), ("actor" = Option<String>, Query, description = "Exactly this actor"), ("action" = Option<String>, Query, description = "Actions starting with this"), ("since" = Option<String>, Query, description = "A duration back from now (2h) or a time (RFC 3339)")),
    responses((status = 200, description = "Audit rows", body = Vec<crate::store::AuditEntry>), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(("bearer" = ["viewer"]))
)]
async fn audit(
    State(state): State<AppState>,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<axum::Json<Vec<crate::store::AuditEntry>>, ApiError> {
    let Query(q) = q?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest(
            "limit must be between 1 and 1000".into(),
        ));
    }
    let since_ms = match q.since.as_deref() {
        None => None,
        Some(s) => {
            Some(crate::time::since_ms(s, state.store.now_ms()).map_err(ApiError::BadRequest)?)
        }
    };
    let filter = crate::store::AuditFilter {
        before: q.before,
        limit,
        actor: q.actor,
        action: q.action,
        since_ms,
    };
    Ok(axum::Json(state.store.audit_search(filter).await?))
}

/// `since`: a duration back from now (`2h`) or a time (RFC 3339).
/// `GET /metrics`: gauges that live in the store are read at scrape time.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    description = "Prometheus metrics, text format. Role: none (unless auth.protect_health).",
    responses((status = 200, description = "Metrics", body = String, content_type = "text/plain"), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(())
)]
async fn metrics(
    State(state): State<AppState>,
) -> Result<([(axum::http::HeaderName, &'static str); 1], String), ApiError> {
    let text = state.engine.render_metrics().await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    ))
}

/// Alive.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    description = "Alive. Role: none (unless auth.protect_health).",
    responses((status = 200, description = "Alive", body = String)),
    security(())
)]
async fn healthz() -> &'static str {
    "ok"
}

/// Ready when the store answers.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    description = "Ready when the store answers. Role: none (unless auth.protect_health).",
    responses((status = 200, description = "Ready", body = String), (status = 400, description = "Bad request", body = ErrorBody), (status = 401, description = "No or unknown token", body = ErrorBody), (status = 403, description = "The token lacks the role", body = ErrorBody), (status = 503, description = "The store is unavailable; retry", body = ErrorBody)),
    security(())
)]
async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable"),
    }
}
