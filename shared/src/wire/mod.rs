//! Wire shapes: everything chainrun writes for clients to read — progress events' `data`,
//! budget refusals, totals, estimates and API bodies — as `Serialize` structs.
//!
//! One module so that one convention holds everywhere: money goes out through
//! [`money::Money`] only (an exact decimal string and the integer, never a float), and
//! what is published (the event schema) is generated from the same types the engine and
//! the API serialize.

pub mod events;
pub mod graph;
pub mod money;
pub mod steering;
pub mod templates;
pub mod views;
pub mod workflows;

use crate::budget::{Amount, BudgetExceeded, Limit};
use crate::codes::ErrorCode;
use crate::pricing::Usage;
use crate::run::{ErrorInfo, Totals};
use crate::spend::DailyCapExceeded;
use money::{CommittedToday, Cost, MaxCost, Money, OwnerDailyCost};
use schemars::JsonSchema;
use serde::Serialize;

/// A document too large to go inline (in an event, or in `GET /runs/{id}`): where to
/// read it whole, and its size in bytes as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
pub struct DocumentRef {
    pub href: String,
    pub bytes: u64,
}

impl DocumentRef {
    pub fn run_output(run: &crate::ids::RunId, bytes: usize) -> Self {
        Self { href: format!("/runs/{run}/output"), bytes: bytes as u64 }
    }

    /// `part`: `output` or `text`.
    pub fn step(run: &crate::ids::RunId, step: &crate::ids::StepId, part: &str, bytes: usize) -> Self {
        Self { href: format!("/runs/{run}/steps/{step}/{part}"), bytes: bytes as u64 }
    }
}

/// A call's or a step's tokens by kind.
#[derive(Debug, Serialize, JsonSchema)]
pub struct UsageView {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
}

impl From<&Usage> for UsageView {
    fn from(u: &Usage) -> Self {
        Self {
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            cache_read_tokens: u.cache_read_tokens,
            cache_write_tokens: u.cache_write_tokens,
        }
    }
}

/// A run's totals as clients see them, wherever they appear (events, progress rows, run
/// snapshots, history).
#[derive(Debug, Serialize, JsonSchema)]
pub struct TotalsView {
    #[serde(flatten)]
    pub tokens: UsageView,
    pub total_tokens: u64,
    #[serde(flatten)]
    pub cost: Money<Cost>,
    pub model_calls: u64,
    /// Sum of step latencies (not wall-clock: parallel steps overlap).
    pub step_latency_ms: u64,
    /// Model calls whose runner died before they returned, counted at the worst case
    /// reserved for them (what they cost is unknown): not in the exact figures above, but
    /// counted against the run's budget. Absent when no runner died mid-call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved_lost: Option<LostView>,
}

/// See [`TotalsView::reserved_lost`].
#[derive(Debug, Serialize, JsonSchema)]
pub struct LostView {
    pub calls: u64,
    pub tokens: u64,
    #[serde(flatten)]
    pub cost: Money<Cost>,
}

impl From<&Totals> for TotalsView {
    fn from(t: &Totals) -> Self {
        let tokens = Usage {
            input_tokens: t.input_tokens,
            output_tokens: t.output_tokens,
            cache_read_tokens: t.cache_read_tokens,
            cache_write_tokens: t.cache_write_tokens,
        };
        Self {
            tokens: (&tokens).into(),
            total_tokens: t.total_tokens(),
            cost: t.cost.into(),
            model_calls: t.model_calls,
            step_latency_ms: t.step_latency_ms,
            reserved_lost: (!t.lost.is_zero()).then(|| LostView { calls: t.lost.calls, tokens: t.lost.tokens, cost: t.lost.cost.into() }),
        }
    }
}

/// Tokens and money together: what a call spent, reserved or would need.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct AmountView {
    pub tokens: u64,
    #[serde(flatten)]
    pub cost: Money<Cost>,
}

impl From<Amount> for AmountView {
    fn from(a: Amount) -> Self {
        Self { tokens: a.tokens, cost: a.cost.into() }
    }
}

/// What only some step kinds report beside their output, in checkpoints and events.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum StepDetail {
    Route(RouteDetail),
    Map(MapDetail),
    Refused(Refused),
    /// A review step's decision: who decided what, and why.
    Review(crate::run::ReviewDecision),
    /// A review step waiting: who may decide, and until when.
    Waiting(crate::run::ReviewWait),
    /// A step whose output was set by hand.
    Overridden(crate::revision::Overridden),
    /// An input step waiting: who may answer and until when, what it still asks for.
    InputWaiting(InputWait),
    /// An input step's answers, turn by turn, and the values they gave.
    Input(crate::input::InputState),
    /// A reply reused from the response cache: no call was made, nothing was charged.
    Cached(ResponseHit),
}

/// An `llm` step (`cache: "response"`) answered from the response cache.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ResponseHit {
    /// Always `"hit"`: what makes the detail recognisable.
    pub response_cache: &'static str,
    /// When the call that produced the reply was made.
    pub stored_at: chrono::DateTime<chrono::Utc>,
    /// What that call was charged for, which this step was not.
    pub saved_input_tokens: u64,
    pub saved_output_tokens: u64,
}

/// Where a waiting input step stands, kept in its `WAITING` checkpoint's `detail`. Its
/// first fields are a review's ([`crate::run::ReviewWait`]): deadlines escalate both alike.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
pub struct InputWait {
    #[serde(flatten)]
    pub wait: crate::run::ReviewWait,
    #[serde(flatten)]
    pub asked: InputAsked,
}

/// What an input step still asks for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
pub struct InputAsked {
    /// The required fields without a valid value yet.
    pub missing: Vec<String>,
    /// The values of the last answer that were refused, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<crate::input::FieldError>,
    /// Answers it still takes before it fails.
    pub attempts_left: u32,
}

impl StepDetail {
    /// As a checkpoint stores it.
    pub fn to_value(&self) -> serde_json::Value {
        // String keys and JSON values only: serializing cannot fail.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Which route a router took.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RouteDetail {
    /// The index of the first route whose condition held.
    pub route: usize,
    pub when: String,
}

/// A map's items and the ones that failed.
#[derive(Debug, Serialize, JsonSchema)]
pub struct MapDetail {
    pub items: usize,
    pub failed: Vec<ItemFailed>,
    /// Items answered from the response cache (`cache: "response"`), free.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cached: usize,
    /// The batch inference job the items ran in (`map.mode: batch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<events::BatchJob>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ItemFailed {
    pub index: usize,
    pub error: ErrorInfo,
    /// A budget refusal's numbers, when the item was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<Refused>,
}

/// A model call that was not made: why, with the numbers.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Refused {
    pub budget: Refusal,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Refusal {
    Run(RunBudgetRefusal),
    DailyCap(DailyCapRefusal),
}

impl Refusal {
    pub fn error(&self, message: String) -> ErrorInfo {
        ErrorInfo::terminal(ErrorCode::BudgetExceeded, message)
    }
}

/// The run's budget refused a call: the limit, what was spent and reserved, and the
/// refused reservation.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct RunBudgetRefusal {
    /// `max_cost_usd` or `max_total_tokens`.
    pub limit: &'static str,
    #[serde(flatten)]
    pub max: LimitView,
    pub spent: AmountView,
    pub reserved_by_others: AmountView,
    pub attempted: AmountView,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum LimitView {
    Cost(Money<MaxCost>),
    Tokens { max_total_tokens: u64 },
}

impl From<&BudgetExceeded> for RunBudgetRefusal {
    fn from(e: &BudgetExceeded) -> Self {
        Self {
            limit: e.limit.name(),
            max: match e.limit {
                Limit::MaxCost(max) => LimitView::Cost(max.into()),
                Limit::MaxTotalTokens(max) => LimitView::Tokens { max_total_tokens: max },
            },
            spent: e.spent.into(),
            reserved_by_others: e.reserved_by_others.into(),
            attempted: e.attempted.into(),
        }
    }
}

/// The caller's daily cap refused a call, in the shape of a run budget refusal.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct DailyCapRefusal {
    /// Always `owner_daily_cost_usd`.
    pub limit: &'static str,
    pub owner: String,
    /// The UTC day the cap applies to.
    pub day: String,
    #[serde(flatten)]
    pub cap: Money<OwnerDailyCost>,
    /// Charged plus held today, before this call.
    #[serde(flatten)]
    pub committed: Money<CommittedToday>,
    pub attempted: AmountView,
}

impl From<&DailyCapExceeded> for DailyCapRefusal {
    fn from(e: &DailyCapExceeded) -> Self {
        Self {
            limit: "owner_daily_cost_usd",
            owner: e.owner.clone(),
            day: e.day.to_string(),
            cap: e.cap.into(),
            committed: e.committed.into(),
            attempted: e.attempted.into(),
        }
    }
}
