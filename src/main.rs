//! The `reflex` binary: a thin clap front over the library.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
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

#[derive(Clone, Copy, ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportWhat {
    Alerts,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ReplayOutput {
    Text,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FailOn {
    Breaker,
    Refusal,
    Budget,
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
    /// Copy the SQLite store while the daemon runs (a consistent snapshot); restore by
    /// putting the copy at `<data_dir>/reflex.db` with the daemon stopped.
    Backup {
        /// Where the copy goes (must not exist).
        path: PathBuf,
        /// Config file (for `data_dir`, and to refuse PostgreSQL: use pg_dump there).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write what the store holds as NDJSON to stdout (`export alerts`: the received alerts,
    /// with when each arrived, for `reflex replay`).
    Export {
        /// What to export: `alerts`.
        what: ExportWhat,
        /// Only since this: a duration back (`7d`) or a time (RFC 3339).
        #[arg(long, default_value = "7d")]
        since: String,
        /// Config file (its store).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Replay recorded alerts against playbooks with a virtual clock, acting on nothing:
    /// runs, holds, breaker trips, approvals and budget refusals per playbook.
    Replay {
        /// A recording (`reflex export alerts`), or a directory of Alertmanager payloads.
        recording: PathBuf,
        /// Playbook directory (default: the config's playbooks_dir).
        playbooks: Option<PathBuf>,
        /// Config file (breaker, windows, budgets, engine limits).
        #[arg(long)]
        config: Option<PathBuf>,
        /// `text` or `json`.
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: ReplayOutput,
        /// Another playbook directory: what it would have done differently.
        #[arg(long)]
        compare: Option<PathBuf>,
        /// Exit 1 when any playbook would have: `breaker` (tripped it), `refusal` (failed to
        /// plan), `budget` (been stopped by a budget); comma-separated.
        #[arg(long, value_delimiter = ',')]
        fail_on: Vec<FailOn>,
    },
    /// The operator commands, clients of the API.
    #[command(flatten)]
    Operator(reflex::operator::OperatorCommand),
    /// Print a shell completion script: `source <(reflex completions bash)`.
    Completions {
        /// bash, zsh or fish.
        shell: Shell,
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

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Operator(cmd) => Ok(reflex::operator::run(cmd)?),
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
        Command::Backup { path, config } => {
            let cfg = load_config(config.as_ref())?;
            if cfg.store.url.is_some() {
                anyhow::bail!(
                    "the store is PostgreSQL (store.url): back it up with pg_dump (see docs/operations.md)"
                );
            }
            let version = reflex::store::backup(&cfg.data_dir, &path)?;
            println!(
                "backed up {} to {} (schema version {version})",
                cfg.data_dir.join("reflex.db").display(),
                path.display()
            );
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
        Command::Export {
            what: ExportWhat::Alerts,
            since,
            config,
        } => {
            let cfg = load_config(config.as_ref())?;
            let since_ms = reflex::time::since_ms(&since, reflex::time::now_ms())
                .map_err(anyhow::Error::msg)?;
            let Some(store) = reflex::store::Snapshot::open_config(&cfg)? else {
                anyhow::bail!("no store in {}", cfg.data_dir.display());
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for alert in store.alerts_since(since_ms)? {
                use std::io::Write;
                writeln!(out, "{}", serde_json::to_string(&alert)?)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay {
            recording,
            playbooks,
            config,
            output,
            compare,
            fail_on,
        } => {
            let cfg = load_config(config.as_ref())?;
            let load = |dir: PathBuf| {
                reflex::playbook::PlaybookSet::load(&[dir], &cfg.references()).map_err(|d| {
                    let lines: Vec<String> = d.iter().map(ToString::to_string).collect();
                    anyhow::anyhow!("invalid playbooks:\n{}", lines.join("\n"))
                })
            };
            let set = load(playbooks.unwrap_or_else(|| cfg.playbooks_dir.clone()))?;
            let other = compare.map(load).transpose()?;
            let alerts = reflex::replay::read_recording(&recording).map_err(anyhow::Error::msg)?;
            let received = alerts.len();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let report = rt.block_on(reflex::replay::replay(&cfg, &set, alerts.clone()))?;
            let other = match &other {
                Some(set) => Some(rt.block_on(reflex::replay::replay(&cfg, set, alerts))?),
                None => None,
            };
            match output {
                ReplayOutput::Json => {
                    let mut doc = serde_json::json!({ "alerts": received, "playbooks": report });
                    if let Some(other) = &other {
                        doc["compare"] = serde_json::json!({ "playbooks": other, "difference": reflex::replay::compare(&report, other) });
                    }
                    println!("{}", serde_json::to_string_pretty(&doc)?);
                }
                ReplayOutput::Text => {
                    print!("{}", reflex::replay::text(&report));
                    if let Some(other) = &other {
                        print!(
                            "\ncompared with the other playbooks:\n{}",
                            reflex::replay::compare(&report, other)
                        );
                    }
                }
            }
            let failed = report.values().any(|c| {
                (fail_on.contains(&FailOn::Breaker) && c.breaker_trips > 0)
                    || (fail_on.contains(&FailOn::Refusal) && c.refusals > 0)
                    || (fail_on.contains(&FailOn::Budget) && c.budget_refusals > 0)
            });
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
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
