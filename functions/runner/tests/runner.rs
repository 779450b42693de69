//! The runner's delivery semantics against in-memory ports.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::analytics::WorkflowCosts;
use chainrun_core::aws::RunnerEvent;
use chainrun_core::durability::{Durability, SystemClock};
use chainrun_core::engine::{Engine, EngineConfig};
use chainrun_core::ids::Principal;
use chainrun_core::memory::{MemoryAnalytics, MemoryDispatcher, MemoryProgress, MemoryStore, Script, ScriptedModel};
use chainrun_core::ports::{Analytics, AnalyticsError, Recorded, RunStore};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::run::{Cause, StepRecord};
use chainrun_core::run::{EventType, RunRecord, RunStatus};
use chainrun_runner::{Handled, Runner, RunnerError};
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
    analytics: Arc<MemoryAnalytics>,
}

fn setup(scripts: Vec<Script>) -> Setup {
    setup_with(scripts, None)
}

/// `analytics` replaces the runner's rollups (still exposed as `Setup::analytics`: unused then).
fn setup_with(scripts: Vec<Script>, analytics: Option<Arc<dyn Analytics>>) -> Setup {
    let model = Arc::new(ScriptedModel::new(scripts));
    let store = Arc::new(MemoryStore::new());
    let progress = Arc::new(MemoryProgress::new());
    let dispatcher = Arc::new(MemoryDispatcher::new());
    let engine = Engine::new(model.clone(), store.clone(), progress.clone(), Arc::new(ModelRegistry::builtin()), EngineConfig::default());
    let memory = Arc::new(MemoryAnalytics::new());
    let runner = Arc::new(Runner {
        store: store.clone(),
        engine,
        dispatcher: dispatcher.clone(),
        analytics: analytics.unwrap_or(memory.clone()),
        durability: Durability::default(),
        clock: Arc::new(SystemClock),
    });
    Setup { runner, model, store, progress, dispatcher, analytics: memory }
}

async fn queue(store: &MemoryStore, steps: serde_json::Value) -> RunRecord {
    let def = json!({ "name": "t", "defaults": { "model": "amazon.nova-micro-v1:0" }, "steps": steps });
    let run = RunRecord::new("t".parse().unwrap(), def, json!({}), "alice".parse().unwrap(), vec![Principal::User("alice".into())], Utc::now());
    store.create_run(&run).await.unwrap();
    run
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_delivery_runs_each_model_call_once() {
    let s = setup(vec![Script::reply("SLOW", "done").with_latency(Duration::from_secs(5))]);
    let run = queue(&s.store, json!([{ "id": "a", "type": "llm", "prompt": "SLOW" }])).await;
    let deadline = Utc::now() + chrono::Duration::minutes(15);
    let event = || RunnerEvent::new(run.id.clone(), Cause::Start);
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
    let handled = s.runner.handle(RunnerEvent::new(run.id.clone(), Cause::Start), "inv-1", deadline, Duration::from_secs(90)).await.unwrap();
    assert_eq!(handled, Handled::Suspended);
    assert_eq!(s.dispatcher.dispatched(), vec![run.id.clone()]);
    assert_eq!(s.model.calls_matching("TWO"), 0);
    // The re-dispatched invocation picks up where the first stopped.
    let handled = s
        .runner
        .handle(RunnerEvent::new(run.id.clone(), Cause::Start), "inv-2", Utc::now() + chrono::Duration::minutes(15), Duration::from_secs(90))
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
        .handle(RunnerEvent::new(run.id.clone(), Cause::Start), "inv-1", Utc::now() + chrono::Duration::seconds(20), Duration::from_secs(90))
        .await
        .unwrap();
    assert_eq!(handled, Handled::Finished(RunStatus::Completed));
}

#[tokio::test]
async fn an_unknown_run_is_acknowledged_not_retried() {
    let s = setup(vec![]);
    let handled = s
        .runner
        .handle(
            RunnerEvent::new(chainrun_core::ids::RunId::new(), Cause::Start),
            "inv",
            Utc::now() + chrono::Duration::minutes(1),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(handled, Handled::UnknownRun);
}

#[tokio::test(start_paused = true)]
async fn a_deadline_in_the_past_is_treated_as_unknown_so_the_lease_stays_live() {
    let s = setup(vec![Script::reply("WORK", "ok").with_latency(Duration::from_secs(5))]);
    let run = queue(&s.store, json!([{ "id": "a", "type": "llm", "prompt": "WORK" }])).await;
    let bogus = chrono::DateTime::from_timestamp_millis(695_605).unwrap();
    let event = || RunnerEvent::new(run.id.clone(), Cause::Start);
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
        async move {
            runner.handle(RunnerEvent::new(id, Cause::Start), "inv-1", Utc::now() + chrono::Duration::minutes(15), Duration::from_secs(90)).await
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Another runner takes the run over as if the first one's lease had expired.
    let thief = chainrun_core::ports::Lease { holder: "thief".into(), expires_at: Utc::now() + chrono::Duration::hours(1) };
    let far_future = Utc::now() + chrono::Duration::hours(2);
    assert!(matches!(store.claim(&id, &thief, far_future).await.unwrap(), chainrun_core::ports::Claim::Acquired(_)));
    assert_eq!(first.await.unwrap().unwrap(), Handled::Superseded);
}

/// Rollups that are down: every recording fails, retryably.
struct DownAnalytics;

#[async_trait::async_trait]
impl Analytics for DownAnalytics {
    async fn record_run(&self, _: &RunRecord, _: &[StepRecord]) -> Result<Recorded, AnalyticsError> {
        Err(AnalyticsError::Unavailable("rollups table unreachable".into()))
    }

    async fn costs(&self, _: &Principal, _: chrono::NaiveDate, _: chrono::NaiveDate) -> Result<Vec<WorkflowCosts>, AnalyticsError> {
        Err(AnalyticsError::Unavailable("rollups table unreachable".into()))
    }
}

async fn alices_costs(analytics: &dyn Analytics) -> Vec<WorkflowCosts> {
    let today = Utc::now().date_naive();
    analytics.costs(&Principal::User("alice".into()), today.pred_opt().unwrap(), today.succ_opt().unwrap()).await.unwrap()
}

#[tokio::test]
async fn a_finished_run_is_rolled_up_once_however_often_it_is_delivered() {
    let s = setup(vec![Script::reply("COUNT", "ok").with_usage(100, 10)]);
    let run = queue(&s.store, json!([{ "id": "a", "type": "llm", "prompt": "COUNT" }])).await;
    let deadline = Utc::now() + chrono::Duration::minutes(15);
    let event = || RunnerEvent::new(run.id.clone(), Cause::Start);
    assert_eq!(s.runner.handle(event(), "inv-1", deadline, Duration::from_secs(90)).await.unwrap(), Handled::Finished(RunStatus::Completed));
    assert_eq!(s.runner.handle(event(), "inv-2", deadline, Duration::from_secs(90)).await.unwrap(), Handled::AlreadyFinished);
    let stored = s.store.get_run(&run.id).await.unwrap().unwrap();
    let costs = alices_costs(s.analytics.as_ref()).await;
    assert_eq!(costs.len(), 1);
    assert_eq!((costs[0].workflow.as_str(), costs[0].totals.runs, costs[0].totals.cost), ("t", 1, stored.totals.cost));
    assert!(stored.totals.cost.pico() > 0);
}

#[tokio::test]
async fn a_rollup_that_failed_after_the_run_finished_is_completed_by_the_retried_delivery() {
    let s = setup_with(vec![Script::reply("LATE", "ok")], Some(Arc::new(DownAnalytics)));
    let run = queue(&s.store, json!([{ "id": "a", "type": "llm", "prompt": "LATE" }])).await;
    let deadline = Utc::now() + chrono::Duration::minutes(15);
    let event = || RunnerEvent::new(run.id.clone(), Cause::Start);
    let err = s.runner.handle(event(), "inv-1", deadline, Duration::from_secs(90)).await.unwrap_err();
    assert!(matches!(err, RunnerError::Analytics(_)) && err.retryable(), "{err}");
    assert_eq!(s.store.get_run(&run.id).await.unwrap().unwrap().status, RunStatus::Completed, "the run itself is done");

    // Lambda retries the event; the rollups are back.
    let retry = Runner {
        store: s.store.clone(),
        engine: s.runner.engine.clone(),
        dispatcher: s.dispatcher.clone(),
        analytics: s.analytics.clone(),
        durability: Durability::default(),
        clock: Arc::new(SystemClock),
    };
    assert_eq!(retry.handle(event(), "inv-2", deadline, Duration::from_secs(90)).await.unwrap(), Handled::AlreadyFinished);
    assert_eq!(s.model.calls_matching("LATE"), 1, "nothing ran again");
    let costs = alices_costs(s.analytics.as_ref()).await;
    assert_eq!(costs[0].totals.runs, 1);
}
