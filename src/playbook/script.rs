//! The one sandboxed Rhai engine: `when` conditions, template holes, computed parameters and
//! script steps all run here, compiled once at load.
//!
//! Sandbox: no file, network or module access (module resolution is disabled, `eval` is
//! disabled), no `sleep`, and hard limits on operations, call depth, expression depth and data
//! sizes so that a script cannot hang a worker or exhaust memory. String functions that can
//! grow a string many times over (`replace`) check the size before they allocate, and every
//! evaluation runs under a wall-clock budget ([`Budget`]).
//!
//! Helpers for template holes: `path_segment(x)`, `int(x)`, `one_of(x, [...])`,
//! `or_default(x, "d")`, and the opt-ins `allow_option(x)`, `allow_empty(x)`, `allow_path(x)`
//! that lift one check of [`super::template`] for one hole.

use crate::alert::Alert;
use rhai::{AST, Dynamic, Engine, EvalAltResult, ImmutableString, Scope};
use std::cell::Cell;
use std::time::{Duration, Instant};

/// Operations one evaluation may perform: far above any sane condition or script, far below
/// what would hold a worker for noticeable time (about 1 ms per 10k operations).
pub const MAX_OPERATIONS: u64 = 200_000;
/// Nested function calls.
pub const MAX_CALL_LEVELS: usize = 32;
/// Longest string a script may build.
pub const MAX_STRING_SIZE: usize = 64 * 1024;
/// Largest array or map a script may build.
pub const MAX_COLLECTION_SIZE: usize = 10_000;

/// A value for a template hole, with the checks its hole may skip. Only the `allow_*`
/// functions lift a check: an alert's labels are strings and cannot forge one.
#[derive(Debug, Clone)]
pub struct Unchecked {
    /// The text.
    pub value: String,
    /// May start with `-` where an option could stand.
    pub option: bool,
    /// May be empty.
    pub empty: bool,
    /// May be absolute or hold `..` after a `/`.
    pub path: bool,
}

impl Unchecked {
    /// A value with every check in force.
    pub fn checked(value: String) -> Self {
        Unchecked {
            value,
            option: false,
            empty: false,
            path: false,
        }
    }

    /// The value of a hole: an opted-in value as it is, anything else with every check.
    pub fn from_dynamic(v: Dynamic) -> Self {
        match v.try_cast_result::<Unchecked>() {
            Ok(u) => u,
            Err(v) => Self::checked(v.to_string()),
        }
    }
}

thread_local! {
    /// When the evaluation on this thread must stop (see [`Budget`]).
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    /// Whether an evaluation on this thread was stopped by the deadline.
    static TRIPPED: Cell<bool> = const { Cell::new(false) };
}

/// The wall-clock budget of the evaluations on this thread while it lives: one alert's
/// `when`, parameters and templates together. Past it, evaluation stops with an error and
/// the alert is recorded as failed to plan.
pub struct Budget {
    outer: Option<Instant>,
    outer_tripped: bool,
}

impl Budget {
    /// Starts a budget of `limit` on this thread.
    pub fn start(limit: Duration) -> Budget {
        Budget {
            outer: DEADLINE.replace(Some(Instant::now() + limit)),
            outer_tripped: TRIPPED.replace(false),
        }
    }

    /// Whether an evaluation under this budget ran out of it (and failed for that reason).
    pub fn tripped(&self) -> bool {
        TRIPPED.get()
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        DEADLINE.set(self.outer);
        TRIPPED.set(self.outer_tripped);
    }
}

/// How often (in operations) the budget's clock is read: reading it on every operation would
/// cost more than the operations.
const BUDGET_CHECK_EVERY: u64 = 1024;

/// The names an expression may use, by where it stands: a reference to any other is an
/// error at load (Rhai's strict variables), with the closest name suggested.
pub mod names {
    /// `when`: the alert.
    pub const ALERT: &[&str] = &["alert", "labels", "annotations"];
    /// Parameters, step arguments, targets and script steps: the alert and `params`.
    pub const PLANNED: &[&str] = &["alert", "labels", "annotations", "params"];
    /// A playbook's `report`: also `steps` (outputs by step name) and `run`.
    pub const REPORT: &[&str] = &["alert", "labels", "annotations", "params", "steps", "run"];
    /// A `verify` condition: the query's first sample and all of them.
    pub const CONDITION: &[&str] = &["value", "values"];
}

/// Functions the evaluator provides itself, not as registered functions.
const INTRINSICS: &[&str] = &[
    "print",
    "debug",
    "type_of",
    "is_def_var",
    "is_def_fn",
    "Fn",
    "call",
    "curry",
    "is_shared",
];

/// A sandboxed Rhai engine.
pub struct Sandbox {
    engine: Engine,
    /// Every function a script may call, by name (for the check at load).
    functions: std::collections::HashSet<String>,
}

type Fallible<T> = Result<T, Box<EvalAltResult>>;

fn refuse<T>(message: String) -> Fallible<T> {
    Err(message.into())
}

/// `replace`, but the result's size is known before it is built.
fn bounded_replace(s: &mut ImmutableString, find: &str, with: &str) -> Fallible<()> {
    if find.is_empty() {
        return Ok(());
    }
    let hits = s.matches(find).count();
    let grown = s.len() + hits * with.len().saturating_sub(find.len());
    if grown > MAX_STRING_SIZE {
        return refuse(format!(
            "replace would build a string of {grown} bytes (limit {MAX_STRING_SIZE})"
        ));
    }
    *s = s.replace(find, with).into();
    Ok(())
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
            .set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new())
            .set_strict_variables(true);
        engine.disable_symbol("eval");
        engine.on_print(|s| tracing::info!(target: "reflex::script", text = ?s, "script print"));
        engine.on_debug(
            |s, _, _| tracing::debug!(target: "reflex::script", text = ?s, "script debug"),
        );
        engine.on_progress(|ops| {
            if ops % BUDGET_CHECK_EVERY != 0 {
                return None;
            }
            let late = DEADLINE.get().is_some_and(|d| Instant::now() > d);
            if late {
                TRIPPED.set(true);
            }
            late.then(|| Dynamic::from("time budget exceeded"))
        });
        // A script must not hold a worker by sleeping.
        engine.register_fn("sleep", |_: rhai::INT| -> Fallible<()> {
            refuse("sleep() is not available in playbooks".into())
        });
        engine.register_fn("sleep", |_: rhai::FLOAT| -> Fallible<()> {
            refuse("sleep() is not available in playbooks".into())
        });
        engine.register_fn("replace", bounded_replace);
        engine.register_fn(
            "replace",
            |s: &mut ImmutableString, find: char, with: &str| {
                bounded_replace(s, find.encode_utf8(&mut [0; 4]), with)
            },
        );
        // `host("db-1:9100")` -> "db-1": the usual way from an `instance` label to a host name.
        engine.register_fn("host", |s: &str| -> String { strip_port(s).to_string() });
        engine.register_type_with_name::<Unchecked>("Unchecked");
        engine.register_fn("to_string", |u: &mut Unchecked| u.value.clone());
        engine.register_fn("allow_option", |v: Dynamic| Unchecked {
            option: true,
            ..Unchecked::from_dynamic(v)
        });
        engine.register_fn("allow_empty", |v: Dynamic| Unchecked {
            empty: true,
            ..Unchecked::from_dynamic(v)
        });
        engine.register_fn("allow_path", |v: Dynamic| Unchecked {
            path: true,
            ..Unchecked::from_dynamic(v)
        });
        engine.register_fn("path_segment", |v: Dynamic| -> Fallible<String> {
            let s = v.to_string();
            let bad = s.is_empty() || s == "." || s == ".." || s.contains(['/', '\0']);
            if bad || s.starts_with('-') {
                return refuse(format!(
                    "{s:?} is not a single path segment (non-empty, no `/`, not `.` or `..`, \
                     not starting with `-`)"
                ));
            }
            Ok(s)
        });
        engine.register_fn("int", |v: Dynamic| -> Fallible<rhai::INT> {
            if let Ok(i) = v.as_int() {
                return Ok(i);
            }
            let s = v.to_string();
            s.trim()
                .parse::<rhai::INT>()
                .or_else(|_| refuse(format!("{s:?} is not an integer")))
        });
        engine.register_fn(
            "one_of",
            |v: Dynamic, allowed: rhai::Array| -> Fallible<String> {
                let s = v.to_string();
                if allowed.iter().any(|a| a.to_string() == s) {
                    Ok(s)
                } else {
                    refuse(format!("{s:?} is not one of the allowed values"))
                }
            },
        );
        engine.register_fn("or_default", |v: Dynamic, default: Dynamic| {
            let empty = v.is_unit() || v.clone().into_string().is_ok_and(|s| s.is_empty());
            if empty { default } else { v }
        });
        let functions = engine
            .gen_fn_signatures(true)
            .iter()
            .filter_map(|sig| sig.split('(').next())
            .map(|name| name.rsplit("::").next().unwrap_or(name).to_string())
            .chain(INTRINSICS.iter().map(|s| s.to_string()))
            .collect();
        Sandbox { engine, functions }
    }

    /// Compiles a single expression (template holes, params, conditions) that may use `names`.
    pub fn compile_expr(&self, src: &str, names: &[&str]) -> Result<AST, Located> {
        let ast = self
            .engine
            .compile_expression_with_scope(&scope_of(names), src)
            .map_err(|e| Located::from_parse(e, names))?;
        self.check_calls(&ast)?;
        Ok(ast)
    }

    /// Compiles a script (statements allowed) that may use `names`.
    pub fn compile_script(&self, src: &str, names: &[&str]) -> Result<AST, Located> {
        let ast = self
            .engine
            .compile_with_scope(&scope_of(names), src)
            .map_err(|e| Located::from_parse(e, names))?;
        self.check_calls(&ast)?;
        Ok(ast)
    }

    /// Every function the AST calls exists (a typo is an error at load, not at 3 AM).
    fn check_calls(&self, ast: &AST) -> Result<(), Located> {
        let own: Vec<String> = ast.iter_functions().map(|f| f.name.to_string()).collect();
        let mut unknown = None;
        ast.walk(&mut |path: &[rhai::ASTNode]| {
            let call = match path.last() {
                Some(rhai::ASTNode::Expr(
                    rhai::Expr::FnCall(call, pos) | rhai::Expr::MethodCall(call, pos),
                ))
                | Some(rhai::ASTNode::Stmt(rhai::Stmt::FnCall(call, pos))) => Some((call, pos)),
                _ => None,
            };
            if let Some((call, pos)) = call {
                let name = call.name.as_str();
                let known = call.op_token.is_some()
                    || call.is_qualified()
                    || self.functions.contains(name)
                    || own.iter().any(|f| f == name);
                if !known {
                    unknown = Some((name.to_string(), *pos));
                    return false;
                }
            }
            true
        });
        match unknown {
            None => Ok(()),
            Some((name, pos)) => {
                let hint = did_you_mean(&name, self.functions.iter().map(String::as_str))
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                Err(Located {
                    line: pos.line(),
                    message: format!("unknown function `{name}`{hint}"),
                })
            }
        }
    }

    /// Evaluates a compiled AST in a scope.
    pub fn eval(&self, scope: &mut Scope<'_>, ast: &AST) -> Result<Dynamic, String> {
        self.engine
            .eval_ast_with_scope::<Dynamic>(scope, ast)
            .map_err(|e| match *e {
                EvalAltResult::ErrorTerminated(_, pos) => {
                    format!("time budget exceeded ({pos}); the evaluation was stopped")
                }
                e => e.to_string(),
            })
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

impl Located {
    fn from_parse(e: rhai::ParseError, names: &[&str]) -> Self {
        let message = match &*e.0 {
            rhai::ParseErrorType::VariableUndefined(name) => {
                let hint = did_you_mean(name, names.iter().copied())
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                format!(
                    "unknown variable `{name}` (here: {}){hint}",
                    names.join(", ")
                )
            }
            other => {
                let text = other.to_string();
                if text.contains("'='") {
                    format!("{text} (to compare, write `==`)")
                } else {
                    text
                }
            }
        };
        Located {
            line: e.1.line(),
            message,
        }
    }
}

/// The names an expression may use, for the compiler. Variables, not constants: Rhai's
/// optimizer folds constants of the compile-time scope into the code (`value < 0.01` would
/// become `() < 0.01`).
fn scope_of(names: &[&str]) -> Scope<'static> {
    let mut scope = Scope::new();
    for n in names {
        scope.push(*n, Dynamic::UNIT);
    }
    scope
}

/// The known name closest to `name`, if one is close enough to be a typo of it.
pub fn did_you_mean<'a>(name: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    known
        .map(|k| (edit_distance(name, k), k))
        .filter(|(d, k)| *d <= (k.len().max(name.len()) / 3).max(1))
        .min_by_key(|(d, k)| (*d, k.len()))
        .map(|(_, k)| k)
}

/// Edit distance between two strings, by characters, where swapping two neighbours is one
/// edit (optimal string alignment): `hots` is one edit from `host`.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
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
    // The shortcuts are copies of the alert's own maps, whose strings they share: the alert
    // is converted once, not three times.
    let field = |name: &str| {
        (dynamic.read_lock::<rhai::Map>())
            .and_then(|m| m.get(name).cloned())
            .unwrap_or(Dynamic::UNIT)
    };
    let (labels, annotations) = (field("labels"), field("annotations"));
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
        let ast = sb.compile_script(src, &[]).map_err(|e| e.message)?;
        sb.eval(&mut Scope::new(), &ast)
    }

    #[test]
    fn the_alert_scope_holds_the_alert_and_its_labels_and_annotations_as_shortcuts() {
        let alert = Alert {
            source: "alertmanager",
            status: crate::alert::AlertStatus::Firing,
            labels: [("instance".to_string(), "host-1".to_string())].into(),
            annotations: [("summary".to_string(), "disk".to_string())].into(),
            starts_at: "2026-12-06T00:00:00Z".into(),
            ends_at: None,
            fingerprint: "fp".into(),
            generator_url: None,
            group_key: None,
        };
        let sb = Sandbox::new();
        for (src, want) in [
            ("labels.instance", "host-1"),
            ("alert.labels.instance", "host-1"),
            ("annotations.summary", "disk"),
            ("alert.annotations.summary", "disk"),
            ("alert.fingerprint", "fp"),
            ("alert.status", "firing"),
            ("labels.len() + annotations.len()", "2"),
        ] {
            let ast = sb.compile_script(src, &["alert", "labels", "annotations"]);
            let got = sb.eval(&mut alert_scope(&alert), &ast.unwrap()).unwrap();
            assert_eq!(got.to_string(), want, "{src}");
        }
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
    fn sleep_is_refused_and_replace_is_bounded_before_it_allocates() {
        let e = eval("sleep(5)").unwrap_err();
        assert!(e.contains("not available"), "{e}");
        let e = eval("let s = \"ab\"; s.pad(30000, \"a\"); s.replace(\"a\", s); s").unwrap_err();
        assert!(e.contains("replace would build"), "{e}");
        assert_eq!(
            eval("let s = \"a-b\"; s.replace(\"-\", \"+\"); s")
                .unwrap()
                .to_string(),
            "a+b"
        );
        assert_eq!(
            eval("let s = \"a-b\"; s.replace('-', \"++\"); s")
                .unwrap()
                .to_string(),
            "a++b"
        );
    }

    #[test]
    fn the_budget_stops_a_slow_evaluation() {
        let sb = Sandbox::new();
        let ast = sb
            .compile_script("let x = 0; for i in 0..20000 { x += i; } x", &[])
            .unwrap();
        let ample = Budget::start(Duration::from_secs(60));
        assert!(sb.eval(&mut Scope::new(), &ast).is_ok(), "within budget");
        assert!(!ample.tripped());
        {
            let none = Budget::start(Duration::ZERO);
            let e = sb.eval(&mut Scope::new(), &ast).unwrap_err();
            assert!(e.contains("time budget"), "{e}");
            assert!(none.tripped(), "the budget says it stopped the evaluation");
        }
        assert!(!ample.tripped(), "an inner budget's trip is its own");
    }

    #[test]
    fn helpers_validate_values() {
        assert_eq!(
            eval("path_segment(\"cache\")").unwrap().to_string(),
            "cache"
        );
        for bad in ["..", ".", "", "a/b", "-x"] {
            assert!(eval(&format!("path_segment({bad:?})")).is_err(), "{bad}");
        }
        assert_eq!(eval("int(\" 42 \")").unwrap().as_int().unwrap(), 42);
        assert!(eval("int(\"4; rm\")").is_err());
        assert_eq!(
            eval("one_of(\"b\", [\"a\", \"b\"])").unwrap().to_string(),
            "b"
        );
        assert!(eval("one_of(\"c\", [\"a\", \"b\"])").is_err());
        assert_eq!(
            eval("or_default(\"\", \"web\")").unwrap().to_string(),
            "web"
        );
        assert_eq!(
            eval("or_default(\"api\", \"web\")").unwrap().to_string(),
            "api"
        );
    }

    #[test]
    fn unknown_variables_and_functions_are_load_errors_with_a_suggestion() {
        let sb = Sandbox::new();
        let e = sb.compile_expr("param.host", names::PLANNED).unwrap_err();
        assert!(
            e.message.contains("unknown variable `param`")
                && e.message.contains("did you mean `params`"),
            "{}",
            e.message
        );
        let e = sb
            .compile_expr("hots(labels.instance)", names::PLANNED)
            .unwrap_err();
        assert!(
            e.message.contains("unknown function `hots`")
                && e.message.contains("did you mean `host`"),
            "{}",
            e.message
        );
        let e = sb
            .compile_script("let n = 1;\nlabels.x.lenght()", names::ALERT)
            .unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(
            sb.compile_script("fn f(x) { x + 1 } let y = f(1); y.to_string().len()", &[])
                .is_ok()
        );
        assert!(sb.compile_expr("value = 1", names::CONDITION).is_err());
        // The names are not folded in as constants at compile time.
        let ast = sb.compile_expr("value < 0.01", names::CONDITION).unwrap();
        let mut scope = Scope::new();
        scope.push_constant("value", 0.002_f64);
        assert!(sb.eval(&mut scope, &ast).unwrap().as_bool().unwrap());
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
