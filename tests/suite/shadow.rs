//! Shadow mode: a playbook planned, gated and recorded exactly as it would act, against a
//! real sshd and the fake Kubernetes API server, changes nothing and says what it would have
//! done.

use crate::common::TestApp;
use crate::common::fake_kube::{FakeKube, admin_write};
use crate::common::receiver::Receiver;
use crate::common::sshd::Sshd;
use serde_json::json;

#[tokio::test]
async fn a_shadow_playbook_records_every_step_it_would_take_and_changes_nothing() {
    let sshd = Sshd::start();
    let chat = Receiver::start().await;
    let fake = FakeKube::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    admin_write(
        &fake,
        dir.path(),
        "create",
        "shop",
        json!({
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "app", "image": "web:1"}]}}}
        }),
    )
    .await;
    let marker = sshd.path("acted");
    let playbook = format!(
        r#"name: rehearse
mode: shadow
matchers: ['alertname="Busy"']
approval: {{ count: 1, expires: 5m }}
steps:
  - name: look
    action: kube.describe
    with: {{ cluster: prod, kind: Deployment, namespace: shop, name: web }}
  - name: scale
    action: kube.scale
    with: {{ cluster: prod, kind: Deployment, namespace: shop, name: web, replicas: 5 }}
  - name: mark
    action: ssh.run
    with: {{ host: db-1, command: "touch {marker}" }}
"#,
        marker = marker.display()
    );
    let app = TestApp::builder()
        .playbook("rehearse.yaml", &playbook)
        .config(&sshd.config_yaml("db-1", &[]))
        .config(&format!(
            "kubernetes:\n  clusters:\n    prod: {{ kubeconfig: {} }}\nnotify:\n  quiet_for: 0s\n  sinks:\n    - {{ name: chat, type: slack, url: \"{}/chat\" }}\n",
            fake.kubeconfig(dir.path()).display(),
            chat.base
        ))
        .start()
        .await;
    let id = app
        .start_run_for(&json!({"labels": {"alertname": "Busy", "instance": "web"}}))
        .await;
    // No approval is waited for: the gate is recorded as one it would have waited at.
    let run = app.wait_run_state(id, "shadow").await;
    assert_eq!(run["shadow"], true);
    let steps = run["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3, "{run:#}");
    assert!(steps.iter().all(|s| s["state"] == "shadow"), "{run:#}");
    // Evidence is gathered for real: it reads.
    assert_eq!(steps[0]["output"]["replicas"]["desired"], 2, "{run:#}");
    // What would have been done, rendered, with the gate in front of the first acting step.
    let scale = &steps[1]["output"];
    assert_eq!(scale["would_run"]["action"], "kube.scale");
    assert_eq!(scale["would_run"]["args"]["replicas"], 5);
    assert_eq!(scale["would_wait_for"]["approvals"], 1);
    let mark = &steps[2]["output"]["would_run"];
    assert_eq!(mark["action"], "ssh.run");
    assert_eq!(
        mark["args"]["command"],
        format!("touch {}", marker.display())
    );
    // Nothing changed: the replicas, the marker file, no approval asked.
    let web = fake.object("apps", "deployments", "shop", "web").unwrap();
    assert_eq!(web["spec"]["replicas"], 2);
    assert!(!marker.exists(), "the ssh step ran");
    let (_, approvals) = app.get("/api/v1/approvals").await;
    assert_eq!(approvals.as_array().map(Vec::len), Some(0), "{approvals}");
    // Chat says it was a shadow run and what it would have done.
    let said = app
        .wait_for(10, "the end in chat", || async {
            chat.at("/chat")
                .into_iter()
                .map(|r| r.body["text"].as_str().unwrap_or("").to_string())
                .find(|t| t.contains("finished in shadow mode"))
        })
        .await;
    assert!(said.starts_with("Shadow run: "), "{said}");
    assert!(
        said.contains("Nothing was done. Would have run: kube.scale"),
        "{said}"
    );
    assert!(said.contains("(would wait for 1 approval first)"), "{said}");
    let metrics = app.get_text("/metrics").await;
    assert!(
        metrics.contains(r#"reflex_runs_total{outcome="shadow",playbook="rehearse"} 1"#),
        "{metrics}"
    );
}
