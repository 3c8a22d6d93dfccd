//! Evidence: what the cluster shows about an alert's target, read without changing anything
//! (logs, events, state in brief, rollout history). Each output has a `summary`, a few lines a
//! person reads in the approval and in chat; long text (a log) is also attached whole as an
//! artifact.

use super::{KubeExecutor, api_err, check_name, check_namespace, revision};
use crate::executors::{ExecError, StepContext};
use crate::playbook::actions::{KubeDescribeArgs, KubeEventsArgs, KubeHistoryArgs, KubeLogsArgs};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{ContainerStatus, Event, Node, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ListParams, LogParams};
use serde_json::{Value, json};

/// Pods a selector's logs are read from at most.
const MAX_LOG_PODS: usize = 5;
/// Pods `kube.describe` of a workload lists at most.
const MAX_DESCRIBED_PODS: usize = 10;
/// Lines of a log in the step's summary; the artifact has them all.
const SUMMARY_LINES: usize = 20;
/// The annotation `kubectl` records a rollout's cause in.
const CHANGE_CAUSE: &str = "kubernetes.io/change-cause";

/// A label selector of `key=value` pairs (all a playbook needs, and nothing an alert label
/// could widen): each key and value checked as Kubernetes checks them.
fn equality_selector(s: &str) -> Result<String, ExecError> {
    let valid_value = |v: &str| {
        v.len() <= 63
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !v.starts_with(['-', '_', '.'])
            && !v.ends_with(['-', '_', '.'])
    };
    let valid_key = |k: &str| match k.rsplit_once('/') {
        Some((prefix, name)) => super::valid_name(prefix) && !name.is_empty() && valid_value(name),
        None => !k.is_empty() && valid_value(k),
    };
    let pairs: Vec<(&str, &str)> = s
        .split(',')
        .map(|kv| kv.trim().split_once('=').unwrap_or((kv, "\u{0}")))
        .collect();
    if pairs.is_empty() || pairs.iter().any(|(k, v)| !valid_key(k) || !valid_value(v)) {
        return Err(ExecError::Refused(format!(
            "selector {s:?} is not a list of label=value pairs"
        )));
    }
    Ok(pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(","))
}

/// A `matchLabels` selector as a query (`app=api,tier=web`).
fn selector_query(s: Option<&LabelSelector>) -> String {
    let labels = s.and_then(|s| s.match_labels.as_ref());
    (labels.into_iter().flatten())
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `Kind ns/name`, or `Kind name` for a cluster-scoped object.
pub(super) fn object_name(kind: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn images(spec: Option<&PodSpec>) -> Vec<String> {
    (spec.into_iter().flat_map(|s| s.containers.iter()))
        .filter_map(|c| c.image.clone())
        .collect()
}

/// A container's restarts and why it last ended.
fn container_view(c: &ContainerStatus) -> Value {
    let last = c.last_state.as_ref().and_then(|s| s.terminated.as_ref());
    let state = c.state.as_ref().map(|s| {
        if let Some(w) = &s.waiting {
            format!("waiting: {}", w.reason.as_deref().unwrap_or("?"))
        } else if let Some(t) = &s.terminated {
            format!("terminated: {}", t.reason.as_deref().unwrap_or("?"))
        } else {
            "running".to_string()
        }
    });
    json!({
        "name": c.name,
        "image": c.image,
        "ready": c.ready,
        "restarts": c.restart_count,
        "state": state,
        "last_termination": last.map(|t| json!({
            "reason": t.reason, "exit_code": t.exit_code, "finished_at": t.finished_at.as_ref().map(|x| x.0.to_string()),
        })),
    })
}

fn pod_view(p: &Pod) -> Value {
    let status = p.status.as_ref();
    let containers: Vec<Value> = (status.and_then(|s| s.container_statuses.as_ref()))
        .into_iter()
        .flatten()
        .map(container_view)
        .collect();
    json!({
        "name": p.metadata.name,
        "phase": status.and_then(|s| s.phase.clone()),
        "node": p.spec.as_ref().and_then(|s| s.node_name.clone()),
        "containers": containers,
    })
}

/// One line per pod: `api-1 Running, restarts 4 (last: OOMKilled, exit 137)`.
fn pod_line(p: &Value) -> String {
    let containers = p["containers"].as_array().cloned().unwrap_or_default();
    let restarts: i64 = containers
        .iter()
        .filter_map(|c| c["restarts"].as_i64())
        .sum();
    let last = (containers.iter())
        .filter_map(|c| c["last_termination"]["reason"].as_str().map(|r| (r, c)))
        .map(|(r, c)| format!(" (last: {r}, exit {})", c["last_termination"]["exit_code"]))
        .next()
        .unwrap_or_default();
    format!(
        "{} {}, restarts {restarts}{last}",
        p["name"].as_str().unwrap_or("?"),
        p["phase"].as_str().unwrap_or("?")
    )
}

/// An object's `status.conditions`, each as `{type, status, reason, message}`.
fn conditions(object: &Value) -> Vec<Value> {
    (object["status"]["conditions"].as_array().into_iter().flatten())
        .map(|c| {
            json!({ "type": c["type"], "status": c["status"], "reason": c["reason"], "message": c["message"] })
        })
        .collect()
}

/// A node in brief: ready, cordoned, under pressure, what it can hold.
fn node_view(name: &str, n: &Value) -> Value {
    let conditions = conditions(n);
    let unschedulable = n["spec"]["unschedulable"].as_bool().unwrap_or(false);
    let ready = (conditions.iter()).any(|c| c["type"] == "Ready" && c["status"] == "True");
    let pressure: Vec<&str> = (conditions.iter())
        .filter(|c| c["type"] != "Ready" && c["status"] == "True")
        .filter_map(|c| c["type"].as_str())
        .collect();
    let allocatable = &n["status"]["allocatable"];
    json!({
        "object": format!("Node {name}"),
        "ready": ready,
        "unschedulable": unschedulable,
        "conditions": conditions,
        "allocatable": { "cpu": allocatable["cpu"], "memory": allocatable["memory"] },
        "kubelet": n["status"]["nodeInfo"]["kubeletVersion"],
        "summary": format!(
            "node {name}: {}{}{}",
            if ready { "Ready" } else { "NotReady" },
            if unschedulable { ", cordoned" } else { "" },
            if pressure.is_empty() { String::new() } else { format!(", {}", pressure.join(", ")) },
        ),
    })
}

impl KubeExecutor {
    /// `kube.logs`.
    pub(super) async fn logs(&self, ctx: &StepContext) -> Result<Value, ExecError> {
        let a: KubeLogsArgs = ctx.args()?;
        check_namespace(&a.namespace)?;
        if let Some(c) = &a.container {
            check_name("container", c)?;
        }
        let pods: Api<Pod> =
            Api::namespaced(self.client(a.cluster.as_deref()).await?, &a.namespace);
        let names: Vec<String> = match (&a.pod, &a.selector) {
            (Some(pod), _) => {
                check_name("pod", pod)?;
                vec![pod.clone()]
            }
            (None, Some(selector)) => {
                let selector = equality_selector(selector)?;
                let what = format!("pods {selector} in {}", a.namespace);
                let list = pods
                    .list(&ListParams::default().labels(&selector))
                    .await
                    .map_err(|e| api_err(&what, e))?;
                let mut names: Vec<String> = list
                    .items
                    .into_iter()
                    .filter_map(|p| p.metadata.name)
                    .collect();
                names.sort();
                names.truncate(MAX_LOG_PODS);
                if names.is_empty() {
                    return Err(ExecError::Failed(format!("{what}: no pod matches")));
                }
                names
            }
            (None, None) => {
                return Err(ExecError::InvalidArgs("name `pod` or `selector`".into()));
            }
        };
        let params = LogParams {
            container: a.container.clone(),
            tail_lines: Some(i64::from(a.lines)),
            previous: a.previous,
            ..Default::default()
        };
        let (mut whole, mut read, mut summary) = (String::new(), Vec::new(), Vec::new());
        for name in &names {
            let what = format!("log of pod {}/{name}", a.namespace);
            let text = pods
                .logs(name, &params)
                .await
                .map_err(|e| api_err(&what, e))?;
            let lines = text.lines().count();
            if names.len() > 1 {
                whole.push_str(&format!("==> {name} <==\n"));
                summary.push(format!("==> {name} <=="));
            }
            whole.push_str(&text);
            if !text.ends_with('\n') && !text.is_empty() {
                whole.push('\n');
            }
            summary.push(last_lines(&text, SUMMARY_LINES / names.len()));
            read.push(json!({ "pod": name, "lines": lines }));
        }
        ctx.artifacts
            .attach("logs.txt", "text/plain; charset=utf-8", whole.into_bytes());
        Ok(json!({
            "namespace": a.namespace,
            "container": a.container,
            "previous": a.previous,
            "pods": read,
            "summary": summary.join("\n"),
        }))
    }

    /// `kube.events`.
    pub(super) async fn events(&self, a: KubeEventsArgs) -> Result<Value, ExecError> {
        check_namespace(&a.namespace)?;
        check_name("name", &a.name)?;
        if !a.kind.chars().all(|c| c.is_ascii_alphanumeric()) || a.kind.is_empty() {
            return Err(ExecError::Refused(format!(
                "kind {:?} is not a Kubernetes kind",
                a.kind
            )));
        }
        let events: Api<Event> =
            Api::namespaced(self.client(a.cluster.as_deref()).await?, &a.namespace);
        let what = format!("events of {} {}/{}", a.kind, a.namespace, a.name);
        let fields = format!(
            "involvedObject.kind={},involvedObject.name={}",
            a.kind, a.name
        );
        let list = events
            .list(&ListParams::default().fields(&fields))
            .await
            .map_err(|e| api_err(&what, e))?;
        // Newest first: the last time it was seen, for a repeated event.
        let when = |e: &Event| {
            (e.last_timestamp.as_ref().map(|t| t.0))
                .or_else(|| e.event_time.as_ref().map(|t| t.0))
                .or_else(|| e.first_timestamp.as_ref().map(|t| t.0))
                .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))
        };
        let mut items = list.items;
        items.sort_by_key(|e| std::cmp::Reverse(when(e)));
        items.truncate(a.limit as usize);
        let shown: Vec<Value> = items
            .iter()
            .map(|e| {
                json!({
                    "time": when(e).map(|t| t.to_string()),
                    "type": e.type_,
                    "reason": e.reason,
                    "message": e.message,
                    "count": e.count,
                })
            })
            .collect();
        let summary = (shown.iter())
            .map(|e| {
                format!(
                    "{} {} {}: {}{}",
                    e["time"].as_str().unwrap_or("?"),
                    e["type"].as_str().unwrap_or("?"),
                    e["reason"].as_str().unwrap_or("?"),
                    e["message"].as_str().unwrap_or(""),
                    e["count"]
                        .as_i64()
                        .filter(|c| *c > 1)
                        .map(|c| format!(" (x{c})"))
                        .unwrap_or_default(),
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        Ok(json!({
            "object": format!("{} {}/{}", a.kind, a.namespace, a.name),
            "events": shown,
            "summary": if summary.is_empty() { "no events".to_string() } else { summary },
        }))
    }

    /// `kube.describe`.
    pub(super) async fn describe(&self, a: KubeDescribeArgs) -> Result<Value, ExecError> {
        check_name("name", &a.name)?;
        let client = self.client(a.cluster.as_deref()).await?;
        let ns = a.namespace.clone().unwrap_or_default();
        if a.kind != "Node" {
            check_namespace(&ns)?;
        }
        let what = object_name(&a.kind, a.namespace.as_deref(), &a.name);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let get = |e| api_err(&what, e);
        match a.kind.as_str() {
            "Deployment" => {
                let d = (Api::<Deployment>::namespaced(client, &ns)
                    .get(&a.name)
                    .await)
                    .map_err(get)?;
                let rev = revision(&d.metadata);
                self.workload(
                    &pods,
                    &what,
                    &serde_json::to_value(d).unwrap_or_default(),
                    rev,
                )
                .await
            }
            "StatefulSet" => {
                let s = (Api::<StatefulSet>::namespaced(client, &ns)
                    .get(&a.name)
                    .await)
                    .map_err(get)?;
                self.workload(
                    &pods,
                    &what,
                    &serde_json::to_value(s).unwrap_or_default(),
                    None,
                )
                .await
            }
            "Pod" => {
                let p = pods.get(&a.name).await.map_err(get)?;
                let view = pod_view(&p);
                let json = serde_json::to_value(&p).unwrap_or_default();
                Ok(json!({
                    "object": what,
                    "pod": view,
                    "images": images(p.spec.as_ref()),
                    "conditions": conditions(&json),
                    "summary": pod_line(&view),
                }))
            }
            "Node" => {
                let n = Api::<Node>::all(client).get(&a.name).await.map_err(get)?;
                Ok(node_view(
                    &a.name,
                    &serde_json::to_value(n).unwrap_or_default(),
                ))
            }
            other => Err(ExecError::InvalidArgs(format!(
                "kind {other:?}: kube.describe takes Deployment, StatefulSet, Pod or Node"
            ))),
        }
    }

    /// A Deployment or StatefulSet (as JSON: the two share the fields read) in brief, with its
    /// pods.
    async fn workload(
        &self,
        pods: &Api<Pod>,
        what: &str,
        w: &Value,
        revision: Option<i64>,
    ) -> Result<Value, ExecError> {
        let status = &w["status"];
        let count = |v: &Value| v.as_i64().unwrap_or(0);
        let replicas = json!({
            "desired": w["spec"]["replicas"].as_i64().unwrap_or(1),
            "ready": count(&status["readyReplicas"]),
            "available": count(&status["availableReplicas"]),
            "updated": count(&status["updatedReplicas"]),
        });
        let selector = (w["spec"]["selector"]["matchLabels"]
            .as_object()
            .into_iter()
            .flatten())
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect::<Vec<_>>()
        .join(",");
        let images: Vec<String> = (w["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten())
        .filter_map(|c| c["image"].as_str().map(str::to_string))
        .collect();
        let conditions = conditions(w);
        let mut listed = Vec::new();
        if !selector.is_empty() {
            let list = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(|e| api_err(&format!("pods of {what}"), e))?;
            listed = list.items.iter().map(pod_view).collect();
            listed.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        }
        let total = listed.len();
        listed.truncate(MAX_DESCRIBED_PODS);
        let mut summary = vec![format!(
            "{what}: {} desired, {} ready, {} available, {} up to date{}",
            replicas["desired"],
            replicas["ready"],
            replicas["available"],
            replicas["updated"],
            revision
                .map(|r| format!(", revision {r}"))
                .unwrap_or_default()
        )];
        summary.push(format!("images: {}", images.join(", ")));
        for c in conditions.iter().filter(|c| c["status"] != "True") {
            summary.push(format!(
                "condition {} is {}: {}",
                c["type"].as_str().unwrap_or("?"),
                c["status"].as_str().unwrap_or("?"),
                c["message"].as_str().or(c["reason"].as_str()).unwrap_or("")
            ));
        }
        summary.extend(listed.iter().map(pod_line));
        Ok(json!({
            "object": what,
            "replicas": replicas,
            "revision": revision,
            "images": images,
            "conditions": conditions,
            "pods": listed,
            "pods_total": total,
            "summary": summary.join("\n"),
        }))
    }

    /// `kube.history`.
    pub(super) async fn history(&self, a: KubeHistoryArgs) -> Result<Value, ExecError> {
        check_namespace(&a.namespace)?;
        check_name("deployment", &a.deployment)?;
        let client = self.client(a.cluster.as_deref()).await?;
        let what = format!("deployment {}/{}", a.namespace, a.deployment);
        let d = Api::<Deployment>::namespaced(client.clone(), &a.namespace)
            .get(&a.deployment)
            .await
            .map_err(|e| api_err(&what, e))?;
        let uid = d.metadata.uid.clone().unwrap_or_default();
        let selector = selector_query(d.spec.as_ref().map(|s| &s.selector));
        let list = Api::<ReplicaSet>::namespaced(client, &a.namespace)
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| api_err(&format!("replicasets of {what}"), e))?;
        let current = revision(&d.metadata);
        let mut rollouts: Vec<(i64, Value)> = list
            .items
            .iter()
            .filter(|rs| {
                (rs.metadata.owner_references.iter().flatten())
                    .any(|o| o.uid == uid && o.controller == Some(true))
            })
            .filter_map(|rs| {
                let rev = revision(&rs.metadata)?;
                let annotations = rs.metadata.annotations.as_ref();
                Some((rev, json!({
                    "revision": rev,
                    "current": Some(rev) == current,
                    "images": images(rs.spec.as_ref().and_then(|s| s.template.as_ref()).and_then(|t| t.spec.as_ref())),
                    "created": rs.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()),
                    "change_cause": annotations.and_then(|a| a.get(CHANGE_CAUSE)),
                    "replicas": rs.spec.as_ref().and_then(|s| s.replicas),
                })))
            })
            .collect();
        rollouts.sort_by_key(|(rev, _)| std::cmp::Reverse(*rev));
        rollouts.truncate(a.limit as usize);
        let summary = (rollouts.iter())
            .map(|(rev, r)| {
                format!(
                    "revision {rev}{} {} {}{}",
                    if r["current"] == true {
                        " (current)"
                    } else {
                        ""
                    },
                    r["created"].as_str().unwrap_or("?"),
                    (r["images"].as_array().into_iter().flatten())
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", "),
                    r["change_cause"]
                        .as_str()
                        .map(|c| format!(": {c}"))
                        .unwrap_or_default(),
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        Ok(json!({
            "deployment": what,
            "current_revision": current,
            "rollouts": rollouts.into_iter().map(|(_, r)| r).collect::<Vec<_>>(),
            "summary": summary,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_from_templates_are_equality_pairs_only() {
        assert_eq!(
            equality_selector("app=api, tier=web").unwrap(),
            "app=api,tier=web"
        );
        assert_eq!(
            equality_selector("app.kubernetes.io/name=api").unwrap(),
            "app.kubernetes.io/name=api"
        );
        for bad in [
            "",
            "app",
            "app!=api",
            "app=api,x in (a,b)",
            "app=a b",
            "app=-x",
            "=x",
        ] {
            assert!(equality_selector(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn summaries_keep_the_last_lines() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
    }
}
