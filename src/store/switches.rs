//! Kill switches, global and per playbook, persisted so that a restart keeps them engaged.

use super::{Db, Store, StoreError};
use crate::time::{Timestamp, rfc3339};
use serde::Serialize;

/// An engaged switch: scope, actor, reason, until.
type SwitchRow = (String, String, Option<String>, Option<i64>);

/// How long a replica on PostgreSQL answers from its copy of the switches at most, should a
/// change's `NOTIFY` not reach it: a switch engaged on one replica holds on all within this.
const SHARED_SWITCH_TTL: std::time::Duration = std::time::Duration::from_millis(500);

/// The scope name of the global switch.
pub const GLOBAL: &str = "global";

/// The scope name of a playbook's switch.
pub fn playbook_scope(playbook: &str) -> String {
    format!("playbook:{playbook}")
}

/// A change of a kill switch that an operator asks for.
#[derive(Debug, Clone)]
pub struct SwitchChange {
    /// `global` or `playbook:<name>`.
    pub scope: String,
    /// Engage, or release.
    pub engaged: bool,
    /// Why.
    pub reason: String,
    /// Who.
    pub actor: String,
    /// When an engagement ends by itself (ms since the epoch).
    pub until: Option<i64>,
    /// Replace an engagement in force (else one in force is kept, and named).
    pub replace: bool,
}

/// A kill switch as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Switch {
    /// `global` or `playbook:<name>`.
    pub scope: String,
    /// Engaged now (an engagement whose `until` has passed is released).
    pub engaged: bool,
    /// Why it was last changed.
    pub reason: Option<String>,
    /// Who last changed it (token name, or `circuit-breaker`); none if it never changed.
    pub actor: Option<String>,
    /// When; none if it never changed.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub changed_at: Option<Timestamp>,
    /// End of a time-boxed engagement.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub until: Option<Timestamp>,
}

/// Why new work in `playbook` is held back by a switch, if it is; the global switch names
/// the cause when both are engaged.
/// The engaged switches that hold a playbook's runs: the global one and the playbook's. Two
/// lookups by key: `scope IN (...)` or an `ORDER BY` would cost SQLite a temporary table on
/// every alert.
const ENGAGED: &str = "SELECT scope, actor, reason FROM switches
         WHERE scope = 'global' AND engaged AND (until IS NULL OR until > ?2)
         UNION ALL
         SELECT scope, actor, reason FROM switches
         WHERE scope = 'playbook:' || ?1 AND engaged AND (until IS NULL OR until > ?2)";

/// Sends [`engaged_reason`]'s read ahead (see [`Db::prefetch`]).
pub(super) fn prefetch(c: &Db, playbook: &str, now: i64) -> Result<(), StoreError> {
    let depends = super::Keys::Only(vec![super::intake::part::SWITCHES.into()]);
    c.prefetch_on(ENGAGED, &[&playbook, &now], depends)
}

pub(super) fn engaged_reason(
    c: &Db,
    playbook: &str,
    now: i64,
) -> Result<Option<String>, StoreError> {
    let engaged = c.rows(ENGAGED, &[&playbook, &now], |r| {
        let row: (String, String, Option<String>) = (r.get(0)?, r.get(1)?, r.get(2)?);
        Ok(row)
    })?;
    Ok(engaged
        .into_iter()
        .min_by_key(|(scope, ..)| scope != "global")
        .map(|(scope, actor, reason)| {
            format!(
                "kill switch ({scope}) engaged by {actor}: {}",
                reason.unwrap_or_default()
            )
        }))
}

/// Engages a switch; audited. Runs waiting for approval keep waiting (nothing can be approved
/// while it is engaged, and their requests expire as usual); runs in flight stop before their
/// next step, and queued runs when they would start (see the engine).
pub(super) fn engage_in(
    c: &Db,
    scope: &str,
    reason: &str,
    actor: &str,
    until: Option<i64>,
    now: i64,
) -> Result<(), StoreError> {
    set_in(c, scope, true, reason, actor, until, now)
}

fn set_in(
    c: &Db,
    scope: &str,
    engaged: bool,
    reason: &str,
    actor: &str,
    until: Option<i64>,
    now: i64,
) -> Result<(), StoreError> {
    c.exec(
        "INSERT INTO switches (scope, engaged, reason, actor, changed_at, until) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (scope) DO UPDATE SET engaged = ?2, reason = ?3, actor = ?4, changed_at = ?5, until = ?6",
        &[&scope, &engaged, &reason, &actor, &now, &until],
    )?;
    c.wake();
    let action = if engaged {
        "killswitch.engage"
    } else {
        "killswitch.release"
    };
    super::audit::audit_in(c, actor, action, Some(scope), "ok", Some(reason))
}

impl Store {
    /// Every switch ever set, global first.
    pub async fn switches(&self) -> Result<Vec<Switch>, StoreError> {
        let now = self.now_ms();
        self.read(move |c| {
            c.rows(
                "SELECT scope, engaged, reason, actor, changed_at, until FROM switches ORDER BY scope != 'global', scope",
                &[],
                |r| {
                let until: Option<Timestamp> = r.get(5)?;
                let engaged: bool = r.get(1)?;
                Ok(Switch {
                    scope: r.get(0)?,
                    engaged: engaged && until.is_none_or(|u| u.ms() > now),
                    reason: r.get(2)?,
                    actor: r.get(3)?,
                    changed_at: Some(r.get(4)?),
                    until,
                })
                },
            )
        })
        .await
    }

    /// Engages (with a reason, optionally until a time) or releases a switch.
    pub async fn set_switch(
        &self,
        scope: String,
        engaged: bool,
        reason: String,
        actor: String,
        until: Option<i64>,
    ) -> Result<(), StoreError> {
        let change = SwitchChange {
            scope,
            engaged,
            reason,
            actor,
            until,
            replace: true,
        };
        self.change_switch(change).await.map(|_| ())
    }

    /// Engages or releases a switch; an engagement of a switch that is engaged already changes
    /// nothing unless `replace`, and answers who engaged it and why (`Some`), in the same
    /// transaction as the change, so that two operators cannot silently overwrite each
    /// other's reason.
    pub async fn change_switch(&self, change: SwitchChange) -> Result<Option<String>, StoreError> {
        let SwitchChange {
            scope,
            engaged,
            reason,
            actor,
            until,
            replace,
        } = change;
        let now = self.now_ms();
        let result = self
            .write(move |c| {
                if engaged && !replace {
                    let current: Vec<(String, Option<String>, Option<i64>)> = c.rows(
                        "SELECT actor, reason, until FROM switches
                         WHERE scope = ?1 AND engaged AND (until IS NULL OR until > ?2)",
                        &[&scope, &now],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )?;
                    if let Some((actor, reason, until)) = current.into_iter().next() {
                        let until =
                            until.map_or(String::new(), |t| format!(" until {}", rfc3339(t)));
                        return Ok(Some(format!(
                            "the {scope} kill switch is already engaged by {actor}{until}: {}",
                            reason.unwrap_or_default()
                        )));
                    }
                }
                set_in(
                    c,
                    &scope,
                    engaged,
                    &reason,
                    &actor,
                    until.filter(|_| engaged),
                    now,
                )?;
                Ok(None)
            })
            .await;
        self.switches_changed();
        result
    }

    /// Why runs of `playbook` must not act now, if a switch says so. Asked before every
    /// step, so it answers from a copy of the switches table that every switch change
    /// invalidates (see [`Store::switches_changed`]).
    pub async fn kill_reason(&self, playbook: &str) -> Result<Option<String>, StoreError> {
        let now = self.now_ms();
        let epoch = self
            .inner
            .switch_epoch
            .load(std::sync::atomic::Ordering::Acquire);
        let cached = {
            let cache = self
                .inner
                .switch_cache
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            // On PostgreSQL another replica may change a switch: its `NOTIFY` bumps the epoch,
            // and a copy older than `SHARED_SWITCH_TTL` is read again in case it was lost.
            let fresh =
                |at: &std::time::Instant| !self.is_shared() || at.elapsed() < SHARED_SWITCH_TTL;
            cache
                .as_ref()
                .filter(|(e, at, _)| *e == epoch && fresh(at))
                .map(|(_, _, rows)| rows.clone())
        };
        let rows = match cached {
            Some(rows) => rows,
            None => {
                let rows = self
                    .read(|c| {
                        c.rows(
                            "SELECT scope, actor, reason, until FROM switches WHERE engaged",
                            &[],
                            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                        )
                    })
                    .await?;
                *self
                    .inner
                    .switch_cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) =
                    Some((epoch, std::time::Instant::now(), rows.clone()));
                rows
            }
        };
        let scope = playbook_scope(playbook);
        let live = |s: &&SwitchRow| s.3.is_none_or(|u| u > now);
        let hit = (rows.iter().filter(live).find(|s| s.0 == GLOBAL))
            .or_else(|| rows.iter().filter(live).find(|s| s.0 == scope));
        Ok(hit.map(|(scope, actor, reason, _)| {
            format!(
                "kill switch ({scope}) engaged by {actor}: {}",
                reason.as_deref().unwrap_or_default()
            )
        }))
    }

    /// Invalidates the copy of the switches `kill_reason` answers from; call after every
    /// write that may have changed a switch.
    pub(super) fn switches_changed(&self) {
        self.inner
            .switch_epoch
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}
