//! `reflex check` and `reflex simulate` through the real binary.

use crate::common::reflex_cli;
use std::path::Path;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_reports_each_error_with_file_and_line_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write(
        "bad-matcher.yaml",
        "name: a\nmatchers:\n  - 'alertname=\"X\"'\n  - 'severity=~\"(unclosed\"'\nsteps:\n  - action: log\n    with: { message: hi }\n",
    );
    write(
        "unknown-key.yaml",
        "name: b\nmatchers: ['alertname=\"X\"']\nsteps:\n  - action: log\n    with: { message: hi }\n    retries: 3\n",
    );
    write(
        "rhai-error.yaml",
        "name: c\nmatchers: ['alertname=\"X\"']\nwhen: |\n  labels.severity ==\nsteps:\n  - action: log\n    with: { message: hi }\n",
    );
    write(
        "wrong-type.yaml",
        "name: d\nmatchers: ['alertname=\"X\"']\ndry_run: sometimes\nsteps:\n  - action: log\n    with: { message: hi }\n",
    );
    let (code, out) = reflex_cli(&["check", dir.path().to_str().unwrap()], repo());
    assert_eq!(code, 1, "{out}");
    let d = dir.path().display();
    for want in [
        format!("{d}/bad-matcher.yaml:4: "),
        format!("{d}/unknown-key.yaml:6: "),
        format!("{d}/rhai-error.yaml:4: "),
        format!("{d}/wrong-type.yaml:3: "),
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(&want)),
            "missing {want:?} in:\n{out}"
        );
    }
    assert!(out.contains("invalid regex"), "{out}");
    assert!(out.contains("retries"), "{out}");
    assert!(out.contains("Rhai"), "{out}");
    assert!(out.contains("dry_run") || out.contains("boolean"), "{out}");
}

#[test]
fn check_passes_on_the_example_playbooks() {
    let (code, out) = reflex_cli(&["check", "playbooks"], repo());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("valid"), "{out}");
}

#[test]
fn check_reports_config_errors_with_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("reflex.yaml");
    std::fs::write(
        &cfg,
        "listen: 127.0.0.1:9095\nengin:\n  max_concurrent_runs: 2\n",
    )
    .unwrap();
    let (code, out) = reflex_cli(
        &["check", "--config", cfg.to_str().unwrap(), "playbooks"],
        repo(),
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("reflex.yaml:2: "), "{out}");
}

#[test]
fn simulate_lists_matching_playbooks_and_rendered_steps() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("reflex.yaml");
    std::fs::write(
        &cfg,
        format!(
            "playbooks_dir: {}\ndata_dir: {}\nssh:\n  hosts:\n    db-1: {{ aliases: [db-1.example.internal] }}\n    db-2: {{ aliases: [db-2.example.internal] }}\nfeature_flags:\n  flags: {{ type: unleash, url: \"http://127.0.0.1:9\", environment: production }}\n",
            repo().join("playbooks").display(),
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let (code, out) = reflex_cli(
        &[
            "simulate",
            "--config",
            cfg.to_str().unwrap(),
            "--alert",
            "examples/alerts/disk-space-low.json",
        ],
        repo(),
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.matches("playbook disk-cleanup matches").count(),
        2,
        "{out}"
    );
    assert_eq!(out.matches("=> would run\n").count(), 2, "{out}");
    assert!(
        out.contains("Disk space low on db-1.example.internal (/var)"),
        "{out}"
    );
    assert!(
        out.contains("Disk space low on db-2.example.internal (/var)"),
        "{out}"
    );

    let (code, out) = reflex_cli(
        &[
            "simulate",
            "--json",
            "--alert",
            "tests/fixtures/alertmanager-highcpu.json",
        ],
        repo(),
    );
    assert_eq!(code, 0, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        report[0]["matches"],
        serde_json::json!([]),
        "no example playbook for HighCPUUsage"
    );
}

#[test]
fn simulate_has_no_side_effects() {
    let dir = tempfile::tempdir().unwrap();
    let alert = repo().join("examples/alerts/generic-disk.json");
    let playbooks = repo().join("playbooks");
    let (code, out) = reflex_cli(
        &[
            "simulate",
            "--alert",
            alert.to_str().unwrap(),
            "--playbooks",
            playbooks.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_eq!(code, 1, "web-3 is not in the (empty) inventory: {out}");
    assert!(out.contains("web-3.example.internal"), "{out}");
    assert!(out.contains("WOULD BE REFUSED"), "{out}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "simulate wrote files"
    );
}

#[test]
fn check_refuses_relative_or_factor_scaling_without_a_max() {
    let dir = tempfile::tempdir().unwrap();
    let playbook = |replicas: &str, max: &str| {
        format!(
            "name: s\nmatchers: ['alertname=\"X\"']\nsteps:\n  - action: kube.scale\n    with:\n      kind: Deployment\n      namespace: shop\n      name: api\n      replicas: \"{replicas}\"\n{max}"
        )
    };
    std::fs::write(dir.path().join("s.yaml"), playbook("x2", "")).unwrap();
    let (code, out) = reflex_cli(&["check", dir.path().to_str().unwrap()], repo());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("s.yaml:5:") && out.contains("`max`"), "{out}");
    std::fs::write(dir.path().join("s.yaml"), playbook("+2", "")).unwrap();
    assert_eq!(
        reflex_cli(&["check", dir.path().to_str().unwrap()], repo()).0,
        1
    );
    std::fs::write(dir.path().join("s.yaml"), playbook("x2", "      max: 10\n")).unwrap();
    let (code, out) = reflex_cli(&["check", dir.path().to_str().unwrap()], repo());
    assert_eq!(code, 0, "{out}");
}

#[test]
fn simulate_shows_refusals_gates_escalation_and_unplannable_alerts_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let pb = dir.path().join("playbooks");
    std::fs::create_dir_all(&pb).unwrap();
    std::fs::write(
        pb.join("escalate.yaml"),
        r#"
name: escalate
matchers: ['alertname="DiskSpaceLow"']
steps:
  - name: clean
    action: ssh.run
    with: { host: "{{ host(labels.instance) }}", command: "df -P -- {{ labels.mountpoint }}" }
    approval: { count: 2, approvers: [alice, bob], expires: 10m }
on_failure:
  - name: page
    action: log
    with: { message: "cleanup failed on {{ labels.instance }}" }
"#,
    )
    .unwrap();
    let alert = repo().join("examples/alerts/disk-space-low.json");
    let run = |extra: &str, alert: &Path| {
        let cfg = dir.path().join("reflex.yaml");
        std::fs::write(
            &cfg,
            format!(
                "playbooks_dir: {}\ndata_dir: {}\nfeature_flags:\n  flags: {{ type: unleash, url: \"http://127.0.0.1:9\", environment: production }}\n{extra}",
                pb.display(),
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        reflex_cli(
            &[
                "simulate",
                "--config",
                cfg.to_str().unwrap(),
                "--alert",
                alert.to_str().unwrap(),
            ],
            dir.path(),
        )
    };
    // No inventory: refused, and said so.
    let (code, out) = run("", &alert);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "WOULD BE REFUSED: host \"db-1.example.internal\" is not in the SSH inventory"
        ),
        "{out}"
    );
    assert!(
        out.contains("waits for 2 approval(s) by alice or bob, expiring after 10m"),
        "{out}"
    );
    let escalation = out
        .find("if a step fails, then:")
        .expect("escalation section");
    assert!(out[escalation..].contains("page [log]"), "{out}");
    assert!(out.find("1. clean").unwrap() < escalation, "{out}");

    // With the hosts in the inventory it would run; a maintenance window holds it now.
    let inventory = "ssh:\n  hosts:\n    db-1: { aliases: [db-1.example.internal] }\n    db-2: { aliases: [db-2.example.internal] }\n";
    let (code, out) = run(inventory, &alert);
    assert_eq!(code, 0, "{out}");
    let window = "maintenance_windows:\n  - { name: patching, matchers: ['alertname=\"DiskSpaceLow\"'], start: 2020-01-01T00:00:00Z, end: 2099-01-01T00:00:00Z }\n";
    let (code, out) = run(&format!("{inventory}{window}"), &alert);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("HELD NOW: maintenance window \"patching\""),
        "{out}"
    );

    // An alert a playbook matches but cannot plan (no `mountpoint`) fails the simulation.
    let bare = dir.path().join("bare.json");
    std::fs::write(
        &bare,
        r#"{"labels": {"alertname": "DiskSpaceLow", "instance": "db-1.example.internal:9100"}}"#,
    )
    .unwrap();
    let (code, out) = run(inventory, &bare);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("CANNOT BE PLANNED"), "{out}");
}

#[tokio::test]
async fn simulate_sees_the_daemons_kill_switch_and_cooldowns() {
    let app = crate::common::TestApp::builder()
        .example_playbooks()
        .config("ssh:\n  hosts:\n    db-1: { aliases: [db-1.example.internal] }\n    db-2: { aliases: [db-2.example.internal] }\n")
        .start()
        .await;
    let (status, _) = app
        .post_alertmanager(&crate::common::fixture("alertmanager-disk.json"))
        .await;
    assert_eq!(status, 200);
    let (status, _) = app
        .call(
            "PUT",
            "/api/v1/killswitch",
            None,
            Some(serde_json::json!({"engaged": true, "reason": "incident 9"})),
        )
        .await;
    assert_eq!(status, 200);
    // While the daemon runs: simulate reads its store without writing to it.
    let alert = repo().join("tests/fixtures/alertmanager-disk.json");
    let cfg = app.config_path().to_str().unwrap().to_string();
    let (code, out) = reflex_cli(
        &[
            "simulate",
            "--config",
            &cfg,
            "--alert",
            alert.to_str().unwrap(),
        ],
        repo(),
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("HELD NOW: kill switch (global) engaged by anonymous: incident 9"),
        "{out}"
    );
    assert!(
        out.contains("HELD NOW: cooldown: run 1 for the same key"),
        "{out}"
    );
}

#[test]
fn check_catches_typos_non_conditions_and_names_the_config_lacks_with_suggestions() {
    let dir = tempfile::tempdir().unwrap();
    let pb = dir.path().join("playbooks");
    std::fs::create_dir_all(&pb).unwrap();
    let write = |name: &str, text: &str| std::fs::write(pb.join(name), text).unwrap();
    write(
        "typos.yaml",
        r#"name: typos
matchers: ['alertname="X"']
params:
  host: "{{ hots(labels.instance) }}"
steps:
  - action: log
    with: { message: "on {{ param.host }}" }
"#,
    );
    write(
        "when.yaml",
        "name: when\nmatchers: ['alertname=\"X\"', 'severity=\"critical\"']\nwhen: labels.severity\ncooldown: 20M\nsteps:\n  - action: log\n    with: { message: hi }\n",
    );
    write(
        "verify.yaml",
        "name: verify\nmatchers: ['alertname=\"X\"']\nsteps:\n  - action: verify\n    with:\n      query: up\n      condition: value = 1\n",
    );
    write(
        "names.yaml",
        r#"name: names
matchers: ['alertname="X"']
approval: { count: 1, approvers: [alcie] }
steps:
  - action: feature_flag.disable
    with: { provider: flagz, flag: checkout }
  - action: http
    with: { url: "https://status.example/x", credential: pagr }
"#,
    );
    let cfg = dir.path().join("reflex.yaml");
    std::fs::write(
        &cfg,
        format!(
            "playbooks_dir: {}\nfeature_flags:\n  flags: {{ type: unleash, url: \"http://u\", environment: prod }}\n\
             credentials:\n  pager: {{ env: PAGER_TOKEN }}\n\
             auth:\n  tokens:\n    - {{ name: alice, role: approver, sha256: {} }}\n",
            pb.display(),
            "0".repeat(64)
        ),
    )
    .unwrap();
    let (code, out) = reflex_cli(&["check", "--config", cfg.to_str().unwrap()], dir.path());
    assert_eq!(code, 1, "{out}");
    let d = pb.display();
    for (at, needle) in [
        (
            format!("{d}/typos.yaml:4:"),
            "unknown function `hots`; did you mean `host`?",
        ),
        (format!("{d}/typos.yaml:7:"), "unknown variable `param`"),
        (
            format!("{d}/when.yaml:3:"),
            "when must give true or false, but gives a string",
        ),
        (format!("{d}/when.yaml:4:"), "`m` is minutes"),
        (format!("{d}/verify.yaml:7:"), "(to compare, write `==`)"),
        (
            format!("{d}/names.yaml:3:"),
            "approver \"alcie\" is not a token with the approver or admin role in auth.tokens; did you mean \"alice\"?",
        ),
        (
            format!("{d}/names.yaml:6:"),
            "feature-flag provider (feature_flags) \"flagz\" is not in the config; did you mean \"flags\"?",
        ),
        (
            format!("{d}/names.yaml:8:"),
            "credential (credentials) \"pagr\" is not in the config; did you mean \"pager\"?",
        ),
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&at) && l.contains(needle)),
            "missing {at} {needle:?} in:\n{out}"
        );
    }
    assert!(out.contains("did you mean `params`?"), "{out}");
    // Without --config the cross-checks are not made (names may come from another config).
    let (_, out) = reflex_cli(
        &["check", pb.join("names.yaml").to_str().unwrap()],
        dir.path(),
    );
    assert!(!out.contains("flagz"), "{out}");
}

#[tokio::test]
async fn serve_listens_where_told_and_a_never_changed_switch_has_no_date() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::common::free_port();
    let mut child = std::process::Command::new(crate::common::reflex_bin())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let mut switch = None;
    for _ in 0..200 {
        if let Ok(r) = reqwest::get(format!("{base}/api/v1/killswitch")).await {
            switch = Some(r.json::<serde_json::Value>().await.unwrap());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let switch = switch.expect("reflex serve --listen answered");
    assert_eq!(switch["global"]["engaged"], false);
    assert_eq!(
        switch["global"]["changed_at"],
        serde_json::Value::Null,
        "{switch}"
    );
    assert_eq!(
        switch["global"]["actor"],
        serde_json::Value::Null,
        "{switch}"
    );
}

#[test]
fn server_options_show_only_on_the_commands_that_use_them() {
    for cmd in ["serve", "check", "simulate"] {
        let (_, out) = reflex_cli(&[cmd, "--help"], repo());
        assert!(!out.contains("--server"), "{cmd}: {out}");
    }
    for cmd in ["runs", "approve", "kill", "audit"] {
        let (_, out) = reflex_cli(&[cmd, "--help"], repo());
        assert!(out.contains("--server"), "{cmd}: {out}");
    }
}

#[tokio::test]
async fn trigger_and_retry_from_the_cli_start_runs_that_say_who_asked() {
    let app = crate::common::TestApp::builder()
        .playbook(
            "flaky.yaml",
            "name: flaky\nmatchers: ['alertname=\"Flaky\"']\nsteps:\n  - name: first\n    action: log\n    with: { message: \"on {{ labels.instance }}\" }\n  - name: probe\n    action: script\n    with: { script: 'throw \"probe failed\"' }\n",
        )
        .start()
        .await;
    let server = app.base.clone();
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--server", &server, "-o", "table"]);
        reflex_cli(&all, repo())
    };
    let (code, out) = cli(&[
        "trigger",
        "flaky",
        "-l",
        "instance=h1",
        "-a",
        "summary=by hand",
    ]);
    assert_eq!(code, 0, "{out}");
    let id: i64 = (out.split_whitespace().nth(1).and_then(|w| w.parse().ok()))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(out.trim_end().ends_with("created"), "{out}");
    let run = app.wait_run_state(id, "failed").await;
    assert_eq!(run["steps"][0]["args"]["message"], "on h1", "{run}");
    assert!(run["triggered_by"].is_string(), "{run}");
    let (code, out) = cli(&["retry", &id.to_string()]);
    assert_eq!(code, 0, "{out}");
    let retry: i64 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let again = app.wait_run_state(retry, "failed").await;
    assert_eq!(again["retry_of"], id, "{again}");
    assert_eq!(
        again["steps"].as_array().unwrap().len(),
        1,
        "from the failed step: {again}"
    );
    // A run that cannot be retried: a clear error and a non-zero exit.
    let (code, out) = cli(&["retry", "999"]);
    assert_eq!(code, 5, "not found: {out}");
    assert!(out.contains("no run 999"), "{out}");
    let done = app
        .start_run_for(&serde_json::json!({"labels": {"alertname": "Flaky"}}))
        .await;
    app.wait_run_state(done, "failed").await;
    let (code, out) = cli(&["cancel", &done.to_string()]);
    assert_eq!(code, 6, "conflict: {out}");
    // Its log line and script changed nothing: `reflex undo` says so, and why.
    let (code, out) = cli(&["undo", &done.to_string()]);
    assert_eq!(code, 6, "conflict: {out}");
    assert!(out.contains("changed nothing that can be undone"), "{out}");
    let (code, out) = cli(&["trigger", "flaky", "-l", "novalue"]);
    assert_ne!(code, 0);
    assert!(out.contains("not key=value"), "{out}");
}

#[tokio::test]
async fn operator_commands_speak_json_when_piped_follow_a_run_and_exit_by_cause() {
    let app = crate::common::TestApp::builder()
        .playbook(
            "slow.yaml",
            "name: slow\nmatchers: ['alertname=\"Slow\"']\nsteps:\n  - name: pause\n    action: wait\n    with: { duration: 300ms }\n  - name: note\n    action: log\n    with: { message: done }\n",
        )
        .config(&crate::common::auth_config(&[("ops", "operator"), ("boss", "admin")]))
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "ops-token\n").unwrap();
    let admin_file = dir.path().join("admin-token");
    std::fs::write(&admin_file, "boss-token\n").unwrap();
    let server = app.base.clone();
    let tf = token_file.to_str().unwrap().to_string();
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--server", &server, "--token-file", &tf]);
        reflex_cli(&all, repo())
    };
    // Piped, a read command prints JSON.
    let (code, out) = cli(&["trigger", "slow"]);
    assert_eq!(code, 0, "{out}");
    let outcome: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let id = outcome["run_id"].as_i64().unwrap();
    // --follow prints each step as it changes and exits 0 once the run succeeded.
    let (code, out) = cli(&["run", &id.to_string(), "--follow", "-o", "table"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("succeeded    pause (wait)"), "{out}");
    assert!(out.contains("succeeded    note (log)"), "{out}");
    assert!(
        out.trim_end().ends_with(&format!("run {id} succeeded")),
        "{out}"
    );
    let (code, out) = cli(&["playbooks"]);
    assert_eq!(code, 0);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["name"], "slow");
    // The causes of failure, by exit code.
    let (code, out) = reflex_cli(&["runs", "--server", &server], repo());
    assert_eq!(code, 4, "no token: {out}");
    assert!(out.contains("REFLEX_TOKEN"), "{out}");
    let port = crate::common::free_port();
    let (code, out) = reflex_cli(
        &["runs", "--server", &format!("http://127.0.0.1:{port}")],
        repo(),
    );
    assert_eq!(code, 3, "unreachable: {out}");
    assert!(
        out.contains("cannot reach") && out.contains("reflex serve"),
        "{out}"
    );
    let (code, out) = cli(&["run", "424242"]);
    assert_eq!(code, 5, "{out}");
    // As an admin: a kill switch engaged twice keeps its first reason unless --replace.
    let af = admin_file.to_str().unwrap().to_string();
    let admin = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--server", &server, "--token-file", &af]);
        reflex_cli(&all, repo())
    };
    let (code, out) = admin(&["kill", "--reason", "INC-4711: bad deploy", "--for", "2h"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = admin(&["kill", "--reason", "x"]);
    assert_eq!(code, 6, "{out}");
    assert!(out.contains("already engaged by boss"), "{out}");
    let (code, out) = admin(&["kill", "--reason", "INC-4712", "--replace", "-o", "table"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("INC-4712"), "{out}");
    // Under the switch, a trigger is held: it did not happen, so the exit code says so.
    let (code, out) = cli(&["trigger", "slow"]);
    assert_eq!(code, 6, "suppressed: {out}");
    let (code, out) = cli(&["retry", &id.to_string()]);
    assert_ne!(code, 0, "a succeeded run is not retried: {out}");
    let (code, _) = admin(&["unkill"]);
    assert_eq!(code, 0);
    // A rejected reload prints every error with its file and line.
    std::fs::write(
        app.playbooks_dir().join("broken.yaml"),
        "name: broken\nmatchers: ['alertname=\"B\"']\nsteps:\n  - action: nope\n",
    )
    .unwrap();
    let (code, out) = admin(&["reload"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("broken.yaml:4: "), "{out}");
    std::fs::remove_file(app.playbooks_dir().join("broken.yaml")).unwrap();
    // Completions for each shell name the commands.
    for shell in ["bash", "zsh", "fish"] {
        let (code, out) = reflex_cli(&["completions", shell], repo());
        assert_eq!(code, 0, "{shell}");
        assert!(
            out.contains("retry") && out.contains("trigger"),
            "{shell}: {out}"
        );
    }
}

/// Runs `reflex ARGS` and waits at most `secs` for it to exit (a daemon that starts when it
/// should not is killed, and the test fails on its exit code).
fn reflex_exits(args: &[&str], cwd: &Path, secs: u64) -> (i32, String) {
    let mut child = std::process::Command::new(crate::common::reflex_bin())
        .args(args)
        .current_dir(cwd)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).to_string();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn check_and_serve_refuse_the_same_config_with_the_same_words() {
    let dir = tempfile::tempdir().unwrap();
    let pb = dir.path().join("playbooks");
    std::fs::create_dir_all(&pb).unwrap();
    std::fs::write(dir.path().join("empty.token"), "\n").unwrap();
    let cfg = dir.path().join("reflex.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:0\nplaybooks_dir: {}\ndata_dir: {}\nauth:\n  tokens:\n    - {{ name: ops, role: admin, file: {} }}\n\
             notify:\n  sinks:\n    - {{ name: chat, type: slack, url_env: REFLEX_TEST_UNSET_URL }}\n\
             kubernetes:\n  clusters:\n    prod: {{ kubeconfig: {} }}\n",
            pb.display(),
            dir.path().join("data").display(),
            dir.path().join("empty.token").display(),
            dir.path().join("missing-kubeconfig").display(),
        ),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let (code, checked) = reflex_exits(&["check", "--config", c], dir.path(), 20);
    assert_eq!(code, 1, "{checked}");
    let errors: Vec<&str> = checked.lines().filter(|l| l.starts_with(c)).collect();
    assert_eq!(errors.len(), 3, "{checked}");
    for needle in [
        ":6: auth.tokens.0.file: file ",
        ":9: notify.sinks.0: environment variable REFLEX_TEST_UNSET_URL is not set",
        ":12: cluster \"prod\": kubeconfig ",
    ] {
        assert!(
            errors.iter().any(|l| l.contains(needle)),
            "{needle}: {checked}"
        );
    }
    assert!(
        !checked.contains("playbooks:1"),
        "no spurious error: {checked}"
    );
    let (code, served) = reflex_exits(&["serve", "--config", c], dir.path(), 20);
    assert_eq!(code, 1, "{served}");
    for line in &errors {
        assert!(served.contains(line), "serve says {line:?} too: {served}");
    }
    // A playbook naming what the config lacks: refused by both, in the same words.
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:0\nplaybooks_dir: {}\ndata_dir: {}\n",
            pb.display(),
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    std::fs::write(
        pb.join("flag.yaml"),
        "name: flag\nmatchers: ['alertname=\"X\"']\nsteps:\n  - action: feature_flag.disable\n    with: { provider: flagz, flag: checkout }\n",
    )
    .unwrap();
    let (code, checked) = reflex_exits(&["check", "--config", c], dir.path(), 20);
    assert_eq!(code, 1, "{checked}");
    let line = checked.lines().next().unwrap();
    assert!(
        line.ends_with(
            "flag.yaml:5: feature-flag provider (feature_flags) \"flagz\" is not in the config"
        ),
        "{checked}"
    );
    let (code, served) = reflex_exits(&["serve", "--config", c], dir.path(), 20);
    assert_eq!(code, 1, "{served}");
    assert!(served.contains(line), "{served}");
    // Without a config file (the embedded defaults) neither checks names: the examples load.
    let (code, checked) = reflex_exits(&["check", pb.to_str().unwrap()], dir.path(), 20);
    assert_eq!(code, 0, "{checked}");
}

#[tokio::test]
async fn reflex_backup_copies_the_running_daemons_store_and_the_copy_serves() {
    let app = crate::common::TestApp::builder()
        .playbook(
            "note.yaml",
            "name: note\nmatchers: ['alertname=\"Note\"']\nsteps:\n  - action: log\n    with: { message: \"noted {{ labels.instance }}\" }\n",
        )
        .start()
        .await;
    for i in 0..3 {
        let alert =
            serde_json::json!({"labels": {"alertname": "Note", "instance": format!("h{i}")}});
        let (status, out) = app
            .post_raw("/api/v1/webhooks/generic", alert.to_string())
            .await;
        assert_eq!(status, 200, "{out}");
    }
    app.wait_run_state(3, "succeeded").await;
    let out = tempfile::tempdir().unwrap();
    let copy = out.path().join("reflex.db");
    let config = app.config_path().to_str().unwrap().to_string();
    let (code, text) = reflex_cli(
        &["backup", copy.to_str().unwrap(), "--config", &config],
        out.path(),
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.starts_with("backed up ") && text.contains("(schema version "),
        "{text}"
    );
    // The copy is a store: opened as one, the daemon's runs are in it.
    let store = reflex::store::Store::open(out.path()).unwrap();
    assert_eq!(store.counts().await.unwrap(), (3, 3));
    // Never over a file.
    let (code, text) = reflex_cli(
        &["backup", copy.to_str().unwrap(), "--config", &config],
        out.path(),
    );
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("never overwrites"), "{text}");
}

#[tokio::test]
async fn reflex_audit_export_writes_every_row_oldest_first_as_cloudevents() {
    let app = crate::common::TestApp::builder().start().await;
    // More rows than one page of the API holds: engage and release, over and over.
    for i in 0..501 {
        for engaged in [true, false] {
            let body = serde_json::json!({"engaged": engaged, "reason": format!("drill {i}")});
            let (status, out) = app
                .call("PUT", "/api/v1/killswitch", None, Some(body))
                .await;
            assert_eq!(status, 200, "{out}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let export = |format: &str| {
        reflex_cli(
            &["audit", "export", "--server", &app.base, "--format", format],
            dir.path(),
        )
    };
    let (code, text) = export("cloudevents");
    assert_eq!(code, 0, "{text}");
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(events.len() >= 1002, "{} rows", events.len());
    let ids: Vec<i64> = events
        .iter()
        .map(|e| e["data"]["id"].as_i64().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "oldest first, each once"
    );
    let first = &events[0];
    assert_eq!(first["specversion"], "1.0");
    assert_eq!(first["source"], app.base.as_str());
    assert_eq!(first["id"], ids[0].to_string());
    assert!(
        first["type"]
            .as_str()
            .unwrap()
            .starts_with("io.reflex.audit.killswitch"),
        "{first}"
    );
    assert_eq!(first["time"], first["data"]["at"]);
    assert!(events.iter().any(|e| {
        e["data"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("drill 500"))
    }));
    // Plain rows, the same ones.
    let (code, text) = export("json");
    assert_eq!(code, 0, "{text}");
    assert_eq!(text.lines().count(), events.len());
}
