//! The router in process (`oneshot`, no socket, no daemon) over a real SQLite store in a temp
//! dir: the role matrix, bad input that changes nothing, and paging. Fast enough to be
//! exhaustive; the black-box suite keeps the paths that need a process.

use super::{AppState, router};
use crate::engine::Engine;
use crate::executors::Executors;
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::playbook::PlaybookSet;
use crate::store::Store;
use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sha2::Digest;
use std::sync::Arc;
use tower::ServiceExt;

const PLAYBOOK: &str = r#"
name: note
matchers: ['alertname="Note"']
steps:
  - action: log
    with: { message: "noted {{ labels.instance }}" }
"#;

const GATED: &str = r#"
name: gated
matchers: ['alertname="Gated"']
approval: { count: 1, expires: 30m }
steps:
  - action: log
    with: { message: "acting on {{ labels.instance }}" }
"#;

const FLAKY: &str = r#"
name: flaky
matchers: ['alertname="Flaky"']
steps:
  - name: first
    action: log
    with: { message: "first on {{ labels.instance }}" }
  - name: probe
    action: script
    with: { script: 'throw "probe failed"' }
"#;

const ROLES: &[&str] = &["webhook", "viewer", "approver", "operator", "admin"];

/// A router and its store, with one token per role (`<role>-token`) and one playbook.
pub(super) struct TestApi {
    pub(super) router: Router,
    /// The SQLite file, for tests that tamper with it.
    pub(super) db: std::path::PathBuf,
    pub(super) store: Store,
    /// The store's clock, moved by hand.
    clock: Arc<crate::time::ManualClock>,
    pub(super) engine: Arc<Engine>,
    /// What the router was built from.
    pub(super) state: AppState,
    _dir: tempfile::TempDir,
    _db: crate::store::tests::TestDb,
}

/// Stands in for the kube executor (which the suite tests against a fake API server): a
/// cordon that answers with the change it records, so that a run has something to undo.
struct RecordedCordon;

#[async_trait::async_trait]
impl crate::executors::Executor for RecordedCordon {
    fn validate(
        &self,
        _: &crate::executors::StepContext,
    ) -> Result<(), crate::executors::ExecError> {
        Ok(())
    }

    async fn execute(
        &self,
        ctx: &crate::executors::StepContext,
    ) -> Result<Value, crate::executors::ExecError> {
        Ok(
            json!({"node": ctx.args["node"], "before": {"unschedulable": false},
                  "after": {"unschedulable": true}, "changed": true}),
        )
    }
}

/// Stands in for `kube.logs` (tested against a fake API server in the suite): attaches a log
/// of `lines` lines of 100 bytes, one of them holding the configured credential.
struct RecordedLogs;

#[async_trait::async_trait]
impl crate::executors::Executor for RecordedLogs {
    fn validate(
        &self,
        _: &crate::executors::StepContext,
    ) -> Result<(), crate::executors::ExecError> {
        Ok(())
    }

    async fn execute(
        &self,
        ctx: &crate::executors::StepContext,
    ) -> Result<Value, crate::executors::ExecError> {
        let lines = ctx.args["lines"].as_u64().unwrap_or(1);
        let mut text: String = (0..lines).map(|i| format!("{i:>99}\n")).collect();
        text.replace_range(0..22, "token=s3cr3t-t0ken-abc");
        ctx.artifacts
            .attach("logs.txt", "text/plain; charset=utf-8", text.into_bytes());
        Ok(json!({"summary": "read"}))
    }
}

impl TestApi {
    pub(super) async fn new() -> TestApi {
        Self::with("", "").await
    }

    /// With extra config, and extra token lines (under `auth.tokens`).
    /// The store is SQLite, or PostgreSQL when `REFLEX_TEST_STORE=postgres` (scripts/test runs
    /// these tests both ways).
    pub(super) async fn with(extra: &str, extra_tokens: &str) -> TestApi {
        Self::build(extra, Some(extra_tokens)).await
    }

    /// With no tokens at all: the open API of a laptop.
    async fn open(extra: &str) -> TestApi {
        Self::build(extra, None).await
    }

    /// On PostgreSQL whatever `REFLEX_TEST_STORE` says: for what only replicas do.
    async fn on_postgres() -> TestApi {
        let db = crate::store::tests::TestDb::postgres();
        Self::build_on(db, "", Some("")).await
    }

    async fn build(extra: &str, extra_tokens: Option<&str>) -> TestApi {
        let test_db = if std::env::var("REFLEX_TEST_STORE").as_deref() == Ok("postgres") {
            crate::store::tests::TestDb::postgres()
        } else {
            crate::store::tests::TestDb::Sqlite(tempfile::tempdir().unwrap())
        };
        Self::build_on(test_db, extra, extra_tokens).await
    }

    async fn build_on(
        test_db: crate::store::tests::TestDb,
        extra: &str,
        extra_tokens: Option<&str>,
    ) -> TestApi {
        let dir = tempfile::tempdir().unwrap();
        let pb = dir.path().join("playbooks");
        std::fs::create_dir_all(&pb).unwrap();
        std::fs::write(pb.join("note.yaml"), PLAYBOOK).unwrap();
        std::fs::write(pb.join("gated.yaml"), GATED).unwrap();
        std::fs::write(pb.join("flaky.yaml"), FLAKY).unwrap();
        let tokens: String = ROLES
            .iter()
            .map(|r| {
                let hash = hex::encode(sha2::Sha256::digest(format!("{r}-token")));
                format!("    - {{ name: {r}, role: {r}, sha256: {hash} }}\n")
            })
            .collect();
        let auth = match extra_tokens {
            Some(more) => format!("auth:\n  tokens:\n{tokens}{more}"),
            None => String::new(),
        };
        let cfg = crate::config::Config::parse(&format!(
            "playbooks_dir: {}\ndata_dir: {}\n{auth}{extra}",
            pb.display(),
            dir.path().join("data").display()
        ))
        .unwrap();
        let clock = Arc::new(crate::time::ManualClock::new());
        let store = test_db.open_with_clock(clock.clone()).await;
        let playbooks = PlaybookSet::load(&[pb], &Default::default()).unwrap();
        let mut executors = Executors::from_config(&cfg, playbooks.sandbox.clone());
        let cordon = crate::playbook::actions::Action::KubeCordon;
        executors.insert(cordon, Arc::new(RecordedCordon));
        let logs = crate::playbook::actions::Action::KubeLogs;
        executors.insert(logs, Arc::new(RecordedLogs));
        let engine = Engine::new(
            store.clone(),
            playbooks,
            executors,
            &cfg,
            Arc::new(Metrics::new()),
            Notifier::default(),
            tokio_util::sync::CancellationToken::new(),
        );
        let state = AppState::new(super::Shared {
            engine: engine.clone(),
            store: store.clone(),
            max_body_bytes: cfg.intake.max_body_bytes,
            auth: Arc::new(arc_swap::ArcSwap::from_pointee(
                super::auth::Auth::from_config(&cfg.auth).unwrap(),
            )),
            reloader: Arc::new(crate::reload::Reloader::new(
                &cfg,
                tokio_util::task::TaskTracker::new(),
                engine.metrics_arc(),
            )),
            slack: (cfg.notify.slack_app.as_ref())
                .map(|a| Arc::new(super::chat::Slack::from_config(a).unwrap())),
            mattermost: (cfg.notify.mattermost_app.as_ref())
                .map(|a| Arc::new(super::chat::Mattermost::from_config(a).unwrap())),
            refusals: Default::default(),
            allowed_hosts: cfg.allowed_hosts().into(),
            throttle: Default::default(),
            streams: Arc::new(super::console::streams::Streams::new(
                cfg.server.max_connections,
            )),
        });
        TestApi {
            router: router(state.clone()),
            state,
            db: cfg.data_dir.join("reflex.db"),
            store,
            clock,
            engine,
            _dir: dir,
            _db: test_db,
        }
    }

    /// Whether every kill switch is released.
    pub(super) async fn no_switch_engaged(&self) -> bool {
        self.store
            .switches()
            .await
            .unwrap()
            .iter()
            .all(|s| !s.engaged)
    }

    /// `PUT /api/v1/killswitch` as the admin.
    pub(super) async fn put_switch(&self, body: Value) -> (StatusCode, Value) {
        let body = body.to_string();
        (self.call(
            Method::PUT,
            "/api/v1/killswitch",
            Some("admin-token"),
            Some(&body),
        ))
        .await
    }

    /// Adds a playbook file and reloads (as an admin would).
    pub(super) async fn add_playbook(&self, file: &str, yaml: &str) {
        let dir = self
            .db
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("playbooks");
        std::fs::write(dir.join(file), yaml).unwrap();
        let (status, out) = self
            .call(
                Method::POST,
                "/api/v1/playbooks/reload",
                Some("admin-token"),
                Some("{}"),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{out}");
    }

    /// Alerts waiting in `deferred_alerts`.
    async fn deferred_count(&self) -> i64 {
        (self.store)
            .read(|c| c.one("SELECT count(*) FROM deferred_alerts", &[], |r| r.get(0)))
            .await
            .unwrap()
    }

    /// Refused requests counted in `reflex_http_refused_total` under these reasons.
    pub(super) fn refused_count(&self, reasons: &[&str]) -> u64 {
        let refused = &self.engine.metrics().http_refused;
        reasons
            .iter()
            .map(|r| refused.with_label_values(&[r]).get())
            .sum()
    }

    /// One request; the status and the JSON answer (null when not JSON).
    pub(super) async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let content_type = (method != Method::GET).then_some("application/json");
        let body = body.unwrap_or("{}").as_bytes().to_vec();
        let authorization = token.map(|t| format!("Bearer {t}"));
        let authorization = authorization.as_deref();
        (self.call_raw(method, path, authorization, content_type, body)).await
    }

    /// One request with any `Authorization` header, content type and body bytes; the status
    /// and the JSON answer.
    pub(super) async fn call_raw(
        &self,
        method: Method,
        path: &str,
        authorization: Option<&str>,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(a) = authorization {
            req = req.header(header::AUTHORIZATION, a);
        }
        if let Some(c) = content_type {
            req = req.header(header::CONTENT_TYPE, c);
        }
        let req = req.body(Body::from(body)).unwrap();
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Starts the dispatcher, posts an alert for the gated playbook and waits until its run
    /// parks for approval; the run's id.
    pub(super) async fn start_gated(&self) -> i64 {
        tokio::spawn(self.engine.clone().dispatch());
        let body = json!({"labels": {"alertname": "Gated", "instance": "h1"}}).to_string();
        let out = self.post_alert(&body).await;
        let run_id = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
        wait_state(self, run_id, "awaiting_approval").await;
        run_id
    }

    /// Posts a generic alert body as the webhook; the answer.
    pub(super) async fn post_alert(&self, body: &str) -> Value {
        let path = "/api/v1/webhooks/generic";
        self.call(Method::POST, path, Some("webhook-token"), Some(body))
            .await
            .1
    }

    /// Posts an Alertmanager payload as the webhook; the status and the answer.
    async fn post_alertmanager(&self, payload: &Value) -> (StatusCode, Value) {
        let path = "/api/v1/webhooks/alertmanager";
        let body = payload.to_string();
        (self.call(Method::POST, path, Some("webhook-token"), Some(&body))).await
    }

    /// Triggers `playbook` as the holder of `token`; the status and the answer.
    async fn trigger(&self, playbook: &str, token: &str, body: &str) -> (StatusCode, Value) {
        let path = format!("/api/v1/playbooks/{playbook}/runs");
        self.call(Method::POST, &path, Some(token), Some(body))
            .await
    }

    /// Reads a path as a viewer; the answer.
    pub(super) async fn view(&self, path: &str) -> Value {
        self.call(Method::GET, path, Some("viewer-token"), None)
            .await
            .1
    }

    async fn runs(&self) -> usize {
        self.store
            .list_runs(crate::store::RunFilter {
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .len()
    }
}

/// The Alertmanager fixture, as delivered: two DiskSpaceLow alerts.
pub(super) fn disk_payload() -> Value {
    serde_json::from_str(include_str!("../../tests/fixtures/alertmanager-disk.json")).unwrap()
}

pub(super) fn alert(instance: &str) -> String {
    json!({"labels": {"alertname": "Note", "instance": instance}, "startsAt": "2026-11-23T00:00:00Z"})
        .to_string()
}

#[tokio::test]
async fn every_route_answers_each_role_as_the_role_table_says() {
    let api = TestApi::new().await;
    // (method, path, body, the lowest role allowed; webhook-only routes say "webhook").
    let routes: &[(Method, &str, Option<String>, &str)] = &[
        (
            Method::POST,
            "/api/v1/webhooks/generic",
            Some(alert("a")),
            "webhook",
        ),
        (Method::GET, "/api/v1/runs", None, "viewer"),
        (
            Method::GET,
            "/api/v1/runs/999/artifacts/x.png",
            None,
            "viewer",
        ),
        (Method::GET, "/api/v1/approvals", None, "viewer"),
        (Method::GET, "/api/v1/killswitch", None, "viewer"),
        (Method::GET, "/api/v1/playbooks", None, "viewer"),
        (Method::GET, "/api/v1/audit", None, "viewer"),
        (
            Method::POST,
            "/api/v1/approvals/999/approve",
            None,
            "approver",
        ),
        (Method::POST, "/api/v1/approvals/999/deny", None, "approver"),
        (Method::POST, "/api/v1/runs/999/cancel", None, "operator"),
        (Method::POST, "/api/v1/runs/999/retry", None, "operator"),
        (
            Method::POST,
            "/api/v1/playbooks/nope/runs",
            Some("{}".into()),
            "operator",
        ),
        (Method::POST, "/api/v1/playbooks/reload", None, "admin"),
    ];
    let rank = |r: &str| ROLES.iter().position(|x| *x == r);
    for (method, path, body, need) in routes {
        for who in [
            "none", "bad", "webhook", "viewer", "approver", "operator", "admin",
        ] {
            let token = match who {
                "none" => None,
                "bad" => Some("not-a-token".to_string()),
                role => Some(format!("{role}-token")),
            };
            let allowed = match (*need, who) {
                (_, "none" | "bad") => false,
                ("webhook", w) => w == "webhook" || w == "admin",
                (_, "webhook") => false,
                (n, w) => rank(w) >= rank(n),
            };
            let (status, answer) = api
                .call(method.clone(), path, token.as_deref(), body.as_deref())
                .await;
            let expected_refusal = if token.is_some() && who != "bad" {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::UNAUTHORIZED
            };
            if allowed {
                assert!(
                    status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                    "{method} {path} as {who}: {status} {answer}"
                );
            } else {
                assert_eq!(
                    status, expected_refusal,
                    "{method} {path} as {who}: {answer}"
                );
                assert!(answer["error"]["message"].is_string(), "{answer}");
            }
        }
    }
    // Refused mutating calls are on the record, collapsed: all came from one source (the
    // in-process caller) within one window, so one row, then one row with the count.
    let refused_rows = |audit: &Value| -> Vec<Value> {
        (audit.as_array().unwrap().iter())
            .filter(|a| a["outcome"] == "refused")
            .cloned()
            .collect()
    };
    let rows = refused_rows(&api.view("/api/v1/audit?limit=1000").await);
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let counted = api.refused_count(&["unauthenticated", "forbidden"]);
    assert!(counted >= 20, "{counted} refusals counted");
    api.clock.advance(std::time::Duration::from_millis(
        super::refusals::WINDOW_MS as u64,
    ));
    super::refusals::flush(&api.state, false).await;
    let rows = refused_rows(&api.view("/api/v1/audit?limit=1000").await);
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let summary = rows[0]["detail"].as_str().unwrap();
    assert!(
        summary.starts_with(&format!(
            "{} more refused requests from unknown",
            counted - 1
        )),
        "{summary}"
    );
}

#[tokio::test]
async fn refused_requests_with_huge_paths_cannot_fill_the_audit_log() {
    let api = TestApi::new().await;
    let rows = || async {
        let n: i64 = (api.store)
            .read(|c| c.one("SELECT count(*) FROM audit", &[], |r| r.get(0)))
            .await
            .unwrap();
        n
    };
    let before = rows().await;
    let long = format!("/api/v1/playbooks/{}/runs", "a".repeat(60_000));
    for method in [Method::POST, Method::HEAD, Method::OPTIONS, Method::PUT] {
        for _ in 0..50 {
            let (status, _) = api.call(method.clone(), &long, None, Some("{}")).await;
            assert!(status.is_client_error(), "{method}: {status}");
        }
        let (status, _) = api
            .call(method.clone(), "/api/v1/killswitch", None, Some("{}"))
            .await;
        assert!(status.is_client_error(), "{method}: {status}");
    }
    assert!(rows().await - before <= 1, "one row for the window");
    let bytes: i64 = (api.store)
        .read(|c| {
            c.one(
                "SELECT coalesce(sum(length(action) + length(coalesce(detail, ''))), 0) FROM audit",
                &[],
                |r| r.get(0),
            )
        })
        .await
        .unwrap();
    assert!(bytes < 2_000, "{bytes} bytes of audit");
}

#[tokio::test]
async fn bad_bodies_get_400_with_a_message_and_record_nothing() {
    let api = TestApi::new().await;
    let bad = [
        "{",
        "[1, 2]",
        r#"{"labels": "x"}"#,
        r#"{"labels": {"alertname": "Note"}, "colour": 1}"#,
        r#"{"labels": {"alertname": "Note"}} trailing"#,
        r#"{"labels": {"alertname": "Note", "alertname": "Other"}}"#,
        r#"{"labels": {}}"#,
        r#"{"labels": {"": "x"}}"#,
        r#"{"labels": {"alertname": "Note"}, "startsAt": "yesterday"}"#,
    ];
    for body in bad {
        let (status, answer) = api
            .call(
                Method::POST,
                "/api/v1/webhooks/generic",
                Some("webhook-token"),
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
    let (status, _) = api
        .call(
            Method::PUT,
            "/api/v1/killswitch",
            Some("admin-token"),
            Some(r#"{"engaged": "yes"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = api
        .call(
            Method::PUT,
            "/api/v1/killswitch",
            Some("admin-token"),
            Some(r#"{"engaged": true}"#),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "engaging needs a reason");
    assert_eq!(api.runs().await, 0);
    let switch = api.view("/api/v1/killswitch").await;
    assert_eq!(switch["global"]["engaged"], false);
}

/// PostgreSQL cannot store or compare text holding NUL, and SQLite can: a control body or URL
/// with one was a 503 ("retry later") on PostgreSQL only. Found by `api::fuzz`.
#[tokio::test]
async fn a_nul_in_a_url_or_control_body_is_400_on_either_store_and_changes_nothing() {
    let api = TestApi::new().await;
    api.start_gated().await;
    let approval = api.view("/api/v1/approvals").await[0]["id"]
        .as_i64()
        .unwrap();
    let runs = api.runs().await;
    let nul = "a\\u0000b";
    let refused: Vec<(Method, String, &str, String)> = vec![
        (
            Method::PUT,
            "/api/v1/killswitch".into(),
            "admin-token",
            format!(r#"{{"engaged": true, "reason": "{nul}"}}"#),
        ),
        (
            Method::PUT,
            "/api/v1/playbooks/note%00/killswitch".into(),
            "admin-token",
            r#"{"engaged": true, "reason": "r"}"#.into(),
        ),
        (
            Method::POST,
            format!("/api/v1/approvals/{approval}/approve"),
            "approver-token",
            format!(r#"{{"comment": "{nul}"}}"#),
        ),
        (
            Method::POST,
            "/api/v1/playbooks/note/runs".into(),
            "operator-token",
            format!(r#"{{"labels": {{"instance": "{nul}"}}}}"#),
        ),
        (
            Method::POST,
            "/api/v1/playbooks/note/runs".into(),
            "operator-token",
            format!(r#"{{"labels": {{"{nul}": "h"}}}}"#),
        ),
        (
            Method::GET,
            "/api/v1/audit?actor=a%00b".into(),
            "viewer-token",
            String::new(),
        ),
        (
            Method::GET,
            "/api/v1/runs?playbook=%00".into(),
            "viewer-token",
            String::new(),
        ),
        (
            Method::GET,
            "/api/v1/approvals?state=%00".into(),
            "viewer-token",
            String::new(),
        ),
    ];
    for (method, path, token, body) in refused {
        let body = (method != Method::GET).then_some(body.as_str());
        let (status, answer) = api.call(method.clone(), &path, Some(token), body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {path}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("NUL character"), "{message}");
    }
    assert!(api.no_switch_engaged().await);
    assert_eq!(api.runs().await, runs);
    let pending = api.view(&format!("/api/v1/approvals/{approval}")).await;
    assert_eq!(pending["state"], "pending", "{pending}");
    // A backslash before `u0000` is text, not a NUL: it goes through.
    let (status, answer) = api
        .put_switch(json!({"engaged": true, "reason": "path C:\\u0000"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(!api.no_switch_engaged().await);
}

/// An alert's values are data, whatever they hold: a webhook whose group key or labels hold
/// NUL is taken on either store, each NUL kept as U+FFFD. On PostgreSQL the group key's NUL
/// failed the whole webhook with 503, which Alertmanager retries without end.
#[tokio::test]
async fn an_alert_holding_nul_is_taken_with_each_nul_as_u_fffd() {
    let api = TestApi::new().await;
    let mut payload = disk_payload();
    payload["groupKey"] = json!("{}:{alertname=\"Note\u{0}\"}");
    payload["alerts"][0]["labels"] = json!({"alertname": "Note", "instance": "db\u{0}1"});
    payload["alerts"][0]["annotations"]["summary"] = json!("full\u{0}");
    let (status, answer) = api.post_alertmanager(&payload).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let run_id = answer["outcomes"][0][0]["run_id"].as_i64().unwrap();
    let run = api.view(&format!("/api/v1/runs/{run_id}")).await;
    assert_eq!(run["alert"]["labels"]["instance"], "db\u{fffd}1", "{run}");
    assert_eq!(
        run["alert"]["annotations"]["summary"], "full\u{fffd}",
        "{run}"
    );
}

#[tokio::test]
async fn runs_page_newest_first_with_a_cursor() {
    let api = TestApi::new().await;
    for i in 0..7 {
        let (status, _) = api
            .call(
                Method::POST,
                "/api/v1/webhooks/generic",
                Some("webhook-token"),
                Some(&alert(&format!("h{i}"))),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let mut seen = Vec::new();
    let mut path = "/api/v1/runs?limit=3".to_string();
    loop {
        let (status, page) = api
            .call(Method::GET, &path, Some("viewer-token"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let ids: Vec<i64> = page["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_i64().unwrap())
            .collect();
        assert!(ids.len() <= 3);
        seen.extend(ids);
        match page["next_before"].as_i64() {
            Some(before) => path = format!("/api/v1/runs?limit=3&before={before}"),
            None => break,
        }
    }
    assert_eq!(seen, vec![7, 6, 5, 4, 3, 2, 1]);
    for bad in [
        "/api/v1/runs?limit=0",
        "/api/v1/runs?limit=501",
        "/api/v1/runs?state=bogus",
        "/api/v1/runs?colour=red",
    ] {
        let (status, _) = api.call(Method::GET, bad, Some("viewer-token"), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

#[tokio::test]
async fn cross_site_and_non_json_mutations_are_refused_before_auth() {
    let api = TestApi::new().await;
    let req = |content_type: &str, origin: Option<&str>| {
        let mut r = Request::builder()
            .method(Method::PUT)
            .uri("/api/v1/killswitch")
            .header(header::AUTHORIZATION, "Bearer admin-token")
            .header(header::HOST, "reflex.internal:9095")
            .header(header::CONTENT_TYPE, content_type);
        if let Some(o) = origin {
            r = r.header(header::ORIGIN, o);
        }
        r.body(Body::from(r#"{"engaged": true, "reason": "x"}"#))
            .unwrap()
    };
    for (ct, origin, want) in [
        ("text/plain", None, StatusCode::UNSUPPORTED_MEDIA_TYPE),
        (
            "application/json",
            Some("https://evil.example"),
            StatusCode::FORBIDDEN,
        ),
        (
            "application/json",
            Some("http://reflex.internal:9095"),
            StatusCode::OK,
        ),
    ] {
        let resp = api.router.clone().oneshot(req(ct, origin)).await.unwrap();
        assert_eq!(resp.status(), want, "{ct} {origin:?}");
    }
}

#[tokio::test]
async fn a_time_boxed_kill_switch_releases_itself() {
    let api = TestApi::new().await;
    let body = json!({"engaged": true, "reason": "deploy", "for": "2h"});
    let (status, answer) = api
        .call(
            Method::PUT,
            "/api/v1/killswitch",
            Some("admin-token"),
            Some(&body.to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["global"]["engaged"], true);
    let held = api.post_alert(&alert("a")).await;
    assert_eq!(held["outcomes"][0][0]["outcome"], "suppressed", "{held}");
    api.clock.advance(std::time::Duration::from_secs(3600));
    let switch = api.view("/api/v1/killswitch").await;
    assert_eq!(switch["global"]["engaged"], true, "an hour in: {switch}");
    // Past the two hours, the switch is released by itself.
    api.clock.advance(std::time::Duration::from_secs(3601));
    let switch = api.view("/api/v1/killswitch").await;
    assert_eq!(switch["global"]["engaged"], false, "{switch}");
    let ran = api.post_alert(&alert("b")).await;
    assert_eq!(ran["outcomes"][0][0]["outcome"], "created", "{ran}");
}

#[tokio::test]
async fn a_token_from_a_file_works_and_protect_health_guards_the_health_routes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ops.token");
    std::fs::write(&file, "from-a-file\n").unwrap();
    let api = TestApi::with(
        "  protect_health: true\n",
        &format!(
            "    - {{ name: ops, role: viewer, file: {} }}\n",
            file.display()
        ),
    )
    .await;
    let (status, _) = api
        .call(Method::GET, "/api/v1/runs", Some("from-a-file"), None)
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the file's token, trailing newline trimmed"
    );
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, _) = api.call(Method::GET, path, None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        let (status, _) = api.call(Method::GET, path, Some("from-a-file"), None).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn an_approval_expires_by_the_clock_and_its_run_ends_without_acting() {
    let api = TestApi::new().await;
    let run_id = api.start_gated().await;
    assert!(
        api.store.expire_due().await.unwrap().is_empty(),
        "not yet due"
    );
    api.clock.advance(std::time::Duration::from_secs(31 * 60));
    assert_eq!(api.store.expire_due().await.unwrap(), vec![run_id]);
    let run = api.view(&format!("/api/v1/runs/{run_id}")).await;
    assert_eq!(run["state"], "expired", "{run}");
    assert_eq!(run["steps"][0]["state"], "skipped", "{run}");
}

/// The writes committed since `before`, waited for until there are `expected`: the count is
/// taken just after a write commits, so it can trail a state read through the API.
async fn writes_since(api: &TestApi, before: u64, expected: u64) -> u64 {
    for _ in 0..500 {
        let writes = api.store.write_counts().writes - before;
        if writes >= expected {
            return writes;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    api.store.write_counts().writes - before
}

/// Waits (bounded) until the run is in `state`.
pub(super) async fn wait_state(api: &TestApi, run_id: i64, state: &str) -> Value {
    let path = format!("/api/v1/runs/{run_id}");
    for _ in 0..500 {
        let run = api.view(&path).await;
        if run["state"] == state {
            return run;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("run {run_id} never reached {state}");
}

#[tokio::test]
async fn an_approval_covers_exactly_what_was_shown_and_nothing_changed_after() {
    let api = TestApi::new().await;
    let run_id = api.start_gated().await;
    // What the step would do changes after the request was made (here, behind the daemon's
    // back in its own database).
    api.store
        .write(move |c| {
            c.exec(
                "UPDATE steps SET args = '{\"message\":\"something else\"}' WHERE run_id = ?1",
                &[&run_id],
            )
        })
        .await
        .unwrap();
    let approvals = api.view("/api/v1/approvals?state=pending").await;
    let id = approvals[0]["id"].as_i64().unwrap();
    let (status, _) = api
        .call(
            Method::POST,
            &format!("/api/v1/approvals/{id}/approve"),
            Some("approver-token"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let run = wait_state(&api, run_id, "failed").await;
    assert!(
        run["error"].as_str().unwrap().contains("no longer applies"),
        "{run}"
    );
    assert_eq!(
        run["steps"][0]["output"],
        Value::Null,
        "nothing acted: {run}"
    );
}

#[tokio::test]
async fn a_plan_failure_is_counted_by_its_reason() {
    let api = TestApi::new().await;
    let body = json!({"labels": {"alertname": "Note"}}).to_string();
    let out = api.post_alert(&body).await;
    assert_eq!(out["outcomes"][0][0]["outcome"], "failed", "{out}");
    let req = Request::builder()
        .uri("/metrics")
        .body(Body::empty())
        .unwrap();
    let resp = api.router.clone().oneshot(req).await.unwrap();
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains("reflex_plan_failures_total{playbook=\"note\",reason=\"missing_value\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_new_occurrence_while_a_run_waits_in_the_queue_is_answered_coalesced() {
    // A gated run is not started at intake, and no dispatcher runs here: it stays queued.
    let api = TestApi::new().await;
    let post = |starts_at: &str| {
        json!({"labels": {"alertname": "Gated", "instance": "h1"}, "startsAt": starts_at})
            .to_string()
    };
    let first = api.post_alert(&post("2026-11-23T00:00:00Z")).await;
    let second = api.post_alert(&post("2026-11-23T00:05:00Z")).await;
    assert_eq!(first["outcomes"][0][0]["outcome"], "created", "{first}");
    assert_eq!(second["outcomes"][0][0]["outcome"], "coalesced", "{second}");
    assert_eq!(
        second["outcomes"][0][0]["run_id"],
        first["outcomes"][0][0]["run_id"]
    );
    let runs = api.view("/api/v1/runs").await;
    let states: Vec<&str> = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["coalesced", "pending"], "{runs}");
}

#[tokio::test]
async fn a_new_run_on_a_free_target_starts_in_the_intake_commit() {
    // No dispatcher runs here: only intake can have started it.
    let api = TestApi::new().await;
    let before = api.store.write_counts().writes;
    let out = api.post_alert(&alert("h1")).await;
    assert_eq!(out["outcomes"][0][0]["outcome"], "created", "{out}");
    let run_id = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
    let run = wait_state(&api, run_id, "succeeded").await;
    assert_eq!(run["steps"][0]["state"], "succeeded", "{run}");
    // One write from the webhook to the first step running, one for its result and the
    // run's end (it was five: intake, claim, step start, step result, run end).
    assert_eq!(
        writes_since(&api, before, 2).await,
        2,
        "writes for a one-step run"
    );
    let audit = api.view("/api/v1/audit").await;
    let steps: Vec<&Value> = (audit.as_array().unwrap().iter())
        .filter(|e| e["action"] == "step.log")
        .collect();
    assert_eq!(steps.len(), 1, "the step is on the audit log once: {audit}");
}

#[tokio::test]
async fn a_new_run_queued_behind_an_older_one_on_its_target_is_not_started_at_intake() {
    let api = TestApi::new().await;
    // The gated run waits in the queue of h1 (no dispatcher here to park it).
    let gated = api
        .post_alert(&json!({"labels": {"alertname": "Gated", "instance": "h1"}}).to_string())
        .await;
    let gated = gated["outcomes"][0][0]["run_id"].as_i64().unwrap();
    let behind = api.post_alert(&alert("h1")).await;
    let behind = behind["outcomes"][0][0]["run_id"].as_i64().unwrap();
    let elsewhere = api.post_alert(&alert("h2")).await;
    let elsewhere = elsewhere["outcomes"][0][0]["run_id"].as_i64().unwrap();
    wait_state(&api, elsewhere, "succeeded").await;
    for id in [gated, behind] {
        let run = api.view(&format!("/api/v1/runs/{id}")).await;
        assert_eq!(run["state"], "pending", "run {id} keeps its place: {run}");
    }
    // The dispatcher takes them in order.
    tokio::spawn(api.engine.clone().dispatch());
    wait_state(&api, gated, "awaiting_approval").await;
}

#[tokio::test]
async fn a_run_started_at_intake_is_executed_even_if_the_sender_hangs_up() {
    let api = TestApi::new().await;
    // The writer is held inside an earlier write, so the webhook's write waits in the queue.
    let (blocker, release) = crate::store::tests::hold_writer(&api.store).await;
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/webhooks/generic")
        .header(header::AUTHORIZATION, "Bearer webhook-token")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(alert("h1")))
        .unwrap();
    let request = tokio::spawn(api.router.clone().oneshot(req));
    while api.store.queued_writes() == 0 {
        tokio::task::yield_now().await;
    }
    // The sender hangs up: the server drops its request while the write is queued.
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
    release.send(()).unwrap();
    blocker.await.unwrap().unwrap();
    // The write commits (the alert was accepted) and its run, started in that write, runs.
    for _ in 0..500 {
        let runs = api.view("/api/v1/runs").await;
        if runs["runs"][0]["state"] == "succeeded" {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the run never ended: {}", api.view("/api/v1/runs").await);
}

#[tokio::test]
async fn an_operator_triggers_a_playbook_without_an_alert_and_the_run_says_who() {
    let api = TestApi::new().await;
    let body = r#"{"labels": {"instance": "h9"}, "annotations": {"summary": "by hand"}}"#;
    for role in ["viewer", "approver"] {
        let token = format!("{role}-token");
        let (status, _) = api.trigger("note", &token, body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{role}");
    }
    let (status, out) = api.trigger("nope", "operator-token", body).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{out}");
    let (status, out) = api.trigger("note", "operator-token", body).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["outcome"], "created", "{out}");
    let run = wait_state(&api, out["run_id"].as_i64().unwrap(), "succeeded").await;
    assert_eq!(run["triggered_by"], "operator", "{run}");
    assert_eq!(run["steps"][0]["args"]["message"], "noted h9", "{run}");
    let starts = run["alert"]["starts_at"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(starts).is_ok(), "{starts}");
    // A second trigger with the same labels is a new run, not a re-delivery.
    let (_, again) = api.trigger("note", "operator-token", body).await;
    assert_eq!(again["outcome"], "created", "{again}");
    assert_ne!(again["run_id"], out["run_id"]);
    let audit = api.view("/api/v1/audit").await;
    assert!(
        (audit.as_array().unwrap().iter())
            .any(|e| e["action"] == "run.trigger" && e["actor"] == "operator"),
        "{audit}"
    );
}

#[tokio::test]
async fn a_triggered_run_is_held_by_the_kill_switch_and_bad_labels_change_nothing() {
    let api = TestApi::new().await;
    let engage = r#"{"engaged": true, "reason": "incident review"}"#;
    let (status, _) = api
        .call(
            Method::PUT,
            "/api/v1/killswitch",
            Some("admin-token"),
            Some(engage),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let body = r#"{"labels": {"instance": "h9"}}"#;
    let (_, out) = api.trigger("note", "operator-token", body).await;
    assert_eq!(out["outcome"], "suppressed", "{out}");
    assert_eq!(out["cause"], "kill_switch", "{out}");
    let before = api.runs().await;
    for bad in [
        r#"{"labels": {"a": 1}}"#,
        r#"{"labels": {}, "extra": true}"#,
        "[]",
    ] {
        let (status, out) = api.trigger("note", "operator-token", bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {out}");
    }
    assert_eq!(api.runs().await, before, "nothing recorded");
}

#[tokio::test]
async fn a_failed_run_is_retried_from_the_step_that_did_not_succeed_against_the_playbook_in_force()
{
    let api = TestApi::new().await;
    let out = api
        .post_alert(&json!({"labels": {"alertname": "Flaky", "instance": "h1"}}).to_string())
        .await;
    let failed = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
    tokio::spawn(api.engine.clone().dispatch());
    let run = wait_state(&api, failed, "failed").await;
    assert_eq!(run["steps"][0]["state"], "succeeded", "{run}");
    // Not retryable: a run that succeeded; no such run.
    let ok = api.post_alert(&alert("h2")).await["outcomes"][0][0]["run_id"]
        .as_i64()
        .unwrap();
    wait_state(&api, ok, "succeeded").await;
    let (status, out) = api
        .call(
            Method::POST,
            &format!("/api/v1/runs/{ok}/retry"),
            Some("operator-token"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{out}");
    let (status, _) = api
        .call(
            Method::POST,
            "/api/v1/runs/999/retry",
            Some("operator-token"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The operator fixes the probe; the retry renders against the playbook in force.
    let dir = api.db.parent().unwrap().parent().unwrap().join("playbooks");
    std::fs::write(
        dir.join("flaky.yaml"),
        FLAKY.replace(r#"throw "probe failed""#, r#""fixed""#),
    )
    .unwrap();
    api.engine.reload("test").unwrap();
    let path = format!("/api/v1/runs/{failed}/retry");
    let (status, out) = api
        .call(Method::POST, &path, Some("operator-token"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let retry = wait_state(&api, out["run_id"].as_i64().unwrap(), "succeeded").await;
    let names: Vec<&str> = (retry["steps"].as_array().unwrap().iter())
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["probe"], "from the step that failed: {retry}");
    assert_eq!(retry["retry_of"], failed, "{retry}");
    assert_eq!(retry["triggered_by"], "operator", "{retry}");
    assert_eq!(
        retry["alert"]["fingerprint"], run["alert"]["fingerprint"],
        "the same alert"
    );
    let (_, out) = (api.call(
        Method::POST,
        &path,
        Some("operator-token"),
        Some(r#"{"from_start": true}"#),
    ))
    .await;
    let again = wait_state(&api, out["run_id"].as_i64().unwrap(), "succeeded").await;
    assert_eq!(
        again["steps"].as_array().unwrap().len(),
        2,
        "from the start: {again}"
    );
}

#[tokio::test]
async fn a_retry_of_an_expired_gated_run_is_gated_again() {
    let api = TestApi::new().await;
    let run_id = api.start_gated().await;
    api.clock.advance(std::time::Duration::from_secs(31 * 60));
    api.store.expire_due().await.unwrap();
    wait_state(&api, run_id, "expired").await;
    let path = format!("/api/v1/runs/{run_id}/retry");
    let (status, out) = api
        .call(Method::POST, &path, Some("operator-token"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let retry = wait_state(&api, out["run_id"].as_i64().unwrap(), "awaiting_approval").await;
    assert_eq!(retry["retry_of"], run_id, "{retry}");
}

/// Every `.route("PATH", METHOD(…))` in the router's source, as (METHOD, PATH).
fn routes_in_source() -> Vec<(String, String)> {
    let src = include_str!("mod.rs");
    let mut out = Vec::new();
    for chunk in src.split(".route(").skip(1) {
        let path = chunk.split('"').nth(1).unwrap().to_string();
        let rest = chunk.split_once(',').unwrap().1.trim_start();
        let method = rest.trim_start_matches("axum::routing::");
        let method = method.split('(').next().unwrap().trim().to_string();
        out.push((method, path));
    }
    out
}

#[tokio::test]
async fn the_openapi_document_covers_every_route_with_the_role_it_enforces() {
    let api = TestApi::new().await;
    let (status, doc) = api
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{doc}");
    let routes = routes_in_source();
    assert!(routes.len() >= 20, "{routes:?}");
    for (method, path) in &routes {
        let op = &doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} is not in the document");
        assert!(
            op["responses"]["200"].is_object(),
            "{method} {path}: no 200"
        );
        let security = op["security"]
            .as_array()
            .unwrap_or_else(|| panic!("{method} {path}: no security"));
        let Some(role) = security[0]["bearer"][0].as_str() else {
            continue; // open (health) endpoints
        };
        // The documented role is the one enforced: it passes, the role below it does not.
        let concrete = path.replace("{id}", "999").replace("{name}", "nope");
        let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let body = (m != Method::GET).then_some("{}");
        let token = format!("{role}-token");
        let (got, answer) = api.call(m.clone(), &concrete, Some(&token), body).await;
        assert!(
            got != StatusCode::UNAUTHORIZED && got != StatusCode::FORBIDDEN,
            "{method} {path} documented for {role} but refused it: {answer}"
        );
        let below = match role {
            "webhook" => "viewer",
            "viewer" => "webhook",
            other => ROLES[ROLES.iter().position(|r| *r == other).unwrap() - 1],
        };
        let (got, _) = api
            .call(m, &concrete, Some(&format!("{below}-token")), body)
            .await;
        assert_eq!(
            got,
            StatusCode::FORBIDDEN,
            "{method} {path}: {below} must be refused"
        );
    }
    // Every operation is routed, and every reference resolves.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            assert!(
                routes.contains(&(method.clone(), path.clone())),
                "{method} {path} is documented but not routed"
            );
        }
    }
    let text = doc.to_string();
    for r in text.split("\"$ref\":\"").skip(1) {
        let target = r.split('"').next().unwrap();
        let name = target
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("{target}"));
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "{target} does not resolve"
        );
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
}

/// An API configured with `section` (its `SECRET` replaced by a file holding `secret`) and a
/// gated run waiting: the run, its approval's id and action hash, and the secret's directory.
pub(super) async fn chat_api(
    section: &str,
    secret: &str,
) -> (TestApi, i64, i64, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    std::fs::write(&path, secret).unwrap();
    let api = TestApi::with(&section.replace("SECRET", &path.display().to_string()), "").await;
    let run_id = api.start_gated().await;
    let approval = api.view("/api/v1/approvals?state=pending").await[0].clone();
    assert_eq!(approval["run_id"], run_id);
    let id = approval["id"].as_i64().unwrap();
    let hash = approval["action_hash"].as_str().unwrap().to_string();
    (api, run_id, id, hash, dir)
}

/// A local stand-in for Slack's `response_url`: the JSON bodies posted to it.
pub(super) async fn response_url_receiver() -> (String, Arc<std::sync::Mutex<Vec<Value>>>) {
    let got: Arc<std::sync::Mutex<Vec<Value>>> = Arc::default();
    let seen = got.clone();
    let app = Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(v);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/"), got)
}

/// An API with a Slack app (secret `s3cret`; user U1 deciding as the approver token, U2 as
/// the viewer, U3 as the webhook token, U4 as a name no token has) and a gated run
/// waiting; its approval's id and action hash, and the response_url receiver.
async fn slack_api() -> (
    TestApi,
    i64,
    String,
    String,
    Arc<std::sync::Mutex<Vec<Value>>>,
    tempfile::TempDir,
) {
    let (base, got) = response_url_receiver().await;
    let section = format!(
        "notify:\n  slack_app:\n    signing_secret_file: SECRET\n    users: {{ U1: approver, U2: viewer, U3: webhook, U4: nobody }}\n    response_url_prefix: {base}\n"
    );
    let (api, _, id, hash, dir) = chat_api(&section, "s3cret").await;
    (api, id, hash, base, got, dir)
}

/// A Slack interactivity request as Slack builds it: form-encoded `payload`, signed with
/// `secret` at `ts`.
pub(super) fn slack_request(secret: &str, ts: i64, payload: &Value) -> Request<Body> {
    use hmac::{KeyInit, Mac};
    let body: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", &payload.to_string())
        .finish();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("v0:{ts}:{body}").as_bytes());
    let signature = format!("v0={}", hex::encode(mac.finalize().into_bytes()));
    Request::builder()
        .method(Method::POST)
        .uri("/api/v1/chat/slack/interactions")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header("x-slack-request-timestamp", ts.to_string())
        .header("x-slack-signature", signature)
        .body(Body::from(body))
        .unwrap()
}

pub(super) fn click(user: &str, action: &str, value: &str, response_url: &str) -> Value {
    json!({
        "type": "block_actions",
        "user": {"id": user},
        "actions": [{"action_id": action, "value": value}],
        "response_url": response_url,
        "message": {"text": "Approval needed"},
    })
}

pub(super) async fn send(api: &TestApi, req: Request<Body>) -> (StatusCode, Value) {
    let resp = api.router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn a_slack_approve_button_decides_as_the_mapped_user_and_updates_the_message() {
    let (api, id, hash, base, got, _dir) = slack_api().await;
    let now = api.store.now_ms() / 1000;
    let payload = click(
        "U1",
        "approve",
        &format!("{id}:{hash}"),
        &format!("{base}hook"),
    );
    let (status, out) = send(&api, slack_request("s3cret", now, &payload)).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let approval = api.view(&format!("/api/v1/approvals/{id}")).await;
    assert_eq!(approval["state"], "approved", "{approval}");
    assert_eq!(approval["decided_by"], "approver", "{approval}");
    wait_state(&api, approval["run_id"].as_i64().unwrap(), "succeeded").await;
    let updates = got.lock().unwrap().clone();
    assert_eq!(
        updates,
        vec![
            json!({"replace_original": true, "text": format!("Approval needed\nApproved by approver (approval {id}).")})
        ]
    );
    // The same signed request again is a replay.
    let (status, out) = send(&api, slack_request("s3cret", now, &payload)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{out}");
    assert!(
        out["error"]["message"].as_str().unwrap().contains("replay"),
        "{out}"
    );
}

#[tokio::test]
async fn forged_expired_unmapped_and_stale_slack_clicks_decide_nothing() {
    let (api, id, hash, base, got, _dir) = slack_api().await;
    let now = api.store.now_ms() / 1000;
    let url = format!("{base}hook");
    let value = format!("{id}:{hash}");
    let cases = [
        (
            "forged",
            slack_request("not-the-secret", now, &click("U1", "approve", &value, &url)),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "expired",
            slack_request("s3cret", now - 301, &click("U1", "approve", &value, &url)),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "unmapped",
            slack_request("s3cret", now, &click("U9", "approve", &value, &url)),
            StatusCode::FORBIDDEN,
        ),
        (
            "other action",
            slack_request(
                "s3cret",
                now + 1,
                &click("U1", "approve", &format!("{id}:beef"), &url),
            ),
            StatusCode::CONFLICT,
        ),
    ];
    for (what, req, want) in cases {
        let (status, out) = send(&api, req).await;
        assert_eq!(status, want, "{what}: {out}");
        let approval = api.view(&format!("/api/v1/approvals/{id}")).await;
        assert_eq!(approval["state"], "pending", "{what} changed nothing");
    }
    // An unsigned request is refused too.
    let mut req = slack_request("s3cret", now + 2, &click("U1", "approve", &value, &url));
    req.headers_mut().remove("x-slack-signature");
    assert_eq!(send(&api, req).await.0, StatusCode::UNAUTHORIZED);
    // The message itself was never updated; the signed refusals were answered to the one who
    // clicked (the unmapped user, the other action).
    let answers = got.lock().unwrap().clone();
    assert_eq!(answers.len(), 2, "{answers:#?}");
    for a in &answers {
        assert_eq!(a["response_type"], "ephemeral", "{a}");
        assert_eq!(a["replace_original"], false, "{a}");
        assert!(
            a["text"].as_str().unwrap().starts_with("Not decided: "),
            "{a}"
        );
    }
    got.lock().unwrap().clear();
    // Deny, from a mapped user: the run ends without acting.
    let (status, out) = send(
        &api,
        slack_request("s3cret", now + 3, &click("U1", "deny", &value, &url)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let approval = api.view(&format!("/api/v1/approvals/{id}")).await;
    wait_state(&api, approval["run_id"].as_i64().unwrap(), "denied").await;
    assert!(
        got.lock().unwrap()[0]["text"]
            .as_str()
            .unwrap()
            .ends_with(&format!("Denied by approver (approval {id})."))
    );
}

#[tokio::test]
async fn a_slack_user_mapped_to_a_viewer_a_webhook_token_or_no_token_decides_nothing() {
    let (api, id, hash, base, got, _dir) = slack_api().await;
    let now = api.store.now_ms() / 1000;
    let (url, value) = (format!("{base}hook"), format!("{id}:{hash}"));
    for (i, (user, needle)) in [
        ("U2", "viewer has the viewer role"),
        ("U3", "webhook has the webhook role"),
        ("U4", "nobody is not the name of a token"),
    ]
    .into_iter()
    .enumerate()
    {
        for action in ["approve", "deny"] {
            let ts = now + (i as i64) * 2 + i64::from(action == "deny");
            let req = slack_request("s3cret", ts, &click(user, action, &value, &url));
            let (status, out) = send(&api, req).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{user} {action}: {out}");
            let message = out["error"]["message"].as_str().unwrap();
            assert!(message.contains(needle), "{user}: {message}");
            let approval = api.view(&format!("/api/v1/approvals/{id}")).await;
            assert_eq!(
                approval["state"], "pending",
                "{user} {action} changed nothing"
            );
        }
    }
    // Each refusal was answered in Slack to the one who clicked, and audited.
    assert_eq!(got.lock().unwrap().len(), 6);
    let audit = api.view("/api/v1/audit?limit=100").await;
    let row = (audit.as_array().unwrap().iter())
        .find(|a| a["action"] == "chat decision")
        .expect("a chat refusal on the record");
    assert_eq!(row["outcome"], "refused", "{row}");
    assert_eq!(row["actor"], "viewer (slack:U2)", "{row}");
    assert_eq!(api.refused_count(&["chat"]), 6);
    // The approver's click still decides.
    let req = slack_request("s3cret", now + 10, &click("U1", "approve", &value, &url));
    assert_eq!(send(&api, req).await.0, StatusCode::OK);
}

#[tokio::test]
async fn mattermost_buttons_decide_with_the_shared_secret_as_the_mapped_user() {
    let section = "notify:\n  mattermost_app:\n    callback_url: http://reflex.invalid/api/v1/chat/mattermost/actions\n    secret_file: SECRET\n    users: { mm1: approver, mm2: viewer }\n";
    let (api, run_id, id, hash, _dir) = chat_api(section, "mm-s3cret").await;
    let hash = hash.as_str();
    let call = |user: &str, secret: &str, hash: &str| {
        json!({"user_id": user, "context": {"action": "approve", "approval": id, "hash": hash, "secret": secret}})
            .to_string()
    };
    let path = "/api/v1/chat/mattermost/actions";
    for (what, body, want) in [
        ("wrong secret", call("mm1", "guess", hash), StatusCode::UNAUTHORIZED),
        ("no secret", json!({"user_id": "mm1", "context": {"action": "approve", "approval": id, "hash": hash}}).to_string(), StatusCode::UNAUTHORIZED),
    ] {
        let (status, out) = api.call(Method::POST, path, None, Some(&body)).await;
        assert_eq!(status, want, "{what}: {out}");
        let a = api.view(&format!("/api/v1/approvals/{id}")).await;
        assert_eq!(a["state"], "pending", "{what} changed nothing");
    }
    // With the secret, a refusal is answered to the one who clicked (Mattermost shows
    // `ephemeral_text` on a 200 only), with the status the API would have given.
    for (what, body, want) in [
        ("unmapped", call("mm9", "mm-s3cret", hash), 403),
        ("a viewer", call("mm2", "mm-s3cret", hash), 403),
        ("other action", call("mm1", "mm-s3cret", "beef"), 409),
    ] {
        let (status, out) = api.call(Method::POST, path, None, Some(&body)).await;
        assert_eq!(status, StatusCode::OK, "{what}: {out}");
        assert_eq!(out["refused"]["status"], want, "{what}: {out}");
        assert!(
            out["ephemeral_text"]
                .as_str()
                .unwrap()
                .starts_with("Not decided: "),
            "{what}: {out}"
        );
        assert!(out.get("update").is_none(), "{what}: the post stays: {out}");
        let a = api.view(&format!("/api/v1/approvals/{id}")).await;
        assert_eq!(a["state"], "pending", "{what} changed nothing");
    }
    let (status, out) = api
        .call(
            Method::POST,
            path,
            None,
            Some(&call("mm1", "mm-s3cret", hash)),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(
        out["update"]["message"],
        format!("Approved by approver (approval {id}).")
    );
    wait_state(&api, run_id, "succeeded").await;
    let (status, out) = api
        .call(
            Method::POST,
            path,
            None,
            Some(&call("mm1", "mm-s3cret", hash)),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        out["refused"]["status"], 409,
        "a second click decides nothing: {out}"
    );
}

#[tokio::test]
async fn each_step_boundary_is_one_write() {
    // Two steps, the second failing: the intake with the first step's start, the first
    // step's result with the second's start, and the second's result with the run's end.
    let api = TestApi::new().await;
    let before = api.store.write_counts().writes;
    let out = api
        .post_alert(&json!({"labels": {"alertname": "Flaky", "instance": "h1"}}).to_string())
        .await;
    let run_id = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
    let run = wait_state(&api, run_id, "failed").await;
    assert_eq!(run["steps"][0]["state"], "succeeded", "{run}");
    assert_eq!(run["steps"][1]["state"], "failed", "{run}");
    assert_eq!(writes_since(&api, before, 3).await, 3);
    let audit = api.view("/api/v1/audit").await;
    let steps = (audit.as_array().unwrap().iter())
        .filter(|e| e["action"].as_str().unwrap().starts_with("step."))
        .count();
    assert_eq!(steps, 2, "each step on the audit log once: {audit}");
}

#[tokio::test]
async fn a_late_resolution_of_an_earlier_occurrence_leaves_a_newer_one_alone() {
    // Gated runs wait in the queue here (no dispatcher).
    let api = TestApi::new().await;
    let post = |status: &str, starts_at: &str| {
        json!({"labels": {"alertname": "Gated", "instance": "h1"}, "status": status, "startsAt": starts_at})
            .to_string()
    };
    let first = api
        .post_alert(&post("firing", "2026-11-23T00:00:00Z"))
        .await;
    let run = first["outcomes"][0][0]["run_id"].as_i64().unwrap();
    // A newer occurrence joins the queued run, which now acts for it.
    let newer = api
        .post_alert(&post("firing", "2026-11-23T01:00:00Z"))
        .await;
    assert_eq!(newer["outcomes"][0][0]["outcome"], "coalesced", "{newer}");
    // The first occurrence's resolution, delivered late, does not end it.
    let late = api
        .post_alert(&post("resolved", "2026-11-23T00:00:00Z"))
        .await;
    assert!(
        (late["outcomes"][0].as_array().unwrap().iter()).all(|o| o["outcome"] != "ended"),
        "{late}"
    );
    let state = api.view(&format!("/api/v1/runs/{run}")).await["state"].clone();
    assert_eq!(state, "pending");
    // The newer occurrence's resolution does.
    let resolved = api
        .post_alert(&post("resolved", "2026-11-23T01:00:00Z"))
        .await;
    assert!(
        (resolved["outcomes"][0].as_array().unwrap().iter())
            .any(|o| o["outcome"] == "ended" && o["run_id"] == run),
        "{resolved}"
    );
    let state = api.view(&format!("/api/v1/runs/{run}")).await["state"].clone();
    assert_eq!(state, "resolved");
}

#[tokio::test]
async fn a_resolution_ends_a_run_waiting_for_approval_and_cancels_its_request() {
    let api = TestApi::new().await;
    let run_id = api.start_gated().await;
    let resolved =
        json!({"labels": {"alertname": "Gated", "instance": "h1"}, "status": "resolved"});
    let out = api.post_alert(&resolved.to_string()).await;
    assert!(
        (out["outcomes"][0].as_array().unwrap().iter())
            .any(|o| o["outcome"] == "ended" && o["run_id"] == run_id),
        "{out}"
    );
    let run = api.view(&format!("/api/v1/runs/{run_id}")).await;
    assert_eq!(run["state"], "resolved", "{run}");
    assert_eq!(
        run["error"], "the alert resolved before approval; nothing was done",
        "{run}"
    );
    assert_eq!(run["steps"][0]["state"], "skipped", "{run}");
    let approvals = api.view("/api/v1/approvals").await;
    let request = (approvals.as_array().unwrap().iter())
        .find(|a| a["run_id"] == run_id)
        .unwrap_or_else(|| panic!("{approvals}"));
    assert_eq!(request["state"], "cancelled", "{request}");
}

/// A claim of a run this replica holds twice (once from before it lost its lease, loaded
/// late, and once since), whose step the other claim started: driving it acts on nothing and
/// ends nothing. The run stays with the task that started its step.
#[tokio::test]
async fn a_run_whose_step_another_claim_started_is_left_to_that_claim() {
    use crate::store::tests::{alert, candidate};
    let api = TestApi::new().await;
    let item = crate::store::IntakeItem {
        deferred: None,
        alert: alert("twice"),
        received_us: 0,
        candidates: vec![candidate("note", "h1", 0, "")],
    };
    let none = crate::store::BreakerLimits::default();
    let recorded = api.store.record_intake(vec![item], none).await.unwrap();
    let run_id = recorded[0][0].run_id();
    let claimed = api.store.claim(1, 1).await.unwrap().remove(0);
    assert_eq!(claimed.id, run_id);
    api.store.step_started_after(run_id, 0, None).await.unwrap();
    api.engine.drive(claimed).await;
    let run = api.view(&format!("/api/v1/runs/{run_id}")).await;
    assert_eq!(
        run["state"], "running",
        "not ended by the late claim: {run}"
    );
    assert_eq!(run["steps"][0]["state"], "running", "{run}");
    assert_eq!(
        run["steps"][0]["output"],
        Value::Null,
        "nothing acted: {run}"
    );
}

/// A replica's renewals stop (the process paused, the database away) after a run's first
/// step was started at intake, before its task acts. Another replica takes the run over
/// (`interrupted`, never re-run): the late task does not act, whether it resumes before the
/// lease is renewed or after. Had nobody taken the run over, the task acts once renewed.
#[tokio::test]
async fn a_late_task_acts_on_its_step_only_if_its_replicas_run_was_not_taken_over() {
    use crate::store::tests::{alert, candidate};
    let api = TestApi::on_postgres().await;
    let other = api._db.open().await;
    let start = |name: &'static str| {
        let store = api.store.clone();
        async move {
            let item = crate::store::IntakeItem {
                deferred: None,
                alert: alert(name),
                received_us: 0,
                candidates: vec![candidate("note", name, 0, "")],
            };
            let none = crate::store::BreakerLimits::default();
            let now = crate::store::StartNow {
                slots: 1,
                max_per_target: 1,
            };
            let recorded = store.record_and_start(vec![item], none, now).await;
            recorded.unwrap().started.remove(0)
        }
    };
    let take_over = |run_id: i64| {
        let (other, me) = (&other, api.store.replica().to_string());
        async move {
            (other.write(move |c| {
                c.exec(
                    "UPDATE replicas SET expires_at = expires_at - 60000 WHERE name = ?1",
                    &[&me],
                )
            }))
            .await
            .unwrap();
            let taken = other.take_over_expired().await.unwrap();
            assert_eq!(taken[0].interrupted, vec![run_id], "{taken:?}");
        }
    };
    // The run's task, late: the lease lapsed first. Returns once it waits for the lease.
    let late = |run: crate::store::ClaimedRun| {
        let api = &api;
        async move {
            api.store.lapse_lease();
            let engine = api.engine.clone();
            let task = tokio::spawn(async move { engine.drive(run).await });
            for _ in 0..1000 {
                if api.store.lease_waiters() == 1 {
                    return task;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            panic!("the run's task never waited for the lease");
        }
    };
    let step_of = |run_id: i64| {
        let api = &api;
        async move { api.view(&format!("/api/v1/runs/{run_id}")).await }
    };
    // Taken over while the late task waits for the lease.
    let run = start("waits").await;
    let run_id = run.id;
    let task = late(run).await;
    take_over(run_id).await;
    assert!(!api.store.renew_lease().await.unwrap(), "taken over");
    task.await.unwrap();
    let run = step_of(run_id).await;
    assert_eq!(run["state"], "interrupted", "{run}");
    assert_eq!(run["steps"][0]["state"], "interrupted", "{run}");
    assert_eq!(
        run["steps"][0]["output"],
        Value::Null,
        "nothing acted: {run}"
    );
    // Taken over, and the lease renewed, before the late task gets to its step (a paused
    // process resumed).
    let run = start("paused").await;
    let run_id = run.id;
    take_over(run_id).await;
    assert!(!api.store.renew_lease().await.unwrap(), "taken over");
    api.engine.drive(run).await;
    let run = step_of(run_id).await;
    assert_eq!(run["state"], "interrupted", "{run}");
    assert_eq!(
        run["steps"][0]["output"],
        Value::Null,
        "nothing acted: {run}"
    );
    // Not taken over: the late task acts once the lease is renewed.
    let run = start("kept").await;
    let run_id = run.id;
    let task = late(run).await;
    assert!(api.store.renew_lease().await.unwrap(), "kept");
    task.await.unwrap();
    let run = step_of(run_id).await;
    assert_eq!(run["state"], "succeeded", "{run}");
    assert_ne!(run["steps"][0]["output"], Value::Null, "acted: {run}");
}

#[tokio::test]
async fn in_open_mode_a_foreign_host_cannot_act_dns_rebinding() {
    let api = TestApi::open("server:\n  allowed_hosts: [reflex.example.internal]\n").await;
    let put = |host: &str| {
        Request::builder()
            .method(Method::PUT)
            .uri("/api/v1/killswitch")
            .header(header::HOST, host)
            .header(header::ORIGIN, format!("http://{host}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(r#"{"engaged": true, "reason": "rebound"}"#))
            .unwrap()
    };
    for host in [
        "evil.example",
        "evil.example:9095",
        "127.0.0.1.evil.example",
        "[::2]",
    ] {
        let (status, out) = send(&api, put(host)).await;
        assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "{host}: {out}");
        assert!(
            out["error"]["message"]
                .as_str()
                .unwrap()
                .contains("server.allowed_hosts"),
            "{out}"
        );
    }
    assert!(api.no_switch_engaged().await);
    let (status, out) = send(&api, get_with_host("/api/v1/runs", "evil.example")).await;
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "reads too: {out}");
    // The names Reflex is reached by act as before.
    for host in [
        "127.0.0.1:9095",
        "localhost:9095",
        "[::1]:9095",
        "Reflex.Example.Internal",
    ] {
        let (status, out) = send(&api, get_with_host("/api/v1/runs", host)).await;
        assert_eq!(status, StatusCode::OK, "{host}: {out}");
    }
    let (status, out) = send(&api, put("localhost:9095")).await;
    assert_eq!(status, StatusCode::OK, "{out}");
}

#[tokio::test]
async fn with_tokens_the_api_takes_any_host_but_the_console_does_not() {
    let api = TestApi::new().await;
    let mut req = get_with_host("/api/v1/runs", "reflex-behind-a-proxy.example");
    req.headers_mut().insert(
        header::AUTHORIZATION,
        "Bearer viewer-token".parse().unwrap(),
    );
    assert_eq!(send(&api, req).await.0, StatusCode::OK);
    let resp = api
        .router
        .clone()
        .oneshot(get_with_host("/ui/login", "evil.example"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::MISDIRECTED_REQUEST);
}

fn get_with_host(path: &str, host: &str) -> Request<Body> {
    Request::builder()
        .uri(path)
        .header(header::HOST, host)
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn engaging_an_engaged_switch_keeps_its_reason_unless_replace_is_said() {
    let api = TestApi::new().await;
    let put = |body: Value| api.put_switch(body);
    let (status, _) =
        put(json!({"engaged": true, "reason": "INC-4711: bad deploy, hands off", "for": "2h"}))
            .await;
    assert_eq!(status, StatusCode::OK);
    let (status, out) = put(json!({"engaged": true, "reason": "x"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{out}");
    let message = out["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("already engaged by admin until ")
            && message.contains("INC-4711: bad deploy, hands off")
            && message.contains("replace"),
        "{message}"
    );
    let global = api.view("/api/v1/killswitch").await["global"].clone();
    assert_eq!(global["reason"], "INC-4711: bad deploy, hands off");
    assert!(global["until"].is_string(), "{global}");
    let (status, out) = put(json!({"engaged": true, "reason": "INC-4712", "replace": true})).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["global"]["reason"], "INC-4712");
    assert!(out["global"]["until"].is_null(), "{out}");
}

#[tokio::test]
async fn a_time_with_an_offset_means_that_moment_and_a_malformed_time_changes_nothing() {
    let api = TestApi::new().await;
    // 10:00:00.5 at +01:00 is 09:00:00.5 UTC (a parser that dropped the offset read 10:00 UTC).
    let (status, out) = api
        .put_switch(
            json!({"engaged": true, "reason": "INC-1", "until": "2099-01-01T10:00:00.5+01:00"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["global"]["until"], "2099-01-01T09:00:00.500Z", "{out}");
    let (status, out) = api
        .put_switch(json!({"engaged": true, "reason": "INC-2", "replace": true,
                            "until": "2099-01-01T25:00:00Z"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{out}");
    assert!(
        out["error"]["message"].as_str().unwrap().contains("until"),
        "{out}"
    );
    let global = api.view("/api/v1/killswitch").await["global"].clone();
    assert_eq!(global["reason"], "INC-1", "{global}");
    // The audit's `since` takes an offset too.
    let since = percent_encoding::utf8_percent_encode(
        "2000-01-01T01:00:00+01:00",
        percent_encoding::NON_ALPHANUMERIC,
    );
    let rows = api.view(&format!("/api/v1/audit?since={since}")).await;
    assert!(rows.as_array().is_some_and(|r| !r.is_empty()), "{rows}");
}

#[tokio::test]
async fn long_reasons_and_comments_and_duplicate_trigger_labels_are_400_and_change_nothing() {
    let api = TestApi::new().await;
    let long = "x".repeat(crate::api::MAX_TEXT_BYTES + 1);
    let (status, out) = api
        .put_switch(json!({"engaged": true, "reason": long}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{out}");
    assert!(api.no_switch_engaged().await);
    let run_id = api.start_gated().await;
    let approval = api.view("/api/v1/approvals?state=pending").await[0]["id"].clone();
    let (status, out) = api
        .call(
            Method::POST,
            &format!("/api/v1/approvals/{approval}/approve"),
            Some("approver-token"),
            Some(&json!({"comment": long}).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{out}");
    let run = api.view(&format!("/api/v1/runs/{run_id}")).await;
    assert_eq!(run["state"], "awaiting_approval", "{run}");
    let runs_before = api.view("/api/v1/runs").await["runs"]
        .as_array()
        .unwrap()
        .len();
    let (status, out) = api
        .call(
            Method::POST,
            "/api/v1/playbooks/note/runs",
            Some("operator-token"),
            Some(r#"{"labels": {"instance": "h1", "instance": "h2"}}"#),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{out}");
    assert!(
        out["error"]["message"]
            .as_str()
            .unwrap()
            .contains("duplicate key \"instance\""),
        "{out}"
    );
    let runs_after = api.view("/api/v1/runs").await["runs"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(runs_before, runs_after);
}

#[tokio::test]
async fn failed_token_attempts_are_throttled_per_source_with_retry_after() {
    let api = TestApi::new().await;
    let from = |ip: &str, token: &str| {
        let mut req = Request::builder()
            .uri("/api/v1/runs")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        let peer: std::net::SocketAddr = format!("{ip}:40000").parse().unwrap();
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        req
    };
    for i in 0..super::throttle::MAX_FAILURES {
        let (status, _) = send(&api, from("192.0.2.9", &format!("guess-{i}"))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    // Held now, even with the right token: a guess that would succeed is not even compared.
    let resp = api
        .router
        .clone()
        .oneshot(from("192.0.2.9", "viewer-token"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = resp.headers()[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(api.refused_count(&["throttled"]), 1);
    // Another source is not held; the window's end frees this one.
    assert_eq!(
        send(&api, from("192.0.2.10", "viewer-token")).await.0,
        StatusCode::OK
    );
    api.clock.advance(std::time::Duration::from_millis(
        super::throttle::WINDOW_MS as u64,
    ));
    assert_eq!(
        send(&api, from("192.0.2.9", "viewer-token")).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_cancel_stops_the_step_under_way_and_the_run_shows_cancelling_until_then() {
    let api = TestApi::new().await;
    api.add_playbook("slow.yaml", "name: slow\nmatchers: ['alertname=\"Slow\"']\nsteps:\n  - name: pause\n    action: wait\n    with: { duration: 40s }\n  - name: after\n    action: log\n    with: { message: never }\n").await;
    tokio::spawn(api.engine.clone().dispatch());
    let out = api
        .post_alert(&json!({"labels": {"alertname": "Slow", "instance": "h1"}}).to_string())
        .await;
    let run_id = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
    wait_state(&api, run_id, "running").await;
    // The wait is under way (not merely the run claimed).
    for _ in 0..500 {
        let run = api.view(&format!("/api/v1/runs/{run_id}")).await;
        if run["steps"][0]["state"] == "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let asked = std::time::Instant::now();
    let (status, out) = api
        .call(
            Method::POST,
            &format!("/api/v1/runs/{run_id}/cancel"),
            Some("operator-token"),
            Some("{}"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["state"], "cancelling", "{out}");
    let run = wait_state(&api, run_id, "cancelled").await;
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(10),
        "stopped within seconds, not after 40 s"
    );
    assert_eq!(run["steps"][0]["state"], "cancelled", "{run}");
    assert_eq!(run["steps"][1]["state"], "skipped", "{run}");
    assert!(
        run["error"]
            .as_str()
            .unwrap()
            .contains("during step \"pause\""),
        "{run}"
    );
}

#[tokio::test]
async fn a_webhook_slow_to_plan_is_answered_in_time_and_every_alert_planned_once() {
    let api = TestApi::with("intake:\n  plan_request_budget: 50ms\n", "").await;
    // Milliseconds of work per alert: 20 alerts take far longer than 50 ms.
    api.add_playbook("costly.yaml", "name: costly\nmatchers: ['alertname=\"Costly\"']\nwhen: |\n  let n = 0; for i in 0..5000 { n += labels.i.len(); } n > 0\nsteps:\n  - action: log\n    with: { message: \"costly {{ labels.i }}\" }\n").await;
    let body: Vec<Value> = (0..20)
        .map(|i| json!({"labels": {"alertname": "Costly", "i": i.to_string()}}))
        .collect();
    let out = api.post_alert(&Value::from(body).to_string()).await;
    let planned = out["outcomes"].as_array().unwrap().len();
    let deferred = out["deferred"].as_u64().unwrap() as usize;
    assert_eq!(planned + deferred, 20, "{out}");
    assert!(deferred > 0, "the budget cut the webhook short: {out}");
    assert_eq!(
        api.deferred_count().await as usize,
        deferred,
        "kept before the answer"
    );
    // After the answer, the planner records each once.
    tokio::spawn(api.engine.clone().plan_deferred());
    let runs = || async {
        let page = api.view("/api/v1/runs?playbook=costly&limit=500").await;
        page["runs"].as_array().unwrap().len()
    };
    for _ in 0..500 {
        if runs().await >= 20 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(runs().await, 20, "every alert planned, none twice");
    assert_eq!(api.deferred_count().await, 0);
    // A retry of the same webhook adds nothing: each alert is a duplicate now.
    let body: Vec<Value> = (0..20)
        .map(|i| json!({"labels": {"alertname": "Costly", "i": i.to_string()}}))
        .collect();
    let again = api.post_alert(&Value::from(body).to_string()).await;
    for _ in 0..500 {
        if api.deferred_count().await == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(runs().await, 20, "{again}");
}

#[tokio::test]
async fn the_audit_log_filters_by_actor_action_and_time() {
    let api = TestApi::new().await;
    for (engaged, reason) in [(true, "INC-1"), (false, "done")] {
        let (status, _) = api
            .put_switch(json!({"engaged": engaged, "reason": reason}))
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    api.call(
        Method::POST,
        "/api/v1/playbooks/reload",
        Some("admin-token"),
        Some("{}"),
    )
    .await;
    let rows = api
        .view("/api/v1/audit?actor=admin&action=killswitch")
        .await;
    let actions: Vec<&str> = (rows.as_array().unwrap().iter())
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["killswitch.release", "killswitch.engage"],
        "{rows}"
    );
    assert_eq!(rows[1]["detail"], "INC-1");
    assert!(
        api.view("/api/v1/audit?actor=nobody")
            .await
            .as_array()
            .unwrap()
            .is_empty()
    );
    api.clock.advance(std::time::Duration::from_secs(7200));
    assert!(
        api.view("/api/v1/audit?since=1h")
            .await
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        api.view("/api/v1/audit?since=3h")
            .await
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let (status, out) = api
        .call(
            Method::GET,
            "/api/v1/audit?since=yesterday-ish",
            Some("viewer-token"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{out}");
    // A duration reaching before the epoch is all of it, not an overflow.
    let all = api.view("/api/v1/audit?since=99999999999w").await;
    assert_eq!(all.as_array().unwrap().len(), 3, "{all}");
    // Nor does a switch engaged for an absurd time overflow its end.
    let (status, out) = api
        .put_switch(
            json!({"engaged": true, "reason": "long", "for": "99999999999w", "replace": true}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
}

/// A GET of `path` with `token`: the status, the content type and the body's bytes.
async fn fetch_raw(
    api: &TestApi,
    path: &str,
    token: Option<&str>,
) -> (StatusCode, String, Vec<u8>) {
    let mut req = Request::builder().method(Method::GET).uri(path);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let resp = (api.router.clone())
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let kind = (resp.headers().get(header::CONTENT_TYPE))
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, kind, bytes.to_vec())
}

#[tokio::test]
async fn artifacts_are_served_to_viewers_with_their_type_capped_and_pruned_with_their_run() {
    let secrets = tempfile::tempdir().unwrap();
    let secret = secrets.path().join("token");
    std::fs::write(&secret, "s3cr3t-t0ken-abc").unwrap();
    let api = TestApi::with(
        &format!(
            "engine:\n  artifacts: {{ max_bytes: 1000, max_run_bytes: 1500 }}\ncredentials:\n  logs: {{ header: X-Token, file: {} }}\nretention: {{ runs: 1h }}\nbreaker: {{ window: 1m }}\n",
            secret.display()
        ),
        "",
    )
    .await;
    api.add_playbook(
        "evidence.yaml",
        r#"
name: evidence
matchers: ['alertname="Evidence"']
steps:
  - { name: first, action: kube.logs, with: { namespace: shop, pod: p, lines: 8 } }
  - { name: second, action: kube.logs, with: { namespace: shop, pod: p, lines: 9 } }
  - { name: third, action: kube.logs, with: { namespace: shop, pod: p, lines: 11 } }
"#,
    )
    .await;
    tokio::spawn(api.engine.clone().dispatch());
    let mut runs = Vec::new();
    for host in ["h1", "h2"] {
        let body = json!({"labels": {"alertname": "Evidence", "instance": host}}).to_string();
        let out = api.post_alert(&body).await;
        let id = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
        runs.push(wait_state(&api, id, "succeeded").await);
    }
    let (run, other) = (&runs[0], &runs[1]);
    let id = run["id"].as_i64().unwrap();
    let steps = run["steps"].as_array().unwrap();
    let url = format!("/api/v1/runs/{id}/artifacts/first-logs.txt");
    assert_eq!(
        steps[0]["artifacts"],
        json!([{"name": "first-logs.txt", "content_type": "text/plain; charset=utf-8", "size": 794, "url": url}])
    );
    // Over the run's cap, and over the artifact's: not kept, and the step says why.
    assert!(steps[1].get("artifacts").is_none());
    let refused = steps[1]["output"]["artifacts_refused"][0].as_str().unwrap();
    assert!(
        refused.contains("1688 bytes, over engine.artifacts.max_run_bytes (1500)"),
        "{refused}"
    );
    let refused = steps[2]["output"]["artifacts_refused"][0].as_str().unwrap();
    assert_eq!(
        refused,
        "artifact third-logs.txt refused: 1094 bytes is over engine.artifacts.max_bytes (1000)"
    );

    let (status, kind, body) = fetch_raw(&api, &url, Some("viewer-token")).await;
    assert_eq!(
        (status, kind.as_str()),
        (StatusCode::OK, "text/plain; charset=utf-8")
    );
    // A log is redacted as outputs are: the configured credential is not in it.
    assert_eq!(body.len(), 794);
    assert!(body.starts_with(b"token=[redacted]"), "{:?}", &body[..30]);
    assert_eq!(
        fetch_raw(&api, &url, None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        fetch_raw(&api, &url, Some("webhook-token")).await.0,
        StatusCode::FORBIDDEN
    );
    // Another run's name, an unknown run: 404 with a message.
    let other_id = other["id"].as_i64().unwrap();
    let (status, answer) = api
        .call(
            Method::GET,
            &format!("/api/v1/runs/{other_id}/artifacts/second-logs.txt"),
            Some("viewer-token"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("has no artifact")
    );
    let (status, _) = api
        .call(
            Method::GET,
            "/api/v1/runs/424242/artifacts/first-logs.txt",
            Some("viewer-token"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Retention keeps a run an hour here: not yet, then gone with its artifacts.
    assert_eq!(api.engine.prune().await.unwrap(), 0);
    api.clock.advance(std::time::Duration::from_secs(3601));
    assert!(api.engine.prune().await.unwrap() > 0);
    let metrics = api.engine.metrics();
    assert_eq!(metrics.store_pruned.with_label_values(&["runs"]).get(), 2);
    // Each run kept its first step's log.
    assert_eq!(
        metrics.store_pruned.with_label_values(&["artifacts"]).get(),
        2
    );
    assert_eq!(metrics.store_rows.with_label_values(&["runs"]).get(), 0);
    assert_eq!(
        fetch_raw(&api, &url, Some("viewer-token")).await.0,
        StatusCode::NOT_FOUND
    );
}

/// A step's error holding a NUL (a script's exception here; a remote command's stderr alike)
/// left its run `running` on PostgreSQL, which cannot store NUL: the record of the step was
/// refused at every try. The error is kept with U+FFFD in its place, on either store.
#[tokio::test]
async fn a_step_error_holding_a_nul_is_recorded_and_its_run_ends() {
    let api = TestApi::new().await;
    let playbook = r#"
name: nul
matchers: ['alertname="Nul"']
steps:
  - name: out
    action: script
    with: { script: '"out\x00put"' }
  - name: boom
    action: script
    with: { script: 'throw "bad\x00value"' }
"#;
    api.add_playbook("nul.yaml", playbook).await;
    tokio::spawn(api.engine.clone().dispatch());
    let out = (api.post_alert(r#"{"labels": {"alertname": "Nul", "instance": "x"}}"#)).await;
    let run_id = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
    let run = wait_state(&api, run_id, "failed").await;
    assert_eq!(run["steps"][0]["output"], "out\u{0}put", "{run}");
    let error = run["steps"][1]["error"].as_str().unwrap();
    assert!(error.contains("bad\u{fffd}value"), "{error}");
    assert!(
        run["error"].as_str().unwrap().contains("bad\u{fffd}value"),
        "{run}"
    );
}

/// Makes the store's database refuse each row of `event` (`UPDATE ON steps`) for which
/// `when` holds, with the error `why`, as a database refuses a value it cannot take.
async fn refuse_rows(api: &TestApi, event: &str, when: &str, why: &str) {
    let sql = if api.store.path().is_none() {
        format!(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql
               AS $$ BEGIN RAISE EXCEPTION '{why}'; END $$;
             CREATE TRIGGER refuse BEFORE {event} FOR EACH ROW WHEN ({when})
               EXECUTE FUNCTION refuse()"
        )
    } else {
        format!(
            "CREATE TRIGGER refuse BEFORE {event} WHEN {when}
               BEGIN SELECT RAISE(ABORT, '{why}'); END"
        )
    };
    (api.store).write(move |c| c.batch(&sql)).await.unwrap();
}

/// A step result the database refuses for what it says (here a trigger refuses an output
/// holding "poison"; a NUL on PostgreSQL was one such text) does not leave its run `running`,
/// holding its target, until a restart: the run ends in the state it reached, with a note in
/// place of the texts. Both where the result goes with the next step's start (`mid`) and
/// with the run's end (`last`).
#[tokio::test]
async fn a_run_whose_step_result_the_store_refuses_still_ends_with_a_note() {
    let api = TestApi::new().await;
    for (name, first, second) in [("mid", "poison", "fine"), ("last", "fine", "poison")] {
        let playbook = format!(
            r#"
name: {name}
matchers: ['alertname="{name}"']
steps:
  - name: one
    action: script
    with: {{ script: '"{first}"' }}
  - name: two
    action: script
    with: {{ script: '"{second}"' }}
"#
        );
        api.add_playbook(&format!("{name}.yaml"), &playbook).await;
    }
    refuse_rows(
        &api,
        "UPDATE ON steps",
        "NEW.output LIKE '%poison%'",
        "poisoned output",
    )
    .await;
    tokio::spawn(api.engine.clone().dispatch());
    let mut ended = Vec::new();
    for name in ["mid", "last"] {
        let alert = format!(r#"{{"labels": {{"alertname": "{name}", "instance": "{name}"}}}}"#);
        let out = api.post_alert(&alert).await;
        let run_id = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
        let state = if name == "mid" { "failed" } else { "succeeded" };
        ended.push(wait_state(&api, run_id, state).await);
    }
    let [mid, last] = &ended[..] else {
        unreachable!()
    };
    // `mid`: the first step's result went with the second's start, which was refused, so the
    // second never acted; the first is recorded as it ended, without its output.
    assert_eq!(mid["steps"][0]["state"], "succeeded", "{mid}");
    assert_eq!(mid["steps"][0]["output"], Value::Null, "{mid}");
    let noted = |v: &Value| {
        v.as_str()
            .is_some_and(|e| e.contains("refused by the store"))
    };
    assert!(noted(&mid["steps"][0]["error"]), "{mid}");
    assert_eq!(mid["steps"][1]["state"], "skipped", "{mid}");
    assert!(noted(&mid["error"]), "{mid}");
    // `last`: both steps acted; the first is recorded whole, the last with a note.
    assert_eq!(last["steps"][0]["output"], "fine", "{last}");
    assert_eq!(last["steps"][1]["state"], "succeeded", "{last}");
    assert_eq!(last["steps"][1]["output"], Value::Null, "{last}");
    assert!(noted(&last["steps"][1]["error"]), "{last}");
    assert!(noted(&last["error"]), "{last}");
    let report = api.store.verify_audit().await.unwrap();
    assert!(report.broken.is_none(), "{:?}", report.broken);
}

/// Artifacts the store cannot take do not fail a step that acted: the step's result is
/// recorded, and its output says why its artifacts were not kept. (The run failed, "cannot
/// record step state", with the step left `running`.)
#[tokio::test]
async fn artifacts_the_store_refuses_are_noted_and_the_step_still_recorded() {
    let api = TestApi::new().await;
    api.add_playbook(
        "evidence.yaml",
        r#"
name: evidence
matchers: ['alertname="Evidence"']
steps:
  - { name: logs, action: kube.logs, with: { namespace: shop, pod: p, lines: 3 } }
  - { name: after, action: script, with: { script: '"went on"' } }
"#,
    )
    .await;
    refuse_rows(&api, "INSERT ON artifacts", "true", "no artifacts today").await;
    tokio::spawn(api.engine.clone().dispatch());
    let out = (api.post_alert(r#"{"labels": {"alertname": "Evidence", "instance": "h"}}"#)).await;
    let run_id = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
    let run = wait_state(&api, run_id, "succeeded").await;
    let step = &run["steps"][0];
    assert_eq!(step["state"], "succeeded", "{run}");
    assert!(step.get("artifacts").is_none(), "{run}");
    let refused = step["output"]["artifacts_refused"][0].as_str().unwrap();
    assert!(
        refused.contains("could not be stored") && refused.contains("no artifacts today"),
        "{refused}"
    );
    assert_eq!(run["steps"][1]["output"], "went on", "{run}");
}

/// A refusal is on the record whatever the chat user's id holds: one holding a NUL was left
/// out of the audit log on PostgreSQL, which cannot store it ("cannot audit a refused
/// request"), and kept raw on SQLite. Every audit row keeps U+FFFD in its place.
#[tokio::test]
async fn a_chat_refusal_from_a_user_id_holding_nul_is_on_the_record() {
    let (api, id, hash, base, _got, _dir) = slack_api().await;
    let now = api.store.now_ms() / 1000;
    let payload = click(
        "U\u{0}1",
        "approve",
        &format!("{id}:{hash}"),
        &format!("{base}hook"),
    );
    let (status, out) = send(&api, slack_request("s3cret", now, &payload)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{out}");
    let refused: Vec<(String, String)> = (api.store)
        .read(|c| {
            c.rows(
                "SELECT actor, coalesce(detail, '') FROM audit WHERE outcome = 'refused'",
                &[],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .await
        .unwrap();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0, "slack:U\u{fffd}1");
    assert!(
        refused[0].1.contains("U\u{fffd}1 is not mapped"),
        "{refused:?}"
    );
    let report = api.store.verify_audit().await.unwrap();
    assert!(report.broken.is_none(), "{:?}", report.broken);
    let approvals = api.view("/api/v1/approvals").await;
    assert_eq!(approvals[0]["state"], "pending", "{approvals}");
}

/// Prometheus 3 and Alertmanager 0.27 send any UTF-8 label name (`service.name`): such an
/// alert was refused with 400, which Alertmanager does not retry. It is taken, a quoted name
/// matches it, and a template reads it by index.
#[tokio::test]
async fn an_alert_with_utf8_label_names_is_matched_and_rendered() {
    let api = TestApi::new().await;
    let playbook = r#"
name: otel
matchers: ['"service.name"="checkout"']
steps:
  - action: log
    with: { message: 'service {{ labels["service.name"] }} on {{ labels["k8s.pod.name"] }}' }
"#;
    api.add_playbook("otel.yaml", playbook).await;
    tokio::spawn(api.engine.clone().dispatch());
    let mut payload = disk_payload();
    payload["alerts"][0]["labels"] =
        json!({"alertname": "Checkout", "service.name": "checkout", "k8s.pod.name": "co-1"});
    let (status, answer) = api.post_alertmanager(&payload).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let run_id = answer["outcomes"][0][0]["run_id"].as_i64().unwrap();
    let run = wait_state(&api, run_id, "succeeded").await;
    assert_eq!(
        run["steps"][0]["args"]["message"], "service checkout on co-1",
        "{run}"
    );
}
