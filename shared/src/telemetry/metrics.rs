//! What each observation publishes: pure functions from what the engine (or the sweeper)
//! saw to an EMF [`Document`], and [`Emf`], the observer that prints them.
//!
//! Values are the ones the run's checkpoints and events hold (a step's from its checkpoint,
//! a run's from the totals its end event carries), so a metric and the run's record never
//! disagree. Money is in pico-dollars, the unit chainrun counts in: a micro-dollar metric
//! would have to round (a Nova Micro call costs fractions of one).

use super::catalog::{BUDGET_REFUSAL, Metric, RUN, RUN_STATUS, STEP, SWEEP, TAKEOVER, THROTTLE_WAIT};
use super::emf::{Document, MetricLines, Stdout};
use super::{Observer, RunFacts, Seen};
use crate::ids::RunId;
use crate::run::StepStatus;
use chrono::{DateTime, Utc};

/// The document that publishes `seen`, observed at `at`, about `run`.
pub fn document(run: &RunFacts, seen: &Seen<'_>, at: DateTime<Utc>) -> Document {
    let doc =
        Document::new(at).dimension("Workflow", run.workflow.as_str()).property("run_id", run.run_id.as_str()).property("revision", run.revision);
    match *seen {
        Seen::StepSettled(step) => {
            let mut doc = doc
                .directive(&STEP)
                .dimension("Step", step.step_id.as_str())
                .value(Metric::StepLatency, step.latency_ms)
                .value(Metric::StepInputTokens, step.usage.input_tokens)
                .value(Metric::StepOutputTokens, step.usage.output_tokens)
                .value(Metric::StepCostPicoUsd, step.cost.pico())
                .value(Metric::StepAttempts, u64::from(step.attempts))
                .value(Metric::StepFailures, u64::from(step.status == StepStatus::Failed))
                .property("step_id", step.step_id.as_str())
                .property("status", step.status.as_str())
                .property("model_calls", step.calls);
            if let Some(model) = &step.model {
                doc = doc.property("model", model.as_str());
            }
            if let Some(error) = &step.error {
                doc = doc.property("error_code", error.code.as_str());
            }
            doc
        }
        Seen::RunEnded { status, totals } => {
            let latency = (run.finished_at.unwrap_or(at) - run.since).num_milliseconds().max(0) as u64;
            doc.directive(&RUN)
                .directive(&RUN_STATUS)
                .dimension("Status", status.as_str())
                .value(Metric::RunLatency, latency)
                .value(Metric::RunInputTokens, totals.input_tokens)
                .value(Metric::RunOutputTokens, totals.output_tokens)
                .value(Metric::RunCostPicoUsd, totals.cost.pico())
                .value(Metric::RunModelCalls, totals.model_calls)
                .value(Metric::RunSteps, run.steps as u64)
                .value(Metric::RunTakeovers, run.takeovers as u64)
                .value(Metric::Runs, 1)
                .property("step_latency_ms", totals.step_latency_ms)
        }
        Seen::TakenOver => doc.directive(&TAKEOVER).value(Metric::Takeovers, 1).property("takeovers", run.takeovers),
        Seen::BudgetRefused { step, limit } => {
            doc.directive(&BUDGET_REFUSAL).value(Metric::BudgetRefusals, 1).property("step_id", step.as_str()).property("limit", limit)
        }
        Seen::ThrottleWaited { step, model, waited_ms } => doc
            .directive(&THROTTLE_WAIT)
            .value(Metric::ThrottleWaits, 1)
            .value(Metric::ThrottleWaitTime, waited_ms)
            .property("step_id", step.as_str())
            .property("model", model.as_str()),
    }
}

/// The document one sweep publishes: the runs it found past their bound (`stuck`, whose ids
/// it lists), how many it handed to the runner and how many it could not.
pub fn sweep_document(stuck: &[RunId], swept: usize, failed: usize, at: DateTime<Utc>) -> Document {
    let ids: Vec<&str> = stuck.iter().map(RunId::as_str).collect();
    Document::new(at)
        .directive(&SWEEP)
        .value(Metric::StuckRuns, stuck.len() as u64)
        .value(Metric::SweptRuns, swept as u64)
        .value(Metric::SweepFailures, failed as u64)
        .property("stuck_run_ids", ids)
}

/// Prints each observation's document as one line (stdout in the functions).
#[derive(Debug, Clone)]
pub struct Emf<L = Stdout> {
    lines: L,
}

impl Emf<Stdout> {
    /// Printing to stdout, which Lambda sends to CloudWatch Logs.
    pub fn stdout() -> Self {
        Self { lines: Stdout }
    }
}

impl<L: MetricLines> Emf<L> {
    pub fn new(lines: L) -> Self {
        Self { lines }
    }

    /// Prints `document`.
    pub fn print(&self, document: &Document) {
        debug_assert!(document.problems().is_empty(), "{:?}", document.problems());
        self.lines.write_line(&document.line());
    }
}

impl<L: MetricLines> Observer for Emf<L> {
    fn observe(&self, run: &RunFacts, seen: &Seen<'_>, at: DateTime<Utc>) {
        self.print(&document(run, seen, at));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codes::ErrorCode;
    use crate::ids::{ModelId, StepId};
    use crate::money::Usd;
    use crate::pricing::Usage;
    use crate::run::{ErrorInfo, RunStatus, StepRecord, Totals};
    use serde_json::json;

    fn facts() -> RunFacts {
        RunFacts {
            run_id: RunId::new(),
            workflow: "triage".parse().unwrap(),
            revision: 0,
            since: DateTime::from_timestamp_millis(1_000_000).unwrap(),
            finished_at: None,
            steps: 3,
            takeovers: 1,
        }
    }

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_004_500).unwrap()
    }

    fn step(status: StepStatus) -> StepRecord {
        let mut record = StepRecord::settled(StepId::parse("extract").unwrap(), status, None, at());
        (record.attempts, record.latency_ms, record.calls) = (2, 812, 2);
        record.usage = Usage { input_tokens: 120, output_tokens: 45, ..Usage::default() };
        record.cost = Usd::from_pico(15_750_000);
        record.model = Some("amazon.nova-micro-v1:0".parse().unwrap());
        record
    }

    #[test]
    fn a_settled_step_publishes_its_checkpoints_numbers_by_workflow_and_step() {
        let run = facts();
        let doc = document(&run, &Seen::StepSettled(&step(StepStatus::Completed)), at());
        assert!(doc.problems().is_empty(), "{:?}", doc.problems());
        let json = doc.to_json();
        assert_eq!(json["_aws"]["CloudWatchMetrics"][0]["Dimensions"], json!([["Workflow"], ["Workflow", "Step"]]));
        assert_eq!((json["Workflow"].as_str(), json["Step"].as_str()), (Some("triage"), Some("extract")));
        let numbers: Vec<u64> = ["StepLatency", "StepInputTokens", "StepOutputTokens", "StepCostPicoUsd", "StepAttempts", "StepFailures"]
            .map(|m| json[m].as_u64().unwrap())
            .into();
        assert_eq!(numbers, [812, 120, 45, 15_750_000, 2, 0]);
        assert_eq!(json["run_id"], run.run_id.as_str());
        assert_eq!((json["status"].as_str(), json["model"].as_str()), (Some("COMPLETED"), Some("amazon.nova-micro-v1:0")));
    }

    #[test]
    fn a_failed_step_counts_one_failure_and_names_its_error_code() {
        let mut failed = step(StepStatus::Failed);
        failed.error = Some(ErrorInfo::terminal(ErrorCode::BudgetExceeded, "over"));
        let json = document(&facts(), &Seen::StepSettled(&failed), at()).to_json();
        assert_eq!((json["StepFailures"].as_u64(), json["error_code"].as_str()), (Some(1), Some("BUDGET_EXCEEDED")));
    }

    #[test]
    fn an_ended_run_publishes_its_totals_and_counts_once_by_status() {
        let totals =
            Totals { input_tokens: 300, output_tokens: 90, cost: Usd::from_pico(42), model_calls: 4, step_latency_ms: 2000, ..Totals::default() };
        let doc = document(&facts(), &Seen::RunEnded { status: RunStatus::Failed, totals: &totals }, at());
        assert!(doc.problems().is_empty(), "{:?}", doc.problems());
        let json = doc.to_json();
        let directives = json["_aws"]["CloudWatchMetrics"].as_array().unwrap();
        assert_eq!(directives[0]["Dimensions"], json!([["Workflow"], []]));
        assert_eq!(directives[1]["Dimensions"], json!([["Status"], ["Workflow", "Status"]]));
        assert_eq!(directives[1]["Metrics"], json!([{ "Name": "Runs", "Unit": "Count" }]));
        assert_eq!(json["Status"], "FAILED");
        let numbers: Vec<u64> =
            ["RunLatency", "RunInputTokens", "RunOutputTokens", "RunCostPicoUsd", "RunModelCalls", "RunSteps", "RunTakeovers", "Runs"]
                .map(|m| json[m].as_u64().unwrap())
                .into();
        assert_eq!(numbers, [4500, 300, 90, 42, 4, 3, 1, 1], "latency from the run's start to now");
    }

    #[test]
    fn a_late_announcement_of_an_end_measures_the_run_to_when_its_end_was_stored() {
        let run = RunFacts { finished_at: Some(DateTime::from_timestamp_millis(1_002_000).unwrap()), ..facts() };
        let json = document(&run, &Seen::RunEnded { status: RunStatus::Completed, totals: &Totals::default() }, at()).to_json();
        assert_eq!(json["RunLatency"], 2000);
    }

    #[test]
    fn takeovers_refusals_and_throttle_waits_each_count_one_by_workflow() {
        let (id, model) = (StepId::parse("s").unwrap(), "m".parse::<ModelId>().unwrap());
        let seen = [
            (Seen::TakenOver, "Takeovers"),
            (Seen::BudgetRefused { step: &id, limit: "max_cost_usd" }, "BudgetRefusals"),
            (Seen::ThrottleWaited { step: &id, model: &model, waited_ms: 61_000 }, "ThrottleWaits"),
        ];
        for (seen, metric) in seen {
            let doc = document(&facts(), &seen, at());
            assert!(doc.problems().is_empty(), "{metric}: {:?}", doc.problems());
            let json = doc.to_json();
            assert_eq!((json[metric].as_u64(), json["Workflow"].as_str()), (Some(1), Some("triage")), "{json}");
        }
        let json = document(&facts(), &Seen::ThrottleWaited { step: &id, model: &model, waited_ms: 61_000 }, at()).to_json();
        assert_eq!(json["ThrottleWaitTime"], 61_000);
        let json = document(&facts(), &Seen::BudgetRefused { step: &id, limit: "daily_cap" }, at()).to_json();
        assert_eq!((json["limit"].as_str(), json["step_id"].as_str()), (Some("daily_cap"), Some("s")));
    }

    #[test]
    fn a_sweep_publishes_zero_stuck_runs_when_it_finds_none() {
        let doc = sweep_document(&[], 0, 0, at());
        assert!(doc.problems().is_empty(), "{:?}", doc.problems());
        let json = doc.to_json();
        assert_eq!((json["StuckRuns"].as_u64(), json["stuck_run_ids"].as_array().map(Vec::len)), (Some(0), Some(0)));
        let stuck = [RunId::new(), RunId::new()];
        let json = sweep_document(&stuck, 3, 1, at()).to_json();
        assert_eq!((json["StuckRuns"].as_u64(), json["SweptRuns"].as_u64(), json["SweepFailures"].as_u64()), (Some(2), Some(3), Some(1)));
        assert_eq!(json["stuck_run_ids"][1], stuck[1].as_str());
    }
}
