//! Revisions: a finished run steered again, keeping everything it did before.
//!
//! `POST /runs/{id}/steps/{step}/retry` and `PUT /runs/{id}/steps/{step}/output` start the
//! run's next revision: the step (for a retry) and exactly its transitive dependents run
//! again, every other step keeps its result. Nothing is overwritten: each revision's
//! checkpoints have their own keys (a step's record in revision `n` is its record *at*
//! `n`), so every earlier revision stays readable (`GET /runs/{id}?revision=N`), and its
//! events stay in the one gap-free log, each tagged with its revision.
//!
//! Which record a step has in revision `n`: the one written in the latest revision
//! `k <= n` that ran the step (revision 0 runs every step). A step a revision runs again
//! has no record in it until it settles there; [`RunRecord::revision_of`] says which.
//!
//! Money: the run's totals add up every revision (the journal of revision `n` starts from
//! what the revisions before it spent, [`RunRecord::spent_before`]), and so does its
//! budget: a run never spends more than its budget over all its revisions (a retry may
//! raise it, recorded like a resume's raise).

use crate::graph::ValidatedGraph;
use crate::ids::{StepId, UserId};
use crate::run::{BudgetRaise, ErrorInfo, RunRecord, RunStatus, StepRecord, StepStatus, Totals};
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};

/// The most revisions one run may have: each keeps its checkpoints, and the run's record
/// lists them all (it must stay within one DynamoDB item).
pub const MAX_REVISIONS: u32 = 50;

/// How a revision started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RevisionKind {
    /// `POST /runs/{id}/steps/{step}/retry`: the step runs again, then its dependents.
    Retry,
    /// `PUT /runs/{id}/steps/{step}/output`: the step's output is set by hand, its
    /// dependents run again.
    Override,
}

/// A revision after the first: who started it, how, what it runs again, and how the
/// revision before it had ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Revision {
    /// Its number: 1 for the first revision after the run as started.
    pub revision: u32,
    pub kind: RevisionKind,
    /// The step retried or overridden.
    pub step: StepId,
    pub by: UserId,
    pub at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Every step this revision runs (an override's step is set, not run), in the
    /// definition's order.
    pub rerun: Vec<StepId>,
    /// How the revision before ended.
    pub previous: RevisionEnd,
    /// A budget the retry raised, like a resume's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetRaise>,
}

/// How a revision ended: what the run record said when the next one started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RevisionEnd {
    pub status: RunStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// The run's totals by then: every revision up to and including it.
    #[schemars(with = "Value")]
    pub totals: Totals,
}

type Value = serde_json::Value;

/// What an overridden step's checkpoint says beside the output it was given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Overridden {
    /// Who set the output, when, and why.
    pub overridden_by: UserId,
    pub at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The revision whose output of the step it replaces.
    pub replaces_revision: u32,
}

impl RunRecord {
    /// The revision whose record of `step` counts in revision `view`: the latest one up to
    /// `view` that ran the step (or, for an override, set it). Revision 0 ran every step.
    pub fn revision_of(&self, step: &StepId, view: u32) -> u32 {
        self.revisions.iter().rev().filter(|r| r.revision <= view).find(|r| r.step == *step || r.rerun.contains(step)).map_or(0, |r| r.revision)
    }

    /// Of every checkpoint of the run (all revisions), the ones revision `view` has.
    pub fn records_at(&self, all: Vec<StepRecord>, view: u32) -> Vec<StepRecord> {
        all.into_iter().filter(|r| r.revision == self.revision_of(&r.step_id, view)).collect()
    }

    /// What the revisions before `view` spent (their steps' results count in `view`'s
    /// totals, but not in its checkpoints).
    pub fn spent_before(&self, view: u32) -> Totals {
        view.checked_sub(1).and_then(|prev| self.revisions.get(prev as usize)).map(|r| r.previous.totals).unwrap_or_default()
    }

    /// The run's totals as revision `view` shows them: everything up to its end, or (in
    /// flight) what the revisions before it and its own checkpoints add up to.
    pub fn totals_at(&self, view: u32, records: &[StepRecord]) -> Totals {
        if let Some(next) = self.revisions.get(view as usize) {
            return next.previous.totals;
        }
        if self.status.is_terminal() {
            return self.totals;
        }
        let mut totals = self.spent_before(view);
        totals.add(&Totals::of_checkpoints(records.iter().filter(|r| r.revision == view)));
        totals
    }
}

/// Why a step cannot be retried or overridden in a revision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevisionRefused {
    #[error("the workflow has no step {0:?}")]
    NoSuchStep(String),
    #[error("step {0} is a `{1}` step: only a step that produces an output can be overridden")]
    NotOverridable(StepId, &'static str),
    #[error("the run has had {MAX_REVISIONS} revisions; it takes no more")]
    TooMany,
}

/// The steps a new revision runs: for a retry, `step` and every step that depends on it,
/// directly or not; for an override, only its dependents. Steps the previous revision left
/// without a result because it failed or was cancelled (`CANCELLED`, or a required step
/// that `FAILED`) run again too, with their dependents: otherwise the revision would end
/// as the previous one did. `records` are the previous revision's. In the definition's order.
pub fn rerun_set(graph: &ValidatedGraph, records: &[StepRecord], kind: RevisionKind, step: &StepId) -> Result<Vec<StepId>, RevisionRefused> {
    let steps = graph.steps();
    let start = steps.iter().position(|s| s.id == *step).ok_or_else(|| RevisionRefused::NoSuchStep(step.to_string()))?;
    let by_id: HashMap<&StepId, &StepRecord> = records.iter().map(|r| (&r.step_id, r)).collect();
    let unfinished = |i: usize| match by_id.get(&steps[i].id) {
        None => true,
        Some(r) => r.status == StepStatus::Cancelled || (r.status == StepStatus::Failed && steps[i].required) || !r.status.is_settled(),
    };
    let mut seeds: Vec<usize> = match kind {
        RevisionKind::Retry => vec![start],
        RevisionKind::Override => graph.dependents(start).to_vec(),
    };
    seeds.extend((0..steps.len()).filter(|&i| i != start && unfinished(i)));
    let mut chosen = BTreeSet::new();
    while let Some(i) = seeds.pop() {
        // An overridden step keeps its output, even below a step that runs again.
        if (kind == RevisionKind::Override && i == start) || !chosen.insert(i) {
            continue;
        }
        {
            seeds.extend_from_slice(graph.dependents(i));
        }
    }
    // `steps` are in the definition's (topological) order, and so are the indexes.
    Ok(chosen.into_iter().map(|i| steps[i].id.clone()).collect())
}
