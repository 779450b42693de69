//! Cancelling a run: the request is recorded on the run (by the API), and the runner that
//! holds it — or the next to claim it — stops it. In paused time, against in-memory ports.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::durability::Durability;
use chainrun_core::engine::{Engine, EngineConfig};
use chainrun_core::ids::{Principal, RunId};
use chainrun_core::memory::{MemoryAnalytics, MemoryDispatcher, MemoryProgress, MemoryStore, PausedClock, Script, ScriptedModel};
use chainrun_core::ports::{ControlOutcome, RunStore};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::run::{Cause, ControlKind, ControlRequest, EventType, RunRecord, RunStatus, RunnerEvent, StepStatus};
use chainrun_runner::{Handled, Runner};
use chrono::Utc;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

const LEASE: Duration = Duration::from_secs(30);

struct Setup {
    runner: Arc<Runner>,
    model: Arc<ScriptedModel>,
    store: Arc<MemoryStore>,
    progress: Arc<MemoryProgress>,
    timers: Arc<chainrun_core::memory::MemoryTimers>,
}

fn setup(scripts: Vec<Script>) -> Setup {
    let model = Arc::new(ScriptedModel::new(scripts));
    let store = Arc::new(MemoryStore::new());
    let progress = Arc::new(MemoryProgress::new());
    let timers = Arc::new(chainrun_core::memory::MemoryTimers::new());
    let engine = Engine::new(model.clone(), store.clone(), progress.clone(), Arc::new(ModelRegistry::builtin()), EngineConfig::default())
        .with_timers(timers.clone());
    let runner = Arc::new(Runner {
        store: store.clone(),
        engine,
        dispatcher: Arc::new(MemoryDispatcher::new()),
        analytics: Arc::new(MemoryAnalytics::new()),
        durability: Durability::with_lease(LEASE),
        clock: Arc::new(PausedClock::default()),
    });
    Setup { runner, model, store, progress, timers }
}

async fn queue(store: &dyn RunStore, steps: Value) -> RunRecord {
    let def = json!({ "name": "t", "defaults": { "model": "amazon.nova-micro-v1:0" }, "steps": steps });
    let mut run =
        RunRecord::new("t".parse().unwrap(), def.clone(), json!({}), "alice".parse().unwrap(), vec![Principal::User("alice".into())], Utc::now());
    run.step_order = chainrun_core::graph::validate_json(&def, &ModelRegistry::builtin()).unwrap().step_order();
    store.create_run(&run).await.unwrap();
    run
}

fn deliver(s: &Setup, run: &RunId, cause: Cause) -> tokio::task::JoinHandle<Handled> {
    let (runner, run) = (s.runner.clone(), run.clone());
    let deadline = Utc::now() + chrono::Duration::minutes(15);
    tokio::spawn(async move { runner.handle(RunnerEvent::new(run, cause), "inv", deadline, Duration::from_secs(90)).await.unwrap() })
}

/// `a`, then a slow `b`, then `c`: a run with a step in flight and one not started.
fn a_slow_b_then_c() -> Value {
    json!([
        { "id": "a", "type": "llm", "prompt": "FIRST" },
        { "id": "b", "type": "llm", "prompt": "SLOW {{ steps.a.text }}" },
        { "id": "c", "type": "llm", "prompt": "LAST {{ steps.b.text }}" }
    ])
}

fn asked(kind: ControlKind, who: &str, reason: &str) -> ControlRequest {
    ControlRequest { kind, by: who.parse().unwrap(), at: Utc::now(), reason: Some(reason.into()) }
}

fn cancel_by(who: &str) -> ControlRequest {
    asked(ControlKind::Cancel, who, "no longer needed")
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_run_stops_its_steps_in_flight_starts_nothing_and_keeps_its_spend_exact() {
    let s = setup(vec![Script::reply("FIRST", "1"), Script::reply("SLOW", "2").with_latency(Duration::from_secs(600)), Script::reply("LAST", "3")]);
    let run = queue(s.store.as_ref(), a_slow_b_then_c()).await;
    let delivery = deliver(&s, &run.id, Cause::Start);
    tokio::time::sleep(Duration::from_secs(5)).await; // `a` settled, `b` in flight
    assert_eq!(s.store.request_control(&run.id, &cancel_by("alice")).await.unwrap(), ControlOutcome::Recorded);
    // The runner learns of it at its next heartbeat (a third of the lease), long before `b` answers.
    assert_eq!(delivery.await.unwrap(), Handled::Finished(RunStatus::Cancelled));

    let (calls_b, calls_c) = (s.model.calls_matching("SLOW"), s.model.calls_matching("LAST"));
    assert_eq!((calls_b, calls_c), (1, 0), "b was stopped, c never started");
    let stored = s.store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Cancelled);
    let steps = s.store.get_steps(&run.id).await.unwrap();
    let status = |id: &str| steps.iter().find(|r| r.step_id.as_str() == id).map(|r| r.status);
    assert_eq!((status("a"), status("b"), status("c")), (Some(StepStatus::Completed), Some(StepStatus::Cancelled), Some(StepStatus::Cancelled)));
    // Exact: a's charge, plus b's call in flight at its worst case, reported apart.
    let a_cost = steps.iter().find(|r| r.step_id.as_str() == "a").unwrap().cost;
    assert_eq!(stored.totals.cost, a_cost);
    assert_eq!(stored.totals.lost.calls, 1, "b's call was in flight when it was stopped");
    assert!(stored.totals.lost.cost.pico() > 0);

    let events = s.progress.events(&run.id);
    let cancelled: Vec<String> =
        events.iter().filter(|e| e.kind == EventType::StepCancelled).map(|e| e.step_id.clone().unwrap().to_string()).collect();
    assert_eq!(cancelled, ["b", "c"]);
    let last = events.last().unwrap();
    assert_eq!(last.kind, EventType::RunCancelled);
    assert_eq!((last.data["by"].as_str(), last.data["reason"].as_str()), (Some("alice"), Some("no longer needed")));
    let reason = &events.iter().find(|e| e.kind == EventType::StepCancelled).unwrap().data["reason"];
    assert_eq!(reason, "the run was cancelled by alice");
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>(), "gap-free");
}

#[tokio::test(start_paused = true)]
async fn a_run_cancelled_before_any_runner_claims_it_ends_without_starting() {
    let s = setup(vec![Script::reply("FIRST", "1")]);
    let run = queue(s.store.as_ref(), json!([{ "id": "a", "type": "llm", "prompt": "FIRST" }])).await;
    assert_eq!(s.store.request_control(&run.id, &cancel_by("alice")).await.unwrap(), ControlOutcome::Recorded);
    assert_eq!(deliver(&s, &run.id, Cause::Control).await.unwrap(), Handled::Finished(RunStatus::Cancelled));
    assert_eq!(s.model.calls().len(), 0);
    let kinds: Vec<EventType> = s.progress.events(&run.id).iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventType::StepCancelled, EventType::RunCancelled]);
    // A later delivery finds it finished.
    assert_eq!(deliver(&s, &run.id, Cause::Sweep).await.unwrap(), Handled::AlreadyFinished);
}

#[tokio::test(start_paused = true)]
async fn a_run_whose_runner_died_is_cancelled_by_the_next_claim() {
    let s = setup(vec![Script::reply("SLOW", "1").with_latency(Duration::from_secs(600))]);
    let run = queue(s.store.as_ref(), json!([{ "id": "a", "type": "llm", "prompt": "SLOW" }])).await;
    let crashed = deliver(&s, &run.id, Cause::Start);
    tokio::time::sleep(Duration::from_secs(5)).await;
    crashed.abort();
    let _ = crashed.await;
    s.store.request_control(&run.id, &cancel_by("alice")).await.unwrap();
    tokio::time::sleep(LEASE).await;
    assert_eq!(deliver(&s, &run.id, Cause::Sweep).await.unwrap(), Handled::Finished(RunStatus::Cancelled));
    let stored = s.store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!((stored.totals.lost.calls, s.model.calls().len()), (1, 1), "the dead runner's call counts as lost; nothing is called again");
}

fn pause_by(who: &str) -> ControlRequest {
    asked(ControlKind::Pause, who, "checking the draft")
}

#[tokio::test(start_paused = true)]
async fn a_paused_run_lets_its_steps_in_flight_finish_waits_holding_no_runner_and_resumes_where_it_stopped() {
    let s = setup(vec![Script::reply("FIRST", "1"), Script::reply("SLOW", "2").with_latency(Duration::from_secs(20)), Script::reply("LAST", "3")]);
    let run = queue(s.store.as_ref(), a_slow_b_then_c()).await;
    let delivery = deliver(&s, &run.id, Cause::Start);
    tokio::time::sleep(Duration::from_secs(5)).await; // `b` in flight
    assert_eq!(s.store.request_control(&run.id, &pause_by("alice")).await.unwrap(), ControlOutcome::Recorded);
    assert_eq!(delivery.await.unwrap(), Handled::Waiting);
    assert_eq!((s.model.calls_matching("SLOW"), s.model.calls_matching("LAST")), (1, 0), "b finished, c did not start");
    let parked = s.store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!(parked.status, RunStatus::AwaitingInput);
    assert_eq!(parked.waiting.as_ref().and_then(|w| w.by.as_ref()).map(|u| u.as_str()), Some("alice"));
    let waiting = s.progress.events(&run.id).last().unwrap().clone();
    assert_eq!(waiting.kind, EventType::AwaitingInput);
    assert_eq!(
        (waiting.data["kind"].as_str(), waiting.data["settled_steps"].as_u64(), waiting.data["step_count"].as_u64()),
        (Some("paused"), Some(2), Some(3))
    );
    assert_eq!(waiting.data["reason"], "checking the draft");

    // Days later, nothing has run, and no delivery (a sweep, a duplicate) runs it.
    tokio::time::sleep(Duration::from_secs(3 * 86_400)).await;
    assert_eq!(deliver(&s, &run.id, Cause::Sweep).await.unwrap(), Handled::Waiting);
    assert_eq!(s.model.calls().len(), 2);

    let resumption = chainrun_core::run::Resumption { by: "bob".parse().unwrap(), at: Utc::now(), budget: None };
    assert_eq!(s.store.resume(&run.id, &resumption).await.unwrap(), chainrun_core::ports::ResumeOutcome::Resumed);
    assert_eq!(deliver(&s, &run.id, Cause::Resume).await.unwrap(), Handled::Finished(RunStatus::Completed));
    assert_eq!((s.model.calls_matching("FIRST"), s.model.calls_matching("SLOW"), s.model.calls_matching("LAST")), (1, 1, 1), "each call once");
    let events = s.progress.events(&run.id);
    let resumed = events.iter().find(|e| e.kind == EventType::RunResumed).unwrap();
    assert_eq!(
        (resumed.data["cause"].as_str(), resumed.data["by"].as_str(), resumed.data["what"].as_str(), resumed.data["settled_steps"].as_u64()),
        (Some("resume"), Some("bob"), Some("resumed the paused run"), Some(2))
    );
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>(), "gap-free across the pause");
}

#[tokio::test(start_paused = true)]
async fn a_map_paused_midway_keeps_its_settled_items_and_runs_only_the_rest_after_resume() {
    let s = setup(vec![Script::reply("ITEM", "ok").with_latency(Duration::from_secs(4))]);
    let run = queue(
        s.store.as_ref(),
        json!([{ "id": "m", "type": "map", "over": "[1, 2, 3, 4, 5, 6, 7, 8]", "max_concurrency": 2,
                 "step": { "type": "llm", "prompt": "ITEM {{ item }}" } }]),
    )
    .await;
    let delivery = deliver(&s, &run.id, Cause::Start);
    tokio::time::sleep(Duration::from_secs(9)).await; // two pairs done, a third in flight
    s.store.request_control(&run.id, &pause_by("alice")).await.unwrap();
    assert_eq!(delivery.await.unwrap(), Handled::Waiting);
    let before = s.model.calls_matching("ITEM");
    assert!((4..8).contains(&before), "{before} items called before the pause took hold");

    let resumption = chainrun_core::run::Resumption { by: "alice".parse().unwrap(), at: Utc::now(), budget: None };
    s.store.resume(&run.id, &resumption).await.unwrap();
    assert_eq!(deliver(&s, &run.id, Cause::Resume).await.unwrap(), Handled::Finished(RunStatus::Completed));
    assert_eq!(s.model.calls_matching("ITEM"), 8, "every item called exactly once");
}

#[tokio::test(start_paused = true)]
async fn a_paused_run_can_be_cancelled_and_ends_without_running_anything() {
    let s = setup(vec![Script::reply("FIRST", "1"), Script::reply("LAST", "3")]);
    let run = queue(
        s.store.as_ref(),
        json!([{ "id": "a", "type": "llm", "prompt": "FIRST" }, { "id": "c", "type": "llm", "prompt": "LAST {{ steps.a.text }}" }]),
    )
    .await;
    s.store.request_control(&run.id, &pause_by("alice")).await.unwrap();
    assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::Waiting, "paused before it started: nothing runs");
    assert_eq!(s.model.calls().len(), 0);
    assert_eq!(s.store.request_control(&run.id, &cancel_by("alice")).await.unwrap(), ControlOutcome::Recorded);
    assert_eq!(deliver(&s, &run.id, Cause::Control).await.unwrap(), Handled::Finished(RunStatus::Cancelled));
    assert_eq!(s.model.calls().len(), 0);
}

// ---------------------------------------------------------------- review steps

fn decide(verdict: chainrun_core::run::Verdict, output: Option<Value>) -> chainrun_core::run::ReviewDecision {
    chainrun_core::run::ReviewDecision { decision: verdict, output, comment: Some("looks right".into()), by: "bob".parse().unwrap(), at: Utc::now() }
}

fn review_flow() -> Value {
    json!([
        { "id": "draft", "type": "llm", "prompt": "DRAFT" },
        { "id": "approve", "type": "review", "show": "Send this? {{ steps.draft.text }}", "reviewers": ["user:bob"] },
        { "id": "send", "type": "llm", "prompt": "SEND {{ steps.approve.text }}" },
        { "id": "side", "type": "llm", "prompt": "SIDE" }
    ])
}

#[tokio::test(start_paused = true)]
async fn a_review_waits_for_its_decision_while_other_branches_finish_then_downstream_reads_the_approved_content() {
    use chainrun_core::ports::DecideOutcome;
    use chainrun_core::run::Verdict;
    let s = setup(vec![Script::reply("DRAFT", "Dear customer"), Script::reply("SIDE", "x"), Script::reply("SEND", "sent")]);
    let run = queue(s.store.as_ref(), review_flow()).await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::Waiting);
    assert_eq!((s.model.calls_matching("SIDE"), s.model.calls_matching("SEND")), (1, 0), "the other branch ran; send waits");
    let parked = s.store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!(parked.status, RunStatus::AwaitingInput);
    assert_eq!(parked.waiting.as_ref().map(|w| w.steps.iter().map(|s| s.to_string()).collect::<Vec<_>>()), Some(vec!["approve".to_owned()]));
    let events = s.progress.events(&run.id);
    let asked = events.iter().find(|e| e.kind == EventType::AwaitingInput && e.step_id.is_some()).unwrap();
    assert_eq!((asked.data["show"].as_str(), &asked.data["reviewers"]), (Some("Send this? Dear customer"), &json!(["user:bob"])));
    // The run-level event lists the waiting steps, and counts the settled ones apart.
    let parked_event = events.iter().find(|e| e.kind == EventType::AwaitingInput && e.step_id.is_none()).unwrap();
    assert_eq!((&parked_event.data["steps"], &parked_event.data["kind"]), (&json!(["approve"]), &json!("review")));
    assert!(parked_event.data["step_count"].as_u64() > parked_event.data["settled_steps"].as_u64());
    let step = s.store.get_steps(&run.id).await.unwrap().into_iter().find(|r| r.step_id.as_str() == "approve").unwrap();
    assert_eq!(step.status, StepStatus::Waiting);

    // A week later, a decision queues the run; the next runner continues it.
    tokio::time::sleep(Duration::from_secs(7 * 86_400)).await;
    let id = chainrun_core::ids::StepId::parse("approve").unwrap();
    assert_eq!(s.store.decide(&run.id, &id, &decide(Verdict::Approve, None)).await.unwrap(), DecideOutcome::Recorded { requeued: true });
    assert_eq!(deliver(&s, &run.id, Cause::Resume).await.unwrap(), Handled::Finished(RunStatus::Completed));
    let prompts: Vec<String> = s.model.calls().into_iter().map(|c| c.prompt).collect();
    assert!(prompts.contains(&"SEND Send this? Dear customer".to_owned()), "{prompts:?}");
    assert_eq!(s.model.calls().len(), 3, "each call once");
    let steps = s.store.get_steps(&run.id).await.unwrap();
    let approve = steps.iter().find(|r| r.step_id.as_str() == "approve").unwrap();
    assert_eq!((approve.status, approve.detail.as_ref().map(|d| d["by"].clone())), (StepStatus::Completed, Some(json!("bob"))));
    let resumed = s.progress.events(&run.id).into_iter().find(|e| e.kind == EventType::RunResumed).unwrap();
    assert_eq!(
        (resumed.data["by"].as_str(), resumed.data["what"].as_str()),
        (Some("bob"), Some("decided approve on review approve")),
        "who, and what"
    );
}

#[tokio::test(start_paused = true)]
async fn an_edited_review_passes_the_reviewers_output_downstream_and_a_rejection_fails_the_run() {
    use chainrun_core::run::Verdict;
    let s = setup(vec![Script::reply("DRAFT", "Dear customer"), Script::reply("SIDE", "x"), Script::reply("SEND", "sent")]);
    let edited = queue(s.store.as_ref(), review_flow()).await;
    assert_eq!(deliver(&s, &edited.id, Cause::Start).await.unwrap(), Handled::Waiting);
    let id = chainrun_core::ids::StepId::parse("approve").unwrap();
    s.store.decide(&edited.id, &id, &decide(Verdict::Edit, Some(json!("Dear valued customer")))).await.unwrap();
    assert_eq!(deliver(&s, &edited.id, Cause::Resume).await.unwrap(), Handled::Finished(RunStatus::Completed));
    assert_eq!(s.model.calls_matching("SEND Dear valued customer"), 1);

    let rejected = queue(s.store.as_ref(), review_flow()).await;
    assert_eq!(deliver(&s, &rejected.id, Cause::Start).await.unwrap(), Handled::Waiting);
    s.store.decide(&rejected.id, &id, &decide(Verdict::Reject, None)).await.unwrap();
    assert_eq!(deliver(&s, &rejected.id, Cause::Resume).await.unwrap(), Handled::Finished(RunStatus::Failed));
    let run = s.store.get_run(&rejected.id).await.unwrap().unwrap();
    let error = run.error.unwrap();
    assert_eq!(error.code, "REVIEW_REJECTED");
    assert!(error.message.contains("rejected by bob: looks right"), "{}", error.message);
    assert_eq!(s.model.calls_matching("SEND"), 1, "nothing was sent for the rejected draft");
}

#[tokio::test(start_paused = true)]
async fn a_decision_made_while_the_run_still_works_is_used_without_waiting() {
    use chainrun_core::run::Verdict;
    let s = setup(vec![Script::reply("DRAFT", "d"), Script::reply("SIDE", "x").with_latency(Duration::from_secs(30)), Script::reply("SEND", "sent")]);
    let run = queue(s.store.as_ref(), review_flow()).await;
    let delivery = deliver(&s, &run.id, Cause::Start);
    tokio::time::sleep(Duration::from_secs(5)).await; // the review waits, `side` still runs
    let id = chainrun_core::ids::StepId::parse("approve").unwrap();
    s.store.decide(&run.id, &id, &decide(Verdict::Approve, None)).await.unwrap();
    // The runner does not park over the decision: it hands the run on to continue.
    assert_eq!(delivery.await.unwrap(), Handled::Suspended);
    assert_eq!(deliver(&s, &run.id, Cause::Continue).await.unwrap(), Handled::Finished(RunStatus::Completed));
    assert_eq!(s.model.calls_matching("SEND"), 1);
}

#[tokio::test(start_paused = true)]
async fn auto_approve_approves_every_review_at_once_and_records_it() {
    let s = setup(vec![Script::reply("DRAFT", "d"), Script::reply("SIDE", "x"), Script::reply("SEND", "sent")]);
    let def = json!({ "name": "t", "defaults": { "model": "amazon.nova-micro-v1:0" }, "steps": review_flow() });
    let mut run =
        RunRecord::new("t".parse().unwrap(), def.clone(), json!({}), "alice".parse().unwrap(), vec![Principal::User("alice".into())], Utc::now());
    run.options.auto_approve = true;
    s.store.create_run(&run).await.unwrap();
    assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::Finished(RunStatus::Completed));
    let steps = s.store.get_steps(&run.id).await.unwrap();
    let approve = steps.iter().find(|r| r.step_id.as_str() == "approve").unwrap();
    assert_eq!(approve.detail.as_ref().map(|d| d["by"].clone()), Some(json!("auto_approve")));
    assert!(!s.progress.events(&run.id).iter().any(|e| e.kind == EventType::AwaitingInput));
}

// ---------------------------------------------------------------- review deadlines

fn timed_review(on_timeout: Value) -> Value {
    json!([
        { "id": "draft", "type": "llm", "prompt": "DRAFT" },
        { "id": "approve", "type": "review", "show": "{{ steps.draft.text }}", "reviewers": ["user:bob"],
          "timeout": "1h", "on_timeout": on_timeout },
        { "id": "send", "type": "llm", "prompt": "SEND {{ steps.approve.text }}" }
    ])
}

#[tokio::test(start_paused = true)]
async fn a_review_nobody_decides_is_approved_by_its_deadline_without_anyone_polling() {
    let s = setup(vec![Script::reply("DRAFT", "d"), Script::reply("SEND", "sent")]);
    let run = queue(s.store.as_ref(), timed_review(json!("approve"))).await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::Waiting);
    let parked = s.store.get_run(&run.id).await.unwrap().unwrap();
    let deadline = parked.waiting.as_ref().and_then(|w| w.deadline).expect("a deadline");
    assert_eq!(s.timers.set(), vec![(run.id.clone(), deadline)], "a one-time wake-up at the deadline");
    // Before it, the sweeper has nothing to hand over; after it, it hands the run on.
    tokio::time::sleep(Duration::from_secs(3599)).await;
    assert!(s.store.due(s.runner.clock.now(), 10).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.store.due(s.runner.clock.now(), 10).await.unwrap(), vec![run.id.clone()]);
    assert!(s.runner.clock.now() >= deadline);
    assert_eq!(deliver(&s, &run.id, Cause::Sweep).await.unwrap(), Handled::Finished(RunStatus::Completed));
    assert_eq!(s.model.calls_matching("SEND d"), 1);
    let decided = s.store.get_run(&run.id).await.unwrap().unwrap().decisions;
    let by_deadline = &decided[&chainrun_core::ids::StepId::parse("approve").unwrap()];
    assert_eq!((by_deadline.decision, by_deadline.by.as_str()), (chainrun_core::run::Verdict::Approve, "deadline"));
}

#[tokio::test(start_paused = true)]
async fn a_deadline_escalates_to_more_reviewers_with_a_new_deadline_then_rejects() {
    let s = setup(vec![Script::reply("DRAFT", "d"), Script::reply("SEND", "sent")]);
    let escalate = json!({ "escalate_to": ["group:leads"], "timeout": "2h", "then": "reject" });
    let run = queue(s.store.as_ref(), timed_review(escalate)).await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::Waiting);
    tokio::time::sleep(Duration::from_secs(3601)).await;
    assert_eq!(deliver(&s, &run.id, Cause::Sweep).await.unwrap(), Handled::Waiting, "escalated, waiting again");
    let escalated = s.progress.events(&run.id).into_iter().filter(|e| e.kind == EventType::AwaitingInput && e.step_id.is_some()).last().unwrap();
    assert_eq!(escalated.data["reviewers"], json!(["user:bob", "group:leads"]));
    assert!(escalated.data["reason"].as_str().unwrap().contains("escalated"), "{}", escalated.data);
    let waiting = s.store.get_run(&run.id).await.unwrap().unwrap().waiting.unwrap();
    assert_eq!(waiting.deadline.map(|d| (d - s.runner.clock.now()).num_seconds()), Some(7200));

    tokio::time::sleep(Duration::from_secs(7201)).await;
    assert_eq!(deliver(&s, &run.id, Cause::Sweep).await.unwrap(), Handled::Finished(RunStatus::Failed));
    let error = s.store.get_run(&run.id).await.unwrap().unwrap().error.unwrap();
    assert_eq!(error.code, "REVIEW_REJECTED");
    assert!(error.message.contains("rejected by deadline"), "{}", error.message);
    assert_eq!(s.model.calls_matching("SEND"), 0);
}

// ---------------------------------------------------------------- budget pause

async fn queue_with_budget(store: &dyn RunStore, budget: Value, steps: Value) -> RecordAndDef {
    let def = json!({ "name": "t", "defaults": { "model": "amazon.nova-micro-v1:0", "max_tokens": 100 }, "budget": budget, "steps": steps });
    let mut run =
        RunRecord::new("t".parse().unwrap(), def.clone(), json!({}), "alice".parse().unwrap(), vec![Principal::User("alice".into())], Utc::now());
    run.step_order = chainrun_core::graph::validate_json(&def, &ModelRegistry::builtin()).unwrap().step_order();
    store.create_run(&run).await.unwrap();
    RecordAndDef(run)
}

struct RecordAndDef(RunRecord);

#[tokio::test(start_paused = true)]
async fn a_call_the_budget_refuses_pauses_the_run_and_a_raised_budget_continues_it_where_it_stopped() {
    use chainrun_core::run::{BudgetRaise, Resumption, WaitKind};
    let s = setup(vec![Script::reply("FIRST", &"word ".repeat(60)), Script::reply("SECOND", "done")]);
    let RecordAndDef(run) = queue_with_budget(
        s.store.as_ref(),
        json!({ "max_total_tokens": 400, "on_exceeded": "pause" }),
        json!([{ "id": "a", "type": "llm", "prompt": "FIRST" }, { "id": "b", "type": "llm", "prompt": "SECOND {{ steps.a.text }}" }]),
    )
    .await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::Waiting);
    assert_eq!((s.model.calls_matching("FIRST"), s.model.calls_matching("SECOND")), (1, 0), "b's call was refused, not made");
    let parked = s.store.get_run(&run.id).await.unwrap().unwrap();
    let waiting = parked.waiting.clone().unwrap();
    assert_eq!((parked.status, waiting.kind), (RunStatus::AwaitingInput, WaitKind::Budget));
    assert!(waiting.reason.as_deref().unwrap_or_default().contains("max_total_tokens"), "{waiting:?}");
    let b = s.store.get_steps(&run.id).await.unwrap().into_iter().find(|r| r.step_id.as_str() == "b").unwrap();
    assert_eq!(b.status, StepStatus::Waiting);
    let asked = s.progress.events(&run.id).last().unwrap().clone();
    assert_eq!((asked.kind, asked.data["kind"].as_str()), (EventType::AwaitingInput, Some("budget")));

    let from = parked.budget(chainrun_core::budget::BudgetLimits { max_cost: None, max_total_tokens: Some(400) });
    let to = chainrun_core::budget::BudgetLimits { max_cost: None, max_total_tokens: Some(1000) };
    let raise = BudgetRaise { by: "bob".parse().unwrap(), at: Utc::now(), from: from.into(), to: to.into() };
    let resumption = Resumption { by: "bob".parse().unwrap(), at: Utc::now(), budget: Some(raise.clone()) };
    s.store.resume(&run.id, &resumption).await.unwrap();
    assert_eq!(deliver(&s, &run.id, Cause::Resume).await.unwrap(), Handled::Finished(RunStatus::Completed));
    assert_eq!((s.model.calls_matching("FIRST"), s.model.calls_matching("SECOND")), (1, 1), "a is not paid again");
    let done = s.store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!(done.budget_raises, vec![raise]);
    assert!(done.totals.total_tokens() <= 1000);
}

#[tokio::test(start_paused = true)]
async fn without_on_exceeded_a_refused_call_still_fails_its_step() {
    let s = setup(vec![Script::reply("FIRST", &"word ".repeat(60)), Script::reply("SECOND", "done")]);
    let RecordAndDef(run) = queue_with_budget(
        s.store.as_ref(),
        json!({ "max_total_tokens": 400 }),
        json!([{ "id": "a", "type": "llm", "prompt": "FIRST" }, { "id": "b", "type": "llm", "prompt": "SECOND {{ steps.a.text }}" }]),
    )
    .await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::Finished(RunStatus::Failed));
    assert_eq!(s.store.get_run(&run.id).await.unwrap().unwrap().error.unwrap().code, "BUDGET_EXCEEDED");
}

#[tokio::test(start_paused = true)]
async fn a_router_branches_on_the_decision_of_an_optional_review() {
    use chainrun_core::run::Verdict;
    let flow = json!([
        { "id": "draft", "type": "llm", "prompt": "DRAFT" },
        { "id": "check", "type": "review", "show": "{{ steps.draft.text }}", "required": false },
        { "id": "route", "type": "router", "depends_on": ["draft", "check"], "join": "any",
          "routes": [{ "when": "steps.check.status == 'COMPLETED'", "to": ["send"] }], "default": ["rework"] },
        { "id": "send", "type": "llm", "depends_on": ["route"], "prompt": "SEND" },
        { "id": "rework", "type": "llm", "depends_on": ["route"], "prompt": "REWORK {{ steps.draft.text }}" }
    ]);
    for (verdict, called, skipped) in [(Verdict::Approve, "SEND", "REWORK"), (Verdict::Reject, "REWORK", "SEND")] {
        let s = setup(vec![Script::reply("DRAFT", "d"), Script::reply("SEND", "sent"), Script::reply("REWORK", "again")]);
        let run = queue(s.store.as_ref(), flow.clone()).await;
        assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::Waiting);
        let id = chainrun_core::ids::StepId::parse("check").unwrap();
        let decision = chainrun_core::run::ReviewDecision { by: "alice".parse().unwrap(), ..decide(verdict, None) };
        s.store.decide(&run.id, &id, &decision).await.unwrap();
        assert_eq!(deliver(&s, &run.id, Cause::Resume).await.unwrap(), Handled::Finished(RunStatus::Completed), "{verdict:?}");
        assert_eq!((s.model.calls_matching(called), s.model.calls_matching(skipped)), (1, 0), "{verdict:?}");
    }
}

/// Starts the next revision of a finished run as the API does: `step` retried.
async fn retry(s: &Setup, run: &RunId, step: &str) -> chainrun_core::revision::Revision {
    use chainrun_core::revision::{Revision, RevisionEnd, RevisionKind, rerun_set};
    let stored = s.store.get_run(run).await.unwrap().unwrap();
    let graph = chainrun_core::graph::validate_json(&stored.definition, &ModelRegistry::builtin()).unwrap();
    let records = stored.records_at(s.store.get_steps(run).await.unwrap(), stored.revision);
    let step = chainrun_core::ids::StepId::parse(step).unwrap();
    let revision = Revision {
        revision: stored.revision + 1,
        kind: RevisionKind::Retry,
        rerun: rerun_set(&graph, &records, RevisionKind::Retry, &step).unwrap(),
        step,
        by: "alice".parse().unwrap(),
        at: Utc::now(),
        comment: None,
        previous: RevisionEnd { status: stored.status, finished_at: stored.finished_at, error: stored.error.clone(), totals: stored.totals },
        budget: None,
    };
    assert_eq!(s.store.start_revision(run, &revision, None).await.unwrap(), chainrun_core::ports::RevisionOutcome::Started);
    revision
}

#[tokio::test(start_paused = true)]
async fn a_revision_whose_runner_dies_is_taken_over_announced_once_and_its_map_items_stay_its_own() {
    let s = setup(vec![Script::reply("FIRST", "1"), Script::reply("ITEM", "i").with_latency(Duration::from_secs(20)), Script::reply("LAST", "3")]);
    let run = queue(
        s.store.as_ref(),
        json!([
            { "id": "a", "type": "llm", "prompt": "FIRST" },
            { "id": "m", "type": "map", "over": "[1, 2, 3, 4]", "max_concurrency": 1, "step": { "type": "llm", "prompt": "ITEM {{ item }} {{ steps.a.text }}" } },
            { "id": "c", "type": "llm", "prompt": "LAST {{ steps.m.output }}" }
        ]),
    )
    .await;
    assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::Finished(RunStatus::Completed));
    let first = s.store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!(s.model.calls().len(), 6);

    let revision = retry(&s, &run.id, "m").await;
    assert_eq!(revision.rerun, ["m", "c"].map(|id| chainrun_core::ids::StepId::parse(id).unwrap()));
    // The revision's runner dies in its third item; the next delivery takes over.
    let crashed = deliver(&s, &run.id, Cause::Revision);
    tokio::time::sleep(Duration::from_secs(45)).await;
    crashed.abort();
    let _ = crashed.await;
    tokio::time::sleep(LEASE).await;
    assert_eq!(deliver(&s, &run.id, Cause::Sweep).await.unwrap(), Handled::Finished(RunStatus::Completed));

    // Items 1 and 2 of the revision ran once; the one in flight again; a never again.
    assert_eq!((s.model.calls_matching("FIRST"), s.model.calls_matching("ITEM"), s.model.calls_matching("LAST")), (1, 4 + 5, 2));
    let m = chainrun_core::ids::StepId::parse("m").unwrap();
    assert_eq!(s.store.get_items(&run.id, &m, 0).await.unwrap().len(), 4, "revision 0's items are untouched");
    assert_eq!(s.store.get_items(&run.id, &m, 1).await.unwrap().len(), 4);
    let events = s.progress.events(&run.id);
    let kinds: Vec<EventType> = events.iter().filter(|e| e.revision == 1).map(|e| e.kind).collect();
    assert_eq!(kinds.iter().filter(|k| **k == EventType::RevisionStarted).count(), 1, "announced once: {kinds:?}");
    assert_eq!(kinds.first(), Some(&EventType::RevisionStarted));
    assert!(kinds.contains(&EventType::RunResumed), "the takeover is a resume of the revision");
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>(), "one gap-free log");
    // Totals: both revisions, the lost call at its worst case apart from exact charges.
    let now = s.store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!(now.totals.model_calls, first.totals.model_calls + 5, "4 items (one of them twice… its lost call apart) and c");
    assert_eq!(now.totals.lost.calls, 1);
    assert_eq!(now.revisions[0].previous.totals, first.totals);
}
