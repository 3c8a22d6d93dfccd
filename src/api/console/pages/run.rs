//! One run: its alert, steps and outputs, live while it runs; cancel and retry.

use super::*;

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
    state: StepState,
    started_at: Option<Timestamp>,
    took: Option<String>,
    /// A verification window under way: how long it has left.
    verifying: Option<String>,
    args: String,
    output: Vec<OutputField>,
    error: Option<String>,
    artifacts: Vec<ArtifactLink>,
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
            state: s.state,
            started_at: s.started_at,
            took: span(s.started_at, s.finished_at),
            verifying: s.output.as_ref().and_then(|o| {
                let left = o["verifying"]["left_seconds"].as_u64()?;
                let left = crate::time::format_duration(Duration::from_secs(left));
                Some(format!(
                    "{left} left of {}",
                    o["verifying"]["for"].as_str()?
                ))
            }),
            args: pretty(&s.args),
            output,
            error: s.error.clone(),
            artifacts: s.artifacts.iter().map(ArtifactLink::from).collect(),
        }
    }
}

#[derive(Template)]
#[template(path = "run_live.html")]
struct RunLive {
    id: i64,
    state: RunState,
    reason: Option<String>,
    error: Option<String>,
    started_at: Option<Timestamp>,
    finished_at: Option<Timestamp>,
    took: Option<String>,
    steps: Vec<StepRow>,
    approval: Option<ApprovalCard>,
    decided: Vec<ApprovalCard>,
    csrf: String,
    can_approve: bool,
    can_cancel: bool,
    can_retry: bool,
    /// It ended, and changed something that can be taken back.
    can_undo: bool,
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
    undo_of: Option<i64>,
    created_at: Timestamp,
    body: String,
}

async fn live_part(state: &AppState, viewer: &Viewer, run: &RunView) -> Result<String, Page> {
    let mut cards = Vec::new();
    for a in state.store.run_approvals(run.id).await? {
        cards.push(ApprovalCard::from(a).with_hold(state).await?);
    }
    let (pending, decided): (Vec<_>, Vec<_>) = cards.into_iter().partition(ApprovalCard::pending);
    let retryable = crate::engine::manual::RETRYABLE.contains(&run.state);
    RunLive {
        id: run.id,
        state: run.state,
        reason: run.reason.clone(),
        error: run.error.clone(),
        started_at: run.started_at,
        finished_at: run.finished_at,
        took: span(run.started_at, run.finished_at),
        steps: run.steps.iter().flatten().map(StepRow::from).collect(),
        approval: pending.into_iter().next(),
        decided,
        csrf: viewer.csrf.clone(),
        can_approve: viewer.may(Role::Approver),
        can_cancel: viewer.may(Role::Operator) && run.state.is_live(),
        can_retry: viewer.may(Role::Operator) && retryable,
        can_undo: viewer.may(Role::Operator)
            && !run.state.is_live()
            && !run.dry_run
            && !crate::engine::undo::plan(run.steps.as_deref().unwrap_or_default(), false)
                .steps
                .is_empty(),
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
    state.engine.show_live(&mut run);
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
        live: run.state.is_live(),
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
        undo_of: run.undo_of,
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
        _slot: crate::api::console::streams::StreamSlot,
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
                    w.state.engine.show_live(&mut run);
                    run
                }
                _ => return None,
            };
            let Ok(html) = live_part(&w.state, &w.viewer, &run).await else {
                return None;
            };
            let ended = !run.state.is_live();
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

/// The undo form.
#[derive(Debug, Deserialize)]
pub struct UndoForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /ui/runs/{id}/undo`: to the undo run's page.
pub async fn undo(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(id): Path<i64>,
    Form(form): Form<UndoForm>,
) -> Result<Response, Page> {
    viewer.check_csrf(&state, &form.csrf, "undo").await?;
    viewer.require(&state, Role::Operator, "undo").await?;
    let (outcome, _) = (state.engine)
        .undo(id, false, &viewer.identity.name)
        .await
        .map_err(ApiError::from)?;
    Ok(Redirect::to(&format!("/ui/runs/{}", outcome.run_id())).into_response())
}

/// `GET /ui/runs/{id}/artifacts/{name}`: an artifact, for a console session (the API's route
/// takes a token).
pub async fn artifact(
    State(state): State<AppState>,
    _viewer: Viewer,
    Path((id, name)): Path<(i64, String)>,
) -> Result<Response, Page> {
    crate::api::runs::serve_artifact(&state.store, id, &name)
        .await
        .map_err(|e| match e {
            crate::api::ApiError::NotFound(why) => Page::error(StatusCode::NOT_FOUND, why),
            other => Page::error(StatusCode::SERVICE_UNAVAILABLE, other.to_string()),
        })
}
