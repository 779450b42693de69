//! A map step: its sub-step fanned out over a list, `max_concurrency` items at a time;
//! results keep the list's order.
//!
//! Each item that calls a model is checkpointed on its own: before each of its calls (the
//! reservation, see [`super::running`]) and when it settles. A map resumed after its
//! runner died reuses every settled item and runs only the others, so a crash mid-map
//! pays again for at most the items whose calls were in flight.

use super::EngineError;
use super::batch::{BatchLeft, Batched};
use super::running::{Hold, Running, item_record};
use super::step::{Inputs, Scope, StepContext, Work, short};
use super::transform;
use crate::codes::ErrorCode;
use crate::graph::{ItemStep, MapSpec};
use crate::ids::StepId;
use crate::limits::MAX_MAP_ITEMS;
use crate::run::{ErrorInfo, ItemRecord};
use crate::wire::events::{EventBody, MapProgress};
use crate::wire::{ItemFailed, MapDetail, StepDetail};
use crate::workflow::ItemFailure;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{Instrument, info, info_span};

/// How running a map ended this time.
// `Done` is nearly every map's end (as with `Ran::Settled`): boxing it costs an allocation
// per map to save stack space in the rarer other cases.
#[allow(clippy::large_enum_variant)]
pub enum MapEnd {
    Done(Work),
    /// The deadline came (or a pause) with items not started: the map continues in the next
    /// invocation from its item checkpoints.
    Interrupted,
    /// Its batch job is out: the run waits, and is handed back to a runner at this time to
    /// ask about it.
    Waiting(DateTime<Utc>),
}

impl StepContext {
    /// `checkpointed`: the items an earlier runner checkpointed (settled ones are reused);
    /// `batch`: the map's batch job, if an earlier runner submitted one.
    pub async fn run_map(
        &self,
        id: &StepId,
        spec: &MapSpec,
        inputs: &Inputs,
        checkpointed: Vec<ItemRecord>,
        batch: Option<BatchLeft>,
        running: &mut Running,
    ) -> Result<MapEnd, EngineError> {
        // A map asking about its batch job has started already; it says so again once the
        // job's answers are read.
        if batch.as_ref().is_none_or(|b| b.wait.read) {
            running.announce(&self.journal, None).await?;
        }
        let items = match spec.over.evaluate(&inputs.to_json()) {
            Ok(Value::Array(items)) => items,
            Ok(other) => return Ok(MapEnd::Done(Work::failed(ErrorCode::MapOver, format!("`over` must give a list, got {}", short(&other))))),
            Err(e) => return Ok(MapEnd::Done(Work::failed(ErrorCode::MapOver, format!("`over`: {e}")))),
        };
        if items.len() > MAX_MAP_ITEMS {
            return Ok(MapEnd::Done(Work::failed(ErrorCode::MapTooLarge, format!("{} items; a map takes at most {MAX_MAP_ITEMS}", items.len()))));
        }
        let total = items.len();
        let mut checkpointed: HashMap<usize, ItemRecord> = checkpointed.into_iter().filter(|r| r.index < total).map(|r| (r.index, r)).collect();
        let job = match self.batch_items(id, spec, &items, inputs, &mut checkpointed, batch, running).await? {
            Batched::Waiting(until) => return Ok(MapEnd::Waiting(until)),
            Batched::Read(job) => Some(job),
            Batched::Online => None,
        };
        let reused = checkpointed.values().filter(|r| r.status.is_settled()).count();
        if !checkpointed.is_empty() {
            info!(step_id = %id, reused, in_flight = checkpointed.len() - reused, "resuming a map from its item checkpoints");
        }
        let reused_failed = checkpointed.values().filter(|r| r.status.is_settled() && r.error.is_some()).count();
        let tally = Tally::new(reused, reused_failed, total);
        self.journal.emit(EventBody::MapProgress(tally.now()), Some(id), None).await?;
        let tally = &tally;
        let results: Vec<(usize, Option<Work>)> =
            futures::stream::iter(items.into_iter().enumerate().map(|(index, item)| (index, item, checkpointed.remove(&index))))
                .map(|(index, item, saved)| {
                    // Each item's lines carry its index, and its own attempt (see `llm`).
                    let span = info_span!("item", item = index, attempt = tracing::field::Empty);
                    async move {
                        if let Some(saved) = saved.as_ref().filter(|r| r.status.is_settled()) {
                            return Ok((index, Some(reuse(saved))));
                        }
                        if self.stopping() {
                            // Not started: the next invocation runs it.
                            return Ok((index, None));
                        }
                        let scope = inputs.with_item(&item, index);
                        let work = match &spec.step {
                            ItemStep::Llm(llm) => {
                                let carried = saved.map(|r| r.carried()).unwrap_or_default();
                                let mut work = self.run_llm(id, llm, &scope, Some(index), Hold::Item { step: id, index, carried }).await?;
                                let mut record = item_record(index, &work, &carried);
                                if self.interrupted(&work) {
                                    // Unsettled, with what it was charged: it runs again once the
                                    // budget is raised.
                                    (record.status, record.error) = (crate::run::StepStatus::Running, None);
                                    self.journal.save_item(id, &record).await?;
                                    return Ok((index, None));
                                }
                                self.journal.save_item(id, &record).await?;
                                work.add_carried(&carried);
                                work
                            }
                            ItemStep::Transform(t) => transform::run(t, &scope),
                        };
                        if let Some(progress) = tally.settled(work.output.is_err(), self.config.stream_flush_interval) {
                            self.journal.emit(EventBody::MapProgress(progress), Some(id), None).await?;
                        }
                        Ok((index, Some(work)))
                    }
                    .instrument(span)
                })
                .buffer_unordered(spec.max_concurrency as usize)
                .collect::<Vec<Result<(usize, Option<Work>), EngineError>>>()
                .await
                .into_iter()
                .collect::<Result<_, _>>()?;
        let left = results.iter().filter(|(_, work)| work.is_none()).count();
        if left > 0 {
            info!(step_id = %id, left, of = total, "deadline near: the map continues in the next invocation");
            return Ok(MapEnd::Interrupted);
        }
        let mut ordered: Vec<Option<Work>> = (0..total).map(|_| None).collect();
        for (index, work) in results {
            ordered[index] = work;
        }
        let mut map = Work::done(String::new(), Value::Null);
        map.attempts = 0;
        let mut outputs = Vec::with_capacity(total);
        let mut failed = Vec::new();
        let mut cached = 0;
        for (index, work) in ordered.into_iter().enumerate() {
            let Some(work) = work else { continue };
            map.add_spend(work.usage, work.cost, work.calls);
            map.lost.add(work.lost);
            map.attempts = map.attempts.max(work.attempts);
            cached += usize::from(matches!(work.detail, Some(StepDetail::Cached(_))));
            match work.output {
                Ok((_, value)) => outputs.push(value),
                Err(error) => {
                    outputs.push(Value::Null);
                    // A budget refusal's numbers travel with the item.
                    let detail = match work.detail {
                        Some(StepDetail::Refused(refused)) => Some(refused),
                        _ => None,
                    };
                    failed.push(ItemFailed { index, error, detail });
                }
            }
        }
        let first = failed.first().map(|f| (f.index, f.error.clone()));
        let count = failed.len();
        map.detail = Some(StepDetail::Map(MapDetail { items: total, failed, cached, batch: job }));
        if let Some((index, error)) = first
            && spec.on_item_failure == ItemFailure::Fail
        {
            map.output = Err(ErrorInfo::terminal(error.code, format!("{count} of {total} items failed; item {index}: {}", error.message)));
            return Ok(MapEnd::Done(map));
        }
        let value = Value::Array(outputs);
        map.output = Ok((value.to_string(), value));
        Ok(MapEnd::Done(map))
    }
}

/// Items settled so far, and when the last `MAP_PROGRESS` told them.
struct Tally {
    counts: Mutex<(MapProgress, Instant)>,
}

impl Tally {
    fn new(done: usize, failed: usize, total: usize) -> Self {
        Self { counts: Mutex::new((MapProgress { done, failed, total }, Instant::now())) }
    }

    fn now(&self) -> MapProgress {
        let counts = self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        counts.0
    }

    /// Counts one more settled item; the progress to send when `every` has passed since the
    /// last was sent (so a large map sends about one event a second, not one per item).
    fn settled(&self, failed: bool, every: Duration) -> Option<MapProgress> {
        let mut counts = self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (progress, sent) = &mut *counts;
        progress.done += 1;
        progress.failed += usize::from(failed);
        if progress.done == progress.total || sent.elapsed() < every {
            // The last item's settling is the step's own STEP_COMPLETED / STEP_FAILED.
            return None;
        }
        *sent = Instant::now();
        Some(*progress)
    }
}

/// A settled item's work, from its checkpoint: nothing runs, and its charges are already
/// in the run's ledger (counted when the run resumed).
fn reuse(saved: &ItemRecord) -> Work {
    let output = match (&saved.output, &saved.error) {
        (Some(value), _) => Ok((saved.text.clone().unwrap_or_default(), value.clone())),
        (None, Some(error)) => Err(error.clone()),
        (None, None) => Err(ErrorInfo::terminal(ErrorCode::Internal, "an item checkpoint has neither an output nor an error")),
    };
    let mut work = Work { output, attempts: saved.attempts, ..Work::done(String::new(), Value::Null) };
    work.add_spend(saved.usage, saved.cost, saved.calls);
    work.lost = saved.lost;
    work
}
