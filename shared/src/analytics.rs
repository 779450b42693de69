//! Cost analytics: what one finished run adds to its workflow's daily rollup, and the
//! sums, averages and rates read back from rollups.
//!
//! Why rollups: analytics must not scan the runs table. When a run ends, the runner adds
//! its counts and sums to one row per owner, per workflow, per UTC day (the day the run
//! finished) with DynamoDB's atomic `ADD`; `GET /analytics/costs` then reads a handful of
//! rows. Rows hold sums only, never averages, so adding is commutative and exact; the
//! averages are computed when read.
//!
//! Exactness: money is [`Usd`] (integer pico-dollars) and latency integer milliseconds.
//! Averages are integer division rounded down — the error is under one pico-dollar or one
//! millisecond — and the sums they come from are reported next to them. A failure rate is
//! a decimal string with four places, rounded down.

use crate::ids::{RunId, StepId};
use crate::money::Usd;
use crate::run::{RunRecord, RunStatus, StepRecord, StepStatus};
use chrono::NaiveDate;
use std::collections::BTreeMap;

/// How long rollup rows live (DynamoDB TTL), counted from their day. Longer than any
/// period the API reports on, so a year-on-year comparison stays possible.
pub const ROLLUP_RETENTION_DAYS: u32 = 400;

/// Counts and sums over a set of executions (of runs, or of one step).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CostSums {
    pub runs: u64,
    pub failures: u64,
    pub cost: Usd,
    pub latency_ms: u64,
    /// Answers reused from the response cache (`cache: "response"`), which cost nothing: a
    /// step answered so counts one, a map one per item answered so.
    pub cached: u64,
}

impl CostSums {
    pub fn add(&mut self, other: &CostSums) {
        self.runs = self.runs.saturating_add(other.runs);
        self.failures = self.failures.saturating_add(other.failures);
        self.cost = self.cost.saturating_add(other.cost);
        self.latency_ms = self.latency_ms.saturating_add(other.latency_ms);
        self.cached = self.cached.saturating_add(other.cached);
    }

    /// Mean cost, rounded down to the pico-dollar (zero without runs).
    pub fn avg_cost(&self) -> Usd {
        Usd::from_pico(self.cost.pico().checked_div(self.runs).unwrap_or(0))
    }

    /// Mean latency in milliseconds, rounded down (zero without runs).
    pub fn avg_latency_ms(&self) -> u64 {
        self.latency_ms.checked_div(self.runs).unwrap_or(0)
    }

    /// `failures / runs` as a decimal with four places, rounded down: `"0.3333"`,
    /// `"1.0000"`; `"0.0000"` without runs.
    pub fn failure_rate(&self) -> String {
        let basis_points = u128::from(self.failures.min(self.runs)) * 10_000 / u128::from(self.runs.max(1));
        format!("{}.{:04}", basis_points / 10_000, basis_points % 10_000)
    }
}

/// What one step execution adds to its step's sums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRollup {
    pub step_id: StepId,
    pub sums: CostSums,
}

/// What one finished run adds to its workflow's rollup for `day`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRollup {
    pub run_id: RunId,
    /// The run's revision it rolls up: each revision adds what it spent, once.
    pub revision: u32,
    pub workflow: String,
    /// The UTC day the run finished.
    pub day: NaiveDate,
    /// `runs = 1`; `failures = 1` when the run failed; cost = the run's total cost;
    /// latency = wall clock from start to finish.
    pub run: CostSums,
    /// One entry per step that executed (at least one attempt), in step-id order.
    pub steps: Vec<StepRollup>,
}

impl RunRollup {
    /// The rollup of a finished run; `None` while the run has not ended.
    ///
    /// Steps count when they executed (`attempts > 0` and settled), which is exactly what
    /// the run's totals are charged from, so per-step costs add up to the run's cost, or
    /// when the response cache answered them (no attempt, no cost, counted in `cached`).
    /// Skipped and cancelled steps never ran and are left out of their step's averages.
    ///
    /// A later revision of the run (see [`crate::revision`]) adds only what it ran and
    /// spent, and counts no new run: a workflow's cost per run includes its revisions.
    pub fn of(run: &RunRecord, steps: &[StepRecord]) -> Option<RunRollup> {
        if !run.status.is_terminal() {
            return None;
        }
        let finished = run.finished_at.unwrap_or(run.created_at);
        // A revision's wall clock starts when it was asked for.
        let started = run.revisions.last().map(|r| r.at).or(run.started_at).unwrap_or(run.created_at);
        let latency_ms = u64::try_from((finished - started).num_milliseconds()).unwrap_or(0);
        let mut by_step: BTreeMap<StepId, CostSums> = BTreeMap::new();
        for s in steps.iter().filter(|s| s.status.is_settled() && s.revision == run.revision) {
            let cached = cached_answers(s);
            if s.attempts == 0 && cached == 0 {
                continue;
            }
            by_step.entry(s.step_id.clone()).or_default().add(&CostSums {
                runs: 1,
                failures: u64::from(s.status == StepStatus::Failed),
                cost: s.cost,
                latency_ms: s.latency_ms,
                cached,
            });
        }
        let first = run.revision == 0;
        let cost = run.totals.cost.saturating_sub(run.spent_before(run.revision).cost);
        Some(RunRollup {
            run_id: run.id.clone(),
            revision: run.revision,
            workflow: run.workflow.to_string(),
            day: finished.date_naive(),
            run: CostSums {
                runs: u64::from(first),
                failures: u64::from(first && run.status == RunStatus::Failed),
                cost,
                latency_ms,
                cached: by_step.values().map(|s| s.cached).sum(),
            },
            steps: by_step.into_iter().map(|(step_id, sums)| StepRollup { step_id, sums }).collect(),
        })
    }
}

/// How many of a step's answers the response cache gave: its own (`response_cache: "hit"`),
/// or a map's items (`cached`), as its checkpoint's detail records them.
fn cached_answers(step: &StepRecord) -> u64 {
    let Some(detail) = &step.detail else { return 0 };
    match (detail.get("response_cache").and_then(|h| h.as_str()), detail.get("cached").and_then(|n| n.as_u64())) {
        (Some("hit"), _) => 1,
        (_, Some(items)) => items,
        _ => 0,
    }
}

/// One workflow's sums over a period, overall and per step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkflowCosts {
    pub workflow: String,
    pub totals: CostSums,
    pub steps: BTreeMap<StepId, CostSums>,
}

impl WorkflowCosts {
    pub fn new(workflow: impl Into<String>) -> Self {
        Self { workflow: workflow.into(), ..Self::default() }
    }

    pub fn add_run(&mut self, rollup: &RunRollup) {
        self.totals.add(&rollup.run);
        for step in &rollup.steps {
            self.steps.entry(step.step_id.clone()).or_default().add(&step.sums);
        }
    }

    pub fn merge(&mut self, other: &WorkflowCosts) {
        self.totals.add(&other.totals);
        for (id, sums) in &other.steps {
            self.steps.entry(id.clone()).or_default().add(sums);
        }
    }

    /// Steps, most expensive on average first (ties by step id).
    pub fn steps_by_avg_cost(&self) -> Vec<(&StepId, &CostSums)> {
        let mut steps: Vec<_> = self.steps.iter().collect();
        steps.sort_by(|(a_id, a), (b_id, b)| b.avg_cost().cmp(&a.avg_cost()).then_with(|| a_id.cmp(b_id)));
        steps
    }
}

/// Merges rows (of several days, or several parts of one day) into one entry per
/// workflow, most expensive first (ties by name).
pub fn merge_by_workflow(rows: impl IntoIterator<Item = WorkflowCosts>) -> Vec<WorkflowCosts> {
    let mut merged: BTreeMap<String, WorkflowCosts> = BTreeMap::new();
    for row in rows {
        merged.entry(row.workflow.clone()).or_insert_with(|| WorkflowCosts::new(row.workflow.clone())).merge(&row);
    }
    let mut out: Vec<WorkflowCosts> = merged.into_values().collect();
    out.sort_by(|a, b| b.totals.cost.cmp(&a.totals.cost).then_with(|| a.workflow.cmp(&b.workflow)));
    out
}

/// One workflow's sums on one UTC day (the day its runs finished).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayCosts {
    pub day: NaiveDate,
    pub costs: WorkflowCosts,
}

/// Merges rows into one entry per day and workflow: by day, oldest first, and within a
/// day most expensive first (ties by name).
pub fn merge_by_day(rows: impl IntoIterator<Item = DayCosts>) -> Vec<DayCosts> {
    let mut days: BTreeMap<NaiveDate, Vec<WorkflowCosts>> = BTreeMap::new();
    for row in rows {
        days.entry(row.day).or_default().push(row.costs);
    }
    days.into_iter().flat_map(|(day, rows)| merge_by_workflow(rows).into_iter().map(move |costs| DayCosts { day, costs })).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Principal;
    use crate::run::ErrorInfo;
    use chrono::{TimeZone, Utc};
    use serde_json::json;

    fn sums(runs: u64, failures: u64, pico: u64, latency_ms: u64) -> CostSums {
        CostSums { runs, failures, cost: Usd::from_pico(pico), latency_ms, cached: 0 }
    }

    fn step(id: &str, status: StepStatus, attempts: u32, pico: u64, latency_ms: u64) -> StepRecord {
        let mut s = StepRecord::settled(StepId::parse(id).unwrap(), status, None, Utc::now());
        s.attempts = attempts;
        s.cost = Usd::from_pico(pico);
        s.latency_ms = latency_ms;
        s
    }

    fn finished_run(status: RunStatus, pico: u64) -> RunRecord {
        let created = Utc.with_ymd_and_hms(2025, 3, 1, 23, 59, 59).unwrap();
        let mut run =
            RunRecord::new("wf".parse().unwrap(), json!({}), json!({}), "alice".parse().unwrap(), vec![Principal::User("alice".into())], created);
        run.status = status;
        run.started_at = Some(created + chrono::Duration::milliseconds(250));
        run.finished_at = Some(created + chrono::Duration::milliseconds(1_750));
        run.totals.cost = Usd::from_pico(pico);
        if status == RunStatus::Failed {
            run.error = Some(ErrorInfo { code: "STEP_FAILED".into(), message: "b failed".into(), retryable: false });
        }
        run
    }

    #[test]
    fn averages_round_down_and_say_so_by_keeping_the_sums() {
        let s = sums(3, 1, 10, 1_000);
        assert_eq!(s.avg_cost(), Usd::from_pico(3), "10 / 3 rounds down");
        assert_eq!(s.avg_latency_ms(), 333);
        assert_eq!(s.failure_rate(), "0.3333");
        assert_eq!(sums(2, 2, 0, 0).failure_rate(), "1.0000");
        assert_eq!(sums(8, 1, 0, 0).failure_rate(), "0.1250");
        let none = CostSums::default();
        assert_eq!((none.avg_cost(), none.avg_latency_ms(), none.failure_rate()), (Usd::ZERO, 0, "0.0000".to_owned()));
    }

    #[test]
    fn a_finished_run_rolls_up_into_the_day_it_finished_with_only_the_steps_that_ran() {
        let run = finished_run(RunStatus::Failed, 700);
        let steps = [
            step("a", StepStatus::Completed, 2, 500, 40),
            step("b", StepStatus::Failed, 1, 200, 60),
            step("c", StepStatus::Skipped, 0, 0, 0),
            step("d", StepStatus::Cancelled, 0, 0, 0),
        ];
        let rollup = RunRollup::of(&run, &steps).unwrap();
        assert_eq!(rollup.day, NaiveDate::from_ymd_opt(2025, 3, 2).unwrap(), "finished after midnight UTC");
        assert_eq!(rollup.run, sums(1, 1, 700, 1_500));
        let ids: Vec<&str> = rollup.steps.iter().map(|s| s.step_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(rollup.steps[1].sums, sums(1, 1, 200, 60));
        let step_cost: u64 = rollup.steps.iter().map(|s| s.sums.cost.pico()).sum();
        assert_eq!(step_cost, run.totals.cost.pico(), "per-step costs add up to the run's");
    }

    #[test]
    fn an_unfinished_run_has_no_rollup() {
        let mut run = finished_run(RunStatus::Completed, 1);
        run.status = RunStatus::Running;
        assert_eq!(RunRollup::of(&run, &[]), None);
    }

    #[test]
    fn merging_sums_per_workflow_and_step_and_orders_by_cost() {
        let mut cheap = WorkflowCosts::new("cheap");
        cheap.add_run(&RunRollup::of(&finished_run(RunStatus::Completed, 10), &[step("x", StepStatus::Completed, 1, 10, 5)]).unwrap());
        let mut dear = WorkflowCosts::new("dear");
        dear.add_run(
            &RunRollup::of(
                &finished_run(RunStatus::Completed, 90),
                &[step("low", StepStatus::Completed, 1, 30, 5), step("high", StepStatus::Completed, 1, 60, 7)],
            )
            .unwrap(),
        );
        let merged = merge_by_workflow([cheap.clone(), dear.clone(), cheap]);
        assert_eq!(merged.iter().map(|w| w.workflow.as_str()).collect::<Vec<_>>(), ["dear", "cheap"]);
        assert_eq!(merged[1].totals, sums(2, 0, 20, 3_000));
        assert_eq!(merged[1].steps[&StepId::parse("x").unwrap()], sums(2, 0, 20, 10));
        let order: Vec<&str> = merged[0].steps_by_avg_cost().iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(order, ["high", "low"]);
    }
}
