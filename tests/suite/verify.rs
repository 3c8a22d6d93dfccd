//! `verify` steps against a real Prometheus, `http` steps against a local receiver, and the
//! playbook's `on_failure` steps.

use crate::common::TestApp;
use crate::common::prometheus::{Prometheus, serve_changing_metrics, serve_metrics};
use crate::common::receiver::Receiver;
use serde_json::json;

const METRICS: &str = "# TYPE test_error_ratio gauge\ntest_error_ratio{service=\"checkout\"} 0.002\ntest_error_ratio{service=\"search\"} 0.2\n";

const PLAYBOOK: &str = r#"
name: verify-errors
matchers: ['alertname="HighErrorRate"']
steps:
  - name: check
    action: verify
    with:
      query: 'test_error_ratio{service="{{ labels.service }}"}'
      condition: "value < 0.01"
      interval: 1s
    timeout: 4s
on_failure:
  - name: escalate
    action: log
    with: { message: "error rate still high on {{ labels.service }}: paging" }
"#;

fn alert(service: &str) -> String {
    json!({"labels": {"alertname": "HighErrorRate", "service": service}, "startsAt": "2026-11-22T10:00:00Z"}).to_string()
}

#[tokio::test]
async fn verify_passes_when_the_query_holds_and_escalates_when_it_does_not() {
    let target = serve_metrics(METRICS).await;
    let prom = Prometheus::start(&target).await;
    let app = TestApp::builder()
        .playbook("verify.yaml", PLAYBOOK)
        .config(&format!("prometheus_url: {}\n", prom.base))
        .start()
        .await;

    let (_, ok) = app
        .post_raw("/api/v1/webhooks/generic", alert("checkout"))
        .await;
    let (_, bad) = app
        .post_raw("/api/v1/webhooks/generic", alert("search"))
        .await;
    let ok = ok["outcomes"][0][0]["run_id"].as_i64().unwrap();
    let bad = bad["outcomes"][0][0]["run_id"].as_i64().unwrap();

    let run = app.wait_run_state(ok, "succeeded").await;
    assert_eq!(run["steps"][0]["output"]["values"], json!([0.002]));
    assert_eq!(
        run["steps"][0]["args"]["query"],
        "test_error_ratio{service=\"checkout\"}"
    );
    assert_eq!(run["steps"][1]["phase"], "on_failure");
    assert_eq!(
        run["steps"][1]["state"], "skipped",
        "no escalation when the fix worked"
    );

    let run = app.wait_run_state(bad, "failed").await;
    let check = &run["steps"][0];
    assert_eq!(check["state"], "failed");
    let error = check["error"].as_str().unwrap();
    assert!(
        error.contains("did not hold within 4s") && error.contains("last: value 0.2"),
        "{error}"
    );
    let escalate = &run["steps"][1];
    assert_eq!(escalate["state"], "succeeded", "{run:#}");
    assert_eq!(
        escalate["output"]["message"],
        "error rate still high on search: paging"
    );
}

#[tokio::test]
async fn http_steps_send_the_exact_request_with_credentials_from_config() {
    let rx = Receiver::start().await;
    let playbook = format!(
        r#"
name: status-page
matchers: ['alertname="Outage"']
steps:
  - name: post-incident
    action: http
    with:
      method: POST
      url: "{}/v1/incidents/{{{{ labels.service }}}}?notify=true"
      headers: {{ X-Source: reflex }}
      body: {{ title: "{{{{ labels.service }}}} degraded", status: investigating }}
      expect_status: [200, 201]
      credential: statuspage
"#,
        rx.base
    );
    let app = TestApp::builder()
        .playbook("status.yaml", &playbook)
        .config("credentials:\n  statuspage: { prefix: 'OAuth ', env: REFLEX_TEST_TOKEN }\n")
        .start()
        .await;
    let body = json!({"labels": {"alertname": "Outage", "service": "pay/../admin"}, "startsAt": "2026-11-22T10:00:00Z"});
    app.post_raw("/api/v1/webhooks/generic", body.to_string())
        .await;
    let run = app.wait_run_state(1, "succeeded").await;
    let reqs = rx.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(
        r.path, "/v1/incidents/pay%2F..%2Fadmin?notify=true",
        "the label cannot change the path"
    );
    assert_eq!(r.header("authorization"), Some("OAuth xoxb-test-token"));
    assert_eq!(r.header("x-source"), Some("reflex"));
    assert_eq!(
        r.body,
        json!({"title": "pay/../admin degraded", "status": "investigating"})
    );
    assert_eq!(run["steps"][0]["output"]["status"], 200);
    assert!(
        !run.to_string().contains("xoxb-test-token"),
        "the secret is not in the record"
    );
}

#[tokio::test]
async fn an_unreachable_prometheus_is_reported_as_a_failed_query_not_a_false_condition() {
    let port = crate::common::free_port();
    let app = crate::common::TestApp::builder()
        .playbook(
            "check.yaml",
            "name: check\nmatchers: ['alertname=\"Check\"']\nsteps:\n  - action: verify\n    with: { query: up, condition: \"value > 0\", interval: 200ms }\n    timeout: 1s\n",
        )
        .config(&format!("prometheus_url: http://127.0.0.1:{port}\n"))
        .start()
        .await;
    let (_, out) = app
        .post_raw(
            "/api/v1/webhooks/generic",
            r#"{"labels": {"alertname": "Check"}}"#,
        )
        .await;
    let id = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
    let run = app.wait_run_state(id, "failed").await;
    let error = run["steps"][0]["error"].as_str().unwrap();
    assert!(error.starts_with("the query `up` failed"), "{error}");
    assert!(
        error.contains(&format!(
            "cannot reach Prometheus at http://127.0.0.1:{port}"
        )),
        "{error}"
    );
    assert!(
        error.to_lowercase().contains("connection refused"),
        "{error}"
    );
    assert!(!error.contains("did not hold"), "{error}");
}

const WINDOW_PLAYBOOK: &str = r#"
name: verify-window
matchers: ['alertname="HighErrorRate"']
steps:
  - name: check
    action: verify
    with:
      query: 'test_error_ratio{service="{{ labels.service }}"}'
      condition: "value < 0.01"
      interval: 500ms
      for: 4s
    timeout: 20s
"#;

fn ratio(checkout: f64, search: f64, shipping: f64) -> String {
    format!(
        "# TYPE test_error_ratio gauge\ntest_error_ratio{{service=\"checkout\"}} {checkout}\n\
         test_error_ratio{{service=\"search\"}} {search}\ntest_error_ratio{{service=\"shipping\"}} {shipping}\n"
    )
}

/// Waits until the run's first step shows its verification window under way.
async fn verifying(app: &TestApp, id: i64) -> serde_json::Value {
    for _ in 0..200 {
        let run = app.run(id).await;
        let step = &run["steps"][0];
        if step["state"] == "running" && step["output"]["verifying"]["until"].is_string() {
            return run;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("run {id} never started its verification window");
}

#[tokio::test]
async fn a_verification_window_passes_only_after_it_and_fails_when_the_condition_breaks_or_the_alert_fires_again()
 {
    let metrics = std::sync::Arc::new(std::sync::Mutex::new(ratio(0.002, 0.002, 0.002)));
    let target = serve_changing_metrics(metrics.clone()).await;
    let prom = Prometheus::start(&target).await;
    let app = TestApp::builder()
        .playbook("verify.yaml", WINDOW_PLAYBOOK)
        .config(&format!("prometheus_url: {}\n", prom.base))
        .start()
        .await;
    let post = |service: &str, starts: &str| {
        let body = json!({"labels": {"alertname": "HighErrorRate", "service": service}, "startsAt": starts});
        app.post_raw("/api/v1/webhooks/generic", body.to_string())
    };
    let run_of = |out: serde_json::Value| out["outcomes"][0][0]["run_id"].as_i64().unwrap();
    let held = run_of(post("checkout", "2026-11-22T10:00:00Z").await.1);
    let broken = run_of(post("search", "2026-11-22T10:00:00Z").await.1);
    let refired = run_of(post("shipping", "2026-11-22T10:00:00Z").await.1);

    // While the windows run, each step says until when.
    let run = verifying(&app, held).await;
    let verifying_now = &run["steps"][0]["output"]["verifying"];
    assert_eq!(verifying_now["for"], "4s", "{run}");
    let left = verifying_now["left_seconds"].as_u64().unwrap();
    assert!(left <= 4, "the time left, as the API shows it: {run}");
    verifying(&app, broken).await;
    verifying(&app, refired).await;
    // search breaks inside its window; shipping's alert fires again (a new occurrence).
    *metrics.lock().unwrap() = ratio(0.002, 0.2, 0.002);
    post("shipping", "2026-11-22T10:05:00Z").await;

    let run = app.wait_run_state(broken, "failed").await;
    let error = run["steps"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("held for")
            && error.contains("of the 4s verification window, then broke")
            && error.contains("value 0.2"),
        "{error}"
    );
    let run = app.wait_run_state(refired, "failed").await;
    let error = run["steps"][0]["error"].as_str().unwrap();
    assert!(error.contains("the alert fired again"), "{error}");

    let run = app.wait_run_state(held, "succeeded").await;
    let step = &run["steps"][0];
    assert_eq!(step["output"]["held_for"], "4s");
    assert_eq!(step["output"]["summary"], "Verified for 4s.");
    let at = |k: &str| humantime::parse_rfc3339(step[k].as_str().unwrap()).unwrap();
    let took = at("finished_at").duration_since(at("started_at")).unwrap();
    assert!(
        took >= std::time::Duration::from_secs(4),
        "passed after the window, not before: {took:?}"
    );
}

/// A hole inside a PromQL string literal reaches a real Prometheus as exactly the value,
/// whatever it holds: `absent(…{v="…"})` answers a series labelled with the literal it was
/// given. In a regex literal (after `=~`) every value leaves a query Prometheus accepts.
#[test]
fn promql_string_holes_reach_a_real_prometheus_as_the_value() {
    use proptest::prelude::*;
    use reflex::alert::parse_generic;
    use reflex::playbook::script::{Sandbox, alert_scope};
    use reflex::playbook::template::{Quoting, Template};

    let rt = tokio::runtime::Runtime::new().unwrap();
    let prom = rt.block_on(async { Prometheus::start(&serve_metrics(METRICS).await).await });
    let client = reqwest::Client::new();
    let query = |q: String| {
        rt.block_on(async {
            let answer = client
                .get(format!("{}/api/v1/query", prom.base))
                .query(&[("query", q.as_str())])
                .timeout(std::time::Duration::from_secs(10))
                .send()
                .await
                .unwrap();
            answer.json::<serde_json::Value>().await.unwrap()
        })
    };
    let sb = Sandbox::new();
    let compile = |src: &str| Template::compile(&sb, src, Quoting::PromQl).unwrap();
    let literals = [
        compile(r#"absent(reflex_none{v="{{ labels.instance }}"})"#),
        compile(r#"absent(reflex_none{v='{{ labels.instance }}'})"#),
    ];
    let regex = compile(r#"absent(reflex_none{v=~"{{ labels.instance }}"})"#);
    let render = |t: &Template, value: &str| {
        let body = json!({"labels": {"instance": value}}).to_string();
        let alerts = parse_generic(body.as_bytes(), "2026-12-06T00:00:00Z").unwrap();
        let out = t.render(&sb, &mut alert_scope(&alerts[0])).unwrap();
        out.as_str().unwrap().to_string()
    };
    proptest!(ProptestConfig::with_cases(200), |(value in "[^\u{0}]{1,24}")| {
        for t in &literals {
            let q = render(t, &value);
            let answer = query(q.clone());
            prop_assert_eq!(
                &answer["data"]["result"][0]["metric"]["v"], &json!(value), "{}: {}", q, answer
            );
        }
        let q = render(&regex, &value);
        let answer = query(q.clone());
        prop_assert_eq!(&answer["status"], "success", "{}: {}", q, answer);
    });
}
