//! In-memory implementations of every port, for hermetic tests and local reasoning.
//!
//! They honour the same contracts as the AWS adapters — conditional creates, leases that
//! expire, gap-free event logs, per-owner progress rows — so an engine test against them
//! means something. [`ScriptedModel`] plays a model: replies, usage, latency and failures
//! are scripted per prompt substring, and every call is recorded.

use crate::analytics::{DayCosts, RunRollup, WorkflowCosts, merge_by_day, merge_by_workflow};
use crate::ids::{Principal, RunId, StepId};
use crate::money::Usd;
use crate::ports::*;
use crate::pricing::{ServiceTier, Usage};
use crate::responses::CachedReply;
use crate::revision::Revision;
use crate::run::{
    ControlKind, ControlRequest, Event, ItemRecord, ProgressRow, Resumption, ReviewDecision, RunRecord, RunStatus, RunnerEvent, StepRecord, Takeover,
    Waiting,
};
use crate::spend::{DayHold, DaySpend, Settlement};
use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::mpsc;

pub use crate::quota::memory::MemoryQuota;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock means a test already panicked; keep going to report that panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Everything an adapter holds as one text, entries sorted: equal before and after a
/// request exactly when it wrote nothing (what the API's fuzz test checks).
fn canonical(entries: impl IntoIterator<Item = String>) -> String {
    let mut entries: Vec<String> = entries.into_iter().collect();
    entries.sort();
    entries.join("\n")
}

// ---------------------------------------------------------------- store

pub struct MemoryStore {
    runs: Mutex<HashMap<RunId, Slot>>,
    /// Checkpoints by step and revision: no revision overwrites another's.
    steps: Mutex<HashMap<RunId, BTreeMap<Revised, StepRecord>>>,
    items: Mutex<HashMap<(RunId, Revised), BTreeMap<usize, ItemRecord>>>,
    queued_grace: chrono::Duration,
}

/// A step in one revision of its run.
type Revised = (StepId, u32);

/// A run as the store holds it: the record, the lease on it, and when it is due for the
/// sweeper (the DynamoDB store's sparse index entry; `None` once the run ended).
struct Slot {
    run: RunRecord,
    lease: Option<Lease>,
    due_at: Option<DateTime<Utc>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_queued_grace(crate::durability::Durability::default().queued_grace)
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many runs it holds (tests check a refused request stored none).
    pub fn run_count(&self) -> usize {
        lock(&self.runs).len()
    }

    /// A store whose queued (or released) runs become due for the sweeper after `grace`.
    pub fn with_queued_grace(grace: std::time::Duration) -> Self {
        Self {
            runs: Mutex::default(),
            steps: Mutex::default(),
            items: Mutex::default(),
            queued_grace: chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX),
        }
    }

    /// Every run, checkpoint and item record held (see [`canonical`]).
    pub fn snapshot(&self) -> String {
        let runs =
            lock(&self.runs).iter().map(|(id, slot)| format!("run {id} {:?} {:?} {:?}", slot.run, slot.lease, slot.due_at)).collect::<Vec<_>>();
        let steps = lock(&self.steps).iter().map(|(id, steps)| format!("steps {id} {steps:?}")).collect::<Vec<_>>();
        let items = lock(&self.items).iter().map(|(key, items)| format!("items {key:?} {items:?}")).collect::<Vec<_>>();
        canonical(runs.into_iter().chain(steps).chain(items))
    }

    fn check_lease(&self, id: &RunId, lease: &Lease) -> Result<(), StoreError> {
        match lock(&self.runs).get(id) {
            Some(Slot { lease: Some(held), .. }) if held.holder == lease.holder => Ok(()),
            _ => Err(StoreError::LeaseLost(id.clone())),
        }
    }
}

#[async_trait]
impl RunStore for MemoryStore {
    async fn create_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        let mut runs = lock(&self.runs);
        if let Some(stored) = runs.get(&run.id) {
            // As the DynamoDB store: the same run again is a retry whose reply was lost.
            return if stored.run.is_same_run(run) { Ok(()) } else { Err(StoreError::AlreadyExists(run.id.clone())) };
        }
        let due_at = Some(run.created_at + self.queued_grace);
        runs.insert(run.id.clone(), Slot { run: run.clone(), lease: None, due_at });
        Ok(())
    }

    async fn get_run(&self, id: &RunId) -> Result<Option<RunRecord>, StoreError> {
        Ok(lock(&self.runs).get(id).map(|slot| slot.run.clone()))
    }

    async fn get_steps(&self, id: &RunId) -> Result<Vec<StepRecord>, StoreError> {
        Ok(lock(&self.steps).get(id).map(|m| m.values().cloned().collect()).unwrap_or_default())
    }

    async fn claim(&self, id: &RunId, lease: &Lease, now: DateTime<Utc>) -> Result<Claim, StoreError> {
        let mut runs = lock(&self.runs);
        let Some(slot) = runs.get_mut(id) else { return Ok(Claim::NotFound) };
        if slot.run.status.is_terminal() {
            return Ok(Claim::Finished);
        }
        if slot.run.status == RunStatus::AwaitingInput {
            // Nothing to do until a person answers, or its deadline passes.
            match slot.run.waiting.as_ref().and_then(|w| w.deadline) {
                Some(deadline) if deadline.timestamp_millis() <= now.timestamp_millis() => slot.run.waiting = None,
                _ => return Ok(Claim::Waiting),
            }
        }
        // Compared to the millisecond, as DynamoDB stores the lease: a lease is live until
        // the instant it expires, not at it.
        // Our own lease: as the DynamoDB store, this is a retry of the same claim.
        if let Some(h) = slot.lease.as_ref().filter(|h| h.holder != lease.holder) {
            if h.expires_at.timestamp_millis() > now.timestamp_millis() {
                return Ok(Claim::HeldElsewhere);
            }
            let takeover = Takeover { from: h.holder.clone(), expired_at: h.expires_at, by: lease.holder.clone(), at: now };
            slot.run.takeovers.push(takeover);
        }
        slot.lease = Some(lease.clone());
        slot.due_at = Some(lease.expires_at);
        slot.run.status = RunStatus::Running;
        slot.run.started_at.get_or_insert(now);
        Ok(Claim::Acquired(Box::new(slot.run.clone())))
    }

    async fn set_owners(&self, id: &RunId, lease: &Lease, owners: &[Principal]) -> Result<(), StoreError> {
        self.check_lease(id, lease)?;
        let mut runs = lock(&self.runs);
        let Some(slot) = runs.get_mut(id) else { return Err(StoreError::LeaseLost(id.clone())) };
        slot.run.owners = owners.to_vec();
        Ok(())
    }

    async fn renew(&self, id: &RunId, lease: &Lease) -> Result<Option<ControlRequest>, StoreError> {
        self.check_lease(id, lease)?;
        let mut runs = lock(&self.runs);
        let Some(slot) = runs.get_mut(id) else { return Err(StoreError::LeaseLost(id.clone())) };
        slot.lease = Some(lease.clone());
        slot.due_at = Some(lease.expires_at);
        Ok(slot.run.control.clone())
    }

    async fn request_control(&self, id: &RunId, request: &ControlRequest) -> Result<ControlOutcome, StoreError> {
        let mut runs = lock(&self.runs);
        let Some(slot) = runs.get_mut(id) else { return Ok(ControlOutcome::NotFound) };
        let run = &mut slot.run;
        Ok(match &run.control {
            _ if run.status.is_terminal() => ControlOutcome::Finished(run.status),
            Some(stored) if stored == request => ControlOutcome::Recorded,
            // A cancel overrides a pause not yet acted on.
            Some(stored) if !(stored.kind == ControlKind::Pause && request.kind == ControlKind::Cancel) => {
                ControlOutcome::AlreadyRequested(stored.clone())
            }
            _ if run.status == RunStatus::AwaitingInput && request.kind == ControlKind::Pause => ControlOutcome::AlreadyWaiting,
            _ => {
                if run.status == RunStatus::AwaitingInput {
                    // Nobody holds a waiting run: queue it for the runner that ends it.
                    run.status = RunStatus::Queued;
                    run.waiting = None;
                    slot.due_at = Some(request.at + self.queued_grace);
                }
                run.control = Some(request.clone());
                ControlOutcome::Recorded
            }
        })
    }

    async fn park(&self, id: &RunId, lease: &Lease, waiting: &Waiting, seen: Answered) -> Result<bool, StoreError> {
        if let Err(lost) = self.check_lease(id, lease) {
            // As the DynamoDB store: the same park again is a retry whose reply was lost.
            let runs = lock(&self.runs);
            return match runs.get(id) {
                Some(slot) if slot.run.waiting.as_ref() == Some(waiting) => Ok(true),
                _ => Err(lost),
            };
        }
        let mut runs = lock(&self.runs);
        let Some(slot) = runs.get_mut(id) else { return Err(StoreError::LeaseLost(id.clone())) };
        if Answered::of(&slot.run) != seen {
            return Ok(false);
        }
        slot.run.status = RunStatus::AwaitingInput;
        slot.run.waiting = Some(waiting.clone());
        slot.run.control = None;
        slot.lease = None;
        // The sweeper hands it over when its deadline passes, if it has one.
        slot.due_at = waiting.deadline;
        Ok(true)
    }

    async fn decide(&self, id: &RunId, step: &StepId, decision: &ReviewDecision) -> Result<DecideOutcome, StoreError> {
        let mut runs = lock(&self.runs);
        let Some(slot) = runs.get_mut(id) else { return Ok(DecideOutcome::NotFound) };
        if let Some(stored) = slot.run.decisions.get(step) {
            return Ok(DecideOutcome::AlreadyDecided(stored.clone()));
        }
        if slot.run.status.is_terminal() {
            return Ok(DecideOutcome::Finished(slot.run.status));
        }
        slot.run.decisions.insert(step.clone(), decision.clone());
        let requeued = slot.run.status == RunStatus::AwaitingInput;
        if requeued {
            slot.run.status = RunStatus::Queued;
            slot.run.waiting = None;
            slot.due_at = Some(decision.at + self.queued_grace);
        }
        Ok(DecideOutcome::Recorded { requeued })
    }

    async fn record_input(
        &self,
        id: &RunId,
        step: &StepId,
        expected: u32,
        next: &crate::input::InputState,
        requeue: bool,
    ) -> Result<AnswerOutcome, StoreError> {
        let mut runs = lock(&self.runs);
        let Some(slot) = runs.get_mut(id) else { return Ok(AnswerOutcome::NotFound) };
        let stored = slot.run.inputs.get(step).cloned().unwrap_or_default();
        if stored == *next {
            // As the DynamoDB store: the same write again is a retry whose reply was lost.
            return Ok(AnswerOutcome::Recorded { requeued: false });
        }
        if slot.run.status.is_terminal() {
            return Ok(AnswerOutcome::Finished(slot.run.status));
        }
        if stored.version != expected {
            return Ok(AnswerOutcome::Stale(stored));
        }
        slot.run.inputs.insert(step.clone(), next.clone());
        let requeued = requeue && slot.run.status == RunStatus::AwaitingInput;
        if requeued {
            slot.run.status = RunStatus::Queued;
            slot.run.waiting = None;
            slot.due_at = Some(Utc::now() + self.queued_grace);
        }
        Ok(AnswerOutcome::Recorded { requeued })
    }

    async fn resume(&self, id: &RunId, resumption: &Resumption) -> Result<ResumeOutcome, StoreError> {
        let mut runs = lock(&self.runs);
        let Some(slot) = runs.get_mut(id) else { return Ok(ResumeOutcome::NotFound) };
        if slot.run.resumed.as_ref() == Some(resumption) {
            return Ok(ResumeOutcome::Resumed);
        }
        if slot.run.status != RunStatus::AwaitingInput {
            return Ok(ResumeOutcome::NotWaiting(slot.run.status));
        }
        slot.run.status = RunStatus::Queued;
        slot.run.waiting = None;
        slot.run.resumed = Some(resumption.clone());
        slot.run.budget_raises.extend(resumption.budget.clone());
        slot.due_at = Some(resumption.at + self.queued_grace);
        Ok(ResumeOutcome::Resumed)
    }

    async fn due(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<RunId>, StoreError> {
        let runs = lock(&self.runs);
        let mut due: Vec<(DateTime<Utc>, &RunId)> = runs
            .iter()
            .filter_map(|(id, slot)| slot.due_at.filter(|at| at.timestamp_millis() <= now.timestamp_millis()).map(|at| (at, id)))
            .collect();
        due.sort();
        Ok(due.into_iter().take(limit).map(|(_, id)| id.clone()).collect())
    }

    async fn save_step(&self, id: &RunId, lease: &Lease, step: &StepRecord) -> Result<(), StoreError> {
        self.check_lease(id, lease)?;
        lock(&self.steps).entry(id.clone()).or_default().insert((step.step_id.clone(), step.revision), step.clone());
        Ok(())
    }

    async fn save_item(&self, id: &RunId, lease: &Lease, step: &StepId, revision: u32, item: &ItemRecord) -> Result<(), StoreError> {
        self.check_lease(id, lease)?;
        lock(&self.items).entry((id.clone(), (step.clone(), revision))).or_default().insert(item.index, item.clone());
        Ok(())
    }

    async fn get_items(&self, id: &RunId, step: &StepId, revision: u32) -> Result<Vec<ItemRecord>, StoreError> {
        Ok(lock(&self.items).get(&(id.clone(), (step.clone(), revision))).map(|m| m.values().cloned().collect()).unwrap_or_default())
    }

    async fn start_revision(&self, id: &RunId, revision: &Revision, overridden: Option<&StepRecord>) -> Result<RevisionOutcome, StoreError> {
        let mut runs = lock(&self.runs);
        let Some(slot) = runs.get_mut(id) else { return Ok(RevisionOutcome::NotFound) };
        let run = &mut slot.run;
        match run.revisions.get(revision.revision.saturating_sub(1) as usize) {
            // As the DynamoDB store: the same revision again is a retry whose reply was lost.
            Some(started) if started == revision => return Ok(RevisionOutcome::Started),
            _ if run.revision + 1 != revision.revision => return Ok(RevisionOutcome::Moved(run.revision)),
            _ if !run.status.is_terminal() => return Ok(RevisionOutcome::NotFinished(run.status)),
            _ => {}
        }
        if let Some(record) = overridden {
            lock(&self.steps).entry(id.clone()).or_default().insert((record.step_id.clone(), record.revision), record.clone());
        }
        run.revision = revision.revision;
        run.revisions.push(revision.clone());
        run.budget_raises.extend(revision.budget.clone());
        run.decisions.retain(|step, _| !revision.rerun.contains(step));
        run.inputs.retain(|step, _| !revision.rerun.contains(step));
        run.status = RunStatus::Queued;
        (run.finished_at, run.output, run.error, run.control, run.waiting) = (None, None, None, None, None);
        slot.due_at = Some(revision.at + self.queued_grace);
        Ok(RevisionOutcome::Started)
    }

    /// Records exactly what the DynamoDB store's update does: the end (status, output,
    /// error, totals, finish time) over the stored record, whose other fields stay.
    async fn finish_run(&self, run: &RunRecord, lease: &Lease) -> Result<(), StoreError> {
        if let Err(lost) = self.check_lease(&run.id, lease) {
            // As the DynamoDB store: the same end again is a retry whose reply was lost.
            let ms = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_millis());
            let runs = lock(&self.runs);
            let stored = runs.get(&run.id).map(|slot| &slot.run);
            return match stored {
                Some(stored) if stored.status == run.status && ms(stored.finished_at) == ms(run.finished_at) => Ok(()),
                _ => Err(lost),
            };
        }
        if let Some(slot) = lock(&self.runs).get_mut(&run.id) {
            let stored = &mut slot.run;
            stored.status = run.status;
            stored.finished_at = Some(run.finished_at.unwrap_or_else(Utc::now));
            stored.output = run.output.clone();
            stored.error = run.error.clone();
            stored.totals = run.totals;
            slot.lease = None;
            slot.due_at = None;
        }
        Ok(())
    }

    async fn release(&self, id: &RunId, lease: &Lease) -> Result<(), StoreError> {
        if let Err(lost) = self.check_lease(id, lease) {
            // As the DynamoDB store: released and unfinished is a retry whose reply was lost.
            let runs = lock(&self.runs);
            return match runs.get(id) {
                Some(slot) if slot.lease.is_none() && !slot.run.status.is_terminal() => Ok(()),
                _ => Err(lost),
            };
        }
        if let Some(slot) = lock(&self.runs).get_mut(id) {
            slot.lease = None;
            slot.due_at = Some(Utc::now() + self.queued_grace);
        }
        Ok(())
    }
}

#[async_trait]
impl RunHistory for MemoryStore {
    /// Walks every run of the index newest first (ties: the greater id first, a total
    /// order like the GSI's). Reads are free here, so there is no bound on runs examined.
    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage, StoreError> {
        let runs = lock(&self.runs);
        let mut matching: Vec<&RunRecord> = runs
            .values()
            .map(|slot| &slot.run)
            .filter(|r| match &query.index {
                RunIndex::Caller(caller) => r.caller.as_str() == caller,
                RunIndex::Workflow(workflow) => r.workflow.as_str() == workflow,
            })
            .collect();
        matching.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| b.id.cmp(&a.id)));
        let after = |r: &&RunRecord| match &query.after {
            None => true,
            Some(c) => (r.created_at, &r.id) < (c.created_at, &c.run_id),
        };
        let mut visible = matching.into_iter().filter(after).filter(|r| r.may_see(&query.visible_to));
        let items: Vec<RunSummary> = visible.by_ref().take(query.limit as usize).map(RunSummary::of).collect();
        let next = match (items.last(), visible.next()) {
            (Some(last), Some(_)) => Some(RunCursor { created_at: last.created_at, run_id: last.id.clone() }),
            _ => None,
        };
        Ok(RunPage { items, next })
    }
}

// ---------------------------------------------------------------- progress

#[derive(Default)]
pub struct MemoryProgress {
    events: Mutex<HashMap<RunId, Vec<Event>>>,
    rows: Mutex<BTreeMap<(Principal, RunId), ProgressRow>>,
}

impl MemoryProgress {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every event and progress row held (see [`canonical`]).
    pub fn snapshot(&self) -> String {
        let events = lock(&self.events).iter().map(|(id, events)| format!("events {id} {events:?}")).collect::<Vec<_>>();
        let rows = lock(&self.rows).iter().map(|(key, row)| format!("row {key:?} {row:?}")).collect::<Vec<_>>();
        canonical(events.into_iter().chain(rows))
    }

    /// Every event of a run, in seq order.
    pub fn events(&self, run: &RunId) -> Vec<Event> {
        lock(&self.events).get(run).cloned().unwrap_or_default()
    }
}

/// The most items one page holds, as in the DynamoDB adapter; a page holds at least one.
fn page_limit(limit: u32) -> usize {
    limit.clamp(1, 1000) as usize
}

#[async_trait]
impl ProgressSink for MemoryProgress {
    /// The DynamoDB adapter's transaction, all or nothing: the event must be the log's next
    /// one, and no owner's row may already be at or past it.
    async fn forget(&self, run: &RunId, principals: &[Principal]) -> Result<(), ProgressError> {
        let mut rows = lock(&self.rows);
        for p in principals {
            rows.remove(&(p.clone(), run.clone()));
        }
        Ok(())
    }

    async fn publish(&self, event: &Event, row: &ProgressRow, owners: &[Principal]) -> Result<(), ProgressError> {
        let owners: HashSet<&Principal> = owners.iter().collect();
        if owners.len() > MAX_OWNERS {
            return Err(ProgressError::Rejected(format!(
                "run {} has {} owners; one event updates at most {MAX_OWNERS} progress rows",
                event.run_id,
                owners.len()
            )));
        }
        let conflict = || ProgressError::Conflict { run: event.run_id.clone(), seq: event.seq };
        let mut events = lock(&self.events);
        let mut rows = lock(&self.rows);
        let log = events.entry(event.run_id.clone()).or_default();
        if log.last().map_or(0, |e| e.seq) + 1 != event.seq {
            return Err(conflict());
        }
        let key = |owner: &Principal| (owner.clone(), row.run_id.clone());
        if owners.iter().any(|o| rows.get(&key(o)).is_some_and(|stored| stored.last_seq >= row.last_seq)) {
            return Err(conflict());
        }
        log.push(event.clone());
        for owner in owners {
            rows.insert(key(owner), row.clone());
        }
        Ok(())
    }

    async fn last_event(&self, run: &RunId) -> Result<Option<Event>, ProgressError> {
        Ok(lock(&self.events).get(run).and_then(|l| l.last()).cloned())
    }
}

#[async_trait]
impl ProgressReader for MemoryProgress {
    async fn events_after(&self, run: &RunId, after: u64, limit: u32) -> Result<Vec<Event>, ProgressError> {
        Ok(self.events(run).into_iter().filter(|e| e.seq > after).take(page_limit(limit)).collect())
    }

    async fn progress_of(&self, principal: &Principal, run: &RunId) -> Result<Option<ProgressRow>, ProgressError> {
        Ok(lock(&self.rows).get(&(principal.clone(), run.clone())).cloned())
    }

    async fn feed(&self, principal: &Principal, limit: u32, before: Option<&RunId>) -> Result<Vec<ProgressRow>, ProgressError> {
        let rows = lock(&self.rows);
        let mut mine: Vec<ProgressRow> =
            rows.iter().filter(|((p, run), _)| p == principal && before.is_none_or(|b| run < b)).map(|(_, r)| r.clone()).collect();
        mine.sort_by(|a, b| b.run_id.cmp(&a.run_id));
        mine.truncate(page_limit(limit));
        Ok(mine)
    }
}

// ---------------------------------------------------------------- analytics

/// Rollups in memory: one [`WorkflowCosts`] per (owner, day, workflow), and the set of
/// (run, owner) pairs already recorded, which makes recording exactly-once as the
/// DynamoDB adapter's markers do.
#[derive(Default)]
pub struct MemoryAnalytics {
    rows: Mutex<BTreeMap<(Principal, NaiveDate, String), WorkflowCosts>>,
    recorded: Mutex<HashSet<(RunId, u32, Principal)>>,
}

impl MemoryAnalytics {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Analytics for MemoryAnalytics {
    async fn record_run(&self, run: &RunRecord, steps: &[StepRecord]) -> Result<Recorded, AnalyticsError> {
        let rollup = RunRollup::of(run, steps).ok_or_else(|| AnalyticsError::Unfinished(run.id.clone()))?;
        let mut recorded = lock(&self.recorded);
        let mut rows = lock(&self.rows);
        let mut outcome = Recorded::default();
        for owner in &run.owners {
            if !recorded.insert((run.id.clone(), run.revision, owner.clone())) {
                outcome.already += 1;
                continue;
            }
            rows.entry((owner.clone(), rollup.day, rollup.workflow.clone()))
                .or_insert_with(|| WorkflowCosts::new(rollup.workflow.clone()))
                .add_run(&rollup);
            outcome.added += 1;
        }
        Ok(outcome)
    }

    async fn costs(&self, principal: &Principal, from: NaiveDate, to: NaiveDate) -> Result<Vec<WorkflowCosts>, AnalyticsError> {
        let rows = lock(&self.rows);
        Ok(merge_by_workflow(rows.iter().filter(|((p, day, _), _)| p == principal && (from..=to).contains(day)).map(|(_, row)| row.clone())))
    }

    async fn costs_by_day(&self, principal: &Principal, from: NaiveDate, to: NaiveDate) -> Result<Vec<DayCosts>, AnalyticsError> {
        let rows = lock(&self.rows);
        let mine = rows.iter().filter(|((p, day, _), _)| p == principal && (from..=to).contains(day));
        Ok(merge_by_day(mine.map(|((_, day, _), row)| DayCosts { day: *day, costs: row.clone() })))
    }
}

// ---------------------------------------------------------------- daily spend

/// Daily spend counters and holds in memory, with the DynamoDB adapter's rules: a
/// reservation is admitted only if the counter stays within the cap, and writes its hold
/// with the counter; settling removes the hold with the counter's change, and a hold
/// already gone changes nothing. One lock over both keeps each of these atomic.
#[derive(Default)]
pub struct MemoryDailySpend {
    state: Mutex<DailyState>,
}

#[derive(Default)]
struct DailyState {
    days: HashMap<(String, NaiveDate), DaySpend>,
    /// By run, then by the call's name (see [`DayHold`]).
    holds: HashMap<RunId, BTreeMap<HoldName, DayHold>>,
}

/// What names a call's hold within its run: step, item, attempt, holder.
type HoldName = (StepId, Option<usize>, u32, String);

fn hold_name(hold: &DayHold) -> HoldName {
    (hold.step.clone(), hold.item, hold.attempt, hold.holder.clone())
}

impl MemoryDailySpend {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl DailySpend for MemoryDailySpend {
    async fn reserve(&self, hold: &DayHold, cap: Usd) -> Result<Result<(), DaySpend>, StoreError> {
        let mut state = lock(&self.state);
        let DailyState { days, holds } = &mut *state;
        let run_holds = holds.entry(hold.run.clone()).or_default();
        if run_holds.contains_key(&hold_name(hold)) {
            return Err(StoreError::Rejected(format!("a daily spend hold named {:?} already exists", hold_name(hold))));
        }
        let counter = days.entry((hold.owner.clone(), hold.day)).or_default();
        match counter.committed.checked_add(hold.amount) {
            Some(committed) if committed <= cap => {
                counter.committed = committed;
                run_holds.insert(hold_name(hold), hold.clone());
                Ok(Ok(()))
            }
            _ => Ok(Err(*counter)),
        }
    }

    async fn settle(&self, hold: &DayHold, settlement: Settlement) -> Result<(), StoreError> {
        let mut state = lock(&self.state);
        let DailyState { days, holds } = &mut *state;
        // As in DynamoDB, the counter moves by the hold as the settler names it.
        if holds.get_mut(&hold.run).and_then(|run_holds| run_holds.remove(&hold_name(hold))).is_none() {
            return Ok(());
        }
        let counter = days.entry((hold.owner.clone(), hold.day)).or_default();
        match settlement {
            Settlement::Charged(charged) => {
                counter.committed = Usd::from_pico(counter.committed.pico().saturating_sub(hold.amount.pico()).saturating_add(charged.pico()));
                counter.charged = counter.charged.saturating_add(charged);
            }
            Settlement::Lost => counter.lost = counter.lost.saturating_add(hold.amount),
        }
        Ok(())
    }

    async fn holds(&self, run: &RunId) -> Result<Vec<DayHold>, StoreError> {
        Ok(lock(&self.state).holds.get(run).map(|run_holds| run_holds.values().cloned().collect()).unwrap_or_default())
    }

    async fn day(&self, owner: &str, day: NaiveDate) -> Result<DaySpend, StoreError> {
        Ok(lock(&self.state).days.get(&(owner.to_owned(), day)).copied().unwrap_or_default())
    }
}

// ---------------------------------------------------------------- clock

/// Wall-clock time that advances with tokio's clock, so tests in paused time can let a
/// lease expire: the instant it was made, plus tokio time elapsed since.
pub struct PausedClock {
    start: DateTime<Utc>,
    at: tokio::time::Instant,
}

impl Default for PausedClock {
    fn default() -> Self {
        Self { start: Utc::now(), at: tokio::time::Instant::now() }
    }
}

impl crate::durability::Clock for PausedClock {
    fn now(&self) -> DateTime<Utc> {
        self.start + chrono::Duration::from_std(self.at.elapsed()).unwrap_or_default()
    }
}

// ---------------------------------------------------------------- dispatch

/// Records dispatched events; a test drives the runner with them.
#[derive(Default)]
pub struct MemoryDispatcher {
    dispatched: Mutex<Vec<RunnerEvent>>,
}

impl MemoryDispatcher {
    pub fn new() -> Self {
        Self::default()
    }

    /// The ids dispatched, in order.
    pub fn dispatched(&self) -> Vec<RunId> {
        lock(&self.dispatched).iter().map(|e| e.run_id.clone()).collect()
    }

    /// The events dispatched, in order.
    pub fn events(&self) -> Vec<RunnerEvent> {
        lock(&self.dispatched).clone()
    }
}

#[async_trait]
impl Dispatcher for MemoryDispatcher {
    async fn dispatch(&self, event: &RunnerEvent) -> Result<(), DispatchError> {
        lock(&self.dispatched).push(event.clone());
        Ok(())
    }
}

// ---------------------------------------------------------------- model

/// One scripted behaviour, chosen by the first rule whose `prompt_contains` matches.
#[derive(Debug, Clone)]
pub struct Script {
    pub prompt_contains: String,
    /// Replies in order; the last repeats. `Err` plays a service error.
    pub replies: Vec<Result<String, ModelError>>,
    pub usage: Option<Usage>,
    /// Simulated model latency (use with a paused tokio clock in tests).
    pub latency: Duration,
}

impl Script {
    pub fn reply(prompt_contains: &str, text: &str) -> Self {
        Self { prompt_contains: prompt_contains.into(), replies: vec![Ok(text.into())], usage: None, latency: Duration::ZERO }
    }

    /// A reply that is replaced by what follows `prompt_contains` in the prompt.
    pub const ECHO: &'static str = "\u{0}echo";

    /// Replies with what follows `prompt_contains` in the prompt (a map item, say).
    pub fn echo_item(prompt_contains: &str) -> Self {
        Self::reply(prompt_contains, Self::ECHO)
    }

    pub fn then(mut self, next: Result<String, ModelError>) -> Self {
        self.replies.push(next);
        self
    }

    pub fn failing_first(prompt_contains: &str, error: ModelError, times: usize, text: &str) -> Self {
        let mut replies: Vec<Result<String, ModelError>> = vec![Err(error); times];
        replies.push(Ok(text.into()));
        Self { prompt_contains: prompt_contains.into(), replies, usage: None, latency: Duration::ZERO }
    }

    pub fn with_usage(mut self, input_tokens: u64, output_tokens: u64) -> Self {
        self.usage = Some(Usage { input_tokens, output_tokens, ..Usage::default() });
        self
    }

    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }
}

/// A model that answers from [`Script`]s and records every request it got.
#[derive(Default)]
pub struct ScriptedModel {
    scripts: Vec<Script>,
    calls: Mutex<Vec<ModelRequest>>,
    served: Mutex<HashMap<usize, usize>>,
    /// Prefixes written to the emulated prompt cache, by model.
    prompt_cache: Mutex<std::collections::HashSet<(String, String)>>,
}

impl ScriptedModel {
    pub fn new(scripts: Vec<Script>) -> Self {
        Self { scripts, ..Self::default() }
    }

    pub fn calls(&self) -> Vec<ModelRequest> {
        lock(&self.calls).clone()
    }

    pub fn calls_matching(&self, needle: &str) -> usize {
        lock(&self.calls).iter().filter(|c| c.prompt.contains(needle)).count()
    }

    async fn answer(&self, request: &ModelRequest) -> Result<ModelReply, ModelError> {
        lock(&self.calls).push(request.clone());
        let Some((index, script)) = self.scripts.iter().enumerate().find(|(_, s)| request.prompt.contains(&s.prompt_contains)) else {
            return Err(ModelError::new(ModelErrorKind::Invalid, "NoScript", format!("no script matches prompt {:?}", request.prompt)));
        };
        let n = {
            let mut served = lock(&self.served);
            let n = served.entry(index).or_insert(0);
            *n += 1;
            *n - 1
        };
        if !script.latency.is_zero() {
            tokio::time::sleep(script.latency).await;
        }
        let mut reply = script.replies.get(n).or(script.replies.last()).cloned().unwrap_or_else(|| Ok(String::new()))?;
        if reply == Script::ECHO
            && let Some(at) = request.prompt.find(&script.prompt_contains)
        {
            reply = request.prompt[at + script.prompt_contains.len()..].to_owned();
        }
        let output_tokens = (reply.len() as u64).div_ceil(4).max(1);
        let usage = match script.usage {
            Some(usage) => usage,
            None if request.cache_points.count() > 0 => self.cached_usage(request, output_tokens),
            None => {
                let input_bytes = request.system.as_deref().map_or(0, str::len) + request.prompt.len();
                Usage { input_tokens: (input_bytes as u64).div_ceil(4).max(1), output_tokens, ..Usage::default() }
            }
        };
        let service_tier = (request.service_tier != ServiceTier::Default).then_some(request.service_tier);
        Ok(ModelReply { text: reply, usage, stop_reason: "end_turn".into(), service_tier })
    }

    /// Usage as Bedrock reports it for a request with cache points: the longest marked
    /// prefix is read if an earlier call (same model) wrote it, else written; the rest is
    /// input. Four bytes a token; no TTL (a test's calls all fall within one).
    fn cached_usage(&self, request: &ModelRequest, output_tokens: u64) -> Usage {
        let system = request.system.as_deref().unwrap_or("");
        let tokens = |bytes: usize| (bytes as u64).div_ceil(4);
        let mut prefixes = Vec::new();
        if request.cache_points.after_system {
            prefixes.push(system.to_owned());
        }
        if let Some(head) = request.cache_points.prompt_head {
            prefixes.push(format!("{system}\u{0}{}", &request.prompt[..head]));
        }
        let total = tokens(system.len() + request.prompt.len()).max(1);
        let mut cache = lock(&self.prompt_cache);
        let longest = prefixes.last().cloned().unwrap_or_default();
        let prefix_tokens = |p: &str| tokens(p.len() - usize::from(p.contains('\u{0}')));
        let (read, write) = match prefixes.iter().rev().find(|p| cache.contains(&(request.model.to_string(), (*p).clone()))) {
            Some(hit) if *hit == longest => (prefix_tokens(hit), 0),
            Some(hit) => (prefix_tokens(hit), prefix_tokens(&longest) - prefix_tokens(hit)),
            None => (0, prefix_tokens(&longest)),
        };
        for p in prefixes {
            cache.insert((request.model.to_string(), p));
        }
        Usage { input_tokens: total.saturating_sub(read + write), output_tokens, cache_read_tokens: read, cache_write_tokens: write }
    }
}

#[async_trait]
impl ModelClient for ScriptedModel {
    async fn converse(&self, request: &ModelRequest) -> Result<ModelReply, ModelError> {
        self.answer(request).await
    }

    /// Streams the scripted reply in 4-character deltas.
    async fn converse_stream(&self, request: &ModelRequest, deltas: mpsc::Sender<String>) -> Result<ModelReply, ModelError> {
        let reply = self.answer(request).await?;
        let chars: Vec<char> = reply.text.chars().collect();
        for chunk in chars.chunks(4) {
            // A dropped receiver means the engine stopped listening; the reply still stands.
            let _ = deltas.send(chunk.iter().collect()).await;
        }
        Ok(reply)
    }
}

// ---------------------------------------------------------------- idempotency keys

enum KeyState {
    Pending { fingerprint: String, until: DateTime<Utc> },
    Done { fingerprint: String, response: StoredResponse },
}

/// Idempotency keys in memory, with the DynamoDB adapter's semantics.
#[derive(Default)]
pub struct MemoryIdempotency {
    keys: Mutex<HashMap<(String, String), KeyState>>,
}

impl MemoryIdempotency {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Idempotency for MemoryIdempotency {
    async fn begin(&self, scope: &str, key: &str, fingerprint: &str, now: DateTime<Utc>) -> Result<KeyClaim, StoreError> {
        let mut keys = lock(&self.keys);
        let slot = (scope.to_owned(), key.to_owned());
        let claim = match keys.get(&slot) {
            Some(KeyState::Done { fingerprint: f, .. } | KeyState::Pending { fingerprint: f, .. }) if f != fingerprint => KeyClaim::Mismatch,
            Some(KeyState::Done { response, .. }) => KeyClaim::Replay(response.clone()),
            Some(KeyState::Pending { until, .. }) if *until > now => KeyClaim::InProgress,
            _ => KeyClaim::New,
        };
        if claim == KeyClaim::New {
            let until = now + chrono::Duration::seconds(KEY_PENDING_SECS);
            keys.insert(slot, KeyState::Pending { fingerprint: fingerprint.to_owned(), until });
        }
        Ok(claim)
    }

    async fn complete(&self, scope: &str, key: &str, fingerprint: &str, response: &StoredResponse) -> Result<(), StoreError> {
        let done = KeyState::Done { fingerprint: fingerprint.to_owned(), response: response.clone() };
        lock(&self.keys).insert((scope.to_owned(), key.to_owned()), done);
        Ok(())
    }

    async fn abandon(&self, scope: &str, key: &str, fingerprint: &str) -> Result<(), StoreError> {
        let mut keys = lock(&self.keys);
        let slot = (scope.to_owned(), key.to_owned());
        if matches!(keys.get(&slot), Some(KeyState::Pending { fingerprint: f, .. }) if f == fingerprint) {
            keys.remove(&slot);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- timers

/// Records wake-ups; a test fires them by delivering the runs.
#[derive(Default)]
pub struct MemoryTimers {
    set: Mutex<Vec<(RunId, DateTime<Utc>)>>,
}

impl MemoryTimers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every wake-up set, in order.
    pub fn set(&self) -> Vec<(RunId, DateTime<Utc>)> {
        lock(&self.set).clone()
    }
}

#[async_trait]
impl Timers for MemoryTimers {
    async fn wake_at(&self, run: &RunId, at: DateTime<Utc>) -> Result<(), TimerError> {
        lock(&self.set).push((run.clone(), at));
        Ok(())
    }
}

// ---------------------------------------------------------------- stored workflows

/// A stored workflow in memory: its head, every version by number, and whether it was
/// deleted (versions stay, as in the DynamoDB store; no call here reads them then).
struct StoredSlot {
    head: crate::stored::StoredWorkflow,
    versions: BTreeMap<u32, crate::stored::WorkflowVersion>,
    deleted: bool,
}

/// Stored workflows in memory, with the DynamoDB adapter's semantics: conditional new
/// versions, deletes that hide a workflow from every read, lists newest updated first.
#[derive(Default)]
pub struct MemoryWorkflows {
    workflows: Mutex<HashMap<crate::ids::WorkflowId, StoredSlot>>,
}

impl MemoryWorkflows {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every workflow and version held, deleted ones too (see [`canonical`]).
    pub fn snapshot(&self) -> String {
        canonical(
            lock(&self.workflows).iter().map(|(id, slot)| format!("workflow {id} {:?} {:?} deleted={}", slot.head, slot.versions, slot.deleted)),
        )
    }
}

#[async_trait]
impl WorkflowStore for MemoryWorkflows {
    async fn create(&self, head: &crate::stored::StoredWorkflow, first: &crate::stored::WorkflowVersion) -> Result<(), StoreError> {
        let mut workflows = lock(&self.workflows);
        if let Some(slot) = workflows.get(&head.id) {
            // The same create again (a retry whose reply was lost) succeeds; any other is refused.
            if slot.head == *head && slot.versions.get(&first.version) == Some(first) {
                return Ok(());
            }
            return Err(StoreError::Rejected(format!("workflow {} already exists", head.id)));
        }
        let slot = StoredSlot { head: head.clone(), versions: BTreeMap::from([(first.version, first.clone())]), deleted: false };
        workflows.insert(head.id.clone(), slot);
        Ok(())
    }

    async fn get(
        &self,
        id: &crate::ids::WorkflowId,
        version: Option<u32>,
    ) -> Result<Option<(crate::stored::StoredWorkflow, crate::stored::WorkflowVersion)>, StoreError> {
        let workflows = lock(&self.workflows);
        let Some(slot) = workflows.get(id).filter(|s| !s.deleted) else { return Ok(None) };
        Ok(slot.versions.get(&version.unwrap_or(slot.head.version)).map(|v| (slot.head.clone(), v.clone())))
    }

    async fn save_version(
        &self,
        id: &crate::ids::WorkflowId,
        expected: u32,
        name: &crate::ids::WorkflowName,
        next: &crate::stored::WorkflowVersion,
    ) -> Result<SaveOutcome, StoreError> {
        let mut workflows = lock(&self.workflows);
        let Some(slot) = workflows.get_mut(id).filter(|s| !s.deleted) else { return Ok(SaveOutcome::NotFound) };
        if slot.head.version != expected || next.version != expected + 1 {
            return Ok(SaveOutcome::Stale { current: slot.head.version });
        }
        slot.versions.insert(next.version, next.clone());
        slot.head.version = next.version;
        slot.head.name = name.clone();
        slot.head.updated_at = next.written_at;
        Ok(SaveOutcome::Saved(slot.head.clone()))
    }

    async fn delete(&self, id: &crate::ids::WorkflowId, _at: DateTime<Utc>) -> Result<bool, StoreError> {
        let mut workflows = lock(&self.workflows);
        match workflows.get_mut(id) {
            Some(slot) if !slot.deleted => {
                slot.deleted = true;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn set_access(&self, id: &crate::ids::WorkflowId, access: &crate::access::Access) -> Result<bool, StoreError> {
        let mut workflows = lock(&self.workflows);
        match workflows.get_mut(id) {
            Some(slot) if !slot.deleted => {
                slot.head.access = access.clone();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn list(&self, visible_to: &[Principal], limit: u32, after: Option<&WorkflowCursor>) -> Result<WorkflowPage, StoreError> {
        let workflows = lock(&self.workflows);
        let mut heads: Vec<&crate::stored::StoredWorkflow> =
            workflows.values().filter(|s| !s.deleted && s.head.grantees().iter().any(|g| visible_to.contains(g))).map(|s| &s.head).collect();
        // Newest updated first; the id breaks ties, as the DynamoDB index's key does.
        heads.sort_by(|a, b| (b.updated_at, &b.id).cmp(&(a.updated_at, &a.id)));
        let start = match after {
            Some(c) => heads.iter().position(|h| (h.updated_at, &h.id) < (c.updated_at, &c.id)).unwrap_or(heads.len()),
            None => 0,
        };
        let limit = limit.max(1) as usize;
        let rest = &heads[start..];
        let items: Vec<_> = rest.iter().take(limit).map(|h| (*h).clone()).collect();
        let next = (rest.len() > limit).then(|| items.last().map(|h| WorkflowCursor { updated_at: h.updated_at, id: h.id.clone() })).flatten();
        Ok(WorkflowPage { items, next })
    }
}

// ---------------------------------------------------------------- saved templates

/// Saved templates in memory, with the DynamoDB adapter's semantics: a create that is
/// refused for a taken id unless it is the same template, lists newest first.
#[derive(Default)]
pub struct MemoryTemplates {
    templates: Mutex<HashMap<crate::templates::TemplateId, crate::templates::SavedTemplate>>,
}

impl MemoryTemplates {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many templates are stored (for tests that prove nothing was written).
    pub fn len(&self) -> usize {
        lock(&self.templates).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl TemplateStore for MemoryTemplates {
    async fn save(&self, template: &crate::templates::SavedTemplate) -> Result<(), StoreError> {
        let mut templates = lock(&self.templates);
        match templates.get(&template.id) {
            Some(stored) if stored == template => Ok(()),
            Some(_) => Err(StoreError::Rejected(format!("template {} already exists", template.id))),
            None => {
                templates.insert(template.id.clone(), template.clone());
                Ok(())
            }
        }
    }

    async fn get(&self, id: &crate::templates::TemplateId) -> Result<Option<crate::templates::SavedTemplate>, StoreError> {
        Ok(lock(&self.templates).get(id).cloned())
    }

    async fn delete(&self, id: &crate::templates::TemplateId) -> Result<bool, StoreError> {
        Ok(lock(&self.templates).remove(id).is_some())
    }

    async fn list(&self, owner: &crate::ids::UserId, limit: u32, after: Option<&TemplateCursor>) -> Result<TemplatePage, StoreError> {
        let templates = lock(&self.templates);
        let mut mine: Vec<&crate::templates::SavedTemplate> = templates.values().filter(|t| &t.owner == owner).collect();
        // Newest first; the id breaks ties, as the DynamoDB index's key does.
        mine.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        let start = match after {
            Some(c) => mine.iter().position(|t| (t.created_at, &t.id) < (c.created_at, &c.id)).unwrap_or(mine.len()),
            None => 0,
        };
        let limit = limit.max(1) as usize;
        let rest = &mine[start..];
        let items: Vec<_> = rest.iter().take(limit).map(|t| (*t).clone()).collect();
        let next = (rest.len() > limit).then(|| items.last().map(|t| TemplateCursor { created_at: t.created_at, id: t.id.clone() })).flatten();
        Ok(TemplatePage { items, next })
    }
}

// ---------------------------------------------------------------- response cache

/// A stored reply and when it expires, by tenant and key.
type ResponseEntries = HashMap<(String, String), (CachedReply, DateTime<Utc>)>;

/// The response cache in memory, honouring each entry's expiry.
#[derive(Default)]
pub struct MemoryResponses {
    entries: Mutex<ResponseEntries>,
}

impl MemoryResponses {
    pub fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl ResponseCache for MemoryResponses {
    async fn get(&self, tenant: &Principal, key: &str, now: DateTime<Utc>) -> Result<Option<CachedReply>, StoreError> {
        Ok(lock(&self.entries).get(&(tenant.to_string(), key.to_owned())).filter(|(_, expires)| *expires > now).map(|(reply, _)| reply.clone()))
    }

    async fn put(&self, tenant: &Principal, key: &str, reply: &CachedReply, expires_at: DateTime<Utc>) -> Result<(), StoreError> {
        lock(&self.entries).insert((tenant.to_string(), key.to_owned()), (reply.clone(), expires_at));
        Ok(())
    }
}

/// Batch inference jobs in memory, like Bedrock's: a job ends after `polls` reads of its
/// state, and its records are then answered by `model` (a [`ScriptedModel`] in tests); a
/// job of fewer than `min_records` records fails, as Bedrock's validation does. The same
/// token submitted again finds the same job.
pub struct MemoryBatch {
    model: std::sync::Arc<dyn ModelClient>,
    polls: u32,
    min_records: usize,
    jobs: Mutex<Vec<MemoryJob>>,
    /// Item indices the jobs leave unprocessed (as a job that expired before them).
    unprocessed: Mutex<HashSet<usize>>,
    /// What the next submissions are refused with.
    refusal: Mutex<Option<ModelError>>,
}

/// One job as [`MemoryBatch`] keeps it.
#[derive(Debug, Clone)]
pub struct MemoryJob {
    pub id: String,
    pub token: String,
    pub records: Vec<BatchRecord>,
    /// How often it was submitted (the same token again finds it).
    pub submissions: u32,
    pub polls: u32,
    pub stopped: bool,
    answers: Option<BatchResults>,
}

impl MemoryBatch {
    pub fn new(model: std::sync::Arc<dyn ModelClient>, polls: u32, min_records: usize) -> Self {
        Self { model, polls, min_records, jobs: Mutex::default(), unprocessed: Mutex::default(), refusal: Mutex::default() }
    }

    pub fn jobs(&self) -> Vec<MemoryJob> {
        lock(&self.jobs).clone()
    }

    /// Jobs leave these items unprocessed.
    pub fn leave_unprocessed(&self, items: impl IntoIterator<Item = usize>) {
        lock(&self.unprocessed).extend(items);
    }

    /// Submissions are refused with `error` from now on (`None`: accepted again).
    pub fn refuse(&self, error: Option<ModelError>) {
        *lock(&self.refusal) = error;
    }

    fn not_found(job: &str) -> ModelError {
        ModelError::new(ModelErrorKind::Invalid, "ResourceNotFoundException", format!("no batch job {job}"))
    }

    fn ended(&self, job: &MemoryJob) -> bool {
        job.stopped || job.polls >= self.polls || job.records.len() < self.min_records
    }

    /// The job's answers, made once it ended (outside the lock: the model may wait).
    async fn answer(&self, job: &str) -> Result<(), ModelError> {
        let records = {
            let jobs = lock(&self.jobs);
            let found = jobs.iter().find(|j| j.id == job).ok_or_else(|| Self::not_found(job))?;
            if found.answers.is_some() || !self.ended(found) {
                return Ok(());
            }
            if found.records.len() < self.min_records || found.stopped { Vec::new() } else { found.records.clone() }
        };
        let skipped = lock(&self.unprocessed).clone();
        let mut answers = BatchResults::new();
        for record in records.into_iter().filter(|r| !skipped.contains(&r.index)) {
            answers.insert(record.index, self.model.converse(&record.request).await);
        }
        if let Some(found) = lock(&self.jobs).iter_mut().find(|j| j.id == job) {
            found.answers.get_or_insert(answers);
        }
        Ok(())
    }
}

#[async_trait]
impl BatchJobs for MemoryBatch {
    async fn submit(&self, job: &BatchSubmission) -> Result<String, ModelError> {
        if let Some(refusal) = lock(&self.refusal).clone() {
            return Err(refusal);
        }
        let mut jobs = lock(&self.jobs);
        if let Some(found) = jobs.iter_mut().find(|j| j.token == job.token) {
            found.submissions += 1;
            return Ok(found.id.clone());
        }
        let id = format!("arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/job{}", jobs.len() + 1);
        jobs.push(MemoryJob {
            id: id.clone(),
            token: job.token.clone(),
            records: job.records.clone(),
            submissions: 1,
            polls: 0,
            stopped: false,
            answers: None,
        });
        Ok(id)
    }

    async fn state(&self, job: &str) -> Result<BatchState, ModelError> {
        let state = {
            let mut jobs = lock(&self.jobs);
            let found = jobs.iter_mut().find(|j| j.id == job).ok_or_else(|| Self::not_found(job))?;
            found.polls += 1;
            let found = found.clone();
            if !self.ended(&found) {
                return Ok(BatchState::Running { status: if found.polls == 1 { "Validating" } else { "InProgress" }.into() });
            }
            found
        };
        self.answer(job).await?;
        let answered = lock(&self.jobs).iter().find(|j| j.id == job).and_then(|j| j.answers.clone()).unwrap_or_default();
        let (status, message) = if state.records.len() < self.min_records {
            ("Failed", Some(format!("{} records; at least {} are needed", state.records.len(), self.min_records)))
        } else if state.stopped {
            ("Stopped", None)
        } else if answered.len() < state.records.len() || answered.values().any(Result::is_err) {
            ("PartiallyCompleted", None)
        } else {
            ("Completed", None)
        };
        Ok(BatchState::Ended { status: status.into(), message })
    }

    async fn results(&self, job: &str) -> Result<BatchResults, ModelError> {
        self.answer(job).await?;
        let jobs = lock(&self.jobs);
        let found = jobs.iter().find(|j| j.id == job).ok_or_else(|| Self::not_found(job))?;
        found.answers.clone().ok_or_else(|| ModelError::new(ModelErrorKind::Invalid, "ValidationException", format!("batch job {job} has not ended")))
    }

    async fn stop(&self, job: &str) -> Result<(), ModelError> {
        let mut jobs = lock(&self.jobs);
        let found = jobs.iter_mut().find(|j| j.id == job).ok_or_else(|| Self::not_found(job))?;
        found.stopped = true;
        Ok(())
    }
}
