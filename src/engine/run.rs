//! Executes one claimed run, step by step. Every transition is written to the store before the
//! next action; cancellation and shutdown are honoured between steps, never inside one.

use super::Engine;
use crate::executors::{ExecError, StepContext};
use crate::store::{ClaimedRun, RunState, StepState};
use serde_json::json;
use std::time::Duration;
use tracing::Instrument;

/// How long past its timeout an executor may take to report before the engine gives up on it.
const EXECUTOR_GRACE: Duration = Duration::from_secs(15);

/// Why a run stopped early.
struct Stop {
    state: RunState,
    error: String,
}

impl Engine {
    pub(super) async fn execute(&self, run: ClaimedRun) {
        let span = tracing::info_span!("run", run_id = run.id, playbook = %run.playbook);
        let token = {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            running.entry(run.id).or_default().clone()
        };
        async {
            tracing::info!(steps = run.steps.len(), dry_run = run.dry_run, "run started");
            let (state, error) = match self.steps(&run, &token).await {
                Ok(()) => (RunState::Succeeded, None),
                Err(stop) => (stop.state, Some(stop.error)),
            };
            match self.store.run_finished(run.id, state, error.clone()).await {
                Ok(()) => tracing::info!(state = state.as_str(), error = error.as_deref(), "run finished"),
                Err(e) => tracing::error!(error = %e, state = state.as_str(), "cannot record the end of the run"),
            }
        }
        .instrument(span)
        .await;
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&run.id);
    }

    async fn steps(
        &self,
        run: &ClaimedRun,
        token: &tokio_util::sync::CancellationToken,
    ) -> Result<(), Stop> {
        let record_err = |e: crate::store::StoreError| Stop {
            state: RunState::Failed,
            error: format!("cannot record step state, stopped before acting: {e}"),
        };
        for step in run
            .steps
            .iter()
            .filter(|s| s.state == StepState::Pending.as_str())
        {
            if token.is_cancelled() {
                return Err(Stop {
                    state: RunState::Cancelled,
                    error: format!("cancelled by an operator before step {:?}", step.name),
                });
            }
            if self.shutdown.is_cancelled() {
                return Err(Stop {
                    state: RunState::Interrupted,
                    error: format!("the daemon shut down before step {:?}", step.name),
                });
            }
            let timeout = step
                .timeout_ms
                .map_or(self.config.default_step_timeout, |ms| {
                    Duration::from_millis(ms as u64)
                });
            let ctx = StepContext {
                timeout,
                run_id: run.id,
                playbook: run.playbook.clone(),
                step: step.name.clone(),
                args: step.args.clone(),
                alert: run.alert.clone(),
                params: run.params.clone(),
            };
            let Some(executor) = self.executors.get(&step.action) else {
                let error = format!("no executor for action {:?} is configured", step.action);
                self.store
                    .step_finished(
                        run.id,
                        step.idx,
                        StepState::Failed,
                        None,
                        Some(error.clone()),
                    )
                    .await
                    .map_err(record_err)?;
                return Err(Stop {
                    state: RunState::Failed,
                    error,
                });
            };
            self.store
                .step_started(run.id, step.idx)
                .await
                .map_err(record_err)?;
            let result = if run.dry_run {
                executor
                    .validate(&ctx)
                    .map(|()| json!({ "would_run": { "action": step.action, "args": step.args } }))
            } else {
                // Executors enforce the step timeout themselves (remote ones on the remote side,
                // to kill what they started); this outer bound is only the backstop.
                match tokio::time::timeout(ctx.timeout + EXECUTOR_GRACE, executor.execute(&ctx))
                    .await
                {
                    Ok(r) => r,
                    Err(_) => Err(ExecError::Failed(format!(
                        "timed out after {}; the executor did not stop by itself",
                        humantime::format_duration(ctx.timeout)
                    ))),
                }
            };
            let (state, output, error) = match result {
                Ok(out) if run.dry_run => (StepState::DryRun, Some(out), None),
                Ok(out) => (StepState::Succeeded, Some(out), None),
                Err(e) => (StepState::Failed, None, Some(e.to_string())),
            };
            tracing::info!(step = %step.name, action = %step.action, state = state.as_str(), error = error.as_deref(), "step finished");
            self.store
                .step_finished(run.id, step.idx, state, output, error.clone())
                .await
                .map_err(record_err)?;
            if let (Some(error), "stop") = (error, step.on_failure.as_str()) {
                return Err(Stop {
                    state: RunState::Failed,
                    error: format!("step {:?} failed: {error}", step.name),
                });
            }
        }
        Ok(())
    }
}
