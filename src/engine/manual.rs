//! Runs an operator asks for: a playbook triggered without an alert, and the retry of a run
//! that did not succeed. Both go through intake like an alert's run (the kill switch, the
//! maintenance windows, the breaker and the approval gates apply), record who asked, and are
//! rendered against the playbook in force.

use super::Engine;
use crate::alert::{Alert, AlertStatus, Labels};
use crate::playbook::Playbook;
use crate::playbook::spec::Phase;
use crate::store::{Candidate, IntakeItem, Manual, Outcome, RunState, StepState, StoreError};
use std::sync::Arc;

/// Why an operator's run was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum ManualError {
    /// No playbook of that name is in force.
    #[error("no playbook named {0:?} is loaded")]
    NoPlaybook(String),
    /// No run of that id.
    #[error("no run {0}")]
    NoRun(i64),
    /// The run cannot be retried in its state.
    #[error(
        "run {id} is {state}; only failed, interrupted, expired and killed runs can be retried"
    )]
    NotRetryable {
        /// The run.
        id: i64,
        /// Its state.
        state: RunState,
    },
    /// The run is still live: it can be undone once it ended.
    #[error("run {id} is {state}; cancel it, or wait for it to end, before undoing it")]
    StillLive {
        /// The run.
        id: i64,
        /// Its state.
        state: RunState,
    },
    /// Nothing the run did can be taken back.
    #[error("run {id} changed nothing that can be undone{}", skipped_text(.skipped))]
    NothingToUndo {
        /// The run.
        id: i64,
        /// Its steps left alone, with why.
        skipped: Vec<super::undo::Skipped>,
    },
    /// The step to resume from is not in the playbook in force.
    #[error(
        "step {0:?} is no longer in the playbook; retry from the start (`--from-start`, or \
         `\"from_start\": true`)"
    )]
    StepGone(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn skipped_text(skipped: &[super::undo::Skipped]) -> String {
    let parts: Vec<String> = (skipped.iter())
        .map(|s| format!("{} ({}): {}", s.step, s.action, s.why))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(": {}", parts.join("; "))
    }
}

/// A retry: which run, and from where.
pub struct Retry {
    /// The run to repeat.
    pub run_id: i64,
    /// From the first step, rather than from the step that did not succeed.
    pub from_start: bool,
}

/// The states a run can be retried from.
pub(crate) const RETRYABLE: [RunState; 4] = [
    RunState::Failed,
    RunState::Interrupted,
    RunState::Expired,
    RunState::Killed,
];

impl Engine {
    /// Runs playbook `name` for labels and annotations an operator gave, without an alert.
    /// Its matchers and `when` are not consulted (the operator chose it); its templates are.
    pub async fn trigger(
        self: &Arc<Self>,
        name: &str,
        labels: Labels,
        annotations: Labels,
        who: &str,
    ) -> Result<Outcome, ManualError> {
        let set = self.playbooks();
        let pb = set
            .get(name)
            .ok_or_else(|| ManualError::NoPlaybook(name.to_string()))?
            .clone();
        let fingerprint = crate::alert::fingerprint(&labels);
        let alert = self.manual_alert(labels, annotations, fingerprint);
        let manual = Manual {
            by: who.to_string(),
            retry_of: None,
            undo_of: None,
        };
        let outcome = self.record_manual(pb, alert, manual, None).await?;
        self.store
            .audit(
                who,
                "run.trigger",
                Some(format!("playbook/{name}")),
                "ok",
                None,
            )
            .await?;
        Ok(outcome)
    }

    /// Makes a new run from a run that failed, was interrupted, expired or was killed: from the
    /// step that did not succeed (or from the start), rendered again against the playbook in
    /// force for the same alert data, and gated again.
    pub async fn retry(self: &Arc<Self>, r: Retry, who: &str) -> Result<Outcome, ManualError> {
        let run = (self.store.get_run(r.run_id).await?).ok_or(ManualError::NoRun(r.run_id))?;
        if !RETRYABLE.contains(&run.state) {
            return Err(ManualError::NotRetryable {
                id: run.id,
                state: run.state,
            });
        }
        let set = self.playbooks();
        let pb = set
            .get(&run.playbook)
            .ok_or_else(|| ManualError::NoPlaybook(run.playbook.clone()))?
            .clone();
        // The first main step that did not succeed, by name.
        let resume = (!r.from_start)
            .then(|| {
                run.steps.iter().flatten().find(|s| {
                    s.phase == Phase::Main
                        && !matches!(s.state, StepState::Succeeded | StepState::Shadow)
                })
            })
            .flatten()
            .map(|s| s.name.clone());
        let alert = self.manual_alert(
            run.alert.labels.clone(),
            run.alert.annotations.clone(),
            run.alert.fingerprint.clone(),
        );
        let manual = Manual {
            by: who.to_string(),
            retry_of: Some(run.id),
            undo_of: None,
        };
        let outcome = self.record_manual(pb, alert, manual, resume).await?;
        let detail = if r.from_start {
            "from the start"
        } else {
            "from the step that did not succeed"
        };
        self.store
            .audit(
                who,
                "run.retry",
                Some(format!("run/{}", run.id)),
                "ok",
                Some(detail.to_string()),
            )
            .await?;
        Ok(outcome)
    }

    /// Makes a new run that takes back what run `run_id` changed (see [`super::undo`]): its
    /// restoring steps, last change first, through intake like any run (the kill switch, the
    /// breaker and the gates apply). With `force`, fields changed since are overwritten.
    pub async fn undo(
        self: &Arc<Self>,
        run_id: i64,
        force: bool,
        who: &str,
    ) -> Result<(Outcome, super::undo::UndoPlan), ManualError> {
        let run = (self.store.get_run(run_id).await?).ok_or(ManualError::NoRun(run_id))?;
        if run.state.is_live() {
            return Err(ManualError::StillLive {
                id: run.id,
                state: run.state,
            });
        }
        let (outcome, undo) = self.record_undo(&run, force, who).await?;
        let detail = format!(
            "{} step(s) to take back, {} left alone{}",
            undo.steps.len(),
            undo.skipped.len(),
            if force { ", forced" } else { "" }
        );
        let target = Some(format!("run/{}", run.id));
        (self.store)
            .audit(who, "run.undo", target, "ok", Some(detail))
            .await?;
        Ok((outcome, undo))
    }

    /// A run's verification failed and its playbook says `on_verify_failure: undo`: records
    /// the undo of what it changed (it starts once this run has ended, after the escalation)
    /// and says so, for the run's error and so its message.
    pub(super) async fn undo_after_verification(self: &Arc<Self>, run_id: i64) -> String {
        let run = match self.store.get_run(run_id).await {
            Ok(Some(run)) => run,
            Ok(None) => return String::new(),
            Err(e) => return format!(" Its changes could not be undone: {e}."),
        };
        match self.record_undo(&run, false, "reflex").await {
            Ok((outcome, undo)) => {
                let names: Vec<&str> = undo.steps.iter().map(|s| s.name.as_str()).collect();
                let detail = format!("verification failed: {}", names.join(", "));
                let target = Some(format!("run/{run_id}"));
                let _ = (self.store)
                    .audit("reflex", "run.undo", target, "ok", Some(detail))
                    .await;
                format!(
                    " Its changes are undone by run {} ({}).",
                    outcome.run_id(),
                    names.join(", ")
                )
            }
            Err(ManualError::NothingToUndo { .. }) => " Nothing it changed can be undone.".into(),
            Err(e) => format!(" Its changes could not be undone: {e}."),
        }
    }

    /// Plans the undo of `run` and records it (see [`Engine::undo`]).
    async fn record_undo(
        self: &Arc<Self>,
        run: &crate::store::RunView,
        force: bool,
        who: &str,
    ) -> Result<(Outcome, super::undo::UndoPlan), ManualError> {
        let undo = super::undo::plan(run.steps.as_deref().unwrap_or_default(), force);
        if undo.steps.is_empty() || run.dry_run {
            return Err(ManualError::NothingToUndo {
                id: run.id,
                skipped: undo.skipped,
            });
        }
        let set = self.playbooks();
        let pb = set
            .get(&run.playbook)
            .ok_or_else(|| ManualError::NoPlaybook(run.playbook.clone()))?
            .clone();
        let alert = self.manual_alert(
            run.alert.labels.clone(),
            run.alert.annotations.clone(),
            run.alert.fingerprint.clone(),
        );
        let plan = crate::playbook::Plan {
            target: run.target.clone(),
            concurrency: pb.concurrency,
            params: run.params.as_object().cloned().unwrap_or_default(),
            steps: undo.steps.clone(),
            // An operator's undo is not gated by what the playbook has earned.
            autonomy: false,
        };
        let manual = Manual {
            by: who.to_string(),
            retry_of: None,
            undo_of: Some(run.id),
        };
        let outcome = self.record_planned(&pb, alert, manual, Ok(plan)).await?;
        Ok((outcome, undo))
    }

    /// An alert standing for an operator's request: the labels given, received now (so that
    /// dedup never takes it for an earlier one).
    fn manual_alert(&self, labels: Labels, annotations: Labels, fingerprint: String) -> Alert {
        Alert {
            source: "manual",
            status: AlertStatus::Firing,
            labels,
            annotations,
            // To the microsecond: two requests are two occurrences, never a re-delivery.
            starts_at: humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            ends_at: None,
            fingerprint,
            generator_url: None,
            group_key: None,
        }
    }

    /// Plans `pb` for `alert` (from step `resume` on, when given) and records it through
    /// intake, without cooldown or coalescing.
    async fn record_manual(
        self: &Arc<Self>,
        pb: Arc<Playbook>,
        alert: Alert,
        manual: Manual,
        resume: Option<String>,
    ) -> Result<Outcome, ManualError> {
        let set = self.playbooks();
        let budget = self.config.plan_budget;
        let (alert, pb, plan) = tokio::task::spawn_blocking(move || {
            let _budget = crate::playbook::script::Budget::start(budget);
            let mut scope = crate::playbook::script::alert_scope(&alert);
            let plan = pb.plan(&set.sandbox, &mut scope);
            (alert, pb, plan)
        })
        .await
        .map_err(|e| StoreError::Join(e.to_string()))?;
        let plan = match (plan, resume) {
            (Ok(mut plan), Some(step)) => {
                let k = (plan.steps.iter())
                    .position(|s| s.phase == Phase::Main && s.name == step)
                    .ok_or(ManualError::StepGone(step))?;
                // A gate over the whole run stays in front of what runs.
                let run_gate = (plan.steps[..k].iter())
                    .filter_map(|s| s.approval.clone())
                    .find(|g| g.scope == crate::playbook::spec::GateScope::Run);
                plan.steps.drain(..k);
                if plan.steps[0].approval.is_none() {
                    plan.steps[0].approval = run_gate;
                }
                Ok(plan)
            }
            (plan, _) => plan,
        };
        self.record_planned(&pb, alert, manual, plan).await
    }

    /// Records an operator's run of `pb` with this plan through intake, without cooldown or
    /// coalescing.
    async fn record_planned(
        self: &Arc<Self>,
        pb: &Playbook,
        alert: Alert,
        manual: Manual,
        plan: Result<crate::playbook::Plan, crate::playbook::error::PlanError>,
    ) -> Result<Outcome, ManualError> {
        let now = self.store.now_ms();
        let candidate = Candidate {
            cooldown_ms: 0,
            coalesce: false,
            manual: Some(manual),
            ..self.candidate(pb, &alert, plan, self.live().windows.hold(&alert, now))
        };
        let item = IntakeItem {
            deferred: None,
            received_us: crate::time::now_us(),
            candidates: vec![candidate],
            alert,
        };
        let mut outcomes = tokio::spawn(self.clone().record(vec![item]))
            .await
            .map_err(|e| StoreError::Join(e.to_string()))??;
        Ok(outcomes.remove(0).remove(0))
    }
}
