//! Prints the progress event's JSON Schema, generated from the Rust types.
//! `cargo run -q -p chainrun-core --no-default-features --example event_schema > schemas/event.schema.json`

fn main() {
    println!("{}", chainrun_core::wire::events::schema_json());
}
