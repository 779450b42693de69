//! Templates through the real router (`app(state).oneshot`) with in-memory ports: the
//! built-ins, saving a stored workflow's version as a template, creating a workflow from
//! one, and refusals that name what is wrong and write nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use axum::body::Body;
use chainrun_api::{AppState, app};
use chainrun_core::ids::WorkflowId;
use chainrun_core::memory::{MemoryTemplates, MemoryWorkflows};
use chainrun_core::ports::WorkflowStore;
use chainrun_core::templates::BUILTINS;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::sync::Arc;
use tower::ServiceExt;

mod support;

struct Api {
    workflows: Arc<MemoryWorkflows>,
    templates: Arc<MemoryTemplates>,
    state: AppState,
}

fn api() -> Api {
    let p = support::local_ports();
    Api { workflows: p.workflows, templates: p.templates, state: p.state }
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Value,
}

impl Answer {
    fn detail(&self) -> &str {
        self.body["detail"].as_str().unwrap_or_default()
    }

    fn is_problem(&self) -> bool {
        self.headers.get("content-type").and_then(|v| v.to_str().ok()) == Some("application/problem+json")
    }
}

impl Api {
    async fn call(&self, user: &str, method: &str, path: &str, body: Option<Value>) -> Answer {
        let token = support::token_signed(support::SECRET, user, &[], 3600);
        let req =
            Request::builder().method(method).uri(path).header("authorization", format!("Bearer {token}")).header("content-type", "application/json");
        let body = body.map(|b| Body::from(b.to_string())).unwrap_or_else(Body::empty);
        let res = app(self.state.clone()).oneshot(req.body(body).unwrap()).await.unwrap();
        let (status, headers) = (res.status(), res.headers().clone());
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
        Answer { status, headers, body }
    }

    /// Stores `definition` as `user`'s workflow; its id.
    async fn create(&self, user: &str, definition: Value) -> String {
        let a = self.call(user, "POST", "/workflows", Some(json!({ "workflow": definition }))).await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        a.body["id"].as_str().unwrap().to_owned()
    }

    /// Saves `user`'s workflow `id` as a template; its id.
    async fn save(&self, user: &str, body: Value) -> String {
        let a = self.call(user, "POST", "/templates", Some(body)).await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        a.body["id"].as_str().unwrap().to_owned()
    }

    async fn workflow_count(&self, user: &str) -> usize {
        self.workflows.list(&[chainrun_core::ids::Principal::User(user.into())], 100, None).await.unwrap().items.len()
    }
}

fn greet(name: &str, prompt: &str) -> Value {
    json!({
        "name": name,
        "description": "Greets someone",
        "defaults": { "model": "amazon.nova-micro-v1:0" },
        "input_schema": { "type": "object", "required": ["name"] },
        "steps": [{ "id": "hello", "type": "llm", "prompt": format!("{prompt} {{{{ input.name }}}}"), "max_tokens": 50 }]
    })
}

const BUILTIN_IDS: [&str; 5] = ["feedback-analysis", "code-review", "sentiment-routing", "content-pipeline", "support-intake"];

#[tokio::test]
async fn the_list_shows_the_five_builtins_to_anyone_with_what_each_shows_and_no_definitions() {
    let api = api();
    let a = api.call("alice", "GET", "/templates", None).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let items = a.body["items"].as_array().unwrap();
    assert_eq!(items.iter().map(|t| t["id"].as_str().unwrap()).collect::<Vec<_>>(), BUILTIN_IDS);
    for t in items {
        assert_eq!(t["kind"], "builtin");
        assert!(!t["title"].as_str().unwrap().is_empty() && !t["description"].as_str().unwrap().is_empty(), "{t}");
        assert!(!t["shows"].as_array().unwrap().is_empty(), "{t}");
        assert_eq!(t["name"], t["id"], "a built-in's workflow is named as its id");
        assert_eq!((t["owner"].is_null(), t["source"].is_null()), (true, true));
        assert!(t.get("workflow").is_none(), "lists carry no definitions");
        assert_eq!(t["links"], json!({ "self": format!("/templates/{}", t["id"].as_str().unwrap()), "create_workflow": "/workflows" }));
    }
    assert_eq!(a.body["next"], Value::Null);
}

#[tokio::test]
async fn a_builtin_reads_whole_with_its_definition_and_an_example_input_it_accepts() {
    let api = api();
    for b in &BUILTINS {
        let a = api.call("bob", "GET", &format!("/templates/{}", b.id), None).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert_eq!(&a.body["workflow"], b.definition());
        assert_eq!(&a.body["example_input"], b.example_input());
        // The example is a valid input: an estimate of the definition on it is answered.
        let estimate =
            api.call("bob", "POST", "/workflows/estimate", Some(json!({ "workflow": a.body["workflow"], "input": a.body["example_input"] }))).await;
        assert_eq!(estimate.status, StatusCode::OK, "{}: {}", b.id, estimate.body);
    }
}

#[tokio::test]
async fn a_workflow_created_from_each_builtin_is_stored_at_version_1_with_its_definition_and_runs() {
    let api = api();
    for b in &BUILTINS {
        let a = api.call("alice", "POST", "/workflows", Some(json!({ "template": b.id }))).await;
        assert_eq!(a.status, StatusCode::CREATED, "{}: {}", b.id, a.body);
        assert_eq!((a.body["version"].as_u64(), a.body["owner"].as_str(), a.body["name"].as_str()), (Some(1), Some("alice"), Some(b.id)));
        assert_eq!(&a.body["workflow"], b.definition());
        let id = a.body["id"].as_str().unwrap();
        let run = api.call("alice", "POST", &format!("/workflows/{id}/runs"), Some(json!({ "input": b.example_input() }))).await;
        assert_eq!(run.status, StatusCode::ACCEPTED, "{}: {}", b.id, run.body);
    }
    assert_eq!(api.workflow_count("alice").await, BUILTINS.len());
}

#[tokio::test]
async fn a_workflow_created_from_a_template_can_be_given_its_own_name_and_visibility() {
    let api = api();
    let a = api.call("alice", "POST", "/workflows", Some(json!({ "template": "code-review", "name": "rust-review", "visibility": "AUTHED" }))).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    assert_eq!((a.body["name"].as_str(), a.body["workflow"]["name"].as_str()), (Some("rust-review"), Some("rust-review")));
    assert_eq!(a.body["visibility"], "AUTHED", "who may see it is chosen as for any new workflow");
    assert_eq!(a.body["workflow"]["steps"], BUILTINS[1].definition()["steps"]);
}

#[tokio::test]
async fn saving_a_workflow_version_as_a_template_answers_201_and_it_lists_after_the_builtins_for_its_owner_only() {
    let api = api();
    let wf = api.create("alice", greet("greet", "Hello")).await;
    let a = api.call("alice", "POST", "/templates", Some(json!({ "workflow_id": wf, "title": "  Greeter  " }))).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    let id = a.body["id"].as_str().unwrap().to_owned();
    assert_eq!(a.headers["location"], format!("/templates/{id}").as_str());
    assert_eq!(a.body["kind"], "saved");
    assert_eq!(
        (a.body["title"].as_str(), a.body["description"].as_str()),
        (Some("Greeter"), Some("Greets someone")),
        "the definition's description by default"
    );
    assert_eq!((a.body["owner"].as_str(), &a.body["source"]), (Some("alice"), &json!({ "workflow_id": wf, "version": 1 })));
    assert_eq!(a.body["workflow"], greet("greet", "Hello"));

    let listed = api.call("alice", "GET", "/templates", None).await;
    let ids: Vec<&str> = listed.body["items"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [&BUILTIN_IDS[..], &[id.as_str()]].concat());
    let read = api.call("alice", "GET", &format!("/templates/{id}"), None).await;
    assert_eq!((read.status, &read.body["workflow"]), (StatusCode::OK, &greet("greet", "Hello")));

    // Anyone else: not in their list, and the same 404 as an id that does not exist.
    let theirs = api.call("bob", "GET", "/templates", None).await;
    assert_eq!(theirs.body["items"].as_array().unwrap().len(), BUILTINS.len());
    for path in [format!("/templates/{id}"), format!("/templates/{}", chainrun_core::templates::TemplateId::new())] {
        let a = api.call("bob", "GET", &path, None).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.body);
        assert!(a.is_problem());
    }
    let a = api.call("bob", "POST", "/workflows", Some(json!({ "template": id }))).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.body);
    let a = api.call("bob", "DELETE", &format!("/templates/{id}"), None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.body);
    assert_eq!(api.workflow_count("bob").await, 0);
}

#[tokio::test]
async fn a_template_is_a_snapshot_of_the_version_saved_and_outlives_edits_and_the_workflow() {
    let api = api();
    let wf = api.create("alice", greet("greet", "Hello")).await;
    let put = api.call("alice", "PUT", &format!("/workflows/{wf}"), Some(json!({ "workflow": greet("greet", "Howdy"), "version": 1 }))).await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.body);
    let v1 = api.save("alice", json!({ "workflow_id": wf, "version": 1, "description": "the first greeting" })).await;
    let latest = api.save("alice", json!({ "workflow_id": wf })).await;
    let a = api.call("alice", "DELETE", &format!("/workflows/{wf}"), None).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);

    let from_v1 = api.call("alice", "POST", "/workflows", Some(json!({ "template": v1 }))).await;
    assert_eq!(from_v1.status, StatusCode::CREATED, "{}", from_v1.body);
    assert_eq!(from_v1.body["workflow"], greet("greet", "Hello"));
    let read = api.call("alice", "GET", &format!("/templates/{latest}"), None).await;
    assert_eq!((&read.body["source"]["version"], &read.body["workflow"]), (&json!(2), &greet("greet", "Howdy")));
    assert_eq!(read.body["description"], "Greets someone");
}

#[tokio::test]
async fn a_saved_template_can_be_deleted_by_its_owner_and_a_builtin_cannot() {
    let api = api();
    let wf = api.create("alice", greet("greet", "Hello")).await;
    let id = api.save("alice", json!({ "workflow_id": wf })).await;
    assert_eq!(api.call("alice", "DELETE", &format!("/templates/{id}"), None).await.status, StatusCode::NO_CONTENT);
    assert_eq!(api.call("alice", "GET", &format!("/templates/{id}"), None).await.status, StatusCode::NOT_FOUND);
    assert_eq!(api.call("alice", "DELETE", &format!("/templates/{id}"), None).await.status, StatusCode::NOT_FOUND, "a repeat deletes nothing more");
    let a = api.call("alice", "DELETE", "/templates/code-review", None).await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED, "{}", a.body);
    assert!(a.detail().contains("built-in"), "{}", a.body);
    assert_eq!(api.call("alice", "GET", "/templates/code-review", None).await.status, StatusCode::OK);
}

#[tokio::test]
async fn saving_refuses_bad_requests_naming_the_field_and_writes_nothing() {
    let api = api();
    let wf = api.create("alice", greet("greet", "Hello")).await;
    let long = "x".repeat(129);
    let cases: Vec<(Value, StatusCode, &str)> = vec![
        (json!({}), StatusCode::BAD_REQUEST, "missing field `workflow_id`"),
        (json!({ "workflow_id": wf, "titel": "x" }), StatusCode::BAD_REQUEST, "unknown field `titel`"),
        (json!({ "workflow_id": 7 }), StatusCode::BAD_REQUEST, "invalid type"),
        (json!({ "workflow_id": wf, "version": 0 }), StatusCode::BAD_REQUEST, "version: a version of the workflow, 1 to 999999; got 0"),
        (json!({ "workflow_id": wf, "version": "1" }), StatusCode::BAD_REQUEST, "invalid type"),
        (json!({ "workflow_id": wf, "title": "   " }), StatusCode::BAD_REQUEST, "title: must not be empty"),
        (json!({ "workflow_id": wf, "title": long }), StatusCode::BAD_REQUEST, "title: at most 128 characters"),
        (json!({ "workflow_id": wf, "description": "d".repeat(2001) }), StatusCode::BAD_REQUEST, "description: at most 2000 characters"),
        (json!({ "workflow_id": wf, "version": 2 }), StatusCode::NOT_FOUND, "has no version 2"),
        (json!({ "workflow_id": WorkflowId::new().to_string() }), StatusCode::NOT_FOUND, "no workflow"),
        (json!({ "workflow_id": "not-an-id" }), StatusCode::NOT_FOUND, "no workflow"),
    ];
    for (body, status, says) in cases {
        let a = api.call("alice", "POST", "/templates", Some(body.clone())).await;
        assert_eq!(a.status, status, "{body}: {}", a.body);
        assert!(a.is_problem() && a.detail().contains(says), "{body}: expected {says:?} in {}", a.body);
    }
    // Someone else's workflow is the same 404 as none.
    let a = api.call("bob", "POST", "/templates", Some(json!({ "workflow_id": wf }))).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.body);
    let a = api.call("alice", "POST", "/templates", None).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    let a = api.call("alice", "PUT", "/templates", Some(json!({ "workflow_id": wf }))).await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED, "{}", a.body);
    assert!(api.templates.is_empty(), "no refusal wrote a template");
}

#[tokio::test]
async fn creating_from_a_template_refuses_bad_requests_naming_what_is_wrong_and_writes_nothing() {
    let api = api();
    let cases: Vec<(Value, StatusCode, &str)> = vec![
        (json!({ "template": "no-such-template" }), StatusCode::NOT_FOUND, "no template \"no-such-template\""),
        (json!({ "template": chainrun_core::templates::TemplateId::new().to_string() }), StatusCode::NOT_FOUND, "no template"),
        (json!({ "template": "code-review", "workflow": greet("greet", "Hi") }), StatusCode::BAD_REQUEST, "either `workflow`"),
        (json!({ "workflow": greet("greet", "Hi"), "name": "other" }), StatusCode::BAD_REQUEST, "name: only with `template`"),
        (json!({ "name": "other" }), StatusCode::BAD_REQUEST, "missing field `workflow`"),
        (json!({}), StatusCode::BAD_REQUEST, "missing field `workflow`"),
        (json!({ "template": "code-review", "nmae": "x" }), StatusCode::BAD_REQUEST, "unknown field `nmae`"),
        (json!({ "template": 3 }), StatusCode::BAD_REQUEST, "invalid type"),
        // The template's definition is validated like any write: a bad name is the usual 400.
        (json!({ "template": "code-review", "name": "" }), StatusCode::BAD_REQUEST, "name"),
        (json!({ "template": "code-review", "name": "n".repeat(129) }), StatusCode::BAD_REQUEST, "name"),
    ];
    for (body, status, says) in cases {
        let a = api.call("alice", "POST", "/workflows", Some(body.clone())).await;
        assert_eq!(a.status, status, "{body}: {}", a.body);
        assert!(a.is_problem() && a.detail().contains(says), "{body}: expected {says:?} in {}", a.body);
    }
    assert_eq!(api.workflow_count("alice").await, 0, "no refusal stored a workflow");
}

#[tokio::test]
async fn the_list_pages_through_builtins_then_saved_templates_newest_first_without_gaps_repeats_or_empty_pages() {
    let api = api();
    let wf = api.create("alice", greet("greet", "Hello")).await;
    let mut saved = Vec::new();
    for i in 0..4 {
        saved.push(api.save("alice", json!({ "workflow_id": wf, "title": format!("t{i}") })).await);
        // Distinct creation times, so newest first is one order.
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    saved.reverse();
    let everything: Vec<String> = BUILTIN_IDS.iter().map(|s| s.to_string()).chain(saved.iter().cloned()).collect();
    for limit in [1, 2, 3, 4, 5, 6, 9, 10, 100] {
        let (mut seen, mut next, mut pages) = (Vec::new(), None::<String>, 0);
        loop {
            let path = match &next {
                Some(cursor) => format!("/templates?limit={limit}&next={cursor}"),
                None => format!("/templates?limit={limit}"),
            };
            let a = api.call("alice", "GET", &path, None).await;
            assert_eq!(a.status, StatusCode::OK, "{}", a.body);
            let items = a.body["items"].as_array().unwrap();
            assert!(!items.is_empty() && items.len() <= limit, "limit {limit}: page of {}", items.len());
            seen.extend(items.iter().map(|t| t["id"].as_str().unwrap().to_owned()));
            pages += 1;
            match a.body["next"].as_str() {
                Some(cursor) => next = Some(cursor.to_owned()),
                None => break,
            }
        }
        assert_eq!(seen, everything, "limit {limit}");
        assert_eq!(pages, everything.len().div_ceil(limit), "limit {limit}");
    }
    for bad in ["limit=0", "limit=101", "limit=x", "next=garbage", "sort=new"] {
        let a = api.call("alice", "GET", &format!("/templates?{bad}"), None).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{bad}: {}", a.body);
        assert!(a.is_problem(), "{bad}");
    }
}

#[tokio::test]
async fn templates_need_a_token() {
    let api = api();
    let req = Request::builder().uri("/templates").body(Body::empty()).unwrap();
    let res = app(api.state.clone()).oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}
