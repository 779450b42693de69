//! DynamoDB implementation of [`ResponseCache`]: one item per tenant and key in the runs
//! table, `pk = RESPONSE#<tenant>`, `sk = <key>` (a SHA-256, see [`crate::responses`]),
//! holding the reply's text and what its call was charged for, expiring at `expires_at`
//! (the table's TTL attribute; DynamoDB deletes expired items within days, so reads check
//! it too). A reply is at most the engine's 160 KiB limit, well inside an item's 400 KB.

use super::dynamo::{Item, n, s};
use super::dynamo_error::{corrupt_item, store_err};
use crate::config::Tables;
use crate::ids::Principal;
use crate::ports::{ResponseCache, StoreError};
use crate::responses::CachedReply;
use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use tracing::instrument;

#[derive(Clone)]
pub struct DynamoResponses {
    client: Client,
    table: String,
}

impl DynamoResponses {
    pub fn new(client: Client, tables: Tables) -> Self {
        Self { client, table: tables.runs }
    }

    fn key(tenant: &Principal, key: &str) -> Item {
        HashMap::from([("pk".to_owned(), s(format!("RESPONSE#{tenant}"))), ("sk".to_owned(), s(key))])
    }
}

#[async_trait]
impl ResponseCache for DynamoResponses {
    #[instrument(skip(self, key))]
    async fn get(&self, tenant: &Principal, key: &str, now: DateTime<Utc>) -> Result<Option<CachedReply>, StoreError> {
        let out =
            self.client.get_item().table_name(&self.table).set_key(Some(Self::key(tenant, key))).send().await.map_err(store_err(&self.table))?;
        let Some(item) = out.item else { return Ok(None) };
        let corrupt = |why: &str| StoreError::Corrupt(corrupt_item(&self.table, &item, why.to_owned()));
        let expires_at = match item.get("expires_at") {
            Some(AttributeValue::N(v)) => v.parse::<i64>().map_err(|_| corrupt("expires_at is not a number"))?,
            _ => return Err(corrupt("no expires_at")),
        };
        if expires_at <= now.timestamp() {
            return Ok(None);
        }
        let reply = match item.get("reply") {
            Some(AttributeValue::S(json)) => serde_json::from_str(json).map_err(|e| corrupt(&format!("reply: {e}")))?,
            _ => return Err(corrupt("no reply")),
        };
        Ok(Some(reply))
    }

    #[instrument(skip(self, key, reply))]
    async fn put(&self, tenant: &Principal, key: &str, reply: &CachedReply, expires_at: DateTime<Utc>) -> Result<(), StoreError> {
        let json = serde_json::to_string(reply).map_err(|e| StoreError::Rejected(format!("a cached reply does not encode: {e}")))?;
        let mut item = Self::key(tenant, key);
        item.insert("reply".into(), s(json));
        item.insert("expires_at".into(), n(expires_at.timestamp()));
        self.client.put_item().table_name(&self.table).set_item(Some(item)).send().await.map_err(store_err(&self.table))?;
        Ok(())
    }
}
