//! A real Alertmanager (Debian package prometheus-alertmanager) on loopback, with its own
//! config and storage, delivering webhooks to a Reflex under test.

use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// A running Alertmanager.
pub struct Alertmanager {
    dir: TempDir,
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
}

impl Alertmanager {
    /// Starts Alertmanager routing every alert to `webhook_url` with this bearer token, grouped
    /// per alert, with short intervals (1 s group wait and interval, `repeat` re-delivery).
    pub async fn start(webhook_url: &str, token: &str, repeat: &str) -> Alertmanager {
        let dir = tempfile::tempdir().unwrap();
        let port = super::free_port();
        let config = format!(
            "route:\n  receiver: reflex\n  group_by: ['alertname', 'instance', 'deployment', 'flag']\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: {repeat}\n\
             receivers:\n  - name: reflex\n    webhook_configs:\n      - url: {webhook_url}\n        send_resolved: true\n        http_config:\n          authorization:\n            credentials: {token}\n"
        );
        std::fs::write(dir.path().join("alertmanager.yml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("alertmanager.log")).unwrap();
        let child = Command::new("prometheus-alertmanager")
            .arg(format!(
                "--config.file={}",
                dir.path().join("alertmanager.yml").display()
            ))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus-alertmanager must be installed");
        let am = Alertmanager {
            dir,
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = reqwest::get(format!("{}/-/ready", am.base)).await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return am;
            }
            assert!(
                Instant::now() < deadline,
                "alertmanager not ready: {}",
                am.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fires (or, with `resolved`, resolves) an alert through Alertmanager's API.
    pub async fn alert(&self, labels: Value, annotations: Value, resolved: bool) {
        let mut alert = json!({"labels": labels, "annotations": annotations, "generatorURL": "http://prometheus.test/graph"});
        if resolved {
            alert["endsAt"] = json!(
                humantime::format_rfc3339(std::time::SystemTime::now() - Duration::from_secs(1))
                    .to_string()
            );
        }
        let r = reqwest::Client::new()
            .post(format!("{}/api/v2/alerts", self.base))
            .json(&json!([alert]))
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "alertmanager refused the alert: {}",
            r.status()
        );
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("alertmanager.log")).unwrap_or_default()
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
