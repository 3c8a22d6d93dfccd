//! Templated strings: literal text with `{{ expression }}` holes, each hole a Rhai expression
//! compiled at load and evaluated against the alert at render time.
//!
//! Quoting is decided by the context a template is used in, never by the playbook author: in
//! a shell context every hole's value is shell-quoted into exactly one literal word, so that
//! alert labels (untrusted input) can never add commands, options or redirections.

use super::script::{Located, Sandbox, to_json};
use rhai::{AST, Dynamic, Scope};

/// How the values of holes are inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quoting {
    /// As text; a template that is a single hole keeps the value's type (number, list, map).
    Plain,
    /// Each hole becomes one shell-quoted word (commands run over SSH).
    Shell,
    /// Each hole is percent-encoded (URLs): a value cannot add a path, a query or a host.
    Url,
    /// Each hole is escaped for use inside a quoted PromQL string (`"…"`): a value cannot
    /// end the string and change the query.
    PromQl,
}

#[derive(Debug, Clone)]
enum Part {
    Lit(String),
    Hole { src: String, ast: AST },
}

/// A compiled template.
#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
    quoting: Quoting,
}

/// A template error with the line inside the template (1-based) where known.
pub type TemplateError = Located;

impl Template {
    /// Whether a string has holes at all (strings without are plain literals).
    pub fn has_holes(s: &str) -> bool {
        s.contains("{{")
    }

    /// Compiles a template.
    pub fn compile(sandbox: &Sandbox, src: &str, quoting: Quoting) -> Result<Template, Located> {
        let mut parts = Vec::new();
        let mut rest = src;
        let line_of = |offset: usize| src[..offset].matches('\n').count() + 1;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Lit(rest[..open].to_string()));
            }
            let offset = src.len() - rest.len() + open;
            let after = &rest[open + 2..];
            let close = after.find("}}").ok_or_else(|| Located {
                line: Some(line_of(offset)),
                message: "unclosed `{{` in template".into(),
            })?;
            let expr = after[..close].trim();
            if expr.is_empty() {
                return Err(Located {
                    line: Some(line_of(offset)),
                    message: "empty `{{ }}` in template".into(),
                });
            }
            let ast = sandbox.compile_expr(expr).map_err(|e| Located {
                line: Some(line_of(offset) + e.line.unwrap_or(1) - 1),
                message: format!("in `{{{{ {expr} }}}}`: {}", e.message),
            })?;
            parts.push(Part::Hole {
                src: expr.to_string(),
                ast,
            });
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        Ok(Template { parts, quoting })
    }

    /// Renders against a scope. A hole that evaluates to nothing (a missing label, say) is an
    /// error, not an empty string: an empty value in a command or a name is how accidents happen.
    pub fn render(
        &self,
        sandbox: &Sandbox,
        scope: &mut Scope<'_>,
    ) -> Result<serde_json::Value, String> {
        if let ([Part::Hole { src, ast }], Quoting::Plain) = (self.parts.as_slice(), self.quoting) {
            let v = eval_hole(sandbox, scope, src, ast)?;
            return Ok(to_json(&v));
        }
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Lit(s) => out.push_str(s),
                Part::Hole { src, ast } => {
                    let v = eval_hole(sandbox, scope, src, ast)?.to_string();
                    match self.quoting {
                        Quoting::Plain => out.push_str(&v),
                        Quoting::Shell => out.push_str(
                            &shell_quote(&v).map_err(|e| format!("`{{{{ {src} }}}}`: {e}"))?,
                        ),
                        Quoting::Url => {
                            out.extend(percent_encoding::utf8_percent_encode(&v, URL_COMPONENT))
                        }
                        Quoting::PromQl => out.push_str(&promql_escape(&v)),
                    }
                }
            }
        }
        Ok(serde_json::Value::String(out))
    }
}

fn eval_hole(
    sandbox: &Sandbox,
    scope: &mut Scope<'_>,
    src: &str,
    ast: &AST,
) -> Result<Dynamic, String> {
    let v = sandbox
        .eval(scope, ast)
        .map_err(|e| format!("`{{{{ {src} }}}}`: {e}"))?;
    if v.is_unit() {
        return Err(format!(
            "`{{{{ {src} }}}}` evaluated to nothing (a label or parameter missing from the alert?)"
        ));
    }
    Ok(v)
}

/// Everything but RFC 3986's unreserved characters is percent-encoded.
const URL_COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Escapes a value for the inside of a quoted PromQL string literal.
pub fn promql_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\'' => out.push_str("\\'"),
            '`' => out.push_str("\\`"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

/// Quotes a value as exactly one shell word. Always quotes (even "safe" words) so that what is
/// recorded shows plainly which parts came from the alert. NUL cannot be passed in an argument
/// at all and is refused.
pub fn shell_quote(s: &str) -> Result<String, String> {
    if s.contains('\0') {
        return Err("value contains a NUL byte".into());
    }
    Ok(format!("'{}'", s.replace('\'', r"'\''")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::{Alert, AlertStatus};
    use crate::playbook::script::alert_scope;

    fn alert(instance: &str) -> Alert {
        Alert {
            source: "generic",
            status: AlertStatus::Firing,
            labels: [("alertname", "X"), ("instance", instance)]
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            annotations: Default::default(),
            starts_at: "t".into(),
            ends_at: None,
            fingerprint: "f".into(),
            generator_url: None,
            group_key: None,
        }
    }

    fn render(src: &str, q: Quoting, instance: &str) -> Result<serde_json::Value, String> {
        let sb = Sandbox::new();
        let t = Template::compile(&sb, src, q).map_err(|e| e.message)?;
        t.render(&sb, &mut alert_scope(&alert(instance)))
    }

    #[test]
    fn plain_text_and_typed_single_holes() {
        assert_eq!(
            render(
                "host {{ host(labels.instance) }} is low",
                Quoting::Plain,
                "db-1:9100"
            )
            .unwrap(),
            "host db-1 is low"
        );
        assert_eq!(render("{{ 40 + 2 }}", Quoting::Plain, "x").unwrap(), 42);
    }

    #[test]
    fn shell_holes_are_one_quoted_word() {
        let got = render(
            "df -P {{ labels.instance }}",
            Quoting::Shell,
            "a'; rm -rf / #",
        )
        .unwrap();
        assert_eq!(got, r#"df -P 'a'\''; rm -rf / #'"#);
        let nul = render("echo {{ labels.instance }}", Quoting::Shell, "a\0b").unwrap_err();
        assert!(nul.contains("NUL"), "{nul}");
    }

    #[test]
    fn url_and_promql_holes_cannot_escape_their_context() {
        let got = render(
            "http://flags.internal/api/{{ labels.instance }}?x=1",
            Quoting::Url,
            "a/../b?c=d#e f@evil.com",
        )
        .unwrap();
        assert_eq!(
            got,
            "http://flags.internal/api/a%2F..%2Fb%3Fc%3Dd%23e%20f%40evil.com?x=1"
        );
        let got = render(
            r#"up{instance="{{ labels.instance }}"}"#,
            Quoting::PromQl,
            "x\"} or vector(1) #",
        )
        .unwrap();
        assert_eq!(got, r#"up{instance="x\"} or vector(1) #"}"#);
    }

    #[test]
    fn missing_values_are_errors_not_empty_strings() {
        let err = render("rm -rf /data/{{ labels.dir }}", Quoting::Shell, "x").unwrap_err();
        assert!(err.contains("evaluated to nothing"), "{err}");
    }

    #[test]
    fn compile_errors_give_the_line() {
        let sb = Sandbox::new();
        let e = Template::compile(&sb, "a\nb {{ labels.( }}", Quoting::Plain).unwrap_err();
        assert_eq!(e.line, Some(2));
        let e = Template::compile(&sb, "x {{ never closed", Quoting::Plain).unwrap_err();
        assert!(e.message.contains("unclosed"));
    }
}
