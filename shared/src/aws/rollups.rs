//! DynamoDB implementation of [`Analytics`]: per-owner, per-workflow, per-day rollups.
//!
//! Layout (rollups table, see `infra/tables.json`; TTL `expires_at`, 400 days after the day):
//! - `pk = ROLLUP#<principal>`, `sk = DAY#<yyyy-mm-dd>#WF#<workflow>#P#<n>`: sums over the
//!   runs that principal owns, of that workflow, that finished on that UTC day. Part 0 holds
//!   the run counters (`runs`, `failures`, `cost_pico`, `latency_ms`) and the first steps;
//!   further parts hold the rest of the steps, as `step#<id>#runs|failures|cost_pico|latency_ms`.
//!   Why top-level counters in parts: `ADD` works on top-level number attributes only (not
//!   inside a map), and an update expression is limited to 4 KB, which 200 steps × 4
//!   counters would exceed. Readers sum every row of a day, so which part a step lands in
//!   does not matter.
//! - `pk = RUN#<run id>`, `sk = ROLLED_UP#<principal>`: the marker that the run was added to
//!   that principal's rollup.
//!
//! Writing: one transaction per owner, holding the marker (conditional on not existing) and
//! the `ADD` to every part. It lands whole or not at all, so a retried delivery never counts
//! a run twice and a crash never leaves half a run counted. Two runs finishing at once can
//! collide on a row (`TransactionConflict`); that is retried here with jittered backoff.
//!
//! Reading: one Query per principal, `sk BETWEEN DAY#<from> AND DAY#<to + 1 day>`, returns
//! every workflow's rows for the period — no scan, no list of workflows needed.

use super::dynamo::{Item, expires_after, n, run_pk, s};
use super::dynamo_error::{analytics_err, corrupt_item, defect, is_condition_failure};
use crate::analytics::{CostSums, DayCosts, ROLLUP_RETENTION_DAYS, RunRollup, StepRollup, WorkflowCosts, merge_by_day, merge_by_workflow};
use crate::config::Tables;
use crate::ids::{Principal, StepId};
use crate::money::Usd;
use crate::ports::{Analytics, AnalyticsError, Recorded};
use crate::run::{RunRecord, StepRecord};
use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem, Update};
use chrono::NaiveDate;
use rand::Rng;
use std::time::Duration;
use tracing::{debug, instrument, warn};

/// Steps per rollup row. 4 counters each keep one update expression near 1.4 KB, well
/// under DynamoDB's 4 KB, and at about 100 clauses, which the local stack's moto still
/// parses (its recursive parser fails somewhere past 120).
const STEPS_PER_PART: usize = 25;
/// Attempts at one owner's transaction while it collides with concurrent ones.
const CONFLICT_ATTEMPTS: u32 = 8;

#[derive(Clone)]
pub struct DynamoAnalytics {
    client: Client,
    table: String,
}

impl DynamoAnalytics {
    pub fn new(client: Client, tables: Tables) -> Self {
        Self { client, table: tables.rollups }
    }
}

/// The rollup key a run adds to: a user's one key, or for a shared principal (the admin
/// feed, `PUBLIC`, a group) one of its shards, chosen by the run (see [`crate::shards`]),
/// so concurrent completions neither exceed one key's write rate nor queue on one item.
fn rollup_pk(principal: &Principal, run: &crate::ids::RunId) -> String {
    format!("ROLLUP#{}", crate::shards::feed_key(principal, run))
}

/// Every key a principal's rollups live under: its shards, and the unsharded key that
/// rollups written before sharding used.
fn rollup_pks(principal: &Principal) -> Vec<String> {
    let mut keys: Vec<String> = crate::shards::feed_keys(principal).into_iter().map(|k| format!("ROLLUP#{k}")).collect();
    if crate::shards::is_sharded(principal) {
        keys.push(format!("ROLLUP#{}", principal.key()));
    }
    keys
}

fn day_sk(day: NaiveDate) -> String {
    format!("DAY#{day}")
}

fn expires_at(day: NaiveDate) -> i64 {
    expires_after(day, u64::from(ROLLUP_RETENTION_DAYS))
}

/// One rollup row's `UpdateItem`, built without the SDK so its size can be tested.
#[derive(Debug)]
struct PartUpdate {
    sk: String,
    expression: String,
    names: Vec<(String, String)>,
    values: Vec<(String, AttributeValue)>,
}

/// The row updates that add `rollup` to one owner's rollup: part 0 carries the run
/// counters, and the steps are spread over parts of [`STEPS_PER_PART`].
fn part_updates(rollup: &RunRollup) -> Vec<PartUpdate> {
    let chunks: Vec<&[StepRollup]> = if rollup.steps.is_empty() { vec![&[]] } else { rollup.steps.chunks(STEPS_PER_PART).collect() };
    chunks
        .into_iter()
        .enumerate()
        .map(|(part, steps)| {
            let mut names = vec![
                ("#workflow".to_owned(), "workflow".to_owned()),
                ("#day".to_owned(), "day".to_owned()),
                ("#expires".to_owned(), "expires_at".to_owned()),
            ];
            let mut values = vec![
                (":workflow".to_owned(), s(&rollup.workflow)),
                (":day".to_owned(), s(rollup.day.to_string())),
                (":expires".to_owned(), n(expires_at(rollup.day))),
            ];
            let mut adds = Vec::new();
            let mut counters = |prefix: &str, sums: &CostSums| {
                for (field, value) in [
                    ("runs", sums.runs),
                    ("failures", sums.failures),
                    ("cost_pico", sums.cost.pico()),
                    ("latency_ms", sums.latency_ms),
                    ("cached", sums.cached),
                ] {
                    // Most steps never hit the response cache: no attribute for them.
                    if field == "cached" && value == 0 {
                        continue;
                    }
                    let i = adds.len();
                    names.push((format!("#a{i}"), format!("{prefix}{field}")));
                    values.push((format!(":a{i}"), n(value)));
                    adds.push(format!("#a{i} :a{i}"));
                }
            };
            if part == 0 {
                counters("", &rollup.run);
            }
            for step in steps {
                counters(&format!("step#{}#", step.step_id), &step.sums);
            }
            let mut expression = "SET #workflow = :workflow, #day = :day, #expires = :expires".to_owned();
            if !adds.is_empty() {
                expression.push_str(" ADD ");
                expression.push_str(&adds.join(", "));
            }
            PartUpdate { sk: format!("{}#WF#{}#P#{part}", day_sk(rollup.day), rollup.workflow), expression, names, values }
        })
        .collect()
}

/// Sums of one stored row of `table`; attributes it does not know (`expires_at`, …) are ignored.
fn row_costs(table: &str, item: &Item) -> Result<WorkflowCosts, AnalyticsError> {
    let corrupt = |what: String| AnalyticsError::Corrupt(corrupt_item(table, item, what));
    let Some(AttributeValue::S(workflow)) = item.get("workflow") else {
        return Err(corrupt("no workflow".into()));
    };
    let mut costs = WorkflowCosts::new(workflow.clone());
    for (name, value) in item {
        let AttributeValue::N(raw) = value else { continue };
        let (step, field) = match name.strip_prefix("step#") {
            Some(rest) => {
                let (id, field) = rest.rsplit_once('#').ok_or_else(|| corrupt(format!("rollup attribute {name:?}")))?;
                (Some(StepId::parse(id).map_err(|e| corrupt(e.to_string()))?), field)
            }
            None => (None, name.as_str()),
        };
        let value: u64 = raw.parse().map_err(|_| corrupt(format!("rollup attribute {name:?} = {raw:?}")))?;
        let add = match field {
            "runs" => CostSums { runs: value, ..CostSums::default() },
            "failures" => CostSums { failures: value, ..CostSums::default() },
            "cost_pico" => CostSums { cost: Usd::from_pico(value), ..CostSums::default() },
            "latency_ms" => CostSums { latency_ms: value, ..CostSums::default() },
            "cached" => CostSums { cached: value, ..CostSums::default() },
            _ => continue,
        };
        match step {
            Some(id) => costs.steps.entry(id).or_default().add(&add),
            None => costs.totals.add(&add),
        }
    }
    Ok(costs)
}

/// The UTC day a rollup row counts, from its `day` attribute.
fn row_day(table: &str, item: &Item) -> Result<NaiveDate, AnalyticsError> {
    match item.get("day") {
        Some(AttributeValue::S(day)) => day.parse().map_err(|_| AnalyticsError::Corrupt(corrupt_item(table, item, format!("rollup day {day:?}")))),
        _ => Err(AnalyticsError::Corrupt(corrupt_item(table, item, "no day"))),
    }
}

fn is_conflict(err: &SdkError<impl ProvideErrorMetadata, HttpResponse>) -> bool {
    matches!(err.code(), Some("TransactionConflictException"))
        || (err.code() == Some("TransactionCanceledException") && err.message().unwrap_or_default().contains("TransactionConflict"))
}

fn build_err(e: impl std::fmt::Display) -> AnalyticsError {
    AnalyticsError::Rejected(defect("a rollup write", e))
}

impl DynamoAnalytics {
    /// The marker and the part updates for one owner, as one transaction's items.
    fn owner_items(&self, owner: &Principal, rollup: &RunRollup, parts: &[PartUpdate]) -> Result<Vec<TransactWriteItem>, AnalyticsError> {
        let marker = Put::builder()
            .table_name(&self.table)
            .item("pk", s(run_pk(&rollup.run_id)))
            .item(
                "sk",
                s(match rollup.revision {
                    0 => format!("ROLLED_UP#{}", owner.key()),
                    n => format!("ROLLED_UP#{}#{n}", owner.key()),
                }),
            )
            .item("expires_at", n(expires_at(rollup.day)))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(build_err)?;
        let mut items = vec![TransactWriteItem::builder().put(marker).build()];
        for part in parts {
            let mut update = Update::builder()
                .table_name(&self.table)
                .key("pk", s(rollup_pk(owner, &rollup.run_id)))
                .key("sk", s(&part.sk))
                .update_expression(&part.expression);
            for (k, v) in &part.names {
                update = update.expression_attribute_names(k, v);
            }
            for (k, v) in &part.values {
                update = update.expression_attribute_values(k, v.clone());
            }
            items.push(TransactWriteItem::builder().update(update.build().map_err(build_err)?).build());
        }
        Ok(items)
    }

    /// Adds the run to one owner's rollup; `false` when the marker says it already was.
    async fn record_for(&self, owner: &Principal, items: Vec<TransactWriteItem>) -> Result<bool, AnalyticsError> {
        for attempt in 1..=CONFLICT_ATTEMPTS {
            match self.client.transact_write_items().set_transact_items(Some(items.clone())).send().await {
                Ok(_) => return Ok(true),
                // Only the marker is conditional: it exists, so this owner has the run.
                Err(e) if is_condition_failure(&e) => return Ok(false),
                Err(e) if is_conflict(&e) => {
                    let cap = 20u64 << attempt.min(6);
                    debug!(owner = %owner, attempt, "rollup row busy; retrying");
                    let delay = Duration::from_millis(rand::rng().random_range(cap / 2..=cap));
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(analytics_err(&self.table)(e)),
            }
        }
        warn!(owner = %owner, attempts = CONFLICT_ATTEMPTS, "rollup row stayed busy");
        Err(AnalyticsError::Unavailable("rollup rows stayed busy with concurrent runs".into()))
    }
}

#[async_trait]
impl Analytics for DynamoAnalytics {
    #[instrument(skip_all, fields(run_id = %run.id, workflow = %run.workflow))]
    async fn record_run(&self, run: &RunRecord, steps: &[StepRecord]) -> Result<Recorded, AnalyticsError> {
        let rollup = RunRollup::of(run, steps).ok_or_else(|| AnalyticsError::Unfinished(run.id.clone()))?;
        let parts = part_updates(&rollup);
        let mut outcome = Recorded::default();
        for owner in &run.owners {
            let items = self.owner_items(owner, &rollup, &parts)?;
            if self.record_for(owner, items).await? {
                outcome.added += 1;
            } else {
                outcome.already += 1;
            }
        }
        debug!(added = outcome.added, already = outcome.already, cost_pico = rollup.run.cost.pico(), "run rolled up");
        Ok(outcome)
    }

    #[instrument(skip_all, fields(principal = %principal, %from, %to))]
    async fn costs(&self, principal: &Principal, from: NaiveDate, to: NaiveDate) -> Result<Vec<WorkflowCosts>, AnalyticsError> {
        let items = self.rows(principal, from, to).await?;
        let rows = items.iter().map(|item| row_costs(&self.table, item)).collect::<Result<Vec<_>, _>>()?;
        Ok(merge_by_workflow(rows))
    }

    #[instrument(skip_all, fields(principal = %principal, %from, %to))]
    async fn costs_by_day(&self, principal: &Principal, from: NaiveDate, to: NaiveDate) -> Result<Vec<DayCosts>, AnalyticsError> {
        let items = self.rows(principal, from, to).await?;
        let rows = items.iter().map(|item| Ok(DayCosts { day: row_day(&self.table, item)?, costs: row_costs(&self.table, item)? }));
        Ok(merge_by_day(rows.collect::<Result<Vec<_>, AnalyticsError>>()?))
    }
}

impl DynamoAnalytics {
    /// Every rollup row of `principal` for a day in `from..=to`.
    async fn rows(&self, principal: &Principal, from: NaiveDate, to: NaiveDate) -> Result<Vec<Item>, AnalyticsError> {
        if from > to {
            return Ok(Vec::new());
        }
        // `DAY#<to + 1>` sorts after every `DAY#<to>#…` key and before the next day's rows.
        let end = to.succ_opt().map_or_else(|| format!("{}~", day_sk(to)), day_sk);
        // A shared principal's rollups are spread over shards: query them all at once.
        let queries = rollup_pks(principal).into_iter().map(|pk| {
            let query = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk AND sk BETWEEN :from AND :to")
                .expression_attribute_values(":pk", s(pk))
                .expression_attribute_values(":from", s(day_sk(from)))
                .expression_attribute_values(":to", s(end.clone()));
            super::query_all(query, |e| analytics_err(&self.table)(e))
        });
        Ok(futures::future::try_join_all(queries).await?.into_iter().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DynamoDB's limit on the length of one expression.
    const MAX_EXPRESSION_BYTES: usize = 4096;

    fn rollup(step_count: usize) -> RunRollup {
        RunRollup {
            revision: 0,
            run_id: crate::ids::RunId::new(),
            workflow: "w".repeat(128),
            day: NaiveDate::from_ymd_opt(2025, 6, 30).unwrap(),
            run: CostSums { runs: 1, failures: 1, cost: Usd::from_pico(u64::MAX), latency_ms: 12, cached: 0 },
            steps: (0..step_count)
                .map(|i| StepRollup {
                    step_id: StepId::parse(&format!("s{i:0>63}")).unwrap(),
                    sums: CostSums { runs: 1, failures: 0, cost: Usd::from_pico(u64::MAX), latency_ms: 7, cached: 0 },
                })
                .collect(),
        }
    }

    #[test]
    fn the_largest_workflow_fits_dynamodb_expression_and_transaction_limits() {
        let parts = part_updates(&rollup(200));
        assert_eq!(parts.len(), 8);
        assert!(parts.len() < 100, "marker + parts fit one transaction");
        for part in &parts {
            assert!(part.expression.len() < MAX_EXPRESSION_BYTES / 2, "{} bytes", part.expression.len());
        }
        assert!(parts[0].expression.contains("#a0 :a0"));
        assert_eq!(parts[0].names.iter().filter(|(_, v)| !v.starts_with("step#")).count(), 3 + 4, "run counters only in part 0");
        assert!(parts[1..].iter().all(|p| p.names.iter().filter(|(_, v)| !v.starts_with("step#")).count() == 3));
        let step_counters: usize = parts.iter().map(|p| p.names.iter().filter(|(_, v)| v.starts_with("step#")).count()).sum();
        assert_eq!(step_counters, 200 * 4, "no `cached` counter where nothing was reused");
        let mut reused = rollup(2);
        reused.steps[1].sums.cached = 3;
        let names = &part_updates(&reused)[0].names;
        assert_eq!(names.iter().filter(|(_, v)| v.ends_with("#cached")).count(), 1, "{names:?}");
    }

    #[test]
    fn a_run_without_steps_still_counts() {
        let parts = part_updates(&rollup(0));
        assert_eq!(parts.len(), 1);
        assert!(parts[0].sk.ends_with("#P#0") && parts[0].sk.starts_with("DAY#2025-06-30#WF#www"));
    }

    #[test]
    fn a_stored_row_reads_back_as_the_sums_it_was_given() {
        let r = rollup(2);
        let part = &part_updates(&r)[0];
        // What DynamoDB stores after the ADDs on an empty row.
        let mut item: Item = part
            .names
            .iter()
            .map(|(k, name)| {
                let placeholder = k.replacen('#', ":", 1);
                let value = part.values.iter().find(|(v, _)| *v == placeholder).map(|(_, v)| v.clone()).unwrap();
                (name.clone(), value)
            })
            .collect();
        item.insert("pk".into(), s("ROLLUP#USER#a"));
        let costs = row_costs("rollups", &item).unwrap();
        assert_eq!(costs.workflow, r.workflow);
        assert_eq!(costs.totals, r.run);
        assert_eq!(costs.steps.len(), 2);
        assert_eq!(costs.steps[&r.steps[1].step_id], r.steps[1].sums);
    }

    fn tx_error(code: &str, message: &str) -> SdkError<aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError, HttpResponse> {
        use aws_sdk_dynamodb::error::ErrorMetadata;
        use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
        let meta = ErrorMetadata::builder().code(code).message(message).build();
        let response = HttpResponse::new(400u16.try_into().unwrap(), aws_smithy_types::body::SdkBody::empty());
        SdkError::service_error(TransactWriteItemsError::generic(meta), response)
    }

    #[test]
    fn a_colliding_transaction_is_retried_and_a_present_marker_means_already_recorded() {
        let conflict = tx_error("TransactionCanceledException", "Transaction cancelled [None, TransactionConflict, None]");
        assert!(is_conflict(&conflict) && !is_condition_failure(&conflict));
        assert!(is_conflict(&tx_error("TransactionConflictException", "busy")));
        let recorded = tx_error("TransactionCanceledException", "Transaction cancelled [ConditionalCheckFailed, None]");
        assert!(is_condition_failure(&recorded) && !is_conflict(&recorded));
        let invalid = tx_error("ValidationException", "bad expression");
        assert!(!is_conflict(&invalid) && !is_condition_failure(&invalid));
        assert!(matches!(analytics_err("rollups")(invalid), AnalyticsError::Rejected(_)), "a malformed request is rejected, not retried");
    }

    #[test]
    fn rows_expire_a_retention_period_after_their_day() {
        let day = NaiveDate::from_ymd_opt(2025, 1, 1).unwrap();
        let midnight = day.and_time(chrono::NaiveTime::MIN).and_utc().timestamp();
        assert_eq!(expires_at(day) - midnight, i64::from(ROLLUP_RETENTION_DAYS) * 86_400);
    }
}
