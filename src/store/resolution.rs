//! Resolution: a resolved alert ends its runs that have not started or wait for approval, and
//! marks those executing so that they stop before their next step.

use super::lifecycle::finish_run;
use super::*;
use rusqlite::{Connection, OptionalExtension, params};

/// A resolved alert ends the runs of its alert that have not started or wait for approval,
/// and marks those executing so that they stop before their next step.
pub(super) fn end_for_resolved(
    c: &Connection,
    fingerprint: &str,
    now: i64,
) -> rusqlite::Result<Vec<Outcome>> {
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
        super::approvals::close_pending(c, *id, ApprovalState::Cancelled, now)?;
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

impl Store {
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
}
