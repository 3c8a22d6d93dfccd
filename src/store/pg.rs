//! The PostgreSQL backend: several replicas share one database. The store's SQL is the same
//! as on SQLite (see [`super::db`]); what differs is here: connecting (a pool of blocking
//! clients from the `postgres` crate, each with its prepared statements), the schema, and
//! migrations applied under an advisory lock so that replicas starting together migrate once.

use super::db::{Db, PgConn, Wake};
use super::{Committer, Job, StoreError, run_jobs};
use std::cell::RefCell;
use std::time::Duration;

/// How connections are made: in the clear, or with TLS verified by rustls.
#[derive(Clone)]
pub enum Connector {
    /// `sslmode=disable`.
    Plain,
    /// TLS when the server offers it (`prefer`) or always (`require`).
    Tls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Connector {
    /// For a URL's `sslmode`, with the certificate authorities in `ca_file` (PEM) or the
    /// system's.
    pub fn new(
        mode: postgres::config::SslMode,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Connector, StoreError> {
        if mode == postgres::config::SslMode::Disable {
            return Ok(Connector::Plain);
        }
        let bad = |what: String| StoreError::Config(format!("store TLS: {what}"));
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                use rustls::pki_types::{CertificateDer, pem::PemObject};
                for cert in CertificateDer::pem_file_iter(path)
                    .map_err(|e| bad(format!("{}: {e}", path.display())))?
                {
                    let cert = cert.map_err(|e| bad(format!("{}: {e}", path.display())))?;
                    roots
                        .add(cert)
                        .map_err(|e| bad(format!("{}: {e}", path.display())))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
            }
        }
        if roots.is_empty() {
            return Err(bad(
                "no certificate authority to verify the server with".into()
            ));
        }
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Connector::Tls(
            tokio_postgres_rustls::MakeRustlsConnect::new(config),
        ))
    }

    /// A new blocking client (the listener's).
    pub fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> Result<postgres::Client, postgres::Error> {
        let config = postgres::Config::from(config.clone());
        match self {
            Connector::Plain => config.connect(postgres::NoTls),
            Connector::Tls(tls) => config.connect(tls.clone()),
        }
    }

    /// A new connection for the store's statements (pipelined; see [`PgConn`]).
    pub fn open(&self, config: &tokio_postgres::Config) -> Result<PgConn, StoreError> {
        match self {
            Connector::Plain => PgConn::connect(config, tokio_postgres::NoTls),
            Connector::Tls(tls) => PgConn::connect(config, tls.clone()),
        }
    }
}

/// `store.url` read, with its `sslmode` resolved so that a password never crosses the network
/// in the clear unless the URL says `sslmode=disable`:
/// - no `sslmode`: `prefer` for a server on loopback (or a Unix socket), else `verify-full`;
/// - `require`, `verify-ca` and `verify-full`: TLS always, the certificate and the host name
///   verified (rustls verifies both in every mode, so `verify-ca` is as strict as `verify-full`);
/// - `prefer` to a host that is not on loopback is refused: whoever answers could decline TLS
///   and read the password;
/// - `disable`: no TLS.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    use postgres::config::SslMode;
    let mut mode = None;
    let rest = if let Some((base, query)) = url.split_once('?') {
        let kept: Vec<&str> = (query.split('&'))
            .filter(|kv| match kv.strip_prefix("sslmode=") {
                Some(m) => {
                    mode = Some(m.to_string());
                    false
                }
                None => true,
            })
            .collect();
        if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else if url.contains("://") {
        url.to_string()
    } else {
        let kept: Vec<&str> = (url.split_whitespace())
            .filter(|kv| match kv.strip_prefix("sslmode=") {
                Some(m) => {
                    mode = Some(m.trim_matches('\'').to_string());
                    false
                }
                None => true,
            })
            .collect();
        kept.join(" ")
    };
    let mut config: tokio_postgres::Config = rest.parse().map_err(|e| format!("{e}"))?;
    let loopback = config.get_hosts().iter().all(|h| match h {
        postgres::config::Host::Tcp(name) => {
            name == "localhost"
                || name
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        #[cfg(unix)]
        postgres::config::Host::Unix(_) => true,
    });
    let ssl = match mode.as_deref() {
        None if loopback => SslMode::Prefer,
        None => SslMode::Require,
        Some("disable") => SslMode::Disable,
        Some("prefer") if loopback => SslMode::Prefer,
        Some("prefer") => {
            return Err(
                "sslmode=prefer to a host that is not on loopback can be downgraded to \
                        no TLS by whoever answers, and the password would go in the clear: use \
                        sslmode=verify-full (the default), or write sslmode=disable on purpose"
                    .into(),
            );
        }
        Some("require" | "verify-ca" | "verify-full") => SslMode::Require,
        Some(other) => {
            return Err(format!(
                "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
            ));
        }
    };
    config.ssl_mode(ssl);
    Ok(config)
}

/// How to reach the database, from `store:` in the config.
#[derive(Clone)]
pub struct Settings {
    /// The connection settings (URL plus password).
    pub config: tokio_postgres::Config,
    /// Plain or TLS.
    pub connector: Connector,
    /// Connections at most.
    pub pool_size: u32,
    /// Writer connections (see `store.writers`).
    pub writers: u32,
    /// Giving up on a connection after this.
    pub connect_timeout: Duration,
    /// This replica's name.
    pub replica: String,
}

impl Settings {
    /// From the config's `store:` section; reads the password now.
    pub fn from_config(store: &crate::config::StoreConfig) -> Result<Settings, StoreError> {
        let url = store
            .url
            .as_deref()
            .ok_or_else(|| StoreError::Config("store.url is not set".into()))?;
        let mut config =
            parse_url(url).map_err(|e| StoreError::Config(format!("store.url: {e}")))?;
        if let Some(password) = store.password_ref().map_err(StoreError::Config)? {
            config.password(password.read().map_err(StoreError::Config)?);
        }
        config
            .connect_timeout(store.connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .tcp_user_timeout(store.statement_timeout + Duration::from_secs(5))
            .application_name("reflex")
            .options(format!(
                "-c statement_timeout={} -c lock_timeout={}",
                store.statement_timeout.as_millis(),
                store.statement_timeout.as_millis()
            ));
        let connector = Connector::new(config.get_ssl_mode(), store.tls_ca_file.as_deref())?;
        Ok(Settings {
            config,
            connector,
            pool_size: store.pool_size,
            writers: store.writers,
            connect_timeout: store.connect_timeout,
            replica: store.replica.clone().unwrap_or_else(default_replica),
        })
    }

    /// Settings for a server on loopback (tests).
    pub fn local(host: &str, port: u16, user: &str, dbname: &str) -> Settings {
        let mut config = tokio_postgres::Config::new();
        config
            .host(host)
            .port(port)
            .user(user)
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(5))
            .options("-c statement_timeout=30000 -c lock_timeout=30000");
        Settings {
            config,
            connector: Connector::Plain,
            pool_size: 4,
            writers: 1,
            connect_timeout: Duration::from_secs(5),
            replica: default_replica(),
        }
    }
}

/// The host name and pid: unique among live replicas, and readable in the records.
pub(super) fn default_replica() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "reflex".into());
    format!("{host}-{}", std::process::id())
}

/// What went wrong, in full: the server's message and code, or the cause under the client's
/// short text ("db error", "error connecting to server").
pub fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {} ({})", db.severity(), db.message(), db.code().code());
    }
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

/// Opens connections for the pool.
pub(super) struct Manager {
    config: tokio_postgres::Config,
    connector: Connector,
}

impl r2d2::ManageConnection for Manager {
    type Connection = PgConn;
    type Error = StoreError;

    fn connect(&self) -> Result<PgConn, StoreError> {
        self.connector.open(&self.config)
    }

    fn is_valid(&self, conn: &mut PgConn) -> Result<(), StoreError> {
        conn.batch_execute("")
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.is_closed()
    }
}

/// The connections of one replica; cheap to clone.
#[derive(Clone)]
pub struct Pool {
    pool: r2d2::Pool<Manager>,
    describe: String,
}

impl Pool {
    /// A connection, waiting at most the connect timeout for one.
    pub(super) fn get(&self) -> Result<r2d2::PooledConnection<Manager>, StoreError> {
        Ok(self.pool.get()?)
    }

    /// `host:port/dbname`, for the log (never the password).
    pub fn describe(&self) -> String {
        self.describe.clone()
    }
}

/// Connects (the first connection is made now, so a wrong URL fails the start) and applies
/// the migrations.
pub(super) fn connect(settings: &Settings) -> Result<Pool, StoreError> {
    let c = &settings.config;
    let host = match c.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    let describe = format!(
        "postgres://{}@{host}:{port}/{}",
        c.get_user().unwrap_or(""),
        c.get_dbname().unwrap_or("")
    );
    let pool = r2d2::Pool::builder()
        .max_size(settings.pool_size.max(1))
        .min_idle(Some(1))
        .connection_timeout(settings.connect_timeout)
        // Broken connections are found by `has_broken` when they come back; checking each
        // one out with a round trip would cost every read one.
        .test_on_check_out(false)
        .error_handler(Box::new(LogErrors))
        .build_unchecked(Manager {
            config: c.clone(),
            connector: settings.connector.clone(),
        });
    // The first connection directly: a wrong address, password or certificate fails the
    // start at once, with the server's own words.
    let mut first = settings.connector.open(c)?;
    migrate(&mut first)?;
    // A store made before the audit chain is chained once, in one transaction.
    first.batch_execute("BEGIN")?;
    let sealed = super::audit::seal_existing(&Db::Pg(RefCell::new(&mut first)));
    first.batch_execute(if sealed.is_ok() { "COMMIT" } else { "ROLLBACK" })?;
    sealed?;
    Ok(Pool { pool, describe })
}

/// Logs the pool's connection failures (they would be silent otherwise).
#[derive(Debug)]
struct LogErrors;

impl r2d2::HandleError<StoreError> for LogErrors {
    fn handle_error(&self, error: StoreError) {
        tracing::warn!(error = %error, "postgres connection failed");
    }
}

/// The writer's side on PostgreSQL: each batch is one transaction on the writer's own
/// connection, made again when it is lost. While the server is down each batch fails at once
/// (a refused connection), so that webhooks answer 503 without waiting.
pub(super) struct PgCommitter {
    config: tokio_postgres::Config,
    connector: Connector,
    conn: Option<PgConn>,
    /// Round trips and statements of every connection it had.
    traffic: (u64, u64),
    /// The store's clock, for each batch's time ([`Db::batch_ms`]).
    clock: std::sync::Arc<dyn crate::time::Clock>,
}

impl PgCommitter {
    pub(super) fn new(
        settings: &Settings,
        clock: std::sync::Arc<dyn crate::time::Clock>,
    ) -> PgCommitter {
        PgCommitter {
            config: settings.config.clone(),
            connector: settings.connector.clone(),
            conn: None,
            traffic: (0, 0),
            clock,
        }
    }
}

impl Committer for PgCommitter {
    /// Runs the batch without a savepoint per job (each would be two more statements and a
    /// subtransaction), which is right for all but a batch with a failed job: that one is rolled
    /// back before its `COMMIT` is sent and run again with every job in its own savepoint, so
    /// that the failed job undoes its own writes and nothing else. A job may therefore run
    /// twice, each time from the same state; its caller hears only of the last time.
    fn commit(&mut self, batch: &mut [Job]) -> Result<(), String> {
        if self.conn.as_mut().is_none_or(PgConn::is_closed) {
            self.conn = None;
            self.conn = Some(
                self.connector
                    .open(&self.config)
                    .map_err(|e| e.to_string())?,
            );
        }
        let conn = self.conn.as_mut().expect("connected above");
        // One time for the batch, run once or twice: its intake sees one window.
        conn.batch_ms = Some(self.clock.now_ms());
        let before = conn.traffic();
        let db = Db::Pg(RefCell::new(conn));
        batch.sort_by_key(|j| j.ahead.is_some());
        let mut done = attempt(&db, batch, false);
        if matches!(done, Ok(false)) {
            let _ = db.batch("ROLLBACK");
            done = attempt(&db, batch, true);
        }
        if done.is_err() {
            // A broken connection is made again; a live one is left clean.
            let _ = db.batch("ROLLBACK");
        }
        let after = self.conn.as_ref().map_or(before, PgConn::traffic);
        self.traffic.0 += after.0 - before.0;
        self.traffic.1 += after.1 - before.1;
        done.map(drop).map_err(|e| e.to_string())
    }

    fn traffic(&self) -> (u64, u64) {
        self.traffic
    }
}

/// One try at a batch's transaction (see [`PgCommitter`]'s `commit`): `Ok(false)` when a job
/// failed without savepoints, before anything was committed.
fn attempt(db: &Db, batch: &mut [Job], isolated: bool) -> Result<bool, StoreError> {
    match try_batch(db, batch, isolated) {
        // A job's statement not waited for failed, seen with a later one (perhaps the
        // `COMMIT`, which then rolled back): job by job, that failure is the job's alone.
        Err(_) if !isolated && db.later_failed() => Ok(false),
        done => done,
    }
}

/// [`attempt`]'s transaction.
fn try_batch(db: &Db, batch: &mut [Job], isolated: bool) -> Result<bool, StoreError> {
    if let Db::Pg(c) = db {
        let mut c = c.borrow_mut();
        c.wake = Wake::No;
        c.later_failed = false;
        c.audit.clear();
        c.forget();
    }
    db.later("BEGIN", &[])?;
    take_locks(db, batch)?;
    // The jobs that send reads ahead come last (`commit` put them there): the others' writes
    // first, then every read sent ahead, after those writes and before any of their own, so
    // that the batch's first round trip carries them all. The batch is run again job by job
    // without sending ahead. (Jobs of one batch were sent at once: any order is theirs.)
    let split = match isolated {
        true => batch.len(),
        false => (batch.iter())
            .position(|j| j.ahead.is_some())
            .unwrap_or(batch.len()),
    };
    let (plain, ahead) = batch.split_at_mut(split);
    if !run_jobs(db, plain, isolated)? {
        return Ok(false);
    }
    for job in ahead.iter_mut() {
        // One that cannot be sent fails its job when it runs: the batch goes job by job.
        if let Some(send) = &mut job.ahead
            && send(db).is_err()
        {
            return Ok(false);
        }
    }
    if let Db::Pg(c) = db {
        c.borrow_mut().sent_ahead();
    }
    if !run_jobs(db, ahead, isolated)? {
        return Ok(false);
    }
    // Last, so an audit chain's head is the last lock this transaction takes (no cycle with
    // another replica's) and is held only for the commit.
    super::audit::append_pending(db)?;
    let wake = match db {
        Db::Pg(c) => std::mem::take(&mut c.borrow_mut().wake),
        Db::Lite(_) => Wake::No,
    };
    // Delivered to every replica's listener when (and only if) this commits.
    match wake {
        Wake::No => {}
        Wake::IfQueued => db.later(
            "SELECT pg_notify('reflex_wake', '') WHERE EXISTS (SELECT 1 FROM runs WHERE state = 'pending')",
            &[],
        )?,
        Wake::Yes => db.later("SELECT pg_notify('reflex_wake', '')", &[])?,
    }
    db.exec("COMMIT", &[])?;
    Ok(true)
}

/// Takes every lock the batch's writes named ([`super::Store::write_locked`]), once each, in
/// the order of their keys: the first thing a batch waits for, and the only advisory locks a
/// writer waits for. The whole lock order of a transaction on PostgreSQL is:
///
/// 1. these advisory locks, by key (`hashtextextended` of the name), taken together;
/// 2. row locks, as the writes go (a switch, a run);
/// 3. an audit chain's head (`audit::append_pending`), last, held only for the commit: one
///    no other transaction holds, or, with every chain held, this connection's own (the
///    audit sink's read and retention lock heads too, taking no other lock after them).
///
/// Try-locks (a target, a playbook's concurrency, a run's start) never wait, so they add no
/// edge. A batch may wait here for a lock another transaction took by trying it (a resolution
/// waits for a run's start lock held by a claim): that holder waits, if at all, for row locks
/// and an audit head, whose holders are past this step. Budgets and autonomy standings are
/// decided in transactions of their own ([`super::Store::exclusive`]) that take their locks
/// first and the audit head last, and no lock of a writer's batch.
fn take_locks(db: &Db, batch: &[super::Job]) -> Result<(), StoreError> {
    let mut names: Vec<&str> = (batch.iter())
        .flat_map(|j| j.locks.iter().map(String::as_str))
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    names.sort_unstable();
    names.dedup();
    let Db::Pg(conn) = db else { return Ok(()) };
    // Sorted by key in the subquery, taken in that order by the aggregate. Not waited for
    // here: the answer comes with the batch's first statement that is.
    conn.borrow_mut().queue(
        "SELECT count(pg_advisory_xact_lock(k)) FROM
           (SELECT DISTINCT hashtextextended(n, 0) AS k FROM unnest($1::text[]) n ORDER BY k) s",
        &[&names],
        super::Keys::Any,
    )
}

/// Listens for other replicas' wake-ups (`NOTIFY reflex_wake`, sent by a commit that made
/// work) on a connection of its own, reconnecting when it drops. Calls `on_wake(true)` for
/// each burst of them and once after every (re)connection, for what may have been missed;
/// `on_wake(false)` every second otherwise. Ends when `on_wake` returns `false`.
pub(super) fn listen(
    config: tokio_postgres::Config,
    connector: Connector,
    mut on_wake: impl FnMut(bool) -> bool + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("reflex-pg-listen".into())
        .spawn(move || {
            loop {
                let connected = connector.connect(&config).and_then(|mut client| {
                    client.batch_execute("LISTEN reflex_wake")?;
                    Ok(client)
                });
                let mut client = match connected {
                    Ok(client) => client,
                    Err(e) => {
                        tracing::warn!(error = %e, "postgres listener cannot connect; polling until it can");
                        if !on_wake(false) {
                            return;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                };
                if !on_wake(true) {
                    return;
                }
                loop {
                    use postgres::fallible_iterator::FallibleIterator;
                    let mut notifications = client.notifications();
                    let next = notifications.timeout_iter(Duration::from_secs(1)).next();
                    let woke = match next {
                        Ok(Some(_)) => {
                            // A burst counts once.
                            while let Ok(Some(_)) = notifications.iter().next() {}
                            true
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "postgres listener lost its connection; reconnecting");
                            break;
                        }
                        Ok(None) => false,
                    };
                    drop(notifications);
                    if !on_wake(woke) {
                        return;
                    }
                    if client.is_closed() {
                        break;
                    }
                }
            }
        })
        .map(drop)
}

/// The advisory lock key replicas take to migrate one at a time.
const MIGRATION_LOCK: i64 = 0x7265_666c_6578; // "reflex"

/// Applies the migrations not yet applied, in one transaction, under a lock.
fn migrate(conn: &mut PgConn) -> Result<(), StoreError> {
    conn.batch_execute("BEGIN")?;
    let done = migrate_in(&Db::Pg(RefCell::new(conn)));
    conn.batch_execute(if done.is_ok() { "COMMIT" } else { "ROLLBACK" })?;
    done
}

fn migrate_in(db: &Db) -> Result<(), StoreError> {
    db.exec("SELECT pg_advisory_xact_lock(?1)", &[&MIGRATION_LOCK])?;
    db.batch(
        "CREATE TABLE IF NOT EXISTS reflex_schema (version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )?;
    let applied: i64 = db.one(
        "SELECT coalesce(max(version), 0) FROM reflex_schema",
        &[],
        |r| r.get(0),
    )?;
    let known = MIGRATIONS.len() as i64;
    // A rolling upgrade: the first new replica migrates, the old ones run on until replaced.
    // Migrations are additive, so a replica lives with a schema one version ahead; two ahead
    // is an upgrade it was never meant to straddle.
    if applied > known + 1 {
        return Err(StoreError::Config(format!(
            "the database's schema is version {applied}, newer than this reflex knows \
             (version {known}, which runs on version {} during a rolling upgrade): run the \
             newer reflex, or a database of this version",
            known + 1
        )));
    }
    if applied == known + 1 {
        tracing::warn!(
            schema = applied,
            known,
            "the database's schema is one version newer than this reflex: running on it \
             during a rolling upgrade; replace this replica"
        );
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        db.batch(sql)?;
        db.exec(
            "INSERT INTO reflex_schema (version) VALUES (?1)",
            &[&(i as i64 + 1)],
        )?;
    }
    Ok(())
}

/// How many migrations this build applies (its schema version).
pub const MIGRATIONS_APPLIED: usize = MIGRATIONS.len();

/// The schema, as SQLite's migrations leave it (`super::MIGRATIONS`), in PostgreSQL's types:
/// `BIGINT` for every integer, `BOOLEAN` for flags, `BYTEA` for digests.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE alerts (
  id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
  received_at BIGINT NOT NULL,
  source TEXT NOT NULL,
  fingerprint TEXT NOT NULL,
  status TEXT NOT NULL,
  starts_at TEXT NOT NULL,
  ends_at TEXT,
  labels TEXT NOT NULL,
  annotations TEXT NOT NULL,
  generator_url TEXT,
  group_key TEXT,
  received_us BIGINT
);
CREATE TABLE runs (
  id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
  playbook TEXT NOT NULL,
  alert_id BIGINT NOT NULL REFERENCES alerts(id),
  fingerprint TEXT NOT NULL,
  starts_at TEXT NOT NULL,
  alert_status TEXT NOT NULL,
  cooldown_key TEXT NOT NULL,
  state TEXT NOT NULL,
  reason TEXT,
  dry_run BOOLEAN NOT NULL DEFAULT false,
  params TEXT NOT NULL DEFAULT '{}',
  created_at BIGINT NOT NULL,
  started_at BIGINT,
  finished_at BIGINT,
  error TEXT,
  target TEXT NOT NULL DEFAULT '',
  deadline_ms BIGINT,
  resolved_at BIGINT,
  triggered_by TEXT,
  retry_of BIGINT,
  owner TEXT
);
CREATE UNIQUE INDEX runs_dedup ON runs(playbook, fingerprint, starts_at, alert_status);
CREATE INDEX runs_created ON runs(created_at);
CREATE INDEX runs_pending ON runs(id) WHERE state = 'pending';
CREATE INDEX runs_running ON runs(target) WHERE state = 'running';
CREATE INDEX runs_running_alert ON runs(fingerprint, playbook) WHERE state = 'running';
CREATE INDEX runs_waiting ON runs(fingerprint) WHERE state = 'awaiting_approval';
CREATE INDEX runs_cooldown ON runs(playbook, cooldown_key, created_at) WHERE cooldown_key != '';
CREATE INDEX runs_pending_alert ON runs(fingerprint) WHERE state = 'pending';
CREATE INDEX runs_pending_target ON runs(target, id) WHERE state = 'pending';
CREATE INDEX runs_target ON runs(target, id);
CREATE TABLE steps (
  run_id BIGINT NOT NULL REFERENCES runs(id),
  idx BIGINT NOT NULL,
  name TEXT NOT NULL,
  action TEXT NOT NULL,
  args TEXT NOT NULL,
  timeout_ms BIGINT,
  on_failure TEXT NOT NULL,
  state TEXT NOT NULL,
  started_at BIGINT,
  finished_at BIGINT,
  output TEXT,
  error TEXT,
  approval TEXT,
  phase TEXT NOT NULL DEFAULT 'main',
  started_us BIGINT,
  PRIMARY KEY (run_id, idx)
);
CREATE TABLE audit (
  id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
  at BIGINT NOT NULL,
  actor TEXT NOT NULL,
  action TEXT NOT NULL,
  target TEXT,
  outcome TEXT NOT NULL,
  detail TEXT
);
CREATE TABLE approvals (
  id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
  run_id BIGINT NOT NULL REFERENCES runs(id),
  step_idx BIGINT NOT NULL,
  scope TEXT NOT NULL,
  state TEXT NOT NULL,
  action TEXT NOT NULL,
  action_hash TEXT NOT NULL,
  required BIGINT NOT NULL,
  allowed TEXT NOT NULL DEFAULT '[]',
  approvals TEXT NOT NULL DEFAULT '[]',
  created_at BIGINT NOT NULL,
  expires_at BIGINT NOT NULL,
  decided_at BIGINT,
  decided_by TEXT,
  comment TEXT,
  UNIQUE (run_id, step_idx)
);
CREATE INDEX approvals_state ON approvals(state, expires_at);
CREATE TABLE switches (
  scope TEXT PRIMARY KEY,
  engaged BOOLEAN NOT NULL,
  reason TEXT,
  actor TEXT NOT NULL,
  changed_at BIGINT NOT NULL,
  until BIGINT
);
CREATE TABLE sessions (
  id_hash BYTEA PRIMARY KEY,
  name TEXT NOT NULL,
  token BYTEA NOT NULL,
  csrf TEXT NOT NULL,
  created_at BIGINT NOT NULL,
  expires_at BIGINT NOT NULL
);
-- The queue by target, kept by a trigger as on SQLite (see its migration 7).
CREATE TABLE target_load (
  target TEXT PRIMARY KEY,
  pending BIGINT NOT NULL DEFAULT 0,
  running BIGINT NOT NULL DEFAULT 0
);
CREATE FUNCTION target_load_track() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'UPDATE' THEN
    UPDATE target_load SET pending = pending - (OLD.state = 'pending')::int,
                           running = running - (OLD.state = 'running')::int
      WHERE target = OLD.target;
  END IF;
  IF NEW.state IN ('pending', 'running') THEN
    INSERT INTO target_load AS l (target, pending, running)
      VALUES (NEW.target, (NEW.state = 'pending')::int, (NEW.state = 'running')::int)
      ON CONFLICT (target) DO UPDATE SET pending = l.pending + excluded.pending,
                                         running = l.running + excluded.running;
  END IF;
  IF TG_OP = 'UPDATE' THEN
    DELETE FROM target_load WHERE target = OLD.target AND pending <= 0 AND running <= 0;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER target_load_insert AFTER INSERT ON runs FOR EACH ROW
  WHEN (NEW.state IN ('pending', 'running')) EXECUTE FUNCTION target_load_track();
CREATE TRIGGER target_load_update AFTER UPDATE OF state, target ON runs FOR EACH ROW
  WHEN ((OLD.state != NEW.state OR OLD.target != NEW.target)
        AND (OLD.state IN ('pending', 'running') OR NEW.state IN ('pending', 'running')))
  EXECUTE FUNCTION target_load_track();
"#,
    // 2: replicas and their leases (in the database's clock: replicas' clocks may differ).
    r#"
CREATE TABLE replicas (
  name TEXT PRIMARY KEY,
  started_at BIGINT NOT NULL,
  renewed_at BIGINT NOT NULL,
  expires_at BIGINT NOT NULL
);
CREATE INDEX runs_owner ON runs(owner) WHERE state = 'running';
"#,
    // 3: the chat thread each sink keeps a run's messages in (shared by the replicas).
    r#"
CREATE TABLE chat_threads (
  sink TEXT NOT NULL,
  run_id BIGINT NOT NULL,
  thread TEXT NOT NULL,
  PRIMARY KEY (sink, run_id)
);
"#,
    // 4: alerts accepted but not planned within their webhook's budget (see `deferred`).
    r#"
CREATE TABLE deferred_alerts (
  id BIGSERIAL PRIMARY KEY,
  alert TEXT NOT NULL,
  received_us BIGINT NOT NULL,
  created_at BIGINT NOT NULL
);
"#,
    // 5: a run that failed because a step was refused before acting (see SQLite's 13).
    r#"
ALTER TABLE runs ADD COLUMN refused BOOLEAN NOT NULL DEFAULT false;
"#,
    // 6: a playbook's limit on its runs executing at once (see SQLite's 14).
    r#"
ALTER TABLE runs ADD COLUMN concurrency BIGINT NOT NULL DEFAULT 0;
CREATE INDEX runs_running_playbook ON runs(playbook) WHERE state = 'running';
"#,
    // 7: the run an undo takes back (see SQLite's 15).
    r#"
ALTER TABLE runs ADD COLUMN undo_of BIGINT;
"#,
    // 8: what steps produced besides their output (see SQLite's 16).
    r#"
CREATE TABLE artifacts (
  run_id BIGINT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
  name TEXT NOT NULL,
  step_idx BIGINT NOT NULL,
  content_type TEXT NOT NULL,
  size BIGINT NOT NULL,
  data BYTEA NOT NULL,
  PRIMARY KEY (run_id, name)
);
"#,
    // 9: retention's lookups by index (see SQLite's 17).
    r#"
CREATE INDEX runs_alert ON runs(alert_id);
CREATE INDEX approvals_run ON approvals(run_id);
"#,
    // 10: the audit log's hash chain and the audit sink's progress (see SQLite's 18).
    r#"
ALTER TABLE audit ADD COLUMN prev BYTEA;
ALTER TABLE audit ADD COLUMN hash BYTEA;
CREATE TABLE audit_chain (
  one BIGINT PRIMARY KEY CHECK (one = 1),
  last_id BIGINT NOT NULL,
  last_hash BYTEA NOT NULL,
  anchor_id BIGINT NOT NULL,
  anchor_hash BYTEA NOT NULL
);
CREATE TABLE audit_sink (
  one BIGINT PRIMARY KEY CHECK (one = 1),
  sent_id BIGINT NOT NULL,
  holder TEXT,
  until_ms BIGINT NOT NULL
);
"#,
    // 11: dry runs are shadow runs (see SQLite's 19).
    r#"
UPDATE runs SET state = 'shadow' WHERE state = 'dry_run';
UPDATE steps SET state = 'shadow' WHERE state = 'dry_run';
"#,
    // 12: blast-radius budgets (see SQLite's 20).
    r#"
CREATE TABLE budget_use (
  budget TEXT NOT NULL,
  at BIGINT NOT NULL,
  run_id BIGINT NOT NULL,
  step_idx BIGINT NOT NULL
);
CREATE INDEX budget_use_at ON budget_use(budget, at);
"#,
    // 13: autonomy standings (see SQLite's 21).
    r#"
CREATE TABLE autonomy (
  playbook TEXT PRIMARY KEY,
  level TEXT NOT NULL,
  streak BIGINT NOT NULL,
  failures BIGINT NOT NULL,
  changed_at BIGINT
);
"#,
    // 14: the queue by target without a row every replica updates. A run's change of state
    // appends its deltas (inserts never wait for each other), `target_load` is their sum
    // (the same columns as SQLite's table, which its one writer keeps), and the writers fold
    // the deltas now and then (`COMPACT_TARGET_LOAD`). Updating one row per target made
    // replicas' batches wait for each other's rows in any order: deadlocks.
    r#"
DROP TRIGGER target_load_insert ON runs;
DROP TRIGGER target_load_update ON runs;
ALTER TABLE target_load RENAME TO target_load_delta;
ALTER TABLE target_load_delta DROP CONSTRAINT target_load_pkey;
CREATE INDEX target_load_delta_target ON target_load_delta(target);
CREATE VIEW target_load AS
  SELECT target, sum(pending)::bigint AS pending, sum(running)::bigint AS running
  FROM target_load_delta GROUP BY target
  HAVING sum(pending) <> 0 OR sum(running) <> 0;
CREATE OR REPLACE FUNCTION target_load_track() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'UPDATE' AND OLD.state IN ('pending', 'running') THEN
    INSERT INTO target_load_delta (target, pending, running)
      VALUES (OLD.target, -(OLD.state = 'pending')::int, -(OLD.state = 'running')::int);
  END IF;
  IF NEW.state IN ('pending', 'running') THEN
    INSERT INTO target_load_delta (target, pending, running)
      VALUES (NEW.target, (NEW.state = 'pending')::int, (NEW.state = 'running')::int);
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER target_load_insert AFTER INSERT ON runs FOR EACH ROW
  WHEN (NEW.state IN ('pending', 'running')) EXECUTE FUNCTION target_load_track();
CREATE TRIGGER target_load_update AFTER UPDATE OF state, target ON runs FOR EACH ROW
  WHEN ((OLD.state != NEW.state OR OLD.target != NEW.target)
        AND (OLD.state IN ('pending', 'running') OR NEW.state IN ('pending', 'running')))
  EXECUTE FUNCTION target_load_track();
"#,
    // 15: no counts kept by target, and each index of the runs executing only for lookups by
    // its key (see SQLite's 22). The trigger and its function are gone: they cost a fifth of
    // the database's CPU a run. A replica one version behind, still working through a rolling
    // upgrade, reads `target_load` and folds `target_load_delta`: the first becomes a view of
    // the runs themselves (slower, right), the second stays, empty, since nothing appends to
    // it now. The version after this one drops both.
    r#"
DROP TRIGGER target_load_insert ON runs;
DROP TRIGGER target_load_update ON runs;
DROP FUNCTION target_load_track();
DROP VIEW target_load;
DELETE FROM target_load_delta;
CREATE VIEW target_load AS
  SELECT target, count(*) FILTER (WHERE state = 'pending') AS pending,
         count(*) FILTER (WHERE state = 'running') AS running
  FROM runs WHERE state IN ('pending', 'running') GROUP BY target;
DROP INDEX runs_running;
CREATE INDEX runs_running ON runs(target) WHERE state = 'running' AND target IS NOT NULL;
DROP INDEX runs_running_alert;
CREATE INDEX runs_running_alert ON runs(fingerprint, playbook)
  WHERE state = 'running' AND fingerprint IS NOT NULL;
DROP INDEX runs_running_playbook;
CREATE INDEX runs_running_playbook ON runs(playbook) WHERE state = 'running' AND playbook IS NOT NULL;
DROP INDEX runs_owner;
CREATE INDEX runs_owner ON runs(owner) WHERE state = 'running' AND owner IS NOT NULL;
"#,
    // 16: what 15 kept for the replicas one version behind it, which no replica of 15 or
    // later reads (PostgreSQL only).
    r#"
DROP VIEW target_load;
DROP TABLE target_load_delta;
"#,
    // 17: the audit log in chains (see SQLite's 23), 16 of them, so that replicas' commits
    // do not wait for each other's on one head. A replica one version behind locks and moves
    // `audit_chain` (one = 1): that is now a view of chain 0, which the others skip while it
    // is held. Its retention anchors that row on the last audit row it deletes, then deletes
    // every row up to it, whatever the chain: the view's trigger anchors each chain on its own
    // last row deleted instead, every head held so that no row is in flight below them (an
    // anchor's hash alone is set just before its id, which sets every chain's). The version
    // after this one drops the view.
    r#"
CREATE TABLE audit_heads (
  chain BIGINT PRIMARY KEY,
  last_id BIGINT NOT NULL,
  last_hash BYTEA NOT NULL,
  anchor_id BIGINT NOT NULL,
  anchor_hash BYTEA NOT NULL
);
INSERT INTO audit_heads SELECT 0, last_id, last_hash, anchor_id, anchor_hash FROM audit_chain;
INSERT INTO audit_heads
  SELECT g, 0, decode(repeat('00', 32), 'hex'), 0, decode(repeat('00', 32), 'hex')
  FROM generate_series(1, 15) g;
DROP TABLE audit_chain;
CREATE VIEW audit_chain AS
  SELECT 1::bigint AS one, last_id, last_hash, anchor_id, anchor_hash FROM audit_heads WHERE chain = 0;
CREATE FUNCTION audit_chain_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.anchor_id IS DISTINCT FROM OLD.anchor_id THEN
    PERFORM 1 FROM audit_heads ORDER BY chain FOR UPDATE;
    UPDATE audit_heads h SET anchor_id = a.id, anchor_hash = coalesce(a.hash, h.anchor_hash)
      FROM (SELECT chain, max(id) AS id,
                   (array_agg(hash ORDER BY id DESC) FILTER (WHERE hash IS NOT NULL))[1] AS hash
            FROM audit WHERE id <= NEW.anchor_id GROUP BY chain) a
      WHERE h.chain = a.chain AND a.id > h.anchor_id;
  ELSIF (NEW.last_id, NEW.last_hash) IS DISTINCT FROM (OLD.last_id, OLD.last_hash) THEN
    UPDATE audit_heads SET last_id = NEW.last_id, last_hash = NEW.last_hash WHERE chain = 0;
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER audit_chain_update INSTEAD OF UPDATE ON audit_chain
  FOR EACH ROW EXECUTE FUNCTION audit_chain_update();
ALTER TABLE audit ADD COLUMN chain BIGINT NOT NULL DEFAULT 0;
"#,
    // 18: a run's end message and its request for approval until the chat sinks have them (see SQLite's 24).
    r#"
CREATE TABLE outbox (
  run_id BIGINT NOT NULL,
  event TEXT NOT NULL,
  owner TEXT,
  created_at BIGINT NOT NULL,
  summary TEXT,
  report TEXT,
  approval_id BIGINT,
  PRIMARY KEY (run_id, event)
);
"#,
];
