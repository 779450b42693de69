//! The dead-letter consumer: what happens to a runner event Lambda gave up on.
//!
//! Lambda sends an async event that exhausted its retries (or its maximum age) to the
//! runner's on-failure destination, an SQS queue, as an invocation record; this consumer
//! reads them in batches. A failure that a later attempt can get past (the runner's
//! `chainrun.Retryable`, a crash, a timeout) is handed to the runner again, at most
//! `max_takeovers` times per run; after that, or for any other failure, the run ends
//! `RUN_FAILED` with `DELIVERY_FAILED` and what Lambda reported. A message that cannot be
//! handled now (the store is unavailable) is reported as a batch item failure, so SQS
//! delivers it again.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use chainrun_core::codes::ErrorCode;
use chainrun_core::durability::{Clock, Durability};
use chainrun_core::engine::EngineError;
use chainrun_core::engine::end::Ender;
use chainrun_core::ports::{Claim, DispatchError, Dispatcher, Lease, RunStore, StoreError};
use chainrun_core::run::{Cause, ErrorInfo, RunnerEvent};
use chainrun_core::telemetry::spans;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;
use tracing::{Instrument, error, info, warn};

/// The invocation record Lambda sends to an on-failure destination (the fields used here).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRecord {
    pub request_context: RequestContext,
    /// The event the function was invoked with.
    pub request_payload: Value,
    /// What the last attempt returned: `{"errorType", "errorMessage"}` for a function error.
    #[serde(default)]
    pub response_payload: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestContext {
    pub request_id: String,
    /// `RetriesExhausted` or `EventAgeExceeded`.
    pub condition: String,
    #[serde(default)]
    pub approximate_invoke_count: u32,
}

impl DestinationRecord {
    fn reported(&self, field: &str) -> &str {
        self.response_payload.as_ref().and_then(|p| p.get(field)).and_then(Value::as_str).unwrap_or("")
    }

    /// The runner returns an error only when a retry can succeed, marked `chainrun.Retryable`;
    /// a crash or a timeout (`Runtime.ExitError`, `Sandbox.Timedout`) can succeed on a fresh
    /// runner too. Only `chainrun.Terminal` says otherwise.
    fn retryable(&self) -> bool {
        self.reported("errorType") != "chainrun.Terminal"
    }
}

#[derive(Debug, thiserror::Error)]
enum DeadLetterError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
}

pub struct DeadLetters {
    pub store: Arc<dyn RunStore>,
    pub dispatcher: Arc<dyn Dispatcher>,
    pub ender: Ender,
    pub durability: Durability,
    pub clock: Arc<dyn Clock>,
}

impl DeadLetters {
    /// Handles a batch; the response names the messages to deliver again.
    pub async fn handle(&self, event: SqsEvent) -> SqsBatchResponse {
        let mut response = SqsBatchResponse::default();
        for message in event.records {
            let id = message.message_id.clone().unwrap_or_default();
            if let Err(e) = self.handle_one(&id, &message).await {
                warn!(message_id = %id, error = %e, "dead letter not handled; SQS delivers it again");
                response.add_failure(id);
            }
        }
        response
    }

    async fn handle_one(&self, message_id: &str, message: &SqsMessage) -> Result<(), DeadLetterError> {
        // A message that is not a runner event's record can never be handled: it is dropped
        // (logged), not delivered again forever.
        let Some(record) = message.body.as_deref().and_then(|b| serde_json::from_str::<DestinationRecord>(b).ok()) else {
            error!(message_id, body = ?message.body, "not a Lambda destination record; dropped");
            return Ok(());
        };
        let Ok(event) = serde_json::from_value::<RunnerEvent>(record.request_payload.clone()) else {
            error!(message_id, payload = %record.request_payload, "not a runner event; dropped");
            return Ok(());
        };
        let span = spans::run(&event.run_id);
        self.settle(message_id, record, event).instrument(span).await
    }

    /// Hands the run back to the runner, or ends it.
    async fn settle(&self, message_id: &str, record: DestinationRecord, event: RunnerEvent) -> Result<(), DeadLetterError> {
        let (error_type, error_message) = (record.reported("errorType"), record.reported("errorMessage"));
        let ctx = &record.request_context;
        if record.retryable() && event.redeliveries < self.durability.max_takeovers {
            let again = RunnerEvent { run_id: event.run_id.clone(), cause: Cause::DeadLetter, redeliveries: event.redeliveries + 1 };
            self.dispatcher.dispatch(&again).await?;
            info!(run_id = %event.run_id, condition = %ctx.condition, error_type, redelivery = again.redeliveries, "dead letter handed to the runner again");
            return Ok(());
        }
        let now = self.clock.now();
        let lease = Lease {
            holder: format!("dead-letter/{message_id}"),
            expires_at: now + chrono::Duration::from_std(self.durability.lease).unwrap_or_default(),
        };
        match self.store.claim(&event.run_id, &lease, now).await? {
            Claim::Acquired(run) => {
                let reason = format!(
                    "Lambda gave up delivering the run ({}, {} attempts, request {}){}: {error_type}: {error_message}",
                    ctx.condition,
                    ctx.approximate_invoke_count,
                    ctx.request_id,
                    if event.redeliveries > 0 { format!(" after {} redeliveries", event.redeliveries) } else { String::new() },
                );
                warn!(run_id = %event.run_id, %reason, "failing the run");
                let ended = (*run).clone();
                self.ender.fail_run(*run, &lease, ErrorInfo::terminal(ErrorCode::DeliveryFailed, reason)).await?;
                // Its tenant gets its concurrency slot back.
                self.ender.release_slot(&ended).await;
            }
            Claim::HeldElsewhere => info!(run_id = %event.run_id, "a runner holds the run now; nothing to do"),
            Claim::Waiting => info!(run_id = %event.run_id, "the run waits for a person now; nothing to do"),
            Claim::Finished | Claim::NotFound => info!(run_id = %event.run_id, "the run has ended (or is gone); nothing to do"),
        }
        Ok(())
    }
}
