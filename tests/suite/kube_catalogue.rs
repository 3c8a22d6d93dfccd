//! The mitigation catalogue's Kubernetes actions (failover, rate limit, circuit break, drain,
//! volume growth) against the fake API server, held to `deploy/`'s RBAC role: the exact object
//! after each step, what the step recorded before and after, and each refusal. Tests that set
//! a pod's readiness or need an Istio CRD run on the fake only (see `kube.rs` for a real
//! cluster).

use crate::kube::{Cluster, cluster, run};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use reflex::executors::ExecError;
use serde_json::{Value, json};

impl Cluster {
    /// Creates any object through the API as the cluster admin; its namespace is the test's
    /// unless it is cluster-scoped (`ns: None`).
    pub(crate) async fn create(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        body: Value,
    ) {
        let api = self.dynamic(api_version, kind, ns).await;
        let mut obj: DynamicObject = serde_json::from_value(body).unwrap();
        obj.types = Some(kube::api::TypeMeta {
            api_version: api_version.into(),
            kind: kind.into(),
        });
        api.create(&PostParams::default(), &obj).await.unwrap();
    }

    /// An object as the API serves it now.
    pub(crate) async fn get(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Value {
        let obj = self
            .dynamic(api_version, kind, ns)
            .await
            .get(name)
            .await
            .unwrap();
        serde_json::to_value(obj).unwrap()
    }

    /// Merge-patches an object as the cluster admin.
    async fn patch_as_admin(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
        patch: Value,
    ) -> Result<(), kube::Error> {
        let api = self.dynamic(api_version, kind, ns).await;
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
    }

    async fn dynamic(&self, api_version: &str, kind: &str, ns: Option<&str>) -> Api<DynamicObject> {
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
        match ns {
            Some(ns) => Api::namespaced_with(self.client().await, ns, &resource),
            None => Api::all_with(self.client().await, &resource),
        }
    }

    /// A pod with these labels, Ready or not, on a node (the fake keeps the status it is
    /// given; a real API server would not).
    async fn pod(&self, name: &str, labels: Value, ready: bool, node: &str, extra: Value) {
        let mut body = json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app:1"}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        });
        crate::common::fake_kube::merge(&mut body, &extra);
        self.create("v1", "Pod", Some(&self.ns.clone()), body).await;
    }
}

/// Takes back what a step did (`action` with `args` answered `output`) as `reflex undo` would:
/// the undo planner's restoring steps, run through the executors.
async fn undo_step(ex: &reflex::executors::Executors, action: &str, args: Value, output: Value) {
    undo_result(ex, action, args, output)
        .await
        .unwrap_or_else(|e| panic!("undo {action}: {e}"));
}

/// As [`undo_step`], with the restoring step's answer.
async fn undo_result(
    ex: &reflex::executors::Executors,
    action: &str,
    args: Value,
    output: Value,
) -> Result<Value, ExecError> {
    use reflex::playbook::spec::{OnFailure, Phase};
    let step = reflex::store::StepRecord {
        idx: 0,
        name: "step".into(),
        action: reflex::playbook::actions::Action::parse(action).unwrap(),
        args,
        timeout_ms: None,
        on_failure: OnFailure::Stop,
        state: reflex::store::StepState::Succeeded,
        started_at: None,
        finished_at: None,
        output: Some(output),
        error: None,
        approval: None,
        phase: Phase::Main,
        artifacts: Vec::new(),
    };
    let undo = reflex::engine::undo::plan(&[step], false);
    assert_eq!(undo.steps.len(), 1, "{undo:?}");
    let restore = &undo.steps[0];
    run(ex, restore.action.name(), restore.args.clone()).await
}

/// The fake cluster; none on a real one, where a test that sets pod readiness or needs a CRD
/// the fake serves is skipped.
async fn fake_cluster() -> Option<Cluster> {
    let c = cluster().await;
    if c.fake.is_none() {
        eprintln!("skipped: needs the fake API server");
        return None;
    }
    Some(c)
}

#[tokio::test]
async fn failover_moves_the_selector_only_once_enough_standby_pods_are_ready() {
    let Some(c) = fake_cluster().await else {
        return;
    };
    let ns = c.ns.clone();
    c.create(
        "v1",
        "Service",
        Some(&ns),
        json!({"metadata": {"name": "checkout"}, "spec": {"selector": {"app": "checkout", "track": "primary"}, "ports": [{"port": 80}]}}),
    )
    .await;
    for (name, track, ready) in [
        ("primary-1", "primary", true),
        ("standby-1", "standby", true),
        ("standby-2", "standby", false),
    ] {
        let labels = json!({"app": "checkout", "track": track});
        c.pod(name, labels, ready, "n1", json!({})).await;
    }
    // Ready pods of another app with the same track do not count.
    let other = json!({"app": "other", "track": "standby"});
    c.pod("other-1", other, true, "n1", json!({})).await;
    let ex = c.executors();
    let args = |min_ready: u32| json!({"namespace": ns, "service": "checkout", "selector": {"track": "standby"}, "min_ready": min_ready});
    let err = run(&ex, "kube.failover", args(2)).await.unwrap_err();
    assert!(
        matches!(&err, ExecError::Refused(m) if m.contains("only 1 Ready pod(s)") && m.contains("app=checkout,track=standby")),
        "{err}"
    );
    let svc = c.get("v1", "Service", Some(&ns), "checkout").await;
    assert_eq!(
        svc["spec"]["selector"],
        json!({"app": "checkout", "track": "primary"}),
        "unchanged"
    );

    let out = run(&ex, "kube.failover", args(1)).await.unwrap();
    let svc = c.get("v1", "Service", Some(&ns), "checkout").await;
    assert_eq!(
        svc["spec"]["selector"],
        json!({"app": "checkout", "track": "standby"})
    );
    assert_eq!(
        svc["spec"]["ports"][0]["port"], 80,
        "the rest of the Service is kept"
    );
    assert_eq!(
        out["before"]["selector"],
        json!({"app": "checkout", "track": "primary"})
    );
    assert_eq!(
        out["after"]["selector"],
        json!({"app": "checkout", "track": "standby"})
    );
    assert_eq!(
        (out["ready"].clone(), out["changed"].clone()),
        (json!(1), json!(true))
    );
    // Undone: the selector as it was.
    undo_step(&ex, "kube.failover", args(1), out).await;
    let svc = c.get("v1", "Service", Some(&ns), "checkout").await;
    let primary = json!({"app": "checkout", "track": "primary"});
    assert_eq!(svc["spec"]["selector"], primary);
}

#[tokio::test]
async fn rate_limit_sets_the_ingress_nginx_annotations_and_records_what_was_there() {
    let c = cluster().await;
    let ns = c.ns.clone();
    c.create(
        "networking.k8s.io/v1",
        "Ingress",
        Some(&ns),
        json!({"metadata": {"name": "shop", "annotations": {
            "nginx.ingress.kubernetes.io/limit-rps": "50",
            "nginx.ingress.kubernetes.io/rewrite-target": "/"}},
            "spec": {"rules": [{"host": "shop.example", "http": {"paths": [{"path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": "shop", "port": {"number": 80}}}}]}}]}}),
    )
    .await;
    let out = run(
        &c.executors(),
        "kube.rate_limit",
        json!({"namespace": ns, "ingress": "shop", "rps": 10, "burst_multiplier": 3}),
    )
    .await
    .unwrap();
    let ing = c
        .get("networking.k8s.io/v1", "Ingress", Some(&ns), "shop")
        .await;
    let annotations = &ing["metadata"]["annotations"];
    assert_eq!(annotations["nginx.ingress.kubernetes.io/limit-rps"], "10");
    assert_eq!(
        annotations["nginx.ingress.kubernetes.io/limit-burst-multiplier"],
        "3"
    );
    assert!(
        annotations
            .get("nginx.ingress.kubernetes.io/limit-connections")
            .is_none(),
        "not asked for"
    );
    assert_eq!(
        annotations["nginx.ingress.kubernetes.io/rewrite-target"], "/",
        "others kept"
    );
    assert_eq!(
        out["before"]["annotations"],
        json!({"nginx.ingress.kubernetes.io/limit-rps": "50", "nginx.ingress.kubernetes.io/limit-burst-multiplier": null}),
        "the previous values, absent ones as null"
    );
    assert_eq!(
        out["after"]["annotations"],
        json!({"nginx.ingress.kubernetes.io/limit-rps": "10", "nginx.ingress.kubernetes.io/limit-burst-multiplier": "3"})
    );
    // Undone: the previous rate back, the added burst gone, the rest untouched.
    let args = json!({"namespace": ns, "ingress": "shop", "rps": 10, "burst_multiplier": 3});
    undo_step(&c.executors(), "kube.rate_limit", args, out).await;
    let ing = c
        .get("networking.k8s.io/v1", "Ingress", Some(&ns), "shop")
        .await;
    assert_eq!(
        ing["metadata"]["annotations"],
        json!({"nginx.ingress.kubernetes.io/limit-rps": "50", "nginx.ingress.kubernetes.io/rewrite-target": "/"})
    );
    let err = run(
        &c.executors(),
        "kube.rate_limit",
        json!({"namespace": ns, "ingress": "nope", "rps": 10}),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("ingress") && err.to_string().contains("not found"),
        "{err}"
    );
}

#[tokio::test]
async fn circuit_break_merges_outlier_detection_into_the_destination_rule() {
    let Some(c) = fake_cluster().await else {
        return;
    };
    let ns = c.ns.clone();
    let istio = "networking.istio.io/v1";
    c.create(
        istio,
        "DestinationRule",
        Some(&ns),
        json!({"metadata": {"name": "payments"}, "spec": {"host": "payments.shop.svc.cluster.local",
            "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}}}}),
    )
    .await;
    let out = run(
        &c.executors(),
        "kube.circuit_break",
        json!({"namespace": ns, "destination_rule": "payments", "consecutive_errors": 5, "interval": "10s",
               "base_ejection_time": "30s", "max_ejection_percent": 50, "max_connections": 100,
               "max_pending_requests": 10}),
    )
    .await
    .unwrap();
    let rule = c.get(istio, "DestinationRule", Some(&ns), "payments").await;
    let policy = &rule["spec"]["trafficPolicy"];
    assert_eq!(
        policy,
        &json!({
            "loadBalancer": {"simple": "ROUND_ROBIN"},
            "outlierDetection": {"consecutive5xxErrors": 5, "interval": "10s", "baseEjectionTime": "30s", "maxEjectionPercent": 50},
            "connectionPool": {"tcp": {"maxConnections": 100}, "http": {"http1MaxPendingRequests": 10}},
        })
    );
    assert_eq!(rule["spec"]["host"], "payments.shop.svc.cluster.local");
    assert_eq!(
        out["before"]["trafficPolicy"],
        json!({"loadBalancer": {"simple": "ROUND_ROBIN"}})
    );
    assert_eq!(&out["after"]["trafficPolicy"], policy);
    // Undone: the traffic policy as it was.
    let args = json!({"namespace": ns, "destination_rule": "payments"});
    undo_step(&c.executors(), "kube.circuit_break", args, out).await;
    let rule = c.get(istio, "DestinationRule", Some(&ns), "payments").await;
    let before = json!({"loadBalancer": {"simple": "ROUND_ROBIN"}});
    assert_eq!(rule["spec"]["trafficPolicy"], before);
}

#[tokio::test]
async fn drain_cordons_evicts_and_waits_on_a_disruption_budget_until_its_timeout() {
    let Some(c) = fake_cluster().await else {
        return;
    };
    let ns = c.ns.clone();
    // Three nodes: draining one leaves two of three schedulable, above the floor (half).
    for node in ["n1", "n2", "n3"] {
        c.create("v1", "Node", None, json!({"metadata": {"name": node}}))
            .await;
    }
    for name in ["web-1", "web-2"] {
        c.pod(name, json!({"app": "web"}), true, "n1", json!({}))
            .await;
    }
    c.pod("batch-1", json!({"app": "batch"}), true, "n1", json!({}))
        .await;
    c.pod(
        "agent-x",
        json!({"app": "agent"}),
        true,
        "n1",
        json!({"metadata": {"ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "agent", "uid": "u1", "controller": true}]}}),
    )
    .await;
    c.pod(
        "etcd-n1",
        json!({"component": "etcd"}),
        true,
        "n1",
        json!({"metadata": {"annotations": {"kubernetes.io/config.mirror": "abc"}}}),
    )
    .await;
    c.pod("web-3", json!({"app": "web"}), true, "n2", json!({}))
        .await;
    // Two of the three web pods must stay up: web-1 may go, then nothing more.
    c.create(
        "policy/v1",
        "PodDisruptionBudget",
        Some(&ns),
        json!({"metadata": {"name": "web"}, "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}}}),
    )
    .await;
    let ex = c.executors();
    let started = std::time::Instant::now();
    let err = run(
        &ex,
        "kube.drain",
        json!({"node": "n1", "timeout": "2s", "grace_period": 30}),
    )
    .await
    .unwrap_err();
    let ExecError::FailedWith(message, out) = &err else {
        panic!("{err:?}")
    };
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(2),
        "retried until the timeout"
    );
    assert!(
        message.contains("PodDisruptionBudget") && message.contains(&format!("{ns}/web-2")),
        "{message}"
    );
    assert_eq!(
        out["evicted"],
        json!([format!("{ns}/batch-1"), format!("{ns}/web-1")])
    );
    assert_eq!(out["left"], json!([format!("{ns}/web-2")]));
    assert_eq!(
        out["skipped"],
        json!([{"pod": format!("{ns}/agent-x"), "why": "DaemonSet"}, {"pod": format!("{ns}/etcd-n1"), "why": "mirror pod"}])
    );
    assert_eq!(out["before"]["unschedulable"], false);
    assert_eq!(out["after"]["unschedulable"], true);
    let node = c.get("v1", "Node", None, "n1").await;
    assert_eq!(node["spec"]["unschedulable"], true, "cordoned");
    let fake = c.fake.as_ref().unwrap();
    assert_eq!(
        fake.evictions(),
        vec![
            (format!("{ns}/batch-1"), Some(30)),
            (format!("{ns}/web-1"), Some(30))
        ],
        "evicted through the Eviction API with the grace period asked for"
    );
    assert!(
        fake.object("", "pods", &ns, "web-3").is_some(),
        "a pod on another node stays"
    );
    assert!(fake.object("", "pods", &ns, "agent-x").is_some());

    // The budget relaxed, a second drain finishes the job.
    c.patch_as_admin(
        "policy/v1",
        "PodDisruptionBudget",
        Some(&ns),
        "web",
        json!({"spec": {"minAvailable": 1}}),
    )
    .await
    .unwrap();
    let out = run(&ex, "kube.drain", json!({"node": "n1", "timeout": "2s"}))
        .await
        .unwrap();
    assert_eq!(out["evicted"], json!([format!("{ns}/web-2")]));
    assert_eq!(out["left"], json!([]));
    assert_eq!(out["before"]["unschedulable"], true, "already cordoned");
    // Undoing the first drain (which failed, with its change on record) uncordons the node.
    let first = match &err {
        ExecError::FailedWith(_, out) => out.clone(),
        other => panic!("{other:?}"),
    };
    undo_step(&ex, "kube.drain", json!({"node": "n1"}), first).await;
    let node = c.get("v1", "Node", None, "n1").await;
    assert_eq!(node["spec"]["unschedulable"], false, "uncordoned");
}

#[tokio::test]
async fn expand_pvc_grows_within_max_and_never_shrinks() {
    let Some(c) = fake_cluster().await else {
        return;
    };
    let ns = c.ns.clone();
    c.create(
        "v1",
        "PersistentVolumeClaim",
        Some(&ns),
        json!({"metadata": {"name": "data-db-0"}, "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "ssd",
            "resources": {"requests": {"storage": "10Gi"}}}, "status": {"capacity": {"storage": "10Gi"}}}),
    )
    .await;
    let ex = c.executors();
    let grow = |size: &str, max: &str| json!({"namespace": ns, "pvc": "data-db-0", "size": size, "max": max});
    let storage = || async {
        c.get("v1", "PersistentVolumeClaim", Some(&ns), "data-db-0")
            .await["spec"]["resources"]["requests"]["storage"]
            .clone()
    };
    let out = run(&ex, "kube.expand_pvc", grow("+5Gi", "20Gi"))
        .await
        .unwrap();
    assert_eq!(storage().await, "15Gi");
    assert_eq!(out["before"]["storage"], "10Gi");
    assert_eq!(out["after"]["storage"], "15Gi");
    assert_eq!(
        out["capacity"], "10Gi",
        "what the volume has until the resize is done"
    );

    let err = run(&ex, "kube.expand_pvc", grow("30Gi", "20Gi"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ExecError::Refused(m) if m.contains("above max 20Gi")),
        "{err}"
    );
    let err = run(&ex, "kube.expand_pvc", grow("5Gi", "20Gi"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ExecError::Refused(m) if m.contains("only grow")),
        "{err}"
    );
    assert_eq!(storage().await, "15Gi", "nothing changed");
    // The API server's own rule, which the refusal above keeps Reflex from ever meeting.
    let shrink = c
        .patch_as_admin(
            "v1",
            "PersistentVolumeClaim",
            Some(&ns),
            "data-db-0",
            json!({"spec": {"resources": {"requests": {"storage": "1Gi"}}}}),
        )
        .await
        .unwrap_err();
    assert!(
        shrink
            .to_string()
            .contains("can not be less than previous value"),
        "{shrink}"
    );
}

#[tokio::test]
async fn a_patch_that_expects_a_value_changes_nothing_when_the_field_changed_since() {
    let c = cluster().await;
    let ns = c.ns.clone();
    c.deployment("api", "api:1", 3).await;
    let ex = c.executors();
    let patch = |expect: u32, to: u32| {
        json!({"api_version": "apps/v1", "kind": "Deployment", "namespace": ns, "name": "api",
               "patch": {"spec": {"replicas": to}}, "expect": {"spec": {"replicas": expect}}})
    };
    let err = run(&ex, "kube.patch", patch(5, 2)).await.unwrap_err();
    assert!(
        matches!(&err, ExecError::Refused(m) if m.contains("spec.replicas is 3 now, not 5")),
        "{err}"
    );
    let replicas = || async {
        c.get("apps/v1", "Deployment", Some(&ns), "api").await["spec"]["replicas"].clone()
    };
    assert_eq!(replicas().await, 3, "nothing was patched");
    let out = run(&ex, "kube.patch", patch(3, 2)).await.unwrap();
    assert_eq!(replicas().await, 2);
    assert_eq!(out["before"], json!({"spec": {"replicas": 3}}));
    assert_eq!(out["after"], json!({"spec": {"replicas": 2}}));
}

/// A playbook that scales `api` to 5 replicas.
const SCALE: &str = r#"
name: scale
matchers: ['alertname="Busy"']
steps:
  - name: scale
    action: kube.scale
    with: { kind: Deployment, namespace: "{{ labels.namespace }}", name: api, replicas: 5 }
  - name: note
    action: log
    with: { message: "scaled" }
"#;

/// Waits until run `id` is in `state`, reading as a viewer would with `token`.
async fn wait_state(app: &crate::common::TestApp, id: i64, state: &str, token: &str) -> Value {
    app.wait_for(20, &format!("run {id} to be {state}"), || async {
        let (_, run) = app
            .call("GET", &format!("/api/v1/runs/{id}"), Some(token), None)
            .await;
        (run["state"] == state).then_some(run)
    })
    .await
}

#[tokio::test]
async fn undo_restores_what_a_run_changed_and_refuses_a_field_changed_since_unless_forced() {
    let c = cluster().await;
    let ns = c.ns.clone();
    c.deployment("api", "api:1", 3).await;
    let daemon = crate::common::TestApp::builder()
        .playbook("scale.yaml", SCALE)
        .config(&format!(
            "kubernetes:\n  clusters:\n    test: {{ kubeconfig: {} }}\n{}",
            c.kubeconfig.display(),
            crate::common::auth_config(&[
                ("op", "operator"),
                ("boss", "admin"),
                ("hook", "webhook")
            ])
        ))
        .start()
        .await;
    let app = &daemon;
    let replicas = || async {
        c.get("apps/v1", "Deployment", Some(&ns), "api").await["spec"]["replicas"].clone()
    };
    let scale = || async {
        let alert = json!({"labels": {"alertname": "Busy", "namespace": ns}});
        let id = app.start_run_as(Some("hook-token"), &alert).await;
        wait_state(app, id, "succeeded", "op-token").await;
        id
    };
    let undo = |id: i64, token: &'static str, force: bool| async move {
        let path = format!("/api/v1/runs/{id}/undo");
        app.call("POST", &path, Some(token), Some(json!({"force": force})))
            .await
    };

    let first = scale().await;
    assert_eq!(replicas().await, 5);
    let (status, out) = undo(first, "op-token", false).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["undo"]["steps"][0]["name"], "undo scale");
    assert_eq!(
        out["undo"]["skipped"],
        json!([]),
        "a log line is not a change"
    );
    let id = out["outcome"]["run_id"].as_i64().unwrap();
    let run = wait_state(app, id, "succeeded", "op-token").await;
    assert_eq!(run["undo_of"], first, "{run}");
    assert_eq!(run["triggered_by"], "op");
    assert_eq!(replicas().await, 3, "back to what the run found");

    // Someone scales by hand after the run: the undo does not clobber it.
    let second = scale().await;
    c.patch_as_admin(
        "apps/v1",
        "Deployment",
        Some(&ns),
        "api",
        json!({"spec": {"replicas": 7}}),
    )
    .await
    .unwrap();
    let (_, out) = undo(second, "op-token", false).await;
    let id = out["outcome"]["run_id"].as_i64().unwrap();
    let run = wait_state(app, id, "failed", "op-token").await;
    let error = run["steps"][0]["error"].as_str().unwrap();
    assert!(error.contains("spec.replicas is 7 now, not 5"), "{error}");
    assert_eq!(replicas().await, 7, "left as the person set it");
    // Forcing it is an admin's call.
    let (status, _) = undo(second, "op-token", true).await;
    assert_eq!(status, 403);
    let (status, out) = undo(second, "boss-token", true).await;
    assert_eq!(status, 200, "{out}");
    wait_state(
        app,
        out["outcome"]["run_id"].as_i64().unwrap(),
        "succeeded",
        "op-token",
    )
    .await;
    assert_eq!(replicas().await, 3);
    // A live run, or one that changed nothing undoable, is refused with why.
    let (status, out) = undo(id, "op-token", false).await;
    assert_eq!(status, 409, "{out}");
    assert!(
        out["error"]["message"]
            .as_str()
            .unwrap()
            .contains("changed nothing that can be undone"),
        "{out}"
    );
    let (_, audit) = app
        .call(
            "GET",
            "/api/v1/audit?action=run.undo",
            Some("op-token"),
            None,
        )
        .await;
    assert_eq!(audit.as_array().map(Vec::len), Some(3), "{audit}");
}

const SCALE_AND_VERIFY: &str = r#"
name: scale-verified
matchers: ['alertname="Slow"']
on_verify_failure: undo
steps:
  - name: scale
    action: kube.scale
    with: { kind: Deployment, namespace: "{{ labels.namespace }}", name: api, replicas: 5 }
  - name: verify
    action: verify
    with: { query: test_latency_seconds, condition: "value < 0.5", interval: 200ms, for: 1s }
    timeout: 2s
on_failure:
  - name: escalate
    action: log
    with: { message: "still slow: paging" }
"#;

#[tokio::test]
async fn a_failed_verification_undoes_the_runs_changes_then_escalates_and_chat_says_so() {
    let c = cluster().await;
    let ns = c.ns.clone();
    c.deployment("api", "api:1", 3).await;
    let target = crate::common::prometheus::serve_metrics(
        "# TYPE test_latency_seconds gauge\ntest_latency_seconds 0.9\n",
    )
    .await;
    let prom = crate::common::prometheus::Prometheus::start(&target).await;
    let chat = crate::common::receiver::Receiver::start().await;
    let app = crate::common::TestApp::builder()
        .playbook("scale.yaml", SCALE_AND_VERIFY)
        .config(&format!(
            "kubernetes:\n  clusters:\n    test: {{ kubeconfig: {} }}\nprometheus_url: {}\nnotify:\n  sinks:\n    - {{ name: chat, type: webhook, url: \"{}/chat\" }}\n",
            c.kubeconfig.display(),
            prom.base,
            chat.base
        ))
        .start()
        .await;
    let id = app
        .start_run_for(&json!({"labels": {"alertname": "Slow", "namespace": ns}}))
        .await;
    let run = app.wait_run_state(id, "failed").await;
    let error = run["error"].as_str().unwrap();
    assert!(
        error.contains("did not hold within 2s") && error.contains("undone by run"),
        "{error}"
    );
    assert_eq!(
        run["steps"][2]["state"], "succeeded",
        "then it escalates: {run}"
    );
    let undo_id = app
        .wait_for(20, "the undo run", || async {
            let runs = app.runs().await;
            runs.iter()
                .find(|r| r["undo_of"] == id)
                .map(|r| r["id"].as_i64().unwrap())
        })
        .await;
    let undo = app.wait_run_state(undo_id, "succeeded").await;
    assert_eq!(undo["triggered_by"], "reflex", "{undo}");
    let replicas =
        c.get("apps/v1", "Deployment", Some(&ns), "api").await["spec"]["replicas"].clone();
    assert_eq!(replicas, 3, "back at its previous replicas");
    let said = app
        .wait_for(20, "chat to hear of it", || async {
            let texts: Vec<String> = (chat.at("/chat").iter())
                .filter_map(|m| m.body["text"].as_str().map(str::to_string))
                .collect();
            texts
                .iter()
                .any(|t| t.contains(&format!("undone by run {undo_id}")))
                .then_some(texts)
        })
        .await;
    assert!(
        said.iter().any(|t| t.contains(&format!("Run {undo_id}"))),
        "{said:?}"
    );
}

#[tokio::test]
async fn a_rollbacks_undo_rolls_forward_unless_something_was_deployed_since() {
    let Some(c) = fake_cluster().await else {
        return;
    };
    let ns = c.ns.clone();
    c.deployment("web", "web:1", 1).await;
    c.set_image("web", "web:2", 2).await;
    let ex = c.executors();
    let args = json!({"namespace": ns, "name": "web", "wait": true});
    let image = || async { crate::kube::image(&c.get_deployment("web").await) };
    let out = run(&ex, "kube.rollback", args.clone()).await.unwrap();
    assert_eq!(
        (out["from_revision"].clone(), out["revision_after"].clone()),
        (json!(2), json!(3))
    );
    assert_eq!(image().await, "web:1");
    undo_step(&ex, "kube.rollback", args.clone(), out).await;
    assert_eq!(
        image().await,
        "web:2",
        "rolled forward to what the rollback replaced"
    );

    // Rolled back again, then someone deploys: the undo would roll over that deploy.
    let out = run(&ex, "kube.rollback", args.clone()).await.unwrap();
    assert_eq!(image().await, "web:1");
    let left = out["revision_after"].as_i64().unwrap();
    c.set_image("web", "web:3", left + 1).await;
    let err = undo_result(&ex, "kube.rollback", args, out)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ExecError::Refused(m) if m.contains(&format!("revision {} now, not {left}", left + 1))),
        "{err}"
    );
    assert_eq!(image().await, "web:3", "the new deploy stays");
}

/// A pod of a Deployment's current ReplicaSet, Ready.
async fn pod_of(c: &Cluster, deployment: &str, pod: &str) {
    let sets = (Api::<k8s_openapi::api::apps::v1::ReplicaSet>::namespaced(c.client().await, &c.ns))
        .list(&Default::default())
        .await
        .unwrap();
    let rs = (sets.items.iter())
        .find(|r| {
            r.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.name == deployment)
        })
        .expect("the deployment's ReplicaSet");
    let owner = json!({"metadata": {"ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "name": rs.metadata.name, "uid": rs.metadata.uid, "controller": true}]}});
    c.pod(pod, json!({"app": deployment}), true, "n1", owner)
        .await;
}

#[tokio::test]
async fn a_guard_refuses_a_delete_that_would_drop_a_deployment_below_half() {
    let Some(c) = fake_cluster().await else {
        return;
    };
    let ns = c.ns.clone();
    c.deployment("solo", "solo:1", 1).await;
    c.deployment("wide", "wide:1", 4).await;
    pod_of(&c, "solo", "solo-a").await;
    pod_of(&c, "wide", "wide-a").await;
    let ex = c.executors();
    let guard = "ready_fraction >= 0.5";
    // The only ready replica: none would be left.
    let err = run(
        &ex,
        "kube.delete_pod",
        json!({"namespace": ns, "name": "solo-a", "guard": guard}),
    )
    .await
    .unwrap_err();
    let ExecError::FailedWith(message, out) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(
        message,
        "refused by its guard: ready_fraction >= 0.5 does not hold (ready_fraction is 0.00)"
    );
    assert_eq!(
        out["guard"],
        json!({"condition": guard, "holds": false, "facts": {"desired": 1, "ready_after": 0, "ready_fraction": 0.0}})
    );
    assert!(
        c.get("v1", "Pod", Some(&ns), "solo-a").await.is_object(),
        "not deleted"
    );
    // One of four: three stay ready.
    let out = run(
        &ex,
        "kube.delete_pod",
        json!({"namespace": ns, "name": "wide-a", "guard": guard}),
    )
    .await
    .unwrap();
    assert_eq!(
        out["guard"],
        json!({"condition": guard, "holds": true, "facts": {"desired": 4, "ready_after": 3, "ready_fraction": 0.75}})
    );
    // A restart reads its workload's readiness now.
    let out = run(
        &ex,
        "kube.restart",
        json!({"kind": "Deployment", "namespace": ns, "name": "wide", "guard": guard}),
    )
    .await
    .unwrap();
    assert_eq!(
        out["guard"]["facts"],
        json!({"desired": 4, "ready": 4, "ready_fraction": 1.0})
    );
    let err = run(
        &ex,
        "kube.restart",
        json!({"kind": "Deployment", "namespace": ns, "name": "wide", "guard": "ready > 4"}),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "refused by its guard: ready > 4 does not hold (ready is 4.00)"
    );
    // A guard naming what a delete cannot know is refused before anything is read.
    let err = run(
        &ex,
        "kube.delete_pod",
        json!({"namespace": ns, "name": "solo-a", "guard": "schedulable_nodes_after >= 1"}),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("unknown fact \"schedulable_nodes_after\""),
        "{err}"
    );
}

#[tokio::test]
async fn cordon_never_leaves_fewer_than_half_the_nodes_schedulable_and_a_guard_can_only_tighten() {
    let Some(c) = fake_cluster().await else {
        return;
    };
    for node in ["n1", "n2", "n3", "n4"] {
        c.create("v1", "Node", None, json!({"metadata": {"name": node}}))
            .await;
    }
    let ex = c.executors();
    // A playbook's guard tightens the floor: 3 of 4 left is 0.75, under 0.8.
    let err = run(
        &ex,
        "kube.cordon",
        json!({"node": "n1", "guard": "schedulable_nodes_after >= 0.8"}),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().starts_with("refused by its guard: schedulable_nodes_after >= 0.8 does not hold (schedulable_nodes_after is 0.75)"),
        "{err}"
    );
    assert_eq!(
        c.get("v1", "Node", None, "n1").await["spec"]["unschedulable"],
        Value::Null
    );
    // A looser guard does not loosen the floor: two cordoned leave half, a third is refused.
    for node in ["n1", "n2"] {
        let out = run(
            &ex,
            "kube.cordon",
            json!({"node": node, "guard": "schedulable_nodes_after >= 0.1"}),
        )
        .await
        .unwrap();
        assert_eq!(out["guard"]["holds"], true, "{out}");
    }
    let err = run(
        &ex,
        "kube.cordon",
        json!({"node": "n3", "guard": "schedulable_nodes_after >= 0.1"}),
    )
    .await
    .unwrap_err();
    let ExecError::FailedWith(message, out) = &err else {
        panic!("{err:?}")
    };
    assert!(
        message.contains(
            "schedulable_nodes_after >= 0.5 does not hold (schedulable_nodes_after is 0.25)"
        ),
        "{message}"
    );
    assert_eq!(
        out["guard"]["facts"],
        json!({"nodes": 4, "schedulable_nodes_after": 0.25})
    );
    assert_eq!(
        c.get("v1", "Node", None, "n3").await["spec"]["unschedulable"],
        Value::Null
    );
}
