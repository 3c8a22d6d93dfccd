//! Generated input for the parsers of what SREs, operators and alert sources write: each
//! answers an error for bad input, never panics, and what it accepts reads back the same.
//! Playbooks are the example playbooks with random edits, so that most of them get past the
//! YAML into the checks that follow it; a playbook's errors name a line of its file. (The
//! shell lexer is fuzzed against real shells in `playbook::template`.)

use crate::playbook::compile::compile;
use crate::playbook::matcher::Matcher;
use crate::playbook::script::Sandbox;
use proptest::prelude::*;
use std::path::Path;

/// The example playbooks, as shipped, read once.
static EXAMPLES: std::sync::LazyLock<Vec<(String, String)>> = std::sync::LazyLock::new(|| {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("playbooks");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            (path.display().to_string(), text)
        })
        .collect();
    out.sort();
    out
});

/// The configuration README.md shows (every key Reflex reads, with comments), as the text an
/// operator starts from.
static README_CONFIG: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let readme = include_str!("../README.md");
    let section = &readme[readme.find("## Configuration").unwrap()..];
    let block = &section[section.find("```yaml\n").unwrap() + 8..];
    block[..block.find("```").unwrap()].to_string()
});

/// One edit of a text: `(kind, at, piece)` deletes a line, duplicates one, or inserts a piece
/// of YAML or Rhai syntax, at a place given as a fraction of its length.
fn edit(text: &str, (kind, at, piece): (u8, f64, &str)) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let line = ((lines.len() as f64) * at) as usize % lines.len().max(1);
    match kind % 3 {
        0 => (lines.iter().enumerate())
            .filter(|&(i, _)| i != line)
            .map(|(_, l)| format!("{l}\n"))
            .collect(),
        1 => (lines.iter().enumerate())
            .flat_map(|(i, l)| std::iter::repeat_n(format!("{l}\n"), if i == line { 2 } else { 1 }))
            .collect(),
        _ => {
            let mut at = ((text.len() as f64) * at) as usize % text.len().max(1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            format!("{}{piece}{}", &text[..at], &text[at..])
        }
    }
}

/// Units a duration may be written in, with their length in ms.
const UNITS: &[(&str, u64)] = &[
    ("ms", 1),
    ("s", 1_000),
    ("sec", 1_000),
    ("m", 60_000),
    ("min", 60_000),
    ("h", 3_600_000),
    ("hours", 3_600_000),
    ("d", 86_400_000),
    ("w", 604_800_000),
];

/// Pieces of YAML syntax, for any YAML file.
const YAML_PIECES: &[&str] = &[
    "\n",
    " ",
    "  ",
    ":",
    ": ",
    "- ",
    "'",
    "\"",
    "[",
    "]",
    "{",
    "}",
    "#",
    "&a ",
    "*a",
    "!!binary ",
    "? ",
    "|",
    ">",
    "\t",
    ",",
    "\u{feff}",
    "é",
    "\\",
    "~",
    "null",
    "0x",
    "1e999",
    "-1",
];

/// Pieces of a playbook: its keys, template holes and Rhai.
const PLAYBOOK_PIECES: &[&str] = &[
    "{{",
    "}}",
    "{{ labels.x }}",
    "steps:",
    "when: ",
    "action: ",
    "with:",
    "matchers: [",
    "name: x\n",
    "approval: required\n",
    "timeout: ",
    "on_failure: ",
    "params:\n  a: 1\n",
    "labels.",
    "||",
    "&&",
    "(",
    ")",
    ";",
    "fn f() {}",
    "loop {}",
    "\"\\u{0}\"",
];

/// Pieces of a config: its sections and the values they hold (durations, addresses, sizes,
/// URLs).
const CONFIG_PIECES: &[&str] = &[
    "0",
    "99999999999999999999",
    "0s",
    "1ms",
    "5w",
    "1month",
    "[::1]:",
    "0.0.0.0:",
    ":0",
    "http://",
    "postgres://",
    "x: 1\n",
    "store:",
    "auth:",
    "tokens:",
    "open: true",
    "engine:",
    "breaker:",
    "window: ",
    "ssh:",
    "hosts:",
    "kubernetes:",
    "notify:",
    "listen: ",
    "\"\\u0000\"",
];

/// One edit (see [`edit`]) with a piece of YAML or of `pieces`.
fn edits(pieces: &'static [&'static str]) -> impl Strategy<Value = Vec<(u8, f64, &'static str)>> {
    let piece = prop_oneof![
        prop::sample::select(YAML_PIECES),
        prop::sample::select(pieces),
    ];
    prop::collection::vec((any::<u8>(), 0.0..1.0_f64, piece), 1..5)
}

proptest! {
    #[test]
    fn playbooks_edited_at_random_get_errors_with_a_line_of_their_file(
        which in 0..7_usize,
        edits in edits(PLAYBOOK_PIECES),
    ) {
        let (file, text) = &EXAMPLES[which % EXAMPLES.len()];
        let text = edits.into_iter().fold(text.clone(), |t, e| edit(&t, e));
        let lines = text.lines().count().max(1);
        if let Err(diagnostics) = compile(Path::new(file), &text, &Sandbox::new()) {
            prop_assert!(!diagnostics.is_empty());
            for d in diagnostics {
                prop_assert!(
                    (1..=lines + 1).contains(&d.line) && !d.message.is_empty(),
                    "{d} for a file of {lines} lines:\n{text}"
                );
            }
        }
    }

    #[test]
    fn configs_edited_at_random_get_errors_with_a_line_of_their_file(
        edits in edits(CONFIG_PIECES),
    ) {
        let text = edits.into_iter().fold(README_CONFIG.clone(), |t, e| edit(&t, e));
        let lines = text.lines().count().max(1);
        if let Err(errors) = crate::config::Config::parse(&text) {
            prop_assert!(!errors.is_empty());
            for (line, message) in errors {
                prop_assert!(
                    (1..=lines + 1).contains(&line) && !message.is_empty(),
                    "line {line}: {message} for a file of {lines} lines:\n{text}"
                );
            }
        }
    }

    #[test]
    fn a_matcher_parses_or_says_why_and_reads_back_as_written(text in any::<String>()) {
        match Matcher::parse(&text) {
            Ok(m) => {
                let again = Matcher::parse(&m.to_string());
                prop_assert_eq!(again.map(|a| a.to_string()), Ok(m.to_string()));
            }
            Err(e) => prop_assert!(e.starts_with("matcher "), "{}", e),
        }
    }

    #[test]
    fn a_matcher_of_a_label_and_any_value_reads_back(
        name in "[a-z_][a-z0-9_]{0,8}",
        op in prop::sample::select(&["=", "!=", "=~", "!~"][..]),
        value in any::<String>(),
    ) {
        let text = format!("{name}{op}{}", crate::playbook::matcher::quote(&value));
        match Matcher::parse(&text) {
            Ok(m) => prop_assert_eq!(m.to_string(), text),
            // Only a regex may be refused (one the regex crate does not compile).
            Err(e) => prop_assert!(op.contains('~') && e.contains("regex"), "{}: {}", text, e),
        }
    }

    #[test]
    fn durations_parse_or_say_why(text in "[0-9a-zA-Z .]{0,12}") {
        if let Err(e) = crate::time::parse_duration(&text) {
            prop_assert!(e.starts_with("invalid duration"), "{}", e);
        }
    }

    #[test]
    fn a_duration_is_the_sum_of_its_parts(
        parts in prop::collection::vec((0..10_000_u64, 0..UNITS.len()), 1..4),
    ) {
        let text: Vec<String> = parts.iter().map(|&(n, u)| format!("{n}{}", UNITS[u].0)).collect();
        let sum: u64 = parts.iter().map(|&(n, u)| n * UNITS[u].1).sum();
        prop_assert_eq!(
            crate::time::parse_duration(&text.join(" ")),
            Ok(std::time::Duration::from_millis(sum))
        );
    }

    #[test]
    fn a_shown_duration_reads_back_as_itself(ms in 0..400_000_000_000_u64) {
        let d = std::time::Duration::from_millis(ms);
        let shown = crate::time::format_duration(d);
        prop_assert_eq!(crate::time::parse_duration(&shown), Ok(d), "{}", shown);
    }

    #[test]
    fn times_parse_or_say_why_and_read_back(text in any::<String>()) {
        if let Ok(t) = crate::time::Timestamp::parse(&text) {
            prop_assert_eq!(crate::time::Timestamp::parse(&t.to_string()), Ok(t));
        }
    }

    #[test]
    fn guards_and_df_output_parse_or_say_why(text in any::<String>()) {
        let _ = crate::executors::kube::guard::parse(&text, &["ready_ratio", "restarts"]);
        let _ = crate::executors::ssh::parse_df(&text);
        let _ = crate::executors::ssh::parse_df(&format!("Filesystem\n{text}"));
    }

    #[test]
    fn webhook_bodies_parse_or_say_why(body in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = crate::alert::parse_generic(&body, "2026-12-06T00:00:00Z");
        let _ = crate::alert::parse_json::<crate::alert::AlertmanagerPayload>(&body)
            .and_then(|p| p.into_alerts());
    }
}

#[test]
fn the_configuration_readme_shows_parses() {
    if let Err(errors) = crate::config::Config::parse(&README_CONFIG) {
        panic!("README.md's configuration: {errors:?}");
    }
}
