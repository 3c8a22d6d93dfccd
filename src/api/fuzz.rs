//! Generated requests against every operation of the OpenAPI document, through the router in
//! process: hostile path parameters, query strings and bodies (random JSON built from the
//! API's own field names, and the bodies each operation accepts with one value replaced),
//! mostly with a token that passes the role check so that the handlers themselves are
//! reached. The console's pages and forms the same way, in an admin's session, with its CSRF
//! token most of the time.
//!
//! Whatever the request: no 5xx (input is never a store failure), a 4xx answers the API's
//! JSON error with a message (the console's HTML page on the console), and a refused request
//! changes nothing but the record of refusals. Cases run one after another on one store, so a
//! case meets what earlier ones left (runs, approvals, an engaged switch); the dispatcher's
//! work is done between cases, so that "changed nothing" is exact.

use super::tests::TestApi;
use axum::http::{Method, StatusCode};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};

/// An operation of the document: method, path template, query parameters.
#[derive(Debug, Clone)]
struct Operation {
    method: Method,
    path: String,
    query: Vec<String>,
}

/// Every operation of the document.
fn operations(doc: &Value) -> Vec<Operation> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let query = (op["parameters"].as_array().into_iter().flatten())
                .filter(|p| p["in"] == "query")
                .map(|p| p["name"].as_str().unwrap().to_string())
                .collect();
            out.push(Operation {
                method: Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                path: path.clone(),
                query,
            });
        }
    }
    out.sort_by(|a, b| (&a.path, a.method.as_str()).cmp(&(&b.path, b.method.as_str())));
    out
}

/// Every property name of the document's schemas, and the fields of alerts: what bodies
/// are built from, so that they often get past "unknown field".
fn field_names(doc: &Value, out: &mut Vec<String>) {
    match doc {
        Value::Object(m) => {
            if let Some(Value::Object(props)) = m.get("properties") {
                out.extend(props.keys().cloned());
            }
            m.values().for_each(|v| field_names(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| field_names(v, out)),
        _ => {}
    }
}

/// Text that has broken parsers and stores before: NUL, lone surrogates' replacement,
/// bidi controls, numbers past i64, durations and times at their edges, the playbooks' names.
const STRINGS: &[&str] = &[
    "",
    " ",
    "\u{0}",
    "a\u{0}b",
    "\u{fffd}",
    "\u{202e}evil",
    "\n",
    "\r\n",
    "'",
    "\"",
    "\\",
    "$(touch /tmp/x)",
    "{{ labels.instance }}",
    "note",
    "gated",
    "flaky",
    "Note",
    "Gated",
    "Flaky",
    "h1",
    "admin",
    "0",
    "1",
    "-1",
    "2",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "1e309",
    "0.5",
    "0s",
    "1h",
    "5m",
    "99999999999h",
    "1ms",
    "2026-11-23T00:00:00Z",
    "2026-11-23T00:00:00+14:00",
    "9999-12-31T23:59:59Z",
    "0000-01-01T00:00:00Z",
    "+275760-09-13T00:00:00Z",
    "pending",
    "running",
    "approved",
    "firing",
    "resolved",
    "../../etc/passwd",
    "%00",
    "é",
    "🔥",
];

/// A JSON value from those strings, numbers at their edges and the API's field names.
fn json_value(names: Vec<String>) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => prop::sample::select(vec![
            json!(0),
            json!(1),
            json!(-1),
            json!(i64::MAX),
            json!(i64::MIN),
            json!(u64::MAX),
            json!(1.5),
            json!(1e300),
            json!(-0.0),
        ]),
        6 => prop::sample::select(STRINGS).prop_map(|s| json!(s)),
        1 => "[ -~]{0,12}".prop_map(Value::String),
        1 => (prop::sample::select(STRINGS), 1..3000_usize).prop_map(|(s, n)| json!(s.repeat(n))),
    ];
    let tree = leaf.clone().prop_recursive(3, 24, 6, move |inner| {
        let names = names.clone();
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        3 => prop::sample::select(names),
                        1 => prop::sample::select(STRINGS).prop_map(String::from),
                    ],
                    inner
                ),
                0..5
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    });
    prop_oneof![2 => leaf, 1 => tree]
}

/// `v` with its `n`th leaf (counted depth first) replaced by `with`; whether there was one.
fn replace_leaf(v: &mut Value, n: &mut usize, with: &Value) -> bool {
    match v {
        Value::Object(m) => m.values_mut().any(|x| replace_leaf(x, n, with)),
        Value::Array(a) => a.iter_mut().any(|x| replace_leaf(x, n, with)),
        leaf => {
            if *n == 0 {
                *leaf = with.clone();
                return true;
            }
            *n -= 1;
            false
        }
    }
}

/// A path parameter, percent-encoded as a client would send it.
fn path_param() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => prop::sample::select(&["note", "gated", "flaky", "1", "2", "3"][..])
            .prop_map(|s| s.to_string()),
        1 => prop::sample::select(STRINGS).prop_map(|s| s.to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => "[ -~]{0,20}",
    ]
    .prop_map(|s| urlencoding(&s))
}

/// Percent-encodes everything but unreserved characters.
fn urlencoding(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One generated request.
#[derive(Debug, Clone)]
struct Case {
    method: Method,
    path: String,
    /// The `Authorization` header.
    authorization: Option<String>,
    content_type: Option<&'static str>,
    body: Vec<u8>,
}

/// Bodies an operation accepts, to replace one value of: the Alertmanager fixture, a generic
/// alert, a switch, a trigger, a decision, a retry, an undo (all of them for the others).
fn seeds(path: &str, fixture: &Value) -> Vec<Value> {
    let all = [
        ("alertmanager", fixture.clone()),
        (
            "generic",
            json!({"labels": {"alertname": "Note", "instance": "h1"},
                   "annotations": {"summary": "s"}, "startsAt": "2026-11-23T00:00:00Z"}),
        ),
        (
            "generic",
            json!({"labels": {"alertname": "Gated", "instance": "h2"}}),
        ),
        (
            "killswitch",
            json!({"engaged": true, "reason": "r", "for": "1h", "replace": true}),
        ),
        ("killswitch", json!({"engaged": false})),
        (
            "killswitch",
            json!({"engaged": true, "reason": "r", "until": "2026-11-23T01:00:00Z"}),
        ),
        (
            "runs",
            json!({"labels": {"instance": "h3"}, "annotations": {"why": "w"}}),
        ),
        ("approve", json!({"comment": "c"})),
        ("deny", json!({"comment": "c"})),
        ("retry", json!({"from_start": true})),
        ("undo", json!({"force": false})),
    ];
    let last = path.rsplit('/').next().unwrap_or_default();
    let mine: Vec<Value> = (all.iter())
        .filter(|(op, _)| *op == last)
        .map(|(_, v)| v.clone())
        .collect();
    if mine.is_empty() {
        all.into_iter().map(|(_, v)| v).collect()
    } else {
        mine
    }
}

/// How many leaves a value has.
fn leaves(v: &Value) -> usize {
    let mut n = usize::MAX;
    replace_leaf(&mut v.clone(), &mut n, &Value::Null);
    usize::MAX - n
}

fn case(ops: Vec<Operation>, names: Vec<String>, fixture: Value) -> impl Strategy<Value = Case> {
    prop::sample::select(ops).prop_flat_map(move |op| {
        let seeded = prop::sample::select(seeds(&op.path, &fixture)).prop_flat_map({
            let names = names.clone();
            move |seed| {
                (0..leaves(&seed), json_value(names.clone())).prop_map(move |(mut n, with)| {
                    let mut v = seed.clone();
                    replace_leaf(&mut v, &mut n, &with);
                    v.to_string().into_bytes()
                })
            }
        });
        let body = prop_oneof![
            2 => json_value(names.clone()).prop_map(|v| v.to_string().into_bytes()),
            4 => seeded,
            1 => prop::collection::vec(any::<u8>(), 0..64),
            1 => Just(b"{}".to_vec()),
        ];
        request(op, body)
    })
}

/// A malformed or foreign `Authorization` header: schemes and their parts missing, basic
/// credentials that are not UTF-8 or have no colon, a token with more after it, 8 KB.
fn authorization() -> impl Strategy<Value = Option<String>> {
    let raw = prop_oneof![
        prop::sample::select(
            &[
                "Bearer",
                "Bearer ",
                "bearer admin-token",
                "Bearer admin-token extra",
                "Bearer  admin-token",
                "Basic",
                "Basic !!!",
                "Token admin-token",
                "Digest username=\"admin\"",
            ][..]
        )
        .prop_map(String::from),
        prop::collection::vec(any::<u8>(), 0..40)
            .prop_map(|b| format!("Basic {}", BASE64.encode(b))),
        (prop::sample::select(STRINGS), prop::sample::select(STRINGS))
            .prop_map(|(u, p)| format!("Basic {}", BASE64.encode(format!("{u}:{p}")))),
        "[ -~]{0,40}".prop_map(|s| format!("Bearer {s}")),
        Just(format!("Bearer {}", "a".repeat(8192))),
    ];
    raw.prop_map(Some)
}

/// A request of `op`: its path's holes filled, a query string of its own parameters and
/// others, a token, a content type, a body.
fn request(op: Operation, body: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Case> {
    let query = prop::collection::vec(
        (
            prop_oneof![
                3 => Just(None),
                1 => prop::sample::select(STRINGS).prop_map(|s| Some(s.to_string())),
            ],
            0..16_usize,
            prop_oneof![
                prop::sample::select(STRINGS).prop_map(|s| s.to_string()),
                any::<i64>().prop_map(|n| n.to_string()),
                "[ -~]{0,12}",
            ],
        ),
        0..4,
    );
    (
        Just(op),
        prop::collection::vec(path_param(), 2),
        query,
        prop_oneof![
            12 => Just(Some("Bearer admin-token".to_string())),
            2 => prop::sample::select(&["Bearer webhook-token", "Bearer viewer-token"][..])
                .prop_map(|a| Some(a.to_string())),
            2 => Just(None),
            1 => Just(Some(format!("Basic {}", BASE64.encode("admin:admin-token")))),
            2 => authorization(),
        ],
        prop_oneof![
            6 => Just(Some("application/json")),
            1 => Just(Some("text/plain")),
            1 => Just(Some("application/x-www-form-urlencoded")),
            1 => Just(None),
        ],
        body,
    )
        .prop_map(|(op, params, query, authorization, content_type, body)| {
            let mut path = op.path.clone();
            for (hole, value) in ["{id}", "{name}"].iter().zip(&params) {
                path = path.replace(hole, value);
            }
            let query: Vec<String> = (query.into_iter())
                .map(|(name, i, value)| {
                    let name = name.unwrap_or_else(|| {
                        op.query
                            .get(i % op.query.len().max(1))
                            .cloned()
                            .unwrap_or_default()
                    });
                    format!("{}={}", urlencoding(&name), urlencoding(&value))
                })
                .collect();
            if !query.is_empty() {
                path = format!("{path}?{}", query.join("&"));
            }
            let reads_body = op.method != Method::GET;
            Case {
                method: op.method,
                path,
                authorization,
                content_type: content_type.filter(|_| reads_body),
                body: if reads_body { body } else { Vec::new() },
            }
        })
}

/// What a request could change, read from the store: rows by table and by state, the
/// switches, and the audit log less its record of refusals.
async fn fingerprint(api: &TestApi) -> Vec<String> {
    (api.store)
        .read(|c| {
            let mut out = Vec::new();
            for table in [
                "alerts",
                "runs",
                "steps",
                "approvals",
                "deferred_alerts",
                "artifacts",
                "autonomy",
                "budget_use",
            ] {
                let n: i64 = c.one(&format!("SELECT count(*) FROM {table}"), &[], |r| r.get(0))?;
                out.push(format!("{table} {n}"));
            }
            for table in ["runs", "steps", "approvals"] {
                let sql = format!("SELECT state, count(*) FROM {table} GROUP BY state ORDER BY state");
                out.extend(c.rows(&sql, &[], |r| {
                    Ok(format!("{table} {}: {}", r.get::<String>(0)?, r.get::<i64>(1)?))
                })?);
            }
            out.extend(c.rows(
                "SELECT scope, engaged, coalesce(reason, ''), coalesce(until, 0) FROM switches ORDER BY scope",
                &[],
                |r| {
                    Ok(format!(
                        "switch {} {} {:?} {}",
                        r.get::<String>(0)?,
                        r.get::<bool>(1)?,
                        r.get::<String>(2)?,
                        r.get::<i64>(3)?
                    ))
                },
            )?);
            let n: i64 = c.one(
                "SELECT count(*) FROM audit WHERE outcome <> 'refused'",
                &[],
                |r| r.get(0),
            )?;
            out.push(format!("audit {n}"));
            Ok(out)
        })
        .await
        .unwrap()
}

/// The fingerprint once every run there is to run has run as far as it goes (a run waiting
/// for approval, or queued behind one on its target, stays).
async fn settled(api: &TestApi) -> Vec<String> {
    api.engine.run_until_idle().await;
    fingerprint(api).await
}

async fn check(api: &TestApi, case: &Case) -> Result<(), TestCaseError> {
    let before = settled(api).await;
    let (status, answer) = api
        .call_raw(
            case.method.clone(),
            &case.path,
            case.authorization.as_deref(),
            case.content_type,
            case.body.clone(),
        )
        .await;
    prop_assert!(
        !status.is_server_error(),
        "{status} {answer} for {} {}",
        case.method,
        case.path
    );
    if status.is_client_error() {
        if status != StatusCode::METHOD_NOT_ALLOWED {
            prop_assert!(
                answer["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{status} without a message: {answer}"
            );
        }
        let after = settled(api).await;
        prop_assert_eq!(before, after, "a {} changed the store", status);
    }
    Ok(())
}

/// A runtime for the cases to run on.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `PROPTEST_CASES` cases (256 by default), none persisted: each meets the store the
/// earlier ones left, so a case alone would not fail the same way.
fn run<S: Strategy>(strategy: S, check: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(e) = runner.run(&strategy, check) {
        panic!("{e}");
    }
}

#[test]
fn no_request_gets_a_server_error_and_a_refused_one_changes_nothing() {
    let rt = runtime();
    let (api, ops, names, fixture) = rt.block_on(async {
        // No dispatcher: `settled` does its work between cases, so that what a case set going
        // has settled before the next one is sent.
        let api = TestApi::new().await;
        // On PostgreSQL a replica claims only while its lease is renewed.
        tokio::spawn(api.engine.clone().keep_lease());
        let gated = json!({"labels": {"alertname": "Gated", "instance": "h1"}}).to_string();
        let out = api.post_alert(&gated).await;
        let run_id = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
        api.engine.run_until_idle().await;
        let run = api.view(&format!("/api/v1/runs/{run_id}")).await;
        assert_eq!(run["state"], "awaiting_approval", "{run}");
        let (_, doc) = api
            .call(Method::GET, "/api/v1/openapi.json", None, None)
            .await;
        // The document's field names, and the alert formats' and labels' own.
        let mut names = Vec::new();
        field_names(&doc, &mut names);
        names.extend(
            [
                "labels",
                "annotations",
                "startsAt",
                "endsAt",
                "status",
                "alerts",
                "receiver",
                "alertname",
                "instance",
            ]
            .map(String::from),
        );
        names.sort();
        names.dedup();
        (api, operations(&doc), names, super::tests::disk_payload())
    });
    assert!(ops.len() >= 20, "{ops:?}");
    run(case(ops, names, fixture), |c| rt.block_on(check(&api, &c)));
}

/// A console request: a page with its query, or a form with its fields.
#[derive(Debug, Clone)]
struct ConsoleCase {
    method: Method,
    path: String,
    form: Vec<(String, String)>,
    /// Whether the session's cookie goes with it.
    session: bool,
    /// The form's content type (a form's, mostly).
    content_type: Option<&'static str>,
}

/// The console's pages (not the live stream, which does not end) and forms, with the fields
/// each form reads (`csrf` first).
const CONSOLE: &[(&str, &str, &[&str])] = &[
    (
        "GET",
        "/ui/runs",
        &["state", "playbook", "target", "before"],
    ),
    ("GET", "/ui/runs/{id}", &[]),
    ("GET", "/ui/runs/{id}/artifacts/{name}", &[]),
    ("GET", "/ui/approvals", &[]),
    ("GET", "/ui/killswitch", &[]),
    ("GET", "/ui/playbooks", &[]),
    ("GET", "/ui/audit", &["before"]),
    ("GET", "/ui/login", &["next"]),
    ("POST", "/ui/runs/{id}/cancel", &["csrf"]),
    ("POST", "/ui/runs/{id}/retry", &["csrf", "from_start"]),
    ("POST", "/ui/runs/{id}/undo", &["csrf"]),
    (
        "POST",
        "/ui/approvals/{id}/decide",
        &["csrf", "decision", "comment"],
    ),
    (
        "POST",
        "/ui/killswitch",
        &["csrf", "scope", "action", "reason", "for"],
    ),
    ("POST", "/ui/playbooks/reload", &["csrf"]),
];

fn console_case(csrf: String) -> impl Strategy<Value = ConsoleCase> {
    let value = || {
        prop_oneof![
            4 => prop::sample::select(STRINGS).prop_map(String::from),
            1 => prop::sample::select(&["approve", "deny", "engage", "release", "global", "on"][..])
                .prop_map(String::from),
            1 => "[ -~]{0,12}",
        ]
    };
    (
        prop::sample::select(CONSOLE),
        prop::collection::vec(path_param(), 2),
        prop::collection::vec(value(), 5),
        prop::collection::vec(any::<bool>(), 5),
        prop_oneof![5 => Just(true), 1 => Just(false)],
        prop_oneof![7 => Just(true), 1 => Just(false)],
        prop_oneof![
            8 => Just(Some("application/x-www-form-urlencoded")),
            1 => Just(Some("text/plain")),
            1 => Just(None),
        ],
    )
        .prop_map(
            move |(
                (method, path, fields),
                params,
                values,
                given,
                real_csrf,
                session,
                content_type,
            )| {
                let mut path = path.to_string();
                for (hole, value) in ["{id}", "{name}"].iter().zip(&params) {
                    path = path.replace(hole, value);
                }
                let pairs: Vec<(String, String)> = (fields.iter().zip(values).zip(given))
                    .filter(|&(_, given)| given)
                    .map(|((f, v), _)| {
                        let v = if *f == "csrf" && real_csrf {
                            csrf.clone()
                        } else {
                            v
                        };
                        (f.to_string(), v)
                    })
                    .collect();
                let method = Method::from_bytes(method.as_bytes()).unwrap();
                let mut form = Vec::new();
                if method == Method::GET {
                    let query: Vec<String> = (pairs.iter())
                        .map(|(k, v)| format!("{k}={}", urlencoding(v)))
                        .collect();
                    if !query.is_empty() {
                        path = format!("{path}?{}", query.join("&"));
                    }
                } else {
                    form = pairs;
                }
                ConsoleCase {
                    method,
                    path,
                    form,
                    session,
                    content_type,
                }
            },
        )
}

/// An admin's console session: its cookie and CSRF token, logged in through the forms.
async fn console_session(api: &TestApi) -> (String, String) {
    let mut browser = super::console::tests::Browser::new(api);
    browser.login("admin").await;
    let csrf = browser.get("/ui/runs").await.csrf();
    (browser.cookie_header(), csrf)
}

async fn check_console(
    api: &TestApi,
    cookie: &str,
    case: &ConsoleCase,
) -> Result<(), TestCaseError> {
    use axum::body::Body;
    use axum::http::{Request, header};
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let before = settled(api).await;
    let mut req = Request::builder()
        .method(case.method.clone())
        .uri(&case.path);
    if case.session {
        req = req.header(header::COOKIE, cookie);
    }
    let body = if case.method == Method::GET {
        String::new()
    } else {
        if let Some(c) = case.content_type {
            req = req.header(header::CONTENT_TYPE, c);
        }
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&case.form)
            .finish()
    };
    let resp = api
        .router
        .clone()
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let page = resp.into_body().collect().await.unwrap().to_bytes();
    let page = String::from_utf8_lossy(&page);
    prop_assert!(!status.is_server_error(), "{status} for {case:?}: {page}");
    if status.is_client_error() {
        prop_assert!(
            page.contains("<html"),
            "{status} is not a console page: {page}"
        );
        let after = settled(api).await;
        prop_assert_eq!(before, after, "a {} changed the store", status);
    }
    Ok(())
}

#[test]
fn no_console_request_gets_a_server_error_and_a_refused_form_changes_nothing() {
    let rt = runtime();
    let (api, cookie, csrf) = rt.block_on(async {
        let api = TestApi::new().await;
        // On PostgreSQL a replica claims only while its lease is renewed.
        tokio::spawn(api.engine.clone().keep_lease());
        let gated = json!({"labels": {"alertname": "Gated", "instance": "h1"}}).to_string();
        api.post_alert(&gated).await;
        api.post_alert(&super::tests::alert("h2")).await;
        api.engine.run_until_idle().await;
        let (cookie, csrf) = console_session(&api).await;
        (api, cookie, csrf)
    });
    run(console_case(csrf), |c| {
        rt.block_on(check_console(&api, &cookie, &c))
    });
}

/// A chat callback: Slack's signed form (`slack`) or Mattermost's JSON, whose payload is
/// a click with one value replaced, or any JSON.
#[derive(Debug, Clone)]
struct ChatCase {
    slack: bool,
    payload: Value,
}

fn chat_case(
    slack_click: Value,
    mattermost_click: Value,
    names: Vec<String>,
) -> impl Strategy<Value = ChatCase> {
    (
        any::<bool>(),
        prop_oneof![4 => Just(true), 1 => Just(false)],
    )
        .prop_flat_map(move |(slack, seeded)| {
            let seed = if slack {
                slack_click.clone()
            } else {
                mattermost_click.clone()
            };
            let payload = if seeded {
                (0..leaves(&seed), json_value(names.clone()))
                    .prop_map(move |(mut n, with)| {
                        let mut v = seed.clone();
                        replace_leaf(&mut v, &mut n, &with);
                        v
                    })
                    .boxed()
            } else {
                json_value(names.clone()).boxed()
            };
            payload.prop_map(move |payload| ChatCase { slack, payload })
        })
}

/// Where a click names the approval waiting now: its id (`"APPROVAL"`, a number in the
/// JSON) and `id:hash` (`VALUE`) or the hash alone (`HASH`).
fn naming(payload: &Value, id: i64, hash: &str) -> Value {
    let text = (payload.to_string())
        .replace("\"APPROVAL\"", &id.to_string())
        .replace("VALUE", &format!("{id}:{hash}"))
        .replace("HASH", hash);
    serde_json::from_str(&text).unwrap()
}

#[test]
fn no_chat_callback_gets_a_server_error_or_decides_unless_it_is_a_mapped_approvers_click() {
    let rt = runtime();
    let section = "notify:\n  slack_app:\n    signing_secret_file: SECRET\n    users: { U1: approver, U2: viewer }\n    response_url_prefix: BASE\n  mattermost_app:\n    callback_url: http://reflex.invalid/api/v1/chat/mattermost/actions\n    secret_file: SECRET\n    users: { mm1: approver, mm2: viewer }\nbreaker: { max_runs: 100000, max_runs_per_playbook: 100000, max_targets: 100000 }\n";
    let (api, id, hash, base, _dir) = rt.block_on(async {
        let (base, _) = super::tests::response_url_receiver().await;
        let section = section.replace("BASE", &base);
        let (api, _, id, hash, dir) = super::tests::chat_api(&section, "s3cret").await;
        tokio::spawn(api.engine.clone().keep_lease());
        (api, id, hash, base, dir)
    });
    // The approval waiting now: a decided one is followed by a new one (the breaker's limits
    // are raised for the runs this takes).
    let waiting = std::sync::Mutex::new((id, hash));
    let slack = super::tests::click("U1", "approve", "VALUE", &format!("{base}hook"));
    let mattermost = json!({"user_id": "mm1", "context":
        {"action": "approve", "approval": "APPROVAL", "hash": "HASH", "secret": "s3cret"}});
    let names = [
        "type",
        "user",
        "id",
        "actions",
        "action_id",
        "value",
        "response_url",
        "message",
        "text",
        "user_id",
        "context",
        "action",
        "approval",
        "hash",
        "secret",
    ]
    .map(String::from)
    .to_vec();
    let sent = std::sync::atomic::AtomicI64::new(0);
    let decided = std::sync::atomic::AtomicUsize::new(0);
    run(chat_case(slack, mattermost, names), |case| {
        let (id, hash) = waiting.lock().unwrap().clone();
        let payload = naming(&case.payload, id, &hash);
        rt.block_on(async {
            let approval = format!("/api/v1/approvals/{id}");
            let before = api.view(&approval).await;
            let (status, answer) = if case.slack {
                // Each signed at another second: the same payload again is not a replay.
                let n = sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let ts = api.store.now_ms() / 1000 - n % 250;
                let req = super::tests::slack_request("s3cret", ts, &payload);
                super::tests::send(&api, req).await
            } else {
                let path = "/api/v1/chat/mattermost/actions";
                (api.call(Method::POST, path, None, Some(&payload.to_string()))).await
            };
            prop_assert!(!status.is_server_error(), "{status} {answer} for {payload}");
            let after = api.view(&approval).await;
            if before["state"] != after["state"] {
                let p = &payload;
                let value = format!("{id}:{hash}");
                let action = |a: &Value| ["approve", "deny"].contains(&a.as_str().unwrap_or(""));
                let clicked = if case.slack {
                    p["user"]["id"] == "U1"
                        && p["actions"][0]["value"] == value.as_str()
                        && action(&p["actions"][0]["action_id"])
                } else {
                    p["user_id"] == "mm1"
                        && p["context"]["secret"] == "s3cret"
                        && p["context"]["approval"] == id
                        && p["context"]["hash"] == hash.as_str()
                        && action(&p["context"]["action"])
                };
                prop_assert!(clicked, "{payload} decided: {after}");
                let n = decided.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                let body = json!({"labels": {"alertname": "Gated", "instance": format!("n{n}")}});
                let out = api.post_alert(&body.to_string()).await;
                let run_id = out["outcomes"][0][0]["run_id"].as_i64().unwrap();
                super::tests::wait_state(&api, run_id, "awaiting_approval").await;
                let next = api.view("/api/v1/approvals?state=pending").await[0].clone();
                let next_hash = next["action_hash"].as_str().unwrap().to_string();
                *waiting.lock().unwrap() = (next["id"].as_i64().unwrap(), next_hash);
            }
            Ok(())
        })
    });
    let decided = decided.into_inner();
    assert!(decided > 0, "no case reached a decision");
}
