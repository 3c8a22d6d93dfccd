//! Wall-clock helpers: the store keeps unix milliseconds, the API shows RFC 3339.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where the time comes from: the system clock, or a clock a test moves by hand (expiry,
/// cooldowns, time-boxed switches and deadlines are then tested without waiting).
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }
}

/// A clock that stands still until moved.
#[derive(Debug)]
pub struct ManualClock(std::sync::atomic::AtomicI64);

impl ManualClock {
    /// Stands at the system's time now.
    pub fn new() -> Self {
        ManualClock(std::sync::atomic::AtomicI64::new(now_ms()))
    }

    /// Stands at `ms` (since the epoch).
    pub fn at(ms: i64) -> Self {
        ManualClock(std::sync::atomic::AtomicI64::new(ms))
    }

    /// Moves it to `ms`, if that is later.
    pub fn move_to(&self, ms: i64) {
        self.0.fetch_max(ms, std::sync::atomic::Ordering::SeqCst);
    }

    /// Moves it forward.
    pub fn advance(&self, by: Duration) {
        self.0
            .fetch_add(by.as_millis() as i64, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Microseconds since the Unix epoch, now (for latency measurements).
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A moment as the store keeps it (milliseconds since the Unix epoch), shown as RFC 3339
/// (UTC, milliseconds) in JSON and text: records carry this, and only the edges format it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The moment `ms` milliseconds after the Unix epoch.
    pub const fn from_ms(ms: i64) -> Timestamp {
        Timestamp(ms)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn ms(self) -> i64 {
        self.0
    }

    /// How long after `earlier` this is (zero if it is not after it).
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0).max(0) as u64)
    }

    /// Reads RFC 3339: `2026-12-05T10:00:00Z`, any fraction of a second, any offset
    /// (`+01:00` is applied); without an offset the time is taken as UTC.
    pub fn parse(text: &str) -> Result<Timestamp, String> {
        let text = text.trim();
        let at = match text.parse::<jiff::Timestamp>() {
            Ok(t) => Ok(t),
            Err(e) => match text.parse::<jiff::civil::DateTime>() {
                Ok(civil) => jiff::tz::Offset::UTC.to_timestamp(civil),
                Err(_) => Err(e),
            },
        };
        at.map(|t| Timestamp(t.as_millisecond())).map_err(|e| {
            format!("{text:?} is not an RFC 3339 time such as 2026-12-05T10:00:00Z: {e}")
        })
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&rfc3339(self.0))
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Timestamp::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// RFC 3339 (UTC, milliseconds) for a unix-milliseconds timestamp.
pub fn rfc3339(ms: i64) -> String {
    // RFC 3339 ends with year 9999; a later time (an engagement "for" a century of weeks) is
    // shown as that, where formatting it would fail.
    const LAST_MS: i64 = 253_402_300_799_999;
    let t = UNIX_EPOCH + Duration::from_millis(ms.clamp(0, LAST_MS) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Units a duration may use: months and years are ambiguous (and `M` for months is one
/// shift-key away from `m` for minutes), so they are refused.
const UNITS: &[&str] = &[
    "ms", "msec", "s", "sec", "secs", "second", "seconds", "m", "min", "mins", "minute", "minutes",
    "h", "hr", "hrs", "hour", "hours", "d", "day", "days", "w", "week", "weeks",
];

/// Parses a human duration such as `30s`, `10m` or `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    for unit in s
        .split(|c: char| c.is_ascii_digit() || c.is_whitespace())
        .filter(|u| !u.is_empty())
    {
        if !UNITS.contains(&unit) {
            let hint = match unit {
                "M" | "month" | "months" => " (months are not a unit here; `m` is minutes)",
                "y" | "year" | "years" => " (years are not a unit here)",
                _ => "",
            };
            return Err(format!(
                "invalid duration {s:?}: unknown unit `{unit}`{hint}; use ms, s, m, h, d or w"
            ));
        }
    }
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// A duration in the units [`parse_duration`] reads, largest first: `5w`, `1d 2h`, `1m 30s`,
/// `250ms`, `0s`; what is shown reads back as itself. (humantime's format writes months and
/// years, which are no units here and no whole number of days: a 5w cooldown was shown as
/// "1month 4days 13h 26m 24s".)
pub fn format_duration(d: Duration) -> String {
    const PARTS: [(&str, u128); 6] = [
        ("w", 604_800_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ];
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let mut out = Vec::new();
    for (unit, len) in PARTS {
        if ms >= len {
            out.push(format!("{}{unit}", ms / len));
            ms %= len;
        }
    }
    out.join(" ")
}

/// Serde adapter for durations written as `30s`, `10m`, `1h`.
pub mod duration_str {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    /// Reads `30s`, `10m`, `1h` (see [`super::parse_duration`]).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        crate::time::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// A `since` as people write it: a duration back from `now_ms` (`2h`, `7d`) or a time (RFC
/// 3339); ms since the epoch.
pub fn since_ms(text: &str, now_ms: i64) -> Result<i64, String> {
    if let Ok(d) = parse_duration(text) {
        // A duration past the epoch (`99999999w`) reaches back to the start, not a panic.
        return Ok(now_ms.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)));
    }
    Timestamp::parse(text)
        .map(Timestamp::ms)
        .map_err(|_| format!("since must be a duration (2h) or a time (RFC 3339), not {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_shown_in_the_units_playbooks_are_written_in() {
        let shown = |ms| format_duration(Duration::from_millis(ms));
        assert_eq!(shown(5 * 604_800_000), "5w");
        assert_eq!(shown(2 * 86_400_000), "2d");
        assert_eq!(shown(90_000), "1m 30s");
        assert_eq!(shown(3_600_250), "1h 250ms");
        assert_eq!(shown(0), "0s");
    }

    #[test]
    fn a_timestamp_is_shown_and_read_back_as_rfc3339() {
        let t = Timestamp::from_ms(1_764_892_800_123);
        assert_eq!(t.to_string(), "2025-12-05T00:00:00.123Z");
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"2025-12-05T00:00:00.123Z\"");
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), t);
        for (text, why) in [
            ("2025-12-05T01:00:00.123+01:00", "an offset is applied"),
            ("2025-12-04T19:00:00.123-05:00", "a negative offset too"),
            ("2025-12-05T00:00:00.123", "no offset is UTC"),
            ("2025-12-05 00:00:00.123Z", "a space for the T"),
            (
                " 2025-12-05T00:00:00.123000Z ",
                "more digits, around white space",
            ),
        ] {
            assert_eq!(Timestamp::parse(text), Ok(t), "{why}: {text}");
        }
        assert!(Timestamp::parse("2025-13-05T00:00:00Z").is_err());
        assert!(serde_json::from_str::<Timestamp>("\"yesterday\"").is_err());
        let later = Timestamp::from_ms(t.ms() + 1500);
        assert_eq!(later.since(t), Duration::from_millis(1500));
        assert_eq!(t.since(later), Duration::ZERO, "never negative");
    }

    #[test]
    fn durations_take_the_documented_units_only() {
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        let e = parse_duration("20M").unwrap_err();
        assert!(e.contains("months") && e.contains("`m` is minutes"), "{e}");
        assert!(parse_duration("2y").is_err());
        assert!(parse_duration("3 fortnights").is_err());
    }
}
