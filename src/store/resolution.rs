//! Resolution: a resolved alert ends its runs that have not started or wait for approval, and
//! marks those executing so that they stop before their next step. Only runs of the
//! occurrence that resolved, or of earlier ones, are touched: a late (re-delivered)
//! resolution of an earlier occurrence leaves a newer occurrence's runs alone.

use super::lifecycle::finish_run;
use super::*;

/// Whether a run of the occurrence that started at `run_starts` belongs to the resolution of
/// the occurrence that started at `resolved_starts`: the same occurrence or an earlier one.
/// Times are compared to the millisecond, offsets applied; times that do not parse are taken
/// to match.
fn covered(run_starts: &str, resolved_starts: &str) -> bool {
    use crate::time::Timestamp;
    match (
        Timestamp::parse(run_starts),
        Timestamp::parse(resolved_starts),
    ) {
        (Ok(run), Ok(resolved)) => run <= resolved,
        _ => true,
    }
}

/// A resolved alert ends the runs of its occurrence (or earlier ones) that have not started or
/// wait for approval, and marks those executing so that they stop before their next step.
pub(super) fn end_for_resolved(
    c: &Db,
    fingerprint: &str,
    resolved_starts: &str,
    now: i64,
) -> Result<Vec<Outcome>, StoreError> {
    let live: Vec<(i64, String, RunState, String)> = c.rows(
            // The occurrence a run acts for is its alert's (a coalesced run takes the newest).
            "SELECT r.id, r.playbook, r.state, a.starts_at FROM runs r JOIN alerts a ON a.id = r.alert_id
               WHERE r.fingerprint = ?1 AND r.state = 'awaiting_approval'
             UNION ALL
             SELECT r.id, r.playbook, r.state, a.starts_at FROM runs r JOIN alerts a ON a.id = r.alert_id
               WHERE r.fingerprint = ?1 AND r.state = 'pending'
             UNION ALL
             SELECT r.id, r.playbook, r.state, a.starts_at FROM runs r JOIN alerts a ON a.id = r.alert_id
               WHERE r.fingerprint = ?1 AND r.state = 'running' AND r.resolved_at IS NULL",
        &[&fingerprint],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )?;
    let (running, waiting): (Vec<_>, Vec<_>) = (live.into_iter())
        .filter(|(_, _, _, starts)| covered(starts, resolved_starts))
        .map(|(id, playbook, state, _)| (id, playbook, state))
        .partition(|(_, _, state)| *state == RunState::Running);
    for (id, _, state) in &waiting {
        let why = if *state == RunState::Pending {
            "the alert resolved before the run started; nothing was done"
        } else {
            "the alert resolved before approval; nothing was done"
        };
        super::approvals::close_pending(c, *id, ApprovalState::Cancelled, now)?;
        finish_run(c, *id, RunState::Resolved, Some(why), now)?;
    }
    for (id, _, _) in &running {
        c.exec(
            "UPDATE runs SET resolved_at = ?2 WHERE id = ?1",
            &[id, &now],
        )?;
    }
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
            Ok(c.row(
                "SELECT resolved_at IS NOT NULL FROM runs WHERE id = ?1",
                &[&run_id],
                |r| r.get(0),
            )?
            .unwrap_or(false))
        })
        .await
    }
}
