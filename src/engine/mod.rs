//! Turns matched alerts into persisted runs and executes them.
//!
//! Intake ([`Engine::intake`]) matches and renders in memory, then records alerts and runs in
//! one transaction (dedup and cooldown are decided there) before the sender gets its answer.
//! The store is the run queue: the dispatcher claims pending runs in order, at most
//! `max_concurrent_runs` at once, so a crash or a restart loses nothing.

mod run;

use crate::alert::Alert;
use crate::config::EngineConfig;
use crate::executors::Executors;
use crate::playbook::PlaybookSet;
use crate::playbook::spec::CooldownBy;
use crate::store::{Candidate, IntakeItem, Outcome, RunState, Store, StoreError};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long the dispatcher sleeps without a wake-up before looking at the queue again; a
/// safety net only, since every intake wakes it.
const IDLE_POLL: Duration = Duration::from_secs(5);

/// The engine: shared by the API and the dispatcher.
pub struct Engine {
    store: Store,
    playbooks: ArcSwap<PlaybookSet>,
    executors: Executors,
    config: EngineConfig,
    dry_run: bool,
    wake: Notify,
    /// Cancellation tokens of runs in flight, by run id.
    running: Mutex<HashMap<i64, CancellationToken>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
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
        config: EngineConfig,
        dry_run: bool,
        shutdown: CancellationToken,
    ) -> Arc<Engine> {
        Arc::new(Engine {
            store,
            playbooks: ArcSwap::from_pointee(playbooks),
            executors,
            config,
            dry_run,
            wake: Notify::new(),
            running: Mutex::new(HashMap::new()),
            shutdown,
            tracker: TaskTracker::new(),
        })
    }

    /// The playbooks in force.
    pub fn playbooks(&self) -> Arc<PlaybookSet> {
        self.playbooks.load_full()
    }

    /// Replaces the playbooks; runs in flight keep the steps they were planned with.
    pub fn set_playbooks(&self, set: PlaybookSet) {
        self.playbooks.store(Arc::new(set));
    }

    /// Matches, renders and records alerts. Returns the outcome for each alert's matched
    /// playbooks. When this returns `Ok`, everything is on disk.
    pub async fn intake(&self, alerts: Vec<Alert>) -> Result<Vec<Vec<Outcome>>, StoreError> {
        let set = self.playbooks();
        let items = alerts
            .into_iter()
            .map(|alert| {
                let candidates = set
                    .evaluate(&alert)
                    .into_iter()
                    .map(|m| Candidate {
                        playbook: m.playbook.name.clone(),
                        cooldown_ms: m.playbook.cooldown.as_millis() as i64,
                        cooldown_key: match (m.playbook.cooldown_by, &alert.group_key) {
                            (CooldownBy::Group, Some(g)) => g.clone(),
                            _ => alert.fingerprint.clone(),
                        },
                        dry_run: self.dry_run || m.playbook.dry_run,
                        plan: m.plan,
                    })
                    .collect();
                IntakeItem { alert, candidates }
            })
            .collect();
        let outcomes = self.store.record_intake(items).await?;
        if outcomes
            .iter()
            .flatten()
            .any(|o| matches!(o, Outcome::Created { .. }))
        {
            self.wake.notify_one();
        }
        Ok(outcomes)
    }

    /// Cancels a run: at once if it has not started, before its next step if it is running.
    pub async fn cancel(&self, run_id: i64) -> Result<CancelResult, StoreError> {
        Ok(match self.store.cancel_if_pending(run_id).await? {
            None => CancelResult::NotFound,
            Some(RunState::Pending) => CancelResult::Cancelled,
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

    /// Marks runs cut off by a crash as interrupted; call once before [`Engine::dispatch`].
    pub async fn recover(&self) -> Result<Vec<i64>, StoreError> {
        let ids = self.store.recover().await?;
        for id in &ids {
            tracing::warn!(
                run_id = id,
                "run interrupted by a restart; its running step was not re-run"
            );
        }
        Ok(ids)
    }

    /// The dispatcher: claims pending runs, oldest first, within the concurrency limit, until
    /// shutdown. Then waits up to `shutdown_grace` for runs in flight to reach a step boundary.
    pub async fn dispatch(self: Arc<Self>) {
        let slots = Arc::new(Semaphore::new(self.config.max_concurrent_runs));
        loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("semaphore is never closed"),
                _ = self.shutdown.cancelled() => break,
            };
            if self.shutdown.is_cancelled() {
                break;
            }
            match self.store.claim_next().await {
                Ok(Some(run)) => {
                    let engine = self.clone();
                    self.tracker.spawn(async move {
                        engine.execute(run).await;
                        drop(permit);
                    });
                }
                Ok(None) => {
                    drop(permit);
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(IDLE_POLL) => {}
                        _ = self.shutdown.cancelled() => break,
                    }
                }
                Err(e) => {
                    drop(permit);
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
