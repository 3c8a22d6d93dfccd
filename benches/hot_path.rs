//! Criterion benchmarks of the intake hot path: parse a webhook, match an alert against 1,000
//! playbooks, render a step, one store write of a run, the queue, and a run's end with its chat
//! message kept. `cargo bench --bench hot_path`.

use criterion::{Criterion, criterion_group, criterion_main};
use reflex::alert::AlertmanagerPayload;
use reflex::playbook::PlaybookSet;
use reflex::store::{BreakerLimits, Candidate, EndMessage, IntakeItem, RunState, Store, Untold};
use std::hint::black_box;

const PAYLOAD: &str = include_str!("../tests/fixtures/alertmanager-disk.json");

/// 1,000 playbooks: most keyed by an `alertname` equality, some by regex only.
fn playbooks(dir: &std::path::Path) -> PlaybookSet {
    for i in 0..1000 {
        let matcher = if i % 100 == 99 {
            format!("alertname=~\"Regex{i}|Other{i}\"")
        } else {
            format!("alertname=\"Alert{i}\"")
        };
        let yaml = format!(
            "name: pb-{i}\nmatchers: ['{matcher}', 'severity=~\"warning|critical\"']\nwhen: 'labels.mountpoint != \"/boot\"'\nparams:\n  host: \"{{{{ host(labels.instance) }}}}\"\nsteps:\n  - action: log\n    with: {{ message: \"Disk space low on {{{{ params.host }}}} ({{{{ labels.mountpoint }}}})\" }}\n"
        );
        std::fs::write(dir.join(format!("pb-{i}.yaml")), yaml).unwrap();
    }
    PlaybookSet::load(&[dir.to_path_buf()], &Default::default()).unwrap()
}

fn bench(c: &mut Criterion) {
    c.bench_function("parse_alertmanager_payload", |b| {
        b.iter(|| {
            let p: AlertmanagerPayload = serde_json::from_str(black_box(PAYLOAD)).unwrap();
            p.into_alerts().unwrap()
        })
    });

    let dir = tempfile::tempdir().unwrap();
    let set = playbooks(dir.path());
    let mut alert = serde_json::from_str::<AlertmanagerPayload>(PAYLOAD)
        .unwrap()
        .into_alerts()
        .unwrap()
        .remove(0);
    alert.labels.insert("alertname".into(), "Alert500".into());
    assert_eq!(set.evaluate(&alert).len(), 1);
    c.bench_function("match_and_plan_one_alert_against_1000_playbooks", |b| {
        b.iter(|| set.evaluate(black_box(&alert)))
    });

    let mut miss = alert.clone();
    miss.labels.insert("alertname".into(), "NoSuchAlert".into());
    c.bench_function("match_unmatched_alert_against_1000_playbooks", |b| {
        b.iter(|| set.evaluate(black_box(&miss)))
    });

    let pb = set.get("pb-500").unwrap().clone();
    c.bench_function("render_params_and_steps", |b| {
        b.iter(|| {
            let mut scope = reflex::playbook::script::alert_scope(black_box(&alert));
            pb.plan(&set.sandbox, &mut scope).unwrap()
        })
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let store = Store::open(data.path()).unwrap();
    let plan = set.evaluate(&alert).remove(0).plan.unwrap();
    let mut n = 0u64;
    c.bench_function("store_one_alert_and_run", |b| {
        b.iter(|| {
            n += 1;
            let mut a = alert.clone();
            a.starts_at = format!("2026-01-01T00:00:00.{n:09}Z");
            let item = IntakeItem {
                deferred: None,
                alert: a,
                received_us: 0,
                candidates: vec![Candidate {
                    playbook: "pb-500".into(),
                    cooldown_ms: 0,
                    cooldown_key: "k".into(),
                    dry_run: false,
                    plan: Ok(plan.clone()),
                    deadline_ms: 3_600_000,
                    suppress: None,
                    // Each iteration is a new occurrence of one alert: measure a new run, not
                    // a join of the queued one.
                    coalesce: false,
                    manual: None,
                }],
            };
            rt.block_on(store.record_intake(vec![item], BreakerLimits::default()))
                .unwrap()
        })
    });

    // The queue: one claim (and the end of the claimed run) with a backlog of 100 or 20,000
    // runs waiting behind a busy target (`max_runs_per_target: 1`). The claim takes a free
    // target's run each time; its cost must not grow with the backlog.
    let record = |target: &str, n: usize| {
        // One alert per target: a playbook runs one at a time per alert.
        let mut a = alert.clone();
        a.labels.insert("instance".into(), target.to_string());
        a.fingerprint = reflex::alert::fingerprint(&a.labels);
        a.starts_at = format!("2026-01-01T00:00:00.{n:09}Z");
        let mut p = plan.clone();
        p.target = target.to_string();
        IntakeItem {
            deferred: None,
            alert: a,
            received_us: 0,
            candidates: vec![Candidate {
                playbook: "pb-500".into(),
                cooldown_ms: 0,
                cooldown_key: String::new(),
                dry_run: false,
                plan: Ok(p),
                deadline_ms: 3_600_000,
                suppress: None,
                coalesce: false,
                manual: None,
            }],
        }
    };
    for backlog in [100usize, 20_000] {
        let data = tempfile::tempdir().unwrap();
        let store = Store::open_with(data.path(), reflex::config::Synchronous::Normal).unwrap();
        let items: Vec<IntakeItem> = (0..backlog).map(|i| record("busy", i)).collect();
        rt.block_on(store.record_intake(items, BreakerLimits::default()))
            .unwrap();
        // The busy target's head runs; the rest of its backlog waits.
        assert_eq!(rt.block_on(store.claim(1, 1)).unwrap().len(), 1);
        let mut n = backlog;
        c.bench_function(
            &format!("claim_with_{backlog}_queued_behind_a_busy_target"),
            |b| {
                b.iter(|| {
                    n += 1;
                    rt.block_on(async {
                        store
                            .record_intake(
                                vec![record(&format!("free-{n}"), n)],
                                BreakerLimits::default(),
                            )
                            .await
                            .unwrap();
                        let claimed = store.claim(1, 1).await.unwrap();
                        assert_eq!(claimed.len(), 1, "the free target's run");
                        succeed(&store, claimed[0].id).await;
                    })
                })
            },
        );
    }

    // A backlog spread over as many targets (a storm on many hosts, more alerts than worker
    // slots): each iteration queues 64 runs on new targets and claims 64, the oldest, then
    // ends them, so the queue stays at its size. The claim's cost must not grow with it.
    for backlog in [100usize, 20_000] {
        let data = tempfile::tempdir().unwrap();
        let store = Store::open_with(data.path(), reflex::config::Synchronous::Normal).unwrap();
        let items = |from: usize, n: usize| -> Vec<IntakeItem> {
            (from..from + n)
                .map(|i| record(&format!("spread-{i}"), i))
                .collect()
        };
        rt.block_on(store.record_intake(items(0, backlog), BreakerLimits::default()))
            .unwrap();
        let mut n = backlog;
        let mut group = c.benchmark_group("queue");
        group.sample_size(20);
        group.bench_function(
            format!("claim_64_with_{backlog}_queued_on_as_many_targets"),
            |b| {
                b.iter(|| {
                    rt.block_on(async {
                        store
                            .record_intake(items(n, 64), BreakerLimits::default())
                            .await
                            .unwrap();
                        n += 64;
                        let claimed = store.claim(1, 64).await.unwrap();
                        assert_eq!(claimed.len(), 64, "the 64 oldest");
                        for run in claimed {
                            succeed(&store, run.id).await;
                        }
                    })
                })
            },
        );
        group.finish();
    }

    // A run's end with its chat message kept in the outbox, then deleted once told, against a
    // bare end: 64 runs ended at once (the writer batches them, as under load), then told.
    let data = tempfile::tempdir().unwrap();
    let store = Store::open_with(data.path(), reflex::config::Synchronous::Normal).unwrap();
    let mut n = 0;
    let mut group = c.benchmark_group("outbox");
    group.sample_size(20);
    for keep in [false, true] {
        let name = if keep {
            "end_64_runs_keeping_their_messages"
        } else {
            "end_64_runs"
        };
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let items = (n..n + 64).map(|i| record(&format!("o-{i}"), i)).collect();
                    n += 64;
                    store
                        .record_intake(items, BreakerLimits::default())
                        .await
                        .unwrap();
                    let claimed = store.claim(1, 64).await.unwrap();
                    let message = |id: i64| {
                        let summary = format!("Cleanup ran. Space reclaimed: {id} GB");
                        EndMessage {
                            summary,
                            report: None,
                        }
                    };
                    let ends = claimed.iter().map(|r| {
                        store.run_finished_telling(
                            r.id,
                            RunState::Succeeded,
                            None,
                            None,
                            BreakerLimits::default(),
                            false,
                            keep.then(|| message(r.id)),
                        )
                    });
                    for end in futures_util::future::join_all(ends).await {
                        end.unwrap();
                    }
                    if keep {
                        let told = claimed.iter().map(|r| {
                            store.told(Untold::End {
                                run_id: r.id,
                                message: message(r.id),
                            })
                        });
                        for t in futures_util::future::join_all(told).await {
                            t.unwrap();
                        }
                    }
                })
            })
        });
    }
    group.finish();
}

/// Ends a claimed run, succeeded.
async fn succeed(store: &Store, id: i64) {
    (store.run_finished(
        id,
        reflex::store::RunState::Succeeded,
        None,
        None,
        BreakerLimits::default(),
        false,
    ))
    .await
    .unwrap();
}

criterion_group!(benches, bench);
criterion_main!(benches);
