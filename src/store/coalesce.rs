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

/// The queued, never-started run of playbook `playbook` for alert `fingerprint` (SQL
/// expressions: placeholders or columns) a new occurrence would join. A run put back in the
/// queue after an approval has started is not joined.
fn queued(fingerprint: &str, playbook: &str) -> String {
    format!(
        "SELECT id FROM runs WHERE fingerprint = {fingerprint} AND state = 'pending'
           AND playbook = {playbook} AND started_at IS NULL ORDER BY id LIMIT 1"
    )
}

/// [`queued`]'s read: `?1` the fingerprint, `?2` the playbook.
static QUEUED: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| queued("?1", "?2"));

/// PostgreSQL, an SQL expression: whether there is a run to join and, if so, whether the lock
/// a run of the playbook for the alert starts under ([`super::queue::try_lock_start`]) is now
/// this transaction's, tried, not waited for. It must be in a statement before [`QUEUED`]'s
/// (intake puts it in its read of the occurrence, `recorded_pg` in [`super::intake`]), so
/// that the read comes after the lock: a claim on another replica that started the run first
/// is seen, and none can start it after, while this intake gives it the newest alert's data.
/// A run being claimed is not joined (a new one is queued behind it).
pub(super) fn lock_queued(playbook: &str, fingerprint: &str) -> String {
    format!(
        "CASE WHEN EXISTS ({}) THEN pg_try_advisory_xact_lock({}) ELSE false END",
        queued(fingerprint, playbook),
        super::queue::start_key(playbook, fingerprint)
    )
}

/// Sends [`pending_run`]'s read ahead (see [`Db::prefetch`]), after the lock's.
pub(super) fn prefetch(c: &Db, playbook: &str, fingerprint: &str) -> Result<(), StoreError> {
    let depends = super::intake::part::occurrence(playbook, fingerprint);
    c.prefetch_on(&QUEUED, &[&fingerprint, &playbook], depends)
}

/// The queued, never-started run a new occurrence would join, if there is one and it
/// `may_join` (on PostgreSQL, [`lock_queued`]'s answer: no other replica is claiming it).
pub(super) fn pending_run(
    c: &Db,
    playbook: &str,
    fingerprint: &str,
    may_join: bool,
) -> Result<Option<i64>, StoreError> {
    if !may_join {
        return Ok(None);
    }
    c.row(&QUEUED, &[&fingerprint, &playbook], |r| r.get(0))
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
