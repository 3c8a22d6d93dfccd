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
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Ok(Config::load(p)?),
        None => Ok(Config::default()),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve {
            config,
            dry_run,
            log_format,
        } => {
            reflex::telemetry::init(matches!(log_format, LogFormat::Json));
            let mut cfg = load_config(config.as_ref())?;
            cfg.dry_run |= dry_run;
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
            let dir = playbooks.unwrap_or(cfg.playbooks_dir);
            let set = reflex::playbook::PlaybookSet::load(&[dir]).map_err(|d| {
                let lines: Vec<String> = d.iter().map(ToString::to_string).collect();
                anyhow::anyhow!("invalid playbooks:\n{}", lines.join("\n"))
            })?;
            let alerts = reflex::cli::read_alerts(&alert).map_err(anyhow::Error::msg)?;
            reflex::cli::simulate(&set, &alerts, json, &mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
