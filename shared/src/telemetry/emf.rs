//! CloudWatch embedded metric format (EMF): one JSON object per line on stdout, which
//! CloudWatch Logs turns into metrics as it ingests the function's log. No API call and no
//! permission beyond writing logs; a line that is not valid EMF is kept as a log line and
//! counted in the `AWS/Logs` namespace's `EMFValidationErrors`.
//!
//! A document is built here and nowhere else:
//!
//! ```json
//! {"_aws": {"Timestamp": 1733500000000, "CloudWatchMetrics": [{"Namespace": "chainrun",
//!   "Dimensions": [["Workflow"], ["Workflow", "Step"]],
//!   "Metrics": [{"Name": "StepLatency", "Unit": "Milliseconds"}, …]}]},
//!  "Workflow": "triage", "Step": "extract", "StepLatency": 812, …, "run_id": "01J…"}
//! ```
//!
//! The spec's limits hold by construction: the directives come from the catalog (at most
//! 100 metrics and 30 dimensions a set, checked there), dimension values are strings of
//! printable ASCII ([`dimension_value`]), and values are integers (money in pico-dollars,
//! exact in a JSON number up to 2^53, about $9,000 a document).

use super::catalog::{Directive, Metric, NAMESPACE};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use std::io::Write;

/// One EMF document.
#[derive(Debug, Clone)]
pub struct Document {
    timestamp_ms: i64,
    directives: Vec<&'static Directive>,
    members: Map<String, Value>,
}

impl Document {
    /// A document for metrics observed at `at`.
    pub fn new(at: DateTime<Utc>) -> Self {
        Self { timestamp_ms: at.timestamp_millis(), directives: Vec::new(), members: Map::new() }
    }

    /// Publishes `directive`'s metrics under its dimension sets: the document must carry a
    /// value for each of them, and a value for each dimension its sets name.
    pub fn directive(mut self, directive: &'static Directive) -> Self {
        self.directives.push(directive);
        self
    }

    pub fn dimension(mut self, name: &'static str, value: &str) -> Self {
        self.members.insert(name.to_owned(), Value::String(dimension_value(value)));
        self
    }

    pub fn value(mut self, metric: Metric, value: u64) -> Self {
        self.members.insert(metric.name().to_owned(), Value::from(value));
        self
    }

    /// A member that is not a metric: searchable in Logs Insights, not aggregated.
    pub fn property(mut self, name: &'static str, value: impl Into<Value>) -> Self {
        self.members.insert(name.to_owned(), value.into());
        self
    }

    /// What the document lacks to be valid EMF: a metric without a number, a dimension
    /// without a string. Empty for every document chainrun prints (its tests check).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for directive in &self.directives {
            for metric in directive.metrics {
                if !self.members.get(metric.name()).is_some_and(Value::is_number) {
                    problems.push(format!("metric {} has no numeric value", metric.name()));
                }
            }
            for name in directive.dimensions.iter().flat_map(|set| set.iter()) {
                if !self.members.get(*name).is_some_and(Value::is_string) {
                    problems.push(format!("dimension {name} has no string value"));
                }
            }
        }
        problems
    }

    pub fn to_json(&self) -> Value {
        let directives: Vec<Value> = self
            .directives
            .iter()
            .map(|d| {
                let metrics: Vec<Value> = d.metrics.iter().map(|m| json!({ "Name": m.name(), "Unit": m.unit() })).collect();
                json!({ "Namespace": NAMESPACE, "Dimensions": d.dimensions, "Metrics": metrics })
            })
            .collect();
        let mut document = self.members.clone();
        document.insert("_aws".to_owned(), json!({ "Timestamp": self.timestamp_ms, "CloudWatchMetrics": directives }));
        Value::Object(document)
    }

    /// The document as one line (no newline).
    pub fn line(&self) -> String {
        self.to_json().to_string()
    }
}

/// A dimension value CloudWatch accepts: printable ASCII (anything else, and `%`, written
/// as `%XX` per UTF-8 byte, so distinct names stay distinct), at least one character that
/// is not a space, at most 1024 characters.
pub fn dimension_value(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for byte in raw.bytes() {
        match byte {
            b'%' => out.push_str("%25"),
            0x20..=0x7e => out.push(byte as char),
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    if out.trim().is_empty() {
        return "(blank)".to_owned();
    }
    // Everything is ASCII now, so any byte index is a char boundary.
    out.truncate(1024);
    out
}

/// Where documents go, one line each.
pub trait MetricLines: Send + Sync {
    fn write_line(&self, line: &str);
}

/// The process's stdout, which Lambda sends to CloudWatch Logs. Each line is written
/// under stdout's lock, so it never interleaves with a log line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stdout;

impl MetricLines for Stdout {
    fn write_line(&self, line: &str) {
        let mut out = std::io::stdout().lock();
        // Nothing to do about a closed stdout: the metric is lost, as its log line would be.
        let _ = writeln!(out, "{line}").and_then(|()| out.flush());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::catalog::{STEP, SWEEP};

    #[test]
    fn a_document_carries_its_directives_under_aws_and_its_members_at_the_top() {
        let at = DateTime::from_timestamp_millis(1_733_500_000_123).unwrap();
        let doc = Document::new(at).directive(&SWEEP).value(Metric::StuckRuns, 2).value(Metric::SweptRuns, 3).value(Metric::SweepFailures, 0);
        let json = doc.property("stuck_run_ids", vec!["a", "b"]).to_json();
        assert_eq!(json["_aws"]["Timestamp"], 1_733_500_000_123i64);
        let directive = &json["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "chainrun");
        assert_eq!(directive["Dimensions"], json!([[]]));
        assert_eq!(directive["Metrics"][0], json!({ "Name": "StuckRuns", "Unit": "Count" }));
        assert_eq!((json["StuckRuns"].as_u64(), json["stuck_run_ids"][1].as_str()), (Some(2), Some("b")));
    }

    #[test]
    fn a_document_missing_a_value_or_a_dimension_says_which() {
        let doc = Document::new(Utc::now()).directive(&STEP).dimension("Workflow", "w").value(Metric::StepLatency, 1);
        let problems = doc.problems();
        assert!(problems.contains(&"dimension Step has no string value".to_owned()), "{problems:?}");
        assert!(problems.contains(&"metric StepAttempts has no numeric value".to_owned()), "{problems:?}");
        assert!(!problems.iter().any(|p| p.contains("StepLatency") || p.contains("Workflow")), "{problems:?}");
    }

    #[test]
    fn dimension_values_are_printable_ascii_and_distinct_names_stay_distinct() {
        assert_eq!(dimension_value("feedback-triage v2"), "feedback-triage v2");
        assert_eq!(dimension_value("café"), "caf%C3%A9");
        assert_eq!(dimension_value("100%"), "100%25");
        assert_ne!(dimension_value("caf%C3%A9"), dimension_value("café"));
        assert_eq!(dimension_value("tab\there"), "tab%09here");
        assert_eq!(dimension_value("   "), "(blank)");
        assert_eq!(dimension_value(&"é".repeat(400)).len(), 1024);
    }
}
