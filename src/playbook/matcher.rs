//! Alertmanager-syntax label matchers: `name="value"`, `name!="value"`, `name=~"regex"`,
//! `name!~"regex"`. As in Alertmanager, regexes are anchored and a missing label matches as "".
//! A name that is not `[a-zA-Z_][a-zA-Z0-9_]*` (Prometheus 3 sends `service.name`) is quoted,
//! as Alertmanager 0.27 writes it: `"service.name"="api"`.

use crate::alert::{Labels, is_label_name};
use regex::Regex;

/// One label matcher.
#[derive(Debug, Clone)]
pub struct Matcher {
    /// Label name.
    pub name: String,
    op: Op,
    /// The value or the regex source, unquoted.
    pub value: String,
}

#[derive(Debug, Clone)]
enum Op {
    Eq,
    Ne,
    Re(Regex),
    NotRe(Regex),
}

impl Matcher {
    /// Parses `name op "value"` (the value may also be unquoted).
    pub fn parse(s: &str) -> Result<Matcher, String> {
        let s = s.trim();
        let name_end = if s.starts_with('"') {
            quoted_len(s).ok_or_else(|| format!("matcher {s:?}: unterminated quoted label name"))?
        } else {
            s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(s.len())
        };
        let name = unquote(&s[..name_end]).map_err(|e| format!("matcher {s:?}: {e}"))?;
        if name.is_empty() || (!s.starts_with('"') && !is_label_name(&name)) {
            return Err(format!("matcher {s:?}: expected a label name first"));
        }
        let rest = s[name_end..].trim_start();
        let (op, raw) = ["=~", "!~", "!=", "="]
            .iter()
            .find_map(|op| rest.strip_prefix(op).map(|r| (*op, r.trim())))
            .ok_or_else(|| {
                format!("matcher {s:?}: expected one of =, !=, =~, !~ after {name:?}")
            })?;
        let value = unquote(raw).map_err(|e| format!("matcher {s:?}: {e}"))?;
        let regex = || {
            Regex::new(&format!("^(?:{value})$")).map_err(|e| {
                // The regex crate's message spans lines (a caret diagram); keep the last.
                let text = e.to_string();
                let last = text
                    .lines()
                    .last()
                    .unwrap_or("")
                    .trim_start_matches("error: ")
                    .to_string();
                format!("matcher {s:?}: invalid regex: {last}")
            })
        };
        let op = match op {
            "=" => Op::Eq,
            "!=" => Op::Ne,
            "=~" => Op::Re(regex()?),
            _ => Op::NotRe(regex()?),
        };
        Ok(Matcher { name, op, value })
    }

    /// Whether the labels satisfy this matcher.
    pub fn matches(&self, labels: &Labels) -> bool {
        let v = labels.get(&self.name).map_or("", String::as_str);
        match &self.op {
            Op::Eq => v == self.value,
            Op::Ne => v != self.value,
            Op::Re(re) => re.is_match(v),
            Op::NotRe(re) => !re.is_match(v),
        }
    }

    /// The value this matcher requires of its label exactly, if it is an equality.
    pub fn equality(&self) -> Option<&str> {
        matches!(self.op, Op::Eq).then_some(self.value.as_str())
    }
}

impl std::fmt::Display for Matcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let op = match self.op {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Re(_) => "=~",
            Op::NotRe(_) => "!~",
        };
        if is_label_name(&self.name) {
            write!(f, "{}{op}{}", self.name, quote(&self.value))
        } else {
            write!(f, "{}{op}{}", quote(&self.name), quote(&self.value))
        }
    }
}

/// A value quoted as [`unquote`] reads it: `\`, `"` and newline escaped.
pub fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The length of the quoted string `s` starts with, its quotes included (`None`: it does not
/// end).
fn quoted_len(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i + 1),
            _ => {}
        }
    }
    None
}

fn unquote(raw: &str) -> Result<String, String> {
    let Some(inner) = raw.strip_prefix('"') else {
        if raw.contains('"') {
            return Err("stray quote in unquoted value".into());
        }
        return Ok(raw.to_string());
    };
    let inner = inner.strip_suffix('"').ok_or("unterminated quoted value")?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('n') => out.push('\n'),
                Some(c @ ('\\' | '"')) => out.push(c),
                other => return Err(format!("invalid escape \\{}", other.unwrap_or(' '))),
            },
            '"' => return Err("unescaped quote inside quoted value".into()),
            c => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn operators_match_like_alertmanager() {
        let l = labels(&[("alertname", "DiskSpaceLow"), ("severity", "warning")]);
        let cases = [
            (r#"alertname="DiskSpaceLow""#, true),
            (r#"alertname = "DiskSpaceLow""#, true),
            ("alertname=DiskSpaceLow", true),
            (r#"alertname="Disk""#, false),
            (r#"alertname!="Disk""#, true),
            (r#"severity=~"warning|critical""#, true),
            (r#"severity=~"warn""#, false), // anchored
            (r#"severity!~"info|debug""#, true),
            (r#"team="""#, true), // missing label matches ""
            (r#"team!="""#, false),
            (r#"team=~".*""#, true),
        ];
        for (src, want) in cases {
            let m = Matcher::parse(src).unwrap_or_else(|e| panic!("{src}: {e}"));
            assert_eq!(m.matches(&l), want, "{src}");
        }
    }

    #[test]
    fn escapes_in_quoted_values() {
        let m = Matcher::parse(r#"msg="say \"hi\"\\n""#).unwrap();
        assert_eq!(m.value, "say \"hi\"\\n");
    }

    #[test]
    fn quoted_label_names_match_like_alertmanager() {
        let m = Matcher::parse(r#""service.name"=~"api|web""#).unwrap();
        assert!(m.matches(&labels(&[("service.name", "api")])));
        assert!(!m.matches(&labels(&[("service_name", "api")])));
        assert_eq!(m.to_string(), r#""service.name"=~"api|web""#);
        let m = Matcher::parse(r#""k8s \"pod\""!="x""#).unwrap();
        assert_eq!(m.name, r#"k8s "pod""#);
        assert_eq!(Matcher::parse(&m.to_string()).unwrap().name, m.name);
        // A plain name is shown plain, quoted or not when written.
        assert_eq!(
            Matcher::parse(r#""alertname"="X""#).unwrap().to_string(),
            r#"alertname="X""#
        );
        for (src, needle) in [(r#"""="x""#, "label name"), (r#""open"#, "unterminated")] {
            let err = Matcher::parse(src).unwrap_err();
            assert!(err.contains(needle), "{src}: {err}");
        }
    }

    #[test]
    fn bad_matchers_say_what_is_wrong() {
        for (src, needle) in [
            ("alertname", "expected one of"),
            ("=\"x\"", "label name"),
            (r#"severity=~"(""#, "invalid regex"),
            (r#"a="unterminated"#, "unterminated"),
            (r#"a=b"c"#, "stray quote"),
            ("9a=\"x\"", "label name"),
        ] {
            let err = Matcher::parse(src).unwrap_err();
            assert!(err.contains(needle), "{src}: {err}");
        }
    }
}
