//! The operator commands (`reflex runs`, `approve`, `kill`, …): their arguments, and each run
//! as a call of the API through [`crate::client`], printed as a table or JSON. `main.rs` only
//! parses and dispatches.

use crate::client::{self, ClientError};
use clap::{Subcommand, ValueEnum};
use reqwest::Method;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

/// Where the operator commands find the API.
#[derive(clap::Args)]
pub struct Api {
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

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
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

fn client_call(
    api: &Api,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, ClientError> {
    let token = match &api.token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| {
                    ClientError::Other(format!("reading the token file {}: {e}", f.display()))
                })?
                .trim()
                .to_string(),
        ),
        None => std::env::var("REFLEX_TOKEN").ok(),
    }
    .filter(|t| !t.is_empty());
    let client = client::Client::new(&api.server, token)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ClientError::Other(format!("starting the runtime: {e}")))?;
    rt.block_on(client.call(method, path, body))
}

/// `reflex approve` / `reflex deny`.
fn decide(
    api: &Api,
    id: i64,
    verb: &str,
    comment: Option<String>,
) -> Result<ExitCode, ClientError> {
    let path = format!("/api/v1/approvals/{id}/{verb}");
    let body = serde_json::json!({ "comment": comment });
    let v = client_call(api, Method::POST, &path, Some(body))?;
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

/// A name as one path segment (URL-encoded: a name with `/` or `?` stays one segment).
fn segment(name: &str) -> String {
    percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// `reflex run ID [--follow]`: the run, or (following) each change until it ends.
fn show_run(api: &Api, id: i64, follow: bool) -> Result<ExitCode, ClientError> {
    let path = format!("/api/v1/runs/{id}");
    let run = client_call(api, Method::GET, &path, None)?;
    if !follow {
        api.print(&run, client::format_run);
        return Ok(ExitCode::SUCCESS);
    }
    follow_run(api, &path, run)
}

/// `reflex undo`: the undo run, then each step it takes back and each it leaves alone.
fn undo(api: &Api, id: i64, force: bool) -> Result<ExitCode, ClientError> {
    let path = format!("/api/v1/runs/{id}/undo");
    let v = client_call(
        api,
        Method::POST,
        &path,
        Some(serde_json::json!({ "force": force })),
    )?;
    api.print(&v, |v| {
        let mut text = client::format_outcome(&v["outcome"]);
        for s in v["undo"]["steps"].as_array().into_iter().flatten() {
            text.push_str(&format!(
                "  takes back: {}\n",
                s["name"].as_str().unwrap_or("?")
            ));
        }
        for s in v["undo"]["skipped"].as_array().into_iter().flatten() {
            let (step, why) = (
                s["step"].as_str().unwrap_or("?"),
                s["why"].as_str().unwrap_or(""),
            );
            text.push_str(&format!("  left alone: {step}: {why}\n"));
        }
        text
    });
    Ok(outcome_exit(&v["outcome"]))
}

/// `reflex cancel`: what the run does now (`cancelled`, or `cancelling` while its step stops).
fn cancel(api: &Api, id: i64) -> Result<ExitCode, ClientError> {
    let path = format!("/api/v1/runs/{id}/cancel");
    let v = client_call(api, Method::POST, &path, None)?;
    api.print(&v, |v| {
        let note = v["message"]
            .as_str()
            .map_or(String::new(), |m| format!(" ({m})"));
        format!("run {id}: {}{note}\n", v["state"].as_str().unwrap_or("?"))
    });
    Ok(ExitCode::SUCCESS)
}

/// GETs `path` and prints it as a table (`-o wide`: every column) or as JSON.
fn list(
    api: &Api,
    path: &str,
    table: impl Fn(&serde_json::Value, bool) -> String,
) -> Result<ExitCode, ClientError> {
    let wide = api.wide();
    let v = client_call(api, Method::GET, path, None)?;
    api.print(&v, |v| table(v, wide));
    Ok(ExitCode::SUCCESS)
}

/// POSTs a trigger or a retry and prints what was planned; the exit code tells it.
fn plan(api: &Api, path: &str, body: Option<serde_json::Value>) -> Result<ExitCode, ClientError> {
    let v = client_call(api, Method::POST, path, body)?;
    api.print(&v, client::format_outcome);
    Ok(outcome_exit(&v))
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
fn follow_run(api: &Api, path: &str, mut run: serde_json::Value) -> Result<ExitCode, ClientError> {
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
        run = client_call(api, Method::GET, path, None)?;
    }
}

/// `reflex kill` / `reflex unkill`: PUT the switch (global, or one playbook's), print the result.
fn set_switch(
    api: &Api,
    playbook: Option<String>,
    body: serde_json::Value,
) -> Result<ExitCode, ClientError> {
    let path = playbook.map_or("/api/v1/killswitch".to_string(), |p| {
        format!("/api/v1/playbooks/{}/killswitch", segment(&p))
    });
    let v = client_call(api, Method::PUT, &path, Some(body))?;
    api.print(&v, client::format_switches);
    Ok(ExitCode::SUCCESS)
}

/// The operator commands.
#[derive(Subcommand)]
pub enum OperatorCommand {
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
    /// Take back what an ended run changed (operator role): a new run restores each change,
    /// last first, unless the object changed since; what cannot be undone is listed.
    Undo {
        #[command(flatten)]
        api: Api,
        /// Run id.
        id: i64,
        /// Overwrite fields changed since the run (admin role).
        #[arg(long)]
        force: bool,
    },
    /// Cancel a run: at once if it has not started, else its step under way is stopped.
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
    /// Put a playbook that earns autonomy back behind approval, counting from zero (admin).
    ResetAutonomy {
        #[command(flatten)]
        api: Api,
        /// Playbook name.
        playbook: String,
    },
    /// Reload the playbooks from disk (an invalid set is refused whole).
    Reload {
        #[command(flatten)]
        api: Api,
    },
    /// Show the audit log, newest first (`reflex audit export`: all of it, to keep elsewhere).
    #[command(args_conflicts_with_subcommands = true)]
    Audit {
        #[command(subcommand)]
        export: Option<AuditCommand>,
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

/// `reflex audit` subcommands.
#[derive(Subcommand)]
pub enum AuditCommand {
    /// Write the audit rows as NDJSON to stdout, oldest first, one row a line: to keep them
    /// elsewhere before retention deletes them.
    Export {
        #[command(flatten)]
        api: Api,
        /// Only rows since this: a duration back (`30d`) or a time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// `json` (the API's rows) or `cloudevents` (CloudEvents 1.0, structured JSON).
        #[arg(long, value_enum, default_value = "json")]
        format: ExportFormat,
    },
    /// Check the audit log's hash chain in the store (read only, beside a running daemon):
    /// exit 0 when intact, 1 naming the first row that was edited or follows a deleted one.
    Verify {
        /// The daemon's config (its store: `data_dir` or `store.url`).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// How `reflex audit export` writes a row.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// The row as the API gives it.
    Json,
    /// A CloudEvents 1.0 event in structured mode.
    Cloudevents,
}

/// `reflex audit verify`: the chain checked in the store itself (the API could only say what
/// the daemon believes).
fn audit_verify(config: Option<&std::path::Path>) -> Result<ExitCode, ClientError> {
    let cfg = match config {
        Some(path) => crate::config::Config::load(path).map_err(|errors| {
            let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            ClientError::Other(format!("invalid config:\n{}", lines.join("\n")))
        })?,
        None => crate::config::Config::default(),
    };
    let failed = |e: crate::store::StoreError| ClientError::Other(e.to_string());
    let store = crate::store::Snapshot::open_config(&cfg)
        .map_err(failed)?
        .ok_or_else(|| ClientError::Other(format!("no store in {}", cfg.data_dir.display())))?;
    let report = store.verify_audit().map_err(failed)?;
    let range = match (report.first, report.last) {
        (Some(first), Some(last)) => format!("rows {first} to {last}"),
        _ => "no rows".into(),
    };
    let anchor = match report.anchor {
        0 => String::new(),
        id => format!(", following row {id}, the last one retention deleted"),
    };
    match report.broken {
        None => {
            println!("audit chain intact: {} rows ({range}){anchor}", report.rows);
            Ok(ExitCode::SUCCESS)
        }
        Some(b) => {
            println!("audit chain broken at row {}: {}", b.id, b.why);
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Rows per page when exporting (the API's largest).
const EXPORT_PAGE: usize = 1000;

/// `reflex audit export`: every row (since `since`), paged from the newest back, then written
/// oldest first.
fn audit_export(
    api: &Api,
    since: Option<String>,
    format: ExportFormat,
) -> Result<ExitCode, ClientError> {
    let mut rows: Vec<serde_json::Value> = Vec::new();
    let mut before: Option<i64> = None;
    loop {
        let path = query(
            "/api/v1/audit",
            &[
                ("limit", Some(EXPORT_PAGE.to_string())),
                ("since", since.clone()),
                ("before", before.map(|b| b.to_string())),
            ],
        );
        let page = client_call(api, Method::GET, &path, None)?;
        let page = page.as_array().cloned().unwrap_or_default();
        before = page.last().and_then(|r| r["id"].as_i64());
        let last = page.len() < EXPORT_PAGE;
        rows.extend(page);
        if last || before.is_none() {
            break;
        }
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for row in rows.iter().rev() {
        let line = match format {
            ExportFormat::Json => row.clone(),
            ExportFormat::Cloudevents => client::audit_cloudevent(row, &api.server),
        };
        use std::io::Write;
        writeln!(out, "{line}").map_err(|e| ClientError::Other(format!("writing: {e}")))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs one operator command; its exit code, or why it failed (with its own exit code).
pub fn run(cmd: OperatorCommand) -> Result<ExitCode, ClientError> {
    use serde_json::json;
    match cmd {
        OperatorCommand::Runs {
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
            list(&api, &q, client::format_runs)
        }
        OperatorCommand::Run { api, id, follow } => show_run(&api, id, follow),
        OperatorCommand::Approvals { api, state } => {
            let state = Some(state).filter(|s| s != "all");
            let q = query("/api/v1/approvals", &[("state", state)]);
            list(&api, &q, |v, _| client::format_approvals(v))
        }
        OperatorCommand::Approve { api, id, comment } => decide(&api, id, "approve", comment),
        OperatorCommand::Deny { api, id, comment } => decide(&api, id, "deny", comment),
        OperatorCommand::Kill {
            api,
            reason,
            playbook,
            for_,
            replace,
        } => set_switch(
            &api,
            playbook,
            json!({ "engaged": true, "reason": reason, "for": for_, "replace": replace }),
        ),
        OperatorCommand::Unkill {
            api,
            playbook,
            reason,
        } => set_switch(
            &api,
            playbook,
            json!({ "engaged": false, "reason": reason }),
        ),
        OperatorCommand::Trigger {
            api,
            playbook,
            labels,
            annotations,
        } => {
            let map = |kv: Vec<(String, String)>| kv.into_iter().collect::<BTreeMap<_, _>>();
            let body = json!({ "labels": map(labels), "annotations": map(annotations) });
            let path = format!("/api/v1/playbooks/{}/runs", segment(&playbook));
            plan(&api, &path, Some(body))
        }
        OperatorCommand::Retry {
            api,
            id,
            from_start,
        } => {
            let path = format!("/api/v1/runs/{id}/retry");
            plan(&api, &path, Some(json!({ "from_start": from_start })))
        }
        OperatorCommand::Cancel { api, id } => cancel(&api, id),
        OperatorCommand::Undo { api, id, force } => undo(&api, id, force),
        OperatorCommand::Playbooks { api } => list(&api, "/api/v1/playbooks", |v, _| {
            client::format_playbooks(v)
        }),
        OperatorCommand::ResetAutonomy { api, playbook } => {
            let path = format!("/api/v1/playbooks/{}/autonomy/reset", segment(&playbook));
            let v = client_call(&api, Method::POST, &path, None)?;
            println!("{}", pretty(&v));
            Ok(ExitCode::SUCCESS)
        }
        OperatorCommand::Reload { api } => {
            let v = client_call(&api, Method::POST, "/api/v1/playbooks/reload", None)?;
            println!("{}", pretty(&v));
            Ok(ExitCode::SUCCESS)
        }
        OperatorCommand::Audit {
            export: Some(AuditCommand::Export { api, since, format }),
            ..
        } => audit_export(&api, since, format),
        OperatorCommand::Audit {
            export: Some(AuditCommand::Verify { config }),
            ..
        } => audit_verify(config.as_deref()),
        OperatorCommand::Audit {
            export: None,
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
            list(&api, &path, client::format_audit)
        }
    }
}
