//! Review steps: a person approves, rejects or edits what the step shows.
//!
//! A review without a decision checkpoints itself `WAITING` (what it shows as its output,
//! so the API can show it too) together with a step-level `AWAITING_INPUT` event, once.
//! The run's other branches go on; when nothing else can run, the engine parks the run
//! (`AWAITING_INPUT`, holding no runner). A decision (`POST /runs/{id}/resume` with the
//! step) is recorded on the run and queues it again; the next runner finds it here.

use super::EngineError;
use super::running::Running;
use super::step::{Scope, StepContext, Work};
use crate::codes::ErrorCode;
use crate::durability::Clock;
use crate::graph::{OnTimeout, ReviewSpec, reviewer_name};
use crate::ids::{RunId, StepId, UserId};
use crate::ports::{DecideOutcome, RunStore};
use crate::run::{ReviewDecision, ReviewWait, StepRecord, StepStatus, Verdict, WaitKind, Waiting};
use crate::wire::StepDetail;
use crate::wire::events::{AwaitingInput, EventBody};
use chrono::DateTime;
use chrono::Utc;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use tracing::info;

/// What a run's review steps are decided by.
pub struct Reviews {
    /// Recorded decisions, by step.
    pub decisions: BTreeMap<StepId, ReviewDecision>,
    /// The run option `auto_approve`: every review is approved at once.
    pub auto_approve: bool,
    /// Who decides a review that names no reviewers: the run's starter.
    pub starter: UserId,
    /// Deadlines are wall-clock times.
    pub clock: Arc<dyn Clock>,
    /// Where a deadline's decision is recorded, like a reviewer's.
    pub store: Arc<dyn RunStore>,
    pub run_id: RunId,
}

impl Reviews {
    /// The decision for `step`: recorded, or the run's automatic approval.
    fn decision(&self, step: &StepId) -> Option<ReviewDecision> {
        self.decisions.get(step).cloned().or_else(|| {
            self.auto_approve.then(|| ReviewDecision {
                decision: Verdict::Approve,
                output: None,
                comment: Some("approved by the run option auto_approve".into()),
                by: UserId::parse(AUTO_APPROVE).unwrap_or_else(|_| unreachable!("{AUTO_APPROVE} is a valid user id")),
                at: Utc::now(),
            })
        })
    }

    /// Where a review waits after `level` escalations, until `deadline`.
    fn wait(&self, spec: &ReviewSpec, level: u32, deadline: Option<DateTime<Utc>>) -> ReviewWait {
        ReviewWait { level, deadline, deciders: spec.deciders(&self.starter, Some(level)).iter().map(reviewer_name).collect() }
    }
}

/// Who a deadline's decision is recorded as.
pub const DEADLINE: &str = "deadline";

/// Who an automatic approval is recorded as.
pub const AUTO_APPROVE: &str = "auto_approve";

fn after_chrono(after: std::time::Duration) -> chrono::Duration {
    chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX)
}

impl StepContext {
    /// A review step: its work once decided, or (`Err`) its deadline while it waits.
    /// `waiting`: where it stood when an earlier invocation left it waiting.
    pub async fn review(
        &self,
        id: &StepId,
        spec: &ReviewSpec,
        scope: &impl Scope,
        waiting: Option<ReviewWait>,
        running: &mut Running,
    ) -> Result<Result<Work, Option<DateTime<Utc>>>, EngineError> {
        let shown = match spec.show.render(scope) {
            Ok(text) => text,
            Err(e) => return Ok(Ok(Work::failed(ErrorCode::TemplateError, format!("show: {e}")))),
        };
        let now = self.reviews.clock.now();
        let decision = match (self.reviews.decision(id), waiting) {
            (Some(decision), _) => decision,
            (None, None) => {
                let deadline = spec.timeout.as_ref().map(|(after, _)| now + after_chrono(*after));
                self.wait_for_review(id, &shown, self.reviews.wait(spec, 0, deadline)).await?;
                return Ok(Err(deadline));
            }
            (None, Some(wait)) => match (wait.deadline, &spec.timeout) {
                (Some(deadline), Some((_, on_timeout))) if now >= deadline => match on_timeout.at_level(wait.level).0 {
                    OnTimeout::Escalate { timeout, .. } => {
                        let level = wait.level + 1;
                        let deadline = Some(now + after_chrono(*timeout));
                        info!(step_id = %id, level, "review deadline passed: escalated");
                        self.wait_for_review(id, &shown, self.reviews.wait(spec, level, deadline)).await?;
                        return Ok(Err(deadline));
                    }
                    outcome => self.decide_at_deadline(id, deadline, matches!(outcome, OnTimeout::Approve), now).await?,
                },
                (deadline, _) => return Ok(Err(deadline)),
            },
        };
        running.announce(&self.journal, None).await?;
        info!(step_id = %id, decision = ?decision.decision, by = %decision.by, "review decided");
        let mut work = match decision.decision {
            Verdict::Approve => Work::done(shown.clone(), Value::String(shown)),
            Verdict::Edit => {
                let output = decision.output.clone().unwrap_or(Value::Null);
                let text = match &output {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                Work::done(text, output)
            }
            Verdict::Reject => {
                let why = decision.comment.as_deref().map(|c| format!(": {c}")).unwrap_or_default();
                Work::failed(ErrorCode::ReviewRejected, format!("rejected by {}{why}", decision.by))
            }
        };
        work.detail = Some(StepDetail::Review(decision));
        Ok(Ok(work))
    }

    /// Checkpoints the step `WAITING` (showing `shown`, `wait` as its detail) with its
    /// `AWAITING_INPUT` event: when it starts waiting, and again at each escalation.
    async fn wait_for_review(&self, id: &StepId, shown: &str, wait: ReviewWait) -> Result<(), EngineError> {
        let now = Utc::now();
        let mut record = StepRecord::settled(id.clone(), StepStatus::Waiting, None, now);
        (record.started_at, record.finished_at) = (Some(now), None);
        (record.text, record.output) = (Some(shown.to_owned()), Some(Value::String(shown.to_owned())));
        record.detail = Some(StepDetail::Waiting(wait.clone()).to_value());
        let reason = (wait.level > 0).then(|| format!("escalated ({} of its deadlines passed)", wait.level));
        let waiting = Waiting { kind: WaitKind::Review, by: None, since: now, reason, steps: vec![id.clone()], deadline: wait.deadline };
        let body = EventBody::AwaitingInput(AwaitingInput {
            waiting,
            show: Some(shown.to_owned()),
            reviewers: wait.deciders,
            settled_steps: None,
            step_count: None,
            input: None,
        });
        self.journal.emit_with(body, Some(id), None, Some(&record), |_| {}).await?;
        info!(step_id = %id, level = wait.level, deadline = ?wait.deadline, "review waiting for a decision");
        Ok(())
    }

    /// The deadline's own decision, recorded like a reviewer's so a late reviewer is told
    /// what happened; a reviewer's decision that got in first stands instead.
    async fn decide_at_deadline(
        &self,
        id: &StepId,
        deadline: DateTime<Utc>,
        approve: bool,
        now: DateTime<Utc>,
    ) -> Result<ReviewDecision, EngineError> {
        let verdict = if approve { Verdict::Approve } else { Verdict::Reject };
        let decision = ReviewDecision {
            decision: verdict,
            output: None,
            comment: Some(format!("no decision by the deadline ({deadline})")),
            by: UserId::parse(DEADLINE).unwrap_or_else(|_| unreachable!("{DEADLINE} is a valid user id")),
            at: now,
        };
        info!(step_id = %id, ?verdict, "review deadline passed");
        Ok(match self.reviews.store.decide(&self.reviews.run_id, id, &decision).await? {
            DecideOutcome::AlreadyDecided(first) => first,
            _ => decision,
        })
    }
}
