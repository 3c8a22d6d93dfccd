//! Nothing lost across a crash, nothing run twice: kill -9 mid-run, SIGTERM, cancel.

use crate::common::{TestApp, generic_alert};

const SLOW: &str = r#"
name: slow
matchers: ['alertname="Slow"']
steps:
  - name: before
    action: log
    with: { message: "before on {{ labels.instance }}" }
  - name: long
    action: wait
    with: { duration: 60s }
    timeout: 120s
  - name: after
    action: log
    with: { message: "after" }
"#;

async fn start_slow_run(app: &TestApp) -> i64 {
    let (status, body) = app
        .post_raw(
            "/api/v1/webhooks/generic",
            generic_alert("Slow", "h1", "2026-11-22T09:00:00Z"),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let id = body["outcomes"][0][0]["run_id"].as_i64().unwrap();
    app.wait_for(20, "step `long` to start", || async {
        let run = app.run(id).await;
        (run["steps"][1]["state"] == "running").then_some(())
    })
    .await;
    id
}

#[tokio::test]
async fn kill_9_mid_step_marks_the_run_interrupted_and_never_reruns_it() {
    // A short shutdown grace: the test's end does not wait out the 60 s step.
    let mut app = TestApp::builder()
        .playbook("slow.yaml", SLOW)
        .config("engine:\n  shutdown_grace: 1s\n")
        .start()
        .await;
    let id = start_slow_run(&app).await;
    let before = app.run(id).await;
    app.kill9();
    app.restart().await;

    let run = app.run(id).await;
    assert_eq!(run["state"], "interrupted", "{run:#}");
    let steps = run["steps"].as_array().unwrap();
    assert_eq!(steps[0]["state"], "succeeded");
    assert_eq!(
        steps[0]["finished_at"], before["steps"][0]["finished_at"],
        "history intact"
    );
    assert_eq!(steps[1]["state"], "interrupted");
    assert_eq!(steps[1]["started_at"], before["steps"][1]["started_at"]);
    assert_eq!(
        steps[2]["state"], "skipped",
        "a step after the crash never runs"
    );

    // A new, unrelated alert still runs; the interrupted one stays as it is.
    let (_, body) = app
        .post_raw(
            "/api/v1/webhooks/generic",
            generic_alert("Slow", "h2", "2026-11-22T09:00:00Z"),
        )
        .await;
    let other = body["outcomes"][0][0]["run_id"].as_i64().unwrap();
    app.wait_for(20, "the new run to start", || async {
        (app.run(other).await["steps"][0]["state"] == "succeeded").then_some(())
    })
    .await;
    assert_eq!(app.run(id).await["state"], "interrupted");
    // Re-delivering the interrupted alert does not start it again either.
    let (_, body) = app
        .post_raw(
            "/api/v1/webhooks/generic",
            generic_alert("Slow", "h1", "2026-11-22T09:00:00Z"),
        )
        .await;
    assert_eq!(body["outcomes"][0][0]["outcome"], "deduplicated", "{body}");
}

#[tokio::test]
async fn pending_runs_survive_a_crash_and_run_after_restart() {
    // One run at a time: the second alert's run waits, pending, behind the slow one.
    let mut app = TestApp::builder()
        .playbook("slow.yaml", SLOW)
        .config("engine:\n  max_concurrent_runs: 1\n  shutdown_grace: 1s\n")
        .start()
        .await;
    let first = start_slow_run(&app).await;
    let (_, body) = app
        .post_raw(
            "/api/v1/webhooks/generic",
            generic_alert("Slow", "h2", "2026-11-22T09:00:00Z"),
        )
        .await;
    let second = body["outcomes"][0][0]["run_id"].as_i64().unwrap();
    assert_eq!(app.run(second).await["state"], "pending");
    app.kill9();
    app.restart().await;
    assert_eq!(app.run(first).await["state"], "interrupted");
    app.wait_for(20, "the pending run to start after restart", || async {
        (app.run(second).await["steps"][1]["state"] == "running").then_some(())
    })
    .await;
}

#[tokio::test]
async fn sigterm_exits_cleanly_and_the_cut_off_step_is_interrupted() {
    let mut app = TestApp::builder()
        .playbook("slow.yaml", SLOW)
        .config("engine:\n  shutdown_grace: 1s\n")
        .start()
        .await;
    let id = start_slow_run(&app).await;
    assert!(app.terminate(), "clean exit on SIGTERM:\n{}", app.log());
    app.restart().await;
    let run = app.run(id).await;
    assert_eq!(run["state"], "interrupted");
    assert_eq!(run["steps"][2]["state"], "skipped");
}

#[tokio::test]
async fn cancel_stops_a_running_run_before_its_next_step() {
    const TWO_WAITS: &str = r#"
name: waits
matchers: ['alertname="Slow"']
steps:
  - { name: short, action: wait, with: { duration: 1s } }
  - { name: never, action: log, with: { message: "must not run" } }
"#;
    let app = TestApp::builder()
        .playbook("waits.yaml", TWO_WAITS)
        .start()
        .await;
    let (_, body) = app
        .post_raw(
            "/api/v1/webhooks/generic",
            generic_alert("Slow", "h1", "2026-11-22T09:00:00Z"),
        )
        .await;
    let id = body["outcomes"][0][0]["run_id"].as_i64().unwrap();
    let (status, body) = app.post_raw(&format!("/api/v1/runs/{id}/cancel"), "").await;
    assert_eq!(status, 200, "{body}");
    let run = app.wait_run_state(id, "cancelled").await;
    assert_ne!(run["steps"][1]["state"], "succeeded", "{run:#}");
    assert_eq!(run["steps"][1]["output"], serde_json::Value::Null);
    let (status, _) = app.post_raw(&format!("/api/v1/runs/{id}/cancel"), "").await;
    assert_eq!(status, 409, "cancelling a finished run conflicts");
    let (status, _) = app.post_raw("/api/v1/runs/4242/cancel", "").await;
    assert_eq!(status, 404);
    let actions: i64 = app
        .db()
        .query_row(
            "SELECT count(*) FROM audit WHERE action = 'run.cancel'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(actions, 2, "each cancel attempt on a run is audited");
}

#[tokio::test]
async fn a_second_daemon_on_the_same_data_dir_exits_naming_the_first() {
    let app = TestApp::builder()
        .playbook("slow.yaml", SLOW)
        .config("engine:\n  shutdown_grace: 1s\n")
        .start()
        .await;
    let id = start_slow_run(&app).await;
    // Same data dir, another port.
    let config = std::fs::read_to_string(app.config_path()).unwrap();
    let port = crate::common::free_port();
    let second = app.dir.path().join("second.yaml");
    let listen = config.lines().next().unwrap();
    std::fs::write(
        &second,
        config.replacen(listen, &format!("listen: 127.0.0.1:{port}"), 1),
    )
    .unwrap();
    let (code, out) = crate::common::reflex_cli(
        &["serve", "--config", second.to_str().unwrap()],
        app.dir.path(),
    );
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("in use by another reflex process")
            && out.contains(&format!("pid {}", app.pid())),
        "{out}"
    );
    // The first daemon's run goes on untouched.
    let run = app.run(id).await;
    assert_eq!(run["state"], "running", "{run:#}");
    assert_eq!(run["steps"][1]["state"], "running");
}
