//! Who the caller is in production: the identity comes from the claims API Gateway's JWT
//! authorizer verified and put in the request context, and from nothing a client can set.
//!
//! Requests are built as Lambda receives them — an API Gateway HTTP API (payload 2.0) event,
//! turned into a request by `lambda_http` exactly as `lambda_http::run` does — and go through
//! the real router.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use base64::Engine as _;
use chainrun_api::auth::{Authenticator, LOCAL_AUDIENCE, LOCAL_ISSUER};
use chainrun_api::{AppState, app};
use chainrun_core::ids::{Principal, RunId};
use chainrun_core::memory::{MemoryDispatcher, MemoryStore};
use chainrun_core::ports::RunStore;
use chainrun_core::run::RunRecord;
use chainrun_core::spend::DailyCaps;
use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::sync::Arc;
use tower::ServiceExt;

mod support;

struct Api {
    store: Arc<MemoryStore>,
    dispatcher: Arc<MemoryDispatcher>,
    state: AppState,
}

/// The API as deployed: identities from the JWT authorizer's claims.
fn api() -> Api {
    let p = support::ports(Authenticator::ApiGatewayJwt, DailyCaps::parse(None, None).unwrap());
    Api { store: p.store, dispatcher: p.dispatcher, state: p.state }
}

/// An API Gateway HTTP API event (payload format 2.0) for `method path`, with `headers`, a JSON
/// `body`, and the request context's `authorizer` (`None`: the field is absent).
fn event(method: &str, path: &str, headers: Value, body: Option<&Value>, authorizer: Option<Value>) -> lambda_http::Request {
    let mut headers = headers;
    headers["host"] = json!("abc123.execute-api.us-east-1.amazonaws.com");
    headers["content-type"] = json!("application/json");
    let mut context = json!({
        "accountId": "123456789012",
        "apiId": "abc123",
        "domainName": "abc123.execute-api.us-east-1.amazonaws.com",
        "domainPrefix": "abc123",
        "http": { "method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "203.0.113.7", "userAgent": "test" },
        "requestId": "req-1",
        "routeKey": "$default",
        "stage": "$default",
        "time": "01/Dec/2025:12:00:00 +0000",
        "timeEpoch": 1_764_590_400_000_u64
    });
    if let Some(authorizer) = authorizer {
        context["authorizer"] = authorizer;
    }
    let event = json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": "",
        "headers": headers,
        "requestContext": context,
        "body": body.map(Value::to_string),
        "isBase64Encoded": false
    });
    lambda_http::request::from_str(&event.to_string()).expect("an API Gateway v2 event")
}

/// What API Gateway's JWT authorizer puts in the context for a verified token with `claims`.
fn jwt(claims: Value) -> Option<Value> {
    Some(json!({ "jwt": { "claims": claims, "scopes": null } }))
}

async fn send(api: &Api, request: lambda_http::Request) -> (StatusCode, http::HeaderMap, Value) {
    let response = app(api.state.clone()).oneshot(request).await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn start_body() -> Value {
    json!({
        "workflow": { "name": "greet", "defaults": { "model": "amazon.nova-micro-v1:0" }, "steps": [{ "id": "hello", "type": "llm", "prompt": "HELLO" }] },
        "input": {}
    })
}

/// A token naming `sub`, signed with `secret` as a local token would be (API Gateway never
/// checked it: it did not come through the authorizer).
fn signed_token(sub: &str, secret: &str) -> String {
    let claims = json!({ "sub": sub, "groups": ["admin"], "iss": LOCAL_ISSUER, "aud": LOCAL_AUDIENCE, "exp": chrono::Utc::now().timestamp() + 3600 });
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

/// An unsigned token (`alg: none`) naming `sub`.
fn unsigned_token(sub: &str) -> String {
    let part = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.", part(json!({ "alg": "none", "typ": "JWT" })), part(json!({ "sub": sub, "groups": ["admin"] })))
}

/// Headers a client might set to pass as someone else.
fn spoofing(user: &str, token: &str) -> Value {
    json!({
        "authorization": format!("Bearer {token}"),
        "x-user": user,
        "x-user-id": user,
        "x-chainrun-user": user,
        "x-amzn-oidc-identity": user,
        "x-forwarded-user": user,
        "x-groups": "admin"
    })
}

fn assert_unauthorized(status: StatusCode, headers: &http::HeaderMap, problem: &Value, case: &str) {
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{case}: {problem}");
    assert_eq!(headers["content-type"], "application/problem+json", "{case}");
    assert_eq!(headers["www-authenticate"], "Bearer", "{case}");
    assert_eq!((problem["status"].as_u64(), problem["title"].as_str()), (Some(401), Some("Unauthorized")), "{case}: {problem}");
}

#[tokio::test]
async fn the_authorizers_claims_are_the_caller_and_spoofed_headers_are_ignored() {
    let api = api();
    // Everything a client controls says "mallory", with tokens signed or not; the verified
    // claims say alice.
    for token in [unsigned_token("mallory"), signed_token("mallory", "a-secret-a-secret-a-secret-a-secret!")] {
        let request = event("POST", "/runs", spoofing("mallory", &token), Some(&start_body()), jwt(json!({ "sub": "alice-sub-1" })));
        let (status, _, body) = send(&api, request).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let id = RunId::parse(body["run_id"].as_str().unwrap()).unwrap();
        let run = api.store.get_run(&id).await.unwrap().unwrap();
        assert_eq!((run.caller.as_str(), run.owners.clone()), ("alice-sub-1", vec![Principal::User("alice-sub-1".into()), Principal::Admin]));

        // alice's run is hers; the spoofed identity gets no further reading it either.
        let path = format!("/runs/{id}");
        let (status, _, _) = send(&api, event("GET", &path, json!({}), None, jwt(json!({ "sub": "alice-sub-1" })))).await;
        assert_eq!(status, StatusCode::OK);
        let alice_token = signed_token("alice-sub-1", "a-secret-a-secret-a-secret-a-secret!");
        let (status, _, _) = send(&api, event("GET", &path, spoofing("alice-sub-1", &alice_token), None, jwt(json!({ "sub": "mallory" })))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "mallory's claims, whatever the headers say");
    }
    assert_eq!(api.dispatcher.dispatched().len(), 2);
}

#[tokio::test]
async fn group_claims_grant_what_is_shared_with_the_group_in_both_shapes_api_gateway_sends() {
    let api = api();
    let mut shared =
        RunRecord::new("wf".parse().unwrap(), json!({}), json!({}), "bob".parse().unwrap(), vec![Principal::Group("eng".into())], chrono::Utc::now());
    shared.access = Some(serde_json::from_value(json!({ "visibility": "SHARED", "shares": [{ "group": "eng", "role": "view" }] })).unwrap());
    api.store.create_run(&shared).await.unwrap();
    let path = format!("/runs/{}", shared.id);
    // API Gateway flattens array claims: Cognito's `cognito:groups` as `[a b]`, others as JSON.
    for claims in [json!({ "sub": "carol", "cognito:groups": "[ops eng]" }), json!({ "sub": "carol", "groups": "[\"eng\"]" })] {
        let (status, _, body) = send(&api, event("GET", &path, json!({}), None, jwt(claims.clone()))).await;
        assert_eq!(status, StatusCode::OK, "{claims}: {body}");
    }
    for claims in [json!({ "sub": "carol" }), json!({ "sub": "carol", "cognito:groups": "[ops]" })] {
        // A group header next to claims without the group changes nothing.
        let (status, _, _) =
            send(&api, event("GET", &path, json!({ "x-groups": "eng", "x-cognito-groups": "[eng]" }), None, jwt(claims.clone()))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{claims}");
    }
}

#[tokio::test]
async fn without_verified_claims_every_request_is_401_whatever_it_carries() {
    let api = api();
    let signed = signed_token("alice", "a-secret-a-secret-a-secret-a-secret!");
    let cases: Vec<(&str, Value, Option<Value>)> = vec![
        ("no authorizer in the context, an unsigned token", spoofing("alice", &unsigned_token("alice")), None),
        ("no authorizer in the context, a signed token", spoofing("alice", &signed), None),
        ("a Lambda authorizer's context, not a JWT one", spoofing("alice", &signed), Some(json!({ "lambda": { "sub": "alice", "user": "alice" } }))),
        ("JWT claims without a subject", json!({}), jwt(json!({ "cognito:groups": "[admin]", "username": "alice" }))),
        ("an empty subject", json!({}), jwt(json!({ "sub": "  " }))),
        ("no claims at all", json!({}), Some(json!({ "jwt": { "claims": null, "scopes": null } }))),
    ];
    for (case, headers, authorizer) in cases {
        let (status, response_headers, problem) = send(&api, event("POST", "/runs", headers, Some(&start_body()), authorizer)).await;
        assert_unauthorized(status, &response_headers, &problem, case);
    }
    // Not from API Gateway at all (no request context), with a well-signed bearer token.
    let request = http::Request::builder()
        .method("GET")
        .uri("/runs")
        .header("authorization", format!("Bearer {signed}"))
        .header("x-user", "alice")
        .body(axum::body::Body::empty())
        .unwrap();
    let response = app(api.state.clone()).oneshot(request).await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let problem: Value = serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_unauthorized(status, &headers, &problem, "no request context");
    assert!(api.dispatcher.dispatched().is_empty(), "nothing started");
}
