//! How a run ends: its end stored, then announced; steps that will not run cancelled,
//! each with its event. Also used without a model client, by whatever must end a run that
//! cannot go on (the runner for lost runners and store errors, the dead-letter consumer).

use super::daily::{Reached, resolve_holds};
use super::journal::Journal;
use super::step::Leftover;
use super::{EngineError, Outcome};
use crate::budget::BudgetLimits;
use crate::graph::Limits;
use crate::ids::StepId;
use crate::limits::EVENT_OUTPUT_BYTES;
use crate::output::json_len;
use crate::ports::{DailySpend, Lease, ProgressSink, RunStore};
use crate::pricing::ModelRegistry;
use crate::run::{Carried, ErrorInfo, RunRecord, RunStatus, StepRecord, StepStatus, Totals};
use crate::wire::events::{EventBody, RunCancelled, RunCompleted, RunFailed, StepCancelled};
use crate::wire::{DocumentRef, TotalsView};
use chrono::Utc;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use tracing::{Instrument, debug, info, info_span, warn};

/// Records the run's end (`status`, `output`, `error`, totals from the journal's ledger)
/// and then announces it: the store is the source of truth.
pub(super) async fn finish(
    store: &dyn RunStore,
    run: &mut RunRecord,
    lease: &Lease,
    journal: &Journal,
    status: RunStatus,
    output: Option<Value>,
    error: Option<ErrorInfo>,
) -> Result<Outcome, EngineError> {
    run.status = status;
    run.finished_at = Some(Utc::now());
    run.totals = journal.totals().await;
    let open = journal.open_reservations();
    if open > 0 {
        // Only a step task that panicked mid-call leaves one; the spend it held is unknown.
        warn!(open, "budget reservations still held at the end of the run");
    }
    run.output = output;
    run.error = error;
    store.finish_run(run, lease).await?;
    journal
        .emit_with(end_event(run), None, None, None, |s| {
            s.status = status;
            s.current_step = None;
        })
        .await?;
    info!(status = ?status, cost_pico = run.totals.cost.pico(), tokens = run.totals.total_tokens(), "run finished");
    Ok(Outcome::Finished(status))
}

/// The event announcing a finished run's end.
fn end_event(run: &RunRecord) -> EventBody {
    let totals = TotalsView::from(&run.totals);
    match run.status {
        RunStatus::Completed => {
            // A large output stays out of the event (one DynamoDB item, polled often).
            let (output, output_ref) = match &run.output {
                Some(output) if json_len(output) > EVENT_OUTPUT_BYTES => (None, Some(DocumentRef::run_output(&run.id, json_len(output)))),
                output => (output.clone(), None),
            };
            EventBody::RunCompleted(RunCompleted { output, output_ref, totals })
        }
        RunStatus::Cancelled => {
            let (by, reason) = run.control.as_ref().map(|c| (Some(c.by.clone()), c.reason.clone())).unwrap_or_default();
            EventBody::RunCancelled(RunCancelled { by, reason, totals })
        }
        _ => EventBody::RunFailed(RunFailed { error: run.error.clone(), totals }),
    }
}

/// Checkpoints a step that will not run as `CANCELLED`, with the event that says why. What
/// dead runners spent on it (`carried`) stays on its record, so the run's totals keep it.
pub(super) async fn cancel(journal: &Journal, id: StepId, reason: &str, carried: Option<Carried>) -> Result<StepRecord, EngineError> {
    let mut record = StepRecord::settled(id, StepStatus::Cancelled, None, Utc::now());
    if let Some(c) = carried {
        (record.usage, record.cost, record.calls, record.lost) = (c.usage, c.cost, c.calls, c.lost);
    }
    let body = EventBody::StepCancelled(StepCancelled { reason: reason.to_owned() });
    journal.emit_with(body, Some(&record.step_id), None, Some(&record), |_| {}).await?;
    debug!(step_id = %record.step_id, reason, "step cancelled");
    Ok(record)
}

/// What ending a run needs: the store and the event log, (for records stored before the
/// step order was kept) the registry to read the step order from the definition, and
/// (where daily caps apply) the counters whose holds the run's dead runners left.
pub struct Ender {
    pub store: Arc<dyn RunStore>,
    pub sink: Arc<dyn ProgressSink>,
    pub models: Arc<ModelRegistry>,
    pub limits: Limits,
    pub daily: Option<Arc<dyn DailySpend>>,
    /// Tenant limits: the concurrency slot a run ended here gives back.
    pub tenancy: Option<super::throttle::Tenancy>,
    /// Told of the runs ended here (see [`crate::telemetry`]).
    pub observer: Option<Arc<dyn crate::telemetry::Observer>>,
    /// Batch jobs of maps, stopped when their run ends without them.
    pub batch: Option<Arc<dyn crate::ports::BatchJobs>>,
}

impl Ender {
    /// Gives back the concurrency slot of `run`, which has ended (see [`super::Tenancy`]).
    pub async fn release_slot(&self, run: &RunRecord) {
        if let Some(tenancy) = &self.tenancy {
            tenancy.release_slot(run).await;
        }
    }

    /// Writes a finished run's end event if its log lacks it: the run's end is stored
    /// before it is announced, so a runner that died (or whose write's reply was lost)
    /// between the two leaves the announcement to the next delivery. Returns whether it
    /// was missing.
    pub async fn announce_end(&self, run: &RunRecord) -> Result<bool, EngineError> {
        let last = self.sink.last_event(&run.id).await?;
        let ended = last.as_ref().is_some_and(|e| e.kind.ends_run());
        if !run.status.is_terminal() || ended {
            return Ok(false);
        }
        // Announcing writes no checkpoint, so no lease is checked: the run has ended.
        let lease = Lease { holder: "announce-end".into(), expires_at: Utc::now() };
        let last_seq = last.map_or(0, |e| e.seq);
        let journal = Journal::new(self.sink.clone(), self.store.clone(), lease, run, last_seq, run.totals, BudgetLimits::UNLIMITED)
            .observed(self.observer.clone());
        let status = run.status;
        journal
            .emit_with(end_event(run), None, None, None, |s| {
                s.status = status;
                s.current_step = None;
            })
            .await?;
        warn!(run_id = %run.id, status = ?status, "the run's end was stored but not announced; announced it now");
        Ok(true)
    }

    /// Ends a run claimed under `lease` `RUN_FAILED` with `error`, without running
    /// anything: its unsettled steps are cancelled and its totals are what its checkpoints
    /// spent. For a run that cannot go on (its runners keep dying, its data cannot be
    /// stored, Lambda gave up delivering it).
    pub async fn fail_run(&self, run: RunRecord, lease: &Lease, error: ErrorInfo) -> Result<Outcome, EngineError> {
        let reason = format!("the run failed: {}", error.code);
        self.end_unrun(run, lease, RunStatus::Failed, Some(error), &reason).await
    }

    /// Ends a run claimed under `lease` `RUN_CANCELLED`, as its control request asked: its
    /// unsettled steps (those a runner was running included) are cancelled, keeping what
    /// their checkpoints say they spent, the call in flight at its worst case.
    pub async fn cancel_run(&self, run: RunRecord, lease: &Lease) -> Result<Outcome, EngineError> {
        let reason = match &run.control {
            Some(c) => format!("the run was cancelled by {}", c.by),
            None => "the run was cancelled".to_owned(),
        };
        info!(run_id = %run.id, "cancelling the run");
        self.end_unrun(run, lease, RunStatus::Cancelled, None, &reason).await
    }

    /// Asks the service to stop the batch job `step` has out, if any: nobody will read its
    /// answers, and records it has not processed yet are then not billed. What it already
    /// processed stays counted at the job's worst case. A failure only leaves the job to
    /// finish or expire.
    async fn stop_job(&self, step: &StepRecord) {
        let wait = crate::run::BatchWait::of(step.detail.as_ref()).filter(|w| !w.read && step.status == StepStatus::Waiting);
        let (Some(jobs), Some(job)) = (&self.batch, wait.and_then(|w| w.job)) else { return };
        match jobs.stop(&job).await {
            Ok(()) => info!(step_id = %step.step_id, %job, "stopped the batch job of a run that ends without it"),
            Err(e) => warn!(step_id = %step.step_id, %job, error = %e, "could not stop the batch job of a run that ends without it"),
        }
    }

    /// Ends a run with `status` without running anything more: unsettled steps are
    /// cancelled with `reason`, and the totals are what the checkpoints spent.
    async fn end_unrun(
        &self,
        mut run: RunRecord,
        lease: &Lease,
        status: RunStatus,
        error: Option<ErrorInfo>,
        reason: &str,
    ) -> Result<Outcome, EngineError> {
        let span = info_span!("run", run_id = %run.id, workflow = %run.workflow, revision = run.revision);
        async move {
            // The checkpoints of the revision it runs (each revision keeps its own).
            let saved = run.records_at(self.store.get_steps(&run.id).await?, run.revision);
            let mut reached = Reached::default();
            saved.iter().for_each(|r| reached.step(r));
            let (settled, unsettled): (Vec<StepRecord>, Vec<StepRecord>) = saved.into_iter().partition(|r| r.status.is_settled());
            // What dead runners spent on unsettled steps, a map's items included (this path
            // has no graph to say which steps are maps: each unsettled step is asked).
            let mut carried: HashMap<StepId, Carried> = HashMap::new();
            for r in &unsettled {
                self.stop_job(r).await;
                let items = self.store.get_items(&run.id, &r.step_id, r.revision).await?;
                items.iter().for_each(|item| reached.item(&r.step_id, item));
                // A batch job out counts at its worst case here, as a lost call (in `in_flight`).
                let left = Leftover { carried: Carried::of(r).unwrap_or_default(), items, waiting: None, batch: None };
                carried.insert(r.step_id.clone(), left.total());
            }
            // The run's calls end here: the holds its dead runners left on the caller's day
            // are settled now, not when the day ends.
            if let Some(spend) = &self.daily {
                // Batch jobs' holds too: nobody will read their answers now.
                reached.ending();
                resolve_holds(spend.as_ref(), &run.id, &reached).await?;
            }
            // What earlier revisions spent, and this one's own checkpoints (the results it
            // kept from earlier revisions are in the first).
            let mut spent = run.spent_before(run.revision);
            spent.add(&Totals::of_checkpoints(settled.iter().filter(|r| r.revision == run.revision)));
            carried.values().for_each(|c| spent.add_carried(c));
            let last_seq = self.sink.last_seq(&run.id).await?;
            let journal = Journal::new(self.sink.clone(), self.store.clone(), lease.clone(), &run, last_seq, spent, BudgetLimits::UNLIMITED)
                .observed(self.observer.clone());
            let done: Vec<&str> = settled.iter().map(|r| r.step_id.as_str()).collect();
            // Records stored before the step order was kept name their steps only in the definition.
            let order = match run.step_order.is_empty() {
                true => crate::graph::validate_json_with(&run.definition, &self.models, self.limits).map(|g| g.step_order()).unwrap_or_default(),
                false => run.step_order.clone(),
            };
            for id in order.into_iter().filter(|id| !done.contains(&id.as_str())) {
                let carried = carried.get(&id).copied();
                cancel(&journal, id, reason, carried).await?;
            }
            finish(self.store.as_ref(), &mut run, lease, &journal, status, None, error).await
        }
        .instrument(span)
        .await
    }
}
