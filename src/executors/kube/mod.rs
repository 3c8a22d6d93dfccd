//! `kube.*`: actions on Kubernetes through kube-rs, each recording the state before and after.
//!
//! Names and namespaces come from templates, so from alert labels: they are validated as
//! Kubernetes names before any request. Read-modify-write actions carry the object's
//! `resourceVersion`, and a conflict (409) with a concurrent writer is retried from a fresh
//! read a bounded number of times. Forbidden (403) is reported as such: the fix is the RBAC
//! role in `deploy/kubernetes/`, not a retry.

mod capacity;
mod evidence;
pub mod guard;

/// The facts a `kube.delete_pod` guard may name.
const POD_FACTS: &[&str] = &["ready_fraction", "ready_after", "desired"];
/// The facts a `kube.cordon` / `kube.drain` guard may name.
const NODE_FACTS: &[&str] = &["schedulable_nodes_after", "nodes"];
/// The facts a `kube.restart` guard may name.
const RESTART_FACTS: &[&str] = &["ready_fraction", "ready", "desired"];
mod traffic;

pub use traffic::{LIMIT_BURST, LIMIT_CONNECTIONS, LIMIT_RPS};

use super::{ExecError, Executor, StepContext};
use crate::config::KubeConfig;
use crate::playbook::actions::{
    Action, KubeCircuitBreakArgs, KubeDescribeArgs, KubeDrainArgs, KubeEventsArgs,
    KubeExpandPvcArgs, KubeFailoverArgs, KubeHistoryArgs, KubeLogsArgs, KubeNodeArgs,
    KubePatchArgs, KubePodArgs, KubeRateLimitArgs, KubeRollbackArgs, KubeScaleArgs,
    KubeWorkloadArgs, Replicas,
};
use crate::playbook::namespace_matches;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The annotation the deployment controller keeps the revision in.
pub const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";
/// The annotation `kubectl rollout restart` sets on the pod template.
pub const RESTARTED_AT_ANNOTATION: &str = "kubectl.kubernetes.io/restartedAt";
/// Field manager recorded on Reflex's patches.
pub const FIELD_MANAGER: &str = "reflex";

/// Kubernetes names (RFC 1123 subdomain): lowercase alphanumerics, `-` and `.`, at most 253,
/// starting and ending alphanumeric.
pub fn valid_name(s: &str) -> bool {
    let ok_ends = s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit());
    !s.is_empty()
        && s.len() <= 253
        && ok_ends
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

/// Namespaces (RFC 1123 label): as names, without `.`, at most 63.
pub fn valid_namespace(s: &str) -> bool {
    s.len() <= 63 && !s.contains('.') && valid_name(s)
}

fn check_name(what: &str, s: &str) -> Result<(), ExecError> {
    if valid_name(s) {
        Ok(())
    } else {
        Err(ExecError::Refused(format!(
            "{what} {s:?} is not a valid Kubernetes name"
        )))
    }
}

fn check_namespace(s: &str) -> Result<(), ExecError> {
    if valid_namespace(s) {
        Ok(())
    } else {
        Err(ExecError::Refused(format!(
            "namespace {s:?} is not a valid Kubernetes namespace"
        )))
    }
}

/// Maps a kube error to a step error, saying what it was about.
fn api_err(what: &str, e: kube::Error) -> ExecError {
    match e {
        kube::Error::Api(s) if s.code == 403 => {
            ExecError::Refused(format!("{what}: forbidden by RBAC: {}", s.message))
        }
        kube::Error::Api(s) if s.code == 404 => ExecError::Failed(format!("{what}: not found")),
        kube::Error::Api(s) => ExecError::Failed(format!("{what}: {} ({})", s.message, s.code)),
        e @ (kube::Error::HyperError(_) | kube::Error::Service(_)) => {
            ExecError::Unreachable(format!("{what}: {}", super::error_chain(&e)))
        }
        other => ExecError::Failed(format!("{what}: {}", super::error_chain(&other))),
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// The kube executor: one client per cluster, made on first use.
pub struct KubeExecutor {
    cfg: KubeConfig,
    /// By cluster, and whether kube-rs retries 429, 503 and 504 answers by itself.
    clients: tokio::sync::Mutex<HashMap<(String, bool), Client>>,
    /// The API server URL of each cluster a client was made for, for error messages.
    urls: std::sync::Mutex<HashMap<String, String>>,
}

impl KubeExecutor {
    /// From the `kubernetes:` config.
    pub fn new(cfg: KubeConfig) -> Self {
        KubeExecutor {
            cfg,
            clients: tokio::sync::Mutex::new(HashMap::new()),
            urls: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn cluster_name(&self, cluster: Option<&str>) -> Result<String, ExecError> {
        let name = cluster
            .map(str::to_string)
            .or_else(|| self.cfg.default_cluster.clone())
            .or_else(|| {
                (self.cfg.clusters.len() == 1)
                    .then(|| self.cfg.clusters.keys().next().cloned())
                    .flatten()
            })
            .unwrap_or_else(|| "default".into());
        if !self.cfg.clusters.is_empty() && !self.cfg.clusters.contains_key(&name) {
            return Err(ExecError::Refused(format!(
                "cluster {name:?} is not configured (kubernetes.clusters)"
            )));
        }
        Ok(name)
    }

    /// The client of a cluster. It retries the answers that say "later" (429, 503, 504) a
    /// bounded number of times, as kube-rs does by default.
    pub async fn client(&self, cluster: Option<&str>) -> Result<Client, ExecError> {
        self.client_with(cluster, true).await
    }

    /// A client of a cluster that hands a 429 back at once: for evictions, where a 429 is a
    /// disruption budget's answer, waited on by the step within its own timeout.
    async fn client_without_retries(&self, cluster: Option<&str>) -> Result<Client, ExecError> {
        self.client_with(cluster, false).await
    }

    async fn client_with(&self, cluster: Option<&str>, retry: bool) -> Result<Client, ExecError> {
        let name = self.cluster_name(cluster)?;
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(&(name.clone(), retry)) {
            return Ok(c.clone());
        }
        let config = match self.cfg.clusters.get(&name) {
            None => kube::Config::infer()
                .await
                .map_err(|e| ExecError::Failed(format!("cluster {name}: {e}")))?,
            Some(c) if c.in_cluster => kube::Config::incluster()
                .map_err(|e| ExecError::Failed(format!("cluster {name}: {e}")))?,
            Some(c) => {
                let options = kube::config::KubeConfigOptions {
                    context: c.context.clone(),
                    ..Default::default()
                };
                let kubeconfig = match &c.kubeconfig {
                    Some(path) => kube::config::Kubeconfig::read_from(path),
                    None => kube::config::Kubeconfig::read(),
                }
                .map_err(|e| ExecError::Failed(format!("cluster {name}: {e}")))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .map_err(|e| ExecError::Failed(format!("cluster {name}: {e}")))?
            }
        };
        self.urls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), config.cluster_url.to_string());
        let mut config = config;
        config.default_retry = retry;
        let client = Client::try_from(config)
            .map_err(|e| ExecError::Failed(format!("cluster {name}: {e}")))?;
        clients.insert((name, retry), client.clone());
        Ok(client)
    }

    /// Whether a cluster of that name can be reached at all, known without a request: a
    /// configured one, or (with none configured) a kubeconfig or in-cluster service account.
    fn check_cluster(&self, cluster: Option<&str>) -> Result<(), ExecError> {
        let name = self.cluster_name(cluster)?;
        if !self.cfg.clusters.is_empty() {
            return Ok(());
        }
        static INFERABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let inferable = *INFERABLE.get_or_init(|| {
            std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
                || kube::config::Kubeconfig::read().is_ok()
        });
        if inferable {
            Ok(())
        } else {
            Err(ExecError::Refused(format!(
                "no Kubernetes cluster is configured for {name:?}: kubernetes.clusters is empty \
                 and there is no kubeconfig (KUBECONFIG, ~/.kube/config) or in-cluster service \
                 account"
            )))
        }
    }

    /// Whether steps may act in `namespace` on `cluster`: checked before any request.
    pub fn check_scope(&self, cluster: Option<&str>, namespace: &str) -> Result<(), ExecError> {
        let name = self.cluster_name(cluster)?;
        let allowed = (self.cfg.clusters.get(&name))
            .and_then(|c| c.allowed_namespaces.as_ref())
            .unwrap_or(&self.cfg.allowed_namespaces);
        let exact = allowed.iter().any(|a| a == namespace);
        if !exact && self.protected(namespace) {
            return Err(ExecError::Refused(format!(
                "namespace {namespace:?} is protected (kubernetes.protected_namespaces: the \
                 control plane's and Reflex's own); name it in allowed_namespaces to act there"
            )));
        }
        if !allowed.is_empty() && !allowed.iter().any(|a| namespace_matches(a, namespace)) {
            return Err(ExecError::Refused(format!(
                "namespace {namespace:?} is not in the allowed namespaces of cluster {name:?} \
                 ({})",
                allowed.join(", ")
            )));
        }
        Ok(())
    }

    fn protected(&self, namespace: &str) -> bool {
        self.cfg.protected_namespaces.iter().any(|p| p == namespace)
            || own_namespace().is_some_and(|own| own == namespace)
    }

    fn retries(&self) -> u32 {
        self.cfg.max_conflict_retries
    }

    async fn scale(&self, a: KubeScaleArgs) -> Result<Value, ExecError> {
        check_namespace(&a.namespace)?;
        check_name("name", &a.name)?;
        let want = Replicas::parse(&a.replicas).map_err(ExecError::InvalidArgs)?;
        if !matches!(want, Replicas::Absolute(_)) && a.max.is_none() {
            return Err(ExecError::InvalidArgs(
                "relative or factor scaling needs `max`".into(),
            ));
        }
        let client = self.client(a.cluster.as_deref()).await?;
        match a.kind.as_str() {
            "Deployment" => {
                scale_in(
                    Api::<Deployment>::namespaced(client, &a.namespace),
                    &a,
                    want,
                    self.retries(),
                )
                .await
            }
            "StatefulSet" => {
                scale_in(
                    Api::<StatefulSet>::namespaced(client, &a.namespace),
                    &a,
                    want,
                    self.retries(),
                )
                .await
            }
            other => Err(ExecError::InvalidArgs(format!(
                "kind {other:?}: kube.scale takes Deployment or StatefulSet"
            ))),
        }
    }

    async fn rollback(&self, a: KubeRollbackArgs, timeout: Duration) -> Result<Value, ExecError> {
        check_namespace(&a.namespace)?;
        check_name("name", &a.name)?;
        let client = self.client(a.cluster.as_deref()).await?;
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &a.namespace);
        let replicasets: Api<ReplicaSet> = Api::namespaced(client, &a.namespace);
        let what = format!("deployment {}/{}", a.namespace, a.name);
        let mut attempt = 0;
        let (from, to, generation) = loop {
            let mut d = deployments
                .get(&a.name)
                .await
                .map_err(|e| api_err(&what, e))?;
            let (from, to, template) = rollback_target(&d, &replicasets, a.to_revision)
                .await
                .map_err(|e| match e {
                    Ok(msg) => ExecError::Failed(format!("{what}: {msg}")),
                    Err(e) => api_err(&format!("replicasets of {what}"), e),
                })?;
            if let Some(want) = a.expect_revision.filter(|want| *want != from) {
                return Err(ExecError::Refused(format!(
                    "{what}: it is at revision {from} now, not {want}: deployed since; nothing \
                     was rolled"
                )));
            }
            let spec = d
                .spec
                .as_mut()
                .ok_or_else(|| ExecError::Failed(format!("{what} has no spec")))?;
            spec.template = template;
            // `replace` carries the resourceVersion we read: a concurrent change is a 409.
            match deployments
                .replace(&a.name, &PostParams::default(), &d)
                .await
            {
                Ok(after) => break (from, to, after.metadata.generation.unwrap_or(0)),
                Err(e) if is_conflict(&e) && attempt < self.retries() => attempt += 1,
                Err(e) => return Err(api_err(&what, e)),
            }
        };
        let mut out = json!({ "deployment": what, "from_revision": from, "to_revision": to, "conflicts_retried": attempt });
        if a.wait {
            let deadline =
                tokio::time::Instant::now() + timeout.saturating_sub(Duration::from_secs(1));
            loop {
                let d = deployments
                    .get(&a.name)
                    .await
                    .map_err(|e| api_err(&what, e))?;
                if rollout_complete(&d, generation) {
                    out["rollout"] = json!("complete");
                    // The revision the rollback left, which an undo checks is still there.
                    out["revision_after"] = json!(revision(&d.metadata));
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(ExecError::Failed(format!(
                        "{what}: rolled back to revision {to}, but the rollout did not complete in time"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Ok(out)
    }

    async fn restart(&self, a: KubeWorkloadArgs) -> Result<Value, ExecError> {
        check_namespace(&a.namespace)?;
        check_name("name", &a.name)?;
        let client = self.client(a.cluster.as_deref()).await?;
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let patch = json!({ "spec": { "template": { "metadata": { "annotations": { RESTARTED_AT_ANNOTATION: now } } } } });
        match a.kind.as_str() {
            "Deployment" => {
                restart_in(
                    Api::<Deployment>::namespaced(client, &a.namespace),
                    &a,
                    &patch,
                )
                .await
            }
            "StatefulSet" => {
                restart_in(
                    Api::<StatefulSet>::namespaced(client, &a.namespace),
                    &a,
                    &patch,
                )
                .await
            }
            "DaemonSet" => {
                restart_in(
                    Api::<DaemonSet>::namespaced(client, &a.namespace),
                    &a,
                    &patch,
                )
                .await
            }
            other => Err(ExecError::InvalidArgs(format!(
                "kind {other:?}: kube.restart takes Deployment, StatefulSet or DaemonSet"
            ))),
        }
    }

    async fn delete_pod(&self, a: KubePodArgs) -> Result<Value, ExecError> {
        check_namespace(&a.namespace)?;
        check_name("pod", &a.name)?;
        let pods: Api<Pod> =
            Api::namespaced(self.client(a.cluster.as_deref()).await?, &a.namespace);
        let what = format!("pod {}/{}", a.namespace, a.name);
        let before = pods.get(&a.name).await.map_err(|e| api_err(&what, e))?;
        let guarded = match &a.guard {
            Some(text) => {
                let conditions = guard::parse(text, POD_FACTS).map_err(ExecError::InvalidArgs)?;
                let facts = self.pod_facts(&a, &before).await?;
                let (record, verdict) = guard::check(text, &conditions, &facts);
                if let Err(why) = verdict {
                    return Err(ExecError::FailedWith(
                        why,
                        json!({ "pod": what, "guard": record }),
                    ));
                }
                Some(record)
            }
            None => None,
        };
        pods.delete(&a.name, &DeleteParams::default())
            .await
            .map_err(|e| api_err(&what, e))?;
        Ok(json!({
            "guard": guarded,
            "pod": what,
            "before": {
                "phase": before.status.as_ref().and_then(|s| s.phase.clone()),
                "node": before.spec.as_ref().and_then(|s| s.node_name.clone()),
                "uid": before.metadata.uid,
            },
            "after": "deleted",
        }))
    }

    /// What a delete would leave of the pod's workload (its Deployment, through the
    /// ReplicaSet that owns it, or its StatefulSet): `desired` replicas, `ready_after` (the
    /// ready ones, less this pod if it is ready) and `ready_fraction` (the one over the other).
    async fn pod_facts(
        &self,
        a: &KubePodArgs,
        pod: &Pod,
    ) -> Result<serde_json::Map<String, Value>, ExecError> {
        let client = self.client(a.cluster.as_deref()).await?;
        let owner =
            (pod.metadata.owner_references.iter().flatten()).find(|o| o.controller == Some(true));
        let no_owner = || {
            ExecError::Refused(format!(
                "pod {}/{} has no Deployment or StatefulSet owning it: its guard cannot be read",
                a.namespace, a.name
            ))
        };
        let (desired, ready) = match owner.map(|o| (o.kind.as_str(), o.name.clone())) {
            Some(("ReplicaSet", rs)) => {
                let sets = Api::<ReplicaSet>::namespaced(client.clone(), &a.namespace);
                let list = (sets.list(&ListParams::default()).await)
                    .map_err(|e| api_err("replicasets", e))?;
                let deployment = (list.items.iter())
                    .find(|r| r.metadata.name.as_deref() == Some(rs.as_str()))
                    .and_then(|r| {
                        r.metadata
                            .owner_references
                            .iter()
                            .flatten()
                            .find(|o| o.kind == "Deployment")
                    })
                    .map(|o| o.name.clone())
                    .ok_or_else(no_owner)?;
                let d = Api::<Deployment>::namespaced(client, &a.namespace);
                let d = (d.get(&deployment).await)
                    .map_err(|e| api_err(&format!("deployment {deployment}"), e))?;
                (
                    d.spec.and_then(|s| s.replicas).unwrap_or(1),
                    d.status.and_then(|s| s.ready_replicas).unwrap_or(0),
                )
            }
            Some(("StatefulSet", name)) => {
                let s = Api::<StatefulSet>::namespaced(client, &a.namespace);
                let s =
                    (s.get(&name).await).map_err(|e| api_err(&format!("statefulset {name}"), e))?;
                (
                    s.spec.and_then(|s| s.replicas).unwrap_or(1),
                    s.status.and_then(|s| s.ready_replicas).unwrap_or(0),
                )
            }
            _ => return Err(no_owner()),
        };
        let this_ready = (pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten())
        .any(|c| c.type_ == "Ready" && c.status == "True");
        let ready_after = (ready - i32::from(this_ready)).max(0);
        let mut facts = serde_json::Map::new();
        facts.insert("desired".into(), json!(desired));
        facts.insert("ready_after".into(), json!(ready_after));
        let fraction = if desired > 0 {
            f64::from(ready_after) / f64::from(desired)
        } else {
            0.0
        };
        facts.insert("ready_fraction".into(), json!(fraction));
        Ok(facts)
    }

    async fn cordon(&self, a: KubeNodeArgs, unschedulable: bool) -> Result<Value, ExecError> {
        check_name("node", &a.node)?;
        let nodes: Api<Node> = Api::all(self.client(a.cluster.as_deref()).await?);
        let what = format!("node {}", a.node);
        let before = nodes.get(&a.node).await.map_err(|e| api_err(&what, e))?;
        let was = before
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        if was == unschedulable {
            return Ok(
                json!({ "node": a.node, "before": { "unschedulable": was }, "after": { "unschedulable": was }, "changed": false }),
            );
        }
        let mut guarded = None;
        if unschedulable {
            // The floor always; the playbook's guard besides.
            let text = match &a.guard {
                Some(g) => format!("{} && {g}", guard::NODE_FLOOR),
                None => guard::NODE_FLOOR.to_string(),
            };
            let conditions = guard::parse(&text, NODE_FACTS).map_err(ExecError::InvalidArgs)?;
            let all =
                (nodes.list(&ListParams::default()).await).map_err(|e| api_err("nodes", e))?;
            let cordoned = |n: &Node| {
                n.spec
                    .as_ref()
                    .and_then(|s| s.unschedulable)
                    .unwrap_or(false)
            };
            let total = all.items.len().max(1) as f64;
            let after = all
                .items
                .iter()
                .filter(|n| !cordoned(n) && n.metadata.name.as_deref() != Some(&a.node))
                .count();
            let mut facts = serde_json::Map::new();
            facts.insert("nodes".into(), json!(all.items.len()));
            facts.insert(
                "schedulable_nodes_after".into(),
                json!(after as f64 / total),
            );
            let (record, verdict) = guard::check(&text, &conditions, &facts);
            if let Err(why) = verdict {
                return Err(ExecError::FailedWith(
                    why,
                    json!({ "node": a.node, "guard": record }),
                ));
            }
            guarded = Some(record);
        }
        let patch = json!({ "spec": { "unschedulable": unschedulable } });
        let after = nodes
            .patch(
                &a.node,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| api_err(&what, e))?;
        let now = after
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        Ok(
            json!({ "node": a.node, "before": { "unschedulable": was }, "after": { "unschedulable": now }, "changed": true, "guard": guarded }),
        )
    }

    async fn patch(&self, a: KubePatchArgs) -> Result<Value, ExecError> {
        check_name("name", &a.name)?;
        if let Some(ns) = &a.namespace {
            check_namespace(ns)?;
        }
        if !a.patch.is_object() || a.expect.as_ref().is_some_and(|e| !e.is_object()) {
            return Err(ExecError::InvalidArgs(
                "`patch` and `expect` must be maps (a JSON merge patch, the fields it expects)"
                    .into(),
            ));
        }
        let (group, version) = match a.api_version.split_once('/') {
            Some((g, v)) => (g.to_string(), v.to_string()),
            None => (String::new(), a.api_version.clone()),
        };
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(&group, &version, &a.kind));
        let client = self.client(a.cluster.as_deref()).await?;
        let api: Api<DynamicObject> = match &a.namespace {
            Some(ns) => Api::namespaced_with(client, ns, &resource),
            None => Api::all_with(client, &resource),
        };
        let what = evidence::object_name(&a.kind, a.namespace.as_deref(), &a.name);
        let before = api.get(&a.name).await.map_err(|e| api_err(&what, e))?;
        let rv = before.metadata.resource_version.clone();
        let before = serde_json::to_value(&before).unwrap_or_default();
        let mut patch = a.patch.clone();
        if let Some(expect) = &a.expect {
            if let Some((field, now, want)) = difference(expect, &before, "") {
                return Err(ExecError::Refused(format!(
                    "{what}: {field} is {now} now, not {want}: it changed since; nothing was patched"
                )));
            }
            // What was checked is what is patched: a change in between is a 409.
            patch["metadata"]["resourceVersion"] = json!(rv);
        }
        let after = api
            .patch(
                &a.name,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| api_err(&what, e))?;
        let after = serde_json::to_value(&after).unwrap_or_default();
        Ok(
            json!({ "object": what, "before": pick(&before, &a.patch), "after": pick(&after, &a.patch) }),
        )
    }
}

/// The first field where `obj` differs from `expect` (each of whose leaves names a field and the
/// value it should have; `null`: absent): its dotted path, its value now, the value expected.
fn difference(expect: &Value, obj: &Value, path: &str) -> Option<(String, Value, Value)> {
    match expect {
        Value::Object(fields) => fields.iter().find_map(|(k, want)| {
            let here = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            difference(want, obj.get(k).unwrap_or(&Value::Null), &here)
        }),
        want if want != obj => Some((path.to_string(), obj.clone(), want.clone())),
        _ => None,
    }
}

/// The parts of `obj` that `patch` touches: what a merge patch changed, before or after.
fn pick(obj: &Value, patch: &Value) -> Value {
    match patch {
        Value::Object(p) => Value::Object(
            p.iter()
                .map(|(k, v)| (k.clone(), pick(obj.get(k).unwrap_or(&Value::Null), v)))
                .collect(),
        ),
        _ => obj.clone(),
    }
}

async fn scale_in<K>(
    api: Api<K>,
    a: &KubeScaleArgs,
    want: Replicas,
    retries: u32,
) -> Result<Value, ExecError>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    <K as Resource>::DynamicType: Default,
{
    let what = format!("{} {}/{}", a.kind, a.namespace, a.name);
    let mut attempt = 0;
    loop {
        let mut scale = api
            .get_scale(&a.name)
            .await
            .map_err(|e| api_err(&what, e))?;
        let current = scale.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        let target = want.target(current, a.min, a.max);
        if target == current {
            return Ok(
                json!({ "object": what, "before": { "replicas": current }, "after": { "replicas": current }, "changed": false }),
            );
        }
        scale.spec.get_or_insert_with(Default::default).replicas = Some(target);
        // The scale carries the resourceVersion we read: a concurrent change is a 409.
        match api
            .replace_scale(&a.name, &PostParams::default(), &scale)
            .await
        {
            Ok(after) => {
                let now = after.spec.and_then(|s| s.replicas).unwrap_or(target);
                return Ok(json!({
                    "object": what,
                    "before": { "replicas": current },
                    "after": { "replicas": now },
                    "changed": true,
                    "conflicts_retried": attempt,
                }));
            }
            Err(e) if is_conflict(&e) && attempt < retries => attempt += 1,
            Err(e) => return Err(api_err(&what, e)),
        }
    }
}

async fn restart_in<K>(api: Api<K>, a: &KubeWorkloadArgs, patch: &Value) -> Result<Value, ExecError>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + serde::Serialize,
    <K as Resource>::DynamicType: Default,
{
    let what = format!("{} {}/{}", a.kind, a.namespace, a.name);
    let annotation = |o: &K| -> Value {
        let v = serde_json::to_value(o).unwrap_or_default();
        v["spec"]["template"]["metadata"]["annotations"][RESTARTED_AT_ANNOTATION].clone()
    };
    let before = api.get(&a.name).await.map_err(|e| api_err(&what, e))?;
    let guarded = match &a.guard {
        Some(text) => {
            let conditions = guard::parse(text, RESTART_FACTS).map_err(ExecError::InvalidArgs)?;
            // Ready over desired now: a rolling restart takes pods away one after another.
            let v = serde_json::to_value(&before).unwrap_or_default();
            let (desired, ready) = match a.kind.as_str() {
                "DaemonSet" => (
                    &v["status"]["desiredNumberScheduled"],
                    &v["status"]["numberReady"],
                ),
                _ => (&v["spec"]["replicas"], &v["status"]["readyReplicas"]),
            };
            let (desired, ready) = (desired.as_i64().unwrap_or(1), ready.as_i64().unwrap_or(0));
            let mut facts = serde_json::Map::new();
            facts.insert("desired".into(), json!(desired));
            facts.insert("ready".into(), json!(ready));
            let fraction = if desired > 0 {
                ready as f64 / desired as f64
            } else {
                0.0
            };
            facts.insert("ready_fraction".into(), json!(fraction));
            let (record, verdict) = guard::check(text, &conditions, &facts);
            if let Err(why) = verdict {
                return Err(ExecError::FailedWith(
                    why,
                    json!({ "object": what, "guard": record }),
                ));
            }
            Some(record)
        }
        None => None,
    };
    let after = api
        .patch(
            &a.name,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Merge(patch),
        )
        .await
        .map_err(|e| api_err(&what, e))?;
    Ok(json!({
        "object": what,
        "guard": guarded,
        "before": { "restartedAt": annotation(&before), "generation": before.meta().generation },
        "after": { "restartedAt": annotation(&after), "generation": after.meta().generation },
    }))
}

fn revision(meta: &kube::api::ObjectMeta) -> Option<i64> {
    meta.annotations
        .as_ref()?
        .get(REVISION_ANNOTATION)?
        .parse()
        .ok()
}

/// Like `kubectl rollout undo`: the ReplicaSets the Deployment owns, by revision; the target is
/// the given revision or the newest one before the current. Returns (from, to, template), or
/// `Err(Ok(reason))` when there is nothing to roll back to.
async fn rollback_target(
    d: &Deployment,
    replicasets: &Api<ReplicaSet>,
    to_revision: Option<i64>,
) -> Result<(i64, i64, k8s_openapi::api::core::v1::PodTemplateSpec), Result<String, kube::Error>> {
    let uid = d.metadata.uid.clone().unwrap_or_default();
    let selector = d
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let list = replicasets
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(Err)?;
    let mut owned: Vec<(i64, ReplicaSet)> = list
        .items
        .into_iter()
        .filter(|rs| {
            rs.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.uid == uid && o.controller == Some(true))
        })
        .filter_map(|rs| Some((revision(&rs.metadata)?, rs)))
        .collect();
    owned.sort_by_key(|(r, _)| *r);
    let current = revision(&d.metadata)
        .or_else(|| owned.last().map(|(r, _)| *r))
        .unwrap_or(0);
    let target = match to_revision {
        Some(r) if r == current => {
            return Err(Ok(format!(
                "revision {r} is the current one; nothing to roll back"
            )));
        }
        Some(r) => owned.iter().find(|(rev, _)| *rev == r),
        None => owned.iter().rev().find(|(rev, _)| *rev < current),
    };
    let Some((to, rs)) = target else {
        return Err(Ok(match to_revision {
            Some(r) => format!("no revision {r} in its history"),
            None => format!("no revision before the current one ({current}) to roll back to"),
        }));
    };
    let mut template = rs
        .spec
        .as_ref()
        .and_then(|s| s.template.clone())
        .unwrap_or_default();
    // As kubectl does: the ReplicaSet's own hash label is not part of the Deployment's template.
    if let Some(labels) = template.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        labels.remove("pod-template-hash");
    }
    Ok((current, *to, template))
}

fn rollout_complete(d: &Deployment, generation: i64) -> bool {
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(s) = &d.status else { return false };
    s.observed_generation.unwrap_or(0) >= generation
        && s.updated_replicas.unwrap_or(0) == want
        && s.available_replicas.unwrap_or(0) == want
        && s.replicas.unwrap_or(0) == want
}

/// The namespace Reflex itself runs in, when it runs in a cluster.
fn own_namespace() -> Option<&'static str> {
    static OWN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    OWN.get_or_init(|| {
        std::env::var("POD_NAMESPACE").ok().or_else(|| {
            std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                .ok()
                .map(|s| s.trim().to_string())
        })
    })
    .as_deref()
}

/// One `kube.*` action bound to the shared executor.
pub struct KubeAction(pub Arc<KubeExecutor>, pub Action);

#[async_trait::async_trait]
impl Executor for KubeAction {
    fn validate(&self, ctx: &StepContext) -> Result<(), ExecError> {
        let (cluster, namespace, name) = match self.1 {
            Action::KubeScale => ctx
                .args::<KubeScaleArgs>()
                .map(|a| (a.cluster, Some(a.namespace), a.name))?,
            Action::KubeRollback => ctx
                .args::<KubeRollbackArgs>()
                .map(|a| (a.cluster, Some(a.namespace), a.name))?,
            Action::KubeRestart => {
                let a = ctx.args::<KubeWorkloadArgs>()?;
                if let Some(g) = &a.guard {
                    guard::parse(g, RESTART_FACTS).map_err(ExecError::InvalidArgs)?;
                }
                (a.cluster, Some(a.namespace), a.name)
            }
            Action::KubeDeletePod => {
                let a = ctx.args::<KubePodArgs>()?;
                if let Some(g) = &a.guard {
                    guard::parse(g, POD_FACTS).map_err(ExecError::InvalidArgs)?;
                }
                (a.cluster, Some(a.namespace), a.name)
            }
            Action::KubeCordon | Action::KubeUncordon => {
                let a = ctx.args::<KubeNodeArgs>()?;
                if let Some(g) = &a.guard {
                    guard::parse(g, NODE_FACTS).map_err(ExecError::InvalidArgs)?;
                }
                (a.cluster, None, a.node)
            }
            Action::KubePatch => ctx
                .args::<KubePatchArgs>()
                .map(|a| (a.cluster, a.namespace, a.name))?,
            Action::KubeFailover => ctx
                .args::<KubeFailoverArgs>()
                .map(|a| (a.cluster, Some(a.namespace), a.service))?,
            Action::KubeRateLimit => ctx
                .args::<KubeRateLimitArgs>()
                .map(|a| (a.cluster, Some(a.namespace), a.ingress))?,
            Action::KubeCircuitBreak => ctx
                .args::<KubeCircuitBreakArgs>()
                .map(|a| (a.cluster, Some(a.namespace), a.destination_rule))?,
            // A drain is the node's: it moves every pod off it (as `kubectl drain` does), and
            // disruption budgets, not namespaces, say what may go.
            Action::KubeDrain => {
                let a = ctx.args::<KubeDrainArgs>()?;
                if let Some(g) = &a.guard {
                    guard::parse(g, NODE_FACTS).map_err(ExecError::InvalidArgs)?;
                }
                (a.cluster, None, a.node)
            }
            Action::KubeExpandPvc => ctx
                .args::<KubeExpandPvcArgs>()
                .map(|a| (a.cluster, Some(a.namespace), a.pvc))?,
            Action::KubeLogs => ctx.args::<KubeLogsArgs>().map(|a| {
                let name = a.pod.unwrap_or_else(|| "selector".into());
                (a.cluster, Some(a.namespace), name)
            })?,
            Action::KubeEvents => ctx
                .args::<KubeEventsArgs>()
                .map(|a| (a.cluster, Some(a.namespace), a.name))?,
            Action::KubeDescribe => ctx
                .args::<KubeDescribeArgs>()
                .map(|a| (a.cluster, a.namespace, a.name))?,
            Action::KubeHistory => ctx
                .args::<KubeHistoryArgs>()
                .map(|a| (a.cluster, Some(a.namespace), a.deployment))?,
            _ => return Err(ExecError::InvalidArgs("not a kube action".into())),
        };
        check_name("name", &name)?;
        self.0.check_cluster(cluster.as_deref())?;
        if let Some(ns) = namespace {
            check_namespace(&ns)?;
            self.0.check_scope(cluster.as_deref(), &ns)?;
        }
        Ok(())
    }

    async fn execute(&self, ctx: &StepContext) -> Result<Value, ExecError> {
        let result = self.act(ctx).await;
        // Name the cluster and its URL when it could not be reached.
        result.map_err(|e| match e {
            ExecError::Unreachable(why) => {
                let cluster = (ctx.args.get("cluster").and_then(Value::as_str)).map(str::to_string);
                let name = self
                    .0
                    .cluster_name(cluster.as_deref())
                    .unwrap_or_else(|_| "?".into());
                let url = (self.0.urls.lock().unwrap_or_else(|p| p.into_inner()))
                    .get(&name)
                    .cloned()
                    .unwrap_or_default();
                ExecError::Unreachable(format!(
                    "cannot reach Kubernetes cluster {name:?} at {url}: {why}"
                ))
            }
            other => other,
        })
    }
}

impl KubeAction {
    async fn act(&self, ctx: &StepContext) -> Result<Value, ExecError> {
        match self.1 {
            Action::KubeScale => self.0.scale(ctx.args()?).await,
            Action::KubeRollback => self.0.rollback(ctx.args()?, ctx.timeout).await,
            Action::KubeRestart => self.0.restart(ctx.args()?).await,
            Action::KubeDeletePod => self.0.delete_pod(ctx.args()?).await,
            Action::KubeCordon => self.0.cordon(ctx.args()?, true).await,
            Action::KubeUncordon => self.0.cordon(ctx.args()?, false).await,
            Action::KubePatch => self.0.patch(ctx.args()?).await,
            Action::KubeFailover => self.0.failover(ctx.args()?).await,
            Action::KubeRateLimit => self.0.rate_limit(ctx.args()?).await,
            Action::KubeCircuitBreak => self.0.circuit_break(ctx.args()?).await,
            Action::KubeDrain => self.0.drain(ctx.args()?, ctx.timeout).await,
            Action::KubeExpandPvc => self.0.expand_pvc(ctx.args()?).await,
            Action::KubeLogs => self.0.logs(ctx).await,
            Action::KubeEvents => self.0.events(ctx.args()?).await,
            Action::KubeDescribe => self.0.describe(ctx.args()?).await,
            Action::KubeHistory => self.0.history(ctx.args()?).await,
            _ => Err(ExecError::InvalidArgs("not a kube action".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_names_are_checked() {
        for ok in ["api", "web-1", "a.b.c", "x"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "API",
            "-a",
            "a-",
            "a_b",
            "a/b",
            "a;rm",
            "../x",
            &"a".repeat(254),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(!valid_namespace("a.b"));
        assert!(!valid_namespace(&"a".repeat(64)));
    }
}
