//! `http`: a generic HTTP request (status pages, ticketing, other tools). Credentials are named
//! in the step and defined in reflex.yaml; their values never reach the run record or logs.

use super::{ExecError, Executor, StepContext};
use crate::config::Credential;
use crate::playbook::actions::HttpArgs;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Response bytes kept in the step output.
const BODY_LIMIT: usize = 64 * 1024;

/// The `http` executor.
pub struct HttpExecutor {
    http: reqwest::Client,
    credentials: BTreeMap<String, Credential>,
}

impl HttpExecutor {
    /// With the credentials steps may name.
    pub fn new(credentials: BTreeMap<String, Credential>) -> Self {
        HttpExecutor {
            http: super::upstream_client(None),
            credentials,
        }
    }

    fn check(&self, args: &HttpArgs) -> Result<reqwest::Method, ExecError> {
        if let Some(name) = &args.credential
            && !self.credentials.contains_key(name)
        {
            return Err(ExecError::Refused(format!(
                "credential {name:?} is not defined in reflex.yaml (credentials:)"
            )));
        }
        if !(args.url.starts_with("http://") || args.url.starts_with("https://")) {
            return Err(ExecError::InvalidArgs(format!(
                "url {:?} must start with http:// or https://",
                args.url
            )));
        }
        reqwest::Method::from_bytes(args.method.to_uppercase().as_bytes())
            .map_err(|_| ExecError::InvalidArgs(format!("invalid method {:?}", args.method)))
    }
}

#[async_trait::async_trait]
impl Executor for HttpExecutor {
    fn validate(&self, ctx: &StepContext) -> Result<(), ExecError> {
        self.check(&ctx.args()?).map(drop)
    }

    async fn execute(&self, ctx: &StepContext) -> Result<Value, ExecError> {
        let args: HttpArgs = ctx.args()?;
        let method = self.check(&args)?;
        let mut req = self.http.request(method, &args.url).timeout(ctx.timeout);
        for (k, v) in &args.headers {
            req = req.header(k, v);
        }
        if let Some(name) = &args.credential {
            let cred = &self.credentials[name];
            let value = cred
                .value()
                .map_err(|e| ExecError::Failed(format!("credential {name:?}: {e}")))?;
            req = req.header(&cred.header, value);
        }
        req = match &args.body {
            None => req,
            Some(Value::String(s)) => req.body(s.clone()),
            Some(v) => req.json(v),
        };
        let resp = req.send().await.map_err(|e| {
            ExecError::Failed(format!("{} {}: {}", args.method, args.url, e.without_url()))
        })?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(BODY_LIMIT)]).into_owned();
        let body = serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text));
        let ok = if args.expect_status.is_empty() {
            (200..300).contains(&status)
        } else {
            args.expect_status.contains(&status)
        };
        if !ok {
            return Err(ExecError::Failed(format!(
                "{} {} answered {status}: {body}",
                args.method, args.url
            )));
        }
        Ok(json!({ "status": status, "body": body }))
    }
}
