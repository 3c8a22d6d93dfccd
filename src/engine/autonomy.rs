//! Autonomy a playbook earns (`autonomy:`; the rules are [`crate::policy::next_standing`]):
//! while it stands at `approve`, a run waits for an approval before its first step that
//! changes something; at `auto` it does not. Each run's end counts toward its standing, an
//! undo counts against it, and every change of level is audited and told in chat.

use super::run::{Stop, record_err};
use super::*;
use crate::playbook::Gate;
use crate::playbook::spec::{GateScope, Phase};
use crate::policy::{Level, Outcome, Standing};
use crate::store::{ClaimedRun, StepState};

impl Engine {
    /// The gate the playbook's standing puts before step `i`: a run-wide approval before the
    /// first main step that changes something, while the playbook stands at `approve` (and the
    /// step has no gate of its own). Never for an operator's undo.
    pub(super) async fn earned_gate(
        &self,
        run: &ClaimedRun,
        i: usize,
    ) -> Result<Option<Gate>, Stop> {
        let acting =
            |s: &crate::store::StepRecord| s.phase == Phase::Main && s.action.changes_something();
        let first_acting = run.steps.iter().position(acting);
        if first_acting != Some(i) || run.steps[i].approval.is_some() || run.undo_of.is_some() {
            return Ok(None);
        }
        let earns = (self.playbooks().get(&run.playbook)).is_some_and(|p| p.autonomy.is_some());
        if !earns {
            return Ok(None);
        }
        let standing = self
            .store
            .standing(&run.playbook)
            .await
            .map_err(record_err)?;
        Ok((standing.level == Level::Approve).then(|| Gate {
            scope: GateScope::Run,
            count: 1,
            expires_ms: crate::playbook::compile::DEFAULT_APPROVAL_EXPIRY.as_millis() as u64,
            approvers: Vec::new(),
        }))
    }

    /// Counts an ended run toward its playbook's standing (a shadow run does not count; an
    /// undo that succeeded counts against the playbook it undid).
    pub(super) async fn count_toward_autonomy(&self, run: &ClaimedRun, state: RunState) {
        if run.dry_run {
            return;
        }
        let Some(rules) = (self.playbooks().get(&run.playbook)).and_then(|p| p.autonomy) else {
            return;
        };
        let outcome = match run.undo_of {
            Some(_) if state == RunState::Succeeded => Outcome::Undone,
            Some(_) => return,
            None => match self.store.get_run(run.id).await {
                Ok(Some(view)) => {
                    let verifies: Vec<Option<bool>> = (view.steps.unwrap_or_default().iter())
                        .filter(|s| s.action == crate::playbook::actions::Action::Verify)
                        .map(|s| match s.state {
                            StepState::Succeeded => Some(true),
                            StepState::Failed => Some(false),
                            _ => None,
                        })
                        .collect();
                    crate::policy::run_outcome(state == RunState::Succeeded, &verifies)
                }
                _ => Outcome::Other,
            },
        };
        let change = (self.store)
            .record_outcome(&run.playbook, outcome, rules, run.id)
            .await;
        match change {
            Ok(Some(change)) => {
                tracing::info!(playbook = %run.playbook, level = change.to.level.as_str(), "autonomy changed");
                self.live().notifier.send(Event::Autonomy {
                    playbook: run.playbook.clone(),
                    level: change.to.level,
                    why: crate::policy::change_reason(change.to, run.id),
                });
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, playbook = %run.playbook, "cannot record the run's outcome toward autonomy")
            }
        }
    }

    /// An admin puts a playbook back behind approval with a fresh count: audited, told.
    pub async fn reset_autonomy(
        &self,
        playbook: &str,
        who: &str,
    ) -> Result<Standing, crate::store::StoreError> {
        let change = self.store.reset_standing(playbook, who).await?;
        self.live().notifier.send(Event::Autonomy {
            playbook: playbook.to_string(),
            level: Level::Approve,
            why: format!("reset by {who}"),
        });
        Ok(change.to)
    }
}
