//! Blast-radius budgets (`budgets:`), checked when a step is about to act: across replicas,
//! a unit of every budget that covers the step's action is taken, or the step is not
//! executed (its run fails, or waits for room with `on_exceed: wait`). A shadow run looks
//! without taking and records what would have been refused.

use super::run::{Stop, record_err};
use super::*;
use crate::config::OnExceed;
use crate::store::{BudgetLimit, ClaimedRun, StepRecord};

/// What the budgets say about a step.
pub(super) enum Budget {
    /// It may act (a unit of each budget covering it is taken).
    Room,
    /// A budget has no room: why, naming it.
    Spent(String),
    /// The run was cancelled while the step waited for room.
    Cancelled,
}

impl Engine {
    /// Takes the step's budget units, waiting for room where the budget says so.
    pub(super) async fn budget(
        &self,
        run: &ClaimedRun,
        step: &StepRecord,
        token: &tokio_util::sync::CancellationToken,
    ) -> Result<Budget, Stop> {
        let budgets: Vec<crate::config::Budget> = (self.live().budgets.iter())
            .filter(|b| b.covers(step.action))
            .cloned()
            .collect();
        if budgets.is_empty() {
            return Ok(Budget::Room);
        }
        let limits: Vec<BudgetLimit> = (budgets.iter())
            .map(|b| BudgetLimit {
                name: b.action.clone(),
                max: b.max,
                per_ms: i64::try_from(b.per.as_millis()).unwrap_or(i64::MAX),
            })
            .collect();
        loop {
            let spent = (self.store)
                .spend_budgets(limits.clone(), run.id, step.idx, !run.dry_run)
                .await
                .map_err(record_err)?;
            let Some(x) = spent else {
                return Ok(Budget::Room);
            };
            let budget = budgets.iter().find(|b| b.action == x.name);
            let (max, per) = budget.map_or((0, Duration::ZERO), |b| (b.max, b.per));
            let why = format!(
                "over budget: the budget for {} allows {max} in {}, and {} were used; room again at {}",
                x.name,
                crate::time::format_duration(per),
                x.used,
                crate::time::Timestamp::from_ms(x.frees_at),
            );
            if run.dry_run || budget.is_none_or(|b| b.on_exceed == OnExceed::Fail) {
                tracing::warn!(step = %step.name, budget = %x.name, "step refused: {why}");
                return Ok(Budget::Spent(why));
            }
            let wait =
                Duration::from_millis((x.frees_at - self.store.now_ms()).clamp(50, 60_000) as u64);
            tracing::info!(step = %step.name, budget = %x.name, wait = ?wait, "step waits for room in its budget");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = token.cancelled() => return Ok(Budget::Cancelled),
            }
        }
    }
}
