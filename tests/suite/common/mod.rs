//! Test harness: `TestApp` runs the real `reflex` binary on loopback with its own temp dir
//! (config, playbooks, SQLite data), and drives it over HTTP.

#![allow(dead_code, unreachable_pub)]
// Each test binary uses part of this harness.

pub mod alertmanager;
pub mod browser;
pub mod fake_kube;
pub mod prometheus;
pub mod receiver;
pub mod sshd;

mod fs;
#[allow(unused_imports)]
pub use fs::TestFs;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The fixtures directory (real Alertmanager payloads).
pub fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `reflex` binary built for this test run.
pub fn reflex_bin() -> &'static str {
    env!("CARGO_BIN_EXE_reflex")
}

/// A loopback port for a server a test starts, that no other test is handed meanwhile (see
/// `reflex::testkit::unused_port`).
pub fn free_port() -> u16 {
    reflex::testkit::unused_port()
}

/// The addresses in a daemon log's `listening` lines, oldest first (text or JSON lines).
fn listening_addrs(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|line| {
            if let Ok(v) = serde_json::from_str::<Value>(line) {
                return (v["message"] == "listening")
                    .then(|| v["addr"].as_str().map(String::from))?;
            }
            let rest = line.split(" listening addr=").nth(1)?;
            rest.split_whitespace().next().map(String::from)
        })
        .collect()
}

/// Builder for [`TestApp`].
#[derive(Default)]
pub struct TestAppBuilder {
    data_dir: Option<PathBuf>,
    playbooks: Vec<(String, String)>,
    config: String,
    args: Vec<String>,
}

impl TestAppBuilder {
    /// Adds a playbook file.
    pub fn playbook(mut self, file: &str, yaml: &str) -> Self {
        self.playbooks.push((file.to_string(), yaml.to_string()));
        self
    }

    /// Adds the repository's example playbooks.
    pub fn example_playbooks(mut self) -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("playbooks");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            self.playbooks
                .push((name, std::fs::read_to_string(&path).unwrap()));
        }
        self
    }

    /// Extra config YAML (appended to listen/playbooks_dir/data_dir).
    pub fn config(mut self, yaml: &str) -> Self {
        self.config.push_str(yaml);
        self
    }

    /// Keeps the store in this directory (default: in the app's temp dir).
    pub fn data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_path_buf());
        self
    }

    /// Extra command-line arguments for `reflex serve`.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    /// Writes the files and starts the daemon; returns once `/readyz` answers.
    pub async fn start(self) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let pb_dir = dir.path().join("playbooks");
        std::fs::create_dir_all(&pb_dir).unwrap();
        for (name, yaml) in &self.playbooks {
            std::fs::write(pb_dir.join(name), yaml).unwrap();
        }
        let data_dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("data"));
        // Port 0: the daemon binds a free port itself and logs it (no race with other tests).
        // The example feature-flag playbook names the provider `flags`, which a config must
        // define (serve refuses playbooks naming what the config lacks): tests that do not
        // define it get one that nothing answers.
        let names_flags = self
            .playbooks
            .iter()
            .any(|(_, y)| y.contains("provider: flags"));
        let flags = if names_flags && !self.config.contains("feature_flags:") {
            "feature_flags:\n  flags: { type: http, url: \"http://127.0.0.1:9/{flag}/{action}\" }\n"
        } else {
            ""
        };
        let config = format!(
            "listen: 127.0.0.1:0\nplaybooks_dir: {}\ndata_dir: {}\n{}{flags}",
            pb_dir.display(),
            data_dir.display(),
            self.config
        );
        let config_path = dir.path().join("reflex.yaml");
        std::fs::write(&config_path, config).unwrap();
        let data = data_dir.clone();
        let mut app = TestApp {
            base: String::new(),
            data,
            dir,
            config_path,
            args: self.args,
            child: None,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        };
        app.spawn().await;
        app
    }
}

/// A running `reflex serve`.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// Temp dir holding config, playbooks and (by default) data.
    pub dir: TempDir,
    /// The data directory.
    data: PathBuf,
    config_path: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    http: reqwest::Client,
}

impl TestApp {
    /// A builder.
    pub fn builder() -> TestAppBuilder {
        TestAppBuilder::default()
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("reflex.log"))
            .unwrap();
        let child = Command::new(reflex_bin())
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn reflex");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        // Each start appends to the log: the newest `listening` line has this start's port.
        let seen = listening_addrs(&self.log()).len();
        loop {
            let log = self.log();
            if let Some(addr) = listening_addrs(&log).get(seen) {
                self.base = format!("http://{addr}");
                break;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("reflex exited early ({status}):\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "reflex did not listen in 20s:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        loop {
            let ready = self.http.get(format!("{}/readyz", self.base)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("reflex exited early ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "reflex not ready in 20s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("reflex.log")).unwrap_or_default()
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The playbooks directory.
    pub fn playbooks_dir(&self) -> PathBuf {
        self.dir.path().join("playbooks")
    }

    /// The SQLite file.
    pub fn db_path(&self) -> PathBuf {
        self.data.join("reflex.db")
    }

    /// Opens the real SQLite file read-only.
    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open_with_flags(
            self.db_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap()
    }

    /// `SELECT count(*) FROM table`.
    pub fn count(&self, table: &str) -> i64 {
        self.db()
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The daemon's peak resident memory so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status");
        kb * 1024
    }

    /// Sends SIGHUP (reload).
    pub fn sighup(&self) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM and wait for exit (SIGKILL after 30 s); returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the daemon again on the same config and data.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn().await;
    }

    /// POSTs a raw body.
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        self.post_with(&self.http, path, body, None).await
    }

    /// POSTs a raw body whose answer may take longer than the client's 10 s on a loaded
    /// machine (a webhook of hundreds of runs, the suite's other tests running beside it).
    pub async fn post_raw_within(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
        timeout: Duration,
    ) -> (u16, Value) {
        self.post_with(&self.http, path, body, Some(timeout)).await
    }

    async fn post_with(
        &self,
        client: &reqwest::Client,
        path: &str,
        body: impl Into<reqwest::Body>,
        timeout: Option<Duration>,
    ) -> (u16, Value) {
        let mut request = client.post(format!("{}{path}", self.base));
        if let Some(t) = timeout {
            request = request.timeout(t);
        }
        let r = request
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// POSTs a body over a fresh connection (for bodies the server may refuse before reading:
    /// it answers and closes, so a pooled connection must not be reused for it).
    pub async fn post_fresh(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        self.post_with(&client, path, body, None).await
    }

    /// Any request, with an optional bearer token and JSON body.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(
            reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
            format!("{}{path}", self.base),
        );
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        match body {
            Some(b) => req = req.json(&b),
            None if method != "GET" => req = req.json(&serde_json::json!({})),
            None => {}
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// POSTs one generic alert that starts a run; the run's id.
    pub async fn start_run_for(&self, alert: &Value) -> i64 {
        self.start_run_as(None, alert).await
    }

    /// As [`TestApp::start_run_for`], with this webhook token.
    pub async fn start_run_as(&self, token: Option<&str>, alert: &Value) -> i64 {
        let path = "/api/v1/webhooks/generic";
        let (status, out) = self.call("POST", path, token, Some(alert.clone())).await;
        assert_eq!(status, 200, "{out}");
        out["outcomes"][0][0]["run_id"]
            .as_i64()
            .unwrap_or_else(|| panic!("no run started: {out}"))
    }

    /// POSTs an Alertmanager payload.
    pub async fn post_alertmanager(&self, body: &str) -> (u16, Value) {
        self.post_raw("/api/v1/webhooks/alertmanager", body.to_string())
            .await
    }

    /// GET, returning status and the body as text.
    pub async fn get_text(&self, path: &str) -> String {
        let r = (self.http.get(format!("{}{path}", self.base)))
            .send()
            .await
            .unwrap();
        r.text().await.unwrap()
    }

    /// GET, returning status and JSON.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// All runs (first page of 500), newest first.
    pub async fn runs(&self) -> Vec<Value> {
        let (status, body) = self.get("/api/v1/runs?limit=500").await;
        assert_eq!(status, 200, "{body}");
        body["runs"].as_array().unwrap().clone()
    }

    /// One run with its steps.
    pub async fn run(&self, id: i64) -> Value {
        let (status, body) = self.get(&format!("/api/v1/runs/{id}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Polls `f` until it returns `Some`, for at most `secs` seconds.
    pub async fn wait_for<T, F, Fut>(&self, secs: u64, what: &str, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\nlog:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until run `id` is in `state`.
    pub async fn wait_run_state(&self, id: i64, state: &str) -> Value {
        self.wait_for(20, &format!("run {id} to be {state}"), || async {
            let run = self.run(id).await;
            (run["state"] == state).then_some(run)
        })
        .await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Gracefully first, so the daemon closes its SSH masters; then for sure.
        if self.child.is_some() && !self.terminate() {
            eprintln!("reflex exited uncleanly on SIGTERM:\n{}", self.log());
        }
    }
}

/// Runs `reflex ARGS…` to completion; returns (exit code, stdout).
pub fn reflex_cli(args: &[&str], cwd: &Path) -> (i32, String) {
    let out = Command::new(reflex_bin())
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).to_string();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// A generic alert body.
pub fn generic_alert(alertname: &str, instance: &str, starts_at: &str) -> String {
    serde_json::json!({
        "labels": {"alertname": alertname, "instance": instance, "severity": "warning", "mountpoint": "/", "fstype": "ext4"},
        "annotations": {"description": format!("{alertname} on {instance}")},
        "startsAt": starts_at,
    })
    .to_string()
}

/// SHA-256 hex of a token, as `auth.tokens[].sha256` wants it.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// An `auth:` config section with these (name, role) tokens; each token is `<name>-token`.
pub fn auth_config(tokens: &[(&str, &str)]) -> String {
    let mut out = String::from("auth:\n  tokens:\n");
    for (name, role) in tokens {
        out.push_str(&format!(
            "    - {{ name: {name}, role: {role}, sha256: {} }}\n",
            token_hash(&format!("{name}-token"))
        ));
    }
    out
}

/// An alert with these labels, for executor-level tests.
pub fn test_alert(labels: &[(&str, &str)]) -> reflex::alert::Alert {
    reflex::alert::Alert {
        source: "generic",
        status: reflex::alert::AlertStatus::Firing,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        annotations: Default::default(),
        starts_at: "2026-11-22T00:00:00Z".into(),
        ends_at: None,
        fingerprint: "f".into(),
        generator_url: None,
        group_key: None,
    }
}

/// What an executor gets for one step, with these rendered arguments.
pub fn step_context(args: Value, timeout: Duration) -> reflex::executors::StepContext {
    reflex::executors::StepContext {
        run_id: 1,
        playbook: "test".into(),
        step: "step".into(),
        args,
        alert: test_alert(&[("alertname", "Test")]),
        params: serde_json::json!({}),
        timeout,
        cancel: Default::default(),
        watch: None,
        artifacts: Default::default(),
    }
}

/// A kubeconfig (written once per test process) for a cluster nothing answers at: a config
/// that names a cluster loads, and nothing is ever reached.
pub fn unreachable_kubeconfig() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("reflex-kubeconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: none\n  cluster:\n    server: https://127.0.0.1:9\nusers:\n- name: none\n  user:\n    token: none\ncontexts:\n- name: none\n  context:\n    cluster: none\n    user: none\ncurrent-context: none\n",
        )
        .unwrap();
        path
    })
    .clone()
}

/// The step of a run's JSON with this name.
pub fn step<'a>(run: &'a Value, name: &str) -> &'a Value {
    (run["steps"].as_array().into_iter().flatten())
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {run:#}"))
}
