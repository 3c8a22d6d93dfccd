//! The OpenAPI document of the API, generated from the handlers' annotations and types and
//! served at `/api/v1/openapi.json`. Each operation names the role it needs as the scope of
//! its `bearer` security requirement.

use super::error::{ErrorBody, ErrorDetail};
use super::{approvals, killswitch, playbooks, runs, webhooks};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Reflex",
        description = "Alert-driven remediation: intake, runs, approvals, kill switches, audit."
    ),
    paths(
        webhooks::alertmanager,
        webhooks::generic,
        runs::list,
        runs::get,
        runs::artifact,
        runs::cancel,
        runs::retry,
        runs::undo,
        approvals::list,
        approvals::get,
        approvals::approve,
        approvals::deny,
        killswitch::get,
        killswitch::put,
        killswitch::get_playbook,
        killswitch::put_playbook,
        playbooks::list,
        playbooks::reload,
        playbooks::reset_autonomy,
        playbooks::trigger,
        super::audit,
        super::metrics,
        super::healthz,
        super::readyz,
        super::chat::slack_interactions,
        super::chat::mattermost_actions,
        document,
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&Bearer)
)]
pub struct ApiDoc;

/// The `bearer` scheme: an API token (`Authorization: Bearer …`), or basic auth with the
/// token's name as user and the token as password.
struct Bearer;

impl Modify for Bearer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// `GET /api/v1/openapi.json`
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "health",
    description = "This document. Role: none (unless auth.protect_health).",
    responses((status = 200, description = "The OpenAPI document", body = Object)),
    security(())
)]
pub async fn document() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}
