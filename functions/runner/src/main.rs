//! Wires the runner function: telemetry, config, AWS clients, then serve.

use chainrun_core::aws::{
    BedrockBatch, BedrockModel, DynamoAnalytics, DynamoDailySpend, DynamoProgress, DynamoQuota, DynamoResponses, DynamoStore, DynamoWorkflows,
    LambdaDispatcher, RunnerEvent, S3Blobs, ScheduleTarget, SchedulerTimers, bedrock_client, bedrock_control_client, dynamodb_client, lambda_client,
    s3_client, scheduler_client, sdk_config,
};
use chainrun_core::config::ProcessEnv;
use chainrun_core::durability::SystemClock;
use chainrun_core::engine::{Engine, EngineConfig};
use chainrun_core::telemetry::logs::{self, LogConfig};
use chainrun_core::telemetry::metrics::Emf;
use chainrun_core::telemetry::spans;
use chainrun_runner::{Runner, RunnerConfig, RunnerError};
use lambda_runtime::{LambdaEvent, service_fn};
use std::sync::Arc;
use tracing::Instrument;

// One thread: a runner at 512 MB gets a fraction of a vCPU, and its steps mostly wait on
// Bedrock. A multi-thread runtime would only add cross-thread wake-ups to every step
// (the scheduler benchmark measured about twice the per-step overhead with it).
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    logs::init(&LogConfig::from_source(&ProcessEnv)?)?;
    let config = RunnerConfig::from_source(&ProcessEnv)?;
    let sdk = sdk_config().await;
    let dynamodb = dynamodb_client(&sdk);
    let outputs = S3Blobs::new(s3_client(&sdk), config.core.outputs_bucket.clone());
    let store = Arc::new(
        DynamoStore::new(dynamodb.clone(), config.core.tables.clone())
            .with_blobs(outputs.clone())
            .with_queued_grace(config.core.durability.queued_grace),
    );
    let progress =
        Arc::new(DynamoProgress::new(dynamodb.clone(), config.core.tables.clone(), config.core.retention_days).with_blobs(outputs.clone()));
    let analytics = Arc::new(DynamoAnalytics::new(dynamodb.clone(), config.core.tables.clone()));
    let workflows = Arc::new(DynamoWorkflows::new(dynamodb.clone(), config.core.tables.clone()));
    let quota = Arc::new(DynamoQuota::new(dynamodb.clone(), config.core.tables.clone()));
    let daily_spend = Arc::new(DynamoDailySpend::new(dynamodb.clone(), config.core.tables.clone()));
    let responses = Arc::new(DynamoResponses::new(dynamodb, config.core.tables.clone()));
    let model = Arc::new(BedrockModel::new(bedrock_client(&sdk)));
    let mut engine = Engine::new(model, store.clone(), progress, Arc::new(config.core.models.clone()), EngineConfig::default())
        .with_daily_caps(daily_spend, config.core.daily_caps.clone())
        .with_workflows(workflows)
        .with_tenant_limits(quota, Arc::new(config.core.limits.clone()))
        .with_response_cache(responses, config.response_ttl)
        // Each step settled, run ended, takeover, budget refusal and throttle wait, as an EMF line.
        .with_observer(Arc::new(Emf::stdout()));
    if let Some(d) = &config.deadlines {
        let target = ScheduleTarget { group: d.group.clone(), function_arn: d.target_arn.clone(), role_arn: d.role_arn.clone() };
        engine = engine.with_timers(Arc::new(SchedulerTimers::new(scheduler_client(&sdk), target)));
    }
    if let Some(b) = &config.batch {
        let jobs = BedrockBatch::new(bedrock_control_client(&sdk), s3_client(&sdk), config.core.outputs_bucket.clone(), b.role_arn.clone());
        engine = engine.with_batch(Arc::new(jobs), b.poll_every, b.timeout_hours);
    }
    let dispatcher = Arc::new(LambdaDispatcher::new(lambda_client(&sdk), config.self_function.clone()));
    let runner = Arc::new(Runner { store, engine, dispatcher, analytics, durability: config.core.durability, clock: Arc::new(SystemClock) });
    let margin = config.deadline_margin;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<RunnerEvent>| {
        let runner = runner.clone();
        // Every line printed for the invocation carries its run id.
        let span = spans::invocation(&event.payload.run_id, event.payload.cause);
        async move {
            let deadline = chrono::DateTime::from_timestamp_millis(event.context.deadline as i64).unwrap_or_else(chrono::Utc::now);
            let handled = runner.handle(event.payload, &event.context.request_id, deadline, margin).await?;
            tracing::info!(?handled, "invocation done");
            Ok::<_, RunnerError>(format!("{handled:?}"))
        }
        .instrument(span)
    }))
    .await
}
