//! `wait`: pauses the run for a duration (bounded by the step timeout like any step).

use super::{ExecError, Executor, StepContext};
use crate::playbook::actions::WaitArgs;
use serde_json::{Value, json};

/// The `wait` executor.
pub struct WaitExecutor;

fn duration(ctx: &StepContext) -> Result<std::time::Duration, ExecError> {
    let args: WaitArgs = ctx.args()?;
    crate::time::parse_duration(&args.duration).map_err(ExecError::InvalidArgs)
}

#[async_trait::async_trait]
impl Executor for WaitExecutor {
    fn validate(&self, ctx: &StepContext) -> Result<(), ExecError> {
        duration(ctx).map(drop)
    }

    async fn execute(&self, ctx: &StepContext) -> Result<Value, ExecError> {
        let d = duration(ctx)?;
        if d > ctx.timeout {
            tokio::time::sleep(ctx.timeout).await;
            return Err(ExecError::Failed(format!(
                "timed out after {} (waiting {})",
                crate::time::format_duration(ctx.timeout),
                crate::time::format_duration(d)
            )));
        }
        tokio::time::sleep(d).await;
        Ok(json!({ "waited_ms": d.as_millis() as u64 }))
    }
}
