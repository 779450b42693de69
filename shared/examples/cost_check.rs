//! Cost check (`make cost-check`): seeded random budgeted workflows run through the engine
//! with in-memory adapters, checking two things of every run.
//!
//! - **No overrun**: the run's charged cost and tokens never exceed its budget.
//! - **The estimate brackets the run**: `estimate.min ≤ actual ≤ estimate.max`, in tokens
//!   and in money, and each step's charge is within that step's `max`, with the estimate of [`chainrun_core::estimate`] made from the
//!   definition and input alone, before the run. `max` here is the sum of the steps'
//!   bounds *without* the budget clamp (`max_unclamped`), the stronger claim: it checks the
//!   estimator itself, while the clamp is what the overrun check already proves.
//!
//! Graphs: 1 to 12 steps of `llm` (random model, `max_tokens`, system prompt — often one
//! long enough to be cached, so maps and sibling steps carry cache points —, service tier
//! where the model offers one, retries,
//! text or json output with or without a schema, prompts pasting upstream replies and
//! input as plain slots or through filters), maps over lists of the input or of an
//! upstream JSON reply (now and then a map of 100 to 130 items as one batch inference job,
//! `mode: batch`, answered by the same model and priced at the batch rate, the run waiting
//! for the job between invocations), template transforms, routers, optional steps and
//! `join: any`, at random concurrency. Budgets are drawn around the estimate, so many runs hit them. A fifth of
//! the cases are plain (required text `llm` steps and template transforms only), the shape
//! whose `min` is not zero.
//!
//! The model is scripted and realistic about the things the bound rests on: it reports at
//! most [`estimate_input_tokens`] of the request as sent, never more than the model's
//! context window, and 1 to `max_tokens` output tokens (often exactly the bounds); a
//! request with cache points has part of that input reported as cache reads and writes
//! (billed at their own prices, a write above input). Its
//! replies are often exactly the engine's limit of 32 bytes per `max_tokens` token (what
//! the estimate assumes of a pasted reply), else short, now and then past it (refused,
//! charged). Some calls are throttled (without usage) fewer times
//! than the step has attempts, some json replies are invalid once (charged, retried) or
//! always. Every call is answered in the end, which is what `min` assumes.
//!
//! The last line is: `cost: runs=N overruns=O estimate_bracketed=B/N`.

use async_trait::async_trait;
use chainrun_core::budget::estimate_input_tokens;
use chainrun_core::engine::{Engine, EngineConfig, Outcome};
use chainrun_core::estimate::{MaxBasis, estimate};
use chainrun_core::graph::validate_json;
use chainrun_core::ids::Principal;
use chainrun_core::memory::{MemoryBatch, MemoryProgress, MemoryStore};
use chainrun_core::money::Usd;
use chainrun_core::ports::{Claim, Lease, ModelClient, ModelError, ModelErrorKind, ModelReply, ModelRequest, RunStore};
use chainrun_core::pricing::{ModelRegistry, ServiceTier, Usage};
use chainrun_core::run::RunRecord;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

const RUNS: u64 = 1000;
const MODELS: [&str; 5] = [
    "amazon.nova-micro-v1:0",
    "us.amazon.nova-lite-v1:0",
    "global.anthropic.claude-haiku-4-5-20251001-v1:0",
    "meta.llama3-1-8b-instruct-v1:0",
    // Offers the flex and priority tiers.
    "openai.gpt-oss-120b-1:0",
];

/// A system prompt long enough (about 5,000 tokens) for every model's cache minimum, so
/// the maps and sibling steps that share it carry cache points.
fn long_system() -> String {
    "Rule: be brief, cite the source, answer in the language asked. ".repeat(320)
}

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
    json: bool,
    /// For a request with cache points: the percent of its input reported as cache reads
    /// and as cache writes (together at most 100; the rest is plain input).
    read_pct: u64,
    write_pct: u64,
}

/// The longest JSON list `bytes` can hold, `[1,1,…]` (at least `[]`): a map over it has as
/// many items as the estimate allows.
fn json_list(bytes: usize) -> String {
    serde_json::to_string(&vec![1; bytes.saturating_sub(1) / 2]).unwrap_or_default()
}

struct ScriptedUsage {
    registry: Arc<ModelRegistry>,
    plans: HashMap<String, Plan>,
    /// Calls seen per prompt, so retries of the same request play the next reply.
    seen: Mutex<HashMap<String, u32>>,
    levers: Arc<Levers>,
}

/// How many calls used a lever, over all runs: the check reaches what it claims to cover.
#[derive(Debug, Default)]
pub struct Levers {
    pub cached: std::sync::atomic::AtomicU64,
    pub tiered: std::sync::atomic::AtomicU64,
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
            // A json step's reply is a list of strings (a map may run over it).
            _ if plan.json => json_list(plan.reply_bytes),
            _ => "r".repeat(plan.reply_bytes),
        };
        // Bedrock rejects a prompt longer than the context window, so none is charged more.
        let window = self.registry.get(request.model.as_str()).map_or(0, |m| u64::from(m.context_window));
        let bound = estimate_input_tokens(request.system.as_deref(), &request.prompt).min(window);
        let input = (bound * plan.input_pct / 100).max(1);
        let output_tokens = (u64::from(request.max_tokens) * plan.output_pct / 100).max(1);
        let usage = if request.cache_points.count() > 0 {
            // Part of the input read from or written to the prompt cache, as Bedrock splits it.
            self.levers.cached.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (read, write) = (input * plan.read_pct / 100, input * plan.write_pct / 100);
            Usage { input_tokens: input - read - write, output_tokens, cache_read_tokens: read, cache_write_tokens: write }
        } else {
            Usage { input_tokens: input, output_tokens, ..Usage::default() }
        };
        if request.service_tier != ServiceTier::Default {
            self.levers.tiered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let service_tier = (request.service_tier != ServiceTier::Default).then_some(request.service_tier);
        Ok(ModelReply { text, usage, stop_reason: "end_turn".into(), service_tier })
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
fn case(rng: &mut StdRng, plain: bool, registry: &ModelRegistry) -> (Value, Value, HashMap<String, Plan>) {
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
    // Which steps are `llm` steps replying in JSON: their output is a list.
    let mut json_steps = vec![false; n];
    for i in 0..n {
        // What the step pastes in: upstream replies and transforms, mostly as plain slots
        // (bounded by the upstream limits), sometimes through a filter (bounded only by the
        // context window).
        let mut reads = String::new();
        for &d in &deps[i] {
            if !matches!(kinds[d], Kind::Llm | Kind::Transform) || !rng.random_bool(0.6) {
                continue;
            }
            reads += &match rng.random_range(0..10) {
                0 if json_steps[d] => format!(" {{{{ steps.s{d}.output | join(',') }}}}"),
                1 if json_steps[d] => format!(" {{{{ steps.s{d}.output | tojson }}}}"),
                2 => format!(" {{{{ steps.s{d}.text | upper }}}}"),
                _ => format!(" {{{{ steps.s{d}.text }}}}"),
            };
        }
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
                // Small limits often, so a JSON list at its size limit fits a map (≤ 1,000).
                let max_tokens = if rng.random_bool(0.4) { rng.random_range(1..=40u32) } else { rng.random_range(1..=400u32) };
                // Often exactly the engine's limit of 32 bytes per token (the estimate's
                // bound for a pasted reply), else short, now and then past the limit.
                let limit = EngineConfig::default().reply_limit(max_tokens);
                let reply_bytes = if rng.random_bool(0.3) { limit } else { rng.random_range(1..=(limit + limit / 4).min(300)) };
                let read_pct = rng.random_range(0..=100);
                let write_pct = rng.random_range(0..=100 - read_pct);
                plans.insert(
                    prefix.clone(),
                    Plan { behaviour, input_pct: pct(rng), output_pct: pct(rng), reply_bytes, json: json_output, read_pct, write_pct },
                );
                json_steps[i] = json_output && !map;
                // A map's prompt often ignores its item, so the item count is what bounds it.
                let item = if map && rng.random_bool(0.5) { " {{ item }}" } else { "" };
                let topic = if rng.random_bool(0.5) { " {{ input.topic }}" } else { "" };
                let model = MODELS[rng.random_range(0..MODELS.len())];
                let mut llm = json!({
                    "type": "llm",
                    "model": model,
                    "prompt": format!("{prefix}{item}{topic}{reads}"),
                    "max_tokens": max_tokens,
                    "retry": { "max_attempts": attempts, "initial_backoff_ms": 10 },
                });
                match rng.random_range(0..10) {
                    0..2 => llm["system"] = json!("Be brief."),
                    2..5 => llm["system"] = json!(long_system()),
                    _ => {}
                }
                if model.starts_with("openai.") && rng.random_bool(0.6) {
                    llm["service_tier"] = json!(if rng.random_bool(0.5) { "flex" } else { "priority" });
                }
                if json_output {
                    llm["output"] =
                        if rng.random_bool(0.3) { json!({ "format": "json", "schema": { "type": "array" } }) } else { json!({ "format": "json" }) };
                }
                // A batch job needs a model that offers it, in its default tier.
                let batchable = registry.get(model).is_some_and(|m| m.batch.is_some()) && llm.get("service_tier").is_none();
                if map && batchable && rng.random_bool(0.3) {
                    let items: Vec<String> = (0..rng.random_range(100..=130)).map(|k| format!("b{k}")).collect();
                    input["lists"][format!("l{i}")] = json!(items);
                    json!({ "type": "map", "over": format!("input.lists.l{i}"), "mode": "batch", "max_concurrency": 8, "step": llm })
                } else if map {
                    // Over an upstream JSON step's list when there is one, else the input's.
                    let over = match deps[i].iter().find(|&&d| json_steps[d]) {
                        Some(d) if rng.random_bool(0.5) => format!("steps.s{d}.output"),
                        _ => {
                            let items: Vec<String> = (0..rng.random_range(0..6)).map(|k| "i".repeat(k + 1)).collect();
                            input["lists"][format!("l{i}")] = json!(items);
                            format!("input.lists.l{i}")
                        }
                    };
                    json!({ "type": "map", "over": over, "max_concurrency": rng.random_range(1..4), "step": llm })
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
/// limit and filtered ones at the context window); sometimes only one limit, sometimes none.
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

/// What [`check`] counted.
#[derive(Debug, Default)]
pub struct Report {
    pub runs: u64,
    pub overruns: u64,
    pub bracketed: u64,
    pub budget_stopped: u64,
    /// Runs whose estimate has a nonzero `min`.
    pub with_min: u64,
    /// Runs with a step whose `max` rests on its model's context window.
    pub by_window: u64,
    /// Runs with a map over an upstream step's list.
    pub maps_over_steps: u64,
    /// Calls that carried cache points, and calls in a tier other than default.
    pub cached_calls: u64,
    pub tiered_calls: u64,
    /// Batch inference jobs submitted, and the records they held.
    pub batch_jobs: u64,
    pub batch_records: u64,
}

fn main() {
    let report = check(RUNS);
    println!(
        "runs stopped by their budget: {}; runs with a nonzero min: {}; with a step bounded by its context window: {}; with a map over a step's list: {}",
        report.budget_stopped, report.with_min, report.by_window, report.maps_over_steps
    );
    println!(
        "levers: calls with cache points={}; calls in the flex or priority tier={}; batch jobs={} of {} records",
        report.cached_calls, report.tiered_calls, report.batch_jobs, report.batch_records
    );
    println!("cost: runs={} overruns={} estimate_bracketed={}/{}", report.runs, report.overruns, report.bracketed, report.runs);
    if report.overruns > 0 || report.bracketed < report.runs {
        std::process::exit(1);
    }
}

/// Runs `runs` seeded random cases (the same ones every time) and counts.
pub fn check(runs: u64) -> Report {
    let registry = Arc::new(ModelRegistry::builtin());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("runtime");
    let mut rng = StdRng::seed_from_u64(0xC057);
    let mut report = Report::default();
    let levers = Arc::new(Levers::default());
    while report.runs < runs {
        let plain = rng.random_bool(0.2);
        let (definition, input, plans) = case(&mut rng, plain, &registry);
        let graph = validate_json(&definition, &registry).unwrap_or_else(|e| panic!("the generator made an invalid workflow: {e}"));
        let unbudgeted = estimate(&graph, &input, &registry, None);
        // A plain case's budget is drawn around its max, so that it often cannot bind and
        // `min` is not zero; the others' around their expected cost, so many stop at it.
        let around = if plain { unbudgeted.max_unclamped } else { unbudgeted.expected };
        let definition = with_budget(&mut rng, definition, around);
        // A budget below one call's worst case is a validation error; draw again.
        let Ok(graph) = validate_json(&definition, &registry) else { continue };
        let estimate = estimate(&graph, &input, &registry, None);
        if definition.to_string().contains("\"over\":\"steps.") {
            report.maps_over_steps += 1;
        }
        let model = Arc::new(ScriptedUsage { registry: registry.clone(), plans, seen: Mutex::new(HashMap::new()), levers: levers.clone() });
        let run = runtime.block_on(async {
            let store = Arc::new(MemoryStore::new());
            let batch = Arc::new(MemoryBatch::new(model.clone(), 1, 100));
            let engine = Engine::new(model, store.clone(), Arc::new(MemoryProgress::new()), registry.clone(), EngineConfig::default()).with_batch(
                batch.clone(),
                std::time::Duration::from_millis(1),
                24,
            );
            let run = RunRecord::new(
                "cost-check".parse().expect("a valid name"),
                definition,
                input,
                "u".parse().expect("a valid user id"),
                vec![Principal::User("u".into())],
                chrono::Utc::now(),
            );
            store.create_run(&run).await.expect("create");
            // A run waiting for its batch jobs is taken up again once its poll time came.
            for n in 0..50 {
                let lease = Lease { holder: format!("r{n}"), expires_at: chrono::Utc::now() + chrono::Duration::hours(1) };
                let Ok(Claim::Acquired(claimed)) = store.claim(&run.id, &lease, chrono::Utc::now()).await else { panic!("claim") };
                if let Outcome::Finished(_) = engine.execute(*claimed, lease, None).await.expect("engine") {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(3));
            }
            let jobs = batch.jobs();
            let records = jobs.iter().map(|j| j.records.len() as u64).sum::<u64>();
            (store.get_run(&run.id).await.expect("get").expect("run"), store.get_steps(&run.id).await.expect("steps"), (jobs.len() as u64, records))
        });
        let (run, step_records, (jobs, records)) = run;
        report.runs += 1;
        (report.batch_jobs, report.batch_records) = (report.batch_jobs + jobs, report.batch_records + records);
        let (cost, tokens) = (run.totals.cost, run.totals.total_tokens());
        let over = graph.budget().max_cost.is_some_and(|m| cost > m) || graph.budget().max_total_tokens.is_some_and(|m| tokens > m);
        if over {
            report.overruns += 1;
            eprintln!("overrun: {cost} / {tokens} tokens over {:?}", graph.budget());
        }
        if run.error.as_ref().is_some_and(|e| e.code == "BUDGET_EXCEEDED") {
            report.budget_stopped += 1;
        }
        let (min, max) = (estimate.min, estimate.max_unclamped);
        if estimate.steps.iter().any(|s| s.max_basis == MaxBasis::ContextWindow) {
            report.by_window += 1;
        }
        if min.tokens > 0 {
            report.with_min += 1;
        }
        // Each step's own `max` bounds what that step was charged, not only the sum.
        let steps_within = step_records.iter().all(|record| {
            let bound = estimate.steps.iter().find(|s| s.step_id == record.step_id).map(|s| s.max).unwrap_or_default();
            let within = record.usage.total_tokens() <= bound.tokens && record.cost <= bound.cost;
            if !within {
                eprintln!("step {} not bracketed: ${} / {} tokens over {bound}", record.step_id, record.cost, record.usage.total_tokens());
            }
            within
        });
        // `min` is claimed for runs whose calls are all answered within the size limit; a
        // refused reply can end the run before other steps start.
        let answered = !step_records.iter().any(|r| r.error.as_ref().is_some_and(|e| e.code == "OUTPUT_TOO_LARGE"));
        let above_min = !answered || (min.tokens <= tokens && min.cost <= cost);
        if steps_within && above_min && tokens <= max.tokens && cost <= max.cost {
            report.bracketed += 1;
        } else {
            eprintln!("not bracketed: actual ${cost} / {tokens} tokens, estimate [{min}, {max}]");
        }
    }
    report.cached_calls = levers.cached.load(std::sync::atomic::Ordering::Relaxed);
    report.tiered_calls = levers.tiered.load(std::sync::atomic::Ordering::Relaxed);
    report
}
