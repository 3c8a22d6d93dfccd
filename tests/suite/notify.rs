//! Chat and webhook notifications, checked request by request against local receivers.

use crate::common::TestApp;
use crate::common::receiver::Receiver;
use serde_json::json;
use std::time::Duration;

const PLAYBOOK: &str = r#"
name: gated
matchers: ['alertname="Risky"']
steps:
  - name: look
    action: log
    with: { message: "looking at {{ labels.instance }}" }
  - name: act
    action: log
    with: { message: "acting on {{ labels.instance }}" }
    approval: required
  - name: probe
    action: script
    with: { script: 'throw "probe failed"' }
    on_failure: continue
"#;

fn alert(instance: &str) -> String {
    json!({
        "labels": {"alertname": "Risky", "instance": instance},
        "annotations": {"summary": format!("Error rate high on {instance}")},
        "startsAt": "2026-11-22T10:00:00Z"
    })
    .to_string()
}

fn sinks(rx: &Receiver, extra: &str) -> String {
    format!(
        "public_url: https://reflex.example.internal\nnotify:\n  max_attempts: 3\n  timeout: 2s\n  sinks:\n\
         \x20   - {{ name: slack, type: slack, url: \"{b}/slack\" }}\n\
         \x20   - {{ name: mm, type: mattermost, url: \"{b}/mm\" }}\n\
         \x20   - {{ name: teams, type: teams, url: \"{b}/teams\" }}\n\
         \x20   - {{ name: hook, type: webhook, url: \"{b}/hook\" }}\n{extra}",
        b = rx.base
    )
}

async fn approve_first(app: &TestApp) -> i64 {
    let approval = app
        .wait_for(10, "an approval", || async {
            let (_, list) = app.get("/api/v1/approvals?state=pending").await;
            list[0]["id"].as_i64()
        })
        .await;
    let (status, body) = app
        .call(
            "POST",
            &format!("/api/v1/approvals/{approval}/approve"),
            None,
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    approval
}

#[tokio::test]
async fn every_sink_gets_the_exact_payload_for_every_event() {
    let rx = Receiver::start().await;
    let app = TestApp::builder()
        .playbook("gated.yaml", PLAYBOOK)
        .config(&sinks(&rx, ""))
        .start()
        .await;
    app.post_raw("/api/v1/webhooks/generic", alert("web-1"))
        .await;
    let approval = approve_first(&app).await;
    app.wait_run_state(1, "succeeded").await;
    app.call(
        "PUT",
        "/api/v1/killswitch",
        None,
        Some(json!({"engaged": true, "reason": "incident 7"})),
    )
    .await;
    for path in ["/slack", "/mm", "/teams", "/hook"] {
        rx_wait(&rx, path, 5).await;
    }

    let link = "https://reflex.example.internal/ui/runs/1";
    let started =
        format!("Error rate high on web-1. Running playbook gated on web-1 (run 1). {link}");
    let step_failed = format!(
        "Error rate high on web-1. Step probe of run 1 (gated) failed: Runtime error: probe failed (line 1, position 1). {link}"
    );
    let killswitch = "Kill switch (global) engaged by anonymous: incident 7. No automation acts until it is released.";

    // Slack incoming webhook: {"text": …}, nothing else.
    let slack = rx.at("/slack");
    let kinds: Vec<String> = slack
        .iter()
        .map(|r| r.body["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(slack.len(), 5, "{kinds:#?}");
    for r in &slack {
        assert_eq!(r.method, "POST");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(
            r.body.as_object().unwrap().len(),
            1,
            "only `text`: {}",
            r.raw
        );
    }
    assert_eq!(slack[0].body, json!({ "text": started }));
    let approval_text = slack[1].body["text"].as_str().unwrap();
    assert!(
        approval_text.starts_with("Error rate high on web-1. Approval needed (1) for run 1 (gated) on web-1: log {\"message\":\"acting on web-1\"}. Expires "),
        "{approval_text}"
    );
    assert!(approval_text.contains(&format!("Approve: reflex approve {approval} (POST /api/v1/approvals/{approval}/approve); deny: reflex deny {approval}.")), "{approval_text}");
    assert_eq!(slack[2].body, json!({ "text": step_failed }));
    let finished = slack[3].body["text"].as_str().unwrap();
    assert!(
        finished.starts_with("Error rate high on web-1. Run 1 (gated) succeeded in "),
        "{finished}"
    );
    assert!(finished.ends_with(link), "{finished}");
    assert_eq!(slack[4].body, json!({ "text": killswitch }));

    // Mattermost: Slack-compatible, with a username.
    let mm = rx.at("/mm");
    assert_eq!(mm.len(), 5);
    assert_eq!(mm[0].body, json!({ "text": started, "username": "reflex" }));

    // Teams: an Adaptive Card in a message attachment.
    let teams = rx.at("/teams");
    assert_eq!(teams.len(), 5);
    assert_eq!(
        teams[0].body,
        json!({
            "type": "message",
            "attachments": [{
                "contentType": "application/vnd.microsoft.card.adaptive",
                "contentUrl": null,
                "content": {
                    "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                    "type": "AdaptiveCard",
                    "version": "1.4",
                    "body": [
                        { "type": "TextBlock", "text": "Reflex: gated (run started)", "weight": "Bolder", "size": "Medium", "wrap": true },
                        { "type": "TextBlock", "text": started, "wrap": true }
                    ]
                }
            }]
        })
    );

    // Generic webhook: the structured event plus the text.
    let hook = rx.at("/hook");
    let events: Vec<&str> = hook
        .iter()
        .map(|r| r.body["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        [
            "run_started",
            "approval_needed",
            "step_failed",
            "run_finished",
            "killswitch"
        ]
    );
    let run = json!({"id": 1, "shadow": false, "playbook": "gated", "target": "web-1", "title": "Error rate high on web-1", "url": link});
    assert_eq!(
        hook[0].body,
        json!({ "event": "run_started", "run": run, "text": started })
    );
    assert_eq!(hook[1].body["approval_id"], approval);
    assert_eq!(
        hook[1].body["action"]["steps"][0]["args"]["message"],
        "acting on web-1"
    );
    assert_eq!(hook[3].body["state"], "succeeded");
    assert_eq!(
        hook[4].body,
        json!({ "event": "killswitch", "scope": "global", "engaged": true, "actor": "anonymous", "reason": "incident 7", "until": null, "text": killswitch })
    );
}

async fn rx_wait(rx: &Receiver, path: &str, n: usize) {
    for _ in 0..200 {
        if rx.at(path).len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "receiver got {} requests at {path}, wanted {n}",
        rx.at(path).len()
    );
}

/// A playbook that draws a graph from real Prometheus before its gate.
const EVIDENCE: &str = r#"
name: evidence
matchers: ['alertname="Risky"']
steps:
  - name: errors
    action: prometheus.graph
    with: { query: 'up{job="app"}', range: 5m, title: "Targets up" }
  - name: act
    action: log
    with: { message: "acting on {{ labels.instance }}" }
    approval: required
"#;

/// The requests under `prefix`, in order, as (method, path after the prefix, request).
fn api_calls(
    rx: &Receiver,
    prefix: &str,
) -> Vec<(String, String, crate::common::receiver::Recorded)> {
    (rx.requests().into_iter())
        .filter_map(|r| {
            let rest = r.path.strip_prefix(prefix)?.to_string();
            Some((r.method.clone(), rest, r))
        })
        .collect()
}

/// The `ts` the receiver answered request `r` with (its place among all requests).
fn answered_ts(rx: &Receiver, r: &crate::common::receiver::Recorded) -> String {
    let i = (rx.requests().iter())
        .position(|x| x.at == r.at && x.path == r.path)
        .unwrap();
    format!("1000.{}", i + 1)
}

#[tokio::test]
async fn slack_and_mattermost_bots_keep_one_message_per_run_edited_with_the_evidence_in_its_thread()
{
    let rx = Receiver::start().await;
    let target = crate::common::prometheus::serve_metrics("# TYPE x gauge\nx 1\n").await;
    let prom = crate::common::prometheus::Prometheus::start(&target).await;
    let cfg = format!(
        "prometheus_url: {}\npublic_url: https://reflex.example.internal\nnotify:\n  sinks:\n\
         \x20   - {{ name: bot, type: slack_bot, token_env: REFLEX_TEST_TOKEN, channel: \"#ops\", api_url: \"{b}/slack\" }}\n\
         \x20   - {{ name: mmbot, type: mattermost_bot, token_env: REFLEX_TEST_TOKEN, channel: ch1, api_url: \"{b}/mm\" }}\n",
        prom.base,
        b = rx.base
    );
    bot_token_is_in_the_environment();
    let app = TestApp::builder()
        .playbook("evidence.yaml", EVIDENCE)
        .config(&cfg)
        .start()
        .await;
    app.post_raw("/api/v1/webhooks/generic", alert("web-2"))
        .await;
    approve_first(&app).await;
    app.wait_run_state(1, "succeeded").await;
    let done = |prefix: &'static str, n: usize| {
        let rx = rx.clone();
        move || {
            let rx = rx.clone();
            async move { (api_calls(&rx, prefix).len() >= n).then_some(()) }
        }
    };
    app.wait_for(10, "slack's calls", done("/slack/", 6)).await;
    app.wait_for(10, "mattermost's calls", done("/mm/", 6))
        .await;

    // Slack: one message, edited; the evidence in its thread, the graph uploaded there.
    let slack = api_calls(&rx, "/slack/");
    let paths: Vec<&str> = slack.iter().map(|(_, p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "chat.postMessage",
            "chat.update",
            "chat.postMessage",
            "files.getUploadURLExternal",
            "files.completeUploadExternal",
            "chat.update",
        ],
        "then nothing else"
    );
    let first = &slack[0].2;
    assert_eq!(
        first.header("authorization"),
        Some("Bearer xoxb-test-token")
    );
    assert_eq!(first.body["channel"], "#ops");
    assert!(first.body.get("thread_ts").is_none(), "the run's message");
    assert!(
        first.body["text"]
            .as_str()
            .unwrap()
            .contains("Running playbook evidence")
    );
    let ts = answered_ts(&rx, first);
    // Asking for approval edits it (with the buttons' place), at the channel's id.
    let ask = &slack[1].2.body;
    assert_eq!(
        (ask["channel"].as_str(), ask["ts"].as_str()),
        (Some("C0REFLEX"), Some(ts.as_str()))
    );
    assert!(
        ask["text"].as_str().unwrap().contains("Approval needed"),
        "{ask}"
    );
    let reply = &slack[2].2.body;
    assert_eq!(reply["thread_ts"], ts.as_str());
    let evidence = reply["text"].as_str().unwrap();
    assert!(
        evidence.starts_with("errors (prometheus.graph):\n```\nTargets up: min 1, max 1, last 1 over the last 5m\n```\n<https://reflex.example.internal/ui/runs/1/artifacts/errors-graph.png|errors-graph.png>"),
        "{evidence}"
    );
    let slot = &slack[3].2;
    assert_eq!(
        slot.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    let form: Vec<(String, String)> = form_urlencoded::parse(slot.raw.as_bytes())
        .into_owned()
        .collect();
    let upload = rx.at(&format!(
        "/upload/F{}",
        rx.requests()
            .iter()
            .position(|r| r.path == slot.path)
            .unwrap()
            + 1
    ));
    assert_eq!(upload.len(), 1, "the bytes go to the upload URL Slack gave");
    assert!(upload[0].bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
    assert_eq!(
        form,
        [
            ("filename".to_string(), "errors-graph.png".to_string()),
            ("length".into(), upload[0].bytes.len().to_string())
        ]
    );
    let complete = &slack[4].2.body;
    assert_eq!(complete["channel_id"], "C0REFLEX");
    assert_eq!(complete["thread_ts"], ts.as_str());
    assert_eq!(complete["files"][0]["title"], "errors-graph.png");
    let end = &slack[5].2.body;
    assert_eq!(end["ts"], ts.as_str());
    assert!(
        end["text"]
            .as_str()
            .unwrap()
            .contains("Run 1 (evidence) succeeded"),
        "{end}"
    );

    // Mattermost: the same through its API: a post, patched, replies with `root_id`, a file.
    let mm = api_calls(&rx, "/mm/");
    let calls: Vec<(&str, &str)> = mm
        .iter()
        .map(|(m, p, _)| (m.as_str(), p.as_str()))
        .collect();
    let root = answered_ts(&rx, &mm[0].2).replace("1000.", "post");
    let patch = format!("api/v4/posts/{root}/patch");
    assert_eq!(
        calls,
        [
            ("POST", "api/v4/posts"),
            ("PUT", patch.as_str()),
            ("POST", "api/v4/posts"),
            ("POST", "api/v4/files"),
            ("POST", "api/v4/posts"),
            ("PUT", patch.as_str()),
        ]
    );
    assert_eq!(mm[0].2.body["channel_id"], "ch1");
    assert!(mm[0].2.body.get("root_id").is_none());
    assert_eq!(mm[2].2.body["root_id"], root.as_str());
    assert!(mm[2].2.body["message"].as_str().unwrap().contains(
        "[errors-graph.png](https://reflex.example.internal/ui/runs/1/artifacts/errors-graph.png)"
    ));
    assert!(
        mm[3]
            .2
            .header("content-type")
            .unwrap()
            .starts_with("multipart/form-data")
    );
    assert!(
        mm[3].2.raw.contains("name=\"channel_id\"")
            && mm[3].2.raw.contains("filename=\"errors-graph.png\"")
    );
    let file = answered_ts(&rx, &mm[3].2).replace("1000.", "file");
    assert_eq!(mm[4].2.body["root_id"], root.as_str());
    assert_eq!(mm[4].2.body["file_ids"], json!([file]));
    assert!(
        mm[5].2.body["message"]
            .as_str()
            .unwrap()
            .contains("succeeded")
    );
}

const QUICK: &str = r#"
name: quick
matchers: ['alertname="Quick"']
steps:
  - action: log
    with: { message: "noted {{ labels.instance }}" }
"#;

#[tokio::test]
async fn a_burst_of_quick_runs_into_a_webhook_sink_is_one_message_a_run() {
    let rx = Receiver::start().await;
    let cfg = format!(
        "notify:\n  sinks:\n    - {{ name: hook, type: webhook, url: \"{}/hook\" }}\n",
        rx.base
    );
    let app = TestApp::builder()
        .playbook("quick.yaml", QUICK)
        .config(&cfg)
        .start()
        .await;
    let alerts: Vec<serde_json::Value> = (0..13)
        .map(|i| json!({"labels": {"alertname": "Quick", "instance": format!("h{i}")}}))
        .collect();
    let (status, body) = app
        .post_raw("/api/v1/webhooks/generic", json!(alerts).to_string())
        .await;
    assert_eq!(status, 200, "{body}");
    for id in 1..=13 {
        app.wait_run_state(id, "succeeded").await;
    }
    rx_wait(&rx, "/hook", 13).await;
    let events: Vec<String> = (rx.at("/hook").iter())
        .map(|r| r.body["event"].as_str().unwrap().to_string())
        .collect();
    // Each ended within the quiet time: its end is its one message, and no start is pending.
    assert_eq!(events, vec!["run_finished".to_string(); 13]);
}

/// The daemon reads the bot token from its environment, inherited from this test process
/// (`.cargo/config.toml` sets it for `cargo test`).
fn bot_token_is_in_the_environment() {
    assert_eq!(
        std::env::var("REFLEX_TEST_TOKEN").as_deref(),
        Ok("xoxb-test-token"),
        "set by .cargo/config.toml [env]"
    );
}

#[tokio::test]
async fn a_429_is_retried_after_the_time_retry_after_asks_for() {
    let rx = Receiver::start().await;
    rx.answer(429, &[("retry-after", "1")], "slow down");
    let cfg = format!(
        "notify:\n  sinks:\n    - {{ name: slack, type: slack, url: \"{}/slack\", events: [run_started] }}\n",
        rx.base
    );
    let app = TestApp::builder()
        .playbook("gated.yaml", PLAYBOOK)
        .config(&cfg)
        .start()
        .await;
    app.post_raw("/api/v1/webhooks/generic", alert("web-3"))
        .await;
    rx_wait(&rx, "/slack", 2).await;
    let reqs = rx.at("/slack");
    assert_eq!(reqs[0].body, reqs[1].body, "the same message again");
    let gap = reqs[1].at - reqs[0].at;
    assert!(
        gap >= Duration::from_millis(950),
        "retried after {gap:?}, before Retry-After"
    );
    // Delivery is in order per sink: once the next message is in, the first was not sent again.
    app.post_raw("/api/v1/webhooks/generic", alert("web-4"))
        .await;
    rx_wait(&rx, "/slack", 3).await;
    let reqs = rx.at("/slack");
    assert_eq!(reqs.len(), 3, "delivered once, not again");
    assert!(reqs[2].raw.contains("web-4"), "{}", reqs[2].raw);
}

#[tokio::test]
async fn a_receiver_that_is_down_neither_delays_nor_fails_the_run() {
    let dead = format!("http://127.0.0.1:{}", crate::common::free_port());
    let cfg = format!(
        "notify:\n  max_attempts: 2\n  timeout: 1s\n  sinks:\n    - {{ name: down, type: slack, url: \"{dead}/x\" }}\n"
    );
    const QUICK: &str = "name: quick\nmatchers: ['alertname=\"Quick\"']\nsteps:\n  - { action: log, with: { message: hi } }\n";
    let app = TestApp::builder()
        .playbook("quick.yaml", QUICK)
        .config(&cfg)
        .start()
        .await;
    let posted = std::time::Instant::now();
    app.post_raw(
        "/api/v1/webhooks/generic",
        crate::common::generic_alert("Quick", "h", "2026-11-22T10:00:00Z"),
    )
    .await;
    app.wait_run_state(1, "succeeded").await;
    assert!(
        posted.elapsed() < Duration::from_millis(900),
        "run took {:?}",
        posted.elapsed()
    );
    app.wait_for(10, "the failures to be counted", || async {
        let text = reqwest::get(format!("{}/metrics", app.base))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .any(|l| {
                l.starts_with("reflex_notify_failures_total{sink=\"down\"}") && !l.ends_with(" 0")
            })
            .then_some(())
    })
    .await;
    assert!(app.log().contains("notification given up"), "{}", app.log());
}

#[tokio::test]
async fn alert_text_reaches_chat_as_text_never_as_mentions_or_links() {
    let rx = Receiver::start().await;
    let app = TestApp::builder()
        .playbook("gated.yaml", PLAYBOOK)
        .config(&sinks(&rx, ""))
        .start()
        .await;
    let hostile = "<!channel> @here <https://evil.example|Approve now> [login](https://evil.example)\nRun 1 (gated) succeeded";
    let alert = json!({
        "labels": {"alertname": "Risky", "instance": "web-1"},
        "annotations": {"summary": hostile},
        "startsAt": "2026-11-22T10:00:00Z"
    });
    let (status, body) = app
        .post_raw("/api/v1/webhooks/generic", alert.to_string())
        .await;
    assert_eq!(status, 200, "{body}");
    for path in ["/slack", "/mm", "/teams", "/hook"] {
        rx_wait(&rx, path, 2).await;
    }
    for r in rx.at("/slack") {
        let text = r.body["text"].as_str().unwrap();
        assert!(!text.contains('<') && !text.contains('\n'), "{text}");
        assert!(
            text.starts_with("&lt;!channel&gt; @here &lt;https://evil.example|Approve now&gt;"),
            "{text}"
        );
    }
    for r in rx.at("/mm") {
        let text = r.body["text"].as_str().unwrap();
        assert!(!text.contains("@here") && !text.contains('\n'), "{text}");
        assert!(text.contains("\\[login\\](https://evil.example)"), "{text}");
    }
    for r in rx.at("/teams") {
        let text = r.body["attachments"][0]["content"]["body"][1]["text"]
            .as_str()
            .unwrap();
        assert!(
            text.contains("\\[login\\]") && !text.contains('\n'),
            "{text}"
        );
    }
    // The generic webhook carries the data as sent, for its receiver to handle.
    let hook = rx.at("/hook");
    assert_eq!(hook[0].body["run"]["title"], hostile);
}

#[tokio::test]
async fn messages_say_each_thing_once_in_the_playbooks_words_when_it_has_them() {
    let rx = Receiver::start().await;
    let reported = r#"
name: reported
matchers: ['alertname="Reported"']
report: "Cleaned {{ labels.instance }} ({{ run.state }}, {{ run.duration }})."
steps:
  - action: log
    with: { message: "cleaning" }
"#;
    let broken = r#"
name: broken
matchers: ['alertname="Broken"']
steps:
  - name: probe
    action: script
    with: { script: 'throw "disk unreadable"' }
  - action: log
    with: { message: "never" }
"#;
    let app = TestApp::builder()
        .playbook("reported.yaml", reported)
        .playbook("broken.yaml", broken)
        .config(&format!(
            // Every start is told (by default a run this quick would be one message).
            "notify:\n  quiet_for: 0s\n  sinks:\n    - {{ name: hook, type: webhook, url: \"{}/hook\" }}\n",
            rx.base
        ))
        .start()
        .await;
    let post = |name: &str, summary: &str| {
        json!({"labels": {"alertname": name, "instance": "web-1"}, "annotations": {"summary": summary}})
            .to_string()
    };
    let (_, out) = app
        .post_raw("/api/v1/webhooks/generic", post("Reported", "Disk low."))
        .await;
    let reported_id = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
    app.wait_run_state(reported_id, "succeeded").await;
    let (_, out) = app
        .post_raw(
            "/api/v1/webhooks/generic",
            post("Broken", "Disk low on web-1."),
        )
        .await;
    let broken_id = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
    app.wait_run_state(broken_id, "failed").await;
    rx_wait(&rx, "/hook", 4).await;

    let texts = |id: i64| -> Vec<(String, String)> {
        rx.at("/hook")
            .iter()
            .filter(|r| r.body["run"]["id"] == id)
            .map(|r| {
                (
                    r.body["event"].as_str().unwrap().to_string(),
                    r.body["text"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    // The playbook's report is the message, not wrapped in the default one.
    let reported = texts(reported_id);
    let finished = &reported
        .iter()
        .find(|(e, _)| e == "run_finished")
        .unwrap()
        .1;
    assert!(
        finished.starts_with("Cleaned web-1 (succeeded, "),
        "{finished}"
    );
    assert!(
        finished.ends_with("ms).") || finished.ends_with("s)."),
        "{finished}"
    );
    assert!(!finished.contains("Run "), "{finished}");
    assert_eq!(
        reported[0].1,
        format!("Disk low. Running playbook reported on web-1 (run {reported_id}).")
    );

    // A failed run: started, then one end message that names the step and the error once.
    let broken = texts(broken_id);
    let events: Vec<&str> = broken.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(events, ["run_started", "run_finished"], "{broken:#?}");
    let all: String = broken.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(all.matches("disk unreadable").count(), 1, "{all}");
    assert!(!all.contains(".."), "{all}");
    let end = &broken[1].1;
    let duration = end
        .split(" failed in ")
        .nth(1)
        .and_then(|d| d.split('.').next())
        .unwrap();
    assert!(
        duration.ends_with("ms") && duration[..duration.len() - 2].parse::<u64>().is_ok(),
        "{end}"
    );
    // A failed run says how to run it again; a successful one does not.
    assert!(
        end.contains(&format!("To run it again: reflex retry {broken_id}.")),
        "{end}"
    );
    assert!(!finished.contains("retry"), "{finished}");
}

#[tokio::test]
async fn a_runs_end_message_a_crash_left_undelivered_is_sent_after_the_restart() {
    let rx = Receiver::start().await;
    // The first attempt is turned away for a minute: the daemon dies in that minute.
    rx.answer(503, &[("retry-after", "60")], "busy");
    let reported = r#"
name: reported
matchers: ['alertname="Reported"']
report: "Cleaned {{ labels.instance }}: {{ steps.clean.message }}."
steps:
  - name: clean
    action: log
    with: { message: "5 GB reclaimed" }
"#;
    let mut app = TestApp::builder()
        .playbook("reported.yaml", reported)
        .config(&format!(
            "notify:\n  max_attempts: 3\n  sinks:\n    - {{ name: hook, type: webhook, url: \"{}/hook\", events: [run_finished] }}\n",
            rx.base
        ))
        .start()
        .await;
    app.post_raw(
        "/api/v1/webhooks/generic",
        crate::common::generic_alert("Reported", "host-123", "2026-11-22T10:00:00Z"),
    )
    .await;
    app.wait_run_state(1, "succeeded").await;
    rx_wait(&rx, "/hook", 1).await;
    assert_eq!(app.count("outbox"), 1, "kept while undelivered");
    app.kill9();
    app.restart().await;
    rx_wait(&rx, "/hook", 2).await;
    let sent: Vec<serde_json::Value> = rx.at("/hook").into_iter().map(|r| r.body).collect();
    for (i, m) in sent.iter().enumerate() {
        assert_eq!(m["event"], "run_finished", "{i}: {m}");
        assert_eq!(m["run"]["id"], 1, "{i}: {m}");
        assert_eq!(m["state"], "succeeded", "{i}: {m}");
    }
    assert_eq!(
        sent[0]["text"], sent[1]["text"],
        "the same message, rebuilt from the record"
    );
    assert!(
        (sent[1]["text"].as_str().unwrap()).starts_with("Cleaned host-123: 5 GB reclaimed."),
        "{}",
        sent[1]
    );
    app.wait_for(10, "the delivered message to be forgotten", || async {
        (app.count("outbox") == 0).then_some(())
    })
    .await;
    assert_eq!(rx.at("/hook").len(), 2, "sent again once, not more");
    let metrics = app.get_text("/metrics").await;
    assert!(
        metrics.contains("\nreflex_notify_resent_total 1\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_request_for_approval_a_crash_left_undelivered_is_asked_after_the_restart() {
    let rx = Receiver::start().await;
    rx.answer(503, &[("retry-after", "60")], "busy");
    let mut app = TestApp::builder()
        .playbook("gated.yaml", PLAYBOOK)
        .config(&format!(
            "notify:\n  max_attempts: 3\n  sinks:\n    - {{ name: hook, type: webhook, url: \"{}/hook\", events: [approval_needed] }}\n",
            rx.base
        ))
        .start()
        .await;
    app.post_raw("/api/v1/webhooks/generic", alert("web-9"))
        .await;
    app.wait_run_state(1, "awaiting_approval").await;
    rx_wait(&rx, "/hook", 1).await;
    assert_eq!(app.count("outbox"), 1, "kept while undelivered");
    app.kill9();
    app.restart().await;
    rx_wait(&rx, "/hook", 2).await;
    let asked: Vec<serde_json::Value> = rx.at("/hook").into_iter().map(|r| r.body).collect();
    for m in &asked {
        assert_eq!(m["event"], "approval_needed", "{m}");
        assert_eq!(m["run"]["id"], 1, "{m}");
    }
    for field in [
        "approval_id",
        "action",
        "action_hash",
        "required",
        "expires_at",
        "text",
    ] {
        assert_eq!(
            asked[0][field], asked[1][field],
            "{field}: the same request, rebuilt from the record"
        );
    }
    app.wait_for(10, "the delivered request to be forgotten", || async {
        (app.count("outbox") == 0).then_some(())
    })
    .await;
    // Answered from that message, the run goes on.
    approve_first(&app).await;
    app.wait_run_state(1, "succeeded").await;
    assert_eq!(rx.at("/hook").len(), 2, "asked again once, not more");
}

#[tokio::test]
async fn a_run_a_crash_cut_off_is_told_interrupted_once_after_the_restart() {
    let rx = Receiver::start().await;
    let slow = "name: slow\nmatchers: ['alertname=\"Slow\"']\nsteps:\n  - { name: soak, action: wait, with: { duration: 60s } }\n";
    let quick = "name: quick\nmatchers: ['alertname=\"Quick\"']\nsteps:\n  - { action: log, with: { message: hi } }\n";
    let mut app = TestApp::builder()
        .playbook("slow.yaml", slow)
        .playbook("quick.yaml", quick)
        .config(&format!(
            "notify:\n  sinks:\n    - {{ name: hook, type: webhook, url: \"{}/hook\", events: [run_finished] }}\n",
            rx.base
        ))
        .start()
        .await;
    let at = "2026-11-22T10:00:00Z";
    app.post_raw(
        "/api/v1/webhooks/generic",
        crate::common::generic_alert("Slow", "h1", at),
    )
    .await;
    app.wait_run_state(1, "running").await;
    app.kill9();
    app.restart().await;
    app.wait_run_state(1, "interrupted").await;
    // Delivered in order: once the next run's end is in, a second word on run 1 would be too.
    app.post_raw(
        "/api/v1/webhooks/generic",
        crate::common::generic_alert("Quick", "h2", at),
    )
    .await;
    app.wait_run_state(2, "succeeded").await;
    rx_wait(&rx, "/hook", 2).await;
    let told: Vec<(i64, String)> = (rx.at("/hook").into_iter())
        .map(|r| {
            (
                r.body["run"]["id"].as_i64().unwrap(),
                r.body["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        told,
        [(1, "interrupted".to_string()), (2, "succeeded".to_string())]
    );
    app.wait_for(10, "the delivered messages to be forgotten", || async {
        (app.count("outbox") == 0).then_some(())
    })
    .await;
}
