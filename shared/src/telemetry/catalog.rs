//! Every metric chainrun publishes: its name, unit and the dimension sets it is published
//! under, grouped by the document that carries it. The one place metric names live: the
//! documents are built from it ([`super::metrics`]), `schemas/metrics.json` is generated
//! from it (`cargo run -q -p chainrun-core --no-default-features --example metrics_catalog`),
//! and the template's alarms and dashboard are checked against that file.
//!
//! Dimensions are few and bounded (a workflow's name, its step ids, a run's status); a
//! run id is unbounded, so it travels as a property of the document (searchable in Logs
//! Insights) and is never a dimension.

use serde::Serialize;

/// The CloudWatch namespace of every chainrun metric.
pub const NAMESPACE: &str = "chainrun";

/// A metric's CloudWatch unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Unit {
    Milliseconds,
    Count,
    /// A plain number: money in pico-dollars (no CloudWatch unit fits).
    None,
}

macro_rules! metrics {
    ($($(#[doc = $about:literal])+ $name:ident: $unit:ident,)*) => {
        /// A metric chainrun publishes.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Metric { $($(#[doc = $about])+ $name,)* }

        impl Metric {
            pub const ALL: &'static [Metric] = &[$(Metric::$name),*];

            /// The name CloudWatch knows it by.
            pub fn name(self) -> &'static str {
                match self { $(Metric::$name => stringify!($name),)* }
            }

            pub fn unit(self) -> Unit {
                match self { $(Metric::$name => Unit::$unit,)* }
            }

            /// What it measures.
            pub fn about(self) -> &'static str {
                match self { $(Metric::$name => concat!($($about),+).trim_ascii(),)* }
            }
        }
    };
}

metrics! {
    /// Wall-clock time of a settled step, its retries' backoff included.
    StepLatency: Milliseconds,
    /// Input tokens a settled step's model calls were charged (a map's items summed).
    StepInputTokens: Count,
    /// Output tokens a settled step's model calls were charged.
    StepOutputTokens: Count,
    /// What a settled step's model calls cost, in pico-dollars (exact: 10^12 per dollar).
    StepCostPicoUsd: None,
    /// Attempts a settled step made (a map: its items' most).
    StepAttempts: Count,
    /// 1 for a step that settled failed, 0 for one that completed.
    StepFailures: Count,
    /// Time from the run's start (or its revision's) to its end.
    RunLatency: Milliseconds,
    /// Input tokens an ended run was charged.
    RunInputTokens: Count,
    /// Output tokens an ended run was charged.
    RunOutputTokens: Count,
    /// What an ended run cost, in pico-dollars.
    RunCostPicoUsd: None,
    /// Model calls an ended run was charged for.
    RunModelCalls: Count,
    /// Steps an ended run's workflow has.
    RunSteps: Count,
    /// Takeovers an ended run had (runners that stopped renewing their lease).
    RunTakeovers: Count,
    /// 1 per ended run, by its status (COMPLETED, FAILED, CANCELLED).
    Runs: Count,
    /// 1 per takeover of a run from a runner that stopped renewing its lease.
    Takeovers: Count,
    /// 1 per model call a budget refused (the run's budget or its caller's daily cap).
    BudgetRefusals: Count,
    /// 1 per model call that waited for its tenant's token allowance.
    ThrottleWaits: Count,
    /// How long such a call waited.
    ThrottleWaitTime: Milliseconds,
    /// Runs a sweep found past their bound (lease expired, or queued past the grace); 0 when none.
    StuckRuns: Count,
    /// Runs a sweep handed to the runner (stuck runs and waiting runs whose deadline came).
    SweptRuns: Count,
    /// Runs a sweep could not hand over (they stay due).
    SweepFailures: Count,
}

/// One metric directive: metrics published together, under the same dimension sets.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Directive {
    /// When a document with it is printed.
    pub emitted: &'static str,
    /// Which function prints it.
    pub by: &'static str,
    /// Each set is one CloudWatch metric per metric name; `[]` aggregates over everything.
    pub dimensions: &'static [&'static [&'static str]],
    #[serde(serialize_with = "metric_entries")]
    pub metrics: &'static [Metric],
}

/// A settled step (`STEP_COMPLETED`, `STEP_FAILED`).
pub const STEP: Directive = Directive {
    emitted: "a step settled",
    by: "runner",
    dimensions: &[&["Workflow"], &["Workflow", "Step"]],
    metrics: &[
        Metric::StepLatency,
        Metric::StepInputTokens,
        Metric::StepOutputTokens,
        Metric::StepCostPicoUsd,
        Metric::StepAttempts,
        Metric::StepFailures,
    ],
};

/// An ended run (`RUN_COMPLETED`, `RUN_FAILED`, `RUN_CANCELLED`): its totals…
pub const RUN: Directive = Directive {
    emitted: "a run ended",
    by: "runner, dead-letter",
    dimensions: &[&["Workflow"], &[]],
    metrics: &[
        Metric::RunLatency,
        Metric::RunInputTokens,
        Metric::RunOutputTokens,
        Metric::RunCostPicoUsd,
        Metric::RunModelCalls,
        Metric::RunSteps,
        Metric::RunTakeovers,
    ],
};

/// …and its count by status (in the same document).
pub const RUN_STATUS: Directive =
    Directive { emitted: "a run ended", by: "runner, dead-letter", dimensions: &[&["Status"], &["Workflow", "Status"]], metrics: &[Metric::Runs] };

/// A runner took a run over (`RUN_RESUMED` with a takeover).
pub const TAKEOVER: Directive =
    Directive { emitted: "a run was taken over", by: "runner", dimensions: &[&["Workflow"], &[]], metrics: &[Metric::Takeovers] };

/// A budget refused a model call.
pub const BUDGET_REFUSAL: Directive =
    Directive { emitted: "a budget refused a model call", by: "runner", dimensions: &[&["Workflow"], &[]], metrics: &[Metric::BudgetRefusals] };

/// A model call waited for its tenant's token allowance.
pub const THROTTLE_WAIT: Directive = Directive {
    emitted: "a model call waited for its tenant's token allowance",
    by: "runner",
    dimensions: &[&["Workflow"], &[]],
    metrics: &[Metric::ThrottleWaits, Metric::ThrottleWaitTime],
};

/// Every sweep, stuck runs or none, so an alarm on it always has data.
pub const SWEEP: Directive =
    Directive { emitted: "every sweep", by: "sweeper", dimensions: &[&[]], metrics: &[Metric::StuckRuns, Metric::SweptRuns, Metric::SweepFailures] };

/// Every directive a document may carry.
pub const DIRECTIVES: &[Directive] = &[STEP, RUN, RUN_STATUS, TAKEOVER, BUDGET_REFUSAL, THROTTLE_WAIT, SWEEP];

fn metric_entries<S: serde::Serializer>(metrics: &&'static [Metric], serializer: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Entry {
        name: &'static str,
        unit: Unit,
        about: &'static str,
    }
    serializer.collect_seq(metrics.iter().map(|m| Entry { name: m.name(), unit: m.unit(), about: m.about() }))
}

/// The catalog as published in `schemas/metrics.json`.
pub fn catalog_json() -> String {
    #[derive(Serialize)]
    struct Catalog {
        namespace: &'static str,
        directives: &'static [Directive],
    }
    // Plain strings and numbers: serializing cannot fail.
    serde_json::to_string_pretty(&Catalog { namespace: NAMESPACE, directives: DIRECTIVES }).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn every_metric_is_published_by_exactly_one_directive() {
        let mut seen = BTreeSet::new();
        for directive in DIRECTIVES {
            for metric in directive.metrics {
                assert!(seen.insert(*metric), "{} is in two directives", metric.name());
            }
        }
        assert_eq!(seen, Metric::ALL.iter().copied().collect(), "a metric no directive publishes");
    }

    #[test]
    fn directives_keep_within_the_embedded_metric_format_limits() {
        for directive in DIRECTIVES {
            assert!(!directive.metrics.is_empty() && directive.metrics.len() <= 100, "{}", directive.emitted);
            for set in directive.dimensions {
                assert!(set.len() <= 30, "{}: {set:?}", directive.emitted);
                assert!(!set.contains(&"run_id"), "a run id is unbounded: never a dimension");
            }
        }
    }

    #[test]
    fn a_metrics_description_is_its_doc_comment() {
        assert_eq!(Metric::StuckRuns.about(), "Runs a sweep found past their bound (lease expired, or queued past the grace); 0 when none.");
        assert_eq!((Metric::StepCostPicoUsd.name(), Metric::StepCostPicoUsd.unit()), ("StepCostPicoUsd", Unit::None));
    }
}
