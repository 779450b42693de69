//! Answers to input steps through the real router (`POST /runs/{id}/resume` with `values`
//! or `text`), against in-memory ports; the runner's part is played by the engine.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use axum::body::Body;
use chainrun_api::{AppState, app};
use chainrun_core::durability::Clock;
use chainrun_core::engine::{Engine, EngineConfig, Outcome};
use chainrun_core::ids::{RunId, StepId};
use chainrun_core::memory::{MemoryDispatcher, MemoryProgress, MemoryStore, Script, ScriptedModel};
use chainrun_core::ports::{Claim, Lease, RunStore};
use chainrun_core::pricing::ModelRegistry;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::sync::Arc;
use tower::ServiceExt;

mod support;

struct Api {
    store: Arc<MemoryStore>,
    progress: Arc<MemoryProgress>,
    dispatcher: Arc<MemoryDispatcher>,
    state: AppState,
}

fn api() -> Api {
    let p = support::local_ports();
    Api { store: p.store, progress: p.progress, dispatcher: p.dispatcher, state: p.state }
}

fn token(sub: &str, groups: &[&str]) -> String {
    support::token_signed(support::SECRET, sub, groups, 3600)
}

/// The wall clock at a fixed time, to start a wait in the past.
struct Then(chrono::DateTime<chrono::Utc>);

impl Clock for Then {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.0
    }
}

impl Api {
    async fn call(&self, method: &str, path: &str, user: &str, body: Option<Value>, key: Option<&str>) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path).header("authorization", format!("Bearer {}", token(user, &[])));
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        let body = body.map(|b| Body::from(b.to_string())).unwrap_or_else(Body::empty);
        let res = app(self.state.clone()).oneshot(req.header("content-type", "application/json").body(body).unwrap()).await.unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn answer(&self, user: &str, id: &str, body: Value) -> (StatusCode, Value) {
        self.call("POST", &format!("/runs/{id}/resume"), user, Some(body), None).await
    }

    /// Starts a run of `steps` as alice and runs it as the runner would, until it waits.
    async fn waiting(&self, steps: Value, clock: Option<Arc<dyn Clock>>) -> String {
        let body = json!({ "workflow": { "name": "onboard", "defaults": { "model": "amazon.nova-micro-v1:0" }, "steps": steps } });
        let (status, accepted) = self.call("POST", "/runs", "alice", Some(body), None).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        let id = accepted["run_id"].as_str().unwrap().to_owned();
        assert_eq!(self.execute(&id, clock).await, Outcome::Waiting);
        id
    }

    async fn execute(&self, id: &str, clock: Option<Arc<dyn Clock>>) -> Outcome {
        let model = Arc::new(ScriptedModel::new(vec![Script::reply("OPEN", "opened")]));
        let mut engine = Engine::new(model, self.store.clone(), self.progress.clone(), Arc::new(ModelRegistry::builtin()), EngineConfig::default());
        if let Some(clock) = clock {
            engine = engine.with_clock(clock);
        }
        let lease = Lease { holder: RunId::new().to_string(), expires_at: chrono::Utc::now() + chrono::Duration::minutes(5) };
        let Claim::Acquired(run) = self.store.claim(&RunId::parse(id).unwrap(), &lease, chrono::Utc::now()).await.unwrap() else { panic!("claim") };
        engine.execute(*run, lease, None).await.unwrap()
    }

    async fn attempts(&self, id: &str) -> u32 {
        let run = self.store.get_run(&RunId::parse(id).unwrap()).await.unwrap().unwrap();
        run.inputs.get(&StepId::parse("account").unwrap()).map_or(0, |s| s.attempts())
    }
}

fn account(extra: Value) -> Value {
    let mut step = json!({
        "id": "account", "type": "input", "ask": "Which account?", "from": ["user:alice", "group:support"],
        "fields": { "type": "object",
                    "properties": { "account_id": { "type": "string", "pattern": "^AC-[0-9]{6}$" },
                                    "plan": { "enum": ["free", "pro"] },
                                    "seats": { "type": "integer", "minimum": 1 } },
                    "required": ["account_id", "plan"] }
    });
    for (k, v) in extra.as_object().unwrap() {
        step[k] = v.clone();
    }
    json!([step, { "id": "open", "type": "llm", "prompt": "OPEN {{ steps.account.output.account_id }}" }])
}

fn errors(problem: &Value) -> Vec<(String, String)> {
    problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["field"].as_str().unwrap().to_owned(), e["message"].as_str().unwrap().to_owned()))
        .collect()
}

#[tokio::test]
async fn invalid_or_missing_values_get_a_422_naming_each_field_and_the_valid_ones_are_kept() {
    let api = api();
    let id = api.waiting(account(json!({})), None).await;
    let (status, problem) =
        api.answer("alice", &id, json!({ "step": "account", "values": { "account_id": "AC-12", "seats": 2, "colour": "red" } })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(problem["type"], "urn:chainrun:problem:invalid-answer");
    let errors = errors(&problem);
    let fields: Vec<&str> = errors.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(fields, ["account_id", "colour", "plan"], "{problem}");
    assert!(errors[0].1.contains("^AC-[0-9]{6}$") && errors[1].1.contains("not a field") && errors[2].1 == "required", "{errors:?}");
    assert_eq!(problem["attempts_left"], 2);
    assert_eq!(api.store.get_run(&RunId::parse(&id).unwrap()).await.unwrap().unwrap().status.as_str(), "AWAITING_INPUT", "it keeps waiting");

    let dispatched = api.dispatcher.events().len();
    let (status, answered) = api.answer("alice", &id, json!({ "step": "account", "values": { "account_id": "AC-123456", "plan": "pro" } })).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answered}");
    assert_eq!(
        (answered["state"].as_str(), &answered["values"]),
        (Some("complete"), &json!({ "account_id": "AC-123456", "plan": "pro", "seats": 2 }))
    );
    let sent = api.dispatcher.events();
    assert_eq!((sent.len(), serde_json::to_value(sent.last().unwrap()).unwrap()["cause"].as_str()), (dispatched + 1, Some("resume")));
    assert_eq!(api.execute(&id, None).await, Outcome::Finished(chainrun_core::run::RunStatus::Completed));
    let (_, run) = api.call("GET", &format!("/runs/{id}"), "alice", None, None).await;
    assert_eq!(run["output"]["open"], "opened", "{run}");

    // Complete: another answer is refused, saying so.
    let (status, problem) = api.answer("alice", &id, json!({ "step": "account", "values": { "seats": 3 } })).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(problem["detail"].as_str().unwrap().contains("already has its values"), "{problem}");
}

#[tokio::test]
async fn the_last_allowed_answer_that_leaves_fields_missing_fails_the_step_and_says_so() {
    let api = api();
    let id = api.waiting(account(json!({ "max_attempts": 1 })), None).await;
    let (status, problem) = api.answer("alice", &id, json!({ "step": "account", "values": { "plan": "pro" } })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("the step fails (INPUT_INCOMPLETE)"), "{problem}");
    assert_eq!((problem["attempts_left"].as_u64(), errors(&problem)), (Some(0), vec![("account_id".to_owned(), "required".to_owned())]));
    // The run is queued for the runner to fail the step.
    assert_eq!(api.execute(&id, None).await, Outcome::Finished(chainrun_core::run::RunStatus::Failed));
    let run = api.store.get_run(&RunId::parse(&id).unwrap()).await.unwrap().unwrap();
    assert_eq!(run.error.unwrap().code, "INPUT_INCOMPLETE");
}

#[tokio::test]
async fn only_those_the_step_names_may_answer_and_others_are_told_there_is_no_such_step() {
    let api = api();
    let id = api.waiting(account(json!({})), None).await;
    // A member of a group it names answers (the group sees the run from its start: no 404).
    let (status, _) = api.call("GET", &format!("/runs/{id}"), "carol", None, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "carol is in no group here");
    let support = |body: Value| {
        let path = format!("/runs/{id}/resume");
        let state = api.state.clone();
        async move {
            let req = Request::builder()
                .method("POST")
                .uri(path)
                .header("authorization", format!("Bearer {}", token("dave", &["support"])))
                .body(Body::from(body.to_string()))
                .unwrap();
            app(state).oneshot(req).await.unwrap().status()
        }
    };
    assert_eq!(support(json!({ "step": "account", "values": { "plan": "free" } })).await, StatusCode::UNPROCESSABLE_ENTITY, "dave may answer");
    let body = json!({ "workflow": { "name": "x", "defaults": { "model": "amazon.nova-micro-v1:0" },
        "steps": [{ "id": "account", "type": "input", "ask": "?", "from": ["user:bob"], "fields": { "type": "object", "properties": { "a": {} } } }] } });
    let (_, accepted) = api.call("POST", "/runs", "alice", Some(body), None).await;
    let other = accepted["run_id"].as_str().unwrap().to_owned();
    assert_eq!(api.execute(&other, None).await, Outcome::Waiting);
    let (status, problem) = api.answer("alice", &other, json!({ "step": "account", "values": { "a": 1 } })).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the starter is not among `from`: {problem}");
    let (status, _) = api.answer("bob", &other, json!({ "step": "open", "values": { "a": 1 } })).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no such input step");
    let (status, _) = api.answer("bob", &other, json!({ "step": "account", "values": { "a": 1 } })).await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn free_text_is_queued_for_reading_and_needs_an_extract_model() {
    let api = api();
    let id = api.waiting(account(json!({})), None).await;
    let (status, problem) = api.answer("alice", &id, json!({ "step": "account", "text": "AC-123456 on pro" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("no `extract` model"), "{problem}");
    for bad in [json!({ "step": "account" }), json!({ "step": "account", "values": {}, "text": "x" }), json!({ "step": "account", "values": [1] })] {
        let (status, problem) = api.answer("alice", &id, bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {problem}");
    }
    let (status, problem) = api.answer("alice", &id, json!({ "values": { "plan": "pro" } })).await;
    assert!(status == StatusCode::BAD_REQUEST && problem["detail"].as_str().unwrap().contains("name its `step`"), "{problem}");
    let (status, problem) = api.call("POST", &format!("/runs/{id}/resume"), "alice", Some(json!({})), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(problem["detail"].as_str().unwrap().contains("waits for input on account"), "{problem}");
    assert_eq!(api.attempts(&id).await, 0, "none of these counted");

    let api = self::api();
    let id = api.waiting(account(json!({ "extract": { "max_tokens": 100 } })), None).await;
    let dispatched = api.dispatcher.events().len();
    let (status, answered) = api.answer("alice", &id, json!({ "step": "account", "text": "AC-123456 on pro" })).await;
    assert_eq!((status, answered["state"].as_str(), answered["attempts_left"].as_u64()), (StatusCode::ACCEPTED, Some("reading"), Some(2)));
    assert_eq!(api.dispatcher.events().len(), dispatched + 1, "the run is handed to a runner to read it");
    // Until it is read, the step takes no other answer.
    let (status, problem) = api.answer("alice", &id, json!({ "step": "account", "values": { "plan": "pro" } })).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(problem["detail"].as_str().unwrap().contains("still reading the text"), "{problem}");
    assert_eq!(api.attempts(&id).await, 1);
}

#[tokio::test]
async fn the_same_answer_twice_counts_once() {
    let api = api();
    let id = api.waiting(account(json!({})), None).await;
    let answer = json!({ "step": "account", "values": { "plan": "gold" } });
    let (first, problem) = api.answer("alice", &id, answer.clone()).await;
    let (again, repeated) = api.answer("alice", &id, answer.clone()).await;
    assert_eq!((first, again), (StatusCode::UNPROCESSABLE_ENTITY, StatusCode::UNPROCESSABLE_ENTITY));
    assert_eq!(errors(&problem), errors(&repeated), "answered as the first");
    assert_eq!(api.attempts(&id).await, 1);
    // With an Idempotency-Key, a repeat replays the first answer, even if the body is a retry.
    let keyed = json!({ "step": "account", "values": { "plan": "pro" } });
    let path = format!("/runs/{id}/resume");
    let (status, _) = api.call("POST", &path, "alice", Some(keyed.clone()), Some("k-1")).await;
    let (again, _) = api.call("POST", &path, "alice", Some(keyed), Some("k-1")).await;
    assert_eq!((status, again), (StatusCode::UNPROCESSABLE_ENTITY, StatusCode::UNPROCESSABLE_ENTITY));
    assert_eq!(api.attempts(&id).await, 2);
}

#[tokio::test]
async fn an_answer_to_a_step_not_yet_waiting_or_after_its_deadline_gets_409_saying_why() {
    let api = api();
    let steps = json!([
        { "id": "draft", "type": "llm", "prompt": "DRAFT" },
        { "id": "account", "type": "input", "ask": "{{ steps.draft.text }}", "fields": { "type": "object", "properties": { "a": {} } } }
    ]);
    let body = json!({ "workflow": { "name": "x", "defaults": { "model": "amazon.nova-micro-v1:0" }, "steps": steps } });
    let (_, accepted) = api.call("POST", "/runs", "alice", Some(body), None).await;
    let queued = accepted["run_id"].as_str().unwrap().to_owned();
    let (status, problem) = api.answer("alice", &queued, json!({ "step": "account", "values": { "a": 1 } })).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(problem["detail"].as_str().unwrap().contains("is not waiting for input (it is PENDING)"), "{problem}");

    // It started waiting two hours ago: its one-hour deadline has passed.
    let two_hours_ago: Arc<dyn Clock> = Arc::new(Then(chrono::Utc::now() - chrono::Duration::hours(2)));
    let id = api.waiting(account(json!({ "timeout": "1h" })), Some(two_hours_ago)).await;
    let dispatched = api.dispatcher.events().len();
    let (status, problem) = api.answer("alice", &id, json!({ "step": "account", "values": { "plan": "pro" } })).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("its deadline passed at") && detail.contains("fails without its values (INPUT_TIMED_OUT)"), "{detail}");
    let sent = api.dispatcher.events();
    assert_eq!((sent.len(), serde_json::to_value(sent.last().unwrap()).unwrap()["cause"].as_str()), (dispatched + 1, Some("sweep")));
    assert_eq!(api.attempts(&id).await, 0);
    // The runner then applies the deadline; a later answer hears what it did.
    assert_eq!(api.execute(&id, None).await, Outcome::Finished(chainrun_core::run::RunStatus::Failed));
    let (status, problem) = api.answer("alice", &id, json!({ "step": "account", "values": { "plan": "pro" } })).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(problem["detail"].as_str().unwrap().contains("passed its deadline without its values"), "{problem}");
}
