//! Alerts accepted but not planned within their webhook's budget: kept here, so that the
//! sender gets its answer in time and nothing is lost, and planned after the answer. The row
//! is taken out in the transaction that records the alert, so it is recorded once, whichever
//! replica plans it (and dedup would hold even if two did).

use super::{Store, StoreError};
use crate::alert::{Alert, AlertRecord};

/// An alert kept for planning.
#[derive(Debug, Clone, PartialEq)]
pub struct DeferredAlert {
    /// Its row, taken out when it is recorded.
    pub id: i64,
    /// The alert.
    pub alert: Alert,
    /// When its webhook arrived (µs since the epoch).
    pub received_us: i64,
}

impl Store {
    /// Keeps alerts for planning later, in one write.
    pub async fn defer(&self, alerts: Vec<Alert>, received_us: i64) -> Result<(), StoreError> {
        let now = self.now_ms();
        let rows: Vec<String> = (alerts.iter())
            .map(|a| serde_json::to_string(&AlertRecord::of(a)).unwrap_or_default())
            .collect();
        self.write(move |c| {
            for alert in &rows {
                c.exec(
                    "INSERT INTO deferred_alerts (alert, received_us, created_at) VALUES (?1, ?2, ?3)",
                    &[alert, &received_us, &now],
                )?;
            }
            Ok(())
        })
        .await
    }

    /// The oldest alerts waiting to be planned, at most `limit`.
    pub async fn deferred(&self, limit: u32) -> Result<Vec<DeferredAlert>, StoreError> {
        let limit = i64::from(limit);
        let rows: Vec<(i64, String, i64)> = self
            .read(move |c| {
                c.rows(
                    "SELECT id, alert, received_us FROM deferred_alerts ORDER BY id LIMIT ?1",
                    &[&limit],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
            })
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, text, received_us)| {
                let stored: AlertRecord = serde_json::from_str(&text).ok()?;
                Some(DeferredAlert {
                    id,
                    alert: stored.alert(),
                    received_us,
                })
            })
            .collect())
    }
}

/// In the recording transaction: takes the alert's row out; false when it is gone already
/// (recorded by another replica), and the alert must not be recorded again.
pub(super) fn take(c: &super::Db, id: i64) -> Result<bool, StoreError> {
    Ok(c.exec("DELETE FROM deferred_alerts WHERE id = ?1", &[&id])? > 0)
}
