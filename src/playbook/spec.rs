//! The playbook file format, as serde reads it. See docs/playbooks.md for the reference.
//! Unknown keys are errors everywhere: a typo must not silently disable a safety setting.

use crate::alert::AlertStatus;
use serde::{Deserialize, Serialize};

/// One playbook file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaybookSpec {
    /// Unique name: letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// What the playbook is for.
    #[serde(default)]
    pub description: String,
    /// Alertmanager-syntax matchers, all of which must hold (at least one).
    pub matchers: Vec<String>,
    /// Alert statuses the playbook acts on (default: firing only).
    #[serde(default = "firing_only")]
    pub statuses: Vec<AlertStatus>,
    /// Optional Rhai condition over `alert`, `labels`, `annotations`; must return a bool.
    pub when: Option<String>,
    /// Parameters computed from the alert, in order (each may use the ones before it).
    #[serde(default)]
    pub params: serde_yaml::Mapping,
    /// No second run for the same alert (or group) within this duration, e.g. `30m`.
    pub cooldown: Option<String>,
    /// What the cooldown is kept per.
    #[serde(default)]
    pub cooldown_by: CooldownBy,
    /// A new occurrence of the alert joins a queued run of this playbook for it instead of
    /// queuing a second one (default true).
    #[serde(default = "yes")]
    pub coalesce: bool,
    /// `shadow`: record what the steps would do, act on nothing (see `config::Mode`).
    #[serde(default)]
    pub mode: crate::config::Mode,
    /// The older spelling of `mode: shadow`.
    #[serde(default)]
    pub dry_run: bool,
    /// Autonomy earned by verified runs: acting steps need an approval until the playbook has
    /// `approve_until` verified runs in a row; `demote_after` failed verifications (or undos)
    /// in a row put it back behind approval.
    pub autonomy: Option<crate::policy::AutonomyRules>,
    /// At most this many runs of the playbook execute at once (across replicas); the others
    /// wait in the queue, in order. None: no limit beyond the engine's.
    pub concurrency: Option<u32>,
    /// Approval before the first step, covering the whole run: `required`, or a map with
    /// `count`, `expires`, `approvers`.
    pub approval: Option<serde_yaml::Value>,
    /// Kubernetes namespaces this playbook's steps may act in (names, or prefixes ending in
    /// `*`), narrowing what the cluster allows; a step rendered for any other is refused
    /// before the run starts.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// What the run acts on, for per-target limits and the circuit breaker (template; default
    /// the `instance` label, else the alert fingerprint).
    pub target: Option<String>,
    /// Longest a run may execute, approvals aside (default `engine.run_deadline`).
    pub deadline: Option<String>,
    /// What a run does when its alert resolves while it executes: `stop` before its next step
    /// (default), or `continue` to the end. Runs not yet started always end.
    #[serde(default)]
    pub on_resolve: OnResolve,
    /// What a run does when a `verify` step fails: `escalate` (default) or `undo` first.
    #[serde(default)]
    pub on_verify_failure: OnVerifyFailure,
    /// Message sent when a run ends (template; `steps` and `run` in scope too).
    pub report: Option<String>,
    /// The steps, run in order.
    pub steps: Vec<StepSpec>,
    /// Steps run when a step fails and stops the run (escalate: notify, page, roll back).
    /// They run in order whatever each one's outcome; the run still ends `failed`.
    #[serde(default)]
    pub on_failure: Vec<StepSpec>,
}

/// The map form of `approval`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalSpecYaml {
    /// Whether approval is required (default true).
    #[serde(default = "yes")]
    pub required: bool,
    /// Distinct approvers needed (default 1).
    #[serde(default = "one")]
    pub count: u32,
    /// How long the request stays open (default 30m).
    pub expires: Option<String>,
    /// Token names allowed to approve (default: anyone with the approver role).
    #[serde(default)]
    pub approvers: Vec<String>,
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

fn firing_only() -> Vec<AlertStatus> {
    vec![AlertStatus::Firing]
}

/// The key a cooldown is kept per.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CooldownBy {
    /// Per alert (its fingerprint).
    #[default]
    Fingerprint,
    /// Per Alertmanager group (group key; the fingerprint when there is none).
    Group,
}

/// Which part of a run a step belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The playbook's `steps`.
    Main,
    /// The playbook's `on_failure` steps, run when a main step fails and stops the run.
    OnFailure,
}

impl Phase {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Main => "main",
            Phase::OnFailure => "on_failure",
        }
    }
}

/// What an approval gate covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GateScope {
    /// The playbook's gate: before the first step, covering every step.
    Run,
    /// One step's gate.
    Step,
}

impl GateScope {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            GateScope::Run => "run",
            GateScope::Step => "step",
        }
    }
}

/// What a run does when its alert resolves while it executes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnResolve {
    /// Stop before the next step; the run ends `resolved`.
    #[default]
    Stop,
    /// Finish the remaining steps (a cleanup that must not be left half done).
    Continue,
}

/// What a run does when a verification fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnVerifyFailure {
    /// Escalate: the `on_failure` steps run.
    #[default]
    Escalate,
    /// Take back what the run changed (an undo run, see `reflex undo`), then escalate.
    Undo,
}

/// What a failed step does to its run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// The run stops and fails.
    #[default]
    Stop,
    /// The run goes on with the next step.
    Continue,
}

impl OnFailure {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Stop => "stop",
            OnFailure::Continue => "continue",
        }
    }
}

/// One step.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Name shown in the run (default: the action).
    pub name: Option<String>,
    /// The action, e.g. `log`, `script`, `wait`.
    pub action: String,
    /// The action's arguments; strings may hold `{{ }}` templates.
    #[serde(default)]
    pub with: serde_yaml::Mapping,
    /// Step timeout, e.g. `2m` (default: `engine.default_step_timeout`).
    pub timeout: Option<String>,
    /// `stop` (default) or `continue`.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Approval before this step: `required`, or a map with `count`, `expires`, `approvers`.
    pub approval: Option<serde_yaml::Value>,
}
