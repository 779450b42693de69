//! The engine: runs one claimed run's graph to the end (or to the invocation's deadline).
//!
//! Scheduling is dataflow: a step is considered the moment its last dependency settles
//! (in-degree counting, so a 10,000-step graph costs O(steps + edges), never waves). Each
//! step runs as its own task, at most `max_concurrency` at once; the scheduler only decides
//! what may start and what is skipped. Every settled step is checkpointed before its event
//! is published, so a runner that takes over a crashed run resumes from checkpoints and
//! never re-runs a completed step.
//!
//! Events go through one [`Progress`] publisher that holds a lock across the write, which
//! is what makes `seq` gap-free and strictly increasing even with steps in parallel.
//!
//! The same publisher holds the run's budget [`Ledger`], the one record of what the run's
//! model calls were charged: totals in events, progress rows and the run record are read
//! from it. Every model call reserves its worst case there first and is not made if that
//! does not fit (`BUDGET_EXCEEDED`); see [`crate::budget`].

use crate::budget::{self, BudgetExceeded, BudgetLimits, Ledger, Reservation};
use crate::graph::{ItemStep, LlmSpec, MapSpec, RouterSpec, Step, StepKind, TransformSpec, ValidatedGraph};
use crate::ids::{Principal, RunId, StepId};
use crate::money::Usd;
use crate::output;
use crate::ports::{
    DailySpend, Lease, ModelClient, ModelError, ModelErrorKind, ModelReply, ModelRequest, ProgressError, ProgressSink, RunStore, StoreError,
};
use crate::pricing::{ModelRegistry, Usage};
use crate::run::{ErrorInfo, Event, EventType, ProgressRow, RunRecord, RunStatus, StepRecord, StepStatus, Totals};
use crate::spend::{DailyCapExceeded, DailyCaps};
use crate::template::{self, Template};
use crate::workflow::{ItemFailure, Join, RetryPolicy};
use chrono::{NaiveDate, Utc};
use futures::StreamExt;
use rand::Rng;
use serde_json::{Map, Value, json};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

/// A map fans out over at most this many items (each is a model call or more).
pub const MAX_MAP_ITEMS: usize = 1000;

/// Tunables with production defaults; tests shrink them.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// A `STREAMING` event is written at least this often while text arrives…
    pub stream_flush_interval: Duration,
    /// …or as soon as this many bytes are buffered, whichever comes first.
    pub stream_flush_bytes: usize,
    /// Stop starting steps when less than this remains before the deadline.
    pub deadline_margin: Duration,
    /// Larger outputs are refused (a checkpoint is one DynamoDB item, 400 KB). A step's own
    /// limit can be lower: see [`EngineConfig::reply_limit`].
    pub max_output_bytes: usize,
    /// Write a `RUNNING` checkpoint when a model step starts, so snapshots show what is in
    /// flight. Costs one write per model step.
    pub checkpoint_running: bool,
    /// Definition limits applied when the run's snapshot is validated.
    pub limits: crate::graph::Limits,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            stream_flush_interval: Duration::from_millis(250),
            stream_flush_bytes: 2048,
            deadline_margin: Duration::from_secs(90),
            max_output_bytes: 160 * 1024,
            checkpoint_running: true,
            limits: crate::graph::Limits::default(),
        }
    }
}

/// A reply longer than this many bytes per `max_tokens` token is refused. English runs
/// about 4 bytes a token and code about 3; a reply averaging 32 over its whole length is a
/// degenerate run (a model repeating a long separator), not an answer. The limit is what
/// lets an estimate bound a prompt that pastes an upstream reply by the upstream step's
/// `max_tokens` rather than by the 160 KiB checkpoint limit.
pub const MAX_REPLY_BYTES_PER_TOKEN: usize = 32;

impl EngineConfig {
    /// The most bytes a reply of a step with this `max_tokens` may have.
    pub fn reply_limit(&self, max_tokens: u32) -> usize {
        (max_tokens as usize).saturating_mul(MAX_REPLY_BYTES_PER_TOKEN).min(self.max_output_bytes)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Finished(RunStatus),
    /// The deadline came first: checkpoints are saved and the lease released; the caller
    /// dispatches the run again to continue.
    Suspended,
}

/// Infrastructure failures that stop the engine (model failures are step outcomes, not these).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Progress(#[from] ProgressError),
}

impl EngineError {
    pub fn retryable(&self) -> bool {
        match self {
            EngineError::Store(e) => e.retryable(),
            EngineError::Progress(e) => e.retryable(),
        }
    }
}

#[derive(Clone)]
pub struct Engine {
    model: Arc<dyn ModelClient>,
    store: Arc<dyn RunStore>,
    sink: Arc<dyn ProgressSink>,
    models: Arc<ModelRegistry>,
    config: EngineConfig,
    /// Per-owner daily spend caps and the counters they are checked against.
    daily: Option<(Arc<dyn DailySpend>, Arc<DailyCaps>)>,
}

/// Scheduler bookkeeping: which steps have settled and which may be decided next.
struct Schedule {
    records: Vec<Option<StepRecord>>,
    /// Unsettled dependencies per step.
    waiting: Vec<usize>,
    /// Steps whose dependencies have all settled, not yet decided.
    candidates: VecDeque<usize>,
}

impl Schedule {
    fn new(graph: &ValidatedGraph, records: Vec<Option<StepRecord>>) -> Self {
        let waiting: Vec<usize> = graph.steps.iter().map(|s| s.deps.iter().filter(|&&d| records[d].is_none()).count()).collect();
        let candidates = (0..graph.steps.len()).filter(|&i| records[i].is_none() && waiting[i] == 0).collect();
        Self { records, waiting, candidates }
    }

    fn settle(&mut self, graph: &ValidatedGraph, i: usize, record: StepRecord) {
        self.records[i] = Some(record);
        for &d in &graph.dependents[i] {
            self.waiting[d] -= 1;
            if self.waiting[d] == 0 && self.records[d].is_none() {
                self.candidates.push_back(d);
            }
        }
    }
}

impl Engine {
    pub fn new(
        model: Arc<dyn ModelClient>,
        store: Arc<dyn RunStore>,
        sink: Arc<dyn ProgressSink>,
        models: Arc<ModelRegistry>,
        config: EngineConfig,
    ) -> Self {
        Self { model, store, sink, models, config, daily: None }
    }

    /// The same engine, also checking every model call against its run's caller's daily
    /// spend cap (see [`crate::spend`]). Without caps for anyone, nothing changes.
    pub fn with_daily_caps(mut self, spend: Arc<dyn DailySpend>, caps: DailyCaps) -> Self {
        self.daily = (!caps.is_none()).then(|| (spend, Arc::new(caps)));
        self
    }

    /// The same engine with another deadline margin (the runner shrinks it for short
    /// invocations).
    pub fn with_deadline_margin(mut self, margin: Duration) -> Self {
        self.config.deadline_margin = margin;
        self
    }

    /// Executes a run this runner has claimed under `lease`: validates its snapshot, then
    /// runs the graph.
    pub async fn execute(&self, mut run: RunRecord, lease: Lease, deadline: Option<Instant>) -> Result<Outcome, EngineError> {
        match crate::graph::validate_json_with(&run.definition, &self.models, self.config.limits) {
            Ok(graph) => self.execute_validated(run, Arc::new(graph), lease, deadline).await,
            Err(invalid) => {
                // Validated at start; this only happens if the price registry changed since.
                let error = ErrorInfo { code: "INVALID_WORKFLOW".into(), message: invalid.to_string(), retryable: false };
                let progress = Progress::new(self.sink.clone(), &run, self.sink.last_seq(&run.id).await?, Totals::default(), BudgetLimits::UNLIMITED);
                self.finish(&mut run, &lease, &progress, RunStatus::Failed, None, Some(error)).await
            }
        }
    }

    /// Runs `graph`, which must be the validated form of `run.definition`. The graph is
    /// shared with step tasks, which borrow their step instead of copying it.
    pub async fn execute_validated(
        &self,
        mut run: RunRecord,
        graph: Arc<ValidatedGraph>,
        lease: Lease,
        deadline: Option<Instant>,
    ) -> Result<Outcome, EngineError> {
        let span = info_span!("run", run_id = %run.id, workflow = %run.workflow);
        async move {
            let n = graph.steps.len();
            let mut records: Vec<Option<StepRecord>> = vec![None; n];
            let index: HashMap<&str, usize> = graph.steps.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
            for saved in self.store.get_steps(&run.id).await? {
                if let Some(&i) = index.get(saved.step_id.as_str())
                    && saved.status.is_settled()
                {
                    records[i] = Some(saved);
                }
            }
            let mut totals = Totals::default();
            for r in records.iter().flatten() {
                charge(&mut totals, r);
            }
            let last_seq = self.sink.last_seq(&run.id).await?;
            // Spend already checkpointed counts against the budget of a resumed run.
            let progress = Arc::new(Progress::new(self.sink.clone(), &run, last_seq, totals, graph.budget));
            if last_seq == 0 {
                progress.emit(EventType::RunStarted, None, None, json!({ "workflow": run.workflow, "steps": n }), |_| {}).await?;
            } else {
                info!(resumed_steps = records.iter().flatten().count(), last_seq, "resuming run");
            }
            let owner_cap = self
                .daily
                .as_ref()
                .and_then(|(spend, caps)| caps.cap_for(&run.caller).map(|cap| OwnerCap { spend: spend.clone(), owner: run.caller.clone(), cap }));
            let shared = Arc::new(StepContext {
                owner_cap,
                model: self.model.clone(),
                store: self.store.clone(),
                models: self.models.clone(),
                config: self.config.clone(),
                progress: progress.clone(),
                run_id: run.id.clone(),
                lease: lease.clone(),
            });

            let mut schedule = Schedule::new(&graph, records);
            let mut ready: VecDeque<usize> = VecDeque::new();
            let mut running: JoinSet<(usize, Result<StepRecord, EngineError>)> = JoinSet::new();
            let max_running = graph.max_concurrency as usize;
            let mut failure: Option<(StepId, ErrorInfo)> = None;
            let mut out_of_time = false;
            loop {
                // Decide every step whose dependencies have settled; skips cascade through here.
                while let Some(i) = schedule.candidates.pop_front() {
                    match decide(&graph, i, &schedule.records) {
                        Decision::Run => ready.push_back(i),
                        Decision::Skip(reason) => {
                            let record = StepRecord::settled(graph.steps[i].id.clone(), StepStatus::Skipped, None, Utc::now());
                            self.store.save_step(&run.id, &lease, &record).await?;
                            progress.emit(EventType::StepSkipped, Some(&record.step_id), None, json!({ "reason": reason }), |_| {}).await?;
                            schedule.settle(&graph, i, record);
                        }
                    }
                }
                if failure.is_none()
                    && !out_of_time
                    && let Some(d) = deadline
                    && d.saturating_duration_since(Instant::now()) < self.config.deadline_margin
                {
                    info!("deadline near: starting no more steps");
                    out_of_time = true;
                }
                if failure.is_none() && !out_of_time {
                    while running.len() < max_running
                        && let Some(i) = ready.pop_front()
                    {
                        let context = template_context(&run.input, &graph, &schedule.records, &graph.steps[i].deps);
                        let (shared, graph) = (shared.clone(), graph.clone());
                        running.spawn(async move { (i, shared.run_step(&graph.steps[i], context).await) });
                    }
                }
                let Some(joined) = running.join_next().await else { break };
                let (i, result) = match joined {
                    Ok(r) => r,
                    Err(e) => {
                        // A panicking step is a defect; fail the run rather than hang.
                        warn!(error = %e, "step task panicked");
                        let error = ErrorInfo { code: "INTERNAL".into(), message: "a step task panicked".into(), retryable: false };
                        failure.get_or_insert((graph.steps[0].id.clone(), error));
                        continue;
                    }
                };
                let record = result?;
                if record.status == StepStatus::Failed && graph.steps[i].required && failure.is_none() {
                    let error =
                        record.error.clone().unwrap_or_else(|| ErrorInfo { code: "STEP_FAILED".into(), message: "failed".into(), retryable: false });
                    failure = Some((record.step_id.clone(), error));
                }
                schedule.settle(&graph, i, record);
            }
            let mut records = schedule.records;

            if let Some((step, error)) = failure {
                let mut cancelled = Vec::new();
                for (slot, step) in records.iter_mut().zip(&graph.steps) {
                    if slot.is_none() {
                        let record = StepRecord::settled(step.id.clone(), StepStatus::Cancelled, None, Utc::now());
                        self.store.save_step(&run.id, &lease, &record).await?;
                        cancelled.push(record.step_id.to_string());
                        *slot = Some(record);
                    }
                }
                let error =
                    ErrorInfo { code: error.code.clone(), message: format!("step {step} failed: {}", error.message), retryable: error.retryable };
                debug!(?cancelled, "cancelled unstarted steps");
                return self.finish(&mut run, &lease, &progress, RunStatus::Failed, None, Some(error)).await;
            }
            if records.iter().any(Option::is_none) {
                self.store.release(&run.id, &lease).await?;
                info!("suspended before the deadline; checkpoints saved");
                return Ok(Outcome::Suspended);
            }
            match run_output(&run.input, &graph, &records) {
                Ok(output) => self.finish(&mut run, &lease, &progress, RunStatus::Completed, Some(output), None).await,
                Err(e) => {
                    let error =
                        ErrorInfo { code: "OUTPUT_TEMPLATE".into(), message: format!("the workflow output template failed: {e}"), retryable: false };
                    self.finish(&mut run, &lease, &progress, RunStatus::Failed, None, Some(error)).await
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn finish(
        &self,
        run: &mut RunRecord,
        lease: &Lease,
        progress: &Progress,
        status: RunStatus,
        output: Option<Value>,
        error: Option<ErrorInfo>,
    ) -> Result<Outcome, EngineError> {
        run.status = status;
        run.finished_at = Some(Utc::now());
        run.totals = progress.totals().await;
        let open = progress.open_reservations();
        if open > 0 {
            // Only a step task that panicked mid-call leaves one; the spend it held is unknown.
            warn!(open, "budget reservations still held at the end of the run");
        }
        run.output = output;
        run.error = error;
        // The store is the source of truth: record the end first, then announce it.
        self.store.finish_run(run, lease).await?;
        let totals = totals_json(&run.totals);
        let (kind, data) = match status {
            RunStatus::Completed => (EventType::RunCompleted, json!({ "output": run.output, "totals": totals })),
            RunStatus::Cancelled => (EventType::RunCancelled, json!({ "totals": totals })),
            _ => (EventType::RunFailed, json!({ "error": run.error, "totals": totals })),
        };
        progress
            .emit(kind, None, None, data, |s| {
                s.status = status;
                s.current_step = None;
            })
            .await?;
        info!(status = ?status, cost_pico = run.totals.cost.pico(), tokens = run.totals.total_tokens(), "run finished");
        Ok(Outcome::Finished(status))
    }
}

#[derive(Debug, PartialEq)]
enum Decision {
    Run,
    Skip(String),
}

/// Whether a step whose dependencies have all settled runs or is skipped.
fn decide(graph: &ValidatedGraph, i: usize, records: &[Option<StepRecord>]) -> Decision {
    let step = &graph.steps[i];
    let settled = |d: usize| records[d].as_ref().map(|r| r.status);
    // A router that did not choose this step switches it off, whatever the join.
    for &d in &step.deps {
        if let StepKind::Router(router) = &graph.steps[d].kind
            && router.targets().any(|t| t == &step.id)
            && settled(d) == Some(StepStatus::Completed)
            && !router_chose(records[d].as_ref(), &step.id)
        {
            return Decision::Skip(format!("not chosen by router {}", graph.steps[d].id));
        }
    }
    let completed = step.deps.iter().filter(|&&d| settled(d) == Some(StepStatus::Completed)).count();
    match step.join {
        Join::All if completed == step.deps.len() => Decision::Run,
        Join::All => {
            let blocker = step.deps.iter().find_map(|&d| records[d].as_ref().filter(|r| r.status != StepStatus::Completed));
            Decision::Skip(blocker.map(|r| format!("dependency {} is {:?}", r.step_id, r.status).to_lowercase()).unwrap_or_default())
        }
        Join::Any if completed > 0 || step.deps.is_empty() => Decision::Run,
        Join::Any => Decision::Skip("no dependency completed".into()),
    }
}

fn router_chose(record: Option<&StepRecord>, step: &StepId) -> bool {
    record
        .and_then(|r| r.output.as_ref())
        .and_then(|o| o.get("selected"))
        .and_then(Value::as_array)
        .is_some_and(|selected| selected.iter().any(|s| s.as_str() == Some(step.as_str())))
}

/// What a step's templates and expressions see: `input`, and `steps.<id>.{output,text,status}`
/// for its own dependencies only (a step cannot read what it does not wait for).
fn template_context(input: &Value, graph: &ValidatedGraph, records: &[Option<StepRecord>], deps: &[usize]) -> Value {
    let mut steps = Map::new();
    for &d in deps {
        if let Some(r) = &records[d] {
            steps.insert(graph.steps[d].id.to_string(), json!({ "output": r.output, "text": r.text, "status": r.status }));
        }
    }
    json!({ "input": input, "steps": steps })
}

fn run_output(input: &Value, graph: &ValidatedGraph, records: &[Option<StepRecord>]) -> Result<Value, template::TemplateError> {
    match &graph.output {
        Some(source) => {
            let all: Vec<usize> = (0..graph.steps.len()).collect();
            source.render(&template_context(input, graph, records, &all)).map(Value::String)
        }
        None => {
            let mut out = Map::new();
            for (i, step) in graph.steps.iter().enumerate() {
                if graph.dependents[i].is_empty()
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

fn charge(totals: &mut Totals, r: &StepRecord) {
    if r.attempts > 0 {
        totals.add_call(&r.usage, r.cost);
        totals.step_latency_ms += r.latency_ms;
    }
}

/// Totals as clients see them: money as an exact decimal string plus the integer.
pub fn totals_json(t: &Totals) -> Value {
    json!({
        "input_tokens": t.input_tokens,
        "output_tokens": t.output_tokens,
        "cache_read_tokens": t.cache_read_tokens,
        "cache_write_tokens": t.cache_write_tokens,
        "total_tokens": t.total_tokens(),
        "cost_usd": t.cost.to_string(),
        "cost_pico_usd": t.cost.pico(),
        "model_calls": t.model_calls,
        "step_latency_ms": t.step_latency_ms,
    })
}

/// The one writer of a run's events: holds the seq counter, the owners' row and the
/// run's budget ledger.
struct Progress {
    sink: Arc<dyn ProgressSink>,
    run_id: RunId,
    workflow: String,
    owners: Vec<Principal>,
    state: Mutex<ProgressState>,
    /// A plain mutex: it is only ever held for a few integer operations, never across an
    /// await. `emit` takes it while holding `state`; nothing takes them the other way round.
    ledger: std::sync::Mutex<Ledger>,
}

struct ProgressState {
    last_seq: u64,
    status: RunStatus,
    current_step: Option<StepId>,
    /// Sum of step latencies; everything else in the run's totals is the ledger's.
    step_latency_ms: u64,
}

impl Progress {
    fn new(sink: Arc<dyn ProgressSink>, run: &RunRecord, last_seq: u64, totals: Totals, budget: BudgetLimits) -> Self {
        Self {
            sink,
            run_id: run.id.clone(),
            workflow: run.workflow.clone(),
            owners: run.owners.clone(),
            state: Mutex::new(ProgressState { last_seq, status: RunStatus::Running, current_step: None, step_latency_ms: totals.step_latency_ms }),
            ledger: std::sync::Mutex::new(Ledger::new(budget, totals)),
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        // Ledger methods do not panic, so a poisoned lock still holds consistent sums.
        self.ledger.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn totals_with(&self, state: &ProgressState) -> Totals {
        Totals { step_latency_ms: state.step_latency_ms, ..*self.ledger().spent() }
    }

    async fn totals(&self) -> Totals {
        let state = self.state.lock().await;
        self.totals_with(&state)
    }

    fn reserve(&self, want: budget::Amount) -> Result<Reservation, BudgetExceeded> {
        self.ledger().reserve(want)
    }

    /// Charges a call's reported usage against the budget and the run's totals.
    fn settle(&self, reservation: Reservation, usage: &Usage, cost: Usd) {
        let held = reservation.amount();
        let charged = budget::Amount::charged(usage, cost);
        if !charged.within(held) {
            // The estimate's bound was broken (or the model ignored max_tokens): the
            // usage is charged all the same, and the next reservation sees it.
            warn!(reserved = %held, charged = %charged, "budget overrun: a model call used more than its reservation");
        }
        self.ledger().settle(reservation, usage, cost);
    }

    fn release(&self, reservation: Reservation) {
        self.ledger().release(reservation);
    }

    fn open_reservations(&self) -> usize {
        self.ledger().open_reservations()
    }

    /// Appends one event (next seq) and updates every owner's row. The lock is held
    /// across the write so events land in seq order.
    async fn emit(
        &self,
        kind: EventType,
        step: Option<&StepId>,
        attempt: Option<u32>,
        data: Value,
        change: impl FnOnce(&mut ProgressState),
    ) -> Result<(), ProgressError> {
        let mut state = self.state.lock().await;
        change(&mut state);
        let seq = state.last_seq + 1;
        let now = Utc::now();
        let event = Event { run_id: self.run_id.clone(), seq, at: now, kind, step_id: step.cloned(), attempt, data };
        let row = ProgressRow {
            run_id: self.run_id.clone(),
            workflow: self.workflow.clone(),
            status: state.status,
            current_step: state.current_step.clone(),
            totals: self.totals_with(&state),
            last_seq: seq,
            updated_at: now,
        };
        let mut tries = 0;
        loop {
            match self.sink.publish(&event, &row, &self.owners).await {
                Ok(()) => break,
                Err(e) if e.retryable() && tries < 3 => {
                    tries += 1;
                    warn!(error = %e, seq, "progress write failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 << tries)).await;
                }
                Err(e) => return Err(e),
            }
        }
        state.last_seq = seq;
        debug!(seq, event = ?kind, step_id = step.map(StepId::as_str), "event published");
        Ok(())
    }
}

/// What a step task needs; shared by all steps of a run.
struct StepContext {
    /// The run's caller's daily cap, if one applies.
    owner_cap: Option<OwnerCap>,
    model: Arc<dyn ModelClient>,
    store: Arc<dyn RunStore>,
    models: Arc<ModelRegistry>,
    config: EngineConfig,
    progress: Arc<Progress>,
    run_id: RunId,
    lease: Lease,
}

/// One owner's daily spend cap, as a run checks its calls against it.
struct OwnerCap {
    spend: Arc<dyn DailySpend>,
    owner: String,
    cap: Usd,
}

/// A call's hold on its owner's day, until settled.
struct DayReservation {
    day: NaiveDate,
    amount: Usd,
}

impl OwnerCap {
    /// Holds the call's worst-case cost on today's counter if it fits under the cap.
    async fn reserve(&self, attempted: budget::Amount) -> Result<Result<DayReservation, DailyCapExceeded>, StoreError> {
        let day = Utc::now().date_naive();
        Ok(match self.spend.reserve(&self.owner, day, attempted.cost, self.cap).await? {
            Ok(()) => Ok(DayReservation { day, amount: attempted.cost }),
            Err(counter) => Err(DailyCapExceeded { owner: self.owner.clone(), day, cap: self.cap, committed: counter.committed, attempted }),
        })
    }

    /// Replaces the hold by what the call was charged.
    async fn settle(&self, reservation: DayReservation, charged: Usd) {
        if let Err(e) = self.spend.settle(&self.owner, reservation.day, reservation.amount, charged).await {
            // The hold stays on the counter until the day ends: the cap errs towards refusing.
            warn!(error = %e, owner = %self.owner, "could not settle a daily spend reservation");
        }
    }
}

/// How one model attempt ended.
enum AttemptError {
    Model(ModelError),
    Output(output::InvalidOutput),
}

/// The result of running a unit of work (a step, or one map item).
struct Work {
    output: Result<(String, Value), ErrorInfo>,
    usage: Usage,
    cost: Usd,
    attempts: u32,
    detail: Option<Value>,
}

impl Work {
    fn done(text: String, value: Value) -> Self {
        Self { output: Ok((text, value)), usage: Usage::default(), cost: Usd::ZERO, attempts: 1, detail: None }
    }

    fn failed(code: &str, message: impl Into<String>) -> Self {
        Self {
            output: Err(ErrorInfo { code: code.into(), message: message.into(), retryable: false }),
            usage: Usage::default(),
            cost: Usd::ZERO,
            attempts: 1,
            detail: None,
        }
    }
}

impl StepContext {
    async fn run_step(&self, step: &Step, context: Value) -> Result<StepRecord, EngineError> {
        let span = info_span!("step", run_id = %self.run_id, step_id = %step.id);
        async move {
            let started_at = Utc::now();
            let clock = Instant::now();
            let model = match &step.kind {
                StepKind::Llm(spec) => Some(spec.model.clone()),
                StepKind::Map(MapSpec { step: ItemStep::Llm(spec), .. }) => Some(spec.model.clone()),
                _ => None,
            };
            let id = step.id.clone();
            self.progress
                .emit(EventType::StepStarted, Some(&step.id), Some(1), json!({ "model": model }), move |s| s.current_step = Some(id))
                .await?;
            if self.config.checkpoint_running && model.is_some() {
                // A RUNNING checkpoint lets run snapshots show what is in flight; resume ignores it.
                let mut running = StepRecord::settled(step.id.clone(), StepStatus::Running, None, started_at);
                running.finished_at = None;
                running.started_at = Some(started_at);
                running.attempts = 1;
                running.model = model.clone();
                self.store.save_step(&self.run_id, &self.lease, &running).await?;
            }
            let work = match &step.kind {
                StepKind::Llm(spec) => self.run_llm(&step.id, spec, &context, None).await?,
                StepKind::Transform(spec) => transform(spec, &context),
                StepKind::Router(spec) => route(spec, &context),
                StepKind::Map(spec) => self.run_map(&step.id, spec, &context).await?,
            };
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
                detail: work.detail,
                started_at: Some(started_at),
                finished_at: Some(Utc::now()),
            };
            self.store.save_step(&self.run_id, &self.lease, &record).await?;
            let (kind, data) = match record.status {
                StepStatus::Completed => (
                    EventType::StepCompleted,
                    json!({
                        "model": record.model,
                        "input_tokens": record.usage.input_tokens,
                        "output_tokens": record.usage.output_tokens,
                        "cache_read_tokens": record.usage.cache_read_tokens,
                        "cache_write_tokens": record.usage.cache_write_tokens,
                        "cost_usd": record.cost.to_string(),
                        "cost_pico_usd": record.cost.pico(),
                        "latency_ms": record.latency_ms,
                        "attempts": record.attempts,
                        "detail": record.detail,
                    }),
                ),
                _ => (
                    EventType::StepFailed,
                    json!({ "error": record.error, "attempts": record.attempts, "cost_usd": record.cost.to_string(), "detail": record.detail }),
                ),
            };
            let id = step.id.clone();
            let latency_ms = record.latency_ms;
            self.progress
                .emit(kind, Some(&step.id), Some(record.attempts), data, move |s| {
                    s.step_latency_ms += latency_ms;
                    if s.current_step.as_ref() == Some(&id) {
                        s.current_step = None;
                    }
                })
                .await?;
            Ok(record)
        }
        .instrument(span)
        .await
    }

    /// A model call with retries. `item` is the map item index when run inside a map.
    async fn run_llm(&self, id: &StepId, spec: &LlmSpec, context: &Value, item: Option<usize>) -> Result<Work, EngineError> {
        let Some(model_info) = self.models.get(&spec.model) else {
            return Ok(Work::failed("UNKNOWN_MODEL", format!("no price for model {}", spec.model)));
        };
        let render = |source: &Template| source.render(context);
        let prompt = match render(&spec.prompt) {
            Ok(p) => p,
            Err(e) => return Ok(Work::failed("TEMPLATE_ERROR", format!("prompt: {e}"))),
        };
        let system = match spec.system.as_ref().map(render).transpose() {
            Ok(s) => s,
            Err(e) => return Ok(Work::failed("TEMPLATE_ERROR", format!("system: {e}"))),
        };
        let mut work = Work::failed("NO_ATTEMPTS", "retry.max_attempts is 0");
        let mut hint: Option<String> = None;
        for attempt in 1..=spec.retry.max_attempts {
            work.attempts = attempt;
            let request = ModelRequest {
                model: spec.model.clone(),
                system: system.clone(),
                prompt: match &hint {
                    Some(h) => format!("{prompt}\n\n{h}"),
                    None => prompt.clone(),
                },
                temperature: spec.temperature,
                max_tokens: spec.max_tokens,
                stop_sequences: spec.stop_sequences.clone(),
            };
            // Every attempt reserves anew: the request (hint included) is what is priced,
            // against what earlier attempts were charged.
            let worst =
                budget::worst_case(&model_info, budget::estimate_input_tokens(request.system.as_deref(), &request.prompt), request.max_tokens);
            let reservation = match self.progress.reserve(worst) {
                Ok(reservation) => reservation,
                Err(exceeded) => {
                    warn!(
                        attempt,
                        item,
                        limit = exceeded.limit.name(),
                        spent_pico = exceeded.spent.cost.pico(),
                        spent_tokens = exceeded.spent.tokens,
                        reserved_pico = exceeded.reserved_by_others.cost.pico(),
                        attempted_pico = exceeded.attempted.cost.pico(),
                        attempted_tokens = exceeded.attempted.tokens,
                        "budget exceeded: the model call is not made"
                    );
                    work.attempts = attempt - 1;
                    work.output = Err(ErrorInfo { code: "BUDGET_EXCEEDED".into(), message: exceeded.to_string(), retryable: false });
                    work.detail = Some(json!({ "budget": exceeded.to_json() }));
                    return Ok(work);
                }
            };
            let day_hold = match &self.owner_cap {
                None => None,
                Some(owner_cap) => match owner_cap.reserve(worst).await {
                    Ok(Ok(hold)) => Some(hold),
                    Ok(Err(exceeded)) => {
                        self.progress.release(reservation);
                        warn!(
                            attempt,
                            item,
                            owner = %exceeded.owner,
                            cap_pico = exceeded.cap.pico(),
                            committed_pico = exceeded.committed.pico(),
                            attempted_pico = exceeded.attempted.cost.pico(),
                            "daily spend cap reached: the model call is not made"
                        );
                        work.attempts = attempt - 1;
                        work.output = Err(ErrorInfo { code: "BUDGET_EXCEEDED".into(), message: exceeded.to_string(), retryable: false });
                        work.detail = Some(json!({ "budget": exceeded.to_json() }));
                        return Ok(work);
                    }
                    Err(e) => {
                        // Fail closed: without the counter the call cannot be admitted.
                        self.progress.release(reservation);
                        return Err(e.into());
                    }
                },
            };
            let call_started = Instant::now();
            // On an engine error the reservation is dropped unreleased: the call's spend is
            // unknown, so the run keeps it held (the run stops on that error anyway).
            let reply = if spec.stream && item.is_none() { self.stream(id, attempt, &request).await? } else { self.model.converse(&request).await };
            let outcome = match reply {
                Ok(reply) => {
                    let cost = model_info.cost(&reply.usage).unwrap_or(Usd::from_pico(u64::MAX));
                    work.usage = add_usage(work.usage, reply.usage);
                    work.cost = work.cost.saturating_add(cost);
                    self.progress.settle(reservation, &reply.usage, cost);
                    self.settle_day(day_hold, cost).await;
                    info!(
                        attempt,
                        item,
                        tokens = reply.usage.total_tokens(),
                        cost_pico = cost.pico(),
                        latency_ms = call_started.elapsed().as_millis() as u64,
                        "model call finished"
                    );
                    self.accept(spec, reply)
                }
                Err(e) => {
                    // The port reports no usage with an error: nothing to charge.
                    self.progress.release(reservation);
                    self.settle_day(day_hold, Usd::ZERO).await;
                    Err(AttemptError::Model(e))
                }
            };
            let error = match outcome {
                Ok(done) => {
                    work.output = Ok(done);
                    return Ok(work);
                }
                Err(e) => e,
            };
            let (code, message, retryable) = match &error {
                AttemptError::Model(e) => (e.code.clone(), e.message.clone(), e.retryable()),
                AttemptError::Output(e) => ("INVALID_OUTPUT".to_owned(), e.0.clone(), true),
            };
            if !retryable || attempt == spec.retry.max_attempts {
                let message = if retryable { format!("{message} (after {attempt} attempts)") } else { message };
                work.output = Err(ErrorInfo { code, message, retryable });
                return Ok(work);
            }
            if let AttemptError::Output(e) = &error {
                hint = Some(format!("Your previous reply could not be used: {}. Reply again with only the corrected JSON.", e.0));
            }
            let delay = backoff(&spec.retry, attempt);
            warn!(attempt, item, code = %code, delay_ms = delay.as_millis() as u64, "attempt failed; retrying");
            let mut data = json!({ "reason": code, "message": message, "delay_ms": delay.as_millis() as u64 });
            if let Some(item) = item {
                data["item"] = json!(item);
            }
            self.progress.emit(EventType::StepRetrying, Some(id), Some(attempt + 1), data, |_| {}).await?;
            tokio::time::sleep(delay).await;
        }
        Ok(work)
    }

    /// Fans the sub-step out over the list `over` evaluates to, `max_concurrency` items at
    /// a time; results keep the list's order.
    async fn run_map(&self, id: &StepId, spec: &MapSpec, context: &Value) -> Result<Work, EngineError> {
        let items = match spec.over.evaluate(context) {
            Ok(Value::Array(items)) => items,
            Ok(other) => return Ok(Work::failed("MAP_OVER", format!("`over` must give a list, got {}", short(&other)))),
            Err(e) => return Ok(Work::failed("MAP_OVER", format!("`over`: {e}"))),
        };
        if items.len() > MAX_MAP_ITEMS {
            return Ok(Work::failed("MAP_TOO_LARGE", format!("{} items; a map takes at most {MAX_MAP_ITEMS}", items.len())));
        }
        let total = items.len();
        let results: Vec<(usize, Work)> = futures::stream::iter(items.into_iter().enumerate())
            .map(|(index, item)| async move {
                let mut scope = context.clone();
                scope["item"] = item;
                scope["index"] = json!(index);
                let work = match &spec.step {
                    ItemStep::Llm(llm) => self.run_llm(id, llm, &scope, Some(index)).await,
                    ItemStep::Transform(t) => Ok(transform(t, &scope)),
                };
                work.map(|w| (index, w))
            })
            .buffer_unordered(spec.max_concurrency as usize)
            .collect::<Vec<Result<(usize, Work), EngineError>>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let mut ordered: Vec<Option<Work>> = (0..total).map(|_| None).collect();
        for (index, work) in results {
            ordered[index] = Some(work);
        }
        let mut map = Work::done(String::new(), Value::Null);
        map.attempts = 0;
        let mut outputs = Vec::with_capacity(total);
        let mut failed = Vec::new();
        for (index, work) in ordered.into_iter().enumerate() {
            let Some(work) = work else { continue };
            map.usage = add_usage(map.usage, work.usage);
            map.cost = map.cost.saturating_add(work.cost);
            map.attempts = map.attempts.max(work.attempts);
            match work.output {
                Ok((_, value)) => outputs.push(value),
                Err(e) => {
                    outputs.push(Value::Null);
                    let mut entry = json!({ "index": index, "error": e });
                    if let Some(detail) = work.detail {
                        entry["detail"] = detail; // a budget refusal's numbers
                    }
                    failed.push(entry);
                }
            }
        }
        map.detail = Some(json!({ "items": total, "failed": failed }));
        if !failed.is_empty() && spec.on_item_failure == ItemFailure::Fail {
            let first = &failed[0];
            map.output = Err(ErrorInfo {
                code: first["error"]["code"].as_str().unwrap_or("ITEM_FAILED").to_owned(),
                message: format!(
                    "{} of {total} items failed; item {}: {}",
                    failed.len(),
                    first["index"],
                    first["error"]["message"].as_str().unwrap_or_default()
                ),
                retryable: false,
            });
            return Ok(map);
        }
        let value = Value::Array(outputs);
        map.output = Ok((value.to_string(), value));
        Ok(map)
    }

    /// Replaces a call's hold on its owner's day (if it took one) by what it was charged.
    async fn settle_day(&self, hold: Option<DayReservation>, charged: Usd) {
        if let (Some(owner_cap), Some(hold)) = (&self.owner_cap, hold) {
            owner_cap.settle(hold, charged).await;
        }
    }

    /// Checks a reply against the step's output format and size limit.
    fn accept(&self, spec: &LlmSpec, reply: ModelReply) -> Result<(String, Value), AttemptError> {
        let limit = self.config.reply_limit(spec.max_tokens);
        if reply.text.len() > limit {
            // Refused rather than truncated (a cut reply would pass for a whole one), and
            // terminal: a reply this far past its token budget is a degenerate run.
            return Err(AttemptError::Model(ModelError::new(
                ModelErrorKind::Invalid,
                "OUTPUT_TOO_LARGE",
                format!("the reply is {} bytes; the limit for max_tokens {} is {limit}", reply.text.len(), spec.max_tokens),
            )));
        }
        let value = output::parse(&reply.text, spec.format, spec.schema.as_ref()).map_err(AttemptError::Output)?;
        Ok((reply.text, value))
    }

    /// A streamed call: deltas are coalesced into bounded `STREAMING` events.
    async fn stream(&self, id: &StepId, attempt: u32, request: &ModelRequest) -> Result<Result<ModelReply, ModelError>, EngineError> {
        let (tx, mut rx) = mpsc::channel::<String>(64);
        let call = self.model.converse_stream(request, tx);
        tokio::pin!(call);
        let mut buffer = String::new();
        let mut last_flush = Instant::now();
        let mut sent_chars = 0usize;
        let result = loop {
            tokio::select! {
                biased;
                Some(delta) = rx.recv() => {
                    buffer.push_str(&delta);
                    if buffer.len() >= self.config.stream_flush_bytes || last_flush.elapsed() >= self.config.stream_flush_interval {
                        sent_chars += buffer.chars().count();
                        self.progress.emit(EventType::Streaming, Some(id), Some(attempt), json!({ "delta": std::mem::take(&mut buffer), "chars": sent_chars }), |_| {}).await?;
                        last_flush = Instant::now();
                    }
                }
                result = &mut call => break result,
            }
        };
        while let Ok(delta) = rx.try_recv() {
            buffer.push_str(&delta);
        }
        if !buffer.is_empty() && result.is_ok() {
            sent_chars += buffer.chars().count();
            self.progress.emit(EventType::Streaming, Some(id), Some(attempt), json!({ "delta": buffer, "chars": sent_chars }), |_| {}).await?;
        }
        Ok(result)
    }
}

/// A transform: a template renders to text; an expression evaluates to JSON.
fn transform(spec: &TransformSpec, context: &Value) -> Work {
    match spec {
        TransformSpec::Template(source) => match source.render(context) {
            Ok(text) => Work::done(text.clone(), Value::String(text)),
            Err(e) => Work::failed("TEMPLATE_ERROR", format!("template: {e}")),
        },
        TransformSpec::Expression(expression) => match expression.evaluate(context) {
            Ok(value) => {
                let text = match &value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                Work::done(text, value)
            }
            Err(e) => Work::failed("EXPRESSION_ERROR", format!("expression: {e}")),
        },
    }
}

/// A router: the first route whose condition holds chooses its steps, else the default.
fn route(spec: &RouterSpec, context: &Value) -> Work {
    for (n, route) in spec.routes.iter().enumerate() {
        match route.when.evaluate_bool(context) {
            Ok(true) => {
                let selected: Vec<&str> = route.to.iter().map(StepId::as_str).collect();
                let mut work = Work::done(format!("route {n}"), json!({ "route": n, "selected": selected }));
                work.detail = Some(json!({ "route": n, "when": route.when.source() }));
                return work;
            }
            Ok(false) => {}
            Err(e) => return Work::failed("CONDITION_ERROR", format!("routes[{n}].when: {e}")),
        }
    }
    let selected: Vec<&str> = spec.default.iter().map(StepId::as_str).collect();
    Work::done("default".into(), json!({ "route": "default", "selected": selected }))
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 { format!("{}…", &s[..s.char_indices().nth(80).map_or(s.len(), |(i, _)| i)]) } else { s }
}

fn add_usage(a: Usage, b: Usage) -> Usage {
    Usage {
        input_tokens: a.input_tokens + b.input_tokens,
        output_tokens: a.output_tokens + b.output_tokens,
        cache_read_tokens: a.cache_read_tokens + b.cache_read_tokens,
        cache_write_tokens: a.cache_write_tokens + b.cache_write_tokens,
    }
}

/// Exponential backoff with full jitter: uniform in `[0, min(max, initial × 2^(attempt-1))]`.
pub fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let exp = policy.initial_backoff_ms.saturating_mul(1u64 << (attempt.saturating_sub(1)).min(20));
    let cap = exp.min(policy.max_backoff_ms);
    Duration::from_millis(rand::rng().random_range(0..=cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_full_jitter_under_an_exponential_cap_that_stops_at_the_maximum() {
        let policy = RetryPolicy { max_attempts: 10, initial_backoff_ms: 100, max_backoff_ms: 1000 };
        for (attempt, cap_ms) in [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1000), (9, 1000), (40, 1000)] {
            let delays: Vec<Duration> = (0..400).map(|_| backoff(&policy, attempt)).collect();
            let max = delays.iter().max().copied().unwrap_or_default();
            assert!(max <= Duration::from_millis(cap_ms), "attempt {attempt}: {max:?} over {cap_ms} ms");
            // Full jitter spreads over the whole range: 400 draws all landing in the lower
            // or upper half is a 2^-400 event.
            assert!(delays.iter().any(|d| d.as_millis() < cap_ms as u128 / 2), "attempt {attempt}: no low draw");
            assert!(delays.iter().any(|d| d.as_millis() > cap_ms as u128 / 2), "attempt {attempt}: no high draw");
        }
    }
}
