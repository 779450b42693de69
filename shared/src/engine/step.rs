//! Executing one step: announce it, run its kind, checkpoint the result, announce that.
//!
//! The checkpoint is written before the event that reports it, so a reader never sees a
//! step completed that a resumed runner would run again.

use super::daily::OwnerCap;
use super::journal::Journal;
use super::running::{Hold, Running};
use super::{EngineConfig, EngineError, router, transform};
use crate::codes::ErrorCode;
use crate::graph::{ItemStep, MapSpec, Step, StepKind, ValidatedGraph};
use crate::ids::RunId;
use crate::money::Usd;
use crate::ports::ModelClient;
use crate::pricing::{ModelRegistry, Usage};
use crate::run::{Carried, ErrorInfo, ItemRecord, Lost, StepRecord, StepStatus};
use crate::template::{self, Resolve, Slot, walk};
use crate::wire::StepDetail;
use crate::wire::events::{EventBody, StepCompleted, StepFailed};
use chrono::Utc;
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::{Map, Value};
use std::sync::Arc;
use tokio::time::Instant;
use tracing::{Instrument, info_span};

/// What a step task needs; shared by all steps of a run.
pub struct StepContext {
    /// The run's caller's daily cap, if one applies.
    pub owner_cap: Option<OwnerCap>,
    /// The run's tenant's token allowances, if any apply.
    pub throttle: Option<super::throttle::TokenThrottle>,
    pub model: Arc<dyn ModelClient>,
    pub models: Arc<ModelRegistry>,
    pub config: EngineConfig,
    pub journal: Arc<Journal>,
    pub run_id: RunId,
    /// What every model call of the run is labelled with (run, workflow, owner), for
    /// reconciling the model service's invocation log with the run's ledger.
    pub labels: std::collections::BTreeMap<String, String>,
    /// The response cache, as this run's tenant sees it.
    pub responses: Option<Responses>,
    /// Batch inference jobs, for maps that ask for them.
    pub batch: Option<super::batch::Batching>,
    /// The invocation's deadline, if it has one.
    pub deadline: Option<Instant>,
    /// Set when the run was asked to pause: work in flight finishes, nothing new starts.
    pub pausing: std::sync::atomic::AtomicBool,
    /// Review steps: the decisions made so far, and what applies to the others.
    pub reviews: super::review::Reviews,
    /// Input steps: the answers so far.
    pub collecting: super::input::Collecting,
    /// `budget.on_exceeded: pause`: a call the run's budget refuses pauses the run.
    pub pause_on_budget: bool,
    /// The first such refusal's message, once one happened.
    pub budget_refused: std::sync::Mutex<Option<String>>,
}

/// The response cache as one run uses it: its tenant's entries, kept for `ttl`.
#[derive(Clone)]
pub struct Responses {
    pub cache: Arc<dyn crate::ports::ResponseCache>,
    pub ttl: chrono::Duration,
    pub tenant: crate::ids::Principal,
    pub clock: Arc<dyn crate::durability::Clock>,
}

impl StepContext {
    /// Whether less than the deadline margin is left: no new work starts then.
    pub fn out_of_time(&self) -> bool {
        self.deadline.is_some_and(|d| d.saturating_duration_since(Instant::now()) < self.config.deadline_margin)
    }

    /// Whether `refusal` pauses the run rather than failing the call's step.
    pub fn budget_pauses(&self, refusal: &crate::wire::Refusal) -> bool {
        self.pause_on_budget && matches!(refusal, crate::wire::Refusal::Run(_))
    }

    /// Whether `work` is a call the run's budget refused while the run pauses for it: its
    /// step (or map item) does not settle, and runs again once the budget is raised.
    pub fn paused_for_budget(&self, work: &Work) -> bool {
        matches!(&work.detail, Some(crate::wire::StepDetail::Refused(r)) if self.budget_pauses(&r.budget))
    }

    /// Whether `work` did not settle and runs again later, from its first attempt: a call the
    /// budget refused while the run pauses for it, or one handed over to the next invocation
    /// to wait for its tenant's token allowance.
    pub fn interrupted(&self, work: &Work) -> bool {
        work.handed_over || self.paused_for_budget(work)
    }

    /// Whether new work (a step, a map item) may not start: the deadline is near or the
    /// run is pausing. What is under way finishes and is checkpointed.
    pub fn stopping(&self) -> bool {
        self.pausing.load(std::sync::atomic::Ordering::Relaxed) || self.out_of_time()
    }
}

/// The result of running a unit of work (a step, or one map item).
pub struct Work {
    pub output: Result<(String, Value), ErrorInfo>,
    pub usage: Usage,
    pub cost: Usd,
    pub attempts: u32,
    /// Model calls charged.
    pub calls: u32,
    /// Calls lost to runners that died mid-call (a map's items').
    pub lost: Lost,
    pub detail: Option<StepDetail>,
    /// The call was handed over to the next invocation (its tenant's token allowance could
    /// not be waited for in this one): the work did not settle.
    pub handed_over: bool,
}

/// What runners that died while a step ran left of it: their charges and lost calls, and
/// a map's item checkpoints.
#[derive(Debug, Default)]
pub struct Leftover {
    pub carried: Carried,
    pub items: Vec<ItemRecord>,
    /// The step is a review that already announced it waits, and where it stands.
    pub waiting: Option<crate::run::ReviewWait>,
    /// The step is a map whose batch job is out (or was read).
    pub batch: Option<super::batch::BatchLeft>,
}

/// How running a step ended.
// `Settled` is nearly every step's end: boxing it would cost an allocation per step on the
// path the overhead benchmark measures, to save stack space in the rare other cases.
#[allow(clippy::large_enum_variant)]
pub enum Ran {
    Settled(StepRecord),
    /// Stopped before it finished (a map near the deadline or pausing); it continues later.
    Interrupted,
    /// A review waiting for its decision (or an input step for its values), until its
    /// deadline if it has one.
    Waiting(Option<chrono::DateTime<chrono::Utc>>),
}

impl Leftover {
    /// All of it as one step's carried spend (for a step cancelled before it runs again).
    pub fn total(self) -> Carried {
        let mut total = self.carried;
        self.items.iter().for_each(|item| total.add(&item.carried()));
        // A batch job out when the step stopped counts at its worst case, as a lost call.
        if let Some(held) = self.batch.as_ref().and_then(|b| b.held) {
            total.lost.add(crate::run::Lost { calls: 1, tokens: held.tokens, cost: held.cost });
        }
        total
    }
}

impl Work {
    pub fn done(text: String, value: Value) -> Self {
        Self {
            output: Ok((text, value)),
            usage: Usage::default(),
            cost: Usd::ZERO,
            attempts: 1,
            calls: 0,
            lost: Lost::default(),
            detail: None,
            handed_over: false,
        }
    }

    pub fn failed(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            output: Err(ErrorInfo::terminal(code, message)),
            usage: Usage::default(),
            cost: Usd::ZERO,
            attempts: 1,
            calls: 0,
            lost: Lost::default(),
            detail: None,
            handed_over: false,
        }
    }

    /// Adds what dead runners spent on this work.
    pub fn add_carried(&mut self, carried: &Carried) {
        self.add_spend(carried.usage, carried.cost, carried.calls);
        self.lost.add(carried.lost);
    }

    /// Adds what `calls` more calls (an attempt, a map item's) were charged.
    pub fn add_spend(&mut self, usage: Usage, cost: Usd, calls: u32) {
        self.usage = self.usage.plus(&usage);
        self.cost = self.cost.saturating_add(cost);
        self.calls += calls;
    }
}

impl StepContext {
    /// Runs `step`; `left` is what runners that died while it ran left of it. It settles, or
    /// is interrupted (a map with items left at the deadline or a pause; a call the budget
    /// refused, when that pauses the run) with what it finished checkpointed, or waits for a
    /// review's decision.
    pub async fn run_step(&self, step: &Step, inputs: Inputs, left: Option<Leftover>) -> Result<Ran, EngineError> {
        let Leftover { carried, items, waiting, batch } = left.unwrap_or_default();
        // `attempt` is set by each model call (see `llm`); a map's items have their own.
        let span = info_span!("step", run_id = %self.run_id, step_id = %step.id, attempt = tracing::field::Empty);
        async move {
            let started_at = Utc::now();
            let clock = Instant::now();
            let model = match &step.kind {
                StepKind::Llm(spec) => Some(spec.model.clone()),
                StepKind::Map(MapSpec { step: ItemStep::Llm(spec), .. }) => Some(spec.model.clone()),
                StepKind::Input(spec) => spec.extract.as_ref().map(|e| e.model.clone()),
                _ => None,
            };
            let mut running = Running::new(step.id.clone(), model.clone(), started_at, Some(carried));
            let mut work = match &step.kind {
                // A model call announces the step itself, with its first call's reservation.
                StepKind::Llm(spec) => self.run_llm(&step.id, spec, &inputs, None, Hold::Step(&mut running)).await?,
                StepKind::Transform(spec) => {
                    running.announce(&self.journal, None).await?;
                    transform::run(spec, &inputs)
                }
                StepKind::Router(spec) => {
                    running.announce(&self.journal, None).await?;
                    router::route(spec, &inputs.to_json())
                }
                StepKind::Map(spec) => match self.run_map(&step.id, spec, &inputs, items, batch, &mut running).await? {
                    super::map::MapEnd::Done(work) => work,
                    super::map::MapEnd::Interrupted => return Ok(Ran::Interrupted),
                    super::map::MapEnd::Waiting(until) => return Ok(Ran::Waiting(Some(until))),
                },
                StepKind::Review(spec) => match self.review(&step.id, spec, &inputs, waiting, &mut running).await? {
                    Ok(work) => work,
                    Err(until) => return Ok(Ran::Waiting(until)),
                },
                StepKind::Input(spec) => match self.input(&step.id, spec, &inputs, waiting, &mut running).await? {
                    Ok(work) => work,
                    Err(until) => return Ok(Ran::Waiting(until)),
                },
            };
            if self.interrupted(&work) {
                // What it was charged so far stays on its checkpoint; it runs again, from its
                // first attempt, when the budget is raised.
                let mut record = StepRecord::settled(step.id.clone(), StepStatus::Waiting, None, started_at);
                (record.started_at, record.finished_at, record.model) = (Some(started_at), None, model.clone());
                work.add_carried(running.carried());
                (record.usage, record.cost, record.calls, record.lost) = (work.usage, work.cost, work.calls, work.lost);
                record.detail = work.detail.as_ref().map(StepDetail::to_value);
                self.journal.checkpoint(&record).await?;
                return Ok(Ran::Interrupted);
            }
            // A step that failed before calling a model has not announced itself yet.
            running.announce(&self.journal, None).await?;
            if let Ok((text, value)) = &work.output {
                let size = text.len().max(crate::output::json_len(value));
                if size > self.config.max_output_bytes {
                    let message =
                        format!("the output of step {} is {size} bytes; a step's output may have at most {}", step.id, self.config.max_output_bytes);
                    work.output = Err(ErrorInfo::terminal(ErrorCode::OutputTooLarge, message));
                }
            }
            work.add_carried(running.carried());
            let (status, text, output, error) = match work.output {
                Ok((text, value)) => (StepStatus::Completed, Some(text), Some(value), None),
                Err(e) => (StepStatus::Failed, None, None, Some(e)),
            };
            let record = StepRecord {
                step_id: step.id.clone(),
                status,
                attempts: work.attempts,
                model,
                output,
                text,
                usage: work.usage,
                cost: work.cost,
                latency_ms: clock.elapsed().as_millis() as u64,
                error,
                detail: work.detail.as_ref().map(StepDetail::to_value),
                started_at: Some(started_at),
                finished_at: Some(Utc::now()),
                calls: work.calls,
                lost: work.lost,
                in_flight: None,
                revision: self.journal.revision(),
            };
            let body = match record.status {
                StepStatus::Completed => EventBody::StepCompleted(StepCompleted {
                    model: record.model.clone(),
                    tokens: (&record.usage).into(),
                    cost: record.cost.into(),
                    latency_ms: record.latency_ms,
                    attempts: record.attempts,
                    detail: work.detail,
                }),
                _ => EventBody::StepFailed(StepFailed {
                    error: record.error.clone(),
                    attempts: record.attempts,
                    cost: record.cost.into(),
                    detail: work.detail,
                }),
            };
            let id = step.id.clone();
            let latency_ms = record.latency_ms;
            self.journal
                .emit_with(body, Some(&step.id), Some(record.attempts), Some(&record), move |s| {
                    s.step_latency_ms += latency_ms;
                    if s.current_step.as_ref() == Some(&id) {
                        s.current_step = None;
                    }
                })
                .await?;
            Ok(Ran::Settled(record))
        }
        .instrument(span)
        .await
    }
}

/// What a step's templates and expressions read: `input`, and `steps.<id>.{output,text,status}`
/// for its own dependencies only (a step cannot read what it does not wait for). It shares
/// the run's input and its dependencies' records, so building one copies nothing; templates
/// serialize it directly and CEL reads it as JSON ([`Scope::to_json`]).
#[derive(Clone)]
pub struct Inputs {
    input: Arc<Value>,
    steps: Vec<Arc<StepRecord>>,
}

impl Inputs {
    /// The inputs of a step depending on `deps`, from the records settled so far.
    pub fn of(input: &Arc<Value>, records: &[Option<Arc<StepRecord>>], deps: &[usize]) -> Self {
        Self { input: input.clone(), steps: deps.iter().filter_map(|&d| records[d].clone()).collect() }
    }

    /// A map item's inputs: these, with `item` and `index`.
    pub fn with_item<'a>(&'a self, item: &'a Value, index: usize) -> ItemInputs<'a> {
        ItemInputs { inputs: self, item, index }
    }

    fn serialize_entries<M: SerializeMap>(&self, map: &mut M) -> Result<(), M::Error> {
        map.serialize_entry("input", self.input.as_ref())?;
        map.serialize_entry("steps", &StepsView(&self.steps))
    }
}

/// What templates and expressions evaluate against.
pub trait Scope: Serialize + Resolve + Sync {
    /// The scope as JSON, for CEL. These shapes have string keys and JSON values only, so
    /// serializing them cannot fail.
    fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

impl Scope for Inputs {}
impl Scope for ItemInputs<'_> {}

/// The same lookups as through the serialized form, without serializing.
impl Resolve for Inputs {
    fn resolve(&self, path: &[&str]) -> Option<Slot<'_>> {
        match path {
            ["input", rest @ ..] => walk(&self.input, rest).map(Slot::Json),
            ["steps", id, field, rest @ ..] => {
                let record = self.steps.iter().find(|r| r.step_id.as_str() == *id)?;
                match (*field, rest) {
                    ("output", rest) => walk(record.output.as_ref()?, rest).map(Slot::Json),
                    ("text", []) => record.text.as_deref().map(Slot::Text),
                    ("status", []) => Some(Slot::Text(record.status.as_str())),
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

impl Resolve for ItemInputs<'_> {
    fn resolve(&self, path: &[&str]) -> Option<Slot<'_>> {
        match path {
            ["item", rest @ ..] => walk(self.item, rest).map(Slot::Json),
            ["index"] => Some(Slot::Number(self.index as u64)),
            _ => self.inputs.resolve(path),
        }
    }
}

impl Serialize for Inputs {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(2))?;
        self.serialize_entries(&mut map)?;
        map.end()
    }
}

/// A map item's scope: the step's inputs plus `item` and `index`.
pub struct ItemInputs<'a> {
    inputs: &'a Inputs,
    item: &'a Value,
    index: usize,
}

impl Serialize for ItemInputs<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(4))?;
        self.inputs.serialize_entries(&mut map)?;
        map.serialize_entry("item", self.item)?;
        map.serialize_entry("index", &self.index)?;
        map.end()
    }
}

/// `steps`: each dependency's output, text and status by step id.
struct StepsView<'a>(&'a [Arc<StepRecord>]);

impl Serialize for StepsView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Seen<'a> {
            output: &'a Option<Value>,
            text: &'a Option<String>,
            status: StepStatus,
        }
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for r in self.0 {
            map.serialize_entry(r.step_id.as_str(), &Seen { output: &r.output, text: &r.text, status: r.status })?;
        }
        map.end()
    }
}

/// The run's output: the workflow's `output` template over every step, or else every
/// completed sink step's output by id.
pub fn run_output(input: &Arc<Value>, graph: &ValidatedGraph, records: &[Option<Arc<StepRecord>>]) -> Result<Value, template::TemplateError> {
    match &graph.output() {
        Some(source) => {
            let all: Vec<usize> = (0..graph.steps().len()).collect();
            source.render(&Inputs::of(input, records, &all)).map(Value::String)
        }
        None => {
            let mut out = Map::new();
            for (i, step) in graph.steps().iter().enumerate() {
                if graph.dependents(i).is_empty()
                    && let Some(r) = &records[i]
                    && r.status == StepStatus::Completed
                {
                    out.insert(step.id.to_string(), r.output.clone().unwrap_or(Value::Null));
                }
            }
            Ok(Value::Object(out))
        }
    }
}

/// A value shortened for an error message.
pub fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 { format!("{}…", &s[..s.char_indices().nth(80).map_or(s.len(), |(i, _)| i)]) } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::StepId;
    use serde_json::json;

    fn record(id: &str, status: StepStatus, output: Option<Value>, text: Option<&str>) -> Option<Arc<StepRecord>> {
        let mut r = StepRecord::settled(StepId::parse(id).unwrap(), status, None, Utc::now());
        r.output = output;
        r.text = text.map(str::to_owned);
        Some(Arc::new(r))
    }

    fn printed(slot: Option<Slot<'_>>) -> Option<String> {
        match slot? {
            Slot::Text(t) => Some(t.to_owned()),
            Slot::Json(Value::String(s)) => Some(s.clone()),
            Slot::Json(v) => Some(v.to_string()),
            Slot::Number(n) => Some(n.to_string()),
        }
    }

    #[test]
    fn a_scope_resolves_a_path_to_what_its_serialized_form_holds_there() {
        let input = Arc::new(json!({ "q": "why", "n": { "m": 2 } }));
        let records = [
            record("a", StepStatus::Completed, Some(json!({ "x": [1], "y": { "z": "deep" } })), Some("A")),
            record("b", StepStatus::Skipped, None, None),
            record("hidden", StepStatus::Completed, Some(json!(1)), Some("H")),
        ];
        let inputs = Inputs::of(&input, &records, &[0, 1]);
        let item = json!({ "k": "v" });
        let item_inputs = inputs.with_item(&item, 7);
        let paths: [&[&str]; 17] = [
            &["input"],
            &["input", "q"],
            &["input", "n", "m"],
            &["input", "nope"],
            &["steps"],
            &["steps", "a"],
            &["steps", "a", "output"],
            &["steps", "a", "output", "y", "z"],
            &["steps", "a", "text"],
            &["steps", "a", "status"],
            &["steps", "b", "status"],
            &["steps", "b", "output", "x"],
            &["steps", "hidden", "text"],
            &["steps", "a", "text", "len"],
            &["item", "k"],
            &["index"],
            &["other"],
        ];
        let (serialized, item_serialized) = (inputs.to_json(), item_inputs.to_json());
        for path in paths {
            let direct = printed(inputs.resolve(path));
            // The direct lookup may decline (then minijinja renders), but never disagrees.
            if direct.is_some() {
                assert_eq!(direct, printed(walk(&serialized, path).map(Slot::Json)), "{path:?}");
            }
            let direct = printed(item_inputs.resolve(path));
            if direct.is_some() {
                assert_eq!(direct, printed(walk(&item_serialized, path).map(Slot::Json)), "{path:?}");
            }
        }
        assert_eq!(printed(inputs.resolve(&["steps", "a", "status"])).as_deref(), Some("COMPLETED"));
        assert_eq!(printed(item_inputs.resolve(&["index"])).as_deref(), Some("7"));
        assert!(inputs.resolve(&["steps", "hidden", "text"]).is_none(), "a step reads only its dependencies");
    }

    #[test]
    fn a_status_prints_as_it_serializes() {
        use StepStatus::*;
        for s in [Pending, Running, Completed, Failed, Skipped, Cancelled] {
            assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
        }
    }
}
