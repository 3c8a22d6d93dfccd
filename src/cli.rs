//! The offline commands: `reflex check` and `reflex simulate`. No side effects: they read
//! files and print.

use crate::alert::{Alert, AlertmanagerPayload, parse_generic};
use crate::config::Config;
use crate::playbook::{Diagnostic, Matched, PlaybookSet};
use serde_json::json;
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
    for c in &configs {
        match Config::load(c) {
            Ok(loaded) => cfg = loaded,
            Err(e) => diags.push(Diagnostic {
                file: e.file,
                line: e.line,
                message: e.message,
            }),
        }
    }
    if playbook_paths.is_empty() {
        playbook_paths.push(cfg.playbooks_dir.clone());
    }
    let count = match PlaybookSet::load(&playbook_paths) {
        Ok(set) => set.playbooks.len(),
        Err(d) => {
            diags.extend(d);
            0
        }
    };
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

/// `reflex simulate`: which playbooks match each alert, and the exact steps, rendered.
pub fn simulate(
    set: &PlaybookSet,
    alerts: &[Alert],
    as_json: bool,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    let results: Vec<(&Alert, Vec<Matched>)> =
        alerts.iter().map(|a| (a, set.evaluate(a))).collect();
    if as_json {
        let report: Vec<_> = results
            .iter()
            .map(|(alert, matches)| {
                let matches: Vec<_> = matches
                    .iter()
                    .map(|m| match &m.plan {
                        Ok(plan) => json!({ "playbook": m.playbook.name, "dry_run": m.playbook.dry_run, "plan": plan }),
                        Err(e) => json!({ "playbook": m.playbook.name, "error": e }),
                    })
                    .collect();
                json!({ "alert": alert, "matches": matches })
            })
            .collect();
        return writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    }
    for (alert, matches) in &results {
        print_alert(alert, matches, out)?;
    }
    Ok(())
}

fn print_alert(
    alert: &Alert,
    matches: &[Matched],
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
    if matches.is_empty() {
        writeln!(out, "  no playbook matches")?;
    }
    for m in matches {
        let name = &m.playbook.name;
        let plan = match &m.plan {
            Ok(plan) => plan,
            Err(e) => {
                writeln!(
                    out,
                    "  playbook {name}: matches, but cannot be planned: {e}"
                )?;
                continue;
            }
        };
        let dry = if m.playbook.dry_run { " (dry run)" } else { "" };
        writeln!(out, "  playbook {name}{dry} would run:")?;
        for (k, v) in &plan.params {
            writeln!(out, "    param {k} = {v}")?;
        }
        for (i, s) in plan.steps.iter().enumerate() {
            writeln!(
                out,
                "    {}. {} [{}] on_failure={}",
                i + 1,
                s.name,
                s.action,
                s.on_failure.as_str()
            )?;
            for (k, v) in s.args.as_object().into_iter().flatten() {
                let shown = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                writeln!(out, "         {k}: {shown}")?;
            }
        }
    }
    Ok(())
}
