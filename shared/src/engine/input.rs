//! Input steps: the run asks a person for named values and waits, turn after turn, until
//! it has them all, the step's answers run out, or its deadline passes.
//!
//! The answers live on the run (`RunRecord::inputs`), written with conditional writes by
//! the API (an answer) and by the runner (free text read, a deadline applied), so any
//! runner, any time later, continues from them. A `values` answer is checked by the API;
//! free text is recorded unread and read here, by a model call admitted and charged like
//! any other (its cost stays on the step's checkpoint while it waits again). A step without
//! its values checkpoints itself `WAITING` with a step-level `AWAITING_INPUT` naming the
//! fields still missing; the engine parks the run when nothing else can run.

use super::EngineError;
use super::running::{Hold, Running};
use super::step::{Scope, StepContext, Work, short};
use crate::codes::ErrorCode;
use crate::durability::Clock;
use crate::graph::{OnTimeout, reviewer_name};
use crate::ids::{RunId, StepId, UserId};
use crate::input::{InputEnd, InputSpec, InputState, still_asked};
use crate::ports::{AnswerOutcome, RunStore, StoreError};
use crate::run::{ReviewWait, StepRecord, StepStatus, WaitKind, Waiting};
use crate::template::{Resolve, Slot};
use crate::wire::events::{AwaitingInput, EventBody};
use crate::wire::{InputAsked, InputWait, StepDetail};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use tracing::info;

/// What a run's input steps continue from.
pub struct Collecting {
    /// Their states as the run was claimed, by step.
    pub states: BTreeMap<StepId, InputState>,
    /// Who answers a step that names nobody: the run's starter.
    pub starter: UserId,
    /// Deadlines are wall-clock times.
    pub clock: Arc<dyn Clock>,
    /// Where reading free text and applying a deadline are recorded, like answers.
    pub store: Arc<dyn RunStore>,
    pub run_id: RunId,
}

/// What the extraction prompt reads: the schema of the fields, the question, the answer.
#[derive(Serialize)]
struct ExtractScope<'a> {
    fields: String,
    ask: &'a str,
    text: &'a str,
}

impl Resolve for ExtractScope<'_> {
    fn resolve(&self, path: &[&str]) -> Option<Slot<'_>> {
        match path {
            ["fields"] => Some(Slot::Text(&self.fields)),
            ["ask"] => Some(Slot::Text(self.ask)),
            ["text"] => Some(Slot::Text(self.text)),
            _ => None,
        }
    }
}

impl Scope for ExtractScope<'_> {}

fn after_chrono(after: std::time::Duration) -> chrono::Duration {
    chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX)
}

impl StepContext {
    /// An input step: its work once it has its values (or cannot get them), or (`Err`) its
    /// deadline while it waits. `waiting`: where it stood when an earlier invocation left it
    /// waiting.
    pub async fn input(
        &self,
        id: &StepId,
        spec: &InputSpec,
        scope: &impl Scope,
        waiting: Option<ReviewWait>,
        running: &mut Running,
    ) -> Result<Result<Work, Option<DateTime<Utc>>>, EngineError> {
        let asked = match spec.ask.render(scope) {
            Ok(text) => text,
            Err(e) => return Ok(Ok(Work::failed(ErrorCode::TemplateError, format!("ask: {e}")))),
        };
        let mut state = self.collecting.states.get(id).cloned().unwrap_or_default();
        // What this invocation's extraction calls were charged.
        let mut spent = Work::done(String::new(), Value::Null);
        // Whether it must announce what it asks for now (free text was read since it last did).
        let mut changed = false;
        loop {
            if let Some(end) = state.end {
                let mut work = ended(spec, &state, end);
                work.add_spend(spent.usage, spent.cost, spent.calls);
                work.lost.add(spent.lost);
                info!(step_id = %id, ?end, answers = state.attempts(), "input step ended");
                return Ok(Ok(work));
            }
            if let Some(text) = state.unread_text().map(str::to_owned) {
                let read = match &spec.extract {
                    // The API takes free text only for a step that reads it.
                    None => Err("the step takes `values` only".to_owned()),
                    Some(extract) => {
                        let scope = ExtractScope { fields: spec.fields.document().to_string(), ask: &asked, text: &text };
                        let mut call = self.run_llm(id, &extract.call, &scope, None, Hold::Step(running)).await?;
                        if matches!(call.detail, Some(StepDetail::Refused(_))) {
                            // Refused by the budget: the step fails (or, when the run pauses for
                            // its budget, reads the text again once it is raised).
                            call.add_spend(spent.usage, spent.cost, spent.calls);
                            return Ok(Ok(call));
                        }
                        spent.add_spend(call.usage, call.cost, call.calls);
                        spent.lost.add(call.lost);
                        match call.output {
                            Ok((_, Value::Object(values))) => Ok(values),
                            Ok((_, other)) => Err(format!("the model read {} rather than an object of values", short(&other))),
                            Err(e) => Err(e.message),
                        }
                    }
                };
                info!(step_id = %id, read = read.is_ok(), "input step read a free-text answer");
                let next = state.read(&spec.fields, read, spec.max_attempts);
                state = self.record_input_state(id, &state, next).await?;
                changed = true;
                continue;
            }
            let now = self.collecting.clock.now();
            let (level, deadline) = match &waiting {
                None => (0, spec.timeout.as_ref().map(|(after, _)| now + after_chrono(*after))),
                Some(wait) => match (wait.deadline, &spec.timeout) {
                    (Some(deadline), Some((_, on_timeout))) if now >= deadline => match on_timeout.at_level(wait.level).0 {
                        OnTimeout::Escalate { timeout, .. } => {
                            info!(step_id = %id, level = wait.level + 1, "input deadline passed: escalated");
                            (wait.level + 1, Some(now + after_chrono(*timeout)))
                        }
                        // Validation refuses a deadline that approves an input step.
                        _ => {
                            info!(step_id = %id, %deadline, "input deadline passed without its values");
                            let mut next = state.clone();
                            next.version += 1;
                            next.end = Some(InputEnd::TimedOut);
                            // An answer that got in first stands instead.
                            state = self.record_input_state(id, &state, next).await?;
                            continue;
                        }
                    },
                    (deadline, _) if !changed => return Ok(Err(deadline)),
                    (deadline, _) => (wait.level, deadline),
                },
            };
            self.wait_for_input(id, spec, &asked, &state, ReviewWait { level, deadline, deciders: Vec::new() }, &spent, running).await?;
            return Ok(Err(deadline));
        }
    }

    /// Records `next` over `state` (the version it was read at) and returns what is stored
    /// now: `next`, or the state an answer that got in first left.
    async fn record_input_state(&self, id: &StepId, state: &InputState, next: InputState) -> Result<InputState, EngineError> {
        let c = &self.collecting;
        match c.store.record_input(&c.run_id, id, state.version, &next, false).await? {
            AnswerOutcome::Recorded { .. } => Ok(next),
            AnswerOutcome::Stale(current) => Ok(current),
            // Only the runner holding the run ends it: this one no longer does.
            AnswerOutcome::Finished(_) | AnswerOutcome::NotFound => Err(StoreError::LeaseLost(c.run_id.clone()).into()),
        }
    }

    /// Checkpoints the step `WAITING` (what it asks as its output, where it stands as its
    /// detail, what its extraction calls were charged so far) with its `AWAITING_INPUT`.
    #[allow(clippy::too_many_arguments)]
    async fn wait_for_input(
        &self,
        id: &StepId,
        spec: &InputSpec,
        asked: &str,
        state: &InputState,
        mut wait: ReviewWait,
        spent: &Work,
        running: &Running,
    ) -> Result<(), EngineError> {
        let now = Utc::now();
        let mut record = StepRecord::settled(id.clone(), StepStatus::Waiting, None, now);
        (record.started_at, record.finished_at) = (Some(now), None);
        record.model = spec.extract.as_ref().map(|e| e.model.clone());
        (record.text, record.output) = (Some(asked.to_owned()), Some(Value::String(asked.to_owned())));
        let carried = running.carried();
        record.usage = carried.usage.plus(&spent.usage);
        record.cost = carried.cost.saturating_add(spent.cost);
        record.calls = carried.calls + spent.calls;
        record.lost = carried.lost;
        record.lost.add(spent.lost);
        record.attempts = state.attempts();
        wait.deciders = spec.answerers(&self.collecting.starter, Some(wait.level)).iter().map(reviewer_name).collect();
        let (missing, refused) = still_asked(&spec.fields, state);
        let input = InputAsked { missing, refused, attempts_left: spec.max_attempts.saturating_sub(state.attempts()) };
        record.detail = Some(StepDetail::InputWaiting(InputWait { wait: wait.clone(), asked: input.clone() }).to_value());
        let mut reason = format!("asks for {}", if input.missing.is_empty() { "valid values".to_owned() } else { input.missing.join(", ") });
        if wait.level > 0 {
            reason.push_str(&format!("; escalated ({} of its deadlines passed)", wait.level));
        }
        let waiting = Waiting { kind: WaitKind::Input, by: None, since: now, reason: Some(reason), steps: vec![id.clone()], deadline: wait.deadline };
        let body = EventBody::AwaitingInput(AwaitingInput {
            waiting,
            show: Some(asked.to_owned()),
            reviewers: wait.deciders,
            settled_steps: None,
            step_count: None,
            input: Some(input),
        });
        self.journal.emit_with(body, Some(id), None, Some(&record), |_| {}).await?;
        info!(step_id = %id, level = wait.level, deadline = ?wait.deadline, answers = state.attempts(), "input step waiting for its values");
        Ok(())
    }
}

/// The work of an input step that ended: its values, or why it has none.
fn ended(spec: &InputSpec, state: &InputState, end: InputEnd) -> Work {
    let missing = || {
        let (missing, refused) = still_asked(&spec.fields, state);
        let mut why: Vec<String> = missing.iter().map(|f| format!("{f}: required")).collect();
        why.extend(refused.iter().map(|e| format!("{}: {}", e.field, e.message)));
        why.join("; ")
    };
    let mut work = match end {
        InputEnd::Complete => {
            let values = Value::Object(state.values.clone());
            Work::done(values.to_string(), values)
        }
        InputEnd::Exhausted => {
            Work::failed(ErrorCode::InputIncomplete, format!("{} answers did not give every value ({})", state.attempts(), missing()))
        }
        InputEnd::TimedOut => Work::failed(ErrorCode::InputTimedOut, format!("its deadline passed without every value ({})", missing())),
    };
    work.attempts = state.attempts().max(1);
    work.detail = Some(StepDetail::Input(state.clone()));
    work
}
