//! `script`: runs sandboxed Rhai with `alert`, `labels`, `annotations` and `params` in scope.
//! The script's value is the step output; `throw` fails the step.
//!
//! The recorded source is compiled again here rather than taken from the loaded playbook: the
//! run must do what its record says even after a reload or a restart, and compiling a script
//! of a few lines costs microseconds.

use super::{ExecError, Executor, StepContext};
use crate::playbook::actions::ScriptArgs;
use crate::playbook::script::{Sandbox, alert_scope, to_json};
use serde_json::Value;
use std::sync::Arc;

/// The `script` executor.
pub struct ScriptExecutor {
    sandbox: Arc<Sandbox>,
}

impl ScriptExecutor {
    /// With the shared sandbox.
    pub fn new(sandbox: Arc<Sandbox>) -> Self {
        ScriptExecutor { sandbox }
    }
}

#[async_trait::async_trait]
impl Executor for ScriptExecutor {
    fn validate(&self, ctx: &StepContext) -> Result<(), ExecError> {
        let args: ScriptArgs = ctx.args()?;
        self.sandbox
            .compile_script(&args.script, crate::playbook::script::names::PLANNED)
            .map(drop)
            .map_err(|e| ExecError::InvalidArgs(e.message))
    }

    async fn execute(&self, ctx: &StepContext) -> Result<Value, ExecError> {
        let args: ScriptArgs = ctx.args()?;
        let sandbox = self.sandbox.clone();
        let (alert, params) = (ctx.alert.clone(), ctx.params.clone());
        // CPU-bound (up to MAX_OPERATIONS): keep it off the async workers.
        tokio::task::spawn_blocking(move || {
            let ast = sandbox
                .compile_script(&args.script, crate::playbook::script::names::PLANNED)
                .map_err(|e| ExecError::InvalidArgs(e.message))?;
            let mut scope = alert_scope(&alert);
            let params =
                rhai::serde::to_dynamic(&params).map_err(|e| ExecError::Failed(e.to_string()))?;
            scope.push_constant("params", params);
            let v = sandbox.eval(&mut scope, &ast).map_err(ExecError::Failed)?;
            Ok(to_json(&v))
        })
        .await
        .map_err(|e| ExecError::Failed(format!("script task failed: {e}")))?
    }
}
