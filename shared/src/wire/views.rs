//! API bodies: what the HTTP API answers, built from domain types.

use super::money::{AvgCost, Cost, Money, Name, TotalCost};
use super::{AmountView, DocumentRef, TotalsView, UsageView};
use crate::analytics::{CostSums, DayCosts, WorkflowCosts};
use crate::estimate::{Estimate, StepEstimate};
use crate::ids::{ModelId, RunId, StepId};
use crate::limits::{INLINE_DOCUMENT_BYTES, VIEW_DOCUMENT_BYTES};
use crate::output::json_len;
use crate::ports::RunSummary;
use crate::run::{ControlRequest, ErrorInfo, Event, ProgressRow, Resumption, RunRecord, RunStatus, StepRecord, StepStatus, Waiting};
use chrono::{DateTime, NaiveDate, Utc};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::Value;

/// `202` to a run start: where to poll.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RunAccepted {
    pub run_id: RunId,
    pub status: RunStatus,
    pub links: RunLinks,
    /// What the run should change but that did not stop it: a model that is legacy on
    /// Bedrock or near its end of life.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<crate::graph::Problem>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RunLinks {
    pub run: String,
    pub events: String,
}

impl RunLinks {
    pub fn of(run: &RunId) -> Self {
        Self { run: format!("/runs/{run}"), events: format!("/runs/{run}/events") }
    }
}

impl RunAccepted {
    pub fn new(run_id: RunId) -> Self {
        Self { links: RunLinks::of(&run_id), run_id, status: RunStatus::Queued, warnings: Vec::new() }
    }
}

/// One step in a run snapshot; a step without a checkpoint yet is `PENDING`.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum StepView<'a> {
    Pending { id: &'a StepId, status: StepStatus, attempts: u32 },
    Checkpointed(StepCheckpoint<'a>),
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct StepCheckpoint<'a> {
    pub id: &'a StepId,
    pub status: StepStatus,
    pub attempts: u32,
    pub model: &'a Option<ModelId>,
    #[serde(flatten)]
    pub tokens: UsageView,
    #[serde(flatten)]
    pub cost: Money<Cost>,
    pub latency_ms: u64,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// `null` with `output_ref` when the output is linked rather than inlined.
    pub output: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_ref: Option<DocumentRef>,
    pub text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_ref: Option<DocumentRef>,
    pub error: &'a Option<ErrorInfo>,
    /// What only some kinds report (a router's choice, a map's items, a review's decision,
    /// an output set by hand), when it fits the view.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a Value>,
}

impl<'a> StepCheckpoint<'a> {
    /// The step's view, its documents inlined as far as `inline` allows.
    fn new(run: &RunId, r: &'a StepRecord, inline: &mut Inline) -> Self {
        let (output, output_ref) = inline.place(r.output.as_ref(), |bytes| DocumentRef::step(run, &r.step_id, "output", bytes));
        let (text, text_ref) = inline.place(r.text.as_deref(), |bytes| DocumentRef::step(run, &r.step_id, "text", bytes));
        // A detail is not served on its own: shown when it fits, and otherwise in the events.
        let detail = r.detail.as_ref().filter(|d| json_len(*d) <= INLINE_DOCUMENT_BYTES && json_len(*d) <= inline.left);
        inline.left -= detail.map_or(0, json_len);
        Self {
            id: &r.step_id,
            status: r.status,
            attempts: r.attempts,
            model: &r.model,
            tokens: (&r.usage).into(),
            cost: r.cost.into(),
            latency_ms: r.latency_ms,
            started_at: r.started_at,
            finished_at: r.finished_at,
            output,
            output_ref,
            text,
            text_ref,
            error: &r.error,
            detail,
        }
    }
}

/// Which documents a run view inlines: each of at most [`INLINE_DOCUMENT_BYTES`], in view
/// order, while they add up to at most [`VIEW_DOCUMENT_BYTES`]; the others are linked, so
/// the answer fits what Lambda may return whatever the run produced.
struct Inline {
    left: usize,
}

impl Inline {
    fn place<'d, T: Serialize + ?Sized>(
        &mut self,
        document: Option<&'d T>,
        link: impl FnOnce(usize) -> DocumentRef,
    ) -> (Option<&'d T>, Option<DocumentRef>) {
        let Some(document) = document else { return (None, None) };
        let bytes = json_len(document);
        if bytes <= INLINE_DOCUMENT_BYTES && bytes <= self.left {
            self.left -= bytes;
            (Some(document), None)
        } else {
            (None, Some(link(bytes)))
        }
    }
}

/// `GET /runs/{id}`: the run with per-step status, tokens, cost and latency.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RunView<'a> {
    #[serde(flatten)]
    pub summary: RunSummaryView<'a>,
    pub input: &'a Value,
    /// `null` with `output_ref` when the output is linked rather than inlined.
    pub output: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_ref: Option<DocumentRef>,
    /// A control request on the run (a cancel asked for, or the one it ended by).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control: Option<&'a ControlRequest>,
    /// What an `AWAITING_INPUT` run waits for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<&'a Waiting>,
    /// Who last resumed the run, and when.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed: Option<&'a Resumption>,
    /// Every raise of its budget, oldest first.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub budget_raises: &'a [crate::run::BudgetRaise],
    /// The revision shown (0: the run as started; see `revisions`).
    pub revision: u32,
    /// Every revision after the first: who started it, how, what it ran again, and how the
    /// one before it ended. `GET /runs/{id}?revision=N` shows revision `N`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub revisions: Vec<RevisionView<'a>>,
    /// The stored workflow and the version of it the run was started from, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workflow_ref: Option<&'a crate::stored::Pinned>,
    pub steps: Vec<StepView<'a>>,
}

/// One revision of a run, as its view lists it.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RevisionView<'a> {
    pub revision: u32,
    pub kind: crate::revision::RevisionKind,
    pub step: &'a StepId,
    pub by: &'a str,
    pub at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<&'a str>,
    pub rerun: &'a [StepId],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<&'a crate::run::BudgetRaise>,
    /// How the revision before it ended, and the run's totals by then.
    pub previous_status: RunStatus,
    pub previous_totals: TotalsView,
}

impl<'a> From<&'a crate::revision::Revision> for RevisionView<'a> {
    fn from(r: &'a crate::revision::Revision) -> Self {
        Self {
            revision: r.revision,
            kind: r.kind,
            step: &r.step,
            by: r.by.as_str(),
            at: r.at,
            comment: r.comment.as_deref(),
            rerun: &r.rerun,
            budget: r.budget.as_ref(),
            previous_status: r.previous.status,
            previous_totals: (&r.previous.totals).into(),
        }
    }
}

impl<'a> RunView<'a> {
    /// Steps in `order` (the definition's topological order, stored with the run); steps
    /// without a checkpoint yet are `PENDING`.
    pub fn new(run: &'a RunRecord, order: &'a [StepId], records: &'a [StepRecord]) -> Self {
        let by_id: std::collections::HashMap<&StepId, &StepRecord> = records.iter().map(|r| (&r.step_id, r)).collect();
        let mut inline = Inline { left: VIEW_DOCUMENT_BYTES };
        // The run's output first: it is what most callers came for.
        let (output, output_ref) = inline.place(run.output.as_ref(), |bytes| DocumentRef::run_output(&run.id, bytes));
        let steps = order
            .iter()
            .map(|id| match by_id.get(id) {
                Some(r) => StepView::Checkpointed(StepCheckpoint::new(&run.id, r, &mut inline)),
                None => StepView::Pending { id, status: StepStatus::Pending, attempts: 0 },
            })
            .collect();
        // Totals are final only at the end; meanwhile show what the checkpoints add up to
        // (and what the revisions before this one spent).
        let totals = run.totals_at(run.revision, records);
        let summary = RunSummaryView {
            run_id: &run.id,
            workflow: run.workflow.as_str(),
            status: run.status,
            caller: run.caller.as_str(),
            created_at: run.created_at,
            started_at: run.started_at,
            finished_at: run.finished_at,
            error: &run.error,
            totals: (&totals).into(),
        };
        Self {
            summary,
            input: &run.input,
            output,
            output_ref,
            control: run.control.as_ref(),
            waiting: run.waiting.as_ref(),
            resumed: run.resumed.as_ref(),
            budget_raises: &run.budget_raises,
            revision: run.revision,
            revisions: run.revisions.iter().map(RevisionView::from).collect(),
            workflow_ref: run.pinned.as_ref(),
            steps,
        }
    }
}

/// `GET /runs/{id}/events`: a page of events after the cursor.
#[derive(Debug, Serialize, JsonSchema)]
pub struct EventsPage<'a> {
    pub run_id: &'a RunId,
    pub status: RunStatus,
    #[schemars(with = "Vec<super::events::PublishedEvent>")]
    pub events: &'a [Event],
    /// The cursor for the next page.
    pub last_seq: u64,
    /// The run's revision now (each event says its own; see `?revision=`).
    pub revision: u32,
}

/// One row of a caller's progress feed.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ProgressRowView<'a> {
    pub run_id: &'a RunId,
    pub workflow: &'a str,
    pub status: RunStatus,
    pub current_step: &'a Option<StepId>,
    pub totals: TotalsView,
    pub last_seq: u64,
    pub updated_at: DateTime<Utc>,
    /// What an `AWAITING_INPUT` run waits for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<&'a Waiting>,
}

impl<'a> From<&'a ProgressRow> for ProgressRowView<'a> {
    fn from(r: &'a ProgressRow) -> Self {
        Self {
            run_id: &r.run_id,
            workflow: r.workflow.as_str(),
            status: r.status,
            current_step: &r.current_step,
            totals: (&r.totals).into(),
            last_seq: r.last_seq,
            updated_at: r.updated_at,
            waiting: r.waiting.as_ref(),
        }
    }
}

/// A list page with an opaque cursor for the next one.
#[derive(Debug, Serialize, JsonSchema)]
#[schemars(rename = "Page_of_{T}")]
pub struct Page<T> {
    pub items: Vec<T>,
    /// `null` on the last page.
    pub next: Option<String>,
}

/// A run in a history list: no input, output or steps (`GET /runs/{id}` has those).
#[derive(Debug, Serialize, JsonSchema)]
pub struct RunSummaryView<'a> {
    pub run_id: &'a RunId,
    pub workflow: &'a str,
    pub status: RunStatus,
    pub caller: &'a str,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: &'a Option<ErrorInfo>,
    pub totals: TotalsView,
}

impl<'a> From<&'a RunSummary> for RunSummaryView<'a> {
    fn from(r: &'a RunSummary) -> Self {
        Self {
            run_id: &r.id,
            workflow: r.workflow.as_str(),
            status: r.status,
            caller: r.caller.as_str(),
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            error: &r.error,
            totals: (&r.totals).into(),
        }
    }
}

/// Counts, sums and averages; averages round down, and the sums are there to check them.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CostSumsView {
    pub runs: u64,
    pub failures: u64,
    pub failure_rate: String,
    #[serde(flatten)]
    pub total_cost: Money<TotalCost>,
    #[serde(flatten)]
    pub avg_cost: Money<AvgCost>,
    pub total_latency_ms: u64,
    pub avg_latency_ms: u64,
    /// Answers the response cache gave for free (they are in `runs`, at no cost).
    pub cached: u64,
}

impl From<&CostSums> for CostSumsView {
    fn from(s: &CostSums) -> Self {
        Self {
            runs: s.runs,
            failures: s.failures,
            failure_rate: s.failure_rate(),
            total_cost: s.cost.into(),
            avg_cost: s.avg_cost().into(),
            total_latency_ms: s.latency_ms,
            avg_latency_ms: s.avg_latency_ms(),
            cached: s.cached,
        }
    }
}

/// One workflow's costs, its steps most expensive on average first.
#[derive(Debug, Serialize, JsonSchema)]
pub struct WorkflowCostsView<'a> {
    pub workflow: &'a str,
    #[serde(flatten)]
    pub totals: CostSumsView,
    pub steps: Vec<StepCostsView<'a>>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct StepCostsView<'a> {
    pub step_id: &'a StepId,
    #[serde(flatten)]
    pub sums: CostSumsView,
}

impl<'a> From<&'a WorkflowCosts> for WorkflowCostsView<'a> {
    fn from(w: &'a WorkflowCosts) -> Self {
        let steps = w.steps_by_avg_cost().into_iter().map(|(step_id, sums)| StepCostsView { step_id, sums: sums.into() }).collect();
        Self { workflow: &w.workflow, totals: (&w.totals).into(), steps }
    }
}

/// `GET /analytics/costs`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CostsReport<'a> {
    pub days: u32,
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub scope: String,
    pub workflows: Vec<WorkflowCostsView<'a>>,
    /// The same runs per UTC day (the day each finished) and workflow, oldest day first:
    /// what a chart of cost per day draws. A day or workflow without runs has no entry.
    pub daily: Vec<DayCostsView<'a>>,
}

/// One workflow's runs, failures and cost on one UTC day.
#[derive(Debug, Serialize, JsonSchema)]
pub struct DayCostsView<'a> {
    pub day: NaiveDate,
    pub workflow: &'a str,
    pub runs: u64,
    pub failures: u64,
    #[serde(flatten)]
    pub total_cost: Money<TotalCost>,
}

impl<'a> From<&'a DayCosts> for DayCostsView<'a> {
    fn from(d: &'a DayCosts) -> Self {
        Self {
            day: d.day,
            workflow: &d.costs.workflow,
            runs: d.costs.totals.runs,
            failures: d.costs.totals.failures,
            total_cost: d.costs.totals.cost.into(),
        }
    }
}

/// An amount that may not exist (no cap): both keys are `null` then.
pub struct MaybeMoney<N: Name>(pub Option<Money<N>>);

impl<N: Name> Serialize for MaybeMoney<N> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Some(money) => money.serialize(serializer),
            None => {
                let mut map = serializer.serialize_map(Some(2))?;
                map.serialize_entry(&format!("{}_usd", N::NAME), &())?;
                map.serialize_entry(&format!("{}_pico_usd", N::NAME), &())?;
                map.end()
            }
        }
    }
}

impl<N: Name> JsonSchema for MaybeMoney<N> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        format!("MaybeMoney_{}", N::NAME).into()
    }

    fn inline_schema() -> bool {
        // Flattened into its parent, as `Money` is.
        true
    }

    /// `Money`'s two properties, each `null` when there is no amount.
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let mut schema = Money::<N>::json_schema(generator);
        if let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) {
            for property in properties.values_mut() {
                if let Some(kind) = property.get("type").cloned() {
                    property["type"] = serde_json::json!([kind, "null"]);
                }
            }
        }
        schema
    }
}

impl<N: Name> std::fmt::Debug for MaybeMoney<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MaybeMoney").field(&self.0).finish()
    }
}

/// `GET /analytics/spend`: the caller's spend today against their daily cap.
#[derive(Debug, Serialize, JsonSchema)]
pub struct SpendToday<'a> {
    pub owner: &'a str,
    pub day: NaiveDate,
    #[serde(flatten)]
    pub cap: MaybeMoney<super::money::Cap>,
    #[serde(flatten)]
    pub charged: Money<super::money::Charged>,
    #[serde(flatten)]
    pub held: Money<super::money::Held>,
    /// Calls whose runner died while they may have been in flight: billed or not, they
    /// count at their worst case.
    #[serde(flatten)]
    pub lost: Money<super::money::Lost>,
    #[serde(flatten)]
    pub remaining: MaybeMoney<super::money::Remaining>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct StepEstimateView<'a> {
    pub step_id: &'a StepId,
    pub min: AmountView,
    pub expected: AmountView,
    pub max: AmountView,
    /// What bounds `max`: `prompt`, `context_window`, or null for a step without model calls.
    pub max_basis: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_items: Option<u64>,
}

impl<'a> From<&'a StepEstimate> for StepEstimateView<'a> {
    fn from(s: &'a StepEstimate) -> Self {
        Self {
            step_id: &s.step_id,
            min: s.min.into(),
            expected: s.expected.into(),
            max: s.max.into(),
            max_basis: s.max_basis.as_str(),
            max_items: s.max_items,
        }
    }
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct EstimateBounds {
    pub min: AmountView,
    pub expected: AmountView,
    pub max: AmountView,
}

/// `POST …/estimate`: per-step and total cost ranges.
#[derive(Debug, Serialize, JsonSchema)]
pub struct EstimateView<'a> {
    pub steps: Vec<StepEstimateView<'a>>,
    pub total: EstimateBounds,
    pub basis: &'static str,
    pub history_runs: u64,
    /// As a run's start would say them (see [`RunAccepted::warnings`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<crate::graph::Problem>,
}

impl<'a> From<&'a Estimate> for EstimateView<'a> {
    fn from(e: &'a Estimate) -> Self {
        Self {
            steps: e.steps.iter().map(Into::into).collect(),
            total: EstimateBounds { min: e.min.into(), expected: e.expected.into(), max: e.max.into() },
            basis: e.basis.as_str(),
            history_runs: e.history_runs,
            warnings: Vec::new(),
        }
    }
}
