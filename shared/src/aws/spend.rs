//! DynamoDB implementation of [`DailySpend`]: one counter item per owner and UTC day.
//!
//! Layout (rollups table; TTL `expires_at`, a week after the day):
//! `pk = SPEND#<owner>`, `sk = DAY#<yyyy-mm-dd>`, with `committed_pico` (charged plus held by
//! calls in flight) and `charged_pico`, both numbers.
//!
//! Reserving is one conditional update: `ADD committed_pico :amount` if the item does
//! not exist yet or `committed_pico <= cap - amount`. DynamoDB conditions cannot add two
//! attributes, which is why the counter keeps their sum and the room is computed here. The
//! write is atomic, so two runners reserving at once never both pass on the same room.
//! Settling is one unconditional `ADD` of `charged - reserved` (negative when the call
//! cost less than its worst case) and of the charge.
//!
//! An `ADD` is not idempotent: an SDK retry of one whose reply was lost would count it
//! twice. So each is a one-item `TransactWriteItems`, whose client request token the SDK
//! sets once per call and keeps across its retries: DynamoDB applies a token once.

use super::dynamo::{expires_after, n, s};
use super::dynamo_error::{corrupt_item, defect, is_condition_failure, store_err};
use crate::config::Tables;
use crate::money::Usd;
use crate::ports::{DailySpend, StoreError};
use crate::spend::DaySpend;
use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, TransactWriteItem, Update};
use chrono::NaiveDate;
use std::collections::HashMap;
use tracing::instrument;

/// How long a day's counter is kept after the day.
const RETENTION_DAYS: u64 = 7;

#[derive(Clone)]
pub struct DynamoDailySpend {
    client: Client,
    table: String,
}

impl DynamoDailySpend {
    pub fn new(client: Client, tables: Tables) -> Self {
        Self { client, table: tables.rollups }
    }

    fn key(owner: &str, day: NaiveDate) -> HashMap<String, AttributeValue> {
        HashMap::from([("pk".to_owned(), s(format!("SPEND#{owner}"))), ("sk".to_owned(), s(format!("DAY#{day}")))])
    }
}

fn expires_at(day: NaiveDate) -> i64 {
    expires_after(day, RETENTION_DAYS)
}

/// A counter of a stored day item (`table` names it in errors).
fn pico(table: &str, item: &HashMap<String, AttributeValue>, name: &str) -> Result<Usd, StoreError> {
    match item.get(name) {
        None => Ok(Usd::ZERO),
        Some(AttributeValue::N(raw)) => {
            // Settlements may briefly take the sum below zero only if a reservation was lost;
            // read that as nothing committed.
            let value: i128 = raw.parse().map_err(|e| StoreError::Corrupt(corrupt_item(table, item, format!("counter {name} = {raw:?}: {e}"))))?;
            Ok(Usd::from_pico(u64::try_from(value.max(0)).unwrap_or(u64::MAX)))
        }
        Some(other) => Err(StoreError::Corrupt(corrupt_item(table, item, format!("counter {name} is not a number: {other:?}")))),
    }
}

#[async_trait]
impl DailySpend for DynamoDailySpend {
    #[instrument(skip(self), fields(amount_pico = amount.pico(), cap_pico = cap.pico()))]
    async fn reserve(&self, owner: &str, day: NaiveDate, amount: Usd, cap: Usd) -> Result<Result<(), DaySpend>, StoreError> {
        let Some(room) = cap.pico().checked_sub(amount.pico()) else {
            return self.day(owner, day).await.map(Err);
        };
        let update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(Self::key(owner, day)))
            .update_expression("ADD committed_pico :amount SET expires_at = :expires")
            .condition_expression("attribute_not_exists(committed_pico) OR committed_pico <= :room")
            .expression_attribute_values(":amount", n(amount.pico()))
            .expression_attribute_values(":expires", n(expires_at(day)))
            .expression_attribute_values(":room", n(room))
            .build()
            .map_err(|e| StoreError::Rejected(defect("a daily spend reservation", e)))?;
        let result = self.client.transact_write_items().transact_items(TransactWriteItem::builder().update(update).build()).send().await;
        match result {
            Ok(_) => Ok(Ok(())),
            Err(e) if is_condition_failure(&e) => self.day(owner, day).await.map(Err),
            Err(e) => Err(store_err(&self.table)(e)),
        }
    }

    #[instrument(skip(self), fields(reserved_pico = reserved.pico(), charged_pico = charged.pico()))]
    async fn settle(&self, owner: &str, day: NaiveDate, reserved: Usd, charged: Usd) -> Result<(), StoreError> {
        let delta = i128::from(charged.pico()) - i128::from(reserved.pico());
        let update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(Self::key(owner, day)))
            .update_expression("ADD committed_pico :delta, charged_pico :charged SET expires_at = :expires")
            .expression_attribute_values(":delta", n(delta))
            .expression_attribute_values(":charged", n(charged.pico()))
            .expression_attribute_values(":expires", n(expires_at(day)))
            .build()
            .map_err(|e| StoreError::Rejected(defect("a daily spend settlement", e)))?;
        self.client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().update(update).build())
            .send()
            .await
            .map_err(store_err(&self.table))?;
        Ok(())
    }

    async fn day(&self, owner: &str, day: NaiveDate) -> Result<DaySpend, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(owner, day)))
            .consistent_read(true)
            .send()
            .await
            .map_err(store_err(&self.table))?;
        let item = out.item.unwrap_or_default();
        Ok(DaySpend { charged: pico(&self.table, &item, "charged_pico")?, committed: pico(&self.table, &item, "committed_pico")? })
    }
}
