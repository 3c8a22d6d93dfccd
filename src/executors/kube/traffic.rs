//! Moving traffic: fail a Service over to another set of pods, rate-limit an Ingress
//! (ingress-nginx), circuit-break a dependency (an Istio DestinationRule). Each reads the object,
//! writes a merge patch that carries the `resourceVersion` it read (a concurrent change is a 409,
//! retried from a fresh read), and records what it changed before and after.

use super::{FIELD_MANAGER, KubeExecutor, api_err, check_name, check_namespace, is_conflict};
use crate::executors::ExecError;
use crate::playbook::actions::{KubeCircuitBreakArgs, KubeFailoverArgs, KubeRateLimitArgs};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

/// The ingress-nginx annotations `kube.rate_limit` sets.
pub const LIMIT_RPS: &str = "nginx.ingress.kubernetes.io/limit-rps";
/// Burst, as a multiple of the rate.
pub const LIMIT_BURST: &str = "nginx.ingress.kubernetes.io/limit-burst-multiplier";
/// Concurrent connections per client address.
pub const LIMIT_CONNECTIONS: &str = "nginx.ingress.kubernetes.io/limit-connections";

/// Whether a pod counts as serving: Ready, and not on its way out.
fn ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && (pod.status.as_ref())
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A label name or value: at most 63 of letters, digits, `-`, `_` and `.`, starting and
/// ending with a letter or digit.
fn label_part(s: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    s.len() <= 63
        && edge(s.chars().next())
        && edge(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A label key: a name, with an optional DNS subdomain prefix (`app.kubernetes.io/name`).
fn label_key(k: &str) -> bool {
    match k.split_once('/') {
        Some((prefix, name)) => super::valid_name(prefix) && label_part(name),
        None => label_part(k),
    }
}

/// `k=v,k=v`, the label selector of a map.
fn selector_text(selector: &BTreeMap<String, String>) -> String {
    let parts: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    parts.join(",")
}

/// A duration as Istio writes one (protobuf JSON): `10s`, `0.5s`.
fn istio_duration(what: &str, text: &str) -> Result<String, ExecError> {
    let d = crate::time::parse_duration(text)
        .map_err(|e| ExecError::InvalidArgs(format!("`{what}`: {e}")))?;
    if d.is_zero() {
        return Err(ExecError::InvalidArgs(format!(
            "`{what}`: must not be zero"
        )));
    }
    Ok(if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}s", d.as_secs_f64())
    })
}

impl KubeExecutor {
    pub(super) async fn failover(&self, a: KubeFailoverArgs) -> Result<Value, ExecError> {
        check_namespace(&a.namespace)?;
        check_name("service", &a.service)?;
        for (k, v) in &a.selector {
            if !label_key(k) || !(v.is_empty() || label_part(v)) {
                return Err(ExecError::InvalidArgs(format!(
                    "selector {k:?}: {v:?} is not a valid Kubernetes label"
                )));
            }
        }
        let client = self.client(a.cluster.as_deref()).await?;
        let services: Api<Service> = Api::namespaced(client.clone(), &a.namespace);
        let pods: Api<Pod> = Api::namespaced(client, &a.namespace);
        let what = format!("service {}/{}", a.namespace, a.service);
        let mut attempt = 0;
        loop {
            let svc = services
                .get(&a.service)
                .await
                .map_err(|e| api_err(&what, e))?;
            let before: BTreeMap<String, String> = (svc.spec.as_ref())
                .and_then(|s| s.selector.clone())
                .unwrap_or_default();
            let mut after = before.clone();
            after.extend(a.selector.clone());
            let selector = selector_text(&after);
            let matching = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(|e| api_err(&format!("pods of {what}"), e))?;
            let serving = matching.items.iter().filter(|p| ready(p)).count();
            if serving < a.min_ready as usize {
                return Err(ExecError::Refused(format!(
                    "{what}: only {serving} Ready pod(s) match the new selector {selector} \
                     (min_ready {}); the selector was left as it is",
                    a.min_ready
                )));
            }
            if after == before {
                return Ok(json!({
                    "object": what, "before": { "selector": before }, "after": { "selector": after },
                    "ready": serving, "changed": false,
                }));
            }
            let patch = json!({
                "metadata": { "resourceVersion": svc.metadata.resource_version },
                "spec": { "selector": a.selector },
            });
            let params = PatchParams::apply(FIELD_MANAGER);
            match services
                .patch(&a.service, &params, &Patch::Merge(&patch))
                .await
            {
                Ok(now) => {
                    let now = (now.spec.and_then(|s| s.selector)).unwrap_or_default();
                    return Ok(json!({
                        "object": what, "before": { "selector": before }, "after": { "selector": now },
                        "ready": serving, "changed": true, "conflicts_retried": attempt,
                    }));
                }
                Err(e) if is_conflict(&e) && attempt < self.retries() => attempt += 1,
                Err(e) => return Err(api_err(&what, e)),
            }
        }
    }

    pub(super) async fn rate_limit(&self, a: KubeRateLimitArgs) -> Result<Value, ExecError> {
        check_namespace(&a.namespace)?;
        check_name("ingress", &a.ingress)?;
        let ingresses: Api<Ingress> =
            Api::namespaced(self.client(a.cluster.as_deref()).await?, &a.namespace);
        let what = format!("ingress {}/{}", a.namespace, a.ingress);
        let want: Map<String, Value> = [
            (LIMIT_RPS, Some(a.rps)),
            (LIMIT_BURST, a.burst_multiplier),
            (LIMIT_CONNECTIONS, a.connections),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_string(), json!(v?.to_string()))))
        .collect();
        let mut attempt = 0;
        loop {
            let ing = ingresses
                .get(&a.ingress)
                .await
                .map_err(|e| api_err(&what, e))?;
            let annotations = ing.metadata.annotations.clone().unwrap_or_default();
            // What each annotation was, `null` where it was absent.
            let before: Map<String, Value> = (want.keys())
                .map(|k| {
                    (
                        k.clone(),
                        annotations.get(k).map_or(Value::Null, |v| json!(v)),
                    )
                })
                .collect();
            let patch = json!({
                "metadata": { "resourceVersion": ing.metadata.resource_version, "annotations": want },
            });
            let params = PatchParams::apply(FIELD_MANAGER);
            match ingresses
                .patch(&a.ingress, &params, &Patch::Merge(&patch))
                .await
            {
                Ok(now) => {
                    let now = now.metadata.annotations.unwrap_or_default();
                    let after: Map<String, Value> = (want.keys())
                        .map(|k| (k.clone(), now.get(k).map_or(Value::Null, |v| json!(v))))
                        .collect();
                    return Ok(json!({
                        "object": what, "before": { "annotations": before },
                        "after": { "annotations": after }, "changed": before != after,
                        "conflicts_retried": attempt,
                    }));
                }
                Err(e) if is_conflict(&e) && attempt < self.retries() => attempt += 1,
                Err(e) => return Err(api_err(&what, e)),
            }
        }
    }

    pub(super) async fn circuit_break(&self, a: KubeCircuitBreakArgs) -> Result<Value, ExecError> {
        check_namespace(&a.namespace)?;
        check_name("destination_rule", &a.destination_rule)?;
        if a.max_ejection_percent > 100 {
            return Err(ExecError::InvalidArgs(
                "`max_ejection_percent`: at most 100".into(),
            ));
        }
        let mut policy = json!({
            "outlierDetection": {
                "consecutive5xxErrors": a.consecutive_errors,
                "interval": istio_duration("interval", &a.interval)?,
                "baseEjectionTime": istio_duration("base_ejection_time", &a.base_ejection_time)?,
                "maxEjectionPercent": a.max_ejection_percent,
            },
        });
        if let Some(n) = a.max_connections {
            policy["connectionPool"]["tcp"]["maxConnections"] = json!(n);
        }
        if let Some(n) = a.max_pending_requests {
            policy["connectionPool"]["http"]["http1MaxPendingRequests"] = json!(n);
        }
        let gvk = GroupVersionKind::gvk("networking.istio.io", "v1", "DestinationRule");
        let rules: Api<DynamicObject> = Api::namespaced_with(
            self.client(a.cluster.as_deref()).await?,
            &a.namespace,
            &ApiResource::from_gvk(&gvk),
        );
        let what = format!("destinationrule {}/{}", a.namespace, a.destination_rule);
        let mut attempt = 0;
        loop {
            let rule = (rules.get(&a.destination_rule).await).map_err(|e| api_err(&what, e))?;
            let before = rule.data["spec"]["trafficPolicy"].clone();
            let patch = json!({
                "metadata": { "resourceVersion": rule.metadata.resource_version },
                "spec": { "trafficPolicy": policy },
            });
            let params = PatchParams::apply(FIELD_MANAGER);
            match rules
                .patch(&a.destination_rule, &params, &Patch::Merge(&patch))
                .await
            {
                Ok(now) => {
                    return Ok(json!({
                        "object": what,
                        "before": { "trafficPolicy": before },
                        "after": { "trafficPolicy": now.data["spec"]["trafficPolicy"] },
                        "conflicts_retried": attempt,
                    }));
                }
                Err(e) if is_conflict(&e) && attempt < self.retries() => attempt += 1,
                Err(e) => return Err(api_err(&what, e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_labels_are_checked_as_kubernetes_checks_them() {
        for ok in ["track", "app.kubernetes.io/name", "track-type", "a_b.c"] {
            assert!(label_key(ok), "{ok}");
        }
        for bad in [
            "",
            "-x",
            "x/",
            "Bad Prefix/x",
            "a/b/c",
            &"x".repeat(64),
            "x,y=z",
        ] {
            assert!(!label_key(bad), "{bad}");
        }
        assert!(label_part("standby") && !label_part("stand by") && !label_part("x=y"));
    }

    #[test]
    fn istio_durations_are_seconds_with_a_suffix() {
        assert_eq!(istio_duration("i", "10s").unwrap(), "10s");
        assert_eq!(istio_duration("i", "2m").unwrap(), "120s");
        assert_eq!(istio_duration("i", "1500ms").unwrap(), "1.5s");
        assert!(istio_duration("i", "0s").is_err());
        assert!(istio_duration("i", "soon").is_err());
    }
}
