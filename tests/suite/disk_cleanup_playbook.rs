//! The example `playbooks/disk-cleanup.yaml`, end to end through the real binary: a
//! DiskSpaceLow alert posted to the webhook cleans a real filesystem over SSH on a real sshd
//! and the run records the bytes reclaimed.

use crate::common::sshd::Sshd;
use crate::common::{TestApp, TestFs};

#[tokio::test]
async fn disk_space_low_alert_runs_cleanup_over_ssh_and_records_bytes_reclaimed() {
    let sshd = Sshd::start();
    let fs = TestFs::new();
    let written = fs.fill(12, 1 << 20);
    let path = fs.dir.path().display().to_string();
    let config = format!(
        "{}  cleanup_commands:\n    - \"rm -f {path}/junk/*.log\"\n",
        sshd.config_yaml("db-1", &["db-1.example.internal"])
    );
    let app = TestApp::builder()
        .example_playbooks()
        .config(&config)
        .start()
        .await;

    let payload = crate::common::fixture("alertmanager-disk.json").replace(
        "\"mountpoint\": \"/var\"",
        &format!("\"mountpoint\": {path:?}"),
    );
    let (status, body) = app.post_alertmanager(&payload).await;
    assert_eq!(status, 200, "{body}");
    let db1 = body["outcomes"][0][0]["run_id"].as_i64().unwrap();
    let db2 = body["outcomes"][1][0]["run_id"].as_i64().unwrap();

    let run = app.wait_run_state(db1, "succeeded").await;
    let cleanup = &run["steps"][1];
    assert_eq!(cleanup["action"], "disk_cleanup");
    assert_eq!(cleanup["state"], "succeeded", "{cleanup:#}");
    let reclaimed = cleanup["output"]["reclaimed_bytes"].as_i64().unwrap();
    if fs.mounted {
        assert_eq!(reclaimed as u64, written, "{cleanup:#}");
    } else {
        eprintln!("skipped (no tmpfs, not root?): the exact bytes reclaimed; checked loosely");
        assert!(reclaimed as f64 > written as f64 * 0.5, "{cleanup:#}");
    }
    assert!(cleanup["output"]["before"]["used_bytes"].as_u64().unwrap() >= written);
    assert_eq!(sshd.accepted_connections(), 1);

    // db-2 is not in the inventory: refused, nothing attempted.
    let run = app.wait_run_state(db2, "failed").await;
    assert!(
        run["steps"][1]["error"]
            .as_str()
            .unwrap()
            .contains("not in the SSH inventory")
    );
}
