//! The outbox: the messages an operator must not miss, kept from the write that makes them
//! until every chat sink they go to has delivered them (or given up): a run's end, written
//! in the end's transaction ([`Store::run_finished_telling`]), and a run's request for
//! approval, written as the run parks ([`Store::park_for_approval`]). A crash between the
//! write and its message loses neither: the next start sends what is left, and on PostgreSQL
//! the replica that takes over a dead one's work sends that one's. Delivery is at least once:
//! a crash after a message went out and before its row was deleted sends it again.
//!
//! A message is rebuilt from the record (the run, its evidence, its pending approval); the
//! row keeps only what the record does not: the figures of an end, computed from the run's
//! step outputs.

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

/// A message not yet delivered everywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Untold {
    /// A run's end.
    End {
        /// The run.
        run_id: i64,
        /// What it says.
        message: EndMessage,
    },
    /// A run's request for approval: its pending approval, if it still is.
    Ask {
        /// The run.
        run_id: i64,
        /// The approval asked for (a run asks again at each gate).
        approval_id: i64,
    },
}

/// The event a kept message is, as chat names it.
const END: &str = "run_finished";
const ASK: &str = "approval_needed";

impl Untold {
    /// The run it is about.
    pub fn run_id(&self) -> i64 {
        match self {
            Untold::End { run_id, .. } | Untold::Ask { run_id, .. } => *run_id,
        }
    }

    fn event(&self) -> &'static str {
        match self {
            Untold::End { .. } => END,
            Untold::Ask { .. } => ASK,
        }
    }
}

/// A row's texts and approval.
type Fields<'a> = (Option<&'a str>, Option<&'a str>, Option<i64>);

/// Keeps run `run_id`'s end `message` until [`Store::told`], in the transaction `c` is in.
pub(super) fn keep_end(
    c: &Db,
    run_id: i64,
    owner: &str,
    now: i64,
    message: &EndMessage,
) -> Result<(), StoreError> {
    // A text the database refuses would take the run's end with it.
    use crate::text::storable;
    let (summary, report) = (
        storable(&message.summary),
        message.report.as_deref().map(storable),
    );
    let fields = (Some(summary.as_ref()), report.as_deref(), None);
    keep(c, run_id, END, owner, now, fields)
}

/// Keeps run `run_id`'s request for approval `approval_id` until [`Store::told`].
pub(super) fn keep_ask(
    c: &Db,
    run_id: i64,
    approval_id: i64,
    owner: &str,
    now: i64,
) -> Result<(), StoreError> {
    keep(c, run_id, ASK, owner, now, (None, None, Some(approval_id)))
}

fn keep(
    c: &Db,
    run_id: i64,
    event: &str,
    owner: &str,
    now: i64,
    (summary, report, approval_id): Fields<'_>,
) -> Result<(), StoreError> {
    c.later(
        "INSERT INTO outbox (run_id, event, owner, created_at, summary, report, approval_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (run_id, event) DO UPDATE SET owner = excluded.owner,
           created_at = excluded.created_at, summary = excluded.summary,
           report = excluded.report, approval_id = excluded.approval_id",
        &[
            &run_id,
            &event,
            &owner,
            &now,
            &summary,
            &report,
            &approval_id,
        ],
    )
}

/// Makes the messages `from` left `to`'s, and returns them in run order (`from`: none takes
/// every one).
pub(super) fn take(c: &Db, from: Option<&str>, to: &str) -> Result<Vec<Untold>, StoreError> {
    let mut left: Vec<Untold> = c.rows(
        "UPDATE outbox SET owner = ?2 WHERE owner = ?1 OR ?1 IS NULL
         RETURNING run_id, event, summary, report, approval_id",
        &[&from, &to],
        |r| {
            let (run_id, event): (i64, String) = (r.get(0)?, r.get(1)?);
            Ok(match event.as_str() {
                END => Untold::End {
                    run_id,
                    message: EndMessage {
                        summary: r.get::<Option<String>>(2)?.unwrap_or_default(),
                        report: r.get(3)?,
                    },
                },
                _ => Untold::Ask {
                    run_id,
                    approval_id: r.get::<Option<i64>>(4)?.unwrap_or_default(),
                },
            })
        },
    )?;
    // An approval asked before the run's end.
    left.sort_by_key(|u| (u.run_id(), u.event() == END));
    Ok(left)
}

impl Store {
    /// The messages this daemon is to send at its start: on SQLite every one a previous
    /// process left; on PostgreSQL this replica's own (a dead replica's are taken over with its
    /// lease, see [`Store::take_over_expired`]).
    pub async fn untold(&self) -> Result<Vec<Untold>, StoreError> {
        let me = self.inner.replica.clone();
        let shared = self.is_shared();
        self.write(move |c| take(c, (shared).then_some(me.as_str()), &me))
            .await
    }

    /// Keeps run `run_id`'s end `message` on its own (for an end written without one: a run
    /// denied, expired, cancelled, resolved or interrupted).
    pub async fn keep_end(&self, run_id: i64, message: EndMessage) -> Result<(), StoreError> {
        let (me, now) = (self.inner.replica.clone(), self.now_ms());
        self.write(move |c| keep_end(c, run_id, &me, now, &message))
            .await
    }

    /// `message` has been delivered, or given up on, by every sink it went to. A request for
    /// an approval the run has since replaced with its next one stays: that one is not told.
    pub async fn told(&self, message: Untold) -> Result<(), StoreError> {
        let (run_id, event) = (message.run_id(), message.event());
        let approval = match message {
            Untold::Ask { approval_id, .. } => Some(approval_id),
            Untold::End { .. } => None,
        };
        self.write(move |c| {
            c.exec(
                "DELETE FROM outbox WHERE run_id = ?1 AND event = ?2
                   AND (approval_id = ?3 OR ?3 IS NULL)",
                &[&run_id, &event, &approval],
            )
        })
        .await
        .map(drop)
    }
}
