//! Reloading `reflex.yaml` with the playbooks (SIGHUP, `reflex reload`, the console): tokens,
//! chat sinks, the SSH inventory, clusters, flag providers, credentials, maintenance windows,
//! breaker limits and retention. All or nothing: everything is built from the new file first
//! (secrets read, playbooks checked against it), and only then put in force together; a file
//! with any error changes nothing, and every error is returned with its file:line. Settings the
//! running daemon was built around (its address, its store, its worker count) need a restart,
//! and a reload that changes one is refused saying so.

use crate::api::AppState;
use crate::config::Config;
use crate::engine::Live;
use crate::executors::Executors;
use crate::metrics::Metrics;
use crate::playbook::PlaybookSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio_util::task::TaskTracker;

/// What a reload put in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Playbooks now in force.
    pub playbooks: usize,
    /// Whether `reflex.yaml` was read again (false on the embedded defaults: playbooks only).
    pub config: bool,
}

/// Reloads; one per daemon.
pub struct Reloader {
    /// The file the daemon was started with (none: embedded defaults).
    source: Option<PathBuf>,
    /// The config in force.
    current: Mutex<Config>,
    /// Where new sinks' delivery tasks run (the daemon's, so that shutdown drains them).
    tasks: TaskTracker,
    metrics: Arc<Metrics>,
}

/// `(key, value)` of each setting only a restart changes, as text to compare.
fn restart_only(cfg: &Config) -> Vec<(&'static str, String)> {
    vec![
        ("listen", cfg.listen.to_string()),
        ("server", format!("{:?}", cfg.server)),
        ("data_dir", cfg.data_dir.display().to_string()),
        ("store", format!("{:?}", cfg.store)),
        ("playbooks_dir", cfg.playbooks_dir.display().to_string()),
        ("dry_run", cfg.dry_run.to_string()),
        ("engine", format!("{:?}", cfg.engine)),
        ("intake", format!("{:?}", cfg.intake)),
        ("public_url", format!("{:?}", cfg.public_url)),
        ("notify.slack_app", format!("{:?}", cfg.notify.slack_app)),
        (
            "notify.mattermost_app",
            format!("{:?}", cfg.notify.mattermost_app),
        ),
    ]
}

impl Reloader {
    /// For a daemon started with `cfg`.
    pub fn new(cfg: &Config, tasks: TaskTracker, metrics: Arc<Metrics>) -> Reloader {
        Reloader {
            source: cfg.source.clone(),
            current: Mutex::new(cfg.clone()),
            tasks,
            metrics,
        }
    }

    /// Reloads for `who` (audited, and told in chat); the errors when nothing changed.
    pub async fn reload(
        &self,
        state: &AppState,
        trigger: &str,
        who: &str,
    ) -> Result<Reloaded, Vec<String>> {
        let result = self.try_reload(state, trigger).await;
        let (outcome, detail) = match &result {
            Ok(r) if r.config => ("ok", format!("reflex.yaml and {} playbooks", r.playbooks)),
            Ok(r) => ("ok", format!("{} playbooks", r.playbooks)),
            Err(errors) => (
                "failed",
                format!("{} errors: {}", errors.len(), errors.join("; ")),
            ),
        };
        let detail = crate::text::truncate(&detail, 2000);
        if let Err(e) = (state.store)
            .audit(who, "config.reload", None, outcome, Some(detail.clone()))
            .await
        {
            tracing::error!(error = %e, "cannot record the reload in the audit log");
        }
        if let Err(errors) = &result {
            if self.source.is_some() {
                // (Without a file, the engine's playbook reload counted and noted it.)
                state.engine.note_reload_failure(trigger, errors.clone());
                self.metrics.reload_errors.inc();
            }
            for e in errors {
                tracing::error!(trigger, error = %e, "reload refused; nothing changed");
            }
        }
        state
            .engine
            .live()
            .notifier
            .send(crate::notify::Event::Reloaded {
                actor: who.to_string(),
                ok: result.is_ok(),
                detail,
            });
        result
    }

    async fn try_reload(&self, state: &AppState, trigger: &str) -> Result<Reloaded, Vec<String>> {
        let Some(path) = &self.source else {
            // The embedded defaults: there is no file to read again.
            return state
                .engine
                .reload(trigger)
                .map(|n| Reloaded {
                    playbooks: n,
                    config: false,
                })
                .map_err(|d| d.iter().map(ToString::to_string).collect());
        };
        let cfg = Config::load(path)
            .map_err(|errors| errors.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        let before = restart_only(&self.current.lock().unwrap_or_else(|p| p.into_inner()));
        let changed: Vec<String> = (before.iter().zip(restart_only(&cfg)))
            .filter(|((_, a), (_, b))| a != b)
            .map(|((key, _), _)| {
                format!(
                    "{}: {key} changed; that takes a restart (nothing was reloaded)",
                    path.display()
                )
            })
            .collect();
        if !changed.is_empty() {
            return Err(changed);
        }
        // Everything is built before anything is put in force.
        let auth = crate::api::auth::Auth::from_config(&cfg.auth)
            .map_err(|e| vec![format!("{}: {e}", path.display())])?;
        let playbooks =
            PlaybookSet::load(std::slice::from_ref(&cfg.playbooks_dir), &cfg.references())
                .map_err(|d| d.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        let notifier = crate::notify::Notifier::start(
            &cfg.notify,
            self.metrics.clone(),
            &self.tasks,
            Some(&state.store),
        )
        .map_err(|e| vec![format!("{}: {e}", path.display())])?;
        let executors = Executors::from_config(&cfg, playbooks.sandbox.clone());
        let n = playbooks.playbooks.len();
        state
            .engine
            .set_live(Live::new(&cfg, executors, notifier), playbooks);
        state.auth.store(Arc::new(auth));
        tracing::info!(trigger, playbooks = n, "reflex.yaml and playbooks reloaded");
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = cfg;
        Ok(Reloaded {
            playbooks: n,
            config: true,
        })
    }
}
