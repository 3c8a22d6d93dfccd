//! `log`: records a rendered message in the run and the daemon log.

use super::{ExecError, Executor, StepContext};
use crate::playbook::actions::LogArgs;
use serde_json::{Value, json};

/// The `log` executor.
pub struct LogExecutor;

#[async_trait::async_trait]
impl Executor for LogExecutor {
    fn validate(&self, ctx: &StepContext) -> Result<(), ExecError> {
        ctx.args::<LogArgs>().map(drop)
    }

    async fn execute(&self, ctx: &StepContext) -> Result<Value, ExecError> {
        let args: LogArgs = ctx.args()?;
        tracing::info!(step = %ctx.step, message = %args.message, "log step");
        Ok(json!({ "message": args.message }))
    }
}
