//! The console's pages and the forms they post.

use super::session::CsrfForm;
use super::{Page, Viewer, role_name};
use crate::api::killswitch::{self, SwitchBody};
use crate::api::{ApiError, AppState};
use crate::config::Role;
use crate::engine::CancelResult;
use crate::store::{
    ApprovalState, ApprovalView, AuditEntry, GLOBAL, RunFilter, RunState, RunView, StepRecord,
    Switch, playbook_scope,
};
use askama::Template;
use axum::Form;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
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

/// Whether a run can still change.
fn is_live(state: &str) -> bool {
    matches!(
        state,
        "pending" | "running" | "cancelling" | "awaiting_approval"
    )
}

/// How long from `start` to `end` (RFC 3339), e.g. `850 ms`, `4.2 s`, `3m 5s`.
fn span(start: Option<&str>, end: Option<&str>) -> Option<String> {
    let at = |t: &str| humantime::parse_rfc3339_weak(t).ok();
    let took = at(end?)?.duration_since(at(start?)?).ok()?;
    Some(match took.as_millis() {
        ms @ 0..1000 => format!("{ms} ms"),
        ms @ 1000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        _ => humantime::format_duration(Duration::from_secs(took.as_secs())).to_string(),
    })
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Runs

/// A run in the list.
pub struct RunRow {
    id: i64,
    state: String,
    playbook: String,
    target: String,
    alert: String,
    created_at: String,
    finished_at: Option<String>,
    by: String,
    /// Why it was held back or failed, cut to a line (the run's page has all of it).
    why: String,
}

/// Characters of a run's reason or error shown in a list.
const WHY_CHARS: usize = 120;

impl From<RunView> for RunRow {
    fn from(r: RunView) -> RunRow {
        let why = (r.reason.as_deref().or(r.error.as_deref())).unwrap_or_default();
        RunRow {
            why: crate::text::truncate(why, WHY_CHARS),
            id: r.id,
            by: r
                .triggered_by
                .map_or_else(|| "alert".into(), |w| format!("{w} (manual)")),
            alert: r.alert.labels.get("alertname").cloned().unwrap_or_default(),
            state: r.state,
            playbook: r.playbook,
            target: r.target,
            created_at: r.created_at,
            finished_at: r.finished_at,
        }
    }
}

#[derive(Template)]
#[template(path = "runs.html")]
struct RunsPage {
    chrome: Chrome,
    runs: Vec<RunRow>,
    states: Vec<&'static str>,
    playbooks: Vec<String>,
    state: String,
    playbook: String,
    target: String,
    older: Option<String>,
    newest: Option<String>,
}

/// Filters and cursor of the runs list (empty fields mean any).
#[derive(Debug, Default, Deserialize)]
pub struct RunsQuery {
    #[serde(default)]
    state: String,
    #[serde(default)]
    playbook: String,
    #[serde(default)]
    target: String,
    before: Option<i64>,
}

fn query_string(pairs: &[(&str, &str)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs.iter().filter(|(_, v)| !v.is_empty()) {
        q.append_pair(k, v);
    }
    q.finish()
}

/// `GET /ui/runs`
pub async fn runs(
    State(state): State<AppState>,
    viewer: Viewer,
    q: Result<Query<RunsQuery>, QueryRejection>,
) -> Result<Page, Page> {
    let Query(q) = q.map_err(ApiError::from)?;
    let run_state =
        match q.state.as_str() {
            "" => None,
            s => Some(RunState::parse(s).ok_or_else(|| {
                Page::error(StatusCode::BAD_REQUEST, format!("unknown state {s:?}"))
            })?),
        };
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let runs = state
        .store
        .list_runs(RunFilter {
            playbook: non_empty(&q.playbook),
            state: run_state,
            target: non_empty(&q.target),
            before: q.before,
            limit: PAGE,
        })
        .await?;
    let filters = [
        ("state", q.state.as_str()),
        ("playbook", q.playbook.as_str()),
        ("target", q.target.as_str()),
    ];
    let older = (runs.len() == PAGE as usize)
        .then(|| runs.last().map(|r| r.id.to_string()))
        .flatten()
        .map(|before| {
            let mut pairs = filters.to_vec();
            pairs.push(("before", &before));
            query_string(&pairs)
        });
    let newest = q.before.map(|_| query_string(&filters));
    Ok(Page::render(&RunsPage {
        chrome: chrome(&state, &viewer, "runs").await?,
        runs: runs.into_iter().map(RunRow::from).collect(),
        states: RunState::ALL.iter().map(|s| s.as_str()).collect(),
        playbooks: state
            .engine
            .playbooks()
            .playbooks
            .iter()
            .map(|p| p.name.clone())
            .collect(),
        state: q.state,
        playbook: q.playbook,
        target: q.target,
        older,
        newest,
    }))
}

/// One field of a step's output: text is shown as text, the rest as JSON.
pub struct OutputField {
    key: String,
    text: String,
}

/// A step as the run page shows it.
pub struct StepRow {
    idx: i64,
    name: String,
    action: String,
    state: String,
    started_at: Option<String>,
    took: Option<String>,
    args: String,
    output: Vec<OutputField>,
    error: Option<String>,
}

impl From<&StepRecord> for StepRow {
    fn from(s: &StepRecord) -> StepRow {
        let output = match &s.output {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(map)) => map
                .iter()
                .map(|(k, v)| OutputField {
                    key: k.clone(),
                    text: v.as_str().map_or_else(|| pretty(v), str::to_string),
                })
                .collect(),
            Some(v) => vec![OutputField {
                key: "output".into(),
                text: pretty(v),
            }],
        };
        StepRow {
            idx: s.idx + 1,
            name: s.name.clone(),
            action: s.action.to_string(),
            state: s.state.as_str().to_string(),
            started_at: s.started_at.clone(),
            took: span(s.started_at.as_deref(), s.finished_at.as_deref()),
            args: pretty(&s.args),
            output,
            error: s.error.clone(),
        }
    }
}

/// An approval request: exactly what will be done, and its votes.
pub struct ApprovalCard {
    id: i64,
    run_id: i64,
    playbook: String,
    step_name: String,
    scope: String,
    state: String,
    target: String,
    steps: Vec<(String, String, String)>,
    action_hash: String,
    required: u32,
    votes: Vec<crate::store::Vote>,
    approvers: String,
    created_at: String,
    expires_at: String,
    decided_by: Option<String>,
    decided_at: Option<String>,
    comment: Option<String>,
    /// Why it cannot be approved now (a kill switch), for a pending one.
    held: Option<String>,
}

impl ApprovalCard {
    /// Fills in why a pending request cannot be approved now.
    async fn with_hold(mut self, state: &AppState) -> Result<ApprovalCard, Page> {
        if self.state == "pending" {
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
            state: a.state.as_str().to_string(),
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
        }
    }
}

/// The part of the run page that changes while it runs (sent again by the event stream).
#[derive(Template)]
#[template(path = "run_live.html")]
struct RunLive {
    id: i64,
    state: String,
    reason: Option<String>,
    error: Option<String>,
    started_at: Option<String>,
    finished_at: Option<String>,
    took: Option<String>,
    steps: Vec<StepRow>,
    approval: Option<ApprovalCard>,
    decided: Vec<ApprovalCard>,
    csrf: String,
    can_approve: bool,
    can_cancel: bool,
    can_retry: bool,
    /// Why a retry would be held now (a kill switch): the button is disabled with it.
    retry_held: Option<String>,
}

#[derive(Template)]
#[template(path = "run.html")]
struct RunPage {
    chrome: Chrome,
    id: i64,
    playbook: String,
    target: String,
    dry_run: bool,
    live: bool,
    alert_name: String,
    alert: crate::store::AlertView,
    by: String,
    retry_of: Option<i64>,
    created_at: String,
    body: String,
}

async fn live_part(state: &AppState, viewer: &Viewer, run: &RunView) -> Result<String, Page> {
    let mut cards = Vec::new();
    for a in state.store.run_approvals(run.id).await? {
        cards.push(ApprovalCard::from(a).with_hold(state).await?);
    }
    let (pending, decided): (Vec<_>, Vec<_>) =
        cards.into_iter().partition(|a| a.state == "pending");
    let retryable = (crate::engine::manual::RETRYABLE.iter()).any(|s| s.as_str() == run.state);
    RunLive {
        id: run.id,
        state: run.state.clone(),
        reason: run.reason.clone(),
        error: run.error.clone(),
        started_at: run.started_at.clone(),
        finished_at: run.finished_at.clone(),
        took: span(run.started_at.as_deref(), run.finished_at.as_deref()),
        steps: run.steps.iter().flatten().map(StepRow::from).collect(),
        approval: pending.into_iter().next(),
        decided,
        csrf: viewer.csrf.clone(),
        can_approve: viewer.may(Role::Approver),
        can_cancel: viewer.may(Role::Operator) && is_live(&run.state),
        can_retry: viewer.may(Role::Operator) && retryable,
        retry_held: if retryable {
            state.store.kill_reason(&run.playbook).await?
        } else {
            None
        },
    }
    .render()
    .map(|html| crate::notify::neutralize_bidi(&html).into_owned())
    .map_err(|e| Page::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn load_run(state: &AppState, id: i64) -> Result<RunView, Page> {
    let mut run = (state.store.get_run(id).await?)
        .ok_or_else(|| Page::error(StatusCode::NOT_FOUND, format!("There is no run {id}.")))?;
    state.engine.show_cancelling(&mut run);
    Ok(run)
}

/// `GET /ui/runs/{id}`
pub async fn run(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(id): Path<i64>,
) -> Result<Page, Page> {
    let run = load_run(&state, id).await?;
    let body = live_part(&state, &viewer, &run).await?;
    Ok(Page::render(&RunPage {
        chrome: chrome(&state, &viewer, "runs").await?,
        id,
        live: is_live(&run.state),
        alert_name: run
            .alert
            .labels
            .get("alertname")
            .cloned()
            .unwrap_or_default(),
        by: run
            .triggered_by
            .map_or_else(|| "an alert".into(), |w| format!("{w} (manual)")),
        playbook: run.playbook,
        target: run.target,
        dry_run: run.dry_run,
        alert: run.alert,
        retry_of: run.retry_of,
        created_at: run.created_at,
        body,
    }))
}

/// `GET /ui/runs/{id}/events`: the live part of the run page, each time it changes, until the
/// run ends.
pub async fn run_events(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(id): Path<i64>,
) -> Result<Response, Page> {
    load_run(&state, id).await?;
    let slot = (state.streams)
        .open(viewer.id_hash)
        .map_err(|why| Page::error(StatusCode::TOO_MANY_REQUESTS, why))?;
    struct Watch {
        state: AppState,
        viewer: Viewer,
        last: String,
        done: bool,
        until: tokio::time::Instant,
        polls: u32,
        _slot: super::streams::StreamSlot,
    }
    let watch = Watch {
        state,
        viewer,
        last: String::new(),
        done: false,
        until: tokio::time::Instant::now() + LIVE_MAX,
        polls: 0,
        _slot: slot,
    };
    let stream = futures_util::stream::unfold(watch, move |mut w| async move {
        if w.done {
            return None;
        }
        loop {
            if tokio::time::Instant::now() > w.until {
                return None;
            }
            // The stream lives only as long as its session: a logout or an expiry ends it
            // within a second.
            w.polls += 1;
            if w.polls % SESSION_CHECK_EVERY == 1
                && !matches!(w.state.store.session(w.viewer.id_hash).await, Ok(Some(_)))
            {
                return None;
            }
            let run = match w.state.store.get_run(id).await {
                Ok(Some(mut run)) => {
                    w.state.engine.show_cancelling(&mut run);
                    run
                }
                _ => return None,
            };
            let Ok(html) = live_part(&w.state, &w.viewer, &run).await else {
                return None;
            };
            let ended = !is_live(&run.state);
            if html != w.last || ended {
                w.last.clone_from(&html);
                w.done = ended;
                let event = Event::default()
                    .event(if ended { "end" } else { "update" })
                    .json_data(serde_json::json!({ "state": run.state, "html": html }))
                    .unwrap_or_default();
                return Some((Ok::<_, std::convert::Infallible>(event), w));
            }
            tokio::time::sleep(LIVE_POLL).await;
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// `POST /ui/runs/{id}/cancel`
pub async fn cancel(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(id): Path<i64>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, Page> {
    viewer.check_csrf(&state, &form.csrf, "cancel").await?;
    viewer.require(&state, Role::Operator, "cancel").await?;
    match state.engine.cancel_by(id, &viewer.identity.name).await? {
        CancelResult::NotFound => Err(ApiError::NotFound(format!("no run {id}")).into()),
        CancelResult::AlreadyFinished(s) => {
            Err(ApiError::Conflict(format!("run {id} already ended: {}", s.as_str())).into())
        }
        CancelResult::Cancelled | CancelResult::Requested => {
            Ok(Redirect::to(&format!("/ui/runs/{id}")).into_response())
        }
    }
}

/// The retry form.
#[derive(Debug, Deserialize)]
pub struct RetryForm {
    #[serde(default)]
    csrf: String,
    from_start: Option<String>,
}

/// `POST /ui/runs/{id}/retry`: to the new run's page.
pub async fn retry(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(id): Path<i64>,
    Form(form): Form<RetryForm>,
) -> Result<Response, Page> {
    viewer.check_csrf(&state, &form.csrf, "retry").await?;
    viewer.require(&state, Role::Operator, "retry").await?;
    let retry = crate::engine::manual::Retry {
        run_id: id,
        from_start: form.from_start.is_some(),
    };
    let outcome = (state.engine)
        .retry(retry, &viewer.identity.name)
        .await
        .map_err(ApiError::from)?;
    Ok(Redirect::to(&format!("/ui/runs/{}", outcome.run_id())).into_response())
}

// ---------------------------------------------------------------------------------------------
// Approvals

#[derive(Template)]
#[template(path = "approvals.html")]
struct ApprovalsPage {
    chrome: Chrome,
    pending: Vec<ApprovalCard>,
    decided: Vec<ApprovalCard>,
    can_approve: bool,
    csrf: String,
}

/// `GET /ui/approvals`
pub async fn approvals(State(state): State<AppState>, viewer: Viewer) -> Result<Page, Page> {
    let mut pending = Vec::new();
    let mut decided = Vec::new();
    for a in state.store.list_approvals(None, 100).await? {
        if a.state == ApprovalState::Pending {
            pending.push(ApprovalCard::from(a).with_hold(&state).await?);
        } else if decided.len() < 20 {
            decided.push(ApprovalCard::from(a));
        }
    }
    Ok(Page::render(&ApprovalsPage {
        chrome: chrome(&state, &viewer, "approvals").await?,
        pending,
        decided,
        can_approve: viewer.may(Role::Approver),
        csrf: viewer.csrf.clone(),
    }))
}

/// The approve/deny form.
#[derive(Debug, Deserialize)]
pub struct DecideForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    decision: String,
    #[serde(default)]
    comment: String,
}

/// `POST /ui/approvals/{id}/decide`: to the run's page.
pub async fn decide(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(id): Path<i64>,
    Form(form): Form<DecideForm>,
) -> Result<Response, Page> {
    viewer.check_csrf(&state, &form.csrf, "decide").await?;
    viewer.require(&state, Role::Approver, "decide").await?;
    let approve = match form.decision.as_str() {
        "approve" => true,
        "deny" => false,
        other => {
            return Err(Page::error(
                StatusCode::BAD_REQUEST,
                format!("decision must be approve or deny, not {other:?}"),
            ));
        }
    };
    let comment = Some(form.comment.trim().to_string()).filter(|c| !c.is_empty());
    let run_id = state.store.get_approval(id).await?.map(|a| a.run_id);
    // A refusal is a page with the reason, the way back and the comment as written.
    let refused = |e: ApiError| {
        let back = run_id.map(|r| format!("/ui/runs/{r}"));
        Page::refused_form(
            e.status(),
            e.to_string(),
            back.as_deref(),
            comment.as_deref(),
        )
    };
    let request = crate::api::approvals::DecisionRequest {
        id,
        who: &viewer.identity,
        approve,
        comment: comment.clone(),
        shown_hash: None,
    };
    (crate::api::approvals::decide_one(&state, request).await).map_err(refused)?;
    Ok(Redirect::to(&format!("/ui/runs/{}", run_id.unwrap_or(0))).into_response())
}

// ---------------------------------------------------------------------------------------------
// Kill switches

/// A switch as the page shows it.
pub struct SwitchRow {
    name: String,
    engaged: bool,
    reason: Option<String>,
    actor: Option<String>,
    changed_at: Option<String>,
    until: Option<String>,
}

impl SwitchRow {
    fn new(name: String, s: Option<Switch>) -> SwitchRow {
        let s = s.unwrap_or_else(|| killswitch::released(&name));
        SwitchRow {
            name,
            engaged: s.engaged,
            reason: s.reason,
            actor: s.actor,
            changed_at: s.changed_at,
            until: s.until.filter(|_| s.engaged),
        }
    }
}

#[derive(Template)]
#[template(path = "killswitch.html")]
struct KillSwitchPage {
    chrome: Chrome,
    global: SwitchRow,
    playbooks: Vec<SwitchRow>,
    can_switch: bool,
}

/// `GET /ui/killswitch`
pub async fn killswitch(State(state): State<AppState>, viewer: Viewer) -> Result<Page, Page> {
    let current = killswitch::current(&state).await?;
    let mut names: Vec<String> = (state.engine.playbooks().playbooks.iter())
        .map(|p| p.name.clone())
        .collect();
    for s in &current.playbooks {
        if let Some(n) = s.scope.strip_prefix("playbook:")
            && !names.iter().any(|m| m == n)
        {
            names.push(n.to_string());
        }
    }
    let playbooks = names
        .into_iter()
        .map(|n| {
            let scope = playbook_scope(&n);
            let s = current.playbooks.iter().find(|s| s.scope == scope).cloned();
            SwitchRow::new(n, s)
        })
        .collect();
    Ok(Page::render(&KillSwitchPage {
        chrome: chrome(&state, &viewer, "killswitch").await?,
        global: SwitchRow::new(GLOBAL.into(), Some(current.global)),
        playbooks,
        can_switch: viewer.may(Role::Admin),
    }))
}

/// The engage/release form.
#[derive(Debug, Deserialize)]
pub struct SwitchForm {
    #[serde(default)]
    csrf: String,
    /// `global` or a playbook's name.
    #[serde(default)]
    scope: String,
    /// `engage` or `release`.
    #[serde(default)]
    action: String,
    #[serde(default)]
    reason: String,
    #[serde(default, rename = "for")]
    for_: String,
}

/// `POST /ui/killswitch`
pub async fn set_switch(
    State(state): State<AppState>,
    viewer: Viewer,
    Form(form): Form<SwitchForm>,
) -> Result<Response, Page> {
    viewer.check_csrf(&state, &form.csrf, "kill switch").await?;
    viewer.require(&state, Role::Admin, "kill switch").await?;
    let scope = if form.scope == GLOBAL {
        GLOBAL.to_string()
    } else if state.engine.playbooks().get(&form.scope).is_some() {
        playbook_scope(&form.scope)
    } else {
        return Err(ApiError::NotFound(format!("no playbook {:?}", form.scope)).into());
    };
    let engaged = match form.action.as_str() {
        "engage" => true,
        "release" => false,
        other => {
            return Err(Page::error(
                StatusCode::BAD_REQUEST,
                format!("action must be engage or release, not {other:?}"),
            ));
        }
    };
    let body = SwitchBody {
        engaged,
        reason: Some(form.reason),
        until: None,
        for_: Some(form.for_.trim().to_string()).filter(|f| !f.is_empty()),
        replace: None,
    };
    killswitch::apply(&state, &viewer.identity.name, scope, body).await?;
    Ok(Redirect::to("/ui/killswitch").into_response())
}

// ---------------------------------------------------------------------------------------------
// Playbooks and audit

/// A playbook in force.
pub struct PlaybookRow {
    name: String,
    description: String,
    file: String,
    matchers: String,
    steps: Vec<String>,
    cooldown: String,
    dry_run: bool,
    gated: bool,
}

#[derive(Template)]
#[template(path = "playbooks.html")]
struct PlaybooksPage {
    chrome: Chrome,
    playbooks: Vec<PlaybookRow>,
    failure: Option<crate::engine::ReloadFailure>,
    failed_at: String,
    can_reload: bool,
}

/// `GET /ui/playbooks`
pub async fn playbooks(State(state): State<AppState>, viewer: Viewer) -> Result<Page, Page> {
    let set = state.engine.playbooks();
    let playbooks = set
        .playbooks
        .iter()
        .map(|p| PlaybookRow {
            name: p.name.clone(),
            description: p.description.clone(),
            file: p.file.display().to_string(),
            matchers: p
                .matchers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            steps: p
                .steps
                .iter()
                .map(|s| format!("{} ({})", s.name, s.action.name()))
                .collect(),
            cooldown: humantime::format_duration(p.cooldown).to_string(),
            dry_run: p.dry_run,
            gated: p.approval.is_some() || p.steps.iter().any(|s| s.approval.is_some()),
        })
        .collect();
    let failure = state.engine.reload_failure();
    Ok(Page::render(&PlaybooksPage {
        chrome: chrome(&state, &viewer, "playbooks").await?,
        playbooks,
        failed_at: failure
            .as_ref()
            .map(|f| crate::time::rfc3339(f.at_ms))
            .unwrap_or_default(),
        failure,
        can_reload: viewer.may(Role::Admin),
    }))
}

/// `POST /ui/playbooks/reload`: back to the playbooks, which show a refused reload's errors.
pub async fn reload(
    State(state): State<AppState>,
    viewer: Viewer,
    Form(form): Form<CsrfForm>,
) -> Result<Response, Page> {
    viewer.check_csrf(&state, &form.csrf, "reload").await?;
    viewer.require(&state, Role::Admin, "reload").await?;
    // A refused set is recorded by the engine and shown on the page.
    let _ = state.engine.reload_by(&viewer.identity.name).await?;
    Ok(Redirect::to("/ui/playbooks").into_response())
}

/// An audit row, with the run it concerns when its target names one (`run/7 step/0 …`).
pub struct AuditRow {
    entry: AuditEntry,
    run: Option<i64>,
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    chrome: Chrome,
    rows: Vec<AuditRow>,
    older: Option<i64>,
}

/// Cursor of the audit log.
#[derive(Debug, Default, Deserialize)]
pub struct AuditQuery {
    before: Option<i64>,
}

/// `GET /ui/audit`
pub async fn audit(
    State(state): State<AppState>,
    viewer: Viewer,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Page, Page> {
    let Query(AuditQuery { before }) = q.map_err(ApiError::from)?;
    let rows = state.store.audit_log(before, PAGE).await?;
    let older = (rows.len() == PAGE as usize)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    let rows = rows
        .into_iter()
        .map(|entry| AuditRow {
            run: (entry.target.as_deref().unwrap_or_default().split(' '))
                .find_map(|part| part.strip_prefix("run/")?.parse().ok()),
            entry,
        })
        .collect();
    Ok(Page::render(&AuditPage {
        chrome: chrome(&state, &viewer, "audit").await?,
        rows,
        older,
    }))
}
