//! The only module with SQL. One SQLite file (`reflex.db`) in WAL mode, migrated at start.
//!
//! One connection writes and one reads, each behind a mutex and used from
//! `spawn_blocking`: SQLite allows one writer at a time anyway, and WAL lets the API read
//! while the engine writes. `synchronous=FULL`: an alert answered with 200 is on disk.

mod approvals;
mod audit;
mod runs;
mod switches;

pub use approvals::*;
pub use audit::AuditEntry;
pub use runs::*;
pub use switches::*;

use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Creating the data directory or similar failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The blocking task died.
    #[error("store task failed: {0}")]
    Join(String),
}

impl StoreError {
    /// Bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            StoreError::Sqlite(_) => "sqlite",
            StoreError::Io(_) => "io",
            StoreError::Join(_) => "join",
        }
    }
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    write: Mutex<Connection>,
    read: Mutex<Connection>,
    path: PathBuf,
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
];

impl Store {
    /// Opens (creating if needed) `reflex.db` in `dir` and migrates it.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("reflex.db");
        let mut write = Connection::open(&path)?;
        write.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000;",
        )?;
        migrate(&mut write)?;
        let read = Connection::open(&path)?;
        read.execute_batch("PRAGMA busy_timeout=5000; PRAGMA query_only=ON;")?;
        Ok(Store {
            inner: Arc::new(Inner {
                write: Mutex::new(write),
                read: Mutex::new(read),
                path,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` on the writer connection, off the async runtime.
    pub async fn write<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.write.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn)
        })
        .await
        .map_err(|e| StoreError::Join(e.to_string()))?
    }

    /// Runs `f` on the reader connection, off the async runtime.
    pub async fn read<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let conn = inner.read.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn)
        })
        .await
        .map_err(|e| StoreError::Join(e.to_string()))?
    }

    /// Whether the database answers (for `/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.read(|c| Ok(c.query_row("SELECT 1", [], |_| Ok(()))?))
            .await
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let applied: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}
