//! Making room: drain a node (cordon, then evict through the Eviction API, which honours
//! PodDisruptionBudgets) and grow a PersistentVolumeClaim within a bound.

use super::{FIELD_MANAGER, KubeExecutor, api_err, check_name, check_namespace, is_conflict};
use crate::executors::ExecError;
use crate::playbook::actions::{KubeDrainArgs, KubeExpandPvcArgs, KubeNodeArgs, quantity_bytes};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use std::time::Duration;

/// How long to wait between tries of the evictions a disruption budget refused.
const EVICTION_RETRY: Duration = Duration::from_secs(1);

/// The annotation of a static (mirror) pod: the kubelet owns it; the API cannot evict it.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Why a pod on a node being drained is left where it is, if it is.
fn skip_reason(pod: &Pod) -> Option<&'static str> {
    let annotations = pod.metadata.annotations.as_ref();
    if annotations.is_some_and(|a| a.contains_key(MIRROR_ANNOTATION)) {
        return Some("mirror pod");
    }
    let owners = pod.metadata.owner_references.iter().flatten();
    if owners.into_iter().any(|o| o.kind == "DaemonSet") {
        return Some("DaemonSet");
    }
    None
}

fn pod_name(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// A byte count in the largest binary unit that holds it exactly (`20Gi`, `1536Mi`).
fn quantity_text(bytes: u128) -> String {
    for (unit, size) in [
        ("Ei", 60),
        ("Pi", 50),
        ("Ti", 40),
        ("Gi", 30),
        ("Mi", 20),
        ("Ki", 10),
    ] {
        if bytes >= 1 << size && bytes.is_multiple_of(1 << size) {
            return format!("{}{unit}", bytes >> size);
        }
    }
    bytes.to_string()
}

/// What one try of evicting a pod gave.
enum Evicted {
    /// Gone, or going.
    Yes,
    /// A disruption budget said not now (429).
    NotNow,
}

impl KubeExecutor {
    pub(super) async fn drain(
        &self,
        a: KubeDrainArgs,
        step_timeout: Duration,
    ) -> Result<Value, ExecError> {
        check_name("node", &a.node)?;
        let patience = match &a.timeout {
            Some(t) => crate::time::parse_duration(t)
                .map_err(|e| ExecError::InvalidArgs(format!("`timeout`: {e}")))?,
            None => step_timeout.saturating_sub(Duration::from_secs(2)),
        };
        // Leave a moment inside the step's own timeout to report what is left.
        let patience = patience.min(step_timeout.saturating_sub(Duration::from_secs(1)));
        let deadline = tokio::time::Instant::now() + patience;
        let node = KubeNodeArgs {
            cluster: a.cluster.clone(),
            node: a.node.clone(),
            guard: a.guard.clone(),
        };
        let cordoned = self.cordon(node, true).await?;
        let client = self.client_without_retries(a.cluster.as_deref()).await?;
        let on_node = ListParams::default().fields(&format!("spec.nodeName={}", a.node));
        let pods = (Api::<Pod>::all(client.clone()).list(&on_node).await)
            .map_err(|e| api_err(&format!("pods on node {}", a.node), e))?;
        let (mut skipped, mut left) = (Vec::new(), Vec::new());
        for pod in pods.items {
            match skip_reason(&pod) {
                Some(why) => skipped.push(json!({ "pod": pod_name(&pod), "why": why })),
                None => left.push(pod),
            }
        }
        let mut evicted = Vec::new();
        loop {
            let mut refused = Vec::new();
            for pod in left {
                match self.evict(&client, &pod, a.grace_period).await? {
                    Evicted::Yes => evicted.push(pod_name(&pod)),
                    Evicted::NotNow => refused.push(pod),
                }
            }
            left = refused;
            let now = tokio::time::Instant::now();
            if left.is_empty() || now >= deadline {
                break;
            }
            // The last try comes at the deadline.
            tokio::time::sleep(EVICTION_RETRY.min(deadline - now)).await;
        }
        let left: Vec<String> = left.iter().map(pod_name).collect();
        let out = json!({
            "node": a.node,
            "before": cordoned["before"],
            "after": cordoned["after"],
            "evicted": evicted,
            "skipped": skipped,
            "left": left,
        });
        if left.is_empty() {
            return Ok(out);
        }
        Err(ExecError::FailedWith(
            format!(
                "node {}: cordoned, but a PodDisruptionBudget still refused evicting {} after {}: {}",
                a.node,
                left.len(),
                crate::time::format_duration(patience),
                left.join(", ")
            ),
            out,
        ))
    }

    /// One eviction through `policy/v1` (the pod's own grace period unless one is given).
    async fn evict(
        &self,
        client: &kube::Client,
        pod: &Pod,
        grace_period: Option<i64>,
    ) -> Result<Evicted, ExecError> {
        let (ns, name) = (
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default(),
        );
        let mut eviction = json!({
            "apiVersion": "policy/v1", "kind": "Eviction",
            "metadata": { "name": name, "namespace": ns },
        });
        if let Some(seconds) = grace_period {
            eviction["deleteOptions"] = json!({ "gracePeriodSeconds": seconds });
        }
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let sent: Result<Value, kube::Error> = pods
            .create_subresource("eviction", name, &PostParams::default(), &eviction)
            .await;
        match sent {
            Ok(_) => Ok(Evicted::Yes),
            Err(kube::Error::Api(s)) if s.code == 429 => Ok(Evicted::NotNow),
            // Already gone: nothing left to move.
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(Evicted::Yes),
            Err(e) => Err(api_err(&format!("evicting pod {ns}/{name}"), e)),
        }
    }

    pub(super) async fn expand_pvc(&self, a: KubeExpandPvcArgs) -> Result<Value, ExecError> {
        check_namespace(&a.namespace)?;
        check_name("pvc", &a.pvc)?;
        let size = quantity_bytes(&a.size).map_err(ExecError::InvalidArgs)?;
        let max = quantity_bytes(&a.max).map_err(ExecError::InvalidArgs)?;
        let claims: Api<PersistentVolumeClaim> =
            Api::namespaced(self.client(a.cluster.as_deref()).await?, &a.namespace);
        let what = format!("persistentvolumeclaim {}/{}", a.namespace, a.pvc);
        let mut attempt = 0;
        loop {
            let pvc = claims.get(&a.pvc).await.map_err(|e| api_err(&what, e))?;
            let requests = (pvc.spec.as_ref())
                .and_then(|s| s.resources.as_ref())
                .and_then(|r| r.requests.as_ref());
            let Some(current) = requests.and_then(|r| r.get("storage")).map(|q| q.0.clone()) else {
                return Err(ExecError::Failed(format!("{what} requests no storage")));
            };
            let now = quantity_bytes(&current)
                .map_err(|e| ExecError::Failed(format!("{what}: its request {e}")))?;
            let (want, text) = if a.size.trim().starts_with('+') {
                let want = now.saturating_add(size);
                (want, quantity_text(want))
            } else {
                (size, a.size.trim().to_string())
            };
            if want < now {
                return Err(ExecError::Refused(format!(
                    "{what}: {text} is smaller than its request {current}; volumes only grow"
                )));
            }
            if want > max {
                return Err(ExecError::Refused(format!(
                    "{what}: {text} is above max {} (it requests {current})",
                    a.max
                )));
            }
            let capacity = (pvc.status.as_ref())
                .and_then(|s| s.capacity.as_ref())
                .and_then(|c| c.get("storage"))
                .map(|q| q.0.clone());
            if want == now {
                return Ok(json!({
                    "object": what, "before": { "storage": current }, "after": { "storage": current },
                    "capacity": capacity, "changed": false,
                }));
            }
            let patch = json!({
                "metadata": { "resourceVersion": pvc.metadata.resource_version },
                "spec": { "resources": { "requests": { "storage": text } } },
            });
            let params = PatchParams::apply(FIELD_MANAGER);
            match claims.patch(&a.pvc, &params, &Patch::Merge(&patch)).await {
                Ok(_) => {
                    return Ok(json!({
                        "object": what, "before": { "storage": current }, "after": { "storage": text },
                        "capacity": capacity, "changed": true, "conflicts_retried": attempt,
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
    fn grown_sizes_are_written_in_the_largest_exact_unit() {
        assert_eq!(quantity_text(20 << 30), "20Gi");
        assert_eq!(quantity_text(1536 << 20), "1536Mi");
        assert_eq!(quantity_text(1000), "1000");
    }
}
