//! Retention: ended runs (with their steps, approvals, chat threads and artifacts), the alerts
//! no run refers to any more, and audit rows older than their limit are deleted, a small batch
//! per transaction so that the writer is never held for long. Live runs (pending, running,
//! awaiting approval) are never deleted, however old. SQLite gives the pages back
//! (incremental auto-vacuum, set up when the store opens).

use super::{Store, StoreError};

/// The tables retention deletes from, as `reflex_store_pruned_total{table}` names them.
pub const PRUNED_TABLES: &[&str] = &["runs", "steps", "approvals", "artifacts", "alerts", "audit"];

/// What one batch deleted, per table (in [`PRUNED_TABLES`]' order).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Rows deleted, by table.
    pub rows: [u64; 6],
}

impl Pruned {
    /// Rows deleted in all.
    pub fn total(&self) -> u64 {
        self.rows.iter().sum()
    }
}

/// The states of a run that has ended (anything but pending, running, awaiting approval).
const ENDED: &str = "state NOT IN ('pending', 'running', 'awaiting_approval')";

impl Store {
    /// Deletes at most `batch` ended runs that ended before `runs_before` (ms), with their
    /// rows; at most `batch` alerts received before it that no run refers to; at most `batch`
    /// audit rows written before `audit_before` (and, with `keep_unsent`, already sent to the
    /// audit sink). One short transaction. Call again while it deletes anything.
    pub async fn prune_batch(
        &self,
        runs_before: i64,
        audit_before: i64,
        batch: u32,
        keep_unsent: bool,
    ) -> Result<Pruned, StoreError> {
        let batch = i64::from(batch.max(1));
        let sqlite = self.path().is_some();
        self.write(move |c| {
            let ids: Vec<i64> = c.rows(
                &format!(
                    "SELECT id FROM runs WHERE {ENDED} AND COALESCE(finished_at, created_at) < ?1
                     ORDER BY id LIMIT ?2"
                ),
                &[&runs_before, &batch],
                |r| r.get(0),
            )?;
            let mut out = Pruned::default();
            if let (Some(first), Some(last)) = (ids.first(), ids.last()) {
                // The ids are a range of the ended ones: bound by it, checked again.
                let pick = format!(
                    "run_id IN (SELECT id FROM runs WHERE id BETWEEN ?1 AND ?2 AND {ENDED}
                       AND COALESCE(finished_at, created_at) < ?3)"
                );
                let args: [&dyn super::db::Param; 3] = [first, last, &runs_before];
                out.rows[1] = c.exec(&format!("DELETE FROM steps WHERE {pick}"), &args)?;
                out.rows[2] = c.exec(&format!("DELETE FROM approvals WHERE {pick}"), &args)?;
                out.rows[3] = c.exec(&format!("DELETE FROM artifacts WHERE {pick}"), &args)?;
                c.exec(&format!("DELETE FROM chat_threads WHERE {pick}"), &args)?;
                c.exec(&format!("DELETE FROM outbox WHERE {pick}"), &args)?;
                out.rows[0] = c.exec(
                    &format!(
                        "DELETE FROM runs WHERE id BETWEEN ?1 AND ?2 AND {ENDED}
                         AND COALESCE(finished_at, created_at) < ?3"
                    ),
                    &args,
                )?;
            }
            out.rows[4] = c.exec(
                "DELETE FROM alerts WHERE id IN (SELECT a.id FROM alerts a WHERE a.received_at < ?1
                   AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.alert_id = a.id) ORDER BY a.id LIMIT ?2)",
                &[&runs_before, &batch],
            )?;
            out.rows[5] = prune_audit(c, audit_before, batch, keep_unsent)?;
            if sqlite && out.total() > 0 {
                // The pages freed go back to the file system.
                c.rows("PRAGMA incremental_vacuum", &[], |_| Ok(()))?;
            }
            Ok(out)
        })
        .await
    }

    /// Rows per table (for `reflex_store_rows{table}`), and the database's size in bytes
    /// (SQLite: the file and its WAL; PostgreSQL: `pg_database_size`).
    pub async fn size(&self) -> Result<(Vec<(&'static str, i64)>, i64), StoreError> {
        let path = self.path().map(std::path::Path::to_path_buf);
        self.read(move |c| {
            let mut rows = Vec::new();
            for table in PRUNED_TABLES {
                let n = c.one(&format!("SELECT count(*) FROM {table}"), &[], |r| r.get(0))?;
                rows.push((*table, n));
            }
            let bytes = match &path {
                Some(path) => {
                    let len = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
                    let mut wal = path.clone().into_os_string();
                    wal.push("-wal");
                    (len(path) + len(std::path::Path::new(&wal))) as i64
                }
                None => c.one("SELECT pg_database_size(current_database())", &[], |r| {
                    r.get(0)
                })?,
            };
            Ok((rows, bytes))
        })
        .await
    }
}

/// Deletes the oldest audit rows, a prefix of each chain: those in the first `batch` written
/// before `before` (and sent, with `keep_unsent`). The last one deleted of each chain becomes
/// its anchor, which its oldest row kept follows.
fn prune_audit(
    c: &super::Db,
    before: i64,
    batch: i64,
    keep_unsent: bool,
) -> Result<u64, StoreError> {
    let sent: i64 = match keep_unsent {
        true => c
            .row("SELECT sent_id FROM audit_sink WHERE one = 1", &[], |r| {
                r.get(0)
            })?
            .unwrap_or(0),
        false => i64::MAX,
    };
    let oldest = c.rows(
        "SELECT id, at, hash, chain FROM audit ORDER BY id LIMIT ?1",
        &[&batch],
        |r| {
            Ok((
                r.get::<i64>(0)?,
                r.get::<i64>(1)?,
                r.get::<Option<Vec<u8>>>(2)?,
                r.get::<i64>(3)?,
            ))
        },
    )?;
    // Each chain's last row deleted, and the hash of its last chained one: a row without a
    // hash (written by a replica older than the chain) moves the anchor's id but not its
    // hash, so the next chained row follows the last chained one.
    let mut anchors = std::collections::BTreeMap::<i64, (i64, Option<Vec<u8>>)>::new();
    for (id, _, hash, chain) in oldest
        .into_iter()
        .take_while(|(id, at, _, _)| *at < before && *id <= sent)
    {
        let anchor = anchors.entry(chain).or_default();
        anchor.0 = id;
        if hash.is_some() {
            anchor.1 = hash;
        }
    }
    let mut deleted = 0;
    // In the order of the chains (the audit sink's read locks them in that order too).
    for (chain, (id, hash)) in anchors {
        c.exec(
            "UPDATE audit_heads SET anchor_id = ?1, anchor_hash = coalesce(?2, anchor_hash)
             WHERE chain = ?3",
            &[&id, &hash, &chain],
        )?;
        // By chain, up to its anchor: on PostgreSQL a transaction holding a chain may commit
        // rows with ids below another chain's, after they were read above.
        deleted += c.exec(
            "DELETE FROM audit WHERE chain = ?1 AND id <= ?2",
            &[&chain, &id],
        )?;
    }
    Ok(deleted)
}
