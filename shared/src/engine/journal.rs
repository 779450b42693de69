//! The journal: the one writer of a run's progress events.
//!
//! It holds the run's `seq` counter under a lock across each write, which is what makes
//! `seq` gap-free and strictly increasing even with steps in parallel; each event is
//! appended together with the owners' progress rows (see [`ProgressSink::publish`]).
//!
//! It also holds the run's budget [`Ledger`], the one record of what the run's model calls
//! were charged: totals in events, progress rows and the run record are read from it, so
//! they are computed in one place. Every model call reserves its worst case here first and
//! is not made if that does not fit (see [`crate::budget`]).
//!
//! Every event passes here, so this is where the run's [`Observer`] hears of it: once an
//! event is published, what it announces (a step settled, the run ended, a takeover) is
//! reported with the step's checkpoint or the run's totals, so a metric never counts what
//! the run's log does not hold.

use crate::budget::{self, BudgetExceeded, BudgetLimits, Ledger, Reservation};
use crate::ids::{Principal, RunId, StepId, WorkflowName};
use crate::money::Usd;
use crate::ports::{Checkpoint, JournalError, Lease, ProgressSink, RunStore};
use crate::pricing::Usage;
use crate::run::{Event, EventType, ItemRecord, ProgressRow, RunRecord, RunStatus, StepRecord, Totals};
use crate::telemetry::{Observer, RunFacts, Seen};
use crate::wire::events::EventBody;
use chrono::Utc;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tracing::{debug, warn};

/// How often a retryable progress write is tried before the run stops on it.
const PUBLISH_TRIES: u32 = 4;

pub struct Journal {
    sink: Arc<dyn ProgressSink>,
    /// Where step checkpoints go, under `lease`; each is written with the event announcing it.
    store: Arc<dyn RunStore>,
    lease: Lease,
    run_id: RunId,
    /// The run's revision: every event and checkpoint written here belongs to it.
    revision: u32,
    workflow: WorkflowName,
    state: Mutex<JournalState>,
    /// A plain mutex: it is only ever held for a few integer operations, never across an
    /// await. `emit` takes it while holding `state`; nothing takes them the other way round.
    ledger: std::sync::Mutex<Ledger>,
    /// Told what the published events announce (see [`Journal::observed`]).
    observer: Option<Arc<dyn Observer>>,
    /// The run as observations describe it.
    facts: RunFacts,
}

/// What the owners' progress rows show besides totals.
pub struct JournalState {
    last_seq: u64,
    /// Whose rows each event updates; changed between events (see [`Journal::retarget`]).
    owners: Vec<Principal>,
    pub status: RunStatus,
    pub current_step: Option<StepId>,
    /// Sum of step latencies; everything else in the run's totals is the ledger's.
    pub step_latency_ms: u64,
    /// What the run waits for, once it waits.
    pub waiting: Option<crate::run::Waiting>,
}

impl Journal {
    /// A journal continuing after `last_seq`, its ledger starting from what the run has
    /// already spent (its checkpoints, and what dead runners carried: so a resumed run's
    /// budget counts it).
    pub fn new(
        sink: Arc<dyn ProgressSink>,
        store: Arc<dyn RunStore>,
        lease: Lease,
        run: &RunRecord,
        last_seq: u64,
        spent: Totals,
        budget: BudgetLimits,
    ) -> Self {
        Self {
            sink,
            store,
            lease,
            run_id: run.id.clone(),
            revision: run.revision,
            workflow: run.workflow.clone(),
            state: Mutex::new(JournalState {
                last_seq,
                owners: run.owners.clone(),
                status: RunStatus::Running,
                current_step: None,
                step_latency_ms: spent.step_latency_ms,
                waiting: None,
            }),
            ledger: std::sync::Mutex::new(Ledger::new(budget, spent)),
            observer: None,
            facts: RunFacts::of(run),
        }
    }

    /// The same journal, telling `observer` what its events announce, and what the engine
    /// reports through [`Journal::observe`].
    pub fn observed(mut self, observer: Option<Arc<dyn Observer>>) -> Self {
        self.observer = observer;
        self
    }

    /// Reports `seen` about this journal's run, now.
    pub fn observe(&self, seen: Seen<'_>) {
        self.observe_at(seen, Utc::now());
    }

    fn observe_at(&self, seen: Seen<'_>, at: chrono::DateTime<Utc>) {
        if let Some(observer) = &self.observer {
            observer.observe(&self.facts, &seen, at);
        }
    }

    /// The run's revision this journal writes.
    pub fn revision(&self) -> u32 {
        self.revision
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        // Ledger methods do not panic, so a poisoned lock still holds consistent sums.
        self.ledger.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn totals_with(&self, state: &JournalState) -> Totals {
        Totals { step_latency_ms: state.step_latency_ms, ..*self.ledger().spent() }
    }

    pub async fn totals(&self) -> Totals {
        let state = self.state.lock().await;
        self.totals_with(&state)
    }

    pub fn reserve(&self, want: budget::Amount) -> Result<Reservation, BudgetExceeded> {
        self.ledger().reserve(want)
    }

    /// Charges a call's reported usage against the budget and the run's totals.
    pub fn settle(&self, reservation: Reservation, usage: &Usage, cost: Usd) {
        let held = reservation.amount();
        let charged = budget::Amount::charged(usage, cost);
        if !charged.within(held) {
            // The estimate's bound was broken (or the model ignored max_tokens): the
            // usage is charged all the same, and the next reservation sees it.
            warn!(reserved = %held, charged = %charged, "budget overrun: a model call used more than its reservation");
        }
        self.ledger().settle(reservation, usage, cost);
    }

    /// Re-holds a batch job's reservation (see [`budget::Ledger::hold_again`]).
    pub fn hold_again(&self, amount: budget::Amount) -> Reservation {
        self.ledger().hold_again(amount)
    }

    /// Charges a batch job's answered records, `calls` of them, and frees its reservation.
    pub fn settle_calls(&self, reservation: Reservation, usage: &Usage, cost: Usd, calls: u64) {
        let held = reservation.amount();
        if !budget::Amount::charged(usage, cost).within(held) {
            warn!(reserved = %held, charged = %budget::Amount::charged(usage, cost), "budget overrun: a batch job used more than its reservation");
        }
        self.ledger().settle_calls(reservation, usage, cost, calls);
    }

    pub fn release(&self, reservation: Reservation) {
        self.ledger().release(reservation);
    }

    pub fn open_reservations(&self) -> usize {
        self.ledger().open_reservations()
    }

    /// Writes a checkpoint without an event (a model step's `RUNNING` checkpoint before a
    /// retry: see [`super::running`]), under the lease.
    pub async fn checkpoint(&self, record: &StepRecord) -> Result<(), JournalError> {
        let record = &*self.stamped(record);
        retrying("checkpoint", || async { Ok(self.store.save_step(&self.run_id, &self.lease, record).await?) }).await
    }

    /// Writes a map item's checkpoint, under the lease.
    pub async fn save_item(&self, step: &StepId, item: &ItemRecord) -> Result<(), JournalError> {
        retrying("item checkpoint", || async { Ok(self.store.save_item(&self.run_id, &self.lease, step, self.revision, item).await?) }).await
    }

    /// `record` as a checkpoint of this journal's revision.
    fn stamped<'r>(&self, record: &'r StepRecord) -> Cow<'r, StepRecord> {
        match record.revision == self.revision {
            true => Cow::Borrowed(record),
            false => Cow::Owned(StepRecord { revision: self.revision, ..record.clone() }),
        }
    }

    /// Sends the events after this one to `owners`: records them on the run (under the
    /// lease) and removes the run's rows from the feeds no longer among them. Done under the
    /// journal's lock, between two events, so no event in flight writes a removed row back.
    /// Returns those removed.
    pub async fn retarget(&self, owners: Vec<Principal>) -> Result<Vec<Principal>, JournalError> {
        let mut state = self.state.lock().await;
        if state.owners == owners {
            return Ok(Vec::new());
        }
        let gone: Vec<Principal> = state.owners.iter().filter(|o| !owners.contains(o)).cloned().collect();
        self.store.set_owners(&self.run_id, &self.lease, &owners).await?;
        if !gone.is_empty() {
            self.sink.forget(&self.run_id, &gone).await?;
        }
        state.owners = owners;
        Ok(gone)
    }

    /// Appends an event without changing what the rows show.
    pub async fn emit(&self, body: EventBody, step: Option<&StepId>, attempt: Option<u32>) -> Result<(), JournalError> {
        self.emit_with(body, step, attempt, None, |_| {}).await
    }

    /// Appends one event (next seq) and updates every owner's row after `change`; with a
    /// `checkpoint`, the step's record is written in the same request (see
    /// [`ProgressSink::publish_checkpointed`]), so a result and its announcement never part.
    /// The lock is held across the write so events land in seq order.
    pub async fn emit_with(
        &self,
        body: EventBody,
        step: Option<&StepId>,
        attempt: Option<u32>,
        checkpoint: Option<&StepRecord>,
        change: impl FnOnce(&mut JournalState),
    ) -> Result<(), JournalError> {
        let mut state = self.state.lock().await;
        change(&mut state);
        let seq = state.last_seq + 1;
        let now = Utc::now();
        let kind = body.kind();
        let took_over = matches!(&body, EventBody::RunResumed(resumed) if resumed.takeover.is_some());
        let checkpoint = checkpoint.map(|r| self.stamped(r));
        let event =
            Event { run_id: self.run_id.clone(), seq, at: now, kind, step_id: step.cloned(), attempt, revision: self.revision, data: body.data() };
        let row = ProgressRow {
            run_id: self.run_id.clone(),
            workflow: self.workflow.clone(),
            status: state.status,
            current_step: state.current_step.clone(),
            totals: self.totals_with(&state),
            last_seq: seq,
            updated_at: now,
            waiting: state.waiting.clone(),
        };
        retrying("progress", || async {
            match checkpoint.as_deref() {
                Some(step) => {
                    let checkpoint = Checkpoint { store: self.store.as_ref(), lease: &self.lease, step };
                    self.sink.publish_checkpointed(&event, &row, &state.owners, checkpoint).await
                }
                None => Ok(self.sink.publish(&event, &row, &state.owners).await?),
            }
        })
        .await?;
        state.last_seq = seq;
        debug!(seq, event = ?kind, step_id = step.map(StepId::as_str), "event published");
        let seen = match (kind, checkpoint.as_deref()) {
            (EventType::StepCompleted | EventType::StepFailed, Some(step)) => Some(Seen::StepSettled(step)),
            (kind, _) if kind.ends_run() => Some(Seen::RunEnded { status: state.status, totals: &row.totals }),
            (EventType::RunResumed, _) if took_over => Some(Seen::TakenOver),
            _ => None,
        };
        if let Some(seen) = seen {
            // At the event's time: a run's latency ends when its end event says it ended.
            self.observe_at(seen, now);
        }
        Ok(())
    }
}

/// Runs `write` until it succeeds, fails terminally, or has failed retryably
/// [`PUBLISH_TRIES`] times, backing off between tries.
async fn retrying<F, Fut>(what: &str, mut write: F) -> Result<(), JournalError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), JournalError>>,
{
    let mut tries = 1;
    loop {
        match write().await {
            Ok(()) => return Ok(()),
            Err(e) if e.retryable() && tries < PUBLISH_TRIES => {
                warn!(error = %e, what, "write failed; retrying");
                tokio::time::sleep(Duration::from_millis(100 << tries)).await;
                tries += 1;
            }
            Err(e) => return Err(e),
        }
    }
}
