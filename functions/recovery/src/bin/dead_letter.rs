//! Wires the dead-letter consumer: telemetry, config, AWS clients, then serve SQS batches.

use aws_lambda_events::event::sqs::SqsEvent;
use chainrun_core::aws::{
    DynamoDailySpend, DynamoProgress, DynamoQuota, DynamoStore, LambdaDispatcher, S3Blobs, dynamodb_client, lambda_client, s3_client, sdk_config,
};
use chainrun_core::config::{CoreConfig, ProcessEnv, Source};
use chainrun_core::durability::SystemClock;
use chainrun_core::engine::Tenancy;
use chainrun_core::engine::end::Ender;
use chainrun_core::telemetry::logs::{self, LogConfig};
use chainrun_core::telemetry::metrics::Emf;
use chainrun_recovery::DeadLetters;
use lambda_runtime::{LambdaEvent, service_fn};
use std::convert::Infallible;
use std::sync::Arc;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    let env = ProcessEnv;
    logs::init(&LogConfig::from_source(&env)?)?;
    let core = CoreConfig::from_source(&env)?;
    let runner_function = env.required("CHAINRUN_RUNNER_FUNCTION")?;
    let sdk = sdk_config().await;
    let dynamodb = dynamodb_client(&sdk);
    let outputs = S3Blobs::new(s3_client(&sdk), core.outputs_bucket.clone());
    let store =
        Arc::new(DynamoStore::new(dynamodb.clone(), core.tables.clone()).with_blobs(outputs.clone()).with_queued_grace(core.durability.queued_grace));
    let sink = Arc::new(DynamoProgress::new(dynamodb.clone(), core.tables.clone(), core.retention_days).with_blobs(outputs.clone()));
    // A run ended here settles the daily-cap holds its dead runners left.
    let daily = Arc::new(DynamoDailySpend::new(dynamodb.clone(), core.tables.clone()));
    // …and gives back its tenant's concurrency slot.
    let quota = Arc::new(DynamoQuota::new(dynamodb, core.tables.clone()));
    let tenancy = Some(Tenancy { quota, limits: Arc::new(core.limits.clone()) });
    // The runs it ends are counted like the runner's (`Runs`, `RunCostPicoUsd`, …).
    let observer = Some(Arc::new(Emf::stdout()) as _);
    let ender = Ender {
        store: store.clone(),
        sink,
        models: Arc::new(core.models.clone()),
        limits: Default::default(),
        daily: Some(daily),
        tenancy,
        observer,
        // A batch job of a run ended here is left to finish or expire (its worst case stays
        // counted): this function has no Bedrock grants.
        batch: None,
    };
    let dispatcher = Arc::new(LambdaDispatcher::new(lambda_client(&sdk), runner_function));
    let consumer = Arc::new(DeadLetters { store, dispatcher, ender, durability: core.durability, clock: Arc::new(SystemClock) });
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| {
        let consumer = consumer.clone();
        async move { Ok::<_, Infallible>(consumer.handle(event.payload).await) }
    }))
    .await
}
