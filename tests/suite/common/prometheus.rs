//! A real Prometheus server (Debian package `prometheus`) on loopback, scraping a metrics
//! endpoint the test controls, for `verify` steps.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// A running Prometheus.
pub struct Prometheus {
    dir: TempDir,
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
}

/// Serves `text` at `/metrics` on a random loopback port; returns `host:port`.
pub async fn serve_metrics(text: &'static str) -> String {
    let app =
        axum::Router::new().route("/metrics", axum::routing::get(move || async move { text }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Serves whatever `text` holds at the moment of each scrape; returns `host:port`.
pub async fn serve_changing_metrics(text: std::sync::Arc<std::sync::Mutex<String>>) -> String {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || async move { text.lock().unwrap().clone() }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second; returns once it has scraped it.
    pub async fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let port = super::free_port();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: app\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian package prometheus) must be installed");
        let p = Prometheus {
            dir,
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = reqwest::Client::new();
        loop {
            let up = client
                .get(format!("{}/api/v1/query", p.base))
                .query(&[("query", "up{job=\"app\"} == 1")])
                .send()
                .await;
            if let Ok(r) = up {
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                if body["data"]["result"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
                {
                    return p;
                }
            }
            assert!(
                Instant::now() < deadline,
                "prometheus did not scrape in 30s: {}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
