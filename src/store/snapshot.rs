//! A read-only look at a daemon's store, for `reflex simulate`: which kill switches are
//! engaged and which cooldowns are running. It takes no lock and writes nothing, so it can
//! look while the daemon runs (SQLite's WAL lets readers in beside the one writer).

use super::cooldown::cooldown_reason;
use super::{Db, StoreError};
use crate::time::now_ms;
use rusqlite::{Connection, OpenFlags};
use std::path::Path;

/// A read-only connection to `reflex.db`.
pub struct Snapshot {
    conn: Connection,
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
        Ok(Some(Snapshot { conn }))
    }

    /// Why a run of `playbook` would be held back by a kill switch now, if it would.
    pub fn kill_reason(&self, playbook: &str) -> Result<Option<String>, StoreError> {
        super::switches::engaged_reason(&Db::Lite(&self.conn), playbook, now_ms())
    }

    /// Why a run of `playbook` for `key` would be held back by its cooldown now, if it would.
    pub fn cooldown_reason(
        &self,
        playbook: &str,
        key: &str,
        cooldown_ms: i64,
    ) -> Result<Option<String>, StoreError> {
        cooldown_reason(&Db::Lite(&self.conn), playbook, key, cooldown_ms, now_ms())
    }
}
