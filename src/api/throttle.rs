//! Failed logins and token attempts, throttled per source and per name.
//!
//! A token is 256 bits and guessing it is hopeless, but an unthrottled endpoint still lets a
//! stranger burn CPU and fill logs at thousands of tries a second, and a weak token chosen by
//! hand would fall. After [`MAX_FAILURES`] failed attempts within [`WINDOW_MS`] from one source
//! (an IPv4 address, an IPv6 /64), or naming one token (basic auth's user), further attempts
//! are answered 429 with `Retry-After` before any token is compared, until the window passes.
//! Successful calls add nothing. Requests that did not come over a socket (in-process) are
//! not throttled.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// Failed attempts allowed per window, per source or name.
pub const MAX_FAILURES: u32 = 20;

/// The window failures are counted over.
pub const WINDOW_MS: i64 = 60_000;

/// Keys tracked at once; past it the oldest windows are dropped first.
const MAX_KEYS: usize = 10_000;

#[derive(Debug, Default)]
struct Count {
    started_ms: i64,
    failures: u32,
}

/// Failures per key (`ip:…` or `name:…`).
#[derive(Debug, Default)]
pub struct Throttle {
    counts: Mutex<HashMap<String, Count>>,
    /// Whether any failure was counted since start: until then a request costs no lock and no
    /// key (the webhook path stays as it was).
    any: std::sync::atomic::AtomicBool,
}

/// The keys an attempt is counted under.
pub fn keys(source: Option<IpAddr>, name: Option<&str>) -> Vec<String> {
    let mut keys = Vec::new();
    if source.is_some() {
        keys.push(format!("ip:{}", super::refusals::source_key(source)));
        if let Some(n) = name {
            keys.push(format!("name:{}", super::refusals::truncate(n, 64)));
        }
    }
    keys
}

impl Throttle {
    /// Whether a failed attempt was ever counted (else nothing can be blocked).
    pub fn active(&self) -> bool {
        self.any.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Seconds to wait when any key is over its limit now.
    pub fn blocked(&self, keys: &[String], now_ms: i64) -> Option<u64> {
        if !self.active() {
            return None;
        }
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        keys.iter()
            .filter_map(|k| counts.get(k))
            .filter(|c| c.failures >= MAX_FAILURES && now_ms - c.started_ms < WINDOW_MS)
            .map(|c| {
                ((c.started_ms + WINDOW_MS - now_ms) as u64)
                    .div_ceil(1000)
                    .max(1)
            })
            .max()
    }

    /// Counts a failed attempt under each key.
    pub fn failed(&self, keys: &[String], now_ms: i64) {
        if keys.is_empty() {
            return;
        }
        self.any.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if counts.len() >= MAX_KEYS {
            counts.retain(|_, c| now_ms - c.started_ms < WINDOW_MS);
        }
        for k in keys {
            if counts.len() >= MAX_KEYS && !counts.contains_key(k) {
                continue;
            }
            let c = counts.entry(k.clone()).or_default();
            if now_ms - c.started_ms >= WINDOW_MS {
                *c = Count {
                    started_ms: now_ms,
                    failures: 0,
                };
            }
            c.failures += 1;
        }
    }
}

/// The user of `Authorization: Basic …`, if any.
pub fn basic_user(headers: &axum::http::HeaderMap) -> Option<String> {
    use base64::Engine as _;
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let b64 = value.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    Some(text.split_once(':')?.0.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_past_the_limit_block_a_source_until_the_window_passes() {
        let t = Throttle::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let k = keys(Some(ip), None);
        for i in 0..MAX_FAILURES {
            assert_eq!(t.blocked(&k, i64::from(i)), None);
            t.failed(&k, i64::from(i));
        }
        assert_eq!(t.blocked(&k, 1_000), Some(59));
        let other = keys(Some("192.0.2.8".parse().unwrap()), None);
        assert_eq!(t.blocked(&other, 1_000), None, "another source is not held");
        assert_eq!(t.blocked(&k, WINDOW_MS), None, "a new window");
    }

    #[test]
    fn a_name_is_throttled_across_sources_and_in_process_calls_are_not() {
        let t = Throttle::default();
        for i in 0..MAX_FAILURES {
            let ip: IpAddr = format!("198.51.100.{i}").parse().unwrap();
            t.failed(&keys(Some(ip), Some("alice")), 0);
        }
        let fresh: IpAddr = "203.0.113.1".parse().unwrap();
        assert!(t.blocked(&keys(Some(fresh), Some("alice")), 1).is_some());
        assert!(t.blocked(&keys(Some(fresh), Some("bob")), 1).is_none());
        assert!(keys(None, Some("alice")).is_empty());
    }
}
