//! One contract, two implementations: every store/progress behaviour the engine and API
//! rely on is checked against the in-memory adapters and against the DynamoDB adapters
//! on a moto server this test starts (from the project venv; `make test` provides it, and
//! `CHAINRUN_MOTO_SERVER` may point at another `moto_server` binary).
#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection, ProjectionType, ScalarAttributeType,
};
use chainrun_core::aws::{DynamoProgress, DynamoStore};
use chainrun_core::config::Tables;
use chainrun_core::ids::{Principal, RunId, StepId};
use chainrun_core::memory::{MemoryProgress, MemoryStore};
use chainrun_core::money::Usd;
use chainrun_core::ports::*;
use chainrun_core::pricing::Usage;
use chainrun_core::run::*;
use chrono::{Duration, Utc};
use serde_json::{Value, json};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

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
        "wf".into(),
        json!({ "name": "wf", "steps": [{ "id": "a", "type": "llm", "prompt": "é ✓ \"quoted\"" }], "n": 1.5e300 }),
        json!({ "empty": "", "nested": { "list": [1, 2.25, null, true] } }),
        "alice".into(),
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
    assert_eq!(s.store.create_run(&run).await, Err(StoreError::AlreadyExists(run.id.clone())));
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
            data: json!({ "seq": seq, "s": "" }),
        };
        let row = ProgressRow {
            run_id: run.id.clone(),
            workflow: "wf".into(),
            status: RunStatus::Running,
            current_step: (seq % 2 == 1).then(|| StepId::parse("a").unwrap()),
            totals: Totals::default(),
            last_seq: seq,
            updated_at: Utc::now(),
        };
        s.progress.publish(&event, &row, &owners).await.unwrap();
    }
    let dup = Event { run_id: run.id.clone(), seq: 3, at: Utc::now(), kind: EventType::RunFailed, step_id: None, attempt: None, data: json!({}) };
    let row = ProgressRow {
        run_id: run.id.clone(),
        workflow: "wf".into(),
        status: RunStatus::Failed,
        current_step: None,
        totals: Totals::default(),
        last_seq: 3,
        updated_at: Utc::now(),
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
    }
    assert!(s.progress.progress_of(&Principal::User("mallory".into()), &run.id).await.unwrap().is_none());

    // feeds list newest runs first
    // Ids are ULIDs: make the newer run's id a millisecond later, as a later start would be
    // (two ids minted in the same millisecond have no defined order).
    let mut newer = new_run();
    let ts = ulid::Ulid::from_string(run.id.as_str()).unwrap().timestamp_ms() + 1;
    newer.id = RunId::parse(&ulid::Ulid::from_parts(ts, 0).to_string()).unwrap();
    s.store.create_run(&newer).await.unwrap();
    let event =
        Event { run_id: newer.id.clone(), seq: 1, at: Utc::now(), kind: EventType::RunStarted, step_id: None, attempt: None, data: json!({}) };
    let row = ProgressRow {
        run_id: newer.id.clone(),
        workflow: "wf".into(),
        status: RunStatus::Running,
        current_step: None,
        totals: Totals::default(),
        last_seq: 1,
        updated_at: Utc::now(),
    };
    s.progress.publish(&event, &row, &[alice()]).await.unwrap();
    let feed = s.progress.feed(&alice(), 10).await.unwrap();
    assert_eq!(feed.iter().map(|r| r.run_id.clone()).collect::<Vec<_>>(), vec![newer.id.clone(), run.id.clone()]);
}

#[tokio::test]
async fn memory_adapters_honour_the_contract() {
    contract(Subject { store: Arc::new(MemoryStore::new()), progress: Arc::new(MemoryProgress::new()) }).await;
}

/// A moto server on a free loopback port, stopped on drop.
struct Moto {
    child: Child,
    url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_binary() -> PathBuf {
    std::env::var_os("CHAINRUN_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server"))
}

async fn start_moto() -> Moto {
    let binary = moto_binary();
    assert!(binary.exists(), "{} not found: run `make venv` (or set CHAINRUN_MOTO_SERVER)", binary.display());
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(&binary).args(["-H", "127.0.0.1", "-p", &port.to_string()]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let moto = Moto { child, url: format!("http://127.0.0.1:{port}") };
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return moto;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("moto_server did not start on port {port}");
}

/// Creates the tables exactly as `infra/tables.json` defines them.
async fn create_tables(client: &aws_sdk_dynamodb::Client) -> Tables {
    let defs: Value = serde_json::from_str(include_str!("../../infra/tables.json")).unwrap();
    let mut names = std::collections::HashMap::new();
    for t in defs["tables"].as_array().unwrap() {
        let name = t["local_name"].as_str().unwrap();
        let attr_type = |v: &Value| if v == "N" { ScalarAttributeType::N } else { ScalarAttributeType::S };
        let key = |hash: &str, range: &str| {
            vec![
                KeySchemaElement::builder().attribute_name(hash).key_type(KeyType::Hash).build().unwrap(),
                KeySchemaElement::builder().attribute_name(range).key_type(KeyType::Range).build().unwrap(),
            ]
        };
        let mut req = client.create_table().table_name(name).billing_mode(BillingMode::PayPerRequest);
        for (attr, ty) in t["attributes"].as_object().unwrap() {
            req = req.attribute_definitions(AttributeDefinition::builder().attribute_name(attr).attribute_type(attr_type(ty)).build().unwrap());
        }
        req = req.set_key_schema(Some(key(t["key"]["hash"].as_str().unwrap(), t["key"]["range"].as_str().unwrap())));
        for g in t["gsis"].as_array().unwrap() {
            req = req.global_secondary_indexes(
                GlobalSecondaryIndex::builder()
                    .index_name(g["name"].as_str().unwrap())
                    .set_key_schema(Some(key(g["hash"].as_str().unwrap(), g["range"].as_str().unwrap())))
                    .projection(Projection::builder().projection_type(ProjectionType::All).build())
                    .build()
                    .unwrap(),
            );
        }
        req.send().await.unwrap();
        names.insert(t["env"].as_str().unwrap().to_owned(), name.to_owned());
    }
    Tables {
        runs: names["CHAINRUN_RUNS_TABLE"].clone(),
        events: names["CHAINRUN_EVENTS_TABLE"].clone(),
        progress: names["CHAINRUN_PROGRESS_TABLE"].clone(),
        workflows: names["CHAINRUN_WORKFLOWS_TABLE"].clone(),
    }
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
    let tables = create_tables(&client).await;
    (client, tables)
}

#[tokio::test]
async fn dynamodb_adapters_honour_the_contract() {
    let moto = start_moto().await;
    let (client, tables) = moto_tables(&moto).await;
    contract(Subject {
        store: Arc::new(DynamoStore::new(client.clone(), tables.clone())),
        progress: Arc::new(DynamoProgress::new(client, tables, 30)),
    })
    .await;
}

#[tokio::test]
async fn dynamodb_refuses_oversize_checkpoints_with_a_clear_error() {
    let moto = start_moto().await;
    let (client, tables) = moto_tables(&moto).await;
    let store = DynamoStore::new(client, tables);
    let run = new_run();
    store.create_run(&run).await.unwrap();
    let l = lease("one", 5);
    store.claim(&run.id, &l, Utc::now()).await.unwrap();
    let err = store.save_step(&run.id, &l, &step("a", json!("x".repeat(500 * 1024)))).await.unwrap_err();
    assert!(matches!(&err, StoreError::TooLarge(m) if m.contains("step a") && m.contains("400 KB")), "{err:?}");
}
