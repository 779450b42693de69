//! The engine: runs one claimed run's graph to the end (or to the invocation's deadline).
//!
//! Where each idea lives:
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the entry ([`Engine::execute`]) and the run loop |
//! | [`end`] | how a run ends ([`Outcome`]): finished, failed without running (lost runners, store errors), cancelled steps |
//! | [`schedule`] | pure dataflow decisions: what is ready, what is skipped, joins and routes |
//! | [`journal`] | the run's event log writer: gap-free `seq`, owners' rows, the budget ledger |
//! | `step` | one step: announce, run its kind, checkpoint, announce the result |
//! | `running` | a model step's `RUNNING` checkpoint: its reservation durable before each call, what dead runners spent carried on |
//! | `llm` | model calls: admission against budgets (the one refusal path), attempts, streaming, backoff |
//! | `throttle` | fair limits per tenant: each call's tokens reserved in its tenant's allowance per minute (waiting for the next minute), a run's concurrency slot given back when it ends |
//! | `daily` | the caller's daily spend cap as a call holds and settles it; the holds dead runners left, settled by the checkpoints |
//! | `map` | fan-out of a sub-step over a list |
//! | `transform`, `router` | the steps that make no model call |
//! | `review`, `input` | the steps a person decides or fills in: waiting, deadlines, escalation |
//! | `revision` | the first runner of a revision announces it (`REVISION_STARTED`, `STEP_OVERRIDDEN`) |
//!
//! Each step runs as its own task, at most `max_concurrency` at once; the schedule only
//! decides what may start and what is skipped. Every settled step is checkpointed before
//! its event is published, so a runner that takes over a crashed run resumes from
//! checkpoints and never re-runs a completed step.

mod audience;
mod batch;
/// How often a running invocation reads its workflow's access again.
pub use audience::REFRESH as AUDIENCE_REFRESH;
mod daily;
pub mod end;
mod input;
pub mod journal;
mod llm;
mod map;
mod review;
mod revision;
mod router;
mod running;
pub mod schedule;
mod step;
pub use step::run_output;
mod throttle;
pub use throttle::Tenancy;
mod transform;

use crate::budget::BudgetLimits;
use crate::codes::ErrorCode;
use crate::graph::{StepKind, ValidatedGraph};
use crate::ids::StepId;
use crate::limits;
use crate::ports::{DailySpend, JournalError, Lease, ModelClient, ProgressError, ProgressSink, RunStore, StoreError};
use crate::pricing::ModelRegistry;
use crate::run::{Carried, ErrorInfo, RunRecord, RunStatus, StepRecord, StepStatus, Totals};
use crate::run::{Cause, ControlKind, ControlRequest, WaitKind, Waiting};
use crate::spend::DailyCaps;
use crate::wire::events::{AwaitingInput, EventBody, RunResumed, RunStarted, RunSuspended, StepSkipped};
use chrono::Utc;
use daily::{OwnerCap, Reached};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use journal::Journal;
use schedule::{Decision, Schedule};
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use step::{Inputs, Leftover, Ran, StepContext};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{Instrument, info, info_span, warn};

/// What [`Engine::checkpoints`] reads: settled records and leftovers by step index, and
/// how far each step and item got.
type Checkpoints = (Vec<Option<StepRecord>>, Vec<Option<Leftover>>, Reached);

/// How a running step ended: its index and result (`Ran::Interrupted`: the deadline
/// interrupted it), or the panic it raised.
type StepEnd = std::thread::Result<(usize, Result<Ran, EngineError>)>;

/// A running step.
type StepTask = BoxFuture<'static, StepEnd>;

/// Awaits `write` while polling the `running` steps, keeping those that end in `ended`.
///
/// The run loop's own journal writes need the journal's lock, which a step future may hold
/// across its write or be next in line for; that step only gets to release it when polled.
/// Awaiting the write alone would leave both waiting on each other forever (the run
/// stalls while the heartbeat keeps its lease, and a cancel is never read).
async fn polling<T>(write: impl Future<Output = T>, running: &mut FuturesUnordered<StepTask>, ended: &mut VecDeque<StepEnd>) -> T {
    tokio::pin!(write);
    loop {
        tokio::select! {
            biased;
            done = &mut write => return done,
            // With no step left the branch is disabled and only the write is awaited.
            Some(end) = running.next() => ended.push_back(end),
        }
    }
}

/// Tunables with production defaults; tests shrink them.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// A `STREAMING` event is written at least this often while text arrives…
    pub stream_flush_interval: Duration,
    /// …or as soon as this many bytes are buffered, whichever comes first.
    pub stream_flush_bytes: usize,
    /// Stop starting steps when less than this remains before the deadline.
    pub deadline_margin: Duration,
    /// Larger outputs are refused (see [`limits::MAX_OUTPUT_BYTES`]). A step's own limit
    /// can be lower: see [`EngineConfig::reply_limit`].
    pub max_output_bytes: usize,
    /// Definition limits applied when the run's snapshot is validated.
    pub limits: crate::graph::Limits,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            stream_flush_interval: Duration::from_millis(250),
            stream_flush_bytes: 2048,
            deadline_margin: Duration::from_secs(90),
            max_output_bytes: limits::MAX_OUTPUT_BYTES,
            limits: crate::graph::Limits::default(),
        }
    }
}

impl EngineConfig {
    /// The most bytes a reply of a step with this `max_tokens` may have.
    pub fn reply_limit(&self, max_tokens: u32) -> usize {
        limits::reply_limit(max_tokens, self.max_output_bytes)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Finished(RunStatus),
    /// The deadline came first: checkpoints are saved and the lease released; the caller
    /// dispatches the run again to continue.
    Suspended,
    /// The run waits for a person (`AWAITING_INPUT`), holding no runner; a resume
    /// dispatches it again.
    Waiting,
}

/// Infrastructure failures that stop the engine (model failures are step outcomes, not these).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Progress(#[from] ProgressError),
}

impl From<JournalError> for EngineError {
    fn from(e: JournalError) -> Self {
        match e {
            JournalError::Store(e) => EngineError::Store(e),
            JournalError::Progress(e) => EngineError::Progress(e),
        }
    }
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
    /// Why this invocation has the run; shown when it resumes one.
    cause: Cause,
    /// The run's pending control request, as the runner's heartbeat last read it.
    control: Option<watch::Receiver<Option<ControlRequest>>>,
    /// Wall-clock time, for review deadlines (paused time in tests).
    clock: Arc<dyn crate::durability::Clock>,
    /// Wake-ups at review deadlines (without them, the sweeper finds the run).
    timers: Option<Arc<dyn crate::ports::Timers>>,
    /// Stored workflows, whose access decides who a run of one is shown to (see [`audience`]).
    workflows: Option<Arc<dyn crate::ports::WorkflowStore>>,
    /// Fair limits per tenant: token allowances per minute, concurrency slots.
    tenancy: Option<Tenancy>,
    /// Told what each run does (see [`crate::telemetry`]): the runner prints it as metrics.
    observer: Option<Arc<dyn crate::telemetry::Observer>>,
    /// Replies of deterministic steps, and how long they are kept (see [`crate::responses`]).
    responses: Option<(Arc<dyn crate::ports::ResponseCache>, chrono::Duration)>,
    /// Batch inference for maps that ask for it (see [`batch`]); without it they run online.
    batch: Option<batch::Batching>,
}

/// Who resumed a run, and what they did: the latest of its resume (after a pause, or with a
/// larger budget), its review decisions and the answers to its input steps.
fn resumed_by(run: &RunRecord) -> Option<(crate::ids::UserId, String)> {
    let resume = run.resumed.as_ref().map(|r| {
        let what = match &r.budget {
            Some(_) => "raised the budget".to_owned(),
            None => "resumed the paused run".to_owned(),
        };
        (r.at, r.by.clone(), what)
    });
    let decisions = run
        .decisions
        .iter()
        .map(|(step, d)| (d.at, d.by.clone(), format!("decided {} on review {step}", format!("{:?}", d.decision).to_lowercase())));
    let answers = run.inputs.iter().filter_map(|(step, state)| state.turns.last().map(|t| (t.at, t.by.clone(), format!("answered input {step}"))));
    resume.into_iter().chain(decisions).chain(answers).max_by_key(|(at, ..)| *at).map(|(_, by, what)| (by, what))
}

impl Engine {
    pub fn new(
        model: Arc<dyn ModelClient>,
        store: Arc<dyn RunStore>,
        sink: Arc<dyn ProgressSink>,
        models: Arc<ModelRegistry>,
        config: EngineConfig,
    ) -> Self {
        Self {
            model,
            store,
            sink,
            models,
            config,
            daily: None,
            cause: Cause::Start,
            control: None,
            clock: Arc::new(crate::durability::SystemClock),
            timers: None,
            workflows: None,
            tenancy: None,
            observer: None,
            responses: None,
            batch: None,
        }
    }

    /// The same engine, running `map.mode: batch` (and `auto`) maps as batch inference jobs
    /// of `jobs`, asked about every `poll_every` (longer as a job takes longer).
    pub fn with_batch(mut self, jobs: Arc<dyn crate::ports::BatchJobs>, poll_every: Duration, timeout_hours: u32) -> Self {
        self.batch = Some(batch::Batching { jobs, poll_every, timeout_hours });
        self
    }

    /// The same engine, telling `observer` what its runs do: steps settled, runs ended,
    /// takeovers, budget refusals, throttle waits (see [`crate::telemetry::Seen`]).
    pub fn with_observer(mut self, observer: Arc<dyn crate::telemetry::Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The same engine, answering `cache: "response"` steps from `cache` when an identical
    /// call of the run's tenant was answered within `ttl`, and keeping new replies there.
    pub fn with_response_cache(mut self, cache: Arc<dyn crate::ports::ResponseCache>, ttl: chrono::Duration) -> Self {
        self.responses = Some((cache, ttl));
        self
    }

    /// The same engine, reserving each model call's tokens in its run's tenant's allowance
    /// per minute (see [`crate::quota`]), and giving back a run's concurrency slot when
    /// asked ([`Engine::release_slot`]).
    pub fn with_tenant_limits(mut self, quota: Arc<dyn crate::ports::TenantQuota>, limits: Arc<crate::quota::TenantLimits>) -> Self {
        self.tenancy = Some(Tenancy { quota, limits });
        self
    }

    /// Gives back the concurrency slot of `run`, which has ended. Idempotent.
    pub async fn release_slot(&self, run: &RunRecord) {
        if let Some(tenancy) = &self.tenancy {
            tenancy.release_slot(run).await;
        }
    }

    /// Runs of stored workflows follow their workflow's access (see [`audience`]).
    pub fn with_workflows(mut self, workflows: Arc<dyn crate::ports::WorkflowStore>) -> Self {
        self.workflows = Some(workflows);
        self
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

    /// The same engine for an invocation that got the run for `cause`.
    pub fn with_cause(mut self, cause: Cause) -> Self {
        self.cause = cause;
        self
    }

    /// The same engine, stopping the run when `control` says it was cancelled: steps in
    /// flight stop, nothing new starts, and the run ends `RUN_CANCELLED`.
    pub fn with_control(mut self, control: watch::Receiver<Option<ControlRequest>>) -> Self {
        self.control = Some(control);
        self
    }

    /// The same engine setting a wake-up at each deadline a waiting run has.
    pub fn with_timers(mut self, timers: Arc<dyn crate::ports::Timers>) -> Self {
        self.timers = Some(timers);
        self
    }

    /// The same engine reading wall-clock time from `clock` (review deadlines).
    pub fn with_clock(mut self, clock: Arc<dyn crate::durability::Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Ends a run this runner has claimed, whose control request asks it to stop, without
    /// running anything (see [`end::Ender::cancel_run`]).
    pub async fn cancel_run(&self, run: RunRecord, lease: &Lease) -> Result<Outcome, EngineError> {
        self.ender().cancel_run(run, lease).await
    }

    /// Ends a run this runner has claimed `RUN_FAILED` with `error`, without running
    /// anything (see [`end::fail_run`]).
    pub async fn fail_run(&self, run: RunRecord, lease: &Lease, error: ErrorInfo) -> Result<Outcome, EngineError> {
        self.ender().fail_run(run, lease, error).await
    }

    /// Announces a finished run's end if its log lacks it (see [`end::Ender::announce_end`]).
    pub async fn announce_end(&self, run: &RunRecord) -> Result<bool, EngineError> {
        self.ender().announce_end(run).await
    }

    fn ender(&self) -> end::Ender {
        end::Ender {
            store: self.store.clone(),
            sink: self.sink.clone(),
            models: self.models.clone(),
            limits: self.config.limits,
            daily: self.daily.as_ref().map(|(spend, _)| spend.clone()),
            tenancy: self.tenancy.clone(),
            observer: self.observer.clone(),
            batch: self.batch.as_ref().map(|b| b.jobs.clone()),
        }
    }

    /// Executes a run this runner has claimed under `lease`: validates its snapshot, then
    /// runs the graph.
    pub async fn execute(&self, mut run: RunRecord, lease: Lease, deadline: Option<Instant>) -> Result<Outcome, EngineError> {
        match crate::graph::validate_json_with(&run.definition, &self.models, self.config.limits) {
            Ok(graph) => self.execute_validated(run, Arc::new(graph), lease, deadline).await,
            Err(invalid) => {
                // Validated at start; this only happens if the price registry changed since.
                let error = ErrorInfo::terminal(ErrorCode::InvalidWorkflow, invalid.to_string());
                let last_seq = self.sink.last_seq(&run.id).await?;
                let journal =
                    Journal::new(self.sink.clone(), self.store.clone(), lease.clone(), &run, last_seq, Totals::default(), BudgetLimits::UNLIMITED)
                        .observed(self.observer.clone());
                end::finish(self.store.as_ref(), &mut run, &lease, &journal, RunStatus::Failed, None, Some(error)).await
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
        let span = info_span!("run", run_id = %run.id, workflow = %run.workflow, revision = run.revision);
        async move {
            let (records, mut carried, reached) = self.checkpoints(&run, &graph).await?;
            let last = self.sink.last_event(&run.id).await?;
            let last_seq = last.as_ref().map_or(0, |e| e.seq);
            // The first invocation of a revision finds only the revisions before it in the log.
            let revision_starts = run.revision > 0 && last.is_some_and(|e| e.revision < run.revision);
            // Holds on the caller's day that runners before this one left. A run with no
            // events yet has made no call, so has none.
            if let Some((spend, _)) = &self.daily
                && last_seq > 0
            {
                daily::resolve_holds(spend.as_ref(), &run.id, &reached).await?;
            }
            // Spend already checkpointed counts against the budget of a resumed run, and so
            // does what dead runners spent on steps they did not settle (a map's items too).
            // A revision's budget counts what the revisions before it spent.
            let mut spent = run.spent_before(run.revision);
            spent.add(&Totals::of_checkpoints(records.iter().flatten().filter(|r| r.revision == run.revision)));
            for left in carried.iter().flatten() {
                spent.add_carried(&left.carried);
                left.items.iter().for_each(|item| spent.add_carried(&item.carried()));
            }
            // The definition's budget, or the last one a resume raised it to.
            let budget = run.budget(graph.budget());
            let journal = Arc::new(
                Journal::new(self.sink.clone(), self.store.clone(), lease.clone(), &run, last_seq, spent, budget).observed(self.observer.clone()),
            );
            // Batch jobs out: their reservations, admitted at submission, are held again.
            for left in carried.iter_mut().flatten() {
                if let Some(batch) = &mut left.batch {
                    batch.reservation = batch.held.map(|held| journal.hold_again(held));
                }
            }
            if let Some(workflows) = &self.workflows {
                audience::bring_up_to_date(workflows.as_ref(), &journal, &mut run, &graph).await?;
            }
            // Dropped when this invocation's run loop ends, which stops it.
            let _audience = self.workflows.clone().and_then(|workflows| audience::refresh(workflows, journal.clone(), &run, &graph));
            if last_seq == 0 {
                journal.emit(EventBody::RunStarted(RunStarted { workflow: run.workflow.clone(), steps: graph.steps().len() }), None, None).await?;
            } else if revision_starts {
                revision::announce(&journal, &run, &records).await?;
            } else {
                let settled_steps = records.iter().flatten().count();
                // The store appended a takeover to the record if this claim was one.
                let takeover = run.takeovers.last().filter(|t| t.by == lease.holder).cloned();
                info!(settled_steps, last_seq, cause = ?self.cause, takeover = takeover.is_some(), "resuming run");
                let (by, what) = match self.cause {
                    Cause::Resume => resumed_by(&run).unzip(),
                    _ => (None, None),
                };
                let body = RunResumed { cause: self.cause, settled_steps, takeover, takeovers: run.takeovers.len(), by, what };
                journal.emit(EventBody::RunResumed(body), None, None).await?;
            }
            let owner_cap = self.daily.as_ref().and_then(|(spend, caps)| {
                caps.cap_for(run.caller.as_str()).map(|cap| OwnerCap {
                    spend: spend.clone(),
                    owner: run.caller.to_string(),
                    cap,
                    run: run.id.clone(),
                    holder: lease.holder.clone(),
                })
            });
            let throttle = self.tenancy.as_ref().filter(|t| t.limits.throttles_tokens()).map(|tenancy| throttle::TokenThrottle {
                tenancy: tenancy.clone(),
                tenant: run.caller.tenant(),
                run: run.id.clone(),
                clock: self.clock.clone(),
            });
            let shared = Arc::new(StepContext {
                owner_cap,
                throttle,
                model: self.model.clone(),
                models: self.models.clone(),
                config: self.config.clone(),
                journal: journal.clone(),
                run_id: run.id.clone(),
                responses: self.responses.as_ref().map(|(cache, ttl)| step::Responses {
                    cache: cache.clone(),
                    ttl: *ttl,
                    tenant: run.caller.tenant(),
                    clock: self.clock.clone(),
                }),
                batch: self.batch.clone(),
                labels: [
                    ("chainrun_run", run.id.to_string()),
                    ("chainrun_workflow", run.workflow.to_string()),
                    ("chainrun_owner", run.caller.to_string()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
                deadline,
                pausing: Default::default(),
                pause_on_budget: graph.pauses_on_budget(),
                budget_refused: Default::default(),
                reviews: review::Reviews {
                    decisions: run.decisions.clone(),
                    auto_approve: run.options.auto_approve,
                    starter: run.caller.clone(),
                    clock: self.clock.clone(),
                    store: self.store.clone(),
                    run_id: run.id.clone(),
                },
                collecting: input::Collecting {
                    states: run.inputs.clone(),
                    starter: run.caller.clone(),
                    clock: self.clock.clone(),
                    store: self.store.clone(),
                    run_id: run.id.clone(),
                },
            });

            let mut control = self.control.clone();
            // A request on the run when it was claimed, then each one the heartbeat reads.
            let mut asked = control.as_ref().and_then(|c| c.borrow().clone()).or_else(|| run.control.clone());
            // The pause being acted on: nothing new starts, and the run then waits.
            let mut pausing: Option<ControlRequest> = None;
            let mut schedule = Schedule::new(graph.clone(), records);
            // Shared by every step's inputs.
            let input = Arc::new(run.input.clone());
            // Step futures run inside this task (one runtime thread either way): spawning a
            // task per step cost a cache-aligned allocation and a wake-up each, a measurable
            // share of the per-step overhead. A panicking step is caught here instead.
            let mut running: FuturesUnordered<StepTask> = FuturesUnordered::new();
            // A step future runs only while this loop polls `running`: one holding (or next in
            // line for) the journal's lock cannot release it while this loop awaits anything
            // else. So every other await here that can need the lock polls `running` meanwhile
            // (see [`polling`]); the steps that end then wait here for their turn.
            let mut ended: VecDeque<StepEnd> = VecDeque::new();
            let max_running = graph.max_concurrency() as usize;
            let mut failure: Option<(usize, ErrorInfo)> = None;
            let mut out_of_time = false;
            // Review steps waiting for their decisions, and the earliest of their deadlines.
            let mut reviews_waiting: Vec<StepId> = Vec::new();
            // Whether a review is among them, else an input step (else they are all maps
            // waiting for their batch jobs).
            let mut review_waits = false;
            let mut input_waits = false;
            let mut deadline: Option<chrono::DateTime<Utc>> = None;
            loop {
                match asked.take() {
                    Some(request) if request.kind == ControlKind::Cancel => {
                        // Dropping the step futures stops them, model calls included; what
                        // they spent is in their checkpoints, which the end reads.
                        drop(running);
                        run.control = Some(request);
                        return self.cancel_run(run, &lease).await;
                    }
                    Some(request) if pausing.is_none() => {
                        info!(by = %request.by, "pause requested: starting no more steps");
                        shared.pausing.store(true, std::sync::atomic::Ordering::Relaxed);
                        pausing = Some(request);
                    }
                    _ => {}
                }
                // Decide every step whose dependencies have settled; skips cascade through here.
                while let Some((i, decision)) = schedule.decide_next() {
                    if let Decision::Skip(reason) = decision {
                        let record = StepRecord::settled(graph.steps()[i].id.clone(), StepStatus::Skipped, None, Utc::now());
                        let body = EventBody::StepSkipped(StepSkipped { reason });
                        let write = journal.emit_with(body, Some(&record.step_id), None, Some(&record), |_| {});
                        polling(write, &mut running, &mut ended).await?;
                        schedule.settle(i, record);
                    }
                }
                if failure.is_none() && !out_of_time && shared.out_of_time() {
                    info!("deadline near: starting no more steps");
                    out_of_time = true;
                }
                // Steps that ended during a skip's write are settled first: a failure among
                // them must start nothing new.
                if failure.is_none() && !out_of_time && !shared.pausing.load(std::sync::atomic::Ordering::Relaxed) && ended.is_empty() {
                    while running.len() < max_running
                        && let Some(i) = schedule.next_ready()
                    {
                        let inputs = Inputs::of(&input, schedule.records(), &graph.steps()[i].deps);
                        let (shared, graph) = (shared.clone(), graph.clone());
                        let carried = carried[i].take();
                        let step = async move { (i, shared.run_step(&graph.steps()[i], inputs, carried).await) };
                        running.push(AssertUnwindSafe(step).catch_unwind().boxed());
                    }
                }
                let next = match control.as_mut() {
                    _ if !ended.is_empty() => Some(ended.pop_front()),
                    Some(control) => tokio::select! {
                        joined = running.next() => Some(joined),
                        // A closed channel (the heartbeat stopped) asks nothing.
                        Ok(()) = control.changed() => None,
                    },
                    None => Some(running.next().await),
                };
                let Some(next) = next else {
                    asked = control.as_ref().and_then(|c| c.borrow().clone());
                    continue;
                };
                let Some(joined) = next else { break };
                let (i, result) = match joined {
                    Ok(r) => r,
                    Err(_) => {
                        // A panicking step is a defect; fail the run rather than hang.
                        warn!("step task panicked");
                        failure.get_or_insert((0, ErrorInfo::terminal(ErrorCode::Internal, "a step task panicked")));
                        continue;
                    }
                };
                let record = match result? {
                    Ran::Settled(record) => record,
                    Ran::Interrupted => {
                        // A map the deadline (or a pause) interrupted: it continues later.
                        out_of_time |= !shared.pausing.load(std::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                    Ran::Waiting(until) => {
                        review_waits |= matches!(graph.steps()[i].kind, StepKind::Review(_));
                        input_waits |= matches!(graph.steps()[i].kind, StepKind::Input(_));
                        reviews_waiting.push(graph.steps()[i].id.clone());
                        deadline = deadline.into_iter().chain(until).min();
                        continue;
                    }
                };
                if record.status == StepStatus::Failed && graph.steps()[i].required && failure.is_none() {
                    let error = record.error.clone().unwrap_or_else(|| ErrorInfo::terminal(ErrorCode::StepFailed, "failed"));
                    failure = Some((i, error));
                }
                schedule.settle(i, record);
            }
            let mut records = schedule.into_records();

            if let Some((i, error)) = failure {
                let reason = format!("step {} failed", graph.steps()[i].id);
                for (j, (slot, step)) in records.iter_mut().zip(graph.steps()).enumerate() {
                    if slot.is_none() {
                        *slot = Some(Arc::new(end::cancel(&journal, step.id.clone(), &reason, carried[j].take().map(Leftover::total)).await?));
                    }
                }
                let message = format!("step {} failed: {}", graph.steps()[i].id, error.message);
                let error = ErrorInfo { message, ..error };
                return end::finish(self.store.as_ref(), &mut run, &lease, &journal, RunStatus::Failed, None, Some(error)).await;
            }
            let settled_steps = records.iter().flatten().count();
            // Nothing more can run now: paused, or every way on waits for a review.
            let budget_refused = shared.budget_refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            let why = match (pausing, budget_refused) {
                (Some(request), _) => Some((WaitKind::Paused, Some(request.by), request.reason)),
                (None, Some(refused)) => Some((WaitKind::Budget, None, Some(refused))),
                (None, None) if !out_of_time && !reviews_waiting.is_empty() => {
                    let kind = match (review_waits, input_waits) {
                        (true, _) => WaitKind::Review,
                        (false, true) => WaitKind::Input,
                        (false, false) => WaitKind::Batch,
                    };
                    Some((kind, None, None))
                }
                (None, None) => None,
            };
            let waits = why.map(|(kind, by, reason)| Waiting { kind, by, since: Utc::now(), reason, steps: reviews_waiting, deadline });
            if let Some(waiting) = waits.filter(|_| settled_steps < records.len()) {
                let (settled, steps) = (Some(settled_steps), Some(records.len()));
                let body = EventBody::AwaitingInput(AwaitingInput {
                    waiting: waiting.clone(),
                    show: None,
                    reviewers: Vec::new(),
                    settled_steps: settled,
                    step_count: steps,
                    input: None,
                });
                journal
                    .emit_with(body, None, None, None, |s| {
                        s.status = RunStatus::AwaitingInput;
                        s.current_step = None;
                        s.waiting = Some(waiting.clone());
                    })
                    .await?;
                if self.store.park(&run.id, &lease, &waiting, crate::ports::Answered::of(&run)).await? {
                    info!(settled_steps, kind = ?waiting.kind, deadline = ?waiting.deadline, "waiting (for a person, a budget or a batch job), holding no runner");
                    if let (Some(timers), Some(deadline)) = (&self.timers, waiting.deadline)
                        && let Err(e) = timers.wake_at(&run.id, deadline).await
                    {
                        // The sweeper finds the run at its deadline all the same.
                        warn!(error = %e, %deadline, "could not set the deadline's wake-up");
                    }
                    return Ok(Outcome::Waiting);
                }
                // A decision (or an answer) arrived while this runner worked: continue with
                // it, in a fresh invocation that reads it.
                info!("a review decision or an input answer arrived meanwhile; continuing");
                self.store.release(&run.id, &lease).await?;
                return Ok(Outcome::Suspended);
            }
            if settled_steps < records.len() {
                journal.emit(EventBody::RunSuspended(RunSuspended { settled_steps, steps: records.len() }), None, None).await?;
                self.store.release(&run.id, &lease).await?;
                info!(settled_steps, "suspended before the deadline; checkpoints saved");
                return Ok(Outcome::Suspended);
            }
            match run_output(&input, &graph, &records) {
                Ok(output) if crate::output::json_len(&output) > self.config.max_output_bytes => {
                    let (size, limit) = (crate::output::json_len(&output), self.config.max_output_bytes);
                    let message = format!("the run's output is {size} bytes; an output may have at most {limit}");
                    let error = ErrorInfo::terminal(ErrorCode::OutputTooLarge, message);
                    end::finish(self.store.as_ref(), &mut run, &lease, &journal, RunStatus::Failed, None, Some(error)).await
                }
                Ok(output) => end::finish(self.store.as_ref(), &mut run, &lease, &journal, RunStatus::Completed, Some(output), None).await,
                Err(e) => {
                    let error = ErrorInfo::terminal(ErrorCode::OutputTemplate, format!("the workflow output template failed: {e}"));
                    end::finish(self.store.as_ref(), &mut run, &lease, &journal, RunStatus::Failed, None, Some(error)).await
                }
            }
        }
        .instrument(span)
        .await
    }

    /// The run's settled checkpoints by step index (a resumed run starts from them), what
    /// dead runners left of the steps they did not settle (a map's item checkpoints among
    /// it), and how far each step and item got (what their daily holds are settled by).
    async fn checkpoints(&self, run: &RunRecord, graph: &ValidatedGraph) -> Result<Checkpoints, EngineError> {
        let mut records: Vec<Option<StepRecord>> = vec![None; graph.steps().len()];
        let mut left: Vec<Option<Leftover>> = (0..graph.steps().len()).map(|_| None).collect();
        let mut reached = Reached::default();
        let index: HashMap<&str, usize> = graph.steps().iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
        // Each revision keeps its own checkpoints: those of the revision it runs.
        for saved in run.records_at(self.store.get_steps(&run.id).await?, run.revision) {
            let Some(&i) = index.get(saved.step_id.as_str()) else { continue };
            reached.step(&saved);
            if saved.status.is_settled() {
                records[i] = Some(saved);
                continue;
            }
            let items = match graph.steps()[i].kind {
                StepKind::Map(_) => self.store.get_items(&run.id, &saved.step_id, saved.revision).await?,
                _ => Vec::new(),
            };
            items.iter().for_each(|item| reached.item(&saved.step_id, item));
            // Where a waiting review stands (a step waiting for its budget has no use for it).
            let waiting =
                (saved.status == StepStatus::Waiting).then(|| saved.detail.clone().and_then(|d| serde_json::from_value(d).ok()).unwrap_or_default());
            // A map's batch job: its reservation is held again (not lost) until its answers are read.
            let batch = batch::BatchLeft::of(&saved);
            let carried = match &batch {
                Some(_) => Carried::of(&StepRecord { in_flight: None, ..saved.clone() }),
                None => Carried::of(&saved),
            };
            left[i] = Some(Leftover { carried: carried.unwrap_or_default(), items, waiting, batch });
        }
        Ok((records, left, reached))
    }
}
