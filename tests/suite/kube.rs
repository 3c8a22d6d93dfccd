//! The kube executor against the fake API server (`tests/common/fake_kube.rs`), through a real
//! kubeconfig and kube-rs. The same tests run against a real cluster (kind, k3d, …):
//!
//! ```sh
//! REFLEX_TEST_KUBECONFIG=~/.kube/config REFLEX_TEST_NAMESPACE=reflex-test cargo test --test suite kube::
//! ```
//!
//! The namespace must exist; tests that need the fake's internals (RBAC enforcement, injected
//! conflicts, request counts) say so and skip there.

use crate::common::fake_kube::{FakeKube, allowed, rbac_rules};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use reflex::executors::{ExecError, Executors, StepContext};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub(crate) struct Cluster {
    pub(crate) fake: Option<FakeKube>,
    _dir: tempfile::TempDir,
    /// What the executor uses (on the fake: Reflex's service account, held to RBAC).
    pub(crate) kubeconfig: PathBuf,
    /// What test setup uses (on the fake: the cluster admin).
    admin: PathBuf,
    pub(crate) ns: String,
}

fn rbac_manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/base/rbac.yaml")
}

async fn cluster_with(rbac: Option<&Path>) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    if let Ok(path) = std::env::var("REFLEX_TEST_KUBECONFIG") {
        let ns = std::env::var("REFLEX_TEST_NAMESPACE").unwrap_or_else(|_| "default".into());
        return Cluster {
            fake: None,
            _dir: dir,
            kubeconfig: path.clone().into(),
            admin: path.into(),
            ns,
        };
    }
    let fake = FakeKube::start(rbac).await;
    let kubeconfig = fake.kubeconfig(dir.path());
    let admin = fake.admin_kubeconfig(dir.path());
    Cluster {
        fake: Some(fake),
        _dir: dir,
        kubeconfig,
        admin,
        ns: "shop".into(),
    }
}

pub(crate) async fn cluster() -> Cluster {
    cluster_with(Some(&rbac_manifest())).await
}

impl Cluster {
    fn config(&self) -> reflex::config::Config {
        let yaml = format!(
            "kubernetes:\n  clusters:\n    test: {{ kubeconfig: {} }}\nfeature_flags:\n  flagd: {{ type: flagd_configmap, namespace: {}, configmap: flags, key: flags.json }}\n",
            self.kubeconfig.display(),
            self.ns
        );
        reflex::config::Config::parse(&yaml).unwrap()
    }

    pub(crate) fn executors(&self) -> Executors {
        Executors::from_config(
            &self.config(),
            Arc::new(reflex::playbook::script::Sandbox::new()),
        )
    }

    /// A client for test setup (all setup goes through the API, so it works on a real cluster).
    pub(crate) async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(&self.admin).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(cfg).unwrap()
    }

    pub(crate) async fn deployment(&self, name: &str, image: &str, replicas: i32) {
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "app", "image": image}]}}
            }
        }))
        .unwrap();
        Api::<Deployment>::namespaced(self.client().await, &self.ns)
            .create(&PostParams::default(), &d)
            .await
            .unwrap();
        self.wait_revision(name, 1).await;
    }

    /// A deploy: a new image, so a new ReplicaSet revision.
    pub(crate) async fn set_image(&self, name: &str, image: &str, revision: i64) {
        let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": image}]}}}});
        Api::<Deployment>::namespaced(self.client().await, &self.ns)
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        self.wait_revision(name, revision).await;
    }

    pub(crate) async fn get_deployment(&self, name: &str) -> Deployment {
        Api::<Deployment>::namespaced(self.client().await, &self.ns)
            .get(name)
            .await
            .unwrap()
    }

    async fn wait_revision(&self, name: &str, revision: i64) {
        for _ in 0..100 {
            let d = self.get_deployment(name).await;
            let rev = d
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("deployment.kubernetes.io/revision"))
                .and_then(|r| r.parse().ok());
            if rev == Some(revision) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("deployment {name} never reached revision {revision}");
    }
}

pub(crate) fn image(d: &Deployment) -> String {
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

fn ctx(args: Value) -> StepContext {
    crate::common::step_context(args, Duration::from_secs(20))
}

pub(crate) async fn run(ex: &Executors, action: &str, args: Value) -> Result<Value, ExecError> {
    let action = reflex::playbook::actions::Action::parse(action).expect("a known action");
    ex.get(action)
        .unwrap_or_else(|| panic!("no executor {action}"))
        .execute(&ctx(args))
        .await
}

#[tokio::test]
async fn scale_is_absolute_relative_or_a_factor_within_bounds() {
    let c = cluster().await;
    c.deployment("api", "api:1", 2).await;
    let ex = c.executors();
    let scale = |replicas: Value, max: Option<i32>| {
        let mut a =
            json!({"kind": "Deployment", "namespace": c.ns, "name": "api", "replicas": replicas});
        if let Some(m) = max {
            a["max"] = json!(m);
        }
        a
    };
    let out = run(&ex, "kube.scale", scale(json!("+2"), Some(10)))
        .await
        .unwrap();
    assert_eq!(
        (
            out["before"]["replicas"].as_i64(),
            out["after"]["replicas"].as_i64()
        ),
        (Some(2), Some(4))
    );
    let out = run(&ex, "kube.scale", scale(json!("x2"), Some(6)))
        .await
        .unwrap();
    assert_eq!(
        out["after"]["replicas"], 6,
        "factor 2 of 4 is 8, capped at max 6"
    );
    let out = run(&ex, "kube.scale", scale(json!(6), None)).await.unwrap();
    assert_eq!(out["changed"], false, "already there: no write");
    let out = run(&ex, "kube.scale", scale(json!(3), None)).await.unwrap();
    assert_eq!(out["after"]["replicas"], 3);
    assert_eq!(
        c.get_deployment("api").await.spec.unwrap().replicas,
        Some(3)
    );
    let err = run(&ex, "kube.scale", scale(json!("+1"), None))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("max"), "{err}");
    let err = run(
        &ex,
        "kube.scale",
        json!({"kind": "Deployment", "namespace": c.ns, "name": "nope", "replicas": 1}),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
}

#[tokio::test]
async fn rollback_restores_the_previous_template_and_records_revisions() {
    let c = cluster().await;
    c.deployment("web", "web:1", 1).await;
    let ex = c.executors();
    let err = run(
        &ex,
        "kube.rollback",
        json!({"namespace": c.ns, "name": "web"}),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("no revision before the current one (1)"),
        "{err}"
    );

    c.set_image("web", "web:2", 2).await;
    c.set_image("web", "web:3", 3).await;
    let out = run(
        &ex,
        "kube.rollback",
        json!({"namespace": c.ns, "name": "web", "wait": true}),
    )
    .await
    .unwrap();
    assert_eq!(
        (out["from_revision"].as_i64(), out["to_revision"].as_i64()),
        (Some(3), Some(2))
    );
    assert_eq!(out["rollout"], "complete");
    c.wait_revision("web", 4).await;
    let d = c.get_deployment("web").await;
    assert_eq!(image(&d), "web:2", "the previous pod template is back");
    let labels = d.spec.unwrap().template.metadata.unwrap().labels.unwrap();
    assert!(
        !labels.contains_key("pod-template-hash"),
        "the ReplicaSet's own label is not copied back"
    );

    // To a named revision.
    let out = run(
        &ex,
        "kube.rollback",
        json!({"namespace": c.ns, "name": "web", "to_revision": 1}),
    )
    .await
    .unwrap();
    assert_eq!(out["to_revision"], 1);
    c.wait_revision("web", 5).await;
    assert_eq!(image(&c.get_deployment("web").await), "web:1");
    let err = run(
        &ex,
        "kube.rollback",
        json!({"namespace": c.ns, "name": "web", "to_revision": 42}),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("no revision 42"), "{err}");
}

#[tokio::test]
async fn restart_delete_pod_cordon_and_patch() {
    let c = cluster().await;
    c.deployment("worker", "worker:1", 1).await;
    let ex = c.executors();
    let client = c.client().await;

    let out = run(
        &ex,
        "kube.restart",
        json!({"kind": "Deployment", "namespace": c.ns, "name": "worker"}),
    )
    .await
    .unwrap();
    assert!(out["before"]["restartedAt"].is_null());
    assert!(out["after"]["restartedAt"].is_string(), "{out}");
    let d = c.get_deployment("worker").await;
    let ann = d
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .annotations
        .unwrap();
    assert!(ann.contains_key("kubectl.kubernetes.io/restartedAt"));

    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "worker-abc"}, "spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.9"}]}})).unwrap();
    Api::<Pod>::namespaced(client.clone(), &c.ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    run(
        &ex,
        "kube.delete_pod",
        json!({"namespace": c.ns, "name": "worker-abc"}),
    )
    .await
    .unwrap();
    let err = run(
        &ex,
        "kube.delete_pod",
        json!({"namespace": c.ns, "name": "worker-abc"}),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");

    let nodes: Api<Node> = Api::all(client.clone());
    // On a real cluster, a node is cordoned (and uncordoned) only when REFLEX_TEST_NODE names
    // one set aside for it: cordoning takes a node out of scheduling.
    let node = if c.fake.is_some() {
        // Two more, so one cordoned leaves two of three schedulable (the floor is half).
        for name in ["node-1", "node-2", "node-3"] {
            let n: Node = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
            nodes.create(&PostParams::default(), &n).await.unwrap();
        }
        Some("node-1".to_string())
    } else {
        std::env::var("REFLEX_TEST_NODE").ok()
    };
    if let Some(node) = node {
        let out = run(&ex, "kube.cordon", json!({"node": node}))
            .await
            .unwrap();
        assert_eq!(
            (
                out["before"]["unschedulable"].as_bool(),
                out["after"]["unschedulable"].as_bool()
            ),
            (Some(false), Some(true))
        );
        assert_eq!(
            nodes.get(&node).await.unwrap().spec.unwrap().unschedulable,
            Some(true)
        );
        let out = run(&ex, "kube.uncordon", json!({"node": node}))
            .await
            .unwrap();
        assert_eq!(out["after"]["unschedulable"], false);
    }

    let out = run(
        &ex,
        "kube.patch",
        json!({"api_version": "apps/v1", "kind": "Deployment", "namespace": c.ns, "name": "worker", "patch": {"metadata": {"labels": {"remediated": "true"}}}}),
    )
    .await
    .unwrap();
    assert_eq!(
        out["before"]["metadata"]["labels"]["remediated"],
        Value::Null
    );
    assert_eq!(out["after"]["metadata"]["labels"]["remediated"], "true");
}

#[tokio::test]
async fn conflicts_are_retried_a_bounded_number_of_times() {
    let c = cluster().await;
    let Some(fake) = &c.fake else {
        return eprintln!("skipped: needs the fake API server");
    };
    c.deployment("api", "api:1", 1).await;
    let ex = c.executors();
    fake.inject_conflicts(2);
    let out = run(
        &ex,
        "kube.scale",
        json!({"kind": "Deployment", "namespace": c.ns, "name": "api", "replicas": 3}),
    )
    .await
    .unwrap();
    assert_eq!(out["conflicts_retried"], 2);
    assert_eq!(
        c.get_deployment("api").await.spec.unwrap().replicas,
        Some(3)
    );
    fake.inject_conflicts(50);
    let err = run(
        &ex,
        "kube.scale",
        json!({"kind": "Deployment", "namespace": c.ns, "name": "api", "replicas": 4}),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("409"), "{err}");
    fake.inject_conflicts(0);
}

#[tokio::test]
async fn forbidden_is_reported_as_an_rbac_problem() {
    // A role without `nodes: patch`.
    let dir = tempfile::tempdir().unwrap();
    let reduced = std::fs::read_to_string(rbac_manifest())
        .unwrap()
        .replace("verbs: [\"get\", \"patch\"]\n---", "verbs: [\"get\"]\n---");
    let reduced = reduced.replacen(
        "resources: [\"nodes\"]\n    verbs: [\"get\", \"list\", \"patch\"]",
        "resources: [\"nodes\"]\n    verbs: [\"get\", \"list\"]",
        1,
    );
    assert!(
        reduced.contains("verbs: [\"get\", \"list\"]"),
        "the nodes rule was found"
    );
    let path = dir.path().join("rbac.yaml");
    std::fs::write(&path, reduced).unwrap();
    let c = cluster_with(None).await;
    let Some(fake) = &c.fake else {
        return eprintln!("skipped: needs the fake API server");
    };
    for name in ["node-1", "node-2"] {
        let n: Node = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        Api::<Node>::all(c.client().await)
            .create(&PostParams::default(), &n)
            .await
            .unwrap();
    }
    fake.enforce(&path);
    let err = run(&c.executors(), "kube.cordon", json!({"node": "node-1"}))
        .await
        .unwrap_err();
    assert!(matches!(err, ExecError::Refused(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("forbidden by RBAC") && text.contains("cannot"),
        "{text}"
    );
}

#[tokio::test]
async fn names_from_hostile_labels_are_refused_before_any_request() {
    let c = cluster().await;
    let ex = c.executors();
    let before = c.fake.as_ref().map(FakeKube::requests);
    for (action, args) in [
        (
            "kube.scale",
            json!({"kind": "Deployment", "namespace": "shop", "name": "api; rm -rf /", "replicas": 1}),
        ),
        (
            "kube.rollback",
            json!({"namespace": "../kube-system", "name": "api"}),
        ),
        (
            "kube.delete_pod",
            json!({"namespace": "shop", "name": "Pod_Name"}),
        ),
        ("kube.cordon", json!({"node": "node/1"})),
        (
            "kube.patch",
            json!({"api_version": "v1", "kind": "ConfigMap", "namespace": "a.b", "name": "x", "patch": {}}),
        ),
    ] {
        let err = run(&ex, action, args).await.unwrap_err();
        assert!(matches!(err, ExecError::Refused(_)), "{action}: {err:?}");
        assert!(err.to_string().contains("not a valid Kubernetes"), "{err}");
    }
    assert_eq!(
        c.fake.as_ref().map(FakeKube::requests),
        before,
        "no request was made"
    );
}

#[tokio::test]
async fn the_rbac_role_grants_exactly_what_the_executor_uses() {
    // Held to the role: every action below must pass with it, and use all of it.
    let c = cluster().await;
    let Some(fake) = &c.fake else {
        return eprintln!("skipped: needs the fake API server");
    };
    let ex = c.executors();
    let client = c.client().await;
    // Setup, then forget what setup used.
    c.deployment("api", "api:1", 1).await;
    c.set_image("api", "api:2", 2).await;
    let sts: k8s_openapi::api::apps::v1::StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "db"},
        "spec": {"serviceName": "db", "replicas": 1, "selector": {"matchLabels": {"app": "db"}},
                 "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [{"name": "db", "image": "db:1"}]}}}
    }))
    .unwrap();
    Api::<k8s_openapi::api::apps::v1::StatefulSet>::namespaced(client.clone(), &c.ns)
        .create(&PostParams::default(), &sts)
        .await
        .unwrap();
    let ds: k8s_openapi::api::apps::v1::DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": "agent"},
        "spec": {"selector": {"matchLabels": {"app": "agent"}},
                 "template": {"metadata": {"labels": {"app": "agent"}}, "spec": {"containers": [{"name": "a", "image": "a:1"}]}}}
    }))
    .unwrap();
    Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(client.clone(), &c.ns)
        .create(&PostParams::default(), &ds)
        .await
        .unwrap();
    let pod: Pod = serde_json::from_value(
        json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a", "image": "a:1"}]}}),
    )
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), &c.ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    // n1 cordoned, then n2 drained: four nodes keep half schedulable (the guards' floor).
    for name in ["n1", "n3", "n4"] {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        Api::<Node>::all(client.clone())
            .create(&PostParams::default(), &node)
            .await
            .unwrap();
    }
    let flags = json!({"flags": {"checkout-v2": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on"}}});
    let cm: ConfigMap = serde_json::from_value(
        json!({"metadata": {"name": "flags"}, "data": {"flags.json": flags.to_string()}}),
    )
    .unwrap();
    Api::<ConfigMap>::namespaced(client, &c.ns)
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    // What the catalogue's actions act on: a Service with a Ready standby, an Ingress, an Istio
    // DestinationRule, a claim, and a node with a pod to evict.
    let ns = c.ns.clone();
    c.create(
        "v1",
        "Service",
        Some(&ns),
        json!({"metadata": {"name": "web"}, "spec": {"selector": {"app": "web"}}}),
    )
    .await;
    c.create(
        "v1",
        "Pod",
        Some(&ns),
        json!({"metadata": {"name": "web-standby", "labels": {"app": "web", "track": "standby"}},
               "spec": {"nodeName": "n2", "containers": [{"name": "a", "image": "a:1"}]},
               "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
    )
    .await;
    c.create(
        "v1",
        "Pod",
        Some(&ns),
        json!({"metadata": {"name": "on-n2"}, "spec": {"nodeName": "n2", "containers": [{"name": "a", "image": "a:1"}]}}),
    )
    .await;
    c.create("v1", "Node", None, json!({"metadata": {"name": "n2"}}))
        .await;
    c.create(
        "networking.k8s.io/v1",
        "Ingress",
        Some(&ns),
        json!({"metadata": {"name": "web"}, "spec": {}}),
    )
    .await;
    c.create(
        "networking.istio.io/v1",
        "DestinationRule",
        Some(&ns),
        json!({"metadata": {"name": "web"}, "spec": {"host": "web"}}),
    )
    .await;
    c.create(
        "v1",
        "PersistentVolumeClaim",
        Some(&ns),
        json!({"metadata": {"name": "data"}, "spec": {"resources": {"requests": {"storage": "1Gi"}}}}),
    )
    .await;
    fake.reset_used();

    let ns = c.ns.as_str();
    for (action, args) in [
        // Evidence first, while the pod is there.
        ("kube.logs", json!({"namespace": ns, "pod": "p"})),
        (
            "kube.events",
            json!({"namespace": ns, "kind": "Pod", "name": "p"}),
        ),
        (
            "kube.describe",
            json!({"namespace": ns, "kind": "Deployment", "name": "api"}),
        ),
        (
            "kube.history",
            json!({"namespace": ns, "deployment": "api"}),
        ),
        (
            "kube.scale",
            json!({"kind": "Deployment", "namespace": ns, "name": "api", "replicas": 2}),
        ),
        (
            "kube.scale",
            json!({"kind": "StatefulSet", "namespace": ns, "name": "db", "replicas": 2}),
        ),
        ("kube.rollback", json!({"namespace": ns, "name": "api"})),
        (
            "kube.restart",
            json!({"kind": "Deployment", "namespace": ns, "name": "api"}),
        ),
        (
            "kube.restart",
            json!({"kind": "StatefulSet", "namespace": ns, "name": "db"}),
        ),
        (
            "kube.restart",
            json!({"kind": "DaemonSet", "namespace": ns, "name": "agent"}),
        ),
        ("kube.delete_pod", json!({"namespace": ns, "name": "p"})),
        ("kube.cordon", json!({"node": "n1"})),
        (
            "feature_flag.disable",
            json!({"provider": "flagd", "flag": "checkout-v2"}),
        ),
        (
            "kube.patch",
            json!({"api_version": "apps/v1", "kind": "Deployment", "namespace": ns, "name": "api", "patch": {"metadata": {"labels": {"x": "y"}}}}),
        ),
        (
            "kube.failover",
            json!({"namespace": ns, "service": "web", "selector": {"track": "standby"}}),
        ),
        (
            "kube.rate_limit",
            json!({"namespace": ns, "ingress": "web", "rps": 5}),
        ),
        (
            "kube.circuit_break",
            json!({"namespace": ns, "destination_rule": "web", "consecutive_errors": 5, "interval": "10s",
                   "base_ejection_time": "30s", "max_ejection_percent": 50}),
        ),
        ("kube.drain", json!({"node": "n2", "timeout": "5s"})),
        (
            "kube.expand_pvc",
            json!({"namespace": ns, "pvc": "data", "size": "2Gi", "max": "4Gi"}),
        ),
    ] {
        run(&ex, action, args)
            .await
            .unwrap_or_else(|e| panic!("{action}: {e}"));
    }
    let role = allowed(&rbac_rules(&rbac_manifest()));
    assert_eq!(
        fake.used(),
        role,
        "deploy/kubernetes/base/rbac.yaml must grant exactly what the executor uses"
    );
}

#[tokio::test]
async fn alerts_naming_namespaces_outside_the_allowed_ones_change_nothing() {
    // Needs the fake's request count and its namespaces (skipped on a real cluster).
    if std::env::var("REFLEX_TEST_KUBECONFIG").is_ok() {
        eprintln!("skipped: needs the fake API server's request count");
        return;
    }
    let c = cluster().await;
    c.deployment("checkout", "checkout:1", 4).await;
    let narrow = r#"
name: narrow
matchers: ['alertname="Narrow"']
namespaces: ["team-*"]
steps:
  - action: kube.restart
    with: { kind: Deployment, namespace: "{{ labels.namespace }}", name: "{{ labels.deployment }}" }
"#;
    let app = crate::common::TestApp::builder()
        .example_playbooks()
        .playbook("narrow.yaml", narrow)
        .config(&format!(
            "kubernetes:\n  clusters:\n    prod: {{ kubeconfig: {}, allowed_namespaces: [shop] }}\n",
            c.kubeconfig.display()
        ))
        .start()
        .await;
    let fake = c.fake.as_ref().unwrap();
    let before = fake.requests();
    let mut refused = Vec::new();
    for (ns, name) in [
        ("kube-system", "coredns"),
        ("reflex", "reflex"),
        ("kube-public", "x"),
        ("default", "web"),
        ("other", "web"),
        ("shop-evil", "web"),
    ] {
        let alert =
            json!({"labels": {"alertname": "HighLatency", "namespace": ns, "deployment": name}});
        let (status, out) = app
            .post_raw("/api/v1/webhooks/generic", alert.to_string())
            .await;
        assert_eq!(status, 200, "{out}");
        refused.push((ns, out["outcomes"][0][0]["run_id"].as_i64().unwrap()));
    }
    for (ns, id) in refused {
        let run = app.wait_run_state(id, "failed").await;
        let error = run["steps"][0]["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("protected") || error.contains("allowed namespaces"),
            "{ns}: {error}"
        );
    }
    assert_eq!(fake.requests(), before, "no request reached the API server");

    // The playbook's own list narrows further: `shop` is allowed by the cluster, not by it.
    let alert =
        json!({"labels": {"alertname": "Narrow", "namespace": "shop", "deployment": "checkout"}});
    let (_, out) = app
        .post_raw("/api/v1/webhooks/generic", alert.to_string())
        .await;
    assert_eq!(out["outcomes"][0][0]["outcome"], "failed", "{out}");
    assert!(
        out["outcomes"][0][0]["error"]
            .as_str()
            .unwrap()
            .contains("not one this playbook may act in"),
        "{out}"
    );
    assert_eq!(fake.requests(), before);

    // The allowed namespace still works.
    let alert = json!({"labels": {"alertname": "HighLatency", "namespace": "shop", "deployment": "checkout"}});
    let id = app.start_run_for(&alert).await;
    app.wait_run_state(id, "succeeded").await;
    assert_eq!(
        c.get_deployment("checkout").await.spec.unwrap().replicas,
        Some(6)
    );
}

#[tokio::test]
async fn an_unreachable_cluster_is_named_with_its_url() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::common::free_port();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{ server: \"https://127.0.0.1:{port}\", insecure-skip-tls-verify: true }}\n\
             users:\n- name: u\n  user: {{ token: t }}\ncontexts:\n- name: x\n  context: {{ cluster: c, user: u }}\ncurrent-context: x\n"
        ),
    )
    .unwrap();
    let app = crate::common::TestApp::builder()
        .example_playbooks()
        .config(&format!(
            "kubernetes:\n  clusters:\n    prod: {{ kubeconfig: {} }}\n",
            kubeconfig.display()
        ))
        .start()
        .await;
    let alert = json!({"labels": {"alertname": "HighLatency", "namespace": "shop", "deployment": "checkout"}});
    let id = app.start_run_for(&alert).await;
    let run = app.wait_run_state(id, "failed").await;
    let error = run["steps"][0]["error"].as_str().unwrap();
    assert!(
        error.starts_with(&format!(
            "cannot reach Kubernetes cluster \"prod\" at https://127.0.0.1:{port}/"
        )),
        "{error}"
    );
    assert!(
        error.to_lowercase().contains("connection refused") || error.contains("Connect"),
        "{error}"
    );
}
