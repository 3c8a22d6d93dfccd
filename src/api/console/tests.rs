//! The console in process: sessions, CSRF, roles, escaping and the live stream, through the
//! router with a cookie kept by hand. The real browser drives it in the suite
//! (`tests/suite/console.rs`).

use crate::api::tests::{TestApi, wait_state};
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::json;
use tower::ServiceExt;

/// A browser's view of the console: its cookies, and the CSRF token of its last page.
pub(crate) struct Browser<'a> {
    api: &'a TestApi,
    cookies: Vec<(String, String)>,
}

/// An answer: status, headers, body text.
pub(crate) struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn location(&self) -> &str {
        self.headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The value of the first hidden `csrf` field.
    pub(crate) fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .expect("a csrf field")
            + 19;
        self.body[at..].split('"').next().unwrap().to_string()
    }
}

impl<'a> Browser<'a> {
    pub(crate) fn new(api: &'a TestApi) -> Browser<'a> {
        Browser {
            api,
            cookies: Vec::new(),
        }
    }

    /// The `Cookie` header it sends.
    pub(crate) fn cookie_header(&self) -> String {
        let jar: Vec<String> = (self.cookies.iter())
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        jar.join("; ")
    }

    async fn send(&mut self, method: Method, path: &str, form: Option<&[(&str, &str)]>) -> Answer {
        let mut req = Request::builder().method(method).uri(path);
        if !self.cookies.is_empty() {
            req = req.header(header::COOKIE, self.cookie_header());
        }
        let body = match form {
            Some(pairs) => {
                req = req.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
                let mut s = form_urlencoded::Serializer::new(String::new());
                s.extend_pairs(pairs);
                s.finish()
            }
            None => String::new(),
        };
        let resp = (self.api.router.clone())
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        for set in resp.headers().get_all(header::SET_COOKIE) {
            let set = set.to_str().unwrap();
            let (name, rest) = set.split_once('=').unwrap();
            let value = rest.split(';').next().unwrap();
            self.cookies.retain(|(k, _)| k != name);
            if !set.contains("Max-Age=0") {
                self.cookies.push((name.to_string(), value.to_string()));
            }
        }
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    pub(crate) async fn get(&mut self, path: &str) -> Answer {
        self.send(Method::GET, path, None).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Answer {
        self.send(Method::POST, path, Some(form)).await
    }

    /// Logs in with `<role>-token`.
    pub(crate) async fn login(&mut self, role: &str) -> Answer {
        let page = self.get("/ui/login?next=/ui/approvals").await;
        let token = format!("{role}-token");
        let csrf = page.csrf();
        let answer = (self.post(
            "/ui/login",
            &[
                ("token", &token),
                ("csrf", &csrf),
                ("next", "/ui/approvals"),
            ],
        ))
        .await;
        assert_eq!(answer.status, StatusCode::SEE_OTHER, "{}", answer.body);
        answer
    }
}

async fn approval_of(api: &TestApi, run_id: i64) -> crate::store::ApprovalView {
    let all = api.store.list_approvals(None, 100).await.unwrap();
    all.into_iter().find(|a| a.run_id == run_id).unwrap()
}

#[tokio::test]
async fn login_gives_a_strict_http_only_session_cookie_and_the_tokens_role() {
    let api = TestApi::new().await;
    let mut b = Browser::new(&api);
    let answer = b.login("approver").await;
    assert_eq!(answer.location(), "/ui/approvals");
    let set: Vec<&str> = (answer.headers.get_all(header::SET_COOKIE).iter())
        .map(|v| v.to_str().unwrap())
        .collect();
    let session = set
        .iter()
        .find(|c| c.starts_with("reflex_session="))
        .unwrap();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(session.contains(flag), "{session} lacks {flag}");
    }
    // Only a digest of the cookie is stored.
    let cookie = &b
        .cookies
        .iter()
        .find(|(k, _)| k == "reflex_session")
        .unwrap()
        .1;
    let stored: Vec<u8> = api
        .store
        .read(|c| c.one("SELECT id_hash FROM sessions", &[], |r| r.get(0)))
        .await
        .unwrap();
    assert_ne!(stored, cookie.as_bytes());
    assert_eq!(stored, super::session::digest(cookie).to_vec());
    let page = b.get("/ui/runs").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body
            .contains(r#"<span id="who">approver</span> <span class="role">approver</span>"#)
    );
    assert!(
        page.headers[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
}

#[tokio::test]
async fn a_page_without_a_session_sends_to_the_login_and_back() {
    let api = TestApi::new().await;
    let mut b = Browser::new(&api);
    let answer = b.get("/ui/runs?state=failed").await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER);
    assert_eq!(
        answer.location(),
        "/ui/login?next=%2Fui%2Fruns%3Fstate%3Dfailed"
    );
    let forged = b.get("/ui/runs").await;
    assert_eq!(forged.status, StatusCode::SEE_OTHER);
    b.cookies.push(("reflex_session".into(), "0".repeat(64)));
    assert_eq!(b.get("/ui/runs").await.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn a_bad_login_gets_no_session() {
    let api = TestApi::new().await;
    let mut b = Browser::new(&api);
    // A wrong token: 401, the form again.
    let page = b.get("/ui/login").await;
    let csrf = page.csrf();
    let wrong = b
        .post("/ui/login", &[("token", "nope"), ("csrf", &csrf)])
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(wrong.body.contains("Unknown token."));
    // A form that did not come from the login page (no cookie): 403.
    b.cookies.clear();
    let forged = b
        .post("/ui/login", &[("token", "admin-token"), ("csrf", &csrf)])
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    // A webhook token cannot use the console.
    let page = b.get("/ui/login").await;
    let csrf = page.csrf();
    let hook = b
        .post("/ui/login", &[("token", "webhook-token"), ("csrf", &csrf)])
        .await;
    assert_eq!(hook.status, StatusCode::FORBIDDEN);
    assert!(!b.cookies.iter().any(|(k, _)| k == "reflex_session"));
    let (sessions, refused): (i64, i64) = api
        .store
        .read(|c| {
            c.one(
                "SELECT (SELECT count(*) FROM sessions),
                   (SELECT count(*) FROM audit WHERE action = 'console login' AND outcome = 'refused')",
                &[],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .await
        .unwrap();
    assert_eq!(sessions, 0);
    // One source in one window: one row now, the count when the window closes.
    assert_eq!(refused, 1);
    assert_eq!(
        api.refused_count(&["unauthenticated", "cross_origin", "forbidden"]),
        3
    );
}

#[tokio::test]
async fn a_form_without_the_session_csrf_token_changes_nothing() {
    let api = TestApi::new().await;
    let run_id = api.start_gated().await;
    let approval = approval_of(&api, run_id).await;
    let mut b = Browser::new(&api);
    b.login("admin").await;
    let path = format!("/ui/approvals/{}/decide", approval.id);
    for csrf in ["", "0123", &"a".repeat(64)] {
        let answer = b
            .post(&path, &[("csrf", csrf), ("decision", "approve")])
            .await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{csrf:?}");
        assert!(answer.body.contains("CSRF"), "{}", answer.body);
    }
    let engage = b
        .post(
            "/ui/killswitch",
            &[("scope", "global"), ("action", "engage"), ("reason", "x")],
        )
        .await;
    assert_eq!(engage.status, StatusCode::FORBIDDEN);
    assert_eq!(approval_of(&api, run_id).await.state.as_str(), "pending");
    let switches = api.store.switches().await.unwrap();
    assert!(switches.iter().all(|s| !s.engaged));
    // Another site's page posting with the browser's cookies is refused before that.
    let req = Request::builder()
        .method(Method::POST)
        .uri(&path)
        .header(header::ORIGIN, "https://evil.example")
        .header(header::HOST, "127.0.0.1:9095")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from("decision=approve"))
        .unwrap();
    let resp = api.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(approval_of(&api, run_id).await.state.as_str(), "pending");
    // Each refusal is counted: the three forms without their token, the engage, the foreign
    // page (the one source's first is on the audit log, the rest counted there later).
    assert_eq!(api.refused_count(&["cross_origin"]), 5);
    let audited: i64 = (api.store)
        .read(|c| {
            c.one(
                "SELECT count(*) FROM audit WHERE outcome = 'refused'",
                &[],
                |r| r.get(0),
            )
        })
        .await
        .unwrap();
    assert_eq!(audited, 1);
}

#[tokio::test]
async fn a_viewer_sees_no_buttons_and_cannot_post() {
    let api = TestApi::new().await;
    let run_id = api.start_gated().await;
    let approval = approval_of(&api, run_id).await;
    let mut b = Browser::new(&api);
    b.login("viewer").await;
    for path in [
        "/ui/approvals".to_string(),
        format!("/ui/runs/{run_id}"),
        "/ui/killswitch".into(),
        "/ui/playbooks".into(),
    ] {
        let page = b.get(&path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}");
        // The only form a viewer gets is the logout.
        assert_eq!(
            page.body.matches("<form method=\"post\"").count(),
            1,
            "{path}: {}",
            page.body
        );
    }
    let page = b.get("/ui/approvals").await;
    assert!(
        page.body
            .contains(&format!("id=\"approval-{}\"", approval.id))
    );
    let csrf = page.csrf();
    let path = format!("/ui/approvals/{}/decide", approval.id);
    let answer = b
        .post(&path, &[("csrf", &csrf), ("decision", "approve")])
        .await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(answer.body.contains("the viewer role cannot do this"));
    assert_eq!(approval_of(&api, run_id).await.state.as_str(), "pending");
}

#[tokio::test]
async fn an_approver_approves_in_the_console_and_the_run_goes_on() {
    let api = TestApi::new().await;
    let run_id = api.start_gated().await;
    let approval = approval_of(&api, run_id).await;
    let mut b = Browser::new(&api);
    b.login("approver").await;
    let page = b.get("/ui/approvals").await;
    // Exactly what will be done: the target and the rendered step.
    assert!(page.body.contains("acting on h1"), "{}", page.body);
    let csrf = page.csrf();
    let path = format!("/ui/approvals/{}/decide", approval.id);
    let answer = b
        .post(
            &path,
            &[
                ("csrf", &csrf),
                ("decision", "approve"),
                ("comment", "disk is full"),
            ],
        )
        .await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER, "{}", answer.body);
    assert_eq!(answer.location(), format!("/ui/runs/{run_id}"));
    wait_state(&api, run_id, "succeeded").await;
    let decided = approval_of(&api, run_id).await;
    assert_eq!(decided.decided_by.as_deref(), Some("approver"));
    assert_eq!(decided.comment.as_deref(), Some("disk is full"));
    // A second click is a clear conflict, not a second decision.
    let again = b
        .post(&path, &[("csrf", &csrf), ("decision", "deny")])
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert!(again.body.contains("already approved"), "{}", again.body);
}

#[tokio::test]
async fn alert_text_is_escaped_on_every_page() {
    let api = TestApi::new().await;
    let evil = "<script>alert(1)</script>\"'&";
    let body = json!({"labels": {"alertname": "Note", "instance": evil}, "annotations": {"summary": evil}});
    let out = api.post_alert(&body.to_string()).await;
    let run_id = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
    let mut b = Browser::new(&api);
    b.login("viewer").await;
    for path in [
        format!("/ui/runs/{run_id}"),
        "/ui/runs".into(),
        format!("/ui/runs?target={}", "%3Cscript%3E"),
    ] {
        let page = b.get(&path).await;
        assert_eq!(page.status, StatusCode::OK);
        assert!(
            !page.body.contains("<script>alert"),
            "{path}: {}",
            page.body
        );
    }
    let page = b.get(&format!("/ui/runs/{run_id}")).await;
    assert!(
        page.body
            .contains("&#60;script&#62;alert(1)&#60;/script&#62;")
            || page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{}",
        page.body
    );
}

#[tokio::test]
async fn the_kill_switch_is_engaged_and_released_from_the_console() {
    let api = TestApi::new().await;
    let mut b = Browser::new(&api);
    b.login("admin").await;
    let page = b.get("/ui/killswitch").await;
    let csrf = page.csrf();
    let engage = [
        ("csrf", csrf.as_str()),
        ("scope", "global"),
        ("action", "engage"),
        ("reason", "db failover"),
        ("for", "2h"),
    ];
    let answer = b.post("/ui/killswitch", &engage).await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER, "{}", answer.body);
    let global = api
        .store
        .switches()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.scope == "global")
        .unwrap();
    assert!(global.engaged);
    assert_eq!(global.actor.as_deref(), Some("admin"));
    assert!(global.until.is_some());
    // Every page says so.
    let runs = b.get("/ui/runs").await;
    assert!(
        runs.body
            .contains("Global kill switch engaged by admin: db failover")
    );
    // An engagement without a reason is refused with the API's message.
    let no_reason = [
        ("csrf", csrf.as_str()),
        ("scope", "note"),
        ("action", "engage"),
        ("reason", " "),
    ];
    let refused = b.post("/ui/killswitch", &no_reason).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(refused.body.contains("a reason is required"));
    let release = [
        ("csrf", csrf.as_str()),
        ("scope", "global"),
        ("action", "release"),
        ("reason", ""),
    ];
    assert_eq!(
        b.post("/ui/killswitch", &release).await.status,
        StatusCode::SEE_OTHER
    );
    assert!(api.no_switch_engaged().await);
    // An approver sees the switch but cannot throw it.
    let mut approver = Browser::new(&api);
    approver.login("approver").await;
    let csrf = approver.get("/ui/killswitch").await.csrf();
    let engage = [
        ("csrf", csrf.as_str()),
        ("scope", "global"),
        ("action", "engage"),
        ("reason", "x"),
    ];
    assert_eq!(
        approver.post("/ui/killswitch", &engage).await.status,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn a_nul_in_a_console_form_or_url_is_400_and_changes_nothing() {
    let api = TestApi::new().await;
    let mut b = Browser::new(&api);
    b.login("admin").await;
    let csrf = b.get("/ui/killswitch").await.csrf();
    let engage = [
        ("csrf", csrf.as_str()),
        ("scope", "global"),
        ("action", "engage"),
        ("reason", "db\0failover"),
    ];
    let refused = b.post("/ui/killswitch", &engage).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
    assert!(refused.body.contains("NUL character"), "{}", refused.body);
    assert!(
        refused.body.contains("<html"),
        "an HTML page: {}",
        refused.body
    );
    assert!(api.no_switch_engaged().await);
    for path in ["/ui/audit?actor=a%00b", "/ui/runs?playbook=%00"] {
        let page = b.get(path).await;
        assert_eq!(
            page.status,
            StatusCode::BAD_REQUEST,
            "{path}: {}",
            page.body
        );
        assert!(page.body.contains("NUL character"), "{path}: {}", page.body);
    }
    // The same form without the NUL goes through.
    let engage = [engage[0], engage[1], engage[2], ("reason", "db failover")];
    let answer = b.post("/ui/killswitch", &engage).await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER, "{}", answer.body);
    assert!(!api.no_switch_engaged().await);
}

#[tokio::test]
async fn logout_ends_the_session() {
    let api = TestApi::new().await;
    let mut b = Browser::new(&api);
    b.login("viewer").await;
    let old = b.cookies.clone();
    let csrf = b.get("/ui/runs").await.csrf();
    let out = b.post("/ui/logout", &[("csrf", &csrf)]).await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert!(!b.cookies.iter().any(|(k, _)| k == "reflex_session"));
    // The old cookie, replayed, is dead.
    b.cookies = old;
    assert_eq!(b.get("/ui/runs").await.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn runs_are_filtered_and_paged() {
    let api = TestApi::new().await;
    for i in 0..55 {
        let host = if i % 5 == 0 { "special" } else { "plain" };
        let body = json!({"labels": {"alertname": "Note", "instance": format!("{host}-{i}")}});
        api.post_alert(&body.to_string()).await;
    }
    let mut b = Browser::new(&api);
    b.login("viewer").await;
    let first = b.get("/ui/runs").await;
    assert_eq!(first.body.matches("<tr data-run=").count(), 50);
    assert!(first.body.contains("id=\"older\""), "an older link");
    let href_at = first.body.find("href=\"/ui/runs?before=").unwrap() + 6;
    let href = first.body[href_at..]
        .split('"')
        .next()
        .unwrap()
        .replace("&amp;", "&");
    let second = b.get(&href).await;
    assert_eq!(second.body.matches("<tr data-run=").count(), 5);
    let runs = api
        .store
        .list_runs(crate::store::RunFilter {
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let target = runs[0].target.clone();
    let one = b.get(&format!("/ui/runs?target={target}")).await;
    assert_eq!(one.body.matches("<tr data-run=").count(), 1, "{target}");
    let bad = b.get("/ui/runs?state=bogus").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn the_run_page_streams_its_changes_until_the_run_ends() {
    let api = TestApi::new().await;
    let run_id = api.start_gated().await;
    let approval = approval_of(&api, run_id).await;
    let mut b = Browser::new(&api);
    b.login("approver").await;
    let page = b.get(&format!("/ui/runs/{run_id}")).await;
    assert!(
        page.body
            .contains(&format!("data-events=\"/ui/runs/{run_id}/events\""))
    );
    let jar: Vec<String> = b.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let req = Request::builder()
        .uri(format!("/ui/runs/{run_id}/events"))
        .header(header::COOKIE, jar.join("; "))
        .body(Body::empty())
        .unwrap();
    let resp = api.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut body = resp.into_body();
    let mut text = String::new();
    let mut approved = false;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !text.contains("event: end") {
        let frame = tokio::time::timeout_at(deadline, body.frame()).await;
        let frame = frame
            .expect("the stream ends when the run does")
            .expect("more frames")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
        if !approved && text.contains("event: update") {
            assert!(text.contains("awaiting_approval"), "{text}");
            let decision = api
                .engine
                .decide(approval.id, "approver".into(), true, None)
                .await
                .unwrap();
            assert_eq!(decision, crate::store::Decision::Approved);
            approved = true;
        }
    }
    assert!(text.contains(r#""state":"succeeded""#), "{text}");
    // The stream closes after the end.
    let rest = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
        .await
        .unwrap();
    assert!(rest.is_none());
}

#[tokio::test]
async fn a_refused_reload_is_shown_with_its_errors_until_one_succeeds() {
    let api = TestApi::new().await;
    let dir = api.db.parent().unwrap().parent().unwrap().join("playbooks");
    std::fs::write(dir.join("broken.yaml"), "name: broken\nsteps: nope\n").unwrap();
    let mut b = Browser::new(&api);
    b.login("admin").await;
    let csrf = b.get("/ui/playbooks").await.csrf();
    let answer = b.post("/ui/playbooks/reload", &[("csrf", &csrf)]).await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER);
    let page = b.get("/ui/playbooks").await;
    assert!(page.body.contains("id=\"reload-error\""), "{}", page.body);
    assert!(
        page.body.contains("broken.yaml:"),
        "file:line: {}",
        page.body
    );
    // The set in force stays and is listed.
    assert!(page.body.contains("<strong>gated</strong>"));
    std::fs::remove_file(dir.join("broken.yaml")).unwrap();
    b.post("/ui/playbooks/reload", &[("csrf", &csrf)]).await;
    assert!(
        !b.get("/ui/playbooks")
            .await
            .body
            .contains("id=\"reload-error\"")
    );
    // An operator may not reload.
    let mut op = Browser::new(&api);
    op.login("operator").await;
    let csrf = op.get("/ui/playbooks").await.csrf();
    let refused = op.post("/ui/playbooks/reload", &[("csrf", &csrf)]).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn an_operator_retries_a_failed_run_from_its_page() {
    let api = TestApi::new().await;
    tokio::spawn(api.engine.clone().dispatch());
    let body = json!({"labels": {"alertname": "Flaky", "instance": "h1"}});
    let out = api.post_alert(&body.to_string()).await;
    let failed = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
    wait_state(&api, failed, "failed").await;
    // An approver sees the failure but no retry button, and cannot post one.
    let mut approver = Browser::new(&api);
    approver.login("approver").await;
    let page = approver.get(&format!("/ui/runs/{failed}")).await;
    assert!(page.body.contains("probe failed"), "{}", page.body);
    assert!(!page.body.contains("id=\"retry\""));
    let csrf = page.csrf();
    let path = format!("/ui/runs/{failed}/retry");
    assert_eq!(
        approver.post(&path, &[("csrf", &csrf)]).await.status,
        StatusCode::FORBIDDEN
    );
    // An operator retries from the start and lands on the new run.
    let mut op = Browser::new(&api);
    op.login("operator").await;
    let page = op.get(&format!("/ui/runs/{failed}")).await;
    assert!(page.body.contains("id=\"retry\""));
    let csrf = page.csrf();
    let answer = op
        .post(&path, &[("csrf", &csrf), ("from_start", "1")])
        .await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER, "{}", answer.body);
    let new_id: i64 = answer
        .location()
        .strip_prefix("/ui/runs/")
        .unwrap()
        .parse()
        .unwrap();
    let retry = wait_state(&api, new_id, "failed").await;
    assert_eq!(retry["retry_of"], failed);
    assert_eq!(retry["triggered_by"], "operator");
    assert_eq!(
        retry["steps"].as_array().unwrap().len(),
        2,
        "from the start: {retry}"
    );
    // A run that has ended cannot be cancelled: a clear 409 page.
    let ended = op
        .post(&format!("/ui/runs/{new_id}/cancel"), &[("csrf", &csrf)])
        .await;
    assert_eq!(ended.status, StatusCode::CONFLICT, "{}", ended.body);
    assert!(ended.body.contains("already ended"), "{}", ended.body);
}

#[tokio::test]
async fn under_a_kill_switch_approve_is_disabled_with_the_reason_and_a_refusal_keeps_the_comment() {
    let api = TestApi::new().await;
    let run_id = api.start_gated().await;
    let approval = approval_of(&api, run_id).await;
    api.store
        .set_switch(
            "global".into(),
            true,
            "INC-4711: bad deploy".into(),
            "op".into(),
            None,
        )
        .await
        .unwrap();
    let mut b = Browser::new(&api);
    b.login("admin").await;
    let page = b.get("/ui/approvals").await;
    assert!(
        page.body.contains(
            "Approve is disabled: kill switch (global) engaged by op: INC-4711: bad deploy"
        ),
        "{}",
        page.body
    );
    assert!(
        page.body.contains("class=\"primary approve\" disabled"),
        "{}",
        page.body
    );
    let csrf = page.csrf();
    let answer = b
        .post(
            &format!("/ui/approvals/{}/decide", approval.id),
            &[
                ("csrf", &csrf),
                ("decision", "approve"),
                ("comment", "checked the graph"),
            ],
        )
        .await;
    assert_eq!(answer.status, StatusCode::CONFLICT);
    assert!(answer.body.contains("INC-4711"), "{}", answer.body);
    assert!(
        answer.body.contains("checked the graph"),
        "the comment is kept: {}",
        answer.body
    );
    assert!(
        answer.body.contains(&format!("href=\"/ui/runs/{run_id}\"")),
        "a way back: {}",
        answer.body
    );
    assert_eq!(approval_of(&api, run_id).await.state.as_str(), "pending");
}

#[tokio::test]
async fn bidi_controls_from_an_alert_are_shown_not_obeyed_on_the_console() {
    let api = TestApi::new().await;
    let out = api
        .post_alert(
            &serde_json::json!({"labels": {"alertname": "Gated", "instance": "db-\u{202E}1tsoh"}})
                .to_string(),
        )
        .await;
    let run_id = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
    let mut b = Browser::new(&api);
    b.login("viewer").await;
    for path in [
        format!("/ui/runs/{run_id}"),
        "/ui/runs".to_string(),
        "/ui/approvals".to_string(),
    ] {
        let page = b.get(&path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}");
        assert!(!page.body.contains('\u{202E}'), "{path}: {}", page.body);
    }
    let page = b.get(&format!("/ui/runs/{run_id}")).await;
    assert!(
        page.body.contains("db-&lt;U+202E&gt;1tsoh"),
        "{}",
        page.body
    );
}

#[tokio::test]
async fn console_404s_are_pages_with_the_security_headers_and_crlf_in_next_is_400() {
    let api = TestApi::new().await;
    let resp = api
        .router
        .clone()
        .oneshot(
            Request::builder()
                .uri("/ui/nope/deeper")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let h = resp.headers();
    assert!(
        h[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(h.contains_key(header::CONTENT_SECURITY_POLICY));
    assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
    let mut b = Browser::new(&api);
    let page = b
        .get("/ui/login?next=/ui/runs%0d%0aSet-Cookie:%20x=1")
        .await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST, "{}", page.body);
    let page = b.get("/ui/login").await;
    let csrf = page.csrf();
    let answer = b
        .post(
            "/ui/login",
            &[
                ("token", "admin-token"),
                ("csrf", &csrf),
                ("next", "/ui/runs\r\nX: y"),
            ],
        )
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(!b.cookies.iter().any(|(k, _)| k == "reflex_session"));
}

#[tokio::test]
async fn under_https_the_session_cookie_has_the_host_prefix() {
    let api = TestApi::with("public_url: https://reflex.example.internal\n", "").await;
    let mut b = Browser::new(&api);
    let page = b.get("/ui/login").await;
    let csrf = page.csrf();
    let answer = b
        .post("/ui/login", &[("token", "admin-token"), ("csrf", &csrf)])
        .await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER, "{}", answer.body);
    let set: Vec<String> = (answer.headers.get_all(header::SET_COOKIE).iter())
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    let session = set
        .iter()
        .find(|c| c.starts_with("__Host-reflex_session="))
        .unwrap_or_else(|| panic!("{set:?}"));
    assert!(
        session.contains("; Path=/;") && session.contains("; Secure"),
        "{session}"
    );
    // The session it names works.
    let runs = b.get("/ui/runs").await;
    assert_eq!(runs.status, StatusCode::OK);
}

#[tokio::test]
async fn live_streams_are_capped_per_session_and_end_at_logout() {
    let api = TestApi::new().await;
    let run_id = api.start_gated().await;
    let mut b = Browser::new(&api);
    b.login("viewer").await;
    let jar: Vec<String> = b.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let open = || {
        let req = Request::builder()
            .uri(format!("/ui/runs/{run_id}/events"))
            .header(header::COOKIE, jar.join("; "))
            .body(Body::empty())
            .unwrap();
        api.router.clone().oneshot(req)
    };
    let mut streams = Vec::new();
    for _ in 0..super::streams::MAX_PER_SESSION {
        let resp = open().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        streams.push(resp.into_body());
    }
    let over = open().await.unwrap();
    assert_eq!(over.status(), StatusCode::TOO_MANY_REQUESTS);
    // Logging out ends every stream of the session, within a second or so.
    let csrf = b.get("/ui/runs").await.csrf();
    b.post("/ui/logout", &[("csrf", &csrf)]).await;
    for mut body in streams {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(None) => break,
                Ok(Some(_)) => continue,
                Err(_) => panic!("a stream outlived its session"),
            }
        }
    }
    // Their places were given back: another session may open one.
    let mut other = Browser::new(&api);
    other.login("viewer").await;
    let jar: Vec<String> = other
        .cookies
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let req = Request::builder()
        .uri(format!("/ui/runs/{run_id}/events"))
        .header(header::COOKIE, jar.join("; "))
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        api.router.clone().oneshot(req).await.unwrap().status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn retry_is_not_offered_where_it_would_be_held() {
    let api = TestApi::new().await;
    tokio::spawn(api.engine.clone().dispatch());
    let out = api
        .post_alert(&json!({"labels": {"alertname": "Flaky", "instance": "h1"}}).to_string())
        .await;
    let failed = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
    wait_state(&api, failed, "failed").await;
    api.store
        .set_switch("global".into(), true, "INC-9".into(), "op".into(), None)
        .await
        .unwrap();
    let out = api
        .post_alert(&json!({"labels": {"alertname": "Note", "instance": "h2"}}).to_string())
        .await;
    let suppressed = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
    let mut b = Browser::new(&api);
    b.login("operator").await;
    let list = b.get("/ui/runs").await;
    assert!(
        list.body
            .contains("<td class=\"why\">kill switch (global) engaged by op: INC-9</td>")
            && list
                .body
                .contains("<td class=\"why\">step &#34;probe&#34; failed"),
        "the list says why: {}",
        list.body
    );
    let page = b.get(&format!("/ui/runs/{suppressed}")).await;
    assert!(page.body.contains("suppressed"), "{}", page.body);
    assert!(
        !page.body.contains("id=\"retry\""),
        "a suppressed run offers no retry"
    );
    let page = b.get(&format!("/ui/runs/{failed}")).await;
    assert!(
        page.body.contains("id=\"retry\" disabled")
            && page
                .body
                .contains("A retry would be held: kill switch (global) engaged by op: INC-9"),
        "{}",
        page.body
    );
    api.store
        .set_switch("global".into(), false, "over".into(), "op".into(), None)
        .await
        .unwrap();
    let page = b.get(&format!("/ui/runs/{failed}")).await;
    assert!(
        page.body
            .contains("<button type=\"submit\" id=\"retry\">Retry</button>"),
        "{}",
        page.body
    );
}

#[tokio::test]
async fn an_operator_undoes_a_run_from_its_page_and_lands_on_the_undo() {
    let api = TestApi::new().await;
    api.add_playbook(
        "cordon.yaml",
        "name: cordon\nmatchers: ['alertname=\"NodeBad\"']\nsteps:\n  - action: kube.cordon\n    with: { node: \"{{ labels.node }}\" }\n  - action: log\n    with: { message: cordoned }\n",
    )
    .await;
    tokio::spawn(api.engine.clone().dispatch());
    let body = json!({"labels": {"alertname": "NodeBad", "node": "n1"}});
    let out = api.post_alert(&body.to_string()).await;
    let cordoned = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
    wait_state(&api, cordoned, "succeeded").await;
    let path = format!("/ui/runs/{cordoned}/undo");
    // An approver sees no Undo and cannot post one.
    let mut approver = Browser::new(&api);
    approver.login("approver").await;
    let page = approver.get(&format!("/ui/runs/{cordoned}")).await;
    assert!(!page.body.contains("id=\"undo\""), "{}", page.body);
    let csrf = page.csrf();
    assert_eq!(
        approver.post(&path, &[("csrf", &csrf)]).await.status,
        StatusCode::FORBIDDEN
    );
    // An operator undoes it and lands on the undo run, which names the run it takes back.
    let mut op = Browser::new(&api);
    op.login("operator").await;
    let page = op.get(&format!("/ui/runs/{cordoned}")).await;
    assert!(page.body.contains("id=\"undo\""), "{}", page.body);
    let csrf = page.csrf();
    let answer = op.post(&path, &[("csrf", &csrf)]).await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER, "{}", answer.body);
    let undo_id: i64 = answer
        .location()
        .strip_prefix("/ui/runs/")
        .unwrap()
        .parse()
        .unwrap();
    let (_, run) = api
        .call(
            Method::GET,
            &format!("/api/v1/runs/{undo_id}"),
            Some("viewer-token"),
            None,
        )
        .await;
    assert_eq!(run["undo_of"], cordoned, "{run}");
    assert_eq!(run["steps"][0]["name"], "undo kube.cordon");
    assert_eq!(
        run["steps"][0]["args"]["patch"],
        json!({"spec": {"unschedulable": false}})
    );
    let page = op.get(&format!("/ui/runs/{undo_id}")).await;
    assert!(
        page.body
            .contains(&format!("Undo of</dt><dd><a href=\"/ui/runs/{cordoned}\"")),
        "{}",
        page.body
    );
    // A run with nothing to undo offers no Undo, and a post says why.
    let log_only = api
        .post_alert(&json!({"labels": {"alertname": "Note", "instance": "h1"}}).to_string())
        .await;
    let note = log_only["outcomes"][0][0]["run_id"].as_i64().unwrap();
    wait_state(&api, note, "succeeded").await;
    let page = op.get(&format!("/ui/runs/{note}")).await;
    assert!(!page.body.contains("id=\"undo\""));
    let refused = op
        .post(&format!("/ui/runs/{note}/undo"), &[("csrf", &csrf)])
        .await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.body);
    assert!(
        refused.body.contains("changed nothing that can be undone"),
        "{}",
        refused.body
    );
}
