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
