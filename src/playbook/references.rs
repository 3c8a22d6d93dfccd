//! What playbooks name that the daemon config must define: feature-flag providers, `http`
//! credentials and approvers (token names with the approver or admin role).
//!
//! One check for `serve`, `reload` and `check --config`, so that what one refuses the others
//! refuse with the same words. On the embedded defaults (no config file) nothing is defined
//! and nothing is checked: the shipped examples load for a first look, and their steps are
//! refused at run time with the reason.

use super::actions::Action;
use super::locate::{Seg, line_of};
use super::{Arg, Diagnostic, Gate, Playbook};

/// The names a config defines.
#[derive(Debug, Clone, Default)]
pub struct References {
    /// Whether a config file defines them (else nothing is checked).
    pub checked: bool,
    /// Token names with the approver or admin role; `None` when the API is open (no tokens:
    /// any name may decide, through chat).
    pub approvers: Option<Vec<String>>,
    /// `feature_flags` providers.
    pub providers: Vec<String>,
    /// `credentials`.
    pub credentials: Vec<String>,
}

impl References {
    /// Every reference in `playbooks` to something the config does not define, at its line.
    pub fn check(&self, playbooks: &[Playbook]) -> Vec<Diagnostic> {
        if !self.checked {
            return Vec::new();
        }
        let mut diags = Vec::new();
        for pb in playbooks {
            let src = std::fs::read_to_string(&pb.file).unwrap_or_default();
            let mut report = |path: &[Seg<'_>], message: String| {
                diags.push(Diagnostic {
                    file: pb.file.clone(),
                    line: line_of(&src, path),
                    message,
                })
            };
            let gate_errors = |gate: &Option<Gate>| -> Vec<String> {
                let Some(approvers) = &self.approvers else {
                    return Vec::new();
                };
                (gate.iter().flat_map(|g| &g.approvers))
                    .filter(|who| !approvers.contains(who))
                    .map(|who| {
                        let hint = suggestion(who, approvers);
                        format!(
                            "approver {who:?} is not a token with the approver or admin role \
                             in auth.tokens{hint}"
                        )
                    })
                    .collect()
            };
            for e in gate_errors(&pb.approval) {
                report(&[Seg::Key("approval")], e);
            }
            for (section, steps) in [("steps", &pb.steps), ("on_failure", &pb.on_failure)] {
                for (i, step) in steps.iter().enumerate() {
                    for e in gate_errors(&step.approval) {
                        report(&[Seg::Key(section), Seg::Index(i), Seg::Key("approval")], e);
                    }
                    let (key, known, what) = match step.action {
                        Action::FlagDisable | Action::FlagEnable => (
                            "provider",
                            &self.providers,
                            "feature-flag provider (feature_flags)",
                        ),
                        Action::Http => {
                            ("credential", &self.credentials, "credential (credentials)")
                        }
                        _ => continue,
                    };
                    let literal = match &step.args {
                        Arg::Map(entries) => entries.iter().find_map(|(k, v)| match v {
                            Arg::Literal(serde_json::Value::String(s)) if k == key => Some(s),
                            _ => None,
                        }),
                        _ => None,
                    };
                    if let Some(name) = literal.filter(|n| !known.contains(n)) {
                        let hint = suggestion(name, known);
                        report(
                            &[
                                Seg::Key(section),
                                Seg::Index(i),
                                Seg::Key("with"),
                                Seg::Key(key),
                            ],
                            format!("{what} {name:?} is not in the config{hint}"),
                        );
                    }
                }
            }
        }
        diags
    }
}

fn suggestion(name: &str, known: &[String]) -> String {
    super::script::did_you_mean(name, known.iter().map(String::as_str))
        .map(|s| format!("; did you mean {s:?}?"))
        .unwrap_or_default()
}
