//! Where each playbook stands on its way to autonomy (see [`crate::policy::next_standing`]):
//! one row a playbook, shared by the replicas. An outcome is recorded in a transaction of its
//! own holding the playbook's row (so two replicas recording at once both count, in some
//! order); a change of level, and a reset, are audited in the same transaction.

use super::{Db, Store, StoreError};
use crate::policy::{AutonomyRules, Level, Outcome, Standing, next_standing};

/// A change of level an outcome (or a reset) made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LevelChange {
    /// Before.
    pub from: Standing,
    /// After.
    pub to: Standing,
}

/// A playbook's standing as stored, with when its level last changed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct StoredStanding {
    /// Playbook.
    pub playbook: String,
    /// Where it stands.
    #[serde(flatten)]
    pub standing: Standing,
    /// When its level last changed (absent: never).
    #[schema(value_type = Option<String>, format = DateTime)]
    pub changed_at: Option<crate::time::Timestamp>,
}

fn read_row(c: &Db, playbook: &str, lock: bool) -> Result<Standing, StoreError> {
    let sql = match (lock, c.is_pg()) {
        (true, true) => {
            "SELECT level, streak, failures FROM autonomy WHERE playbook = ?1 FOR UPDATE"
        }
        _ => "SELECT level, streak, failures FROM autonomy WHERE playbook = ?1",
    };
    let row = c.row(sql, &[&playbook], |r| {
        Ok((r.get::<String>(0)?, r.get::<i64>(1)?, r.get::<i64>(2)?))
    })?;
    Ok(match row {
        Some((level, streak, failures)) => Standing {
            level: Level::parse(&level).unwrap_or(Level::Approve),
            streak: u32::try_from(streak).unwrap_or(0),
            failures: u32::try_from(failures).unwrap_or(0),
        },
        None => Standing::default(),
    })
}

fn write_row(
    c: &Db,
    playbook: &str,
    s: Standing,
    changed: bool,
    now: i64,
) -> Result<(), StoreError> {
    c.exec(
        "UPDATE autonomy SET level = ?2, streak = ?3, failures = ?4,
           changed_at = CASE WHEN ?5 THEN ?6 ELSE changed_at END
         WHERE playbook = ?1",
        &[
            &playbook,
            &s.level.as_str(),
            &i64::from(s.streak),
            &i64::from(s.failures),
            &changed,
            &now,
        ],
    )?;
    Ok(())
}

/// The row, created behind approval when missing (the lock needs a row to hold).
fn ensure_row(c: &Db, playbook: &str) -> Result<(), StoreError> {
    c.exec(
        "INSERT INTO autonomy (playbook, level, streak, failures) VALUES (?1, 'approve', 0, 0)
         ON CONFLICT (playbook) DO NOTHING",
        &[&playbook],
    )?;
    Ok(())
}

impl Store {
    /// Where `playbook` stands now.
    pub async fn standing(&self, playbook: &str) -> Result<Standing, StoreError> {
        let playbook = playbook.to_string();
        self.read(move |c| read_row(c, &playbook, false)).await
    }

    /// Every playbook with a recorded standing.
    pub async fn standings(&self) -> Result<Vec<StoredStanding>, StoreError> {
        self.read(|c| {
            let rows = c.rows(
                "SELECT playbook, level, streak, failures, changed_at FROM autonomy ORDER BY playbook",
                &[],
                |r| {
                    Ok((
                        r.get::<String>(0)?,
                        r.get::<String>(1)?,
                        r.get::<i64>(2)?,
                        r.get::<i64>(3)?,
                        r.get::<Option<crate::time::Timestamp>>(4)?,
                    ))
                },
            )?;
            Ok(rows
                .into_iter()
                .map(|(playbook, level, streak, failures, changed_at)| StoredStanding {
                    playbook,
                    standing: Standing {
                        level: Level::parse(&level).unwrap_or(Level::Approve),
                        streak: u32::try_from(streak).unwrap_or(0),
                        failures: u32::try_from(failures).unwrap_or(0),
                    },
                    changed_at,
                })
                .collect())
        })
        .await
    }

    /// Counts a run's outcome toward `playbook`'s autonomy; returns the change of level it
    /// made, if any (audited with [`crate::policy::change_reason`], `run_id` the run counted).
    pub async fn record_outcome(
        &self,
        playbook: &str,
        outcome: Outcome,
        rules: AutonomyRules,
        run_id: i64,
    ) -> Result<Option<LevelChange>, StoreError> {
        let (playbook, now) = (playbook.to_string(), self.now_ms());
        self.exclusive(move |c| {
            ensure_row(c, &playbook)?;
            let from = read_row(c, &playbook, true)?;
            let to = next_standing(from, outcome, rules);
            let changed = from.level != to.level;
            write_row(c, &playbook, to, changed, now)?;
            if !changed {
                return Ok(None);
            }
            let action = match to.level {
                Level::Auto => "autonomy.promote",
                Level::Approve => "autonomy.demote",
            };
            let why = crate::policy::change_reason(to, run_id);
            let target = format!("playbook/{playbook}");
            super::audit::audit_in(c, "reflex", action, Some(&target), "ok", Some(&why))?;
            Ok(Some(LevelChange { from, to }))
        })
        .await
    }

    /// Puts `playbook` back behind approval with a fresh count (an admin's reset), audited.
    pub async fn reset_standing(
        &self,
        playbook: &str,
        who: &str,
    ) -> Result<LevelChange, StoreError> {
        let (playbook, who, now) = (playbook.to_string(), who.to_string(), self.now_ms());
        self.exclusive(move |c| {
            ensure_row(c, &playbook)?;
            let from = read_row(c, &playbook, true)?;
            let to = Standing::default();
            write_row(c, &playbook, to, from.level != to.level, now)?;
            let target = format!("playbook/{playbook}");
            let detail = format!(
                "was {} with {} verified and {} failed in a row",
                from.level.as_str(),
                from.streak,
                from.failures
            );
            super::audit::audit_in(
                c,
                &who,
                "autonomy.reset",
                Some(&target),
                "ok",
                Some(&detail),
            )?;
            Ok(LevelChange { from, to })
        })
        .await
    }
}
