//! The offline commands: `reflex check` and `reflex simulate`. No side effects: they read
//! files and print.

use crate::alert::{Alert, AlertmanagerPayload, parse_generic};
use crate::config::Config;
use crate::playbook::{Diagnostic, Matched, PlaybookSet};
use serde::Serialize;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// `reflex check`: validates the config (if any) and the playbooks; prints each error as
/// `file:line: message`. Returns whether everything is valid.
pub fn check(
    config: Option<&Path>,
    paths: &[PathBuf],
    out: &mut impl std::io::Write,
) -> std::io::Result<bool> {
    let mut diags: Vec<Diagnostic> = Vec::new();
    let mut configs: Vec<PathBuf> = config.map(Path::to_path_buf).into_iter().collect();
    let mut playbook_paths = Vec::new();
    for p in paths {
        let is_config = p.is_file() && p.file_stem().is_some_and(|s| s == "reflex");
        if is_config {
            configs.push(p.clone())
        } else {
            playbook_paths.push(p.clone())
        }
    }
    let mut cfg = Config::default();
    let mut config_failed = false;
    let diagnostic = |e: crate::config::ConfigError| Diagnostic {
        file: e.file,
        line: e.line,
        message: e.message,
    };
    for c in &configs {
        match Config::load_parts(c) {
            Ok((loaded, problems)) => {
                cfg = loaded;
                diags.extend(problems.into_iter().map(diagnostic));
            }
            Err(errors) => {
                config_failed = true;
                diags.extend(errors.into_iter().map(diagnostic));
            }
        }
    }
    if playbook_paths.is_empty() {
        if config_failed {
            // Which directory the config names is not known: say nothing of it.
        } else if cfg.playbooks_dir.exists() {
            playbook_paths.push(cfg.playbooks_dir.clone());
        } else {
            // As `serve` does: no directory is an empty set.
            writeln!(
                out,
                "warning: playbook directory {} does not exist; no playbooks loaded",
                cfg.playbooks_dir.display()
            )?;
        }
    }
    let sandbox = std::sync::Arc::new(crate::playbook::script::Sandbox::new());
    let (playbooks, errors) = PlaybookSet::compile_files(&playbook_paths, &sandbox);
    diags.extend(errors);
    diags.extend(cfg.references().check(&playbooks));
    let count = playbooks.len();
    if diags.is_empty()
        && let Err(d) = PlaybookSet::new(playbooks, sandbox)
    {
        diags.extend(d);
    }
    for d in &diags {
        writeln!(out, "{d}")?;
    }
    if diags.is_empty() {
        writeln!(out, "ok: {count} playbook(s) valid")?;
    } else {
        writeln!(out, "{} error(s)", diags.len())?;
    }
    Ok(diags.is_empty())
}

/// Reads an alert file: an Alertmanager webhook payload, or generic alert JSON.
pub fn read_alerts(path: &Path) -> Result<Vec<Alert>, String> {
    let body = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| format!("{}: malformed JSON: {e}", path.display()))?;
    let at = |e: String| format!("{}: {e}", path.display());
    if value.get("version").is_some() && value.get("alerts").is_some() {
        let payload: AlertmanagerPayload =
            serde_json::from_value(value).map_err(|e| at(e.to_string()))?;
        payload.into_alerts().map_err(at)
    } else {
        parse_generic(&body, &crate::time::rfc3339(crate::time::now_ms())).map_err(at)
    }
}

/// What `simulate` found for one playbook an alert matched.
#[derive(Debug, Serialize)]
struct Simulated {
    playbook: String,
    dry_run: bool,
    /// The playbook's cooldown, e.g. "30m per alert".
    #[serde(skip_serializing_if = "Option::is_none")]
    cooldown: Option<String>,
    /// What would hold the run back now: a maintenance window, a kill switch, a cooldown.
    holds: Vec<String>,
    /// Why it cannot be planned at all.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    params: serde_json::Map<String, Value>,
    steps: Vec<SimulatedStep>,
}

#[derive(Debug, Serialize)]
struct SimulatedStep {
    name: String,
    action: crate::playbook::actions::Action,
    /// Main step, or one run only when a main step fails.
    phase: crate::playbook::spec::Phase,
    on_failure: &'static str,
    args: Value,
    /// The approval it would wait for.
    #[serde(skip_serializing_if = "Option::is_none")]
    approval: Option<Value>,
    /// Why its executor would refuse it (host not in the inventory, cluster not configured…).
    #[serde(skip_serializing_if = "Option::is_none")]
    refused: Option<String>,
}

impl Simulated {
    fn ok(&self) -> bool {
        self.error.is_none() && self.steps.iter().all(|s| s.refused.is_none())
    }
}

/// `reflex simulate`: which playbooks match each alert, the exact steps, rendered, whether
/// each executor would accept its step under `cfg`, the gates it would wait at, and what would
/// hold it back now (maintenance windows; kill switches and cooldowns in the config's store,
/// read without writing). Returns false when anything cannot be planned or would be
/// refused.
pub fn simulate(
    cfg: &Config,
    set: &PlaybookSet,
    alerts: &[Alert],
    as_json: bool,
    out: &mut impl std::io::Write,
) -> std::io::Result<bool> {
    let executors = crate::executors::Executors::from_config(cfg, set.sandbox.clone());
    let windows = crate::engine::maintenance::Windows::new(&cfg.maintenance_windows);
    let snapshot = crate::store::Snapshot::open_config(cfg).ok().flatten();
    let now = crate::time::now_ms();
    let results: Vec<(&Alert, Vec<Simulated>)> = alerts
        .iter()
        .map(|alert| {
            let sims = set
                .evaluate(alert)
                .into_iter()
                .map(|m| simulate_one(cfg, &executors, &windows, snapshot.as_ref(), now, alert, m))
                .collect();
            (alert, sims)
        })
        .collect();
    let ok = results.iter().flat_map(|(_, s)| s).all(Simulated::ok);
    if as_json {
        let report: Vec<_> = results
            .iter()
            .map(|(alert, sims)| json!({ "alert": alert, "matches": sims }))
            .collect();
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        )?;
        return Ok(ok);
    }
    for (alert, sims) in &results {
        print_alert(alert, sims, out)?;
    }
    if !ok {
        writeln!(
            out,
            "some steps cannot be planned or would be refused (exit 1)"
        )?;
    }
    Ok(ok)
}

fn simulate_one(
    cfg: &Config,
    executors: &crate::executors::Executors,
    windows: &crate::engine::maintenance::Windows,
    snapshot: Option<&crate::store::Snapshot>,
    now: i64,
    alert: &Alert,
    m: Matched,
) -> Simulated {
    let pb = &m.playbook;
    let per = match pb.cooldown_by {
        crate::playbook::spec::CooldownBy::Fingerprint => "per alert",
        crate::playbook::spec::CooldownBy::Group => "per alert group",
    };
    let cooldown = (!pb.cooldown.is_zero())
        .then(|| format!("{} {per}", crate::time::format_duration(pb.cooldown)));
    let mut holds: Vec<String> = windows.hold(alert, now).into_iter().collect();
    if let Some(snap) = snapshot {
        holds.extend(snap.kill_reason(&pb.name).ok().flatten());
        let key = match (pb.cooldown_by, &alert.group_key) {
            (crate::playbook::spec::CooldownBy::Group, Some(g)) => g.clone(),
            _ => alert.fingerprint.clone(),
        };
        let ms = pb.cooldown.as_millis() as i64;
        holds.extend(snap.cooldown_reason(&pb.name, &key, ms).ok().flatten());
    }
    let mut sim = Simulated {
        playbook: pb.name.clone(),
        dry_run: pb.dry_run || cfg.shadow(),
        cooldown,
        holds,
        error: None,
        params: Default::default(),
        steps: Vec::new(),
    };
    let plan = match m.plan {
        Ok(plan) => plan,
        Err(e) => {
            sim.error = Some(e.to_string());
            return sim;
        }
    };
    sim.params = plan.params.clone();
    for s in plan.steps {
        let ctx = crate::executors::StepContext {
            run_id: 0,
            playbook: pb.name.clone(),
            step: s.name.clone(),
            args: s.args.clone(),
            alert: alert.clone(),
            params: Value::Object(plan.params.clone()),
            timeout: std::time::Duration::from_secs(60),
            cancel: Default::default(),
            watch: None,
            artifacts: Default::default(),
        };
        let refused = match executors.get(s.action) {
            None => Some(format!("no executor for action {:?}", s.action)),
            Some(ex) => ex.validate(&ctx).err().map(|e| match e {
                crate::executors::ExecError::Refused(why) => why,
                other => other.to_string(),
            }),
        };
        sim.steps.push(SimulatedStep {
            name: s.name,
            action: s.action,
            phase: s.phase,
            on_failure: s.on_failure.as_str(),
            args: s.args,
            approval: s.approval.map(|g| {
                json!({
                    "approvals": g.count,
                    "approvers": g.approvers,
                    "scope": g.scope,
                    "expires_in": crate::time::format_duration(std::time::Duration::from_millis(g.expires_ms)),
                })
            }),
            refused,
        });
    }
    sim
}

fn print_alert(
    alert: &Alert,
    sims: &[Simulated],
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    let labels: Vec<String> = alert
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect();
    writeln!(
        out,
        "alert {} [{}] fingerprint {}",
        alert.name(),
        alert.status.as_str(),
        alert.fingerprint
    )?;
    writeln!(out, "  labels: {{{}}}", labels.join(", "))?;
    if sims.is_empty() {
        writeln!(out, "  no playbook matches")?;
    }
    for sim in sims {
        let name = &sim.playbook;
        if let Some(e) = &sim.error {
            writeln!(
                out,
                "  playbook {name}: matches, but CANNOT BE PLANNED: {e}"
            )?;
            continue;
        }
        let dry = if sim.dry_run { ", in shadow mode" } else { "" };
        let cooldown = sim
            .cooldown
            .as_ref()
            .map(|c| format!(", cooldown {c}"))
            .unwrap_or_default();
        writeln!(out, "  playbook {name} matches{dry}{cooldown}:")?;
        for h in &sim.holds {
            writeln!(out, "    HELD NOW: {h}")?;
        }
        for (k, v) in &sim.params {
            writeln!(out, "    param {k} = {v}")?;
        }
        let mut escalation_header = false;
        for (i, s) in sim.steps.iter().enumerate() {
            if s.phase == crate::playbook::spec::Phase::OnFailure && !escalation_header {
                writeln!(out, "    if a step fails, then:")?;
                escalation_header = true;
            }
            writeln!(
                out,
                "    {}. {} [{}] on_failure={}",
                i + 1,
                s.name,
                s.action,
                s.on_failure
            )?;
            if let Some(g) = &s.approval {
                let who = match g["approvers"].as_array() {
                    Some(a) if !a.is_empty() => {
                        let names: Vec<&str> = a.iter().filter_map(Value::as_str).collect();
                        format!("by {}", names.join(" or "))
                    }
                    _ => "by any approver".to_string(),
                };
                writeln!(
                    out,
                    "         waits for {} approval(s) {who}, expiring after {}",
                    g["approvals"],
                    g["expires_in"].as_str().unwrap_or("")
                )?;
            }
            for (k, v) in s.args.as_object().into_iter().flatten() {
                let shown = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                writeln!(out, "         {k}: {shown}")?;
            }
            if let Some(why) = &s.refused {
                writeln!(out, "         WOULD BE REFUSED: {why}")?;
            }
        }
        let refused = sim.steps.iter().filter(|s| s.refused.is_some()).count();
        let verdict = match (refused, sim.holds.is_empty()) {
            (0, true) => "would run".to_string(),
            (0, false) => "would run once nothing holds it".to_string(),
            (n, _) => format!("would NOT run as planned: {n} step(s) would be refused"),
        };
        writeln!(out, "    => {verdict}")?;
    }
    Ok(())
}
