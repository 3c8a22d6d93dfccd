//! Tracing setup: human-readable text by default, JSON lines when asked.
//!
//! Field values often come from alerts (targets, messages, reasons). JSON lines escape them by
//! nature; in text lines every field and message is written with its control characters
//! escaped, so that a newline in a label cannot start a line that reads like Reflex's own.

use std::fmt::Write as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::MakeExt;

/// Installs the global subscriber; `RUST_LOG` overrides the default `info` level.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in files or journald.
        .with_ansi(std::io::stderr().is_terminal());
    // Ignore the error of a second init (tests call into the library more than once).
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    } else {
        let fields = tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
            let text = escape_controls(&format!("{value:?}"));
            match field.name() {
                "message" => w.write_str(&text),
                name => write!(w, "{name}={text}"),
            }
        })
        .delimited(" ");
        builder.fmt_fields(fields).try_init()
    };
}

/// Control characters as escapes (`\n`, `\r`, `\t`, `\u{1b}`); everything else as is.
pub fn escape_controls(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_controls("plain"), "plain");
        assert_eq!(
            escape_controls("a\nINFO forged\r\t\u{1b}[31m"),
            "a\\nINFO forged\\r\\t\\u{1b}[31m"
        );
    }
}
