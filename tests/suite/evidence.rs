//! Evidence actions: `kube.logs`, `kube.events`, `kube.describe` and `kube.history` against the
//! fake API server (held to `deploy/`'s RBAC role), `prometheus.graph` against a real
//! Prometheus, its PNG decoded.

use crate::common::prometheus::{Prometheus, serve_changing_metrics};
use crate::kube::{Cluster, cluster};
use reflex::executors::{ExecError, Executors};
use reflex::store::Artifact;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Runs one action; returns its answer and what it attached.
async fn gather(
    ex: &Executors,
    action: &str,
    args: Value,
) -> (Result<Value, ExecError>, Vec<Artifact>) {
    let ctx = crate::common::step_context(args, Duration::from_secs(20));
    gather_in(ex, action, &ctx).await
}

async fn gather_in(
    ex: &Executors,
    action: &str,
    ctx: &reflex::executors::StepContext,
) -> (Result<Value, ExecError>, Vec<Artifact>) {
    let action = reflex::playbook::actions::Action::parse(action).unwrap();
    let executor = ex.get(action).unwrap();
    executor.validate(ctx).unwrap();
    let out = executor.execute(ctx).await;
    (out, ctx.artifacts.take())
}

fn fake(c: &Cluster) -> Option<&crate::common::fake_kube::FakeKube> {
    if c.fake.is_none() {
        eprintln!("skipped: sets pod logs and statuses, which only the fake API server takes");
    }
    c.fake.as_ref()
}

#[tokio::test]
async fn logs_keep_the_tail_asked_for_and_attach_it_whole() {
    let c = cluster().await;
    let Some(fake) = fake(&c) else { return };
    let ns = c.ns.clone();
    let pod = |name: &str, app: &str, containers: &[&str]| {
        let containers: Vec<Value> = (containers.iter())
            .map(|n| json!({"name": n, "image": "app:1"}))
            .collect();
        json!({"metadata": {"name": name, "labels": {"app": app}}, "spec": {"containers": containers}})
    };
    c.create("v1", "Pod", Some(&ns), pod("api-1", "api", &["app"]))
        .await;
    c.create("v1", "Pod", Some(&ns), pod("api-2", "api", &["app"]))
        .await;
    c.create(
        "v1",
        "Pod",
        Some(&ns),
        pod("two", "db", &["app", "sidecar"]),
    )
    .await;
    let log: String = (1..=150).map(|i| format!("line {i}\n")).collect();
    fake.set_log(&ns, "api-1", "app", false, &log);
    fake.set_log(&ns, "api-1", "app", true, "panic: out of memory\n");
    fake.set_log(&ns, "api-2", "app", false, "started\n");
    let ex = c.executors();

    let (out, artifacts) = gather(&ex, "kube.logs", json!({"namespace": ns, "pod": "api-1"})).await;
    let out = out.unwrap();
    assert_eq!(out["pods"], json!([{"pod": "api-1", "lines": 100}]));
    let summary = out["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("line 131\n") && summary.ends_with("line 150"),
        "{summary}"
    );
    assert_eq!(artifacts.len(), 1);
    assert_eq!(artifacts[0].name, "logs.txt");
    assert!(artifacts[0].content_type.starts_with("text/plain"));
    let text = String::from_utf8(artifacts[0].data.clone()).unwrap();
    assert_eq!(text.lines().count(), 100);
    assert!(text.starts_with("line 51\n") && text.ends_with("line 150\n"));

    // The container that crashed, and several pods by selector.
    let (out, _) = gather(
        &ex,
        "kube.logs",
        json!({"namespace": ns, "pod": "api-1", "previous": true, "lines": 5}),
    )
    .await;
    assert_eq!(out.unwrap()["summary"], "panic: out of memory");
    let (out, artifacts) = gather(
        &ex,
        "kube.logs",
        json!({"namespace": ns, "selector": "app=api", "lines": 1}),
    )
    .await;
    assert_eq!(out.unwrap()["pods"].as_array().unwrap().len(), 2);
    let text = String::from_utf8(artifacts[0].data.clone()).unwrap();
    assert!(
        text.contains("==> api-1 <==\nline 150\n==> api-2 <==\nstarted\n"),
        "{text}"
    );

    // What the API server refuses, said as it says it.
    let (err, _) = gather(&ex, "kube.logs", json!({"namespace": ns, "pod": "two"})).await;
    let err = err.unwrap_err().to_string();
    assert!(
        err.contains("a container name must be specified for pod two"),
        "{err}"
    );
    let (err, _) = gather(
        &ex,
        "kube.logs",
        json!({"namespace": ns, "pod": "api-2", "previous": true}),
    )
    .await;
    assert!(
        err.unwrap_err()
            .to_string()
            .contains("previous terminated container")
    );
    // A selector an alert label could widen is refused before any request.
    let (err, _) = gather(
        &ex,
        "kube.logs",
        json!({"namespace": ns, "selector": "app in (api, db)"}),
    )
    .await;
    assert!(matches!(err, Err(ExecError::Refused(_))), "{err:?}");
}

#[tokio::test]
async fn events_are_the_objects_own_newest_first_within_the_limit() {
    let c = cluster().await;
    if fake(&c).is_none() {
        return;
    }
    let ns = c.ns.clone();
    let event = |name: &str, pod: &str, reason: &str, at: &str, count: i64| {
        json!({
            "metadata": {"name": name},
            "involvedObject": {"kind": "Pod", "name": pod, "namespace": ns},
            "reason": reason, "message": format!("{reason} happened"), "type": "Warning",
            "lastTimestamp": at, "count": count,
        })
    };
    for e in [
        event("e1", "api-1", "Scheduled", "2026-12-05T10:00:00Z", 1),
        event("e2", "api-1", "BackOff", "2026-12-05T10:05:00Z", 7),
        event("e3", "api-1", "Killing", "2026-12-05T10:03:00Z", 1),
        event("e4", "db-1", "Unhealthy", "2026-12-05T10:06:00Z", 1),
    ] {
        c.create("v1", "Event", Some(&ns), e).await;
    }
    let (out, _) = gather(
        &c.executors(),
        "kube.events",
        json!({"namespace": ns, "kind": "Pod", "name": "api-1", "limit": 2}),
    )
    .await;
    let out = out.unwrap();
    let reasons: Vec<&str> = (out["events"].as_array().unwrap().iter())
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["BackOff", "Killing"]);
    // One line an event, newest first: its time, type, reason, message, and a repeat count.
    let lines: Vec<&str> = out["summary"].as_str().unwrap().lines().collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("2026-12-05"), "{lines:?}");
    assert!(
        lines[0].ends_with(" Warning BackOff: BackOff happened (x7)"),
        "{lines:?}"
    );
    assert!(
        lines[1].ends_with(" Warning Killing: Killing happened"),
        "{lines:?}"
    );
}

#[tokio::test]
async fn describe_gives_replicas_conditions_images_and_why_containers_restarted() {
    let c = cluster().await;
    if fake(&c).is_none() {
        return;
    }
    let ns = c.ns.clone();
    c.deployment("api", "api:2", 2).await;
    c.create(
        "v1",
        "Pod",
        Some(&ns),
        json!({
            "metadata": {"name": "api-7d9f", "labels": {"app": "api"}},
            "spec": {"containers": [{"name": "app", "image": "api:2"}]},
            "status": {"phase": "Running", "containerStatuses": [{
                "name": "app", "image": "api:2", "imageID": "", "ready": false, "restartCount": 4,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}},
            }]},
        }),
    )
    .await;
    c.create(
        "v1",
        "Node",
        None,
        json!({"metadata": {"name": "n1"}, "spec": {"unschedulable": true},
               "status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "MemoryPressure", "status": "True"}],
                          "allocatable": {"cpu": "4", "memory": "16Gi"}}}),
    )
    .await;
    let ex = c.executors();
    let (out, _) = gather(
        &ex,
        "kube.describe",
        json!({"namespace": ns, "kind": "Deployment", "name": "api"}),
    )
    .await;
    let out = out.unwrap();
    assert_eq!(out["replicas"]["desired"], 2);
    assert_eq!(out["images"], json!(["api:2"]));
    assert_eq!(out["pods"][0]["containers"][0]["restarts"], 4);
    let summary = out["summary"].as_str().unwrap();
    assert!(
        summary.contains("api-7d9f Running, restarts 4 (last: OOMKilled, exit 137)"),
        "{summary}"
    );
    let (out, _) = gather(
        &ex,
        "kube.describe",
        json!({"namespace": ns, "kind": "Pod", "name": "api-7d9f"}),
    )
    .await;
    assert_eq!(
        out.unwrap()["pod"]["containers"][0]["state"],
        "waiting: CrashLoopBackOff"
    );
    let (out, _) = gather(&ex, "kube.describe", json!({"kind": "Node", "name": "n1"})).await;
    let out = out.unwrap();
    assert_eq!(out["summary"], "node n1: Ready, cordoned, MemoryPressure");
    assert_eq!(out["allocatable"]["memory"], "16Gi");
    let (err, _) = gather(
        &ex,
        "kube.describe",
        json!({"namespace": ns, "kind": "Deployment", "name": "gone"}),
    )
    .await;
    assert!(err.unwrap_err().to_string().contains("not found"));
}

#[tokio::test]
async fn history_lists_the_rollouts_newest_first_with_their_images() {
    let c = cluster().await;
    c.deployment("web", "web:1", 1).await;
    c.set_image("web", "web:2", 2).await;
    c.set_image("web", "web:3", 3).await;
    let (out, _) = gather(
        &c.executors(),
        "kube.history",
        json!({"namespace": c.ns, "deployment": "web", "limit": 2}),
    )
    .await;
    let out = out.unwrap();
    assert_eq!(out["current_revision"], 3);
    let rollouts = out["rollouts"].as_array().unwrap();
    let seen: Vec<(i64, &str, bool)> = rollouts
        .iter()
        .map(|r| {
            (
                r["revision"].as_i64().unwrap(),
                r["images"][0].as_str().unwrap(),
                r["current"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen, [(3, "web:3", true), (2, "web:2", false)]);
    assert!(
        out["summary"]
            .as_str()
            .unwrap()
            .starts_with("revision 3 (current)")
    );
}

/// The pixels of a decoded PNG (RGB).
pub(crate) fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

/// How many pixels have exactly this colour.
pub(crate) fn pixels_of(rgb: &[u8], colour: (u8, u8, u8)) -> usize {
    rgb.chunks(3)
        .filter(|p| p == &[colour.0, colour.1, colour.2])
        .count()
}

#[tokio::test]
async fn graphs_draw_the_series_from_real_prometheus_and_differ_with_the_data() {
    // A gauge that moves with every scrape, so the chart has a shape.
    let text = Arc::new(Mutex::new(String::new()));
    let target = serve_changing_metrics(text.clone()).await;
    let feeder = {
        let text = text.clone();
        tokio::spawn(async move {
            for i in 0u64.. {
                *text.lock().unwrap() = format!(
                    "# TYPE error_ratio gauge\nerror_ratio{{service=\"api\"}} {}\n",
                    (i % 10) as f64 * 1.5
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    *text.lock().unwrap() = "error_ratio{service=\"api\"} 0\n".into();
    let prom = Prometheus::start(&target).await;
    // Wait for a few samples, on the condition, not a clock.
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let body: Value = client
            .get(format!("{}/api/v1/query", prom.base))
            .query(&[("query", "count_over_time(error_ratio[1m])")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let n = body["data"]["result"][0]["value"][1].as_str();
        if n.and_then(|n| n.parse::<f64>().ok())
            .is_some_and(|n| n >= 4.0)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Prometheus never scraped 4 samples"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cfg = reflex::config::Config::parse(&format!("prometheus_url: {}\n", prom.base)).unwrap();
    let ex = Executors::from_config(&cfg, Arc::new(reflex::playbook::script::Sandbox::new()));
    let mut ctx = crate::common::step_context(
        json!({"query": "error_ratio", "range": "2m", "step": "1s", "unit": "%", "title": "Error ratio"}),
        Duration::from_secs(20),
    );
    // The alert started a minute ago: the chart marks it.
    let minute_ago = reflex::time::Timestamp::from_ms(reflex::time::now_ms() - 60_000);
    ctx.alert.starts_at = minute_ago.to_string();
    let (out, artifacts) = gather_in(&ex, "prometheus.graph", &ctx).await;
    let out = out.unwrap();
    assert_eq!(out["series"], 1);
    let (min, max) = (out["min"].as_f64().unwrap(), out["max"].as_f64().unwrap());
    assert!(min >= 0.0 && max <= 13.5 && max > min, "{out}");
    assert!(
        out["summary"]
            .as_str()
            .unwrap()
            .starts_with("Error ratio: min "),
        "{out}"
    );
    assert_eq!(artifacts.len(), 1);
    assert_eq!(
        (
            artifacts[0].name.as_str(),
            artifacts[0].content_type.as_str()
        ),
        ("graph.png", "image/png")
    );
    let (w, h, rgb) = decode_png(&artifacts[0].data);
    assert_eq!((w, h), (reflex::chart::WIDTH, reflex::chart::HEIGHT));
    let series_colour = reflex::chart::PALETTE[0];
    assert!(pixels_of(&rgb, series_colour) > 100, "the series is drawn");
    assert!(
        pixels_of(&rgb, (255, 127, 14)) > 20,
        "the alert's start is marked"
    );

    // Another series gives another picture.
    ctx.args = json!({"query": "20 - error_ratio", "range": "2m", "step": "1s"});
    let (out, other) = gather_in(&ex, "prometheus.graph", &ctx).await;
    out.unwrap();
    let (_, _, other_rgb) = decode_png(&other[0].data);
    assert!(pixels_of(&other_rgb, series_colour) > 100);
    assert_ne!(rgb, other_rgb, "different data, different chart");
    feeder.abort();
}
