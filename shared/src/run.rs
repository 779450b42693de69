//! Run state as stored and reported: the run record, step checkpoints, progress events.

use crate::codes::ErrorCode;
use crate::ids::{ModelId, Principal, RunId, StepId, UserId, WorkflowName};
use crate::money::Usd;
use crate::pricing::Usage;
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunStatus {
    Queued,
    Running,
    /// Waiting for a person (a pause, for now), holding no runner: `POST /runs/{id}/resume`
    /// continues it, on any runner, any time later.
    AwaitingInput,
    Completed,
    Failed,
    Cancelled,
}

impl RunStatus {
    /// The name it serializes as.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "QUEUED",
            RunStatus::Running => "RUNNING",
            RunStatus::AwaitingInput => "AWAITING_INPUT",
            RunStatus::Completed => "COMPLETED",
            RunStatus::Failed => "FAILED",
            RunStatus::Cancelled => "CANCELLED",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StepStatus {
    Pending,
    Running,
    /// A review waiting for its decision.
    Waiting,
    Completed,
    Failed,
    Skipped,
    Cancelled,
}

impl StepStatus {
    /// The name it serializes as.
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "PENDING",
            StepStatus::Running => "RUNNING",
            StepStatus::Waiting => "WAITING",
            StepStatus::Completed => "COMPLETED",
            StepStatus::Failed => "FAILED",
            StepStatus::Skipped => "SKIPPED",
            StepStatus::Cancelled => "CANCELLED",
        }
    }

    pub fn is_settled(self) -> bool {
        !matches!(self, StepStatus::Pending | StepStatus::Running | StepStatus::Waiting)
    }
}

/// An error as recorded and shown to clients: a stable code, a human message, and
/// whether trying again could help.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorInfo {
    pub code: ErrorCode,
    pub message: String,
    pub retryable: bool,
}

impl ErrorInfo {
    /// An error that trying again cannot mend.
    pub fn terminal(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), retryable: false }
    }
}

/// Sums over a run's model calls. Money is exact ([`Usd`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub cost: Usd,
    pub model_calls: u64,
    /// Sum of step latencies (not wall-clock: parallel steps overlap).
    pub step_latency_ms: u64,
    /// Calls whose runner died before they returned, at their reserved worst case: not
    /// exact charges, and not in the fields above.
    #[serde(default, skip_serializing_if = "Lost::is_zero")]
    pub lost: Lost,
}

/// Model calls whose runner stopped (a crash, a timeout) before they returned, counted at
/// the worst case reserved for them: what they were charged is unknown, and a budget holds
/// across crashes only if they count. Not part of exact charges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lost {
    pub calls: u64,
    pub tokens: u64,
    pub cost: Usd,
}

impl Lost {
    pub fn is_zero(&self) -> bool {
        *self == Lost::default()
    }

    pub fn add(&mut self, other: Lost) {
        self.calls += other.calls;
        self.tokens = self.tokens.saturating_add(other.tokens);
        self.cost = self.cost.saturating_add(other.cost);
    }
}

/// The worst case reserved for a model call in flight, in a step's `RUNNING` checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    pub tokens: u64,
    pub cost: Usd,
}

/// What a step's `RUNNING` checkpoint says its dead runner spent on it: exact charges of
/// the calls that returned, and the calls it lost (its call in flight among them). A
/// runner that takes the run over counts it against the budget and carries it into the
/// step's next checkpoints, so it survives any number of crashes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    pub usage: Usage,
    pub cost: Usd,
    pub calls: u32,
    pub lost: Lost,
}

impl Carried {
    /// What an unsettled (`RUNNING`) checkpoint carries; `None` if it spent nothing.
    pub fn of(running: &StepRecord) -> Option<Carried> {
        let carried = Carried::left(running.usage, running.cost, running.calls, running.lost, running.in_flight);
        (carried != Carried::default()).then_some(carried)
    }

    /// What a checkpoint left: its charges, and its lost calls with the one in flight.
    fn left(usage: Usage, cost: Usd, calls: u32, mut lost: Lost, in_flight: Option<InFlight>) -> Carried {
        if let Some(call) = in_flight {
            lost.add(Lost { calls: 1, tokens: call.tokens, cost: call.cost });
        }
        Carried { usage, cost, calls, lost }
    }

    /// Adds `other` to this.
    pub fn add(&mut self, other: &Carried) {
        self.usage = self.usage.plus(&other.usage);
        self.cost = self.cost.saturating_add(other.cost);
        self.calls += other.calls;
        self.lost.add(other.lost);
    }
}

/// One map item's checkpoint: its result once it settled, or (`RUNNING`) the worst case of
/// its call in flight beside what it was charged so far. A resumed map reuses settled items
/// and runs only the others. Only items that call a model are checkpointed (a transform
/// item costs nothing to run again).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemRecord {
    pub index: usize,
    pub status: StepStatus,
    pub attempts: u32,
    #[serde(default)]
    pub output: Option<Value>,
    #[serde(default)]
    pub text: Option<String>,
    pub usage: Usage,
    pub cost: Usd,
    pub calls: u32,
    #[serde(default)]
    pub error: Option<ErrorInfo>,
    #[serde(default, skip_serializing_if = "Lost::is_zero")]
    pub lost: Lost,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<InFlight>,
}

impl ItemRecord {
    /// What a dead runner spent on this item, if it had not settled it.
    pub fn carried(&self) -> Carried {
        Carried::left(self.usage, self.cost, self.calls, self.lost, self.in_flight)
    }
}

impl Totals {
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens + self.output_tokens + self.cache_read_tokens + self.cache_write_tokens
    }

    pub fn add_call(&mut self, usage: &Usage, cost: Usd) {
        self.add_usage(usage, cost);
        self.model_calls += 1;
    }

    /// What a run's settled checkpoints add up to: the live totals of a run in flight,
    /// and where a resumed run's budget starts. The one place live totals are computed.
    pub fn of_checkpoints<'a>(checkpoints: impl IntoIterator<Item = &'a StepRecord>) -> Totals {
        let mut totals = Totals::default();
        for r in checkpoints.into_iter().filter(|r| r.status.is_settled()) {
            totals.add_usage(&r.usage, r.cost);
            totals.model_calls += u64::from(r.calls);
            totals.lost.add(r.lost);
            totals.step_latency_ms += r.latency_ms;
        }
        totals
    }

    /// Adds `other` (what another revision of the run spent).
    pub fn add(&mut self, other: &Totals) {
        self.add_usage(
            &Usage {
                input_tokens: other.input_tokens,
                output_tokens: other.output_tokens,
                cache_read_tokens: other.cache_read_tokens,
                cache_write_tokens: other.cache_write_tokens,
            },
            other.cost,
        );
        self.model_calls += other.model_calls;
        self.step_latency_ms += other.step_latency_ms;
        self.lost.add(other.lost);
    }

    /// Adds what a dead runner spent on a step it did not settle.
    pub fn add_carried(&mut self, carried: &Carried) {
        self.add_usage(&carried.usage, carried.cost);
        self.model_calls += u64::from(carried.calls);
        self.lost.add(carried.lost);
    }

    pub fn add_usage(&mut self, usage: &Usage, cost: Usd) {
        self.input_tokens += usage.input_tokens;
        self.output_tokens += usage.output_tokens;
        self.cache_read_tokens += usage.cache_read_tokens;
        self.cache_write_tokens += usage.cache_write_tokens;
        self.cost = self.cost.saturating_add(cost);
    }
}

/// The runner's event payload: the run id only, since Lambda limits async payloads
/// (256 KB) and the run record already holds everything else. The id is parsed on the way
/// in, so a malformed payload is refused before anything is read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerEvent {
    pub run_id: RunId,
    /// Why the run was handed over; shown in the event that resumes it.
    #[serde(default)]
    pub cause: Cause,
    /// How often the dead-letter consumer has handed this run over again after Lambda gave
    /// up on a delivery; bounds that loop.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub redeliveries: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl RunnerEvent {
    pub fn new(run_id: RunId, cause: Cause) -> Self {
        Self { run_id, cause, redeliveries: 0 }
    }
}

/// Who handed a run to the runner, and why.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The API, when the run was started.
    #[default]
    Start,
    /// The runner itself, continuing a run it suspended near its deadline.
    Continue,
    /// The sweeper, for a run whose lease expired or that stayed queued.
    Sweep,
    /// The dead-letter consumer, for an event that exhausted Lambda's retries.
    DeadLetter,
    /// The API, after a control request (a cancel) on the run.
    Control,
    /// The API, resuming a waiting run.
    Resume,
    /// A review's deadline (a one-time schedule).
    Deadline,
    /// The API, starting a revision of a finished run (a step retried or overridden).
    Revision,
}

/// A request to steer a run, recorded on the run until the runner holding it acts on it
/// (see [`crate::ports::RunStore::request_control`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ControlRequest {
    pub kind: ControlKind,
    /// Who asked, and when.
    pub by: UserId,
    pub at: DateTime<Utc>,
    /// Why, as the caller put it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ControlKind {
    /// Stop the run: steps in flight stop, nothing new starts, it ends `CANCELLED`.
    Cancel,
    /// Hold the run: steps in flight finish, nothing new starts, and it waits
    /// (`AWAITING_INPUT`) holding no runner until it is resumed.
    Pause,
}

/// What a run in `AWAITING_INPUT` waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Waiting {
    pub kind: WaitKind,
    /// Who put it there (for a pause), and since when it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<UserId>,
    pub since: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The steps waiting for a person (reviews).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepId>,
    /// The earliest deadline among them: the run is handed to a runner then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
}

/// A map's batch inference job, kept in the map's checkpoint's `detail` as
/// `{"batch_job": …}`: `WAITING` (with the job's reservation `in_flight`) from before the
/// job is submitted until its answers are read, then `RUNNING` with `read` set while the
/// items it did not answer run online.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchWait {
    /// The job's idempotency token: a submission made again after a crash finds the job.
    pub token: String,
    /// The job's id, once submitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The items sent in the job.
    pub items: Vec<usize>,
    /// The job's status when last asked.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Polls so far (each waits longer, up to a bound).
    pub polls: u32,
    /// Set once the job's answers were read and charged: they are in the items' checkpoints.
    #[serde(default)]
    pub read: bool,
    /// Once read: records answered at the batch price, and items left to run online.
    #[serde(default)]
    pub answered: usize,
    #[serde(default)]
    pub online: usize,
}

impl BatchWait {
    /// The wait a checkpoint's `detail` holds, if it holds one.
    pub fn of(detail: Option<&Value>) -> Option<BatchWait> {
        serde_json::from_value(detail?.get("batch_job")?.clone()).ok()
    }

    pub fn to_detail(&self) -> Value {
        serde_json::json!({ "batch_job": self })
    }
}

/// Where a waiting review stands, kept in its `WAITING` checkpoint's `detail`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReviewWait {
    /// Escalations so far.
    pub level: u32,
    /// When its deadline fires, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// Who may decide now: `user:<id>` / `group:<name>`.
    pub deciders: Vec<String>,
}

/// A reviewer's decision on a review step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReviewDecision {
    pub decision: Verdict,
    /// The reviewer's replacement output (`edit` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Who decided (`auto_approve` for the run option), and when.
    pub by: UserId,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Approve,
    Reject,
    Edit,
}

/// Options a run is started with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunOptions {
    /// Approve every review step at once (recorded as decided by `auto_approve`).
    #[serde(default)]
    pub auto_approve: bool,
}

impl RunOptions {
    pub fn is_default(&self) -> bool {
        self == &RunOptions::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WaitKind {
    /// Paused by `POST /runs/{id}/pause`.
    Paused,
    /// Review steps wait for their decisions (`steps`).
    Review,
    /// A model call did not fit the budget (`budget.on_exceeded: pause`): the run waits
    /// for a resume that raises it. `reason` says what was spent and attempted.
    Budget,
    /// Input steps wait for their values (`steps`).
    Input,
    /// Map steps wait for their batch inference jobs (`steps`); nobody needs to act: the
    /// run is handed to a runner at `deadline` to ask the job again.
    Batch,
}

/// A budget raised when a run was resumed: who, when, and from what to what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BudgetRaise {
    pub by: UserId,
    pub at: DateTime<Utc>,
    pub from: BudgetView,
    pub to: BudgetView,
}

/// A run's limits as a raise records them (money as an exact pico-dollar count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BudgetView {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<u64>")]
    pub max_cost_pico_usd: Option<crate::money::Usd>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_total_tokens: Option<u64>,
}

impl From<crate::budget::BudgetLimits> for BudgetView {
    fn from(b: crate::budget::BudgetLimits) -> Self {
        Self { max_cost_pico_usd: b.max_cost, max_total_tokens: b.max_total_tokens }
    }
}

impl From<BudgetView> for crate::budget::BudgetLimits {
    fn from(b: BudgetView) -> Self {
        Self { max_cost: b.max_cost_pico_usd, max_total_tokens: b.max_total_tokens }
    }
}

/// A resume of a waiting run: who, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Resumption {
    pub by: UserId,
    pub at: DateTime<Utc>,
    /// The budget it raised, for a run waiting on its budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetRaise>,
}

/// A runner taking a run over from one whose lease expired (a crash, a timeout, a stall).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Takeover {
    /// The lease holder that stopped renewing.
    pub from: String,
    /// When its lease expired.
    pub expired_at: DateTime<Utc>,
    /// The new holder, and when it took over.
    pub by: String,
    pub at: DateTime<Utc>,
}

/// The run record: snapshot of what to run, who may see it, and where it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: RunId,
    pub workflow: WorkflowName,
    /// The definition exactly as validated at start; editing the workflow later never
    /// changes a run.
    pub definition: Value,
    pub input: Value,
    /// The user who started the run.
    pub caller: UserId,
    /// Everyone whose progress feed shows this run.
    pub owners: Vec<Principal>,
    pub status: RunStatus,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub output: Option<Value>,
    pub error: Option<ErrorInfo>,
    pub totals: Totals,
    /// The definition's steps in the order validation put them (topological), so a run
    /// can be shown without validating its definition again. Empty in records stored
    /// before it existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub step_order: Vec<StepId>,
    /// Every takeover of the run from a runner that stopped renewing its lease, oldest
    /// first; bounded (see [`crate::durability::Durability::max_takeovers`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub takeovers: Vec<Takeover>,
    /// A control request not yet acted on, or the one the run ended by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlRequest>,
    /// What the run waits for while `AWAITING_INPUT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
    /// The last resume of the run, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed: Option<Resumption>,
    #[serde(default, skip_serializing_if = "RunOptions::is_default")]
    pub options: RunOptions,
    /// Decisions on its review steps, by step.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub decisions: std::collections::BTreeMap<StepId, ReviewDecision>,
    /// Every raise of its budget, oldest first; the last one's `to` is the budget it runs under.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub budget_raises: Vec<BudgetRaise>,
    /// The revision it runs (0 as started; see [`crate::revision`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: u32,
    /// Every revision after the first, oldest first (`revisions[n - 1]` started revision `n`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revisions: Vec<crate::revision::Revision>,
    /// The answers to its input steps and what they kept, by step.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub inputs: std::collections::BTreeMap<StepId, crate::input::InputState>,
    /// The stored workflow and version it was started from (`POST /workflows/{id}/runs`);
    /// `None` for a run of an inline definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<crate::stored::Pinned>,
    /// The visibility and shares it started with (`None`: a run from before they existed,
    /// `PRIVATE`). A run of a stored workflow is bounded by the workflow's access as it is
    /// when asked (see [`crate::access::effective`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<crate::access::Access>,
    /// Whether it takes its workflow's access as it is whenever asked (started without a
    /// visibility of its own), rather than its own narrowed by it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inherits_access: bool,
    /// Who owned its stored workflow when it started: they control every run of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_owner: Option<UserId>,
}

impl RunRecord {
    /// The budget the run runs under: the last raise's, else its definition's (`defined`).
    pub fn budget(&self, defined: crate::budget::BudgetLimits) -> crate::budget::BudgetLimits {
        self.budget_raises.last().map_or(defined, |raise| raise.to.into())
    }
}

impl RunRecord {
    pub fn new(workflow: WorkflowName, definition: Value, input: Value, caller: UserId, owners: Vec<Principal>, now: DateTime<Utc>) -> Self {
        Self {
            id: RunId::new(),
            step_order: Vec::new(),
            takeovers: Vec::new(),
            control: None,
            waiting: None,
            resumed: None,
            options: RunOptions::default(),
            decisions: Default::default(),
            budget_raises: Vec::new(),
            revision: 0,
            revisions: Vec::new(),
            inputs: Default::default(),
            pinned: None,
            access: None,
            inherits_access: false,
            workflow_owner: None,
            workflow,
            definition,
            input,
            caller,
            owners,
            status: RunStatus::Queued,
            created_at: now,
            started_at: None,
            finished_at: None,
            output: None,
            error: None,
            totals: Totals::default(),
        }
    }

    /// Whether `other` is this run stored again (a retried write whose reply was lost)
    /// rather than another run with its id.
    pub fn is_same_run(&self, other: &RunRecord) -> bool {
        self.id == other.id && self.created_at == other.created_at && self.caller == other.caller && self.definition == other.definition
    }

    /// A feed every event of the run updates: its starter's, or for a run started without a
    /// token its workflow owner's (see [`crate::access::run_owners`]; neither ever leaves).
    pub fn steady_feed(&self) -> Option<&Principal> {
        self.owners.first()
    }

    pub fn may_see(&self, principals: &[Principal]) -> bool {
        self.owners.iter().any(|o| principals.contains(o))
    }
}

/// One step's checkpoint: written when the step settles, read back on resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step_id: StepId,
    pub status: StepStatus,
    pub attempts: u32,
    pub model: Option<ModelId>,
    /// Parsed output (`steps.<id>.output`): JSON for `json` steps, the text otherwise.
    pub output: Option<Value>,
    /// Raw model text (`steps.<id>.text`).
    pub text: Option<String>,
    pub usage: Usage,
    pub cost: Usd,
    pub latency_ms: u64,
    pub error: Option<ErrorInfo>,
    /// What only some kinds report: a router's choice, a map's per-item outcome.
    #[serde(default)]
    pub detail: Option<Value>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Model calls the step was charged for (its attempts, a map's items), including those
    /// of runners that died while it ran.
    #[serde(default)]
    pub calls: u32,
    /// Calls of this step whose runner died before they returned (see [`Lost`]).
    #[serde(default, skip_serializing_if = "Lost::is_zero")]
    pub lost: Lost,
    /// In a `RUNNING` checkpoint: the worst case of the call in flight, written before the
    /// call is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<InFlight>,
    /// The run's revision this checkpoint belongs to (see [`crate::revision`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: u32,
}

impl StepRecord {
    pub fn settled(step_id: StepId, status: StepStatus, error: Option<ErrorInfo>, now: DateTime<Utc>) -> Self {
        Self {
            step_id,
            status,
            attempts: 0,
            model: None,
            output: None,
            text: None,
            usage: Usage::default(),
            cost: Usd::ZERO,
            latency_ms: 0,
            error,
            detail: None,
            started_at: None,
            finished_at: Some(now),
            calls: 0,
            lost: Lost::default(),
            in_flight: None,
            revision: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventType {
    RunStarted,
    RunResumed,
    RunSuspended,
    StepStarted,
    Streaming,
    MapProgress,
    BatchJob,
    StepRetrying,
    StepSkipped,
    AwaitingInput,
    StepCompleted,
    StepFailed,
    StepCancelled,
    RunCompleted,
    RunFailed,
    RunCancelled,
    RevisionStarted,
    StepOverridden,
}

impl EventType {
    /// Whether the event ends the run (or its revision).
    pub fn ends_run(self) -> bool {
        matches!(self, EventType::RunCompleted | EventType::RunFailed | EventType::RunCancelled)
    }
}

/// A progress event. `seq` is gap-free and strictly increasing per run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub run_id: RunId,
    pub seq: u64,
    pub at: DateTime<Utc>,
    #[serde(rename = "type")]
    pub kind: EventType,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub step_id: Option<StepId>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub attempt: Option<u32>,
    /// The run's revision the event belongs to (see [`crate::revision`]).
    #[serde(skip_serializing_if = "is_zero", default)]
    pub revision: u32,
    pub data: Value,
}

/// The row each owner's progress feed holds for a run, replaced on every event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressRow {
    pub run_id: RunId,
    pub workflow: WorkflowName,
    pub status: RunStatus,
    pub current_step: Option<StepId>,
    pub totals: Totals,
    pub last_seq: u64,
    pub updated_at: DateTime<Utc>,
    /// What an `AWAITING_INPUT` run waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_name_themselves_as_they_serialize() {
        for status in [RunStatus::Queued, RunStatus::Running, RunStatus::AwaitingInput, RunStatus::Completed, RunStatus::Failed, RunStatus::Cancelled]
        {
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
        for status in [
            StepStatus::Pending,
            StepStatus::Running,
            StepStatus::Waiting,
            StepStatus::Completed,
            StepStatus::Failed,
            StepStatus::Skipped,
            StepStatus::Cancelled,
        ] {
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
    }
}
