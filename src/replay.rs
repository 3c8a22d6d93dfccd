//! Replaying real alert history against playbooks: what they would have done.
//!
//! `reflex export alerts` writes the alerts the store received, one JSON line each with when
//! it arrived ([`RecordedAlert`]). `reflex replay` feeds such a recording (or a directory of
//! Alertmanager payloads) through the intake the daemon runs (matching, `when`, planning,
//! maintenance windows, dedup, coalescing, cooldowns, kill switches, the breaker) on a store
//! of its own in a temporary directory, with a clock that stands at each alert's recorded
//! time. Nothing is executed: a run is recorded and ended at once, its approval gates counted
//! (and, for a playbook that earns autonomy, the approval its standing would ask), and each of
//! its steps that would act takes from the blast-radius budgets at that moment. The counts per
//! playbook are the same for the same input, byte for byte.

use crate::alert::{Alert, AlertRecord};
use crate::config::Config;
use crate::playbook::PlaybookSet;
use crate::policy::Hold;
use crate::store::{BudgetLimit, IntakeItem, Outcome, StartNow, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// One received alert, as `reflex export alerts` writes it: when it arrived, and the alert.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordedAlert {
    /// When its webhook arrived.
    pub received_at: crate::time::Timestamp,
    /// The alert.
    #[serde(flatten)]
    pub alert: AlertRecord,
}

impl RecordedAlert {
    /// From an alert as received.
    pub fn of(alert: &Alert, received_ms: i64) -> RecordedAlert {
        RecordedAlert {
            received_at: crate::time::Timestamp::from_ms(received_ms),
            alert: AlertRecord::of(alert),
        }
    }
}

/// What one playbook would have done.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Runs recorded.
    pub runs: u64,
    /// Runs held back, by what held them (`maintenance`, `kill_switch`, `cooldown`,
    /// `breaker`).
    pub holds: BTreeMap<String, u64>,
    /// Times the breaker tripped (each engaged the kill switch).
    pub breaker_trips: u64,
    /// Approvals that would have been asked.
    pub approvals: u64,
    /// Runs a blast-radius budget would have stopped.
    pub budget_refusals: u64,
    /// Runs that could not be planned (a template or namespace refused).
    pub refusals: u64,
    /// New occurrences that joined a queued run.
    pub coalesced: u64,
    /// Re-deliveries of an occurrence already recorded.
    pub deduplicated: u64,
}

/// The counts of every playbook that matched anything.
pub type Report = BTreeMap<String, Counts>;

/// Replays `alerts` (in order of arrival) against `set` under `cfg`'s rules.
pub async fn replay(
    cfg: &Config,
    set: &PlaybookSet,
    mut alerts: Vec<RecordedAlert>,
) -> Result<Report, StoreError> {
    alerts.sort_by_key(|a| a.received_at.ms());
    let first = alerts.first().map_or(0, |a| a.received_at.ms());
    let clock = Arc::new(crate::time::ManualClock::at(first));
    let dir = tempfile::tempdir()?;
    let store = Store::open_with_clock(
        dir.path(),
        crate::config::Synchronous::Normal,
        clock.clone(),
    )?;
    let windows = crate::engine::maintenance::Windows::new(&cfg.maintenance_windows);
    let b = &cfg.breaker;
    let limits = crate::store::BreakerLimits {
        window_ms: b.window.as_millis() as i64,
        max_runs: b.max_runs,
        max_runs_per_playbook: b.max_runs_per_playbook,
        max_failures: b.max_failures,
        max_targets: b.max_targets,
    };
    let mut report = Report::new();
    for recorded in &alerts {
        let now = recorded.received_at.ms();
        clock.move_to(now);
        let alert = recorded.alert.clone().alert();
        let suppress = windows.hold(&alert, now);
        let matched = set.evaluate(&alert);
        let gates: BTreeMap<String, (bool, Vec<crate::playbook::actions::Action>)> = (matched
            .iter())
        .filter_map(|m| {
            let plan = m.plan.as_ref().ok()?;
            let gated = plan.autonomy || plan.steps.iter().any(|s| s.approval.is_some());
            let acting = (plan.steps.iter())
                .filter(|s| s.action.changes_something())
                .map(|s| s.action)
                .collect();
            Some((m.playbook.name.clone(), (gated, acting)))
        })
        .collect();
        let candidates = (matched.into_iter())
            .map(|m| {
                crate::engine::intake::candidate(
                    &m.playbook,
                    &alert,
                    m.plan,
                    suppress.clone(),
                    true,
                    cfg.engine.run_deadline,
                )
            })
            .collect();
        let item = IntakeItem {
            alert,
            received_us: now * 1000,
            candidates,
            deferred: None,
        };
        let start = StartNow {
            slots: 0,
            max_per_target: cfg.engine.max_runs_per_target,
        };
        let recorded = store.record_and_start(vec![item], limits, start).await?;
        for outcome in recorded.outcomes.into_iter().flatten() {
            match outcome {
                Outcome::Created { run_id, playbook } => {
                    let counts = report.entry(playbook.clone()).or_default();
                    counts.runs += 1;
                    let (gated, acting) = gates.get(&playbook).cloned().unwrap_or_default();
                    counts.approvals += u64::from(gated);
                    for (idx, action) in acting.into_iter().enumerate() {
                        let budgets: Vec<BudgetLimit> = (cfg.budgets.iter())
                            .filter(|b| b.covers(action))
                            .map(|b| BudgetLimit {
                                name: b.action.clone(),
                                max: b.max,
                                per_ms: b.per.as_millis() as i64,
                            })
                            .collect();
                        if store
                            .spend_budgets(budgets, run_id, idx as i64, true)
                            .await?
                            .is_some()
                        {
                            counts.budget_refusals += 1;
                            break;
                        }
                    }
                    // Ended at once, as a run that acted: cooldowns and the breaker count it.
                    store.end_at_once(run_id).await?;
                }
                Outcome::Suppressed {
                    playbook, cause, ..
                } => {
                    let counts = report.entry(playbook).or_default();
                    if cause == Hold::Breaker {
                        counts.breaker_trips += 1;
                    }
                    let name = serde_json::to_value(cause)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default();
                    *counts.holds.entry(name).or_default() += 1;
                }
                Outcome::Failed { playbook, .. } => {
                    report.entry(playbook).or_default().refusals += 1
                }
                Outcome::Coalesced { playbook, .. } => {
                    report.entry(playbook).or_default().coalesced += 1
                }
                Outcome::Deduplicated { playbook, .. } => {
                    report.entry(playbook).or_default().deduplicated += 1
                }
                Outcome::Ended { .. } => {}
            }
        }
    }
    drop(store);
    Ok(report)
}

/// Reads a recording: NDJSON of [`RecordedAlert`]s (`reflex export alerts`), or a directory
/// of Alertmanager webhook payloads (`*.json`), each taken as received at its newest
/// `startsAt`/`endsAt`.
pub fn read_recording(path: &std::path::Path) -> Result<Vec<RecordedAlert>, String> {
    if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        let mut out = Vec::new();
        for file in files {
            let body = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let payload: crate::alert::AlertmanagerPayload =
                serde_json::from_slice(&body).map_err(|e| format!("{}: {e}", file.display()))?;
            let alerts = payload
                .into_alerts()
                .map_err(|e| format!("{}: {e}", file.display()))?;
            let at = (alerts.iter())
                .flat_map(|a| [Some(a.starts_at.as_str()), a.ends_at.as_deref()])
                .flatten()
                .filter_map(|t| crate::time::Timestamp::parse(t).ok())
                .map(|t| t.ms())
                .max()
                .unwrap_or(0);
            out.extend(alerts.iter().map(|a| RecordedAlert::of(a, at)));
        }
        return Ok(out);
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    (text.lines().enumerate())
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect()
}

/// The report as text: a line per playbook.
pub fn text(report: &Report) -> String {
    let mut out = format!(
        "{:<28} {:>6} {:>6} {:>8} {:>9} {:>7} {:>8}  {}\n",
        "PLAYBOOK", "RUNS", "HOLDS", "BREAKER", "APPROVALS", "BUDGET", "REFUSALS", "HELD BY"
    );
    for (name, c) in report {
        let held: Vec<String> = c.holds.iter().map(|(k, v)| format!("{k} {v}")).collect();
        out.push_str(&format!(
            "{:<28} {:>6} {:>6} {:>8} {:>9} {:>7} {:>8}  {}\n",
            name,
            c.runs,
            c.holds.values().sum::<u64>(),
            c.breaker_trips,
            c.approvals,
            c.budget_refusals,
            c.refusals,
            held.join(", ")
        ));
    }
    out
}

/// What a changed playbook set would have done differently, playbook by playbook.
pub fn compare(before: &Report, after: &Report) -> String {
    let mut out = String::new();
    let names: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    let empty = Counts::default();
    for name in names {
        let (a, b) = (
            before.get(name).unwrap_or(&empty),
            after.get(name).unwrap_or(&empty),
        );
        if a == b {
            continue;
        }
        let mut changes = Vec::new();
        let mut field = |label: &str, x: u64, y: u64| {
            if x != y {
                changes.push(format!("{label} {x} -> {y}"));
            }
        };
        field("runs", a.runs, b.runs);
        let holds: std::collections::BTreeSet<&String> =
            a.holds.keys().chain(b.holds.keys()).collect();
        for h in holds {
            let get = |c: &Counts| c.holds.get(h).copied().unwrap_or(0);
            field(&format!("{h} holds"), get(a), get(b));
        }
        field("breaker trips", a.breaker_trips, b.breaker_trips);
        field("approvals", a.approvals, b.approvals);
        field("budget refusals", a.budget_refusals, b.budget_refusals);
        field("refusals", a.refusals, b.refusals);
        field("coalesced", a.coalesced, b.coalesced);
        field("deduplicated", a.deduplicated, b.deduplicated);
        out.push_str(&format!("{name}: {}\n", changes.join(", ")));
    }
    if out.is_empty() {
        out.push_str("no difference\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(instance: &str, at_ms: i64) -> RecordedAlert {
        let body = serde_json::json!({"labels": {"alertname": "PodStuck", "instance": instance}, "startsAt": "2026-12-05T00:00:00Z"});
        let alert =
            crate::alert::parse_generic(body.to_string().as_bytes(), "2026-12-05T00:00:00Z")
                .unwrap();
        RecordedAlert::of(&alert[0], at_ms)
    }

    #[tokio::test]
    async fn replay_counts_approvals_and_budget_refusals_at_the_recorded_times() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("evict.yaml"),
            "name: evict\nmatchers: ['alertname=\"PodStuck\"']\napproval: required\nsteps:\n  - action: kube.delete_pod\n    with: { namespace: shop, name: \"{{ labels.instance }}\" }\n",
        )
        .unwrap();
        let set = PlaybookSet::load(&[dir.path().to_path_buf()], &Default::default()).unwrap();
        let cfg =
            Config::parse("budgets:\n  - { action: kube.delete_pod, max: 2, per: 1h }\n").unwrap();
        // Three within the hour, then one two hours on, when the budget has room again.
        let hour = 3_600_000;
        let t0 = 1_764_900_000_000;
        let alerts = vec![
            recorded("a", t0),
            recorded("b", t0 + 1000),
            recorded("c", t0 + 2000),
            recorded("d", t0 + 2 * hour),
        ];
        let report = replay(&cfg, &set, alerts.clone()).await.unwrap();
        let counts = &report["evict"];
        assert_eq!(
            (counts.runs, counts.approvals, counts.budget_refusals),
            (4, 4, 1)
        );
        // Given in any order, they are replayed in the order they arrived.
        let mut shuffled = alerts;
        shuffled.reverse();
        assert_eq!(replay(&cfg, &set, shuffled).await.unwrap(), report);
    }
}
