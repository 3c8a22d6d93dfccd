//! The circuit breaker: limits on runs, runs per playbook, distinct targets and failures in a
//! window, whose crossing engages the global kill switch in the same transaction.

use super::db::Param;
use super::*;

/// Circuit breaker limits as intake applies them (0: no limit).
#[derive(Debug, Clone, Copy, Default)]
pub struct BreakerLimits {
    /// The window, in ms.
    pub window_ms: i64,
    /// Runs started in the window.
    pub max_runs: u32,
    /// Runs started by one playbook in the window.
    pub max_runs_per_playbook: u32,
    /// Failed runs in the window.
    pub max_failures: u32,
    /// Distinct targets in the window.
    pub max_targets: u32,
}

/// One of the breaker's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// `breaker.max_runs`: runs started in the window.
    Runs,
    /// `breaker.max_runs_per_playbook`: runs one playbook started in the window.
    RunsPerPlaybook,
    /// `breaker.max_targets`: distinct targets acted on in the window.
    Targets,
    /// `breaker.max_failures`: runs that failed in the window.
    Failures,
    /// `breaker.max_failures`, counted per playbook: its runs refused before acting (a host
    /// outside the inventory, a namespace not allowed). It engages that playbook's switch
    /// only: the fault is in its steps, not in the world.
    Refusals,
}

impl Limit {
    /// The config key.
    pub fn key(self) -> &'static str {
        match self {
            Limit::Runs => "max_runs",
            Limit::RunsPerPlaybook => "max_runs_per_playbook",
            Limit::Targets => "max_targets",
            Limit::Failures | Limit::Refusals => "max_failures",
        }
    }
}

/// A crossed limit: the breaker engaged the global kill switch with this as its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trip {
    /// Which limit.
    pub limit: Limit,
    /// The count that crossed it.
    pub count: u32,
    /// The limit's value.
    pub max: u32,
    /// The window, in ms.
    pub window_ms: i64,
    /// The playbook, for the per-playbook limit.
    pub playbook: Option<String>,
}

impl Trip {
    /// The switch it engaged: a playbook's for refusals, else the global one.
    pub fn scope(&self) -> String {
        match (self.limit, &self.playbook) {
            (Limit::Refusals, Some(p)) => super::switches::playbook_scope(p),
            _ => super::switches::GLOBAL.to_string(),
        }
    }
}

impl std::fmt::Display for Trip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.count;
        let what = match (self.limit, &self.playbook) {
            (Limit::Runs, _) => format!("{n} runs started"),
            (Limit::RunsPerPlaybook, p) => {
                format!("playbook {} started {n} runs", p.as_deref().unwrap_or("?"))
            }
            (Limit::Targets, _) => format!("runs against {n} distinct targets"),
            (Limit::Failures, _) => format!("{n} runs failed"),
            (Limit::Refusals, p) => format!(
                "{n} runs of playbook {} were refused before acting",
                p.as_deref().unwrap_or("?")
            ),
        };
        let window = crate::time::format_duration(std::time::Duration::from_millis(
            self.window_ms.max(0) as u64,
        ));
        write!(
            f,
            "circuit breaker: {what} within {window} (breaker.{} = {})",
            self.limit.key(),
            self.max
        )
    }
}

/// The limits on starting one more run that are set, in the order they are checked.
fn table(l: BreakerLimits) -> impl Iterator<Item = (Limit, u32)> {
    [
        (Limit::Runs, l.max_runs),
        (Limit::RunsPerPlaybook, l.max_runs_per_playbook),
        (Limit::Targets, l.max_targets),
    ]
    .into_iter()
    .filter(|(_, max)| *max > 0)
}

/// Whether intake counts runs for these limits (and so reads what every run recorded changes).
pub(super) fn counts_runs(l: BreakerLimits) -> bool {
    table(l).next().is_some()
}

/// When a person last released the global switch (0: never). A release starts a new window,
/// so the runs and failures that tripped the breaker do not trip it again at the next one:
/// every limit counts from the later of this and the window's start by the clock (`?1`).
macro_rules! released {
    () => {
        "coalesce((SELECT changed_at FROM switches WHERE scope = 'global' AND NOT engaged), 0)"
    };
}

/// The runs that count: started in the window, not suppressed.
macro_rules! live {
    () => {
        concat!(
            "created_at > ?1 AND state != 'suppressed' AND created_at > ",
            released!()
        )
    };
}
const RUNS: &str = concat!("SELECT count(*) FROM runs WHERE ", live!());
const RUNS_OF_PLAYBOOK: &str = concat!(
    "SELECT count(*) FROM runs WHERE ",
    live!(),
    " AND playbook = ?2"
);
const RUNS_ON_TARGET: &str = concat!(
    "SELECT count(*) FROM runs WHERE ",
    live!(),
    " AND target = ?2"
);
const TARGETS: &str = concat!("SELECT count(DISTINCT target) FROM runs WHERE ", live!());

/// Sends [`breaker_trip`]'s counts ahead (see [`Db::prefetch_count`]): each once a batch,
/// answered for every alert of it, with the runs recorded since folded in ([`count`]).
pub(super) fn prefetch(
    c: &Db,
    playbook: &str,
    target: &str,
    l: BreakerLimits,
    now: i64,
) -> Result<(), StoreError> {
    let since = now - l.window_ms;
    for (limit, _) in table(l) {
        match limit {
            Limit::Runs => c.prefetch_count(RUNS, &[&since], depends())?,
            Limit::RunsPerPlaybook => {
                c.prefetch_count(RUNS_OF_PLAYBOOK, &[&since, &playbook], depends())?
            }
            Limit::Targets => {
                c.prefetch_count(RUNS_ON_TARGET, &[&since, &target], depends())?;
                c.prefetch_count(TARGETS, &[&since], depends())?;
            }
            Limit::Failures | Limit::Refusals => {}
        }
    }
    Ok(())
}

/// What a count depends on besides the runs (which [`count`] folds in): a release of the
/// global switch starts a new window.
fn depends() -> Keys {
    Keys::Only(vec![super::intake::part::SWITCHES.into()])
}

/// A run that counts ([`live!`]) recorded in this transaction (PostgreSQL): what the counts
/// sent ahead of it did not see.
pub(super) struct Counted {
    /// Writes of the transaction up to and including its insert.
    at: u64,
    playbook: String,
    target: String,
    /// No run counted on its target before it in the window: the distinct targets grew.
    new_target: bool,
}

/// A count of the window as of now in this transaction: the database's, perhaps read ahead
/// of some runs this transaction recorded since, with those that `matches` folded in.
fn count(
    c: &Db,
    sql: &str,
    p: &[&dyn Param],
    matches: impl Fn(&Counted) -> bool,
) -> Result<u32, StoreError> {
    let (n, seen) = c.count(sql, p, depends())?;
    let later = match c {
        Db::Pg(conn) => (conn.borrow().counted.iter())
            .filter(|r| r.at > seen && matches(r))
            .count(),
        Db::Lite(_) => 0,
    };
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    Ok(n.saturating_add(u32::try_from(later).unwrap_or(u32::MAX)))
}

/// Runs that count on `target` in the window.
fn on_target(c: &Db, since: i64, target: &str) -> Result<u32, StoreError> {
    count(c, RUNS_ON_TARGET, &[&since, &target], |r| {
        r.target == target
    })
}

/// Before a run that counts is recorded (PostgreSQL, while the breaker counts runs): what
/// [`recorded`] notes once it is.
pub(super) fn counting(
    c: &Db,
    playbook: &str,
    target: &str,
    l: BreakerLimits,
    now: i64,
) -> Result<Option<Counted>, StoreError> {
    if !c.is_pg() || !counts_runs(l) {
        return Ok(None);
    }
    let new_target = l.max_targets > 0 && on_target(c, now - l.window_ms, target)? == 0;
    Ok(Some(Counted {
        at: 0,
        playbook: playbook.to_string(),
        target: target.to_string(),
        new_target,
    }))
}

/// Notes a run that counts, just recorded (its insert the last write queued).
pub(super) fn recorded(c: &Db, mut run: Counted) {
    if let Db::Pg(conn) = c {
        let mut conn = conn.borrow_mut();
        run.at = conn.written();
        conn.counted.push(run);
    }
}

/// Checks the limits on starting one more run (runs, runs per playbook, targets), in that
/// order; when one would be crossed, engages the global kill switch in this same transaction
/// and returns the trip.
pub(super) fn breaker_trip(
    c: &Db,
    playbook: &str,
    target: &str,
    l: BreakerLimits,
    now: i64,
) -> Result<Option<Trip>, StoreError> {
    if l.max_runs == 0 && l.max_runs_per_playbook == 0 && l.max_targets == 0 {
        return Ok(None);
    }
    let since = now - l.window_ms;
    for (limit, max) in table(l) {
        let n = match limit {
            Limit::Runs => count(c, RUNS, &[&since], |_| true)?,
            Limit::RunsPerPlaybook => count(c, RUNS_OF_PLAYBOOK, &[&since, &playbook], |r| {
                r.playbook == playbook
            })?,
            Limit::Targets => {
                // A target already acted on in the window adds none.
                if on_target(c, since, target)? > 0 {
                    continue;
                }
                count(c, TARGETS, &[&since], |r| r.new_target)?
            }
            Limit::Failures | Limit::Refusals => continue,
        };
        if n >= max {
            let trip = Trip {
                limit,
                count: n,
                max,
                window_ms: l.window_ms,
                playbook: (limit == Limit::RunsPerPlaybook).then(|| playbook.to_string()),
            };
            engage(c, &trip, now)?;
            return Ok(Some(trip));
        }
    }
    Ok(None)
}

/// Engages the global kill switch for a trip, in the caller's transaction.
fn engage(c: &Db, trip: &Trip, now: i64) -> Result<(), StoreError> {
    super::switches::engage_in(c, "global", &trip.to_string(), "circuit-breaker", None, now)
}

/// After a failed run, in its transaction: engages the global kill switch when the failures
/// in the window reach `max_failures` (and it is not engaged already).
pub(super) fn failures_trip(
    c: &Db,
    l: BreakerLimits,
    now: i64,
) -> Result<Option<Trip>, StoreError> {
    if l.max_failures == 0 {
        return Ok(None);
    }
    let n: i64 = c.one(
        concat!(
            "SELECT count(*) FROM runs WHERE state = 'failed' AND NOT refused
             AND finished_at > ?1 AND finished_at > ",
            released!()
        ),
        &[&(now - l.window_ms)],
        |r| r.get(0),
    )?;
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    if n < l.max_failures || super::switches::engaged_reason(c, "", now)?.is_some() {
        return Ok(None);
    }
    let trip = Trip {
        limit: Limit::Failures,
        count: n,
        max: l.max_failures,
        window_ms: l.window_ms,
        playbook: None,
    };
    engage(c, &trip, now)?;
    Ok(Some(trip))
}

/// After a run of `run_id`'s playbook failed because a step was refused before acting, in its
/// transaction: engages that playbook's switch when such failures reach `max_failures` in the
/// window (and it is not engaged already).
pub(super) fn refusals_trip(
    c: &Db,
    run_id: i64,
    l: BreakerLimits,
    now: i64,
) -> Result<Option<Trip>, StoreError> {
    if l.max_failures == 0 {
        return Ok(None);
    }
    let playbook: String = c.one("SELECT playbook FROM runs WHERE id = ?1", &[&run_id], |r| {
        r.get(0)
    })?;
    let n: i64 = c.one(
        concat!(
            "SELECT count(*) FROM runs WHERE state = 'failed' AND refused AND playbook = ?2
             AND finished_at > ?1 AND finished_at > ",
            released!()
        ),
        &[&(now - l.window_ms), &playbook],
        |r| r.get(0),
    )?;
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    let scope = super::switches::playbook_scope(&playbook);
    let engaged: i64 = c.one(
        "SELECT count(*) FROM switches WHERE scope = ?1 AND engaged AND (until IS NULL OR until > ?2)",
        &[&scope, &now],
        |r| r.get(0),
    )?;
    if n < l.max_failures || engaged > 0 {
        return Ok(None);
    }
    let trip = Trip {
        limit: Limit::Refusals,
        count: n,
        max: l.max_failures,
        window_ms: l.window_ms,
        playbook: Some(playbook),
    };
    super::switches::engage_in(c, &scope, &trip.to_string(), "circuit-breaker", None, now)?;
    Ok(Some(trip))
}
