//! `input` steps in definitions: what validation accepts, what it refuses (naming the step
//! and field), and what the estimate counts for their free-text extraction.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::budget::{Amount, estimate_input_tokens, worst_case};
use chainrun_core::estimate::estimate;
use chainrun_core::graph::{OnTimeout, Problem, StepKind, validate_json};
use chainrun_core::ids::Principal;
use chainrun_core::input::MAX_TEXT_CHARS;
use chainrun_core::pricing::ModelRegistry;
use serde_json::{Value, json};

fn wf(steps: Value) -> Value {
    json!({ "name": "t", "defaults": { "model": "amazon.nova-micro-v1:0" }, "steps": steps })
}

fn problems(v: Value) -> Vec<Problem> {
    validate_json(&v, &ModelRegistry::builtin()).unwrap_err().problems
}

fn fields() -> Value {
    json!({ "type": "object",
            "properties": { "account_id": { "type": "string", "pattern": "^AC-[0-9]{6}$" }, "plan": { "enum": ["free", "pro"] } },
            "required": ["account_id"] })
}

fn at(p: &[Problem]) -> Vec<(Option<&str>, &str)> {
    p.iter().map(|p| (p.step.as_deref(), p.field.as_str())).collect()
}

#[test]
fn an_input_step_reads_what_it_asks_names_who_answers_and_defaults_its_attempts() {
    let g = validate_json(
        &wf(json!([
            { "id": "draft", "type": "llm", "prompt": "x" },
            { "id": "account", "type": "input", "ask": "About {{ steps.draft.text }}?", "fields": fields(),
              "from": ["user:bob", "group:support"], "extract": { "max_tokens": 200 }, "timeout": "2d" }
        ])),
        &ModelRegistry::builtin(),
    )
    .unwrap();
    assert_eq!(g.steps()[1].deps, vec![0], "what it asks is a dependency");
    let StepKind::Input(spec) = &g.steps()[1].kind else { panic!("an input step") };
    assert_eq!(spec.from, vec![Principal::User("bob".into()), Principal::Group("support".into())]);
    assert_eq!(spec.max_attempts, 3);
    let extract = spec.extract.as_ref().unwrap();
    assert_eq!((extract.model.as_str(), extract.max_tokens), ("amazon.nova-micro-v1:0", 200), "the model defaults to defaults.model");
    assert!(matches!(spec.timeout, Some((_, OnTimeout::Reject))), "a deadline fails the step by default");
    assert_eq!(spec.fields.names().collect::<Vec<_>>(), ["account_id", "plan"]);
    let starter = "alice".parse().unwrap();
    assert_eq!(spec.answerers(&starter, Some(0)), vec![Principal::User("bob".into()), Principal::Group("support".into())]);
    let plain = validate_json(&wf(json!([{ "id": "a", "type": "input", "ask": "x", "fields": fields() }])), &ModelRegistry::builtin()).unwrap();
    let StepKind::Input(spec) = &plain.steps()[0].kind else { panic!("an input step") };
    assert_eq!((spec.answerers(&starter, None), spec.extract.is_none()), (vec![Principal::User("alice".into())], true), "the starter answers");
}

#[test]
fn rejects_malformed_input_steps_naming_each_field() {
    let p = problems(wf(json!([
        { "id": "a", "type": "input", "ask": "{{ steps.ghost.text }}", "fields": { "type": "array" }, "from": ["bob"] },
        { "id": "b", "type": "input", "ask": "x", "fields": { "type": "object", "properties": { "n": { "type": "nope" } }, "required": ["n", "m"] },
          "max_attempts": 11, "extract": { "model": "acme.gpt-9" } },
        { "id": "c", "type": "input", "ask": "x", "fields": fields(), "timeout": "1h", "on_timeout": "approve" },
        { "id": "d", "type": "input", "ask": "x", "fields": fields(), "timeout": "1h",
          "on_timeout": { "escalate_to": ["user:x"], "timeout": "1h", "then": "approve" } },
        { "id": "e", "type": "input", "ask": "x", "fields": fields(), "extract": { "max_tokens": 0 }, "max_attempts": 0 },
        { "id": "f", "type": "input", "ask": "x", "fields": fields(), "on_timeout": "reject", "colour": "red" },
        { "id": "g", "type": "input", "fields": fields() }
    ])));
    let at = at(&p);
    for expected in [
        (Some("a"), "ask"),
        (Some("a"), "fields.type"),
        (Some("a"), "fields.properties"),
        (Some("a"), "from[0]"),
        (Some("b"), "fields.properties.n"),
        (Some("b"), "fields.required[1]"),
        (Some("b"), "max_attempts"),
        (Some("b"), "extract.model"),
        (Some("c"), "on_timeout"),
        (Some("d"), "on_timeout"),
        (Some("e"), "extract.max_tokens"),
        (Some("e"), "max_attempts"),
        (Some("f"), "step"),
        (Some("g"), "step"),
    ] {
        assert!(at.contains(&expected), "{expected:?} not in {p:?}");
    }
    let approve = p.iter().find(|p| p.step.as_deref() == Some("c")).unwrap();
    assert!(approve.message.contains("nothing was given to approve"), "{}", approve.message);
    assert!(!at.contains(&(Some("b"), "fields.required[0]")), "n is declared: {p:?}");
}

#[test]
fn an_input_step_needs_its_deadline_for_on_timeout_and_a_model_for_extract() {
    let p = problems(json!({ "name": "t", "steps": [
        { "id": "a", "type": "input", "ask": "x", "fields": fields(), "on_timeout": "reject" },
        { "id": "b", "type": "input", "ask": "x", "fields": fields(), "extract": {} }
    ]}));
    assert_eq!(at(&p), [(Some("a"), "on_timeout"), (Some("b"), "extract.model")]);
}

#[test]
fn the_estimate_counts_every_extraction_an_input_step_may_make() {
    let models = ModelRegistry::builtin();
    let def = wf(json!([
        { "id": "account", "type": "input", "ask": "Which account, {{ input.name }}?", "fields": fields(),
          "extract": { "max_tokens": 100 }, "max_attempts": 4 }
    ]));
    let graph = validate_json(&def, &models).unwrap();
    let e = estimate(&graph, &json!({ "name": "Ada" }), &models, None);
    let model = models.get("amazon.nova-micro-v1:0").unwrap();
    // At least: four answers, each the longest text read once (the corrective retry aside).
    let one_read = worst_case(&model, estimate_input_tokens(None, &"x".repeat(MAX_TEXT_CHARS * 4)), 100);
    let least = Amount { tokens: one_read.tokens * 4, cost: chainrun_core::money::Usd::from_pico(one_read.cost.pico() * 4) };
    assert!(e.steps[0].max.tokens >= least.tokens && e.steps[0].max.cost >= least.cost, "{:?} < {least:?}", e.steps[0].max);
    assert!(e.steps[0].max.tokens <= least.tokens * 3, "bounded by the prompt, not the model's window: {:?}", e.steps[0].max);
    assert_eq!(e.steps[0].min, Amount::ZERO, "an answer given as values costs nothing");
    let values_only = wf(json!([{ "id": "account", "type": "input", "ask": "x", "fields": fields() }]));
    let e = estimate(&validate_json(&values_only, &models).unwrap(), &json!({}), &models, None);
    assert_eq!(e.steps[0].max, Amount::ZERO, "without extract nothing is called");
}
