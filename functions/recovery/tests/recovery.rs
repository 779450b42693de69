//! The sweeper and the dead-letter consumer against in-memory ports, with the real runner
//! where a run must be seen to finish. Time is paused: the store's queued grace and the
//! leases pass as the test says.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use chainrun_core::codes::ErrorCode;
use chainrun_core::durability::{Clock, Durability};
use chainrun_core::engine::end::Ender;
use chainrun_core::engine::{Engine, EngineConfig};
use chainrun_core::ids::{Principal, RunId, StepId};
use chainrun_core::memory::{MemoryAnalytics, MemoryDailySpend, MemoryDispatcher, MemoryProgress, MemoryStore, PausedClock, Script, ScriptedModel};
use chainrun_core::money::Usd;
use chainrun_core::ports::{DailySpend, DispatchError, Dispatcher, Lease, RunStore};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::run::{Cause, EventType, InFlight, RunRecord, RunStatus, RunnerEvent, StepRecord, StepStatus};
use chainrun_core::spend::{DayHold, DaySpend};
use chainrun_recovery::{DeadLetters, Sweeper};
use chainrun_runner::{Handled, Runner};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

const GRACE: Duration = Duration::from_secs(60);
const LEASE: Duration = Duration::from_secs(30);

struct Setup {
    store: Arc<MemoryStore>,
    progress: Arc<MemoryProgress>,
    dispatcher: Arc<MemoryDispatcher>,
    clock: Arc<PausedClock>,
    model: Arc<ScriptedModel>,
    runner: Runner,
    daily: Arc<MemoryDailySpend>,
}

fn setup() -> Setup {
    let store = Arc::new(MemoryStore::with_queued_grace(GRACE));
    let progress = Arc::new(MemoryProgress::new());
    let dispatcher = Arc::new(MemoryDispatcher::new());
    let clock = Arc::new(PausedClock::default());
    let model = Arc::new(ScriptedModel::new(vec![Script::reply("HELLO", "hi").with_latency(Duration::from_secs(5))]));
    let engine = Engine::new(model.clone(), store.clone(), progress.clone(), Arc::new(ModelRegistry::builtin()), EngineConfig::default());
    let durability = Durability { max_takeovers: 2, ..Durability::with_lease(LEASE) };
    let runner = Runner {
        store: store.clone(),
        engine,
        dispatcher: dispatcher.clone(),
        analytics: Arc::new(MemoryAnalytics::new()),
        durability,
        clock: clock.clone(),
    };
    Setup { store, progress, dispatcher, clock, model, runner, daily: Arc::new(MemoryDailySpend::new()) }
}

impl Setup {
    fn sweeper(&self, dispatcher: Arc<dyn Dispatcher>) -> Sweeper {
        Sweeper { store: self.store.clone(), dispatcher, clock: self.clock.clone(), limit: 100 }
    }

    fn dead_letters(&self) -> DeadLetters {
        let ender = Ender {
            store: self.store.clone(),
            sink: self.progress.clone(),
            models: Arc::new(ModelRegistry::builtin()),
            limits: Default::default(),
            daily: Some(self.daily.clone()),
            tenancy: None,
            observer: None,
            batch: None,
        };
        DeadLetters {
            store: self.store.clone(),
            dispatcher: self.dispatcher.clone(),
            ender,
            durability: self.runner.durability,
            clock: self.clock.clone(),
        }
    }

    /// A run stored as the API stores it (created now, by the paused clock).
    async fn stored_run(&self) -> RunRecord {
        let def =
            json!({ "name": "t", "defaults": { "model": "amazon.nova-micro-v1:0" }, "steps": [{ "id": "a", "type": "llm", "prompt": "HELLO" }] });
        let mut run = RunRecord::new(
            "t".parse().unwrap(),
            def.clone(),
            json!({}),
            "alice".parse().unwrap(),
            vec![Principal::User("alice".into())],
            self.clock.now(),
        );
        run.step_order = chainrun_core::graph::validate_json(&def, &ModelRegistry::builtin()).unwrap().step_order();
        self.store.create_run(&run).await.unwrap();
        run
    }

    async fn deliver(&self, event: RunnerEvent) -> Handled {
        self.runner.handle(event, "inv", self.clock.now() + chrono::Duration::minutes(15), Duration::from_secs(90)).await.unwrap()
    }
}

/// A dispatcher that is down.
struct Down;

#[async_trait::async_trait]
impl Dispatcher for Down {
    async fn dispatch(&self, event: &RunnerEvent) -> Result<(), DispatchError> {
        Err(DispatchError { run: event.run_id.clone(), message: "TooManyRequestsException: rate exceeded".into(), retryable: true })
    }
}

#[tokio::test(start_paused = true)]
async fn a_run_whose_dispatch_was_lost_is_started_by_the_sweeper_after_the_grace() {
    let s = setup();
    let run = s.stored_run().await; // the API stored it; its dispatch never arrived
    assert!(s.sweeper(s.dispatcher.clone()).sweep().await.unwrap().dispatched.is_empty(), "not within the grace");
    tokio::time::sleep(GRACE).await;
    let swept = s.sweeper(s.dispatcher.clone()).sweep().await.unwrap();
    assert_eq!(swept.dispatched, vec![run.id.clone()]);
    let event = s.dispatcher.events().pop().unwrap();
    assert_eq!(event, RunnerEvent::new(run.id.clone(), Cause::Sweep));
    assert_eq!(s.deliver(event).await, Handled::Finished(RunStatus::Completed));
    assert!(s.sweeper(s.dispatcher.clone()).sweep().await.unwrap().dispatched.is_empty(), "a finished run is never due");
}

#[tokio::test(start_paused = true)]
async fn the_sweeper_hands_over_expired_leases_only_and_a_failed_hand_over_stays_due() {
    let s = setup();
    let run = s.stored_run().await;
    let holder = Lease { holder: "crashed".into(), expires_at: s.clock.now() + chrono::Duration::seconds(30) };
    s.store.claim(&run.id, &holder, s.clock.now()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert!(s.sweeper(s.dispatcher.clone()).sweep().await.unwrap().dispatched.is_empty(), "a live lease is not due");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failed = s.sweeper(Arc::new(Down)).sweep().await.unwrap();
    assert_eq!((failed.dispatched.len(), failed.failed), (0, vec![run.id.clone()]));
    let swept = s.sweeper(s.dispatcher.clone()).sweep().await.unwrap();
    assert_eq!(swept.dispatched, vec![run.id.clone()], "still due on the next sweep");
    // The runner takes it over and finishes it; the takeover is on record.
    assert_eq!(s.deliver(s.dispatcher.events().pop().unwrap()).await, Handled::Finished(RunStatus::Completed));
    let stored = s.store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!(stored.takeovers.len(), 1);
    assert_eq!(stored.takeovers[0].from, "crashed");
}

/// A Lambda on-failure destination record for `payload`, in an SQS message.
fn dead_letter(id: &str, payload: Value, error_type: &str) -> SqsMessage {
    let record = json!({
        "version": "1.0",
        "timestamp": "2026-12-06T10:00:00.000Z",
        "requestContext": { "requestId": "req-1", "functionArn": "arn:aws:lambda:us-east-1:1:function:chainrun-runner:$LATEST",
                            "condition": "RetriesExhausted", "approximateInvokeCount": 3 },
        "requestPayload": payload,
        "responseContext": { "statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled" },
        "responsePayload": { "errorType": error_type, "errorMessage": "store unavailable: throttled" }
    });
    let mut message = SqsMessage::default();
    message.message_id = Some(id.into());
    message.body = Some(record.to_string());
    message
}

fn batch(messages: Vec<SqsMessage>) -> SqsEvent {
    let mut event = SqsEvent::default();
    event.records = messages;
    event
}

fn payload(run: &RunId, redeliveries: u32) -> Value {
    serde_json::to_value(RunnerEvent { run_id: run.clone(), cause: Cause::Start, redeliveries }).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_retryable_dead_letter_is_handed_over_again_until_the_bound_then_the_run_fails_with_the_reason() {
    let s = setup();
    let run = s.stored_run().await;
    let consumer = s.dead_letters();
    let response = consumer.handle(batch(vec![dead_letter("m1", payload(&run.id, 0), "chainrun.Retryable")])).await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(s.dispatcher.events(), vec![RunnerEvent { run_id: run.id.clone(), cause: Cause::DeadLetter, redeliveries: 1 }]);

    // At the bound (2 redeliveries), the run ends with what Lambda reported.
    consumer.handle(batch(vec![dead_letter("m2", payload(&run.id, 2), "chainrun.Retryable")])).await;
    assert_eq!(s.dispatcher.events().len(), 1, "not handed over again");
    let stored = s.store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Failed);
    let error = stored.error.unwrap();
    assert_eq!(error.code, ErrorCode::DeliveryFailed);
    assert!(error.message.contains("RetriesExhausted") && error.message.contains("chainrun.Retryable: store unavailable"), "{}", error.message);
    let kinds: Vec<EventType> = s.progress.events(&run.id).iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventType::StepCancelled, EventType::RunFailed]);
    assert_eq!(s.model.calls_matching("HELLO"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_terminal_dead_letter_fails_the_run_at_once_and_a_run_held_by_a_runner_is_left_alone() {
    let s = setup();
    let (failed, held) = (s.stored_run().await, s.stored_run().await);
    let live = Lease { holder: "working".into(), expires_at: s.clock.now() + chrono::Duration::seconds(30) };
    s.store.claim(&held.id, &live, s.clock.now()).await.unwrap();
    let response = s
        .dead_letters()
        .handle(batch(vec![
            dead_letter("m1", payload(&failed.id, 0), "chainrun.Terminal"),
            dead_letter("m2", payload(&held.id, 5), "Sandbox.Timedout"),
        ]))
        .await;
    assert!(response.batch_item_failures.is_empty());
    assert!(s.dispatcher.events().is_empty());
    assert_eq!(s.store.get_run(&failed.id).await.unwrap().unwrap().status, RunStatus::Failed);
    assert_eq!(s.store.get_run(&held.id).await.unwrap().unwrap().status, RunStatus::Running, "its runner goes on");
}

#[tokio::test(start_paused = true)]
async fn a_dead_lettered_run_settles_the_daily_holds_its_dead_runner_left() {
    let s = setup();
    let run = s.stored_run().await;
    // A runner held two calls of step `a` on alice's day and died: the first with its
    // checkpoint written (the call may have been made), the second before it.
    let dead = Lease { holder: "dead".into(), expires_at: s.clock.now() + chrono::Duration::seconds(30) };
    s.store.claim(&run.id, &dead, s.clock.now()).await.unwrap();
    let mut running = StepRecord::settled(StepId::parse("a").unwrap(), StepStatus::Running, None, s.clock.now());
    (running.finished_at, running.attempts) = (None, 1);
    running.in_flight = Some(InFlight { tokens: 100, cost: Usd::from_pico(300) });
    s.store.save_step(&run.id, &dead, &running).await.unwrap();
    let hold = |attempt: u32, amount: u64| DayHold {
        run: run.id.clone(),
        step: StepId::parse("a").unwrap(),
        item: None,
        attempt,
        holder: "dead".into(),
        owner: "alice".into(),
        day: s.clock.now().date_naive(),
        amount: Usd::from_pico(amount),
    };
    let cap = Usd::from_pico(10_000);
    s.daily.reserve(&hold(1, 300), cap).await.unwrap().unwrap();
    s.daily.reserve(&hold(2, 500), cap).await.unwrap().unwrap();
    tokio::time::sleep(LEASE).await;

    s.dead_letters().handle(batch(vec![dead_letter("m1", payload(&run.id, 0), "chainrun.Terminal")])).await;
    assert_eq!(s.store.get_run(&run.id).await.unwrap().unwrap().status, RunStatus::Failed);
    let today = s.daily.day("alice", s.clock.now().date_naive()).await.unwrap();
    assert_eq!(
        today,
        DaySpend { charged: Usd::ZERO, committed: Usd::from_pico(300), lost: Usd::from_pico(300) },
        "the first lost, the second released"
    );
    assert!(s.daily.holds(&run.id).await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_message_that_is_not_a_runner_events_record_is_dropped_and_one_that_cannot_be_handled_now_is_redelivered() {
    let s = setup();
    let run = s.stored_run().await;
    let mut garbage = SqsMessage::default();
    garbage.message_id = Some("junk".into());
    garbage.body = Some("{not json".into());
    let consumer = DeadLetters { dispatcher: Arc::new(Down), ..s.dead_letters() };
    let response = consumer.handle(batch(vec![garbage, dead_letter("m1", payload(&run.id, 0), "Runtime.ExitError")])).await;
    let failures: Vec<&str> = response.batch_item_failures.iter().map(|f| f.item_identifier.as_str()).collect();
    assert_eq!(failures, ["m1"], "the garbage is dropped; the run's record waits for the dispatcher");
}

#[tokio::test(start_paused = true)]
async fn a_run_the_dead_letter_consumer_ends_gives_its_tenants_slot_back() {
    use chainrun_core::quota::{Slots, TenantLimits, gate};
    let s = setup();
    let run = s.stored_run().await;
    let quota = Arc::new(chainrun_core::memory::MemoryQuota::new());
    let limits = Arc::new(TenantLimits { concurrent_runs: Some(3), ..TenantLimits::unlimited() });
    gate::occupy_slot(quota.as_ref(), &limits, &run.caller.tenant(), &run.id).await.unwrap().unwrap();
    let mut consumer = s.dead_letters();
    consumer.ender.tenancy = Some(chainrun_core::engine::Tenancy { quota: quota.clone(), limits });
    consumer.handle(batch(vec![dead_letter("m1", payload(&run.id, 0), "chainrun.Terminal")])).await;
    assert_eq!(s.store.get_run(&run.id).await.unwrap().unwrap().status, RunStatus::Failed);
    assert!(quota.holders(&Slots { tenant: Principal::User("alice".into()), shard: 0 }).is_empty(), "the slot came back");
}
