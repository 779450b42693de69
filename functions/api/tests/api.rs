//! The HTTP API against in-memory ports, through the real router (`app(state).oneshot`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use axum::body::Body;
use chainrun_api::auth::Authenticator;
use chainrun_api::{AppState, MAX_BODY_BYTES, app};
use chainrun_core::engine::{Engine, EngineConfig};
use chainrun_core::ids::{RunId, StepId};
use chainrun_core::memory::{MemoryAnalytics, MemoryDailySpend, MemoryDispatcher, MemoryProgress, MemoryStore, Script, ScriptedModel};
use chainrun_core::money::Usd;
use chainrun_core::ports::{Analytics, Claim, DailySpend, KeyClaim, Lease, RunStore};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::spend::{DailyCaps, DayHold, Settlement};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::sync::Arc;
use tower::ServiceExt;

mod support;
use support::SECRET;

struct Api {
    store: Arc<MemoryStore>,
    progress: Arc<MemoryProgress>,
    dispatcher: Arc<MemoryDispatcher>,
    analytics: Arc<MemoryAnalytics>,
    daily: Arc<MemoryDailySpend>,
    state: AppState,
}

fn api() -> Api {
    let caps = DailyCaps::parse(None, Some(r#"{"alice": "0.01"}"#)).unwrap();
    let p = support::ports(Authenticator::local(SECRET.as_bytes()), caps);
    Api { store: p.store, progress: p.progress, dispatcher: p.dispatcher, analytics: p.analytics, daily: p.daily, state: p.state }
}

fn token_with(secret: &str, sub: &str, exp_offset: i64) -> String {
    support::token_signed(secret, sub, &["eng"], exp_offset)
}

fn token(sub: &str) -> String {
    token_with(SECRET, sub, 3600)
}

/// A token for `sub` in `groups`.
fn token_in(sub: &str, groups: &[&str]) -> String {
    support::token_signed(SECRET, sub, groups, 3600)
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
async fn a_runs_graph_lists_its_steps_with_their_edges_to_those_who_may_see_the_run() {
    let api = api();
    let (_, _, body) = api.start("alice", sample()).await;
    let path = format!("/runs/{}/graph", body["run_id"].as_str().unwrap());
    let (status, _, graph) = api.call("GET", &path, Some(&token("alice")), None).await;
    assert_eq!(status, StatusCode::OK, "{graph}");
    assert_eq!(graph["workflow"], "greet");
    assert_eq!(graph["steps"][0]["id"], "hello");
    assert_eq!(graph["steps"][0]["depends_on"], json!([]));
    assert_eq!(graph["steps"][1]["id"], "shout");
    assert_eq!(graph["steps"][1]["kind"], "llm");
    assert_eq!(graph["steps"][1]["depends_on"], json!(["hello"]), "a template reference is an edge");
    assert_eq!(graph["steps"][1]["model"], "amazon.nova-micro-v1:0");
    let (status, _, problem) = api.call("GET", &path, Some(&token("mallory")), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
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

// ---------------------------------------------------------------- history and analytics

impl Api {
    /// Starts a run as `user` and, like the runner, executes it and rolls it up.
    async fn run_to_end(&self, user: &str, body: Value, model: Arc<ScriptedModel>) -> RunId {
        let (status, _, accepted) = self.start(user, body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        let id = RunId::parse(accepted["run_id"].as_str().unwrap()).unwrap();
        let engine = Engine::new(model, self.store.clone(), self.progress.clone(), Arc::new(ModelRegistry::builtin()), EngineConfig::default());
        let lease = Lease { holder: "r".into(), expires_at: chrono::Utc::now() + chrono::Duration::minutes(5) };
        let Claim::Acquired(run) = self.store.claim(&id, &lease, chrono::Utc::now()).await.unwrap() else { panic!() };
        engine.execute(*run, lease, None).await.unwrap();
        let run = self.store.get_run(&id).await.unwrap().unwrap();
        self.analytics.record_run(&run, &self.store.get_steps(&id).await.unwrap()).await.unwrap();
        id
    }

    async fn get(&self, user: &str, path: &str) -> (StatusCode, Value) {
        let (status, _, body) = self.call("GET", path, Some(&token(user)), None).await;
        (status, body)
    }
}

fn named(name: &str) -> Value {
    let mut body = sample();
    body["workflow"]["name"] = json!(name);
    body
}

fn ids(page: &Value) -> Vec<String> {
    page["items"].as_array().unwrap().iter().map(|r| r["run_id"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn history_lists_the_runs_the_caller_may_see_newest_first_in_pages() {
    let api = api();
    let mut alice_runs = Vec::new();
    for _ in 0..3 {
        alice_runs.push(api.start("alice", named("greet")).await.2["run_id"].as_str().unwrap().to_owned());
    }
    let mallorys = api.start("mallory", named("greet")).await.2["run_id"].as_str().unwrap().to_owned();
    api.start("alice", named("other")).await;
    alice_runs.reverse();

    let (status, first) = api.get("alice", "/runs?workflow=greet&limit=2").await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(ids(&first), alice_runs[..2]);
    let next = first["next"].as_str().expect("a next cursor");
    let (_, second) = api.get("alice", &format!("/runs?workflow=greet&limit=2&next={next}")).await;
    assert_eq!(ids(&second), alice_runs[2..]);
    assert_eq!(second["next"], Value::Null);

    let item = &first["items"][0];
    assert_eq!((item["workflow"].as_str(), item["status"].as_str(), item["caller"].as_str()), (Some("greet"), Some("QUEUED"), Some("alice")));
    assert_eq!(item["totals"]["cost_pico_usd"], 0);
    assert!(item.get("input").is_none() && item.get("steps").is_none(), "a summary, not the snapshot");

    // Another user's runs never appear, whatever the workflow; `/runs` alone is one's own.
    let (_, theirs) = api.get("mallory", "/runs?workflow=greet").await;
    assert_eq!(ids(&theirs), std::slice::from_ref(&mallorys));
    let (_, mine) = api.get("alice", "/runs?limit=100").await;
    assert_eq!(mine["items"].as_array().unwrap().len(), 4);
    assert!(!ids(&mine).contains(&mallorys));
    let (_, none) = api.get("bob", "/runs?workflow=greet").await;
    assert_eq!((none["items"].clone(), none["next"].clone()), (json!([]), Value::Null));
}

#[tokio::test]
async fn history_and_analytics_refuse_bad_parameters_naming_them() {
    let api = api();
    let cases = [
        ("/runs?limit=0", "limit"),
        ("/runs?limit=101", "limit"),
        ("/runs?limit=ten", "limit"),
        ("/runs?next=not-a-cursor", "next"),
        ("/runs?next=bm90fGE", "next"),
        ("/runs?workflow=", "workflow"),
        ("/runs?workflows=greet", "workflows"),
        ("/analytics/costs?days=0", "days"),
        ("/analytics/costs?days=91", "days"),
        ("/analytics/costs?days=a%20week", "days"),
        ("/analytics/costs?scope=group:ops", "scope"),
        ("/analytics/costs?scope=admin", "scope"),
        ("/analytics/costs?since=2025-01-01", "since"),
    ];
    for (path, name) in cases {
        let (status, headers, problem) = api.call("GET", path, Some(&token("alice")), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {problem}");
        assert_eq!(headers["content-type"], "application/problem+json");
        assert!(problem["detail"].as_str().unwrap().contains(name), "{path}: {problem}");
    }
    let (status, _, _) = api.call("GET", "/analytics/costs", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = api.call("POST", "/analytics/costs", Some(&token("alice")), None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn cost_analytics_report_each_workflow_and_step_of_the_callers_runs() {
    let api = api();
    let model =
        Arc::new(ScriptedModel::new(vec![Script::reply("HELLO", "hi").with_usage(1_000, 10), Script::reply("SHOUT", "HI").with_usage(10, 3_000)]));
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(api.run_to_end("alice", named("greet"), model.clone()).await);
    }
    api.run_to_end("mallory", named("greet"), model.clone()).await;

    let (status, report) = api.get("alice", "/analytics/costs").await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!((report["days"].as_u64(), report["scope"].as_str()), (Some(7), Some("USER#alice")));
    let workflows = report["workflows"].as_array().unwrap();
    assert_eq!(workflows.len(), 1);
    let greet = &workflows[0];
    let mut total = 0u64;
    for id in &runs {
        total += api.store.get_run(id).await.unwrap().unwrap().totals.cost.pico();
    }
    assert_eq!((greet["workflow"].as_str(), greet["runs"].as_u64(), greet["failures"].as_u64()), (Some("greet"), Some(3), Some(0)));
    assert_eq!(greet["total_cost_pico_usd"].as_u64(), Some(total), "mallory's run is not in alice's costs");
    assert_eq!(greet["avg_cost_pico_usd"].as_u64(), Some(total / 3));
    assert_eq!(greet["failure_rate"], "0.0000");
    let steps: Vec<&str> = greet["steps"].as_array().unwrap().iter().map(|s| s["step_id"].as_str().unwrap()).collect();
    assert_eq!(steps, ["shout", "hello"], "3,000 output tokens cost more than 1,000 input tokens");
    let step_total: u64 = greet["steps"].as_array().unwrap().iter().map(|s| s["total_cost_pico_usd"].as_u64().unwrap()).sum();
    assert_eq!(step_total, total);
    assert_eq!(greet["steps"][0]["runs"], 3);
    // The same runs per day (all finished today), for the cost page's chart.
    let today = chrono::Utc::now().date_naive().to_string();
    assert_eq!(
        report["daily"],
        json!([{ "day": today, "workflow": "greet", "runs": 3, "failures": 0, "total_cost_usd": greet["total_cost_usd"], "total_cost_pico_usd": total }])
    );

    let (_, eng) = api.get("alice", "/analytics/costs?days=1&scope=group:eng").await;
    assert_eq!((eng["days"].as_u64(), eng["workflows"].clone()), (Some(1), json!([])), "runs are not owned by the group");
    let (_, bob) = api.get("bob", "/analytics/costs?days=90").await;
    assert_eq!(bob["workflows"], json!([]));
}

// ---------------------------------------------------------------- estimates

impl Api {
    async fn estimate(&self, user: &str, body: Value) -> (StatusCode, Value) {
        let (status, _, body) = self.call("POST", "/workflows/estimate", Some(&token(user)), Some(body.to_string().into_bytes())).await;
        (status, body)
    }
}

fn estimate_body() -> Value {
    let mut body = sample();
    body.as_object_mut().unwrap().remove("options");
    body
}

#[tokio::test]
async fn an_estimate_brackets_each_step_and_the_run_and_uses_the_callers_history() {
    let api = api();
    let (status, first) = api.estimate("alice", estimate_body()).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!((first["basis"].as_str(), first["history_runs"].as_u64()), (Some("heuristic"), Some(0)));
    let steps: Vec<&str> = first["steps"].as_array().unwrap().iter().map(|s| s["step_id"].as_str().unwrap()).collect();
    assert_eq!(steps, ["hello", "shout"]);
    let pico = |v: &Value| v["cost_pico_usd"].as_u64().unwrap();
    for s in first["steps"].as_array().unwrap() {
        assert!(pico(&s["min"]) <= pico(&s["expected"]) && pico(&s["expected"]) <= pico(&s["max"]), "{s}");
        assert_eq!(s["max"]["cost_usd"], json!(chainrun_core::money::Usd::from_pico(pico(&s["max"])).to_string()));
    }
    // hello: "HELLO Ada" is 9 bytes + 96 input tokens, 1024 output tokens at most (one
    // attempt of three: the default retry policy allows three).
    let hello = &first["steps"][0]["max"];
    assert_eq!(first["steps"][0]["max_basis"], "prompt", "a prompt reading only the input is rendered as it is");
    assert_eq!(hello["tokens"], 3 * (9 + 96 + 1024));
    assert_eq!(hello["cost_pico_usd"], 3 * ((9 + 96) * 35_000 + 1024 * 140_000));
    let total = &first["total"];
    assert_eq!(pico(&total["max"]), pico(hello) + pico(&first["steps"][1]["max"]));

    // After three runs, expected is what they cost on average.
    let model =
        Arc::new(ScriptedModel::new(vec![Script::reply("HELLO", "hi").with_usage(1_000, 10), Script::reply("SHOUT", "HI").with_usage(10, 3_000)]));
    let mut spent = 0;
    for _ in 0..3 {
        let id = api.run_to_end("alice", sample(), model.clone()).await;
        spent += api.store.get_run(&id).await.unwrap().unwrap().totals.cost.pico();
    }
    let (status, after) = api.estimate("alice", estimate_body()).await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!((after["basis"].as_str(), after["history_runs"].as_u64()), (Some("history"), Some(3)));
    assert_eq!(pico(&after["total"]["expected"]), spent / 3);
    assert!(pico(&after["total"]["min"]) * 3 <= spent && spent <= pico(&after["total"]["max"]) * 3);
    let (_, bob) = api.estimate("bob", estimate_body()).await;
    assert_eq!(bob["basis"], "heuristic", "alice's runs are not bob's history");
}

#[tokio::test]
async fn an_invalid_definition_gets_the_same_400_from_estimate_as_from_starting_a_run() {
    let api = api();
    let mut body = estimate_body();
    body["workflow"]["steps"] = json!([
        { "id": "a", "type": "llm", "prompt": "{{ steps.b.text }}" },
        { "id": "b", "type": "llm", "prompt": "{{ steps.a.text }}" },
        { "id": "c", "type": "llm", "prompt": "x", "model": "acme.unknown-v1" }
    ]);
    let (status, problem) = api.estimate("alice", body.clone()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, _, from_runs) = api.start("alice", body).await;
    assert_eq!(problem, from_runs);
    assert!(problem["problems"].as_array().unwrap().iter().any(|p| p["step"] == "c" && p["field"] == "model"), "{problem}");
    let (status, problem) = api.estimate("alice", json!({ "workflow": sample()["workflow"], "input": [] })).await;
    assert_eq!((status, problem["title"].as_str()), (StatusCode::BAD_REQUEST, Some("Invalid input")));
    let (status, _, _) = api.call("POST", "/workflows/estimate", None, Some(estimate_body().to_string().into_bytes())).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(api.dispatcher.dispatched().is_empty(), "an estimate starts nothing");
}

// ---------------------------------------------------------------- daily spend

#[tokio::test]
async fn the_caller_sees_todays_spend_against_their_daily_cap() {
    let api = api();
    let today = chrono::Utc::now().date_naive();
    // alice's cap is $0.01: $0.002 charged, $0.003 still held by a call in flight, $0.001
    // lost with a runner that died.
    let usd = |s: &str| Usd::parse_decimal(s).unwrap();
    let run = RunId::new();
    let hold = |attempt: u32, amount: &str| DayHold {
        run: run.clone(),
        step: StepId::parse("a").unwrap(),
        item: None,
        attempt,
        holder: "runner".into(),
        owner: "alice".into(),
        day: today,
        amount: usd(amount),
    };
    api.daily.reserve(&hold(1, "0.004"), usd("0.01")).await.unwrap().unwrap();
    api.daily.settle(&hold(1, "0.004"), Settlement::Charged(usd("0.002"))).await.unwrap();
    api.daily.reserve(&hold(2, "0.001"), usd("0.01")).await.unwrap().unwrap();
    api.daily.settle(&hold(2, "0.001"), Settlement::Lost).await.unwrap();
    api.daily.reserve(&hold(3, "0.003"), usd("0.01")).await.unwrap().unwrap();
    let (status, _, body) = api.call("GET", "/analytics/spend", Some(&token("alice")), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((body["owner"].as_str(), body["day"].as_str()), (Some("alice"), Some(today.to_string().as_str())));
    let pairs = [("cap", "0.01"), ("charged", "0.002"), ("held", "0.003"), ("lost", "0.001"), ("remaining", "0.004")];
    for (name, value) in pairs {
        assert_eq!(body[format!("{name}_usd")], value, "{name}: {body}");
        assert_eq!(body[format!("{name}_pico_usd")], usd(value).pico(), "{name}: {body}");
    }
    // bob has no cap (and spent nothing): no cap, nothing remaining to speak of.
    let (_, _, bob) = api.call("GET", "/analytics/spend", Some(&token("bob")), None).await;
    assert_eq!((bob["cap_usd"].clone(), bob["remaining_usd"].clone(), bob["charged_usd"].clone()), (Value::Null, Value::Null, json!("0")));
    let (status, _, _) = api.call("GET", "/analytics/spend", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

// ---------------------------------------------------------------- documents too large to inline

#[tokio::test]
async fn outputs_too_large_to_inline_are_linked_and_served_whole() {
    let api = api();
    let reply = "long answer ".repeat(25_000); // 300 KB: over the 256 KiB inlined per document
    let body = json!({
        "workflow": {
            "name": "long",
            "defaults": { "model": "amazon.nova-micro-v1:0" },
            "steps": [
                { "id": "big", "type": "llm", "prompt": "WRITE LONG", "max_tokens": 10000 },
                { "id": "small", "type": "llm", "prompt": "SUM {{ steps.big.text | length }}" }
            ],
            "output": "{{ steps.big.text }}"
        }
    });
    let model = Arc::new(ScriptedModel::new(vec![Script::reply("WRITE LONG", &reply), Script::reply("SUM", "short")]));
    let id = api.run_to_end("alice", body, model).await;

    let (status, run) = api.get("alice", &format!("/runs/{id}")).await;
    assert_eq!((status, run["status"].as_str()), (StatusCode::OK, Some("COMPLETED")), "{run}");
    let bytes = json!(reply).to_string().len() as u64;
    assert_eq!((&run["output"], &run["output_ref"]), (&Value::Null, &json!({ "href": format!("/runs/{id}/output"), "bytes": bytes })));
    let big = &run["steps"][0];
    assert_eq!((&big["output"], &big["text"]), (&Value::Null, &Value::Null));
    assert_eq!(big["output_ref"]["href"], format!("/runs/{id}/steps/big/output"));
    assert_eq!(big["text_ref"], json!({ "href": format!("/runs/{id}/steps/big/text"), "bytes": bytes }));
    let small = &run["steps"][1];
    assert_eq!((small["text"].as_str(), small.get("text_ref")), (Some("short"), None), "small documents stay inline");

    // Each link serves the document whole.
    assert_eq!(api.get("alice", &format!("/runs/{id}/output")).await, (StatusCode::OK, json!(reply)));
    assert_eq!(api.get("alice", &format!("/runs/{id}/steps/big/output")).await, (StatusCode::OK, json!(reply)));
    let (status, headers, text) = api.call("GET", &format!("/runs/{id}/steps/big/text"), Some(&token("alice")), None).await;
    assert_eq!((status, headers["content-type"].to_str().unwrap()), (StatusCode::OK, "text/plain; charset=utf-8"));
    assert_eq!(text, Value::String(reply.clone()));

    // The end event links to the output too rather than carrying 300 KB.
    let (_, events) = api.get("alice", &format!("/runs/{id}/events?limit=100")).await;
    let end = events["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!((end["type"].as_str(), &end["data"]["output"]), (Some("RUN_COMPLETED"), &Value::Null), "{end}");
    assert_eq!(end["data"]["output_ref"]["href"], format!("/runs/{id}/output"));

    // What is not there, or not the caller's, is a 404 that says so.
    for (user, path, needle) in [
        ("alice", format!("/runs/{id}/steps/nope/output"), "no checkpoint of step"),
        ("alice", format!("/runs/{id}/steps/big/bogus"), "`output` and a `text`"),
        ("mallory", format!("/runs/{id}/output"), "no run"),
        ("mallory", format!("/runs/{id}/steps/big/text"), "no run"),
    ] {
        let (status, problem) = api.get(user, &path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {problem}");
        assert!(problem["detail"].as_str().unwrap().contains(needle), "{path}: {problem}");
    }
}

#[tokio::test]
async fn a_run_without_an_output_says_so() {
    let api = api();
    let (_, _, accepted) = api.start("alice", sample()).await;
    let id = accepted["run_id"].as_str().unwrap();
    let (status, problem) = api.get("alice", &format!("/runs/{id}/output")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(problem["detail"].as_str().unwrap().contains("has no output (it is QUEUED)"), "{problem}");
}

// ---------------------------------------------------------------- control

#[tokio::test]
async fn cancelling_a_run_records_who_asked_hands_it_to_the_runner_and_repeats_safely() {
    let api = api();
    let (_, _, accepted) = api.start("alice", sample()).await;
    let id = accepted["run_id"].as_str().unwrap().to_owned();
    let dispatched = api.dispatcher.events().len();

    let body = json!({ "reason": "wrong customer" }).to_string().into_bytes();
    let (status, _, cancelled) = api.call("POST", &format!("/runs/{id}/cancel"), Some(&token("alice")), Some(body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{cancelled}");
    assert_eq!((cancelled["control"]["kind"].as_str(), cancelled["control"]["by"].as_str()), (Some("cancel"), Some("alice")));
    assert_eq!(cancelled["control"]["reason"], "wrong customer");
    let sent = api.dispatcher.events();
    assert_eq!(sent.len(), dispatched + 1, "the runner is handed the run to end it");
    assert_eq!(serde_json::to_value(sent.last().unwrap()).unwrap()["cause"], "control");

    // Again (a retry, or a second click): the first request stands, nothing more is sent.
    let (status, _, again) = api.call("POST", &format!("/runs/{id}/cancel"), Some(&token("alice")), None).await;
    assert_eq!((status, &again["control"]), (StatusCode::ACCEPTED, &cancelled["control"]));
    assert_eq!(api.dispatcher.events().len(), dispatched + 1);
    let (_, run) = api.get("alice", &format!("/runs/{id}")).await;
    assert_eq!(run["control"], cancelled["control"]);

    // The runner ends it; a cancel after that is a conflict that says why.
    let engine = Engine::new(
        Arc::new(ScriptedModel::new(vec![])),
        api.store.clone(),
        api.progress.clone(),
        Arc::new(ModelRegistry::builtin()),
        EngineConfig::default(),
    );
    let lease = Lease { holder: "r".into(), expires_at: chrono::Utc::now() + chrono::Duration::minutes(5) };
    let Claim::Acquired(claimed) = api.store.claim(&RunId::parse(&id).unwrap(), &lease, chrono::Utc::now()).await.unwrap() else { panic!() };
    engine.cancel_run(*claimed, &lease).await.unwrap();
    let (status, _, problem) = api.call("POST", &format!("/runs/{id}/cancel"), Some(&token("alice")), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("has already ended (CANCELLED)"), "{problem}");
}

#[tokio::test]
async fn a_cancel_of_someone_elses_or_no_run_or_with_a_bad_body_changes_nothing() {
    let api = api();
    let (_, _, accepted) = api.start("alice", sample()).await;
    let id = accepted["run_id"].as_str().unwrap().to_owned();
    for (user, path, body, expected) in [
        ("mallory", format!("/runs/{id}/cancel"), None, StatusCode::NOT_FOUND),
        ("alice", format!("/runs/{}/cancel", RunId::new()), None, StatusCode::NOT_FOUND),
        ("alice", "/runs/not-a-run/cancel".to_owned(), None, StatusCode::NOT_FOUND),
        ("alice", format!("/runs/{id}/cancel"), Some(b"{\"why\": 1}".to_vec()), StatusCode::BAD_REQUEST),
        ("alice", format!("/runs/{id}/cancel"), Some(b"{not json".to_vec()), StatusCode::BAD_REQUEST),
        ("alice", format!("/runs/{id}/cancel"), Some(json!({ "reason": "x".repeat(1001) }).to_string().into_bytes()), StatusCode::BAD_REQUEST),
    ] {
        let (status, _, problem) = api.call("POST", &path, Some(&token(user)), body).await;
        assert_eq!(status, expected, "{user} {path}: {problem}");
    }
    let (status, _, _) = api.call("GET", &format!("/runs/{id}/cancel"), Some(&token("alice")), None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let run = api.store.get_run(&RunId::parse(&id).unwrap()).await.unwrap().unwrap();
    assert_eq!(run.control, None, "nothing was recorded");
}

#[tokio::test]
async fn a_paused_run_waits_shows_what_for_and_resumes_once() {
    let api = api();
    let (_, _, accepted) = api.start("alice", sample()).await;
    let id = accepted["run_id"].as_str().unwrap().to_owned();
    let body = json!({ "reason": "budget review" }).to_string().into_bytes();
    let (status, _, paused) = api.call("POST", &format!("/runs/{id}/pause"), Some(&token("alice")), Some(body)).await;
    assert_eq!((status, paused["control"]["kind"].as_str()), (StatusCode::ACCEPTED, Some("pause")), "{paused}");
    let (status, _, again) = api.call("POST", &format!("/runs/{id}/pause"), Some(&token("alice")), None).await;
    assert_eq!((status, &again["control"]), (StatusCode::ACCEPTED, &paused["control"]), "a repeat is the same request");

    // The runner acts on it: nothing starts, the run waits.
    let engine = Engine::new(
        Arc::new(ScriptedModel::new(vec![])),
        api.store.clone(),
        api.progress.clone(),
        Arc::new(ModelRegistry::builtin()),
        EngineConfig::default(),
    );
    let lease = Lease { holder: "r".into(), expires_at: chrono::Utc::now() + chrono::Duration::minutes(5) };
    let Claim::Acquired(claimed) = api.store.claim(&RunId::parse(&id).unwrap(), &lease, chrono::Utc::now()).await.unwrap() else { panic!() };
    assert_eq!(engine.execute(*claimed, lease, None).await.unwrap(), chainrun_core::engine::Outcome::Waiting);

    let (_, run) = api.get("alice", &format!("/runs/{id}")).await;
    assert_eq!(run["status"], "AWAITING_INPUT");
    assert_eq!((run["waiting"]["kind"].as_str(), run["waiting"]["by"].as_str()), (Some("paused"), Some("alice")), "{run}");
    let (_, feed) = api.get("alice", "/progress").await;
    assert_eq!(feed["items"][0]["status"], "AWAITING_INPUT");
    let (status, _, problem) = api.call("POST", &format!("/runs/{id}/pause"), Some(&token("alice")), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(problem["detail"].as_str().unwrap().contains("already paused"), "{problem}");

    for (user, body, expected) in [("mallory", None, StatusCode::NOT_FOUND), ("alice", Some(b"{\"step\": 1}".to_vec()), StatusCode::BAD_REQUEST)] {
        let (status, _, problem) = api.call("POST", &format!("/runs/{id}/resume"), Some(&token(user)), body).await;
        assert_eq!(status, expected, "{user}: {problem}");
    }
    let dispatched = api.dispatcher.events().len();
    let (status, _, resumed) = api.call("POST", &format!("/runs/{id}/resume"), Some(&token("alice")), Some(b"{}".to_vec())).await;
    assert_eq!((status, resumed["status"].as_str(), resumed["resumed"]["by"].as_str()), (StatusCode::ACCEPTED, Some("QUEUED"), Some("alice")));
    let sent = api.dispatcher.events();
    assert_eq!((sent.len(), serde_json::to_value(sent.last().unwrap()).unwrap()["cause"].as_str()), (dispatched + 1, Some("resume")));
    let (status, _, problem) = api.call("POST", &format!("/runs/{id}/resume"), Some(&token("alice")), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(problem["detail"].as_str().unwrap().contains("is not waiting (QUEUED)"), "{problem}");
}

fn reviewed() -> Value {
    json!({
        "workflow": {
            "name": "reviewed",
            "defaults": { "model": "amazon.nova-micro-v1:0" },
            "steps": [
                { "id": "draft", "type": "llm", "prompt": "DRAFT" },
                { "id": "check", "type": "review", "show": "Send? {{ steps.draft.text }}", "reviewers": ["user:bob"] },
                { "id": "send", "type": "llm", "prompt": "SEND {{ steps.check.text }}" }
            ]
        }
    })
}

impl Api {
    /// Runs `id` as the runner would, until it ends or waits.
    async fn execute(&self, id: &str, model: Arc<ScriptedModel>) -> chainrun_core::engine::Outcome {
        let engine = Engine::new(model, self.store.clone(), self.progress.clone(), Arc::new(ModelRegistry::builtin()), EngineConfig::default());
        let lease = Lease { holder: RunId::new().to_string(), expires_at: chrono::Utc::now() + chrono::Duration::minutes(5) };
        let Claim::Acquired(run) = self.store.claim(&RunId::parse(id).unwrap(), &lease, chrono::Utc::now()).await.unwrap() else { panic!() };
        engine.execute(*run, lease, None).await.unwrap()
    }
}

#[tokio::test]
async fn a_reviewer_sees_what_to_review_and_decides_once_and_only_reviewers_may() {
    let api = api();
    let (_, _, accepted) = api.start("alice", reviewed()).await;
    let id = accepted["run_id"].as_str().unwrap().to_owned();
    let model = || Arc::new(ScriptedModel::new(vec![Script::reply("DRAFT", "hello"), Script::reply("SEND", "sent")]));
    assert_eq!(api.execute(&id, model()).await, chainrun_core::engine::Outcome::Waiting);

    // The reviewer sees the run, what it waits for, and the content in their feed.
    let (status, run) = api.get("bob", &format!("/runs/{id}")).await;
    assert_eq!((status, run["status"].as_str(), run["waiting"]["kind"].as_str()), (StatusCode::OK, Some("AWAITING_INPUT"), Some("review")), "{run}");
    let check = run["steps"].as_array().unwrap().iter().find(|s| s["id"] == "check").unwrap().clone();
    assert_eq!((check["status"].as_str(), check["output"].as_str()), (Some("WAITING"), Some("Send? hello")));
    let (_, feed) = api.get("bob", "/progress").await;
    assert_eq!(feed["items"][0]["status"], "AWAITING_INPUT");
    assert_eq!((feed["items"][0]["waiting"]["kind"].as_str(), &feed["items"][0]["waiting"]["steps"]), (Some("review"), &json!(["check"])));

    let resume = |user: &'static str, body: Value| {
        let path = format!("/runs/{id}/resume");
        let api = &api;
        async move { api.call("POST", &path, Some(&token(user)), Some(body.to_string().into_bytes())).await }
    };
    // A plain resume does not decide anything: it says what to send.
    let (status, _, problem) = resume("alice", json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("waits for review decisions on check"), "{problem}");
    // Not a reviewer: no such review for them. Bad bodies: 400 naming the field.
    let (status, _, problem) = resume("alice", json!({ "step": "check", "decision": "approve" })).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
    for (body, needle) in [
        (json!({ "step": "check" }), "decision"),
        (json!({ "step": "check", "decision": "edit" }), "output"),
        (json!({ "step": "check", "decision": "approve", "output": "x" }), "only an edit"),
        (json!({ "step": "check", "decision": "maybe" }), "unknown variant"),
        (json!({ "decision": "approve" }), "name its `step`"),
    ] {
        let (status, _, problem) = resume("bob", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {problem}");
        assert!(problem["detail"].as_str().unwrap().contains(needle), "{body}: {problem}");
    }
    let (status, _, problem) = resume("bob", json!({ "step": "send", "decision": "approve" })).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "not a review step: {problem}");

    let dispatched = api.dispatcher.events().len();
    let edit = json!({ "step": "check", "decision": "edit", "output": "Send? hello, kindly", "comment": "softer" });
    let (status, _, decided) = resume("bob", edit.clone()).await;
    assert_eq!((status, decided["decision"]["by"].as_str()), (StatusCode::ACCEPTED, Some("bob")), "{decided}");
    assert_eq!(api.dispatcher.events().len(), dispatched + 1, "the waiting run is handed to a runner");
    // The same decision again is answered as the first; a different one is a conflict.
    let (status, _, again) = resume("bob", edit).await;
    assert_eq!((status, &again["decision"]), (StatusCode::ACCEPTED, &decided["decision"]));
    let (status, _, problem) = resume("bob", json!({ "step": "check", "decision": "reject" })).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(problem["detail"].as_str().unwrap().contains("already decided: Edit by bob"), "{problem}");

    assert_eq!(api.execute(&id, model()).await, chainrun_core::engine::Outcome::Finished(chainrun_core::run::RunStatus::Completed));
    let (_, run) = api.get("alice", &format!("/runs/{id}")).await;
    let send = run["steps"].as_array().unwrap().iter().find(|s| s["id"] == "send").unwrap().clone();
    assert_eq!(send["status"], "COMPLETED");
    let (status, _, problem) = resume("bob", json!({ "step": "check", "decision": "approve" })).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
}

#[tokio::test]
async fn run_options_take_auto_approve_and_refuse_anything_else_by_name() {
    let api = api();
    let mut body = reviewed();
    body["options"] = json!({ "auto_approve": true });
    let (status, _, accepted) = api.start("alice", body.clone()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let id = accepted["run_id"].as_str().unwrap();
    assert!(api.store.get_run(&RunId::parse(id).unwrap()).await.unwrap().unwrap().options.auto_approve);
    body["options"] = json!({ "auto_aprove": true });
    let (status, _, problem) = api.start("alice", body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(problem["detail"].as_str().unwrap().contains("options: unknown field `auto_aprove`"), "{problem}");
}

// ---------------------------------------------------------------- idempotency keys

impl Api {
    async fn post_keyed(&self, user: &str, path: &str, key: &str, body: &Value) -> (StatusCode, http::HeaderMap, Value) {
        let req = Request::builder()
            .method("POST")
            .uri(path)
            .header("authorization", format!("Bearer {}", token(user)))
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(Body::from(body.to_string()))
            .unwrap();
        let res = app(self.state.clone()).oneshot(req).await.unwrap();
        let (status, headers) = (res.status(), res.headers().clone());
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (status, headers, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
}

#[tokio::test]
async fn a_start_repeated_with_its_idempotency_key_starts_one_run_and_answers_the_same() {
    let api = api();
    let (status, headers, first) = api.post_keyed("alice", "/runs", "start-1", &sample()).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(headers.get("idempotent-replayed").is_none());
    let (status, headers, again) = api.post_keyed("alice", "/runs", "start-1", &sample()).await;
    assert_eq!((status, &again), (StatusCode::ACCEPTED, &first), "the same answer, the same run");
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(api.dispatcher.events().len(), 1, "dispatched once");
    let (_, page) = api.get("alice", "/runs").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "one run stored");

    // The key is the caller's: bob's same key is his own request.
    let (status, _, bobs) = api.post_keyed("bob", "/runs", "start-1", &sample()).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_ne!(bobs["run_id"], first["run_id"]);
    // The same key for another request is refused and starts nothing.
    let mut other = sample();
    other["input"]["name"] = json!("Grace");
    let (status, _, problem) = api.post_keyed("alice", "/runs", "start-1", &other).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("different request"), "{problem}");
    // A refused request's answer is kept too; a malformed key is a 400.
    let bad = json!({ "workflow": { "name": "x", "steps": [] } });
    let (first_bad, _, _) = api.post_keyed("alice", "/runs", "bad-1", &bad).await;
    let (again_bad, headers, _) = api.post_keyed("alice", "/runs", "bad-1", &bad).await;
    assert_eq!((first_bad, again_bad, headers["idempotent-replayed"].to_str().unwrap()), (StatusCode::BAD_REQUEST, StatusCode::BAD_REQUEST, "true"));
    let (status, _, problem) = api.post_keyed("alice", "/runs", "with space", &sample()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    assert_eq!(api.dispatcher.events().len(), 2, "alice's and bob's runs only");
}

#[tokio::test]
async fn a_control_call_repeated_with_its_idempotency_key_is_answered_once() {
    let api = api();
    let (_, _, accepted) = api.start("alice", sample()).await;
    let id = accepted["run_id"].as_str().unwrap();
    let (status, _, first) = api.post_keyed("alice", &format!("/runs/{id}/cancel"), "cancel-1", &json!({ "reason": "r" })).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, headers, again) = api.post_keyed("alice", &format!("/runs/{id}/cancel"), "cancel-1", &json!({ "reason": "r" })).await;
    assert_eq!((status, &again, headers["idempotent-replayed"].to_str().unwrap()), (StatusCode::ACCEPTED, &first, "true"));
}

struct Then(chrono::DateTime<chrono::Utc>);

impl chainrun_core::durability::Clock for Then {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.0
    }
}

#[tokio::test]
async fn a_decision_after_the_deadline_is_refused_saying_what_the_deadline_does() {
    let api = api();
    let mut body = reviewed();
    body["workflow"]["steps"][1]["timeout"] = json!("1h");
    body["workflow"]["steps"][1]["on_timeout"] = json!({ "escalate_to": ["group:leads"], "timeout": "1h", "then": "approve" });
    let (_, _, accepted) = api.start("alice", body).await;
    let id = accepted["run_id"].as_str().unwrap().to_owned();
    // The review started waiting two hours ago: its one-hour deadline has passed.
    let model = Arc::new(ScriptedModel::new(vec![Script::reply("DRAFT", "hello")]));
    let engine = Engine::new(model, api.store.clone(), api.progress.clone(), Arc::new(ModelRegistry::builtin()), EngineConfig::default())
        .with_clock(Arc::new(Then(chrono::Utc::now() - chrono::Duration::hours(2))));
    let lease = Lease { holder: "r".into(), expires_at: chrono::Utc::now() + chrono::Duration::minutes(5) };
    let Claim::Acquired(run) = api.store.claim(&RunId::parse(&id).unwrap(), &lease, chrono::Utc::now()).await.unwrap() else { panic!() };
    assert_eq!(engine.execute(*run, lease, None).await.unwrap(), chainrun_core::engine::Outcome::Waiting);

    let dispatched = api.dispatcher.events().len();
    let decision = json!({ "step": "check", "decision": "approve" }).to_string().into_bytes();
    let (status, _, problem) = api.call("POST", &format!("/runs/{id}/resume"), Some(&token("bob")), Some(decision)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("its deadline passed at") && detail.contains("it hands the review to group:leads"), "{detail}");
    let sent = api.dispatcher.events();
    assert_eq!((sent.len(), serde_json::to_value(sent.last().unwrap()).unwrap()["cause"].as_str()), (dispatched + 1, Some("sweep")));
    // The escalation's reviewers can see the run from the start.
    let (status, _, _) = api.call("GET", &format!("/runs/{id}"), Some(&token_in("carol", &["leads"])), None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_run_waiting_for_its_budget_resumes_only_with_a_raise_which_is_recorded() {
    let api = api();
    let body = json!({
        "workflow": {
            "name": "budgeted",
            "defaults": { "model": "amazon.nova-micro-v1:0", "max_tokens": 100 },
            "budget": { "max_total_tokens": 400, "on_exceeded": "pause" },
            "steps": [
                { "id": "a", "type": "llm", "prompt": "FIRST" },
                { "id": "b", "type": "llm", "prompt": "SECOND {{ steps.a.text }}" }
            ]
        }
    });
    let (_, _, accepted) = api.start("alice", body).await;
    let id = accepted["run_id"].as_str().unwrap().to_owned();
    let model = Arc::new(ScriptedModel::new(vec![Script::reply("FIRST", &"word ".repeat(60))]));
    assert_eq!(api.execute(&id, model).await, chainrun_core::engine::Outcome::Waiting);
    let (_, run) = api.get("alice", &format!("/runs/{id}")).await;
    assert_eq!(run["waiting"]["kind"], "budget", "{run}");

    let resume = |body: Option<Value>| {
        let path = format!("/runs/{id}/resume");
        let api = &api;
        async move { api.call("POST", &path, Some(&token("alice")), body.map(|b| b.to_string().into_bytes())).await }
    };
    let (status, _, problem) = resume(None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("waits for a larger budget"), "{problem}");
    for (body, needle) in [
        (json!({ "budget": { "max_total_tokens": 100 } }), "only raise"),
        (json!({ "budget": { "max_cost_usd": "0.01" } }), "only raise"),
        (json!({ "budget": { "max_total_tokens": "lots" } }), "max_total_tokens"),
        (json!({ "step": "a", "budget": { "max_total_tokens": 1000 } }), "without a `step`"),
        (json!({ "budget": {} }), "name the limits to raise"),
        (json!({ "budget": { "max_total_tokens": 1000, "on_exceeded": "fail" } }), "limits only"),
    ] {
        let (status, _, problem) = resume(Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {problem}");
        assert!(problem["detail"].as_str().unwrap().contains(needle), "{body}: {problem}");
    }
    let (status, _, resumed) = resume(Some(json!({ "budget": { "max_total_tokens": 1000 } }))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{resumed}");
    assert_eq!(resumed["resumed"]["budget"]["from"]["max_total_tokens"], 400);
    assert_eq!(resumed["resumed"]["budget"]["to"]["max_total_tokens"], 1000);
    let stored = api.store.get_run(&RunId::parse(&id).unwrap()).await.unwrap().unwrap();
    assert_eq!(stored.budget_raises.len(), 1);
}

#[tokio::test]
async fn an_idempotency_key_is_refused_while_its_first_request_runs_and_freed_by_a_server_error() {
    use axum::routing::post;
    let api = api();
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // A route that fails once with a 503, then answers: behind the real middleware.
    let counted = failures.clone();
    let flaky = axum::Router::new()
        .route(
            "/flaky",
            post(move || {
                let counted = counted.clone();
                async move {
                    if counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::ACCEPTED
                    }
                }
            }),
        )
        .layer(axum::middleware::from_fn_with_state(api.state.clone(), chainrun_api::idempotency::keyed))
        .with_state(api.state.clone());
    let send = |key: &'static str| {
        let req = Request::builder()
            .method("POST")
            .uri("/flaky")
            .header("authorization", format!("Bearer {}", token("alice")))
            .header("idempotency-key", key)
            .body(Body::from("{}"))
            .unwrap();
        flaky.clone().oneshot(req)
    };
    assert_eq!(send("k-503").await.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
    let retried = send("k-503").await.unwrap();
    assert_eq!(retried.status(), StatusCode::ACCEPTED, "a 5xx freed the key: the retry acted anew");
    assert!(retried.headers().get("idempotent-replayed").is_none());
    assert_eq!(failures.load(std::sync::atomic::Ordering::SeqCst), 2);

    // A key whose first request is still being handled (claimed, not answered): 409, and
    // nothing runs.
    let body = sample().to_string();
    let fingerprint: String = {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new().chain_update(b"POST /runs\n").chain_update(body.as_bytes()).finalize();
        digest.iter().map(|b| format!("{b:02x}")).collect()
    };
    assert_eq!(api.state.idempotency.begin("alice", "k-busy", &fingerprint, chrono::Utc::now()).await.unwrap(), KeyClaim::New);
    let (status, _, problem) = api.post_keyed("alice", "/runs", "k-busy", &sample()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("still being handled"), "{problem}");
    assert!(api.dispatcher.events().is_empty(), "no run was started");
}

#[tokio::test]
async fn a_run_view_inlines_at_most_four_mib_of_documents_and_links_the_rest() {
    let api = api();
    let steps: Vec<Value> =
        (0..14).map(|i| json!({ "id": format!("s{i}"), "type": "llm", "prompt": format!("PART {i}"), "max_tokens": 10000 })).collect();
    let body = json!({ "workflow": { "name": "wide", "defaults": { "model": "amazon.nova-micro-v1:0" }, "steps": steps, "output": "done" } });
    // 14 replies of 200,000 bytes: each under the 256 KiB a document may have inline, 2.8 MB in all.
    let model = Arc::new(ScriptedModel::new(vec![Script::reply("PART", &"x".repeat(200_000))]));
    let id = api.run_to_end("alice", body, model).await;
    let (status, run) = api.get("alice", &format!("/runs/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    let steps = run["steps"].as_array().unwrap();
    // Output and text of each step are 200,002 bytes as JSON: 20 of them fit 4 MiB.
    let inline = steps.iter().flat_map(|s| [&s["output"], &s["text"]]).filter(|d| d.is_string()).count();
    let linked = steps.iter().flat_map(|s| [&s["output_ref"], &s["text_ref"]]).filter(|d| d.is_object()).count();
    assert_eq!((inline, linked), (20, 8), "inlined in step order while they fit, then linked");
    assert!(serde_json::to_vec(&run).unwrap().len() < 6 * 1024 * 1024, "the answer fits what Lambda may return");
}

// ---------------------------------------------------------------- revisions

/// `a` feeds `b` feeds `c`; `d` reads only `a`: retrying `b` must run `b` and `c` again, no more.
fn diamond() -> Value {
    json!({
        "workflow": {
            "name": "chain",
            "defaults": { "model": "amazon.nova-micro-v1:0" },
            "steps": [
                { "id": "a", "type": "llm", "prompt": "EXTRACT" },
                { "id": "b", "type": "llm", "prompt": "CLASSIFY {{ steps.a.text }}" },
                { "id": "c", "type": "llm", "prompt": "RESPOND {{ steps.b.text }}" },
                { "id": "d", "type": "llm", "prompt": "TAG {{ steps.a.text }}" }
            ],
            "output": "{{ steps.c.text }} / {{ steps.d.text }}"
        }
    })
}

fn chain_model(classified: &str) -> Arc<ScriptedModel> {
    Arc::new(ScriptedModel::new(vec![
        Script::reply("EXTRACT", "order 42").with_usage(100, 10),
        Script::reply("CLASSIFY", classified).with_usage(200, 20),
        Script::reply("RESPOND billing", "refund sent").with_usage(300, 30),
        Script::reply("RESPOND", "escalated").with_usage(300, 30),
        Script::reply("TAG", "urgent").with_usage(50, 5),
    ]))
}

impl Api {
    async fn send(&self, user: &str, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let (status, _, body) = self.call(method, path, Some(&token(user)), body.map(|b| b.to_string().into_bytes())).await;
        (status, body)
    }

    async fn events_of(&self, user: &str, path: &str) -> Vec<Value> {
        let (status, page) = self.get(user, path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        page["events"].as_array().unwrap().clone()
    }
}

fn step<'v>(run: &'v Value, id: &str) -> &'v Value {
    run["steps"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap()
}

fn cost(v: &Value) -> u64 {
    v["cost_pico_usd"].as_u64().unwrap()
}

#[tokio::test]
async fn retrying_a_middle_step_runs_it_and_exactly_its_dependents_as_a_new_revision_keeping_the_old_one() {
    let api = api();
    let (_, _, accepted) = api.start("alice", diamond()).await;
    let id = accepted["run_id"].as_str().unwrap().to_owned();
    api.execute(&id, chain_model("other")).await;
    let (_, first) = api.get("alice", &format!("/runs/{id}")).await;
    assert_eq!((first["output"].as_str(), first["revision"].as_u64()), (Some("escalated / urgent"), Some(0)), "{first}");

    let (status, accepted) = api.send("alice", "POST", &format!("/runs/{id}/steps/b/retry"), Some(json!({ "comment": "wrong class" }))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert_eq!((accepted["revision"].as_u64(), &accepted["rerun"]), (Some(1), &json!(["b", "c"])));
    let sent = api.dispatcher.events();
    assert_eq!(serde_json::to_value(sent.last().unwrap()).unwrap()["cause"], "revision");
    let model = chain_model("billing");
    assert_eq!(api.execute(&id, model.clone()).await, chainrun_core::engine::Outcome::Finished(chainrun_core::run::RunStatus::Completed));
    // Exactly `b` and `c` were called again.
    let prompts: Vec<String> = model.calls().iter().map(|c| c.prompt.split(' ').next().unwrap().to_owned()).collect();
    assert_eq!(prompts, ["CLASSIFY", "RESPOND"]);

    let (_, now) = api.get("alice", &format!("/runs/{id}")).await;
    assert_eq!(
        (now["status"].as_str(), now["output"].as_str(), now["revision"].as_u64()),
        (Some("COMPLETED"), Some("refund sent / urgent"), Some(1))
    );
    assert_eq!((now["revisions"][0]["by"].as_str(), now["revisions"][0]["previous_status"].as_str()), (Some("alice"), Some("COMPLETED")));
    // Costs of every revision add up: revision 1 paid for b and c once more.
    let again = cost(step(&first, "b")) + cost(step(&first, "c"));
    assert!(again > 0);
    assert_eq!(cost(&now["totals"]), cost(&first["totals"]) + again, "{now}");
    assert_eq!(now["totals"]["model_calls"].as_u64(), Some(6));
    // The earlier revision stays readable, as it was.
    let (status, old) = api.get("alice", &format!("/runs/{id}?revision=0")).await;
    assert_eq!(status, StatusCode::OK, "{old}");
    assert_eq!((old["output"].as_str(), old["revision"].as_u64()), (Some("escalated / urgent"), Some(0)));
    assert_eq!(old["totals"], first["totals"]);
    assert_eq!((step(&old, "b")["text"].as_str(), step(&now, "b")["text"].as_str()), (Some("other"), Some("billing")));
    let (status, _) = api.get("alice", &format!("/runs/{id}/steps/b/text?revision=0")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, problem) = api.get("alice", &format!("/runs/{id}?revision=2")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");

    // One gap-free log; each event says its revision, and a revision's events can be read alone.
    let all = api.events_of("alice", &format!("/runs/{id}/events?limit=1000")).await;
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let second = api.events_of("alice", &format!("/runs/{id}/events?revision=1&limit=1000")).await;
    let kinds: Vec<&str> = second.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"REVISION_STARTED"));
    assert_eq!(kinds.last(), Some(&"RUN_COMPLETED"));
    assert_eq!(second[0]["data"]["rerun"], json!(["b", "c"]));
    assert_eq!(second[0]["data"]["comment"], "wrong class");
    assert!(second.iter().all(|e| e["revision"] == 1));
    assert_eq!(all.len(), second.len() + api.events_of("alice", &format!("/runs/{id}/events?revision=0&limit=1000")).await.len());

    // Analytics: one run, whose cost includes its revision.
    let run = api.store.get_run(&RunId::parse(&id).unwrap()).await.unwrap().unwrap();
    api.analytics.record_run(&run, &api.store.get_steps(&run.id).await.unwrap()).await.unwrap();
    let mut first_revision = run.clone();
    (first_revision.revision, first_revision.totals) = (0, run.revisions[0].previous.totals);
    api.analytics.record_run(&first_revision, &api.store.get_steps(&run.id).await.unwrap()).await.unwrap();
    let today = chrono::Utc::now().date_naive();
    let costs = api.analytics.costs(&chainrun_core::ids::Principal::User("alice".into()), today, today).await.unwrap();
    assert_eq!((costs[0].totals.runs, costs[0].totals.cost.pico()), (1, cost(&now["totals"])));
}

#[tokio::test]
async fn overriding_an_output_sets_it_by_hand_and_runs_only_its_dependents() {
    let api = api();
    let (_, _, accepted) = api.start("alice", diamond()).await;
    let id = accepted["run_id"].as_str().unwrap().to_owned();
    api.execute(&id, chain_model("other")).await;

    let body = json!({ "output": "billing", "comment": "it is a refund" });
    let (status, accepted) = api.send("alice", "PUT", &format!("/runs/{id}/steps/b/output"), Some(body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert_eq!(accepted["rerun"], json!(["c"]));
    let model = chain_model("never asked");
    api.execute(&id, model.clone()).await;
    assert_eq!(model.calls().len(), 1, "only c runs");
    assert!(model.calls()[0].prompt.contains("RESPOND billing"), "c reads the output set by hand");

    let (_, now) = api.get("alice", &format!("/runs/{id}")).await;
    assert_eq!(now["output"], "refund sent / urgent");
    let b = step(&now, "b");
    assert_eq!(
        (b["status"].as_str(), b["output"].as_str(), b["detail"]["overridden_by"].as_str()),
        (Some("COMPLETED"), Some("billing"), Some("alice")),
        "{b}"
    );
    assert_eq!(b["detail"]["replaces_revision"], 0);
    let events = api.events_of("alice", &format!("/runs/{id}/events?revision=1")).await;
    let overridden = events.iter().find(|e| e["type"] == "STEP_OVERRIDDEN").unwrap();
    assert_eq!(
        (overridden["step_id"].as_str(), overridden["data"]["output"].as_str(), overridden["data"]["by"].as_str()),
        (Some("b"), Some("billing"), Some("alice"))
    );
    // A JSON output gets its JSON as text.
    let (status, _) = api.send("alice", "PUT", &format!("/runs/{id}/steps/b/output"), Some(json!({ "output": { "class": "billing" } }))).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    api.execute(&id, chain_model("x")).await;
    let (_, latest) = api.get("alice", &format!("/runs/{id}")).await;
    assert_eq!((latest["revision"].as_u64(), step(&latest, "b")["text"].as_str()), (Some(2), Some(r#"{"class":"billing"}"#)));
    assert_eq!(step(&latest, "b")["detail"]["replaces_revision"], 1);
}

#[tokio::test]
async fn retrying_the_step_a_run_failed_on_runs_it_and_the_steps_the_failure_cancelled() {
    let api = api();
    let (_, _, accepted) = api.start("alice", diamond()).await;
    let id = accepted["run_id"].as_str().unwrap().to_owned();
    let failing = Arc::new(ScriptedModel::new(vec![
        Script::reply("EXTRACT", "order 42"),
        Script::failing_first(
            "CLASSIFY",
            chainrun_core::ports::ModelError::new(chainrun_core::ports::ModelErrorKind::Invalid, "ValidationException", "bad"),
            9,
            "x",
        ),
        Script::reply("TAG", "urgent").with_latency(std::time::Duration::from_millis(50)),
    ]));
    api.execute(&id, failing).await;
    let (_, failed) = api.get("alice", &format!("/runs/{id}")).await;
    assert_eq!(failed["status"], "FAILED", "{failed}");

    let (status, accepted) = api.send("alice", "POST", &format!("/runs/{id}/steps/b/retry"), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let rerun: Vec<&str> = accepted["rerun"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert!(rerun.starts_with(&["b", "c"]), "{rerun:?}");
    assert!(!rerun.contains(&"a"), "a completed: it keeps its result");
    api.execute(&id, chain_model("billing")).await;
    let (_, now) = api.get("alice", &format!("/runs/{id}")).await;
    assert_eq!((now["status"].as_str(), now["error"].is_null()), (Some("COMPLETED"), true), "{now}");
    assert_eq!((now["revisions"][0]["previous_status"].as_str(), step(&now, "d")["status"].as_str()), (Some("FAILED"), Some("COMPLETED")));
}

#[tokio::test]
async fn steering_a_run_refuses_what_does_not_fit_naming_why_and_changes_nothing() {
    let api = api();
    let (_, _, accepted) = api.start("alice", diamond()).await;
    let id = accepted["run_id"].as_str().unwrap().to_owned();
    let retry = format!("/runs/{id}/steps/b/retry");
    // Not ended yet.
    let (status, problem) = api.send("alice", "POST", &retry, None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(problem["detail"].as_str().unwrap().contains("once the run has ended"), "{problem}");
    api.execute(&id, chain_model("other")).await;
    let dispatched = api.dispatcher.events().len();
    for (user, method, path, body, expected, needle) in [
        ("mallory", "POST", retry.clone(), None, StatusCode::NOT_FOUND, "no run"),
        ("alice", "POST", format!("/runs/{id}/steps/ghost/retry"), None, StatusCode::NOT_FOUND, "no step \"ghost\""),
        ("alice", "POST", format!("/runs/{id}/steps/b/redo"), None, StatusCode::NOT_FOUND, "retry"),
        ("alice", "PUT", format!("/runs/{id}/steps/b/text"), Some(json!({ "output": 1 })), StatusCode::NOT_FOUND, "output"),
        ("alice", "POST", retry.clone(), Some(json!({ "revision": 3 })), StatusCode::CONFLICT, "is at revision 0, not 3"),
        ("alice", "POST", retry.clone(), Some(json!({ "again": true })), StatusCode::BAD_REQUEST, "unknown field"),
        ("alice", "POST", retry.clone(), Some(json!({ "budget": { "max_total_tokens": 1 } })), StatusCode::BAD_REQUEST, "only raise"),
        ("alice", "PUT", format!("/runs/{id}/steps/b/output"), Some(json!({ "text": "x" })), StatusCode::BAD_REQUEST, "missing field `output`"),
        ("alice", "PUT", format!("/runs/{id}/steps/b/output"), None, StatusCode::BAD_REQUEST, "empty"),
    ] {
        let (status, problem) = api.send(user, method, &path, body.clone()).await;
        assert_eq!(status, expected, "{user} {method} {path} {body:?}: {problem}");
        assert!(problem["detail"].as_str().unwrap().contains(needle), "{path} {body:?}: {problem}");
    }
    assert_eq!(api.dispatcher.events().len(), dispatched, "nothing was started");
    assert_eq!(api.store.get_run(&RunId::parse(&id).unwrap()).await.unwrap().unwrap().revision, 0);

    // Two people steering from the same revision: the first starts it, the second is told.
    let (status, _) = api.send("alice", "POST", &retry, Some(json!({ "revision": 0 }))).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, problem) = api.send("alice", "POST", &retry, Some(json!({ "revision": 0 }))).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(problem["detail"].as_str().unwrap().contains("is at revision 1, not 0"), "{problem}");
    // And while the revision runs, nothing more.
    let (status, problem) = api.send("alice", "PUT", &format!("/runs/{id}/steps/b/output"), Some(json!({ "output": "x" }))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
}

#[tokio::test]
async fn a_retry_counts_what_earlier_revisions_spent_against_the_budget_unless_it_raises_it() {
    let api = api();
    let mut body = diamond();
    body["workflow"]["budget"] = json!({ "max_total_tokens": 700 });
    body["workflow"]["defaults"]["max_tokens"] = json!(100);
    let (_, _, accepted) = api.start("alice", body).await;
    let id = accepted["run_id"].as_str().unwrap().to_owned();
    // Every call is charged 110 tokens and reserves 213 (its prompt's worst case and 100 for its reply).
    let model = |classified: &str| {
        let reply = |prompt: &str, text: &str| Script::reply(prompt, text).with_usage(10, 100);
        let replies =
            [("EXTRACT", "order 42"), ("CLASSIFY", classified), ("RESPOND billing", "refund sent"), ("RESPOND", "escalated"), ("TAG", "urgent")];
        Arc::new(ScriptedModel::new(replies.into_iter().map(|(p, t)| reply(p, t)).collect()))
    };
    api.execute(&id, model("other")).await;
    let (_, first) = api.get("alice", &format!("/runs/{id}")).await;
    assert_eq!((first["status"].as_str(), first["totals"]["total_tokens"].as_u64()), (Some("COMPLETED"), Some(440)), "{first}");
    // Retrying b and c: b fits (440 + 213), then c does not (550 + 213 > 700) and is refused.
    let (status, _) = api.send("alice", "POST", &format!("/runs/{id}/steps/b/retry"), None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    api.execute(&id, model("billing")).await;
    let (_, refused) = api.get("alice", &format!("/runs/{id}")).await;
    assert_eq!((refused["status"].as_str(), refused["totals"]["total_tokens"].as_u64()), (Some("FAILED"), Some(550)), "{refused}");
    assert_eq!(step(&refused, "c")["error"]["code"], "BUDGET_EXCEEDED", "{refused}");
    // A retry that raises the budget records it and runs.
    let raise = json!({ "budget": { "max_total_tokens": 3000 } });
    let (status, accepted) = api.send("alice", "POST", &format!("/runs/{id}/steps/b/retry"), Some(raise)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    api.execute(&id, model("billing")).await;
    let (_, now) = api.get("alice", &format!("/runs/{id}")).await;
    assert_eq!((now["status"].as_str(), now["output"].as_str()), (Some("COMPLETED"), Some("refund sent / urgent")), "{now}");
    assert_eq!(now["totals"]["total_tokens"].as_u64(), Some(770));
    assert_eq!(now["budget_raises"][0]["to"]["max_total_tokens"], 3000);
    assert_eq!(now["revisions"][1]["budget"]["by"], "alice");
}

#[tokio::test]
async fn a_raise_changes_only_the_limits_it_names_and_null_lifts_one() {
    let api = api();
    let body = json!({
        "workflow": {
            "name": "two-limits",
            "defaults": { "model": "amazon.nova-micro-v1:0", "max_tokens": 100 },
            "budget": { "max_total_tokens": 400, "max_cost_usd": "0.001", "on_exceeded": "pause" },
            "steps": [
                { "id": "a", "type": "llm", "prompt": "FIRST" },
                { "id": "b", "type": "llm", "prompt": "SECOND {{ steps.a.text }}" }
            ]
        }
    });
    for (raise, tokens) in [(json!({ "max_total_tokens": 1000 }), Some(1000)), (json!({ "max_total_tokens": null }), None)] {
        let (_, _, accepted) = api.start("alice", body.clone()).await;
        let id = accepted["run_id"].as_str().unwrap().to_owned();
        let model = Arc::new(ScriptedModel::new(vec![Script::reply("FIRST", &"word ".repeat(60))]));
        assert_eq!(api.execute(&id, model).await, chainrun_core::engine::Outcome::Waiting);
        let (status, resumed) = api.send("alice", "POST", &format!("/runs/{id}/resume"), Some(json!({ "budget": raise }))).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{resumed}");
        let to = &resumed["resumed"]["budget"]["to"];
        assert_eq!((to["max_total_tokens"].as_u64(), to["max_cost_pico_usd"].as_u64()), (tokens, Some(1_000_000_000)), "the cost limit stays: {to}");
    }
}

#[tokio::test]
async fn a_run_takes_at_most_fifty_revisions() {
    let api = api();
    let body = json!({ "workflow": { "name": "one", "defaults": { "model": "amazon.nova-micro-v1:0" }, "steps": [{ "id": "a", "type": "llm", "prompt": "ONE" }] } });
    let (_, _, accepted) = api.start("alice", body).await;
    let id = accepted["run_id"].as_str().unwrap().to_owned();
    let model = || Arc::new(ScriptedModel::new(vec![Script::reply("ONE", "1")]));
    api.execute(&id, model()).await;
    for n in 1..=50 {
        let (status, accepted) = api.send("alice", "POST", &format!("/runs/{id}/steps/a/retry"), None).await;
        assert_eq!((status, accepted["revision"].as_u64()), (StatusCode::ACCEPTED, Some(n)), "{accepted}");
        api.execute(&id, model()).await;
    }
    let (status, problem) = api.send("alice", "POST", &format!("/runs/{id}/steps/a/retry"), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(problem["detail"].as_str().unwrap().contains("50 revisions"), "{problem}");
    let (_, run) = api.get("alice", &format!("/runs/{id}?revision=0")).await;
    assert_eq!(run["status"], "COMPLETED", "the first revision is still there");
}

/// A progress store whose first `corrupt` reads of a row fail as unreadable (moto lets a
/// read see a row half-way through an update).
struct HalfWritten {
    inner: Arc<MemoryProgress>,
    corrupt: std::sync::atomic::AtomicU32,
    reads: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl chainrun_core::ports::ProgressReader for HalfWritten {
    async fn events_after(&self, run: &RunId, after: u64, limit: u32) -> Result<Vec<chainrun_core::run::Event>, chainrun_core::ports::ProgressError> {
        self.inner.events_after(run, after, limit).await
    }
    async fn progress_of(
        &self,
        principal: &chainrun_core::ids::Principal,
        run: &RunId,
    ) -> Result<Option<chainrun_core::run::ProgressRow>, chainrun_core::ports::ProgressError> {
        use std::sync::atomic::Ordering::SeqCst;
        self.reads.fetch_add(1, SeqCst);
        if self.corrupt.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(chainrun_core::ports::ProgressError::Corrupt(format!("row of {run}: missing field `run_id`")));
        }
        self.inner.progress_of(principal, run).await
    }
    async fn feed(
        &self,
        principal: &chainrun_core::ids::Principal,
        limit: u32,
        before: Option<&RunId>,
    ) -> Result<Vec<chainrun_core::run::ProgressRow>, chainrun_core::ports::ProgressError> {
        self.inner.feed(principal, limit, before).await
    }
}

#[tokio::test]
async fn a_progress_row_that_does_not_read_back_never_fails_a_runs_view() {
    for corrupt in [1, u32::MAX] {
        let mut api = api();
        let (_, _, body) = api.start("alice", sample()).await;
        let id = body["run_id"].as_str().unwrap().to_owned();
        let reader = Arc::new(HalfWritten { inner: api.progress.clone(), corrupt: corrupt.into(), reads: 0.into() });
        api.state.progress = reader.clone();
        let (status, _, view) = api.call("GET", &format!("/runs/{id}"), Some(&token("alice")), None).await;
        assert_eq!(status, StatusCode::OK, "{view}");
        assert_eq!(view["status"], "QUEUED");
        assert_eq!(reader.reads.load(std::sync::atomic::Ordering::SeqCst), 2, "read once more, then left out");
    }
}
