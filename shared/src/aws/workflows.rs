//! DynamoDB implementation of [`WorkflowStore`], in the workflows table (see
//! `infra/tables.json`):
//! - `pk = WF#<id>`, `sk = META`: the head (owner, name, latest version, times), and while
//!   the workflow is live, `listed_at` (`<updated_at>#<id>`), the sort key of the sparse
//!   GSI `by-owner` (`owner`, `listed_at`) that lists an owner's workflows newest updated
//!   first. A delete stamps `deleted_at` and removes `listed_at`, so a deleted workflow
//!   leaves the index without a filter.
//! - `sk = V#<000001>`: one immutable item per version, its definition stored as a JSON
//!   string (like the runs table's documents, so every number round-trips exactly).
//! - `sk = GRANT#<principal>`: one item per grantee (`StoredWorkflow::grantees`: the owner,
//!   `ADMIN`, `AUTHED`/`PUBLIC` and each share), a copy of the head plus `grantee`, the hash
//!   key of the sparse GSI `by-grantee` (`grantee`, `listed_at`). `GET /workflows` queries
//!   it once per principal the caller acts as and merges: a list of what one may see is
//!   read from the index, never by filtering everyone's workflows. Writes of the head
//!   update its grants in the same transaction (at most `MAX_SHARES` + 3 of them, well
//!   within a transaction's 100 items); an access change replaces them.
//!
//! A new version is one transaction: the head moves from the expected version to the next
//! (conditional on the expected version, and on not being deleted) and the version item is
//! put (conditional on not existing). Its client token names the workflow and version, so
//! an SDK retry of a transaction that did land succeeds instead of reporting a conflict.

use super::dynamo::{Item, MAX_ITEM_BYTES, item_size, s};
use super::dynamo_error::{defect, is_condition_failure, is_token_reuse, store_err};
use super::reader::Reader;
use crate::access::Access;
use crate::config::Tables;
use crate::ids::{Principal, UserId, WorkflowId, WorkflowName};
use crate::ports::{SaveOutcome, StoreError, WorkflowCursor, WorkflowPage, WorkflowStore};
use crate::stored::{StoredWorkflow, WorkflowVersion, version_key};
use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, Delete, Put, TransactWriteItem, Update};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use tracing::instrument;

const GRANTEE_INDEX: &str = "by-grantee";
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
    if head.access != Access::private() {
        item.insert("access".into(), s(serde_json::to_string(&head.access).unwrap_or_default()));
    }
    item
}

fn grant_sk(grantee: &Principal) -> String {
    format!("GRANT#{}", grantee.key())
}

/// The grant items of `head`: copies of it under each grantee (without `owner`, so the
/// owner index keeps listing heads only).
fn grant_items(head: &StoredWorkflow) -> Vec<Item> {
    head.grantees()
        .iter()
        .map(|grantee| {
            let mut item = head_item(head);
            item.remove("owner");
            item.insert("sk".into(), s(grant_sk(grantee)));
            item.insert("grantee".into(), s(grantee.key()));
            item.insert("owned_by".into(), s(head.owner.as_str()));
            item
        })
        .collect()
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

fn deleted(r: &Reader) -> bool {
    r.item.contains_key("deleted_at")
}

/// A workflow's head from its META item, or from one of its grants (a copy of it).
fn head_of(r: &Reader) -> Result<StoredWorkflow, StoreError> {
    let owner = if r.item.contains_key("owner") { "owner" } else { "owned_by" };
    let access = match r.optional_text("access") {
        Some(raw) => serde_json::from_str(raw).map_err(|e| r.corrupt(format!("access: {e}")))?,
        None => Access::private(),
    };
    Ok(StoredWorkflow {
        id: r.parsed("pk", |pk| WorkflowId::parse(pk.strip_prefix("WF#").unwrap_or(pk)))?,
        owner: r.parsed(owner, UserId::parse)?,
        access,
        name: r.parsed("name", WorkflowName::parse)?,
        version: r.number("version")?,
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
    })
}

fn version_of(r: &Reader) -> Result<WorkflowVersion, StoreError> {
    Ok(WorkflowVersion {
        version: r.number("version")?,
        definition: r.json("definition")?,
        written_by: r.parsed("written_by", UserId::parse)?,
        written_at: r.time("written_at")?,
    })
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
            Some(item) if !deleted(&self.reader(&item)) => Ok(Some(head_of(&self.reader(&item))?)),
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
        let mut writes = vec![put(head_item(head), "a workflow's head")?, put(version_item(&head.id, first)?, "a workflow's version")?];
        for grant in grant_items(head) {
            writes.push(put(grant, "a workflow's grant")?);
        }
        let result =
            self.client.transact_write_items().set_transact_items(Some(writes)).client_request_token(token(&head.id, first.version)).send().await;
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
        let version = version_of(&self.reader(&item))?;
        Ok(Some((head, version)))
    }

    async fn head(&self, id: &WorkflowId) -> Result<Option<StoredWorkflow>, StoreError> {
        self.live_head(id).await
    }

    #[instrument(skip(self, name, next), fields(workflow_id = %id, version = next.version))]
    async fn save_version(&self, id: &WorkflowId, expected: u32, name: &WorkflowName, next: &WorkflowVersion) -> Result<SaveOutcome, StoreError> {
        if next.version != expected + 1 {
            return self.refusal(id).await;
        }
        // The grants are copies of the head: they move with it, in the same transaction. An
        // access change between our read and our write removes a grant we update, which
        // cancels the transaction; then we read again (a handful of times at most: access
        // changes are people's edits).
        for attempt in 0..ACCESS_RACES {
            let Some(head) = self.live_head(id).await? else { return Ok(SaveOutcome::NotFound) };
            if head.version != expected {
                return Ok(SaveOutcome::Stale { current: head.version });
            }
            let mut writes = vec![self.head_moves(id, &key(id, META), expected, name, next, true)?];
            for grantee in head.grantees() {
                writes.push(self.head_moves(id, &key(id, &grant_sk(&grantee)), expected, name, next, false)?);
            }
            let put = Put::builder()
                .table_name(&self.table)
                .set_item(Some(version_item(id, next)?))
                .condition_expression("attribute_not_exists(pk)")
                .build()
                .map_err(|e| StoreError::Rejected(defect("a workflow's version", e)))?;
            writes.push(TransactWriteItem::builder().put(put).build());
            let result = self
                .client
                .transact_write_items()
                .set_transact_items(Some(writes))
                .client_request_token(format!("{}#{attempt}", token(id, next.version)))
                .send()
                .await;
            match result {
                Ok(_) => {
                    return match self.live_head(id).await? {
                        Some(head) => Ok(SaveOutcome::Saved(head)),
                        // Deleted between our write and this read: the version was written, the workflow is gone.
                        None => Ok(SaveOutcome::NotFound),
                    };
                }
                // The head moved on or went, another writer's transaction wrote this version,
                // or the grants changed under us (then the head is still at `expected`).
                Err(e) if is_condition_failure(&e) || is_token_reuse(&e) => match self.refusal(id).await? {
                    SaveOutcome::Stale { current } if current == expected => continue,
                    SaveOutcome::Stale { current } if current == next.version && self.version_is(id, next).await? => {
                        // Our own write landed (an SDK retry of it found it done).
                        return Ok(self.live_head(id).await?.map_or(SaveOutcome::NotFound, SaveOutcome::Saved));
                    }
                    refusal => return Ok(refusal),
                },
                Err(e) => return Err(store_err(&self.table)(e)),
            }
        }
        Err(StoreError::Unavailable(format!("workflow {id}: its access kept changing while version {} was written; try again", next.version)))
    }

    #[instrument(skip(self, access), fields(workflow_id = %id))]
    async fn set_access(&self, id: &WorkflowId, access: &Access) -> Result<bool, StoreError> {
        for attempt in 0..ACCESS_RACES {
            let Some(head) = self.live_head(id).await? else { return Ok(false) };
            let changed = StoredWorkflow { access: access.clone(), ..head.clone() };
            let build = |what: &str, e: aws_sdk_dynamodb::error::BuildError| StoreError::Rejected(defect(what, e));
            let mut update = Update::builder()
                .table_name(&self.table)
                .set_key(Some(key(id, META)))
                .expression_attribute_names("#version", "version")
                .expression_attribute_values(":version", AttributeValue::N(head.version.to_string()));
            update = if *access == Access::private() {
                update.update_expression("REMOVE access")
            } else {
                update
                    .update_expression("SET access = :access")
                    .expression_attribute_values(":access", s(serde_json::to_string(access).unwrap_or_default()))
            };
            let update = same_access(update, &head.access, "#version = :version AND attribute_not_exists(deleted_at)")
                .build()
                .map_err(|e| build("a workflow's access", e))?;
            let mut writes = vec![TransactWriteItem::builder().update(update).build()];
            let new = changed.grantees();
            for old in head.grantees().iter().filter(|g| !new.contains(g)) {
                let delete = Delete::builder()
                    .table_name(&self.table)
                    .set_key(Some(key(id, &grant_sk(old))))
                    .build()
                    .map_err(|e| build("a grant's delete", e))?;
                writes.push(TransactWriteItem::builder().delete(delete).build());
            }
            for grant in grant_items(&changed) {
                let put = Put::builder().table_name(&self.table).set_item(Some(grant)).build().map_err(|e| build("a grant", e))?;
                writes.push(TransactWriteItem::builder().put(put).build());
            }
            let result = self.client.transact_write_items().set_transact_items(Some(writes)).send().await;
            match result {
                Ok(_) => return Ok(true),
                // A version or another access change landed since our read: read again.
                Err(e) if is_condition_failure(&e) => tracing::debug!(attempt, "workflow changed while its access was written; again"),
                Err(e) => return Err(store_err(&self.table)(e)),
            }
        }
        Err(StoreError::Unavailable(format!("workflow {id} kept changing while its access was written; try again")))
    }

    #[instrument(skip(self), fields(workflow_id = %id))]
    async fn delete(&self, id: &WorkflowId, at: DateTime<Utc>) -> Result<bool, StoreError> {
        for _ in 0..ACCESS_RACES {
            let Some(head) = self.live_head(id).await? else { return Ok(false) };
            let build = |what: &str, e: aws_sdk_dynamodb::error::BuildError| StoreError::Rejected(defect(what, e));
            let update = Update::builder()
                .table_name(&self.table)
                .set_key(Some(key(id, META)))
                .update_expression("SET deleted_at = :at REMOVE listed_at")
                .expression_attribute_values(":at", s(stored_time(&at)));
            // The grants deleted are those of the access read: one changed since cancels this.
            let update = same_access(update, &head.access, "attribute_exists(pk) AND attribute_not_exists(deleted_at)")
                .build()
                .map_err(|e| build("a workflow's delete", e))?;
            let mut writes = vec![TransactWriteItem::builder().update(update).build()];
            for grantee in head.grantees() {
                let delete = Delete::builder()
                    .table_name(&self.table)
                    .set_key(Some(key(id, &grant_sk(&grantee))))
                    .build()
                    .map_err(|e| build("a grant's delete", e))?;
                writes.push(TransactWriteItem::builder().delete(delete).build());
            }
            match self.client.transact_write_items().set_transact_items(Some(writes)).send().await {
                Ok(_) => return Ok(true),
                Err(e) if is_condition_failure(&e) => continue,
                Err(e) => return Err(store_err(&self.table)(e)),
            }
        }
        Err(StoreError::Unavailable(format!("workflow {id} kept changing while it was deleted; try again")))
    }

    #[instrument(skip(self, visible_to, after), fields(limit))]
    async fn list(&self, visible_to: &[Principal], limit: u32, after: Option<&WorkflowCursor>) -> Result<WorkflowPage, StoreError> {
        let limit = limit.max(1);
        let mut seen = std::collections::HashSet::new();
        let queries = visible_to.iter().filter(|p| seen.insert(*p)).map(|grantee| self.granted(grantee, limit, after));
        let mut heads: Vec<StoredWorkflow> = futures::future::try_join_all(queries).await?.into_iter().flatten().collect();
        // Each query returned at most `limit + 1` distinct workflows, newest updated first;
        // if the merge has no more than `limit` distinct ones, every query was exhausted.
        heads.sort_by(|a, b| (b.updated_at, &b.id).cmp(&(a.updated_at, &a.id)));
        heads.dedup_by(|a, b| a.id == b.id);
        let more = heads.len() > limit as usize;
        heads.truncate(limit as usize);
        let next = if more { heads.last().map(|h| WorkflowCursor { updated_at: h.updated_at, id: h.id.clone() }) } else { None };
        Ok(WorkflowPage { items: heads, next })
    }
}

/// How often a write of a workflow's head reads again after an access change raced it.
const ACCESS_RACES: u32 = 5;

/// `update` on condition `base` and that the head's access is still `read`.
fn same_access(
    update: aws_sdk_dynamodb::types::builders::UpdateBuilder,
    read: &Access,
    base: &str,
) -> aws_sdk_dynamodb::types::builders::UpdateBuilder {
    if *read == Access::private() {
        update.condition_expression(format!("{base} AND attribute_not_exists(access)"))
    } else {
        update
            .condition_expression(format!("{base} AND access = :read"))
            .expression_attribute_values(":read", s(serde_json::to_string(read).unwrap_or_default()))
    }
}

impl DynamoWorkflows {
    /// An update of a head or grant item to version `next` (on condition the head is at
    /// `expected`; a grant only on condition it still exists).
    fn head_moves(
        &self,
        id: &WorkflowId,
        key: &Item,
        expected: u32,
        name: &WorkflowName,
        next: &WorkflowVersion,
        head: bool,
    ) -> Result<TransactWriteItem, StoreError> {
        let update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key.clone()))
            .update_expression("SET #version = :next, #name = :name, updated_at = :at, listed_at = :listed")
            .expression_attribute_names("#version", "version")
            .expression_attribute_names("#name", "name")
            .expression_attribute_values(":next", AttributeValue::N(next.version.to_string()))
            .expression_attribute_values(":name", s(name.as_str()))
            .expression_attribute_values(":at", s(stored_time(&next.written_at)))
            .expression_attribute_values(":listed", s(listed_at(&next.written_at, id)));
        let update = if head {
            update
                .condition_expression("#version = :expected AND attribute_not_exists(deleted_at)")
                .expression_attribute_values(":expected", AttributeValue::N(expected.to_string()))
        } else {
            update.condition_expression("attribute_exists(pk)")
        };
        let update = update.build().map_err(|e| StoreError::Rejected(defect("a workflow's head update", e)))?;
        Ok(TransactWriteItem::builder().update(update).build())
    }

    /// Whether version `next.version` of workflow `id` is `next` (our write, landed).
    async fn version_is(&self, id: &WorkflowId, next: &WorkflowVersion) -> Result<bool, StoreError> {
        match self.read(id, &version_key(next.version)).await? {
            Some(item) => Ok(version_of(&self.reader(&item))? == *next),
            None => Ok(false),
        }
    }

    /// Up to `limit + 1` live workflows `grantee` is a grantee of, after `after`.
    async fn granted(&self, grantee: &Principal, limit: u32, after: Option<&WorkflowCursor>) -> Result<Vec<StoredWorkflow>, StoreError> {
        let start = after.map(|c| {
            let mut start = key(&c.id, &grant_sk(grantee));
            start.insert("grantee".into(), s(grantee.key()));
            start.insert("listed_at".into(), s(listed_at(&c.updated_at, &c.id)));
            start
        });
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(GRANTEE_INDEX)
            .key_condition_expression("grantee = :grantee")
            .expression_attribute_values(":grantee", s(grantee.key()))
            .scan_index_forward(false)
            .limit(i32::try_from(limit.saturating_add(1)).unwrap_or(i32::MAX))
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(store_err(&self.table))?;
        out.items.unwrap_or_default().iter().map(|item| head_of(&self.reader(item))).collect()
    }
}
