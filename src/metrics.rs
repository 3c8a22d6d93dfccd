//! Prometheus metrics, prefixed `reflex_`. Labels are bounded: playbook names, action names,
//! outcomes, sink names, intake sources; never alert label values or run ids.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric Reflex exports.
pub struct Metrics {
    registry: Registry,
    /// Alerts received, by intake and alert status.
    pub alerts_received: IntCounterVec,
    /// Runs by playbook and outcome (final state, or `suppressed` / `failed` at intake).
    pub runs: IntCounterVec,
    /// Run durations from first start to end, by playbook.
    pub run_duration: HistogramVec,
    /// Step durations by action.
    pub step_duration: HistogramVec,
    /// Approval requests waiting for a decision.
    pub approvals_pending: IntGauge,
    /// 1 while a kill switch is engaged, by scope (`global`, `playbook:<name>`).
    pub killswitch_engaged: IntGaugeVec,
    /// Playbooks in force.
    pub playbooks_loaded: IntGauge,
    /// Reloads rejected because the new playbook set was invalid.
    pub reload_errors: IntCounter,
    /// Chat or webhook notifications given up on, by sink.
    pub notify_failures: IntCounterVec,
    /// Alerts Alertmanager left out of a group (`truncatedAlerts`).
    pub alerts_truncated: IntCounter,
    /// Alerts a playbook matched but could not be planned, by playbook and reason.
    pub plan_failures: IntCounterVec,
    /// From a webhook's arrival to the first step of a run it created starting.
    pub alert_to_first_step: prometheus::Histogram,
    /// Writes committed to the store.
    pub store_writes: IntCounter,
    /// Writes waiting for the store's writer.
    pub store_write_queue: IntGauge,
    /// Store transactions committed (a commit holds a batch of writes; one fsync each).
    pub store_commits: IntCounter,
    /// 1 while this replica holds a good lease (PostgreSQL; always 1 on SQLite).
    pub lease_held: IntGauge,
    /// Replicas whose work this one took over after their lease expired.
    pub takeovers: IntCounter,
    /// HTTP requests refused, by reason (`unauthenticated`, `forbidden`, `cross_origin`,
    /// `chat`, `throttled`, `host`).
    pub http_refused: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let m = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(m.clone()))
                .expect("unique metric");
            m
        };
        let histogram = |name: &str, help: &str, label: &str, buckets: Vec<f64>| {
            let m = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &[label])
                .expect("valid metric");
            registry
                .register(Box::new(m.clone()))
                .expect("unique metric");
            m
        };
        let alerts_received = counter_vec(
            "reflex_alerts_received_total",
            "Alerts received.",
            &["source", "status"],
        );
        let runs = counter_vec(
            "reflex_runs_total",
            "Runs by playbook and outcome.",
            &["playbook", "outcome"],
        );
        let plan_failures = counter_vec(
            "reflex_plan_failures_total",
            "Matched alerts that could not be planned, by playbook and reason.",
            &["playbook", "reason"],
        );
        let http_refused = counter_vec(
            "reflex_http_refused_total",
            "HTTP requests refused, by reason.",
            &["reason"],
        );
        let notify_failures = counter_vec(
            "reflex_notify_failures_total",
            "Notifications given up on.",
            &["sink"],
        );
        let run_duration = histogram(
            "reflex_run_duration_seconds",
            "Run duration from start to end.",
            "playbook",
            vec![0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0],
        );
        let step_duration = histogram(
            "reflex_step_duration_seconds",
            "Step duration.",
            "action",
            vec![0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0],
        );
        let approvals_pending =
            IntGauge::new("reflex_approvals_pending", "Approval requests waiting.").expect("valid");
        let killswitch_engaged = IntGaugeVec::new(
            Opts::new(
                "reflex_killswitch_engaged",
                "1 while the kill switch is engaged.",
            ),
            &["scope"],
        )
        .expect("valid");
        let playbooks_loaded =
            IntGauge::new("reflex_playbooks_loaded", "Playbooks in force.").expect("valid");
        let reload_errors = IntCounter::new(
            "reflex_playbook_reload_errors_total",
            "Rejected playbook reloads.",
        )
        .expect("valid");
        let alerts_truncated = IntCounter::new(
            "reflex_alerts_truncated_total",
            "Alerts Alertmanager left out of groups.",
        )
        .expect("valid");
        let alert_to_first_step = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "reflex_alert_to_first_step_seconds",
                "From a webhook's arrival to the first step of the run it created starting.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0,
            ]),
        )
        .expect("valid");
        let store_writes = IntCounter::new(
            "reflex_store_writes_total",
            "Writes committed to the store.",
        )
        .expect("valid");
        let store_write_queue = IntGauge::new(
            "reflex_store_write_queue",
            "Writes waiting for the store's writer.",
        )
        .expect("valid");
        let store_commits = IntCounter::new(
            "reflex_store_commits_total",
            "Store transactions committed; each holds a batch of writes.",
        )
        .expect("valid");
        let lease_held = IntGauge::new(
            "reflex_lease_held",
            "1 while this replica holds its lease on the shared store (always 1 on SQLite).",
        )
        .expect("valid");
        lease_held.set(1);
        let takeovers = IntCounter::new(
            "reflex_replica_takeovers_total",
            "Replicas whose work this one took over after their lease expired.",
        )
        .expect("valid");
        let build_info = IntGaugeVec::new(
            Opts::new("reflex_build_info", "Build information."),
            &["version"],
        )
        .expect("valid");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for m in [
            Box::new(approvals_pending.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(killswitch_engaged.clone()),
            Box::new(playbooks_loaded.clone()),
            Box::new(reload_errors.clone()),
            Box::new(alerts_truncated.clone()),
            Box::new(alert_to_first_step.clone()),
            Box::new(store_writes.clone()),
            Box::new(store_commits.clone()),
            Box::new(store_write_queue.clone()),
            Box::new(lease_held.clone()),
            Box::new(takeovers.clone()),
            Box::new(build_info),
        ] {
            registry.register(m).expect("unique metric");
        }
        killswitch_engaged.with_label_values(&["global"]).set(0);
        Metrics {
            registry,
            alerts_received,
            runs,
            run_duration,
            step_duration,
            approvals_pending,
            killswitch_engaged,
            playbooks_loaded,
            reload_errors,
            notify_failures,
            plan_failures,
            alerts_truncated,
            alert_to_first_step,
            store_writes,
            store_write_queue,
            store_commits,
            lease_held,
            takeovers,
            http_refused,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
