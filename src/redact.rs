//! Keeps configured secrets out of everything Reflex records or sends.
//!
//! Secrets live in reflex.yaml's environment variables and files (credentials, flag provider
//! tokens, chat webhook URLs and tokens), never in playbooks; but an upstream can echo one
//! back (a server that reflects request headers in its error page), and step errors and
//! outputs are stored, served by the API, logged and sent to chat. Every step result passes
//! through [`Redactor::redact_json`] before it is recorded, so a secret's value appears in none
//! of those places.

use crate::config::{Config, SecretRef};
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What replaces a secret.
pub const REDACTED: &str = "[redacted]";

/// Shorter values are not treated as secrets: redacting every "abc" would garble records
/// while protecting nothing.
const MIN_SECRET_LEN: usize = 6;

/// Secrets are read again after this long, so that a rotated file is covered too.
const REFRESH: Duration = Duration::from_secs(30);

/// The configured secrets, and how to remove them from text.
#[derive(Debug, Default)]
pub struct Redactor {
    sources: Vec<SecretRef>,
    cache: Mutex<Option<(Instant, Arc<Vec<String>>)>>,
}

impl Redactor {
    /// Every secret the config names.
    pub fn from_config(cfg: &Config) -> Redactor {
        let mut sources = Vec::new();
        let mut add = |r: Result<Option<SecretRef>, String>| sources.extend(r.ok().flatten());
        for c in cfg.credentials.values() {
            add(c.secret_ref().map(Some));
        }
        for p in cfg.feature_flags.values() {
            add(p.token_ref());
        }
        for s in &cfg.notify.sinks {
            add(SecretRef::from_fields(
                "url",
                &s.url,
                &s.url_env,
                &s.url_file,
            ));
            add(SecretRef::from_fields(
                "token",
                &None,
                &s.token_env,
                &s.token_file,
            ));
        }
        if let Some(app) = &cfg.notify.slack_app {
            add(app.secret_ref().map(Some));
        }
        if let Some(app) = &cfg.notify.mattermost_app {
            add(app.secret_ref().map(Some));
        }
        Redactor {
            sources,
            cache: Mutex::new(None),
        }
    }

    fn secrets(&self) -> Arc<Vec<String>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, secrets)) = cache.as_ref()
            && at.elapsed() < REFRESH
        {
            return secrets.clone();
        }
        let mut secrets: Vec<String> = self
            .sources
            .iter()
            .filter_map(|r| r.read().ok())
            .filter(|s| s.len() >= MIN_SECRET_LEN)
            .flat_map(|s| {
                let encoded =
                    percent_encoding::utf8_percent_encode(&s, percent_encoding::NON_ALPHANUMERIC)
                        .to_string();
                [s, encoded]
            })
            .collect();
        // Longest first, so that a secret containing another is removed whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        let secrets = Arc::new(secrets);
        *cache = Some((Instant::now(), secrets.clone()));
        secrets
    }

    /// The text with every secret replaced by [`REDACTED`].
    pub fn redact(&self, text: &str) -> String {
        redact_with(&self.secrets(), text)
    }

    /// Every string in a JSON value, redacted (the secrets are read once for the whole value).
    pub fn redact_json(&self, value: Value) -> Value {
        let secrets = self.secrets();
        if secrets.is_empty() {
            return value;
        }
        redact_value(&secrets, value)
    }
}

fn redact_with(secrets: &[String], text: &str) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), REDACTED);
        }
    }
    out
}

fn redact_value(secrets: &[String], value: Value) -> Value {
    match value {
        Value::String(s) => Value::String(redact_with(secrets, &s)),
        Value::Array(items) => items
            .into_iter()
            .map(|v| redact_value(secrets, v))
            .collect(),
        Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| (redact_with(secrets, &k), redact_value(secrets, v)))
            .collect(),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_from_the_config_are_removed_from_text_and_json() {
        let cfg = Config::parse(
            "notify:\n  sinks:\n    - { name: s, type: slack, url: \"https://hooks.example/T0/B0/abcdefgh\" }\n",
        )
        .unwrap();
        let r = Redactor::from_config(&cfg);
        assert_eq!(
            r.redact("posting to https://hooks.example/T0/B0/abcdefgh failed"),
            "posting to [redacted] failed"
        );
        let v = r.redact_json(serde_json::json!({"echo": ["https%3A%2F%2Fhooks%2Eexample%2FT0%2FB0%2Fabcdefgh"], "n": 1}));
        assert_eq!(v, serde_json::json!({"echo": ["[redacted]"], "n": 1}));
        assert_eq!(r.redact("nothing secret"), "nothing secret");
    }
}
