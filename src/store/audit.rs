//! The append-only audit log: who did what, when, with what outcome; hash chains make it
//! tamper-evident.
//!
//! Each row carries `hash`, the SHA-256 of its content and of `prev`, the hash of the row
//! before it in its chain (`chain`). `audit_heads` holds each chain's head (its newest row's
//! id and hash, locked by every append to it, so that ids follow each chain) and its anchor:
//! the last of its rows retention deleted, whose hash its oldest row kept names as its
//! `prev`. SQLite's one writer appends to chain 0 only. On PostgreSQL a transaction appends
//! its rows to whichever chain no other transaction holds (there are [`CHAINS`]), so that
//! replicas' commits do not wait for each other's on one head. [`verify_chain`] walks the rows
//! and names the first one that does not check out: edited (its hash does not match its
//! content), or not following the row before it in its chain (a row between them was deleted,
//! or the one before was rewritten with a new hash). Rows deleted from the end show as a head
//! no row matches. Someone who can rewrite the whole table and the heads can forge the chains:
//! the audit sink (see `engine::audit_sink`) keeps a copy outside the database.
//!
//! Ids are not in commit order across chains: a transaction holding one chain may commit
//! after another that took larger ids on another. What reads rows in id order to pick up
//! where it left off (the audit sink) first waits for every append that took an id it would
//! read ([`Store::audit_after`]).

use super::{Db, Keys};
use super::{Store, StoreError};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The `prev` of the first row of each chain.
pub const GENESIS: [u8; 32] = [0; 32];

/// The chains on PostgreSQL (schema 17 makes them): more than the writers of the replicas
/// that append at once, so that an append seldom finds them all held.
pub const CHAINS: i64 = 16;

/// One audit row.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Row id.
    pub id: i64,
    /// When.
    #[schema(value_type = String, format = DateTime)]
    pub at: crate::time::Timestamp,
    /// Who: a token name, `alertmanager`, `reflex` for the daemon itself.
    pub actor: String,
    /// What, e.g. `run.cancel`.
    pub action: String,
    /// What it was done to, e.g. `run/12`.
    pub target: Option<String>,
    /// `ok`, `refused`, `failed`.
    pub outcome: String,
    /// Free text.
    pub detail: Option<String>,
    /// SHA-256 (hex) of this row's content and of the row before it (see `reflex audit
    /// verify`); absent on a row written without one.
    pub hash: Option<String>,
}

/// The content a row's hash covers, besides the hash before it.
pub(super) struct Content<'a> {
    pub(super) id: i64,
    pub(super) at: i64,
    pub(super) actor: &'a str,
    pub(super) action: &'a str,
    pub(super) target: Option<&'a str>,
    pub(super) outcome: &'a str,
    pub(super) detail: Option<&'a str>,
}

impl Content<'_> {
    /// SHA-256 over a version tag, `prev`, the id and time, then each text field with its
    /// length in front (an absent one as a length no text has), so no two rows share an input.
    pub(super) fn hash(&self, prev: &[u8]) -> Vec<u8> {
        let mut h = Sha256::new();
        h.update(b"reflex-audit-v1\0");
        h.update(prev);
        h.update(self.id.to_be_bytes());
        h.update(self.at.to_be_bytes());
        for field in [
            Some(self.actor),
            Some(self.action),
            self.target,
            Some(self.outcome),
            self.detail,
        ] {
            match field {
                Some(text) => {
                    h.update((text.len() as u64).to_be_bytes());
                    h.update(text.as_bytes());
                }
                None => h.update(u64::MAX.to_be_bytes()),
            }
        }
        h.finalize().to_vec()
    }
}

/// An audit row as read for checking: its content, the `prev` and `hash` it carries.
struct Stored {
    id: i64,
    at: i64,
    actor: String,
    action: String,
    target: Option<String>,
    outcome: String,
    detail: Option<String>,
    prev: Option<Vec<u8>>,
    hash: Option<Vec<u8>>,
    chain: i64,
}

impl Stored {
    const COLUMNS: &str = "id, at, actor, action, target, outcome, detail, prev, hash, chain";

    fn read(r: &super::db::Row) -> Result<Stored, StoreError> {
        Ok(Stored {
            id: r.get(0)?,
            at: r.get(1)?,
            actor: r.get(2)?,
            action: r.get(3)?,
            target: r.get(4)?,
            outcome: r.get(5)?,
            detail: r.get(6)?,
            prev: r.get(7)?,
            hash: r.get(8)?,
            chain: r.get(9)?,
        })
    }

    /// The next rows after `id`, oldest first, a page at a time.
    fn page_after(c: &Db, id: i64) -> Result<Vec<Stored>, StoreError> {
        let sql = format!(
            "SELECT {} FROM audit WHERE id > ?1 ORDER BY id LIMIT 1000",
            Self::COLUMNS
        );
        c.rows(&sql, &[&id], Self::read)
    }

    /// As the API shows it: the hash in hex, `prev` left out.
    fn entry(self) -> AuditEntry {
        AuditEntry {
            id: self.id,
            at: crate::time::Timestamp::from_ms(self.at),
            actor: self.actor,
            action: self.action,
            target: self.target,
            outcome: self.outcome,
            detail: self.detail,
            hash: self.hash.map(hex::encode),
        }
    }

    fn content(&self) -> Content<'_> {
        Content {
            id: self.id,
            at: self.at,
            actor: &self.actor,
            action: &self.action,
            target: self.target.as_deref(),
            outcome: &self.outcome,
            detail: self.detail.as_deref(),
        }
    }
}

/// Appends an audit row inside a caller's transaction.
pub(super) fn audit_in(
    c: &Db,
    actor: &str,
    action: &str,
    target: Option<&str>,
    outcome: &str,
    detail: Option<&str>,
) -> Result<(), StoreError> {
    // Actors and details can be the world's text (a chat user's id, a step's error).
    use crate::text::storable;
    let (actor, action, outcome) = (storable(actor), storable(action), storable(outcome));
    let (actor, action, outcome) = (&*actor, &*action, &*outcome);
    let target = target.map(storable);
    let target = target.as_deref();
    let detail = detail.map(storable);
    let detail = detail.as_deref();
    let at = crate::time::now_ms();
    if let Db::Pg(conn) = c {
        // Appended at commit, with the batch's others (see `append_pending`).
        conn.borrow_mut().audit.push(Pending {
            at,
            actor: actor.to_string(),
            action: action.to_string(),
            target: target.map(str::to_string),
            outcome: outcome.to_string(),
            detail: detail.map(str::to_string),
        });
        return Ok(());
    }
    // SQLite: one writer, so the head is read and moved within this write.
    let (prev, id): (Vec<u8>, i64) = c.one(
        "SELECT last_hash, last_id + 1 FROM audit_heads WHERE chain = 0",
        &[],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let hash = Content {
        id,
        at,
        actor,
        action,
        target,
        outcome,
        detail,
    }
    .hash(&prev);
    c.exec(
        "INSERT INTO audit (id, at, actor, action, target, outcome, detail, prev, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        &[
            &id, &at, &actor, &action, &target, &outcome, &detail, &prev, &hash,
        ],
    )?;
    c.exec(
        "UPDATE audit_heads SET last_id = ?1, last_hash = ?2 WHERE chain = 0",
        &[&id, &hash],
    )?;
    Ok(())
}

/// An audit row waiting for its transaction's commit (PostgreSQL).
#[derive(Debug)]
pub(super) struct Pending {
    at: i64,
    actor: String,
    action: String,
    target: Option<String>,
    outcome: String,
    detail: Option<String>,
}

/// Appends a PostgreSQL transaction's audit rows, just before it commits, to one chain: the
/// first no other transaction holds, from this connection's own on (its head locked with
/// `SKIP LOCKED`), or, should every chain be held, its own once free. The ids are taken under
/// that lock (so ids follow the chain), every row goes in one statement, the head is moved.
/// One round trip a batch (the lock and the ids, two statements pipelined; the rows and the
/// head go with the `COMMIT`), none when the batch wrote no audit row.
///
/// The ids are a statement of their own, after the lock's: a subquery of the locking
/// statement would run before the row is locked (PostgreSQL projects below its `LockRows`),
/// so a transaction waiting for the head would hold ids older than those of the one ahead of
/// it.
pub(super) fn append_pending(c: &Db) -> Result<(), StoreError> {
    let Db::Pg(conn) = c else { return Ok(()) };
    let rows = std::mem::take(&mut conn.borrow_mut().audit);
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len() as i64;
    const FREE: &str = "SELECT chain, last_hash FROM audit_heads
                        ORDER BY chain < $1, chain LIMIT 1 FOR UPDATE SKIP LOCKED";
    const OWN: &str = "SELECT chain, last_hash FROM audit_heads WHERE chain = $1 FOR UPDATE";
    // Counted by a recursive query, not `generate_series`: the planner sizes the latter by
    // its argument, so a plan made for the count at hand was always cheaper than the kept
    // one, and the statement was planned again at every commit (38 µs of 60).
    const IDS: &str = "WITH RECURSIVE n(i) AS (SELECT 1::bigint UNION ALL SELECT i + 1 FROM n WHERE i < $1::bigint)
           SELECT array_agg(v ORDER BY v) FROM (SELECT nextval('audit_id_seq') AS v FROM n) s";
    let head = |rows: &[postgres::Row]| -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        (rows.first())
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .transpose()
    };
    let ids_of = |rows: &[postgres::Row]| -> Result<Vec<i64>, StoreError> {
        Ok(rows.first().ok_or(StoreError::NoRow)?.try_get(0)?)
    };
    let (chain, mut prev, ids) = {
        let mut pg = conn.borrow_mut();
        let own = pg.audit_chain;
        pg.prefetch(FREE, &[&own], Keys::Any)?;
        pg.prefetch(IDS, &[&n], Keys::Any)?;
        let free = head(&pg.query(FREE, &[&own])?)?;
        let ids = ids_of(&pg.query(IDS, &[&n])?)?;
        match free {
            Some((chain, prev)) => (chain, prev, ids),
            None => {
                // Every chain held: those ids were taken under no lock, so they are left
                // unused (a gap) and taken again under this one.
                let (chain, prev) = head(&pg.query(OWN, &[&own])?)?.ok_or(StoreError::NoRow)?;
                (chain, prev, ids_of(&pg.query(IDS, &[&n])?)?)
            }
        }
    };
    let mut cols = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut prevs, mut hashes) = (Vec::new(), Vec::new());
    for (row, id) in rows.iter().zip(&ids) {
        let hash = Content {
            id: *id,
            at: row.at,
            actor: &row.actor,
            action: &row.action,
            target: row.target.as_deref(),
            outcome: &row.outcome,
            detail: row.detail.as_deref(),
        }
        .hash(&prev);
        prevs.push(std::mem::replace(&mut prev, hash.clone()));
        hashes.push(hash);
        cols.0.push(row.at);
        cols.1.push(row.actor.as_str());
        cols.2.push(row.action.as_str());
        cols.3.push((row.target.as_deref(), row.outcome.as_str()));
        cols.4.push(row.detail.as_deref());
    }
    let (targets, outcomes): (Vec<Option<&str>>, Vec<&str>) = cols.3.into_iter().unzip();
    // The rows and the head go with the COMMIT, in its round trip.
    let mut pg = conn.borrow_mut();
    pg.queue(
        "INSERT INTO audit (id, at, actor, action, target, outcome, detail, prev, hash, chain)
         SELECT *, $10::bigint FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[],
                                   $5::text[], $6::text[], $7::text[], $8::bytea[], $9::bytea[])",
        &[
            &ids, &cols.0, &cols.1, &cols.2, &targets, &outcomes, &cols.4, &prevs, &hashes, &chain,
        ],
        Keys::Any,
    )?;
    drop(pg);
    let last = *ids.last().expect("one id a row");
    c.later(
        "UPDATE audit_heads SET last_id = ?1, last_hash = ?2 WHERE chain = ?3",
        &[&last, &prev, &chain],
    )?;
    Ok(())
}

/// Chains the rows of a store made before the chain (once, when it opens): each row's hash in
/// id order from [`GENESIS`], then the head. Deterministic, so two replicas doing it at once
/// write the same values; a store already chained is left alone.
pub(super) fn seal_existing(c: &Db) -> Result<u64, StoreError> {
    if c.row("SELECT 1 FROM audit_heads WHERE chain = 0", &[], |_| Ok(()))?
        .is_some()
    {
        return Ok(0);
    }
    let (mut prev, mut last, mut sealed) = (GENESIS.to_vec(), 0_i64, 0);
    loop {
        let rows = Stored::page_after(c, last)?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            let hash = row.content().hash(&prev);
            c.exec(
                "UPDATE audit SET prev = ?2, hash = ?3 WHERE id = ?1",
                &[&row.id, &prev, &hash],
            )?;
            (prev, last, sealed) = (hash, row.id, sealed + 1);
        }
    }
    c.exec(
        "INSERT INTO audit_heads (chain, last_id, last_hash, anchor_id, anchor_hash)
         VALUES (0, ?1, ?2, 0, ?3) ON CONFLICT (chain) DO NOTHING",
        &[&last, &prev, &GENESIS.as_slice()],
    )?;
    Ok(sealed)
}

/// What `reflex audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    /// Rows checked.
    pub rows: u64,
    /// The oldest and newest row checked.
    pub first: Option<i64>,
    /// The newest row checked.
    pub last: Option<i64>,
    /// The last row retention deleted (0: none), whose hash the oldest row kept follows.
    pub anchor: i64,
    /// The first row that does not check out, and why; `None`: the chain is intact.
    pub broken: Option<Broken>,
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Broken {
    /// The row (for a deletion at the end: the chain's head).
    pub id: i64,
    /// What is wrong with it.
    pub why: String,
}

/// Walks the chain from its anchor to its head, in one read transaction (one moment's rows,
/// while the daemon goes on writing).
pub(super) fn verify_chain(c: &Db) -> Result<ChainReport, StoreError> {
    c.batch(match c.is_pg() {
        true => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        false => "BEGIN",
    })?;
    let report = walk_chain(c);
    c.batch("ROLLBACK")?;
    report
}

/// Where a chain's walk stands: its last row checked (at first, its anchor) and that row's
/// hash; its head and its anchor, as `audit_heads` has them.
struct Walk {
    prev_id: i64,
    prev: Vec<u8>,
    head_id: i64,
    head_hash: Vec<u8>,
    anchor: i64,
}

impl Walk {
    fn behind(&self) -> String {
        match self.prev_id {
            id if id == self.anchor && id == 0 => "the start of its chain".to_string(),
            id if id == self.anchor => format!("row {id}, the last one retention deleted"),
            id => format!("row {id}"),
        }
    }
}

fn walk_chain(c: &Db) -> Result<ChainReport, StoreError> {
    let heads = c.rows(
        "SELECT chain, last_id, last_hash, anchor_id, anchor_hash FROM audit_heads ORDER BY chain",
        &[],
        |r| {
            Ok((
                r.get::<i64>(0)?,
                Walk {
                    head_id: r.get(1)?,
                    head_hash: r.get(2)?,
                    prev_id: r.get(3)?,
                    prev: r.get(4)?,
                    anchor: r.get(3)?,
                },
            ))
        },
    )?;
    if !heads.iter().any(|(chain, _)| *chain == 0) {
        return Err(StoreError::Config(
            "this store has no audit chain yet: start reflex on it once".into(),
        ));
    }
    let mut chains: std::collections::BTreeMap<i64, Walk> = heads.into_iter().collect();
    let mut report = ChainReport {
        rows: 0,
        first: None,
        last: None,
        anchor: chains.values().map(|w| w.anchor).max().unwrap_or(0),
        broken: None,
    };
    let mut after = 0;
    loop {
        let rows = Stored::page_after(c, after)?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            after = row.id;
            report.rows += 1;
            report.first.get_or_insert(row.id);
            report.last = Some(row.id);
            let broken = |why: String| Some(Broken { id: row.id, why });
            let Some(walk) = chains.get_mut(&row.chain) else {
                report.broken = broken(format!(
                    "it names chain {}, which has no head: written by hand",
                    row.chain
                ));
                return Ok(report);
            };
            let (Some(stored_prev), Some(hash)) = (&row.prev, &row.hash) else {
                report.broken = broken(
                    "it has no hash: written by hand, or by a replica older than the chain".into(),
                );
                return Ok(report);
            };
            if row.content().hash(stored_prev) != *hash {
                report.broken = broken(
                    "it was changed after it was written: its content does not match its hash"
                        .into(),
                );
                return Ok(report);
            }
            if *stored_prev != walk.prev {
                report.broken = broken(format!(
                    "it does not follow {}: a row between them was deleted, or that one was rewritten",
                    walk.behind()
                ));
                return Ok(report);
            }
            (walk.prev, walk.prev_id) = (hash.clone(), row.id);
        }
    }
    for walk in chains.values() {
        if (walk.prev_id, &walk.prev) != (walk.head_id, &walk.head_hash) {
            report.broken = Some(Broken {
                id: walk.head_id,
                why: format!(
                    "its chain's head is row {}, but the chain ends at {}: the newest rows were deleted",
                    walk.head_id,
                    walk.behind()
                ),
            });
            break;
        }
    }
    Ok(report)
}

/// Which audit rows: all filters hold.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Rows with a smaller id (paging).
    pub before: Option<i64>,
    /// At most this many.
    pub limit: u32,
    /// Exactly this actor.
    pub actor: Option<String>,
    /// Actions starting with this (`killswitch` finds engage and release).
    pub action: Option<String>,
    /// At or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
}

impl Store {
    /// Appends an audit row.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: Option<String>,
        outcome: &str,
        detail: Option<String>,
    ) -> Result<(), StoreError> {
        let (actor, action, outcome) = (actor.to_string(), action.to_string(), outcome.to_string());
        self.write(move |c| {
            audit_in(
                c,
                &actor,
                &action,
                target.as_deref(),
                &outcome,
                detail.as_deref(),
            )
        })
        .await
    }

    /// The newest audit rows, newest first; `before` pages (rows with a smaller id).
    pub async fn audit_log(
        &self,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        self.audit_search(AuditFilter {
            before,
            limit,
            ..Default::default()
        })
        .await
    }

    /// Checks the audit chain (see [`verify_chain`]).
    pub async fn verify_audit(&self) -> Result<ChainReport, StoreError> {
        self.read(verify_chain).await
    }

    /// Takes (or keeps) the right to send the audit to its sink for `ttl_ms`, so one replica
    /// sends at a time; returns the id of the last row sent, or `None` while another replica
    /// holds it.
    pub async fn audit_sink_claim(&self, ttl_ms: i64) -> Result<Option<i64>, StoreError> {
        let (me, now) = (self.replica().to_string(), self.now_ms());
        self.write(move |c| {
            c.exec(
                "INSERT INTO audit_sink (one, sent_id, holder, until_ms) VALUES (1, 0, NULL, 0)
                 ON CONFLICT (one) DO NOTHING",
                &[],
            )?;
            // On SQLite this process is the only one (it holds the data dir's lock): a hold
            // left by its previous life is its own.
            let claimed = c.exec(
                "UPDATE audit_sink SET holder = ?1, until_ms = ?2 + ?3
                 WHERE one = 1 AND (holder = ?1 OR holder IS NULL OR until_ms < ?2 OR ?4)",
                &[&me, &now, &ttl_ms, &!c.is_pg()],
            )?;
            if claimed == 0 {
                return Ok(None);
            }
            c.one("SELECT sent_id FROM audit_sink WHERE one = 1", &[], |r| {
                r.get(0).map(Some)
            })
        })
        .await
    }

    /// Lets another replica send at once (at shutdown).
    pub async fn audit_sink_release(&self) -> Result<(), StoreError> {
        let me = self.replica().to_string();
        self.write(move |c| {
            c.exec(
                "UPDATE audit_sink SET holder = NULL WHERE one = 1 AND holder = ?1",
                &[&me],
            )?;
            Ok(())
        })
        .await
    }

    /// Records that the sink has every row up to `id` (if this replica still holds it).
    pub async fn audit_sink_sent(&self, id: i64) -> Result<bool, StoreError> {
        let me = self.replica().to_string();
        self.write(move |c| {
            let n = c.exec(
                "UPDATE audit_sink SET sent_id = ?2 WHERE one = 1 AND holder = ?1 AND sent_id < ?2",
                &[&me, &id],
            )?;
            Ok(n == 1)
        })
        .await
    }

    /// Up to `limit` audit rows after `id`, oldest first, none of which a later call could
    /// find an older row before: a caller that reads on from the last row it got misses none.
    ///
    /// On PostgreSQL, a transaction holding one chain may commit after another that took
    /// larger ids on another chain. So the rows are read up to the last id handed out before
    /// a wait for every chain's head to be free: ids are taken only under a chain's lock, so
    /// every transaction that took one of those ids has committed (or rolled back) by then.
    pub async fn audit_after(&self, id: i64, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        self.read(move |c| {
            let mut upto = i64::MAX;
            if c.is_pg() {
                upto = c.one("SELECT last_value FROM audit_id_seq", &[], |r| r.get(0))?;
                // In the order retention locks them in.
                c.rows(
                    "SELECT 1 FROM audit_heads ORDER BY chain FOR SHARE",
                    &[],
                    |_| Ok(()),
                )?;
            }
            c.rows(
                &format!(
                    "SELECT {} FROM audit WHERE id > ?1 AND id <= ?3 ORDER BY id LIMIT ?2",
                    Stored::COLUMNS
                ),
                &[&id, &i64::from(limit), &upto],
                entry,
            )
        })
        .await
    }

    /// Audit rows, newest first, as the filter says.
    pub async fn audit_search(&self, f: AuditFilter) -> Result<Vec<AuditEntry>, StoreError> {
        self.read(move |c| {
            c.rows(
                &format!(
                    "SELECT {} FROM audit
                     WHERE (id < ?1 OR ?1 IS NULL) AND (actor = ?3 OR ?3 IS NULL)
                       AND (substr(action, 1, length(?4)) = ?4 OR ?4 IS NULL)
                       AND (at >= ?5 OR ?5 IS NULL)
                     ORDER BY id DESC LIMIT ?2",
                    Stored::COLUMNS
                ),
                &[
                    &f.before,
                    &i64::from(f.limit),
                    &f.actor,
                    &f.action,
                    &f.since_ms,
                ],
                entry,
            )
        })
        .await
    }
}

fn entry(r: &super::db::Row) -> Result<AuditEntry, StoreError> {
    Stored::read(r).map(Stored::entry)
}
