//! DynamoDB implementations of [`RunStore`] and [`RunHistory`] (the event log and progress
//! rows are in [`super::progress`]).
//!
//! Layout (see `infra/tables.json`):
//! - runs: `pk = RUN#<id>`; `sk = META` holds the run record and the lease, `sk = STEP#<id>`
//!   one checkpoint per step. JSON documents (definition, input, outputs) are stored as
//!   strings: they round-trip exactly, whereas DynamoDB numbers and empty strings would not.
//! - history reads the runs table's GSIs `by-caller` / `by-workflow` (`created_at` sort),
//!   newest first, and filters by the run's owners (see [`RunHistory`]).
//!
//! DynamoDB rejects expression attribute values that an expression does not use (the local
//! moto server does not), so every expression below uses exactly the values it passes.

use super::blobs::S3Blobs;
use super::dynamo_error::{defect, is_condition_failure, item_name, store_err};
use crate::config::Tables;
use crate::durability::{sweep_shard, sweep_shards};
use crate::ids::{ModelId, Principal, RunId, StepId, UserId, WorkflowName};
use crate::money::Usd;
use crate::output::json_len;
use crate::ports::*;
use crate::pricing::Usage;
use crate::revision::Revision;
use crate::run::*;
use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, ConditionCheck, Put, ReturnValue, TransactWriteItem};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use tracing::{debug, instrument};

pub(super) type Item = HashMap<String, AttributeValue>;

/// The runs table's sparse index of unfinished runs by when they become due.
const SWEEP_INDEX: &str = "by-sweep";

/// DynamoDB's item limit is 400 KB; stay under it with room for attribute names.
pub(super) const MAX_ITEM_BYTES: usize = 390 * 1024;

pub(super) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

pub(super) fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// The TTL (`expires_at`, epoch seconds) of an item about `day`: midnight UTC `days` later.
pub(super) fn expires_after(day: chrono::NaiveDate, days: u64) -> i64 {
    (day + chrono::Days::new(days)).and_time(chrono::NaiveTime::MIN).and_utc().timestamp()
}

pub(super) fn run_pk(id: &RunId) -> String {
    format!("RUN#{id}")
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A step checkpoint's sort key: `STEP#<id>` in the run as started, `STEP#<id>#<n>` in its
/// revision `n` (step ids have no `#`), so no revision overwrites another's.
fn step_sk(step: &StepId, revision: u32) -> String {
    match revision {
        0 => format!("STEP#{step}"),
        n => format!("STEP#{step}#{n}"),
    }
}

fn json_string(v: &Value) -> String {
    v.to_string()
}

/// A JSON document stored as a string; `item` names the item holding it.
fn parse_json(raw: &str, item: &str, attribute: &str) -> Result<Value, StoreError> {
    serde_json::from_str(raw).map_err(|e| StoreError::Corrupt(format!("{item}: {attribute} is not JSON: {e}")))
}

/// A review decision as stored in the run's META item: the edited output as a JSON string,
/// like every other document (DynamoDB numbers would not round-trip every JSON number).
#[derive(Serialize, Deserialize)]
struct StoredDecision {
    decision: Verdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    comment: Option<String>,
    by: UserId,
    at: DateTime<Utc>,
}

impl From<&ReviewDecision> for StoredDecision {
    fn from(d: &ReviewDecision) -> Self {
        Self { decision: d.decision, output: d.output.as_ref().map(json_string), comment: d.comment.clone(), by: d.by.clone(), at: d.at }
    }
}

impl StoredDecision {
    fn into_decision(self, item: &str, step: &StepId) -> Result<ReviewDecision, StoreError> {
        let output = self.output.as_deref().map(|o| parse_json(o, item, &format!("decisions.{step}.output"))).transpose()?;
        Ok(ReviewDecision { decision: self.decision, output, comment: self.comment, by: self.by, at: self.at })
    }
}

/// An input step's state in the run's META item: the state as a JSON string (its values
/// are documents), beside its version, which answers are recorded conditionally on.
#[derive(Serialize, Deserialize)]
struct StoredInput {
    version: u32,
    state: String,
}

impl StoredInput {
    fn from_state(state: &crate::input::InputState) -> Self {
        Self { version: state.version, state: serde_json::to_string(state).unwrap_or_default() }
    }

    fn into_state(self, item: &str, step: &StepId) -> Result<crate::input::InputState, StoreError> {
        serde_json::from_str(&self.state).map_err(|e| StoreError::Corrupt(format!("{item}: inputs.{step} is not an input state: {e}")))
    }
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

/// A run's META item, as stored.
#[derive(Serialize, Deserialize)]
struct RunItem {
    pk: String,
    sk: String,
    id: RunId,
    workflow: WorkflowName,
    definition: String,
    input: String,
    caller: UserId,
    owners: Vec<Principal>,
    status: RunStatus,
    created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    finished_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<ErrorInfo>,
    totals: Totals,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    step_order: Vec<StepId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    takeovers: Vec<Takeover>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    control: Option<ControlRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    waiting: Option<Waiting>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resumed: Option<Resumption>,
    #[serde(default, skip_serializing_if = "RunOptions::is_default")]
    options: RunOptions,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    decisions: BTreeMap<StepId, StoredDecision>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    budget_raises: Vec<BudgetRaise>,
    #[serde(default, skip_serializing_if = "is_zero")]
    revision: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    revisions: Vec<crate::revision::Revision>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    inputs: BTreeMap<StepId, StoredInput>,
    /// Answers recorded on its input steps, over all of them: what a park checks it saw.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    input_turns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pinned: Option<crate::stored::Pinned>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access: Option<crate::access::Access>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    inherits_access: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    workflow_owner: Option<UserId>,
    /// The lease (absent while queued, released or finished).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease_holder: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease_expires: Option<i64>,
    /// The sweeper's index entry (`by-sweep`), present only while the run is unfinished:
    /// when it becomes due (its lease's expiry, or the end of the queued grace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sweep_shard: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sweep_at: Option<i64>,
}

impl RunItem {
    fn from_record(run: &RunRecord) -> Self {
        Self {
            pk: run_pk(&run.id),
            sk: "META".into(),
            id: run.id.clone(),
            workflow: run.workflow.clone(),
            definition: json_string(&run.definition),
            input: json_string(&run.input),
            caller: run.caller.clone(),
            owners: run.owners.clone(),
            status: run.status,
            // Fixed-width UTC so GSIs sort chronologically as strings.
            created_at: run.created_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            started_at: run.started_at,
            finished_at: run.finished_at,
            output: run.output.as_ref().map(json_string),
            error: run.error.clone(),
            totals: run.totals,
            step_order: run.step_order.clone(),
            takeovers: run.takeovers.clone(),
            control: run.control.clone(),
            waiting: run.waiting.clone(),
            resumed: run.resumed.clone(),
            options: run.options.clone(),
            decisions: run.decisions.iter().map(|(step, d)| (step.clone(), StoredDecision::from(d))).collect(),
            budget_raises: run.budget_raises.clone(),
            revision: run.revision,
            revisions: run.revisions.clone(),
            inputs: run.inputs.iter().map(|(step, state)| (step.clone(), StoredInput::from_state(state))).collect(),
            input_turns: run.inputs.values().map(|state| state.turns.len() as u64).sum(),
            pinned: run.pinned.clone(),
            access: run.access.clone(),
            inherits_access: run.inherits_access,
            workflow_owner: run.workflow_owner.clone(),
            lease_holder: None,
            lease_expires: None,
            sweep_shard: None,
            sweep_at: None,
        }
    }

    /// The lease it holds, if any.
    fn lease(&self) -> Option<Lease> {
        let expires_at = DateTime::from_timestamp_millis(self.lease_expires?)?;
        Some(Lease { holder: self.lease_holder.clone()?, expires_at })
    }

    /// `name` names the stored item, for errors.
    fn into_record(self, name: &str) -> Result<RunRecord, StoreError> {
        Ok(RunRecord {
            definition: parse_json(&self.definition, name, "definition")?,
            input: parse_json(&self.input, name, "input")?,
            output: self.output.as_deref().map(|o| parse_json(o, name, "output")).transpose()?,
            created_at: parse_stored_time(&self.created_at).map_err(|e| StoreError::Corrupt(format!("{name}: {e}")))?,
            id: self.id,
            workflow: self.workflow,
            caller: self.caller,
            owners: self.owners,
            status: self.status,
            started_at: self.started_at,
            finished_at: self.finished_at,
            error: self.error,
            step_order: self.step_order,
            takeovers: self.takeovers,
            control: self.control,
            waiting: self.waiting,
            resumed: self.resumed,
            options: self.options,
            budget_raises: self.budget_raises,
            revision: self.revision,
            revisions: self.revisions,
            pinned: self.pinned,
            access: self.access,
            inherits_access: self.inherits_access,
            workflow_owner: self.workflow_owner,
            decisions: self.decisions.into_iter().map(|(step, d)| d.into_decision(name, &step).map(|d| (step, d))).collect::<Result<_, _>>()?,
            inputs: self.inputs.into_iter().map(|(step, i)| i.into_state(name, &step).map(|i| (step, i))).collect::<Result<_, _>>()?,
            totals: self.totals,
        })
    }
}

/// A step checkpoint item.
#[derive(Serialize, Deserialize)]
struct StepItem {
    pk: String,
    sk: String,
    step_id: StepId,
    status: StepStatus,
    attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    model: Option<ModelId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    usage: Usage,
    cost: Usd,
    latency_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<ErrorInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    finished_at: Option<DateTime<Utc>>,
    #[serde(default)]
    calls: u32,
    #[serde(default, skip_serializing_if = "Lost::is_zero")]
    lost: Lost,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    in_flight: Option<InFlight>,
    #[serde(default, skip_serializing_if = "is_zero")]
    revision: u32,
}

/// A map item checkpoint (`sk = ITEM#<step>#<index>`, apart from the `STEP#` items).
#[derive(Serialize, Deserialize)]
struct MapItemRow {
    pk: String,
    sk: String,
    index: usize,
    status: StepStatus,
    attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    usage: Usage,
    cost: Usd,
    calls: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<ErrorInfo>,
    #[serde(default, skip_serializing_if = "Lost::is_zero")]
    lost: Lost,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    in_flight: Option<InFlight>,
}

/// The sort-key prefix of a map step's item checkpoints in a revision of the run (the
/// run as started: `ITEM#<step>#`, revision `n`: `ITEM#<step>@<n>#`, which the first
/// does not prefix); indexes are zero-padded so they read back in order.
fn item_prefix(step: &StepId, revision: u32) -> String {
    match revision {
        0 => format!("ITEM#{step}#"),
        n => format!("ITEM#{step}@{n}#"),
    }
}

/// `what` as an item. Our records always encode, so a failure is a defect, not bad data.
fn to_item<T: Serialize>(value: &T, what: &str) -> Result<Item, StoreError> {
    serde_dynamo::aws_sdk_dynamodb_1::to_item(value).map_err(|e| StoreError::Rejected(defect(what, e)))
}

/// A stored item read back as `T`; an item that does not fit is corrupt, named by its key.
fn from_item<T: for<'de> Deserialize<'de>>(table: &str, item: Item) -> Result<T, StoreError> {
    let name = item_name(table, &item);
    serde_dynamo::aws_sdk_dynamodb_1::from_item(item).map_err(|e| StoreError::Corrupt(format!("{name}: {e}")))
}

/// A run's META item read back as the record.
fn read_run(table: &str, item: Item) -> Result<RunRecord, StoreError> {
    let name = item_name(table, &item);
    from_item::<RunItem>(table, item)?.into_record(&name)
}

/// Rough size of an item as DynamoDB counts it (names + values), to refuse oversize
/// items with a clear error instead of an opaque ValidationException.
pub(super) fn item_size(item: &Item) -> usize {
    fn value_size(v: &AttributeValue) -> usize {
        match v {
            AttributeValue::S(s) | AttributeValue::N(s) => s.len(),
            AttributeValue::L(l) => l.iter().map(value_size).sum::<usize>() + 3,
            AttributeValue::M(m) => m.iter().map(|(k, v)| k.len() + value_size(v)).sum::<usize>() + 3,
            _ => 8,
        }
    }
    item.iter().map(|(k, v)| k.len() + value_size(v)).sum()
}

fn check_size(item: &Item, what: &str) -> Result<(), StoreError> {
    let size = item_size(item);
    if size > MAX_ITEM_BYTES {
        return Err(StoreError::TooLarge(format!("{what} is {size} bytes; DynamoDB items are limited to 400 KB")));
    }
    Ok(())
}

/// `item` made to fit one DynamoDB item: with an outputs bucket, its largest documents move
/// to S3 (see [`super::blobs`]); whatever still does not fit is refused, naming `what`.
pub(super) async fn fit(blobs: Option<&S3Blobs>, run: &RunId, mut item: Item, what: &str) -> Result<Item, StoreError> {
    if let Some(blobs) = blobs {
        blobs.offload(run, &mut item, MAX_ITEM_BYTES, what).await?;
    }
    check_size(&item, what)?;
    Ok(item)
}

/// A stored item with its offloaded documents put back (see [`super::blobs`]).
pub(super) async fn restored(blobs: Option<&S3Blobs>, table: &str, mut item: Item) -> Result<Item, StoreError> {
    let has_references = item.keys().any(|k| k.ends_with("_s3"));
    if has_references {
        let name = item_name(table, &item);
        let blobs = blobs.ok_or_else(|| {
            StoreError::Rejected(format!("{name} keeps documents in S3, but no outputs bucket is configured (CHAINRUN_OUTPUTS_BUCKET)"))
        })?;
        blobs.restore(&mut item, &name).await?;
    }
    Ok(item)
}

#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    tables: Tables,
    history: HistoryPaging,
    /// How long a queued or released run waits before the sweeper dispatches it.
    queued_grace: chrono::Duration,
    /// Where documents too large for an item go; without it they are refused (`TooLarge`).
    blobs: Option<S3Blobs>,
}

/// How much of a history index one `list_runs` call reads at most: `max_pages` query pages
/// of `page_size` runs. Bounds the cost of a page when few runs there are visible.
#[derive(Debug, Clone, Copy)]
struct HistoryPaging {
    page_size: i32,
    max_pages: usize,
}

impl DynamoStore {
    pub fn new(client: Client, tables: Tables) -> Self {
        let queued_grace = chrono::Duration::from_std(crate::durability::Durability::default().queued_grace).unwrap_or(chrono::Duration::MAX);
        Self { client, tables, history: HistoryPaging { page_size: 100, max_pages: 5 }, queued_grace, blobs: None }
    }

    /// Documents too large for one item go to this bucket, and are read back from it.
    pub fn with_blobs(mut self, blobs: S3Blobs) -> Self {
        self.blobs = Some(blobs);
        self
    }

    /// A run's META item read back as the record, its output restored.
    async fn read_run(&self, item: Item) -> Result<RunRecord, StoreError> {
        read_run(&self.tables.runs, restored(self.blobs.as_ref(), &self.tables.runs, item).await?)
    }

    /// Queued or released runs become due for the sweeper `grace` after (default 60 s).
    pub fn with_queued_grace(mut self, grace: std::time::Duration) -> Self {
        self.queued_grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
        self
    }

    /// Every item of the run whose sort key starts with `prefix`, in key order.
    async fn query_run(&self, id: &RunId, prefix: &str) -> Result<Vec<Item>, StoreError> {
        let query = self
            .client
            .query()
            .table_name(&self.tables.runs)
            .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
            .expression_attribute_values(":pk", s(run_pk(id)))
            .expression_attribute_values(":prefix", s(prefix))
            .consistent_read(true);
        super::query_all(query, |e| store_err(&self.tables.runs)(e)).await
    }

    /// The run's META item as stored, lease included.
    async fn get_meta(&self, id: &RunId) -> Result<Option<RunItem>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.tables.runs)
            .set_key(Some(self.meta_key(id)))
            .consistent_read(true)
            .send()
            .await
            .map_err(store_err(&self.tables.runs))?;
        out.item.map(|item| from_item::<RunItem>(&self.tables.runs, item)).transpose()
    }

    /// Takes over a lease that expired: conditional on it still being exactly the lease
    /// we read, so of two runners taking over at once only one wins.
    async fn take_over(&self, id: &RunId, lease: &Lease, expired: &Lease, now: DateTime<Utc>) -> Result<Claim, StoreError> {
        let takeover = Takeover { from: expired.holder.clone(), expired_at: expired.expires_at, by: lease.holder.clone(), at: now };
        let entry = serde_dynamo::aws_sdk_dynamodb_1::to_attribute_value(vec![takeover])
            .map_err(|e| StoreError::Rejected(defect(&format!("the takeover record of run {id}"), e)))?;
        let result = self
            .client
            .update_item()
            .table_name(&self.tables.runs)
            .set_key(Some(self.meta_key(id)))
            .update_expression(
                "SET #holder = :holder, #expires = :expires, #sweep_at = :expires, #takeovers = list_append(if_not_exists(#takeovers, :none), :takeover)",
            )
            .condition_expression("#status = :running AND #holder = :old_holder AND #expires = :old_expires")
            .expression_attribute_names("#status", "status")
            .expression_attribute_names("#holder", "lease_holder")
            .expression_attribute_names("#expires", "lease_expires")
            .expression_attribute_names("#sweep_at", "sweep_at")
            .expression_attribute_names("#takeovers", "takeovers")
            .expression_attribute_values(":running", s("RUNNING"))
            .expression_attribute_values(":holder", s(&lease.holder))
            .expression_attribute_values(":expires", n(lease.expires_at.timestamp_millis()))
            .expression_attribute_values(":old_holder", s(&expired.holder))
            .expression_attribute_values(":old_expires", n(expired.expires_at.timestamp_millis()))
            .expression_attribute_values(":none", AttributeValue::L(Vec::new()))
            .expression_attribute_values(":takeover", entry)
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match result {
            Ok(out) => {
                let item = out.attributes.ok_or_else(|| StoreError::Corrupt(format!("the takeover of run {id} returned no record")))?;
                Ok(Claim::Acquired(Box::new(self.read_run(item).await?)))
            }
            // Another runner took it over (or renewed) between our read and this write.
            Err(e) if is_condition_failure(&e) => Ok(Claim::HeldElsewhere),
            Err(e) => Err(store_err(&self.tables.runs)(e)),
        }
    }

    /// Changes the history read bound (default: 5 pages of 100 runs), e.g. to exercise it.
    pub fn with_history_bound(mut self, page_size: u32, max_pages: usize) -> Self {
        self.history = HistoryPaging { page_size: page_size.clamp(1, 1000) as i32, max_pages: max_pages.max(1) };
        self
    }

    fn meta_key(&self, id: &RunId) -> Item {
        meta_key(id)
    }
}

fn meta_key(id: &RunId) -> Item {
    HashMap::from([("pk".to_owned(), s(run_pk(id))), ("sk".to_owned(), s("META"))])
}

/// A step checkpoint as two transaction items: the check that `lease` still holds the run
/// (first), and the step's item. Shared by [`DynamoStore::save_step`] and the event log,
/// which writes a checkpoint in the same transaction as the event announcing it.
pub(super) async fn checkpoint_writes(
    tables: &Tables,
    blobs: Option<&S3Blobs>,
    id: &RunId,
    lease: &Lease,
    step: &StepRecord,
) -> Result<[TransactWriteItem; 2], StoreError> {
    let item = step_item(blobs, id, step).await?;
    fenced_put(tables, id, lease, item)
}

/// A step checkpoint as its item, its largest documents moved to S3 if it would not fit.
async fn step_item(blobs: Option<&S3Blobs>, id: &RunId, step: &StepRecord) -> Result<Item, StoreError> {
    let item = to_item(
        &StepItem {
            pk: run_pk(id),
            sk: step_sk(&step.step_id, step.revision),
            revision: step.revision,
            step_id: step.step_id.clone(),
            status: step.status,
            attempts: step.attempts,
            model: step.model.clone(),
            output: step.output.as_ref().map(json_string),
            text: step.text.clone(),
            usage: step.usage,
            cost: step.cost,
            latency_ms: step.latency_ms,
            error: step.error.clone(),
            detail: step.detail.as_ref().map(json_string),
            started_at: step.started_at,
            finished_at: step.finished_at,
            calls: step.calls,
            lost: step.lost,
            in_flight: step.in_flight,
        },
        &format!("the checkpoint of step {} of run {id}", step.step_id),
    )?;
    fit(blobs, id, item, &format!("the checkpoint of step {}", step.step_id)).await
}

/// A put that only lands while `lease` holds the run, as two transaction items: the lease
/// check (first), and the put. A runner that lost its lease (and whose run was taken over)
/// cannot overwrite the new runner's work.
fn fenced_put(tables: &Tables, id: &RunId, lease: &Lease, item: Item) -> Result<[TransactWriteItem; 2], StoreError> {
    let lease_check = ConditionCheck::builder()
        .table_name(&tables.runs)
        .set_key(Some(meta_key(id)))
        .condition_expression("lease_holder = :holder")
        .expression_attribute_values(":holder", s(&lease.holder))
        .build()
        .map_err(|e| StoreError::Rejected(defect("the lease check of a checkpoint", e)))?;
    let put =
        Put::builder().table_name(&tables.runs).set_item(Some(item)).build().map_err(|e| StoreError::Rejected(defect("a checkpoint write", e)))?;
    Ok([TransactWriteItem::builder().condition_check(lease_check).build(), TransactWriteItem::builder().put(put).build()])
}

#[async_trait]
impl RunStore for DynamoStore {
    #[instrument(skip_all, fields(run_id = %run.id))]
    async fn create_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        let mut record = RunItem::from_record(run);
        // Due for the sweeper if nothing claims it within the grace (a lost dispatch).
        record.sweep_shard = Some(sweep_shard(&run.id));
        record.sweep_at = Some((run.created_at + self.queued_grace).timestamp_millis());
        let item = to_item(&record, &format!("the record of run {}", run.id))?;
        check_size(&item, "the run (definition + input)")?;
        let result =
            self.client.put_item().table_name(&self.tables.runs).set_item(Some(item)).condition_expression("attribute_not_exists(pk)").send().await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => match self.get_run(&run.id).await? {
                // The SDK's retry of our own write whose reply was lost: it is stored.
                Some(stored) if stored.is_same_run(run) => Ok(()),
                _ => Err(StoreError::AlreadyExists(run.id.clone())),
            },
            Err(e) => Err(store_err(&self.tables.runs)(e)),
        }
    }

    async fn get_run(&self, id: &RunId) -> Result<Option<RunRecord>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.tables.runs)
            .set_key(Some(self.meta_key(id)))
            .consistent_read(true)
            .send()
            .await
            .map_err(store_err(&self.tables.runs))?;
        match out.item {
            Some(item) => Ok(Some(self.read_run(item).await?)),
            None => Ok(None),
        }
    }

    async fn get_run_head(&self, id: &RunId) -> Result<Option<RunRecord>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.tables.runs)
            .set_key(Some(self.meta_key(id)))
            .consistent_read(true)
            .send()
            .await
            .map_err(store_err(&self.tables.runs))?;
        // Without the output, nothing needs reading back from S3.
        let head = |mut item: Item| {
            item.remove("output");
            item.remove("output_s3");
            read_run(&self.tables.runs, item)
        };
        out.item.map(head).transpose()
    }

    async fn get_steps(&self, id: &RunId) -> Result<Vec<StepRecord>, StoreError> {
        let mut steps = Vec::new();
        for item in self.query_run(id, "STEP#").await? {
            let item = restored(self.blobs.as_ref(), &self.tables.runs, item).await?;
            let name = item_name(&self.tables.runs, &item);
            let step: StepItem = from_item(&self.tables.runs, item)?;
            steps.push(StepRecord {
                output: step.output.as_deref().map(|o| parse_json(o, &name, "output")).transpose()?,
                detail: step.detail.as_deref().map(|d| parse_json(d, &name, "detail")).transpose()?,
                step_id: step.step_id,
                status: step.status,
                attempts: step.attempts,
                model: step.model,
                text: step.text,
                usage: step.usage,
                cost: step.cost,
                latency_ms: step.latency_ms,
                error: step.error,
                started_at: step.started_at,
                finished_at: step.finished_at,
                calls: step.calls,
                lost: step.lost,
                in_flight: step.in_flight,
                revision: step.revision,
            });
        }
        Ok(steps)
    }

    #[instrument(skip_all, fields(run_id = %id, holder = %lease.holder))]
    async fn claim(&self, id: &RunId, lease: &Lease, now: DateTime<Utc>) -> Result<Claim, StoreError> {
        // A run nobody holds (queued, or released to continue). Our own holder is accepted
        // too: that is the SDK's retry of this same claim after its reply was lost.
        let result = self
            .client
            .update_item()
            .table_name(&self.tables.runs)
            .set_key(Some(self.meta_key(id)))
            .update_expression(
                "SET #status = :running, #holder = :holder, #expires = :expires, #started = if_not_exists(#started, :now_iso), #shard = :shard, #sweep_at = :expires REMOVE #waiting, #deadline",
            )
            // A waiting run is claimed only once its deadline has passed.
            .condition_expression(
                "attribute_exists(pk) AND (#status = :queued OR (#status = :running AND (attribute_not_exists(#holder) OR #holder = :holder)) OR (#status = :waiting_status AND #deadline <= :now_ms))",
            )
            .expression_attribute_names("#waiting", "waiting")
            .expression_attribute_names("#deadline", "deadline_at")
            .expression_attribute_values(":waiting_status", s("AWAITING_INPUT"))
            .expression_attribute_values(":now_ms", n(now.timestamp_millis()))
            .expression_attribute_names("#status", "status")
            .expression_attribute_names("#holder", "lease_holder")
            .expression_attribute_names("#expires", "lease_expires")
            .expression_attribute_names("#started", "started_at")
            .expression_attribute_names("#shard", "sweep_shard")
            .expression_attribute_names("#sweep_at", "sweep_at")
            .expression_attribute_values(":running", s("RUNNING"))
            .expression_attribute_values(":queued", s("QUEUED"))
            .expression_attribute_values(":holder", s(&lease.holder))
            .expression_attribute_values(":expires", n(lease.expires_at.timestamp_millis()))
            .expression_attribute_values(":now_iso", s(stored_instant(&now)))
            .expression_attribute_values(":shard", s(sweep_shard(id)))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match result {
            Ok(out) => {
                let item = out.attributes.ok_or_else(|| StoreError::Corrupt(format!("the claim of run {id} returned no record")))?;
                Ok(Claim::Acquired(Box::new(self.read_run(item).await?)))
            }
            Err(e) if is_condition_failure(&e) => {
                let Some(stored) = self.get_meta(id).await? else { return Ok(Claim::NotFound) };
                if stored.status.is_terminal() {
                    return Ok(Claim::Finished);
                }
                if stored.status == RunStatus::AwaitingInput {
                    return Ok(Claim::Waiting);
                }
                match stored.lease() {
                    // Live until the instant it expires, to the millisecond (as stored).
                    Some(held) if held.expires_at.timestamp_millis() <= now.timestamp_millis() => self.take_over(id, lease, &held, now).await,
                    _ => Ok(Claim::HeldElsewhere),
                }
            }
            Err(e) => Err(store_err(&self.tables.runs)(e)),
        }
    }

    #[instrument(skip_all, fields(run_id = %id, owners = owners.len()))]
    async fn set_owners(&self, id: &RunId, lease: &Lease, owners: &[Principal]) -> Result<(), StoreError> {
        let value = serde_dynamo::aws_sdk_dynamodb_1::to_attribute_value(owners).map_err(|e| StoreError::Rejected(defect("a run's owners", e)))?;
        let result = self
            .client
            .update_item()
            .table_name(&self.tables.runs)
            .set_key(Some(self.meta_key(id)))
            .update_expression("SET #owners = :owners")
            .condition_expression("#holder = :holder")
            .expression_attribute_names("#owners", "owners")
            .expression_attribute_names("#holder", "lease_holder")
            .expression_attribute_values(":owners", value)
            .expression_attribute_values(":holder", s(&lease.holder))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => Err(StoreError::LeaseLost(id.clone())),
            Err(e) => Err(store_err(&self.tables.runs)(e)),
        }
    }

    async fn renew(&self, id: &RunId, lease: &Lease) -> Result<Option<ControlRequest>, StoreError> {
        // The usual case, one conditional write: our lease, and nothing asked of the run.
        let renew = |condition: &str| {
            self.client
                .update_item()
                .table_name(&self.tables.runs)
                .set_key(Some(self.meta_key(id)))
                .update_expression("SET #expires = :expires, #sweep_at = :expires")
                .condition_expression(condition)
                .expression_attribute_names("#holder", "lease_holder")
                .expression_attribute_names("#expires", "lease_expires")
                .expression_attribute_names("#sweep_at", "sweep_at")
                .expression_attribute_values(":holder", s(&lease.holder))
                .expression_attribute_values(":expires", n(lease.expires_at.timestamp_millis()))
        };
        let quiet = renew("#holder = :holder AND attribute_not_exists(#control)").expression_attribute_names("#control", "control").send().await;
        match quiet {
            Ok(_) => return Ok(None),
            Err(e) if is_condition_failure(&e) => {}
            Err(e) => return Err(store_err(&self.tables.runs)(e)),
        }
        // Either the lease is gone or a control request waits: renew on the lease alone and
        // read the request back (rare: only while a request is being acted on).
        match renew("#holder = :holder").return_values(ReturnValue::AllNew).send().await {
            Ok(out) => {
                let item = out.attributes.unwrap_or_default();
                let name = item_name(&self.tables.runs, &item);
                match item.get("control") {
                    None => Ok(None),
                    Some(value) => serde_dynamo::aws_sdk_dynamodb_1::from_attribute_value(value.clone())
                        .map(Some)
                        .map_err(|e| StoreError::Corrupt(format!("{name}: control: {e}"))),
                }
            }
            Err(e) if is_condition_failure(&e) => Err(StoreError::LeaseLost(id.clone())),
            Err(e) => Err(store_err(&self.tables.runs)(e)),
        }
    }

    #[instrument(skip_all, fields(run_id = %id, kind = ?request.kind))]
    async fn request_control(&self, id: &RunId, request: &ControlRequest) -> Result<ControlOutcome, StoreError> {
        let value = serde_dynamo::aws_sdk_dynamodb_1::to_attribute_value(request)
            .map_err(|e| StoreError::Rejected(defect(&format!("the control request on run {id}"), e)))?;
        let update = |expression: &str, condition: &str| {
            self.client
                .update_item()
                .table_name(&self.tables.runs)
                .set_key(Some(self.meta_key(id)))
                .update_expression(expression)
                .condition_expression(condition)
                .expression_attribute_names("#control", "control")
                .expression_attribute_names("#status", "status")
                .expression_attribute_values(":request", value.clone())
        };
        // Each write is conditional on the state it was chosen for; a race sends us round
        // again, and the states only move forward, so this ends.
        for _ in 0..4 {
            // The META item as stored: status and request, without the run's documents.
            let Some(run) = self.get_meta(id).await? else { return Ok(ControlOutcome::NotFound) };
            let attempt = match &run.control {
                _ if run.status.is_terminal() => return Ok(ControlOutcome::Finished(run.status)),
                // The same request again: the SDK's retry of our write whose reply was lost.
                Some(stored) if stored == request => return Ok(ControlOutcome::Recorded),
                // A cancel overrides a pause not yet acted on; otherwise the first stands.
                Some(stored) if stored.kind == ControlKind::Pause && request.kind == ControlKind::Cancel => {
                    update("SET #control = :request", "#status IN (:queued, :running) AND #control.#kind = :pause")
                        .expression_attribute_names("#kind", "kind")
                        .expression_attribute_values(":queued", s("QUEUED"))
                        .expression_attribute_values(":running", s("RUNNING"))
                        .expression_attribute_values(":pause", s("pause"))
                }
                Some(stored) => return Ok(ControlOutcome::AlreadyRequested(stored.clone())),
                None if run.status == RunStatus::AwaitingInput && request.kind == ControlKind::Pause => return Ok(ControlOutcome::AlreadyWaiting),
                // Nobody holds a waiting run: queue it, due for the sweeper at once, for
                // the runner that ends it.
                None if run.status == RunStatus::AwaitingInput => update(
                    "SET #control = :request, #status = :queued, #shard = :shard, #sweep_at = :now REMOVE #waiting",
                    "#status = :waiting AND attribute_not_exists(#control)",
                )
                .expression_attribute_names("#shard", "sweep_shard")
                .expression_attribute_names("#sweep_at", "sweep_at")
                .expression_attribute_names("#waiting", "waiting")
                .expression_attribute_values(":queued", s("QUEUED"))
                .expression_attribute_values(":waiting", s("AWAITING_INPUT"))
                .expression_attribute_values(":shard", s(sweep_shard(id)))
                .expression_attribute_values(":now", n(request.at.timestamp_millis())),
                None => update("SET #control = :request", "#status IN (:queued, :running) AND attribute_not_exists(#control)")
                    .expression_attribute_values(":queued", s("QUEUED"))
                    .expression_attribute_values(":running", s("RUNNING")),
            };
            match attempt.send().await {
                Ok(_) => return Ok(ControlOutcome::Recorded),
                Err(e) if is_condition_failure(&e) => continue,
                Err(e) => return Err(store_err(&self.tables.runs)(e)),
            }
        }
        Err(StoreError::Unavailable(format!("run {id} kept changing while a control request was recorded; try again")))
    }

    #[instrument(skip_all, fields(run_id = %id, kind = ?waiting.kind))]
    async fn park(&self, id: &RunId, lease: &Lease, waiting: &Waiting, seen: Answered) -> Result<bool, StoreError> {
        let decisions = seen.decisions;
        let value = serde_dynamo::aws_sdk_dynamodb_1::to_attribute_value(waiting)
            .map_err(|e| StoreError::Rejected(defect(&format!("what run {id} waits for"), e)))?;
        // Out of the sweep index — a waiting run is nobody's to take over — until its
        // deadline, if it has one: then the sweeper hands it to a runner.
        let mut update = self.client.update_item().table_name(&self.tables.runs).set_key(Some(self.meta_key(id)));
        update = match waiting.deadline {
            Some(deadline) => update
                .update_expression(
                    "SET #status = :waiting_status, #waiting = :waiting, #deadline = :deadline, sweep_shard = :shard, sweep_at = :deadline REMOVE lease_holder, lease_expires, #control",
                )
                .expression_attribute_names("#deadline", "deadline_at")
                .expression_attribute_values(":deadline", n(deadline.timestamp_millis()))
                .expression_attribute_values(":shard", s(sweep_shard(id))),
            // A deadline an earlier wait had must not let this one be claimed.
            None => update
                .update_expression("SET #status = :waiting_status, #waiting = :waiting REMOVE lease_holder, lease_expires, sweep_shard, sweep_at, #control, #deadline")
                .expression_attribute_names("#deadline", "deadline_at"),
        };
        // Nor an input answer: the counter exists once the first was recorded.
        update = match seen.input_turns {
            0 => update.condition_expression(
                "lease_holder = :holder AND (attribute_not_exists(#decisions) OR size(#decisions) = :decided) AND attribute_not_exists(#turns)",
            ),
            turns => update
                .condition_expression(
                    "lease_holder = :holder AND (attribute_not_exists(#decisions) OR size(#decisions) = :decided) AND #turns = :turns",
                )
                .expression_attribute_values(":turns", n(turns)),
        };
        let result = update
            .expression_attribute_names("#turns", "input_turns")
            .expression_attribute_names("#status", "status")
            .expression_attribute_names("#waiting", "waiting")
            .expression_attribute_names("#control", "control")
            .expression_attribute_names("#decisions", "decisions")
            .expression_attribute_values(":holder", s(&lease.holder))
            .expression_attribute_values(":waiting_status", s("AWAITING_INPUT"))
            .expression_attribute_values(":waiting", value)
            .expression_attribute_values(":decided", n(decisions))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failure(&e) => match self.get_meta(id).await? {
                // The SDK's retry of our own write whose reply was lost.
                Some(stored) if stored.waiting.as_ref() == Some(waiting) => Ok(true),
                // A decision arrived since we read the run: go on with it instead.
                Some(stored)
                    if stored.lease_holder.as_deref() == Some(lease.holder.as_str())
                        && (stored.decisions.len() != decisions || stored.input_turns != seen.input_turns as u64) =>
                {
                    Ok(false)
                }
                _ => Err(StoreError::LeaseLost(id.clone())),
            },
            Err(e) => Err(store_err(&self.tables.runs)(e)),
        }
    }

    #[instrument(skip_all, fields(run_id = %id, step_id = %step, decision = ?decision.decision))]
    async fn decide(&self, id: &RunId, step: &StepId, decision: &ReviewDecision) -> Result<DecideOutcome, StoreError> {
        let stored = StoredDecision::from(decision);
        let encode = |e: serde_dynamo::Error| StoreError::Rejected(defect(&format!("the decision on step {step} of run {id}"), e));
        let one = serde_dynamo::aws_sdk_dynamodb_1::to_attribute_value(&stored).map_err(encode)?;
        let map = AttributeValue::M(HashMap::from([(step.to_string(), one.clone())]));
        // Each write is conditional on the state it was chosen for; a race sends us round
        // again, and the states only move forward, so this ends.
        for _ in 0..4 {
            // The META item as stored: status and decisions, without the run's documents.
            let Some(mut run) = self.get_meta(id).await? else { return Ok(DecideOutcome::NotFound) };
            if let Some(existing) = run.decisions.remove(step) {
                return Ok(DecideOutcome::AlreadyDecided(existing.into_decision(&format!("{} META of run {id}", self.tables.runs), step)?));
            }
            if run.status.is_terminal() {
                return Ok(DecideOutcome::Finished(run.status));
            }
            let first = run.decisions.is_empty();
            let requeue = run.status == RunStatus::AwaitingInput;
            let (set_decision, decision_absent) = match first {
                true => ("#decisions = :decisions", "attribute_not_exists(#decisions)"),
                false => ("#decisions.#step = :decision", "attribute_not_exists(#decisions.#step)"),
            };
            let mut update = self
                .client
                .update_item()
                .table_name(&self.tables.runs)
                .set_key(Some(self.meta_key(id)))
                .expression_attribute_names("#decisions", "decisions")
                .expression_attribute_names("#status", "status");
            update = match first {
                true => update.expression_attribute_values(":decisions", map.clone()),
                false => update.expression_attribute_names("#step", step.as_str()).expression_attribute_values(":decision", one.clone()),
            };
            update = match requeue {
                // Nobody holds a waiting run: queue it for the next runner.
                true => queue_waiting(update, id, decision.at + self.queued_grace)
                    .update_expression(format!("SET {set_decision}, {QUEUE_WAITING} REMOVE #waiting"))
                    .condition_expression(format!("{decision_absent} AND #status = :waiting_status")),
                false => update
                    .update_expression(format!("SET {set_decision}"))
                    .condition_expression(format!("{decision_absent} AND #status IN (:queued, :running)"))
                    .expression_attribute_values(":queued", s("QUEUED"))
                    .expression_attribute_values(":running", s("RUNNING")),
            };
            match update.send().await {
                Ok(_) => return Ok(DecideOutcome::Recorded { requeued: requeue }),
                Err(e) if is_condition_failure(&e) => continue,
                Err(e) => return Err(store_err(&self.tables.runs)(e)),
            }
        }
        Err(StoreError::Unavailable(format!("run {id} kept changing while a decision was recorded; try again")))
    }

    #[instrument(skip_all, fields(run_id = %id, step_id = %step, expected))]
    async fn record_input(
        &self,
        id: &RunId,
        step: &StepId,
        expected: u32,
        next: &crate::input::InputState,
        requeue: bool,
    ) -> Result<AnswerOutcome, StoreError> {
        let item_of = |run_item: &str| format!("{} META of run {id}{run_item}", self.tables.runs);
        let encode = |e: serde_dynamo::Error| StoreError::Rejected(defect(&format!("the input state of step {step} of run {id}"), e));
        let one = serde_dynamo::aws_sdk_dynamodb_1::to_attribute_value(StoredInput::from_state(next)).map_err(encode)?;
        let map = AttributeValue::M(HashMap::from([(step.to_string(), one.clone())]));
        // Each write is conditional on the state it was chosen for; a race sends us round
        // again, and versions only grow, so this ends.
        for _ in 0..4 {
            // The META item as stored: status and input states, without the run's documents.
            let Some(mut run) = self.get_meta(id).await? else { return Ok(AnswerOutcome::NotFound) };
            let first = run.inputs.is_empty();
            let stored = run.inputs.remove(step).map(|i| i.into_state(&item_of(""), step)).transpose()?.unwrap_or_default();
            if stored == *next {
                // The SDK's retry of our own write whose reply was lost.
                return Ok(AnswerOutcome::Recorded { requeued: false });
            }
            if run.status.is_terminal() {
                return Ok(AnswerOutcome::Finished(run.status));
            }
            if stored.version != expected {
                return Ok(AnswerOutcome::Stale(stored));
            }
            let requeued = requeue && run.status == RunStatus::AwaitingInput;
            let turns = next.turns.len().saturating_sub(stored.turns.len());
            let (set_state, state_is) = match (first, expected) {
                (true, _) => ("#inputs = :inputs", "attribute_not_exists(#inputs)"),
                (false, 0) => ("#inputs.#step = :state", "attribute_not_exists(#inputs.#step)"),
                (false, _) => ("#inputs.#step = :state", "#inputs.#step.#version = :expected"),
            };
            let mut update = self
                .client
                .update_item()
                .table_name(&self.tables.runs)
                .set_key(Some(self.meta_key(id)))
                .expression_attribute_names("#inputs", "inputs")
                .expression_attribute_names("#status", "status");
            update = match (first, expected) {
                (true, _) => update.expression_attribute_values(":inputs", map.clone()),
                (false, 0) => update.expression_attribute_names("#step", step.as_str()).expression_attribute_values(":state", one.clone()),
                (false, _) => update
                    .expression_attribute_names("#step", step.as_str())
                    .expression_attribute_names("#version", "version")
                    .expression_attribute_values(":state", one.clone())
                    .expression_attribute_values(":expected", n(expected)),
            };
            // An answer counts for the park check; reading free text or applying the deadline does not.
            let count = match turns {
                0 => "",
                _ => {
                    update = update.expression_attribute_names("#turns", "input_turns").expression_attribute_values(":turns", n(turns));
                    " ADD #turns :turns"
                }
            };
            update = match requeued {
                // Nobody holds a waiting run: queue it for the next runner.
                true => queue_waiting(update, id, Utc::now() + self.queued_grace)
                    .update_expression(format!("SET {set_state}, {QUEUE_WAITING} REMOVE #waiting{count}"))
                    .condition_expression(format!("{state_is} AND #status = :waiting_status")),
                false => update
                    .update_expression(format!("SET {set_state}{count}"))
                    .condition_expression(format!("{state_is} AND #status IN (:queued, :running, :waiting_status)"))
                    .expression_attribute_values(":queued", s("QUEUED"))
                    .expression_attribute_values(":running", s("RUNNING"))
                    .expression_attribute_values(":waiting_status", s("AWAITING_INPUT")),
            };
            match update.send().await {
                Ok(_) => return Ok(AnswerOutcome::Recorded { requeued }),
                Err(e) if is_condition_failure(&e) => continue,
                Err(e) => return Err(store_err(&self.tables.runs)(e)),
            }
        }
        Err(StoreError::Unavailable(format!("run {id} kept changing while an answer was recorded; try again")))
    }

    #[instrument(skip_all, fields(run_id = %id, by = %resumption.by))]
    async fn resume(&self, id: &RunId, resumption: &Resumption) -> Result<ResumeOutcome, StoreError> {
        let value = serde_dynamo::aws_sdk_dynamodb_1::to_attribute_value(resumption)
            .map_err(|e| StoreError::Rejected(defect(&format!("the resume of run {id}"), e)))?;
        let due = resumption.at + self.queued_grace;
        let update = self
            .client
            .update_item()
            .table_name(&self.tables.runs)
            .set_key(Some(self.meta_key(id)))
            .update_expression(match resumption.budget {
                Some(_) => "SET #status = :queued, #resumed = :resumed, #shard = :shard, #sweep_at = :due, #raises = list_append(if_not_exists(#raises, :none), :raise) REMOVE #waiting",
                None => "SET #status = :queued, #resumed = :resumed, #shard = :shard, #sweep_at = :due REMOVE #waiting",
            })
            .condition_expression("#status = :waiting_status")
            .expression_attribute_names("#status", "status")
            .expression_attribute_names("#resumed", "resumed")
            .expression_attribute_names("#shard", "sweep_shard")
            .expression_attribute_names("#sweep_at", "sweep_at")
            .expression_attribute_names("#waiting", "waiting")
            .expression_attribute_values(":queued", s("QUEUED"))
            .expression_attribute_values(":waiting_status", s("AWAITING_INPUT"))
            .expression_attribute_values(":resumed", value)
            .expression_attribute_values(":shard", s(sweep_shard(id)))
            .expression_attribute_values(":due", n(due.timestamp_millis()));
        let update = match &resumption.budget {
            Some(raise) => {
                let raise = serde_dynamo::aws_sdk_dynamodb_1::to_attribute_value(vec![raise.clone()])
                    .map_err(|e| StoreError::Rejected(defect(&format!("the budget raise of run {id}"), e)))?;
                update
                    .expression_attribute_names("#raises", "budget_raises")
                    .expression_attribute_values(":none", AttributeValue::L(Vec::new()))
                    .expression_attribute_values(":raise", raise)
            }
            None => update,
        };
        let result = update.send().await;
        match result {
            Ok(_) => Ok(ResumeOutcome::Resumed),
            Err(e) if is_condition_failure(&e) => Ok(match self.get_run(id).await? {
                None => ResumeOutcome::NotFound,
                // The SDK's retry of our own write whose reply was lost.
                Some(run) if run.resumed.as_ref() == Some(resumption) => ResumeOutcome::Resumed,
                Some(run) => ResumeOutcome::NotWaiting(run.status),
            }),
            Err(e) => Err(store_err(&self.tables.runs)(e)),
        }
    }

    async fn due(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<RunId>, StoreError> {
        let mut due = Vec::new();
        for shard in sweep_shards() {
            let mut start = None;
            while due.len() < limit {
                let out = self
                    .client
                    .query()
                    .table_name(&self.tables.runs)
                    .index_name(SWEEP_INDEX)
                    .key_condition_expression("#shard = :shard AND #sweep_at <= :now")
                    .expression_attribute_names("#shard", "sweep_shard")
                    .expression_attribute_names("#sweep_at", "sweep_at")
                    .expression_attribute_values(":shard", s(&shard))
                    .expression_attribute_values(":now", n(now.timestamp_millis()))
                    .limit(i32::try_from(limit - due.len()).unwrap_or(i32::MAX))
                    .set_exclusive_start_key(start)
                    .send()
                    .await
                    .map_err(store_err(&self.tables.runs))?;
                for item in out.items.unwrap_or_default() {
                    let pk = item.get("pk").and_then(|v| v.as_s().ok()).map(String::as_str).unwrap_or_default();
                    let id = pk.strip_prefix("RUN#").and_then(|raw| RunId::parse(raw).ok());
                    let id = id.ok_or_else(|| {
                        StoreError::Corrupt(format!("{}: index {SWEEP_INDEX} holds a key {pk:?} that is not a run", self.tables.runs))
                    })?;
                    due.push(id);
                }
                match out.last_evaluated_key {
                    Some(k) => start = Some(k),
                    None => break,
                }
            }
        }
        Ok(due)
    }

    #[instrument(skip_all, fields(run_id = %id, step_id = %step.step_id))]
    async fn save_step(&self, id: &RunId, lease: &Lease, step: &StepRecord) -> Result<(), StoreError> {
        let [lease_check, put] = checkpoint_writes(&self.tables, self.blobs.as_ref(), id, lease, step).await?;
        let result = self.client.transact_write_items().transact_items(lease_check).transact_items(put).send().await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => Err(StoreError::LeaseLost(id.clone())),
            Err(e) => Err(store_err(&self.tables.runs)(e)),
        }
    }

    #[instrument(skip_all, fields(run_id = %id, step_id = %step, index = item.index))]
    async fn save_item(&self, id: &RunId, lease: &Lease, step: &StepId, revision: u32, item: &ItemRecord) -> Result<(), StoreError> {
        let what = format!("the checkpoint of item {} of step {step} of run {id}", item.index);
        let row = MapItemRow {
            pk: run_pk(id),
            sk: format!("{}{:06}", item_prefix(step, revision), item.index),
            index: item.index,
            status: item.status,
            attempts: item.attempts,
            output: item.output.as_ref().map(json_string),
            text: item.text.clone(),
            usage: item.usage,
            cost: item.cost,
            calls: item.calls,
            error: item.error.clone(),
            lost: item.lost,
            in_flight: item.in_flight,
        };
        let row = fit(self.blobs.as_ref(), id, to_item(&row, &what)?, &what).await?;
        let [lease_check, put] = fenced_put(&self.tables, id, lease, row)?;
        let result = self.client.transact_write_items().transact_items(lease_check).transact_items(put).send().await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => Err(StoreError::LeaseLost(id.clone())),
            Err(e) => Err(store_err(&self.tables.runs)(e)),
        }
    }

    async fn get_items(&self, id: &RunId, step: &StepId, revision: u32) -> Result<Vec<ItemRecord>, StoreError> {
        let mut items = Vec::new();
        for item in self.query_run(id, &item_prefix(step, revision)).await? {
            let item = restored(self.blobs.as_ref(), &self.tables.runs, item).await?;
            let name = item_name(&self.tables.runs, &item);
            let row: MapItemRow = from_item(&self.tables.runs, item)?;
            items.push(ItemRecord {
                output: row.output.as_deref().map(|o| parse_json(o, &name, "output")).transpose()?,
                index: row.index,
                status: row.status,
                attempts: row.attempts,
                text: row.text,
                usage: row.usage,
                cost: row.cost,
                calls: row.calls,
                error: row.error,
                lost: row.lost,
                in_flight: row.in_flight,
            });
        }
        Ok(items)
    }

    #[instrument(skip_all, fields(run_id = %run.id, status = ?run.status))]
    async fn finish_run(&self, run: &RunRecord, lease: &Lease) -> Result<(), StoreError> {
        let encode = |what: &str, e: serde_dynamo::Error| StoreError::Rejected(defect(&format!("the {what} of run {}", run.id), e));
        let totals = serde_dynamo::aws_sdk_dynamodb_1::to_attribute_value(run.totals).map_err(|e| encode("totals", e))?;
        let status = serde_json::to_value(run.status).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        let mut update = self
            .client
            .update_item()
            .table_name(&self.tables.runs)
            .set_key(Some(self.meta_key(&run.id)))
            .condition_expression("lease_holder = :holder")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":holder", s(&lease.holder))
            .expression_attribute_values(":status", s(status))
            .expression_attribute_values(":finished", s(stored_instant(&run.finished_at.unwrap_or_else(Utc::now))))
            .expression_attribute_values(":totals", totals);
        // Every attribute is aliased: several names here (status, output, error) are
        // DynamoDB reserved words. The record ends up with exactly the output and error
        // given: an absent one is removed, as the in-memory store replaces it.
        let mut set = vec!["#status = :status", "#finished = :finished", "#totals = :totals"];
        let mut remove = vec!["lease_holder", "lease_expires", "sweep_shard", "sweep_at"];
        update = update
            .expression_attribute_names("#finished", "finished_at")
            .expression_attribute_names("#totals", "totals")
            .expression_attribute_names("#output", "output")
            .expression_attribute_names("#error", "error");
        update = update.expression_attribute_names("#output_s3", "output_s3");
        match &run.output {
            // Half the item stays for the definition and input beside it.
            Some(output) if json_len(output) > MAX_ITEM_BYTES / 2 => {
                let what = format!("the output of run {}", run.id);
                let Some(blobs) = &self.blobs else {
                    return Err(StoreError::TooLarge(format!(
                        "{what} is {} bytes; at most {} fit in its record without an outputs bucket (DynamoDB items are limited to 400 KB)",
                        json_len(output),
                        MAX_ITEM_BYTES / 2
                    )));
                };
                let key = blobs.store(&run.id, json_string(output), &what).await?;
                update = update.expression_attribute_values(":output_s3", s(key));
                set.push("#output_s3 = :output_s3");
                remove.push("#output");
            }
            Some(output) => {
                update = update.expression_attribute_values(":output", s(json_string(output)));
                set.push("#output = :output");
                remove.push("#output_s3");
            }
            None => remove.extend(["#output", "#output_s3"]),
        }
        match &run.error {
            Some(error) => {
                let error = serde_dynamo::aws_sdk_dynamodb_1::to_attribute_value(error).map_err(|e| encode("error", e))?;
                update = update.expression_attribute_values(":error", error);
                set.push("#error = :error");
            }
            None => remove.push("#error"),
        }
        let expression = format!("SET {} REMOVE {}", set.join(", "), remove.join(", "));
        match update.update_expression(expression).send().await {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => match self.get_run(&run.id).await? {
                // The SDK's retry of our own update whose reply was lost: the end is stored.
                Some(stored)
                    if stored.status == run.status
                        && stored.finished_at.map(|t| t.timestamp_millis()) == run.finished_at.map(|t| t.timestamp_millis()) =>
                {
                    Ok(())
                }
                _ => Err(StoreError::LeaseLost(run.id.clone())),
            },
            Err(e) => Err(store_err(&self.tables.runs)(e)),
        }
    }

    async fn release(&self, id: &RunId, lease: &Lease) -> Result<(), StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.tables.runs)
            .set_key(Some(self.meta_key(id)))
            .update_expression("SET #sweep_at = :due REMOVE lease_holder, lease_expires")
            .condition_expression("lease_holder = :holder")
            .expression_attribute_names("#sweep_at", "sweep_at")
            .expression_attribute_values(":holder", s(&lease.holder))
            .expression_attribute_values(":due", n((Utc::now() + self.queued_grace).timestamp_millis()))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => match self.get_meta(id).await? {
                // The SDK's retry of our own release whose reply was lost.
                Some(stored) if stored.lease_holder.is_none() && !stored.status.is_terminal() => Ok(()),
                _ => Err(StoreError::LeaseLost(id.clone())),
            },
            Err(e) => Err(store_err(&self.tables.runs)(e)),
        }
    }

    #[instrument(skip_all, fields(run_id = %id, revision = revision.revision, step_id = %revision.step))]
    async fn start_revision(&self, id: &RunId, revision: &Revision, overridden: Option<&StepRecord>) -> Result<RevisionOutcome, StoreError> {
        let encode = |e: serde_dynamo::Error| StoreError::Rejected(defect(&format!("revision {} of run {id}", revision.revision), e));
        let entry = serde_dynamo::aws_sdk_dynamodb_1::to_attribute_value(vec![revision.clone()]).map_err(encode)?;
        let Some(stored) = self.get_meta(id).await? else { return Ok(RevisionOutcome::NotFound) };
        let previous = revision.revision.saturating_sub(1);
        if stored.revision != previous || !stored.status.is_terminal() {
            return Ok(revision_refused(&stored, revision));
        }
        // The decisions of reviews the revision runs again are asked for again (each
        // revision's checkpoints keep the decisions it ran with).
        let decided: Vec<&StepId> = revision.rerun.iter().filter(|s| stored.decisions.contains_key(*s)).collect();
        // So are input steps, whose answers leave the park's count of answers with them.
        let answered: Vec<&StepId> = revision.rerun.iter().filter(|s| stored.inputs.contains_key(*s)).collect();
        let mut dropped_turns = 0u64;
        for step in &answered {
            let name = format!("{} META of run {id}", self.tables.runs);
            let state = StoredInput { version: 0, state: stored.inputs[*step].state.clone() }.into_state(&name, step)?;
            dropped_turns += state.turns.len() as u64;
        }
        let mut remove = ["finished_at", "#output", "output_s3", "#error", "#control", "#waiting"].join(", ");
        for n in 0..decided.len() {
            remove.push_str(&format!(", #decisions.#d{n}"));
        }
        for n in 0..answered.len() {
            remove.push_str(&format!(", #inputs.#i{n}"));
        }
        let mut set = "#status = :queued, #revision = :revision, #revisions = list_append(if_not_exists(#revisions, :none), :entry), #shard = :shard, #sweep_at = :due".to_owned();
        // The park checks the count exists only once an answer was recorded: none left, none.
        let turns_left = stored.input_turns.saturating_sub(dropped_turns);
        match (answered.is_empty(), turns_left) {
            (true, _) => {}
            (false, 0) => remove.push_str(", #turns"),
            (false, _) => set.push_str(", #turns = :turns"),
        }
        if revision.budget.is_some() {
            set.push_str(", #raises = list_append(if_not_exists(#raises, :none), :raise)");
        }
        let same_revision = match previous {
            0 => "attribute_not_exists(#revision)",
            _ => "#revision = :previous",
        };
        let mut update = aws_sdk_dynamodb::types::Update::builder()
            .table_name(&self.tables.runs)
            .set_key(Some(self.meta_key(id)))
            .update_expression(format!("SET {set} REMOVE {remove}"))
            .condition_expression(format!("{same_revision} AND #status IN (:completed, :failed, :cancelled)"))
            .expression_attribute_names("#status", "status")
            .expression_attribute_names("#revision", "revision")
            .expression_attribute_names("#revisions", "revisions")
            .expression_attribute_names("#shard", "sweep_shard")
            .expression_attribute_names("#sweep_at", "sweep_at")
            .expression_attribute_names("#output", "output")
            .expression_attribute_names("#error", "error")
            .expression_attribute_names("#control", "control")
            .expression_attribute_names("#waiting", "waiting")
            .expression_attribute_values(":queued", s("QUEUED"))
            .expression_attribute_values(":completed", s("COMPLETED"))
            .expression_attribute_values(":failed", s("FAILED"))
            .expression_attribute_values(":cancelled", s("CANCELLED"))
            .expression_attribute_values(":revision", n(revision.revision))
            .expression_attribute_values(":none", AttributeValue::L(Vec::new()))
            .expression_attribute_values(":entry", entry)
            .expression_attribute_values(":shard", s(sweep_shard(id)))
            .expression_attribute_values(":due", n((revision.at + self.queued_grace).timestamp_millis()));
        if previous > 0 {
            update = update.expression_attribute_values(":previous", n(previous));
        }
        if !decided.is_empty() {
            update = update.expression_attribute_names("#decisions", "decisions");
            for (n, step) in decided.iter().enumerate() {
                update = update.expression_attribute_names(format!("#d{n}"), step.as_str());
            }
        }
        if !answered.is_empty() {
            update = update.expression_attribute_names("#inputs", "inputs").expression_attribute_names("#turns", "input_turns");
            if turns_left > 0 {
                update = update.expression_attribute_values(":turns", n(turns_left));
            }
            for (n, step) in answered.iter().enumerate() {
                update = update.expression_attribute_names(format!("#i{n}"), step.as_str());
            }
        }
        if let Some(raise) = &revision.budget {
            let raise = serde_dynamo::aws_sdk_dynamodb_1::to_attribute_value(vec![raise.clone()]).map_err(encode)?;
            update = update.expression_attribute_names("#raises", "budget_raises").expression_attribute_values(":raise", raise);
        }
        let update = update.build().map_err(|e| StoreError::Rejected(defect("the update starting a revision", e)))?;
        let mut request = self.client.transact_write_items().transact_items(TransactWriteItem::builder().update(update).build());
        if let Some(record) = overridden {
            let item = step_item(self.blobs.as_ref(), id, record).await?;
            let put = Put::builder()
                .table_name(&self.tables.runs)
                .set_item(Some(item))
                .build()
                .map_err(|e| StoreError::Rejected(defect("the overridden step's checkpoint", e)))?;
            request = request.transact_items(TransactWriteItem::builder().put(put).build());
        }
        match request.send().await {
            Ok(_) => Ok(RevisionOutcome::Started),
            Err(e) if is_condition_failure(&e) => match self.get_meta(id).await? {
                Some(stored) => Ok(revision_refused(&stored, revision)),
                None => Ok(RevisionOutcome::NotFound),
            },
            Err(e) => Err(store_err(&self.tables.runs)(e)),
        }
    }
}

/// The `SET` clause that queues a waiting run again for any runner, due for the sweeper at
/// `:due`; [`queue_waiting`] names what it uses (and `#waiting`, `:waiting_status`, which
/// the callers' `REMOVE #waiting` and condition use).
const QUEUE_WAITING: &str = "#status = :queued, #shard = :shard, #sweep_at = :due";

/// The names and values of [`QUEUE_WAITING`], for a run due at `due` unless claimed first.
fn queue_waiting(
    update: aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder,
    id: &RunId,
    due: DateTime<Utc>,
) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
    update
        .expression_attribute_names("#shard", "sweep_shard")
        .expression_attribute_names("#sweep_at", "sweep_at")
        .expression_attribute_names("#waiting", "waiting")
        .expression_attribute_values(":queued", s("QUEUED"))
        .expression_attribute_values(":waiting_status", s("AWAITING_INPUT"))
        .expression_attribute_values(":shard", s(sweep_shard(id)))
        .expression_attribute_values(":due", n(due.timestamp_millis()))
}

/// Why a revision did not start on the run as `stored`; `Started` if it is this very
/// revision (the SDK's retry of our own write whose reply was lost).
fn revision_refused(stored: &RunItem, revision: &Revision) -> RevisionOutcome {
    match stored.revisions.get(revision.revision.saturating_sub(1) as usize) {
        Some(started) if started == revision => RevisionOutcome::Started,
        _ if stored.revision + 1 != revision.revision => RevisionOutcome::Moved(stored.revision),
        _ => RevisionOutcome::NotFinished(stored.status),
    }
}

/// The attributes of a run META item that history lists.
#[derive(Deserialize)]
struct SummaryItem {
    id: RunId,
    workflow: WorkflowName,
    caller: UserId,
    owners: Vec<Principal>,
    status: RunStatus,
    created_at: String,
    #[serde(default)]
    started_at: Option<DateTime<Utc>>,
    #[serde(default)]
    finished_at: Option<DateTime<Utc>>,
    #[serde(default)]
    error: Option<ErrorInfo>,
    totals: Totals,
}

fn stored_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// An instant as stored outside the GSI sort keys: at full precision, as serde writes
/// the record's own times, so every time reads back exactly as it was given.
pub(super) fn stored_instant(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

fn parse_stored_time(raw: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt(format!("created_at {raw:?} is not a time: {e}")))
}

/// The position a GSI key (an item's or a `LastEvaluatedKey`) stands for.
fn cursor_of(key: &Item) -> Result<RunCursor, StoreError> {
    let text = |name: &str| match key.get(name) {
        Some(AttributeValue::S(v)) => Ok(v.as_str()),
        _ => Err(StoreError::Corrupt(format!("history key without {name}"))),
    };
    let run_id = text("pk")?.strip_prefix("RUN#").and_then(|id| RunId::parse(id).ok()).ok_or_else(|| StoreError::Corrupt("history key pk".into()))?;
    Ok(RunCursor { created_at: parse_stored_time(text("created_at")?)?, run_id })
}

#[async_trait]
impl RunHistory for DynamoStore {
    /// Queries the index newest first in pages, keeps the runs the caller may see, and
    /// stops at `limit` of them or after the read bound. The cursor is the GSI position
    /// (created_at, run) of the last run returned — or, when the bound stopped the walk,
    /// of the last run examined, so the next call does not re-read invisible runs.
    #[instrument(skip_all, fields(index = ?query.index, limit = query.limit))]
    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage, StoreError> {
        let (index, hash_name, hash_value) = match &query.index {
            RunIndex::Caller(caller) => ("by-caller", "caller", caller),
            RunIndex::Workflow(workflow) => ("by-workflow", "workflow", workflow),
        };
        let limit = query.limit.max(1) as usize;
        let key_of = |c: &RunCursor| -> Item {
            HashMap::from([
                ("pk".to_owned(), s(run_pk(&c.run_id))),
                ("sk".to_owned(), s("META")),
                (hash_name.to_owned(), s(hash_value)),
                ("created_at".to_owned(), s(stored_time(&c.created_at))),
            ])
        };
        let mut start = query.after.as_ref().map(key_of);
        let mut items: Vec<RunSummary> = Vec::new();
        for _ in 0..self.history.max_pages {
            let out = self
                .client
                .query()
                .table_name(&self.tables.runs)
                .index_name(index)
                .key_condition_expression("#hash = :hash")
                // Only what a summary shows: definitions, inputs and outputs stay behind.
                .projection_expression("#id, #workflow, #caller, #owners, #status, #created, #started, #finished, #error, #totals")
                .expression_attribute_names("#hash", hash_name)
                .expression_attribute_names("#id", "id")
                .expression_attribute_names("#workflow", "workflow")
                .expression_attribute_names("#caller", "caller")
                .expression_attribute_names("#owners", "owners")
                .expression_attribute_names("#status", "status")
                .expression_attribute_names("#created", "created_at")
                .expression_attribute_names("#started", "started_at")
                .expression_attribute_names("#finished", "finished_at")
                .expression_attribute_names("#error", "error")
                .expression_attribute_names("#totals", "totals")
                .expression_attribute_values(":hash", s(hash_value))
                .scan_index_forward(false)
                .limit(self.history.page_size)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(store_err(&self.tables.runs))?;
            for item in out.items.unwrap_or_default() {
                let run: SummaryItem = from_item(&self.tables.runs, item)?;
                if !run.owners.iter().any(|o| query.visible_to.contains(o)) {
                    continue;
                }
                if items.len() == limit {
                    // A further visible run exists: the next page starts after our last one.
                    let next = items.last().map(|r| RunCursor { created_at: r.created_at, run_id: r.id.clone() });
                    return Ok(RunPage { items, next });
                }
                items.push(RunSummary {
                    created_at: parse_stored_time(&run.created_at)?,
                    id: run.id,
                    workflow: run.workflow,
                    caller: run.caller,
                    status: run.status,
                    started_at: run.started_at,
                    finished_at: run.finished_at,
                    error: run.error,
                    totals: run.totals,
                });
            }
            match out.last_evaluated_key {
                None => return Ok(RunPage { items, next: None }),
                Some(key) if items.len() == limit => return Ok(RunPage { items, next: Some(cursor_of(&key)?) }),
                Some(key) => start = Some(key),
            }
        }
        debug!(found = items.len(), "history read bound reached");
        let next = start.as_ref().map(cursor_of).transpose()?;
        Ok(RunPage { items, next })
    }
}
