//! Authentication and roles. Tokens are kept as SHA-256 digests only and compared in constant
//! time; refused attempts on mutating endpoints are audited.
//!
//! With no tokens configured, the API is open and every caller is `anonymous` with the admin
//! role: convenient on a laptop, and logged as a warning at start.

use super::AppState;
use super::auth_config::{AuthConfig, Role};
use super::refusals::Reason;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use sha2::{Digest, Sha256};

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Token name (`anonymous` when auth is off).
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// Why a caller was not identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    /// No `Authorization` header.
    #[error("missing Authorization header")]
    Missing,
    /// Basic credentials that do not decode.
    #[error("malformed basic credentials")]
    Malformed,
    /// Neither Bearer nor Basic.
    #[error("unsupported Authorization scheme (use Bearer or Basic)")]
    Scheme,
    /// No configured token matches.
    #[error("invalid token")]
    Invalid,
}

impl AuthFailure {
    /// Bounded label for metrics and the audit log.
    pub fn metric_label(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Malformed => "malformed",
            AuthFailure::Scheme => "scheme",
            AuthFailure::Invalid => "invalid",
        }
    }
}

/// A token in the config that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("auth.tokens {name:?}: {why}")]
pub struct TokenError {
    /// The token's name.
    pub name: String,
    /// What is wrong.
    pub why: String,
}

/// The configured tokens.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    tokens: Vec<(String, Role, [u8; 32])>,
    /// Whether health and metrics endpoints need a token.
    pub protect_health: bool,
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Equality that takes the same time wherever the inputs differ.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    /// Loads tokens (reading token files).
    pub fn from_config(cfg: &AuthConfig) -> Result<Auth, TokenError> {
        let mut tokens = Vec::new();
        for t in &cfg.tokens {
            let err = |why: String| TokenError {
                name: t.name.clone(),
                why,
            };
            let hash = match (&t.sha256, &t.file) {
                (Some(hex_digest), _) => {
                    let bytes = hex::decode(hex_digest).map_err(|e| err(e.to_string()))?;
                    bytes
                        .try_into()
                        .map_err(|_| err("sha256 must be 32 bytes".into()))?
                }
                (None, Some(file)) => {
                    let token = crate::secret::SecretRef::File(file.clone())
                        .read()
                        .map_err(err)?;
                    digest(token.as_bytes())
                }
                (None, None) => return Err(err("no sha256 or file".into())),
            };
            tokens.push((t.name.clone(), t.role, hash));
        }
        Ok(Auth {
            tokens,
            protect_health: cfg.protect_health,
        })
    }

    /// Whether any token is configured.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Identifies a caller by `Authorization: Bearer TOKEN` or `Basic name:TOKEN`.
    pub fn identify(&self, headers: &HeaderMap) -> Result<Identity, AuthFailure> {
        if !self.enabled() {
            return Ok(Identity {
                name: "anonymous".into(),
                role: Role::Admin,
            });
        }
        let value = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(AuthFailure::Missing)?;
        let (user, secret) = if let Some(token) = value.strip_prefix("Bearer ") {
            (None, token.trim().to_string())
        } else if let Some(b64) = value.strip_prefix("Basic ") {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| AuthFailure::Malformed)?;
            let text = String::from_utf8(raw).map_err(|_| AuthFailure::Malformed)?;
            let (u, p) = text.split_once(':').ok_or(AuthFailure::Malformed)?;
            (Some(u.to_string()), p.to_string())
        } else {
            return Err(AuthFailure::Scheme);
        };
        match self.identify_token(&secret) {
            Ok(id) if user.as_ref().is_none_or(|u| *u == id.name) => Ok(id),
            _ => Err(AuthFailure::Invalid),
        }
    }

    /// Identifies a caller by the token alone (the console's login form).
    pub fn identify_token(&self, secret: &str) -> Result<Identity, AuthFailure> {
        if !self.enabled() {
            return Ok(Identity {
                name: "anonymous".into(),
                role: Role::Admin,
            });
        }
        if secret.trim().is_empty() {
            return Err(AuthFailure::Invalid);
        }
        let presented = digest(secret.trim().as_bytes());
        // Compare against every token so that timing does not tell which one came close.
        let mut found = None;
        for (name, role, hash) in &self.tokens {
            if ct_eq(hash, &presented) && found.is_none() {
                found = Some((name, *role));
            }
        }
        found
            .map(|(name, role)| Identity {
                name: name.clone(),
                role,
            })
            .ok_or(AuthFailure::Invalid)
    }

    /// The role of the token named `name` now, as `reflex approve` with that token would
    /// have it (in open mode, every caller is an admin); `None` for a name no token has.
    pub fn role_by_name(&self, name: &str) -> Option<Role> {
        if !self.enabled() {
            return Some(Role::Admin);
        }
        (self.tokens.iter())
            .find(|(n, _, _)| n == name)
            .map(|(_, role, _)| *role)
    }

    /// What ties a console session to the token it logged in with: SHA-256 of the token's
    /// digest (never the token, nor the digest the config holds).
    pub fn binding(secret: &str) -> [u8; 32] {
        digest(&digest(secret.trim().as_bytes()))
    }

    /// The role now of the token named `name` whose [`Auth::binding`] is `binding`; `None`
    /// once that token is gone from the config or has another secret (its console sessions
    /// end with it).
    pub fn role_of(&self, name: &str, binding: &[u8; 32]) -> Option<Role> {
        if !self.enabled() {
            return (name == "anonymous").then_some(Role::Admin);
        }
        self.tokens
            .iter()
            .find(|(n, _, hash)| n == name && ct_eq(&digest(hash), binding))
            .map(|(_, role, _)| *role)
    }
}

/// Whether `have` may do what needs `need`. `webhook` tokens only post alerts.
pub fn allows(have: Role, need: Role) -> bool {
    match need {
        Role::Webhook => matches!(have, Role::Webhook | Role::Admin),
        _ => have != Role::Webhook && have >= need,
    }
}

/// 429 with `Retry-After`, for a source or name that failed too often (see `throttle`).
pub(super) async fn throttled(
    state: &AppState,
    source: Option<std::net::IpAddr>,
    action: &str,
    wait_s: u64,
) -> Response {
    let why = format!("too many failed attempts; try again in {wait_s} s");
    super::refusals::record(
        state,
        source,
        "unauthenticated",
        action,
        Reason::Throttled,
        &why,
    )
    .await;
    let mut resp = super::ApiError::Status(StatusCode::TOO_MANY_REQUESTS, why).into_response();
    if let Ok(v) = header::HeaderValue::from_str(&wait_s.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

async fn check(state: AppState, need: Role, mut req: Request, next: Next) -> Response {
    let source = super::peer(req.extensions());
    // In open mode every caller is identified: there is nothing to guess. Keys are made only
    // once a failure was ever counted, or for a request that fails now.
    let keys = |req: &Request| -> Vec<String> {
        let user = super::throttle::basic_user(req.headers());
        super::throttle::keys(source, user.as_deref())
    };
    let now = state.store.now_ms();
    if state.auth.load().enabled()
        && state.throttle.active()
        && let Some(wait) = state.throttle.blocked(&keys(&req), now)
    {
        let action = format!("{} {}", req.method(), req.uri().path());
        return throttled(&state, source, &action, wait).await;
    }
    let identified = state.auth.load().identify(req.headers());
    if matches!(
        identified,
        Err(AuthFailure::Invalid | AuthFailure::Malformed)
    ) {
        state.throttle.failed(&keys(&req), now);
    }
    let (status, why, who, reason) = match identified {
        Ok(id) if allows(id.role, need) => {
            req.extensions_mut().insert(id);
            return next.run(req).await;
        }
        Ok(id) => (
            StatusCode::FORBIDDEN,
            format!("the {:?} role cannot do this (needs {need:?})", id.role),
            id.name,
            Reason::Forbidden,
        ),
        Err(why) => (
            StatusCode::UNAUTHORIZED,
            why.to_string(),
            "unauthenticated".to_string(),
            Reason::Unauthenticated,
        ),
    };
    if req.method() != Method::GET {
        let detail = format!("{}: {why}", status.as_u16());
        let (action, source) = super::refusals::about(&req);
        super::refusals::record(&state, source, &who, &action, reason, &detail).await;
    }
    let mut resp = super::ApiError::Status(status, why).into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    resp
}

/// Middleware: the webhook role (or admin).
pub async fn webhook(State(s): State<AppState>, req: Request, next: Next) -> Response {
    check(s, Role::Webhook, req, next).await
}

/// Middleware: at least viewer.
pub async fn viewer(State(s): State<AppState>, req: Request, next: Next) -> Response {
    check(s, Role::Viewer, req, next).await
}

/// Middleware: at least approver.
pub async fn approver(State(s): State<AppState>, req: Request, next: Next) -> Response {
    check(s, Role::Approver, req, next).await
}

/// Middleware: admin.
pub async fn operator(State(s): State<AppState>, req: Request, next: Next) -> Response {
    check(s, Role::Operator, req, next).await
}

/// Admin role required.
pub async fn admin(State(s): State<AppState>, req: Request, next: Next) -> Response {
    check(s, Role::Admin, req, next).await
}

/// Middleware for health and metrics: open unless `auth.protect_health`.
pub async fn health(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if !s.auth.load().protect_health {
        return next.run(req).await;
    }
    check(s, Role::Viewer, req, next).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_nest_except_webhook() {
        assert!(allows(Role::Admin, Role::Approver));
        assert!(allows(Role::Approver, Role::Viewer));
        assert!(!allows(Role::Viewer, Role::Approver));
        assert!(allows(Role::Webhook, Role::Webhook));
        assert!(allows(Role::Admin, Role::Webhook));
        assert!(!allows(Role::Viewer, Role::Webhook));
        assert!(!allows(Role::Webhook, Role::Viewer));
    }

    #[test]
    fn constant_time_eq_is_eq() {
        let (a, b) = (digest(b"x"), digest(b"y"));
        assert!(ct_eq(&a, &a));
        assert!(!ct_eq(&a, &b));
    }
}
