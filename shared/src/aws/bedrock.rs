//! [`ModelClient`] over Bedrock Runtime's Converse and ConverseStream.

use super::describe;
use crate::ports::{ModelClient, ModelError, ModelErrorKind, ModelReply, ModelRequest};
use crate::pricing::{ServiceTier as PlanTier, Usage};
use async_trait::async_trait;
use aws_sdk_bedrockruntime::Client;
use aws_sdk_bedrockruntime::error::SdkError;
use aws_sdk_bedrockruntime::types::{
    CachePointBlock, CachePointType, ContentBlock, ContentBlockDelta, ConversationRole, ConverseOutput, ConverseStreamOutput, InferenceConfiguration,
    JsonSchemaDefinition, Message, OutputConfig, OutputFormat, OutputFormatStructure, OutputFormatType, ServiceTier, ServiceTierType,
    SystemContentBlock, TokenUsage,
};
use std::collections::HashMap;
use tokio::sync::mpsc;
use tracing::{debug, instrument};

#[derive(Clone)]
pub struct BedrockModel {
    client: Client,
}

impl BedrockModel {
    /// `client` should come from [`super::bedrock_client`] (SDK retries off).
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

/// Classifies by the service's error code, which is the same for plain and streamed calls
/// (stream exceptions arrive in lower camel case: `throttlingException`).
pub(super) fn kind_of(code: &str) -> ModelErrorKind {
    match code.to_ascii_lowercase().as_str() {
        "throttlingexception" | "toomanyrequestsexception" | "modelnotreadyexception" | "servicequotaexceededexception" => ModelErrorKind::Throttled,
        "modeltimeoutexception" => ModelErrorKind::Timeout,
        "serviceunavailableexception" => ModelErrorKind::Unavailable,
        "internalserverexception" | "modelstreamerrorexception" | "modelerrorexception" => ModelErrorKind::ServerError,
        "accessdeniedexception" | "unrecognizedclientexception" => ModelErrorKind::AccessDenied,
        "resourcenotfoundexception" => ModelErrorKind::ModelNotFound,
        _ => ModelErrorKind::Invalid,
    }
}

fn model_error<E, R>(err: SdkError<E, R>) -> ModelError
where
    E: aws_sdk_bedrockruntime::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match &err {
        SdkError::TimeoutError(_) => ModelError::new(ModelErrorKind::Timeout, "Timeout", "the model call timed out"),
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            ModelError::new(ModelErrorKind::Network, "NetworkError", aws_sdk_bedrockruntime::error::DisplayErrorContext(&err).to_string())
        }
        _ => {
            let (code, message) = describe_any(&err);
            match code {
                Some(code) => ModelError::new(kind_of(&code), code, message),
                None => ModelError::new(ModelErrorKind::ServerError, "UnknownError", message),
            }
        }
    }
}

/// Mid-stream exceptions carry no error code in the SDK (it is in the event headers), so
/// they are classified by variant.
fn stream_error(
    err: SdkError<aws_sdk_bedrockruntime::types::error::ConverseStreamOutputError, aws_smithy_types::event_stream::RawMessage>,
) -> ModelError {
    use aws_sdk_bedrockruntime::types::error::ConverseStreamOutputError as E;
    let service = match err {
        SdkError::ServiceError(e) => e.into_err(),
        other => return model_error(other),
    };
    let message = aws_sdk_bedrockruntime::error::DisplayErrorContext(&service).to_string();
    let (kind, code) = match &service {
        E::ThrottlingException(_) => (ModelErrorKind::Throttled, "ThrottlingException"),
        E::ServiceUnavailableException(_) => (ModelErrorKind::Unavailable, "ServiceUnavailableException"),
        E::InternalServerException(_) => (ModelErrorKind::ServerError, "InternalServerException"),
        E::ModelStreamErrorException(_) => (ModelErrorKind::ServerError, "ModelStreamErrorException"),
        E::ValidationException(_) => (ModelErrorKind::Invalid, "ValidationException"),
        _ => (ModelErrorKind::ServerError, "StreamError"),
    };
    ModelError::new(kind, code, message)
}

fn describe_any<E, R>(err: &SdkError<E, R>) -> (Option<String>, String)
where
    E: aws_sdk_bedrockruntime::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    describe(err)
}

fn usage_of(u: Option<&TokenUsage>) -> Usage {
    let clamp = |v: i32| u64::try_from(v).unwrap_or(0);
    u.map(|u| Usage {
        input_tokens: clamp(u.input_tokens()),
        output_tokens: clamp(u.output_tokens()),
        cache_read_tokens: u.cache_read_input_tokens().map_or(0, clamp),
        cache_write_tokens: u.cache_write_input_tokens().map_or(0, clamp),
    })
    .unwrap_or_default()
}

/// The request's parts as Converse takes them: the user message, the inference settings,
/// the system blocks, and the optional fields (tier, labels, structured output).
struct Parts {
    message: Message,
    config: InferenceConfiguration,
    system: Option<Vec<SystemContentBlock>>,
    tier: Option<ServiceTier>,
    metadata: Option<HashMap<String, String>>,
    output: Option<OutputConfig>,
}

fn invalid(e: impl std::fmt::Display) -> ModelError {
    ModelError::new(ModelErrorKind::Invalid, "InvalidRequest", e.to_string())
}

fn cache_point() -> Result<CachePointBlock, ModelError> {
    CachePointBlock::builder().r#type(CachePointType::Default).build().map_err(invalid)
}

fn parts(request: &ModelRequest) -> Result<Parts, ModelError> {
    // The prompt, split after its head when the head is marked for the prompt cache.
    let mut content = Vec::new();
    match request.cache_points.prompt_head.filter(|&at| request.prompt.is_char_boundary(at)) {
        Some(at) => {
            let (head, rest) = request.prompt.split_at(at);
            content.push(ContentBlock::Text(head.to_owned()));
            content.push(ContentBlock::CachePoint(cache_point()?));
            if !rest.is_empty() {
                content.push(ContentBlock::Text(rest.to_owned()));
            }
        }
        None => content.push(ContentBlock::Text(request.prompt.clone())),
    }
    let message = Message::builder().role(ConversationRole::User).set_content(Some(content)).build().map_err(invalid)?;
    let config = InferenceConfiguration::builder()
        .max_tokens(i32::try_from(request.max_tokens).unwrap_or(i32::MAX))
        .set_temperature(request.temperature)
        .set_stop_sequences((!request.stop_sequences.is_empty()).then(|| request.stop_sequences.clone()))
        .build();
    let system = match &request.system {
        Some(text) if request.cache_points.after_system => {
            Some(vec![SystemContentBlock::Text(text.clone()), SystemContentBlock::CachePoint(cache_point()?)])
        }
        Some(text) => Some(vec![SystemContentBlock::Text(text.clone())]),
        None => None,
    };
    let tier = match request.service_tier {
        PlanTier::Default => None,
        PlanTier::Flex => Some(ServiceTierType::Flex),
        PlanTier::Priority => Some(ServiceTierType::Priority),
    }
    .map(|t| ServiceTier::builder().r#type(t).build().map_err(invalid))
    .transpose()?;
    let metadata = (!request.metadata.is_empty()).then(|| request.metadata.iter().map(|(k, v)| (metadata_text(k), metadata_text(v))).collect());
    let output = request
        .output_schema
        .as_ref()
        .map(|schema| {
            let definition = JsonSchemaDefinition::builder().schema(schema.to_string()).name("reply").build().map_err(invalid)?;
            let format = OutputFormat::builder()
                .r#type(OutputFormatType::JsonSchema)
                .structure(OutputFormatStructure::JsonSchema(definition))
                .build()
                .map_err(invalid)?;
            Ok::<_, ModelError>(OutputConfig::builder().text_format(format).build())
        })
        .transpose()?;
    Ok(Parts { message, config, system, tier, metadata, output })
}

/// Bedrock's requestMetadata takes 1–256 characters of `[a-zA-Z0-9\s:_@$#=/+,.-]`; other
/// characters become `_` (run and step ids never have any).
fn metadata_text(text: &str) -> String {
    let allowed = |c: char| c.is_ascii_alphanumeric() || c.is_whitespace() || ":_@$#=/+,.-".contains(c);
    let cleaned: String = text.chars().take(256).map(|c| if allowed(c) { c } else { '_' }).collect();
    if cleaned.is_empty() { "_".to_owned() } else { cleaned }
}

fn tier_of(tier: Option<&ServiceTier>) -> Option<PlanTier> {
    match tier?.r#type() {
        ServiceTierType::Default => Some(PlanTier::Default),
        ServiceTierType::Flex => Some(PlanTier::Flex),
        ServiceTierType::Priority => Some(PlanTier::Priority),
        _ => None,
    }
}

#[async_trait]
impl ModelClient for BedrockModel {
    #[instrument(skip_all, fields(model = %request.model))]
    async fn converse(&self, request: &ModelRequest) -> Result<ModelReply, ModelError> {
        let parts = parts(request)?;
        let out = self
            .client
            .converse()
            .model_id(request.model.as_str())
            .messages(parts.message)
            .inference_config(parts.config)
            .set_system(parts.system)
            .set_service_tier(parts.tier)
            .set_request_metadata(parts.metadata)
            .set_output_config(parts.output)
            .send()
            .await
            .map_err(model_error)?;
        let text = match out.output() {
            Some(ConverseOutput::Message(m)) => m.content().iter().filter_map(|c| c.as_text().ok().cloned()).collect::<String>(),
            _ => String::new(),
        };
        let usage = usage_of(out.usage());
        debug!(input_tokens = usage.input_tokens, output_tokens = usage.output_tokens, "converse finished");
        Ok(ModelReply { text, usage, stop_reason: out.stop_reason().as_str().to_owned(), service_tier: tier_of(out.service_tier()) })
    }

    #[instrument(skip_all, fields(model = %request.model))]
    async fn converse_stream(&self, request: &ModelRequest, deltas: mpsc::Sender<String>) -> Result<ModelReply, ModelError> {
        let parts = parts(request)?;
        let mut out = self
            .client
            .converse_stream()
            .model_id(request.model.as_str())
            .messages(parts.message)
            .inference_config(parts.config)
            .set_system(parts.system)
            .set_service_tier(parts.tier)
            .set_request_metadata(parts.metadata)
            .set_output_config(parts.output)
            .send()
            .await
            .map_err(model_error)?;
        let mut text = String::new();
        let mut usage = Usage::default();
        let mut stop_reason = String::new();
        let mut service_tier = None;
        loop {
            match out.stream.recv().await {
                Ok(Some(ConverseStreamOutput::ContentBlockDelta(event))) => {
                    if let Some(ContentBlockDelta::Text(delta)) = event.delta() {
                        text.push_str(delta);
                        // The receiver only coalesces for progress events; if it is gone the
                        // reply is still collected in full.
                        let _ = deltas.send(delta.clone()).await;
                    }
                }
                Ok(Some(ConverseStreamOutput::MessageStop(event))) => stop_reason = event.stop_reason().as_str().to_owned(),
                Ok(Some(ConverseStreamOutput::Metadata(event))) => {
                    usage = usage_of(event.usage());
                    service_tier = tier_of(event.service_tier());
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return Err(stream_error(e)),
            }
        }
        Ok(ModelReply { text, usage, stop_reason, service_tier })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_timeouts_and_5xx_are_retryable_and_request_errors_are_terminal() {
        // Plain calls name errors in UpperCamelCase; stream exception frames in lowerCamelCase.
        for code in [
            "ThrottlingException",
            "throttlingException",
            "ModelNotReadyException",
            "ModelTimeoutException",
            "ServiceUnavailableException",
            "serviceUnavailableException",
            "InternalServerException",
            "modelStreamErrorException",
        ] {
            assert!(ModelError::new(kind_of(code), code, "").retryable(), "{code} should be retried");
        }
        for code in ["ValidationException", "validationException", "AccessDeniedException", "ResourceNotFoundException", "SomethingNew"] {
            assert!(!ModelError::new(kind_of(code), code, "").retryable(), "{code} should be terminal");
        }
        assert_eq!(kind_of("AccessDeniedException"), ModelErrorKind::AccessDenied);
        assert_eq!(kind_of("ResourceNotFoundException"), ModelErrorKind::ModelNotFound);
    }
}
