//! Where a secret comes from, for every config section that names one. Below the components
//! that use it (auth, chat, sinks, credentials, the store), like [`crate::time`].

use std::path::PathBuf;

/// Where a secret comes from: written in the config, an environment variable, or a file. A
/// file is read each time it is needed, so a rotated file is picked up; surrounding white
/// space is trimmed. Config sections name it with the fields `x`, `x_env` and `x_file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// Written in the config (discouraged for anything secret).
    Value(String),
    /// An environment variable.
    Env(String),
    /// A file.
    File(PathBuf),
}

impl SecretRef {
    /// From a section's `what`, `what_env` and `what_file` fields: at most one may be given.
    pub fn from_fields(
        what: &str,
        value: &Option<String>,
        env: &Option<String>,
        file: &Option<PathBuf>,
    ) -> Result<Option<SecretRef>, String> {
        match (value, env, file) {
            (None, None, None) => Ok(None),
            (Some(v), None, None) => Ok(Some(SecretRef::Value(v.clone()))),
            (None, Some(var), None) => Ok(Some(SecretRef::Env(var.clone()))),
            (None, None, Some(path)) => Ok(Some(SecretRef::File(path.clone()))),
            _ => Err(format!("give only one of {what}, {what}_env, {what}_file")),
        }
    }

    /// The secret, read now. An empty (or white-space only) secret is an error: an empty
    /// token would let anyone in with an empty password, an empty signing key would let
    /// anyone sign.
    pub fn read(&self) -> Result<String, String> {
        let (secret, source) = match self {
            SecretRef::Value(v) => (
                v.trim().to_string(),
                "the value written in the config".into(),
            ),
            SecretRef::Env(var) => (
                std::env::var(var)
                    .map(|s| s.trim().to_string())
                    .map_err(|_| format!("environment variable {var} is not set"))?,
                format!("environment variable {var}"),
            ),
            SecretRef::File(path) => (
                std::fs::read_to_string(path)
                    .map(|s| s.trim().to_string())
                    .map_err(|e| format!("{}: {e}", path.display()))?,
                format!("file {}", path.display()),
            ),
        };
        if secret.is_empty() {
            return Err(format!("{source} is empty: a secret must not be empty"));
        }
        Ok(secret)
    }
}
