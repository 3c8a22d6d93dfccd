//! The playbooks in force, and the reload form.

use super::*;

/// A playbook in force.
pub struct PlaybookRow {
    name: String,
    description: String,
    file: String,
    matchers: String,
    steps: Vec<String>,
    cooldown: String,
    dry_run: bool,
    gated: bool,
    /// Where it stands on its way to autonomy, if it earns it ("approve: 2 of 5 verified").
    autonomy: Option<String>,
    /// The last changes of its autonomy: when, what, why.
    autonomy_history: Vec<(crate::time::Timestamp, String, String)>,
}

#[derive(Template)]
#[template(path = "playbooks.html")]
struct PlaybooksPage {
    chrome: Chrome,
    playbooks: Vec<PlaybookRow>,
    failure: Option<crate::engine::ReloadFailure>,
    can_reload: bool,
}

/// `GET /ui/playbooks`
pub async fn playbooks(State(state): State<AppState>, viewer: Viewer) -> Result<Page, Page> {
    let mut autonomy = crate::api::playbooks::autonomy_views(&state).await?;
    let history = (state.store)
        .audit_search(crate::store::AuditFilter {
            limit: 200,
            action: Some("autonomy.".into()),
            ..Default::default()
        })
        .await?;
    let set = state.engine.playbooks();
    let playbooks = set
        .playbooks
        .iter()
        .map(|p| PlaybookRow {
            name: p.name.clone(),
            description: p.description.clone(),
            file: p.file.display().to_string(),
            matchers: p
                .matchers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            steps: p
                .steps
                .iter()
                .map(|s| format!("{} ({})", s.name, s.action.name()))
                .collect(),
            cooldown: crate::time::format_duration(p.cooldown),
            dry_run: p.dry_run,
            gated: p.approval.is_some() || p.steps.iter().any(|s| s.approval.is_some()),
            autonomy: autonomy.remove(&p.name).map(|a| match a.standing.level {
                crate::policy::Level::Approve => format!(
                    "needs approval: {} of {} verified runs in a row",
                    a.standing.streak, a.rules.approve_until
                ),
                crate::policy::Level::Auto => format!(
                    "acts without approval: {} verified in a row, {} of {} failed",
                    a.standing.streak, a.standing.failures, a.rules.demote_after
                ),
            }),
            autonomy_history: (history.iter())
                .filter(|r| r.target.as_deref() == Some(&format!("playbook/{}", p.name)))
                .take(5)
                .map(|r| {
                    (
                        r.at,
                        r.action.clone(),
                        format!("{} ({})", r.detail.clone().unwrap_or_default(), r.actor),
                    )
                })
                .collect(),
        })
        .collect();
    let failure = state.engine.reload_failure();
    Ok(Page::render(&PlaybooksPage {
        chrome: chrome(&state, &viewer, "playbooks").await?,
        playbooks,
        failure,
        can_reload: viewer.may(Role::Admin),
    }))
}

/// `POST /ui/playbooks/reload`: back to the playbooks, which show a refused reload's errors.
pub async fn reload(
    State(state): State<AppState>,
    viewer: Viewer,
    Form(form): Form<CsrfForm>,
) -> Result<Response, Page> {
    viewer.check_csrf(&state, &form.csrf, "reload").await?;
    viewer.require(&state, Role::Admin, "reload").await?;
    // A refused reload is recorded and shown on the page.
    let _ = state
        .reloader
        .reload(&state, "console", &viewer.identity.name)
        .await;
    Ok(Redirect::to("/ui/playbooks").into_response())
}
