//! The outbox: a run's end message, kept from the run's end until every chat sink it goes to
//! has delivered it (or given up on it). It is written in the same transaction as the end
//! ([`Store::run_finished_telling`]), so that a crash between the end and its message loses
//! neither: the next start sends what is left, and on PostgreSQL the replica that takes over a
//! dead one's work sends that one's. Delivery is at least once: a crash after a message went
//! out and before its row was deleted sends it again.
//!
//! What the record of the run holds (its state, error, alert, evidence) is read again when
//! the message is rebuilt; the row keeps only what was computed from the run's step outputs.

use super::{Db, Store, StoreError};

/// What a run's end message says beyond its record: the figures its steps gave ("Cleanup ran.
/// Space reclaimed: 5.1 GB"), or the playbook's own `report`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndMessage {
    /// The steps' figures.
    pub summary: String,
    /// The playbook's `report`, rendered.
    pub report: Option<String>,
}

/// An end message not yet delivered everywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Untold {
    /// The run.
    pub run_id: i64,
    /// What it says.
    pub message: EndMessage,
}

/// Keeps `message` for run `run_id` until [`Store::told`], in the transaction `c` is in.
pub(super) fn keep(
    c: &Db,
    run_id: i64,
    owner: &str,
    now: i64,
    message: &EndMessage,
) -> Result<(), StoreError> {
    // A text the database refuses would take the run's end with it.
    use crate::text::storable;
    let report = message.report.as_deref().map(storable);
    c.later(
        "INSERT INTO outbox (run_id, owner, created_at, summary, report) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (run_id) DO UPDATE SET owner = excluded.owner,
           created_at = excluded.created_at, summary = excluded.summary, report = excluded.report",
        &[&run_id, &owner, &now, &storable(&message.summary), &report],
    )
}

/// Makes the messages `from` left `to`'s, and returns them (`from`: none takes every one).
pub(super) fn take(c: &Db, from: Option<&str>, to: &str) -> Result<Vec<Untold>, StoreError> {
    c.rows(
        "UPDATE outbox SET owner = ?2 WHERE owner = ?1 OR ?1 IS NULL
         RETURNING run_id, summary, report",
        &[&from, &to],
        |r| {
            Ok(Untold {
                run_id: r.get(0)?,
                message: EndMessage {
                    summary: r.get(1)?,
                    report: r.get(2)?,
                },
            })
        },
    )
    .map(|mut left| {
        left.sort_by_key(|u| u.run_id);
        left
    })
}

impl Store {
    /// The end messages this daemon is to send at its start: on SQLite every one a previous
    /// process left; on PostgreSQL this replica's own (a dead replica's are taken over with its
    /// lease, see [`Store::take_over_expired`]).
    pub async fn untold(&self) -> Result<Vec<Untold>, StoreError> {
        let me = self.inner.replica.clone();
        let shared = self.is_shared();
        self.write(move |c| take(c, (shared).then_some(me.as_str()), &me))
            .await
    }

    /// Run `run_id`'s end message has been delivered, or given up on, by every sink.
    pub async fn told(&self, run_id: i64) -> Result<(), StoreError> {
        self.write(move |c| c.exec("DELETE FROM outbox WHERE run_id = ?1", &[&run_id]))
            .await
            .map(drop)
    }
}
