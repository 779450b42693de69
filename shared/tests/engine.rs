//! Engine behaviour against the in-memory ports. Time is tokio's paused clock, so
//! scripted latencies cost nothing and elapsed time is exact.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::engine::{EngineConfig, Outcome};
use chainrun_core::ids::Principal;
use chainrun_core::memory::Script;
use chainrun_core::ports::{Claim, Lease, ModelError, ModelErrorKind, RunStore};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::run::{Event, EventType, RunRecord, RunStatus, StepStatus};
use chrono::Utc;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

mod support;
use support::{Harness, lease};

fn harness(scripts: Vec<Script>) -> Harness {
    harness_with(scripts, EngineConfig::default())
}

fn harness_with(scripts: Vec<Script>, config: EngineConfig) -> Harness {
    support::harness_with(scripts, Arc::new(ModelRegistry::builtin()), config)
}

fn workflow(steps: Value) -> Value {
    json!({
        "name": "test",
        "defaults": { "model": "amazon.nova-micro-v1:0", "retry": { "max_attempts": 3, "initial_backoff_ms": 100 } },
        "steps": steps
    })
}

impl Harness {
    async fn start(&self, definition: Value, input: Value) -> (RunRecord, Lease) {
        let run =
            RunRecord::new("test".parse().unwrap(), definition, input, "alice".parse().unwrap(), vec![Principal::User("alice".into())], Utc::now());
        self.store.create_run(&run).await.unwrap();
        let lease = lease("runner-1");
        let Claim::Acquired(run) = self.store.claim(&run.id, &lease, Utc::now()).await.unwrap() else { panic!("claim failed") };
        (*run, lease)
    }

    async fn run(&self, definition: Value, input: Value) -> (RunRecord, Vec<Event>) {
        let (run, lease) = self.start(definition, input).await;
        self.engine.execute(run.clone(), lease, None).await.unwrap();
        let stored = self.store.get_run(&run.id).await.unwrap().unwrap();
        let events = self.progress.events(&run.id);
        (stored, events)
    }
}

fn kinds(events: &[Event]) -> Vec<(EventType, Option<String>)> {
    events.iter().map(|e| (e.kind, e.step_id.as_ref().map(ToString::to_string))).collect()
}

fn assert_gap_free(events: &[Event]) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "seq gap at {i}: {:?}", kinds(events));
    }
}

#[tokio::test(start_paused = true)]
async fn independent_steps_run_concurrently_and_dependents_start_when_ready() {
    let h = harness(vec![
        Script::reply("EXTRACT", "{\"issues\":[\"a\",\"b\"]}").with_latency(Duration::from_millis(1000)),
        Script::reply("SENTIMENT", "negative").with_latency(Duration::from_millis(3000)),
        Script::reply("SUMMARY", "short").with_latency(Duration::from_millis(2000)),
        Script::reply("REPLY", "Sorry!").with_latency(Duration::from_millis(500)),
    ]);
    let started = Instant::now();
    let (run, events) = h
        .run(
            workflow(json!([
                { "id": "extract", "type": "llm", "prompt": "EXTRACT {{ input.feedback }}", "output": { "format": "json" } },
                { "id": "sentiment", "type": "llm", "prompt": "SENTIMENT {{ steps.extract.output.issues | join(',') }}" },
                { "id": "summary", "type": "llm", "prompt": "SUMMARY {{ input.feedback }}" },
                { "id": "reply", "type": "llm", "prompt": "REPLY {{ steps.sentiment.text }} {{ steps.summary.text }}" }
            ])),
            json!({ "feedback": "it broke" }),
        )
        .await;
    // extract (1s) → sentiment (3s) ∥ summary (2s, starts at t=0) → reply (0.5s) = 4.5s critical path.
    assert_eq!(started.elapsed(), Duration::from_millis(4500));
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.output, Some(json!({ "reply": "Sorry!" })));
    assert_gap_free(&events);
    assert_eq!(events.first().unwrap().kind, EventType::RunStarted);
    assert_eq!(events.last().unwrap().kind, EventType::RunCompleted);
    let prompts: Vec<String> = h.model.calls().iter().map(|c| c.prompt.clone()).collect();
    assert!(prompts.contains(&"SENTIMENT a,b".to_owned()), "{prompts:?}");
    assert!(prompts.contains(&"REPLY negative short".to_owned()), "{prompts:?}");
    assert_eq!(run.totals.model_calls, 4);
    assert_eq!(run.totals.step_latency_ms, 1000 + 3000 + 2000 + 500, "sum of step latencies, not wall time");
    assert!(run.totals.cost.pico() > 0);
}

#[tokio::test(start_paused = true)]
async fn retries_throttling_with_events_then_succeeds_and_reruns_only_that_step() {
    let throttled = ModelError::new(ModelErrorKind::Throttled, "ThrottlingException", "slow down");
    let h = harness(vec![Script::reply("FIRST", "one"), Script::failing_first("SECOND", throttled, 2, "two")]);
    let (run, events) = h
        .run(
            workflow(json!([
                { "id": "first", "type": "llm", "prompt": "FIRST" },
                { "id": "second", "type": "llm", "prompt": "SECOND {{ steps.first.text }}" }
            ])),
            json!({}),
        )
        .await;
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(h.model.calls_matching("FIRST"), 1);
    assert_eq!(h.model.calls_matching("SECOND"), 3);
    let retries: Vec<&Event> = events.iter().filter(|e| e.kind == EventType::StepRetrying).collect();
    assert_eq!(retries.len(), 2);
    assert_eq!(retries[0].data["reason"], "ThrottlingException");
    assert_eq!(retries[1].attempt, Some(3));
    let steps = h.store.get_steps(&run.id).await.unwrap();
    let second = steps.iter().find(|s| s.step_id.as_str() == "second").unwrap();
    assert_eq!((second.status, second.attempts), (StepStatus::Completed, 3));
    assert_gap_free(&events);
}

#[tokio::test(start_paused = true)]
async fn terminal_error_fails_the_run_and_cancels_what_never_started() {
    let denied = ModelError::new(ModelErrorKind::AccessDenied, "AccessDeniedException", "no access to model");
    let h = harness(vec![Script::failing_first("BAD", denied, 5, "never"), Script::reply("SLOW", "ok").with_latency(Duration::from_secs(2))]);
    let (run, events) = h
        .run(
            workflow(json!([
                { "id": "bad", "type": "llm", "prompt": "BAD" },
                { "id": "slow", "type": "llm", "prompt": "SLOW" },
                { "id": "after", "type": "llm", "prompt": "AFTER {{ steps.bad.text }}" }
            ])),
            json!({}),
        )
        .await;
    assert_eq!(run.status, RunStatus::Failed);
    let error = run.error.unwrap();
    assert_eq!(error.code, "AccessDeniedException");
    assert!(error.message.contains("step bad failed"), "{}", error.message);
    assert_eq!(h.model.calls_matching("BAD"), 1, "terminal errors are not retried");
    let steps = h.store.get_steps(&run.id).await.unwrap();
    let status = |id: &str| steps.iter().find(|s| s.step_id.as_str() == id).map(|s| s.status);
    assert_eq!(status("slow"), Some(StepStatus::Completed), "running steps finish");
    assert_eq!(status("after"), Some(StepStatus::Skipped));
    let failed = events.iter().find(|e| e.kind == EventType::StepFailed).unwrap();
    assert_eq!(failed.data["error"]["code"], "AccessDeniedException");
    assert_eq!(events.last().unwrap().kind, EventType::RunFailed);
    assert_gap_free(&events);
}

#[tokio::test(start_paused = true)]
async fn optional_failure_skips_dependents_and_any_join_still_runs() {
    let boom = ModelError::new(ModelErrorKind::Invalid, "ValidationException", "bad request");
    let h = harness(vec![
        Script::failing_first("OPTIONAL", boom, 9, "x"),
        Script::reply("OTHER", "fine"),
        Script::reply("STRICT", "s"),
        Script::reply("EITHER", "e"),
    ]);
    let (run, events) = h
        .run(
            workflow(json!([
                { "id": "optional", "type": "llm", "prompt": "OPTIONAL", "required": false },
                { "id": "other", "type": "llm", "prompt": "OTHER" },
                { "id": "strict", "type": "llm", "prompt": "STRICT {{ steps.optional.text }}" },
                { "id": "either", "type": "llm", "join": "any", "prompt": "EITHER {{ steps.optional.text or steps.other.text }}" }
            ])),
            json!({}),
        )
        .await;
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(h.model.calls_matching("STRICT"), 0);
    assert_eq!(h.model.calls_matching("EITHER fine"), 1);
    assert!(events.iter().any(|e| e.kind == EventType::StepSkipped && e.step_id.as_ref().map(|s| s.as_str()) == Some("strict")));
}

#[tokio::test(start_paused = true)]
async fn invalid_json_is_retried_with_a_corrective_hint() {
    let h = harness(vec![Script::reply("CLASSIFY", "I think it is negative").then(Ok("{\"label\":\"negative\"}".into()))]);
    let (run, _) = h
        .run(
            workflow(json!([{ "id": "classify", "type": "llm", "prompt": "CLASSIFY",
                "output": { "format": "json", "schema": { "type": "object", "required": ["label"] } } }])),
            json!({}),
        )
        .await;
    assert_eq!(run.status, RunStatus::Completed);
    let calls = h.model.calls();
    assert_eq!(calls.len(), 2);
    assert!(calls[1].prompt.contains("could not be used") && calls[1].prompt.contains("not valid JSON"), "{}", calls[1].prompt);
    assert_eq!(run.output, Some(json!({ "classify": { "label": "negative" } })));
    assert_eq!(run.totals.model_calls, 2, "the failed attempt's tokens are charged too");
}

#[tokio::test(start_paused = true)]
async fn resumes_from_checkpoints_without_rerunning_completed_steps() {
    let h = harness(vec![Script::reply("ONE", "1"), Script::reply("TWO", "2")]);
    let def = workflow(json!([
        { "id": "one", "type": "llm", "prompt": "ONE" },
        { "id": "two", "type": "llm", "prompt": "TWO {{ steps.one.text }}" }
    ]));
    let (run, first_lease) = h.start(def, json!({})).await;
    // A first runner checkpoints `one` and dies: simulate by saving its checkpoint directly.
    let mut one = chainrun_core::run::StepRecord::settled("one".parse_step(), StepStatus::Completed, None, Utc::now());
    one.text = Some("1".into());
    one.output = Some(json!("1"));
    one.attempts = 1;
    h.store.save_step(&run.id, &first_lease, &one).await.unwrap();
    // Its lease expires; a second runner takes over.
    let later = Utc::now() + chrono::Duration::minutes(16);
    let second = Lease { holder: "runner-2".into(), expires_at: later + chrono::Duration::minutes(15) };
    let Claim::Acquired(run) = h.store.claim(&run.id, &second, later).await.unwrap() else { panic!("takeover failed") };
    assert_eq!(h.engine.execute(*run.clone(), second, None).await.unwrap(), Outcome::Finished(RunStatus::Completed));
    assert_eq!(h.model.calls_matching("ONE"), 0);
    assert_eq!(h.model.calls_matching("TWO 1"), 1);
}

#[tokio::test(start_paused = true)]
async fn streamed_steps_emit_bounded_coalesced_deltas_that_add_up_to_the_text() {
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(20);
    let config = EngineConfig { stream_flush_bytes: 200, stream_flush_interval: Duration::from_secs(3600), ..EngineConfig::default() };
    let h = harness_with(vec![Script::reply("STREAM", &text)], config);
    let (run, events) = h.run(workflow(json!([{ "id": "s", "type": "llm", "prompt": "STREAM", "stream": true }])), json!({})).await;
    assert_eq!(run.status, RunStatus::Completed);
    let deltas: Vec<&Event> = events.iter().filter(|e| e.kind == EventType::Streaming).collect();
    let joined: String = deltas.iter().map(|e| e.data["delta"].as_str().unwrap()).collect();
    assert_eq!(joined, text);
    // 900 chars in 4-char deltas would be 225 writes; coalesced at 200 bytes it is ≤ 6.
    assert!(deltas.len() <= text.len() / 200 + 1, "{} streaming events", deltas.len());
    assert_gap_free(&events);
}

#[tokio::test(start_paused = true)]
async fn stops_starting_steps_near_the_deadline_and_suspends() {
    let h = harness(vec![Script::reply("A", "a").with_latency(Duration::from_secs(30)), Script::reply("B", "b")]);
    let def = workflow(json!([
        { "id": "a", "type": "llm", "prompt": "A" },
        { "id": "b", "type": "llm", "prompt": "B {{ steps.a.text }}" }
    ]));
    let (run, first) = h.start(def, json!({})).await;
    let deadline = Instant::now() + Duration::from_secs(100); // margin is 90 s
    assert_eq!(h.engine.execute(run.clone(), first, Some(deadline)).await.unwrap(), Outcome::Suspended);
    assert_eq!(h.model.calls_matching("B"), 0);
    // The lease was released, so the next invocation claims at once and finishes.
    let next = lease("runner-2");
    let Claim::Acquired(run) = h.store.claim(&run.id, &next, Utc::now()).await.unwrap() else { panic!("not released") };
    assert_eq!(h.engine.execute(*run, next, None).await.unwrap(), Outcome::Finished(RunStatus::Completed));
    assert_eq!(h.model.calls_matching("A"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_reply_longer_than_32_bytes_per_max_tokens_token_is_refused_so_estimates_can_bound_it() {
    // max_tokens 4 allows 128 bytes: 128 pass, 129 are refused (terminal, charged, no retry).
    let fits = "x".repeat(128);
    let h = harness(vec![Script::reply("FITS", &fits), Script::reply("LONG", &"y".repeat(129))]);
    let (run, _) = h
        .run(
            workflow(json!([
                { "id": "fits", "type": "llm", "prompt": "FITS", "max_tokens": 4 },
                { "id": "long", "type": "llm", "prompt": "LONG", "max_tokens": 4 }
            ])),
            json!({}),
        )
        .await;
    let steps = h.store.get_steps(&run.id).await.unwrap();
    let step = |id: &str| steps.iter().find(|s| s.step_id.as_str() == id).unwrap().clone();
    assert_eq!((step("fits").status, step("fits").text.as_deref()), (StepStatus::Completed, Some(fits.as_str())));
    let long = step("long");
    assert_eq!(long.status, StepStatus::Failed);
    let error = long.error.unwrap();
    assert_eq!(error.code, "OUTPUT_TOO_LARGE");
    assert!(error.message.contains("129 bytes") && error.message.contains("max_tokens 4 is 128"), "{}", error.message);
    assert!(long.cost > chainrun_core::money::Usd::ZERO, "the refused reply was still charged");
    assert_eq!(h.model.calls_matching("LONG"), 1);
    assert_eq!(EngineConfig::default().reply_limit(1_000_000), 4 * 1024 * 1024, "the output limit still applies");
}

#[tokio::test(start_paused = true)]
async fn a_map_over_a_json_reply_at_its_size_limit_runs_as_many_items_as_the_estimate_counts() {
    // max_tokens 5 allows 160 bytes: `[1,1,…,1]` with 79 items is 159 bytes, 80 would be 161.
    let list = serde_json::to_string(&vec![1; 79]).unwrap();
    assert_eq!(list.len(), 159);
    let h = harness(vec![Script::reply("LIST", &list), Script::reply("ITEM", "ok")]);
    let definition = workflow(json!([
        { "id": "list", "type": "llm", "prompt": "LIST", "max_tokens": 5, "output": { "format": "json" } },
        { "id": "each", "type": "map", "over": "steps.list.output", "max_concurrency": 8,
          "step": { "type": "llm", "prompt": "ITEM", "max_tokens": 5 } }
    ]));
    let registry = ModelRegistry::builtin();
    let graph = chainrun_core::graph::validate_json(&definition, &registry).unwrap();
    let estimate = chainrun_core::estimate::estimate(&graph, &json!({}), &registry, None);
    assert_eq!(estimate.steps[1].max_items, Some(79));
    let (run, _) = h.run(definition, json!({})).await;
    assert_eq!(run.status, RunStatus::Completed, "{:?}", run.error);
    assert_eq!(h.model.calls_matching("ITEM"), 79);
}

#[tokio::test(start_paused = true)]
async fn a_template_error_at_run_time_fails_the_step_without_calling_the_model() {
    let h = harness(vec![Script::reply("HI", "x")]);
    let (run, _) = h.run(workflow(json!([{ "id": "a", "type": "llm", "prompt": "HI {{ input.missing }}" }])), json!({})).await;
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.error.unwrap().code, "TEMPLATE_ERROR");
    assert!(h.model.calls().is_empty());
}

trait ParseStep {
    fn parse_step(&self) -> chainrun_core::ids::StepId;
}

impl ParseStep for str {
    fn parse_step(&self) -> chainrun_core::ids::StepId {
        chainrun_core::ids::StepId::parse(self).unwrap()
    }
}

fn step_status(h: &Harness, run: &RunRecord) -> std::collections::BTreeMap<String, StepStatus> {
    futures_lite_block(h.store.get_steps(&run.id)).unwrap().into_iter().map(|s| (s.step_id.to_string(), s.status)).collect()
}

fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    // get_steps on the memory store never awaits anything real.
    futures::executor::block_on(f)
}

fn sentiment_router(label: &str) -> (Value, Vec<Script>) {
    let def = workflow(json!([
        { "id": "sentiment", "type": "llm", "prompt": "SENTIMENT", "output": { "format": "json" } },
        { "id": "route", "type": "router", "depends_on": ["sentiment"],
          "routes": [ { "when": "steps.sentiment.output.label == 'negative'", "to": ["escalate"] } ],
          "default": ["auto_reply"] },
        { "id": "escalate", "type": "llm", "depends_on": ["route"], "prompt": "ESCALATE" },
        { "id": "notify", "type": "llm", "prompt": "NOTIFY {{ steps.escalate.text }}" },
        { "id": "auto_reply", "type": "llm", "depends_on": ["route"], "prompt": "AUTO" },
        { "id": "report", "type": "transform", "join": "any", "template": "{{ steps.escalate.text or steps.auto_reply.text }}" }
    ]));
    let scripts = vec![
        Script::reply("SENTIMENT", &format!("{{\"label\":\"{label}\"}}")),
        Script::reply("ESCALATE", "escalated"),
        Script::reply("NOTIFY", "notified"),
        Script::reply("AUTO", "auto-replied"),
    ];
    (def, scripts)
}

#[tokio::test(start_paused = true)]
async fn a_router_runs_the_chosen_route_and_skips_the_rest_transitively() {
    let (def, scripts) = sentiment_router("negative");
    let h = harness(scripts);
    let (run, events) = h.run(def, json!({})).await;
    assert_eq!(run.status, RunStatus::Completed);
    let status = step_status(&h, &run);
    assert_eq!(status["escalate"], StepStatus::Completed);
    assert_eq!(status["notify"], StepStatus::Completed);
    assert_eq!(status["auto_reply"], StepStatus::Skipped);
    assert_eq!(status["report"], StepStatus::Completed);
    assert_eq!(h.model.calls_matching("AUTO"), 0);
    let skipped = events.iter().find(|e| e.kind == EventType::StepSkipped).unwrap();
    assert_eq!(skipped.data["reason"], "not chosen by router route");
    assert_eq!(run.output, Some(json!({ "notify": "notified", "report": "escalated" })));
}

#[tokio::test(start_paused = true)]
async fn a_router_falls_back_to_its_default_and_skip_propagates_downstream() {
    let (def, scripts) = sentiment_router("positive");
    let h = harness(scripts);
    let (run, _) = h.run(def, json!({})).await;
    assert_eq!(run.status, RunStatus::Completed);
    let status = step_status(&h, &run);
    assert_eq!((status["escalate"], status["notify"]), (StepStatus::Skipped, StepStatus::Skipped), "notify depends on a skipped step");
    assert_eq!(status["auto_reply"], StepStatus::Completed);
    assert_eq!(run.output, Some(json!({ "report": "auto-replied" })));
}

#[tokio::test(start_paused = true)]
async fn a_condition_that_is_not_a_bool_fails_the_router() {
    let h = harness(vec![Script::reply("S", "{\"label\": 3}")]);
    let (run, _) = h
        .run(
            workflow(json!([
                { "id": "s", "type": "llm", "prompt": "S", "output": { "format": "json" } },
                { "id": "r", "type": "router", "routes": [ { "when": "steps.s.output.label", "to": ["t"] } ] },
                { "id": "t", "type": "transform", "depends_on": ["r"], "template": "x" }
            ])),
            json!({}),
        )
        .await;
    assert_eq!(run.status, RunStatus::Failed);
    let error = run.error.unwrap();
    assert_eq!(error.code, "CONDITION_ERROR");
    assert!(error.message.contains("true or false"), "{}", error.message);
}

#[tokio::test(start_paused = true)]
async fn transforms_render_templates_and_evaluate_expressions_without_a_model() {
    let h = harness(vec![]);
    let (run, _) = h
        .run(
            workflow(json!([
                { "id": "count", "type": "transform", "expression": "{'n': size(input.items), 'first': input.items[0]}" },
                { "id": "line", "type": "transform", "template": "{{ steps.count.output.n }} items, first {{ steps.count.output.first }}" }
            ])),
            json!({ "items": ["a", "b", "c"] }),
        )
        .await;
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.output, Some(json!({ "line": "3 items, first a" })));
    assert!(h.model.calls().is_empty());
    assert_eq!(run.totals.model_calls, 0);
}

#[tokio::test(start_paused = true)]
async fn a_map_fans_out_with_bounded_concurrency_and_keeps_input_order() {
    // Item latencies are scripted so that later items finish first.
    let scripts: Vec<Script> =
        (0..6).map(|i| Script::reply(&format!("FIX item-{i} "), &format!("fix {i}")).with_latency(Duration::from_millis(600 - 100 * i))).collect();
    let h = harness(scripts);
    let started = Instant::now();
    let (run, events) = h
        .run(
            workflow(json!([
                { "id": "issues", "type": "transform", "expression": "['item-0', 'item-1', 'item-2', 'item-3', 'item-4', 'item-5']" },
                { "id": "fixes", "type": "map", "over": "steps.issues.output", "max_concurrency": 2,
                  "step": { "type": "llm", "prompt": "FIX {{ item }} #{{ index }}" } }
            ])),
            json!({}),
        )
        .await;
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.output, Some(json!({ "fixes": ["fix 0", "fix 1", "fix 2", "fix 3", "fix 4", "fix 5"] })));
    // Two at a time: items 0 (600 ms) ∥ 1 (500); 2 starts at 500, 3 at 600, both end at 900;
    // then 4 (200) ∥ 5 (100) end by 1,100 ms. All six at once would take 600 ms.
    assert_eq!(started.elapsed(), Duration::from_millis(1100));
    assert_eq!(h.model.calls_matching("#3"), 1);
    let done = events.iter().find(|e| e.kind == EventType::StepCompleted && e.step_id.as_ref().map(|s| s.as_str()) == Some("fixes")).unwrap();
    assert_eq!(done.data["detail"]["items"], 6);
    assert_eq!(run.totals.model_calls, 6);
}

#[tokio::test(start_paused = true)]
async fn a_map_tells_its_progress_when_it_starts_and_about_every_quarter_second_after() {
    // One item at a time, 100 ms each; item e fails at once (and is not retried).
    let denied = ModelError::new(ModelErrorKind::Invalid, "ValidationException", "bad item");
    let h = harness(vec![Script::failing_first("DO e", denied, 9, "never"), Script::reply("DO ", "done").with_latency(Duration::from_millis(100))]);
    let (run, events) = h
        .run(
            workflow(json!([
                { "id": "m", "type": "map", "over": "input.items", "max_concurrency": 1, "on_item_failure": "continue",
                  "step": { "type": "llm", "prompt": "DO {{ item }}" } }
            ])),
            json!({ "items": ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"] }),
        )
        .await;
    assert_eq!(run.status, RunStatus::Completed);
    let progress: Vec<(u64, u64, u64)> = events
        .iter()
        .filter(|e| e.kind == EventType::MapProgress)
        .inspect(|e| assert_eq!(e.step_id.as_ref().map(|s| s.as_str()), Some("m")))
        .map(|e| (e.data["done"].as_u64().unwrap(), e.data["failed"].as_u64().unwrap(), e.data["total"].as_u64().unwrap()))
        .collect();
    // Settled at 100, 200, 300, 400 (d), 400 (e, failed), 500, …, 900 ms. Told: at the start,
    // then at the first settling 250 ms after the last told (300 and 600 ms); the last item's
    // settling is the step's STEP_COMPLETED.
    assert_eq!(progress, vec![(0, 0, 10), (3, 0, 10), (7, 1, 10)]);
    let last_progress = events.iter().rposition(|e| e.kind == EventType::MapProgress).unwrap();
    let completed = events.iter().position(|e| e.kind == EventType::StepCompleted).unwrap();
    assert!(last_progress < completed);
}

#[tokio::test(start_paused = true)]
async fn a_map_item_failure_fails_the_step_or_is_reported_per_policy() {
    let denied = ModelError::new(ModelErrorKind::Invalid, "ValidationException", "bad item");
    for (policy, expected) in [("fail", RunStatus::Failed), ("continue", RunStatus::Completed)] {
        let h = harness(vec![Script::failing_first("DO b", denied.clone(), 9, "never"), Script::reply("DO ", "done")]);
        let (run, _) = h
            .run(
                workflow(json!([
                    { "id": "m", "type": "map", "over": "input.items", "on_item_failure": policy,
                      "step": { "type": "llm", "prompt": "DO {{ item }}" } }
                ])),
                json!({ "items": ["a", "b", "c"] }),
            )
            .await;
        assert_eq!(run.status, expected, "{policy}");
        let steps = h.store.get_steps(&run.id).await.unwrap();
        let m = steps.iter().find(|s| s.step_id.as_str() == "m").unwrap();
        assert_eq!(m.detail.as_ref().unwrap()["failed"][0]["index"], 1, "{policy}");
        if policy == "continue" {
            assert_eq!(run.output, Some(json!({ "m": ["done", null, "done"] })));
        } else {
            assert!(run.error.unwrap().message.contains("1 of 3 items failed"));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_map_over_something_that_is_not_a_list_fails_clearly() {
    let h = harness(vec![]);
    let (run, _) = h
        .run(
            workflow(json!([{ "id": "m", "type": "map", "over": "input.n", "step": { "type": "transform", "template": "{{ item }}" } }])),
            json!({ "n": 3 }),
        )
        .await;
    assert_eq!(run.status, RunStatus::Failed);
    assert!(run.error.unwrap().message.contains("must give a list"));
}

#[tokio::test(start_paused = true)]
async fn max_concurrency_bounds_how_many_steps_run_at_once() {
    let scripts: Vec<Script> = (0..6).map(|i| Script::reply(&format!("P{i}"), "ok").with_latency(Duration::from_secs(1))).collect();
    let h = harness(scripts);
    let mut def = workflow(json!((0..6).map(|i| json!({ "id": format!("p{i}"), "type": "llm", "prompt": format!("P{i}") })).collect::<Vec<_>>()));
    def["max_concurrency"] = json!(2);
    let started = Instant::now();
    let (run, _) = h.run(def, json!({})).await;
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(started.elapsed(), Duration::from_secs(3), "six 1 s steps, two at a time");
}

#[tokio::test(start_paused = true)]
async fn reading_steps_as_a_whole_is_rejected_because_dependencies_must_be_static() {
    let h = harness(vec![Script::reply("A", "a")]);
    let (run, _) = h
        .run(
            workflow(json!([
                { "id": "a", "type": "llm", "prompt": "A" },
                { "id": "b", "type": "transform", "depends_on": ["a"], "expression": "steps" }
            ])),
            json!({}),
        )
        .await;
    // The runner re-validates the snapshot; a definition that slipped past would fail the run.
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.error.unwrap().code, "INVALID_WORKFLOW");
}

#[tokio::test]
async fn a_step_output_too_large_for_its_checkpoint_fails_the_step_whatever_its_kind() {
    let h = harness_with(vec![], EngineConfig { max_output_bytes: 1000, ..EngineConfig::default() });
    let def = workflow(json!([
        { "id": "small", "type": "transform", "template": "{% for i in range(100) %}x{% endfor %}" },
        { "id": "big", "type": "transform", "expression": "input.words.map(w, w + w)" },
        { "id": "after", "type": "transform", "template": "{{ steps.big.status }}", "depends_on": ["big"] }
    ]));
    let words: Vec<String> = (0..100).map(|i| format!("word-number-{i}")).collect();
    let (run, events) = h.run(def, json!({ "words": words })).await;
    assert_eq!(run.status, RunStatus::Failed);
    let steps = h.store.get_steps(&run.id).await.unwrap();
    let step = |id: &str| steps.iter().find(|r| r.step_id.as_str() == id).unwrap().clone();
    assert_eq!(step("small").status, StepStatus::Completed);
    let big = step("big");
    assert_eq!(big.status, StepStatus::Failed);
    let error = big.error.unwrap();
    assert_eq!(error.code, chainrun_core::codes::ErrorCode::OutputTooLarge);
    assert!(error.message.contains("step big") && error.message.contains("at most 1000"), "{}", error.message);
    assert!(big.output.is_none(), "nothing too large is stored");
    assert_eq!(step("after").status, StepStatus::Skipped, "its dependent does not run");
    assert_gap_free(&events);
}

#[tokio::test(start_paused = true)]
async fn a_map_runs_ten_thousand_items_each_checkpointed_and_refuses_one_more() {
    let limit = chainrun_core::limits::MAX_MAP_ITEMS;
    assert!(limit >= 10_000);
    let h = harness(vec![Script::reply("ITEM", "ok")]);
    let definition = |n: usize| {
        let mut w = workflow(json!([
            { "id": "each", "type": "map", "over": "input.items", "max_concurrency": 32,
              "step": { "type": "llm", "prompt": "ITEM {{ item }}", "max_tokens": 5 } }
        ]));
        w["output"] = json!("{{ steps.each.output | length }}");
        (w, json!({ "items": (0..n).collect::<Vec<_>>() }))
    };

    let (w, input) = definition(limit);
    let (run, _) = h.run(w, input).await;
    assert_eq!((run.status, run.output.clone()), (RunStatus::Completed, Some(json!(limit.to_string()))), "{:?}", run.error);
    assert_eq!(h.model.calls_matching("ITEM"), limit);
    let items = h.store.get_items(&run.id, &chainrun_core::ids::StepId::parse("each").unwrap(), 0).await.unwrap();
    assert_eq!(items.len(), limit, "every item has its own checkpoint");
    assert!(items.iter().enumerate().all(|(i, item)| item.index == i && item.status == StepStatus::Completed));
    assert_eq!(run.totals.model_calls, limit as u64);

    let (w, input) = definition(limit + 1);
    let (run, _) = h.run(w, input).await;
    let error = run.error.unwrap();
    assert_eq!((run.status, error.code.as_str()), (RunStatus::Failed, "MAP_TOO_LARGE"));
    assert!(error.message.contains(&format!("{} items; a map takes at most {limit}", limit + 1)), "{}", error.message);
    assert_eq!(h.model.calls_matching("ITEM"), limit, "no item of the refused map ran");
}
