//! Read views of runs for the API and the CLI.

use super::db::Row;
use super::queue::load_steps;
use super::*;
use crate::alert::Labels;
use crate::time::Timestamp;
use serde::Serialize;
use serde_json::Value;

/// A run as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RunView {
    /// Run id.
    pub id: i64,
    /// Playbook name.
    pub playbook: String,
    /// State (`cancelling`: running, its cancel asked).
    #[schema(value_type = String)]
    pub state: RunState,
    /// Why it was suppressed, if it was.
    pub reason: Option<String>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Shadow mode: recorded without acting.
    #[serde(rename = "shadow")]
    pub dry_run: bool,
    /// What it acts on.
    pub target: String,
    /// The alert.
    pub alert: AlertView,
    /// Rendered parameters.
    #[schema(value_type = Object)]
    pub params: Value,
    /// Created.
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    /// Started.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<Timestamp>,
    /// Finished.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<Timestamp>,
    /// The operator who asked for it (a manual trigger or a retry); none for an alert's run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub triggered_by: Option<String>,
    /// The run it retries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<i64>,
    /// The run it takes back (an undo).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undo_of: Option<i64>,
    /// Steps (run detail only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepRecord>>,
}

impl RunView {
    /// Adds `left_seconds` to each verification window under way (a running step whose output
    /// says `verifying … until`).
    pub fn note_time_left(&mut self, now: Timestamp) {
        for step in self.steps.iter_mut().flatten() {
            if step.state != StepState::Running {
                continue;
            }
            let verifying = step.output.as_mut().map(|o| &mut o["verifying"]);
            let Some(verifying) = verifying.filter(|v| v.is_object()) else {
                continue;
            };
            let until = verifying["until"]
                .as_str()
                .and_then(|t| Timestamp::parse(t).ok());
            if let Some(until) = until {
                verifying["left_seconds"] = until.since(now).as_secs().into();
            }
        }
    }
}

/// The alert of a run.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AlertView {
    /// Alert row id.
    pub id: i64,
    /// Fingerprint.
    pub fingerprint: String,
    /// Status when received.
    #[schema(value_type = String)]
    pub status: crate::alert::AlertStatus,
    /// Start time as sent.
    pub starts_at: String,
    /// Labels.
    pub labels: Labels,
    /// Annotations.
    pub annotations: Labels,
    /// Where the alert came from (Alertmanager's `generatorURL`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generator_url: Option<String>,
}

/// Filter and page for listing runs (newest first).
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Only this playbook.
    pub playbook: Option<String>,
    /// Only this state.
    pub state: Option<RunState>,
    /// Only this target.
    pub target: Option<String>,
    /// Only runs with a smaller id (the cursor of the previous page).
    pub before: Option<i64>,
    /// Page size.
    pub limit: u32,
}

const RUN_SELECT: &str = "SELECT r.id, r.playbook, r.state, r.reason, r.error, r.dry_run, r.params,
    r.created_at, r.started_at, r.finished_at, a.id, a.fingerprint, a.status, a.starts_at, a.labels, a.annotations,
    r.target, r.triggered_by, r.retry_of, r.undo_of, a.generator_url
  FROM runs r JOIN alerts a ON a.id = r.alert_id";

fn run_view(r: &Row) -> Result<RunView, StoreError> {
    let labels: String = r.get(14)?;
    let annotations: String = r.get(15)?;
    Ok(RunView {
        id: r.get(0)?,
        playbook: r.get(1)?,
        state: r.get(2)?,
        reason: r.get(3)?,
        error: r.get(4)?,
        dry_run: r.get(5)?,
        target: r.get(16)?,
        params: parse_json(r.get(6)?),
        created_at: r.get(7)?,
        started_at: r.get(8)?,
        finished_at: r.get(9)?,
        alert: AlertView {
            id: r.get(10)?,
            fingerprint: r.get(11)?,
            status: r.get(12)?,
            starts_at: r.get(13)?,
            labels: serde_json::from_str(&labels).unwrap_or_default(),
            annotations: serde_json::from_str(&annotations).unwrap_or_default(),
            generator_url: r.get(20)?,
        },
        triggered_by: r.get(17)?,
        retry_of: r.get(18)?,
        undo_of: r.get(19)?,
        steps: None,
    })
}

impl Store {
    /// Lists runs, newest first.
    pub async fn list_runs(&self, f: RunFilter) -> Result<Vec<RunView>, StoreError> {
        self.read(move |c| {
            c.rows(
                &format!(
                    "{RUN_SELECT} WHERE (r.playbook = ?1 OR ?1 IS NULL) AND (r.state = ?2 OR ?2 IS NULL)
                       AND (r.id < ?3 OR ?3 IS NULL) AND (r.target = ?5 OR ?5 IS NULL)
                     ORDER BY r.id DESC LIMIT ?4"
                ),
                &[
                    &f.playbook,
                    &f.state.map(RunState::as_str),
                    &f.before,
                    &i64::from(f.limit),
                    &f.target,
                ],
                run_view,
            )
        })
        .await
    }

    /// One run with its steps.
    pub async fn get_run(&self, id: i64) -> Result<Option<RunView>, StoreError> {
        self.read(move |c| {
            let run = c.row(&format!("{RUN_SELECT} WHERE r.id = ?1"), &[&id], run_view)?;
            let Some(mut run) = run else { return Ok(None) };
            let mut steps = load_steps(c, id)?;
            for (idx, artifact) in super::artifacts::step_artifacts(c, id)? {
                if let Some(step) = steps.iter_mut().find(|s| s.idx == idx) {
                    step.artifacts.push(artifact);
                }
            }
            run.steps = Some(steps);
            Ok(Some(run))
        })
        .await
    }

    /// Counts of alerts and runs (for tests and load reports).
    pub async fn counts(&self) -> Result<(i64, i64), StoreError> {
        self.read(|c| {
            c.one(
                "SELECT (SELECT count(*) FROM alerts), (SELECT count(*) FROM runs)",
                &[],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .await
    }
}
