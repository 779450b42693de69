//! The shapes of the API's answers the CLI reads field by field (events, a run, its graph).
//! They are the CLI's own, lenient on purpose: a field the API adds is ignored, one a
//! step has not got yet defaults. Everything else is passed through as JSON
//! (`serde_json::Value`), so `--json` prints what the API said, unchanged.

use serde::Deserialize;
use serde_json::Value;

/// One progress event (`GET /runs/{id}/events`); `data` has one shape per `type`.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub step_id: Option<String>,
    #[serde(default)]
    pub attempt: Option<u32>,
    #[serde(default)]
    pub data: Value,
}

#[derive(Debug, Deserialize)]
pub struct EventsPage {
    pub events: Vec<Event>,
    pub last_seq: u64,
    pub status: String,
}

/// `GET /runs/{id}`.
#[derive(Debug, Clone, Deserialize)]
pub struct Run {
    pub run_id: String,
    pub workflow: String,
    pub status: String,
    #[serde(default)]
    pub error: Option<ErrorInfo>,
    pub totals: Totals,
    #[serde(default)]
    pub output: Option<Value>,
    #[serde(default)]
    pub output_ref: Option<DocumentRef>,
    #[serde(default)]
    pub waiting: Option<Waiting>,
    #[serde(default)]
    pub revision: u32,
    #[serde(default)]
    pub revisions: Vec<Revision>,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub finished_at: Option<String>,
    #[serde(default)]
    pub caller: Option<String>,
    pub steps: Vec<Step>,
}

/// A step of a run; one without a checkpoint yet has only its id, status and attempts.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Step {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default)]
    pub cost_usd: Option<String>,
    #[serde(default)]
    pub latency_ms: Option<u64>,
    #[serde(default)]
    pub output: Option<Value>,
    #[serde(default)]
    pub error: Option<ErrorInfo>,
    #[serde(default)]
    pub detail: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Totals {
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
    #[serde(default)]
    pub cost_usd: Option<String>,
    #[serde(default)]
    pub model_calls: u64,
    #[serde(default)]
    pub step_latency_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for ErrorInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct DocumentRef {
    pub href: String,
    pub bytes: u64,
}

/// What an `AWAITING_INPUT` run waits for.
#[derive(Debug, Clone, Deserialize)]
pub struct Waiting {
    pub kind: String,
    #[serde(default)]
    pub steps: Vec<String>,
    #[serde(default)]
    pub by: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub deadline: Option<String>,
}

/// A map's batch inference job (`BATCH_JOB`'s data, and a map's `detail.batch`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BatchJob {
    /// The job's id at the model service (an ARN on Bedrock).
    pub job: String,
    /// As the service says it: `Submitted`, `InProgress`, `Completed`, `Failed`, …
    pub status: String,
    #[serde(default)]
    pub records: u64,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub next_poll_at: Option<String>,
    /// Once its answers are read: records answered at the batch price…
    #[serde(default)]
    pub answered: Option<u64>,
    /// …and items run again as ordinary calls.
    #[serde(default)]
    pub online: Option<u64>,
}

impl BatchJob {
    /// Whether its answers have been read: the map goes on without it.
    pub fn is_read(&self) -> bool {
        self.answered.is_some()
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Revision {
    pub revision: u32,
    pub kind: String,
    pub step: String,
    pub by: String,
    #[serde(default)]
    pub comment: Option<String>,
    #[serde(default)]
    pub rerun: Vec<String>,
    pub previous_status: String,
}

/// `GET /runs/{id}/graph`: the run's steps in topological order, with their wiring.
#[derive(Debug, Clone, Deserialize)]
pub struct Graph {
    pub workflow: String,
    pub steps: Vec<GraphStep>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GraphStep {
    pub id: String,
    pub kind: String,
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// `all` or `any`.
    #[serde(default)]
    pub join: Option<String>,
    #[serde(default = "yes")]
    pub required: bool,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub stream: bool,
    /// A map: what each of its items is (`llm` or `transform`).
    #[serde(default)]
    pub item: Option<String>,
    /// A router's routes, in order.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// A router's default targets.
    #[serde(default)]
    pub default: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Route {
    /// The route's CEL condition, as written.
    pub when: String,
    #[serde(default)]
    pub to: Vec<String>,
}

fn yes() -> bool {
    true
}

impl Run {
    /// Whether it waits for a person (or for its budget): a run whose maps wait for their
    /// batch jobs does not, a runner takes it back by itself.
    pub fn waits_for_a_person(&self) -> bool {
        self.status == "AWAITING_INPUT" && self.waiting.as_ref().is_none_or(|w| w.kind != BATCH_WAIT)
    }
}

/// `waiting.kind` of a run whose maps wait for their batch inference jobs.
pub const BATCH_WAIT: &str = "batch";

/// Statuses a run ends with.
pub fn is_terminal(status: &str) -> bool {
    matches!(status, "COMPLETED" | "FAILED" | "CANCELLED")
}
