//! Run budgets against the in-memory ports: a call whose worst case does not fit is never
//! made, and a run's charged cost and tokens never exceed its limits.
//!
//! Prices used below (Nova Micro): input $0.000035 / 1K = 35,000 pico-dollars a token,
//! output $0.00014 / 1K = 140,000. A one-byte prompt with no system prompt is estimated at
//! 1 + 64 + 32 = 97 input tokens, so with `max_tokens: 100` a call reserves 197 tokens and
//! 97 × 35,000 + 100 × 140,000 = 17,395,000 pico-dollars ($0.000017395).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::budget::{BudgetLimits, estimate_input_tokens};
use chainrun_core::engine::{Engine, EngineConfig, Outcome};
use chainrun_core::graph::{Problem, validate_json};
use chainrun_core::ids::{Principal, StepId};
use chainrun_core::memory::{MemoryProgress, MemoryStore, Script, ScriptedModel};
use chainrun_core::money::Usd;
use chainrun_core::ports::{Claim, Lease, ModelError, ModelErrorKind, RunStore};
use chainrun_core::pricing::{ModelRegistry, Usage};
use chainrun_core::run::{Event, EventType, RunRecord, RunStatus, StepRecord, StepStatus};
use chrono::Utc;
use proptest::prelude::*;
use serde_json::{Value, json};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

mod support;
use support::{Harness, harness_with, lease, pick_deps, routed_targets, router_json, wire};

/// 97 × 35,000 + 100 × 140,000: the reservation of a one-byte prompt with `max_tokens: 100`.
const ONE_BYTE_CALL_PICO: u64 = 17_395_000;
/// 50 input × 35,000 + 100 output × 140,000.
const FIFTY_IN_HUNDRED_OUT_PICO: u64 = 15_750_000;
/// 40 input × 35,000 + 60 output × 140,000.
const FORTY_IN_SIXTY_OUT_PICO: u64 = 9_800_000;

fn registry() -> Arc<ModelRegistry> {
    static REGISTRY: OnceLock<Arc<ModelRegistry>> = OnceLock::new();
    REGISTRY.get_or_init(|| Arc::new(ModelRegistry::builtin())).clone()
}

fn harness(scripts: Vec<Script>) -> Harness {
    harness_with(scripts, registry(), EngineConfig::default())
}

fn workflow(budget: Value, steps: Value) -> Value {
    json!({
        "name": "budgeted",
        "defaults": { "model": "amazon.nova-micro-v1:0", "max_tokens": 100, "retry": { "max_attempts": 3, "initial_backoff_ms": 100 } },
        "budget": budget,
        "steps": steps
    })
}

impl Harness {
    async fn start(&self, definition: Value) -> (RunRecord, Lease) {
        let run = RunRecord::new(
            "budgeted".parse().unwrap(),
            definition,
            json!({}),
            "alice".parse().unwrap(),
            vec![Principal::User("alice".into())],
            Utc::now(),
        );
        self.store.create_run(&run).await.unwrap();
        let lease = lease("runner-1");
        let Claim::Acquired(run) = self.store.claim(&run.id, &lease, Utc::now()).await.unwrap() else { panic!("claim failed") };
        (*run, lease)
    }

    async fn run(&self, definition: Value) -> (RunRecord, Vec<StepRecord>, Vec<Event>) {
        let (run, lease) = self.start(definition).await;
        self.engine.execute(run.clone(), lease, None).await.unwrap();
        self.outcome(&run).await
    }

    async fn outcome(&self, run: &RunRecord) -> (RunRecord, Vec<StepRecord>, Vec<Event>) {
        let stored = self.store.get_run(&run.id).await.unwrap().unwrap();
        (stored, self.store.get_steps(&run.id).await.unwrap(), self.progress.events(&run.id))
    }
}

fn step<'a>(records: &'a [StepRecord], id: &str) -> &'a StepRecord {
    records.iter().find(|r| r.step_id.as_str() == id).unwrap_or_else(|| panic!("no record for {id}"))
}

fn failed_event<'a>(events: &'a [Event], id: &str) -> &'a Event {
    events
        .iter()
        .find(|e| e.kind == EventType::StepFailed && e.step_id.as_ref().map(StepId::as_str) == Some(id))
        .unwrap_or_else(|| panic!("no STEP_FAILED for {id}"))
}

fn money(pico: u64) -> Value {
    json!({ "cost_usd": Usd::from_pico(pico).to_string(), "cost_pico_usd": pico })
}

fn amount(tokens: u64, pico: u64) -> Value {
    let mut v = money(pico);
    v["tokens"] = json!(tokens);
    v
}

#[tokio::test(start_paused = true)]
async fn a_call_whose_reservation_does_not_fit_is_never_made_and_its_event_names_the_numbers() {
    let h = harness(vec![Script::reply("A", "a").with_usage(50, 100), Script::reply("B", "b")]);
    let (run, records, events) = h
        .run(workflow(
            json!({ "max_cost_usd": "0.000025" }),
            json!([
                { "id": "a", "type": "llm", "prompt": "A" },
                { "id": "b", "type": "llm", "depends_on": ["a"], "prompt": "B" }
            ]),
        ))
        .await;
    // a reserved $0.000017395 of $0.000025 and was charged $0.00001575; b's
    // $0.000017395 on top of that would break the limit.
    assert_eq!(h.model.calls_matching("B"), 0, "the refused call is never made");
    assert_eq!(h.model.calls().len(), 1);
    assert_eq!(run.status, RunStatus::Failed);
    let error = run.error.unwrap();
    assert_eq!((error.code.as_str(), error.retryable), ("BUDGET_EXCEEDED", false));
    assert!(error.message.contains("step b failed") && error.message.contains("max_cost_usd $0.000025"), "{}", error.message);

    let b = step(&records, "b");
    assert_eq!((b.status, b.attempts, b.cost), (StepStatus::Failed, 0, Usd::ZERO));
    let event = failed_event(&events, "b");
    assert_eq!(event.data["error"]["code"], "BUDGET_EXCEEDED");
    assert_eq!(
        event.data["detail"]["budget"],
        json!({
            "limit": "max_cost_usd",
            "max_cost_usd": "0.000025",
            "max_cost_pico_usd": 25_000_000,
            "spent": amount(150, FIFTY_IN_HUNDRED_OUT_PICO),
            "reserved_by_others": amount(0, 0),
            "attempted": amount(197, ONE_BYTE_CALL_PICO),
        })
    );
    assert_eq!(run.totals.cost, Usd::from_pico(FIFTY_IN_HUNDRED_OUT_PICO));
    assert_eq!(run.totals.model_calls, 1);
}

#[tokio::test(start_paused = true)]
async fn parallel_steps_that_fit_alone_but_not_together_run_one_and_fail_the_other_closed() {
    let scripts = || {
        vec![
            Script::reply("A", "a").with_usage(50, 100).with_latency(Duration::from_secs(1)),
            Script::reply("B", "b").with_usage(50, 100).with_latency(Duration::from_secs(1)),
        ]
    };
    let steps = json!([{ "id": "a", "type": "llm", "prompt": "A" }, { "id": "b", "type": "llm", "prompt": "B" }]);

    // $0.00003 holds one reservation of $0.000017395, not two.
    let h = harness(scripts());
    let (run, records, events) = h.run(workflow(json!({ "max_cost_usd": 0.00003 }), steps.clone())).await;
    assert_eq!(h.model.calls().len(), 1, "exactly one call is made");
    let (ran, refused) = if step(&records, "a").status == StepStatus::Completed { ("a", "b") } else { ("b", "a") };
    assert_eq!(step(&records, ran).status, StepStatus::Completed, "the admitted step runs to the end");
    assert_eq!(step(&records, refused).status, StepStatus::Failed);
    let budget = &failed_event(&events, refused).data["detail"]["budget"];
    assert_eq!(budget["spent"], amount(0, 0));
    assert_eq!(budget["reserved_by_others"], amount(197, ONE_BYTE_CALL_PICO), "the other step's reservation is what did not leave room");
    assert_eq!(budget["attempted"], amount(197, ONE_BYTE_CALL_PICO));
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.totals.cost, Usd::from_pico(FIFTY_IN_HUNDRED_OUT_PICO));

    // With room for both reservations, both run at once.
    let h = harness(scripts());
    let started = tokio::time::Instant::now();
    let (run, _, _) = h.run(workflow(json!({ "max_cost_usd": "0.00003479" }), steps)).await;
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert_eq!(run.totals.cost, Usd::from_pico(2 * FIFTY_IN_HUNDRED_OUT_PICO));
}

#[tokio::test(start_paused = true)]
async fn the_token_budget_refuses_calls_the_same_way() {
    let h = harness(vec![Script::reply("A", "a").with_usage(50, 100), Script::reply("B", "b")]);
    let (run, _, events) = h
        .run(workflow(
            json!({ "max_total_tokens": 300 }),
            json!([
                { "id": "a", "type": "llm", "prompt": "A" },
                { "id": "b", "type": "llm", "depends_on": ["a"], "prompt": "B" }
            ]),
        ))
        .await;
    // 150 spent + 197 reserved > 300.
    assert_eq!(h.model.calls_matching("B"), 0);
    assert_eq!(run.error.unwrap().code, "BUDGET_EXCEEDED");
    let budget = &failed_event(&events, "b").data["detail"]["budget"];
    assert_eq!(budget["limit"], "max_total_tokens");
    assert_eq!(budget["max_total_tokens"], 300);
    assert_eq!(budget["spent"]["tokens"], 150);
    assert_eq!(budget["attempted"]["tokens"], 197);
    assert_eq!(run.totals.total_tokens(), 150);
}

#[tokio::test(start_paused = true)]
async fn a_resumed_run_counts_what_its_checkpoints_already_spent() {
    let h = harness(vec![Script::reply("B", "b")]);
    let def = workflow(
        json!({ "max_cost_usd": "0.000025" }),
        json!([
            { "id": "a", "type": "llm", "prompt": "A" },
            { "id": "b", "type": "llm", "depends_on": ["a"], "prompt": "B" }
        ]),
    );
    let (run, first) = h.start(def).await;
    // A first runner completed `a`, checkpointed it and died.
    let mut a = StepRecord::settled(StepId::parse("a").unwrap(), StepStatus::Completed, None, Utc::now());
    (a.text, a.output, a.attempts) = (Some("a".into()), Some(json!("a")), 1);
    a.usage = Usage { input_tokens: 50, output_tokens: 100, ..Usage::default() };
    a.cost = Usd::from_pico(FIFTY_IN_HUNDRED_OUT_PICO);
    h.store.save_step(&run.id, &first, &a).await.unwrap();

    let later = Utc::now() + chrono::Duration::minutes(16);
    let second = Lease { holder: "runner-2".into(), expires_at: later + chrono::Duration::minutes(15) };
    let Claim::Acquired(resumed) = h.store.claim(&run.id, &second, later).await.unwrap() else { panic!("takeover failed") };
    assert_eq!(h.engine.execute(*resumed, second, None).await.unwrap(), Outcome::Finished(RunStatus::Failed));
    let (run, _, events) = h.outcome(&run).await;

    assert!(h.model.calls().is_empty(), "b alone would fit; with a's checkpointed spend it does not");
    let budget = &failed_event(&events, "b").data["detail"]["budget"];
    assert_eq!(budget["spent"], amount(150, FIFTY_IN_HUNDRED_OUT_PICO));
    assert_eq!(budget["attempted"], amount(197, ONE_BYTE_CALL_PICO));
    assert_eq!(run.totals.cost, Usd::from_pico(FIFTY_IN_HUNDRED_OUT_PICO), "the run's totals include the checkpointed spend");
}

fn classify(budget: &str) -> Value {
    workflow(
        json!({ "max_cost_usd": budget }),
        json!([{ "id": "classify", "type": "llm", "prompt": "CLASSIFY", "output": { "format": "json", "schema": { "type": "object" } } }]),
    )
}

fn invalid_then_valid() -> Vec<Script> {
    vec![Script::reply("CLASSIFY", "I think it is negative").then(Ok("{\"label\":\"negative\"}".into())).with_usage(40, 60)]
}

#[tokio::test(start_paused = true)]
async fn a_retry_reserves_again_against_what_the_failed_attempt_was_charged() {
    // Attempt 1 reserves 104 × 35,000 + 100 × 140,000 = $0.00001764 of $0.000025 and is
    // charged $0.0000098 for a reply that is not JSON. Attempt 2, its prompt longer by the
    // corrective hint, reserves more than $0.00001764: it does not fit beside $0.0000098.
    let h = harness(invalid_then_valid());
    let (run, records, events) = h.run(classify("0.000025")).await;
    assert_eq!(h.model.calls().len(), 1);
    assert_eq!(run.error.as_ref().unwrap().code, "BUDGET_EXCEEDED");
    assert!(events.iter().any(|e| e.kind == EventType::StepRetrying), "the retry was scheduled, then refused");
    let record = step(&records, "classify");
    assert_eq!((record.attempts, record.cost), (1, Usd::from_pico(FORTY_IN_SIXTY_OUT_PICO)), "the failed attempt's usage is charged");
    let budget = &failed_event(&events, "classify").data["detail"]["budget"];
    assert_eq!(budget["spent"], amount(100, FORTY_IN_SIXTY_OUT_PICO));
    assert!(budget["attempted"]["tokens"].as_u64().unwrap() > 204, "{budget}");
    assert_eq!((run.totals.cost, run.totals.model_calls), (Usd::from_pico(FORTY_IN_SIXTY_OUT_PICO), 1));

    // With room for both attempts the retry runs, and both are charged.
    let h = harness(invalid_then_valid());
    let (run, _, _) = h.run(classify("0.00004")).await;
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(h.model.calls().len(), 2);
    assert_eq!((run.totals.cost, run.totals.model_calls), (Usd::from_pico(2 * FORTY_IN_SIXTY_OUT_PICO), 2));
}

#[tokio::test(start_paused = true)]
async fn a_failed_call_without_reported_usage_charges_nothing_and_frees_its_reservation() {
    // $0.00002 holds one reservation of $0.000017395. Were a throttled attempt charged or
    // its reservation kept, the third attempt could not be made.
    let throttled = ModelError::new(ModelErrorKind::Throttled, "ThrottlingException", "slow down");
    let h = harness(vec![Script::failing_first("T", throttled, 2, "ok").with_usage(40, 60)]);
    let (run, _, _) = h.run(workflow(json!({ "max_cost_usd": "0.00002" }), json!([{ "id": "t", "type": "llm", "prompt": "T" }]))).await;
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(h.model.calls().len(), 3);
    assert_eq!((run.totals.cost, run.totals.model_calls), (Usd::from_pico(FORTY_IN_SIXTY_OUT_PICO), 1));
}

#[tokio::test(start_paused = true)]
async fn map_items_share_the_budget_and_a_refused_item_reports_its_numbers() {
    // "ITEM x" is 6 bytes: 102 × 35,000 + 100 × 140,000 = $0.00001757 an item; $0.00004
    // holds two of them at once.
    let item_pico = 102 * 35_000 + 100 * 140_000;
    let h = harness(vec![Script::reply("ITEM", "done").with_usage(40, 60).with_latency(Duration::from_secs(1))]);
    let (run, records, _) = h
        .run(workflow(
            json!({ "max_cost_usd": "0.00004" }),
            json!([{ "id": "m", "type": "map", "over": "['x', 'y', 'z']", "max_concurrency": 3, "on_item_failure": "continue",
                     "step": { "type": "llm", "prompt": "ITEM {{ item }}" } }]),
        ))
        .await;
    assert_eq!(h.model.calls().len(), 2);
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.output, Some(json!({ "m": ["done", "done", null] })));
    let failed = &step(&records, "m").detail.as_ref().unwrap()["failed"][0];
    assert_eq!(failed["index"], 2);
    assert_eq!(failed["error"]["code"], "BUDGET_EXCEEDED");
    assert_eq!(failed["detail"]["budget"]["reserved_by_others"], amount(2 * 202, 2 * item_pico));
    assert_eq!(run.totals.cost, Usd::from_pico(2 * FORTY_IN_SIXTY_OUT_PICO));
}

fn problems(def: &Value) -> Vec<Problem> {
    validate_json(def, &registry()).unwrap_err().problems
}

#[test]
fn budget_problems_are_named_by_field() {
    let one_step = json!([{ "id": "a", "type": "llm", "prompt": "A" }]);
    for (budget, field) in [
        (json!({ "max_cost_usd": "-1" }), "budget.max_cost_usd"),
        (json!({ "max_cost_usd": -0.5 }), "budget.max_cost_usd"),
        (json!({ "max_cost_usd": "two dollars" }), "budget.max_cost_usd"),
        (json!({ "max_cost_usd": "0.0000000000001" }), "budget.max_cost_usd"),
        (json!({ "max_cost_usd": true }), "budget.max_cost_usd"),
        (json!({ "max_total_tokens": -5 }), "budget.max_total_tokens"),
        (json!({ "max_total_tokens": 1.5 }), "budget.max_total_tokens"),
        (json!({ "max_total_tokens": "40000" }), "budget.max_total_tokens"),
    ] {
        let p = problems(&workflow(budget.clone(), one_step.clone()));
        assert_eq!(p.len(), 1, "{budget}: {p:?}");
        assert_eq!((p[0].step.as_deref(), p[0].field.as_str()), (None, field), "{budget}");
    }
    let p = problems(&workflow(json!({ "max_cost_usd": "-1", "max_total_tokens": -1 }), one_step.clone()));
    assert_eq!(p.iter().map(|p| p.field.as_str()).collect::<Vec<_>>(), ["budget.max_cost_usd", "budget.max_total_tokens"], "both are reported");
    let p = problems(&workflow(json!({ "max_cost": "1" }), one_step));
    assert!(p.len() == 1 && p[0].message.contains("max_cost"), "an unknown budget field is named: {p:?}");
}

#[test]
fn a_step_that_could_never_fit_the_budget_is_rejected_naming_its_max_tokens() {
    // 1,000 output tokens cost $0.00014 alone, more than $0.0001.
    let p = problems(&workflow(
        json!({ "max_cost_usd": "0.0001" }),
        json!([
            { "id": "a", "type": "llm", "prompt": "A", "max_tokens": 1000 },
            { "id": "m", "type": "map", "over": "[1]", "step": { "type": "llm", "prompt": "{{ item }}", "max_tokens": 1000 } },
            { "id": "ok", "type": "llm", "prompt": "A", "max_tokens": 100 }
        ]),
    ));
    let fields: Vec<(Option<&str>, &str)> = p.iter().map(|p| (p.step.as_deref(), p.field.as_str())).collect();
    assert_eq!(fields, [(Some("a"), "max_tokens"), (Some("m"), "step.max_tokens")]);
    assert!(p[0].message.contains("max_cost_usd $0.0001"), "{}", p[0].message);

    // Tokens: an empty prompt's 96 tokens of template allowance plus max_tokens must fit.
    let tokens =
        |max_tokens: u32| workflow(json!({ "max_total_tokens": 500 }), json!([{ "id": "a", "type": "llm", "prompt": "", "max_tokens": max_tokens }]));
    assert_eq!(problems(&tokens(405))[0].field, "max_tokens");
    assert!(validate_json(&tokens(404), &registry()).is_ok(), "96 + 404 is exactly the limit");
}

#[test]
fn a_valid_budget_is_parsed_exactly_into_the_graph() {
    for cost in [json!("0.02"), json!(0.02)] {
        let graph = validate_json(
            &workflow(json!({ "max_cost_usd": cost, "max_total_tokens": 40_000 }), json!([{ "id": "a", "type": "llm", "prompt": "A" }])),
            &registry(),
        )
        .unwrap();
        assert_eq!(graph.budget(), BudgetLimits { max_cost: Some(Usd::from_pico(20_000_000_000)), max_total_tokens: Some(40_000) });
    }
    let graph = validate_json(&workflow(Value::Null, json!([{ "id": "a", "type": "llm", "prompt": "A" }])), &registry()).unwrap();
    assert!(graph.budget().is_unlimited());
}

// ---------------------------------------------------------------- property

/// How a scripted model call behaves.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    Ok,
    /// Throttled (no usage) this many times, then answers.
    Throttled(usize),
    /// A json step whose first reply is not JSON: charged, then retried with a hint.
    InvalidOnce,
    /// Never valid JSON: every attempt is charged and the step fails.
    AlwaysInvalid,
}

#[derive(Debug, Clone)]
struct Call {
    behaviour: Behaviour,
    max_tokens: u32,
    system: bool,
    /// Reported usage as percentages of the bounds: input of the estimate, output of max_tokens.
    input_pct: u64,
    output_pct: u64,
    latency_ms: u64,
}

#[derive(Debug, Clone)]
enum Kind {
    Llm(Call),
    Map { call: Call, items: usize, concurrency: u32 },
    Transform,
    Router { choose_first: bool },
}

#[derive(Debug, Clone)]
struct GenStep {
    kind: Kind,
    deps: Vec<usize>,
    required: bool,
    join_any: bool,
}

#[derive(Debug, Clone)]
struct Case {
    steps: Vec<GenStep>,
    model: &'static str,
    max_concurrency: u32,
    max_cost_pico: Option<u64>,
    max_total_tokens: Option<u64>,
}

fn arb_call() -> impl Strategy<Value = Call> {
    (
        prop_oneof![
            4 => Just(Behaviour::Ok),
            1 => (1usize..4).prop_map(Behaviour::Throttled),
            1 => Just(Behaviour::InvalidOnce),
            1 => Just(Behaviour::AlwaysInvalid),
        ],
        1u32..=300,
        any::<bool>(),
        prop_oneof![Just(100u64), 0u64..=100],
        prop_oneof![Just(100u64), 0u64..=100],
        0u64..40,
    )
        .prop_map(|(behaviour, max_tokens, system, input_pct, output_pct, latency_ms)| Call {
            behaviour,
            max_tokens,
            system,
            input_pct,
            output_pct,
            latency_ms,
        })
}

fn arb_case() -> impl Strategy<Value = Case> {
    let steps = (1usize..16).prop_flat_map(|n| {
        proptest::collection::vec(
            (
                prop_oneof![
                    6 => arb_call().prop_map(Kind::Llm),
                    2 => (arb_call(), 0usize..5, 1u32..5).prop_map(|(call, items, concurrency)| Kind::Map { call, items, concurrency }),
                    1 => Just(Kind::Transform),
                    1 => any::<bool>().prop_map(|choose_first| Kind::Router { choose_first }),
                ],
                proptest::collection::vec(any::<prop::sample::Index>(), 0..3),
                prop::bool::weighted(0.7),
                prop::bool::weighted(0.2),
            ),
            n,
        )
        .prop_map(|raw| {
            raw.into_iter()
                .enumerate()
                .map(|(i, (kind, picks, required, join_any))| {
                    let deps = pick_deps(i, &picks);
                    GenStep { kind, deps, required, join_any }
                })
                .collect::<Vec<_>>()
        })
    });
    // Every limit admits one call of any generated step on its own (a smaller one is a
    // validation error, tested above): with a system prompt, Nova Lite's 128 × 60,000 +
    // 300 × 240,000 pico-dollars and 128 + 300 tokens. Most runs then hit a limit somewhere.
    (
        steps,
        prop::sample::select(vec!["amazon.nova-micro-v1:0", "us.amazon.nova-lite-v1:0"]),
        1u32..6,
        prop::option::weighted(0.8, 79_680_000u64..400_000_000),
        prop::option::weighted(0.6, 428u64..4_000),
    )
        .prop_map(|(steps, model, max_concurrency, max_cost_pico, max_total_tokens)| Case {
            steps,
            model,
            max_concurrency,
            max_cost_pico,
            max_total_tokens,
        })
}

const SYSTEM: &str = "Be brief.";

fn prompt_prefix(i: usize, map: bool) -> String {
    if map { format!("M{i}.") } else { format!("P{i}.") }
}

fn step_json(i: usize, call: &Call, map: bool) -> Value {
    let prompt = if map { format!("{} {{{{ item }}}}", prompt_prefix(i, true)) } else { prompt_prefix(i, false) };
    let mut step = json!({ "type": "llm", "prompt": prompt, "max_tokens": call.max_tokens });
    if call.system {
        step["system"] = json!(SYSTEM);
    }
    if matches!(call.behaviour, Behaviour::InvalidOnce | Behaviour::AlwaysInvalid) {
        step["output"] = json!({ "format": "json" });
    }
    step
}

fn case_definition(case: &Case) -> Value {
    let steps = &case.steps;
    let deps: Vec<Vec<usize>> = steps.iter().map(|s| s.deps.clone()).collect();
    let routed = routed_targets(&deps, |d| matches!(steps[d].kind, Kind::Router { .. }));
    let json_steps: Vec<Value> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let step = match &s.kind {
                Kind::Llm(call) => step_json(i, call, false),
                Kind::Map { call, items, concurrency } => json!({
                    "type": "map",
                    "over": format!("{:?}", (0..*items).collect::<Vec<_>>()),
                    "max_concurrency": concurrency,
                    "on_item_failure": if s.join_any { "continue" } else { "fail" },
                    "step": step_json(i, call, true),
                }),
                Kind::Transform => json!({ "type": "transform", "expression": format!("{i} + 1") }),
                Kind::Router { choose_first } => router_json(routed.get(&i).map_or(&[][..], Vec::as_slice), *choose_first),
            };
            wire(step, i, &s.deps, s.required, s.join_any)
        })
        .collect();
    let mut budget = json!({});
    if let Some(pico) = case.max_cost_pico {
        budget["max_cost_usd"] = json!(Usd::from_pico(pico).to_string());
    }
    if let Some(tokens) = case.max_total_tokens {
        budget["max_total_tokens"] = json!(tokens);
    }
    json!({
        "name": "prop",
        "defaults": { "model": case.model, "retry": { "max_attempts": 3, "initial_backoff_ms": 10 } },
        "max_concurrency": case.max_concurrency,
        "budget": budget,
        "steps": json_steps
    })
}

/// Scripts whose reported usage stays within what the engine reserves: input at most the
/// estimate of the shortest prompt the step can send, output at most `max_tokens`.
fn case_scripts(case: &Case) -> Vec<Script> {
    let throttled = ModelError::new(ModelErrorKind::Throttled, "ThrottlingException", "slow down");
    case.steps
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let (call, map) = match &s.kind {
                Kind::Llm(call) => (call, false),
                Kind::Map { call, .. } => (call, true),
                _ => return None,
            };
            let prefix = prompt_prefix(i, map);
            let shortest = if map { format!("{prefix} 0") } else { prefix.clone() };
            let estimate = estimate_input_tokens(call.system.then_some(SYSTEM), &shortest);
            let input = estimate * call.input_pct / 100;
            let output = u64::from(call.max_tokens) * call.output_pct / 100;
            let script = match call.behaviour {
                Behaviour::Ok => Script::reply(&prefix, "ok"),
                Behaviour::Throttled(n) => Script::failing_first(&prefix, throttled.clone(), n, "ok"),
                Behaviour::InvalidOnce => Script::reply(&prefix, "not json").then(Ok("{\"ok\":1}".into())),
                Behaviour::AlwaysInvalid => Script::reply(&prefix, "never json"),
            };
            Some(script.with_usage(input, output).with_latency(Duration::from_millis(call.latency_ms)))
        })
        .collect()
}

/// Every budget refusal in the run's events: the data of each `STEP_FAILED` (and of each
/// failed map item) whose code is `BUDGET_EXCEEDED`.
fn refusals(events: &[Event]) -> Vec<Value> {
    let mut found = Vec::new();
    for e in events.iter().filter(|e| e.kind == EventType::StepFailed) {
        if let Some(budget) = e.data["detail"].get("budget") {
            found.push(budget.clone());
        }
    }
    for e in events.iter().filter(|e| matches!(e.kind, EventType::StepFailed | EventType::StepCompleted)) {
        for item in e.data["detail"]["failed"].as_array().into_iter().flatten() {
            if let Some(budget) = item["detail"].get("budget") {
                found.push(budget.clone());
            }
        }
    }
    found
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn a_budgeted_run_never_charges_more_than_its_limits(case in arb_case()) {
        let def = case_definition(&case);
        validate_json(&def, &registry()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let model = Arc::new(ScriptedModel::new(case_scripts(&case)));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        let (run, records, events) = runtime.block_on(async {
            let store = Arc::new(MemoryStore::new());
            let progress = Arc::new(MemoryProgress::new());
            let engine = Engine::new(model.clone(), store.clone(), progress.clone(), registry(), EngineConfig::default());
            let run = RunRecord::new("prop".parse().unwrap(), def, json!({}), "u".parse().unwrap(), vec![Principal::User("u".into())], Utc::now());
            store.create_run(&run).await.unwrap();
            let lease = Lease { holder: "r".into(), expires_at: Utc::now() + chrono::Duration::hours(1) };
            let Claim::Acquired(claimed) = store.claim(&run.id, &lease, Utc::now()).await.unwrap() else { panic!("claim failed") };
            engine.execute(*claimed, lease, None).await.unwrap();
            (store.get_run(&run.id).await.unwrap().unwrap(), store.get_steps(&run.id).await.unwrap(), progress.events(&run.id))
        });

        // The invariant: charged spend never exceeds a limit.
        if let Some(max) = case.max_cost_pico {
            prop_assert!(run.totals.cost.pico() <= max, "cost {} over {}", run.totals.cost.pico(), max);
        }
        if let Some(max) = case.max_total_tokens {
            prop_assert!(run.totals.total_tokens() <= max, "tokens {} over {}", run.totals.total_tokens(), max);
        }
        // One source of truth: the run's totals are exactly what its steps were charged,
        // and the last event reports the same.
        prop_assert!(run.status.is_terminal());
        prop_assert_eq!(records.len(), case.steps.len());
        let cost: u64 = records.iter().map(|r| r.cost.pico()).sum();
        let tokens: u64 = records.iter().map(|r| r.usage.total_tokens()).sum();
        prop_assert_eq!((run.totals.cost.pico(), run.totals.total_tokens()), (cost, tokens));
        let last = events.last().unwrap();
        prop_assert_eq!(&last.data["totals"]["cost_pico_usd"], &json!(cost));
        prop_assert_eq!(&last.data["totals"]["total_tokens"], &json!(tokens));
        prop_assert!(run.totals.model_calls <= model.calls().len() as u64);
        // Every refusal was a real one: what it needed did not fit beside the rest.
        let mut refused = 0;
        for budget in refusals(&events) {
            refused += 1;
            let part = |key: &str, unit: &str| budget[key][unit].as_u64().unwrap();
            let (limit, unit) = match budget["limit"].as_str().unwrap() {
                "max_cost_usd" => (budget["max_cost_pico_usd"].as_u64().unwrap(), "cost_pico_usd"),
                _ => (budget["max_total_tokens"].as_u64().unwrap(), "tokens"),
            };
            let needed = part("spent", unit) as u128 + part("reserved_by_others", unit) as u128 + part("attempted", unit) as u128;
            prop_assert!(needed > limit as u128, "refused though it fit: {}", budget);
        }
        if case.max_cost_pico.is_none() && case.max_total_tokens.is_none() {
            prop_assert_eq!(refused, 0);
        }
    }
}
