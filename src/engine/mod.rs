//! Turns matched alerts into persisted runs and drives them. A file per concern: `intake`
//! (match, plan, record), `dispatch` (claim and start), `run` (a run's steps), `operator`
//! (switches, cancels, reloads, decisions), `reports` (ends told, metrics), `sweeper`
//! (approval expiry), `lease` (replicas on PostgreSQL), `manual` (trigger, retry).
//!
//! Intake ([`Engine::intake`]) matches and renders in memory, then records alerts and runs in
//! one transaction (dedup and cooldown are decided there) before the sender gets its answer.
//! The store is the run queue: the dispatcher claims pending runs in order, at most
//! `max_concurrent_runs` at once, so a crash or a restart loses nothing.

mod audit_sink;
mod autonomy;
mod budgets;
mod dispatch;
pub mod intake;
mod lease;
pub mod maintenance;
pub mod manual;
mod operator;
mod reports;
mod retention;
mod run;
mod sweeper;
pub mod undo;

pub use intake::Intake;
pub use operator::CancelResult;

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

/// A run this replica executes: the token that cancels it, and whether a task drives it
/// (an operator's cancel may come first, for a run claimed but not yet driven).
#[derive(Default)]
struct Driving {
    token: CancellationToken,
    driven: bool,
}

/// The engine: shared by the API and the dispatcher.
pub struct Engine {
    store: Store,
    playbooks: ArcSwap<PlaybookSet>,
    /// What the config in force says, replaced whole by a reload.
    live: ArcSwap<Live>,
    config: EngineConfig,
    dry_run: bool,
    playbook_paths: Vec<PathBuf>,
    metrics: Arc<Metrics>,
    wake: Notify,
    /// Wakes the planner of deferred alerts.
    deferred_wake: Notify,
    /// How long a webhook's alerts may be planned before the rest are deferred.
    request_budget: Duration,
    /// Worker slots (`max_concurrent_runs`), taken by the dispatcher's claims and by intake
    /// when it starts a run in its own transaction.
    slots: Arc<Semaphore>,
    /// Runs in flight, by id: their cancellation, and whether a task drives them.
    running: Mutex<HashMap<i64, Driving>>,
    /// The last rejected reload, until a reload succeeds (shown by the console).
    reload_failure: Mutex<Option<ReloadFailure>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// The parts of the config a reload replaces (all at once: a run sees one config).
pub struct Live {
    /// Executors by action (SSH inventory, clusters, flag providers, credentials).
    pub executors: Executors,
    /// Chat and webhook sinks.
    pub notifier: Notifier,
    /// Circuit breaker limits.
    pub limits: BreakerLimits,
    /// Maintenance windows.
    pub windows: maintenance::Windows,
    /// What the config defines that playbooks may name (checked at every reload).
    pub references: crate::playbook::references::References,
    /// How long the record is kept.
    pub retention: crate::config::RetentionConfig,
    /// Removes configured secrets from step results before they are recorded.
    pub redactor: crate::redact::Redactor,
    /// Where operators reach this daemon, without a trailing slash.
    pub public_url: Option<String>,
    /// Blast-radius budgets.
    pub budgets: Vec<crate::config::Budget>,
    /// Where the audit log is copied, with the credential it sends.
    pub audit_sink: Option<(
        crate::config::AuditSinkConfig,
        Option<crate::config::Credential>,
    )>,
}

impl Live {
    /// From a config, with these executors and sinks (built by the caller: they read
    /// secrets and start tasks).
    pub fn new(cfg: &Config, executors: Executors, notifier: Notifier) -> Live {
        let b = &cfg.breaker;
        Live {
            executors,
            notifier,
            limits: BreakerLimits {
                window_ms: b.window.as_millis() as i64,
                max_runs: b.max_runs,
                max_runs_per_playbook: b.max_runs_per_playbook,
                max_failures: b.max_failures,
                max_targets: b.max_targets,
            },
            windows: maintenance::Windows::new(&cfg.maintenance_windows),
            references: cfg.references(),
            retention: cfg.retention.clone(),
            redactor: crate::redact::Redactor::from_config(cfg),
            public_url: (cfg.public_url.clone()).map(|u| u.trim_end_matches('/').to_string()),
            budgets: cfg.budgets.clone(),
            audit_sink: cfg.audit.sink.clone().map(|sink| {
                let credential =
                    (sink.credential.as_ref()).and_then(|name| cfg.credentials.get(name).cloned());
                (sink, credential)
            }),
        }
    }
}

/// A reload that was refused: when, and every error (`file:line: message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadFailure {
    /// When.
    pub at: crate::time::Timestamp,
    /// What triggered it (`SIGHUP`, `api`, …).
    pub trigger: String,
    /// The errors.
    pub errors: Vec<String>,
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
        Arc::new(Engine {
            store,
            playbooks: ArcSwap::from_pointee(playbooks),
            live: ArcSwap::from_pointee(Live::new(cfg, executors, notifier)),
            config: cfg.engine.clone(),
            dry_run: cfg.shadow(),
            playbook_paths: vec![cfg.playbooks_dir.clone()],
            metrics,
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
    pub fn public_url(&self) -> Option<String> {
        self.live().public_url.clone()
    }

    /// The config in force.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Records a refused reload (shown by the console until one succeeds).
    pub fn note_reload_failure(&self, trigger: &str, errors: Vec<String>) {
        *self
            .reload_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(ReloadFailure {
            at: crate::time::Timestamp::from_ms(self.store.now_ms()),
            trigger: trigger.to_string(),
            errors,
        });
    }

    /// Puts a reloaded config in force (with its playbooks, checked against it); runs in
    /// flight finish their step with what they started it with.
    pub fn set_live(&self, live: Live, playbooks: PlaybookSet) {
        self.live.store(Arc::new(live));
        self.set_playbooks(playbooks);
        *self
            .reload_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
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

    /// The metrics, shared.
    pub fn metrics_arc(&self) -> Arc<Metrics> {
        self.metrics.clone()
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
        match PlaybookSet::load(&self.playbook_paths, &self.live().references) {
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
                    at: crate::time::Timestamp::from_ms(self.store.now_ms()),
                    trigger: why.to_string(),
                    errors: diags.iter().map(ToString::to_string).collect(),
                });
                Err(diags)
            }
        }
    }

    /// What a message says about a run.
    pub(crate) fn run_info(
        &self,
        id: i64,
        playbook: &str,
        target: &str,
        alert: crate::notify::AlertLinks,
        dry_run: bool,
    ) -> RunInfo {
        RunInfo {
            id,
            dry_run,
            playbook: playbook.to_string(),
            target: target.to_string(),
            title: alert.title,
            url: (self.live().public_url.as_ref()).map(|u| format!("{u}/ui/runs/{id}")),
            runbook_url: alert.runbook_url,
            source_url: alert.source_url,
        }
    }
}
