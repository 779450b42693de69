//! The runner gives back a run's concurrency slot exactly when the run ends — completed or
//! failed, and again harmlessly on a redelivery of the ended run — and a run waiting for a
//! person keeps it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::aws::RunnerEvent;
use chainrun_core::durability::{Durability, SystemClock};
use chainrun_core::engine::{Engine, EngineConfig};
use chainrun_core::ids::Principal;
use chainrun_core::memory::{MemoryAnalytics, MemoryDispatcher, MemoryProgress, MemoryQuota, MemoryStore, Script, ScriptedModel};
use chainrun_core::ports::{ModelError, ModelErrorKind, RunStore};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::quota::{Slots, TenantLimits, gate};
use chainrun_core::run::{Cause, RunRecord, RunStatus};
use chainrun_runner::{Handled, Runner};
use chrono::Utc;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

struct Setup {
    runner: Runner,
    store: Arc<MemoryStore>,
    quota: Arc<MemoryQuota>,
    limits: TenantLimits,
}

fn setup() -> Setup {
    let model = Arc::new(ScriptedModel::new(vec![
        Script::reply("OK", "fine"),
        Script::failing_first("BAD", ModelError::new(ModelErrorKind::Invalid, "ValidationException", "refused"), 9, "never"),
    ]));
    let store = Arc::new(MemoryStore::new());
    let quota = Arc::new(MemoryQuota::new());
    let limits = TenantLimits { concurrent_runs: Some(5), ..TenantLimits::unlimited() };
    let engine = Engine::new(model, store.clone(), Arc::new(MemoryProgress::new()), Arc::new(ModelRegistry::builtin()), EngineConfig::default())
        .with_tenant_limits(quota.clone(), Arc::new(limits.clone()));
    let runner = Runner {
        store: store.clone(),
        engine,
        dispatcher: Arc::new(MemoryDispatcher::new()),
        analytics: Arc::new(MemoryAnalytics::new()),
        durability: Durability::default(),
        clock: Arc::new(SystemClock),
    };
    Setup { runner, store, quota, limits }
}

fn alices() -> Slots {
    Slots { tenant: Principal::User("alice".into()), shard: 0 }
}

impl Setup {
    /// A run of `steps` by alice, holding a slot as the API's start gives it one.
    async fn started(&self, steps: Value) -> RunRecord {
        let def = json!({ "name": "t", "defaults": { "model": "amazon.nova-micro-v1:0" }, "steps": steps });
        let run = RunRecord::new("t".parse().unwrap(), def, json!({}), "alice".parse().unwrap(), vec![Principal::User("alice".into())], Utc::now());
        self.store.create_run(&run).await.unwrap();
        gate::occupy_slot(self.quota.as_ref(), &self.limits, &run.caller.tenant(), &run.id).await.unwrap().unwrap();
        run
    }

    async fn deliver(&self, run: &RunRecord) -> Handled {
        let deadline = Utc::now() + chrono::Duration::minutes(15);
        self.runner.handle(RunnerEvent::new(run.id.clone(), Cause::Start), "inv", deadline, Duration::from_secs(90)).await.unwrap()
    }
}

#[tokio::test]
async fn a_run_that_completes_or_fails_gives_its_slot_back_once() {
    let s = setup();
    let ok = s.started(json!([{ "id": "a", "type": "llm", "prompt": "OK" }])).await;
    let bad = s.started(json!([{ "id": "a", "type": "llm", "prompt": "BAD" }])).await;
    assert_eq!(s.quota.holders(&alices()).len(), 2);
    assert_eq!(s.deliver(&ok).await, Handled::Finished(RunStatus::Completed));
    assert_eq!(s.quota.holders(&alices()), vec![bad.id.clone()]);
    assert_eq!(s.deliver(&bad).await, Handled::Finished(RunStatus::Failed));
    assert!(s.quota.holders(&alices()).is_empty());
    // A redelivery of an ended run passes the release again: nothing more is given back.
    assert_eq!(s.deliver(&ok).await, Handled::AlreadyFinished);
    assert!(s.quota.holders(&alices()).is_empty());
}

#[tokio::test]
async fn a_run_waiting_for_a_person_keeps_its_slot() {
    let s = setup();
    let run = s.started(json!([{ "id": "check", "type": "review", "show": "ok?" }])).await;
    assert_eq!(s.deliver(&run).await, Handled::Waiting);
    assert_eq!(s.store.get_run(&run.id).await.unwrap().unwrap().status, RunStatus::AwaitingInput);
    assert_eq!(s.quota.holders(&alices()), vec![run.id.clone()], "it has not ended");
}
