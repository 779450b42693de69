//! Prompt and output templates (Jinja, via minijinja).
//!
//! Undefined values are errors (strict mode): a typo such as `{{ input.feedbak }}` must
//! fail the step loudly rather than send the model an empty string. The steps a template
//! reads are found statically, so they become dependencies without being listed twice.

use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;
use std::collections::BTreeSet;
use std::sync::OnceLock;

/// The names a template or expression may read at the top level of a step.
pub const STEP_ROOTS: [&str; 2] = ["input", "steps"];
/// Inside a map's sub-step, `item` and `index` are added.
pub const ITEM_ROOTS: [&str; 4] = ["input", "steps", "item", "index"];

fn environment() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // Prompts are plain text, not HTML.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env
    })
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(String);

impl From<minijinja::Error> for TemplateError {
    fn from(e: minijinja::Error) -> Self {
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

/// Parses `source` and lists what it reads; `roots` are the names available where it runs.
pub fn references(source: &str, roots: &[&str]) -> Result<References, TemplateError> {
    let env = environment();
    let template = env.template_from_str(source)?;
    let mut refs = References::default();
    for path in template.undeclared_variables(true) {
        let mut parts = path.split('.');
        let root = parts.next().unwrap_or_default();
        if root == "steps" {
            match parts.next() {
                Some(step) => {
                    refs.steps.insert(step.to_owned());
                }
                None => refs.dynamic_step_access = true,
            }
        } else if !roots.contains(&root) && env.globals().all(|(name, _)| name != root) {
            refs.unknown_roots.insert(root.to_owned());
        }
    }
    Ok(refs)
}

/// Renders `source` against `context` (strict: an undefined value is an error).
pub fn render<S: Serialize>(source: &str, context: &S) -> Result<String, TemplateError> {
    Ok(environment().render_str(source, context)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
}
