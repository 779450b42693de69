//! The HTTP API against in-memory ports, through the real router (`app(state).oneshot`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use axum::body::Body;
use chainrun_api::auth::{Authenticator, LOCAL_AUDIENCE, LOCAL_ISSUER};
use chainrun_api::{AppState, MAX_BODY_BYTES, app};
use chainrun_core::engine::{Engine, EngineConfig};
use chainrun_core::ids::RunId;
use chainrun_core::memory::{MemoryDispatcher, MemoryProgress, MemoryStore, Script, ScriptedModel};
use chainrun_core::ports::{Claim, Lease, RunStore};
use chainrun_core::pricing::ModelRegistry;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::sync::Arc;
use tower::ServiceExt;

const SECRET: &str = "test-secret-test-secret-test-secret!";

struct Api {
    store: Arc<MemoryStore>,
    progress: Arc<MemoryProgress>,
    dispatcher: Arc<MemoryDispatcher>,
    state: AppState,
}

fn api() -> Api {
    let store = Arc::new(MemoryStore::new());
    let progress = Arc::new(MemoryProgress::new());
    let dispatcher = Arc::new(MemoryDispatcher::new());
    let state = AppState {
        store: store.clone(),
        progress: progress.clone(),
        dispatcher: dispatcher.clone(),
        models: Arc::new(ModelRegistry::builtin()),
        auth: Authenticator::local(SECRET.as_bytes()),
    };
    Api { store, progress, dispatcher, state }
}

fn token_with(secret: &str, sub: &str, exp_offset: i64) -> String {
    let claims =
        json!({ "sub": sub, "groups": ["eng"], "iss": LOCAL_ISSUER, "aud": LOCAL_AUDIENCE, "exp": chrono::Utc::now().timestamp() + exp_offset });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn token(sub: &str) -> String {
    token_with(SECRET, sub, 3600)
}

impl Api {
    async fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Vec<u8>>) -> (StatusCode, http::HeaderMap, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.header("content-type", "application/json").body(body.map(Body::from).unwrap_or_else(Body::empty)).unwrap();
        let res = app(self.state.clone()).oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, headers, value)
    }

    async fn start(&self, user: &str, body: Value) -> (StatusCode, http::HeaderMap, Value) {
        self.call("POST", "/runs", Some(&token(user)), Some(body.to_string().into_bytes())).await
    }
}

fn sample() -> Value {
    json!({
        "workflow": {
            "name": "greet",
            "defaults": { "model": "amazon.nova-micro-v1:0" },
            "steps": [
                { "id": "hello", "type": "llm", "prompt": "HELLO {{ input.name }}" },
                { "id": "shout", "type": "llm", "prompt": "SHOUT {{ steps.hello.text }}" }
            ]
        },
        "input": { "name": "Ada" }
    })
}

#[tokio::test]
async fn starting_a_run_answers_202_stores_a_snapshot_and_dispatches_only_the_id() {
    let api = api();
    let (status, headers, body) = api.start("alice", sample()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = RunId::parse(body["run_id"].as_str().unwrap()).unwrap();
    assert_eq!(body["status"], "QUEUED");
    assert_eq!(body["links"]["run"], format!("/runs/{id}"));
    assert_eq!(body["links"]["events"], format!("/runs/{id}/events"));
    assert_eq!(headers["location"], format!("/runs/{id}"));
    assert_eq!(api.dispatcher.dispatched(), vec![id.clone()]);
    let run = api.store.get_run(&id).await.unwrap().unwrap();
    assert_eq!(run.definition, sample()["workflow"]);
    assert_eq!(run.input, json!({ "name": "Ada" }));
    assert_eq!(run.caller, "alice");
}

#[tokio::test]
async fn requests_without_a_valid_token_get_401() {
    let api = api();
    let body = Some(sample().to_string().into_bytes());
    for token in [
        None,
        Some("garbage".to_owned()),
        Some(token_with("another-secret-another-secret-xx!", "alice", 3600)),
        Some(token_with(SECRET, "alice", -3600)),
    ] {
        let (status, headers, problem) = api.call("POST", "/runs", token.as_deref(), body.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}: {problem}");
        assert_eq!(headers["content-type"], "application/problem+json");
        assert_eq!(problem["status"], 401);
    }
    assert!(api.dispatcher.dispatched().is_empty());
}

#[tokio::test]
async fn another_users_run_is_not_found() {
    let api = api();
    let (_, _, body) = api.start("alice", sample()).await;
    let path = format!("/runs/{}", body["run_id"].as_str().unwrap());
    let (status, _, _) = api.call("GET", &path, Some(&token("alice")), None).await;
    assert_eq!(status, StatusCode::OK);
    for path in [path.clone(), format!("{path}/events")] {
        let (status, _, problem) = api.call("GET", &path, Some(&token("mallory")), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
    }
    let (status, _, _) = api.call("GET", "/runs/not-an-id", Some(&token("alice")), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = api.call("GET", &format!("/runs/{}", RunId::new()), Some(&token("alice")), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn malformed_json_is_a_400_that_says_where_and_changes_nothing() {
    let api = api();
    let (status, headers, problem) = api.call("POST", "/runs", Some(&token("alice")), Some(b"{\"workflow\": {".to_vec())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(problem["title"], "Malformed JSON");
    assert!(problem["detail"].as_str().unwrap().contains("line 1"), "{problem}");
    assert!(api.dispatcher.dispatched().is_empty());
}

#[tokio::test]
async fn an_invalid_definition_is_a_400_listing_every_problem_by_step_and_field() {
    let api = api();
    let mut body = sample();
    body["workflow"]["steps"] = json!([
        { "id": "a", "type": "llm", "prompt": "{{ steps.b.text }}" },
        { "id": "b", "type": "llm", "prompt": "{{ steps.a.text }}" },
        { "id": "c", "type": "llm", "prompt": "x", "model": "acme.unknown-v1" },
        { "id": "d", "type": "llm", "prompt": "{{ input.x " }
    ]);
    let (status, _, problem) = api.start("alice", body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(problem["title"], "Invalid workflow");
    let problems = problem["problems"].as_array().unwrap();
    let has = |step: &str, field: &str| problems.iter().any(|p| p["step"] == step && p["field"] == field);
    assert!(has("c", "model") && has("d", "prompt"), "{problem}");
    assert!(problems.iter().any(|p| p["message"].as_str().unwrap().contains("cycle")), "{problem}");
    assert!(api.dispatcher.dispatched().is_empty(), "nothing dispatched");
}

#[tokio::test]
async fn an_input_that_breaks_the_input_schema_is_a_400_naming_where_and_starts_nothing() {
    let api = api();
    let mut body = sample();
    body["workflow"]["input_schema"] = json!({ "type": "object", "required": ["name"], "properties": { "name": { "type": "string" } } });
    body["input"] = json!({ "name": 42 });
    let (status, _, problem) = api.start("alice", body.clone()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    assert_eq!(problem["title"], "Invalid input");
    assert!(problem["detail"].as_str().unwrap().contains("/name"), "{problem}");
    assert!(api.dispatcher.dispatched().is_empty(), "nothing dispatched");
    body["input"] = json!({ "name": "Ada" });
    assert_eq!(api.start("alice", body).await.0, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn rejects_bodies_of_the_wrong_shape() {
    let api = api();
    let cases = [
        (json!({ "workflow": sample()["workflow"], "input": [1] }), "input must be a JSON object"),
        (json!({ "workflow": sample()["workflow"], "inputs": {} }), "unknown field `inputs`"),
        (json!({ "input": {} }), "missing field `workflow`"),
        (json!({ "workflow": sample()["workflow"], "options": { "turbo": true } }), "options"),
    ];
    for (body, expected) in cases {
        let (status, _, problem) = api.start("alice", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(problem["detail"].as_str().unwrap().contains(expected), "{problem}");
    }
    let (status, _, _) = api.call("POST", "/runs", Some(&token("alice")), Some(vec![b' '; MAX_BODY_BYTES + 1])).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(api.dispatcher.dispatched().is_empty());
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems() {
    let api = api();
    let (status, headers, _) = api.call("GET", "/nope", Some(&token("alice")), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(headers["content-type"], "application/problem+json");
    let (status, _, _) = api.call("DELETE", "/runs", Some(&token("alice")), None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn a_run_can_be_followed_by_cursor_snapshot_and_progress_feed() {
    let api = api();
    let (_, _, body) = api.start("alice", sample()).await;
    let id = RunId::parse(body["run_id"].as_str().unwrap()).unwrap();
    let (_, _, snapshot) = api.call("GET", &format!("/runs/{id}"), Some(&token("alice")), None).await;
    assert_eq!(snapshot["status"], "QUEUED");
    assert_eq!(snapshot["steps"].as_array().unwrap().iter().map(|s| s["status"].as_str().unwrap()).collect::<Vec<_>>(), ["PENDING", "PENDING"]);

    // Run it as the runner would.
    let model = Arc::new(ScriptedModel::new(vec![Script::reply("HELLO", "hi Ada"), Script::reply("SHOUT", "HI ADA")]));
    let engine = Engine::new(model, api.store.clone(), api.progress.clone(), Arc::new(ModelRegistry::builtin()), EngineConfig::default());
    let lease = Lease { holder: "r".into(), expires_at: chrono::Utc::now() + chrono::Duration::minutes(5) };
    let Claim::Acquired(run) = api.store.claim(&id, &lease, chrono::Utc::now()).await.unwrap() else { panic!() };
    engine.execute(*run, lease, None).await.unwrap();

    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let (status, _, page) = api.call("GET", &format!("/runs/{id}/events?after={after}&limit=2"), Some(&token("alice")), None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let events = page["events"].as_array().unwrap().clone();
        if events.is_empty() {
            break;
        }
        assert!(events.len() <= 2);
        after = page["last_seq"].as_u64().unwrap();
        seen.extend(events);
    }
    let seqs: Vec<u64> = seen.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "gap-free, no repeats");
    assert_eq!(seen.last().unwrap()["type"], "RUN_COMPLETED");

    let (_, _, snapshot) = api.call("GET", &format!("/runs/{id}"), Some(&token("alice")), None).await;
    assert_eq!(snapshot["status"], "COMPLETED");
    assert_eq!(snapshot["output"], json!({ "shout": "HI ADA" }));
    assert!(snapshot["totals"]["cost_pico_usd"].as_u64().unwrap() > 0);
    assert_eq!(snapshot["steps"][1]["text"], "HI ADA");

    let (_, _, feed) = api.call("GET", "/progress", Some(&token("alice")), None).await;
    let row = &feed["items"][0];
    assert_eq!((row["run_id"].as_str(), row["status"].as_str()), (Some(id.as_str()), Some("COMPLETED")));
    assert_eq!(row["last_seq"].as_u64(), Some(*seqs.last().unwrap()));
    assert_eq!(row["totals"], snapshot["totals"]);
    let (_, _, other) = api.call("GET", "/progress", Some(&token("mallory")), None).await;
    assert_eq!(other["items"], json!([]));
}
