//! Reloading `reflex.yaml` through the real binary: tokens added, removed and re-keyed and a
//! sink added take effect without a restart; a file with errors, or one that changes what only
//! a restart can, changes nothing and `reflex reload` prints why, with file:line.

use crate::common::receiver::Receiver;
use crate::common::{TestApp, auth_config, reflex_cli, token_hash};
use serde_json::json;

const NOTE: &str = r#"
name: note
matchers: ['alertname="Note"']
steps:
  - action: log
    with: { message: "noted {{ labels.instance }}" }
"#;

#[tokio::test]
async fn a_reload_puts_tokens_and_sinks_in_force_all_or_nothing() {
    let rx = Receiver::start().await;
    let before = auth_config(&[("root", "admin"), ("vera", "viewer"), ("hook", "webhook")]);
    let app = TestApp::builder()
        .playbook("note.yaml", NOTE)
        .config(&before)
        .start()
        .await;
    let original = std::fs::read_to_string(app.config_path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root-token");
    std::fs::write(&root, "root-token").unwrap();
    let reload = || {
        reflex_cli(
            &[
                "reload",
                "--server",
                &app.base,
                "--token-file",
                root.to_str().unwrap(),
            ],
            dir.path(),
        )
    };
    let status = |token: &'static str| {
        let app = &app;
        async move { app.call("GET", "/api/v1/runs", Some(token), None).await.0 }
    };
    assert_eq!(
        (status("vera-token").await, status("olga-token").await),
        (200, 401)
    );

    // Olga added, Vera removed, the webhook's secret changed, a sink added.
    let after = format!(
        "auth:\n  tokens:\n    - {{ name: root, role: admin, sha256: {} }}\n    - {{ name: olga, role: operator, sha256: {} }}\n    - {{ name: hook, role: webhook, sha256: {} }}\nnotify:\n  quiet_for: 0s\n  sinks:\n    - {{ name: hook, type: webhook, url: \"{}/hook\" }}\n",
        token_hash("root-token"),
        token_hash("olga-token"),
        token_hash("hook-token-2"),
        rx.base
    );
    std::fs::write(app.config_path(), original.replace(&before, &after)).unwrap();
    let (code, out) = reload();
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        (status("olga-token").await, status("vera-token").await),
        (200, 401)
    );
    let alert = json!({"labels": {"alertname": "Note", "instance": "h1"}});
    let post = |token: &'static str| {
        let (app, alert) = (&app, alert.clone());
        async move {
            (app.call("POST", "/api/v1/webhooks/generic", Some(token), Some(alert))
                .await)
                .0
        }
    };
    assert_eq!(
        post("hook-token").await,
        401,
        "the old secret no longer works"
    );
    assert_eq!(post("hook-token-2").await, 200);
    app.wait_for(10, "the new sink's messages", || async {
        let events: Vec<String> = (rx.at("/hook").iter())
            .filter_map(|r| r.body["event"].as_str().map(str::to_string))
            .collect();
        events.contains(&"run_finished".to_string()).then_some(())
    })
    .await;

    // A file with errors changes nothing, and the CLI says each error with its line.
    let broken = original.replace(
        &before,
        &format!("{after}retention: {{ runs: soon }}\nbogus_key: 1\n"),
    );
    std::fs::write(app.config_path(), &broken).unwrap();
    let (code, out) = reload();
    assert_eq!(code, 1, "{out}");
    let name = app.config_path().display().to_string();
    assert!(out.contains(&format!("{name}:")), "{out}");
    assert!(
        out.contains("bogus_key") || out.contains("unknown field"),
        "{out}"
    );
    assert_eq!(status("olga-token").await, 200, "still in force");
    // What only a restart changes is refused, naming it.
    let moved = original
        .replace(&before, &after)
        .replace("data_dir: ", "data_dir: /tmp/elsewhere");
    std::fs::write(app.config_path(), &moved).unwrap();
    let (code, out) = reload();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("data_dir changed; that takes a restart"),
        "{out}"
    );
    // The reloads are on the record, and chat heard of them.
    let (_, audit) = app
        .call(
            "GET",
            "/api/v1/audit?action=config.reload",
            Some("root-token"),
            None,
        )
        .await;
    let outcomes: Vec<&str> = (audit.as_array().unwrap().iter())
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["failed", "failed", "ok"], "newest first");
    app.wait_for(10, "the refused reload told in chat", || async {
        (rx.at("/hook").iter())
            .any(|r| r.body["event"] == "reload" && r.body["ok"] == false)
            .then_some(())
    })
    .await;
}
