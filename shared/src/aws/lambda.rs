//! [`Dispatcher`] over Lambda's asynchronous invoke.

use super::{describe, transient};
use crate::ports::{DispatchError, Dispatcher};
use async_trait::async_trait;
use aws_sdk_lambda::Client;
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::InvocationType;
use tracing::{info, instrument};

pub use crate::run::RunnerEvent;

#[derive(Clone)]
pub struct LambdaDispatcher {
    client: Client,
    function: String,
}

impl LambdaDispatcher {
    pub fn new(client: Client, function: impl Into<String>) -> Self {
        Self { client, function: function.into() }
    }
}

#[async_trait]
impl Dispatcher for LambdaDispatcher {
    #[instrument(skip_all, fields(run_id = %event.run_id, cause = ?event.cause, function = %self.function))]
    async fn dispatch(&self, event: &RunnerEvent) -> Result<(), DispatchError> {
        let run = &event.run_id;
        let payload = serde_json::to_vec(event).map_err(|e| DispatchError { run: run.clone(), message: e.to_string(), retryable: false })?;
        let result =
            self.client.invoke().function_name(&self.function).invocation_type(InvocationType::Event).payload(Blob::new(payload)).send().await;
        match result {
            Ok(out) => {
                info!(status = out.status_code, "run dispatched");
                Ok(())
            }
            Err(e) => {
                let retryable = transient(&e);
                let (code, message) = describe(&e);
                Err(DispatchError { run: run.clone(), message: format!("{}: {message}", code.unwrap_or_else(|| "InvokeFailed".into())), retryable })
            }
        }
    }
}
