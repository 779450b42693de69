//! Prompt and output templates (Jinja, via minijinja).
//!
//! Undefined values are errors (strict mode): a typo such as `{{ input.feedbak }}` must
//! fail the step loudly rather than send the model an empty string. The steps a template
//! reads are found statically, so they become dependencies without being listed twice.
//!
//! A [`Template`] is compiled once, when its definition is validated: that finds its syntax
//! errors and what it reads (for a template made only of text and `{{ a.b }}` slots, without
//! the second parse minijinja's own analysis needs). Whether it also keeps the bytecode is
//! the caller's choice ([`Keep`]), because minijinja makes keeping it expensive: every
//! compiled template reserves room for 256 instructions and 128 line records (about 9 KB),
//! and a kept tiny template still dirties two pages. For a 10,000-step graph that was 52 MB
//! more memory, and the page faults made validation and execution slower than compiling
//! each template again when it renders (about 1 µs, on memory just freed). Most templates
//! need neither: a template of text and `{{ a.b }}` slots renders without minijinja
//! ([`slots`]). So the bytecode is kept for every other template, and for a slot template
//! rendered many times per run (a map's step, once per item, in case its slots do not
//! print plainly); a slot template of a single step keeps only its source, and is compiled
//! (once, then kept) only if its slots need minijinja. The bytecode sits beside its source (a
//! self-referential pair, hence `self_cell`), against one process-wide [`Environment`].
//! (Adding templates to an environment of their graph instead, `add_template_owned`, costs
//! the same memory and two to four times as much time.)
//!
//! A template is untrusted code: every rendering runs on a budget of [`FUEL`] operations
//! and may produce at most [`MAX_RENDERED_BYTES`], so a hostile loop fails the step in
//! milliseconds instead of holding the runner.

mod slots;

pub use slots::{Resolve, Slot, walk};

use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use serde::Serialize;
#[cfg(test)]
use slots::slot_paths;
use slots::{Slots, analyse};
use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

/// The names a template or expression may read at the top level of a step.
pub const STEP_ROOTS: [&str; 2] = ["input", "steps"];
/// Inside a map's sub-step, `item` and `index` are added.
pub const ITEM_ROOTS: [&str; 4] = ["input", "steps", "item", "index"];

/// The operations (bytecode instructions: a lookup, a filter call, an emitted piece; one
/// turn of an empty loop costs four) one rendering may execute. Measured: a prompt listing
/// 500 items with five filtered fields each uses 15,000, a 100 × 100 nested loop 91,000.
/// Exhausting it takes about 20 ms in a release build (200 ms in a debug one), so a runaway
/// template fails its step quickly instead of holding the runner.
pub const FUEL: u64 = 2_000_000;

/// The most text one rendering may produce: a prompt of 1M tokens (the largest context
/// window of any priced model) at 4 bytes a token. No model could take more.
pub const MAX_RENDERED_BYTES: usize = 4 << 20;

fn environment() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // Prompts are plain text, not HTML.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_fuel(Some(FUEL));
        env
    })
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(String);

impl From<minijinja::Error> for TemplateError {
    fn from(e: minijinja::Error) -> Self {
        let line = e.line().map(|l| format!(" (line {l})")).unwrap_or_default();
        match e.kind() {
            ErrorKind::OutOfFuel => TemplateError(format!(
                "the template ran out of its work budget ({FUEL} operations){line}: it loops over too much; render less or split the work across steps"
            )),
            // The only writer is `Bounded`, and it fails only at the size limit.
            ErrorKind::WriteFailure => {
                TemplateError(format!("the rendered text is longer than {MAX_RENDERED_BYTES} bytes{line}: no model could take it"))
            }
            _ => {
                // `Display` of a minijinja error carries the kind, detail and line.
                let mut msg = e.to_string();
                if let Some(detail) = e.detail()
                    && !msg.contains(detail)
                {
                    msg = format!("{msg}: {detail}");
                }
                TemplateError(msg)
            }
        }
    }
}

/// What a template reads, found without rendering it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct References {
    /// Step ids read through `steps.<id>`.
    pub steps: BTreeSet<String>,
    /// Top-level names that are not available where the template runs: an error in a definition.
    pub unknown_roots: BTreeSet<String>,
    /// `steps` used without naming a step (e.g. `steps[name]`): dependencies cannot be
    /// inferred, so the definition must list them in `depends_on`.
    pub dynamic_step_access: bool,
}

/// Borrows the process-wide environment for as long as it borrows its source (which
/// `Environment` being covariant allows).
type Compiled<'source> = minijinja::Template<'source, 'source>;

self_cell::self_cell!(
    /// A template's source and its bytecode, which borrows from it.
    struct Owned {
        owner: Box<str>,
        #[covariant]
        dependent: Compiled,
    }
);

/// What a compiled template keeps (see the module docs for the trade-off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// For a template rendered once per run: a slot template keeps only its source (it
    /// renders without minijinja, or is compiled once the first time it must); any other
    /// keeps its bytecode.
    Source,
    /// The bytecode: for a template rendered many times per run.
    Bytecode,
}

/// A template checked once (syntax, and what it reads) and rendered any number of times;
/// cloning it is cheap.
#[derive(Clone)]
pub struct Template(Arc<Inner>);

enum Body {
    Source(Box<str>),
    Bytecode(Owned),
}

struct Inner {
    body: Body,
    /// Set for a template of text and `{{ a.b }}` slots only, which renders without
    /// minijinja when its slots print plainly (see [`slots`]).
    slots: Option<Slots>,
    /// A source-only template's bytecode, compiled the first time its slots need minijinja
    /// (a value that does not print plainly), then kept: never compiled twice.
    fallback: OnceLock<Owned>,
    references: References,
    /// The names available where it runs, and (bit `i` for `roots[i]`) which it reads.
    roots: &'static [&'static str],
    reads_roots: u64,
}

impl Template {
    /// Compiles `source` and lists what it reads; `roots` are the names available where it
    /// runs (see [`Template::references`]), at most 64.
    pub fn compile(source: &str, roots: &'static [&'static str], keep: Keep) -> Result<Template, TemplateError> {
        let analysed = analyse(source);
        // A plain slot template is valid Jinja by construction (text and `{{ a.b }}`), and
        // one that keeps only its source need not be compiled to be checked.
        let plain = matches!(&analysed, Some((_, Some(_)))) && keep == Keep::Source;
        let compiled = if plain { None } else { Some(Owned::try_new(source.into(), |source| environment().template_from_str(source))?) };
        let mut references = References::default();
        let mut reads_roots = 0u64;
        let mut note = |path: &str| {
            let mut parts = path.split('.');
            let root = parts.next().unwrap_or_default();
            if root == "steps" {
                match parts.next() {
                    Some(step) => {
                        references.steps.insert(step.to_owned());
                    }
                    None => references.dynamic_step_access = true,
                }
            }
            match roots.iter().position(|r| *r == root) {
                Some(i) => reads_roots |= 1u64.checked_shl(i as u32).unwrap_or(0),
                None if root != "steps" && environment().globals().all(|(name, _)| name != root) => {
                    references.unknown_roots.insert(root.to_owned());
                }
                None => {}
            }
        };
        let slots = match analysed {
            Some((paths, slots)) => {
                paths.into_iter().for_each(&mut note);
                slots
            }
            None => {
                if let Some(compiled) = &compiled {
                    compiled.borrow_dependent().undeclared_variables(true).iter().for_each(|path| note(path));
                }
                None
            }
        };
        // Only a plain slot template of a single step keeps just its source.
        let body = compiled.map_or_else(|| Body::Source(source.into()), Body::Bytecode);
        Ok(Template(Arc::new(Inner { body, slots, fallback: OnceLock::new(), references, roots, reads_roots })))
    }

    pub fn source(&self) -> &str {
        match &self.0.body {
            Body::Source(source) => source,
            Body::Bytecode(compiled) => compiled.borrow_owner(),
        }
    }

    /// The steps it reads and the names it reads that `roots` (given to
    /// [`Template::compile`]) do not provide.
    pub fn references(&self) -> &References {
        &self.0.references
    }

    /// Whether it reads the top-level name `root` (`input`, `item`, …): one of the roots
    /// given to [`Template::compile`], or one unknown where it runs.
    pub fn reads(&self, root: &str) -> bool {
        let inner = &self.0;
        match inner.roots.iter().position(|r| *r == root) {
            Some(i) => inner.reads_roots & 1u64.checked_shl(i as u32).unwrap_or(0) != 0,
            None => inner.references.unknown_roots.contains(root),
        }
    }

    /// Renders against `context` (strict: an undefined value is an error), within [`FUEL`]
    /// and [`MAX_RENDERED_BYTES`].
    pub fn render<S: Serialize + Resolve>(&self, context: &S) -> Result<String, TemplateError> {
        if let Some(text) = self.0.slots.as_ref().and_then(|slots| slots.render(self.source(), context, MAX_RENDERED_BYTES)) {
            return Ok(text);
        }
        let mut out = Bounded { text: Vec::with_capacity(self.source().len()), limit: MAX_RENDERED_BYTES };
        match &self.0.body {
            Body::Source(source) => {
                let compiled = match self.0.fallback.get() {
                    Some(compiled) => compiled,
                    None => {
                        let compiled = Owned::try_new(source.clone(), |source| environment().template_from_str(source))?;
                        self.0.fallback.get_or_init(|| compiled)
                    }
                };
                compiled.borrow_dependent().render_captured_to(context, &mut out).map(drop)?
            }
            Body::Bytecode(compiled) => compiled.borrow_dependent().render_captured_to(context, &mut out).map(drop)?,
        }
        // minijinja writes whole `str`s and `Bounded` takes each whole or not at all.
        String::from_utf8(out.text).map_err(|_| TemplateError("the rendered text is not UTF-8".into()))
    }
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Template").field(&self.source()).finish()
    }
}

/// Two templates are the same when written the same.
impl PartialEq for Template {
    fn eq(&self, other: &Self) -> bool {
        self.source() == other.source()
    }
}

/// A rendering's output, refused past `limit` bytes.
struct Bounded {
    text: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len().saturating_add(buf.len()) > self.limit {
            return Err(std::io::Error::other("rendered text too long"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Parses `source` and lists what it reads; `roots` are the names available where it runs.
pub fn references(source: &str, roots: &'static [&'static str]) -> Result<References, TemplateError> {
    Template::compile(source, roots, Keep::Source).map(|t| t.references().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(source: &str, context: &serde_json::Value) -> Result<String, TemplateError> {
        Template::compile(source, &STEP_ROOTS, Keep::Source)?.render(context)
    }

    #[test]
    fn finds_the_steps_a_template_reads() {
        let refs = references("{{ steps.extract.output.issues | join(', ') }} {{ steps.summary.text }} {{ input.x }}", &STEP_ROOTS).unwrap();
        assert_eq!(refs.steps.into_iter().collect::<Vec<_>>(), ["extract", "summary"]);
        assert!(refs.unknown_roots.is_empty());
    }

    #[test]
    fn reports_unknown_top_level_names() {
        let refs = references("{{ inputs.x }}", &STEP_ROOTS).unwrap();
        assert!(refs.unknown_roots.contains("inputs"));
    }

    #[test]
    fn loop_variables_are_not_references() {
        let refs = references("{% for i in steps.a.output %}{{ i }}{% endfor %}{{ range(3) | list }}", &STEP_ROOTS).unwrap();
        assert_eq!(refs.steps.len(), 1);
        assert!(refs.unknown_roots.is_empty(), "{:?}", refs.unknown_roots);
    }

    #[test]
    fn rejects_unparseable_templates_with_position() {
        let err = references("Hello {{ input.name ", &STEP_ROOTS).unwrap_err();
        assert!(err.to_string().contains("syntax error") && err.to_string().contains(":1"), "{err}");
    }

    #[test]
    fn item_and_index_are_roots_only_where_given() {
        assert!(references("{{ item }} {{ index }}", &ITEM_ROOTS).unwrap().unknown_roots.is_empty());
        assert_eq!(references("{{ item }}", &STEP_ROOTS).unwrap().unknown_roots.len(), 1);
    }

    #[test]
    fn strict_rendering_fails_on_undefined_values() {
        let ctx = json!({ "input": { "name": "Ada" } });
        assert_eq!(render("Hi {{ input.name }}", &ctx).unwrap(), "Hi Ada");
        assert!(render("Hi {{ input.nmae }}", &ctx).is_err());
    }

    #[test]
    fn does_not_html_escape_prompts() {
        let ctx = json!({ "input": { "q": "a < b & \"c\"" } });
        assert_eq!(render("{{ input.q }}", &ctx).unwrap(), "a < b & \"c\"");
    }

    #[test]
    fn a_compiled_template_renders_many_times_and_keeps_its_source() {
        for keep in [Keep::Source, Keep::Bytecode] {
            let t = Template::compile("{{ input.n }}!", &STEP_ROOTS, keep).unwrap();
            for n in 0..3 {
                assert_eq!(t.render(&json!({ "input": { "n": n } })).unwrap(), format!("{n}!"));
            }
            assert_eq!(t.source(), "{{ input.n }}!");
            assert!(t.reads("input") && !t.reads("steps"));
            assert_eq!(t, t.clone());
            assert!(t.render(&json!({})).unwrap_err().to_string().contains("undefined"));
        }
        assert_eq!(Template::compile("plain text", &STEP_ROOTS, Keep::Source).unwrap().references(), &References::default());
    }

    fn full_analysis(source: &str) -> BTreeSet<String> {
        environment().template_from_str(source).unwrap().undeclared_variables(true).into_iter().collect()
    }

    #[test]
    fn the_slot_fast_path_agrees_with_the_full_analysis() {
        let templates = [
            "plain",
            "",
            "S1 {{ steps.a.text }} {{steps.b.output}} {{- input.x -}} {{ item }}",
            "{{ steps }} {{ input }} {{ loop }} {{ x.y.z }} }} {",
            "{{ true }} {{ none }} {{ self }} {{--x}} {{ -x }} {{ x - 1 }} {{ '}}' }}",
            "{{ a.b[0] }} {{ a | upper }} {{ f(x) }} {{ steps['a'] }}",
            "{% if x %}{{ y }}{% endif %}{# c #}{{ z }}",
        ];
        for source in templates {
            let full = full_analysis(source);
            if let Some(fast) = slot_paths(source) {
                assert_eq!(fast.into_iter().map(str::to_owned).collect::<BTreeSet<_>>(), full, "{source}");
            }
        }
        assert!(slot_paths(templates[2]).is_some() && slot_paths(templates[3]).is_some());
        assert!(templates[4..].iter().all(|t| slot_paths(t).is_none()));
    }

    fn pieces() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let text = prop::sample::select(&["", "text ", "}} ", "{ ", "-", "{% if x %}y{% endif %}", "{# c #}"][..]).prop_map(str::to_owned);
        let body = prop::sample::select(
            &[
                "steps.a.text",
                "not",
                "and.x",
                "x.not",
                "steps",
                "input.x",
                "item",
                "a.b.c",
                "none",
                "self",
                "-x",
                "x - 1",
                "a|upper",
                "a[0]",
                "'}}'",
                "loop.index",
                "True",
                "x1",
                "_",
                "a.if",
            ][..],
        );
        let edge = prop::sample::select(&["", " ", "-", "- ", " -", "--"][..]);
        let slot = (edge.clone(), body, edge).prop_map(|(l, b, r)| format!("{{{{{l}{b}{}}}}}", r.chars().rev().collect::<String>()));
        prop::collection::vec(prop_oneof![text, slot], 0..6).prop_map(|v| v.concat())
    }

    proptest::proptest! {
        #[test]
        fn the_slot_fast_path_agrees_on_random_templates(source in pieces()) {
            if let (Ok(_), Some(fast)) = (Template::compile(&source, &ITEM_ROOTS, Keep::Source), slot_paths(&source)) {
                let full = full_analysis(&source);
                proptest::prop_assert_eq!(fast.into_iter().map(str::to_owned).collect::<BTreeSet<_>>(), full, "{}", source);
            }
        }
    }

    /// A context with a value of every JSON kind, and strings with the characters a
    /// template's text would otherwise treat specially.
    fn every_kind() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        (any::<i64>(), any::<u64>(), any::<bool>(), "[ -~\n{}<>&\"é]{0,12}", -1e6f64..1e6).prop_map(|(i, u, b, s, f)| {
            json!({ "input": { "i": i, "u": u, "b": b, "s": s, "f": f, "null": null, "list": [1, "a"], "obj": { "k": s, "n": i } } })
        })
    }

    fn slot_templates() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let text = prop::sample::select(&["", "text ", "}} ", "{ ", "\n", "\r\n", " \t", "é"][..]).prop_map(str::to_owned);
        let path = prop::sample::select(
            &[
                "input.i",
                "input.u",
                "input.b",
                "input.s",
                "input.f",
                "input.null",
                "input.list",
                "input.obj",
                "input.obj.k",
                "input.obj.n",
                "input.missing",
                "input.s.x",
                "input",
                "x",
            ][..],
        );
        let slot =
            (prop::sample::select(&["{{", "{{ "][..]), path, prop::sample::select(&["}}", " }}"][..])).prop_map(|(l, p, r)| format!("{l}{p}{r}"));
        prop::collection::vec(prop_oneof![text, slot], 0..6).prop_map(|v| v.concat())
    }

    proptest::proptest! {
        #[test]
        fn the_slot_renderer_prints_what_minijinja_prints(source in slot_templates(), context in every_kind()) {
            let slots = Slots::parse(&source).expect("a slot template");
            let by_minijinja = environment().template_from_str(&source).unwrap().render(&context);
            if let Some(fast) = slots.render(&source, &context, MAX_RENDERED_BYTES) {
                proptest::prop_assert_eq!(Ok(fast), by_minijinja.map_err(|e| e.to_string()), "{}", source);
            }
        }
    }

    #[test]
    fn slot_templates_of_plain_values_skip_minijinja_and_others_fall_back_to_it() {
        let ctx = json!({ "input": { "s": "x", "n": 3, "b": true, "f": 1.5, "obj": {} } });
        let fast = |source: &str| Slots::parse(source).and_then(|s| s.render(source, &ctx, MAX_RENDERED_BYTES));
        assert_eq!(fast("{{ input.s }}-{{input.n}} {{ input.b }}\n").as_deref(), Some("x-3 True"));
        for other in ["{{ input.f }}", "{{ input.obj }}", "{{ input.missing }}", "{{- input.s }}", "{% if 1 %}{% endif %}"] {
            assert_eq!(fast(other), None, "{other}");
            // …and the template still renders (or fails) through minijinja.
            let t = Template::compile(other, &STEP_ROOTS, Keep::Source).unwrap();
            assert_eq!(t.render(&ctx).is_ok(), other != "{{ input.missing }}", "{other}");
        }
        assert_eq!(Slots::parse("{{ input.s }}").unwrap().render("{{ input.s }}", &ctx, 0), None, "over the size limit minijinja makes the error");
        // A source-only slot template that needs minijinja compiles once and keeps it.
        let t = Template::compile("{{ input.f }}!", &STEP_ROOTS, Keep::Source).unwrap();
        assert!(t.0.fallback.get().is_none(), "not compiled when checked");
        for _ in 0..2 {
            assert_eq!(t.render(&ctx).unwrap(), "1.5!");
        }
        assert!(t.0.fallback.get().is_some());
    }

    proptest::proptest! {
        #[test]
        fn every_template_read_as_plain_slots_is_valid_jinja(source in pieces()) {
            // Such a template is not compiled when it is checked, so minijinja must agree.
            if let Some((_, Some(_))) = analyse(&source) {
                proptest::prop_assert!(environment().template_from_str(&source).is_ok(), "{}", source);
            }
        }
    }

    #[test]
    fn keywords_are_not_slots() {
        for keyword in ["and", "or", "not", "in", "is", "if", "else", "none", "true", "self"] {
            let source = format!("{{{{ {keyword} }}}}");
            assert!(analyse(&source).is_none(), "{source}");
        }
        assert!(Template::compile("{{ not }}", &STEP_ROOTS, Keep::Source).is_err(), "still a syntax error, found when checked");
    }

    #[test]
    fn a_runaway_loop_runs_out_of_its_work_budget() {
        let hostile = "{% for a in range(99999) %}{% for b in range(99999) %}x{% endfor %}{% endfor %}";
        let err = render(hostile, &json!({})).unwrap_err();
        assert!(err.to_string().contains("ran out of its work budget"), "{err}");
    }

    #[test]
    fn output_beyond_the_size_limit_is_refused() {
        // Few operations, much text: 5 × 1 MB.
        let err = render("{% for i in range(5) %}{{ 'x' * 1000000 }}{% endfor %}", &json!({})).unwrap_err();
        assert!(err.to_string().contains("longer than"), "{err}");
    }

    #[test]
    fn big_but_realistic_templates_render() {
        let items: Vec<_> = (0..500).map(|i| json!({ "name": format!("issue {i}"), "score": i as f64 / 7.0, "tags": ["a", "b", "c"] })).collect();
        let ctx = json!({ "input": { "items": items } });
        let source = "Issues:\n{% for it in input.items %}{{ loop.index }}. {{ it.name | upper }} ({{ it.score | round(2) }}) [{{ it.tags | join(', ') }}]{% if it.score > 10 %} urgent{% endif %}\n{% endfor %}\
                      All: {{ input.items | map(attribute='name') | join('; ') }}\n\
                      {% for a in input.items[:100] %}{% for b in input.items[:100] %}{% if a.name == b.name %}={% endif %}{% endfor %}{% endfor %}";
        let text = render(source, &ctx).unwrap();
        assert!(text.contains("500. ISSUE 499") && text.contains("issue 0; issue 1"), "{}", &text[..200]);
        assert_eq!(text.matches('=').count(), 100);
    }
}
