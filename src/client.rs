//! The operator commands (`reflex runs`, `approve`, `kill`, …): a thin client of the HTTP API.

use reqwest::Method;
use serde_json::Value;
use std::time::Duration;

/// An API client.
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// `base` like `http://127.0.0.1:9095`; `token` from `REFLEX_TOKEN`.
    pub fn new(base: &str, token: Option<String>) -> Result<Client, String> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| e.to_string())?;
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
    ) -> Result<Value, String> {
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
        let resp = req
            .send()
            .await
            .map_err(|e| format!("cannot reach {}: {e}", self.base))?;
        let status = resp.status();
        let value: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(value);
        }
        let msg = value["error"]["message"].as_str().unwrap_or("no message");
        let hint = match (status.as_u16(), &self.token) {
            (401, None) => "; set REFLEX_TOKEN to an API token",
            (401, Some(_)) => "; the token in REFLEX_TOKEN was not accepted",
            (403, _) => "; the token in REFLEX_TOKEN lacks the role for this",
            _ => "",
        };
        Err(format!("{} {msg}{hint}", status.as_u16()))
    }
}

/// One line per run: id, state, playbook, target, created.
pub fn format_runs(page: &Value) -> String {
    let mut out = format!(
        "{:>6}  {:<18} {:<24} {:<28} {}\n",
        "ID", "STATE", "PLAYBOOK", "TARGET", "CREATED"
    );
    for r in page["runs"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:>6}  {:<18} {:<24} {:<28} {}\n",
            r["id"].as_i64().unwrap_or(0),
            r["state"].as_str().unwrap_or(""),
            r["playbook"].as_str().unwrap_or(""),
            r["target"].as_str().unwrap_or(""),
            r["created_at"].as_str().unwrap_or("")
        ));
    }
    out
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
    }
    if out.is_empty() {
        out.push_str("no approvals\n");
    }
    out
}
