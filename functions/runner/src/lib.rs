//! chainrun's runner: claims a run and executes it with the engine.
//!
//! Lambda delivers async events at least once, so [`Runner::handle`] first claims the run
//! with a conditional write. A duplicate delivery finds the run held (or finished) and
//! does nothing; a delivery after a crash finds the lease expired, takes it over and the
//! engine resumes from checkpoints. Near the deadline the engine suspends and the runner
//! dispatches the run to itself again, so a run can outlive one invocation.
//!
//! When a run ends, the runner adds it to its owners' cost rollups ([`Analytics`]). That
//! happens after the run's end is stored, so a crash in between would lose it — except
//! that recording is exactly-once per run and owner, and a delivery that finds the run
//! already finished records it again (a no-op if it was). A failed recording fails the
//! invocation, and Lambda's retry of it completes the rollup.

use chainrun_core::config::{ConfigError, CoreConfig, Source};
use chainrun_core::engine::{Engine, EngineError, Outcome};
use chainrun_core::ids::RunId;
use chainrun_core::ports::{Analytics, AnalyticsError, Claim, DispatchError, Dispatcher, Lease, ProgressError, RunStore, StoreError};
use chainrun_core::run::RunnerEvent;
use chrono::{DateTime, Utc};
use lambda_runtime::Diagnostic;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub core: CoreConfig,
    /// The function's own name, for re-dispatching a suspended run (set by Lambda).
    pub self_function: String,
    pub deadline_margin: Duration,
}

impl RunnerConfig {
    pub fn from_source(env: &impl Source) -> Result<Self, ConfigError> {
        Ok(Self {
            core: CoreConfig::from_source(env)?,
            self_function: env.required("AWS_LAMBDA_FUNCTION_NAME")?,
            deadline_margin: Duration::from_secs(env.parsed("CHAINRUN_DEADLINE_MARGIN_SECS", 90u64)?),
        })
    }
}

/// How an invocation ended, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    Finished(chainrun_core::run::RunStatus),
    Suspended,
    /// Duplicate delivery: another runner holds the run.
    AlreadyRunning,
    AlreadyFinished,
    UnknownRun,
    /// Our lease expired and another runner took the run over mid-way.
    Superseded,
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    #[error(transparent)]
    Analytics(#[from] AnalyticsError),
}

impl RunnerError {
    pub fn retryable(&self) -> bool {
        match self {
            RunnerError::Engine(e) => e.retryable(),
            RunnerError::Store(e) => e.retryable(),
            RunnerError::Dispatch(e) => e.retryable,
            RunnerError::Analytics(e) => e.retryable(),
        }
    }
}

impl From<RunnerError> for Diagnostic {
    fn from(e: RunnerError) -> Self {
        // Lambda retries failed async invocations; the type tells operators whether
        // that retry can succeed.
        let kind = if e.retryable() { "chainrun.Retryable" } else { "chainrun.Terminal" };
        Diagnostic { error_type: kind.into(), error_message: e.to_string() }
    }
}

pub struct Runner {
    pub store: Arc<dyn RunStore>,
    pub engine: Engine,
    pub dispatcher: Arc<dyn Dispatcher>,
    pub analytics: Arc<dyn Analytics>,
}

impl Runner {
    /// Handles one delivery. `deadline` is the invocation's wall-clock deadline.
    pub async fn handle(&self, event: RunnerEvent, invocation: &str, deadline: DateTime<Utc>, margin: Duration) -> Result<Handled, RunnerError> {
        let run_id = event.run_id;
        let now = Utc::now();
        let deadline = if deadline > now {
            deadline
        } else {
            // An invocation cannot start after its own deadline; a runtime that reports one
            // (some emulators send a relative number) gets Lambda's 15-minute maximum.
            warn!(run_id = %run_id, reported = %deadline, "invocation deadline is in the past; assuming 15 minutes");
            now + chrono::Duration::minutes(15)
        };
        info!(run_id = %run_id, remaining_ms = (deadline - now).num_milliseconds(), "delivery received");
        // The lease outlives the invocation a little: a live runner is never overtaken,
        // and a crashed one is taken over soon after its deadline passes.
        let lease = Lease { holder: format!("{invocation}/{}", ulid_suffix()), expires_at: deadline + chrono::Duration::seconds(30) };
        let run = match self.store.claim(&run_id, &lease, now).await? {
            Claim::Acquired(run) => *run,
            Claim::HeldElsewhere => {
                info!(run_id = %run_id, "duplicate delivery: run is held by another runner");
                return Ok(Handled::AlreadyRunning);
            }
            Claim::Finished => {
                info!(run_id = %run_id, "duplicate delivery: run already finished");
                // The delivery may be Lambda's retry of an invocation that stopped between
                // finishing the run and rolling it up.
                self.roll_up(&run_id).await?;
                return Ok(Handled::AlreadyFinished);
            }
            Claim::NotFound => {
                warn!(run_id = %run_id, "no such run");
                return Ok(Handled::UnknownRun);
            }
        };
        let remaining = (deadline - now).to_std().unwrap_or_default();
        // Keep at least three quarters of a short invocation for work, so a small
        // timeout (or a local emulator's) cannot make every invocation suspend at once.
        let margin = margin.min(remaining / 4);
        let deadline_instant = tokio::time::Instant::now() + remaining;
        let outcome = self.engine.clone().with_deadline_margin(margin).execute(run, lease.clone(), Some(deadline_instant)).await;
        match outcome {
            Ok(Outcome::Finished(status)) => {
                self.roll_up(&run_id).await?;
                Ok(Handled::Finished(status))
            }
            Ok(Outcome::Suspended) => {
                self.dispatcher.dispatch(&run_id).await?;
                info!(run_id = %run_id, "run suspended and re-dispatched");
                Ok(Handled::Suspended)
            }
            Err(EngineError::Store(StoreError::LeaseLost(_)) | EngineError::Progress(ProgressError::Conflict { .. })) => {
                // Another runner took the run over (our lease expired); it owns the run now,
                // so this is not a failure to retry.
                warn!(run_id = %run_id, "lease lost to another runner; stopping");
                Ok(Handled::Superseded)
            }
            Err(e) => {
                // Give the lease back so Lambda's retry of this event can take over at once.
                if let Err(release) = self.store.release(&run_id, &lease).await {
                    warn!(run_id = %run_id, error = %release, "could not release the lease");
                }
                Err(e.into())
            }
        }
    }

    /// Adds a finished run to its owners' cost rollups, from what the store holds.
    async fn roll_up(&self, run_id: &RunId) -> Result<(), RunnerError> {
        let Some(run) = self.store.get_run(run_id).await? else { return Ok(()) };
        let steps = self.store.get_steps(run_id).await?;
        let recorded = self.analytics.record_run(&run, &steps).await?;
        info!(run_id = %run_id, added = recorded.added, already = recorded.already, cost_pico = run.totals.cost.pico(), "run rolled up");
        Ok(())
    }
}

fn ulid_suffix() -> String {
    chainrun_core::ids::RunId::new().to_string()
}
