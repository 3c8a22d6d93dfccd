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
        }
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
            (Action::Verify, "query") => ArgKind::Template(Quoting::PromQl),
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
                match a.interval.as_deref() {
                    Some(i) if !Self::is_template(i) => crate::time::parse_duration(i)
                        .map(drop)
                        .map_err(|e| format!("`interval`: {e}")),
                    _ => Ok(()),
                }
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
}
