//! AWS adapters: the only code that names `aws_sdk_*` types. Each turns SDK errors into
//! the port's domain error at the boundary, deciding there whether a retry can help.
//!
//! Endpoints come only from the standard `AWS_ENDPOINT_URL_<SERVICE>` variables (which
//! `aws-config` reads), so the same code runs against AWS and the local stack.

mod batch;
mod bedrock;
mod blobs;
mod dynamo;
mod dynamo_error;
mod idempotency;
mod lambda;
mod progress;
mod quota;
mod reader;
mod responses;
mod rollups;
mod scheduler;
mod spend;
mod templates;
mod workflows;

pub use batch::BedrockBatch;
pub use bedrock::BedrockModel;
pub use blobs::S3Blobs;
pub use dynamo::DynamoStore;
pub use idempotency::DynamoIdempotency;
pub use lambda::{LambdaDispatcher, RunnerEvent};
pub use progress::DynamoProgress;
pub use quota::DynamoQuota;
pub use responses::DynamoResponses;
pub use rollups::DynamoAnalytics;
pub use scheduler::{ScheduleTarget, SchedulerTimers};
pub use spend::DynamoDailySpend;
pub use templates::DynamoTemplates;
pub use workflows::DynamoWorkflows;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};
use std::time::Duration;

/// The shared SDK configuration (credentials, region, endpoints), loaded once per cold start.
pub async fn sdk_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(TimeoutConfig::builder().connect_timeout(Duration::from_secs(3)).build())
        .load()
        .await
}

/// A Bedrock Runtime client with SDK retries off: the engine retries per step with its own
/// backoff and reports every attempt, so SDK retries would multiply attempts unseen.
pub fn bedrock_client(config: &SdkConfig) -> aws_sdk_bedrockruntime::Client {
    let conf = aws_sdk_bedrockruntime::config::Builder::from(config)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                // One model turn may legitimately take minutes; the engine's deadline bounds the rest.
                .operation_attempt_timeout(Duration::from_secs(600))
                .build(),
        )
        .build();
    aws_sdk_bedrockruntime::Client::from_conf(conf)
}

/// A Bedrock control-plane client (batch inference jobs), SDK retries off as for
/// [`bedrock_client`]: a failed submit or poll is asked again at the engine's next poll,
/// which already spaces the calls out.
pub fn bedrock_control_client(config: &SdkConfig) -> aws_sdk_bedrock::Client {
    let conf = aws_sdk_bedrock::config::Builder::from(config)
        .retry_config(RetryConfig::disabled())
        .timeout_config(TimeoutConfig::builder().connect_timeout(Duration::from_secs(3)).operation_attempt_timeout(Duration::from_secs(30)).build())
        .build();
    aws_sdk_bedrock::Client::from_conf(conf)
}

/// A DynamoDB client whose every attempt is bounded: a request that hangs becomes a
/// retryable error (the SDK retries it, with the same client token for transactions)
/// instead of holding the runner until its deadline.
pub fn dynamodb_client(config: &SdkConfig) -> aws_sdk_dynamodb::Client {
    let conf = aws_sdk_dynamodb::config::Builder::from(config)
        .timeout_config(TimeoutConfig::builder().connect_timeout(Duration::from_secs(3)).operation_attempt_timeout(Duration::from_secs(10)).build())
        .build();
    aws_sdk_dynamodb::Client::from_conf(conf)
}

/// An S3 client for the outputs bucket. Path-style addressing: virtual-host names would
/// need DNS for `<bucket>.<endpoint>`, which a local endpoint (moto) does not have; AWS
/// serves both.
pub fn s3_client(config: &SdkConfig) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::config::Builder::from(config)
        .force_path_style(true)
        .timeout_config(TimeoutConfig::builder().connect_timeout(Duration::from_secs(3)).operation_attempt_timeout(Duration::from_secs(30)).build())
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

pub fn scheduler_client(config: &SdkConfig) -> aws_sdk_scheduler::Client {
    aws_sdk_scheduler::Client::new(config)
}

pub fn lambda_client(config: &SdkConfig) -> aws_sdk_lambda::Client {
    aws_sdk_lambda::Client::new(config)
}

/// Every item `query` finds, page after page, in key order; a failed page is `fail`ed.
async fn query_all<E>(
    query: aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder,
    fail: impl Fn(
        aws_smithy_runtime_api_compat::SdkError<aws_sdk_dynamodb::operation::query::QueryError, aws_smithy_runtime_api_compat::HttpResponse>,
    ) -> E,
) -> Result<Vec<std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>>, E> {
    let mut items = Vec::new();
    let mut start = None;
    loop {
        let out = query.clone().set_exclusive_start_key(start).send().await.map_err(&fail)?;
        items.extend(out.items.unwrap_or_default());
        match out.last_evaluated_key {
            Some(key) => start = Some(key),
            None => return Ok(items),
        }
    }
}

/// The error code and a readable message of any SDK error.
fn describe<E, R>(err: &aws_smithy_runtime_api_compat::SdkError<E, R>) -> (Option<String>, String)
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_dynamodb::error::ProvideErrorMetadata;
    let code = err.code().map(str::to_owned);
    let message = match err.message() {
        Some(m) => m.to_owned(),
        None => aws_sdk_dynamodb::error::DisplayErrorContext(err).to_string(),
    };
    (code, message)
}

/// Whether an SDK error is worth retrying: transport failures, throttling and 5xx.
fn transient<E>(err: &aws_smithy_runtime_api_compat::SdkError<E, aws_smithy_runtime_api_compat::HttpResponse>) -> bool {
    use aws_smithy_runtime_api_compat::SdkError;
    match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => true,
        SdkError::ServiceError(e) => e.raw().status().is_server_error() || e.raw().status().as_u16() == 429,
        _ => false,
    }
}

/// `SdkError` is re-exported by every SDK crate; name it once.
mod aws_smithy_runtime_api_compat {
    pub use aws_sdk_dynamodb::config::http::HttpResponse;
    pub use aws_sdk_dynamodb::error::SdkError;
}
