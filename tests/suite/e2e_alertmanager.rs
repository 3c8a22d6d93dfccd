//! End to end: a real Alertmanager delivers webhooks to a real `reflex serve`, which runs the
//! four example playbooks against a real sshd, the fake Kubernetes API server and a local
//! flag service, and reports to a local chat receiver.

use crate::common::alertmanager::Alertmanager;
use crate::common::fake_kube::FakeKube;
use crate::common::receiver::Receiver;
use crate::common::sshd::Sshd;
use crate::common::{TestApp, TestFs, auth_config};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

struct Env {
    app: TestApp,
    am: Alertmanager,
    chat: Receiver,
    fake: FakeKube,
    sshd: Sshd,
    fs: TestFs,
    _dir: tempfile::TempDir,
}

async fn env(repeat: &str, am_token: &str) -> Env {
    let sshd = Sshd::start();
    let fs = TestFs::new();
    let chat = Receiver::start().await;
    let rbac =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/base/rbac.yaml");
    let fake = FakeKube::start(Some(&rbac)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{auth}{ssh}  cleanup_commands: [\"rm -f {path}/junk/*.log\"]\n\
         kubernetes:\n  clusters:\n    prod: {{ kubeconfig: {kc} }}\n\
         feature_flags:\n  flags: {{ type: unleash, url: \"{chat}/unleash\", token_env: REFLEX_TEST_TOKEN, environment: production }}\n\
         notify:\n  sinks:\n    - {{ name: chat, type: webhook, url: \"{chat}/chat\" }}\n",
        auth = auth_config(&[
            ("alertmanager", "webhook"),
            ("oncall", "approver"),
            ("viewer", "viewer")
        ]),
        ssh = sshd.config_yaml("db-1", &["db-1.example.internal"]),
        path = fs.dir.path().display(),
        kc = fake.kubeconfig(dir.path()).display(),
        chat = chat.base,
    );
    let app = TestApp::builder()
        .example_playbooks()
        .config(&config)
        .start()
        .await;
    let am = Alertmanager::start(
        &format!("{}/api/v1/webhooks/alertmanager", app.base),
        am_token,
        repeat,
    )
    .await;
    Env {
        app,
        am,
        chat,
        fake,
        sshd,
        fs,
        _dir: dir,
    }
}

impl Env {
    async fn deployments(&self) -> Api<Deployment> {
        let dir = tempfile::tempdir().unwrap();
        let kc =
            kube::config::Kubeconfig::read_from(self.fake.admin_kubeconfig(dir.path())).unwrap();
        let client = kube::Client::try_from(
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .unwrap(),
        )
        .unwrap();
        Api::namespaced(client, "shop")
    }

    async fn deployment(&self, name: &str, image: &str, replicas: i32) {
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "app", "image": image}]}}}
        }))
        .unwrap();
        self.deployments()
            .await
            .create(&PostParams::default(), &d)
            .await
            .unwrap();
    }

    async fn deploy(&self, name: &str, image: &str) {
        let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": image}]}}}});
        self.deployments()
            .await
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    async fn image(&self, name: &str) -> String {
        let d = self.deployments().await.get(name).await.unwrap();
        d.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .clone()
            .unwrap()
    }

    /// The run of a playbook, once Alertmanager has delivered its alert.
    async fn run_of(&self, playbook: &str) -> i64 {
        self.app
            .wait_for(30, &format!("a run of {playbook}"), || async {
                let (_, page) = self
                    .app
                    .call(
                        "GET",
                        &format!("/api/v1/runs?playbook={playbook}"),
                        Some("viewer-token"),
                        None,
                    )
                    .await;
                page["runs"][0]["id"].as_i64()
            })
            .await
    }

    async fn state(&self, id: i64, state: &str) -> Value {
        self.app
            .wait_for(30, &format!("run {id} to be {state}"), || async {
                let (_, run) = self
                    .app
                    .call(
                        "GET",
                        &format!("/api/v1/runs/{id}"),
                        Some("viewer-token"),
                        None,
                    )
                    .await;
                (run["state"] == state).then_some(run)
            })
            .await
    }

    async fn chat_event(&self, event: &str, run_id: i64) -> Value {
        self.app
            .wait_for(
                30,
                &format!("a {event} message for run {run_id}"),
                || async {
                    self.chat
                        .at("/chat")
                        .into_iter()
                        .map(|r| r.body)
                        .find(|b| b["event"] == event && b["run"]["id"] == run_id)
                },
            )
            .await
    }

    async fn pending_approval(&self, run_id: i64) -> i64 {
        self.app
            .wait_for(30, "an approval request", || async {
                let (_, list) = self
                    .app
                    .call(
                        "GET",
                        "/api/v1/approvals?state=pending",
                        Some("viewer-token"),
                        None,
                    )
                    .await;
                list.as_array()?.iter().find(|a| a["run_id"] == run_id)?["id"].as_i64()
            })
            .await
    }
}

#[tokio::test]
async fn disk_space_low_is_cleaned_over_ssh_and_reported_with_the_space_reclaimed() {
    let e = env("1h", "alertmanager-token").await;
    let written = e.fs.fill(12, 1 << 20);
    let labels = json!({"alertname": "DiskSpaceLow", "instance": "db-1.example.internal:9100", "mountpoint": e.fs.dir.path().display().to_string(), "fstype": "ext4", "severity": "warning"});
    e.am.alert(labels, json!({"summary": "Disk space low on db-1"}), false)
        .await;
    let id = e.run_of("disk-cleanup").await;
    let run = e.state(id, "succeeded").await;
    let reclaimed = run["steps"][1]["output"]["reclaimed_bytes"]
        .as_u64()
        .unwrap();
    if e.fs.mounted {
        assert_eq!(reclaimed, written);
    } else {
        eprintln!("skipped (no tmpfs, not root?): the exact bytes reclaimed");
    }
    let msg = e.chat_event("run_finished", id).await;
    let text = msg["text"].as_str().unwrap();
    let human = run["steps"][1]["output"]["reclaimed"].as_str().unwrap();
    assert!(
        text.starts_with(&format!(
            "Disk space low on db-1. Cleanup ran. Space reclaimed: {human}"
        )),
        "{text}"
    );
    assert!(text.contains("succeeded"), "{text}");
    assert_eq!(e.sshd.accepted_connections(), 1);
}

#[tokio::test]
async fn high_latency_scales_up_within_the_cap() {
    let e = env("1h", "alertmanager-token").await;
    e.deployment("checkout", "checkout:1", 4).await;
    e.am.alert(json!({"alertname": "HighLatency", "namespace": "shop", "deployment": "checkout", "severity": "warning"}), json!({}), false).await;
    let id = e.run_of("scale-up").await;
    let run = e.state(id, "succeeded").await;
    let out = &crate::common::step(&run, "scale")["output"];
    assert_eq!(
        (
            out["before"]["replicas"].as_i64(),
            out["after"]["replicas"].as_i64()
        ),
        (Some(4), Some(6))
    );
    assert_eq!(
        e.deployments()
            .await
            .get("checkout")
            .await
            .unwrap()
            .spec
            .unwrap()
            .replicas,
        Some(6)
    );
}

#[tokio::test]
async fn error_rate_after_a_deploy_rolls_back_when_approved_and_not_when_denied() {
    let e = env("1h", "alertmanager-token").await;
    for name in ["api", "web"] {
        e.deployment(name, &format!("{name}:1"), 2).await;
        e.deploy(name, &format!("{name}:2")).await;
    }
    for name in ["api", "web"] {
        let labels = json!({"alertname": "HighErrorRate", "namespace": "shop", "deployment": name, "recently_deployed": "true", "severity": "critical"});
        e.am.alert(
            labels,
            json!({"summary": format!("5xx ratio of shop/{name} at 12%")}),
            false,
        )
        .await;
    }
    let runs = e
        .app
        .wait_for(30, "two rollback runs", || async {
            let (_, page) = e
                .app
                .call(
                    "GET",
                    "/api/v1/runs?playbook=rollback",
                    Some("viewer-token"),
                    None,
                )
                .await;
            let runs: Vec<(String, i64)> = page["runs"]
                .as_array()?
                .iter()
                .map(|r| {
                    (
                        r["alert"]["labels"]["deployment"]
                            .as_str()
                            .unwrap()
                            .to_string(),
                        r["id"].as_i64().unwrap(),
                    )
                })
                .collect();
            (runs.len() == 2).then_some(runs)
        })
        .await;
    let id = |name: &str| runs.iter().find(|(n, _)| n == name).unwrap().1;
    let (api, web) = (id("api"), id("web"));

    // The approval request reaches chat with what will be done and how to answer.
    let asked = e.chat_event("approval_needed", api).await;
    let approval = asked["approval_id"].as_i64().unwrap();
    assert_eq!(approval, e.pending_approval(api).await);
    assert!(
        asked["text"]
            .as_str()
            .unwrap()
            .contains(&format!("reflex approve {approval}"))
    );
    // The gate stands before the first step that acts: the evidence ran before it.
    assert_eq!(asked["action"]["steps"][0]["action"], "kube.rollback");

    let (status, body) = e
        .app
        .call(
            "POST",
            &format!("/api/v1/approvals/{approval}/approve"),
            Some("oncall-token"),
            Some(json!({"comment": "confirmed"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let run = e.state(api, "succeeded").await;
    assert_eq!(
        crate::common::step(&run, "rollback")["output"]["to_revision"],
        1
    );
    assert_eq!(e.image("api").await, "api:1");

    let denied = e.pending_approval(web).await;
    let (status, _) = e
        .app
        .call(
            "POST",
            &format!("/api/v1/approvals/{denied}/deny"),
            Some("oncall-token"),
            Some(json!({"comment": "not the deploy"})),
        )
        .await;
    assert_eq!(status, 200);
    e.state(web, "denied").await;
    assert_eq!(e.image("web").await, "web:2", "denied: nothing changed");
    let ended = e.chat_event("run_finished", web).await;
    assert_eq!(ended["state"], "denied", "a denied run is reported too");
}

#[tokio::test]
async fn a_failing_feature_has_its_flag_turned_off() {
    let e = env("1h", "alertmanager-token").await;
    e.am.alert(
        json!({"alertname": "FeatureFailing", "flag": "checkout-v2", "severity": "critical"}),
        json!({"summary": "checkout-v2 failing"}),
        false,
    )
    .await;
    let id = e.run_of("feature-flag-disable").await;
    e.state(id, "succeeded").await;
    let calls = e
        .chat
        .at("/unleash/api/admin/projects/default/features/checkout-v2/environments/production/off");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].method, "POST");
    assert_eq!(calls[0].header("authorization"), Some("xoxb-test-token"));
}

#[tokio::test]
async fn redelivery_never_starts_a_second_run_and_resolution_ends_a_waiting_one() {
    let e = env("2s", "alertmanager-token").await;
    e.deployment("api", "api:1", 2).await;
    e.deploy("api", "api:2").await;
    let labels = json!({"alertname": "HighErrorRate", "namespace": "shop", "deployment": "api", "recently_deployed": "true"});
    e.am.alert(labels.clone(), json!({}), false).await;
    let id = e.run_of("rollback").await;
    e.pending_approval(id).await;
    // Alertmanager re-sends the group every 2 s: wait for re-deliveries.
    e.app
        .wait_for(30, "three deliveries", || async {
            (e.app.count("alerts") >= 3).then_some(())
        })
        .await;
    assert_eq!(
        e.app.count("runs"),
        1,
        "re-deliveries never start a second run"
    );

    e.am.alert(labels, json!({}), true).await;
    let run = e.state(id, "resolved").await;
    assert_eq!(crate::common::step(&run, "rollback")["state"], "skipped");
    assert_eq!(e.image("api").await, "api:2", "nothing was done");
}

#[tokio::test]
async fn alertmanager_with_a_wrong_token_is_refused() {
    let e = env("1h", "not-the-token").await;
    e.am.alert(
        json!({"alertname": "FeatureFailing", "flag": "checkout-v2"}),
        json!({}),
        false,
    )
    .await;
    e.app
        .wait_for(30, "the refused delivery to be audited", || async {
            let refused: i64 = e
                .app
                .db()
                .query_row("SELECT count(*) FROM audit WHERE outcome = 'refused' AND action LIKE 'POST /api/v1/webhooks/alertmanager%'", [], |r| r.get(0))
                .ok()?;
            (refused >= 1).then_some(())
        })
        .await;
    assert_eq!(e.app.count("alerts"), 0);
    assert_eq!(e.app.count("runs"), 0);
    assert!(e.chat.at("/unleash/api/admin/projects/default/features/checkout-v2/environments/production/off").is_empty());
}
