//! `auth:` in reflex.yaml: API tokens (as digests or files) and their roles.

use serde::Deserialize;
use std::path::PathBuf;

/// Roles, each allowing what the ones before it allow (`webhook` only posts alerts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Posts alerts to the webhook endpoints, nothing else.
    Webhook,
    /// Reads runs, approvals, playbooks, the kill switch and the audit log.
    Viewer,
    /// Viewer, plus approve and deny.
    Approver,
    /// Approver, plus trigger a playbook, retry and cancel runs.
    Operator,
    /// Operator, plus kill switch, reload, and posting alerts.
    Admin,
}

/// One API token. The token itself is never in the config: give its SHA-256 (hex), or a file
/// holding it (read and hashed at start).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who: recorded in the audit log and on approvals.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// SHA-256 of the token, hex (`printf %s "$TOKEN" | sha256sum`).
    pub sha256: Option<String>,
    /// A file holding the token.
    pub file: Option<PathBuf>,
}

/// API authentication.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Tokens (bearer, or basic auth with the token name as user and the token as password).
    pub tokens: Vec<TokenConfig>,
    /// Whether `/healthz`, `/readyz` and `/metrics` need a token too.
    pub protect_health: bool,
    /// Serve an API without tokens on an address other than loopback. Without tokens every
    /// caller is an admin, so this must be said explicitly.
    pub open: bool,
}
