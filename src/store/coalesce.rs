//! Coalescing: while a run of a playbook for an alert (same playbook and fingerprint) is
//! queued and has not started, a new occurrence of the alert joins it instead of queuing a
//! second run. The pending run takes the newest alert, parameters, target and steps; the new
//! occurrence is recorded as `coalesced` (so its re-deliveries are deduplicated like any
//! other). Dedup decides first (the same occurrence again), then coalescing (a new one while a
//! run waits), then the holds (maintenance, kill switch, cooldown, breaker). A playbook opts
//! out with `coalesce: false`.

use super::intake::insert_steps;
use super::{Db, StoreError};
use crate::playbook::Plan;

/// A run put back in the queue after an approval has started: it is not joined.
const QUEUED: &str =
    "SELECT id FROM runs WHERE fingerprint = ?1 AND state = 'pending' AND playbook = ?2
           AND started_at IS NULL ORDER BY id LIMIT 1";

/// Sends [`pending_run`]'s read ahead (see [`Db::prefetch`]).
pub(super) fn prefetch(c: &Db, playbook: &str, fingerprint: &str) -> Result<(), StoreError> {
    let depends = super::intake::part::occurrence(playbook, fingerprint);
    c.prefetch_on(QUEUED, &[&fingerprint, &playbook], depends)
}

/// The queued, never-started run a new occurrence would join, if there is one.
pub(super) fn pending_run(
    c: &Db,
    playbook: &str,
    fingerprint: &str,
) -> Result<Option<i64>, StoreError> {
    c.row(QUEUED, &[&fingerprint, &playbook], |r| r.get(0))
}

/// Gives the pending run the newest alert's data: its alert, parameters, target and steps.
pub(super) fn refresh(
    c: &Db,
    run_id: i64,
    alert_id: i64,
    plan: &Plan,
    params_json: &str,
    steps_json: &[(String, Option<String>)],
) -> Result<(), StoreError> {
    c.later(
        "UPDATE runs SET alert_id = ?2, params = ?3, target = ?4 WHERE id = ?1",
        &[&run_id, &alert_id, &params_json, &plan.target],
    )?;
    c.later("DELETE FROM steps WHERE run_id = ?1", &[&run_id])?;
    insert_steps(c, run_id, plan, steps_json, None)
}
