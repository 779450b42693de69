//! CEL expressions: router conditions, transform expressions and map lists.
//!
//! CEL is deliberately not a general-purpose language: no loops beyond bounded
//! comprehensions over existing values, no I/O, no way to define functions. On top of
//! that we bound the source size and the syntax tree's depth, and the steps an expression
//! reads (`steps.<id>…`) are found statically to become dependencies, exactly like for
//! templates.

use crate::template::References;
use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue};
use cel::objects::Key;
use cel::{Context, Env, Program};
use serde_json::Value;
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, OnceLock};

pub const MAX_EXPRESSION_BYTES: usize = 4 * 1024;
/// Nesting deeper than this is rejected (it also bounds recursion while evaluating).
pub const MAX_DEPTH: usize = 48;
/// Brackets nested deeper than this are rejected before parsing.
pub const MAX_BRACKETS: usize = 32;
/// Operators per expression, checked before parsing.
pub const MAX_OPERATORS: usize = 256;

/// The CEL parser (generated, recursive descent) uses a lot of stack per level: in a debug
/// build 12 nested parentheses or 100 chained `+` overflow a 2 MB thread, and a stack
/// overflow aborts the process instead of returning an error. Parsing (once per definition)
/// therefore runs on a stack of its own with this much room (`stacker`: a mapping reserved,
/// not committed, and released after), and the lexical limits above keep inputs well inside
/// it: 1,000 chained operators or 64 nested brackets were measured to fit in it.
const PARSE_STACK_BYTES: usize = 64 << 20;

/// Evaluation happens at run time, for every router, expression transform and map, on the
/// runner's one thread, so it must not pay for a stack of its own. It recurses once per
/// level of the syntax tree, which [`MAX_DEPTH`] bounds, and of the values (serde_json
/// parses at most 128 levels): the deepest the limits let through were measured to need at
/// most 150 KB of stack in a release build and 1.9 MB in a debug one, whose frames are far
/// larger (measured by bisecting a thread's stack size under the test below). An evaluation that starts with less than this left
/// moves to a fresh stack of `EVAL_STACK_BYTES`; one with more (always, on a release
/// runner's 8 MB main thread or a 2 MB worker) costs a comparison.
const EVAL_RED_ZONE_BYTES: usize = if cfg!(debug_assertions) { 4 << 20 } else { 512 << 10 };
const EVAL_STACK_BYTES: usize = 8 << 20;

/// Rejects inputs the parser cannot take safely: deep brackets, long operator chains.
/// String literals are skipped, so `'((((('` is fine.
fn lexical_limits(source: &str) -> Result<(), ExprError> {
    let (mut depth, mut max_depth, mut operators) = (0usize, 0usize, 0usize);
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in source.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '"' => quote = Some(c),
            '(' | '[' | '{' => {
                depth += 1;
                max_depth = max_depth.max(depth);
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            '+' | '-' | '*' | '/' | '%' | '&' | '|' | '=' | '!' | '<' | '>' | '?' => operators += 1,
            _ => {}
        }
    }
    if max_depth > MAX_BRACKETS {
        return Err(ExprError(format!("brackets nest {max_depth} deep; the limit is {MAX_BRACKETS}")));
    }
    if operators > MAX_OPERATORS {
        return Err(ExprError(format!("{operators} operator characters; the limit is {MAX_OPERATORS}")));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ExprError(pub String);

/// A compiled expression with the variables it reads.
pub struct Expression {
    source: String,
    program: Program,
    pub references: References,
}

impl Expression {
    pub fn source(&self) -> &str {
        &self.source
    }
}

impl std::fmt::Debug for Expression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Expression").field("source", &self.source).finish_non_exhaustive()
    }
}

/// Two expressions are the same when written the same.
impl PartialEq for Expression {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// Parses `source`, checks the limits and lists what it reads. `roots` are the top-level
/// names available where the expression runs (`input`, `steps`, and in maps `item`, `index`).
pub fn compile(source: &str, roots: &[&str]) -> Result<Expression, ExprError> {
    if source.len() > MAX_EXPRESSION_BYTES {
        return Err(ExprError(format!("expression is {} bytes; the limit is {MAX_EXPRESSION_BYTES}", source.len())));
    }
    if source.trim().is_empty() {
        return Err(ExprError("expression is empty".into()));
    }
    lexical_limits(source)?;
    stacker::grow(PARSE_STACK_BYTES, || {
        // The parser is third-party code fed untrusted input: a panic there must become an
        // error for this definition, not a crashed function.
        let program = catch_unwind(AssertUnwindSafe(|| Program::compile(source)))
            .map_err(|_| ExprError("expression could not be parsed".into()))?
            .map_err(|e| ExprError(format!("does not parse: {}", first_line(&e.to_string()))))?;
        let mut references = References::default();
        // A tree too deep is rejected here, and dropped (recursively) on this stack.
        walk(program.expression(), 0, roots, &mut Vec::new(), &mut references)?;
        Ok(Expression { source: source.to_owned(), program, references })
    })
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// Collects `steps.<id>` reads and unknown top-level names; enforces the depth limit.
/// `bound` holds comprehension variables (`x` in `list.map(x, …)`), which are not roots.
fn walk(node: &IdedExpr, depth: usize, roots: &[&str], bound: &mut Vec<String>, refs: &mut References) -> Result<(), ExprError> {
    if depth > MAX_DEPTH {
        return Err(ExprError(format!("expression nests deeper than {MAX_DEPTH} levels")));
    }
    let next = depth + 1;
    match &node.expr {
        Expr::Ident(name) => {
            if !bound.contains(name) && !roots.contains(&name.as_str()) {
                refs.unknown_roots.insert(name.clone());
            }
            if name == "steps" && !bound.contains(name) {
                // `steps` used whole (or indexed dynamically): the dependency is unknowable.
                refs.dynamic_step_access = true;
            }
        }
        Expr::Select(select) => {
            if let Expr::Ident(root) = &select.operand.expr
                && root == "steps"
                && !bound.contains(root)
            {
                refs.steps.insert(select.field.clone());
                return Ok(());
            }
            walk(&select.operand, next, roots, bound, refs)?;
        }
        Expr::Call(call) => {
            // `steps["id"]` is a static read too.
            if call.func_name == "_[_]"
                && let [target, key] = call.args.as_slice()
                && let (Expr::Ident(root), Expr::Literal(LiteralValue::String(id))) = (&target.expr, &key.expr)
                && root == "steps"
            {
                refs.steps.insert(id.to_string());
                return Ok(());
            }
            if let Some(target) = &call.target {
                walk(target, next, roots, bound, refs)?;
            }
            for arg in &call.args {
                walk(arg, next, roots, bound, refs)?;
            }
        }
        Expr::Comprehension(c) => {
            walk(&c.iter_range, next, roots, bound, refs)?;
            walk(&c.accu_init, next, roots, bound, refs)?;
            bound.push(c.iter_var.clone());
            bound.push(c.accu_var.clone());
            for part in [&c.loop_cond, &c.loop_step, &c.result] {
                walk(part, next, roots, bound, refs)?;
            }
            bound.pop();
            bound.pop();
        }
        Expr::List(list) => {
            for e in &list.elements {
                walk(e, next, roots, bound, refs)?;
            }
        }
        Expr::Map(map) => {
            for entry in &map.entries {
                if let EntryExpr::MapEntry(e) = &entry.expr {
                    walk(&e.key, next, roots, bound, refs)?;
                    walk(&e.value, next, roots, bound, refs)?;
                }
            }
        }
        Expr::Struct(s) => {
            for entry in &s.entries {
                if let EntryExpr::StructField(f) = &entry.expr {
                    walk(&f.value, next, roots, bound, refs)?;
                }
            }
        }
        Expr::Literal(_) | Expr::Unspecified => {}
    }
    Ok(())
}

impl Expression {
    /// Evaluates against `variables` (a JSON object: its keys become CEL variables).
    pub fn evaluate(&self, variables: &Value) -> Result<Value, ExprError> {
        stacker::maybe_grow(EVAL_RED_ZONE_BYTES, EVAL_STACK_BYTES, || self.evaluate_on_this_stack(variables))
    }

    fn evaluate_on_this_stack(&self, variables: &Value) -> Result<Value, ExprError> {
        // The standard library's function table, built once (`Context::default` builds it
        // on every call, which was most of an evaluation's cost).
        static STDLIB: OnceLock<Arc<Env>> = OnceLock::new();
        let mut context = Context::with_env(STDLIB.get_or_init(|| Arc::new(Env::stdlib())).clone());
        if let Value::Object(map) = variables {
            for (name, value) in map {
                context.add_variable_from_value(name.clone(), to_cel(value));
            }
        }
        let result = catch_unwind(AssertUnwindSafe(|| self.program.execute(&context)))
            .map_err(|_| ExprError("expression evaluation failed".into()))?
            .map_err(|e| ExprError(e.to_string()))?;
        result.json().map_err(|e| ExprError(format!("the result is not JSON: {e}")))
    }

    /// Evaluates a condition; anything but a bool is an error, never silently false.
    pub fn evaluate_bool(&self, variables: &Value) -> Result<bool, ExprError> {
        match self.evaluate(variables)? {
            Value::Bool(b) => Ok(b),
            other => Err(ExprError(format!("a condition must be true or false, got {}", type_name(&other)))),
        }
    }
}

/// JSON → CEL. Integers become CEL `int` (not `uint`, which serde would pick for positive
/// numbers): CEL refuses mixed `int`/`uint` arithmetic, and JSON has no unsigned type, so
/// `input.count * 2` must work.
fn to_cel(value: &Value) -> cel::Value {
    match value {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => cel::Value::Int(i),
            (None, Some(u)) => cel::Value::UInt(u),
            _ => cel::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Array(items) => cel::Value::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(map) => {
            let entries: HashMap<Key, cel::Value> = map.iter().map(|(k, v)| (Key::String(Arc::new(k.clone())), to_cel(v))).collect();
            cel::Value::Map(cel::objects::Map { map: Arc::new(entries) })
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ROOTS: [&str; 2] = ["input", "steps"];

    #[test]
    fn finds_step_references_statically() {
        let e = compile("steps.sentiment.output.label == 'negative' && size(steps['extract'].output.issues) > 2", &ROOTS).unwrap();
        assert_eq!(e.references.steps.iter().map(String::as_str).collect::<Vec<_>>(), ["extract", "sentiment"]);
        assert!(e.references.unknown_roots.is_empty() && !e.references.dynamic_step_access);
    }

    #[test]
    fn comprehension_variables_are_not_unknown_roots() {
        let e = compile("steps.a.output.items.filter(x, x.score > 0.5).map(x, x.name)", &ROOTS).unwrap();
        assert!(e.references.unknown_roots.is_empty(), "{:?}", e.references.unknown_roots);
        let e = compile("item.name", &ROOTS).unwrap();
        assert!(e.references.unknown_roots.contains("item"));
    }

    #[test]
    fn dynamic_step_access_is_flagged() {
        assert!(compile("steps[input.which].output", &ROOTS).unwrap().references.dynamic_step_access);
        assert!(compile("size(steps) > 0", &ROOTS).unwrap().references.dynamic_step_access);
    }

    #[test]
    fn evaluates_against_json() {
        let vars = json!({ "steps": { "s": { "output": { "label": "negative", "n": 3 } } }, "input": { "xs": [1, 2, 3] } });
        assert!(compile("steps.s.output.label == 'negative'", &ROOTS).unwrap().evaluate_bool(&vars).unwrap());
        assert_eq!(compile("input.xs.map(x, x * 2)", &ROOTS).unwrap().evaluate(&vars).unwrap(), json!([2, 4, 6]));
        assert_eq!(compile("{'n': steps.s.output.n + 1}", &ROOTS).unwrap().evaluate(&vars).unwrap(), json!({ "n": 4 }));
        assert_eq!(compile("size(input.xs) == 3 && input.xs[0] < 2.5", &ROOTS).unwrap().evaluate(&vars).unwrap(), json!(true));
    }

    #[test]
    fn conditions_must_be_booleans() {
        let err = compile("'yes'", &ROOTS).unwrap().evaluate_bool(&json!({})).unwrap_err();
        assert!(err.0.contains("string"), "{err}");
    }

    #[test]
    fn rejects_oversize_deep_and_broken_expressions() {
        assert!(compile(&"1 + ".repeat(2000), &ROOTS).unwrap_err().0.contains("limit"));
        assert!(compile(&format!("{}1{}", "(".repeat(200), ")".repeat(200)), &ROOTS).unwrap_err().0.contains("nest"));
        assert!(compile(&format!("{}1", "1+".repeat(1000)), &ROOTS).unwrap_err().0.contains("operator"));
        // The deepest inputs the limits let through parse without exhausting the stack.
        assert!(compile(&format!("{}1{}", "(".repeat(MAX_BRACKETS), ")".repeat(MAX_BRACKETS)), &ROOTS).is_ok());
        assert!(compile(&format!("{}1", "1+".repeat(MAX_OPERATORS)), &ROOTS).is_err(), "tree depth limit");
        assert!(compile("'(((((((((((((((((((((((((((((((((((((((('", &ROOTS).is_ok(), "string contents are not brackets");
        assert!(compile("steps.a.output ==", &ROOTS).unwrap_err().0.contains("parse"));
        assert!(compile("  ", &ROOTS).is_err());
    }

    /// For each shape of nesting, the deepest instance the limits let through, with input
    /// that makes it evaluate all the way down; and the deepest values (serde_json parses
    /// at most 128 levels) compared and returned whole.
    fn deepest_expressions() -> Vec<(String, Value)> {
        let nested = |n: usize| (0..n).fold(json!(1), |inner, _| json!({ "a": inner }));
        type Shape = Box<dyn Fn(usize) -> String>;
        let shapes: Vec<(Shape, Value)> = vec![
            (Box::new(|n| format!("{}true", "!".repeat(n))), json!({})),
            (Box::new(|n| format!("{}1", "-".repeat(n))), json!({})),
            (Box::new(|n| format!("{}1", "1 + ".repeat(n))), json!({})),
            (Box::new(|n| format!("true{}", " && true".repeat(n))), json!({})),
            (Box::new(|n| format!("{}1{}", "[".repeat(n), "]".repeat(n))), json!({})),
            (Box::new(|n| format!("{}1{}", "string(".repeat(n), ")".repeat(n))), json!({})),
            (Box::new(|n| format!("{}1{}", "true ? (".repeat(n), ") : 0".repeat(n))), json!({})),
            (Box::new(|n| format!("input{}", ".a".repeat(n))), json!({ "input": nested(100) })),
            (Box::new(|n| format!("input.xs{}", "[0]".repeat(n))), json!({ "input": { "xs": (0..60).fold(json!(1), |inner, _| json!([inner])) } })),
            (Box::new(|n| format!("{}1{}", "input.xs.map(x, ".repeat(n), ")".repeat(n))), json!({ "input": { "xs": [1, 2] } })),
            (Box::new(|n| format!("{}1{}", "{'k': ".repeat(n), "}".repeat(n))), json!({})),
            (Box::new(|n| format!("[{}1]", "1, ".repeat(n))), json!({})),
        ];
        shapes
            .into_iter()
            .map(|(shape, input)| {
                // The limits are monotonic in n: find the last n that compiles.
                let (mut ok, mut too_deep) = (1, 2048);
                assert!(compile(&shape(ok), &ROOTS).is_ok() && compile(&shape(too_deep), &ROOTS).is_err());
                while too_deep - ok > 1 {
                    let mid = (ok + too_deep) / 2;
                    if compile(&shape(mid), &ROOTS).is_ok() { ok = mid } else { too_deep = mid }
                }
                (shape(ok), input)
            })
            .chain([
                ("input.a == input.b".to_owned(), json!({ "input": { "a": nested(126), "b": nested(126) } })),
                ("input.a".to_owned(), json!({ "input": { "a": nested(126) } })),
            ])
            .collect()
    }

    #[test]
    fn evaluates_the_deepest_expressions_the_limits_allow() {
        let compiled: Vec<(Expression, Value)> = deepest_expressions().into_iter().map(|(s, i)| (compile(&s, &ROOTS).unwrap(), i)).collect();
        // 2 MB, a tokio worker's stack and a quarter of a runner's main thread.
        std::thread::scope(|scope| {
            let evaluate = || {
                for (e, input) in &compiled {
                    assert!(e.evaluate(input).is_ok(), "{}: {:?}", e.source(), e.evaluate(input));
                }
            };
            std::thread::Builder::new().stack_size(2 << 20).spawn_scoped(scope, evaluate).unwrap().join().unwrap();
        });
    }

    #[test]
    fn missing_fields_are_errors_not_nulls() {
        let err = compile("input.nope == 1", &ROOTS).unwrap().evaluate(&json!({ "input": {} })).unwrap_err();
        assert!(!err.0.is_empty());
    }
}
