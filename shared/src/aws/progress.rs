//! DynamoDB implementations of [`ProgressSink`] and [`ProgressReader`]: each run's event
//! log and each owner's progress rows.
//!
//! Layout (see `infra/tables.json`):
//! - events: `pk = RUN#<id>`, `seq` (number), TTL `expires_at`.
//! - progress: `pk = <principal>`, `sk = RUN#<id>`, one row per run per owner, TTL `expires_at`.
//!
//! One event is one transaction, so the log and the rows never disagree:
//! - the event's put, conditional on its seq being free;
//! - for `seq > 1`, a check that event `seq - 1` exists. With the put's condition this makes
//!   the log gap-free: by induction it always holds `1..=last`, and only `last + 1` has both
//!   a predecessor and a free slot;
//! - one update per owner's row, conditional on the row not being at or past `seq` already,
//!   so rows only move forward.
//!
//! Any failed condition cancels the whole transaction: the event is not the next one, or
//! another writer is ahead — a [`ProgressError::Conflict`] either way.

use super::blobs::S3Blobs;
use super::dynamo::{Item, MAX_ITEM_BYTES, checkpoint_writes, item_size, n, run_pk, s, stored_instant};
use super::dynamo_error::{corrupt_item, defect, failed_condition_at, is_condition_failure, is_token_reuse, progress_err};
use crate::config::Tables;
use crate::ids::{Principal, RunId, StepId, WorkflowName};
use crate::ports::{Checkpoint, JournalError, MAX_OWNERS, ProgressError, ProgressReader, ProgressSink, StoreError};
use crate::run::{Event, EventType, ProgressRow, RunStatus, Totals, Waiting};
use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{ConditionCheck, Put, TransactWriteItem, Update};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::{debug, instrument};

/// Event log and progress feeds.
#[derive(Clone)]
pub struct DynamoProgress {
    client: Client,
    tables: Tables,
    retention: chrono::Duration,
    /// Where a checkpoint's documents too large for an item go (see [`super::blobs`]).
    blobs: Option<S3Blobs>,
}

impl DynamoProgress {
    pub fn new(client: Client, tables: Tables, retention_days: u32) -> Self {
        Self { client, tables, retention: chrono::Duration::days(i64::from(retention_days)), blobs: None }
    }

    /// Checkpoints written with events move documents too large for an item to this bucket.
    pub fn with_blobs(mut self, blobs: S3Blobs) -> Self {
        self.blobs = Some(blobs);
        self
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
    #[serde(default, skip_serializing_if = "is_zero")]
    revision: u32,
    data: String,
    expires_at: i64,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Serialize, Deserialize)]
struct ProgressItem {
    pk: String,
    sk: String,
    run_id: RunId,
    workflow: WorkflowName,
    status: RunStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    current_step: Option<StepId>,
    totals: Totals,
    last_seq: u64,
    updated_at: DateTime<Utc>,
    expires_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    waiting: Option<Waiting>,
}

fn to_event(table: &str, item: Item) -> Result<Event, ProgressError> {
    let corrupt = |item: &Item, problem: String| ProgressError::Corrupt(corrupt_item(table, item, problem));
    let e: EventItem = serde_dynamo::aws_sdk_dynamodb_1::from_item(item.clone()).map_err(|e| corrupt(&item, e.to_string()))?;
    let data = serde_json::from_str(&e.data).map_err(|err| corrupt(&item, format!("data is not JSON: {err}")))?;
    Ok(Event { run_id: e.run_id, seq: e.seq, at: e.at, kind: e.kind, step_id: e.step_id, attempt: e.attempt, revision: e.revision, data })
}

fn to_row(table: &str, item: Item) -> Result<ProgressRow, ProgressError> {
    let p: ProgressItem =
        serde_dynamo::aws_sdk_dynamodb_1::from_item(item.clone()).map_err(|e| ProgressError::Corrupt(corrupt_item(table, &item, e)))?;
    Ok(ProgressRow {
        run_id: p.run_id,
        workflow: p.workflow,
        status: p.status,
        current_step: p.current_step,
        waiting: p.waiting,
        totals: p.totals,
        last_seq: p.last_seq,
        updated_at: p.updated_at,
    })
}

/// `owners` without repeats, in order: a transaction may not touch one item twice.
fn distinct(owners: &[Principal]) -> Vec<&Principal> {
    let mut seen = std::collections::HashSet::new();
    owners.iter().filter(|o| seen.insert(*o)).collect()
}

impl DynamoProgress {
    /// The event's put (its seq free), the check that its predecessor exists, and one
    /// update per owner's row (never backwards).
    fn event_writes(&self, event: &Event, row: &ProgressRow, owners: &[Principal]) -> Result<Vec<TransactWriteItem>, ProgressError> {
        let owners = distinct(owners);
        if owners.len() > MAX_OWNERS {
            return Err(ProgressError::Rejected(format!(
                "run {} has {} owners; one event updates at most {MAX_OWNERS} progress rows (one DynamoDB transaction)",
                event.run_id,
                owners.len()
            )));
        }
        if event.seq == 0 {
            // Logs start at 1; 0 is what `last_seq` answers for an empty log.
            return Err(ProgressError::Conflict { run: event.run_id.clone(), seq: event.seq });
        }
        let expires_at = (event.at + self.retention).timestamp();
        let what = format!("event {} of run {}", event.seq, event.run_id);
        let item = serde_dynamo::aws_sdk_dynamodb_1::to_item(EventItem {
            pk: run_pk(&event.run_id),
            seq: event.seq,
            run_id: event.run_id.clone(),
            at: event.at,
            kind: event.kind,
            step_id: event.step_id.clone(),
            attempt: event.attempt,
            revision: event.revision,
            data: event.data.to_string(),
            expires_at,
        })
        .map_err(|e| ProgressError::Rejected(defect(&what, e)))?;
        let size = item_size(&item);
        if size > MAX_ITEM_BYTES {
            return Err(ProgressError::Rejected(format!(
                "{what} ({:?}) is {size} bytes; DynamoDB items are limited to 400 KB: make its data smaller",
                event.kind
            )));
        }
        let put = Put::builder()
            .table_name(&self.tables.events)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(|e| ProgressError::Rejected(defect(&what, e)))?;
        let mut writes = vec![TransactWriteItem::builder().put(put).build()];
        if event.seq > 1 {
            let previous = ConditionCheck::builder()
                .table_name(&self.tables.events)
                .key("pk", s(run_pk(&event.run_id)))
                .key("seq", n(event.seq - 1))
                .condition_expression("attribute_exists(pk)")
                .build()
                .map_err(|e| ProgressError::Rejected(defect(&format!("the check before {what}"), e)))?;
            writes.push(TransactWriteItem::builder().condition_check(previous).build());
        }
        for owner in &owners {
            writes.push(self.row_update(owner, row, expires_at)?);
        }
        Ok(writes)
    }

    /// A transaction of `writes` for `event`. Its client token (run and seq) makes the
    /// SDK-level retry of a write whose answer was lost a no-op instead of a conflict with
    /// itself: DynamoDB applies a token's transaction once for 10 minutes.
    fn transaction(
        &self,
        event: &Event,
        writes: Vec<TransactWriteItem>,
    ) -> aws_sdk_dynamodb::operation::transact_write_items::builders::TransactWriteItemsFluentBuilder {
        self.client.transact_write_items().set_transact_items(Some(writes)).client_request_token(format!("{}-{}", event.run_id, event.seq))
    }

    fn row_update(&self, owner: &Principal, row: &ProgressRow, expires_at: i64) -> Result<TransactWriteItem, ProgressError> {
        let totals = serde_dynamo::aws_sdk_dynamodb_1::to_attribute_value(row.totals)
            .map_err(|e| ProgressError::Rejected(defect(&format!("the progress row of run {}", row.run_id), e)))?;
        let status = serde_json::to_value(row.status).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        let mut update = Update::builder()
            .table_name(&self.tables.progress)
            .key("pk", s(crate::shards::feed_key(owner, &row.run_id)))
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
            .expression_attribute_values(":workflow", s(row.workflow.as_str()))
            .expression_attribute_values(":status", s(&status))
            .expression_attribute_values(":totals", totals)
            .expression_attribute_values(":updated", s(stored_instant(&row.updated_at)))
            .expression_attribute_values(":expires", n(expires_at));
        let mut set = vec!["#run_id = :run_id", "#workflow = :workflow", "#status = :status", "#totals = :totals", "#last_seq = :seq"];
        set.extend(["#updated = :updated", "#expires = :expires"]);
        let mut remove = Vec::new();
        match &row.current_step {
            Some(step) => {
                update = update.expression_attribute_values(":step", s(step.as_str()));
                set.push("#step = :step");
            }
            None => remove.push("#step"),
        }
        update = update.expression_attribute_names("#waiting", "waiting");
        match &row.waiting {
            Some(waiting) => {
                let value = serde_dynamo::aws_sdk_dynamodb_1::to_attribute_value(waiting)
                    .map_err(|e| ProgressError::Rejected(defect(&format!("what run {} waits for", row.run_id), e)))?;
                update = update.expression_attribute_values(":waiting", value);
                set.push("#waiting = :waiting");
            }
            None => remove.push("#waiting"),
        }
        let mut expression = format!("SET {}", set.join(", "));
        if !remove.is_empty() {
            expression.push_str(&format!(" REMOVE {}", remove.join(", ")));
        }
        let update = update.update_expression(expression).build().map_err(|e| ProgressError::Rejected(defect("a progress row update", e)))?;
        Ok(TransactWriteItem::builder().update(update).build())
    }
}

#[async_trait]
impl ProgressSink for DynamoProgress {
    #[instrument(skip_all, fields(run_id = %run, principals = principals.len()))]
    async fn forget(&self, run: &RunId, principals: &[Principal]) -> Result<(), ProgressError> {
        // Rare (an access change), and a handful of keys: one delete each, in parallel.
        let deletes = distinct(principals).into_iter().map(|p| {
            self.client.delete_item().table_name(&self.tables.progress).key("pk", s(crate::shards::feed_key(p, run))).key("sk", s(run_pk(run))).send()
        });
        futures::future::try_join_all(deletes).await.map_err(progress_err(&self.tables.progress))?;
        Ok(())
    }

    #[instrument(skip_all, fields(run_id = %event.run_id, seq = event.seq))]

    async fn publish(&self, event: &Event, row: &ProgressRow, owners: &[Principal]) -> Result<(), ProgressError> {
        let writes = self.event_writes(event, row, owners)?;
        match self.transaction(event, writes).send().await {
            Ok(_) => {
                debug!(owners = owners.len(), "event and progress rows written");
                Ok(())
            }
            Err(e) if is_condition_failure(&e) || is_token_reuse(&e) => Err(ProgressError::Conflict { run: event.run_id.clone(), seq: event.seq }),
            Err(e) => Err(progress_err(&self.tables.events)(e)),
        }
    }

    /// One transaction: the checkpoint's lease check and item first, then the event and rows.
    #[instrument(skip_all, fields(run_id = %event.run_id, seq = event.seq, step_id = %checkpoint.step.step_id))]
    async fn publish_checkpointed(
        &self,
        event: &Event,
        row: &ProgressRow,
        owners: &[Principal],
        checkpoint: Checkpoint<'_>,
    ) -> Result<(), JournalError> {
        let mut writes = checkpoint_writes(&self.tables, self.blobs.as_ref(), &event.run_id, checkpoint.lease, checkpoint.step).await?.to_vec();
        writes.extend(self.event_writes(event, row, owners)?);
        match self.transaction(event, writes).send().await {
            Ok(_) => {
                debug!(owners = owners.len(), "checkpoint, event and progress rows written");
                Ok(())
            }
            // Which condition failed is in the cancellation reasons, one per item in order:
            // the lease check is the first item.
            Err(e) if is_condition_failure(&e) && failed_condition_at(&e, 0) => Err(StoreError::LeaseLost(event.run_id.clone()).into()),
            Err(e) if is_condition_failure(&e) || is_token_reuse(&e) => {
                Err(ProgressError::Conflict { run: event.run_id.clone(), seq: event.seq }.into())
            }
            Err(e) => Err(progress_err(&self.tables.events)(e).into()),
        }
    }

    async fn last_event(&self, run: &RunId) -> Result<Option<Event>, ProgressError> {
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
            .map_err(progress_err(&self.tables.events))?;
        out.items.unwrap_or_default().into_iter().next().map(|item| to_event(&self.tables.events, item)).transpose()
    }
}

/// Pages hold 1 to 1,000 items, whatever limit is asked for.
pub(super) fn page_limit(limit: u32) -> i32 {
    limit.clamp(1, 1000) as i32
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
            .limit(page_limit(limit))
            // Strongly consistent so a cursor never skips an event that was just written.
            .consistent_read(true)
            .send()
            .await
            .map_err(progress_err(&self.tables.events))?;
        out.items.unwrap_or_default().into_iter().map(|item| to_event(&self.tables.events, item)).collect()
    }

    async fn progress_of(&self, principal: &Principal, run: &RunId) -> Result<Option<ProgressRow>, ProgressError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.tables.progress)
            .key("pk", s(crate::shards::feed_key(principal, run)))
            .key("sk", s(run_pk(run)))
            .consistent_read(true)
            .send()
            .await
            .map_err(progress_err(&self.tables.progress))?;
        out.item.map(|item| to_row(&self.tables.progress, item)).transpose()
    }

    /// Queries every shard of the feed at once (see [`crate::shards`]) and keeps the
    /// newest `limit` runs of them all.
    async fn feed(&self, principal: &Principal, limit: u32, before: Option<&RunId>) -> Result<Vec<ProgressRow>, ProgressError> {
        let queries = crate::shards::feed_keys(principal).into_iter().map(|key| {
            let mut query = self
                .client
                .query()
                .table_name(&self.tables.progress)
                .expression_attribute_values(":pk", s(key))
                .scan_index_forward(false)
                .limit(page_limit(limit));
            query = match before {
                Some(before) => query.key_condition_expression("pk = :pk AND sk < :before").expression_attribute_values(":before", s(run_pk(before))),
                // `RUN#` and nothing else lives under a feed's key.
                None => query.key_condition_expression("pk = :pk"),
            };
            async move { query.send().await.map_err(progress_err(&self.tables.progress)) }
        });
        let mut rows = Vec::new();
        for out in futures::future::try_join_all(queries).await? {
            for item in out.items.unwrap_or_default() {
                rows.push(to_row(&self.tables.progress, item)?);
            }
        }
        rows.sort_by(|a, b| b.run_id.cmp(&a.run_id));
        rows.truncate(page_limit(limit) as usize);
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_written_once_each_in_order() {
        let a = Principal::User("a".into());
        let g = Principal::Group("g".into());
        assert_eq!(distinct(&[a.clone(), g.clone(), a.clone(), Principal::Public, g.clone()]), vec![&a, &g, &Principal::Public]);
    }

    #[test]
    fn pages_hold_one_to_a_thousand_items() {
        assert_eq!((page_limit(0), page_limit(1), page_limit(50), page_limit(5_000)), (1, 1, 50, 1000));
    }
}
