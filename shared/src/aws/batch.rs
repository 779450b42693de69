//! [`BatchJobs`] over Bedrock batch inference (model invocation jobs, Converse format).
//!
//! A submission becomes one JSONL object in the outputs bucket,
//! `batches/<run>/<step>/<token>/input.jsonl`, one line per record in the order given:
//! `{"recordId": "R0000000007", "modelInput": <Converse request body>}`. The record id
//! carries the map item's index (Bedrock takes 11 alphanumeric characters), so answers are
//! matched by id, never by line order (Bedrock does not promise to keep it). Bedrock writes
//! its answers under `batches/<run>/<step>/<token>/output/<job id>/input.jsonl.out`.
//!
//! Idempotency rests on the token: the input is the same bytes for the same submission
//! (rewriting it is harmless), and the token is the job's `clientRequestToken`, so a
//! submission made again after a crash or a lost reply gets the job the first one made.
//!
//! The body mirrors what [`super::BedrockModel`] sends for a request, minus what batch
//! inference does not take: cache points and service tiers (the batch price is the tier),
//! and request metadata (the job's tags name the run and step instead).

use super::bedrock::kind_of;
use super::{describe, transient};
use crate::ports::{BatchJobs, BatchResults, BatchState, BatchSubmission, ModelError, ModelErrorKind, ModelReply, ModelRequest};
use crate::pricing::Usage;
use async_trait::async_trait;
use aws_sdk_bedrock::error::SdkError;
use aws_sdk_bedrock::types::{
    ModelInvocationJobInputDataConfig, ModelInvocationJobOutputDataConfig, ModelInvocationJobS3InputDataConfig, ModelInvocationJobS3OutputDataConfig,
    ModelInvocationJobStatus, ModelInvocationType, S3InputFormat, Tag,
};
use aws_sdk_s3::primitives::ByteStream;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tracing::{debug, info, instrument};

#[derive(Clone)]
pub struct BedrockBatch {
    bedrock: aws_sdk_bedrock::Client,
    s3: aws_sdk_s3::Client,
    bucket: String,
    role_arn: String,
}

impl BedrockBatch {
    /// `bedrock` should come from [`super::bedrock_control_client`]; `bucket` is the outputs
    /// bucket, which the service role `role_arn` (`CHAINRUN_BATCH_ROLE_ARN`) reads and writes.
    pub fn new(bedrock: aws_sdk_bedrock::Client, s3: aws_sdk_s3::Client, bucket: String, role_arn: String) -> Self {
        Self { bedrock, s3, bucket, role_arn }
    }
}

/// Bedrock's bounds on `timeoutDurationInHours`; a job asked to take less (or more) gets
/// the nearest bound rather than a refusal, since the engine's own wait is what matters.
const TIMEOUT_HOURS: std::ops::RangeInclusive<u32> = 24..=168;

#[async_trait]
impl BatchJobs for BedrockBatch {
    #[instrument(skip_all, fields(run_id = %job.run, step_id = %job.step, records = job.records.len()))]
    async fn submit(&self, job: &BatchSubmission) -> Result<String, ModelError> {
        if job.records.is_empty() {
            return Err(ModelError::new(ModelErrorKind::Invalid, "EmptyBatch", "a batch job needs at least one record"));
        }
        let request_token = request_token(&job.token)?;
        let prefix = format!("batches/{}/{}/{}", job.run, job.step, job.token);
        let input_key = format!("{prefix}/input.jsonl");
        let body = input_jsonl(job)?;
        self.s3
            .put_object()
            .bucket(&self.bucket)
            .key(&input_key)
            .content_type("application/jsonl")
            .body(ByteStream::from(body.into_bytes()))
            .send()
            .await
            .map_err(|e| s3_error(&e, &format!("storing the batch input s3://{}/{input_key}", self.bucket)))?;

        let input = ModelInvocationJobS3InputDataConfig::builder()
            .s3_uri(format!("s3://{}/{input_key}", self.bucket))
            .s3_input_format(S3InputFormat::Jsonl)
            .build()
            .map_err(invalid)?;
        let output =
            ModelInvocationJobS3OutputDataConfig::builder().s3_uri(format!("s3://{}/{prefix}/output/", self.bucket)).build().map_err(invalid)?;
        let tag = |key: &str, value: &str| Tag::builder().key(key).value(value).build().map_err(invalid);
        let out = self
            .bedrock
            .create_model_invocation_job()
            .job_name(job_name(&job.token))
            .client_request_token(request_token)
            .role_arn(&self.role_arn)
            .model_id(job.model.as_str())
            .model_invocation_type(ModelInvocationType::Converse)
            .input_data_config(ModelInvocationJobInputDataConfig::S3InputDataConfig(input))
            .output_data_config(ModelInvocationJobOutputDataConfig::S3OutputDataConfig(output))
            .timeout_duration_in_hours(i32::try_from(job.timeout_hours.clamp(*TIMEOUT_HOURS.start(), *TIMEOUT_HOURS.end())).unwrap_or(24))
            .tags(tag("chainrun_run", job.run.as_str())?)
            .tags(tag("chainrun_step", job.step.as_str())?)
            .send()
            .await
            .map_err(|e| control_error(e, "creating the batch job"))?;
        info!(job = out.job_arn(), "batch job submitted");
        Ok(out.job_arn().to_owned())
    }

    #[instrument(skip(self))]
    async fn state(&self, job: &str) -> Result<BatchState, ModelError> {
        let out = self.bedrock.get_model_invocation_job().job_identifier(job).send().await.map_err(|e| control_error(e, "reading the batch job"))?;
        let status = out.status().map(|s| s.as_str().to_owned()).unwrap_or_default();
        let ended = match out.status() {
            Some(
                ModelInvocationJobStatus::Completed
                | ModelInvocationJobStatus::PartiallyCompleted
                | ModelInvocationJobStatus::Failed
                | ModelInvocationJobStatus::Stopped
                | ModelInvocationJobStatus::Expired,
            ) => true,
            // Submitted, Validating, Scheduled, InProgress, Stopping — and any status added
            // later, which is safer to wait out than to read as final.
            _ => false,
        };
        debug!(status, "batch job state");
        Ok(if ended { BatchState::Ended { status, message: out.message().map(str::to_owned) } } else { BatchState::Running { status } })
    }

    #[instrument(skip(self))]
    async fn results(&self, job: &str) -> Result<BatchResults, ModelError> {
        let out = self.bedrock.get_model_invocation_job().job_identifier(job).send().await.map_err(|e| control_error(e, "reading the batch job"))?;
        let input = match out.input_data_config() {
            Some(ModelInvocationJobInputDataConfig::S3InputDataConfig(c)) => c.s3_uri().to_owned(),
            _ => return Err(unreadable(format!("batch job {job} names no S3 input"))),
        };
        let output = match out.output_data_config() {
            Some(ModelInvocationJobOutputDataConfig::S3OutputDataConfig(c)) => c.s3_uri().to_owned(),
            _ => return Err(unreadable(format!("batch job {job} names no S3 output"))),
        };
        let (bucket, key) = output_object(out.job_arn(), &input, &output)
            .ok_or_else(|| unreadable(format!("batch job {job}: cannot place its output ({input} → {output})")))?;
        let read = match self.s3.get_object().bucket(&bucket).key(&key).send().await {
            Ok(read) => read,
            // A job that failed validation (or was stopped before) answered nothing.
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                debug!(key, "batch job wrote no output");
                return Ok(BatchResults::new());
            }
            Err(e) => return Err(s3_error(&e, &format!("reading the batch output s3://{bucket}/{key}"))),
        };
        let bytes = read
            .body
            .collect()
            .await
            .map_err(|e| ModelError::new(ModelErrorKind::Network, "NetworkError", format!("reading the batch output s3://{bucket}/{key}: {e}")))?
            .into_bytes();
        let text = std::str::from_utf8(&bytes).map_err(|_| unreadable(format!("the batch output s3://{bucket}/{key} is not UTF-8")))?;
        let results = parse_output(text).map_err(|e| unreadable(format!("the batch output s3://{bucket}/{key}: {e}")))?;
        info!(answered = results.len(), "batch job results read");
        Ok(results)
    }

    #[instrument(skip(self))]
    async fn stop(&self, job: &str) -> Result<(), ModelError> {
        match self.bedrock.stop_model_invocation_job().job_identifier(job).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let err = control_error(e, "stopping the batch job");
                if err.retryable() {
                    return Err(err);
                }
                // Bedrock refuses to stop a job that has ended (or is stopping already);
                // either way it will run no further record, which is all a stop asks.
                match self.state(job).await? {
                    BatchState::Ended { .. } => Ok(()),
                    BatchState::Running { status } if status == ModelInvocationJobStatus::Stopping.as_str() => Ok(()),
                    BatchState::Running { .. } => Err(err),
                }
            }
        }
    }
}

// ---------------------------------------------------------------- names

/// A record's id: the item index in Bedrock's 11 alphanumeric characters.
fn record_id(index: usize) -> String {
    format!("R{index:010}")
}

fn record_index(id: &str) -> Option<usize> {
    let digits = id.strip_prefix('R').filter(|d| d.len() == 10 && d.bytes().all(|b| b.is_ascii_digit()))?;
    digits.parse().ok()
}

/// The job's name: the token when it fits Bedrock's name (1–63 characters,
/// `[a-zA-Z0-9]{1,63}(-*[a-zA-Z0-9\+\-\.]){0,63}`), else a fitting prefix of it and a
/// digest of the whole, so that different tokens keep different names.
fn job_name(token: &str) -> String {
    let fits = |s: &str| {
        (1..=63).contains(&s.len())
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    };
    if fits(token) {
        return token.to_owned();
    }
    let digest: String = Sha256::digest(token.as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect();
    let head: String = token.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(40).collect();
    let head = head.trim_start_matches('-');
    if head.is_empty() { format!("chainrun-{digest}") } else { format!("{head}-{digest}") }
}

/// The token as Bedrock's `clientRequestToken` (`[a-zA-Z0-9]{1,256}(-*[a-zA-Z0-9]){0,256}`).
/// The engine makes tokens of that shape; anything else is a bug to report, not to mend,
/// since a mended token could meet another's.
fn request_token(token: &str) -> Result<&str, ModelError> {
    let ok = (1..=256).contains(&token.len())
        && token.starts_with(|c: char| c.is_ascii_alphanumeric())
        && token.ends_with(|c: char| c.is_ascii_alphanumeric())
        && token.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Ok(token)
    } else {
        Err(ModelError::new(ModelErrorKind::Invalid, "InvalidBatchToken", format!("batch token {token:?} is not a valid Bedrock clientRequestToken")))
    }
}

/// Where Bedrock writes the answers to `input`: `<output prefix><job id>/<input file>.out`.
fn output_object(job_arn: &str, input: &str, output: &str) -> Option<(String, String)> {
    let job_id = job_arn.rsplit('/').next().filter(|id| !id.is_empty())?;
    let file = input.rsplit('/').next().filter(|f| !f.is_empty())?;
    let (bucket, prefix) = output.strip_prefix("s3://")?.split_once('/').unwrap_or((output.strip_prefix("s3://")?, ""));
    let prefix = if prefix.is_empty() || prefix.ends_with('/') { prefix.to_owned() } else { format!("{prefix}/") };
    Some((bucket.to_owned(), format!("{prefix}{job_id}/{file}.out")))
}

// ---------------------------------------------------------------- input records

#[derive(Serialize)]
struct InputLine<'a> {
    #[serde(rename = "recordId")]
    record_id: String,
    #[serde(rename = "modelInput")]
    model_input: ConverseBody<'a>,
}

/// A Converse request body, as the SDK would serialize [`super::BedrockModel`]'s request.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConverseBody<'a> {
    messages: [Message<'a>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<[Text<'a>; 1]>,
    inference_config: InferenceConfig<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_config: Option<OutputConfig>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: [Text<'a>; 1],
}

#[derive(Serialize)]
struct Text<'a> {
    text: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InferenceConfig<'a> {
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutputConfig {
    text_format: TextFormat,
}

#[derive(Serialize)]
struct TextFormat {
    r#type: &'static str,
    structure: Structure,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Structure {
    json_schema: JsonSchema,
}

/// The schema goes as a string, as Converse takes it; named as [`super::BedrockModel`] names it.
#[derive(Serialize)]
struct JsonSchema {
    schema: String,
    name: &'static str,
}

fn converse_body(request: &ModelRequest) -> ConverseBody<'_> {
    ConverseBody {
        messages: [Message { role: "user", content: [Text { text: &request.prompt }] }],
        system: request.system.as_deref().map(|text| [Text { text }]),
        inference_config: InferenceConfig {
            max_tokens: request.max_tokens.min(i32::MAX as u32),
            temperature: request.temperature,
            stop_sequences: &request.stop_sequences,
        },
        output_config: request.output_schema.as_ref().map(|schema| OutputConfig {
            text_format: TextFormat {
                r#type: "json_schema",
                structure: Structure { json_schema: JsonSchema { schema: schema.to_string(), name: "reply" } },
            },
        }),
    }
}

/// The job's input file: one line per record, in the order given.
fn input_jsonl(job: &BatchSubmission) -> Result<String, ModelError> {
    let mut out = String::new();
    for record in &job.records {
        let line = InputLine { record_id: record_id(record.index), model_input: converse_body(&record.request) };
        out.push_str(&serde_json::to_string(&line).map_err(invalid)?);
        out.push('\n');
    }
    Ok(out)
}

// ---------------------------------------------------------------- output records

#[derive(Deserialize)]
struct OutputLine {
    #[serde(rename = "recordId")]
    record_id: Option<String>,
    #[serde(rename = "modelOutput")]
    model_output: Option<ConverseReply>,
    error: Option<RecordError>,
}

/// The parts of a Converse response a reply is made of.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConverseReply {
    output: Option<ReplyOutput>,
    #[serde(default)]
    stop_reason: String,
    usage: Option<ReplyUsage>,
}

#[derive(Deserialize)]
struct ReplyOutput {
    message: Option<ReplyMessage>,
}

#[derive(Deserialize)]
struct ReplyMessage {
    #[serde(default)]
    content: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReplyUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_read_input_tokens: u64,
    #[serde(default)]
    cache_write_input_tokens: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RecordError {
    /// An HTTP status, as a number (or, defensively, a string of one).
    error_code: Value,
    #[serde(default)]
    error_message: String,
}

fn parse_output(text: &str) -> Result<BatchResults, String> {
    let mut results = BatchResults::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |why: &str| format!("line {} {why}", n + 1);
        let line: OutputLine = serde_json::from_str(line).map_err(|e| bad(&format!("is not a record: {e}")))?;
        let id = line.record_id.ok_or_else(|| bad("has no recordId"))?;
        let index = record_index(&id).ok_or_else(|| bad(&format!("has recordId {id:?}, which chainrun did not write")))?;
        let answer = match (line.model_output, line.error) {
            (_, Some(error)) => Err(record_error(&error)),
            (Some(reply), None) => Ok(model_reply(reply)),
            (None, None) => return Err(bad("has neither modelOutput nor error")),
        };
        results.insert(index, answer);
    }
    Ok(results)
}

fn model_reply(reply: ConverseReply) -> ModelReply {
    let text = reply
        .output
        .and_then(|o| o.message)
        .map(|m| m.content.iter().filter_map(|block| block.get("text").and_then(Value::as_str)).collect::<String>())
        .unwrap_or_default();
    let usage = reply
        .usage
        .map(|u| Usage {
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            cache_read_tokens: u.cache_read_input_tokens,
            cache_write_tokens: u.cache_write_input_tokens,
        })
        .unwrap_or_default();
    ModelReply { text, usage, stop_reason: reply.stop_reason, service_tier: None }
}

/// A record's failure, classified by its HTTP status as an online call's would be.
fn record_error(error: &RecordError) -> ModelError {
    let status = match &error.error_code {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    let kind = match status {
        Some(429) => ModelErrorKind::Throttled,
        Some(408) => ModelErrorKind::Timeout,
        // ModelErrorException: the model failed on the request, which online calls retry.
        Some(424) => ModelErrorKind::ServerError,
        Some(500..=599) => ModelErrorKind::ServerError,
        _ => ModelErrorKind::Invalid,
    };
    let code = status.map_or_else(|| "BatchRecordError".to_owned(), |s| format!("BatchRecord{s}"));
    ModelError::new(kind, code, error.error_message.clone())
}

// ---------------------------------------------------------------- errors

fn invalid(e: impl std::fmt::Display) -> ModelError {
    ModelError::new(ModelErrorKind::Invalid, "InvalidRequest", e.to_string())
}

/// The job's output exists but is not what Bedrock writes: no retry changes that.
fn unreadable(message: String) -> ModelError {
    ModelError::new(ModelErrorKind::Invalid, "BatchOutputUnreadable", message)
}

/// A control-plane error, classified by the service's error code as a Converse error is
/// (a quota of concurrent jobs reached is `ServiceQuotaExceededException`: wait and retry).
fn control_error<E>(err: SdkError<E, aws_sdk_bedrock::config::http::HttpResponse>, doing: &str) -> ModelError
where
    E: aws_sdk_bedrock::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    match &err {
        SdkError::TimeoutError(_) => ModelError::new(ModelErrorKind::Timeout, "Timeout", format!("{doing}: Bedrock did not answer in time")),
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            ModelError::new(ModelErrorKind::Network, "NetworkError", format!("{doing}: {}", aws_sdk_bedrock::error::DisplayErrorContext(&err)))
        }
        _ => {
            let (code, message) = describe(&err);
            match code {
                Some(code) => ModelError::new(kind_of(&code), code, format!("{doing}: {message}")),
                None if transient(&err) => ModelError::new(ModelErrorKind::ServerError, "UnknownError", format!("{doing}: {message}")),
                None => ModelError::new(ModelErrorKind::Invalid, "UnknownError", format!("{doing}: {message}")),
            }
        }
    }
}

/// An S3 error: retryable when a retry can succeed; otherwise what the service role or
/// bucket lacks.
fn s3_error<E>(err: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>, doing: &str) -> ModelError
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    let (code, message) = describe(err);
    let code = code.unwrap_or_else(|| "S3Error".to_owned());
    let kind = match code.as_str() {
        _ if matches!(err, SdkError::TimeoutError(_)) => ModelErrorKind::Timeout,
        _ if matches!(err, SdkError::DispatchFailure(_) | SdkError::ResponseError(_)) => ModelErrorKind::Network,
        "SlowDown" => ModelErrorKind::Throttled,
        "InternalError" | "ServiceUnavailable" | "RequestTimeout" => ModelErrorKind::ServerError,
        _ if transient(err) => ModelErrorKind::ServerError,
        "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch" => ModelErrorKind::AccessDenied,
        _ => ModelErrorKind::Invalid,
    };
    ModelError::new(kind, code, format!("{doing}: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{RunId, StepId};
    use crate::ports::{BatchRecord, CachePoints};
    use crate::pricing::ServiceTier;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn request(prompt: &str) -> ModelRequest {
        ModelRequest {
            model: "amazon.nova-micro-v1:0".parse().unwrap(),
            system: None,
            prompt: prompt.into(),
            temperature: None,
            max_tokens: 300,
            stop_sequences: vec![],
            cache_points: CachePoints::default(),
            service_tier: ServiceTier::Default,
            metadata: BTreeMap::new(),
            output_schema: None,
        }
    }

    fn submission(records: Vec<BatchRecord>) -> BatchSubmission {
        BatchSubmission {
            token: "01JX-run-sum-up-r1".into(),
            run: RunId::new(),
            step: StepId::parse("sum_up").unwrap(),
            model: "amazon.nova-micro-v1:0".parse().unwrap(),
            records,
            timeout_hours: 24,
        }
    }

    #[test]
    fn a_record_line_is_a_converse_body_without_cache_points_tier_or_metadata() {
        let mut full = request("Rate: {\"a\": 1}");
        full.system = Some("You rate things.".into());
        full.temperature = Some(0.2);
        full.stop_sequences = vec!["END".into(), "\n\n".into()];
        full.output_schema = Some(json!({ "type": "object", "required": ["score"] }));
        full.cache_points = CachePoints { after_system: true, prompt_head: Some(4) };
        full.service_tier = ServiceTier::Flex;
        full.metadata = BTreeMap::from([("run_id".to_owned(), "r".to_owned())]);
        let jsonl =
            input_jsonl(&submission(vec![BatchRecord { index: 7, request: full }, BatchRecord { index: 3, request: request("plain") }])).unwrap();
        let lines: Vec<Value> = jsonl.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(
            lines[0],
            json!({
                "recordId": "R0000000007",
                "modelInput": {
                    "messages": [{ "role": "user", "content": [{ "text": "Rate: {\"a\": 1}" }] }],
                    "system": [{ "text": "You rate things." }],
                    "inferenceConfig": { "maxTokens": 300, "temperature": 0.2, "stopSequences": ["END", "\n\n"] },
                    "outputConfig": { "textFormat": { "type": "json_schema", "structure": { "jsonSchema": {
                        "schema": "{\"required\":[\"score\"],\"type\":\"object\"}", "name": "reply" } } } }
                }
            })
        );
        assert_eq!(
            lines[1],
            json!({ "recordId": "R0000000003", "modelInput": {
                "messages": [{ "role": "user", "content": [{ "text": "plain" }] }], "inferenceConfig": { "maxTokens": 300 } } }),
            "records keep the order given; absent settings are left out"
        );
        assert!(jsonl.ends_with('\n') && jsonl.lines().count() == 2);
    }

    #[test]
    fn the_same_submission_writes_the_same_bytes() {
        let records = (0..3).map(|i| BatchRecord { index: i, request: request(&format!("item {i}")) }).collect::<Vec<_>>();
        assert_eq!(input_jsonl(&submission(records.clone())).unwrap(), input_jsonl(&submission(records)).unwrap());
    }

    #[test]
    fn record_ids_are_eleven_alphanumerics_that_give_back_the_index() {
        for index in [0, 7, 119, 9_999_999_999] {
            let id = record_id(index);
            assert_eq!(id.len(), 11, "{id}");
            assert!(id.chars().all(|c| c.is_ascii_alphanumeric()), "{id}");
            assert_eq!(record_index(&id), Some(index));
        }
        for foreign in ["00000000007", "R7", "R00000000x7", "", "R000000000071"] {
            assert_eq!(record_index(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn job_names_keep_to_bedrocks_pattern_and_stay_distinct() {
        assert_eq!(job_name("01JX-run-sum-up-r1"), "01JX-run-sum-up-r1");
        let long_a = format!("{}-a-r1", "x".repeat(70));
        let long_b = format!("{}-b-r1", "x".repeat(70));
        for name in [job_name(&long_a), job_name(&long_b), job_name("-_odd token!")] {
            assert!((1..=63).contains(&name.len()) && name.starts_with(|c: char| c.is_ascii_alphanumeric()), "{name}");
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)), "{name}");
        }
        assert_ne!(job_name(&long_a), job_name(&long_b));
        assert!(request_token("01JX-run-sum-up-r1").is_ok());
        assert!(request_token("run_1").is_err() && request_token("-r1").is_err() && request_token("").is_err());
    }

    #[test]
    fn the_output_lies_under_the_job_id_named_after_the_input() {
        let arn = "arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/abc123def456";
        let at = |output: &str| output_object(arn, "s3://outputs/batches/r/s/t/input.jsonl", output);
        let want = Some(("outputs".to_owned(), "batches/r/s/t/output/abc123def456/input.jsonl.out".to_owned()));
        assert_eq!(at("s3://outputs/batches/r/s/t/output/"), want);
        assert_eq!(at("s3://outputs/batches/r/s/t/output"), want, "a prefix without its slash gets one");
        assert_eq!(at("s3://outputs"), Some(("outputs".to_owned(), "abc123def456/input.jsonl.out".to_owned())));
        assert_eq!(at("outputs/x"), None);
    }

    #[test]
    fn output_lines_become_replies_and_classified_errors_by_index() {
        let text = [
            r#"{"recordId":"R0000000002","modelInput":{},"modelOutput":{"output":{"message":{"role":"assistant","content":[{"text":"a"},{"text":"b"}]}},"stopReason":"end_turn","usage":{"inputTokens":12,"outputTokens":3,"totalTokens":15,"cacheReadInputTokens":1}}}"#,
            "",
            r#"{"recordId":"R0000000000","modelInput":{},"error":{"errorCode":429,"errorMessage":"slow down"}}"#,
            r#"{"recordId":"R0000000001","modelInput":{},"error":{"errorCode":400,"errorMessage":"bad"}}"#,
            r#"{"recordId":"R0000000005","modelInput":{},"error":{"errorCode":503,"errorMessage":"x"}}"#,
            r#"{"recordId":"R0000000006","modelInput":{},"error":{"errorCode":"408","errorMessage":"late"}}"#,
        ]
        .join("\n");
        let results = parse_output(&text).unwrap();
        assert_eq!(results.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2, 5, 6]);
        let reply = results[&2].as_ref().unwrap();
        assert_eq!((reply.text.as_str(), reply.stop_reason.as_str(), reply.service_tier), ("ab", "end_turn", None));
        assert_eq!(reply.usage, Usage { input_tokens: 12, output_tokens: 3, cache_read_tokens: 1, cache_write_tokens: 0 });
        let err = |i: usize| results[&i].as_ref().unwrap_err().clone();
        assert_eq!(err(0), ModelError::new(ModelErrorKind::Throttled, "BatchRecord429", "slow down"));
        assert_eq!((err(1).kind, err(1).retryable()), (ModelErrorKind::Invalid, false));
        assert_eq!(err(5).kind, ModelErrorKind::ServerError);
        assert_eq!(err(6).kind, ModelErrorKind::Timeout);
    }

    #[test]
    fn an_unreadable_output_line_is_named_by_its_number() {
        let good = r#"{"recordId":"R0000000000","modelOutput":{"stopReason":"end_turn"}}"#;
        let err = parse_output(&format!("{good}\n{{not json\n")).unwrap_err();
        assert!(err.starts_with("line 2 "), "{err}");
        let err = parse_output(&format!("{good}\n{good}\n{{\"recordId\":\"CALL0000001\",\"modelOutput\":{{}}}}")).unwrap_err();
        assert!(err.starts_with("line 3 ") && err.contains("CALL0000001"), "{err}");
    }
}
