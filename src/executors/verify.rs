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
        let duration = |d: &Option<String>| {
            d.as_deref()
                .map(crate::time::parse_duration)
                .transpose()
                .map_err(ExecError::InvalidArgs)
        };
        let interval = duration(&args.interval)?.unwrap_or(DEFAULT_INTERVAL);
        let mut window = duration(&args.window)?.map(Window::new);
        let deadline = tokio::time::Instant::now() + ctx.timeout;
        let mut polls = 0;
        loop {
            polls += 1;
            let sample = self.query(&args.query).await;
            let held = match &sample {
                Ok(values) => self
                    .holds(&condition, values)
                    .map_err(ExecError::InvalidArgs)?,
                Err(_) => false,
            };
            let last = match &sample {
                Ok(values) if values.is_empty() => "no samples".to_string(),
                Ok(values) => format!("value {}", values[0]),
                Err(e) => e.clone(),
            };
            let values = sample.as_ref().ok();
            let done =
                json!({ "query": args.query, "values": values, "polls": polls, "holds": true });
            match window.as_mut() {
                None if held => return Ok(done),
                Some(w) if held => {
                    let over = w.check(ctx, args.fail_if_refires, &args.condition).await?;
                    if over {
                        return Ok(w.passed(done));
                    }
                }
                Some(w) if w.started.is_some() => {
                    return Err(ExecError::Failed(w.broke(&args.condition, &last)));
                }
                _ => {}
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(ExecError::Failed(match (&sample, &window) {
                    // The condition was never evaluated: say why, not that it did not hold.
                    (Err(_), _) => format!(
                        "the query `{}` failed ({polls} polls within {}): {last}",
                        args.query,
                        crate::time::format_duration(ctx.timeout),
                    ),
                    (Ok(_), Some(w)) if w.started.is_some() => w.cut_short(&args.condition),
                    (Ok(_), _) => format!(
                        "`{}` did not hold within {} for `{}` (last: {last}, {polls} polls)",
                        args.condition.trim(),
                        crate::time::format_duration(ctx.timeout),
                        args.query
                    ),
                }));
            }
            let mut pause = interval.min(deadline - now);
            if let Some(end) = window.as_ref().and_then(Window::end) {
                pause = pause.min(end.saturating_duration_since(now));
            }
            tokio::time::sleep(pause).await;
        }
    }
}

/// A verification window: from the first poll where the condition holds, it must hold at
/// every poll for `length`.
struct Window {
    length: Duration,
    /// When the condition first held (monotonic, and as a time for the record).
    started: Option<(tokio::time::Instant, crate::time::Timestamp)>,
}

impl Window {
    fn new(length: Duration) -> Window {
        Window {
            length,
            started: None,
        }
    }

    fn end(&self) -> Option<tokio::time::Instant> {
        self.started.map(|(at, _)| at + self.length)
    }

    fn text(&self) -> String {
        crate::time::format_duration(self.length)
    }

    /// How long the condition has held.
    fn held(&self) -> String {
        let since = self.started.map_or(Duration::ZERO, |(at, _)| at.elapsed());
        crate::time::format_duration(Duration::from_secs(since.as_secs()))
    }

    /// The condition holds at this poll: starts the window (and says so in the step's
    /// output), fails when the alert fired again, and tells whether the window is over.
    async fn check(
        &mut self,
        ctx: &StepContext,
        fail_if_refires: bool,
        condition: &str,
    ) -> Result<bool, ExecError> {
        let now = tokio::time::Instant::now();
        let Some((_, since)) = self.started else {
            let at = crate::time::Timestamp::from_ms(crate::time::now_ms());
            self.started = Some((now, at));
            if let Some(watch) = &ctx.watch {
                let until =
                    crate::time::Timestamp::from_ms(at.ms() + self.length.as_millis() as i64);
                let progress = json!({ "verifying": { "for": self.text(), "holding_since": at, "until": until } });
                watch.progress(progress).await;
            }
            return Ok(self.length.is_zero());
        };
        if fail_if_refires && let Some(watch) = &ctx.watch {
            let refired = watch
                .refired_since(since)
                .await
                .map_err(ExecError::Failed)?;
            if refired {
                return Err(ExecError::Failed(format!(
                    "the alert fired again {} into the {} verification window (`{}` held until then)",
                    self.held(),
                    self.text(),
                    condition.trim()
                )));
            }
        }
        Ok(self.end().is_some_and(|end| now >= end))
    }

    /// The step's output once the window is over.
    fn passed(&self, mut done: Value) -> Value {
        done["held_for"] = json!(self.text());
        done["summary"] = json!(format!("Verified for {}.", self.text()));
        done
    }

    fn broke(&self, condition: &str, last: &str) -> String {
        format!(
            "`{}` held for {} of the {} verification window, then broke (last: {last})",
            condition.trim(),
            self.held(),
            self.text()
        )
    }

    fn cut_short(&self, condition: &str) -> String {
        format!(
            "`{}` held for {} of the {} verification window when the step's timeout came",
            condition.trim(),
            self.held(),
            self.text()
        )
    }
}
