//! Who a run's progress goes to: every owner's row agrees with the run after every event,
//! and a run of a stored workflow follows the workflow's access from its next invocation
//! (new owners get rows, those who lost it lose theirs). In paused time, in memory.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use async_trait::async_trait;
use chainrun_core::access::{Access, Visibility, run_owners};
use chainrun_core::durability::Durability;
use chainrun_core::engine::{Engine, EngineConfig};
use chainrun_core::ids::{Principal, RunId, StepId};
use chainrun_core::memory::{MemoryAnalytics, MemoryDispatcher, MemoryProgress, MemoryStore, MemoryWorkflows, PausedClock, Script, ScriptedModel};
use chainrun_core::ports::{DecideOutcome, ProgressError, ProgressReader, ProgressSink, RunStore, WorkflowStore};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::run::{Cause, Event, ProgressRow, ReviewDecision, RunRecord, RunStatus, RunnerEvent, Verdict};
use chainrun_core::stored::{Pinned, StoredWorkflow, WorkflowVersion};
use chainrun_runner::{Handled, Runner};
use chrono::Utc;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The memory feeds, checked after every publish: each owner named has the event's row,
/// at the event's seq, with its status — and nobody else's feed moved.
struct Checking {
    inner: Arc<MemoryProgress>,
    checked: Mutex<u32>,
}

#[async_trait]
impl ProgressSink for Checking {
    async fn publish(&self, event: &Event, row: &ProgressRow, owners: &[Principal]) -> Result<(), ProgressError> {
        self.inner.publish(event, row, owners).await?;
        for owner in owners {
            let stored = self.inner.progress_of(owner, &event.run_id).await.unwrap().unwrap_or_else(|| panic!("{owner} has no row"));
            assert_eq!((stored.last_seq, stored.status), (event.seq, row.status), "{owner}'s row after event {}", event.seq);
        }
        *self.checked.lock().unwrap() += 1;
        Ok(())
    }

    async fn forget(&self, run: &RunId, principals: &[Principal]) -> Result<(), ProgressError> {
        self.inner.forget(run, principals).await
    }

    async fn last_event(&self, run: &RunId) -> Result<Option<Event>, ProgressError> {
        self.inner.last_event(run).await
    }
}

struct Setup {
    runner: Arc<Runner>,
    store: Arc<MemoryStore>,
    progress: Arc<MemoryProgress>,
    checking: Arc<Checking>,
    workflows: Arc<MemoryWorkflows>,
}

fn setup() -> Setup {
    setup_with(vec![Script::reply("DRAFT", "Dear customer"), Script::reply("SEND", "sent")])
}

fn setup_with(scripts: Vec<Script>) -> Setup {
    let model = Arc::new(ScriptedModel::new(scripts));
    let store = Arc::new(MemoryStore::new());
    let progress = Arc::new(MemoryProgress::new());
    let checking = Arc::new(Checking { inner: progress.clone(), checked: Mutex::new(0) });
    let workflows = Arc::new(MemoryWorkflows::new());
    let engine = Engine::new(model, store.clone(), checking.clone(), Arc::new(ModelRegistry::builtin()), EngineConfig::default())
        .with_workflows(workflows.clone());
    let runner = Arc::new(Runner {
        store: store.clone(),
        engine,
        dispatcher: Arc::new(MemoryDispatcher::new()),
        analytics: Arc::new(MemoryAnalytics::new()),
        durability: Durability::with_lease(Duration::from_secs(30)),
        clock: Arc::new(PausedClock::default()),
    });
    Setup { runner, store, progress, checking, workflows }
}

fn definition() -> Value {
    json!({
        "name": "reply",
        "defaults": { "model": "amazon.nova-micro-v1:0" },
        "steps": [
            { "id": "draft", "type": "llm", "prompt": "DRAFT" },
            { "id": "approve", "type": "review", "show": "{{ steps.draft.text }}", "reviewers": ["group:support"] },
            { "id": "send", "type": "llm", "prompt": "SEND {{ steps.approve.text }}" }
        ]
    })
}

/// A PUBLIC workflow of olivia's, and a run of it bob started, queued as the API does.
async fn public_run(s: &Setup) -> (StoredWorkflow, RunRecord) {
    let at = Utc::now();
    let head = StoredWorkflow {
        access: Access { visibility: Visibility::Public, shares: vec![] },
        ..StoredWorkflow::new("olivia".parse().unwrap(), "reply".parse().unwrap(), at)
    };
    let first = WorkflowVersion { version: 1, definition: definition(), written_by: "olivia".parse().unwrap(), written_at: at };
    s.workflows.create(&head, &first).await.unwrap();
    let graph = chainrun_core::graph::validate_json(&definition(), &ModelRegistry::builtin()).unwrap();
    let bob = "bob".parse().unwrap();
    let people: Vec<Principal> = graph.people(&bob).into_iter().flat_map(|(_, p)| p).collect();
    let owners = run_owners(&bob, Some(&head.owner), &people, &head.access);
    let mut run = RunRecord::new("reply".parse().unwrap(), definition(), json!({}), bob, owners, at);
    run.step_order = graph.step_order();
    run.pinned = Some(Pinned { workflow_id: head.id.clone(), version: 1 });
    run.workflow_owner = Some(head.owner.clone());
    run.access = Some(head.access.clone());
    run.inherits_access = true;
    s.store.create_run(&run).await.unwrap();
    (head, run)
}

fn deliver(s: &Setup, run: &RunId, cause: Cause) -> tokio::task::JoinHandle<Handled> {
    let (runner, run) = (s.runner.clone(), run.clone());
    tokio::spawn(async move {
        runner.handle(RunnerEvent::new(run, cause), "inv", Utc::now() + chrono::Duration::minutes(15), Duration::from_secs(90)).await.unwrap()
    })
}

fn user(u: &str) -> Principal {
    Principal::User(u.into())
}

#[tokio::test(start_paused = true)]
async fn every_owners_row_agrees_with_the_run_after_every_event_and_a_narrowed_workflow_retargets_the_next_invocation() {
    let s = setup();
    let (head, run) = public_run(&s).await;
    let support = Principal::Group("support".into());
    assert_eq!(run.owners, vec![user("bob"), user("olivia"), support.clone(), Principal::Admin, Principal::Public]);

    assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::Waiting);
    let seq = s.progress.events(&run.id).last().unwrap().seq;
    for owner in &run.owners {
        assert_eq!(s.progress.progress_of(owner, &run.id).await.unwrap().map(|r| r.last_seq), Some(seq), "{owner} sees the wait");
    }

    // Made private while the run waits: from its next invocation the public feed loses it.
    assert!(s.workflows.set_access(&head.id, &Access::private()).await.unwrap());
    let decision = ReviewDecision { decision: Verdict::Approve, output: None, comment: None, by: "gus".parse().unwrap(), at: Utc::now() };
    let approve = StepId::parse("approve").unwrap();
    assert_eq!(s.store.decide(&run.id, &approve, &decision).await.unwrap(), DecideOutcome::Recorded { requeued: true });
    assert_eq!(deliver(&s, &run.id, Cause::Resume).await.unwrap(), Handled::Finished(RunStatus::Completed));

    let now_owners = vec![user("bob"), user("olivia"), support.clone(), Principal::Admin];
    assert_eq!(s.store.get_run(&run.id).await.unwrap().unwrap().owners, now_owners, "the run records its new audience");
    assert_eq!(s.progress.progress_of(&Principal::Public, &run.id).await.unwrap(), None, "the public feed no longer shows it");
    let last = s.progress.events(&run.id).last().unwrap().seq;
    for owner in &now_owners {
        let row = s.progress.progress_of(owner, &run.id).await.unwrap().unwrap();
        assert_eq!((row.last_seq, row.status), (last, RunStatus::Completed), "{owner}'s row is the run's end");
    }
    assert_eq!(*s.checking.checked.lock().unwrap() as u64, last, "every event was checked");

    // Shared again, wider: the next invocation would add the feed back. A finished run has
    // none, so its rows stay as they ended.
    assert!(s.workflows.set_access(&head.id, &Access { visibility: Visibility::Public, shares: vec![] }).await.unwrap());
    assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::AlreadyFinished);
    assert_eq!(s.progress.progress_of(&Principal::Public, &run.id).await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn a_run_started_narrower_stays_narrower_when_its_workflow_is_widened() {
    let s = setup();
    let (head, mut run) = public_run(&s).await;
    // Another run of it, started PRIVATE although the workflow is PUBLIC.
    run.id = RunId::new();
    run.access = Some(Access::private());
    run.inherits_access = false;
    run.owners = vec![user("bob"), user("olivia"), Principal::Group("support".into()), Principal::Admin];
    s.store.create_run(&run).await.unwrap();
    assert!(s.workflows.set_access(&head.id, &Access { visibility: Visibility::Authed, shares: vec![] }).await.unwrap());
    assert_eq!(deliver(&s, &run.id, Cause::Start).await.unwrap(), Handled::Waiting);
    assert_eq!(s.store.get_run(&run.id).await.unwrap().unwrap().owners, run.owners, "still private");
    assert_eq!(s.progress.progress_of(&Principal::Authed, &run.id).await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn a_workflow_narrowed_while_its_run_works_retargets_the_run_within_a_refresh() {
    // The draft takes ten minutes: the run is mid-invocation when the workflow goes private.
    let s = setup_with(vec![Script::reply("DRAFT", "Dear customer").with_latency(Duration::from_secs(600)), Script::reply("SEND", "sent")]);
    let (head, run) = public_run(&s).await;
    let delivery = deliver(&s, &run.id, Cause::Start);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(s.progress.progress_of(&Principal::Public, &run.id).await.unwrap().is_some(), "RUN_STARTED reached the public feed");
    assert!(s.workflows.set_access(&head.id, &Access::private()).await.unwrap());

    tokio::time::sleep(chainrun_core::engine::AUDIENCE_REFRESH).await;
    assert_eq!(s.progress.progress_of(&Principal::Public, &run.id).await.unwrap(), None, "gone from the public feed within a refresh");
    assert!(!s.store.get_run(&run.id).await.unwrap().unwrap().owners.contains(&Principal::Public));

    assert_eq!(delivery.await.unwrap(), Handled::Waiting, "the draft settled, and the review waits");
    assert_eq!(s.progress.progress_of(&Principal::Public, &run.id).await.unwrap(), None, "no later event wrote it back");
    let last = s.progress.events(&run.id).last().unwrap().seq;
    assert_eq!(s.progress.progress_of(&user("olivia"), &run.id).await.unwrap().map(|r| r.last_seq), Some(last));
}
