//! Per-owner daily spend caps against the in-memory ports: every run of one caller draws
//! on one counter per UTC day, a call that does not fit is never made, holds are replaced
//! by what calls were charged, and the holds of a runner that died are settled when its run
//! is taken over or ended. A crash is the engine's future dropped mid-run, in paused time;
//! a takeover is a claim made after the dead runner's lease expired.
//!
//! Prices (Nova Micro): a one-byte prompt with `max_tokens: 100` reserves 97 × 35,000 +
//! 100 × 140,000 = 17,395,000 pico-dollars; 50 input and 100 output tokens cost 15,750,000.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::codes::ErrorCode;
use chainrun_core::engine::{EngineConfig, EngineError, Outcome};
use chainrun_core::ids::{Principal, StepId};
use chainrun_core::memory::{MemoryDailySpend, Script};
use chainrun_core::money::Usd;
use chainrun_core::ports::{Claim, DailySpend, Lease, ModelError, ModelErrorKind, RunStore};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::run::{ErrorInfo, EventType, RunRecord, RunStatus, StepRecord, StepStatus};
use chainrun_core::spend::{DailyCaps, DayHold, DaySpend, Settlement};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

mod support;
use support::{Harness, lease};

const ONE_BYTE_CALL_PICO: u64 = 17_395_000;
const FIFTY_IN_HUNDRED_OUT_PICO: u64 = 15_750_000;

struct Capped {
    h: Harness,
    spend: Arc<MemoryDailySpend>,
}

/// An engine whose callers are capped at `alice` pico-dollars for alice, none for others.
fn capped(scripts: Vec<Script>, alice: u64) -> Capped {
    let mut h = support::harness_with(scripts, Arc::new(ModelRegistry::builtin()), EngineConfig::default());
    let spend = Arc::new(MemoryDailySpend::new());
    let caps = DailyCaps::parse(None, Some(&json!({ "alice": Usd::from_pico(alice).to_string() }).to_string())).unwrap();
    h.engine = h.engine.clone().with_daily_caps(spend.clone(), caps);
    Capped { h, spend }
}

fn workflow(steps: Value) -> Value {
    json!({
        "name": "capped",
        "defaults": { "model": "amazon.nova-micro-v1:0", "max_tokens": 100, "retry": { "max_attempts": 2, "initial_backoff_ms": 100 } },
        "steps": steps
    })
}

impl Capped {
    async fn run(&self, caller: &str, definition: Value) -> (RunRecord, Vec<StepRecord>) {
        let run = self.queue(caller, definition).await;
        let lease = lease("runner-1");
        let Claim::Acquired(claimed) = self.h.store.claim(&run.id, &lease, Utc::now()).await.unwrap() else { panic!("claim failed") };
        self.h.engine.execute(*claimed, lease, None).await.unwrap();
        (self.h.store.get_run(&run.id).await.unwrap().unwrap(), self.h.store.get_steps(&run.id).await.unwrap())
    }

    async fn queue(&self, caller: &str, definition: Value) -> RunRecord {
        let run = RunRecord::new(
            "capped".parse().unwrap(),
            definition,
            json!({}),
            caller.parse().unwrap(),
            vec![Principal::User(caller.into())],
            Utc::now(),
        );
        self.h.store.create_run(&run).await.unwrap();
        run
    }

    /// `holder` claims `run` as of `now`.
    async fn claim(&self, run: &RunRecord, holder: &str, now: DateTime<Utc>) -> (RunRecord, Lease) {
        let lease = Lease { holder: holder.into(), expires_at: now + chrono::Duration::minutes(15) };
        let Claim::Acquired(claimed) = self.h.store.claim(&run.id, &lease, now).await.unwrap() else { panic!("claim failed") };
        (*claimed, lease)
    }

    /// `runner-1` runs `run` in a task, to be crashed (aborted) or left running as a zombie.
    async fn start(&self, run: &RunRecord) -> tokio::task::JoinHandle<Result<Outcome, EngineError>> {
        let (claimed, lease) = self.claim(run, "runner-1", Utc::now()).await;
        let engine = self.h.engine.clone();
        tokio::spawn(async move { engine.execute(claimed, lease, None).await })
    }

    /// `runner-2` takes `run` over once runner-1's lease has expired, and runs it.
    async fn take_over(&self, run: &RunRecord) -> RunRecord {
        let (claimed, lease) = self.claim(run, "runner-2", Utc::now() + chrono::Duration::minutes(16)).await;
        self.h.engine.execute(claimed, lease, None).await.unwrap();
        self.h.store.get_run(&run.id).await.unwrap().unwrap()
    }

    async fn today(&self, owner: &str) -> DaySpend {
        self.spend.day(owner, Utc::now().date_naive()).await.unwrap()
    }
}

#[tokio::test(start_paused = true)]
async fn runs_of_one_owner_share_the_days_cap_and_the_call_that_does_not_fit_is_never_made() {
    // The first run's call holds 17,395,000 and is charged 15,750,000; the second run's
    // call would take the day to 15,750,000 + 17,395,000, one pico-dollar over the cap.
    let cap = FIFTY_IN_HUNDRED_OUT_PICO + ONE_BYTE_CALL_PICO - 1;
    let c = capped(vec![Script::reply("A", "a").with_usage(50, 100)], cap);
    let (first, _) = c.run("alice", workflow(json!([{ "id": "a", "type": "llm", "prompt": "A" }]))).await;
    assert_eq!(first.status, RunStatus::Completed);
    let spent =
        DaySpend { charged: Usd::from_pico(FIFTY_IN_HUNDRED_OUT_PICO), committed: Usd::from_pico(FIFTY_IN_HUNDRED_OUT_PICO), lost: Usd::ZERO };
    assert_eq!(c.today("alice").await, spent, "the hold was replaced by the charge");

    let (second, records) = c.run("alice", workflow(json!([{ "id": "a", "type": "llm", "prompt": "A" }]))).await;
    assert_eq!(c.h.model.calls_matching("A"), 1, "the second run's call is never made");
    assert_eq!(second.status, RunStatus::Failed);
    let error = second.error.unwrap();
    assert_eq!((error.code.as_str(), error.retryable), ("BUDGET_EXCEEDED", false));
    assert!(
        error.message.contains("alice's daily spend cap") && error.message.contains("$0.00001575 already charged or held today"),
        "{}",
        error.message
    );
    assert_eq!((records[0].status, records[0].attempts, records[0].cost), (StepStatus::Failed, 0, Usd::ZERO));
    let event = c.h.progress.events(&second.id).into_iter().find(|e| e.kind == EventType::StepFailed).unwrap();
    let budget = &event.data["detail"]["budget"];
    assert_eq!((budget["limit"].as_str(), budget["owner"].as_str()), (Some("owner_daily_cost_usd"), Some("alice")));
    assert_eq!(budget["owner_daily_cost_pico_usd"], cap);
    assert_eq!(budget["committed_today_pico_usd"], FIFTY_IN_HUNDRED_OUT_PICO);
    assert_eq!(budget["attempted"]["cost_pico_usd"], ONE_BYTE_CALL_PICO);
    assert_eq!(c.today("alice").await, spent, "a refusal changes nothing");

    // Another caller has no cap and no counter.
    let (bob, _) = c.run("bob", workflow(json!([{ "id": "a", "type": "llm", "prompt": "A" }]))).await;
    assert_eq!(bob.status, RunStatus::Completed);
    assert_eq!(c.today("bob").await, DaySpend::default());
}

#[tokio::test(start_paused = true)]
async fn calls_in_flight_hold_their_worst_case_so_parallel_steps_cannot_overrun_the_day() {
    // Room for one call's worst case, not two: of two parallel steps, one is refused while
    // the other is in flight, whatever it is charged in the end.
    let c = capped(
        vec![
            Script::reply("P", "p").with_usage(1, 1).with_latency(Duration::from_secs(1)),
            Script::reply("Q", "q").with_usage(1, 1).with_latency(Duration::from_secs(1)),
        ],
        2 * ONE_BYTE_CALL_PICO - 1,
    );
    let (run, records) = c
        .run(
            "alice",
            workflow(json!([
                { "id": "p", "type": "llm", "prompt": "P", "required": false },
                { "id": "q", "type": "llm", "prompt": "Q", "required": false }
            ])),
        )
        .await;
    assert_eq!(run.status, RunStatus::Completed, "both steps are optional");
    assert_eq!(c.h.model.calls().len(), 1);
    let statuses: Vec<StepStatus> = records.iter().map(|r| r.status).collect();
    assert!(statuses.contains(&StepStatus::Completed) && statuses.contains(&StepStatus::Failed), "{statuses:?}");
    let charged = Usd::from_pico(35_000 + 140_000);
    assert_eq!(c.today("alice").await, DaySpend { charged, committed: charged, lost: Usd::ZERO });
}

#[tokio::test(start_paused = true)]
async fn a_call_that_fails_without_usage_gives_its_hold_back() {
    let throttled = ModelError::new(ModelErrorKind::Throttled, "ThrottlingException", "slow down");
    let c = capped(vec![Script::failing_first("T", throttled, 5, "never")], ONE_BYTE_CALL_PICO);
    let (run, records) = c.run("alice", workflow(json!([{ "id": "t", "type": "llm", "prompt": "T" }]))).await;
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(records[0].attempts, 2, "both attempts fit: the first gave its hold back");
    assert_eq!(c.today("alice").await, DaySpend::default());
}

/// Runner-1 runs `run` until its first call is in flight, then dies.
async fn crash_mid_call(c: &Capped, run: &RunRecord) {
    let crashed = c.start(run).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    crashed.abort();
    assert!(crashed.await.unwrap_err().is_cancelled());
}

fn usd(pico: u64) -> Usd {
    Usd::from_pico(pico)
}

/// Runner-1's hold of `amount` for the first attempt of `run`'s step `step`, today.
fn runner_1s_hold(run: &RunRecord, step: &str, amount: u64) -> DayHold {
    DayHold {
        run: run.id.clone(),
        step: StepId::parse(step).unwrap(),
        item: None,
        attempt: 1,
        holder: "runner-1".into(),
        owner: "alice".into(),
        day: Utc::now().date_naive(),
        amount: usd(amount),
    }
}

#[tokio::test(start_paused = true)]
async fn a_hold_left_by_a_runner_that_died_mid_call_is_counted_lost_when_its_run_is_taken_over() {
    // Room for two calls' worst case less one pico-dollar: the lost call keeps one, so the
    // call made again after the takeover does not fit.
    let slow = Script::reply("A", "a").with_usage(50, 100).with_latency(Duration::from_secs(60));
    let c = capped(vec![slow], 2 * ONE_BYTE_CALL_PICO - 1);
    let run = c.queue("alice", workflow(json!([{ "id": "a", "type": "llm", "prompt": "A" }]))).await;
    crash_mid_call(&c, &run).await;
    assert_eq!(c.today("alice").await, DaySpend { charged: Usd::ZERO, committed: usd(ONE_BYTE_CALL_PICO), lost: Usd::ZERO });
    assert_eq!(c.spend.holds(&run.id).await.unwrap().len(), 1, "the dead runner's hold is recorded");

    let ended = c.take_over(&run).await;
    let today = c.today("alice").await;
    assert_eq!(today, DaySpend { charged: Usd::ZERO, committed: usd(ONE_BYTE_CALL_PICO), lost: usd(ONE_BYTE_CALL_PICO) }, "committed is unchanged");
    assert_eq!(today.held(), Usd::ZERO);
    assert!(c.spend.holds(&run.id).await.unwrap().is_empty());
    // The cap still counts the lost call: the step's call is not made again.
    assert_eq!(c.h.model.calls_matching("A"), 1);
    assert_eq!(ended.status, RunStatus::Failed);
    let error = ended.error.unwrap();
    assert!(error.code == ErrorCode::BudgetExceeded && error.message.contains("alice's daily spend cap"), "{}", error.message);
}

#[tokio::test(start_paused = true)]
async fn a_hold_whose_call_was_never_checkpointed_is_released_when_its_run_is_taken_over() {
    let c = capped(
        vec![Script::reply("A", "a").with_usage(50, 100).with_latency(Duration::from_secs(60)), Script::reply("B", "b").with_usage(50, 100)],
        100 * ONE_BYTE_CALL_PICO,
    );
    let steps = json!([{ "id": "a", "type": "llm", "prompt": "A" }, { "id": "b", "type": "llm", "prompt": "B {{ steps.a.text }}" }]);
    let run = c.queue("alice", workflow(steps)).await;
    crash_mid_call(&c, &run).await;
    // As if runner-1 had also held a call of `b` and died before its checkpoint.
    let never_made = runner_1s_hold(&run, "b", 1_000_000);
    c.spend.reserve(&never_made, usd(100 * ONE_BYTE_CALL_PICO)).await.unwrap().unwrap();
    assert_eq!(c.today("alice").await.committed, usd(ONE_BYTE_CALL_PICO + 1_000_000));

    assert_eq!(c.take_over(&run).await.status, RunStatus::Completed);
    // `a`'s first call stays lost; the hold of `b`'s call that was never made is gone; the
    // calls made after the takeover are charged.
    let charged = usd(2 * FIFTY_IN_HUNDRED_OUT_PICO);
    let lost = usd(ONE_BYTE_CALL_PICO);
    assert_eq!(c.today("alice").await, DaySpend { charged, committed: charged.saturating_add(lost), lost });
    assert!(c.spend.holds(&run.id).await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_dead_runner_that_settles_after_its_run_was_taken_over_changes_nothing() {
    // Runner-1 is not dead, only late: its call returns after runner-2 took the run over
    // and counted the call lost.
    let late = Script::reply("A", "a").with_usage(50, 100).with_latency(Duration::from_secs(100));
    let c = capped(vec![late], 2 * ONE_BYTE_CALL_PICO - 1);
    let run = c.queue("alice", workflow(json!([{ "id": "a", "type": "llm", "prompt": "A" }]))).await;
    let zombie = c.start(&run).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(c.take_over(&run).await.status, RunStatus::Failed);
    let resolved = DaySpend { charged: Usd::ZERO, committed: usd(ONE_BYTE_CALL_PICO), lost: usd(ONE_BYTE_CALL_PICO) };
    assert_eq!(c.today("alice").await, resolved);

    assert!(zombie.await.unwrap().is_err(), "the zombie's next checkpoint finds its lease lost");
    assert_eq!(c.today("alice").await, resolved, "its settlement found its hold gone");
    // Settling again by hand is as idempotent.
    let hold = runner_1s_hold(&run, "a", ONE_BYTE_CALL_PICO);
    c.spend.settle(&hold, Settlement::Charged(usd(FIFTY_IN_HUNDRED_OUT_PICO))).await.unwrap();
    assert_eq!(c.today("alice").await, resolved);
}

#[tokio::test(start_paused = true)]
async fn ending_a_run_without_running_it_settles_the_holds_its_dead_runners_left() {
    let c = capped(vec![Script::reply("A", "a").with_usage(50, 100).with_latency(Duration::from_secs(60))], 100 * ONE_BYTE_CALL_PICO);
    let steps = json!([{ "id": "a", "type": "llm", "prompt": "A" }, { "id": "b", "type": "llm", "prompt": "B {{ steps.a.text }}" }]);
    let run = c.queue("alice", workflow(steps)).await;
    crash_mid_call(&c, &run).await;
    let never_made = runner_1s_hold(&run, "b", 1_000_000);
    c.spend.reserve(&never_made, usd(100 * ONE_BYTE_CALL_PICO)).await.unwrap().unwrap();

    let (claimed, lease) = c.claim(&run, "runner-2", Utc::now() + chrono::Duration::minutes(16)).await;
    let error = ErrorInfo::terminal(ErrorCode::RunnerLost, "runners kept dying");
    assert_eq!(c.h.engine.fail_run(claimed, &lease, error).await.unwrap(), Outcome::Finished(RunStatus::Failed));
    let lost = usd(ONE_BYTE_CALL_PICO);
    assert_eq!(c.today("alice").await, DaySpend { charged: Usd::ZERO, committed: lost, lost });
    assert!(c.spend.holds(&run.id).await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_daily_cap_refusal_fails_its_step_even_when_the_run_budget_pauses() {
    let cap = FIFTY_IN_HUNDRED_OUT_PICO + ONE_BYTE_CALL_PICO - 1;
    let c = capped(vec![Script::reply("A", "a").with_usage(50, 100)], cap);
    let mut pausing = workflow(json!([{ "id": "a", "type": "llm", "prompt": "A" }]));
    pausing["budget"] = json!({ "max_total_tokens": 100000, "on_exceeded": "pause" });
    let (first, _) = c.run("alice", pausing.clone()).await;
    assert_eq!(first.status, RunStatus::Completed);
    // The day's cap comes back only with the next day: nothing to wait for.
    let (second, _) = c.run("alice", pausing).await;
    assert_eq!((second.status, second.waiting), (RunStatus::Failed, None));
    assert!(second.error.unwrap().message.contains("daily spend cap"));
}
