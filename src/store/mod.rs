//! The only module with SQL. Two backends behind one interface ([`db::Db`]): by default one
//! SQLite file (`reflex.db`) in WAL mode; for several replicas, a shared PostgreSQL database
//! (`store.url`, see [`pg`]). Both are migrated at start.
//!
//! One connection writes (the writer thread, with group commit) and reads go to another (a
//! pool of them on PostgreSQL), used from `spawn_blocking`: SQLite allows one writer at a time
//! anyway, and WAL lets the API read while the engine writes. `synchronous=FULL`: an alert
//! answered with 200 is on disk.

mod approvals;
mod artifacts;
mod audit;
mod autonomy;
mod breaker;
mod budgets;
mod coalesce;
mod cooldown;
pub mod db;
mod deferred;
mod intake;
mod lease;
mod lifecycle;
mod outbox;
pub mod pg;
mod queue;
mod resolution;
mod retention;
mod sessions;
mod snapshot;
mod states;
mod switches;
mod threads;
mod views;

pub use approvals::*;
pub use artifacts::{Artifact, ArtifactCaps, ArtifactInfo, Evidence};
pub use audit::{AuditEntry, AuditFilter, Broken, ChainReport};
pub use autonomy::{LevelChange, StoredStanding};
pub use breaker::{BreakerLimits, Limit, Trip};
pub use budgets::{BudgetLimit, Exceeded};
pub use intake::{Candidate, Hold, IntakeItem, Manual, Outcome, Recorded, StartNow};
pub use lease::{LEASE_EXPIRY, LEASE_RENEW, Takeover};
pub use outbox::{EndMessage, Untold};
pub use queue::{ClaimedRun, StepRecord, StepRef, StepResult};
pub use retention::{PRUNED_TABLES, Pruned};
pub use sessions::Session;
pub use snapshot::Snapshot;
pub use states::{ApprovalState, RunState, StepState};
pub use switches::*;
pub use views::{AlertView, RunFilter, RunView};

pub use db::{Db, Keys};
use rusqlite::{Connection, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed (or could not be reached).
    #[error("postgres: {}", pg::describe(.0))]
    Postgres(#[from] postgres::Error),
    /// No PostgreSQL connection could be had in time.
    #[error("postgres connection pool: {0}")]
    Pool(#[from] r2d2::Error),
    /// The run is no longer this task's to execute: its lease was taken over, it ended, or
    /// another claim of it started the step.
    #[error("run {0} is no longer this task's to execute; it acts no further")]
    LostRun(i64),
    /// The store's configuration is unusable.
    #[error("{0}")]
    Config(String),
    /// A query that must return a row returned none.
    #[error("no row where one was expected")]
    NoRow,
    /// Creating the data directory or similar failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The blocking task died.
    #[error("store task failed: {0}")]
    Join(String),
    /// The batch this write was part of could not be committed.
    #[error("commit failed: {0}")]
    Commit(String),
    /// The writer has stopped (shutdown).
    #[error("the store is closed")]
    Closed,
    /// Another process holds the data directory.
    #[error(
        "data directory {dir} is in use by another reflex process{}; one daemon per data \
         directory (replicas share PostgreSQL, never an SQLite file)",
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// The holder's pid, as it wrote it.
        holder: Option<u32>,
    },
}

impl StoreError {
    /// Whether trying again later may succeed: the database could not be reached or the
    /// transaction could not commit (not: a query or the data is wrong).
    pub fn is_transient(&self) -> bool {
        match self {
            // Connection lost, the server shutting down or restarting (classes 08 and 57),
            // or a deadlock or serialization failure (40).
            StoreError::Postgres(e) => {
                e.is_closed()
                    || e.code().is_none_or(|c| {
                        ["08", "57", "40"]
                            .iter()
                            .any(|class| c.code().starts_with(class))
                    })
            }
            StoreError::Pool(_) | StoreError::Commit(_) => true,
            _ => false,
        }
    }

    /// Bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            StoreError::Sqlite(_) => "sqlite",
            StoreError::Postgres(_) => "postgres",
            StoreError::Pool(_) => "pool",
            StoreError::NoRow => "no_row",
            StoreError::Config(_) => "config",
            StoreError::LostRun(_) => "lost_run",
            StoreError::Io(_) => "io",
            StoreError::Join(_) => "join",
            StoreError::Commit(_) => "commit",
            StoreError::Closed => "closed",
            StoreError::Locked { .. } => "locked",
        }
    }
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// Writes and commits since the store opened (a commit holds a batch of writes).
#[derive(Debug, Default)]
struct Counts {
    writes: std::sync::atomic::AtomicU64,
    commits: std::sync::atomic::AtomicU64,
    round_trips: std::sync::atomic::AtomicU64,
    statements: std::sync::atomic::AtomicU64,
}

/// Writes and commits since the store opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteCounts {
    /// Writes ([`Store::write`] calls) committed.
    pub writes: u64,
    /// Transactions committed (each one fsync with `synchronous: full`).
    pub commits: u64,
    /// Round trips to PostgreSQL the writer waited for, committed or not (0 on SQLite).
    pub round_trips: u64,
    /// Statements the writer sent to PostgreSQL (0 on SQLite).
    pub statements: u64,
}

struct Inner {
    jobs: mpsc::Sender<Job>,
    counts: Arc<Counts>,
    /// Bumped after every write that may change a kill switch.
    switch_epoch: std::sync::atomic::AtomicU64,
    /// The last intake's outcomes were all held by a kill switch or the breaker.
    intake_held: std::sync::atomic::AtomicBool,
    /// The engaged switches as of an epoch, and when they were read.
    #[allow(clippy::type_complexity)]
    switch_cache: Mutex<
        Option<(
            u64,
            std::time::Instant,
            Vec<(String, String, Option<String>, Option<i64>)>,
        )>,
    >,
    backend: Backend,
    /// This replica's lease (PostgreSQL).
    lease: lease::LeaseClock,
    /// Woken when another replica made work (PostgreSQL's `NOTIFY`).
    woken: tokio::sync::Notify,
    /// This process's name in the records (who claimed a run); on PostgreSQL, its lease.
    replica: String,
    /// What "now" is for every decision the store makes.
    clock: Arc<dyn crate::time::Clock>,
}

/// Where the rows are: what reads go to (writes go to the writer thread).
enum Backend {
    /// `reflex.db` in the data directory.
    Sqlite {
        read: Mutex<Connection>,
        path: PathBuf,
        /// The exclusive lock on the data directory, held while the store is open.
        _lock: std::fs::File,
    },
    /// A shared PostgreSQL database.
    Postgres(pg::Pool),
}

/// Takes the data directory's lock (`reflex.lock`, an advisory `flock` the kernel releases
/// when the process dies, however it dies) and writes this process's pid into it.
fn lock_dir(dir: &Path) -> Result<std::fs::File, StoreError> {
    use std::io::{Read, Seek, Write};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("reflex.lock"))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(StoreError::Locked {
                dir: dir.to_path_buf(),
                holder: text.trim().parse().ok(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    file.flush()?;
    Ok(file)
}

/// A write for the writer: what it runs, and the locks it needs (see [`Store::write_locked`]).
struct Job {
    locks: Vec<String>,
    /// Sends reads ahead of the batch's writes (see [`Store::write_ahead`]).
    ahead: Option<Box<Ahead>>,
    body: Box<dyn Body>,
}

/// What a write sends ahead: statements queued, none waited for.
type Ahead = dyn FnMut(&Db) -> Result<(), StoreError> + Send;

/// A write queued for the writer: run in a batch (perhaps twice, see [`PgCommitter`]), then
/// answered once the batch has committed or failed.
///
/// [`PgCommitter`]: pg::PgCommitter
trait Body: Send {
    /// Runs the write; whether it succeeded. A run after the first starts from a batch rolled
    /// back and replaces the answer of the one before.
    fn run(&mut self, db: &Db) -> bool;
    /// Tells the caller: the last run's answer, or the batch's error.
    fn deliver(self: Box<Self>, commit_err: Option<String>);
    /// Replaces the answer of a run that succeeded: a statement it sent without waiting
    /// failed ([`run_jobs`]).
    fn refuse(&mut self, e: StoreError);
}

/// A caller's write and where its answer goes.
struct Write<R, F> {
    f: F,
    answer: Option<Result<R, StoreError>>,
    tx: oneshot::Sender<Result<R, StoreError>>,
}

impl<R, F> Body for Write<R, F>
where
    R: Send,
    F: FnMut(&Db) -> Result<R, StoreError> + Send,
{
    fn run(&mut self, db: &Db) -> bool {
        let answer = (self.f)(db);
        let ok = answer.is_ok();
        self.answer = Some(answer);
        ok
    }

    fn refuse(&mut self, e: StoreError) {
        self.answer = Some(Err(e));
    }

    fn deliver(self: Box<Self>, commit_err: Option<String>) {
        let answer = match (commit_err, self.answer) {
            (None, Some(answer)) => answer,
            (Some(e), _) => Err(StoreError::Commit(e)),
            (None, None) => Err(StoreError::Commit(
                "the batch ended before this write ran".into(),
            )),
        };
        let _ = self.tx.send(answer);
    }
}

/// Writes queued for the writer before callers wait (backpressure).
const WRITE_QUEUE: usize = 4096;
/// Writes committed together at most: one fsync for all of them.
const MAX_BATCH: usize = 512;
/// Advisory locks a batch takes at most (PostgreSQL), counted job by job: a job that would
/// take the batch past it waits for the next batch, alone if it must. PostgreSQL's table of
/// locks is shared by every session and bounded (`max_locks_per_transaction` times the
/// connections, 6,400 by default); a transaction past it fails with "out of shared memory".
/// Intake keeps each job under it (`record_and_start`).
const MAX_BATCH_LOCKS: usize = 512;

/// A backend's side of the writer: commits a batch of writes in one transaction.
trait Committer {
    /// Runs every job (see [`run_jobs`]) in one transaction and commits it.
    fn commit(&mut self, batch: &mut [Job]) -> Result<(), String>;
    /// Housekeeping once a batch's callers have their answers.
    fn after(&mut self) {}
    /// Round trips and statements so far (PostgreSQL).
    fn traffic(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// Runs each job of a batch in the transaction `db` is in. `isolated`: each in its own
/// savepoint, so that a failed job undoes its own writes and nothing else; otherwise the
/// first failed job stops the batch (`Ok(false)`), whose transaction is then only good for a
/// rollback. A statement not waited for ([`Db::later`], PostgreSQL) that failed is seen with
/// the next statement waited for, perhaps another job's: without savepoints it stops the batch
/// the same way; with them each job's statements are answered before the next job runs (its
/// `RELEASE` waited for), so that such a failure is its own job's, and undoes only that job.
fn run_jobs(db: &Db, batch: &mut [Job], isolated: bool) -> Result<bool, StoreError> {
    for job in batch.iter_mut() {
        if !isolated {
            if !job.body.run(db) || db.later_failed() {
                return Ok(false);
            }
            continue;
        }
        db.later("SAVEPOINT job", &[])?;
        let mark = db.audit_mark();
        let mut ok = job.body.run(db);
        if ok && let Err(e) = db.exec("RELEASE SAVEPOINT job", &[]) {
            if !db.later_failed() {
                return Err(e);
            }
            job.body.refuse(e);
            ok = false;
        }
        if !ok {
            if let Err(e) = db.exec("ROLLBACK TO SAVEPOINT job", &[]) {
                if !db.later_failed() {
                    return Err(e);
                }
                // A statement of the job not waited for failed, answered with this rollback,
                // which ran all the same (each statement is its own sync); once more, surely.
                db.recovered();
                db.exec("ROLLBACK TO SAVEPOINT job", &[])?;
            }
            db.recovered();
            db.drop_audit_after(mark);
            db.forget_answers();
            db.later("RELEASE SAVEPOINT job", &[])?;
        }
    }
    Ok(true)
}

/// A writer: group commit. It takes every write that is waiting, runs them in one transaction
/// (see [`run_jobs`]), commits once (one fsync), then answers them all. Under load this turns
/// thousands of small transactions into a few large ones; idle, a write commits alone at once.
/// SQLite has one writer; PostgreSQL `store.writers`, which take what is waiting in turn.
fn writer(jobs: Arc<Mutex<mpsc::Receiver<Job>>>, counts: Arc<Counts>, mut backend: impl Committer) {
    // What this writer's connection had sent when last counted.
    let mut counted = (0, 0);
    // A job taken that would have taken its batch past the locks' bound: the next batch's.
    let mut held: Option<Job> = None;
    loop {
        let mut batch = match held.take() {
            // It goes now, with what else waits unless another writer is taking that (which
            // may wait there for the next write to come: this one must not).
            Some(first) => {
                let mut batch = vec![first];
                let taking = match jobs.try_lock() {
                    Ok(jobs) => Some(jobs),
                    Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                    Err(std::sync::TryLockError::WouldBlock) => None,
                };
                if let Some(mut jobs) = taking {
                    held = fill(&mut jobs, &mut batch);
                }
                batch
            }
            None => {
                // One writer at a time takes what is waiting; the others commit meanwhile.
                let mut jobs = jobs.lock().unwrap_or_else(|p| p.into_inner());
                let Some(first) = jobs.blocking_recv() else {
                    return;
                };
                let mut batch = vec![first];
                held = fill(&mut jobs, &mut batch);
                batch
            }
        };
        let err = backend.commit(&mut batch).err();
        {
            use std::sync::atomic::Ordering::Relaxed;
            let (trips, statements) = backend.traffic();
            counts.round_trips.fetch_add(trips - counted.0, Relaxed);
            counts.statements.fetch_add(statements - counted.1, Relaxed);
            counted = (trips, statements);
            if err.is_none() {
                counts.writes.fetch_add(batch.len() as u64, Relaxed);
                counts.commits.fetch_add(1, Relaxed);
            }
        }
        if let Some(e) = &err {
            tracing::error!(error = %e, writes = batch.len(), "store batch failed; its writes are reported failed");
        }
        for job in batch {
            job.body.deliver(err.clone());
        }
        backend.after();
    }
}

/// Adds what waits to `batch`, up to [`MAX_BATCH`] writes and [`MAX_BATCH_LOCKS`] locks; the
/// write that would have taken it past the locks, taken already, is returned.
fn fill(jobs: &mut mpsc::Receiver<Job>, batch: &mut Vec<Job>) -> Option<Job> {
    let mut locks: usize = batch.iter().map(|j| j.locks.len()).sum();
    while batch.len() < MAX_BATCH {
        match jobs.try_recv() {
            Ok(job) if locks + job.locks.len() > MAX_BATCH_LOCKS => return Some(job),
            Ok(job) => {
                locks += job.locks.len();
                batch.push(job);
            }
            Err(_) => break,
        }
    }
    None
}

/// SQLite's side of the writer.
struct LiteCommitter {
    conn: Connection,
    /// Set by the checkpointer: rewind the WAL after this batch.
    rewind: Arc<std::sync::atomic::AtomicBool>,
    /// Dropped with the writer: the checkpointer ends.
    _checkpointer: std::sync::mpsc::Sender<()>,
}

impl Committer for LiteCommitter {
    fn commit(&mut self, batch: &mut [Job]) -> Result<(), String> {
        let tx = (self.conn)
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| e.to_string())?;
        // Savepoints cost SQLite next to nothing: every job in its own. In the order of
        // PostgreSQL's batches: the jobs that send reads ahead last (see `pg::attempt`).
        batch.sort_by_key(|j| j.ahead.is_some());
        run_jobs(&Db::Lite(&tx), batch, true).map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| e.to_string())
    }

    fn after(&mut self) {
        if self
            .rewind
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            let restarted = (self.conn).query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()));
            if let Err(e) = restarted {
                tracing::warn!(error = %e, "WAL restart failed; the next one retries");
            }
        }
    }
}

/// How often the checkpointer copies the WAL's committed pages into the database file.
const CHECKPOINT_EVERY: std::time::Duration =
    std::time::Duration::from_millis(if cfg!(test) { 10 } else { 100 });
/// WAL frames (pages) past which the writer rewinds the WAL: a sustained load never leaves a
/// moment for a passive checkpoint to finish, and the file would grow without bound.
const WAL_RESTART_FRAMES: i64 = if cfg!(test) { 64 } else { 8192 };

/// Checkpoints the WAL on its own connection, so that the writer does not copy pages back
/// itself (it has `wal_autocheckpoint` off). Passive checkpoints run alongside the writer;
/// past [`WAL_RESTART_FRAMES`] it asks the writer (`rewind`) to finish the copy between two
/// batches and rewind the log, which is cheap by then. Ends when the writer does (its sender
/// drops).
fn checkpointer(
    conn: Connection,
    writer_gone: std::sync::mpsc::Receiver<()>,
    rewind: Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::mpsc::RecvTimeoutError;
    let run = |mode: &str| -> rusqlite::Result<(i64, i64)> {
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
            Ok((r.get(1)?, r.get(2)?))
        })
    };
    while let Err(RecvTimeoutError::Timeout) = writer_gone.recv_timeout(CHECKPOINT_EVERY) {
        match run("PASSIVE") {
            Ok((log, _)) if log > WAL_RESTART_FRAMES => {
                rewind.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed; retrying"),
        }
    }
}

/// Schema migrations, applied in order; `PRAGMA user_version` counts the applied ones.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE alerts (
  id INTEGER PRIMARY KEY,
  received_at INTEGER NOT NULL,
  source TEXT NOT NULL,
  fingerprint TEXT NOT NULL,
  status TEXT NOT NULL,
  starts_at TEXT NOT NULL,
  ends_at TEXT,
  labels TEXT NOT NULL,
  annotations TEXT NOT NULL,
  generator_url TEXT,
  group_key TEXT
);
CREATE TABLE runs (
  id INTEGER PRIMARY KEY,
  playbook TEXT NOT NULL,
  alert_id INTEGER NOT NULL REFERENCES alerts(id),
  fingerprint TEXT NOT NULL,
  starts_at TEXT NOT NULL,
  alert_status TEXT NOT NULL,
  cooldown_key TEXT NOT NULL,
  state TEXT NOT NULL,
  reason TEXT,
  dry_run INTEGER NOT NULL DEFAULT 0,
  params TEXT NOT NULL DEFAULT '{}',
  created_at INTEGER NOT NULL,
  started_at INTEGER,
  finished_at INTEGER,
  error TEXT
);
-- One run per playbook and alert occurrence: the database enforces dedup.
CREATE UNIQUE INDEX runs_dedup ON runs(playbook, fingerprint, starts_at, alert_status);
CREATE INDEX runs_cooldown ON runs(playbook, cooldown_key, created_at);
CREATE INDEX runs_state ON runs(state, id);
CREATE TABLE steps (
  run_id INTEGER NOT NULL REFERENCES runs(id),
  idx INTEGER NOT NULL,
  name TEXT NOT NULL,
  action TEXT NOT NULL,
  args TEXT NOT NULL,
  timeout_ms INTEGER,
  on_failure TEXT NOT NULL,
  state TEXT NOT NULL,
  started_at INTEGER,
  finished_at INTEGER,
  output TEXT,
  error TEXT,
  PRIMARY KEY (run_id, idx)
) WITHOUT ROWID;
CREATE TABLE audit (
  id INTEGER PRIMARY KEY,
  at INTEGER NOT NULL,
  actor TEXT NOT NULL,
  action TEXT NOT NULL,
  target TEXT,
  outcome TEXT NOT NULL,
  detail TEXT
);
"#,
    r#"
ALTER TABLE runs ADD COLUMN target TEXT NOT NULL DEFAULT '';
ALTER TABLE runs ADD COLUMN deadline_ms INTEGER;
CREATE INDEX runs_target ON runs(target, state);
CREATE INDEX runs_fingerprint ON runs(fingerprint, state);
CREATE INDEX runs_created ON runs(created_at);
ALTER TABLE steps ADD COLUMN approval TEXT;
CREATE TABLE approvals (
  id INTEGER PRIMARY KEY,
  run_id INTEGER NOT NULL REFERENCES runs(id),
  step_idx INTEGER NOT NULL,
  scope TEXT NOT NULL,
  state TEXT NOT NULL,
  action TEXT NOT NULL,
  action_hash TEXT NOT NULL,
  required INTEGER NOT NULL,
  allowed TEXT NOT NULL DEFAULT '[]',
  approvals TEXT NOT NULL DEFAULT '[]',
  created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  decided_at INTEGER,
  decided_by TEXT,
  comment TEXT,
  UNIQUE (run_id, step_idx)
);
CREATE INDEX approvals_state ON approvals(state, expires_at);
-- Kill switches: scope 'global' or 'playbook:<name>'.
CREATE TABLE switches (
  scope TEXT PRIMARY KEY,
  engaged INTEGER NOT NULL,
  reason TEXT,
  actor TEXT NOT NULL,
  changed_at INTEGER NOT NULL,
  until INTEGER
);
"#,
    r#"
-- 'main', or 'on_failure' for the steps run when the run fails.
ALTER TABLE steps ADD COLUMN phase TEXT NOT NULL DEFAULT 'main';
"#,
    r#"
-- Microsecond timestamps: when the webhook arrived, when a step started (latency figures).
ALTER TABLE alerts ADD COLUMN received_us INTEGER;
ALTER TABLE steps ADD COLUMN started_us INTEGER;
"#,
    r#"
-- Partial indexes over the few runs in a live state: a run changes state several times, and
-- full indexes on `state` rewrote index pages at every change (measured: most of the write
-- volume under load). Each of these holds only the runs the engine looks for.
DROP INDEX runs_state;
DROP INDEX runs_target;
DROP INDEX runs_fingerprint;
CREATE INDEX runs_pending ON runs(id) WHERE state = 'pending';
CREATE INDEX runs_running ON runs(target) WHERE state = 'running';
CREATE INDEX runs_running_alert ON runs(fingerprint, playbook) WHERE state = 'running';
CREATE INDEX runs_waiting ON runs(fingerprint) WHERE state = 'awaiting_approval';
-- Only runs of playbooks with a cooldown carry a cooldown key ('' otherwise).
DROP INDEX runs_cooldown;
CREATE INDEX runs_cooldown ON runs(playbook, cooldown_key, created_at) WHERE cooldown_key != '';
"#,
    r#"
-- When the run's alert resolved while the run was executing: it stops before its next step
-- (unless its playbook says `on_resolve: continue`).
ALTER TABLE runs ADD COLUMN resolved_at INTEGER;
-- A resolution ends the pending runs of its alert: found by fingerprint among the few pending.
CREATE INDEX runs_pending_alert ON runs(fingerprint) WHERE state = 'pending';
"#,
    r#"
-- The queue by target: how many runs of each target wait and run, kept by triggers on every
-- change of a run's state or target, so that a claim looks at the targets with work and room
-- (and each one's oldest pending run) instead of walking the pending runs: its cost does not
-- grow with a backlog on one target. Rows of targets with nothing live are removed.
CREATE TABLE target_load (
  target TEXT PRIMARY KEY,
  pending INTEGER NOT NULL DEFAULT 0,
  running INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
INSERT INTO target_load (target, pending, running)
  SELECT target, sum(state = 'pending'), sum(state = 'running') FROM runs
  WHERE state IN ('pending', 'running') GROUP BY target;
CREATE INDEX runs_pending_target ON runs(target, id) WHERE state = 'pending';
CREATE TRIGGER target_load_insert AFTER INSERT ON runs
  WHEN NEW.state IN ('pending', 'running')
BEGIN
  INSERT INTO target_load (target, pending, running)
    VALUES (NEW.target, NEW.state = 'pending', NEW.state = 'running')
    ON CONFLICT (target) DO UPDATE SET pending = pending + (NEW.state = 'pending'),
                                       running = running + (NEW.state = 'running');
END;
CREATE TRIGGER target_load_update AFTER UPDATE OF state, target ON runs
  WHEN (OLD.state != NEW.state OR OLD.target != NEW.target)
   AND (OLD.state IN ('pending', 'running') OR NEW.state IN ('pending', 'running'))
BEGIN
  UPDATE target_load SET pending = pending - (OLD.state = 'pending'),
                         running = running - (OLD.state = 'running')
    WHERE target = OLD.target;
  INSERT INTO target_load (target, pending, running)
    SELECT NEW.target, NEW.state = 'pending', NEW.state = 'running'
    WHERE NEW.state IN ('pending', 'running')
    ON CONFLICT (target) DO UPDATE SET pending = pending + (NEW.state = 'pending'),
                                       running = running + (NEW.state = 'running');
  DELETE FROM target_load WHERE target = OLD.target AND pending <= 0 AND running <= 0;
END;
"#,
    // 8: runs an operator asked for (manual triggers and retries) say who, and which run a
    // retry repeats.
    r#"
ALTER TABLE runs ADD COLUMN triggered_by TEXT;
ALTER TABLE runs ADD COLUMN retry_of INTEGER;
"#,
    // 9: console sessions. Only a digest of the cookie is kept, and a digest of the token's
    // digest; the role is looked up from the tokens in force on every request, so removing a
    // token, or changing its secret, ends its sessions.
    r#"
CREATE TABLE sessions (
  id_hash BLOB PRIMARY KEY,
  name TEXT NOT NULL,
  token BLOB NOT NULL,
  csrf TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX runs_target ON runs(target, id);
"#,
    // 10: which process claimed a run (on PostgreSQL, whose lease covers it).
    r#"
ALTER TABLE runs ADD COLUMN owner TEXT;
"#,
    // 11: the chat thread each sink keeps a run's messages in.
    r#"
CREATE TABLE chat_threads (
  sink TEXT NOT NULL,
  run_id INTEGER NOT NULL,
  thread TEXT NOT NULL,
  PRIMARY KEY (sink, run_id)
) WITHOUT ROWID;
"#,
    // 12: alerts accepted but not planned within their webhook's budget (see `deferred`).
    r#"
CREATE TABLE deferred_alerts (
  id INTEGER PRIMARY KEY,
  alert TEXT NOT NULL,
  received_us INTEGER NOT NULL,
  created_at INTEGER NOT NULL
);
"#,
    // 13: a run that failed because a step was refused before acting (a host outside the
    // inventory, a namespace not allowed): the breaker counts those per playbook.
    r#"
ALTER TABLE runs ADD COLUMN refused INTEGER NOT NULL DEFAULT 0;
"#,
    // 14: a playbook's limit on its runs executing at once, copied to each run (0: none),
    // and the count it is checked against.
    r#"
ALTER TABLE runs ADD COLUMN concurrency INTEGER NOT NULL DEFAULT 0;
CREATE INDEX runs_running_playbook ON runs(playbook) WHERE state = 'running';
"#,
    // 15: the run an undo takes back.
    r#"
ALTER TABLE runs ADD COLUMN undo_of INTEGER;
"#,
    // 16: what steps produced besides their output (a graph, a log): deleted with their run.
    r#"
CREATE TABLE artifacts (
  run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
  name TEXT NOT NULL,
  step_idx INTEGER NOT NULL,
  content_type TEXT NOT NULL,
  size INTEGER NOT NULL,
  data BLOB NOT NULL,
  PRIMARY KEY (run_id, name)
) WITHOUT ROWID;
"#,
    // 17: retention finds an ended run's approvals, and the alerts no run refers to, by index.
    r#"
CREATE INDEX runs_alert ON runs(alert_id);
CREATE INDEX approvals_run ON approvals(run_id);
"#,
    // 18: the audit log's hash chain (see `audit`), and how far the audit sink has sent it.
    r#"
ALTER TABLE audit ADD COLUMN prev BLOB;
ALTER TABLE audit ADD COLUMN hash BLOB;
CREATE TABLE audit_chain (
  one INTEGER PRIMARY KEY CHECK (one = 1),
  last_id INTEGER NOT NULL,
  last_hash BLOB NOT NULL,
  anchor_id INTEGER NOT NULL,
  anchor_hash BLOB NOT NULL
);
CREATE TABLE audit_sink (
  one INTEGER PRIMARY KEY CHECK (one = 1),
  sent_id INTEGER NOT NULL,
  holder TEXT,
  until_ms INTEGER NOT NULL
);
"#,
    // 19: dry runs are shadow runs (one concept, one name).
    r#"
UPDATE runs SET state = 'shadow' WHERE state = 'dry_run';
UPDATE steps SET state = 'shadow' WHERE state = 'dry_run';
"#,
    // 20: blast-radius budgets: one row a use, within its budget's window (see `budgets`).
    r#"
CREATE TABLE budget_use (
  budget TEXT NOT NULL,
  at INTEGER NOT NULL,
  run_id INTEGER NOT NULL,
  step_idx INTEGER NOT NULL
);
CREATE INDEX budget_use_at ON budget_use(budget, at);
"#,
    // 21: where each playbook stands on its way to autonomy (see `autonomy`).
    r#"
CREATE TABLE autonomy (
  playbook TEXT PRIMARY KEY,
  level TEXT NOT NULL,
  streak INTEGER NOT NULL,
  failures INTEGER NOT NULL,
  changed_at INTEGER
);
"#,
    // 22: no counts kept by target. The queue's rules count a target's runs executing in
    // `runs_running` and find the targets with pending runs by skipping through
    // `runs_pending_target`, so a run's change of state costs no trigger. Each index of the
    // runs executing serves only lookups by its key (`key IS NOT NULL` in its predicate, which
    // a condition on the key implies): while all of them are small, as in a new database's
    // first storm, PostgreSQL's planner found a scan of any one as cheap as a lookup, and
    // kept the plan that walked every running run of the playbook for each alert.
    r#"
DROP TRIGGER target_load_insert;
DROP TRIGGER target_load_update;
DROP TABLE target_load;
DROP INDEX runs_running;
CREATE INDEX runs_running ON runs(target) WHERE state = 'running' AND target IS NOT NULL;
DROP INDEX runs_running_alert;
CREATE INDEX runs_running_alert ON runs(fingerprint, playbook)
  WHERE state = 'running' AND fingerprint IS NOT NULL;
DROP INDEX runs_running_playbook;
CREATE INDEX runs_running_playbook ON runs(playbook) WHERE state = 'running' AND playbook IS NOT NULL;
"#,
    // 23: the audit log in chains (see `audit`): each head a row of `audit_heads`, each row
    // naming its chain. SQLite's one writer appends to chain 0 only; PostgreSQL's replicas
    // append to whichever chain no other transaction holds.
    r#"
CREATE TABLE audit_heads (
  chain INTEGER PRIMARY KEY,
  last_id INTEGER NOT NULL,
  last_hash BLOB NOT NULL,
  anchor_id INTEGER NOT NULL,
  anchor_hash BLOB NOT NULL
);
INSERT INTO audit_heads SELECT 0, last_id, last_hash, anchor_id, anchor_hash FROM audit_chain;
DROP TABLE audit_chain;
ALTER TABLE audit ADD COLUMN chain INTEGER NOT NULL DEFAULT 0;
"#,
    // 24: a run's end message and its request for approval until the chat sinks have them (see `outbox`).
    r#"
CREATE TABLE outbox (
  run_id INTEGER NOT NULL,
  event TEXT NOT NULL,
  owner TEXT,
  created_at INTEGER NOT NULL,
  summary TEXT,
  report TEXT,
  approval_id INTEGER,
  PRIMARY KEY (run_id, event)
);
"#,
];

impl Store {
    /// Opens (creating if needed) `reflex.db` in `dir` and migrates it.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Self::open_with(dir, crate::config::Synchronous::Full)
    }

    /// Opens with a durability setting (see [`crate::config::Synchronous`]).
    pub fn open_with(dir: &Path, sync: crate::config::Synchronous) -> Result<Store, StoreError> {
        Self::open_with_clock(dir, sync, Arc::new(crate::time::SystemClock))
    }

    /// Opens with a clock of the caller's (tests move it by hand).
    pub fn open_with_clock(
        dir: &Path,
        sync: crate::config::Synchronous,
        clock: Arc<dyn crate::time::Clock>,
    ) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir)?;
        let lock = lock_dir(dir)?;
        let path = dir.join("reflex.db");
        let mut write = Connection::open(&path)?;
        write.execute_batch(
            "PRAGMA busy_timeout=5000; PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA cache_size=-8192; PRAGMA temp_store=MEMORY;",
        )?;
        if sync == crate::config::Synchronous::Normal {
            write.execute_batch("PRAGMA synchronous=NORMAL;")?;
        }
        // Pages retention frees go back to the file system (see `retention`): incremental
        // auto-vacuum, which a store made before it needs one VACUUM to take up.
        let auto_vacuum: i64 = write.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
        if auto_vacuum != 2 {
            tracing::info!(store = %path.display(), "setting up incremental auto-vacuum (once)");
            write.execute_batch("PRAGMA auto_vacuum=INCREMENTAL; VACUUM;")?;
        }
        migrate(&mut write)?;
        {
            let tx = write.transaction()?;
            audit::seal_existing(&Db::Lite(&tx))?;
            tx.commit()?;
        }
        keep_plans(&write)?;
        // Checkpoints happen on their own thread (see `checkpointer`).
        write.execute_batch("PRAGMA wal_autocheckpoint=0;")?;
        let checkpoints = Connection::open(&path)?;
        checkpoints.execute_batch("PRAGMA busy_timeout=5000;")?;
        let read = Connection::open(&path)?;
        read.execute_batch("PRAGMA busy_timeout=5000; PRAGMA query_only=ON;")?;
        keep_plans(&read)?;
        let (writer_alive, writer_gone) = std::sync::mpsc::channel();
        let rewind = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let asked = rewind.clone();
        std::thread::Builder::new()
            .name("reflex-store-ckpt".into())
            .spawn(move || checkpointer(checkpoints, writer_gone, asked))?;
        let committer = LiteCommitter {
            conn: write,
            rewind,
            _checkpointer: writer_alive,
        };
        let backend = Backend::Sqlite {
            read: Mutex::new(read),
            path,
            _lock: lock,
        };
        Self::start(vec![committer], backend, pg::default_replica(), clock)
    }

    /// Starts the writer thread on a backend.
    fn start<C: Committer + Send + 'static>(
        committers: Vec<C>,
        backend: Backend,
        replica: String,
        clock: Arc<dyn crate::time::Clock>,
    ) -> Result<Store, StoreError> {
        let (jobs, rx) = mpsc::channel(WRITE_QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let counts = Arc::new(Counts::default());
        for committer in committers {
            let (rx, writer_counts) = (rx.clone(), counts.clone());
            std::thread::Builder::new()
                .name("reflex-store-writer".into())
                .spawn(move || writer(rx, writer_counts, committer))?;
        }
        Ok(Store {
            inner: Arc::new(Inner {
                jobs,
                counts,
                switch_epoch: std::sync::atomic::AtomicU64::new(0),
                intake_held: std::sync::atomic::AtomicBool::new(false),
                switch_cache: Mutex::new(None),
                backend,
                lease: lease::LeaseClock::default(),
                woken: tokio::sync::Notify::new(),
                replica,
                clock,
            }),
        })
    }

    /// Opens the store the configuration names: PostgreSQL when `store.url` is set, else
    /// SQLite in the data directory.
    pub async fn open_config(cfg: &crate::config::Config) -> Result<Store, StoreError> {
        match &cfg.store.url {
            Some(_) => {
                let settings = pg::Settings::from_config(&cfg.store)?;
                Self::open_pg(settings, Arc::new(crate::time::SystemClock)).await
            }
            None => Self::open_with(&cfg.data_dir, cfg.store.synchronous),
        }
    }

    /// Connects to PostgreSQL and migrates it.
    pub async fn open_pg(
        settings: pg::Settings,
        clock: Arc<dyn crate::time::Clock>,
    ) -> Result<Store, StoreError> {
        // The blocking client connects off the async runtime.
        tokio::task::spawn_blocking(move || {
            let pool = pg::connect(&settings)?;
            let committers = (0..settings.writers.max(1))
                .map(|_| pg::PgCommitter::new(&settings, clock.clone()))
                .collect();
            let store = Self::start(committers, Backend::Postgres(pool), settings.replica, clock)?;
            let inner = Arc::downgrade(&store.inner);
            pg::listen(settings.config, settings.connector, move |woke| {
                let Some(inner) = inner.upgrade() else {
                    return false;
                };
                if woke {
                    (inner.switch_epoch).fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    inner.woken.notify_one();
                }
                true
            })?;
            Ok(store)
        })
        .await
        .map_err(|e| StoreError::Join(e.to_string()))?
    }

    /// Where the store is, for the log: the SQLite file, or the PostgreSQL server.
    pub fn describe(&self) -> String {
        match &self.inner.backend {
            Backend::Sqlite { path, .. } => path.display().to_string(),
            Backend::Postgres(pool) => pool.describe(),
        }
    }

    /// Resolves when another replica has made work (a run to claim, room on a target); never
    /// on SQLite. A wake-up that comes while nobody waits is kept for the next waiter.
    pub async fn woken(&self) {
        self.inner.woken.notified().await
    }

    /// This process's name in the records (and its lease on PostgreSQL).
    pub fn replica(&self) -> &str {
        &self.inner.replica
    }

    /// Whether the store is PostgreSQL (shared by replicas).
    pub fn is_shared(&self) -> bool {
        matches!(self.inner.backend, Backend::Postgres(_))
    }

    /// Milliseconds since the epoch, by the store's clock.
    pub fn now_ms(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    /// Writes waiting for the writer (not yet taken into a batch).
    pub fn queued_writes(&self) -> usize {
        self.inner.jobs.max_capacity() - self.inner.jobs.capacity()
    }

    /// Runs `f` in a transaction of its own: on PostgreSQL on a pooled connection, beside the
    /// writer's batches (for a decision that takes a lock of its own, so the writer's batches
    /// never wait on it); on SQLite in the one writer. Committed when `f` returns `Ok`.
    pub(super) async fn exclusive<R, F>(&self, mut f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnMut(&Db) -> Result<R, StoreError> + Send + 'static,
    {
        if self.path().is_some() {
            return self.write(f).await;
        }
        self.read(move |c| {
            c.drop_audit_after(0);
            c.batch("BEGIN")?;
            let done = f(c).and_then(|r| {
                audit::append_pending(c)?;
                c.batch("COMMIT")?;
                Ok(r)
            });
            if done.is_err() {
                c.drop_audit_after(0);
                let _ = c.batch("ROLLBACK");
            }
            done
        })
        .await
    }

    /// Writes and commits since the store opened.
    pub fn write_counts(&self) -> WriteCounts {
        use std::sync::atomic::Ordering::Relaxed;
        WriteCounts {
            writes: self.inner.counts.writes.load(Relaxed),
            commits: self.inner.counts.commits.load(Relaxed),
            round_trips: self.inner.counts.round_trips.load(Relaxed),
            statements: self.inner.counts.statements.load(Relaxed),
        }
    }

    /// The SQLite file (`None` on PostgreSQL).
    pub fn path(&self) -> Option<&Path> {
        match &self.inner.backend {
            Backend::Sqlite { path, .. } => Some(path),
            Backend::Postgres(_) => None,
        }
    }

    /// Runs `f` in the writer, inside a transaction shared with other writes (group commit);
    /// returns once the transaction is committed. An `Err` from `f` undoes what `f` did and
    /// nothing else.
    pub async fn write<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnMut(&Db) -> Result<R, StoreError> + Send + 'static,
    {
        self.write_locked(Vec::new(), f).await
    }

    /// As [`Store::write`], holding the named locks (on PostgreSQL, advisory locks shared by
    /// the replicas; nothing on SQLite, whose one writer holds everything) from before `f`
    /// runs until its batch commits. Every lock a batch needs is taken at its start, once, in
    /// one order (by key), so that replicas' batches never wait for each other in a cycle.
    pub async fn write_locked<R, F>(&self, locks: Vec<String>, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnMut(&Db) -> Result<R, StoreError> + Send + 'static,
    {
        self.send_job(locks, None, f).await
    }

    /// As [`Store::write_locked`], with `ahead` run first on PostgreSQL: before any write of
    /// the batch, every job's `ahead` queues the reads (and inserts whose answer stands) that
    /// its write will ask, so that the batch's first round trip carries them all. `f` must
    /// come to the same answers whether `ahead` ran or not (it does not when the batch is run
    /// again job by job, see [`pg::PgCommitter`]).
    pub(super) async fn write_ahead<R, A, F>(
        &self,
        locks: Vec<String>,
        ahead: A,
        f: F,
    ) -> Result<R, StoreError>
    where
        R: Send + 'static,
        A: FnMut(&Db) -> Result<(), StoreError> + Send + 'static,
        F: FnMut(&Db) -> Result<R, StoreError> + Send + 'static,
    {
        self.send_job(locks, Some(Box::new(ahead)), f).await
    }

    async fn send_job<R, F>(
        &self,
        locks: Vec<String>,
        ahead: Option<Box<Ahead>>,
        f: F,
    ) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnMut(&Db) -> Result<R, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let body = Box::new(Write {
            f,
            answer: None,
            tx,
        });
        self.inner
            .jobs
            .send(Job { locks, ahead, body })
            .await
            .map_err(|_| StoreError::Closed)?;
        // No answer: the writer is gone (shutdown) with the write still queued.
        rx.await.map_err(|_| match self.inner.jobs.is_closed() {
            true => StoreError::Closed,
            false => StoreError::Commit("the batch failed before this write ran".into()),
        })?
    }

    /// Runs `f` on a reader connection, off the async runtime.
    pub async fn read<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Db) -> Result<R, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || match &inner.backend {
            Backend::Sqlite { read, .. } => {
                let conn = read.lock().unwrap_or_else(|p| p.into_inner());
                f(&Db::Lite(&conn))
            }
            Backend::Postgres(pool) => {
                let mut conn = pool.get()?;
                f(&Db::Pg(std::cell::RefCell::new(&mut *conn)))
            }
        })
        .await
        .map_err(|e| StoreError::Join(e.to_string()))?
    }

    /// Whether the database answers (for `/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.read(|c| c.one("SELECT 1", &[], |_| Ok(()))).await
    }
}

/// Prepared statements keep their plan whatever values are bound, and the cache holds every
/// statement the store uses. By default SQLite marks a statement for a new plan when a
/// filter's bound value might change its estimate, and rusqlite clears the bindings of every
/// statement it puts back in its cache, which then throws such a plan away: the coalescing
/// query was compiled again on every alert (a seventh of the writer's time at full load).
/// The store's queries have one good plan each, chosen by their indexes.
fn keep_plans(conn: &Connection) -> Result<(), StoreError> {
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(())
}

/// More than the distinct statements of the store's writer and readers.
const STATEMENT_CACHE: usize = 128;

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let applied: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if applied > MIGRATIONS.len() as i64 {
        return Err(StoreError::Config(format!(
            "the store's schema is version {applied}, newer than this build of reflex knows \
             (version {}): run the newer reflex, or restore a backup made by this version",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// Copies the SQLite store in `dir` to `to` while a daemon may be using it: SQLite's online
/// backup, in one step, so the copy is the database as of one moment (every transaction
/// committed before it began, none after). `to` must not exist. Returns the schema version
/// copied.
pub fn backup(dir: &Path, to: &Path) -> Result<i64, StoreError> {
    let from = dir.join("reflex.db");
    if !from.exists() {
        return Err(StoreError::Config(format!(
            "there is no store at {}",
            from.display()
        )));
    }
    if to.exists() {
        return Err(StoreError::Config(format!(
            "{} exists: a backup never overwrites a file",
            to.display()
        )));
    }
    let src = Connection::open_with_flags(&from, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    src.busy_timeout(std::time::Duration::from_secs(5))?;
    let mut dst = Connection::open(to)?;
    {
        use rusqlite::backup::{Backup, StepResult};
        let copy = Backup::new(&src, &mut dst)?;
        // Every page in one step: one read transaction, so one moment's database. A writer
        // holding the lock just then is waited for, a bounded number of times.
        let mut busy = 0;
        loop {
            match copy.step(-1)? {
                StepResult::Done => break,
                StepResult::More => {}
                _ if busy < 100 => {
                    busy += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                _ => {
                    return Err(StoreError::Config(
                        "the store stayed locked for 5 s; try the backup again".into(),
                    ));
                }
            }
        }
    }
    let version: i64 = dst.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let check: String = dst.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if check != "ok" {
        return Err(StoreError::Config(format!(
            "the copy does not check out: {check}"
        )));
    }
    Ok(version)
}

/// JSON text of a value, for a column.
pub(super) fn json_text(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

pub(super) fn parse_json(s: Option<String>) -> serde_json::Value {
    s.and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
pub(crate) mod tests;
