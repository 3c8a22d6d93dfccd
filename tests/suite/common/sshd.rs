//! A real OpenSSH server on loopback for tests: Debian's `sshd` with a throwaway host key and
//! client key in a temp dir and its own sshd_config, running as the current user. Each test
//! binary starts its own and stops it on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// A running sshd.
pub struct Sshd {
    /// Holds keys, config, known_hosts, log.
    pub dir: TempDir,
    child: Child,
    /// Port on 127.0.0.1.
    pub port: u16,
    /// Login user (the current user).
    pub user: String,
}

fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "reflex-test", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen (openssh-client) must be installed")
        .success();
    assert!(ok, "ssh-keygen failed");
}

impl Sshd {
    /// Starts sshd; panics with its log if it does not come up.
    pub fn start() -> Sshd {
        let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("sshd not found: install openssh-server (scripts/test does)");
        let dir = tempfile::Builder::new()
            .prefix("rx-sshd")
            .tempdir()
            .unwrap();
        let p = |name: &str| dir.path().join(name);
        keygen(&p("host_key"));
        keygen(&p("client_key"));
        std::fs::copy(p("client_key.pub"), p("authorized_keys")).unwrap();
        let port = super::free_port();
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
        let host_pub = std::fs::read_to_string(p("host_key.pub")).unwrap();
        let mut fields = host_pub.split_whitespace();
        let (kind, key) = (fields.next().unwrap(), fields.next().unwrap());
        std::fs::write(
            p("known_hosts"),
            format!("[127.0.0.1]:{port} {kind} {key}\n"),
        )
        .unwrap();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {pid}\nAuthorizedKeysFile {ak}\n\
             StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nMaxStartups 100\nMaxSessions 10\n\
             LogLevel VERBOSE\nPrintMotd no\n\
             # bash sources ~/.bashrc for commands run by sshd only in a top-level shell: on a\n\
             # machine whose root .bashrc runs `pyenv init` that costs ~100 ms per command.\n\
             SetEnv SHLVL=1\n",
            hk = p("host_key").display(),
            pid = p("sshd.pid").display(),
            ak = p("authorized_keys").display(),
        );
        std::fs::write(p("sshd_config"), config).unwrap();
        // Privilege separation directory, needed when sshd runs as root.
        let _ = std::fs::create_dir_all("/run/sshd");
        let child = Command::new(sshd)
            .args(["-D", "-f"])
            .arg(p("sshd_config"))
            .arg("-E")
            .arg(p("sshd.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sshd");
        let mut s = Sshd {
            dir,
            child,
            port,
            user,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("sshd exited ({status}): {}", s.log());
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not listen: {}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// A path in the server's temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("sshd.log")).unwrap_or_default()
    }

    /// Authenticated connections so far (one per master connection).
    pub fn accepted_connections(&self) -> usize {
        self.log().matches("Accepted publickey").count()
    }

    /// The `ssh:` section of a reflex config with this server as inventory host `name`.
    pub fn config_yaml(&self, name: &str, aliases: &[&str]) -> String {
        format!(
            "ssh:\n  config_file: /dev/null\n  identity_file: {key}\n  known_hosts_file: {kh}\n  control_dir: {cd}\n  hosts:\n    {name}:\n      address: 127.0.0.1\n      port: {port}\n      user: {user}\n      aliases: {aliases:?}\n",
            key = self.path("client_key").display(),
            kh = self.path("known_hosts").display(),
            cd = self.path("ctl").display(),
            port = self.port,
            user = self.user,
        )
    }

    /// The same, as a parsed [`reflex::config::SshConfig`].
    pub fn ssh_config(&self, name: &str, aliases: &[&str]) -> reflex::config::SshConfig {
        reflex::config::Config::parse(&self.config_yaml(name, aliases))
            .unwrap()
            .ssh
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Master connections a test left open (a daemon killed with -9 cannot close its own)
        // name this server's temp dir on their command line; ending them ends their sshd
        // session processes too.
        let _ = Command::new("pkill")
            .args(["-f", &self.dir.path().display().to_string()])
            .status();
    }
}
