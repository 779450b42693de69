//! Per-owner daily spend caps against the in-memory ports: every run of one caller draws
//! on one counter per UTC day, a call that does not fit is never made, and holds are
//! replaced by what calls were charged.
//!
//! Prices (Nova Micro): a one-byte prompt with `max_tokens: 100` reserves 97 × 35,000 +
//! 100 × 140,000 = 17,395,000 pico-dollars; 50 input and 100 output tokens cost 15,750,000.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::engine::EngineConfig;
use chainrun_core::ids::Principal;
use chainrun_core::memory::{MemoryDailySpend, Script};
use chainrun_core::money::Usd;
use chainrun_core::ports::{Claim, DailySpend, ModelError, ModelErrorKind, RunStore};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::run::{EventType, RunRecord, RunStatus, StepRecord, StepStatus};
use chainrun_core::spend::{DailyCaps, DaySpend};
use chrono::Utc;
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
        let run = RunRecord::new(
            "capped".parse().unwrap(),
            definition,
            json!({}),
            caller.parse().unwrap(),
            vec![Principal::User(caller.into())],
            Utc::now(),
        );
        self.h.store.create_run(&run).await.unwrap();
        let lease = lease("runner-1");
        let Claim::Acquired(claimed) = self.h.store.claim(&run.id, &lease, Utc::now()).await.unwrap() else { panic!("claim failed") };
        self.h.engine.execute(*claimed, lease, None).await.unwrap();
        (self.h.store.get_run(&run.id).await.unwrap().unwrap(), self.h.store.get_steps(&run.id).await.unwrap())
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
    let spent = DaySpend { charged: Usd::from_pico(FIFTY_IN_HUNDRED_OUT_PICO), committed: Usd::from_pico(FIFTY_IN_HUNDRED_OUT_PICO) };
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
    assert_eq!(c.today("alice").await, DaySpend { charged, committed: charged });
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
