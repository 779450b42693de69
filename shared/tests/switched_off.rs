//! A step switched off in its definition (`enabled: false`) is skipped exactly as a step
//! its router did not choose: what needs it (`join: all`) is skipped too, `join: any`
//! may still run, and nothing of it is charged or estimated.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::engine::EngineConfig;
use chainrun_core::estimate::estimate;
use chainrun_core::graph::validate_json;
use chainrun_core::ids::Principal;
use chainrun_core::memory::Script;
use chainrun_core::ports::{Claim, RunStore};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::run::{EventType, RunRecord, RunStatus, StepStatus};
use chrono::Utc;
use serde_json::{Value, json};
use std::sync::Arc;

mod support;

fn workflow(steps: Value) -> Value {
    json!({ "name": "off", "defaults": { "model": "amazon.nova-micro-v1:0", "retry": { "max_attempts": 1 } }, "steps": steps })
}

fn steps(draft_enabled: bool) -> Value {
    workflow(json!([
        { "id": "draft", "type": "llm", "prompt": "DRAFT", "enabled": draft_enabled },
        { "id": "polish", "type": "llm", "prompt": "POLISH {{ steps.draft.text }}" },
        { "id": "plain", "type": "llm", "prompt": "PLAIN" },
        { "id": "report", "type": "transform", "join": "any", "template": "{{ steps.polish.text or steps.plain.text }}" }
    ]))
}

#[tokio::test(start_paused = true)]
async fn a_switched_off_step_is_skipped_with_its_join_all_dependents_and_join_any_still_runs() {
    let h = support::harness_with(
        vec![Script::reply("DRAFT", "d"), Script::reply("POLISH", "p"), Script::reply("PLAIN", "plain text")],
        Arc::new(ModelRegistry::builtin()),
        EngineConfig::default(),
    );
    let run =
        RunRecord::new("off".parse().unwrap(), steps(false), json!({}), "alice".parse().unwrap(), vec![Principal::User("alice".into())], Utc::now());
    h.store.create_run(&run).await.unwrap();
    let lease = support::lease("runner-1");
    let Claim::Acquired(claimed) = h.store.claim(&run.id, &lease, Utc::now()).await.unwrap() else { panic!("claim failed") };
    h.engine.execute(*claimed, lease, None).await.unwrap();

    let stored = h.store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Completed, "a switched-off step does not fail the run");
    let status: std::collections::BTreeMap<String, StepStatus> =
        h.store.get_steps(&run.id).await.unwrap().into_iter().map(|s| (s.step_id.to_string(), s.status)).collect();
    assert_eq!((status["draft"], status["polish"]), (StepStatus::Skipped, StepStatus::Skipped));
    assert_eq!((status["plain"], status["report"]), (StepStatus::Completed, StepStatus::Completed));
    assert_eq!((h.model.calls_matching("DRAFT"), h.model.calls_matching("POLISH")), (0, 0), "no model call for either");
    assert_eq!(stored.output, Some(json!({ "report": "plain text" })));

    let events = h.progress.events(&run.id);
    let skipped: Vec<(String, Value)> = events
        .iter()
        .filter(|e| e.kind == EventType::StepSkipped)
        .map(|e| (e.step_id.as_ref().unwrap().to_string(), e.data["reason"].clone()))
        .collect();
    assert_eq!(skipped, vec![("draft".into(), json!("switched off (enabled: false)")), ("polish".into(), json!("dependency draft is skipped"))]);
}

#[test]
fn the_estimate_counts_nothing_for_a_switched_off_step_or_what_cannot_run_without_it() {
    let models = ModelRegistry::builtin();
    let on = estimate(&validate_json(&steps(true), &models).unwrap(), &json!({}), &models, None);
    let off = estimate(&validate_json(&steps(false), &models).unwrap(), &json!({}), &models, None);
    let step_max = |e: &chainrun_core::estimate::Estimate, id: &str| e.steps.iter().find(|s| s.step_id.as_str() == id).unwrap().max;
    assert!(step_max(&on, "draft").cost.pico() > 0 && step_max(&on, "polish").cost.pico() > 0);
    for id in ["draft", "polish"] {
        assert_eq!(step_max(&off, id).cost.pico(), 0, "{id}");
        assert_eq!(step_max(&off, id).tokens, 0, "{id}");
    }
    assert_eq!(step_max(&off, "plain"), step_max(&on, "plain"));
    assert_eq!(off.max.cost.pico(), step_max(&off, "plain").cost.pico());
}

#[test]
fn enabled_is_a_boolean_of_a_step_and_not_of_a_maps_item_step() {
    let models = ModelRegistry::builtin();
    let wrong_type = workflow(json!([{ "id": "a", "type": "llm", "prompt": "x", "enabled": "no" }]));
    let problems = validate_json(&wrong_type, &models).unwrap_err().to_string();
    assert!(problems.contains('a') && problems.contains("boolean"), "{problems}");
    let in_map = workflow(json!([{ "id": "m", "type": "map", "over": "input.list", "step": { "type": "llm", "prompt": "x", "enabled": false } }]));
    let problems = validate_json(&in_map, &models).unwrap_err().to_string();
    assert!(problems.contains("enabled"), "{problems}");
    // `true` is what a step is without it.
    let on = validate_json(&workflow(json!([{ "id": "a", "type": "llm", "prompt": "x", "enabled": true }])), &models).unwrap();
    assert!(on.steps()[0].enabled);
}
