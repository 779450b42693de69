//! DynamoDB implementations of [`RunStore`], [`ProgressSink`] and [`ProgressReader`].
//!
//! Layout (see `infra/tables.json`):
//! - runs: `pk = RUN#<id>`; `sk = META` holds the run record and the lease, `sk = STEP#<id>`
//!   one checkpoint per step. JSON documents (definition, input, outputs) are stored as
//!   strings: they round-trip exactly, whereas DynamoDB numbers and empty strings would not.
//! - events: `pk = RUN#<id>`, `seq` (number). Appended with `attribute_not_exists`, so a seq
//!   is written once.
//! - progress: `pk = <principal>`, `sk = RUN#<id>`, one row per run per owner.
//! - history reads the runs table's GSIs `by-caller` / `by-workflow` (`created_at` sort),
//!   newest first, and filters by the run's owners (see [`RunHistory`]).
//!
//! DynamoDB rejects expression attribute values that an expression does not use (the local
//! moto server does not), so every expression below uses exactly the values it passes.

use super::{describe, transient};
use crate::config::Tables;
use crate::ids::{Principal, RunId, StepId};
use crate::money::Usd;
use crate::ports::*;
use crate::pricing::Usage;
use crate::run::*;
use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::{AttributeValue, ConditionCheck, Put, ReturnValue, TransactWriteItem, Update};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use tracing::{debug, instrument};

pub(super) type Item = HashMap<String, AttributeValue>;

/// DynamoDB's item limit is 400 KB; stay under it with room for attribute names.
const MAX_ITEM_BYTES: usize = 390 * 1024;

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

/// How a DynamoDB call failed: `Ok(message)` when a retry can help (transport, throttling,
/// 5xx), `Err(message)` when it cannot (a malformed request is a defect here).
pub(super) fn classify<E>(err: SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>) -> Result<String, String>
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    let (code, message) = describe(&err);
    if transient(&err) || code.as_deref() == Some("ProvisionedThroughputExceededException") {
        Ok(message)
    } else {
        Err(format!("{}: {message}", code.unwrap_or_default()))
    }
}

pub(super) fn store_err<E>(err: SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>) -> StoreError
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    classify(err).map_or_else(StoreError::Corrupt, StoreError::Unavailable)
}

fn progress_err<E>(err: SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>) -> ProgressError
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    classify(err).map_or_else(ProgressError::Corrupt, ProgressError::Unavailable)
}

pub(super) fn is_condition_failure<E: aws_sdk_dynamodb::error::ProvideErrorMetadata>(
    err: &SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>,
) -> bool {
    use aws_sdk_dynamodb::error::ProvideErrorMetadata;
    matches!(err.code(), Some("ConditionalCheckFailedException"))
        || (err.code() == Some("TransactionCanceledException") && err.message().unwrap_or_default().contains("ConditionalCheckFailed"))
}

fn json_string(v: &Value) -> String {
    v.to_string()
}

fn parse_json(raw: &str, what: &str) -> Result<Value, StoreError> {
    serde_json::from_str(raw).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// A run's META item, as stored.
#[derive(Serialize, Deserialize)]
struct RunItem {
    pk: String,
    sk: String,
    id: RunId,
    workflow: String,
    definition: String,
    input: String,
    caller: String,
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
        }
    }

    fn into_record(self) -> Result<RunRecord, StoreError> {
        Ok(RunRecord {
            definition: parse_json(&self.definition, "run definition")?,
            input: parse_json(&self.input, "run input")?,
            output: self.output.as_deref().map(|o| parse_json(o, "run output")).transpose()?,
            created_at: DateTime::parse_from_rfc3339(&self.created_at)
                .map_err(|e| StoreError::Corrupt(format!("created_at: {e}")))?
                .with_timezone(&Utc),
            id: self.id,
            workflow: self.workflow,
            caller: self.caller,
            owners: self.owners,
            status: self.status,
            started_at: self.started_at,
            finished_at: self.finished_at,
            error: self.error,
            step_order: self.step_order,
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
    model: Option<String>,
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
}

fn to_item<T: Serialize>(value: &T) -> Result<Item, StoreError> {
    serde_dynamo::aws_sdk_dynamodb_1::to_item(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_item<T: for<'de> Deserialize<'de>>(item: Item) -> Result<T, StoreError> {
    serde_dynamo::aws_sdk_dynamodb_1::from_item(item).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Rough size of an item as DynamoDB counts it (names + values), to refuse oversize
/// items with a clear error instead of an opaque ValidationException.
fn item_size(item: &Item) -> usize {
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

#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    tables: Tables,
    history: HistoryPaging,
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
        Self { client, tables, history: HistoryPaging { page_size: 100, max_pages: 5 } }
    }

    /// Changes the history read bound (default: 5 pages of 100 runs), e.g. to exercise it.
    pub fn with_history_bound(mut self, page_size: u32, max_pages: usize) -> Self {
        self.history = HistoryPaging { page_size: page_size.clamp(1, 1000) as i32, max_pages: max_pages.max(1) };
        self
    }

    fn meta_key(&self, id: &RunId) -> Item {
        HashMap::from([("pk".to_owned(), s(run_pk(id))), ("sk".to_owned(), s("META"))])
    }
}

#[async_trait]
impl RunStore for DynamoStore {
    #[instrument(skip_all, fields(run_id = %run.id))]
    async fn create_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        let item = to_item(&RunItem::from_record(run))?;
        check_size(&item, "the run (definition + input)")?;
        let result =
            self.client.put_item().table_name(&self.tables.runs).set_item(Some(item)).condition_expression("attribute_not_exists(pk)").send().await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => Err(StoreError::AlreadyExists(run.id.clone())),
            Err(e) => Err(store_err(e)),
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
            .map_err(store_err)?;
        out.item.map(|item| from_item::<RunItem>(item)?.into_record()).transpose()
    }

    async fn get_steps(&self, id: &RunId) -> Result<Vec<StepRecord>, StoreError> {
        let mut steps = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.tables.runs)
                .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
                .expression_attribute_values(":pk", s(run_pk(id)))
                .expression_attribute_values(":prefix", s("STEP#"))
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(store_err)?;
            for item in out.items.unwrap_or_default() {
                let step: StepItem = from_item(item)?;
                steps.push(StepRecord {
                    output: step.output.as_deref().map(|o| parse_json(o, "step output")).transpose()?,
                    detail: step.detail.as_deref().map(|d| parse_json(d, "step detail")).transpose()?,
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
                });
            }
            match out.last_evaluated_key {
                Some(k) => start = Some(k),
                None => break,
            }
        }
        Ok(steps)
    }

    #[instrument(skip_all, fields(run_id = %id, holder = %lease.holder))]
    async fn claim(&self, id: &RunId, lease: &Lease, now: DateTime<Utc>) -> Result<Claim, StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.tables.runs)
            .set_key(Some(self.meta_key(id)))
            .update_expression("SET #status = :running, #holder = :holder, #expires = :expires, #started = if_not_exists(#started, :now_iso)")
            .condition_expression(
                "attribute_exists(pk) AND (#status = :queued OR (#status = :running AND (attribute_not_exists(#expires) OR #expires < :now)))",
            )
            .expression_attribute_names("#status", "status")
            .expression_attribute_names("#holder", "lease_holder")
            .expression_attribute_names("#expires", "lease_expires")
            .expression_attribute_names("#started", "started_at")
            .expression_attribute_values(":running", s("RUNNING"))
            .expression_attribute_values(":queued", s("QUEUED"))
            .expression_attribute_values(":holder", s(&lease.holder))
            .expression_attribute_values(":expires", n(lease.expires_at.timestamp_millis()))
            .expression_attribute_values(":now", n(now.timestamp_millis()))
            .expression_attribute_values(":now_iso", s(now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match result {
            Ok(out) => {
                let item = out.attributes.ok_or_else(|| StoreError::Corrupt("claim returned no item".into()))?;
                Ok(Claim::Acquired(Box::new(from_item::<RunItem>(item)?.into_record()?)))
            }
            Err(e) if is_condition_failure(&e) => Ok(match self.get_run(id).await? {
                None => Claim::NotFound,
                Some(run) if run.status.is_terminal() => Claim::Finished,
                Some(_) => Claim::HeldElsewhere,
            }),
            Err(e) => Err(store_err(e)),
        }
    }

    #[instrument(skip_all, fields(run_id = %id, step_id = %step.step_id))]
    async fn save_step(&self, id: &RunId, lease: &Lease, step: &StepRecord) -> Result<(), StoreError> {
        let item = to_item(&StepItem {
            pk: run_pk(id),
            sk: format!("STEP#{}", step.step_id),
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
        })?;
        check_size(&item, &format!("the checkpoint of step {}", step.step_id))?;
        // The checkpoint only lands while our lease stands: a runner that lost its lease
        // (and whose run was taken over) cannot overwrite the new runner's work.
        let lease_check = ConditionCheck::builder()
            .table_name(&self.tables.runs)
            .set_key(Some(self.meta_key(id)))
            .condition_expression("lease_holder = :holder")
            .expression_attribute_values(":holder", s(&lease.holder))
            .build()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let put = Put::builder().table_name(&self.tables.runs).set_item(Some(item)).build().map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let result = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().condition_check(lease_check).build())
            .transact_items(TransactWriteItem::builder().put(put).build())
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => Err(StoreError::LeaseLost(id.clone())),
            Err(e) => Err(store_err(e)),
        }
    }

    #[instrument(skip_all, fields(run_id = %run.id, status = ?run.status))]
    async fn finish_run(&self, run: &RunRecord, lease: &Lease) -> Result<(), StoreError> {
        let totals = serde_dynamo::aws_sdk_dynamodb_1::to_attribute_value(run.totals).map_err(|e| StoreError::Corrupt(e.to_string()))?;
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
            .expression_attribute_values(
                ":finished",
                s(run.finished_at.unwrap_or_else(Utc::now).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            )
            .expression_attribute_values(":totals", totals);
        // Every attribute is aliased: several names here (status, output, error) are
        // DynamoDB reserved words.
        let mut set = vec!["#status = :status", "#finished = :finished", "#totals = :totals"];
        update = update.expression_attribute_names("#finished", "finished_at").expression_attribute_names("#totals", "totals");
        if let Some(output) = &run.output {
            let output = json_string(output);
            if output.len() > MAX_ITEM_BYTES / 2 {
                return Err(StoreError::TooLarge(format!("the run output is {} bytes", output.len())));
            }
            update = update.expression_attribute_values(":output", s(output)).expression_attribute_names("#output", "output");
            set.push("#output = :output");
        }
        if let Some(error) = &run.error {
            let error = serde_dynamo::aws_sdk_dynamodb_1::to_attribute_value(error).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            update = update.expression_attribute_values(":error", error).expression_attribute_names("#error", "error");
            set.push("#error = :error");
        }
        let expression = format!("SET {} REMOVE lease_holder, lease_expires", set.join(", "));
        match update.update_expression(expression).send().await {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => Err(StoreError::LeaseLost(run.id.clone())),
            Err(e) => Err(store_err(e)),
        }
    }

    async fn release(&self, id: &RunId, lease: &Lease) -> Result<(), StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.tables.runs)
            .set_key(Some(self.meta_key(id)))
            .update_expression("REMOVE lease_holder, lease_expires")
            .condition_expression("lease_holder = :holder")
            .expression_attribute_values(":holder", s(&lease.holder))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => Err(StoreError::LeaseLost(id.clone())),
            Err(e) => Err(store_err(e)),
        }
    }
}

/// The attributes of a run META item that history lists.
#[derive(Deserialize)]
struct SummaryItem {
    id: RunId,
    workflow: String,
    caller: String,
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

fn parse_stored_time(raw: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(raw).map(|t| t.with_timezone(&Utc)).map_err(|e| StoreError::Corrupt(format!("created_at {raw:?}: {e}")))
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
                .map_err(store_err)?;
            for item in out.items.unwrap_or_default() {
                let run: SummaryItem = from_item(item)?;
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

/// Event log and progress feeds.
#[derive(Clone)]
pub struct DynamoProgress {
    client: Client,
    tables: Tables,
    retention: chrono::Duration,
}

impl DynamoProgress {
    pub fn new(client: Client, tables: Tables, retention_days: u32) -> Self {
        Self { client, tables, retention: chrono::Duration::days(i64::from(retention_days)) }
    }
}

#[derive(Serialize, Deserialize)]
struct EventItem {
    pk: String,
    seq: u64,
    run_id: RunId,
    at: DateTime<Utc>,
    #[serde(rename = "type")]
    kind: EventType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    step_id: Option<StepId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    attempt: Option<u32>,
    data: String,
    expires_at: i64,
}

#[derive(Serialize, Deserialize)]
struct ProgressItem {
    pk: String,
    sk: String,
    run_id: RunId,
    workflow: String,
    status: RunStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    current_step: Option<StepId>,
    totals: Totals,
    last_seq: u64,
    updated_at: DateTime<Utc>,
    expires_at: i64,
}

fn to_event(item: Item) -> Result<Event, ProgressError> {
    let e: EventItem = serde_dynamo::aws_sdk_dynamodb_1::from_item(item).map_err(|e| ProgressError::Corrupt(e.to_string()))?;
    Ok(Event {
        run_id: e.run_id,
        seq: e.seq,
        at: e.at,
        kind: e.kind,
        step_id: e.step_id,
        attempt: e.attempt,
        data: serde_json::from_str(&e.data).map_err(|err| ProgressError::Corrupt(format!("event data: {err}")))?,
    })
}

fn to_row(item: Item) -> Result<ProgressRow, ProgressError> {
    let p: ProgressItem = serde_dynamo::aws_sdk_dynamodb_1::from_item(item).map_err(|e| ProgressError::Corrupt(e.to_string()))?;
    Ok(ProgressRow {
        run_id: p.run_id,
        workflow: p.workflow,
        status: p.status,
        current_step: p.current_step,
        totals: p.totals,
        last_seq: p.last_seq,
        updated_at: p.updated_at,
    })
}

/// DynamoDB transactions hold at most 100 items: one event plus up to 99 owner rows.
const MAX_OWNERS: usize = 99;

#[async_trait]
impl ProgressSink for DynamoProgress {
    #[instrument(skip_all, fields(run_id = %event.run_id, seq = event.seq))]
    async fn publish(&self, event: &Event, row: &ProgressRow, owners: &[Principal]) -> Result<(), ProgressError> {
        let expires_at = (event.at + self.retention).timestamp();
        let corrupt = |e: serde_dynamo::Error| ProgressError::Corrupt(e.to_string());
        let item = serde_dynamo::aws_sdk_dynamodb_1::to_item(EventItem {
            pk: run_pk(&event.run_id),
            seq: event.seq,
            run_id: event.run_id.clone(),
            at: event.at,
            kind: event.kind,
            step_id: event.step_id.clone(),
            attempt: event.attempt,
            data: event.data.to_string(),
            expires_at,
        })
        .map_err(corrupt)?;
        let put = Put::builder()
            .table_name(&self.tables.events)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(|e| ProgressError::Corrupt(e.to_string()))?;
        let mut tx = self.client.transact_write_items().transact_items(TransactWriteItem::builder().put(put).build());
        let totals = serde_dynamo::aws_sdk_dynamodb_1::to_attribute_value(row.totals).map_err(corrupt)?;
        let status = serde_json::to_value(row.status).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        for owner in owners.iter().take(MAX_OWNERS) {
            let mut update = Update::builder()
                .table_name(&self.tables.progress)
                .key("pk", s(owner.key()))
                .key("sk", s(run_pk(&row.run_id)))
                // Rows only move forward: an older event never overwrites a newer row.
                .condition_expression("attribute_not_exists(#last_seq) OR #last_seq < :seq")
                .expression_attribute_names("#status", "status")
                .expression_attribute_names("#run_id", "run_id")
                .expression_attribute_names("#workflow", "workflow")
                .expression_attribute_names("#totals", "totals")
                .expression_attribute_names("#last_seq", "last_seq")
                .expression_attribute_names("#updated", "updated_at")
                .expression_attribute_names("#expires", "expires_at")
                .expression_attribute_names("#step", "current_step")
                .expression_attribute_values(":seq", n(row.last_seq))
                .expression_attribute_values(":run_id", s(row.run_id.as_str()))
                .expression_attribute_values(":workflow", s(&row.workflow))
                .expression_attribute_values(":status", s(&status))
                .expression_attribute_values(":totals", totals.clone())
                .expression_attribute_values(":updated", s(row.updated_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
                .expression_attribute_values(":expires", n(expires_at));
            let mut expression =
                "SET #run_id = :run_id, #workflow = :workflow, #status = :status, #totals = :totals, #last_seq = :seq, #updated = :updated, #expires = :expires".to_owned();
            match &row.current_step {
                Some(step) => {
                    update = update.expression_attribute_values(":step", s(step.as_str()));
                    expression.push_str(", #step = :step");
                }
                None => expression.push_str(" REMOVE #step"),
            }
            let update = update.update_expression(expression).build().map_err(|e| ProgressError::Corrupt(e.to_string()))?;
            tx = tx.transact_items(TransactWriteItem::builder().update(update).build());
        }
        match tx.send().await {
            Ok(_) => {
                debug!(owners = owners.len(), "event and progress rows written");
                Ok(())
            }
            Err(e) if is_condition_failure(&e) => Err(ProgressError::Conflict { run: event.run_id.clone(), seq: event.seq }),
            Err(e) => Err(progress_err(e)),
        }
    }

    async fn last_seq(&self, run: &RunId) -> Result<u64, ProgressError> {
        let out = self
            .client
            .query()
            .table_name(&self.tables.events)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", s(run_pk(run)))
            .scan_index_forward(false)
            .limit(1)
            .consistent_read(true)
            .send()
            .await
            .map_err(progress_err)?;
        match out.items.unwrap_or_default().into_iter().next() {
            None => Ok(0),
            Some(item) => Ok(to_event(item)?.seq),
        }
    }
}

#[async_trait]
impl ProgressReader for DynamoProgress {
    async fn events_after(&self, run: &RunId, after: u64, limit: u32) -> Result<Vec<Event>, ProgressError> {
        let out = self
            .client
            .query()
            .table_name(&self.tables.events)
            .key_condition_expression("pk = :pk AND seq > :after")
            .expression_attribute_values(":pk", s(run_pk(run)))
            .expression_attribute_values(":after", n(after))
            .limit(limit.clamp(1, 1000) as i32)
            // Strongly consistent so a cursor never skips an event that was just written.
            .consistent_read(true)
            .send()
            .await
            .map_err(progress_err)?;
        out.items.unwrap_or_default().into_iter().map(to_event).collect()
    }

    async fn progress_of(&self, principal: &Principal, run: &RunId) -> Result<Option<ProgressRow>, ProgressError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.tables.progress)
            .key("pk", s(principal.key()))
            .key("sk", s(run_pk(run)))
            .consistent_read(true)
            .send()
            .await
            .map_err(progress_err)?;
        out.item.map(to_row).transpose()
    }

    async fn feed(&self, principal: &Principal, limit: u32) -> Result<Vec<ProgressRow>, ProgressError> {
        let out = self
            .client
            .query()
            .table_name(&self.tables.progress)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", s(principal.key()))
            .scan_index_forward(false)
            .limit(limit.clamp(1, 1000) as i32)
            .send()
            .await
            .map_err(progress_err)?;
        out.items.unwrap_or_default().into_iter().map(to_row).collect()
    }
}
