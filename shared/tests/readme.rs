//! The README's complete workflow example is real: it validates, its dependencies are
//! what the README says, and it runs to the output it describes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::engine::{Engine, EngineConfig};
use chainrun_core::graph::validate_json;
use chainrun_core::ids::Principal;
use chainrun_core::memory::{MemoryProgress, MemoryStore, Script, ScriptedModel};
use chainrun_core::ports::{Claim, Lease, RunStore};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::run::{RunRecord, RunStatus, StepStatus};
use chrono::Utc;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The `n`th ```json block (from 0) after `heading`, raw.
fn readme_block(heading: &str, n: usize) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let mut section = &readme[readme.find(heading).unwrap_or_else(|| panic!("README has {heading}"))..];
    for _ in 0..n {
        let open = section.find("```json\n").expect("a json block") + "```json\n".len();
        section = &section[open + section[open..].find("\n```").expect("closed block") + 4..];
    }
    let start = section.find("```json\n").expect("a json block") + "```json\n".len();
    let end = start + section[start..].find("\n```").expect("closed block");
    section[start..end].to_owned()
}

/// The first ```json block after the "## Workflow language" heading.
fn readme_example() -> Value {
    serde_json::from_str(&readme_block("## Workflow language", 0)).expect("the README example is valid JSON")
}

#[test]
fn the_readme_estimate_example_is_what_the_estimator_answers() {
    let request: Value = serde_json::from_str(&readme_block("### Estimates", 0)).expect("the request is valid JSON");
    let registry = ModelRegistry::builtin();
    let graph = validate_json(&request["workflow"], &registry).unwrap();
    let answer = serde_json::to_value(chainrun_core::wire::views::EstimateView::from(&chainrun_core::estimate::estimate(
        &graph,
        &request["input"],
        &registry,
        None,
    )))
    .unwrap();
    let shown: Value = serde_json::from_str(&readme_block("### Estimates", 1))
        .unwrap_or_else(|e| panic!("the README's answer is not JSON ({e}); the estimator's:\n{}", serde_json::to_string_pretty(&answer).unwrap()));
    assert_eq!(shown, answer, "the estimator's answer:\n{}", serde_json::to_string_pretty(&answer).unwrap());
}

#[test]
fn the_readme_example_validates_with_the_dependencies_it_describes() {
    let graph = validate_json(&readme_example(), &ModelRegistry::builtin()).unwrap();
    let deps = |id: &str| -> Vec<&str> {
        let step = &graph.steps()[graph.index_of(id).unwrap()];
        let mut d: Vec<&str> = step.deps.iter().map(|&i| graph.steps()[i].id.as_str()).collect();
        d.sort_unstable();
        d
    };
    for root in ["extract", "sentiment", "summary"] {
        assert!(deps(root).is_empty(), "{root} starts at once");
    }
    assert_eq!(deps("route"), ["sentiment"]);
    assert_eq!(deps("escalate"), ["extract", "route"]);
    assert_eq!(deps("per_issue"), ["extract"]);
    assert_eq!(deps("report"), ["auto_reply", "escalate"]);
    assert!(graph.check_input(&json!({})).is_err(), "input_schema requires feedback");
}

#[tokio::test(start_paused = true)]
async fn the_readme_example_runs_the_negative_branch_end_to_end() {
    let model = Arc::new(ScriptedModel::new(vec![
        Script::reply("List the distinct issues", r#"{"issues": ["login is slow", "export crashes"]}"#),
        Script::reply("Sentiment of this feedback", r#"{"label": "negative"}"#),
        Script::reply("Summarise in one sentence", "Two problems."),
        Script::reply("Write an apology", "We are sorry."),
        Script::reply("Issue 1: suggest one fix for login is slow", "cache sessions"),
        Script::reply("Issue 2: suggest one fix for export crashes", "stream the export"),
    ]));
    let store = Arc::new(MemoryStore::new());
    let engine =
        Engine::new(model.clone(), store.clone(), Arc::new(MemoryProgress::new()), Arc::new(ModelRegistry::builtin()), EngineConfig::default());
    let input = json!({ "feedback": "Login is slow and export crashes." });
    let run = RunRecord::new(
        "feedback-triage".parse().unwrap(),
        readme_example(),
        input,
        "alice".parse().unwrap(),
        vec![Principal::User("alice".into())],
        Utc::now(),
    );
    store.create_run(&run).await.unwrap();
    let lease = Lease { holder: "r".into(), expires_at: Utc::now() + chrono::Duration::minutes(15) };
    let Claim::Acquired(claimed) = store.claim(&run.id, &lease, Utc::now()).await.unwrap() else { panic!("claim") };
    engine.execute(*claimed, lease, None).await.unwrap();

    let run = store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Completed, "{:?}", run.error);
    assert_eq!(run.output, Some(json!("We are sorry.\n\n2 issues. Fixes: cache sessions / stream the export")));
    let status: BTreeMap<String, StepStatus> =
        store.get_steps(&run.id).await.unwrap().into_iter().map(|s| (s.step_id.to_string(), s.status)).collect();
    assert_eq!(status["auto_reply"], StepStatus::Skipped);
    assert_eq!(status["escalate"], StepStatus::Completed);
    assert_eq!(model.calls_matching("thank-you"), 0, "the branch not chosen never calls the model");
}

#[tokio::test(start_paused = true)]
async fn the_readme_content_pipeline_waits_for_its_editor_and_publishes_the_edit() {
    use chainrun_core::engine::Outcome;
    use chainrun_core::run::{ReviewDecision, Verdict};
    let definition: Value = serde_json::from_str(&readme_block("A content pipeline with a review gate:", 0)).expect("valid JSON");
    let registry = Arc::new(ModelRegistry::builtin());
    let graph = validate_json(&definition, &registry).unwrap();
    let store = Arc::new(MemoryStore::new());
    let model = Arc::new(ScriptedModel::new(vec![
        Script::reply("Outline", "1. why 2. how"),
        Script::reply("Write the post", "A draft post."),
        Script::reply("social posts", "#launch"),
    ]));
    let engine = Engine::new(model.clone(), store.clone(), Arc::new(MemoryProgress::new()), registry, EngineConfig::default());
    let mut run = RunRecord::new(
        graph.name().clone(),
        definition,
        json!({ "topic": "review gates" }),
        "alice".parse().unwrap(),
        vec![Principal::User("alice".into()), Principal::Group("editors".into())],
        Utc::now(),
    );
    run.step_order = graph.step_order();
    store.create_run(&run).await.unwrap();
    let execute = || async {
        let lease = Lease { holder: chainrun_core::ids::RunId::new().to_string(), expires_at: Utc::now() + chrono::Duration::minutes(5) };
        let Claim::Acquired(claimed) = store.claim(&run.id, &lease, Utc::now()).await.unwrap() else { panic!("claim") };
        engine.execute(*claimed, lease, None).await.unwrap()
    };
    assert_eq!(execute().await, Outcome::Waiting, "the draft waits for its editor");
    let waiting = store.get_steps(&run.id).await.unwrap().into_iter().find(|r| r.step_id.as_str() == "editor").unwrap();
    assert_eq!((waiting.status, waiting.output), (StepStatus::Waiting, Some(json!("A draft post."))));
    let edit = ReviewDecision {
        decision: Verdict::Edit,
        output: Some(json!("The corrected post.")),
        comment: Some("tightened the intro".into()),
        by: "erin".parse().unwrap(),
        at: Utc::now(),
    };
    store.decide(&run.id, &chainrun_core::ids::StepId::parse("editor").unwrap(), &edit).await.unwrap();
    assert_eq!(execute().await, Outcome::Finished(RunStatus::Completed));
    assert_eq!(model.calls_matching("announcing:\nThe corrected post."), 1, "social is written from the edit");
    let done = store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!(done.output, Some(json!("The corrected post.\n\n---\n#launch")));
}

#[test]
fn the_readme_input_example_validates_and_its_confirmation_reads_the_collected_values() {
    let def: Value = serde_json::from_str(&readme_block("**Input steps.**", 0)).expect("the input example is valid JSON");
    let graph = validate_json(&def, &ModelRegistry::builtin()).unwrap();
    let confirm = &graph.steps()[graph.index_of("confirm").unwrap()];
    assert_eq!(confirm.deps, vec![graph.index_of("account").unwrap()]);
    let chainrun_core::graph::StepKind::Input(spec) = &graph.steps()[graph.index_of("account").unwrap()].kind else { panic!("an input step") };
    let given = json!({ "account_id": "AC-12", "seats": 12 });
    let checked = spec.fields.check(&serde_json::Map::new(), given.as_object().unwrap());
    let errors: Vec<(String, String)> = checked.errors.into_iter().map(|e| (e.field, e.message)).collect();
    assert_eq!(
        errors,
        [("account_id".to_owned(), "\"AC-12\" does not match \"^AC-[0-9]{6}$\"".to_owned()), ("plan".to_owned(), "required".to_owned())],
        "the README's 422 example"
    );
}
