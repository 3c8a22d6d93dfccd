//! The web console: server-rendered pages under `/ui`, compiled into the binary (askama
//! templates, one stylesheet, one small script; nothing from the internet).
//!
//! Sessions: the login form takes an API token; the session cookie is random, `HttpOnly`,
//! `SameSite=Strict` and scoped to `/ui`, and only its SHA-256 is stored. The role is the
//! token's role in force on each request. Every form carries the session's CSRF token, checked
//! in constant time before anything else happens; the pages never act on a GET.

mod pages;
mod session;
pub mod streams;

use super::auth::{Identity, allows};
use super::refusals::Reason;
use super::{ApiError, AppState};
use crate::config::Role;
use askama::Template;
use axum::Router;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};

/// Cookie of a logged-in session.
const SESSION_COOKIE: &str = "reflex_session";
/// Cookie that ties the login form to the browser that loaded it.
const LOGIN_COOKIE: &str = "reflex_login";

/// The console's routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/runs") }))
        .route("/ui", get(|| async { Redirect::to("/ui/runs") }))
        .route("/ui/", get(|| async { Redirect::to("/ui/runs") }))
        .route("/ui/login", get(session::login_page).post(session::login))
        .route("/ui/logout", post(session::logout))
        .route("/ui/runs", get(pages::runs))
        .route("/ui/runs/{id}", get(pages::run))
        .route("/ui/runs/{id}/events", get(pages::run_events))
        .route("/ui/runs/{id}/artifacts/{name}", get(pages::artifact))
        .route("/ui/runs/{id}/cancel", post(pages::cancel))
        .route("/ui/runs/{id}/retry", post(pages::retry))
        .route("/ui/runs/{id}/undo", post(pages::undo))
        .route("/ui/approvals", get(pages::approvals))
        .route("/ui/approvals/{id}/decide", post(pages::decide))
        .route(
            "/ui/killswitch",
            get(pages::killswitch).post(pages::set_switch),
        )
        .route("/ui/playbooks", get(pages::playbooks))
        .route("/ui/playbooks/reload", post(pages::reload))
        .route("/ui/audit", get(pages::audit))
        .route("/ui/static/console.css", get(stylesheet))
        .route("/ui/static/console.js", get(script))
        // A console path that is no page: an HTML 404 with the console's headers, not the API's JSON.
        .route(
            "/ui/{*rest}",
            axum::routing::any(|| async {
                Page::error(StatusCode::NOT_FOUND, "no such console page".into())
            }),
        )
        .layer(axum::middleware::from_fn(headers))
}

/// What every console response carries: no framing, no inline script, no caching of pages
/// that show live state.
async fn headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

async fn stylesheet() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("static/console.css"),
    )
}

async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("static/console.js"),
    )
}

/// The logged-in user of a console request.
#[derive(Debug, Clone)]
pub struct Viewer {
    /// Token name and its role now.
    pub identity: Identity,
    /// The session's CSRF token.
    pub csrf: String,
    /// Digest of the session cookie.
    pub(crate) id_hash: [u8; 32],
}

impl Viewer {
    /// Whether the viewer's role allows what needs `need`.
    pub fn may(&self, need: Role) -> bool {
        allows(self.identity.role, need)
    }

    /// Refuses (403, audited) unless the role allows `need`.
    async fn require(&self, state: &AppState, need: Role, action: &str) -> Result<(), Page> {
        if self.may(need) {
            return Ok(());
        }
        let why = format!(
            "the {} role cannot do this (needs {})",
            role_name(self.identity.role),
            role_name(need)
        );
        refuse(state, &self.identity.name, action, &why, Reason::Forbidden).await;
        Err(Page::error(StatusCode::FORBIDDEN, why))
    }

    /// Refuses (403, audited) unless the form carries this session's CSRF token.
    async fn check_csrf(&self, state: &AppState, given: &str, action: &str) -> Result<(), Page> {
        if session::same_secret(given, &self.csrf) {
            return Ok(());
        }
        let why = "the form's CSRF token is missing or wrong; reload the page and try again";
        refuse(state, &self.identity.name, action, why, Reason::CrossOrigin).await;
        Err(Page::error(StatusCode::FORBIDDEN, why.to_string()))
    }
}

async fn refuse(state: &AppState, who: &str, action: &str, why: &str, reason: Reason) {
    let detail = format!("403: {why}");
    super::refusals::record(
        state,
        None,
        who,
        &format!("console {action}"),
        reason,
        &detail,
    )
    .await;
}

/// The name a role is configured by.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Webhook => "webhook",
        Role::Viewer => "viewer",
        Role::Approver => "approver",
        Role::Operator => "operator",
        Role::Admin => "admin",
    }
}

impl FromRequestParts<AppState> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let to_login = || {
            let next = parts
                .uri
                .path_and_query()
                .map_or("/ui/runs", |p| p.as_str());
            let next: String = form_urlencoded::byte_serialize(next.as_bytes()).collect();
            Redirect::to(&format!("/ui/login?next={next}")).into_response()
        };
        let name = session::cookie_name(state, SESSION_COOKIE);
        let Some(cookie) = session::cookie(&parts.headers, &name) else {
            return Err(to_login());
        };
        let id_hash = session::digest(cookie);
        let found = state
            .store
            .session(id_hash)
            .await
            .map_err(|e| Page::from(ApiError::from(e)).into_response())?;
        let Some(found) = found else {
            return Err(to_login());
        };
        // The role in force now: a token removed from the config, or given another secret,
        // ends its sessions; a webhook token never had one.
        match state.auth.load().role_of(&found.name, &found.token) {
            Some(role) if role != Role::Webhook => Ok(Viewer {
                identity: Identity {
                    name: found.name,
                    role,
                },
                csrf: found.csrf,
                id_hash,
            }),
            _ => Err(to_login()),
        }
    }
}

/// A form's fields, as `axum::Form` reads them, refused (400) when one holds a NUL (`%00`):
/// no reason or comment holds one, and PostgreSQL cannot store it (SQLite can).
pub struct Form<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for Form<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        let (parts, body) = req.into_parts();
        // Rejections (a body over the limit, another content type) as the console's page too.
        let page = |status, text| Page::error(status, text).into_response();
        let bytes =
            axum::body::Bytes::from_request(Request::from_parts(parts.clone(), body), state)
                .await
                .map_err(|e| page(e.status(), e.body_text()))?;
        if bytes.contains(&0) || bytes.windows(3).any(|w| w == b"%00") {
            let why = "a field holds a NUL character (%00), which no reason or comment may hold";
            return Err(page(StatusCode::BAD_REQUEST, why.into()));
        }
        let req = Request::from_parts(parts, axum::body::Body::from(bytes));
        let axum::Form(fields) = axum::Form::<T>::from_request(req, state)
            .await
            .map_err(|e| page(e.status(), e.body_text()))?;
        Ok(Form(fields))
    }
}

/// A path's parameters, as `axum::extract::Path` reads them, refused with the console's error
/// page (not axum's plain text) when they do not parse (`/ui/runs/x`).
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Page;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Page> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(p)) => Ok(Path(p)),
            Err(e) => Err(Page::error(e.status(), e.body_text())),
        }
    }
}

/// A rendered page or an error page.
#[derive(Debug)]
pub struct Page {
    status: StatusCode,
    body: Result<String, String>,
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    status: u16,
    reason: &'a str,
    message: &'a str,
    /// Where the refused form was (a run's page), to go back to.
    back: Option<&'a str>,
    /// What the person had written in the refused form, so that it is not lost.
    kept: Option<&'a str>,
}

impl Page {
    fn render(t: &impl Template) -> Page {
        Page {
            status: StatusCode::OK,
            body: (t.render())
                .map(|html| crate::notify::neutralize_bidi(&html).into_owned())
                .map_err(|e| e.to_string()),
        }
    }

    /// An error page: the status and what went wrong.
    pub(crate) fn error(status: StatusCode, message: String) -> Page {
        Self::refused_form(status, message, None, None)
    }

    /// An error page for a refused form: the reason, a way back, and what was written.
    fn refused_form(
        status: StatusCode,
        message: String,
        back: Option<&str>,
        kept: Option<&str>,
    ) -> Page {
        Page {
            status,
            body: Ok(ErrorPage {
                status: status.as_u16(),
                reason: status.canonical_reason().unwrap_or(""),
                message: &message,
                back,
                kept,
            }
            .render()
            .map(|html| crate::notify::neutralize_bidi(&html).into_owned())
            .unwrap_or(message.clone())),
        }
    }
}

impl From<ApiError> for Page {
    fn from(e: ApiError) -> Page {
        let status = e.status();
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), error = %e, "console request failed");
        }
        let message = match &e {
            ApiError::Invalid(msg, details) => format!("{msg}: {}", details.join("; ")),
            _ => e.to_string(),
        };
        Page::error(status, message)
    }
}

impl From<crate::store::StoreError> for Page {
    fn from(e: crate::store::StoreError) -> Page {
        ApiError::from(e).into()
    }
}

impl IntoResponse for Page {
    fn into_response(self) -> Response {
        match self.body {
            Ok(html) => (self.status, Html(html)).into_response(),
            Err(e) => {
                tracing::error!(error = %e, "a console template failed to render");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the page failed to render",
                )
                    .into_response()
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests;
