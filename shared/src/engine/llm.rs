//! Model calls: render, admit (reserve the worst case), attempt, accept the reply or
//! retry with backoff.
//!
//! Admission is the one refusal path: a call is made only after its worst-case cost is
//! held against the run's budget and, where a cap applies, its caller's day. A call that
//! does not fit either is never made and the step fails `BUDGET_EXCEEDED` with the numbers.

use super::EngineError;
use super::daily::CallName;
use super::running::Hold;
use super::step::{Scope, StepContext, Work};
use super::throttle::Throttled;
use crate::budget::{self, Reservation};
use crate::caching;
use crate::codes::ErrorCode;
use crate::graph::LlmSpec;
use crate::ids::StepId;
use crate::limits;
use crate::money::Usd;
use crate::output;
use crate::ports::{CachePoints, ModelError, ModelErrorKind, ModelReply, ModelRequest};
use crate::pricing::Usage;
use crate::responses::{self, CachedReply};
use crate::run::ErrorInfo;
use crate::spend::{DayHold, Settlement};
use crate::telemetry::Seen;
use crate::template::Template;
use crate::wire::ResponseHit;
use crate::wire::events::{EventBody, StepRetrying, Streaming};
use crate::wire::{Refusal, Refused, StepDetail};
use crate::workflow::RetryPolicy;
use crate::workflow::{CacheMode, OutputFormat};
use rand::Rng;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

/// How one model attempt ended.
enum AttemptError {
    Model(ModelError),
    Output(output::InvalidOutput),
}

/// What admission holds for one call until it is settled.
pub(super) struct Admitted {
    pub reservation: Reservation,
    pub day: Option<DayHold>,
}

impl StepContext {
    /// A model call with retries. `item` is the map item index when run inside a map.
    /// `hold` is where each call's reservation is written before the call is made: the
    /// step's `RUNNING` checkpoint (the first together with `STEP_STARTED`), or a map
    /// item's checkpoint.
    pub async fn run_llm(
        &self,
        id: &StepId,
        spec: &LlmSpec,
        scope: &impl Scope,
        item: Option<usize>,
        mut hold: Hold<'_>,
    ) -> Result<Work, EngineError> {
        let (Some(model_info), Some(dearest)) = (spec.priced(&self.models), spec.priced_at_most(&self.models)) else {
            return Ok(Work::failed(
                ErrorCode::UnknownModel,
                format!("no price for model {} in the {} tier", spec.model, spec.service_tier.as_str()),
            ));
        };
        let (system, prompt) = match rendered(spec, scope) {
            Ok(texts) => texts,
            Err(failed) => return Ok(*failed),
        };
        let cache_points = match model_info.cache {
            Some(rules) if spec.caches(&model_info) => caching::plan(rules, system.as_deref(), &prompt, caching::static_head(spec.prompt.source())),
            _ => CachePoints::default(),
        };
        let output_schema = native_schema(spec, &model_info);
        let metadata = self.call_labels(id, item);
        // A deterministic step answered before: no call, no admission, no charge.
        let response_key = (spec.cache == CacheMode::Response && self.responses.is_some()).then(|| responses::key(spec, system.as_deref(), &prompt));
        if let Some(key) = &response_key
            && let Some(hit) = self.cached_reply(spec, key, item).await
        {
            return Ok(hit);
        }
        let mut work = Work::failed(ErrorCode::NoAttempts, "retry.max_attempts is 0");
        let mut hint: Option<String> = None;
        for attempt in 1..=spec.retry.max_attempts {
            work.attempts = attempt;
            // The step's span (a map item's, inside a map): every line of this attempt carries it.
            tracing::Span::current().record("attempt", attempt);
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
                // A hint is appended after the prompt, so the head stays where it was.
                cache_points,
                service_tier: spec.service_tier,
                metadata: metadata.clone(),
                output_schema: output_schema.clone(),
            };
            // Every attempt reserves anew: the request (hint included) is what is priced,
            // against what earlier attempts were charged.
            let worst = spec.worst_call(&dearest, budget::estimate_input_tokens(request.system.as_deref(), &request.prompt), request.max_tokens);
            // The tenant's token allowance first: a call may wait here for the next minute,
            // and should hold nothing of the run's budget or its caller's day meanwhile.
            let tokens = match self.throttle(id, &spec.model, worst.tokens).await? {
                Throttled::Admitted(tokens) => tokens,
                Throttled::HandOver => {
                    work.attempts = attempt - 1;
                    work.handed_over = true;
                    return Ok(work);
                }
                Throttled::Never(never) => {
                    warn!(
                        attempt,
                        item,
                        tokens = never.tokens,
                        allowance = never.allowance,
                        "the call is larger than its tenant's token allowance per minute: it is not made"
                    );
                    work.attempts = attempt - 1;
                    work.output = Err(ErrorInfo::terminal(ErrorCode::BudgetExceeded, never.to_string()));
                    return Ok(work);
                }
            };
            let admitted = match self.admit(worst, CallName { step: id, item, attempt }).await? {
                Ok(admitted) => admitted,
                Err((refusal, message)) => {
                    self.settle_tokens(tokens, 0).await;
                    if self.budget_pauses(&refusal) {
                        // The run waits for a larger budget: nothing new starts meanwhile.
                        self.budget_refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert_with(|| message.clone());
                        self.pausing.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    work.attempts = attempt - 1;
                    work.output = Err(refusal.error(message));
                    work.detail = Some(StepDetail::Refused(Refused { budget: refusal }));
                    return Ok(work);
                }
            };
            // The reservation is durable before the call: a runner that takes over after a
            // crash counts this call at its worst case.
            if let Err(e) = hold.before_call(&self.journal, &work, worst).await {
                // The call is not made: its holds go back now. The day's would otherwise wait
                // for the next runner, which may have taken the run already (this runner's
                // lease lost) and settled the holds it found before this one was taken.
                self.journal.release(admitted.reservation);
                self.settle_day(admitted.day, Settlement::Charged(Usd::ZERO)).await;
                self.settle_tokens(tokens, 0).await;
                return Err(e);
            }
            let call_started = Instant::now();
            // On an engine error the reservation is dropped unreleased: the call's spend is
            // unknown, so the run keeps it held (the run stops on that error anyway), and
            // its day hold stays for the next runner to count as lost.
            let reply = if spec.stream && item.is_none() { self.stream(id, attempt, &request).await? } else { self.model.converse(&request).await };
            let outcome = match reply {
                Ok(reply) => {
                    // Priced in the tier Bedrock says served it, if it says and the sheet has it
                    // (never dearer than the reservation: see `priced_at_most`).
                    let served = reply
                        .service_tier
                        .filter(|t| *t != spec.service_tier)
                        .and_then(|t| self.models.get(spec.model.as_str())?.in_tier(t).map(|m| m.into_owned()));
                    let cost = served.as_ref().unwrap_or(&model_info).cost(&reply.usage).unwrap_or(Usd::from_pico(u64::MAX));
                    work.add_spend(reply.usage, cost, 1);
                    self.journal.settle(admitted.reservation, &reply.usage, cost);
                    self.settle_day(admitted.day, Settlement::Charged(cost)).await;
                    self.settle_tokens(tokens, reply.usage.total_tokens()).await;
                    info!(
                        attempt,
                        item,
                        tokens = reply.usage.total_tokens(),
                        cache_read_tokens = reply.usage.cache_read_tokens,
                        cache_write_tokens = reply.usage.cache_write_tokens,
                        cost_pico = cost.pico(),
                        latency_ms = call_started.elapsed().as_millis() as u64,
                        "model call finished"
                    );
                    self.accept(spec, reply)
                }
                Err(e) => {
                    // The port reports no usage with an error: nothing to charge.
                    self.journal.release(admitted.reservation);
                    self.settle_day(admitted.day, Settlement::Charged(Usd::ZERO)).await;
                    self.settle_tokens(tokens, 0).await;
                    Err(AttemptError::Model(e))
                }
            };
            let error = match outcome {
                Ok(done) => {
                    if let Some(key) = &response_key {
                        self.keep_reply(key, &done.0, work.usage).await;
                    }
                    work.output = Ok(done);
                    return Ok(work);
                }
                Err(e) => e,
            };
            let (code, message, retryable) = match &error {
                AttemptError::Model(e) => (ErrorCode::parse(&e.code), e.message.clone(), e.retryable()),
                AttemptError::Output(e) => (ErrorCode::InvalidOutput, e.0.clone(), true),
            };
            if !retryable || attempt == spec.retry.max_attempts {
                let message = if retryable { format!("{message} (after {attempt} attempts)") } else { message };
                work.output = Err(ErrorInfo { code, message, retryable });
                return Ok(work);
            }
            if let AttemptError::Output(e) = &error {
                hint = Some(limits::corrective_hint(&e.0));
            }
            let delay = backoff(&spec.retry, attempt);
            warn!(attempt, item, code = %code, delay_ms = delay.as_millis() as u64, "attempt failed; retrying");
            let retrying = StepRetrying { reason: code, message, delay_ms: delay.as_millis() as u64, item };
            self.journal.emit(EventBody::StepRetrying(retrying), Some(id), Some(attempt + 1)).await?;
            tokio::time::sleep(delay).await;
        }
        Ok(work)
    }

    /// The step's work from the response cache, if it holds an accepted reply for `key`.
    /// A cache that cannot answer is a miss: the step calls the model instead.
    async fn cached_reply(&self, spec: &LlmSpec, key: &str, item: Option<usize>) -> Option<Work> {
        let responses = self.responses.as_ref()?;
        let found = match responses.cache.get(&responses.tenant, key, responses.clock.now()).await {
            Ok(found) => found?,
            Err(e) => {
                warn!(item, error = %e, "the response cache could not be read: the model is called");
                return None;
            }
        };
        let reply = ModelReply { text: found.text, usage: Usage::default(), stop_reason: "end_turn".into(), service_tier: None };
        // Checked as a fresh reply would be (the schema and size limit are part of the key,
        // so this only fails for an entry that was tampered with).
        let Ok(done) = self.accept(spec, reply) else {
            warn!(item, "a cached reply no longer passes the step's checks: the model is called");
            return None;
        };
        info!(item, saved_tokens = found.usage.total_tokens(), "answered from the response cache");
        let mut work = Work::done(done.0, done.1);
        work.attempts = 0;
        work.detail = Some(StepDetail::Cached(ResponseHit {
            response_cache: "hit",
            stored_at: found.stored_at,
            saved_input_tokens: found.usage.input_tokens + found.usage.cache_read_tokens + found.usage.cache_write_tokens,
            saved_output_tokens: found.usage.output_tokens,
        }));
        Some(work)
    }

    /// Keeps an accepted reply for the next identical call; a failure only costs that reuse.
    async fn keep_reply(&self, key: &str, text: &str, usage: Usage) {
        let Some(responses) = &self.responses else { return };
        let now = responses.clock.now();
        let reply = CachedReply { text: text.to_owned(), usage, stored_at: now };
        if let Err(e) = responses.cache.put(&responses.tenant, key, &reply, now + responses.ttl).await {
            warn!(error = %e, "the reply could not be kept in the response cache");
        }
    }

    /// Bedrock's `requestMetadata` for one call: what its invocation log needs to be
    /// matched with this run's ledger. Values keep to the characters Bedrock accepts.
    fn call_labels(&self, id: &StepId, item: Option<usize>) -> BTreeMap<String, String> {
        let mut labels = self.labels.clone();
        labels.insert("chainrun_step".into(), id.to_string());
        if let Some(item) = item {
            labels.insert("chainrun_item".into(), item.to_string());
        }
        labels
    }

    /// Holds `worst` against the run's budget and its caller's day, or says why not (with
    /// the refusal's message). Nothing is held when the call is refused.
    pub(super) async fn admit(&self, worst: budget::Amount, call: CallName<'_>) -> Result<Result<Admitted, (Refusal, String)>, EngineError> {
        let (attempt, item, step) = (call.attempt, call.item, call.step);
        let reservation = match self.journal.reserve(worst) {
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
                self.journal.observe(Seen::BudgetRefused { step, limit: exceeded.limit.name() });
                return Ok(Err((Refusal::Run((&exceeded).into()), exceeded.to_string())));
            }
        };
        let Some(owner_cap) = &self.owner_cap else { return Ok(Ok(Admitted { reservation, day: None })) };
        match owner_cap.reserve(call, worst).await {
            Ok(Ok(day)) => Ok(Ok(Admitted { reservation, day: Some(day) })),
            Ok(Err(exceeded)) => {
                self.journal.release(reservation);
                warn!(
                    attempt,
                    item,
                    owner = %exceeded.owner,
                    cap_pico = exceeded.cap.pico(),
                    committed_pico = exceeded.committed.pico(),
                    attempted_pico = exceeded.attempted.cost.pico(),
                    "daily spend cap reached: the model call is not made"
                );
                self.journal.observe(Seen::BudgetRefused { step, limit: "daily_cap" });
                Ok(Err((Refusal::DailyCap((&exceeded).into()), exceeded.to_string())))
            }
            Err(e) => {
                // Fail closed: without the counter the call cannot be admitted.
                self.journal.release(reservation);
                Err(e.into())
            }
        }
    }

    /// Replaces a call's hold on its owner's day (if it took one) by `settlement`.
    pub(super) async fn settle_day(&self, hold: Option<DayHold>, settlement: Settlement) {
        if let (Some(owner_cap), Some(hold)) = (&self.owner_cap, hold) {
            owner_cap.settle(hold, settlement).await;
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
                ErrorCode::OutputTooLarge.as_str(),
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
                        let body = EventBody::Streaming(Streaming { delta: std::mem::take(&mut buffer), chars: sent_chars });
                        self.journal.emit(body, Some(id), Some(attempt)).await?;
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
            self.journal.emit(EventBody::Streaming(Streaming { delta: buffer, chars: sent_chars }), Some(id), Some(attempt)).await?;
        }
        Ok(result)
    }
}

/// The schema a call asks the model to keep to natively (structured output), where the model
/// has it; the reply is validated all the same.
fn native_schema(spec: &LlmSpec, model: &crate::pricing::ModelInfo) -> Option<Value> {
    match (&spec.schema, spec.format) {
        (Some(schema), OutputFormat::Json) if model.structured_output => Some(schema.document().clone()),
        _ => None,
    }
}

/// A call's system prompt and prompt, or the work of a step whose template failed.
fn rendered(spec: &LlmSpec, scope: &impl Scope) -> Result<(Option<String>, String), Box<Work>> {
    let render = |source: &Template| source.render(scope);
    let failed = |field: &str, e: crate::template::TemplateError| Box::new(Work::failed(ErrorCode::TemplateError, format!("{field}: {e}")));
    let prompt = render(&spec.prompt).map_err(|e| failed("prompt", e))?;
    let system = spec.system.as_ref().map(render).transpose().map_err(|e| failed("system", e))?;
    Ok((system, prompt))
}

impl StepContext {
    /// A map item's request as a batch job sends it: no cache points and no service tier
    /// (a batch job has neither), or the work of an item whose template failed.
    pub(super) fn batch_request(&self, id: &StepId, spec: &LlmSpec, scope: &impl Scope, item: usize) -> Result<ModelRequest, Box<Work>> {
        let (system, prompt) = rendered(spec, scope)?;
        let output_schema = spec.priced(&self.models).and_then(|model| native_schema(spec, &model));
        Ok(ModelRequest {
            model: spec.model.clone(),
            system,
            prompt,
            temperature: spec.temperature,
            max_tokens: spec.max_tokens,
            stop_sequences: spec.stop_sequences.clone(),
            cache_points: CachePoints::default(),
            service_tier: crate::pricing::ServiceTier::Default,
            metadata: self.call_labels(id, Some(item)),
            output_schema,
        })
    }

    /// A reply checked as a step's reply is (format, schema, size); `None` if it fails.
    pub(super) fn accepted(&self, spec: &LlmSpec, reply: ModelReply) -> Option<(String, Value)> {
        self.accept(spec, reply).ok()
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
