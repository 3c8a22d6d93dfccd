//! Configured secrets stay secret through the real binary: an upstream that echoes the
//! credential back leaves no trace of it in the run record, the API, the log or chat, and a
//! redirect to another origin is not followed with the credential.

use crate::common::TestApp;
use crate::common::receiver::Receiver;
use serde_json::json;

const PLAYBOOK: &str = r#"
name: call
matchers: ['alertname="Call"']
steps:
  - name: echo
    action: http
    with: { url: "UPSTREAM/echo", credential: svc }
    on_failure: continue
  - name: redirected
    action: http
    with: { url: "UPSTREAM/moved", credential: svc }
"#;

#[tokio::test]
async fn an_echoed_credential_is_redacted_everywhere_and_never_follows_a_redirect() {
    let secret = std::env::var("REFLEX_TEST_TOKEN").expect("set in .cargo/config.toml");
    let upstream = Receiver::start().await;
    let elsewhere = Receiver::start().await;
    let chat = Receiver::start().await;
    upstream.answer(
        500,
        &[],
        &format!(
            "bad request; you sent X-Api-Key: {secret} (url-encoded: {})",
            secret.replace('-', "%2D")
        ),
    );
    upstream.answer(
        302,
        &[("location", &format!("{}/landing", elsewhere.base))],
        "",
    );
    let app = TestApp::builder()
        .playbook("call.yaml", &PLAYBOOK.replace("UPSTREAM", &upstream.base))
        .config(&format!(
            "credentials:\n  svc: {{ header: X-Api-Key, env: REFLEX_TEST_TOKEN }}\n\
             notify:\n  sinks:\n    - {{ name: chat, type: webhook, url: \"{}/chat\" }}\n",
            chat.base
        ))
        .start()
        .await;
    let (_, out) = app
        .post_raw(
            "/api/v1/webhooks/generic",
            json!({"labels": {"alertname": "Call"}}).to_string(),
        )
        .await;
    let id = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
    let run = app.wait_run_state(id, "failed").await;

    // The credential was sent upstream, as configured.
    assert_eq!(
        upstream.at("/echo")[0].header("x-api-key"),
        Some(secret.as_str())
    );
    let echo_error = run["steps"][0]["error"].as_str().unwrap();
    assert!(echo_error.contains("[redacted]"), "{echo_error}");
    // A redirect to another origin is answered as it is, not followed with the credential.
    assert!(elsewhere.requests().is_empty(), "the redirect was followed");
    assert!(
        run["steps"][1]["error"].as_str().unwrap().contains("302"),
        "{run:#}"
    );

    app.wait_for(10, "the run's chat messages", || async {
        (chat.at("/chat").len() >= 3).then_some(())
    })
    .await;
    let everywhere = [
        run.to_string(),
        app.get("/api/v1/runs").await.1.to_string(),
        app.log(),
        chat.requests()
            .iter()
            .map(|r| r.raw.clone())
            .collect::<String>(),
    ];
    for (place, text) in ["run", "runs list", "log", "chat"].iter().zip(everywhere) {
        assert!(!text.contains(&secret), "the secret is in the {place}");
        assert!(
            !text.contains("xoxb%2Dtest%2Dtoken"),
            "the encoded secret is in the {place}"
        );
    }
}
