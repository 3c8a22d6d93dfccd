//! The safety semantics through the real binary: approval gates, the kill switch, the circuit
//! breaker, persistence across restarts, auth and roles, the audit log, and shadow mode.

use crate::common::{TestApp, auth_config, generic_alert};
use serde_json::{Value, json};

const TOKENS: &[(&str, &str)] = &[
    ("admin", "admin"),
    ("alice", "approver"),
    ("bob", "approver"),
    ("carol", "viewer"),
    ("alertmanager", "webhook"),
];

const GATED: &str = r#"
name: gated
matchers: ['alertname="Risky"']
steps:
  - name: look
    action: log
    with: { message: "looking at {{ labels.instance }}" }
  - name: act
    action: log
    with: { message: "acting on {{ labels.instance }}" }
    approval:
      count: 1
      expires: 10m
"#;

const TWO_APPROVERS: &str = r#"
name: two
matchers: ['alertname="VeryRisky"']
approval:
  count: 2
  expires: 10m
steps:
  - name: act
    action: log
    with: { message: "acting on {{ labels.instance }}" }
"#;

async fn app_with(playbooks: &[(&str, &str)], extra: &str) -> TestApp {
    let mut b = TestApp::builder()
        .config(&auth_config(TOKENS))
        .config(extra);
    for (f, y) in playbooks {
        b = b.playbook(f, y);
    }
    b.start().await
}

async fn post_alert(app: &TestApp, body: String) -> Value {
    let (status, body) = app
        .call(
            "POST",
            "/api/v1/webhooks/generic",
            Some("alertmanager-token"),
            Some(serde_json::from_str(&body).unwrap()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["outcomes"][0][0].clone()
}

/// Posts a generic alert that matches a playbook and returns the run it started.
async fn start_run(app: &TestApp, alertname: &str, instance: &str) -> i64 {
    let out = post_alert(
        app,
        generic_alert(alertname, instance, "2026-11-22T10:00:00Z"),
    )
    .await;
    out["run_id"]
        .as_i64()
        .unwrap_or_else(|| panic!("no run started: {out}"))
}

async fn run_as(app: &TestApp, id: i64) -> Value {
    let (status, run) = app
        .call(
            "GET",
            &format!("/api/v1/runs/{id}"),
            Some("carol-token"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{run}");
    run
}

async fn wait_state(app: &TestApp, id: i64, state: &str) -> Value {
    app.wait_for(20, &format!("run {id} to be {state}"), || async {
        let run = run_as(app, id).await;
        (run["state"] == state).then_some(run)
    })
    .await
}

async fn pending_approval(app: &TestApp, run_id: i64) -> Value {
    app.wait_for(20, "an approval request", || async {
        let (_, list) = app
            .call(
                "GET",
                "/api/v1/approvals?state=pending",
                Some("carol-token"),
                None,
            )
            .await;
        list.as_array()
            .unwrap()
            .iter()
            .find(|a| a["run_id"] == run_id)
            .cloned()
    })
    .await
}

async fn decide(app: &TestApp, approval: i64, verb: &str, who: &str) -> (u16, Value) {
    let token = format!("{who}-token");
    app.call(
        "POST",
        &format!("/api/v1/approvals/{approval}/{verb}"),
        Some(&token),
        Some(json!({"comment": format!("{who} says {verb}")})),
    )
    .await
}

#[tokio::test]
async fn a_gated_step_waits_and_runs_only_after_approval() {
    let app = app_with(&[("gated.yaml", GATED)], "").await;
    let run_id = start_run(&app, "Risky", "web-1").await;
    let approval = pending_approval(&app, run_id).await;
    let run = wait_state(&app, run_id, "awaiting_approval").await;
    assert_eq!(run["steps"][0]["state"], "succeeded");
    assert_eq!(
        run["steps"][1]["state"], "pending",
        "the gated step has not run"
    );
    // The request shows exactly what will be done.
    assert_eq!(approval["action"]["target"], "web-1");
    assert_eq!(
        approval["action"]["steps"][0]["args"]["message"],
        "acting on web-1"
    );
    assert_eq!(approval["action_hash"].as_str().unwrap().len(), 64);

    let (status, body) = decide(&app, approval["id"].as_i64().unwrap(), "approve", "alice").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "approved");
    assert_eq!(body["approvals"][0]["who"], "alice");
    let run = wait_state(&app, run_id, "succeeded").await;
    assert_eq!(run["steps"][1]["output"]["message"], "acting on web-1");
}

#[tokio::test]
async fn deny_expiry_and_resolution_end_the_run_without_acting() {
    let app = app_with(
        &[("gated.yaml", &GATED.replace("expires: 10m", "expires: 3s"))],
        "",
    )
    .await;
    // Denied.
    let denied = start_run(&app, "Risky", "h-deny").await;
    let a = pending_approval(&app, denied).await;
    let (status, body) = decide(&app, a["id"].as_i64().unwrap(), "deny", "bob").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "denied");
    let run = wait_state(&app, denied, "denied").await;
    assert_eq!(run["steps"][1]["state"], "skipped");
    assert_eq!(run["steps"][1]["output"], Value::Null);
    let (status, _) = decide(&app, a["id"].as_i64().unwrap(), "approve", "alice").await;
    assert_eq!(
        status, 409,
        "a denied request cannot be approved afterwards"
    );

    // Expired (3 s).
    let expired = start_run(&app, "Risky", "h-expire").await;
    let a = pending_approval(&app, expired).await;
    let run = wait_state(&app, expired, "expired").await;
    assert_eq!(run["steps"][1]["state"], "skipped");
    let (status, body) = decide(&app, a["id"].as_i64().unwrap(), "approve", "alice").await;
    assert_eq!(status, 409, "{body}");

    // The alert resolves while the run waits.
    let body = generic_alert("Risky", "h-resolve", "2026-11-22T10:00:00Z");
    let resolving = post_alert(&app, body.clone()).await["run_id"]
        .as_i64()
        .unwrap();
    pending_approval(&app, resolving).await;
    let mut resolved: Value = serde_json::from_str(&body).unwrap();
    resolved["status"] = json!("resolved");
    let (status, out) = app
        .call(
            "POST",
            "/api/v1/webhooks/generic",
            Some("alertmanager-token"),
            Some(resolved),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["outcomes"][0][0]["outcome"], "ended", "{out}");
    let run = wait_state(&app, resolving, "resolved").await;
    assert_eq!(run["steps"][1]["state"], "skipped");

    // A resolution carrying the waiting alert's fingerprint but other labels ends nothing:
    // the fingerprint is computed from the labels, never taken from the sender.
    let waiting = start_run(&app, "Risky", "h-victim").await;
    let approval = pending_approval(&app, waiting).await;
    let victim: Value = serde_json::from_str(&generic_alert("Risky", "h-victim", "t")).unwrap();
    let victim_fp = fingerprint_of(&victim["labels"]);
    let forged = json!({
        "version": "4", "groupKey": "g", "status": "resolved", "receiver": "reflex",
        "alerts": [{
            "status": "resolved",
            "labels": {"alertname": "Risky", "instance": "h-attacker"},
            "startsAt": "2026-11-22T10:00:00Z", "endsAt": "2026-11-22T10:05:00Z",
            "fingerprint": victim_fp,
        }],
    });
    let (status, out) = app
        .call(
            "POST",
            "/api/v1/webhooks/alertmanager",
            Some("alertmanager-token"),
            Some(forged),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["outcomes"][0], json!([]), "{out}");
    let (status, _) = decide(&app, approval["id"].as_i64().unwrap(), "approve", "alice").await;
    assert_eq!(status, 200);
    wait_state(&app, waiting, "succeeded").await;
}

/// Alertmanager's fingerprint of a label set, as the daemon computes it.
fn fingerprint_of(labels: &Value) -> String {
    let labels = labels
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    reflex::alert::fingerprint(&labels)
}

#[tokio::test]
async fn two_approvers_means_two_different_people() {
    let app = app_with(&[("two.yaml", TWO_APPROVERS)], "").await;
    let run_id = start_run(&app, "VeryRisky", "db-9").await;
    let a = pending_approval(&app, run_id).await;
    assert_eq!(
        a["scope"], "run",
        "a playbook-level gate covers the whole run"
    );
    let id = a["id"].as_i64().unwrap();
    let (status, body) = decide(&app, id, "approve", "alice").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "pending", "one approval of two");
    let (status, body) = decide(&app, id, "approve", "alice").await;
    assert_eq!(status, 409, "the same person twice is not two: {body}");
    assert_eq!(run_as(&app, run_id).await["state"], "awaiting_approval");
    let (status, body) = decide(&app, id, "approve", "carol").await;
    assert_eq!(status, 403, "a viewer cannot approve: {body}");
    let (status, body) = decide(&app, id, "approve", "bob").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "approved");
    wait_state(&app, run_id, "succeeded").await;
}

#[tokio::test]
async fn kill_switch_suppresses_stops_and_blocks_approvals_until_released() {
    const SLOW: &str = r#"
name: slow
matchers: ['alertname="Slow"']
steps:
  - { name: first, action: wait, with: { duration: 2s } }
  - { name: second, action: log, with: { message: "must not run while killed" } }
"#;
    let app = app_with(&[("slow.yaml", SLOW), ("gated.yaml", GATED)], "").await;
    // A run between steps, and one waiting for approval.
    let running = start_run(&app, "Slow", "h1").await;
    let gated = start_run(&app, "Risky", "h2").await;
    let approval = pending_approval(&app, gated).await;
    app.wait_for(10, "the slow step to start", || async {
        (run_as(&app, running).await["steps"][0]["state"] == "running").then_some(())
    })
    .await;

    let (status, body) = app
        .call(
            "PUT",
            "/api/v1/killswitch",
            Some("admin-token"),
            Some(json!({"engaged": true, "reason": "bad deploy in progress"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["global"]["engaged"], true);
    assert_eq!(body["global"]["actor"], "admin");

    let run = wait_state(&app, running, "killed").await;
    assert_eq!(
        run["steps"][0]["state"], "succeeded",
        "the step under way finished"
    );
    assert_eq!(
        run["steps"][1]["state"], "skipped",
        "the next one never started"
    );

    let out = post_alert(&app, generic_alert("Slow", "h3", "2026-11-22T10:00:00Z")).await;
    assert_eq!(out["outcome"], "suppressed");
    assert!(
        out["reason"]
            .as_str()
            .unwrap()
            .contains("bad deploy in progress"),
        "{out}"
    );

    let (status, body) = decide(&app, approval["id"].as_i64().unwrap(), "approve", "alice").await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("kill switch"),
        "{body}"
    );

    let (status, _) = app
        .call(
            "PUT",
            "/api/v1/killswitch",
            Some("admin-token"),
            Some(json!({"engaged": false, "reason": "fixed"})),
        )
        .await;
    assert_eq!(status, 200);
    let out = post_alert(&app, generic_alert("Slow", "h4", "2026-11-22T10:00:00Z")).await;
    assert_eq!(out["outcome"], "created");
    let (status, body) = decide(&app, approval["id"].as_i64().unwrap(), "approve", "alice").await;
    assert_eq!(status, 200, "{body}");
    wait_state(&app, gated, "succeeded").await;

    let (_, audit) = app
        .call("GET", "/api/v1/audit?limit=1000", Some("carol-token"), None)
        .await;
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"killswitch.engage") && actions.contains(&"killswitch.release"),
        "{actions:?}"
    );
}

#[tokio::test]
async fn a_burst_of_1000_alerts_starts_at_most_20_runs_and_trips_the_breaker() {
    const ANY: &str = r#"
name: any-host
matchers: ['alertname="Storm"']
steps:
  - { action: log, with: { message: "fixing {{ labels.instance }}" } }
"#;
    let breaker = "breaker:\n  window: 1m\n  max_runs: 20\n  max_runs_per_playbook: 0\n  max_targets: 0\n  max_failures: 0\n";
    let app = app_with(&[("any.yaml", ANY)], breaker).await;
    // Ten concurrent posts of 100 distinct alerts each.
    let mut tasks = tokio::task::JoinSet::new();
    for batch in 0..10 {
        let alerts: Vec<Value> = (0..100)
            .map(|i| {
                serde_json::from_str(&generic_alert(
                    "Storm",
                    &format!("host-{batch}-{i}"),
                    "2026-11-22T10:00:00Z",
                ))
                .unwrap()
            })
            .collect();
        let url = format!("{}/api/v1/webhooks/generic", app.base);
        tasks.spawn(async move {
            let r = reqwest::Client::new()
                .post(url)
                .bearer_auth("alertmanager-token")
                .json(&alerts)
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let db = app.db();
    let started: i64 = db
        .query_row(
            "SELECT count(*) FROM runs WHERE state != 'suppressed'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let suppressed: i64 = db
        .query_row(
            "SELECT count(*) FROM runs WHERE state = 'suppressed'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(started <= 20, "{started} runs started");
    assert_eq!(started + suppressed, 1000, "every alert is accounted for");
    let (_, ks) = app
        .call("GET", "/api/v1/killswitch", Some("carol-token"), None)
        .await;
    assert_eq!(ks["global"]["engaged"], true, "{ks}");
    assert_eq!(ks["global"]["actor"], "circuit-breaker");
    assert!(
        ks["global"]["reason"]
            .as_str()
            .unwrap()
            .contains("breaker.max_runs = 20"),
        "{ks}"
    );
}

#[tokio::test]
async fn pending_approvals_and_the_kill_switch_survive_a_restart() {
    let mut app = app_with(&[("gated.yaml", GATED)], "").await;
    let run_id = start_run(&app, "Risky", "h1").await;
    let approval = pending_approval(&app, run_id).await;
    let (status, _) = app
        .call(
            "PUT",
            "/api/v1/killswitch",
            Some("admin-token"),
            Some(json!({"engaged": true, "reason": "freeze"})),
        )
        .await;
    assert_eq!(status, 200);
    app.kill9();
    app.restart().await;
    let (_, ks) = app
        .call("GET", "/api/v1/killswitch", Some("carol-token"), None)
        .await;
    assert_eq!(ks["global"]["engaged"], true);
    assert_eq!(ks["global"]["reason"], "freeze");
    let (_, list) = app
        .call(
            "GET",
            "/api/v1/approvals?state=pending",
            Some("carol-token"),
            None,
        )
        .await;
    assert_eq!(list[0]["id"], approval["id"], "{list}");
    assert_eq!(run_as(&app, run_id).await["state"], "awaiting_approval");
    // Released, the surviving approval still works.
    app.call(
        "PUT",
        "/api/v1/killswitch",
        Some("admin-token"),
        Some(json!({"engaged": false})),
    )
    .await;
    let (status, _) = decide(&app, approval["id"].as_i64().unwrap(), "approve", "bob").await;
    assert_eq!(status, 200);
    wait_state(&app, run_id, "succeeded").await;
}

#[tokio::test]
async fn endpoints_refuse_missing_bad_and_underprivileged_tokens() {
    let app = app_with(&[("gated.yaml", GATED)], "").await;
    let alert: Value =
        serde_json::from_str(&generic_alert("Risky", "h", "2026-11-22T10:00:00Z")).unwrap();
    // (method, path, body, a token whose role is too low)
    let cases: Vec<(&str, &str, Option<Value>, &str)> = vec![
        (
            "POST",
            "/api/v1/webhooks/generic",
            Some(alert.clone()),
            "carol-token",
        ),
        (
            "POST",
            "/api/v1/webhooks/alertmanager",
            Some(json!({})),
            "alice-token",
        ),
        ("GET", "/api/v1/runs", None, "alertmanager-token"),
        ("GET", "/api/v1/runs/1", None, "alertmanager-token"),
        ("GET", "/api/v1/approvals", None, "alertmanager-token"),
        ("GET", "/api/v1/killswitch", None, "alertmanager-token"),
        ("GET", "/api/v1/playbooks", None, "alertmanager-token"),
        ("GET", "/api/v1/audit", None, "alertmanager-token"),
        (
            "POST",
            "/api/v1/approvals/1/approve",
            Some(json!({})),
            "carol-token",
        ),
        (
            "POST",
            "/api/v1/approvals/1/deny",
            Some(json!({})),
            "carol-token",
        ),
        ("POST", "/api/v1/runs/1/cancel", None, "alice-token"),
        (
            "PUT",
            "/api/v1/killswitch",
            Some(json!({"engaged": true, "reason": "x"})),
            "alice-token",
        ),
        (
            "PUT",
            "/api/v1/playbooks/gated/killswitch",
            Some(json!({"engaged": true, "reason": "x"})),
            "carol-token",
        ),
    ];
    let mut mutating = 0;
    for (method, path, body, low) in &cases {
        for (token, want) in [(None, 401), (Some("not-a-token"), 401), (Some(*low), 403)] {
            let (status, resp) = app.call(method, path, token, body.clone()).await;
            assert_eq!(status, want, "{method} {path} with {token:?}: {resp}");
            assert!(resp["error"]["message"].is_string(), "{resp}");
        }
        if *method != "GET" {
            mutating += 3;
        }
    }
    assert_eq!(app.count("runs"), 0, "nothing refused changed anything");
    let refused: i64 = app
        .db()
        .query_row(
            "SELECT count(*) FROM audit WHERE outcome = 'refused'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    // All came from one address within a minute: one row now (the rest are counted, and
    // written as one row when the window closes), and every one in the metric.
    assert_eq!(refused, 1, "refusals from one source collapse into one row");
    let metrics = app.get_text("/metrics").await;
    let counted: i64 = (metrics.lines())
        .filter(|l| l.starts_with("reflex_http_refused_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
        .sum();
    assert_eq!(counted, mutating, "every refused mutating call is counted");
    let (status, _) = app.call("GET", "/healthz", None, None).await;
    assert_eq!(status, 200, "health stays open by default");
    // Basic auth works for webhooks (Alertmanager's basic_auth).
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/webhooks/generic", app.base))
        .basic_auth("alertmanager", Some("alertmanager-token"))
        .json(&alert)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn shadow_mode_records_the_rendered_actions_of_every_example_playbook_and_touches_nothing() {
    let sshd = crate::common::sshd::Sshd::start();
    let chat = crate::common::receiver::Receiver::start().await;
    let app = TestApp::builder()
        .example_playbooks()
        .config(&format!(
            "notify:\n  sinks:\n    - {{ name: chat, type: slack, url: \"{}/chat\" }}\n",
            chat.base
        ))
        // Every host the example alerts name is in the inventory, and a cluster is configured
        // (never contacted), so every step validates.
        .config("feature_flags:\n  flags: { type: unleash, url: \"http://127.0.0.1:9\", environment: production }\n")
        .config(&format!(
            "kubernetes:\n  clusters:\n    prod: {{ kubeconfig: {} }}\n",
            crate::common::unreachable_kubeconfig().display()
        ))
        .config(&sshd.config_yaml(
            "db-1",
            &[
                "db-1.example.internal",
                "db-2.example.internal",
                "web-3.example.internal",
            ],
        ))
        .arg("--dry-run")
        .start()
        .await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/alerts");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let path = if text.contains("\"version\"") {
            "/api/v1/webhooks/alertmanager"
        } else {
            "/api/v1/webhooks/generic"
        };
        let (status, body) = app.post_raw(path, text).await;
        assert_eq!(status, 200, "{}: {body}", file.display());
    }
    let runs = app.runs().await;
    let playbooks: std::collections::BTreeSet<String> = runs
        .iter()
        .map(|r| r["playbook"].as_str().unwrap().to_string())
        .collect();
    let examples: std::collections::BTreeSet<String> =
        std::fs::read_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("playbooks"))
            .unwrap()
            .map(|e| {
                e.unwrap()
                    .path()
                    .file_stem()
                    .unwrap()
                    .to_string_lossy()
                    .to_string()
            })
            .collect();
    assert_eq!(
        playbooks, examples,
        "every example playbook has an example alert"
    );
    for run in &runs {
        let id = run["id"].as_i64().unwrap();
        let run = app
            .wait_for(20, "shadow run to finish", || async {
                let r = app.run(id).await;
                (r["state"] != "pending" && r["state"] != "running").then_some(r)
            })
            .await;
        assert_eq!(run["shadow"], true);
        assert_eq!(run["state"], "shadow", "never `succeeded`: {run:#}");
        for step in run["steps"].as_array().unwrap() {
            if step["phase"] == "on_failure" {
                // Nothing failed, so nothing escalates (`reflex simulate` shows escalations).
                assert_eq!(step["state"], "skipped", "{run:#}");
                continue;
            }
            let action = reflex::playbook::actions::Action::parse(step["action"].as_str().unwrap());
            if action.unwrap().reads_only() {
                // Evidence is gathered for real in a shadow run (it changes nothing); here there is
                // no cluster or Prometheus to read, and the playbooks go on without it.
                assert!(step["output"].get("would_run").is_none(), "{run:#}");
                assert!(
                    step["state"] == "shadow" || step["state"] == "failed",
                    "{run:#}"
                );
                continue;
            }
            assert_eq!(step["state"], "shadow", "{run:#}");
            assert_eq!(step["output"]["would_run"]["args"], step["args"]);
        }
        if run["playbook"] == "rollback" {
            // The approval gate shows what it would have waited for, and waits for nobody; it
            // stands before the first step that acts, after the evidence.
            let rollback = crate::common::step(&run, "rollback");
            assert_eq!(
                rollback["output"]["would_wait_for"]["approvals"], 1,
                "{run:#}"
            );
        }
    }
    let (_, approvals) = app.get("/api/v1/approvals").await;
    assert_eq!(
        approvals,
        serde_json::json!([]),
        "no approval was requested"
    );
    assert_eq!(
        sshd.accepted_connections(),
        0,
        "a shadow run connects to nothing"
    );
    // Every message says shadow run, and none claims success.
    let messages = app
        .wait_for(20, "each run's end", || async {
            let m = chat.at("/chat");
            let ends = (m.iter())
                .filter(|m| m.raw.contains("finished in shadow mode"))
                .count();
            (ends == runs.len()).then_some(m)
        })
        .await;
    for m in &messages {
        let text = m.body["text"].as_str().unwrap();
        assert!(text.starts_with("Shadow run: "), "{text}");
        assert!(!text.contains("succeeded"), "{text}");
    }
    assert!(
        messages.iter().any(|m| {
            let text = m.body["text"].as_str().unwrap();
            text.contains("kube.rollback") && text.contains("would wait for 1 approval first")
        }),
        "the rollback's gate is shown"
    );
    let metrics = reqwest::get(format!("{}/metrics", app.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let dry: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("reflex_runs_total{") && l.contains("outcome=\"shadow\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(dry as usize, runs.len(), "{metrics}");
    assert!(!metrics.contains("outcome=\"succeeded\""), "{metrics}");
}

#[tokio::test]
async fn the_operator_cli_lists_approves_and_pulls_the_kill_switch() {
    let app = app_with(&[("gated.yaml", GATED)], "").await;
    let run_id = start_run(&app, "Risky", "h1").await;
    let approval = pending_approval(&app, run_id).await["id"].as_i64().unwrap();
    let cli = |args: &[&str], token: &str| {
        let out = std::process::Command::new(crate::common::reflex_bin())
            .args(args)
            .args(["-o", "table"])
            .env("REFLEX_SERVER", &app.base)
            .env("REFLEX_TOKEN", token)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    };
    // Without a token the error says how to give one.
    let (code, out) = cli(&["approvals"], "");
    assert_eq!(code, 4, "{out}");
    assert!(
        out.contains("401") && out.contains("set REFLEX_TOKEN"),
        "{out}"
    );
    let (code, out) = cli(&["approvals"], "carol-token");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("approval {approval} [pending] run {run_id}")),
        "{out}"
    );
    assert!(
        out.contains("acting on h1"),
        "the request shows what will be done: {out}"
    );

    let (code, out) = cli(
        &["approve", &approval.to_string(), "--comment", "looks right"],
        "carol-token",
    );
    assert_eq!(code, 4, "a viewer cannot approve (exit 4, auth): {out}");
    assert!(out.contains("403"), "{out}");
    let (code, out) = cli(
        &["approve", &approval.to_string(), "--comment", "looks right"],
        "alice-token",
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("approved"), "{out}");
    wait_state(&app, run_id, "succeeded").await;

    let (code, out) = cli(&["runs"], "carol-token");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("succeeded") && l.contains("gated") && l.contains("h1")),
        "{out}"
    );

    let (code, out) = cli(&["kill", "--reason", "incident 42"], "admin-token");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("global") && out.contains("ENGAGED by admin: incident 42"),
        "{out}"
    );
    let (_, ks) = app
        .call("GET", "/api/v1/killswitch", Some("carol-token"), None)
        .await;
    assert_eq!(ks["global"]["reason"], "incident 42");
    let (code, out) = cli(&["unkill"], "admin-token");
    assert_eq!(code, 0, "{out}");
    let (_, ks) = app
        .call("GET", "/api/v1/killswitch", Some("carol-token"), None)
        .await;
    assert_eq!(ks["global"]["engaged"], false);
}

#[tokio::test]
async fn maintenance_windows_and_playbook_switches_suppress_visibly() {
    let start = humantime::format_rfc3339(
        std::time::SystemTime::now() - std::time::Duration::from_secs(60),
    );
    let end = humantime::format_rfc3339(
        std::time::SystemTime::now() + std::time::Duration::from_secs(3600),
    );
    let windows = format!(
        "maintenance_windows:\n  - name: db upgrade\n    matchers: ['instance=~\"db-.*\"']\n    start: {start}\n    end: {end}\n"
    );
    let app = app_with(
        &[("gated.yaml", GATED), ("two.yaml", TWO_APPROVERS)],
        &windows,
    )
    .await;
    let out = post_alert(&app, generic_alert("Risky", "db-7", "2026-11-22T10:00:00Z")).await;
    assert_eq!(out["outcome"], "suppressed");
    assert!(
        out["reason"]
            .as_str()
            .unwrap()
            .contains("maintenance window \"db upgrade\""),
        "{out}"
    );
    let out = post_alert(
        &app,
        generic_alert("Risky", "web-7", "2026-11-22T10:00:00Z"),
    )
    .await;
    assert_eq!(out["outcome"], "created", "outside the window's matchers");

    // A time-boxed switch on one playbook leaves the others alone.
    let (status, body) = app
        .call(
            "PUT",
            "/api/v1/playbooks/gated/killswitch",
            Some("admin-token"),
            Some(json!({"engaged": true, "reason": "flaky", "for": "1h"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let gated = &body["playbooks"][0];
    assert_eq!(gated["scope"], "playbook:gated");
    assert!(gated["until"].is_string());
    let out = post_alert(
        &app,
        generic_alert("Risky", "web-8", "2026-11-22T10:00:00Z"),
    )
    .await;
    assert_eq!(out["outcome"], "suppressed");
    let out = post_alert(
        &app,
        generic_alert("VeryRisky", "web-8", "2026-11-22T10:00:00Z"),
    )
    .await;
    assert_eq!(out["outcome"], "created");
    let (status, body) = app
        .call(
            "PUT",
            "/api/v1/killswitch",
            Some("admin-token"),
            Some(json!({"engaged": true})),
        )
        .await;
    assert_eq!(status, 400, "engaging needs a reason: {body}");
    let (status, _) = app
        .call(
            "PUT",
            "/api/v1/playbooks/nope/killswitch",
            Some("admin-token"),
            Some(json!({"engaged": true, "reason": "x"})),
        )
        .await;
    assert_eq!(status, 404);
}

const QUEUED: &str = r#"
name: queued
matchers: ['alertname="Queued"']
target: "one-target"
steps:
  - name: first
    action: wait
    with: { duration: 2s }
  - name: second
    action: log
    with: { message: "acting on {{ labels.instance }}" }
"#;

#[tokio::test]
async fn a_resolution_ends_queued_runs_and_stops_running_ones_before_their_next_step() {
    let patient = QUEUED
        .replace("name: queued", "name: patient\non_resolve: continue")
        .replace("Queued", "Patient")
        .replace("one-target", "other-target");
    let app = app_with(&[("queued.yaml", QUEUED), ("patient.yaml", &patient)], "").await;
    let running = start_run(&app, "Queued", "a").await;
    let queued = start_run(&app, "Queued", "b").await;
    let patient_run = start_run(&app, "Patient", "c").await;
    for id in [running, patient_run] {
        app.wait_for(20, "step `first` to run", || async {
            (run_as(&app, id).await["steps"][0]["state"] == "running").then_some(())
        })
        .await;
    }
    assert_eq!(
        run_as(&app, queued).await["state"],
        "pending",
        "behind `a` on the same target"
    );

    let resolve = |alertname: &str, instance: &str| {
        let mut a: Value =
            serde_json::from_str(&generic_alert(alertname, instance, "2026-11-22T10:00:00Z"))
                .unwrap();
        a["status"] = json!("resolved");
        a
    };
    for (name, instance) in [("Queued", "b"), ("Queued", "a"), ("Patient", "c")] {
        let (status, out) = app
            .call(
                "POST",
                "/api/v1/webhooks/generic",
                Some("alertmanager-token"),
                Some(resolve(name, instance)),
            )
            .await;
        assert_eq!(status, 200, "{out}");
    }
    // The queued run never starts.
    let run = wait_state(&app, queued, "resolved").await;
    assert!(
        run["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["state"] == "skipped"),
        "{run:#}"
    );
    // The running one finishes its step and stops before the next.
    let run = wait_state(&app, running, "resolved").await;
    assert_eq!(run["steps"][0]["state"], "succeeded");
    assert_eq!(run["steps"][1]["state"], "skipped", "{run:#}");
    assert!(
        run["error"].as_str().unwrap().contains("resolved"),
        "{run:#}"
    );
    // `on_resolve: continue` goes to the end.
    let run = wait_state(&app, patient_run, "succeeded").await;
    assert_eq!(run["steps"][1]["state"], "succeeded");
}

/// Posts alerts from `alerts` until one is suppressed by the breaker; returns the reason.
async fn post_until_tripped(app: &TestApp, alerts: Vec<String>) -> String {
    for body in alerts {
        let out = post_alert(app, body).await;
        if out["outcome"] == "suppressed" {
            return out["reason"].as_str().unwrap().to_string();
        }
    }
    panic!("the breaker never tripped");
}

#[tokio::test]
async fn every_breaker_limit_trips_the_kill_switch_and_tells_chat_with_its_numbers() {
    const FAILING: &str = r#"
name: failing
matchers: ['alertname="Failing"']
steps:
  - action: script
    with: { script: 'throw "broken"' }
"#;
    const OK: &str = r#"
name: ok
matchers: ['alertname=~"Ok|Other"']
steps:
  - action: log
    with: { message: "fine" }
"#;
    let cases = [
        ("max_runs", "max_runs: 3"),
        ("max_runs_per_playbook", "max_runs_per_playbook: 3"),
        ("max_targets", "max_targets: 3"),
        ("max_failures", "max_failures: 2"),
    ];
    for (limit, setting) in cases {
        let chat = crate::common::receiver::Receiver::start().await;
        let high = "  max_runs: 1000\n  max_runs_per_playbook: 1000\n  max_targets: 1000\n  max_failures: 1000\n"
            .replace(&format!("  {}: 1000\n", setting.split(':').next().unwrap()), &format!("  {setting}\n"));
        let app = app_with(
            &[("failing.yaml", FAILING), ("ok.yaml", OK)],
            &format!(
                "breaker:\n  window: 10m\n{high}notify:\n  sinks:\n    - {{ name: chat, type: webhook, url: \"{}/chat\", events: [killswitch] }}\n",
                chat.base
            ),
        )
        .await;
        let reason = if limit == "max_failures" {
            for i in 0..2 {
                let id = start_run(&app, "Failing", &format!("f{i}")).await;
                wait_state(&app, id, "failed").await;
            }
            app.wait_for(20, "the failure limit to engage the switch", || async {
                let (_, s) = app
                    .call("GET", "/api/v1/killswitch", Some("carol-token"), None)
                    .await;
                (s["global"]["engaged"] == true)
                    .then(|| s["global"]["reason"].as_str().unwrap().to_string())
            })
            .await
        } else {
            // Distinct alerts (distinct targets): occurrences of one alert would coalesce
            // into a queued run and count once, depending on how fast the runs end.
            let alerts = (0..6)
                .map(|i| {
                    let instance = format!("t{i}");
                    let name = if limit == "max_runs" && i % 2 == 1 {
                        "Other"
                    } else {
                        "Ok"
                    };
                    generic_alert(name, &instance, &format!("2026-11-22T10:00:0{i}Z"))
                })
                .collect();
            post_until_tripped(&app, alerts).await
        };
        assert!(
            reason.contains(&format!("breaker.{limit}")) && reason.contains("10m"),
            "{limit}: {reason}"
        );
        let (_, switch) = app
            .call("GET", "/api/v1/killswitch", Some("carol-token"), None)
            .await;
        assert_eq!(switch["global"]["engaged"], true, "{limit}");
        assert_eq!(switch["global"]["actor"], "circuit-breaker", "{limit}");
        let message = app
            .wait_for(10, "the breaker's chat message", || async {
                chat.at("/chat")
                    .first()
                    .map(|m| m.body["text"].as_str().unwrap().to_string())
            })
            .await;
        assert!(
            message.contains("engaged by circuit-breaker")
                && message.contains(&format!("breaker.{limit}")),
            "{limit}: {message}"
        );
    }
}

#[tokio::test]
async fn runs_on_one_target_wait_for_each_other_and_a_free_target_does_not() {
    let app = app_with(
        &[(
            "queued.yaml",
            &QUEUED.replace(
                "target: \"one-target\"",
                "target: \"{{ labels.instance }}\"",
            ),
        )],
        "engine:\n  max_runs_per_target: 1\n",
    )
    .await;
    let first = start_run(&app, "Queued", "busy").await;
    let second = post_alert(
        &app,
        generic_alert("Queued", "busy", "2026-11-22T10:00:01Z"),
    )
    .await["run_id"]
        .as_i64()
        .unwrap();
    let other = start_run(&app, "Queued", "free").await;
    // The free target's run starts while the busy one's second run still waits.
    app.wait_for(20, "the free target's run to start", || async {
        (run_as(&app, other).await["state"] == "running").then_some(())
    })
    .await;
    assert_eq!(run_as(&app, first).await["state"], "running");
    assert_eq!(
        run_as(&app, second).await["state"],
        "pending",
        "one run at a time on `busy`"
    );
    let a = wait_state(&app, first, "succeeded").await;
    let b = wait_state(&app, second, "succeeded").await;
    assert!(
        b["started_at"].as_str().unwrap() >= a["finished_at"].as_str().unwrap(),
        "the second run started only after the first finished: {a:#} {b:#}"
    );
}

const NOTE: &str = r#"
name: note
matchers: ['alertname="Note"']
steps:
  - action: log
    with: { message: "noted {{ labels.instance }}" }
"#;

#[tokio::test]
async fn playbook_settings_shadow_cooldown_by_group_and_named_approvers_hold() {
    let rehearsal = NOTE
        .replace("name: note", "name: rehearsal\nmode: shadow")
        .replace("Note", "Rehearse");
    let grouped = "name: grouped\nmatchers: ['alertname=\"DiskSpaceLow\"']\ncooldown: 1h\ncooldown_by: group\nsteps:\n  - action: log\n    with: { message: x }\n";
    let named = GATED
        .replace("name: gated", "name: named")
        .replace("Risky", "Named")
        .replace("expires: 10m", "expires: 10m\n      approvers: [alice]");
    let app = app_with(
        &[
            ("note.yaml", NOTE),
            ("rehearsal.yaml", &rehearsal),
            ("grouped.yaml", grouped),
            ("named.yaml", &named),
        ],
        "",
    )
    .await;
    // Per-playbook shadow mode: only that playbook's runs act on nothing.
    let real = start_run(&app, "Note", "h1").await;
    let dry = start_run(&app, "Rehearse", "h1").await;
    wait_state(&app, real, "succeeded").await;
    let run = wait_state(&app, dry, "shadow").await;
    assert_eq!(run["shadow"], true);

    // Cooldown per Alertmanager group: the group's second alert is held back.
    let (status, out) = app
        .call(
            "POST",
            "/api/v1/webhooks/alertmanager",
            Some("alertmanager-token"),
            Some(serde_json::from_str(&crate::common::fixture("alertmanager-disk.json")).unwrap()),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["outcomes"][0][0]["outcome"], "created", "{out}");
    assert_eq!(out["outcomes"][1][0]["outcome"], "suppressed", "{out}");
    assert!(
        out["outcomes"][1][0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("cooldown"),
        "{out}"
    );

    // Named approvers: another approver is refused, the named one is not.
    let id = start_run(&app, "Named", "h1").await;
    let approval = pending_approval(&app, id).await["id"].as_i64().unwrap();
    let (status, body) = decide(&app, approval, "approve", "bob").await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = decide(&app, approval, "approve", "alice").await;
    assert_eq!(status, 200, "{body}");
    wait_state(&app, id, "succeeded").await;
}

#[tokio::test]
async fn sinks_hear_only_their_playbooks_and_synchronous_normal_keeps_the_record() {
    let chat = crate::common::receiver::Receiver::start().await;
    let other = NOTE
        .replace("name: note", "name: other")
        .replace("Note", "Other");
    let mut app = app_with(
        &[("note.yaml", NOTE), ("other.yaml", &other)],
        &format!(
            "store:\n  synchronous: normal\nnotify:\n  sinks:\n    - {{ name: chat, type: webhook, url: \"{}/chat\", playbooks: [note] }}\n",
            chat.base
        ),
    )
    .await;
    let other_run = start_run(&app, "Other", "h1").await;
    wait_state(&app, other_run, "succeeded").await;
    let note_run = start_run(&app, "Note", "h1").await;
    wait_state(&app, note_run, "succeeded").await;
    // A run this quick is one message, at its end; the other playbook's run, which ended
    // first, sent none here.
    let messages = app
        .wait_for(10, "the note run's message", || async {
            let m = chat.at("/chat");
            (!m.is_empty()).then_some(m)
        })
        .await;
    assert_eq!(messages[0].body["event"], "run_finished", "{messages:#?}");
    assert!(
        messages.iter().all(|m| m.body["run"]["playbook"] == "note"),
        "{messages:#?}"
    );
    // With `synchronous: normal` a clean restart keeps every record.
    assert!(app.terminate());
    app.restart().await;
    assert_eq!(run_as(&app, note_run).await["state"], "succeeded");
    assert_eq!(run_as(&app, other_run).await["state"], "succeeded");
}

#[tokio::test]
async fn an_approval_that_expires_while_the_daemon_is_down_ends_its_run_at_the_next_start() {
    let mut app = app_with(
        &[("gated.yaml", &GATED.replace("expires: 10m", "expires: 1s"))],
        "",
    )
    .await;
    let id = start_run(&app, "Risky", "h-down").await;
    let approval = pending_approval(&app, id).await;
    let expires = humantime::parse_rfc3339_weak(approval["expires_at"].as_str().unwrap()).unwrap();
    assert!(app.terminate());
    while std::time::SystemTime::now() <= expires {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    app.restart().await;
    let run = wait_state(&app, id, "expired").await;
    assert_eq!(run["steps"][1]["state"], "skipped");
}
