//! EventBridge Scheduler implementation of [`Timers`]: one one-time schedule per wake-up,
//! `at(…)` in UTC, in the deployment's schedule group, invoking the runner with
//! `{ "run_id", "cause": "deadline" }` and deleting itself once it has run.
//!
//! Names are the run and the second (`run-<id>-<epoch s>`), so setting the same wake-up
//! twice (a retried invocation) finds it exists and is done. Schedules fire to the second;
//! the time is rounded up so the run is due when it arrives.

use super::{describe, transient};
use crate::ids::RunId;
use crate::ports::{TimerError, Timers};
use crate::run::{Cause, RunnerEvent};
use async_trait::async_trait;
use aws_sdk_scheduler::Client;
use aws_sdk_scheduler::types::{ActionAfterCompletion, FlexibleTimeWindow, FlexibleTimeWindowMode, RetryPolicy, Target};
use chrono::{DateTime, Utc};
use tracing::{info, instrument};

/// Where the schedules go and what they invoke.
#[derive(Debug, Clone)]
pub struct ScheduleTarget {
    /// The schedule group.
    pub group: String,
    /// The runner function's ARN.
    pub function_arn: String,
    /// The role EventBridge Scheduler assumes to invoke it.
    pub role_arn: String,
}

#[derive(Clone)]
pub struct SchedulerTimers {
    client: Client,
    target: ScheduleTarget,
}

impl SchedulerTimers {
    pub fn new(client: Client, target: ScheduleTarget) -> Self {
        Self { client, target }
    }
}

#[async_trait]
impl Timers for SchedulerTimers {
    #[instrument(skip(self), fields(group = %self.target.group))]
    async fn wake_at(&self, run: &RunId, at: DateTime<Utc>) -> Result<(), TimerError> {
        // Rounded up to the second: `at()` has no finer grain, and early is not due.
        let second = DateTime::from_timestamp(at.timestamp() + i64::from(at.timestamp_subsec_nanos() > 0), 0).unwrap_or(at);
        let name = format!("run-{run}-{}", second.timestamp());
        let event = RunnerEvent::new(run.clone(), Cause::Deadline);
        let input = serde_json::to_string(&event).map_err(|e| TimerError::Rejected(format!("the wake-up event of run {run}: {e}")))?;
        let build = |e: aws_sdk_scheduler::error::BuildError| TimerError::Rejected(format!("could not build the schedule {name}: {e}"));
        let target = Target::builder()
            .arn(&self.target.function_arn)
            .role_arn(&self.target.role_arn)
            .input(input)
            // The runner's own async retries take over once it is invoked.
            .retry_policy(RetryPolicy::builder().maximum_retry_attempts(3).maximum_event_age_in_seconds(3600).build())
            .build()
            .map_err(build)?;
        let window = FlexibleTimeWindow::builder().mode(FlexibleTimeWindowMode::Off).build().map_err(build)?;
        let result = self
            .client
            .create_schedule()
            .name(&name)
            .group_name(&self.target.group)
            .schedule_expression(format!("at({})", second.format("%Y-%m-%dT%H:%M:%S")))
            .schedule_expression_timezone("UTC")
            .flexible_time_window(window)
            .target(target)
            .action_after_completion(ActionAfterCompletion::Delete)
            .send()
            .await;
        match result {
            Ok(_) => {
                info!(run_id = %run, schedule = %name, at = %second, "wake-up scheduled");
                Ok(())
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_conflict_exception()) => Ok(()),
            Err(e) => {
                let (code, message) = describe(&e);
                let what = format!("creating schedule {name} in group {}: {} {message}", self.target.group, code.unwrap_or_default());
                Err(if transient(&e) { TimerError::Unavailable(what) } else { TimerError::Rejected(what) })
            }
        }
    }
}
