//! Prints every metric chainrun publishes (name, unit, dimensions), from the one list the
//! code builds its metric lines from. The template's alarms and dashboard are checked
//! against the output (tests/infra/test_template.py).
//! `cargo run -q -p chainrun-core --no-default-features --example metrics_catalog > schemas/metrics.json`

fn main() {
    print!("{}", chainrun_core::telemetry::catalog::catalog_json());
}
