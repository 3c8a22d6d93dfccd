//! A read-only look at a daemon's store, for `reflex simulate`: which kill switches are
//! engaged and which cooldowns are running. It takes no lock and writes nothing, so it can
//! look while the daemon runs (SQLite's WAL lets readers in beside the one writer; on
//! PostgreSQL, a read-only session).

use super::cooldown::cooldown_reason;
use super::{Db, StoreError};
use crate::time::now_ms;
use rusqlite::{Connection, OpenFlags};
use std::path::Path;

/// A read-only connection to the store.
pub struct Snapshot {
    conn: Conn,
}

enum Conn {
    Lite(Connection),
    Pg(Box<std::cell::RefCell<super::db::PgConn>>),
}

impl Snapshot {
    /// Opens `dir/reflex.db` read-only; `None` when there is no database yet.
    pub fn open(dir: &Path) -> Result<Option<Snapshot>, StoreError> {
        let path = dir.join("reflex.db");
        if !path.exists() {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.execute_batch("PRAGMA busy_timeout=5000;")?;
        Ok(Some(Snapshot {
            conn: Conn::Lite(conn),
        }))
    }

    /// The store the config names: its PostgreSQL database (`store.url`, in a read-only
    /// session), or `reflex.db` in its data directory. Blocking: not for an async runtime.
    pub fn open_config(cfg: &crate::config::Config) -> Result<Option<Snapshot>, StoreError> {
        if cfg.store.url.is_none() {
            return Self::open(&cfg.data_dir);
        }
        let settings = super::pg::Settings::from_config(&cfg.store)?;
        let mut conn = settings.connector.open(&settings.config)?;
        conn.batch_execute("SET default_transaction_read_only = on")?;
        Ok(Some(Snapshot {
            conn: Conn::Pg(Box::new(std::cell::RefCell::new(conn))),
        }))
    }

    fn with<R>(&self, f: impl FnOnce(&Db) -> R) -> R {
        match &self.conn {
            Conn::Lite(c) => f(&Db::Lite(c)),
            Conn::Pg(c) => {
                let mut conn = c.borrow_mut();
                f(&Db::Pg(std::cell::RefCell::new(&mut conn)))
            }
        }
    }

    /// Why a run of `playbook` would be held back by a kill switch now, if it would.
    pub fn kill_reason(&self, playbook: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| super::switches::engaged_reason(c, playbook, now_ms()))
    }

    /// Why a run of `playbook` for `key` would be held back by its cooldown now, if it would.
    pub fn cooldown_reason(
        &self,
        playbook: &str,
        key: &str,
        cooldown_ms: i64,
    ) -> Result<Option<String>, StoreError> {
        self.with(|c| cooldown_reason(c, playbook, key, cooldown_ms, now_ms()))
    }

    /// Checks the audit log's hash chain (see `audit::verify_chain`).
    pub fn verify_audit(&self) -> Result<super::ChainReport, StoreError> {
        self.with(super::audit::verify_chain)
    }

    /// The alerts received since `since_ms`, oldest first (for `reflex export alerts`).
    pub fn alerts_since(
        &self,
        since_ms: i64,
    ) -> Result<Vec<crate::replay::RecordedAlert>, StoreError> {
        self.with(|c| {
            c.rows(
                &format!(
                    "SELECT {}, received_at FROM alerts
                     WHERE received_at >= ?1 AND source IN ('alertmanager', 'generic') ORDER BY id",
                    super::queue::ALERT_COLUMNS
                ),
                &[&since_ms],
                |r| {
                    let (alert, _) = super::queue::alert_row(r)?;
                    Ok(crate::replay::RecordedAlert::of(&alert, r.get(10)?))
                },
            )
        })
    }
}
