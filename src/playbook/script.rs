//! The one sandboxed Rhai engine: `when` conditions, template holes, computed parameters and
//! script steps all run here, compiled once at load.
//!
//! Sandbox: no file, network or module access (module resolution is disabled, `eval` is
//! disabled), and hard limits on operations, call depth, expression depth and data sizes so
//! that a script cannot hang a worker or exhaust memory.

use crate::alert::Alert;
use rhai::{AST, Dynamic, Engine, Scope};

/// Operations one evaluation may perform: far above any sane condition or script, far below
/// what would hold a worker for noticeable time (about 1 ms per 10k operations).
pub const MAX_OPERATIONS: u64 = 200_000;
/// Nested function calls.
pub const MAX_CALL_LEVELS: usize = 32;
/// Longest string a script may build.
pub const MAX_STRING_SIZE: usize = 64 * 1024;
/// Largest array or map a script may build.
pub const MAX_COLLECTION_SIZE: usize = 10_000;

/// A sandboxed Rhai engine.
pub struct Sandbox {
    engine: Engine,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    /// Builds the engine with its limits.
    pub fn new() -> Self {
        let mut engine = Engine::new();
        engine
            .set_max_operations(MAX_OPERATIONS)
            .set_max_call_levels(MAX_CALL_LEVELS)
            .set_max_expr_depths(64, 32)
            .set_max_string_size(MAX_STRING_SIZE)
            .set_max_array_size(MAX_COLLECTION_SIZE)
            .set_max_map_size(MAX_COLLECTION_SIZE)
            .set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
        engine.disable_symbol("eval");
        engine.on_print(|s| tracing::info!(target: "reflex::script", "{s}"));
        engine.on_debug(|s, _, _| tracing::debug!(target: "reflex::script", "{s}"));
        // `host("db-1:9100")` -> "db-1": the usual way from an `instance` label to a host name.
        engine.register_fn("host", |s: &str| -> String { strip_port(s).to_string() });
        Sandbox { engine }
    }

    /// Compiles a single expression (template holes, `when`, params).
    pub fn compile_expr(&self, src: &str) -> Result<AST, Located> {
        self.engine.compile_expression(src).map_err(Located::from)
    }

    /// Compiles a script (statements allowed).
    pub fn compile_script(&self, src: &str) -> Result<AST, Located> {
        self.engine.compile(src).map_err(Located::from)
    }

    /// Evaluates a compiled AST in a scope.
    pub fn eval(&self, scope: &mut Scope<'_>, ast: &AST) -> Result<Dynamic, String> {
        self.engine
            .eval_ast_with_scope::<Dynamic>(scope, ast)
            .map_err(|e| e.to_string())
    }
}

/// A compile error with its 1-based line inside the script, when known.
#[derive(Debug)]
pub struct Located {
    /// Line inside the script (1-based).
    pub line: Option<usize>,
    /// The parser's message.
    pub message: String,
}

impl From<rhai::ParseError> for Located {
    fn from(e: rhai::ParseError) -> Self {
        Located {
            line: e.1.line(),
            message: e.0.to_string(),
        }
    }
}

/// `db-1.example:9100` -> `db-1.example`; `[::1]:9100` -> `::1`; no port: unchanged.
pub fn strip_port(s: &str) -> &str {
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => s,
    }
}

/// The scope every expression sees: `alert` (a map of the whole alert), and the shortcuts
/// `labels` and `annotations`.
pub fn alert_scope(alert: &Alert) -> Scope<'static> {
    let mut scope = Scope::new();
    let dynamic = rhai::serde::to_dynamic(alert).unwrap_or(Dynamic::UNIT);
    let labels = rhai::serde::to_dynamic(&alert.labels).unwrap_or(Dynamic::UNIT);
    let annotations = rhai::serde::to_dynamic(&alert.annotations).unwrap_or(Dynamic::UNIT);
    scope.push_constant("alert", dynamic);
    scope.push_constant("labels", labels);
    scope.push_constant("annotations", annotations);
    scope
}

/// Converts a Rhai value to JSON (maps, arrays, strings, numbers, bools; unit is null).
pub fn to_json(value: &Dynamic) -> serde_json::Value {
    rhai::serde::from_dynamic(value).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(src: &str) -> Result<Dynamic, String> {
        let sb = Sandbox::new();
        let ast = sb.compile_script(src).map_err(|e| e.message)?;
        sb.eval(&mut Scope::new(), &ast)
    }

    #[test]
    fn runaway_loop_hits_the_operation_limit() {
        let err = eval("let x = 0; loop { x += 1; }").unwrap_err();
        assert!(err.contains("operations"), "{err}");
    }

    #[test]
    fn deep_recursion_hits_the_call_limit() {
        let err = eval("fn f(n) { f(n + 1) } f(0)").unwrap_err();
        assert!(
            err.to_lowercase().contains("stack") || err.contains("call"),
            "{err}"
        );
    }

    #[test]
    fn huge_strings_and_modules_and_eval_are_refused() {
        assert!(eval("let s = \"x\"; loop { s += s; }").is_err());
        assert!(eval("import \"/etc/passwd\" as p; 1").is_err());
        assert!(eval("eval(\"1\")").is_err());
    }

    #[test]
    fn host_strips_ports() {
        assert_eq!(
            strip_port("db-1.example.internal:9100"),
            "db-1.example.internal"
        );
        assert_eq!(strip_port("[::1]:9100"), "::1");
        assert_eq!(strip_port("db-1"), "db-1");
        assert_eq!(eval("host(\"web-1:9100\")").unwrap().to_string(), "web-1");
    }
}
