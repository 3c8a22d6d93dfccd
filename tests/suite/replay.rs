//! Replay of real alert history: a stream of 10,000 alerts (a storm that trips the breaker,
//! repeats a cooldown holds) goes through the daemon, is exported from its store and replayed
//! with a virtual clock; the replay counts what the daemon recorded, says what a changed
//! cooldown would have done differently, and prints the same bytes twice.

use crate::common::{TestApp, reflex_cli};
use serde_json::{Value, json};

const STORM: &str = "name: storm\nmatchers: ['alertname=\"Storm\"']\ncooldown: 0s\nsteps:\n  - action: log\n    with: { message: \"{{ labels.instance }}\" }\n";

fn disk(cooldown: &str) -> String {
    format!(
        "name: disk\nmatchers: ['alertname=\"Disk\"']\ncooldown: {cooldown}\nsteps:\n  - action: log\n    with: {{ message: \"{{{{ labels.instance }}}}\" }}\n"
    )
}

async fn post(app: &TestApp, alerts: Vec<Value>) {
    for chunk in alerts.chunks(500) {
        let (status, out) = app
            .post_raw(
                "/api/v1/webhooks/generic",
                Value::from(chunk.to_vec()).to_string(),
            )
            .await;
        assert_eq!(status, 200, "{out}");
    }
}

/// Waits until no run is pending or running.
async fn settle(app: &TestApp) {
    app.wait_for(60, "the runs to end", || async {
        let (_, pending) = app.get("/api/v1/runs?state=pending&limit=1").await;
        let (_, running) = app.get("/api/v1/runs?state=running&limit=1").await;
        let none = |v: &Value| v["runs"].as_array().is_some_and(Vec::is_empty);
        (none(&pending) && none(&running)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_recorded_storm_replays_to_what_the_daemon_recorded_and_shows_a_changed_cooldown() {
    let app = TestApp::builder()
        .playbook("storm.yaml", STORM)
        .playbook("disk.yaml", &disk("1h"))
        .config("breaker: { window: 1h, max_runs: 0, max_runs_per_playbook: 300, max_failures: 0, max_targets: 0 }\n")
        .start()
        .await;
    // Four occurrences of 50 disk alerts, each wave after the last one's runs ended: the
    // first makes runs, the cooldown holds the others.
    for wave in 0..4 {
        let alerts = (0..50)
            .map(|i| {
                json!({"labels": {"alertname": "Disk", "instance": format!("db-{i}")},
                            "startsAt": format!("2026-12-05T0{wave}:00:00Z")})
            })
            .collect();
        post(&app, alerts).await;
        settle(&app).await;
    }
    // A storm of 9,800: 300 runs, then the breaker, then the kill switch it engaged.
    let storm = (0..9800)
        .map(|i| json!({"labels": {"alertname": "Storm", "instance": format!("web-{i}")}}))
        .collect();
    post(&app, storm).await;
    settle(&app).await;
    // What the daemon recorded, per playbook: runs, and runs held back.
    let db = app.db();
    let recorded = |playbook: &str, held: bool| -> i64 {
        db.query_row(
            "SELECT count(*) FROM runs WHERE playbook = ?1 AND (state = 'suppressed') = ?2",
            rusqlite::params![playbook, held],
            |r| r.get(0),
        )
        .unwrap()
    };
    let daemon = [
        ("disk", recorded("disk", false), recorded("disk", true)),
        ("storm", recorded("storm", false), recorded("storm", true)),
    ];
    assert_eq!(daemon, [("disk", 50, 150), ("storm", 300, 9500)]);

    let dir = tempfile::tempdir().unwrap();
    let config = app.config_path().to_str().unwrap().to_string();
    let (code, exported) = reflex_cli(
        &["export", "alerts", "--since", "1h", "--config", &config],
        dir.path(),
    );
    assert_eq!(code, 0, "{exported}");
    assert_eq!(exported.lines().count(), 10_000);
    let recording = dir.path().join("alerts.ndjson");
    std::fs::write(&recording, &exported).unwrap();
    let playbooks = app.playbooks_dir();
    let replay = |extra: &[&str]| {
        let mut args = vec![
            "replay",
            recording.to_str().unwrap(),
            playbooks.to_str().unwrap(),
            "--config",
            &config,
        ];
        args.extend_from_slice(extra);
        reflex_cli(&args, dir.path())
    };
    let started = std::time::Instant::now();
    let (code, out) = replay(&["-o", "json"]);
    assert_eq!(code, 0, "{out}");
    eprintln!("replayed 10,000 alerts in {:?}", started.elapsed());
    let report: Value = serde_json::from_str(&out).unwrap();
    let p = &report["playbooks"];
    assert_eq!(report["alerts"], 10_000);
    assert_eq!(p["disk"]["runs"], 50, "{report:#}");
    assert_eq!(p["disk"]["holds"], json!({"cooldown": 150}));
    assert_eq!(p["storm"]["runs"], 300);
    assert_eq!(
        p["storm"]["holds"],
        json!({"breaker": 1, "kill_switch": 9499})
    );
    assert_eq!(p["storm"]["breaker_trips"], 1);
    // The daemon's own record, playbook by playbook.
    for (name, runs, held) in daemon {
        let holds: i64 = p[name]["holds"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_i64().unwrap())
            .sum();
        assert_eq!(
            (p[name]["runs"].as_i64().unwrap(), holds),
            (runs, held),
            "{name}"
        );
    }
    // Same input, same bytes.
    assert_eq!(replay(&["-o", "json"]).1, out);
    // A playbook change on the same history: no cooldown, every occurrence a run.
    let changed = dir.path().join("changed");
    std::fs::create_dir(&changed).unwrap();
    std::fs::write(changed.join("storm.yaml"), STORM).unwrap();
    std::fs::write(changed.join("disk.yaml"), disk("0s")).unwrap();
    let (code, text) = replay(&["--compare", changed.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("\ndisk: runs 50 -> 200, cooldown holds 150 -> 0\n"),
        "{text}"
    );
    assert!(!text.contains("storm:"), "the storm is the same: {text}");
    // For CI: a recording that trips the breaker fails the check.
    let (code, _) = replay(&["--fail-on", "breaker,budget"]);
    assert_eq!(code, 1);
    let (code, _) = replay(&["--fail-on", "budget"]);
    assert_eq!(code, 0);
}
