//! How runs end: the final state and error, and the steps that never ran marked skipped.

use super::*;
use rusqlite::{Connection, params};

pub(super) fn finish_run(
    c: &Connection,
    run_id: i64,
    state: RunState,
    error: Option<&str>,
    now: i64,
) -> rusqlite::Result<()> {
    c.prepare_cached(
        "UPDATE runs SET state = ?2, finished_at = ?3, error = coalesce(?4, error) WHERE id = ?1",
    )?
    .execute(params![run_id, state.as_str(), now, error])?;
    c.prepare_cached("UPDATE steps SET state = 'skipped' WHERE run_id = ?1 AND state = 'pending'")?
        .execute([run_id])?;
    Ok(())
}

impl Store {
    /// Ends a run; steps not started are marked `skipped`.
    pub async fn run_finished(
        &self,
        run_id: i64,
        state: RunState,
        error: Option<String>,
    ) -> Result<(), StoreError> {
        let now = self.now_ms();
        self.write(move |c| {
            finish_run(c, run_id, state, error.as_deref(), now)?;
            Ok(())
        })
        .await
    }
}
