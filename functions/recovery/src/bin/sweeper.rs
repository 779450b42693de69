//! Wires the sweeper function: telemetry, config, AWS clients, then serve scheduled invocations.

use chainrun_core::aws::{DynamoStore, LambdaDispatcher, dynamodb_client, lambda_client, sdk_config};
use chainrun_core::config::{CoreConfig, ProcessEnv, Source};
use chainrun_core::durability::SystemClock;
use chainrun_core::telemetry::logs::{self, LogConfig};
use chainrun_core::telemetry::metrics::{Emf, sweep_document};
use chainrun_recovery::{SweepError, Sweeper};
use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::Value;
use std::sync::Arc;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    let env = ProcessEnv;
    logs::init(&LogConfig::from_source(&env)?)?;
    let core = CoreConfig::from_source(&env)?;
    let runner_function = env.required("CHAINRUN_RUNNER_FUNCTION")?;
    let limit = env.parsed("CHAINRUN_SWEEP_LIMIT", 500usize)?;
    let sdk = sdk_config().await;
    let store = Arc::new(DynamoStore::new(dynamodb_client(&sdk), core.tables.clone()).with_queued_grace(core.durability.queued_grace));
    let dispatcher = Arc::new(LambdaDispatcher::new(lambda_client(&sdk), runner_function));
    let sweeper = Arc::new(Sweeper { store, dispatcher, clock: Arc::new(SystemClock), limit });
    // The schedule's payload carries nothing the sweep needs.
    lambda_runtime::run(service_fn(move |_: LambdaEvent<Value>| {
        let sweeper = sweeper.clone();
        async move {
            let swept = sweeper.sweep().await?;
            // Every sweep, stuck runs or none: the alarm on `StuckRuns` always has data.
            Emf::stdout().print(&sweep_document(&swept.stuck, swept.dispatched.len(), swept.failed.len(), chrono::Utc::now()));
            Ok::<_, SweepError>(serde_json::json!({ "dispatched": swept.dispatched.len(), "failed": swept.failed.len() }))
        }
    }))
    .await
}
