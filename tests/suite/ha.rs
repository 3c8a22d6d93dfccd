//! Several replicas of the real binary on one real PostgreSQL (Debian's, started on loopback
//! by `reflex::testkit`): webhooks spread round-robin across them, every action counted by a
//! local receiver the steps call. Nothing is recorded twice, nothing acts twice, a replica
//! killed with SIGKILL is taken over, and a database restart loses nothing accepted.

use crate::common::TestApp;
use crate::common::receiver::Receiver;
use reflex::testkit::PgServer;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// One step that acts (a POST to the receiver, once per run, named by the alert), then one
/// that waits a moment, so that a kill finds runs between their action and their end.
const PLAYBOOK: &str = r#"
name: act
matchers: ['alertname="Act"']
cooldown: 0s
steps:
  - name: act
    action: http
    with: { method: POST, url: "RECEIVER/act/{{ labels.instance }}" }
  - name: settle
    action: wait
    with: { duration: 20ms }
"#;

/// [`PLAYBOOK`] with its one step that acts and nothing after it.
fn acting_only() -> &'static str {
    PLAYBOOK
        .split("  - name: settle")
        .next()
        .expect("the playbook has its acting step first")
}

/// A cluster: the replicas, the receiver, the database (dropped in that order: the
/// replicas stop before their database does).
struct Cluster {
    replicas: Vec<TestApp>,
    receiver: Receiver,
    /// One client, its connections kept (a client per post costs more than the post).
    http: reqwest::Client,
    pg: PgServer,
    db: String,
}

impl Cluster {
    async fn start(n: usize) -> Cluster {
        Self::start_with(n, PLAYBOOK, "").await
    }

    /// With a playbook of the test's, and extra config for every replica (`RECEIVER` in
    /// either becomes the receiver's address).
    async fn start_with(n: usize, playbook: &str, extra: &str) -> Cluster {
        let pg = PgServer::start(false).unwrap_or_else(|e| panic!("{e}"));
        let db = pg.fresh();
        let receiver = Receiver::start().await;
        let mut replicas = Vec::new();
        for i in 0..n {
            replicas.push(
                TestApp::builder()
                    .playbook("act.yaml", &playbook.replace("RECEIVER", &receiver.base))
                    .config(&format!(
                        "store:\n  url: {}\n  replica: replica-{i}\n\
                         engine:\n  max_concurrent_runs: 64\n  max_runs_per_target: 1\n{}{}",
                        pg.url(&db),
                        // No breaker unless the test sets one.
                        if extra.contains("breaker:") {
                            ""
                        } else {
                            "breaker:\n  max_runs: 0\n  max_runs_per_playbook: 0\n  max_failures: 0\n  max_targets: 0\n"
                        },
                        extra.replace("RECEIVER", &receiver.base)
                    ))
                    .start()
                    .await,
            );
        }
        Cluster {
            pg,
            db,
            receiver,
            replicas,
            http: reqwest::Client::new(),
        }
    }

    /// Rows of a query on the shared database (first column as i64, second as text).
    async fn query(&self, sql: &str) -> Vec<(i64, String)> {
        let config = postgres::Config::from(self.pg.settings(&self.db).config);
        let sql = sql.to_string();
        tokio::task::spawn_blocking(move || {
            let mut c = config.connect(postgres::NoTls).unwrap();
            c.query(sql.as_str(), &[])
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect()
        })
        .await
        .unwrap()
    }

    /// Runs by state.
    async fn states(&self) -> HashMap<String, i64> {
        self.query("SELECT count(*), state FROM runs GROUP BY state")
            .await
            .into_iter()
            .map(|(n, s)| (s, n))
            .collect()
    }

    /// How many times each instance was acted on.
    fn actions(&self) -> HashMap<String, usize> {
        let mut seen = HashMap::new();
        for r in self.receiver.requests() {
            if let Some(instance) = r.path.strip_prefix("/act/") {
                *seen.entry(instance.to_string()).or_insert(0) += 1;
            }
        }
        seen
    }

    /// Waits until no run is pending or running (all ended), for at most `secs`.
    async fn settle(&self, secs: u64) -> HashMap<String, i64> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let states = self.states().await;
            let live = ["pending", "running"]
                .iter()
                .map(|s| states.get(*s).copied().unwrap_or(0))
                .sum::<i64>();
            if live == 0 {
                return states;
            }
            if Instant::now() > deadline {
                let stuck = self
                    .query("SELECT id, coalesce(owner, '') FROM runs WHERE state IN ('pending', 'running')")
                    .await;
                let warnings: String = (self.replicas.iter())
                    .flat_map(|r| r.log().lines().map(String::from).collect::<Vec<_>>())
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .take(60)
                    .collect::<Vec<_>>()
                    .join("\n");
                panic!("runs still live after {secs}s: {states:?}: {stuck:?}\n{warnings}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn alert_body(i: usize) -> String {
    json!({"labels": {"alertname": "Act", "instance": format!("h{i}")}}).to_string()
}

/// Posts alerts `range` round-robin over the replicas whose index `up` allows, 16 at a time;
/// a refused or failed post goes to the next replica, as Alertmanager's retry through a
/// Service would. Returns the answers' outcomes, by alert.
async fn post_all(
    cluster: &Cluster,
    range: std::ops::Range<usize>,
    up: &(dyn Fn(usize) -> bool + Sync),
) -> Vec<Value> {
    let mut out = Vec::new();
    let ids: Vec<usize> = range.collect();
    for chunk in ids.chunks(16) {
        let posts = chunk.iter().map(|&i| async move {
            let mut r = i;
            loop {
                let n = cluster.replicas.len();
                if up(r % n) {
                    let app = &cluster.replicas[r % n];
                    if let Ok((200, body)) = try_post(&cluster.http, app, &alert_body(i)).await {
                        return body["outcomes"][0][0].clone();
                    }
                }
                r += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        out.extend(futures_util::future::join_all(posts).await);
    }
    out
}

/// A webhook post that may fail (a replica being killed, the database down).
async fn try_post(
    http: &reqwest::Client,
    app: &TestApp,
    body: &str,
) -> Result<(u16, Value), reqwest::Error> {
    let r = http
        .post(format!("{}/api/v1/webhooks/generic", app.base))
        .header("content-type", "application/json")
        .timeout(Duration::from_secs(10))
        .body(body.to_string())
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

#[tokio::test]
async fn three_replicas_record_and_act_on_each_alert_exactly_once() {
    let cluster = Cluster::start(3).await;
    let n = 5000;
    let outcomes = post_all(&cluster, 0..n, &|_| true).await;
    let created = outcomes
        .iter()
        .filter(|o| o["outcome"] == "created")
        .count();
    assert_eq!(created, n, "every alert made one run");
    let states = cluster.settle(120).await;
    assert_eq!(states.get("succeeded"), Some(&(n as i64)), "{states:?}");
    let alerts = cluster.query("SELECT count(*), '' FROM alerts").await;
    assert_eq!(alerts[0].0, n as i64, "every alert recorded once");
    let actions = cluster.actions();
    assert_eq!(actions.len(), n, "every alert acted on");
    let twice: Vec<_> = actions.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "acted more than once: {twice:?}");
    // The work was spread: every replica claimed or started runs.
    let owners = cluster
        .query("SELECT count(*), owner FROM runs GROUP BY owner ORDER BY owner")
        .await;
    assert_eq!(owners.len(), 3, "{owners:?}");
}

#[tokio::test]
async fn a_replica_killed_mid_load_is_taken_over_and_nothing_acts_twice() {
    let mut cluster = Cluster::start(3).await;
    let (before, after) = (1500, 1500);
    post_all(&cluster, 0..before, &|_| true).await;
    cluster.replicas[2].kill9();
    let killed_at = Instant::now();
    post_all(&cluster, before..before + after, &|r| r != 2).await;
    let states = cluster.settle(120).await;
    let total = (before + after) as i64;
    let ended: i64 = states.values().sum();
    assert_eq!(ended, total, "every accepted alert has its run: {states:?}");
    let succeeded = states.get("succeeded").copied().unwrap_or(0);
    let interrupted = states.get("interrupted").copied().unwrap_or(0);
    assert_eq!(
        succeeded + interrupted,
        total,
        "runs end succeeded, or interrupted on the killed replica: {states:?}"
    );
    // Interrupted runs are the killed replica's only, taken over within the lease expiry.
    let takeover = cluster
        .query("SELECT count(*), owner FROM runs WHERE state = 'interrupted' GROUP BY owner")
        .await;
    assert!(
        takeover.iter().all(|(_, owner)| owner == "replica-2"),
        "{takeover:?}"
    );
    // Exactly one survivor took the killed replica over (once its lease had expired), and
    // says so in its metrics.
    let mut takeovers = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while takeovers == 0 {
        takeovers = 0;
        for app in &cluster.replicas[..2] {
            let text = cluster
                .http
                .get(format!("{}/metrics", app.base))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            takeovers += text
                .lines()
                .find_map(|l| l.strip_prefix("reflex_replica_takeovers_total "))
                .map_or(0, |v| v.trim().parse::<u64>().unwrap());
        }
        assert!(
            Instant::now() < deadline,
            "nobody took the killed replica over"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(takeovers, 1);
    assert!(
        killed_at.elapsed() < Duration::from_secs(120),
        "taken over while the test waited"
    );
    let actions = cluster.actions();
    let twice: Vec<_> = actions.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "acted more than once: {twice:?}");
    // Every succeeded run acted once; an interrupted one at most once.
    assert!(
        actions.len() as i64 >= succeeded,
        "{} < {succeeded}",
        actions.len()
    );
    assert!(actions.len() as i64 <= total);
}

#[tokio::test]
async fn a_database_restart_answers_503_meanwhile_and_loses_nothing_accepted() {
    let cluster = Cluster::start(2).await;
    let accepted = post_all(&cluster, 0..300, &|_| true).await.len();
    cluster.pg.stop().unwrap();
    // While it is down: not ready, and webhooks answer 503 so that the sender retries.
    let (ready, _) = cluster.replicas[0].get("/readyz").await;
    assert_eq!(ready, 503);
    let (status, body) = try_post(&cluster.http, &cluster.replicas[1], &alert_body(100_000))
        .await
        .unwrap();
    assert_eq!(status, 503, "{body}");
    cluster.pg.resume().unwrap();
    // Back without a restart of the daemons.
    let deadline = Instant::now() + Duration::from_secs(60);
    for app in &cluster.replicas {
        while app.get("/readyz").await.0 != 200 {
            assert!(Instant::now() < deadline, "not ready again:\n{}", app.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let more = post_all(&cluster, 300..600, &|_| true).await.len();
    let states = cluster.settle(120).await;
    let ended: i64 = states.values().sum();
    assert_eq!(ended, (accepted + more) as i64, "{states:?}");
    let actions = cluster.actions();
    let twice: Vec<_> = actions.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "acted more than once: {twice:?}");
    assert!(
        !actions.contains_key("h100000"),
        "the alert answered 503 was not recorded"
    );
}

/// A gated run whose second action comes after a pause.
const GATED: &str = r#"
name: gated
matchers: ['alertname="Gated"']
approval: { count: 1, expires: 30m }
steps:
  - name: first
    action: http
    with: { method: POST, url: "RECEIVER/first/{{ labels.instance }}" }
  - name: pause
    action: wait
    with: { duration: 2s }
  - name: second
    action: http
    with: { method: POST, url: "RECEIVER/second/{{ labels.instance }}" }
"#;

#[tokio::test]
async fn an_approval_on_one_replica_and_a_kill_switch_on_another_hold_for_the_one_executing() {
    // Both replicas post to one Slack channel, keeping each run in one thread.
    let slack = "notify:\n  sinks:\n    - { name: bot, type: slack_bot, token_env: REFLEX_TEST_TOKEN, \
                 channel: \"#ops\", api_url: \"RECEIVER/api\" }\n";
    let cluster = Cluster::start_with(2, GATED, slack).await;
    let (a, b) = (&cluster.replicas[0], &cluster.replicas[1]);
    let (status, out) = b
        .post_raw(
            "/api/v1/webhooks/generic",
            json!({"labels": {"alertname": "Gated", "instance": "g1"}}).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    let run_id = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
    // Parked by B (it took the webhook); approved on A.
    let approval = a
        .wait_for(20, "the approval request", || async {
            let (_, list) = a.get("/api/v1/approvals?state=pending").await;
            list.as_array()?.first().cloned()
        })
        .await;
    assert_eq!(approval["run_id"], run_id);
    let (status, body) = a
        .call(
            "POST",
            &format!("/api/v1/approvals/{}/approve", approval["id"]),
            None,
            Some(json!({"comment": "go"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Whichever replica claims it acts once, then pauses; the switch is engaged on the other.
    a.wait_for(20, "the first action", || async {
        (!cluster.receiver.at("/first/g1").is_empty()).then_some(())
    })
    .await;
    let owner = cluster
        .query(&format!("SELECT id, owner FROM runs WHERE id = {run_id}"))
        .await[0]
        .1
        .clone();
    let other = if owner == "replica-0" { b } else { a };
    let (status, body) = other
        .call(
            "PUT",
            "/api/v1/killswitch",
            None,
            Some(json!({"engaged": true, "reason": "stop everything"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let run = a.wait_run_state(run_id, "killed").await;
    assert!(
        cluster.receiver.at("/second/g1").is_empty(),
        "the step after the switch never ran: {run}"
    );
    assert_eq!(cluster.receiver.at("/first/g1").len(), 1);
    // The run's messages, from both replicas, are one message: posted once, then edited.
    let posted: Vec<Value> = (cluster.receiver.at("/api/chat.postMessage").into_iter())
        .map(|m| m.body)
        .filter(|b| {
            b["text"]
                .as_str()
                .is_some_and(|t| t.contains("run 1") || t.contains("Run 1"))
        })
        .collect();
    assert_eq!(posted.len(), 1, "{posted:?}");
    assert!(posted[0].get("thread_ts").is_none(), "{posted:?}");
    // The end is told once the run has ended: wait for that edit.
    let edits: Vec<Value> = a
        .wait_for(
            20,
            "the run's message edited to say it was killed",
            || async {
                let edits: Vec<Value> = (cluster.receiver.at("/api/chat.update").into_iter())
                    .map(|m| m.body)
                    .collect();
                (edits.iter())
                    .any(|e| e["text"].as_str().is_some_and(|t| t.contains("killed")))
                    .then_some(edits)
            },
        )
        .await;
    assert!(edits.len() >= 2, "approval, killed: {edits:?}");
    let ts = &edits[0]["ts"];
    assert!(
        ts.is_string() && edits.iter().all(|e| &e["ts"] == ts),
        "{edits:?}"
    );
    let last = edits.last().unwrap()["text"].as_str().unwrap();
    assert!(last.contains("killed"), "{edits:?}");
}

#[tokio::test]
async fn simulate_reads_the_kill_switch_from_the_shared_database() {
    let cluster = Cluster::start(1).await;
    let app = &cluster.replicas[0];
    let (status, body) = app
        .call(
            "PUT",
            "/api/v1/killswitch",
            None,
            Some(json!({"engaged": true, "reason": "incident 9"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let alert = app.dir.path().join("alert.json");
    std::fs::write(&alert, alert_body(1)).unwrap();
    let (code, out) = crate::common::reflex_cli(
        &[
            "simulate",
            "--config",
            app.config_path().to_str().unwrap(),
            "--alert",
            alert.to_str().unwrap(),
        ],
        app.dir.path(),
    );
    assert!(
        out.contains("HELD NOW: kill switch (global) engaged by anonymous: incident 9"),
        "{code}: {out}"
    );
}

/// Earns autonomy: an acting step, then a verification that holds when the alert says so
/// (`vector(1)` or `vector(0)` on a real Prometheus).
const EARNING: &str = r#"
name: act
matchers: ['alertname="Act"']
cooldown: 0s
autonomy: { approve_until: 2, demote_after: 1 }
steps:
  - name: act
    action: http
    with: { method: POST, url: "RECEIVER/act/{{ labels.instance }}" }
  - name: check
    action: verify
    with: { query: "vector({{ parse_float(labels.ok) }})", condition: "value == 1", interval: 100ms }
    timeout: 2s
"#;

impl Cluster {
    /// The playbook's autonomy as each replica's API shows it: (level, streak).
    async fn levels(&self) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        for r in &self.replicas {
            let (_, list) = r.get("/api/v1/playbooks").await;
            let a = &list[0]["autonomy"];
            out.push((
                a["level"].as_str().unwrap().to_string(),
                a["streak"].as_i64().unwrap(),
            ));
        }
        out
    }

    /// Waits until every replica shows the playbook at `want` (a run's outcome is counted just
    /// after its end is written), then checks they agree.
    async fn wait_levels(&self, want: (&str, i64)) {
        let want = (want.0.to_string(), want.1);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let levels = self.levels().await;
            if levels.iter().all(|l| *l == want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "levels {levels:?}, waiting for {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Posts an alert to one replica; returns its run.
    async fn act(&self, replica: usize, instance: &str, ok: u8) -> i64 {
        let alert =
            json!({"labels": {"alertname": "Act", "instance": instance, "ok": ok.to_string()}});
        self.replicas[replica].start_run_for(&alert).await
    }

    /// Approves the run's pending approval on one replica.
    async fn approve(&self, replica: usize, run: i64) {
        let app = &self.replicas[replica];
        let approval = app.wait_run_state(run, "awaiting_approval").await;
        let (_, list) = app.get("/api/v1/approvals?state=pending").await;
        let id = (list.as_array().unwrap().iter())
            .find(|a| a["run_id"] == run)
            .unwrap_or_else(|| panic!("no approval for run {run}: {approval:#}"))["id"]
            .as_i64()
            .unwrap();
        let (status, out) = app
            .call(
                "POST",
                &format!("/api/v1/approvals/{id}/approve"),
                None,
                Some(json!({})),
            )
            .await;
        assert_eq!(status, 200, "{out}");
    }
}

#[tokio::test]
async fn autonomy_is_earned_and_lost_with_two_replicas_agreeing_at_each_point() {
    let target = crate::common::prometheus::serve_metrics("earning 1\n").await;
    let prom = crate::common::prometheus::Prometheus::start(&target).await;
    let c = Cluster::start_with(
        2,
        EARNING,
        &format!("prometheus_url: {}\nnotify:\n  quiet_for: 0s\n  sinks:\n    - {{ name: chat, type: webhook, url: \"RECEIVER/chat\" }}\n", prom.base),
    )
    .await;
    assert_eq!(
        c.levels().await,
        vec![("approve".to_string(), 0), ("approve".to_string(), 0)]
    );
    // Behind approval: each run waits for a person, then acts and verifies.
    let first = c.act(0, "a", 1).await;
    c.approve(1, first).await;
    c.replicas[0].wait_run_state(first, "succeeded").await;
    c.wait_levels(("approve", 1)).await;
    let second = c.act(1, "b", 1).await;
    c.approve(0, second).await;
    c.replicas[1].wait_run_state(second, "succeeded").await;
    // Two verified runs in a row: earned, on both replicas.
    c.wait_levels(("auto", 2)).await;
    let third = c.act(0, "c", 1).await;
    let run = c.replicas[1].wait_run_state(third, "succeeded").await;
    let asked = c
        .query(&format!(
            "SELECT count(*), '' FROM approvals WHERE run_id = {third}"
        ))
        .await;
    assert_eq!(asked[0].0, 0, "no approval was asked: {run:#}");
    c.wait_levels(("auto", 3)).await;
    // One failed verification (demote_after: 1): behind approval again, everywhere.
    let fourth = c.act(1, "d", 0).await;
    c.replicas[0].wait_run_state(fourth, "failed").await;
    c.wait_levels(("approve", 0)).await;
    let fifth = c.act(0, "e", 1).await;
    c.replicas[1]
        .wait_run_state(fifth, "awaiting_approval")
        .await;
    assert_eq!(c.receiver.at("/act/e").len(), 0, "it waits before acting");
    // Every change audited and told in chat.
    let (_, audit) = c.replicas[1].get("/api/v1/audit?action=autonomy.").await;
    let actions: Vec<&str> = (audit.as_array().unwrap().iter())
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["autonomy.demote", "autonomy.promote"],
        "{audit:#}"
    );
    let told_now = || -> Vec<String> {
        (c.receiver.at("/chat").iter())
            .filter(|r| r.body["event"] == "autonomy")
            .map(|r| r.body["text"].as_str().unwrap_or("").to_string())
            .collect()
    };
    // Chat is told after the change is recorded: waited for, not read at once.
    let deadline = Instant::now() + Duration::from_secs(10);
    while told_now().len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let told = told_now();
    assert_eq!(told.len(), 2, "{told:?}");
    assert!(
        told[0].starts_with("Playbook act now acts without approval: 2 verified runs in a row"),
        "{told:?}"
    );
    assert!(
        told[1].starts_with(
            "Playbook act needs approval again: 1 failed verifications or undos in a row"
        ),
        "{told:?}"
    );
    // An admin's reset: audited, and both replicas see it.
    let (status, out) = c.replicas[0]
        .call("POST", "/api/v1/playbooks/act/autonomy/reset", None, None)
        .await;
    assert_eq!(
        (status, out["level"].as_str()),
        (200, Some("approve")),
        "{out}"
    );
}

/// Every replica at once on one playbook, with the breaker's limits set (they span runs), a
/// few shared targets (their queue rows are shared) and re-deliveries among the alerts: each
/// webhook is answered 2xx the first time, none waits out a deadlock (PostgreSQL would break
/// one after a second, the webhook would answer 503 and Alertmanager would retry).
#[tokio::test]
async fn three_replicas_hammering_one_playbook_answer_every_webhook_2xx() {
    let cluster = Cluster::start_with(
        3,
        acting_only(),
        "breaker:\n  max_runs: 1000000\n  max_runs_per_playbook: 1000000\n  max_targets: 1000000\n  max_failures: 1000000\n",
    )
    .await;
    let n = 3000;
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    let ids: Vec<usize> = (0..n).collect();
    for chunk in ids.chunks(48) {
        let posts = chunk.iter().map(|&i| {
            let cluster = &cluster;
            async move {
                // Four targets shared by all, and every fifth alert a re-delivery of another.
                let alert = if i % 5 == 4 { i - 1 } else { i };
                let body =
                    json!({"labels": {"alertname": "Act", "instance": format!("h{}", alert % 4),
                                  "n": alert.to_string()}, "startsAt": "2026-12-05T00:00:00Z"})
                    .to_string();
                let app = &cluster.replicas[i % 3];
                match try_post(&cluster.http, app, &body).await {
                    Ok((status, _)) => status,
                    Err(_) => 0,
                }
            }
        });
        for status in futures_util::future::join_all(posts).await {
            *statuses.entry(status).or_insert(0) += 1;
        }
    }
    let refused: Vec<String> = (cluster.replicas.iter())
        .flat_map(|r| r.log().lines().map(String::from).collect::<Vec<_>>())
        .filter(|l| l.contains("ERROR"))
        .take(10)
        .collect();
    assert_eq!(
        statuses.get(&200),
        Some(&n),
        "{statuses:?}\n{}",
        refused.join("\n")
    );
    // Nor did a claim or a run's end meet one (they would retry, unseen by the sender).
    let deadlocks: Vec<String> = (cluster.replicas.iter())
        .flat_map(|r| r.log().lines().map(String::from).collect::<Vec<_>>())
        .filter(|l| l.contains("deadlock"))
        .collect();
    assert!(deadlocks.is_empty(), "{}", deadlocks.join("\n"));
    let states = cluster.settle(120).await;
    let distinct = n - n / 5;
    let ended: i64 = states.values().sum();
    let errors = cluster
        .query(
            "SELECT count(*), coalesce(error, '') FROM runs WHERE state != 'succeeded' GROUP BY 2",
        )
        .await;
    assert_eq!(
        ended, distinct as i64,
        "one run an alert: {states:?} {errors:?}"
    );
    assert_eq!(
        states.get("succeeded"),
        Some(&(distinct as i64)),
        "{states:?} {errors:?}"
    );
}

/// A replica killed while chat turns its run's end message away: the replica that takes its
/// work over sends the message, once its lease has expired.
#[tokio::test]
async fn a_killed_replicas_undelivered_end_message_is_sent_by_the_replica_taking_over() {
    const QUIET: &str = "name: act\nmatchers: ['alertname=\"Act\"']\nsteps:\n  - { action: log, with: { message: done } }\n";
    let mut cluster = Cluster::start_with(
        2,
        QUIET,
        "notify:\n  max_attempts: 3\n  sinks:\n    - { name: chat, type: webhook, url: \"RECEIVER/chat\", events: [run_finished] }\n",
    )
    .await;
    // Turned away for a minute: the replica is killed in that minute.
    cluster
        .receiver
        .answer(503, &[("retry-after", "60")], "busy");
    let (status, _) = try_post(&cluster.http, &cluster.replicas[0], &alert_body(1))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.receiver.at("/chat").is_empty() {
        assert!(Instant::now() < deadline, "no message was tried");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kept = cluster
        .query("SELECT count(*), owner FROM outbox GROUP BY owner")
        .await;
    assert_eq!(kept.len(), 1, "{kept:?}");
    let sender = kept[0].1.clone();
    let (dead, alive) = if sender == "replica-0" {
        (0, 1)
    } else {
        (1, 0)
    };
    cluster.replicas[dead].kill9();
    // The lease expires in 10 s; the survivor then takes the message over and sends it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while cluster.receiver.at("/chat").len() < 2 {
        assert!(Instant::now() < deadline, "the message was not sent again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent: Vec<Value> = cluster
        .receiver
        .at("/chat")
        .into_iter()
        .map(|r| r.body)
        .collect();
    for m in &sent {
        assert_eq!(
            (m["event"].as_str(), m["run"]["id"].as_i64()),
            (Some("run_finished"), Some(1)),
            "{m}"
        );
    }
    assert_eq!(sent[0]["text"], sent[1]["text"]);
    assert!(
        cluster.replicas[alive]
            .log()
            .contains("sending a message left undelivered"),
        "sent by the survivor"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.query("SELECT count(*), '' FROM outbox").await[0].0 != 0 {
        assert!(
            Instant::now() < deadline,
            "the delivered message is still kept"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
