//! Maintenance windows: while one is open, alerts it matches are recorded as suppressed
//! (with the window's name) instead of starting runs.

use crate::alert::Alert;
use crate::config::MaintenanceWindow;
use crate::playbook::matcher::Matcher;

/// One window, compiled.
struct Window {
    name: String,
    matchers: Vec<Matcher>,
    start_ms: i64,
    end_ms: i64,
}

/// The configured windows.
pub struct Windows(Vec<Window>);

impl Windows {
    /// Compiles the config's windows (validated with the config).
    pub fn new(config: &[MaintenanceWindow]) -> Windows {
        let ms = |t: &str| crate::time::Timestamp::parse(t).map_or(0, |t| t.ms());
        Windows(
            config
                .iter()
                .map(|w| Window {
                    name: w.name.clone(),
                    matchers: w
                        .matchers
                        .iter()
                        .filter_map(|m| Matcher::parse(m).ok())
                        .collect(),
                    start_ms: ms(&w.start),
                    end_ms: ms(&w.end),
                })
                .collect(),
        )
    }

    /// Why `alert` is held back at `now_ms`, if a window holds it.
    pub fn hold(&self, alert: &Alert, now_ms: i64) -> Option<String> {
        self.0
            .iter()
            .find(|w| {
                (w.start_ms..w.end_ms).contains(&now_ms)
                    && w.matchers.iter().all(|m| m.matches(&alert.labels))
            })
            .map(|w| {
                format!(
                    "maintenance window {:?} until {}",
                    w.name,
                    crate::time::rfc3339(w.end_ms)
                )
            })
    }
}
