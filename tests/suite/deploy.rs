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
