//! The run queue: pending runs are claimed in order, and every step transition is written
//! before the next action; cancellation and crash recovery.

use super::lifecycle::finish_run;
use super::*;
use crate::alert::Alert;
use crate::time::Timestamp;
use serde::Serialize;
use serde_json::Value;

/// Which step of which run, for the record.
#[derive(Debug, Clone)]
pub struct StepRef {
    /// Run id.
    pub run_id: i64,
    /// Step index.
    pub idx: i64,
    /// The action.
    pub action: crate::playbook::actions::Action,
    /// The run's target.
    pub target: String,
}

/// A step's result, as it is recorded.
#[derive(Debug, Clone)]
pub struct StepResult {
    /// Which step.
    pub step: StepRef,
    /// Its final state.
    pub state: StepState,
    /// Its output (redacted).
    pub output: Option<Value>,
    /// Its error (redacted).
    pub error: Option<String>,
}

/// Writes a step's result and puts the executor action on the audit log: `step.<action>` by
/// `reflex`, on `run/<id> step/<idx> target/<target>`.
pub(super) fn record_step(c: &Db, r: &StepResult, now: i64) -> Result<(), StoreError> {
    let output = r.output.as_ref().map(json_text);
    let s = &r.step;
    c.later(
        "UPDATE steps SET state = ?3, finished_at = ?4, output = ?5, error = ?6 WHERE run_id = ?1 AND idx = ?2",
        &[
            &s.run_id,
            &s.idx,
            &r.state.as_str(),
            &now,
            &output,
            &r.error,
        ],
    )?;
    audit_step(c, r)
}

/// The audit row of a step's result (see [`record_step`]).
pub(super) fn audit_step(c: &Db, r: &StepResult) -> Result<(), StoreError> {
    let s = &r.step;
    let outcome = if r.error.is_some() {
        "failed"
    } else {
        r.state.as_str()
    };
    let target = format!("run/{} step/{} target/{}", s.run_id, s.idx, s.target);
    super::audit::audit_in(
        c,
        "reflex",
        &format!("step.{}", s.action),
        Some(&target),
        outcome,
        r.error.as_deref(),
    )
}

/// A run claimed by a worker, with everything needed to execute it.
#[derive(Debug, Clone)]
pub struct ClaimedRun {
    /// Run id.
    pub id: i64,
    /// Playbook name.
    pub playbook: String,
    /// Record without acting.
    pub dry_run: bool,
    /// Rendered parameters.
    pub params: Value,
    /// The alert it is for.
    pub alert: Alert,
    /// What it acts on.
    pub target: String,
    /// Deadline in ms after it first started, if any.
    pub deadline_ms: Option<i64>,
    /// When it first started (ms).
    pub started_ms: i64,
    /// Claimed again after an approval (it already announced its start).
    pub resumed: bool,
    /// Claimed at intake, with its first step already marked `running` in that transaction
    /// (its checks were made there).
    pub first_step_started: bool,
    /// Its steps, in order.
    pub steps: Vec<StepRecord>,
    /// When its alert's webhook arrived (µs since the epoch; 0 when not known).
    pub received_us: i64,
    /// The run it takes back, for an operator's undo.
    pub undo_of: Option<i64>,
    /// [`Store::leases_lost`] before the write that claimed or started it.
    pub leases_lost: u64,
}

/// A stored step.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StepRecord {
    /// Position in the run (0-based).
    pub idx: i64,
    /// Name.
    pub name: String,
    /// The action, e.g. `ssh.run`.
    #[schema(value_type = String)]
    pub action: crate::playbook::actions::Action,
    /// Rendered arguments.
    #[schema(value_type = Object)]
    pub args: Value,
    /// Timeout in ms, if set.
    pub timeout_ms: Option<i64>,
    /// What its failure does to the run: `stop` or `continue`.
    #[schema(value_type = String)]
    pub on_failure: crate::playbook::spec::OnFailure,
    /// State.
    #[schema(value_type = String)]
    pub state: StepState,
    /// Started.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<Timestamp>,
    /// Finished.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<Timestamp>,
    /// Output (action-specific JSON).
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    /// Error.
    pub error: Option<String>,
    /// Approval gate before this step, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub approval: Option<crate::playbook::Gate>,
    /// `main`, or `on_failure` (run only when the run fails).
    #[schema(value_type = String)]
    pub phase: crate::playbook::spec::Phase,
    /// What it produced besides its output (a graph, a log), each with its URL.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<super::ArtifactInfo>,
}

/// What the claiming statement returns of a run; the rest is read off the writer.
#[derive(Clone)]
pub(super) struct ClaimRow {
    id: i64,
    playbook: String,
    dry_run: bool,
    params: Option<String>,
    alert_id: i64,
    target: String,
    deadline_ms: Option<i64>,
    started_ms: i64,
}

fn claim_row(r: &super::db::Row) -> Result<ClaimRow, StoreError> {
    Ok(ClaimRow {
        id: r.get(0)?,
        playbook: r.get(1)?,
        dry_run: r.get(2)?,
        params: r.get(3)?,
        alert_id: r.get(4)?,
        target: r.get(5)?,
        deadline_ms: r.get(6)?,
        started_ms: r.get(7)?,
    })
}

/// The advisory locks a replica holds while it decides whether a run may start (PostgreSQL),
/// tried, never waited for, so that no two batches wait on each other: its target's, so
/// that the per-target limit holds across replicas, and its alert's for its playbook, so that
/// one run of a playbook for an alert executes at a time across replicas even when two of its
/// runs have different targets (neither replica would see the other's run `running` before
/// it commits). A run whose locks another replica holds is not started now: it waits,
/// pending, for a later claim.
pub(super) fn try_lock_start(
    c: &Db,
    target: &str,
    playbook: &str,
    fingerprint: &str,
) -> Result<bool, StoreError> {
    c.one(&TRY_LOCK_START, &[&target, &playbook, &fingerprint], |r| {
        r.get(0)
    })
}

/// Sends [`try_lock_start`] ahead (see [`Db::prefetch`]); its answer stands whatever the
/// batch writes (a lock taken is not undone by a write).
pub(super) fn prefetch_lock_start(
    c: &Db,
    target: &str,
    playbook: &str,
    fingerprint: &str,
) -> Result<(), StoreError> {
    let params: [&dyn super::db::Param; 3] = [&target, &playbook, &fingerprint];
    c.prefetch_on(&TRY_LOCK_START, &params, Keys::Only(Vec::new()))
}

/// [`try_lock_start`]'s statement: `?1` the target, `?2` the playbook, `?3` the fingerprint.
static TRY_LOCK_START: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT pg_try_advisory_xact_lock(hashtextextended('reflex.target:' || ?1, 0))
            AND pg_try_advisory_xact_lock({})",
        start_key("?2", "?3")
    )
});

/// The key of the lock on starting runs of playbook `playbook` for alert `fingerprint` (see
/// [`try_lock_start`]), an SQL expression of the two (placeholders or columns): the key of
/// the lock named [`start_lock`] (a batch's locks are keyed by `hashtextextended(name, 0)`).
pub(super) fn start_key(playbook: &str, fingerprint: &str) -> String {
    // A unit separator: neither a playbook name nor a fingerprint holds one.
    format!("hashtextextended('reflex.start:' || {playbook} || chr(31) || {fingerprint}, 0)")
}

/// The name of the lock whose key is [`start_key`], for a batch to wait for (see
/// `intake_locks`).
pub(super) fn start_lock(playbook: &str, fingerprint: &str) -> String {
    format!("reflex.start:{playbook}\u{1f}{fingerprint}")
}

/// Whether a playbook with a concurrency limit has room for one more run executing. On
/// PostgreSQL it is decided under the playbook's lock (the one intake takes for a playbook's
/// breaker limit), tried, not waited for: a playbook another replica is starting a run of has
/// no room now.
pub(super) fn playbook_has_room(c: &Db, playbook: &str, limit: u32) -> Result<bool, StoreError> {
    if c.is_pg() {
        let locked: bool = c.one(TRY_LOCK_PLAYBOOK, &[&playbook], |r| r.get(0))?;
        if !locked {
            return Ok(false);
        }
    }
    let running: i64 = c.one(
        "SELECT count(*) FROM runs WHERE playbook = ?1 AND state = 'running'",
        &[&playbook],
        |r| r.get(0),
    )?;
    Ok(running < i64::from(limit))
}

/// The rules a run may start on, each listing ([`WALK`], [`HEADS`]) and each claim
/// ([`claim_heads`], deciding again) applies to a pending run `p`; `?1` is the per-target
/// limit. It is its target's head (the target's oldest pending run)...
const HEAD_OF_TARGET: &str = "p.id = (SELECT q.id FROM runs q WHERE q.state = 'pending'
                                     AND q.target = p.target ORDER BY q.id LIMIT 1)";
/// ...on a target with fewer than `?1` runs executing (counted in `runs_running`: a few
/// entries a target, however long its queue or its history; the indexes of the runs
/// executing serve lookups by their keys only, migration 22)...
pub(super) const TARGET_HAS_ROOM: &str =
    "(SELECT count(*) FROM runs r WHERE r.target = p.target AND r.state = 'running') < ?1";
/// ...its playbook does not already run for the same alert...  Written so that only
/// `runs_running_alert` (by fingerprint) can serve it: `IS NOT DISTINCT FROM` (the same as
/// `=` on a column that is never null) is no condition on the playbook, so it neither makes
/// `runs_running_playbook` usable (its predicate wants `playbook IS NOT NULL`) nor is an
/// index condition. With statistics that lag a storm, PostgreSQL's planner took the
/// playbook's index, whose entries grow with every run of the playbook until a vacuum:
/// 0.1 ms a head, against 2 µs.
pub(super) const ALERT_IDLE: &str =
    "NOT EXISTS (SELECT 1 FROM runs o WHERE o.fingerprint = p.fingerprint
                    AND o.playbook IS NOT DISTINCT FROM p.playbook AND o.state = 'running')";
/// ...and has room under its concurrency limit.
const PLAYBOOK_HAS_ROOM: &str =
    "(p.concurrency = 0 OR (SELECT count(*) FROM runs o WHERE o.playbook = p.playbook
                                AND o.state = 'running') < p.concurrency)";

/// The heads that may start among the oldest `?2` pending runs, oldest first, at most `?3`,
/// each with how many pending runs were looked at (one row with no head when none may
/// start). Its cost is those `?2` runs', whatever the queue's length and however many
/// targets it spans; the prefix is taken first (`MATERIALIZED`), so that no plan walks further.
static WALK: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH w AS MATERIALIZED (SELECT id FROM runs WHERE state = 'pending' ORDER BY id LIMIT ?2),
           h AS (SELECT p.id, p.target, p.playbook, p.concurrency, p.fingerprint
                 FROM w JOIN runs p ON p.id = w.id
                 WHERE {HEAD_OF_TARGET} AND {TARGET_HAS_ROOM} AND {ALERT_IDLE} AND {PLAYBOOK_HAS_ROOM}
                 ORDER BY p.id LIMIT ?3)
         SELECT (SELECT count(*) FROM w), h.target, h.playbook, h.concurrency, h.fingerprint
         FROM (SELECT 1) one LEFT JOIN h ON true ORDER BY h.id"
    )
});

/// The heads that may start, oldest first, at most `?2`, from the targets with pending runs:
/// for a queue whose oldest runs wait behind full targets, where [`WALK`] finds too few. The
/// targets are found by skipping through `runs_pending_target` (each step the next target
/// after the last, one index probe), so a target's backlog costs one probe, not its length.
static HEADS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH RECURSIVE t(target) AS (
           SELECT (SELECT q.target FROM runs q WHERE q.state = 'pending' ORDER BY q.target LIMIT 1)
           UNION ALL
           SELECT (SELECT q.target FROM runs q WHERE q.state = 'pending' AND q.target > t.target
                   ORDER BY q.target LIMIT 1)
           FROM t WHERE t.target IS NOT NULL)
         SELECT p.id, p.target, p.playbook, p.concurrency, p.fingerprint FROM t
         JOIN runs p ON p.id = (SELECT q.id FROM runs q WHERE q.state = 'pending'
                                AND q.target = t.target ORDER BY q.id LIMIT 1)
         WHERE {TARGET_HAS_ROOM} AND {ALERT_IDLE} AND {PLAYBOOK_HAS_ROOM}
         ORDER BY p.id LIMIT ?2"
    )
});

/// How many pending runs past what is asked for [`WALK`] looks at before it leaves the
/// search to [`HEADS`].
const WALK_SLACK: usize = 32;

/// A run at the head of its target's queue that may start.
pub(super) struct Head {
    pub(super) target: String,
    pub(super) playbook: String,
    pub(super) concurrency: i64,
    pub(super) fingerprint: String,
}

/// The oldest heads that may start, at most `want`: those among the oldest pending runs
/// ([`WALK`]) when they hold enough or are all there is, else [`HEADS`].
fn heads(c: &Db, max: i64, want: usize) -> Result<Vec<Head>, StoreError> {
    let (walk, want) = ((want + WALK_SLACK) as i64, want as i64);
    let mut walked = 0;
    let mut found = Vec::new();
    for (n, target, playbook, concurrency, fingerprint) in
        c.rows(&WALK, &[&max, &walk, &want], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?
    {
        walked = n;
        if let (Some(target), Some(playbook), Some(concurrency), Some(fingerprint)) =
            (target, playbook, concurrency, fingerprint)
        {
            found.push(Head {
                target,
                playbook,
                concurrency,
                fingerprint,
            });
        }
    }
    if found.len() as i64 == want || walked < walk {
        return Ok(found);
    }
    c.rows(&HEADS, &[&max, &want], |r| {
        Ok(Head {
            target: r.get(1)?,
            playbook: r.get(2)?,
            concurrency: r.get(3)?,
            fingerprint: r.get(4)?,
        })
    })
}

/// Claims the oldest pending runs that may start, at most `limit`, one per target at a time
/// (see [`Store::claim`]).
pub(super) fn claim_some(
    c: &Db,
    max_per_target: u32,
    limit: usize,
    now: i64,
    owner: &str,
) -> Result<Vec<ClaimRow>, StoreError> {
    let max = i64::from(max_per_target);
    let mut out = Vec::new();
    while out.len() < limit {
        let want = limit - out.len();
        let found = heads(c, max, want)?;
        let before = out.len();
        out.extend(claim_heads(c, &found, &max, &now, &owner)?);
        // Another round only where a claim can have made room for a head not yet listed:
        // the next run of a target that takes several, or heads past a full list.
        let more = max_per_target > 1 || found.len() == want;
        if out.len() == before || !more {
            break;
        }
    }
    Ok(out)
}

/// Tries the lock of a playbook with a concurrency limit (PostgreSQL), the one intake takes
/// for a playbook's breaker limit.
const TRY_LOCK_PLAYBOOK: &str =
    "SELECT pg_try_advisory_xact_lock(hashtextextended('reflex.playbook:' || ?1, 0))";

/// Claims heads, oldest first, each deciding again on what is committed (and on the row
/// itself, should it have changed meanwhile), so that an earlier claim of the same alert or
/// playbook counts. On PostgreSQL, where several replicas claim at once, each under the locks
/// a run starts under ([`try_lock_start`]) and its playbook's with a concurrency limit, tried,
/// not waited for: `SKIP LOCKED` in effect. There every head's locks go in one round trip and
/// the claims in a second; each claim is still its own statement, which sees the ones before
/// it.
pub(super) fn claim_heads<'a>(
    c: &Db,
    heads: &'a [Head],
    max: &'a i64,
    now: &'a i64,
    owner: &'a &str,
) -> Result<Vec<ClaimRow>, StoreError> {
    // On PostgreSQL only a run of the alert whose lock was taken (`?6`): the target's head
    // may have changed since it was listed. Written as `ALERT_IDLE` is, so that no index
    // serves it (the plan stays the target's).
    fn claim(alert: &str) -> String {
        format!(
            "UPDATE runs SET state = 'running', started_at = coalesce(started_at, ?2), owner = ?4
             WHERE id = (SELECT p.id FROM runs p WHERE p.state = 'pending' AND p.target = ?3
                         AND p.playbook = ?5 {alert} AND {HEAD_OF_TARGET} AND {TARGET_HAS_ROOM}
                         AND {ALERT_IDLE} AND {PLAYBOOK_HAS_ROOM})
               AND state = 'pending'
             RETURNING id, playbook, dry_run, params, alert_id, target, deadline_ms, started_at"
        )
    }
    static CLAIM: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| claim(""));
    static CLAIM_PG: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| claim("AND p.fingerprint IS NOT DISTINCT FROM ?6"));
    // A lock's answer, like a claim's, depends on nothing the batch writes.
    let alone = || Keys::Only(Vec::new());
    let limited = |h: &Head| h.concurrency > 0;
    let locked: Vec<&Head> = if c.is_pg() {
        for h in heads {
            prefetch_lock_start(c, &h.target, &h.playbook, &h.fingerprint)?;
            if limited(h) {
                c.prefetch_on(TRY_LOCK_PLAYBOOK, &[&h.playbook], alone())?;
            }
        }
        let mut locked = Vec::new();
        for h in heads {
            let start = try_lock_start(c, &h.target, &h.playbook, &h.fingerprint)?;
            let playbook = !limited(h) || c.one(TRY_LOCK_PLAYBOOK, &[&h.playbook], |r| r.get(0))?;
            if start && playbook {
                locked.push(h);
            }
        }
        locked
    } else {
        heads.iter().collect()
    };
    let params = |h: &'a Head| -> [&'a dyn super::db::Param; 6] {
        [max, now, &h.target, owner, &h.playbook, &h.fingerprint]
    };
    let (sql, n) = match c.is_pg() {
        true => (&*CLAIM_PG, 6),
        false => (&*CLAIM, 5),
    };
    for h in &locked {
        c.prefetch_on(sql, &params(h)[..n], alone())?;
    }
    let mut out = Vec::new();
    for h in locked {
        out.extend(c.row(sql, &params(h)[..n], claim_row)?);
    }
    Ok(out)
}

/// An alert, and when its webhook arrived (µs).
/// The columns [`alert_row`] reads, in its order.
pub(super) const ALERT_COLUMNS: &str = "source, status, labels, annotations, starts_at, ends_at, \
     fingerprint, generator_url, group_key, coalesce(received_us, 0)";

/// An alert from a row of [`ALERT_COLUMNS`], with when its webhook arrived (µs).
pub(super) fn alert_row(r: &super::db::Row) -> Result<(Alert, i64), StoreError> {
    let source: String = r.get(0)?;
    let labels: String = r.get(2)?;
    let annotations: String = r.get(3)?;
    let alert = Alert {
        source: if source == "alertmanager" {
            "alertmanager"
        } else {
            "generic"
        },
        status: r.get(1)?,
        labels: serde_json::from_str(&labels).unwrap_or_default(),
        annotations: serde_json::from_str(&annotations).unwrap_or_default(),
        starts_at: r.get(4)?,
        ends_at: r.get(5)?,
        fingerprint: r.get(6)?,
        generator_url: r.get(7)?,
        group_key: r.get(8)?,
    };
    Ok((alert, r.get(9)?))
}

pub(super) fn load_alert(c: &Db, id: i64) -> Result<(Alert, i64), StoreError> {
    c.one(&ALERT_BY_ID, &[&id], alert_row)
}

static ALERT_BY_ID: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE id = ?1"));

const STEPS_OF_RUN: &str = "SELECT idx, name, action, args, timeout_ms, on_failure, state, started_at, finished_at, output, error, approval, phase
         FROM steps WHERE run_id = ?1 ORDER BY idx";

pub(super) fn load_steps(c: &Db, run_id: i64) -> Result<Vec<StepRecord>, StoreError> {
    c.rows(STEPS_OF_RUN, &[&run_id], |r| {
        Ok(StepRecord {
            idx: r.get(0)?,
            name: r.get(1)?,
            action: r.get(2)?,
            args: parse_json(r.get(3)?),
            timeout_ms: r.get(4)?,
            on_failure: r.get(5)?,
            state: r.get(6)?,
            started_at: r.get(7)?,
            finished_at: r.get(8)?,
            output: r.get::<Option<String>>(9)?.map(|s| parse_json(Some(s))),
            error: r.get(10)?,
            approval: r
                .get::<Option<String>>(11)?
                .and_then(|s| serde_json::from_str(&s).ok()),
            phase: r.get(12)?,
            artifacts: Vec::new(),
        })
    })
}

impl Store {
    /// Claims the oldest pending run: it becomes `running` in the same statement, so no two
    /// workers can take it.
    ///
    /// A run is skipped (it stays pending, in order) while its target already has
    /// `max_per_target` runs executing, or while another run of the same playbook for the same
    /// alert is executing.
    ///
    /// Claims up to `limit` runs in one write (one commit), oldest first.
    pub async fn claim(
        &self,
        max_per_target: u32,
        limit: usize,
    ) -> Result<Vec<ClaimedRun>, StoreError> {
        let leases_lost = self.leases_lost();
        if !self.may_claim() {
            return Ok(Vec::new());
        }
        let now = self.now_ms();
        let owner = self.inner.replica.clone();
        let rows = self
            .write(move |c| claim_some(c, max_per_target, limit, now, &owner))
            .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // What the claimed runs need is read on the read connection, off the one writer. The
        // runs are claimed now: this is retried while the database is away (a restart), since
        // a claimed run that is never loaded would wait for nobody.
        let load = || {
            let rows = rows.clone();
            self.read(move |c| load_claimed(c, rows))
        };
        let backoff = backon::ExponentialBuilder::default()
            .with_min_delay(std::time::Duration::from_millis(200))
            .with_max_delay(std::time::Duration::from_secs(5))
            .with_max_times(40)
            .with_jitter();
        backon::Retryable::retry(load, backoff)
            .when(StoreError::is_transient)
            .notify(|e: &StoreError, d| {
                tracing::warn!(error = %e, retry_in = ?d, "cannot load claimed runs yet; retrying");
            })
            .await
            .map(|runs| {
                (runs.into_iter())
                    .map(|run| ClaimedRun { leases_lost, ..run })
                    .collect()
            })
    }

    /// Marks a step `running`, written before its action starts, with the previous step's
    /// result (and its audit row) in the same write.
    pub async fn step_started_after(
        &self,
        run_id: i64,
        idx: i64,
        previous: Option<StepResult>,
    ) -> Result<(), StoreError> {
        let now = self.now_ms();
        let owner = self.inner.replica.clone();
        self.write(move |c| {
            if let Some(previous) = &previous {
                record_step(c, previous, now)?;
            }
            // Only while the run is still this replica's: one whose lease was taken over
            // finds its run interrupted, or requeued, and acts no further. And only once: a
            // replica that claimed the run again after losing it (same name, new lease) may
            // hold it twice, in its claim from before, loaded late, and in the new one.
            let started = c.exec(
                "UPDATE steps SET state = 'running', started_at = ?3, started_us = ?4
                 WHERE run_id = ?1 AND idx = ?2 AND state = 'pending'
                   AND EXISTS (SELECT 1 FROM runs WHERE id = ?1 AND state = 'running' AND owner = ?5)",
                &[&run_id, &idx, &now, &crate::time::now_us(), &owner],
            )?;
            if started == 0 {
                return Err(StoreError::LostRun(run_id));
            }
            Ok(())
        })
        .await
    }

    /// Records a step's result, with its audit row, in one write.
    pub async fn step_finished(&self, result: StepResult) -> Result<(), StoreError> {
        let now = self.now_ms();
        self.write(move |c| record_step(c, &result, now)).await
    }

    /// Records how a running step is getting on (a verification window under way) as its
    /// output; its result replaces it when it ends.
    pub async fn step_progress(
        &self,
        run_id: i64,
        idx: i64,
        progress: Value,
    ) -> Result<(), StoreError> {
        let text = json_text(&progress);
        self.write(move |c| {
            c.exec(
                "UPDATE steps SET output = ?3 WHERE run_id = ?1 AND idx = ?2 AND state = 'running'",
                &[&run_id, &idx, &text],
            )?;
            Ok(())
        })
        .await
    }

    /// Whether another occurrence of an alert (firing, with another start time) came to a
    /// playbook at or after `since_ms`: the alert fired again.
    pub async fn refired(
        &self,
        playbook: String,
        fingerprint: String,
        starts_at: String,
        since_ms: i64,
    ) -> Result<bool, StoreError> {
        self.read(move |c| {
            // The dedup index leads with (playbook, fingerprint).
            let found: Option<i64> = c.row(
                "SELECT id FROM runs WHERE playbook = ?1 AND fingerprint = ?2 AND alert_status = 'firing'
                   AND starts_at != ?3 AND created_at >= ?4 LIMIT 1",
                &[&playbook, &fingerprint, &starts_at, &since_ms],
                |r| r.get(0),
            )?;
            Ok(found.is_some())
        })
        .await
    }

    /// Marks the main steps not yet started as `skipped` (a failure stopped the run; its
    /// `on_failure` steps run next).
    pub async fn skip_pending_main(&self, run_id: i64) -> Result<(), StoreError> {
        self.write(move |c| {
            c.exec(
                "UPDATE steps SET state = 'skipped' WHERE run_id = ?1 AND state = 'pending' AND phase = 'main'",
                &[&run_id],
            )?;
            Ok(())
        })
        .await
    }

    /// Cancels a run that has not started. Returns the run's state before the call, or `None`
    /// when there is no such run; a `Pending` run is now `Cancelled`.
    pub async fn cancel_if_pending(&self, run_id: i64) -> Result<Option<RunState>, StoreError> {
        let now = self.now_ms();
        self.write(move |c| {
            if c.is_pg() {
                // Its pending approval first, then the run: the order a decision on the
                // approval takes them in (no cycle with an operator approving at once).
                c.later(
                    "SELECT 1 FROM approvals WHERE run_id = ?1 AND state = 'pending' FOR UPDATE",
                    &[&run_id],
                )?;
            }
            let state: Option<String> = c.row(
                if c.is_pg() {
                    "SELECT state FROM runs WHERE id = ?1 FOR UPDATE"
                } else {
                    "SELECT state FROM runs WHERE id = ?1"
                },
                &[&run_id],
                |r| r.get(0),
            )?;
            let Some(state) = state.as_deref().and_then(RunState::parse) else {
                return Ok(None);
            };
            if !matches!(state, RunState::Pending | RunState::AwaitingApproval) {
                return Ok(Some(state));
            }
            super::approvals::close_pending(c, run_id, ApprovalState::Cancelled, now)?;
            finish_run(
                c,
                run_id,
                RunState::Cancelled,
                Some("cancelled by an operator before it acted further"),
                now,
            )?;
            Ok(Some(state))
        })
        .await
    }

    /// After a crash: a step still `running` had started and not finished. It is marked
    /// `interrupted`, and so is its run; nothing is re-run. Runs that were `running` between
    /// steps are interrupted too (their next step never started). Pending runs stay pending.
    /// Returns the ids of the interrupted runs.
    ///
    /// On PostgreSQL only this replica's runs are looked at (none, for a new process): the
    /// runs of a replica that died are taken over when its lease expires.
    pub async fn recover(&self) -> Result<Vec<i64>, StoreError> {
        let now = self.now_ms();
        let owner = self.is_shared().then(|| self.inner.replica.clone());
        self.write(move |c| {
            interrupt_running(
                c,
                owner.as_deref(),
                now,
                "the daemon stopped while this step was running; it was not re-run",
                "the daemon stopped during this run; check the target before re-running",
            )
        })
        .await
    }
}

/// Marks the running steps of the running runs (of `owner`, or every one) `interrupted`, and
/// their runs, each with why. Returns the runs' ids.
pub(super) fn interrupt_running(
    c: &Db,
    owner: Option<&str>,
    now: i64,
    step_error: &str,
    run_error: &str,
) -> Result<Vec<i64>, StoreError> {
    let ids: Vec<i64> = c.rows(
        // `target` is never null; said here, the condition lets `runs_running` (whose
        // predicate wants it) serve the query.
        "SELECT id FROM runs WHERE state = 'running' AND target IS NOT NULL
           AND (owner = ?1 OR ?1 IS NULL) ORDER BY id",
        &[&owner],
        |r| r.get(0),
    )?;
    for &id in &ids {
        c.exec(
            "UPDATE steps SET state = 'interrupted', finished_at = ?2, error = ?3
             WHERE run_id = ?1 AND state = 'running'",
            &[&id, &now, &step_error],
        )?;
        finish_run(c, id, RunState::Interrupted, Some(run_error), now)?;
    }
    Ok(ids)
}

/// Whether a claimed run was approved before (it resumes), and the run it undoes.
const RESUMED: &str = "SELECT EXISTS (SELECT 1 FROM approvals WHERE run_id = ?1),
                              (SELECT undo_of FROM runs WHERE id = ?1)";

/// Everything a claimed run needs to execute.
fn load_claimed(c: &Db, rows: Vec<ClaimRow>) -> Result<Vec<ClaimedRun>, StoreError> {
    // On PostgreSQL every run's reads go out together: one round trip, not three a run.
    for row in &rows {
        c.prefetch(RESUMED, &[&row.id])?;
        c.prefetch(&ALERT_BY_ID, &[&row.alert_id])?;
        c.prefetch(STEPS_OF_RUN, &[&row.id])?;
    }
    let loaded = load_each(c, rows);
    // None is left for a later read on this connection, whatever failed.
    c.forget_answers();
    loaded
}

fn load_each(c: &Db, rows: Vec<ClaimRow>) -> Result<Vec<ClaimedRun>, StoreError> {
    rows.into_iter()
        .map(|row| {
            let (resumed, undo_of): (bool, Option<i64>) =
                c.one(RESUMED, &[&row.id], |r| Ok((r.get(0)?, r.get(1)?)))?;
            let (alert, received_us) = load_alert(c, row.alert_id)?;
            Ok(ClaimedRun {
                id: row.id,
                playbook: row.playbook,
                dry_run: row.dry_run,
                params: parse_json(row.params),
                alert,
                target: row.target,
                deadline_ms: row.deadline_ms,
                started_ms: row.started_ms,
                resumed,
                first_step_started: false,
                steps: load_steps(c, row.id)?,
                received_us,
                undo_of,
                leases_lost: 0,
            })
        })
        .collect()
}
