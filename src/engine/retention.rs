//! Retention: every `retention.every` (and once at start) the record older than its limit is
//! deleted in small batches, yielding between them so that intake never waits long on the
//! writer; the store's size is published as metrics.

use super::*;
use crate::store::PRUNED_TABLES;

/// A pause between batches, so other writes go first.
const BETWEEN_BATCHES: Duration = Duration::from_millis(5);

impl Engine {
    /// Prunes on schedule until shutdown.
    pub async fn keep_retention(self: Arc<Self>) {
        let mut tick =
            tokio::time::interval(self.live().retention.every.max(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            if let Err(e) = self.prune().await {
                tracing::warn!(error = %e, "retention: cannot prune the store now; trying at the next round");
            }
        }
    }

    /// How far back ended runs are kept: the configured time, but never less than what counts
    /// runs (the breaker's window, the longest cooldown in force).
    fn runs_kept_for(&self) -> Duration {
        let set = self.playbooks();
        (set.playbooks.iter().map(|p| p.cooldown))
            .chain([
                self.live().retention.runs,
                Duration::from_millis(self.live().limits.window_ms.max(0) as u64),
            ])
            .max()
            .unwrap_or(self.live().retention.runs)
    }

    /// One round: deletes what is past its time, batch after batch; returns the rows deleted.
    pub async fn prune(&self) -> Result<u64, crate::store::StoreError> {
        let now = self.store.now_ms();
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let runs_before = now.saturating_sub(ms(self.runs_kept_for()));
        let audit_before = now.saturating_sub(ms(self.live().retention.audit));
        let mut total = 0;
        loop {
            let pruned = (self.store)
                .prune_batch(
                    runs_before,
                    audit_before,
                    self.live().retention.batch,
                    self.live().audit_sink.is_some(),
                )
                .await?;
            for (table, n) in PRUNED_TABLES.iter().zip(pruned.rows) {
                self.metrics
                    .store_pruned
                    .with_label_values(&[table])
                    .inc_by(n);
            }
            total += pruned.total();
            if pruned.total() == 0 || self.shutdown.is_cancelled() {
                break;
            }
            tokio::time::sleep(BETWEEN_BATCHES).await;
        }
        if total > 0 {
            tracing::info!(rows = total, "retention: deleted the record past its time");
        }
        let (rows, bytes) = self.store.size().await?;
        for (table, n) in rows {
            self.metrics.store_rows.with_label_values(&[table]).set(n);
        }
        self.metrics.store_bytes.set(bytes);
        Ok(total)
    }
}
