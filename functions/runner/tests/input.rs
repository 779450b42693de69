//! Input steps: the run asks for named values and waits, holding no runner, turn after
//! turn; answers recorded on the run (as the API records them) are continued by any
//! runner, any time later. In paused time, against in-memory ports.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::durability::Durability;
use chainrun_core::engine::{Engine, EngineConfig};
use chainrun_core::graph::{StepKind, validate_json};
use chainrun_core::ids::{Principal, RunId, StepId};
use chainrun_core::input::{InputEnd, InputSpec, InputState, InputTurn};
use chainrun_core::memory::{MemoryAnalytics, MemoryDispatcher, MemoryProgress, MemoryStore, MemoryTimers, PausedClock, Script, ScriptedModel};
use chainrun_core::ports::{AnswerOutcome, ProgressReader, RunStore};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::run::{Cause, EventType, RunRecord, RunStatus, RunnerEvent, StepRecord, StepStatus, WaitKind};
use chainrun_runner::{Handled, Runner};
use chrono::Utc;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::Duration;

struct Setup {
    runner: Arc<Runner>,
    model: Arc<ScriptedModel>,
    store: Arc<MemoryStore>,
    progress: Arc<MemoryProgress>,
    timers: Arc<MemoryTimers>,
}

fn setup(scripts: Vec<Script>) -> Setup {
    let model = Arc::new(ScriptedModel::new(scripts));
    let store = Arc::new(MemoryStore::new());
    let progress = Arc::new(MemoryProgress::new());
    let timers = Arc::new(MemoryTimers::new());
    let clock = Arc::new(PausedClock::default());
    let engine = Engine::new(model.clone(), store.clone(), progress.clone(), Arc::new(ModelRegistry::builtin()), EngineConfig::default())
        .with_timers(timers.clone())
        .with_clock(clock.clone());
    let runner = Arc::new(Runner {
        store: store.clone(),
        engine,
        dispatcher: Arc::new(MemoryDispatcher::new()),
        analytics: Arc::new(MemoryAnalytics::new()),
        durability: Durability::with_lease(Duration::from_secs(30)),
        clock,
    });
    Setup { runner, model, store, progress, timers }
}

fn definition(input_step: Value) -> Value {
    json!({ "name": "t", "defaults": { "model": "amazon.nova-micro-v1:0" }, "steps": [
        input_step,
        { "id": "open", "type": "llm", "prompt": "OPEN {{ steps.account.output.account_id }} on {{ steps.account.output.plan }}" }
    ]})
}

fn account(extra: Value) -> Value {
    let mut step = json!({
        "id": "account", "type": "input", "ask": "Which account, {{ input.name }}?",
        "fields": { "type": "object",
                    "properties": { "account_id": { "type": "string", "pattern": "^AC-[0-9]{6}$" },
                                    "plan": { "enum": ["free", "pro"] } },
                    "required": ["account_id", "plan"] },
        "extract": { "model": "amazon.nova-micro-v1:0", "max_tokens": 100 }
    });
    for (k, v) in extra.as_object().unwrap() {
        step[k] = v.clone();
    }
    step
}

async fn queue(store: &dyn RunStore, def: Value) -> RecordAndSpec {
    let graph = validate_json(&def, &ModelRegistry::builtin()).unwrap();
    let spec = graph.steps().iter().find_map(|s| if let StepKind::Input(spec) = &s.kind { Some(spec.clone()) } else { None }).unwrap();
    let mut run = RunRecord::new(
        "t".parse().unwrap(),
        def,
        json!({ "name": "Ada" }),
        "alice".parse().unwrap(),
        vec![Principal::User("alice".into())],
        Utc::now(),
    );
    run.step_order = graph.step_order();
    store.create_run(&run).await.unwrap();
    (run, spec)
}

type RecordAndSpec = (RunRecord, InputSpec);

fn deliver(s: &Setup, run: &RunId, cause: Cause) -> tokio::task::JoinHandle<Handled> {
    let (runner, run) = (s.runner.clone(), run.clone());
    let deadline = Utc::now() + chrono::Duration::minutes(15);
    tokio::spawn(async move { runner.handle(RunnerEvent::new(run, cause), "inv", deadline, Duration::from_secs(90)).await.unwrap() })
}

fn step_id() -> StepId {
    StepId::parse("account").unwrap()
}

fn turn(values: Option<Value>, text: Option<&str>) -> InputTurn {
    InputTurn {
        by: "alice".parse().unwrap(),
        at: Utc::now(),
        values: values.map(|v| v.as_object().unwrap().clone()),
        text: text.map(str::to_owned),
        extracted: None,
        read: false,
        accepted: vec![],
        errors: vec![],
    }
}

/// Records an answer as the API does: checked over the stored state, then written on it.
async fn answer(s: &Setup, run: &RunId, spec: &InputSpec, values: Option<Value>, text: Option<&str>) -> (InputState, AnswerOutcome) {
    let current = s.store.get_run(run).await.unwrap().unwrap().inputs.get(&step_id()).cloned().unwrap_or_default();
    let given = values.clone();
    let checked = given.map(|v| spec.fields.check(&current.values, v.as_object().unwrap()));
    let next = current.answered(turn(values, text), checked, spec.max_attempts);
    let requeue = next.end.is_some() || next.unread_text().is_some();
    let outcome = s.store.record_input(run, &step_id(), current.version, &next, requeue).await.unwrap();
    (next, outcome)
}

async fn step_record(s: &Setup, run: &RunId, id: &str) -> StepRecord {
    s.store.get_steps(run).await.unwrap().into_iter().find(|r| r.step_id.as_str() == id).unwrap()
}

fn extraction(reply: &str) -> Script {
    Script::reply("[chainrun:extract]", reply).with_usage(200, 20)
}

#[tokio::test(start_paused = true)]
async fn an_input_step_waits_naming_what_it_asks_and_the_fields_missing_holding_no_runner() {
    let s = setup(vec![]);
    let (run, _) = queue(s.store.as_ref(), definition(account(json!({})))).await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::Waiting);
    let parked = s.store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!(parked.status, RunStatus::AwaitingInput);
    let waiting = parked.waiting.unwrap();
    assert_eq!((waiting.kind, waiting.steps), (WaitKind::Input, vec![step_id()]));
    let asked = s.progress.events(&run.id).into_iter().find(|e| e.kind == EventType::AwaitingInput && e.step_id.is_some()).unwrap();
    assert_eq!(asked.data["show"], "Which account, Ada?");
    assert_eq!(asked.data["missing"], json!(["account_id", "plan"]));
    assert_eq!((asked.data["attempts_left"].as_u64(), &asked.data["reviewers"]), (Some(3), &json!(["user:alice"])));
    assert_eq!(asked.data["kind"], "input");
    assert_eq!(step_record(&s, &run.id, "account").await.status, StepStatus::Waiting);
    assert_eq!(s.model.calls().len(), 0);
    let row = s.progress.progress_of(&Principal::User("alice".into()), &run.id).await.unwrap().unwrap();
    assert_eq!(row.waiting.map(|w| (w.kind, w.steps)), Some((WaitKind::Input, vec![step_id()])), "the progress row says what it waits for");
}

#[tokio::test(start_paused = true)]
async fn complete_values_make_the_step_output_and_a_downstream_step_reads_them() {
    let s = setup(vec![Script::reply("OPEN", "opened")]);
    let (run, spec) = queue(s.store.as_ref(), definition(account(json!({})))).await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::Waiting);
    let (_, outcome) = answer(&s, &run.id, &spec, Some(json!({ "account_id": "AC-123456", "plan": "pro" })), None).await;
    assert_eq!(outcome, AnswerOutcome::Recorded { requeued: true });
    assert_eq!(deliver(&s, &run.id, Cause::Resume).await.unwrap(), Handled::Finished(RunStatus::Completed));
    assert_eq!(s.model.calls_matching("OPEN AC-123456 on pro"), 1);
    let step = step_record(&s, &run.id, "account").await;
    assert_eq!((step.status, step.output.clone()), (StepStatus::Completed, Some(json!({ "account_id": "AC-123456", "plan": "pro" }))));
    assert_eq!(serde_json::from_str::<Value>(step.text.as_deref().unwrap()).unwrap(), step.output.unwrap(), "its text is the values as JSON");
    assert_eq!(step.detail.unwrap()["turns"][0]["by"], "alice", "the detail records each turn");
    let resumed = s.progress.events(&run.id).into_iter().find(|e| e.kind == chainrun_core::run::EventType::RunResumed).unwrap();
    assert_eq!((resumed.data["by"].as_str(), resumed.data["what"].as_str()), (Some("alice"), Some("answered input account")));
}

#[tokio::test(start_paused = true)]
async fn partial_values_are_kept_between_turns_and_the_run_keeps_waiting() {
    let s = setup(vec![Script::reply("OPEN", "opened")]);
    let (run, spec) = queue(s.store.as_ref(), definition(account(json!({})))).await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::Waiting);
    let (first, outcome) = answer(&s, &run.id, &spec, Some(json!({ "plan": "pro", "account_id": "nope" })), None).await;
    assert_eq!(outcome, AnswerOutcome::Recorded { requeued: false }, "still waiting: nothing for a runner to do");
    assert_eq!(first.values, json!({ "plan": "pro" }).as_object().unwrap().clone());
    assert_eq!(first.turns[0].errors.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(), ["account_id"]);
    assert_eq!(s.store.get_run(&run.id).await.unwrap().unwrap().status, RunStatus::AwaitingInput);
    let (second, outcome) = answer(&s, &run.id, &spec, Some(json!({ "account_id": "AC-000001" })), None).await;
    assert_eq!((outcome, second.end), (AnswerOutcome::Recorded { requeued: true }, Some(InputEnd::Complete)));
    assert_eq!(deliver(&s, &run.id, Cause::Resume).await.unwrap(), Handled::Finished(RunStatus::Completed));
    assert_eq!(s.model.calls_matching("OPEN AC-000001 on pro"), 1);
}

#[tokio::test(start_paused = true)]
async fn free_text_is_read_by_a_charged_call_counted_in_the_totals_and_the_step_asks_again_for_the_rest() {
    let s = setup(vec![extraction("{\"plan\": \"pro\", \"colour\": \"red\"}"), Script::reply("OPEN", "opened").with_usage(10, 5)]);
    let (run, spec) = queue(s.store.as_ref(), definition(account(json!({})))).await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::Waiting);
    let (_, outcome) = answer(&s, &run.id, &spec, None, Some("We are on the pro plan")).await;
    assert_eq!(outcome, AnswerOutcome::Recorded { requeued: true });
    assert_eq!(deliver(&s, &run.id, Cause::Resume).await.unwrap(), Handled::Waiting, "account_id is still missing");
    let call = s.model.calls().into_iter().next().unwrap();
    assert!(call.prompt.contains("We are on the pro plan") && call.prompt.contains("account_id"), "{}", call.prompt);
    let state = s.store.get_run(&run.id).await.unwrap().unwrap().inputs[&step_id()].clone();
    assert_eq!((state.values.get("plan"), state.turns[0].read), (Some(&json!("pro")), true));
    assert_eq!(state.turns[0].errors.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(), ["colour", "account_id"]);
    let asked = s.progress.events(&run.id).into_iter().filter(|e| e.kind == EventType::AwaitingInput && e.step_id.is_some()).last().unwrap();
    assert_eq!((asked.data["missing"].clone(), asked.data["attempts_left"].as_u64()), (json!(["account_id"]), Some(2)));
    assert_eq!(asked.data["refused"][0]["field"], "colour");
    let waiting = step_record(&s, &run.id, "account").await;
    assert_eq!((waiting.calls, waiting.usage.input_tokens), (1, 200), "the call's charge stays on the waiting step");
    let row = s.progress.progress_of(&Principal::User("alice".into()), &run.id).await.unwrap().unwrap();
    assert_eq!(row.totals.model_calls, 1, "and in the run's totals while it waits");

    answer(&s, &run.id, &spec, Some(json!({ "account_id": "AC-654321" })), None).await;
    assert_eq!(deliver(&s, &run.id, Cause::Resume).await.unwrap(), Handled::Finished(RunStatus::Completed));
    let done = s.store.get_run(&run.id).await.unwrap().unwrap();
    let step = step_record(&s, &run.id, "account").await;
    assert_eq!((step.calls, step.usage.input_tokens, step.usage.output_tokens), (1, 200, 20), "charged once, across runners");
    assert_eq!((done.totals.model_calls, done.totals.input_tokens), (2, 210));
    let extraction_cost = ModelRegistry::builtin().get("amazon.nova-micro-v1:0").unwrap().cost(&step.usage).unwrap();
    assert_eq!(step.cost, extraction_cost);
    assert_eq!(s.model.calls_matching("OPEN AC-654321 on pro"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_run_budget_too_small_for_the_extraction_fails_the_step_without_calling() {
    let s = setup(vec![extraction("{}")]);
    let mut def = definition(account(json!({})));
    def["budget"] = json!({ "max_total_tokens": 1200 });
    let (run, spec) = queue(s.store.as_ref(), def).await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::Waiting);
    answer(&s, &run.id, &spec, None, Some(&"long answer ".repeat(300))).await;
    assert_eq!(deliver(&s, &run.id, Cause::Resume).await.unwrap(), Handled::Finished(RunStatus::Failed));
    assert_eq!(s.model.calls().len(), 0);
    assert_eq!(s.store.get_run(&run.id).await.unwrap().unwrap().error.unwrap().code, "BUDGET_EXCEEDED");
}

#[tokio::test(start_paused = true)]
async fn using_every_answer_without_the_values_fails_the_step_input_incomplete() {
    let s = setup(vec![extraction("not json at all")]);
    let (run, spec) = queue(s.store.as_ref(), definition(account(json!({ "max_attempts": 2 })))).await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::Waiting);
    let (_, outcome) = answer(&s, &run.id, &spec, Some(json!({ "plan": "gold" })), None).await;
    assert_eq!(outcome, AnswerOutcome::Recorded { requeued: false });
    answer(&s, &run.id, &spec, None, Some("it is AC-1")).await;
    assert_eq!(deliver(&s, &run.id, Cause::Resume).await.unwrap(), Handled::Finished(RunStatus::Failed));
    assert_eq!(s.model.calls_matching("[chainrun:extract]"), 2, "a reply that is not JSON gets its one corrective retry");
    let error = s.store.get_run(&run.id).await.unwrap().unwrap().error.unwrap();
    assert_eq!(error.code, "INPUT_INCOMPLETE");
    assert!(error.message.contains("account_id: required"), "{}", error.message);
    assert_eq!(s.model.calls_matching("OPEN"), 0);
    let step = step_record(&s, &run.id, "account").await;
    assert_eq!((step.status, step.calls), (StepStatus::Failed, 2));
}

#[tokio::test(start_paused = true)]
async fn an_input_nobody_answers_fails_at_its_deadline_without_anyone_polling() {
    let s = setup(vec![]);
    let (run, spec) = queue(s.store.as_ref(), definition(account(json!({ "timeout": "1h" })))).await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::Waiting);
    let deadline = s.store.get_run(&run.id).await.unwrap().unwrap().waiting.and_then(|w| w.deadline).expect("a deadline");
    assert_eq!(s.timers.set(), vec![(run.id.clone(), deadline)], "a one-time wake-up at the deadline");
    answer(&s, &run.id, &spec, Some(json!({ "plan": "pro" })), None).await;
    tokio::time::sleep(Duration::from_secs(3601)).await;
    assert_eq!(s.store.due(s.runner.clock.now(), 10).await.unwrap(), vec![run.id.clone()]);
    assert_eq!(deliver(&s, &run.id, Cause::Sweep).await.unwrap(), Handled::Finished(RunStatus::Failed));
    let stored = s.store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!(stored.error.as_ref().unwrap().code, "INPUT_TIMED_OUT");
    assert!(stored.error.unwrap().message.contains("account_id: required"));
    assert_eq!(stored.inputs[&step_id()].end, Some(InputEnd::TimedOut), "recorded, so a late answer is told");
}

#[tokio::test(start_paused = true)]
async fn a_deadline_escalates_the_input_to_more_people_with_a_new_deadline() {
    let s = setup(vec![Script::reply("OPEN", "opened")]);
    let escalate = json!({ "timeout": "1h", "on_timeout": { "escalate_to": ["group:support"], "timeout": "2h" } });
    let (run, spec) = queue(s.store.as_ref(), definition(account(escalate))).await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::Waiting);
    tokio::time::sleep(Duration::from_secs(3601)).await;
    assert_eq!(deliver(&s, &run.id, Cause::Sweep).await.unwrap(), Handled::Waiting, "escalated, waiting again");
    let escalated = s.progress.events(&run.id).into_iter().filter(|e| e.kind == EventType::AwaitingInput && e.step_id.is_some()).last().unwrap();
    assert_eq!(escalated.data["reviewers"], json!(["user:alice", "group:support"]));
    assert!(escalated.data["reason"].as_str().unwrap().contains("escalated"), "{}", escalated.data);
    let waiting = s.store.get_run(&run.id).await.unwrap().unwrap().waiting.unwrap();
    assert_eq!(waiting.deadline.map(|d| (d - s.runner.clock.now()).num_seconds()), Some(7200));
    answer(&s, &run.id, &spec, Some(json!({ "plan": "free", "account_id": "AC-111111" })), None).await;
    assert_eq!(deliver(&s, &run.id, Cause::Resume).await.unwrap(), Handled::Finished(RunStatus::Completed));
}

#[tokio::test(start_paused = true)]
async fn an_answer_days_later_is_continued_by_another_runner_from_the_kept_values() {
    let s = setup(vec![extraction("{\"account_id\": \"AC-222222\"}"), Script::reply("OPEN", "opened")]);
    let (run, spec) = queue(s.store.as_ref(), definition(account(json!({})))).await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::Waiting);
    answer(&s, &run.id, &spec, Some(json!({ "plan": "pro" })), None).await;
    tokio::time::sleep(Duration::from_secs(5 * 86_400)).await;
    // A fresh runner (another process) with nothing but the store.
    let other = setup(vec![extraction("{\"account_id\": \"AC-222222\"}"), Script::reply("OPEN", "opened")]);
    let other = Setup { store: s.store.clone(), progress: s.progress.clone(), ..other };
    let engine = Engine::new(other.model.clone(), s.store.clone(), s.progress.clone(), Arc::new(ModelRegistry::builtin()), EngineConfig::default());
    let runner = Arc::new(Runner {
        store: s.store.clone(),
        engine,
        dispatcher: Arc::new(MemoryDispatcher::new()),
        analytics: Arc::new(MemoryAnalytics::new()),
        durability: Durability::with_lease(Duration::from_secs(30)),
        clock: Arc::new(PausedClock::default()),
    });
    let other = Setup { runner, ..other };
    answer(&other, &run.id, &spec, None, Some("the account is AC-222222")).await;
    assert_eq!(deliver(&other, &run.id, Cause::Resume).await.unwrap(), Handled::Finished(RunStatus::Completed));
    assert_eq!((s.model.calls().len(), other.model.calls_matching("OPEN AC-222222 on pro")), (0, 1));
    let kinds: Vec<EventType> = s.progress.events(&run.id).iter().map(|e| e.kind).collect();
    assert_eq!(kinds.last(), Some(&EventType::RunCompleted));
}

#[tokio::test(start_paused = true)]
async fn text_sent_while_the_run_still_works_is_read_without_waiting_for_another_answer() {
    let s = setup(vec![
        extraction("{\"account_id\": \"AC-333333\", \"plan\": \"free\"}"),
        Script::reply("SIDE", "x").with_latency(Duration::from_secs(30)),
        Script::reply("OPEN", "opened"),
    ]);
    let mut def = definition(account(json!({})));
    def["steps"].as_array_mut().unwrap().push(json!({ "id": "side", "type": "llm", "prompt": "SIDE" }));
    let (run, spec) = queue(s.store.as_ref(), def).await;
    let delivery = deliver(&s, &run.id, Cause::Start);
    tokio::time::sleep(Duration::from_secs(5)).await; // the input waits, `side` still runs
    let (_, outcome) = answer(&s, &run.id, &spec, None, Some("AC-333333, free")).await;
    assert_eq!(outcome, AnswerOutcome::Recorded { requeued: false });
    // The runner does not park over the answer: it hands the run on to continue.
    assert_eq!(delivery.await.unwrap(), Handled::Suspended);
    assert_eq!(deliver(&s, &run.id, Cause::Continue).await.unwrap(), Handled::Finished(RunStatus::Completed));
    assert_eq!(s.model.calls_matching("OPEN AC-333333 on free"), 1);
}

#[tokio::test(start_paused = true)]
async fn of_two_answers_checked_against_the_same_state_only_the_first_counts() {
    let s = setup(vec![]);
    let (run, spec) = queue(s.store.as_ref(), definition(account(json!({})))).await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::Waiting);
    let before = InputState::default();
    let one = before.answered(
        turn(Some(json!({ "plan": "pro" })), None),
        Some(spec.fields.check(&Map::new(), json!({ "plan": "pro" }).as_object().unwrap())),
        3,
    );
    let two = before.answered(
        turn(Some(json!({ "plan": "free" })), None),
        Some(spec.fields.check(&Map::new(), json!({ "plan": "free" }).as_object().unwrap())),
        3,
    );
    assert_eq!(s.store.record_input(&run.id, &step_id(), 0, &one, false).await.unwrap(), AnswerOutcome::Recorded { requeued: false });
    assert_eq!(s.store.record_input(&run.id, &step_id(), 0, &two, false).await.unwrap(), AnswerOutcome::Stale(one.clone()));
    assert_eq!(s.store.get_run(&run.id).await.unwrap().unwrap().inputs[&step_id()].attempts(), 1);
}
