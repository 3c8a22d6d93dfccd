//! Turns matched alerts into persisted runs and executes them.
//!
//! Intake ([`Engine::intake`]) matches and renders in memory, then records alerts and runs in
//! one transaction (dedup and cooldown are decided there) before the sender gets its answer.
//! The store is the run queue: the dispatcher claims pending runs in order, at most
//! `max_concurrent_runs` at once, so a crash or a restart loses nothing.

pub mod maintenance;
pub mod manual;
mod run;

use crate::alert::Alert;
use crate::config::{Config, EngineConfig};
use crate::executors::Executors;
use crate::metrics::Metrics;
use crate::notify::{Event, Notifier, RunInfo};
use crate::playbook::error::PlanError;
use crate::playbook::script::Budget;
use crate::playbook::spec::CooldownBy;
use crate::playbook::{Diagnostic, Matched, Plan, Playbook, PlaybookSet};
use crate::store::{
    BreakerLimits, Candidate, ClaimedRun, Decision, Hold, IntakeItem, Outcome, Recorded, RunState,
    StartNow, Store, StoreError,
};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long the dispatcher sleeps without a wake-up before looking at the queue again; a
/// safety net only, since every intake wakes it.
const IDLE_POLL: Duration = Duration::from_secs(5);

/// Runs claimed in one write at most.
const MAX_CLAIM: usize = 64;

/// Every this many lease renewals (2 s each), a replica on PostgreSQL looks for runs it holds
/// in the database but does not execute.
const ORPHAN_EVERY: u64 = 15;

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

/// How often pending approvals are checked for expiry.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The engine: shared by the API and the dispatcher.
pub struct Engine {
    store: Store,
    playbooks: ArcSwap<PlaybookSet>,
    executors: Executors,
    config: EngineConfig,
    limits: BreakerLimits,
    windows: maintenance::Windows,
    dry_run: bool,
    playbook_paths: Vec<PathBuf>,
    /// What the config defines that playbooks may name (checked at every reload).
    references: crate::playbook::references::References,
    metrics: Arc<Metrics>,
    notifier: Notifier,
    public_url: Option<String>,
    /// Removes configured secrets from step results before they are recorded.
    redactor: crate::redact::Redactor,
    wake: Notify,
    /// Wakes the planner of deferred alerts.
    deferred_wake: Notify,
    /// How long a webhook's alerts may be planned before the rest are deferred.
    request_budget: Duration,
    /// Worker slots (`max_concurrent_runs`), taken by the dispatcher's claims and by intake
    /// when it starts a run in its own transaction.
    slots: Arc<Semaphore>,
    /// Cancellation tokens of runs in flight, by run id.
    running: Mutex<HashMap<i64, CancellationToken>>,
    /// The last rejected reload, until a reload succeeds (shown by the console).
    reload_failure: Mutex<Option<ReloadFailure>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// A reload that was refused: when, and every error (`file:line: message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadFailure {
    /// When (ms since the epoch).
    pub at_ms: i64,
    /// What triggered it (`SIGHUP`, `api`, …).
    pub trigger: String,
    /// The errors.
    pub errors: Vec<String>,
}

/// The result of a cancel request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelResult {
    /// No such run.
    NotFound,
    /// It had not started; it is now `cancelled`.
    Cancelled,
    /// It is running; it stops before its next step.
    Requested,
    /// It had already ended in this state.
    AlreadyFinished(RunState),
}

impl Engine {
    /// Builds the engine; `shutdown` stops the dispatcher and runs between steps.
    pub fn new(
        store: Store,
        playbooks: PlaybookSet,
        executors: Executors,
        cfg: &Config,
        metrics: Arc<Metrics>,
        notifier: Notifier,
        shutdown: CancellationToken,
    ) -> Arc<Engine> {
        metrics
            .playbooks_loaded
            .set(playbooks.playbooks.len() as i64);
        let windows = maintenance::Windows::new(&cfg.maintenance_windows);
        let b = &cfg.breaker;
        Arc::new(Engine {
            store,
            playbooks: ArcSwap::from_pointee(playbooks),
            executors,
            config: cfg.engine.clone(),
            limits: BreakerLimits {
                window_ms: b.window.as_millis() as i64,
                max_runs: b.max_runs,
                max_runs_per_playbook: b.max_runs_per_playbook,
                max_failures: b.max_failures,
                max_targets: b.max_targets,
            },
            windows,
            dry_run: cfg.dry_run,
            playbook_paths: vec![cfg.playbooks_dir.clone()],
            references: cfg.references(),
            metrics,
            notifier,
            public_url: cfg
                .public_url
                .clone()
                .map(|u| u.trim_end_matches('/').to_string()),
            redactor: crate::redact::Redactor::from_config(cfg),
            wake: Notify::new(),
            deferred_wake: Notify::new(),
            // Half the request's time at most: the rest is for storing what is left.
            request_budget: (cfg.intake.plan_request_budget).min(cfg.server.request_timeout / 2),
            slots: Arc::new(Semaphore::new(cfg.engine.max_concurrent_runs)),
            running: Mutex::new(HashMap::new()),
            reload_failure: Mutex::new(None),
            shutdown,
            tracker: TaskTracker::new(),
        })
    }

    /// Where operators reach this daemon (`public_url`), without a trailing slash.
    pub fn public_url(&self) -> Option<&str> {
        self.public_url.as_deref()
    }

    /// The last refused reload, unless a reload succeeded since.
    pub fn reload_failure(&self) -> Option<ReloadFailure> {
        self.reload_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The playbooks in force.
    pub fn playbooks(&self) -> Arc<PlaybookSet> {
        self.playbooks.load_full()
    }

    /// Replaces the playbooks; runs in flight keep the steps they were planned with.
    pub fn set_playbooks(&self, set: PlaybookSet) {
        self.metrics
            .playbooks_loaded
            .set(set.playbooks.len() as i64);
        self.playbooks.store(Arc::new(set));
    }

    /// Reloads the playbook directory. A set with any invalid playbook is rejected whole: the
    /// set in force stays, and the errors are logged, counted and returned.
    pub fn reload(&self, why: &str) -> Result<usize, Vec<Diagnostic>> {
        match PlaybookSet::load(&self.playbook_paths, &self.references) {
            Ok(set) => {
                let n = set.playbooks.len();
                self.set_playbooks(set);
                *self
                    .reload_failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = None;
                tracing::info!(count = n, trigger = why, "playbooks reloaded");
                Ok(n)
            }
            Err(diags) => {
                self.metrics.reload_errors.inc();
                for d in &diags {
                    tracing::error!(trigger = why, error = %d, "playbook reload rejected; the previous set stays in force");
                }
                *self
                    .reload_failure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(ReloadFailure {
                    at_ms: self.store.now_ms(),
                    trigger: why.to_string(),
                    errors: diags.iter().map(ToString::to_string).collect(),
                });
                Err(diags)
            }
        }
    }

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
        let (mut evaluated, rest) = evaluate_in_place(&set, alerts, budget);
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
    async fn intake_planned(
        self: &Arc<Self>,
        evaluated: Vec<(Alert, Vec<Matched>)>,
        received_us: i64,
        deferred: Option<i64>,
    ) -> Result<Vec<Vec<Outcome>>, StoreError> {
        let now = self.store.now_ms();
        let items: Vec<IntakeItem> = evaluated
            .into_iter()
            .map(|(alert, matched)| {
                let suppress = self.windows.hold(&alert, now);
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
    async fn record(
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
            .record_and_start(items, self.limits, start)
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
        for o in outcomes.iter().flatten() {
            match o {
                Outcome::Suppressed { playbook, .. } => self
                    .metrics
                    .runs
                    .with_label_values(&[playbook, "suppressed"])
                    .inc(),
                Outcome::Failed { playbook, .. } => self
                    .metrics
                    .runs
                    .with_label_values(&[playbook, "failed"])
                    .inc(),
                Outcome::Coalesced { playbook, .. } => self
                    .metrics
                    .runs
                    .with_label_values(&[playbook, "coalesced"])
                    .inc(),
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
    fn candidate(
        &self,
        pb: &Playbook,
        alert: &Alert,
        plan: Result<Plan, PlanError>,
        suppress: Option<String>,
    ) -> Candidate {
        Candidate {
            playbook: pb.name.clone(),
            cooldown_ms: pb.cooldown.as_millis() as i64,
            cooldown_key: match (pb.cooldown_by, &alert.group_key) {
                (CooldownBy::Group, Some(g)) => g.clone(),
                _ => alert.fingerprint.clone(),
            },
            dry_run: self.dry_run || pb.dry_run,
            plan: plan.map_err(|e| {
                (self.metrics.plan_failures)
                    .with_label_values(&[&pb.name, e.metric_label()])
                    .inc();
                e.to_string()
            }),
            deadline_ms: pb.deadline.unwrap_or(self.config.run_deadline).as_millis() as i64,
            suppress,
            coalesce: pb.coalesce,
            manual: None,
        }
    }

    /// An operator engages or releases a kill switch (`scope` global or a playbook's): recorded
    /// (with its audit row, in one transaction), logged and told in chat.
    /// An engagement of a switch engaged already changes nothing unless `replace`: the
    /// answer is then `Some` of who holds it and why.
    pub async fn set_switch(
        &self,
        scope: String,
        engaged: bool,
        reason: String,
        actor: String,
        until: Option<i64>,
        replace: bool,
    ) -> Result<Option<String>, StoreError> {
        let held = (self.store)
            .change_switch(
                scope.clone(),
                engaged,
                reason.clone(),
                actor.clone(),
                until,
                replace,
            )
            .await?;
        if held.is_some() {
            return Ok(held);
        }
        if engaged {
            tracing::warn!(%scope, %actor, %reason, "kill switch engaged");
        } else {
            tracing::warn!(%scope, %actor, "kill switch released");
        }
        self.notifier.send(Event::KillSwitch {
            scope,
            engaged,
            actor,
            reason,
            until: until.filter(|_| engaged).map(crate::time::rfc3339),
        });
        Ok(None)
    }

    /// An operator cancels a run: at once if it has not started, before its next step if it
    /// is running; the request is audited whatever its result.
    pub async fn cancel_by(&self, run_id: i64, who: &str) -> Result<CancelResult, StoreError> {
        let result = self.cancel(run_id).await?;
        let outcome = match result {
            CancelResult::NotFound => return Ok(result),
            CancelResult::Cancelled | CancelResult::Requested => "ok",
            CancelResult::AlreadyFinished(_) => "refused",
        };
        self.store
            .audit(
                who,
                "run.cancel",
                Some(format!("run/{run_id}")),
                outcome,
                None,
            )
            .await?;
        Ok(result)
    }

    /// An operator reloads the playbooks: as [`Engine::reload`], audited.
    pub async fn reload_by(&self, who: &str) -> Result<Result<usize, Vec<Diagnostic>>, StoreError> {
        let result = self.reload("api");
        let (outcome, detail) = match &result {
            Ok(n) => ("ok", format!("{n} playbooks")),
            Err(d) => ("failed", format!("{} errors", d.len())),
        };
        self.store
            .audit(who, "playbooks.reload", None, outcome, Some(detail))
            .await?;
        Ok(result)
    }

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
    fn announce_breaker(&self, scope: String, reason: String) {
        tracing::error!(%scope, %reason, "kill switch engaged by the circuit breaker");
        self.notifier.send(Event::KillSwitch {
            scope,
            engaged: true,
            actor: "circuit-breaker".into(),
            reason,
            until: None,
        });
    }

    /// A running run whose cancel was asked on this replica shows as `cancelling` until its
    /// step under way has stopped.
    pub fn show_cancelling(&self, run: &mut crate::store::RunView) {
        if run.state == RunState::Running.as_str() {
            let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            if running
                .get(&run.id)
                .is_some_and(CancellationToken::is_cancelled)
            {
                run.state = "cancelling".into();
            }
        }
    }

    /// Cancels a run: at once if it has not started; a running one stops its step under way.
    pub async fn cancel(&self, run_id: i64) -> Result<CancelResult, StoreError> {
        Ok(match self.store.cancel_if_pending(run_id).await? {
            None => CancelResult::NotFound,
            Some(RunState::Pending | RunState::AwaitingApproval) => {
                self.announce_end(run_id, RunState::Cancelled).await;
                CancelResult::Cancelled
            }
            Some(RunState::Running) => {
                // The run may be claimed but not yet registered: leave a cancelled token
                // that the worker picks up when it registers.
                let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
                running.entry(run_id).or_default().cancel();
                CancelResult::Requested
            }
            Some(state) => CancelResult::AlreadyFinished(state),
        })
    }

    /// An approver's decision; an approval that completes its count puts the run back in the
    /// queue.
    pub async fn decide(
        &self,
        approval_id: i64,
        who: String,
        approve: bool,
        comment: Option<String>,
    ) -> Result<Decision, StoreError> {
        let decision = self
            .store
            .decide(approval_id, who, approve, comment)
            .await?;
        match decision {
            Decision::Approved => self.wake.notify_one(),
            Decision::Denied | Decision::Expired => {
                if let Some(a) = self.store.get_approval(approval_id).await? {
                    let state = if decision == Decision::Denied {
                        RunState::Denied
                    } else {
                        RunState::Expired
                    };
                    self.announce_end(a.run_id, state).await;
                }
            }
            _ => {}
        }
        Ok(decision)
    }

    /// Counts and reports a run that ended without a worker (denied, expired, resolved,
    /// cancelled while waiting, interrupted by a restart).
    async fn announce_end(&self, run_id: i64, state: RunState) {
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

    /// What a message says about a run.
    pub(crate) fn run_info(
        &self,
        id: i64,
        playbook: &str,
        target: &str,
        alert: &Alert,
        dry_run: bool,
    ) -> RunInfo {
        RunInfo {
            id,
            dry_run,
            playbook: playbook.to_string(),
            target: target.to_string(),
            title: alert
                .annotations
                .get("summary")
                .cloned()
                .unwrap_or_else(|| format!("{} on {target}", alert.name())),
            url: self
                .public_url
                .as_ref()
                .map(|u| format!("{u}/ui/runs/{id}")),
        }
    }

    /// Expires approvals past their time, every [`SWEEP_INTERVAL`], until shutdown. Runs once
    /// at start too, so that approvals that expired while the daemon was down end at once.
    pub async fn sweep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            match self.store.expire_due().await {
                Ok(runs) => {
                    for run_id in runs {
                        tracing::info!(run_id, "approval expired; run ended without acting");
                        self.announce_end(run_id, RunState::Expired).await;
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot expire approvals"),
            }
        }
    }

    /// Executes a claimed run on its own task, holding its worker slot until it ends.
    fn spawn_run(self: &Arc<Self>, run: ClaimedRun, permit: tokio::sync::OwnedSemaphorePermit) {
        let engine = self.clone();
        self.tracker.spawn(async move {
            engine.execute(run).await;
            drop(permit);
        });
    }

    /// Marks runs cut off by a crash as interrupted; call once before [`Engine::dispatch`].
    /// On PostgreSQL, takes this replica's lease first.
    pub async fn recover(&self) -> Result<Vec<i64>, StoreError> {
        self.store.renew_lease().await?;
        let ids = self.store.recover().await?;
        for id in &ids {
            tracing::warn!(
                run_id = id,
                "run interrupted by a restart; its running step was not re-run"
            );
            self.announce_end(*id, RunState::Interrupted).await;
        }
        Ok(ids)
    }

    /// Keeps this replica's lease (PostgreSQL) until shutdown: renews it every
    /// [`crate::store::LEASE_RENEW`], and takes over the work of replicas whose lease expired,
    /// announcing each run that ends interrupted. Nothing to do on SQLite.
    pub async fn keep_lease(self: Arc<Self>) {
        if !self.store.is_shared() {
            return;
        }
        let mut tick = tokio::time::interval(crate::store::LEASE_RENEW);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Runs the database says this replica executes but its engine does not, as of the
        // previous look: one seen so twice in a row was lost track of.
        let mut unclaimed: Vec<i64> = Vec::new();
        for round in 0u64.. {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            if round % ORPHAN_EVERY == ORPHAN_EVERY - 1 {
                unclaimed = self.release_orphans(unclaimed).await;
            }
            let renewed = self.store.renew_lease().await;
            self.metrics
                .lease_held
                .set(i64::from(self.store.may_claim()));
            match renewed {
                Ok(true) => {}
                Ok(false) => tracing::error!(
                    replica = self.store.replica(),
                    "this replica's lease had expired and its runs were taken over; it claims again from now"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "cannot renew the lease; claiming nothing until it is renewed");
                    continue;
                }
            }
            let taken = match self.store.take_over_expired().await {
                Ok(taken) => taken,
                Err(e) => {
                    tracing::error!(error = %e, "cannot take over expired replicas; retrying");
                    continue;
                }
            };
            for t in taken {
                self.metrics.takeovers.inc();
                tracing::warn!(
                    replica = %t.replica,
                    interrupted = ?t.interrupted,
                    requeued = ?t.requeued,
                    "a replica's lease expired: its running steps are interrupted, its unstarted runs requeued"
                );
                for id in t.interrupted {
                    self.announce_end(id, RunState::Interrupted).await;
                }
                if !t.requeued.is_empty() {
                    self.wake.notify_one();
                }
            }
        }
    }

    /// Compares the runs the database says this replica executes with the runs it does;
    /// releases those missing now and at the previous look (`seen`). Returns those missing now.
    async fn release_orphans(&self, seen: Vec<i64>) -> Vec<i64> {
        let owned = match self.store.owned_running().await {
            Ok(owned) => owned,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list this replica's runs");
                return seen;
            }
        };
        let missing: Vec<i64> = {
            let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            owned
                .into_iter()
                .filter(|id| !running.contains_key(id))
                .collect()
        };
        let lost: Vec<i64> = missing
            .iter()
            .copied()
            .filter(|id| seen.contains(id))
            .collect();
        if lost.is_empty() {
            return missing;
        }
        match self.store.release_orphans(lost).await {
            Ok(t) => {
                tracing::warn!(
                    interrupted = ?t.interrupted,
                    requeued = ?t.requeued,
                    "runs this replica had lost track of: released"
                );
                for id in t.interrupted {
                    self.announce_end(id, RunState::Interrupted).await;
                }
                self.wake.notify_one();
            }
            Err(e) => tracing::warn!(error = %e, "cannot release runs this replica lost track of"),
        }
        Vec::new()
    }

    /// The dispatcher: claims pending runs, oldest first, within the concurrency limit, until
    /// shutdown. Then waits up to `shutdown_grace` for runs in flight to reach a step boundary.
    pub async fn dispatch(self: Arc<Self>) {
        let slots = self.slots.clone();
        loop {
            let first = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("semaphore is never closed"),
                _ = self.shutdown.cancelled() => break,
            };
            if self.shutdown.is_cancelled() {
                break;
            }
            // Claim as many runs as there are free slots, in one write.
            let mut permits = vec![first];
            while permits.len() < MAX_CLAIM {
                match slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let claimed = self
                .store
                .claim(self.config.max_runs_per_target, permits.len())
                .await;
            match claimed {
                Ok(runs) if !runs.is_empty() => {
                    for (run, permit) in runs.into_iter().zip(permits) {
                        self.spawn_run(run, permit);
                    }
                }
                Ok(_) => {
                    drop(permits);
                    // Replicas wake each other (`NOTIFY`); should one be lost, they look
                    // again sooner than a lone process does.
                    let idle = if self.store.is_shared() {
                        Duration::from_secs(1)
                    } else {
                        IDLE_POLL
                    };
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = self.store.woken() => {}
                        _ = tokio::time::sleep(idle) => {}
                        _ = self.shutdown.cancelled() => break,
                    }
                }
                Err(e) => {
                    drop(permits);
                    tracing::error!(error = %e, "cannot claim runs from the store; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        self.tracker.close();
        if tokio::time::timeout(self.config.shutdown_grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace = ?self.config.shutdown_grace,
                "runs still in a step at shutdown; they will be marked interrupted at the next start"
            );
        }
    }
}

/// How long matching and planning (Rhai) may run on the async worker that took the webhook.
/// Most payloads need microseconds, and a hand-off to the blocking pool costs more than that
/// (a thread woken per webhook, a sixth of the workers' time under load).
const EVALUATE_IN_PLACE: Duration = Duration::from_millis(1);

/// Matches and plans alerts in place while [`EVALUATE_IN_PLACE`] lasts, and returns the
/// alerts left for the blocking pool: those after the time was up, and the one whose
/// evaluation the short budget cut off (evaluation has no effects, so it runs again there with
/// the whole budget). A costly script or a large payload thus holds a worker for about a
/// millisecond, and is still given its full budget per alert.
fn evaluate_in_place(
    set: &PlaybookSet,
    alerts: Vec<Alert>,
    budget: Duration,
) -> (Vec<(Alert, Vec<Matched>)>, Vec<Alert>) {
    let until = std::time::Instant::now() + EVALUATE_IN_PLACE;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn set(when: &str) -> PlaybookSet {
        let dir = tempfile::tempdir().unwrap();
        let playbook = format!(
            "name: p\nmatchers: ['alertname=\"A\"']\nwhen: |\n  {when}\nsteps:\n  - action: log\n    with: {{ message: m }}\n"
        );
        std::fs::write(dir.path().join("p.yaml"), playbook).unwrap();
        PlaybookSet::load(&[dir.path().to_path_buf()], &Default::default()).unwrap()
    }

    fn alerts(n: usize) -> Vec<Alert> {
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
    fn cheap_alerts_are_planned_in_place() {
        let (done, rest) = evaluate_in_place(&set("true"), alerts(3), Duration::from_secs(5));
        assert_eq!(done.len(), 3);
        assert!(rest.is_empty());
        assert!(done.iter().all(|(_, m)| m.len() == 1 && m[0].plan.is_ok()));
    }

    #[test]
    fn a_costly_condition_is_handed_on_whole_with_its_full_budget() {
        // Far more than a millisecond of work, far less than the budget.
        let costly = set("let n = 0; for i in 0..20000 { n += labels.i.len(); } n > 0");
        let budget = Duration::from_secs(5);
        let (done, rest) = evaluate_in_place(&costly, alerts(2), budget);
        assert!(done.is_empty(), "cut off in place, not failed");
        assert_eq!(rest.len(), 2, "the cut alert and the one after it");
        // Where it goes next, the whole budget lets it finish.
        let _budget = Budget::start(budget);
        let matched = costly.evaluate(&rest[0]);
        assert!(matched[0].plan.is_ok(), "{:?}", matched[0].plan);
    }

    #[test]
    fn a_budget_shorter_than_the_time_in_place_fails_the_alert_in_place() {
        let costly = set("let n = 0; for i in 0..20000 { n += labels.i.len(); } n > 0");
        let (done, rest) = evaluate_in_place(&costly, alerts(1), Duration::ZERO);
        assert!(rest.is_empty());
        let error = done[0].1[0].plan.as_ref().unwrap_err().to_string();
        assert!(error.contains("time budget exceeded"), "{error}");
    }
}
