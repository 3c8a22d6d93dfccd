//! Wiring for `reflex serve`: store, playbooks, engine, API; one cancellation root and an
//! ordered shutdown (stop accepting, finish in-flight requests, stop between steps, close the
//! store).

use crate::api::{self, AppState};
use crate::config::Config;
use crate::engine::Engine;
use crate::executors::Executors;
use crate::metrics::Metrics;
use crate::playbook::PlaybookSet;
use crate::store::Store;
use anyhow::Context;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Loads the playbooks a config names; a missing default directory is an empty set.
pub fn load_playbooks(cfg: &Config) -> anyhow::Result<PlaybookSet> {
    if !cfg.playbooks_dir.exists() {
        tracing::warn!(dir = %cfg.playbooks_dir.display(), "playbook directory does not exist; no playbooks loaded");
        return Ok(PlaybookSet::empty());
    }
    PlaybookSet::load(std::slice::from_ref(&cfg.playbooks_dir), &cfg.references()).map_err(
        |diags| {
            let lines: Vec<String> = diags.iter().map(ToString::to_string).collect();
            anyhow::anyhow!("invalid playbooks:\n{}", lines.join("\n"))
        },
    )
}

/// Runs the daemon on `listener` until `shutdown` completes.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let store = Store::open_config(&cfg)
        .await
        .with_context(|| match &cfg.store.url {
            Some(_) => "opening the PostgreSQL store (store.url)".to_string(),
            None => format!("opening the store in {}", cfg.data_dir.display()),
        })?;
    tracing::info!(store = %store.describe(), "store open");
    let playbooks = load_playbooks(&cfg)?;
    tracing::info!(count = playbooks.playbooks.len(), dir = %cfg.playbooks_dir.display(), "playbooks loaded");
    let executors = Executors::from_config(&cfg, playbooks.sandbox.clone());
    let token = CancellationToken::new();
    // Every task the daemon starts, so that shutdown can wait for them (within a deadline).
    let tasks = TaskTracker::new();
    let metrics = Arc::new(Metrics::new());
    let notifier =
        crate::notify::Notifier::start(&cfg.notify, metrics.clone(), &tasks, Some(&store))
            .map_err(anyhow::Error::msg)?;
    let engine = Engine::new(
        store.clone(),
        playbooks,
        executors,
        &cfg,
        metrics,
        notifier,
        token.clone(),
    );
    engine.recover().await.context("recovering runs")?;
    let dispatcher = tasks.spawn(engine.clone().dispatch());
    let sweeper = tasks.spawn(engine.clone().sweep());
    tasks.spawn(engine.clone().keep_retention());
    tasks.spawn(engine.clone().keep_audit_sink());
    let lease = tasks.spawn(engine.clone().keep_lease());
    let deferred = tasks.spawn(engine.clone().plan_deferred());
    tasks.spawn(watch_playbooks(
        engine.clone(),
        cfg.playbooks_dir.clone(),
        token.clone(),
    ));
    let reloader = Arc::new(crate::reload::Reloader::new(
        &cfg,
        tasks.clone(),
        engine.metrics_arc(),
    ));
    let state = app_state(&cfg, engine, store.clone(), reloader)?;
    #[cfg(unix)]
    tasks.spawn(reload_on_sighup(state.clone(), token.clone()));
    tasks.spawn(flush_refusals(state.clone(), token.clone()));
    let app = api::router(state);
    tracing::info!(addr = %listener.local_addr()?, shadow = cfg.shadow(), "listening");
    let stop = token.clone();
    api::server::serve(listener, app, &cfg.server, async move {
        shutdown.await;
        tracing::info!("shutting down: finishing requests, stopping runs between steps");
        stop.cancel();
    })
    .await;
    token.cancel();
    dispatcher.await.context("engine dispatcher")?;
    sweeper.await.context("approval sweeper")?;
    lease.await.context("lease keeper")?;
    deferred.await.context("planner of deferred alerts")?;
    // The engine (and so the notifier's queues) is gone with the router: the chat sinks send
    // what they still hold, then end.
    tasks.close();
    if tokio::time::timeout(DRAIN_DEADLINE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tasks.len(),
            "shutdown: tasks still running after the deadline; leaving them"
        );
    }
    tracing::info!(store = %store.describe(), "stopped");
    Ok(())
}

/// What the API serves from: the engine and store, the tokens, the chat apps.
fn app_state(
    cfg: &Config,
    engine: Arc<Engine>,
    store: Store,
    reloader: Arc<crate::reload::Reloader>,
) -> anyhow::Result<AppState> {
    let auth = api::auth::Auth::from_config(&cfg.auth).map_err(anyhow::Error::msg)?;
    if !auth.enabled() {
        tracing::warn!(
            "no API tokens configured (auth.tokens): the API is open to anyone who can reach it"
        );
    }
    let slack = (cfg.notify.slack_app.as_ref())
        .map(api::chat::Slack::from_config)
        .transpose()
        .map_err(|e| anyhow::anyhow!("notify.slack_app: {e}"))?
        .map(Arc::new);
    let mattermost = (cfg.notify.mattermost_app.as_ref())
        .map(api::chat::Mattermost::from_config)
        .transpose()
        .map_err(|e| anyhow::anyhow!("notify.mattermost_app: {e}"))?
        .map(Arc::new);
    Ok(AppState::new(api::Shared {
        engine,
        store,
        max_body_bytes: cfg.intake.max_body_bytes,
        auth: Arc::new(arc_swap::ArcSwap::from_pointee(auth)),
        reloader,
        slack,
        mattermost,
        refusals: Default::default(),
        allowed_hosts: cfg.allowed_hosts().into(),
        throttle: Default::default(),
        streams: Arc::new(api::console::streams::Streams::new(
            cfg.server.max_connections,
        )),
    }))
}

/// How long shutdown waits for the remaining tasks (chat messages still queued) once the
/// engine has stopped: well inside systemd's `TimeoutStopSec`.
const DRAIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Writes the counts of refused requests whose window has closed, so that a source that
/// stopped is counted too.
async fn flush_refusals(state: AppState, stop: CancellationToken) {
    let every = std::time::Duration::from_millis(api::refusals::WINDOW_MS as u64);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => api::refusals::flush(&state, false).await,
            _ = stop.cancelled() => return api::refusals::flush(&state, true).await,
        }
    }
}

/// How often the playbook directory is looked at. Polling (rather than inotify) also sees a
/// Kubernetes ConfigMap update, which swaps a symlink.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(400);

/// Names, sizes and modification times of the playbook files: what a change changes.
fn dir_fingerprint(
    dir: &std::path::Path,
) -> Vec<(std::path::PathBuf, u64, Option<std::time::SystemTime>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let path = e.ok()?.path();
            let meta = std::fs::metadata(&path).ok()?;
            Some((path, meta.len(), meta.modified().ok()))
        })
        .collect();
    out.sort();
    out
}

/// Reloads playbooks when their files change, once the change has settled for one interval
/// (an editor's save is often several writes).
async fn watch_playbooks(engine: Arc<Engine>, dir: std::path::PathBuf, stop: CancellationToken) {
    let mut seen = dir_fingerprint(&dir);
    let mut changed: Option<Vec<_>> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(WATCH_INTERVAL) => {}
            _ = stop.cancelled() => return,
        }
        let now = dir_fingerprint(&dir);
        match changed.take() {
            Some(prev) if prev == now => {
                seen = now;
                let _ = engine.reload("file change");
            }
            _ if now != seen => changed = Some(now),
            _ => {}
        }
    }
}

#[cfg(unix)]
async fn reload_on_sighup(state: AppState, stop: CancellationToken) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => { let _ = state.reloader.reload(&state, "SIGHUP", "SIGHUP").await; }
            _ = stop.cancelled() => return,
        }
    }
}
