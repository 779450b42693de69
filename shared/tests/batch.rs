//! Batch inference for large maps (`map.mode: batch | auto`): the items go out as one job at
//! the batch price, the run waits holding no runner, each later invocation asks about the
//! job, and its answers come back in item order; what the job did not answer runs online.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::engine::{Engine, EngineConfig, Outcome};
use chainrun_core::graph::validate_json;
use chainrun_core::ids::Principal;
use chainrun_core::memory::{MemoryBatch, Script};
use chainrun_core::money::Usd;
use chainrun_core::ports::{BatchJobs, BatchResults, BatchState, BatchSubmission, Claim, ModelError, ModelErrorKind, RunStore};
use chainrun_core::pricing::{ModelRegistry, Usage};
use chainrun_core::run::{ItemRecord, RunRecord, RunStatus, StepStatus, WaitKind};
use chrono::Utc;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

mod support;

const MODEL: &str = "amazon.nova-micro-v1:0";

fn definition(mode: &str, extra: Value) -> Value {
    let mut map = json!({ "id": "label", "type": "map", "over": "input.tickets", "mode": mode, "on_item_failure": "continue",
                          "step": { "type": "llm", "model": MODEL, "max_tokens": 40, "system": "Label support tickets.",
                                    "prompt": "LABEL {{ item }}" } });
    if let (Some(map), Some(extra)) = (map.as_object_mut(), extra.as_object()) {
        map.extend(extra.clone());
    }
    json!({ "name": "labels", "budget": { "max_cost_usd": "1" }, "steps": [map] })
}

fn tickets(n: usize) -> Value {
    json!({ "tickets": (0..n).map(|i| format!("ticket-{i}")).collect::<Vec<_>>() })
}

struct Bench {
    h: support::Harness,
    batch: Arc<MemoryBatch>,
    engine: Engine,
}

/// An engine whose batch jobs end after `polls` reads of their state.
fn bench(scripts: Vec<Script>, polls: u32) -> Bench {
    let h = support::harness_with(scripts, Arc::new(ModelRegistry::builtin()), EngineConfig::default());
    let batch = Arc::new(MemoryBatch::new(h.model.clone(), polls, 100));
    let engine = h.engine.clone().with_batch(batch.clone(), Duration::from_millis(1), 24);
    Bench { h, batch, engine }
}

impl Bench {
    async fn start(&self, definition: Value, input: Value) -> RunRecord {
        let run =
            RunRecord::new("labels".parse().unwrap(), definition, input, "alice".parse().unwrap(), vec![Principal::User("alice".into())], Utc::now());
        self.h.store.create_run(&run).await.unwrap();
        run
    }

    /// One invocation: claims the run (a waiting one once its poll time came) and runs it.
    async fn invoke(&self, run: &RunRecord, holder: &str) -> Outcome {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let lease = support::lease(holder);
        let Claim::Acquired(claimed) = self.h.store.claim(&run.id, &lease, Utc::now()).await.unwrap() else { panic!("claim failed") };
        self.engine.execute(*claimed, lease, None).await.unwrap()
    }

    /// Invocations until the run ends; how many it took.
    async fn until_done(&self, run: &RunRecord) -> usize {
        for n in 1..=20 {
            if let Outcome::Finished(_) = self.invoke(run, &format!("runner-{n}")).await {
                return n;
            }
        }
        panic!("the run did not end in 20 invocations")
    }

    async fn run(&self, run: &RunRecord) -> RunRecord {
        self.h.store.get_run(&run.id).await.unwrap().unwrap()
    }

    fn events(&self, run: &RunRecord, kind: &str) -> Vec<Value> {
        self.h.progress.events(&run.id).into_iter().filter(|e| serde_json::to_value(e.kind).unwrap() == kind).map(|e| e.data).collect()
    }
}

/// `n` times a price, exactly.
trait Times {
    fn times(self, n: u64) -> Usd;
}

impl Times for Usd {
    fn times(self, n: u64) -> Usd {
        Usd::from_pico(self.pico() * n)
    }
}

fn usage() -> Usage {
    Usage { input_tokens: 100, output_tokens: 20, ..Usage::default() }
}

#[tokio::test]
async fn a_batch_map_waits_without_a_runner_then_answers_every_item_in_order_at_the_batch_price() {
    let b = bench(vec![Script::echo_item("LABEL ").with_usage(100, 20)], 2);
    let run = b.start(definition("batch", json!({})), tickets(120)).await;

    assert_eq!(b.invoke(&run, "runner-1").await, Outcome::Waiting);
    let waiting = b.run(&run).await;
    assert_eq!(waiting.status, RunStatus::AwaitingInput);
    let wait = waiting.waiting.as_ref().unwrap();
    assert_eq!((wait.kind, wait.steps.iter().map(|s| s.to_string()).collect::<Vec<_>>()), (WaitKind::Batch, vec!["label".to_owned()]));
    assert!(wait.deadline.is_some(), "handed back to a runner at the next poll");
    assert_eq!(b.h.model.calls().len(), 0, "nothing is called online");
    let jobs = b.batch.jobs();
    assert_eq!((jobs.len(), jobs[0].records.len()), (1, 120));
    assert!(jobs[0].records.iter().enumerate().all(|(i, r)| r.index == i && r.request.prompt == format!("LABEL ticket-{i}")));
    assert!(jobs[0].records.iter().all(|r| r.request.cache_points.count() == 0), "a batch job has no prompt cache");
    // The job's worst case is held in the map's checkpoint while it is out.
    let step = b.h.store.get_steps(&run.id).await.unwrap().into_iter().find(|s| s.step_id.as_str() == "label").unwrap();
    assert_eq!(step.status, StepStatus::Waiting);
    let batched = ModelRegistry::builtin().get(MODEL).unwrap().batched().unwrap();
    let held = step.in_flight.expect("the job's reservation is durable");
    assert!(held.cost > batched.cost(&usage()).unwrap().times(120), "the worst case bounds the answers");

    let invocations = b.until_done(&run).await;
    assert_eq!(invocations, 2, "one poll finds it validating, the next reads it");
    let done = b.run(&run).await;
    assert_eq!(done.status, RunStatus::Completed);
    let labels: Vec<Value> = (0..120).map(|i| json!(format!("ticket-{i}"))).collect();
    assert_eq!(done.output.as_ref().unwrap()["label"], Value::Array(labels), "answers in item order");
    assert_eq!(b.h.model.calls().len(), 120, "each record answered once, in the job");
    assert_eq!(done.totals.cost, batched.cost(&usage()).unwrap().times(120), "exactly the batch price");
    let online = ModelRegistry::builtin().get(MODEL).unwrap().cost(&usage()).unwrap().times(120);
    assert_eq!(done.totals.cost.pico() * 2, online.pico(), "half the online price");
    assert_eq!((done.totals.model_calls, done.totals.lost.calls), (120, 0));
    let told: Vec<String> = b.events(&run, "BATCH_JOB").iter().map(|e| e["status"].as_str().unwrap().to_owned()).collect();
    assert_eq!(told, ["Submitted", "Validating", "Completed"]);
    let last = b.events(&run, "BATCH_JOB").pop().unwrap();
    assert_eq!((last["answered"].clone(), last["online"].clone(), last["records"].clone()), (json!(120), json!(0), json!(120)));
    let step = b.h.store.get_steps(&run.id).await.unwrap().into_iter().find(|s| s.step_id.as_str() == "label").unwrap();
    assert_eq!(step.detail.as_ref().unwrap()["batch"]["status"], "Completed");
    assert_eq!(step.cost, done.totals.cost);
}

#[tokio::test]
async fn records_the_job_did_not_answer_run_online_and_a_refused_record_fails_its_item() {
    let refused = ModelError::new(ModelErrorKind::Invalid, "ValidationException", "prompt too long");
    let b = bench(
        vec![
            Script { prompt_contains: "LABEL ticket-105".into(), replies: vec![Err(refused)], usage: None, latency: Duration::ZERO },
            Script::echo_item("LABEL ").with_usage(100, 20),
        ],
        1,
    );
    b.batch.leave_unprocessed([103, 107]);
    let run = b.start(definition("batch", json!({})), tickets(110)).await;
    b.until_done(&run).await;
    let done = b.run(&run).await;
    assert_eq!(done.status, RunStatus::Completed, "on_item_failure: continue");
    let out = &done.output.as_ref().unwrap()["label"];
    assert_eq!((out[103].clone(), out[107].clone(), out[105].clone()), (json!("ticket-103"), json!("ticket-107"), Value::Null));
    assert_eq!(b.h.model.calls_matching("LABEL ticket-103"), 1, "run online once, after the job");
    let registry = ModelRegistry::builtin();
    let (online, batched) =
        (registry.get(MODEL).unwrap().cost(&usage()).unwrap(), registry.get(MODEL).unwrap().batched().unwrap().cost(&usage()).unwrap());
    assert_eq!(done.totals.cost, batched.times(107).saturating_add(online.times(2)), "107 answered in the job, 2 online");
    let last = b.events(&run, "BATCH_JOB").pop().unwrap();
    assert_eq!((last["status"].clone(), last["answered"].clone(), last["online"].clone()), (json!("PartiallyCompleted"), json!(107), json!(2)));
    let step = b.h.store.get_steps(&run.id).await.unwrap().into_iter().find(|s| s.step_id.as_str() == "label").unwrap();
    assert_eq!(step.detail.as_ref().unwrap()["failed"][0]["index"], 105);
}

#[tokio::test]
async fn auto_batches_only_from_the_models_minimum_and_online_stays_online() {
    let b = bench(vec![Script::echo_item("LABEL ")], 1);
    let small = b.start(definition("auto", json!({})), tickets(99)).await;
    assert_eq!(b.until_done(&small).await, 1, "99 items: online, in one invocation");
    assert!(b.batch.jobs().is_empty());
    let online = b.start(definition("online", json!({})), tickets(150)).await;
    b.until_done(&online).await;
    assert!(b.batch.jobs().is_empty(), "mode online never batches");
    let large = b.start(definition("auto", json!({})), tickets(100)).await;
    assert_eq!(b.invoke(&large, "r").await, Outcome::Waiting);
    assert_eq!(b.batch.jobs().len(), 1, "100 items reach the minimum");
    // mode batch below the minimum: Bedrock would refuse the job, so the items go online.
    let below = b.start(definition("batch", json!({})), tickets(10)).await;
    assert_eq!(b.until_done(&below).await, 1);
    assert_eq!(b.batch.jobs().len(), 1);
}

#[tokio::test]
async fn a_job_the_service_refuses_leaves_every_item_to_run_online_and_a_retryable_refusal_is_tried_again() {
    let b = bench(vec![Script::echo_item("LABEL ")], 1);
    b.batch.refuse(Some(ModelError::new(ModelErrorKind::Throttled, "ThrottlingException", "too many jobs")));
    let run = b.start(definition("batch", json!({})), tickets(100)).await;
    assert_eq!(b.invoke(&run, "runner-1").await, Outcome::Waiting, "asked again at the next poll");
    b.batch.refuse(None);
    assert_eq!(b.invoke(&run, "runner-2").await, Outcome::Waiting);
    assert_eq!(b.batch.jobs()[0].submissions, 1);
    b.until_done(&run).await;
    assert_eq!(b.run(&run).await.status, RunStatus::Completed);

    let b = bench(vec![Script::echo_item("LABEL ")], 1);
    b.batch.refuse(Some(ModelError::new(ModelErrorKind::AccessDenied, "AccessDeniedException", "no batch for you")));
    let run = b.start(definition("batch", json!({})), tickets(100)).await;
    assert_eq!(b.until_done(&run).await, 1, "no wait: straight online");
    let done = b.run(&run).await;
    assert_eq!((done.status, b.h.model.calls().len()), (RunStatus::Completed, 100));
    let told = b.events(&run, "BATCH_JOB").pop().unwrap();
    assert_eq!((told["status"].clone(), told["online"].clone()), (json!("NotSubmitted"), json!(100)));
    assert!(told["message"].as_str().unwrap().contains("no batch for you"));
}

#[tokio::test]
async fn a_job_that_does_not_fit_the_budget_is_not_submitted_and_one_that_fits_only_at_the_batch_price_is() {
    // 100 items: the online worst case is 2x the batch one; a budget between them.
    let defn = |cost: &str| {
        let mut d = definition("batch", json!({}));
        d["budget"] = json!({ "max_cost_usd": cost });
        d
    };
    let b = bench(vec![Script::echo_item("LABEL ")], 1);
    let run = b.start(defn("1"), tickets(100)).await;
    assert_eq!(b.invoke(&run, "r1").await, Outcome::Waiting);
    let held = b.h.store.get_steps(&run.id).await.unwrap()[0].in_flight.unwrap().cost;
    let online_worst = held.times(2);
    let between = Usd::from_pico(held.pico() + (online_worst.pico() - held.pico()) / 2);

    let b = bench(vec![Script::echo_item("LABEL ")], 1);
    let run = b.start(defn(&between.to_string()), tickets(100)).await;
    b.until_done(&run).await;
    let done = b.run(&run).await;
    assert_eq!(done.status, RunStatus::Completed, "fits at the batch price");
    assert!(done.totals.cost <= between);

    let b = bench(vec![Script::echo_item("LABEL ")], 1);
    let tight = Usd::from_pico(held.pico() - 1);
    let run = b.start(defn(&tight.to_string()), tickets(100)).await;
    b.until_done(&run).await;
    assert!(b.batch.jobs().is_empty(), "the job as a whole does not fit");
    let done = b.run(&run).await;
    assert!(done.totals.cost <= tight, "online items admitted one by one stay within the budget");
}

#[tokio::test]
async fn a_run_cancelled_while_its_job_is_out_counts_the_job_at_its_worst_case() {
    let b = bench(vec![Script::echo_item("LABEL ")], 50);
    let run = b.start(definition("batch", json!({})), tickets(100)).await;
    assert_eq!(b.invoke(&run, "r1").await, Outcome::Waiting);
    let held = b.h.store.get_steps(&run.id).await.unwrap()[0].in_flight.unwrap();
    let request = chainrun_core::run::ControlRequest {
        kind: chainrun_core::run::ControlKind::Cancel,
        by: "alice".parse().unwrap(),
        at: Utc::now(),
        reason: None,
    };
    b.h.store.request_control(&run.id, &request).await.unwrap();
    b.until_done(&run).await;
    let done = b.run(&run).await;
    assert_eq!(done.status, RunStatus::Cancelled);
    assert_eq!((done.totals.lost.calls, done.totals.lost.cost), (1, held.cost), "what the job may have cost stays counted");
    assert!(b.batch.jobs()[0].stopped, "the job is stopped: nobody will read it");
}

#[test]
fn batch_is_refused_where_it_cannot_apply_naming_the_field() {
    let registry = ModelRegistry::builtin();
    let problems = |step: Value| {
        let def = json!({ "name": "w", "steps": [{ "id": "m", "type": "map", "over": "input.xs", "mode": "batch", "step": step }] });
        validate_json(&def, &registry).err().map(|p| p.to_string()).unwrap_or_default()
    };
    assert!(problems(json!({ "type": "transform", "template": "{{ item }}" })).contains("mode"));
    assert!(problems(json!({ "type": "llm", "model": MODEL, "prompt": "p", "service_tier": "flex" })).contains("service tier"));
    assert!(problems(json!({ "type": "llm", "model": MODEL, "prompt": "p", "temperature": 0.0, "cache": "response" })).contains("response"));
    assert_eq!(problems(json!({ "type": "llm", "model": MODEL, "prompt": "p" })), "", "an llm item step on a batch model is fine");
}

#[tokio::test]
async fn auto_keeps_online_a_map_whose_shared_cached_head_costs_less_than_a_batch_job() {
    let haiku = "global.anthropic.claude-haiku-4-5-20251001-v1:0";
    let long_system = "Rule: answer in one line, cite the ticket, never promise refunds. ".repeat(320);
    let def = |mode: &str, system: &str| {
        json!({ "name": "labels", "budget": { "max_cost_usd": "5" },
                "steps": [{ "id": "label", "type": "map", "over": "input.tickets", "mode": mode,
                            "step": { "type": "llm", "model": haiku, "max_tokens": 40, "system": system, "prompt": "LABEL {{ item }}" } }] })
    };
    let b = bench(vec![Script::echo_item("LABEL ")], 1);
    let cached = b.start(def("auto", &long_system), tickets(120)).await;
    assert_eq!(b.until_done(&cached).await, 1, "online: a 5,000-token head read at a tenth of the price beats half price");
    assert!(b.batch.jobs().is_empty());
    let short = b.start(def("auto", "Label support tickets."), tickets(120)).await;
    assert_eq!(b.invoke(&short, "r").await, Outcome::Waiting, "nothing to cache: batched");
    let forced = b.start(def("batch", &long_system), tickets(120)).await;
    assert_eq!(b.invoke(&forced, "r").await, Outcome::Waiting, "mode batch is obeyed");
    assert_eq!(b.batch.jobs().len(), 2);
}

/// Bedrock's answer to a submission lost on the way back: the job exists, the runner
/// does not know it.
struct LostReply {
    inner: Arc<MemoryBatch>,
    lost: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl BatchJobs for LostReply {
    async fn submit(&self, job: &BatchSubmission) -> Result<String, ModelError> {
        let id = self.inner.submit(job).await?;
        if !self.lost.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(ModelError::new(ModelErrorKind::Network, "DispatchFailure", "connection reset"));
        }
        Ok(id)
    }
    async fn state(&self, job: &str) -> Result<BatchState, ModelError> {
        self.inner.state(job).await
    }
    async fn results(&self, job: &str) -> Result<BatchResults, ModelError> {
        self.inner.results(job).await
    }
    async fn stop(&self, job: &str) -> Result<(), ModelError> {
        self.inner.stop(job).await
    }
}

#[tokio::test]
async fn a_submission_whose_reply_was_lost_finds_the_same_job_and_pays_once() {
    let b = bench(vec![Script::echo_item("LABEL ").with_usage(100, 20)], 1);
    let lossy = Arc::new(LostReply { inner: b.batch.clone(), lost: Default::default() });
    let b = Bench { engine: b.h.engine.clone().with_batch(lossy, Duration::from_millis(1), 24), ..b };
    let run = b.start(definition("batch", json!({})), tickets(100)).await;
    assert_eq!(b.invoke(&run, "r1").await, Outcome::Waiting, "the job's fate is unknown: ask again at the next poll");
    b.until_done(&run).await;
    let jobs = b.batch.jobs();
    assert_eq!((jobs.len(), jobs[0].submissions), (1, 2), "submitted again with its token: the same job");
    let done = b.run(&run).await;
    let batched = ModelRegistry::builtin().get(MODEL).unwrap().batched().unwrap().cost(&usage()).unwrap();
    assert_eq!((done.totals.model_calls, done.totals.cost), (100, batched.times(100)), "each record paid once");
}

#[tokio::test]
async fn a_runner_that_died_while_reading_the_answers_is_followed_by_one_that_charges_only_the_rest() {
    let b = bench(vec![Script::echo_item("LABEL ").with_usage(100, 20)], 1);
    let run = b.start(definition("batch", json!({})), tickets(100)).await;
    assert_eq!(b.invoke(&run, "r1").await, Outcome::Waiting);
    // What a runner that died halfway through the answers left: 40 items checkpointed at
    // the batch price, the map still waiting with the job's reservation.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let lease = support::lease("r2");
    let Claim::Acquired(claimed) = b.h.store.claim(&run.id, &lease, Utc::now()).await.unwrap() else { panic!("claim failed") };
    let batched = ModelRegistry::builtin().get(MODEL).unwrap().batched().unwrap().cost(&usage()).unwrap();
    for index in 0..40 {
        let record = ItemRecord {
            index,
            status: StepStatus::Completed,
            attempts: 1,
            output: Some(json!(format!("ticket-{index}"))),
            text: Some(format!("ticket-{index}")),
            usage: usage(),
            cost: batched,
            calls: 1,
            error: None,
            lost: Default::default(),
            in_flight: None,
        };
        b.h.store.save_item(&run.id, &lease, &chainrun_core::ids::StepId::parse("label").unwrap(), 0, &record).await.unwrap();
    }
    let outcome = b.engine.execute(*claimed, lease, None).await.unwrap();
    assert_eq!(outcome, Outcome::Finished(RunStatus::Completed));
    let done = b.run(&run).await;
    assert_eq!((done.totals.model_calls, done.totals.cost), (100, batched.times(100)), "40 kept, 60 read: each paid once");
    assert_eq!(done.totals.lost.calls, 0, "the job's reservation was settled, not lost");
    let last = b.events(&run, "BATCH_JOB").pop().unwrap();
    assert_eq!(last["answered"], 60, "this runner read the other 60");
}

#[tokio::test]
async fn while_a_job_is_out_its_worst_case_stays_held_against_steps_that_run_meanwhile() {
    // `after` runs only once its review is decided, which happens while the job is out (it
    // ends after 50 polls). The budget fits the job's worst case and what was spent, but not
    // `after`'s worst case on top: `after` must be refused though nothing was charged yet.
    let b = bench(vec![Script::echo_item("LABEL "), Script::reply("AFTER", "done")], 50);
    let mut def = definition("batch", json!({}));
    let run = b.start(def.clone(), tickets(100)).await;
    assert_eq!(b.invoke(&run, "r1").await, Outcome::Waiting);
    let held = b.h.store.get_steps(&run.id).await.unwrap()[0].in_flight.unwrap().cost;

    let b = bench(vec![Script::echo_item("LABEL "), Script::reply("AFTER", "done")], 50);
    def["budget"] = json!({ "max_cost_usd": Usd::from_pico(held.pico() + held.pico() / 1000).to_string() });
    def["steps"].as_array_mut().unwrap().extend([
        json!({ "id": "gate", "type": "review", "show": "go?" }),
        json!({ "id": "after", "type": "llm", "model": MODEL, "max_tokens": 4000, "prompt": "AFTER {{ steps.gate.text }}",
                "depends_on": ["gate"], "required": false }),
    ]);
    let run = b.start(def, tickets(100)).await;
    assert_eq!(b.invoke(&run, "r1").await, Outcome::Waiting, "the job is out and the review waits");
    let decision = chainrun_core::run::ReviewDecision {
        decision: chainrun_core::run::Verdict::Approve,
        output: None,
        comment: None,
        by: "alice".parse().unwrap(),
        at: Utc::now(),
    };
    b.h.store.decide(&run.id, &chainrun_core::ids::StepId::parse("gate").unwrap(), &decision).await.unwrap();
    assert_eq!(b.invoke(&run, "r2").await, Outcome::Waiting, "the job is still out");
    let after = b.h.store.get_steps(&run.id).await.unwrap().into_iter().find(|s| s.step_id.as_str() == "after").unwrap();
    assert_eq!(after.error.as_ref().map(|e| e.code.as_str()), Some("BUDGET_EXCEEDED"), "{after:?}");
    assert_eq!(b.h.model.calls_matching("AFTER"), 0, "refused before the call");
    assert_eq!(b.run(&run).await.totals.cost, Usd::ZERO, "nothing was charged: only the job's hold stood in the way");
}
