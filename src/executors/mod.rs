//! The only code that acts on the world. Each action name maps to one [`Executor`]; the engine
//! calls it after the step is recorded as running, with the step's rendered arguments, and
//! bounds it with the step timeout.

mod flags;
mod graph;
mod http;
pub mod kube;
mod log;
mod script;
pub mod ssh;
mod verify;
mod wait;

pub use graph::GraphExecutor;
pub use http::HttpExecutor;
pub use log::LogExecutor;
pub use script::ScriptExecutor;
pub use ssh::{DiskCleanupExecutor, SshExecutor, SshRunExecutor};
pub use verify::VerifyExecutor;
pub use wait::WaitExecutor;

use crate::alert::Alert;
use crate::playbook::actions::Action;
use crate::playbook::script::Sandbox;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The rendered arguments do not fit the action.
    #[error("invalid arguments: {0}")]
    InvalidArgs(String),
    /// The action ran and failed.
    #[error("{0}")]
    Failed(String),
    /// The action ran and failed, and what it gave back is worth keeping (a command's exit
    /// code and capped stderr): recorded as the step's output.
    #[error("{0}")]
    FailedWith(String, Value),
    /// The action was refused before acting (e.g. a target outside the inventory).
    #[error("refused: {0}")]
    Refused(String),
    /// The target (an API server, a host) could not be reached; nothing was done there.
    #[error("{0}")]
    Unreachable(String),
    /// An operator cancelled the run while the step was under way; what it had started was
    /// stopped.
    #[error("cancelled by an operator while under way")]
    Cancelled,
}

impl ExecError {
    /// Bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ExecError::InvalidArgs(_) => "invalid_args",
            ExecError::Failed(_) | ExecError::FailedWith(..) => "failed",
            ExecError::Refused(_) => "refused",
            ExecError::Unreachable(_) => "unreachable",
            ExecError::Cancelled => "cancelled",
        }
    }
}

/// What an executor gets for one step.
#[derive(Debug, Clone)]
pub struct StepContext {
    /// The run.
    pub run_id: i64,
    /// The playbook.
    pub playbook: String,
    /// Step name.
    pub step: String,
    /// Rendered arguments.
    pub args: Value,
    /// The alert that started the run.
    pub alert: Alert,
    /// The run's rendered parameters.
    pub params: Value,
    /// The step's timeout: executors that act remotely enforce it on the remote side too.
    pub timeout: std::time::Duration,
    /// Fires when an operator cancels the run (see [`Executor::stops_on_cancel`]).
    pub cancel: tokio_util::sync::CancellationToken,
    /// What the step may ask about, or tell of, its run while it is under way (none outside
    /// the engine: a simulation, a test).
    pub watch: Option<std::sync::Arc<dyn RunWatch>>,
    /// What the step produced besides its output (a graph, a log): kept with the run.
    pub artifacts: Attachments,
}

/// The artifacts a step attaches as it goes; the engine stores them with the run when the step
/// ends (within `engine.artifacts` caps).
#[derive(Debug, Clone, Default)]
pub struct Attachments(Arc<std::sync::Mutex<Vec<crate::store::Artifact>>>);

impl Attachments {
    /// Attaches one artifact.
    pub fn attach(&self, name: &str, content_type: &str, data: Vec<u8>) {
        self.lock().push(crate::store::Artifact {
            name: name.to_string(),
            content_type: content_type.to_string(),
            data,
        });
    }

    /// Everything attached so far, taken out.
    pub fn take(&self) -> Vec<crate::store::Artifact> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<crate::store::Artifact>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The run, as a long step sees it while it is under way.
#[async_trait::async_trait]
pub trait RunWatch: Send + Sync + std::fmt::Debug {
    /// Whether the run's alert fired again (a new occurrence) at or after `since`.
    async fn refired_since(&self, since: crate::time::Timestamp) -> Result<bool, String>;
    /// Records how the step is getting on: its output until it ends.
    async fn progress(&self, progress: Value);
}

impl StepContext {
    /// Deserializes the arguments into the action's argument type.
    pub fn args<T: serde::de::DeserializeOwned>(&self) -> Result<T, ExecError> {
        crate::playbook::actions::parse(&self.args).map_err(ExecError::InvalidArgs)
    }
}

/// One action's implementation.
#[async_trait::async_trait]
pub trait Executor: Send + Sync {
    /// Checks rendered arguments without acting (dry runs use this).
    fn validate(&self, ctx: &StepContext) -> Result<(), ExecError>;
    /// Acts. The returned JSON is the step output recorded in the run.
    async fn execute(&self, ctx: &StepContext) -> Result<Value, ExecError>;
    /// Whether `execute` watches `ctx.cancel` itself, to stop what it started elsewhere (a
    /// remote process) before answering [`ExecError::Cancelled`]. The engine waits a little
    /// for such an executor; any other is dropped at once (an HTTP request, a wait, a poll
    /// end with their future).
    fn stops_on_cancel(&self) -> bool {
        false
    }
}

/// Executors by action.
#[derive(Clone, Default)]
pub struct Executors {
    by_action: HashMap<Action, Arc<dyn Executor>>,
}

impl Executors {
    /// The built-in executors that need no configuration.
    pub fn builtin(sandbox: Arc<Sandbox>) -> Self {
        let mut e = Executors::default();
        e.insert(Action::Log, Arc::new(LogExecutor));
        e.insert(Action::Wait, Arc::new(WaitExecutor));
        e.insert(Action::Script, Arc::new(ScriptExecutor::new(sandbox)));
        e
    }

    /// Every executor, configured from the daemon config.
    pub fn from_config(cfg: &crate::config::Config, sandbox: Arc<Sandbox>) -> Self {
        let mut e = Self::builtin(sandbox.clone());
        let control_dir = cfg
            .ssh
            .control_dir
            .clone()
            .unwrap_or_else(|| cfg.data_dir.join("ssh"));
        let ssh = Arc::new(SshExecutor::new(cfg.ssh.clone(), control_dir));
        e.insert(Action::SshRun, Arc::new(SshRunExecutor(ssh.clone())));
        e.insert(Action::DiskCleanup, Arc::new(DiskCleanupExecutor(ssh)));
        e.insert(
            Action::Http,
            Arc::new(HttpExecutor::new(cfg.credentials.clone())),
        );
        e.insert(
            Action::Verify,
            Arc::new(VerifyExecutor::new(&cfg.prometheus_url, sandbox.clone())),
        );
        e.insert(
            Action::PrometheusGraph,
            Arc::new(GraphExecutor::new(&cfg.prometheus_url)),
        );
        let kube = Arc::new(kube::KubeExecutor::new(cfg.kubernetes.clone()));
        for &action in Action::ALL.iter().filter(|a| a.is_kube()) {
            e.insert(action, Arc::new(kube::KubeAction(kube.clone(), action)));
        }
        let flags = Arc::new(flags::FlagExecutor::new(cfg.feature_flags.clone(), kube));
        e.insert(
            Action::FlagDisable,
            Arc::new(flags::FlagAction(flags.clone(), false)),
        );
        e.insert(Action::FlagEnable, Arc::new(flags::FlagAction(flags, true)));
        e
    }

    /// Adds or replaces the executor of an action.
    pub fn insert(&mut self, action: Action, executor: Arc<dyn Executor>) {
        self.by_action.insert(action, executor);
    }

    /// The executor of an action.
    pub fn get(&self, action: Action) -> Option<&Arc<dyn Executor>> {
        self.by_action.get(&action)
    }
}

/// Redirects followed at most.
const MAX_REDIRECTS: usize = 5;

/// How long connecting to an HTTP upstream may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The HTTP client of every executor and sink that talks to an upstream: redirects are
/// followed only to the same origin (scheme, host, port), since requests carry credentials
/// (an `Authorization` header, a token in a custom header, a secret URL) that another origin
/// must never receive. Connecting is bounded; `timeout` bounds each request as a whole (body
/// included), or callers bound each request themselves.
pub fn upstream_client(timeout: Option<std::time::Duration>) -> reqwest::Client {
    let policy = reqwest::redirect::Policy::custom(|attempt| {
        let first = attempt.previous().first();
        let same_origin = first.is_some_and(|f| f.origin() == attempt.url().origin());
        if !same_origin {
            attempt.stop()
        } else if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error("too many redirects")
        } else {
            attempt.follow()
        }
    });
    let mut builder = reqwest::Client::builder()
        .redirect(policy)
        .connect_timeout(CONNECT_TIMEOUT);
    if let Some(t) = timeout {
        builder = builder.timeout(t);
    }
    builder.build().unwrap_or_default()
}

/// An error and its causes, one after the other (`error sending request: connection refused`):
/// HTTP clients often put the useful part in a cause.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_has_an_executor() {
        let ex =
            Executors::from_config(&crate::config::Config::default(), Arc::new(Sandbox::new()));
        for action in Action::ALL {
            assert!(ex.get(*action).is_some(), "no executor for {action}");
        }
    }
}
