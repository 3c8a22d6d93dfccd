//! Alerts, runs and steps: intake (dedup and cooldown decided in the same transaction that
//! records the alert), the run queue (pending runs are claimed in order), step transitions,
//! crash recovery and the views the API serves.

use super::{Store, StoreError};
use crate::alert::{Alert, AlertStatus, Labels};
use crate::playbook::Plan;
use crate::time::{now_ms, rfc3339};
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Serialize;
use serde_json::Value;

/// Run states. Final: everything but `pending` and `running`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Recorded, waiting for a worker.
    Pending,
    /// Executing steps.
    Running,
    /// Every step succeeded (or failed with `on_failure: continue`).
    Succeeded,
    /// A step failed, or the run could not be planned.
    Failed,
    /// An operator cancelled it.
    Cancelled,
    /// The daemon stopped while it ran; never resumed silently.
    Interrupted,
    /// Not started: a cooldown, the kill switch, a maintenance window or the circuit
    /// breaker held it back; `reason` says which.
    Suppressed,
    /// Waiting for approval of its next step.
    AwaitingApproval,
    /// An approver denied it; nothing more ran.
    Denied,
    /// Its approval request expired; nothing more ran.
    Expired,
    /// The kill switch stopped it before its next step.
    Killed,
    /// Its alert resolved before it finished (waiting in the queue, for approval, or between
    /// steps); nothing more ran.
    Resolved,
    /// A dry run that went through every step: each was rendered, validated and recorded,
    /// and nothing was done.
    DryRun,
}

impl RunState {
    /// Every state, for parsing.
    pub const ALL: &'static [RunState] = &[
        RunState::Pending,
        RunState::Running,
        RunState::Succeeded,
        RunState::Failed,
        RunState::Cancelled,
        RunState::Interrupted,
        RunState::Suppressed,
        RunState::AwaitingApproval,
        RunState::Denied,
        RunState::Expired,
        RunState::Killed,
        RunState::Resolved,
        RunState::DryRun,
    ];

    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Pending => "pending",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
            RunState::Interrupted => "interrupted",
            RunState::Suppressed => "suppressed",
            RunState::AwaitingApproval => "awaiting_approval",
            RunState::Denied => "denied",
            RunState::Expired => "expired",
            RunState::Killed => "killed",
            RunState::Resolved => "resolved",
            RunState::DryRun => "dry_run",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<RunState> {
        Self::ALL.iter().copied().find(|r| r.as_str() == s)
    }
}

/// Step states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Not started.
    Pending,
    /// Started; its action may be under way.
    Running,
    /// Done.
    Succeeded,
    /// Failed (error recorded).
    Failed,
    /// Never started because the run ended first.
    Skipped,
    /// Was running when the daemon stopped; not re-run.
    Interrupted,
    /// Rendered and recorded, not executed (dry run).
    DryRun,
}

impl StepState {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Succeeded => "succeeded",
            StepState::Failed => "failed",
            StepState::Skipped => "skipped",
            StepState::Interrupted => "interrupted",
            StepState::DryRun => "dry_run",
        }
    }
}

/// A playbook that matched an alert, as the engine hands it to intake.
pub struct Candidate {
    /// Playbook name.
    pub playbook: String,
    /// Cooldown in ms (0: none).
    pub cooldown_ms: i64,
    /// What the cooldown is kept per (fingerprint or group key).
    pub cooldown_key: String,
    /// Record without acting.
    pub dry_run: bool,
    /// The rendered plan, or why it could not be rendered.
    pub plan: Result<Plan, String>,
    /// Run deadline in ms.
    pub deadline_ms: i64,
    /// Suppressed before any other check (a maintenance window), with the reason.
    pub suppress: Option<String>,
}

/// Circuit breaker limits as intake applies them (0: no limit).
#[derive(Debug, Clone, Copy, Default)]
pub struct BreakerLimits {
    /// The window, in ms.
    pub window_ms: i64,
    /// Runs started in the window.
    pub max_runs: u32,
    /// Runs started by one playbook in the window.
    pub max_runs_per_playbook: u32,
    /// Failed runs in the window.
    pub max_failures: u32,
    /// Distinct targets in the window.
    pub max_targets: u32,
}

/// One received alert and the playbooks it matched.
pub struct IntakeItem {
    /// The alert.
    pub alert: Alert,
    /// When its webhook arrived (µs since the epoch).
    pub received_us: i64,
    /// Matched playbooks.
    pub candidates: Vec<Candidate>,
}

/// What became of one (alert, playbook) pair at intake.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// A new pending run.
    Created {
        /// The run.
        run_id: i64,
        /// Its playbook.
        playbook: String,
    },
    /// A re-delivery: the run for this occurrence exists already.
    Deduplicated {
        /// The existing run.
        run_id: i64,
        /// Its playbook.
        playbook: String,
    },
    /// Recorded as suppressed (cooldown).
    Suppressed {
        /// The suppressed run record.
        run_id: i64,
        /// Its playbook.
        playbook: String,
        /// Why.
        reason: String,
    },
    /// Recorded as failed: the plan could not be rendered.
    Failed {
        /// The failed run record.
        run_id: i64,
        /// Its playbook.
        playbook: String,
        /// Why.
        error: String,
    },
    /// A run that waited for approval ended because this (resolved) alert arrived.
    Ended {
        /// The run ended.
        run_id: i64,
        /// Its playbook.
        playbook: String,
        /// Its final state.
        state: RunState,
    },
}

/// Which step of which run, for the record.
#[derive(Debug, Clone)]
pub struct StepRef {
    /// Run id.
    pub run_id: i64,
    /// Step index.
    pub idx: i64,
    /// Action name.
    pub action: String,
    /// The run's target.
    pub target: String,
}

/// A run claimed by a worker, with everything needed to execute it.
#[derive(Debug, Clone)]
pub struct ClaimedRun {
    /// Run id.
    pub id: i64,
    /// Playbook name.
    pub playbook: String,
    /// Record without acting.
    pub dry_run: bool,
    /// Rendered parameters.
    pub params: Value,
    /// The alert it is for.
    pub alert: Alert,
    /// What it acts on.
    pub target: String,
    /// Deadline in ms after it first started, if any.
    pub deadline_ms: Option<i64>,
    /// When it first started (ms).
    pub started_ms: i64,
    /// Claimed again after an approval (it already announced its start).
    pub resumed: bool,
    /// Its steps, in order.
    pub steps: Vec<StepRecord>,
}

/// A stored step.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    /// Position in the run (0-based).
    pub idx: i64,
    /// Name.
    pub name: String,
    /// Action name.
    pub action: String,
    /// Rendered arguments.
    pub args: Value,
    /// Timeout in ms, if set.
    pub timeout_ms: Option<i64>,
    /// `stop` or `continue`.
    pub on_failure: String,
    /// State.
    pub state: String,
    /// Started (RFC 3339).
    pub started_at: Option<String>,
    /// Finished (RFC 3339).
    pub finished_at: Option<String>,
    /// Output (action-specific JSON).
    pub output: Option<Value>,
    /// Error.
    pub error: Option<String>,
    /// Approval gate before this step, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<crate::playbook::Gate>,
    /// `main`, or `on_failure` (run only when the run fails).
    pub phase: String,
}

/// A run as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RunView {
    /// Run id.
    pub id: i64,
    /// Playbook name.
    pub playbook: String,
    /// State.
    pub state: String,
    /// Why it was suppressed, if it was.
    pub reason: Option<String>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Recorded without acting.
    pub dry_run: bool,
    /// What it acts on.
    pub target: String,
    /// The alert.
    pub alert: AlertView,
    /// Rendered parameters.
    pub params: Value,
    /// Created (RFC 3339).
    pub created_at: String,
    /// Started.
    pub started_at: Option<String>,
    /// Finished.
    pub finished_at: Option<String>,
    /// Steps (run detail only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepRecord>>,
}

/// The alert of a run.
#[derive(Debug, Clone, Serialize)]
pub struct AlertView {
    /// Alert row id.
    pub id: i64,
    /// Fingerprint.
    pub fingerprint: String,
    /// Status when received.
    pub status: String,
    /// Start time as sent.
    pub starts_at: String,
    /// Labels.
    pub labels: Labels,
    /// Annotations.
    pub annotations: Labels,
}

/// Filter and page for listing runs (newest first).
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Only this playbook.
    pub playbook: Option<String>,
    /// Only this state.
    pub state: Option<RunState>,
    /// Only runs with a smaller id (the cursor of the previous page).
    pub before: Option<i64>,
    /// Page size.
    pub limit: u32,
}

fn json_text(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn parse_json(s: Option<String>) -> Value {
    s.and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null)
}

impl Store {
    /// Records received alerts and decides, atomically with the write, what each matched
    /// playbook does: a new run, a dedup, a suppression, or a failed run. Returns the outcomes
    /// per alert, in order. Nothing is acknowledged to the sender before this commits.
    pub async fn record_intake(
        &self,
        items: Vec<IntakeItem>,
        limits: BreakerLimits,
    ) -> Result<Vec<Vec<Outcome>>, StoreError> {
        // JSON is written here, on the caller's thread, not in the one writer.
        let prepared: Vec<(IntakeItem, Json)> = items
            .into_iter()
            .map(|item| {
                let json = Json {
                    labels: json_text(&item.alert.labels),
                    annotations: json_text(&item.alert.annotations),
                    plans: item
                        .candidates
                        .iter()
                        .map(|c| c.plan.as_ref().ok().map(PlanJson::of))
                        .collect(),
                };
                (item, json)
            })
            .collect();
        let outcomes = self
            .write(move |c| {
                let now = now_ms();
                let mut all = Vec::with_capacity(prepared.len());
                for (item, json) in prepared {
                    let alert_id = insert_alert(c, &item.alert, &json, now, item.received_us)?;
                    let mut outcomes = (item.candidates.into_iter().zip(json.plans))
                        .map(|(cand, plan)| {
                            intake_one(c, &item.alert, alert_id, cand, plan, limits, now)
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    if item.alert.status == AlertStatus::Resolved {
                        outcomes.extend(end_for_resolved(c, &item.alert.fingerprint, now)?);
                    }
                    all.push(outcomes);
                }
                Ok(all)
            })
            .await?;
        let tripped = outcomes.iter().flatten().any(
            |o| matches!(o, Outcome::Suppressed { reason, .. } if reason.starts_with("circuit breaker")),
        );
        if tripped {
            self.switches_changed();
        }
        Ok(outcomes)
    }

    /// Claims the oldest pending run: it becomes `running` in the same statement, so no two
    /// workers can take it.
    ///
    /// A run is skipped (it stays pending, in order) while its target already has
    /// `max_per_target` runs executing, or while another run of the same playbook for the same
    /// alert is executing.
    ///
    /// Claims up to `limit` runs in one write (one commit), oldest first.
    pub async fn claim(
        &self,
        max_per_target: u32,
        limit: usize,
    ) -> Result<Vec<ClaimedRun>, StoreError> {
        let rows = self
            .write(move |c| {
                let mut out = Vec::new();
                while out.len() < limit {
                    match claim_one(c, max_per_target)? {
                        Some(row) => out.push(row),
                        None => break,
                    }
                }
                Ok(out)
            })
            .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // What the claimed runs need is read on the read connection, off the one writer.
        self.read(move |c| {
            rows.into_iter()
                .map(
                    |(id, playbook, dry_run, params, alert_id, target, deadline_ms, started_ms)| {
                        let resumed: bool = c
                            .prepare_cached(
                                "SELECT EXISTS (SELECT 1 FROM approvals WHERE run_id = ?1)",
                            )?
                            .query_row([id], |r| r.get(0))?;
                        Ok(ClaimedRun {
                            id,
                            playbook,
                            dry_run,
                            params: parse_json(params),
                            alert: load_alert(c, alert_id)?,
                            target,
                            deadline_ms,
                            started_ms,
                            resumed,
                            steps: load_steps(c, id)?,
                        })
                    },
                )
                .collect()
        })
        .await
    }

    /// Whether the run's alert resolved while it was executing.
    pub async fn resolved_while_running(&self, run_id: i64) -> Result<bool, StoreError> {
        self.read(move |c| {
            Ok(
                c.prepare_cached("SELECT resolved_at IS NOT NULL FROM runs WHERE id = ?1")?
                    .query_row([run_id], |r| r.get(0))
                    .optional()?
                    .unwrap_or(false),
            )
        })
        .await
    }

    /// Marks a step `running`; written before the action starts.
    pub async fn step_started(&self, run_id: i64, idx: i64) -> Result<(), StoreError> {
        self.write(move |c| {
            c.prepare_cached("UPDATE steps SET state = 'running', started_at = ?3, started_us = ?4 WHERE run_id = ?1 AND idx = ?2")?
                .execute(params![run_id, idx, now_ms(), crate::time::now_us()])?;
            Ok(())
        })
        .await
    }

    /// Records a step's result.
    ///
    /// The executor action goes on the audit log in the same write: `step.<action>` by
    /// `reflex`, on `run/<id> step/<idx> target/<target>`.
    pub async fn step_finished(
        &self,
        step: StepRef,
        state: StepState,
        output: Option<Value>,
        error: Option<String>,
    ) -> Result<(), StoreError> {
        let output = output.map(|o| json_text(&o));
        self.write(move |c| {
            c.prepare_cached(
                "UPDATE steps SET state = ?3, finished_at = ?4, output = ?5, error = ?6 WHERE run_id = ?1 AND idx = ?2",
            )?
            .execute(params![step.run_id, step.idx, state.as_str(), now_ms(), output, error])?;
            let outcome = if error.is_some() { "failed" } else { state.as_str() };
            let target = format!("run/{} step/{} target/{}", step.run_id, step.idx, step.target);
            super::audit::audit_in(c, "reflex", &format!("step.{}", step.action), Some(&target), outcome, error.as_deref())?;
            Ok(())
        })
        .await
    }

    /// Ends a run; steps not started are marked `skipped`.
    pub async fn run_finished(
        &self,
        run_id: i64,
        state: RunState,
        error: Option<String>,
    ) -> Result<(), StoreError> {
        self.write(move |c| {
            finish_run(c, run_id, state, error.as_deref(), now_ms())?;
            Ok(())
        })
        .await
    }

    /// After a failed run: engages the global kill switch when the failures in the window
    /// reach `breaker.max_failures`. Returns the reason when it did.
    pub async fn trip_on_failures(&self, l: BreakerLimits) -> Result<Option<String>, StoreError> {
        if l.max_failures == 0 {
            return Ok(None);
        }
        let tripped = self
            .write(move |c| {
                let now = now_ms();
                let n: u32 = c.query_row(
                    "SELECT count(*) FROM runs WHERE state = 'failed' AND finished_at > ?1",
                    [now - l.window_ms],
                    |r| r.get(0),
                )?;
                if n < l.max_failures || super::switches::engaged_reason(c, "", now)?.is_some() {
                    return Ok(None);
                }
                let window = humantime::format_duration(std::time::Duration::from_millis(
                    l.window_ms as u64,
                ));
                let reason = format!(
                    "circuit breaker: {n} runs failed within {window} (breaker.max_failures = {})",
                    l.max_failures
                );
                super::switches::engage_in(c, "global", &reason, "circuit-breaker", None, now)?;
                Ok(Some(reason))
            })
            .await?;
        if tripped.is_some() {
            self.switches_changed();
        }
        Ok(tripped)
    }

    /// Marks the main steps not yet started as `skipped` (a failure stopped the run; its
    /// `on_failure` steps run next).
    pub async fn skip_pending_main(&self, run_id: i64) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute("UPDATE steps SET state = 'skipped' WHERE run_id = ?1 AND state = 'pending' AND phase = 'main'", [run_id])?;
            Ok(())
        })
        .await
    }

    /// Cancels a run that has not started. Returns the run's state before the call, or `None`
    /// when there is no such run; a `Pending` run is now `Cancelled`.
    pub async fn cancel_if_pending(&self, run_id: i64) -> Result<Option<RunState>, StoreError> {
        self.write(move |c| {
            let state: Option<String> = c
                .query_row("SELECT state FROM runs WHERE id = ?1", [run_id], |r| {
                    r.get(0)
                })
                .optional()?;
            let Some(state) = state.as_deref().and_then(RunState::parse) else {
                return Ok(None);
            };
            if !matches!(state, RunState::Pending | RunState::AwaitingApproval) {
                return Ok(Some(state));
            }
            super::approvals::close_pending(c, run_id, "cancelled", now_ms())?;
            finish_run(
                c,
                run_id,
                RunState::Cancelled,
                Some("cancelled by an operator before it acted further"),
                now_ms(),
            )?;
            Ok(Some(state))
        })
        .await
    }

    /// After a crash: a step still `running` had started and not finished. It is marked
    /// `interrupted`, and so is its run; nothing is re-run. Runs that were `running` between
    /// steps are interrupted too (their next step never started). Pending runs stay pending.
    /// Returns the ids of the interrupted runs.
    pub async fn recover(&self) -> Result<Vec<i64>, StoreError> {
        self.write(|c| {
            let now = now_ms();
            c.execute(
                "UPDATE steps SET state = 'interrupted', finished_at = ?1,
                   error = 'the daemon stopped while this step was running; it was not re-run'
                 WHERE state = 'running'",
                [now],
            )?;
            let ids: Vec<i64> = c
                .prepare("SELECT id FROM runs WHERE state = 'running' ORDER BY id")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for &id in &ids {
                finish_run(
                    c,
                    id,
                    RunState::Interrupted,
                    Some("the daemon stopped during this run; check the target before re-running"),
                    now,
                )?;
            }
            Ok(ids)
        })
        .await
    }

    /// Lists runs, newest first.
    pub async fn list_runs(&self, f: RunFilter) -> Result<Vec<RunView>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "{RUN_SELECT} WHERE (?1 IS NULL OR r.playbook = ?1) AND (?2 IS NULL OR r.state = ?2)
                   AND (?3 IS NULL OR r.id < ?3) ORDER BY r.id DESC LIMIT ?4"
            ))?;
            let rows = stmt.query_map(
                params![f.playbook, f.state.map(RunState::as_str), f.before, f.limit],
                run_view,
            )?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// One run with its steps.
    pub async fn get_run(&self, id: i64) -> Result<Option<RunView>, StoreError> {
        self.read(move |c| {
            let run = c
                .prepare_cached(&format!("{RUN_SELECT} WHERE r.id = ?1"))?
                .query_row([id], run_view)
                .optional()?;
            let Some(mut run) = run else { return Ok(None) };
            run.steps = Some(load_steps(c, id)?);
            Ok(Some(run))
        })
        .await
    }

    /// Counts of alerts and runs (for tests and load reports).
    pub async fn counts(&self) -> Result<(i64, i64), StoreError> {
        self.read(|c| {
            Ok(c.query_row(
                "SELECT (SELECT count(*) FROM alerts), (SELECT count(*) FROM runs)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?)
        })
        .await
    }
}

/// The claimed row of a run; the rest is loaded off the writer.
type ClaimRow = (
    i64,
    String,
    bool,
    Option<String>,
    i64,
    String,
    Option<i64>,
    i64,
);

/// Claims the oldest claimable pending run (see [`Store::claim`]).
fn claim_one(c: &Connection, max_per_target: u32) -> Result<Option<ClaimRow>, StoreError> {
    Ok(c.prepare_cached(
        "UPDATE runs SET state = 'running', started_at = coalesce(started_at, ?1)
         WHERE id = (
           SELECT r.id FROM runs r WHERE r.state = 'pending'
             AND (SELECT count(*) FROM runs t WHERE t.target = r.target AND t.state = 'running') < ?2
             AND NOT EXISTS (SELECT 1 FROM runs o WHERE o.playbook = r.playbook
                               AND o.fingerprint = r.fingerprint AND o.state = 'running')
           ORDER BY r.id LIMIT 1)
         RETURNING id, playbook, dry_run, params, alert_id, target, deadline_ms, started_at",
    )?
    .query_row(params![now_ms(), max_per_target], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?))
    })
    .optional()?)
}

const RUN_SELECT: &str = "SELECT r.id, r.playbook, r.state, r.reason, r.error, r.dry_run, r.params,
    r.created_at, r.started_at, r.finished_at, a.id, a.fingerprint, a.status, a.starts_at, a.labels, a.annotations,
    r.target
  FROM runs r JOIN alerts a ON a.id = r.alert_id";

fn run_view(r: &Row<'_>) -> rusqlite::Result<RunView> {
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
        created_at: rfc3339(r.get(7)?),
        started_at: r.get::<_, Option<i64>>(8)?.map(rfc3339),
        finished_at: r.get::<_, Option<i64>>(9)?.map(rfc3339),
        alert: AlertView {
            id: r.get(10)?,
            fingerprint: r.get(11)?,
            status: r.get(12)?,
            starts_at: r.get(13)?,
            labels: serde_json::from_str(&labels).unwrap_or_default(),
            annotations: serde_json::from_str(&annotations).unwrap_or_default(),
        },
        steps: None,
    })
}

/// An alert's JSON columns, serialized before the write.
struct Json {
    labels: String,
    annotations: String,
    plans: Vec<Option<PlanJson>>,
}

/// A plan's JSON columns.
struct PlanJson {
    params: String,
    steps: Vec<(String, Option<String>)>,
}

impl PlanJson {
    fn of(p: &Plan) -> PlanJson {
        PlanJson {
            params: json_text(&p.params),
            steps: p
                .steps
                .iter()
                .map(|s| (json_text(&s.args), s.approval.as_ref().map(json_text)))
                .collect(),
        }
    }
}

fn insert_alert(
    c: &Connection,
    a: &Alert,
    json: &Json,
    now: i64,
    received_us: i64,
) -> rusqlite::Result<i64> {
    c.prepare_cached(
        "INSERT INTO alerts (received_at, source, fingerprint, status, starts_at, ends_at, labels, annotations, generator_url, group_key, received_us)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        now,
        a.source,
        a.fingerprint,
        a.status.as_str(),
        a.starts_at,
        a.ends_at,
        json.labels,
        json.annotations,
        a.generator_url,
        a.group_key,
        received_us
    ])?;
    Ok(c.last_insert_rowid())
}

fn intake_one(
    c: &Connection,
    a: &Alert,
    alert_id: i64,
    cand: Candidate,
    json: Option<PlanJson>,
    limits: BreakerLimits,
    now: i64,
) -> Result<Outcome, StoreError> {
    let playbook = cand.playbook;
    let existing: Option<i64> = c
        .prepare_cached(
            "SELECT id FROM runs WHERE playbook = ?1 AND fingerprint = ?2 AND starts_at = ?3 AND alert_status = ?4",
        )?
        .query_row(params![playbook, a.fingerprint, a.starts_at, a.status.as_str()], |r| r.get(0))
        .optional()?;
    if let Some(run_id) = existing {
        return Ok(Outcome::Deduplicated { run_id, playbook });
    }
    let target = cand
        .plan
        .as_ref()
        .map_or_else(|_| String::new(), |p| p.target.clone());
    // The gates, in order; the first that holds the run back names the reason.
    let suppressed = match cand.suppress {
        Some(reason) => Some(reason),
        None => super::switches::engaged_reason(c, &playbook, now)?,
    };
    let suppressed = match suppressed {
        Some(r) => Some(r),
        None => cooldown_reason(c, &playbook, &cand.cooldown_key, cand.cooldown_ms, now)?,
    };
    let suppressed = match (suppressed, &cand.plan) {
        (Some(r), _) => Some(r),
        (None, Ok(_)) => breaker_reason(c, &playbook, &target, limits, now)?,
        (None, Err(_)) => None,
    };
    let (state, reason, error, plan) = match (suppressed, &cand.plan) {
        (Some(reason), _) => (RunState::Suppressed, Some(reason), None, None),
        (None, Err(e)) => (RunState::Failed, None, Some(e.clone()), None),
        (None, Ok(plan)) => (RunState::Pending, None, None, Some(plan)),
    };
    c.prepare_cached(
        "INSERT INTO runs (playbook, alert_id, fingerprint, starts_at, alert_status, cooldown_key, state, reason,
           dry_run, params, created_at, finished_at, error, target, deadline_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
    )?
    .execute(params![
        playbook,
        alert_id,
        a.fingerprint,
        a.starts_at,
        a.status.as_str(),
        if cand.cooldown_ms > 0 { cand.cooldown_key.as_str() } else { "" },
        state.as_str(),
        reason,
        cand.dry_run,
        json.as_ref().filter(|_| plan.is_some()).map_or("{}", |j| j.params.as_str()),
        now,
        (state != RunState::Pending).then_some(now),
        error,
        target,
        cand.deadline_ms
    ])?;
    let run_id = c.last_insert_rowid();
    if let Some(plan) = plan {
        let mut stmt = c.prepare_cached(
            "INSERT INTO steps (run_id, idx, name, action, args, timeout_ms, on_failure, state, approval, phase)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', ?8, ?9)",
        )?;
        let step_json = json.map(|j| j.steps).unwrap_or_default();
        for (idx, (s, (args, approval))) in plan.steps.iter().zip(step_json).enumerate() {
            stmt.execute(params![
                run_id,
                idx as i64,
                s.name,
                s.action,
                args,
                s.timeout_ms.map(|t| t as i64),
                s.on_failure.as_str(),
                approval,
                s.phase
            ])?;
        }
    }
    Ok(match state {
        RunState::Suppressed => Outcome::Suppressed {
            run_id,
            playbook,
            reason: reason.unwrap_or_default(),
        },
        RunState::Failed => Outcome::Failed {
            run_id,
            playbook,
            error: error.unwrap_or_default(),
        },
        _ => Outcome::Created { run_id, playbook },
    })
}

pub(super) fn cooldown_reason(
    c: &Connection,
    playbook: &str,
    key: &str,
    cooldown_ms: i64,
    now: i64,
) -> rusqlite::Result<Option<String>> {
    if cooldown_ms <= 0 {
        return Ok(None);
    }
    let last: Option<(i64, i64)> = c
        .prepare_cached(
            "SELECT id, created_at FROM runs WHERE playbook = ?1 AND cooldown_key = ?2 AND cooldown_key != ''
               AND state != 'suppressed' AND created_at > ?3 ORDER BY id DESC LIMIT 1",
        )?
        .query_row(params![playbook, key, now - cooldown_ms], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    Ok(last.map(|(id, at)| {
        format!(
            "cooldown: run {id} for the same key started at {}",
            rfc3339(at)
        )
    }))
}

/// Checks the breaker's run and target limits for one more run; when one would be crossed,
/// engages the global kill switch (in this same transaction) and returns the reason.
fn breaker_reason(
    c: &Connection,
    playbook: &str,
    target: &str,
    l: BreakerLimits,
    now: i64,
) -> rusqlite::Result<Option<String>> {
    let since = now - l.window_ms;
    let window = humantime::format_duration(std::time::Duration::from_millis(l.window_ms as u64));
    let count = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> rusqlite::Result<u32> {
        c.prepare_cached(sql)?.query_row(p, |r| r.get(0))
    };
    let mut tripped = None;
    if l.max_runs > 0 {
        let n = count(
            "SELECT count(*) FROM runs WHERE created_at > ?1 AND state != 'suppressed'",
            &[&since],
        )?;
        if n >= l.max_runs {
            tripped = Some(format!(
                "circuit breaker: {n} runs started within {window} (breaker.max_runs = {})",
                l.max_runs
            ));
        }
    }
    if tripped.is_none() && l.max_runs_per_playbook > 0 {
        let n = count(
            "SELECT count(*) FROM runs WHERE created_at > ?1 AND state != 'suppressed' AND playbook = ?2",
            &[&since, &playbook],
        )?;
        if n >= l.max_runs_per_playbook {
            tripped = Some(format!(
                "circuit breaker: playbook {playbook} started {n} runs within {window} (breaker.max_runs_per_playbook = {})",
                l.max_runs_per_playbook
            ));
        }
    }
    if tripped.is_none() && l.max_targets > 0 {
        let known = count(
            "SELECT count(*) FROM runs WHERE created_at > ?1 AND state != 'suppressed' AND target = ?2",
            &[&since, &target],
        )?;
        let n = count(
            "SELECT count(DISTINCT target) FROM runs WHERE created_at > ?1 AND state != 'suppressed'",
            &[&since],
        )?;
        if known == 0 && n >= l.max_targets {
            tripped = Some(format!(
                "circuit breaker: runs against {n} distinct targets within {window} (breaker.max_targets = {})",
                l.max_targets
            ));
        }
    }
    if let Some(reason) = &tripped {
        super::switches::engage_in(c, "global", reason, "circuit-breaker", None, now)?;
    }
    Ok(tripped)
}

/// A resolved alert ends the runs of its alert that have not started or wait for approval,
/// and marks those executing so that they stop before their next step.
fn end_for_resolved(c: &Connection, fingerprint: &str, now: i64) -> rusqlite::Result<Vec<Outcome>> {
    let waiting: Vec<(i64, String, String)> = c
        .prepare_cached(
            "SELECT id, playbook, state FROM runs WHERE fingerprint = ?1 AND state = 'awaiting_approval'
             UNION ALL
             SELECT id, playbook, state FROM runs WHERE fingerprint = ?1 AND state = 'pending'",
        )?
        .query_map([fingerprint], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for (id, _, state) in &waiting {
        let why = if state == "pending" {
            "the alert resolved before the run started; nothing was done"
        } else {
            "the alert resolved before approval; nothing was done"
        };
        super::approvals::close_pending(c, *id, "cancelled", now)?;
        finish_run(c, *id, RunState::Resolved, Some(why), now)?;
    }
    c.prepare_cached(
        "UPDATE runs SET resolved_at = ?2 WHERE fingerprint = ?1 AND state = 'running' AND resolved_at IS NULL",
    )?
    .execute(params![fingerprint, now])?;
    Ok(waiting
        .into_iter()
        .map(|(run_id, playbook, _)| Outcome::Ended {
            run_id,
            playbook,
            state: RunState::Resolved,
        })
        .collect())
}

pub(super) fn finish_run(
    c: &Connection,
    run_id: i64,
    state: RunState,
    error: Option<&str>,
    now: i64,
) -> rusqlite::Result<()> {
    c.prepare_cached(
        "UPDATE runs SET state = ?2, finished_at = ?3, error = coalesce(?4, error) WHERE id = ?1",
    )?
    .execute(params![run_id, state.as_str(), now, error])?;
    c.prepare_cached("UPDATE steps SET state = 'skipped' WHERE run_id = ?1 AND state = 'pending'")?
        .execute([run_id])?;
    Ok(())
}

fn load_alert(c: &Connection, id: i64) -> Result<Alert, StoreError> {
    Ok(c.prepare_cached(
        "SELECT source, status, labels, annotations, starts_at, ends_at, fingerprint, generator_url, group_key
         FROM alerts WHERE id = ?1",
    )?
    .query_row([id], |r| {
        let source: String = r.get(0)?;
        let status: String = r.get(1)?;
        let labels: String = r.get(2)?;
        let annotations: String = r.get(3)?;
        Ok(Alert {
            source: if source == "alertmanager" { "alertmanager" } else { "generic" },
            status: if status == "resolved" { AlertStatus::Resolved } else { AlertStatus::Firing },
            labels: serde_json::from_str(&labels).unwrap_or_default(),
            annotations: serde_json::from_str(&annotations).unwrap_or_default(),
            starts_at: r.get(4)?,
            ends_at: r.get(5)?,
            fingerprint: r.get(6)?,
            generator_url: r.get(7)?,
            group_key: r.get(8)?,
        })
    })?)
}

fn load_steps(c: &Connection, run_id: i64) -> Result<Vec<StepRecord>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT idx, name, action, args, timeout_ms, on_failure, state, started_at, finished_at, output, error, approval, phase
         FROM steps WHERE run_id = ?1 ORDER BY idx",
    )?;
    let rows = stmt.query_map([run_id], |r| {
        Ok(StepRecord {
            idx: r.get(0)?,
            name: r.get(1)?,
            action: r.get(2)?,
            args: parse_json(r.get(3)?),
            timeout_ms: r.get(4)?,
            on_failure: r.get(5)?,
            state: r.get(6)?,
            started_at: r.get::<_, Option<i64>>(7)?.map(rfc3339),
            finished_at: r.get::<_, Option<i64>>(8)?.map(rfc3339),
            output: r.get::<_, Option<String>>(9)?.map(|s| parse_json(Some(s))),
            error: r.get(10)?,
            approval: r
                .get::<_, Option<String>>(11)?
                .and_then(|s| serde_json::from_str(&s).ok()),
            phase: r.get(12)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
