//! The shipped deploy files are valid: Kubernetes manifests parse into k8s-openapi types with
//! the properties we promise, the config and playbooks inside them load, and the Prometheus
//! rules and Alertmanager config pass the projects' own checkers.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, PersistentVolumeClaim, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect()
}

fn typed<T: serde::de::DeserializeOwned>(doc: &Value, file: &Path) -> T {
    serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{}: {} does not parse: {e}", file.display(), doc["kind"]))
}

const NAMESPACED_RBAC: &str = "rbac-namespaced.yaml";

#[test]
fn the_namespaced_rbac_grants_the_cluster_roles_namespaced_rules_through_a_role_binding() {
    let rules = |file: &str, name: &str| -> Vec<Value> {
        let path = repo(&format!("deploy/kubernetes/base/{file}"));
        let doc = docs(&path)
            .into_iter()
            .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == name)
            .unwrap();
        typed::<ClusterRole>(&doc, &path);
        doc["rules"].as_array().unwrap().clone()
    };
    let is_nodes = |r: &Value| r["resources"] == serde_json::json!(["nodes"]);
    let cluster_wide = rules("rbac.yaml", "reflex");
    let (nodes, namespaced): (Vec<Value>, Vec<Value>) =
        cluster_wide.into_iter().partition(is_nodes);
    assert_eq!(rules(NAMESPACED_RBAC, "reflex-namespaced"), namespaced);
    assert_eq!(rules(NAMESPACED_RBAC, "reflex-nodes"), nodes);
    let path = repo(&format!("deploy/kubernetes/base/{NAMESPACED_RBAC}"));
    let binding = docs(&path)
        .into_iter()
        .find(|d| d["kind"] == "RoleBinding")
        .unwrap();
    let binding: RoleBinding = typed(&binding, &path);
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, "reflex-namespaced");
    assert!(
        binding.metadata.namespace.is_some(),
        "bound in one namespace"
    );
    assert!(
        !docs(&path)
            .iter()
            .any(|d| d["kind"] == "ClusterRoleBinding"),
        "nothing bound cluster-wide"
    );
}

#[test]
fn kubernetes_manifests_parse_into_k8s_openapi_types() {
    let dir = repo("deploy/kubernetes/base");
    let mut kinds = Vec::new();
    let mut deployment = None;
    let mut configmaps = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let file = entry.unwrap().path();
        // The namespaced RBAC is an alternative to rbac.yaml, checked on its own below.
        if ["kustomization.yaml", NAMESPACED_RBAC]
            .contains(&file.file_name().unwrap().to_str().unwrap())
        {
            continue;
        }
        for doc in docs(&file) {
            let kind = doc["kind"].as_str().unwrap().to_string();
            match kind.as_str() {
                "Namespace" => drop(typed::<Namespace>(&doc, &file)),
                "ServiceAccount" => drop(typed::<ServiceAccount>(&doc, &file)),
                "ClusterRole" => drop(typed::<ClusterRole>(&doc, &file)),
                "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&doc, &file)),
                "ConfigMap" => configmaps.push(typed::<ConfigMap>(&doc, &file)),
                "Deployment" => deployment = Some(typed::<Deployment>(&doc, &file)),
                "PersistentVolumeClaim" => drop(typed::<PersistentVolumeClaim>(&doc, &file)),
                "Service" => drop(typed::<Service>(&doc, &file)),
                other => panic!("{}: unexpected kind {other}", file.display()),
            }
            kinds.push(kind);
        }
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "Namespace",
            "PersistentVolumeClaim",
            "Service",
            "ServiceAccount"
        ]
    );

    let d = deployment.unwrap();
    let pod = d.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("reflex"));
    assert_eq!(pod.security_context.unwrap().run_as_non_root, Some(true));
    let c = &pod.containers[0];
    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref().unwrap().http_get.as_ref().unwrap().path.clone()
    };
    assert_eq!(path(&c.readiness_probe).as_deref(), Some("/readyz"));
    assert_eq!(path(&c.liveness_probe).as_deref(), Some("/healthz"));
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert!(c.resources.as_ref().unwrap().requests.is_some());

    // The config and playbooks shipped in the ConfigMaps load.
    let tmp = tempfile::tempdir().unwrap();
    for cm in configmaps {
        for (name, text) in cm.data.unwrap() {
            if name == "reflex.yaml" {
                reflex::config::Config::parse(&text)
                    .unwrap_or_else(|e| panic!("reflex.yaml in the ConfigMap: {e:?}"));
            } else {
                std::fs::write(tmp.path().join(&name), text).unwrap();
            }
        }
    }
    reflex::playbook::PlaybookSet::load(&[tmp.path().to_path_buf()], &Default::default())
        .unwrap_or_else(|d| panic!("{d:?}"));

    let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        if name != "kustomization.yaml" && name != NAMESPACED_RBAC {
            assert!(
                kustomization.contains(&name),
                "kustomization.yaml does not list {name}"
            );
        }
    }
}

#[test]
fn prometheus_rules_pass_promtool() {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo("deploy/prometheus/reflex-rules.yaml"))
        .output()
        .expect("promtool (package prometheus) must be installed");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every metric the rules use is one Reflex exports.
    let rules = std::fs::read_to_string(repo("deploy/prometheus/reflex-rules.yaml")).unwrap();
    let metrics = reflex::metrics::Metrics::new();
    // Labelled series appear once they have a child.
    metrics.runs.with_label_values(&["p", "failed"]).inc();
    metrics.notify_failures.with_label_values(&["s"]).inc();
    let exported = metrics.render();
    for name in [
        "reflex_killswitch_engaged",
        "reflex_runs_total",
        "reflex_approvals_pending",
        "reflex_notify_failures_total",
        "reflex_playbook_reload_errors_total",
    ] {
        assert!(rules.contains(name));
        assert!(
            exported.contains(&format!("# TYPE {name}")),
            "{name} is not exported"
        );
    }
}

#[test]
fn alertmanager_snippet_passes_amtool() {
    let dir = tempfile::tempdir().unwrap();
    // amtool checks that the credentials file exists.
    let cfg = std::fs::read_to_string(repo("deploy/alertmanager/alertmanager.yml"))
        .unwrap()
        .replace(
            "/etc/alertmanager/secrets/reflex-token",
            &dir.path().join("token").display().to_string(),
        );
    std::fs::write(dir.path().join("token"), "t").unwrap();
    std::fs::write(dir.path().join("alertmanager.yml"), cfg).unwrap();
    let out = Command::new("amtool")
        .args(["check-config"])
        .arg(dir.path().join("alertmanager.yml"))
        .output()
        .expect("amtool (package prometheus-alertmanager) must be installed");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_alertmanager_route_sends_every_example_alert_to_reflex_and_to_people() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = std::fs::read_to_string(repo("deploy/alertmanager/alertmanager.yml"))
        .unwrap()
        .replace("/etc/alertmanager/secrets/reflex-token", "/dev/null");
    let cfg_path = dir.path().join("alertmanager.yml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let mut tested = 0;
    for entry in std::fs::read_dir(repo("examples/alerts")).unwrap() {
        let file = entry.unwrap().path();
        let payload: Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        // Alertmanager payloads carry `alerts`; a generic alert is one object or a list.
        let alerts = match (&payload["alerts"], &payload) {
            (Value::Array(a), _) => a.clone(),
            (_, Value::Array(a)) => a.clone(),
            (_, one) => vec![one.clone()],
        };
        for alert in alerts {
            let labels: Vec<String> = alert["labels"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
                .collect();
            let out = Command::new("amtool")
                .args(["config", "routes", "test", "--config.file"])
                .arg(&cfg_path)
                .args(&labels)
                .output()
                .expect("amtool (package prometheus-alertmanager) must be installed");
            let receivers = String::from_utf8_lossy(&out.stdout).trim().to_string();
            assert_eq!(
                receivers,
                "reflex,default",
                "{}: {labels:?}",
                file.display()
            );
            tested += 1;
        }
    }
    assert!(tested >= 5, "only {tested} example alerts");
}

#[test]
fn the_systemd_unit_is_hardened() {
    let unit = std::fs::read_to_string(repo("deploy/systemd/reflex.service")).unwrap();
    for line in [
        "DynamicUser=yes",
        "StateDirectory=reflex",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "LimitNOFILE=16384",
    ] {
        assert!(unit.lines().any(|l| l == line), "missing {line}");
    }
}

#[test]
fn the_ha_overlay_runs_three_spread_replicas_on_postgresql_with_a_disruption_budget() {
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    let dir = repo("deploy/kubernetes/ha");
    let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    for needed in ["../base", "pdb.yaml", "deployment.yaml", "configmap.yaml"] {
        assert!(
            kustomization.contains(needed),
            "ha/kustomization.yaml: {needed}"
        );
    }
    assert!(
        kustomization.contains("kind: PersistentVolumeClaim")
            && kustomization.contains("$patch: delete"),
        "no SQLite volume under three replicas"
    );
    let file = dir.join("deployment.yaml");
    let d: Deployment = typed(&docs(&file)[0], &file);
    let spec = d.spec.unwrap();
    assert_eq!(spec.replicas, Some(3));
    let strategy = spec.strategy.unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let pod = spec.template.spec.unwrap();
    let anti = pod.affinity.unwrap().pod_anti_affinity.unwrap();
    let term = &anti
        .preferred_during_scheduling_ignored_during_execution
        .unwrap()[0];
    assert_eq!(
        term.pod_affinity_term.topology_key,
        "kubernetes.io/hostname"
    );
    let volumes = pod.volumes.unwrap();
    let secret = volumes.iter().find(|v| v.name == "postgres").unwrap();
    assert_eq!(
        secret.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("reflex-postgres")
    );
    let mount = pod.containers[0]
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "postgres")
        .unwrap()
        .mount_path
        .clone();

    let file = dir.join("pdb.yaml");
    let pdb: PodDisruptionBudget = typed(&docs(&file)[0], &file);
    let pdb = pdb.spec.unwrap();
    assert_eq!(
        pdb.min_available,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(2))
    );

    // The config loads, names PostgreSQL, and reads the password from the mounted secret.
    let file = dir.join("configmap.yaml");
    let cm: ConfigMap = typed(&docs(&file)[0], &file);
    let text = cm.data.unwrap().remove("reflex.yaml").unwrap();
    let cfg = reflex::config::Config::parse(&text).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(cfg.store.url.as_deref().unwrap().starts_with("postgres://"));
    let password = cfg.store.password_file.unwrap();
    assert!(
        password.starts_with(&mount),
        "{} not under {mount}",
        password.display()
    );

    // Rendered whole when kubectl is at hand: three replicas, no volume claim.
    if let Ok(out) = Command::new("kubectl")
        .args(["kustomize"])
        .arg(&dir)
        .output()
        && out.status.success()
    {
        let rendered = String::from_utf8_lossy(&out.stdout);
        assert!(rendered.contains("replicas: 3"), "{rendered}");
        assert!(!rendered.contains("PersistentVolumeClaim"), "{rendered}");
        assert!(rendered.contains("kind: PodDisruptionBudget"), "{rendered}");
    }
}

/// The `helm` binary: `REFLEX_HELM` (scripts/test fetches Helm 3.17 into target/tools), else
/// one on the PATH.
fn helm() -> String {
    std::env::var("REFLEX_HELM").unwrap_or_else(|_| {
        let found = Command::new("helm").arg("version").output();
        assert!(
            found.is_ok_and(|o| o.status.success()),
            "helm 3 is needed: scripts/test fetches it (REFLEX_HELM), or put helm on the PATH"
        );
        "helm".into()
    })
}

/// `helm template` of the chart with these `--set`s: every rendered document, or helm's error.
fn render(sets: &[&str]) -> Result<Vec<Value>, String> {
    let mut cmd = Command::new(helm());
    cmd.args(["template", "r", "--namespace", "reflex"])
        .arg(repo("deploy/helm/reflex"));
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    let text = String::from_utf8(out.stdout).unwrap();
    Ok(serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect())
}

/// Every rendered object parsed as the Kubernetes type of its kind; the kinds in order.
fn typed_all(docs: &[Value]) -> Vec<String> {
    use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    let file = repo("deploy/helm/reflex");
    let mut kinds: Vec<String> = docs
        .iter()
        .map(|doc| {
            let kind = doc["kind"].as_str().unwrap().to_string();
            match kind.as_str() {
                "ServiceAccount" => drop(typed::<ServiceAccount>(doc, &file)),
                "ClusterRole" => drop(typed::<ClusterRole>(doc, &file)),
                "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(doc, &file)),
                "RoleBinding" => drop(typed::<RoleBinding>(doc, &file)),
                "ConfigMap" => drop(typed::<ConfigMap>(doc, &file)),
                "Deployment" => drop(typed::<Deployment>(doc, &file)),
                "PersistentVolumeClaim" => drop(typed::<PersistentVolumeClaim>(doc, &file)),
                "Service" => drop(typed::<Service>(doc, &file)),
                "PodDisruptionBudget" => drop(typed::<PodDisruptionBudget>(doc, &file)),
                "Ingress" => drop(typed::<Ingress>(doc, &file)),
                "NetworkPolicy" => drop(typed::<NetworkPolicy>(doc, &file)),
                // The Prometheus Operator's kinds have no k8s-openapi type.
                "ServiceMonitor" | "PrometheusRule" => {
                    assert_eq!(doc["apiVersion"], "monitoring.coreos.com/v1")
                }
                other => panic!("unexpected kind {other}"),
            }
            kind
        })
        .collect();
    kinds.sort();
    kinds
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// The reflex.yaml the chart renders, loaded as the daemon loads it.
fn rendered_config(docs: &[Value]) -> reflex::config::Config {
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["data"]["reflex.yaml"].is_string())
        .unwrap();
    let text = cm["data"]["reflex.yaml"].as_str().unwrap();
    reflex::config::Config::parse(text).unwrap_or_else(|e| panic!("{e:?}\n{text}"))
}

#[test]
fn the_helm_chart_lints_and_renders_single_and_ha_modes_into_valid_objects() {
    let chart = repo("deploy/helm/reflex");
    let ha_sets = [
        "store.url=postgres://reflex@db.reflex.svc:5432/reflex",
        "replicaCount=3",
        "ingress.enabled=true",
        "serviceMonitor.enabled=true",
        "prometheusRule.enabled=true",
        "networkPolicy.enabled=true",
        "rbac.scope=namespaced",
        "rbac.namespaces={shop,web}",
        "ssh.existingSecret=reflex-ssh",
    ];
    for sets in [&[][..], &ha_sets[..]] {
        let mut lint = Command::new(helm());
        lint.args(["lint", "--strict"]).arg(&chart);
        for s in sets {
            lint.args(["--set", s]);
        }
        let out = lint.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // Single mode: one replica on SQLite on its own claim, never two writers.
    let single = render(&[]).unwrap();
    assert_eq!(
        typed_all(&single),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "PersistentVolumeClaim",
            "Service",
            "ServiceAccount"
        ]
    );
    let d: Deployment = typed(find(&single, "Deployment"), &chart);
    let spec = d.spec.unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.strategy.unwrap().type_.as_deref(), Some("Recreate"));
    let image = &spec.template.spec.unwrap().containers[0].image;
    assert_eq!(
        image.as_deref(),
        Some("reflex:0.1.0"),
        "no placeholder registry"
    );
    let cfg = rendered_config(&single);
    assert!(cfg.store.url.is_none());
    assert_eq!(cfg.auth.tokens.len(), 3);
    // The chart's role is deploy/kubernetes/base/rbac.yaml's, one source.
    let base = docs(&repo("deploy/kubernetes/base/rbac.yaml"));
    assert_eq!(find(&single, "ClusterRole")["rules"], base[0]["rules"]);

    // HA mode: replicas on PostgreSQL, spread, a disruption budget, no claim; the options on.
    let ha = render(&ha_sets).unwrap();
    assert_eq!(
        typed_all(&ha),
        [
            "ClusterRole",
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "Ingress",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "PrometheusRule",
            "RoleBinding",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "ServiceMonitor"
        ]
    );
    let d: Deployment = typed(find(&ha, "Deployment"), &chart);
    let spec = d.spec.unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(
        spec.strategy.unwrap().type_.as_deref(),
        Some("RollingUpdate")
    );
    let pod = spec.template.spec.unwrap();
    assert!(pod.affinity.unwrap().pod_anti_affinity.is_some());
    let mounts: Vec<String> = (pod.containers[0].volume_mounts.clone().unwrap().into_iter())
        .map(|m| m.mount_path)
        .collect();
    let cfg = rendered_config(&ha);
    assert!(cfg.store.url.as_deref().unwrap().starts_with("postgres://"));
    let password = cfg.store.password_file.unwrap();
    assert!(
        mounts.iter().any(|m| password.starts_with(m)),
        "{password:?} not in {mounts:?}"
    );
    let key = cfg.ssh.identity_file.unwrap();
    assert!(
        mounts.iter().any(|m| key.starts_with(m)),
        "{key:?} not in {mounts:?}"
    );
    let namespaces: Vec<&str> = (ha.iter())
        .filter(|d| d["kind"] == "RoleBinding")
        .map(|d| d["metadata"]["namespace"].as_str().unwrap())
        .collect();
    assert_eq!(namespaces, ["shop", "web"]);
    // The PrometheusRule's groups are deploy/prometheus/reflex-rules.yaml's, one source.
    let rules = docs(&repo("deploy/prometheus/reflex-rules.yaml"));
    assert_eq!(
        find(&ha, "PrometheusRule")["spec"]["groups"],
        rules[0]["groups"]
    );
    let paths: Vec<&str> = (find(&ha, "Ingress")["spec"]["rules"][0]["http"]["paths"]
        .as_array()
        .unwrap()
        .iter())
    .map(|p| p["path"].as_str().unwrap())
    .collect();
    assert_eq!(
        paths,
        ["/ui", "/api/v1"],
        "the console and the chat callbacks"
    );

    // Several replicas on one SQLite file cannot work: the render says so.
    let e = render(&["replicaCount=2"]).unwrap_err();
    assert!(e.contains("replicaCount > 1 needs store.url"), "{e}");
    let e = render(&["tokens.list[0].role=root"]).unwrap_err();
    assert!(
        e.contains("values don't meet the specifications of the schema"),
        "{e}"
    );
}
