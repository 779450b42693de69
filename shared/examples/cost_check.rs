//! Cost check (`make cost-check`): seeded random budgeted workflows run through the engine
//! with in-memory adapters, checking two things of every run.
//!
//! - **No overrun**: the run's charged cost and tokens never exceed its budget.
//! - **The estimate brackets the run**: `estimate.min ≤ actual ≤ estimate.max`, in tokens
//!   and in money, with the estimate of [`chainrun_core::estimate`] made from the
//!   definition and input alone, before the run. `max` here is the sum of the steps'
//!   bounds *without* the budget clamp (`max_unclamped`), the stronger claim: it checks the
//!   estimator itself, while the clamp is what the overrun check already proves.
//!
//! Graphs: 1 to 12 steps of `llm` (random model, `max_tokens`, system prompt, retries,
//! text or json output, prompts pasting upstream replies and input), maps over lists of
//! the input, template transforms, routers, optional steps and `join: any`, at random
//! concurrency. Budgets are drawn around the estimate, so many runs hit them. A fifth of
//! the cases are plain (required text `llm` steps and template transforms only), the shape
//! whose `min` is not zero.
//!
//! The model is scripted and realistic about the two things the bound rests on: it reports
//! at most [`estimate_input_tokens`] of the request as sent and 1 to `max_tokens` output
//! tokens (often exactly the bounds). Some calls are throttled (without usage) fewer times
//! than the step has attempts, some json replies are invalid once (charged, retried) or
//! always. Every call is answered in the end, which is what `min` assumes.
//!
//! The last line is: `cost: runs=N overruns=O estimate_bracketed=B/N`.

use async_trait::async_trait;
use chainrun_core::budget::estimate_input_tokens;
use chainrun_core::engine::{Engine, EngineConfig};
use chainrun_core::estimate::estimate;
use chainrun_core::graph::validate_json;
use chainrun_core::ids::Principal;
use chainrun_core::memory::{MemoryProgress, MemoryStore};
use chainrun_core::money::Usd;
use chainrun_core::ports::{Claim, Lease, ModelClient, ModelError, ModelErrorKind, ModelReply, ModelRequest, RunStore};
use chainrun_core::pricing::{ModelRegistry, Usage};
use chainrun_core::run::RunRecord;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

const RUNS: u64 = 1000;
const MODELS: [&str; 4] =
    ["amazon.nova-micro-v1:0", "us.amazon.nova-lite-v1:0", "global.anthropic.claude-haiku-4-5-20251001-v1:0", "meta.llama3-1-8b-instruct-v1:0"];

#[derive(Debug, Clone, Copy)]
enum Behaviour {
    Ok,
    /// Throttled this many times (fewer than the step's attempts), then answers.
    Throttled(u32),
    /// A json reply that does not parse, once.
    InvalidOnce,
    /// Never parses: every attempt is charged and the step fails.
    AlwaysInvalid,
}

/// How the model answers the calls of one step, keyed by its prompt prefix (`P3.`, `M5.`).
#[derive(Debug, Clone, Copy)]
struct Plan {
    behaviour: Behaviour,
    /// Percent of the bounds reported: 100 is exactly the bound.
    input_pct: u64,
    output_pct: u64,
    reply_bytes: usize,
}

struct ScriptedUsage {
    plans: HashMap<String, Plan>,
    /// Calls seen per prompt, so retries of the same request play the next reply.
    seen: Mutex<HashMap<String, u32>>,
}

#[async_trait]
impl ModelClient for ScriptedUsage {
    async fn converse(&self, request: &ModelRequest) -> Result<ModelReply, ModelError> {
        let prefix = request.prompt.split_whitespace().next().unwrap_or_default();
        let plan = self.plans.get(prefix).copied().ok_or_else(|| ModelError::new(ModelErrorKind::Invalid, "Unscripted", prefix.to_owned()))?;
        // Keyed by the prompt without the corrective hint, so a retry counts as the same call.
        let key = request.prompt.split("\n\nYour previous reply").next().unwrap_or_default().to_owned();
        let n = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            let n = seen.entry(key).or_default();
            *n += 1;
            *n
        };
        let text = match plan.behaviour {
            Behaviour::Throttled(times) if n <= times => {
                return Err(ModelError::new(ModelErrorKind::Throttled, "ThrottlingException", "slow down"));
            }
            Behaviour::InvalidOnce if n == 1 => "not json".to_owned(),
            Behaviour::AlwaysInvalid => "never json".to_owned(),
            Behaviour::InvalidOnce => "{\"ok\":1}".to_owned(),
            _ => "r".repeat(plan.reply_bytes),
        };
        let bound = estimate_input_tokens(request.system.as_deref(), &request.prompt);
        let usage = Usage {
            input_tokens: (bound * plan.input_pct / 100).max(1),
            output_tokens: (u64::from(request.max_tokens) * plan.output_pct / 100).max(1),
            ..Usage::default()
        };
        Ok(ModelReply { text, usage, stop_reason: "end_turn".into() })
    }

    async fn converse_stream(&self, request: &ModelRequest, _deltas: mpsc::Sender<String>) -> Result<ModelReply, ModelError> {
        self.converse(request).await
    }
}

enum Kind {
    Llm,
    Map,
    Transform,
    Router,
}

/// One random case: a definition, its input and the model's plans. A `plain` case has only
/// required `llm` steps with text replies and template transforms, joined with `all`: the
/// shape whose `min` is not zero.
fn case(rng: &mut StdRng, plain: bool) -> (Value, Value, HashMap<String, Plan>) {
    let n = rng.random_range(1..=12);
    let mut kinds = Vec::with_capacity(n);
    let mut deps: Vec<Vec<usize>> = Vec::with_capacity(n);
    for i in 0..n {
        kinds.push(match rng.random_range(0..if plain { 17 } else { 20 }) {
            12..15 if plain => Kind::Llm,
            0..12 => Kind::Llm,
            12..15 => Kind::Map,
            15..17 => Kind::Transform,
            _ => Kind::Router,
        });
        let mut d: Vec<usize> = if i == 0 { vec![] } else { (0..rng.random_range(0..3)).map(|_| rng.random_range(0..i)).collect() };
        d.sort_unstable();
        d.dedup();
        deps.push(d);
    }
    let mut routed: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (i, d) in deps.iter().enumerate() {
        for &r in d {
            if matches!(kinds[r], Kind::Router) {
                routed.entry(r).or_default().push(format!("s{i}"));
            }
        }
    }
    let mut plans = HashMap::new();
    let mut input = json!({ "topic": "t".repeat(rng.random_range(0..60)), "flag": rng.random_bool(0.5), "lists": {} });
    let mut steps = Vec::with_capacity(n);
    for i in 0..n {
        // What the step pastes in: upstream replies and transforms, as plain slots.
        let reads: String = deps[i]
            .iter()
            .filter(|&&d| matches!(kinds[d], Kind::Llm | Kind::Transform) && rng.random_bool(0.6))
            .map(|d| format!(" {{{{ steps.s{d}.text }}}}"))
            .collect();
        let mut step = match kinds[i] {
            Kind::Llm | Kind::Map => {
                let map = matches!(kinds[i], Kind::Map);
                let prefix = if map { format!("M{i}.") } else { format!("P{i}.") };
                let attempts = rng.random_range(1..=4u32);
                let json_output = !plain && rng.random_bool(0.25);
                let behaviour = match rng.random_range(0..10) {
                    0..6 => Behaviour::Ok,
                    6..8 if attempts > 1 => Behaviour::Throttled(rng.random_range(1..attempts)),
                    8 if json_output && attempts > 1 => Behaviour::InvalidOnce,
                    9 if json_output => Behaviour::AlwaysInvalid,
                    _ => Behaviour::Ok,
                };
                let pct = |rng: &mut StdRng| if rng.random_bool(0.3) { 100 } else { rng.random_range(1..=100) };
                plans.insert(prefix.clone(), Plan { behaviour, input_pct: pct(rng), output_pct: pct(rng), reply_bytes: rng.random_range(1..300) });
                let item = if map { " {{ item }}" } else { "" };
                let topic = if rng.random_bool(0.5) { " {{ input.topic }}" } else { "" };
                let mut llm = json!({
                    "type": "llm",
                    "model": MODELS[rng.random_range(0..MODELS.len())],
                    "prompt": format!("{prefix}{item}{topic}{reads}"),
                    "max_tokens": rng.random_range(1..=400),
                    "retry": { "max_attempts": attempts, "initial_backoff_ms": 10 },
                });
                if rng.random_bool(0.3) {
                    llm["system"] = json!("Be brief.");
                }
                if json_output {
                    llm["output"] = json!({ "format": "json" });
                }
                if map {
                    let items: Vec<String> = (0..rng.random_range(0..6)).map(|k| "i".repeat(k + 1)).collect();
                    input["lists"][format!("l{i}")] = json!(items);
                    json!({ "type": "map", "over": format!("input.lists.l{i}"), "max_concurrency": rng.random_range(1..4), "step": llm })
                } else {
                    llm
                }
            }
            Kind::Transform => json!({ "type": "transform", "template": format!("T{i}{reads}") }),
            Kind::Router => {
                let targets = routed.get(&i).cloned().unwrap_or_default();
                let (first, rest) = targets.split_at(targets.len().min(1));
                json!({ "type": "router", "routes": [{ "when": "input.flag", "to": first }], "default": rest })
            }
        };
        step["id"] = json!(format!("s{i}"));
        step["depends_on"] = json!(deps[i].iter().map(|d| format!("s{d}")).collect::<Vec<_>>());
        step["required"] = json!(plain || rng.random_bool(0.7));
        step["join"] = json!(if !plain && rng.random_bool(0.2) { "any" } else { "all" });
        steps.push(step);
    }
    let definition = json!({ "name": "cost-check", "max_concurrency": rng.random_range(1..6), "steps": steps });
    (definition, input, plans)
}

/// A budget from a fifth to four times `around` (the estimate's `expected` or `max`; `max` is
/// far above what runs spend, since it counts every upstream reply at the engine's size
/// limit); sometimes only one limit, sometimes none.
fn with_budget(rng: &mut StdRng, mut definition: Value, around: chainrun_core::budget::Amount) -> Value {
    let scale = |rng: &mut StdRng, v: u64| (u128::from(v) * rng.random_range(20..=400u128) / 100) as u64;
    let mut budget = json!({});
    if rng.random_bool(0.8) {
        budget["max_cost_usd"] = json!(Usd::from_pico(scale(rng, around.cost.pico())).to_string());
    }
    if rng.random_bool(0.6) {
        budget["max_total_tokens"] = json!(scale(rng, around.tokens));
    }
    definition["budget"] = budget;
    definition
}

fn main() {
    let registry = Arc::new(ModelRegistry::builtin());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("runtime");
    let mut rng = StdRng::seed_from_u64(0xC057);
    let (mut runs, mut overruns, mut bracketed, mut unbounded, mut budget_stopped, mut with_min) = (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    while runs < RUNS {
        let plain = rng.random_bool(0.2);
        let (definition, input, plans) = case(&mut rng, plain);
        let graph = validate_json(&definition, &registry).unwrap_or_else(|e| panic!("the generator made an invalid workflow: {e}"));
        let unbudgeted = estimate(&graph, &input, &registry, None);
        if unbudgeted.max_unclamped.is_none() {
            unbounded += 1;
            continue;
        }
        // A plain case's budget is drawn around its max, so that it often cannot bind and
        // `min` is not zero; the others' around their expected cost, so many stop at it.
        let around = if plain { unbudgeted.max_unclamped.unwrap_or(unbudgeted.expected) } else { unbudgeted.expected };
        let definition = with_budget(&mut rng, definition, around);
        // A budget below one call's worst case is a validation error; draw again.
        let Ok(graph) = validate_json(&definition, &registry) else { continue };
        let estimate = estimate(&graph, &input, &registry, None);
        let model = Arc::new(ScriptedUsage { plans, seen: Mutex::new(HashMap::new()) });
        let run = runtime.block_on(async {
            let store = Arc::new(MemoryStore::new());
            let engine = Engine::new(model, store.clone(), Arc::new(MemoryProgress::new()), registry.clone(), EngineConfig::default());
            let run = RunRecord::new("cost-check".into(), definition, input, "u".into(), vec![Principal::User("u".into())], chrono::Utc::now());
            store.create_run(&run).await.expect("create");
            let lease = Lease { holder: "r".into(), expires_at: chrono::Utc::now() + chrono::Duration::hours(1) };
            let Ok(Claim::Acquired(claimed)) = store.claim(&run.id, &lease, chrono::Utc::now()).await else { panic!("claim") };
            engine.execute(*claimed, lease, None).await.expect("engine");
            store.get_run(&run.id).await.expect("get").expect("run")
        });
        runs += 1;
        let (cost, tokens) = (run.totals.cost, run.totals.total_tokens());
        let over = graph.budget.max_cost.is_some_and(|m| cost > m) || graph.budget.max_total_tokens.is_some_and(|m| tokens > m);
        if over {
            overruns += 1;
            eprintln!("overrun: {cost} / {tokens} tokens over {:?}", graph.budget);
        }
        if run.error.as_ref().is_some_and(|e| e.code == "BUDGET_EXCEEDED") {
            budget_stopped += 1;
        }
        let Some(max) = estimate.max_unclamped else { unreachable!("the budget does not change the steps' bounds") };
        let min = estimate.min;
        if min.tokens > 0 {
            with_min += 1;
        }
        if min.tokens <= tokens && min.cost <= cost && tokens <= max.tokens && cost <= max.cost {
            bracketed += 1;
        } else {
            eprintln!("not bracketed: actual ${cost} / {tokens} tokens, estimate [{min}, {max}]");
        }
    }
    println!("cases without a bound (skipped, none expected): {unbounded}");
    println!("runs stopped by their budget: {budget_stopped}; runs with a nonzero min: {with_min}");
    println!("cost: runs={runs} overruns={overruns} estimate_bracketed={bracketed}/{runs}");
    if overruns > 0 || bracketed < runs {
        std::process::exit(1);
    }
}
