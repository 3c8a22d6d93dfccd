//! Intake: alerts matched and planned (in place for a moment, then on the blocking pool, and
//! past the webhook's budget after its answer), then recorded with every hold decided in one
//! write, starting what may start at once.

use super::*;

/// Deferred alerts planned in one round at most.
const DEFERRED_BATCH: u32 = 64;

/// How often the planner of deferred alerts looks without being woken (a restart's leftovers).
const DEFERRED_POLL: Duration = Duration::from_secs(5);

/// What intake made of one webhook.
#[derive(Debug)]
pub struct Intake {
    /// Per alert planned in time (in the payload's order): what each matched playbook did.
    pub outcomes: Vec<Vec<Outcome>>,
    /// Alerts after those: stored, and planned after the answer.
    pub deferred: usize,
}

/// How long matching and planning (Rhai) may run on the async worker that took the webhook.
/// Most payloads need microseconds, and a hand-off to the blocking pool costs more than that
/// (a thread woken per webhook, a sixth of the workers' time under load).
const EVALUATE_IN_PLACE: Duration = Duration::from_millis(1);

/// Matches and plans alerts in place while `window` ([`EVALUATE_IN_PLACE`]) lasts, and returns the
/// alerts left for the blocking pool: those after the time was up, and the one whose
/// evaluation the short budget cut off (evaluation has no effects, so it runs again there with
/// the whole budget). A costly script or a large payload thus holds a worker for about a
/// millisecond, and is still given its full budget per alert.
fn evaluate_in_place(
    set: &PlaybookSet,
    alerts: Vec<Alert>,
    window: Duration,
    budget: Duration,
) -> (Vec<(Alert, Vec<Matched>)>, Vec<Alert>) {
    let until = std::time::Instant::now() + window;
    let mut evaluated = Vec::with_capacity(alerts.len());
    let mut alerts = alerts.into_iter();
    while let Some(alert) = alerts.next() {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if !left.is_zero() {
            let short = Budget::start(left.min(budget));
            let matched = set.evaluate(&alert);
            if !short.tripped() || left >= budget {
                evaluated.push((alert, matched));
                continue;
            }
        }
        return (evaluated, std::iter::once(alert).chain(alerts).collect());
    }
    (evaluated, Vec::new())
}

impl Engine {
    /// Matches, renders and records alerts. Returns the outcome for each alert's matched
    /// playbooks. When this returns `Ok`, everything is on disk.
    /// `received_us` is when the webhook arrived.
    pub async fn intake(
        self: &Arc<Self>,
        alerts: Vec<Alert>,
        received_us: i64,
    ) -> Result<Intake, StoreError> {
        let started = std::time::Instant::now();
        let set = self.playbooks();
        let budget = self.config.plan_budget;
        let (mut evaluated, rest) = evaluate_in_place(&set, alerts, EVALUATE_IN_PLACE, budget);
        let mut unplanned = Vec::new();
        if !rest.is_empty() {
            let until = started + self.request_budget;
            let (more, left) = tokio::task::spawn_blocking(move || {
                let mut more = Vec::new();
                let mut rest = rest.into_iter();
                for alert in rest.by_ref() {
                    if std::time::Instant::now() >= until {
                        return (more, std::iter::once(alert).chain(rest).collect());
                    }
                    let _budget = Budget::start(budget);
                    let matched = set.evaluate(&alert);
                    more.push((alert, matched));
                }
                (more, Vec::new())
            })
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            evaluated.extend(more);
            unplanned = left;
        }
        let deferred = unplanned.len();
        if deferred > 0 {
            // Kept before the answer, planned after it.
            self.store.defer(unplanned, received_us).await?;
            self.deferred_wake.notify_one();
            tracing::info!(
                deferred,
                "a webhook's alerts outlasted its planning budget; planning the rest after the answer"
            );
        }
        let outcomes = self.intake_planned(evaluated, received_us, None).await?;
        Ok(Intake { outcomes, deferred })
    }

    /// Plans the alerts that webhooks left (see [`Engine::intake`]), until shutdown: woken by
    /// each deferral, and looking every few seconds (for what a restart left).
    pub async fn plan_deferred(self: Arc<Self>) {
        loop {
            let batch = match self.store.deferred(DEFERRED_BATCH).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the deferred alerts; trying again");
                    Vec::new()
                }
            };
            let full = batch.len() == DEFERRED_BATCH as usize;
            if !batch.is_empty() {
                let set = self.playbooks();
                let budget = self.config.plan_budget;
                let planned = tokio::task::spawn_blocking(move || {
                    (batch.into_iter())
                        .map(|d| {
                            let _budget = Budget::start(budget);
                            let matched = set.evaluate(&d.alert);
                            (d, matched)
                        })
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                for (d, matched) in planned {
                    let evaluated = vec![(d.alert, matched)];
                    if let Err(e) = self
                        .intake_planned(evaluated, d.received_us, Some(d.id))
                        .await
                    {
                        tracing::warn!(error = %e, "cannot record a deferred alert yet; it stays for the next round");
                    }
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                () = self.deferred_wake.notified() => {}
                () = tokio::time::sleep(DEFERRED_POLL) => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    /// Records alerts already matched and planned (`deferred`: the row of one planned after
    /// its webhook's answer).
    pub(super) async fn intake_planned(
        self: &Arc<Self>,
        evaluated: Vec<(Alert, Vec<Matched>)>,
        received_us: i64,
        deferred: Option<i64>,
    ) -> Result<Vec<Vec<Outcome>>, StoreError> {
        let now = self.store.now_ms();
        let items: Vec<IntakeItem> = evaluated
            .into_iter()
            .map(|(alert, matched)| {
                let suppress = self.live().windows.hold(&alert, now);
                let candidates = matched
                    .into_iter()
                    .map(|m| self.candidate(&m.playbook, &alert, m.plan, suppress.clone()))
                    .collect();
                IntakeItem {
                    deferred,
                    alert,
                    received_us,
                    candidates,
                }
            })
            .collect();
        // From the write on, the work goes on even if the sender hangs up (its request is
        // then dropped): the runs that intake starts must be executed, and the endings it
        // decides told.
        tokio::spawn(self.clone().record(items))
            .await
            .map_err(|e| StoreError::Join(e.to_string()))?
    }

    /// Records what intake decided, starts the runs it could, and tells what ended.
    pub(super) async fn record(
        self: Arc<Self>,
        items: Vec<IntakeItem>,
    ) -> Result<Vec<Vec<Outcome>>, StoreError> {
        for IntakeItem { alert, .. } in &items {
            self.metrics
                .alerts_received
                .with_label_values(&[alert.source, alert.status.as_str()])
                .inc();
        }
        // Slots for the runs intake may start in its own transaction (one commit from the
        // webhook to the first step); those it does not use go back at once.
        let startable = (items.iter())
            .flat_map(|i| &i.candidates)
            .filter(|c| c.plan.as_ref().is_ok_and(Plan::starts_ungated))
            .count();
        let mut permits = Vec::new();
        while permits.len() < startable && !self.shutdown.is_cancelled() {
            match self.slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let start = StartNow {
            slots: permits.len(),
            max_per_target: self.config.max_runs_per_target,
        };
        let Recorded { outcomes, started } = self
            .store
            .record_and_start(items, self.live().limits, start)
            .await?;
        let started_n = started.len();
        for (run, permit) in started.into_iter().zip(permits) {
            self.spawn_run(run, permit);
        }
        if started_n > 0 {
            // The started runs take their first step before the answer is written.
            tokio::task::yield_now().await;
        }
        let tripped = outcomes.iter().flatten().find_map(|o| match o {
            Outcome::Suppressed {
                cause: Hold::Breaker,
                reason,
                ..
            } => Some(reason.clone()),
            _ => None,
        });
        if let Some(reason) = tripped {
            self.announce_breaker(crate::store::GLOBAL.into(), reason);
        }
        let count = |playbook: &str, state: RunState| {
            (self
                .metrics
                .runs
                .with_label_values(&[playbook, state.as_str()]))
            .inc();
        };
        for o in outcomes.iter().flatten() {
            match o {
                Outcome::Suppressed { playbook, .. } => count(playbook, RunState::Suppressed),
                Outcome::Failed { playbook, .. } => count(playbook, RunState::Failed),
                Outcome::Coalesced { playbook, .. } => count(playbook, RunState::Coalesced),
                Outcome::Ended { run_id, state, .. } => self.announce_end(*run_id, *state).await,
                Outcome::Created { .. } | Outcome::Deduplicated { .. } => {}
            }
        }
        // New runs that intake did not start wait for the dispatcher.
        let created = (outcomes.iter().flatten())
            .filter(|o| matches!(o, Outcome::Created { .. }))
            .count();
        if created > started_n {
            self.wake.notify_one();
        }
        Ok(outcomes)
    }

    /// What intake is handed for `pb` matched by `alert`; a plan that failed is counted by
    /// its reason.
    pub(super) fn candidate(
        &self,
        pb: &Playbook,
        alert: &Alert,
        plan: Result<Plan, PlanError>,
        suppress: Option<String>,
    ) -> Candidate {
        let plan = plan.inspect_err(|e| {
            (self.metrics.plan_failures)
                .with_label_values(&[&pb.name, e.metric_label()])
                .inc();
        });
        candidate(
            pb,
            alert,
            plan,
            suppress,
            self.dry_run,
            self.config.run_deadline,
        )
    }
}

/// What intake is handed for `pb` matched by `alert` (the engine's, and `reflex replay`'s):
/// every run in shadow mode with `shadow`.
pub fn candidate(
    pb: &Playbook,
    alert: &Alert,
    plan: Result<Plan, PlanError>,
    suppress: Option<String>,
    shadow: bool,
    run_deadline: Duration,
) -> Candidate {
    Candidate {
        playbook: pb.name.clone(),
        cooldown_ms: pb.cooldown.as_millis() as i64,
        cooldown_key: match (pb.cooldown_by, &alert.group_key) {
            (CooldownBy::Group, Some(g)) => g.clone(),
            _ => alert.fingerprint.clone(),
        },
        dry_run: shadow || pb.dry_run,
        plan: plan.map_err(|e| e.to_string()),
        deadline_ms: pb.deadline.unwrap_or(run_deadline).as_millis() as i64,
        suppress,
        coalesce: pb.coalesce,
        manual: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn set(when: &str) -> PlaybookSet {
        let dir = tempfile::tempdir().unwrap();
        let playbook = format!(
            "name: p\nmatchers: ['alertname=\"A\"']\nwhen: |\n  {when}\nsteps:\n  - action: log\n    with: {{ message: m }}\n"
        );
        std::fs::write(dir.path().join("p.yaml"), playbook).unwrap();
        PlaybookSet::load(&[dir.path().to_path_buf()], &Default::default()).unwrap()
    }

    pub(super) fn alerts(n: usize) -> Vec<Alert> {
        let body: Vec<serde_json::Value> = (0..n)
            .map(|i| serde_json::json!({"labels": {"alertname": "A", "i": i.to_string()}}))
            .collect();
        crate::alert::parse_generic(
            serde_json::Value::from(body).to_string().as_bytes(),
            "2026-11-23T00:00:00Z",
        )
        .unwrap()
    }

    #[test]
    pub(super) fn cheap_alerts_are_planned_in_place() {
        // A window no busy machine can overrun: what is asserted is where they are planned.
        let window = Duration::from_secs(30);
        let (done, rest) =
            evaluate_in_place(&set("true"), alerts(3), window, Duration::from_secs(5));
        assert_eq!(done.len(), 3);
        assert!(rest.is_empty());
        assert!(done.iter().all(|(_, m)| m.len() == 1 && m[0].plan.is_ok()));
    }

    #[test]
    pub(super) fn a_costly_condition_is_handed_on_whole_with_its_full_budget() {
        // Far more than a millisecond of work, far less than the budget.
        let costly = set("let n = 0; for i in 0..20000 { n += labels.i.len(); } n > 0");
        let budget = Duration::from_secs(5);
        let (done, rest) = evaluate_in_place(&costly, alerts(2), EVALUATE_IN_PLACE, budget);
        assert!(done.is_empty(), "cut off in place, not failed");
        assert_eq!(rest.len(), 2, "the cut alert and the one after it");
        // Where it goes next, the whole budget lets it finish.
        let _budget = Budget::start(budget);
        let matched = costly.evaluate(&rest[0]);
        assert!(matched[0].plan.is_ok(), "{:?}", matched[0].plan);
    }

    #[test]
    pub(super) fn a_budget_shorter_than_the_time_in_place_fails_the_alert_in_place() {
        let costly = set("let n = 0; for i in 0..20000 { n += labels.i.len(); } n > 0");
        let (done, rest) = evaluate_in_place(&costly, alerts(1), EVALUATE_IN_PLACE, Duration::ZERO);
        assert!(rest.is_empty());
        let error = done[0].1[0].plan.as_ref().unwrap_err().to_string();
        assert!(error.contains("time budget exceeded"), "{error}");
    }
}
