//! Pure compilation of a playbook file: YAML -> [`PlaybookSpec`] -> [`Playbook`], collecting
//! every error with its file:line. No network, kube or ssh here, so `reflex check` can run
//! anywhere.

use super::actions::{Action, ArgKind};
use super::locate::{Seg, line_of};
use super::matcher::Matcher;
use super::script::{Located, Sandbox, names};
use super::spec::{ApprovalSpecYaml, GateScope, PlaybookSpec, StepSpec};
use super::template::{Quoting, Template};
use super::{Arg, Diagnostic, Gate, Playbook, Step};
use rhai::AST;
use std::path::Path;

struct Ctx<'a> {
    file: &'a Path,
    src: &'a str,
    sandbox: &'a Sandbox,
    diags: Vec<Diagnostic>,
}

impl Ctx<'_> {
    fn err(&mut self, path: &[Seg<'_>], message: impl Into<String>) {
        self.err_at(line_of(self.src, path), message);
    }

    fn err_at(&mut self, line: usize, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            file: self.file.to_path_buf(),
            line,
            message: message.into(),
        });
    }

    /// The line of a line `inner` (1-based) inside the string value at `path`: a block scalar
    /// (`key: |`) starts on the next line.
    /// Parsers report "incomplete" at the end of input; the line is clamped to the value's last.
    fn inner_line(&self, path: &[Seg<'_>], value: &str, inner: Option<usize>) -> usize {
        let line = line_of(self.src, path);
        let text = self.src.lines().nth(line - 1).unwrap_or("");
        let block = text
            .trim_end()
            .rsplit(' ')
            .next()
            .is_some_and(|t| t.starts_with('|') || t.starts_with('>'));
        let last = value.trim_end().lines().count().max(1);
        line + usize::from(block) + inner.unwrap_or(1).clamp(1, last) - 1
    }

    fn template(&mut self, path: &[Seg<'_>], src: &str, quoting: Quoting) -> Option<Template> {
        self.template_with(path, src, quoting, names::PLANNED)
    }

    fn template_with(
        &mut self,
        path: &[Seg<'_>],
        src: &str,
        quoting: Quoting,
        names: &[&str],
    ) -> Option<Template> {
        match Template::compile_with(self.sandbox, src, quoting, names) {
            Ok(t) => Some(t),
            Err(Located { line, message }) => {
                let at = self.inner_line(path, src, line);
                self.err_at(at, message);
                None
            }
        }
    }

    /// Compiles Rhai code: statements when `statements`, else one expression.
    fn script(
        &mut self,
        path: &[Seg<'_>],
        src: &str,
        what: &str,
        names: &[&str],
        statements: bool,
    ) -> Option<AST> {
        let compiled = if statements {
            self.sandbox.compile_script(src, names)
        } else {
            self.sandbox.compile_expr(src, names)
        };
        match compiled {
            Ok(ast) => Some(ast),
            Err(Located { line, message }) => {
                let at = self.inner_line(path, src, line);
                self.err_at(at, format!("{what}: Rhai syntax error: {message}"));
                None
            }
        }
    }

    /// `approval: required` or the map form; `None` when absent or not required.
    fn gate(
        &mut self,
        path: &[Seg<'_>],
        v: Option<&serde_yaml::Value>,
        scope: GateScope,
    ) -> Option<Gate> {
        let spec = match v? {
            serde_yaml::Value::String(s) if s == "required" => ApprovalSpecYaml {
                required: true,
                count: 1,
                expires: None,
                approvers: Vec::new(),
            },
            v @ serde_yaml::Value::Mapping(_) => match serde_yaml::from_value(v.clone()) {
                Ok(spec) => spec,
                Err(e) => {
                    self.err(path, format!("approval: {e}"));
                    return None;
                }
            },
            _ => {
                self.err(
                    path,
                    "approval: expected `required` or a map with count, expires, approvers",
                );
                return None;
            }
        };
        if !spec.required {
            return None;
        }
        if spec.count == 0 {
            self.err(path, "approval.count must be at least 1");
        }
        if !spec.approvers.is_empty() && (spec.approvers.len() as u32) < spec.count {
            self.err(
                path,
                "approval: fewer approvers listed than the count required",
            );
        }
        let expires = match spec.expires.as_deref() {
            Some(e) => self.duration(path, e)?,
            None => DEFAULT_APPROVAL_EXPIRY,
        };
        Some(Gate {
            scope,
            count: spec.count,
            expires_ms: expires.as_millis() as u64,
            approvers: spec.approvers,
        })
    }

    fn duration(&mut self, path: &[Seg<'_>], s: &str) -> Option<std::time::Duration> {
        crate::time::parse_duration(s)
            .map_err(|e| self.err(path, e))
            .ok()
    }
}

/// How long an approval request stays open unless the playbook says otherwise.
pub const DEFAULT_APPROVAL_EXPIRY: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// The target of a run unless the playbook says otherwise: the host in `instance`, else the
/// alert itself.
pub const DEFAULT_TARGET: &str = "{{ labels.instance ?? alert.fingerprint }}";

/// Compiles one playbook file's text.
pub fn compile(file: &Path, src: &str, sandbox: &Sandbox) -> Result<Playbook, Vec<Diagnostic>> {
    let spec: PlaybookSpec = serde_yaml::from_str(src).map_err(|e| {
        vec![Diagnostic {
            file: file.to_path_buf(),
            line: e.location().map_or(1, |l| l.line()),
            message: e.to_string(),
        }]
    })?;
    let mut cx = Ctx {
        file,
        src,
        sandbox,
        diags: Vec::new(),
    };

    check_name(&mut cx, &spec.name);
    if spec.matchers.is_empty() {
        cx.err(
            &[Seg::Key("matchers")],
            "at least one matcher is required (a playbook must not match every alert)",
        );
    }
    let matchers: Vec<Matcher> = (spec.matchers.iter().enumerate())
        .filter_map(|(i, m)| {
            Matcher::parse(m)
                .map_err(|e| cx.err(&[Seg::Key("matchers"), Seg::Index(i)], e))
                .ok()
        })
        .collect();
    if spec.statuses.is_empty() {
        cx.err(
            &[Seg::Key("statuses")],
            "statuses: list firing, resolved or both",
        );
    }
    let when = (spec.when.as_deref())
        .and_then(|w| cx.script(&[Seg::Key("when")], w, "when", names::ALERT, true));
    if let Some(ast) = &when {
        check_when_is_a_condition(&mut cx, ast, &matchers);
    }

    let params = compile_params(&mut cx, &spec.params);
    if spec.concurrency == Some(0) {
        cx.err(
            &[Seg::Key("concurrency")],
            "concurrency: at least 1 (leave it out for no limit of the playbook's own)",
        );
    }
    let cooldown = (spec.cooldown.as_deref())
        .and_then(|c| cx.duration(&[Seg::Key("cooldown")], c))
        .unwrap_or_default();
    if spec.steps.is_empty() {
        cx.err(&[Seg::Key("steps")], "a playbook needs at least one step");
    }
    let approval = cx.gate(
        &[Seg::Key("approval")],
        spec.approval.as_ref(),
        GateScope::Run,
    );
    let target_src = spec.target.as_deref().unwrap_or(DEFAULT_TARGET);
    let target = cx.template(&[Seg::Key("target")], target_src, Quoting::Plain);
    let deadline = (spec.deadline.as_deref()).and_then(|d| cx.duration(&[Seg::Key("deadline")], d));
    let report = (spec.report.as_deref())
        .and_then(|r| cx.template_with(&[Seg::Key("report")], r, Quoting::Plain, names::REPORT));
    let steps = (spec.steps.iter().enumerate())
        .filter_map(|(i, s)| compile_step(&mut cx, "steps", i, s))
        .collect();
    let on_failure = (spec.on_failure.iter().enumerate())
        .filter_map(|(i, s)| compile_step(&mut cx, "on_failure", i, s))
        .collect();
    if let Some(rules) = spec.autonomy {
        let at = [Seg::Key("autonomy")];
        if rules.approve_until == 0 || rules.demote_after == 0 {
            cx.err(
                &at,
                "autonomy: approve_until and demote_after must be at least 1",
            );
        }
        if !(spec.steps.iter()).any(|s| s.action == crate::playbook::actions::Action::Verify.name())
        {
            cx.err(
                &at,
                "autonomy is earned by verified runs: add a verify step (a run without one never counts)",
            );
        }
    }

    let (Some(target), true) = (target, cx.diags.is_empty()) else {
        return Err(cx.diags);
    };
    Ok(Playbook {
        name: spec.name,
        description: spec.description,
        file: file.to_path_buf(),
        matchers,
        statuses: spec.statuses,
        when,
        params,
        cooldown,
        cooldown_by: spec.cooldown_by,
        coalesce: spec.coalesce,
        dry_run: spec.dry_run || spec.mode == crate::config::Mode::Shadow,
        concurrency: spec.concurrency.unwrap_or(0),
        approval,
        autonomy: spec.autonomy,
        namespaces: spec.namespaces,
        target,
        deadline,
        on_resolve: spec.on_resolve,
        on_verify_failure: spec.on_verify_failure,
        report,
        steps,
        on_failure,
    })
}

/// A playbook's name: letters, digits, `-`, `_` or `.` (it is a path segment and a label).
fn check_name(cx: &mut Ctx<'_>, name: &str) {
    let valid = !name.is_empty()
        && (name.chars()).all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        cx.err(
            &[Seg::Key("name")],
            format!("name {name:?}: use letters, digits, '-', '_' or '.'"),
        );
    }
}

/// `params`: each a template (a string) or a literal number or bool, under a label-like name.
fn compile_params(cx: &mut Ctx<'_>, spec: &serde_yaml::Mapping) -> Vec<(String, Arg)> {
    let mut params = Vec::new();
    for (k, v) in spec {
        let Some(key) = k.as_str().filter(|k| crate::alert::is_label_name(k)) else {
            cx.err(&[Seg::Key("params")], format!("params: invalid name {k:?}"));
            continue;
        };
        let path = [Seg::Key("params"), Seg::Key(key)];
        let arg = match v {
            serde_yaml::Value::String(s) => {
                cx.template(&path, s, Quoting::Plain).map(Arg::Template)
            }
            v @ (serde_yaml::Value::Number(_) | serde_yaml::Value::Bool(_)) => {
                Some(Arg::Literal(serde_json::to_value(v).unwrap_or_default()))
            }
            _ => {
                cx.err(
                    &path,
                    format!("params.{key}: expected a string, number or bool"),
                );
                None
            }
        };
        params.extend(arg.map(|a| (key.to_string(), a)));
    }
    params
}

/// `when` must give true or false. Evaluated once against an alert with the labels the
/// matchers name exactly, it shows the common mistakes (`when: labels.severity`, a string; a
/// last statement that gives nothing); errors there are left to real alerts, whose labels may
/// differ.
fn check_when_is_a_condition(cx: &mut Ctx<'_>, ast: &AST, matchers: &[Matcher]) {
    let labels = matchers
        .iter()
        .filter_map(|m| Some((m.name.clone(), m.equality()?.to_string())))
        .collect();
    let sample = crate::alert::Alert {
        source: "generic",
        status: crate::alert::AlertStatus::Firing,
        fingerprint: crate::alert::fingerprint(&labels),
        labels,
        annotations: Default::default(),
        starts_at: String::new(),
        ends_at: None,
        generator_url: None,
        group_key: None,
    };
    let _budget = super::script::Budget::start(std::time::Duration::from_millis(100));
    let mut scope = super::script::alert_scope(&sample);
    if let Ok(v) = cx.sandbox.eval(&mut scope, ast)
        && !v.is_bool()
    {
        let got = if v.is_unit() {
            "nothing".to_string()
        } else {
            format!("a {}", v.type_name())
        };
        cx.err(
            &[Seg::Key("when")],
            format!(
                "when must give true or false, but gives {got} (compare it: `labels.x == \"y\"`)"
            ),
        );
    }
}

fn compile_step(cx: &mut Ctx<'_>, section: &str, i: usize, spec: &StepSpec) -> Option<Step> {
    let at = |k| [Seg::Key(section), Seg::Index(i), Seg::Key(k)];
    let Some(action) = Action::parse(&spec.action) else {
        let known: Vec<_> = Action::ALL.iter().map(|a| a.name()).collect();
        cx.err(
            &at("action"),
            format!(
                "unknown action {:?} (known: {})",
                spec.action,
                known.join(", ")
            ),
        );
        return None;
    };
    let timeout = spec
        .timeout
        .as_deref()
        .and_then(|t| cx.duration(&at("timeout"), t));
    let raw = match serde_json::to_value(&spec.with) {
        Ok(v) => v,
        Err(e) => {
            cx.err(&at("with"), format!("with: {e}"));
            return None;
        }
    };
    if let Err(e) = action.check(&raw) {
        // serde names the field in backticks; point at it when it is there.
        let field = e.split('`').nth(1).unwrap_or("");
        let path = [
            Seg::Key(section),
            Seg::Index(i),
            Seg::Key("with"),
            Seg::Key(field),
        ];
        cx.err(&path, format!("{} arguments: {e}", action.name()));
        return None;
    }
    if action == Action::Verify {
        check_window(cx, &at("timeout"), &raw, timeout);
    }
    let mut args = Vec::new();
    let mut script = None;
    for (key, value) in raw.as_object().into_iter().flatten() {
        let path = [
            Seg::Key(section),
            Seg::Index(i),
            Seg::Key("with"),
            Seg::Key(key),
        ];
        let arg = match action.arg_kind(key) {
            ArgKind::Verbatim => {
                if action == Action::Script {
                    let src = value.as_str().unwrap_or("");
                    script = cx.script(&path, src, "script", names::PLANNED, true);
                }
                if action == Action::Verify {
                    let src = value.as_str().unwrap_or("");
                    cx.script(&path, src, "condition", names::CONDITION, false);
                }
                Arg::Literal(value.clone())
            }
            ArgKind::Template(q) => arg_tree(cx, &path, value, q)?,
        };
        args.push((key.clone(), arg));
    }
    Some(Step {
        name: spec
            .name
            .clone()
            .unwrap_or_else(|| action.name().to_string()),
        action,
        args: Arg::Map(args),
        timeout,
        on_failure: spec.on_failure,
        script,
        approval: cx.gate(&at("approval"), spec.approval.as_ref(), GateScope::Step),
    })
}

/// A verification window must fit in its step: the step's timeout has to be longer than the
/// window, or the window could never complete.
fn check_window(
    cx: &mut Ctx<'_>,
    at: &[Seg<'_>],
    raw: &serde_json::Value,
    timeout: Option<std::time::Duration>,
) {
    let window = raw["for"].as_str().filter(|w| !Template::has_holes(w));
    let Some(window) = window.and_then(|w| crate::time::parse_duration(w).ok()) else {
        return;
    };
    if timeout.is_none_or(|t| t <= window) {
        let w = crate::time::format_duration(window);
        cx.err(
            at,
            format!(
                "verify `for: {w}` needs a step timeout longer than its window (the condition \
                 must first hold, then hold for {w}): add e.g. `timeout: {}`",
                crate::time::format_duration(window + window / 2)
            ),
        );
    }
}

fn arg_tree(cx: &mut Ctx<'_>, path: &[Seg<'_>], v: &serde_json::Value, q: Quoting) -> Option<Arg> {
    Some(match v {
        serde_json::Value::String(s) if Template::has_holes(s) => {
            Arg::Template(cx.template(path, s, q)?)
        }
        serde_json::Value::Array(items) => Arg::List(
            items
                .iter()
                .map(|item| arg_tree(cx, path, item, q))
                .collect::<Option<_>>()?,
        ),
        serde_json::Value::Object(map) => Arg::Map(
            map.iter()
                .map(|(k, item)| Some((k.clone(), arg_tree(cx, path, item, q)?)))
                .collect::<Option<_>>()?,
        ),
        other => Arg::Literal(other.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(src: &str) -> Vec<String> {
        compile(Path::new("p.yaml"), src, &Sandbox::new())
            .err()
            .unwrap_or_default()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    const GOOD: &str = r#"name: disk
matchers: ['alertname="DiskSpaceLow"']
params:
  host: "{{ host(labels.instance) }}"
steps:
  - action: log
    with:
      message: "low on {{ params.host }}"
"#;

    #[test]
    fn autonomy_needs_a_verify_step_and_counts_of_at_least_one() {
        let with =
            |autonomy: &str| GOOD.replace("steps:", &format!("autonomy: {autonomy}\nsteps:"));
        let e = errors(&with("{ approve_until: 5, demote_after: 2 }"));
        assert!(
            e.len() == 1
                && e[0]
                    .contains("p.yaml:5: autonomy is earned by verified runs: add a verify step"),
            "{e:?}"
        );
        let e = errors(&with("{ approve_until: 0, demote_after: 2 }"));
        assert!(e.iter().any(|e| e.contains("must be at least 1")), "{e:?}");
        let e = errors(&with("{ approve_until: 5 }"));
        assert!(e.iter().any(|e| e.contains("demote_after")), "{e:?}");
        let verified = with("{ approve_until: 5, demote_after: 2 }").replace(
            "      message: \"low on {{ params.host }}\"\n",
            "      message: \"low on {{ params.host }}\"\n  - action: verify\n    with: { query: \"up\", condition: \"value == 1\" }\n",
        );
        let pb = compile(Path::new("p.yaml"), &verified, &Sandbox::new()).unwrap();
        assert_eq!(
            pb.autonomy.map(|a| (a.approve_until, a.demote_after)),
            Some((5, 2))
        );
    }

    #[test]
    fn a_concurrency_of_zero_is_refused() {
        let e = errors(&GOOD.replace("steps:", "concurrency: 0\nsteps:"));
        assert!(
            e.len() == 1 && e[0].contains("concurrency: at least 1"),
            "{e:?}"
        );
        let pb = compile(
            Path::new("p.yaml"),
            &GOOD.replace("steps:", "concurrency: 3\nsteps:"),
            &Sandbox::new(),
        )
        .unwrap();
        assert_eq!(pb.concurrency, 3);
    }

    #[test]
    fn a_verification_window_needs_a_longer_step_timeout() {
        let verify = |timeout: &str| {
            format!(
                "name: v\nmatchers: ['alertname=\"X\"']\nsteps:\n  - action: verify\n    with: {{ query: up, condition: \"value > 0\", for: 10m }}\n{timeout}"
            )
        };
        for timeout in ["", "    timeout: 10m\n", "    timeout: 5m\n"] {
            let e = errors(&verify(timeout));
            assert!(
                e.len() == 1
                    && e[0].contains("p.yaml:")
                    && e[0].contains("needs a step timeout longer than its window")
                    && e[0].contains("timeout: 15m"),
                "{timeout:?}: {e:?}"
            );
        }
        assert!(errors(&verify("    timeout: 15m\n")).is_empty());
        let e = errors(&verify("").replace("10m }", "10 lifetimes }"));
        assert!(e.iter().any(|e| e.contains("`for`")), "{e:?}");
    }

    #[test]
    fn a_good_playbook_compiles() {
        let pb = compile(Path::new("p.yaml"), GOOD, &Sandbox::new()).unwrap();
        assert_eq!(pb.name, "disk");
        assert_eq!(pb.steps.len(), 1);
        assert_eq!(pb.steps[0].name, "log");
    }

    #[test]
    fn every_error_is_reported_with_its_line() {
        let src = r#"name: bad
matchers:
  - 'alertname="X"'
  - 'severity=~"("'
when: "labels.severity == "
cooldown: forever
steps:
  - action: log
    with:
      message: "{{ params.( }}"
  - action: teleport
  - action: wait
    with:
      duration: 3 fortnights
"#;
        let errs = errors(src);
        let lines: Vec<&str> = errs.iter().map(|e| e.split(':').nth(1).unwrap()).collect();
        assert_eq!(lines, ["4", "5", "6", "10", "11", "14"], "{errs:#?}");
        assert!(errs[4].contains("unknown action \"teleport\""));
    }

    #[test]
    fn unknown_keys_and_wrong_types_come_from_serde_with_lines() {
        let errs = errors(&GOOD.replace("steps:", "colour: red\nsteps:"));
        assert!(
            errs[0].starts_with("p.yaml:5:") && errs[0].contains("colour"),
            "{errs:?}"
        );
        let errs = errors(&GOOD.replace("name: disk", "name: [1, 2]"));
        assert!(errs[0].starts_with("p.yaml:1:"), "{errs:?}");
        let errs = errors(&GOOD.replace("message:", "mesage:"));
        assert!(
            errs[0].starts_with("p.yaml:8:") && errs[0].contains("mesage"),
            "{errs:?}"
        );
    }

    #[test]
    fn a_script_error_points_inside_the_block() {
        let src = "name: s\nmatchers: ['a=\"b\"']\nsteps:\n  - action: script\n    with:\n      script: |\n        let x = 1;\n        let = ;\n";
        let errs = errors(src);
        assert!(errs[0].starts_with("p.yaml:8:"), "{errs:?}");
    }

    #[test]
    fn no_matchers_no_steps_are_refused() {
        let errs = errors("name: e\nmatchers: []\nsteps: []\n");
        assert_eq!(errs.len(), 2, "{errs:?}");
    }
}
