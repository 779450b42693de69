//! The engine: runs one claimed run's graph to the end (or to the invocation's deadline).
//!
//! Scheduling is dataflow: a step starts the moment its last dependency settles, not in
//! waves. Each step runs as its own task; the scheduler only decides what may start and
//! what is skipped. Every settled step is checkpointed before its event is published, so
//! a runner that takes over a crashed run resumes from checkpoints and never re-runs a
//! completed step.
//!
//! Events go through one [`Progress`] publisher that holds a lock across the write, which
//! is what makes `seq` gap-free and strictly increasing even with steps in parallel.

use crate::graph::{LlmSpec, Step, StepKind, ValidatedGraph};
use crate::ids::{Principal, RunId, StepId};
use crate::money::Usd;
use crate::output;
use crate::ports::{Lease, ModelClient, ModelError, ModelReply, ModelRequest, ProgressError, ProgressSink, RunStore, StoreError};
use crate::pricing::{ModelRegistry, Usage};
use crate::run::{ErrorInfo, Event, EventType, ProgressRow, RunRecord, RunStatus, StepRecord, StepStatus, Totals};
use crate::template;
use crate::workflow::{Join, RetryPolicy};
use chrono::Utc;
use rand::Rng;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

/// Tunables with production defaults; tests shrink them.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// A `STREAMING` event is written at least this often while text arrives…
    pub stream_flush_interval: Duration,
    /// …or as soon as this many bytes are buffered, whichever comes first.
    pub stream_flush_bytes: usize,
    /// Stop starting steps when less than this remains before the deadline.
    pub deadline_margin: Duration,
    /// Larger outputs are refused (a checkpoint is one DynamoDB item, 400 KB).
    pub max_output_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            stream_flush_interval: Duration::from_millis(250),
            stream_flush_bytes: 2048,
            deadline_margin: Duration::from_secs(90),
            max_output_bytes: 160 * 1024,
        }
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
}

impl Engine {
    pub fn new(
        model: Arc<dyn ModelClient>,
        store: Arc<dyn RunStore>,
        sink: Arc<dyn ProgressSink>,
        models: Arc<ModelRegistry>,
        config: EngineConfig,
    ) -> Self {
        Self { model, store, sink, models, config }
    }

    /// The same engine with another deadline margin (the runner shrinks it for short
    /// invocations).
    pub fn with_deadline_margin(mut self, margin: Duration) -> Self {
        self.config.deadline_margin = margin;
        self
    }

    /// Executes a run this runner has claimed under `lease`.
    pub async fn execute(&self, mut run: RunRecord, lease: Lease, deadline: Option<Instant>) -> Result<Outcome, EngineError> {
        let span = info_span!("run", run_id = %run.id, workflow = %run.workflow);
        async move {
            let graph = match crate::graph::validate_json(&run.definition, &self.models) {
                Ok(g) => g,
                Err(invalid) => {
                    // Validated at start; this only happens if the price registry changed since.
                    let error = ErrorInfo { code: "INVALID_WORKFLOW".into(), message: invalid.to_string(), retryable: false };
                    let progress = Progress::new(self.sink.clone(), &run, self.sink.last_seq(&run.id).await?, Totals::default());
                    return self.finish(&mut run, &lease, &progress, RunStatus::Failed, None, Some(error)).await;
                }
            };
            let n = graph.steps.len();
            let mut records: Vec<Option<StepRecord>> = vec![None; n];
            for saved in self.store.get_steps(&run.id).await? {
                if let Some(i) = graph.index_of(saved.step_id.as_str())
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
            let progress = Arc::new(Progress::new(self.sink.clone(), &run, last_seq, totals));
            if last_seq == 0 {
                progress.emit(EventType::RunStarted, None, None, json!({ "workflow": run.workflow, "steps": n }), |_| {}).await?;
            } else {
                info!(resumed_steps = records.iter().flatten().count(), last_seq, "resuming run");
            }
            let shared = Arc::new(StepContext {
                model: self.model.clone(),
                store: self.store.clone(),
                models: self.models.clone(),
                config: self.config.clone(),
                progress: progress.clone(),
                run_id: run.id.clone(),
                lease: lease.clone(),
            });

            let mut running: JoinSet<(usize, Result<StepRecord, EngineError>)> = JoinSet::new();
            let mut started = vec![false; n];
            for (i, r) in records.iter().enumerate() {
                started[i] = r.is_some();
            }
            let mut failure: Option<(StepId, ErrorInfo)> = None;
            let mut out_of_time = false;
            loop {
                // Settle what can be decided without running anything (skips cascade).
                loop {
                    let mut changed = false;
                    for i in 0..n {
                        if started[i] {
                            continue;
                        }
                        if let Decision::Skip(reason) = decide(&graph.steps[i], &records) {
                            let now = Utc::now();
                            let record = StepRecord::settled(graph.steps[i].id.clone(), StepStatus::Skipped, None, now);
                            self.store.save_step(&run.id, &lease, &record).await?;
                            progress.emit(EventType::StepSkipped, Some(&record.step_id), None, json!({ "reason": reason }), |_| {}).await?;
                            records[i] = Some(record);
                            started[i] = true;
                            changed = true;
                        }
                    }
                    if !changed {
                        break;
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
                    for (i, step) in graph.steps.iter().enumerate() {
                        if !started[i] && decide(step, &records) == Decision::Run {
                            started[i] = true;
                            let context = template_context(&run.input, &graph, &records);
                            let step = step.clone();
                            let shared = shared.clone();
                            running.spawn(async move { (i, shared.run_step(step, context).await) });
                        }
                    }
                }
                let Some(joined) = running.join_next().await else { break };
                let (i, result) = match joined {
                    Ok(r) => r,
                    Err(e) => {
                        // A panicking step is a defect; fail the run rather than hang.
                        warn!(error = %e, "step task panicked");
                        failure.get_or_insert((
                            graph.steps[0].id.clone(),
                            ErrorInfo { code: "INTERNAL".into(), message: "a step task panicked".into(), retryable: false },
                        ));
                        continue;
                    }
                };
                let record = result?;
                if record.status == StepStatus::Failed && graph.steps[i].required && failure.is_none() {
                    let error =
                        record.error.clone().unwrap_or_else(|| ErrorInfo { code: "STEP_FAILED".into(), message: "failed".into(), retryable: false });
                    failure = Some((record.step_id.clone(), error));
                }
                records[i] = Some(record);
            }

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
    Wait,
    Run,
    Skip(String),
}

/// Whether a not-yet-started step can run, must be skipped, or has to wait.
fn decide(step: &Step, records: &[Option<StepRecord>]) -> Decision {
    let statuses: Vec<Option<StepStatus>> = step.deps.iter().map(|&d| records[d].as_ref().map(|r| r.status)).collect();
    if statuses.iter().any(Option::is_none) {
        return Decision::Wait;
    }
    let completed = statuses.iter().filter(|s| **s == Some(StepStatus::Completed)).count();
    match step.join {
        Join::All if completed == statuses.len() => Decision::Run,
        Join::All => {
            let blocker = step.deps.iter().find(|&&d| records[d].as_ref().map(|r| r.status) != Some(StepStatus::Completed));
            let name = blocker.and_then(|&d| records[d].as_ref()).map(|r| format!("dependency {} is {:?}", r.step_id, r.status)).unwrap_or_default();
            Decision::Skip(name.to_lowercase())
        }
        Join::Any if completed > 0 || statuses.is_empty() => Decision::Run,
        Join::Any => Decision::Skip("no dependency completed".into()),
    }
}

/// What templates see: `input`, and `steps.<id>.{output,text,status}` for settled steps.
fn template_context(input: &Value, graph: &ValidatedGraph, records: &[Option<StepRecord>]) -> Value {
    let mut steps = Map::new();
    for (step, record) in graph.steps.iter().zip(records) {
        if let Some(r) = record {
            steps.insert(step.id.to_string(), json!({ "output": r.output, "text": r.text, "status": r.status }));
        }
    }
    json!({ "input": input, "steps": steps })
}

fn run_output(input: &Value, graph: &ValidatedGraph, records: &[Option<StepRecord>]) -> Result<Value, template::TemplateError> {
    match &graph.output {
        Some(source) => template::render(source, &template_context(input, graph, records)).map(Value::String),
        None => {
            let mut out = Map::new();
            for step in graph.sinks() {
                if let Some(Some(r)) = graph.index_of(step.id.as_str()).map(|i| &records[i])
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

/// The one writer of a run's events: holds the seq counter and the owners' row.
struct Progress {
    sink: Arc<dyn ProgressSink>,
    run_id: RunId,
    workflow: String,
    owners: Vec<Principal>,
    state: Mutex<ProgressState>,
}

struct ProgressState {
    last_seq: u64,
    status: RunStatus,
    current_step: Option<StepId>,
    totals: Totals,
}

impl Progress {
    fn new(sink: Arc<dyn ProgressSink>, run: &RunRecord, last_seq: u64, totals: Totals) -> Self {
        Self {
            sink,
            run_id: run.id.clone(),
            workflow: run.workflow.clone(),
            owners: run.owners.clone(),
            state: Mutex::new(ProgressState { last_seq, status: RunStatus::Running, current_step: None, totals }),
        }
    }

    async fn totals(&self) -> Totals {
        self.state.lock().await.totals
    }

    async fn charge(&self, usage: &Usage, cost: Usd) {
        self.state.lock().await.totals.add_call(usage, cost);
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
            totals: state.totals,
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
    model: Arc<dyn ModelClient>,
    store: Arc<dyn RunStore>,
    models: Arc<ModelRegistry>,
    config: EngineConfig,
    progress: Arc<Progress>,
    run_id: RunId,
    lease: Lease,
}

/// How one attempt ended.
enum AttemptError {
    Model(ModelError),
    Output(output::InvalidOutput),
}

impl StepContext {
    async fn run_step(&self, step: Step, context: Value) -> Result<StepRecord, EngineError> {
        let span = info_span!("step", run_id = %self.run_id, step_id = %step.id);
        async move {
            let StepKind::Llm(spec) = &step.kind;
            let record = self.run_llm(&step.id, spec, &context).await?;
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
                    }),
                ),
                _ => (EventType::StepFailed, json!({ "error": record.error, "attempts": record.attempts, "cost_usd": record.cost.to_string() })),
            };
            let id = step.id.clone();
            let latency_ms = record.latency_ms;
            self.progress
                .emit(kind, Some(&step.id), Some(record.attempts), data, move |s| {
                    s.totals.step_latency_ms += latency_ms;
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

    async fn run_llm(&self, id: &StepId, spec: &LlmSpec, context: &Value) -> Result<StepRecord, EngineError> {
        let started_at = Utc::now();
        let clock = Instant::now();
        let mut record = StepRecord::settled(id.clone(), StepStatus::Failed, None, started_at);
        record.started_at = Some(started_at);
        record.model = Some(spec.model.clone());
        let fail = |mut record: StepRecord, code: &str, message: String, retryable: bool| {
            record.error = Some(ErrorInfo { code: code.into(), message, retryable });
            record.finished_at = Some(Utc::now());
            record.latency_ms = clock.elapsed().as_millis() as u64;
            record
        };
        let Some(model_info) = self.models.get(&spec.model) else {
            return Ok(fail(record, "UNKNOWN_MODEL", format!("no price for model {}", spec.model), false));
        };
        let render = |source: &str| template::render(source, context);
        let prompt = match render(&spec.prompt) {
            Ok(p) => p,
            Err(e) => return Ok(fail(record, "TEMPLATE_ERROR", format!("prompt: {e}"), false)),
        };
        let system = match spec.system.as_deref().map(render).transpose() {
            Ok(s) => s,
            Err(e) => return Ok(fail(record, "TEMPLATE_ERROR", format!("system: {e}"), false)),
        };
        let mut hint: Option<String> = None;
        // A RUNNING checkpoint lets run snapshots show what is in flight; resume ignores it.
        let mut running = record.clone();
        running.status = StepStatus::Running;
        running.error = None;
        running.finished_at = None;
        running.attempts = 1;
        self.store.save_step(&self.run_id, &self.lease, &running).await?;
        let step_id = id.clone();
        self.progress
            .emit(EventType::StepStarted, Some(id), Some(1), json!({ "model": spec.model }), move |s| {
                s.current_step = Some(step_id);
            })
            .await?;
        for attempt in 1..=spec.retry.max_attempts {
            record.attempts = attempt;
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
            let call_started = Instant::now();
            let reply = if spec.stream { self.stream(id, attempt, &request).await? } else { self.model.converse(&request).await };
            let outcome = match reply {
                Ok(reply) => {
                    let cost = model_info.cost(&reply.usage).unwrap_or(Usd::from_pico(u64::MAX));
                    record.usage = add_usage(record.usage, reply.usage);
                    record.cost = record.cost.saturating_add(cost);
                    self.progress.charge(&reply.usage, cost).await;
                    info!(
                        attempt,
                        tokens = reply.usage.total_tokens(),
                        cost_pico = cost.pico(),
                        latency_ms = call_started.elapsed().as_millis() as u64,
                        "model call finished"
                    );
                    self.accept(spec, reply)
                }
                Err(e) => Err(AttemptError::Model(e)),
            };
            let error = match outcome {
                Ok((text, value)) => {
                    record.status = StepStatus::Completed;
                    record.text = Some(text);
                    record.output = Some(value);
                    record.finished_at = Some(Utc::now());
                    record.latency_ms = clock.elapsed().as_millis() as u64;
                    return Ok(record);
                }
                Err(e) => e,
            };
            let (code, message, retryable) = match &error {
                AttemptError::Model(e) => (e.code.clone(), e.message.clone(), e.retryable()),
                AttemptError::Output(e) => ("INVALID_OUTPUT".to_owned(), e.0.clone(), true),
            };
            if !retryable || attempt == spec.retry.max_attempts {
                let message = if retryable { format!("{message} (after {attempt} attempts)") } else { message };
                return Ok(fail(record, &code, message, retryable));
            }
            if let AttemptError::Output(e) = &error {
                hint = Some(format!("Your previous reply could not be used: {}. Reply again with only the corrected JSON.", e.0));
            }
            let delay = backoff(&spec.retry, attempt);
            warn!(attempt, code = %code, delay_ms = delay.as_millis() as u64, "step attempt failed; retrying");
            self.progress
                .emit(
                    EventType::StepRetrying,
                    Some(id),
                    Some(attempt + 1),
                    json!({ "reason": code, "message": message, "delay_ms": delay.as_millis() as u64 }),
                    |_| {},
                )
                .await?;
            tokio::time::sleep(delay).await;
        }
        unreachable_attempts(record)
    }

    /// Checks a reply against the step's output format and size limit.
    fn accept(&self, spec: &LlmSpec, reply: ModelReply) -> Result<(String, Value), AttemptError> {
        if reply.text.len() > self.config.max_output_bytes {
            // Not retryable in substance, but a shorter reply on retry is possible; the
            // size is reported rather than silently truncated.
            return Err(AttemptError::Model(ModelError::new(
                crate::ports::ModelErrorKind::Invalid,
                "OUTPUT_TOO_LARGE",
                format!("the reply is {} bytes; the limit is {}", reply.text.len(), self.config.max_output_bytes),
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

fn unreachable_attempts(mut record: StepRecord) -> Result<StepRecord, EngineError> {
    // max_attempts ≥ 1 is enforced by validation; a zero would land here.
    record.error = Some(ErrorInfo { code: "NO_ATTEMPTS".into(), message: "retry.max_attempts is 0".into(), retryable: false });
    Ok(record)
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
