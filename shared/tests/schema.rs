//! The published JSON Schema stays in sync with the types and describes real definitions.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use serde_json::{Value, json};

fn published() -> Value {
    serde_json::from_str(include_str!("../../schemas/workflow.schema.json")).unwrap()
}

#[test]
fn the_checked_in_schema_matches_the_types() {
    let generated: Value = serde_json::from_str(&chainrun_core::workflow::schema_json()).unwrap();
    assert!(
        generated == published(),
        "schemas/workflow.schema.json is stale: run `cargo run -q -p chainrun-core --example workflow_schema > schemas/workflow.schema.json`"
    );
}

fn validator() -> jsonschema::Validator {
    jsonschema::validator_for(&published()).unwrap()
}

#[test]
fn the_sample_workflows_match_the_schema() {
    let sample: Value = serde_json::from_str(include_str!("../../infra/samples/feedback-analysis.json")).unwrap();
    let v = validator();
    let errors: Vec<String> = v.iter_errors(&sample["workflow"]).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}");
    let every_kind = json!({
        "name": "all-kinds",
        "defaults": { "model": "amazon.nova-micro-v1:0" },
        "max_concurrency": 4,
        "steps": [
            { "id": "extract", "type": "llm", "prompt": "x", "output": { "format": "json", "schema": { "type": "object" } } },
            { "id": "route", "type": "router", "routes": [{ "when": "true", "to": ["a"] }], "default": ["b"] },
            { "id": "a", "type": "transform", "depends_on": ["route"], "template": "{{ input.x }}" },
            { "id": "b", "type": "transform", "depends_on": ["route"], "expression": "1 + 1" },
            { "id": "each", "type": "map", "over": "steps.extract.output.issues", "on_item_failure": "continue",
              "step": { "type": "llm", "prompt": "{{ item }}" } }
        ],
        "output": "{{ steps.a.output }}"
    });
    let errors: Vec<String> = v.iter_errors(&every_kind).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}");
}

#[test]
fn the_schema_rejects_typos_and_unknown_types() {
    let v = validator();
    let typo = json!({ "name": "t", "steps": [{ "id": "a", "type": "llm", "promt": "x" }] });
    assert!(!v.is_valid(&typo));
    let unknown = json!({ "name": "t", "steps": [{ "id": "a", "type": "teleport" }] });
    assert!(!v.is_valid(&unknown));
}

mod support;

fn published_events() -> Value {
    serde_json::from_str(include_str!("../../schemas/event.schema.json")).unwrap()
}

#[test]
fn the_checked_in_event_schema_matches_the_types() {
    let generated: Value = serde_json::from_str(&chainrun_core::wire::events::schema_json()).unwrap();
    assert!(
        generated == published_events(),
        "schemas/event.schema.json is stale: run `cargo run -q -p chainrun-core --no-default-features --example event_schema > schemas/event.schema.json`"
    );
}

/// Runs that between them produce every event type the engine writes today, and every
/// kind of step detail, then checks each event as the API returns it against the schema.
#[tokio::test(start_paused = true)]
async fn every_event_a_run_writes_matches_the_published_schema() {
    use chainrun_core::engine::EngineConfig;
    use chainrun_core::ids::Principal;
    use chainrun_core::memory::Script;
    use chainrun_core::ports::{Claim, ModelError, ModelErrorKind, RunStore};
    use chainrun_core::pricing::ModelRegistry;
    use chainrun_core::run::{EventType, RunRecord};
    use std::collections::BTreeSet;
    use std::sync::Arc;

    let throttled = ModelError::new(ModelErrorKind::Throttled, "ThrottlingException", "slow down");
    let scripts = vec![
        Script::failing_first("classify", throttled, 1, r#"{"label": "negative"}"#),
        Script::reply("stream", "a streamed reply that is long enough to flush"),
        Script::reply("fix", "a fix").with_usage(10, 5),
        Script::reply("broken", "not json"),
        Script::reply("pay", "paid").with_usage(1000, 5),
    ];
    let config = EngineConfig { stream_flush_bytes: 8, ..EngineConfig::default() };
    let h = support::harness_with(scripts, Arc::new(ModelRegistry::builtin()), config);
    let defaults = json!({ "model": "amazon.nova-micro-v1:0", "retry": { "max_attempts": 2, "initial_backoff_ms": 10 } });
    let completing = json!({
        "name": "every-event", "defaults": defaults,
        "steps": [
            { "id": "classify", "type": "llm", "prompt": "classify", "output": { "format": "json" } },
            { "id": "talk", "type": "llm", "prompt": "stream", "stream": true },
            { "id": "route", "type": "router", "routes": [{ "when": "steps.classify.output.label == 'negative'", "to": ["sorry"] }], "default": ["thanks"] },
            { "id": "sorry", "type": "transform", "depends_on": ["route"], "template": "sorry" },
            { "id": "thanks", "type": "transform", "depends_on": ["route"], "template": "thanks" },
            { "id": "each", "type": "map", "over": "input.issues", "on_item_failure": "continue", "step": { "type": "llm", "prompt": "fix {{ item }}" } }
        ]
    });
    let failing = json!({
        "name": "failing", "defaults": defaults,
        "steps": [
            { "id": "broken", "type": "llm", "prompt": "broken", "output": { "format": "json" } },
            { "id": "after", "type": "transform", "depends_on": ["broken"], "template": "x" }
        ]
    });
    let refused = json!({
        "name": "refused", "defaults": defaults, "budget": { "max_total_tokens": 500 },
        "steps": [
            { "id": "each", "type": "map", "over": "input.issues", "max_concurrency": 1, "on_item_failure": "continue",
              "step": { "type": "llm", "prompt": "pay {{ item }}", "max_tokens": 10 } },
            { "id": "more", "type": "llm", "depends_on": ["each"], "prompt": "pay more", "max_tokens": 10 }
        ]
    });
    let validator = jsonschema::validator_for(&published_events()).unwrap();
    let mut seen = BTreeSet::new();
    let mut refusals = 0;
    for definition in [completing, failing, refused] {
        let run = RunRecord::new(
            "t".parse().unwrap(),
            definition,
            json!({ "issues": ["a", "b"] }),
            "alice".parse().unwrap(),
            vec![Principal::User("alice".into())],
            chrono::Utc::now(),
        );
        h.store.create_run(&run).await.unwrap();
        let lease = support::lease("r");
        let Claim::Acquired(run) = h.store.claim(&run.id, &lease, chrono::Utc::now()).await.unwrap() else { panic!("claim") };
        h.engine.execute(*run.clone(), lease, None).await.unwrap();
        for event in h.progress.events(&run.id) {
            let wire = serde_json::to_value(&event).unwrap();
            let errors: Vec<String> = validator.iter_errors(&wire).map(|e| format!("{e} at {}", e.instance_path())).collect();
            assert!(errors.is_empty(), "{:?} does not match the schema: {errors:?}\n{wire:#}", event.kind);
            seen.insert(format!("{:?}", event.kind));
            refusals += wire.to_string().matches("\"limit\":\"max_total_tokens\"").count();
        }
    }
    for kind in [
        EventType::RunStarted,
        EventType::StepStarted,
        EventType::Streaming,
        EventType::MapProgress,
        EventType::StepRetrying,
        EventType::StepSkipped,
        EventType::StepCompleted,
        EventType::StepFailed,
        EventType::RunCompleted,
        EventType::RunFailed,
    ] {
        assert!(seen.contains(&format!("{kind:?}")), "no {kind:?} event was checked: {seen:?}");
    }
    assert!(refusals >= 2, "a budget refusal on a map item and on a step: {refusals}");
}
