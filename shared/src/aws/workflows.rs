//! DynamoDB implementation of [`WorkflowStore`], in the workflows table (see
//! `infra/tables.json`):
//! - `pk = WF#<id>`, `sk = META`: the head (owner, name, latest version, times), and while
//!   the workflow is live, `listed_at` (`<updated_at>#<id>`), the sort key of the sparse
//!   GSI `by-owner` (`owner`, `listed_at`) that lists an owner's workflows newest updated
//!   first. A delete stamps `deleted_at` and removes `listed_at`, so a deleted workflow
//!   leaves the index without a filter.
//! - `sk = V#<000001>`: one immutable item per version, its definition stored as a JSON
//!   string (like the runs table's documents, so every number round-trips exactly).
//!
//! A new version is one transaction: the head moves from the expected version to the next
//! (conditional on the expected version, and on not being deleted) and the version item is
//! put (conditional on not existing). Its client token names the workflow and version, so
//! an SDK retry of a transaction that did land succeeds instead of reporting a conflict.

use super::dynamo::{Item, MAX_ITEM_BYTES, item_size, s};
use super::dynamo_error::{corrupt_item, defect, is_condition_failure, is_token_reuse, store_err};
use crate::config::Tables;
use crate::ids::{UserId, WorkflowId, WorkflowName};
use crate::ports::{SaveOutcome, StoreError, WorkflowCursor, WorkflowPage, WorkflowStore};
use crate::stored::{StoredWorkflow, WorkflowVersion, version_key};
use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem, Update};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use tracing::instrument;

const OWNER_INDEX: &str = "by-owner";
const META: &str = "META";

#[derive(Clone)]
pub struct DynamoWorkflows {
    client: Client,
    table: String,
}

fn pk(id: &WorkflowId) -> String {
    format!("WF#{id}")
}

/// Fixed-width UTC, so the index sorts chronologically as strings.
fn stored_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn listed_at(updated_at: &DateTime<Utc>, id: &WorkflowId) -> String {
    format!("{}#{id}", stored_time(updated_at))
}

fn key(id: &WorkflowId, sk: &str) -> Item {
    HashMap::from([("pk".to_owned(), s(pk(id))), ("sk".to_owned(), s(sk))])
}

fn head_item(head: &StoredWorkflow) -> Item {
    let mut item = key(&head.id, META);
    item.insert("owner".into(), s(head.owner.as_str()));
    item.insert("name".into(), s(head.name.as_str()));
    item.insert("version".into(), AttributeValue::N(head.version.to_string()));
    item.insert("created_at".into(), s(stored_time(&head.created_at)));
    item.insert("updated_at".into(), s(stored_time(&head.updated_at)));
    item.insert("listed_at".into(), s(listed_at(&head.updated_at, &head.id)));
    item
}

fn version_item(id: &WorkflowId, version: &WorkflowVersion) -> Result<Item, StoreError> {
    let mut item = key(id, &version_key(version.version));
    item.insert("version".into(), AttributeValue::N(version.version.to_string()));
    item.insert("definition".into(), s(version.definition.to_string()));
    item.insert("written_by".into(), s(version.written_by.as_str()));
    item.insert("written_at".into(), s(stored_time(&version.written_at)));
    let size = item_size(&item);
    if size > MAX_ITEM_BYTES {
        return Err(StoreError::TooLarge(format!(
            "version {} of workflow {id} is {size} bytes; a stored definition must fit one 400 KB DynamoDB item",
            version.version
        )));
    }
    Ok(item)
}

/// Reads the attributes of a stored item, naming the item when one is missing or malformed.
struct Reader<'a> {
    table: &'a str,
    item: &'a Item,
}

impl Reader<'_> {
    fn corrupt(&self, problem: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt(corrupt_item(self.table, self.item, problem))
    }

    fn text(&self, name: &str) -> Result<&str, StoreError> {
        match self.item.get(name) {
            Some(AttributeValue::S(v)) => Ok(v),
            _ => Err(self.corrupt(format!("no {name}"))),
        }
    }

    fn number(&self, name: &str) -> Result<u32, StoreError> {
        match self.item.get(name) {
            Some(AttributeValue::N(v)) => v.parse().map_err(|_| self.corrupt(format!("{name} {v:?} is not a version number"))),
            _ => Err(self.corrupt(format!("no {name}"))),
        }
    }

    fn time(&self, name: &str) -> Result<DateTime<Utc>, StoreError> {
        let raw = self.text(name)?;
        DateTime::parse_from_rfc3339(raw).map(|t| t.with_timezone(&Utc)).map_err(|e| self.corrupt(format!("{name} {raw:?} is not a time: {e}")))
    }

    fn parsed<T>(&self, name: &str, parse: impl Fn(&str) -> Result<T, crate::ids::InvalidId>) -> Result<T, StoreError> {
        parse(self.text(name)?).map_err(|e| self.corrupt(format!("{name}: {e}")))
    }

    fn deleted(&self) -> bool {
        self.item.contains_key("deleted_at")
    }

    fn head(&self) -> Result<StoredWorkflow, StoreError> {
        let id = self.parsed("pk", |pk| WorkflowId::parse(pk.strip_prefix("WF#").unwrap_or(pk)))?;
        Ok(StoredWorkflow {
            id,
            owner: self.parsed("owner", UserId::parse)?,
            name: self.parsed("name", WorkflowName::parse)?,
            version: self.number("version")?,
            created_at: self.time("created_at")?,
            updated_at: self.time("updated_at")?,
        })
    }

    fn version(&self) -> Result<WorkflowVersion, StoreError> {
        let raw = self.text("definition")?;
        Ok(WorkflowVersion {
            version: self.number("version")?,
            definition: serde_json::from_str(raw).map_err(|e| self.corrupt(format!("definition is not JSON: {e}")))?,
            written_by: self.parsed("written_by", UserId::parse)?,
            written_at: self.time("written_at")?,
        })
    }
}

impl DynamoWorkflows {
    pub fn new(client: Client, tables: Tables) -> Self {
        Self { client, table: tables.workflows }
    }

    fn reader<'a>(&'a self, item: &'a Item) -> Reader<'a> {
        Reader { table: &self.table, item }
    }

    async fn read(&self, id: &WorkflowId, sk: &str) -> Result<Option<Item>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(id, sk)))
            .consistent_read(true)
            .send()
            .await
            .map_err(store_err(&self.table))?;
        Ok(out.item)
    }

    /// The live head of workflow `id`, if any.
    async fn live_head(&self, id: &WorkflowId) -> Result<Option<StoredWorkflow>, StoreError> {
        match self.read(id, META).await? {
            Some(item) if !self.reader(&item).deleted() => Ok(Some(self.reader(&item).head()?)),
            _ => Ok(None),
        }
    }

    /// Why a conditional write to workflow `id` was refused: it is gone, or it moved on.
    async fn refusal(&self, id: &WorkflowId) -> Result<SaveOutcome, StoreError> {
        Ok(match self.live_head(id).await? {
            Some(head) => SaveOutcome::Stale { current: head.version },
            None => SaveOutcome::NotFound,
        })
    }
}

/// A transaction's client token: the same for the same write of the same version, so an
/// SDK retry of one that landed succeeds (DynamoDB limits tokens to 36 characters; a
/// ULID, `#` and six digits fit).
fn token(id: &WorkflowId, version: u32) -> String {
    format!("{id}#{version}")
}

#[async_trait]
impl WorkflowStore for DynamoWorkflows {
    #[instrument(skip_all, fields(workflow_id = %head.id))]
    async fn create(&self, head: &StoredWorkflow, first: &WorkflowVersion) -> Result<(), StoreError> {
        let build = |what: &str, e: aws_sdk_dynamodb::error::BuildError| StoreError::Rejected(defect(what, e));
        let put = |item: Item, what: &str| -> Result<TransactWriteItem, StoreError> {
            let put = Put::builder()
                .table_name(&self.table)
                .set_item(Some(item))
                .condition_expression("attribute_not_exists(pk)")
                .build()
                .map_err(|e| build(what, e))?;
            Ok(TransactWriteItem::builder().put(put).build())
        };
        let result = self
            .client
            .transact_write_items()
            .transact_items(put(head_item(head), "a workflow's head")?)
            .transact_items(put(version_item(&head.id, first)?, "a workflow's version")?)
            .client_request_token(token(&head.id, first.version))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            // Ids are fresh ULIDs: a taken one is this very write landed before (a retry whose
            // reply was lost), or another workflow, never ours to overwrite.
            Err(e) if is_condition_failure(&e) || is_token_reuse(&e) => match self.get(&head.id, Some(first.version)).await? {
                Some((stored, version)) if stored == *head && version == *first => Ok(()),
                _ => Err(StoreError::Rejected(format!("workflow {} already exists", head.id))),
            },
            Err(e) => Err(store_err(&self.table)(e)),
        }
    }

    #[instrument(skip(self), fields(workflow_id = %id))]
    async fn get(&self, id: &WorkflowId, version: Option<u32>) -> Result<Option<(StoredWorkflow, WorkflowVersion)>, StoreError> {
        let Some(head) = self.live_head(id).await? else { return Ok(None) };
        let Some(item) = self.read(id, &version_key(version.unwrap_or(head.version))).await? else { return Ok(None) };
        let version = self.reader(&item).version()?;
        Ok(Some((head, version)))
    }

    #[instrument(skip(self, name, next), fields(workflow_id = %id, version = next.version))]
    async fn save_version(&self, id: &WorkflowId, expected: u32, name: &WorkflowName, next: &WorkflowVersion) -> Result<SaveOutcome, StoreError> {
        if next.version != expected + 1 {
            return self.refusal(id).await;
        }
        let build = |what: &str, e: aws_sdk_dynamodb::error::BuildError| StoreError::Rejected(defect(what, e));
        let update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(id, META)))
            .update_expression("SET #version = :next, #name = :name, updated_at = :at, listed_at = :listed")
            .condition_expression("#version = :expected AND attribute_not_exists(deleted_at)")
            .expression_attribute_names("#version", "version")
            .expression_attribute_names("#name", "name")
            .expression_attribute_values(":next", AttributeValue::N(next.version.to_string()))
            .expression_attribute_values(":expected", AttributeValue::N(expected.to_string()))
            .expression_attribute_values(":name", s(name.as_str()))
            .expression_attribute_values(":at", s(stored_time(&next.written_at)))
            .expression_attribute_values(":listed", s(listed_at(&next.written_at, id)))
            .build()
            .map_err(|e| build("a workflow's head update", e))?;
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(version_item(id, next)?))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(|e| build("a workflow's version", e))?;
        let result = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().update(update).build())
            .transact_items(TransactWriteItem::builder().put(put).build())
            .client_request_token(token(id, next.version))
            .send()
            .await;
        match result {
            Ok(_) => {}
            // The head moved on or went, or another writer's transaction wrote this version.
            Err(e) if is_condition_failure(&e) || is_token_reuse(&e) => {
                return self.refusal(id).await;
            }
            Err(e) => return Err(store_err(&self.table)(e)),
        }
        match self.live_head(id).await? {
            Some(head) => Ok(SaveOutcome::Saved(head)),
            // Deleted between our write and this read: the version was written, the workflow is gone.
            None => Ok(SaveOutcome::NotFound),
        }
    }

    #[instrument(skip(self), fields(workflow_id = %id))]
    async fn delete(&self, id: &WorkflowId, at: DateTime<Utc>) -> Result<bool, StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(id, META)))
            .update_expression("SET deleted_at = :at REMOVE listed_at")
            .condition_expression("attribute_exists(pk) AND attribute_not_exists(deleted_at)")
            .expression_attribute_values(":at", s(stored_time(&at)))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failure(&e) => Ok(false),
            Err(e) => Err(store_err(&self.table)(e)),
        }
    }

    #[instrument(skip(self, after), fields(limit))]
    async fn list(&self, owner: &UserId, limit: u32, after: Option<&WorkflowCursor>) -> Result<WorkflowPage, StoreError> {
        let limit = limit.max(1);
        let start = after.map(|c| {
            let mut start = key(&c.id, META);
            start.insert("owner".into(), s(owner.as_str()));
            start.insert("listed_at".into(), s(listed_at(&c.updated_at, &c.id)));
            start
        });
        // One more than asked: whether it comes back says if there is a next page, so a
        // client is never handed a cursor to an empty page.
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(OWNER_INDEX)
            .key_condition_expression("#owner = :owner")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":owner", s(owner.as_str()))
            .scan_index_forward(false)
            .limit(i32::try_from(limit.saturating_add(1)).unwrap_or(i32::MAX))
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(store_err(&self.table))?;
        let mut items = Vec::new();
        for item in out.items.unwrap_or_default() {
            items.push(self.reader(&item).head()?);
        }
        let more = items.len() > limit as usize;
        items.truncate(limit as usize);
        let next = if more { items.last().map(|h| WorkflowCursor { updated_at: h.updated_at, id: h.id.clone() }) } else { None };
        Ok(WorkflowPage { items, next })
    }
}
