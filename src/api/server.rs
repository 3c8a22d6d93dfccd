//! The HTTP server: accepts connections and serves the router with every read bounded.
//!
//! `axum::serve` sets no timeouts, so one slow or idle client holds a connection (and a file
//! descriptor) for as long as it likes. Here every connection has a deadline for each
//! request's headers (which also ends idle keep-alive connections), every request a deadline
//! for its body and handling, the number of open connections is capped with a clear 503
//! beyond it, and shutdown waits for open requests only until a deadline.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use axum::response::IntoResponse;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// `server:` in reflex.yaml: limits on HTTP clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Longest a client may take to send a request's headers; also how long an idle
    /// keep-alive connection stays open.
    #[serde(with = "crate::time::duration_str")]
    pub header_timeout: Duration,
    /// Longest a request may take from its headers to its answer, body upload included.
    #[serde(with = "crate::time::duration_str")]
    pub request_timeout: Duration,
    /// Open connections at most; more are answered 503 and closed. Keep it well below the
    /// process's file descriptor limit (`LimitNOFILE` in the systemd unit).
    pub max_connections: usize,
    /// On shutdown, how long requests in progress may take to finish.
    #[serde(with = "crate::time::duration_str")]
    pub shutdown_timeout: Duration,
    /// Host names (or addresses) clients may reach Reflex by, besides the ones always allowed:
    /// the listen address, `localhost`, `127.0.0.1`, `[::1]` and the host of `public_url`.
    /// Another `Host` gets 421 on the console, and everywhere when the API is open (no
    /// tokens): a page on another site that rebinds its name to Reflex's address cannot act.
    pub allowed_hosts: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 1024,
            shutdown_timeout: Duration::from_secs(10),
            allowed_hosts: Vec::new(),
        }
    }
}

/// File descriptors Reflex needs besides its clients' connections: the store, SSH control
/// sockets, outgoing HTTP, the log, the playbook watcher.
pub const RESERVED_FDS: u64 = 128;

/// Raises the open-file limit to its hard limit, and returns how many client connections fit
/// under it: `max_connections`, or fewer (with a warning) when the limit is lower than it plus
/// [`RESERVED_FDS`]. Without this, the usual soft limit of 1,024 runs out before the 503 for
/// one connection too many can even be sent.
pub fn fit_connections(max_connections: usize) -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.maximum != limit.current {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, "cannot raise the open-file limit to its hard limit");
        }
    }
    let Some(soft) = getrlimit(Resource::Nofile).current else {
        return max_connections;
    };
    if max_connections as u64 + RESERVED_FDS <= soft {
        return max_connections;
    }
    let fit = soft.saturating_sub(RESERVED_FDS).max(1) as usize;
    tracing::warn!(
        open_file_limit = soft,
        configured = max_connections,
        serving = fit,
        "server.max_connections does not fit under the open-file limit; serving fewer (raise LimitNOFILE or ulimit -n)"
    );
    fit
}

/// How long the refusal of a connection over the cap may take to write.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long to back off after `accept` failed (out of file descriptors, say) so the loop does
/// not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves `router` on `listener` until `shutdown` completes, then lets requests in progress
/// finish for at most `shutdown_timeout`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    cfg: &ServerConfig,
    shutdown: impl Future<Output = ()>,
) {
    let max_connections = fit_connections(cfg.max_connections);
    let slots = Arc::new(Semaphore::new(max_connections));
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let service = bounded(router, cfg.request_timeout);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, max_connections));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let stop = stop.clone();
        let header_timeout = cfg.header_timeout;
        connections.spawn(async move {
            let _slot = slot;
            // Handlers that count refusals per source find the peer here.
            let hyper_service =
                hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    service.clone().oneshot(req)
                });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(stream), hyper_service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    stop.cancel();
    connections.close();
    if tokio::time::timeout(cfg.shutdown_timeout, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "shutdown: requests still open after server.shutdown_timeout; closing them"
        );
    }
}

/// The router with a deadline on each request.
fn bounded(
    router: Router,
    limit: Duration,
) -> impl tower::Service<
    Request<hyper::body::Incoming>,
    Response = Response<Body>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |req: Request<hyper::body::Incoming>| {
        let router = router.clone();
        async move {
            let req = req.map(Body::new);
            match tokio::time::timeout(limit, router.oneshot(req)).await {
                Ok(resp) => resp,
                Err(_) => Ok(timed_out(limit)),
            }
        }
    })
}

fn timed_out(limit: Duration) -> Response<Body> {
    let message = format!(
        "request not complete within {}s (server.request_timeout)",
        limit.as_secs_f64()
    );
    let mut resp = super::ApiError::Status(StatusCode::REQUEST_TIMEOUT, message).into_response();
    resp.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    resp
}

/// Answers a connection over the cap with a 503 in Reflex's error format, and closes it.
async fn refuse(mut stream: tokio::net::TcpStream, max: usize) {
    let body = serde_json::json!({"error": {
        "status": 503,
        "message": format!("too many open connections (server.max_connections = {max}); retry later"),
    }})
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, write).await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_open_file_limit_is_raised_and_connections_fit_under_it() {
        use rustix::process::{Resource, getrlimit};
        let fit = super::fit_connections(usize::MAX / 2);
        let limit = getrlimit(Resource::Nofile);
        assert_eq!(limit.current, limit.maximum, "raised to the hard limit");
        if let Some(soft) = limit.current {
            assert!(fit as u64 + super::RESERVED_FDS <= soft.max(super::RESERVED_FDS + 1));
        }
        assert_eq!(super::fit_connections(16), 16, "a cap that fits is kept");
    }
}
