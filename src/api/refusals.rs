//! Refused requests on the record, bounded: a stranger must not fill the disk through the
//! audit log.
//!
//! A refused request (no or a wrong token, a role too low, a cross-origin form, a chat click
//! that may not decide, a throttled login) is counted in `reflex_http_refused_total{reason}`.
//! The first refusal from a source in a window is audited with its method, a truncated path,
//! the source and the reason; further refusals from that source within the window only add
//! to a count, written as one summary row when the window closes. A source is an IPv4
//! address or an IPv6 /64 (one host's share); past [`MAX_SOURCES`] sources in a window, the
//! rest share one bucket. So each source writes at most two bounded rows a window.

use super::AppState;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// The window repeats from one source are collapsed over.
pub const WINDOW_MS: i64 = 60_000;

/// Sources tracked at once; further ones share one bucket.
pub const MAX_SOURCES: usize = 10_000;

/// Characters of a refused request's path kept on the record.
pub const MAX_PATH_CHARS: usize = 200;

/// Characters of a refusal's detail (the reason) kept on the record.
const MAX_DETAIL_CHARS: usize = 500;

/// Why a request was refused: the metric's label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No token, or a wrong one.
    Unauthenticated,
    /// A token whose role cannot do this.
    Forbidden,
    /// A mutating request from another site's page, or without its CSRF token.
    CrossOrigin,
    /// A chat click that may not decide.
    Chat,
    /// Too many failed logins or token attempts.
    Throttled,
    /// A Host header that is not Reflex's.
    Host,
}

impl Reason {
    /// Bounded metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unauthenticated => "unauthenticated",
            Reason::Forbidden => "forbidden",
            Reason::CrossOrigin => "cross_origin",
            Reason::Chat => "chat",
            Reason::Throttled => "throttled",
            Reason::Host => "host",
        }
    }
}

#[derive(Debug)]
struct Window {
    /// When the first refusal of the window was recorded.
    started_ms: i64,
    /// Refusals since, not written yet.
    repeats: u64,
}

/// The open windows, by source.
#[derive(Debug, Default)]
pub struct Refusals {
    windows: Mutex<HashMap<String, Window>>,
}

/// A window that closed with repeats to write.
#[derive(Debug, PartialEq, Eq)]
struct Summary {
    source: String,
    repeats: u64,
    started_ms: i64,
}

/// Who a refusal is counted against: an IPv4 address, an IPv6 /64.
pub fn source_key(ip: Option<IpAddr>) -> String {
    match ip.map(|ip| ip.to_canonical()) {
        Some(IpAddr::V4(v4)) => v4.to_string(),
        Some(IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        None => "unknown".into(),
    }
}

pub use crate::text::truncate;

impl Refusals {
    /// Notes a refusal from `source` at `now_ms`: whether to write it (the first of its
    /// window), and the summaries of windows that have closed meanwhile.
    fn note(&self, source: &str, now_ms: i64) -> (bool, Vec<Summary>) {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let closed = Self::take_closed(&mut windows, now_ms);
        let key = if windows.len() >= MAX_SOURCES && !windows.contains_key(source) {
            "other sources"
        } else {
            source
        };
        let first = match windows.get_mut(key) {
            Some(w) => {
                w.repeats += 1;
                false
            }
            None => {
                windows.insert(
                    key.to_string(),
                    Window {
                        started_ms: now_ms,
                        repeats: 0,
                    },
                );
                true
            }
        };
        (first, closed)
    }

    /// Removes the windows that have closed; the ones with repeats, to write.
    fn take_closed(windows: &mut HashMap<String, Window>, now_ms: i64) -> Vec<Summary> {
        let mut out = Vec::new();
        windows.retain(|source, w| {
            if now_ms.saturating_sub(w.started_ms) < WINDOW_MS {
                return true;
            }
            if w.repeats > 0 {
                out.push(Summary {
                    source: source.clone(),
                    repeats: w.repeats,
                    started_ms: w.started_ms,
                });
            }
            false
        });
        out
    }

    /// The summaries of windows closed by `now_ms`.
    fn closed(&self, now_ms: i64) -> Vec<Summary> {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        Self::take_closed(&mut windows, now_ms)
    }
}

/// Counts a refused request and puts it on the record, bounded (see the module doc).
/// `action` is what was asked (`POST /api/v1/...`); it is cut to [`MAX_PATH_CHARS`].
pub async fn record(
    state: &AppState,
    source: Option<IpAddr>,
    who: &str,
    action: &str,
    reason: Reason,
    why: &str,
) {
    state
        .engine
        .metrics()
        .http_refused
        .with_label_values(&[reason.as_str()])
        .inc();
    let now = state.store.now_ms();
    let key = source_key(source);
    let (first, closed) = state.refusals.note(&key, now);
    write_summaries(state, closed).await;
    if !first {
        return;
    }
    let detail = truncate(&format!("{why} (from {key})"), MAX_DETAIL_CHARS);
    if let Err(e) = (state.store)
        .audit(
            &truncate(who, 64),
            &truncate(action, MAX_PATH_CHARS),
            None,
            "refused",
            Some(detail),
        )
        .await
    {
        tracing::error!(error = %e, "cannot audit a refused request");
    }
}

/// What a refused request asked (its method and path) and where it came from, for [`record`]
/// (taken before the `await`: a request is not `Sync`).
pub fn about(req: &axum::extract::Request) -> (String, Option<IpAddr>) {
    let action = format!("{} {}", req.method(), req.uri().path());
    (action, super::peer(req.extensions()))
}

/// Writes the summaries of the windows closed by now (called periodically, so that a source
/// that stopped is still counted), or of every window (`all`, at shutdown).
pub async fn flush(state: &AppState, all: bool) {
    let now = if all { i64::MAX } else { state.store.now_ms() };
    let closed = state.refusals.closed(now);
    write_summaries(state, closed).await;
}

async fn write_summaries(state: &AppState, closed: Vec<Summary>) {
    for s in closed {
        let detail = format!(
            "{} more refused requests from {} in the {} s after {}",
            s.repeats,
            s.source,
            WINDOW_MS / 1000,
            crate::time::rfc3339(s.started_ms)
        );
        if let Err(e) = (state.store)
            .audit(&s.source, "refused requests", None, "refused", Some(detail))
            .await
        {
            tracing::error!(error = %e, "cannot audit refused requests");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_from_one_source_collapse_into_one_count_per_window() {
        let r = Refusals::default();
        assert_eq!(r.note("10.0.0.1", 0), (true, vec![]));
        for t in 1..100 {
            assert_eq!(r.note("10.0.0.1", t), (false, vec![]));
        }
        // Another source has its own window.
        assert!(r.note("10.0.0.2", 5).0);
        // After the window: the count of the repeats, and a new first row.
        let (first, closed) = r.note("10.0.0.1", WINDOW_MS);
        assert!(first);
        assert_eq!(
            closed,
            vec![Summary {
                source: "10.0.0.1".into(),
                repeats: 99,
                started_ms: 0
            }]
        );
        // 10.0.0.2 had no repeats: nothing more to say of it.
        assert!(
            r.closed(10 * WINDOW_MS)
                .iter()
                .all(|s| s.source != "10.0.0.2")
        );
    }

    #[test]
    fn sources_past_the_cap_share_a_bucket() {
        let r = Refusals::default();
        for i in 0..MAX_SOURCES {
            assert!(r.note(&format!("s{i}"), 0).0);
        }
        assert!(r.note("one more", 0).0, "the shared bucket's first row");
        assert!(!r.note("and another", 0).0, "counted in the shared bucket");
        assert_eq!(r.windows.lock().unwrap().len(), MAX_SOURCES + 1);
    }

    #[test]
    fn an_ipv6_source_is_its_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(source_key(Some(a)), source_key(Some(b)));
        let v4mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(source_key(Some(v4mapped)), "127.0.0.1");
    }
}
