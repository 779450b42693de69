//! Every built-in template runs to completion: through the runner, in paused time, against
//! in-memory ports and a scripted model, with the review decision and the input answers its
//! gates ask for recorded as the API records them. Each test checks the steps that ran —
//! the router's branch, the parallel checks, what the gate passed downstream.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::durability::Durability;
use chainrun_core::engine::{Engine, EngineConfig};
use chainrun_core::graph::validate_json;
use chainrun_core::ids::{Principal, RunId, StepId};
use chainrun_core::input::InputTurn;
use chainrun_core::memory::{MemoryAnalytics, MemoryDispatcher, MemoryProgress, MemoryStore, MemoryTimers, PausedClock, Script, ScriptedModel};
use chainrun_core::ports::{AnswerOutcome, DecideOutcome, RunStore};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::run::{Cause, EventType, ReviewDecision, RunRecord, RunStatus, RunnerEvent, StepRecord, StepStatus, Verdict};
use chainrun_core::templates::builtin;
use chainrun_runner::{Handled, Runner};
use chrono::Utc;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

struct Setup {
    runner: Arc<Runner>,
    model: Arc<ScriptedModel>,
    store: Arc<MemoryStore>,
    progress: Arc<MemoryProgress>,
}

fn setup(scripts: Vec<Script>) -> Setup {
    let model = Arc::new(ScriptedModel::new(scripts));
    let store = Arc::new(MemoryStore::new());
    let progress = Arc::new(MemoryProgress::new());
    let clock = Arc::new(PausedClock::default());
    let engine = Engine::new(model.clone(), store.clone(), progress.clone(), Arc::new(ModelRegistry::builtin()), EngineConfig::default())
        .with_timers(Arc::new(MemoryTimers::new()))
        .with_clock(clock.clone());
    let runner = Arc::new(Runner {
        store: store.clone(),
        engine,
        dispatcher: Arc::new(MemoryDispatcher::new()),
        analytics: Arc::new(MemoryAnalytics::new()),
        durability: Durability::with_lease(Duration::from_secs(30)),
        clock,
    });
    Setup { runner, model, store, progress }
}

/// Queues a run of built-in `id` on `input` (its example input if `None`), as the API
/// does: the definition validated, the starter its only owner.
async fn queue(s: &Setup, id: &str, input: Option<Value>) -> RunRecord {
    let template = builtin(id).unwrap();
    let definition = template.definition().clone();
    let graph = validate_json(&definition, &ModelRegistry::builtin()).unwrap();
    let input = input.unwrap_or_else(|| template.example_input().clone());
    graph.check_input(&input).unwrap();
    let mut run =
        RunRecord::new(graph.name().clone(), definition, input, "alice".parse().unwrap(), vec![Principal::User("alice".into())], Utc::now());
    run.step_order = graph.step_order();
    s.store.create_run(&run).await.unwrap();
    run
}

async fn deliver(s: &Setup, run: &RunId, cause: Cause) -> Handled {
    let deadline = Utc::now() + chrono::Duration::minutes(15);
    s.runner.handle(RunnerEvent::new(run.clone(), cause), "inv", deadline, Duration::from_secs(90)).await.unwrap()
}

/// Each step's settled status, by id.
async fn statuses(s: &Setup, run: &RunId) -> BTreeMap<String, StepStatus> {
    s.store.get_steps(run).await.unwrap().into_iter().map(|r| (r.step_id.to_string(), r.status)).collect()
}

async fn step(s: &Setup, run: &RunId, id: &str) -> StepRecord {
    s.store.get_steps(run).await.unwrap().into_iter().find(|r| r.step_id.as_str() == id).unwrap()
}

async fn finished(s: &Setup, run: &RunId) -> RunRecord {
    let done = s.store.get_run(run).await.unwrap().unwrap();
    assert_eq!(done.status, RunStatus::Completed, "{:?}", done.error);
    done
}

fn all_completed(ids: &[&str]) -> BTreeMap<String, StepStatus> {
    ids.iter().map(|id| (id.to_string(), StepStatus::Completed)).collect()
}

/// When each step started and completed, in event order.
fn order(s: &Setup, run: &RunId) -> Vec<(EventType, String)> {
    s.progress
        .events(run)
        .into_iter()
        .filter(|e| matches!(e.kind, EventType::StepStarted | EventType::StepCompleted))
        .map(|e| (e.kind, e.step_id.map(|id| id.to_string()).unwrap_or_default()))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn feedback_analysis_extracts_classifies_and_summarises_in_parallel_and_suggests_a_fix_per_issue() {
    let s = setup(vec![
        Script::reply("List the distinct issues", r#"{"issues": ["logged out on network switch", "CSV export drops the last row"]}"#),
        Script::reply("Classify the sentiment", r#"{"label": "negative"}"#),
        Script::reply("Summarise this customer feedback", "Two bugs and slow support."),
        Script::reply("Suggest one concrete fix", "Keep the session across networks."),
        Script::reply("Write a short, kind reply", "Sorry, and thank you."),
    ]);
    let run = queue(&s, "feedback-analysis", None).await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await, Handled::Finished(RunStatus::Completed));
    let done = finished(&s, &run.id).await;
    assert_eq!(statuses(&s, &run.id).await, all_completed(&["extract", "sentiment", "summary", "fixes", "reply"]));
    assert_eq!(s.model.calls_matching("Suggest one concrete fix"), 2, "one fix per issue");
    assert_eq!(step(&s, &run.id, "fixes").await.output, Some(json!(["Keep the session across networks.", "Keep the session across networks."])));
    let output = done.output.unwrap();
    let output = output.as_str().unwrap();
    assert!(output.starts_with("Sentiment: negative\nSummary: Two bugs and slow support."), "{output}");
    assert!(output.contains("- CSV export drops the last row: Keep the session") && output.ends_with("Sorry, and thank you."), "{output}");
    let budget = chainrun_core::money::Usd::from_pico(50_000_000_000);
    assert!(done.totals.cost <= budget, "within its budget");
}

#[tokio::test(start_paused = true)]
async fn code_review_runs_its_three_checks_in_parallel_then_one_summary_with_the_blocking_count() {
    let check = |prompt: &str, reply: &str| Script::reply(prompt, reply).with_latency(Duration::from_secs(2));
    let s = setup(vec![
        check("diff for correctness", r#"{"findings": [{"severity": "minor", "message": "unused variable"}]}"#),
        check("diff for security problems", r#"{"findings": [{"severity": "blocker", "message": "SQL injection through user_id"}]}"#),
        check("readability and naming", "Name the query."),
        Script::reply("Write one code review", r#"{"verdict": "request_changes", "review": "Use a bound parameter."}"#),
    ]);
    let run = queue(&s, "code-review", None).await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await, Handled::Finished(RunStatus::Completed));
    let done = finished(&s, &run.id).await;
    assert_eq!(statuses(&s, &run.id).await, all_completed(&["correctness", "security", "style", "blockers", "summary"]));
    // All three checks started before any of them completed: they ran at once.
    let events = order(&s, &run.id);
    let first_done = events.iter().position(|(kind, _)| *kind == EventType::StepCompleted).unwrap();
    let started_before: Vec<&str> = events[..first_done].iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(started_before, ["correctness", "security", "style"]);
    assert_eq!(step(&s, &run.id, "blockers").await.output, Some(json!(1)));
    let summary_prompt = s.model.calls().into_iter().find(|c| c.prompt.contains("Write one code review")).unwrap().prompt;
    assert!(summary_prompt.contains("SQL injection through user_id") && summary_prompt.contains("Name the query."), "{summary_prompt}");
    assert_eq!(done.output, Some(json!("Verdict: request_changes (1 blocking findings)\n\nUse a bound parameter.")));
    assert_eq!(s.model.calls().len(), 4);
}

fn routing_scripts() -> Vec<Script> {
    vec![
        // The replies first: their prompts quote the message too.
        Script::reply("hand-off note", "Refund a thrice-broken order."),
        Script::reply("friendly reply", "Glad you like it!"),
        Script::reply("arrived broken", r#"{"sentiment": "negative", "urgent": true, "topic": "broken delivery"}"#),
        Script::reply("love the new app", r#"{"sentiment": "positive", "urgent": false, "topic": "app praise"}"#),
    ]
}

#[tokio::test(start_paused = true)]
async fn sentiment_routing_escalates_a_negative_message_and_skips_the_auto_reply() {
    let s = setup(routing_scripts());
    let run = queue(&s, "sentiment-routing", None).await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await, Handled::Finished(RunStatus::Completed));
    let done = finished(&s, &run.id).await;
    let mut expected = all_completed(&["classify", "route", "escalate", "outcome"]);
    expected.insert("auto_reply".into(), StepStatus::Skipped);
    assert_eq!(statuses(&s, &run.id).await, expected);
    assert_eq!(step(&s, &run.id, "route").await.output.unwrap()["selected"], json!(["escalate"]));
    assert_eq!(done.output, Some(json!("ESCALATED to a human agent.\n\nRefund a thrice-broken order.")));
}

#[tokio::test(start_paused = true)]
async fn sentiment_routing_answers_a_positive_message_automatically_and_skips_the_escalation() {
    let s = setup(routing_scripts());
    let run = queue(&s, "sentiment-routing", Some(json!({ "message": "I love the new app, thanks!" }))).await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await, Handled::Finished(RunStatus::Completed));
    let done = finished(&s, &run.id).await;
    let mut expected = all_completed(&["classify", "route", "auto_reply", "outcome"]);
    expected.insert("escalate".into(), StepStatus::Skipped);
    assert_eq!(statuses(&s, &run.id).await, expected);
    assert_eq!(step(&s, &run.id, "route").await.output.unwrap()["selected"], json!(["auto_reply"]));
    assert_eq!(done.output, Some(json!("AUTO-REPLIED.\n\nGlad you like it!")));
}

#[tokio::test(start_paused = true)]
async fn content_pipeline_waits_for_its_editor_and_writes_the_headline_and_social_posts_from_the_edited_post() {
    let s = setup(vec![
        Script::reply("Outline a short blog post", "- why\n- how"),
        Script::reply("Write a blog post of about 400 words", "Draft post."),
        Script::reply("Write one headline", "Lambda, tamed"),
        Script::reply("three short social media posts", r#"{"posts": ["Read it", "Share it"]}"#),
    ]);
    let run = queue(&s, "content-pipeline", None).await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await, Handled::Waiting);
    let parked = s.store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!(parked.status, RunStatus::AwaitingInput);
    assert_eq!(step(&s, &run.id, "editor").await.status, StepStatus::Waiting);
    assert_eq!(s.model.calls().len(), 2, "nothing after the gate ran yet");

    let editor = StepId::parse("editor").unwrap();
    let decision = ReviewDecision {
        decision: Verdict::Edit,
        output: Some(json!("Edited post.")),
        comment: Some("tightened".into()),
        by: "alice".parse().unwrap(),
        at: Utc::now(),
    };
    assert_eq!(s.store.decide(&run.id, &editor, &decision).await.unwrap(), DecideOutcome::Recorded { requeued: true });
    assert_eq!(deliver(&s, &run.id, Cause::Resume).await, Handled::Finished(RunStatus::Completed));
    let done = finished(&s, &run.id).await;
    assert_eq!(statuses(&s, &run.id).await, all_completed(&["outline", "draft", "editor", "headline", "social"]));
    for prompt in ["Write one headline", "three short social media posts"] {
        let call = s.model.calls().into_iter().find(|c| c.prompt.contains(prompt)).unwrap();
        assert!(call.prompt.contains("Edited post.") && !call.prompt.contains("Draft post."), "{}", call.prompt);
    }
    assert_eq!(done.output, Some(json!("# Lambda, tamed\n\nEdited post.\n\n---\n- Read it\n- Share it\n")));
}

/// Records an answer to the input step `details` as the API does: checked over the stored
/// state, then written on it.
async fn answer(s: &Setup, run: &RunId, values: Option<Value>, text: Option<&str>) -> AnswerOutcome {
    let template = builtin("support-intake").unwrap();
    let graph = validate_json(template.definition(), &ModelRegistry::builtin()).unwrap();
    let spec = graph
        .steps()
        .iter()
        .find_map(|step| if let chainrun_core::graph::StepKind::Input(spec) = &step.kind { Some(spec.clone()) } else { None })
        .unwrap();
    let id = StepId::parse("details").unwrap();
    let current = s.store.get_run(run).await.unwrap().unwrap().inputs.get(&id).cloned().unwrap_or_default();
    let checked = values.as_ref().map(|v| spec.fields.check(&current.values, v.as_object().unwrap()));
    let turn = InputTurn {
        by: "alice".parse().unwrap(),
        at: Utc::now(),
        values: values.map(|v| v.as_object().unwrap().clone()),
        text: text.map(str::to_owned),
        extracted: None,
        read: false,
        accepted: vec![],
        errors: vec![],
    };
    let next = current.answered(turn, checked, spec.max_attempts);
    let requeue = next.end.is_some() || next.unread_text().is_some();
    s.store.record_input(run, &id, current.version, &next, requeue).await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn support_intake_triages_while_it_collects_the_ticket_details_over_two_answers_then_files_and_acknowledges() {
    let s = setup(vec![
        // The extraction call reads the customer's words for the input step's fields.
        Script::reply("[chainrun:extract]", r#"{"order_id": "ORD-12345", "issue_type": "delivery"}"#),
        Script::reply("Rate the urgency", r#"{"urgency": "high"}"#),
        Script::reply("File a support ticket", r#"{"title": "Package never arrived", "summary": "Order ORD-12345 is missing."}"#),
        Script::reply("Write a two-sentence message", "Your ticket is open."),
    ]);
    let run = queue(&s, "support-intake", None).await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await, Handled::Waiting);
    assert_eq!(step(&s, &run.id, "triage").await.status, StepStatus::Completed, "the branch that needs no answer went on");
    assert_eq!(step(&s, &run.id, "details").await.status, StepStatus::Waiting);
    let asked = s.progress.events(&run.id).into_iter().find(|e| e.kind == EventType::AwaitingInput && e.step_id.is_some()).unwrap();
    assert!(asked.data["show"].as_str().unwrap().starts_with("Thanks for getting in touch, Ada."), "{}", asked.data);
    assert_eq!(asked.data["missing"], json!(["order_id", "issue_type", "email"]));

    // First, free text: two of three fields are read from it, and the step asks for the rest.
    assert_eq!(answer(&s, &run.id, None, Some("It's order ORD-12345 and it never arrived")).await, AnswerOutcome::Recorded { requeued: true });
    assert_eq!(deliver(&s, &run.id, Cause::Resume).await, Handled::Waiting, "email is still missing");
    let asked = s.progress.events(&run.id).into_iter().filter(|e| e.kind == EventType::AwaitingInput && e.step_id.is_some()).last().unwrap();
    assert_eq!(asked.data["missing"], json!(["email"]));
    // Then the value itself.
    assert_eq!(answer(&s, &run.id, Some(json!({ "email": "ada@example.com" })), None).await, AnswerOutcome::Recorded { requeued: true });
    assert_eq!(deliver(&s, &run.id, Cause::Resume).await, Handled::Finished(RunStatus::Completed));

    let done = finished(&s, &run.id).await;
    assert_eq!(statuses(&s, &run.id).await, all_completed(&["triage", "details", "ticket", "acknowledge"]));
    assert_eq!(
        step(&s, &run.id, "details").await.output,
        Some(json!({ "order_id": "ORD-12345", "issue_type": "delivery", "email": "ada@example.com" }))
    );
    let ack = s.model.calls().into_iter().find(|c| c.prompt.contains("Write a two-sentence message")).unwrap().prompt;
    assert!(ack.contains("\"Package never arrived\"") && ack.contains("high priority") && ack.contains("ada@example.com"), "{ack}");
    assert_eq!(
        done.output,
        Some(json!("Ticket: Package never arrived (order ORD-12345, delivery, high priority)\nOrder ORD-12345 is missing.\n\nYour ticket is open."))
    );
}
