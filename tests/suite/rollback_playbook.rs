//! The example `playbooks/rollback.yaml` end to end through the real binary: an error-rate
//! alert after a deploy asks for approval, and once approved rolls the Deployment back in the
//! fake Kubernetes API server, recording the revisions in the run.

use crate::common::TestApp;
use crate::common::fake_kube::FakeKube;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

async fn admin(fake: &FakeKube, dir: &std::path::Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(fake.admin_kubeconfig(dir)).unwrap();
    kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap()
}

fn image(d: &Deployment) -> String {
    d.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .image
        .clone()
        .unwrap()
}

#[tokio::test]
async fn an_approved_rollback_restores_the_previous_pod_template() {
    let rbac =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/base/rbac.yaml");
    let fake = FakeKube::start(Some(&rbac)).await;
    let dir = tempfile::tempdir().unwrap();
    let api: Api<Deployment> = Api::namespaced(admin(&fake, dir.path()).await, "shop");
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "api", "labels": {"app": "api"}},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "api"}},
                 "template": {"metadata": {"labels": {"app": "api"}}, "spec": {"containers": [{"name": "app", "image": "api:1.4.2"}]}}}
    }))
    .unwrap();
    api.create(&PostParams::default(), &d).await.unwrap();
    let deploy = json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "api:1.5.0"}]}}}});
    api.patch("api", &PatchParams::default(), &Patch::Merge(&deploy))
        .await
        .unwrap();

    let config = format!(
        "kubernetes:\n  clusters:\n    prod: {{ kubeconfig: {} }}\n",
        fake.kubeconfig(dir.path()).display()
    );
    let app = TestApp::builder()
        .example_playbooks()
        .config(&config)
        .start()
        .await;
    let alert = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/alerts/error-rate-after-deploy.json"),
    )
    .unwrap();
    let (status, body) = app.post_alertmanager(&alert).await;
    assert_eq!(status, 200, "{body}");
    let run_id = body["outcomes"][0][0]["run_id"].as_i64().unwrap();

    let approval = app
        .wait_for(10, "the approval request", || async {
            let (_, list) = app.get("/api/v1/approvals?state=pending").await;
            list[0]["id"].as_i64()
        })
        .await;
    assert_eq!(
        image(&api.get("api").await.unwrap()),
        "api:1.5.0",
        "nothing happens before approval"
    );
    let (status, body) = app
        .call(
            "POST",
            &format!("/api/v1/approvals/{approval}/approve"),
            None,
            Some(json!({"comment": "error rate confirmed"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    let run = app.wait_run_state(run_id, "succeeded").await;
    let out = &crate::common::step(&run, "rollback")["output"];
    assert_eq!(
        (out["from_revision"].as_i64(), out["to_revision"].as_i64()),
        (Some(2), Some(1)),
        "{run:#}"
    );
    assert_eq!(out["rollout"], "complete");
    let after = api.get("api").await.unwrap();
    assert_eq!(
        image(&after),
        "api:1.4.2",
        "the previous pod template is back"
    );
    assert_eq!(
        after.metadata.annotations.unwrap()["deployment.kubernetes.io/revision"],
        "3"
    );
}
