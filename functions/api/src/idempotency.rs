//! `Idempotency-Key` on `POST` and `PUT`: a request repeated with the same key (a client's
//! retry after a lost answer, a double click) gets the first one's answer and acts once.
//!
//! Keys are per caller and kept a day. A key names one request: the same key with another
//! method, path, body or `If-Match` is a `422`; a repeat while the first is still being handled is a
//! `409`. Answers below 500 are kept and replayed (marked `Idempotent-Replayed: true`); a
//! 5xx or a `429` (a tenant's limit, which did nothing and tells the client to retry) gives
//! the key up, so a retry acts anew. Requests without the header are untouched.

use crate::error::ApiError;
use crate::{AppState, MAX_BODY_BYTES};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chainrun_core::ports::{KeyClaim, StoredResponse};
use http::{HeaderValue, Method, StatusCode};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

pub const HEADER: &str = "idempotency-key";
const REPLAYED: &str = "idempotent-replayed";
const MAX_KEY_CHARS: usize = 255;

pub async fn keyed(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !matches!(*request.method(), Method::POST | Method::PUT) {
        return next.run(request).await;
    }
    let Some(raw) = request.headers().get(HEADER) else { return next.run(request).await };
    let key = match raw.to_str() {
        Ok(key) if (1..=MAX_KEY_CHARS).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) => key.to_owned(),
        _ => {
            let detail = format!("Idempotency-Key: 1 to {MAX_KEY_CHARS} visible ASCII characters (a UUID is a good key)");
            return ApiError::bad_request("Invalid header", detail).into_response();
        }
    };
    let (parts, body) = request.into_parts();
    // Without a caller there is nothing to scope the key to: the route answers 401.
    let Ok(identity) = state.auth.identify(&parts) else { return next.run(Request::from_parts(parts, body)).await };
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY_BYTES + 1).await else {
        return ApiError::PayloadTooLarge { limit: MAX_BODY_BYTES }.into_response();
    };
    let mut digest = Sha256::new();
    for part in [parts.method.as_str().as_bytes(), b" ", parts.uri.path().as_bytes(), b"\n", &bytes] {
        digest.update(part);
    }
    // A conditional request's condition is part of what it asks: the same body replacing
    // another version is another request.
    if let Some(condition) = parts.headers.get(http::header::IF_MATCH) {
        digest.update(b"\nif-match: ");
        digest.update(condition.as_bytes());
    }
    let fingerprint: String = digest.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let scope = identity.user.as_str();
    match state.idempotency.begin(scope, &key, &fingerprint, chrono::Utc::now()).await {
        Err(e) => return ApiError::from(e).into_response(),
        Ok(KeyClaim::Replay(stored)) => {
            info!(user = scope, status = stored.status, "idempotent request replayed");
            return replay(stored);
        }
        Ok(KeyClaim::InProgress) => {
            return ApiError::Conflict("a request with this Idempotency-Key is still being handled; retry shortly".into()).into_response();
        }
        Ok(KeyClaim::Mismatch) => {
            let detail = "this Idempotency-Key was used for a different request (method, path or body); use a new key for a new request";
            return ApiError::Unprocessable(detail.into()).into_response();
        }
        Ok(KeyClaim::New) => {}
    }
    let response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    let (mut head, body) = response.into_parts();
    let Ok(answer) = axum::body::to_bytes(body, usize::MAX).await else {
        warn!("could not read the answer to keep it; giving the key up");
        let _ = state.idempotency.abandon(scope, &key, &fingerprint).await;
        return ApiError::Internal("the answer could not be read".into()).into_response();
    };
    let kept = if head.status.is_server_error() || head.status == StatusCode::TOO_MANY_REQUESTS {
        state.idempotency.abandon(scope, &key, &fingerprint).await
    } else {
        let stored = StoredResponse { status: head.status.as_u16(), body: String::from_utf8_lossy(&answer).into_owned() };
        state.idempotency.complete(scope, &key, &fingerprint, &stored).await
    };
    if let Err(e) = kept {
        // The request was handled; only its replay is lost (a repeat acts again).
        warn!(error = %e, "could not keep the answer for its idempotency key");
    }
    head.headers.remove(REPLAYED);
    Response::from_parts(head, Body::from(answer))
}

fn replay(stored: StoredResponse) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let content_type = if status.is_client_error() { "application/problem+json" } else { "application/json" };
    let mut response = (status, stored.body).into_response();
    response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response.headers_mut().insert(REPLAYED, HeaderValue::from_static("true"));
    response
}
