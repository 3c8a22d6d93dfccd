//! Undo: the steps that take back what a run changed, from what each step recorded before and
//! after it acted. Each restoring step names the value the run left (`expect`), so a field
//! someone changed since is refused, not clobbered; actions that cannot be taken back are
//! listed, never skipped silently.

use crate::playbook::PlannedStep;
use crate::playbook::actions::Action;
use crate::playbook::spec::{OnFailure, Phase};
use crate::store::{StepRecord, StepState};
use serde::Serialize;
use serde_json::{Map, Value, json};

/// What undoing a run would do.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct UndoPlan {
    /// The restoring steps, last change first.
    #[schema(value_type = Vec<Object>)]
    pub steps: Vec<PlannedStep>,
    /// The run's steps that are not taken back, each with why.
    pub skipped: Vec<Skipped>,
}

/// A step of the run an undo leaves alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Skipped {
    /// The step's name.
    pub step: String,
    /// Its action.
    pub action: String,
    /// Why: it cannot be undone, or it changed nothing.
    pub why: String,
}

/// Plans the undo of a run's steps (as recorded), last first. A step is taken back when it
/// changed something: it succeeded, or failed with its changes on record (a drain that
/// cordoned its node). With `force`, restoring steps do not check the values the run left.
pub fn plan(steps: &[StepRecord], force: bool) -> UndoPlan {
    let mut out = UndoPlan::default();
    for step in steps.iter().rev().filter(|s| s.phase == Phase::Main) {
        let recorded = step.output.as_ref().filter(|o| o["before"].is_object());
        let acted = step.state == StepState::Succeeded
            || (step.state == StepState::Failed && recorded.is_some());
        if !acted {
            continue;
        }
        match inverse(step, force) {
            Ok(Some(restore)) => out.steps.push(restore),
            Ok(None) => {}
            Err(why) => out.skipped.push(Skipped {
                step: step.name.clone(),
                action: step.action.to_string(),
                why,
            }),
        }
    }
    // A gate on any change taken back holds the whole undo before its first step.
    let gate = out.steps.iter().find_map(|s| s.approval.clone());
    if let (Some(first), Some(mut gate)) = (out.steps.first_mut(), gate)
        && first.approval.is_none()
    {
        gate.scope = crate::playbook::spec::GateScope::Run;
        first.approval = Some(gate);
    }
    out
}

/// The step that restores what `step` changed; `Ok(None)` for a step with no effect to take
/// back (a log line, a wait, a verification); `Err(why)` for one that cannot be taken back.
fn inverse(step: &StepRecord, force: bool) -> Result<Option<PlannedStep>, String> {
    let out = step.output.clone().unwrap_or(Value::Null);
    if out["changed"] == false {
        return Err("it changed nothing".into());
    }
    let args = &step.args;
    let mut restore = match step.action {
        Action::Log | Action::Wait | Action::Verify | Action::Script => return Ok(None),
        a if a.reads_only() => return Ok(None),
        Action::SshRun
        | Action::DiskCleanup
        | Action::Http
        | Action::KubeDeletePod
        | Action::KubeRestart
        | Action::KubeExpandPvc => return Err(format!("{} cannot be undone", step.action)),
        Action::FlagDisable | Action::FlagEnable => {
            let Some(was) = out["before"].get("state") else {
                return Err("the provider's previous state was not recorded".into());
            };
            let a = json!({"provider": args["provider"], "flag": args["flag"]});
            let action = if was == "DISABLED" {
                Action::FlagDisable
            } else {
                Action::FlagEnable
            };
            return Ok(Some(restoring(step, action, a)));
        }
        // Forward again, to the revision the rollback replaced, if nothing was deployed since.
        Action::KubeRollback => {
            let mut a = json!({"namespace": args["namespace"], "name": args["name"],
                               "to_revision": out["from_revision"]});
            match (&out["revision_after"], force) {
                (_, true) => {}
                (Value::Number(left), false) => a["expect_revision"] = json!(left),
                _ => {
                    return Err(
                        "the revision it left was not recorded (it did not `wait` for \
                                its rollout): undo it with force"
                            .into(),
                    );
                }
            }
            a
        }
        _ => {
            let c = changed(step.action, args, &out["before"], &out["after"])?;
            let mut a = json!({"api_version": c.api_version, "kind": c.kind, "name": c.name, "patch": c.back});
            if let Some(ns) = c.namespace {
                a["namespace"] = ns;
            }
            if !force {
                a["expect"] = c.left;
            }
            a
        }
    };
    if let Some(cluster) = args.get("cluster") {
        restore["cluster"] = cluster.clone();
    }
    let action = match step.action {
        Action::KubeRollback => Action::KubeRollback,
        _ => Action::KubePatch,
    };
    Ok(Some(restoring(step, action, restore)))
}

/// What a Kubernetes action changed: the object, the merge patch that takes it back, and the
/// values the run left (which must still be there).
struct Changed {
    api_version: String,
    kind: String,
    namespace: Option<Value>,
    name: Value,
    back: Value,
    left: Value,
}

impl Changed {
    fn of(
        api_version: &str,
        kind: &str,
        namespace: Option<Value>,
        name: &Value,
        back: Value,
        left: Value,
    ) -> Changed {
        Changed {
            api_version: api_version.to_string(),
            kind: kind.to_string(),
            namespace,
            name: name.clone(),
            back,
            left,
        }
    }
}

fn changed(action: Action, args: &Value, before: &Value, after: &Value) -> Result<Changed, String> {
    let ns = args.get("namespace").cloned();
    let field = |path: &[&str], value: &Value| {
        path.iter()
            .rev()
            .fold(value.clone(), |inner, key| json!({ *key: inner }))
    };
    Ok(match action {
        Action::KubeScale => {
            let kind = args["kind"].as_str().unwrap_or("Deployment");
            let at = ["spec", "replicas"];
            Changed::of(
                "apps/v1",
                kind,
                ns,
                &args["name"],
                field(&at, &before["replicas"]),
                field(&at, &after["replicas"]),
            )
        }
        Action::KubeCordon | Action::KubeUncordon | Action::KubeDrain => {
            let (was, now) = (&before["unschedulable"], &after["unschedulable"]);
            if was == now {
                return Err("the node was already as the run left it".into());
            }
            // A drain's evicted pods are not brought back: their controllers replaced them.
            let at = ["spec", "unschedulable"];
            Changed::of(
                "v1",
                "Node",
                None,
                &args["node"],
                field(&at, was),
                field(&at, now),
            )
        }
        Action::KubeFailover => {
            let at = ["spec", "selector"];
            let back = restore_map(&before["selector"], &after["selector"]);
            Changed::of(
                "v1",
                "Service",
                ns,
                &args["service"],
                field(&at, &back),
                field(&at, &after["selector"]),
            )
        }
        Action::KubeRateLimit => {
            let at = ["metadata", "annotations"];
            let (back, left) = (
                field(&at, &before["annotations"]),
                field(&at, &after["annotations"]),
            );
            Changed::of(
                "networking.k8s.io/v1",
                "Ingress",
                ns,
                &args["ingress"],
                back,
                left,
            )
        }
        Action::KubeCircuitBreak => {
            let at = ["spec", "trafficPolicy"];
            let back = restore_map(&before["trafficPolicy"], &after["trafficPolicy"]);
            let (back, left) = (field(&at, &back), field(&at, &after["trafficPolicy"]));
            Changed::of(
                "networking.istio.io/v1",
                "DestinationRule",
                ns,
                &args["destination_rule"],
                back,
                left,
            )
        }
        Action::KubePatch => {
            let api_version = args["api_version"].as_str().unwrap_or("");
            let kind = args["kind"].as_str().unwrap_or("");
            let back = restore_map(before, after);
            Changed::of(api_version, kind, ns, &args["name"], back, after.clone())
        }
        other => return Err(format!("{other} cannot be undone")),
    })
}

/// A merge patch that turns `after` back into `before`: the values `before` had, and `null`
/// for what `after` has that `before` had not.
fn restore_map(before: &Value, after: &Value) -> Value {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            let mut out: Map<String, Value> = Map::new();
            for (k, now) in a {
                match b.get(k) {
                    None | Some(Value::Null) => {
                        out.insert(k.clone(), Value::Null);
                    }
                    Some(was) if was != now => {
                        out.insert(k.clone(), restore_map(was, now));
                    }
                    Some(_) => {}
                }
            }
            for (k, was) in b.iter().filter(|(k, _)| !a.contains_key(*k)) {
                out.insert(k.clone(), was.clone());
            }
            Value::Object(out)
        }
        (before, _) => before.clone(),
    }
}

/// The restoring step for `step`: named after it, gated as it was.
fn restoring(step: &StepRecord, action: Action, args: Value) -> PlannedStep {
    PlannedStep {
        name: format!("undo {}", step.name),
        action,
        args,
        timeout_ms: step.timeout_ms.map(|t| t as u64),
        // A restore refused (its object changed since) stops the undo there.
        on_failure: OnFailure::Stop,
        approval: step.approval.clone(),
        phase: Phase::Main,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(idx: i64, action: Action, args: Value, output: Value) -> StepRecord {
        StepRecord {
            idx,
            name: format!("s{idx}"),
            action,
            args,
            timeout_ms: None,
            on_failure: OnFailure::Stop,
            state: StepState::Succeeded,
            started_at: None,
            finished_at: None,
            output: Some(output),
            error: None,
            approval: None,
            phase: Phase::Main,
            artifacts: Vec::new(),
        }
    }

    #[test]
    fn each_change_is_taken_back_last_first_naming_the_value_the_run_left() {
        let scale = step(
            0,
            Action::KubeScale,
            json!({"kind": "Deployment", "namespace": "shop", "name": "api", "replicas": "+2", "max": 9}),
            json!({"before": {"replicas": 3}, "after": {"replicas": 5}, "changed": true}),
        );
        let limit = step(
            1,
            Action::KubeRateLimit,
            json!({"namespace": "shop", "ingress": "web", "rps": 5}),
            json!({"before": {"annotations": {"nginx.ingress.kubernetes.io/limit-rps": null}},
                   "after": {"annotations": {"nginx.ingress.kubernetes.io/limit-rps": "5"}}}),
        );
        let note = step(
            2,
            Action::Log,
            json!({"message": "m"}),
            json!({"message": "m"}),
        );
        let ssh = step(
            3,
            Action::SshRun,
            json!({"host": "db-1", "command": "x"}),
            json!({"exit_code": 0}),
        );
        let p = plan(&[scale, limit, note, ssh], false);
        assert_eq!(
            p.skipped,
            vec![Skipped {
                step: "s3".into(),
                action: "ssh.run".into(),
                why: "ssh.run cannot be undone".into()
            }]
        );
        assert_eq!(p.steps.len(), 2);
        assert_eq!(p.steps[0].name, "undo s1");
        assert_eq!(
            p.steps[0].args,
            json!({"api_version": "networking.k8s.io/v1", "kind": "Ingress", "namespace": "shop", "name": "web",
                   "patch": {"metadata": {"annotations": {"nginx.ingress.kubernetes.io/limit-rps": null}}},
                   "expect": {"metadata": {"annotations": {"nginx.ingress.kubernetes.io/limit-rps": "5"}}}})
        );
        assert_eq!(
            p.steps[1].args,
            json!({"api_version": "apps/v1", "kind": "Deployment", "namespace": "shop", "name": "api",
                   "patch": {"spec": {"replicas": 3}}, "expect": {"spec": {"replicas": 5}}})
        );
        assert!(p.steps.iter().all(|s| s.action == Action::KubePatch));
        let forced = plan(
            &[step(
                0,
                Action::KubeScale,
                json!({"kind": "Deployment", "namespace": "shop", "name": "api"}),
                json!({"before": {"replicas": 3}, "after": {"replicas": 5}}),
            )],
            true,
        );
        assert!(
            forced.steps[0].args.get("expect").is_none(),
            "force overwrites"
        );
    }

    #[test]
    fn a_rollback_is_undone_only_when_the_revision_it_left_was_recorded() {
        let args = json!({"namespace": "shop", "name": "web"});
        let waited = step(
            0,
            Action::KubeRollback,
            args.clone(),
            json!({"from_revision": 2, "to_revision": 1, "revision_after": 3}),
        );
        let p = plan(&[waited], false);
        assert_eq!(p.steps[0].action, Action::KubeRollback);
        assert_eq!(
            p.steps[0].args,
            json!({"namespace": "shop", "name": "web", "to_revision": 2, "expect_revision": 3})
        );
        let unwaited = step(
            0,
            Action::KubeRollback,
            args,
            json!({"from_revision": 2, "to_revision": 1}),
        );
        let p = plan(std::slice::from_ref(&unwaited), false);
        assert!(
            p.steps.is_empty() && p.skipped[0].why.contains("undo it with force"),
            "{p:?}"
        );
        assert!(
            plan(&[unwaited], true).steps[0]
                .args
                .get("expect_revision")
                .is_none()
        );
    }

    #[test]
    fn a_merge_patch_back_removes_what_was_added_and_restores_what_changed() {
        let before = json!({"loadBalancer": {"simple": "ROUND_ROBIN"}, "tls": {"mode": "SIMPLE"}});
        let after = json!({"loadBalancer": {"simple": "LEAST_REQUEST"}, "tls": {"mode": "SIMPLE"},
                           "outlierDetection": {"consecutive5xxErrors": 5}});
        assert_eq!(
            restore_map(&before, &after),
            json!({"loadBalancer": {"simple": "ROUND_ROBIN"}, "outlierDetection": null})
        );
    }

    #[test]
    fn steps_that_changed_nothing_or_failed_before_acting_are_not_taken_back() {
        let mut unchanged = step(
            0,
            Action::KubeScale,
            json!({}),
            json!({"before": {"replicas": 3}, "after": {"replicas": 3}, "changed": false}),
        );
        let p = plan(std::slice::from_ref(&unchanged), false);
        assert!(p.steps.is_empty() && p.skipped[0].why == "it changed nothing");
        unchanged.state = StepState::Failed;
        unchanged.output = None;
        assert!(plan(&[unchanged], false).skipped.is_empty(), "never acted");
        // A drain that cordoned its node but could not evict everything is uncordoned.
        let mut drain = step(
            0,
            Action::KubeDrain,
            json!({"node": "n1"}),
            json!({"before": {"unschedulable": false}, "after": {"unschedulable": true}, "left": ["shop/web-2"]}),
        );
        drain.state = StepState::Failed;
        let p = plan(&[drain], false);
        assert_eq!(
            p.steps[0].args["patch"],
            json!({"spec": {"unschedulable": false}})
        );
        assert_eq!(p.steps[0].args["kind"], "Node");
    }
}
