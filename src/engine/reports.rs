//! Telling what happened: runs that ended without a worker, the breaker, and the metrics that
//! live in the store.

use super::*;

impl Engine {
    /// Counts alerts Alertmanager left out of a group (`max_alerts`).
    pub fn note_truncated(&self, n: u64) {
        self.metrics.alerts_truncated.inc_by(n);
    }

    /// The metrics in Prometheus text format, with the gauges that live in the store read now.
    pub async fn render_metrics(&self) -> Result<String, StoreError> {
        let pending = self.store.pending_approvals().await?;
        self.metrics.approvals_pending.set(pending);
        (self.metrics.store_write_queue).set(self.store.queued_writes() as i64);
        let counts = self.store.write_counts();
        for (counter, n) in [
            (&self.metrics.store_writes, counts.writes),
            (&self.metrics.store_commits, counts.commits),
        ] {
            counter.inc_by(n.saturating_sub(counter.get()));
        }
        for s in self.store.switches().await? {
            self.metrics
                .killswitch_engaged
                .with_label_values(&[&s.scope])
                .set(i64::from(s.engaged));
        }
        Ok(self.metrics.render())
    }

    /// Tells the log and chat that the circuit breaker engaged the global kill switch.
    pub(super) fn announce_breaker(&self, scope: String, reason: String) {
        tracing::error!(%scope, %reason, "kill switch engaged by the circuit breaker");
        self.notifier.send(Event::KillSwitch {
            scope,
            engaged: true,
            actor: "circuit-breaker".into(),
            reason,
            until: None,
        });
    }

    /// Counts and reports a run that ended without a worker (denied, expired, resolved,
    /// cancelled while waiting, interrupted by a restart).
    pub(super) async fn announce_end(&self, run_id: i64, state: RunState) {
        let run = match self.store.get_run(run_id).await {
            Ok(Some(run)) => run,
            Ok(None) => return,
            Err(e) => {
                return tracing::error!(error = %e, run_id, "cannot load the run to report its end");
            }
        };
        self.metrics
            .runs
            .with_label_values(&[&run.playbook, state.as_str()])
            .inc();
        let ms = |t: &Option<String>| {
            t.as_deref()
                .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        };
        let created = ms(&Some(run.created_at.clone()));
        let duration = match (created, ms(&run.finished_at)) {
            (Some(a), Some(b)) => b.saturating_sub(a).as_secs_f64(),
            _ => 0.0,
        };
        let alert = Alert {
            source: "generic",
            status: crate::alert::AlertStatus::Firing,
            labels: run.alert.labels.clone(),
            annotations: run.alert.annotations.clone(),
            starts_at: run.alert.starts_at.clone(),
            ends_at: None,
            fingerprint: run.alert.fingerprint.clone(),
            generator_url: None,
            group_key: None,
        };
        self.notifier.send(Event::RunFinished {
            run: self.run_info(run.id, &run.playbook, &run.target, &alert, run.dry_run),
            state: state.as_str().to_string(),
            duration_seconds: duration,
            summary: String::new(),
            report: None,
            error: run.error.clone(),
        });
    }
}
