//! The runner's delivery semantics against in-memory ports.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::aws::RunnerEvent;
use chainrun_core::engine::{Engine, EngineConfig};
use chainrun_core::ids::Principal;
use chainrun_core::memory::{MemoryDispatcher, MemoryProgress, MemoryStore, Script, ScriptedModel};
use chainrun_core::ports::RunStore;
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::run::{EventType, RunRecord, RunStatus};
use chainrun_runner::{Handled, Runner};
use chrono::Utc;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

struct Setup {
    runner: Arc<Runner>,
    model: Arc<ScriptedModel>,
    store: Arc<MemoryStore>,
    progress: Arc<MemoryProgress>,
    dispatcher: Arc<MemoryDispatcher>,
}

fn setup(scripts: Vec<Script>) -> Setup {
    let model = Arc::new(ScriptedModel::new(scripts));
    let store = Arc::new(MemoryStore::new());
    let progress = Arc::new(MemoryProgress::new());
    let dispatcher = Arc::new(MemoryDispatcher::new());
    let engine = Engine::new(model.clone(), store.clone(), progress.clone(), Arc::new(ModelRegistry::builtin()), EngineConfig::default());
    let runner = Arc::new(Runner { store: store.clone(), engine, dispatcher: dispatcher.clone() });
    Setup { runner, model, store, progress, dispatcher }
}

async fn queue(store: &MemoryStore, steps: serde_json::Value) -> RunRecord {
    let def = json!({ "name": "t", "defaults": { "model": "amazon.nova-micro-v1:0" }, "steps": steps });
    let run = RunRecord::new("t".into(), def, json!({}), "alice".into(), vec![Principal::User("alice".into())], Utc::now());
    store.create_run(&run).await.unwrap();
    run
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_delivery_runs_each_model_call_once() {
    let s = setup(vec![Script::reply("SLOW", "done").with_latency(Duration::from_secs(5))]);
    let run = queue(&s.store, json!([{ "id": "a", "type": "llm", "prompt": "SLOW" }])).await;
    let deadline = Utc::now() + chrono::Duration::minutes(15);
    let event = || RunnerEvent { run_id: run.id.clone() };
    // Two deliveries of the same event at once, then a third after the run finished.
    let (first, second) = tokio::join!(
        s.runner.handle(event(), "inv-1", deadline, Duration::from_secs(90)),
        s.runner.handle(event(), "inv-2", deadline, Duration::from_secs(90))
    );
    let mut outcomes = [first.unwrap(), second.unwrap()];
    outcomes.sort_by_key(|h| format!("{h:?}"));
    assert_eq!(outcomes, [Handled::AlreadyRunning, Handled::Finished(RunStatus::Completed)]);
    assert_eq!(s.runner.handle(event(), "inv-3", deadline, Duration::from_secs(90)).await.unwrap(), Handled::AlreadyFinished);
    assert_eq!(s.model.calls_matching("SLOW"), 1);
    let events = s.progress.events(&run.id);
    assert_eq!(events.iter().filter(|e| e.kind == EventType::RunStarted).count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_run_near_the_deadline_is_suspended_and_dispatched_again() {
    let s = setup(vec![Script::reply("ONE", "1").with_latency(Duration::from_secs(100)), Script::reply("TWO", "2")]);
    let run = queue(
        &s.store,
        json!([{ "id": "one", "type": "llm", "prompt": "ONE" }, { "id": "two", "type": "llm", "prompt": "TWO {{ steps.one.text }}" }]),
    )
    .await;
    // 120 s left: the margin is min(90 s, 120 s / 4) = 30 s. `one` starts, and when it ends
    // (t = 100 s) only 20 s are left, so `two` is not started.
    let deadline = Utc::now() + chrono::Duration::seconds(120);
    let handled = s.runner.handle(RunnerEvent { run_id: run.id.clone() }, "inv-1", deadline, Duration::from_secs(90)).await.unwrap();
    assert_eq!(handled, Handled::Suspended);
    assert_eq!(s.dispatcher.dispatched(), vec![run.id.clone()]);
    assert_eq!(s.model.calls_matching("TWO"), 0);
    // The re-dispatched invocation picks up where the first stopped.
    let handled = s
        .runner
        .handle(RunnerEvent { run_id: run.id.clone() }, "inv-2", Utc::now() + chrono::Duration::minutes(15), Duration::from_secs(90))
        .await
        .unwrap();
    assert_eq!(handled, Handled::Finished(RunStatus::Completed));
    assert_eq!((s.model.calls_matching("ONE"), s.model.calls_matching("TWO 1")), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_short_invocation_still_makes_progress() {
    // A 20 s invocation with a 90 s margin would otherwise suspend before every step forever.
    let s = setup(vec![Script::reply("QUICK", "ok").with_latency(Duration::from_secs(1))]);
    let run = queue(&s.store, json!([{ "id": "a", "type": "llm", "prompt": "QUICK" }])).await;
    let handled = s
        .runner
        .handle(RunnerEvent { run_id: run.id.clone() }, "inv-1", Utc::now() + chrono::Duration::seconds(20), Duration::from_secs(90))
        .await
        .unwrap();
    assert_eq!(handled, Handled::Finished(RunStatus::Completed));
}

#[tokio::test]
async fn an_unknown_run_is_acknowledged_not_retried() {
    let s = setup(vec![]);
    let handled = s
        .runner
        .handle(RunnerEvent { run_id: chainrun_core::ids::RunId::new() }, "inv", Utc::now() + chrono::Duration::minutes(1), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(handled, Handled::UnknownRun);
}

#[tokio::test(start_paused = true)]
async fn a_deadline_in_the_past_is_treated_as_unknown_so_the_lease_stays_live() {
    let s = setup(vec![Script::reply("WORK", "ok").with_latency(Duration::from_secs(5))]);
    let run = queue(&s.store, json!([{ "id": "a", "type": "llm", "prompt": "WORK" }])).await;
    let bogus = chrono::DateTime::from_timestamp_millis(695_605).unwrap();
    let event = || RunnerEvent { run_id: run.id.clone() };
    let (first, second) = tokio::join!(
        s.runner.handle(event(), "inv-1", bogus, Duration::from_secs(90)),
        s.runner.handle(event(), "inv-2", bogus, Duration::from_secs(90))
    );
    let mut outcomes = [first.unwrap(), second.unwrap()];
    outcomes.sort_by_key(|h| format!("{h:?}"));
    assert_eq!(outcomes, [Handled::AlreadyRunning, Handled::Finished(RunStatus::Completed)]);
    assert_eq!(s.model.calls_matching("WORK"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_runner_whose_lease_was_taken_over_stops_without_an_error() {
    let s = setup(vec![Script::reply("LONG", "ok").with_latency(Duration::from_secs(60))]);
    let run = queue(&s.store, json!([{ "id": "a", "type": "llm", "prompt": "LONG" }])).await;
    let store = s.store.clone();
    let id = run.id.clone();
    let first = tokio::spawn({
        let runner = s.runner.clone();
        let id = id.clone();
        async move { runner.handle(RunnerEvent { run_id: id }, "inv-1", Utc::now() + chrono::Duration::minutes(15), Duration::from_secs(90)).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Another runner takes the run over as if the first one's lease had expired.
    let thief = chainrun_core::ports::Lease { holder: "thief".into(), expires_at: Utc::now() + chrono::Duration::hours(1) };
    let far_future = Utc::now() + chrono::Duration::hours(2);
    assert!(matches!(store.claim(&id, &thief, far_future).await.unwrap(), chainrun_core::ports::Claim::Acquired(_)));
    assert_eq!(first.await.unwrap().unwrap(), Handled::Superseded);
}
