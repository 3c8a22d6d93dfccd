//! Intake: received alerts are recorded and, in the same transaction, each matched playbook's
//! fate is decided: a new run, a re-delivery (dedup: the unique index on playbook, fingerprint,
//! startsAt and status), a suppression (maintenance, kill switch, cooldown, breaker) or a run
//! that could not be planned. Nothing is acknowledged to the sender before this commits.

use super::breaker::breaker_trip;
use super::cooldown::cooldown_reason;
use super::resolution::end_for_resolved;
use super::*;
use crate::alert::{Alert, AlertStatus};
use crate::playbook::Plan;
use crate::policy::{Facts, Verdict};
use serde::Serialize;

pub use crate::policy::Hold;

/// A playbook that matched an alert, as the engine hands it to intake.
pub struct Candidate {
    /// Playbook name.
    pub playbook: String,
    /// Cooldown in ms (0: none).
    pub cooldown_ms: i64,
    /// What the cooldown is kept per (fingerprint or group key).
    pub cooldown_key: String,
    /// Record without acting.
    pub dry_run: bool,
    /// The rendered plan, or why it could not be rendered.
    pub plan: Result<Plan, String>,
    /// Run deadline in ms.
    pub deadline_ms: i64,
    /// Suppressed before any other check (a maintenance window), with the reason.
    pub suppress: Option<String>,
    /// A new occurrence joins a queued run of the same playbook and alert (see
    /// [`super::coalesce`]).
    pub coalesce: bool,
    /// An operator asked for this run (a manual trigger or a retry), not an alert.
    pub manual: Option<Manual>,
}

impl Candidate {
    /// The cooldown key its runs record: none (empty) without a cooldown.
    fn recorded_cooldown_key(&self) -> &str {
        if self.cooldown_ms > 0 {
            &self.cooldown_key
        } else {
            ""
        }
    }
}

/// Who asked for a run without an alert, and what it repeats.
#[derive(Debug, Clone)]
pub struct Manual {
    /// The operator's identity.
    pub by: String,
    /// The run a retry repeats.
    pub retry_of: Option<i64>,
    /// The run an undo takes back.
    pub undo_of: Option<i64>,
}

/// How many new runs intake may start in its own transaction (the one-commit path): runs
/// with no gate on their first step, on a target with room, with nothing older queued for it.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartNow {
    /// Worker slots the caller holds for them (0: start none; the dispatcher claims them).
    pub slots: usize,
    /// `engine.max_runs_per_target`.
    pub max_per_target: u32,
}

/// What intake recorded: the outcomes per alert, and the runs it started.
pub struct Recorded {
    /// Outcomes per alert, in order.
    pub outcomes: Vec<Vec<Outcome>>,
    /// Runs claimed in the intake transaction, their first step already marked `running`.
    pub started: Vec<ClaimedRun>,
}

/// One received alert and the playbooks it matched.
pub struct IntakeItem {
    /// The alert.
    pub alert: Alert,
    /// When its webhook arrived (µs since the epoch).
    pub received_us: i64,
    /// Matched playbooks.
    pub candidates: Vec<Candidate>,
    /// Its row in `deferred_alerts`, for an alert planned after its webhook was answered.
    pub deferred: Option<i64>,
}

/// What became of one (alert, playbook) pair at intake.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// A new pending run.
    Created {
        /// The run.
        run_id: i64,
        /// Its playbook.
        playbook: String,
    },
    /// A new occurrence joined a queued run of the same playbook and alert (which now uses
    /// this occurrence's data).
    Coalesced {
        /// The queued run it joined.
        run_id: i64,
        /// Its playbook.
        playbook: String,
    },
    /// A re-delivery: the run for this occurrence exists already.
    Deduplicated {
        /// The existing run.
        run_id: i64,
        /// Its playbook.
        playbook: String,
    },
    /// Recorded as suppressed: something held it back.
    Suppressed {
        /// The suppressed run record.
        run_id: i64,
        /// Its playbook.
        playbook: String,
        /// What held it back.
        cause: Hold,
        /// Why.
        reason: String,
    },
    /// Recorded as failed: the plan could not be rendered.
    Failed {
        /// The failed run record.
        run_id: i64,
        /// Its playbook.
        playbook: String,
        /// Why.
        error: String,
    },
    /// A run that waited for approval ended because this (resolved) alert arrived.
    Ended {
        /// The run ended.
        run_id: i64,
        /// Its playbook.
        playbook: String,
        /// Its final state.
        #[schema(value_type = String)]
        state: RunState,
    },
}

impl Outcome {
    /// The run it recorded, joined or ended.
    pub fn run_id(&self) -> i64 {
        match self {
            Outcome::Created { run_id, .. }
            | Outcome::Coalesced { run_id, .. }
            | Outcome::Deduplicated { run_id, .. }
            | Outcome::Suppressed { run_id, .. }
            | Outcome::Failed { run_id, .. }
            | Outcome::Ended { run_id, .. } => *run_id,
        }
    }
}

/// An alert's JSON columns, serialized before the write.
struct Json {
    labels: String,
    annotations: String,
    plans: Vec<Option<PlanJson>>,
}

/// A plan's JSON columns.
struct PlanJson {
    params: String,
    steps: Vec<(String, Option<String>)>,
}

impl PlanJson {
    fn of(p: &Plan) -> PlanJson {
        PlanJson {
            params: json_text(&p.params),
            steps: p
                .steps
                .iter()
                .map(|s| (json_text(&s.args), s.approval.as_ref().map(json_text)))
                .collect(),
        }
    }
}

const INSERT_ALERT: &str = "INSERT INTO alerts (received_at, source, fingerprint, status, starts_at, ends_at, labels, annotations, generator_url, group_key, received_us)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

/// Records the alert; its id, and on PostgreSQL an id for the first run it may make (taken
/// from the runs' sequence by the same statement). With `ahead` (PostgreSQL), the insert is
/// sent together with those reads ([`prefetch_facts`] of its first candidate): one round trip
/// for both.
fn insert_alert(
    c: &Db,
    a: &Alert,
    json: &Json,
    now: i64,
    received_us: i64,
    ahead: impl FnOnce() -> Result<(), StoreError>,
    depends: impl FnOnce() -> Keys,
) -> Result<(i64, Option<i64>), StoreError> {
    let params = alert_params(a, json, &now, &received_us);
    if c.is_pg() {
        // Sent already with the batch's first round trip ([`send_ahead`]), or now with the
        // reads. When an earlier alert of the batch wrote what those reads depend on, they go
        // again, together (one round trip, not one a read).
        if !c.sent_ahead(&ALERT_RETURNING, &params)? {
            c.prefetch_on(&ALERT_RETURNING, &params, Keys::Only(Vec::new()))?;
            ahead()?;
        } else if c.overtaken(&depends()) {
            ahead()?;
        }
        // An insert's own answer stands whatever is written after it: taken, never run twice.
        return c.one(&ALERT_RETURNING, &params, |r| {
            Ok((r.get(0)?, Some(r.get(1)?)))
        });
    }
    let id = c.insert(INSERT_ALERT, &params)?.ok_or(StoreError::NoRow)?;
    Ok((id, None))
}

/// The alert's insert on PostgreSQL, with the id of its first run.
static ALERT_RETURNING: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("{INSERT_ALERT} RETURNING id, nextval('runs_id_seq')"));

/// [`INSERT_ALERT`]'s parameters.
fn alert_params<'a>(
    a: &'a Alert,
    json: &'a Json,
    now: &'a i64,
    received_us: &'a i64,
) -> [&'a dyn super::db::Param; 11] {
    [
        now,
        &a.source,
        &a.fingerprint,
        &a.status,
        &a.starts_at,
        &a.ends_at,
        &json.labels,
        &json.annotations,
        &a.generator_url,
        &a.group_key,
        received_us,
    ]
}

/// Sends an alert's insert and the reads its first playbook's rules will ask ahead of every
/// write of the batch (PostgreSQL): a batch's alerts then go out in one round trip, and each
/// alert's answers stand unless an alert before it in the batch wrote what they depend on
/// ([`part`]), when its reads go again. A deferred alert is not sent ahead: it is taken
/// first, and perhaps not recorded at all. The breaker's counts go once for the batch: the
/// runs recorded after them are folded in (see `breaker::count`).
fn send_ahead(
    c: &Db,
    item: &IntakeItem,
    json: &Json,
    now: i64,
    counted: BreakerLimits,
    start: &Starter,
) -> Result<(), StoreError> {
    if item.deferred.is_some() {
        return Ok(());
    }
    let params = alert_params(&item.alert, json, &now, &item.received_us);
    c.prefetch_on(&ALERT_RETURNING, &params, Keys::Only(Vec::new()))?;
    match item.candidates.first() {
        Some(cand) => prefetch_facts(c, &item.alert, counted, now, cand, start, false),
        None => Ok(()),
    }
}

/// The parts of the data that intake's reads depend on and its writes change ([`Keys`]): a
/// read sent ahead for one alert of a batch stands after another alert's writes unless they
/// share one. A run recorded changes its occurrence, its target and its cooldown key (and the
/// breaker's counts, which fold it in: see `breaker::count`); anything else intake writes (a
/// coalesced run refreshed, runs ended for a resolved alert, a deferred alert taken, the
/// breaker tripping) changes anything.
pub(super) mod part {
    use super::Keys;

    fn occurrence_part(playbook: &str, fingerprint: &str) -> String {
        format!("occurrence\0{playbook}\0{fingerprint}")
    }

    fn target_part(target: &str) -> String {
        format!("target\0{target}")
    }

    fn cooldown_part(playbook: &str, key: &str) -> String {
        format!("cooldown\0{playbook}\0{key}")
    }

    /// Runs of a playbook for an alert: recorded, queued, executing.
    pub(in crate::store) fn occurrence(playbook: &str, fingerprint: &str) -> Keys {
        Keys::Only(vec![occurrence_part(playbook, fingerprint)])
    }

    /// Those, and a target's room (its runs executing and queued).
    pub(in crate::store) fn occurrence_on(playbook: &str, fingerprint: &str, target: &str) -> Keys {
        Keys::Only(vec![
            occurrence_part(playbook, fingerprint),
            target_part(target),
        ])
    }

    /// A playbook's last run for a cooldown key.
    pub(in crate::store) fn cooldown(playbook: &str, key: &str) -> Keys {
        Keys::Only(vec![cooldown_part(playbook, key)])
    }

    /// The kill switches.
    pub(in crate::store) const SWITCHES: &str = "switches";

    /// A run's occurrence, its target and its cooldown key (`key`, empty for none), with the
    /// parts named in `more`.
    fn of_run(playbook: &str, fingerprint: &str, target: &str, key: &str, more: &[&str]) -> Keys {
        let mut parts = vec![occurrence_part(playbook, fingerprint), target_part(target)];
        if !key.is_empty() {
            parts.push(cooldown_part(playbook, key));
        }
        parts.extend(more.iter().map(|p| p.to_string()));
        Keys::Only(parts)
    }

    /// What recording a run changes (`key`: its cooldown key, empty for none).
    pub(in crate::store) fn run(
        playbook: &str,
        fingerprint: &str,
        target: &str,
        key: &str,
    ) -> Keys {
        of_run(playbook, fingerprint, target, key, &[])
    }

    /// What an alert's reads for a playbook's rules depend on, together (each read names its
    /// own).
    pub(in crate::store) fn facts(
        playbook: &str,
        fingerprint: &str,
        target: &str,
        key: &str,
    ) -> Keys {
        of_run(playbook, fingerprint, target, key, &[SWITCHES])
    }
}

/// The alert at hand in an intake write, and what every decision about it needs.
struct At<'a> {
    alert: &'a Alert,
    alert_id: i64,
    limits: BreakerLimits,
    /// The limits whose counts are sent ahead (see [`Store::record_and_start`]).
    ahead: BreakerLimits,
    now: i64,
    /// A run id taken with the alert's insert (PostgreSQL), for the first run inserted.
    run_id: std::cell::Cell<Option<i64>>,
}

/// The facts the intake rules ask for, answered inside the intake transaction.
struct StoreFacts<'a, 'c, 'b> {
    c: &'a Db<'c>,
    at: &'a At<'a>,
    cand: &'a Candidate,
    target: &'a str,
    start: &'b mut Starter,
    /// Whether a queued run may be joined, read with the occurrence (the rules ask for the
    /// occurrence first; see [`existing_run`]).
    may_join: bool,
}

impl Facts for StoreFacts<'_, '_, '_> {
    type Error = StoreError;

    fn recorded(&mut self) -> Result<Option<i64>, StoreError> {
        let cand = self.cand;
        let (id, may_join) = existing_run(self.c, &cand.playbook, self.at.alert, cand.coalesce)?;
        self.may_join = may_join;
        Ok(id)
    }

    fn queued(&mut self) -> Result<Option<i64>, StoreError> {
        let (playbook, fingerprint) = (&self.cand.playbook, &self.at.alert.fingerprint);
        super::coalesce::pending_run(self.c, playbook, fingerprint, self.may_join)
    }

    fn kill_switch(&mut self) -> Result<Option<String>, StoreError> {
        super::switches::engaged_reason(self.c, &self.cand.playbook, self.at.now)
    }

    fn cooldown(&mut self) -> Result<Option<String>, StoreError> {
        let cand = self.cand;
        cooldown_reason(
            self.c,
            &cand.playbook,
            &cand.cooldown_key,
            cand.cooldown_ms,
            self.at.now,
        )
    }

    fn breaker(&mut self) -> Result<Option<String>, StoreError> {
        let trip = breaker_trip(
            self.c,
            &self.cand.playbook,
            self.target,
            self.at.limits,
            self.at.now,
        )?;
        Ok(trip.map(|t| t.to_string()))
    }

    fn may_start(&mut self) -> Result<bool, StoreError> {
        match &self.cand.plan {
            Ok(plan) => self.start.can_start(
                self.c,
                &self.cand.playbook,
                &self.at.alert.fingerprint,
                plan,
            ),
            Err(_) => Ok(false),
        }
    }
}

/// One playbook matched by one alert: decided by the intake rules ([`crate::policy`]) on
/// facts read in this transaction, then recorded.
fn intake_one(
    c: &Db,
    at: &At<'_>,
    cand: &Candidate,
    json: Option<&PlanJson>,
    start: &mut Starter,
    sent_ahead: bool,
) -> Result<Outcome, StoreError> {
    let a = at.alert;
    let now = at.now;
    let target = cand
        .plan
        .as_ref()
        .map_or_else(|_| String::new(), |p| p.target.clone());
    if !sent_ahead {
        prefetch_facts(
            c,
            at.alert,
            at.ahead,
            at.now,
            cand,
            start,
            at.run_id.get().is_none(),
        )?;
    }
    let asked = crate::policy::Candidate {
        maintenance: cand.suppress.as_deref(),
        coalesce: cand.coalesce && json.is_some(),
        plan: cand.plan.as_ref().map(|_| ()).map_err(String::as_str),
    };
    let verdict = crate::policy::decide(
        asked,
        &mut StoreFacts {
            c,
            at,
            cand,
            target: &target,
            start: &mut *start,
            may_join: false,
        },
    )?;
    let playbook = cand.playbook.clone();
    let (state, reason, error, cause, joined) = match verdict {
        Verdict::Duplicate(run_id) => return Ok(Outcome::Deduplicated { run_id, playbook }),
        Verdict::Join(run_id) => {
            if let (Ok(plan), Some(j)) = (&cand.plan, json) {
                super::coalesce::refresh(c, run_id, at.alert_id, plan, &j.params, &j.steps)?;
            }
            let reason = format!("coalesced into run {run_id}");
            (RunState::Coalesced, Some(reason), None, None, Some(run_id))
        }
        Verdict::Hold(hold, why) => (RunState::Suppressed, Some(why), None, Some(hold), None),
        Verdict::Fail(e) => (RunState::Failed, None, Some(e), None, None),
        Verdict::Start => (RunState::Running, None, None, None, None),
        Verdict::Queue => (RunState::Pending, None, None, None, None),
    };
    let start_now = state == RunState::Running;
    let plan = (cand.plan.as_ref().ok())
        .filter(|_| matches!(state, RunState::Running | RunState::Pending));
    let params = json.filter(|_| plan.is_some());
    let steps = plan.map(|plan| NewSteps {
        plan,
        json: json.map_or(&[][..], |j| &j.steps),
        first: start_now.then(|| (now, crate::time::now_us())),
    });
    let inserted = insert_run(
        c,
        at,
        cand,
        steps.as_ref(),
        &RunRow {
            state,
            reason: reason.as_deref(),
            error: error.as_deref(),
            target: &target,
            params: params.map_or("{}", |j| j.params.as_str()),
            owner: start_now.then_some(start.owner.as_str()),
        },
    )?;
    if state == RunState::Pending {
        c.wake();
    }
    let Some(run_id) = inserted else {
        let run_id = (existing_run(c, &playbook, a, false)?.0).ok_or(StoreError::NoRow)?;
        return Ok(Outcome::Deduplicated { run_id, playbook });
    };
    if let Some(plan) = plan
        && start_now
    {
        start.started(run_id, at, cand, plan);
    }
    if let Some(joined) = joined {
        return Ok(Outcome::Coalesced {
            run_id: joined,
            playbook,
        });
    }
    Ok(match state {
        RunState::Suppressed => Outcome::Suppressed {
            run_id,
            playbook,
            cause: cause.unwrap_or(Hold::KillSwitch),
            reason: reason.unwrap_or_default(),
        },
        RunState::Failed => Outcome::Failed {
            run_id,
            playbook,
            error: error.unwrap_or_default(),
        },
        _ => Outcome::Created { run_id, playbook },
    })
}

/// The locks an intake write holds (on PostgreSQL, shared by the replicas; see
/// [`Store::write_locked`]): the narrowest each rule needs, so that replicas deciding about
/// different alerts of one playbook do not wait for each other:
/// - the alert's identity for the playbook (dedup, coalescing, one run at a time per alert);
/// - the cooldown's key, when the playbook has a cooldown;
/// - the playbook, when the breaker limits its runs;
/// - all intake, when a breaker limit spans playbooks (runs, distinct targets), instead of
///   the three above;
/// - for a resolved alert, the lock each of its playbooks' runs for it starts under
///   ([`super::queue::try_lock_start`]), so that the runs it ends are not being claimed
///   meanwhile by another replica (whose claim it would overwrite). A claim only tries it,
///   never waits for another lock holding it, so waiting for it here closes no cycle.
///
/// A webhook needing more than a batch takes is recorded in parts (`record_and_start`).
pub(super) fn intake_locks(items: &[&IntakeItem], limits: BreakerLimits) -> Vec<String> {
    // A unit separator: neither a playbook name nor a fingerprint holds one.
    let key = |kind: &str, pb: &str, of: &str| format!("reflex.{kind}:{pb}\u{1f}{of}");
    let global = limits.max_runs > 0 || limits.max_targets > 0;
    let mut locks = Vec::new();
    if global {
        locks.push(String::from("reflex.intake"));
    }
    for item in items {
        let fingerprint = &item.alert.fingerprint;
        for cand in &item.candidates {
            let pb = &cand.playbook;
            if item.alert.status == AlertStatus::Resolved {
                locks.push(super::queue::start_lock(pb, fingerprint));
            }
            if global {
                continue;
            }
            locks.push(key("alert", pb, fingerprint));
            if cand.cooldown_ms > 0 {
                locks.push(key("cooldown", pb, &cand.cooldown_key));
            }
            if limits.max_runs_per_playbook > 0 {
                locks.push(format!("reflex.playbook:{pb}"));
            }
        }
    }
    locks
}

/// What intake decided to record for a candidate.
struct RunRow<'a> {
    state: RunState,
    reason: Option<&'a str>,
    error: Option<&'a str>,
    target: &'a str,
    /// The rendered parameters (JSON), `{}` for a run that will not execute.
    params: &'a str,
    /// This replica, for a run that starts in this transaction.
    owner: Option<&'a str>,
}

const INSERT_RUN: &str = "INSERT INTO runs (playbook, alert_id, fingerprint, starts_at, alert_status, cooldown_key, state, reason,
           dry_run, params, created_at, finished_at, error, target, deadline_ms, triggered_by, retry_of, started_at,
           owner, concurrency, undo_of, id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)";

/// The next run's id, taken ahead on PostgreSQL (see [`insert_run`]).
const NEXT_RUN_ID: &str = "SELECT nextval('runs_id_seq')";

/// Inserts the run; none when this occurrence already has one.
///
/// On SQLite the unique index decides dedup (its one writer saw no other since the policy
/// looked). On PostgreSQL the id was taken with the reads the rules asked for, so the insert
/// is sent with the next statement waited for, not waited for itself: it cannot meet a row
/// for the same occurrence, because every replica records an occurrence under the alert's
/// lock (or all intake's), which this batch has held since before the rules looked. If it ever
/// did, the unique index would fail the batch, and the sender would retry into a dedup.
fn insert_run(
    c: &Db,
    at: &At<'_>,
    cand: &Candidate,
    steps: Option<&NewSteps<'_>>,
    row: &RunRow<'_>,
) -> Result<Option<i64>, StoreError> {
    let (a, now) = (at.alert, at.now);
    let ended = !matches!(row.state, RunState::Pending | RunState::Running);
    let id: Option<i64> = match (c.is_pg(), at.run_id.take()) {
        (true, Some(id)) => Some(id),
        (true, None) => Some(c.one(NEXT_RUN_ID, &[], |r| r.get(0))?),
        (false, _) => None,
    };
    let cooldown_key = cand.recorded_cooldown_key();
    let params: [&dyn super::db::Param; 22] = [
        &cand.playbook,
        &at.alert_id,
        &a.fingerprint,
        &a.starts_at,
        &a.status,
        &cooldown_key,
        &row.state,
        &row.reason,
        &cand.dry_run,
        &row.params,
        &now,
        &ended.then_some(now),
        &row.error,
        &row.target,
        &cand.deadline_ms,
        &cand.manual.as_ref().map(|m| m.by.as_str()),
        &cand.manual.as_ref().and_then(|m| m.retry_of),
        &row.owner.map(|_| now),
        &row.owner,
        &i64::from(cand.plan.as_ref().map_or(0, |p| p.concurrency)),
        &cand.manual.as_ref().and_then(|m| m.undo_of),
        &id,
    ];
    if let Db::Pg(conn) = c {
        let counted = match row.state {
            RunState::Suppressed => None,
            _ => super::breaker::counting(c, &cand.playbook, row.target, at.limits, now)?,
        };
        let keys = part::run(&cand.playbook, &a.fingerprint, row.target, cooldown_key);
        match steps {
            None => c.later_on(INSERT_RUN, &params, keys)?,
            Some(steps) => insert_run_and_steps(conn, &params, steps, keys)?,
        }
        if let Some(run) = counted {
            super::breaker::recorded(c, run);
        }
        return Ok(id);
    }
    // A null id is SQLite's next rowid.
    static OR_NOT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "{INSERT_RUN} ON CONFLICT (playbook, fingerprint, starts_at, alert_status) DO NOTHING"
        )
    });
    let id = c.insert(&OR_NOT, &params)?;
    if let (Some(id), Some(s)) = (id, steps) {
        insert_steps(c, id, s.plan, s.json, s.first)?;
    }
    Ok(id)
}

/// A new run's steps: the plan's, their arguments and gates as JSON, and when the first one
/// started (a run started at intake).
struct NewSteps<'a> {
    plan: &'a Plan,
    json: &'a [(String, Option<String>)],
    first: Option<(i64, i64)>,
}

/// PostgreSQL: the run (`params` of [`INSERT_RUN`], its id the last) and all its steps in
/// one statement, the run's insert a data-modifying CTE.
fn insert_run_and_steps(
    conn: &std::cell::RefCell<&mut super::db::PgConn>,
    params: &[&dyn super::db::Param; 22],
    new: &NewSteps<'_>,
    keys: Keys,
) -> Result<(), StoreError> {
    static BOTH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "WITH run AS ({INSERT_RUN})
             INSERT INTO steps (run_id, idx, name, action, args, timeout_ms, on_failure, state,
                                approval, phase, started_at, started_us)
             SELECT ?22, * FROM unnest(?23::bigint[], ?24::text[], ?25::text[], ?26::text[],
                                       ?27::bigint[], ?28::text[], ?29::text[], ?30::text[],
                                       ?31::text[], ?32::bigint[], ?33::bigint[])"
        )
    });
    // As many as have their JSON (as `insert_steps` zips them).
    let n = new.plan.steps.len().min(new.json.len());
    let (steps, json) = (&new.plan.steps[..n], &new.json[..n]);
    let idx: Vec<i64> = (0..n as i64).collect();
    let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
    let actions: Vec<&str> = steps.iter().map(|s| s.action.name()).collect();
    let args: Vec<&str> = json.iter().map(|(a, _)| a.as_str()).collect();
    let timeouts: Vec<Option<i64>> = steps
        .iter()
        .map(|s| s.timeout_ms.map(|t| t as i64))
        .collect();
    let on_failure: Vec<&str> = steps.iter().map(|s| s.on_failure.as_str()).collect();
    let running = |i: usize| new.first.filter(|_| i == 0);
    let states: Vec<&str> = (0..n)
        .map(|i| {
            if running(i).is_some() {
                "running"
            } else {
                "pending"
            }
        })
        .collect();
    let approvals: Vec<Option<&str>> = json.iter().map(|(_, a)| a.as_deref()).collect();
    let phases: Vec<&str> = steps.iter().map(|s| s.phase.as_str()).collect();
    let started_at: Vec<Option<i64>> = (0..n).map(|i| running(i).map(|(ms, _)| ms)).collect();
    let started_us: Vec<Option<i64>> = (0..n).map(|i| running(i).map(|(_, us)| us)).collect();
    let mut all: Vec<&(dyn postgres::types::ToSql + Sync)> = params
        .iter()
        .map(|p| *p as &(dyn postgres::types::ToSql + Sync))
        .collect();
    all.extend([
        &idx as &(dyn postgres::types::ToSql + Sync),
        &names,
        &actions,
        &args,
        &timeouts,
        &on_failure,
        &states,
        &approvals,
        &phases,
        &started_at,
        &started_us,
    ]);
    conn.borrow_mut().queue(&BOTH, &all, keys)
}

const RECORDED: &str = "SELECT id FROM runs WHERE playbook = ?1 AND fingerprint = ?2 AND starts_at = ?3 AND alert_status = ?4";

/// PostgreSQL: [`RECORDED`]'s answer as one row (the id null when there is none) and, for a
/// playbook that coalesces, [`super::coalesce::lock_queued`]'s (else `false`). The lock goes
/// with the read the rules ask first, so that the queued run is read after it without a
/// statement of its own. Two statements, not one with a flag: PostgreSQL planned the flagged
/// one again at every use, the plan for `false` without the lock always looking cheaper
/// than the one kept.
fn recorded_pg(coalesce: bool) -> &'static str {
    static BOTH: std::sync::LazyLock<[String; 2]> = std::sync::LazyLock::new(|| {
        [
            format!("SELECT ({RECORDED}), false"),
            format!(
                "SELECT ({RECORDED}), {}",
                super::coalesce::lock_queued("?1", "?2")
            ),
        ]
    });
    &BOTH[usize::from(coalesce)]
}

/// The run recorded for this occurrence of the alert by this playbook, if any, and whether
/// a queued run of it may be joined: always on SQLite (its one writer is the only one that
/// claims); on PostgreSQL only with `coalesce`, under [`super::coalesce::lock_queued`].
fn existing_run(
    c: &Db,
    playbook: &str,
    a: &Alert,
    coalesce: bool,
) -> Result<(Option<i64>, bool), StoreError> {
    let status = a.status.as_str();
    if !c.is_pg() {
        let params: [&dyn super::db::Param; 4] = [&playbook, &a.fingerprint, &a.starts_at, &status];
        return Ok((c.row(RECORDED, &params, |r| r.get(0))?, true));
    }
    let params: [&dyn super::db::Param; 4] = [&playbook, &a.fingerprint, &a.starts_at, &status];
    c.one(recorded_pg(coalesce), &params, |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
}

/// Sends every read the intake rules may ask for about this candidate ahead, together (one
/// round trip on PostgreSQL, where each would be one; see [`Db::prefetch`]). The rules then
/// ask as before and take the answers read here; a write between them drops the rest.
/// `counted`: the breaker limits whose counts go too. `run_id`: also the id of the run it
/// may insert (none was taken with the alert's insert).
fn prefetch_facts(
    c: &Db,
    a: &Alert,
    counted: BreakerLimits,
    now: i64,
    cand: &Candidate,
    start: &Starter,
    run_id: bool,
) -> Result<(), StoreError> {
    if !c.is_pg() {
        return Ok(());
    }
    let target = cand.plan.as_ref().map_or("", |p| p.target.as_str());
    c.prefetch_on(
        recorded_pg(cand.coalesce),
        &[
            &cand.playbook,
            &a.fingerprint,
            &a.starts_at,
            &a.status.as_str(),
        ],
        part::occurrence(&cand.playbook, &a.fingerprint),
    )?;
    if cand.coalesce {
        super::coalesce::prefetch(c, &cand.playbook, &a.fingerprint)?;
    }
    super::switches::prefetch(c, &cand.playbook, now)?;
    super::cooldown::prefetch(c, &cand.playbook, &cand.cooldown_key, cand.cooldown_ms, now)?;
    super::breaker::prefetch(c, &cand.playbook, target, counted, now)?;
    if run_id {
        c.prefetch_on(NEXT_RUN_ID, &[], Keys::Only(Vec::new()))?;
    }
    if let Ok(plan) = &cand.plan
        && start.left > 0
        && plan.starts_ungated()
        && plan.concurrency == 0
    {
        // The target's and the alert's try-locks are taken here even when the rules stop
        // before asking: a lock held a little longer than needed, never one missing.
        super::queue::prefetch_lock_start(c, &plan.target, &cand.playbook, &a.fingerprint)?;
        c.prefetch_on(
            &MAY_START,
            &[
                &i64::from(start.max_per_target),
                &plan.target,
                &cand.playbook,
                &a.fingerprint,
            ],
            part::occurrence_on(&cand.playbook, &a.fingerprint, &plan.target),
        )?;
    }
    Ok(())
}

/// What [`prefetch_facts`]' reads depend on, together.
fn facts_depend(a: &Alert, cand: &Candidate) -> Keys {
    let target = cand.plan.as_ref().map_or("", |p| p.target.as_str());
    part::facts(
        &cand.playbook,
        &a.fingerprint,
        target,
        cand.recorded_cooldown_key(),
    )
}

/// Whether a run may start now on its target: room on it, no older run waiting for it, and
/// none of the playbook executing for the same alert; the queue's rules, applied to the run
/// about to be recorded (`?1` the per-target limit, then its target, playbook, fingerprint).
pub(super) static MAY_START: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    use super::queue::{ALERT_IDLE, TARGET_HAS_ROOM};
    format!(
        "SELECT {TARGET_HAS_ROOM}
           AND NOT EXISTS (SELECT 1 FROM runs q WHERE q.state = 'pending' AND q.target = p.target)
           AND {ALERT_IDLE}
         FROM (SELECT CAST(?2 AS TEXT) AS target, CAST(?3 AS TEXT) AS playbook,
                      CAST(?4 AS TEXT) AS fingerprint) p"
    )
});

/// Starts new runs inside the intake transaction while it has slots.
pub(super) struct Starter {
    left: usize,
    /// This replica: the runs it starts are its own.
    owner: String,
    /// When the webhook of the alert at hand arrived.
    received_us: i64,
    max_per_target: u32,
    /// [`Store::leases_lost`] before the write.
    leases_lost: u64,
    started: Vec<ClaimedRun>,
}

impl Starter {
    /// Whether a new run of `playbook` for this alert can start in this transaction: a slot is
    /// left, its first step has no gate, its target has room, no run waits for that target
    /// (it would be older), and no run of the playbook is executing for the same alert. The
    /// same rules as [`Store::claim`], for one run.
    fn can_start(
        &self,
        c: &Db,
        playbook: &str,
        fingerprint: &str,
        plan: &Plan,
    ) -> Result<bool, StoreError> {
        if self.left == 0 || !plan.starts_ungated() {
            return Ok(false);
        }
        // On PostgreSQL, decided under the target's and the alert's locks; a target or an
        // alert another replica is deciding on gets a pending run, claimed later.
        if c.is_pg() && !super::queue::try_lock_start(c, &plan.target, playbook, fingerprint)? {
            return Ok(false);
        }
        if plan.concurrency > 0 && !super::queue::playbook_has_room(c, playbook, plan.concurrency)?
        {
            return Ok(false);
        }
        c.one(
            &MAY_START,
            &[
                &i64::from(self.max_per_target),
                &plan.target,
                &playbook,
                &fingerprint,
            ],
            |r| r.get(0),
        )
    }

    /// Takes a slot for a run recorded running with its first step, and keeps what its task
    /// needs.
    fn started(&mut self, run_id: i64, at: &At<'_>, cand: &Candidate, plan: &Plan) {
        let now = at.now;
        self.left -= 1;
        let steps = plan
            .steps
            .iter()
            .enumerate()
            .map(|(idx, s)| StepRecord {
                idx: idx as i64,
                name: s.name.clone(),
                action: s.action,
                args: s.args.clone(),
                timeout_ms: s.timeout_ms.map(|t| t as i64),
                on_failure: s.on_failure,
                state: if idx == 0 {
                    StepState::Running
                } else {
                    StepState::Pending
                },
                started_at: (idx == 0).then_some(crate::time::Timestamp::from_ms(now)),
                finished_at: None,
                output: None,
                error: None,
                approval: s.approval.clone(),
                phase: s.phase,
                artifacts: Vec::new(),
            })
            .collect();
        self.started.push(ClaimedRun {
            id: run_id,
            playbook: cand.playbook.clone(),
            dry_run: cand.dry_run,
            params: serde_json::Value::Object(plan.params.clone()),
            alert: at.alert.clone(),
            target: plan.target.clone(),
            deadline_ms: Some(cand.deadline_ms),
            started_ms: now,
            resumed: false,
            first_step_started: true,
            steps,
            received_us: self.received_us,
            undo_of: cand.manual.as_ref().and_then(|m| m.undo_of),
            leases_lost: self.leases_lost,
        });
    }
}

/// A run's steps, as planned: all pending, or the first one running since `first` (ms and
/// µs since the epoch).
pub(super) fn insert_steps(
    c: &Db,
    run_id: i64,
    plan: &Plan,
    steps_json: &[(String, Option<String>)],
    first: Option<(i64, i64)>,
) -> Result<(), StoreError> {
    for (idx, (s, (args, approval))) in plan.steps.iter().zip(steps_json).enumerate() {
        let running = first.filter(|_| idx == 0);
        c.later(
            "INSERT INTO steps (run_id, idx, name, action, args, timeout_ms, on_failure, state, approval, phase,
               started_at, started_us)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            &[
                &run_id,
                &(idx as i64),
                &s.name,
                &s.action,
                &args,
                &s.timeout_ms.map(|t| t as i64),
                &s.on_failure.as_str(),
                &if running.is_some() { "running" } else { "pending" },
                &approval,
                &s.phase,
                &running.map(|(ms, _)| ms),
                &running.map(|(_, us)| us),
            ],
        )?;
    }
    Ok(())
}

impl Store {
    /// Records received alerts and decides, atomically with the write, what each matched
    /// playbook does: a new run, a dedup, a suppression, or a failed run. Returns the outcomes
    /// per alert, in order. Nothing is acknowledged to the sender before this commits.
    pub async fn record_intake(
        &self,
        items: Vec<IntakeItem>,
        limits: BreakerLimits,
    ) -> Result<Vec<Vec<Outcome>>, StoreError> {
        Ok(self
            .record_and_start(items, limits, StartNow::default())
            .await?
            .outcomes)
    }

    /// As [`Store::record_intake`], and in the same transaction claims up to `start.slots` of
    /// the new runs and marks their first step `running` (one commit from the webhook to the
    /// first step). The caller executes the started runs, skipping their first step's checks:
    /// they were made in this transaction.
    pub async fn record_and_start(
        &self,
        items: Vec<IntakeItem>,
        limits: BreakerLimits,
        start: StartNow,
    ) -> Result<Recorded, StoreError> {
        // On PostgreSQL, the batch's time (the writer's): every alert of a batch sees one
        // window, so that each of the breaker's counts is read once for all of them.
        let called = self.now_ms();
        // A storm behind an engaged switch is held before the breaker is asked: while the last
        // intake's alerts all were, the breaker's counts are not sent ahead (asked, they are
        // read then).
        let held = self
            .inner
            .intake_held
            .load(std::sync::atomic::Ordering::Relaxed);
        let counted = if held {
            BreakerLimits::default()
        } else {
            limits
        };
        let owner = self.inner.replica.clone();
        let leases_lost = self.leases_lost();
        // A replica without a good lease starts nothing: it may have been taken over.
        let start = if self.may_claim() {
            start
        } else {
            StartNow::default()
        };
        let locks = if self.path().is_none() {
            intake_locks(&items.iter().collect::<Vec<_>>(), limits)
        } else {
            Vec::new()
        };
        if locks.len() > super::MAX_BATCH_LOCKS && items.len() > 1 {
            // Too many locks for one transaction (a huge webhook): recorded in parts, each
            // committed on its own. Should a later part fail, the sender's retry finds the
            // earlier ones recorded (dedup), as it would a batch that failed after its commit.
            let mut first = items;
            let second = first.split_off(first.len() / 2);
            let mut one = Box::pin(self.record_and_start(first, limits, start)).await?;
            let start = StartNow {
                slots: start.slots.saturating_sub(one.started.len()),
                ..start
            };
            let two = Box::pin(self.record_and_start(second, limits, start)).await?;
            one.outcomes.extend(two.outcomes);
            one.started.extend(two.started);
            return Ok(one);
        }
        // JSON is written here, on the caller's thread, not in the one writer.
        let prepared: Vec<(IntakeItem, Json)> = items
            .into_iter()
            .map(|item| {
                let json = Json {
                    labels: json_text(&item.alert.labels),
                    annotations: json_text(&item.alert.annotations),
                    plans: item
                        .candidates
                        .iter()
                        .map(|c| c.plan.as_ref().ok().map(PlanJson::of))
                        .collect(),
                };
                (item, json)
            })
            .collect();
        let starter = move || Starter {
            left: start.slots,
            owner: owner.clone(),
            received_us: 0,
            max_per_target: start.max_per_target,
            leases_lost,
            started: Vec::new(),
        };
        let prepared = std::sync::Arc::new(prepared);
        let (sent, first) = (prepared.clone(), starter.clone());
        let ahead = move |c: &Db| {
            let now = c.batch_ms().unwrap_or(called);
            let start = first();
            (sent.iter())
                .try_for_each(|(item, json)| send_ahead(c, item, json, now, counted, &start))
        };
        let (outcomes, started) = self
            .write_ahead(locks, ahead, move |c| {
                let now = c.batch_ms().unwrap_or(called);
                let mut starter = starter();
                let mut all = Vec::with_capacity(prepared.len());
                for (item, json) in prepared.iter() {
                    if let Some(id) = item.deferred
                        && !super::deferred::take(c, id)?
                    {
                        // Recorded already (by another replica): not twice.
                        all.push(Vec::new());
                        continue;
                    }
                    starter.received_us = item.received_us;
                    let first = item.candidates.first();
                    let facts = || {
                        first.map_or(Ok(()), |cand| {
                            prefetch_facts(c, &item.alert, counted, now, cand, &starter, false)
                        })
                    };
                    let depends = || {
                        first.map_or(Keys::Only(Vec::new()), |cand| {
                            facts_depend(&item.alert, cand)
                        })
                    };
                    let (alert_id, run_id) =
                        insert_alert(c, &item.alert, json, now, item.received_us, facts, depends)?;
                    let at = At {
                        alert: &item.alert,
                        alert_id,
                        limits,
                        ahead: counted,
                        now,
                        run_id: std::cell::Cell::new(run_id),
                    };
                    let mut outcomes = (item.candidates.iter().zip(&json.plans))
                        .enumerate()
                        .map(|(i, (cand, plan))| {
                            intake_one(c, &at, cand, plan.as_ref(), &mut starter, i == 0)
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    if item.alert.status == AlertStatus::Resolved {
                        outcomes.extend(end_for_resolved(
                            c,
                            &item.alert.fingerprint,
                            &item.alert.starts_at,
                            now,
                        )?);
                    }
                    all.push(outcomes);
                }
                Ok((all, starter.started))
            })
            .await?;
        let holds: Vec<Option<Hold>> = (outcomes.iter().flatten())
            .map(|o| match o {
                Outcome::Suppressed { cause, .. } => Some(*cause),
                _ => None,
            })
            .collect();
        let switched = |h: &Option<Hold>| matches!(h, Some(Hold::KillSwitch | Hold::Breaker));
        let held = !holds.is_empty() && holds.iter().all(switched);
        (self.inner.intake_held).store(held, std::sync::atomic::Ordering::Relaxed);
        let tripped = holds.contains(&Some(Hold::Breaker));
        if tripped {
            self.switches_changed();
        }
        Ok(Recorded { outcomes, started })
    }
}
