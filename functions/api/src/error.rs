//! The one error type of the HTTP boundary, rendered as `application/problem+json`.
//! Internal errors are logged and shown to clients only as a generic 5xx.

use axum::Json;
use axum::response::{IntoResponse, Response};
use chainrun_core::graph::Problem;
use http::StatusCode;
use schemars::JsonSchema;
use serde::Serialize;

/// What every refusal answers, as `application/problem+json` (RFC 9457). The OpenAPI
/// document publishes its schema, so clients can rely on these fields.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ProblemDocument {
    /// `urn:chainrun:problem:<kind>`: what went wrong, for programs.
    #[serde(rename = "type")]
    pub kind: String,
    /// The kind of problem, for people.
    pub title: String,
    /// The HTTP status, repeated.
    pub status: u16,
    /// What went wrong with this request, and what to do about it.
    pub detail: String,
    /// An invalid workflow: everything wrong with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
    /// An invalid answer to an input step: each field without a valid value, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<chainrun_core::input::FieldError>>,
    /// An invalid answer to an input step: how many answers the step still takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts_left: Option<u32>,
    /// A `429`: seconds until a retry may be admitted (also the `Retry-After` header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    /// Also what a caller gets for a run they may not see: existence is not disclosed.
    #[error("{0}")]
    NotFound(String),
    /// The caller may see what they act on but lacks the role the act needs.
    #[error("{0}")]
    Forbidden(String),
    #[error("{detail}")]
    BadRequest { title: &'static str, detail: String, problems: Vec<Problem> },
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// A workflow definition over its size limit, measured as compact JSON.
    #[error("the workflow definition is {size} bytes; a definition may have at most {limit}")]
    DefinitionTooLarge { size: usize, limit: usize },
    /// A tenant's limit is reached (starts per minute, concurrent runs); the answer carries
    /// `Retry-After`. Nothing was stored.
    #[error("{detail}")]
    TooManyRequests { detail: String, retry_after: u64 },
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The request does not fit the state of what it acts on (a cancel of an ended run).
    #[error("{0}")]
    Conflict(String),
    /// A conditional request sent without its condition (a `PUT` of a stored workflow that
    /// does not say which version it replaces).
    #[error("{0}")]
    PreconditionRequired(String),
    /// Well-formed, but not something that can be done (an idempotency key reused for
    /// another request).
    #[error("{0}")]
    Unprocessable(String),
    /// An answer to an input step that left fields without a valid value: each named,
    /// with why (`errors`), and how many answers the step still takes.
    #[error("{detail}")]
    InvalidAnswer { detail: String, errors: Vec<chainrun_core::input::FieldError>, attempts_left: u32 },
    /// A dependency is unavailable; the client may retry.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(title: &'static str, detail: impl Into<String>) -> Self {
        ApiError::BadRequest { title, detail: detail.into(), problems: Vec::new() }
    }

    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
            ApiError::BadRequest { title, .. } => (StatusCode::BAD_REQUEST, "bad-request", title),
            ApiError::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large", "Request body too large"),
            ApiError::DefinitionTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "definition-too-large", "Workflow definition too large"),
            ApiError::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "too-many-requests", "Too many requests"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", "Method not allowed"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict", "Conflict"),
            ApiError::PreconditionRequired(_) => (StatusCode::PRECONDITION_REQUIRED, "precondition-required", "Precondition required"),
            ApiError::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unprocessable", "Unprocessable request"),
            ApiError::InvalidAnswer { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid-answer", "Invalid answer"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Service unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, title) = self.parts();
        let detail = match &self {
            ApiError::Internal(msg) => {
                tracing::error!(error = %msg, "internal error");
                "an internal error occurred; it has been logged".to_owned()
            }
            ApiError::Unavailable(msg) => {
                tracing::warn!(error = %msg, "dependency unavailable");
                "a dependency is unavailable; try again shortly".to_owned()
            }
            other => other.to_string(),
        };
        let retry_after = match &self {
            ApiError::TooManyRequests { retry_after, .. } => Some(*retry_after),
            _ => None,
        };
        let (problems, errors, attempts_left) = match self {
            ApiError::BadRequest { problems, .. } => (problems, None, None),
            ApiError::InvalidAnswer { errors, attempts_left, .. } => (Vec::new(), Some(errors), Some(attempts_left)),
            _ => (Vec::new(), None, None),
        };
        let body = ProblemDocument {
            kind: format!("urn:chainrun:problem:{kind}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail,
            problems,
            errors,
            attempts_left,
            retry_after,
        };
        let mut response = respond(status, body);
        if let Some(seconds) = retry_after {
            // `Retry-After` in whole seconds, as RFC 9110 allows.
            response.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from(seconds));
        }
        response
    }
}

fn respond(status: StatusCode, body: ProblemDocument) -> Response {
    let mut response = (status, Json(body)).into_response();
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/problem+json"));
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
    }
    response
}

impl From<chainrun_core::ports::StoreError> for ApiError {
    fn from(e: chainrun_core::ports::StoreError) -> Self {
        use chainrun_core::ports::StoreError;
        match e {
            StoreError::TooLarge(msg) => ApiError::bad_request("Run too large", msg),
            e if e.retryable() => ApiError::Unavailable(e.to_string()),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<chainrun_core::ports::ProgressError> for ApiError {
    fn from(e: chainrun_core::ports::ProgressError) -> Self {
        if e.retryable() { ApiError::Unavailable(e.to_string()) } else { ApiError::Internal(e.to_string()) }
    }
}

impl From<chainrun_core::ports::AnalyticsError> for ApiError {
    fn from(e: chainrun_core::ports::AnalyticsError) -> Self {
        if e.retryable() { ApiError::Unavailable(e.to_string()) } else { ApiError::Internal(e.to_string()) }
    }
}

/// The most of a plain refusal's text kept as the problem's detail.
const MAX_PLAIN_DETAIL: usize = 1024;

/// Makes every refusal a problem document. The API's own errors already are; axum's
/// extractor rejections (a path segment that is not UTF-8 after percent-decoding) answer
/// `text/plain`, and are rewrapped here with their text as the detail.
pub async fn problem_documents(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_problem = response.headers().get(http::header::CONTENT_TYPE).is_some_and(|v| v.as_bytes() == b"application/problem+json");
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let text = axum::body::to_bytes(response.into_body(), MAX_PLAIN_DETAIL * 4).await.unwrap_or_default();
    let detail: String = String::from_utf8_lossy(&text).chars().take(MAX_PLAIN_DETAIL).collect();
    let error = match status {
        StatusCode::BAD_REQUEST => ApiError::bad_request("Invalid request", detail),
        StatusCode::NOT_FOUND => ApiError::NotFound(detail),
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed(detail),
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge { limit: crate::MAX_BODY_BYTES },
        StatusCode::UNAUTHORIZED => ApiError::Unauthorized(detail),
        StatusCode::CONFLICT => ApiError::Conflict(detail),
        StatusCode::SERVICE_UNAVAILABLE => ApiError::Unavailable(detail),
        StatusCode::UNPROCESSABLE_ENTITY => ApiError::Unprocessable(detail),
        s if s.is_server_error() => ApiError::Internal(detail),
        // Any other refusal keeps its status, named by its number.
        s => {
            let title = s.canonical_reason().unwrap_or("Refused").to_owned();
            let kind = format!("urn:chainrun:problem:http-{}", s.as_u16());
            return respond(
                s,
                ProblemDocument {
                    kind,
                    title,
                    status: s.as_u16(),
                    detail,
                    problems: Vec::new(),
                    errors: None,
                    attempts_left: None,
                    retry_after: None,
                },
            );
        }
    };
    error.into_response()
}
