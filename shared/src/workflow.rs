//! The workflow definition as clients write it (JSON). Untrusted: nothing here is
//! executed before [`crate::graph::validate`] turns it into a [`crate::graph::ValidatedGraph`].
//!
//! The JSON Schema published in `schemas/workflow.schema.json` is generated from these
//! types (`cargo run -p chainrun-core --example workflow_schema`), and a test keeps the
//! checked-in file in sync.

use crate::pricing::ServiceTier;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The published JSON Schema of [`WorkflowDef`], pretty-printed (what
/// `schemas/workflow.schema.json` holds).
pub fn schema_json() -> String {
    let schema = schemars::schema_for!(WorkflowDef);
    // Serializing a schema (plain JSON values) cannot fail.
    serde_json::to_string_pretty(&schema).unwrap_or_default()
}

/// A workflow: a graph of steps run as one unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "chainrun workflow definition")]
pub struct WorkflowDef {
    /// Names the workflow in history, analytics and progress feeds.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Values each `llm` step inherits unless it sets its own.
    #[serde(default)]
    pub defaults: Defaults,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// JSON Schema the run input must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<Value>,
    /// How many steps of one run may execute at once (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// The steps. Kept as raw JSON here so that one malformed step is reported by its id
    /// and field alongside every other problem, instead of failing the whole parse.
    #[schemars(with = "Vec<StepDef>")]
    pub steps: Vec<Value>,
    /// Template for the run's final output; when absent the output is an object of the
    /// outputs of the steps nothing else depends on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Bedrock model id or inference profile id (`us.`, `eu.`, `apac.`, `global.`).
    pub model: Option<String>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
    pub retry: Option<RetryPolicy>,
}

// Values stay raw JSON so that validation (`crate::budget::BudgetLimits::from_def`)
// reports a bad one by its field rather than failing the whole parse.
/// Limits for one run: before every model call its worst case is reserved, and a call
/// that does not fit is not made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Dollars the run's model calls may cost in all, as a decimal string (`"0.02"`, read
    /// exactly) or a number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "dollar_amount_schema")]
    pub max_cost_usd: Option<Value>,
    /// Input, output and cache tokens the run's model calls may use in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<u64>")]
    pub max_total_tokens: Option<Value>,
    /// What a call the budget refuses does: `fail` its step (the default), or `pause` the
    /// run until it is resumed with a larger budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_exceeded: Option<OnExceeded>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnExceeded {
    #[default]
    Fail,
    Pause,
}

fn dollar_amount_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": ["string", "number", "null"],
        "pattern": "^\\s*([0-9]+\\.?[0-9]*|\\.[0-9]+)\\s*$",
        "minimum": 0
    })
}

/// Per-step retry of retryable errors (throttling, timeouts, 5xx, invalid output):
/// exponential backoff with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_attempts: 3, initial_backoff_ms: 500, max_backoff_ms: 20_000 }
    }
}

/// One step. `type` selects the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StepDef {
    /// A model call (Bedrock Converse).
    Llm(LlmStepDef),
    /// A template or CEL expression over earlier outputs; no model call.
    Transform(TransformStepDef),
    /// Ordered CEL conditions choosing which downstream steps stay active.
    Router(RouterStepDef),
    /// Runs a sub-step for every item of a list, results collected in order.
    Map(MapStepDef),
    /// A person approves, rejects or edits what `show` renders; the run waits meanwhile,
    /// holding no runner.
    Review(ReviewStepDef),
    /// Asks a person for named, validated values (`fields`), over as many answers as
    /// `max_attempts` allows; the run waits meanwhile, holding no runner.
    Input(InputStepDef),
}

/// What every step has. Inside a map, the sub-step has none of these.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Common<'a> {
    pub id: &'a str,
    pub depends_on: &'a [String],
    pub required: bool,
    pub join: Join,
    pub enabled: bool,
}

impl StepDef {
    pub fn common(&self) -> Common<'_> {
        macro_rules! common {
            ($s:expr) => {
                Common { id: &$s.id, depends_on: &$s.depends_on, required: $s.required, join: $s.join, enabled: $s.enabled }
            };
        }
        match self {
            StepDef::Llm(s) => common!(s),
            StepDef::Transform(s) => common!(s),
            StepDef::Router(s) => common!(s),
            StepDef::Map(s) => common!(s),
            StepDef::Review(s) => common!(s),
            StepDef::Input(s) => common!(s),
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            StepDef::Llm(_) => "llm",
            StepDef::Transform(_) => "transform",
            StepDef::Router(_) => "router",
            StepDef::Map(_) => "map",
            StepDef::Review(_) => "review",
            StepDef::Input(_) => "input",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlmStepDef {
    /// `[A-Za-z][A-Za-z0-9_]*`, unique in the workflow; read as `steps.<id>`. Omitted inside a map.
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// When false, the step's failure does not fail the run.
    #[serde(default = "default_true")]
    pub required: bool,
    #[serde(default)]
    pub join: Join,
    /// When false, the step is switched off: it is skipped as a step its router did not
    /// choose is, and so are the steps that need it (`join: all`).
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub enabled: bool,
    pub model: Option<String>,
    /// System prompt (a template).
    pub system: Option<String>,
    /// User prompt (a template).
    pub prompt: String,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub stop_sequences: Vec<String>,
    /// Use ConverseStream and report `STREAMING` progress events.
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub output: OutputSpec,
    pub retry: Option<RetryPolicy>,
    /// Prompt caching: `auto` (the default) marks the shared head of the request for
    /// Bedrock's prompt cache when other calls will reuse it and the model caches; `off`
    /// never does. `response` also reuses the reply of an identical earlier call of the
    /// tenant's, at no cost (temperature 0 only).
    #[serde(default)]
    pub cache: CacheMode,
    /// Bedrock's service tier for this step's calls, where its model offers it.
    #[serde(default)]
    pub service_tier: ServiceTier,
}

/// A step's use of Bedrock's prompt cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    #[default]
    Auto,
    Off,
    Response,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransformStepDef {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default = "default_true")]
    pub required: bool,
    #[serde(default)]
    pub join: Join,
    /// When false, the step is switched off: it is skipped as a step its router did not
    /// choose is, and so are the steps that need it (`join: all`).
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub enabled: bool,
    /// A Jinja template; the output is the rendered text. Exactly one of `template` and `expression`.
    pub template: Option<String>,
    /// A CEL expression; the output is its value as JSON.
    pub expression: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouterStepDef {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default = "default_true")]
    pub required: bool,
    #[serde(default)]
    pub join: Join,
    /// When false, the step is switched off: it is skipped as a step its router did not
    /// choose is, and so are the steps that need it (`join: all`).
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub enabled: bool,
    /// Tried in order; the first whose condition holds chooses its steps.
    pub routes: Vec<RouteDef>,
    /// Chosen when no route's condition holds.
    #[serde(default)]
    pub default: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteDef {
    /// A CEL condition (must evaluate to a bool).
    pub when: String,
    /// Steps that stay active when this route is chosen; each must depend on the router.
    pub to: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MapStepDef {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default = "default_true")]
    pub required: bool,
    #[serde(default)]
    pub join: Join,
    /// When false, the step is switched off: it is skipped as a step its router did not
    /// choose is, and so are the steps that need it (`join: all`).
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub enabled: bool,
    /// A CEL expression giving the list to fan out over.
    pub over: String,
    /// Items processed at once (default 4).
    pub max_concurrency: Option<u32>,
    #[serde(default)]
    pub on_item_failure: ItemFailure,
    /// How an `llm` item step's calls are made: one by one (`online`, the default), or all
    /// together as one batch inference job at the model's batch price, the run waiting for
    /// it holding no runner (`batch`); `auto` batches when there are at least as many items
    /// as the model's minimum per job.
    #[serde(default, skip_serializing_if = "MapMode::is_online")]
    pub mode: MapMode,
    /// The sub-step run per item (`llm` or `transform`), which may read `item` and `index`.
    pub step: Box<StepDef>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReviewStepDef {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// When false, a rejection does not fail the run; dependents see the step failed.
    #[serde(default = "default_true")]
    pub required: bool,
    #[serde(default)]
    pub join: Join,
    /// When false, the step is switched off: it is skipped as a step its router did not
    /// choose is, and so are the steps that need it (`join: all`).
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub enabled: bool,
    /// What is to be reviewed, a template (e.g. `{{ steps.draft.text }}`). Approved, it is
    /// the step's output; edited, the reviewer's output replaces it.
    pub show: String,
    /// Who may decide: `user:<id>` or `group:<name>`. Default: the run's starter.
    #[serde(default)]
    pub reviewers: Vec<String>,
    /// How long the review may wait: `90s`, `30m`, `48h`, `7d` (1 minute to 30 days).
    pub timeout: Option<String>,
    /// What its deadline does (needs `timeout`): `"approve"`, `"reject"` (the default), or
    /// `{ "escalate_to": [reviewers], "timeout": "24h", "then": <on_timeout> }`, which hands
    /// the review to more reviewers with a new deadline (at most 3 escalations).
    #[schemars(with = "Option<Value>")]
    pub on_timeout: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InputStepDef {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// When false, a step that ends without its values does not fail the run.
    #[serde(default = "default_true")]
    pub required: bool,
    #[serde(default)]
    pub join: Join,
    /// When false, the step is switched off: it is skipped as a step its router did not
    /// choose is, and so are the steps that need it (`join: all`).
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub enabled: bool,
    /// What is asked, a template (e.g. `Which account, {{ input.name }}?`), shown with the
    /// step's `AWAITING_INPUT`.
    pub ask: String,
    /// The values asked for: a JSON Schema object (`type: object`, `properties` (at most
    /// 50), `required`). The collected object is the step's output.
    pub fields: Value,
    /// Who may answer: `user:<id>` or `group:<name>`. Default: the run's starter.
    #[serde(default)]
    pub from: Vec<String>,
    /// The model that reads the values out of a free-text answer (`text`); without it the
    /// step takes `values` only.
    pub extract: Option<ExtractDef>,
    /// Answers allowed before the step fails `INPUT_INCOMPLETE` (1 to 10, default 3).
    pub max_attempts: Option<u32>,
    /// How long the step may wait for its values: `90s`, `30m`, `48h`, `7d`.
    pub timeout: Option<String>,
    /// What its deadline does (needs `timeout`): `"reject"` (the default: the step fails
    /// `INPUT_TIMED_OUT`) or `{ "escalate_to": [...], "timeout": "24h", "then": ... }`.
    #[schemars(with = "Option<Value>")]
    pub on_timeout: Option<Value>,
}

/// The model call that reads values from free text; charged and budgeted like any call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtractDef {
    /// Default: `defaults.model`.
    pub model: Option<String>,
    /// Default 512.
    pub max_tokens: Option<u32>,
}

fn is_true(value: &bool) -> bool {
    *value
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Join {
    /// Every dependency completed.
    #[default]
    All,
    /// At least one dependency completed; the others settled in any way.
    Any,
}

/// How a map's model calls are made (see [`MapStepDef::mode`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MapMode {
    #[default]
    Online,
    Batch,
    Auto,
}

impl MapMode {
    pub fn is_online(&self) -> bool {
        *self == MapMode::Online
    }
}

/// What a map does when one item fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ItemFailure {
    /// The map step fails.
    #[default]
    Fail,
    /// The map completes; failed items are `null` in the results and listed in `detail.failed`.
    Continue,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    #[serde(default)]
    pub format: OutputFormat,
    /// JSON Schema the reply must match (format `json` only); a mismatch is retried with a hint.
    pub schema: Option<Value>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    #[default]
    Text,
    Markdown,
    Json,
}
