//! DynamoDB implementation of [`TenantQuota`]: tenant counters and slot sets in the rollups
//! table, under their own `QUOTA#` key prefix.
//!
//! Why the rollups table and not a table of its own: it already holds counters updated with
//! `ADD` and expired by TTL (`expires_at`), every function already has its name, and the
//! API's role is granted only `QUOTA#` keys of it (`dynamodb:LeadingKeys` in
//! `template.yaml`), so least privilege holds without a sixth table to create, configure
//! and back up.
//!
//! Layout:
//! - counter: `pk = QUOTA#<tenant>#STARTS#<shard>` or `QUOTA#<tenant>#TOKENS#<model>#<shard>`,
//!   `sk = W#<minute index>`, with `used` (a number) and `expires_at` (a window after the
//!   window ends);
//! - slots: `pk = QUOTA#<tenant>#RUNS#<shard>`, `sk = SLOTS`, with `runs` (a string set of
//!   run ids). No TTL: it holds only runs that have not ended, and an empty set is removed
//!   with its last member.
//!
//! Every change is one `UpdateItem` whose condition carries the limit: `ADD used :n` if
//! `attribute_not_exists(used) OR used <= :room` (room = limit − n: conditions cannot add),
//! and `ADD runs :id` if `attribute_not_exists(runs) OR size(runs) < :cap OR contains(runs,
//! :run)`. DynamoDB applies each atomically, so concurrent callers never both pass on the
//! same room. A counter's `ADD` is not idempotent: an SDK retry of one whose reply was lost
//! counts twice, erring towards refusing. A set's `ADD`/`DELETE` of a member is.
//!
//! moto does not apply a conditional update atomically (it checks, then writes, without a
//! lock across concurrent requests, and can lose concurrent `ADD`s): the contract's
//! concurrency proof holds against the in-memory adapter and is only reported on moto,
//! whose contract runs sequentially (see `shared/tests/quota_contract.rs`). The local
//! stack's limits are therefore approximate under concurrent requests; DynamoDB's are exact.

use super::dynamo::{n, s};
use super::dynamo_error::{is_condition_failure, store_err};
use crate::config::Tables;
use crate::ids::RunId;
use crate::ports::{StoreError, TenantQuota};
use crate::quota::{Counter, Measure, Occupied, Slots};
use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;
use std::collections::HashMap;
use tracing::instrument;

#[derive(Clone)]
pub struct DynamoQuota {
    client: Client,
    table: String,
}

impl DynamoQuota {
    pub fn new(client: Client, tables: Tables) -> Self {
        Self { client, table: tables.rollups }
    }

    fn counter_key(counter: &Counter) -> HashMap<String, AttributeValue> {
        let measure = match &counter.measure {
            Measure::Starts => "STARTS".to_owned(),
            Measure::Tokens(model) => format!("TOKENS#{model}"),
        };
        let pk = format!("QUOTA#{}#{measure}#{}", counter.tenant.key(), counter.shard);
        HashMap::from([("pk".to_owned(), s(pk)), ("sk".to_owned(), s(format!("W#{}", counter.window.index)))])
    }

    fn slots_key(slots: &Slots) -> HashMap<String, AttributeValue> {
        let pk = format!("QUOTA#{}#RUNS#{}", slots.tenant.key(), slots.shard);
        HashMap::from([("pk".to_owned(), s(pk)), ("sk".to_owned(), s("SLOTS"))])
    }

    async fn members(&self, slots: &Slots) -> Result<Vec<RunId>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(Self::slots_key(slots)))
            .consistent_read(true)
            .send()
            .await
            .map_err(store_err(&self.table))?;
        let ids = match out.item.as_ref().and_then(|item| item.get("runs")) {
            Some(AttributeValue::Ss(ids)) => ids.clone(),
            _ => Vec::new(),
        };
        // An id that does not parse was not written by chainrun; it holds nothing.
        Ok(ids.iter().filter_map(|id| RunId::parse(id).ok()).collect())
    }
}

#[async_trait]
impl TenantQuota for DynamoQuota {
    #[instrument(skip_all, fields(tenant = %counter.tenant.key(), window = counter.window.index, shard = counter.shard, amount, limit))]
    async fn take(&self, counter: &Counter, amount: u64, limit: u64) -> Result<bool, StoreError> {
        let Some(room) = limit.checked_sub(amount) else { return Ok(false) };
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::counter_key(counter)))
            .update_expression("ADD used :amount SET expires_at = :expires")
            .condition_expression("attribute_not_exists(used) OR used <= :room")
            .expression_attribute_values(":amount", n(amount))
            .expression_attribute_values(":room", n(room))
            .expression_attribute_values(":expires", n(counter.window.expires_at()))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failure(&e) => Ok(false),
            Err(e) => Err(store_err(&self.table)(e)),
        }
    }

    #[instrument(skip_all, fields(tenant = %counter.tenant.key(), window = counter.window.index, amount))]
    async fn give_back(&self, counter: &Counter, amount: u64) -> Result<(), StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::counter_key(counter)))
            .update_expression("ADD used :minus")
            .condition_expression("attribute_exists(used)")
            .expression_attribute_values(":minus", n(-i128::from(amount)))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            // Expired (or never written): nothing to give back to.
            Err(e) if is_condition_failure(&e) => Ok(()),
            Err(e) => Err(store_err(&self.table)(e)),
        }
    }

    async fn used(&self, counter: &Counter) -> Result<u64, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(Self::counter_key(counter)))
            .consistent_read(true)
            .send()
            .await
            .map_err(store_err(&self.table))?;
        match out.item.as_ref().and_then(|item| item.get("used")) {
            None => Ok(0),
            Some(AttributeValue::N(raw)) => {
                let value: i128 = raw.parse().map_err(|e| StoreError::Corrupt(format!("{}: quota counter used = {raw:?}: {e}", self.table)))?;
                Ok(u64::try_from(value.max(0)).unwrap_or(u64::MAX))
            }
            Some(other) => Err(StoreError::Corrupt(format!("{}: quota counter used is not a number: {other:?}", self.table))),
        }
    }

    #[instrument(skip_all, fields(tenant = %slots.tenant.key(), shard = slots.shard, run_id = %run, capacity))]
    async fn occupy(&self, slots: &Slots, run: &RunId, capacity: u64) -> Result<Occupied, StoreError> {
        if capacity == 0 {
            return Ok(Occupied::Full(Vec::new()));
        }
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::slots_key(slots)))
            .update_expression("ADD runs :ids")
            .condition_expression("attribute_not_exists(runs) OR size(runs) < :cap OR contains(runs, :run)")
            .expression_attribute_values(":ids", AttributeValue::Ss(vec![run.to_string()]))
            .expression_attribute_values(":run", s(run.to_string()))
            .expression_attribute_values(":cap", n(capacity))
            .send()
            .await;
        match result {
            Ok(_) => Ok(Occupied::Admitted),
            Err(e) if is_condition_failure(&e) => Ok(Occupied::Full(self.members(slots).await?)),
            Err(e) => Err(store_err(&self.table)(e)),
        }
    }

    #[instrument(skip_all, fields(tenant = %slots.tenant.key(), shard = slots.shard, run_id = %run))]
    async fn vacate(&self, slots: &Slots, run: &RunId) -> Result<bool, StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::slots_key(slots)))
            .update_expression("DELETE runs :ids")
            .condition_expression("contains(runs, :run)")
            .expression_attribute_values(":ids", AttributeValue::Ss(vec![run.to_string()]))
            .expression_attribute_values(":run", s(run.to_string()))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failure(&e) => Ok(false),
            Err(e) => Err(store_err(&self.table)(e)),
        }
    }
}
