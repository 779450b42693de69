//! What the steering routes answer with their `202`: a control request recorded, a run
//! resumed, a review decided, an input step answered, a revision started. Typed here so
//! the OpenAPI document describes exactly what the handlers send.

use crate::ids::{RunId, StepId};
use crate::revision::RevisionKind;
use crate::run::{ControlRequest, Resumption, ReviewDecision, RunStatus};
use crate::wire::views::RunLinks;
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::{Map, Value};

/// `POST /runs/{id}/cancel` and `…/pause`: the request standing on the run.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ControlAccepted {
    pub run_id: RunId,
    pub status: RunStatus,
    pub control: ControlRequest,
    pub links: RunLinks,
}

/// `POST /runs/{id}/resume` of a paused run (or one waiting on its budget): queued again.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ResumeAccepted {
    pub run_id: RunId,
    pub status: RunStatus,
    pub resumed: Resumption,
    pub links: RunLinks,
}

/// `POST /runs/{id}/resume` with a review's decision: the decision that stands.
#[derive(Debug, Serialize, JsonSchema)]
pub struct DecisionAccepted {
    pub run_id: RunId,
    pub step: StepId,
    pub decision: ReviewDecision,
    pub links: RunLinks,
}

/// Whether an input step's answer is complete or its text is being read.
#[derive(Debug, Clone, Copy, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AnswerState {
    /// The values are the step's output.
    Complete,
    /// The step's `extract` model reads the text; the step then says what it still asks for.
    Reading,
}

/// `POST /runs/{id}/resume` with an input step's values or text.
#[derive(Debug, Serialize, JsonSchema)]
pub struct InputAccepted {
    pub run_id: RunId,
    pub step: StepId,
    pub state: AnswerState,
    /// The values kept so far.
    pub values: Map<String, Value>,
    pub attempts_left: u32,
    pub links: RunLinks,
}

/// The three answers of `POST /runs/{id}/resume`, for the API's description.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum ResumeAnswer {
    Resumed(ResumeAccepted),
    Decided(DecisionAccepted),
    Answered(InputAccepted),
}

/// Where a revision's run is, and the revision before it.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RevisionLinks {
    pub run: String,
    pub events: String,
    pub previous: String,
}

/// `POST /runs/{id}/steps/{step}/retry` and `PUT …/output`: the revision started.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RevisionAccepted {
    pub run_id: RunId,
    pub revision: u32,
    pub kind: RevisionKind,
    pub step: StepId,
    /// The steps that run again.
    pub rerun: Vec<StepId>,
    pub links: RevisionLinks,
}
