//! Prints the workflow definition's JSON Schema, generated from the Rust types.
//! `cargo run -q -p chainrun-core --example workflow_schema > schemas/workflow.schema.json`

fn main() {
    println!("{}", chainrun_core::workflow::schema_json());
}
