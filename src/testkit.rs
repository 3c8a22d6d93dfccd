//! Test support, not used by the daemon: a real PostgreSQL server (Debian's `postgresql`) on
//! loopback, in a temp dir, run as an unprivileged user (`postgres` when the tests run as
//! root: PostgreSQL refuses to run as root). The unit tests, the suite and the load script
//! start it the way they start sshd.
//!
//! A watchdog stops the server and removes its directory when the process that started it
//! ends, however it ends: a test binary's statics are never dropped.

use crate::store::pg::Settings;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// A running PostgreSQL server.
pub struct PgServer {
    dir: PathBuf,
    /// Port on 127.0.0.1.
    pub port: u16,
    bin: PathBuf,
    /// Run its commands as this user (`None`: as ourselves).
    user: Option<String>,
    options: String,
    /// With TLS only: the certificate authority that signed its certificate (PEM).
    pub ca: Option<PathBuf>,
}

/// The superuser the server is created with (trust authentication on loopback only).
pub const SUPERUSER: &str = "reflex";

/// The directory of Debian's PostgreSQL binaries (the newest installed), or the `PATH`'s.
fn bin_dir() -> Result<PathBuf, String> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("pg_ctl").exists())
        .collect();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(dir) = versions.pop() {
        return Ok(dir);
    }
    let found = Command::new("sh")
        .args(["-c", "command -v pg_ctl"])
        .output()
        .map_err(|e| e.to_string())?;
    let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
    match Path::new(&path).parent() {
        Some(dir) if !path.is_empty() => Ok(dir.to_path_buf()),
        _ => Err("PostgreSQL not found: install Debian's postgresql (scripts/test does)".into()),
    }
}

fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A loopback port for a server a test starts (sshd, PostgreSQL, Alertmanager, …) that no
/// one else is handed meanwhile: taken below the kernel's ephemeral range, from which `bind`
/// to port 0 and outgoing connections draw theirs, in a sequence that starts at a place of
/// this process's own, and checked free. (A port from `bind(0)`, released for the server to
/// take, could be handed to another test's `bind(0)` first.)
pub fn unused_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const BASE: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768)
        .max(BASE + 1_000);
    let span = ephemeral_low - BASE;
    let start = std::process::id().wrapping_mul(7_919) % span;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (BASE + (start + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn free_port() -> u16 {
    unused_port()
}

impl PgServer {
    /// Creates a cluster in a new temp dir and starts it. `durable`: `fsync` on, as in
    /// production (for measurements); off, the tests' default, it is faster and loses
    /// nothing a test looks at (the server is never power-cut).
    pub fn start(durable: bool) -> Result<PgServer, String> {
        Self::start_with(durable, false)
    }

    /// As [`PgServer::start`]; with `tls`, it accepts TLS connections only, with a certificate
    /// for 127.0.0.1 signed by a throwaway authority ([`PgServer::ca`]).
    pub fn start_with(durable: bool, tls: bool) -> Result<PgServer, String> {
        let bin = bin_dir()?;
        let root = output(Command::new("id").arg("-u"))? == "0";
        let user = root.then(|| "postgres".to_string());
        let dir = std::env::temp_dir().join(format!(
            "rx-pg-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        if let Some(user) = &user {
            let uid: u32 = output(Command::new("id").args(["-u", user]))?
                .parse()
                .map_err(|_| format!("no user {user}"))?;
            let gid: u32 = output(Command::new("id").args(["-g", user]))?
                .parse()
                .map_err(|_| format!("no group for {user}"))?;
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
        }
        let port = free_port();
        let fsync = if durable { "on" } else { "off" };
        let mut options = format!(
            "-h 127.0.0.1 -p {port} -k {sock} -c fsync={fsync} -c full_page_writes={fsync} \
             -c max_connections=200 -c shared_buffers=64MB",
            sock = dir.display()
        );
        if tls {
            options += &format!(
                " -c ssl=on -c ssl_cert_file={d}/server.crt -c ssl_key_file={d}/server.key",
                d = dir.display()
            );
        }
        let mut server = PgServer {
            dir,
            port,
            bin,
            user,
            options,
            ca: None,
        };
        output(
            server
                .command("initdb")
                .args([
                    "-A",
                    "trust",
                    "-U",
                    SUPERUSER,
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "-D",
                ])
                .arg(server.data()),
        )?;
        if tls {
            server.ca = Some(server.certificates()?);
        }
        server.watch()?;
        server.resume()?;
        Ok(server)
    }

    /// A throwaway authority and a server certificate for 127.0.0.1 (Debian's `openssl`,
    /// which `postgresql` depends on), and a `pg_hba.conf` that refuses connections without
    /// TLS. Returns the authority's certificate.
    fn certificates(&self) -> Result<PathBuf, String> {
        let d = &self.dir;
        let ca = certificate_authority(d, "ca")?;
        let openssl = |args: &[&str]| output(Command::new("openssl").args(args).current_dir(d));
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ])?;
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .map_err(|e| e.to_string())?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ])?;
        if let Some(user) = &self.user {
            output(
                Command::new("chown")
                    .arg(user)
                    .arg(d.join("server.key"))
                    .arg(d.join("server.crt")),
            )?;
        }
        output(Command::new("chmod").arg("600").arg(d.join("server.key")))?;
        std::fs::write(
            self.data().join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
        )
        .map_err(|e| e.to_string())?;
        Ok(ca)
    }

    /// The server shared by this process's tests (started once; each test takes its own
    /// database from it, see [`PgServer::fresh`]).
    pub fn shared() -> &'static PgServer {
        static SHARED: OnceLock<PgServer> = OnceLock::new();
        SHARED.get_or_init(|| PgServer::start(false).unwrap_or_else(|e| panic!("{e}")))
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// One of the server's programs, run as its user.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut cmd = match &self.user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        };
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Stops the server and removes its directory once this process has ended.
    fn watch(&self) -> Result<(), String> {
        let script = format!(
            "while [ -e /proc/{pid} ]; do sleep 0.5; done; \
             '{pg_ctl}' -D '{data}' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            pg_ctl = self.bin.join("pg_ctl").display(),
            data = self.data().display(),
            dir = self.dir.display(),
        );
        let mut cmd = match &self.user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--", "sh", "-c", &script]);
                c
            }
            None => {
                let mut c = Command::new("sh");
                c.args(["-c", &script]);
                c
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(drop)
            .map_err(|e| format!("watchdog: {e}"))
    }

    /// Starts the (stopped) server and waits until it accepts connections.
    pub fn resume(&self) -> Result<(), String> {
        output(
            self.command("pg_ctl")
                .args(["start", "-w", "-t", "60", "-D"])
                .arg(self.data())
                .arg("-l")
                .arg(self.dir.join("log"))
                .args(["-o", &self.options]),
        )
        .map(drop)
    }

    /// Stops the server (fast shutdown: connections are cut, nothing committed is lost).
    pub fn stop(&self) -> Result<(), String> {
        output(
            self.command("pg_ctl")
                .args(["stop", "-w", "-t", "60", "-m", "fast", "-D"])
                .arg(self.data()),
        )
        .map(drop)
    }

    /// Settings for a database on this server.
    pub fn settings(&self, dbname: &str) -> Settings {
        Settings::local("127.0.0.1", self.port, SUPERUSER, dbname)
    }

    /// `postgres://` URL of a database on this server (for a daemon's config).
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{dbname}", self.port)
    }

    /// Creates a new, empty database; returns its name.
    pub fn fresh(&self) -> String {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let config = self.admin();
        let sql = format!("CREATE DATABASE {name}");
        // On a thread of its own: the blocking client must not run inside an async runtime.
        std::thread::spawn(move || {
            let mut admin = (config.connect(postgres::NoTls))
                .unwrap_or_else(|e| panic!("connecting to the test server: {e:?}"));
            admin
                .batch_execute(&sql)
                .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        })
        .join()
        .expect("creating a test database");
        name
    }

    /// Drops a database made by [`PgServer::fresh`], cutting any connection a test left open
    /// (a test's databases would otherwise fill the disk over a whole run: ~8 MB each).
    pub fn drop_database(&self, name: &str) {
        let config = self.admin();
        let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
        std::thread::spawn(move || {
            if let Ok(mut admin) = config.connect(postgres::NoTls) {
                let _ = admin.batch_execute(&sql);
            }
        })
        .join()
        .ok();
    }

    /// A connection to the `postgres` database over the server's Unix socket: it is there
    /// with or without TLS.
    fn admin(&self) -> postgres::Config {
        let mut config = postgres::Config::new();
        config
            .host_path(&self.dir)
            .port(self.port)
            .user(SUPERUSER)
            .dbname("postgres");
        config
    }

    /// The server's log, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}

impl Drop for PgServer {
    /// Stops the server at once and removes its directory (the watchdog does the same for
    /// the shared server when the process ends).
    fn drop(&mut self) {
        let _ = output(
            self.command("pg_ctl")
                .args(["stop", "-w", "-m", "immediate", "-D"])
                .arg(self.data()),
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A self-signed certificate authority `name.crt` (and its key) in `dir`; its certificate.
pub fn certificate_authority(dir: &Path, name: &str) -> Result<PathBuf, String> {
    output(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            ])
            .arg(format!("/CN=reflex-test-{name}"))
            .arg("-keyout")
            .arg(format!("{name}.key"))
            .arg("-out")
            .arg(format!("{name}.crt"))
            .current_dir(dir),
    )?;
    Ok(dir.join(format!("{name}.crt")))
}
