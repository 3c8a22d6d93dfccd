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
        match self {
            TestDb::Sqlite(dir) => {
                Store::open_with_clock(dir.path(), crate::config::Synchronous::Full, clock).unwrap()
            }
            TestDb::Postgres(name) => {
                let mut settings = crate::testkit::PgServer::shared().settings(name);
                settings.replica = format!(
                    "replica-{}",
                    NEXT_REPLICA.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                );
                Store::open_pg(settings, clock).await.unwrap()
            }
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

fn alert(instance: &str) -> Alert {
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

fn candidate(playbook: &str, target: &str, cooldown_ms: i64, key: &str) -> Candidate {
    Candidate {
        playbook: playbook.into(),
        cooldown_ms,
        cooldown_key: key.into(),
        dry_run: false,
        plan: Ok(Plan {
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

async fn intake(store: &Store, instance: &str, cand: Candidate, limits: BreakerLimits) -> Outcome {
    let item = IntakeItem {
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
    let store = db.open().await;
    let none = BreakerLimits::default();
    // A first run starts the cooldown.
    let first = intake(&store, "a", candidate("p", "t", 3_600_000, "k"), none).await;
    assert!(matches!(first, Outcome::Created { .. }), "{first:?}");
    store
        .set_switch("global".into(), true, "why".into(), "op".into(), None)
        .await
        .unwrap();
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
    store
        .set_switch("global".into(), false, "released".into(), "op".into(), None)
        .await
        .unwrap();
    let o = intake(&store, "d", candidate("p", "t", 3_600_000, "k"), breaker).await;
    assert_eq!(cause(&o), Some(Hold::Cooldown), "{o:?}");
    let o = intake(&store, "e", candidate("p", "t", 0, "k"), breaker).await;
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
        let store = db.fresh().open().await;
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
        let trip = store
            .run_finished(run_id, RunState::Failed, Some("x".into()), None, limits)
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
        .run_finished(2, RunState::Failed, Some("x".into()), None, limits)
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

/// `target_load` as the triggers keep it, and as it should be from the runs themselves.
async fn target_load(store: &Store) -> (Load, Load) {
    store
        .read(|c| {
            let rows = |sql: &str| c.rows(sql, &[], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)));
            Ok((
                rows("SELECT target, pending, running FROM target_load ORDER BY target")?,
                rows(
                    "SELECT target, count(*) FILTER (WHERE state = 'pending'),
                       count(*) FILTER (WHERE state = 'running') FROM runs
                     WHERE state IN ('pending', 'running') GROUP BY target ORDER BY target",
                )?,
            ))
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
    let (kept, counted) = target_load(&store).await;
    assert_eq!(kept, counted);
    assert_eq!(kept, vec![("busy".into(), 49, 1), ("free".into(), 0, 1)]);
    // Nothing more while both targets are busy; the next busy run once its slot frees.
    assert!(store.claim(1, 10).await.unwrap().is_empty());
    store
        .run_finished(1, RunState::Succeeded, None, None, BreakerLimits::default())
        .await
        .unwrap();
    store
        .run_finished(
            free,
            RunState::Succeeded,
            None,
            None,
            BreakerLimits::default(),
        )
        .await
        .unwrap();
    let next = store.claim(1, 10).await.unwrap();
    assert_eq!(next.iter().map(|r| r.id).collect::<Vec<_>>(), vec![2]);
    let (kept, counted) = target_load(&store).await;
    assert_eq!(kept, counted, "kept consistent through claims and ends");
    assert_eq!(
        kept,
        vec![("busy".into(), 48, 1)],
        "a target with nothing live is removed"
    );
    // Cancelling a queued run keeps the counts right too.
    store.cancel_if_pending(3).await.unwrap();
    let (kept, counted) = target_load(&store).await;
    assert_eq!(kept, counted);
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
