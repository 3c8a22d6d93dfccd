//! `feature_flag.disable` / `.enable`: turn a flag off (or on) at its provider — Unleash,
//! LaunchDarkly, a flagd/OpenFeature flag source held in a ConfigMap, or any HTTP endpoint.
//! Providers and their tokens are defined in reflex.yaml; a playbook only names them.

use super::kube::KubeExecutor;
use super::{ExecError, Executor, StepContext};
use crate::config::{FlagKind, FlagProvider};
use crate::playbook::actions::FlagArgs;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Flag keys: what the providers accept in a URL path without escaping.
fn valid_flag(s: &str) -> bool {
    // `.` and `..` would be path segments of their own: another URL path at the provider.
    !s.chars().all(|c| c == '.')
        && s.len() <= 256
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The flag executor.
pub struct FlagExecutor {
    providers: BTreeMap<String, FlagProvider>,
    kube: Arc<KubeExecutor>,
    http: reqwest::Client,
}

impl FlagExecutor {
    /// With the configured providers; ConfigMap providers go through the kube executor.
    pub fn new(providers: BTreeMap<String, FlagProvider>, kube: Arc<KubeExecutor>) -> Self {
        FlagExecutor {
            providers,
            kube,
            http: super::upstream_client(None),
        }
    }

    fn provider(&self, a: &FlagArgs) -> Result<&FlagProvider, ExecError> {
        if !valid_flag(&a.flag) {
            return Err(ExecError::Refused(format!(
                "flag {:?} is not a valid flag key",
                a.flag
            )));
        }
        self.providers.get(&a.provider).ok_or_else(|| {
            ExecError::Refused(format!(
                "feature-flag provider {:?} is not configured (feature_flags:)",
                a.provider
            ))
        })
    }

    async fn send(
        &self,
        p: &FlagProvider,
        req: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<Value, ExecError> {
        let token = p
            .token()
            .map_err(|e| ExecError::Failed(format!("{what}: token: {e}")))?;
        let req = match token {
            Some(t) => req.header(reqwest::header::AUTHORIZATION, t),
            None => req,
        };
        let resp = req
            .timeout(std::time::Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| ExecError::Failed(format!("{what}: {}", e.without_url())))?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(ExecError::Failed(format!(
                "{what}: HTTP {}: {}",
                status.as_u16(),
                body.chars().take(500).collect::<String>()
            )));
        }
        Ok(json!({ "status": status.as_u16() }))
    }

    async fn set(&self, a: FlagArgs, on: bool) -> Result<Value, ExecError> {
        let p = self.provider(&a)?;
        let what = format!("flag {} at {}", a.flag, a.provider);
        let url = |default: &str| {
            p.url
                .clone()
                .unwrap_or_else(|| default.to_string())
                .trim_end_matches('/')
                .to_string()
        };
        let result = match p.kind {
            FlagKind::Unleash => {
                let project = p.project.as_deref().unwrap_or("default");
                let env = p.environment.as_deref().ok_or_else(|| {
                    ExecError::InvalidArgs(format!("{what}: provider needs an environment"))
                })?;
                let verb = if on { "on" } else { "off" };
                let u = format!(
                    "{}/api/admin/projects/{project}/features/{}/environments/{env}/{verb}",
                    url(""),
                    a.flag
                );
                self.send(p, self.http.post(u), &what).await?
            }
            FlagKind::Launchdarkly => {
                let project = p.project.as_deref().ok_or_else(|| {
                    ExecError::InvalidArgs(format!("{what}: provider needs a project"))
                })?;
                let env = p.environment.as_deref().ok_or_else(|| {
                    ExecError::InvalidArgs(format!("{what}: provider needs an environment"))
                })?;
                let u = format!(
                    "{}/api/v2/flags/{project}/{}",
                    url("https://app.launchdarkly.com"),
                    a.flag
                );
                let kind = if on { "turnFlagOn" } else { "turnFlagOff" };
                let body = json!({ "environmentKey": env, "instructions": [{ "kind": kind }], "comment": "reflex remediation" });
                let req = self
                    .http
                    .patch(u)
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/json; domain-model=launchdarkly.semanticpatch",
                    )
                    .body(body.to_string());
                self.send(p, req, &what).await?
            }
            FlagKind::Http => {
                let template = p.url.as_deref().ok_or_else(|| {
                    ExecError::InvalidArgs(format!("{what}: provider needs a url"))
                })?;
                let u = template
                    .replace("{flag}", &a.flag)
                    .replace("{action}", if on { "enable" } else { "disable" });
                let method =
                    reqwest::Method::from_bytes(p.method.as_deref().unwrap_or("POST").as_bytes())
                        .map_err(|_| ExecError::InvalidArgs(format!("{what}: invalid method")))?;
                let body = json!({ "flag": a.flag, "enabled": on });
                self.send(p, self.http.request(method, u).json(&body), &what)
                    .await?
            }
            FlagKind::FlagdConfigmap => return self.flagd(p, &a, on, &what).await,
        };
        Ok(
            json!({ "provider": a.provider, "flag": a.flag, "after": { "enabled": on }, "response": result }),
        )
    }

    /// flagd definitions in a ConfigMap key: the flag's `state` becomes DISABLED (or ENABLED),
    /// written back with the resourceVersion read (409: read again, bounded).
    async fn flagd(
        &self,
        p: &FlagProvider,
        a: &FlagArgs,
        on: bool,
        what: &str,
    ) -> Result<Value, ExecError> {
        let need = |v: &Option<String>, field: &str| {
            v.clone()
                .ok_or_else(|| ExecError::InvalidArgs(format!("{what}: provider needs {field}")))
        };
        let (ns, name, key) = (
            need(&p.namespace, "namespace")?,
            need(&p.configmap, "configmap")?,
            need(&p.key, "key")?,
        );
        let api: Api<ConfigMap> =
            Api::namespaced(self.kube.client(p.cluster.as_deref()).await?, &ns);
        let state = if on { "ENABLED" } else { "DISABLED" };
        for _ in 0..5 {
            let mut cm = api
                .get(&name)
                .await
                .map_err(|e| ExecError::Failed(format!("{what}: configmap {ns}/{name}: {e}")))?;
            let data = cm.data.get_or_insert_with(Default::default);
            let text = data.get(&key).ok_or_else(|| {
                ExecError::Failed(format!("{what}: configmap {ns}/{name} has no key {key}"))
            })?;
            let mut doc: Value = serde_json::from_str(text)
                .map_err(|e| ExecError::Failed(format!("{what}: {key} is not JSON: {e}")))?;
            let flag = doc
                .get_mut("flags")
                .and_then(|f| f.get_mut(&a.flag))
                .ok_or_else(|| {
                    ExecError::Failed(format!("{what}: no flag {:?} in {ns}/{name}", a.flag))
                })?;
            let before = flag["state"].clone();
            if before == state {
                return Ok(
                    json!({ "provider": a.provider, "flag": a.flag, "before": { "state": before }, "after": { "state": state }, "changed": false }),
                );
            }
            flag["state"] = json!(state);
            data.insert(
                key.clone(),
                serde_json::to_string_pretty(&doc).unwrap_or_default(),
            );
            match api.replace(&name, &PostParams::default(), &cm).await {
                Ok(_) => {
                    return Ok(
                        json!({ "provider": a.provider, "flag": a.flag, "before": { "state": before }, "after": { "state": state }, "changed": true }),
                    );
                }
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => {
                    return Err(ExecError::Failed(format!(
                        "{what}: configmap {ns}/{name}: {e}"
                    )));
                }
            }
        }
        Err(ExecError::Failed(format!(
            "{what}: configmap {ns}/{name} kept changing (409) while writing"
        )))
    }
}

/// `feature_flag.disable` (false) or `.enable` (true).
pub struct FlagAction(pub Arc<FlagExecutor>, pub bool);

#[async_trait::async_trait]
impl Executor for FlagAction {
    fn validate(&self, ctx: &StepContext) -> Result<(), ExecError> {
        self.0.provider(&ctx.args()?).map(drop)
    }

    async fn execute(&self, ctx: &StepContext) -> Result<Value, ExecError> {
        self.0.set(ctx.args()?, self.1).await
    }
}
