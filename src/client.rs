//! The operator commands (`reflex runs`, `approve`, `kill`, …): a thin client of the HTTP API.

use reqwest::Method;
use serde_json::Value;
use std::time::Duration;

/// Why an operator command failed; each kind has its own exit code (README, "Exit codes").
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached (exit 3).
    #[error("{0}")]
    Unreachable(String),
    /// 401 or 403 (exit 4).
    #[error("{0}")]
    Auth(String),
    /// 404 (exit 5).
    #[error("{0}")]
    NotFound(String),
    /// 409: the request conflicts with the run's or approval's state (exit 6).
    #[error("{0}")]
    Conflict(String),
    /// Any other refusal or failure (exit 1).
    #[error("{0}")]
    Other(String),
}

impl ClientError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Other(_) => 1,
            ClientError::Unreachable(_) => 3,
            ClientError::Auth(_) => 4,
            ClientError::NotFound(_) => 5,
            ClientError::Conflict(_) => 6,
        }
    }
}

/// An API client.
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// `base` like `http://127.0.0.1:9095`; `token` from `REFLEX_TOKEN` or `--token-file`.
    pub fn new(base: &str, token: Option<String>) -> Result<Client, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ClientError::Other(e.to_string()))?;
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    /// Calls the API; a non-2xx answer becomes its error message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        // Mutating calls are JSON even when they carry nothing (the API refuses others).
        match body {
            Some(b) => req = req.json(&b),
            None if method != Method::GET => req = req.json(&serde_json::json!({})),
            None => {}
        }
        let resp = req.send().await.map_err(|e| {
            let cause = std::error::Error::source(&e).map_or(e.to_string(), |c| c.to_string());
            ClientError::Unreachable(format!(
                "cannot reach {}: {cause}; is `reflex serve` running there? (--server or REFLEX_SERVER)",
                self.base
            ))
        })?;
        let status = resp.status();
        let value: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(value);
        }
        let msg = value["error"]["message"].as_str().unwrap_or("no message");
        let hint = match (status.as_u16(), &self.token) {
            (401, None) => "; set REFLEX_TOKEN (or --token-file) to an API token",
            (401, Some(_)) => "; the token (REFLEX_TOKEN or --token-file) was not accepted",
            (403, _) => "; the token (REFLEX_TOKEN or --token-file) lacks the role for this",
            _ => "",
        };
        let mut text = format!("{} {msg}{hint}", status.as_u16());
        // Every problem the server listed (a rejected reload: each error with file:line).
        for d in value["error"]["details"].as_array().into_iter().flatten() {
            text.push_str(&format!("\n  {}", d.as_str().unwrap_or_default()));
        }
        Err(match status.as_u16() {
            401 | 403 => ClientError::Auth(text),
            404 => ClientError::NotFound(text),
            409 => ClientError::Conflict(text),
            _ => ClientError::Other(text),
        })
    }
}

/// A table: a header and rows, each column as wide as its widest cell; unless `wide`,
/// cells past a column's limit are cut with an ellipsis (the last column is never padded).
fn table(columns: &[(&str, usize)], rows: Vec<Vec<String>>, wide: bool) -> String {
    let cells: Vec<Vec<String>> =
        std::iter::once(columns.iter().map(|c| c.0.to_string()).collect())
            .chain(rows.into_iter().map(|row| {
                row.into_iter()
                    .zip(columns)
                    .map(|(cell, (_, max))| {
                        // One line per row, whatever the value holds.
                        let cell = cell.replace(['\n', '\r', '\t'], " ");
                        if wide {
                            cell
                        } else {
                            crate::text::truncate(&cell, *max)
                        }
                    })
                    .collect()
            }))
            .collect();
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in cells {
        let last = row.len() - 1;
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                out.push_str(cell);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push('\n');
    }
    out
}

/// One line per run: id, state, playbook, target, created, and why it was held back or failed.
pub fn format_runs(page: &Value, wide: bool) -> String {
    let text = |r: &Value, k: &str| r[k].as_str().unwrap_or("").to_string();
    let rows = (page["runs"].as_array().into_iter().flatten())
        .map(|r| {
            let why = r["reason"].as_str().or(r["error"].as_str()).unwrap_or("");
            vec![
                r["id"].as_i64().unwrap_or(0).to_string(),
                text(r, "state"),
                text(r, "playbook"),
                text(r, "target"),
                text(r, "created_at"),
                why.to_string(),
            ]
        })
        .collect();
    let columns = [
        ("ID", 10),
        ("STATE", 18),
        ("PLAYBOOK", 24),
        ("TARGET", 28),
        ("CREATED", 24),
        ("WHY", 60),
    ];
    table(&columns, rows, wide)
}

/// One block per approval: id, run, what it covers, how many approvals, expiry.
pub fn format_approvals(list: &Value) -> String {
    let mut out = String::new();
    for a in list.as_array().into_iter().flatten() {
        out.push_str(&format!(
            "approval {} [{}] run {} playbook {} step {:?}: {}/{} approvals, expires {}\n  action: {}\n",
            a["id"],
            a["state"].as_str().unwrap_or(""),
            a["run_id"],
            a["playbook"].as_str().unwrap_or(""),
            a["step_name"].as_str().unwrap_or(""),
            a["approvals"].as_array().map_or(0, Vec::len),
            a["required"],
            a["expires_at"].as_str().unwrap_or(""),
            a["action"]
        ));
        for e in a["evidence"].as_array().into_iter().flatten() {
            out.push_str(&evidence_lines(e));
        }
    }
    if out.is_empty() {
        out.push_str("no approvals\n");
    }
    out
}

/// An audit row as a CloudEvents 1.0 event (structured JSON): `id` the row's, `source` the
/// Reflex that recorded it, `type` `io.reflex.audit.<action>`, `time` when; the row is `data`.
pub fn audit_cloudevent(row: &Value, server: &str) -> Value {
    let mut event = serde_json::json!({
        "specversion": "1.0",
        "id": row["id"].to_string(),
        "source": server,
        "type": format!("io.reflex.audit.{}", row["action"].as_str().unwrap_or("unknown")),
        "time": row["at"],
        "datacontenttype": "application/json",
        "data": row,
    });
    // An optional attribute is left out, never null.
    if let Some(target) = row["target"].as_str() {
        event["subject"] = target.into();
    }
    event
}

/// Lines of an evidence summary shown under an approval; the rest is in the run.
const EVIDENCE_LINES: usize = 5;

/// What an evidence step found, indented under its approval: its first lines and its
/// artifacts' URLs. Control characters (a terminal escape in a log line) are shown, not sent.
fn evidence_lines(e: &Value) -> String {
    let text = |v: &Value| terminal_safe(v.as_str().unwrap_or(""));
    let mut out = format!(
        "  evidence: {} ({})\n",
        text(&e["step"]),
        text(&e["action"])
    );
    let summary = e["summary"].as_str().unwrap_or("");
    for line in summary.lines().take(EVIDENCE_LINES) {
        out.push_str(&format!("    | {}\n", terminal_safe(line)));
    }
    let more = summary.lines().count().saturating_sub(EVIDENCE_LINES);
    if more > 0 {
        out.push_str(&format!("    | ({more} more lines)\n"));
    }
    for f in e["artifacts"].as_array().into_iter().flatten() {
        out.push_str(&format!("    artifact: {}\n", text(&f["url"])));
    }
    out
}

/// Text with its control characters written out (`\u{1b}`), so that what came from an alert
/// or a log cannot move the cursor, recolour or retitle the operator's terminal.
pub fn terminal_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() || crate::notify::is_bidi_control(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A run and its steps, one line each.
pub fn format_run(r: &Value) -> String {
    let mut out = format!(
        "run {} [{}] playbook {} target {}\n  created {}",
        r["id"],
        r["state"].as_str().unwrap_or(""),
        r["playbook"].as_str().unwrap_or(""),
        r["target"].as_str().unwrap_or(""),
        r["created_at"].as_str().unwrap_or(""),
    );
    if let Some(f) = r["finished_at"].as_str() {
        out.push_str(&format!(", finished {f}"));
    }
    for (key, label) in [
        ("triggered_by", "triggered by"),
        ("retry_of", "retry of run"),
    ] {
        if !r[key].is_null() {
            out.push_str(&format!(
                ", {label} {}",
                r[key].to_string().trim_matches('"')
            ));
        }
    }
    out.push('\n');
    for (key, label) in [("reason", "reason"), ("error", "error")] {
        if let Some(t) = r[key].as_str() {
            out.push_str(&format!("  {label}: {t}\n"));
        }
    }
    for s in r["steps"].as_array().into_iter().flatten() {
        out.push_str(&format_step(s));
    }
    out
}

/// One step: index, state, name, action, and its error or summary.
pub fn format_step(s: &Value) -> String {
    let verifying = &s["output"]["verifying"];
    let left = verifying["left_seconds"].as_u64().map(|left| {
        let left = crate::time::format_duration(std::time::Duration::from_secs(left));
        let window = verifying["for"].as_str().unwrap_or("?");
        format!(": verifying, {left} left of {window}")
    });
    let detail = s["error"]
        .as_str()
        .map(|e| format!(": {e}"))
        .or_else(|| s["output"]["summary"].as_str().map(|m| format!(": {m}")))
        .or(left)
        .unwrap_or_default();
    format!(
        "  {:>2}. {:<12} {} ({}){detail}\n",
        s["idx"].as_i64().unwrap_or(0) + 1,
        s["state"].as_str().unwrap_or(""),
        s["name"].as_str().unwrap_or(""),
        s["action"].as_str().unwrap_or(""),
    )
}

/// One line per playbook: name, file, matchers.
pub fn format_playbooks(list: &Value) -> String {
    let mut out = format!(
        "{:<28} {:<36} {:<22} {}\n",
        "NAME", "FILE", "AUTONOMY", "MATCHERS"
    );
    for p in list.as_array().into_iter().flatten() {
        let matchers: Vec<&str> = (p["matchers"].as_array().into_iter().flatten())
            .filter_map(Value::as_str)
            .collect();
        let a = &p["autonomy"];
        let autonomy = match a["level"].as_str() {
            Some("approve") => format!("approve {}/{}", a["streak"], a["rules"]["approve_until"]),
            Some("auto") => format!("auto ({} failed)", a["failures"]),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "{:<28} {:<36} {:<22} {}\n",
            p["name"].as_str().unwrap_or(""),
            p["file"].as_str().unwrap_or(""),
            autonomy,
            matchers.join(", ")
        ));
    }
    out
}

/// One line per audit entry: time, actor, action, target, outcome, and its detail (a kill
/// switch's reason, a comment, why a request was refused).
pub fn format_audit(list: &Value, wide: bool) -> String {
    let text = |a: &Value, k: &str| a[k].as_str().unwrap_or("").to_string();
    let rows = (list.as_array().into_iter().flatten())
        .map(|a| {
            vec![
                text(a, "at"),
                text(a, "actor"),
                text(a, "action"),
                text(a, "target"),
                text(a, "outcome"),
                text(a, "detail"),
            ]
        })
        .collect();
    let columns = [
        ("AT", 24),
        ("ACTOR", 20),
        ("ACTION", 24),
        ("TARGET", 30),
        ("OUTCOME", 8),
        ("DETAIL", 80),
    ];
    table(&columns, rows, wide)
}

/// What a trigger or a retry recorded: `run 12 created`, with the reason when held back.
pub fn format_outcome(v: &Value) -> String {
    let why = ["reason", "error"]
        .iter()
        .find_map(|k| v[k].as_str())
        .map_or(String::new(), |r| format!(": {r}"));
    format!(
        "run {} {}{why}\n",
        v["run_id"],
        v["outcome"].as_str().unwrap_or("?")
    )
}

/// One line per kill switch: scope, state, who, why, until.
pub fn format_switches(v: &Value) -> String {
    let mut out = String::new();
    for s in std::iter::once(&v["global"]).chain(v["playbooks"].as_array().into_iter().flatten()) {
        let state = if s["engaged"] == true {
            "ENGAGED"
        } else {
            "released"
        };
        out.push_str(&format!(
            "{:<28} {state}",
            s["scope"].as_str().unwrap_or("")
        ));
        if let Some(actor) = s["actor"].as_str() {
            out.push_str(&format!(" by {actor}"));
        }
        if let Some(reason) = s["reason"].as_str() {
            out.push_str(&format!(": {reason}"));
        }
        if let Some(until) = s["until"].as_str() {
            out.push_str(&format!(" (until {until})"));
        }
        out.push('\n');
    }
    out
}

/// Whether a run's state is final.
pub fn is_final(state: &str) -> bool {
    !matches!(
        state,
        "pending" | "running" | "cancelling" | "awaiting_approval"
    )
}

#[cfg(test)]
mod table_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_step_in_its_verification_window_says_how_long_it_has_left() {
        let step = json!({"idx": 0, "state": "running", "name": "check", "action": "verify",
            "output": {"verifying": {"for": "10m", "until": "2026-12-05T10:10:00.000Z", "left_seconds": 250}}});
        assert_eq!(
            format_step(&step),
            "   1. running      check (verify): verifying, 4m 10s left of 10m\n"
        );
    }

    #[test]
    fn runs_say_why_and_long_values_are_cut_unless_wide() {
        let target = format!("prod/{}", "x".repeat(60));
        let page = json!({"runs": [
            {"id": 7, "state": "suppressed", "playbook": "disk-cleanup", "target": "db-1",
             "created_at": "2026-12-04T23:00:00.000Z", "reason": "kill switch (global) engaged by alice: INC-4711"},
            {"id": 8, "state": "failed", "playbook": "rollback", "target": target,
             "created_at": "2026-12-04T23:01:00.000Z", "error": "step \"undo\" failed: refused: namespace\nkube-system"},
        ]});
        let t = format_runs(&page, false);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(
            lines[0].starts_with("ID") && lines[0].ends_with("WHY"),
            "{t}"
        );
        assert!(
            lines[1].ends_with("kill switch (global) engaged by alice: INC-4711"),
            "{t}"
        );
        assert!(
            lines[2].contains("refused: namespace kube-system"),
            "one line: {t}"
        );
        assert!(!t.contains(&target) && t.contains('…'), "cut: {t}");
        // Columns line up: the state starts at the same place on every line.
        let at = |l: &str, word: &str| l.find(word).unwrap();
        assert_eq!(at(lines[0], "STATE"), at(lines[1], "suppressed"));
        assert_eq!(at(lines[1], "suppressed"), at(lines[2], "failed"));
        assert!(
            format_runs(&page, true).contains(&target),
            "whole with -o wide"
        );
    }

    #[test]
    fn audit_rows_keep_their_detail() {
        let rows = json!([{"at": "2026-12-04T23:00:00.000Z", "actor": "alice",
            "action": "killswitch.engage", "target": "global", "outcome": "ok",
            "detail": "INC-4711: bad deploy, hands off"}]);
        let t = format_audit(&rows, false);
        assert!(t.lines().next().unwrap().ends_with("DETAIL"), "{t}");
        assert!(t.contains("INC-4711: bad deploy, hands off"), "{t}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn approvals_show_their_evidence_briefly_and_no_terminal_escape_gets_through() {
        let summary: String = (1..=8).map(|i| format!("line {i}\n")).collect();
        let list = json!([{
            "id": 3, "state": "pending", "run_id": 7, "playbook": "rollback", "step_name": "roll",
            "approvals": [], "required": 1, "expires_at": "2026-12-05T10:00:00.000Z", "action": {},
            "evidence": [{
                "step": "logs", "action": "kube.logs",
                "summary": format!("\u{1b}]0;pwned\u{7}{summary}"),
                "artifacts": [{"url": "/api/v1/runs/7/artifacts/logs-logs.txt"}],
            }],
        }]);
        let out = format_approvals(&list);
        assert!(
            out.contains("  evidence: logs (kube.logs)\n    | \\u{1b}]0;pwned\\u{7}line 1\n"),
            "{out}"
        );
        assert!(out.contains("    | line 5\n    | (3 more lines)\n    artifact: /api/v1/runs/7/artifacts/logs-logs.txt\n"), "{out}");
        assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'));
    }
}
