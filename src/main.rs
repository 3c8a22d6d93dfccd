//! The `reflex` binary: a thin clap front over the library.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use reflex::client;
use reflex::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "reflex",
    version,
    about = "Automated remediation: alerts in, playbooks run, every action on the record"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the operator commands find the API.
#[derive(clap::Args)]
struct Api {
    /// API address.
    #[arg(long, env = "REFLEX_SERVER", default_value = "http://127.0.0.1:9095")]
    server: String,
    /// A file holding the API token (else REFLEX_TOKEN).
    #[arg(long, env = "REFLEX_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Output: a table (default on a terminal) or JSON (default otherwise).
    #[arg(short = 'o', long, value_enum)]
    output: Option<Output>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Aligned columns, long values cut with an ellipsis.
    Table,
    /// Aligned columns, every value whole.
    Wide,
    Json,
}

impl Api {
    /// JSON unless asked for a table or writing to a terminal.
    fn json(&self) -> bool {
        use std::io::IsTerminal;
        match self.output {
            Some(o) => o == Output::Json,
            None => !std::io::stdout().is_terminal(),
        }
    }

    /// Prints `v` as JSON, or as `table` renders it.
    fn print(&self, v: &serde_json::Value, table: impl Fn(&serde_json::Value) -> String) {
        if self.json() {
            println!("{}", pretty(v));
        } else {
            print!("{}", table(v));
        }
    }

    /// Whether tables show every value whole (`-o wide`).
    fn wide(&self) -> bool {
        self.output == Some(Output::Wide)
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (embedded defaults without --config).
    Serve {
        /// Config file (reflex.yaml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on (overrides the config's `listen`).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Render and record every step; act on nothing.
        #[arg(long)]
        dry_run: bool,
        /// Log format.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Validate the config and playbooks; errors as file:line; exit 1 on any error.
    Check {
        /// Config file to check as well.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Playbook files or directories (default: the config's playbooks_dir).
        paths: Vec<PathBuf>,
    },
    /// Show which playbooks an alert matches and the exact steps they would run. No side effects.
    Simulate {
        /// Alert file: an Alertmanager webhook payload or generic alert JSON.
        #[arg(long)]
        alert: PathBuf,
        /// Playbook directory (default: the config's playbooks_dir).
        #[arg(long)]
        playbooks: Option<PathBuf>,
        /// Config file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List runs, newest first (token from REFLEX_TOKEN).
    Runs {
        #[command(flatten)]
        api: Api,
        /// Only this playbook.
        #[arg(long)]
        playbook: Option<String>,
        /// Only this state.
        #[arg(long)]
        state: Option<String>,
        /// Only this target (a host, or namespace/name).
        #[arg(long)]
        target: Option<String>,
        /// Only runs older than this id (the next page).
        #[arg(long)]
        before: Option<i64>,
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show one run with its steps.
    Run {
        #[command(flatten)]
        api: Api,
        /// Run id.
        id: i64,
        /// Print steps as they change until the run ends.
        #[arg(long)]
        follow: bool,
    },
    /// List approval requests (pending by default).
    Approvals {
        #[command(flatten)]
        api: Api,
        /// pending, approved, denied, expired, cancelled, or all.
        #[arg(long, default_value = "pending")]
        state: String,
    },
    /// Approve a request.
    Approve {
        #[command(flatten)]
        api: Api,
        /// Approval id.
        id: i64,
        /// Recorded with the decision.
        #[arg(long)]
        comment: Option<String>,
    },
    /// Deny a request; its run ends without acting.
    Deny {
        #[command(flatten)]
        api: Api,
        /// Approval id.
        id: i64,
        /// Recorded with the decision.
        #[arg(long)]
        comment: Option<String>,
    },
    /// Engage the kill switch: no new run starts, running runs stop before their next step.
    Kill {
        #[command(flatten)]
        api: Api,
        /// Why (required).
        #[arg(long)]
        reason: String,
        /// Only this playbook.
        #[arg(long)]
        playbook: Option<String>,
        /// Release automatically after this long (e.g. 2h).
        #[arg(long = "for")]
        for_: Option<String>,
        /// Replace the reason (and end) of a switch that is engaged already; without it,
        /// engaging an engaged switch changes nothing and exits 6.
        #[arg(long)]
        replace: bool,
    },
    /// Release the kill switch.
    Unkill {
        #[command(flatten)]
        api: Api,
        /// Only this playbook's switch.
        #[arg(long)]
        playbook: Option<String>,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Run a playbook now, without an alert (operator role); gates and the kill switch apply.
    Trigger {
        #[command(flatten)]
        api: Api,
        /// Playbook name.
        playbook: String,
        /// A label its templates see, `key=value` (repeatable).
        #[arg(short = 'l', long = "label", value_parser = key_value)]
        labels: Vec<(String, String)>,
        /// An annotation, `key=value` (repeatable).
        #[arg(short = 'a', long = "annotation", value_parser = key_value)]
        annotations: Vec<(String, String)>,
    },
    /// Run again a failed, interrupted, expired or killed run, from the step that did not
    /// succeed (operator role); rendered against the playbook in force and gated again.
    Retry {
        #[command(flatten)]
        api: Api,
        /// Run id.
        id: i64,
        /// Repeat every step.
        #[arg(long)]
        from_start: bool,
    },
    /// Cancel a run: at once if it has not started, else before its next step.
    Cancel {
        #[command(flatten)]
        api: Api,
        /// Run id.
        id: i64,
    },
    /// List the playbooks in force.
    Playbooks {
        #[command(flatten)]
        api: Api,
    },
    /// Reload the playbooks from disk (an invalid set is refused whole).
    Reload {
        #[command(flatten)]
        api: Api,
    },
    /// Print a shell completion script: `source <(reflex completions bash)`.
    Completions {
        /// bash, zsh or fish.
        shell: Shell,
    },
    /// Show the audit log, newest first.
    Audit {
        #[command(flatten)]
        api: Api,
        /// Only this actor (a token name, `circuit-breaker`, `reflex`).
        #[arg(long)]
        actor: Option<String>,
        /// Only actions starting with this (`killswitch`, `approval`, `step.`).
        #[arg(long)]
        action: Option<String>,
        /// Only rows since this: a duration back (`2h`) or a time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// How many rows.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Config::load(p).map_err(|errors| {
            let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            anyhow::anyhow!("invalid config:\n{}", lines.join("\n"))
        }),
        None => Ok(Config::default()),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<reflex::client::ClientError>() {
                Some(c) => ExitCode::from(c.exit_code()),
                None => ExitCode::FAILURE,
            }
        }
    }
}

fn client_call(
    api: &Api,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let token = match &api.token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading the token file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("REFLEX_TOKEN").ok(),
    }
    .filter(|t| !t.is_empty());
    let client = reflex::client::Client::new(&api.server, token)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(client.call(method, path, body))?)
}

/// `reflex approve` / `reflex deny`.
fn decide(api: &Api, id: i64, verb: &str, comment: Option<String>) -> anyhow::Result<ExitCode> {
    let path = format!("/api/v1/approvals/{id}/{verb}");
    let body = serde_json::json!({ "comment": comment });
    let v = client_call(api, reqwest::Method::POST, &path, Some(body))?;
    api.print(&v, |v| {
        format!("approval {id}: {}\n", v["state"].as_str().unwrap_or("?"))
    });
    Ok(ExitCode::SUCCESS)
}

/// The exit code of `trigger` and `retry`: 0 when a run was created (or joined a queued
/// one), 6 when something held it back (a kill switch, a cooldown: the state refused it), 1
/// when it could not be planned.
fn outcome_exit(v: &serde_json::Value) -> ExitCode {
    match v["outcome"].as_str() {
        Some("suppressed") => ExitCode::from(6),
        Some("failed") => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}

/// `path?k=v&…` with each given value URL-encoded (a target may hold `/`, `&` or spaces).
fn query(path: &str, pairs: &[(&str, Option<String>)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        if let Some(v) = v {
            q.append_pair(k, v);
        }
    }
    format!("{path}?{}", q.finish())
}

/// `key=value`, for `-l` and `-a`.
fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// `reflex run ID --follow`: prints the run, then each step as it changes, until the run
/// ends (polling every half second). Exits 0 when it succeeded, 1 otherwise.
fn follow_run(api: &Api, path: &str, mut run: serde_json::Value) -> anyhow::Result<ExitCode> {
    let mut seen: Vec<serde_json::Value> = Vec::new();
    let mut state = String::new();
    loop {
        let steps = run["steps"].as_array().cloned().unwrap_or_default();
        for (i, s) in steps.iter().enumerate() {
            let key = serde_json::json!([s["state"], s["error"]]);
            if seen.get(i) != Some(&key) {
                if api.json() {
                    println!("{s}");
                } else {
                    print!("{}", client::format_step(s));
                }
                seen.resize(steps.len().max(seen.len()), serde_json::Value::Null);
                seen[i] = key;
            }
        }
        let now = run["state"].as_str().unwrap_or("").to_string();
        if now != state && !api.json() {
            println!("run {} {now}", run["id"]);
        }
        state = now;
        if client::is_final(&state) {
            return Ok(if state == "succeeded" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        run = client_call(api, reqwest::Method::GET, path, None)?;
    }
}

/// `reflex kill` / `reflex unkill`: PUT the switch (global, or one playbook's), print the result.
fn set_switch(
    api: &Api,
    playbook: Option<&str>,
    body: serde_json::Value,
) -> anyhow::Result<ExitCode> {
    let path = playbook.map_or("/api/v1/killswitch".to_string(), |p| {
        format!("/api/v1/playbooks/{p}/killswitch")
    });
    let v = client_call(api, reqwest::Method::PUT, &path, Some(body))?;
    api.print(&v, client::format_switches);
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    use reqwest::Method;
    use serde_json::json;
    match cli.command {
        Command::Runs {
            api,
            playbook,
            state,
            target,
            before,
            limit,
        } => {
            let q = query(
                "/api/v1/runs",
                &[
                    ("limit", Some(limit.to_string())),
                    ("playbook", playbook),
                    ("state", state),
                    ("target", target),
                    ("before", before.map(|b| b.to_string())),
                ],
            );
            let wide = api.wide();
            api.print(&client_call(&api, Method::GET, &q, None)?, |v| {
                client::format_runs(v, wide)
            });
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { api, id, follow } => {
            let path = format!("/api/v1/runs/{id}");
            let run = client_call(&api, Method::GET, &path, None)?;
            if !follow {
                api.print(&run, client::format_run);
                return Ok(ExitCode::SUCCESS);
            }
            follow_run(&api, &path, run)
        }
        Command::Approvals { api, state } => {
            let q = if state == "all" {
                "/api/v1/approvals".to_string()
            } else {
                format!("/api/v1/approvals?state={state}")
            };
            api.print(
                &client_call(&api, Method::GET, &q, None)?,
                client::format_approvals,
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Approve { api, id, comment } => decide(&api, id, "approve", comment),
        Command::Deny { api, id, comment } => decide(&api, id, "deny", comment),
        Command::Kill {
            api,
            reason,
            playbook,
            for_,
            replace,
        } => {
            let body =
                json!({ "engaged": true, "reason": reason, "for": for_, "replace": replace });
            set_switch(&api, playbook.as_deref(), body)
        }
        Command::Unkill {
            api,
            playbook,
            reason,
        } => {
            let body = json!({ "engaged": false, "reason": reason });
            set_switch(&api, playbook.as_deref(), body)
        }
        Command::Trigger {
            api,
            playbook,
            labels,
            annotations,
        } => {
            let map = |kv: Vec<(String, String)>| {
                kv.into_iter()
                    .collect::<std::collections::BTreeMap<String, String>>()
            };
            let body = json!({ "labels": map(labels), "annotations": map(annotations) });
            let path = format!("/api/v1/playbooks/{playbook}/runs");
            let v = client_call(&api, Method::POST, &path, Some(body))?;
            api.print(&v, client::format_outcome);
            Ok(outcome_exit(&v))
        }
        Command::Retry {
            api,
            id,
            from_start,
        } => {
            let path = format!("/api/v1/runs/{id}/retry");
            let body = json!({ "from_start": from_start });
            let v = client_call(&api, Method::POST, &path, Some(body))?;
            api.print(&v, client::format_outcome);
            Ok(outcome_exit(&v))
        }
        Command::Cancel { api, id } => {
            let path = format!("/api/v1/runs/{id}/cancel");
            let v = client_call(&api, Method::POST, &path, None)?;
            api.print(&v, |v| {
                let note = v["message"]
                    .as_str()
                    .map_or(String::new(), |m| format!(" ({m})"));
                format!("run {id}: {}{note}\n", v["state"].as_str().unwrap_or("?"))
            });
            Ok(ExitCode::SUCCESS)
        }
        Command::Playbooks { api } => {
            let v = client_call(&api, Method::GET, "/api/v1/playbooks", None)?;
            api.print(&v, client::format_playbooks);
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload { api } => {
            let v = client_call(&api, Method::POST, "/api/v1/playbooks/reload", None)?;
            println!("{}", pretty(&v));
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let shell = match shell {
                Shell::Bash => clap_complete::Shell::Bash,
                Shell::Zsh => clap_complete::Shell::Zsh,
                Shell::Fish => clap_complete::Shell::Fish,
            };
            clap_complete::generate(shell, &mut Cli::command(), "reflex", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            api,
            actor,
            action,
            since,
            limit,
        } => {
            let path = query(
                "/api/v1/audit",
                &[
                    ("limit", Some(limit.to_string())),
                    ("actor", actor),
                    ("action", action),
                    ("since", since),
                ],
            );
            let wide = api.wide();
            api.print(&client_call(&api, Method::GET, &path, None)?, |v| {
                client::format_audit(v, wide)
            });
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            config,
            listen,
            dry_run,
            log_format,
        } => {
            reflex::telemetry::init(matches!(log_format, LogFormat::Json));
            let mut cfg = load_config(config.as_ref())?;
            cfg.dry_run |= dry_run;
            if let Some(addr) = listen {
                cfg.listen = addr;
                cfg.validate().map_err(anyhow::Error::msg)?;
            }
            let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
            rt.block_on(async {
                let listener = tokio::net::TcpListener::bind(cfg.listen)
                    .await
                    .with_context(|| format!("binding {}", cfg.listen))?;
                reflex::app::run(cfg, listener, reflex::app::shutdown_signal()).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config, paths } => {
            let ok = reflex::cli::check(config.as_deref(), &paths, &mut std::io::stdout())?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Simulate {
            alert,
            playbooks,
            config,
            json,
        } => {
            let cfg = load_config(config.as_ref())?;
            let dir = playbooks.unwrap_or_else(|| cfg.playbooks_dir.clone());
            let set =
                reflex::playbook::PlaybookSet::load(&[dir], &cfg.references()).map_err(|d| {
                    let lines: Vec<String> = d.iter().map(ToString::to_string).collect();
                    anyhow::anyhow!("invalid playbooks:\n{}", lines.join("\n"))
                })?;
            let alerts = reflex::cli::read_alerts(&alert).map_err(anyhow::Error::msg)?;
            let ok = reflex::cli::simulate(&cfg, &set, &alerts, json, &mut std::io::stdout())?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
