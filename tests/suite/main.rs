//! The black-box test suite, one binary (the harness in `common` is compiled once): the real
//! `reflex` binary against real components (sshd, Alertmanager, Prometheus, SQLite), local
//! HTTP receivers for SaaS sinks, and an in-process fake Kubernetes API server.
//!
//! One module per behaviour; run one with `cargo test --test suite kube::`.

mod common;

mod audit;
mod budgets;
mod cli;
mod console;
mod deploy;
mod disk_cleanup_playbook;
mod e2e_alertmanager;
mod evidence;
mod flags;
mod ha;
mod http_server;
mod injection;
mod intake;
mod kube;
mod kube_catalogue;
mod notify;
mod observability;
mod recovery;
mod reload;
mod replay;
mod rollback_playbook;
mod safety;
mod secrets;
mod shadow;
mod ssh;
mod verify;
