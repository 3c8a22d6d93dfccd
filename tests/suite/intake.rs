//! Intake through the real binary: Alertmanager and generic webhooks become recorded runs,
//! re-deliveries never start a second run, and bad input changes nothing.

use crate::common::{TestApp, fixture, generic_alert};
use serde_json::Value;

#[tokio::test]
async fn fixture_webhook_yields_one_run_per_alert_with_rendered_steps() {
    let app = TestApp::builder().example_playbooks().start().await;
    let (status, body) = app
        .post_alertmanager(&fixture("alertmanager-disk.json"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["alerts"], 2);

    let runs = app.runs().await;
    assert_eq!(runs.len(), 2, "one run per alert: {runs:#?}");
    let mut hosts = Vec::new();
    for run in &runs {
        assert_eq!(run["playbook"], "disk-cleanup");
        // No SSH inventory in this config: the cleanup step is refused, not attempted.
        let run = app
            .wait_run_state(run["id"].as_i64().unwrap(), "failed")
            .await;
        let steps = run["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0]["state"], "succeeded");
        assert_eq!(steps[1]["state"], "failed");
        let error = steps[1]["error"].as_str().unwrap();
        assert!(error.contains("not in the SSH inventory"), "{error}");
        assert_eq!(steps[1]["args"]["path"], "/var");
        let message = steps[0]["args"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("Disk space low on db-"),
            "rendered: {message}"
        );
        assert!(!message.contains("{{"), "rendered: {message}");
        hosts.push(run["params"]["host"].as_str().unwrap().to_string());
    }
    hosts.sort();
    assert_eq!(hosts, ["db-1.example.internal", "db-2.example.internal"]);
}

#[tokio::test]
async fn five_deliveries_of_one_payload_start_one_run_per_alert() {
    let app = TestApp::builder().example_playbooks().start().await;
    let payload = fixture("alertmanager-disk.json");
    for i in 0..5 {
        let (status, body) = app.post_alertmanager(&payload).await;
        assert_eq!(status, 200, "{body}");
        let want = if i == 0 { "created" } else { "deduplicated" };
        assert_eq!(
            body["outcomes"][0][0]["outcome"], want,
            "delivery {i}: {body}"
        );
    }
    assert_eq!(app.runs().await.len(), 2);
    assert_eq!(app.count("runs"), 2);
    assert_eq!(app.count("alerts"), 10, "every delivery is on the record");
}

#[tokio::test]
async fn resolved_alert_starts_nothing_unless_the_playbook_asks_for_it() {
    const ON_RESOLVE: &str = r#"
name: on-resolve
matchers: ['alertname="DiskSpaceLow"']
statuses: [resolved]
steps:
  - action: log
    with: { message: "{{ labels.instance }} recovered" }
"#;
    let app = TestApp::builder()
        .example_playbooks()
        .playbook("on-resolve.yaml", ON_RESOLVE)
        .start()
        .await;
    let (status, body) = app
        .post_alertmanager(&fixture("alertmanager-disk-resolved.json"))
        .await;
    assert_eq!(status, 200, "{body}");
    let runs = app.runs().await;
    let resolved: Vec<&Value> = runs
        .iter()
        .filter(|r| r["alert"]["status"] == "resolved")
        .collect();
    assert_eq!(resolved.len(), 1, "{runs:#?}");
    assert_eq!(
        resolved[0]["playbook"], "on-resolve",
        "disk-cleanup must not act on a resolved alert"
    );
    let firing: Vec<&Value> = runs
        .iter()
        .filter(|r| r["alert"]["status"] == "firing")
        .collect();
    assert!(firing.iter().all(|r| r["playbook"] == "disk-cleanup"));
}

#[tokio::test]
async fn bad_bodies_get_4xx_with_a_message_and_change_nothing() {
    let app = TestApp::builder()
        .example_playbooks()
        .config("intake:\n  max_body_bytes: 1048576\n")
        .start()
        .await;
    let wrong_shape = r#"{"version": "4", "groupKey": "g", "status": "firing", "receiver": "r", "alerts": [{"labels": "oops"}]}"#;
    let big = vec![b' '; 5 * 1024 * 1024];
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "/api/v1/webhooks/alertmanager",
            b"{\"alerts\": [".to_vec(),
            400,
        ),
        ("/api/v1/webhooks/alertmanager", wrong_shape.into(), 400),
        ("/api/v1/webhooks/alertmanager", big.clone(), 413),
        ("/api/v1/webhooks/generic", b"[1, 2]".to_vec(), 400),
        ("/api/v1/webhooks/generic", big, 413),
        // A second document after the first, and keys given twice, are refused whole.
        (
            "/api/v1/webhooks/alertmanager",
            format!("{} {{}}", fixture("alertmanager-disk.json")).into_bytes(),
            400,
        ),
        (
            "/api/v1/webhooks/generic",
            br#"{"labels": {"alertname": "DiskSpaceLow"}, "labels": {"alertname": "X"}}"#.to_vec(),
            400,
        ),
        (
            "/api/v1/webhooks/alertmanager",
            fixture("alertmanager-disk.json")
                .replacen("\"labels\": {", "\"labels\": {\"instance\": \"db-9\",", 1)
                .into_bytes(),
            400,
        ),
        (
            "/api/v1/webhooks/generic",
            format!(r#"{{"labels": {{"alertname": "{}"}}}}"#, "x".repeat(20_000)).into_bytes(),
            400,
        ),
    ];
    for (path, body, want) in cases {
        let (status, body) = app.post_fresh(path, body).await;
        assert_eq!(status, want, "{path}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{path}: no message in {body}");
    }
    assert_eq!(app.count("alerts"), 0);
    assert_eq!(app.count("runs"), 0);
    // Still serving, and still taking good alerts.
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, 200);
    let (status, body) = app
        .post_alertmanager(&fixture("alertmanager-disk.json"))
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn wrong_shape_message_names_the_field() {
    let app = TestApp::builder().start().await;
    let wrong = fixture("alertmanager-disk.json")
        .replace("\"truncatedAlerts\": 0", "\"truncatedAlerts\": \"zero\"");
    let (status, body) = app.post_alertmanager(&wrong).await;
    assert_eq!(status, 400);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("truncatedAlerts"), "{message}");
}

#[tokio::test]
async fn generic_webhook_takes_one_alert_or_a_list() {
    let app = TestApp::builder().example_playbooks().start().await;
    let one = generic_alert("DiskSpaceLow", "web-3:9100", "2026-11-22T09:00:00Z");
    let (status, body) = app.post_raw("/api/v1/webhooks/generic", one).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outcomes"][0][0]["outcome"], "created");
    let list = format!(
        "[{}, {}]",
        generic_alert("DiskSpaceLow", "web-4:9100", "2026-11-22T09:00:00Z"),
        generic_alert("SomethingElse", "web-4:9100", "2026-11-22T09:00:00Z")
    );
    let (status, body) = app.post_raw("/api/v1/webhooks/generic", list).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["alerts"], 2);
    assert_eq!(
        body["outcomes"][1],
        serde_json::json!([]),
        "no playbook for SomethingElse"
    );
    assert_eq!(app.runs().await.len(), 2);
}

#[tokio::test]
async fn cooldown_suppresses_a_new_occurrence_and_records_why() {
    let app = TestApp::builder().example_playbooks().start().await;
    let first = generic_alert("DiskSpaceLow", "web-5:9100", "2026-11-22T09:00:00Z");
    let again = generic_alert("DiskSpaceLow", "web-5:9100", "2026-11-22T09:10:00Z");
    let (_, body) = app.post_raw("/api/v1/webhooks/generic", first).await;
    assert_eq!(body["outcomes"][0][0]["outcome"], "created", "{body}");
    let (_, body) = app.post_raw("/api/v1/webhooks/generic", again).await;
    assert_eq!(body["outcomes"][0][0]["outcome"], "suppressed", "{body}");
    let run_id = body["outcomes"][0][0]["run_id"].as_i64().unwrap();
    let run = app.run(run_id).await;
    assert_eq!(run["state"], "suppressed");
    assert!(
        run["reason"].as_str().unwrap().starts_with("cooldown"),
        "{run}"
    );
    assert_eq!(
        run["steps"],
        serde_json::json!([]),
        "a suppressed run has nothing to do"
    );
}

#[tokio::test]
async fn runs_list_filters_and_pages() {
    let app = TestApp::builder().example_playbooks().start().await;
    for i in 0..5 {
        let body = generic_alert(
            "DiskSpaceLow",
            &format!("h{i}:9100"),
            "2026-11-22T09:00:00Z",
        );
        app.post_raw("/api/v1/webhooks/generic", body).await;
    }
    let (_, page) = app.get("/api/v1/runs?limit=2").await;
    assert_eq!(page["runs"].as_array().unwrap().len(), 2);
    let next = page["next_before"].as_i64().unwrap();
    let (_, page2) = app
        .get(&format!("/api/v1/runs?limit=2&before={next}"))
        .await;
    let ids: Vec<i64> = page2["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    assert!(ids.iter().all(|&id| id < next), "{ids:?}");
    let (_, none) = app.get("/api/v1/runs?playbook=nope").await;
    assert_eq!(none["runs"], serde_json::json!([]));
    let (status, body) = app.get("/api/v1/runs?state=bogus").await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = app.get("/api/v1/runs/999").await;
    assert_eq!(status, 404);
    let (status, body) = app.get("/api/v1/playbooks").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = (body.as_array().unwrap().iter())
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"disk-cleanup"), "{names:?}");
    assert!(names.is_sorted(), "by name: {names:?}");
}

/// A `when` that loops over a label: expensive by the alert's choosing.
const LOOPY: &str = r#"
name: loopy
matchers: ['alertname="Loopy"']
when: |
  let n = 0;
  for i in 0..1000000 { n += labels.x.len(); }
  n > 0
steps:
  - action: log
    with: { message: "never" }
"#;

#[tokio::test]
async fn heavy_payloads_are_planned_off_the_workers_within_a_budget_per_alert() {
    let app = TestApp::builder()
        .playbook("loopy.yaml", LOOPY)
        .config("engine:\n  plan_budget: 20ms\n")
        .start()
        .await;
    // Two payloads of distinct alerts (the same alerts twice would be re-deliveries).
    let payload = |p: usize| {
        let alerts: Vec<serde_json::Value> = (0..150)
            .map(|i| serde_json::json!({"labels": {"alertname": "Loopy", "x": "abc", "i": format!("{p}-{i}")}}))
            .collect();
        serde_json::Value::from(alerts).to_string()
    };
    let posts: Vec<_> = (0..2)
        .map(|p| {
            let url = format!("{}/api/v1/webhooks/generic", app.base);
            let body = payload(p);
            tokio::spawn(async move {
                let r = reqwest::Client::new()
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                (
                    r.status().as_u16(),
                    r.json::<serde_json::Value>().await.unwrap(),
                )
            })
        })
        .collect();
    // While both payloads are being planned, the server answers.
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, 200);
    assert!(
        posts.iter().any(|p| !p.is_finished()),
        "the payloads were done before /healthz answered: the test proves nothing"
    );
    for p in posts {
        let (status, out) = p.await.unwrap();
        assert_eq!(status, 200, "{out}");
        for o in out["outcomes"].as_array().unwrap() {
            assert_eq!(o[0]["outcome"], "failed", "{o}");
            let error = o[0]["error"].as_str().unwrap();
            assert!(error.contains("time budget exceeded"), "{error}");
        }
    }
}

#[tokio::test]
async fn a_label_cannot_grow_a_string_past_the_sandbox_limit() {
    let app = TestApp::builder()
        .playbook(
            "grow.yaml",
            "name: grow\nmatchers: ['alertname=\"Grow\"']\nwhen: 'let s = labels.x; s.replace(\"a\", labels.x); s.len() > 0'\nsteps:\n  - action: log\n    with: { message: x }\n",
        )
        .start()
        .await;
    let before = app.peak_rss();
    let x = "a".repeat(reflex::alert::MAX_LABEL_VALUE_BYTES);
    let (status, out) = app
        .post_raw(
            "/api/v1/webhooks/generic",
            serde_json::json!({"labels": {"alertname": "Grow", "x": x}}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    let error = out["outcomes"][0][0]["error"].as_str().unwrap();
    assert!(error.contains("replace would build"), "{error}");
    // Unbounded, this replace would have built a 256 MiB string.
    let grown = app.peak_rss().saturating_sub(before);
    assert!(grown < 32 << 20, "peak RSS grew by {grown} bytes");
}

#[tokio::test]
async fn a_playbook_cannot_sleep_in_the_sandbox() {
    let app = TestApp::builder()
        .playbook(
            "nap.yaml",
            "name: nap\nmatchers: ['alertname=\"Nap\"']\nwhen: 'sleep(30); true'\nsteps:\n  - action: log\n    with: { message: x }\n",
        )
        .start()
        .await;
    let (status, out) = app
        .post_raw(
            "/api/v1/webhooks/generic",
            serde_json::json!({"labels": {"alertname": "Nap"}}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    let error = out["outcomes"][0][0]["error"].as_str().unwrap();
    assert!(error.contains("sleep() is not available"), "{error}");
}

#[tokio::test]
async fn a_full_disk_answers_503_so_the_sender_retries_and_loses_nothing_accepted() {
    let fs = crate::common::TestFs::sized("768k");
    if !fs.mounted {
        return eprintln!("skipped (no tmpfs, not root?): a store that cannot write");
    }
    let app = TestApp::builder()
        .data_dir(fs.dir.path())
        .playbook(
            "note.yaml",
            "name: note\nmatchers: ['alertname=\"Note\"']\nsteps:\n  - action: log\n    with: { message: x }\n",
        )
        .start()
        .await;
    let big = "x".repeat(60_000);
    let mut accepted = 0;
    let mut refusal = None;
    for i in 0..100 {
        let alert = serde_json::json!({
            "labels": {"alertname": "Note", "i": i.to_string()},
            "annotations": {"description": big},
            "startsAt": "2026-11-23T00:00:00Z",
        });
        let (status, body) = app
            .post_raw("/api/v1/webhooks/generic", alert.to_string())
            .await;
        match status {
            200 => accepted += 1,
            _ => {
                refusal = Some((status, body));
                break;
            }
        }
    }
    let (status, body) = refusal.expect("the tmpfs never filled");
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("retry"),
        "{body}"
    );
    assert!(accepted > 0);
    // Every alert answered 200 is on record.
    assert_eq!(app.count("alerts"), accepted, "accepted alerts lost");
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, 200, "the daemon still serves");
}
