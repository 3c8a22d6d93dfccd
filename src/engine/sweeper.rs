//! The sweeper: approval requests that expire end their runs.

use super::*;

/// How often pending approvals are checked for expiry.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

impl Engine {
    /// Expires approvals past their time, every [`SWEEP_INTERVAL`], until shutdown. Runs once
    /// at start too, so that approvals that expired while the daemon was down end at once.
    pub async fn sweep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            match self.store.expire_due().await {
                Ok(runs) => {
                    for run_id in runs {
                        tracing::info!(run_id, "approval expired; run ended without acting");
                        self.announce_end(run_id, RunState::Expired).await;
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot expire approvals"),
            }
        }
    }
}
