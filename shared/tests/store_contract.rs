//! One contract, two implementations: every store/progress/history/analytics/daily-spend behaviour the
//! engine, runner and API rely on is checked against the in-memory adapters and against the DynamoDB adapters
//! on a moto server this test starts.
//!
//! The moto half is opt-in, so `cargo test` passes on a fresh clone without Python: run it with
//! `CHAINRUN_MOTO=1` (as `make test` does, after creating the venv). It then needs
//! `.venv/bin/moto_server`, or `CHAINRUN_MOTO_SERVER` pointing at another `moto_server`, and fails
//! if neither is there. Without the opt-in each moto test prints that it was skipped and passes.
#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use chainrun_core::analytics::CostSums;
use chainrun_core::aws::{DynamoAnalytics, DynamoDailySpend, DynamoProgress, DynamoStore, S3Blobs};
use chainrun_core::config::Tables;
use chainrun_core::ids::{Principal, RunId, StepId};
use chainrun_core::memory::{MemoryAnalytics, MemoryDailySpend, MemoryProgress, MemoryStore};
use chainrun_core::money::Usd;
use chainrun_core::ports::*;
use chainrun_core::pricing::Usage;
use chainrun_core::run::*;
use chainrun_core::spend::{DayHold, DaySpend, Settlement};
use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde_json::{Value, json};
use std::sync::Arc;

#[path = "support/moto.rs"]
mod moto;
use moto::{Moto, create_tables, start_moto};

trait Progress: ProgressSink + ProgressReader {}
impl<T: ProgressSink + ProgressReader> Progress for T {}

struct Subject {
    store: Arc<dyn RunStore>,
    progress: Arc<dyn Progress>,
}

fn alice() -> Principal {
    Principal::User("alice".into())
}

fn new_run() -> RunRecord {
    RunRecord::new(
        "wf".parse().unwrap(),
        json!({ "name": "wf", "steps": [{ "id": "a", "type": "llm", "prompt": "é ✓ \"quoted\"" }], "n": 1.5e300 }),
        json!({ "empty": "", "nested": { "list": [1, 2.25, null, true] } }),
        "alice".parse().unwrap(),
        vec![alice(), Principal::Group("eng".into())],
        Utc::now(),
    )
}

fn lease(holder: &str, minutes: i64) -> Lease {
    Lease { holder: holder.into(), expires_at: Utc::now() + Duration::minutes(minutes) }
}

fn step(id: &str, output: Value) -> StepRecord {
    let mut s = StepRecord::settled(StepId::parse(id).unwrap(), StepStatus::Completed, None, Utc::now());
    s.attempts = 2;
    s.output = Some(output);
    s.text = Some("raw text".into());
    s.usage = Usage { input_tokens: 10, output_tokens: 20, cache_read_tokens: 3, cache_write_tokens: 4 };
    s.cost = Usd::from_pico(123_456_789);
    s.latency_ms = 42;
    s
}

async fn contract(s: Subject) {
    // create: conditional, round-trips documents exactly
    let run = new_run();
    s.store.create_run(&run).await.unwrap();
    let impostor = RunRecord { caller: "mallory".parse().unwrap(), ..run.clone() };
    assert_eq!(s.store.create_run(&impostor).await, Err(StoreError::AlreadyExists(run.id.clone())));
    let stored = s.store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!(stored.definition, run.definition);
    assert_eq!(stored.input, run.input);
    assert_eq!(stored.owners, run.owners);
    assert_eq!(stored.status, RunStatus::Queued);
    assert!(s.store.get_run(&RunId::new()).await.unwrap().is_none());

    // claim: one holder at a time; expired leases are taken over
    let first = lease("one", 5);
    assert!(matches!(s.store.claim(&run.id, &first, Utc::now()).await.unwrap(), Claim::Acquired(r) if r.status == RunStatus::Running));
    assert_eq!(s.store.claim(&run.id, &lease("dup", 5), Utc::now()).await.unwrap(), Claim::HeldElsewhere);
    assert_eq!(s.store.claim(&RunId::new(), &lease("x", 5), Utc::now()).await.unwrap(), Claim::NotFound);

    // checkpoints: only under the live lease; outputs round-trip
    s.store.save_step(&run.id, &first, &step("a", json!({ "issues": ["x", ""], "score": 0.5 }))).await.unwrap();
    assert_eq!(s.store.save_step(&run.id, &lease("stranger", 5), &step("b", json!(1))).await, Err(StoreError::LeaseLost(run.id.clone())));
    let steps = s.store.get_steps(&run.id).await.unwrap();
    assert_eq!(
        steps,
        vec![step("a", json!({ "issues": ["x", ""], "score": 0.5 }))]
            .into_iter()
            .map(|mut x| {
                x.finished_at = steps[0].finished_at;
                x
            })
            .collect::<Vec<_>>()
    );

    let later = Utc::now() + Duration::minutes(10);
    let second = Lease { holder: "two".into(), expires_at: later + Duration::minutes(5) };
    assert!(matches!(s.store.claim(&run.id, &second, later).await.unwrap(), Claim::Acquired(_)));
    assert_eq!(
        s.store.save_step(&run.id, &first, &step("a", json!(0))).await,
        Err(StoreError::LeaseLost(run.id.clone())),
        "the old runner is fenced off"
    );

    // release lets the next claim in immediately
    s.store.release(&run.id, &second).await.unwrap();
    let third = lease("three", 5);
    assert!(matches!(s.store.claim(&run.id, &third, Utc::now()).await.unwrap(), Claim::Acquired(_)));

    // finish: records the end, and later deliveries see it finished
    let mut done = s.store.get_run(&run.id).await.unwrap().unwrap();
    done.status = RunStatus::Failed;
    done.finished_at = Some(Utc::now());
    done.output = Some(json!({ "partial": [1, 2] }));
    done.error = Some(ErrorInfo { code: "X".into(), message: "why".into(), retryable: false });
    done.totals.add_call(&Usage { input_tokens: 1, output_tokens: 2, ..Usage::default() }, Usd::from_pico(7));
    assert_eq!(s.store.finish_run(&done, &first).await, Err(StoreError::LeaseLost(run.id.clone())));
    s.store.finish_run(&done, &third).await.unwrap();
    let finished = s.store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!(
        (finished.status, finished.output.clone(), finished.error.clone(), finished.totals),
        (RunStatus::Failed, done.output.clone(), done.error.clone(), done.totals)
    );
    assert_eq!(s.store.claim(&run.id, &lease("late", 5), Utc::now()).await.unwrap(), Claim::Finished);

    // events: gap-free append, conflicts on reuse, cursor reads; progress rows per owner
    assert_eq!(s.progress.last_seq(&run.id).await.unwrap(), 0);
    let owners = run.owners.clone();
    for seq in 1..=5u64 {
        let event = Event {
            run_id: run.id.clone(),
            seq,
            at: Utc::now(),
            kind: EventType::StepStarted,
            step_id: Some(StepId::parse("a").unwrap()),
            attempt: Some(1),
            revision: 0,
            data: json!({ "seq": seq, "s": "" }),
        };
        let row = ProgressRow {
            run_id: run.id.clone(),
            workflow: "wf".parse().unwrap(),
            status: RunStatus::Running,
            current_step: (seq % 2 == 1).then(|| StepId::parse("a").unwrap()),
            totals: Totals::default(),
            last_seq: seq,
            updated_at: Utc::now(),
            // The last row says what the run waits for; rows move forward with the events.
            waiting: (seq == 5).then(|| Waiting {
                kind: WaitKind::Review,
                by: None,
                since: Utc::now(),
                reason: None,
                steps: vec![StepId::parse("a").unwrap()],
                deadline: Some(Utc::now()),
            }),
        };
        s.progress.publish(&event, &row, &owners).await.unwrap();
    }
    let dup = Event {
        run_id: run.id.clone(),
        seq: 3,
        at: Utc::now(),
        kind: EventType::RunFailed,
        step_id: None,
        attempt: None,
        revision: 0,
        data: json!({}),
    };
    let row = ProgressRow {
        run_id: run.id.clone(),
        workflow: "wf".parse().unwrap(),
        status: RunStatus::Failed,
        current_step: None,
        totals: Totals::default(),
        last_seq: 3,
        updated_at: Utc::now(),
        waiting: None,
    };
    assert!(matches!(s.progress.publish(&dup, &row, &owners).await, Err(ProgressError::Conflict { seq: 3, .. })));
    assert_eq!(s.progress.last_seq(&run.id).await.unwrap(), 5);
    let page = s.progress.events_after(&run.id, 2, 2).await.unwrap();
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);
    assert_eq!(page[0].data, json!({ "seq": 3, "s": "" }));
    assert_eq!(page[0].step_id.as_ref().map(StepId::as_str), Some("a"));
    assert!(s.progress.events_after(&run.id, 5, 10).await.unwrap().is_empty());
    for owner in &owners {
        let row = s.progress.progress_of(owner, &run.id).await.unwrap().expect("row per owner");
        assert_eq!((row.last_seq, row.status, row.current_step.as_ref().map(StepId::as_str)), (5, RunStatus::Running, Some("a")));
        assert_eq!(row.waiting.map(|w| (w.kind, w.steps)), Some((WaitKind::Review, vec![StepId::parse("a").unwrap()])));
    }
    assert!(s.progress.progress_of(&Principal::User("mallory".into()), &run.id).await.unwrap().is_none());

    // feeds list newest runs first
    // Ids are ULIDs: make the newer run's id a millisecond later, as a later start would be
    // (two ids minted in the same millisecond have no defined order).
    let mut newer = new_run();
    let ts = ulid::Ulid::from_string(run.id.as_str()).unwrap().timestamp_ms() + 1;
    newer.id = RunId::parse(&ulid::Ulid::from_parts(ts, 0).to_string()).unwrap();
    s.store.create_run(&newer).await.unwrap();
    let event = Event {
        run_id: newer.id.clone(),
        seq: 1,
        at: Utc::now(),
        kind: EventType::RunStarted,
        step_id: None,
        attempt: None,
        revision: 0,
        data: json!({}),
    };
    let row = ProgressRow {
        run_id: newer.id.clone(),
        workflow: "wf".parse().unwrap(),
        status: RunStatus::Running,
        current_step: None,
        totals: Totals::default(),
        last_seq: 1,
        updated_at: Utc::now(),
        waiting: None,
    };
    s.progress.publish(&event, &row, &[alice()]).await.unwrap();
    let feed = s.progress.feed(&alice(), 10, None).await.unwrap();
    assert_eq!(feed.iter().map(|r| r.run_id.clone()).collect::<Vec<_>>(), vec![newer.id.clone(), run.id.clone()]);
}

#[tokio::test]
async fn memory_adapters_honour_the_contract() {
    contract(Subject { store: Arc::new(MemoryStore::new()), progress: Arc::new(MemoryProgress::new()) }).await;
}

// ---------------------------------------------------------------- documents larger than one item

/// A JSON document of about `kib` KiB: a list of distinct strings (no compression helps).
fn big_document(kib: usize, tag: &str) -> Value {
    Value::Array((0..kib * 16).map(|i| json!(format!("{tag}-{i:08}-{}", "é".repeat(20)))).collect())
}

/// Outputs far beyond DynamoDB's 400 KB item — a step's, a map item's, one written with
/// its event, the run's own — are stored whole and read back exactly.
async fn large_documents_contract(s: Subject) {
    let run = new_run();
    s.store.create_run(&run).await.unwrap();
    let ours = lease("one", 5);
    assert!(matches!(s.store.claim(&run.id, &ours, Utc::now()).await.unwrap(), Claim::Acquired(_)));

    let mut big = step("a", big_document(1024, "a"));
    big.text = Some("t".repeat(900 * 1024));
    big.detail = Some(big_document(500, "detail"));
    s.store.save_step(&run.id, &ours, &big).await.unwrap();
    // Written twice (a retried checkpoint): still one record, read back whole.
    s.store.save_step(&run.id, &ours, &big).await.unwrap();
    let steps = s.store.get_steps(&run.id).await.unwrap();
    assert_eq!(steps.len(), 1);
    assert_eq!((&steps[0].output, &steps[0].text, &steps[0].detail), (&big.output, &big.text, &big.detail));

    // A later small checkpoint of the same step replaces the large one entirely.
    let small = step("a", json!({ "short": true }));
    s.store.save_step(&run.id, &ours, &small).await.unwrap();
    let steps = s.store.get_steps(&run.id).await.unwrap();
    assert_eq!((&steps[0].output, &steps[0].text, &steps[0].detail), (&small.output, &small.text, &small.detail));

    let map = StepId::parse("m").unwrap();
    let item = ItemRecord {
        index: 7,
        status: StepStatus::Completed,
        attempts: 1,
        output: Some(big_document(600, "item")),
        text: Some("x".repeat(300 * 1024)),
        usage: Usage { input_tokens: 1, output_tokens: 2, ..Usage::default() },
        cost: Usd::from_pico(5),
        calls: 1,
        error: None,
        lost: Lost::default(),
        in_flight: None,
    };
    s.store.save_item(&run.id, &ours, &map, 0, &item).await.unwrap();
    assert_eq!(s.store.get_items(&run.id, &map, 0).await.unwrap(), vec![item]);

    let with_event = step("b", big_document(700, "b"));
    let checkpoint = Checkpoint { store: s.store.as_ref(), lease: &ours, step: &with_event };
    s.progress.publish_checkpointed(&event(&run.id, 1), &row(&run.id, 1), &[alice()], checkpoint).await.unwrap();
    let steps = s.store.get_steps(&run.id).await.unwrap();
    let b = steps.iter().find(|r| r.step_id.as_str() == "b").expect("step b");
    assert_eq!(b.output, with_event.output);

    let mut done = s.store.get_run(&run.id).await.unwrap().unwrap();
    done.status = RunStatus::Completed;
    done.finished_at = Some(Utc::now());
    done.output = Some(big_document(1200, "run"));
    s.store.finish_run(&done, &ours).await.unwrap();
    let finished = s.store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!((finished.status, &finished.output), (RunStatus::Completed, &done.output));
    // The head is the same record without its output.
    let head = s.store.get_run_head(&run.id).await.unwrap().unwrap();
    assert_eq!(head, RunRecord { output: None, ..finished });
}

#[tokio::test]
async fn memory_adapters_keep_large_documents_whole() {
    large_documents_contract(Subject { store: Arc::new(MemoryStore::new()), progress: Arc::new(MemoryProgress::new()) }).await;
}

/// The outputs bucket on moto, and the S3 client the tests inspect it with.
async fn moto_bucket(moto: &Moto) -> (aws_sdk_s3::Client, S3Blobs) {
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new("test", "test", None, None, "test"))
        .endpoint_url(&moto.url)
        .force_path_style(true)
        .build();
    let client = aws_sdk_s3::Client::from_conf(config);
    client.create_bucket().bucket("outputs").send().await.unwrap();
    (client.clone(), S3Blobs::new(client, "outputs"))
}

/// The run the objects under `runs/<run>/…` belong to (one run's).
fn runs_of_bucket(keys: &[String]) -> RunId {
    RunId::parse(keys[0].split('/').nth(1).unwrap()).unwrap()
}

async fn object_keys(s3: &aws_sdk_s3::Client) -> Vec<String> {
    let out = s3.list_objects_v2().bucket("outputs").send().await.unwrap();
    out.contents().iter().filter_map(|o| o.key().map(str::to_owned)).collect()
}

#[tokio::test]
async fn dynamodb_adapters_keep_large_documents_whole_in_s3() {
    let Some(moto) = moto("dynamodb_adapters_keep_large_documents_whole_in_s3").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    let (s3, blobs) = moto_bucket(&moto).await;
    let (client_for_head, tables_for_head) = (client.clone(), tables.clone());
    large_documents_contract(Subject {
        store: Arc::new(DynamoStore::new(client.clone(), tables.clone()).with_blobs(blobs.clone())),
        progress: Arc::new(DynamoProgress::new(client, tables, 30).with_blobs(blobs)),
    })
    .await;
    // Content-addressed: the checkpoint written twice stored its documents once.
    let keys = object_keys(&s3).await;
    // a's output, text and detail; the item's output (its text then fits beside the rest);
    // b's output; the run's output.
    assert_eq!(keys.len(), 6, "{keys:?}");
    assert!(keys.iter().all(|k| k.starts_with("runs/")), "{keys:?}");
    // The head reads nothing from S3: it answers with the bucket emptied.
    for key in &keys {
        s3.delete_object().bucket("outputs").key(key).send().await.unwrap();
    }
    let runs = chainrun_core::aws::DynamoStore::new(client_for_head, tables_for_head);
    let run_id = runs_of_bucket(&keys);
    let head = runs.get_run_head(&run_id).await.unwrap().unwrap();
    assert_eq!((head.status, head.output), (RunStatus::Completed, None));
}

/// What a resumed run relies on: an upstream output an earlier invocation checkpointed in
/// S3 is read back whole by the next invocation's templates.
#[tokio::test]
async fn a_resumed_run_reads_an_upstream_output_kept_in_s3_through_its_templates() {
    use chainrun_core::engine::{Engine, EngineConfig, Outcome};
    use chainrun_core::memory::{Script, ScriptedModel};
    use chainrun_core::pricing::ModelRegistry;

    let Some(moto) = moto("a_resumed_run_reads_an_upstream_output_kept_in_s3_through_its_templates").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    let (s3, blobs) = moto_bucket(&moto).await;
    let store = Arc::new(DynamoStore::new(client.clone(), tables.clone()).with_blobs(blobs.clone()));
    let progress = Arc::new(DynamoProgress::new(client, tables, 30).with_blobs(blobs));
    let definition = json!({
        "name": "wf",
        "defaults": { "model": "amazon.nova-micro-v1:0" },
        "steps": [
            { "id": "a", "type": "transform", "template": "{{ input.text }}" },
            { "id": "b", "type": "llm", "prompt": "B {{ steps.a.text }} END" }
        ],
        "output": "{{ steps.b.text }}"
    });
    let big = "every word counts ".repeat(40_000); // 720 KB
    let run = RunRecord::new("wf".parse().unwrap(), definition, json!({ "text": "unused" }), "alice".parse().unwrap(), vec![alice()], Utc::now());
    store.create_run(&run).await.unwrap();
    // An earlier invocation settled `a` with the large text, then stopped.
    let earlier = lease("earlier", 5);
    store.claim(&run.id, &earlier, Utc::now()).await.unwrap();
    let mut a = StepRecord::settled(StepId::parse("a").unwrap(), StepStatus::Completed, None, Utc::now());
    (a.text, a.output) = (Some(big.clone()), Some(json!(big)));
    store.save_step(&run.id, &earlier, &a).await.unwrap();
    store.release(&run.id, &earlier).await.unwrap();
    assert!(!object_keys(&s3).await.is_empty(), "a's documents went to S3");

    let model = Arc::new(ScriptedModel::new(vec![Script::reply("B ", "read it")]));
    let engine = Engine::new(model.clone(), store.clone(), progress, Arc::new(ModelRegistry::builtin()), EngineConfig::default());
    let next = lease("next", 5);
    let Claim::Acquired(resumed) = store.claim(&run.id, &next, Utc::now()).await.unwrap() else { panic!("claim") };
    assert!(matches!(engine.execute(*resumed, next, None).await.unwrap(), Outcome::Finished(RunStatus::Completed)));
    let calls = model.calls();
    assert_eq!(calls.len(), 1, "a is not run again");
    assert_eq!(calls[0].prompt, format!("B {big} END"), "b's template pasted the whole of a's text");
}

#[tokio::test]
async fn dynamodb_reads_a_missing_or_altered_document_as_corrupt() {
    let Some(moto) = moto("dynamodb_reads_a_missing_or_altered_document_as_corrupt").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    let (s3, blobs) = moto_bucket(&moto).await;
    let store = DynamoStore::new(client, tables).with_blobs(blobs);
    let run = new_run();
    store.create_run(&run).await.unwrap();
    let l = lease("one", 5);
    store.claim(&run.id, &l, Utc::now()).await.unwrap();
    store.save_step(&run.id, &l, &step("a", big_document(500, "a"))).await.unwrap();
    let (key,) = <[String; 1]>::try_from(object_keys(&s3).await).map(|[k]| (k,)).unwrap();

    s3.put_object().bucket("outputs").key(&key).body(b"[\"swapped\"]".to_vec().into()).send().await.unwrap();
    let err = store.get_steps(&run.id).await.unwrap_err();
    assert!(matches!(&err, StoreError::Corrupt(m) if m.contains(&key) && m.contains("STEP#a")), "{err:?}");

    s3.delete_object().bucket("outputs").key(&key).send().await.unwrap();
    let err = store.get_steps(&run.id).await.unwrap_err();
    assert!(matches!(&err, StoreError::Corrupt(m) if m.contains(&key) && m.contains("missing")), "{err:?}");
    assert!(!err.retryable());
}

#[tokio::test]
async fn dynamodb_names_a_missing_outputs_bucket() {
    let Some(moto) = moto("dynamodb_names_a_missing_outputs_bucket").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    let (s3, _) = moto_bucket(&moto).await;
    let store = DynamoStore::new(client, tables).with_blobs(S3Blobs::new(s3, "no-such-bucket"));
    let run = new_run();
    store.create_run(&run).await.unwrap();
    let l = lease("one", 5);
    store.claim(&run.id, &l, Utc::now()).await.unwrap();
    let err = store.save_step(&run.id, &l, &step("a", big_document(500, "a"))).await.unwrap_err();
    assert!(matches!(&err, StoreError::Rejected(m) if m.contains("no-such-bucket") && m.contains("CHAINRUN_OUTPUTS_BUCKET")), "{err:?}");
}

// ---------------------------------------------------------------- a checkpoint with its event

/// What the engine relies on when a step's result goes out with its event: both land, or
/// neither does when the lease is lost; a seq conflict never appends the event.
async fn checkpointed_contract(s: Subject) {
    let run = new_run();
    s.store.create_run(&run).await.unwrap();
    let ours = lease("one", 5);
    assert!(matches!(s.store.claim(&run.id, &ours, Utc::now()).await.unwrap(), Claim::Acquired(_)));
    let publish = |seq: u64, step_id: &'static str, held: Lease| {
        let (store, progress, run) = (s.store.clone(), s.progress.clone(), run.id.clone());
        async move {
            let record = step(step_id, json!({ "seq": seq }));
            let checkpoint = Checkpoint { store: store.as_ref(), lease: &held, step: &record };
            progress.publish_checkpointed(&event(&run, seq), &row(&run, seq), &[alice()], checkpoint).await
        }
    };

    publish(1, "a", ours.clone()).await.unwrap();
    let steps = s.store.get_steps(&run.id).await.unwrap();
    assert_eq!(steps.iter().map(|r| (r.step_id.to_string(), r.output.clone())).collect::<Vec<_>>(), [("a".to_owned(), Some(json!({ "seq": 1 })))]);
    assert_eq!(seqs(s.progress.as_ref(), &run.id).await, [1]);
    assert_eq!(last_seq_of(s.progress.as_ref(), &alice(), &run.id).await, Some(1));

    // Not the next seq: the event is refused and nothing is announced.
    assert_eq!(publish(3, "b", ours.clone()).await, Err(JournalError::Progress(ProgressError::Conflict { run: run.id.clone(), seq: 3 })));
    assert_eq!(seqs(s.progress.as_ref(), &run.id).await, [1]);

    // A runner whose lease is gone writes neither its checkpoint nor its event.
    let theirs = lease("two", 5);
    assert_eq!(publish(2, "c", theirs).await, Err(JournalError::Store(StoreError::LeaseLost(run.id.clone()))));
    assert!(s.store.get_steps(&run.id).await.unwrap().iter().all(|r| r.step_id.as_str() != "c"), "a checkpoint without its lease");
    assert_eq!(seqs(s.progress.as_ref(), &run.id).await, [1]);
    assert_eq!(last_seq_of(s.progress.as_ref(), &alice(), &run.id).await, Some(1));

    // The next seq with the lease: both land.
    publish(2, "c", ours).await.unwrap();
    assert_eq!(seqs(s.progress.as_ref(), &run.id).await, [1, 2]);
    assert!(s.store.get_steps(&run.id).await.unwrap().iter().any(|r| r.step_id.as_str() == "c"));
}

#[tokio::test]
async fn memory_adapters_write_a_checkpoint_with_its_event() {
    checkpointed_contract(Subject { store: Arc::new(MemoryStore::new()), progress: Arc::new(MemoryProgress::new()) }).await;
}

#[tokio::test]
async fn dynamodb_adapters_write_a_checkpoint_with_its_event_in_one_transaction() {
    let Some(moto) = moto("dynamodb_adapters_write_a_checkpoint_with_its_event_in_one_transaction").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    checkpointed_contract(Subject {
        store: Arc::new(DynamoStore::new(client.clone(), tables.clone())),
        progress: Arc::new(DynamoProgress::new(client, tables, 30)),
    })
    .await;
}

// ---------------------------------------------------------------- progress: the log and the rows

fn event(run: &RunId, seq: u64) -> Event {
    Event {
        run_id: run.clone(),
        seq,
        at: Utc::now(),
        kind: EventType::StepStarted,
        step_id: None,
        attempt: None,
        revision: 0,
        data: json!({ "seq": seq }),
    }
}

fn row(run: &RunId, last_seq: u64) -> ProgressRow {
    ProgressRow {
        run_id: run.clone(),
        workflow: "wf".parse().unwrap(),
        status: RunStatus::Running,
        current_step: None,
        totals: Totals::default(),
        last_seq,
        updated_at: Utc::now(),
        waiting: None,
    }
}

async fn seqs(p: &dyn Progress, run: &RunId) -> Vec<u64> {
    p.events_after(run, 0, 1000).await.unwrap().iter().map(|e| e.seq).collect()
}

async fn last_seq_of(p: &dyn Progress, owner: &Principal, run: &RunId) -> Option<u64> {
    p.progress_of(owner, run).await.unwrap().map(|r| r.last_seq)
}

/// What the engine relies on when it publishes: a gap-free log, rows that only move
/// forward, all or nothing. `atomic`: whether the backend serialises conditional writes to
/// one item, as DynamoDB does and the local moto server does not (see the daily spend
/// contract); the concurrent part runs only then.
async fn progress_contract(p: Arc<dyn Progress>, atomic: bool) {
    let run = RunId::new();
    let eng = || Principal::Group("eng".into());
    let owners = [alice(), eng()];
    let conflict = |seq| Err(ProgressError::Conflict { run: run.clone(), seq });

    // Only `last + 1` is accepted, from 1 on; a refused event writes nothing, rows included.
    assert_eq!(p.publish(&event(&run, 0), &row(&run, 0), &owners).await, conflict(0));
    assert_eq!(p.publish(&event(&run, 2), &row(&run, 2), &owners).await, conflict(2), "a gap before the first event");
    assert_eq!(p.last_seq(&run).await.unwrap(), 0);
    assert_eq!(last_seq_of(p.as_ref(), &alice(), &run).await, None, "a refused event updates no row");
    for seq in 1..=3 {
        p.publish(&event(&run, seq), &row(&run, seq), &owners).await.unwrap();
    }
    assert_eq!(p.publish(&event(&run, 5), &row(&run, 5), &owners).await, conflict(5), "a gap: 4 is missing");
    assert_eq!(p.publish(&event(&run, 3), &row(&run, 3), &owners).await, conflict(3), "3 is taken");
    assert_eq!(p.publish(&event(&run, 2), &row(&run, 4), &owners).await, conflict(2), "2 is taken, whatever the row says");
    assert_eq!(seqs(p.as_ref(), &run).await, [1, 2, 3]);
    assert_eq!(last_seq_of(p.as_ref(), &eng(), &run).await, Some(3));

    // A row reads back exactly as published; owners named twice get one row.
    let mut published = row(&run, 4);
    published.current_step = Some(StepId::parse("a").unwrap());
    published.totals.add_call(&Usage { input_tokens: 5, output_tokens: 7, ..Usage::default() }, Usd::from_pico(12_345));
    p.publish(&event(&run, 4), &published, &[alice(), eng(), alice()]).await.unwrap();
    assert_eq!(p.progress_of(&alice(), &run).await.unwrap(), Some(published.clone()));
    assert_eq!(p.feed(&alice(), 10, None).await.unwrap().iter().filter(|r| r.run_id == run).count(), 1);

    // Rows only move forward. A row ahead of the log (here published with an event it runs
    // ahead of) is never overwritten by an older one: that event is refused whole.
    p.publish(&event(&run, 5), &row(&run, 9), &[alice()]).await.unwrap();
    assert_eq!(p.publish(&event(&run, 6), &row(&run, 6), &owners).await, conflict(6), "alice's row is at 9");
    assert_eq!(p.publish(&event(&run, 6), &row(&run, 9), &owners).await, conflict(6), "equal is not forward");
    assert_eq!(seqs(p.as_ref(), &run).await, [1, 2, 3, 4, 5], "the refused event is not in the log");
    assert_eq!(last_seq_of(p.as_ref(), &alice(), &run).await, Some(9));
    assert_eq!(last_seq_of(p.as_ref(), &eng(), &run).await, Some(4), "no owner's row moved either");
    let bob = Principal::User("bob".into());
    p.publish(&event(&run, 6), &row(&run, 10), &[alice(), eng(), bob.clone()]).await.unwrap();
    for owner in [alice(), eng(), bob] {
        assert_eq!(last_seq_of(p.as_ref(), &owner, &run).await, Some(10), "{owner}: a new owner gets a row");
    }

    // Pages hold at least one item, whatever limit is asked for.
    assert_eq!(p.events_after(&run, 0, 0).await.unwrap().len(), 1);
    assert_eq!(p.feed(&alice(), 0, None).await.unwrap().len(), 1);

    // One event updates at most MAX_OWNERS rows (a DynamoDB transaction holds 100 items,
    // a checkpoint and the log's own checks among them); more is refused up front,
    // terminally, and writes nothing.
    let crowded = RunId::new();
    let many: Vec<Principal> = (0..=MAX_OWNERS).map(|i| Principal::User(format!("u{i}"))).collect();
    for seq in [0, 1, 2] {
        let refused = p.publish(&event(&crowded, seq), &row(&crowded, seq), &many).await.unwrap_err();
        assert!(matches!(&refused, ProgressError::Rejected(_)), "seq {seq}: the owners are checked first: {refused:?}");
    }
    let refused = p.publish(&event(&crowded, 1), &row(&crowded, 1), &many).await.unwrap_err();
    let (count, limit) = (format!("{} owners", MAX_OWNERS + 1), format!("at most {MAX_OWNERS}"));
    assert!(matches!(&refused, ProgressError::Rejected(m) if m.contains(&count) && m.contains(&limit)), "{refused:?}");
    assert!(!refused.retryable());
    assert_eq!(p.last_seq(&crowded).await.unwrap(), 0);
    for seq in 1..=2 {
        p.publish(&event(&crowded, seq), &row(&crowded, seq), &many[..MAX_OWNERS]).await.unwrap();
    }
    assert_eq!(last_seq_of(p.as_ref(), &many[MAX_OWNERS - 1], &crowded).await, Some(2));

    if !atomic {
        return;
    }
    // Writers racing for the next seq: exactly one wins, the others are told of the conflict.
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let (p, run) = (p.clone(), run.clone());
            tokio::spawn(async move { p.publish(&event(&run, 7), &row(&run, 11), &[alice(), Principal::User(format!("w{i}"))]).await })
        })
        .collect();
    let mut won = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => won += 1,
            Err(e) => assert!(matches!(e, ProgressError::Conflict { seq: 7, .. }), "{e:?}"),
        }
    }
    assert_eq!(won, 1);
    assert_eq!(seqs(p.as_ref(), &run).await.len(), 7);
}

/// A shared feed (the admin feed, a group's) is spread over shards; read, it is one feed:
/// every run once, newest first, in pages that lose and repeat nothing, and each run's row
/// found by `progress_of` where its events put it.
async fn feed_pages_contract(p: Arc<dyn Progress>) {
    let group = Principal::Group(format!("g{}", RunId::new()));
    let base = ulid::Ulid::new().timestamp_ms();
    // 40 runs a millisecond apart, so their ids (ULIDs) sort as their starts.
    let runs: Vec<RunId> = (0..40u64).map(|i| RunId::parse(&ulid::Ulid::from_parts(base + i, u128::from(i)).to_string()).unwrap()).collect();
    for run in &runs {
        p.publish(&event(run, 1), &row(run, 1), &[alice(), group.clone()]).await.unwrap();
    }
    let mut read = Vec::new();
    let mut before: Option<RunId> = None;
    loop {
        let page = p.feed(&group, 7, before.as_ref()).await.unwrap();
        if page.is_empty() {
            break;
        }
        before = page.last().map(|r| r.run_id.clone());
        read.extend(page.into_iter().map(|r| r.run_id));
    }
    let newest_first: Vec<RunId> = runs.iter().rev().cloned().collect();
    assert_eq!(read, newest_first, "the group feed, merged from its shards");
    for run in &runs {
        assert_eq!(last_seq_of(p.as_ref(), &group, run).await, Some(1));
    }
    let mine = p.feed(&alice(), 1000, None).await.unwrap();
    assert!(runs.iter().all(|r| mine.iter().any(|row| &row.run_id == r)), "the user feed is one key");
}

#[tokio::test]
async fn memory_progress_reads_a_sharded_feed_in_pages() {
    feed_pages_contract(Arc::new(MemoryProgress::new())).await;
}

#[tokio::test]
async fn memory_progress_honours_the_log_and_row_contract() {
    progress_contract(Arc::new(MemoryProgress::new()), true).await;
}

// ---------------------------------------------------------------- store: leases and ends

/// An instant at a whole millisecond: DynamoDB keeps lease expiries to the millisecond.
fn whole_ms(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap()
}

/// What cancelling relies on: a request recorded on any unfinished run, the first one
/// standing, and seen by the runner holding the run through its heartbeat.
async fn control_contract(store: Arc<dyn RunStore>) {
    let run = new_run();
    store.create_run(&run).await.unwrap();
    let request =
        |by: &str| ControlRequest { kind: ControlKind::Cancel, by: by.parse().unwrap(), at: Utc::now(), reason: Some("wrong input".into()) };

    let ours = lease("one", 5);
    assert!(matches!(store.claim(&run.id, &ours, Utc::now()).await.unwrap(), Claim::Acquired(_)));
    assert_eq!(store.renew(&run.id, &lease("one", 6)).await.unwrap(), None, "nothing asked yet");

    let first = request("alice");
    assert_eq!(store.request_control(&run.id, &first).await.unwrap(), ControlOutcome::Recorded);
    assert_eq!(store.request_control(&run.id, &first).await.unwrap(), ControlOutcome::Recorded, "the same request again (a retry)");
    assert_eq!(store.request_control(&run.id, &request("bob")).await.unwrap(), ControlOutcome::AlreadyRequested(first.clone()));
    assert_eq!(store.get_run(&run.id).await.unwrap().unwrap().control, Some(first.clone()));

    // The holder learns of it when it renews, and keeps its lease while it acts on it.
    assert_eq!(store.renew(&run.id, &lease("one", 7)).await.unwrap(), Some(first.clone()));
    assert_eq!(store.claim(&run.id, &lease("dup", 5), Utc::now()).await.unwrap(), Claim::HeldElsewhere);
    assert_eq!(store.renew(&run.id, &lease("stranger", 7)).await, Err(StoreError::LeaseLost(run.id.clone())));

    let mut done = store.get_run(&run.id).await.unwrap().unwrap();
    done.status = RunStatus::Cancelled;
    done.finished_at = Some(Utc::now());
    store.finish_run(&done, &ours).await.unwrap();
    let ended = store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!((ended.status, ended.control), (RunStatus::Cancelled, Some(first)), "the run keeps the request it ended by");
    assert_eq!(store.request_control(&run.id, &request("alice")).await.unwrap(), ControlOutcome::Finished(RunStatus::Cancelled));
    assert_eq!(store.request_control(&RunId::new(), &request("alice")).await.unwrap(), ControlOutcome::NotFound);

    // A queued run takes a request too; the runner that claims it sees it on the record.
    let queued = new_run();
    store.create_run(&queued).await.unwrap();
    assert_eq!(store.request_control(&queued.id, &request("alice")).await.unwrap(), ControlOutcome::Recorded);
    let Claim::Acquired(claimed) = store.claim(&queued.id, &lease("two", 5), Utc::now()).await.unwrap() else { panic!("claim") };
    assert_eq!(claimed.control.map(|c| c.kind), Some(ControlKind::Cancel));
}

/// What pausing relies on: a parked run holds no runner, cannot be claimed or swept, and
/// a resume queues it again, once.
async fn pause_contract(store: Arc<dyn RunStore>) {
    let run = new_run();
    store.create_run(&run).await.unwrap();
    let ours = lease("one", 5);
    assert!(matches!(store.claim(&run.id, &ours, Utc::now()).await.unwrap(), Claim::Acquired(_)));
    let pause = ControlRequest { kind: ControlKind::Pause, by: "alice".parse().unwrap(), at: Utc::now(), reason: None };
    assert_eq!(store.request_control(&run.id, &pause).await.unwrap(), ControlOutcome::Recorded);
    assert_eq!(store.renew(&run.id, &lease("one", 6)).await.unwrap(), Some(pause.clone()));

    let waiting = Waiting {
        kind: WaitKind::Paused,
        by: Some("alice".parse().unwrap()),
        since: Utc::now(),
        reason: Some("lunch".into()),
        steps: Vec::new(),
        deadline: None,
    };
    assert_eq!(store.park(&run.id, &lease("stranger", 5), &waiting, Answered::default()).await, Err(StoreError::LeaseLost(run.id.clone())));
    assert!(store.park(&run.id, &ours, &waiting, Answered::default()).await.unwrap());
    assert!(store.park(&run.id, &ours, &waiting, Answered::default()).await.unwrap(), "a retry whose reply was lost");
    let parked = store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!((parked.status, parked.waiting.clone(), parked.control.clone()), (RunStatus::AwaitingInput, Some(waiting.clone()), None));
    assert_eq!(store.claim(&run.id, &lease("two", 5), Utc::now() + Duration::hours(1)).await.unwrap(), Claim::Waiting);
    assert!(!store.due(Utc::now() + Duration::days(30), 100).await.unwrap().contains(&run.id), "nobody sweeps a waiting run");
    assert_eq!(store.renew(&run.id, &ours).await, Err(StoreError::LeaseLost(run.id.clone())), "the lease was given up");
    assert_eq!(store.request_control(&run.id, &pause).await.unwrap(), ControlOutcome::AlreadyWaiting, "a pause of a paused run");

    let raise = BudgetRaise {
        by: "bob".parse().unwrap(),
        at: Utc::now(),
        from: BudgetView { max_cost_pico_usd: Some(Usd::from_pico(5)), max_total_tokens: None },
        to: BudgetView { max_cost_pico_usd: Some(Usd::from_pico(9)), max_total_tokens: None },
    };
    let resumption = Resumption { by: "bob".parse().unwrap(), at: Utc::now(), budget: Some(raise.clone()) };
    assert_eq!(store.resume(&run.id, &resumption).await.unwrap(), ResumeOutcome::Resumed);
    assert_eq!(store.resume(&run.id, &resumption).await.unwrap(), ResumeOutcome::Resumed, "the same resume again (a retry)");
    let other = Resumption { by: "carol".parse().unwrap(), at: Utc::now(), budget: None };
    assert_eq!(store.resume(&run.id, &other).await.unwrap(), ResumeOutcome::NotWaiting(RunStatus::Queued));
    assert_eq!(store.resume(&RunId::new(), &other).await.unwrap(), ResumeOutcome::NotFound);
    let queued = store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!((queued.status, queued.waiting, queued.resumed), (RunStatus::Queued, None, Some(resumption)));
    assert_eq!(queued.budget_raises, vec![raise], "the raise is kept with the run");
    assert!(store.due(Utc::now() + Duration::days(1), 100).await.unwrap().contains(&run.id), "a lost dispatch is swept");
    assert!(matches!(store.claim(&run.id, &lease("three", 5), Utc::now()).await.unwrap(), Claim::Acquired(_)));

    // A cancel overrides a pause not yet acted on, and ends a waiting run through a runner.
    let pause = ControlRequest { at: Utc::now(), ..pause };
    assert_eq!(store.request_control(&run.id, &pause).await.unwrap(), ControlOutcome::Recorded);
    let cancel = ControlRequest { kind: ControlKind::Cancel, by: "alice".parse().unwrap(), at: Utc::now(), reason: None };
    assert_eq!(store.request_control(&run.id, &cancel).await.unwrap(), ControlOutcome::Recorded);
    assert_eq!(store.get_run(&run.id).await.unwrap().unwrap().control, Some(cancel.clone()));
    assert_eq!(store.request_control(&run.id, &pause).await.unwrap(), ControlOutcome::AlreadyRequested(cancel));

    let other_run = new_run();
    store.create_run(&other_run).await.unwrap();
    let l = lease("four", 5);
    store.claim(&other_run.id, &l, Utc::now()).await.unwrap();
    assert!(store.park(&other_run.id, &l, &waiting, Answered::default()).await.unwrap());
    let cancel = ControlRequest { kind: ControlKind::Cancel, by: "alice".parse().unwrap(), at: Utc::now(), reason: None };
    assert_eq!(store.request_control(&other_run.id, &cancel).await.unwrap(), ControlOutcome::Recorded);
    let requeued = store.get_run(&other_run.id).await.unwrap().unwrap();
    assert_eq!((requeued.status, requeued.waiting, requeued.control), (RunStatus::Queued, None, Some(cancel)));
    assert!(matches!(store.claim(&other_run.id, &lease("five", 5), Utc::now()).await.unwrap(), Claim::Acquired(_)));
}

/// What review steps rely on: a decision recorded once per step on an unfinished run,
/// queueing a waiting run again, and a park that notices a decision it did not see.
async fn decisions_contract(store: Arc<dyn RunStore>) {
    let run = new_run();
    store.create_run(&run).await.unwrap();
    let ours = lease("one", 5);
    assert!(matches!(store.claim(&run.id, &ours, Utc::now()).await.unwrap(), Claim::Acquired(_)));
    let step = |id: &str| StepId::parse(id).unwrap();
    let decision = |verdict: Verdict, output: Option<Value>| ReviewDecision {
        decision: verdict,
        output,
        comment: Some("fine ✓".into()),
        by: "bob".parse().unwrap(),
        at: Utc::now(),
    };
    // While the run runs: recorded, nothing requeued; the runner's park then notices it.
    let edit = decision(Verdict::Edit, Some(json!({ "n": 1.5e300, "s": "", "l": [1, null] })));
    assert_eq!(store.decide(&run.id, &step("a"), &edit).await.unwrap(), DecideOutcome::Recorded { requeued: false });
    assert_eq!(store.decide(&run.id, &step("a"), &decision(Verdict::Reject, None)).await.unwrap(), DecideOutcome::AlreadyDecided(edit.clone()));
    let waiting = Waiting { kind: WaitKind::Review, by: None, since: Utc::now(), reason: None, steps: vec![step("b")], deadline: None };
    assert!(!store.park(&run.id, &ours, &waiting, Answered::default()).await.unwrap(), "a decision arrived that the runner did not see");
    assert_eq!(store.get_run(&run.id).await.unwrap().unwrap().status, RunStatus::Running, "nothing changed");
    assert!(store.park(&run.id, &ours, &waiting, decided(1)).await.unwrap());

    // While it waits: recorded, and the run is queued again for any runner.
    let approve = decision(Verdict::Approve, None);
    assert_eq!(store.decide(&run.id, &step("b"), &approve).await.unwrap(), DecideOutcome::Recorded { requeued: true });
    let stored = store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.waiting), (RunStatus::Queued, None));
    assert_eq!(stored.decisions.get(&step("a")), Some(&edit), "documents round-trip exactly");
    assert_eq!(stored.decisions.get(&step("b")), Some(&approve));
    assert!(matches!(store.claim(&run.id, &lease("two", 5), Utc::now()).await.unwrap(), Claim::Acquired(_)));

    // A waiting run with a deadline: nobody claims it before, the sweeper finds it after.
    let deadline = whole_ms(Utc::now() + Duration::hours(48));
    let two = lease("two", 5);
    let timed = Waiting { deadline: Some(deadline), steps: vec![step("c")], ..waiting };
    assert!(store.park(&run.id, &two, &timed, decided(2)).await.unwrap());
    assert_eq!(store.claim(&run.id, &lease("early", 5), deadline - Duration::seconds(1)).await.unwrap(), Claim::Waiting);
    assert!(!store.due(deadline - Duration::seconds(1), 100).await.unwrap().contains(&run.id));
    assert!(store.due(deadline, 100).await.unwrap().contains(&run.id), "due at its deadline");
    let Claim::Acquired(late) = store.claim(&run.id, &lease("late", 5), deadline).await.unwrap() else { panic!("claimed at the deadline") };
    assert_eq!((late.status, late.waiting), (RunStatus::Running, None));
    // Waiting again, now without a deadline: the old one does not let anyone claim it.
    let untimed = Waiting { deadline: None, ..timed.clone() };
    assert!(store.park(&run.id, &lease("late", 5), &untimed, decided(2)).await.unwrap());
    assert_eq!(store.claim(&run.id, &lease("later", 5), deadline + Duration::days(1)).await.unwrap(), Claim::Waiting);
    store
        .request_control(&run.id, &ControlRequest { kind: ControlKind::Cancel, by: "alice".parse().unwrap(), at: Utc::now(), reason: None })
        .await
        .unwrap();
    assert!(matches!(store.claim(&run.id, &lease("late", 5), Utc::now()).await.unwrap(), Claim::Acquired(_)), "a cancel queues it");

    let mut done = store.get_run(&run.id).await.unwrap().unwrap();
    done.status = RunStatus::Completed;
    done.finished_at = Some(Utc::now());
    store.finish_run(&done, &lease("late", 5)).await.unwrap();
    assert_eq!(store.decide(&run.id, &step("c"), &approve).await.unwrap(), DecideOutcome::Finished(RunStatus::Completed));
    assert_eq!(store.decide(&RunId::new(), &step("c"), &approve).await.unwrap(), DecideOutcome::NotFound);
}

#[tokio::test]
async fn memory_store_honours_the_decisions_contract() {
    decisions_contract(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn dynamodb_store_honours_the_decisions_contract() {
    let Some(moto) = moto("dynamodb_store_honours_the_decisions_contract").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    decisions_contract(Arc::new(DynamoStore::new(client, tables))).await;
}

fn decided(decisions: usize) -> Answered {
    Answered { decisions, input_turns: 0 }
}

fn input_turn(values: Value, text: Option<&str>) -> chainrun_core::input::InputTurn {
    chainrun_core::input::InputTurn {
        by: "bob".parse().unwrap(),
        at: whole_ms(Utc::now()),
        values: values.as_object().cloned(),
        text: text.map(str::to_owned),
        extracted: None,
        read: text.is_none(),
        accepted: Vec::new(),
        errors: Vec::new(),
    }
}

/// What input steps rely on: an answer recorded only over the state it was checked
/// against (so of two at once only the first counts), documents kept exactly, a waiting
/// run queued again when asked, and a park that notices an answer it did not see.
async fn inputs_contract(store: Arc<dyn RunStore>) {
    use chainrun_core::input::{FieldError, InputEnd, InputState};
    let run = new_run();
    store.create_run(&run).await.unwrap();
    let ours = lease("one", 5);
    assert!(matches!(store.claim(&run.id, &ours, Utc::now()).await.unwrap(), Claim::Acquired(_)));
    let step = |id: &str| StepId::parse(id).unwrap();
    // While the run runs: recorded, nothing requeued; the runner's park then notices it.
    let mut first = InputState { version: 1, ..InputState::default() };
    first.values.insert("n".into(), json!(1.5e300));
    first.values.insert("s".into(), json!(""));
    let mut answered = input_turn(json!({ "n": 1.5e300, "s": "", "bad": [1, null] }), None);
    answered.errors.push(FieldError { field: "bad".into(), message: "not a field ✓".into() });
    first.turns.push(answered);
    assert_eq!(store.record_input(&run.id, &step("a"), 0, &first, true).await.unwrap(), AnswerOutcome::Recorded { requeued: false });
    assert_eq!(store.record_input(&run.id, &step("a"), 0, &first, true).await.unwrap(), AnswerOutcome::Recorded { requeued: false }, "a retry");
    let rival = InputState { version: 1, ..InputState::default() };
    assert_eq!(store.record_input(&run.id, &step("a"), 0, &rival, true).await.unwrap(), AnswerOutcome::Stale(first.clone()), "the first counts");
    let waiting = Waiting { kind: WaitKind::Input, by: None, since: Utc::now(), reason: None, steps: vec![step("a")], deadline: None };
    assert!(!store.park(&run.id, &ours, &waiting, Answered::default()).await.unwrap(), "an answer arrived that the runner did not see");
    assert_eq!(store.get_run(&run.id).await.unwrap().unwrap().status, RunStatus::Running, "nothing changed");
    let seen = Answered::of(&store.get_run(&run.id).await.unwrap().unwrap());
    assert_eq!(seen, Answered { decisions: 0, input_turns: 1 });
    assert!(store.park(&run.id, &ours, &waiting, seen).await.unwrap());

    // While it waits: an answer that leaves it waiting changes nothing else…
    let mut second = first.clone();
    second.version = 2;
    second.turns.push(input_turn(json!({ "s": "x" }), None));
    assert_eq!(store.record_input(&run.id, &step("a"), 1, &second, false).await.unwrap(), AnswerOutcome::Recorded { requeued: false });
    assert_eq!(store.get_run(&run.id).await.unwrap().unwrap().status, RunStatus::AwaitingInput);
    // …free text queues it again for any runner, as does a second step's first answer.
    let mut third = second.clone();
    third.version = 3;
    third.turns.push(input_turn(json!(null), Some("it is \"x\" ✓")));
    assert_eq!(store.record_input(&run.id, &step("a"), 2, &third, true).await.unwrap(), AnswerOutcome::Recorded { requeued: true });
    let stored = store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.waiting), (RunStatus::Queued, None));
    assert_eq!(stored.inputs.get(&step("a")), Some(&third), "documents round-trip exactly");
    let two = lease("two", 5);
    let Claim::Acquired(claimed) = store.claim(&run.id, &two, Utc::now()).await.unwrap() else { panic!("claim") };
    assert_eq!(Answered::of(&claimed).input_turns, 3);
    let other = InputState { version: 1, end: Some(InputEnd::Complete), ..InputState::default() };
    assert_eq!(store.record_input(&run.id, &step("b"), 0, &other, true).await.unwrap(), AnswerOutcome::Recorded { requeued: false });
    // The runner reads the text: a write that counts no answer.
    let mut read = third.clone();
    read.version = 4;
    read.turns.last_mut().unwrap().read = true;
    assert_eq!(store.record_input(&run.id, &step("a"), 3, &read, false).await.unwrap(), AnswerOutcome::Recorded { requeued: false });
    let stored = store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!((stored.inputs.len(), Answered::of(&stored).input_turns), (2, 3));
    assert!(store.park(&run.id, &two, &waiting, Answered::of(&stored)).await.unwrap(), "reading text is not a new answer");

    let mut done = stored;
    done.status = RunStatus::Completed;
    done.finished_at = Some(whole_ms(Utc::now()));
    let three = lease("three", 5);
    store
        .request_control(&run.id, &ControlRequest { kind: ControlKind::Cancel, by: "alice".parse().unwrap(), at: Utc::now(), reason: None })
        .await
        .unwrap();
    assert!(matches!(store.claim(&run.id, &three, Utc::now()).await.unwrap(), Claim::Acquired(_)));
    store.finish_run(&done, &three).await.unwrap();
    let late = InputState { version: 5, ..read };
    assert_eq!(store.record_input(&run.id, &step("a"), 4, &late, true).await.unwrap(), AnswerOutcome::Finished(RunStatus::Completed));
    assert_eq!(store.record_input(&RunId::new(), &step("a"), 0, &late, true).await.unwrap(), AnswerOutcome::NotFound);
}

#[tokio::test]
async fn memory_store_honours_the_inputs_contract() {
    inputs_contract(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn dynamodb_store_honours_the_inputs_contract() {
    let Some(moto) = moto("dynamodb_store_honours_the_inputs_contract").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    inputs_contract(Arc::new(DynamoStore::new(client, tables))).await;
}

#[tokio::test]
async fn memory_store_honours_the_pause_contract() {
    pause_contract(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn dynamodb_store_honours_the_pause_contract() {
    let Some(moto) = moto("dynamodb_store_honours_the_pause_contract").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    pause_contract(Arc::new(DynamoStore::new(client, tables))).await;
}

#[tokio::test]
async fn memory_store_honours_the_control_contract() {
    control_contract(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn dynamodb_store_honours_the_control_contract() {
    let Some(moto) = moto("dynamodb_store_honours_the_control_contract").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    control_contract(Arc::new(DynamoStore::new(client, tables))).await;
}

async fn lease_and_finish_contract(store: Arc<dyn RunStore>) {
    let t = whole_ms(Utc::now());
    let run = RunRecord::new("wf".parse().unwrap(), json!({ "name": "wf" }), json!({ "x": 1 }), "alice".parse().unwrap(), vec![alice()], t);
    store.create_run(&run).await.unwrap();
    assert_eq!(store.get_run(&run.id).await.unwrap(), Some(run.clone()), "a new run reads back as created");

    // A lease is live until the instant it expires, and not at it. A takeover keeps the
    // run's first start.
    let first = Lease { holder: "one".into(), expires_at: t + Duration::minutes(1) };
    let started = t + Duration::nanoseconds(123_456_789);
    let Claim::Acquired(claimed) = store.claim(&run.id, &first, started).await.unwrap() else { panic!("first claim") };
    assert_eq!(claimed.started_at, Some(started));
    let second = Lease { holder: "two".into(), expires_at: first.expires_at + Duration::minutes(1) };
    assert_eq!(store.claim(&run.id, &second, first.expires_at - Duration::milliseconds(1)).await.unwrap(), Claim::HeldElsewhere);
    let Claim::Acquired(taken) = store.claim(&run.id, &second, first.expires_at).await.unwrap() else { panic!("takeover at expiry") };
    assert_eq!((taken.status, taken.started_at), (RunStatus::Running, Some(started)));

    // Finishing records the end — status, finish time, output, error, totals — over the
    // stored record; whatever else the caller's copy says is not written.
    let mut end = run.clone();
    end.definition = json!({ "name": "edited" });
    end.input = json!({});
    end.caller = "mallory".parse().unwrap();
    end.owners = vec![Principal::User("mallory".into())];
    end.status = RunStatus::Completed;
    end.finished_at = Some(started + Duration::seconds(3));
    end.output = Some(json!({ "answer": [1, "two", null] }));
    end.totals.add_call(&Usage { input_tokens: 3, output_tokens: 4, ..Usage::default() }, Usd::from_pico(77));
    store.finish_run(&end, &second).await.unwrap();
    let expected = RunRecord {
        status: RunStatus::Completed,
        started_at: Some(started),
        finished_at: end.finished_at,
        output: end.output.clone(),
        error: None,
        totals: end.totals,
        takeovers: vec![Takeover { from: "one".into(), expired_at: first.expires_at, by: "two".into(), at: first.expires_at }],
        ..run.clone()
    };
    assert_eq!(store.get_run(&run.id).await.unwrap(), Some(expected));
    assert_eq!(store.release(&run.id, &second).await, Err(StoreError::LeaseLost(run.id.clone())), "finishing released the lease");
    assert_eq!(store.claim(&run.id, &lease("late", 5), Utc::now()).await.unwrap(), Claim::Finished);
}

#[tokio::test]
async fn memory_store_honours_the_lease_and_finish_contract() {
    lease_and_finish_contract(Arc::new(MemoryStore::new())).await;
}

/// What recovery relies on: renewed leases, takeovers on record, the sweeper's due list,
/// and writes whose reply was lost being retried by the same holder without harm. The
/// store's queued grace is `GRACE`.
const GRACE: Duration = Duration::seconds(60);

async fn durability_contract(store: Arc<dyn RunStore>) {
    let t = whole_ms(Utc::now());
    let due = |at: DateTime<Utc>| {
        let store = store.clone();
        async move { store.due(at, 100).await.unwrap() }
    };
    let run = RunRecord::new("wf".parse().unwrap(), json!({ "name": "wf" }), json!({}), "alice".parse().unwrap(), vec![alice()], t);
    store.create_run(&run).await.unwrap();
    assert_eq!(store.create_run(&run).await, Ok(()), "a retried create of the same run (its reply lost) succeeds");
    let mut other = run.clone();
    other.caller = "mallory".parse().unwrap();
    assert_eq!(store.create_run(&other).await, Err(StoreError::AlreadyExists(run.id.clone())), "another run with the id is refused");

    // Queued: due only once the grace has passed (the API's dispatch was lost).
    assert!(!due(t + GRACE - Duration::milliseconds(1)).await.contains(&run.id));
    assert!(due(t + GRACE).await.contains(&run.id));

    // Claimed: due when the lease expires; renewing moves that.
    let one = Lease { holder: "one".into(), expires_at: t + Duration::seconds(30) };
    let Claim::Acquired(claimed) = store.claim(&run.id, &one, t).await.unwrap() else { panic!("claim") };
    assert!(claimed.takeovers.is_empty(), "claiming a queued run is not a takeover");
    assert!(matches!(store.claim(&run.id, &one, t).await.unwrap(), Claim::Acquired(_)), "a retried claim (its reply lost) holds");
    assert!(!due(t + Duration::seconds(29)).await.contains(&run.id));
    assert!(due(t + Duration::seconds(30)).await.contains(&run.id));
    let renewed = Lease { expires_at: t + Duration::seconds(50), ..one.clone() };
    store.renew(&run.id, &renewed).await.unwrap();
    assert!(!due(t + Duration::seconds(40)).await.contains(&run.id), "a renewed lease is not due");
    assert_eq!(store.claim(&run.id, &lease("two", 1), t + Duration::seconds(40)).await.unwrap(), Claim::HeldElsewhere);
    assert_eq!(store.renew(&run.id, &lease("stranger", 1)).await, Err(StoreError::LeaseLost(run.id.clone())));

    // Expired: another runner takes it over, on record; the old one is fenced off.
    let expired_at = renewed.expires_at;
    let two = Lease { holder: "two".into(), expires_at: expired_at + Duration::seconds(30) };
    let Claim::Acquired(taken) = store.claim(&run.id, &two, expired_at).await.unwrap() else { panic!("takeover") };
    assert_eq!(taken.takeovers, vec![Takeover { from: "one".into(), expired_at, by: "two".into(), at: expired_at }]);
    assert_eq!(store.renew(&run.id, &renewed).await, Err(StoreError::LeaseLost(run.id.clone())));

    // Released to continue: the next claim is not a takeover, and an unclaimed release is
    // due after the grace.
    store.release(&run.id, &two).await.unwrap();
    assert_eq!(store.release(&run.id, &two).await, Ok(()), "a retried release (its reply lost) succeeds");
    let after_release = Utc::now();
    assert!(!due(after_release + GRACE - Duration::seconds(5)).await.contains(&run.id));
    assert!(due(after_release + GRACE + Duration::seconds(5)).await.contains(&run.id));
    let three = Lease { holder: "three".into(), expires_at: Utc::now() + Duration::seconds(30) };
    let Claim::Acquired(continued) = store.claim(&run.id, &three, Utc::now()).await.unwrap() else { panic!("continue") };
    assert_eq!(continued.takeovers.len(), 1, "a continuation adds no takeover");

    // Map item checkpoints: fenced by the lease, read back in index order, apart from the
    // step checkpoints.
    let map = StepId::parse("m").unwrap();
    let item = |index: usize, status: StepStatus| ItemRecord {
        index,
        status,
        attempts: 1,
        output: (status == StepStatus::Completed).then(|| json!({ "i": index, "text": "é ✓" })),
        text: Some(format!("{index}")),
        usage: Usage { input_tokens: 3, output_tokens: 4, ..Usage::default() },
        cost: Usd::from_pico(5),
        calls: 1,
        error: None,
        lost: Lost { calls: 1, tokens: 7, cost: Usd::from_pico(9) },
        in_flight: (status == StepStatus::Running).then_some(InFlight { tokens: 100, cost: Usd::from_pico(200) }),
    };
    for index in [10, 2, 1] {
        store.save_item(&run.id, &three, &map, 0, &item(index, StepStatus::Completed)).await.unwrap();
    }
    store.save_item(&run.id, &three, &map, 0, &item(2, StepStatus::Running)).await.unwrap();
    assert_eq!(
        store.save_item(&run.id, &two, &map, 0, &item(3, StepStatus::Completed)).await,
        Err(StoreError::LeaseLost(run.id.clone())),
        "an old holder cannot write items"
    );
    let items = store.get_items(&run.id, &map, 0).await.unwrap();
    assert_eq!(items, vec![item(1, StepStatus::Completed), item(2, StepStatus::Running), item(10, StepStatus::Completed)]);
    assert!(store.get_items(&run.id, &StepId::parse("other").unwrap(), 0).await.unwrap().is_empty());
    assert!(store.get_steps(&run.id).await.unwrap().is_empty(), "items are not step checkpoints");

    // Finished: never due again; a retried finish (its reply lost) succeeds.
    let mut end = continued.as_ref().clone();
    end.status = RunStatus::Completed;
    end.finished_at = Some(Utc::now());
    store.finish_run(&end, &three).await.unwrap();
    assert_eq!(store.finish_run(&end, &three).await, Ok(()));
    assert!(!due(Utc::now() + Duration::days(1)).await.contains(&run.id));
    let mut failed = end.clone();
    failed.status = RunStatus::Failed;
    assert_eq!(store.finish_run(&failed, &three).await, Err(StoreError::LeaseLost(run.id.clone())), "but not a different end");
}

#[tokio::test]
async fn memory_store_honours_the_durability_contract() {
    durability_contract(Arc::new(MemoryStore::with_queued_grace(GRACE.to_std().unwrap()))).await;
}

/// A moto server for `test` when the moto half of the suite is enabled (`CHAINRUN_MOTO=1`);
/// otherwise says on stderr that `test` was skipped, and `None`.
async fn moto(test: &str) -> Option<Moto> {
    if std::env::var("CHAINRUN_MOTO").is_ok_and(|v| v == "1") {
        return Some(start_moto().unwrap_or_else(|e| panic!("CHAINRUN_MOTO=1, but moto could not start: {e}")));
    }
    // Written to the process's stderr directly: libtest captures `eprintln!` of passing tests,
    // and a skip must be seen.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "skipped {test}: the DynamoDB half of the contract runs against moto only with CHAINRUN_MOTO=1 (as `make test` sets)"
    );
    None
}

/// A client for `moto` with the tables created.
async fn moto_tables(moto: &Moto) -> (aws_sdk_dynamodb::Client, Tables) {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
        .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new("test", "test", None, None, "test"))
        .endpoint_url(&moto.url)
        .build();
    let client = aws_sdk_dynamodb::Client::from_conf(config);
    let tables = create_tables(&client).await.unwrap();
    (client, tables)
}

#[tokio::test]
async fn dynamodb_adapters_honour_the_contract() {
    let Some(moto) = moto("dynamodb_adapters_honour_the_contract").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    contract(Subject {
        store: Arc::new(DynamoStore::new(client.clone(), tables.clone())),
        progress: Arc::new(DynamoProgress::new(client, tables, 30)),
    })
    .await;
}

#[tokio::test]
async fn dynamodb_refuses_oversize_checkpoints_with_a_clear_error() {
    let Some(moto) = moto("dynamodb_refuses_oversize_checkpoints_with_a_clear_error").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    let store = DynamoStore::new(client, tables);
    let run = new_run();
    store.create_run(&run).await.unwrap();
    let l = lease("one", 5);
    store.claim(&run.id, &l, Utc::now()).await.unwrap();
    let err = store.save_step(&run.id, &l, &step("a", json!("x".repeat(500 * 1024)))).await.unwrap_err();
    assert!(matches!(&err, StoreError::TooLarge(m) if m.contains("step a") && m.contains("400 KB")), "{err:?}");
}

#[tokio::test]
async fn dynamodb_progress_honours_the_log_and_row_contract() {
    let Some(moto) = moto("dynamodb_progress_honours_the_log_and_row_contract").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    progress_contract(Arc::new(DynamoProgress::new(client, tables, 30)), false).await;
}

#[tokio::test]
async fn dynamodb_progress_reads_a_sharded_feed_in_pages() {
    let Some(moto) = moto("dynamodb_progress_reads_a_sharded_feed_in_pages").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    feed_pages_contract(Arc::new(DynamoProgress::new(client, tables, 30))).await;
}

#[tokio::test]
async fn dynamodb_store_honours_the_durability_contract() {
    let Some(moto) = moto("dynamodb_store_honours_the_durability_contract").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    durability_contract(Arc::new(DynamoStore::new(client, tables).with_queued_grace(GRACE.to_std().unwrap()))).await;
}

#[tokio::test]
async fn dynamodb_store_honours_the_lease_and_finish_contract() {
    let Some(moto) = moto("dynamodb_store_honours_the_lease_and_finish_contract").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    lease_and_finish_contract(Arc::new(DynamoStore::new(client, tables))).await;
}

// ---------------------------------------------------------------- DynamoDB failures, classified

fn attr(v: &str) -> aws_sdk_dynamodb::types::AttributeValue {
    aws_sdk_dynamodb::types::AttributeValue::S(v.into())
}

#[tokio::test]
async fn dynamodb_names_a_corrupt_item_and_does_not_retry_it() {
    let Some(moto) = moto("dynamodb_names_a_corrupt_item_and_does_not_retry_it").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    let store = DynamoStore::new(client.clone(), tables.clone());
    let progress = DynamoProgress::new(client.clone(), tables.clone(), 30);

    // A run record whose definition is not JSON (say, edited by hand).
    let run = new_run();
    store.create_run(&run).await.unwrap();
    let key = format!("RUN#{}", run.id);
    client
        .update_item()
        .table_name(&tables.runs)
        .key("pk", attr(&key))
        .key("sk", attr("META"))
        .update_expression("SET #d = :d")
        .expression_attribute_names("#d", "definition")
        .expression_attribute_values(":d", attr("{not json"))
        .send()
        .await
        .unwrap();
    let err = store.get_run(&run.id).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt(m) if m.contains(&format!("pk={key}, sk=META in table {}", tables.runs)) && m.contains("definition is not JSON")),
        "{err:?}"
    );
    assert!(!err.retryable());

    // An event without its fields.
    let other = RunId::new();
    client
        .put_item()
        .table_name(&tables.events)
        .item("pk", attr(&format!("RUN#{other}")))
        .item("seq", aws_sdk_dynamodb::types::AttributeValue::N("1".into()))
        .send()
        .await
        .unwrap();
    let err = progress.events_after(&other, 0, 10).await.unwrap_err();
    assert!(matches!(&err, ProgressError::Corrupt(m) if m.contains(&format!("pk=RUN#{other}, seq=1 in table {}", tables.events))), "{err:?}");
    assert!(!err.retryable());
}

#[tokio::test]
async fn dynamodb_rejects_requests_to_a_missing_table_and_names_it() {
    let Some(moto) = moto("dynamodb_rejects_requests_to_a_missing_table_and_names_it").await else { return };
    let (client, mut tables) = moto_tables(&moto).await;
    tables.runs = "no-such-runs".into();
    tables.events = "no-such-events".into();
    tables.rollups = "no-such-rollups".into();
    let err = DynamoStore::new(client.clone(), tables.clone()).get_run(&RunId::new()).await.unwrap_err();
    assert!(matches!(&err, StoreError::Rejected(m) if m.contains("table no-such-runs does not exist")), "{err:?}");
    assert!(!err.retryable());
    let err = DynamoProgress::new(client.clone(), tables.clone(), 30).last_seq(&RunId::new()).await.unwrap_err();
    assert!(matches!(&err, ProgressError::Rejected(m) if m.contains("no-such-events")), "{err:?}");
    let err = DynamoAnalytics::new(client.clone(), tables.clone()).costs(&alice(), day(), day()).await.unwrap_err();
    assert!(matches!(&err, AnalyticsError::Rejected(m) if m.contains("no-such-rollups")), "{err:?}");
    let err = DynamoDailySpend::new(client, tables).day("alice", day()).await.unwrap_err();
    assert!(matches!(&err, StoreError::Rejected(m) if m.contains("no-such-rollups")), "{err:?}");
}

#[tokio::test]
async fn dynamodb_refuses_an_oversize_event_naming_it() {
    let Some(moto) = moto("dynamodb_refuses_an_oversize_event_naming_it").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    let progress = DynamoProgress::new(client, tables, 30);
    let run = RunId::new();
    let mut big = event(&run, 1);
    big.data = json!({ "text": "x".repeat(500 * 1024) });
    let err = progress.publish(&big, &row(&run, 1), &[alice()]).await.unwrap_err();
    assert!(matches!(&err, ProgressError::Rejected(m) if m.contains(&format!("event 1 of run {run}")) && m.contains("400 KB")), "{err:?}");
    assert_eq!(progress.last_seq(&run).await.unwrap(), 0);
}

/// Needs no moto: nothing listens where the client points.
#[tokio::test]
async fn an_unreachable_dynamodb_is_unavailable_and_worth_retrying() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
        .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new("test", "test", None, None, "test"))
        .retry_config(aws_sdk_dynamodb::config::retry::RetryConfig::disabled())
        .endpoint_url(format!("http://127.0.0.1:{port}"))
        .build();
    let client = aws_sdk_dynamodb::Client::from_conf(config);
    let tables = Tables { runs: "r".into(), events: "e".into(), progress: "p".into(), workflows: "w".into(), rollups: "u".into() };
    let err = DynamoStore::new(client.clone(), tables.clone()).get_run(&RunId::new()).await.unwrap_err();
    assert!(matches!(&err, StoreError::Unavailable(m) if m.contains("could not reach DynamoDB (table r)")), "{err:?}");
    assert!(err.retryable());
    let err = DynamoProgress::new(client, tables, 30).last_seq(&RunId::new()).await.unwrap_err();
    assert!(matches!(&err, ProgressError::Unavailable(_)) && err.retryable(), "{err:?}");
}

// ---------------------------------------------------------------- history

fn principals(user: &str, groups: &[&str]) -> Vec<Principal> {
    let mut p = vec![Principal::User(user.into()), Principal::Public];
    p.extend(groups.iter().map(|g| Principal::Group((*g).into())));
    p
}

/// A run created at `t0 + seconds`, owned by `owners`.
fn run_at(workflow: &str, caller: &str, owners: Vec<Principal>, t0: DateTime<Utc>, seconds: i64) -> RunRecord {
    RunRecord::new(
        workflow.parse().unwrap(),
        json!({ "name": workflow }),
        json!({}),
        caller.parse().unwrap(),
        owners,
        t0 + Duration::seconds(seconds),
    )
}

/// Follows `next` from the start of the index and returns every run id, page by page.
async fn walk(history: &dyn RunHistory, index: RunIndex, visible_to: Vec<Principal>, limit: u32) -> Vec<Vec<RunId>> {
    let mut pages = Vec::new();
    let mut after = None;
    for _ in 0..100 {
        let page = history.list_runs(&RunQuery { index: index.clone(), visible_to: visible_to.clone(), limit, after }).await.unwrap();
        assert!(page.items.len() <= limit as usize);
        pages.push(page.items.iter().map(|r| r.id.clone()).collect());
        match page.next {
            Some(next) => after = Some(next),
            None => return pages,
        }
    }
    panic!("history never ended");
}

async fn history_contract(store: Arc<dyn RunStore>, history: Arc<dyn RunHistory>) {
    let t0 = Utc::now() - Duration::hours(1);
    let alice = || Principal::User("alice".into());
    let bob = || Principal::User("bob".into());
    // Oldest first: alice ×3 and one of another workflow, bob's private run in between,
    // and bob's run shared with group eng (alice is in it).
    let runs = [
        run_at("hist", "alice", vec![alice()], t0, 1),
        run_at("hist", "bob", vec![bob()], t0, 2),
        run_at("other", "alice", vec![alice()], t0, 3),
        run_at("hist", "alice", vec![alice()], t0, 4),
        run_at("hist", "bob", vec![bob(), Principal::Group("eng".into())], t0, 5),
        run_at("hist", "alice", vec![alice()], t0, 6),
    ];
    for r in &runs {
        store.create_run(r).await.unwrap();
    }
    let id = |i: usize| runs[i].id.clone();

    // by workflow, as alice (in eng): newest first, bob's private run never listed, paged by 2
    let pages = walk(history.as_ref(), RunIndex::Workflow("hist".into()), principals("alice", &["eng"]), 2).await;
    assert_eq!(pages.concat(), vec![id(5), id(4), id(3), id(0)]);
    assert_eq!(pages[0], vec![id(5), id(4)], "a full first page");
    // without the group, the shared run disappears too
    let pages = walk(history.as_ref(), RunIndex::Workflow("hist".into()), principals("alice", &[]), 10).await;
    assert_eq!(pages, vec![vec![id(5), id(3), id(0)]], "one page, no next once exhausted");
    // by caller: alice's own runs of every workflow
    let pages = walk(history.as_ref(), RunIndex::Caller("alice".into()), principals("alice", &[]), 3).await;
    assert_eq!(pages.concat(), vec![id(5), id(3), id(2), id(0)]);
    // a stranger sees nothing, and learns nothing from paging
    let pages = walk(history.as_ref(), RunIndex::Workflow("hist".into()), principals("mallory", &[]), 5).await;
    assert_eq!(pages, vec![Vec::<RunId>::new()]);
    assert_eq!(walk(history.as_ref(), RunIndex::Workflow("nope".into()), principals("alice", &[]), 5).await, vec![Vec::<RunId>::new()]);

    // summaries carry status, error and final totals, not the documents
    let lease = lease("h", 5);
    assert!(matches!(store.claim(&id(5), &lease, Utc::now()).await.unwrap(), Claim::Acquired(_)));
    let mut done = store.get_run(&id(5)).await.unwrap().unwrap();
    done.status = RunStatus::Failed;
    done.finished_at = Some(Utc::now());
    done.error = Some(ErrorInfo { code: "STEP_FAILED".into(), message: "x".into(), retryable: false });
    done.totals.add_call(&Usage { input_tokens: 3, ..Usage::default() }, Usd::from_pico(99));
    store.finish_run(&done, &lease).await.unwrap();
    let page = history
        .list_runs(&RunQuery { index: RunIndex::Workflow("hist".into()), visible_to: principals("alice", &[]), limit: 1, after: None })
        .await
        .unwrap();
    let top = &page.items[0];
    assert_eq!((top.id.clone(), top.status, top.totals, top.error.clone()), (id(5), RunStatus::Failed, done.totals, done.error.clone()));
    assert_eq!((top.workflow.as_str(), top.caller.as_str()), ("hist", "alice"));
    assert!(top.started_at.is_some() && top.finished_at.is_some());
    assert_eq!(top.created_at.timestamp_millis(), runs[5].created_at.timestamp_millis());
    assert!(page.next.is_some());
}

#[tokio::test]
async fn memory_history_honours_the_contract() {
    let store = Arc::new(MemoryStore::new());
    history_contract(store.clone(), store).await;
}

#[tokio::test]
async fn dynamodb_history_honours_the_contract() {
    let Some(moto) = moto("dynamodb_history_honours_the_contract").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    let store = Arc::new(DynamoStore::new(client, tables));
    history_contract(store.clone(), store).await;
}

#[tokio::test]
async fn dynamodb_history_bounds_what_one_page_reads_and_resumes_where_it_stopped() {
    let Some(moto) = moto("dynamodb_history_bounds_what_one_page_reads_and_resumes_where_it_stopped").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    // 2 runs a read, 2 reads a call: 4 runs examined per call at most.
    let store = DynamoStore::new(client, tables).with_history_bound(2, 2);
    let t0 = Utc::now() - Duration::hours(1);
    let mine = run_at("busy", "alice", vec![Principal::User("alice".into())], t0, 0);
    store.create_run(&mine).await.unwrap();
    for i in 1..=6 {
        store.create_run(&run_at("busy", "bob", vec![Principal::User("bob".into())], t0, i)).await.unwrap();
    }
    let pages = walk(&store, RunIndex::Workflow("busy".into()), principals("alice", &[]), 10).await;
    assert_eq!(pages, vec![vec![], vec![mine.id.clone()]], "an empty page with a cursor, then the run");
}

// ---------------------------------------------------------------- analytics

fn day() -> NaiveDate {
    Utc::now().date_naive()
}

/// A run of `workflow` that finished at noon of `day`, after `latency_ms`, with these steps
/// (id, status, cost, latency); its totals are the steps' sums.
fn finished_run(
    workflow: &str,
    day: NaiveDate,
    status: RunStatus,
    latency_ms: i64,
    steps: &[(&str, StepStatus, u64, u64)],
) -> (RunRecord, Vec<StepRecord>) {
    let noon = day.and_hms_opt(12, 0, 0).unwrap().and_utc();
    let mut run = RunRecord::new(
        workflow.parse().unwrap(),
        json!({}),
        json!({}),
        "alice".parse().unwrap(),
        vec![Principal::User("alice".into()), Principal::Group("eng".into())],
        noon - Duration::seconds(5),
    );
    run.status = status;
    run.started_at = Some(noon - Duration::milliseconds(latency_ms));
    run.finished_at = Some(noon);
    let records: Vec<StepRecord> = steps
        .iter()
        .map(|(id, st, pico, ms)| {
            let mut r = StepRecord::settled(StepId::parse(id).unwrap(), *st, None, noon);
            r.attempts = u32::from(!matches!(st, StepStatus::Skipped));
            r.cost = Usd::from_pico(*pico);
            r.latency_ms = *ms;
            r
        })
        .collect();
    for r in records.iter().filter(|r| r.attempts > 0) {
        run.totals.add_call(&r.usage, r.cost);
    }
    (run, records)
}

fn sums(runs: u64, failures: u64, pico: u64, latency_ms: u64) -> CostSums {
    CostSums { runs, failures, cost: Usd::from_pico(pico), latency_ms, cached: 0 }
}

async fn analytics_contract(analytics: Arc<dyn Analytics>) {
    let today = day();
    let yesterday = today.pred_opt().unwrap();
    let alice = Principal::User("alice".into());
    let eng = Principal::Group("eng".into());
    use StepStatus::*;

    // recorded once per owner, however often it is called
    let (ok, ok_steps) =
        finished_run("triage", today, RunStatus::Completed, 1_500, &[("extract", Completed, 300, 100), ("reply", Completed, 700, 900)]);
    assert_eq!(analytics.record_run(&ok, &ok_steps).await.unwrap(), Recorded { added: 2, already: 0 });
    assert_eq!(analytics.record_run(&ok, &ok_steps).await.unwrap(), Recorded { added: 0, already: 2 });
    let (bad, bad_steps) = finished_run("triage", today, RunStatus::Failed, 500, &[("extract", Completed, 301, 200), ("reply", Failed, 0, 50)]);
    analytics.record_run(&bad, &bad_steps).await.unwrap();
    // an unfinished run has nothing to add
    let mut running = ok.clone();
    running.id = RunId::new();
    running.status = RunStatus::Running;
    assert_eq!(analytics.record_run(&running, &ok_steps).await, Err(AnalyticsError::Unfinished(running.id.clone())));

    let costs = analytics.costs(&alice, today, today).await.unwrap();
    assert_eq!(costs.len(), 1);
    let triage = &costs[0];
    assert_eq!(triage.workflow, "triage");
    assert_eq!(triage.totals, sums(2, 1, 1_301, 2_000));
    assert_eq!(triage.totals.avg_cost(), Usd::from_pico(650), "1301 / 2 rounds down");
    assert_eq!(triage.totals.failure_rate(), "0.5000");
    let step = |w: &chainrun_core::analytics::WorkflowCosts, id: &str| w.steps[&StepId::parse(id).unwrap()];
    assert_eq!(step(triage, "extract"), sums(2, 0, 601, 300));
    assert_eq!(step(triage, "reply"), sums(2, 1, 700, 950));
    assert_eq!(analytics.costs(&eng, today, today).await.unwrap(), costs, "every owner has the run");
    assert!(analytics.costs(&Principal::User("bob".into()), yesterday, today).await.unwrap().is_empty());

    // days are separate rows; a period sums them. Workflows come most expensive first.
    let (old, old_steps) = finished_run("triage", yesterday, RunStatus::Completed, 1_000, &[("extract", Completed, 10, 10), ("skip", Skipped, 0, 0)]);
    analytics.record_run(&old, &old_steps).await.unwrap();
    let odd = "odd#WF#name#P#7 ✓";
    let (other, other_steps) = finished_run(odd, today, RunStatus::Completed, 10, &[("only", Completed, 5_000, 3)]);
    analytics.record_run(&other, &other_steps).await.unwrap();
    assert_eq!(analytics.costs(&alice, yesterday, yesterday).await.unwrap()[0].totals, sums(1, 0, 10, 1_000));
    let both = analytics.costs(&alice, yesterday, today).await.unwrap();
    assert_eq!(both.iter().map(|w| w.workflow.as_str()).collect::<Vec<_>>(), [odd, "triage"]);
    assert_eq!(both[1].totals, sums(3, 1, 1_311, 3_000));
    assert_eq!(step(&both[1], "extract"), sums(3, 0, 611, 310));
    assert!(!both[1].steps.contains_key(&StepId::parse("skip").unwrap()), "a skipped step never ran");
    assert!(analytics.costs(&alice, today + chrono::Days::new(1), today + chrono::Days::new(3)).await.unwrap().is_empty());
    // by day: one entry per day and workflow, oldest day first, each day's as costs gives it
    let by_day = analytics.costs_by_day(&alice, yesterday, today).await.unwrap();
    let entries: Vec<(chrono::NaiveDate, &str)> = by_day.iter().map(|d| (d.day, d.costs.workflow.as_str())).collect();
    assert_eq!(entries, [(yesterday, "triage"), (today, odd), (today, "triage")], "within a day, most expensive first");
    assert_eq!(by_day[0].costs, analytics.costs(&alice, yesterday, yesterday).await.unwrap()[0]);
    assert_eq!(by_day[2].costs, costs[0]);
    assert!(analytics.costs_by_day(&alice, today + chrono::Days::new(1), today + chrono::Days::new(3)).await.unwrap().is_empty());

    // a 200-step run keeps every step (its counters span several rows). Recorded one after
    // another: moto does not serialise concurrent writes to one item (it loses ADDs, even
    // plain UpdateItem ones), so concurrency cannot be checked against it. DynamoDB's ADD
    // is atomic, and the adapter retries transactions that collide.
    let steps: Vec<(String, u64)> = (0..200).map(|i| (format!("s{i:03}"), i + 1)).collect();
    let step_specs: Vec<(&str, StepStatus, u64, u64)> = steps.iter().map(|(id, c)| (id.as_str(), Completed, *c, 2)).collect();
    for _ in 0..3 {
        let (r, s) = finished_run("wide", today, RunStatus::Completed, 100, &step_specs);
        assert_eq!(analytics.record_run(&r, &s).await.unwrap().added, 2);
    }
    let wide = analytics.costs(&eng, today, today).await.unwrap().into_iter().find(|w| w.workflow == "wide").unwrap();
    assert_eq!(wide.totals, sums(3, 0, 3 * 20_100, 300));
    assert_eq!(wide.steps.len(), 200);
    assert_eq!(step(&wide, "s199"), sums(3, 0, 3 * 200, 6));
    assert_eq!(wide.steps_by_avg_cost()[0].0.as_str(), "s199");

    // A step the response cache answered counts as run, at no cost, and as reused.
    let earlier = today - Duration::days(5);
    let (r, mut s) = finished_run("reuse", earlier, RunStatus::Completed, 100, &[("label", Completed, 0, 1)]);
    s[0].attempts = 0;
    s[0].detail = Some(json!({ "response_cache": "hit", "stored_at": "2026-12-01T00:00:00Z" }));
    analytics.record_run(&r, &s).await.unwrap();
    let reuse = &analytics.costs(&alice, earlier, earlier).await.unwrap()[0];
    assert_eq!(step(reuse, "label"), CostSums { cached: 1, ..sums(1, 0, 0, 1) });
    assert_eq!(reuse.totals.cached, 1);
}

#[tokio::test]
async fn memory_analytics_honour_the_contract() {
    analytics_contract(Arc::new(MemoryAnalytics::new())).await;
}

#[tokio::test]
async fn dynamodb_analytics_honour_the_contract() {
    let Some(moto) = moto("dynamodb_analytics_honour_the_contract").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    analytics_contract(Arc::new(DynamoAnalytics::new(client, tables))).await;
}

// ---------------------------------------------------------------- daily spend

/// A hold of `run`'s call (step `s`, attempt 1, by runner `holder`) on `owner`'s `day`.
fn day_hold(run: &RunId, owner: &str, day: NaiveDate, holder: &str, amount: u64) -> DayHold {
    DayHold {
        run: run.clone(),
        step: StepId::parse("s").unwrap(),
        item: None,
        attempt: 1,
        holder: holder.into(),
        owner: owner.into(),
        day,
        amount: Usd::from_pico(amount),
    }
}

/// `atomic`: whether the backend serializes conditional writes to one item, as DynamoDB
/// does. The local moto server does not (measured: 11 of 20 concurrent holds admitted
/// against room for 10 in 2 of 25 runs), so against it the concurrent part is skipped.
async fn daily_spend_contract(spend: Arc<dyn DailySpend>, atomic: bool) {
    let today = day();
    let usd = Usd::from_pico;
    let counter = |charged: u64, committed: u64| DaySpend { charged: usd(charged), committed: usd(committed), lost: Usd::ZERO };
    let run = RunId::new();
    // Each call is named by its holder here (the rest of the name stays the same).
    let hold = |owner: &str, day: NaiveDate, holder: &str, amount: u64| day_hold(&run, owner, day, holder, amount);
    assert_eq!(spend.day("alice", today).await.unwrap(), DaySpend::default(), "no counter yet is zero");
    // Holds up to the cap are admitted; one pico-dollar more is not, and changes nothing.
    assert_eq!(spend.reserve(&hold("alice", today, "r1", 600), usd(1_000)).await.unwrap(), Ok(()));
    assert_eq!(spend.reserve(&hold("alice", today, "r2", 400), usd(1_000)).await.unwrap(), Ok(()));
    assert_eq!(spend.reserve(&hold("alice", today, "r3", 1), usd(1_000)).await.unwrap(), Err(counter(0, 1_000)));
    assert_eq!(spend.reserve(&hold("alice", today, "r4", 2_000), usd(1_000)).await.unwrap(), Err(counter(0, 1_000)), "larger than the cap itself");
    // Settling replaces a hold by its charge, also when the charge is smaller or zero.
    spend.settle(&hold("alice", today, "r1", 600), Settlement::Charged(usd(250))).await.unwrap();
    spend.settle(&hold("alice", today, "r2", 400), Settlement::Charged(Usd::ZERO)).await.unwrap();
    assert_eq!(spend.day("alice", today).await.unwrap(), counter(250, 250));
    assert_eq!(spend.reserve(&hold("alice", today, "r5", 750), usd(1_000)).await.unwrap(), Ok(()));
    assert_eq!(spend.reserve(&hold("alice", today, "r6", 1), usd(1_000)).await.unwrap(), Err(counter(250, 1_000)));
    // Owners and days are separate counters.
    assert_eq!(spend.reserve(&hold("bob", today, "r7", 1_000), usd(1_000)).await.unwrap(), Ok(()));
    let tomorrow = today.succ_opt().unwrap();
    assert_eq!(spend.reserve(&hold("alice", tomorrow, "r8", 1_000), usd(1_000)).await.unwrap(), Ok(()));
    assert_eq!(spend.day("alice", today).await.unwrap(), counter(250, 1_000));

    if !atomic {
        return;
    }
    // Concurrent holds never pass on the same room: of 20 holds of 100 against a cap of
    // 1,000, exactly 10 are admitted, and exactly their 10 holds are recorded.
    let concurrent = RunId::new();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (spend, hold) = (spend.clone(), day_hold(&concurrent, "carol", today, &format!("c{i}"), 100));
            tokio::spawn(async move { spend.reserve(&hold, usd(1_000)).await.unwrap().is_ok() })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        admitted += usize::from(task.await.unwrap());
    }
    assert_eq!(admitted, 10);
    assert_eq!(spend.day("carol", today).await.unwrap(), counter(0, 1_000));
    assert_eq!(spend.holds(&concurrent).await.unwrap().len(), 10);
}

/// Holds are durable and named: listed by run until settled, settled once whoever settles
/// them, and a lost call stays counted.
async fn day_holds_contract(spend: Arc<dyn DailySpend>) {
    let today = day();
    let usd = Usd::from_pico;
    let (run, other) = (RunId::new(), RunId::new());
    assert_eq!(spend.holds(&run).await.unwrap(), [], "no holds yet");

    // A reservation records its hold, named and read back whole; another run's list is its own.
    let mut first = day_hold(&run, "dave", today, "inv-1/01J", 300);
    first.item = Some(7);
    first.attempt = 2;
    let second = day_hold(&run, "dave", today, "inv-1/01J", 200);
    spend.reserve(&first, usd(1_000)).await.unwrap().unwrap();
    spend.reserve(&second, usd(1_000)).await.unwrap().unwrap();
    spend.reserve(&day_hold(&other, "dave", today, "inv-9/01K", 100), usd(1_000)).await.unwrap().unwrap();
    let mut listed = spend.holds(&run).await.unwrap();
    listed.sort_by_key(|h| h.amount);
    assert_eq!(listed, [second.clone(), first.clone()]);
    assert_eq!(spend.holds(&other).await.unwrap().len(), 1, "holds of one run are not another's");

    // The same call reserved twice would count it twice: refused, and nothing changes.
    let err = spend.reserve(&first, usd(1_000)).await.unwrap_err();
    assert!(matches!(err, StoreError::Rejected(_)), "{err:?}");
    assert_eq!(spend.day("dave", today).await.unwrap().committed, usd(600));

    // A refused reservation records no hold.
    let refused = day_hold(&run, "dave", today, "inv-2/01L", 500);
    assert_eq!(spend.reserve(&refused, usd(1_000)).await.unwrap().map_err(|c| c.committed), Err(usd(600)));
    assert_eq!(spend.holds(&run).await.unwrap().len(), 2);

    // Settling removes the hold, and settling it again (a zombie after its successor)
    // changes nothing, whatever it says.
    spend.settle(&second, Settlement::Charged(usd(150))).await.unwrap();
    let after = DaySpend { charged: usd(150), committed: usd(550), lost: Usd::ZERO };
    assert_eq!(spend.day("dave", today).await.unwrap(), after);
    assert_eq!(spend.holds(&run).await.unwrap(), [first.clone()]);
    spend.settle(&second, Settlement::Charged(usd(150))).await.unwrap();
    spend.settle(&second, Settlement::Lost).await.unwrap();
    assert_eq!(spend.day("dave", today).await.unwrap(), after, "a hold settled already changes nothing");

    // A lost call stays committed at its worst case, moved from held to lost.
    spend.settle(&first, Settlement::Lost).await.unwrap();
    let lost = DaySpend { charged: usd(150), committed: usd(550), lost: usd(300) };
    assert_eq!(spend.day("dave", today).await.unwrap(), lost);
    assert_eq!(lost.held(), usd(100), "only the other run's hold is held");
    spend.settle(&first, Settlement::Charged(usd(10))).await.unwrap();
    assert_eq!(spend.day("dave", today).await.unwrap(), lost, "the zombie's late charge changes nothing");
    assert_eq!(spend.holds(&run).await.unwrap(), []);
    assert_eq!(
        spend.reserve(&day_hold(&run, "dave", today, "inv-3/01M", 451), usd(1_000)).await.unwrap().map_err(|c| c.committed),
        Err(usd(550)),
        "the cap still counts the lost call"
    );
}

#[tokio::test]
async fn memory_daily_spend_honours_the_contract() {
    daily_spend_contract(Arc::new(MemoryDailySpend::new()), true).await;
}

#[tokio::test]
async fn dynamodb_daily_spend_honours_the_contract() {
    let Some(moto) = moto("dynamodb_daily_spend_honours_the_contract").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    daily_spend_contract(Arc::new(DynamoDailySpend::new(client, tables)), false).await;
}

#[tokio::test]
async fn memory_day_holds_honour_the_contract() {
    day_holds_contract(Arc::new(MemoryDailySpend::new())).await;
}

#[tokio::test]
async fn dynamodb_day_holds_honour_the_contract() {
    let Some(moto) = moto("dynamodb_day_holds_honour_the_contract").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    day_holds_contract(Arc::new(DynamoDailySpend::new(client, tables))).await;
}

// ---------------------------------------------------------------- idempotency keys

async fn idempotency_contract(keys: Arc<dyn Idempotency>) {
    let now = Utc::now();
    let answer = StoredResponse { status: 202, body: r#"{"run_id":"01J…","é":"✓"}"#.into() };
    assert_eq!(keys.begin("alice", "k1", "fp-a", now).await.unwrap(), KeyClaim::New);
    assert_eq!(keys.begin("alice", "k1", "fp-a", now).await.unwrap(), KeyClaim::InProgress, "a repeat while the first is handled");
    assert_eq!(keys.begin("alice", "k1", "fp-b", now).await.unwrap(), KeyClaim::Mismatch, "the key names another request");
    assert_eq!(keys.begin("bob", "k1", "fp-b", now).await.unwrap(), KeyClaim::New, "keys are per caller");
    keys.complete("alice", "k1", "fp-a", &answer).await.unwrap();
    assert_eq!(keys.begin("alice", "k1", "fp-a", now).await.unwrap(), KeyClaim::Replay(answer.clone()));
    assert_eq!(keys.begin("alice", "k1", "fp-b", now).await.unwrap(), KeyClaim::Mismatch);
    keys.abandon("alice", "k1", "fp-a").await.unwrap();
    assert_eq!(keys.begin("alice", "k1", "fp-a", now).await.unwrap(), KeyClaim::Replay(answer), "an answered key is never given up");

    // A claim given up, or left pending past its time (its request died), is free again.
    assert_eq!(keys.begin("alice", "k2", "fp", now).await.unwrap(), KeyClaim::New);
    keys.abandon("alice", "k2", "fp").await.unwrap();
    assert_eq!(keys.begin("alice", "k2", "fp", now).await.unwrap(), KeyClaim::New);
    let later = now + Duration::seconds(KEY_PENDING_SECS + 1);
    assert_eq!(keys.begin("alice", "k2", "fp", later).await.unwrap(), KeyClaim::New);
}

#[tokio::test]
async fn memory_idempotency_honours_the_contract() {
    idempotency_contract(Arc::new(chainrun_core::memory::MemoryIdempotency::new())).await;
}

#[tokio::test]
async fn dynamodb_idempotency_honours_the_contract() {
    let Some(moto) = moto("dynamodb_idempotency_honours_the_contract").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    idempotency_contract(Arc::new(chainrun_core::aws::DynamoIdempotency::new(client, tables))).await;
}

/// Revisions: a finished run is queued again at its next revision, conditionally, its
/// checkpoints and map items kept apart per revision, an override's record written with it.
async fn revisions_contract(store: Arc<dyn RunStore>) {
    use chainrun_core::revision::{Revision, RevisionEnd, RevisionKind};
    let run = new_run();
    store.create_run(&run).await.unwrap();
    let one = lease("one", 5);
    assert!(matches!(store.claim(&run.id, &one, Utc::now()).await.unwrap(), Claim::Acquired(_)));
    let (a, b, map) = (StepId::parse("a").unwrap(), StepId::parse("b").unwrap(), StepId::parse("m").unwrap());
    store.save_step(&run.id, &one, &step("a", json!("first a"))).await.unwrap();
    store.save_step(&run.id, &one, &step("b", json!({ "first": "b" }))).await.unwrap();
    let item = |text: &str| ItemRecord {
        index: 0,
        status: StepStatus::Completed,
        attempts: 1,
        output: Some(json!(text)),
        text: Some(text.into()),
        usage: Usage::default(),
        cost: Usd::from_pico(1),
        calls: 1,
        error: None,
        lost: Lost::default(),
        in_flight: None,
    };
    store.save_item(&run.id, &one, &map, 0, &item("first item")).await.unwrap();
    let approve = ReviewDecision { decision: Verdict::Approve, output: None, comment: None, by: "bob".parse().unwrap(), at: Utc::now() };
    store.decide(&run.id, &b, &approve).await.unwrap();
    store.decide(&run.id, &a, &approve).await.unwrap();
    // Input answers: on `m` (run again below) and on `a` (kept).
    let answer = |n: i64| {
        let mut state = chainrun_core::input::InputState { version: 1, ..Default::default() };
        state.turns.push(input_turn(json!({ "n": n }), None));
        state
    };
    store.record_input(&run.id, &map, 0, &answer(1), false).await.unwrap();
    store.record_input(&run.id, &a, 0, &answer(2), false).await.unwrap();

    let revision = |n: u32, kind: RevisionKind, rerun: Vec<StepId>| Revision {
        revision: n,
        kind,
        step: b.clone(),
        by: "alice".parse().unwrap(),
        at: whole_ms(Utc::now()),
        comment: Some("again ✓".into()),
        rerun,
        previous: RevisionEnd {
            status: RunStatus::Completed,
            finished_at: None,
            error: None,
            totals: Totals { model_calls: 2, ..Totals::default() },
        },
        budget: None,
    };
    let first = revision(1, RevisionKind::Retry, vec![b.clone(), map.clone()]);
    assert_eq!(store.start_revision(&run.id, &first, None).await.unwrap(), RevisionOutcome::NotFinished(RunStatus::Running), "a running run");
    let mut done = store.get_run(&run.id).await.unwrap().unwrap();
    (done.status, done.finished_at, done.output) = (RunStatus::Completed, Some(Utc::now()), Some(json!("the end")));
    done.totals.model_calls = 2;
    store.finish_run(&done, &one).await.unwrap();
    assert_eq!(store.start_revision(&run.id, &revision(2, RevisionKind::Retry, vec![]), None).await.unwrap(), RevisionOutcome::Moved(0));
    assert_eq!(store.start_revision(&RunId::new(), &first, None).await.unwrap(), RevisionOutcome::NotFound);

    assert_eq!(store.start_revision(&run.id, &first, None).await.unwrap(), RevisionOutcome::Started);
    assert_eq!(store.start_revision(&run.id, &first, None).await.unwrap(), RevisionOutcome::Started, "a retried write (its reply lost)");
    let queued = store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!((queued.status, queued.revision, queued.finished_at, queued.output.as_ref()), (RunStatus::Queued, 1, None, None));
    assert_eq!(queued.revisions, vec![first.clone()]);
    assert_eq!(queued.totals.model_calls, 2, "the totals so far stay");
    assert_eq!((queued.decisions.contains_key(&a), queued.decisions.contains_key(&b)), (true, false), "a review run again is asked again");
    assert_eq!((queued.inputs.contains_key(&a), queued.inputs.contains_key(&map)), (true, false), "and so is an input step");
    assert!(store.due(Utc::now() + Duration::hours(1), 100).await.unwrap().contains(&run.id), "queued for the sweeper too");
    assert_eq!(
        store.start_revision(&run.id, &revision(2, RevisionKind::Retry, vec![]), None).await.unwrap(),
        RevisionOutcome::NotFinished(RunStatus::Queued)
    );

    // Revision 1's checkpoints overwrite nothing of revision 0's.
    let two = lease("two", 5);
    let Claim::Acquired(claimed) = store.claim(&run.id, &two, Utc::now()).await.unwrap() else { panic!("claim the revision") };
    assert_eq!(claimed.revision, 1);
    let mut again = step("b", json!({ "second": "b" }));
    again.revision = 1;
    store.save_step(&run.id, &two, &again).await.unwrap();
    store.save_item(&run.id, &two, &map, 1, &item("second item")).await.unwrap();
    // The answers the revision kept are all its runner saw: it may park.
    let waiting = Waiting { kind: WaitKind::Paused, by: None, since: Utc::now(), reason: None, steps: vec![], deadline: None };
    assert!(store.park(&run.id, &two, &waiting, Answered::of(&claimed)).await.unwrap());
    store
        .request_control(&run.id, &ControlRequest { kind: ControlKind::Cancel, by: "alice".parse().unwrap(), at: Utc::now(), reason: None })
        .await
        .unwrap();
    let Claim::Acquired(_) = store.claim(&run.id, &two, Utc::now()).await.unwrap() else { panic!("claimed again") };
    let all = store.get_steps(&run.id).await.unwrap();
    assert_eq!(all.len(), 3, "{all:?}");
    let now = claimed.records_at(all.clone(), 1);
    let outputs = |records: &[StepRecord]| {
        let mut v: Vec<(String, u32, Value)> = records.iter().map(|r| (r.step_id.to_string(), r.revision, r.output.clone().unwrap())).collect();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    assert_eq!(outputs(&now), [("a".into(), 0, json!("first a")), ("b".into(), 1, json!({ "second": "b" }))]);
    assert_eq!(outputs(&claimed.records_at(all, 0)), [("a".into(), 0, json!("first a")), ("b".into(), 0, json!({ "first": "b" }))]);
    assert_eq!(store.get_items(&run.id, &map, 0).await.unwrap()[0].text.as_deref(), Some("first item"));
    assert_eq!(store.get_items(&run.id, &map, 1).await.unwrap()[0].text.as_deref(), Some("second item"));

    // An override writes the step's record of the new revision with it.
    let mut end = store.get_run(&run.id).await.unwrap().unwrap();
    (end.status, end.finished_at) = (RunStatus::Failed, Some(Utc::now()));
    store.finish_run(&end, &two).await.unwrap();
    let second =
        Revision { previous: RevisionEnd { status: RunStatus::Failed, ..first.previous.clone() }, ..revision(2, RevisionKind::Override, vec![]) };
    let mut set = StepRecord::settled(b.clone(), StepStatus::Completed, None, Utc::now());
    (set.output, set.text, set.revision) = (Some(json!({ "by": "hand", "n": 1.5e300 })), Some("by hand".into()), 2);
    assert_eq!(store.start_revision(&run.id, &second, Some(&set)).await.unwrap(), RevisionOutcome::Started);
    let stored = store.get_run(&run.id).await.unwrap().unwrap();
    assert_eq!((stored.revision, stored.revisions.len(), stored.error.as_ref()), (2, 2, None));
    let at_two = stored.records_at(store.get_steps(&run.id).await.unwrap(), 2);
    assert_eq!(at_two.iter().find(|r| r.step_id == b).unwrap(), &set, "documents round-trip exactly");
}

#[tokio::test]
async fn memory_store_honours_the_revisions_contract() {
    revisions_contract(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn dynamodb_store_honours_the_revisions_contract() {
    let Some(moto) = moto("dynamodb_store_honours_the_revisions_contract").await else { return };
    let (client, tables) = moto_tables(&moto).await;
    revisions_contract(Arc::new(DynamoStore::new(client, tables))).await;
}
