//! The HTTP server against real slow clients (raw sockets to the real binary): slow headers,
//! slow and unfinished bodies, idle keep-alive connections and slow chunked uploads are cut off;
//! connections over the cap get a clear 503; SIGTERM exits by its deadline with slow clients
//! open; cross-site and non-JSON mutations and an open API on a public address are refused.

use crate::common::TestApp;
use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for the server to act before calling it a failure. The server's own
/// limits in these tests are 1-2 s; this bound only keeps a broken server from hanging a test.
const BOUND: Duration = Duration::from_secs(20);

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// Reads until the server closes the connection; what it sent. Panics past [`BOUND`].
async fn read_until_closed(s: &mut TcpStream, what: &str) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(BOUND, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "{what}: the server kept the connection open");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn slow_headers_bodies_chunks_and_idle_connections_are_cut_off() {
    let app = TestApp::builder()
        .config("server:\n  header_timeout: 1s\n  request_timeout: 2s\n")
        .start()
        .await;

    // Four clients at once, each cut off by its own limit.
    let send = |bytes: &'static [u8]| {
        let app = &app;
        async move {
            let mut s = connect(app).await;
            s.write_all(bytes).await.unwrap();
            s
        }
    };
    let (mut slow_headers, mut slow_body, mut slow_chunks, mut idle) = tokio::join!(
        send(b"POST /api/v1/webhooks/generic HTTP/1.1\r\nHost: 127.0.0.1\r\n"),
        send(
            b"POST /api/v1/webhooks/generic HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n\
              content-length: 100\r\n\r\n{\"labels\":"
        ),
        send(
            b"POST /api/v1/webhooks/generic HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n\
              transfer-encoding: chunked\r\n\r\n5\r\n{\"lab\r\n"
        ),
        send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
    );
    let (headers, body, chunks, idle) = tokio::join!(
        read_until_closed(&mut slow_headers, "headers never finished"),
        read_until_closed(&mut slow_body, "body never finished"),
        read_until_closed(&mut slow_chunks, "chunked body never finished"),
        read_until_closed(&mut idle, "idle keep-alive connection"),
    );
    assert!(!headers.starts_with("HTTP/1.1 200"), "{headers}");
    assert!(body.starts_with("HTTP/1.1 408"), "{body}");
    assert!(body.contains("server.request_timeout"), "{body}");
    assert!(chunks.starts_with("HTTP/1.1 408"), "{chunks}");
    assert!(idle.starts_with("HTTP/1.1 200"), "{idle}");

    assert_eq!(app.count("alerts"), 0, "nothing half-sent was recorded");
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn connections_over_the_cap_get_a_clear_503_and_capacity_comes_back() {
    let cap = 4;
    let app = TestApp::builder()
        .config(&format!(
            "server:\n  max_connections: {cap}\n  header_timeout: 60s\n"
        ))
        .start()
        .await;
    // Idle connections hold their slots (the harness's own pooled connection may hold one).
    let mut held = Vec::new();
    let refused = loop {
        assert!(
            held.len() <= cap + 1,
            "no refusal after {} connections",
            held.len()
        );
        let mut s = connect(&app).await;
        let mut buf = [0u8; 1024];
        // A connection within the cap says nothing until asked; one over it is answered at once.
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => break String::from_utf8_lossy(&buf[..n]).into_owned(),
            _ => held.push(s),
        }
    };
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("server.max_connections = 4"), "{refused}");
    drop(held);
    app.wait_for(20, "a connection to be served again", || async {
        let r = reqwest::Client::new()
            .get(format!("{}/healthz", app.base))
            .send()
            .await;
        r.is_ok_and(|r| r.status() == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn sigterm_exits_by_the_shutdown_deadline_with_slow_uploads_open() {
    let mut app = TestApp::builder()
        .config("server:\n  shutdown_timeout: 1s\n  header_timeout: 60s\n  request_timeout: 60s\n")
        .start()
        .await;
    let mut uploads = Vec::new();
    for _ in 0..50 {
        let mut s = connect(&app).await;
        s.write_all(
            b"POST /api/v1/webhooks/generic HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n\
              content-length: 1000\r\n\r\n[",
        )
        .await
        .unwrap();
        uploads.push(s);
    }
    let (status, _) = app.get("/healthz").await;
    assert_eq!(
        status, 200,
        "the uploads are open and the server still answers"
    );
    // `terminate` sends SIGTERM and allows 30 s; before the deadline existed this hung.
    assert!(app.terminate(), "reflex did not exit cleanly on SIGTERM");
}

#[tokio::test]
async fn cross_site_and_non_json_mutations_are_refused_and_change_nothing() {
    let app = TestApp::builder().start().await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/killswitch", app.base);
    let body = r#"{"engaged": true, "reason": "csrf"}"#;
    let cases = [
        ("text/plain", None, 415),
        ("application/x-www-form-urlencoded", None, 415),
        ("application/json", Some("http://evil.example"), 403),
        ("application/json", Some("null"), 403),
    ];
    for (content_type, origin, want) in cases {
        let mut req = http
            .put(&url)
            .header("content-type", content_type)
            .body(body);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), want, "{content_type} {origin:?}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"]["message"].as_str().is_some(), "{v}");
    }
    let r = http
        .put(&url)
        .header("content-type", "text/plain")
        .header("sec-fetch-site", "cross-site")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let (_, switch) = app.get("/api/v1/killswitch").await;
    assert_eq!(switch["global"]["engaged"], false, "{switch}");

    // The daemon's own origin (its console, later) is fine.
    let own = app.base.clone();
    let r = http
        .put(&url)
        .header("content-type", "application/json")
        .header("origin", own)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[test]
fn an_open_api_on_a_public_address_needs_auth_open() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::common::free_port();
    let write = |extra: &str| {
        let cfg = dir.path().join("reflex.yaml");
        std::fs::write(
            &cfg,
            format!(
                "listen: 0.0.0.0:{port}\nplaybooks_dir: {}\ndata_dir: {}\n{extra}",
                dir.path().join("pb").display(),
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        cfg
    };
    std::fs::create_dir_all(dir.path().join("pb")).unwrap();
    let cfg = write("");
    let (code, out) =
        crate::common::reflex_cli(&["serve", "--config", cfg.to_str().unwrap()], dir.path());
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("auth.open"), "{out}");
    assert!(
        !dir.path().join("data/reflex.db").exists(),
        "nothing started"
    );
    let cfg = write("auth:\n  open: true\n");
    let (code, out) =
        crate::common::reflex_cli(&["check", "--config", cfg.to_str().unwrap()], dir.path());
    assert_eq!(code, 0, "an explicit open API is a valid config: {out}");
}
