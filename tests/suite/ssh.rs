//! The SSH executor against a real sshd on loopback: output and exit codes, timeouts that
//! kill the remote process, bounded output, host key checking, the inventory, shell quoting
//! of hostile alert values, connection reuse, and `disk_cleanup` on a real filesystem.

use crate::common::TestFs;
use crate::common::sshd::Sshd;
use reflex::alert::Alert;
use reflex::executors::{
    DiskCleanupExecutor, ExecError, Executor, SshExecutor, SshRunExecutor, StepContext,
};
use reflex::playbook::PlaybookSet;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

fn alert(labels: &[(&str, &str)]) -> Alert {
    crate::common::test_alert(labels)
}

fn ctx(args: Value, timeout: Duration) -> StepContext {
    crate::common::step_context(args, timeout)
}

fn executor(sshd: &Sshd) -> Arc<SshExecutor> {
    Arc::new(SshExecutor::new(
        sshd.ssh_config("testhost", &["db-1.example.internal"]),
        sshd.path("ctl"),
    ))
}

#[tokio::test]
async fn runs_a_command_and_records_output_and_exit_code() {
    let sshd = Sshd::start();
    let ex = executor(&sshd);
    let out = ex
        .run(
            "testhost",
            "echo hello; echo oops >&2; exit 3",
            Duration::from_secs(10),
            None,
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(3));
    assert_eq!(out.stdout, "hello\n");
    assert_eq!(out.stderr, "oops\n");

    let run = SshRunExecutor(ex.clone());
    // As a login shell that cannot start does: a warning first, the cause last.
    let err = run
        .execute(&ctx(
            json!({"host": "testhost", "command": "echo 'Could not chdir to home directory /nonexistent' >&2; echo 'This account is currently not available.' >&2; exit 1"}),
            Duration::from_secs(10),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "exit code 1: This account is currently not available."
    );
    let reflex::executors::ExecError::FailedWith(_, kept) = err else {
        panic!("the output is kept: {err:?}");
    };
    assert_eq!(kept["exit_code"], 1, "{kept}");
    assert!(
        kept["stderr"]
            .as_str()
            .unwrap()
            .starts_with("Could not chdir"),
        "{kept}"
    );
    let ok = run
        .execute(&ctx(
            json!({"host": "db-1.example.internal", "command": "exit 3", "ok_exit_codes": [0, 3]}),
            Duration::from_secs(10),
        ))
        .await
        .unwrap();
    assert_eq!(
        ok["exit_code"], 3,
        "an alias resolves to the inventory host"
    );
}

#[tokio::test]
async fn timeout_kills_the_remote_process() {
    let sshd = Sshd::start();
    let ex = executor(&sshd);
    let marker = sshd.path("finished");
    let cmd = format!("sleep 4321.5; touch {}", marker.display());
    let run = SshRunExecutor(ex);
    let started = std::time::Instant::now();
    let err = run
        .execute(&ctx(
            json!({"host": "testhost", "command": cmd}),
            Duration::from_secs(1),
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "returned at the timeout, not at the end of the command"
    );
    // sshd runs on this machine, so the "remote" process is visible here; it goes within
    // the kill grace.
    let gone = wait_until(Duration::from_secs(10), || {
        let alive = std::process::Command::new("pgrep")
            .args(["-f", "sleep 4321.5"])
            .output()
            .unwrap();
        alive.stdout.is_empty()
    })
    .await;
    assert!(gone, "remote process still running");
    assert!(!marker.exists());
}

#[tokio::test]
async fn output_is_bounded_with_a_marker() {
    let sshd = Sshd::start();
    let mut cfg = sshd.ssh_config("testhost", &[]);
    cfg.output_limit_bytes = 1024;
    let ex = SshExecutor::new(cfg, sshd.path("ctl"));
    let out = ex
        .run(
            "testhost",
            "head -c 1000000 /dev/zero | tr '\\0' a",
            Duration::from_secs(10),
            None,
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert!(
        out.stdout.starts_with(&"a".repeat(1024)),
        "kept the first 1024 bytes"
    );
    assert!(
        out.stdout
            .ends_with("[output truncated: 1024 of 1000000 bytes kept]"),
        "{}",
        &out.stdout[1024..]
    );
}

#[tokio::test]
async fn unknown_host_key_is_refused_under_strict_checking() {
    let sshd = Sshd::start();
    let mut cfg = sshd.ssh_config("testhost", &[]);
    let empty = sshd.path("empty_known_hosts");
    std::fs::write(&empty, "").unwrap();
    cfg.known_hosts_file = Some(empty.clone());
    let ex = SshExecutor::new(cfg.clone(), sshd.path("ctl"));
    let err = ex
        .run("testhost", "true", Duration::from_secs(10), None)
        .await
        .unwrap_err();
    assert!(matches!(err, ExecError::Refused(_)), "{err:?}");
    assert!(
        err.to_string().contains("testhost") && err.to_string().contains("host key"),
        "{err}"
    );
    assert_eq!(sshd.accepted_connections(), 0);

    // A changed key is refused too.
    std::fs::write(&empty, format!("[127.0.0.1]:{} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n", sshd.port)).unwrap();
    let err = SshExecutor::new(cfg.clone(), sshd.path("ctl"))
        .run("testhost", "true", Duration::from_secs(10), None)
        .await
        .unwrap_err();
    assert!(matches!(err, ExecError::Refused(_)), "{err:?}");

    // accept-new learns an unknown key (and only where the config says so).
    std::fs::write(&empty, "").unwrap();
    cfg.host_key_checking = reflex::config::HostKeyChecking::AcceptNew;
    let out = SshExecutor::new(cfg, sshd.path("ctl"))
        .run("testhost", "echo ok", Duration::from_secs(10), None)
        .await
        .unwrap();
    assert_eq!(out.stdout, "ok\n");
    assert!(
        std::fs::read_to_string(&empty)
            .unwrap()
            .contains("ssh-ed25519")
    );
}

#[tokio::test]
async fn a_host_outside_the_inventory_is_refused_without_connecting() {
    let sshd = Sshd::start();
    let run = SshRunExecutor(executor(&sshd));
    for target in [
        "127.0.0.1",
        "evil.example.com",
        "testhost; touch /tmp/x",
        "",
    ] {
        let err = run
            .execute(&ctx(
                json!({"host": target, "command": "true"}),
                Duration::from_secs(5),
            ))
            .await
            .unwrap_err();
        assert!(matches!(err, ExecError::Refused(_)), "{target}: {err:?}");
        assert!(
            err.to_string().contains("not in the SSH inventory"),
            "{err}"
        );
    }
    assert_eq!(sshd.accepted_connections(), 0);
}

/// Alert values an attacker who can set labels might try. Each must arrive as one literal
/// argument; none may run anything.
fn hostile_values(marker: &str) -> Vec<String> {
    vec![
        format!("; touch {marker}"),
        format!("$(touch {marker})"),
        format!("`touch {marker}`"),
        format!("' ; touch {marker}; '"),
        format!("\" ; touch {marker}; \""),
        format!("a\ntouch {marker}"),
        format!("a\r\ntouch {marker}\n"),
        format!("| touch {marker}"),
        format!("&& touch {marker}"),
        format!("> {marker}"),
        format!("$((1+1)) ${{HOME}} $HOME \\ \\' {marker}"),
        "-rf /".to_string(),
        "*".to_string(),
        "~root".to_string(),
        "x".repeat(60_000),
        "é ü 日本 🚀".to_string(),
    ]
}

#[tokio::test]
async fn hostile_label_values_reach_the_remote_side_as_one_literal_argument() {
    let sshd = Sshd::start();
    let run = SshRunExecutor(executor(&sshd));
    let marker = sshd.path("pwned");
    let out_file = sshd.path("received");
    let yaml = format!(
        r#"
name: inject
matchers: ['alertname="Inject"']
steps:
  - action: ssh.run
    with:
      host: testhost
      command: "printf '%s' {{{{ labels.payload }}}} > {} && printf '%s|' {{{{ labels.payload }}}} | wc -c"
"#,
        out_file.display()
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("inject.yaml"), yaml).unwrap();
    let set = PlaybookSet::load(&[dir.path().to_path_buf()], &Default::default()).unwrap();

    for payload in hostile_values(&marker.display().to_string()) {
        let a = alert(&[("alertname", "Inject"), ("payload", &payload)]);
        let matched = set.evaluate(&a);
        if payload.starts_with('-') {
            // A value that would be an option is refused before anything is sent.
            let err = matched[0].plan.as_ref().unwrap_err();
            assert!(
                matches!(err, reflex::playbook::error::PlanError::Refused(m) if m.contains("option")),
                "{payload:?}: {err}"
            );
            continue;
        }
        let plan = matched[0].plan.as_ref().unwrap();
        let mut c = ctx(plan.steps[0].args.clone(), Duration::from_secs(10));
        c.alert = a;
        let out = run
            .execute(&c)
            .await
            .unwrap_or_else(|e| panic!("{payload:?}: {e}"));
        let received = std::fs::read(&out_file).unwrap();
        assert_eq!(
            received,
            payload.as_bytes(),
            "payload {payload:?} arrived altered"
        );
        // `printf '%s|' ARGS` prints one `|` per argument: exactly one argument arrived.
        let count: usize = out["stdout"].as_str().unwrap().trim().parse().unwrap();
        assert_eq!(
            count,
            payload.len() + 1,
            "payload {payload:?} split into several arguments"
        );
        assert!(!marker.exists(), "payload {payload:?} ran a command");
    }

    // NUL cannot be passed as an argument: the run fails before anything is sent.
    let a = alert(&[("alertname", "Inject"), ("payload", "a\0b")]);
    let err = set.evaluate(&a).remove(0).plan.unwrap_err();
    assert!(
        matches!(&err, reflex::playbook::error::PlanError::Refused(m) if m.contains("NUL")),
        "{err}"
    );
}

#[tokio::test]
async fn a_hundred_concurrent_steps_share_one_master_connection() {
    let sshd = Sshd::start();
    let ex = executor(&sshd);
    let run = Arc::new(SshRunExecutor(ex.clone()));
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let run = run.clone();
            tokio::spawn(async move {
                run.execute(&ctx(
                    json!({"host": "testhost", "command": format!("echo {i}")}),
                    Duration::from_secs(60),
                ))
                .await
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let out = t.await.unwrap().unwrap_or_else(|e| panic!("step {i}: {e}"));
        assert_eq!(out["stdout"], format!("{i}\n"));
    }
    assert_eq!(ex.connects(), 1, "one master opened by the executor");
    assert_eq!(
        sshd.accepted_connections(),
        1,
        "sshd authenticated one connection:\n{}",
        sshd.log()
    );
}

#[tokio::test]
async fn a_master_that_dies_between_steps_is_replaced() {
    let sshd = Sshd::start();
    let ex = executor(&sshd);
    assert_eq!(
        ex.run("testhost", "echo 1", Duration::from_secs(10), None)
            .await
            .unwrap()
            .stdout,
        "1\n"
    );
    // Kill the master (the `ssh -M` process holding our control socket).
    let ctl = sshd.path("ctl");
    let killed = std::process::Command::new("pkill")
        .args(["-f", &format!("ssh .*-S {}.* -M", ctl.display())])
        .status()
        .unwrap();
    assert!(killed.success(), "no master process found");
    let master_gone = wait_until(Duration::from_secs(10), || {
        let alive = std::process::Command::new("pgrep")
            .args(["-f", &format!("ssh .*-S {}.* -M", ctl.display())])
            .output()
            .unwrap();
        alive.stdout.is_empty()
    })
    .await;
    assert!(master_gone, "the master did not exit");
    assert_eq!(
        ex.run("testhost", "echo 2", Duration::from_secs(10), None)
            .await
            .unwrap()
            .stdout,
        "2\n"
    );
    assert_eq!(ex.connects(), 2);
    assert_eq!(sshd.accepted_connections(), 2);
}

#[tokio::test]
async fn disk_cleanup_reports_the_bytes_it_reclaimed() {
    let sshd = Sshd::start();
    let fs = TestFs::new();
    let written = fs.fill(20, 1 << 20);
    let path = fs.dir.path().display().to_string();
    let exec = DiskCleanupExecutor(executor(&sshd));
    let args = json!({
        "host": "testhost",
        "path": path,
        "target_percent": 50,
        "commands": [format!("rm -f '{path}'/junk/*.log"), "exit 1"],
    });
    let out = exec
        .execute(&ctx(args, Duration::from_secs(30)))
        .await
        .unwrap();
    let reclaimed = out["reclaimed_bytes"].as_i64().unwrap();
    if fs.mounted {
        assert_eq!(reclaimed as u64, written, "{out:#}");
        assert_eq!(out["reclaimed"], "21.0 MB");
        assert_eq!(out["mountpoint"], path);
        assert_eq!(out["after"]["used_bytes"], 0);
    } else {
        eprintln!("no tmpfs (not root?): checking against a shared disk, loosely");
        assert!((reclaimed as f64) > written as f64 * 0.5, "{out:#}");
    }
    let cmds = out["commands"].as_array().unwrap();
    assert_eq!(
        cmds.len(),
        2,
        "a failing cleanup command does not stop the others"
    );
    assert_eq!(cmds[1]["exit_code"], 1);
    assert!(
        std::fs::read_dir(fs.dir.path().join("junk"))
            .unwrap()
            .next()
            .is_none()
    );

    // Target not reached: the step fails and says by how much.
    if fs.mounted {
        fs.fill(40, 1 << 20);
        let args =
            json!({"host": "testhost", "path": path, "target_percent": 10, "commands": ["true"]});
        let err = exec
            .execute(&ctx(args, Duration::from_secs(30)))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("still 62.5% used"), "{err}");
    } else {
        eprintln!("skipped (no tmpfs, not root?): a target_percent not reached");
    }
}

/// Polls `cond` every 20 ms until it holds (true) or `limit` passes (false).
async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

#[tokio::test]
async fn a_cancel_kills_the_remote_process_group_within_seconds() {
    let sshd = Sshd::start();
    let ex = executor(&sshd);
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("finished");
    // A unique sleep, and a child of the command's shell, so the whole group must die.
    let command = format!("sleep 41.37 & sleep 41.37; touch {}", marker.display());
    let cancel = tokio_util::sync::CancellationToken::new();
    let running = {
        let (ex, cancel) = (ex.clone(), cancel.clone());
        tokio::spawn(async move {
            ex.run(
                "testhost",
                &command,
                Duration::from_secs(120),
                Some(&cancel),
            )
            .await
        })
    };
    let alive = || {
        std::process::Command::new("pgrep")
            .args(["-f", "sleep 41.37"])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(
        wait_until(Duration::from_secs(10), alive).await,
        "the command started"
    );
    let asked = std::time::Instant::now();
    cancel.cancel();
    let answer = tokio::time::timeout(Duration::from_secs(15), running)
        .await
        .expect("the executor answers within seconds")
        .unwrap();
    assert!(matches!(answer, Err(ExecError::Cancelled)), "{answer:?}");
    assert!(
        wait_until(Duration::from_secs(10), || !alive()).await,
        "no process of the command is left"
    );
    assert!(asked.elapsed() < Duration::from_secs(15));
    assert!(!marker.exists(), "the rest of the command never ran");
}

#[tokio::test]
async fn hosts_come_from_an_ansible_inventory_and_file_sd_read_again_when_they_change() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let ansible = dir.path().join("hosts.yaml");
    let sd = dir.path().join("node-exporters.json");
    std::fs::write(
        &ansible,
        format!(
            "all:\n  children:\n    db:\n      hosts:\n        db-1:\n          ansible_host: 127.0.0.1\n          ansible_port: {}\n          ansible_user: {}\n",
            sshd.port, sshd.user
        ),
    )
    .unwrap();
    std::fs::write(&sd, "[]").unwrap();
    let yaml = format!(
        "ssh:\n  config_file: /dev/null\n  identity_file: {key}\n  known_hosts_file: {kh}\n  control_dir: {cd}\n  port: {port}\n  user: {user}\n  inventory_files: [{a}, {s}]\n",
        key = sshd.path("client_key").display(),
        kh = sshd.path("known_hosts").display(),
        cd = sshd.path("ctl").display(),
        port = sshd.port,
        user = sshd.user,
        a = ansible.display(),
        s = sd.display(),
    );
    let cfg = reflex::config::Config::parse(&yaml).unwrap();
    let ex = SshExecutor::new(cfg.ssh, sshd.path("ctl"));
    let t = Duration::from_secs(20);
    // A host of the Ansible inventory, with its address, port and user from there.
    let out = ex.run("db-1", "echo from-ansible", t, None).await.unwrap();
    assert_eq!(out.stdout.trim(), "from-ansible");
    // A scrape target is not a host until Prometheus' file names it; then it is, at once.
    let err = ex.run("127.0.0.1:9100", "true", t, None).await.unwrap_err();
    assert!(err.to_string().contains("ssh.inventory_files"), "{err}");
    std::fs::write(
        &sd,
        r#"[{"targets": ["127.0.0.1:9100"], "labels": {"job": "node"}}]"#,
    )
    .unwrap();
    let out = ex
        .run("127.0.0.1:9100", "echo from-file-sd", t, None)
        .await
        .unwrap();
    assert_eq!(out.stdout.trim(), "from-file-sd");
    // A file gone bad leaves the hosts read before; a name in none is refused.
    std::fs::write(&ansible, "all: [\n").unwrap();
    assert!(ex.run("db-1", "true", t, None).await.is_ok());
    let err = ex.run("db-9", "true", t, None).await.unwrap_err();
    assert!(matches!(err, ExecError::Refused(_)), "{err}");
    // `reflex check --config` names the file and the line.
    let errors = reflex::config::Config::parse(&yaml).unwrap_err();
    let text = format!("{errors:?}");
    assert!(text.contains("hosts.yaml: line "), "{text}");
}
