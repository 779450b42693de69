//! Cost estimates before a run: per step and in total, `{min, expected, max}` tokens and
//! money for a validated graph and one input, without calling a model.
//!
//! # What `max` rests on
//!
//! `max` is a true upper bound of what the run can be charged, under the same two facts
//! the budget's reservations rest on (see [`crate::budget`]): a call's reported input
//! tokens are at most [`estimate_input_tokens`] of the request as sent, and its output
//! tokens at most the step's `max_tokens`. Every attempt is charged, so a step's `max` is
//! its worst call ([`worst_case`]) times `retry.max_attempts`, times the items of a map.
//! Every step that could run is counted, whatever a router may choose.
//!
//! The one unknown is the prompt: it is rendered from upstream outputs that do not exist
//! yet. The estimator renders each template with the real `input` and every upstream value
//! replaced by a marker, then charges each marker at an upper bound of the bytes that value
//! can have:
//! - an `llm` step's `text` (and, for `text`/`markdown` output, its `output`, the same
//!   string) has at most [`EngineConfig::max_output_bytes`] bytes: the engine refuses a
//!   longer reply (`OUTPUT_TOO_LARGE`), so no step ever completes with one. This bound is
//!   loose (160 KiB is about 40,000 tokens of English), but it is a bound; `max_tokens`
//!   bounds tokens, not bytes, since no tokenizer promises a byte length per token;
//! - a template transform's text is bounded the same way, recursively;
//! - a router's text is `route N` or `default`;
//! - a step that did not complete renders its null text as `None` (4 bytes), so every
//!   bound is at least 4.
//!
//! Rendering with markers is exact only when upstream values are plain slots: a template
//! that reads steps only as `{{ steps.<id>.text }}` or `{{ steps.<id>.output }}` cannot
//! branch or loop on them, so its real rendering is the marker rendering with each marker
//! swapped for the value. A template that reads steps any other way (a filter, a field of a
//! JSON output, a condition, a block other than `if`/`for`), reads a JSON `output` or an
//! expression transform's, or a map
//! whose list comes from a step, has no bound here: its step's `max` is `None`. The JSON
//! retry hint is a fixed sentence for steps without a schema; a schema's violation messages
//! can quote the reply, so a `json` step with a schema and retries has no bound either.
//!
//! A budget caps the run whatever the steps could do ([`crate::budget`]'s invariant), so
//! the reported total `max` is the smaller of the sum of the steps' `max` and the budget's
//! limit, per unit (tokens and money separately); with a limit it is bounded even when a
//! step is not. [`Estimate::max_unclamped`] is the sum alone.
//!
//! # `min`
//!
//! `min` is a lower bound for runs in which every model call is answered (within the size
//! limit): a call that fails without reported usage (throttling on its last attempt, a
//! timeout) costs nothing and can take a run below it. Even so, a step counts towards `min`
//! only when nothing can switch it off or cancel it: the graph has no routers or maps, every
//! step is required and joins all, every `llm` step replies in text, every template renders
//! with this input, and the sum of `max` fits the budget (so no call can be refused). Then
//! each `llm` step costs at least one input and one output token; otherwise `min` is 0.
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
use crate::engine::{EngineConfig, MAX_MAP_ITEMS};
use crate::graph::{ItemStep, LlmSpec, StepKind, TransformSpec, ValidatedGraph};
use crate::ids::StepId;
use crate::money::Usd;
use crate::pricing::{ModelInfo, ModelRegistry, Usage};
use crate::template;
use crate::workflow::{Join, OutputFormat};
use serde_json::{Map, Value, json};

/// What a skipped or failed upstream step's null text renders as (`None`): every text bound
/// is at least this.
const NONE_BYTES: u64 = 4;
/// A router's text is `route N` (N < 50) or `default`.
const ROUTER_TEXT_BYTES: u64 = 16;
/// The engine's corrective hint after a reply that is not JSON, plus its `\n\n`. Kept in
/// step with `engine::run_llm`; a test checks the engine's sentence fits.
pub const JSON_HINT_BYTES: u64 = 128;

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

/// One step's estimate. `max` is `None` when no bound is known (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepEstimate {
    pub step_id: StepId,
    pub min: Amount,
    pub expected: Amount,
    pub max: Option<Amount>,
}

/// An upper bound per unit; `None` is "no bound known".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ceiling {
    pub tokens: Option<u64>,
    pub cost: Option<Usd>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Estimate {
    pub steps: Vec<StepEstimate>,
    pub min: Amount,
    pub expected: Amount,
    /// The sum of the steps' `max`, clamped to the budget's limits.
    pub max: Ceiling,
    /// The sum of the steps' `max`; `None` if a step has no bound.
    pub max_unclamped: Option<Amount>,
    pub basis: Basis,
    /// Runs of the workflow the history covers (0 without history).
    pub history_runs: u64,
}

/// Estimates a run of `graph` on `input`. `history` is the workflow's earlier runs, if any.
pub fn estimate(graph: &ValidatedGraph, input: &Value, models: &ModelRegistry, history: Option<&WorkflowCosts>) -> Estimate {
    let max_output_bytes = EngineConfig::default().max_output_bytes as u64;
    let n = graph.steps.len();
    // Upper bounds of the bytes `steps.<id>.text` and `.output` render to; `None` if unknown.
    let mut text_bound: Vec<Option<u64>> = vec![None; n];
    let mut output_bound: Vec<Option<u64>> = vec![None; n];
    let mut per_step: Vec<(Amount, Option<Amount>)> = Vec::with_capacity(n);
    let mut all_render = true;
    for (i, step) in graph.steps.iter().enumerate() {
        let slots = Slots { graph, text: &text_bound, output: &output_bound };
        // What `steps.<this>.text` and `.output` can render to, for the steps after it.
        let mut bounds: (Option<u64>, Option<u64>) = (None, None);
        let (heuristic, max) = match &step.kind {
            StepKind::Llm(spec) => {
                let reply = max_output_bytes.max(NONE_BYTES);
                bounds = (Some(reply), matches!(spec.format, OutputFormat::Text | OutputFormat::Markdown).then_some(reply));
                let scope = json!({ "input": input });
                match llm_call(spec, &scope, &slots, models) {
                    Call::Fails => {
                        all_render = false;
                        (Amount::ZERO, Some(Amount::ZERO))
                    }
                    Call::Unbounded(heuristic) => (heuristic, None),
                    Call::Bounded { heuristic, max } => (heuristic, Some(max)),
                }
            }
            StepKind::Transform(TransformSpec::Template(source)) => {
                match slots.render(source, &json!({ "input": input })) {
                    Rendered::Fails => all_render = false,
                    Rendered::Unbounded { .. } => {}
                    Rendered::Bounded { max, .. } => bounds = (Some(max.max(NONE_BYTES)), Some(max.max(NONE_BYTES))),
                }
                (Amount::ZERO, Some(Amount::ZERO))
            }
            StepKind::Transform(TransformSpec::Expression(_)) => (Amount::ZERO, Some(Amount::ZERO)),
            StepKind::Router(_) => {
                bounds.0 = Some(ROUTER_TEXT_BYTES);
                (Amount::ZERO, Some(Amount::ZERO))
            }
            StepKind::Map(map) => match &map.step {
                ItemStep::Transform(_) => (Amount::ZERO, Some(Amount::ZERO)),
                ItemStep::Llm(spec) => {
                    if !map.over.references.steps.is_empty() || map.over.references.dynamic_step_access {
                        // The list is only known at run time: up to MAX_MAP_ITEMS unknown items.
                        let scope = json!({ "input": input, "item": Value::Null, "index": 0 });
                        let heuristic = match llm_call(spec, &scope, &slots, models) {
                            Call::Unbounded(h) | Call::Bounded { heuristic: h, .. } => h,
                            Call::Fails => Amount::ZERO,
                        };
                        (heuristic, None)
                    } else {
                        match map.over.evaluate(&json!({ "input": input, "steps": {} })) {
                            Ok(Value::Array(items)) if items.len() <= MAX_MAP_ITEMS => {
                                let mut heuristic = Amount::ZERO;
                                let mut max = Some(Amount::ZERO);
                                for (index, item) in items.into_iter().enumerate() {
                                    let scope = json!({ "input": input, "item": item, "index": index });
                                    match llm_call(spec, &scope, &slots, models) {
                                        // The item fails before its call; others still run.
                                        Call::Fails => all_render = false,
                                        Call::Unbounded(h) => {
                                            heuristic = add(heuristic, h);
                                            max = None;
                                        }
                                        Call::Bounded { heuristic: h, max: m } => {
                                            heuristic = add(heuristic, h);
                                            max = max.map(|sum| add(sum, m));
                                        }
                                    }
                                }
                                (heuristic, max)
                            }
                            // The map fails before any call.
                            _ => {
                                all_render = false;
                                (Amount::ZERO, Some(Amount::ZERO))
                            }
                        }
                    }
                }
            },
        };
        (text_bound[i], output_bound[i]) = bounds;
        per_step.push((heuristic, max));
    }

    let max_unclamped = per_step.iter().try_fold(Amount::ZERO, |sum, (_, max)| max.map(|m| add(sum, m)));
    let budget_binds = max_unclamped.is_none_or(|sum| graph.budget.exceeded_by(Amount::ZERO, Amount::ZERO, sum).is_some());
    let certain = all_render
        && !budget_binds
        && graph.steps.iter().all(|s| {
            s.required
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
    for (step, (heuristic, max)) in graph.steps.iter().zip(per_step) {
        let min = match &step.kind {
            StepKind::Llm(spec) if certain => models.get(&spec.model).map_or(Amount::ZERO, |m| one_token_each(&m)),
            _ => Amount::ZERO,
        };
        let expected = match (basis, history) {
            (Basis::History, Some(h)) => {
                let sums = h.steps.get(&step.id).copied().unwrap_or_default();
                Amount { tokens: scale(heuristic.tokens, sums.runs, workflow_runs), cost: Usd::from_pico(sums.cost.pico() / workflow_runs) }
            }
            _ => heuristic,
        };
        steps.push(StepEstimate { step_id: step.id.clone(), min, expected: clamp(expected, min, max), max });
    }
    let min = steps.iter().fold(Amount::ZERO, |sum, s| add(sum, s.min));
    let max = ceiling(max_unclamped, graph.budget);
    let expected = steps.iter().fold(Amount::ZERO, |sum, s| add(sum, s.expected));
    let expected = Amount {
        tokens: max.tokens.map_or(expected.tokens, |m| expected.tokens.min(m)),
        cost: max.cost.map_or(expected.cost, |m| expected.cost.min(m)),
    };
    Estimate { steps, min, expected, max, max_unclamped, basis, history_runs: workflow_runs }
}

impl Estimate {
    /// The API's view: money as exact decimal strings plus pico-dollar integers; an unknown
    /// bound is `null`.
    pub fn to_json(&self) -> Value {
        let steps: Vec<Value> = self
            .steps
            .iter()
            .map(|s| {
                json!({
                    "step_id": s.step_id,
                    "min": s.min.to_json(),
                    "expected": s.expected.to_json(),
                    "max": s.max.map_or(Value::Null, Amount::to_json),
                })
            })
            .collect();
        let max = json!({
            "tokens": self.max.tokens,
            "cost_usd": self.max.cost.map(|c| c.to_string()),
            "cost_pico_usd": self.max.cost.map(Usd::pico),
        });
        json!({
            "steps": steps,
            "total": { "min": self.min.to_json(), "expected": self.expected.to_json(), "max": max },
            "basis": self.basis.as_str(),
            "history_runs": self.history_runs,
        })
    }
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

impl Slots<'_> {
    /// Renders `source` with `scope` (input, item, index) and markers for upstream values.
    fn render(&self, source: &str, scope: &Value) -> Rendered {
        let linear = reads_steps_only_in_slots(source);
        let mut steps = Map::new();
        let mut markers: Vec<(String, Option<u64>)> = Vec::new();
        for (i, step) in self.graph.steps.iter().enumerate() {
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
        let rendered = match template::render(source, &context) {
            Ok(r) => r,
            // Not linear: a failure may come from a marker standing where an object was read.
            Err(_) if linear => return Rendered::Fails,
            Err(_) => return Rendered::Unbounded { bytes_empty: source.len() as u64 },
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
    plain_blocks && template::references(&rest, &crate::template::ITEM_ROOTS).is_ok_and(|refs| refs.steps.is_empty() && !refs.dynamic_step_access)
}

fn is_slot(expression: &str) -> bool {
    let mut parts = expression.split('.');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some("steps"), Some(id), Some("text" | "output"), None) if crate::ids::StepId::parse(id).is_ok()
    )
}

enum Call {
    Fails,
    Unbounded(Amount),
    Bounded { heuristic: Amount, max: Amount },
}

/// One `llm` call (all its attempts): the heuristic and, if bounded, the worst case.
fn llm_call(spec: &LlmSpec, scope: &Value, slots: &Slots<'_>, models: &ModelRegistry) -> Call {
    let Some(model) = models.get(&spec.model) else { return Call::Fails };
    let prompt = slots.render(&spec.prompt, scope);
    let system = spec.system.as_deref().map(|s| slots.render(s, scope));
    let parts: Vec<&Rendered> = std::iter::once(&prompt).chain(system.as_ref()).collect();
    if parts.iter().any(|r| matches!(r, Rendered::Fails)) {
        return Call::Fails;
    }
    let overhead = TOKENS_PER_REQUEST + TOKENS_PER_MESSAGE * parts.len() as u64;
    let empty: u64 = parts
        .iter()
        .map(|r| match r {
            Rendered::Unbounded { bytes_empty } | Rendered::Bounded { bytes_empty, .. } => *bytes_empty,
            Rendered::Fails => 0,
        })
        .sum();
    let empty = empty.saturating_add(overhead);
    let half = spec.max_tokens.div_ceil(2);
    let heuristic = worst_case(&model, empty, half);
    let hint = match (spec.format, &spec.schema) {
        (OutputFormat::Json, Some(_)) if spec.retry.max_attempts > 1 => return Call::Unbounded(heuristic),
        (OutputFormat::Json, None) => JSON_HINT_BYTES,
        _ => 0,
    };
    let mut max_bytes = overhead.saturating_add(hint);
    for part in &parts {
        match part {
            Rendered::Bounded { max, .. } => max_bytes = max_bytes.saturating_add(*max),
            _ => return Call::Unbounded(heuristic),
        }
    }
    let worst = worst_case(&model, max_bytes, spec.max_tokens);
    let attempts = u64::from(spec.retry.max_attempts);
    let max = Amount { tokens: worst.tokens.saturating_mul(attempts), cost: Usd::from_pico(worst.cost.pico().saturating_mul(attempts)) };
    Call::Bounded { heuristic, max }
}

fn one_token_each(model: &ModelInfo) -> Amount {
    let usage = Usage { input_tokens: 1, output_tokens: 1, ..Usage::default() };
    Amount { tokens: 2, cost: model.cost(&usage).unwrap_or(Usd::ZERO) }
}

fn add(a: Amount, b: Amount) -> Amount {
    Amount { tokens: a.tokens.saturating_add(b.tokens), cost: a.cost.saturating_add(b.cost) }
}

/// `value × part / whole`, rounded down, without overflow.
fn scale(value: u64, part: u64, whole: u64) -> u64 {
    u64::try_from(u128::from(value) * u128::from(part.min(whole)) / u128::from(whole.max(1))).unwrap_or(u64::MAX)
}

fn clamp(value: Amount, min: Amount, max: Option<Amount>) -> Amount {
    let (tokens, cost) = (value.tokens.max(min.tokens), value.cost.max(min.cost));
    match max {
        Some(max) => Amount { tokens: tokens.min(max.tokens), cost: cost.min(max.cost) },
        None => Amount { tokens, cost },
    }
}

fn ceiling(sum: Option<Amount>, budget: BudgetLimits) -> Ceiling {
    let tokens = match (sum.map(|s| s.tokens), budget.max_total_tokens) {
        (Some(s), Some(b)) => Some(s.min(b)),
        (s, b) => s.or(b),
    };
    let cost = match (sum.map(|s| s.cost), budget.max_cost) {
        (Some(s), Some(b)) => Some(s.min(b)),
        (s, b) => s.or(b),
    };
    Ceiling { tokens, cost }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::CostSums;
    use crate::graph::validate_json;

    /// Nova Micro: 35,000 pico-dollars an input token, 140,000 an output token.
    const IN: u64 = 35_000;
    const OUT: u64 = 140_000;
    /// `max_output_bytes`: what an upstream reply can be at most.
    const REPLY: u64 = 160 * 1024;

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
        assert_eq!(step(&e, "a").max, Some(amount(202, 102 * IN + 100 * OUT)));
        // b: "Say " + a's reply at its limit, + 96; 50 output; two attempts.
        let b_in = 4 + REPLY + 96;
        assert_eq!(step(&e, "b").max, Some(amount(2 * (b_in + 50), 2 * (b_in * IN + 50 * OUT))));
        assert_eq!(e.max_unclamped, Some(amount(202 + 2 * (b_in + 50), 102 * IN + 100 * OUT + 2 * (b_in * IN + 50 * OUT))));
        assert_eq!(e.max.tokens, e.max_unclamped.map(|m| m.tokens));
        // Both steps must run: at least one input and one output token each.
        assert_eq!(e.min, amount(4, 2 * (IN + OUT)));
        assert!(e.min.within(e.expected) && e.expected.within(e.max_unclamped.unwrap()), "{e:?}");
        assert_eq!(e.basis, Basis::Heuristic);
    }

    #[test]
    fn a_map_over_a_list_known_from_the_input_counts_each_item() {
        let steps = |over: &str| {
            json!([
                { "id": "list", "type": "transform", "expression": "[1, 2]" },
                { "id": "m", "type": "map", "over": over, "step": { "type": "llm", "prompt": "M {{ item }}", "max_tokens": 10 } }
            ])
        };
        let e = run(&graph(steps("input.items"), json!(null)), json!({ "items": ["x", "yy", "zzz"] }), None);
        // "M x", "M yy", "M zzz": 3 + 4 + 5 bytes, each + 96, and 10 output tokens each.
        let input = 3 + 4 + 5 + 3 * 96;
        assert_eq!(step(&e, "m").max, Some(amount(input + 30, input * IN + 30 * OUT)));
        let e = run(&graph(steps("steps.list.output"), json!(null)), json!({}), None);
        assert_eq!(step(&e, "m").max, None, "items known only at run time have no bound");
        assert_eq!(e.max, Ceiling { tokens: None, cost: None });
        let e = run(&graph(steps("steps.list.output"), json!({ "max_cost_usd": "0.01", "max_total_tokens": 5000 })), json!({}), None);
        assert_eq!(e.max, Ceiling { tokens: Some(5000), cost: Some(Usd::parse_decimal("0.01").unwrap()) }, "the budget still caps the run");
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
        assert_eq!((step(&e, "fast").max, step(&e, "slow").max), (Some(call), Some(call)));
        assert_eq!(e.min, Amount::ZERO);
        assert_eq!(e.max_unclamped, Some(amount(2 * call.tokens, 2 * call.cost.pico())));
    }

    #[test]
    fn retries_multiply_max_because_every_attempt_is_charged() {
        let one = |attempts: u32| {
            let g = graph(json!([{ "id": "a", "type": "llm", "prompt": "P", "max_tokens": 10, "retry": { "max_attempts": attempts } }]), json!(null));
            run(&g, json!({}), None).max_unclamped.unwrap()
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
    fn templates_that_branch_on_upstream_values_have_no_bound() {
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
        assert_eq!((step(&e, "b").max, step(&e, "c").max), (None, None));
        for captured in [
            "{% filter replace('r', 'rrrr') %}{{ steps.a.text }}{% endfilter %}",
            "{% autoescape true %}{{ steps.a.text }}{% endautoescape %}",
            "{% set s %}{{ steps.a.text }}{% endset %}{{ s | replace('r', 'rrrr') }}",
        ] {
            let g = graph(json!([{ "id": "a", "type": "llm", "prompt": "A" }, { "id": "b", "type": "llm", "prompt": captured }]), json!(null));
            assert_eq!(step(&run(&g, json!({}), None), "b").max, None, "{captured}");
        }
        let looped = graph(
            json!([{ "id": "a", "type": "llm", "prompt": "A" }, { "id": "b", "type": "llm", "prompt": "{% for x in input.l %}{{ steps.a.text }}{% endfor %}", "max_tokens": 10 }]),
            json!(null),
        );
        let b_in = 3 * REPLY + 96;
        assert_eq!(
            step(&run(&looped, json!({ "l": [1, 2, 3] }), None), "b").max,
            Some(amount(b_in + 10, b_in * IN + 10 * OUT)),
            "pasted once per item"
        );
        // A skipped upstream step pastes `None`, which every bound covers.
        assert_eq!(template::render("{{ x }}", &json!({ "x": null })).unwrap().len() as u64, NONE_BYTES);
        assert_eq!(
            step(&e, "d").max,
            Some(amount(2 * REPLY + 4 + 96 + 10, (2 * REPLY + 4 + 96) * IN + 10 * OUT)),
            "`-}}` eats the space: \"and \" is 4 bytes"
        );
    }

    #[test]
    fn a_prompt_that_cannot_render_with_this_input_costs_nothing() {
        let g = graph(json!([{ "id": "a", "type": "llm", "prompt": "{{ input.missing }}", "max_tokens": 10 }]), json!(null));
        let e = run(&g, json!({}), None);
        assert_eq!(e.max_unclamped, Some(Amount::ZERO));
        assert_eq!(e.min, Amount::ZERO);
    }

    #[test]
    fn the_engines_json_hint_fits_its_allowance() {
        // The sentence engine::run_llm appends after a reply that is not JSON.
        let hint = format!("\n\n{}", "Your previous reply could not be used: the reply is not valid JSON. Reply again with only the corrected JSON.");
        assert!((hint.len() as u64) <= JSON_HINT_BYTES);
    }
}
