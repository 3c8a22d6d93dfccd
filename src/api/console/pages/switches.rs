//! The kill switches, and the engage/release form.

use super::*;

/// A switch as the page shows it.
pub struct SwitchRow {
    name: String,
    engaged: bool,
    reason: Option<String>,
    actor: Option<String>,
    changed_at: Option<Timestamp>,
    until: Option<Timestamp>,
}

impl SwitchRow {
    fn new(name: String, s: Option<Switch>) -> SwitchRow {
        let s = s.unwrap_or_else(|| killswitch::released(&name));
        SwitchRow {
            name,
            engaged: s.engaged,
            reason: s.reason,
            actor: s.actor,
            changed_at: s.changed_at,
            until: s.until.filter(|_| s.engaged),
        }
    }
}

#[derive(Template)]
#[template(path = "killswitch.html")]
struct KillSwitchPage {
    chrome: Chrome,
    global: SwitchRow,
    playbooks: Vec<SwitchRow>,
    can_switch: bool,
}

/// `GET /ui/killswitch`
pub async fn killswitch(State(state): State<AppState>, viewer: Viewer) -> Result<Page, Page> {
    let current = killswitch::current(&state).await?;
    let mut names: Vec<String> = (state.engine.playbooks().playbooks.iter())
        .map(|p| p.name.clone())
        .collect();
    for s in &current.playbooks {
        if let Some(n) = s.scope.strip_prefix("playbook:")
            && !names.iter().any(|m| m == n)
        {
            names.push(n.to_string());
        }
    }
    let playbooks = names
        .into_iter()
        .map(|n| {
            let scope = playbook_scope(&n);
            let s = current.playbooks.iter().find(|s| s.scope == scope).cloned();
            SwitchRow::new(n, s)
        })
        .collect();
    Ok(Page::render(&KillSwitchPage {
        chrome: chrome(&state, &viewer, "killswitch").await?,
        global: SwitchRow::new(GLOBAL.into(), Some(current.global)),
        playbooks,
        can_switch: viewer.may(Role::Admin),
    }))
}

/// The engage/release form.
#[derive(Debug, Deserialize)]
pub struct SwitchForm {
    #[serde(default)]
    csrf: String,
    /// `global` or a playbook's name.
    #[serde(default)]
    scope: String,
    /// `engage` or `release`.
    #[serde(default)]
    action: String,
    #[serde(default)]
    reason: String,
    #[serde(default, rename = "for")]
    for_: String,
}

/// `POST /ui/killswitch`
pub async fn set_switch(
    State(state): State<AppState>,
    viewer: Viewer,
    Form(form): Form<SwitchForm>,
) -> Result<Response, Page> {
    viewer.check_csrf(&state, &form.csrf, "kill switch").await?;
    viewer.require(&state, Role::Admin, "kill switch").await?;
    let scope = if form.scope == GLOBAL {
        GLOBAL.to_string()
    } else if state.engine.playbooks().get(&form.scope).is_some() {
        playbook_scope(&form.scope)
    } else {
        return Err(ApiError::NotFound(format!("no playbook {:?}", form.scope)).into());
    };
    let engaged = match form.action.as_str() {
        "engage" => true,
        "release" => false,
        other => {
            return Err(Page::error(
                StatusCode::BAD_REQUEST,
                format!("action must be engage or release, not {other:?}"),
            ));
        }
    };
    let body = SwitchBody {
        engaged,
        reason: Some(form.reason),
        until: None,
        for_: Some(form.for_.trim().to_string()).filter(|f| !f.is_empty()),
        replace: None,
    };
    killswitch::apply(&state, &viewer.identity.name, scope, body).await?;
    Ok(Redirect::to("/ui/killswitch").into_response())
}
