//! Pending approvals, and the approve/deny form.

use super::*;

#[derive(Template)]
#[template(path = "approvals.html")]
struct ApprovalsPage {
    chrome: Chrome,
    pending: Vec<ApprovalCard>,
    decided: Vec<ApprovalCard>,
    can_approve: bool,
    csrf: String,
}

/// `GET /ui/approvals`
pub async fn approvals(State(state): State<AppState>, viewer: Viewer) -> Result<Page, Page> {
    let mut pending = Vec::new();
    let mut decided = Vec::new();
    for a in state.store.list_approvals(None, 100).await? {
        if a.state == ApprovalState::Pending {
            pending.push(ApprovalCard::from(a).with_hold(&state).await?);
        } else if decided.len() < 20 {
            decided.push(ApprovalCard::from(a));
        }
    }
    Ok(Page::render(&ApprovalsPage {
        chrome: chrome(&state, &viewer, "approvals").await?,
        pending,
        decided,
        can_approve: viewer.may(Role::Approver),
        csrf: viewer.csrf.clone(),
    }))
}

/// The approve/deny form.
#[derive(Debug, Deserialize)]
pub struct DecideForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    decision: String,
    #[serde(default)]
    comment: String,
}

/// `POST /ui/approvals/{id}/decide`: to the run's page.
pub async fn decide(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(id): Path<i64>,
    Form(form): Form<DecideForm>,
) -> Result<Response, Page> {
    viewer.check_csrf(&state, &form.csrf, "decide").await?;
    viewer.require(&state, Role::Approver, "decide").await?;
    let approve = match form.decision.as_str() {
        "approve" => true,
        "deny" => false,
        other => {
            return Err(Page::error(
                StatusCode::BAD_REQUEST,
                format!("decision must be approve or deny, not {other:?}"),
            ));
        }
    };
    let comment = Some(form.comment.trim().to_string()).filter(|c| !c.is_empty());
    let run_id = state.store.get_approval(id).await?.map(|a| a.run_id);
    // A refusal is a page with the reason, the way back and the comment as written.
    let refused = |e: ApiError| {
        let back = run_id.map(|r| format!("/ui/runs/{r}"));
        Page::refused_form(
            e.status(),
            e.to_string(),
            back.as_deref(),
            comment.as_deref(),
        )
    };
    let request = crate::api::approvals::DecisionRequest {
        id,
        who: &viewer.identity,
        approve,
        comment: comment.clone(),
        shown_hash: None,
    };
    (crate::api::approvals::decide_one(&state, request).await).map_err(refused)?;
    Ok(Redirect::to(&format!("/ui/runs/{}", run_id.unwrap_or(0))).into_response())
}
