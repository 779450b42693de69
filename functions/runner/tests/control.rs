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
}

fn setup(scripts: Vec<Script>) -> Setup {
    let model = Arc::new(ScriptedModel::new(scripts));
    let store = Arc::new(MemoryStore::new());
    let progress = Arc::new(MemoryProgress::new());
    let engine = Engine::new(model.clone(), store.clone(), progress.clone(), Arc::new(ModelRegistry::builtin()), EngineConfig::default());
    let runner = Arc::new(Runner {
        store: store.clone(),
        engine,
        dispatcher: Arc::new(MemoryDispatcher::new()),
        analytics: Arc::new(MemoryAnalytics::new()),
        durability: Durability::with_lease(LEASE),
        clock: Arc::new(PausedClock::default()),
    });
    Setup { runner, model, store, progress }
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

fn cancel_by(who: &str) -> ControlRequest {
    ControlRequest { kind: ControlKind::Cancel, by: who.parse().unwrap(), at: Utc::now(), reason: Some("no longer needed".into()) }
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_run_stops_its_steps_in_flight_starts_nothing_and_keeps_its_spend_exact() {
    let s = setup(vec![Script::reply("FIRST", "1"), Script::reply("SLOW", "2").with_latency(Duration::from_secs(600)), Script::reply("LAST", "3")]);
    let run = queue(
        s.store.as_ref(),
        json!([
            { "id": "a", "type": "llm", "prompt": "FIRST" },
            { "id": "b", "type": "llm", "prompt": "SLOW {{ steps.a.text }}" },
            { "id": "c", "type": "llm", "prompt": "LAST {{ steps.b.text }}" }
        ]),
    )
    .await;
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
    ControlRequest { kind: ControlKind::Pause, by: who.parse().unwrap(), at: Utc::now(), reason: Some("checking the draft".into()) }
}

#[tokio::test(start_paused = true)]
async fn a_paused_run_lets_its_steps_in_flight_finish_waits_holding_no_runner_and_resumes_where_it_stopped() {
    let s = setup(vec![Script::reply("FIRST", "1"), Script::reply("SLOW", "2").with_latency(Duration::from_secs(20)), Script::reply("LAST", "3")]);
    let run = queue(
        s.store.as_ref(),
        json!([
            { "id": "a", "type": "llm", "prompt": "FIRST" },
            { "id": "b", "type": "llm", "prompt": "SLOW {{ steps.a.text }}" },
            { "id": "c", "type": "llm", "prompt": "LAST {{ steps.b.text }}" }
        ]),
    )
    .await;
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
        (waiting.data["kind"].as_str(), waiting.data["settled_steps"].as_u64(), waiting.data["steps"].as_u64()),
        (Some("paused"), Some(2), Some(3))
    );
    assert_eq!(waiting.data["reason"], "checking the draft");

    // Days later, nothing has run, and no delivery (a sweep, a duplicate) runs it.
    tokio::time::sleep(Duration::from_secs(3 * 86_400)).await;
    assert_eq!(deliver(&s, &run.id, Cause::Sweep).await.unwrap(), Handled::Waiting);
    assert_eq!(s.model.calls().len(), 2);

    let resumption = chainrun_core::run::Resumption { by: "bob".parse().unwrap(), at: Utc::now() };
    assert_eq!(s.store.resume(&run.id, &resumption).await.unwrap(), chainrun_core::ports::ResumeOutcome::Resumed);
    assert_eq!(deliver(&s, &run.id, Cause::Resume).await.unwrap(), Handled::Finished(RunStatus::Completed));
    assert_eq!((s.model.calls_matching("FIRST"), s.model.calls_matching("SLOW"), s.model.calls_matching("LAST")), (1, 1, 1), "each call once");
    let events = s.progress.events(&run.id);
    let resumed = events.iter().find(|e| e.kind == EventType::RunResumed).unwrap();
    assert_eq!(
        (resumed.data["cause"].as_str(), resumed.data["by"].as_str(), resumed.data["settled_steps"].as_u64()),
        (Some("resume"), Some("bob"), Some(2))
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

    let resumption = chainrun_core::run::Resumption { by: "alice".parse().unwrap(), at: Utc::now() };
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
