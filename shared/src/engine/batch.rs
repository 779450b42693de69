//! A map's `llm` items as one batch inference job (`map.mode: batch`, or `auto` when the
//! items reach the model's minimum per job): answered at the model's batch price, while
//! the run waits holding no runner.
//!
//! 1. **Submit.** Each item's request is rendered; the job's worst case (every record at
//!    the batch price) is admitted against the run's budget and its caller's day like one
//!    call. The map's checkpoint turns `WAITING`, holding that reservation `in_flight` and
//!    the job's idempotency token, *before* the job is submitted: a runner that dies
//!    anywhere here leaves a checkpoint from which the next one submits again with the same
//!    token and finds the same job.
//! 2. **Wait.** The step reports a wait until the next poll; the engine parks the run
//!    (`waiting.kind: batch`) and the wake-up or the sweeper hands it back then. Each runner
//!    that takes it holds the job's reservation again (it was admitted at submission) and
//!    asks about the job; polls grow further apart up to ten times the poll interval.
//! 3. **Read.** Once the job ended, each answered record is checked as an online reply
//!    would be and checkpointed as its item at the batch price; the reservation is settled
//!    by what the answers were charged, and the day's hold with it. Items the job did not
//!    answer (not processed, a retryable error, a reply that fails the step's checks) run
//!    online afterwards, as any map item, with their own reservations. A job that cannot
//!    be submitted at all leaves every item to run online.

use super::EngineError;
use super::daily::CallName;
use super::running::{Running, item_record};
use super::step::{Inputs, StepContext, Work};
use crate::budget::{self, Amount, Reservation};
use crate::caching;
use crate::codes::ErrorCode;
use crate::graph::{ItemStep, LlmSpec, MapSpec};
use crate::ids::StepId;
use crate::money::Usd;
use crate::ports::{BatchJobs, BatchRecord, BatchState, BatchSubmission};
use crate::pricing::Usage;
use crate::run::{BatchWait, Carried, ErrorInfo, ItemRecord, StepRecord, StepStatus};
use crate::spend::{DayHold, Settlement};
use crate::wire::events::{BatchJob, EventBody};
use crate::workflow::MapMode;
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// The batch inference service and how the engine uses it.
#[derive(Clone)]
pub struct Batching {
    pub jobs: Arc<dyn BatchJobs>,
    /// How long after a submission (or a poll) the job is first asked about.
    pub poll_every: Duration,
    /// How long the service may take before it expires the job.
    pub timeout_hours: u32,
}

/// Polls wait at most this many times the poll interval.
const MAX_POLL_FACTOR: u32 = 10;

/// A map's batch job, as an earlier runner left it.
#[derive(Debug)]
pub struct BatchLeft {
    pub wait: BatchWait,
    /// The job's worst case, while it is out.
    pub held: Option<Amount>,
    /// `held`, held again in this invocation's ledger (by the engine, before any step runs).
    pub reservation: Option<Reservation>,
}

impl BatchLeft {
    pub fn of(saved: &StepRecord) -> Option<Self> {
        let wait = BatchWait::of(saved.detail.as_ref())?;
        let out = !wait.read && saved.status == StepStatus::Waiting;
        let held = saved.in_flight.filter(|_| out).map(|f| Amount { tokens: f.tokens, cost: f.cost });
        Some(Self { wait, held, reservation: None })
    }
}

/// What the batch path did with a map.
pub enum Batched {
    /// No batch job: every item runs online.
    Online,
    /// The job is out: ask again at this time.
    Waiting(DateTime<Utc>),
    /// The job's answers are in the items' checkpoints; the others run online.
    Read(BatchJob),
}

/// The job's hold on the run's budget and its caller's day while this runner has it.
struct JobHold {
    reservation: Option<Reservation>,
    /// Taken at submission in this invocation; otherwise found among the run's holds.
    day: Option<DayHold>,
}

impl StepContext {
    /// Submits, follows or reads the map's batch job, if it has (or should have) one.
    /// `checkpointed` gains the items the job answered.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn batch_items(
        &self,
        id: &StepId,
        spec: &MapSpec,
        items: &[Value],
        inputs: &Inputs,
        checkpointed: &mut HashMap<usize, ItemRecord>,
        left: Option<BatchLeft>,
        running: &mut Running,
    ) -> Result<Batched, EngineError> {
        if let Some(left) = left.as_ref().filter(|l| l.wait.read) {
            return Ok(Batched::Read(summary(&left.wait)));
        }
        let Some(batching) = &self.batch else {
            if left.is_some() || spec.mode == MapMode::Batch {
                warn!(step_id = %id, "no batch inference here (CHAINRUN_BATCH_ROLE_ARN unset): the map's items run online");
            }
            return Ok(Batched::Online);
        };
        if let (Some(left), ItemStep::Llm(llm)) = (left, &spec.step) {
            let hold = JobHold { reservation: left.reservation, day: None };
            return self.follow(batching, id, llm, items, inputs, checkpointed, left.wait, hold, running).await;
        }
        let Some(llm) = spec.batched(items.len(), &self.models) else {
            if spec.mode == MapMode::Batch {
                info!(step_id = %id, items = items.len(), "fewer items than a batch job of this model takes: they run online");
            }
            return Ok(Batched::Online);
        };
        let Some(min_records) = self.models.get(llm.model.as_str()).and_then(|m| m.batch).map(|b| b.min_records as usize) else {
            return Ok(Batched::Online);
        };
        // Items an earlier runner settled (online, before a crash) are not sent again.
        let pending: Vec<usize> = (0..items.len()).filter(|i| !checkpointed.get(i).is_some_and(|r| r.status.is_settled())).collect();
        if pending.len() < min_records {
            info!(step_id = %id, items = pending.len(), min_records, "fewer items than a batch job of this model takes: they run online");
            return Ok(Batched::Online);
        }
        let records = self.batch_records(id, llm, items, inputs, &pending, checkpointed).await?;
        if records.len() < min_records {
            return Ok(Batched::Online);
        }
        if spec.mode == MapMode::Auto && self.cache_beats_batch(llm, &records) {
            info!(step_id = %id, items = records.len(), "the items share a cached head: online with the prompt cache costs less than a batch job");
            return Ok(Batched::Online);
        }
        let Some(worst) = self.job_worst(llm, &records) else { return Ok(Batched::Online) };
        let admitted = match self.admit(worst, CallName { step: id, item: None, attempt: 1 }).await? {
            Ok(admitted) => admitted,
            Err((_, message)) => {
                // Each item is admitted on its own online instead: some may fit where the
                // whole job does not, and a refusal is then told per item.
                info!(step_id = %id, %message, "the batch job does not fit the budget: the items run online, each admitted on its own");
                return Ok(Batched::Online);
            }
        };
        let wait = BatchWait {
            token: job_token(&self.run_id.to_string(), id.as_str(), self.journal.revision()),
            job: None,
            items: records.iter().map(|r| r.index).collect(),
            status: "Submitting".into(),
            message: None,
            polls: 0,
            read: false,
            answered: 0,
            online: 0,
        };
        // Durable before the job exists: see the module's first point.
        if let Err(e) = self.journal.checkpoint(&running.batch_checkpoint(&wait, Some(worst))).await {
            self.journal.release(admitted.reservation);
            self.settle_day(admitted.day, Settlement::Charged(Usd::ZERO)).await;
            return Err(e.into());
        }
        let hold = JobHold { reservation: Some(admitted.reservation), day: admitted.day };
        self.submit(batching, id, llm, records, wait, worst, hold, running).await
    }

    /// Each pending item's request; an item whose template fails settles failed at once,
    /// as it would online.
    async fn batch_records(
        &self,
        id: &StepId,
        llm: &LlmSpec,
        items: &[Value],
        inputs: &Inputs,
        pending: &[usize],
        checkpointed: &mut HashMap<usize, ItemRecord>,
    ) -> Result<Vec<BatchRecord>, EngineError> {
        let mut records = Vec::with_capacity(pending.len());
        for &index in pending {
            match self.batch_request(id, llm, &inputs.with_item(&items[index], index), index) {
                Ok(request) => records.push(BatchRecord { index, request }),
                Err(failed) => {
                    let record = item_record(index, failed.as_ref(), &Carried::default());
                    self.journal.save_item(id, &record).await?;
                    checkpointed.insert(index, record);
                }
            }
        }
        Ok(records)
    }

    /// `auto`: whether the items, sent online, would share a prompt-cache head that makes
    /// them cheaper than a batch job (which halves every token's price but has no cache: a
    /// read costs a tenth of input on Claude). Priced on the first item, with its head
    /// written once and read by the others, and half of `max_tokens` answered either way.
    fn cache_beats_batch(&self, llm: &LlmSpec, records: &[BatchRecord]) -> bool {
        let (Some(model), Some(first)) = (llm.priced(&self.models), records.first()) else { return false };
        let (Some(batched), Some(rules)) = (model.batched(), model.cache.filter(|_| llm.caches(&model))) else { return false };
        let request = &first.request;
        let points = caching::plan(rules, request.system.as_deref(), &request.prompt, caching::static_head(llm.prompt.source()));
        if points.count() == 0 {
            return false;
        }
        let system = request.system.as_deref().map_or(0, str::len);
        let head_bytes = points.prompt_head.map_or(system, |head| system + head);
        let tokens = |bytes: usize| (bytes as u64).div_ceil(caching::PLACEMENT_BYTES_PER_TOKEN as u64);
        let (head, all, out) = (tokens(head_bytes), tokens(system + request.prompt.len()), u64::from(llm.max_tokens.div_ceil(2)));
        let n = records.len() as u64;
        let usage = |input_tokens, cache_read_tokens, cache_write_tokens| Usage {
            input_tokens: input_tokens * n,
            output_tokens: out * n,
            cache_read_tokens,
            cache_write_tokens,
        };
        let online = model.cost(&usage(all.saturating_sub(head), head * (n - 1), head));
        let batch = batched.cost(&usage(all, 0, 0));
        matches!((online, batch), (Some(online), Some(batch)) if online < batch)
    }

    /// Every record at the batch price, answered in full: what the job may cost at most.
    fn job_worst(&self, llm: &LlmSpec, records: &[BatchRecord]) -> Option<Amount> {
        let model = llm.priced(&self.models)?.batched()?;
        Some(records.iter().fold(Amount::ZERO, |sum, r| {
            let input = budget::estimate_input_tokens(r.request.system.as_deref(), &r.request.prompt);
            sum.saturating_add(budget::worst_case(&model, input, r.request.max_tokens))
        }))
    }

    #[allow(clippy::too_many_arguments)]
    async fn submit(
        &self,
        batching: &Batching,
        id: &StepId,
        llm: &LlmSpec,
        records: Vec<BatchRecord>,
        mut wait: BatchWait,
        worst: Amount,
        hold: JobHold,
        running: &mut Running,
    ) -> Result<Batched, EngineError> {
        let submission = BatchSubmission {
            token: wait.token.clone(),
            run: self.run_id.clone(),
            step: id.clone(),
            model: llm.model.clone(),
            records,
            timeout_hours: batching.timeout_hours,
        };
        match batching.jobs.submit(&submission).await {
            Ok(job) => {
                info!(step_id = %id, %job, records = wait.items.len(), worst_pico = worst.cost.pico(), "batch job submitted");
                wait.job = Some(job);
                wait.status = "Submitted".into();
                self.journal.checkpoint(&running.batch_checkpoint(&wait, Some(worst))).await?;
                let until = self.next_poll(batching, &wait);
                self.tell(id, &wait, Some(until)).await?;
                Ok(Batched::Waiting(until))
            }
            Err(e) if e.retryable() => {
                // Submitted again (same token) at the next poll.
                warn!(step_id = %id, error = %e, "the batch job could not be submitted now; trying again at the next poll");
                Ok(Batched::Waiting(self.next_poll(batching, &wait)))
            }
            Err(e) => {
                warn!(step_id = %id, error = %e, "the batch job was refused: the map's items run online");
                wait.status = "NotSubmitted".into();
                wait.message = Some(e.to_string());
                self.read(id, llm, wait, Default::default(), hold, &mut HashMap::new(), running).await
            }
        }
    }

    /// Asks about a job an earlier invocation submitted (or meant to).
    #[allow(clippy::too_many_arguments)]
    async fn follow(
        &self,
        batching: &Batching,
        id: &StepId,
        llm: &LlmSpec,
        items: &[Value],
        inputs: &Inputs,
        checkpointed: &mut HashMap<usize, ItemRecord>,
        mut wait: BatchWait,
        hold: JobHold,
        running: &mut Running,
    ) -> Result<Batched, EngineError> {
        let held = hold.reservation.as_ref().map(Reservation::amount).unwrap_or(Amount::ZERO);
        let Some(job) = wait.job.clone() else {
            // Died before the job was known: the same records and token find it (or make it).
            let wanted: Vec<usize> = wait.items.iter().copied().filter(|&i| i < items.len()).collect();
            let records = self.batch_records(id, llm, items, inputs, &wanted, checkpointed).await?;
            return self.submit(batching, id, llm, records, wait, held, hold, running).await;
        };
        let ended = match batching.jobs.state(&job).await {
            Ok(BatchState::Running { status }) => {
                let changed = status != wait.status;
                wait.status = status;
                wait.polls += 1;
                self.journal.checkpoint(&running.batch_checkpoint(&wait, Some(held))).await?;
                let until = self.next_poll(batching, &wait);
                if changed {
                    self.tell(id, &wait, Some(until)).await?;
                }
                return Ok(Batched::Waiting(until));
            }
            Ok(BatchState::Ended { status, message }) => (status, message),
            Err(e) if e.retryable() => {
                warn!(step_id = %id, %job, error = %e, "the batch job could not be asked about now");
                return Ok(Batched::Waiting(self.next_poll(batching, &wait)));
            }
            // The service no longer knows the job: nothing of it can be read or was billed.
            Err(e) => {
                warn!(step_id = %id, %job, error = %e, "the batch job is unknown to the service: its items run online");
                (wait.status, wait.message) = ("Lost".to_owned(), Some(e.to_string()));
                return self.read(id, llm, wait, Default::default(), hold, checkpointed, running).await;
            }
        };
        let answers = match batching.jobs.results(&job).await {
            Ok(answers) => answers,
            Err(e) if e.retryable() => {
                warn!(step_id = %id, %job, error = %e, "the batch job's answers could not be read now");
                return Ok(Batched::Waiting(self.next_poll(batching, &wait)));
            }
            Err(e) => {
                warn!(step_id = %id, %job, error = %e, "the batch job's answers cannot be read: its items run online");
                Default::default()
            }
        };
        info!(step_id = %id, %job, status = %ended.0, answers = answers.len(), "batch job ended");
        (wait.status, wait.message) = ended;
        self.read(id, llm, wait, answers, hold, checkpointed, running).await
    }

    /// Checkpoints each answered item at the batch price, settles the job's holds by what
    /// the answers were charged, and marks the job read.
    #[allow(clippy::too_many_arguments)]
    async fn read(
        &self,
        id: &StepId,
        llm: &LlmSpec,
        mut wait: BatchWait,
        mut answers: crate::ports::BatchResults,
        hold: JobHold,
        checkpointed: &mut HashMap<usize, ItemRecord>,
        running: &mut Running,
    ) -> Result<Batched, EngineError> {
        let priced = llm.priced(&self.models).and_then(|m| m.batched());
        let (mut usage, mut cost, mut answered, mut online) = (Usage::default(), Usd::ZERO, 0usize, 0usize);
        for &index in &wait.items {
            // Read by an earlier runner that died before marking the job read.
            if checkpointed.contains_key(&index) {
                continue;
            }
            let mut work = Work::done(String::new(), Value::Null);
            match answers.remove(&index) {
                Some(Ok(reply)) => {
                    let charged = priced.as_ref().and_then(|m| m.cost(&reply.usage)).unwrap_or(Usd::from_pico(u64::MAX));
                    (usage, cost, answered) = (usage.plus(&reply.usage), cost.saturating_add(charged), answered + 1);
                    work.add_spend(reply.usage, charged, 1);
                    match self.accepted(llm, reply) {
                        Some(done) => work.output = Ok(done),
                        None => {
                            // Charged, and run again online with its charge carried.
                            let mut record = item_record(index, &work, &Carried::default());
                            (record.status, record.output, record.text) = (StepStatus::Running, None, None);
                            self.journal.save_item(id, &record).await?;
                            checkpointed.insert(index, record);
                            online += 1;
                            continue;
                        }
                    }
                }
                Some(Err(e)) if !e.retryable() => {
                    work.output = Err(ErrorInfo::terminal(ErrorCode::parse(&e.code), e.message));
                }
                // Not processed, or worth another try: online, as if never sent.
                _ => {
                    online += 1;
                    continue;
                }
            }
            let record = item_record(index, &work, &Carried::default());
            self.journal.save_item(id, &record).await?;
            checkpointed.insert(index, record);
        }
        let reservation = hold.reservation.unwrap_or_else(|| self.journal.hold_again(Amount::ZERO));
        self.journal.settle_calls(reservation, &usage, cost, answered as u64);
        let day = match hold.day {
            Some(day) => Some(day),
            None => self.job_day_hold(id).await,
        };
        self.settle_day(day, Settlement::Charged(cost)).await;
        (wait.read, wait.answered, wait.online) = (true, answered, online);
        info!(step_id = %id, answered, online, cost_pico = cost.pico(), "batch job read");
        running.announce(&self.journal, None).await?;
        self.journal.checkpoint(&running.batch_checkpoint(&wait, None)).await?;
        self.tell(id, &wait, None).await?;
        Ok(Batched::Read(summary(&wait)))
    }

    /// The hold an earlier runner took on the caller's day for this map's job, if any.
    async fn job_day_hold(&self, id: &StepId) -> Option<DayHold> {
        let cap = self.owner_cap.as_ref()?;
        match cap.spend.holds(&self.run_id).await {
            Ok(holds) => holds.into_iter().find(|h| h.step == *id && h.item.is_none()),
            Err(e) => {
                // It stays, and is written off at its worst case when the run ends.
                warn!(step_id = %id, error = %e, "the batch job's daily hold could not be read");
                None
            }
        }
    }

    /// When to ask about the job next: the poll interval, doubling with each poll up to
    /// [`MAX_POLL_FACTOR`] times it (a job takes minutes to hours).
    fn next_poll(&self, batching: &Batching, wait: &BatchWait) -> DateTime<Utc> {
        let factor = 1u32.checked_shl(wait.polls).unwrap_or(u32::MAX).min(MAX_POLL_FACTOR);
        let after = chrono::Duration::from_std(batching.poll_every * factor).unwrap_or(chrono::Duration::MAX);
        self.reviews.clock.now() + after
    }

    /// `BATCH_JOB`: where the job stands.
    async fn tell(&self, id: &StepId, wait: &BatchWait, next_poll_at: Option<DateTime<Utc>>) -> Result<(), EngineError> {
        let mut job = summary(wait);
        job.next_poll_at = next_poll_at;
        self.journal.emit(EventBody::BatchJob(job), Some(id), None).await?;
        Ok(())
    }
}

/// A job as `BATCH_JOB` and the map's detail tell it.
fn summary(wait: &BatchWait) -> BatchJob {
    BatchJob {
        job: wait.job.clone().unwrap_or_default(),
        status: wait.status.clone(),
        records: wait.items.len(),
        message: wait.message.clone(),
        next_poll_at: None,
        answered: wait.read.then_some(wait.answered),
        online: wait.read.then_some(wait.online),
    }
}

/// The job's idempotency token: one per run, map and revision, in the characters Bedrock
/// takes (`[a-zA-Z0-9-]`).
fn job_token(run: &str, step: &str, revision: u32) -> String {
    let clean = |s: &str| s.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect::<String>();
    format!("{}-{}-r{revision}", clean(run), clean(step))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_token_is_stable_and_keeps_to_bedrocks_characters() {
        let token = job_token("01JX_run.1", "sum_up", 2);
        assert_eq!(token, "01JX-run-1-sum-up-r2");
        assert_eq!(token, job_token("01JX_run.1", "sum_up", 2));
        assert_ne!(token, job_token("01JX_run.1", "sum_up", 3), "each revision submits its own job");
    }
}
