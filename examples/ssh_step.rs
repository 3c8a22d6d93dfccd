//! Per-step cost of `ssh.run` on a warm multiplexed connection, against the same command run
//! locally. Driven by `scripts/ssh-overhead`, which starts a throwaway sshd on loopback.
//!
//! `ssh_step PORT IDENTITY KNOWN_HOSTS USER [N]`

use reflex::executors::SshExecutor;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    let n: u32 = a.get(5).and_then(|s| s.parse().ok()).unwrap_or(200);
    let yaml = format!(
        "ssh:\n  config_file: /dev/null\n  identity_file: {}\n  known_hosts_file: {}\n  hosts:\n    h: {{ address: 127.0.0.1, port: {}, user: {} }}\n",
        a[2], a[3], a[1], a[4]
    );
    let cfg = reflex::config::Config::parse(&yaml).expect("config");
    let dir = tempfile::tempdir().expect("tempdir");
    let ex = SshExecutor::new(cfg.ssh, dir.path().join("ctl"));
    ex.run("h", "true", Duration::from_secs(10), None)
        .await
        .expect("warm-up");
    let t = Instant::now();
    for _ in 0..n {
        ex.run("h", "true", Duration::from_secs(10), None)
            .await
            .expect("step");
    }
    let ssh = t.elapsed() / n;
    let t = Instant::now();
    for _ in 0..n {
        tokio::process::Command::new("sh")
            .args(["-c", "true"])
            .status()
            .await
            .expect("local");
    }
    let local = t.elapsed() / n;
    println!(
        "ssh.run over a warm master: {:.2} ms per step; the command locally: {:.2} ms; overhead {:.2} ms ({n} steps, {} master connection(s))",
        ssh.as_secs_f64() * 1e3,
        local.as_secs_f64() * 1e3,
        (ssh.saturating_sub(local)).as_secs_f64() * 1e3,
        ex.connects()
    );
}
