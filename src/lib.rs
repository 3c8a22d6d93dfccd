//! Reflex: an automated remediation daemon.
//!
//! # Layout
//!
//! ```text
//! Alertmanager --POST--> api::webhooks --Alert--> engine::intake (match + when + plan)
//!                                                     |  dedup, cooldown; persisted before 200
//!                                                     v
//!                 store (SQLite, or PostgreSQL shared by replicas)  <-- the run queue
//!                                                     |
//!                              engine::dispatcher --claims--> engine::run --> executors (log | script | wait)
//! operators --> api (runs, playbooks) --> engine / store
//! ```
//!
//! - [`alert`]: the `Alert` model and its wire formats (Alertmanager v4, generic JSON); no I/O.
//! - [`config`]: `reflex.yaml`, with embedded defaults.
//! - [`playbook`]: playbook YAML -> compiled, matched and rendered playbooks (matchers, Rhai, templates).
//! - [`engine`]: turns alerts into persisted runs and executes them, step by step.
//! - [`executors`]: the only code that acts on the world.
//! - [`store`]: the only module with SQL; one interface over SQLite and PostgreSQL.
//! - [`metrics`]: Prometheus metrics with bounded labels.
//! - [`notify`]: chat and webhook messages about runs; never blocks a run.
//! - [`redact`]: keeps configured secrets out of records, logs and chat.
//! - [`secret`]: where a configured secret comes from (value, environment, file).
//! - [`text`]: text from outside, bounded before it is kept or shown.
//! - [`api`]: the HTTP API (axum).
//! - [`app`]: wiring and ordered shutdown for `reflex serve`.
//! - [`cli`]: the offline commands `check` and `simulate`.
//! - [`client`]: the HTTP client of the API, and the tables the operator commands print.
//! - [`operator`]: the operator commands (`reflex runs`, `approve`, `kill`, …).

pub mod alert;
pub mod api;
pub mod app;
pub mod chart;
pub mod cli;
pub mod client;
pub mod config;
pub mod engine;
pub mod executors;
#[cfg(test)]
mod fuzz;
pub mod metrics;
pub mod notify;
pub mod operator;
pub mod playbook;
pub mod policy;
pub mod redact;
pub mod reload;
pub mod replay;
pub mod secret;
pub mod store;
pub mod telemetry;
#[cfg(any(test, feature = "testkit"))]
#[doc(hidden)]
pub mod testkit;
pub mod text;
pub mod time;
