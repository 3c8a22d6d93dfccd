//! The audit log as evidence: its hash chain checked by `reflex audit verify` after a row is
//! edited or deleted with the real `sqlite3`, and its copy streamed to an HTTP sink that is
//! down for a while and outlives a restart of the daemon.

use crate::common::receiver::Receiver;
use crate::common::{TestApp, reflex_cli};
use serde_json::{Value, json};

async fn toggle_killswitch(app: &TestApp, times: usize) {
    for i in 0..times {
        for engaged in [true, false] {
            let body = json!({"engaged": engaged, "reason": format!("drill {i}")});
            let (status, out) = app
                .call("PUT", "/api/v1/killswitch", None, Some(body))
                .await;
            assert_eq!(status, 200, "{out}");
        }
    }
}

fn sqlite3(db: &std::path::Path, sql: &str) -> String {
    let out = std::process::Command::new("sqlite3")
        .args(["-cmd", ".timeout 5000", db.to_str().unwrap(), sql])
        .output()
        .expect("sqlite3 (Debian: sqlite3)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test]
async fn reflex_audit_verify_names_the_row_edited_or_deleted_with_sqlite3() {
    let app = TestApp::builder().start().await;
    toggle_killswitch(&app, 4).await;
    let config = app.config_path().to_str().unwrap().to_string();
    let verify = || reflex_cli(&["audit", "verify", "--config", &config], app.dir.path());
    let db = app.db_path();
    let ids: Vec<i64> = sqlite3(&db, "SELECT id FROM audit ORDER BY id")
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert!(ids.len() >= 8, "{ids:?}");
    let (code, text) = verify();
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        text.trim(),
        format!(
            "audit chain intact: {} rows (rows {} to {})",
            ids.len(),
            ids[0],
            ids[ids.len() - 1]
        )
    );
    // A reason rewritten by hand, beside the running daemon.
    let edited = ids[3];
    let was = sqlite3(
        &db,
        &format!("SELECT detail FROM audit WHERE id = {edited}"),
    );
    sqlite3(
        &db,
        &format!("UPDATE audit SET detail = 'routine' WHERE id = {edited}"),
    );
    let (code, text) = verify();
    assert_eq!(code, 1, "{text}");
    assert!(
        text.starts_with(&format!(
            "audit chain broken at row {edited}: it was changed"
        )),
        "{text}"
    );
    // Put back as it was, the chain holds again.
    sqlite3(
        &db,
        &format!("UPDATE audit SET detail = '{was}' WHERE id = {edited}"),
    );
    assert_eq!(verify().0, 0);
    // A row taken out of the middle: the row after it is named.
    let deleted = ids[5];
    sqlite3(&db, &format!("DELETE FROM audit WHERE id = {deleted}"));
    let (code, text) = verify();
    assert_eq!(code, 1, "{text}");
    assert!(
        text.starts_with(&format!(
            "audit chain broken at row {}: it does not follow row {}",
            ids[6], ids[4]
        )),
        "{text}"
    );
    // The daemon goes on appending to the chain; the break stays found.
    toggle_killswitch(&app, 1).await;
    assert_eq!(verify().0, 1);
}

/// The event ids (audit row ids) of the batches the sink accepted after `from`.
fn accepted_ids(sink: &Receiver, from: usize) -> Vec<i64> {
    (sink.at("/audit").iter().skip(from))
        .flat_map(|r| r.body.as_array().cloned().unwrap_or_default())
        .map(|e| e["id"].as_str().unwrap().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn the_audit_sink_gets_every_row_once_in_order_across_an_outage_and_a_restart() {
    let sink = Receiver::start().await;
    for _ in 0..1000 {
        sink.answer(503, &[], "down for maintenance");
    }
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "s3cret-sink-token").unwrap();
    let mut app = TestApp::builder()
        .config(&format!(
            "public_url: https://reflex.example\ncredentials:\n  audit: {{ prefix: \"Bearer \", file: {} }}\naudit:\n  sink: {{ url: \"{}/audit\", credential: audit, batch: 3 }}\n",
            secret.path().display(),
            sink.base
        ))
        .start()
        .await;
    toggle_killswitch(&app, 3).await;
    // The sink is down: tried, refused, kept.
    app.wait_for(10, "a refused try", || async {
        (sink.at("/audit").len() >= 2).then_some(())
    })
    .await;
    assert!(app.terminate(), "stops on SIGTERM");
    sink.clear_answers();
    let from = sink.at("/audit").len();
    app.restart().await;
    toggle_killswitch(&app, 1).await;
    let (_, rows) = app.get("/api/v1/audit?limit=100").await;
    let mut rows: Vec<Value> = rows.as_array().unwrap().clone();
    rows.reverse();
    let want: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert!(want.len() >= 8, "{rows:?}");
    let got = app
        .wait_for(20, "every row at the sink", || async {
            let got = accepted_ids(&sink, from);
            (got.len() >= want.len()).then_some(got)
        })
        .await;
    assert_eq!(
        got, want,
        "every row once, oldest first, nothing lost across the restart"
    );
    let accepted = &sink.at("/audit")[from..];
    for request in accepted {
        assert_eq!(request.method, "POST");
        assert_eq!(
            request.header("content-type"),
            Some("application/cloudevents-batch+json")
        );
        assert_eq!(
            request.header("authorization"),
            Some("Bearer s3cret-sink-token")
        );
        assert!(request.body.as_array().unwrap().len() <= 3, "batch: 3");
    }
    // Each event: CloudEvents 1.0, the row as data, with the hash that chains it.
    let events: Vec<Value> = (accepted.iter())
        .flat_map(|r| r.body.as_array().cloned().unwrap())
        .collect();
    for (event, row) in events.iter().zip(&rows) {
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["source"], "https://reflex.example");
        assert_eq!(
            event["type"],
            format!("io.reflex.audit.{}", row["action"].as_str().unwrap())
        );
        assert_eq!(event["data"], *row);
        assert!(row["hash"].as_str().is_some_and(|h| h.len() == 64));
    }
    // Counted once the sink's answer is on record, just after the sink has the rows.
    let sent = format!("reflex_audit_sent_total {}", want.len());
    app.wait_for(10, &sent, || async {
        app.get_text("/metrics").await.contains(&sent).then_some(())
    })
    .await;
}
