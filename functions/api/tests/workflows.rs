//! Stored workflows through the real router (`app(state).oneshot`) with in-memory ports:
//! versions, optimistic updates, runs pinned to a version, and nothing of anyone else's.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use axum::body::Body;
use chainrun_api::{AppState, app};
use chainrun_core::ids::{RunId, WorkflowId};
use chainrun_core::memory::{MemoryDispatcher, MemoryStore, MemoryWorkflows};
use chainrun_core::ports::{RunStore, WorkflowStore};
use chainrun_core::stored::Pinned;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::sync::Arc;
use tower::ServiceExt;

mod support;

struct Api {
    store: Arc<MemoryStore>,
    workflows: Arc<MemoryWorkflows>,
    dispatcher: Arc<MemoryDispatcher>,
    state: AppState,
}

fn api() -> Api {
    let p = support::local_ports();
    Api { store: p.store, workflows: p.workflows, dispatcher: p.dispatcher, state: p.state }
}

fn token(sub: &str) -> String {
    support::token_signed(support::SECRET, sub, &[], 3600)
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Value,
}

impl Api {
    async fn send(&self, user: &str, method: &str, path: &str, body: Option<Value>, headers: &[(&str, &str)]) -> Answer {
        let mut req = Request::builder().method(method).uri(path).header("authorization", format!("Bearer {}", token(user)));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let body = body.map(|b| Body::from(b.to_string())).unwrap_or_else(Body::empty);
        let res = app(self.state.clone()).oneshot(req.header("content-type", "application/json").body(body).unwrap()).await.unwrap();
        let (status, headers) = (res.status(), res.headers().clone());
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
        Answer { status, headers, body }
    }

    async fn call(&self, user: &str, method: &str, path: &str, body: Option<Value>) -> Answer {
        self.send(user, method, path, body, &[]).await
    }

    /// Creates `definition` as `user`'s; its id.
    async fn create(&self, user: &str, definition: Value) -> String {
        let a = self.call(user, "POST", "/workflows", Some(json!({ "workflow": definition }))).await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        a.body["id"].as_str().unwrap().to_owned()
    }
}

fn greet(prompt: &str) -> Value {
    json!({
        "name": "greet",
        "defaults": { "model": "amazon.nova-micro-v1:0" },
        "input_schema": { "type": "object", "required": ["name"] },
        "steps": [{ "id": "hello", "type": "llm", "prompt": format!("{prompt} {{{{ input.name }}}}"), "max_tokens": 50 }]
    })
}

#[tokio::test]
async fn creating_a_workflow_answers_201_with_version_1_its_location_and_etag() {
    let api = api();
    let a = api.call("alice", "POST", "/workflows", Some(json!({ "workflow": greet("Hello") }))).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    let id = a.body["id"].as_str().unwrap();
    WorkflowId::parse(id).unwrap();
    assert_eq!((a.body["version"].clone(), a.body["latest_version"].clone(), a.body["name"].clone()), (json!(1), json!(1), json!("greet")));
    assert_eq!(a.body["owner"], "alice");
    assert_eq!(a.body["workflow"], greet("Hello"));
    assert_eq!(a.headers["location"], format!("/workflows/{id}"));
    assert_eq!(a.headers["etag"], "\"1\"");

    let got = api.call("alice", "GET", &format!("/workflows/{id}"), None).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!((got.body["workflow"].clone(), got.headers["etag"].clone()), (greet("Hello"), "\"1\"".parse().unwrap()));
}

#[tokio::test]
async fn an_invalid_definition_is_refused_with_the_same_400_as_post_runs_and_nothing_is_written() {
    let api = api();
    let invalid = json!({ "name": "bad", "steps": [{ "id": "a", "type": "llm", "prompt": "x {{ steps.nope.text }}" }] });
    let a = api.call("alice", "POST", "/workflows", Some(json!({ "workflow": invalid }))).await;
    let runs = api.call("alice", "POST", "/runs", Some(json!({ "workflow": invalid, "input": {} }))).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.body["title"], "Invalid workflow");
    assert_eq!(a.body["problems"], runs.body["problems"], "the same problems as POST /runs");
    assert!(a.body["problems"].to_string().contains("nope"), "{}", a.body);
    assert!(api.workflows.list(&[chainrun_core::ids::Principal::User("alice".into())], 10, None).await.unwrap().items.is_empty());

    // A new version is validated the same way, and a refused one changes nothing.
    let id = api.create("alice", greet("Hello")).await;
    let put = api.send("alice", "PUT", &format!("/workflows/{id}"), Some(json!({ "workflow": invalid })), &[("if-match", "\"1\"")]).await;
    assert_eq!(put.status, StatusCode::BAD_REQUEST, "{}", put.body);
    let got = api.call("alice", "GET", &format!("/workflows/{id}"), None).await;
    assert_eq!((got.body["version"].clone(), got.body["workflow"].clone()), (json!(1), greet("Hello")));

    for body in [json!({}), json!({ "workflow": greet("x"), "extra": 1 }), json!([1])] {
        let a = api.call("alice", "POST", "/workflows", Some(body.clone())).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}: {}", a.body);
    }
}

#[tokio::test]
async fn a_put_writes_the_next_version_and_every_version_stays_readable() {
    let api = api();
    let id = api.create("alice", greet("Hello")).await;
    let a = api.send("alice", "PUT", &format!("/workflows/{id}"), Some(json!({ "workflow": greet("Bonjour") })), &[("if-match", "\"1\"")]).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!((a.body["version"].clone(), a.headers["etag"].clone()), (json!(2), "\"2\"".parse().unwrap()));
    // The expected version may come in the body instead.
    let a = api.call("alice", "PUT", &format!("/workflows/{id}"), Some(json!({ "workflow": greet("Hola"), "version": 2 }))).await;
    assert_eq!(a.body["version"], 3, "{}", a.body);

    let latest = api.call("alice", "GET", &format!("/workflows/{id}"), None).await;
    assert_eq!((latest.body["version"].clone(), latest.body["workflow"].clone()), (json!(3), greet("Hola")));
    let first = api.call("alice", "GET", &format!("/workflows/{id}?version=1"), None).await;
    assert_eq!((first.body["version"].clone(), first.body["latest_version"].clone()), (json!(1), json!(3)));
    assert_eq!((first.body["workflow"].clone(), first.headers["etag"].clone()), (greet("Hello"), "\"1\"".parse().unwrap()));
    let missing = api.call("alice", "GET", &format!("/workflows/{id}?version=4"), None).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.body["detail"].as_str().unwrap().contains("versions are 1 to 3"), "{}", missing.body);
    for bad in ["0", "x", "-1"] {
        assert_eq!(api.call("alice", "GET", &format!("/workflows/{id}?version={bad}"), None).await.status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

#[tokio::test]
async fn a_lost_update_is_refused_with_409_naming_the_current_version() {
    let api = api();
    let id = api.create("alice", greet("Hello")).await;
    let path = format!("/workflows/{id}");
    let first = api.send("alice", "PUT", &path, Some(json!({ "workflow": greet("one") })), &[("if-match", "\"1\"")]).await;
    assert_eq!(first.status, StatusCode::OK);
    // A second writer who also read version 1 loses, and is told the current version.
    let second = api.send("alice", "PUT", &path, Some(json!({ "workflow": greet("two") })), &[("if-match", "\"1\"")]).await;
    assert_eq!(second.status, StatusCode::CONFLICT, "{}", second.body);
    assert!(second.body["detail"].as_str().unwrap().contains("is at version 2"), "{}", second.body);
    let body = api.call("alice", "PUT", &path, Some(json!({ "workflow": greet("two"), "version": 1 }))).await;
    assert_eq!(body.status, StatusCode::CONFLICT);
    assert_eq!(api.call("alice", "GET", &path, None).await.body["workflow"], greet("one"), "the lost update wrote nothing");

    // Saying nothing of what was read is refused; `*` overwrites on purpose.
    let blind = api.call("alice", "PUT", &path, Some(json!({ "workflow": greet("blind") }))).await;
    assert_eq!(blind.status, StatusCode::PRECONDITION_REQUIRED, "{}", blind.body);
    assert!(blind.body["detail"].as_str().unwrap().contains("If-Match"));
    let mixed = api.send("alice", "PUT", &path, Some(json!({ "workflow": greet("x"), "version": 1 })), &[("if-match", "\"2\"")]).await;
    assert_eq!(mixed.status, StatusCode::BAD_REQUEST, "{}", mixed.body);
    let bad = api.send("alice", "PUT", &path, Some(json!({ "workflow": greet("x") })), &[("if-match", "two")]).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    for version in [json!(0), json!(-1), json!("2"), json!(1_000_000)] {
        let bad = api.call("alice", "PUT", &path, Some(json!({ "workflow": greet("x"), "version": version }))).await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST, "version {version}: {}", bad.body);
    }
    let any = api.send("alice", "PUT", &path, Some(json!({ "workflow": greet("star") })), &[("if-match", "*")]).await;
    assert_eq!((any.status, any.body["version"].clone()), (StatusCode::OK, json!(3)));
}

#[tokio::test]
async fn a_run_pins_the_version_it_ran_and_keeps_its_snapshot_after_a_new_version() {
    let api = api();
    let id = api.create("alice", greet("Hello")).await;
    let started = api.call("alice", "POST", &format!("/workflows/{id}/runs"), Some(json!({ "input": { "name": "Ada" } }))).await;
    assert_eq!(started.status, StatusCode::ACCEPTED, "{}", started.body);
    assert_eq!(started.body["status"], "QUEUED");
    let v1_run = RunId::parse(started.body["run_id"].as_str().unwrap()).unwrap();
    assert_eq!(started.headers["location"], format!("/runs/{v1_run}"));
    assert_eq!(api.dispatcher.dispatched(), vec![v1_run.clone()]);

    let put = api.send("alice", "PUT", &format!("/workflows/{id}"), Some(json!({ "workflow": greet("Bonjour") })), &[("if-match", "\"1\"")]).await;
    assert_eq!(put.status, StatusCode::OK);
    let run = api.store.get_run(&v1_run).await.unwrap().unwrap();
    assert_eq!(run.definition, greet("Hello"), "the run keeps version 1's snapshot");
    let workflow_id = WorkflowId::parse(&id).unwrap();
    assert_eq!(run.pinned, Some(Pinned { workflow_id: workflow_id.clone(), version: 1 }));
    let view = api.call("alice", "GET", &format!("/runs/{v1_run}"), None).await;
    assert_eq!(view.body["workflow_ref"], json!({ "workflow_id": id, "version": 1 }));

    // Without a version the latest runs; an earlier one may be asked for.
    let latest = api.call("alice", "POST", &format!("/workflows/{id}/runs"), Some(json!({ "input": { "name": "Ada" } }))).await;
    let latest = api.store.get_run(&RunId::parse(latest.body["run_id"].as_str().unwrap()).unwrap()).await.unwrap().unwrap();
    assert_eq!((latest.definition, latest.pinned.unwrap().version), (greet("Bonjour"), 2));
    let pinned = api.call("alice", "POST", &format!("/workflows/{id}/runs"), Some(json!({ "input": { "name": "Ada" }, "version": 1 }))).await;
    let pinned = api.store.get_run(&RunId::parse(pinned.body["run_id"].as_str().unwrap()).unwrap()).await.unwrap().unwrap();
    assert_eq!((pinned.definition, pinned.pinned.unwrap().version), (greet("Hello"), 1));

    // The input is checked as POST /runs checks it; a refused run is not stored.
    let bad = api.call("alice", "POST", &format!("/workflows/{id}/runs"), Some(json!({ "input": {} }))).await;
    assert_eq!((bad.status, bad.body["title"].clone()), (StatusCode::BAD_REQUEST, json!("Invalid input")));
    let none = api.call("alice", "POST", &format!("/workflows/{id}/runs"), Some(json!({ "input": { "name": "x" }, "version": 9 }))).await;
    assert_eq!(none.status, StatusCode::NOT_FOUND);
    assert_eq!(api.dispatcher.dispatched().len(), 3);
}

#[tokio::test]
async fn a_stored_workflow_is_estimated_like_an_inline_one_and_the_inline_route_still_works() {
    let api = api();
    let id = api.create("alice", greet("Hello")).await;
    let stored = api.call("alice", "POST", &format!("/workflows/{id}/estimate"), Some(json!({ "input": { "name": "Ada" } }))).await;
    assert_eq!(stored.status, StatusCode::OK, "{}", stored.body);
    let inline = api.call("alice", "POST", "/workflows/estimate", Some(json!({ "workflow": greet("Hello"), "input": { "name": "Ada" } }))).await;
    assert_eq!(inline.status, StatusCode::OK, "{}", inline.body);
    assert_eq!(stored.body, inline.body);
    let v1 = api.call("alice", "POST", &format!("/workflows/{id}/estimate"), Some(json!({ "input": { "name": "Ada" }, "version": 1 }))).await;
    assert_eq!(v1.body, inline.body);
    assert_eq!(api.call("alice", "GET", "/workflows/estimate", None).await.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn listing_shows_only_the_callers_workflows_newest_updated_first_in_pages() {
    let api = api();
    let a = api.create("alice", greet("a")).await;
    let b = api.create("alice", greet("b")).await;
    let c = api.create("alice", greet("c")).await;
    api.create("bob", greet("bob")).await;
    // Updating `a` moves it to the front.
    let put = api.send("alice", "PUT", &format!("/workflows/{a}"), Some(json!({ "workflow": greet("a2") })), &[("if-match", "\"1\"")]).await;
    assert_eq!(put.status, StatusCode::OK);

    let mut seen = Vec::new();
    let mut path = "/workflows?limit=2".to_owned();
    loop {
        let page = api.call("alice", "GET", &path, None).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        for item in page.body["items"].as_array().unwrap() {
            assert!(item.get("workflow").is_none(), "a list shows no definitions");
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
        match page.body["next"].as_str() {
            Some(next) => path = format!("/workflows?limit=2&next={next}"),
            None => break,
        }
    }
    assert_eq!(seen[0], a);
    assert_eq!(seen.len(), 3);
    assert!(seen.contains(&b) && seen.contains(&c));
    for bad in ["/workflows?limit=0", "/workflows?limit=101", "/workflows?next=garbage", "/workflows?other=1"] {
        assert_eq!(api.call("alice", "GET", bad, None).await.status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

#[tokio::test]
async fn a_duplicate_is_a_new_workflow_at_version_1_optionally_renamed() {
    let api = api();
    let id = api.create("alice", greet("Hello")).await;
    let put = api.send("alice", "PUT", &format!("/workflows/{id}"), Some(json!({ "workflow": greet("Bonjour") })), &[("if-match", "\"1\"")]).await;
    assert_eq!(put.status, StatusCode::OK);

    let copy = api.call("alice", "POST", &format!("/workflows/{id}/duplicate"), None).await;
    assert_eq!(copy.status, StatusCode::CREATED, "{}", copy.body);
    assert_ne!(copy.body["id"], json!(id));
    assert_eq!((copy.body["version"].clone(), copy.body["workflow"].clone()), (json!(1), greet("Bonjour")));
    assert_eq!(copy.headers["location"], format!("/workflows/{}", copy.body["id"].as_str().unwrap()));

    let renamed = api.call("alice", "POST", &format!("/workflows/{id}/duplicate"), Some(json!({ "name": "greet-copy" }))).await;
    assert_eq!((renamed.status, renamed.body["name"].clone()), (StatusCode::CREATED, json!("greet-copy")));
    assert_eq!(renamed.body["workflow"]["steps"], greet("Bonjour")["steps"]);
    let bad = api.call("alice", "POST", &format!("/workflows/{id}/duplicate"), Some(json!({ "name": "" }))).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "an invalid name is the definition's 400: {}", bad.body);
}

#[tokio::test]
async fn a_deleted_workflow_is_gone_but_its_runs_keep_their_snapshots() {
    let api = api();
    let id = api.create("alice", greet("Hello")).await;
    let started = api.call("alice", "POST", &format!("/workflows/{id}/runs"), Some(json!({ "input": { "name": "Ada" } }))).await;
    let run_id = started.body["run_id"].as_str().unwrap().to_owned();

    let deleted = api.call("alice", "DELETE", &format!("/workflows/{id}"), None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.body);
    for (method, path) in [("GET", format!("/workflows/{id}")), ("GET", format!("/workflows/{id}?version=1")), ("DELETE", format!("/workflows/{id}"))]
    {
        assert_eq!(api.call("alice", method, &path, None).await.status, StatusCode::NOT_FOUND, "{method} {path}");
    }
    let put = api.send("alice", "PUT", &format!("/workflows/{id}"), Some(json!({ "workflow": greet("x") })), &[("if-match", "\"1\"")]).await;
    assert_eq!(put.status, StatusCode::NOT_FOUND);
    assert!(api.call("alice", "GET", "/workflows", None).await.body["items"].as_array().unwrap().is_empty());

    let run = api.call("alice", "GET", &format!("/runs/{run_id}"), None).await;
    assert_eq!(run.status, StatusCode::OK);
    assert_eq!(run.body["workflow_ref"]["version"], 1);
    let record = api.store.get_run(&RunId::parse(&run_id).unwrap()).await.unwrap().unwrap();
    assert_eq!(record.definition, greet("Hello"));
}

#[tokio::test]
async fn another_users_workflow_is_404_on_every_route_and_unchanged() {
    let api = api();
    let id = api.create("alice", greet("Hello")).await;
    let path = format!("/workflows/{id}");
    let valid = json!({ "workflow": greet("mine now"), "version": 1 });
    let attempts: Vec<(&str, String, Option<Value>)> = vec![
        ("GET", path.clone(), None),
        ("GET", format!("{path}?version=1"), None),
        ("PUT", path.clone(), Some(valid)),
        ("DELETE", path.clone(), None),
        ("POST", format!("{path}/runs"), Some(json!({ "input": { "name": "x" } }))),
        ("POST", format!("{path}/estimate"), Some(json!({ "input": { "name": "x" } }))),
        ("POST", format!("{path}/duplicate"), None),
    ];
    for (method, route, body) in attempts {
        let a = api.call("mallory", method, &route, body).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{method} {route}: {}", a.body);
        assert_eq!(a.body["detail"], format!("no workflow {id:?}"), "the same answer as an id that does not exist");
    }
    let unknown = api.call("mallory", "GET", &format!("/workflows/{}", WorkflowId::new()), None).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(api.call("mallory", "GET", "/workflows/not-an-id", None).await.status, StatusCode::NOT_FOUND);
    assert!(api.call("mallory", "GET", "/workflows", None).await.body["items"].as_array().unwrap().is_empty());

    let mine = api.call("alice", "GET", &path, None).await;
    assert_eq!((mine.status, mine.body["version"].clone(), mine.body["workflow"].clone()), (StatusCode::OK, json!(1), greet("Hello")));
    assert!(api.dispatcher.dispatched().is_empty(), "nothing ran");
    assert_eq!(
        api.workflows.list(&[chainrun_core::ids::Principal::User("mallory".into())], 10, None).await.unwrap().items.len(),
        0,
        "nothing was duplicated"
    );
}

#[tokio::test]
async fn an_oversize_definition_is_refused_before_anything_is_written() {
    let api = api();
    let mut big = greet("Hello");
    big["description"] = json!("x".repeat(chainrun_api::MAX_BODY_BYTES));
    let a = api.call("alice", "POST", "/workflows", Some(json!({ "workflow": big }))).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", a.body);
    assert!(api.workflows.list(&[chainrun_core::ids::Principal::User("alice".into())], 10, None).await.unwrap().items.is_empty());
}

#[tokio::test]
async fn a_put_retried_with_its_idempotency_key_gets_its_first_answer_not_a_conflict() {
    let api = api();
    let id = api.create("alice", greet("Hello")).await;
    let path = format!("/workflows/{id}");
    let body = json!({ "workflow": greet("Bonjour") });
    let first = api.send("alice", "PUT", &path, Some(body.clone()), &[("if-match", "\"1\""), ("idempotency-key", "k-1")]).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    // The answer was lost; the client sends the same request again.
    let again = api.send("alice", "PUT", &path, Some(body.clone()), &[("if-match", "\"1\""), ("idempotency-key", "k-1")]).await;
    assert_eq!((again.status, again.body["version"].clone()), (StatusCode::OK, json!(2)), "{}", again.body);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(api.call("alice", "GET", &path, None).await.body["latest_version"], 2, "written once");
    // The same key and body replacing another version is another request.
    let other = api.send("alice", "PUT", &path, Some(body), &[("if-match", "\"2\""), ("idempotency-key", "k-1")]).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", other.body);
}
