//! Cost estimates before a run: per step and in total, `{min, expected, max}` tokens and
//! money for a validated graph and one input, without calling a model.
//!
//! # What `max` rests on
//!
//! `max` is a true upper bound of what the run can be charged, under the facts the budget's
//! reservations rest on (see [`crate::budget`]): a call's reported input tokens are at most
//! [`estimate_input_tokens`](crate::budget::estimate_input_tokens) of the request as sent
//! and at most its model's context window (Bedrock rejects a longer prompt unbilled), and
//! its output tokens at most the step's `max_tokens`. Every attempt is charged, so a step's
//! `max` is its worst call ([`worst_case`]) times `retry.max_attempts`, times the items of
//! a map. Every step that could run is counted, whatever a router may choose; a step
//! switched off (`enabled: false`), and what cannot run without it, is not. `max` always
//! exists; each step says what bounded it (`max_basis`).
//!
//! The unknown is the prompt: it is rendered from upstream outputs that do not exist yet.
//! The estimator renders each template with the real `input` and every upstream value
//! replaced by a marker, then charges each marker at an upper bound of the bytes that value
//! can have:
//! - an `llm` step's `text` (and, for `text`/`markdown` output, its `output`, the same
//!   string) has at most [`reply_limit`](crate::limits::reply_limit) bytes: `max_tokens` ×
//!   [`MAX_REPLY_BYTES_PER_TOKEN`](crate::limits::MAX_REPLY_BYTES_PER_TOKEN), at most 160
//!   KiB. The engine refuses a longer reply (`OUTPUT_TOO_LARGE`), so no step ever
//!   completes with one;
//! - a template transform's text is bounded the same way, recursively;
//! - a router's text is `route N` or `default`;
//! - a step that did not complete renders its null text as `None` (4 bytes), so every
//!   bound is at least 4.
//!
//! Rendering with markers is exact only when upstream values are plain slots: a template
//! that reads steps only as `{{ steps.<id>.text }}` or `{{ steps.<id>.output }}` cannot
//! branch or loop on them, so its real rendering is the marker rendering with each marker
//! swapped for the value (`max_basis: "prompt"`). A template that reads steps any other way
//! (a filter, a field of a JSON output, a condition, a block other than `if`/`for`), reads
//! a JSON `output` or an expression transform's, or a map item whose list comes from a
//! step, has no size the estimator can bound: filters can grow text without limit
//! (`tojson(indent=2)` on nested lists grows quadratically, a 5-byte number such as `1e300`
//! renders as 301 digits). Such a call is bounded by its model's context window instead
//! (`max_basis: "context_window"`), and so is one whose prompt bound exceeds the window. The
//! JSON retry hint is a fixed sentence for steps without a schema; a schema's violation
//! messages can quote the reply, so a `json` step with a schema and retries is bounded by
//! the window too.
//!
//! A map's items: the list's length when the input gives it; for a list read from an `llm`
//! step's output (`steps.<id>.output` or a field path below it) at most `(R - 1) / 2` for
//! a reply of at most `R` bytes (`max_items`); for any other list the engine's limit of
//! [`MAX_MAP_ITEMS`].
//!
//! A budget caps the run whatever the steps could do ([`crate::budget`]'s invariant), so
//! the reported total `max` is the smaller of the sum of the steps' `max` and the budget's
//! limit, per unit (tokens and money separately). [`Estimate::max_unclamped`] is the sum
//! alone.
//!
//! # `min`
//!
//! `min` is a lower bound for runs in which every model call is answered (within the size
//! limit): a call that fails without reported usage (throttling on its last attempt, a
//! timeout) costs nothing and can take a run below it. Even so, a step counts towards `min`
//! only when nothing can switch it off or cancel it: the graph has no routers or maps, every
//! step is required and joins all, every `llm` step replies in text, every template renders
//! with this input, and the sum of `max` fits the budget (so no call can be refused). Then
//! each `llm` step costs at least one input and one output token (a caching step's input
//! token at the cache-read price), except one with `cache: "response"`, which an earlier
//! identical call may answer for nothing; otherwise `min` is 0. `max` always assumes the
//! call is made: a response-cache hit only ever costs less.
//!
//! # `expected`
//!
//! With history (the workflow's earlier runs, [`WorkflowCosts`]), a step's expected cost is
//! its total cost over the workflow's runs — its average cost times the share of runs it ran
//! in. Rollups hold no tokens, so expected tokens are the heuristic's tokens times that
//! share. Without history, the heuristic: one attempt per call, the prompt rendered with
//! empty upstream values, and half of `max_tokens` as output; map items as known, else one.
//! Either way `expected` is clamped into `[min, max]`.

use crate::analytics::WorkflowCosts;
use crate::budget::{Amount, BudgetLimits, TOKENS_PER_MESSAGE, TOKENS_PER_REQUEST, worst_case};
use crate::graph::{ItemStep, LlmSpec, MapSpec, StepKind, TransformSpec, ValidatedGraph};
use crate::ids::StepId;
use crate::limits::{JSON_HINT_BYTES, MAX_MAP_ITEMS, MAX_OUTPUT_BYTES, reply_limit};
use crate::money::Usd;
use crate::pricing::{ModelInfo, ModelRegistry, Usage};
use crate::template::{self, Template};
use crate::workflow::{CacheMode, Join, OutputFormat};
use serde_json::{Map, Value, json};

/// What a skipped or failed upstream step's null text renders as (`None`): every text bound
/// is at least this.
const NONE_BYTES: u64 = 4;
/// A router's text is `route N` (N < 50) or `default`.
const ROUTER_TEXT_BYTES: u64 = 16;

/// Where `expected` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    History,
    Heuristic,
}

impl Basis {
    pub fn as_str(self) -> &'static str {
        match self {
            Basis::History => "history",
            Basis::Heuristic => "heuristic",
        }
    }
}

/// What bounds a step's `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MaxBasis {
    /// The step makes no model call.
    NoCalls,
    /// Every prompt rendered with the input and each upstream value at its byte limit.
    Prompt,
    /// Some prompt is bounded only by its model's context window.
    ContextWindow,
}

impl MaxBasis {
    pub fn as_str(self) -> Option<&'static str> {
        match self {
            MaxBasis::NoCalls => None,
            MaxBasis::Prompt => Some("prompt"),
            MaxBasis::ContextWindow => Some("context_window"),
        }
    }
}

/// One step's estimate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepEstimate {
    pub step_id: StepId,
    pub min: Amount,
    pub expected: Amount,
    pub max: Amount,
    pub max_basis: MaxBasis,
    /// A map's items as counted in `max`: the list's length when the input gives it, else
    /// an upper bound.
    pub max_items: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Estimate {
    pub steps: Vec<StepEstimate>,
    pub min: Amount,
    pub expected: Amount,
    /// The sum of the steps' `max`, clamped to the budget's limits.
    pub max: Amount,
    /// The sum of the steps' `max`.
    pub max_unclamped: Amount,
    pub basis: Basis,
    /// Runs of the workflow the history covers (0 without history).
    pub history_runs: u64,
}

/// One step's bounds before `min` and `expected` are settled.
struct Bounds {
    heuristic: Amount,
    max: Amount,
    max_basis: MaxBasis,
    max_items: Option<u64>,
}

impl Bounds {
    const NONE: Bounds = Bounds { heuristic: Amount::ZERO, max: Amount::ZERO, max_basis: MaxBasis::NoCalls, max_items: None };
}

/// Estimates a run of `graph` on `input`. `history` is the workflow's earlier runs, if any.
pub fn estimate(graph: &ValidatedGraph, input: &Value, models: &ModelRegistry, history: Option<&WorkflowCosts>) -> Estimate {
    let n = graph.steps().len();
    // Upper bounds of the bytes `steps.<id>.text` and `.output` render to; `None` if unknown.
    let mut text_bound: Vec<Option<u64>> = vec![None; n];
    let mut output_bound: Vec<Option<u64>> = vec![None; n];
    // The bytes of an `llm` step's reply, which its JSON output is parsed from.
    let mut reply_bound: Vec<Option<u64>> = vec![None; n];
    let mut per_step: Vec<Bounds> = Vec::with_capacity(n);
    let mut all_render = true;
    let off = switched_off(graph);
    for (i, step) in graph.steps().iter().enumerate() {
        let slots = Slots { graph, text: &text_bound, output: &output_bound };
        // What `steps.<this>.text` and `.output` can render to, for the steps after it.
        let mut bounds: (Option<u64>, Option<u64>) = (None, None);
        let bound = match &step.kind {
            // Never runs: costs nothing, and reads as nothing downstream.
            _ if off[i] => {
                bounds = (Some(NONE_BYTES), Some(NONE_BYTES));
                Bounds::NONE
            }
            StepKind::Llm(spec) => {
                let reply = (reply_limit(spec.max_tokens, MAX_OUTPUT_BYTES) as u64).max(NONE_BYTES);
                reply_bound[i] = Some(reply);
                bounds = (Some(reply), matches!(spec.format, OutputFormat::Text | OutputFormat::Markdown).then_some(reply));
                match llm_call(spec, &json!({ "input": input }), true, &slots, models, false) {
                    Some(call) => call,
                    None => {
                        all_render = false;
                        Bounds::NONE
                    }
                }
            }
            StepKind::Transform(TransformSpec::Template(source)) => {
                match slots.render(source, &json!({ "input": input }), true) {
                    Rendered::Fails => all_render = false,
                    Rendered::Unbounded { .. } => {}
                    Rendered::Bounded { max, .. } => bounds = (Some(max.max(NONE_BYTES)), Some(max.max(NONE_BYTES))),
                }
                Bounds::NONE
            }
            StepKind::Transform(TransformSpec::Expression(_)) => Bounds::NONE,
            // No model call. Approved, its text is what `show` renders, but an edit can put
            // anything there: what reads it is bounded by its model's window.
            StepKind::Review(_) => Bounds::NONE,
            // Up to `max_attempts` answers, each free text read by one extraction call (and
            // its corrective retry). Its values are bounded only by what an answer may hold.
            StepKind::Input(spec) => match &spec.extract {
                None => Bounds::NONE,
                Some(extract) => match slots.render(&spec.ask, &json!({ "input": input }), true) {
                    Rendered::Fails => {
                        all_render = false;
                        Bounds::NONE
                    }
                    asked => {
                        // The longest answer, every character at its widest in UTF-8.
                        let text = "x".repeat(crate::input::MAX_TEXT_CHARS * 4);
                        let ask = "x".repeat(asked.max().unwrap_or(0) as usize);
                        let scope = json!({ "fields": spec.fields.document().to_string(), "ask": ask, "text": text });
                        match llm_call(&extract.call, &scope, true, &slots, models, false) {
                            Some(call) => {
                                let mut call = Bounds { max: times(call.max, u64::from(spec.max_attempts)), ..call };
                                if asked.max().is_none() {
                                    // What is asked has no bound: each call up to the model's window.
                                    call.max_basis = MaxBasis::ContextWindow;
                                    call.max = models.get(extract.model.as_str()).map_or(call.max, |m| {
                                        let per_call = worst_case(&m, u64::from(m.context_window), extract.max_tokens);
                                        times(per_call, u64::from(spec.max_attempts) * u64::from(extract.call.retry.max_attempts))
                                    });
                                }
                                call
                            }
                            None => {
                                all_render = false;
                                Bounds::NONE
                            }
                        }
                    }
                },
            },
            StepKind::Router(_) => {
                bounds.0 = Some(ROUTER_TEXT_BYTES);
                Bounds::NONE
            }
            StepKind::Map(map) => match &map.step {
                ItemStep::Transform(_) => Bounds::NONE,
                ItemStep::Llm(spec) if !map.over.references.steps.is_empty() || map.over.references.dynamic_step_access => {
                    // The list is only known at run time: up to `items` items of unknown content.
                    let items = list_bound(map, graph, &reply_bound);
                    let scope = json!({ "input": input, "item": Value::Null, "index": 0 });
                    match llm_call(spec, &scope, false, &slots, models, map.batched(items as usize, models).is_some()) {
                        Some(call) => Bounds { max: times(call.max, items), max_items: Some(items), ..call },
                        None => {
                            all_render = false;
                            Bounds::NONE
                        }
                    }
                }
                ItemStep::Llm(spec) => match map.over.evaluate(&json!({ "input": input, "steps": {} })) {
                    Ok(Value::Array(items)) if items.len() <= MAX_MAP_ITEMS => {
                        let mut sum = Bounds { max_items: Some(items.len() as u64), ..Bounds::NONE };
                        let batched = map.batched(items.len(), models).is_some();
                        for (index, item) in items.into_iter().enumerate() {
                            let scope = json!({ "input": input, "item": item, "index": index });
                            match llm_call(spec, &scope, true, &slots, models, batched) {
                                Some(call) => {
                                    sum.heuristic = add(sum.heuristic, call.heuristic);
                                    sum.max = add(sum.max, call.max);
                                    sum.max_basis = sum.max_basis.max(call.max_basis);
                                }
                                // The item fails before its call; others still run.
                                None => all_render = false,
                            }
                        }
                        sum
                    }
                    // The map fails before any call.
                    _ => {
                        all_render = false;
                        Bounds::NONE
                    }
                },
            },
        };
        (text_bound[i], output_bound[i]) = bounds;
        per_step.push(bound);
    }

    let max_unclamped = per_step.iter().fold(Amount::ZERO, |sum, b| add(sum, b.max));
    let budget_binds = graph.budget().exceeded_by(Amount::ZERO, Amount::ZERO, max_unclamped).is_some();
    let certain = all_render
        && !budget_binds
        && graph.steps().iter().all(|s| {
            s.enabled
                && s.required
                && s.join == Join::All
                && match &s.kind {
                    StepKind::Llm(spec) => matches!(spec.format, OutputFormat::Text | OutputFormat::Markdown),
                    StepKind::Transform(TransformSpec::Template(_)) => true,
                    _ => false,
                }
        });

    let workflow_runs = history.map_or(0, |h| h.totals.runs);
    let basis = if workflow_runs > 0 { Basis::History } else { Basis::Heuristic };
    let mut steps = Vec::with_capacity(n);
    for (step, bound) in graph.steps().iter().zip(per_step) {
        let min = match &step.kind {
            // A step that may be answered from the response cache may cost nothing at all.
            StepKind::Llm(spec) if certain && spec.cache != CacheMode::Response => {
                spec.priced(models).map_or(Amount::ZERO, |m| one_token_each(&m, spec.caches(&m)))
            }
            _ => Amount::ZERO,
        };
        let expected = match (basis, history) {
            (Basis::History, Some(h)) => {
                let sums = h.steps.get(&step.id).copied().unwrap_or_default();
                Amount { tokens: scale(bound.heuristic.tokens, sums.runs, workflow_runs), cost: Usd::from_pico(sums.cost.pico() / workflow_runs) }
            }
            _ => bound.heuristic,
        };
        steps.push(StepEstimate {
            step_id: step.id.clone(),
            min,
            expected: clamp(expected, min, bound.max),
            max: bound.max,
            max_basis: bound.max_basis,
            max_items: bound.max_items,
        });
    }
    let min = steps.iter().fold(Amount::ZERO, |sum, s| add(sum, s.min));
    let max = ceiling(max_unclamped, graph.budget());
    let expected = steps.iter().fold(Amount::ZERO, |sum, s| add(sum, s.expected));
    let expected = Amount { tokens: expected.tokens.min(max.tokens), cost: expected.cost.min(max.cost) };
    Estimate { steps, min, expected, max, max_unclamped, basis, history_runs: workflow_runs }
}

/// The steps that never run whatever happens: those switched off (`enabled: false`), and
/// those whose join they make impossible (`all`: one of its dependencies never runs;
/// `any`: none of them can). Steps are in topological order, so one pass decides all.
fn switched_off(graph: &ValidatedGraph) -> Vec<bool> {
    let mut off = vec![false; graph.steps().len()];
    for (i, step) in graph.steps().iter().enumerate() {
        off[i] = !step.enabled
            || match step.join {
                Join::All => step.deps.iter().any(|&d| off[d]),
                Join::Any => !step.deps.is_empty() && step.deps.iter().all(|&d| off[d]),
            };
    }
    off
}

/// How the estimator sees upstream values while rendering one template.
struct Slots<'a> {
    graph: &'a ValidatedGraph,
    text: &'a [Option<u64>],
    output: &'a [Option<u64>],
}

enum Rendered {
    /// Rendering fails with this input whatever upstream steps produce.
    Fails,
    /// `bytes_empty`: the rendering with every upstream value empty (for the heuristic).
    Unbounded {
        bytes_empty: u64,
    },
    Bounded {
        bytes_empty: u64,
        max: u64,
    },
}

impl Rendered {
    fn bytes_empty(&self) -> u64 {
        match self {
            Rendered::Unbounded { bytes_empty } | Rendered::Bounded { bytes_empty, .. } => *bytes_empty,
            Rendered::Fails => 0,
        }
    }

    fn max(&self) -> Option<u64> {
        match self {
            Rendered::Bounded { max, .. } => Some(*max),
            _ => None,
        }
    }
}

impl Slots<'_> {
    /// Renders `template` with `scope` (input, item, index) and markers for upstream values.
    /// `item_known`: whether `scope` holds the real item and index (a map over a list the
    /// input gives) rather than placeholders (a list only known at run time).
    fn render(&self, template: &Template, scope: &Value, item_known: bool) -> Rendered {
        let linear = reads_steps_only_in_slots(template.source()) && (item_known || !(template.reads("item") || template.reads("index")));
        let mut steps = Map::new();
        let mut markers: Vec<(String, Option<u64>)> = Vec::new();
        for (i, step) in self.graph.steps().iter().enumerate() {
            // Unique per step and field; a NUL pair never comes from a template's own text,
            // and one in the input only makes the count, and so the bound, larger.
            let text_marker = format!("\u{0}T{i}\u{0}");
            let output_marker = format!("\u{0}O{i}\u{0}");
            markers.push((text_marker.clone(), self.text[i]));
            markers.push((output_marker.clone(), self.output[i]));
            steps.insert(step.id.to_string(), json!({ "text": text_marker, "output": output_marker, "status": "COMPLETED" }));
        }
        let mut context = scope.clone();
        context["steps"] = Value::Object(steps);
        let rendered = match template.render(&context) {
            Ok(r) => r,
            // Not linear: a failure may come from a marker standing where an object was
            // read, or from a placeholder item.
            Err(_) if linear => return Rendered::Fails,
            Err(_) => return Rendered::Unbounded { bytes_empty: template.source().len() as u64 },
        };
        let mut bytes_empty = rendered.len() as u64;
        let mut max = Some(rendered.len() as u64);
        for (marker, bound) in &markers {
            let count = rendered.matches(marker.as_str()).count() as u64;
            if count == 0 {
                continue;
            }
            let marker_bytes = count.saturating_mul(marker.len() as u64);
            bytes_empty = bytes_empty.saturating_sub(marker_bytes);
            max = match (max, bound) {
                (Some(m), Some(b)) => Some(m.saturating_sub(marker_bytes).saturating_add(count.saturating_mul(*b))),
                _ => None,
            };
        }
        match max {
            Some(max) if linear => Rendered::Bounded { bytes_empty, max },
            _ => Rendered::Unbounded { bytes_empty },
        }
    }
}

/// Whether every read of `steps` in `source` is a whole `{{ steps.<id>.text }}` or
/// `{{ steps.<id>.output }}` expression (whitespace control allowed) and the only blocks are
/// `if` and `for`: then upstream values can only be pasted in whole, never branched or
/// looped on, filtered or captured.
fn reads_steps_only_in_slots(source: &str) -> bool {
    let mut rest = String::with_capacity(source.len());
    let mut tail = source;
    while let Some(start) = tail.find("{{") {
        let Some(len) = tail[start..].find("}}") else { break };
        let inner = tail[start + 2..start + len].trim_matches('-').trim();
        rest.push_str(&tail[..start]);
        if !is_slot(inner) {
            rest.push_str(&tail[start..start + len + 2]);
        }
        tail = &tail[start + len + 2..];
    }
    rest.push_str(tail);
    // Blocks that capture or transform what is rendered inside them (`filter`, `set`,
    // `macro`, `call`, `autoescape`, …) could grow a pasted value; only branches and loops,
    // which repeat or drop it whole, keep the marker count exact.
    let plain_blocks = rest.split("{%").skip(1).all(|tag| {
        let keyword = tag.trim_start_matches(['-', '+']).split_whitespace().next().unwrap_or_default();
        matches!(keyword, "if" | "elif" | "else" | "endif" | "for" | "endfor")
    });
    plain_blocks && template::references(&rest, &template::ITEM_ROOTS).is_ok_and(|refs| refs.steps.is_empty() && !refs.dynamic_step_access)
}

fn is_slot(expression: &str) -> bool {
    let mut parts = expression.split('.');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some("steps"), Some(id), Some("text" | "output"), None) if crate::ids::StepId::parse(id).is_ok()
    )
}

/// The most items a map whose list comes from a step can have. A JSON value parsed from a
/// reply of `R` bytes is a substring of it, and a list of `n` items takes at least `2n + 1`
/// bytes (`[1,2]`), so a list read as `steps.<id>.output` or a field path below it of an
/// `llm` step has at most `(R - 1) / 2` items. Any other list: the engine's map limit.
fn list_bound(map: &MapSpec, graph: &ValidatedGraph, reply_bound: &[Option<u64>]) -> u64 {
    let limit = MAX_MAP_ITEMS as u64;
    let mut path = map.over.source().trim().split('.').map(str::trim);
    let (Some("steps"), Some(id), Some("output")) = (path.next(), path.next(), path.next()) else { return limit };
    let fields_only = path.all(|field| {
        let mut chars = field.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_') && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    });
    let reply = graph.steps().iter().position(|s| s.id.as_str() == id).and_then(|i| reply_bound[i]);
    match reply {
        Some(bytes) if fields_only => limit.min(bytes.saturating_sub(1) / 2),
        _ => limit,
    }
}

/// One `llm` call (all its attempts), or `None` when it fails before its call whatever
/// upstream steps produce. `item_known` as for [`Slots::render`].
///
/// `batched`: the call is one record of a map's batch job (see the engine's `batch`). It is
/// expected at the batch price; its `max` stays the online one (a job that fails or expires
/// leaves its items to run online, every attempt), and for JSON output adds the batch call,
/// since a batch reply that fails the step's checks is charged and then run online.
fn llm_call(spec: &LlmSpec, scope: &Value, item_known: bool, slots: &Slots<'_>, models: &ModelRegistry, batched: bool) -> Option<Bounds> {
    // Validation rejects a model without a price, so this is only a safeguard.
    let model = spec.priced(models)?;
    let dearest = spec.priced_at_most(models)?;
    let prompt = slots.render(&spec.prompt, scope, item_known);
    let system = spec.system.as_ref().map(|s| slots.render(s, scope, item_known));
    let parts: Vec<&Rendered> = std::iter::once(&prompt).chain(system.as_ref()).collect();
    if parts.iter().any(|r| matches!(r, Rendered::Fails)) {
        return None;
    }
    let overhead = TOKENS_PER_REQUEST + TOKENS_PER_MESSAGE * parts.len() as u64;
    let empty = parts.iter().map(|r| r.bytes_empty()).sum::<u64>().saturating_add(overhead);
    let batch_model = if batched { model.batched() } else { None };
    let heuristic = worst_case(batch_model.as_ref().unwrap_or(&model), empty, spec.max_tokens.div_ceil(2));
    // A schema's violation messages can quote the reply, so its hint has no size bound.
    let hint = match (spec.format, &spec.schema) {
        (OutputFormat::Json, Some(_)) if spec.retry.max_attempts > 1 => None,
        (OutputFormat::Json, None) => Some(JSON_HINT_BYTES),
        _ => Some(0),
    };
    let input = hint.and_then(|hint| parts.iter().try_fold(overhead.saturating_add(hint), |sum, part| part.max().map(|m| sum.saturating_add(m))));
    let window = u64::from(model.context_window);
    let (input, max_basis) = match input {
        Some(bytes) if bytes <= window => (bytes, MaxBasis::Prompt),
        _ => (window, MaxBasis::ContextWindow),
    };
    // A caching step's input may be billed as cache writes: its max prices input at that rate.
    let mut max = times(spec.worst_call(&dearest, input, spec.max_tokens), u64::from(spec.retry.max_attempts));
    if let Some(batch_model) = batch_model.filter(|_| spec.format == OutputFormat::Json) {
        max = add(max, worst_case(&batch_model, input, spec.max_tokens));
    }
    Some(Bounds { heuristic, max, max_basis, max_items: None })
}

fn one_token_each(model: &ModelInfo, caches: bool) -> Amount {
    // A caching call's one token of input may be a cache read, the cheapest input there is.
    let usage = match model.cache_read {
        Some(read) if caches && read < model.input => Usage { cache_read_tokens: 1, output_tokens: 1, ..Usage::default() },
        _ => Usage { input_tokens: 1, output_tokens: 1, ..Usage::default() },
    };
    Amount { tokens: 2, cost: model.cost(&usage).unwrap_or(Usd::ZERO) }
}

fn add(a: Amount, b: Amount) -> Amount {
    Amount { tokens: a.tokens.saturating_add(b.tokens), cost: a.cost.saturating_add(b.cost) }
}

fn times(a: Amount, n: u64) -> Amount {
    Amount { tokens: a.tokens.saturating_mul(n), cost: Usd::from_pico(a.cost.pico().saturating_mul(n)) }
}

/// `value × part / whole`, rounded down, without overflow.
fn scale(value: u64, part: u64, whole: u64) -> u64 {
    u64::try_from(u128::from(value) * u128::from(part.min(whole)) / u128::from(whole.max(1))).unwrap_or(u64::MAX)
}

fn clamp(value: Amount, min: Amount, max: Amount) -> Amount {
    Amount { tokens: value.tokens.max(min.tokens).min(max.tokens), cost: value.cost.max(min.cost).min(max.cost) }
}

/// The steps' sum, each unit capped by the budget's limit where it sets one.
fn ceiling(sum: Amount, budget: BudgetLimits) -> Amount {
    Amount { tokens: budget.max_total_tokens.map_or(sum.tokens, |b| sum.tokens.min(b)), cost: budget.max_cost.map_or(sum.cost, |b| sum.cost.min(b)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::CostSums;
    use crate::graph::validate_json;

    /// Nova Micro: 35,000 pico-dollars an input token, 140,000 an output token.
    const IN: u64 = 35_000;
    const OUT: u64 = 140_000;
    /// Nova Micro's context window, in tokens.
    const WINDOW: u64 = 128_000;

    fn graph(steps: Value, budget: Value) -> ValidatedGraph {
        let def = json!({
            "name": "est",
            "defaults": { "model": "amazon.nova-micro-v1:0", "retry": { "max_attempts": 1 } },
            "budget": budget,
            "steps": steps,
        });
        validate_json(&def, &ModelRegistry::builtin()).unwrap()
    }

    fn run(g: &ValidatedGraph, input: Value, history: Option<&WorkflowCosts>) -> Estimate {
        estimate(g, &input, &ModelRegistry::builtin(), history)
    }

    fn amount(tokens: u64, pico: u64) -> Amount {
        Amount { tokens, cost: Usd::from_pico(pico) }
    }

    fn step<'a>(e: &'a Estimate, id: &str) -> &'a StepEstimate {
        e.steps.iter().find(|s| s.step_id.as_str() == id).unwrap()
    }

    /// The engine's reply limit for `max_tokens`: 32 bytes a token.
    fn reply(max_tokens: u64) -> u64 {
        32 * max_tokens
    }

    #[test]
    fn max_is_the_worst_call_of_every_attempt_with_upstream_replies_at_their_size_limit() {
        let g = graph(
            json!([
                { "id": "a", "type": "llm", "prompt": "Hi {{ input.name }}", "max_tokens": 100 },
                { "id": "b", "type": "llm", "prompt": "Say {{ steps.a.text }}", "max_tokens": 50, "retry": { "max_attempts": 2 } }
            ]),
            json!(null),
        );
        let e = run(&g, json!({ "name": "Ada" }), None);
        // a: "Hi Ada" is 6 bytes + 64 + 32 = 102 input tokens, 100 output.
        assert_eq!(step(&e, "a").max, amount(202, 102 * IN + 100 * OUT));
        // b: "Say " + a's reply at its limit (32 bytes for each of a's 100 tokens), + 96; 50
        // output; two attempts.
        let b_in = 4 + reply(100) + 96;
        assert_eq!(step(&e, "b").max, amount(2 * (b_in + 50), 2 * (b_in * IN + 50 * OUT)));
        assert_eq!(step(&e, "b").max_basis, MaxBasis::Prompt);
        assert_eq!(e.max_unclamped, amount(202 + 2 * (b_in + 50), 102 * IN + 100 * OUT + 2 * (b_in * IN + 50 * OUT)));
        assert_eq!(e.max, e.max_unclamped);
        // Both steps must run: at least one input and one output token each.
        assert_eq!(e.min, amount(4, 2 * (IN + OUT)));
        assert!(e.min.within(e.expected) && e.expected.within(e.max_unclamped), "{e:?}");
        assert_eq!(e.basis, Basis::Heuristic);
    }

    #[test]
    fn a_map_over_a_list_known_from_the_input_counts_each_item() {
        let g = graph(
            json!([{ "id": "m", "type": "map", "over": "input.items", "step": { "type": "llm", "prompt": "M {{ item }}", "max_tokens": 10 } }]),
            json!(null),
        );
        let e = run(&g, json!({ "items": ["x", "yy", "zzz"] }), None);
        // "M x", "M yy", "M zzz": 3 + 4 + 5 bytes, each + 96, and 10 output tokens each.
        let input = 3 + 4 + 5 + 3 * 96;
        assert_eq!(step(&e, "m").max, amount(input + 30, input * IN + 30 * OUT));
        assert_eq!((step(&e, "m").max_items, step(&e, "m").max_basis), (Some(3), MaxBasis::Prompt));
    }

    #[test]
    fn a_batch_map_is_expected_at_the_batch_price_and_bounded_by_the_online_one() {
        let map = |mode: &str, format: &str| {
            graph(
                json!([{ "id": "m", "type": "map", "over": "input.items", "mode": mode,
                         "step": { "type": "llm", "prompt": "M {{ item }}", "max_tokens": 10, "output": { "format": format } } }]),
                json!(null),
            )
        };
        let input = json!({ "items": (0..100).map(|i| format!("item {i}")).collect::<Vec<_>>() });
        let (online, batch) = (run(&map("online", "text"), input.clone(), None), run(&map("batch", "text"), input.clone(), None));
        assert_eq!(step(&batch, "m").expected.cost.pico() * 2, step(&online, "m").expected.cost.pico(), "half price expected");
        assert_eq!(step(&batch, "m").max, step(&online, "m").max, "a failed job leaves the items to run online");
        // JSON replies may fail their checks after being charged in the job, then run online.
        let (online, batch) = (run(&map("online", "json"), input.clone(), None), run(&map("batch", "json"), input, None));
        assert!(step(&batch, "m").max.cost > step(&online, "m").max.cost);
        assert!(step(&batch, "m").max.cost.pico() <= step(&online, "m").max.cost.pico() * 3 / 2, "plus one batch call per item");
    }

    #[test]
    fn a_map_over_a_list_from_a_step_counts_the_items_its_reply_can_hold_at_their_worst() {
        let steps = |list: Value, over: &str, prompt: &str| json!([list, { "id": "m", "type": "map", "over": over, "step": { "type": "llm", "prompt": prompt, "max_tokens": 10 } }]);
        let list = json!({ "id": "list", "type": "llm", "prompt": "L", "max_tokens": 5, "output": { "format": "json" } });
        // A 160-byte reply holds at most 79 items (`[1,1,…]`), each item's prompt at most the
        // context window (an item's content is unknown).
        for over in ["steps.list.output", " steps.list.output.issues.open "] {
            let e = run(&graph(steps(list.clone(), over, "M {{ item }}"), json!(null)), json!({}), None);
            assert_eq!((step(&e, "m").max_items, step(&e, "m").max_basis), (Some(79), MaxBasis::ContextWindow), "{over}");
            assert_eq!(step(&e, "m").max, amount(79 * (WINDOW + 10), 79 * (WINDOW * IN + 10 * OUT)));
        }
        // A prompt that does not read the item is rendered as it is.
        let e = run(&graph(steps(list.clone(), "steps.list.output", "Same"), json!(null)), json!({}), None);
        assert_eq!((step(&e, "m").max_items, step(&e, "m").max_basis), (Some(79), MaxBasis::Prompt));
        assert_eq!(step(&e, "m").max, amount(79 * (4 + 96 + 10), 79 * ((4 + 96) * IN + 10 * OUT)));
        // Any other list from a step: the engine's map limit.
        let expression = json!({ "id": "list", "type": "transform", "expression": "[1, 2]" });
        for (list, over) in [(expression, "steps.list.output"), (list, "steps.list.output[0]")] {
            let e = run(&graph(steps(list, over, "M {{ item }}"), json!(null)), json!({}), None);
            assert_eq!(step(&e, "m").max_items, Some(MAX_MAP_ITEMS as u64), "{over}");
        }
        let budget = json!({ "max_cost_usd": "0.01", "max_total_tokens": 5000 });
        let e = run(
            &graph(steps(json!({ "id": "list", "type": "transform", "expression": "[1]" }), "steps.list.output", "M {{ item }}"), budget),
            json!({}),
            None,
        );
        assert_eq!(e.max, amount(5000, Usd::parse_decimal("0.01").unwrap().pico()), "the budget caps the run");
    }

    #[test]
    fn router_branches_count_in_max_but_not_in_min() {
        let g = graph(
            json!([
                { "id": "r", "type": "router", "routes": [{ "when": "input.urgent", "to": ["fast"] }], "default": ["slow"] },
                { "id": "fast", "type": "llm", "depends_on": ["r"], "prompt": "F", "max_tokens": 10 },
                { "id": "slow", "type": "llm", "depends_on": ["r"], "prompt": "S", "max_tokens": 10 }
            ]),
            json!(null),
        );
        let e = run(&g, json!({ "urgent": true }), None);
        let call = amount(97 + 10, 97 * IN + 10 * OUT);
        assert_eq!((step(&e, "fast").max, step(&e, "slow").max), (call, call));
        assert_eq!(e.min, Amount::ZERO);
        assert_eq!(e.max_unclamped, amount(2 * call.tokens, 2 * call.cost.pico()));
    }

    #[test]
    fn retries_multiply_max_because_every_attempt_is_charged() {
        let one = |attempts: u32| {
            let g = graph(json!([{ "id": "a", "type": "llm", "prompt": "P", "max_tokens": 10, "retry": { "max_attempts": attempts } }]), json!(null));
            run(&g, json!({}), None).max_unclamped
        };
        assert_eq!(one(3), amount(3 * one(1).tokens, 3 * one(1).cost.pico()));
    }

    #[test]
    fn history_drives_expected_by_average_cost_times_how_often_the_step_ran() {
        let g = graph(
            json!([
                { "id": "a", "type": "llm", "prompt": "A", "max_tokens": 100 },
                { "id": "b", "type": "llm", "prompt": "B", "max_tokens": 100, "required": false }
            ]),
            json!(null),
        );
        let mut history = WorkflowCosts::new("est");
        history.totals = CostSums { runs: 4, cost: Usd::from_pico(4_000_000), ..CostSums::default() };
        let a = StepId::parse("a").unwrap();
        history.steps.insert(a, CostSums { runs: 2, cost: Usd::from_pico(2_000_000), ..CostSums::default() });
        let e = run(&g, json!({}), Some(&history));
        assert_eq!((e.basis, e.history_runs), (Basis::History, 4));
        // a ran in half the runs at $0.000001 each: $0.0000005 a run.
        assert_eq!(step(&e, "a").expected.cost, Usd::from_pico(500_000));
        let heuristic = run(&g, json!({}), None);
        assert_eq!(step(&e, "a").expected.tokens, step(&heuristic, "a").expected.tokens / 2);
        assert_eq!(step(&e, "b").expected, Amount::ZERO, "b never ran");
        assert_eq!(heuristic.basis, Basis::Heuristic);
        assert_eq!(step(&heuristic, "a").expected, amount(97 + 50, 97 * IN + 50 * OUT), "input as rendered, half of max_tokens out");
    }

    #[test]
    fn templates_that_filter_or_branch_on_upstream_values_are_bounded_by_the_context_window() {
        let window = amount(WINDOW + 10, WINDOW * IN + 10 * OUT);
        let g = graph(
            json!([
                { "id": "a", "type": "llm", "prompt": "A", "max_tokens": 10 },
                { "id": "b", "type": "llm", "prompt": "{% if steps.a.text == 'x' %}long{% endif %}", "max_tokens": 10 },
                { "id": "c", "type": "llm", "prompt": "{{ steps.a.text | upper }}", "max_tokens": 10 },
                { "id": "d", "type": "llm", "prompt": "{{- steps.a.text -}} and {{ steps.a.output }}", "max_tokens": 10 }
            ]),
            json!(null),
        );
        let e = run(&g, json!({}), None);
        for id in ["b", "c"] {
            assert_eq!((step(&e, id).max, step(&e, id).max_basis), (window, MaxBasis::ContextWindow), "{id}");
        }
        for captured in [
            "{% filter replace('r', 'rrrr') %}{{ steps.a.text }}{% endfilter %}",
            "{% autoescape true %}{{ steps.a.text }}{% endautoescape %}",
            "{% set s %}{{ steps.a.text }}{% endset %}{{ s | replace('r', 'rrrr') }}",
        ] {
            let g = graph(
                json!([{ "id": "a", "type": "llm", "prompt": "A" }, { "id": "b", "type": "llm", "prompt": captured, "max_tokens": 10 }]),
                json!(null),
            );
            assert_eq!(step(&run(&g, json!({}), None), "b").max, window, "{captured}");
        }
        let looped = graph(
            json!([{ "id": "a", "type": "llm", "prompt": "A", "max_tokens": 10 }, { "id": "b", "type": "llm", "prompt": "{% for x in input.l %}{{ steps.a.text }}{% endfor %}", "max_tokens": 10 }]),
            json!(null),
        );
        let b_in = 3 * reply(10) + 96;
        let b = step(&run(&looped, json!({ "l": [1, 2, 3] }), None), "b").clone();
        assert_eq!((b.max, b.max_basis), (amount(b_in + 10, b_in * IN + 10 * OUT), MaxBasis::Prompt), "pasted once per item");
        // A skipped upstream step pastes `None`, which every bound covers.
        assert_eq!(
            Template::compile("{{ x }}", &["x"], template::Keep::Source).unwrap().render(&json!({ "x": null })).unwrap().len() as u64,
            NONE_BYTES
        );
        assert_eq!(
            step(&e, "d").max,
            amount(2 * reply(10) + 4 + 96 + 10, (2 * reply(10) + 4 + 96) * IN + 10 * OUT),
            "`-}}` eats the space: \"and \" is 4 bytes"
        );
    }

    #[test]
    fn a_prompt_bound_beyond_the_context_window_is_capped_at_the_window() {
        // 100 pasted replies of up to 32,000 bytes each: 3.2 MB, far past 128,000 tokens.
        let g = graph(
            json!([
                { "id": "a", "type": "llm", "prompt": "A", "max_tokens": 1000 },
                { "id": "b", "type": "llm", "prompt": "{% for x in range(100) %}{{ steps.a.text }}{% endfor %}", "max_tokens": 10 }
            ]),
            json!(null),
        );
        let b = step(&run(&g, json!({}), None), "b").clone();
        assert_eq!((b.max, b.max_basis), (amount(WINDOW + 10, WINDOW * IN + 10 * OUT), MaxBasis::ContextWindow));
    }

    #[test]
    fn a_json_step_with_a_schema_and_retries_is_bounded_by_the_window_because_its_hint_quotes_the_reply() {
        let schema = json!({ "type": "object" });
        let g = graph(
            json!([{ "id": "a", "type": "llm", "prompt": "A", "max_tokens": 10, "output": { "format": "json", "schema": schema }, "retry": { "max_attempts": 2 } }]),
            json!(null),
        );
        let a = step(&run(&g, json!({}), None), "a").clone();
        assert_eq!((a.max, a.max_basis), (amount(2 * (WINDOW + 10), 2 * (WINDOW * IN + 10 * OUT)), MaxBasis::ContextWindow));
    }

    #[test]
    fn a_prompt_that_cannot_render_with_this_input_costs_nothing() {
        let g = graph(json!([{ "id": "a", "type": "llm", "prompt": "{{ input.missing }}", "max_tokens": 10 }]), json!(null));
        let e = run(&g, json!({}), None);
        assert_eq!(e.max_unclamped, Amount::ZERO);
        assert_eq!(e.min, Amount::ZERO);
    }
}
