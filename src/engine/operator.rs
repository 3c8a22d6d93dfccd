//! What operators ask of the engine: kill switches, cancels, reloads and approval decisions,
//! each audited.

use super::*;
use crate::store::SwitchChange;

/// The result of a cancel request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelResult {
    /// No such run.
    NotFound,
    /// It had not started; it is now `cancelled`.
    Cancelled,
    /// It is running; it stops before its next step.
    Requested,
    /// It had already ended in this state.
    AlreadyFinished(RunState),
}

impl Engine {
    /// An operator engages or releases a kill switch (`scope` global or a playbook's): recorded
    /// (with its audit row, in one transaction), logged and told in chat.
    /// An engagement of a switch engaged already changes nothing unless `replace`: the
    /// answer is then `Some` of who holds it and why.
    pub async fn set_switch(&self, change: SwitchChange) -> Result<Option<String>, StoreError> {
        let held = self.store.change_switch(change.clone()).await?;
        let SwitchChange {
            scope,
            engaged,
            reason,
            actor,
            until,
            ..
        } = change;
        if held.is_some() {
            return Ok(held);
        }
        if engaged {
            tracing::warn!(%scope, %actor, %reason, "kill switch engaged");
        } else {
            tracing::warn!(%scope, %actor, "kill switch released");
        }
        self.live().notifier.send(Event::KillSwitch {
            scope,
            engaged,
            actor,
            reason,
            until: until
                .filter(|_| engaged)
                .map(crate::time::Timestamp::from_ms),
        });
        Ok(None)
    }

    /// An operator cancels a run: at once if it has not started, before its next step if it
    /// is running; the request is audited whatever its result.
    pub async fn cancel_by(&self, run_id: i64, who: &str) -> Result<CancelResult, StoreError> {
        let result = self.cancel(run_id).await?;
        let outcome = match result {
            CancelResult::NotFound => return Ok(result),
            CancelResult::Cancelled | CancelResult::Requested => "ok",
            CancelResult::AlreadyFinished(_) => "refused",
        };
        self.store
            .audit(
                who,
                "run.cancel",
                Some(format!("run/{run_id}")),
                outcome,
                None,
            )
            .await?;
        Ok(result)
    }

    /// A run as it stands now: a running run whose cancel was asked on this replica shows as
    /// `cancelling` until its step under way has stopped, and a verification window under way
    /// says how long it has left.
    pub fn show_live(&self, run: &mut crate::store::RunView) {
        run.note_time_left(crate::time::Timestamp::from_ms(self.store.now_ms()));
        if run.state == RunState::Running {
            let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            if running.get(&run.id).is_some_and(|d| d.token.is_cancelled()) {
                run.state = RunState::Cancelling;
            }
        }
    }

    /// Cancels a run: at once if it has not started; a running one stops its step under way.
    pub async fn cancel(&self, run_id: i64) -> Result<CancelResult, StoreError> {
        Ok(match self.store.cancel_if_pending(run_id).await? {
            None => CancelResult::NotFound,
            Some(RunState::Pending | RunState::AwaitingApproval) => {
                self.announce_end(run_id, RunState::Cancelled).await;
                CancelResult::Cancelled
            }
            Some(RunState::Running) => {
                // The run may be claimed but not yet registered: leave a cancelled token
                // that the worker picks up when it registers.
                let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
                running.entry(run_id).or_default().token.cancel();
                CancelResult::Requested
            }
            Some(state) => CancelResult::AlreadyFinished(state),
        })
    }

    /// An approver's decision; an approval that completes its count puts the run back in the
    /// queue.
    pub async fn decide(
        &self,
        approval_id: i64,
        who: String,
        approve: bool,
        comment: Option<String>,
    ) -> Result<Decision, StoreError> {
        let decision = self
            .store
            .decide(approval_id, who, approve, comment)
            .await?;
        match decision {
            Decision::Approved => self.wake.notify_one(),
            Decision::Denied | Decision::Expired => {
                if let Some(a) = self.store.get_approval(approval_id).await? {
                    let state = if decision == Decision::Denied {
                        RunState::Denied
                    } else {
                        RunState::Expired
                    };
                    self.announce_end(a.run_id, state).await;
                }
            }
            _ => {}
        }
        Ok(decision)
    }
}
