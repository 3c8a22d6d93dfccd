//! The append-only audit log: who did what, when, with what outcome.

use super::Db;
use super::{Store, StoreError};
use serde::Serialize;

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
    c.exec(
        "INSERT INTO audit (at, actor, action, target, outcome, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        &[&crate::time::now_ms(), &actor, &action, &target, &outcome, &detail],
    )?;
    Ok(())
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

    /// Audit rows, newest first, as the filter says.
    pub async fn audit_search(&self, f: AuditFilter) -> Result<Vec<AuditEntry>, StoreError> {
        self.read(move |c| {
            c.rows(
                "SELECT id, at, actor, action, target, outcome, detail FROM audit
                 WHERE (id < ?1 OR ?1 IS NULL) AND (actor = ?3 OR ?3 IS NULL)
                   AND (substr(action, 1, length(?4)) = ?4 OR ?4 IS NULL)
                   AND (at >= ?5 OR ?5 IS NULL)
                 ORDER BY id DESC LIMIT ?2",
                &[
                    &f.before,
                    &i64::from(f.limit),
                    &f.actor,
                    &f.action,
                    &f.since_ms,
                ],
                |r| {
                    Ok(AuditEntry {
                        id: r.get(0)?,
                        at: r.get(1)?,
                        actor: r.get(2)?,
                        action: r.get(3)?,
                        target: r.get(4)?,
                        outcome: r.get(5)?,
                        detail: r.get(6)?,
                    })
                },
            )
        })
        .await
    }
}
