//! DynamoDB implementation of [`Idempotency`]: one item per caller and key in the runs
//! table, `pk = IDEMPOTENCY#<caller>#<key>`, `sk = KEY`, expiring a day later (TTL
//! `expires_at`). The item holds the request's fingerprint and, once answered, the answer.
//!
//! Claiming is one conditional put: the key is free, or its claim went stale (a request
//! that never answered — an API function that timed out). Keeping the answer and giving a
//! claim up are conditional on the fingerprint, so a request can only finish its own claim.

use super::dynamo::{Item, n, s};
use super::dynamo_error::{corrupt_item, is_condition_failure, store_err};
use crate::config::Tables;
use crate::ports::{Idempotency, KEY_PENDING_SECS, KEY_RETENTION_HOURS, KeyClaim, StoreError, StoredResponse};
use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use tracing::instrument;

#[derive(Clone)]
pub struct DynamoIdempotency {
    client: Client,
    table: String,
}

impl DynamoIdempotency {
    pub fn new(client: Client, tables: Tables) -> Self {
        Self { client, table: tables.runs }
    }

    fn key(scope: &str, key: &str) -> Item {
        HashMap::from([("pk".to_owned(), s(format!("IDEMPOTENCY#{scope}#{key}"))), ("sk".to_owned(), s("KEY"))])
    }

    async fn read(&self, scope: &str, key: &str) -> Result<Option<Item>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(scope, key)))
            .consistent_read(true)
            .send()
            .await
            .map_err(store_err(&self.table))?;
        Ok(out.item)
    }
}

fn text<'a>(table: &str, item: &'a Item, name: &str) -> Result<&'a str, StoreError> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Ok(v),
        _ => Err(StoreError::Corrupt(corrupt_item(table, item, format!("no {name}")))),
    }
}

#[async_trait]
impl Idempotency for DynamoIdempotency {
    #[instrument(skip(self, fingerprint))]
    async fn begin(&self, scope: &str, key: &str, fingerprint: &str, now: DateTime<Utc>) -> Result<KeyClaim, StoreError> {
        let mut item = Self::key(scope, key);
        item.insert("fingerprint".into(), s(fingerprint));
        item.insert("state".into(), s("pending"));
        item.insert("pending_until".into(), n((now + chrono::Duration::seconds(KEY_PENDING_SECS)).timestamp_millis()));
        item.insert("expires_at".into(), n((now + chrono::Duration::hours(KEY_RETENTION_HOURS)).timestamp()));
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk) OR (#state = :pending AND pending_until < :now)")
            .expression_attribute_names("#state", "state")
            .expression_attribute_values(":pending", s("pending"))
            .expression_attribute_values(":now", n(now.timestamp_millis()))
            .send()
            .await;
        match result {
            Ok(_) => Ok(KeyClaim::New),
            Err(e) if is_condition_failure(&e) => {
                let Some(stored) = self.read(scope, key).await? else { return Ok(KeyClaim::InProgress) };
                if text(&self.table, &stored, "fingerprint")? != fingerprint {
                    return Ok(KeyClaim::Mismatch);
                }
                if text(&self.table, &stored, "state")? != "done" {
                    return Ok(KeyClaim::InProgress);
                }
                let status = match stored.get("status") {
                    Some(AttributeValue::N(raw)) => raw.parse().ok(),
                    _ => None,
                };
                let status = status.ok_or_else(|| StoreError::Corrupt(corrupt_item(&self.table, &stored, "no status")))?;
                Ok(KeyClaim::Replay(StoredResponse { status, body: text(&self.table, &stored, "body")?.to_owned() }))
            }
            Err(e) => Err(store_err(&self.table)(e)),
        }
    }

    #[instrument(skip(self, fingerprint, response), fields(status = response.status))]
    async fn complete(&self, scope: &str, key: &str, fingerprint: &str, response: &StoredResponse) -> Result<(), StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(scope, key)))
            .update_expression("SET #state = :done, #status = :status, #body = :body REMOVE pending_until")
            .condition_expression("fingerprint = :fingerprint")
            .expression_attribute_names("#state", "state")
            .expression_attribute_names("#status", "status")
            .expression_attribute_names("#body", "body")
            .expression_attribute_values(":done", s("done"))
            .expression_attribute_values(":status", n(response.status))
            .expression_attribute_values(":body", s(&response.body))
            .expression_attribute_values(":fingerprint", s(fingerprint))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            // The item went with its key's day, or a different request owns the key now:
            // this answer has nobody to replay to.
            Err(e) if is_condition_failure(&e) => Ok(()),
            Err(e) => Err(store_err(&self.table)(e)),
        }
    }

    async fn abandon(&self, scope: &str, key: &str, fingerprint: &str) -> Result<(), StoreError> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(scope, key)))
            .condition_expression("fingerprint = :fingerprint AND #state = :pending")
            .expression_attribute_names("#state", "state")
            .expression_attribute_values(":fingerprint", s(fingerprint))
            .expression_attribute_values(":pending", s("pending"))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_condition_failure(&e) => Ok(()),
            Err(e) => Err(store_err(&self.table)(e)),
        }
    }
}
