//! How runs end: the final state and error, and the steps that never ran marked skipped.

use super::*;

pub(super) fn finish_run(
    c: &Db,
    run_id: i64,
    state: RunState,
    error: Option<&str>,
    now: i64,
) -> Result<(), StoreError> {
    end_run(c, run_id, state, error, now, None, None)
}

/// The end of a run: its state, unless it is final already (a replica that lost its lease,
/// say, cannot end a run another one already marked interrupted), and, with `owner` given
/// (`param`), only while it is that replica's (one that lost a run it had claimed, since
/// claimed again by another, cannot end it under that one). (Three values after `IN` would
/// cost SQLite a temporary table on every end.)
fn end_sql(param: &str) -> String {
    format!(
        "UPDATE runs SET state = ?2, finished_at = ?3, error = coalesce(?4, error)
         WHERE id = ?1 AND (state = 'pending' OR state = 'running' OR state = 'awaiting_approval')
           AND (owner = {param} OR {param} IS NULL)"
    )
}

/// Ends a run as [`finish_run`] does, after writing its last step's result when given (see
/// [`super::queue::record_step`]); with `owner`, only a run that replica holds.
fn end_run(
    c: &Db,
    run_id: i64,
    state: RunState,
    error: Option<&str>,
    now: i64,
    last_step: Option<&super::queue::StepResult>,
    owner: Option<&str>,
) -> Result<(), StoreError> {
    // An end frees room on the target, and the steps not started are skipped.
    const SKIP: &str = "UPDATE steps SET state = 'skipped' WHERE run_id = ?1 AND state = 'pending'";
    if !c.is_pg() {
        // One writer: nothing else holds the run, and the skip follows the end.
        static END: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| end_sql("?5"));
        if let Some(step) = last_step {
            super::queue::record_step(c, step, now)?;
        }
        c.later(&END, &[&run_id, &state.as_str(), &now, &error, &owner])?;
        c.later(SKIP, &[&run_id])?;
        c.wake();
        return Ok(());
    }
    // On PostgreSQL one statement: the step's result (as `record_step` writes it) and the
    // run's end as data-modifying CTEs, and the skip of the steps of the run it ended.
    fn ending(step: &str, owner: &str) -> String {
        format!(
            "WITH {step} ended AS ({} RETURNING id)
             UPDATE steps SET state = 'skipped'
             WHERE run_id IN (SELECT id FROM ended) AND state = 'pending'",
            end_sql(owner)
        )
    }
    static BOTH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| ending("", "?5"));
    static ALL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        ending(
            "step AS (UPDATE steps SET state = ?6, finished_at = ?3, output = ?7, error = ?8
                      WHERE run_id = ?9 AND idx = ?5),",
            "?10",
        )
    });
    match last_step {
        None => c.later(&BOTH, &[&run_id, &state.as_str(), &now, &error, &owner])?,
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
                    &owner,
                ],
            )?;
            super::queue::audit_step(c, step)?;
        }
    }
    c.wake_if_queued();
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
        (self.run_finished_telling(run_id, state, error, last_step, limits, refused, None)).await
    }

    /// As [`Store::run_finished`], keeping the run's end `message` in the same write until
    /// chat has it (see [`super::outbox`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn run_finished_telling(
        &self,
        run_id: i64,
        state: RunState,
        error: Option<String>,
        last_step: Option<StepResult>,
        limits: BreakerLimits,
        refused: bool,
        message: Option<EndMessage>,
    ) -> Result<Option<Trip>, StoreError> {
        let now = self.now_ms();
        let owner = self.inner.replica.clone();
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
                let owner = Some(owner.as_str());
                end_run(
                    c,
                    run_id,
                    state,
                    error.as_deref(),
                    now,
                    last_step.as_ref(),
                    owner,
                )?;
                if let (Some(message), Some(owner)) = (&message, owner) {
                    super::outbox::keep_end(c, run_id, owner, now, message)?;
                }
                if state != RunState::Failed {
                    return Ok(None);
                }
                if refused {
                    c.exec(
                        "UPDATE runs SET refused = ?2 WHERE id = ?1 AND state = 'failed'",
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
