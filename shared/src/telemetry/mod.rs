//! The operators' view: what the functions print for CloudWatch — JSON log lines that carry
//! the run and step they are about, and metrics in the embedded metric format.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | [`Observer`]: what the engine reports as a run goes ([`Seen`]), with the run's [`RunFacts`] |
//! | [`catalog`] | every metric's name, unit and dimensions: the one list (`schemas/metrics.json` is generated from it) |
//! | [`emf`] | the EMF document and where its lines go |
//! | [`metrics`] | observations turned into documents ([`metrics::Emf`], the observer the runner prints with); the sweeper's document |
//! | [`spans`] | the spans the functions open per invocation, request and run, whose fields every line inside them carries |
//! | `logs` (feature `aws`) | the log subscriber every function installs: JSON lines with the fields of the spans they are in |
//! | `capture` (feature `aws`) | an in-memory stdout for tests: log lines and metric lines in the order printed |
//!
//! The engine knows only [`Observer`]: it reports what it did (a step settled, a run ended,
//! a takeover, a budget refusal, a throttle wait) once the event announcing it is published,
//! so every metric matches an event in the run's log. How that becomes metrics, and where
//! they go, is the observer's business.

pub mod catalog;
pub mod emf;
pub mod metrics;
pub mod spans;

#[cfg(feature = "aws")]
pub mod capture;
#[cfg(feature = "aws")]
pub mod logs;

use crate::ids::{ModelId, RunId, StepId, WorkflowName};
use crate::run::{RunRecord, RunStatus, StepRecord, Totals};
use chrono::{DateTime, Utc};

/// What an observation is about: the run, as its record says when a journal starts writing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunFacts {
    pub run_id: RunId,
    pub workflow: WorkflowName,
    pub revision: u32,
    /// When the run started (its revision, for a revision): its latency counts from here.
    pub since: DateTime<Utc>,
    /// When its end was stored, if it had ended already (a late announcement of its end).
    pub finished_at: Option<DateTime<Utc>>,
    /// The steps its workflow has.
    pub steps: usize,
    /// Its takeovers so far, the one that gave this runner the run included.
    pub takeovers: usize,
}

impl RunFacts {
    pub fn of(run: &RunRecord) -> Self {
        let revision_start = run.revision.checked_sub(1).and_then(|i| run.revisions.get(i as usize)).map(|r| r.at);
        Self {
            run_id: run.id.clone(),
            workflow: run.workflow.clone(),
            revision: run.revision,
            since: revision_start.unwrap_or(run.created_at),
            finished_at: run.finished_at.filter(|_| run.status.is_terminal()),
            steps: run.step_order.len(),
            takeovers: run.takeovers.len(),
        }
    }
}

/// Something the engine did that operators count.
#[derive(Debug, Clone, Copy)]
pub enum Seen<'a> {
    /// A step settled (`STEP_COMPLETED` or `STEP_FAILED`); its checkpoint.
    StepSettled(&'a StepRecord),
    /// The run ended (`RUN_COMPLETED`, `RUN_FAILED`, `RUN_CANCELLED`) with these totals.
    RunEnded { status: RunStatus, totals: &'a Totals },
    /// This runner took the run over from one that stopped renewing its lease.
    TakenOver,
    /// A budget refused a call of `step`: `limit` is the definition's budget field that
    /// refused it (`max_cost_usd`, `max_total_tokens`) or `daily_cap`.
    BudgetRefused { step: &'a StepId, limit: &'a str },
    /// A call of `step` waited `waited_ms` for its tenant's token allowance for `model`.
    ThrottleWaited { step: &'a StepId, model: &'a ModelId, waited_ms: u64 },
}

/// Told what the engine did, as it does it. Called inline on the engine's path: it must not
/// block for long (printing a line is fine).
pub trait Observer: Send + Sync {
    fn observe(&self, run: &RunFacts, seen: &Seen<'_>, at: DateTime<Utc>);
}
