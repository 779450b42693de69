//! Store traffic benchmark (`make bench`): how many DynamoDB requests a run costs per step.
//!
//! Runs the sample workflow (`infra/samples/feedback-analysis.json`, its definition and
//! input) through the real [`Engine`] and the real DynamoDB adapters against a moto server
//! this program starts on a loopback port and stops again. The model is the in-process
//! [`ScriptedModel`] (replies that satisfy the sample's output formats): the point is store
//! traffic, not model behaviour.
//!
//! Every request the DynamoDB client sends is counted by an interceptor on its config, once
//! per attempt (`read_before_transmit` runs for each retry too), from the run's claim to
//! the end of `Engine::execute` (the run's end is stored and announced). Creating the run
//! is the API's request and is not counted; the runner's cost roll-up after the run ends is
//! counted separately and printed on its own line. A transaction counts as one request; the
//! items it writes are counted too, condition checks apart.
//!
//! The run is repeated with 1, 2 and 3 owners (the caller; a group; the admin feed), and
//! twice more with one owner for comparison (not part of W): with a daily spend cap on the
//! caller, and without the `RUNNING` checkpoint. The last line is the one-owner run with
//! the engine wired as the runner wires it: `store: writes_per_step=W reads_per_step=R`.

use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{BehaviorVersion, ConfigBag, Credentials, Intercept, Region, RuntimeComponents};
use chainrun_core::aws::{DynamoAnalytics, DynamoDailySpend, DynamoProgress, DynamoStore};
use chainrun_core::config::Tables;
use chainrun_core::engine::{Engine, EngineConfig, Outcome};
use chainrun_core::ids::Principal;
use chainrun_core::memory::{Script, ScriptedModel};
use chainrun_core::ports::{Analytics, Claim, Lease, ProgressReader, RunStore};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::run::{RunRecord, RunStatus};
use chainrun_core::spend::DailyCaps;
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

const SAMPLE: &str = include_str!("../../infra/samples/feedback-analysis.json");

/// DynamoDB operations that write; every other operation the adapters use reads.
const WRITE_OPS: [&str; 5] = ["PutItem", "UpdateItem", "DeleteItem", "TransactWriteItems", "BatchWriteItem"];
/// Operations listed in the breakdown even when the run makes none of them.
const LISTED_OPS: [&str; 8] = ["PutItem", "UpdateItem", "DeleteItem", "TransactWriteItems", "BatchWriteItem", "GetItem", "Query", "BatchGetItem"];

#[path = "../tests/support/moto.rs"]
mod moto;
use moto::{BoxError, create_tables, start_moto};

/// What the interceptor saw while counting.
#[derive(Debug, Default, Clone)]
struct Tally {
    /// Requests (attempts) per DynamoDB operation.
    ops: BTreeMap<String, u64>,
    /// Requests per purpose, told from the request body (see [`purpose`]).
    purposes: BTreeMap<String, u64>,
    /// Items written: 1 per PutItem/UpdateItem/DeleteItem, each Put/Update/Delete of a
    /// transaction or batch.
    items_written: u64,
    /// Condition checks inside transactions (they write nothing but are billed as writes).
    condition_checks: u64,
}

impl Tally {
    fn count(&self, write: bool) -> u64 {
        self.ops.iter().filter(|(op, _)| WRITE_OPS.contains(&op.as_str()) == write).map(|(_, n)| n).sum()
    }

    fn writes(&self) -> u64 {
        self.count(true)
    }

    fn reads(&self) -> u64 {
        self.count(false)
    }
}

/// Counts DynamoDB requests by operation and purpose while switched on.
#[derive(Debug, Clone)]
struct RequestCounter {
    tables: Tables,
    state: Arc<Mutex<(bool, Tally)>>,
}

impl RequestCounter {
    fn new(tables: Tables) -> Self {
        Self { tables, state: Arc::new(Mutex::new((false, Tally::default()))) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (bool, Tally)> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Clears the tally and starts counting.
    fn start(&self) {
        *self.lock() = (true, Tally::default());
    }

    /// Stops counting and returns what was counted.
    fn stop(&self) -> Tally {
        let mut state = self.lock();
        state.0 = false;
        std::mem::take(&mut state.1)
    }

    fn table_role(&self, name: &str) -> &'static str {
        let t = &self.tables;
        match name {
            n if n == t.runs => "runs",
            n if n == t.events => "events",
            n if n == t.progress => "progress",
            n if n == t.workflows => "workflows",
            n if n == t.rollups => "rollups",
            _ => "other",
        }
    }

    /// What a request is for, from its operation and JSON body (the adapters' expressions
    /// and items are distinctive enough).
    fn purpose(&self, op: &str, body: &Value) -> String {
        let table = body["TableName"].as_str().map(|t| self.table_role(t)).unwrap_or("?");
        let text = |field: &str| body[field].as_str().unwrap_or_default();
        match (op, table) {
            ("UpdateItem", "runs") if text("ConditionExpression").contains(":queued") => "claim".into(),
            ("UpdateItem", "runs") if text("UpdateExpression").contains("#finished") => "finish_run".into(),
            ("UpdateItem", "runs") if text("UpdateExpression").contains("REMOVE lease_holder") => "release".into(),
            ("UpdateItem", "runs") if text("ConditionExpression").starts_with("#holder = :holder") => "renew".into(),
            ("GetItem", "rollups") => "daily_spend.day".into(),
            ("Query", "runs") if text("KeyConditionExpression").contains("STEP#") || body.to_string().contains("STEP#") => "get_steps".into(),
            ("Query", "events") if body["Limit"] == 1 && body["ScanIndexForward"] == false => "last_seq".into(),
            ("Query", "events") => "events_after".into(),
            ("GetItem", "runs") => "get_run".into(),
            ("TransactWriteItems", _) => self.transaction_purpose(body),
            (op, table) => format!("{op}:{table}"),
        }
    }

    /// A transaction's purpose: a step checkpoint (by the status it records), an event
    /// append (by event type), both when one transaction carries both, or a roll-up.
    fn transaction_purpose(&self, body: &Value) -> String {
        let actions = body["TransactItems"].as_array().cloned().unwrap_or_default();
        let (mut roles, mut parts) = (Vec::new(), Vec::new());
        for action in &actions {
            for (kind, spec) in action.as_object().into_iter().flatten() {
                let role = spec["TableName"].as_str().map(|t| self.table_role(t)).unwrap_or("?");
                if kind == "Put" && role == "runs" && spec["Item"]["sk"]["S"].as_str().is_some_and(|sk| sk.starts_with("STEP#")) {
                    parts.push(format!("checkpoint.{}", spec["Item"]["status"]["S"].as_str().unwrap_or("?")));
                }
                if kind == "Put" && role == "events" {
                    parts.push(format!("event.{}", spec["Item"]["type"]["S"].as_str().unwrap_or("?")));
                }
                if kind == "Put" && role == "runs" && spec["Item"]["sk"]["S"].as_str().is_some_and(|sk| sk.starts_with("ITEM#")) {
                    parts.push(format!("item.{}", spec["Item"]["status"]["S"].as_str().unwrap_or("?")));
                }
                // The daily spend counter's one-item transactions.
                let update = spec["UpdateExpression"].as_str().unwrap_or_default();
                if kind == "Update" && role == "rollups" && update.contains("charged_pico") {
                    parts.push("daily_spend.settle".into());
                } else if kind == "Update" && role == "rollups" && update.contains("committed_pico") {
                    parts.push("daily_spend.reserve".into());
                }
                roles.push(role);
            }
        }
        if !parts.is_empty() {
            parts.join("+")
        } else if roles.contains(&"rollups") {
            "rollup".into()
        } else {
            format!("transaction:{}", roles.join("+"))
        }
    }

    fn record(&self, op: &str, body: Option<&[u8]>) {
        let body: Value = body.and_then(|b| serde_json::from_slice(b).ok()).unwrap_or(Value::Null);
        let (items_written, condition_checks) = match op {
            "PutItem" | "UpdateItem" | "DeleteItem" => (1, 0),
            "TransactWriteItems" => {
                let actions = body["TransactItems"].as_array().cloned().unwrap_or_default();
                let checks = actions.iter().filter(|a| a.get("ConditionCheck").is_some()).count() as u64;
                (actions.len() as u64 - checks, checks)
            }
            "BatchWriteItem" => {
                let per_table = body["RequestItems"].as_object().cloned().unwrap_or_default();
                (per_table.values().map(|r| r.as_array().map_or(0, Vec::len) as u64).sum(), 0)
            }
            _ => (0, 0),
        };
        let purpose = self.purpose(op, &body);
        let mut state = self.lock();
        let (on, tally) = &mut *state;
        if !*on {
            return;
        }
        *tally.ops.entry(op.to_owned()).or_default() += 1;
        *tally.purposes.entry(purpose).or_default() += 1;
        tally.items_written += items_written;
        tally.condition_checks += condition_checks;
    }
}

impl Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "StoreBenchRequestCounter"
    }

    /// Runs once per attempt, retries included. DynamoDB's JSON protocol names the
    /// operation in `X-Amz-Target: DynamoDB_20120810.<Operation>`.
    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let request = context.request();
        let op = request.headers().get("x-amz-target").and_then(|t| t.rsplit('.').next()).unwrap_or("Unknown");
        self.record(op, request.body().bytes());
        Ok(())
    }
}

fn client(url: &str, counter: Option<RequestCounter>) -> aws_sdk_dynamodb::Client {
    let mut config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("bench", "bench", None, None, "bench"))
        .endpoint_url(url);
    if let Some(counter) = counter {
        config = config.interceptor(counter);
    }
    aws_sdk_dynamodb::Client::from_conf(config.build())
}

/// Replies that satisfy the sample's steps: `extract` wants a JSON object with `issues`.
fn scripted_model() -> ScriptedModel {
    ScriptedModel::new(vec![
        Script::reply(
            "List the distinct issues",
            r#"{"issues": ["logged out when switching networks", "CSV export drops the last row", "support took four days to answer"]}"#,
        ),
        Script::reply("Classify the sentiment", "negative"),
        Script::reply(
            "Summarise this feedback",
            "The customer is logged out on network changes, loses a CSV row on export and waited four days for support.",
        ),
        Script::reply(
            "Write a short, kind reply",
            "Thank you for telling us, and sorry for the trouble: we are fixing the network logouts and the missing CSV row, and we will answer faster.",
        ),
    ])
}

/// How the engine is set up for a measured run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// As the runner wires it.
    Runner,
    /// The caller has a daily spend cap, which the engine checks on every model call.
    DailyCap,
}

/// One measured run.
struct Measured {
    steps: usize,
    events: usize,
    run: Tally,
    roll_up: Tally,
}

/// Creates the sample run with `owners`, then claims and executes it as the runner does,
/// counting requests from the claim to the end of `execute`; then rolls it up as the
/// runner does, counted apart. The runner's engine is `EngineConfig::default()` with no
/// daily caps (the template's and the local stack's default); the variants measure
/// alternatives.
async fn measure(
    client: &aws_sdk_dynamodb::Client,
    tables: &Tables,
    counter: &RequestCounter,
    owners: Vec<Principal>,
    variant: Variant,
) -> Result<Measured, BoxError> {
    let sample: Value = serde_json::from_str(SAMPLE)?;
    let definition = sample["workflow"].clone();
    let steps = definition["steps"].as_array().map_or(0, Vec::len);
    let workflow: chainrun_core::ids::WorkflowName = definition["name"].as_str().unwrap_or("sample").parse()?;
    let store = Arc::new(DynamoStore::new(client.clone(), tables.clone()));
    let progress = Arc::new(DynamoProgress::new(client.clone(), tables.clone(), 30));
    let analytics = DynamoAnalytics::new(client.clone(), tables.clone());
    let mut engine =
        Engine::new(Arc::new(scripted_model()), store.clone(), progress.clone(), Arc::new(ModelRegistry::builtin()), EngineConfig::default());
    if variant == Variant::DailyCap {
        let caps = DailyCaps::parse(Some("5"), None)?;
        engine = engine.with_daily_caps(Arc::new(DynamoDailySpend::new(client.clone(), tables.clone())), caps);
    }

    let run = RunRecord::new(workflow, definition, sample["input"].clone(), "demo".parse()?, owners, chrono::Utc::now());
    let id = run.id.clone();
    store.create_run(&run).await?;

    counter.start();
    let now = chrono::Utc::now();
    let lease = Lease { holder: "store-bench".into(), expires_at: now + chrono::Duration::minutes(15) };
    let Claim::Acquired(run) = store.claim(&id, &lease, now).await? else { return Err("the new run could not be claimed".into()) };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15 * 60);
    let outcome = engine.execute(*run, lease, Some(deadline)).await;
    let run_tally = counter.stop();
    match outcome? {
        Outcome::Finished(RunStatus::Completed) => {}
        other => return Err(format!("the sample run ended {other:?}, not Completed").into()),
    }

    counter.start();
    let finished = store.get_run(&id).await?.ok_or("the finished run is gone")?;
    let records = store.get_steps(&id).await?;
    analytics.record_run(&finished, &records).await?;
    let roll_up = counter.stop();

    let events = progress.events_after(&id, 0, 1000).await?.len();
    Ok(Measured { steps, events, run: run_tally, roll_up })
}

fn per_step(n: u64, steps: usize) -> f64 {
    n as f64 / steps.max(1) as f64
}

fn joined(map: &BTreeMap<String, u64>) -> String {
    map.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

async fn bench() -> Result<(), BoxError> {
    let moto = start_moto()?;
    let tables = create_tables(&client(&moto.url, None)).await?;
    let counter = RequestCounter::new(tables.clone());
    let counted = client(&moto.url, Some(counter.clone()));

    let caller = Principal::User("demo".into());
    let owner_sets = [
        vec![caller.clone()],
        vec![caller.clone(), Principal::Group("eng".into())],
        vec![caller.clone(), Principal::Group("eng".into()), Principal::Admin],
    ];
    let mut results = Vec::new();
    for owners in owner_sets {
        results.push(measure(&counted, &tables, &counter, owners, Variant::Runner).await?);
    }
    let capped = measure(&counted, &tables, &counter, vec![caller.clone()], Variant::DailyCap).await?;
    drop(moto);

    let one = &results[0];
    println!(
        "store: sample feedback-analysis, {} steps, {} events; DynamoDB requests from claim to finish, each attempt, a transaction counted once; breakdowns are the one-owner run's",
        one.steps, one.events
    );
    for (n, m) in results.iter().enumerate().skip(1) {
        println!(
            "store: owners={} writes_per_step={:.2} reads_per_step={:.2} items_written_per_step={:.2} condition_checks_per_step={:.2}",
            n + 1,
            per_step(m.run.writes(), m.steps),
            per_step(m.run.reads(), m.steps),
            per_step(m.run.items_written, m.steps),
            per_step(m.run.condition_checks, m.steps),
        );
    }
    let mut ops: BTreeMap<String, u64> = LISTED_OPS.iter().map(|op| ((*op).to_owned(), 0)).collect();
    ops.extend(one.run.ops.clone());
    let ops = LISTED_OPS
        .iter()
        .map(|op| format!("{op}={}", ops[*op]))
        .chain(ops.iter().filter(|(op, _)| !LISTED_OPS.contains(&op.as_str())).map(|(op, n)| format!("{op}={n}")));
    println!("store: breakdown {}", ops.collect::<Vec<_>>().join(" "));
    println!("store: breakdown by purpose {}", joined(&one.run.purposes));
    println!(
        "store: owners=1 writes={} reads={} items_written={} condition_checks={} items_written_per_step={:.2} condition_checks_per_step={:.2}",
        one.run.writes(),
        one.run.reads(),
        one.run.items_written,
        one.run.condition_checks,
        per_step(one.run.items_written, one.steps),
        per_step(one.run.condition_checks, one.steps),
    );
    println!(
        "store: with a daily spend cap, owners=1 writes_per_step={:.2} reads_per_step={:.2} (not in W; {})",
        per_step(capped.run.writes(), capped.steps),
        per_step(capped.run.reads(), capped.steps),
        joined(&capped.run.purposes.iter().filter(|(p, _)| p.starts_with("daily_spend")).map(|(p, n)| (p.clone(), *n)).collect()),
    );
    println!(
        "store: after finish, not in W (runner roll-up, per run): writes={} reads={} {}",
        one.roll_up.writes(),
        one.roll_up.reads(),
        joined(&one.roll_up.purposes)
    );
    println!("store: writes_per_step={:.2} reads_per_step={:.2}", per_step(one.run.writes(), one.steps), per_step(one.run.reads(), one.steps));
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match bench().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("store_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
