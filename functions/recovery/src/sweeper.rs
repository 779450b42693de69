//! The sweeper: hands due runs to the runner again (see the crate docs).
//!
//! A due run is either *stuck* — past the bound recovery promises: its lease expired (its
//! runner stopped) or it stayed queued past the grace (its dispatch was lost) — or a waiting
//! run whose deadline came, which is on time. Each sweep reports the stuck ones (each in a
//! log line of its own, and as `StuckRuns`, 0 when none: see [`Swept::stuck`]).

use chainrun_core::durability::Clock;
use chainrun_core::ids::RunId;
use chainrun_core::ports::{Dispatcher, RunStore, StoreError};
use chainrun_core::run::{Cause, RunStatus, RunnerEvent};
use chainrun_core::telemetry::spans;
use std::sync::Arc;
use tracing::{Instrument, info, warn};

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
    /// The due runs that were past their bound (not waiting runs whose deadline came),
    /// handed over or not.
    pub stuck: Vec<RunId>,
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
            async {
                if let Some(why) = self.stuck(&run).await {
                    warn!(why, "run past its bound");
                    swept.stuck.push(run.clone());
                }
                match self.dispatcher.dispatch(&RunnerEvent::new(run.clone(), Cause::Sweep)).await {
                    Ok(()) => {
                        info!("swept: handed to the runner again");
                        swept.dispatched.push(run.clone());
                    }
                    Err(e) => {
                        warn!(error = %e, "swept run could not be dispatched; it stays due");
                        swept.failed.push(run.clone());
                    }
                }
            }
            .instrument(spans::run(&run))
            .await;
        }
        info!(dispatched = swept.dispatched.len(), failed = swept.failed.len(), stuck = swept.stuck.len(), "sweep done");
        Ok(swept)
    }

    /// Why a due run is past its bound, or `None` when it is on time (a waiting run whose
    /// deadline came). A run that cannot be read counts as stuck: nothing says otherwise.
    async fn stuck(&self, run: &RunId) -> Option<&'static str> {
        match self.store.get_run_head(run).await {
            Ok(Some(record)) => match record.status {
                RunStatus::Running => Some("its lease expired: the runner holding it stopped"),
                RunStatus::Queued => Some("queued past the grace: its dispatch was lost"),
                RunStatus::AwaitingInput | RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled => None,
            },
            Ok(None) => None,
            Err(e) => {
                warn!(error = %e, "could not read the due run");
                Some("it could not be read")
            }
        }
    }
}
