//! Which playbook, with which parameters: playbook files are compiled at load
//! ([`compile`]), matched against each alert ([`PlaybookSet::evaluate`]) and rendered into
//! a [`Plan`]: the exact steps a run will execute. Depends on [`crate::alert`] only.

pub mod actions;
pub mod compile;
pub mod error;
pub mod locate;
pub mod matcher;
pub mod references;
pub mod script;
pub mod shell;
pub mod spec;
pub mod template;

use crate::alert::{Alert, AlertStatus};
use actions::Action;
use error::PlanError;
use matcher::Matcher;
use rhai::{AST, Dynamic, Scope};
use script::Sandbox;
use serde::Serialize;
use spec::{CooldownBy, OnFailure};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use template::Template;

/// An error in a playbook or config file, at a line.
#[derive(Debug, Clone, Serialize)]
pub struct Diagnostic {
    /// The file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

/// A compiled playbook.
#[derive(Debug)]
pub struct Playbook {
    /// Unique name.
    pub name: String,
    /// Description.
    pub description: String,
    /// The file it came from.
    pub file: PathBuf,
    /// All must match.
    pub matchers: Vec<Matcher>,
    /// Statuses acted on.
    pub statuses: Vec<AlertStatus>,
    /// Optional condition.
    pub when: Option<AST>,
    /// Parameters, in order.
    pub params: Vec<(String, Arg)>,
    /// Cooldown (zero: none).
    pub cooldown: Duration,
    /// What the cooldown is kept per.
    pub cooldown_by: CooldownBy,
    /// A new occurrence joins a queued run instead of queuing a second one.
    pub coalesce: bool,
    /// Record, do not act.
    pub dry_run: bool,
    /// Runs of it executing at once, at most (0: no limit of its own).
    pub concurrency: u32,
    /// Approval covering the whole run, before its first step.
    pub approval: Option<Gate>,
    /// Autonomy earned by verified runs (see [`crate::policy::AutonomyRules`]).
    pub autonomy: Option<crate::policy::AutonomyRules>,
    /// Kubernetes namespaces the steps may act in; empty: what the cluster allows.
    pub namespaces: Vec<String>,
    /// What a run acts on (rendered per alert).
    pub target: Template,
    /// Longest a run may execute; `None` uses the engine default.
    pub deadline: Option<Duration>,
    /// What a run does when its alert resolves while it executes.
    pub on_resolve: spec::OnResolve,
    /// What a run does when a verification fails.
    pub on_verify_failure: spec::OnVerifyFailure,
    /// The run's message template, rendered when it ends with `steps` (outputs by step
    /// name) and `run` (`id`, `state`, `duration_seconds`, `target`) in scope.
    pub report: Option<Template>,
    /// Steps, in order.
    pub steps: Vec<Step>,
    /// Steps run when the run fails.
    pub on_failure: Vec<Step>,
}

/// An approval gate.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Gate {
    /// The playbook's gate (covering every step) or one step's.
    pub scope: spec::GateScope,
    /// Distinct approvers needed.
    pub count: u32,
    /// How long the request stays open, in ms.
    pub expires_ms: u64,
    /// Token names allowed to approve; empty: anyone with the approver role.
    pub approvers: Vec<String>,
}

/// A compiled step.
#[derive(Debug)]
pub struct Step {
    /// Name shown in the run.
    pub name: String,
    /// The action.
    pub action: Action,
    /// Arguments (a map), templates compiled.
    pub args: Arg,
    /// Timeout; `None` uses the engine default.
    pub timeout: Option<Duration>,
    /// What a failure does to the run.
    pub on_failure: OnFailure,
    /// The compiled script of a `script` step.
    pub script: Option<AST>,
    /// Approval needed before this step.
    pub approval: Option<Gate>,
}

/// An argument value with its templates compiled.
#[derive(Debug, Clone)]
pub enum Arg {
    /// Taken as written.
    Literal(serde_json::Value),
    /// Rendered at plan time.
    Template(Template),
    /// A list.
    List(Vec<Arg>),
    /// A map, in file order.
    Map(Vec<(String, Arg)>),
}

impl Arg {
    fn render(
        &self,
        sandbox: &Sandbox,
        scope: &mut Scope<'_>,
    ) -> Result<serde_json::Value, PlanError> {
        Ok(match self {
            Arg::Literal(v) => v.clone(),
            Arg::Template(t) => t.render(sandbox, scope)?,
            Arg::List(items) => items
                .iter()
                .map(|a| a.render(sandbox, scope))
                .collect::<Result<_, _>>()?,
            Arg::Map(entries) => {
                let mut map = serde_json::Map::new();
                for (k, a) in entries {
                    let v = a.render(sandbox, scope).map_err(|e| e.at(k))?;
                    map.insert(k.clone(), v);
                }
                serde_json::Value::Object(map)
            }
        })
    }
}

/// What a run of a playbook for one alert will do, fully rendered.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// What the run acts on.
    pub target: String,
    /// Runs of the playbook executing at once, at most (0: no limit of its own).
    pub concurrency: u32,
    /// Computed parameters.
    pub params: serde_json::Map<String, serde_json::Value>,
    /// Steps with rendered arguments.
    pub steps: Vec<PlannedStep>,
    /// The playbook earns its autonomy: whether its acting steps wait for an approval is
    /// decided when the run reaches them (from the level in the store).
    pub autonomy: bool,
}

impl Plan {
    /// Whether its first step can start without an approval (intake may start it at once).
    pub fn starts_ungated(&self) -> bool {
        !self.autonomy
            && (self.steps.first())
                .is_some_and(|s| s.approval.is_none() && s.phase == spec::Phase::Main)
    }
}

/// One rendered step.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedStep {
    /// Name.
    pub name: String,
    /// The action.
    pub action: Action,
    /// Rendered arguments.
    pub args: serde_json::Value,
    /// Timeout in ms, if the step sets one.
    pub timeout_ms: Option<u64>,
    /// What a failure does.
    pub on_failure: OnFailure,
    /// Approval needed before this step runs (the playbook's gate sits on the first step).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<Gate>,
    /// Main step, or one run when the run fails.
    pub phase: spec::Phase,
}

impl Playbook {
    /// Status and matchers (cheap; no script).
    pub fn accepts(&self, alert: &Alert) -> bool {
        self.statuses.contains(&alert.status)
            && self.matchers.iter().all(|m| m.matches(&alert.labels))
    }

    /// Evaluates `when` (true when there is none).
    pub fn when_holds(&self, sandbox: &Sandbox, scope: &mut Scope<'_>) -> Result<bool, PlanError> {
        let Some(ast) = &self.when else {
            return Ok(true);
        };
        let v = sandbox
            .eval(scope, ast)
            .map_err(|e| PlanError::Script(format!("when: {e}")))?;
        v.as_bool()
            .map_err(|t| PlanError::Script(format!("when: expected a bool, got {t}")))
    }

    /// Renders parameters and steps for an alert. `scope` is [`script::alert_scope`].
    pub fn plan(&self, sandbox: &Sandbox, scope: &mut Scope<'_>) -> Result<Plan, PlanError> {
        let mut params = serde_json::Map::new();
        scope.push("params", Dynamic::from_map(rhai::Map::new()));
        for (name, arg) in &self.params {
            let v = arg
                .render(sandbox, scope)
                .map_err(|e| e.at(format!("params.{name}")))?;
            params.insert(name.clone(), v);
            let as_dynamic =
                rhai::serde::to_dynamic(&params).map_err(|e| PlanError::Script(e.to_string()))?;
            scope.set_value("params", as_dynamic);
        }
        let main = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (spec::Phase::Main, "steps", i, s));
        let escalation = self
            .on_failure
            .iter()
            .enumerate()
            .map(|(i, s)| (spec::Phase::OnFailure, "on_failure", i, s));
        // The playbook's gate stands before its first step that acts: evidence steps before it
        // (logs, a graph) run first, so the person asked sees what they found.
        let gate_at = (self.steps.iter())
            .position(|s| !s.action.reads_only())
            .unwrap_or(0);
        let steps: Vec<PlannedStep> = main
            .chain(escalation)
            .map(|(phase, section, i, s)| {
                let args = s
                    .args
                    .render(sandbox, scope)
                    .map_err(|e| e.at(format!("{section}[{i}] ({})", s.name)))?;
                let run_gate = if (phase, i) == (spec::Phase::Main, gate_at) {
                    self.approval.clone()
                } else {
                    None
                };
                Ok(PlannedStep {
                    name: s.name.clone(),
                    action: s.action,
                    args,
                    timeout_ms: s.timeout.map(|t| t.as_millis() as u64),
                    on_failure: s.on_failure,
                    approval: run_gate.or_else(|| s.approval.clone()),
                    phase,
                })
            })
            .collect::<Result<_, PlanError>>()?;
        if !self.namespaces.is_empty() {
            let outside = steps
                .iter()
                .enumerate()
                .find_map(|(i, s): (usize, &PlannedStep)| {
                    let ns = s.args.get("namespace")?.as_str()?;
                    let allowed = self.namespaces.iter().any(|p| namespace_matches(p, ns));
                    (s.action.is_kube() && !allowed).then(|| (i, ns.to_string()))
                });
            if let Some((i, ns)) = outside {
                return Err(PlanError::Namespace(format!(
                    "steps[{i}]: namespace {ns:?} is not one this playbook may act in \
                     (namespaces: {})",
                    self.namespaces.join(", ")
                )));
            }
        }
        let target = match self
            .target
            .render(sandbox, scope)
            .map_err(|e| e.at("target"))?
        {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        Ok(Plan {
            target,
            concurrency: self.concurrency,
            params,
            steps,
            autonomy: self.autonomy.is_some(),
        })
    }
}

/// `pattern` is a Kubernetes namespace name, or a prefix followed by `*`.
pub fn namespace_matches(pattern: &str, namespace: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => namespace.starts_with(prefix),
        None => pattern == namespace,
    }
}

/// A playbook that matched an alert, with its plan or why it could not be planned.
pub struct Matched {
    /// The playbook.
    pub playbook: Arc<Playbook>,
    /// The plan, or the error that stops the run before it starts.
    pub plan: Result<Plan, PlanError>,
}

/// The playbooks in force, indexed for matching.
pub struct PlaybookSet {
    /// All playbooks, sorted by name.
    pub playbooks: Vec<Arc<Playbook>>,
    /// The shared sandbox their scripts were compiled for.
    pub sandbox: Arc<Sandbox>,
    /// Playbooks with an `alertname="…"` matcher, by that name: matching is then not linear
    /// in the number of playbooks.
    by_alertname: HashMap<String, Vec<usize>>,
    /// Playbooks without one; tried for every alert.
    others: Vec<usize>,
}

impl PlaybookSet {
    /// Builds the set; names must be unique.
    pub fn new(
        mut playbooks: Vec<Playbook>,
        sandbox: Arc<Sandbox>,
    ) -> Result<Self, Vec<Diagnostic>> {
        playbooks.sort_by(|a, b| a.name.cmp(&b.name));
        let dups: Vec<Diagnostic> = playbooks
            .windows(2)
            .filter(|w| w[0].name == w[1].name)
            .map(|w| Diagnostic {
                file: w[1].file.clone(),
                line: 1,
                message: format!(
                    "playbook name {:?} is also used by {}",
                    w[1].name,
                    w[0].file.display()
                ),
            })
            .collect();
        if !dups.is_empty() {
            return Err(dups);
        }
        let mut by_alertname: HashMap<String, Vec<usize>> = HashMap::new();
        let mut others = Vec::new();
        for (i, p) in playbooks.iter().enumerate() {
            let eq = p
                .matchers
                .iter()
                .find(|m| m.name == "alertname")
                .and_then(Matcher::equality);
            match eq {
                Some(name) => by_alertname.entry(name.to_string()).or_default().push(i),
                None => others.push(i),
            }
        }
        Ok(PlaybookSet {
            playbooks: playbooks.into_iter().map(Arc::new).collect(),
            sandbox,
            by_alertname,
            others,
        })
    }

    /// An empty set.
    pub fn empty() -> Self {
        Self::new(Vec::new(), Arc::new(Sandbox::new())).unwrap_or_else(|_| unreachable!())
    }

    /// Loads playbooks from files and directories (`*.yaml`, `*.yml`), collecting every error,
    /// including names the config does not define (`refs`).
    pub fn load(paths: &[PathBuf], refs: &references::References) -> Result<Self, Vec<Diagnostic>> {
        let sandbox = Arc::new(Sandbox::new());
        let (playbooks, mut diags) = Self::compile_files(paths, &sandbox);
        diags.extend(refs.check(&playbooks));
        if !diags.is_empty() {
            return Err(diags);
        }
        Self::new(playbooks, sandbox)
    }

    /// Compiles every playbook file: the ones that compile, and the errors of the others.
    pub fn compile_files(paths: &[PathBuf], sandbox: &Sandbox) -> (Vec<Playbook>, Vec<Diagnostic>) {
        let mut playbooks = Vec::new();
        let mut diags = Vec::new();
        for file in playbook_files(paths, &mut diags) {
            let src = match std::fs::read_to_string(&file) {
                Ok(s) => s,
                Err(e) => {
                    diags.push(Diagnostic {
                        file,
                        line: 1,
                        message: format!("cannot read: {e}"),
                    });
                    continue;
                }
            };
            match compile::compile(&file, &src, sandbox) {
                Ok(p) => playbooks.push(p),
                Err(d) => diags.extend(d),
            }
        }
        (playbooks, diags)
    }

    /// A playbook by name.
    pub fn get(&self, name: &str) -> Option<&Arc<Playbook>> {
        self.playbooks
            .binary_search_by(|p| p.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.playbooks[i])
    }

    /// The playbooks an alert matches (status, matchers, `when`), each with its plan.
    pub fn evaluate(&self, alert: &Alert) -> Vec<Matched> {
        let indexed = self
            .by_alertname
            .get(alert.name())
            .map_or(&[][..], Vec::as_slice);
        let mut candidates: Vec<usize> = indexed.iter().chain(&self.others).copied().collect();
        candidates.sort_unstable();
        let mut out = Vec::new();
        let mut base_scope = None;
        for i in candidates {
            let pb = &self.playbooks[i];
            if !pb.accepts(alert) {
                continue;
            }
            let mut scope = base_scope
                .get_or_insert_with(|| script::alert_scope(alert))
                .clone();
            let plan = match pb.when_holds(&self.sandbox, &mut scope) {
                Ok(false) => continue,
                Ok(true) => pb.plan(&self.sandbox, &mut scope),
                Err(e) => Err(e),
            };
            out.push(Matched {
                playbook: pb.clone(),
                plan,
            });
        }
        out
    }
}

fn playbook_files(paths: &[PathBuf], diags: &mut Vec<Diagnostic>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            match std::fs::read_dir(path) {
                Ok(entries) => {
                    let mut found: Vec<PathBuf> = entries
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| is_playbook_file(p))
                        .collect();
                    found.sort();
                    files.extend(found);
                }
                Err(e) => diags.push(Diagnostic {
                    file: path.clone(),
                    line: 1,
                    message: format!("cannot read directory: {e}"),
                }),
            }
        } else if path.exists() {
            files.push(path.clone());
        } else {
            diags.push(Diagnostic {
                file: path.clone(),
                line: 1,
                message: "no such file or directory".into(),
            });
        }
    }
    files
}

fn is_playbook_file(p: &Path) -> bool {
    let hidden = p
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let yaml = matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
    !hidden && yaml && p.is_file()
}
