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
