//! What the runner does when Lambda kills, retries or duplicates it: leases renewed while it
//! works, takeovers after a crash, a bound on them, and errors that end a run instead of
//! being retried. A crash is a runner's `handle` future dropped mid-run (its heartbeat
//! stops with it), in paused time.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use async_trait::async_trait;
use chainrun_core::codes::ErrorCode;
use chainrun_core::durability::Durability;
use chainrun_core::engine::{Engine, EngineConfig};
use chainrun_core::ids::{Principal, RunId, StepId};
use chainrun_core::memory::{MemoryAnalytics, MemoryDispatcher, MemoryProgress, MemoryStore, PausedClock, Script, ScriptedModel};
use chainrun_core::ports::{AnswerOutcome, Answered, Claim, ControlOutcome, DecideOutcome, Lease, ResumeOutcome, RunStore, StoreError};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::run::{
    Cause, ControlRequest, Event, EventType, Resumption, ReviewDecision, RunRecord, RunStatus, RunnerEvent, StepRecord, StepStatus, Waiting,
};
use chainrun_runner::{Handled, Runner};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const LEASE: Duration = Duration::from_secs(30);

struct Setup {
    runner: Arc<Runner>,
    model: Arc<ScriptedModel>,
    store: Arc<MemoryStore>,
    progress: Arc<MemoryProgress>,
    dispatcher: Arc<MemoryDispatcher>,
}

fn setup(scripts: Vec<Script>, max_takeovers: u32, store: Option<Arc<dyn RunStore>>) -> Setup {
    let model = Arc::new(ScriptedModel::new(scripts));
    let memory = Arc::new(MemoryStore::new());
    let store: Arc<dyn RunStore> = store.unwrap_or(memory.clone());
    let progress = Arc::new(MemoryProgress::new());
    let dispatcher = Arc::new(MemoryDispatcher::new());
    let engine = Engine::new(model.clone(), store.clone(), progress.clone(), Arc::new(ModelRegistry::builtin()), EngineConfig::default());
    let durability = Durability { max_takeovers, ..Durability::with_lease(LEASE) };
    let clock = Arc::new(PausedClock::default());
    let runner = Arc::new(Runner { store, engine, dispatcher: dispatcher.clone(), analytics: Arc::new(MemoryAnalytics::new()), durability, clock });
    Setup { runner, model, store: memory, progress, dispatcher }
}

async fn queue(store: &dyn RunStore, steps: Value) -> RunRecord {
    let def = json!({ "name": "t", "defaults": { "model": "amazon.nova-micro-v1:0" }, "steps": steps });
    let mut run =
        RunRecord::new("t".parse().unwrap(), def.clone(), json!({}), "alice".parse().unwrap(), vec![Principal::User("alice".into())], Utc::now());
    run.step_order = chainrun_core::graph::validate_json(&def, &ModelRegistry::builtin()).unwrap().step_order();
    store.create_run(&run).await.unwrap();
    run
}

fn deadline() -> DateTime<Utc> {
    Utc::now() + chrono::Duration::minutes(15)
}

/// A delivery of `run`, as a task (so a test can crash it by aborting it).
fn deliver(s: &Setup, run: &RunId, invocation: &'static str, cause: Cause) -> tokio::task::JoinHandle<Handled> {
    let (runner, run) = (s.runner.clone(), run.clone());
    tokio::spawn(async move { runner.handle(RunnerEvent::new(run, cause), invocation, deadline(), Duration::from_secs(90)).await.unwrap() })
}

fn kinds(events: &[Event]) -> Vec<EventType> {
    events.iter().map(|e| e.kind).collect()
}

fn two_steps() -> Value {
    json!([{ "id": "a", "type": "llm", "prompt": "FIRST" }, { "id": "b", "type": "llm", "prompt": "SLOW {{ steps.a.text }}" }])
}

#[tokio::test(start_paused = true)]
async fn a_working_runner_renews_its_lease_so_a_redelivery_finds_the_run_held() {
    let s = setup(vec![Script::reply("LONG", "ok").with_latency(Duration::from_secs(200))], 3, None);
    let run = queue(s.store.as_ref(), json!([{ "id": "a", "type": "llm", "prompt": "LONG" }])).await;
    let first = deliver(&s, &run.id, "inv-1", Cause::Start);
    // Long past the first lease's 30 s: only renewals keep the run held.
    tokio::time::sleep(Duration::from_secs(100)).await;
    assert_eq!(deliver(&s, &run.id, "inv-2", Cause::Sweep).await.unwrap(), Handled::AlreadyRunning);
    assert_eq!(first.await.unwrap(), Handled::Finished(RunStatus::Completed));
    assert_eq!(s.model.calls_matching("LONG"), 1);
    assert!(s.store.get_run(&run.id).await.unwrap().unwrap().takeovers.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_crashed_runner_is_taken_over_once_its_lease_expires_and_the_run_resumes_from_checkpoints() {
    let s = setup(vec![Script::reply("FIRST", "1"), Script::reply("SLOW", "2").with_latency(Duration::from_secs(60))], 3, None);
    let run = queue(s.store.as_ref(), two_steps()).await;
    let crashed = deliver(&s, &run.id, "inv-1", Cause::Start);
    tokio::time::sleep(Duration::from_secs(10)).await;
    crashed.abort(); // `a` is checkpointed, `b` is in flight
    assert!(crashed.await.unwrap_err().is_cancelled());

    // Within the dead runner's lease a redelivery finds the run held; after it, it takes over.
    assert_eq!(deliver(&s, &run.id, "inv-2", Cause::Start).await.unwrap(), Handled::AlreadyRunning);
    tokio::time::sleep(LEASE).await;
    assert_eq!(deliver(&s, &run.id, "inv-3", Cause::Sweep).await.unwrap(), Handled::Finished(RunStatus::Completed));

    assert_eq!((s.model.calls_matching("FIRST"), s.model.calls_matching("SLOW")), (1, 2), "only the call in flight is made again");
    let events = s.progress.events(&run.id);
    let resumed = events.iter().find(|e| e.kind == EventType::RunResumed).expect("a RUN_RESUMED event");
    assert_eq!(resumed.data["cause"], "sweep");
    assert_eq!(resumed.data["settled_steps"], 1);
    assert!(resumed.data["takeover"]["from"].as_str().unwrap().starts_with("inv-1/"), "{}", resumed.data);
    assert!(resumed.data["takeover"]["by"].as_str().unwrap().starts_with("inv-3/"), "{}", resumed.data);
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>(), "the log stays gap-free across the takeover");
}

#[tokio::test(start_paused = true)]
async fn a_run_whose_runners_keep_dying_fails_with_runner_lost_and_its_takeover_history() {
    let s = setup(vec![Script::reply("FIRST", "1"), Script::reply("SLOW", "2").with_latency(Duration::from_secs(600))], 1, None);
    let run = queue(s.store.as_ref(), two_steps()).await;
    for invocation in ["inv-1", "inv-2"] {
        let crashed = deliver(&s, &run.id, invocation, Cause::Sweep);
        tokio::time::sleep(Duration::from_secs(5)).await;
        crashed.abort();
        let _ = crashed.await;
        tokio::time::sleep(LEASE).await;
    }
    // inv-2 was the first takeover (allowed); this is the second.
    assert_eq!(deliver(&s, &run.id, "inv-3", Cause::Sweep).await.unwrap(), Handled::Finished(RunStatus::Failed));
    let stored = s.store.get_run(&run.id).await.unwrap().unwrap();
    let error = stored.error.unwrap();
    assert_eq!(error.code, ErrorCode::RunnerLost);
    assert!(error.message.contains("2 times") && error.message.contains("inv-1/") && error.message.contains("inv-2/"), "{}", error.message);
    assert_eq!(stored.takeovers.len(), 2);
    assert_eq!(s.model.calls_matching("SLOW"), 2, "the failing delivery calls nothing");
    let events = s.progress.events(&run.id);
    let cancelled: Vec<_> = events.iter().filter(|e| e.kind == EventType::StepCancelled).map(|e| e.step_id.clone().unwrap().to_string()).collect();
    assert_eq!(cancelled, ["b"], "the unsettled step is cancelled, with an event");
    assert_eq!(kinds(&events).last(), Some(&EventType::RunFailed));
    let steps = s.store.get_steps(&run.id).await.unwrap();
    assert_eq!(steps.iter().find(|r| r.step_id.as_str() == "b").unwrap().status, StepStatus::Cancelled);
}

/// A store whose `finish_run` is applied but answered as an outage, `lost` times: a write
/// whose reply was lost.
fn losing_finish(lost: usize) -> (Arc<Refusing>, Arc<MemoryStore>) {
    let inner = Arc::new(MemoryStore::new());
    (Arc::new(Refusing { inner: inner.clone(), step: "", error: StoreError::Unavailable("reply lost".into()), times: Mutex::new(lost) }), inner)
}

/// A store that refuses one step's result (its `COMPLETED` checkpoint) with `error`, `times` times.
struct Refusing {
    inner: Arc<MemoryStore>,
    step: &'static str,
    error: StoreError,
    times: Mutex<usize>,
}

#[async_trait]
impl RunStore for Refusing {
    async fn create_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        self.inner.create_run(run).await
    }
    async fn get_run(&self, id: &RunId) -> Result<Option<RunRecord>, StoreError> {
        self.inner.get_run(id).await
    }
    async fn get_steps(&self, id: &RunId) -> Result<Vec<StepRecord>, StoreError> {
        self.inner.get_steps(id).await
    }
    async fn claim(&self, id: &RunId, lease: &Lease, now: DateTime<Utc>) -> Result<Claim, StoreError> {
        self.inner.claim(id, lease, now).await
    }
    async fn renew(&self, id: &RunId, lease: &Lease) -> Result<Option<ControlRequest>, StoreError> {
        self.inner.renew(id, lease).await
    }
    async fn set_owners(&self, id: &RunId, lease: &Lease, owners: &[chainrun_core::ids::Principal]) -> Result<(), StoreError> {
        self.inner.set_owners(id, lease, owners).await
    }
    async fn request_control(&self, id: &RunId, request: &ControlRequest) -> Result<ControlOutcome, StoreError> {
        self.inner.request_control(id, request).await
    }
    async fn park(&self, id: &RunId, lease: &Lease, waiting: &Waiting, seen: Answered) -> Result<bool, StoreError> {
        self.inner.park(id, lease, waiting, seen).await
    }
    async fn record_input(
        &self,
        id: &RunId,
        step: &StepId,
        expected: u32,
        next: &chainrun_core::input::InputState,
        requeue: bool,
    ) -> Result<AnswerOutcome, StoreError> {
        self.inner.record_input(id, step, expected, next, requeue).await
    }
    async fn decide(&self, id: &RunId, step: &StepId, decision: &ReviewDecision) -> Result<DecideOutcome, StoreError> {
        self.inner.decide(id, step, decision).await
    }
    async fn resume(&self, id: &RunId, resumption: &Resumption) -> Result<ResumeOutcome, StoreError> {
        self.inner.resume(id, resumption).await
    }
    async fn due(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<RunId>, StoreError> {
        self.inner.due(now, limit).await
    }
    async fn save_step(&self, id: &RunId, lease: &Lease, step: &StepRecord) -> Result<(), StoreError> {
        let refuse = {
            let mut times = self.times.lock().unwrap();
            let refuse = step.step_id.as_str() == self.step && step.status == StepStatus::Completed && *times > 0;
            *times -= usize::from(refuse);
            refuse
        };
        if refuse {
            return Err(self.error.clone());
        }
        self.inner.save_step(id, lease, step).await
    }
    async fn save_item(
        &self,
        id: &RunId,
        lease: &Lease,
        step: &chainrun_core::ids::StepId,
        revision: u32,
        item: &chainrun_core::run::ItemRecord,
    ) -> Result<(), StoreError> {
        self.inner.save_item(id, lease, step, revision, item).await
    }
    async fn get_items(
        &self,
        id: &RunId,
        step: &chainrun_core::ids::StepId,
        revision: u32,
    ) -> Result<Vec<chainrun_core::run::ItemRecord>, StoreError> {
        self.inner.get_items(id, step, revision).await
    }
    async fn start_revision(
        &self,
        id: &RunId,
        revision: &chainrun_core::revision::Revision,
        overridden: Option<&StepRecord>,
    ) -> Result<chainrun_core::ports::RevisionOutcome, StoreError> {
        self.inner.start_revision(id, revision, overridden).await
    }
    async fn finish_run(&self, run: &RunRecord, lease: &Lease) -> Result<(), StoreError> {
        self.inner.finish_run(run, lease).await?;
        let lose = self.step.is_empty() && {
            let mut times = self.times.lock().unwrap();
            let lose = *times > 0;
            *times -= usize::from(lose);
            lose
        };
        if lose { Err(self.error.clone()) } else { Ok(()) }
    }
    async fn release(&self, id: &RunId, lease: &Lease) -> Result<(), StoreError> {
        self.inner.release(id, lease).await
    }
}

fn refusing(step: &'static str, error: StoreError, times: usize) -> (Arc<Refusing>, Arc<MemoryStore>) {
    let inner = Arc::new(MemoryStore::new());
    (Arc::new(Refusing { inner: inner.clone(), step, error, times: Mutex::new(times) }), inner)
}

#[tokio::test(start_paused = true)]
async fn a_terminal_store_error_ends_the_run_failed_and_the_delivery_succeeds_so_lambda_does_not_retry() {
    for (error, code) in [
        (StoreError::TooLarge("the checkpoint of step b is 500000 bytes".into()), ErrorCode::OutputTooLarge),
        (StoreError::Rejected("table chainrun-runs: access denied".into()), ErrorCode::StoreError),
    ] {
        let (store, inner) = refusing("b", error, usize::MAX);
        let mut s = setup(vec![Script::reply("FIRST", "1"), Script::reply("SLOW", "2")], 3, Some(store.clone()));
        s.store = inner;
        let run = queue(store.as_ref(), json!([{ "id": "a", "type": "llm", "prompt": "FIRST" }, { "id": "b", "type": "llm", "prompt": "SLOW" }, { "id": "c", "type": "llm", "prompt": "SLOW {{ steps.b.text }}" }])).await;
        assert_eq!(deliver(&s, &run.id, "inv-1", Cause::Start).await.unwrap(), Handled::Finished(RunStatus::Failed));
        let stored = s.store.get_run(&run.id).await.unwrap().unwrap();
        assert_eq!(stored.error.as_ref().map(|e| e.code.clone()), Some(code));
        assert_eq!(deliver(&s, &run.id, "inv-2", Cause::Start).await.unwrap(), Handled::AlreadyFinished);
        assert_eq!(s.model.calls_matching("SLOW"), 1, "nothing is paid for twice");
        let events = s.progress.events(&run.id);
        assert_eq!(kinds(&events).last(), Some(&EventType::RunFailed));
        assert!(events.iter().any(|e| e.kind == EventType::StepCancelled && e.step_id.as_ref().is_some_and(|id| id.as_str() == "c")));
    }
}

#[tokio::test(start_paused = true)]
async fn a_retryable_error_gives_the_lease_back_so_lambdas_retry_continues_at_once() {
    let (store, inner) = refusing("b", StoreError::Unavailable("throttled".into()), 4);
    let mut s = setup(vec![Script::reply("FIRST", "1"), Script::reply("SLOW", "2")], 3, Some(store.clone()));
    s.store = inner;
    let run = queue(store.as_ref(), two_steps()).await;
    let (runner, id) = (s.runner.clone(), run.id.clone());
    let err = runner.handle(RunnerEvent::new(id.clone(), Cause::Start), "inv-1", deadline(), Duration::from_secs(90)).await.unwrap_err();
    assert!(err.retryable(), "{err}");
    // Lambda's retry, at once: the run is not held, and only the unsettled step runs again.
    assert_eq!(deliver(&s, &run.id, "inv-2", Cause::Start).await.unwrap(), Handled::Finished(RunStatus::Completed));
    assert_eq!(s.model.calls_matching("FIRST"), 1);
    assert!(s.store.get_run(&run.id).await.unwrap().unwrap().takeovers.is_empty(), "a released run is continued, not taken over");
}

#[tokio::test(start_paused = true)]
async fn a_suspended_run_says_so_and_its_continuation_says_why() {
    let s = setup(vec![Script::reply("FIRST", "1").with_latency(Duration::from_secs(100)), Script::reply("SLOW", "2")], 3, None);
    let run = queue(s.store.as_ref(), two_steps()).await;
    let short = Utc::now() + chrono::Duration::seconds(120);
    let handled = s.runner.handle(RunnerEvent::new(run.id.clone(), Cause::Start), "inv-1", short, Duration::from_secs(90)).await.unwrap();
    assert_eq!(handled, Handled::Suspended);
    assert_eq!(s.dispatcher.events(), vec![RunnerEvent::new(run.id.clone(), Cause::Continue)]);
    assert_eq!(deliver(&s, &run.id, "inv-2", Cause::Continue).await.unwrap(), Handled::Finished(RunStatus::Completed));
    let events = s.progress.events(&run.id);
    let suspended = events.iter().find(|e| e.kind == EventType::RunSuspended).unwrap();
    assert_eq!((suspended.data["settled_steps"].as_u64(), suspended.data["steps"].as_u64()), (Some(1), Some(2)));
    let resumed = events.iter().find(|e| e.kind == EventType::RunResumed).unwrap();
    assert_eq!((resumed.data["cause"].as_str(), resumed.data["takeover"].is_null()), (Some("continue"), true));
    assert!(suspended.seq < resumed.seq);
}

/// The worst case the engine reserves for `prompt` with `max_tokens` on nova-micro.
fn worst(prompt: &str, max_tokens: u32) -> chainrun_core::budget::Amount {
    let registry = ModelRegistry::builtin();
    let model = registry.get("amazon.nova-micro-v1:0").unwrap();
    chainrun_core::budget::worst_case(&model, chainrun_core::budget::estimate_input_tokens(None, prompt), max_tokens)
}

/// `a` (charged 110 tokens), then `b`, whose call takes a minute; a runner dies during it.
async fn crash_during_b(s: &Setup, budget: Option<Value>) -> RunRecord {
    let steps = json!([
        { "id": "a", "type": "llm", "prompt": "FIRST" },
        { "id": "b", "type": "llm", "prompt": "SLOW {{ steps.a.text }}", "max_tokens": 1000 }
    ]);
    let mut def = json!({ "name": "t", "defaults": { "model": "amazon.nova-micro-v1:0" }, "steps": steps });
    if let Some(budget) = budget {
        def["budget"] = budget;
    }
    let mut run =
        RunRecord::new("t".parse().unwrap(), def.clone(), json!({}), "alice".parse().unwrap(), vec![Principal::User("alice".into())], Utc::now());
    run.step_order = chainrun_core::graph::validate_json(&def, &ModelRegistry::builtin()).unwrap().step_order();
    s.store.create_run(&run).await.unwrap();
    let crashed = deliver(s, &run.id, "inv-1", Cause::Start);
    tokio::time::sleep(Duration::from_secs(10)).await;
    crashed.abort();
    let _ = crashed.await;
    tokio::time::sleep(LEASE).await;
    run
}

fn scripts() -> Vec<Script> {
    vec![Script::reply("FIRST", "1").with_usage(100, 10), Script::reply("SLOW", "2").with_usage(50, 5).with_latency(Duration::from_secs(60))]
}

#[tokio::test(start_paused = true)]
async fn a_call_in_flight_when_its_runner_died_counts_at_its_worst_case_apart_from_exact_charges() {
    let s = setup(scripts(), 3, None);
    let run = crash_during_b(&s, None).await;
    assert_eq!(deliver(&s, &run.id, "inv-2", Cause::Sweep).await.unwrap(), Handled::Finished(RunStatus::Completed));
    let totals = s.store.get_run(&run.id).await.unwrap().unwrap().totals;
    let lost = worst("SLOW 1", 1000);
    assert_eq!((totals.lost.calls, totals.lost.tokens, totals.lost.cost), (1, lost.tokens, lost.cost));
    assert_eq!((totals.model_calls, totals.total_tokens()), (2, 110 + 55), "exact charges: a, and b's second call");
    let b = s.store.get_steps(&run.id).await.unwrap().into_iter().find(|r| r.step_id.as_str() == "b").unwrap();
    assert_eq!((b.calls, b.lost.calls), (1, 1), "the step's record keeps what the dead runner lost");
    let completed = s.progress.events(&run.id).into_iter().find(|e| e.kind == EventType::RunCompleted).unwrap();
    assert_eq!(completed.data["totals"]["reserved_lost"]["calls"], 1, "{}", completed.data);
    assert_eq!(completed.data["totals"]["reserved_lost"]["tokens"], lost.tokens);
}

#[tokio::test(start_paused = true)]
async fn a_budget_holds_across_a_crash_because_the_lost_call_counts_against_it() {
    let s = setup(scripts(), 3, None);
    // Room for a's 110 tokens and two of b's worst cases, less one token: the dead runner's
    // call and its retry do not both fit.
    let w = worst("SLOW 1", 1000).tokens;
    let run = crash_during_b(&s, Some(json!({ "max_total_tokens": 110 + 2 * w - 1 }))).await;
    assert_eq!(deliver(&s, &run.id, "inv-2", Cause::Sweep).await.unwrap(), Handled::Finished(RunStatus::Failed));
    let b = s.store.get_steps(&run.id).await.unwrap().into_iter().find(|r| r.step_id.as_str() == "b").unwrap();
    assert_eq!(b.error.map(|e| e.code), Some(ErrorCode::BudgetExceeded));
    assert_eq!(s.model.calls_matching("SLOW"), 1, "the call that would break the budget is not made");
    let totals = s.store.get_run(&run.id).await.unwrap().unwrap().totals;
    assert!(totals.total_tokens() + totals.lost.tokens < 110 + 2 * w);
}

#[tokio::test(start_paused = true)]
async fn what_a_dead_runner_spent_survives_a_second_crash() {
    let s = setup(scripts(), 3, None);
    let run = crash_during_b(&s, None).await;
    // The second runner dies in b's call too: both calls in flight are lost.
    let again = deliver(&s, &run.id, "inv-2", Cause::Sweep);
    tokio::time::sleep(Duration::from_secs(10)).await;
    again.abort();
    let _ = again.await;
    tokio::time::sleep(LEASE).await;
    assert_eq!(deliver(&s, &run.id, "inv-3", Cause::Sweep).await.unwrap(), Handled::Finished(RunStatus::Completed));
    let totals = s.store.get_run(&run.id).await.unwrap().unwrap().totals;
    assert_eq!((totals.lost.calls, totals.lost.tokens), (2, 2 * worst("SLOW 1", 1000).tokens));
    assert_eq!(totals.model_calls, 2);
}

#[tokio::test(start_paused = true)]
async fn a_map_resumed_after_its_runner_died_runs_only_the_items_without_a_result() {
    let s = setup(vec![Script::reply("ITEM", "done").with_usage(10, 2).with_latency(Duration::from_secs(10))], 3, None);
    let map = json!([{ "id": "m", "type": "map", "over": "input.xs", "max_concurrency": 2,
                       "step": { "type": "llm", "prompt": "ITEM {{ item }}" } }]);
    let def = json!({ "name": "t", "defaults": { "model": "amazon.nova-micro-v1:0" }, "steps": map });
    let mut run = RunRecord::new(
        "t".parse().unwrap(),
        def.clone(),
        json!({ "xs": [0, 1, 2, 3, 4, 5] }),
        "alice".parse().unwrap(),
        vec![Principal::User("alice".into())],
        Utc::now(),
    );
    run.step_order = chainrun_core::graph::validate_json(&def, &ModelRegistry::builtin()).unwrap().step_order();
    s.store.create_run(&run).await.unwrap();
    // Two items at a time, 10 s each: at 25 s items 0–3 are checkpointed, 4 and 5 in flight.
    let crashed = deliver(&s, &run.id, "inv-1", Cause::Start);
    tokio::time::sleep(Duration::from_secs(25)).await;
    crashed.abort();
    let _ = crashed.await;
    tokio::time::sleep(LEASE).await;
    assert_eq!(deliver(&s, &run.id, "inv-2", Cause::Sweep).await.unwrap(), Handled::Finished(RunStatus::Completed));

    let calls: Vec<usize> = (0..6).map(|i| s.model.calls_matching(&format!("ITEM {i}"))).collect();
    assert_eq!(calls, [1, 1, 1, 1, 2, 2], "only the items in flight are called again");
    let stored = s.store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!(stored.output.unwrap(), json!({ "m": ["done", "done", "done", "done", "done", "done"] }));
    assert_eq!((stored.totals.model_calls, stored.totals.lost.calls), (6, 2), "two calls lost with the runner, counted apart");
    assert_eq!(stored.totals.total_tokens(), 6 * 12);
}

#[tokio::test(start_paused = true)]
async fn a_map_that_does_not_fit_one_invocation_continues_in_the_next_from_its_item_checkpoints() {
    let s = setup(vec![Script::reply("ITEM", "done").with_latency(Duration::from_secs(10))], 3, None);
    let map = json!([{ "id": "m", "type": "map", "over": "input.xs", "max_concurrency": 2,
                       "step": { "type": "llm", "prompt": "ITEM {{ item }}" } }]);
    let def = json!({ "name": "t", "defaults": { "model": "amazon.nova-micro-v1:0" }, "steps": map });
    let xs: Vec<usize> = (0..10).collect();
    let mut run = RunRecord::new(
        "t".parse().unwrap(),
        def.clone(),
        json!({ "xs": xs }),
        "alice".parse().unwrap(),
        vec![Principal::User("alice".into())],
        Utc::now(),
    );
    run.step_order = chainrun_core::graph::validate_json(&def, &ModelRegistry::builtin()).unwrap().step_order();
    s.store.create_run(&run).await.unwrap();
    // 45 s with a margin of a quarter: items start until 33.75 s, so 0–7 run (two at a
    // time, 10 s each) and 8–9 are left for the next invocation.
    let short = Utc::now() + chrono::Duration::seconds(45);
    let handled = s.runner.handle(RunnerEvent::new(run.id.clone(), Cause::Start), "inv-1", short, Duration::from_secs(90)).await.unwrap();
    assert_eq!(handled, Handled::Suspended);
    assert_eq!((0..10).map(|i| s.model.calls_matching(&format!("ITEM {i}"))).sum::<usize>(), 8);
    assert_eq!(deliver(&s, &run.id, "inv-2", Cause::Continue).await.unwrap(), Handled::Finished(RunStatus::Completed));
    let calls: Vec<usize> = (0..10).map(|i| s.model.calls_matching(&format!("ITEM {i}"))).collect();
    assert_eq!(calls, [1; 10], "every item once, across two invocations");
    let stored = s.store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!(stored.output.unwrap()["m"].as_array().unwrap().len(), 10);
    assert_eq!((stored.totals.model_calls, stored.totals.lost.calls), (10, 0));
    let kinds = kinds(&s.progress.events(&run.id));
    assert!(kinds.contains(&EventType::RunSuspended) && kinds.contains(&EventType::RunResumed));
}

#[tokio::test(start_paused = true)]
async fn a_run_whose_end_was_stored_but_not_announced_is_announced_by_the_next_delivery() {
    let (store, inner) = losing_finish(1);
    let mut s = setup(vec![Script::reply("FIRST", "1")], 3, Some(store.clone()));
    s.store = inner;
    let run = queue(store.as_ref(), json!([{ "id": "a", "type": "llm", "prompt": "FIRST" }])).await;
    let (runner, id) = (s.runner.clone(), run.id.clone());
    let err = runner.handle(RunnerEvent::new(id.clone(), Cause::Start), "inv-1", deadline(), Duration::from_secs(90)).await.unwrap_err();
    assert!(err.retryable(), "{err}");
    assert_eq!(s.store.get_run(&run.id).await.unwrap().unwrap().status, RunStatus::Completed, "the end is stored");
    assert_ne!(kinds(&s.progress.events(&run.id)).last(), Some(&EventType::RunCompleted), "but not announced");
    // Lambda's retry finds the run finished, and announces it.
    assert_eq!(deliver(&s, &run.id, "inv-2", Cause::Start).await.unwrap(), Handled::AlreadyFinished);
    let events = s.progress.events(&run.id);
    assert_eq!(kinds(&events).last(), Some(&EventType::RunCompleted));
    assert_eq!(events.last().unwrap().seq, events.len() as u64, "gap-free");
    assert_eq!(deliver(&s, &run.id, "inv-3", Cause::Start).await.unwrap(), Handled::AlreadyFinished);
    assert_eq!(s.progress.events(&run.id).len(), events.len(), "announced once");
    assert_eq!(s.model.calls_matching("FIRST"), 1);
}
