//! Validation: an untrusted [`WorkflowDef`] becomes a [`ValidatedGraph`] once, or a list
//! of every problem found, each naming the step and field. The engine only ever sees a
//! `ValidatedGraph`, so it never re-checks ids, references or cycles.

use crate::budget::{self, Amount, BudgetLimits};
use crate::expr::{self, Expression};
use crate::ids::{ModelId, Principal, StepId, WorkflowName};
use crate::output::Schema;
use crate::pricing::{LifecycleStatus, ModelInfo, ModelRegistry, ServiceTier};
use crate::template::{ITEM_ROOTS, Keep, References, STEP_ROOTS, Template};
use crate::workflow::{
    CacheMode, Defaults, InputStepDef, ItemFailure, Join, LlmStepDef, MapMode, OutputFormat, RetryPolicy, StepDef, TransformStepDef, WorkflowDef,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::Arc;

/// Limits that keep one definition from exhausting a function (and a DynamoDB item).
pub const MAX_STEPS: usize = 200;
pub const MAX_TEMPLATE_BYTES: usize = 32 * 1024;
pub const MAX_NAME_LEN: usize = 128;
pub const MAX_ROUTES: usize = 50;
pub const MAX_CONCURRENCY: u32 = 100;
pub const DEFAULT_CONCURRENCY: u32 = 10;
pub const DEFAULT_MAP_CONCURRENCY: u32 = 4;

/// Size limits a deployment enforces on definitions. The defaults are the product's; the
/// scheduler benchmark raises `max_steps` to measure the engine on 10,000-step graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_steps: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_steps: MAX_STEPS }
    }
}

/// One thing wrong with a definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
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
    pub model: ModelId,
    pub system: Option<Template>,
    pub prompt: Template,
    pub temperature: Option<f32>,
    pub max_tokens: u32,
    pub stop_sequences: Vec<String>,
    pub stream: bool,
    pub format: OutputFormat,
    pub schema: Option<Schema>,
    pub retry: RetryPolicy,
    pub cache: CacheMode,
    pub service_tier: ServiceTier,
    /// Whether other calls of a run will send the same head (a map's items, or steps with
    /// the same model and system prompt): only then is writing it to the prompt cache,
    /// which costs more than plain input, likely to pay off.
    pub shared_prefix: bool,
}

impl LlmSpec {
    /// The step's model priced as its calls run: in its service tier. `None` for a model
    /// without a price or a tier it does not offer (validation reports both).
    pub fn priced(&self, models: &ModelRegistry) -> Option<ModelInfo> {
        models.get(self.model.as_str())?.in_tier(self.service_tier).map(|m| m.into_owned())
    }

    /// The step's model at the dearest price one of its calls can be billed at: its tier's,
    /// or for `flex` the default tier's, since a call is billed in the tier Bedrock reports
    /// having served it in. Reservations and estimates' `max` price calls at this.
    pub fn priced_at_most(&self, models: &ModelRegistry) -> Option<ModelInfo> {
        match self.service_tier {
            ServiceTier::Flex => {
                let listed = models.get(self.model.as_str())?;
                listed.in_tier(ServiceTier::Flex)?;
                Some(listed.into_owned())
            }
            _ => self.priced(models),
        }
    }

    /// Whether this step's calls may carry cache points, so that part of their input may be
    /// billed at the (higher) cache-write price.
    pub fn caches(&self, model: &ModelInfo) -> bool {
        self.cache != CacheMode::Off && self.shared_prefix && model.cache.is_some()
    }

    /// The most one call of this step can be charged for `input_tokens` in and `max_tokens` out.
    pub fn worst_call(&self, model: &ModelInfo, input_tokens: u64, max_tokens: u32) -> Amount {
        if self.caches(model) {
            budget::worst_case_caching(model, input_tokens, max_tokens)
        } else {
            budget::worst_case(model, input_tokens, max_tokens)
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum TransformSpec {
    /// Rendered to text.
    Template(Template),
    /// Evaluated (CEL) to a JSON value.
    Expression(Arc<Expression>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub when: Arc<Expression>,
    /// Step ids chosen by this route.
    pub to: Vec<StepId>,
}

/// A human gate: what to show, and who may decide.
#[derive(Debug, Clone, PartialEq)]
pub struct ReviewSpec {
    pub show: Template,
    /// Empty: the run's starter decides.
    pub reviewers: Vec<Principal>,
    /// How long it may wait for a decision, and what its deadline does.
    pub timeout: Option<(std::time::Duration, OnTimeout)>,
}

/// What a review's deadline does.
#[derive(Debug, Clone, PartialEq)]
pub enum OnTimeout {
    Approve,
    Reject,
    /// Hands the review to `to` as well, with a new deadline `timeout` after, and `then`.
    Escalate {
        to: Vec<Principal>,
        timeout: std::time::Duration,
        then: Box<OnTimeout>,
    },
}

impl ReviewSpec {
    /// Who may decide: its reviewers (the run's `starter` when it names none), and those
    /// its deadlines escalated it to after `level` escalations (`None`: at any level).
    pub fn deciders(&self, starter: &crate::ids::UserId, level: Option<u32>) -> Vec<Principal> {
        people_asked(&self.reviewers, self.timeout.as_ref().map(|(_, on)| on), starter, level)
    }
}

/// Who a person step (a review, an input) asks after `level` escalations of its deadline
/// (`None`: at any level): `named` (the run's `starter` when it names nobody), and those
/// `on_timeout` handed it to by then.
pub fn people_asked(named: &[Principal], on_timeout: Option<&OnTimeout>, starter: &crate::ids::UserId, level: Option<u32>) -> Vec<Principal> {
    let mut who = if named.is_empty() { vec![Principal::User(starter.to_string())] } else { named.to_vec() };
    if let Some(on_timeout) = on_timeout {
        let added = match level {
            Some(level) => on_timeout.at_level(level).1,
            None => on_timeout.principals(),
        };
        for p in added {
            if !who.contains(&p) {
                who.push(p);
            }
        }
    }
    who
}

impl OnTimeout {
    /// What the deadline does after `level` escalations: the outcome, and who may decide
    /// by then beside the review's own reviewers.
    pub fn at_level(&self, level: u32) -> (&OnTimeout, Vec<Principal>) {
        let (mut at, mut added) = (self, Vec::new());
        for _ in 0..level {
            match at {
                OnTimeout::Escalate { to, then, .. } => {
                    added.extend(to.iter().cloned());
                    at = then;
                }
                _ => break,
            }
        }
        (at, added)
    }

    /// Every principal any escalation hands the review to.
    pub fn principals(&self) -> Vec<Principal> {
        match self {
            OnTimeout::Escalate { to, then, .. } => to.iter().cloned().chain(then.principals()).collect(),
            _ => Vec::new(),
        }
    }
}

/// The most escalations one review's deadline chain has.
pub const MAX_ESCALATIONS: usize = 3;

/// `90s`, `30m`, `48h`, `7d`: from 1 minute to 30 days.
pub fn parse_timeout(raw: &str) -> Result<std::time::Duration, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, unit) = raw.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("{raw:?}: a number then s, m, h or d (e.g. \"48h\")"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("{raw:?}: a number then s, m, h or d (e.g. \"48h\")")),
    };
    if !(60..=30 * 86_400).contains(&seconds) {
        return Err(format!("{raw:?}: between 1 minute and 30 days"));
    }
    Ok(std::time::Duration::from_secs(seconds))
}

/// The most principals a review names.
pub const MAX_REVIEWERS: usize = 20;

#[derive(Debug, Clone, PartialEq)]
pub struct RouterSpec {
    pub routes: Vec<Route>,
    pub default: Vec<StepId>,
}

impl RouterSpec {
    /// Every step some route (or the default) can choose.
    pub fn targets(&self) -> impl Iterator<Item = &StepId> {
        self.routes.iter().flat_map(|r| r.to.iter()).chain(self.default.iter())
    }
}

/// What a map runs per item.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemStep {
    Llm(LlmSpec),
    Transform(TransformSpec),
}

#[derive(Debug, Clone, PartialEq)]
pub struct MapSpec {
    pub over: Arc<Expression>,
    pub max_concurrency: u32,
    pub on_item_failure: ItemFailure,
    pub mode: crate::workflow::MapMode,
    pub step: ItemStep,
}

impl MapSpec {
    /// The item step to run as one batch job over `items` items, if this map batches them:
    /// when the items reach the model's minimum per job (Bedrock fails a smaller job, so
    /// fewer run online), with `mode: batch`, or `auto` where nothing rules batching out
    /// (the checks `mode: batch` is validated by).
    pub fn batched(&self, items: usize, models: &ModelRegistry) -> Option<&LlmSpec> {
        let ItemStep::Llm(llm) = &self.step else { return None };
        let rules = models.get(llm.model.as_str())?.batch?;
        let fits = llm.service_tier == ServiceTier::Default && llm.cache != CacheMode::Response;
        match self.mode {
            _ if items < rules.min_records as usize => None,
            MapMode::Batch => Some(llm),
            MapMode::Auto if fits => Some(llm),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum StepKind {
    Llm(LlmSpec),
    Transform(TransformSpec),
    Router(RouterSpec),
    Map(MapSpec),
    Review(ReviewSpec),
    Input(crate::input::InputSpec),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub id: StepId,
    pub kind: StepKind,
    /// Indexes into [`ValidatedGraph::steps`]: explicit `depends_on` ∪ template and
    /// expression references.
    pub deps: Vec<usize>,
    pub required: bool,
    pub join: Join,
    /// False when the definition switched it off (`enabled: false`): it never runs.
    pub enabled: bool,
}

/// A workflow that passed validation: ids unique and well-formed, every reference known,
/// acyclic, templates and expressions parse, every model priced, routes only to steps
/// that depend on their router. Steps are in a topological order.
#[derive(Debug, Clone, PartialEq)]
///
/// Its fields are private: the only way to have one is [`validate`], so holding one is proof
/// that every check passed.
pub struct ValidatedGraph {
    name: WorkflowName,
    steps: Vec<Step>,
    dependents: Vec<Vec<usize>>,
    output: Option<Template>,
    max_concurrency: u32,
    /// JSON Schema a run's input must match (checked when the run starts).
    input_schema: Option<Schema>,
    /// The run's cost and token limits.
    budget: BudgetLimits,
    pause_on_budget: bool,
}

impl ValidatedGraph {
    /// Every model call the graph can make, with the step and field that names its model.
    pub fn calls(&self) -> impl Iterator<Item = (&StepId, &'static str, &LlmSpec)> {
        self.steps.iter().filter_map(|step| {
            let (field, spec) = match &step.kind {
                StepKind::Llm(spec) => ("model", spec),
                StepKind::Map(MapSpec { step: ItemStep::Llm(spec), .. }) => ("step.model", spec),
                StepKind::Input(input) => ("extract.model", &input.extract.as_ref()?.call),
                _ => return None,
            };
            Some((&step.id, field, spec))
        })
    }

    /// What Bedrock's model lifecycle says of the graph's models on `today`: a warning per
    /// call whose model is legacy or near its end of life, and a refusal per call whose
    /// model Bedrock no longer serves.
    pub fn lifecycle(&self, models: &ModelRegistry, today: chrono::NaiveDate) -> ModelNotes {
        let mut notes = ModelNotes::default();
        for (step, field, spec) in self.calls() {
            let Some(info) = models.get(spec.model.as_str()) else { continue };
            let note = |message: String| Problem { step: Some(step.to_string()), field: field.to_owned(), message };
            match info.lifecycle.status(spec.model.as_str(), today) {
                LifecycleStatus::Active => {}
                LifecycleStatus::Warn(message) => notes.warnings.push(note(message)),
                LifecycleStatus::Retired(message) => notes.retired.push(note(message)),
            }
        }
        notes
    }

    pub fn name(&self) -> &WorkflowName {
        &self.name
    }

    /// The steps in a topological order: every step after its dependencies.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Everyone its person steps (reviews, inputs) may ask, at any escalation, for a run
    /// started by `starter`: they read the run.
    pub fn people(&self, starter: &crate::ids::UserId) -> Vec<(StepId, Vec<Principal>)> {
        self.steps
            .iter()
            .filter_map(|step| match &step.kind {
                StepKind::Review(spec) => Some((step.id.clone(), spec.deciders(starter, None))),
                StepKind::Input(spec) => Some((step.id.clone(), spec.answerers(starter, None))),
                _ => None,
            })
            .collect()
    }

    /// The steps that depend on step `i`.
    pub fn dependents(&self, i: usize) -> &[usize] {
        &self.dependents[i]
    }

    /// The workflow's `output` template, if it has one.
    pub fn output(&self) -> Option<&Template> {
        self.output.as_ref()
    }

    /// How many of a run's steps may execute at once.
    pub fn max_concurrency(&self) -> u32 {
        self.max_concurrency
    }

    pub fn budget(&self) -> BudgetLimits {
        self.budget
    }

    /// Whether a call the budget refuses pauses the run (`budget.on_exceeded: pause`)
    /// rather than failing its step.
    pub fn pauses_on_budget(&self) -> bool {
        self.pause_on_budget
    }

    /// The step ids in the graph's order, as a run stores them.
    pub fn step_order(&self) -> Vec<StepId> {
        self.steps.iter().map(|s| s.id.clone()).collect()
    }

    /// Checks a run's input against `input_schema`; the problems name where it breaks it.
    pub fn check_input(&self, input: &Value) -> Result<(), Vec<String>> {
        let Some(schema) = &self.input_schema else { return Ok(()) };
        let violations = schema.violations(input);
        if violations.is_empty() { Ok(()) } else { Err(violations) }
    }

    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.id.as_str() == id)
    }

    /// Steps nothing depends on: the default run output.
    pub fn sinks(&self) -> impl Iterator<Item = &Step> {
        self.steps.iter().enumerate().filter(|(i, _)| self.dependents[*i].is_empty()).map(|(_, s)| s)
    }
}

/// Parses the raw definition JSON and validates it with the product's limits.
pub fn validate_json(raw: &Value, models: &ModelRegistry) -> Result<ValidatedGraph, InvalidWorkflow> {
    validate_json_with(raw, models, Limits::default())
}

pub fn validate_json_with(raw: &Value, models: &ModelRegistry, limits: Limits) -> Result<ValidatedGraph, InvalidWorkflow> {
    let malformed =
        |e: serde_json::Error| InvalidWorkflow { problems: vec![Problem { step: None, field: "workflow".into(), message: e.to_string() }] };
    // The steps are checked one by one where they lie: deserializing them into the
    // `WorkflowDef` first would copy every one of them.
    if let Some(fields) = raw.as_object()
        && let Some(Value::Array(steps)) = fields.get("steps")
    {
        let mut head: serde_json::Map<String, Value> = fields.iter().filter(|(k, _)| *k != "steps").map(|(k, v)| (k.clone(), v.clone())).collect();
        head.insert("steps".into(), Value::Array(Vec::new()));
        let def = WorkflowDef::deserialize(&Value::Object(head)).map_err(malformed)?;
        return check(&def, steps, models, limits);
    }
    let def = WorkflowDef::deserialize(raw).map_err(malformed)?;
    validate_with(&def, models, limits)
}

pub fn validate(def: &WorkflowDef, models: &ModelRegistry) -> Result<ValidatedGraph, InvalidWorkflow> {
    validate_with(def, models, Limits::default())
}

pub fn validate_with(def: &WorkflowDef, models: &ModelRegistry, limits: Limits) -> Result<ValidatedGraph, InvalidWorkflow> {
    check(def, &def.steps, models, limits)
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    /// `step` is empty for workflow-level fields.
    fn push(&mut self, step: &str, field: &str, message: impl Into<String>) {
        let step = (!step.is_empty()).then(|| step.to_owned());
        self.0.push(Problem { step, field: field.to_owned(), message: message.into() });
    }
}

/// Every id the definition declares (borrowed from it), with the index in `parsed` of the
/// step that has it, or `None` when that step was rejected: such ids still exist as far as
/// references go, so they are not reported a second time as "unknown step".
type Ids<'a> = HashMap<&'a str, Option<usize>>;

/// Where fields are checked: a step's own, or its sub-step's in a map, which runs once per
/// item (so its templates keep their bytecode, see [`Keep`]).
#[derive(Clone, Copy)]
struct Place {
    prefix: &'static str,
    roots: &'static [&'static str],
    keep: Keep,
    in_map: bool,
}

const IN_STEP: Place = Place { prefix: "", roots: &STEP_ROOTS, keep: Keep::Source, in_map: false };
const IN_MAP_ITEM: Place = Place { prefix: "step.", roots: &ITEM_ROOTS, keep: Keep::Bytecode, in_map: true };

/// Shared state while checking one step's fields.
struct Checker<'p> {
    found: &'p mut Problems,
    ids: &'p Ids<'p>,
    step: &'p str,
    /// Indexes in `parsed` (a dependency on a rejected step was reported with it).
    deps: Vec<usize>,
}

impl Checker<'_> {
    /// `field` is only built when there is a problem to report.
    fn add_refs(&mut self, field: &dyn Fn() -> String, refs: &References) {
        for root in &refs.unknown_roots {
            let hint = if root == "item" || root == "index" { " (only inside a map's step)" } else { "" };
            self.found.push(self.step, &field(), format!("unknown variable {root:?}{hint}: read `input.…` and `steps.<id>.…`"));
        }
        if refs.dynamic_step_access {
            self.found.push(self.step, &field(), "`steps` must be read as `steps.<id>` so the dependency is known");
        }
        for s in &refs.steps {
            if s == self.step {
                self.found.push(self.step, &field(), "a step cannot read its own output");
            } else if let Some(known) = self.ids.get(s.as_str()) {
                self.deps.extend(*known);
            } else {
                self.found.push(self.step, &field(), format!("references unknown step {s:?}"));
            }
        }
    }

    /// Compiles a template once; the graph keeps it, so nothing is parsed at run time.
    fn template(&mut self, at: Place, name: &str, source: &str) -> Option<Template> {
        let field = || format!("{}{name}", at.prefix);
        if source.len() > MAX_TEMPLATE_BYTES {
            self.found.push(self.step, &field(), format!("template is {} bytes; the limit is {MAX_TEMPLATE_BYTES}", source.len()));
            return None;
        }
        match Template::compile(source, at.roots, at.keep) {
            Err(e) => {
                self.found.push(self.step, &field(), format!("template does not parse: {e}"));
                None
            }
            Ok(compiled) => {
                self.add_refs(&field, compiled.references());
                Some(compiled)
            }
        }
    }

    /// Compiles a CEL expression once; the graph keeps it, so nothing is parsed at run time.
    fn expression(&mut self, field: &str, source: &str, roots: &[&str]) -> Option<Arc<Expression>> {
        match expr::compile(source, roots) {
            Err(e) => {
                self.found.push(self.step, field, format!("CEL expression: {e}"));
                None
            }
            Ok(compiled) => {
                self.add_refs(&|| field.to_owned(), &compiled.references);
                Some(Arc::new(compiled))
            }
        }
    }

    fn llm(&mut self, at: Place, llm: &LlmStepDef, defaults: &Defaults, models: &ModelRegistry) -> LlmSpec {
        let field = |f: &str| format!("{}{f}", at.prefix);
        let prompt = self.template(at, "prompt", &llm.prompt);
        let system = llm.system.as_ref().map(|system| self.template(at, "system", system));
        let model = llm.model.as_ref().or(defaults.model.as_ref());
        let max_tokens = llm.max_tokens.or(defaults.max_tokens).unwrap_or(1024);
        match model {
            None => self.found.push(self.step, &field("model"), "no model: set it on the step or in defaults.model"),
            Some(m) => match models.get(m) {
                None => self.found.push(
                    self.step,
                    &field("model"),
                    format!("unknown model {m:?}: no price is known for it (add it with CHAINRUN_MODEL_PRICES)"),
                ),
                Some(info) if max_tokens > info.max_output_tokens => self.found.push(
                    self.step,
                    &field("max_tokens"),
                    format!("{max_tokens} exceeds {m}'s maximum output of {} tokens", info.max_output_tokens),
                ),
                Some(info) if info.in_tier(llm.service_tier).is_none() => {
                    let offered: Vec<&str> = std::iter::once("default").chain(info.tiers.keys().map(|t| t.as_str())).collect();
                    self.found.push(
                        self.step,
                        &field("service_tier"),
                        format!("{m} does not offer the {} tier; it offers {}", llm.service_tier.as_str(), offered.join(", ")),
                    )
                }
                Some(_) => {}
            },
        }
        if max_tokens == 0 {
            self.found.push(self.step, &field("max_tokens"), "must be at least 1");
        }
        let temperature = llm.temperature.or(defaults.temperature);
        if let Some(t) = temperature.filter(|t| !(0.0..=1.0).contains(t)) {
            self.found.push(self.step, &field("temperature"), format!("{t} is outside 0..=1"));
        }
        if llm.cache == CacheMode::Response && temperature != Some(0.0) {
            self.found.push(
                self.step,
                &field("cache"),
                "\"response\" reuses an earlier reply, which only a deterministic call has: set temperature to 0",
            );
        }
        let retry = llm.retry.or(defaults.retry).unwrap_or_default();
        if retry.max_attempts == 0 || retry.max_attempts > 10 {
            self.found.push(self.step, &field("retry.max_attempts"), "must be 1 to 10");
        }
        let mut schema = None;
        if let Some(document) = &llm.output.schema {
            if llm.output.format != OutputFormat::Json {
                self.found.push(self.step, &field("output.schema"), "a schema needs output.format \"json\"");
            } else {
                match Schema::compile(document) {
                    Ok(compiled) => schema = Some(compiled),
                    Err(why) => self.found.push(self.step, &field("output.schema"), format!("not a usable JSON Schema: {why}")),
                }
            }
        }
        LlmSpec {
            // A missing or unknown model was reported: the placeholder is never called.
            model: model.and_then(|m| ModelId::parse(m).ok()).unwrap_or_else(unknown_model),
            // A template that does not compile was reported: the graph is rejected, so the
            // placeholder is never rendered.
            system: system.map(|s| s.unwrap_or_else(unusable)),
            prompt: prompt.unwrap_or_else(unusable),
            temperature,
            max_tokens,
            stop_sequences: llm.stop_sequences.clone(),
            stream: llm.stream,
            format: llm.output.format,
            schema,
            retry,
            cache: llm.cache,
            service_tier: llm.service_tier,
            // Inside a map every item shares the head; across steps, set once all are known.
            shared_prefix: at.in_map,
        }
    }

    /// A map's `mode`: batching takes an `llm` item step on a model that offers batch
    /// inference, in its default tier, without the response cache (`auto` merely stays
    /// online where batching cannot apply).
    fn map_mode(&mut self, mode: MapMode, step: &ItemStep, models: &ModelRegistry) {
        if mode != MapMode::Batch {
            return;
        }
        let ItemStep::Llm(llm) = step else {
            self.found.push(self.step, "mode", "\"batch\" batches model calls: the map's step must be `llm`");
            return;
        };
        let why = match models.get(llm.model.as_str()) {
            Some(info) if info.batch.is_none() => Some(format!("{} does not offer batch inference", llm.model)),
            _ if llm.service_tier != ServiceTier::Default => {
                Some(format!("a batch job has no service tier; step.service_tier is {}", llm.service_tier.as_str()))
            }
            _ if llm.cache == CacheMode::Response => {
                Some("a batch job answers every item anew: it does not go with step.cache \"response\"".to_owned())
            }
            // An unknown model was reported with the step.
            _ => None,
        };
        if let Some(why) = why {
            self.found.push(self.step, "mode", why);
        }
    }

    fn transform(&mut self, at: Place, t: &TransformStepDef) -> TransformSpec {
        let prefix = at.prefix;
        match (&t.template, &t.expression) {
            (Some(source), None) => TransformSpec::Template(self.template(at, "template", source).unwrap_or_else(unusable)),
            (None, Some(source)) => match self.expression(&format!("{prefix}expression"), source, at.roots) {
                Some(compiled) => TransformSpec::Expression(compiled),
                // Reported; the graph is rejected, so the placeholder is never run.
                None => TransformSpec::Template(unusable()),
            },
            _ => {
                self.found.push(self.step, &format!("{prefix}template"), "a transform needs exactly one of `template` and `expression`");
                TransformSpec::Template(unusable())
            }
        }
    }

    /// An input step: what it asks, its fields, who answers, how free text is read, and
    /// its deadline (which cannot approve: nothing would have been given).
    fn input(&mut self, i: &InputStepDef, defaults: &Defaults, models: &ModelRegistry) -> crate::input::InputSpec {
        use crate::input::{DEFAULT_ATTEMPTS, DEFAULT_EXTRACT_TOKENS, EXTRACT_PROMPT, EXTRACT_ROOTS, Extract, Fields, InputSpec, MAX_ATTEMPTS};
        let id = self.step;
        let ask = self.template(IN_STEP, "ask", &i.ask).unwrap_or_else(unusable);
        let fields = Fields::compile(&i.fields).map_err(|wrong| {
            for w in wrong {
                let field = if w.field.is_empty() { "fields".to_owned() } else { format!("fields.{}", w.field) };
                self.found.push(id, &field, w.message);
            }
        });
        if i.from.len() > MAX_REVIEWERS {
            self.found.push(id, "from", format!("{} principals; the limit is {MAX_REVIEWERS}", i.from.len()));
        }
        let mut from = Vec::new();
        for (n, raw) in i.from.iter().enumerate() {
            match reviewer(raw) {
                Some(p) => from.push(p),
                None => self.found.push(id, &format!("from[{n}]"), format!("{raw:?}: name who answers as `user:<id>` or `group:<name>`")),
            }
        }
        let max_attempts = i.max_attempts.unwrap_or(DEFAULT_ATTEMPTS);
        if !(1..=MAX_ATTEMPTS).contains(&max_attempts) {
            self.found.push(id, "max_attempts", format!("must be 1 to {MAX_ATTEMPTS}"));
        }
        let extract = i.extract.as_ref().map(|e| {
            let model = e.model.as_ref().or(defaults.model.as_ref());
            let max_tokens = e.max_tokens.unwrap_or(DEFAULT_EXTRACT_TOKENS);
            match model.map(|m| (m, models.get(m))) {
                None => self.found.push(id, "extract.model", "no model: set it on extract or in defaults.model"),
                Some((m, None)) => {
                    self.found.push(id, "extract.model", format!("unknown model {m:?}: no price is known for it (add it with CHAINRUN_MODEL_PRICES)"))
                }
                Some((m, Some(info))) if max_tokens > info.max_output_tokens => self.found.push(
                    id,
                    "extract.max_tokens",
                    format!("{max_tokens} exceeds {m}'s maximum output of {} tokens", info.max_output_tokens),
                ),
                Some(_) if max_tokens == 0 => self.found.push(id, "extract.max_tokens", "must be at least 1"),
                Some(_) => {}
            }
            let model = model.and_then(|m| ModelId::parse(m).ok()).unwrap_or_else(unknown_model);
            let prompt = Template::compile(EXTRACT_PROMPT, &EXTRACT_ROOTS, Keep::Source)
                .unwrap_or_else(|e| unreachable!("the extraction prompt compiles: {e}"));
            let call = LlmSpec {
                model: model.clone(),
                system: None,
                prompt,
                temperature: Some(0.0),
                max_tokens,
                stop_sequences: Vec::new(),
                stream: false,
                format: OutputFormat::Json,
                // A reply that is JSON but not an object is a failed reading, not a retry:
                // without a schema the corrective hint, and so the estimate, stays bounded.
                schema: None,
                // One corrective retry for a reply that is not JSON.
                retry: RetryPolicy { max_attempts: 2, ..RetryPolicy::default() },
                // A short fixed prompt: nothing worth caching.
                cache: CacheMode::Off,
                service_tier: ServiceTier::Default,
                shared_prefix: false,
            };
            Extract { model, max_tokens, call }
        });
        let timeout = match (&i.timeout, &i.on_timeout) {
            (None, None) => None,
            (None, Some(_)) => {
                self.found.push(id, "on_timeout", "a deadline needs a `timeout` to fire");
                None
            }
            (Some(raw), on_timeout) => {
                let timeout = parse_timeout(raw).map_err(|why| self.found.push(id, "timeout", why)).ok();
                let outcome = match on_timeout {
                    None => Some(OnTimeout::Reject),
                    Some(v) => on_timeout_of(v, "on_timeout", 0).map_err(|(field, why)| self.found.push(id, &field, why)).ok(),
                };
                if let Some(outcome) = &outcome
                    && approves(outcome)
                {
                    self.found.push(
                        id,
                        "on_timeout",
                        "an input step's deadline cannot approve it: nothing was given to approve; use \"reject\" or an escalation",
                    );
                }
                timeout.zip(outcome)
            }
        };
        InputSpec {
            ask,
            // Reported when it does not compile; the graph is then rejected.
            fields: fields.unwrap_or_else(|()| unusable_fields()),
            from,
            extract,
            max_attempts,
            timeout,
        }
    }

    /// Step ids named in a route or default: they must exist.
    fn targets(&mut self, field: &str, names: &[String]) -> Vec<StepId> {
        let mut ids = Vec::new();
        for name in names {
            if !self.ids.contains_key(name.as_str()) {
                self.found.push(self.step, field, format!("routes to unknown step {name:?}"));
            } else if name == self.step {
                self.found.push(self.step, field, "a router cannot route to itself");
            } else if let Ok(id) = StepId::parse(name) {
                ids.push(id);
            }
        }
        ids
    }
}

/// Stands in for a template that was reported as broken, in a graph that is then rejected.
fn unknown_model() -> ModelId {
    ModelId::parse("unknown").unwrap_or_else(|e| unreachable!("a plain word is a model id: {e}"))
}

/// Stands in for `fields` that were reported as broken, in a graph that is then rejected.
fn unusable_fields() -> crate::input::Fields {
    crate::input::Fields::compile(&serde_json::json!({ "type": "object", "properties": { "x": {} } }))
        .unwrap_or_else(|e| unreachable!("a one-field schema compiles: {e:?}"))
}

/// Whether a deadline (after any escalations) approves.
fn approves(outcome: &OnTimeout) -> bool {
    match outcome {
        OnTimeout::Approve => true,
        OnTimeout::Reject => false,
        OnTimeout::Escalate { then, .. } => approves(then),
    }
}

fn unusable() -> Template {
    static EMPTY: std::sync::OnceLock<Template> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| Template::compile("", &[], Keep::Source).unwrap_or_else(|e| unreachable!("the empty template compiles: {e}"))).clone()
}

/// An `on_timeout` value at `field`, `depth` escalations deep.
fn on_timeout_of(value: &Value, field: &str, depth: usize) -> Result<OnTimeout, (String, String)> {
    let wrong = |why: &str| Err((field.to_owned(), why.to_owned()));
    match value {
        Value::String(s) if s == "approve" => Ok(OnTimeout::Approve),
        Value::String(s) if s == "reject" => Ok(OnTimeout::Reject),
        Value::Object(o) => {
            if depth >= MAX_ESCALATIONS {
                return Err((field.to_owned(), format!("at most {MAX_ESCALATIONS} escalations")));
            }
            if let Some(unknown) = o.keys().find(|k| !["escalate_to", "timeout", "then"].contains(&k.as_str())) {
                return Err((format!("{field}.{unknown}"), "unknown field: an escalation has escalate_to, timeout and then".into()));
            }
            let to = match o.get("escalate_to") {
                Some(Value::Array(list)) if !list.is_empty() && list.len() <= MAX_REVIEWERS => list
                    .iter()
                    .enumerate()
                    .map(|(n, v)| {
                        v.as_str()
                            .and_then(reviewer)
                            .ok_or_else(|| (format!("{field}.escalate_to[{n}]"), format!("{v}: name a reviewer as `user:<id>` or `group:<name>`")))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                _ => return Err((format!("{field}.escalate_to"), format!("1 to {MAX_REVIEWERS} reviewers to hand the review to"))),
            };
            let timeout = match o.get("timeout").and_then(Value::as_str) {
                Some(raw) => parse_timeout(raw).map_err(|why| (format!("{field}.timeout"), why))?,
                None => return Err((format!("{field}.timeout"), "required: how long the escalated review may wait".into())),
            };
            let then = match o.get("then") {
                Some(v) => on_timeout_of(v, &format!("{field}.then"), depth + 1)?,
                None => OnTimeout::Reject,
            };
            Ok(OnTimeout::Escalate { to, timeout, then: Box::new(then) })
        }
        _ => wrong("\"approve\", \"reject\" or { \"escalate_to\": [...], \"timeout\": \"24h\", \"then\": ... }"),
    }
}

/// A principal as a review names it: `user:<id>`, `group:<name>`.
pub fn reviewer_name(p: &Principal) -> String {
    match p {
        Principal::User(u) => format!("user:{u}"),
        Principal::Group(g) => format!("group:{g}"),
        Principal::Admin => "admin".into(),
        Principal::Authed => "authed".into(),
        Principal::Public => "public".into(),
    }
}

/// `user:<id>` or `group:<name>`, as a principal.
fn reviewer(raw: &str) -> Option<Principal> {
    let (kind, name) = raw.split_once(':')?;
    let valid = !name.is_empty() && name.len() <= 128 && !name.chars().any(|c| c.is_control() || c == '#' || c.is_whitespace());
    match kind {
        "user" if valid => Some(Principal::User(name.to_owned())),
        "group" if valid => Some(Principal::Group(name.to_owned())),
        _ => None,
    }
}

struct Checked<'a> {
    id: &'a str,
    kind: StepKind,
    /// Indexes in `checked`, ordered by the dependency's id.
    deps: Vec<usize>,
    required: bool,
    join: Join,
    enabled: bool,
}

/// Validates `def` whose steps are `steps` (`def.steps` itself is not read).
fn check(def: &WorkflowDef, steps: &[Value], models: &ModelRegistry, limits: Limits) -> Result<ValidatedGraph, InvalidWorkflow> {
    let mut found = Problems::default();
    let name = WorkflowName::parse(&def.name).ok().filter(|_| !def.name.trim().is_empty() && def.name.len() <= MAX_NAME_LEN);
    if name.is_none() {
        found.push("", "name", format!("must be 1 to {MAX_NAME_LEN} characters, without control characters"));
    }
    if steps.is_empty() {
        found.push("", "steps", "a workflow needs at least one step");
    }
    if steps.len() > limits.max_steps {
        // Checking thousands of steps would itself be the resource exhaustion the limit prevents.
        found.push("", "steps", format!("{} steps; the limit is {}", steps.len(), limits.max_steps));
        return Err(InvalidWorkflow { problems: found.0 });
    }
    let max_concurrency = def.max_concurrency.unwrap_or(DEFAULT_CONCURRENCY);
    if max_concurrency == 0 || max_concurrency > MAX_CONCURRENCY {
        found.push("", "max_concurrency", format!("must be 1 to {MAX_CONCURRENCY}"));
    }
    let input_schema = def.input_schema.as_ref().and_then(|document| match Schema::compile(document) {
        Ok(schema) => Some(schema),
        Err(why) => {
            found.push("", "input_schema", format!("not a usable JSON Schema: {why}"));
            None
        }
    });
    let budget = BudgetLimits::from_def(def.budget.as_ref()).unwrap_or_else(|problems| {
        for p in problems {
            found.push("", p.field, p.message);
        }
        BudgetLimits::UNLIMITED
    });

    // Parse each step on its own so that every malformed step is reported.
    fn raw_id(raw: &Value) -> Option<&str> {
        raw.get("id").and_then(Value::as_str)
    }
    let mut parsed: Vec<(&str, StepDef)> = Vec::with_capacity(steps.len());
    let mut ids: Ids<'_> = HashMap::with_capacity(steps.len());
    for (i, raw) in steps.iter().enumerate() {
        if let Some(id) = raw_id(raw) {
            ids.entry(id).or_insert(None);
        }
        let label = || raw_id(raw).map(str::to_owned).unwrap_or_else(|| format!("#{i}"));
        let step = match StepDef::deserialize(raw) {
            Ok(s) => s,
            Err(e) => {
                let message = e.to_string();
                let field = if raw.get("type").is_none() || message.contains("unknown variant") { "type" } else { "step" };
                found.push(&label(), field, message);
                continue;
            }
        };
        let id = match raw_id(raw) {
            Some(id) if id == step.common().id && StepId::parse(id).is_ok() => id,
            _ => {
                found.push(&label(), "id", "required: start with a letter and use only letters, digits and _ (at most 64)");
                continue;
            }
        };
        let slot = ids.entry(id).or_insert(None);
        if slot.is_some() {
            found.push(id, "id", "duplicate step id");
            continue;
        }
        *slot = Some(parsed.len());
        parsed.push((id, step));
    }

    let mut checked = Vec::with_capacity(parsed.len());
    for (id, step) in &parsed {
        let id: &str = id;
        let common = step.common();
        let mut c = Checker { found: &mut found, ids: &ids, step: id, deps: Vec::new() };
        for d in common.depends_on {
            if d == id {
                c.found.push(id, "depends_on", "a step cannot depend on itself");
            } else if let Some(known) = ids.get(d.as_str()) {
                c.deps.extend(*known);
            } else {
                c.found.push(id, "depends_on", format!("unknown step {d:?}"));
            }
        }
        let kind = match step {
            StepDef::Llm(llm) => StepKind::Llm(c.llm(IN_STEP, llm, &def.defaults, models)),
            StepDef::Transform(t) => StepKind::Transform(c.transform(IN_STEP, t)),
            StepDef::Router(r) => {
                if r.routes.is_empty() && r.default.is_empty() {
                    c.found.push(id, "routes", "a router needs at least one route or a default");
                }
                if r.routes.len() > MAX_ROUTES {
                    c.found.push(id, "routes", format!("{} routes; the limit is {MAX_ROUTES}", r.routes.len()));
                }
                let mut routes = Vec::new();
                for (n, route) in r.routes.iter().enumerate() {
                    let when = c.expression(&format!("routes[{n}].when"), &route.when, &STEP_ROOTS);
                    let to = c.targets(&format!("routes[{n}].to"), &route.to);
                    if let Some(when) = when {
                        routes.push(Route { when, to });
                    }
                }
                let default = c.targets("default", &r.default);
                StepKind::Router(RouterSpec { routes, default })
            }
            StepDef::Map(m) => {
                let over = c.expression("over", &m.over, &STEP_ROOTS);
                let max_concurrency = m.max_concurrency.unwrap_or(DEFAULT_MAP_CONCURRENCY);
                if max_concurrency == 0 || max_concurrency > MAX_CONCURRENCY {
                    c.found.push(id, "max_concurrency", format!("must be 1 to {MAX_CONCURRENCY}"));
                }
                let inner = m.step.common();
                if !inner.id.is_empty() || !inner.depends_on.is_empty() || !inner.required || inner.join != Join::All || !inner.enabled {
                    c.found.push(id, "step", "a map's step has no id, depends_on, required, join or enabled of its own: set them on the map");
                }
                let step = match m.step.as_ref() {
                    StepDef::Llm(llm) => ItemStep::Llm(c.llm(IN_MAP_ITEM, llm, &def.defaults, models)),
                    StepDef::Transform(t) => ItemStep::Transform(c.transform(IN_MAP_ITEM, t)),
                    other => {
                        c.found.push(
                            id,
                            "step.type",
                            format!("a map's step must be `llm` or `transform`, not `{}` (maps do not nest)", other.type_name()),
                        );
                        ItemStep::Transform(TransformSpec::Template(unusable()))
                    }
                };
                c.map_mode(m.mode, &step, models);
                match over {
                    Some(over) => StepKind::Map(MapSpec { over, max_concurrency, on_item_failure: m.on_item_failure, mode: m.mode, step }),
                    None => StepKind::Transform(TransformSpec::Template(unusable())), // reported above
                }
            }
            StepDef::Review(r) => {
                let show = c.template(IN_STEP, "show", &r.show).unwrap_or_else(unusable);
                if r.reviewers.len() > MAX_REVIEWERS {
                    c.found.push(id, "reviewers", format!("{} reviewers; the limit is {MAX_REVIEWERS}", r.reviewers.len()));
                }
                let mut reviewers = Vec::new();
                for (n, raw) in r.reviewers.iter().enumerate() {
                    match reviewer(raw) {
                        Some(p) => reviewers.push(p),
                        None => c.found.push(id, &format!("reviewers[{n}]"), format!("{raw:?}: name a reviewer as `user:<id>` or `group:<name>`")),
                    }
                }
                let timeout = match (&r.timeout, &r.on_timeout) {
                    (None, None) => None,
                    (None, Some(_)) => {
                        c.found.push(id, "on_timeout", "a deadline needs a `timeout` to fire");
                        None
                    }
                    (Some(raw), on_timeout) => {
                        let timeout = parse_timeout(raw).map_err(|why| c.found.push(id, "timeout", why)).ok();
                        let outcome = match on_timeout {
                            // Safe by default: nobody approved it.
                            None => Some(OnTimeout::Reject),
                            Some(v) => on_timeout_of(v, "on_timeout", 0).map_err(|(field, why)| c.found.push(id, &field, why)).ok(),
                        };
                        timeout.zip(outcome)
                    }
                };
                StepKind::Review(ReviewSpec { show, reviewers, timeout })
            }
            StepDef::Input(i) => StepKind::Input(c.input(i, &def.defaults, models)),
        };
        let mut deps = c.deps;
        deps.sort_unstable_by_key(|&d| parsed[d].0);
        deps.dedup();
        checked.push(Checked { id, kind, deps, required: common.required, join: common.join, enabled: common.enabled });
    }
    let output = def.output.as_ref().and_then(|out| {
        let mut c = Checker { found: &mut found, ids: &ids, step: "", deps: Vec::new() };
        c.template(IN_STEP, "output", out)
    });
    for step in &checked {
        let (prefix, spec) = match &step.kind {
            StepKind::Llm(spec) => ("", spec),
            StepKind::Input(crate::input::InputSpec { extract: Some(extract), .. }) => ("extract.", &extract.call),
            StepKind::Map(MapSpec { step: ItemStep::Llm(spec), .. }) => ("step.", spec),
            _ => continue,
        };
        if let Some(why) = never_fits(&budget, spec, models) {
            found.push(step.id, &format!("{prefix}max_tokens"), why);
        }
    }

    // A router can only switch off steps that wait for it.
    for (r, step) in checked.iter().enumerate() {
        if let StepKind::Router(router) = &step.kind {
            for target in router.targets().collect::<BTreeSet<_>>() {
                if let Some(Some(t)) = ids.get(target.as_str())
                    && !checked[*t].deps.contains(&r)
                {
                    found.push(
                        step.id,
                        "routes",
                        format!(
                            "routes to {:?}, which does not depend on {:?}: add it to {:?}'s depends_on",
                            target.as_str(),
                            step.id,
                            target.as_str()
                        ),
                    );
                }
            }
        }
    }

    let order = topological_order(&checked);
    if order.len() < checked.len() {
        // Kahn's algorithm left steps unordered: there is a cycle. Only now pay for finding
        // and naming it.
        let graph: BTreeMap<String, BTreeSet<String>> =
            checked.iter().map(|c| (c.id.to_owned(), c.deps.iter().map(|&d| checked[d].id.to_owned()).collect())).collect();
        if let Some(cycle) = find_cycle(&graph) {
            found.push(&cycle[0], "depends_on", format!("dependency cycle: {}", cycle.join(" → ")));
        }
    }
    if !found.0.is_empty() {
        return Err(InvalidWorkflow { problems: found.0 });
    }

    let mut position = vec![0; checked.len()];
    for (i, &s) in order.iter().enumerate() {
        position[s] = i;
    }
    let mut slots: Vec<Option<Checked>> = checked.into_iter().map(Some).collect();
    let mut steps = Vec::with_capacity(slots.len());
    for &s in &order {
        let Some(c) = slots[s].take() else { continue };
        let Ok(id) = StepId::parse(c.id) else { continue }; // checked above
        let deps = c.deps.iter().map(|&d| position[d]).collect();
        steps.push(Step { id, kind: c.kind, deps, required: c.required, join: c.join, enabled: c.enabled });
    }
    mark_shared_prefixes(&mut steps);
    let mut dependents = vec![Vec::new(); steps.len()];
    for (i, s) in steps.iter().enumerate() {
        for &d in &s.deps {
            dependents[d].push(i);
        }
    }
    let Some(name) = name else { return Err(InvalidWorkflow { problems: found.0 }) };
    let pause_on_budget = def.budget.as_ref().and_then(|b| b.on_exceeded) == Some(crate::workflow::OnExceeded::Pause);
    Ok(ValidatedGraph { name, steps, dependents, output, max_concurrency, input_schema, budget, pause_on_budget })
}

/// See [`ValidatedGraph::lifecycle`].
#[derive(Debug, Default, PartialEq)]
pub struct ModelNotes {
    pub warnings: Vec<Problem>,
    pub retired: Vec<Problem>,
}

/// Steps that call the same model with the same system prompt share their head: each
/// one's calls can read what another's wrote to the prompt cache.
fn mark_shared_prefixes(steps: &mut [Step]) {
    let key = |spec: &LlmSpec| spec.system.as_ref().map(|s| (spec.model.as_str().to_owned(), s.source().to_owned()));
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    for step in steps.iter() {
        if let StepKind::Llm(spec) = &step.kind
            && let Some(k) = key(spec)
        {
            *seen.entry(k).or_default() += 1;
        }
    }
    for step in steps.iter_mut() {
        if let StepKind::Llm(spec) = &mut step.kind
            && let Some(k) = key(spec)
        {
            spec.shared_prefix |= seen.get(&k).is_some_and(|&n| n > 1);
        }
    }
}

/// Why a call of this step could never be admitted, even as the run's first and with an
/// empty prompt: its reservation alone exceeds the whole budget.
fn never_fits(limits: &BudgetLimits, spec: &LlmSpec, models: &ModelRegistry) -> Option<String> {
    if limits.is_unlimited() {
        return None;
    }
    let model = spec.priced_at_most(models)?; // an unknown model is reported on its own
    let least = spec.worst_call(&model, budget::estimate_input_tokens(spec.system.as_ref().map(|_| ""), ""), spec.max_tokens);
    let limit = limits.exceeded_by(Amount::ZERO, Amount::ZERO, least)?;
    Some(format!(
        "every call of this step reserves at least {least} (max_tokens {} of output plus the prompt's template allowance), more than the whole budget's {limit}: lower max_tokens or raise the budget",
        spec.max_tokens
    ))
}

/// Returns one cycle as a closed path in run order (`a → b → a`), if any.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    let mut marks: BTreeMap<&str, Mark> = BTreeMap::new();
    // Iterative DFS: a 200-step chain must not exhaust a Lambda's stack.
    for start in graph.keys() {
        if marks.contains_key(start.as_str()) {
            continue;
        }
        let mut path: Vec<&str> = vec![start];
        let mut iters: Vec<std::collections::btree_set::Iter<'_, String>> = vec![graph[start].iter()];
        marks.insert(start, Mark::Visiting);
        while let Some(it) = iters.last_mut() {
            match it.next() {
                Some(dep) => match marks.get(dep.as_str()) {
                    Some(Mark::Done) => {}
                    Some(Mark::Visiting) => {
                        let from = path.iter().position(|p| *p == dep).unwrap_or(0);
                        let mut cycle: Vec<String> = path[from..].iter().map(|s| (*s).to_owned()).collect();
                        cycle.push(dep.clone());
                        cycle.reverse();
                        return Some(cycle);
                    }
                    None => {
                        marks.insert(dep, Mark::Visiting);
                        path.push(dep);
                        iters.push(graph.get(dep).map(|d| d.iter()).unwrap_or_default());
                    }
                },
                None => {
                    if let Some(done) = path.pop() {
                        marks.insert(done, Mark::Done);
                    }
                    iters.pop();
                }
            }
        }
    }
    None
}

/// Kahn's algorithm, stable in definition order: of the steps ready, the first defined
/// comes first.
fn topological_order(checked: &[Checked]) -> Vec<usize> {
    // Definitions usually list each step after the steps it reads, and then that order is
    // the answer.
    if checked.iter().enumerate().all(|(i, c)| c.deps.iter().all(|&d| d < i)) {
        return (0..checked.len()).collect();
    }
    let mut remaining = vec![0usize; checked.len()];
    let mut dependents = vec![Vec::new(); checked.len()];
    for (i, c) in checked.iter().enumerate() {
        for &d in &c.deps {
            dependents[d].push(i);
            remaining[i] += 1;
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> = (0..checked.len()).filter(|&i| remaining[i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(checked.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for &d in &dependents[i] {
            remaining[d] -= 1;
            if remaining[d] == 0 {
                ready.push(Reverse(d));
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
    fn a_review_reads_what_it_shows_and_names_its_reviewers() {
        let g = validate_json(
            &wf(json!([
                { "id": "draft", "type": "llm", "prompt": "x" },
                { "id": "check", "type": "review", "show": "{{ steps.draft.text }}", "reviewers": ["user:bob", "group:leads"] }
            ])),
            &registry(),
        )
        .unwrap();
        assert_eq!(g.steps[1].deps, vec![0], "what a review shows is a dependency");
        let StepKind::Review(spec) = &g.steps[1].kind else { panic!("a review") };
        assert_eq!(spec.reviewers, vec![Principal::User("bob".into()), Principal::Group("leads".into())]);
    }

    #[test]
    fn rejects_malformed_reviews_naming_each_field() {
        let p = problems(wf(json!([
            { "id": "a", "type": "review", "show": "{{ steps.ghost.text }}", "reviewers": ["bob", "user:", "group:a b", "user:ok"] },
            { "id": "b", "type": "review" },
            { "id": "m", "type": "map", "over": "[1]", "step": { "type": "review", "show": "x" } }
        ])));
        let at: Vec<(Option<&str>, &str)> = p.iter().map(|p| (p.step.as_deref(), p.field.as_str())).collect();
        for expected in [
            (Some("a"), "show"),
            (Some("a"), "reviewers[0]"),
            (Some("a"), "reviewers[1]"),
            (Some("a"), "reviewers[2]"),
            (Some("b"), "step"),
            (Some("m"), "step.type"),
        ] {
            assert!(at.contains(&expected), "{expected:?} not in {p:?}");
        }
        assert!(!at.contains(&(Some("a"), "reviewers[3]")), "{p:?}");
    }

    #[test]
    fn review_deadlines_parse_and_their_mistakes_are_named() {
        assert_eq!(parse_timeout("48h"), Ok(std::time::Duration::from_secs(48 * 3600)));
        assert_eq!(parse_timeout("90s"), Ok(std::time::Duration::from_secs(90)));
        for bad in ["59s", "31d", "h", "2w", "-1h", ""] {
            assert!(parse_timeout(bad).is_err(), "{bad:?} accepted");
        }
        let g = validate_json(
            &wf(json!([{ "id": "r", "type": "review", "show": "x", "timeout": "1h",
                          "on_timeout": { "escalate_to": ["group:leads"], "timeout": "2h", "then": "approve" } }])),
            &registry(),
        )
        .unwrap();
        let StepKind::Review(ReviewSpec { timeout: Some((after, on_timeout)), .. }) = &g.steps[0].kind else { panic!("a timed review") };
        assert_eq!(*after, std::time::Duration::from_secs(3600));
        assert_eq!(on_timeout.at_level(1), (&OnTimeout::Approve, vec![Principal::Group("leads".into())]));
        let StepKind::Review(spec) = &g.steps[0].kind else { panic!("a review") };
        let alice: crate::ids::UserId = "alice".parse().unwrap();
        let (starter, leads) = (Principal::User("alice".into()), Principal::Group("leads".into()));
        assert_eq!(spec.deciders(&alice, Some(0)), vec![starter.clone()], "no reviewers named: the starter");
        assert_eq!(spec.deciders(&alice, Some(1)), vec![starter.clone(), leads.clone()], "and those it escalated to");
        assert_eq!(spec.deciders(&alice, None), vec![starter, leads]);
        let defaulted = validate_json(&wf(json!([{ "id": "r", "type": "review", "show": "x", "timeout": "1h" }])), &registry()).unwrap();
        assert!(matches!(&defaulted.steps[0].kind, StepKind::Review(ReviewSpec { timeout: Some((_, OnTimeout::Reject)), .. })), "safe by default");

        let deep = json!({ "escalate_to": ["user:a"], "timeout": "1h", "then": { "escalate_to": ["user:b"], "timeout": "1h", "then":
                    { "escalate_to": ["user:c"], "timeout": "1h", "then": { "escalate_to": ["user:d"], "timeout": "1h" } } } });
        let p = problems(wf(json!([
            { "id": "a", "type": "review", "show": "x", "on_timeout": "approve" },
            { "id": "b", "type": "review", "show": "x", "timeout": "soon", "on_timeout": "maybe" },
            { "id": "c", "type": "review", "show": "x", "timeout": "1h", "on_timeout": { "escalate_to": ["bob"], "timeout": "1h" } },
            { "id": "d", "type": "review", "show": "x", "timeout": "1h", "on_timeout": { "escalate_to": ["user:x"] } },
            { "id": "e", "type": "review", "show": "x", "timeout": "1h", "on_timeout": deep }
        ])));
        let at: Vec<(Option<&str>, &str)> = p.iter().map(|p| (p.step.as_deref(), p.field.as_str())).collect();
        for expected in [
            (Some("a"), "on_timeout"),
            (Some("b"), "timeout"),
            (Some("b"), "on_timeout"),
            (Some("c"), "on_timeout.escalate_to[0]"),
            (Some("d"), "on_timeout.timeout"),
            (Some("e"), "on_timeout.then.then.then"),
        ] {
            assert!(at.contains(&expected), "{expected:?} not in {p:?}");
        }
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
    fn a_reference_to_a_step_that_failed_to_parse_is_reported_not_panicked_on() {
        let p = problems(wf(json!([
            { "id": "a", "type": "x" },
            { "id": "b", "type": "transform", "expression": "steps.a.text + '!'" }
        ])));
        assert_eq!(p.len(), 1, "only a's type is wrong: {p:?}");
        assert_eq!((p[0].step.as_deref(), p[0].field.as_str()), (Some("a"), "type"));
    }

    #[test]
    fn the_input_schema_must_be_usable_and_inputs_are_checked_against_it() {
        let mut def = wf(json!([{ "id": "a", "type": "transform", "template": "{{ input.feedback }}" }]));
        def["input_schema"] = json!({ "type": "object", "required": ["feedback"], "properties": { "feedback": { "type": "string" } } });
        let g = validate_json(&def, &registry()).unwrap();
        assert!(g.check_input(&json!({ "feedback": "slow app" })).is_ok());
        let why = g.check_input(&json!({ "feedback": 3 })).unwrap_err();
        assert!(why[0].contains("/feedback"), "{why:?}");
        assert!(g.check_input(&json!({})).unwrap_err()[0].contains("feedback"));
        def["input_schema"] = json!({ "type": "no-such-type" });
        assert_eq!(problems(def)[0].field, "input_schema");
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

    fn problem_for<'a>(p: &'a [Problem], step: &str, field: &str) -> &'a Problem {
        p.iter().find(|x| x.step.as_deref() == Some(step) && x.field == field).unwrap_or_else(|| panic!("no problem for {step}.{field}: {p:?}"))
    }

    #[test]
    fn routes_must_target_steps_that_depend_on_the_router() {
        let p = problems(wf(json!([
            { "id": "r", "type": "router", "routes": [{ "when": "true", "to": ["a", "ghost"] }], "default": ["b"] },
            { "id": "a", "type": "transform", "template": "x" },
            { "id": "b", "type": "transform", "depends_on": ["r"], "template": "y" }
        ])));
        assert!(problem_for(&p, "r", "routes").message.contains("\"a\", which does not depend on \"r\""), "{p:?}");
        assert!(problem_for(&p, "r", "routes[0].to").message.contains("ghost"));
        assert_eq!(p.len(), 2, "b depends on r: fine. {p:?}");
    }

    #[test]
    fn router_conditions_are_cel_and_become_dependencies() {
        let g = validate_json(
            &wf(json!([
                { "id": "s", "type": "transform", "expression": "{'label': 'negative'}" },
                { "id": "r", "type": "router", "routes": [{ "when": "steps.s.output.label == 'negative'", "to": ["t"] }] },
                { "id": "t", "type": "transform", "depends_on": ["r"], "template": "x" }
            ])),
            &registry(),
        )
        .unwrap();
        let r = g.index_of("r").unwrap();
        assert_eq!(g.steps[r].deps, vec![g.index_of("s").unwrap()]);
        let p = problems(wf(json!([{ "id": "r", "type": "router", "routes": [{ "when": "steps.s.output ==", "to": [] }] }])));
        assert!(problem_for(&p, "r", "routes[0].when").message.contains("CEL"), "{p:?}");
    }

    #[test]
    fn map_steps_take_one_llm_or_transform_without_their_own_wiring() {
        let p = problems(wf(json!([
            { "id": "m1", "type": "map", "over": "input.xs", "step": { "type": "map", "over": "item", "step": { "type": "transform", "template": "x" } } },
            { "id": "m2", "type": "map", "over": "input.xs", "step": { "id": "inner", "type": "llm", "prompt": "{{ item }}" } },
            { "id": "m3", "type": "map", "over": "input.xs", "max_concurrency": 0, "step": { "type": "transform", "template": "{{ item }} {{ index }}" } }
        ])));
        assert!(problem_for(&p, "m1", "step.type").message.contains("maps do not nest"));
        assert!(problem_for(&p, "m2", "step").message.contains("no id"));
        assert_eq!(problem_for(&p, "m3", "max_concurrency").field, "max_concurrency");
    }

    #[test]
    fn item_and_index_exist_only_inside_a_map() {
        let p = problems(wf(json!([{ "id": "a", "type": "llm", "prompt": "{{ item }}" }])));
        assert!(problem_for(&p, "a", "prompt").message.contains("only inside a map"));
    }

    #[test]
    fn a_transform_needs_exactly_one_of_template_and_expression() {
        for step in [json!({ "id": "t", "type": "transform" }), json!({ "id": "t", "type": "transform", "template": "a", "expression": "1" })] {
            let p = problems(wf(json!([step])));
            assert!(problem_for(&p, "t", "template").message.contains("exactly one"));
        }
    }

    #[test]
    fn limits_are_enforced() {
        let steps: Vec<Value> = (0..=MAX_STEPS).map(|i| json!({ "id": format!("s{i}"), "type": "transform", "template": "x" })).collect();
        assert!(problems(wf(json!(steps)))[0].message.contains("limit"));
        let mut def = wf(json!([{ "id": "a", "type": "transform", "template": "x" }]));
        def["max_concurrency"] = json!(1000);
        assert_eq!(problems(def)[0].field, "max_concurrency");
        let big = "x".repeat(MAX_TEMPLATE_BYTES + 1);
        assert!(problems(wf(json!([{ "id": "a", "type": "transform", "template": big }])))[0].message.contains("limit"));
    }
}
