//! Token-aware throttling per tenant through the engine, in paused time: a call that does
//! not fit its tenant's allowance for the minute waits for the next minute instead of
//! failing, the tokens reserved in any minute never exceed the allowance, one tenant's
//! flood does not delay another, a call the invocation cannot wait for is handed to the
//! next invocation, and a call larger than a whole minute's allowance fails at once.
//!
//! Sizes: a one-byte prompt reserves 1 + 32 + 64 = 97 input tokens (the budget's estimate)
//! plus `max_tokens: 100` = 197 tokens; the scripted model then reports 50 + 100 = 150.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use async_trait::async_trait;
use chainrun_core::durability::Clock;
use chainrun_core::engine::{EngineConfig, Outcome};
use chainrun_core::ids::{Principal, RunId};
use chainrun_core::memory::{MemoryQuota, PausedClock, Script};
use chainrun_core::ports::{Claim, Lease, RunStore, StoreError, TenantQuota};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::quota::{Counter, Occupied, Slots, TenantLimits, Window};
use chainrun_core::run::{RunRecord, RunStatus, StepStatus};
use chrono::Utc;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod support;

const CALL_TOKENS: u64 = 197;

/// The in-memory quota, watched: what is outstanding in each window (reserved, less what was
/// given back), and the most that ever was — counted here, apart from the adapter.
#[derive(Default)]
struct Watched {
    inner: MemoryQuota,
    outstanding: Mutex<HashMap<(Principal, Window), u64>>,
    most: Mutex<HashMap<(Principal, Window), u64>>,
    admitted: Mutex<Vec<(Principal, Window)>>,
}

#[async_trait]
impl TenantQuota for Watched {
    async fn take(&self, counter: &Counter, amount: u64, limit: u64) -> Result<bool, StoreError> {
        let taken = self.inner.take(counter, amount, limit).await?;
        if taken {
            let key = (counter.tenant.clone(), counter.window);
            let mut outstanding = self.outstanding.lock().unwrap();
            let now = outstanding.entry(key.clone()).or_default();
            *now += amount;
            let most = *now;
            let mut max = self.most.lock().unwrap();
            let m = max.entry(key.clone()).or_default();
            *m = (*m).max(most);
            self.admitted.lock().unwrap().push(key);
        }
        Ok(taken)
    }
    async fn give_back(&self, counter: &Counter, amount: u64) -> Result<(), StoreError> {
        if let Some(now) = self.outstanding.lock().unwrap().get_mut(&(counter.tenant.clone(), counter.window)) {
            *now -= amount;
        }
        self.inner.give_back(counter, amount).await
    }
    async fn used(&self, counter: &Counter) -> Result<u64, StoreError> {
        self.inner.used(counter).await
    }
    async fn occupy(&self, slots: &Slots, run: &RunId, capacity: u64) -> Result<Occupied, StoreError> {
        self.inner.occupy(slots, run, capacity).await
    }
    async fn vacate(&self, slots: &Slots, run: &RunId) -> Result<bool, StoreError> {
        self.inner.vacate(slots, run).await
    }
}

struct Throttled {
    h: support::Harness,
    quota: Arc<Watched>,
    clock: Arc<PausedClock>,
}

/// An engine whose tenants may reserve `allowance` tokens a minute for Nova Micro.
fn throttled(allowance: u64, config: EngineConfig) -> Throttled {
    let mut h = support::harness_with(vec![Script::reply("A", "a").with_usage(50, 100)], Arc::new(ModelRegistry::builtin()), config);
    let quota = Arc::new(Watched::default());
    let limits = TenantLimits { tokens_per_minute: Some(allowance), ..TenantLimits::unlimited() };
    let clock = Arc::new(PausedClock::default());
    h.engine = h.engine.clone().with_tenant_limits(quota.clone(), Arc::new(limits)).with_clock(clock.clone());
    Throttled { h, quota, clock }
}

fn parallel(n: usize) -> Value {
    let steps: Vec<Value> = (0..n).map(|i| json!({ "id": format!("s{i}"), "type": "llm", "prompt": "A" })).collect();
    json!({ "name": "flood", "max_concurrency": 50, "defaults": { "model": "amazon.nova-micro-v1:0", "max_tokens": 100 }, "steps": steps })
}

impl Throttled {
    async fn queue(&self, caller: &str, definition: Value) -> RunRecord {
        let run = RunRecord::new(
            "flood".parse().unwrap(),
            definition,
            json!({}),
            caller.parse().unwrap(),
            vec![Principal::User(caller.into())],
            Utc::now(),
        );
        self.h.store.create_run(&run).await.unwrap();
        run
    }

    async fn execute(&self, run: &RunRecord, holder: &str, deadline: Option<tokio::time::Instant>) -> Outcome {
        let lease = Lease { holder: holder.into(), expires_at: Utc::now() + chrono::Duration::days(1) };
        let Claim::Acquired(claimed) = self.h.store.claim(&run.id, &lease, Utc::now()).await.unwrap() else { panic!("claim failed") };
        self.h.engine.execute(*claimed, lease, deadline).await.unwrap()
    }

    /// Moves paused time to one second into the next minute, so waits are predictable.
    async fn to_minute_start(&self) {
        let into = self.clock.now().timestamp().rem_euclid(60) as u64;
        tokio::time::advance(Duration::from_secs(60 - into + 1)).await;
    }

    fn most_in_any_minute(&self) -> u64 {
        self.quota.most.lock().unwrap().values().copied().max().unwrap_or(0)
    }
}

#[tokio::test(start_paused = true)]
async fn calls_over_the_minutes_allowance_wait_for_the_next_minute_and_never_fail() {
    // 400 tokens a minute: two calls' reservations fit (394), a third does not even after
    // their give-backs (2 × 150 + 197 > 400). Seven calls take four minutes.
    let t = throttled(400, EngineConfig::default());
    t.to_minute_start().await;
    let started = t.clock.now();
    let run = t.queue("alice", parallel(7)).await;
    assert_eq!(t.execute(&run, "r1", None).await, Outcome::Finished(RunStatus::Completed));
    let steps = t.h.store.get_steps(&run.id).await.unwrap();
    assert!(steps.iter().all(|s| s.status == StepStatus::Completed && s.attempts == 1), "no step failed or retried");
    assert_eq!(t.h.model.calls_matching("A"), 7);
    let minutes = Window::containing(t.clock.now()).index - Window::containing(started).index;
    assert_eq!(minutes, 3, "calls waited for three more minutes");
    let per_minute = t.quota.admitted.lock().unwrap().iter().fold(HashMap::<Window, u32>::new(), |mut m, (_, w)| {
        *m.entry(*w).or_default() += 1;
        m
    });
    assert!(per_minute.values().all(|&n| n <= 2), "{per_minute:?}");
    assert!(t.most_in_any_minute() <= 400, "reserved {} in one minute", t.most_in_any_minute());
}

#[tokio::test(start_paused = true)]
async fn many_runs_reserving_at_once_never_exceed_the_allowance_in_any_minute() {
    // 20 runs of 5 parallel calls each, all alice's, against 1,000 tokens a minute.
    let t = Arc::new(throttled(1_000, EngineConfig::default()));
    let mut tasks = Vec::new();
    for i in 0..20 {
        let run = t.queue("alice", parallel(5)).await;
        let t = t.clone();
        tasks.push(tokio::spawn(async move { t.execute(&run, &format!("r{i}"), None).await }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), Outcome::Finished(RunStatus::Completed));
    }
    assert_eq!(t.h.model.calls_matching("A"), 100);
    assert!(t.most_in_any_minute() <= 1_000, "reserved {} in one minute", t.most_in_any_minute());
    // At most 6 calls fit a minute (5 reservations, then a sixth in the room their
    // give-backs leave), so 100 calls span at least 17 minutes.
    let minutes: std::collections::HashSet<Window> = t.quota.admitted.lock().unwrap().iter().map(|(_, w)| *w).collect();
    assert!(minutes.len() >= 17, "{} minutes", minutes.len());
}

#[tokio::test(start_paused = true)]
async fn one_tenants_flood_does_not_delay_another_tenant() {
    let t = Arc::new(throttled(400, EngineConfig::default()));
    t.to_minute_start().await;
    let started = t.clock.now();
    let flood = t.queue("alice", parallel(10)).await;
    let t2 = t.clone();
    let alice = tokio::spawn(async move { t2.execute(&flood, "r1", None).await });
    tokio::task::yield_now().await;
    let bob = t.queue("bob", parallel(2)).await;
    assert_eq!(t.execute(&bob, "r2", None).await, Outcome::Finished(RunStatus::Completed));
    assert_eq!(Window::containing(t.clock.now()), Window::containing(started), "bob's calls ran in the first minute");
    assert_eq!(alice.await.unwrap(), Outcome::Finished(RunStatus::Completed));
    assert_eq!(Window::containing(t.clock.now()).index - Window::containing(started).index, 4, "alice's ten calls took five minutes");
}

#[tokio::test(start_paused = true)]
async fn a_call_the_invocation_cannot_wait_for_is_handed_to_the_next_invocation() {
    // One call a minute; the invocation has 10 s left (1 s margin): the second call would
    // wait about 59 s, so it is handed over and the run suspends, nothing failed.
    let config = EngineConfig { deadline_margin: Duration::from_secs(1), ..EngineConfig::default() };
    let t = throttled(250, config);
    t.to_minute_start().await;
    let run = t.queue("alice", parallel(2)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    assert_eq!(t.execute(&run, "r1", Some(deadline)).await, Outcome::Suspended);
    assert_eq!(t.h.model.calls_matching("A"), 1);
    let steps = t.h.store.get_steps(&run.id).await.unwrap();
    let statuses: Vec<StepStatus> = steps.iter().map(|s| s.status).collect();
    assert!(statuses.contains(&StepStatus::Completed) && statuses.contains(&StepStatus::Waiting), "{statuses:?}");
    assert!(steps.iter().all(|s| s.error.is_none()));
    // The next invocation, with time to wait, finishes it.
    assert_eq!(t.execute(&run, "r2", None).await, Outcome::Finished(RunStatus::Completed));
    assert_eq!(t.h.model.calls_matching("A"), 2);
    let steps = t.h.store.get_steps(&run.id).await.unwrap();
    assert!(steps.iter().all(|s| s.status == StepStatus::Completed), "{steps:?}");
}

#[tokio::test(start_paused = true)]
async fn a_call_larger_than_a_whole_minutes_allowance_fails_at_once_without_being_made() {
    let t = throttled(CALL_TOKENS - 1, EngineConfig::default());
    let run = t.queue("alice", parallel(1)).await;
    assert_eq!(t.execute(&run, "r1", None).await, Outcome::Finished(RunStatus::Failed));
    assert_eq!(t.h.model.calls_matching("A"), 0);
    let error = t.h.store.get_run(&run.id).await.unwrap().unwrap().error.unwrap();
    assert_eq!((error.code.as_str(), error.retryable), ("BUDGET_EXCEEDED", false));
    assert!(error.message.contains("allowance of 196 tokens a minute"), "{}", error.message);
}
