//! Finds the line of a node in block-style YAML, so that errors found after parsing (a bad
//! matcher, a Rhai syntax error) can still point at file:line. serde_yaml reports positions
//! only for its own errors; this walks the text by indentation. Best effort: on flow-style
//! YAML it falls back to the closest enclosing node it found.

/// One step of a path into a YAML document.
#[derive(Debug, Clone, Copy)]
pub enum Seg<'a> {
    /// A mapping key.
    Key(&'a str),
    /// A sequence index (0-based).
    Index(usize),
}

/// 1-based line of the node at `path` (1 when nothing is found).
pub fn line_of(src: &str, path: &[Seg<'_>]) -> usize {
    let lines: Vec<&str> = src.lines().collect();
    // The current node: the line it starts on, and the column its children must exceed.
    let mut start = 0usize;
    let mut above: isize = -1;
    let mut found = 0usize;
    for seg in path {
        let hit = match *seg {
            Seg::Key(k) => find_key(&lines, start, above, k),
            Seg::Index(n) => find_item(&lines, start, above, n),
        };
        match hit {
            Some((line, col)) => {
                start = line;
                above = col;
                found = line;
            }
            None => break,
        }
    }
    found + 1
}

fn content(line: &str) -> Option<(isize, &str)> {
    let text = line.trim_start();
    if text.is_empty() || text.starts_with('#') {
        return None;
    }
    Some(((line.len() - text.len()) as isize, text))
}

fn find_key(lines: &[&str], start: usize, above: isize, key: &str) -> Option<(usize, isize)> {
    for (i, line) in lines.iter().enumerate().skip(start) {
        let Some((indent, mut text)) = content(line) else {
            continue;
        };
        if i > start && indent <= above {
            return None;
        }
        let mut col = indent;
        while let Some(rest) = text.strip_prefix("- ") {
            col += 2 + (rest.len() - rest.trim_start().len()) as isize;
            text = rest.trim_start();
        }
        let bare = text.strip_prefix(key);
        let quoted = text
            .strip_prefix('"')
            .and_then(|t| t.strip_prefix(key))
            .and_then(|t| t.strip_prefix('"'));
        let is_key = bare.or(quoted).is_some_and(|r| {
            r.starts_with(':') && (r.len() == 1 || r[1..].starts_with([' ', '\t']))
        });
        if col > above && is_key {
            return Some((i, col));
        }
    }
    None
}

fn find_item(lines: &[&str], start: usize, above: isize, n: usize) -> Option<(usize, isize)> {
    let mut dash_indent = None;
    let mut count = 0;
    for (i, line) in lines.iter().enumerate().skip(start + 1) {
        let Some((indent, text)) = content(line) else {
            continue;
        };
        let is_dash = text == "-" || text.starts_with("- ");
        if indent < above || (indent == above && !is_dash) {
            return None;
        }
        if is_dash && dash_indent.is_none_or(|d| d == indent) {
            dash_indent = Some(indent);
            if count == n {
                return Some((i, indent));
            }
            count += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::Seg::{Index, Key};
    use super::*;

    const DOC: &str = "\
name: demo
# comment
matchers:
  - alertname=\"X\"
  - severity=~\"(\"
steps:
- name: first
  action: log
  with:
    message: hi
- action: script
  with:
    script: |
      let x = ;
";

    #[test]
    fn finds_keys_items_and_nested_keys() {
        assert_eq!(line_of(DOC, &[Key("name")]), 1);
        assert_eq!(line_of(DOC, &[Key("matchers"), Index(1)]), 5);
        assert_eq!(line_of(DOC, &[Key("steps"), Index(0)]), 7);
        assert_eq!(line_of(DOC, &[Key("steps"), Index(0), Key("action")]), 8);
        assert_eq!(
            line_of(DOC, &[Key("steps"), Index(0), Key("with"), Key("message")]),
            10
        );
        assert_eq!(line_of(DOC, &[Key("steps"), Index(1), Key("action")]), 11);
        assert_eq!(
            line_of(DOC, &[Key("steps"), Index(1), Key("with"), Key("script")]),
            13
        );
    }

    #[test]
    fn missing_nodes_fall_back_to_the_closest_parent() {
        assert_eq!(line_of(DOC, &[Key("steps"), Index(0), Key("timeout")]), 7);
        assert_eq!(line_of(DOC, &[Key("nope")]), 1);
        // `name` of step 1 does not exist; it must not find the top-level or step 0's `name`.
        assert_eq!(line_of(DOC, &[Key("steps"), Index(1), Key("name")]), 11);
    }
}
