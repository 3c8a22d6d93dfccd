//! A stateful fake Kubernetes API server (axum, in-process, loopback) for the kube executor.
//!
//! kube-rs talks to it through a real kubeconfig. It serves the REST paths and verbs the
//! executor uses — GET, LIST with label selectors, POST, PUT, PATCH (JSON merge; strategic
//! merge is treated as merge, which is what it is for the maps Reflex patches), DELETE, and the
//! `scale` subresource — keeps `resourceVersion` (409 on a stale one, in a PUT or in a merge
//! patch that names one), answers 404, 403 for a verb the loaded RBAC rules lack, and does what
//! the deployment controller does with ReplicaSets: one per pod template, owned by the
//! Deployment, numbered by the `deployment.kubernetes.io/revision` annotation. It also serves
//! the `eviction` subresource of pods as the API server does (429 while a PodDisruptionBudget
//! would be violated), list field selectors on `spec.nodeName`, any custom resource (an Istio
//! DestinationRule), and a PersistentVolumeClaim's rules (its spec immutable but for the
//! storage request, which may not shrink). For evidence it serves a pod's `log` subresource as
//! the kubelet answers through the API server (`tailLines`, `container` required when a pod has
//! several, `previous` only where a container terminated before), and Events listed by
//! `involvedObject` field selectors.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// One RBAC rule: (api groups, resources, verbs).
type Rule = (Vec<String>, Vec<String>, Vec<String>);

#[derive(Default)]
struct Inner {
    objects: BTreeMap<String, Value>,
    rv: u64,
    uid: u64,
    rules: Option<Vec<Rule>>,
    used: BTreeSet<(String, String, String)>,
    requests: usize,
    conflicts: u32,
    /// Each eviction granted: the pod (`ns/name`) and the grace period it asked for.
    evictions: Vec<(String, Option<i64>)>,
    /// Container logs: (namespace, pod, container, previous) to text.
    logs: HashMap<(String, String, String, bool), String>,
}

/// A running fake API server.
#[derive(Clone)]
pub struct FakeKube {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    inner: Arc<Mutex<Inner>>,
}

/// Parses a ClusterRole/Role manifest (multi-document YAML) into rules.
pub fn rbac_rules(path: &Path) -> Vec<Rule> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut rules = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc).unwrap();
        if v["kind"] == "ClusterRole" || v["kind"] == "Role" {
            for r in v["rules"].as_array().into_iter().flatten() {
                let list = |k: &str| {
                    r[k].as_array()
                        .into_iter()
                        .flatten()
                        .map(|s| s.as_str().unwrap().to_string())
                        .collect()
                };
                rules.push((list("apiGroups"), list("resources"), list("verbs")));
            }
        }
    }
    rules
}

/// Every (verb, group, resource) a set of rules allows.
pub fn allowed(rules: &[Rule]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for (groups, resources, verbs) in rules {
        for g in groups {
            for r in resources {
                for v in verbs {
                    out.insert((v.clone(), g.clone(), r.clone()));
                }
            }
        }
    }
    out
}

struct Target {
    group: String,
    version: String,
    plural: String,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (String::new(), v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (g.to_string(), v.to_string(), rest),
        _ => return None,
    };
    let s = |i: usize| rest.get(i).map(|x| x.to_string());
    let (ns, plural, name, sub) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        (s(1), s(2)?, s(3), s(4))
    } else {
        (None, s(0)?, s(1), s(2))
    };
    Some(Target {
        group,
        version,
        plural,
        ns,
        name,
        sub,
    })
}

/// The time as the API server stamps objects with it (RFC 3339, seconds, UTC).
fn now() -> String {
    let t = reflex::time::Timestamp::from_ms(reflex::time::now_ms() / 1000 * 1000).to_string();
    t.replace(".000Z", "Z")
}

fn key(group: &str, plural: &str, ns: &str, name: &str) -> String {
    format!("{group}/{plural}/{ns}/{name}")
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code});
    (StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response()
}

/// 409, as the API server answers a write with a stale resourceVersion.
fn conflict() -> Response {
    status(
        409,
        "Conflict",
        "the object has been modified; please apply your changes to the latest version and try again",
    )
}

fn ok(v: Value) -> Response {
    (StatusCode::OK, axum::Json(v)).into_response()
}

/// RFC 7386 JSON merge patch.
pub fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn kind_of(plural: &str) -> &'static str {
    match plural {
        "deployments" => "Deployment",
        "statefulsets" => "StatefulSet",
        "daemonsets" => "DaemonSet",
        "replicasets" => "ReplicaSet",
        "pods" => "Pod",
        "nodes" => "Node",
        "configmaps" => "ConfigMap",
        "services" => "Service",
        "ingresses" => "Ingress",
        "destinationrules" => "DestinationRule",
        "persistentvolumeclaims" => "PersistentVolumeClaim",
        "poddisruptionbudgets" => "PodDisruptionBudget",
        "events" => "Event",
        _ => "Object",
    }
}

fn template_hash(template: &Value) -> String {
    let mut t = template.clone();
    if let Some(labels) = t
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        labels.remove("pod-template-hash");
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in t.to_string().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")[..10].to_string()
}

fn revision(v: &Value) -> i64 {
    v.pointer("/metadata/annotations/deployment.kubernetes.io~1revision")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Bytes of a storage quantity with a binary suffix (`10Gi`, `512Mi`), as the fake needs.
fn storage_bytes(q: &Value) -> u64 {
    let s = q.as_str().unwrap_or("0");
    let (n, shift) = match s {
        _ if s.ends_with("Ti") => (&s[..s.len() - 2], 40),
        _ if s.ends_with("Gi") => (&s[..s.len() - 2], 30),
        _ if s.ends_with("Mi") => (&s[..s.len() - 2], 20),
        _ if s.ends_with("Ki") => (&s[..s.len() - 2], 10),
        _ => (s, 0),
    };
    n.parse::<u64>().unwrap_or(0) << shift
}

/// Whether a pod is Ready.
fn pod_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// Whether `labels` match a `matchLabels` selector.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|m| m.iter().all(|(k, v)| labels[k] == *v))
}

impl Inner {
    /// A container's log, as `GET pods/{name}/log` answers: the container must be named when
    /// the pod has several, `previous` is there only for a container that terminated before,
    /// `tailLines` keeps the last lines.
    fn log(&self, ns: &str, pod: &str, query: &HashMap<String, String>) -> Response {
        let Some(p) = self.objects.get(&key("", "pods", ns, pod)) else {
            return status(404, "NotFound", &format!("pods \"{pod}\" not found"));
        };
        let names: Vec<String> = (p["spec"]["containers"].as_array().into_iter().flatten())
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect();
        let container = match query.get("container") {
            Some(c) if names.contains(c) => c.clone(),
            Some(c) => {
                let msg = format!("container {c} is not valid for pod {pod}");
                return status(400, "BadRequest", &msg);
            }
            None if names.len() == 1 => names[0].clone(),
            None => {
                let msg = format!(
                    "a container name must be specified for pod {pod}, choose one of: [{}]",
                    names.join(" ")
                );
                return status(400, "BadRequest", &msg);
            }
        };
        let previous = query.get("previous").is_some_and(|v| v == "true");
        let wanted = (ns.to_string(), pod.to_string(), container.clone(), previous);
        let Some(text) = self.logs.get(&wanted) else {
            if previous {
                let msg = format!(
                    "previous terminated container \"{container}\" in pod \"{pod}\" not found"
                );
                return status(400, "BadRequest", &msg);
            }
            return (StatusCode::OK, String::new()).into_response();
        };
        let tail = query.get("tailLines").and_then(|n| n.parse::<usize>().ok());
        let lines: Vec<&str> = text.lines().collect();
        let from = tail.map_or(0, |n| lines.len().saturating_sub(n));
        let mut out = lines[from..].join("\n");
        if !out.is_empty() {
            out.push('\n');
        }
        (StatusCode::OK, [("content-type", "text/plain")], out).into_response()
    }

    /// The eviction API: the pod goes unless a PodDisruptionBudget selecting it would be
    /// violated (its healthy pods would fall below `minAvailable`, or more than
    /// `maxUnavailable` would be down), which is a 429, as the API server answers.
    fn evict(&mut self, ns: &str, name: &str, body: &Value) -> Response {
        let pod_key = key("", "pods", ns, name);
        let Some(pod) = self.objects.get(&pod_key).cloned() else {
            return status(404, "NotFound", &format!("pods \"{name}\" not found"));
        };
        let labels = &pod["metadata"]["labels"];
        let pods_in_ns: Vec<&Value> = self
            .objects
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("/pods/{ns}/")))
            .map(|(_, v)| v)
            .collect();
        for (k, pdb) in &self.objects {
            if !k.starts_with(&format!("policy/poddisruptionbudgets/{ns}/")) {
                continue;
            }
            let selector = &pdb["spec"]["selector"]["matchLabels"];
            if !selects(selector, labels) {
                continue;
            }
            let covered: Vec<&&Value> = pods_in_ns
                .iter()
                .filter(|p| selects(selector, &p["metadata"]["labels"]))
                .collect();
            let healthy = covered.iter().filter(|p| pod_ready(p)).count() as i64;
            let allowed = match (
                pdb["spec"]["minAvailable"].as_i64(),
                pdb["spec"]["maxUnavailable"].as_i64(),
            ) {
                (Some(min), _) => healthy - min,
                (None, Some(max)) => max - (covered.len() as i64 - healthy),
                (None, None) => 1,
            };
            // A Ready pod goes only while the budget allows a disruption; one that is not Ready
            // only while the budget is met (the default `IfHealthyBudget` policy).
            let refused = if pod_ready(&pod) {
                allowed <= 0
            } else {
                allowed < 0
            };
            if refused {
                return status(
                    429,
                    "TooManyRequests",
                    "Cannot evict pod as it would violate the pod's disruption budget.",
                );
            }
        }
        self.objects.remove(&pod_key);
        self.bump();
        let grace = body["deleteOptions"]["gracePeriodSeconds"].as_i64();
        self.evictions.push((format!("{ns}/{name}"), grace));
        (
            StatusCode::CREATED,
            axum::Json(
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
            ),
        )
            .into_response()
    }

    /// A PersistentVolumeClaim's update rules: only the storage request may change, and it
    /// may only grow.
    fn pvc_refusal(old: &Value, new: &Value) -> Option<Response> {
        let (mut o, mut n) = (old["spec"].clone(), new["spec"].clone());
        for spec in [&mut o, &mut n] {
            if let Some(r) = spec
                .pointer_mut("/resources/requests")
                .and_then(Value::as_object_mut)
            {
                r.remove("storage");
            }
        }
        if o != n {
            return Some(status(
                422,
                "Invalid",
                "spec: Forbidden: spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims",
            ));
        }
        let size = |v: &Value| storage_bytes(&v["spec"]["resources"]["requests"]["storage"]);
        (size(new) < size(old)).then(|| {
            status(
                422,
                "Invalid",
                "spec.resources.requests.storage: Forbidden: field can not be less than previous value",
            )
        })
    }

    /// Whether an injected conflict applies to this write: as if another writer got there
    /// first, the object's resourceVersion moves on and the write gets 409.
    fn injected_conflict(&mut self, key: &str) -> bool {
        if self.conflicts == 0 {
            return false;
        }
        self.conflicts -= 1;
        let rv = self.bump();
        if let Some(obj) = self.objects.get_mut(key) {
            merge(obj, &json!({"metadata": {"resourceVersion": rv}}));
        }
        true
    }

    fn bump(&mut self) -> String {
        self.rv += 1;
        self.rv.to_string()
    }

    /// What the deployment controller does after a Deployment changed.
    fn reconcile_deployment(&mut self, ns: &str, name: &str) {
        let dkey = key("apps", "deployments", ns, name);
        let Some(d) = self.objects.get(&dkey).cloned() else {
            return;
        };
        let uid = d["metadata"]["uid"].clone();
        let template = d["spec"]["template"].clone();
        let hash = template_hash(&template);
        let owned: Vec<String> = self
            .objects
            .iter()
            .filter(|(k, v)| {
                k.starts_with(&format!("apps/replicasets/{ns}/"))
                    && v["metadata"]["ownerReferences"][0]["uid"] == uid
            })
            .map(|(k, _)| k.clone())
            .collect();
        let max = owned
            .iter()
            .map(|k| revision(&self.objects[k]))
            .max()
            .unwrap_or(0);
        let current = owned
            .iter()
            .find(|k| self.objects[*k]["metadata"]["labels"]["pod-template-hash"] == hash.as_str())
            .cloned();
        let rev = match &current {
            Some(k) if revision(&self.objects[k]) == max => max,
            _ => max + 1,
        };
        let rs_key =
            current.unwrap_or_else(|| key("apps", "replicasets", ns, &format!("{name}-{hash}")));
        let mut rs_template = template.clone();
        merge(
            &mut rs_template,
            &json!({"metadata": {"labels": {"pod-template-hash": hash}}}),
        );
        let replicas = d["spec"]["replicas"].as_i64().unwrap_or(1);
        let rv = self.bump();
        self.uid += 1;
        let rs_uid = self.uid;
        let rs = self.objects.entry(rs_key.clone()).or_insert_with(|| {
            json!({
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {
                    "name": format!("{name}-{hash}"), "namespace": ns, "uid": format!("uid-{rs_uid}"),
                    "creationTimestamp": now(),
                    "labels": rs_template["metadata"]["labels"].clone(),
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name, "uid": uid, "controller": true}],
                },
                "spec": {"selector": d["spec"]["selector"].clone(), "template": rs_template},
            })
        });
        merge(
            rs,
            &json!({"metadata": {"resourceVersion": rv, "annotations": {"deployment.kubernetes.io/revision": rev.to_string()}}, "spec": {"replicas": replicas}}),
        );
        // Old ReplicaSets scale to zero; the Deployment reports the rollout complete.
        for k in owned.iter().filter(|k| **k != rs_key) {
            merge(
                self.objects.get_mut(k).unwrap(),
                &json!({"spec": {"replicas": 0}}),
            );
        }
        let generation = d["metadata"]["generation"].clone();
        let d = self.objects.get_mut(&dkey).unwrap();
        merge(
            d,
            &json!({
                "metadata": {"annotations": {"deployment.kubernetes.io/revision": rev.to_string()}},
                "status": {"observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas},
            }),
        );
    }
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(t) = parse_path(uri.path()) else {
        return status(404, "NotFound", "no such path");
    };
    let mut s = inner.lock().unwrap();
    s.requests += 1;
    let verb = match (&method, &t.name) {
        (&Method::GET, Some(_)) => "get",
        (&Method::GET, None) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, _) => "delete",
        _ => return status(405, "MethodNotAllowed", "method not allowed"),
    };
    let resource = match &t.sub {
        Some(sub) => format!("{}/{sub}", t.plural),
        None => t.plural.clone(),
    };
    // Test setup authenticates as the cluster admin; everything else is Reflex's service
    // account, held to the RBAC rules and recorded.
    let admin =
        headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer admin-token");
    if !admin {
        s.used
            .insert((verb.to_string(), t.group.clone(), resource.clone()));
    }
    if let (false, Some(rules)) = (admin, &s.rules) {
        let allowed = rules.iter().any(|(g, r, v)| {
            g.iter().any(|g| g == &t.group || g == "*")
                && r.iter().any(|r| r == &resource || r == "*")
                && v.iter().any(|v| v == verb || v == "*")
        });
        if !allowed {
            let msg = format!(
                "{resource} \"{}\" is forbidden: User \"system:serviceaccount:reflex:reflex\" cannot {verb} resource \"{resource}\" in API group \"{}\"",
                t.name.clone().unwrap_or_default(),
                t.group
            );
            return status(403, "Forbidden", &msg);
        }
    }
    let ns = t.ns.clone().unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let api_version = if t.group.is_empty() {
        t.version.clone()
    } else {
        format!("{}/{}", t.group, t.version)
    };

    if t.sub.as_deref() == Some("log") && method == Method::GET {
        return s.log(&ns, t.name.as_deref().unwrap_or(""), &query);
    }

    if t.sub.as_deref() == Some("eviction") && method == Method::POST {
        return s.evict(&ns, t.name.as_deref().unwrap_or(""), &body);
    }

    // The scale subresource reads and writes the parent's spec.replicas.
    if t.sub.as_deref() == Some("scale") {
        let k = key(&t.group, &t.plural, &ns, t.name.as_deref().unwrap_or(""));
        let Some(parent) = s.objects.get(&k).cloned() else {
            return status(404, "NotFound", "not found");
        };
        let scale = |p: &Value| {
            json!({
                "kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": p["metadata"]["name"], "namespace": ns, "resourceVersion": p["metadata"]["resourceVersion"], "uid": p["metadata"]["uid"]},
                "spec": {"replicas": p["spec"]["replicas"].as_i64().unwrap_or(1)},
                "status": {"replicas": p["status"]["replicas"].as_i64().unwrap_or(0)},
            })
        };
        if method == Method::GET {
            return ok(scale(&parent));
        }
        if s.injected_conflict(&k) {
            return conflict();
        }
        let sent_rv = body["metadata"]["resourceVersion"]
            .as_str()
            .map(str::to_string);
        if sent_rv
            .is_some_and(|rv| Some(rv.as_str()) != parent["metadata"]["resourceVersion"].as_str())
        {
            return conflict();
        }
        let replicas = body["spec"]["replicas"].clone();
        let rv = s.bump();
        let p = s.objects.get_mut(&k).unwrap();
        merge(
            p,
            &json!({"metadata": {"resourceVersion": rv}, "spec": {"replicas": replicas}, "status": {"replicas": replicas}}),
        );
        let out = scale(p);
        return ok(out);
    }

    match (&method, &t.name) {
        (&Method::GET, None) => {
            // `k=v,k=v` selectors (equality only, which is all the executor sends).
            let pairs = |name: &str| -> Vec<(String, String)> {
                let text = query.get(name).map_or("", String::as_str);
                (text.split(',').filter_map(|kv| kv.split_once('=')))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            };
            let (selector, fields) = (pairs("labelSelector"), pairs("fieldSelector"));
            let prefix = format!("{}/{}/{}/", t.group, t.plural, ns);
            let items: Vec<Value> = s
                .objects
                .iter()
                .filter(|(k, _)| {
                    k.starts_with(&prefix)
                        || (t.ns.is_none() && k.starts_with(&format!("{}/{}/", t.group, t.plural)))
                })
                .map(|(_, v)| v.clone())
                .filter(|v| {
                    selector
                        .iter()
                        .all(|(k, want)| v["metadata"]["labels"][k] == want.as_str())
                })
                .filter(|v| {
                    fields.iter().all(|(k, want)| {
                        let pointer = format!("/{}", k.replace('.', "/"));
                        v.pointer(&pointer).and_then(Value::as_str) == Some(want.as_str())
                    })
                })
                .collect();
            let rv = s.rv.to_string();
            ok(
                json!({"kind": format!("{}List", kind_of(&t.plural)), "apiVersion": api_version, "metadata": {"resourceVersion": rv}, "items": items}),
            )
        }
        (&Method::GET, Some(name)) => match s.objects.get(&key(&t.group, &t.plural, &ns, name)) {
            Some(v) => ok(v.clone()),
            None => status(
                404,
                "NotFound",
                &format!("{} \"{name}\" not found", t.plural),
            ),
        },
        (&Method::POST, _) => {
            let name = body["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let k = key(&t.group, &t.plural, &ns, &name);
            if s.objects.contains_key(&k) {
                return status(
                    409,
                    "AlreadyExists",
                    &format!("{} \"{name}\" already exists", t.plural),
                );
            }
            let rv = s.bump();
            s.uid += 1;
            let mut obj = body.clone();
            merge(
                &mut obj,
                &json!({"apiVersion": api_version, "kind": kind_of(&t.plural), "metadata": {"uid": format!("uid-{}", s.uid), "resourceVersion": rv, "generation": 1, "creationTimestamp": now()}}),
            );
            if t.ns.is_some() {
                merge(&mut obj, &json!({"metadata": {"namespace": ns}}));
            }
            s.objects.insert(k.clone(), obj);
            if t.plural == "deployments" {
                s.reconcile_deployment(&ns, &name);
            }
            (StatusCode::CREATED, axum::Json(s.objects[&k].clone())).into_response()
        }
        (&Method::PUT | &Method::PATCH, Some(name)) => {
            let k = key(&t.group, &t.plural, &ns, name);
            let Some(old) = s.objects.get(&k).cloned() else {
                return status(
                    404,
                    "NotFound",
                    &format!("{} \"{name}\" not found", t.plural),
                );
            };
            if s.injected_conflict(&k) {
                return conflict();
            }
            let content_type = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let mut new = if method == Method::PUT {
                body.clone()
            } else if content_type.contains("merge-patch") {
                let mut n = old.clone();
                merge(&mut n, &body);
                n
            } else {
                return status(
                    415,
                    "UnsupportedMediaType",
                    &format!("the fake serves merge patches, not {content_type}"),
                );
            };
            let sent_rv = new["metadata"]["resourceVersion"]
                .as_str()
                .map(str::to_string);
            // A PUT carries the version it read; a merge patch may name one as a precondition.
            let named_rv = if method == Method::PUT {
                sent_rv
            } else {
                body["metadata"]["resourceVersion"]
                    .as_str()
                    .map(str::to_string)
            };
            if named_rv
                .is_some_and(|rv| Some(rv.as_str()) != old["metadata"]["resourceVersion"].as_str())
            {
                return conflict();
            }
            if t.plural == "persistentvolumeclaims"
                && let Some(refused) = Inner::pvc_refusal(&old, &new)
            {
                return refused;
            }
            let spec_changed = new["spec"] != old["spec"];
            let generation =
                old["metadata"]["generation"].as_i64().unwrap_or(1) + i64::from(spec_changed);
            let rv = s.bump();
            merge(
                &mut new,
                &json!({"metadata": {"uid": old["metadata"]["uid"], "resourceVersion": rv, "generation": generation}, "status": old["status"]}),
            );
            s.objects.insert(k.clone(), new);
            if t.plural == "deployments" && spec_changed {
                s.reconcile_deployment(&ns, name);
            }
            ok(s.objects[&k].clone())
        }
        (&Method::DELETE, Some(name)) => {
            match s.objects.remove(&key(&t.group, &t.plural, &ns, name)) {
                Some(_) => ok(
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": {"name": name, "kind": t.plural}}),
                ),
                None => status(
                    404,
                    "NotFound",
                    &format!("{} \"{name}\" not found", t.plural),
                ),
            }
        }
        _ => status(405, "MethodNotAllowed", "method not allowed"),
    }
}

impl FakeKube {
    /// Starts with the RBAC rules of a manifest (None: everything allowed).
    pub async fn start(rbac: Option<&Path>) -> FakeKube {
        let inner = Arc::new(Mutex::new(Inner {
            rules: rbac.map(rbac_rules),
            ..Default::default()
        }));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeKube { base, inner }
    }

    /// Writes a kubeconfig for Reflex's service account into `dir`; returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        self.kubeconfig_as(dir, "kubeconfig", "fake-token")
    }

    /// Writes a kubeconfig for the cluster admin (test setup, not held to RBAC).
    pub fn admin_kubeconfig(&self, dir: &Path) -> PathBuf {
        self.kubeconfig_as(dir, "admin-kubeconfig", "admin-token")
    }

    fn kubeconfig_as(&self, dir: &Path, file: &str, token: &str) -> PathBuf {
        let path = dir.join(file);
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\nusers:\n- name: reflex\n  user:\n    token: {token}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: reflex\ncurrent-context: fake\n",
            self.base
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The next `n` writes answer 409, as if another writer got there first.
    pub fn inject_conflicts(&self, n: u32) {
        self.inner.lock().unwrap().conflicts = n;
    }

    /// From now on, enforce the RBAC rules of this manifest.
    pub fn enforce(&self, rbac: &Path) {
        self.inner.lock().unwrap().rules = Some(rbac_rules(rbac));
    }

    /// Forgets what was used so far (e.g. by test setup).
    pub fn reset_used(&self) {
        self.inner.lock().unwrap().used.clear();
    }

    /// Every (verb, group, resource) requested so far.
    pub fn used(&self) -> BTreeSet<(String, String, String)> {
        self.inner.lock().unwrap().used.clone()
    }

    /// Each eviction granted so far: the pod (`ns/name`) and the grace period it asked for.
    pub fn evictions(&self) -> Vec<(String, Option<i64>)> {
        self.inner.lock().unwrap().evictions.clone()
    }

    /// Sets what a container's log holds (`previous`: the one that terminated before).
    pub fn set_log(&self, ns: &str, pod: &str, container: &str, previous: bool, text: &str) {
        let k = (
            ns.to_string(),
            pod.to_string(),
            container.to_string(),
            previous,
        );
        self.inner.lock().unwrap().logs.insert(k, text.to_string());
    }

    /// Requests served so far.
    pub fn requests(&self) -> usize {
        self.inner.lock().unwrap().requests
    }

    /// An object as stored (`group/plural/ns/name`).
    pub fn object(&self, group: &str, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.inner
            .lock()
            .unwrap()
            .objects
            .get(&key(group, plural, ns, name))
            .cloned()
    }
}

/// Creates (`create`) or merge-patches (`patch`) a Deployment as the cluster admin, through the
/// API as a real cluster would take it.
pub async fn admin_write(fake: &FakeKube, dir: &Path, how: &str, ns: &str, body: Value) {
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::api::{Api, Patch, PatchParams, PostParams};
    let kc = kube::config::Kubeconfig::read_from(fake.admin_kubeconfig(dir)).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    let api: Api<Deployment> = Api::namespaced(kube::Client::try_from(cfg).unwrap(), ns);
    if how == "create" {
        let d: Deployment = serde_json::from_value(body).unwrap();
        api.create(&PostParams::default(), &d).await.unwrap();
    } else {
        let name = body["metadata"]["name"].as_str().unwrap().to_string();
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&body))
            .await
            .unwrap();
    }
}
