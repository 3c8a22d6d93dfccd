//! Blast-radius budgets through the daemon: a step over its budget is not executed and chat
//! says which budget; with `on_exceed: wait` the step waits for room and then acts.

use crate::common::TestApp;
use crate::common::receiver::Receiver;
use crate::kube::{Cluster, cluster};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::json;

const EVICT: &str = r#"name: evict
matchers: ['alertname="PodStuck"']
steps:
  - name: delete
    action: kube.delete_pod
    with: { cluster: test, namespace: "{{ labels.namespace }}", name: "{{ labels.pod }}" }
"#;

async fn pods(c: &Cluster, names: &[&str]) -> Api<Pod> {
    let api = Api::<Pod>::namespaced(c.client().await, &c.ns);
    for name in names {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.9"}]}})).unwrap();
        api.create(&PostParams::default(), &pod).await.unwrap();
    }
    api
}

async fn app_with(c: &Cluster, budgets: &str, chat: &Receiver) -> TestApp {
    TestApp::builder()
        .playbook("evict.yaml", EVICT)
        .config(&format!(
            "kubernetes:\n  clusters:\n    test: {{ kubeconfig: {} }}\nbudgets:\n{budgets}notify:\n  quiet_for: 0s\n  sinks:\n    - {{ name: chat, type: slack, url: \"{}/chat\" }}\n",
            c.kubeconfig.display(),
            chat.base
        ))
        .start()
        .await
}

async fn evict(app: &TestApp, c: &Cluster, pod: &str) -> i64 {
    app.start_run_for(&json!({"labels": {"alertname": "PodStuck", "namespace": c.ns, "pod": pod}}))
        .await
}

#[tokio::test]
async fn a_step_over_its_budget_is_not_executed_and_chat_names_the_budget() {
    let c = cluster().await;
    let api = pods(&c, &["p1", "p2", "p3"]).await;
    let chat = Receiver::start().await;
    let app = app_with(
        &c,
        "  - { action: kube.delete_pod, max: 2, per: 1h }\n  - { action: \"*\", max: 200, per: 1h }\n",
        &chat,
    )
    .await;
    for pod in ["p1", "p2"] {
        let id = evict(&app, &c, pod).await;
        app.wait_run_state(id, "succeeded").await;
    }
    let id = evict(&app, &c, "p3").await;
    let run = app.wait_run_state(id, "failed").await;
    let error = run["steps"][0]["error"].as_str().unwrap();
    assert!(
        error.starts_with("over budget: the budget for kube.delete_pod allows 2 in 1h, and 2 were used; room again at "),
        "{run:#}"
    );
    assert!(
        api.get_opt("p3").await.unwrap().is_some(),
        "p3 was not deleted"
    );
    assert!(api.get_opt("p1").await.unwrap().is_none());
    let said = app
        .wait_for(10, "the failure in chat", || async {
            (chat.at("/chat").into_iter())
                .map(|r| r.body["text"].as_str().unwrap_or("").to_string())
                .find(|t| t.contains(&format!("Run {id} ")) && t.contains("failed"))
        })
        .await;
    assert!(
        said.contains("over budget: the budget for kube.delete_pod allows 2 in 1h"),
        "{said}"
    );
}

#[tokio::test]
async fn with_on_exceed_wait_a_step_waits_for_room_then_acts() {
    let c = cluster().await;
    let api = pods(&c, &["w1", "w2"]).await;
    let chat = Receiver::start().await;
    let app = app_with(
        &c,
        "  - { action: kube.delete_pod, max: 1, per: 2s, on_exceed: wait }\n",
        &chat,
    )
    .await;
    let first = evict(&app, &c, "w1").await;
    app.wait_run_state(first, "succeeded").await;
    let second = evict(&app, &c, "w2").await;
    // Waiting for room, the step is under way and the pod is still there.
    app.wait_for(10, "the log line of the wait", || async {
        app.log()
            .contains("step waits for room in its budget")
            .then_some(())
    })
    .await;
    let run = app.run(second).await;
    assert_eq!(run["state"], "running", "{run:#}");
    assert!(api.get_opt("w2").await.unwrap().is_some());
    // Room again two seconds after the first: it acts.
    let run = app.wait_run_state(second, "succeeded").await;
    assert!(api.get_opt("w2").await.unwrap().is_none(), "{run:#}");
}
