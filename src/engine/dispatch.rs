//! The dispatcher: claims queued runs as worker slots free up, and starts them; at start,
//! what a crash left is marked first.

use super::*;

/// How long the dispatcher sleeps without a wake-up before looking at the queue again; a
/// safety net only, since every intake wakes it.
const IDLE_POLL: Duration = Duration::from_secs(5);

/// Runs claimed in one write at most.
const MAX_CLAIM: usize = 64;

impl Engine {
    /// Executes a claimed run on its own task, holding its worker slot until it ends.
    pub(super) fn spawn_run(
        self: &Arc<Self>,
        run: ClaimedRun,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let engine = self.clone();
        self.tracker.spawn(async move {
            engine.drive(run).await;
            drop(permit);
        });
    }

    /// The dispatcher's work done here and now, until no run is left to start or under way:
    /// for tests that must know when what they set going has settled.
    #[cfg(test)]
    pub(crate) async fn run_until_idle(self: &Arc<Self>) {
        loop {
            self.tracker.close();
            self.tracker.wait().await;
            self.tracker.reopen();
            let max = self.config.max_runs_per_target;
            let runs = self.store.claim(max, MAX_CLAIM).await.unwrap();
            if runs.is_empty() {
                return;
            }
            for run in runs {
                self.drive(run).await;
            }
        }
    }

    /// Marks runs cut off by a crash as interrupted; call once before [`Engine::dispatch`].
    /// On PostgreSQL, takes this replica's lease first.
    pub async fn recover(&self) -> Result<Vec<i64>, StoreError> {
        self.store.renew_lease().await?;
        let ids = self.store.recover().await?;
        // What the last process left, taken before this one keeps messages of its own.
        let left = self.store.untold().await?;
        for id in &ids {
            tracing::warn!(
                run_id = id,
                "run interrupted by a restart; its running step was not re-run"
            );
            self.announce_end(*id, RunState::Interrupted).await;
        }
        self.tell_untold(left).await;
        Ok(ids)
    }

    /// The dispatcher: claims pending runs, oldest first, within the concurrency limit, until
    /// shutdown. Then waits up to `shutdown_grace` for runs in flight to reach a step boundary.
    pub async fn dispatch(self: Arc<Self>) {
        let slots = self.slots.clone();
        loop {
            let first = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("semaphore is never closed"),
                _ = self.shutdown.cancelled() => break,
            };
            if self.shutdown.is_cancelled() {
                break;
            }
            // Claim as many runs as there are free slots, in one write.
            let mut permits = vec![first];
            while permits.len() < MAX_CLAIM {
                match slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let claimed = self
                .store
                .claim(self.config.max_runs_per_target, permits.len())
                .await;
            match claimed {
                Ok(runs) if !runs.is_empty() => {
                    for (run, permit) in runs.into_iter().zip(permits) {
                        self.spawn_run(run, permit);
                    }
                }
                Ok(_) => {
                    drop(permits);
                    // Replicas wake each other (`NOTIFY`); should one be lost, they look
                    // again sooner than a lone process does.
                    let idle = if self.store.is_shared() {
                        Duration::from_secs(1)
                    } else {
                        IDLE_POLL
                    };
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = self.store.woken() => {}
                        _ = tokio::time::sleep(idle) => {}
                        _ = self.shutdown.cancelled() => break,
                    }
                }
                Err(e) => {
                    drop(permits);
                    tracing::error!(error = %e, "cannot claim runs from the store; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        self.tracker.close();
        if tokio::time::timeout(self.config.shutdown_grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace = ?self.config.shutdown_grace,
                "runs still in a step at shutdown; they will be marked interrupted at the next start"
            );
        }
    }
}
