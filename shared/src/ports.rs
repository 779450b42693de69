//! The engine's ports. They speak domain types only; adapters (AWS, in-memory) live
//! in [`crate::aws`] and [`crate::memory`].
//!
//! Every error says at its source whether retrying can help, so callers decide with
//! `retryable()` instead of matching on messages.

use crate::analytics::{DayCosts, WorkflowCosts};
use crate::ids::{ModelId, Principal, RunId, StepId, UserId, WorkflowName};
use crate::money::Usd;
use crate::pricing::{ServiceTier, Usage};
use crate::responses::CachedReply;
use crate::revision::Revision;
use crate::run::{
    ControlRequest, ErrorInfo, Event, ItemRecord, ProgressRow, Resumption, ReviewDecision, RunRecord, RunStatus, RunnerEvent, StepRecord, Totals,
    Waiting,
};
use crate::spend::{DayHold, DaySpend, Settlement};
use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;
use std::collections::BTreeMap;
use tokio::sync::mpsc;

// ---------------------------------------------------------------- model

#[derive(Debug, Clone, PartialEq)]
pub struct ModelRequest {
    pub model: ModelId,
    pub system: Option<String>,
    pub prompt: String,
    pub temperature: Option<f32>,
    pub max_tokens: u32,
    pub stop_sequences: Vec<String>,
    /// Where the request marks its head for the prompt cache (nowhere by default).
    pub cache_points: CachePoints,
    pub service_tier: ServiceTier,
    /// Labels Bedrock writes to its invocation log with the call (run, step, owner…), so
    /// that log can be reconciled with chainrun's ledger.
    pub metadata: BTreeMap<String, String>,
    /// A JSON Schema the model is constrained to natively (structured output); the reply
    /// is still validated against the step's schema.
    pub output_schema: Option<Value>,
}

/// Cache points of one request: after the system prompt, and/or after the first
/// `prompt_head` bytes of the prompt (a char boundary). Each marks everything before it
/// as a prefix for the model's prompt cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CachePoints {
    pub after_system: bool,
    pub prompt_head: Option<usize>,
}

impl CachePoints {
    pub fn count(&self) -> usize {
        usize::from(self.after_system) + usize::from(self.prompt_head.is_some())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelReply {
    pub text: String,
    pub usage: Usage,
    pub stop_reason: String,
    /// The tier Bedrock says served the call, when it says.
    pub service_tier: Option<ServiceTier>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelErrorKind {
    Throttled,
    Timeout,
    Unavailable,
    ServerError,
    /// The request itself is wrong (bad parameters, context too long).
    Invalid,
    AccessDenied,
    ModelNotFound,
    /// Transport failure before a reply (connection reset, DNS…).
    Network,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ModelError {
    pub kind: ModelErrorKind,
    /// The service's error name (`ThrottlingException`) or ours.
    pub code: String,
    pub message: String,
}

impl ModelError {
    pub fn new(kind: ModelErrorKind, code: impl Into<String>, message: impl Into<String>) -> Self {
        Self { kind, code: code.into(), message: message.into() }
    }

    pub fn retryable(&self) -> bool {
        matches!(
            self.kind,
            ModelErrorKind::Throttled | ModelErrorKind::Timeout | ModelErrorKind::Unavailable | ModelErrorKind::ServerError | ModelErrorKind::Network
        )
    }
}

#[async_trait]
pub trait ModelClient: Send + Sync {
    /// One model turn.
    async fn converse(&self, request: &ModelRequest) -> Result<ModelReply, ModelError>;

    /// One model turn, streamed: each text delta is sent on `deltas` as it arrives; the
    /// returned reply's text is the concatenation of the deltas.
    async fn converse_stream(&self, request: &ModelRequest, deltas: mpsc::Sender<String>) -> Result<ModelReply, ModelError>;
}

// ---------------------------------------------------------------- batch inference

/// A map's items sent to the model service as one batch inference job: each record is one
/// item's request, answered at the model's batch price some time later (see
/// [`crate::engine`]'s `batch`).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchSubmission {
    /// The same for every submission of this job: one made again after a crash (or a lost
    /// reply) finds the job the first one created instead of creating another.
    pub token: String,
    pub run: RunId,
    pub step: StepId,
    /// The model as called (a `global.`/`us.` profile or a model id).
    pub model: ModelId,
    /// In item order; each request's `cache_points` and `service_tier` do not apply.
    pub records: Vec<BatchRecord>,
    /// How long the model service may take before it expires the job's unprocessed records.
    pub timeout_hours: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatchRecord {
    /// The map item's index.
    pub index: usize,
    pub request: ModelRequest,
}

/// Where a submitted job stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchState {
    /// Submitted, validating, scheduled or in progress: `status` as the service says it.
    Running { status: String },
    /// Completed, partially completed, failed, stopped or expired: what it answered is final.
    Ended { status: String, message: Option<String> },
}

/// What a job answered, by item index. An index it does not hold was never processed
/// (the job failed, was stopped or expired first): nothing was charged for it.
pub type BatchResults = BTreeMap<usize, Result<ModelReply, ModelError>>;

/// Batch inference jobs of the model service. Errors are [`ModelError`]s: a retryable one
/// means "ask again later", any other that the service will not run this job.
#[async_trait]
pub trait BatchJobs: Send + Sync {
    /// Stores the records where the service reads them and creates the job; returns the
    /// job's id (an ARN on Bedrock). Idempotent on `job.token`.
    async fn submit(&self, job: &BatchSubmission) -> Result<String, ModelError>;
    async fn state(&self, job: &str) -> Result<BatchState, ModelError>;
    /// An ended job's answers.
    async fn results(&self, job: &str) -> Result<BatchResults, ModelError>;
    /// Asks the service to stop the job; records it already processed stay charged.
    async fn stop(&self, job: &str) -> Result<(), ModelError>;
}

// ---------------------------------------------------------------- response cache

/// Replies of deterministic steps, per tenant, for a while (see [`crate::responses`]).
/// A failure here never fails a step: the engine then calls the model as if it missed.
#[async_trait]
pub trait ResponseCache: Send + Sync {
    /// The reply stored under `key` for `tenant`, if there is one that has not expired at `now`.
    async fn get(&self, tenant: &Principal, key: &str, now: DateTime<Utc>) -> Result<Option<CachedReply>, StoreError>;
    /// Stores `reply` under `key` for `tenant` until `expires_at`; a later put replaces it.
    async fn put(&self, tenant: &Principal, key: &str, reply: &CachedReply, expires_at: DateTime<Utc>) -> Result<(), StoreError>;
}

// ---------------------------------------------------------------- store

/// Why a store call failed. Three kinds of failure are kept apart, because they call for
/// different actions: data that is stored but unreadable (`Corrupt`: terminal, a bug or a
/// manual edit to investigate), a request the store refuses (`Rejected`, `TooLarge`:
/// terminal until configuration or code changes), and a store that cannot answer now
/// (`Unavailable`: retry).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("run {0} already exists")]
    AlreadyExists(RunId),
    /// A conditional write lost: the lease is held by another runner, or was lost.
    #[error("lease on run {0} is not held by this runner")]
    LeaseLost(RunId),
    /// An item would exceed what one write may hold. Terminal; the message names the item
    /// and the limit.
    #[error("stored item is too large: {0}")]
    TooLarge(String),
    /// A stored item does not read back as a record (a field missing or of the wrong type,
    /// a document that is not JSON). Terminal: no retry makes it readable. The message
    /// names the item (table and key).
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The store refused the request itself: a missing table, missing permissions, an
    /// invalid request. Terminal until configuration (or code) changes; the message says
    /// what to fix.
    #[error("the store rejected the request: {0}")]
    Rejected(String),
    /// Throttled, a server error, a timeout, no connection: a retry can succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    pub fn retryable(&self) -> bool {
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::AlreadyExists(_) | StoreError::LeaseLost(_) | StoreError::TooLarge(_) | StoreError::Corrupt(_) | StoreError::Rejected(_) => {
                false
            }
        }
    }
}

/// A runner's claim on a run, valid until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    pub expires_at: DateTime<Utc>,
}

/// What became of a control request.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlOutcome {
    Recorded,
    /// An earlier request stands.
    AlreadyRequested(ControlRequest),
    /// The run had already ended, with this status.
    Finished(RunStatus),
    /// A pause of a run that already waits.
    AlreadyWaiting,
    NotFound,
}

/// What became of a review decision.
#[derive(Debug, Clone, PartialEq)]
pub enum DecideOutcome {
    /// Recorded; `requeued` when the run was waiting and is queued again.
    Recorded {
        requeued: bool,
    },
    /// The step was decided already, so.
    AlreadyDecided(ReviewDecision),
    /// The run had already ended, with this status.
    Finished(RunStatus),
    NotFound,
}

/// What became of an answer to an input step (see [`RunStore::record_input`]).
#[derive(Debug, Clone, PartialEq)]
pub enum AnswerOutcome {
    /// Recorded; `requeued` when the run was waiting and is queued again.
    Recorded {
        requeued: bool,
    },
    /// The step's state is no longer the one the answer was checked against: this is it now.
    Stale(crate::input::InputState),
    /// The run had already ended, with this status.
    Finished(RunStatus),
    NotFound,
}

/// The answers a runner saw on the run it parks: a park only stands if no other arrived
/// since (see [`RunStore::park`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Answered {
    /// Review decisions recorded.
    pub decisions: usize,
    /// Answers to input steps, over all of them.
    pub input_turns: usize,
}

impl Answered {
    pub fn of(run: &RunRecord) -> Self {
        Self { decisions: run.decisions.len(), input_turns: run.inputs.values().map(|s| s.turns.len()).sum() }
    }
}

/// What became of a resume.
#[derive(Debug, Clone, PartialEq)]
pub enum ResumeOutcome {
    /// The run is queued again; a runner continues it.
    Resumed,
    /// The run was not waiting: it is in this status.
    NotWaiting(RunStatus),
    NotFound,
}

/// What became of a new revision.
#[derive(Debug, Clone, PartialEq)]
pub enum RevisionOutcome {
    /// Queued: a runner runs it.
    Started,
    /// The run has not ended: it is in this status.
    NotFinished(RunStatus),
    /// Another revision started first: the run is now at this one.
    Moved(u32),
    NotFound,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// This runner now holds the run.
    Acquired(Box<RunRecord>),
    /// Another runner holds a live lease: a duplicate delivery.
    HeldElsewhere,
    /// The run already ended.
    Finished,
    NotFound,
    /// The run waits for a person (`AWAITING_INPUT`): nothing to run until it is resumed.
    Waiting,
}

#[async_trait]
pub trait RunStore: Send + Sync {
    /// Stores a new run; fails with `AlreadyExists` rather than overwrite another run with
    /// its id. Storing the same run again succeeds (a retry whose reply was lost).
    async fn create_run(&self, run: &RunRecord) -> Result<(), StoreError>;
    async fn get_run(&self, id: &RunId) -> Result<Option<RunRecord>, StoreError>;
    /// The run's record without its output (`None`): what checking access or reading the
    /// run's state needs. A store that keeps large outputs elsewhere skips reading them.
    async fn get_run_head(&self, id: &RunId) -> Result<Option<RunRecord>, StoreError> {
        Ok(self.get_run(id).await?.map(|run| RunRecord { output: None, ..run }))
    }
    async fn get_steps(&self, id: &RunId) -> Result<Vec<StepRecord>, StoreError>;
    /// Takes the run if it is queued, released, or running under an expired lease (a
    /// crashed runner). Taking an expired lease over appends a [`Takeover`] to the run's
    /// record, so the returned record says whether this claim was one.
    async fn claim(&self, id: &RunId, lease: &Lease, now: DateTime<Utc>) -> Result<Claim, StoreError>;
    /// Extends our lease to `lease.expires_at` (the heartbeat); `LeaseLost` if it is no
    /// longer ours. Returns the run's pending control request, if any: the heartbeat is
    /// how a working runner learns it was asked to stop.
    async fn renew(&self, id: &RunId, lease: &Lease) -> Result<Option<ControlRequest>, StoreError>;
    /// Replaces whose feeds show the run (its workflow's access changed), while `lease`
    /// holds it; `LeaseLost` otherwise.
    async fn set_owners(&self, id: &RunId, lease: &Lease, owners: &[Principal]) -> Result<(), StoreError>;
    /// Records `request` on an unfinished run, whoever holds it; the runner holding it (or
    /// the next to claim it) acts on it. The first request stands: a later one gets
    /// `AlreadyRequested` with it (the same request again, e.g. a retry whose reply was
    /// lost, gets `Recorded`).
    async fn request_control(&self, id: &RunId, request: &ControlRequest) -> Result<ControlOutcome, StoreError>;
    /// Puts the run we hold in `AWAITING_INPUT` for `waiting` and gives the lease up: it
    /// holds no runner, and the sweeper leaves it alone, until it is resumed. Clears the
    /// control request that asked for it. Only if the run still has the review decisions
    /// and input answers `seen` counts: one that arrived since the runner read the run makes
    /// this return `Ok(false)` and change nothing (the runner continues with it instead).
    async fn park(&self, id: &RunId, lease: &Lease, waiting: &Waiting, seen: Answered) -> Result<bool, StoreError>;
    /// Records the decision on review step `step` of an unfinished run, once per step; a
    /// waiting run is queued again for any runner to continue.
    async fn decide(&self, id: &RunId, step: &StepId, decision: &ReviewDecision) -> Result<DecideOutcome, StoreError>;
    /// Replaces input step `step`'s state on an unfinished run with `next`, only if its
    /// stored state has version `expected` (0: none yet); otherwise `Stale` with the stored
    /// one. With `requeue`, a waiting run is queued again for any runner to continue.
    async fn record_input(
        &self,
        id: &RunId,
        step: &StepId,
        expected: u32,
        next: &crate::input::InputState,
        requeue: bool,
    ) -> Result<AnswerOutcome, StoreError>;
    /// Queues a waiting run again (any runner may claim it), recording `resumption`.
    async fn resume(&self, id: &RunId, resumption: &Resumption) -> Result<ResumeOutcome, StoreError>;
    /// Runs the sweeper must hand to a runner: unfinished, and either under a lease that
    /// expired by `now` or released/queued for longer than the queued grace. At most
    /// `limit`, read from an index of unfinished runs (never a scan of all runs).
    async fn due(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<RunId>, StoreError>;
    /// Checkpoints a step, only while `lease` is still ours.
    async fn save_step(&self, id: &RunId, lease: &Lease, step: &StepRecord) -> Result<(), StoreError>;
    /// Checkpoints one item of map step `step` in the run's `revision`, only while `lease`
    /// is still ours.
    async fn save_item(&self, id: &RunId, lease: &Lease, step: &StepId, revision: u32, item: &ItemRecord) -> Result<(), StoreError>;
    /// The item checkpoints of map step `step` in the run's `revision`, by index.
    async fn get_items(&self, id: &RunId, step: &StepId, revision: u32) -> Result<Vec<ItemRecord>, StoreError>;
    /// Starts the next revision of a finished run (see [`crate::revision`]): records
    /// `revision` (whose number must be the run's next) and queues the run again, clearing
    /// its end; with `overridden`, that step's record in the new revision is written in the
    /// same request. Only if the run has ended and is still at the revision before
    /// `revision` (a concurrent retry or override of the same run gets `Moved`).
    async fn start_revision(&self, id: &RunId, revision: &Revision, overridden: Option<&StepRecord>) -> Result<RevisionOutcome, StoreError>;
    /// Records the run's end (status, output, error, totals) and releases the lease.
    async fn finish_run(&self, run: &RunRecord, lease: &Lease) -> Result<(), StoreError>;
    /// Gives the lease up without finishing (the run continues in another invocation,
    /// which may claim it at once). If no invocation does, the run is due for the sweeper
    /// after the queued grace.
    async fn release(&self, id: &RunId, lease: &Lease) -> Result<(), StoreError>;
}

// ---------------------------------------------------------------- progress

/// Why a progress call failed; the kinds are [`StoreError`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgressError {
    /// `seq` is not the next one of the run's log (already taken, or past a gap), or a
    /// progress row is already past it: another writer is ahead of this one.
    #[error("event {seq} of run {run} is not the next one: another writer is ahead")]
    Conflict { run: RunId, seq: u64 },
    /// A stored event or progress row does not read back. Terminal; names the item.
    #[error("stored progress data is corrupt: {0}")]
    Corrupt(String),
    /// The store refused the request itself (missing table, permissions, an event too
    /// large or with too many owners). Terminal; says what to fix.
    #[error("the progress store rejected the request: {0}")]
    Rejected(String),
    /// Throttled, a server error, a timeout, no connection: a retry can succeed.
    #[error("progress store unavailable: {0}")]
    Unavailable(String),
}

impl ProgressError {
    pub fn retryable(&self) -> bool {
        match self {
            ProgressError::Unavailable(_) => true,
            ProgressError::Conflict { .. } | ProgressError::Corrupt(_) | ProgressError::Rejected(_) => false,
        }
    }
}

/// The most owners one event updates rows for: a DynamoDB transaction holds 100 items —
/// the event, the check of its predecessor, a step checkpoint with its lease check, and
/// one row per owner. Both adapters refuse more.
pub const MAX_OWNERS: usize = 96;

/// A step checkpoint that goes with an event (see [`ProgressSink::publish_checkpointed`]).
#[derive(Clone, Copy)]
pub struct Checkpoint<'a> {
    /// Where checkpoints live, for adapters that cannot write both at once.
    pub store: &'a dyn RunStore,
    /// The checkpoint lands only while this lease holds the run.
    pub lease: &'a Lease,
    pub step: &'a StepRecord,
}

/// Why a checkpointed event was not written: the checkpoint's error or the event's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Progress(#[from] ProgressError),
}

impl JournalError {
    pub fn retryable(&self) -> bool {
        match self {
            JournalError::Store(e) => e.retryable(),
            JournalError::Progress(e) => e.retryable(),
        }
    }
}

#[async_trait]
pub trait ProgressSink: Send + Sync {
    /// Appends `event` to the run's log and replaces `row` in each owner's feed,
    /// atomically: a reader never sees a progress row ahead of the log.
    async fn publish(&self, event: &Event, row: &ProgressRow, owners: &[Principal]) -> Result<(), ProgressError>;

    /// Removes the run's row from each of `principals`' feeds (they may no longer see it).
    async fn forget(&self, run: &RunId, principals: &[Principal]) -> Result<(), ProgressError>;

    /// Checkpoints a step of the event's run (only while the checkpoint's lease holds the
    /// run) and publishes `event` as [`ProgressSink::publish`] does. An adapter that can
    /// write both in one request does, so a step's result and the event announcing it land
    /// together or not at all. This default writes the checkpoint first, so an event never
    /// announces a result that a resumed run could not read back.
    async fn publish_checkpointed(
        &self,
        event: &Event,
        row: &ProgressRow,
        owners: &[Principal],
        checkpoint: Checkpoint<'_>,
    ) -> Result<(), JournalError> {
        checkpoint.store.save_step(&event.run_id, checkpoint.lease, checkpoint.step).await?;
        self.publish(event, row, owners).await?;
        Ok(())
    }

    /// The highest `seq` in the run's log (0 when empty).
    async fn last_seq(&self, run: &RunId) -> Result<u64, ProgressError> {
        Ok(self.last_event(run).await?.map_or(0, |e| e.seq))
    }

    /// The run's latest event, if it has any (a finished run's should be its end).
    async fn last_event(&self, run: &RunId) -> Result<Option<Event>, ProgressError>;
}

/// Reads for clients: the run's log after a cursor, and a principal's feed.
#[async_trait]
pub trait ProgressReader: Send + Sync {
    async fn events_after(&self, run: &RunId, after: u64, limit: u32) -> Result<Vec<Event>, ProgressError>;
    async fn progress_of(&self, principal: &Principal, run: &RunId) -> Result<Option<ProgressRow>, ProgressError>;
    /// Up to `limit` rows of `principal`'s feed, newest run first, of runs older than
    /// `before` when given (the cursor of a feed's pages: run ids sort by creation).
    async fn feed(&self, principal: &Principal, limit: u32, before: Option<&RunId>) -> Result<Vec<ProgressRow>, ProgressError>;
}

// ---------------------------------------------------------------- dispatch

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("could not hand run {run} to the runner: {message}")]
pub struct DispatchError {
    pub run: RunId,
    pub message: String,
    pub retryable: bool,
}

#[async_trait]
pub trait Dispatcher: Send + Sync {
    /// Hands the run id and why (nothing else: payload limits) to a runner, asynchronously.
    async fn dispatch(&self, event: &RunnerEvent) -> Result<(), DispatchError>;
}

// ---------------------------------------------------------------- history

/// Which index a history query walks, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunIndex {
    /// Runs started by this user.
    Caller(String),
    /// Runs of the workflow with this name.
    Workflow(String),
}

/// A position in a history index: the last run a page covered. Pages resume after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCursor {
    pub created_at: DateTime<Utc>,
    pub run_id: RunId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunQuery {
    pub index: RunIndex,
    /// Only runs one of these principals may see are returned.
    pub visible_to: Vec<Principal>,
    pub limit: u32,
    pub after: Option<RunCursor>,
}

/// A run as history lists it: no definition, input or output.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub id: RunId,
    pub workflow: WorkflowName,
    pub caller: UserId,
    pub status: RunStatus,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<ErrorInfo>,
    /// Final once the run has ended; zero before.
    pub totals: Totals,
}

impl RunSummary {
    pub fn of(run: &RunRecord) -> Self {
        Self {
            id: run.id.clone(),
            workflow: run.workflow.clone(),
            caller: run.caller.clone(),
            status: run.status,
            created_at: run.created_at,
            started_at: run.started_at,
            finished_at: run.finished_at,
            error: run.error.clone(),
            totals: run.totals,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunPage {
    pub items: Vec<RunSummary>,
    /// Where the next page starts; `None` once the index is exhausted. A page may hold
    /// fewer than `limit` runs (even none) and still have a `next`: an adapter bounds how
    /// much of the index one call reads when most runs there are not visible.
    pub next: Option<RunCursor>,
}

/// Run history, newest first, filtered by visibility.
#[async_trait]
pub trait RunHistory: Send + Sync {
    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage, StoreError>;
}

// ---------------------------------------------------------------- analytics

/// Why an analytics call failed; the kinds are [`StoreError`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnalyticsError {
    /// Only a finished run has a rollup.
    #[error("run {0} has not finished")]
    Unfinished(RunId),
    /// A stored rollup row does not read back. Terminal; names the item.
    #[error("stored rollup is corrupt: {0}")]
    Corrupt(String),
    /// The store refused the request itself (missing table, permissions, invalid request).
    /// Terminal; says what to fix.
    #[error("the analytics store rejected the request: {0}")]
    Rejected(String),
    /// Throttled, a server error, a timeout, no connection: a retry can succeed.
    #[error("analytics store unavailable: {0}")]
    Unavailable(String),
}

impl AnalyticsError {
    pub fn retryable(&self) -> bool {
        match self {
            AnalyticsError::Unavailable(_) => true,
            AnalyticsError::Unfinished(_) | AnalyticsError::Corrupt(_) | AnalyticsError::Rejected(_) => false,
        }
    }
}

/// What [`Analytics::record_run`] did, per owner of the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Owners whose rollup now includes the run.
    pub added: usize,
    /// Owners whose rollup already included it (a repeated call).
    pub already: usize,
}

/// Per-owner, per-workflow, per-day rollups of finished runs (see [`crate::analytics`]).
#[async_trait]
pub trait Analytics: Send + Sync {
    /// Adds a finished run to the rollup of each of its owners for the day it finished.
    /// Exactly once per run and owner: calling again (a retried delivery) adds nothing.
    async fn record_run(&self, run: &RunRecord, steps: &[StepRecord]) -> Result<Recorded, AnalyticsError>;

    /// Sums per workflow of the runs `principal` owns that finished on a UTC day in
    /// `from..=to`, most expensive workflow first. Reads rollup rows only.
    async fn costs(&self, principal: &Principal, from: NaiveDate, to: NaiveDate) -> Result<Vec<WorkflowCosts>, AnalyticsError>;

    /// The same sums one UTC day at a time: one entry per day and workflow that had runs,
    /// by day (see [`crate::analytics::merge_by_day`]). This default reads each day with
    /// [`Analytics::costs`]; an adapter that reads the whole period at once overrides it.
    async fn costs_by_day(&self, principal: &Principal, from: NaiveDate, to: NaiveDate) -> Result<Vec<DayCosts>, AnalyticsError> {
        let mut rows = Vec::new();
        for day in from.iter_days().take_while(|day| *day <= to) {
            rows.extend(self.costs(principal, day, day).await?.into_iter().map(|costs| DayCosts { day, costs }));
        }
        Ok(rows)
    }
}

// ---------------------------------------------------------------- daily spend

/// Per-owner, per-UTC-day spend counters shared by every runner, and the holds calls in
/// flight have on them (see [`crate::spend`]).
#[async_trait]
pub trait DailySpend: Send + Sync {
    /// Adds `hold.amount` to `hold.owner`'s committed spend for `hold.day` if the sum stays
    /// within `cap`, and records the hold, atomically; otherwise changes nothing and returns
    /// the day's counter. A hold already recorded under the same name is a defect
    /// (`Rejected`): the counter would count the call twice.
    async fn reserve(&self, hold: &DayHold, cap: Usd) -> Result<Result<(), DaySpend>, StoreError>;

    /// Replaces `hold` on its day's counter by `settlement` and removes it, atomically. A hold
    /// no longer recorded (settled already, by this runner or by the one that took its run
    /// over) changes nothing: settling is idempotent, and of two settlers only the first
    /// counts.
    async fn settle(&self, hold: &DayHold, settlement: Settlement) -> Result<(), StoreError>;

    /// The holds recorded for `run` and not yet settled.
    async fn holds(&self, run: &RunId) -> Result<Vec<DayHold>, StoreError>;

    /// `owner`'s counter for `day` (zero if nothing was reserved that day).
    async fn day(&self, owner: &str, day: NaiveDate) -> Result<DaySpend, StoreError>;
}

// ---------------------------------------------------------------- idempotency keys

/// A response kept for an idempotency key, to answer a repeat of its request with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub body: String,
}

/// What a request carrying an idempotency key may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyClaim {
    /// First use (or an earlier attempt that never finished): handle the request.
    New,
    /// Handled before: answer with this.
    Replay(StoredResponse),
    /// Another request with this key is being handled right now.
    InProgress,
    /// The key was used for a different request.
    Mismatch,
}

/// Idempotency keys (`Idempotency-Key`), per caller: a request repeated with the same key
/// gets the first one's answer instead of acting twice. Keys are kept a day.
#[async_trait]
pub trait Idempotency: Send + Sync {
    /// Claims `key` of `scope` (the caller) for a request whose `fingerprint` is given. A
    /// claim left pending longer than a request can take is taken over.
    async fn begin(&self, scope: &str, key: &str, fingerprint: &str, now: DateTime<Utc>) -> Result<KeyClaim, StoreError>;
    /// Keeps the response of the request that claimed `key`.
    async fn complete(&self, scope: &str, key: &str, fingerprint: &str, response: &StoredResponse) -> Result<(), StoreError>;
    /// Gives the claim up (the request failed in a way a retry may fix).
    async fn abandon(&self, scope: &str, key: &str, fingerprint: &str) -> Result<(), StoreError>;
}

/// How long a claimed key waits for its request's answer before another may take it (the
/// API function's timeout is 29 s).
pub const KEY_PENDING_SECS: i64 = 60;

/// How long a key and its response are kept.
pub const KEY_RETENTION_HOURS: i64 = 24;

// ---------------------------------------------------------------- timers

/// One-time wake-ups: the run is handed to the runner at a given time (a review's
/// deadline), so the deadline fires on time without anyone polling. The sweeper, which
/// also finds runs whose deadline passed, is the backstop if a wake-up is lost.
#[async_trait]
pub trait Timers: Send + Sync {
    async fn wake_at(&self, run: &RunId, at: DateTime<Utc>) -> Result<(), TimerError>;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimerError {
    /// A retry can succeed.
    #[error("timer service unavailable: {0}")]
    Unavailable(String),
    /// Refused; the message says what to fix.
    #[error("timer refused: {0}")]
    Rejected(String),
}

// ---------------------------------------------------------------- stored workflows

/// What became of a new version of a stored workflow.
#[derive(Debug, Clone, PartialEq)]
pub enum SaveOutcome {
    /// Written: the workflow's head as it now stands.
    Saved(crate::stored::StoredWorkflow),
    /// Another version landed first (a lost update): the workflow is at this version now,
    /// and nothing was written.
    Stale { current: u32 },
    /// No such workflow, or it was deleted.
    NotFound,
}

/// A position in an owner's list of workflows: the last one a page covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowCursor {
    pub updated_at: DateTime<Utc>,
    pub id: crate::ids::WorkflowId,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowPage {
    pub items: Vec<crate::stored::StoredWorkflow>,
    /// Where the next page starts; `None` when this page is the last.
    pub next: Option<WorkflowCursor>,
}

/// Stored workflows and their immutable versions (see [`crate::stored`]). A deleted
/// workflow is gone for every call here; the runs that ran it keep their snapshots.
#[async_trait]
pub trait WorkflowStore: Send + Sync {
    /// Stores a new workflow (at version 1) with its first version. Storing the same again
    /// succeeds (a retry whose reply was lost); another workflow with its id is `Rejected`.
    async fn create(&self, head: &crate::stored::StoredWorkflow, first: &crate::stored::WorkflowVersion) -> Result<(), StoreError>;
    /// The workflow's head and its version `version` (default: the latest); `None` if the
    /// workflow does not exist, was deleted, or has no such version.
    async fn get(
        &self,
        id: &crate::ids::WorkflowId,
        version: Option<u32>,
    ) -> Result<Option<(crate::stored::StoredWorkflow, crate::stored::WorkflowVersion)>, StoreError>;
    /// The workflow's head alone; `None` if it does not exist or was deleted.
    async fn head(&self, id: &crate::ids::WorkflowId) -> Result<Option<crate::stored::StoredWorkflow>, StoreError> {
        Ok(self.get(id, None).await?.map(|(head, _)| head))
    }
    /// Writes `next` (whose number must be `expected + 1`) as the workflow's latest
    /// version, named `name`, only if the workflow is still at version `expected`.
    async fn save_version(
        &self,
        id: &crate::ids::WorkflowId,
        expected: u32,
        name: &WorkflowName,
        next: &crate::stored::WorkflowVersion,
    ) -> Result<SaveOutcome, StoreError>;
    /// Deletes the workflow; `false` if there was none (or it was deleted already).
    async fn delete(&self, id: &crate::ids::WorkflowId, at: DateTime<Utc>) -> Result<bool, StoreError>;
    /// Replaces the workflow's visibility and shares (no new version); `false` if there is
    /// no such workflow.
    async fn set_access(&self, id: &crate::ids::WorkflowId, access: &crate::access::Access) -> Result<bool, StoreError>;
    /// The workflows any of `visible_to` is a grantee of ([`crate::stored::StoredWorkflow::grantees`]),
    /// most recently updated first, each once, deleted ones left out.
    async fn list(&self, visible_to: &[Principal], limit: u32, after: Option<&WorkflowCursor>) -> Result<WorkflowPage, StoreError>;
}

// ---------------------------------------------------------------- saved templates

/// A position in an owner's list of saved templates: the last one a page covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateCursor {
    pub created_at: DateTime<Utc>,
    pub id: crate::templates::TemplateId,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TemplatePage {
    pub items: Vec<crate::templates::SavedTemplate>,
    /// Where the next page starts; `None` when this page is the last.
    pub next: Option<TemplateCursor>,
}

/// Saved templates (see [`crate::templates`]). A template is written once and never
/// changed; it can be deleted.
#[async_trait]
pub trait TemplateStore: Send + Sync {
    /// Stores a new template. Storing the same again succeeds (a retry whose reply was
    /// lost); another template with its id is `Rejected`; one too large for the store is
    /// `TooLarge`.
    async fn save(&self, template: &crate::templates::SavedTemplate) -> Result<(), StoreError>;
    /// The template, if it exists.
    async fn get(&self, id: &crate::templates::TemplateId) -> Result<Option<crate::templates::SavedTemplate>, StoreError>;
    /// Deletes the template; `false` if there was none.
    async fn delete(&self, id: &crate::templates::TemplateId) -> Result<bool, StoreError>;
    /// The owner's templates, newest first.
    async fn list(&self, owner: &UserId, limit: u32, after: Option<&TemplateCursor>) -> Result<TemplatePage, StoreError>;
}

// ---------------------------------------------------------------- tenant limits

/// The counters and slot sets behind fair limits per tenant (see [`crate::quota`]), shared
/// by every API function and runner. Each call is one conditional write: two callers never
/// both pass on the same room.
#[async_trait]
pub trait TenantQuota: Send + Sync {
    /// Adds `amount` to `counter` if it then holds at most `limit`; `false`: refused, and
    /// nothing changed.
    async fn take(&self, counter: &crate::quota::Counter, amount: u64, limit: u64) -> Result<bool, StoreError>;
    /// Takes `amount` back from `counter` (what a reservation did not use). A counter that
    /// no longer exists (its window expired) stays gone.
    async fn give_back(&self, counter: &crate::quota::Counter, amount: u64) -> Result<(), StoreError>;
    /// What `counter` holds now (0 if it does not exist).
    async fn used(&self, counter: &crate::quota::Counter) -> Result<u64, StoreError>;
    /// Puts `run` in `slots` if it then holds at most `capacity` runs. A run already there
    /// is admitted again (a retried start) without counting twice.
    async fn occupy(&self, slots: &crate::quota::Slots, run: &RunId, capacity: u64) -> Result<crate::quota::Occupied, StoreError>;
    /// Takes `run` out of `slots`; whether it was there (a repeated end finds it gone).
    async fn vacate(&self, slots: &crate::quota::Slots, run: &RunId) -> Result<bool, StoreError>;
}
