//! What each progress event's `data` holds, per event type.
//!
//! The engine builds an [`EventBody`]; the journal stores its type and data in the run's
//! event log. The published event schema (`schemas/event.schema.json`) is generated from
//! [`PublishedEvent`], which is an event as `GET /runs/{id}/events` returns it.

use super::money::{Cost, Money};
use super::{StepDetail, TotalsView, UsageView};
use crate::codes::ErrorCode;
use crate::ids::{ModelId, RunId, StepId, UserId, WorkflowName};
use crate::run::{Cause, ErrorInfo, EventType, Takeover};
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::Value;

/// An event's type with its data. Serialized adjacently tagged, as the event log and the
/// API show it: `"type": "STEP_COMPLETED", "data": { … }`.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(tag = "type", content = "data", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventBody {
    RunStarted(RunStarted),
    RunResumed(RunResumed),
    RunSuspended(RunSuspended),
    StepStarted(StepStarted),
    Streaming(Streaming),
    MapProgress(MapProgress),
    BatchJob(BatchJob),
    StepRetrying(StepRetrying),
    StepSkipped(StepSkipped),
    AwaitingInput(AwaitingInput),
    StepCompleted(StepCompleted),
    StepFailed(StepFailed),
    StepCancelled(StepCancelled),
    RunCompleted(RunCompleted),
    RunFailed(RunFailed),
    RunCancelled(RunCancelled),
    RevisionStarted(RevisionStarted),
    StepOverridden(StepOverridden),
}

impl EventBody {
    pub fn kind(&self) -> EventType {
        match self {
            EventBody::RunStarted(_) => EventType::RunStarted,
            EventBody::RunResumed(_) => EventType::RunResumed,
            EventBody::RunSuspended(_) => EventType::RunSuspended,
            EventBody::StepStarted(_) => EventType::StepStarted,
            EventBody::Streaming(_) => EventType::Streaming,
            EventBody::MapProgress(_) => EventType::MapProgress,
            EventBody::BatchJob(_) => EventType::BatchJob,
            EventBody::StepRetrying(_) => EventType::StepRetrying,
            EventBody::StepSkipped(_) => EventType::StepSkipped,
            EventBody::AwaitingInput(_) => EventType::AwaitingInput,
            EventBody::StepCompleted(_) => EventType::StepCompleted,
            EventBody::StepFailed(_) => EventType::StepFailed,
            EventBody::StepCancelled(_) => EventType::StepCancelled,
            EventBody::RunCompleted(_) => EventType::RunCompleted,
            EventBody::RunFailed(_) => EventType::RunFailed,
            EventBody::RunCancelled(_) => EventType::RunCancelled,
            EventBody::RevisionStarted(_) => EventType::RevisionStarted,
            EventBody::StepOverridden(_) => EventType::StepOverridden,
        }
    }

    /// The `data` object as it is stored.
    pub fn data(&self) -> Value {
        let data = match self {
            EventBody::RunStarted(d) => serde_json::to_value(d),
            EventBody::RunResumed(d) => serde_json::to_value(d),
            EventBody::RunSuspended(d) => serde_json::to_value(d),
            EventBody::StepStarted(d) => serde_json::to_value(d),
            EventBody::Streaming(d) => serde_json::to_value(d),
            EventBody::MapProgress(d) => serde_json::to_value(d),
            EventBody::BatchJob(d) => serde_json::to_value(d),
            EventBody::StepRetrying(d) => serde_json::to_value(d),
            EventBody::StepSkipped(d) => serde_json::to_value(d),
            EventBody::AwaitingInput(d) => serde_json::to_value(d),
            EventBody::StepCompleted(d) => serde_json::to_value(d),
            EventBody::StepFailed(d) => serde_json::to_value(d),
            EventBody::StepCancelled(d) => serde_json::to_value(d),
            EventBody::RunCompleted(d) => serde_json::to_value(d),
            EventBody::RunFailed(d) => serde_json::to_value(d),
            EventBody::RunCancelled(d) => serde_json::to_value(d),
            EventBody::RevisionStarted(d) => serde_json::to_value(d),
            EventBody::StepOverridden(d) => serde_json::to_value(d),
        };
        // These shapes have string keys and JSON values only: serializing cannot fail.
        data.unwrap_or(Value::Null)
    }
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RunStarted {
    pub workflow: WorkflowName,
    /// How many steps the workflow has.
    pub steps: usize,
}

/// A runner picked the run up again: after a suspension, a takeover, or a lost dispatch.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RunResumed {
    /// Who handed the run over: `continue` (the runner itself, after suspending), `sweep`
    /// (the sweeper), `dead_letter`, `resume` (a person, after a pause), `control`, or
    /// `start` (a redelivery of the first dispatch).
    pub cause: Cause,
    /// Steps already settled, which do not run again.
    pub settled_steps: usize,
    /// Set when the previous runner stopped renewing its lease (it crashed, timed out or
    /// stalled) and this one took the run over.
    pub takeover: Option<Takeover>,
    /// Takeovers so far, this one included.
    pub takeovers: usize,
    /// Who resumed the run (`cause: resume`), when a person did…
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<UserId>,
    /// …and what they did: `resumed the paused run`, `raised the budget`, `decided approve
    /// on review check`, `answered input account`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub what: Option<String>,
}

/// Something waits for a person. With a `step_id`: a review step waits for its decision
/// (`show` is what is to be reviewed, `reviewers` who may decide), or an input step for its
/// values (`show` is what it asks, `reviewers` who may answer, `missing` the fields still
/// without a value); other branches of the
/// run go on. Without: the run itself waits, holding no runner, until
/// `POST /runs/{id}/resume` (or the decisions it waits for).
#[derive(Debug, Serialize, JsonSchema)]
pub struct AwaitingInput {
    /// What it waits for (`paused`, `review`), who asked, and why.
    #[serde(flatten)]
    pub waiting: crate::run::Waiting,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show: Option<String>,
    /// `user:<id>` / `group:<name>`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reviewers: Vec<String>,
    /// Steps settled so far, of the run's `step_count` steps (the run-level event). Not
    /// `steps`: that is the waiting steps' ids, from `waiting`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settled_steps: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_count: Option<usize>,
    /// An input step: the fields it still asks for, what its last answer gave that was
    /// refused, and how many answers it still takes.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub input: Option<super::InputAsked>,
}

/// The invocation's deadline came near: settled steps are checkpointed and the run is
/// handed to a fresh invocation (`RUN_RESUMED` follows).
#[derive(Debug, Serialize, JsonSchema)]
pub struct RunSuspended {
    /// Steps settled so far, of all.
    pub settled_steps: usize,
    pub steps: usize,
}

/// A step that will not run because the run ended first (a required step failed, or the run
/// failed or was cancelled).
#[derive(Debug, Serialize, JsonSchema)]
pub struct StepCancelled {
    pub reason: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct StepStarted {
    /// The model an `llm` step (or a map of `llm` items) calls; null otherwise.
    pub model: Option<ModelId>,
}

/// Text a streamed step has produced since the last `STREAMING` event.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Streaming {
    pub delta: String,
    /// Characters streamed so far in this attempt, this delta included.
    pub chars: usize,
}

/// How far a map step is: sent when it starts (or resumes) and then as its items settle, at
/// most about once a second (the cadence of streamed text), so a client can draw a bar.
/// The last items' settling is told by the step's own `STEP_COMPLETED` / `STEP_FAILED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
pub struct MapProgress {
    /// Items settled so far (completed or failed), those reused from checkpoints included.
    pub done: usize,
    /// Of `done`, the items that failed.
    pub failed: usize,
    /// Items the map runs over.
    pub total: usize,
}

/// A map step running its items as one batch inference job (`map.mode: batch`): sent when
/// the job is submitted, when a poll finds its status changed, and when its answers are
/// read. Meanwhile the run waits (`waiting.kind: batch`) holding no runner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct BatchJob {
    /// The job's id at the model service (an ARN on Bedrock).
    pub job: String,
    /// As the service says it: `Submitted`, `Validating`, `Scheduled`, `InProgress`,
    /// `Completed`, `PartiallyCompleted`, `Failed`, `Stopped`, `Expired`.
    pub status: String,
    /// Items sent in the job.
    pub records: usize,
    /// The service's message on an ended job (why it failed, for example).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the job is asked about next, while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_poll_at: Option<DateTime<Utc>>,
    /// Once its answers are read: records answered, at the batch price.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answered: Option<usize>,
    /// Once its answers are read: items the job did not answer (or answered unusably),
    /// run again as ordinary calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub online: Option<usize>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct StepRetrying {
    /// The failed attempt's error code.
    pub reason: ErrorCode,
    pub message: String,
    /// How long the step waits before its next attempt.
    pub delay_ms: u64,
    /// The map item retrying, inside a map.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<usize>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct StepSkipped {
    /// Why the step's join could not be met (`not chosen by router route`, `dependency a is failed`).
    pub reason: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct StepCompleted {
    pub model: Option<ModelId>,
    #[serde(flatten)]
    pub tokens: UsageView,
    #[serde(flatten)]
    pub cost: Money<Cost>,
    pub latency_ms: u64,
    pub attempts: u32,
    pub detail: Option<StepDetail>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct StepFailed {
    pub error: Option<ErrorInfo>,
    pub attempts: u32,
    /// What the step's calls were charged before it failed.
    #[serde(flatten)]
    pub cost: Money<Cost>,
    pub detail: Option<StepDetail>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RunCompleted {
    /// The run's output, when it has at most 64 KiB as JSON; otherwise `null`, and
    /// `output_ref` says where to read it.
    pub output: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_ref: Option<super::DocumentRef>,
    pub totals: TotalsView,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RunFailed {
    pub error: Option<ErrorInfo>,
    pub totals: TotalsView,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RunCancelled {
    /// Who cancelled the run, and why if they said.
    pub by: Option<UserId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub totals: TotalsView,
}

/// A finished run runs again as a new revision (a step retried or overridden): `rerun`
/// are the steps it runs again; every other step keeps its result. Its events carry its
/// `revision`; the events before it stay in the log.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RevisionStarted {
    pub revision: u32,
    pub kind: crate::revision::RevisionKind,
    pub step: StepId,
    pub by: UserId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    pub rerun: Vec<StepId>,
    /// How the revision before ended, and the run's totals by then.
    pub previous_status: crate::run::RunStatus,
    pub previous_totals: TotalsView,
}

/// A step's output was set by hand (`PUT /runs/{id}/steps/{step}/output`); its
/// dependents run again.
#[derive(Debug, Serialize, JsonSchema)]
pub struct StepOverridden {
    pub by: UserId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The output set, when it has at most 64 KiB as JSON; otherwise `output_ref` says
    /// where to read it.
    pub output: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_ref: Option<super::DocumentRef>,
    /// The revision whose output it replaces.
    pub replaces_revision: u32,
}

/// An event as the API returns it; the published event schema describes this.
#[derive(Debug, Serialize, JsonSchema)]
#[schemars(title = "chainrun progress event")]
pub struct PublishedEvent {
    pub run_id: RunId,
    /// Gap-free and strictly increasing per run, from 1.
    pub seq: u64,
    pub at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_id: Option<StepId>,
    /// The step's attempt (1-based) the event belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The run's revision the event belongs to (absent: 0, the run as started).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<u32>,
    #[serde(flatten)]
    pub body: EventBody,
}

/// The published JSON Schema of a progress event.
pub fn schema_json() -> String {
    let schema = schemars::schema_for!(PublishedEvent);
    // Serializing a schema (plain JSON values) cannot fail.
    serde_json::to_string_pretty(&schema).unwrap_or_default()
}
