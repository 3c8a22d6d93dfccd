//! The closed vocabulary of step actions and the arguments each takes.
//!
//! Arguments are checked twice: at load (structure, with templates still unrendered strings)
//! and at execution (the rendered JSON, deserialized into the same structs by the executor).

use super::template::Quoting;
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// A step action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Record a rendered message in the run (and the log).
    Log,
    /// Run a sandboxed Rhai script; its value is the step output.
    Script,
    /// Wait for a duration.
    Wait,
    /// Run a command on an inventory host over SSH.
    SshRun,
    /// Measure a filesystem, run cleanup commands, measure again, report the space reclaimed.
    DiskCleanup,
    /// A generic HTTP request.
    Http,
    /// Poll a Prometheus query until a condition holds, or fail at the timeout.
    Verify,
    /// Scale a Deployment or StatefulSet through its scale subresource.
    KubeScale,
    /// Roll a Deployment back to its previous (or a given) revision.
    KubeRollback,
    /// Rollout restart (the `kubectl.kubernetes.io/restartedAt` annotation).
    KubeRestart,
    /// Delete a pod.
    KubeDeletePod,
    /// Mark a node unschedulable.
    KubeCordon,
    /// Mark a node schedulable.
    KubeUncordon,
    /// Merge-patch any object.
    KubePatch,
    /// Point a Service's selector at another set of pods (a standby), once enough are Ready.
    KubeFailover,
    /// Set ingress-nginx rate limits on an Ingress.
    KubeRateLimit,
    /// Merge outlier detection (and connection limits) into an Istio DestinationRule.
    KubeCircuitBreak,
    /// Cordon a node and evict its pods through the Eviction API (PodDisruptionBudgets hold).
    KubeDrain,
    /// Grow a PersistentVolumeClaim's storage request, within a bound.
    KubeExpandPvc,
    /// Evidence: a pod's (or a selector's pods') recent log lines.
    KubeLogs,
    /// Evidence: an object's recent events, newest first.
    KubeEvents,
    /// Evidence: a workload's, pod's or node's state in brief (replicas, conditions, restarts).
    KubeDescribe,
    /// Evidence: a Deployment's recent rollouts (revision, images, time, change-cause).
    KubeHistory,
    /// Evidence: a Prometheus query over a range, drawn as a PNG chart.
    PrometheusGraph,
    /// Turn a feature flag off.
    FlagDisable,
    /// Turn a feature flag on.
    FlagEnable,
}

impl serde::Serialize for Action {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a top-level argument is treated at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgKind {
    /// A template, rendered with this quoting.
    Template(Quoting),
    /// Code or data taken as written (a Rhai script is not templated).
    Verbatim,
}

impl Action {
    /// Every action, for docs and error messages.
    pub const ALL: &'static [Action] = &[
        Action::Log,
        Action::Script,
        Action::Wait,
        Action::SshRun,
        Action::DiskCleanup,
        Action::Http,
        Action::Verify,
        Action::KubeScale,
        Action::KubeRollback,
        Action::KubeRestart,
        Action::KubeDeletePod,
        Action::KubeCordon,
        Action::KubeUncordon,
        Action::KubePatch,
        Action::KubeFailover,
        Action::KubeRateLimit,
        Action::KubeCircuitBreak,
        Action::KubeDrain,
        Action::KubeExpandPvc,
        Action::KubeLogs,
        Action::KubeEvents,
        Action::KubeDescribe,
        Action::KubeHistory,
        Action::PrometheusGraph,
        Action::FlagDisable,
        Action::FlagEnable,
    ];

    /// Looks an action up by its playbook name.
    pub fn parse(name: &str) -> Option<Action> {
        Self::ALL.iter().copied().find(|a| a.name() == name)
    }

    /// The name playbooks use.
    pub fn name(self) -> &'static str {
        match self {
            Action::Log => "log",
            Action::Script => "script",
            Action::Wait => "wait",
            Action::SshRun => "ssh.run",
            Action::DiskCleanup => "disk_cleanup",
            Action::Http => "http",
            Action::Verify => "verify",
            Action::KubeScale => "kube.scale",
            Action::KubeRollback => "kube.rollback",
            Action::KubeRestart => "kube.restart",
            Action::KubeDeletePod => "kube.delete_pod",
            Action::KubeCordon => "kube.cordon",
            Action::KubeUncordon => "kube.uncordon",
            Action::KubePatch => "kube.patch",
            Action::KubeFailover => "kube.failover",
            Action::KubeRateLimit => "kube.rate_limit",
            Action::KubeCircuitBreak => "kube.circuit_break",
            Action::KubeDrain => "kube.drain",
            Action::KubeExpandPvc => "kube.expand_pvc",
            Action::KubeLogs => "kube.logs",
            Action::KubeEvents => "kube.events",
            Action::KubeDescribe => "kube.describe",
            Action::KubeHistory => "kube.history",
            Action::PrometheusGraph => "prometheus.graph",
            Action::FlagDisable => "feature_flag.disable",
            Action::FlagEnable => "feature_flag.enable",
        }
    }

    /// Whether it acts on a Kubernetes cluster.
    pub fn is_kube(self) -> bool {
        self.name().starts_with("kube.")
    }

    /// Whether it only reads (evidence): it changes nothing, so it runs in dry runs and shadow
    /// runs too, and an undo has nothing to take back.
    pub fn reads_only(self) -> bool {
        matches!(
            self,
            Action::KubeLogs
                | Action::KubeEvents
                | Action::KubeDescribe
                | Action::KubeHistory
                | Action::PrometheusGraph
        )
    }

    /// Whether it changes something outside Reflex (a host, a cluster, a flag, an endpoint):
    /// what blast-radius budgets count. Evidence, `log`, `script`, `wait` and `verify` do not.
    pub fn changes_something(self) -> bool {
        !self.reads_only()
            && !matches!(
                self,
                Action::Log | Action::Script | Action::Wait | Action::Verify
            )
    }

    /// How argument `arg` is treated.
    pub fn arg_kind(self, arg: &str) -> ArgKind {
        match (self, arg) {
            (Action::Script, "script") => ArgKind::Verbatim,
            // Commands run by a remote shell: every value from the alert becomes one quoted word.
            (Action::SshRun, "command") | (Action::DiskCleanup, "commands") => {
                ArgKind::Template(Quoting::Shell)
            }
            // Alert values in a URL are percent-encoded: they cannot change host, path or query.
            (Action::Http, "url") => ArgKind::Template(Quoting::Url),
            // Alert values in a PromQL string literal are escaped: they cannot end it.
            (Action::Verify | Action::PrometheusGraph, "query") => {
                ArgKind::Template(Quoting::PromQl)
            }
            // Compiled at load and evaluated with `value` in scope.
            (Action::Verify, "condition") => ArgKind::Verbatim,
            _ => ArgKind::Template(Quoting::Plain),
        }
    }

    /// Structural check of the raw (unrendered) arguments.
    pub fn check(self, args: &serde_json::Value) -> Result<(), String> {
        match self {
            Action::Log => parse::<LogArgs>(args).map(drop),
            Action::SshRun => parse::<SshRunArgs>(args).map(drop),
            Action::KubeScale => {
                let a = parse::<KubeScaleArgs>(args)?;
                let replicas = match &a.replicas {
                    serde_json::Value::String(s) if Self::is_template(s) => None,
                    v => Some(Replicas::parse(v)?),
                };
                // A relative or computed target has no natural bound: the step must give one.
                let unbounded = !matches!(replicas, Some(Replicas::Absolute(_)));
                if unbounded && a.max.is_none() {
                    return Err("`max`: required when `replicas` is relative (+n/-n), a factor (xN) or templated".into());
                }
                match (a.min, a.max) {
                    (Some(lo), Some(hi)) if lo > hi => Err("`min`: must not exceed max".into()),
                    _ => Ok(()),
                }
            }
            Action::KubeRollback => parse::<KubeRollbackArgs>(args).map(drop),
            Action::KubeRestart => parse::<KubeWorkloadArgs>(args).map(drop),
            Action::KubeDeletePod => parse::<KubePodArgs>(args).map(drop),
            Action::KubeCordon | Action::KubeUncordon => parse::<KubeNodeArgs>(args).map(drop),
            Action::KubePatch => parse::<KubePatchArgs>(args).map(drop),
            Action::KubeFailover
            | Action::KubeRateLimit
            | Action::KubeCircuitBreak
            | Action::KubeDrain
            | Action::KubeExpandPvc => self.check_catalogue(args),
            Action::FlagDisable | Action::FlagEnable => parse::<FlagArgs>(args).map(drop),
            Action::KubeLogs
            | Action::KubeEvents
            | Action::KubeDescribe
            | Action::KubeHistory
            | Action::PrometheusGraph => self.check_evidence(args),
            Action::Http => {
                let a = parse::<HttpArgs>(args)?;
                let literal = !Self::is_template(&a.url);
                if literal && !a.url.starts_with("http://") && !a.url.starts_with("https://") {
                    return Err("`url`: must start with http:// or https://".into());
                }
                Ok(())
            }
            Action::Verify => {
                let a = parse::<VerifyArgs>(args)?;
                for (name, d) in [("interval", &a.interval), ("for", &a.window)] {
                    if let Some(d) = d.as_deref().filter(|d| !Self::is_template(d)) {
                        crate::time::parse_duration(d).map_err(|e| format!("`{name}`: {e}"))?;
                    }
                }
                Ok(())
            }
            Action::DiskCleanup => {
                let a = parse::<DiskCleanupArgs>(args)?;
                match a.target_percent {
                    Some(p) if !(0.0..=100.0).contains(&p) => {
                        Err("`target_percent`: must be between 0 and 100".into())
                    }
                    _ => Ok(()),
                }
            }
            Action::Script => parse::<ScriptArgs>(args).map(drop),
            Action::Wait => {
                let w = parse::<WaitArgs>(args)?;
                if Self::is_template(&w.duration) {
                    Ok(())
                } else {
                    crate::time::parse_duration(&w.duration)
                        .map(drop)
                        .map_err(|e| format!("`duration`: {e}"))
                }
            }
        }
    }

    /// Structural check of the mitigation catalogue's Kubernetes actions.
    fn check_catalogue(self, args: &serde_json::Value) -> Result<(), String> {
        match self {
            Action::KubeFailover => {
                let a = parse::<KubeFailoverArgs>(args)?;
                if a.selector.is_empty() {
                    return Err("`selector`: name at least one label to set".into());
                }
                Ok(())
            }
            Action::KubeRateLimit => {
                let a = parse::<KubeRateLimitArgs>(args)?;
                if a.rps == 0 || a.burst_multiplier == Some(0) || a.connections == Some(0) {
                    return Err("`rps`, `burst_multiplier`, `connections`: at least 1".into());
                }
                Ok(())
            }
            Action::KubeCircuitBreak => {
                let a = parse::<KubeCircuitBreakArgs>(args)?;
                for (name, d) in [
                    ("interval", &a.interval),
                    ("base_ejection_time", &a.base_ejection_time),
                ] {
                    if !Self::is_template(d) {
                        crate::time::parse_duration(d).map_err(|e| format!("`{name}`: {e}"))?;
                    }
                }
                if a.max_ejection_percent > 100 {
                    return Err("`max_ejection_percent`: at most 100".into());
                }
                Ok(())
            }
            Action::KubeDrain => {
                let a = parse::<KubeDrainArgs>(args)?;
                match &a.timeout {
                    Some(t) if !Self::is_template(t) => crate::time::parse_duration(t)
                        .map(drop)
                        .map_err(|e| format!("`timeout`: {e}")),
                    _ => Ok(()),
                }
            }
            Action::KubeExpandPvc => {
                let a = parse::<KubeExpandPvcArgs>(args)?;
                for (name, q) in [("size", &a.size), ("max", &a.max)] {
                    if !Self::is_template(q) {
                        quantity_bytes(q).map_err(|e| format!("`{name}`: {e}"))?;
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Structural check of the evidence actions.
    fn check_evidence(self, args: &serde_json::Value) -> Result<(), String> {
        match self {
            Action::KubeLogs => {
                let a = parse::<KubeLogsArgs>(args)?;
                if a.pod.is_some() == a.selector.is_some() {
                    return Err("name either `pod` or `selector` (a label selector)".into());
                }
                if !(1..=MAX_LOG_LINES).contains(&a.lines) {
                    return Err(format!("`lines`: between 1 and {MAX_LOG_LINES}"));
                }
                Ok(())
            }
            Action::KubeEvents => {
                let a = parse::<KubeEventsArgs>(args)?;
                if !(1..=MAX_EVENTS).contains(&a.limit) {
                    return Err(format!("`limit`: between 1 and {MAX_EVENTS}"));
                }
                Ok(())
            }
            Action::KubeDescribe => {
                let a = parse::<KubeDescribeArgs>(args)?;
                match a.kind.as_str() {
                    "Deployment" | "StatefulSet" | "Pod" if a.namespace.is_none() => {
                        Err(format!("`namespace`: required for a {}", a.kind))
                    }
                    "Deployment" | "StatefulSet" | "Pod" | "Node" => Ok(()),
                    other if Self::is_template(other) => Ok(()),
                    other => Err(format!(
                        "`kind`: {other:?}; kube.describe takes Deployment, StatefulSet, Pod or Node"
                    )),
                }
            }
            Action::KubeHistory => {
                let a = parse::<KubeHistoryArgs>(args)?;
                if !(1..=MAX_HISTORY).contains(&a.limit) {
                    return Err(format!("`limit`: between 1 and {MAX_HISTORY}"));
                }
                Ok(())
            }
            Action::PrometheusGraph => {
                let a = parse::<PrometheusGraphArgs>(args)?;
                for (name, d) in [("range", Some(&a.range)), ("step", a.step.as_ref())] {
                    if let Some(d) = d.filter(|d| !Self::is_template(d)) {
                        crate::time::parse_duration(d).map_err(|e| format!("`{name}`: {e}"))?;
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn is_template(s: &str) -> bool {
        super::template::Template::has_holes(s)
    }
}

/// Deserializes action arguments from JSON, with serde's message on failure.
pub fn parse<T: DeserializeOwned>(args: &serde_json::Value) -> Result<T, String> {
    serde_json::from_value(args.clone()).map_err(|e| e.to_string())
}

/// Most log lines `kube.logs` reads.
pub const MAX_LOG_LINES: u32 = 5000;
/// Most events `kube.events` lists.
pub const MAX_EVENTS: u32 = 200;
/// Most rollouts `kube.history` lists.
pub const MAX_HISTORY: u32 = 50;

/// `kube.logs`: the last lines of a pod's log, or of each pod a selector matches.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeLogsArgs {
    /// Cluster name.
    pub cluster: Option<String>,
    /// Namespace.
    pub namespace: String,
    /// The pod.
    pub pod: Option<String>,
    /// Or a label selector (`app=api`): its pods' logs, at most five pods.
    pub selector: Option<String>,
    /// The container (default: the pod's first).
    pub container: Option<String>,
    /// Lines from the end.
    #[serde(default = "hundred")]
    pub lines: u32,
    /// The previous container's log (the one that crashed).
    #[serde(default)]
    pub previous: bool,
}

fn hundred() -> u32 {
    100
}

/// `kube.events`: an object's events, newest first.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeEventsArgs {
    /// Cluster name.
    pub cluster: Option<String>,
    /// Namespace.
    pub namespace: String,
    /// The object's kind (`Pod`, `Deployment`, …).
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Events listed at most.
    #[serde(default = "twenty")]
    pub limit: u32,
}

fn twenty() -> u32 {
    20
}

/// `kube.describe`: a Deployment's, StatefulSet's, Pod's or Node's state in brief.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeDescribeArgs {
    /// Cluster name.
    pub cluster: Option<String>,
    /// Namespace (none for a Node).
    pub namespace: Option<String>,
    /// `Deployment`, `StatefulSet`, `Pod` or `Node`.
    pub kind: String,
    /// Name.
    pub name: String,
}

/// `kube.history`: a Deployment's recent rollouts.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeHistoryArgs {
    /// Cluster name.
    pub cluster: Option<String>,
    /// Namespace.
    pub namespace: String,
    /// The Deployment.
    pub deployment: String,
    /// Rollouts listed at most, newest first.
    #[serde(default = "five")]
    pub limit: u32,
}

fn five() -> u32 {
    5
}

/// `prometheus.graph`: a query over a range, drawn.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrometheusGraphArgs {
    /// PromQL (alert values in string literals are escaped).
    pub query: String,
    /// How far back from now (`1h`).
    #[serde(default = "one_hour")]
    pub range: String,
    /// Resolution (default: the range over 240 points).
    pub step: Option<String>,
    /// The chart's title (default: the query).
    pub title: Option<String>,
    /// The unit of the values, shown on the axis (`%`, `s`, `req/s`).
    pub unit: Option<String>,
}

fn one_hour() -> String {
    "1h".into()
}

/// `log`: record a message.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogArgs {
    /// The message (templated).
    pub message: String,
}

/// `script`: run Rhai code with `alert`, `labels`, `annotations` and `params` in scope.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptArgs {
    /// Rhai source, compiled at load.
    pub script: String,
}

/// `wait`: pause the run.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitArgs {
    /// How long, e.g. `30s`.
    pub duration: String,
}

/// `ssh.run`: run a command on an inventory host.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshRunArgs {
    /// Inventory host name or alias (templated; must be in the inventory).
    pub host: String,
    /// Shell command; template holes are shell-quoted.
    pub command: String,
    /// Exit codes that count as success (default: 0).
    #[serde(default = "zero")]
    pub ok_exit_codes: Vec<i32>,
}

fn zero() -> Vec<i32> {
    vec![0]
}

/// `disk_cleanup`: free space on a host's filesystem and report what was reclaimed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskCleanupArgs {
    /// Inventory host name or alias.
    pub host: String,
    /// A path on the filesystem to measure (e.g. the alert's `mountpoint`).
    pub path: String,
    /// Success when usage after cleanup is below this percentage.
    pub target_percent: Option<f64>,
    /// Cleanup commands, in order (default: `ssh.cleanup_commands`); holes are shell-quoted.
    pub commands: Option<Vec<String>>,
}

/// `http`: a generic HTTP request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpArgs {
    /// Method (default GET).
    #[serde(default = "get")]
    pub method: String,
    /// URL; template holes are percent-encoded.
    pub url: String,
    /// Extra headers.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Body: a string is sent as is, anything else as JSON.
    pub body: Option<serde_json::Value>,
    /// Statuses that count as success (default: any 2xx).
    #[serde(default)]
    pub expect_status: Vec<u16>,
    /// A credential from `credentials:` in reflex.yaml (never from the playbook).
    pub credential: Option<String>,
}

fn get() -> String {
    "GET".into()
}

/// `verify`: poll a Prometheus query until `condition` holds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyArgs {
    /// PromQL; holes inside string literals are escaped.
    pub query: String,
    /// Rhai over `value` (the first sample, a number) and `values` (all of them), e.g.
    /// `value < 0.01`. No samples: it does not hold.
    pub condition: String,
    /// Time between polls (default 10s).
    pub interval: Option<String>,
    /// A verification window: once the condition holds, it must go on holding at every poll
    /// for this long (`10m`), or the step fails.
    #[serde(rename = "for")]
    pub window: Option<String>,
    /// Whether a new occurrence of the run's own alert during the window fails the step
    /// (default: it does).
    #[serde(default = "yes")]
    pub fail_if_refires: bool,
}

fn yes() -> bool {
    true
}

/// A replica count: absolute (`5`), relative (`+2`, `-1`) or a factor (`x2`, `x1.5`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Replicas {
    /// Exactly this many.
    Absolute(i32),
    /// This many more (or fewer).
    Relative(i32),
    /// Current times this, rounded up.
    Factor(f64),
}

impl Replicas {
    /// Parses a number or a string form.
    pub fn parse(v: &serde_json::Value) -> Result<Replicas, String> {
        let bad =
            || format!("`replicas`: {v} is not a count (5), a change (+2, -1) or a factor (x2)");
        match v {
            serde_json::Value::Number(n) => n
                .as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .map(Replicas::Absolute)
                .ok_or_else(bad),
            serde_json::Value::String(s) => {
                let s = s.trim();
                if let Some(f) = s.strip_prefix('x').or_else(|| s.strip_prefix('*')) {
                    f.trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|f| f.is_finite() && *f > 0.0)
                        .map(Replicas::Factor)
                        .ok_or_else(bad)
                } else if s.starts_with('+') || s.starts_with('-') {
                    s.parse::<i32>().map(Replicas::Relative).map_err(|_| bad())
                } else {
                    s.parse::<i32>().map(Replicas::Absolute).map_err(|_| bad())
                }
            }
            _ => Err(bad()),
        }
    }

    /// The target for a current count, clamped to `[min, max]` (and never below 0).
    pub fn target(self, current: i32, min: Option<i32>, max: Option<i32>) -> i32 {
        let raw = match self {
            Replicas::Absolute(n) => i64::from(n),
            Replicas::Relative(d) => i64::from(current) + i64::from(d),
            Replicas::Factor(f) => (f64::from(current) * f).ceil() as i64,
        };
        let lo = i64::from(min.unwrap_or(0).max(0));
        let hi = max.map_or(i64::from(i32::MAX), i64::from);
        raw.clamp(lo, hi.max(lo)) as i32
    }
}

/// `kube.scale`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeScaleArgs {
    /// Cluster name (default: the default cluster).
    pub cluster: Option<String>,
    /// `Deployment` or `StatefulSet`.
    pub kind: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `5`, `+2`, `-1`, `x2`.
    pub replicas: serde_json::Value,
    /// Never below this.
    pub min: Option<i32>,
    /// Never above this (required unless `replicas` is absolute).
    pub max: Option<i32>,
}

/// `kube.rollback`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeRollbackArgs {
    /// Cluster name.
    pub cluster: Option<String>,
    /// Namespace.
    pub namespace: String,
    /// Deployment name.
    pub name: String,
    /// Revision to go back to (default: the previous one).
    pub to_revision: Option<i64>,
    /// Wait until the rollout is complete (within the step timeout).
    #[serde(default)]
    pub wait: bool,
    /// Refused unless the Deployment is at this revision now (an undo's guard against a
    /// deploy made since).
    pub expect_revision: Option<i64>,
}

/// `kube.restart`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeWorkloadArgs {
    /// Cluster name.
    pub cluster: Option<String>,
    /// `Deployment`, `StatefulSet` or `DaemonSet`.
    pub kind: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Conditions over `ready_fraction` (ready over desired, now), `ready`, `desired` that
    /// must hold to restart.
    pub guard: Option<String>,
}

/// `kube.delete_pod`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubePodArgs {
    /// Cluster name.
    pub cluster: Option<String>,
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Conditions over `ready_fraction` (ready replicas of the pod's workload after the
    /// delete, over desired), `ready_after`, `desired` that must hold to delete.
    pub guard: Option<String>,
}

/// `kube.cordon`, `kube.uncordon`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeNodeArgs {
    /// Cluster name.
    pub cluster: Option<String>,
    /// Node name.
    pub node: String,
    /// Conditions over `schedulable_nodes_after` (a fraction of all nodes) and `nodes` that
    /// must hold to cordon, besides the floor every cordon keeps.
    #[serde(default)]
    pub guard: Option<String>,
}

/// `kube.patch`: a JSON merge patch.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubePatchArgs {
    /// Cluster name.
    pub cluster: Option<String>,
    /// e.g. `apps/v1`, `v1`.
    pub api_version: String,
    /// e.g. `Deployment`.
    pub kind: String,
    /// Namespace (absent: a cluster-scoped object).
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// The merge patch.
    pub patch: serde_json::Value,
    /// Refused unless the fields named here have these values now (e.g.
    /// `{spec: {replicas: 5}}`): a change made by someone else since is not clobbered.
    pub expect: Option<serde_json::Value>,
}

/// `kube.failover`: set keys of a Service's selector.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeFailoverArgs {
    /// Cluster name.
    pub cluster: Option<String>,
    /// Namespace.
    pub namespace: String,
    /// The Service.
    pub service: String,
    /// The selector keys to set (e.g. `track: standby`); the others are kept.
    pub selector: std::collections::BTreeMap<String, String>,
    /// Ready pods the new selector must match, or the step is refused.
    #[serde(default = "one")]
    pub min_ready: u32,
}

fn one() -> u32 {
    1
}

/// `kube.rate_limit`: ingress-nginx's rate-limit annotations on an Ingress.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeRateLimitArgs {
    /// Cluster name.
    pub cluster: Option<String>,
    /// Namespace.
    pub namespace: String,
    /// The Ingress.
    pub ingress: String,
    /// Requests per second per client address (`limit-rps`).
    pub rps: u32,
    /// Burst as a multiple of `rps` (`limit-burst-multiplier`).
    pub burst_multiplier: Option<u32>,
    /// Concurrent connections per client address (`limit-connections`).
    pub connections: Option<u32>,
}

/// `kube.circuit_break`: an Istio DestinationRule's outlier detection and connection pool.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeCircuitBreakArgs {
    /// Cluster name.
    pub cluster: Option<String>,
    /// Namespace.
    pub namespace: String,
    /// The DestinationRule.
    pub destination_rule: String,
    /// 5xx answers in a row that eject a host (`consecutive5xxErrors`).
    pub consecutive_errors: u32,
    /// How often hosts are analysed, e.g. `10s`.
    pub interval: String,
    /// How long an ejected host stays out (times the ejections), e.g. `30s`.
    pub base_ejection_time: String,
    /// At most this percentage of hosts ejected.
    pub max_ejection_percent: u32,
    /// TCP connections to a host at most (`connectionPool.tcp.maxConnections`).
    pub max_connections: Option<u32>,
    /// Requests queued for a host at most (`connectionPool.http.http1MaxPendingRequests`).
    pub max_pending_requests: Option<u32>,
}

/// `kube.drain`: cordon, then evict every pod but DaemonSet-owned and mirror pods.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeDrainArgs {
    /// Cluster name.
    pub cluster: Option<String>,
    /// Node name.
    pub node: String,
    /// How long evictions a PodDisruptionBudget refuses are retried (default: the step's
    /// timeout, less a moment to report).
    pub timeout: Option<String>,
    /// Seconds each pod gets to stop (default: its own terminationGracePeriodSeconds).
    pub grace_period: Option<i64>,
    /// As `kube.cordon`'s.
    pub guard: Option<String>,
}

/// `kube.expand_pvc`: grow a PersistentVolumeClaim's storage request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeExpandPvcArgs {
    /// Cluster name.
    pub cluster: Option<String>,
    /// Namespace.
    pub namespace: String,
    /// The PersistentVolumeClaim.
    pub pvc: String,
    /// The new request, e.g. `20Gi`, or `+5Gi` to add to the current one.
    pub size: String,
    /// Never above this, e.g. `100Gi`.
    pub max: String,
}

/// Bytes of a Kubernetes quantity of storage: a number with an optional binary (`Ki`, `Mi`,
/// `Gi`, `Ti`, `Pi`, `Ei`) or decimal (`k`, `M`, `G`, `T`, `P`, `E`) suffix; a leading `+`
/// is kept for the caller (a relative size). Fractions are rounded up to a whole byte.
pub fn quantity_bytes(q: &str) -> Result<u128, String> {
    let s = q.trim().trim_start_matches('+');
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let unit: u128 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        other => {
            return Err(format!(
                "{q:?}: unknown unit {other:?} (use Ki, Mi, Gi, Ti or k, M, G, T)"
            ));
        }
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && frac.is_empty() || frac.contains('.') {
        return Err(format!("{q:?} is not a quantity such as 10Gi"));
    }
    let digits = |d: &str| -> Result<u128, String> {
        if d.is_empty() {
            Ok(0)
        } else {
            d.parse::<u128>()
                .map_err(|_| format!("{q:?} is not a quantity such as 10Gi"))
        }
    };
    let scale = 10u128
        .checked_pow(frac.len() as u32)
        .filter(|_| frac.len() <= 18);
    let scale = scale.ok_or_else(|| format!("{q:?}: too many decimals"))?;
    let too_big = || format!("{q:?} is too large");
    let whole = digits(whole)?.checked_mul(unit).ok_or_else(too_big)?;
    let frac = digits(frac)?
        .checked_mul(unit)
        .ok_or_else(too_big)?
        .div_ceil(scale);
    whole.checked_add(frac).ok_or_else(too_big)
}

/// `feature_flag.disable`, `feature_flag.enable`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlagArgs {
    /// A provider from `feature_flags:` in reflex.yaml.
    pub provider: String,
    /// The flag key.
    pub flag: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_catalogues_arguments_are_checked_at_load() {
        let check = |action: Action, args: serde_json::Value| action.check(&args);
        let ns = json!("shop");
        assert!(
            check(
                Action::KubeFailover,
                json!({"namespace": ns, "service": "s", "selector": {"track": "b"}})
            )
            .is_ok()
        );
        let e = check(
            Action::KubeFailover,
            json!({"namespace": ns, "service": "s", "selector": {}}),
        )
        .unwrap_err();
        assert!(e.contains("selector"), "{e}");
        let e = check(
            Action::KubeRateLimit,
            json!({"namespace": ns, "ingress": "i", "rps": 0}),
        )
        .unwrap_err();
        assert!(e.contains("at least 1"), "{e}");
        let breaker = |percent: u32, interval: &str| {
            json!({"namespace": ns, "destination_rule": "d", "consecutive_errors": 5, "interval": interval,
                   "base_ejection_time": "30s", "max_ejection_percent": percent})
        };
        assert!(check(Action::KubeCircuitBreak, breaker(50, "10s")).is_ok());
        assert!(
            check(Action::KubeCircuitBreak, breaker(50, "{{ params.every }}")).is_ok(),
            "a template is checked when rendered"
        );
        assert!(
            check(Action::KubeCircuitBreak, breaker(101, "10s"))
                .unwrap_err()
                .contains("at most 100")
        );
        assert!(
            check(Action::KubeCircuitBreak, breaker(50, "10 fortnights"))
                .unwrap_err()
                .contains("interval")
        );
        assert!(
            check(Action::KubeDrain, json!({"node": "n1", "timeout": "2M"}))
                .unwrap_err()
                .contains("timeout")
        );
        let pvc = |size: &str| json!({"namespace": ns, "pvc": "p", "size": size, "max": "100Gi"});
        assert!(check(Action::KubeExpandPvc, pvc("+5Gi")).is_ok());
        assert!(
            check(Action::KubeExpandPvc, pvc("5GB"))
                .unwrap_err()
                .contains("size")
        );
        let e = check(
            Action::KubeExpandPvc,
            json!({"namespace": ns, "pvc": "p", "size": "1Gi", "max": "1Gi", "extra": 1}),
        )
        .unwrap_err();
        assert!(e.contains("extra"), "unknown arguments are refused: {e}");
    }

    #[test]
    fn storage_quantities_are_read_as_kubernetes_reads_them() {
        for (q, bytes) in [
            ("10Gi", 10 << 30),
            ("1.5Gi", 3 << 29),
            ("500M", 500_000_000),
            ("+5Gi", 5 << 30),
            ("1024", 1024),
            ("0.5Ki", 512),
        ] {
            assert_eq!(quantity_bytes(q), Ok(bytes), "{q}");
        }
        for bad in [
            "",
            "Gi",
            "10GB",
            "1..2Gi",
            "ten",
            "99999999999999999999999999999999999999Ei",
        ] {
            assert!(quantity_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replicas_forms_and_clamping() {
        let r = |v: serde_json::Value| Replicas::parse(&v).unwrap();
        assert_eq!(r(json!(5)).target(2, None, None), 5);
        assert_eq!(r(json!("+2")).target(3, None, Some(10)), 5);
        assert_eq!(r(json!("-5")).target(3, Some(1), Some(10)), 1);
        assert_eq!(
            r(json!("x2")).target(4, None, Some(6)),
            6,
            "a factor respects max"
        );
        assert_eq!(r(json!("x1.5")).target(3, None, Some(100)), 5, "rounded up");
        for bad in [
            json!("lots"),
            json!("x0"),
            json!("x-1"),
            json!(1.5),
            json!(null),
        ] {
            assert!(Replicas::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn relative_scaling_needs_a_max() {
        let args = |replicas: serde_json::Value| json!({"kind": "Deployment", "namespace": "a", "name": "b", "replicas": replicas});
        assert!(Action::KubeScale.check(&args(json!(3))).is_ok());
        for r in [json!("+2"), json!("x2"), json!("{{ params.n }}")] {
            let e = Action::KubeScale.check(&args(r.clone())).unwrap_err();
            assert!(e.contains("max"), "{r}: {e}");
        }
        let mut ok = args(json!("x2"));
        ok["max"] = json!(10);
        assert!(Action::KubeScale.check(&ok).is_ok());
    }
}
