//! Wiring for `reflex serve`: store, playbooks, engine, API; one cancellation root and an
//! ordered shutdown (stop accepting, finish in-flight requests, stop between steps, close the
//! store).

use crate::api::{self, AppState};
use crate::config::Config;
use crate::engine::Engine;
use crate::executors::Executors;
use crate::playbook::PlaybookSet;
use crate::store::Store;
use anyhow::Context;
use std::future::Future;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Loads the playbooks a config names; a missing default directory is an empty set.
pub fn load_playbooks(cfg: &Config) -> anyhow::Result<PlaybookSet> {
    if !cfg.playbooks_dir.exists() {
        tracing::warn!(dir = %cfg.playbooks_dir.display(), "playbook directory does not exist; no playbooks loaded");
        return Ok(PlaybookSet::empty());
    }
    PlaybookSet::load(std::slice::from_ref(&cfg.playbooks_dir)).map_err(|diags| {
        let lines: Vec<String> = diags.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("invalid playbooks:\n{}", lines.join("\n"))
    })
}

/// Runs the daemon on `listener` until `shutdown` completes.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let store = Store::open(&cfg.data_dir)
        .with_context(|| format!("opening the store in {}", cfg.data_dir.display()))?;
    let playbooks = load_playbooks(&cfg)?;
    tracing::info!(count = playbooks.playbooks.len(), dir = %cfg.playbooks_dir.display(), "playbooks loaded");
    let executors = Executors::from_config(&cfg, playbooks.sandbox.clone());
    let token = CancellationToken::new();
    let engine = Engine::new(store.clone(), playbooks, executors, &cfg, token.clone());
    engine.recover().await.context("recovering runs")?;
    let dispatcher = tokio::spawn(engine.clone().dispatch());
    let sweeper = tokio::spawn(engine.clone().sweep());

    let auth = api::auth::Auth::from_config(&cfg.auth).map_err(anyhow::Error::msg)?;
    if !auth.enabled() {
        tracing::warn!(
            "no API tokens configured (auth.tokens): the API is open to anyone who can reach it"
        );
    }
    let app = api::router(AppState {
        engine,
        store: store.clone(),
        max_body_bytes: cfg.intake.max_body_bytes,
        auth: std::sync::Arc::new(auth),
    });
    tracing::info!(addr = %listener.local_addr()?, dry_run = cfg.dry_run, "listening");
    let stop = token.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: finishing requests, stopping runs between steps");
            stop.cancel();
        })
        .await
        .context("serving HTTP")?;
    token.cancel();
    dispatcher.await.context("engine dispatcher")?;
    sweeper.await.context("approval sweeper")?;
    tracing::info!(db = %store.path().display(), "stopped");
    Ok(())
}

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
