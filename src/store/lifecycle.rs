//! How runs end: the final state and error, and the steps that never ran marked skipped.

use super::*;

pub(super) fn finish_run(
    c: &Db,
    run_id: i64,
    state: RunState,
    error: Option<&str>,
    now: i64,
) -> Result<(), StoreError> {
    end_run(c, run_id, state, error, now, None)
}

/// Ends a run as [`finish_run`] does, after writing its last step's result when given (see
/// [`super::queue::record_step`]).
fn end_run(
    c: &Db,
    run_id: i64,
    state: RunState,
    error: Option<&str>,
    now: i64,
    last_step: Option<&super::queue::StepResult>,
) -> Result<(), StoreError> {
    // A final state is never overwritten (a replica that lost its lease, say, cannot end a
    // run another one already marked interrupted). An end frees room on the target, and the
    // steps not started are skipped. (Three values after `IN` would cost SQLite a temporary
    // table on every end.)
    const END: &str = "UPDATE runs SET state = ?2, finished_at = ?3, error = coalesce(?4, error)
         WHERE id = ?1 AND (state = 'pending' OR state = 'running' OR state = 'awaiting_approval')";
    const SKIP: &str = "UPDATE steps SET state = 'skipped' WHERE run_id = ?1 AND state = 'pending'";
    if !c.is_pg() {
        if let Some(step) = last_step {
            super::queue::record_step(c, step, now)?;
        }
        c.later(END, &[&run_id, &state.as_str(), &now, &error])?;
        c.later(SKIP, &[&run_id])?;
        c.wake();
        return Ok(());
    }
    // On PostgreSQL one statement: the step's result (as `record_step` writes it) and the
    // skip as data-modifying CTEs of the run's update (each on other rows).
    static BOTH: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| format!("WITH skip AS ({SKIP}) {END}"));
    static ALL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "WITH step AS (UPDATE steps SET state = ?6, finished_at = ?3, output = ?7, error = ?8
                           WHERE run_id = ?9 AND idx = ?5),
                  skip AS ({SKIP}) {END}"
        )
    });
    match last_step {
        None => c.later(&BOTH, &[&run_id, &state.as_str(), &now, &error])?,
        Some(step) => {
            let output = step.output.as_ref().map(crate::store::json_text);
            c.later(
                &ALL,
                &[
                    &run_id,
                    &state.as_str(),
                    &now,
                    &error,
                    &step.step.idx,
                    &step.state.as_str(),
                    &output,
                    &step.error,
                    &step.step.run_id,
                ],
            )?;
            super::queue::audit_step(c, step)?;
        }
    }
    c.wake();
    Ok(())
}

impl Store {
    /// Ends a run that is never executed as if it had acted at once (`reflex replay`): started
    /// and succeeded now, so cooldowns and the breaker count it as they count a real one.
    pub async fn end_at_once(&self, run_id: i64) -> Result<(), StoreError> {
        let now = self.now_ms();
        self.write(move |c| {
            c.exec(
                "UPDATE runs SET started_at = coalesce(started_at, ?2) WHERE id = ?1",
                &[&run_id, &now],
            )?;
            finish_run(c, run_id, RunState::Succeeded, None, now)
        })
        .await
    }

    /// Ends a run, in one write: the last step's result and its audit row when given, the
    /// run's state (steps not started are marked `skipped`) and, for a failed run, the
    /// breaker's failure limit, which may engage the global kill switch (returned).
    /// `refused`: it failed because a step was refused before acting (nothing was sent), which
    /// the breaker counts against its playbook alone.
    pub async fn run_finished(
        &self,
        run_id: i64,
        state: RunState,
        error: Option<String>,
        last_step: Option<StepResult>,
        limits: BreakerLimits,
        refused: bool,
    ) -> Result<Option<Trip>, StoreError> {
        let now = self.now_ms();
        // A failure is counted against the limit under a lock every replica's failures take,
        // so that two failing at once are counted one after the other (exactly at the limit).
        let locks = match (state, refused) {
            (RunState::Failed, _) if limits.max_failures == 0 => Vec::new(),
            (RunState::Failed, false) => vec![String::from("reflex.failures")],
            (RunState::Failed, true) => vec![String::from("reflex.refusals")],
            _ => Vec::new(),
        };
        let tripped = self
            .write_locked(locks, move |c| {
                end_run(c, run_id, state, error.as_deref(), now, last_step.as_ref())?;
                if state != RunState::Failed {
                    return Ok(None);
                }
                if refused {
                    c.exec(
                        "UPDATE runs SET refused = ?2 WHERE id = ?1",
                        &[&run_id, &true],
                    )?;
                    return super::breaker::refusals_trip(c, run_id, limits, now);
                }
                super::breaker::failures_trip(c, limits, now)
            })
            .await?;
        if tripped.is_some() {
            self.switches_changed();
        }
        Ok(tripped)
    }
}
