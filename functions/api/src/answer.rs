//! Answers to input steps: `POST /runs/{id}/resume` with `{ "step", "values": {…} }` or
//! `{ "step", "text": "…" }`.
//!
//! A `values` answer is checked here, field by field, over the values kept from earlier
//! answers: complete, it is recorded and the run queued again (`202`); otherwise the valid
//! values are kept, the answer uses one of the step's attempts, and the caller hears which
//! fields and why (`422`). Free text is recorded unread and the run queued again (`202`):
//! the runner reads it with the step's `extract` model, a charged call. Every answer is
//! recorded conditionally on the step's state as it was checked, so of two answers at once
//! only the first counts; the other gets `409`.

use crate::AppState;
use crate::auth::Identity;
use crate::error::ApiError;
use axum::Json;
use axum::response::{IntoResponse, Response};
use chainrun_core::graph::{OnTimeout, StepKind, reviewer_name, validate_json};
use chainrun_core::ids::StepId;
use chainrun_core::input::{InputEnd, InputSpec, InputState, InputTurn, MAX_TEXT_CHARS};
use chainrun_core::ports::AnswerOutcome;
use chainrun_core::run::{Cause, ReviewWait, RunRecord, RunnerEvent, StepStatus};
use chainrun_core::wire::steering::{AnswerState, InputAccepted};
use chainrun_core::wire::views::RunLinks;
use http::StatusCode;
use serde_json::{Map, Value};
use tracing::{info, warn};

/// The most bytes one `values` answer may have as JSON: every answer is kept on the run,
/// whose record must fit one DynamoDB item.
pub const MAX_VALUES_BYTES: usize = 16 * 1024;

/// An answer to an input step, as the resume body gives it.
pub struct Answer {
    pub step: String,
    pub values: Option<Value>,
    pub text: Option<String>,
}

/// Records an answer to an input step that waits for one.
pub async fn answer_input(state: &AppState, identity: &Identity, run: RunRecord, answer: Answer) -> Result<Response, ApiError> {
    let Answer { step, values, text } = answer;
    let invalid = |detail: String| ApiError::bad_request("Invalid request body", detail);
    let given = match (values, text) {
        (Some(_), Some(_)) | (None, None) => return Err(invalid("an answer to an input step has either `values` or `text`".into())),
        (Some(Value::Object(values)), None) => Given::Values(values),
        (Some(_), None) => return Err(invalid("values: an object of field values".into())),
        (None, Some(text)) if text.trim().is_empty() => return Err(invalid("text: empty".into())),
        (None, Some(text)) if text.chars().count() > MAX_TEXT_CHARS => return Err(invalid(format!("text: at most {MAX_TEXT_CHARS} characters"))),
        (None, Some(text)) => Given::Text(text),
    };
    if let Given::Values(values) = &given
        && Value::Object(values.clone()).to_string().len() > MAX_VALUES_BYTES
    {
        return Err(invalid(format!("values: at most {MAX_VALUES_BYTES} bytes as JSON")));
    }
    let id = run.id.clone();
    // Who may answer: the step's `from` (default: the run's starter). Anyone else is told
    // there is no such step, as for a run they may not see.
    let no_step = || ApiError::NotFound(format!("run {id} has no input step {step:?} that you may answer"));
    let graph = validate_json(&run.definition, &state.models).map_err(|_| no_step())?;
    let spec = graph.steps().iter().find(|s| s.id.as_str() == step).and_then(|s| match &s.kind {
        StepKind::Input(spec) => Some(spec),
        _ => None,
    });
    let spec = spec.ok_or_else(no_step)?;
    let step_id = StepId::parse(&step).map_err(|_| no_step())?;
    let steps = state.store.get_steps(&id).await?;
    let record = steps.iter().find(|r| r.step_id == step_id);
    let wait: Option<ReviewWait> =
        record.filter(|r| r.status == StepStatus::Waiting).and_then(|r| r.detail.clone()).and_then(|d| serde_json::from_value(d).ok());
    let may_answer = |level: Option<u32>| identity.is_admin() || identity.principals().iter().any(|p| spec.answerers(&run.caller, level).contains(p));
    let current = run.inputs.get(&step_id).cloned().unwrap_or_default();
    let turn = InputTurn {
        by: identity.user.clone(),
        at: chrono::Utc::now(),
        values: match &given {
            Given::Values(v) => Some(v.clone()),
            Given::Text(_) => None,
        },
        text: match &given {
            Given::Text(t) => Some(t.clone()),
            Given::Values(_) => None,
        },
        extracted: None,
        read: false,
        accepted: Vec::new(),
        errors: Vec::new(),
    };
    // The same answer again (a retry, a double click) is answered as the first was.
    if let Some(last) = current.turns.last().filter(|last| last.by == turn.by && last.values == turn.values && last.text == turn.text) {
        if !may_answer(None) {
            return Err(no_step());
        }
        return answered(&id, &step_id, spec, &current, last);
    }
    if let Some(end) = current.end {
        if !may_answer(None) {
            return Err(no_step());
        }
        let what = match end {
            InputEnd::Complete => "already has its values",
            InputEnd::Exhausted => "used every answer it allows and failed",
            InputEnd::TimedOut => "passed its deadline without its values and failed",
        };
        return Err(ApiError::Conflict(format!("step {step} of run {id} {what}; it takes no more answers")));
    }
    // Waiting: those it names, and those its deadlines have handed it to so far.
    if !may_answer(Some(wait.as_ref().map_or(0, |w| w.level))) {
        return Err(no_step());
    }
    let status = record.map_or(StepStatus::Pending, |r| r.status);
    if status != StepStatus::Waiting {
        return Err(ApiError::Conflict(format!("step {step} of run {id} is not waiting for input (it is {})", status.as_str())));
    }
    if let Some(deadline) = wait.as_ref().and_then(|w| w.deadline).filter(|d| *d <= turn.at) {
        // Too late: the deadline decides. Hand the run over so it does so now.
        if let Err(e) = state.dispatcher.dispatch(&RunnerEvent::new(id.clone(), Cause::Sweep)).await {
            warn!(run_id = %id, error = %e, "dispatch failed; the sweeper will apply the deadline");
        }
        let what = match spec.timeout.as_ref().map(|(_, on_timeout)| on_timeout.at_level(wait.as_ref().map_or(0, |w| w.level)).0) {
            Some(OnTimeout::Escalate { to, .. }) => format!("it hands the step to {}", to.iter().map(reviewer_name).collect::<Vec<_>>().join(", ")),
            _ => "the step fails without its values (INPUT_TIMED_OUT)".to_owned(),
        };
        return Err(ApiError::Conflict(format!("step {step} of run {id}: its deadline passed at {deadline}, and {what}")));
    }
    if let Some(unread) = current.turns.last().filter(|t| !t.read) {
        return Err(ApiError::Conflict(format!(
            "step {step} of run {id} is still reading the text {} sent at {}; answer again once it asks (AWAITING_INPUT)",
            unread.by, unread.at
        )));
    }
    let next = match &given {
        Given::Text(_) if spec.extract.is_none() => {
            return Err(invalid(format!("text: step {step} has no `extract` model to read free text; send its `values`")));
        }
        Given::Text(_) => current.answered(turn, None, spec.max_attempts),
        Given::Values(values) => {
            let checked = spec.fields.check(&current.values, values);
            current.answered(turn, Some(checked), spec.max_attempts)
        }
    };
    // Queued again when the step ended or has text to read; an answer that leaves it
    // waiting changes nothing a runner would do.
    let requeue = next.end.is_some() || next.unread_text().is_some();
    match state.store.record_input(&id, &step_id, current.version, &next, requeue).await? {
        AnswerOutcome::Recorded { requeued } => {
            info!(run_id = %id, step_id = %step_id, user = %identity.user, answers = next.attempts(), end = ?next.end, requeued, "input step answered");
            if requeued && let Err(e) = state.dispatcher.dispatch(&RunnerEvent::new(id.clone(), Cause::Resume)).await {
                warn!(run_id = %id, error = %e, "dispatch failed; the sweeper will continue the run");
            }
        }
        AnswerOutcome::Stale(stored) => {
            let last = stored.turns.last().map(|t| format!(" (answer {} by {} at {})", stored.turns.len(), t.by, t.at)).unwrap_or_default();
            return Err(ApiError::Conflict(format!(
                "step {step} of run {id} changed while this answer was checked{last}; read the run and answer again"
            )));
        }
        AnswerOutcome::Finished(status) => {
            return Err(ApiError::Conflict(format!("run {id} has already ended ({}); its input steps are closed", status.as_str())));
        }
        AnswerOutcome::NotFound => return Err(ApiError::NotFound(format!("no run {id:?}"))),
    }
    let last = next.turns.last().unwrap_or_else(|| unreachable!("an answer was just recorded"));
    answered(&id, &step_id, spec, &next, last)
}

enum Given {
    Values(Map<String, Value>),
    Text(String),
}

/// The answer to a recorded answer `last`, the step's state now being `state`.
fn answered(id: &chainrun_core::ids::RunId, step: &StepId, spec: &InputSpec, state: &InputState, last: &InputTurn) -> Result<Response, ApiError> {
    let attempts_left = spec.max_attempts.saturating_sub(state.attempts());
    let complete = state.end == Some(InputEnd::Complete);
    if last.read && !complete && !last.errors.is_empty() {
        let detail = match state.end {
            Some(_) => format!(
                "step {step} of run {id}: the answer left {} field(s) without a valid value, and it was the last the step allows: the step fails (INPUT_INCOMPLETE)",
                last.errors.len()
            ),
            None => format!(
                "step {step} of run {id}: {} field(s) without a valid value; the valid ones are kept. {attempts_left} answer(s) left",
                last.errors.len()
            ),
        };
        return Err(ApiError::InvalidAnswer { detail, errors: last.errors.clone(), attempts_left });
    }
    let body = InputAccepted {
        run_id: id.clone(),
        step: step.clone(),
        state: if complete { AnswerState::Complete } else { AnswerState::Reading },
        values: state.values.clone(),
        attempts_left,
        links: RunLinks::of(id),
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}
