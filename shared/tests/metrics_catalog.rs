//! `schemas/metrics.json` is what the template's alarms and dashboard are checked against
//! (tests/infra/test_template.py): it must be the catalog the code publishes from.
#![allow(clippy::unwrap_used)]

use serde_json::Value;

#[test]
fn the_checked_in_metrics_catalog_matches_the_code() {
    let published: Value = serde_json::from_str(include_str!("../../schemas/metrics.json")).unwrap();
    let generated: Value = serde_json::from_str(&chainrun_core::telemetry::catalog::catalog_json()).unwrap();
    assert!(
        generated == published,
        "schemas/metrics.json is stale: run `cargo run -q -p chainrun-core --no-default-features --example metrics_catalog > schemas/metrics.json`"
    );
}
