//! chainrun's runner: claims a run and executes it with the engine.
//!
//! Lambda delivers async events at least once, so [`Runner::handle`] first claims the run
//! with a conditional write. A duplicate delivery finds the run held (or finished) and
//! does nothing. The claim is a short lease that a heartbeat renews while the engine
//! works (see [`chainrun_core::durability`]); a runner that dies stops renewing, and the
//! next delivery — Lambda's retry, or the sweeper's — takes the run over and the engine
//! resumes from checkpoints. Near the deadline the engine suspends and the runner
//! dispatches the run to itself again, so a run can outlive one invocation.
//!
//! What the invocation returns decides whether Lambda retries it: an error only when a
//! retry can succeed (the lease is released first, so the retry claims at once). A
//! terminal error ends the run `RUN_FAILED` with the error and succeeds: a retry would
//! pay for its model calls again and fail the same way.
//!
//! When a run ends, the runner adds it to its owners' cost rollups ([`Analytics`]). That
//! happens after the run's end is stored, so a crash in between would lose it — except
//! that recording is exactly-once per run and owner, and a delivery that finds the run
//! already finished records it again (a no-op if it was). A failed recording fails the
//! invocation, and Lambda's retry of it completes the rollup.

use chainrun_core::codes::ErrorCode;
use chainrun_core::config::{ConfigError, CoreConfig, Source};
use chainrun_core::durability::{Clock, Durability};
use chainrun_core::engine::{Engine, EngineError, Outcome};
use chainrun_core::ids::RunId;
use chainrun_core::ports::{Analytics, AnalyticsError, Claim, DispatchError, Dispatcher, Lease, ProgressError, RunStore, StoreError};
use chainrun_core::run::{Cause, ControlKind, ControlRequest, ErrorInfo, RunRecord, RunStatus, RunnerEvent};
use chrono::{DateTime, Utc};
use lambda_runtime::Diagnostic;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub core: CoreConfig,
    /// The function's own name, for re-dispatching a suspended run (set by Lambda).
    pub self_function: String,
    pub deadline_margin: Duration,
    /// Where review deadlines' one-time schedules go: `CHAINRUN_DEADLINE_SCHEDULE_GROUP`,
    /// `CHAINRUN_DEADLINE_TARGET_ARN` (this function) and `CHAINRUN_DEADLINE_ROLE_ARN`,
    /// all or none. None: the sweeper alone fires deadlines (within its period).
    pub deadlines: Option<DeadlineSchedules>,
    /// How long a `cache: "response"` step's reply is reused: `CHAINRUN_RESPONSE_CACHE_TTL_HOURS`
    /// (default 24, at least 1).
    pub response_ttl: chrono::Duration,
    /// Batch inference for `map` steps (`mode: batch`/`auto`): `CHAINRUN_BATCH_ROLE_ARN`, the
    /// role Bedrock assumes to read and write the outputs bucket. None: maps run online.
    pub batch: Option<BatchSettings>,
}

/// How batch inference jobs are run and watched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSettings {
    /// The service role Bedrock assumes for the job (`CHAINRUN_BATCH_ROLE_ARN`).
    pub role_arn: String,
    /// How often a waiting job is asked about: `CHAINRUN_BATCH_POLL_SECONDS` (default 60,
    /// 1 to 3600).
    pub poll_every: Duration,
    /// How long Bedrock may take before it expires the job's unprocessed records:
    /// `CHAINRUN_BATCH_TIMEOUT_HOURS` (default 24, Bedrock's 24 to 168).
    pub timeout_hours: u32,
}

/// The EventBridge Scheduler settings review deadlines use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadlineSchedules {
    pub group: String,
    pub target_arn: String,
    pub role_arn: String,
}

impl RunnerConfig {
    pub fn from_source(env: &impl Source) -> Result<Self, ConfigError> {
        Ok(Self {
            core: CoreConfig::from_source(env)?,
            self_function: env.required("AWS_LAMBDA_FUNCTION_NAME")?,
            deadline_margin: Duration::from_secs(env.parsed("CHAINRUN_DEADLINE_MARGIN_SECS", 90u64)?),
            deadlines: deadline_schedules(env)?,
            response_ttl: match env.parsed("CHAINRUN_RESPONSE_CACHE_TTL_HOURS", 24i64)? {
                hours @ 1..=8760 => chrono::Duration::hours(hours),
                hours => {
                    return Err(ConfigError::Invalid {
                        name: "CHAINRUN_RESPONSE_CACHE_TTL_HOURS",
                        reason: format!("{hours} is outside 1..=8760 hours"),
                    });
                }
            },
            batch: batch_settings(env)?,
        })
    }
}

fn batch_settings(env: &impl Source) -> Result<Option<BatchSettings>, ConfigError> {
    let in_range = |name: &'static str, value: u64, range: std::ops::RangeInclusive<u64>, unit: &str| {
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(ConfigError::Invalid { name, reason: format!("{value} is outside {}..={} {unit}", range.start(), range.end()) })
        }
    };
    // Checked even without a role, so a typo is caught before batch inference is turned on.
    let poll = in_range("CHAINRUN_BATCH_POLL_SECONDS", env.parsed("CHAINRUN_BATCH_POLL_SECONDS", 60u64)?, 1..=3600, "seconds")?;
    let hours = in_range("CHAINRUN_BATCH_TIMEOUT_HOURS", env.parsed("CHAINRUN_BATCH_TIMEOUT_HOURS", 24u64)?, 24..=168, "hours")?;
    let Some(role_arn) = env.get("CHAINRUN_BATCH_ROLE_ARN").map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()) else { return Ok(None) };
    if !(role_arn.starts_with("arn:") && role_arn.contains(":role/")) {
        return Err(ConfigError::Invalid {
            name: "CHAINRUN_BATCH_ROLE_ARN",
            reason: format!("{role_arn:?} is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)"),
        });
    }
    Ok(Some(BatchSettings { role_arn, poll_every: Duration::from_secs(poll), timeout_hours: u32::try_from(hours).unwrap_or(24) }))
}

fn deadline_schedules(env: &impl Source) -> Result<Option<DeadlineSchedules>, ConfigError> {
    let get = |name: &str| env.get(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    let names = ["CHAINRUN_DEADLINE_SCHEDULE_GROUP", "CHAINRUN_DEADLINE_TARGET_ARN", "CHAINRUN_DEADLINE_ROLE_ARN"];
    match names.map(get) {
        [Some(group), Some(target_arn), Some(role_arn)] => Ok(Some(DeadlineSchedules { group, target_arn, role_arn })),
        [None, None, None] => Ok(None),
        set => {
            let missing = names.iter().zip(&set).find(|(_, v)| v.is_none()).map_or(names[0], |(n, _)| *n);
            Err(ConfigError::Invalid { name: missing, reason: "the three CHAINRUN_DEADLINE_* settings go together: set all or none".into() })
        }
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
    /// A terminal error, and the run's failure could not be stored either.
    Abandoned,
    /// The run waits for a person (paused): it holds no runner until it is resumed.
    Waiting,
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
    pub durability: Durability,
    /// Lease times (the system clock outside tests).
    pub clock: Arc<dyn Clock>,
}

impl Runner {
    /// Handles one delivery. `deadline` is the invocation's wall-clock deadline.
    ///
    /// Returns an error only when a retry of this delivery can succeed (Lambda retries
    /// it); a terminal error ends the run `RUN_FAILED` and the delivery succeeds.
    pub async fn handle(&self, event: RunnerEvent, invocation: &str, deadline: DateTime<Utc>, margin: Duration) -> Result<Handled, RunnerError> {
        let RunnerEvent { run_id, cause, .. } = event;
        let now = self.clock.now();
        let deadline = if deadline > now {
            deadline
        } else {
            // An invocation cannot start after its own deadline; a runtime that reports one
            // (some emulators send a relative number) gets Lambda's 15-minute maximum.
            warn!(run_id = %run_id, reported = %deadline, "invocation deadline is in the past; assuming 15 minutes");
            now + chrono::Duration::minutes(15)
        };
        info!(run_id = %run_id, ?cause, remaining_ms = (deadline - now).num_milliseconds(), "delivery received");
        // A short lease, renewed while we work: a runner that dies is taken over within
        // one lease length (plus the sweeper's interval), not after its whole timeout.
        let lease = Lease { holder: format!("{invocation}/{}", ulid_suffix()), expires_at: now + self.lease_length() };
        let run = match self.store.claim(&run_id, &lease, now).await? {
            Claim::Acquired(run) => *run,
            Claim::HeldElsewhere => {
                info!(run_id = %run_id, "duplicate delivery: run is held by another runner");
                return Ok(Handled::AlreadyRunning);
            }
            Claim::Finished => {
                info!(run_id = %run_id, "duplicate delivery: run already finished");
                // The delivery may be Lambda's retry of an invocation that stopped between
                // finishing the run and announcing it, or rolling it up.
                if let Some(run) = self.store.get_run(&run_id).await?
                    && let Err(e) = self.engine.announce_end(&run).await
                {
                    if e.retryable() {
                        return Err(e.into());
                    }
                    error!(run_id = %run_id, error = %e, "could not announce the run's end");
                }
                self.roll_up(&run_id).await?;
                return Ok(Handled::AlreadyFinished);
            }
            Claim::NotFound => {
                warn!(run_id = %run_id, "no such run");
                return Ok(Handled::UnknownRun);
            }
            Claim::Waiting => {
                info!(run_id = %run_id, "the run waits for a person; nothing to run");
                return Ok(Handled::Waiting);
            }
        };
        if run.control.as_ref().is_some_and(|c| c.kind == ControlKind::Cancel) {
            // Cancelled while no runner held it (queued, or its runner gone): end it now.
            return self.end_with(run, &lease, End::Cancel).await;
        }
        if run.takeovers.len() > self.durability.max_takeovers as usize {
            let error = runner_lost(&run);
            warn!(run_id = %run_id, takeovers = run.takeovers.len(), "the run's runners keep stopping; failing it");
            return self.fail(run, &lease, error).await;
        }
        let remaining = (deadline - now).to_std().unwrap_or_default();
        // Keep at least three quarters of a short invocation for work, so a small
        // timeout (or a local emulator's) cannot make every invocation suspend at once.
        let margin = margin.min(remaining / 4);
        let deadline_instant = tokio::time::Instant::now() + remaining;
        let (heartbeat, control) = self.heartbeat(&run_id, &lease, run.control.clone());
        let engine = self.engine.clone().with_deadline_margin(margin).with_cause(cause).with_control(control).with_clock(self.clock.clone());
        let outcome = engine.execute(run.clone(), lease.clone(), Some(deadline_instant)).await;
        drop(heartbeat);
        match outcome {
            Ok(Outcome::Finished(status)) => {
                self.roll_up(&run_id).await?;
                Ok(Handled::Finished(status))
            }
            Ok(Outcome::Waiting) => Ok(Handled::Waiting),
            Ok(Outcome::Suspended) => {
                // The lease is released: if this dispatch fails, Lambda's retry of this
                // delivery (or the sweeper) continues the run.
                self.dispatcher.dispatch(&RunnerEvent::new(run_id.clone(), Cause::Continue)).await?;
                info!(run_id = %run_id, "run suspended and re-dispatched");
                Ok(Handled::Suspended)
            }
            Err(EngineError::Store(StoreError::LeaseLost(_)) | EngineError::Progress(ProgressError::Conflict { .. })) => {
                // Another runner took the run over (our lease expired); it owns the run now,
                // so this is not a failure to retry.
                warn!(run_id = %run_id, "lease lost to another runner; stopping");
                Ok(Handled::Superseded)
            }
            Err(e) if e.retryable() => {
                // Give the lease back so Lambda's retry of this event can take over at once.
                if let Err(release) = self.store.release(&run_id, &lease).await {
                    warn!(run_id = %run_id, error = %release, "could not release the lease");
                }
                Err(e.into())
            }
            Err(e) => {
                // No retry can succeed: a retry would only pay for the run's model calls again.
                warn!(run_id = %run_id, error = %e, "terminal error; failing the run");
                self.fail(run, &lease, terminal_error(&e)).await
            }
        }
    }

    fn lease_length(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.durability.lease).unwrap_or(chrono::Duration::seconds(30))
    }

    /// Renews the lease every heartbeat until dropped (or the lease is lost, which the
    /// engine's next fenced write then reports), publishing the run's control request on
    /// the returned channel as each renewal reads it: how a working run learns it was
    /// cancelled.
    fn heartbeat(&self, run_id: &RunId, lease: &Lease, control: Option<ControlRequest>) -> (Heartbeat, watch::Receiver<Option<ControlRequest>>) {
        let (store, clock, run_id, holder) = (self.store.clone(), self.clock.clone(), run_id.clone(), lease.holder.clone());
        let (every, length) = (self.durability.heartbeat, self.lease_length());
        let (tx, rx) = watch::channel(control);
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let renewed = Lease { holder: holder.clone(), expires_at: clock.now() + length };
                match store.renew(&run_id, &renewed).await {
                    Ok(request) => {
                        debug!(run_id = %run_id, expires_at = %renewed.expires_at, "lease renewed");
                        if request.is_some() && tx.borrow().is_none() {
                            info!(run_id = %run_id, ?request, "control request received");
                        }
                        tx.send_if_modified(|current| {
                            let changed = *current != request;
                            *current = request;
                            changed
                        });
                    }
                    Err(StoreError::LeaseLost(_)) => {
                        // Also how a finished or suspended run's heartbeat ends.
                        info!(run_id = %run_id, "lease no longer held; no longer renewing");
                        return;
                    }
                    // The lease outlives two failed renewals; the next tick tries again.
                    Err(e) => warn!(run_id = %run_id, error = %e, "lease renewal failed"),
                }
            }
        });
        (Heartbeat(task), rx)
    }

    /// Ends the run `RUN_FAILED` with `error`.
    async fn fail(&self, run: RunRecord, lease: &Lease, error: ErrorInfo) -> Result<Handled, RunnerError> {
        self.end_with(run, lease, End::Fail(error)).await
    }

    /// Ends the run without running it, with `end` (a failure, a cancel). A run whose end
    /// cannot be recorded either is left to expire its lease: the sweeper hands it over
    /// again, bounded by the takeover limit.
    async fn end_with(&self, run: RunRecord, lease: &Lease, end: End) -> Result<Handled, RunnerError> {
        let run_id = run.id.clone();
        let ended = match end {
            End::Fail(error) => self.engine.fail_run(run, lease, error).await,
            End::Cancel => self.engine.cancel_run(run, lease).await,
        };
        match ended {
            Ok(outcome) => {
                self.roll_up(&run_id).await?;
                let status = match outcome {
                    Outcome::Finished(status) => status,
                    Outcome::Suspended => RunStatus::Running,
                    Outcome::Waiting => RunStatus::AwaitingInput,
                };
                Ok(Handled::Finished(status))
            }
            Err(e) if e.retryable() => {
                if let Err(release) = self.store.release(&run_id, lease).await {
                    warn!(run_id = %run_id, error = %release, "could not release the lease");
                }
                Err(e.into())
            }
            Err(e) => {
                error!(run_id = %run_id, error = %e, "could not record the run's end either; leaving it to the sweeper");
                Ok(Handled::Abandoned)
            }
        }
    }

    /// Adds a finished run to its owners' cost rollups, from what the store holds.
    async fn roll_up(&self, run_id: &RunId) -> Result<(), RunnerError> {
        let Some(run) = self.store.get_run(run_id).await? else { return Ok(()) };
        // Every end the runner sees passes here (a redelivery of an ended run too): the run's
        // tenant gets its concurrency slot back. Idempotent.
        if run.status.is_terminal() {
            self.engine.release_slot(&run).await;
        }
        let steps = self.store.get_steps(run_id).await?;
        let recorded = self.analytics.record_run(&run, &steps).await?;
        info!(run_id = %run_id, added = recorded.added, already = recorded.already, cost_pico = run.totals.cost.pico(), "run rolled up");
        Ok(())
    }
}

/// How [`Runner::end_with`] ends a run it does not run.
enum End {
    Fail(ErrorInfo),
    Cancel,
}

/// The task renewing a lease; it stops when this is dropped, however the invocation's work
/// ends (a panic included), so a lease is only renewed while its holder works.
struct Heartbeat(tokio::task::JoinHandle<()>);

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `RUNNER_LOST`, with the takeover history.
fn runner_lost(run: &RunRecord) -> ErrorInfo {
    let history: Vec<String> = run.takeovers.iter().map(|t| format!("{} (lease expired {}) taken over at {}", t.from, t.expired_at, t.at)).collect();
    ErrorInfo::terminal(
        ErrorCode::RunnerLost,
        format!("the run's runner stopped without finishing it {} times: {}", run.takeovers.len(), history.join("; ")),
    )
}

/// The run's error for an infrastructure error no retry can fix.
fn terminal_error(e: &EngineError) -> ErrorInfo {
    match e {
        EngineError::Store(StoreError::TooLarge(message)) => ErrorInfo::terminal(ErrorCode::OutputTooLarge, message.clone()),
        other => ErrorInfo::terminal(ErrorCode::StoreError, other.to_string()),
    }
}

fn ulid_suffix() -> String {
    chainrun_core::ids::RunId::new().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(extra: &[(&str, &str)]) -> HashMap<String, String> {
        let base = [
            ("CHAINRUN_RUNS_TABLE", "r"),
            ("CHAINRUN_EVENTS_TABLE", "e"),
            ("CHAINRUN_PROGRESS_TABLE", "p"),
            ("CHAINRUN_WORKFLOWS_TABLE", "w"),
            ("CHAINRUN_ROLLUPS_TABLE", "u"),
            ("CHAINRUN_OUTPUTS_BUCKET", "o"),
            ("AWS_LAMBDA_FUNCTION_NAME", "runner"),
        ];
        base.iter().chain(extra).map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn deadline_schedules_are_set_all_together_or_not_at_all() {
        assert_eq!(RunnerConfig::from_source(&env(&[])).unwrap().deadlines, None);
        let all = [
            ("CHAINRUN_DEADLINE_SCHEDULE_GROUP", "g"),
            ("CHAINRUN_DEADLINE_TARGET_ARN", "arn:aws:lambda:us-east-1:1:function:runner"),
            ("CHAINRUN_DEADLINE_ROLE_ARN", "arn:aws:iam::1:role/r"),
        ];
        let set = RunnerConfig::from_source(&env(&all)).unwrap().deadlines.unwrap();
        assert_eq!((set.group.as_str(), set.role_arn.as_str()), ("g", "arn:aws:iam::1:role/r"));
        let err = RunnerConfig::from_source(&env(&all[..2])).unwrap_err().to_string();
        assert!(err.contains("CHAINRUN_DEADLINE_ROLE_ARN") && err.contains("all or none"), "{err}");
    }

    #[test]
    fn batch_inference_is_off_without_a_role_and_defaults_to_a_minute_and_a_day() {
        assert_eq!(RunnerConfig::from_source(&env(&[])).unwrap().batch, None);
        let role = ("CHAINRUN_BATCH_ROLE_ARN", "arn:aws:iam::123456789012:role/chainrun-batch");
        let batch = RunnerConfig::from_source(&env(&[role])).unwrap().batch.unwrap();
        assert_eq!(batch, BatchSettings { role_arn: role.1.into(), poll_every: Duration::from_secs(60), timeout_hours: 24 });
        let set = [role, ("CHAINRUN_BATCH_POLL_SECONDS", "5"), ("CHAINRUN_BATCH_TIMEOUT_HOURS", "168")];
        let batch = RunnerConfig::from_source(&env(&set)).unwrap().batch.unwrap();
        assert_eq!((batch.poll_every, batch.timeout_hours), (Duration::from_secs(5), 168));
    }

    #[test]
    fn bad_batch_settings_fail_the_cold_start_naming_the_variable() {
        let role = ("CHAINRUN_BATCH_ROLE_ARN", "arn:aws:iam::123456789012:role/chainrun-batch");
        for (name, value) in [
            ("CHAINRUN_BATCH_POLL_SECONDS", "0"),
            ("CHAINRUN_BATCH_POLL_SECONDS", "3601"),
            ("CHAINRUN_BATCH_POLL_SECONDS", "soon"),
            ("CHAINRUN_BATCH_TIMEOUT_HOURS", "12"),
            ("CHAINRUN_BATCH_TIMEOUT_HOURS", "169"),
            ("CHAINRUN_BATCH_TIMEOUT_HOURS", "-1"),
            ("CHAINRUN_BATCH_ROLE_ARN", "chainrun-batch"),
        ] {
            let err = RunnerConfig::from_source(&env(&[role, (name, value)])).unwrap_err().to_string();
            assert!(err.contains(name), "{name}={value}: {err}");
        }
        let err = RunnerConfig::from_source(&env(&[("CHAINRUN_BATCH_POLL_SECONDS", "0")])).unwrap_err().to_string();
        assert!(err.contains("CHAINRUN_BATCH_POLL_SECONDS"), "checked without a role too: {err}");
    }
}
