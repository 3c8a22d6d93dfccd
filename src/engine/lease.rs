//! A replica's lease on the shared database (PostgreSQL), and the runs it holds there but
//! does not execute.

use super::*;

/// Every this many lease renewals (2 s each), a replica on PostgreSQL looks for runs it holds
/// in the database but does not execute.
const ORPHAN_EVERY: u64 = 15;

impl Engine {
    /// Keeps this replica's lease (PostgreSQL) until shutdown: renews it every
    /// [`crate::store::LEASE_RENEW`], and takes over the work of replicas whose lease expired,
    /// announcing each run that ends interrupted. Nothing to do on SQLite.
    pub async fn keep_lease(self: Arc<Self>) {
        if !self.store.is_shared() {
            return;
        }
        let mut tick = tokio::time::interval(crate::store::LEASE_RENEW);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Runs the database says this replica executes but its engine does not, as of the
        // previous look: one seen so twice in a row was lost track of.
        let mut unclaimed: Vec<i64> = Vec::new();
        for round in 0u64.. {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            if round % ORPHAN_EVERY == ORPHAN_EVERY - 1 {
                unclaimed = self.release_orphans(unclaimed).await;
            }
            let renewed = self.store.renew_lease().await;
            self.metrics
                .lease_held
                .set(i64::from(self.store.may_claim()));
            match renewed {
                Ok(true) => {}
                Ok(false) => tracing::error!(
                    replica = self.store.replica(),
                    "this replica's lease had expired and its runs were taken over; it claims again from now"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "cannot renew the lease; claiming nothing until it is renewed");
                    continue;
                }
            }
            let taken = match self.store.take_over_expired().await {
                Ok(taken) => taken,
                Err(e) => {
                    tracing::error!(error = %e, "cannot take over expired replicas; retrying");
                    continue;
                }
            };
            for t in taken {
                self.metrics.takeovers.inc();
                tracing::warn!(
                    replica = %t.replica,
                    interrupted = ?t.interrupted,
                    requeued = ?t.requeued,
                    "a replica's lease expired: its running steps are interrupted, its unstarted runs requeued"
                );
                for id in t.interrupted {
                    self.announce_end(id, RunState::Interrupted).await;
                }
                self.tell_untold(t.untold).await;
                if !t.requeued.is_empty() {
                    self.wake.notify_one();
                }
            }
        }
    }

    /// Compares the runs the database says this replica executes with the runs it does;
    /// releases those missing now and at the previous look (`seen`). Returns those missing now.
    pub(super) async fn release_orphans(&self, seen: Vec<i64>) -> Vec<i64> {
        let owned = match self.store.owned_running().await {
            Ok(owned) => owned,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list this replica's runs");
                return seen;
            }
        };
        let missing: Vec<i64> = {
            let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            owned
                .into_iter()
                .filter(|id| !running.contains_key(id))
                .collect()
        };
        let lost: Vec<i64> = missing
            .iter()
            .copied()
            .filter(|id| seen.contains(id))
            .collect();
        if lost.is_empty() {
            return missing;
        }
        match self.store.release_orphans(lost).await {
            Ok(t) => {
                tracing::warn!(
                    interrupted = ?t.interrupted,
                    requeued = ?t.requeued,
                    "runs this replica had lost track of: released"
                );
                for id in t.interrupted {
                    self.announce_end(id, RunState::Interrupted).await;
                }
                self.tell_untold(t.untold).await;
                self.wake.notify_one();
            }
            Err(e) => tracing::warn!(error = %e, "cannot release runs this replica lost track of"),
        }
        Vec::new()
    }
}
