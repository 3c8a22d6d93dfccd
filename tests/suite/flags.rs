//! Feature-flag providers, each checked against a local receiver for the exact request its
//! real API documents (or, for flagd, against the fake Kubernetes API server).

use crate::common::fake_kube::FakeKube;
use crate::common::receiver::Receiver;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use reflex::executors::{ExecError, Executors};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

const TOKEN: &str = "xoxb-test-token";

fn executors(yaml: &str) -> Executors {
    let cfg = reflex::config::Config::parse(yaml).unwrap();
    Executors::from_config(&cfg, Arc::new(reflex::playbook::script::Sandbox::new()))
}

async fn run(ex: &Executors, action: &str, provider: &str, flag: &str) -> Result<Value, ExecError> {
    let ctx = crate::common::step_context(
        json!({"provider": provider, "flag": flag}),
        Duration::from_secs(10),
    );
    let action = reflex::playbook::actions::Action::parse(action).unwrap();
    ex.get(action).unwrap().execute(&ctx).await
}

#[tokio::test]
async fn unleash_launchdarkly_and_http_get_the_requests_their_apis_document() {
    let rx = Receiver::start().await;
    let ex = executors(&format!(
        "feature_flags:\n\
         \x20 unleash: {{ type: unleash, url: \"{b}\", token_env: REFLEX_TEST_TOKEN, environment: production }}\n\
         \x20 ld: {{ type: launchdarkly, url: \"{b}\", token_env: REFLEX_TEST_TOKEN, project: shop, environment: production }}\n\
         \x20 custom: {{ type: http, url: \"{b}/flags/{{flag}}/{{action}}\", token_env: REFLEX_TEST_TOKEN }}\n",
        b = rx.base
    ));
    run(&ex, "feature_flag.disable", "unleash", "checkout-v2")
        .await
        .unwrap();
    run(&ex, "feature_flag.enable", "unleash", "checkout-v2")
        .await
        .unwrap();
    run(&ex, "feature_flag.disable", "ld", "checkout-v2")
        .await
        .unwrap();
    let out = run(&ex, "feature_flag.disable", "custom", "checkout-v2")
        .await
        .unwrap();
    assert_eq!(out["after"]["enabled"], false);

    let r = rx.requests();
    assert_eq!(r.len(), 4);
    // Unleash admin API: environment off / on, token as is in Authorization.
    assert_eq!(
        (r[0].method.as_str(), r[0].path.as_str()),
        (
            "POST",
            "/api/admin/projects/default/features/checkout-v2/environments/production/off"
        )
    );
    assert_eq!(r[0].header("authorization"), Some(TOKEN));
    assert_eq!(
        r[1].path,
        "/api/admin/projects/default/features/checkout-v2/environments/production/on"
    );
    // LaunchDarkly: semantic patch.
    assert_eq!(
        (r[2].method.as_str(), r[2].path.as_str()),
        ("PATCH", "/api/v2/flags/shop/checkout-v2")
    );
    assert_eq!(
        r[2].header("content-type"),
        Some("application/json; domain-model=launchdarkly.semanticpatch")
    );
    assert_eq!(r[2].header("authorization"), Some(TOKEN));
    assert_eq!(
        r[2].body,
        json!({"environmentKey": "production", "instructions": [{"kind": "turnFlagOff"}], "comment": "reflex remediation"})
    );
    // Generic HTTP.
    assert_eq!(
        (r[3].method.as_str(), r[3].path.as_str()),
        ("POST", "/flags/checkout-v2/disable")
    );
    assert_eq!(r[3].body, json!({"flag": "checkout-v2", "enabled": false}));
}

#[tokio::test]
async fn provider_errors_unknown_providers_and_hostile_keys_fail_clearly() {
    let rx = Receiver::start().await;
    rx.answer(500, &[], "backend down");
    let ex = executors(&format!(
        "feature_flags:\n  unleash: {{ type: unleash, url: \"{}\", environment: production }}\n",
        rx.base
    ));
    let err = run(&ex, "feature_flag.disable", "unleash", "checkout-v2")
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("HTTP 500") && err.to_string().contains("backend down"),
        "{err}"
    );
    let err = run(&ex, "feature_flag.disable", "nope", "checkout-v2")
        .await
        .unwrap_err();
    assert!(matches!(err, ExecError::Refused(_)), "{err:?}");
    let err = run(&ex, "feature_flag.disable", "unleash", "../../admin")
        .await
        .unwrap_err();
    assert!(matches!(err, ExecError::Refused(_)), "{err:?}");
    assert_eq!(rx.requests().len(), 1, "nothing sent for refused steps");
}

#[tokio::test]
async fn flagd_flags_in_a_configmap_are_set_disabled() {
    let fake = FakeKube::start(Some(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/base/rbac.yaml"),
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let admin = kube::config::Kubeconfig::read_from(fake.admin_kubeconfig(dir.path())).unwrap();
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(admin, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap();
    let flags = json!({"flags": {"checkout-v2": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on"}}});
    let cm: ConfigMap = serde_json::from_value(
        json!({"metadata": {"name": "flagd"}, "data": {"flags.json": flags.to_string()}}),
    )
    .unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), "flags")
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    let ex = executors(&format!(
        "kubernetes:\n  clusters:\n    c: {{ kubeconfig: {} }}\nfeature_flags:\n  flagd: {{ type: flagd_configmap, namespace: flags, configmap: flagd, key: flags.json }}\n",
        fake.kubeconfig(dir.path()).display()
    ));
    fake.inject_conflicts(1);
    let out = run(&ex, "feature_flag.disable", "flagd", "checkout-v2")
        .await
        .unwrap();
    assert_eq!(out["before"]["state"], "ENABLED");
    assert_eq!(out["after"]["state"], "DISABLED");
    let cm = Api::<ConfigMap>::namespaced(client, "flags")
        .get("flagd")
        .await
        .unwrap();
    let doc: Value = serde_json::from_str(&cm.data.unwrap()["flags.json"]).unwrap();
    assert_eq!(doc["flags"]["checkout-v2"]["state"], "DISABLED");
    assert_eq!(
        doc["flags"]["checkout-v2"]["variants"],
        json!({"on": true, "off": false}),
        "the rest is untouched"
    );
    let out = run(&ex, "feature_flag.disable", "flagd", "checkout-v2")
        .await
        .unwrap();
    assert_eq!(out["changed"], false);
}

#[tokio::test]
async fn a_flag_key_of_dots_from_an_alert_reaches_no_provider_url() {
    let rx = Receiver::start().await;
    let app = crate::common::TestApp::builder()
        .example_playbooks()
        .config(&format!(
            "feature_flags:\n  flags: {{ type: unleash, url: \"{}\", token_env: REFLEX_TEST_TOKEN, environment: production }}\n",
            rx.base
        ))
        .start()
        .await;
    for (i, key) in ["..", ".", "..."].iter().enumerate() {
        let alert =
            json!({"labels": {"alertname": "FeatureFailing", "flag": key, "i": i.to_string()}});
        let id = app.start_run_for(&alert).await;
        let run = app.wait_run_state(id, "failed").await;
        let error = run["steps"][0]["error"].as_str().unwrap();
        assert!(error.contains("not a valid flag key"), "{key}: {error}");
    }
    assert!(rx.requests().is_empty(), "{:?}", rx.requests());
}
