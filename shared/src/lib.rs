//! chainrun-core: the workflow model, validation, engine, pricing, ports and adapters.
//!
//! Dependencies point one way. Pure modules ([`access`], [`ids`], [`money`], [`pricing`], [`analytics`], [`budget`], [`spend`], [`estimate`], [`workflow`],
//! [`graph`], [`template`], [`output`], [`run`], [`stored`], [`templates`]) know nothing of async or AWS. The
//! [`engine`] knows only the [`ports`]. The adapters implement the ports: [`memory`] for
//! hermetic tests, and `aws` (feature `aws`) — the only code that names an `aws_sdk_*` type.
//! [`telemetry`] is what the functions print for operators: metrics from what the engine
//! reports to its observer, and (feature `aws`) the JSON log subscriber.

pub mod access;
pub mod analytics;
pub mod budget;
pub mod caching;
pub mod codes;
pub mod config;
pub mod durability;
pub mod engine;
pub mod estimate;
pub mod expr;
pub mod graph;
pub mod ids;
pub mod input;
pub mod limits;
pub mod memory;
pub mod money;
pub mod output;
pub mod ports;
pub mod pricing;
pub mod quota;
pub mod responses;
pub mod revision;
pub mod run;
pub mod shards;
pub mod spend;
pub mod stored;
pub mod telemetry;
pub mod template;
pub mod templates;
pub mod wire;
pub mod workflow;

#[cfg(feature = "aws")]
pub mod aws;
