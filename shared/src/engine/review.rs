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
use crate::graph::ReviewSpec;
use crate::ids::{Principal, StepId, UserId};
use crate::run::{ReviewDecision, StepRecord, StepStatus, Verdict, WaitKind, Waiting};
use crate::wire::StepDetail;
use crate::wire::events::{AwaitingInput, EventBody};
use chrono::Utc;
use serde_json::Value;
use std::collections::BTreeMap;
use tracing::info;

/// What a run's review steps are decided by.
#[derive(Debug, Default)]
pub struct Reviews {
    /// Recorded decisions, by step.
    pub decisions: BTreeMap<StepId, ReviewDecision>,
    /// The run option `auto_approve`: every review is approved at once.
    pub auto_approve: bool,
    /// Who decides a review that names no reviewers: the run's starter.
    pub starter: Option<UserId>,
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

    /// Who may decide a review with `reviewers` (empty: the run's starter).
    pub fn deciders(&self, reviewers: &[Principal]) -> Vec<Principal> {
        match (reviewers.is_empty(), &self.starter) {
            (true, Some(starter)) => vec![Principal::User(starter.to_string())],
            _ => reviewers.to_vec(),
        }
    }
}

/// Who an automatic approval is recorded as.
pub const AUTO_APPROVE: &str = "auto_approve";

/// A principal as a review names it: `user:<id>`, `group:<name>`.
pub fn principal_name(p: &Principal) -> String {
    match p {
        Principal::User(u) => format!("user:{u}"),
        Principal::Group(g) => format!("group:{g}"),
        Principal::Admin => "admin".into(),
        Principal::Public => "public".into(),
    }
}

impl StepContext {
    /// A review step: its work once decided, or `None` while it waits. `announced`: its
    /// `WAITING` checkpoint and event were written by an earlier invocation.
    pub async fn review(
        &self,
        id: &StepId,
        spec: &ReviewSpec,
        scope: &impl Scope,
        announced: bool,
        running: &mut Running,
    ) -> Result<Option<Work>, EngineError> {
        let shown = match spec.show.render(scope) {
            Ok(text) => text,
            Err(e) => return Ok(Some(Work::failed(ErrorCode::TemplateError, format!("show: {e}")))),
        };
        let Some(decision) = self.reviews.decision(id) else {
            if !announced {
                self.wait_for_review(id, spec, &shown).await?;
            }
            return Ok(None);
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
        Ok(Some(work))
    }

    /// Checkpoints the step `WAITING` (showing `shown`) with its `AWAITING_INPUT` event.
    async fn wait_for_review(&self, id: &StepId, spec: &ReviewSpec, shown: &str) -> Result<(), EngineError> {
        let now = Utc::now();
        let mut record = StepRecord::settled(id.clone(), StepStatus::Waiting, None, now);
        (record.started_at, record.finished_at) = (Some(now), None);
        (record.text, record.output) = (Some(shown.to_owned()), Some(Value::String(shown.to_owned())));
        let reviewers = self.reviews.deciders(&spec.reviewers).iter().map(principal_name).collect();
        let waiting = Waiting { kind: WaitKind::Review, by: None, since: now, reason: None, steps: vec![id.clone()] };
        let body = EventBody::AwaitingInput(AwaitingInput { waiting, show: Some(shown.to_owned()), reviewers, settled_steps: None, steps: None });
        self.journal.emit_with(body, Some(id), None, Some(&record), |_| {}).await?;
        info!(step_id = %id, "review waiting for a decision");
        Ok(())
    }
}
