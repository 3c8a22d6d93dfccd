//! The cooldown: no second run of a playbook for the same key (alert fingerprint or group)
//! within its cooldown; suppressed runs do not count.

use super::{Db, StoreError};
use crate::time::rfc3339;

/// The latest run that holds the cooldown (in the index's order: by id, SQLite would sort on
/// every alert).
const LAST: &str = "SELECT id, created_at FROM runs WHERE playbook = ?1 AND cooldown_key = ?2 AND cooldown_key != ''
           AND state != 'suppressed' AND created_at > ?3 ORDER BY created_at DESC LIMIT 1";

/// Sends [`cooldown_reason`]'s read ahead (see [`Db::prefetch`]).
pub(super) fn prefetch(
    c: &Db,
    playbook: &str,
    key: &str,
    cooldown_ms: i64,
    now: i64,
) -> Result<(), StoreError> {
    if cooldown_ms <= 0 {
        return Ok(());
    }
    let depends = super::intake::part::cooldown(playbook, key);
    c.prefetch_on(LAST, &[&playbook, &key, &(now - cooldown_ms)], depends)
}

pub(super) fn cooldown_reason(
    c: &Db,
    playbook: &str,
    key: &str,
    cooldown_ms: i64,
    now: i64,
) -> Result<Option<String>, StoreError> {
    if cooldown_ms <= 0 {
        return Ok(None);
    }
    let last: Option<(i64, i64)> = c.row(LAST, &[&playbook, &key, &(now - cooldown_ms)], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })?;
    Ok(last.map(|(id, at)| {
        format!(
            "cooldown: run {id} for the same key started at {}",
            rfc3339(at)
        )
    }))
}
