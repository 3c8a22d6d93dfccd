//! A local HTTP receiver standing in for Slack, Mattermost, Teams, flag services or any
//! webhook: it records every request exactly (method, path, headers, body) and answers from a
//! script (default 200 with an answer that serves Slack's and Mattermost's APIs alike: `ok`,
//! a message `ts` and `channel`, an upload slot on this receiver, a post `id`, file ids).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers, lowercase names.
    pub headers: Vec<(String, String)>,
    /// Body as JSON (Null if not JSON).
    pub body: Value,
    /// Raw body.
    pub raw: String,
    /// The body's bytes.
    pub bytes: Vec<u8>,
    /// When it arrived.
    pub at: Instant,
}

impl Recorded {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A scripted answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Status.
    pub status: u16,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
}

#[derive(Default)]
struct Inner {
    requests: Vec<Recorded>,
    script: VecDeque<Answer>,
    counter: u64,
    base: String,
}

/// A running receiver.
#[derive(Clone)]
pub struct Receiver {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    inner: Arc<Mutex<Inner>>,
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let raw = String::from_utf8_lossy(&body).to_string();
    let mut g = inner.lock().unwrap();
    g.counter += 1;
    g.requests.push(Recorded {
        method: method.to_string(),
        path: uri.to_string(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: serde_json::from_str(&raw).unwrap_or(Value::Null),
        raw,
        bytes: body.to_vec(),
        at: Instant::now(),
    });
    let answer = g.script.pop_front().unwrap_or(Answer {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: serde_json::json!({
            "ok": true,
            "ts": format!("1000.{}", g.counter),
            "channel": "C0REFLEX",
            "upload_url": format!("{}/upload/F{}", g.base, g.counter),
            "file_id": format!("F{}", g.counter),
            "id": format!("post{}", g.counter),
            "file_infos": [{"id": format!("file{}", g.counter)}],
        })
        .to_string(),
    });
    let mut resp = (StatusCode::from_u16(answer.status).unwrap(), answer.body).into_response();
    for (k, v) in answer.headers {
        resp.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    resp
}

impl Receiver {
    /// Starts on a random loopback port.
    pub async fn start() -> Receiver {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        inner.lock().unwrap().base = base.clone();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { base, inner }
    }

    /// Queues scripted answers (used in order, then the default).
    pub fn answer(&self, status: u16, headers: &[(&str, &str)], body: &str) {
        self.inner.lock().unwrap().script.push_back(Answer {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.to_string(),
        });
    }

    /// Drops the answers still queued: from now on, the default answer.
    pub fn clear_answers(&self) {
        self.inner.lock().unwrap().script.clear();
    }

    /// Requests so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.lock().unwrap().requests.clone()
    }

    /// Requests to one path.
    pub fn at(&self, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }
}
