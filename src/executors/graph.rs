//! `prometheus.graph`: a range query (`/api/v1/query_range`) over the last `range`, drawn as a
//! PNG chart attached to the run (`graph.png`), with min, max and last value as text. Evidence:
//! it reads only.

use super::{ExecError, Executor, StepContext};
use crate::chart::{Chart, Series, format_value};
use crate::playbook::actions::PrometheusGraphArgs;
use serde_json::{Value, json};
use std::time::Duration;

/// Points per series when the step names no `step`.
const POINTS: u64 = 240;
/// Series drawn at most (the chart names how many more there were).
const MAX_SERIES: usize = 12;

/// The `prometheus.graph` executor.
pub struct GraphExecutor {
    http: reqwest::Client,
    base: String,
}

impl GraphExecutor {
    /// Against the Prometheus server at `base`.
    pub fn new(base: &str) -> Self {
        GraphExecutor {
            http: super::upstream_client(None),
            base: base.trim_end_matches('/').to_string(),
        }
    }

    async fn query_range(
        &self,
        query: &str,
        start: i64,
        end: i64,
        step: u64,
    ) -> Result<Vec<Series>, ExecError> {
        let resp = self
            .http
            .get(format!("{}/api/v1/query_range", self.base))
            .query(&[
                ("query", query.to_string()),
                ("start", start.to_string()),
                ("end", end.to_string()),
                ("step", step.to_string()),
            ])
            .timeout(Duration::from_secs(15))
            .send()
            .await
            .map_err(|e| {
                ExecError::Unreachable(format!(
                    "cannot reach Prometheus at {} (prometheus_url): {}",
                    self.base,
                    super::error_chain(&e.without_url())
                ))
            })?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .map_err(|e| ExecError::Failed(format!("prometheus: {}", e.without_url())))?;
        if body["status"] != "success" {
            return Err(ExecError::Failed(format!(
                "prometheus answered {status}: {}",
                body["error"].as_str().unwrap_or("no error text")
            )));
        }
        let num = |v: &Value| v.as_str().and_then(|s| s.parse::<f64>().ok());
        let result = body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(result
            .iter()
            .map(|s| Series {
                label: series_label(&s["metric"]),
                points: (s["values"].as_array().into_iter().flatten())
                    .filter_map(|p| Some((p[0].as_f64()? as i64, num(&p[1])?)))
                    .collect(),
            })
            .collect())
    }
}

/// `{job="api", code="500"}`, as Prometheus writes a series (`__name__` in front).
fn series_label(metric: &Value) -> String {
    let Some(labels) = metric.as_object() else {
        return String::new();
    };
    let name = labels.get("__name__").and_then(Value::as_str).unwrap_or("");
    let pairs: Vec<String> = (labels.iter())
        .filter(|(k, _)| *k != "__name__")
        .map(|(k, v)| format!("{k}={:?}", v.as_str().unwrap_or("")))
        .collect();
    if pairs.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{}}}", pairs.join(", "))
    }
}

fn duration(what: &str, d: &str) -> Result<Duration, ExecError> {
    crate::time::parse_duration(d).map_err(|e| ExecError::InvalidArgs(format!("`{what}`: {e}")))
}

#[async_trait::async_trait]
impl Executor for GraphExecutor {
    fn validate(&self, ctx: &StepContext) -> Result<(), ExecError> {
        let a: PrometheusGraphArgs = ctx.args()?;
        let range = duration("range", &a.range)?;
        if range.is_zero() || range > Duration::from_secs(31 * 86_400) {
            return Err(ExecError::InvalidArgs("`range`: between 1s and 31d".into()));
        }
        if let Some(step) = &a.step {
            let step = duration("step", step)?;
            if step.is_zero() || range.as_secs() / step.as_secs().max(1) > 11_000 {
                return Err(ExecError::InvalidArgs(
                    "`step`: at least the range over 11,000 (Prometheus' limit)".into(),
                ));
            }
        }
        Ok(())
    }

    async fn execute(&self, ctx: &StepContext) -> Result<Value, ExecError> {
        self.validate(ctx)?;
        let a: PrometheusGraphArgs = ctx.args()?;
        let range = duration("range", &a.range)?.as_secs().max(1);
        let step = match &a.step {
            Some(s) => duration("step", s)?.as_secs().max(1),
            None => (range / POINTS).max(1),
        };
        // Rounded up: a sample taken within the last second is in the range.
        let end = (crate::time::now_ms() + 999) / 1000;
        let start = end - range as i64;
        let mut series = self.query_range(&a.query, start, end, step).await?;
        let total = series.len();
        series.sort_by(|x, y| x.label.cmp(&y.label));
        series.truncate(MAX_SERIES);
        let marker = crate::time::Timestamp::parse(&ctx.alert.starts_at)
            .ok()
            .map(|t| t.ms() / 1000);
        let title = a.title.clone().unwrap_or_else(|| a.query.clone());
        let unit = a.unit.clone().unwrap_or_default();
        let png = crate::chart::render(&Chart {
            title: &title,
            unit: &unit,
            start,
            end,
            marker,
            series: &series,
        });
        ctx.artifacts.attach("graph.png", "image/png", png);
        let values: Vec<f64> = (series.iter())
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .filter(|v| v.is_finite())
            .collect();
        let min = values.iter().copied().reduce(f64::min);
        let max = values.iter().copied().reduce(f64::max);
        let last = (series.first())
            .and_then(|s| s.points.iter().rev().find(|p| p.1.is_finite()))
            .map(|p| p.1);
        let f = |v: Option<f64>| v.map_or("none".to_string(), |v| format_value(v, &unit));
        let summary = if values.is_empty() {
            format!(
                "{title}: no data in the last {}",
                crate::time::format_duration(Duration::from_secs(range))
            )
        } else {
            format!(
                "{title}: min {}, max {}, last {} over the last {}{}",
                f(min),
                f(max),
                f(last),
                crate::time::format_duration(Duration::from_secs(range)),
                if total > 1 {
                    format!(" ({total} series)")
                } else {
                    String::new()
                }
            )
        };
        Ok(json!({
            "query": a.query,
            "range_seconds": range,
            "step_seconds": step,
            "series": total,
            "min": min,
            "max": max,
            "last": last,
            "summary": summary,
        }))
    }
}
