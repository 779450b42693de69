//! Steering a finished run again: `POST /runs/{id}/steps/{step}/retry` re-runs a step and
//! exactly its dependents, `PUT /runs/{id}/steps/{step}/output` sets a step's output by
//! hand and re-runs exactly its dependents. Each starts the run's next revision (see
//! `chainrun_core::revision`): nothing of the earlier ones is overwritten.

use super::{AppState, MAX_REASON_CHARS, budget_raise, controlled_run, parse_body};
use crate::auth::Identity;
use crate::error::ApiError;
use axum::Json;
use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use chainrun_core::graph::{StepKind, validate_json};
use chainrun_core::ids::StepId;
use chainrun_core::limits::MAX_OUTPUT_BYTES;
use chainrun_core::output::json_len;
use chainrun_core::ports::RevisionOutcome;
use chainrun_core::revision::{MAX_REVISIONS, Overridden, Revision, RevisionEnd, RevisionKind, RevisionRefused, rerun_set};
use chainrun_core::run::{Cause, RunRecord, RunnerEvent, StepRecord, StepStatus};
use chainrun_core::wire::StepDetail;
use chainrun_core::wire::steering::{RevisionAccepted, RevisionLinks};
use http::StatusCode;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use tracing::{info, warn};

/// `POST /runs/{id}/steps/{step}/retry`, body optional.
#[derive(Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetryBody {
    comment: Option<String>,
    /// A larger budget for the run (its budget covers every revision), raised like a resume's.
    #[schemars(with = "Option<chainrun_core::workflow::Budget>")]
    budget: Option<Value>,
    /// The revision the caller saw: a retry of an older one is refused (`409`), so two
    /// people steering the same run cannot both start a revision unknowingly.
    revision: Option<u32>,
}

/// `PUT /runs/{id}/steps/{step}/output`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct OverrideBody {
    /// The step's new output (`steps.<id>.output`): any JSON.
    output: Value,
    /// Its text (`steps.<id>.text`); by default the output itself if it is a string, else
    /// the output as JSON.
    text: Option<String>,
    comment: Option<String>,
    revision: Option<u32>,
}

/// What a new revision is asked to do.
struct Steer {
    kind: RevisionKind,
    step: String,
    comment: Option<String>,
    budget: Option<Value>,
    seen: Option<u32>,
    /// An override's output and text.
    set: Option<(Value, String)>,
}

pub(super) async fn retry_step(state: &AppState, identity: &Identity, id: &str, step: String, body: &Bytes) -> Result<Response, ApiError> {
    let request: RetryBody = if body.iter().all(u8::is_ascii_whitespace) { RetryBody::default() } else { parse_body(body)? };
    let steer = Steer { kind: RevisionKind::Retry, step, comment: request.comment, budget: request.budget, seen: request.revision, set: None };
    start(state, identity, id, steer).await
}

pub(super) async fn override_output(state: &AppState, identity: &Identity, id: &str, step: String, body: &Bytes) -> Result<Response, ApiError> {
    let request: OverrideBody = parse_body(body)?;
    if json_len(&request.output) > MAX_OUTPUT_BYTES {
        return Err(ApiError::bad_request("Invalid request body", format!("output: a step's output may have at most {MAX_OUTPUT_BYTES} bytes")));
    }
    let text = match (request.text, &request.output) {
        (Some(text), _) => text,
        (None, Value::String(s)) => s.clone(),
        (None, other) => other.to_string(),
    };
    let set = Some((request.output, text));
    let steer = Steer { kind: RevisionKind::Override, step, comment: request.comment, budget: None, seen: request.revision, set };
    start(state, identity, id, steer).await
}

/// Starts the run's next revision as `steer` asks: `202`; `404` for a run the caller may
/// not see or a step it does not have; `409` when the run has not ended, its end is not
/// announced yet, or another revision started first.
async fn start(state: &AppState, identity: &Identity, id: &str, steer: Steer) -> Result<Response, ApiError> {
    if steer.comment.as_ref().is_some_and(|c| c.chars().count() > MAX_REASON_CHARS) {
        return Err(ApiError::bad_request("Invalid request body", format!("comment: at most {MAX_REASON_CHARS} characters")));
    }
    let what = if steer.kind == RevisionKind::Retry { "retrying a step" } else { "overriding a step's output" };
    let run = controlled_run(state, identity, id, what).await?;
    let id = run.id.clone();
    let graph =
        validate_json(&run.definition, &state.models).map_err(|e| ApiError::Conflict(format!("run {id}'s definition no longer validates: {e}")))?;
    let no_step = || ApiError::NotFound(format!("run {id} has no step {:?}", steer.step));
    let step = StepId::parse(&steer.step).map_err(|_| no_step())?;
    let spec = graph.steps().iter().find(|s| s.id == step).ok_or_else(no_step)?;
    if let Some(seen) = steer.seen.filter(|seen| *seen != run.revision) {
        return Err(ApiError::Conflict(format!("run {id} is at revision {}, not {seen}: look at it again before steering it", run.revision)));
    }
    if !run.status.is_terminal() {
        let verb = if steer.kind == RevisionKind::Retry { "retried" } else { "overridden" };
        return Err(ApiError::Conflict(format!(
            "run {id} is {}: a step can be {verb} once the run has ended (cancel it first)",
            run.status.as_str()
        )));
    }
    if run.revision >= MAX_REVISIONS {
        return Err(ApiError::Conflict(format!("run {id}: {}", RevisionRefused::TooMany)));
    }
    if steer.kind == RevisionKind::Override && matches!(spec.kind, StepKind::Router(_)) {
        return Err(ApiError::bad_request("Invalid request body", format!("{}", RevisionRefused::NotOverridable(step, "router"))));
    }
    announced(state, &run).await?;
    let records = run.records_at(state.store.get_steps(&id).await?, run.revision);
    let rerun = rerun_set(&graph, &records, steer.kind, &step).map_err(|_| no_step())?;
    let at = chrono::Utc::now();
    let budget = steer.budget.map(|raw| budget_raise(identity, &run, raw, at)).transpose()?;
    let next = run.revision + 1;
    let revision = Revision {
        revision: next,
        kind: steer.kind,
        step: step.clone(),
        by: identity.user.clone(),
        at,
        comment: steer.comment.clone(),
        rerun,
        previous: RevisionEnd { status: run.status, finished_at: run.finished_at, error: run.error.clone(), totals: run.totals },
        budget,
    };
    let overridden = steer.set.map(|(output, text)| {
        let detail =
            Overridden { overridden_by: identity.user.clone(), at, comment: steer.comment, replaces_revision: run.revision_of(&step, run.revision) };
        let mut record = StepRecord::settled(step.clone(), StepStatus::Completed, None, at);
        (record.output, record.text, record.started_at, record.revision) = (Some(output), Some(text), Some(at), next);
        record.detail = Some(StepDetail::Overridden(detail).to_value());
        record
    });
    // A revision runs the run again: it counts as a start of the run's tenant and takes a
    // concurrency slot (given back when the revision ends), or is refused with `429`.
    let admitted = crate::limits::admit_start(state, &run).await?;
    let outcome = state.store.start_revision(&id, &revision, overridden.as_ref()).await;
    if !matches!(outcome, Ok(RevisionOutcome::Started)) {
        admitted.abandon(state).await;
    }
    match outcome? {
        RevisionOutcome::Started => {}
        RevisionOutcome::NotFinished(status) => {
            return Err(ApiError::Conflict(format!("run {id} is {}: it can be steered again once it has ended", status.as_str())));
        }
        RevisionOutcome::Moved(now) => {
            return Err(ApiError::Conflict(format!("run {id} is at revision {now} now: another revision started first")));
        }
        RevisionOutcome::NotFound => return Err(ApiError::NotFound(format!("no run {id:?}"))),
    }
    info!(run_id = %id, revision = next, kind = ?revision.kind, step_id = %step, rerun = revision.rerun.len(), user = %identity.user, "revision started");
    if let Err(e) = state.dispatcher.dispatch(&RunnerEvent::new(id.clone(), Cause::Revision)).await {
        warn!(run_id = %id, error = %e, "dispatch failed; the sweeper will run the revision");
    }
    let links =
        RevisionLinks { run: format!("/runs/{id}"), events: format!("/runs/{id}/events"), previous: format!("/runs/{id}?revision={}", run.revision) };
    let body = RevisionAccepted { run_id: id, revision: next, kind: revision.kind, step, rerun: revision.rerun, links };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// `409` until the run's end is in its log: the runner stores a run's end before it
/// announces it, and a revision's events must follow its predecessor's end.
async fn announced(state: &AppState, run: &RunRecord) -> Result<(), ApiError> {
    let Some(feed) = run.steady_feed() else { return Ok(()) };
    let row = crate::live_row(state, feed, &run.id).await?;
    match row {
        Some(row) if row.status.is_terminal() => Ok(()),
        _ => Err(ApiError::Conflict(format!("run {} has ended, but its end is still being recorded: try again in a moment", run.id))),
    }
}
