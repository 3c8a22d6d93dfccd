//! `reflex.yaml`: the daemon configuration, with embedded defaults for every field.
//!
//! Read in two phases like playbooks: serde (unknown keys are errors, with file:line) and then
//! [`Config::validate`] for the checks serde cannot express.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::api::auth_config::{AuthConfig, Role, TokenConfig};
pub use crate::executors::ssh::config::{HostKeyChecking, SshConfig, SshHost};
pub use crate::notify::config::{EVENTS, NotifyConfig, SinkConfig, SinkKind};

/// SHA-256 of the empty string: the digest of a token that is no secret.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The whole daemon configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// Limits on HTTP clients: timeouts, open connections, shutdown deadline.
    pub server: crate::api::server::ServerConfig,
    /// Directory of playbook files (`*.yaml`, `*.yml`), one playbook a file.
    pub playbooks_dir: PathBuf,
    /// Directory for the SQLite database (`reflex.db`).
    pub data_dir: PathBuf,
    /// Render and record every step, act on nothing (also `reflex serve --dry-run`).
    pub dry_run: bool,
    /// Webhook intake limits.
    pub intake: IntakeConfig,
    /// Run execution limits.
    pub engine: EngineConfig,
    /// SSH executor: defaults and the host inventory (the only hosts Reflex may act on).
    pub ssh: SshConfig,
    /// Circuit breaker: limits whose crossing engages the global kill switch.
    pub breaker: BreakerConfig,
    /// Maintenance windows: matching alerts are recorded as suppressed while one is open.
    pub maintenance_windows: Vec<MaintenanceWindow>,
    /// API authentication. With no tokens configured the API is open (a warning is logged).
    pub auth: AuthConfig,
    /// Chat and webhook notifications.
    pub notify: NotifyConfig,
    /// Base URL people reach Reflex at, for links to runs in messages.
    pub public_url: Option<String>,
    /// Prometheus server `verify` steps query.
    pub prometheus_url: String,
    /// Credentials `http` steps may name: the secret comes from the environment or a file,
    /// never from a playbook, and is never logged.
    pub credentials: BTreeMap<String, Credential>,
    /// Kubernetes clusters the kube executor may act on.
    pub kubernetes: KubeConfig,
    /// Feature-flag providers `feature_flag.*` steps may name.
    pub feature_flags: BTreeMap<String, FlagProvider>,
    /// The SQLite store.
    pub store: StoreConfig,
    /// How long ended runs and audit rows are kept.
    pub retention: RetentionConfig,
    /// Where the audit log is copied as it is written.
    pub audit: AuditConfig,
    /// Blast-radius budgets: how many times an action may act per period, across replicas.
    pub budgets: Vec<Budget>,
    /// The file this was loaded from; `None` on the embedded defaults.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// How hard SQLite works to keep a commit across a power loss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Synchronous {
    /// Every commit is on disk before it is acknowledged (`PRAGMA synchronous=FULL`): an
    /// alert answered 200 survives a power loss.
    #[default]
    Full,
    /// Commits reach the OS at once and the disk at the next checkpoint (`NORMAL`, WAL): a
    /// crash of Reflex loses nothing, a power loss may lose the last moments. Faster.
    Normal,
}

/// The store: SQLite in the data directory (default), or a PostgreSQL database that several
/// replicas share (`url`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// SQLite: `full` (default) or `normal`.
    pub synchronous: Synchronous,
    /// PostgreSQL: `postgres://user@host:5432/dbname` (or `host=... user=...`). Absent: SQLite.
    /// Keep the password out of it: `password_env` or `password_file`.
    pub url: Option<String>,
    /// The environment variable holding the PostgreSQL password.
    pub password_env: Option<String>,
    /// The file holding the PostgreSQL password (a mounted secret).
    pub password_file: Option<PathBuf>,
    /// PostgreSQL connections for reads at most (the writer and the listener have one each
    /// besides).
    pub pool_size: u32,
    /// PostgreSQL: writer connections, each committing its own batches at the same time as the
    /// others (the locks that keep replicas apart keep them apart too). One writer's batches
    /// go one round trip per alert, back to back; more writers overlap them.
    pub writers: u32,
    /// Connecting to PostgreSQL gives up after this.
    #[serde(deserialize_with = "duration_str::deserialize")]
    pub connect_timeout: Duration,
    /// A statement running longer than this is cancelled by the server (every read has an
    /// end).
    #[serde(deserialize_with = "duration_str::deserialize")]
    pub statement_timeout: Duration,
    /// This replica's name in the shared database (leases, who claimed what). Default: the
    /// host name and the process id.
    pub replica: Option<String>,
    /// PEM file of the certificate authorities PostgreSQL's certificate is checked against
    /// (default: the system's). TLS is used as the URL's `sslmode` says: `verify-full` (the
    /// default for a server not on loopback), `require` and `verify-ca` (as strict),
    /// `prefer` (the default on loopback; refused for any other host, where it could be
    /// downgraded) or `disable` (written explicitly); the certificate and the host name are
    /// always verified when TLS is used.
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            synchronous: Synchronous::Full,
            url: None,
            password_env: None,
            password_file: None,
            pool_size: 8,
            writers: 2,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            replica: None,
            tls_ca_file: None,
        }
    }
}

impl StoreConfig {
    /// Where the PostgreSQL password comes from, if anywhere.
    pub fn password_ref(&self) -> Result<Option<SecretRef>, String> {
        SecretRef::from_fields("password", &None, &self.password_env, &self.password_file)
    }
}

/// Kubernetes clusters.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubeConfig {
    /// Clusters by name. None configured: one cluster `default`, from `KUBECONFIG`,
    /// `~/.kube/config` or the in-cluster service account, whichever is there.
    pub clusters: BTreeMap<String, ClusterConfig>,
    /// The cluster of steps that name none (default: the only one, or `default`).
    pub default_cluster: Option<String>,
    /// Retries of a read-modify-write that met a conflict (409) with a concurrent writer.
    pub max_conflict_retries: u32,
    /// Namespaces steps may act in, on clusters that do not list their own: names, or
    /// prefixes ending in `*` (`team-*`). Empty: any namespace but the protected ones.
    pub allowed_namespaces: Vec<String>,
    /// Namespaces no step acts in unless a cluster's or the global `allowed_namespaces` names
    /// them exactly (a `*` pattern does not): the control plane's, and Reflex's own (the pod's
    /// namespace is added when running in a cluster).
    pub protected_namespaces: Vec<String>,
}

impl Default for KubeConfig {
    fn default() -> Self {
        KubeConfig {
            clusters: BTreeMap::new(),
            default_cluster: None,
            max_conflict_retries: 5,
            allowed_namespaces: Vec::new(),
            protected_namespaces: ["kube-system", "kube-public", "kube-node-lease", "reflex"]
                .map(String::from)
                .to_vec(),
        }
    }
}

/// One cluster.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// kubeconfig file (default: `KUBECONFIG` or `~/.kube/config`).
    pub kubeconfig: Option<PathBuf>,
    /// Context in it (default: its current context).
    pub context: Option<String>,
    /// Use the pod's service account.
    pub in_cluster: bool,
    /// Namespaces steps may act in on this cluster (overrides `kubernetes.allowed_namespaces`).
    pub allowed_namespaces: Option<Vec<String>>,
}

/// Feature-flag provider kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlagKind {
    /// Unleash admin API (environment on/off).
    Unleash,
    /// LaunchDarkly REST API (semantic patch turnFlagOff / turnFlagOn).
    Launchdarkly,
    /// flagd / OpenFeature flag definitions held as JSON in a ConfigMap key.
    FlagdConfigmap,
    /// Any HTTP endpoint.
    Http,
}

/// A feature-flag provider. Tokens come from the environment or files, never from playbooks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlagProvider {
    /// Kind.
    #[serde(rename = "type")]
    pub kind: FlagKind,
    /// API base URL (Unleash, LaunchDarkly: default `https://app.launchdarkly.com`), or for
    /// `http` the URL with `{flag}` and `{action}` (`enable`/`disable`) placeholders.
    pub url: Option<String>,
    /// Environment variable holding the API token.
    pub token_env: Option<String>,
    /// File holding the API token.
    pub token_file: Option<PathBuf>,
    /// Project (Unleash: default `default`; LaunchDarkly: required).
    pub project: Option<String>,
    /// Environment (Unleash, LaunchDarkly).
    pub environment: Option<String>,
    /// Cluster of the ConfigMap (flagd_configmap).
    pub cluster: Option<String>,
    /// Namespace of the ConfigMap.
    pub namespace: Option<String>,
    /// ConfigMap name.
    pub configmap: Option<String>,
    /// Key in the ConfigMap holding the flagd JSON.
    pub key: Option<String>,
    /// Method for `http` (default POST).
    pub method: Option<String>,
}

pub use crate::secret::SecretRef;

impl FlagProvider {
    /// Where the token comes from, if the provider has one.
    pub fn token_ref(&self) -> Result<Option<SecretRef>, String> {
        SecretRef::from_fields("token", &None, &self.token_env, &self.token_file)
    }

    /// The token, read now.
    pub fn token(&self) -> Result<Option<String>, String> {
        self.token_ref()?.map(|r| r.read()).transpose()
    }
}

/// A credential for `http` steps.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// Header to put it in (default `Authorization`).
    #[serde(default = "authorization")]
    pub header: String,
    /// Text before the secret (e.g. `Bearer `).
    #[serde(default)]
    pub prefix: String,
    /// Environment variable holding the secret.
    pub env: Option<String>,
    /// File holding the secret.
    pub file: Option<PathBuf>,
}

fn authorization() -> String {
    "Authorization".into()
}

impl Credential {
    /// Where the secret comes from.
    pub fn secret_ref(&self) -> Result<SecretRef, String> {
        match (&self.env, &self.file) {
            (Some(var), None) => Ok(SecretRef::Env(var.clone())),
            (None, Some(path)) => Ok(SecretRef::File(path.clone())),
            _ => Err("a credential needs exactly one of env or file".into()),
        }
    }

    /// The header value, read now (so a rotated file is picked up).
    pub fn value(&self) -> Result<String, String> {
        Ok(format!("{}{}", self.prefix, self.secret_ref()?.read()?))
    }
}

/// Circuit breaker limits, each counted over `window`. Crossing one engages the global kill
/// switch with a reason naming the limit; only a person releases it. Zero disables a limit.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// The sliding window the limits count over.
    #[serde(with = "duration_str")]
    pub window: Duration,
    /// Runs started in the window, all playbooks together.
    pub max_runs: u32,
    /// Runs started in the window by any one playbook.
    pub max_runs_per_playbook: u32,
    /// Runs that ended `failed` in the window.
    pub max_failures: u32,
    /// Distinct targets acted on in the window: a storm across many hosts is more likely a
    /// misfiring automation than many broken hosts.
    pub max_targets: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: Duration::from_secs(600),
            max_runs: 100,
            max_runs_per_playbook: 50,
            max_failures: 10,
            max_targets: 50,
        }
    }
}

/// A maintenance window.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceWindow {
    /// Shown in the suppression reason.
    pub name: String,
    /// Alertmanager-syntax matchers; all must hold (none: every alert).
    #[serde(default)]
    pub matchers: Vec<String>,
    /// Start, RFC 3339.
    pub start: String,
    /// End, RFC 3339.
    pub end: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 9095)),
            server: crate::api::server::ServerConfig::default(),
            playbooks_dir: PathBuf::from("playbooks"),
            data_dir: PathBuf::from("data"),
            dry_run: false,
            intake: IntakeConfig::default(),
            engine: EngineConfig::default(),
            ssh: SshConfig::default(),
            breaker: BreakerConfig::default(),
            maintenance_windows: Vec::new(),
            auth: AuthConfig::default(),
            notify: NotifyConfig::default(),
            public_url: None,
            prometheus_url: "http://127.0.0.1:9090".into(),
            credentials: BTreeMap::new(),
            kubernetes: KubeConfig::default(),
            feature_flags: BTreeMap::new(),
            store: StoreConfig::default(),
            retention: RetentionConfig::default(),
            audit: AuditConfig::default(),
            budgets: Vec::new(),
            source: None,
        }
    }
}

/// Webhook intake limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IntakeConfig {
    /// Largest request body accepted, in bytes; larger bodies get 413. Alertmanager groups are
    /// a few KiB; 1 MiB leaves room for big groups while bounding memory per request.
    pub max_body_bytes: usize,
    /// How long one webhook's alerts may be planned before it is answered. Alerts not planned
    /// by then are stored as they are, answered as `deferred`, and planned right after: a
    /// webhook whose playbooks are slow to evaluate is never dropped, and a retry does not
    /// repeat the work. At most half of `server.request_timeout` is used, whatever is set.
    #[serde(with = "duration_str")]
    pub plan_request_budget: Duration,
}

impl Default for IntakeConfig {
    fn default() -> Self {
        IntakeConfig {
            max_body_bytes: 1024 * 1024,
            plan_request_budget: Duration::from_secs(5),
        }
    }
}

/// How long the record is kept (`retention:`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Ended runs, with their steps, approvals, artifacts and alerts, are deleted this long
    /// after they ended (never sooner than the breaker's window or a playbook's cooldown, which
    /// count runs).
    #[serde(with = "duration_str")]
    pub runs: Duration,
    /// Audit rows are deleted this long after they were written (`reflex audit export` first,
    /// to keep them elsewhere).
    #[serde(with = "duration_str")]
    pub audit: Duration,
    /// How often retention runs (and once at start).
    #[serde(with = "duration_str")]
    pub every: Duration,
    /// Rows per table deleted in one transaction.
    pub batch: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            runs: Duration::from_secs(90 * 86_400),
            audit: Duration::from_secs(400 * 86_400),
            every: Duration::from_secs(3600),
            batch: 500,
        }
    }
}

/// A blast-radius budget (`budgets:`): at most `max` steps of `action` (or of every action
/// that changes something, for `*`) start acting in any `per`, counted across replicas when a
/// step is about to act. A step over budget is not executed: its run fails (`on_exceed:
/// fail`) or waits until the budget has room (`wait`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// An action name (`kube.delete_pod`), or `*`.
    pub action: String,
    /// Steps at most in any `per`.
    pub max: u32,
    /// The sliding window.
    #[serde(with = "duration_str")]
    pub per: Duration,
    /// `fail` (default) or `wait`.
    #[serde(default)]
    pub on_exceed: OnExceed,
}

/// What a step over budget does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExceed {
    /// The step is refused; its run fails.
    #[default]
    Fail,
    /// The step waits until the budget has room (or the run is cancelled or ends).
    Wait,
}

impl Budget {
    /// Whether it counts a step of `action` (only actions that change something count).
    pub fn covers(&self, action: crate::playbook::actions::Action) -> bool {
        action.changes_something() && (self.action == "*" || self.action == action.name())
    }
}

/// The audit log (`audit:`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// An HTTP endpoint every audit row is sent to as a CloudEvent, as it is written.
    pub sink: Option<AuditSinkConfig>,
}

/// `audit.sink`: rows are POSTed oldest first as a CloudEvents 1.0 JSON batch
/// (`application/cloudevents-batch+json`); the last row the sink answered 2xx for is kept in
/// the store, so a restart or an outage of the sink loses nothing (a row may be sent twice:
/// its event `id` tells the copies apart). Rows not yet sent are not pruned.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSinkConfig {
    /// The endpoint (http or https).
    pub url: String,
    /// A credential of `credentials:` sent with every request.
    #[serde(default)]
    pub credential: Option<String>,
    /// How long one request may take.
    #[serde(default = "five_seconds", with = "duration_str")]
    pub timeout: Duration,
    /// Rows per request at most.
    #[serde(default = "hundred")]
    pub batch: u32,
}

fn five_seconds() -> Duration {
    Duration::from_secs(5)
}

fn hundred() -> u32 {
    100
}

/// Run execution limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Runs executing at once; further runs wait in the store, in order.
    pub max_concurrent_runs: usize,
    /// Timeout of a step that gives none (e.g. `60s`).
    #[serde(with = "duration_str")]
    pub default_step_timeout: Duration,
    /// How long shutdown waits for running steps to finish before exiting; a step cut off
    /// is marked `interrupted` at the next start.
    #[serde(with = "duration_str")]
    pub shutdown_grace: Duration,
    /// Runs executing at once against one target (a host, a workload).
    pub max_runs_per_target: u32,
    /// Longest a run may execute (approval waits aside); a hung step cannot hold its slot
    /// forever. Playbooks may set their own `deadline`.
    #[serde(with = "duration_str")]
    pub run_deadline: Duration,
    /// Wall-clock budget of one alert's Rhai work (every matching playbook's `when`,
    /// parameters and templates); past it the alert is recorded as failed to plan.
    #[serde(with = "duration_str")]
    pub plan_budget: Duration,
    /// Caps on what steps keep besides their output (graphs, logs), per artifact and per run.
    pub artifacts: crate::store::ArtifactCaps,
    /// `shadow`: every playbook runs in shadow mode (see [`Mode`]).
    pub mode: Mode,
}

/// Whether runs act (`engine.mode`, a playbook's `mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Steps act.
    #[default]
    Act,
    /// Runs are planned and recorded exactly as they would act (holds, gates, the breaker
    /// evaluated; evidence gathered) and no step that changes anything is executed: each says
    /// what it would have done. The older spelling is `dry_run: true`.
    Shadow,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_concurrent_runs: 32,
            default_step_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
            max_runs_per_target: 1,
            run_deadline: Duration::from_secs(3600),
            plan_budget: Duration::from_millis(250),
            artifacts: crate::store::ArtifactCaps::default(),
            mode: Mode::Act,
        }
    }
}

/// Error loading the configuration, with file and line.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line (1 when unknown).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl Config {
    /// Loads and validates a config file: every problem, each with its line.
    pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
        let (cfg, problems) = Self::load_parts(path)?;
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(problems)
        }
    }

    /// Loads a config file: the config, with what it names outside itself that is not there
    /// (secrets, kubeconfigs); or, when it cannot be read at all, its errors.
    pub fn load_parts(path: &Path) -> Result<(Config, Vec<ConfigError>), Vec<ConfigError>> {
        let err = |(line, message): (usize, String)| ConfigError {
            file: path.to_path_buf(),
            line,
            message,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![err((1, format!("cannot read: {e}")))])?;
        let mut cfg =
            Self::parse(&text).map_err(|errors| errors.into_iter().map(err).collect::<Vec<_>>())?;
        cfg.source = Some(path.to_path_buf());
        let problems = (cfg.environment_problems().into_iter())
            .map(|(at, message)| err((Key::line(&text, &at), message)))
            .collect();
        Ok((cfg, problems))
    }

    /// What the config names outside itself that is not there: every secret (read now: an
    /// unset variable, a missing file or an empty secret is an error naming the setting) and
    /// every kubeconfig. `serve` and `check --config` both load through here, so what one
    /// refuses the other refuses with the same words.
    fn environment_problems(&self) -> Vec<(Vec<Key>, String)> {
        let mut out = Vec::new();
        for (at, secret) in self.secrets() {
            if let Err(e) = secret.and_then(|s| s.read()) {
                out.push((at.clone(), format!("{}: {e}", Key::dotted(&at))));
            }
        }
        for (name, c) in &self.kubernetes.clusters {
            let Some(path) = &c.kubeconfig else { continue };
            let at = vec![
                Key::Name("kubernetes".into()),
                Key::Name("clusters".into()),
                Key::Name(name.clone()),
                Key::Name("kubeconfig".into()),
            ];
            match kube::config::Kubeconfig::read_from(path) {
                Err(_) if !path.exists() => out.push((
                    at,
                    format!(
                        "cluster {name:?}: kubeconfig {} does not exist",
                        path.display()
                    ),
                )),
                Err(e) => out.push((
                    at,
                    format!("cluster {name:?}: kubeconfig {}: {e}", path.display()),
                )),
                Ok(kc) => {
                    if let Some(ctx) = &c.context
                        && !kc.contexts.iter().any(|n| &n.name == ctx)
                    {
                        out.push((
                            at,
                            format!(
                                "cluster {name:?}: context {ctx:?} is not in {}",
                                path.display()
                            ),
                        ));
                    }
                }
            }
        }
        out
    }

    /// Host names (lowercase, without a port) requests may carry in `Host` (see
    /// `server.allowed_hosts`).
    pub fn allowed_hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
            .map(String::from)
            .to_vec();
        let listen = match self.listen.ip() {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            ip => ip.to_string(),
        };
        hosts.push(listen);
        if let Some(host) = (self.public_url.as_deref())
            .and_then(|u| u.split_once("://"))
            .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or(""))
        {
            hosts.push(crate::text::host_of(host));
        }
        hosts.extend(
            self.server
                .allowed_hosts
                .iter()
                .map(|h| crate::text::host_of(h)),
        );
        hosts.sort();
        hosts.dedup();
        hosts
    }

    /// Every run in shadow mode (`engine.mode: shadow`, or the older `dry_run: true`, or
    /// `reflex serve --dry-run`).
    pub fn shadow(&self) -> bool {
        self.dry_run || self.engine.mode == Mode::Shadow
    }

    /// The names playbooks may refer to; checked only when a config file defines them.
    pub fn references(&self) -> crate::playbook::references::References {
        crate::playbook::references::References {
            checked: self.source.is_some(),
            approvers: (!self.auth.tokens.is_empty()).then(|| {
                (self.auth.tokens.iter())
                    // Roles nest from approver up (webhook is below viewer).
                    .filter(|t| t.role >= Role::Approver)
                    .map(|t| t.name.clone())
                    .collect()
            }),
            providers: self.feature_flags.keys().cloned().collect(),
            credentials: self.credentials.keys().cloned().collect(),
        }
    }

    /// Every secret the config names, with the path of its setting.
    fn secrets(&self) -> Vec<(Vec<Key>, Result<SecretRef, String>)> {
        let k = |s: &str| Key::Name(s.to_string());
        let mut out: Vec<(Vec<Key>, Result<SecretRef, String>)> = Vec::new();
        for (i, t) in self.auth.tokens.iter().enumerate() {
            if let Some(file) = &t.file {
                let at = vec![k("auth"), k("tokens"), Key::Index(i), k("file")];
                out.push((at, Ok(SecretRef::File(file.clone()))));
            }
        }
        if let Some(app) = &self.notify.slack_app {
            out.push((vec![k("notify"), k("slack_app")], app.secret_ref()));
        }
        if let Some(app) = &self.notify.mattermost_app {
            out.push((vec![k("notify"), k("mattermost_app")], app.secret_ref()));
        }
        for (i, s) in self.notify.sinks.iter().enumerate() {
            let at = vec![k("notify"), k("sinks"), Key::Index(i)];
            out.push(match s.kind {
                SinkKind::SlackBot | SinkKind::MattermostBot => (
                    at,
                    s.secret_ref("token", &None, &s.token_env, &s.token_file),
                ),
                _ => (at, s.secret_ref("url", &s.url, &s.url_env, &s.url_file)),
            });
        }
        for (name, c) in &self.credentials {
            out.push((vec![k("credentials"), k(name)], c.secret_ref()));
        }
        for (name, p) in &self.feature_flags {
            if let Some(r) = p.token_ref().transpose() {
                out.push((vec![k("feature_flags"), k(name)], r));
            }
        }
        if let Some(r) = self.store.password_ref().transpose() {
            out.push((vec![k("store")], r));
        }
        out
    }

    /// Parses config text: the config, or every problem with its 1-based line. (The YAML
    /// reader stops at its first error; the checks after it report all they find.)
    pub fn parse(text: &str) -> Result<Config, Vec<(usize, String)>> {
        let cfg: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| Self::every_shape_error(text, &e))?
        };
        let problems = cfg.problems();
        if problems.is_empty() {
            return Ok(cfg);
        }
        Err(problems
            .into_iter()
            .map(|(path, message)| (Key::line(text, &path), message))
            .collect())
    }

    /// Every error of shape (unknown keys, wrong types), not only the first one serde meets:
    /// the first with its exact line, then each other top-level section read on its own. A
    /// YAML syntax error stops everything and is the only one.
    fn every_shape_error(text: &str, first: &serde_yaml::Error) -> Vec<(usize, String)> {
        use crate::playbook::locate::{Seg, line_of};
        let first_line = first.location().map_or(1, |l| l.line());
        let mut out = vec![(first_line, first.to_string())];
        let Ok(serde_yaml::Value::Mapping(sections)) = serde_yaml::from_str(text) else {
            return out;
        };
        let keys: Vec<(usize, String)> = (sections.keys())
            .filter_map(|k| k.as_str())
            .map(|k| (line_of(text, &[Seg::Key(k)]), k.to_string()))
            .collect();
        // The section the first error is in: the last one that starts at or before it.
        let first_section = (keys.iter())
            .filter(|(line, _)| *line <= first_line)
            .max_by_key(|(line, _)| *line)
            .map(|(_, k)| k.clone());
        for (key, value) in sections {
            let Some(name) = key.as_str() else { continue };
            if Some(name) == first_section.as_deref() {
                continue;
            }
            let mut one = serde_yaml::Mapping::new();
            one.insert(key.clone(), value);
            if let Err(e) =
                serde_path_to_error::deserialize::<_, Config>(serde_yaml::Value::Mapping(one))
            {
                let path: Vec<String> = (e.path().iter())
                    .map(|seg| match seg {
                        serde_path_to_error::Segment::Seq { index } => format!("#{index}"),
                        other => other.to_string(),
                    })
                    .collect();
                let segs: Vec<Seg<'_>> = (path.iter())
                    .map(|p| match p.strip_prefix('#').and_then(|i| i.parse().ok()) {
                        Some(i) => Seg::Index(i),
                        None => Seg::Key(p),
                    })
                    .collect();
                let dotted = e.path().to_string();
                out.push((line_of(text, &segs), format!("{dotted}: {}", e.inner())));
            }
        }
        out
    }

    /// Checks what serde cannot; the first problem, if any (see [`Config::parse`] for all).
    pub fn validate(&self) -> Result<(), String> {
        match self.problems().into_iter().next() {
            Some((path, message)) => Err(format!("{}: {message}", Key::dotted(&path))),
            None => Ok(()),
        }
    }

    /// Every problem serde cannot see, each with the YAML path it is at.
    fn problems(&self) -> Vec<(Vec<Key>, String)> {
        let mut out = Problems::default();
        self.limit_problems(&mut out);
        if self.auth.tokens.is_empty() && !self.listen.ip().is_loopback() && !self.auth.open {
            out.at(
                &[k("listen")],
                format!(
                    "{} is reachable from other machines, and with no auth.tokens every caller \
                     would be an admin: add tokens (auth.tokens), listen on 127.0.0.1, or set \
                     `auth.open: true` to serve an open API on purpose",
                    self.listen
                ),
            );
        }
        self.store_problems(&mut out);
        let mut seen = std::collections::BTreeSet::new();
        for (i, b) in self.budgets.iter().enumerate() {
            let at = |key: &str| vec![k("budgets"), Key::Index(i), k(key)];
            if b.action != "*" && crate::playbook::actions::Action::parse(&b.action).is_none() {
                out.at(
                    &at("action"),
                    format!(
                        "budgets: unknown action {:?} (an action name, or \"*\")",
                        b.action
                    ),
                );
            } else if crate::playbook::actions::Action::parse(&b.action)
                .is_some_and(|a| !a.changes_something())
            {
                out.at(
                    &at("action"),
                    format!(
                        "budgets: {} changes nothing; budgets count actions that change something",
                        b.action
                    ),
                );
            }
            if !seen.insert(b.action.clone()) {
                out.at(
                    &at("action"),
                    format!("budgets: a second budget for {:?}", b.action),
                );
            }
            if b.per.is_zero() {
                out.at(&at("per"), "budgets: per must be above 0".to_string());
            }
        }
        if let Some(sink) = &self.audit.sink {
            let at = |key: &str| vec![k("audit"), k("sink"), k(key)];
            if !(sink.url.starts_with("http://") || sink.url.starts_with("https://"))
                || reqwest::Url::parse(&sink.url).is_err()
            {
                out.at(
                    &at("url"),
                    "audit.sink.url must be an http(s) URL".to_string(),
                );
            }
            if let Some(name) = &sink.credential
                && !self.credentials.contains_key(name)
            {
                out.at(
                    &at("credential"),
                    format!("audit.sink.credential {name:?} is not in credentials:"),
                );
            }
            if sink.batch == 0 || sink.timeout.is_zero() {
                out.at(
                    &at("batch"),
                    "audit.sink.batch and timeout must be above 0".to_string(),
                );
            }
        }
        self.maintenance_problems(&mut out);
        self.token_problems(&mut out);
        for (i, s) in self.notify.sinks.iter().enumerate() {
            if let Some(bad) = s.events.iter().find(|e| !EVENTS.contains(&e.as_str())) {
                out.at(
                    &[k("notify"), k("sinks"), Key::Index(i), k("events")],
                    format!(
                        "sink {:?}: unknown event {bad:?} (known: {})",
                        s.name,
                        EVENTS.join(", ")
                    ),
                );
            }
        }
        for (i, file) in self.ssh.inventory_files.iter().enumerate() {
            if let Err(e) = crate::executors::ssh::inventory::load(file) {
                out.at(&[k("ssh"), k("inventory_files"), Key::Index(i)], e);
            }
        }
        let mut names = std::collections::HashMap::new();
        for (name, host) in &self.ssh.hosts {
            for alias in std::iter::once(name).chain(&host.aliases) {
                if let Some(other) = names.insert(alias.as_str(), name.as_str())
                    && other != name
                {
                    out.at(
                        &[k("ssh"), k("hosts"), k(name)],
                        format!("{alias:?} names both {other:?} and {name:?}"),
                    );
                }
            }
        }
        out.0
    }

    /// Sizes and counts below their least useful value.
    fn limit_problems(&self, out: &mut Problems) {
        for (path, value, min) in [
            (
                ["engine", "max_concurrent_runs"],
                self.engine.max_concurrent_runs,
                1,
            ),
            (
                ["intake", "max_body_bytes"],
                self.intake.max_body_bytes,
                1024,
            ),
            (
                ["engine", "max_runs_per_target"],
                self.engine.max_runs_per_target as usize,
                1,
            ),
            (
                ["server", "max_connections"],
                self.server.max_connections,
                1,
            ),
            (
                ["ssh", "max_sessions_per_host"],
                self.ssh.max_sessions_per_host,
                1,
            ),
        ] {
            if value < min {
                out.at(&[k(path[0]), k(path[1])], format!("must be at least {min}"));
            }
        }
    }

    /// The PostgreSQL URL (no password in it), its pool and its password's source.
    fn store_problems(&self, out: &mut Problems) {
        if let Some(url) = &self.store.url {
            match crate::store::pg::parse_url(url) {
                Ok(pg) if pg.get_password().is_some() => out.at(
                    &[k("store"), k("url")],
                    "keep the password out of the URL: use store.password_env or \
                     store.password_file"
                        .into(),
                ),
                Ok(_) => {}
                Err(e) => out.at(
                    &[k("store"), k("url")],
                    format!("not a PostgreSQL URL: {e}"),
                ),
            }
            if self.store.pool_size < 1 {
                out.at(&[k("store"), k("pool_size")], "must be at least 1".into());
            }
            if !(1..=16).contains(&self.store.writers) {
                out.at(&[k("store"), k("writers")], "must be 1 to 16".into());
            }
        }
        if let Err(e) = self.store.password_ref() {
            out.at(&[k("store")], e);
        }
    }

    /// Each maintenance window's times and matchers.
    fn maintenance_problems(&self, out: &mut Problems) {
        for (i, w) in self.maintenance_windows.iter().enumerate() {
            let here = |key: &str| vec![k("maintenance_windows"), Key::Index(i), k(key)];
            for (key, t) in [("start", &w.start), ("end", &w.end)] {
                if let Err(e) = crate::time::Timestamp::parse(t) {
                    out.at(&here(key), format!("maintenance window {:?}: {e}", w.name));
                }
            }
            for m in &w.matchers {
                if let Err(e) = crate::playbook::matcher::Matcher::parse(m) {
                    out.at(
                        &here("matchers"),
                        format!("maintenance window {:?}: {e}", w.name),
                    );
                }
            }
        }
    }

    /// Each token: exactly one of a digest (64 hex digits, not the empty token's) or a file.
    fn token_problems(&self, out: &mut Problems) {
        for (i, t) in self.auth.tokens.iter().enumerate() {
            let here = [k("auth"), k("tokens"), Key::Index(i)];
            match (&t.sha256, &t.file) {
                (Some(h), None) if h.eq_ignore_ascii_case(EMPTY_SHA256) => out.at(
                    &here,
                    format!(
                        "token {:?}: sha256 is the digest of an empty token; a token must not \
                         be empty",
                        t.name
                    ),
                ),
                (Some(h), None) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {}
                (Some(_), None) => out.at(
                    &here,
                    format!("token {:?}: sha256 must be 64 hex digits", t.name),
                ),
                (None, Some(_)) => {}
                _ => out.at(
                    &here,
                    format!("token {:?}: give exactly one of sha256 or file", t.name),
                ),
            }
        }
    }
}

/// Problems found in a config, each at its YAML path.
#[derive(Default)]
struct Problems(Vec<(Vec<Key>, String)>);

impl Problems {
    fn at(&mut self, path: &[Key], message: String) {
        self.0.push((path.to_vec(), message));
    }
}

/// A key of a YAML path.
fn k(name: &str) -> Key {
    Key::Name(name.to_string())
}

/// One step of a YAML path into the config, for error lines.
#[derive(Debug, Clone)]
enum Key {
    Name(String),
    Index(usize),
}

impl Key {
    fn seg(&self) -> crate::playbook::locate::Seg<'_> {
        match self {
            Key::Name(n) => crate::playbook::locate::Seg::Key(n),
            Key::Index(i) => crate::playbook::locate::Seg::Index(*i),
        }
    }

    /// The 1-based line of `path` in `text`.
    fn line(text: &str, path: &[Key]) -> usize {
        let segs: Vec<crate::playbook::locate::Seg<'_>> = path.iter().map(Key::seg).collect();
        crate::playbook::locate::line_of(text, &segs)
    }

    fn dotted(path: &[Key]) -> String {
        path.iter()
            .map(|k| match k {
                Key::Name(n) => n.clone(),
                Key::Index(i) => i.to_string(),
            })
            .collect::<Vec<_>>()
            .join(".")
    }
}

pub(crate) use crate::time::duration_str;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_the_embedded_defaults() {
        let cfg = Config::parse("").unwrap();
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:9095");
        assert_eq!(cfg.playbooks_dir, PathBuf::from("playbooks"));
        assert_eq!(cfg.intake.max_body_bytes, 1 << 20);
    }

    #[test]
    fn unknown_key_is_an_error_with_its_line() {
        let errors = Config::parse("listen: 127.0.0.1:1\nengine:\n  workers: 3\n").unwrap_err();
        let (line, msg) = &errors[0];
        assert_eq!(*line, 3);
        assert!(msg.contains("workers"), "{msg}");
    }

    #[test]
    fn budgets_and_the_audit_sink_are_checked_each_at_its_line() {
        let text = "budgets:\n  - { action: kube.delete_pod, max: 10, per: 1h }\n  - { action: kube.zap, max: 1, per: 1h }\n  - { action: kube.logs, max: 1, per: 1h }\n  - { action: kube.delete_pod, max: 3, per: 0s }\naudit:\n  sink: { url: \"ftp://x\", credential: nope }\n";
        let errors = Config::parse(text).unwrap_err();
        let found: Vec<(usize, &str)> = errors.iter().map(|(l, m)| (*l, m.as_str())).collect();
        for (line, needle) in [
            (3, "unknown action \"kube.zap\""),
            (4, "kube.logs changes nothing"),
            (5, "a second budget for \"kube.delete_pod\""),
            (5, "per must be above 0"),
            (7, "http(s) URL"),
            (7, "\"nope\" is not in credentials"),
        ] {
            assert!(
                found.iter().any(|(l, m)| *l == line && m.contains(needle)),
                "no {needle:?} at line {line} in {found:#?}"
            );
        }
        assert_eq!(found.len(), 6, "{found:#?}");
        let ok =
            Config::parse("budgets:\n  - { action: \"*\", max: 200, per: 1h, on_exceed: wait }\n")
                .unwrap();
        assert_eq!(ok.budgets[0].on_exceed, OnExceed::Wait);
    }

    #[test]
    fn store_writers_are_one_to_sixteen_at_their_line() {
        let text = "store:\n  url: postgres://reflex@127.0.0.1/reflex\n  writers: 0\n";
        let errors = Config::parse(text).unwrap_err();
        assert!(
            errors
                .iter()
                .any(|(l, m)| *l == 3 && m.contains("must be 1 to 16")),
            "{errors:#?}"
        );
        let ok = Config::parse("store:\n  url: postgres://reflex@127.0.0.1/reflex\n").unwrap();
        assert_eq!(ok.store.writers, 2, "two writers by default");
    }

    #[test]
    fn every_check_reports_at_once_each_at_its_line() {
        let text = "listen: 0.0.0.0:9095\nengine:\n  max_concurrent_runs: 0\nmaintenance_windows:\n  - name: w\n    matchers: ['a=~\"(\"']\n    start: soon\n    end: 2026-01-01T00:00:00Z\nauth:\n  tokens:\n    - { name: a, role: admin, sha256: abc }\nnotify:\n  sinks:\n    - name: s\n      type: slack\n      url: http://x\n      events: [run_ended]\n";
        let errors = Config::parse(text).unwrap_err();
        let found: Vec<(usize, &str)> = errors.iter().map(|(l, m)| (*l, m.as_str())).collect();
        for (line, needle) in [
            (3, "at least 1"),
            (7, "\"soon\""),
            (6, "maintenance window"),
            (11, "64 hex digits"),
            (17, "unknown event \"run_ended\""),
        ] {
            assert!(
                found.iter().any(|(l, m)| *l == line && m.contains(needle)),
                "no {needle:?} at line {line} in {found:#?}"
            );
        }
        assert_eq!(errors.len(), 5, "{found:#?}");
    }

    /// Loads `text` as a config file in a temp dir whose `EMPTY` is an empty file and
    /// `BLANK` a file of white space.
    fn load_with_files(text: &str) -> Result<Config, Vec<ConfigError>> {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        let blank = dir.path().join("blank");
        std::fs::write(&empty, "").unwrap();
        std::fs::write(&blank, " \n\t\n").unwrap();
        let path = dir.path().join("reflex.yaml");
        let text = text
            .replace("EMPTY", &empty.display().to_string())
            .replace("BLANK", &blank.display().to_string())
            .replace("DIR", &dir.path().display().to_string());
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    #[test]
    fn an_empty_secret_is_refused_naming_its_setting() {
        // SAFETY of the test: the variable is unique to it.
        let cases = [
            (
                "auth:\n  tokens:\n    - { name: a, role: admin, file: EMPTY }\n",
                3,
                "auth.tokens.0.file",
            ),
            (
                "auth:\n  tokens:\n    - { name: a, role: admin, file: BLANK }\n",
                3,
                "auth.tokens.0.file",
            ),
            (
                "auth:\n  tokens:\n    - { name: a, role: admin, file: DIR/none }\n",
                3,
                "auth.tokens.0.file",
            ),
            (
                "auth:\n  tokens:\n    - { name: a, role: admin, sha256: E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855 }\n",
                3,
                "empty token",
            ),
            (
                "notify:\n  slack_app:\n    signing_secret_file: EMPTY\n",
                2,
                "notify.slack_app",
            ),
            (
                "notify:\n  mattermost_app:\n    callback_url: http://x/\n    secret_file: BLANK\n",
                2,
                "notify.mattermost_app",
            ),
            (
                "notify:\n  sinks:\n    - { name: s, type: slack, url_env: REFLEX_TEST_UNSET_VARIABLE }\n",
                3,
                "notify.sinks.0",
            ),
            (
                "notify:\n  sinks:\n    - { name: s, type: slack_bot, channel: c, token_file: EMPTY }\n",
                3,
                "notify.sinks.0",
            ),
            (
                "credentials:\n  statuspage:\n    file: EMPTY\n",
                2,
                "credentials.statuspage",
            ),
            (
                "feature_flags:\n  flags:\n    type: unleash\n    url: http://x/\n    token_file: EMPTY\n",
                2,
                "feature_flags.flags",
            ),
            (
                "store:\n  url: postgres://reflex@127.0.0.1/reflex\n  password_file: BLANK\n",
                1,
                "store",
            ),
            (
                "kubernetes:\n  clusters:\n    prod:\n      kubeconfig: DIR/missing\n",
                4,
                "kubeconfig",
            ),
        ];
        for (text, line, needle) in cases {
            let errors = load_with_files(text).expect_err(text);
            assert_eq!(errors.len(), 1, "{text}: {errors:?}");
            let e = &errors[0];
            assert!(e.message.contains(needle), "{text}: {e}");
            assert_eq!(e.line, line, "{text}: {e}");
        }
        // A secret that is there loads.
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let ok = format!(
            "auth:\n  tokens:\n    - {{ name: a, role: admin, file: {} }}\n",
            token.display()
        );
        load_with_files(&ok).unwrap();
    }

    #[test]
    fn postgres_sslmode_never_sends_a_password_in_the_clear_off_loopback() {
        use postgres::config::SslMode;
        let mode = |url: &str| crate::store::pg::parse_url(url).map(|c| c.get_ssl_mode());
        assert_eq!(
            mode("postgres://r@db.internal/reflex"),
            Ok(SslMode::Require)
        );
        assert_eq!(mode("host=db.internal user=r"), Ok(SslMode::Require));
        assert_eq!(mode("postgres://r@127.0.0.1/reflex"), Ok(SslMode::Prefer));
        assert_eq!(mode("postgres://r@localhost/reflex"), Ok(SslMode::Prefer));
        for m in ["require", "verify-ca", "verify-full"] {
            assert_eq!(
                mode(&format!("postgres://r@db.internal/reflex?sslmode={m}")),
                Ok(SslMode::Require),
                "{m}"
            );
            assert_eq!(
                mode(&format!("host=db.internal sslmode={m}")),
                Ok(SslMode::Require)
            );
        }
        assert_eq!(
            mode("postgres://r@db.internal/reflex?application_name=x&sslmode=disable"),
            Ok(SslMode::Disable)
        );
        let e = mode("postgres://r@db.internal/reflex?sslmode=prefer").unwrap_err();
        assert!(e.contains("downgraded"), "{e}");
        assert_eq!(
            mode("postgres://r@[::1]/reflex?sslmode=prefer"),
            Ok(SslMode::Prefer)
        );
        assert!(mode("postgres://r@db/reflex?sslmode=sometimes").is_err());
        let errors = Config::parse("store:\n  url: postgres://r@db.internal/x?sslmode=prefer\n")
            .unwrap_err();
        assert_eq!(errors[0].0, 2, "{errors:?}");
    }

    #[test]
    fn every_shape_error_is_reported_not_only_the_first() {
        let text = "listen: 127.0.0.1:1\nengine:\n  workers: 3\nserver:\n  max_connections: many\nbreaker:\n  window: soon\nnotify:\n  sinks:\n    - { name: s, type: pager }\n";
        let errors = Config::parse(text).unwrap_err();
        let found: Vec<(usize, &str)> = errors.iter().map(|(l, m)| (*l, m.as_str())).collect();
        for (line, needle) in [
            (3, "workers"),
            (5, "max_connections"),
            (7, "soon"),
            (10, "pager"),
        ] {
            assert!(
                found.iter().any(|(l, m)| *l == line && m.contains(needle)),
                "no {needle:?} at line {line} in {found:#?}"
            );
        }
        assert_eq!(errors.len(), 4, "{found:#?}");
        // A syntax error is the one error.
        assert_eq!(
            Config::parse("listen: [\nengine: x\n").unwrap_err().len(),
            1
        );
    }

    #[test]
    fn durations_parse_and_bad_ones_fail() {
        let cfg = Config::parse("engine:\n  default_step_timeout: 5m\n").unwrap();
        assert_eq!(cfg.engine.default_step_timeout, Duration::from_secs(300));
        assert!(Config::parse("engine:\n  shutdown_grace: soon\n").is_err());
    }
}
