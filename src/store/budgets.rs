//! Blast-radius budgets, spent when a step is about to act: each use is a row, counted over
//! its budget's sliding window. On PostgreSQL the check and the spend are one transaction of
//! their own (not the writer's batch), holding an advisory lock per budget taken in name order,
//! so two replicas racing for a budget's last unit cannot both have it, and no lock order can
//! cycle. On SQLite the one writer does the same.

use super::{Db, Store, StoreError};

/// A budget to check, as the store sees it.
#[derive(Debug, Clone)]
pub struct BudgetLimit {
    /// Its name (the action, or `*`).
    pub name: String,
    /// Uses at most in a window.
    pub max: u32,
    /// The window, ms.
    pub per_ms: i64,
}

/// A budget with no room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    /// Which budget.
    pub name: String,
    /// Uses in the window now.
    pub used: i64,
    /// When its oldest use leaves the window (ms since the epoch).
    pub frees_at: i64,
}

fn spend(
    c: &Db,
    limits: &[BudgetLimit],
    run: i64,
    step: i64,
    now: i64,
    take: bool,
) -> Result<Option<Exceeded>, StoreError> {
    let mut names: Vec<&str> = limits.iter().map(|b| b.name.as_str()).collect();
    names.sort_unstable();
    if c.is_pg() {
        for name in &names {
            let key = format!("reflex-budget:{name}");
            c.row(
                "SELECT pg_advisory_xact_lock(hashtext(?1))",
                &[&key],
                |_| Ok(()),
            )?;
        }
    }
    for b in limits {
        let since = now - b.per_ms;
        c.exec(
            "DELETE FROM budget_use WHERE budget = ?1 AND at <= ?2",
            &[&b.name, &since],
        )?;
        let (used, oldest): (i64, Option<i64>) = c.one(
            "SELECT count(*), min(at) FROM budget_use WHERE budget = ?1",
            &[&b.name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if used >= i64::from(b.max) {
            return Ok(Some(Exceeded {
                name: b.name.clone(),
                used,
                frees_at: oldest.unwrap_or(now) + b.per_ms,
            }));
        }
    }
    if take {
        for b in limits {
            c.exec(
                "INSERT INTO budget_use (budget, at, run_id, step_idx) VALUES (?1, ?2, ?3, ?4)",
                &[&b.name, &now, &run, &step],
            )?;
        }
    }
    Ok(None)
}

impl Store {
    /// Takes one unit of every budget in `limits` for step `step` of run `run`, all or none:
    /// `Some` names the first budget without room (nothing is taken then). With `take` false
    /// it only looks (a shadow run).
    pub async fn spend_budgets(
        &self,
        limits: Vec<BudgetLimit>,
        run: i64,
        step: i64,
        take: bool,
    ) -> Result<Option<Exceeded>, StoreError> {
        if limits.is_empty() {
            return Ok(None);
        }
        let now = self.now_ms();
        self.exclusive(move |c| spend(c, &limits, run, step, now, take))
            .await
    }
}
