//! The runs list, with its filters and paging.

use super::*;

/// A run in the list.
pub struct RunRow {
    id: i64,
    state: RunState,
    playbook: String,
    target: String,
    alert: String,
    created_at: Timestamp,
    finished_at: Option<Timestamp>,
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
