//! Wires the API function: telemetry, config, AWS clients, then serve.

use chainrun_api::{ApiConfig, AppState, app};
use chainrun_core::aws::{
    DynamoAnalytics, DynamoDailySpend, DynamoIdempotency, DynamoProgress, DynamoQuota, DynamoStore, DynamoTemplates, DynamoWorkflows,
    LambdaDispatcher, S3Blobs, dynamodb_client, lambda_client, s3_client, sdk_config,
};
use chainrun_core::config::ProcessEnv;
use chainrun_core::telemetry::logs::{self, LogConfig};
use chainrun_core::telemetry::spans;
use std::sync::Arc;
use tracing::Instrument;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    logs::init(&LogConfig::from_source(&ProcessEnv)?)?;
    let config = ApiConfig::from_source(&ProcessEnv)?;
    let sdk = sdk_config().await;
    let dynamodb = dynamodb_client(&sdk);
    let outputs = S3Blobs::new(s3_client(&sdk), config.core.outputs_bucket.clone());
    let progress =
        Arc::new(DynamoProgress::new(dynamodb.clone(), config.core.tables.clone(), config.core.retention_days).with_blobs(outputs.clone()));
    let store = Arc::new(
        DynamoStore::new(dynamodb.clone(), config.core.tables.clone())
            .with_blobs(outputs.clone())
            .with_queued_grace(config.core.durability.queued_grace),
    );
    let state = AppState {
        idempotency: Arc::new(DynamoIdempotency::new(dynamodb.clone(), config.core.tables.clone())),
        workflows: Arc::new(DynamoWorkflows::new(dynamodb.clone(), config.core.tables.clone())),
        templates: Arc::new(DynamoTemplates::new(dynamodb.clone(), config.core.tables.clone())),
        store: store.clone(),
        progress,
        history: store,
        analytics: Arc::new(DynamoAnalytics::new(dynamodb.clone(), config.core.tables.clone())),
        quota: Arc::new(DynamoQuota::new(dynamodb.clone(), config.core.tables.clone())),
        limits: Arc::new(config.core.limits.clone()),
        daily: Arc::new(DynamoDailySpend::new(dynamodb, config.core.tables.clone())),
        daily_caps: Arc::new(config.core.daily_caps.clone()),
        dispatcher: Arc::new(LambdaDispatcher::new(lambda_client(&sdk), config.runner_function.clone())),
        models: Arc::new(config.core.models.clone()),
        auth: config.auth.clone(),
    };
    lambda_http::run(app(state).layer(axum::middleware::from_fn(traced))).await
}

/// Every line printed while a request is handled carries its method and path, and the run
/// (and step) the path names.
async fn traced(request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let span = spans::request(request.method().as_str(), request.uri().path());
    next.run(request).instrument(span).await
}
