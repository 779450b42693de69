//! The sweeper: hands due runs to the runner again (see the crate docs).

use chainrun_core::durability::Clock;
use chainrun_core::ids::RunId;
use chainrun_core::ports::{Dispatcher, RunStore, StoreError};
use chainrun_core::run::{Cause, RunnerEvent};
use std::sync::Arc;
use tracing::{info, warn};

pub struct Sweeper {
    pub store: Arc<dyn RunStore>,
    pub dispatcher: Arc<dyn Dispatcher>,
    pub clock: Arc<dyn Clock>,
    /// Runs handed over per sweep at most; the rest wait for the next sweep.
    pub limit: usize,
}

/// What one sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    pub dispatched: Vec<RunId>,
    /// Runs whose hand-over failed; they stay due for the next sweep.
    pub failed: Vec<RunId>,
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("could not read the due runs: {0}")]
    Store(#[from] StoreError),
}

impl From<SweepError> for lambda_runtime::Diagnostic {
    fn from(e: SweepError) -> Self {
        // A failed sweep is retried by the next one; the type says whether waiting helps.
        let SweepError::Store(store) = &e;
        let kind = if store.retryable() { "chainrun.Retryable" } else { "chainrun.Terminal" };
        lambda_runtime::Diagnostic { error_type: kind.into(), error_message: e.to_string() }
    }
}

impl Sweeper {
    pub async fn sweep(&self) -> Result<Swept, SweepError> {
        let now = self.clock.now();
        let due = self.store.due(now, self.limit).await?;
        let mut swept = Swept::default();
        for run in due {
            match self.dispatcher.dispatch(&RunnerEvent::new(run.clone(), Cause::Sweep)).await {
                Ok(()) => {
                    info!(run_id = %run, "swept: handed to the runner again");
                    swept.dispatched.push(run);
                }
                Err(e) => {
                    warn!(run_id = %run, error = %e, "swept run could not be dispatched; it stays due");
                    swept.failed.push(run);
                }
            }
        }
        info!(dispatched = swept.dispatched.len(), failed = swept.failed.len(), "sweep done");
        Ok(swept)
    }
}
