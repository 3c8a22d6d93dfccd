//! Metrics, structured logs and live reload through the real binary.

use crate::common::{TestApp, generic_alert};
use serde_json::json;
use std::time::Duration;

const ECHO: &str = r#"
name: echo
matchers: ['alertname="Echo"']
cooldown: 1h
steps:
  - { name: say, action: log, with: { message: "first version for {{ labels.instance }}" } }
"#;

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn metrics_count_a_scripted_sequence_exactly_and_parse_as_prometheus_text() {
    let app = TestApp::builder().playbook("echo.yaml", ECHO).start().await;
    let post = |body: String| app.post_raw("/api/v1/webhooks/generic", body);
    post(generic_alert("Echo", "a", "2026-11-22T10:00:00Z")).await; // run
    post(generic_alert("Echo", "a", "2026-11-22T10:00:00Z")).await; // dedup
    post(generic_alert("Echo", "a", "2026-11-22T10:05:00Z")).await; // cooldown: suppressed
    post(generic_alert("Other", "a", "2026-11-22T10:00:00Z")).await; // no playbook
    let mut resolved: serde_json::Value =
        serde_json::from_str(&generic_alert("Echo", "b", "2026-11-22T10:00:00Z")).unwrap();
    resolved["status"] = "resolved".into();
    post(resolved.to_string()).await; // resolved: nothing
    app.post_alertmanager(&crate::common::fixture("alertmanager-highcpu.json"))
        .await;
    app.wait_run_state(1, "succeeded").await;

    let text = reqwest::get(format!("{}/metrics", app.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(
            &text,
            r#"reflex_alerts_received_total{source="generic",status="firing"}"#
        ),
        4.0
    );
    assert_eq!(
        metric(
            &text,
            r#"reflex_alerts_received_total{source="generic",status="resolved"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"reflex_alerts_received_total{source="alertmanager",status="firing"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"reflex_runs_total{outcome="succeeded",playbook="echo"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"reflex_runs_total{outcome="suppressed",playbook="echo"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"reflex_run_duration_seconds_count{playbook="echo"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(&text, r#"reflex_step_duration_seconds_count{action="log"}"#),
        1.0
    );
    assert_eq!(metric(&text, "reflex_playbooks_loaded"), 1.0);
    assert_eq!(metric(&text, "reflex_approvals_pending"), 0.0);
    assert_eq!(
        metric(&text, r#"reflex_killswitch_engaged{scope="global"}"#),
        0.0
    );
    assert_eq!(metric(&text, "reflex_playbook_reload_errors_total"), 0.0);
    assert!(
        !text.contains("fingerprint") && !text.contains("instance="),
        "no alert label values as labels"
    );

    // promtool (Debian's prometheus package) is the reference parser of the format.
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (package prometheus) must be installed");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // promtool exits 3 for lint warnings only (e.g. histogram naming); 1 is a parse error.
    assert_ne!(
        out.status.code(),
        Some(1),
        "promtool could not parse /metrics:\n{report}"
    );
    assert!(!report.contains("error"), "{report}");
}

#[tokio::test]
async fn editing_a_playbook_changes_behaviour_and_a_broken_save_keeps_the_old_set() {
    let app = TestApp::builder().playbook("echo.yaml", ECHO).start().await;
    let file = app.playbooks_dir().join("echo.yaml");
    std::fs::write(&file, ECHO.replace("first version", "second version")).unwrap();
    let edited_at = std::time::Instant::now();
    let mut n = 0;
    let app = &app;
    let message = app
        .wait_for(5, "the edit to take effect", || {
            n += 1;
            let body = generic_alert("Echo", &format!("h{n}"), "2026-11-22T10:00:00Z");
            async move {
                let (_, out) = app.post_raw("/api/v1/webhooks/generic", body).await;
                let id = out["outcomes"][0][0]["run_id"].as_i64()?;
                let msg = app.run(id).await["steps"][0]["args"]["message"]
                    .as_str()?
                    .to_string();
                msg.starts_with("second version").then_some(msg)
            }
        })
        .await;
    assert!(
        edited_at.elapsed() < Duration::from_secs(2),
        "took {:?}",
        edited_at.elapsed()
    );
    assert!(message.contains("second version"));

    // A broken save: the previous set stays, and the error is counted.
    std::fs::write(
        &file,
        "name: echo\nmatchers: ['alertname=\"Echo\"']\nsteps: [{ action: teleport }]\n",
    )
    .unwrap();
    app.wait_for(5, "the broken reload to be counted", || async {
        let text = reqwest::get(format!("{}/metrics", app.base))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (metric(&text, "reflex_playbook_reload_errors_total") >= 1.0).then_some(())
    })
    .await;
    let (_, out) = app
        .post_raw(
            "/api/v1/webhooks/generic",
            generic_alert("Echo", "after-broken", "2026-11-22T10:00:00Z"),
        )
        .await;
    let id = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
    assert!(
        app.run(id).await["steps"][0]["args"]["message"]
            .as_str()
            .unwrap()
            .starts_with("second version")
    );

    // The API reload reports the errors with file:line and changes nothing.
    let (status, body) = app
        .call("POST", "/api/v1/playbooks/reload", None, None)
        .await;
    assert_eq!(status, 422, "{body}");
    let detail = body["error"]["details"][0].as_str().unwrap();
    assert!(
        detail.contains("echo.yaml:3:") && detail.contains("teleport"),
        "{detail}"
    );
    assert!(
        app.log().contains("playbook reload rejected"),
        "the rejection is logged"
    );
}

#[tokio::test]
async fn sighup_reloads_playbooks() {
    let app = TestApp::builder().playbook("echo.yaml", ECHO).start().await;
    std::fs::write(
        app.playbooks_dir().join("other.yaml"),
        ECHO.replace("name: echo", "name: other"),
    )
    .unwrap();
    app.sighup();
    app.wait_for(5, "a reload triggered by SIGHUP", || async {
        app.log().contains("trigger=\"SIGHUP\"").then_some(())
    })
    .await;
    let (_, list) = app.get("/api/v1/playbooks").await;
    assert_eq!(list.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn json_logs_carry_run_id_and_playbook_on_every_run_line() {
    let app = TestApp::builder()
        .playbook("echo.yaml", ECHO)
        .arg("--log-format")
        .arg("json")
        .start()
        .await;
    app.post_raw(
        "/api/v1/webhooks/generic",
        generic_alert("Echo", "z", "2026-11-22T10:00:00Z"),
    )
    .await;
    app.wait_run_state(1, "succeeded").await;
    let log = app.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let run_lines: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["span"]["name"] == "run")
        .collect();
    assert!(
        run_lines.len() >= 3,
        "run started, step finished, run finished: {log}"
    );
    for l in run_lines {
        assert_eq!(l["span"]["run_id"], 1, "{l}");
        assert_eq!(l["span"]["playbook"], "echo", "{l}");
    }
}

#[tokio::test]
async fn a_newline_in_a_label_cannot_forge_a_log_line() {
    let app = TestApp::builder()
        .playbook(
            "note.yaml",
            "name: note\nmatchers: ['alertname=\"Note\"']\nsteps:\n  - action: log\n    with: { message: \"disk low on {{ labels.instance }}\" }\n",
        )
        .start()
        .await;
    let forged = "2026-01-01T00:00:00.000000Z  WARN reflex::api::killswitch: kill switch released";
    let alert = json!({"labels": {"alertname": "Note", "instance": format!("db-1\n{forged}")}});
    let (status, out) = app
        .post_raw("/api/v1/webhooks/generic", alert.to_string())
        .await;
    assert_eq!(status, 200, "{out}");
    let id = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
    app.wait_run_state(id, "succeeded").await;
    let log = app.log();
    assert!(
        log.contains(&format!("db-1\\n{forged}")),
        "the value is in the log, escaped:\n{log}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with(forged)),
        "a forged line:\n{log}"
    );
}
