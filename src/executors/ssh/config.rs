//! `ssh:` in reflex.yaml: client defaults and the host inventory (the only hosts SSH steps
//! may reach).

use crate::time::duration_str;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Host key checking policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostKeyChecking {
    /// Unknown or changed host keys fail the step (`StrictHostKeyChecking=yes`).
    #[default]
    Strict,
    /// Unknown keys are learned on first contact; changed keys still fail.
    AcceptNew,
}

/// SSH executor settings. Per-host settings override these defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SshConfig {
    /// Login user (default: the ssh client's default, the daemon's user).
    pub user: Option<String>,
    /// Port.
    pub port: u16,
    /// Private key; when set, only this key is offered.
    pub identity_file: Option<PathBuf>,
    /// known_hosts file to verify host keys against (default: the ssh client's).
    pub known_hosts_file: Option<PathBuf>,
    /// `strict` (default) or `accept-new`.
    pub host_key_checking: HostKeyChecking,
    /// ssh client config file (`-F`); `/dev/null` ignores `~/.ssh/config`.
    pub config_file: Option<PathBuf>,
    /// Directory for the master connections' control sockets (default: `<data_dir>/ssh`).
    /// Unix socket paths are limited to about 100 bytes: keep it short.
    pub control_dir: Option<PathBuf>,
    /// TCP connect timeout.
    #[serde(with = "duration_str")]
    pub connect_timeout: Duration,
    /// A master connection unused this long is closed; the next step opens a new one.
    #[serde(with = "duration_str")]
    pub idle_timeout: Duration,
    /// Commands at once over one host's master connection. sshd refuses sessions beyond its
    /// `MaxSessions` (10 by default), so this stays below it; further steps wait their turn.
    pub max_sessions_per_host: usize,
    /// Bytes of stdout and of stderr kept per command; the rest is counted and dropped.
    pub output_limit_bytes: usize,
    /// Cleanup commands of `disk_cleanup` steps that give none.
    pub cleanup_commands: Vec<String>,
    /// The inventory: host name -> settings. A step's target must be one of these names or
    /// one of their aliases (or a host of `inventory_files`).
    pub hosts: BTreeMap<String, SshHost>,
    /// More hosts, from Ansible YAML inventories and Prometheus `file_sd` JSON files (`.json`),
    /// read again when they change.
    pub inventory_files: Vec<PathBuf>,
}

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            user: None,
            port: 22,
            identity_file: None,
            known_hosts_file: None,
            host_key_checking: HostKeyChecking::Strict,
            config_file: None,
            control_dir: None,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_sessions_per_host: 8,
            output_limit_bytes: 64 * 1024,
            cleanup_commands: default_cleanup_commands(),
            hosts: BTreeMap::new(),
            inventory_files: Vec::new(),
        }
    }
}

/// What an SRE runs first on a full disk, each step only where its tool exists. Run as the
/// SSH user: prefix with `sudo -n` in `ssh.cleanup_commands` where root is needed.
pub fn default_cleanup_commands() -> Vec<String> {
    [
        "if command -v journalctl >/dev/null 2>&1; then journalctl --vacuum-time=7d; fi",
        "if command -v apt-get >/dev/null 2>&1; then apt-get clean; elif command -v dnf >/dev/null 2>&1; then dnf clean all; elif command -v yum >/dev/null 2>&1; then yum clean all; fi",
        "if command -v docker >/dev/null 2>&1; then docker system prune --force --filter until=72h; fi",
        "find /tmp /var/tmp -xdev -type f -mtime +7 -delete 2>/dev/null; true",
    ]
    .map(String::from)
    .to_vec()
}

/// One host of the SSH inventory.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SshHost {
    /// Address to connect to (default: the host's name).
    pub address: Option<String>,
    /// Port (default: `ssh.port`).
    pub port: Option<u16>,
    /// Login user (default: `ssh.user`).
    pub user: Option<String>,
    /// Private key (default: `ssh.identity_file`).
    pub identity_file: Option<PathBuf>,
    /// known_hosts file (default: `ssh.known_hosts_file`).
    pub known_hosts_file: Option<PathBuf>,
    /// Host key policy (default: `ssh.host_key_checking`).
    pub host_key_checking: Option<HostKeyChecking>,
    /// Jump host (`ssh -J`), e.g. `bastion.example.internal`.
    pub jump_host: Option<String>,
    /// Other names alerts use for this host (e.g. the FQDN in an `instance` label).
    pub aliases: Vec<String>,
}

#[cfg(test)]
mod tests {
    /// The defaults are shell a remote `sh -c` takes as written (checked by the local `sh -n`,
    /// which parses without running), and each skips itself where its tool is absent, so
    /// that none fails a host that lacks it. They are not run here: they act on the machine.
    #[test]
    fn default_cleanup_commands_are_valid_shell_and_guarded() {
        let commands = super::default_cleanup_commands();
        assert_eq!(commands.len(), 4);
        for c in &commands {
            let parsed = std::process::Command::new("sh")
                .args(["-n", "-c", c])
                .status()
                .unwrap();
            assert!(parsed.success(), "not valid sh: {c}");
            assert!(
                c.contains("command -v") || c.ends_with("; true"),
                "a host without the tool must not fail: {c}"
            );
            assert!(
                !c.contains("sudo"),
                "privilege is the operator's choice: {c}"
            );
        }
    }
}
