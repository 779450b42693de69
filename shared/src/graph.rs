//! Validation: an untrusted [`WorkflowDef`] becomes a [`ValidatedGraph`] once, or a list
//! of every problem found, each naming the step and field. The engine only ever sees a
//! `ValidatedGraph`, so it never re-checks ids, references or cycles.

use crate::ids::StepId;
use crate::pricing::ModelRegistry;
use crate::template;
use crate::workflow::{Join, OutputFormat, RetryPolicy, StepDef, WorkflowDef};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// Limits that keep one definition from exhausting a function (and a DynamoDB item).
pub const MAX_STEPS: usize = 200;
pub const MAX_TEMPLATE_BYTES: usize = 32 * 1024;
pub const MAX_NAME_LEN: usize = 128;

/// One thing wrong with a definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.step {
            Some(step) => write!(f, "step {step:?}, field {}: {}", self.field, self.message),
            None => write!(f, "field {}: {}", self.field, self.message),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid workflow: {}", .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct InvalidWorkflow {
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlmSpec {
    pub model: String,
    pub system: Option<String>,
    pub prompt: String,
    pub temperature: Option<f32>,
    pub max_tokens: u32,
    pub stop_sequences: Vec<String>,
    pub stream: bool,
    pub format: OutputFormat,
    pub schema: Option<Value>,
    pub retry: RetryPolicy,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StepKind {
    Llm(LlmSpec),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub id: StepId,
    pub kind: StepKind,
    /// Indexes into [`ValidatedGraph::steps`]: explicit `depends_on` ∪ template references.
    pub deps: Vec<usize>,
    pub required: bool,
    pub join: Join,
}

/// A workflow that passed validation: ids unique and well-formed, every reference known,
/// acyclic, templates parse, every model priced. Steps are in a topological order.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedGraph {
    pub name: String,
    pub steps: Vec<Step>,
    pub dependents: Vec<Vec<usize>>,
    pub output: Option<String>,
}

impl ValidatedGraph {
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.id.as_str() == id)
    }

    /// Steps nothing depends on: the default run output.
    pub fn sinks(&self) -> impl Iterator<Item = &Step> {
        self.steps.iter().enumerate().filter(|(i, _)| self.dependents[*i].is_empty()).map(|(_, s)| s)
    }
}

/// Parses the raw definition JSON and validates it.
pub fn validate_json(raw: &Value, models: &ModelRegistry) -> Result<ValidatedGraph, InvalidWorkflow> {
    let def: WorkflowDef = serde_json::from_value(raw.clone())
        .map_err(|e| InvalidWorkflow { problems: vec![Problem { step: None, field: "workflow".into(), message: e.to_string() }] })?;
    validate(&def, models)
}

pub fn validate(def: &WorkflowDef, models: &ModelRegistry) -> Result<ValidatedGraph, InvalidWorkflow> {
    let mut found = Problems::default();

    if def.name.trim().is_empty() || def.name.len() > MAX_NAME_LEN {
        found.push(None, "name", format!("must be 1 to {MAX_NAME_LEN} characters"));
    }
    if def.steps.is_empty() {
        found.push(None, "steps", "a workflow needs at least one step".into());
    }
    if def.steps.len() > MAX_STEPS {
        found.push(None, "steps", format!("{} steps; the limit is {MAX_STEPS}", def.steps.len()));
    }

    // Parse each step on its own so that every malformed step is reported.
    struct Parsed {
        id: String,
        def: StepDef,
    }
    let mut parsed: Vec<Parsed> = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, raw) in def.steps.iter().enumerate() {
        let label = raw.get("id").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| format!("#{i}"));
        let step: StepDef = match serde_json::from_value(raw.clone()) {
            Ok(s) => s,
            Err(e) => {
                let field = if raw.get("type").is_none() || e.to_string().contains("unknown variant") { "type" } else { "step" };
                found.push(Some(&label), field, e.to_string());
                continue;
            }
        };
        let StepDef::Llm(llm) = &step;
        if StepId::parse(&llm.id).is_err() {
            found.push(Some(&label), "id", "must start with a letter and hold only letters, digits and _ (at most 64)".into());
            continue;
        }
        if !seen.insert(llm.id.clone()) {
            found.push(Some(&label), "id", "duplicate step id".into());
            continue;
        }
        parsed.push(Parsed { id: llm.id.clone(), def: step });
    }
    // Ids rejected above (bad or duplicate) still exist as far as references go, so they
    // are not reported a second time as "unknown step".
    let all_ids: BTreeSet<String> = def.steps.iter().filter_map(|s| s.get("id").and_then(Value::as_str).map(str::to_owned)).collect();

    let mut specs: Vec<(String, StepKind, BTreeSet<String>, bool, Join)> = Vec::new();
    for p in &parsed {
        let StepDef::Llm(llm) = &p.def;
        let id = p.id.as_str();
        let mut deps = BTreeSet::new();
        for d in &llm.depends_on {
            if d == id {
                found.push(Some(id), "depends_on", "a step cannot depend on itself".into());
            } else if !all_ids.contains(d) {
                found.push(Some(id), "depends_on", format!("unknown step {d:?}"));
            } else {
                deps.insert(d.clone());
            }
        }
        check_template(&mut found, &all_ids, id, "prompt", &llm.prompt, &mut deps);
        if let Some(system) = &llm.system {
            check_template(&mut found, &all_ids, id, "system", system, &mut deps);
        }
        let model = llm.model.clone().or_else(|| def.defaults.model.clone());
        let max_tokens = llm.max_tokens.or(def.defaults.max_tokens).unwrap_or(1024);
        match &model {
            None => found.push(Some(id), "model", "no model: set it on the step or in defaults.model".into()),
            Some(m) => match models.get(m) {
                None => found.push(Some(id), "model", format!("unknown model {m:?}: no price is known for it (add it with CHAINRUN_MODEL_PRICES)")),
                Some(info) if max_tokens > info.max_output_tokens => {
                    found.push(Some(id), "max_tokens", format!("{max_tokens} exceeds {m}'s maximum output of {} tokens", info.max_output_tokens))
                }
                Some(_) => {}
            },
        }
        if max_tokens == 0 {
            found.push(Some(id), "max_tokens", "must be at least 1".into());
        }
        let temperature = llm.temperature.or(def.defaults.temperature);
        if let Some(t) = temperature.filter(|t| !(0.0..=1.0).contains(t)) {
            found.push(Some(id), "temperature", format!("{t} is outside 0..=1"));
        }
        let retry = llm.retry.or(def.defaults.retry).unwrap_or_default();
        if retry.max_attempts == 0 || retry.max_attempts > 10 {
            found.push(Some(id), "retry.max_attempts", "must be 1 to 10".into());
        }
        if let Some(schema) = &llm.output.schema {
            if llm.output.format != OutputFormat::Json {
                found.push(Some(id), "output.schema", "a schema needs output.format \"json\"".into());
            } else if let Some(why) = crate::output::schema_problem(schema) {
                found.push(Some(id), "output.schema", format!("not a usable JSON Schema: {why}"));
            }
        }
        let spec = LlmSpec {
            model: model.unwrap_or_default(),
            system: llm.system.clone(),
            prompt: llm.prompt.clone(),
            temperature,
            max_tokens,
            stop_sequences: llm.stop_sequences.clone(),
            stream: llm.stream,
            format: llm.output.format,
            schema: llm.output.schema.clone(),
            retry,
        };
        specs.push((id.to_owned(), StepKind::Llm(spec), deps, llm.required, llm.join));
    }
    if let Some(out) = &def.output {
        check_template(&mut found, &all_ids, "", "output", out, &mut BTreeSet::new());
    }
    let mut problems = found.0;

    if let Some(cycle) = find_cycle(&specs.iter().map(|(id, _, deps, ..)| (id.clone(), deps.clone())).collect()) {
        problems.push(Problem {
            step: Some(cycle[0].clone()),
            field: "depends_on".into(),
            message: format!("dependency cycle: {}", cycle.join(" → ")),
        });
    }
    if !problems.is_empty() {
        return Err(InvalidWorkflow { problems });
    }

    // Topological order (Kahn), stable in definition order.
    let order = topological_order(&specs.iter().map(|(id, _, deps, ..)| (id.clone(), deps.clone())).collect::<Vec<_>>());
    let position: BTreeMap<&str, usize> = order.iter().enumerate().map(|(i, &s)| (specs[s].0.as_str(), i)).collect();
    let mut steps = Vec::with_capacity(specs.len());
    for &s in &order {
        let (id, kind, deps, required, join) = &specs[s];
        steps.push(Step {
            #[allow(clippy::expect_used)] // checked in the loop above
            id: StepId::parse(id).expect("validated id"),
            kind: kind.clone(),
            deps: deps.iter().map(|d| position[d.as_str()]).collect(),
            required: *required,
            join: *join,
        });
    }
    let mut dependents = vec![Vec::new(); steps.len()];
    for (i, s) in steps.iter().enumerate() {
        for &d in &s.deps {
            dependents[d].push(i);
        }
    }
    Ok(ValidatedGraph { name: def.name.clone(), steps, dependents, output: def.output.clone() })
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    /// `step` is empty for workflow-level fields.
    fn push(&mut self, step: Option<&str>, field: &str, message: String) {
        let step = step.filter(|s| !s.is_empty()).map(str::to_owned);
        self.0.push(Problem { step, field: field.to_owned(), message });
    }
}

/// Parses a template and adds the steps it reads to `deps`, reporting what is wrong.
fn check_template(found: &mut Problems, all_ids: &BTreeSet<String>, step: &str, field: &str, source: &str, deps: &mut BTreeSet<String>) {
    if source.len() > MAX_TEMPLATE_BYTES {
        found.push(Some(step), field, format!("template is {} bytes; the limit is {MAX_TEMPLATE_BYTES}", source.len()));
        return;
    }
    match template::references(source) {
        Err(e) => found.push(Some(step), field, format!("template does not parse: {e}")),
        Ok(refs) => {
            for root in &refs.unknown_roots {
                found.push(Some(step), field, format!("unknown variable {root:?}: templates read `input.…` and `steps.<id>.…`"));
            }
            if refs.dynamic_step_access {
                found.push(Some(step), field, "`steps` must be read as `steps.<id>` so the dependency is known".into());
            }
            for s in refs.steps {
                if s == step {
                    found.push(Some(step), field, "a step cannot read its own output".into());
                } else if !all_ids.contains(&s) {
                    found.push(Some(step), field, format!("references unknown step {s:?}"));
                } else {
                    deps.insert(s);
                }
            }
        }
    }
}

/// Returns one cycle as a closed path (`a → b → a`), if any.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Visiting) => {
                let start = path.iter().position(|p| p == node).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_owned(), Mark::Visiting);
        path.push(node.to_owned());
        for dep in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(dep, graph, marks, path) {
                return Some(c);
            }
        }
        path.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        let mut path = Vec::new();
        if let Some(mut c) = visit(node, graph, &mut marks, &mut path) {
            // Edges point from a step to what it depends on; show the cycle in run order.
            c.reverse();
            return Some(c);
        }
    }
    None
}

fn topological_order(specs: &[(String, BTreeSet<String>)]) -> Vec<usize> {
    let index: BTreeMap<&str, usize> = specs.iter().enumerate().map(|(i, (id, _))| (id.as_str(), i)).collect();
    let mut remaining: Vec<usize> = specs.iter().map(|(_, deps)| deps.len()).collect();
    let mut dependents = vec![Vec::new(); specs.len()];
    for (i, (_, deps)) in specs.iter().enumerate() {
        for d in deps {
            dependents[index[d.as_str()]].push(i);
        }
    }
    let mut ready: std::collections::BTreeSet<usize> = (0..specs.len()).filter(|&i| remaining[i] == 0).collect();
    let mut order = Vec::with_capacity(specs.len());
    while let Some(&i) = ready.iter().next() {
        ready.remove(&i);
        order.push(i);
        for &d in &dependents[i] {
            remaining[d] -= 1;
            if remaining[d] == 0 {
                ready.insert(d);
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn registry() -> ModelRegistry {
        ModelRegistry::builtin()
    }

    fn wf(steps: Value) -> Value {
        json!({ "name": "t", "defaults": { "model": "amazon.nova-micro-v1:0" }, "steps": steps })
    }

    fn problems(v: Value) -> Vec<Problem> {
        validate_json(&v, &registry()).unwrap_err().problems
    }

    #[test]
    fn template_references_become_dependencies() {
        let g = validate_json(
            &wf(json!([
                { "id": "b", "type": "llm", "prompt": "{{ steps.a.text }}" },
                { "id": "a", "type": "llm", "prompt": "{{ input.x }}" }
            ])),
            &registry(),
        )
        .unwrap();
        assert_eq!(g.steps[0].id.as_str(), "a", "topological order puts a first");
        assert_eq!(g.steps[1].deps, vec![0]);
        assert_eq!(g.dependents[0], vec![1]);
        assert_eq!(g.sinks().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn rejects_duplicate_ids_naming_the_step() {
        let p = problems(wf(json!([
            { "id": "a", "type": "llm", "prompt": "x" },
            { "id": "a", "type": "llm", "prompt": "y" }
        ])));
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].step.as_deref(), p[0].field.as_str()), (Some("a"), "id"));
    }

    #[test]
    fn rejects_unknown_dependencies_and_references() {
        let p = problems(wf(json!([
            { "id": "a", "type": "llm", "prompt": "{{ steps.ghost.text }}", "depends_on": ["phantom"] }
        ])));
        let fields: Vec<_> = p.iter().map(|p| p.field.as_str()).collect();
        assert!(fields.contains(&"depends_on") && fields.contains(&"prompt"), "{p:?}");
        assert!(p.iter().any(|p| p.message.contains("ghost")));
    }

    #[test]
    fn names_the_cycle() {
        let p = problems(wf(json!([
            { "id": "a", "type": "llm", "prompt": "{{ steps.c.text }}" },
            { "id": "b", "type": "llm", "prompt": "{{ steps.a.text }}" },
            { "id": "c", "type": "llm", "prompt": "{{ steps.b.text }}" }
        ])));
        let cycle = p.iter().find(|p| p.message.contains("cycle")).expect("cycle reported");
        for s in ["a", "b", "c"] {
            assert!(cycle.message.contains(s), "{}", cycle.message);
        }
    }

    #[test]
    fn rejects_unparseable_templates_and_unknown_models_and_types() {
        let p = problems(wf(json!([
            { "id": "a", "type": "llm", "prompt": "{{ input.x " },
            { "id": "b", "type": "llm", "prompt": "ok", "model": "acme.gpt-9" },
            { "id": "c", "type": "teleport" },
            { "id": "d", "type": "llm", "promt": "typo" }
        ])));
        let by_step = |s: &str| p.iter().find(|p| p.step.as_deref() == Some(s)).unwrap_or_else(|| panic!("{s} not reported: {p:?}"));
        assert_eq!(by_step("a").field, "prompt");
        assert_eq!(by_step("b").field, "model");
        assert!(by_step("b").message.contains("acme.gpt-9"));
        assert_eq!(by_step("c").field, "type");
        assert!(by_step("d").message.contains("promt"), "{:?}", by_step("d"));
    }

    #[test]
    fn reports_every_problem_at_once() {
        let p = problems(json!({ "name": "", "steps": [
            { "id": "1bad", "type": "llm", "prompt": "x" },
            { "id": "ok", "type": "llm", "prompt": "{{ nope }}" }
        ]}));
        assert!(p.len() >= 4, "{p:?}"); // name, bad id, no model, unknown variable
    }

    #[test]
    fn rejects_max_tokens_beyond_the_models_limit() {
        let p = problems(wf(json!([{ "id": "a", "type": "llm", "prompt": "x", "max_tokens": 1_000_000 }])));
        assert_eq!(p[0].field, "max_tokens");
    }

    #[test]
    fn non_object_definitions_are_rejected_not_panicked_on() {
        for v in [json!(null), json!([]), json!("x"), json!({ "name": "x", "steps": "nope" }), json!({ "name": "x", "steps": [1, null, "s"] })] {
            assert!(validate_json(&v, &registry()).is_err(), "{v}");
        }
    }
}
