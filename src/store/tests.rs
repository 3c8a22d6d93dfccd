//! The store's decisions, on both backends: a real SQLite file in a temp dir, and a fresh
//! database on a real PostgreSQL server (see [`crate::testkit`]). The order of the holds at
//! intake, each breaker limit, a cooldown that survives a reopen, coalescing, the queue; and
//! what two replicas sharing one database must never do.

use super::*;
use crate::alert::{Alert, AlertStatus};
use crate::playbook::actions::Action;
use crate::playbook::spec::{OnFailure, Phase};
use crate::playbook::{Plan, PlannedStep};

/// Where a test's store lives: a temp dir (SQLite), or a fresh database on the PostgreSQL
/// server this test process shares.
pub(crate) enum TestDb {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

impl TestDb {
    pub(crate) fn sqlite() -> TestDb {
        TestDb::Sqlite(tempfile::tempdir().unwrap())
    }

    pub(crate) fn postgres() -> TestDb {
        TestDb::Postgres(crate::testkit::PgServer::shared().fresh())
    }

    /// A new, empty one of the same backend.
    pub(crate) fn fresh(&self) -> TestDb {
        match self {
            TestDb::Sqlite(_) => TestDb::sqlite(),
            TestDb::Postgres(_) => TestDb::postgres(),
        }
    }

    pub(crate) async fn open(&self) -> Store {
        self.open_with_clock(std::sync::Arc::new(crate::time::SystemClock))
            .await
    }

    pub(crate) async fn open_with_clock(
        &self,
        clock: std::sync::Arc<dyn crate::time::Clock>,
    ) -> Store {
        self.open_with(clock, 1).await
    }

    /// On PostgreSQL with `writers` writer connections (one by default in tests, so that
    /// writes queued behind a held one are committed in one batch).
    pub(crate) async fn open_with(
        &self,
        clock: std::sync::Arc<dyn crate::time::Clock>,
        writers: u32,
    ) -> Store {
        match self {
            TestDb::Sqlite(dir) => {
                // A test that reopens a directory may find its lock held by this process: a
                // child another test is spawning (the shell fuzzing) holds the lock's file
                // from its fork until its exec closes it. Wait for that, not for another
                // process.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                loop {
                    let sync = crate::config::Synchronous::Full;
                    match Store::open_with_clock(dir.path(), sync, clock.clone()) {
                        Err(StoreError::Locked { holder, .. })
                            if holder == Some(std::process::id())
                                && std::time::Instant::now() < deadline =>
                        {
                            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                        }
                        opened => break opened.unwrap(),
                    }
                }
            }
            TestDb::Postgres(name) => {
                let mut settings = crate::testkit::PgServer::shared().settings(name);
                settings.writers = writers;
                settings.replica = format!(
                    "replica-{}",
                    NEXT_REPLICA.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                );
                let store = Store::open_pg(settings, clock).await.unwrap();
                store.renew_lease().await.unwrap();
                store
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let TestDb::Postgres(name) = self {
            crate::testkit::PgServer::shared().drop_database(name);
        }
    }
}

static NEXT_REPLICA: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Each test, once per backend: `name::sqlite` and `name::postgres`.
macro_rules! on_both_backends {
    ($(async fn $name:ident($db:ident: TestDb) $body:block)+) => {$(
        mod $name {
            use super::*;

            async fn run($db: TestDb) $body

            #[tokio::test]
            async fn sqlite() {
                run(TestDb::sqlite()).await
            }

            #[tokio::test]
            async fn postgres() {
                run(TestDb::postgres()).await
            }
        }
    )+};
}

pub(crate) fn alert(instance: &str) -> Alert {
    let labels: crate::alert::Labels = [("alertname", "X"), ("instance", instance)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Alert {
        source: "generic",
        status: AlertStatus::Firing,
        fingerprint: crate::alert::fingerprint(&labels),
        labels,
        annotations: Default::default(),
        starts_at: format!("2026-11-23T00:00:00Z-{instance}"),
        ends_at: None,
        generator_url: None,
        group_key: None,
    }
}

pub(crate) fn candidate(playbook: &str, target: &str, cooldown_ms: i64, key: &str) -> Candidate {
    Candidate {
        playbook: playbook.into(),
        cooldown_ms,
        cooldown_key: key.into(),
        dry_run: false,
        plan: Ok(Plan {
            autonomy: false,
            concurrency: 0,
            target: target.into(),
            params: Default::default(),
            steps: vec![PlannedStep {
                name: "log".into(),
                action: Action::Log,
                args: serde_json::json!({"message": "m"}),
                timeout_ms: None,
                on_failure: OnFailure::Stop,
                approval: None,
                phase: Phase::Main,
            }],
        }),
        deadline_ms: 60_000,
        suppress: None,
        coalesce: false,
        manual: None,
    }
}

/// Holds the store's writer inside a write until the returned sender sends (or drops), so
/// that the writes queued meanwhile are committed in one batch. Returns when it is held.
pub(crate) async fn hold_writer(
    store: &Store,
) -> (
    tokio::task::JoinHandle<Result<(), StoreError>>,
    std::sync::mpsc::Sender<()>,
) {
    let (blocker, release, ()) = hold_writer_in(store, |_| Ok(())).await;
    (blocker, release)
}

/// As [`hold_writer`], after `first` has run in the held write's transaction (not yet
/// committed while held): returns its answer too. Held 30 s at most, so that a test whose
/// write waits for this one fails instead of hanging.
pub(crate) async fn hold_writer_in<R: Send + 'static>(
    store: &Store,
    mut first: impl FnMut(&Db) -> Result<R, StoreError> + Send + 'static,
) -> (
    tokio::task::JoinHandle<Result<(), StoreError>>,
    std::sync::mpsc::Sender<()>,
    R,
) {
    let (entered_tx, entered) = tokio::sync::oneshot::channel::<R>();
    let mut entered_tx = Some(entered_tx);
    let (release, held) = std::sync::mpsc::channel::<()>();
    let s = store.clone();
    let blocker = tokio::spawn(async move {
        s.write(move |c| {
            let answer = first(c)?;
            if let Some(tx) = entered_tx.take() {
                let _ = tx.send(answer);
            }
            let _ = held.recv_timeout(std::time::Duration::from_secs(30));
            Ok(())
        })
        .await
    });
    let answer = entered.await.expect("the held write ran");
    (blocker, release, answer)
}

/// A webhook of resolved alerts waits for the start lock of each alert's playbooks, so that
/// no claim of the runs it ends is under way; a webhook of firing ones for none.
#[test]
fn a_resolution_waits_for_its_runs_start_locks() {
    let items = |status: AlertStatus| -> Vec<IntakeItem> {
        (0..3)
            .map(|i| IntakeItem {
                deferred: None,
                alert: Alert {
                    status,
                    ..alert(&format!("h{i}"))
                },
                received_us: 0,
                candidates: vec![candidate("p", "t", 0, ""), candidate("q", "t", 0, "")],
            })
            .collect()
    };
    let starts = |items: &[IntakeItem], limits: BreakerLimits| {
        let items: Vec<&IntakeItem> = items.iter().collect();
        (super::intake::intake_locks(&items, limits).into_iter())
            .filter(|l| l.starts_with("reflex.start:"))
            .collect::<Vec<_>>()
    };
    let global = BreakerLimits {
        max_runs: 10,
        ..BreakerLimits::default()
    };
    let fp = |i: u32| alert(&format!("h{i}")).fingerprint;
    let want: Vec<String> = (0..3)
        .flat_map(|i| ["p", "q"].map(|pb| format!("reflex.start:{pb}\u{1f}{}", fp(i))))
        .collect();
    for limits in [BreakerLimits::default(), global] {
        assert_eq!(starts(&items(AlertStatus::Resolved), limits), want);
        assert_eq!(
            starts(&items(AlertStatus::Firing), limits),
            Vec::<String>::new()
        );
    }
}

/// Marks a run executing as `store`'s, as its claim would (the engine ends only runs it
/// holds).
async fn hold_run(store: &Store, run_id: i64) {
    let owner = store.replica().to_string();
    let held = store.write(move |c| {
        c.exec(
            "UPDATE runs SET state = 'running', owner = ?2 WHERE id = ?1",
            &[&run_id, &owner],
        )
    });
    assert_eq!(held.await.unwrap(), 1);
}

async fn intake(store: &Store, instance: &str, cand: Candidate, limits: BreakerLimits) -> Outcome {
    let item = IntakeItem {
        deferred: None,
        alert: alert(instance),
        received_us: 0,
        candidates: vec![cand],
    };
    store
        .record_intake(vec![item], limits)
        .await
        .unwrap()
        .remove(0)
        .remove(0)
}

fn cause(o: &Outcome) -> Option<Hold> {
    match o {
        Outcome::Suppressed { cause, .. } => Some(*cause),
        _ => None,
    }
}

on_both_backends! {
async fn holds_apply_in_order_maintenance_kill_switch_cooldown_breaker(db: TestDb) {
    // Each step a second after the last: the release's new window starts at its millisecond,
    // which a run recorded in the same one would share.
    let clock = std::sync::Arc::new(crate::time::ManualClock::new());
    let store = db.open_with_clock(clock.clone()).await;
    let tick = || clock.advance(std::time::Duration::from_secs(1));
    let none = BreakerLimits::default();
    // A first run starts the cooldown.
    let first = intake(&store, "a", candidate("p", "t", 3_600_000, "k"), none).await;
    assert!(matches!(first, Outcome::Created { .. }), "{first:?}");
    tick();
    store
        .set_switch("global".into(), true, "why".into(), "op".into(), None)
        .await
        .unwrap();
    tick();
    let breaker = BreakerLimits {
        window_ms: 3_600_000,
        max_runs: 1,
        ..Default::default()
    };
    let mut held = candidate("p", "t", 3_600_000, "k");
    held.suppress = Some("maintenance window \"w\"".into());
    let o = intake(&store, "b", held, breaker).await;
    assert_eq!(
        cause(&o),
        Some(Hold::Maintenance),
        "the window comes first: {o:?}"
    );
    let o = intake(&store, "c", candidate("p", "t", 3_600_000, "k"), breaker).await;
    assert_eq!(cause(&o), Some(Hold::KillSwitch), "{o:?}");
    tick();
    store
        .set_switch("global".into(), false, "released".into(), "op".into(), None)
        .await
        .unwrap();
    tick();
    let o = intake(&store, "d", candidate("p", "t", 3_600_000, "k"), breaker).await;
    assert_eq!(cause(&o), Some(Hold::Cooldown), "{o:?}");
    // The release started a new window: the run before it does not count.
    let o = intake(&store, "e", candidate("p", "t", 0, "k"), breaker).await;
    assert!(matches!(o, Outcome::Created { .. }), "{o:?}");
    tick();
    let o = intake(&store, "f", candidate("p", "t", 0, "k"), breaker).await;
    assert_eq!(cause(&o), Some(Hold::Breaker), "{o:?}");
    assert!(
        store.kill_reason("p").await.unwrap().is_some(),
        "the breaker engaged the switch"
    );
}

async fn each_breaker_limit_trips_at_its_count_with_a_typed_trip(db: TestDb) {
    for (limit, limits) in [
        (
            Limit::Runs,
            BreakerLimits {
                window_ms: 600_000,
                max_runs: 3,
                ..Default::default()
            },
        ),
        (
            Limit::RunsPerPlaybook,
            BreakerLimits {
                window_ms: 600_000,
                max_runs_per_playbook: 3,
                ..Default::default()
            },
        ),
        (
            Limit::Targets,
            BreakerLimits {
                window_ms: 600_000,
                max_targets: 3,
                ..Default::default()
            },
        ),
    ] {
        let db = db.fresh();
        let store = db.open().await;
        let mut outcomes = Vec::new();
        for i in 0..4 {
            let target = if limit == Limit::Targets {
                format!("t{i}")
            } else {
                "t".into()
            };
            outcomes.push(
                intake(
                    &store,
                    &format!("h{i}"),
                    candidate("p", &target, 0, ""),
                    limits,
                )
                .await,
            );
        }
        let created = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Created { .. }))
            .count();
        assert_eq!(created, 3, "{limit:?}: {outcomes:?}");
        assert_eq!(cause(&outcomes[3]), Some(Hold::Breaker), "{limit:?}");
        let Outcome::Suppressed { reason, .. } = &outcomes[3] else {
            unreachable!()
        };
        assert!(
            reason.contains(&format!("breaker.{} = 3", limit.key())),
            "{reason}"
        );
    }
    // Failures: counted when runs end failed; the second one trips, and only once.
    let store = db.open().await;
    let limits = BreakerLimits {
        window_ms: 600_000,
        max_failures: 2,
        ..Default::default()
    };
    for i in 0..2 {
        let Outcome::Created { run_id, .. } =
            intake(&store, &format!("f{i}"), candidate("p", "t", 0, ""), limits).await
        else {
            panic!("not created")
        };
        hold_run(&store, run_id).await;
        let trip = store
            .run_finished(run_id, RunState::Failed, Some("x".into()), None, limits, false)
            .await
            .unwrap();
        assert_eq!(trip.is_some(), i == 1, "failure {}: {trip:?}", i + 1);
        if let Some(trip) = trip {
            assert_eq!((trip.limit, trip.count, trip.max), (Limit::Failures, 2, 2));
        }
    }
    let reason = store.kill_reason("p").await.unwrap().expect("engaged");
    assert!(reason.contains("breaker.max_failures = 2"), "{reason}");
    let Outcome::Suppressed { cause, .. } =
        intake(&store, "f3", candidate("p", "t", 0, ""), limits).await
    else {
        panic!("the engaged switch holds the next run")
    };
    assert_eq!(cause, Hold::KillSwitch);
    let third = store
        .run_finished(2, RunState::Failed, Some("x".into()), None, limits, false)
        .await
        .unwrap();
    assert!(third.is_none(), "not tripped again while engaged");
}

async fn a_cooldown_holds_across_a_reopen_of_the_store(db: TestDb) {
    {
        let store = db.open().await;
        let o = intake(
            &store,
            "a",
            candidate("p", "t", 3_600_000, "key"),
            BreakerLimits::default(),
        )
        .await;
        assert!(matches!(o, Outcome::Created { .. }));
    }
    let store = db.open().await;
    let o = intake(
        &store,
        "b",
        candidate("p", "t", 3_600_000, "key"),
        BreakerLimits::default(),
    )
    .await;
    assert_eq!(cause(&o), Some(Hold::Cooldown), "{o:?}");
}

async fn a_cooldown_ends_when_its_time_has_passed(db: TestDb) {
    let clock = std::sync::Arc::new(crate::time::ManualClock::new());
    let store = db.open_with_clock(clock.clone()).await;
    let hour = 3_600_000;
    let none = BreakerLimits::default();
    let o = intake(&store, "a", candidate("p", "t", hour, "k"), none).await;
    assert!(matches!(o, Outcome::Created { .. }), "{o:?}");
    clock.advance(std::time::Duration::from_secs(3599));
    let o = intake(&store, "b", candidate("p", "t", hour, "k"), none).await;
    assert_eq!(
        cause(&o),
        Some(Hold::Cooldown),
        "a second before the end: {o:?}"
    );
    clock.advance(std::time::Duration::from_secs(2));
    let o = intake(&store, "c", candidate("p", "t", hour, "k"), none).await;
    assert!(matches!(o, Outcome::Created { .. }), "after it: {o:?}");
}

async fn a_new_occurrence_joins_a_queued_run_and_takes_its_data(db: TestDb) {
    let store = db.open().await;
    let none = BreakerLimits::default();
    let occurrence = |starts_at: &str, target: &str| {
        let mut a = alert("h1");
        a.starts_at = starts_at.into();
        let mut c = candidate("p", target, 0, "");
        c.coalesce = true;
        (a, c)
    };
    let record = |(alert, cand): (Alert, Candidate)| {
        let store = store.clone();
        async move {
            let item = IntakeItem {
                deferred: None,
                alert,
                received_us: 0,
                candidates: vec![cand],
            };
            store
                .record_intake(vec![item], none)
                .await
                .unwrap()
                .remove(0)
                .remove(0)
        }
    };
    let Outcome::Created { run_id, .. } = record(occurrence("t1", "first")).await else {
        panic!("first occurrence not created")
    };
    let joined = record(occurrence("t2", "second")).await;
    assert!(
        matches!(joined, Outcome::Coalesced { run_id: r, .. } if r == run_id),
        "{joined:?}"
    );
    let run = store.get_run(run_id).await.unwrap().unwrap();
    assert_eq!(
        (run.state.as_str(), run.target.as_str()),
        ("pending", "second"),
        "the newest data"
    );
    assert_eq!(run.alert.starts_at, "t2");
    // Re-deliveries of either occurrence are deduplicated, not queued.
    for again in ["t1", "t2"] {
        let o = record(occurrence(again, "x")).await;
        assert!(matches!(o, Outcome::Deduplicated { .. }), "{again}: {o:?}");
    }
    let pending = store
        .list_runs(RunFilter {
            state: Some(RunState::Pending),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(pending.len(), 1, "one queued run");
    // A playbook that opts out queues a second run.
    let (a, mut c) = occurrence("t3", "third");
    c.coalesce = false;
    let o = record((a, c)).await;
    assert!(matches!(o, Outcome::Created { .. }), "{o:?}");
}

}

/// A target's pending and running counts.
type Load = Vec<(String, i64, i64)>;

/// Each target with live runs: how many pending and how many running.
async fn live(store: &Store) -> Load {
    store
        .read(|c| {
            c.rows(
                "SELECT target, count(*) FILTER (WHERE state = 'pending'),
                   count(*) FILTER (WHERE state = 'running') FROM runs
                 WHERE state IN ('pending', 'running') GROUP BY target ORDER BY target",
                &[],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
        })
        .await
        .unwrap()
}

on_both_backends! {
async fn a_backlog_on_a_busy_target_does_not_hold_back_a_free_one(db: TestDb) {
    let store = db.open().await;
    let none = BreakerLimits::default();
    for i in 0..50 {
        intake(
            &store,
            &format!("busy-{i}"),
            candidate("p", "busy", 0, ""),
            none,
        )
        .await;
    }
    let Outcome::Created { run_id: free, .. } =
        intake(&store, "free-0", candidate("p", "free", 0, ""), none).await
    else {
        panic!("not created")
    };
    let first = store.claim(1, 10).await.unwrap();
    let claimed: Vec<(i64, String)> = first.iter().map(|r| (r.id, r.target.clone())).collect();
    assert_eq!(claimed.len(), 2, "one per target: {claimed:?}");
    assert_eq!(claimed[0], (1, "busy".to_string()), "the oldest first");
    assert_eq!(
        claimed[1],
        (free, "free".to_string()),
        "the free target is not held back"
    );
    assert_eq!(live(&store).await, vec![("busy".into(), 49, 1), ("free".into(), 0, 1)]);
    // Nothing more while both targets are busy; the next busy run once its slot frees.
    assert!(store.claim(1, 10).await.unwrap().is_empty());
    store
        .run_finished(1, RunState::Succeeded, None, None, BreakerLimits::default(), false)
        .await
        .unwrap();
    store
        .run_finished(
            free,
            RunState::Succeeded,
            None,
            None,
            BreakerLimits::default(), false,
        )
        .await
        .unwrap();
    let next = store.claim(1, 10).await.unwrap();
    assert_eq!(next.iter().map(|r| r.id).collect::<Vec<_>>(), vec![2]);
    assert_eq!(live(&store).await, vec![("busy".into(), 48, 1)]);
}

}

on_both_backends! {
async fn a_runs_end_and_its_request_for_approval_are_kept_until_told(db: TestDb) {
    let store = db.open().await;
    let none = BreakerLimits::default();
    for i in 0..5 {
        intake(&store, &format!("m{i}"), candidate("p", &format!("t{i}"), 0, ""), none).await;
    }
    let runs = store.claim(1, 5).await.unwrap();
    assert_eq!(runs.len(), 5);
    let message = |n: i64| EndMessage {
        summary: format!("Space reclaimed: {n} GB"),
        report: (n == 3).then(|| "the playbook's words".to_string()),
    };
    let end = |id: i64| Untold::End { run_id: id, message: message(id) };
    for id in 1..=3 {
        store
            .run_finished_telling(id, RunState::Succeeded, None, None, none, false, Some(message(id)))
            .await
            .unwrap();
    }
    // An end without a message to keep (no sink shows it) keeps nothing; the end is recorded
    // either way.
    store.run_finished(4, RunState::Succeeded, None, None, none, false).await.unwrap();
    assert_eq!(store.get_run(1).await.unwrap().unwrap().state, RunState::Succeeded);
    // A request for approval is kept as the run parks, when asked to.
    let gate = || crate::playbook::Gate {
        scope: crate::playbook::spec::GateScope::Step,
        count: 1,
        expires_ms: 3_600_000,
        approvers: Vec::new(),
    };
    let (asked, _) = (store.park_for_approval(5, 0, gate(), serde_json::json!({}), "h".into(), true))
        .await
        .unwrap();
    store.told(end(2)).await.unwrap();
    // The told of an earlier request of the run (since replaced by this one) leaves this one.
    store.told(Untold::Ask { run_id: 5, approval_id: asked + 100 }).await.unwrap();
    let left = store.untold().await.unwrap();
    assert_eq!(
        left,
        vec![end(1), end(3), Untold::Ask { run_id: 5, approval_id: asked }],
        "what was told is gone, the rest is left, in run order"
    );
    for u in left {
        store.told(u).await.unwrap();
    }
    assert!(store.untold().await.unwrap().is_empty());
    // A NUL from the world (PostgreSQL refuses one) cannot take the run's end with it.
    intake(&store, "m5", candidate("p", "t5", 0, ""), none).await;
    let nul = store.claim(1, 1).await.unwrap()[0].id;
    let told = EndMessage { summary: "a\0b".into(), report: Some("c\0".into()) };
    store
        .run_finished_telling(nul, RunState::Succeeded, None, None, none, false, Some(told))
        .await
        .unwrap();
    assert_eq!(store.get_run(nul).await.unwrap().unwrap().state, RunState::Succeeded);
    let stored = EndMessage { summary: "a\u{fffd}b".into(), report: Some("c\u{fffd}".into()) };
    assert_eq!(store.untold().await.unwrap(), vec![Untold::End { run_id: nul, message: stored }]);
    // Retention deletes a kept message with its run.
    let far = store.now_ms() + 3_600_000;
    store.prune_batch(far, 0, 100, false).await.unwrap();
    assert!(store.untold().await.unwrap().is_empty());
}

}

/// What `claim(max, limit)` takes from a queue (run id to target) with `running` runs executing
/// per target: rounds of the oldest head of each target with room, one per target a round,
/// another round only where one can find more.
fn expected_claim(
    pending: &mut std::collections::BTreeMap<i64, String>,
    running: &mut std::collections::HashMap<String, u32>,
    max: u32,
    limit: usize,
) -> Vec<i64> {
    let mut out = Vec::new();
    while out.len() < limit {
        let want = limit - out.len();
        let mut seen = std::collections::HashSet::new();
        let heads: Vec<(i64, String)> = (pending.iter())
            .filter(|(_, t)| seen.insert(t.to_string()))
            .filter(|(_, t)| running.get(*t).copied().unwrap_or(0) < max)
            .take(want)
            .map(|(id, t)| (*id, t.clone()))
            .collect();
        for (id, target) in &heads {
            pending.remove(id);
            *running.entry(target.clone()).or_default() += 1;
            out.push(*id);
        }
        if heads.is_empty() || !(max > 1 || heads.len() == want) {
            break;
        }
    }
    out
}

on_both_backends! {
async fn claims_take_the_oldest_heads_that_may_start_whatever_the_queue_spans(db: TestDb) {
    let store = db.open().await;
    let none = BreakerLimits::default();
    // 400 runs over 60 targets in a scattered order, with a backlog of one busy target in the
    // middle and every ninth run on it: claims whose oldest runs hold enough heads, and
    // claims whose oldest runs wait behind the busy target.
    let target = |i: usize| match (100..160).contains(&i) || i.is_multiple_of(9) {
        true => "busy".to_string(),
        false => format!("t{}", (i * 37) % 60),
    };
    let items = (0..400)
        .map(|i| IntakeItem {
            deferred: None,
            alert: alert(&format!("h{i}")),
            received_us: 0,
            candidates: vec![candidate("p", &target(i), 0, "")],
        })
        .collect();
    store.record_intake(items, none).await.unwrap();
    let mut pending: std::collections::BTreeMap<i64, String> = store
        .read(|c| c.rows("SELECT id, target FROM runs WHERE state = 'pending'", &[], |r| Ok((r.get(0)?, r.get(1)?))))
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(pending.len(), 400);
    let mut running = std::collections::HashMap::new();
    let mut executing: Vec<(i64, String)> = Vec::new();
    let mut round = 0;
    while !pending.is_empty() {
        round += 1;
        assert!(round < 500, "the queue does not drain");
        let max = 1 + (round % 2) as u32;
        let limit = [1, 3, 17, 64, 2][round % 5];
        let expected = expected_claim(&mut pending, &mut running, max, limit);
        // As the engine does every 2 s: on a loaded machine this test outlasts the 7 s a
        // replica trusts its lease for, and a replica without one claims nothing.
        store.renew_lease().await.unwrap();
        let claimed = store.claim(max, limit).await.unwrap();
        let got: Vec<i64> = claimed.iter().map(|r| r.id).collect();
        assert_eq!(got, expected, "round {round}: claim({max}, {limit})");
        executing.extend(claimed.into_iter().map(|r| (r.id, r.target)));
        // The older half of what executes ends.
        for (id, target) in executing.drain(..executing.len().div_ceil(2)).collect::<Vec<_>>() {
            store.run_finished(id, RunState::Succeeded, None, None, none, false).await.unwrap();
            *running.get_mut(&target).unwrap() -= 1;
        }
    }
    assert!(live(&store).await.is_empty());
}
}

on_both_backends! {
async fn a_playbooks_concurrency_limit_holds_at_intake_and_at_claim(db: TestDb) {
    let store = db.open().await;
    let none = BreakerLimits::default();
    let limited = |target: &str| {
        let mut c = candidate("limited", target, 0, "");
        if let Ok(plan) = c.plan.as_mut() {
            plan.concurrency = 2;
        }
        c
    };
    // Intake starts runs on free targets while the playbook has room: two, then none.
    let start = StartNow { slots: 10, max_per_target: 1 };
    let mut started = Vec::new();
    for i in 0..4 {
        let item = IntakeItem {
            deferred: None,
            alert: alert(&format!("h{i}")),
            received_us: 0,
            candidates: vec![limited(&format!("t{i}")), candidate("free", &format!("u{i}"), 0, "")],
        };
        let recorded = store.record_and_start(vec![item], none, start).await.unwrap();
        started.extend(recorded.started.into_iter().map(|r| (r.playbook, r.target)));
    }
    let of = |name: &str| started.iter().filter(|(p, _)| p == name).count();
    assert_eq!((of("limited"), of("free")), (2, 4), "{started:?}");
    // The dispatcher does not claim past the limit either, and claims the next once a run ends.
    assert!(store.claim(1, 10).await.unwrap().is_empty());
    let running: Vec<i64> = store
        .read(|c| c.rows("SELECT id FROM runs WHERE playbook = 'limited' AND state = 'running' ORDER BY id", &[], |r| r.get(0)))
        .await
        .unwrap();
    assert_eq!(running.len(), 2);
    store.run_finished(running[0], RunState::Succeeded, None, None, none, false).await.unwrap();
    let next = store.claim(1, 10).await.unwrap();
    assert_eq!(next.iter().map(|r| r.playbook.as_str()).collect::<Vec<_>>(), vec!["limited"]);
    assert!(store.claim(1, 10).await.unwrap().is_empty(), "at the limit again");
}
}

/// Writes `n` rows of 8 KiB, each in its own commit, into a scratch table.
async fn write_blobs(store: &Store, n: usize) {
    store
        .write(|c| {
            c.exec("CREATE TABLE IF NOT EXISTS scratch (b BLOB)", &[])
                .map(drop)
        })
        .await
        .unwrap();
    for _ in 0..n {
        store
            .write(|c| {
                c.exec("INSERT INTO scratch (b) VALUES (zeroblob(8192))", &[])?;
                Ok(())
            })
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn the_wal_is_checkpointed_off_the_writer_and_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let wal = dir.path().join("reflex.db-wal");
    // 16 MiB of pages through the WAL: without rewinds it would hold them all.
    write_blobs(&store, 2000).await;
    let size = std::fs::metadata(&wal).unwrap().len();
    assert!(size < 4 << 20, "the WAL grew to {size} bytes");
    // The pages reached the database file itself: it alone (without its WAL) has the rows.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let copy = tempfile::tempdir().unwrap();
    loop {
        std::fs::copy(dir.path().join("reflex.db"), copy.path().join("reflex.db")).unwrap();
        let c = rusqlite::Connection::open(copy.path().join("reflex.db")).unwrap();
        let rows: Option<i64> = c
            .query_row("SELECT count(*) FROM scratch", [], |r| r.get(0))
            .ok();
        if rows.is_some_and(|n| n > 1000) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was checkpointed: {rows:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_clean_stop_leaves_the_database_file_complete() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    write_blobs(&store, 10).await;
    drop(store);
    // The last connection to close (the checkpointer's, once the writer has gone) copies the
    // WAL back and removes it.
    let wal = dir.path().join("reflex.db-wal");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while wal.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the WAL was never emptied"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let c = rusqlite::Connection::open(dir.path().join("reflex.db")).unwrap();
    let rows: i64 = c
        .query_row("SELECT count(*) FROM scratch", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 10);
}

/// What the writer's connection says of each SQLite statement it ran since the last call:
/// how often it was compiled again, and whether it builds a temporary table as it runs.
struct Ran {
    sql: String,
    compiled_again: i32,
    temporary_table: bool,
    /// `EXPLAIN QUERY PLAN`'s details, one a line.
    plan: Vec<String>,
}

impl std::fmt::Debug for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let (again, table) = (self.compiled_again, self.temporary_table);
        write!(
            f,
            "{} (compiled again {again}x, temporary table: {table}, plan: {:?})",
            self.sql, self.plan
        )
    }
}

async fn statements_ran(store: &Store) -> Vec<Ran> {
    store
        .write(|c| {
            let Db::Lite(conn) = c else {
                unreachable!("SQLite")
            };
            let ran = super::db::RAN.take();
            (ran.into_iter())
                .map(|sql| {
                    let compiled_again = (conn.prepare_cached(&sql)?)
                        .get_status(rusqlite::StatementStatus::RePrepare);
                    let mut explain = conn.prepare(&format!("EXPLAIN {sql}"))?;
                    let nulls = vec![rusqlite::types::Value::Null; explain.parameter_count()];
                    let opcodes = explain
                        .query_map(rusqlite::params_from_iter(nulls.clone()), |r| {
                            r.get::<_, String>(1)
                        })?
                        .collect::<Result<Vec<_>, _>>()?;
                    let mut explain = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                    let plan = explain
                        .query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3))?
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(Ran {
                        temporary_table: opcodes.iter().any(|o| o == "OpenEphemeral"),
                        plan,
                        sql,
                        compiled_again,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()
        })
        .await
        .unwrap()
}

fn done(run: &ClaimedRun) -> StepResult {
    StepResult {
        step: StepRef {
            run_id: run.id,
            idx: 0,
            action: Action::Log,
            target: run.target.clone(),
        },
        state: StepState::Succeeded,
        output: None,
        error: None,
    }
}

/// The writer's statements cost what their indexes say, however many alerts come: each is
/// compiled once per connection, not once per alert (SQLite re-plans a statement whose plan
/// depended on a bound value when rusqlite clears its bindings: the coalescing query was, at a
/// seventh of the writer's time under load), and the path of a run started at intake and
/// ended builds no temporary table (`RETURNING`, `IN` lists of three, `ORDER BY` did).
#[tokio::test]
async fn the_writers_statements_are_compiled_once_and_the_hot_path_builds_no_temporary_table() {
    let db = TestDb::sqlite();
    let store = db.open().await;
    let none = BreakerLimits::default();
    let start = StartNow {
        slots: 1,
        max_per_target: 1,
    };
    let item = |alert, candidate| IntakeItem {
        deferred: None,
        alert,
        received_us: 0,
        candidates: vec![candidate],
    };
    statements_ran(&store).await;
    // The distinct-alert path: started at intake (with a cooldown and coalescing on), ended.
    for i in 0..20 {
        let mut now = candidate("p", &format!("t{i}"), 3_600_000, &format!("k{i}"));
        now.coalesce = true;
        let started =
            (store.record_and_start(vec![item(alert(&format!("a{i}")), now)], none, start))
                .await
                .unwrap()
                .started;
        assert_eq!(started.len(), 1);
        let run = &started[0];
        (store.run_finished(
            run.id,
            RunState::Succeeded,
            None,
            Some(done(run)),
            none,
            false,
        ))
        .await
        .unwrap();
    }
    let hot = statements_ran(&store).await;
    assert!(hot.len() > 5, "the workload ran: {hot:#?}");
    let costly: Vec<_> = (hot.iter())
        .filter(|r| r.compiled_again > 0 || r.temporary_table)
        .collect();
    assert!(costly.is_empty(), "{costly:#?}");
    // Queued behind a busy target, joined by new occurrences, claimed and ended.
    for i in 0..20 {
        let mut queued = candidate("q", "busy", 0, "");
        queued.coalesce = true;
        let mut occurrence = alert("busy");
        occurrence.starts_at = format!("2026-11-23T00:00:{i:02}Z");
        (store.record_intake(vec![item(occurrence, queued)], none))
            .await
            .unwrap();
        for run in store.claim(1, 10).await.unwrap() {
            store.step_started_after(run.id, 0, None).await.unwrap();
            (store.run_finished(
                run.id,
                RunState::Succeeded,
                None,
                Some(done(&run)),
                none,
                false,
            ))
            .await
            .unwrap();
        }
    }
    let queued = statements_ran(&store).await;
    let again: Vec<_> = queued.iter().filter(|r| r.compiled_again > 0).collect();
    assert!(again.is_empty(), "compiled again: {again:#?}");
    // A queue whose oldest runs wait behind a full target: the claim lists heads by target.
    for i in 0..50 {
        let waiting = candidate("w", "full", 0, "");
        (store.record_intake(vec![item(alert(&format!("full-{i}")), waiting)], none))
            .await
            .unwrap();
    }
    assert_eq!(
        store.claim(1, 1).await.unwrap().len(),
        1,
        "the full target's first"
    );
    let free = candidate("w", "free", 0, "");
    (store.record_intake(vec![item(alert("free"), free)], none))
        .await
        .unwrap();
    let claimed = store.claim(1, 1).await.unwrap();
    assert_eq!(
        claimed[0].target, "free",
        "found past the full target's queue"
    );
    let listed = statements_ran(&store).await;
    assert!(
        listed.iter().any(|r| r.sql.contains("WITH RECURSIVE")),
        "the listing by target ran: {listed:#?}"
    );
    // The queue's rules count a target's runs in the indexes of live runs, never through a
    // target's whole history (`runs_target`), and nothing scans a table.
    let history: Vec<_> = (hot.iter().chain(&queued).chain(&listed))
        .filter(|r| r.plan.iter().any(|l| l.contains("runs_target")) || scans_a_table(&r.plan))
        .collect();
    assert!(history.is_empty(), "{history:#?}");
}

/// Whether an `EXPLAIN QUERY PLAN` scans a table whole: a `SCAN` without an index of a name
/// that is neither a constant row nor one the plan made itself (a `MATERIALIZE`d or
/// `CO-ROUTINE` subquery; a table's alias otherwise).
fn scans_a_table(plan: &[String]) -> bool {
    let made: Vec<&str> = (plan.iter())
        .filter_map(|l| (l.strip_prefix("MATERIALIZE ")).or_else(|| l.strip_prefix("CO-ROUTINE ")))
        .collect();
    (plan.iter().filter_map(|l| l.strip_prefix("SCAN "))).any(|scan| {
        let name = scan.split(' ').next().unwrap_or_default();
        scan != "CONSTANT ROW" && !made.contains(&name) && !scan.contains("INDEX")
    })
}

/// On a new database every index of the runs is a page, and PostgreSQL's planner found a scan
/// of any partial index of the runs executing as cheap as a lookup: it kept a plan that
/// walked every running run of the playbook for each alert (and for each target's count),
/// and it kept it through a storm. Each index now serves lookups by its key only.
#[tokio::test]
async fn a_new_databases_intake_looks_runs_up_by_their_keys_on_postgres() {
    let db = TestDb::postgres();
    let store = db.open().await;
    let plan: Vec<String> = store
        .read(|c| {
            c.rows(
                &format!("EXPLAIN {}", *super::intake::MAY_START),
                &[&1i64, &"host-1", &"p", &"fp-1"],
                |r| r.get(0),
            )
        })
        .await
        .unwrap();
    let plan = plan.join("\n");
    for lookup in [
        "using runs_running on runs r",
        "using runs_pending_target on runs q",
        "using runs_running_alert on runs o",
    ] {
        assert!(plan.contains(lookup), "{lookup}: {plan}");
    }
    assert_eq!(
        plan.matches("Index Cond").count(),
        3,
        "three lookups: {plan}"
    );
    assert!(!plan.contains("runs_running_playbook"), "{plan}");
}

/// Two or three replicas on one PostgreSQL database, each its own [`Store`] (its own pool,
/// writer, listener and lease), as separate processes would be.
mod replicas {
    use super::*;
    use std::collections::HashSet;

    async fn replicas(n: usize) -> (TestDb, Vec<Store>) {
        let db = TestDb::postgres();
        let mut stores = Vec::new();
        for _ in 0..n {
            stores.push(db.open().await);
        }
        (db, stores)
    }

    /// One replica with `n` writer connections, as `n` handles: what they write at once goes
    /// through different writers.
    async fn writers(n: u32) -> (TestDb, Vec<Store>) {
        let db = TestDb::postgres();
        let clock = std::sync::Arc::new(crate::time::SystemClock);
        let store = db.open_with(clock, n).await;
        (db, (0..n).map(|_| store.clone()).collect())
    }

    /// An approval gate on the whole run, by `count` approvers, for an hour.
    fn run_gate(count: u32) -> crate::playbook::Gate {
        crate::playbook::Gate {
            scope: crate::playbook::spec::GateScope::Run,
            count,
            expires_ms: 3_600_000,
            approvers: Vec::new(),
        }
    }

    /// A run's state now.
    async fn state_of(store: &Store, run_id: i64) -> RunState {
        let state = store.read(move |c| {
            c.one("SELECT state FROM runs WHERE id = ?1", &[&run_id], |r| {
                r.get(0)
            })
        });
        state.await.unwrap()
    }

    /// What the database's sessions wait for (`wait_event`: `advisory`, `transactionid`...),
    /// once one waits for a lock or `task` has ended (at most 30 s).
    async fn lock_waits<T>(store: &Store, task: &tokio::task::JoinHandle<T>) -> Vec<String> {
        let waiting = || {
            store.read(|c| {
                c.rows(
                    "SELECT wait_event FROM pg_stat_activity
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                    |r| r.get::<String>(0),
                )
            })
        };
        let mut waits = Vec::new();
        for _ in 0..3000 {
            waits = waiting().await.unwrap();
            if !waits.is_empty() || task.is_finished() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        waits
    }

    /// Runs executing on `target` now.
    async fn running_on(store: &Store, target: &str) -> i64 {
        let target = target.to_string();
        store
            .read(move |c| {
                c.one(
                    "SELECT count(*) FROM runs WHERE state = 'running' AND target = ?1",
                    &[&target],
                    |r| r.get(0),
                )
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn two_replicas_claim_each_run_once_and_keep_the_per_target_limit() {
        let (_db, stores) = replicas(2).await;
        claim_each_run_once_and_keep_the_per_target_limit(stores).await;
    }

    #[tokio::test]
    async fn two_writers_of_one_replica_claim_each_run_once_and_keep_the_per_target_limit() {
        let (_db, stores) = writers(2).await;
        claim_each_run_once_and_keep_the_per_target_limit(stores).await;
    }

    async fn claim_each_run_once_and_keep_the_per_target_limit(stores: Vec<Store>) {
        let none = BreakerLimits::default();
        let total = 120;
        for i in 0..total {
            let target = format!("t{}", i % 6);
            let o = intake(
                &stores[i % 2],
                &format!("h{i}"),
                candidate("p", &target, 0, ""),
                none,
            )
            .await;
            assert!(matches!(o, Outcome::Created { .. }), "{o:?}");
        }
        let claimed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for store in stores.clone() {
            let claimed = claimed.clone();
            tasks.push(tokio::spawn(async move {
                let mut idle = 0;
                while idle < 20 {
                    let runs = store.claim(1, 4).await.unwrap();
                    if runs.is_empty() {
                        idle += 1;
                        tokio::task::yield_now().await;
                        continue;
                    }
                    idle = 0;
                    for run in runs {
                        let now = running_on(&store, &run.target).await;
                        assert!(now <= 1, "target {} runs {now} at once", run.target);
                        claimed.lock().unwrap().push(run.id);
                        store
                            .run_finished(run.id, RunState::Succeeded, None, None, none, false)
                            .await
                            .unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let claimed = claimed.lock().unwrap().clone();
        let distinct: HashSet<i64> = claimed.iter().copied().collect();
        assert_eq!(distinct.len(), claimed.len(), "a run claimed twice");
        assert_eq!(distinct.len(), total, "every run claimed");
        let left = live(&stores[0]).await;
        assert!(left.is_empty(), "nothing live is left: {left:?}");
    }

    #[tokio::test]
    async fn the_same_occurrence_on_two_replicas_at_once_is_one_run() {
        let (_db, stores) = replicas(2).await;
        the_same_occurrence_twice_at_once_is_one_run(stores).await;
    }

    #[tokio::test]
    async fn the_same_occurrence_through_two_writers_at_once_is_one_run() {
        let (_db, stores) = writers(2).await;
        the_same_occurrence_twice_at_once_is_one_run(stores).await;
    }

    async fn the_same_occurrence_twice_at_once_is_one_run(stores: Vec<Store>) {
        for round in 0..20 {
            let instance = format!("same-{round}");
            let none = BreakerLimits::default();
            let (a, b) = tokio::join!(
                intake(&stores[0], &instance, candidate("p", "t", 0, ""), none),
                intake(&stores[1], &instance, candidate("p", "t", 0, ""), none),
            );
            let created = [&a, &b]
                .iter()
                .filter(|o| matches!(o, Outcome::Created { .. }))
                .count();
            assert_eq!(created, 1, "{a:?} {b:?}");
            assert_eq!(a.run_id(), b.run_id(), "both name the one run");
        }
    }

    /// A claim of the oldest run on `store`, its transaction held open until the sender is
    /// sent to (see [`hold_writer_in`]): as a replica mid-claim. Returns once it is claimed.
    async fn hold_claim(
        store: &Store,
    ) -> (
        tokio::task::JoinHandle<Result<(), StoreError>>,
        std::sync::mpsc::Sender<()>,
    ) {
        let now = store.now_ms();
        let (holder, go, claimed) = hold_writer_in(store, move |c| {
            Ok(crate::store::queue::claim_some(c, 1, 1, now, "holder")?.len())
        })
        .await;
        assert_eq!(claimed, 1, "the holder claims a run");
        (holder, go)
    }

    /// An occurrence of alert `x` (the `n`th), for playbook `p` on `target`.
    fn occurrence(n: u32, target: &str, coalesce: bool) -> IntakeItem {
        IntakeItem {
            deferred: None,
            alert: Alert {
                starts_at: format!("2026-12-06T00:00:0{n}Z"),
                ..alert("x")
            },
            received_us: 0,
            candidates: vec![Candidate {
                coalesce,
                ..candidate("p", target, 0, "")
            }],
        }
    }

    /// A run queued for an alert is being claimed by one replica when a new occurrence of the
    /// alert comes to another. It does not join the run (whose alert, target and steps it
    /// would rewrite under the executing replica): a run of its own is queued behind it.
    #[tokio::test]
    async fn a_new_occurrence_does_not_join_a_run_another_replica_is_claiming() {
        let (_db, stores) = replicas(2).await;
        let none = BreakerLimits::default();
        let first = (stores[0].record_intake(vec![occurrence(1, "t1", true)], none))
            .await
            .unwrap();
        let Outcome::Created { run_id: queued, .. } = first[0][0] else {
            panic!("{first:?}")
        };
        let (holder, go) = hold_claim(&stores[0]).await;
        let second = (stores[1].record_intake(vec![occurrence(2, "t2", true)], none))
            .await
            .unwrap();
        let _ = go.send(());
        holder.await.unwrap().unwrap();
        let Outcome::Created { run_id: own, .. } = second[0][0] else {
            panic!("joined the run being claimed: {second:?}")
        };
        let runs: Vec<(i64, RunState, String, String)> = (stores[1].read(|c| {
            c.rows(
                "SELECT r.id, r.state, r.target, a.starts_at FROM runs r
                 JOIN alerts a ON a.id = r.alert_id ORDER BY r.id",
                &[],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
        }))
        .await
        .unwrap();
        let at = |n: u32| format!("2026-12-06T00:00:0{n}Z");
        assert_eq!(
            runs,
            vec![
                (queued, RunState::Running, "t1".into(), at(1)),
                (own, RunState::Pending, "t2".into(), at(2)),
            ]
        );
        // With no claim under way, the next occurrence joins the run that waits.
        let third = (stores[1].record_intake(vec![occurrence(3, "t3", true)], none))
            .await
            .unwrap();
        assert!(
            matches!(third[0][0], Outcome::Coalesced { run_id, .. } if run_id == own),
            "{third:?}"
        );
    }

    /// An alert resolves on one replica while another is claiming its queued run (its claim's
    /// transaction not yet committed). The resolution waits for the claim, then marks the run
    /// that now executes, to stop before its next step: it does not record it as resolved
    /// with nothing done while its first step acts, nor free its target for another run.
    /// For the alert's own playbook it waits for the lock the run was claimed under, before
    /// it reads the run; for a playbook that no longer takes the alert, for the run's row.
    async fn a_resolution_during_a_claim_marks_the_run(playbook: &str, waits_for: &str) {
        let (_db, stores) = replicas(2).await;
        let none = BreakerLimits::default();
        let first = (stores[0].record_intake(vec![occurrence(1, "t1", false)], none))
            .await
            .unwrap();
        let Outcome::Created { run_id, .. } = first[0][0] else {
            panic!("{first:?}")
        };
        let (holder, go) = hold_claim(&stores[0]).await;
        let mut resolved = occurrence(1, "t1", false);
        resolved.alert.status = AlertStatus::Resolved;
        resolved.candidates[0].playbook = playbook.into();
        let other = stores[1].clone();
        let resolution =
            tokio::spawn(async move { other.record_intake(vec![resolved], none).await });
        let waits = lock_waits(&stores[0], &resolution).await;
        let _ = go.send(());
        holder.await.unwrap().unwrap();
        let outcomes = resolution.await.unwrap().unwrap();
        assert_eq!(
            waits,
            vec![waits_for.to_string()],
            "what the resolution waited for"
        );
        assert!(
            !(outcomes.iter().flatten()).any(|o| o.run_id() == run_id),
            "the run being claimed is not reported ended: {outcomes:?}"
        );
        let state = state_of(&stores[1], run_id).await;
        assert_eq!(state, RunState::Running, "the claim stands");
        assert!(
            stores[1].resolved_while_running(run_id).await.unwrap(),
            "the run stops before its next step"
        );
    }

    #[tokio::test]
    async fn a_resolution_waits_for_the_claim_of_its_alerts_run_and_marks_it() {
        a_resolution_during_a_claim_marks_the_run("p", "advisory").await;
    }

    #[tokio::test]
    async fn a_resolution_marks_a_run_claimed_meanwhile_of_a_playbook_it_no_longer_matches() {
        a_resolution_during_a_claim_marks_the_run("q", "transactionid").await;
    }

    /// A claim takes a head under the locks of the alert it listed. Should the target's head
    /// have changed since (the listed run ended, another alert's run is now first), it claims
    /// nothing: it does not hold that alert's lock, and another replica may be starting a
    /// run of it elsewhere.
    #[tokio::test]
    async fn a_claim_takes_only_the_alert_it_locked_when_its_target_head_changed() {
        let (_db, stores) = replicas(1).await;
        let store = &stores[0];
        let none = BreakerLimits::default();
        let first = intake(store, "a", candidate("p", "t", 0, ""), none).await;
        let second = intake(store, "b", candidate("p", "t", 0, ""), none).await;
        (store.write(move |c| {
            c.exec(
                "UPDATE runs SET state = 'cancelled' WHERE id = ?1",
                &[&first.run_id()],
            )
        }))
        .await
        .unwrap();
        let claim = |fingerprint: String| {
            let now = store.now_ms();
            store.write(move |c| {
                let head = crate::store::queue::Head {
                    target: "t".into(),
                    playbook: "p".into(),
                    concurrency: 0,
                    fingerprint: fingerprint.clone(),
                };
                let claimed = crate::store::queue::claim_heads(c, &[head], &1, &now, &"r")?;
                Ok(claimed.len())
            })
        };
        let listed = alert("a").fingerprint;
        assert_eq!(
            claim(listed).await.unwrap(),
            0,
            "the head is another alert's now"
        );
        assert_eq!(claim(alert("b").fingerprint).await.unwrap(), 1);
        let running: Vec<i64> = (store.read(|c| {
            c.rows("SELECT id FROM runs WHERE state = 'running'", &[], |r| {
                r.get(0)
            })
        }))
        .await
        .unwrap();
        assert_eq!(running, vec![second.run_id()]);
    }

    /// Three runs of one playbook for one alert (three occurrences), each on a target of its
    /// own. While one replica is claiming the first, its transaction not yet committed, the
    /// other neither claims the second nor starts the third at intake: its run would not be
    /// `running` for them to see, so the rule of one run of a playbook for an alert at a time
    /// holds by the lock a run starts under. Once the first runs, the others wait for it
    /// to end, then start one at a time.
    #[tokio::test]
    async fn a_run_being_claimed_keeps_the_others_of_its_playbook_and_alert_from_starting() {
        let (_db, stores) = replicas(2).await;
        let none = BreakerLimits::default();
        let queued = (stores[0])
            .record_intake(
                vec![occurrence(1, "t1", false), occurrence(2, "t2", false)],
                none,
            )
            .await
            .unwrap();
        assert!(
            queued
                .iter()
                .flatten()
                .all(|o| matches!(o, Outcome::Created { .. })),
            "{queued:?}"
        );
        let (holder, go) = hold_claim(&stores[0]).await;
        let other = &stores[1];
        let claimed = other.claim(1, 4).await.unwrap();
        assert!(claimed.is_empty(), "claimed alongside: {claimed:?}");
        let start = StartNow {
            slots: 4,
            max_per_target: 1,
        };
        // The default breaker's limits span playbooks: intake then holds one lock for all
        // intake, none for the alert, and still may not start this run.
        let spanning = BreakerLimits {
            window_ms: 600_000,
            max_runs: 1_000,
            ..Default::default()
        };
        let third = (other.record_and_start(vec![occurrence(3, "t3", false)], spanning, start))
            .await
            .unwrap();
        assert!(
            third.started.is_empty(),
            "started alongside: {:?}",
            third.outcomes
        );
        let _ = go.send(());
        holder.await.unwrap().unwrap();
        let running = |store: &Store| {
            let store = store.clone();
            async move {
                (store.read(|c| {
                    c.rows(
                        "SELECT id FROM runs WHERE state = 'running' ORDER BY id",
                        &[],
                        |r| r.get::<i64>(0),
                    )
                }))
                .await
                .unwrap()
            }
        };
        let first = running(other).await;
        assert_eq!(first.len(), 1, "{first:?}");
        assert!(
            other.claim(1, 4).await.unwrap().is_empty(),
            "the first runs"
        );
        // The holder's run ends.
        let (id, now) = (first[0], other.now_ms());
        (other.write(move |c| {
            crate::store::lifecycle::finish_run(c, id, RunState::Succeeded, None, now)
        }))
        .await
        .unwrap();
        let next = other.claim(1, 4).await.unwrap();
        assert_eq!(next.len(), 1, "one at a time: {next:?}");
        assert_eq!(running(other).await, vec![next[0].id]);
    }

    #[tokio::test]
    async fn a_cooldown_holds_across_replicas() {
        let (_db, stores) = replicas(2).await;
        let none = BreakerLimits::default();
        let hour = 3_600_000;
        let (a, b) = tokio::join!(
            intake(&stores[0], "a", candidate("p", "t", hour, "key"), none),
            intake(&stores[1], "b", candidate("p", "t", hour, "key"), none),
        );
        let held = [&a, &b]
            .iter()
            .filter(|o| cause(o) == Some(Hold::Cooldown))
            .count();
        assert_eq!(
            held, 1,
            "one runs, the other is in its cooldown: {a:?} {b:?}"
        );
    }

    #[tokio::test]
    async fn the_breaker_counts_every_replicas_runs_across_playbooks() {
        let (_db, stores) = replicas(2).await;
        let limits = BreakerLimits {
            window_ms: 600_000,
            max_runs: 4,
            ..Default::default()
        };
        let intakes = (0..8).map(|i| {
            let store = stores[i % 2].clone();
            async move {
                intake(
                    &store,
                    &format!("b{i}"),
                    candidate(&format!("p{i}"), &format!("t{i}"), 0, ""),
                    limits,
                )
                .await
            }
        });
        let outcomes = futures_util::future::join_all(intakes).await;
        let created = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Created { .. }))
            .count();
        assert_eq!(created, 4, "{outcomes:?}");
    }

    /// Two replicas of two writers each take 32 alerts at once on 8 targets (four each, in
    /// order): whatever batches they fall into, the runs the breaker lets through are on
    /// exactly its limit of distinct targets, and one alert trips it (a batch counts once
    /// under intake's one lock and folds in its own runs, a target it acted on already adding
    /// none).
    #[tokio::test]
    async fn the_breakers_distinct_targets_hold_exactly_across_replicas_and_their_batches() {
        for _ in 0..3 {
            let db = TestDb::postgres();
            let clock = std::sync::Arc::new(crate::time::SystemClock);
            let stores = [
                db.open_with(clock.clone(), 2).await,
                db.open_with(clock, 2).await,
            ];
            let limits = BreakerLimits {
                window_ms: 600_000,
                max_runs: 1000,
                max_targets: 5,
                ..Default::default()
            };
            let target = |i: usize| format!("t{}", i / 4);
            let intakes = (0..32).map(|i| {
                let store = stores[i % 2].clone();
                let cand = candidate("p", &target(i), 0, "");
                async move { intake(&store, &format!("d{i}"), cand, limits).await }
            });
            let outcomes = futures_util::future::join_all(intakes).await;
            let acted: std::collections::HashSet<String> = (outcomes.iter().enumerate())
                .filter(|(_, o)| matches!(o, Outcome::Created { .. }))
                .map(|(i, _)| target(i))
                .collect();
            assert_eq!(acted.len(), 5, "{acted:?} {outcomes:?}");
            let tripped = (outcomes.iter())
                .filter(|o| cause(o) == Some(Hold::Breaker))
                .count();
            assert_eq!(tripped, 1, "{outcomes:?}");
        }
    }

    /// Two replicas end failed runs in the same instant, each the failure that reaches the
    /// limit if the other's is counted: the failure limit trips exactly at its count, once
    /// (each replica's count waits for the other's, under one lock), never one failure late.
    #[tokio::test]
    async fn two_replicas_failing_at_once_trip_the_failure_limit_exactly_at_it() {
        for round in 0..8 {
            let (_db, stores) = replicas(2).await;
            let limits = BreakerLimits {
                window_ms: 600_000,
                max_failures: 2,
                ..Default::default()
            };
            let start = StartNow {
                slots: 10,
                max_per_target: 1,
            };
            let mut runs = Vec::new();
            for (i, store) in stores.iter().enumerate() {
                let item = IntakeItem {
                    deferred: None,
                    alert: alert(&format!("f{i}")),
                    received_us: 0,
                    candidates: vec![candidate("p", &format!("t{i}"), 0, "")],
                };
                let started = store
                    .record_and_start(vec![item], limits, start)
                    .await
                    .unwrap()
                    .started;
                runs.push(started[0].id);
            }
            let fail = |i: usize| {
                let store = stores[i].clone();
                let run = runs[i];
                async move {
                    store
                        .run_finished(
                            run,
                            RunState::Failed,
                            Some("boom".into()),
                            None,
                            limits,
                            false,
                        )
                        .await
                        .unwrap()
                }
            };
            let (a, b) = tokio::join!(fail(0), fail(1));
            let trips: Vec<Trip> = [a, b].into_iter().flatten().collect();
            assert_eq!(trips.len(), 1, "round {round}: {trips:?}");
            assert_eq!(
                (trips[0].limit, trips[0].count),
                (Limit::Failures, 2),
                "round {round}"
            );
            assert!(
                stores[1].kill_reason("p").await.unwrap().is_some(),
                "round {round}"
            );
        }
    }

    #[tokio::test]
    async fn a_kill_switch_engaged_on_one_replica_holds_on_the_others() {
        let (_db, stores) = replicas(3).await;
        for s in &stores {
            assert_eq!(s.kill_reason("p").await.unwrap(), None);
        }
        stores[0]
            .set_switch("global".into(), true, "stop".into(), "op".into(), None)
            .await
            .unwrap();
        // Each replica answers from its copy of the switches; the change reaches them by
        // NOTIFY, or by the copy's age at the latest.
        for s in &stores[1..] {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while s.kill_reason("p").await.unwrap().is_none() {
                assert!(std::time::Instant::now() < deadline, "never saw the switch");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }

    #[tokio::test]
    async fn two_approvals_at_once_on_two_replicas_both_count() {
        let (_db, stores) = replicas(2).await;
        let none = BreakerLimits::default();
        let Outcome::Created { run_id, .. } =
            intake(&stores[0], "g", candidate("p", "t", 0, ""), none).await
        else {
            panic!("not created")
        };
        let claimed = stores[1].claim(1, 1).await.unwrap();
        assert_eq!(claimed[0].id, run_id);
        let gate = run_gate(2);
        let (id, _) = stores[1]
            .park_for_approval(run_id, 0, gate, serde_json::json!({}), "h".into(), false)
            .await
            .unwrap();
        let (a, b) = tokio::join!(
            stores[0].decide(id, "ann".into(), true, None),
            stores[1].decide(id, "bob".into(), true, None),
        );
        let decisions = [a.unwrap(), b.unwrap()];
        assert!(
            decisions.contains(&Decision::Approved)
                && decisions.contains(&Decision::Recorded { have: 1, need: 2 }),
            "{decisions:?}"
        );
        // Approved on either, claimed by whichever replica comes first.
        let again = stores[0].claim(1, 1).await.unwrap();
        assert_eq!(again.iter().map(|r| r.id).collect::<Vec<_>>(), vec![run_id]);
        assert!(again[0].resumed);
    }

    /// The advisory locks this transaction holds now.
    fn advisory_locks_held(c: &Db) -> Result<i64, StoreError> {
        c.one(
            "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory'",
            &[],
            |r| r.get(0),
        )
    }

    /// Writes waiting together that name more advisory locks than a batch takes go in more
    /// than one batch: no transaction holds more than the bound (PostgreSQL's table of locks
    /// is shared and bounded, and a transaction past it fails every write of its batch).
    #[tokio::test]
    async fn a_batch_takes_no_more_advisory_locks_than_its_bound() {
        let (_db, stores) = replicas(1).await;
        let store = &stores[0];
        let (holder, go) = hold_writer(store).await;
        let writes: Vec<_> = (0..8)
            .map(|job| {
                let locks = (0..100).map(|i| format!("test:{job}:{i}")).collect();
                let store = store.clone();
                tokio::spawn(async move { store.write_locked(locks, advisory_locks_held).await })
            })
            .collect();
        while store.queued_writes() < writes.len() {
            tokio::task::yield_now().await;
        }
        let _ = go.send(());
        holder.await.unwrap().unwrap();
        let mut held = Vec::new();
        for w in writes {
            held.push(w.await.unwrap().unwrap());
        }
        let most = *held.iter().max().unwrap();
        assert!(
            (100..=crate::store::MAX_BATCH_LOCKS as i64).contains(&most),
            "locks held by a batch: {held:?}"
        );
    }

    /// With two writers, one holding a write back for its next batch (past the locks'
    /// bound) while the other waits for writes to come: the write held back is committed
    /// all the same, not left until another write comes.
    #[tokio::test]
    async fn a_write_held_back_for_the_next_batch_is_not_left_waiting() {
        let (_db, stores) = writers(2).await;
        let store = &stores[0];
        let (first_holder, first_go) = hold_writer(store).await;
        let (second_holder, second_go) = hold_writer(store).await;
        let names = |job: usize, n: usize| (0..n).map(|i| format!("test:{job}:{i}")).collect();
        // The first write of the next batch stays open until told, the second is past the
        // bound with it.
        let (entered_tx, entered) = tokio::sync::oneshot::channel();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let (mut entered_tx, store1) = (Some(entered_tx), store.clone());
        let open = tokio::spawn(async move {
            (store1.write_locked(names(0, 100), move |_| {
                if let Some(tx) = entered_tx.take() {
                    let _ = tx.send(());
                }
                let _ = wait.recv_timeout(std::time::Duration::from_secs(30));
                Ok(())
            }))
            .await
        });
        while store.queued_writes() < 1 {
            tokio::task::yield_now().await;
        }
        let store2 = store.clone();
        let past = tokio::spawn(async move {
            store2
                .write_locked(names(1, 500), advisory_locks_held)
                .await
        });
        while store.queued_writes() < 2 {
            tokio::task::yield_now().await;
        }
        // One writer takes both, holds the second back and runs the first, which stays open.
        let _ = first_go.send(());
        first_holder.await.unwrap().unwrap();
        entered.await.unwrap();
        // The other writer is free, and waits for writes to come.
        let _ = second_go.send(());
        second_holder.await.unwrap().unwrap();
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        let _ = go.send(());
        open.await.unwrap().unwrap();
        let done = tokio::time::timeout(std::time::Duration::from_secs(20), past).await;
        let held = done.expect("the write held back was left waiting");
        assert_eq!(held.unwrap().unwrap(), 500, "alone in its batch");
    }

    /// A webhook whose alerts need more locks than a batch takes (with no breaker limit
    /// spanning playbooks, one an alert) is recorded in parts, each its own write, every
    /// alert once and in order.
    #[tokio::test]
    async fn a_webhook_needing_more_locks_than_a_batch_takes_is_recorded_in_parts() {
        let (_db, stores) = replicas(1).await;
        let store = &stores[0];
        let n = crate::store::MAX_BATCH_LOCKS + 88;
        let items: Vec<IntakeItem> = (0..n)
            .map(|i| IntakeItem {
                deferred: None,
                alert: alert(&format!("h{i}")),
                received_us: 0,
                candidates: vec![candidate("p", &format!("t{i}"), 0, "")],
            })
            .collect();
        let before = store.write_counts().writes;
        let outcomes = (store.record_intake(items, BreakerLimits::default()))
            .await
            .unwrap();
        assert_eq!(
            store.write_counts().writes - before,
            2,
            "written in two parts"
        );
        assert_eq!(outcomes.len(), n);
        let ids: Vec<i64> = (outcomes.iter())
            .map(|o| match o[..] {
                [Outcome::Created { run_id, .. }] => run_id,
                _ => panic!("{o:?}"),
            })
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order: {ids:?}");
    }

    /// An operator's cancel, or the alert's resolution, ends a run that awaits approval while
    /// another replica is deciding on the approval: the request's row is locked, the run's
    /// not yet. Each takes the request before the run, in the decision's order: while it
    /// waits for the request it holds no lock on the run, which the decision goes on to
    /// update (no cycle, so no deadlock for the database to break by failing one).
    #[tokio::test]
    async fn ending_a_run_that_awaits_approval_takes_the_request_before_the_run() {
        for ending in ["cancel", "resolution"] {
            let (_db, stores) = replicas(3).await;
            let none = BreakerLimits::default();
            let run_id = intake(&stores[0], "g", candidate("p", "t", 0, ""), none)
                .await
                .run_id();
            assert_eq!(stores[1].claim(1, 1).await.unwrap()[0].id, run_id);
            let gate = run_gate(1);
            let (id, _) = (stores[1].park_for_approval(
                run_id,
                0,
                gate,
                serde_json::json!({}),
                "h".into(),
                false,
            ))
            .await
            .unwrap();
            let (holder, go, ()) = hold_writer_in(&stores[0], move |c| {
                c.one(
                    "SELECT 1 FROM approvals WHERE id = ?1 FOR UPDATE",
                    &[&id],
                    |r| r.get::<i32>(0),
                )
                .map(drop)
            })
            .await;
            let ender = stores[1].clone();
            let ended = tokio::spawn(async move {
                match ending {
                    "cancel" => ender.cancel_if_pending(run_id).await.map(|_| ()),
                    _ => {
                        let item = IntakeItem {
                            deferred: None,
                            alert: Alert {
                                status: AlertStatus::Resolved,
                                ..alert("g")
                            },
                            received_us: 0,
                            candidates: vec![candidate("p", "t", 0, "")],
                        };
                        ender.record_intake(vec![item], none).await.map(drop)
                    }
                }
            });
            let waits = lock_waits(&stores[2], &ended).await;
            assert!(!waits.is_empty(), "{ending}: waits for the request");
            let run_free = (stores[2].write(move |c| {
                c.one(
                    "SELECT 1 FROM runs WHERE id = ?1 FOR UPDATE NOWAIT",
                    &[&run_id],
                    |r| r.get::<i32>(0),
                )
            }))
            .await;
            let _ = go.send(());
            holder.await.unwrap().unwrap();
            ended.await.unwrap().unwrap();
            assert!(
                run_free.is_ok(),
                "{ending}: locked the run first: {run_free:?}"
            );
            let state = state_of(&stores[2], run_id).await;
            let want = match ending {
                "cancel" => RunState::Cancelled,
                _ => RunState::Resolved,
            };
            assert_eq!(state, want, "{ending}");
        }
    }

    /// Makes `replica`'s lease expire now, as if it had stopped renewing ten seconds ago.
    async fn expire_lease(store: &Store, replica: &str) {
        let replica = replica.to_string();
        store
            .write(move |c| {
                c.exec(
                    "UPDATE replicas SET expires_at = expires_at - 60000 WHERE name = ?1",
                    &[&replica],
                )
            })
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_dead_replicas_undelivered_end_messages_are_the_taking_replicas_to_send() {
        let (_db, stores) = replicas(2).await;
        let (lost, alive) = (&stores[0], &stores[1]);
        let none = BreakerLimits::default();
        for (store, i) in [(lost, 0), (alive, 1)] {
            intake(
                store,
                &format!("d{i}"),
                candidate("p", &format!("t{i}"), 0, ""),
                none,
            )
            .await;
            let run = store.claim(1, 1).await.unwrap()[0].id;
            let message = EndMessage {
                summary: format!("run {run}"),
                report: None,
            };
            store
                .run_finished_telling(
                    run,
                    RunState::Succeeded,
                    None,
                    None,
                    none,
                    false,
                    Some(message),
                )
                .await
                .unwrap();
        }
        // Each replica starts with its own only.
        let own = |s: &Store| {
            let s = s.clone();
            async move {
                s.untold()
                    .await
                    .unwrap()
                    .iter()
                    .map(Untold::run_id)
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(own(alive).await, vec![2]);
        expire_lease(alive, lost.replica()).await;
        let taken = alive.take_over_expired().await.unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(
            taken[0].untold,
            vec![Untold::End {
                run_id: 1,
                message: EndMessage {
                    summary: "run 1".into(),
                    report: None
                }
            }]
        );
        assert_eq!(own(alive).await, vec![1, 2], "now the taking replica's");
        assert!(own(lost).await.is_empty());
    }

    /// A replica's claim is loaded late (the database was away), after its lease expired and
    /// its unstarted run went back to the queue. Back, the replica claims the run again: it
    /// holds it twice, and its step starts once. Once another replica holds it, the late
    /// claim can neither start its step, park it for approval, nor end it.
    #[tokio::test]
    async fn a_run_claimed_twice_by_a_replica_back_from_a_lost_lease_starts_its_step_once() {
        let (_db, stores) = replicas(2).await;
        let (back, other) = (&stores[0], &stores[1]);
        let none = BreakerLimits::default();
        let run_id = intake(back, "twice", candidate("p", "t", 0, ""), none)
            .await
            .run_id();
        let lose = |requeued: i64| async move {
            expire_lease(other, back.replica()).await;
            let taken = other.take_over_expired().await.unwrap();
            assert_eq!(taken[0].requeued, vec![requeued], "{taken:?}");
        };
        // Claimed (the claim loaded late), lost, and claimed again.
        assert_eq!(back.claim(1, 1).await.unwrap()[0].id, run_id);
        lose(run_id).await;
        back.renew_lease().await.unwrap();
        assert_eq!(back.claim(1, 1).await.unwrap()[0].id, run_id);
        let (a, b) = tokio::join!(
            back.step_started_after(run_id, 0, None),
            back.step_started_after(run_id, 0, None),
        );
        assert!(
            a.is_ok() != b.is_ok(),
            "one start of step 0 of two: {a:?} {b:?}"
        );
        assert!(matches!(a.err().or(b.err()), Some(StoreError::LostRun(id)) if id == run_id));
        // Lost again before its step started, claimed by the other replica.
        let run_id = intake(back, "lost", candidate("p", "u", 0, ""), none)
            .await
            .run_id();
        back.renew_lease().await.unwrap();
        assert_eq!(back.claim(1, 1).await.unwrap()[0].id, run_id);
        lose(run_id).await;
        assert_eq!(other.claim(1, 1).await.unwrap()[0].id, run_id);
        let gate = run_gate(1);
        let parked =
            (back.park_for_approval(run_id, 0, gate, serde_json::json!({}), "h".into(), false))
                .await;
        assert!(matches!(parked, Err(StoreError::LostRun(_))), "{parked:?}");
        let started = back.step_started_after(run_id, 0, None).await;
        assert!(
            matches!(started, Err(StoreError::LostRun(_))),
            "{started:?}"
        );
        // Nor end it (as its task would, refused its step), nor skip its steps.
        let stale = Some("stale".to_string());
        (back.run_finished(run_id, RunState::Failed, stale, None, none, false))
            .await
            .unwrap();
        assert_eq!(state_of(other, run_id).await, RunState::Running);
        other.step_started_after(run_id, 0, None).await.unwrap();
    }

    /// Holds `other`'s writer in a transaction that locks every audit chain but `free`
    /// (every one with `None`), as replicas' appends in flight would.
    async fn hold_chains(
        other: &Store,
        free: Option<i64>,
    ) -> (
        tokio::task::JoinHandle<Result<(), StoreError>>,
        std::sync::mpsc::Sender<()>,
    ) {
        let free = free.unwrap_or(-1);
        let (holder, go, ()) = hold_writer_in(other, move |c| {
            c.rows(
                "SELECT chain FROM audit_heads WHERE chain <> ?1 FOR UPDATE",
                &[&free],
                |r| r.get::<i64>(0),
            )
            .map(drop)
        })
        .await;
        (holder, go)
    }

    /// Appends audit rows `who`, one write each, to chain `chain` (the others held meanwhile).
    async fn append_on(store: &Store, other: &Store, chain: i64, who: &[&str]) -> Vec<i64> {
        let (holder, go) = hold_chains(other, Some(chain)).await;
        for who in who {
            store
                .audit(who, "run.cancel", None, "ok", None)
                .await
                .unwrap();
        }
        go.send(()).unwrap();
        holder.await.unwrap().unwrap();
        let chained = store.read(move |c| {
            c.rows(
                "SELECT id FROM audit WHERE chain = ?1 ORDER BY id",
                &[&chain],
                |r| r.get::<i64>(0),
            )
        });
        let ids = chained.await.unwrap();
        ids[ids.len() - who.len()..].to_vec()
    }

    /// An append does not wait for another transaction's: it takes a chain no other holds.
    /// Only with every chain held does it wait, for its own.
    #[tokio::test]
    async fn an_audit_append_takes_a_free_chain_and_waits_only_when_all_are_held() {
        let (_db, stores) = replicas(2).await;
        let (store, other) = (&stores[0], &stores[1]);
        // The migration made the chains the connections pick from.
        let heads =
            store.read(|c| c.one("SELECT count(*) FROM audit_heads", &[], |r| r.get::<i64>(0)));
        assert_eq!(heads.await.unwrap(), super::audit::CHAINS);
        let ids = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            append_on(store, other, 7, &["alice"]),
        );
        assert_eq!(ids.await.expect("no wait").len(), 1, "on chain 7");
        let (holder, go) = hold_chains(other, None).await;
        let appender = store.clone();
        let append =
            tokio::spawn(
                async move { appender.audit("bob", "run.cancel", None, "ok", None).await },
            );
        assert!(
            (lock_waits(store, &append).await.iter()).any(|w| w == "transactionid" || w == "tuple"),
            "waits for a chain"
        );
        go.send(()).unwrap();
        holder.await.unwrap().unwrap();
        append.await.unwrap().unwrap();
        let report = store.verify_audit().await.unwrap();
        assert_eq!((report.rows, report.broken), (2, None));
    }

    /// Rows on two chains: each verifies on its own, retention anchors each, and a row
    /// deleted from either is named.
    #[tokio::test]
    async fn audit_chains_verify_and_are_anchored_each_on_its_own() {
        let (db, stores) = replicas(2).await;
        let (store, other) = (&stores[0], &stores[1]);
        let mut three = append_on(store, other, 3, &["a", "b"]).await;
        let mut five = append_on(store, other, 5, &["c", "d"]).await;
        three.extend(append_on(store, other, 3, &["e"]).await);
        five.extend(append_on(store, other, 5, &["f"]).await);
        let report = store.verify_audit().await.unwrap();
        assert_eq!((report.rows, report.broken), (6, None));
        // Retention: the oldest three rows, two of chain 3 and one of chain 5.
        let later = store.now_ms() + 1;
        assert_eq!(
            store.prune_batch(0, later, 3, false).await.unwrap().rows[5],
            3
        );
        append_on(store, other, 5, &["g"]).await;
        let report = store.verify_audit().await.unwrap();
        assert_eq!(
            (report.rows, report.anchor, report.broken),
            (4, five[0], None)
        );
        // Chain 5's oldest row kept deleted: its next row does not follow its anchor.
        tamper(store, "DELETE FROM audit WHERE id = ?1", five[1]).await;
        let broken = store.verify_audit().await.unwrap().broken.expect("broken");
        assert_eq!(broken.id, five[2]);
        assert!(
            broken.why.contains(&format!(
                "does not follow row {}, the last one retention deleted",
                five[0]
            )),
            "{}",
            broken.why
        );
        // Chain 3's newest row deleted: its head names it.
        let db = db.fresh();
        let (store, other) = (db.open().await, db.open().await);
        let three = append_on(&store, &other, 3, &["a", "b"]).await;
        append_on(&store, &other, 5, &["c"]).await;
        tamper(&store, "DELETE FROM audit WHERE id = ?1", three[1]).await;
        let broken = store.verify_audit().await.unwrap().broken.expect("broken");
        assert_eq!(broken.id, three[1]);
        assert!(
            broken.why.contains("newest rows were deleted"),
            "{}",
            broken.why
        );
    }

    /// A replica one version behind, through a rolling upgrade, appends as it did: to
    /// `audit_chain` (one = 1), now a view of chain 0. The chains verify with its row in.
    #[tokio::test]
    async fn the_version_befores_audit_append_runs_on_this_schema() {
        let (_db, stores) = replicas(2).await;
        let (store, other) = (&stores[0], &stores[1]);
        append_on(store, other, 0, &["new"]).await;
        // 1527bb5's statements, in one transaction.
        (store.write(|c| {
            let prev: Vec<u8> = c.one(
                "SELECT last_hash FROM audit_chain WHERE one = 1 FOR UPDATE",
                &[],
                |r| r.get(0),
            )?;
            let id: i64 = c.one("SELECT nextval('audit_id_seq')", &[], |r| r.get(0))?;
            let at = 1_764_900_000_000_i64;
            let content = super::audit::Content {
                id,
                at,
                actor: "old",
                action: "run.cancel",
                target: None,
                outcome: "ok",
                detail: None,
            };
            let hash = content.hash(&prev);
            c.exec(
                "INSERT INTO audit (id, at, actor, action, target, outcome, detail, prev, hash)
                 VALUES (?1, ?2, 'old', 'run.cancel', NULL, 'ok', NULL, ?3, ?4)",
                &[&id, &at, &prev, &hash],
            )?;
            c.exec(
                "UPDATE audit_chain SET last_id = ?1, last_hash = ?2 WHERE one = 1",
                &[&id, &hash],
            )
        }))
        .await
        .unwrap();
        append_on(store, other, 0, &["newer"]).await;
        store
            .audit("any", "run.cancel", None, "ok", None)
            .await
            .unwrap();
        let report = store.verify_audit().await.unwrap();
        assert_eq!((report.rows, &report.broken), (4, &None), "{report:?}");
    }

    /// 1527bb5's `prune_audit`, every row old enough and sent: anchors `audit_chain` (chain
    /// 0) on the last of the `batch` oldest rows by id, then deletes every row up to it,
    /// whatever the chain.
    fn prune_audit_as_the_version_before(c: &Db, batch: i64) -> Result<u64, StoreError> {
        let oldest = c.rows(
            "SELECT id, hash FROM audit ORDER BY id LIMIT ?1",
            &[&batch],
            |r| Ok((r.get::<i64>(0)?, r.get::<Vec<u8>>(1)?)),
        )?;
        let Some((last, hash)) = oldest.last() else {
            return Ok(0);
        };
        c.exec(
            "UPDATE audit_chain SET anchor_hash = ?1 WHERE one = 1",
            &[hash],
        )?;
        c.exec(
            "UPDATE audit_chain SET anchor_id = ?1 WHERE one = 1",
            &[last],
        )?;
        c.exec("DELETE FROM audit WHERE id <= ?1", &[last])
    }

    /// The version before's retention, on schema 17 during a rolling upgrade: every chain is
    /// anchored on its own last row deleted, and verifies.
    #[tokio::test]
    async fn the_version_befores_audit_retention_leaves_every_chain_verifiable() {
        let (_db, stores) = replicas(2).await;
        let (store, other) = (&stores[0], &stores[1]);
        for (chain, who) in [(0, "a"), (1, "b"), (0, "c"), (2, "d")] {
            append_on(store, other, chain, &[who]).await;
        }
        let pruned = store.write(|c| prune_audit_as_the_version_before(c, 3));
        assert_eq!(pruned.await.unwrap(), 3, "a, b and c");
        append_on(store, other, 1, &["e"]).await;
        append_on(store, other, 0, &["f"]).await;
        let report = store.verify_audit().await.unwrap();
        assert_eq!((report.rows, &report.broken), (3, &None), "{report:?}");

        // A row in flight, its id older than the rows the retention read: the retention waits
        // for it, and anchors its chain on it too (it deletes it, as every row up to its last).
        let newest =
            || store.read(|c| c.one("SELECT max(id) FROM audit", &[], |r| r.get::<i64>(0)));
        let f = newest().await.unwrap();
        let (holder, go) = append_in_flight(other).await;
        store
            .audit("g", "run.cancel", None, "ok", None)
            .await
            .unwrap();
        let g = newest().await.unwrap();
        store
            .audit("h", "run.cancel", None, "ok", None)
            .await
            .unwrap();
        let pruner = store.clone();
        let pruned = tokio::spawn(async move {
            pruner
                .write(|c| prune_audit_as_the_version_before(c, 5))
                .await
        });
        assert!(
            !lock_waits(store, &pruned).await.is_empty(),
            "waits for the row in flight"
        );
        go.send(()).unwrap();
        holder.await.unwrap().unwrap();
        assert_eq!(
            pruned.await.unwrap().unwrap(),
            6,
            "d, e, f, the row in flight, g, h"
        );
        let chain = store.read(move |c| {
            c.one(
                "SELECT chain FROM audit_heads WHERE last_id > ?1 AND last_id < ?2",
                &[&f, &g],
                |r| r.get::<i64>(0),
            )
        });
        let in_flight = chain.await.unwrap();
        append_on(store, other, in_flight, &["i"]).await;
        let report = store.verify_audit().await.unwrap();
        assert_eq!((report.rows, &report.broken), (1, &None), "{report:?}");
    }

    /// Holds `other`'s writer in a transaction that appended an audit row and holds its chain
    /// (its id taken, its commit to come), as a replica's batch about to commit would.
    async fn append_in_flight(
        other: &Store,
    ) -> (
        tokio::task::JoinHandle<Result<(), StoreError>>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (holder, go, ()) = hold_writer_in(other, |c| {
            super::audit::audit_in(c, "slow", "run.cancel", None, "ok", None)?;
            super::audit::append_pending(c)
        })
        .await;
        (holder, go)
    }

    /// The audit sink reads on from the last row it got. A row another replica's transaction
    /// is about to commit has an older id than one committed meanwhile on another chain: the
    /// sink's read waits for it, and gets both in order.
    #[tokio::test]
    async fn the_audit_sinks_read_waits_for_an_older_row_in_flight() {
        let (_db, stores) = replicas(2).await;
        let (store, other) = (&stores[0], &stores[1]);
        let (holder, go) = append_in_flight(other).await;
        store
            .audit("fast", "run.cancel", None, "ok", None)
            .await
            .unwrap();
        let reader = store.clone();
        let read = tokio::spawn(async move { reader.audit_after(0, 100).await });
        assert!(
            !lock_waits(store, &read).await.is_empty(),
            "waits for the row in flight"
        );
        go.send(()).unwrap();
        holder.await.unwrap().unwrap();
        let rows = read.await.unwrap().unwrap();
        let actors: Vec<&str> = rows.iter().map(|r| r.actor.as_str()).collect();
        assert_eq!(actors, ["slow", "fast"], "both, oldest id first");
    }

    /// Retention deletes by chain, up to each chain's anchor: a row an append in flight
    /// commits while retention waits for its chain (its id older than rows retention read)
    /// is kept, and its chain still verifies.
    #[tokio::test]
    async fn retention_keeps_a_row_committed_while_it_waited_for_its_chain() {
        let (_db, stores) = replicas(2).await;
        let (store, other) = (&stores[0], &stores[1]);
        // A chained row first, on the chain the append in flight will hold.
        let (holder, go) = append_in_flight(other).await;
        go.send(()).unwrap();
        holder.await.unwrap().unwrap();
        let (holder, go) = append_in_flight(other).await;
        store
            .audit("fast", "run.cancel", None, "ok", None)
            .await
            .unwrap();
        let later = store.now_ms() + 1;
        let pruner = store.clone();
        let prune = tokio::spawn(async move { pruner.prune_batch(0, later, 10, false).await });
        assert!(
            !lock_waits(store, &prune).await.is_empty(),
            "waits for the chain"
        );
        go.send(()).unwrap();
        holder.await.unwrap().unwrap();
        assert_eq!(prune.await.unwrap().unwrap().rows[5], 2);
        let report = store.verify_audit().await.unwrap();
        assert_eq!((report.rows, &report.broken), (1, &None), "{report:?}");
    }

    /// The wake-ups other replicas got (`NOTIFY reflex_wake`) since the last look, read up
    /// to a marker this sends now (notifications arrive in commit order).
    async fn wakes_since(listener: &mut Option<postgres::Client>) -> usize {
        let mut client = listener.take().expect("a listener");
        let (client, wakes) = tokio::task::spawn_blocking(move || {
            client
                .batch_execute("NOTIFY reflex_wake, 'marker'")
                .unwrap();
            let mut wakes = 0;
            {
                use postgres::fallible_iterator::FallibleIterator;
                let mut notes = client.notifications();
                let mut it = notes.timeout_iter(std::time::Duration::from_secs(20));
                while it.next().unwrap().expect("the marker").payload() != "marker" {
                    wakes += 1;
                }
            }
            (client, wakes)
        })
        .await
        .unwrap();
        *listener = Some(client);
        wakes
    }

    /// A run's end wakes the other replicas only when a run waits in the queue: with none,
    /// nobody has anything to claim, and a `NOTIFY` is a lock every notifying commit of the
    /// cluster takes in turn.
    #[tokio::test]
    async fn a_runs_end_wakes_the_other_replicas_only_when_a_run_is_queued() {
        let db = TestDb::postgres();
        let store = db.open().await;
        let TestDb::Postgres(name) = &db else {
            unreachable!()
        };
        let settings = crate::testkit::PgServer::shared().settings(name);
        let mut listener = Some(
            tokio::task::spawn_blocking(move || {
                let mut client = settings.connector.connect(&settings.config).unwrap();
                client.batch_execute("LISTEN reflex_wake").unwrap();
                client
            })
            .await
            .unwrap(),
        );
        let none = BreakerLimits::default();
        let end =
            |run_id: i64| store.run_finished(run_id, RunState::Succeeded, None, None, none, false);
        // Alone in the queue: claimed, ended, nothing waits.
        let alone = intake(&store, "alone", candidate("p", "t1", 0, ""), none)
            .await
            .run_id();
        assert_eq!(store.claim(1, 1).await.unwrap()[0].id, alone);
        assert_eq!(wakes_since(&mut listener).await, 1, "the queued run's");
        end(alone).await.unwrap();
        assert_eq!(
            wakes_since(&mut listener).await,
            0,
            "none for an end with none queued"
        );
        // Another run queued behind one on the same target: its end wakes the others.
        let first = intake(&store, "first", candidate("p", "t2", 0, ""), none)
            .await
            .run_id();
        intake(&store, "second", candidate("p", "t2", 0, ""), none).await;
        assert_eq!(store.claim(1, 2).await.unwrap().len(), 1);
        assert_eq!(wakes_since(&mut listener).await, 2);
        end(first).await.unwrap();
        assert_eq!(wakes_since(&mut listener).await, 1, "a run waits");
        // A blocking client is dropped off the runtime.
        tokio::task::spawn_blocking(move || drop(listener))
            .await
            .unwrap();
    }

    /// The writer's statements keep one plan, made once, whatever values they are sent
    /// with: PostgreSQL plans a statement for its values five times, then keeps a generic
    /// plan unless every plan made for the values at hand looked cheaper. One that is
    /// planned again at each use costs its planning on every commit.
    #[tokio::test]
    async fn the_writers_statements_on_postgres_are_not_planned_at_every_use() {
        let (_db, stores) = replicas(1).await;
        let store = &stores[0];
        let none = BreakerLimits::default();
        for i in 0..16 {
            // One alert a commit, of a playbook that coalesces every other time: each
            // statement used eight times at least.
            let (instance, target) = (format!("p{i}"), format!("t{i}"));
            let cand = Candidate {
                coalesce: i % 2 == 0,
                ..candidate("p", &target, 0, "")
            };
            let run_id = intake(store, &instance, cand, none).await.run_id();
            assert_eq!(store.claim(1, 1).await.unwrap()[0].id, run_id);
            (store.run_finished(run_id, RunState::Succeeded, None, None, none, false))
                .await
                .unwrap();
            // Two audit rows in one commit, then three.
            for n in [2, 3] {
                (store.write(move |c| {
                    for _ in 0..n {
                        super::audit::audit_in(c, "alice", "run.cancel", None, "ok", None)?;
                    }
                    Ok(())
                }))
                .await
                .unwrap();
            }
        }
        let replanned: Vec<(String, i64)> = store
            .write(|c| {
                c.rows(
                    "SELECT statement, custom_plans FROM pg_prepared_statements
                     WHERE custom_plans > 5",
                    &[],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
            })
            .await
            .unwrap();
        assert!(replanned.is_empty(), "{replanned:#?}");
    }

    /// A renewal that waited for a takeover of its replica (which holds the replica's row,
    /// then deletes it) reports the lease lost, and counts it (`leases_lost`): what a late
    /// task compares before it acts.
    #[tokio::test]
    async fn a_renewal_that_waited_for_a_takeover_of_its_replica_reports_the_lease_lost() {
        let (_db, stores) = replicas(2).await;
        let (back, other) = (&stores[0], &stores[1]);
        assert_eq!(back.leases_lost(), 0);
        let me = back.replica().to_string();
        let (holder, go, ()) = hold_writer_in(other, move |c| {
            c.one(
                "SELECT 1 FROM replicas WHERE name = ?1 FOR UPDATE",
                &[&me],
                |r| r.get::<i32>(0),
            )?;
            c.exec("DELETE FROM replicas WHERE name = ?1", &[&me])
                .map(drop)
        })
        .await;
        let renewer = back.clone();
        let renewal = tokio::spawn(async move { renewer.renew_lease().await });
        assert_eq!(lock_waits(back, &renewal).await, ["transactionid"]);
        go.send(()).unwrap();
        holder.await.unwrap().unwrap();
        assert!(!renewal.await.unwrap().unwrap(), "the lease was taken over");
        assert_eq!(back.leases_lost(), 1);
        assert!(back.renew_lease().await.unwrap(), "renewed since: its own");
        assert_eq!(back.leases_lost(), 1);
    }

    #[tokio::test]
    async fn a_replica_whose_lease_expires_is_taken_over_and_acts_no_further() {
        let (_db, stores) = replicas(2).await;
        let (lost, alive) = (&stores[0], &stores[1]);
        let none = BreakerLimits::default();
        for i in 0..2 {
            intake(
                lost,
                &format!("r{i}"),
                candidate("p", &format!("t{i}"), 0, ""),
                none,
            )
            .await;
        }
        let runs = lost.claim(1, 2).await.unwrap();
        assert_eq!(runs.len(), 2);
        let (started, unstarted) = (runs[0].id, runs[1].id);
        lost.step_started_after(started, 0, None).await.unwrap();
        // Its lease is good: nothing to take over.
        assert!(alive.take_over_expired().await.unwrap().is_empty());
        expire_lease(alive, lost.replica()).await;
        let taken = alive.take_over_expired().await.unwrap();
        assert_eq!(
            taken,
            vec![Takeover {
                replica: lost.replica().to_string(),
                interrupted: vec![started],
                requeued: vec![unstarted],
                untold: Vec::new(),
            }]
        );
        let run = alive.get_run(started).await.unwrap().unwrap();
        assert_eq!(run.state, RunState::Interrupted);
        let steps = run.steps.unwrap();
        assert_eq!(steps[0].state, StepState::Interrupted);
        // The requeued run is executed by the replica that is alive, once.
        let again = alive.claim(1, 2).await.unwrap();
        assert_eq!(
            again.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![unstarted]
        );
        // The lost replica, back, cannot start the next step of a run it no longer holds,
        // nor end it any other way than it ended.
        let refused = lost.step_started_after(started, 1, None).await;
        assert!(
            matches!(refused, Err(StoreError::LostRun(id)) if id == started),
            "{refused:?}"
        );
        lost.run_finished(started, RunState::Succeeded, None, None, none, false)
            .await
            .unwrap();
        assert_eq!(
            alive.get_run(started).await.unwrap().unwrap().state,
            RunState::Interrupted
        );
        // Nor the run the other replica now executes.
        let refused = lost.step_started_after(unstarted, 0, None).await;
        assert!(
            matches!(refused, Err(StoreError::LostRun(_))),
            "{refused:?}"
        );
        alive.step_started_after(unstarted, 0, None).await.unwrap();
        // The audit log says what happened.
        let audit = alive.audit_log(None, 10).await.unwrap();
        assert!(
            audit.iter().any(|a| a.action == "replica.takeover"),
            "{audit:?}"
        );
    }
}

/// TLS to PostgreSQL: verified against the configured authority, refused otherwise.
mod tls {
    use super::*;
    use crate::store::pg::{Connector, Settings};
    use postgres::config::SslMode;

    async fn open(settings: Settings) -> Result<Store, StoreError> {
        Store::open_pg(settings, std::sync::Arc::new(crate::time::SystemClock)).await
    }

    #[tokio::test]
    async fn a_tls_only_server_is_reached_with_its_authority_and_refused_without() {
        let server = crate::testkit::PgServer::start_with(false, true).unwrap();
        let db = server.fresh();
        let ca = server.ca.clone().unwrap();
        let settings = |connector: Connector| {
            let mut s = server.settings(&db);
            s.connector = connector;
            s
        };

        let good = Connector::new(SslMode::Require, Some(&ca)).unwrap();
        let store = open(settings(good)).await.unwrap();
        store
            .audit("op", "tls.check", None, "ok", None)
            .await
            .unwrap();
        let log = store.audit_log(None, 1).await.unwrap();
        assert_eq!(log[0].action, "tls.check");

        // In the clear: the server refuses it.
        let plain = open(settings(Connector::Plain))
            .await
            .err()
            .expect("refused");
        assert!(plain.to_string().contains("pg_hba.conf"), "{plain}");

        // Another authority: the certificate is not trusted.
        let other_dir = tempfile::tempdir().unwrap();
        let other = crate::testkit::certificate_authority(other_dir.path(), "other").unwrap();
        let wrong = Connector::new(SslMode::Require, Some(&other)).unwrap();
        let err = open(settings(wrong)).await.err().expect("untrusted");
        let chain = format!("{err:?}");
        assert!(
            chain.contains("UnknownIssuer") || chain.contains("certificate"),
            "{chain}"
        );
    }

    #[test]
    fn a_missing_or_empty_authority_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Connector::new(SslMode::Require, Some(&dir.path().join("none.pem")))
            .err()
            .expect("missing file");
        assert!(missing.to_string().contains("none.pem"), "{missing}");
        std::fs::write(dir.path().join("empty.pem"), "").unwrap();
        let empty = Connector::new(SslMode::Require, Some(&dir.path().join("empty.pem")))
            .err()
            .expect("empty file");
        assert!(
            empty.to_string().contains("no certificate authority"),
            "{empty}"
        );
        assert!(matches!(
            Connector::new(SslMode::Disable, None),
            Ok(Connector::Plain)
        ));
    }
}

on_both_backends! {
    async fn a_chat_thread_recorded_first_is_the_one_every_replica_uses(db: TestDb) {
        let a = db.open().await;
        assert_eq!(a.chat_thread("bot", 7).await.unwrap(), None);
        assert_eq!(a.set_chat_thread("bot", 7, "1000.1").await.unwrap(), "1000.1");
        // Another replica (or, on SQLite, the daemon restarted) finds it, and cannot replace it.
        if matches!(db, TestDb::Sqlite(_)) {
            drop(a);
        }
        let b = db.open().await;
        assert_eq!(b.chat_thread("bot", 7).await.unwrap().as_deref(), Some("1000.1"));
        assert_eq!(b.set_chat_thread("bot", 7, "2000.2").await.unwrap(), "1000.1");
        // Per sink and per run.
        assert_eq!(b.chat_thread("other", 7).await.unwrap(), None);
        assert_eq!(b.chat_thread("bot", 8).await.unwrap(), None);
    }
}

on_both_backends! {
    async fn runs_a_replica_lost_track_of_are_requeued_or_interrupted(db: TestDb) {
        let store = db.open().await;
        let none = BreakerLimits::default();
        for i in 0..3 {
            intake(&store, &format!("o{i}"), candidate("p", &format!("t{i}"), 0, ""), none).await;
        }
        let runs = store.claim(1, 3).await.unwrap();
        let ids: Vec<i64> = runs.iter().map(|r| r.id).collect();
        store.step_started_after(ids[0], 0, None).await.unwrap();
        assert_eq!(store.owned_running().await.unwrap(), ids);
        // The engine executes the third; it lost track of the first two.
        let t = store.release_orphans(ids[..2].to_vec()).await.unwrap();
        assert_eq!((t.interrupted, t.requeued), (vec![ids[0]], vec![ids[1]]));
        assert_eq!(store.owned_running().await.unwrap(), vec![ids[2]]);
        assert_eq!(
            store.get_run(ids[0]).await.unwrap().unwrap().state,
            RunState::Interrupted
        );
        // The requeued one is claimed again, once.
        let again = store.claim(1, 3).await.unwrap();
        assert_eq!(again.iter().map(|r| r.id).collect::<Vec<_>>(), vec![ids[1]]);
        // A run no longer this replica's is left alone.
        let t = store.release_orphans(vec![ids[0]]).await.unwrap();
        assert!(t.interrupted.is_empty() && t.requeued.is_empty());
    }
}

on_both_backends! {
    async fn a_failed_write_undoes_itself_and_nothing_else_in_its_batch(db: TestDb) {
        let store = db.open().await;
        // The writer is held inside a first write while two more queue up behind it, so
        // that they are committed in one batch.
        let (blocker, release) = hold_writer(&store).await;
        let s = store.clone();
        let bad = tokio::spawn(async move {
            s.write(|c| {
                c.exec(
                    "INSERT INTO audit (at, actor, action, outcome) VALUES (1, 'a', 'bad', 'ok')",
                    &[],
                )?;
                c.exec("SELECT no_such_column FROM audit", &[])?;
                Ok(())
            })
            .await
        });
        let s = store.clone();
        let good = tokio::spawn(async move { s.audit("b", "good", None, "ok", None).await });
        while store.queued_writes() < 2 {
            tokio::task::yield_now().await;
        }
        let before = store.write_counts().commits;
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        assert!(bad.await.unwrap().is_err());
        good.await.unwrap().unwrap();
        let actions: Vec<String> = (store.audit_log(None, 10).await.unwrap().into_iter())
            .map(|a| a.action)
            .collect();
        assert_eq!(actions, vec!["good"]);
        assert_eq!(
            store.write_counts().commits - before,
            2,
            "the held write's batch, then one batch for both"
        );
    }
}

on_both_backends! {
    async fn a_run_started_at_intake_is_stored_with_every_step_of_its_plan(db: TestDb) {
        let store = db.open().await;
        let mut cand = candidate("pb", "t1", 0, "");
        if let Ok(plan) = &mut cand.plan {
            let first = plan.steps[0].clone();
            plan.steps.push(PlannedStep {
                name: "second".into(),
                args: serde_json::json!({"message": "two"}),
                timeout_ms: Some(5_000),
                on_failure: OnFailure::Continue,
                ..first.clone()
            });
            plan.steps.push(PlannedStep {
                name: "third".into(),
                phase: Phase::OnFailure,
                ..first
            });
        }
        let item = IntakeItem {
            deferred: None,
            alert: alert("steps"),
            received_us: 0,
            candidates: vec![cand],
        };
        let start = StartNow {
            slots: 1,
            max_per_target: 1,
        };
        let started = (store.record_and_start(vec![item], BreakerLimits::default(), start))
            .await
            .unwrap()
            .started;
        assert_eq!(started.len(), 1);
        let run = started[0].id;
        type Row = (i64, String, String, String, Option<i64>, String, String, String, bool);
        let rows: Vec<Row> = store
            .read(move |c| {
                c.rows(
                    "SELECT idx, name, action, args, timeout_ms, on_failure, state, phase,
                            started_at IS NOT NULL FROM steps WHERE run_id = ?1 ORDER BY idx",
                    &[&run],
                    |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                            r.get(6)?,
                            r.get(7)?,
                            r.get(8)?,
                        ))
                    },
                )
            })
            .await
            .unwrap();
        let row = |i: i64, name: &str, args: &str, timeout, on_failure: &str, state: &str, phase: &str, started| {
            (i, name.to_string(), "log".to_string(), args.to_string(), timeout, on_failure.to_string(),
             state.to_string(), phase.to_string(), started)
        };
        assert_eq!(
            rows,
            vec![
                row(0, "log", r#"{"message":"m"}"#, None, "stop", "running", "main", true),
                row(1, "second", r#"{"message":"two"}"#, Some(5_000), "continue", "pending", "main", false),
                row(2, "third", r#"{"message":"m"}"#, None, "stop", "pending", "on_failure", false),
            ]
        );
    }

    async fn a_batch_with_a_failed_write_is_redone_and_records_each_other_write_once(db: TestDb) {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let store = db.open().await;
        let (blocker, release) = hold_writer(&store).await;
        // Queued behind the held write, in this order: a good write, a failing one, a good one.
        let runs: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        let mut writes = Vec::new();
        for (i, action) in ["first", "bad", "third"].into_iter().enumerate() {
            let s = store.clone();
            let ran = runs[i].clone();
            writes.push(tokio::spawn(async move {
                s.write(move |c| {
                    let n = ran.fetch_add(1, SeqCst) + 1;
                    c.exec(
                        "INSERT INTO audit (at, actor, action, outcome) VALUES (1, 'a', ?1, 'ok')",
                        &[&action],
                    )?;
                    if action == "bad" {
                        c.exec("SELECT no_such_column FROM audit", &[])?;
                    }
                    Ok(n)
                })
                .await
            }));
            while store.queued_writes() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        let mut answers = Vec::new();
        for w in writes {
            answers.push(w.await.unwrap());
        }
        assert!(answers[1].is_err());
        let mut actions: Vec<String> = (store.audit_log(None, 10).await.unwrap().into_iter())
            .map(|a| a.action)
            .collect();
        actions.sort();
        assert_eq!(actions, vec!["first", "third"]);
        let ran: Vec<usize> = runs.iter().map(|r| r.load(SeqCst)).collect();
        if store.path().is_none() {
            // PostgreSQL: without savepoints the failure stops the first try before the third
            // write; the second try runs each write in a savepoint of its own.
            assert_eq!(ran, vec![2, 2, 1]);
            assert_eq!(*answers[0].as_ref().unwrap(), 2, "the answer of the last run");
        } else {
            assert_eq!(ran, vec![1, 1, 1]);
        }
        assert_eq!(*answers[2].as_ref().unwrap(), 1);
        // A batch without a failure runs each write once.
        let (a, b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a2, b2) = (a.clone(), b.clone());
        let (s1, s2) = (store.clone(), store.clone());
        let (x, y) = tokio::join!(
            s1.write(move |_| Ok(a2.fetch_add(1, SeqCst))),
            s2.write(move |_| Ok(b2.fetch_add(1, SeqCst)))
        );
        x.unwrap();
        y.unwrap();
        assert_eq!((a.load(SeqCst), b.load(SeqCst)), (1, 1));
    }

    // A write the database refuses fails alone, with the database's error, whatever else its
    // batch holds: every batch of up to three writes, each of them one of
    // - `Later`: an insert sent without waiting (`Db::later`);
    // - `Waited`: an insert waited for;
    // - `LaterRefused`, `WaitedRefused`: the same, refused by the database (1000 / 0);
    // - `Gives up`: an insert sent without waiting, then the write returns an error.
    // On PostgreSQL a refused statement sent without waiting is seen with a later one (another
    // write's, or the `COMMIT`), and it failed the whole batch, with an error callers retry as
    // if the database were away.
    async fn a_write_the_database_refuses_fails_alone_whatever_its_batch_holds(db: TestDb) {
        #[derive(Clone, Copy, Debug, PartialEq)]
        enum W {
            Later,
            Waited,
            LaterRefused,
            WaitedRefused,
            GivesUp,
        }
        const ALL: [W; 5] = [W::Later, W::Waited, W::LaterRefused, W::WaitedRefused, W::GivesUp];
        const INSERT: &str =
            "INSERT INTO audit (at, actor, action, outcome) VALUES (1000 / CAST(?1 AS BIGINT), 'a', ?2, 'ok')";
        let store = db.open().await;
        let mut batches: Vec<Vec<W>> = ALL.iter().map(|w| vec![*w]).collect();
        for _ in 0..2 {
            let longer: Vec<Vec<W>> = (batches.iter().filter(|b| b.len() == batches.last().unwrap().len()))
                .flat_map(|b| ALL.iter().map(move |w| [b.clone(), vec![*w]].concat()))
                .collect();
            batches.extend(longer);
        }
        assert_eq!(batches.len(), 5 + 25 + 125);
        let mut kept = Vec::new();
        for (n, batch) in batches.iter().enumerate() {
            let (blocker, release) = hold_writer(&store).await;
            let mut writes = Vec::new();
            for (i, w) in batch.iter().copied().enumerate() {
                let (s, action) = (store.clone(), format!("{n}.{i}"));
                writes.push(tokio::spawn(async move {
                    s.write(move |c| {
                        // 1000 / 0: refused by PostgreSQL; NULL, so NOT NULL, on SQLite.
                        let refused = matches!(w, W::LaterRefused | W::WaitedRefused);
                        let divisor: i64 = if refused { 0 } else { 1 };
                        match w {
                            W::Later | W::LaterRefused | W::GivesUp => {
                                c.later(INSERT, &[&divisor, &action])?
                            }
                            W::Waited | W::WaitedRefused => c.exec(INSERT, &[&divisor, &action]).map(drop)?,
                        }
                        match w {
                            W::GivesUp => Err(StoreError::Config("given up".into())),
                            _ => Ok(()),
                        }
                    })
                    .await
                }));
                while store.queued_writes() < i + 1 {
                    tokio::task::yield_now().await;
                }
            }
            release.send(()).unwrap();
            blocker.await.unwrap().unwrap();
            for (i, (w, write)) in batch.iter().zip(writes).enumerate() {
                let answer = write.await.unwrap();
                match w {
                    W::Later | W::Waited => {
                        answer.unwrap_or_else(|e| panic!("{batch:?}, write {i}: {e}"));
                        kept.push(format!("{n}.{i}"));
                    }
                    W::GivesUp => assert!(
                        matches!(answer, Err(StoreError::Config(_))),
                        "{batch:?}, write {i}: {answer:?}"
                    ),
                    W::LaterRefused | W::WaitedRefused => {
                        let e = answer.expect_err("refused");
                        assert!(!e.is_transient(), "{batch:?}, write {i}: {e}");
                    }
                }
            }
        }
        let mut recorded: Vec<String> = (store.audit_log(None, 10_000).await.unwrap().into_iter())
            .map(|a| a.action)
            .collect();
        recorded.sort();
        kept.sort();
        assert_eq!(recorded, kept, "each write that succeeded, once; nothing of the others");
    }

    async fn refused_runs_trip_their_own_playbooks_switch_not_all_automation(db: TestDb) {
        let store = db.open().await;
        let limits = BreakerLimits {
            window_ms: 600_000,
            max_failures: 2,
            ..Default::default()
        };
        let failed = |name: &'static str, playbook: &'static str, refused: bool| {
            let store = store.clone();
            async move {
                let Outcome::Created { run_id, .. } =
                    intake(&store, name, candidate(playbook, name, 0, ""), limits).await
                else {
                    panic!("not created")
                };
                hold_run(&store, run_id).await;
                store
                    .run_finished(run_id, RunState::Failed, Some("x".into()), None, limits, refused)
                    .await
                    .unwrap()
            }
        };
        // One failure for real, then refusals in another playbook: no global trip.
        assert!(failed("a", "ok", false).await.is_none());
        assert!(failed("b", "bad", true).await.is_none());
        let trip = failed("c", "bad", true).await.expect("the second refusal trips");
        assert_eq!(trip.limit, Limit::Refusals);
        assert_eq!(trip.scope(), "playbook:bad");
        assert!(store.kill_reason("bad").await.unwrap().is_some(), "its switch is engaged");
        assert!(store.kill_reason("ok").await.unwrap().is_none(), "automation goes on");
        // The refusals did not count towards the global failure limit.
        assert!(failed("d", "ok", true).await.is_none());
        let trip = failed("e", "ok2", false).await.expect("the second real failure trips");
        assert_eq!(trip.scope(), "global");
    }
}

/// The tables, their columns and their indexes, as the live database has them.
async fn live_schema(
    store: &Store,
    sqlite: bool,
) -> (
    std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    std::collections::BTreeSet<String>,
) {
    let (columns_sql, indexes_sql) = if sqlite {
        (
            "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p
             WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'",
            "SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_%'",
        )
    } else {
        (
            "SELECT table_name::text, column_name::text FROM information_schema.columns
             WHERE table_schema = current_schema()",
            // Primary keys and UNIQUE constraints: SQLite's automatic indexes, not listed there.
            "SELECT indexname::text FROM pg_indexes
             WHERE schemaname = current_schema()
               AND indexname NOT LIKE '%_pkey' AND indexname NOT LIKE '%_key'",
        )
    };
    let rows: Vec<(String, String)> = store
        .read(move |c| c.rows(columns_sql, &[], |r| Ok((r.get(0)?, r.get(1)?))))
        .await
        .unwrap();
    let mut tables: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for (table, column) in rows {
        tables.entry(table).or_default().insert(column);
    }
    let indexes: Vec<String> = store
        .read(move |c| c.rows(indexes_sql, &[], |r| r.get(0)))
        .await
        .unwrap();
    (tables, indexes.into_iter().collect())
}

/// The two backends' migrations are two lists: this keeps them from drifting apart.
#[tokio::test]
async fn both_backends_have_the_same_tables_columns_and_indexes() {
    let (lite_db, pg_db) = (TestDb::sqlite(), TestDb::postgres());
    let (sqlite, pg) = (lite_db.open().await, pg_db.open().await);
    let (lite_tables, lite_indexes) = live_schema(&sqlite, true).await;
    let (mut pg_tables, pg_indexes) = live_schema(&pg, false).await;
    // PostgreSQL's own: which replicas hold leases (SQLite has one writer, no leases), the
    // migration version (SQLite keeps it in `PRAGMA user_version`), and the audit chain's
    // head as a replica one version behind knows it (a view of chain 0, for rolling upgrades).
    for only_pg in ["replicas", "reflex_schema", "audit_chain"] {
        assert!(
            pg_tables.remove(only_pg).is_some(),
            "{only_pg} is gone from PostgreSQL"
        );
    }
    assert_eq!(
        lite_tables.keys().collect::<Vec<_>>(),
        pg_tables.keys().collect::<Vec<_>>(),
        "the same tables"
    );
    for (table, columns) in &lite_tables {
        assert_eq!(columns, &pg_tables[table], "the columns of {table}");
    }
    // PostgreSQL's own: the runs each replica holds (a lease's takeover looks them up).
    let mut pg_indexes = pg_indexes;
    assert!(pg_indexes.remove("runs_owner"));
    assert_eq!(lite_indexes, pg_indexes, "the same indexes");
}

/// Records runs for `instances` (one alert each, on targets of their own) and ends each one
/// that can start with a step result; returns their ids.
async fn ended_runs(store: &Store, instances: &[String]) -> Vec<i64> {
    let items = (instances.iter())
        .map(|i| IntakeItem {
            deferred: None,
            alert: alert(i),
            received_us: 0,
            candidates: vec![candidate("p", i, 0, "")],
        })
        .collect();
    let outcomes = store
        .record_intake(items, BreakerLimits::default())
        .await
        .unwrap();
    let mut ids = Vec::new();
    for o in outcomes.into_iter().flatten() {
        let Outcome::Created { run_id, .. } = o else {
            panic!("{o:?}")
        };
        ids.push(run_id);
    }
    loop {
        let claimed = store.claim(1, 500).await.unwrap();
        if claimed.is_empty() {
            break;
        }
        // Only these: a run of the test's own stays as it is (claimed: running).
        for run in claimed.iter().filter(|r| ids.contains(&r.id)) {
            store
                .run_finished(
                    run.id,
                    RunState::Succeeded,
                    None,
                    Some(done(run)),
                    BreakerLimits::default(),
                    false,
                )
                .await
                .unwrap();
        }
    }
    ids
}

on_both_backends! {
async fn retention_deletes_ended_runs_with_their_rows_and_never_a_live_one(db: TestDb) {
    let clock = std::sync::Arc::new(crate::time::ManualClock::new());
    let store = db.open_with_clock(clock.clone()).await;
    let old = ended_runs(&store, &["a".into(), "b".into(), "c".into()]).await;
    store
        .save_artifacts(old[0], 0, "log", vec![Artifact { name: "x.txt".into(), content_type: "text/plain".into(), data: b"x".to_vec() }], ArtifactCaps::default())
        .await
        .unwrap();
    store.audit("alice", "killswitch", None, "ok", None).await.unwrap();
    // A run still under way, as old as the others: it stays.
    let waiting = intake(&store, "w", candidate("p", "w", 0, ""), BreakerLimits::default()).await;
    let waiting = match waiting {
        Outcome::Created { run_id, .. } => run_id,
        o => panic!("{o:?}"),
    };
    clock.advance(std::time::Duration::from_secs(7200));
    let recent = ended_runs(&store, &["d".into()]).await;
    store.audit("bob", "approve", None, "ok", None).await.unwrap();
    let count = |table: &'static str| {
        let store = store.clone();
        async move {
            store
                .read(move |c| c.one(&format!("SELECT count(*) FROM {table}"), &[], |r| r.get::<i64>(0)))
                .await
                .unwrap()
        }
    };
    assert_eq!((count("runs").await, count("alerts").await), (5, 5));
    // An hour's limit, two rows a batch: round after round until nothing is left to delete.
    let hour_ago = store.now_ms() - 3_600_000;
    let audit_old: i64 = store
        .read(move |c| c.one("SELECT count(*) FROM audit WHERE at < ?1", &[&hour_ago], |r| r.get(0)))
        .await
        .unwrap();
    let audit_new = count("audit").await - audit_old;
    let mut deleted = [0u64; 6];
    loop {
        let pruned = store.prune_batch(hour_ago, hour_ago, 2, false).await.unwrap();
        if pruned.total() == 0 {
            break;
        }
        assert!(pruned.rows[0] <= 2 && pruned.rows[4] <= 2 && pruned.rows[5] <= 2, "{pruned:?}");
        for (d, n) in deleted.iter_mut().zip(pruned.rows) {
            *d += n;
        }
    }
    // runs, steps, approvals, artifacts, alerts, audit
    assert_eq!(deleted, [3, 3, 0, 1, 3, audit_old as u64]);
    let left: Vec<i64> = store
        .read(|c| c.rows("SELECT id FROM runs ORDER BY id", &[], |r| r.get(0)))
        .await
        .unwrap();
    assert_eq!(left, vec![waiting, recent[0]], "the live run and the recent one stay");
    assert_eq!((count("alerts").await, count("steps").await), (2, 2));
    assert_eq!(count("audit").await, audit_new, "the recent audit rows stay");
    assert_eq!(store.artifact(old[0], "log-x.txt").await.unwrap(), None);
    let (rows, bytes) = store.size().await.unwrap();
    assert_eq!(rows[0], ("runs", 2));
    assert!(bytes > 0);
}
}

/// The database as its pages stand (the file once the WAL is copied back), in bytes.
async fn logical_size(store: &Store) -> i64 {
    store
        .read(|c| {
            c.one(
                "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
                &[],
                |r| r.get(0),
            )
        })
        .await
        .unwrap()
}

/// Pruned as it goes, a store that has taken 20,000 runs is no larger than after its first
/// 2,000: the pages of deleted rows are reused, and given back.
#[tokio::test]
async fn with_retention_the_sqlite_file_stops_growing() {
    let clock = std::sync::Arc::new(crate::time::ManualClock::new());
    let db = TestDb::sqlite();
    let store = db.open_with_clock(clock.clone()).await;
    let mut first = 0;
    for round in 0..10 {
        for batch in 0..4 {
            let names: Vec<String> = (0..500).map(|i| format!("r{round}-{batch}-{i}")).collect();
            ended_runs(&store, &names).await;
        }
        // The database as its pages stand (the file once the WAL is copied back), at its
        // largest: 2,000 runs in.
        let size: i64 = logical_size(&store).await;
        // Retention of a second: everything ended before now goes.
        clock.advance(std::time::Duration::from_secs(2));
        let before = store.now_ms() - 1000;
        // Audit rows carry the wall clock's time, not this test's clock: all of them go.
        while store
            .prune_batch(before, i64::MAX, 500, false)
            .await
            .unwrap()
            .total()
            > 0
        {}
        // The first 2,000 runs, and the next (the file's own layout settling in), set the
        // size; from then on it holds within 20 %.
        if round <= 1 {
            first = first.max(size);
        }
        assert!(
            size <= first + first / 5,
            "round {round}: {size} bytes, after the first 2,000 runs {first}"
        );
    }
    // Everything pruned, the pages went back: smaller than it ever was (incremental vacuum).
    let emptied: i64 = logical_size(&store).await;
    assert!(emptied < first / 2, "{emptied} bytes left of {first}");
}

/// A store built at each earlier schema version, with a run, its step, an approval and an
/// audit row written as that version knew them, opens in this build with all of it readable.
#[tokio::test]
async fn a_store_from_every_earlier_schema_opens_with_its_record_intact() {
    for version in 1..MIGRATIONS.len() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = rusqlite::Connection::open(dir.path().join("reflex.db")).unwrap();
            for sql in &MIGRATIONS[..version] {
                c.execute_batch(sql).unwrap();
            }
            c.pragma_update(None, "user_version", version as i64)
                .unwrap();
            c.execute_batch(
                r#"INSERT INTO alerts (id, received_at, source, fingerprint, status, starts_at, labels, annotations)
                     VALUES (1, 1764900000000, 'alertmanager', 'f1', 'firing', '2026-12-05T00:00:00Z', '{"alertname":"DiskFull"}', '{"summary":"disk full"}');
                   INSERT INTO runs (id, playbook, alert_id, fingerprint, starts_at, alert_status, cooldown_key, state, created_at, started_at, finished_at)
                     VALUES (1, 'disk-cleanup', 1, 'f1', '2026-12-05T00:00:00Z', 'firing', '', 'succeeded', 1764900000000, 1764900000100, 1764900000200);
                   INSERT INTO steps (run_id, idx, name, action, args, on_failure, state, output)
                     VALUES (1, 0, 'clean', 'log', '{"message":"m"}', 'stop', 'succeeded', '{"message":"m"}');
                   INSERT INTO audit (at, actor, action, target, outcome) VALUES (1764900000300, 'alice', 'approve', 'run 1', 'ok');"#,
            )
            .unwrap();
            if version >= 2 {
                c.execute_batch(
                    r#"INSERT INTO approvals (run_id, step_idx, scope, state, action, action_hash, required, created_at, expires_at, decided_by)
                         VALUES (1, 0, 'run', 'approved', '{"target":"db-1","steps":[]}', 'ab12', 1, 1764900000050, 1764901800000, 'alice');"#,
                )
                .unwrap();
            }
        }
        let store = Store::open(dir.path()).unwrap_or_else(|e| panic!("version {version}: {e}"));
        let run = store.get_run(1).await.unwrap().expect("the run");
        assert_eq!(
            (run.playbook.as_str(), run.state),
            ("disk-cleanup", RunState::Succeeded),
            "version {version}"
        );
        assert_eq!(run.alert.annotations["summary"], "disk full");
        let steps = run.steps.unwrap();
        assert_eq!(
            (steps[0].name.as_str(), steps[0].output.clone()),
            ("clean", Some(serde_json::json!({"message": "m"})))
        );
        let audit = store
            .audit_search(AuditFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(audit.len(), 1, "version {version}");
        // The rows written before the chain are chained when it opens, and new ones follow.
        assert!(audit[0].hash.is_some(), "version {version}");
        store
            .audit("bob", "killswitch.engage", None, "ok", None)
            .await
            .unwrap();
        let report = store.verify_audit().await.unwrap();
        assert_eq!((report.rows, report.broken), (2, None), "version {version}");
        if version >= 2 {
            let approvals = store.list_approvals(None, 10).await.unwrap();
            assert_eq!(
                approvals[0].decided_by.as_deref(),
                Some("alice"),
                "version {version}"
            );
        }
    }
}

/// A store with six audit rows, chained; their ids, oldest first.
async fn audited(db: &TestDb) -> (Store, Vec<i64>) {
    let store = db.open().await;
    for i in 0..6 {
        let detail = (i % 2 == 0).then(|| format!("because {i}"));
        (store.audit(
            "alice",
            "run.cancel",
            Some(format!("run/{i}")),
            "ok",
            detail,
        ))
        .await
        .unwrap();
    }
    let ids = store
        .read(|c| c.rows("SELECT id FROM audit ORDER BY id", &[], |r| r.get(0)))
        .await
        .unwrap();
    (store, ids)
}

async fn tamper(store: &Store, sql: &'static str, id: i64) {
    store.write(move |c| c.exec(sql, &[&id])).await.unwrap();
}

on_both_backends! {
async fn an_intact_audit_chain_verifies(db: TestDb) {
    let (store, ids) = audited(&db).await;
    let report = store.verify_audit().await.unwrap();
    assert_eq!(
        report,
        ChainReport { rows: 6, first: ids.first().copied(), last: ids.last().copied(), anchor: 0, broken: None }
    );
    // Each row's hash is in the API's rows, distinct.
    let rows = store.audit_log(None, 10).await.unwrap();
    let hashes: std::collections::HashSet<_> = rows.iter().filter_map(|r| r.hash.clone()).collect();
    assert_eq!(hashes.len(), 6);
}

async fn an_edited_audit_row_is_named(db: TestDb) {
    let (store, ids) = audited(&db).await;
    tamper(&store, "UPDATE audit SET detail = 'nothing to see' WHERE id = ?1", ids[2]).await;
    let broken = store.verify_audit().await.unwrap().broken.expect("broken");
    assert_eq!(broken.id, ids[2]);
    assert!(broken.why.contains("changed after it was written"), "{}", broken.why);
    // Who did it is covered as well as what was said.
    let db = db.fresh();
    let (store, ids) = audited(&db).await;
    tamper(&store, "UPDATE audit SET actor = 'mallory' WHERE id = ?1", ids[4]).await;
    assert_eq!(store.verify_audit().await.unwrap().broken.unwrap().id, ids[4]);
}

async fn a_deleted_audit_row_names_the_row_after_it(db: TestDb) {
    let (store, ids) = audited(&db).await;
    tamper(&store, "DELETE FROM audit WHERE id = ?1", ids[3]).await;
    let broken = store.verify_audit().await.unwrap().broken.expect("broken");
    assert_eq!(broken.id, ids[4]);
    assert!(broken.why.contains(&format!("does not follow row {}", ids[2])), "{}", broken.why);
    // The newest row deleted: no row matches the head.
    let db = db.fresh();
    let (store, ids) = audited(&db).await;
    tamper(&store, "DELETE FROM audit WHERE id = ?1", ids[5]).await;
    let broken = store.verify_audit().await.unwrap().broken.expect("broken");
    assert_eq!(broken.id, ids[5]);
    assert!(broken.why.contains("newest rows were deleted"), "{}", broken.why);
}

async fn retention_anchors_the_audit_chain(db: TestDb) {
    let (store, ids) = audited(&db).await;
    let later = store.now_ms() + 1;
    // Two rows a batch, the runs left alone: the oldest rows go, a prefix at a time.
    let pruned = store.prune_batch(0, later, 2, false).await.unwrap();
    assert_eq!(pruned.rows[5], 2);
    store.audit("bob", "killswitch.engage", None, "ok", None).await.unwrap();
    let report = store.verify_audit().await.unwrap();
    assert_eq!((report.rows, report.anchor, report.broken), (5, ids[1], None));
    // With a sink that has not had them yet, rows are kept.
    assert_eq!(store.audit_sink_claim(60_000).await.unwrap(), Some(0));
    assert_eq!(store.prune_batch(0, later, 10, true).await.unwrap().rows[5], 0);
    assert!(store.audit_sink_sent(ids[3]).await.unwrap());
    assert_eq!(store.prune_batch(0, later, 10, true).await.unwrap().rows[5], 2);
    assert_eq!(store.verify_audit().await.unwrap().broken, None);
    // Deleting the oldest row kept is not retention: the next one does not follow the anchor.
    tamper(&store, "DELETE FROM audit WHERE id = ?1", ids[4]).await;
    let broken = store.verify_audit().await.unwrap().broken.expect("broken");
    assert_eq!(broken.id, ids[5]);
    assert!(broken.why.contains("the last one retention deleted"), "{}", broken.why);
}

async fn replicas_appending_at_once_keep_chains_that_verify(db: TestDb) {
    let a = db.open().await;
    let b = match db {
        TestDb::Postgres(_) => db.open().await,
        TestDb::Sqlite(_) => a.clone(),
    };
    let append = |store: Store, who: &'static str| {
        tokio::spawn(async move {
            let writes = (0..100).map(|i| store.audit(who, "run.cancel", Some(format!("run/{i}")), "ok", None));
            for w in futures_util::future::join_all(writes).await {
                w.unwrap();
            }
        })
    };
    let (x, y) = tokio::join!(append(a.clone(), "alice"), append(b, "bob"));
    x.unwrap();
    y.unwrap();
    let report = a.verify_audit().await.unwrap();
    assert_eq!((report.rows, report.broken), (200, None));
}

async fn replicas_racing_for_the_last_unit_of_a_budget_one_wins(db: TestDb) {
    let clock = std::sync::Arc::new(crate::time::ManualClock::new());
    let a = db.open_with_clock(clock.clone()).await;
    let b = match db {
        TestDb::Postgres(_) => db.open_with_clock(clock.clone()).await,
        TestDb::Sqlite(_) => a.clone(),
    };
    let limits = || {
        vec![
            BudgetLimit { name: "kube.delete_pod".into(), max: 3, per_ms: 3_600_000 },
            BudgetLimit { name: "*".into(), max: 100, per_ms: 3_600_000 },
        ]
    };
    for step in 0..2 {
        assert_eq!(a.spend_budgets(limits(), 1, step, true).await.unwrap(), None);
    }
    // Twenty tries at once from two replicas for the one unit left.
    let tries = (0..20).map(|i| {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let limits = limits();
        tokio::spawn(async move { store.spend_budgets(limits, 2, i, true).await.unwrap() })
    });
    let won = futures_util::future::join_all(tries)
        .await
        .into_iter()
        .filter(|r| r.as_ref().unwrap().is_none())
        .count();
    assert_eq!(won, 1, "exactly one replica has the last unit");
    let spent = a.spend_budgets(limits(), 3, 0, true).await.unwrap().expect("spent");
    assert_eq!((spent.name.as_str(), spent.used), ("kube.delete_pod", 3));
    // A refused step took nothing from the wider budget: three units of `*` in all.
    let star = vec![BudgetLimit { name: "*".into(), max: 3, per_ms: 3_600_000 }];
    assert_eq!(a.spend_budgets(star.clone(), 3, 1, false).await.unwrap().map(|x| x.used), Some(3));
    // Looking takes nothing; the window slides: an hour on, there is room again.
    assert_eq!(spent.frees_at, a.now_ms() + 3_600_000);
    clock.advance(std::time::Duration::from_secs(3601));
    assert_eq!(a.spend_budgets(limits(), 4, 0, true).await.unwrap(), None);
}

async fn one_replica_at_a_time_sends_the_audit(db: TestDb) {
    let (a, ids) = audited(&db).await;
    assert_eq!(a.audit_sink_claim(60_000).await.unwrap(), Some(0));
    assert_eq!(
        a.audit_after(0, 4).await.unwrap().iter().map(|r| r.id).collect::<Vec<_>>(),
        ids[..4]
    );
    assert!(a.audit_sink_sent(ids[3]).await.unwrap());
    assert_eq!(a.audit_sink_claim(60_000).await.unwrap(), Some(ids[3]), "renewed, where it was");
    if let TestDb::Postgres(_) = db {
        let b = db.open().await;
        assert_eq!(b.audit_sink_claim(60_000).await.unwrap(), None, "held by the other");
        assert!(!b.audit_sink_sent(ids[5]).await.unwrap(), "only the holder moves it");
        // A hold that has run out is taken over, from where the last holder got to.
        a.audit_sink_claim(-1).await.unwrap();
        assert_eq!(b.audit_sink_claim(60_000).await.unwrap(), Some(ids[3]));
    }
}
}

#[tokio::test]
async fn a_store_newer_than_this_build_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path()).unwrap());
    // The first store's writer may still be closing its connection (a checkpoint): wait.
    let c = rusqlite::Connection::open(dir.path().join("reflex.db")).unwrap();
    c.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    c.pragma_update(None, "user_version", 999).unwrap();
    drop(c);
    // The first store's lock on the directory goes with its file, which a process another
    // test forks meanwhile holds until it execs: wait for that too.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let e = loop {
        match Store::open(dir.path()) {
            Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::yield_now()
            }
            opened => break opened.err().expect("refused").to_string(),
        }
    };
    assert!(
        e.contains("version 999") && e.contains(&format!("(version {})", MIGRATIONS.len())),
        "{e}"
    );
}

/// A backup taken while runs are being written holds every run committed before it began,
/// and opens as a store.
#[tokio::test]
async fn a_backup_under_load_holds_everything_committed_before_it_and_opens() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let busy = store.clone();
    let load = tokio::spawn(async move {
        for round in 0.. {
            let names: Vec<String> = (0..50).map(|i| format!("l{round}-{i}")).collect();
            ended_runs(&busy, &names).await;
        }
    });
    // Some of the load is in; what is committed now must be in the copy.
    let committed = loop {
        let ids: Vec<i64> = store
            .read(|c| c.rows("SELECT id FROM runs", &[], |r| r.get(0)))
            .await
            .unwrap();
        if ids.len() >= 200 {
            break ids;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let out = tempfile::tempdir().unwrap();
    let copy = out.path().join("reflex.db");
    let (from, to) = (dir.path().to_path_buf(), copy.clone());
    let version = tokio::task::spawn_blocking(move || backup(&from, &to))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(version, MIGRATIONS.len() as i64);
    load.abort();
    let restored = Store::open(out.path()).unwrap();
    let copied: std::collections::HashSet<i64> = restored
        .read(|c| c.rows("SELECT id FROM runs", &[], |r| r.get(0)))
        .await
        .unwrap()
        .into_iter()
        .collect();
    let missing: Vec<&i64> = committed.iter().filter(|id| !copied.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{} runs committed before the backup are missing",
        missing.len()
    );
    // A backup never overwrites.
    let again = backup(dir.path(), &copy).unwrap_err().to_string();
    assert!(again.contains("never overwrites"), "{again}");
}

/// A rolling upgrade on PostgreSQL: a replica of this version starts on a database one
/// (additive) migration ahead, and refuses one two ahead, naming both versions.
#[tokio::test]
async fn an_older_replica_runs_on_a_schema_one_version_ahead_and_refuses_two() {
    let db = TestDb::postgres();
    let store = db.open().await;
    let known = pg::MIGRATIONS_APPLIED as i64;
    let ahead = |v: i64, column: &'static str| {
        let store = store.clone();
        async move {
            store
                .write(move |c| {
                    c.exec(&format!("ALTER TABLE runs ADD COLUMN {column} TEXT"), &[])?;
                    c.exec("INSERT INTO reflex_schema (version) VALUES (?1)", &[&v])
                })
                .await
                .unwrap();
        }
    };
    ahead(known + 1, "next_version_note").await;
    let older = db.open().await;
    let created = intake(
        &older,
        "u1",
        candidate("p", "u1", 0, ""),
        BreakerLimits::default(),
    )
    .await;
    assert!(matches!(created, Outcome::Created { .. }), "{created:?}");
    ahead(known + 2, "later_version_note").await;
    let TestDb::Postgres(name) = &db else {
        unreachable!()
    };
    let settings = crate::testkit::PgServer::shared().settings(name);
    let refused = Store::open_pg(settings, std::sync::Arc::new(crate::time::SystemClock))
        .await
        .err()
        .expect("two versions ahead is refused")
        .to_string();
    assert!(
        refused.contains(&format!("version {}", known + 2))
            && refused.contains(&format!("(version {known},")),
        "{refused}"
    );
}

/// The round trips the writer waits for, for one alert alone from the webhook to its first
/// step running (PostgreSQL; SQLite has none), and for that run's end: statements not waited
/// for go with the next that is, and the batch's locks with its first.
#[tokio::test]
async fn one_alert_alone_costs_few_round_trips_on_postgres() {
    let db = TestDb::postgres();
    let store = db.open().await;
    let limits = BreakerLimits {
        window_ms: 600_000,
        max_runs: 100,
        max_runs_per_playbook: 50,
        max_failures: 10,
        max_targets: 50,
    };
    let start = StartNow {
        slots: 10,
        max_per_target: 1,
    };
    // Every statement prepared once on the writer's connection first.
    for i in 0..2 {
        let item = IntakeItem {
            deferred: None,
            alert: alert(&format!("warm{i}")),
            received_us: 0,
            candidates: vec![candidate("pb", &format!("w{i}"), 60_000, &format!("w{i}"))],
        };
        let run = store
            .record_and_start(vec![item], limits, start)
            .await
            .unwrap()
            .started;
        store
            .run_finished(run[0].id, RunState::Succeeded, None, None, limits, false)
            .await
            .unwrap();
    }
    let before = store.write_counts();
    let item = IntakeItem {
        deferred: None,
        alert: alert("h1"),
        received_us: 0,
        candidates: vec![candidate("pb", "t1", 60_000, "h1")],
    };
    let run = store
        .record_and_start(vec![item], limits, start)
        .await
        .unwrap()
        .started;
    assert_eq!(run.len(), 1, "started at intake");
    let intake = store.write_counts();
    store
        .run_finished(run[0].id, RunState::Succeeded, None, None, limits, false)
        .await
        .unwrap();
    let end = store.write_counts();
    let trips = (
        intake.round_trips - before.round_trips,
        end.round_trips - intake.round_trips,
    );
    let statements = (
        intake.statements - before.statements,
        end.statements - intake.statements,
    );
    eprintln!("round trips {trips:?}, statements {statements:?}");
    assert!(
        trips.0 <= 2,
        "intake: {trips:?} round trips, {statements:?} statements"
    );
    assert!(
        trips.1 <= 1,
        "run end: {trips:?} round trips, {statements:?} statements"
    );
}

/// A claim of many runs on PostgreSQL: the heads listed, every head's try-lock, and every
/// claim each go out in one round trip (with the transaction's start and end), not two round
/// trips a run.
#[tokio::test]
async fn a_claim_of_many_runs_costs_a_few_round_trips_on_postgres() {
    let db = TestDb::postgres();
    let store = db.open().await;
    let none = BreakerLimits::default();
    let queue = |from: usize| {
        (from..from + 17)
            .map(|i| IntakeItem {
                deferred: None,
                alert: alert(&format!("h{i}")),
                received_us: 0,
                candidates: vec![candidate("p", &format!("t{i}"), 0, "")],
            })
            .collect()
    };
    // Every statement prepared once on the writer's connection first.
    store.record_intake(queue(0), none).await.unwrap();
    assert_eq!(store.claim(1, 17).await.unwrap().len(), 17);
    store.record_intake(queue(100), none).await.unwrap();
    let oldest: Vec<i64> = store
        .read(|c| {
            c.rows(
                "SELECT id FROM runs WHERE state = 'pending' ORDER BY id LIMIT 16",
                &[],
                |r| r.get(0),
            )
        })
        .await
        .unwrap();
    let before = store.write_counts();
    let claimed = store.claim(1, 16).await.unwrap();
    let trips = store.write_counts().round_trips - before.round_trips;
    let ids: Vec<i64> = claimed.iter().map(|r| r.id).collect();
    assert_eq!(ids, oldest, "the 16 oldest");
    // Each run loaded with its own alert and steps (their reads went out together).
    for run in &claimed {
        let instance = run.alert.labels.get("instance").map(String::as_str);
        assert_eq!(
            instance,
            Some(&*format!("h{}", &run.target[1..])),
            "run {}",
            run.id
        );
        assert_eq!(run.steps.len(), 1, "run {}", run.id);
    }
    eprintln!("{trips} round trips to claim 16 runs");
    assert!(trips <= 4, "{trips} round trips to claim 16 runs");
}

// A batch's alerts are decided as if one after the other, though on PostgreSQL their reads
// go out together ahead of every write (one round trip for the batch): an alert's answers
// are read again where an alert before it in the batch recorded a run for the same
// occurrence, target or cooldown key.
on_both_backends! {
async fn alerts_of_one_batch_see_the_runs_recorded_before_them_in_it(db: TestDb) {
    let store = db.open().await;
    let none = BreakerLimits::default();
    let start = StartNow {
        slots: 1,
        max_per_target: 1,
    };
    let hour = 3_600_000;
    let jobs = [
        ("a", "p", "t1", 0, ""),
        ("a", "p", "t1", 0, ""),     // the same occurrence: a duplicate
        ("b", "p", "t1", 0, ""),     // the same target, full: queued
        ("c", "p", "t2", hour, "k"), // started, its cooldown begins
        ("d", "p", "t3", hour, "k"), // the same cooldown key: held
        ("e", "q", "t4", 0, ""),
        ("f", "q", "t5", 0, ""),
        ("g", "q", "t6", 0, ""),
    ];
    let intake = |(instance, playbook, target, cooldown_ms, key): (&str, &str, &str, i64, &str)| {
        let store = store.clone();
        let item = IntakeItem {
            deferred: None,
            alert: alert(instance),
            received_us: 0,
            candidates: vec![candidate(playbook, target, cooldown_ms, key)],
        };
        tokio::spawn(async move { store.record_and_start(vec![item], none, start).await })
    };
    // Warm: every statement prepared, so that the batch's round trips are its own.
    for i in 0..2 {
        intake((&format!("warm{i}"), "w", &format!("w{i}"), hour, "w"))
            .await
            .unwrap()
            .unwrap();
    }
    // What holding the writer costs alone.
    let before = store.write_counts();
    let (blocker, release) = hold_writer(&store).await;
    drop(release);
    blocker.await.unwrap().unwrap();
    let hold = store.write_counts().round_trips - before.round_trips;
    // The jobs in one batch: their results, and its round trips.
    let batch = async |jobs: &[(&str, &str, &str, i64, &str)]| {
        let before = store.write_counts();
        let (blocker, release) = hold_writer(&store).await;
        let pending: Vec<_> = jobs.iter().copied().map(intake).collect();
        while store.queued_writes() < jobs.len() {
            tokio::task::yield_now().await;
        }
        drop(release);
        blocker.await.unwrap().unwrap();
        let mut recorded = Vec::new();
        for p in pending {
            recorded.push(p.await.unwrap().unwrap());
        }
        let after = store.write_counts();
        assert_eq!(after.commits - before.commits, 2, "the held write, then one batch");
        (recorded, after.round_trips - before.round_trips - hold)
    };

    let (recorded, trips) = batch(&jobs).await;
    let outcome = |i: usize| &recorded[i].outcomes[0][0];
    let started = |i: usize| recorded[i].started.len();
    assert!(matches!(outcome(0), Outcome::Created { .. }) && started(0) == 1, "{:?}", outcome(0));
    assert!(
        matches!(outcome(1), Outcome::Deduplicated { run_id, .. } if *run_id == outcome(0).run_id()),
        "{:?}",
        outcome(1)
    );
    assert!(matches!(outcome(2), Outcome::Created { .. }), "{:?}", outcome(2));
    assert_eq!(started(2), 0, "t1 has a run executing: the second waits");
    assert!(matches!(outcome(3), Outcome::Created { .. }) && started(3) == 1, "{:?}", outcome(3));
    assert_eq!(cause(outcome(4)), Some(Hold::Cooldown), "{:?}", outcome(4));
    for i in 5..8 {
        assert!(matches!(outcome(i), Outcome::Created { .. }) && started(i) == 1, "{:?}", outcome(i));
    }
    let distinct: Vec<_> = (0..8)
        .map(|i| (format!("x{i}"), format!("x{i}")))
        .collect();
    let distinct: Vec<_> = (distinct.iter())
        .map(|(instance, target)| (instance.as_str(), "r", target.as_str(), hour, instance.as_str()))
        .collect();
    let (recorded, distinct_trips) = batch(&distinct).await;
    assert!(recorded.iter().all(|r| r.started.len() == 1));

    // A run's end in the batch (a write of anything), though sent after the alerts, goes
    // before their reads: the alert for its target finds the room it left.
    let ended = recorded[0].started[0].id;
    // Warm: the end's statements prepared.
    let warm = recorded[1].started[0].id;
    (store.run_finished(warm, RunState::Succeeded, None, None, none, false))
        .await
        .unwrap();
    let before = store.write_counts();
    let (blocker, release) = hold_writer(&store).await;
    let again = intake(("y0", "r", "x0", 0, ""));
    let other = intake(("y1", "r", "y1", 0, ""));
    while store.queued_writes() < 2 {
        tokio::task::yield_now().await;
    }
    let s = store.clone();
    let end = tokio::spawn(async move {
        s.run_finished(ended, RunState::Succeeded, None, None, none, false)
            .await
    });
    while store.queued_writes() < 3 {
        tokio::task::yield_now().await;
    }
    drop(release);
    blocker.await.unwrap().unwrap();
    end.await.unwrap().unwrap();
    let (again, other) = (again.await.unwrap().unwrap(), other.await.unwrap().unwrap());
    let after = store.write_counts();
    assert_eq!(after.commits - before.commits, 2, "the held write, then one batch");
    assert_eq!(again.started.len(), 1, "x0's run ended in the same batch");
    assert_eq!(other.started.len(), 1);
    let ended_trips = after.round_trips - before.round_trips - hold;

    // With the breaker counting runs, its counts go once for the batch and each alert folds
    // in the runs recorded before it: the limit holds exactly.
    let limits = BreakerLimits {
        window_ms: hour,
        max_runs: 1000,
        max_runs_per_playbook: 3,
        max_targets: 1000,
        ..Default::default()
    };
    let counted = |i: usize, playbook: &str| {
        let store = store.clone();
        let item = IntakeItem {
            deferred: None,
            alert: alert(&format!("z{i}")),
            received_us: 0,
            candidates: vec![candidate(playbook, &format!("z{i}"), 0, "")],
        };
        tokio::spawn(async move { store.record_and_start(vec![item], limits, start).await })
    };
    // Warm: the count's statement prepared.
    counted(9, "b0").await.unwrap().unwrap();
    let before = store.write_counts();
    let (blocker, release) = hold_writer(&store).await;
    let counted: Vec<_> = (0..5).map(|i| counted(i, "b")).collect();
    while store.queued_writes() < 5 {
        tokio::task::yield_now().await;
    }
    drop(release);
    blocker.await.unwrap().unwrap();
    let mut outcomes = Vec::new();
    for c in counted {
        outcomes.push(c.await.unwrap().unwrap().outcomes.remove(0).remove(0));
    }
    let after = store.write_counts();
    assert_eq!(after.commits - before.commits, 2, "the held write, then one batch");
    let created = (outcomes.iter())
        .filter(|o| matches!(o, Outcome::Created { .. }))
        .count();
    assert_eq!(created, 3, "{outcomes:?}");
    assert_eq!(cause(&outcomes[3]), Some(Hold::Breaker), "{outcomes:?}");
    let counted_trips = after.round_trips - before.round_trips - hold;

    if store.path().is_none() {
        // Job by job it was a round trip an alert, then the commit's. Now: the batch's (every
        // alert's insert and reads), one for each of the three alerts whose answers an earlier
        // one changed, the audit head's, the commit's.
        assert!(trips <= 6, "{trips} round trips for the batch of {} alerts", jobs.len());
        assert!(distinct_trips <= 3, "{distinct_trips} round trips for 8 distinct alerts");
        assert!(ended_trips <= 3, "{ended_trips} round trips for an end and 2 alerts");
        // The batch's, the trip's, the fifth alert's reads again after the trip (a write of
        // the switches), the audit head's, the commit's, and those preparing the trip's
        // statements on their first use: not one for each alert (13 when it was).
        assert!(counted_trips <= 10, "{counted_trips} round trips for 5 counted alerts");
    }
}
}

/// Alerts (instance, target), all of playbook `p`, recorded in one batch: their outcomes and
/// the batch's round trips (less `hold`, those of the held write that gathers them).
async fn in_one_batch(
    store: &Store,
    alerts: &[(&str, &str)],
    limits: BreakerLimits,
    hold: u64,
) -> (Vec<Outcome>, u64) {
    let before = store.write_counts();
    let (blocker, release) = hold_writer(store).await;
    let pending: Vec<_> = (alerts.iter())
        .map(|(instance, target)| {
            let store = store.clone();
            let item = IntakeItem {
                deferred: None,
                alert: alert(instance),
                received_us: 0,
                candidates: vec![candidate("p", target, 0, "")],
            };
            tokio::spawn(async move { store.record_intake(vec![item], limits).await })
        })
        .collect();
    while store.queued_writes() < alerts.len() {
        tokio::task::yield_now().await;
    }
    drop(release);
    blocker.await.unwrap().unwrap();
    let mut outcomes = Vec::new();
    for p in pending {
        outcomes.push(p.await.unwrap().unwrap().remove(0).remove(0));
    }
    let after = store.write_counts();
    assert_eq!(
        after.commits - before.commits,
        2,
        "the held write, then one batch"
    );
    (outcomes, after.round_trips - before.round_trips - hold)
}

// The breaker's counts are read once for a batch (on PostgreSQL, with its first round trip,
// before any of its runs is recorded), and each alert's limits are checked on them with the
// runs recorded before it in the batch folded in: exactly as if one after the other.
on_both_backends! {
async fn the_breakers_counts_in_one_batch_fold_in_the_runs_recorded_before_each_alert(db: TestDb) {
    let hour = 3_600_000;
    let created = |o: &[Outcome]| {
        (o.iter())
            .map(|o| matches!(o, Outcome::Created { .. }))
            .collect::<Vec<_>>()
    };
    let breaker = |o: &Outcome| match o {
        Outcome::Suppressed {
            cause: Hold::Breaker,
            reason,
            ..
        } => reason.clone(),
        other => panic!("not held by the breaker: {other:?}"),
    };
    // Runs: one before, three in a batch (none trips), then two in one batch: the first is
    // the fifth run, the second would be the sixth.
    let store = db.open().await;
    let runs = BreakerLimits {
        window_ms: hour,
        max_runs: 5,
        ..Default::default()
    };
    // Warm (every statement prepared) and counted: the window's first run.
    intake(&store, "w", candidate("p", "w", 0, ""), runs).await;
    let before = store.write_counts();
    let (blocker, release) = hold_writer(&store).await;
    drop(release);
    blocker.await.unwrap().unwrap();
    let hold = store.write_counts().round_trips - before.round_trips;
    let batch = [("a", "a"), ("b", "b"), ("c", "c")];
    let (o, trips) = in_one_batch(&store, &batch, runs, hold).await;
    assert_eq!(created(&o), [true; 3], "{o:?}");
    let (o, _) = in_one_batch(&store, &[("d", "d"), ("e", "e")], runs, hold).await;
    assert_eq!(created(&o), [true, false], "{o:?}");
    assert!(breaker(&o[1]).contains("breaker.max_runs = 5"), "{o:?}");
    if store.path().is_none() {
        // The batch's (every insert, read and count), the audit head's, the commit's: not
        // one for each alert's counts, whatever runs were recorded before it.
        assert!(trips <= 3, "{trips} round trips for 3 counted alerts");
    }

    // Distinct targets: a target acted on already adds none, a new one adds one.
    let db = db.fresh();
    let store = db.open().await;
    let targets = BreakerLimits {
        window_ms: hour,
        max_runs: 100,
        max_targets: 3,
        ..Default::default()
    };
    intake(&store, "w", candidate("p", "w", 0, ""), targets).await;
    let batch = [("a", "t1"), ("b", "t1"), ("c", "t2"), ("d", "t1"), ("e", "t3")];
    let (o, _) = in_one_batch(&store, &batch, targets, hold).await;
    assert_eq!(created(&o), [true, true, true, true, false], "{o:?}");
    assert!(breaker(&o[4]).contains("breaker.max_targets = 3"), "{o:?}");

    // Behind an engaged switch the counts are not sent ahead (the alerts are held before the
    // breaker is asked); once it is released, the first batch reads them when it asks, once,
    // and the limit holds exactly from the release on.
    let db = db.fresh();
    let clock = std::sync::Arc::new(crate::time::ManualClock::new());
    let store = db.open_with_clock(clock.clone()).await;
    let switch = |engaged: bool| {
        let store = store.clone();
        async move {
            let reason = String::from("storm");
            (store.set_switch("global".into(), engaged, reason, "op".into(), None))
                .await
                .unwrap()
        }
    };
    intake(&store, "w", candidate("p", "w", 0, ""), runs).await;
    switch(true).await;
    clock.advance(std::time::Duration::from_millis(1));
    let (o, _) = in_one_batch(&store, &[("h1", "h1"), ("h2", "h2")], runs, hold).await;
    assert!(o.iter().all(|o| cause(o) == Some(Hold::KillSwitch)), "{o:?}");
    switch(false).await;
    clock.advance(std::time::Duration::from_millis(1));
    let batch: Vec<_> = (0..6).map(|i| format!("r{i}")).collect();
    let batch: Vec<_> = batch.iter().map(|i| (i.as_str(), i.as_str())).collect();
    let (o, trips) = in_one_batch(&store, &batch, runs, hold).await;
    assert_eq!(created(&o), [true, true, true, true, true, false], "{o:?}");
    assert!(breaker(&o[5]).contains("breaker.max_runs = 5"), "{o:?}");
    if store.path().is_none() {
        // The batch's, the count's (read when the first alert asks, kept for the others), the
        // trip's, the audit head's, the commit's: not one more for each alert.
        assert!(trips <= 6, "{trips} round trips for 6 counted alerts");
    }
}
}
