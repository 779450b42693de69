//! DynamoDB implementation of [`TemplateStore`], in the workflows table (see
//! `infra/tables.json`), in a key space of its own beside the stored workflows':
//! - `pk = TPL#<id>`, `sk = META`: one item per saved template — its owner
//!   (`template_owner`), title, description, the workflow name, the stored workflow and
//!   version it came from, the definition (a JSON string, like a workflow version's, so
//!   every number round-trips exactly) and when it was saved.
//! - `grantee = TEMPLATE#<principal>` and `listed_at` (`<created_at>#<id>`) put it in the
//!   table's GSI `by-grantee`, under a partition of its own: the workflows' grants use the
//!   bare principal (`USER#alice`), so `GET /workflows` never meets a template, and
//!   templates need no index of their own (CloudFormation adds one GSI per table update,
//!   and that index is the one workflow visibility already keys by principal). Today the
//!   only grantee is the owner; sharing a template later is more grant items, as for
//!   workflows.
//!
//! A template is written once (conditional on its id being new) and never updated.

use super::dynamo::{Item, MAX_ITEM_BYTES, item_size, s};
use super::dynamo_error::{is_condition_failure, store_err};
use super::reader::Reader;
use crate::config::Tables;
use crate::ids::{Principal, UserId, WorkflowId, WorkflowName};
use crate::ports::{StoreError, TemplateCursor, TemplatePage, TemplateStore};
use crate::stored::Pinned;
use crate::templates::{SavedTemplate, TemplateId};
use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use tracing::instrument;

const GRANTEE_INDEX: &str = "by-grantee";
const META: &str = "META";

#[derive(Clone)]
pub struct DynamoTemplates {
    client: Client,
    table: String,
}

fn key(id: &TemplateId) -> Item {
    HashMap::from([("pk".to_owned(), s(format!("TPL#{id}"))), ("sk".to_owned(), s(META))])
}

/// Fixed-width UTC, so the index sorts chronologically as strings.
fn stored_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn listed_at(created_at: &DateTime<Utc>, id: &TemplateId) -> String {
    format!("{}#{id}", stored_time(created_at))
}

/// The `by-grantee` partition of the templates `owner` may see.
fn grantee(owner: &UserId) -> String {
    format!("TEMPLATE#{}", Principal::User(owner.to_string()).key())
}

fn item(template: &SavedTemplate) -> Result<Item, StoreError> {
    let mut item = key(&template.id);
    item.insert("template_owner".into(), s(template.owner.as_str()));
    item.insert("grantee".into(), s(grantee(&template.owner)));
    item.insert("listed_at".into(), s(listed_at(&template.created_at, &template.id)));
    item.insert("title".into(), s(&template.title));
    if let Some(description) = &template.description {
        item.insert("description".into(), s(description));
    }
    item.insert("name".into(), s(template.name.as_str()));
    item.insert("source_workflow".into(), s(template.source.workflow_id.as_str()));
    item.insert("source_version".into(), AttributeValue::N(template.source.version.to_string()));
    item.insert("definition".into(), s(template.definition.to_string()));
    item.insert("created_at".into(), s(stored_time(&template.created_at)));
    let size = item_size(&item);
    if size > MAX_ITEM_BYTES {
        return Err(StoreError::TooLarge(format!(
            "template {} is {size} bytes; a template's definition must fit one 400 KB DynamoDB item",
            template.id
        )));
    }
    Ok(item)
}

/// A stored template from its item.
fn template(r: &Reader) -> Result<SavedTemplate, StoreError> {
    Ok(SavedTemplate {
        id: r.parsed("pk", |pk| TemplateId::parse(pk.strip_prefix("TPL#").unwrap_or(pk)))?,
        owner: r.parsed("template_owner", UserId::parse)?,
        title: r.text("title")?.to_owned(),
        description: r.optional_text("description").map(str::to_owned),
        name: r.parsed("name", WorkflowName::parse)?,
        source: Pinned { workflow_id: r.parsed("source_workflow", WorkflowId::parse)?, version: r.number("source_version")? },
        definition: r.json("definition")?,
        created_at: r.time("created_at")?,
    })
}

impl DynamoTemplates {
    pub fn new(client: Client, tables: Tables) -> Self {
        Self { client, table: tables.workflows }
    }

    fn reader<'a>(&'a self, item: &'a Item) -> Reader<'a> {
        Reader { table: &self.table, item }
    }
}

#[async_trait]
impl TemplateStore for DynamoTemplates {
    #[instrument(skip_all, fields(template_id = %template.id))]
    async fn save(&self, template: &SavedTemplate) -> Result<(), StoreError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item(template)?))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            // Ids are fresh ULIDs: a taken one is this very write landed before (a retry
            // whose reply was lost), or another template, never ours to overwrite.
            Err(e) if is_condition_failure(&e) => match self.get(&template.id).await? {
                Some(stored) if stored == *template => Ok(()),
                _ => Err(StoreError::Rejected(format!("template {} already exists", template.id))),
            },
            Err(e) => Err(store_err(&self.table)(e)),
        }
    }

    #[instrument(skip(self), fields(template_id = %id))]
    async fn get(&self, id: &TemplateId) -> Result<Option<SavedTemplate>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(id)))
            .consistent_read(true)
            .send()
            .await
            .map_err(store_err(&self.table))?;
        out.item.as_ref().map(|item| template(&self.reader(item))).transpose()
    }

    #[instrument(skip(self), fields(template_id = %id))]
    async fn delete(&self, id: &TemplateId) -> Result<bool, StoreError> {
        let result =
            self.client.delete_item().table_name(&self.table).set_key(Some(key(id))).condition_expression("attribute_exists(pk)").send().await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failure(&e) => Ok(false),
            Err(e) => Err(store_err(&self.table)(e)),
        }
    }

    #[instrument(skip(self, after), fields(limit))]
    async fn list(&self, owner: &UserId, limit: u32, after: Option<&TemplateCursor>) -> Result<TemplatePage, StoreError> {
        let limit = limit.max(1);
        let start = after.map(|c| {
            let mut start = key(&c.id);
            start.insert("grantee".into(), s(grantee(owner)));
            start.insert("listed_at".into(), s(listed_at(&c.created_at, &c.id)));
            start
        });
        // One more than asked: whether it comes back says if there is a next page, so a
        // client is never handed a cursor to an empty page.
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(GRANTEE_INDEX)
            .key_condition_expression("grantee = :grantee")
            .expression_attribute_values(":grantee", s(grantee(owner)))
            .scan_index_forward(false)
            .limit(i32::try_from(limit.saturating_add(1)).unwrap_or(i32::MAX))
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(store_err(&self.table))?;
        let mut items = Vec::new();
        for item in out.items.unwrap_or_default() {
            items.push(template(&self.reader(&item))?);
        }
        let more = items.len() > limit as usize;
        items.truncate(limit as usize);
        let next = if more { items.last().map(|t| TemplateCursor { created_at: t.created_at, id: t.id.clone() }) } else { None };
        Ok(TemplatePage { items, next })
    }
}
