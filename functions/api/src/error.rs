//! The one error type of the HTTP boundary, rendered as `application/problem+json`.
//! Internal errors are logged and shown to clients only as a generic 5xx.

use axum::Json;
use axum::response::{IntoResponse, Response};
use chainrun_core::graph::Problem;
use http::StatusCode;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    /// Also what a caller gets for a run they may not see: existence is not disclosed.
    #[error("{0}")]
    NotFound(String),
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
        let mut body = json!({ "type": format!("urn:chainrun:problem:{kind}"), "title": title, "status": status.as_u16(), "detail": detail });
        if let ApiError::BadRequest { problems, .. } = &self
            && !problems.is_empty()
        {
            body["problems"] = json!(problems);
        }
        if let ApiError::TooManyRequests { retry_after, .. } = &self {
            body["retry_after"] = json!(retry_after);
        }
        if let ApiError::InvalidAnswer { errors, attempts_left, .. } = &self {
            body["errors"] = json!(errors);
            body["attempts_left"] = json!(attempts_left);
        }
        let mut response = (status, Json(body)).into_response();
        response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/problem+json"));
        if let ApiError::TooManyRequests { retry_after, .. } = &self {
            set_retry_after(&mut response, *retry_after);
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// `Retry-After` in whole seconds, as RFC 9110 allows.
fn set_retry_after(response: &mut Response, seconds: u64) {
    response.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from(seconds));
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
