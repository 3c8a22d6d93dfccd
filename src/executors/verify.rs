//! `verify`: polls a Prometheus instant query (`/api/v1/query`) until a condition over its
//! value holds, or fails at the step's timeout — so a playbook can check that its fix worked
//! ("error rate back under 1 %") and escalate when it did not.

use super::{ExecError, Executor, StepContext};
use crate::playbook::actions::VerifyArgs;
use crate::playbook::script::Sandbox;
use rhai::{Dynamic, Scope};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Time between polls when the step gives none.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// The `verify` executor.
pub struct VerifyExecutor {
    http: reqwest::Client,
    base: String,
    sandbox: Arc<Sandbox>,
}

impl VerifyExecutor {
    /// Against the Prometheus server at `base`.
    pub fn new(base: &str, sandbox: Arc<Sandbox>) -> Self {
        VerifyExecutor {
            http: super::upstream_client(None),
            base: base.trim_end_matches('/').to_string(),
            sandbox,
        }
    }

    /// The sample values of an instant query (vector or scalar).
    async fn query(&self, query: &str) -> Result<Vec<f64>, String> {
        let resp = self
            .http
            .get(format!("{}/api/v1/query", self.base))
            .query(&[("query", query)])
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| {
                format!(
                    "cannot reach Prometheus at {} (prometheus_url): {}",
                    self.base,
                    super::error_chain(&e.without_url())
                )
            })?;
        let status = resp.status();
        let body: Value = resp.json().await.map_err(|e| format!("prometheus: {e}"))?;
        if body["status"] != "success" {
            return Err(format!(
                "prometheus answered {status}: {}",
                body["error"].as_str().unwrap_or("no error text")
            ));
        }
        let num = |v: &Value| v.as_str().and_then(|s| s.parse::<f64>().ok());
        let data = &body["data"];
        Ok(match data["resultType"].as_str() {
            Some("scalar") => num(&data["result"][1]).into_iter().collect(),
            Some("vector") => data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| num(&s["value"][1]))
                .collect(),
            other => {
                return Err(format!(
                    "unsupported result type {other:?} (use an instant vector or scalar)"
                ));
            }
        })
    }

    fn holds(&self, condition: &rhai::AST, values: &[f64]) -> Result<bool, String> {
        let mut scope = Scope::new();
        scope.push_constant(
            "value",
            values
                .first()
                .map_or(Dynamic::UNIT, |v| Dynamic::from_float(*v)),
        );
        scope.push_constant(
            "values",
            Dynamic::from_array(values.iter().map(|v| Dynamic::from_float(*v)).collect()),
        );
        match self.sandbox.eval(&mut scope, condition) {
            Ok(v) => Ok(v.as_bool().unwrap_or(false)),
            // No samples: `value` is nothing and the comparison fails; that is "does not hold".
            Err(_) if values.is_empty() => Ok(false),
            Err(e) => Err(format!("condition: {e}")),
        }
    }
}

#[async_trait::async_trait]
impl Executor for VerifyExecutor {
    fn validate(&self, ctx: &StepContext) -> Result<(), ExecError> {
        let args: VerifyArgs = ctx.args()?;
        self.sandbox
            .compile_expr(&args.condition, crate::playbook::script::names::CONDITION)
            .map(drop)
            .map_err(|e| ExecError::InvalidArgs(e.message))
    }

    async fn execute(&self, ctx: &StepContext) -> Result<Value, ExecError> {
        let args: VerifyArgs = ctx.args()?;
        let condition = self
            .sandbox
            .compile_expr(&args.condition, crate::playbook::script::names::CONDITION)
            .map_err(|e| ExecError::InvalidArgs(e.message))?;
        let interval = match &args.interval {
            Some(i) => crate::time::parse_duration(i).map_err(ExecError::InvalidArgs)?,
            None => DEFAULT_INTERVAL,
        };
        let deadline = tokio::time::Instant::now() + ctx.timeout;
        let mut polls = 0;
        loop {
            polls += 1;
            let mut failed = false;
            let last = match self.query(&args.query).await {
                Ok(values) => {
                    if self
                        .holds(&condition, &values)
                        .map_err(ExecError::InvalidArgs)?
                    {
                        return Ok(
                            json!({ "query": args.query, "values": values, "polls": polls, "holds": true }),
                        );
                    }
                    if values.is_empty() {
                        "no samples".to_string()
                    } else {
                        format!("value {}", values[0])
                    }
                }
                Err(e) => {
                    failed = true;
                    e
                }
            };
            let now = tokio::time::Instant::now();
            if now >= deadline && failed {
                // The condition was never evaluated: say why, not that it did not hold.
                return Err(ExecError::Failed(format!(
                    "the query `{}` failed ({polls} polls within {}): {last}",
                    args.query,
                    humantime::format_duration(ctx.timeout),
                )));
            }
            if now >= deadline {
                return Err(ExecError::Failed(format!(
                    "`{}` did not hold within {} for `{}` (last: {last}, {polls} polls)",
                    args.condition.trim(),
                    humantime::format_duration(ctx.timeout),
                    args.query
                )));
            }
            tokio::time::sleep(interval.min(deadline - now)).await;
        }
    }
}
