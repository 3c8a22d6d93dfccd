//! Telling what happened: runs that ended without a worker, the breaker, and the metrics that
//! live in the store.

use super::*;
use crate::store::{ApprovalState, EndMessage, Untold};

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
            (&self.metrics.store_round_trips, counts.round_trips),
            (&self.metrics.store_statements, counts.statements),
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
        self.live().notifier.send(Event::KillSwitch {
            scope,
            engaged: true,
            actor: "circuit-breaker".into(),
            reason,
            until: None,
        });
    }

    /// Counts and reports a run that ended without a worker (denied, expired, resolved,
    /// cancelled while waiting, interrupted by a restart). Its message is kept until told (see
    /// `store::outbox`), from right after the end.
    pub(super) async fn announce_end(&self, run_id: i64, state: RunState) {
        let Some((event, playbook)) = self.end_event(run_id, Some(state), None).await else {
            return;
        };
        self.metrics
            .runs
            .with_label_values(&[&playbook, state.as_str()])
            .inc();
        let mut kept = None;
        if self.live().notifier.shows(&playbook, "run_finished") {
            let message = EndMessage {
                summary: String::new(),
                report: None,
            };
            match self.store.keep_end(run_id, message.clone()).await {
                Ok(()) => kept = Some(self.told_when_sent(Untold::End { run_id, message })),
                Err(e) => {
                    tracing::warn!(error = %e, run_id, "cannot keep the run's end message until told; sending it all the same")
                }
            }
        }
        self.live().notifier.send_kept(event, kept);
    }

    /// Sends the messages a crash (or a replica whose work this one took over) left
    /// undelivered, rebuilt from the record, each kept until told.
    pub(super) async fn tell_untold(&self, untold: Vec<Untold>) {
        for u in untold {
            let run_id = u.run_id();
            tracing::info!(run_id, "sending a message left undelivered");
            let event = match &u {
                Untold::End { message, .. } => {
                    (self.end_event(run_id, None, Some(message.clone())))
                        .await
                        .map(|(event, _)| event)
                }
                Untold::Ask { .. } => match self.ask_event(run_id).await {
                    Ok(Some(event)) => Some(event),
                    // Decided, expired or cancelled since: nothing to ask.
                    Ok(None) => {
                        if let Err(e) = self.store.told(u).await {
                            tracing::warn!(error = %e, run_id, "cannot mark a message delivered");
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, run_id, "cannot load the run's approval to ask for it");
                        None
                    }
                },
            };
            // Not found or not read: it stays kept, for the next start.
            if let Some(event) = event {
                self.metrics.notify_resent.inc();
                let kept = self.told_when_sent(u);
                self.live().notifier.send_kept(event, Some(kept));
            }
        }
    }

    /// The request for the run's pending approval, from the record; none if none is pending.
    async fn ask_event(&self, run_id: i64) -> Result<Option<Event>, StoreError> {
        let Some(run) = self.store.get_run(run_id).await? else {
            return Ok(None);
        };
        let approvals = self.store.run_approvals(run_id).await?;
        let Some(a) = approvals
            .into_iter()
            .find(|a| a.state == ApprovalState::Pending)
        else {
            return Ok(None);
        };
        let evidence = self.store.evidence(run_id, a.step_idx).await?;
        Ok(Some(Event::ApprovalNeeded {
            run: self.recorded_info(&run),
            evidence,
            approval_id: a.id,
            action: a.action,
            action_hash: a.action_hash,
            required: a.required,
            approvers: a.approvers_allowed,
            expires_at: a.expires_at,
        }))
    }

    /// What deletes `message` from the outbox once every sink has it.
    pub(super) fn told_when_sent(&self, message: Untold) -> crate::notify::Kept {
        let store = self.store.clone();
        crate::notify::Kept::new(move || {
            tokio::spawn(async move {
                let run_id = message.run_id();
                if let Err(e) = store.told(message).await {
                    // Kept: sent again at the next start.
                    tracing::warn!(error = %e, run_id, "cannot mark a message delivered");
                }
            });
        })
    }

    /// What a message says about a run, from its record.
    fn recorded_info(&self, run: &crate::store::RunView) -> crate::notify::RunInfo {
        let title = crate::alert::title(&run.alert.labels, &run.alert.annotations, &run.target);
        let links = crate::notify::AlertLinks::new(
            title,
            &run.alert.annotations,
            run.alert.generator_url.as_deref(),
        );
        self.run_info(run.id, &run.playbook, &run.target, links, run.dry_run)
    }

    /// A run's end message from its record (in `state`, else the one recorded; with
    /// `message`, what its steps' outputs said), and its playbook.
    async fn end_event(
        &self,
        run_id: i64,
        state: Option<RunState>,
        message: Option<EndMessage>,
    ) -> Option<(Event, String)> {
        let run = match self.store.get_run(run_id).await {
            Ok(Some(run)) => run,
            Ok(None) => return None,
            Err(e) => {
                tracing::error!(error = %e, run_id, "cannot load the run to report its end");
                return None;
            }
        };
        // A run its worker ended counts from its start, as its first message did.
        let from = match &message {
            Some(_) => run.started_at.unwrap_or(run.created_at),
            None => run.created_at,
        };
        let duration = run
            .finished_at
            .map_or(Duration::ZERO, |end| end.since(from));
        let evidence = match self.store.evidence(run.id, i64::MAX).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, run_id, "cannot load the run's evidence for its report");
                Vec::new()
            }
        };
        let (summary, report) = message.map_or((String::new(), None), |m| (m.summary, m.report));
        let event = Event::RunFinished {
            run: self.recorded_info(&run),
            evidence,
            state: state.unwrap_or(run.state),
            duration_seconds: duration.as_secs_f64(),
            summary,
            report,
            error: run.error.clone(),
        };
        Some((event, run.playbook))
    }
}
