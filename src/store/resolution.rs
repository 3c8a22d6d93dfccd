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
    let mut ended = Vec::with_capacity(waiting.len());
    for (id, playbook, state) in waiting {
        let now_ended = match c.is_pg() {
            true => end_waiting_pg(c, id, now)?,
            false => {
                super::approvals::close_pending(c, id, ApprovalState::Cancelled, now)?;
                finish_run(c, id, RunState::Resolved, Some(why(state)), now)?;
                true
            }
        };
        if now_ended {
            ended.push(Outcome::Ended {
                run_id: id,
                playbook,
                state: RunState::Resolved,
            });
        }
    }
    for (id, _, _) in &running {
        c.exec(
            "UPDATE runs SET resolved_at = ?2 WHERE id = ?1",
            &[id, &now],
        )?;
    }
    Ok(ended)
}

/// Why a run that waited was ended by its alert's resolution.
fn why(state: RunState) -> &'static str {
    match state {
        RunState::AwaitingApproval => "the alert resolved before approval; nothing was done",
        _ => "the alert resolved before the run started; nothing was done",
    }
}

/// On PostgreSQL, ends a run read as waiting (pending, or awaiting approval) as [`finish_run`]
/// would, with its approval cancelled; true when it ended. Another replica may have claimed
/// it since it was read: a run executing now is marked instead, to stop before its next step
/// (its claim is not overwritten, nor its step started under it recorded as never done).
/// Decided on the row as it is when the update takes it (after a claim holding it commits).
/// Intake holds the locks a run of the alert's playbooks starts under (`intake_locks`), so a
/// claim of one is not under way meanwhile; this holds for the runs of any other playbook.
///
/// The approval first, then the run, in the order a decision on it takes them: a pending
/// request means a run that waits for it, which no claim can take before it is decided.
fn end_waiting_pg(c: &Db, run_id: i64, now: i64) -> Result<bool, StoreError> {
    const END_WAITING: &str = "WITH ended AS (
               UPDATE runs SET
                 state = CASE WHEN state = 'running' THEN state ELSE 'resolved' END,
                 finished_at = CASE WHEN state = 'running' THEN finished_at ELSE ?2 END,
                 error = CASE WHEN state = 'running' THEN error
                              WHEN state = 'awaiting_approval' THEN ?3 ELSE ?4 END,
                 resolved_at = CASE WHEN state = 'running' THEN ?2 ELSE resolved_at END
               WHERE id = ?1 AND (state = 'pending' OR state = 'running' OR state = 'awaiting_approval')
               RETURNING id, state = 'resolved' AS ended),
             skip AS (UPDATE steps SET state = 'skipped'
                      WHERE run_id IN (SELECT id FROM ended WHERE ended) AND state = 'pending')
             SELECT coalesce(bool_or(ended), false) FROM ended";
    super::approvals::close_pending(c, run_id, ApprovalState::Cancelled, now)?;
    let ended = c.one(
        END_WAITING,
        &[
            &run_id,
            &now,
            &why(RunState::AwaitingApproval),
            &why(RunState::Pending),
        ],
        |r| r.get(0),
    )?;
    if ended {
        c.wake();
    }
    Ok(ended)
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
