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
    pub const ALL: &'static [Action] = &[Action::Log, Action::Script, Action::Wait];

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
        }
    }

    /// How argument `arg` is treated.
    pub fn arg_kind(self, arg: &str) -> ArgKind {
        match (self, arg) {
            (Action::Script, "script") => ArgKind::Verbatim,
            _ => ArgKind::Template(Quoting::Plain),
        }
    }

    /// Structural check of the raw (unrendered) arguments.
    pub fn check(self, args: &serde_json::Value) -> Result<(), String> {
        match self {
            Action::Log => parse::<LogArgs>(args).map(drop),
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

    fn is_template(s: &str) -> bool {
        super::template::Template::has_holes(s)
    }
}

/// Deserializes action arguments from JSON, with serde's message on failure.
pub fn parse<T: DeserializeOwned>(args: &serde_json::Value) -> Result<T, String> {
    serde_json::from_value(args.clone()).map_err(|e| e.to_string())
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
