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
    /// Round trips to PostgreSQL the store's writer waited for (0 on SQLite).
    pub store_round_trips: IntCounter,
    /// Statements the store's writer sent to PostgreSQL (0 on SQLite).
    pub store_statements: IntCounter,
    /// 1 while this replica holds a good lease (PostgreSQL; always 1 on SQLite).
    pub lease_held: IntGauge,
    /// Replicas whose work this one took over after their lease expired.
    pub takeovers: IntCounter,
    /// Messages sent again from the outbox: left undelivered by a crash, or by a replica
    /// taken over.
    pub notify_resent: IntCounter,
    /// HTTP requests refused, by reason (`unauthenticated`, `forbidden`, `cross_origin`,
    /// `chat`, `throttled`, `host`).
    pub http_refused: IntCounterVec,
    /// Rows in the store's tables retention keeps in bounds, by table.
    pub store_rows: IntGaugeVec,
    /// Rows retention deleted, by table.
    pub store_pruned: IntCounterVec,
    /// The database's size in bytes (SQLite: the file and its WAL).
    pub store_bytes: IntGauge,
    /// Audit rows the audit sink accepted.
    pub audit_sent: IntCounter,
    /// Requests to the audit sink that failed (retried).
    pub audit_sink_errors: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers a new metric and hands it back.
fn registered<M>(registry: &Registry, metric: prometheus::Result<M>) -> M
where
    M: prometheus::core::Collector + Clone + 'static,
{
    let metric = metric.expect("valid metric");
    (registry.register(Box::new(metric.clone()))).expect("unique metric");
    metric
}

/// `reflex_<name>`.
fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("reflex")
}

/// Buckets of the run duration (seconds).
const RUN_BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0];
/// Buckets of the step duration (seconds).
const STEP_BUCKETS: &[f64] = &[0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0];
/// Buckets of the time from a webhook to the first step (seconds): a quarter of a millisecond
/// apart up to 2 ms, where its targets are, since a quantile is interpolated within a bucket.
const FIRST_STEP_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.00075, 0.001, 0.00125, 0.0015, 0.00175, 0.002, 0.0025, 0.003, 0.005, 0.01,
    0.025, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0,
];

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let r = Registry::new();
        let counter = |name, help| registered(&r, IntCounter::with_opts(opts(name, help)));
        let counters = |name, help, labels: &[&str]| {
            registered(&r, IntCounterVec::new(opts(name, help), labels))
        };
        let gauge = |name, help| registered(&r, IntGauge::with_opts(opts(name, help)));
        let gauges = |name, help, labels: &[&str]| {
            registered(&r, IntGaugeVec::new(opts(name, help), labels))
        };
        let histogram = |name, help, buckets: &[f64]| {
            let opts = HistogramOpts::from(opts(name, help)).buckets(buckets.to_vec());
            registered(&r, prometheus::Histogram::with_opts(opts))
        };
        let histograms = |name, help, label, buckets: &[f64]| {
            let opts = HistogramOpts::from(opts(name, help)).buckets(buckets.to_vec());
            registered(&r, HistogramVec::new(opts, &[label]))
        };
        let build_info = gauges("build_info", "Build information.", &["version"]);
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let metrics = Metrics {
            alerts_received: counters(
                "alerts_received_total",
                "Alerts received.",
                &["source", "status"],
            ),
            runs: counters(
                "runs_total",
                "Runs by playbook and outcome.",
                &["playbook", "outcome"],
            ),
            plan_failures: counters(
                "plan_failures_total",
                "Matched alerts that could not be planned, by playbook and reason.",
                &["playbook", "reason"],
            ),
            http_refused: counters(
                "http_refused_total",
                "HTTP requests refused, by reason.",
                &["reason"],
            ),
            notify_failures: counters(
                "notify_failures_total",
                "Notifications given up on.",
                &["sink"],
            ),
            run_duration: histograms(
                "run_duration_seconds",
                "Run duration from start to end.",
                "playbook",
                RUN_BUCKETS,
            ),
            step_duration: histograms(
                "step_duration_seconds",
                "Step duration.",
                "action",
                STEP_BUCKETS,
            ),
            approvals_pending: gauge("approvals_pending", "Approval requests waiting."),
            killswitch_engaged: gauges(
                "killswitch_engaged",
                "1 while the kill switch is engaged.",
                &["scope"],
            ),
            playbooks_loaded: gauge("playbooks_loaded", "Playbooks in force."),
            reload_errors: counter("playbook_reload_errors_total", "Rejected playbook reloads."),
            alerts_truncated: counter(
                "alerts_truncated_total",
                "Alerts Alertmanager left out of groups.",
            ),
            alert_to_first_step: histogram(
                "alert_to_first_step_seconds",
                "From a webhook's arrival to the first step of the run it created starting.",
                FIRST_STEP_BUCKETS,
            ),
            store_writes: counter("store_writes_total", "Writes committed to the store."),
            store_write_queue: gauge(
                "store_write_queue",
                "Writes waiting for the store's writer.",
            ),
            store_commits: counter(
                "store_commits_total",
                "Store transactions committed; each holds a batch of writes.",
            ),
            store_round_trips: counter(
                "store_round_trips_total",
                "Round trips to PostgreSQL the store's writer waited for (0 on SQLite).",
            ),
            store_statements: counter(
                "store_statements_total",
                "Statements the store's writer sent to PostgreSQL, pipelined (0 on SQLite).",
            ),
            lease_held: gauge(
                "lease_held",
                "1 while this replica holds its lease on the shared store (always 1 on SQLite).",
            ),
            takeovers: counter(
                "replica_takeovers_total",
                "Replicas whose work this one took over after their lease expired.",
            ),
            notify_resent: counter(
                "notify_resent_total",
                "Messages sent again that a crash or a replica taken over left undelivered.",
            ),
            store_rows: gauges("store_rows", "Rows in the store, by table.", &["table"]),
            store_pruned: counters(
                "store_pruned_total",
                "Rows deleted by retention, by table.",
                &["table"],
            ),
            store_bytes: gauge("store_bytes", "The database's size in bytes."),
            audit_sent: counter(
                "audit_sent_total",
                "Audit rows the audit sink (audit.sink) accepted.",
            ),
            audit_sink_errors: counter(
                "audit_sink_errors_total",
                "Requests to the audit sink that failed; the rows are sent again.",
            ),
            registry: r.clone(),
        };
        metrics.lease_held.set(1);
        (metrics.killswitch_engaged.with_label_values(&["global"])).set(0);
        metrics
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
