//! `make cost-check` as part of `make test`: the same 1,000 seeded random budgeted runs
//! (`shared/examples/cost_check.rs`), none over its budget and each bracketed by the
//! estimate made before it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

#[path = "../examples/cost_check.rs"]
#[allow(dead_code)] // the example's `main`
mod cost_check;

#[test]
fn a_thousand_random_budgeted_runs_never_overrun_and_the_estimate_brackets_each() {
    let report = cost_check::check(1000);
    assert_eq!(report.runs, 1000);
    assert_eq!(report.overruns, 0, "{report:?}");
    assert_eq!(report.bracketed, report.runs, "{report:?}");
    // The cases reach what the claims are about: budgets that stop runs, a nonzero `min`,
    // prompts bounded only by the context window, maps over a step's list.
    assert!(report.budget_stopped > 50 && report.with_min > 50 && report.by_window > 50 && report.maps_over_steps > 20, "{report:?}");
    // And the cost levers: calls written to and read from the prompt cache, calls in a tier.
    assert!(report.cached_calls > 100 && report.tiered_calls > 100, "{report:?}");
    // And batch jobs, a map's items answered at the batch price.
    assert!(report.batch_jobs > 20 && report.batch_records > 2000, "{report:?}");
}
