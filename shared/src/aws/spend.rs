//! DynamoDB implementation of [`DailySpend`]: one counter item per owner and UTC day, and
//! one marker item per hold a call in flight has on it.
//!
//! Layout (rollups table; TTL `expires_at`, a week after the day):
//! - counter: `pk = SPEND#<owner>`, `sk = DAY#<yyyy-mm-dd>`, with `committed_pico`
//!   (charged plus held by calls in flight plus lost), `charged_pico` and `lost_pico`, all
//!   numbers;
//! - hold: `pk = HOLDS#<run id>`, `sk = <step>#<item index or ->#<attempt>#<holder>`, with
//!   the call's owner, day and worst case (`amount_pico`). Keyed by run, so the runner that
//!   takes a run over finds its holds with one Query, never a scan.
//!
//! Reserving is one `TransactWriteItems`: the counter's conditional update, `ADD
//! committed_pico :amount` if the item does not exist yet or `committed_pico <= cap -
//! amount`, and the hold's `Put` if no hold of that name exists. DynamoDB conditions cannot
//! add two attributes, which is why the counter keeps their sum and the room is computed
//! here. The write is atomic, so two runners reserving at once never both pass on the same
//! room, and a refused reservation leaves no hold.
//!
//! Settling is one `TransactWriteItems` too: the hold's `Delete` on condition that it
//! exists, and the counter's unconditional `ADD` (of `charged - amount` to the sum and
//! of the charge, or of the amount to `lost_pico` for a lost call). When the hold is gone,
//! settled already by this runner or by one that took the run over, the transaction is
//! cancelled and changes nothing: that is the settlement's idempotency, and what makes
//! only the first of a dead runner and its successor count.
//!
//! An `ADD` is not idempotent on its own: an SDK retry of one whose reply was lost would
//! count it twice. The SDK sets a transaction's client request token once per call and
//! keeps it across its retries, and DynamoDB applies a token once; the hold's condition
//! guards against everything else.

use super::dynamo::{expires_after, n, s};
use super::dynamo_error::{corrupt_item, defect, failed_condition_at, is_condition_failure, item_name, store_err};
use crate::config::Tables;
use crate::ids::{RunId, StepId};
use crate::money::Usd;
use crate::ports::{DailySpend, StoreError};
use crate::spend::{DayHold, DaySpend, Settlement};
use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, Delete, Put, TransactWriteItem, Update};
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
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

    fn hold_key(hold: &DayHold) -> HashMap<String, AttributeValue> {
        HashMap::from([("pk".to_owned(), s(holds_pk(&hold.run))), ("sk".to_owned(), s(hold_sk(hold)))])
    }
}

fn holds_pk(run: &RunId) -> String {
    format!("HOLDS#{run}")
}

/// Unique per call: a step id has no `#`, and the holder names the runner.
fn hold_sk(hold: &DayHold) -> String {
    let item = hold.item.map_or_else(|| "-".to_owned(), |i| i.to_string());
    format!("{}#{item}#{}#{}", hold.step, hold.attempt, hold.holder)
}

/// A hold's marker item.
#[derive(Serialize, Deserialize)]
struct HoldRow {
    pk: String,
    sk: String,
    step: StepId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    item: Option<usize>,
    attempt: u32,
    holder: String,
    owner: String,
    day: NaiveDate,
    amount_pico: u64,
    expires_at: i64,
}

impl HoldRow {
    fn of(hold: &DayHold) -> Self {
        Self {
            pk: holds_pk(&hold.run),
            sk: hold_sk(hold),
            step: hold.step.clone(),
            item: hold.item,
            attempt: hold.attempt,
            holder: hold.holder.clone(),
            owner: hold.owner.clone(),
            day: hold.day,
            amount_pico: hold.amount.pico(),
            expires_at: expires_at(hold.day),
        }
    }

    fn into_hold(self, run: &RunId) -> DayHold {
        DayHold {
            run: run.clone(),
            step: self.step,
            item: self.item,
            attempt: self.attempt,
            holder: self.holder,
            owner: self.owner,
            day: self.day,
            amount: Usd::from_pico(self.amount_pico),
        }
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
            // Below zero only if a settlement ever ran without its reservation (which the
            // hold's condition rules out): read that as nothing committed.
            let value: i128 = raw.parse().map_err(|e| StoreError::Corrupt(corrupt_item(table, item, format!("counter {name} = {raw:?}: {e}"))))?;
            Ok(Usd::from_pico(u64::try_from(value.max(0)).unwrap_or(u64::MAX)))
        }
        Some(other) => Err(StoreError::Corrupt(corrupt_item(table, item, format!("counter {name} is not a number: {other:?}")))),
    }
}

#[async_trait]
impl DailySpend for DynamoDailySpend {
    #[instrument(skip_all, fields(run_id = %hold.run, step_id = %hold.step, item = hold.item, attempt = hold.attempt, amount_pico = hold.amount.pico(), cap_pico = cap.pico()))]
    async fn reserve(&self, hold: &DayHold, cap: Usd) -> Result<Result<(), DaySpend>, StoreError> {
        let Some(room) = cap.pico().checked_sub(hold.amount.pico()) else {
            return self.day(&hold.owner, hold.day).await.map(Err);
        };
        let counter = Update::builder()
            .table_name(&self.table)
            .set_key(Some(Self::key(&hold.owner, hold.day)))
            .update_expression("ADD committed_pico :amount SET expires_at = :expires")
            .condition_expression("attribute_not_exists(committed_pico) OR committed_pico <= :room")
            .expression_attribute_values(":amount", n(hold.amount.pico()))
            .expression_attribute_values(":expires", n(expires_at(hold.day)))
            .expression_attribute_values(":room", n(room))
            .build()
            .map_err(|e| StoreError::Rejected(defect("a daily spend reservation", e)))?;
        let item = serde_dynamo::aws_sdk_dynamodb_1::to_item(HoldRow::of(hold)).map_err(|e| StoreError::Rejected(defect("a daily spend hold", e)))?;
        let marker = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(|e| StoreError::Rejected(defect("a daily spend hold", e)))?;
        let result = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().update(counter).build())
            .transact_items(TransactWriteItem::builder().put(marker).build())
            .send()
            .await;
        match result {
            Ok(_) => Ok(Ok(())),
            Err(e) if failed_condition_at(&e, 1) => Err(StoreError::Rejected(format!(
                "a daily spend hold {} already exists in table {} (a defect in chainrun; please report it)",
                hold_sk(hold),
                self.table
            ))),
            Err(e) if is_condition_failure(&e) => self.day(&hold.owner, hold.day).await.map(Err),
            Err(e) => Err(store_err(&self.table)(e)),
        }
    }

    #[instrument(skip_all, fields(run_id = %hold.run, step_id = %hold.step, item = hold.item, attempt = hold.attempt, amount_pico = hold.amount.pico(), settlement = settlement.name()))]
    async fn settle(&self, hold: &DayHold, settlement: Settlement) -> Result<(), StoreError> {
        let marker = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(Self::hold_key(hold)))
            .condition_expression("attribute_exists(pk)")
            .build()
            .map_err(|e| StoreError::Rejected(defect("a daily spend settlement", e)))?;
        let counter = Update::builder().table_name(&self.table).set_key(Some(Self::key(&hold.owner, hold.day)));
        let counter = match settlement {
            Settlement::Charged(charged) => counter
                .update_expression("ADD committed_pico :delta, charged_pico :charged SET expires_at = :expires")
                .expression_attribute_values(":delta", n(i128::from(charged.pico()) - i128::from(hold.amount.pico())))
                .expression_attribute_values(":charged", n(charged.pico())),
            Settlement::Lost => {
                counter.update_expression("ADD lost_pico :lost SET expires_at = :expires").expression_attribute_values(":lost", n(hold.amount.pico()))
            }
        };
        let counter = counter
            .expression_attribute_values(":expires", n(expires_at(hold.day)))
            .build()
            .map_err(|e| StoreError::Rejected(defect("a daily spend settlement", e)))?;
        let result = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().delete(marker).build())
            .transact_items(TransactWriteItem::builder().update(counter).build())
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            // The hold is gone: settled already, by this runner or the one that took its run over.
            Err(e) if failed_condition_at(&e, 0) => Ok(()),
            Err(e) => Err(store_err(&self.table)(e)),
        }
    }

    async fn holds(&self, run: &RunId) -> Result<Vec<DayHold>, StoreError> {
        let query = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", s(holds_pk(run)))
            .consistent_read(true);
        let items = super::query_all(query, |e| store_err(&self.table)(e)).await?;
        items
            .into_iter()
            .map(|item| {
                let name = item_name(&self.table, &item);
                let row: HoldRow = serde_dynamo::aws_sdk_dynamodb_1::from_item(item).map_err(|e| StoreError::Corrupt(format!("{name}: {e}")))?;
                Ok(row.into_hold(run))
            })
            .collect()
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
        Ok(DaySpend {
            charged: pico(&self.table, &item, "charged_pico")?,
            committed: pico(&self.table, &item, "committed_pico")?,
            lost: pico(&self.table, &item, "lost_pico")?,
        })
    }
}
