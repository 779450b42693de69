//! The response cache (`cache: "response"`): its store contract on the in-memory adapter
//! and on DynamoDB (a moto server, opt-in with `CHAINRUN_MOTO=1`), and what the engine does
//! with it: an identical earlier call's reply is reused free, marked as a hit, never across
//! tenants, never after it expired, and only for deterministic steps.
#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::analytics::RunRollup;
use chainrun_core::aws::DynamoResponses;
use chainrun_core::engine::EngineConfig;
use chainrun_core::graph::validate_json;
use chainrun_core::ids::Principal;
use chainrun_core::memory::{MemoryResponses, Script};
use chainrun_core::ports::{Claim, ResponseCache, RunStore};
use chainrun_core::pricing::{ModelRegistry, Usage};
use chainrun_core::responses::CachedReply;
use chainrun_core::run::{RunRecord, RunStatus, StepRecord, StepStatus};
use chrono::{Duration, TimeZone, Utc};
use serde_json::{Value, json};
use std::sync::Arc;

mod support;

#[path = "support/moto.rs"]
mod moto;

fn reply(text: &str) -> CachedReply {
    CachedReply {
        text: text.into(),
        usage: Usage { input_tokens: 120, output_tokens: 30, ..Usage::default() },
        stored_at: Utc.with_ymd_and_hms(2026, 12, 6, 12, 0, 0).unwrap(),
    }
}

async fn contract(cache: Arc<dyn ResponseCache>) {
    let alice = Principal::User("alice".into());
    let bob = Principal::User("bob".into());
    let now = Utc.with_ymd_and_hms(2026, 12, 6, 12, 0, 0).unwrap();
    assert_eq!(cache.get(&alice, "k1", now).await.unwrap(), None, "nothing stored yet");
    cache.put(&alice, "k1", &reply("first"), now + Duration::hours(24)).await.unwrap();
    assert_eq!(cache.get(&alice, "k1", now).await.unwrap(), Some(reply("first")));
    assert_eq!(cache.get(&bob, "k1", now).await.unwrap(), None, "another tenant never reads it");
    assert_eq!(cache.get(&Principal::Public, "k1", now).await.unwrap(), None);
    assert_eq!(cache.get(&alice, "k2", now).await.unwrap(), None, "another key");
    assert_eq!(cache.get(&alice, "k1", now + Duration::hours(24)).await.unwrap(), None, "expired at its TTL");
    cache.put(&alice, "k1", &reply("second"), now + Duration::hours(48)).await.unwrap();
    assert_eq!(cache.get(&alice, "k1", now + Duration::hours(30)).await.unwrap(), Some(reply("second")), "a later put replaces it");
}

#[tokio::test]
async fn memory_responses_keep_the_contract() {
    contract(Arc::new(MemoryResponses::default())).await;
}

#[tokio::test]
async fn dynamodb_responses_keep_the_contract() {
    let Some((_moto, client, tables)) = moto::moto_with_tables("dynamodb_responses_keep_the_contract").await else { return };
    contract(Arc::new(DynamoResponses::new(client, tables))).await;
}

const SUMMARY: &str = "the order is late; apologise";

fn deterministic(extra: Value) -> Value {
    let mut step = json!({ "id": "classify", "type": "llm", "model": "amazon.nova-micro-v1:0", "temperature": 0.0, "cache": "response",
                           "max_tokens": 60, "prompt": "Classify: {{ input.ticket }}" });
    if let (Some(step), Some(extra)) = (step.as_object_mut(), extra.as_object()) {
        step.extend(extra.clone());
    }
    json!({ "name": "triage", "budget": { "max_cost_usd": "0.01" }, "steps": [step] })
}

/// Runs `definition` for `caller` on an engine sharing `cache`; the run and how many calls
/// the model got.
async fn run(cache: &Arc<MemoryResponses>, ttl: Duration, definition: Value, input: Value, caller: &str) -> (Ran, usize) {
    let h = support::harness_with(vec![Script::reply("", SUMMARY)], Arc::new(ModelRegistry::builtin()), EngineConfig::default());
    let engine = h.engine.with_response_cache(cache.clone(), ttl);
    let run = RunRecord::new("triage".parse().unwrap(), definition, input, caller.parse().unwrap(), vec![Principal::User(caller.into())], Utc::now());
    h.store.create_run(&run).await.unwrap();
    let lease = support::lease("runner-1");
    let Claim::Acquired(claimed) = h.store.claim(&run.id, &lease, Utc::now()).await.unwrap() else { panic!("claim failed") };
    engine.execute(*claimed, lease, None).await.unwrap();
    let ran = Ran { run: h.store.get_run(&run.id).await.unwrap().unwrap(), steps: h.store.get_steps(&run.id).await.unwrap() };
    (ran, h.model.calls().len())
}

/// A finished run and its step checkpoints.
struct Ran {
    run: RunRecord,
    steps: Vec<StepRecord>,
}

#[tokio::test]
async fn an_identical_deterministic_call_is_answered_from_the_cache_free_and_marked_as_a_hit() {
    let cache = Arc::new(MemoryResponses::default());
    let input = json!({ "ticket": "where is my parcel?" });
    let (first, calls) = run(&cache, Duration::hours(24), deterministic(json!({})), input.clone(), "alice").await;
    assert_eq!((first.run.status, calls), (RunStatus::Completed, 1));
    assert!(first.run.totals.cost.pico() > 0);
    assert_eq!(cache.len(), 1, "the accepted reply is kept");

    let (second, calls) = run(&cache, Duration::hours(24), deterministic(json!({})), input.clone(), "alice").await;
    assert_eq!((second.run.status, calls), (RunStatus::Completed, 0), "no model call");
    assert_eq!(second.run.output, first.run.output);
    assert_eq!((second.run.totals.cost.pico(), second.run.totals.model_calls), (0, 0), "free, and no call counted");
    assert_eq!(second.run.totals.input_tokens + second.run.totals.output_tokens, 0);
    let step = &second.steps[0];
    assert_eq!((step.status, step.attempts), (StepStatus::Completed, 0));
    let detail = step.detail.as_ref().expect("the hit is recorded in the checkpoint");
    assert_eq!(detail["response_cache"], "hit");
    assert_eq!(detail["saved_output_tokens"], json!((SUMMARY.len() as u64).div_ceil(4)));
    // The cost analytics count the answer, at no cost, and say it was reused.
    let rollup = RunRollup::of(&second.run, &second.steps).expect("a finished run rolls up");
    assert_eq!((rollup.steps[0].sums.runs, rollup.steps[0].sums.cached, rollup.steps[0].sums.cost.pico()), (1, 1, 0));
    assert_eq!(rollup.run.cached, 1);

    // Anything that shapes the reply is another call: another prompt, another parameter.
    let (_, calls) = run(&cache, Duration::hours(24), deterministic(json!({})), json!({ "ticket": "refund?" }), "alice").await;
    assert_eq!(calls, 1);
    let (_, calls) = run(&cache, Duration::hours(24), deterministic(json!({ "max_tokens": 61 })), input, "alice").await;
    assert_eq!(calls, 1);
}

#[tokio::test]
async fn a_cached_reply_is_never_shared_across_tenants_or_used_after_its_ttl() {
    let cache = Arc::new(MemoryResponses::default());
    let input = json!({ "ticket": "where is my parcel?" });
    run(&cache, Duration::hours(24), deterministic(json!({})), input.clone(), "alice").await;
    let (_, calls) = run(&cache, Duration::hours(24), deterministic(json!({})), input.clone(), "bob").await;
    assert_eq!(calls, 1, "bob's tenant has its own entries");
    // Kept for no time at all: expired before the next run reads it.
    let fresh = Arc::new(MemoryResponses::default());
    run(&fresh, Duration::zero(), deterministic(json!({})), input.clone(), "alice").await;
    let (_, calls) = run(&fresh, Duration::zero(), deterministic(json!({})), input, "alice").await;
    assert_eq!(calls, 1);
}

#[tokio::test]
async fn a_map_reuses_replies_for_repeated_items_and_counts_them() {
    let cache = Arc::new(MemoryResponses::default());
    let definition = json!({ "name": "triage", "steps": [{ "id": "each", "type": "map", "over": "input.tickets", "max_concurrency": 1,
        "step": { "type": "llm", "model": "amazon.nova-micro-v1:0", "temperature": 0.0, "cache": "response", "max_tokens": 60, "prompt": "Classify: {{ item }}" } }] });
    let input = json!({ "tickets": ["late", "broken", "late", "late"] });
    let (done, calls) = run(&cache, Duration::hours(24), definition, input, "alice").await;
    assert_eq!((done.run.status, calls), (RunStatus::Completed, 2), "two distinct items called, two repeats reused");
    let detail = done.steps[0].detail.as_ref().unwrap();
    assert_eq!((detail["items"].as_u64(), detail["cached"].as_u64()), (Some(4), Some(2)));
    assert_eq!(done.run.totals.model_calls, 2);
    let rollup = RunRollup::of(&done.run, &done.steps).expect("a finished run rolls up");
    assert_eq!((rollup.steps[0].sums.runs, rollup.steps[0].sums.cached), (1, 2));
}

#[test]
fn only_a_deterministic_step_may_reuse_replies() {
    let registry = ModelRegistry::builtin();
    for temperature in [json!(null), json!(0.7)] {
        let problems = validate_json(&deterministic(json!({ "temperature": temperature })), &registry).unwrap_err().problems;
        assert_eq!(problems.len(), 1);
        assert_eq!((problems[0].step.as_deref(), problems[0].field.as_str()), (Some("classify"), "cache"));
        assert!(problems[0].message.contains("temperature"), "{}", problems[0].message);
    }
    assert!(validate_json(&deterministic(json!({})), &registry).is_ok());
}

/// A response cache that cannot answer: every read and write fails.
struct Unreachable;

#[async_trait::async_trait]
impl ResponseCache for Unreachable {
    async fn get(&self, _: &Principal, _: &str, _: chrono::DateTime<Utc>) -> Result<Option<CachedReply>, chainrun_core::ports::StoreError> {
        Err(chainrun_core::ports::StoreError::Unavailable("the table is throttled".into()))
    }

    async fn put(&self, _: &Principal, _: &str, _: &CachedReply, _: chrono::DateTime<Utc>) -> Result<(), chainrun_core::ports::StoreError> {
        Err(chainrun_core::ports::StoreError::Unavailable("the table is throttled".into()))
    }
}

#[tokio::test]
async fn a_cache_that_cannot_answer_is_a_miss_and_never_fails_the_step() {
    let h = support::harness_with(vec![Script::reply("", SUMMARY)], Arc::new(ModelRegistry::builtin()), EngineConfig::default());
    let engine = h.engine.with_response_cache(Arc::new(Unreachable), Duration::hours(24));
    let run = RunRecord::new(
        "triage".parse().unwrap(),
        deterministic(json!({})),
        json!({ "ticket": "x" }),
        "alice".parse().unwrap(),
        vec![Principal::User("alice".into())],
        Utc::now(),
    );
    h.store.create_run(&run).await.unwrap();
    let lease = support::lease("runner-1");
    let Claim::Acquired(claimed) = h.store.claim(&run.id, &lease, Utc::now()).await.unwrap() else { panic!("claim failed") };
    engine.execute(*claimed, lease, None).await.unwrap();
    let done = h.store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!((done.status, h.model.calls().len()), (RunStatus::Completed, 1), "{:?}", done.error);
}

#[test]
fn an_estimate_keeps_the_call_in_max_and_gives_a_step_that_may_hit_no_min() {
    let registry = ModelRegistry::builtin();
    let input = json!({ "ticket": "x" });
    let estimate_of = |cache: &str| {
        let graph = validate_json(&deterministic(json!({ "cache": cache })), &registry).unwrap();
        chainrun_core::estimate::estimate(&graph, &input, &registry, None)
    };
    let (cached, plain) = (estimate_of("response"), estimate_of("off"));
    assert_eq!(cached.max, plain.max, "a hit only ever costs less: max assumes the call");
    assert!(plain.min.cost.pico() > 0);
    assert_eq!(cached.min.cost.pico(), 0, "an earlier identical call may answer it for nothing");
}
