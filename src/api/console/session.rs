//! Login, logout and the cookies behind them.

use super::{Form, LOGIN_COOKIE, Page, SESSION_COOKIE, Viewer};
use crate::api::AppState;
use crate::api::refusals::Reason;
use crate::config::Role;
use crate::store::Session;
use askama::Template;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// How long a session lasts.
const SESSION_TTL_MS: i64 = 12 * 3600 * 1000;

/// The value of cookie `name`, if the request carries it.
pub(super) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// SHA-256 of a cookie: what the store keeps.
pub(super) fn digest(cookie: &str) -> [u8; 32] {
    Sha256::digest(cookie.as_bytes()).into()
}

/// Equality of two secrets in time that does not depend on where they differ.
pub(super) fn same_secret(given: &str, expected: &str) -> bool {
    let (a, b) = (digest(given), digest(expected));
    a.iter().zip(&b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0 && !expected.is_empty()
}

/// 32 random bytes, hex.
fn random_token() -> Result<String, Page> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| {
        Page::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("no randomness for a session: {e}"),
        )
    })?;
    Ok(hex::encode(bytes))
}

/// A `Set-Cookie` value: `HttpOnly`, `SameSite=Strict`, `Secure` behind HTTPS.
fn set_cookie(state: &AppState, name: &str, value: &str, path: &str, max_age_s: i64) -> String {
    if https(state) {
        // `__Host-`: the browser takes it only if Secure, for this host alone and Path=/, so
        // neither a sibling subdomain nor plain HTTP can plant or shadow it.
        let name = cookie_name(state, name);
        format!("{name}={value}; Path=/; Max-Age={max_age_s}; HttpOnly; SameSite=Strict; Secure")
    } else {
        format!("{name}={value}; Path={path}; Max-Age={max_age_s}; HttpOnly; SameSite=Strict")
    }
}

/// Whether people reach Reflex over HTTPS (`public_url`).
fn https(state: &AppState) -> bool {
    (state.engine.public_url()).is_some_and(|u| u.starts_with("https://"))
}

/// A cookie's name as set and read: with the `__Host-` prefix under HTTPS.
pub(super) fn cookie_name(state: &AppState, name: &str) -> String {
    if https(state) {
        format!("__Host-{name}")
    } else {
        name.to_string()
    }
}

/// Where to go after login: a console path, never another site.
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with("/ui/") && !n.starts_with("//") && !n.contains('\\') => n,
        _ => "/ui/runs",
    }
}

/// A `next` with control characters (CR, LF: a header split) is bad input: 400.
fn check_next(next: Option<&str>) -> Result<(), Page> {
    if next.is_some_and(|n| n.chars().any(char::is_control)) {
        return Err(Page::error(
            StatusCode::BAD_REQUEST,
            "next must be a console path without control characters".into(),
        ));
    }
    Ok(())
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage<'a> {
    csrf: &'a str,
    next: &'a str,
    auth_enabled: bool,
    error: Option<&'a str>,
}

/// Query of the login page.
#[derive(Debug, Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
}

fn login_form(
    state: &AppState,
    status: StatusCode,
    next: &str,
    error: Option<&str>,
) -> Result<Response, Page> {
    let csrf = random_token()?;
    let mut page = Page::render(&LoginPage {
        csrf: &csrf,
        next: safe_next(Some(next)),
        auth_enabled: state.auth.load().enabled(),
        error,
    });
    page.status = status;
    let cookie = set_cookie(state, LOGIN_COOKIE, &csrf, "/ui/login", 600);
    Ok(([(header::SET_COOKIE, cookie)], page).into_response())
}

/// `GET /ui/login`
pub async fn login_page(
    State(state): State<AppState>,
    q: Result<Query<LoginQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Page> {
    let next = q.ok().and_then(|Query(q)| q.next);
    check_next(next.as_deref())?;
    login_form(&state, StatusCode::OK, next.as_deref().unwrap_or(""), None)
}

/// The login form.
#[derive(Debug, Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: String,
    next: Option<String>,
}

/// `POST /ui/login`: a token in, a session cookie out.
pub async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
    Form(form): Form<LoginForm>,
) -> Result<Response, Page> {
    let source = crate::api::peer(&extensions);
    let keys = crate::api::throttle::keys(source, None);
    let now = state.store.now_ms();
    if let Some(wait) = state.throttle.blocked(&keys, now) {
        return Ok(crate::api::auth::throttled(&state, source, "console login", wait).await);
    }
    check_next(form.next.as_deref())?;
    let next = safe_next(form.next.as_deref()).to_string();
    let expected = cookie(&headers, &cookie_name(&state, LOGIN_COOKIE)).unwrap_or("");
    if !same_secret(&form.csrf, expected) {
        super::refuse(
            &state,
            "unauthenticated",
            "login",
            "login form without its cookie",
            Reason::CrossOrigin,
        )
        .await;
        return login_form(
            &state,
            StatusCode::FORBIDDEN,
            &next,
            Some("The login form expired or did not come from this page. Try again."),
        );
    }
    let identity = match state.auth.load().identify_token(&form.token) {
        Ok(id) if id.role != Role::Webhook => id,
        Ok(id) => {
            super::refuse(
                &state,
                &id.name,
                "login",
                "webhook tokens cannot log in",
                Reason::Forbidden,
            )
            .await;
            return login_form(
                &state,
                StatusCode::FORBIDDEN,
                &next,
                Some("This token only posts alerts; it cannot use the console."),
            );
        }
        Err(why) => {
            state.throttle.failed(&keys, now);
            super::refuse(
                &state,
                "unauthenticated",
                "login",
                &why.to_string(),
                Reason::Unauthenticated,
            )
            .await;
            return login_form(
                &state,
                StatusCode::UNAUTHORIZED,
                &next,
                Some("Unknown token."),
            );
        }
    };
    let id = random_token()?;
    let session = Session {
        name: identity.name,
        token: crate::api::auth::Auth::binding(&form.token),
        csrf: random_token()?,
        expires_at: state.store.now_ms() + SESSION_TTL_MS,
    };
    state.store.create_session(digest(&id), session).await?;
    let cookies = [
        set_cookie(&state, SESSION_COOKIE, &id, "/ui", SESSION_TTL_MS / 1000),
        set_cookie(&state, LOGIN_COOKIE, "", "/ui/login", 0),
    ];
    let mut resp = Redirect::to(&next).into_response();
    for c in cookies {
        if let Ok(v) = c.parse() {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    Ok(resp)
}

/// A form that carries only the CSRF token.
#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    pub csrf: String,
}

/// `POST /ui/logout`
pub async fn logout(
    State(state): State<AppState>,
    viewer: Viewer,
    Form(form): Form<CsrfForm>,
) -> Result<Response, Page> {
    viewer.check_csrf(&state, &form.csrf, "logout").await?;
    (state.store)
        .end_session(viewer.id_hash, viewer.identity.name)
        .await?;
    let cookie = set_cookie(&state, SESSION_COOKIE, "", "/ui", 0);
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to("/ui/login")).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_exact_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; reflex_session=abc; reflex_session_x=2"
                .parse()
                .unwrap(),
        );
        assert_eq!(cookie(&h, "reflex_session"), Some("abc"));
        assert_eq!(cookie(&h, "reflex"), None);
    }

    #[test]
    fn next_stays_in_the_console() {
        assert_eq!(safe_next(Some("/ui/runs/7")), "/ui/runs/7");
        for bad in [
            "https://evil.example/",
            "//evil.example/ui/",
            "/api/v1/runs",
            "/ui/\\x",
        ] {
            assert_eq!(safe_next(Some(bad)), "/ui/runs", "{bad}");
        }
    }

    #[test]
    fn an_empty_expected_secret_matches_nothing() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("", ""));
        assert!(!same_secret("abd", "abc"));
    }
}
