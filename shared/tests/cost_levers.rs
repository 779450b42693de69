//! Bedrock's cost levers in the engine: prompt caching placed automatically where calls
//! share a head, service tiers priced from the registry, native structured output, and
//! the labels every call carries for reconciliation. The model is the scripted one, which
//! reports cache usage the way Bedrock does (the longest marked prefix read when an
//! earlier call wrote it, else written).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::engine::EngineConfig;
use chainrun_core::estimate;
use chainrun_core::graph::validate_json;
use chainrun_core::ids::Principal;
use chainrun_core::memory::Script;
use chainrun_core::ports::{CachePoints, RunStore};
use chainrun_core::pricing::{ModelRegistry, ServiceTier, Usage};
use chainrun_core::run::{RunRecord, RunStatus, Totals};
use chrono::Utc;
use serde_json::{Value, json};
use std::sync::Arc;

mod support;

const HAIKU: &str = "global.anthropic.claude-haiku-4-5-20251001-v1:0";

/// A system prompt of about 6,000 tokens (Haiku 4.5 caches from 4,096).
fn long_rules() -> String {
    "Rule: answer in one short line, cite the ticket, never promise refunds. ".repeat(340)
}

fn triage(cache: &str) -> Value {
    json!({
        "name": "triage",
        "defaults": { "model": HAIKU, "max_tokens": 50 },
        "steps": [{
            "id": "answers", "type": "map", "over": "input.tickets", "max_concurrency": 1,
            "step": { "type": "llm", "system": long_rules(), "cache": cache, "prompt": "Ticket: {{ item }}" }
        }],
        "output": "{{ steps.answers.output | length }}"
    })
}

fn tickets(n: usize) -> Value {
    json!({ "tickets": (0..n).map(|i| format!("ticket {i}: my order is late")).collect::<Vec<_>>() })
}

/// A run's tokens as one usage, to price at a model's rates.
fn usage(t: &Totals) -> Usage {
    Usage {
        input_tokens: t.input_tokens,
        output_tokens: t.output_tokens,
        cache_read_tokens: t.cache_read_tokens,
        cache_write_tokens: t.cache_write_tokens,
    }
}

async fn execute(definition: Value, input: Value) -> (RunRecord, support::Harness) {
    run_with(definition, input, "noted").await
}

#[tokio::test]
async fn a_map_over_a_long_shared_system_prompt_writes_the_cache_once_and_reads_it_for_every_other_item() {
    let (run, h) = execute(triage("auto"), tickets(50)).await;
    assert_eq!(run.status, RunStatus::Completed, "{:?}", run.error);
    let calls = h.model.calls();
    assert_eq!(calls.len(), 50);
    assert!(
        calls.iter().all(|c| c.cache_points == CachePoints { after_system: true, prompt_head: None }),
        "the system prompt is marked on every call"
    );
    let system_tokens = (long_rules().len() as u64).div_ceil(4);
    assert_eq!(run.totals.cache_write_tokens, system_tokens, "written once");
    assert_eq!(run.totals.cache_read_tokens, 49 * system_tokens, "read by the 49 other items");

    let (plain, h_plain) = execute(triage("off"), tickets(50)).await;
    assert!(h_plain.model.calls().iter().all(|c| c.cache_points == CachePoints::default()));
    assert_eq!(plain.totals.cache_read_tokens + plain.totals.cache_write_tokens, 0);
    // The same work for far less: a read costs a tenth of input, the one write 1.25×.
    let (with, without) = (run.totals.cost.pico(), plain.totals.cost.pico());
    assert!(with * 100 < without * 25, "with caching {with} pico, without {without} pico");
    // Exactly: every figure is the registry's price times the reported tokens.
    let haiku = ModelRegistry::builtin().get(HAIKU).unwrap().into_owned();
    assert_eq!(Some(run.totals.cost), haiku.cost(&usage(&run.totals)));
}

#[tokio::test]
async fn a_single_call_or_a_short_prompt_is_not_marked_because_the_write_would_not_pay_off() {
    // One step alone: no other call reads what it would write.
    let single = json!({
        "name": "triage", "defaults": { "model": HAIKU, "max_tokens": 50 },
        "steps": [{ "id": "one", "type": "llm", "system": long_rules(), "prompt": "Ticket: {{ input.t }}" }]
    });
    let (done, h) = execute(single, json!({ "t": "x" })).await;
    assert_eq!(done.status, RunStatus::Completed);
    assert_eq!(h.model.calls()[0].cache_points, CachePoints::default());
    // A map whose shared head is below Haiku's 4,096-token minimum.
    let short = json!({
        "name": "triage", "defaults": { "model": HAIKU, "max_tokens": 50 },
        "steps": [{ "id": "m", "type": "map", "over": "input.tickets", "step": { "type": "llm", "system": "Be brief.", "prompt": "Ticket: {{ item }}" } }]
    });
    let (done, h) = execute(short, tickets(3)).await;
    assert_eq!(done.status, RunStatus::Completed);
    assert!(h.model.calls().iter().all(|c| c.cache_points == CachePoints::default()));
}

#[tokio::test]
async fn sibling_steps_with_the_same_system_prompt_share_its_cache_and_a_static_prompt_head_is_marked_too() {
    let handbook = format!("Handbook:\n{}\nNow the case: ", "Section: refunds take five days. ".repeat(700));
    let definition = json!({
        "name": "triage", "defaults": { "model": HAIKU, "max_tokens": 50 },
        "steps": [
            { "id": "classify", "type": "llm", "system": long_rules(), "prompt": format!("{handbook}{{{{ input.case }}}} (classify)") },
            { "id": "reply", "type": "llm", "depends_on": ["classify"], "system": long_rules(), "prompt": format!("{handbook}{{{{ input.case }}}} (reply)") }
        ]
    });
    let (done, h) = execute(definition, json!({ "case": "late order" })).await;
    assert_eq!(done.status, RunStatus::Completed, "{:?}", done.error);
    let calls = h.model.calls();
    assert!(
        calls.iter().all(|c| c.cache_points == CachePoints { after_system: true, prompt_head: Some(handbook.len()) }),
        "{:?}",
        calls[0].cache_points
    );
    let system = (long_rules().len() as u64).div_ceil(4);
    let both = (long_rules().len() as u64 + handbook.len() as u64).div_ceil(4);
    // The first writes system and handbook; the second reads both.
    assert_eq!(done.totals.cache_write_tokens, both);
    assert_eq!(done.totals.cache_read_tokens, both);
    assert!(both > system);
}

#[tokio::test]
async fn a_caching_step_is_reserved_and_estimated_at_the_cache_write_price() {
    let registry = ModelRegistry::builtin();
    let input = tickets(50);
    let graph = |cache| validate_json(&triage(cache), &registry).unwrap();
    let cached = estimate::estimate(&graph("auto"), &input, &registry, None);
    let plain = estimate::estimate(&graph("off"), &input, &registry, None);
    // Input is priced at 1.25× in the caching step's max (the write), never less.
    assert!(cached.max.cost > plain.max.cost);
    let (run, _) = execute(triage("auto"), input).await;
    assert!(run.totals.cost <= cached.max.cost, "{} within {}", run.totals.cost, cached.max.cost);
    assert!(run.totals.cost >= cached.min.cost);
}

#[tokio::test]
async fn a_flex_step_is_sent_in_its_tier_and_priced_at_the_tier_price() {
    let definition = json!({
        "name": "triage",
        "steps": [{ "id": "sum", "type": "llm", "model": "openai.gpt-oss-120b-1:0", "service_tier": "flex", "max_tokens": 100, "prompt": "Summarise {{ input.t }}" }]
    });
    let (done, h) = execute(definition, json!({ "t": "the week" })).await;
    assert_eq!(done.status, RunStatus::Completed, "{:?}", done.error);
    assert_eq!(h.model.calls()[0].service_tier, ServiceTier::Flex);
    let model = ModelRegistry::builtin().get("openai.gpt-oss-120b-1:0").unwrap().into_owned();
    let flex = model.in_tier(ServiceTier::Flex).unwrap();
    assert_eq!(Some(done.totals.cost), flex.cost(&usage(&done.totals)));
    assert_eq!(flex.cost(&usage(&done.totals)).unwrap().pico() * 2, model.cost(&usage(&done.totals)).unwrap().pico(), "half the standard price");
}

#[test]
fn a_tier_the_model_does_not_offer_is_refused_naming_the_step_and_the_offered_tiers() {
    let definition = json!({
        "name": "triage",
        "steps": [{ "id": "sum", "type": "llm", "model": HAIKU, "service_tier": "flex", "prompt": "x" }]
    });
    let problems = validate_json(&definition, &ModelRegistry::builtin()).unwrap_err().problems;
    assert_eq!(problems.len(), 1);
    assert_eq!((problems[0].step.as_deref(), problems[0].field.as_str()), (Some("sum"), "service_tier"));
    assert!(problems[0].message.contains("offers default"), "{}", problems[0].message);
    let bad = json!({ "name": "t", "steps": [{ "id": "s", "type": "llm", "model": HAIKU, "service_tier": "turbo", "prompt": "x" }] });
    assert!(validate_json(&bad, &ModelRegistry::builtin()).is_err());
}

#[tokio::test]
async fn a_json_step_with_a_schema_asks_a_model_that_has_structured_output_for_it_natively() {
    let schema = json!({ "type": "object", "properties": { "label": { "type": "string" } }, "required": ["label"] });
    let step = |model: &str| {
        json!({
            "name": "triage",
            "steps": [{ "id": "c", "type": "llm", "model": model, "max_tokens": 50, "prompt": "Classify {{ input.t }}", "output": { "format": "json", "schema": schema } }]
        })
    };
    let (done, h) = run_with(step(HAIKU), json!({ "t": "x" }), r#"{"label":"late"}"#).await;
    assert_eq!(done.status, RunStatus::Completed, "{:?}", done.error);
    assert_eq!(h.model.calls()[0].output_schema.as_ref(), Some(&schema));
    // Nova Micro has no structured output: the schema is only checked on the reply.
    let (done, h) = run_with(step("amazon.nova-micro-v1:0"), json!({ "t": "x" }), r#"{"label":"late"}"#).await;
    assert_eq!(done.status, RunStatus::Completed);
    assert_eq!(h.model.calls()[0].output_schema, None);
    // A native reply that still breaks the schema is retried with the hint, as before.
    let (done, h) = run_with(step(HAIKU), json!({ "t": "x" }), r#"{"nope":1}"#).await;
    assert_eq!(done.status, RunStatus::Failed);
    assert!(h.model.calls().len() > 1, "validated and retried");
}

async fn run_with(definition: Value, input: Value, reply: &str) -> (RunRecord, support::Harness) {
    let h = support::harness_with(vec![Script::reply("", reply)], Arc::new(ModelRegistry::builtin()), EngineConfig::default());
    let run =
        RunRecord::new("triage".parse().unwrap(), definition, input, "alice".parse().unwrap(), vec![Principal::User("alice".into())], Utc::now());
    h.store.create_run(&run).await.unwrap();
    let lease = support::lease("runner-1");
    let chainrun_core::ports::Claim::Acquired(claimed) = h.store.claim(&run.id, &lease, Utc::now()).await.unwrap() else { panic!("claim failed") };
    h.engine.execute(*claimed, lease, None).await.unwrap();
    let stored = h.store.get_run(&run.id).await.unwrap().unwrap();
    (stored, h)
}

#[tokio::test]
async fn every_call_carries_the_run_workflow_owner_step_and_item_for_reconciliation() {
    let (done, h) = execute(triage("auto"), tickets(2)).await;
    let calls = h.model.calls();
    for (item, call) in calls.iter().enumerate() {
        let labels = &call.metadata;
        assert_eq!(labels.get("chainrun_run"), Some(&done.id.to_string()));
        assert_eq!(labels.get("chainrun_workflow").map(String::as_str), Some("triage"));
        assert_eq!(labels.get("chainrun_owner").map(String::as_str), Some("alice"));
        assert_eq!(labels.get("chainrun_step").map(String::as_str), Some("answers"));
        assert_eq!(labels.get("chainrun_item"), Some(&item.to_string()));
    }
}

#[test]
fn a_flex_step_is_reserved_at_the_default_price_because_it_is_billed_in_the_tier_that_served_it() {
    // gpt-oss-120b: output $0.0006/1K by default, $0.0003/1K in flex. 1,000 tokens out
    // reserve $0.0006 (plus the prompt's allowance): a $0.0005 budget can never admit a call.
    let definition = |budget: &str| {
        json!({
            "name": "triage", "budget": { "max_cost_usd": budget },
            "steps": [{ "id": "sum", "type": "llm", "model": "openai.gpt-oss-120b-1:0", "service_tier": "flex", "max_tokens": 1000, "prompt": "x" }]
        })
    };
    let registry = ModelRegistry::builtin();
    let problems = validate_json(&definition("0.0005"), &registry).unwrap_err().problems;
    assert!(problems.iter().any(|p| p.step.as_deref() == Some("sum") && p.message.contains("reserves at least")), "{problems:?}");
    assert!(validate_json(&definition("0.0007"), &registry).is_ok());
}
