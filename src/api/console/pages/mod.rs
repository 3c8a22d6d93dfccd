//! The console's pages and the forms they post: a file per page (the runs list, a run, the
//! approvals, the kill switches, the playbooks, the audit log); here what they share.

use super::session::CsrfForm;
use super::{Form, Page, Path, Viewer, role_name};
use crate::api::killswitch::{self, SwitchBody};
use crate::api::{ApiError, AppState};
use crate::config::Role;
use crate::engine::CancelResult;
use crate::store::{
    ApprovalState, ApprovalView, AuditEntry, GLOBAL, RunFilter, RunState, RunView, StepRecord,
    StepState, Switch, playbook_scope,
};
use crate::time::Timestamp;
use askama::Template;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::Value;
use std::time::Duration;

/// Rows per page of the runs list and the audit log.
const PAGE: u32 = 50;
/// How often a live run page looks for changes.
const LIVE_POLL: Duration = Duration::from_millis(300);
/// A live run page's stream ends after this long (the browser reconnects).
const LIVE_MAX: Duration = Duration::from_secs(3600);

/// A live stream looks at its session every this many polls (about a second).
const SESSION_CHECK_EVERY: u32 = 3;

/// What every page shows around its content.
pub struct Chrome {
    /// The page (for the navigation).
    pub tab: &'static str,
    /// Who is logged in.
    pub who: String,
    /// Their role.
    pub role: &'static str,
    /// For the logout form.
    pub csrf: String,
    /// The global kill switch, when engaged: who and why.
    pub killed: Option<String>,
    /// Pending approvals (shown in the navigation).
    pub pending: i64,
}

async fn chrome(state: &AppState, viewer: &Viewer, tab: &'static str) -> Result<Chrome, Page> {
    let global = state
        .store
        .switches()
        .await?
        .into_iter()
        .find(|s| s.scope == GLOBAL && s.engaged);
    let pending = state.store.pending_approvals().await?;
    Ok(Chrome {
        tab,
        who: viewer.identity.name.clone(),
        role: role_name(viewer.identity.role),
        csrf: viewer.csrf.clone(),
        killed: global.map(|s| {
            format!(
                "engaged by {}: {}",
                s.actor.unwrap_or_default(),
                s.reason.unwrap_or_default()
            )
        }),
        pending,
    })
}

/// How long from `start` to `end`, e.g. `850 ms`, `4.2 s`, `3m 5s`.
fn span(start: Option<Timestamp>, end: Option<Timestamp>) -> Option<String> {
    let took = end?.since(start?);
    Some(match took.as_millis() {
        ms @ 0..1000 => format!("{ms} ms"),
        ms @ 1000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        _ => crate::time::format_duration(Duration::from_secs(took.as_secs())),
    })
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// An approval request: exactly what will be done, and its votes.
pub struct ApprovalCard {
    id: i64,
    run_id: i64,
    playbook: String,
    step_name: String,
    scope: String,
    state: ApprovalState,
    target: String,
    steps: Vec<(String, String, String)>,
    action_hash: String,
    required: u32,
    votes: Vec<crate::store::Vote>,
    approvers: String,
    created_at: Timestamp,
    expires_at: Timestamp,
    decided_by: Option<String>,
    decided_at: Option<Timestamp>,
    comment: Option<String>,
    /// Why it cannot be approved now (a kill switch), for a pending one.
    held: Option<String>,
    /// What the run's evidence steps before the gate found.
    evidence: Vec<EvidenceCard>,
}

/// One evidence step's findings on an approval card.
pub struct EvidenceCard {
    step: String,
    action: String,
    summary: String,
    artifacts: Vec<ArtifactLink>,
}

/// An artifact as the console links it (behind the console's own session).
pub struct ArtifactLink {
    name: String,
    url: String,
    image: bool,
    size: String,
}

impl From<&crate::store::ArtifactInfo> for ArtifactLink {
    fn from(a: &crate::store::ArtifactInfo) -> ArtifactLink {
        ArtifactLink {
            name: a.name.clone(),
            url: a.url.replacen("/api/v1/runs/", "/ui/runs/", 1),
            image: a.content_type.starts_with("image/"),
            size: if a.size >= 1024 {
                format!("{:.1} KiB", a.size as f64 / 1024.0)
            } else {
                format!("{} bytes", a.size)
            },
        }
    }
}

impl ApprovalCard {
    /// Still waiting for a decision.
    fn pending(&self) -> bool {
        self.state == ApprovalState::Pending
    }

    /// Fills in why a pending request cannot be approved now.
    async fn with_hold(mut self, state: &AppState) -> Result<ApprovalCard, Page> {
        if self.pending() {
            self.held = state.store.kill_reason(&self.playbook).await?;
        }
        Ok(self)
    }
}

impl From<ApprovalView> for ApprovalCard {
    fn from(a: ApprovalView) -> ApprovalCard {
        let steps = a.action["steps"]
            .as_array()
            .map(|steps| {
                steps
                    .iter()
                    .map(|s| {
                        let text = |k: &str| s[k].as_str().unwrap_or_default().to_string();
                        (text("step"), text("action"), pretty(&s["args"]))
                    })
                    .collect()
            })
            .unwrap_or_default();
        ApprovalCard {
            id: a.id,
            run_id: a.run_id,
            playbook: a.playbook,
            step_name: a.step_name,
            scope: a.scope.as_str().to_string(),
            state: a.state,
            target: a.action["target"].as_str().unwrap_or_default().to_string(),
            steps,
            action_hash: a.action_hash,
            required: a.required,
            votes: a.approvals,
            approvers: if a.approvers_allowed.is_empty() {
                "anyone with the approver role".into()
            } else {
                a.approvers_allowed.join(", ")
            },
            created_at: a.created_at,
            expires_at: a.expires_at,
            decided_by: a.decided_by,
            decided_at: a.decided_at,
            comment: a.comment,
            held: None,
            evidence: (a.evidence.iter())
                .map(|e| EvidenceCard {
                    step: e.step.clone(),
                    action: e.action.clone(),
                    summary: e.summary.clone(),
                    artifacts: e.artifacts.iter().map(ArtifactLink::from).collect(),
                })
                .collect(),
        }
    }
}

/// The part of the run page that changes while it runs (sent again by the event stream).
mod approvals;
mod audit;
mod playbooks;
mod run;
mod runs;
mod switches;

pub use approvals::*;
pub use audit::*;
pub use playbooks::*;
pub use run::*;
pub use runs::*;
pub use switches::*;
