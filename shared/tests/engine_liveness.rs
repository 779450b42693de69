//! The engine keeps making progress when its progress writes take time, as DynamoDB's do:
//! steps in parallel contend for the journal's lock while the run loop writes skips.
//! Time is tokio's paused clock: a run that stops making progress lets the clock jump to
//! the timeout at once, so a hang fails the test instead of hanging it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use async_trait::async_trait;
use chainrun_core::engine::{Engine, EngineConfig};
use chainrun_core::ids::{Principal, RunId};
use chainrun_core::memory::{MemoryProgress, MemoryStore, Script, ScriptedModel};
use chainrun_core::ports::{Claim, ModelError, ModelErrorKind, ProgressError, ProgressSink, RunStore};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::run::{Event, EventType, ProgressRow, RunRecord, RunStatus};
use chrono::Utc;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

mod support;

/// The in-memory feeds, each write taking `latency` (a progress write is a network request
/// in production: the journal's lock is held across it).
struct SlowWrites {
    inner: Arc<MemoryProgress>,
    latency: Duration,
}

#[async_trait]
impl ProgressSink for SlowWrites {
    async fn publish(&self, event: &Event, row: &ProgressRow, owners: &[Principal]) -> Result<(), ProgressError> {
        tokio::time::sleep(self.latency).await;
        self.inner.publish(event, row, owners).await
    }

    async fn forget(&self, run: &RunId, principals: &[Principal]) -> Result<(), ProgressError> {
        self.inner.forget(run, principals).await
    }

    async fn last_event(&self, run: &RunId) -> Result<Option<Event>, ProgressError> {
        self.inner.last_event(run).await
    }
}

/// The shape of the run seen to hang on the local stack: a streamed step, a map whose
/// first item is throttled once, and a router whose branch not taken is skipped, all in
/// parallel.
fn rich_workflow() -> Value {
    json!({
        "name": "rich",
        "defaults": { "model": "amazon.nova-micro-v1:0", "max_tokens": 300, "retry": { "max_attempts": 3, "initial_backoff_ms": 100 } },
        "steps": [
            { "id": "issues", "type": "llm", "prompt": "ISSUES", "output": { "format": "json" } },
            { "id": "draft", "type": "llm", "stream": true, "prompt": "DRAFT" },
            { "id": "fixes", "type": "map", "over": "steps.issues.output.issues", "step": { "type": "llm", "prompt": "FIX {{ item }}" } },
            { "id": "route", "type": "router", "routes": [ { "when": "size(steps.issues.output.issues) > 5", "to": ["escalate"] } ], "default": ["note"] },
            { "id": "escalate", "type": "llm", "depends_on": ["route"], "prompt": "ESCALATE" },
            { "id": "note", "type": "transform", "depends_on": ["route"], "template": "{{ steps.draft.text }}" }
        ],
        "output": "{{ steps.note.output }} / {{ steps.fixes.output | join(', ') }}"
    })
}

/// Runs the rich workflow once, progress writes taking `write_ms` and the model `model_ms`;
/// `None` if the run made no progress for an hour.
async fn run_rich(write_ms: u64, model_ms: u64) -> Option<(RunRecord, Vec<Event>)> {
    let throttled = ModelError::new(ModelErrorKind::Throttled, "ThrottlingException", "slow down");
    let latency = Duration::from_millis(model_ms);
    let model = Arc::new(ScriptedModel::new(vec![
        Script::reply("ISSUES", r#"{"issues":["a","b","c"]}"#).with_latency(latency),
        Script::reply("DRAFT", &"Dear customer, ".repeat(20)).with_latency(latency * 3),
        Script::failing_first("FIX a", throttled, 1, "fixed a").with_latency(latency),
        Script::reply("FIX", "fixed").with_latency(latency),
    ]));
    let store = Arc::new(MemoryStore::new());
    let progress = Arc::new(MemoryProgress::new());
    let sink = Arc::new(SlowWrites { inner: progress.clone(), latency: Duration::from_millis(write_ms) });
    // Small flushes: the streamed step writes often, as a long generation does.
    let config = EngineConfig { stream_flush_bytes: 16, ..EngineConfig::default() };
    let engine = Engine::new(model, store.clone(), sink, Arc::new(ModelRegistry::builtin()), config);
    let run = RunRecord::new(
        "rich".parse().unwrap(),
        rich_workflow(),
        json!({}),
        "alice".parse().unwrap(),
        vec![Principal::User("alice".into())],
        Utc::now(),
    );
    store.create_run(&run).await.unwrap();
    let lease = support::lease("runner-1");
    let Claim::Acquired(run) = store.claim(&run.id, &lease, Utc::now()).await.unwrap() else { panic!("claim failed") };
    let executed = tokio::time::timeout(Duration::from_secs(3600), engine.execute(*run.clone(), lease, None)).await;
    executed.ok()?.unwrap();
    let stored = store.get_run(&run.id).await.unwrap().unwrap();
    Some((stored, progress.events(&run.id)))
}

#[tokio::test(start_paused = true)]
async fn a_skip_written_while_parallel_steps_write_their_events_does_not_stall_the_run() {
    // Each pair lines the writes up differently; before the fix, most of them hung with the
    // map item's STEP_RETRYING and the router's skip waiting on each other.
    let mut hung = Vec::new();
    for write_ms in [1, 3, 5, 10, 20, 40] {
        for model_ms in [0, 7, 50, 300] {
            let Some((run, events)) = run_rich(write_ms, model_ms).await else {
                hung.push((write_ms, model_ms));
                continue;
            };
            assert_eq!(run.status, RunStatus::Completed, "writes {write_ms} ms, model {model_ms} ms: {:?}", run.error);
            assert_eq!(run.output, Some(json!(format!("{} / fixed a, fixed, fixed", "Dear customer, ".repeat(20)))));
            let retried = events.iter().find(|e| e.kind == EventType::StepRetrying).expect("the throttled item's retry is announced");
            assert_eq!((retried.step_id.as_ref().map(|s| s.as_str()), &retried.data["item"]), (Some("fixes"), &json!(0)));
            let skipped: Vec<&str> =
                events.iter().filter(|e| e.kind == EventType::StepSkipped).filter_map(|e| e.step_id.as_ref().map(|s| s.as_str())).collect();
            assert_eq!(skipped, ["escalate"]);
            assert!(events.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1), "seq is gap-free");
            assert_eq!(run.totals.model_calls, 1 + 1 + 3, "issues, draft, the map's items (its throttled attempt charged nothing)");
        }
    }
    assert!(hung.is_empty(), "runs that stopped making progress (write ms, model ms): {hung:?}");
}
