//! The audit log.

use super::*;

/// An audit row, with the run it concerns when its target names one (`run/7 step/0 …`).
pub struct AuditRow {
    entry: AuditEntry,
    run: Option<i64>,
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    chrome: Chrome,
    rows: Vec<AuditRow>,
    older: Option<i64>,
}

/// Cursor of the audit log.
#[derive(Debug, Default, Deserialize)]
pub struct AuditQuery {
    before: Option<i64>,
}

/// `GET /ui/audit`
pub async fn audit(
    State(state): State<AppState>,
    viewer: Viewer,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Page, Page> {
    let Query(AuditQuery { before }) = q.map_err(ApiError::from)?;
    let rows = state.store.audit_log(before, PAGE).await?;
    let older = (rows.len() == PAGE as usize)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    let rows = rows
        .into_iter()
        .map(|entry| AuditRow {
            run: (entry.target.as_deref().unwrap_or_default().split(' '))
                .find_map(|part| part.strip_prefix("run/")?.parse().ok()),
            entry,
        })
        .collect();
    Ok(Page::render(&AuditPage {
        chrome: chrome(&state, &viewer, "audit").await?,
        rows,
        older,
    }))
}
