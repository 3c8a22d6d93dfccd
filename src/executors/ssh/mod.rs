//! `ssh.run` and `disk_cleanup`: commands on inventory hosts over the system `ssh` client.
//!
//! One master connection per host (the system `ssh` with ControlMaster, via the `openssh`
//! crate), opened on first use; steps talk to it over its control socket in-process (the
//! crate's native mux client: no `ssh` process per step, ~4 ms per step on loopback), shared by concurrent steps (at most `max_sessions_per_host` at once, below
//! sshd's `MaxSessions`), closed by ssh itself after `idle_timeout`, and opened again when a
//! liveness check finds it gone. Host keys are verified, strictly by default.
//!
//! Every remote command runs as `timeout -k 5 SECS sh -c '<command>'`: the remote side kills
//! the whole process group at the step's timeout, so nothing is left running when a step gives
//! up (closing an SSH channel alone does not stop a remote process that has no terminal).

pub mod config;
pub mod inventory;

use super::{ExecError, Executor, StepContext};
use crate::playbook::actions::{DiskCleanupArgs, SshRunArgs};
use crate::playbook::template::shell_quote;
use config::{HostKeyChecking, SshConfig, SshHost};
use openssh::{ControlPersist, KnownHosts, Session, SessionBuilder, Stdio};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Semaphore;

/// Grace after the remote `timeout` for its kill to land and ssh to report it.
const KILL_AFTER_SECS: u64 = 5;

/// Further attempts to start a command that did not start (nothing ran remotely yet).
const START_RETRIES: u32 = 2;
/// Pause before such an attempt, times the attempt number.
const START_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The result of one remote command.
#[derive(Debug, Clone, Serialize)]
pub struct CommandOutput {
    /// The command as the remote shell received it (after quoting).
    pub command: String,
    /// Exit code (`None` when ssh itself was killed).
    pub exit_code: Option<i32>,
    /// Stdout, at most `output_limit_bytes`, then a truncation marker.
    pub stdout: String,
    /// Stderr, likewise.
    pub stderr: String,
    /// Whether the command hit the step timeout (and was killed).
    pub timed_out: bool,
}

struct HostSlot {
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    sessions: Semaphore,
}

/// The SSH executor; one per daemon, holding the connection pool.
pub struct SshExecutor {
    cfg: SshConfig,
    /// Hosts of `ssh.inventory_files`, as the files are now.
    inventory: inventory::Inventory,
    control_dir: PathBuf,
    slots: Mutex<HashMap<String, Arc<HostSlot>>>,
    connects: AtomicU64,
}

impl SshExecutor {
    /// `control_dir` holds the masters' sockets; it is created if missing.
    pub fn new(cfg: SshConfig, control_dir: PathBuf) -> Self {
        SshExecutor {
            inventory: inventory::Inventory::new(cfg.inventory_files.clone()),
            cfg,
            control_dir,
            slots: Mutex::new(HashMap::new()),
            connects: AtomicU64::new(0),
        }
    }

    /// Master connections opened so far (for tests and metrics).
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// Resolves a step's target to an inventory host, by name or alias: `ssh.hosts` first,
    /// then the hosts of `ssh.inventory_files` as they are now. Anything else is refused: an
    /// alert cannot point Reflex at an address of its choosing.
    pub fn resolve(&self, target: &str) -> Result<(String, SshHost), ExecError> {
        let named = |(name, h): (&String, &SshHost)| {
            (name == target || h.aliases.iter().any(|a| a == target))
                .then(|| (name.clone(), h.clone()))
        };
        if let Some(found) = self.cfg.hosts.iter().find_map(named) {
            return Ok(found);
        }
        let files = self.inventory.current();
        files.iter().find_map(named).ok_or_else(|| {
            ExecError::Refused(format!(
                "host {target:?} is not in the SSH inventory (ssh.hosts, ssh.inventory_files)"
            ))
        })
    }

    fn slot(&self, name: &str) -> Arc<HostSlot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(HostSlot {
                    session: tokio::sync::Mutex::new(None),
                    sessions: Semaphore::new(self.cfg.max_sessions_per_host),
                })
            })
            .clone()
    }

    /// The live master for a host, opening one if there is none or it died.
    async fn session(
        &self,
        name: &str,
        host: &SshHost,
        slot: &HostSlot,
    ) -> Result<Arc<Session>, ExecError> {
        // One connect at a time per host: concurrent first steps share the one master.
        let mut guard = slot.session.lock().await;
        if let Some(s) = guard.as_ref() {
            if s.check().await.is_ok() {
                return Ok(s.clone());
            }
            tracing::info!(host = name, "ssh master connection gone; reconnecting");
        }
        let session = Arc::new(self.connect(name, host).await?);
        self.connects.fetch_add(1, Ordering::Relaxed);
        *guard = Some(session.clone());
        Ok(session)
    }

    async fn connect(&self, name: &str, host: &SshHost) -> Result<Session, ExecError> {
        std::fs::create_dir_all(&self.control_dir).map_err(|e| {
            ExecError::Failed(format!(
                "ssh control dir {}: {e}",
                self.control_dir.display()
            ))
        })?;
        let mut b = SessionBuilder::default();
        let checking = host.host_key_checking.unwrap_or(self.cfg.host_key_checking);
        b.known_hosts_check(match checking {
            HostKeyChecking::Strict => KnownHosts::Strict,
            HostKeyChecking::AcceptNew => KnownHosts::Add,
        })
        .port(host.port.unwrap_or(self.cfg.port))
        .connect_timeout(self.cfg.connect_timeout)
        .server_alive_interval(Duration::from_secs(15))
        .control_directory(&self.control_dir)
        .control_persist(ControlPersist::IdleFor(
            NonZeroUsize::new(self.cfg.idle_timeout.as_secs() as usize)
                .unwrap_or(NonZeroUsize::MIN),
        ));
        if let Some(user) = host.user.as_ref().or(self.cfg.user.as_ref()) {
            b.user(user.clone());
        }
        if let Some(key) = host
            .identity_file
            .as_ref()
            .or(self.cfg.identity_file.as_ref())
        {
            b.keyfile(key);
        }
        if let Some(kh) = host
            .known_hosts_file
            .as_ref()
            .or(self.cfg.known_hosts_file.as_ref())
        {
            b.user_known_hosts_file(kh);
        }
        if let Some(cfg) = &self.cfg.config_file {
            b.config_file(cfg);
        }
        if let Some(jump) = &host.jump_host {
            b.jump_hosts([jump]);
        }
        let address = host.address.as_deref().unwrap_or(name);
        b.connect_mux(address).await.map_err(|e| {
            let text = format!("{e}: {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default());
            if text.contains("Host key verification failed") || text.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") {
                ExecError::Refused(format!(
                    "ssh to {name} ({address}): host key verification failed: the host's key is unknown or changed (known_hosts checking is {checking:?})"
                ))
            } else {
                ExecError::Failed(format!("ssh to {name} ({address}): cannot connect: {text}"))
            }
        })
    }

    /// Runs one shell command on a host, bounded by `timeout` remotely and locally. When
    /// `cancel` fires first, the command's remote process group is killed and the answer is
    /// [`ExecError::Cancelled`].
    pub async fn run(
        &self,
        target: &str,
        command: &str,
        timeout: Duration,
        cancel: Option<&tokio_util::sync::CancellationToken>,
    ) -> Result<CommandOutput, ExecError> {
        let (name, host) = self.resolve(target)?;
        let (name, host) = (name.as_str(), &host);
        let slot = self.slot(name);
        let _permit = slot
            .sessions
            .acquire()
            .await
            .expect("semaphore is never closed");
        let secs = timeout.as_secs().max(1);
        // The login shell says its pid, then becomes `timeout`, which leads its own process
        // group: that pid names the group a cancel kills.
        let remote = format!(
            "echo {PGID_MARK}$$ >&2; exec timeout -k {KILL_AFTER_SECS} {secs} sh -c {}",
            shell_quote(command).map_err(ExecError::InvalidArgs)?
        );
        // Starting a command can fail before anything reaches the remote side (the master's
        // control socket refused a connection under load, or the master just died): nothing
        // ran, so it is safe to try again, through a fresh master if the old one is gone.
        let mut session = self.session(name, host, &slot).await?;
        if cancel.is_some_and(|c| c.is_cancelled()) {
            return Err(ExecError::Cancelled);
        }
        let mut attempt = 0;
        let mut child = loop {
            let started = session
                .raw_command(&remote)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .await;
            match started {
                Ok(child) => break child,
                Err(e) if attempt < START_RETRIES => {
                    attempt += 1;
                    tracing::info!(host = name, error = %e, attempt, "ssh: command did not start; retrying");
                    tokio::time::sleep(START_RETRY_PAUSE * attempt).await;
                    session = self.session(name, host, &slot).await?;
                }
                Err(e) => {
                    return Err(ExecError::Failed(format!(
                        "ssh to {name}: cannot start the command: {e}"
                    )));
                }
            }
        };
        let limit = self.cfg.output_limit_bytes;
        let (stdout, stderr) = (child.stdout().take(), child.stderr().take());
        let (pgid_tx, mut pgid_rx) = tokio::sync::watch::channel(None::<u32>);
        let work = async move {
            let (out, err) = tokio::join!(
                read_capped(stdout, limit),
                read_stderr(stderr, limit, pgid_tx)
            );
            let status = child.wait().await;
            (out, err, status)
        };
        let local_bound = Duration::from_secs(secs + KILL_AFTER_SECS + 5);
        let never = tokio_util::sync::CancellationToken::new();
        let cancel = cancel.unwrap_or(&never);
        let work = tokio::time::timeout(local_bound, work);
        tokio::pin!(work);
        let finished = tokio::select! {
            r = &mut work => r,
            () = cancel.cancelled() => {
                // The remote command may be running before its pid marker has reached us:
                // keep reading (so the marker can arrive) for a moment before deciding that
                // nothing started.
                let pgid = tokio::select! {
                    seen = pgid_rx.wait_for(Option::is_some) => seen.ok().and_then(|p| *p),
                    _ = &mut work => None,
                    () = tokio::time::sleep(MARKER_WAIT) => None,
                };
                self.kill_group(name, &session, pgid).await;
                return Err(ExecError::Cancelled);
            }
        };
        let (out, err, status) = finished.map_err(|_| {
            ExecError::Failed(format!(
                "ssh to {name}: no answer {}s after the command's timeout",
                KILL_AFTER_SECS + 5
            ))
        })?;
        let status = status.map_err(|e| ExecError::Failed(format!("ssh to {name}: {e}")))?;
        let exit_code = status.code();
        Ok(CommandOutput {
            command: command.to_string(),
            exit_code,
            stdout: out,
            stderr: err,
            // GNU timeout exits 124 on TERM, 137 when it had to KILL.
            timed_out: matches!(exit_code, Some(124 | 137)),
        })
    }
}

impl SshExecutor {
    /// Kills a cancelled command's remote process group: TERM, then KILL two seconds on.
    async fn kill_group(&self, name: &str, session: &Session, pgid: Option<u32>) {
        let Some(pgid) = pgid else {
            // The command had not started (the marker comes first): nothing to kill.
            return;
        };
        let kill = format!(
            "kill -TERM -- -{pgid} 2>/dev/null; sleep 2; kill -KILL -- -{pgid} 2>/dev/null; true"
        );
        let killed = tokio::time::timeout(
            Duration::from_secs(10),
            session.raw_command(&kill).stdin(Stdio::null()).output(),
        )
        .await;
        match killed {
            Ok(Ok(_)) => tracing::info!(
                host = name,
                pgid,
                "ssh: cancelled; remote process group killed"
            ),
            Ok(Err(e)) => {
                tracing::warn!(host = name, pgid, error = %e, "ssh: cannot kill a cancelled command; its timeout still ends it")
            }
            Err(_) => tracing::warn!(
                host = name,
                pgid,
                "ssh: no answer killing a cancelled command; its timeout still ends it"
            ),
        }
    }
}

/// The line the remote shell writes first to stderr: this text, then its pid.
const PGID_MARK: &str = "reflex-pgid:";

/// How long a cancel waits for the pid marker of a command that has not sent it yet.
const MARKER_WAIT: Duration = Duration::from_secs(5);

/// Reads stderr as [`read_capped`] does, taking out the pid marker line (and sending the pid
/// as soon as it is seen). Lines before it (sshd's own warnings) are kept.
async fn read_stderr(
    r: Option<impl AsyncRead + Unpin>,
    limit: usize,
    pgid: tokio::sync::watch::Sender<Option<u32>>,
) -> String {
    use tokio::io::AsyncBufReadExt;
    let Some(r) = r else { return String::new() };
    let mut r = tokio::io::BufReader::new(r);
    let mut before = String::new();
    loop {
        let mut line = String::new();
        match r.read_line(&mut line).await {
            Ok(0) | Err(_) => return before,
            Ok(_) => {}
        }
        if let Some(pid) = line.trim_end().strip_prefix(PGID_MARK) {
            let _ = pgid.send(pid.parse().ok());
            break;
        }
        before.push_str(&line);
        if before.len() >= limit {
            break;
        }
    }
    let rest = read_capped(Some(r), limit.saturating_sub(before.len())).await;
    before + rest.as_str()
}

async fn read_capped(r: Option<impl AsyncRead + Unpin>, limit: usize) -> String {
    let Some(mut r) = r else { return String::new() };
    let mut kept = Vec::new();
    let mut total = 0usize;
    let mut chunk = vec![0u8; 16 * 1024];
    while let Ok(n) = r.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        total += n;
        let room = limit.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..n.min(room)]);
    }
    let mut text = String::from_utf8_lossy(&kept).into_owned();
    if total > kept.len() {
        text.push_str(&format!(
            "\n[output truncated: {} of {total} bytes kept]",
            kept.len()
        ));
    }
    text
}

/// `ssh.run` executor.
pub struct SshRunExecutor(pub Arc<SshExecutor>);

#[async_trait::async_trait]
impl Executor for SshRunExecutor {
    fn stops_on_cancel(&self) -> bool {
        true
    }

    fn validate(&self, ctx: &StepContext) -> Result<(), ExecError> {
        let args: SshRunArgs = ctx.args()?;
        self.0.resolve(&args.host).map(drop)
    }

    async fn execute(&self, ctx: &StepContext) -> Result<Value, ExecError> {
        let args: SshRunArgs = ctx.args()?;
        let out = (self.0)
            .run(&args.host, &args.command, ctx.timeout, Some(&ctx.cancel))
            .await?;
        let value = serde_json::to_value(&out).unwrap_or_default();
        if out.timed_out {
            return Err(ExecError::FailedWith(
                format!(
                    "timed out after {}s; the remote command was killed",
                    ctx.timeout.as_secs().max(1)
                ),
                value,
            ));
        }
        match out.exit_code {
            Some(code) if args.ok_exit_codes.contains(&code) => Ok(value),
            code => Err(ExecError::FailedWith(failure(code, &out.stderr), value)),
        }
    }
}

/// A failed command's error: its exit code (or that it had none: killed by a signal, the
/// connection lost) and the line of stderr that says why. The last line is the one that
/// does: a login shell's warnings come first ("Could not chdir to home directory"), the
/// cause last ("This account is currently not available.").
pub fn failure(exit_code: Option<i32>, stderr: &str) -> String {
    let code = exit_code.map_or(
        "no exit code (killed, or the connection was lost)".into(),
        |c| format!("exit code {c}"),
    );
    let why = (stderr.lines().rev())
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("[output truncated"));
    match why {
        Some(line) => format!("{code}: {}", crate::text::truncate(line, 300)),
        None => format!("{code}, nothing on stderr"),
    }
}

/// Usage of one filesystem, from `df -P -B1`.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct DiskUsage {
    /// Size in bytes.
    pub size_bytes: u64,
    /// Used bytes.
    pub used_bytes: u64,
    /// Bytes available to unprivileged users.
    pub avail_bytes: u64,
    /// `used / (used + avail)`, as df computes its capacity.
    pub use_percent: f64,
}

/// Parses `df -P -B1 PATH` output: the header, then one line whose last five fields are
/// size, used, available, capacity and mount point (the device name may hold spaces).
pub fn parse_df(text: &str) -> Result<(DiskUsage, String), String> {
    let line = text
        .lines()
        .nth(1)
        .ok_or_else(|| format!("unexpected df output: {text:?}"))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let n = fields.len();
    if n < 6 {
        return Err(format!("unexpected df line: {line:?}"));
    }
    let num = |s: &str| {
        s.parse::<u64>()
            .map_err(|_| format!("unexpected df number {s:?} in {line:?}"))
    };
    let (size, used, avail) = (
        num(fields[n - 5])?,
        num(fields[n - 4])?,
        num(fields[n - 3])?,
    );
    let use_percent = if used + avail == 0 {
        0.0
    } else {
        100.0 * used as f64 / (used + avail) as f64
    };
    Ok((
        DiskUsage {
            size_bytes: size,
            used_bytes: used,
            avail_bytes: avail,
            use_percent: (use_percent * 10.0).round() / 10.0,
        },
        fields[n - 1].to_string(),
    ))
}

/// Bytes as people read them in chat: decimal units, one decimal ("5.1 GB").
pub fn human_bytes(bytes: i64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes.unsigned_abs() as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    let sign = if bytes < 0 { "-" } else { "" };
    if unit == 0 {
        format!("{sign}{v} B")
    } else {
        format!("{sign}{v:.1} {}", UNITS[unit])
    }
}

/// `disk_cleanup` executor.
pub struct DiskCleanupExecutor(pub Arc<SshExecutor>);

impl DiskCleanupExecutor {
    async fn df(
        &self,
        host: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<(DiskUsage, String), ExecError> {
        let cmd = format!(
            "df -P -B1 -- {}",
            shell_quote(path).map_err(ExecError::InvalidArgs)?
        );
        let out = self.0.run(host, &cmd, timeout, None).await?;
        if out.exit_code != Some(0) {
            return Err(ExecError::Failed(format!(
                "df {path:?} on {host}: {}",
                out.stderr.trim()
            )));
        }
        parse_df(&out.stdout).map_err(ExecError::Failed)
    }
}

#[async_trait::async_trait]
impl Executor for DiskCleanupExecutor {
    fn stops_on_cancel(&self) -> bool {
        true
    }

    fn validate(&self, ctx: &StepContext) -> Result<(), ExecError> {
        let args: DiskCleanupArgs = ctx.args()?;
        self.0.resolve(&args.host).map(drop)
    }

    async fn execute(&self, ctx: &StepContext) -> Result<Value, ExecError> {
        let args: DiskCleanupArgs = ctx.args()?;
        let deadline = tokio::time::Instant::now() + ctx.timeout;
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        let (before, mountpoint) = self.df(&args.host, &args.path, left()).await?;
        let commands = args
            .commands
            .unwrap_or_else(|| self.0.cfg.cleanup_commands.clone());
        let mut ran = Vec::new();
        for cmd in &commands {
            if left().is_zero() {
                break;
            }
            // A failing cleanup command does not stop the others: each frees what it can.
            ran.push(
                self.0
                    .run(&args.host, cmd, left(), Some(&ctx.cancel))
                    .await?,
            );
        }
        let (after, _) = self
            .df(&args.host, &args.path, left().max(Duration::from_secs(5)))
            .await?;
        let reclaimed = after.avail_bytes as i64 - before.avail_bytes as i64;
        let output = json!({
            "host": args.host,
            "path": args.path,
            "mountpoint": mountpoint,
            "before": before,
            "after": after,
            "reclaimed_bytes": reclaimed,
            "reclaimed": human_bytes(reclaimed),
            "summary": format!(
                "Cleanup ran. Space reclaimed: {} ({} {:.1}% -> {:.1}% used).",
                human_bytes(reclaimed),
                mountpoint,
                before.use_percent,
                after.use_percent
            ),
            "commands": ran,
        });
        match args.target_percent {
            Some(target) if after.use_percent >= target => Err(ExecError::Failed(format!(
                "{} still {:.1}% used after cleanup (target below {target}%); reclaimed {}; output: {output}",
                mountpoint,
                after.use_percent,
                human_bytes(reclaimed)
            ))),
            _ => Ok(output),
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_failure_names_the_last_stderr_line_and_its_exit_code() {
        assert_eq!(
            super::failure(
                Some(1),
                "Could not chdir to home directory\nThis account is currently not available.\n\n"
            ),
            "exit code 1: This account is currently not available."
        );
        assert_eq!(
            super::failure(Some(2), ""),
            "exit code 2, nothing on stderr"
        );
        assert!(super::failure(None, "x").starts_with("no exit code"));
        assert!(
            super::failure(Some(1), "cause\n\n[output truncated: 10 of 20 bytes kept]")
                .ends_with(": cause")
        );
    }

    use super::*;

    #[test]
    fn parses_df_posix_output() {
        let text = "Filesystem     1-blocks  Used Available Capacity Mounted on\n/dev/my disk   67108864  1048576 66060288       2% /var/lib\n";
        let (u, mp) = parse_df(text).unwrap();
        assert_eq!(
            (u.size_bytes, u.used_bytes, u.avail_bytes),
            (67108864, 1048576, 66060288)
        );
        assert_eq!(mp, "/var/lib");
        assert_eq!(u.use_percent, 1.6);
        assert!(parse_df("Filesystem\n").is_err());
        assert!(parse_df("h\na b c d e f\n").is_err());
    }

    #[test]
    fn human_bytes_reads_like_chat() {
        assert_eq!(human_bytes(5_100_000_000), "5.1 GB");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_500), "1.5 kB");
        assert_eq!(human_bytes(-2_000_000), "-2.0 MB");
    }
}
