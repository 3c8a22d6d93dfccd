//! Templated strings: literal text with `{{ expression }}` holes, each hole a Rhai expression
//! compiled at load and evaluated against the alert at render time.
//!
//! Quoting is decided by where a hole stands, found at load like an HTML template engine
//! tells an attribute from text: in a command ([`super::shell`]) as a bare word, inside the
//! author's single or double quotes; in a URL's path or query; in a PromQL string literal (a
//! regex one after `=~`) or as a number. A hole where no quoting is safe (a host in a URL, a
//! here-document, the command name…) is refused at load with the fix. At render, values that
//! would start an option, are empty, or climb out of a directory are refused unless the hole
//! opts in (`allow_option(…)`, `allow_empty(…)`, `allow_path(…)`).

use super::error::PlanError;
use super::script::{Located, Sandbox, Unchecked, to_json};
use super::shell::{self, ShellHole};
use rhai::{AST, Dynamic, Scope};

/// What kind of text a template is, and so how its holes are quoted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quoting {
    /// As text; a template that is a single hole keeps the value's type (number, list, map).
    Plain,
    /// A shell command run over SSH (see [`super::shell`]).
    Shell,
    /// A URL: holes may stand in the path (one segment each) or the query, never the host.
    Url,
    /// A PromQL query: holes inside string literals, or numbers.
    PromQl,
}

/// Where one hole stands, decided at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Context {
    Plain,
    Shell(ShellHole),
    /// In the path: the value is one percent-encoded segment (or part of one).
    UrlPath,
    /// In the query or fragment: percent-encoded.
    UrlQuery,
    /// Inside a PromQL string literal quoted with `quote`; `regex` after `=~` or `!~`.
    PromQlString {
        quote: char,
        regex: bool,
    },
    /// Outside any literal: the value must be a number.
    PromQlNumber,
}

#[derive(Debug, Clone)]
struct Hole {
    src: String,
    ast: AST,
    context: Context,
}

#[derive(Debug, Clone)]
enum Part {
    Lit(String),
    Hole(Hole),
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

    /// Compiles a template whose holes see the alert and `params`, and decides each hole's
    /// context.
    pub fn compile(sandbox: &Sandbox, src: &str, quoting: Quoting) -> Result<Template, Located> {
        Self::compile_with(sandbox, src, quoting, super::script::names::PLANNED)
    }

    /// Compiles a template whose holes may use `names`.
    pub fn compile_with(
        sandbox: &Sandbox,
        src: &str,
        quoting: Quoting,
        names: &[&str],
    ) -> Result<Template, Located> {
        let mut parts = Vec::new();
        let mut offsets = Vec::new();
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
            let ast = sandbox.compile_expr(expr, names).map_err(|e| Located {
                line: Some(line_of(offset) + e.line.unwrap_or(1) - 1),
                message: format!("in `{{{{ {expr} }}}}`: {}", e.message),
            })?;
            offsets.push(offset);
            parts.push(Part::Hole(Hole {
                src: expr.to_string(),
                ast,
                context: Context::Plain,
            }));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        let contexts = match quoting {
            Quoting::Plain => Ok(vec![Context::Plain; offsets.len()]),
            Quoting::Shell => shell_contexts(&parts),
            Quoting::Url => url_contexts(&parts),
            Quoting::PromQl => promql_contexts(&parts),
        }
        .map_err(|(hole, message)| Located {
            line: Some(
                hole.and_then(|i| offsets.get(i))
                    .map_or_else(|| src.trim_end().matches('\n').count() + 1, |&o| line_of(o)),
            ),
            message,
        })?;
        let holes = parts.iter_mut().filter_map(|p| match p {
            Part::Hole(h) => Some(h),
            Part::Lit(_) => None,
        });
        for (hole, context) in holes.zip(contexts) {
            hole.context = context;
        }
        Ok(Template { parts, quoting })
    }

    /// Renders against a scope. A hole that evaluates to nothing (a missing label, say) is an
    /// error, not an empty string: an empty value in a command or a name is how accidents happen.
    pub fn render(
        &self,
        sandbox: &Sandbox,
        scope: &mut Scope<'_>,
    ) -> Result<serde_json::Value, PlanError> {
        if let ([Part::Hole(h)], Quoting::Plain) = (self.parts.as_slice(), self.quoting) {
            let v = eval_hole(sandbox, scope, h)?;
            return Ok(match v.clone().try_cast::<Unchecked>() {
                Some(u) => serde_json::Value::String(u.value),
                None => to_json(&v),
            });
        }
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Lit(s) => out.push_str(s),
                Part::Hole(h) => {
                    let v = eval_hole(sandbox, scope, h)?;
                    write_value(&mut out, v, h.context)
                        .map_err(|e| PlanError::Refused(format!("`{{{{ {} }}}}`: {e}", h.src)))?;
                }
            }
        }
        Ok(serde_json::Value::String(out))
    }
}

/// Writes one value in its context, refusing what the context cannot hold safely.
fn write_value(out: &mut String, v: Dynamic, context: Context) -> Result<(), String> {
    if context == Context::PromQlNumber {
        return if v.is_int() || v.is_float() {
            out.push_str(&v.to_string());
            Ok(())
        } else {
            Err(format!(
                "a hole outside a PromQL string literal must be a number, got {} (quote it: \
                 `label=\"{{{{ … }}}}\"`, or convert it: `{{{{ parse_float(…) }}}}`)",
                v.type_name()
            ))
        };
    }
    let u = Unchecked::from_dynamic(v);
    let text = u.value.as_str();
    if text.contains('\0') {
        return Err("value contains a NUL byte".into());
    }
    let context_name = match context {
        Context::Shell(_) => "a command",
        Context::UrlPath => "a URL path",
        _ => "",
    };
    if text.is_empty() && !u.empty && !context_name.is_empty() {
        return Err(format!(
            "value is empty, which in {context_name} changes what is acted on; give a default \
             (`or_default(…, \"x\")`) or opt in with `allow_empty(…)`"
        ));
    }
    match context {
        Context::Plain => out.push_str(text),
        Context::Shell(hole) => {
            if hole.option_position && text.starts_with('-') && !u.option {
                return Err(format!(
                    "value {:?} starts with `-` and would be read as an option; put `--` \
                     before it in the command, or opt in with `allow_option(…)`",
                    truncate(text, 40)
                ));
            }
            if hole.arithmetic && text.contains(['$', '`']) {
                return Err(format!(
                    "value {:?} has `$` or a backquote, and the command evaluates bash \
                     arithmetic (`((…))`, `$((…))`, `let`, `[[…]]`, a subscript), where a \
                     variable set from it would run a `$(…)` in it; leave the arithmetic out \
                     of this command, or compute it in the template",
                    truncate(text, 40)
                ));
            }
            if hole.after_slash && !u.path && !is_relative_path(text) {
                return Err(format!(
                    "value {:?} follows a `/` and is absolute or contains `..`: it would leave \
                     the directory; use `path_segment(…)`, or opt in with `allow_path(…)`",
                    truncate(text, 40)
                ));
            }
            out.push_str(&shell::quote(text, &hole));
        }
        Context::UrlPath => {
            if (text == "." || text == "..") && !u.path {
                return Err(format!(
                    "value {text:?} in a URL path would change the path; use a real name"
                ));
            }
            out.extend(percent_encoding::utf8_percent_encode(text, URL_COMPONENT));
        }
        Context::UrlQuery => out.extend(percent_encoding::utf8_percent_encode(text, URL_COMPONENT)),
        Context::PromQlString { quote, regex } => {
            if regex {
                out.push_str(&promql_escape(&regex_quote(text), quote));
            } else {
                out.push_str(&promql_escape(text, quote));
            }
        }
        Context::PromQlNumber => unreachable!("handled above"),
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// A relative path that stays below where it starts: not absolute, no `..` segment.
fn is_relative_path(s: &str) -> bool {
    !s.starts_with('/') && !s.split('/').any(|seg| seg == "..")
}

fn eval_hole(sandbox: &Sandbox, scope: &mut Scope<'_>, h: &Hole) -> Result<Dynamic, PlanError> {
    let v = sandbox
        .eval(scope, &h.ast)
        .map_err(|e| PlanError::Script(format!("`{{{{ {} }}}}`: {e}", h.src)))?;
    if v.is_unit() {
        return Err(PlanError::Missing(format!(
            "`{{{{ {} }}}}` evaluated to nothing (a label or parameter missing from the alert?)",
            h.src
        )));
    }
    Ok(v)
}

/// Hole index and message of a context error.
type ContextError = (Option<usize>, String);

fn shell_contexts(parts: &[Part]) -> Result<Vec<Context>, ContextError> {
    let mut lexer = shell::Lexer::new();
    let mut out = Vec::new();
    for part in parts {
        match part {
            Part::Lit(s) => lexer.text(s),
            Part::Hole(_) => {
                let i = out.len();
                let hole = lexer
                    .hole()
                    .map_err(|e| (Some(i), format!("unsafe hole in a command: {e}")))?;
                out.push(Context::Shell(hole));
            }
        }
    }
    let arithmetic = lexer.arithmetic();
    lexer
        .finish()
        .map_err(|e| (None, format!("in the command: {e}")))?;
    for context in &mut out {
        if let Context::Shell(hole) = context {
            hole.arithmetic = arithmetic;
        }
    }
    Ok(out)
}

/// A URL's holes: in the path or the query, never in the scheme or host, where the alert
/// would choose where Reflex sends the request (and its credentials).
fn url_contexts(parts: &[Part]) -> Result<Vec<Context>, ContextError> {
    let mut before = String::new();
    let mut out = Vec::new();
    for part in parts {
        match part {
            Part::Lit(s) => before.push_str(s),
            Part::Hole(_) => {
                let i = out.len();
                // The path starts at the first `/` after a host (or `\`, which URL parsers
                // read as `/` in http(s) URLs). With no host (`http:///…`, `http://\/…`) a
                // URL parser skips the slashes and reads the host from what follows.
                let path_start = before.find("://").and_then(|s| {
                    let authority = &before[s + 3..];
                    authority
                        .find(['/', '\\'])
                        .filter(|&p| p > 0)
                        .map(|p| s + 3 + p)
                });
                if path_start.is_none() {
                    return Err((
                        Some(i),
                        "a hole in a URL's scheme or host: the alert would choose where the \
                         request goes. Write the host out (or use a provider in reflex.yaml); \
                         holes may stand in the path or query"
                            .into(),
                    ));
                }
                out.push(if before.contains('?') || before.contains('#') {
                    Context::UrlQuery
                } else {
                    Context::UrlPath
                });
                before.push('x');
            }
        }
    }
    Ok(out)
}

/// A PromQL query's holes: in string literals (escaped; regex-quoted after `=~`/`!~`), or
/// outside them where only a number may stand. Never in a raw (backquoted) string or comment.
fn promql_contexts(parts: &[Part]) -> Result<Vec<Context>, ContextError> {
    #[derive(PartialEq)]
    enum St {
        Code,
        Str { quote: char, regex: bool },
        Comment,
    }
    let mut st = St::Code;
    let mut escaped = false;
    // Code since the last string literal, to tell `=~"…"` from `="…"`.
    let mut code = String::new();
    let mut out = Vec::new();
    for part in parts {
        match part {
            Part::Lit(s) => {
                for c in s.chars() {
                    match &st {
                        St::Code => match c {
                            '"' | '\'' | '`' => {
                                let op = code.trim_end();
                                st = St::Str {
                                    quote: c,
                                    regex: op.ends_with("=~") || op.ends_with("!~"),
                                };
                                code.clear();
                            }
                            '#' => st = St::Comment,
                            c => code.push(c),
                        },
                        St::Str { quote, .. } => {
                            if std::mem::take(&mut escaped) {
                            } else if c == '\\' && *quote != '`' {
                                escaped = true;
                            } else if c == *quote {
                                st = St::Code;
                            }
                        }
                        St::Comment => {
                            if c == '\n' {
                                st = St::Code;
                            }
                        }
                    }
                }
            }
            Part::Hole(_) => {
                let i = out.len();
                out.push(match st {
                    St::Code => {
                        code.push('0');
                        Context::PromQlNumber
                    }
                    St::Str { quote: '`', .. } => {
                        return Err((
                            Some(i),
                            "a hole in a raw (backquoted) PromQL string cannot be escaped: use \
                             \"…\" around it"
                                .into(),
                        ));
                    }
                    St::Str { quote, regex } => Context::PromQlString { quote, regex },
                    St::Comment => {
                        return Err((Some(i), "a hole in a PromQL comment: remove it".into()));
                    }
                });
            }
        }
    }
    if matches!(st, St::Str { .. }) {
        return Err((None, "unterminated string literal in the query".into()));
    }
    Ok(out)
}

/// Everything but RFC 3986's unreserved characters is percent-encoded.
const URL_COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Escapes a value for the inside of a PromQL string literal quoted with `quote` (`"` or
/// `'`). As in Go, only that quote may be escaped: `\'` inside `"…"` is an error.
pub fn promql_escape(s: &str, quote: char) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            // Prometheus's lexer takes a literal U+FFFD for invalid UTF-8 and refuses it.
            '\u{fffd}' => out.push_str("\\uFFFD"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// Makes a value match itself literally as an RE2 regex (Go's `regexp.QuoteMeta`).
fn regex_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Quotes a value as exactly one shell word. NUL cannot be passed in an argument at all and
/// is refused.
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
            .map_err(|e| e.to_string())
    }

    fn render_v(src: &str, q: Quoting, v: &str) -> Result<serde_json::Value, String> {
        render(src, q, v)
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
    fn shell_holes_are_quoted_for_the_quotes_they_stand_in() {
        let v = "a'; rm -rf / #$(id)`id`\"\\";
        let got = render_v("df -P {{ labels.instance }}", Quoting::Shell, v).unwrap();
        assert_eq!(got, r#"df -P 'a'\''; rm -rf / #$(id)`id`"\'"#);
        let got = render_v("grep -c 'x{{ labels.instance }}' f", Quoting::Shell, v).unwrap();
        assert_eq!(got, r#"grep -c 'xa'\''; rm -rf / #$(id)`id`"\' f"#);
        let got = render_v("logger \"x {{ labels.instance }}\"", Quoting::Shell, v).unwrap();
        assert_eq!(got, r#"logger "x a'; rm -rf / #\$(id)\`id\`\"\\""#);
        let nul = render_v("echo {{ labels.instance }}", Quoting::Shell, "a\0b").unwrap_err();
        assert!(nul.contains("NUL"), "{nul}");
    }

    #[test]
    fn options_empty_values_and_traversal_are_refused_unless_opted_in() {
        let cmd = "tar -xf x {{ labels.instance }}";
        let e = render_v(cmd, Quoting::Shell, "--use-compress-program=sh").unwrap_err();
        assert!(e.contains("option") && e.contains("--"), "{e}");
        let e = render_v("grep '{{ labels.instance }}' f", Quoting::Shell, "-e x").unwrap_err();
        assert!(e.contains("option"), "{e}");
        assert!(render_v("tar -xf x -- {{ labels.instance }}", Quoting::Shell, "-x").is_ok());
        assert!(render_v("echo x{{ labels.instance }}", Quoting::Shell, "-x").is_ok());
        let opted = "echo {{ allow_option(labels.instance) }}";
        assert_eq!(render_v(opted, Quoting::Shell, "-n").unwrap(), "echo '-n'");

        let rm = "rm -rf cache/{{ labels.instance }}";
        for bad in ["", "/", "../x", "a/../../b", "/etc"] {
            assert!(render_v(rm, Quoting::Shell, bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            render_v(rm, Quoting::Shell, "a/b").unwrap(),
            "rm -rf cache/'a/b'"
        );
        let defaulted = "rm -rf cache/{{ or_default(labels.instance, \"tmp\") }}";
        assert_eq!(
            render_v(defaulted, Quoting::Shell, "").unwrap(),
            "rm -rf cache/'tmp'"
        );
        let seg = "rm -rf cache/{{ path_segment(labels.instance) }}";
        assert!(render_v(seg, Quoting::Shell, "a/b").is_err());
        let opted = "ls /srv/{{ allow_path(labels.instance) }}";
        assert!(render_v(opted, Quoting::Shell, "../x").is_ok());
        let opted = "echo x{{ allow_empty(labels.instance) }}";
        assert_eq!(render_v(opted, Quoting::Shell, "").unwrap(), "echo x''");
    }

    #[test]
    fn unsafe_shell_shapes_are_refused_at_load_with_the_line() {
        let sb = Sandbox::new();
        let e =
            Template::compile(&sb, "cat <<EOF\n{{ labels.x }}\nEOF\n", Quoting::Shell).unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("here-document"), "{}", e.message);
        let e = Template::compile(&sb, "{{ labels.cmd }} -f", Quoting::Shell).unwrap_err();
        assert!(e.message.contains("command name"), "{}", e.message);
    }

    #[test]
    fn url_holes_stay_in_the_path_or_query() {
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
        let q = render_v("http://h/s?q={{ labels.instance }}", Quoting::Url, "a&b=c").unwrap();
        assert_eq!(q, "http://h/s?q=a%26b%3Dc");
        for dots in ["..", "."] {
            assert!(render_v("http://h/a/{{ labels.instance }}", Quoting::Url, dots).is_err());
        }
        let sb = Sandbox::new();
        for src in [
            "http://{{ labels.h }}:8080/",
            "{{ labels.url }}",
            "http://a@{{ labels.h }}/",
            // No host: a URL parser skips the slashes and takes the value for the host (found
            // by the fuzz test below).
            "http:///{{ labels.h }}",
            "https:////{{ labels.h }}/x",
            // A backslash is a slash to a URL parser here (found by the fuzz test below).
            "http://\\//{{ labels.h }}",
            "https://\\{{ labels.h }}/x",
        ] {
            let e = Template::compile(&sb, src, Quoting::Url).unwrap_err();
            assert!(e.message.contains("host"), "{src}: {}", e.message);
        }
    }

    #[test]
    fn promql_holes_are_literals_or_numbers() {
        let got = render(
            r#"up{instance="{{ labels.instance }}"}"#,
            Quoting::PromQl,
            "x\"} or vector(1) #",
        )
        .unwrap();
        assert_eq!(got, r#"up{instance="x\"} or vector(1) #"}"#);
        // Only the literal's own quote is escaped: Prometheus refuses `\'` inside "…" and `\"`
        // inside '…' (found against a real Prometheus, tests/suite/verify.rs).
        assert_eq!(
            render(
                "up{a='{{ labels.instance }}'}",
                Quoting::PromQl,
                "it's \"x\""
            )
            .unwrap(),
            r#"up{a='it\'s "x"'}"#
        );
        assert_eq!(
            render(
                r#"up{a="{{ labels.instance }}"}"#,
                Quoting::PromQl,
                "it's `x`"
            )
            .unwrap(),
            r#"up{a="it's `x`"}"#
        );
        let got = render_v(
            r#"up{instance=~"{{ labels.instance }}"}"#,
            Quoting::PromQl,
            "a.*|b",
        )
        .unwrap();
        assert_eq!(got, r#"up{instance=~"a\\.\\*\\|b"}"#);
        let e = render_v(
            "up < {{ labels.instance }}",
            Quoting::PromQl,
            "0 or vector(1)",
        )
        .unwrap_err();
        assert!(e.contains("number"), "{e}");
        assert_eq!(
            render_v("up < {{ 0.5 * 2 }}", Quoting::PromQl, "x").unwrap(),
            "up < 1.0"
        );
        let sb = Sandbox::new();
        let e = Template::compile(&sb, "up{a=`{{ labels.x }}`}", Quoting::PromQl).unwrap_err();
        assert!(e.message.contains("raw"), "{}", e.message);
    }

    /// A value reaching bash arithmetic through a variable: `$(…)` in a subscript would run.
    #[test]
    fn values_with_substitutions_are_refused_where_the_command_does_arithmetic() {
        let src = "v={{ labels.instance }}; if ((v > 90)); then logger full; fi";
        for hostile in ["a[$(touch x)]", "a[`touch x`]", "$v"] {
            let e = render(src, Quoting::Shell, hostile).unwrap_err();
            assert!(e.contains("arithmetic"), "{hostile}: {e}");
        }
        assert_eq!(
            render(src, Quoting::Shell, "95").unwrap(),
            "v='95'; if ((v > 90)); then logger full; fi"
        );
        // Without arithmetic, the same value is data.
        assert_eq!(
            render(
                "logger {{ labels.instance }}",
                Quoting::Shell,
                "a[$(touch x)]"
            )
            .unwrap(),
            "logger 'a[$(touch x)]'"
        );
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

    /// Generated commands and hostile values, run by real shells. A hole is `{{
    /// labels.instance }}`; every value is one the alert could send.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;
        use std::path::Path;
        use std::process::{Command, Stdio};
        use std::time::{Duration, Instant};

        const HOLE: &str = "{{ labels.instance }}";

        /// Runs `command` with `shell -c` in `dir`, two lines on stdin (so that a sed or awk
        /// script has input to run on), at most 5 s; its stdout.
        fn run(shell: &str, command: &str, dir: &Path) -> Vec<u8> {
            use std::io::Write;
            let mut child = Command::new(shell)
                .arg("-c")
                .arg(command)
                .current_dir(dir)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{shell}: {e}"));
            // The command may exit before it reads: a broken pipe is not a failure.
            let _ = child.stdin.take().unwrap().write_all(b"a\nb\n");
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("{shell} -c {command:?} ran past 5 s");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            child.wait_with_output().unwrap().stdout
        }

        /// The shells a command may meet on a host: POSIX `sh` (dash here) and bash.
        const SHELLS: &[&str] = &["sh", "bash"];

        /// Pieces of commands as SREs write them, and of ones they get wrong: quotes,
        /// substitutions, separators, here-documents, redirections, options, paths, keywords
        /// and programs that run their arguments as code. Nothing here runs anything but
        /// builtins and harmless programs on the scratch directory.
        const COMMAND_PIECES: &[&str] = &[
            "printf '%s\\n' ",
            "echo ",
            "cat ",
            ": ",
            "true ",
            "x",
            "y ",
            " ",
            "-- ",
            "-n ",
            "'",
            "\"",
            "\\",
            "$(",
            ")",
            "`",
            "$",
            "${",
            "}",
            "{ ",
            "(",
            ";",
            "; ",
            "|",
            "&&",
            "||",
            "\n",
            "#",
            "<<EOF\n",
            "\nEOF\n",
            "<<-E\n",
            "> ",
            ">",
            "< ",
            "2>&1",
            "=",
            "v=",
            "a/",
            "/",
            ".",
            "*",
            "?",
            "~",
            "$((",
            "))",
            "$'",
            "if ",
            "then ",
            "fi",
            "env ",
            "sh -c ",
            "eval ",
            "bash -c ",
            "$1",
            "${v}",
            "$v",
            "--x=",
            "[[ ",
            " ]]",
            " -eq ",
            "(( ",
            " ))",
            "let ",
            "declare -i v=",
            "test ",
            "[ ",
            " ]",
            "export ",
            "read ",
            "printf -v ",
            "local ",
            "$[",
            "]",
            "${a[",
            "a[",
            "]=1",
            "${v:",
            "v",
            "${#",
            "declare -A h; h[",
            "sed ",
            "awk ",
            "python3 -c ",
            "perl -e ",
            "perl -ne ",
            "python3 -Ic ",
            "| sh",
            "| bash -s",
            "| xargs ",
            "<<< ",
            "sudo -u x ",
            "trap ",
            "builtin ",
            "s/a/",
            "/g",
            "'{print}' ",
            "EXIT",
            HOLE,
            HOLE,
        ];

        /// Pieces of URLs around holes: schemes, hosts, ports, user info, paths, queries and
        /// fragments, and what parsers read as separators.
        const URL_PIECES: &[&str] = &[
            "http://",
            "https://",
            "//",
            "good.example",
            ":8080",
            "user@",
            "[::1]",
            "/",
            "/a",
            "/a/",
            "?",
            "?q=",
            "&",
            "#",
            "\\",
            "@",
            ":",
            ".",
            "%2F",
            "=",
            HOLE,
            HOLE,
            HOLE,
        ];

        /// Pieces of values that would move a request elsewhere if written raw.
        const URL_VALUE_PIECES: &[&str] = &[
            "/",
            "\\",
            "?",
            "#",
            "@",
            ":",
            "..",
            ".",
            "%2e",
            "%2F",
            "evil.example",
            "//evil.example",
            "http://evil.example",
            "&q=x",
            "=",
            " ",
            "\t",
            "\n",
            "é",
            "\u{ff0f}",
            "%",
            "+",
            ";",
        ];

        /// Pieces of hostile values: each `touch` creates `marker` if it ever runs.
        fn value_pieces(marker: &str) -> Vec<String> {
            let t = format!("touch {marker}");
            let mut pieces: Vec<String> = [
                "'", "\"", "\\", "`", "$", " ", "\n", "\t", ";", "|", "&", "#", "*", "?", "~", "-",
                "--", "/", "..", "{", "}", "(", ")", "<", ">", "!", "%s", "${IFS}", "$'", "é",
                "\u{202e}", "\r",
            ]
            .map(String::from)
            .to_vec();
            for shape in [
                "$({t})",
                "`{t}`",
                ";{t};",
                "\n{t}\n",
                "|{t}",
                "&&{t}",
                "||{t};",
                "'$({t})'",
                "\"$({t})\"",
                "'; {t}; '",
                "\"; {t}; \"",
                "$'\\n{t}'",
                "\\\n{t}",
                "a[$({t})]",
                "x[`{t}`]",
                "/;e {t}\n#",
                "x/;e {t}\n#",
                "{t}",
                "1e {t}\n",
                "{{system(\"{t}\")}}",
                "__import__('os').system('{t}')",
                "system(q({t}))",
                "BEGIN {{ system(\"{t}\") }}",
            ] {
                pieces.push(shape.replace("{t}", &t));
            }
            pieces
        }

        fn pieces(from: Vec<String>, len: std::ops::Range<usize>) -> impl Strategy<Value = String> {
            prop::collection::vec(prop::sample::select(from), len).prop_map(|p| p.concat())
        }

        /// Commands as written, one hole in each: a program and what it needs after its
        /// arguments, the hole in a context, then either that ending or another. Where random
        /// pieces seldom build `sed 's/a/…/'` or `find … -exec sh -c … \;`.
        #[rustfmt::skip]
        fn shaped() -> impl Strategy<Value = String> {
            let programs = &[
                ("printf '%s\\n' ", ""), ("echo ", ""), ("sed ", ""), ("sed -e ", ""),
                ("awk ", ""), ("python3 -c ", ""), ("perl -e ", ""), ("trap ", " EXIT"),
                ("read ", ""), ("let ", ""), ("[[ ", " -gt 1 ]]"), ("(( ", " ))"),
                ("declare -i v=", ""), ("export ", ""), ("eval ", ""), ("sh -c ", ""),
                ("bash -c ", ""), ("builtin eval ", ""), ("env ", ""), ("printf -v ", " x"),
                ("test -v ", ""), ("v=", "; echo $((v))"), ("v=", "; (( v > 1 ))"),
                ("v=", "; a[v]=1"), ("unset ", ""), ("$1sh -c ", ""), ("cat >&", ""),
                ("echo >& ", ""), ("xargs ", ""), ("timeout 5 ", ""), ("command ", ""),
                ("local v=", ""), ("a[", "]=1"), ("echo $[", "]"), ("echo ${a[", "]}"),
                ("( (echo ", ") )"), ("cat <<EOF\n$(\nEOF\n ", ""),
                ("find . -maxdepth 0 -exec sh -c ", " \\;"), ("find . -maxdepth 0 -exec ", " \\;"),
            ];
            let before = &["", "-n ", "-- ", "x ", "1 "];
            let contexts = &[
                ("", ""), ("'", "'"), ("\"", "\""), ("x", ""), ("a/", ""), ("--x=", ""),
                ("'1e ", "'"), ("\"s/a/", "/\""), ("'{print \"", "\"}'"), ("$", ""),
            ];
            let others = &["", " f", " < /dev/null", " 2>&1", " EXIT", "; echo $((v))"];
            (
                prop::sample::select(programs.to_vec()),
                prop::sample::select(before.to_vec()),
                prop::sample::select(contexts.to_vec()),
                prop_oneof![Just(None), prop::sample::select(others.to_vec()).prop_map(Some)],
            )
                .prop_map(|((p, end), b, (open, close), other)| {
                    format!("{p}{b}{open}{HOLE}{close}{}", other.unwrap_or(end))
                })
        }

        proptest! {
            /// Whatever the command around a hole, if `reflex check` accepts it, no value
            /// runs anything: the value is data in the context the lexer found, or the
            /// render refuses it.
            #[test]
            fn no_value_runs_code_in_a_command_the_lexer_accepts(
                command in prop_oneof![
                    shaped(),
                    (
                        pieces(COMMAND_PIECES.iter().map(|p| p.to_string()).collect(), 1..14),
                        pieces(COMMAND_PIECES.iter().map(|p| p.to_string()).collect(), 0..4),
                    )
                        .prop_map(|(command, rest)| format!("{command}{HOLE}{rest}")),
                ],
                picks in prop::collection::vec(0..1000_usize, 4),
            ) {
                let sb = Sandbox::new();
                let Ok(template) = Template::compile(&sb, &command, Quoting::Shell) else {
                    return Ok(());
                };
                let scratch = tempfile::tempdir().unwrap();
                let markers = tempfile::tempdir().unwrap();
                let marker = markers.path().join("ran");
                let pieces = value_pieces(&marker.display().to_string());
                // Values of one to four pieces, picked by the generated numbers.
                for n in 1..=picks.len() {
                    let value: String = picks[..n].iter().map(|i| pieces[i % pieces.len()].as_str()).collect();
                    let Ok(rendered) = template.render(&sb, &mut alert_scope(&alert(&value))) else {
                        continue;
                    };
                    let rendered = rendered.as_str().unwrap().to_string();
                    for shell in SHELLS {
                        run(shell, &rendered, scratch.path());
                        prop_assert!(
                            !marker.exists(),
                            "{shell} ran the value's code: template {command:?}, value {value:?}, \
                             rendered {rendered:?}"
                        );
                    }
                }
            }

            /// Whatever the URL around its holes, if it compiles, no value changes where the
            /// request goes (scheme, host, port, as the URL is parsed to be sent) or how many
            /// segments its path has, and each query value reads back as itself.
            #[test]
            fn no_value_moves_a_url_to_another_host_or_path(
                url in pieces(URL_PIECES.iter().map(|p| p.to_string()).collect(), 1..8),
                values in prop::collection::vec(
                    pieces(URL_VALUE_PIECES.iter().map(|p| p.to_string()).collect(), 1..5),
                    1..4,
                ),
            ) {
                let sb = Sandbox::new();
                let Ok(template) = Template::compile(&sb, &url, Quoting::Url) else {
                    return Ok(());
                };
                let rendered = |value: &str| {
                    let out = template.render(&sb, &mut alert_scope(&alert(value))).ok()?;
                    Some(out.as_str().unwrap().to_string())
                };
                let Some(Ok(benign)) = rendered("v").map(|u| reqwest::Url::parse(&u)) else {
                    return Ok(());
                };
                let place = |u: &reqwest::Url| {
                    let segments = u.path_segments().map_or(0, |s| s.count());
                    (u.scheme().to_string(), u.host_str().map(String::from), u.port(), segments)
                };
                for value in values {
                    let Some(text) = rendered(&value) else { continue };
                    let parsed = reqwest::Url::parse(&text);
                    prop_assert!(parsed.is_ok(), "{:?} with {:?}: {:?}", url, value, text);
                    let parsed = parsed.unwrap();
                    prop_assert_eq!(
                        place(&parsed), place(&benign),
                        "{:?} with {:?}: {}", url, value, text
                    );
                    // The one `?`, and the hole its only value.
                    let query = format!("?q={HOLE}");
                    if url.ends_with(&query) && url.matches(['?', '#']).count() == 1 && url.matches(HOLE).count() == 1 {
                        let q = parsed.query_pairs().find(|(k, _)| k == "q").map(|(_, v)| v.into_owned());
                        prop_assert_eq!(q.as_deref(), Some(value.as_str()), "{}", text);
                    }
                }
            }

            /// In each of the three contexts a hole can have, any value arrives as exactly
            /// itself, in `sh` and in bash.
            #[test]
            fn any_value_arrives_as_itself_in_each_quoting(
                value in "[^\u{0}]{1,24}",
            ) {
                let scratch = tempfile::tempdir().unwrap();
                for (command, expected) in [
                    (format!("printf '%s' x{HOLE}"), format!("x{value}")),
                    (format!("printf '%s' 'a{HOLE}b'"), format!("a{value}b")),
                    (format!("printf '%s' \"a{HOLE}b\""), format!("a{value}b")),
                ] {
                    let rendered = render(&command, Quoting::Shell, &value).unwrap();
                    for shell in SHELLS {
                        let out = run(shell, rendered.as_str().unwrap(), scratch.path());
                        prop_assert_eq!(
                            String::from_utf8_lossy(&out), expected.as_str(),
                            "{} -c {:?}", shell, rendered
                        );
                    }
                }
            }
        }
    }
}
