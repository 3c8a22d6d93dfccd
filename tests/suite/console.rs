//! The web console in a real browser: headless Chromium over WebDriver against the real
//! daemon. Screenshots of every page land in `target/console-screenshots/`.

use crate::common::browser::{BROWSER_TZ, Browser};
use crate::common::{TestApp, auth_config, token_hash};
use fantoccini::Locator;
use serde_json::{Value, json};

const GATED: &str = r#"
name: restart-web
description: Restarts the web service after an operator approves
matchers: ['alertname="WebDown"']
approval: { count: 1, expires: 30m }
steps:
  - name: restart
    action: log
    with: { message: "restarting web on {{ labels.instance }}" }
  - name: confirm
    action: log
    with: { message: "web on {{ labels.instance }} restarted" }
"#;

async fn app() -> TestApp {
    TestApp::builder()
        .playbook("restart-web.yaml", GATED)
        .config(&auth_config(&[
            ("alice", "approver"),
            ("root", "admin"),
            ("vera", "viewer"),
            ("hook", "webhook"),
        ]))
        .start()
        .await
}

/// Posts a WebDown alert for `instance`; waits until its run waits for approval and returns
/// the run's and the approval's ids.
async fn pending_approval(app: &TestApp, instance: &str) -> (i64, i64) {
    let alert = json!({"labels": {"alertname": "WebDown", "instance": instance}});
    let (status, out) = app
        .call(
            "POST",
            "/api/v1/webhooks/generic",
            Some("hook-token"),
            Some(alert),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    let run_id = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
    let approval = app
        .wait_for(20, "an approval request", || async {
            let (_, list) = app
                .call(
                    "GET",
                    "/api/v1/approvals?state=pending",
                    Some("root-token"),
                    None,
                )
                .await;
            list.as_array()?
                .iter()
                .find(|a| a["run_id"] == run_id)
                .and_then(|a| a["id"].as_i64())
        })
        .await;
    (run_id, approval)
}

async fn approval_state(app: &TestApp, id: i64) -> Value {
    let path = format!("/api/v1/approvals/{id}");
    app.call("GET", &path, Some("root-token"), None).await.1["state"].clone()
}

async fn login(b: &Browser, base: &str, token: &str, shot: Option<&str>) {
    b.client.goto(&format!("{base}/ui/login")).await.unwrap();
    b.wait_for("#token").await.send_keys(token).await.unwrap();
    if let Some(name) = shot {
        b.screenshot(name).await;
    }
    b.client
        .find(Locator::Id("login"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_for("#who").await;
}

async fn logout(b: &Browser) {
    let button = b
        .client
        .find(Locator::Css("header .who button"))
        .await
        .unwrap();
    button.click().await.unwrap();
    b.wait_for("#token").await;
}

#[tokio::test]
async fn an_operator_approves_watches_and_throws_the_kill_switch_in_a_real_browser() {
    let app = app().await;
    let b = Browser::start().await;
    let base = app.base.clone();

    // An approver logs in and sees a pending approval appear without reloading.
    login(&b, &base, "alice-token", Some("01-login")).await;
    b.client
        .goto(&format!("{base}/ui/approvals"))
        .await
        .unwrap();
    b.wait_for("#none-pending").await;
    let (run_id, approval_id) = pending_approval(&app, "web-1").await;
    let card = format!("#approval-{approval_id}");
    b.wait_for(&card).await;
    let plan = b.text(&format!("{card} ol.plan")).await;
    assert!(plan.contains("restarting web on web-1"), "{plan}");
    b.screenshot("02-approvals-pending").await;

    // Times are shown in the viewer's zone, with the UTC instant kept in the title.
    let shown = b.text(&format!("{card} time")).await;
    assert!(shown.contains("GMT+9"), "{shown} is not in {BROWSER_TZ}");

    // Approve with a comment: the run page follows the run to its end.
    let comment = b
        .client
        .find(Locator::Css(&format!("{card} input[name=comment]")))
        .await;
    comment
        .unwrap()
        .send_keys("web is down for everyone")
        .await
        .unwrap();
    let approve = b
        .client
        .find(Locator::Css(&format!("{card} button.approve")))
        .await;
    approve.unwrap().click().await.unwrap();
    b.wait_text("#run-state", "succeeded").await;
    assert!(
        b.client
            .current_url()
            .await
            .unwrap()
            .path()
            .ends_with(&format!("/ui/runs/{run_id}"))
    );
    assert_eq!(b.count("li.step[data-state=succeeded]").await, 2);
    b.screenshot("03-run-succeeded").await;
    let decided = app
        .call(
            "GET",
            &format!("/api/v1/approvals/{approval_id}"),
            Some("root-token"),
            None,
        )
        .await
        .1;
    assert_eq!(decided["decided_by"], "alice");
    assert_eq!(decided["comment"], "web is down for everyone");

    // A run page open while another approver decides elsewhere updates live (no reload: a
    // marker set in the page survives).
    let (run2, approval2) = pending_approval(&app, "web-2").await;
    b.client
        .goto(&format!("{base}/ui/runs/{run2}"))
        .await
        .unwrap();
    b.wait_text("#run-state", "awaiting_approval").await;
    b.screenshot("04-run-awaiting-approval").await;
    b.client
        .execute("window.__sameDocument = true;", vec![])
        .await
        .unwrap();
    let (status, _) = app
        .call(
            "POST",
            &format!("/api/v1/approvals/{approval2}/approve"),
            Some("root-token"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    b.wait_text("#run-state", "succeeded").await;
    let same = b
        .client
        .execute("return window.__sameDocument === true;", vec![])
        .await
        .unwrap();
    assert_eq!(
        same,
        Value::Bool(true),
        "the page was reloaded instead of updated"
    );

    b.client.goto(&format!("{base}/ui/runs")).await.unwrap();
    b.wait_for("#runs").await;
    b.screenshot("05-runs").await;
    logout(&b).await;

    // An admin engages the global kill switch, sees it everywhere, and releases it.
    login(&b, &base, "root-token", None).await;
    b.client
        .goto(&format!("{base}/ui/killswitch"))
        .await
        .unwrap();
    b.wait_for("#global-reason")
        .await
        .send_keys("database failover in progress")
        .await
        .unwrap();
    b.client
        .find(Locator::Id("global-for"))
        .await
        .unwrap()
        .send_keys("2h")
        .await
        .unwrap();
    b.client
        .find(Locator::Id("engage-global"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_for("#release-global").await;
    let banner = b.text("#global-kill").await;
    assert!(
        banner.contains("engaged by root: database failover in progress"),
        "{banner}"
    );
    b.screenshot("06-killswitch-engaged").await;
    let (_, switches) = app
        .call("GET", "/api/v1/killswitch", Some("root-token"), None)
        .await;
    assert_eq!(switches["global"]["engaged"], true, "{switches}");
    assert_eq!(switches["global"]["actor"], "root");
    b.client
        .find(Locator::Id("release-global"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_for("#engage-global").await;
    assert_eq!(b.count("#global-kill").await, 0);
    let (_, switches) = app
        .call("GET", "/api/v1/killswitch", Some("root-token"), None)
        .await;
    assert_eq!(switches["global"]["engaged"], false, "{switches}");
    b.screenshot("07-killswitch-released").await;

    b.client
        .goto(&format!("{base}/ui/playbooks"))
        .await
        .unwrap();
    b.wait_for("#playbooks").await;
    b.screenshot("08-playbooks").await;
    b.client.goto(&format!("{base}/ui/audit")).await.unwrap();
    b.wait_for("#audit").await;
    b.screenshot("09-audit").await;

    // A form forged into the page without the CSRF token is refused and changes nothing.
    let (_, approval3) = pending_approval(&app, "web-3").await;
    b.client
        .goto(&format!("{base}/ui/approvals"))
        .await
        .unwrap();
    b.wait_for(&format!("#approval-{approval3}")).await;
    let forge = format!(
        "const f = document.createElement('form'); f.method = 'post';
         f.action = '/ui/approvals/{approval3}/decide';
         const d = document.createElement('input'); d.name = 'decision'; d.value = 'approve';
         f.appendChild(d); document.body.appendChild(f); f.submit();"
    );
    b.client.execute(&forge, vec![]).await.unwrap();
    let message = b.wait_for("#error-message").await.text().await.unwrap();
    assert!(
        message.contains("CSRF token is missing or wrong"),
        "{message}"
    );
    b.screenshot("10-forged-form-refused").await;
    assert_eq!(approval_state(&app, approval3).await, "pending");
    b.client.goto(&format!("{base}/ui/runs")).await.unwrap();
    logout(&b).await;

    // A viewer sees the pending approval, the run and the switches, and no button but
    // "Log out".
    login(&b, &base, "vera-token", None).await;
    for path in [
        "/ui/approvals".to_string(),
        format!("/ui/runs/{run2}"),
        "/ui/killswitch".into(),
        "/ui/playbooks".into(),
    ] {
        b.client.goto(&format!("{base}{path}")).await.unwrap();
        b.wait_for("main h1").await;
        assert_eq!(
            b.count("main button").await,
            0,
            "{path} shows a viewer a button"
        );
        assert_eq!(
            b.count("main form").await,
            0,
            "{path} shows a viewer a form"
        );
    }
    b.client
        .goto(&format!("{base}/ui/approvals"))
        .await
        .unwrap();
    b.wait_for(&format!("#approval-{approval3}")).await;
    b.screenshot("11-viewer-approvals").await;
    assert_eq!(approval_state(&app, approval3).await, "pending");
}

/// An HTTP client that shows redirects instead of following them.
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Logs in over plain HTTP as a browser would; the session cookie (`name=value`).
async fn http_login(app: &TestApp, token: &str) -> String {
    let http = no_redirects();
    let page = http
        .get(format!("{}/ui/login", app.base))
        .send()
        .await
        .unwrap();
    let cookie = |r: &reqwest::Response, name: &str| {
        r.headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with(&format!("{name}=")))
            .map(|v| v.split(';').next().unwrap().to_string())
    };
    let login_cookie = cookie(&page, "reflex_login").unwrap();
    let html = page.text().await.unwrap();
    let at = html.find("name=\"csrf\" value=\"").unwrap() + 19;
    let csrf = html[at..].split('"').next().unwrap();
    let resp = http
        .post(format!("{}/ui/login", app.base))
        .header("cookie", login_cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={token}&csrf={csrf}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    cookie(&resp, "reflex_session").expect("a session cookie")
}

/// The status of a console page fetched with `cookie`.
async fn page_status(app: &TestApp, cookie: &str) -> u16 {
    let http = no_redirects();
    let resp = http
        .get(format!("{}/ui/runs", app.base))
        .header("cookie", cookie);
    resp.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn sessions_survive_a_restart_and_end_with_their_token_or_its_secret() {
    let mut app = app().await;
    let alice = http_login(&app, "alice-token").await;
    let root = http_login(&app, "root-token").await;
    let vera = http_login(&app, "vera-token").await;
    assert_eq!(page_status(&app, &alice).await, 200);
    // alice's token leaves the config, vera's gets a new secret; the daemon restarts.
    let config = std::fs::read_to_string(app.config_path()).unwrap();
    let changed: String = config
        .lines()
        .filter(|l| !l.contains("name: alice"))
        .map(|l| {
            let l = l.replace(&token_hash("vera-token"), &token_hash("vera-new-token"));
            format!("{l}\n")
        })
        .collect();
    assert!(!changed.contains("alice") && changed.contains(&token_hash("vera-new-token")));
    std::fs::write(app.config_path(), changed).unwrap();
    assert!(app.terminate(), "a clean stop");
    app.restart().await;
    assert_eq!(
        page_status(&app, &root).await,
        200,
        "root's session is kept"
    );
    assert_eq!(
        page_status(&app, &alice).await,
        303,
        "alice's session ended with her token"
    );
    let old = page_status(&app, &vera).await;
    assert_eq!(old, 303, "vera's session ended with her old secret");
    let vera = http_login(&app, "vera-new-token").await;
    assert_eq!(page_status(&app, &vera).await, 200);
}

#[tokio::test]
async fn an_approver_sees_the_error_rate_graph_and_the_deploy_history_before_approving_a_rollback()
{
    // A Deployment with a deploy on top, in the fake API server held to the RBAC role.
    let rbac =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/base/rbac.yaml");
    let fake = crate::common::fake_kube::FakeKube::start(Some(&rbac)).await;
    let dir = tempfile::tempdir().unwrap();
    for (i, image) in ["api:1.4.2", "api:1.5.0"].iter().enumerate() {
        let kind = if i == 0 { "create" } else { "patch" };
        let body = json!({
            "metadata": {"name": "api", "labels": {"app": "api"}},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "api"}},
                     "template": {"metadata": {"labels": {"app": "api"}}, "spec": {"containers": [{"name": "app", "image": image}]}}}
        });
        crate::common::fake_kube::admin_write(&fake, dir.path(), kind, "shop", body).await;
    }
    // Real Prometheus scraping request counters that grow, 1 in 10 an error.
    let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let target = crate::common::prometheus::serve_changing_metrics(text.clone()).await;
    let feeder = tokio::spawn(async move {
        for n in 0u64.. {
            *text.lock().unwrap() = format!(
                "http_requests_total{{namespace=\"shop\",deployment=\"api\",code=\"500\"}} {}\n\
                 http_requests_total{{namespace=\"shop\",deployment=\"api\",code=\"200\"}} {}\n",
                n * 10,
                n * 90
            );
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    });
    let prom = crate::common::prometheus::Prometheus::start(&target).await;
    // Enough samples for a rate, waited for on the condition.
    let http = reqwest::Client::new();
    for attempt in 0.. {
        let body: Value = (http.get(format!("{}/api/v1/query", prom.base)))
            .query(&[("query", "count_over_time(http_requests_total[1m])")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let n = body["data"]["result"][0]["value"][1]
            .as_str()
            .unwrap_or("0");
        if n.parse::<f64>().unwrap_or(0.0) >= 3.0 {
            break;
        }
        assert!(attempt < 150, "Prometheus never scraped 3 samples: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let config = format!(
        "prometheus_url: {}\nkubernetes:\n  clusters:\n    prod: {{ kubeconfig: {} }}\n{}",
        prom.base,
        fake.kubeconfig(dir.path()).display(),
        auth_config(&[("alice", "approver"), ("hook", "webhook")])
    );
    let app = TestApp::builder()
        .example_playbooks()
        .config(&config)
        .start()
        .await;
    let alert: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples/alerts/error-rate-after-deploy.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let path = "/api/v1/webhooks/alertmanager";
    let (status, out) = app
        .call("POST", path, Some("hook-token"), Some(alert))
        .await;
    assert_eq!(status, 200, "{out}");
    let run_id = out["outcomes"][0][0]["run_id"].as_i64().unwrap();

    let b = Browser::start().await;
    login(&b, &app.base, "alice-token", None).await;
    b.client
        .goto(&format!("{}/ui/approvals", app.base))
        .await
        .unwrap();
    let card = b.wait_for("article.approval").await;
    let id = card.attr("id").await.unwrap().unwrap();
    // The graph is shown, loaded, before anyone approves; the history says what was deployed.
    let graph = format!("#{id} img.evidence-graph");
    b.wait_for(&graph).await;
    let width_js = format!("return document.querySelector('{graph}').naturalWidth;");
    let mut width = 0;
    for _ in 0..100 {
        width = b
            .client
            .execute(&width_js, vec![])
            .await
            .unwrap()
            .as_u64()
            .unwrap_or(0);
        if width > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(width, u64::from(reflex::chart::WIDTH), "the graph loaded");
    let evidence = b.text(&format!("#{id} section.evidence")).await;
    assert!(evidence.contains("revision 2 (current)"), "{evidence}");
    assert!(
        evidence.contains("api:1.5.0") && evidence.contains("api:1.4.2"),
        "{evidence}"
    );
    assert!(
        evidence.contains("Share of 5xx answers, shop/api: min "),
        "{evidence}"
    );
    b.screenshot("20-approval-with-evidence").await;
    let approve = b
        .client
        .find(Locator::Css(&format!("#{id} button.approve")))
        .await;
    approve.unwrap().click().await.unwrap();
    b.wait_text("#run-state", "succeeded").await;
    // The run page shows the graph with its step.
    assert_eq!(b.count("li.step img.evidence-graph").await, 1);
    b.screenshot("21-run-with-evidence").await;
    let run = app
        .call(
            "GET",
            &format!("/api/v1/runs/{run_id}"),
            Some("alice-token"),
            None,
        )
        .await
        .1;
    assert_eq!(
        crate::common::step(&run, "rollback")["output"]["to_revision"],
        1
    );
    feeder.abort();
}
