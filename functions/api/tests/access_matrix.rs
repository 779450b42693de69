//! The access matrix: every visibility × every kind of caller × every route that acts on a
//! stored workflow or its run, through the real router with in-memory ports.
//!
//! For each cell a fresh workflow (and runs of it, started by its owner) is made, and each
//! route is called as that caller. The expected answer comes from one table of who holds
//! which role (below), written from the README's words, not from the code: what a caller
//! may not see is a `404` that reads like an unknown id; what they see but may not do is a
//! `403`; what they may do passes the access check (and answers what the route answers).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use axum::body::Body;
use chainrun_api::{AppState, app};
use chainrun_core::ids::{Principal, RunId};
use chainrun_core::memory::MemoryStore;
use chainrun_core::ports::RunStore;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::sync::Arc;
use tower::ServiceExt;

mod support;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    View,
    Run,
    Edit,
    Control,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Owner,
    SharedView,
    SharedRun,
    SharedEdit,
    SharedControl,
    GroupMember,
    Other,
    Admin,
    Anonymous,
}

const CALLERS: [Caller; 9] = [
    Caller::Owner,
    Caller::SharedView,
    Caller::SharedRun,
    Caller::SharedEdit,
    Caller::SharedControl,
    Caller::GroupMember,
    Caller::Other,
    Caller::Admin,
    Caller::Anonymous,
];

const VISIBILITIES: [&str; 5] = ["PRIVATE", "SHARED", "AUTHED", "PUBLIC", "ADMIN_ONLY"];

impl Caller {
    /// The token's subject and groups; `None` for no token at all.
    fn who(self) -> Option<(&'static str, &'static [&'static str])> {
        match self {
            Caller::Owner => Some(("olivia", &[])),
            Caller::SharedView => Some(("vera", &[])),
            Caller::SharedRun => Some(("rui", &[])),
            Caller::SharedEdit => Some(("eddie", &[])),
            Caller::SharedControl => Some(("cora", &[])),
            Caller::GroupMember => Some(("gus", &["support"])),
            Caller::Other => Some(("oscar", &["sales"])),
            Caller::Admin => Some(("ada", &["admin"])),
            Caller::Anonymous => None,
        }
    }

    /// The role this caller holds on a workflow of `visibility` (the README's table).
    fn on_workflow(self, visibility: &str) -> Option<Role> {
        match (self, visibility) {
            (Caller::Owner | Caller::Admin, _) => Some(Role::Control),
            (Caller::SharedView, "SHARED") => Some(Role::View),
            (Caller::SharedRun | Caller::GroupMember, "SHARED") => Some(Role::Run),
            (Caller::SharedEdit, "SHARED") => Some(Role::Edit),
            (Caller::SharedControl, "SHARED") => Some(Role::Control),
            (Caller::Anonymous, "AUTHED") => None,
            (_, "AUTHED" | "PUBLIC") => Some(Role::Run),
            _ => None,
        }
    }

    /// The role this caller holds on a run of such a workflow its owner started: the
    /// starter and admins control it, `control` shares too; whoever sees the workflow
    /// reads it.
    fn on_run(self, visibility: &str) -> Option<Role> {
        match self.on_workflow(visibility)? {
            Role::Control => Some(Role::Control),
            _ => Some(Role::View),
        }
    }

    fn may_administer(self) -> bool {
        matches!(self, Caller::Owner | Caller::Admin)
    }
}

fn definition() -> Value {
    json!({
        "name": "triage",
        "defaults": { "model": "amazon.nova-micro-v1:0" },
        "steps": [{ "id": "answer", "type": "llm", "prompt": "Answer {{ input.q }}", "max_tokens": 50 }]
    })
}

fn access_of(visibility: &str) -> Value {
    match visibility {
        "SHARED" => json!({
            "visibility": "SHARED",
            "shares": [
                { "user": "vera", "role": "view" },
                { "user": "rui", "role": "run" },
                { "user": "eddie", "role": "edit" },
                { "user": "cora", "role": "control" },
                { "group": "support", "role": "run" }
            ]
        }),
        other => json!({ "visibility": other }),
    }
}

struct Api {
    store: Arc<MemoryStore>,
    progress: Arc<chainrun_core::memory::MemoryProgress>,
    state: AppState,
}

struct Answer {
    status: StatusCode,
    content_type: String,
    body: Value,
}

impl Api {
    fn new() -> Self {
        let p = support::local_ports();
        Self { store: p.store, progress: p.progress, state: p.state }
    }

    /// `path` as `caller`: with their token, or without any under `/public` (where a
    /// caller without a token is served) when `public` is set.
    async fn send(&self, caller: Caller, method: &str, path: &str, body: Option<Value>, public: bool) -> Answer {
        let mut req = Request::builder().method(method).header("content-type", "application/json").header("if-match", "*");
        let uri = match caller.who() {
            Some((sub, groups)) => {
                req = req.header("authorization", format!("Bearer {}", support::token_signed(support::SECRET, sub, groups, 3600)));
                path.to_owned()
            }
            None if public => format!("/public{path}"),
            None => path.to_owned(),
        };
        let body = body.map(|b| Body::from(b.to_string())).unwrap_or_else(Body::empty);
        let res = app(self.state.clone()).oneshot(req.uri(uri).body(body).unwrap()).await.unwrap();
        let status = res.status();
        let content_type = res.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
        Answer { status, content_type, body }
    }

    /// A workflow of `visibility` owned by olivia (`ADMIN_ONLY` is set by an admin).
    async fn workflow(&self, visibility: &str) -> String {
        let initial = if visibility == "ADMIN_ONLY" { json!({ "visibility": "PRIVATE" }) } else { access_of(visibility) };
        let mut body = json!({ "workflow": definition() });
        body.as_object_mut().unwrap().extend(initial.as_object().unwrap().clone());
        let a = self.send(Caller::Owner, "POST", "/workflows", Some(body), false).await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        let id = a.body["id"].as_str().unwrap().to_owned();
        if visibility == "ADMIN_ONLY" {
            let a = self.send(Caller::Admin, "PUT", &format!("/workflows/{id}/access"), Some(access_of("ADMIN_ONLY")), false).await;
            assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        }
        id
    }

    /// A run of workflow `id` started by its owner.
    async fn run(&self, id: &str) -> String {
        let a = self.send(Caller::Owner, "POST", &format!("/workflows/{id}/runs"), Some(json!({ "input": { "q": "?" } })), false).await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
        a.body["run_id"].as_str().unwrap().to_owned()
    }
}

impl Api {
    /// Publishes a run's first event to its owners' feeds, as the runner does.
    async fn publish_start(&self, run: &chainrun_core::run::RunRecord) {
        use chainrun_core::ports::ProgressSink;
        use chainrun_core::run::{Event, EventType, ProgressRow, RunStatus, Totals};
        let event = Event {
            run_id: run.id.clone(),
            seq: 1,
            at: chrono::Utc::now(),
            kind: EventType::RunStarted,
            step_id: None,
            attempt: None,
            revision: 0,
            data: json!({}),
        };
        let row = ProgressRow {
            run_id: run.id.clone(),
            workflow: run.workflow.clone(),
            status: RunStatus::Running,
            current_step: None,
            totals: Totals::default(),
            last_seq: 1,
            updated_at: chrono::Utc::now(),
            waiting: None,
        };
        self.progress.publish(&event, &row, &run.owners).await.unwrap();
    }
}

/// What a route answers a caller, judged against the role it takes.
fn judge(cell: &str, a: &Answer, held: Option<Role>, needed: Role, allowed: &[StatusCode]) {
    assert!(a.status.as_u16() < 500, "{cell}: {} {}", a.status, a.body);
    match held {
        None => {
            assert_eq!(a.status, StatusCode::NOT_FOUND, "{cell}: hidden, so 404: {}", a.body);
            let detail = a.body["detail"].as_str().unwrap_or_default();
            assert!(detail.starts_with("no run") || detail.starts_with("no workflow"), "{cell}: a 404 that reads like an unknown id: {detail}");
        }
        Some(held) if held < needed => assert_eq!(a.status, StatusCode::FORBIDDEN, "{cell}: seen but not allowed, so 403: {}", a.body),
        Some(_) => assert!(allowed.contains(&a.status), "{cell}: allowed, got {} {}", a.status, a.body),
    }
    if !a.status.is_success() {
        assert_eq!(a.content_type, "application/problem+json", "{cell}");
    }
}

#[tokio::test]
async fn every_visibility_caller_and_route_answers_as_the_roles_say() {
    use StatusCode as S;
    let api = Api::new();
    for visibility in VISIBILITIES {
        for caller in CALLERS {
            let cell = |route: &str| format!("{visibility} × {caller:?} × {route}");
            let id = api.workflow(visibility).await;
            let wf = caller.on_workflow(visibility);
            let w = |p: &str| format!("/workflows/{id}{p}");
            // A caller without a token only gets anywhere under /public, and only there.
            let public = caller == Caller::Anonymous;

            let a = api.send(caller, "GET", &w(""), None, public).await;
            judge(&cell("GET workflow"), &a, wf, Role::View, &[S::OK]);
            if a.status == S::OK {
                assert_eq!(a.body["visibility"], visibility, "{}", cell("GET workflow shows its visibility"));
            }
            let a = api.send(caller, "POST", &w("/estimate"), Some(json!({ "input": { "q": "?" } })), public).await;
            judge(&cell("POST estimate"), &a, wf, Role::Run, &[S::OK]);
            let a = api.send(caller, "POST", &w("/runs"), Some(json!({ "input": { "q": "?" } })), public).await;
            judge(&cell("POST runs"), &a, wf, Role::Run, &[S::ACCEPTED]);
            if a.status == S::ACCEPTED {
                // Their own run: they control it, and see it in their feeds.
                let mine = a.body["run_id"].as_str().unwrap().to_owned();
                let stored = api.store.get_run(&RunId::parse(&mine).unwrap()).await.unwrap().unwrap();
                if caller == Caller::Anonymous {
                    assert!(stored.owners.contains(&Principal::Public), "{}", cell("an anonymous run is on the public feed"));
                } else {
                    assert!(stored.owners.contains(&Principal::User(caller.who().unwrap().0.into())), "{}", cell("the starter's feed"));
                }
                assert!(stored.owners.contains(&Principal::User("olivia".into())), "{}", cell("the workflow owner's feed"));
            }

            // Writes by anonymous callers have no /public route at all: 401 without a token.
            if caller == Caller::Anonymous {
                for (method, path) in [("PUT", w("")), ("PUT", w("/access")), ("DELETE", w("")), ("POST", w("/duplicate"))] {
                    let a = api.send(caller, method, &path, Some(json!({ "workflow": definition() })), false).await;
                    assert_eq!(a.status, S::UNAUTHORIZED, "{}", cell(&format!("{method} {path} without a token")));
                    let a = api.send(caller, method, &path, Some(json!({ "workflow": definition() })), true).await;
                    assert!(matches!(a.status, S::NOT_FOUND | S::METHOD_NOT_ALLOWED), "{}: {}", cell(&format!("{method} /public{path}")), a.status);
                }
            } else {
                let a = api.send(caller, "PUT", &w(""), Some(json!({ "workflow": definition() })), false).await;
                judge(&cell("PUT workflow"), &a, wf, Role::Edit, &[S::OK]);
                let a = api.send(caller, "POST", &w("/duplicate"), None, false).await;
                judge(&cell("POST duplicate"), &a, wf, Role::View, &[S::CREATED]);
                // Re-sharing and deleting: the owner and admins only (403 to anyone else who sees it).
                let admin_role = wf.map(|_| if caller.may_administer() { Role::Control } else { Role::View });
                let a = api.send(caller, "PUT", &w("/access"), Some(access_of(visibility)), false).await;
                if visibility == "ADMIN_ONLY" && caller == Caller::Owner {
                    // An owner outside the admin group keeps their workflow but cannot make it ADMIN_ONLY.
                    assert_eq!(a.status, S::BAD_REQUEST, "{}: {}", cell("PUT access"), a.body);
                } else {
                    judge(&cell("PUT access"), &a, admin_role, Role::Control, &[S::OK]);
                }
            }

            // The run olivia started, as this caller.
            let run_role = caller.on_run(visibility);
            let run = api.run(&id).await;
            let r = |p: &str| format!("/runs/{run}{p}");
            let a = api.send(caller, "GET", &r(""), None, public).await;
            judge(&cell("GET run"), &a, run_role, Role::View, &[S::OK]);
            let a = api.send(caller, "GET", &r("/events"), None, public).await;
            judge(&cell("GET events"), &a, run_role, Role::View, &[S::OK]);
            let a = api.send(caller, "GET", &r("/output"), None, public).await;
            judge(&cell("GET output"), &a, run_role, Role::View, &[S::NOT_FOUND]);
            let a = api.send(caller, "GET", &r("/steps/answer/output"), None, public).await;
            judge(&cell("GET step output"), &a, run_role, Role::View, &[S::NOT_FOUND]);
            let stored = api.store.get_run(&RunId::parse(&run).unwrap()).await.unwrap().unwrap();
            let principals: Vec<Principal> = match caller.who() {
                None => vec![Principal::Public],
                Some((sub, groups)) => {
                    let mut p = vec![Principal::User(sub.into()), Principal::Authed, Principal::Public];
                    p.extend(groups.iter().map(|g| Principal::Group((*g).into())));
                    if groups.contains(&"admin") {
                        p.push(Principal::Admin);
                    }
                    p
                }
            };
            assert_eq!(
                stored.owners.iter().any(|o| principals.contains(o)),
                run_role.is_some(),
                "{}: a feed of theirs shows the run exactly when they may see it ({:?})",
                cell("progress rows"),
                stored.owners
            );
            // What the runner writes for the run's first event; then the caller's feeds
            // (their own and the shared ones) and history show it exactly when they may see it.
            api.publish_start(&stored).await;
            let feeds = api.send(caller, "GET", "/progress?limit=1000&include=shared", None, public).await;
            assert_eq!(feeds.status, S::OK, "{}: {}", cell("GET progress"), feeds.body);
            let listed = feeds.body["items"].as_array().unwrap().iter().any(|row| row["run_id"] == run.as_str());
            assert_eq!(listed, run_role.is_some(), "{}", cell("GET progress shows the run"));
            if caller != Caller::Anonymous {
                let history = api.send(caller, "GET", "/runs?workflow=triage&limit=100", None, false).await;
                assert_eq!(history.status, S::OK, "{}: {}", cell("GET runs"), history.body);
                let listed = history.body["items"].as_array().unwrap().iter().any(|r| r["run_id"] == run.as_str());
                assert_eq!(listed, run_role.is_some(), "{}", cell("GET runs lists the run"));
            }

            if caller == Caller::Anonymous {
                for path in [r("/cancel"), r("/pause"), r("/resume"), r("/steps/answer/retry")] {
                    let a = api.send(caller, "POST", &path, None, false).await;
                    assert_eq!(a.status, S::UNAUTHORIZED, "{}", cell(&format!("POST {path} without a token")));
                    let a = api.send(caller, "POST", &path, None, true).await;
                    assert!(matches!(a.status, S::NOT_FOUND | S::METHOD_NOT_ALLOWED), "{}", cell(&format!("POST /public{path}")));
                }
                continue;
            }
            // Steering: `control` on the run. The run is queued, so a resume, retry or
            // override that passes the access check meets a 409 (nothing to resume, not
            // ended), which is what tells it passed.
            let a = api.send(caller, "POST", &r("/resume"), None, false).await;
            judge(&cell("POST resume"), &a, run_role, Role::Control, &[S::CONFLICT]);
            let a = api.send(caller, "POST", &r("/steps/answer/retry"), None, false).await;
            judge(&cell("POST retry"), &a, run_role, Role::Control, &[S::CONFLICT]);
            let a = api.send(caller, "PUT", &r("/steps/answer/output"), Some(json!({ "output": "x" })), false).await;
            judge(&cell("PUT step output"), &a, run_role, Role::Control, &[S::CONFLICT]);
            let a = api.send(caller, "POST", &r("/pause"), None, false).await;
            judge(&cell("POST pause"), &a, run_role, Role::Control, &[S::ACCEPTED]);
            let other = api.run(&id).await;
            let a = api.send(caller, "POST", &format!("/runs/{other}/cancel"), None, false).await;
            judge(&cell("POST cancel"), &a, run_role, Role::Control, &[S::ACCEPTED]);

            // Deleting last (it ends the cell's workflow).
            let a = api.send(caller, "DELETE", &w(""), None, false).await;
            let admin_role = wf.map(|_| if caller.may_administer() { Role::Control } else { Role::View });
            judge(&cell("DELETE workflow"), &a, admin_role, Role::Control, &[S::NO_CONTENT]);
        }
    }
}

#[tokio::test]
async fn lists_show_exactly_the_workflows_and_runs_a_caller_may_see() {
    let api = Api::new();
    let mut ids = Vec::new();
    for visibility in VISIBILITIES {
        ids.push((visibility, api.workflow(visibility).await));
    }
    for caller in CALLERS.into_iter().filter(|c| *c != Caller::Anonymous) {
        let a = api.send(caller, "GET", "/workflows?limit=100", None, false).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        let listed: Vec<&str> = a.body["items"].as_array().unwrap().iter().map(|w| w["id"].as_str().unwrap()).collect();
        for (visibility, id) in &ids {
            assert_eq!(listed.contains(&id.as_str()), caller.on_workflow(visibility).is_some(), "{visibility} × {caller:?} in GET /workflows");
        }
        assert_eq!(listed.len(), ids.iter().filter(|(v, _)| caller.on_workflow(v).is_some()).count(), "{caller:?}: each once");
    }
}

#[tokio::test]
async fn a_run_may_be_narrower_than_its_workflow_never_wider_and_inline_runs_take_the_same_options() {
    let api = Api::new();
    let authed = api.workflow("AUTHED").await;
    let start = |options: Value| json!({ "input": { "q": "?" }, "options": options });
    let wider = api.send(Caller::Owner, "POST", &format!("/workflows/{authed}/runs"), Some(start(json!({ "visibility": "PUBLIC" }))), false).await;
    assert_eq!(wider.status, StatusCode::BAD_REQUEST, "{}", wider.body);
    assert!(wider.body["detail"].as_str().unwrap().contains("never wider"), "{}", wider.body);
    let narrower =
        api.send(Caller::Owner, "POST", &format!("/workflows/{authed}/runs"), Some(start(json!({ "visibility": "PRIVATE" }))), false).await;
    assert_eq!(narrower.status, StatusCode::ACCEPTED, "{}", narrower.body);
    let run = narrower.body["run_id"].as_str().unwrap();
    assert_eq!(api.send(Caller::Other, "GET", &format!("/runs/{run}"), None, false).await.status, StatusCode::NOT_FOUND);
    assert_eq!(api.send(Caller::Admin, "GET", &format!("/runs/{run}"), None, false).await.status, StatusCode::OK);

    // Inline runs: PRIVATE unless said otherwise; PUBLIC ones are read without a token.
    let inline = |options: Value| json!({ "workflow": definition(), "input": { "q": "?" }, "options": options });
    let a = api.send(Caller::Other, "POST", "/runs", Some(inline(json!({ "visibility": "PUBLIC" }))), false).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    let public_run = a.body["run_id"].as_str().unwrap().to_owned();
    assert_eq!(api.send(Caller::Anonymous, "GET", &format!("/runs/{public_run}"), None, true).await.status, StatusCode::OK);
    assert_eq!(api.send(Caller::Anonymous, "POST", &format!("/runs/{public_run}/cancel"), None, true).await.status, StatusCode::NOT_FOUND);
    let a = api
        .send(
            Caller::Other,
            "POST",
            "/runs",
            Some(inline(json!({ "visibility": "SHARED", "shares": [{ "group": "support", "role": "control" }] }))),
            false,
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    let shared_run = a.body["run_id"].as_str().unwrap().to_owned();
    assert_eq!(api.send(Caller::GroupMember, "POST", &format!("/runs/{shared_run}/cancel"), None, false).await.status, StatusCode::ACCEPTED);
    assert_eq!(api.send(Caller::SharedView, "GET", &format!("/runs/{shared_run}"), None, false).await.status, StatusCode::NOT_FOUND);

    // Bad options name the field and store nothing.
    let before = api.store.run_count();
    for (options, says) in [
        (json!({ "visibility": "FRIENDS" }), "visibility"),
        (json!({ "visibility": "SHARED" }), "shares"),
        (json!({ "shares": [{ "user": "x", "role": "view" }] }), "shares"),
        (json!({ "visibility": "ADMIN_ONLY" }), "admin"),
        (json!({ "visibility": "PUBLIC", "shares": [{ "user": "x", "role": "view" }] }), "shares"),
    ] {
        let a = api.send(Caller::Other, "POST", "/runs", Some(inline(options.clone())), false).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{options}: {}", a.body);
        assert!(a.body["detail"].as_str().unwrap().contains(says), "{options}: {}", a.body);
    }
    assert_eq!(api.store.run_count(), before, "nothing stored");
}

#[tokio::test]
async fn a_workflow_made_narrower_narrows_its_runs_at_once() {
    let api = Api::new();
    let id = api.workflow("PUBLIC").await;
    let run = api.run(&id).await;
    assert_eq!(api.send(Caller::Anonymous, "GET", &format!("/runs/{run}"), None, true).await.status, StatusCode::OK);
    assert_eq!(api.send(Caller::Other, "GET", &format!("/runs/{run}"), None, false).await.status, StatusCode::OK);
    let a = api.send(Caller::Owner, "PUT", &format!("/workflows/{id}/access"), Some(json!({ "visibility": "PRIVATE" })), false).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["visibility"], "PRIVATE");
    assert_eq!(api.send(Caller::Anonymous, "GET", &format!("/runs/{run}"), None, true).await.status, StatusCode::NOT_FOUND);
    assert_eq!(api.send(Caller::Other, "GET", &format!("/runs/{run}"), None, false).await.status, StatusCode::NOT_FOUND);
    assert_eq!(api.send(Caller::Owner, "GET", &format!("/runs/{run}"), None, false).await.status, StatusCode::OK);
    // Only the owner and admins re-share; ADMIN_ONLY only from an admin.
    let a = api.send(Caller::Owner, "PUT", &format!("/workflows/{id}/access"), Some(json!({ "visibility": "ADMIN_ONLY" })), false).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
}

#[tokio::test]
async fn a_caller_without_a_token_may_not_start_a_run_that_asks_its_starter() {
    let api = Api::new();
    let gated = json!({
        "name": "gated",
        "defaults": { "model": "amazon.nova-micro-v1:0" },
        "steps": [
            { "id": "draft", "type": "llm", "prompt": "Draft {{ input.q }}", "max_tokens": 50 },
            { "id": "approve", "type": "review", "depends_on": ["draft"], "show": "{{ steps.draft.text }}" }
        ]
    });
    let a = api.send(Caller::Owner, "POST", "/workflows", Some(json!({ "workflow": gated, "visibility": "PUBLIC" })), false).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    let id = a.body["id"].as_str().unwrap();
    let before = api.store.run_count();
    let a = api.send(Caller::Anonymous, "POST", &format!("/workflows/{id}/runs"), Some(json!({ "input": { "q": "?" } })), true).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert!(a.body["detail"].as_str().unwrap().contains("step approve"), "{}", a.body);
    assert_eq!(api.store.run_count(), before);
}

#[tokio::test]
async fn a_run_started_without_a_token_can_be_retried_by_its_workflows_owner_once_it_ended() {
    use chainrun_core::engine::{Engine, EngineConfig};
    use chainrun_core::memory::{Script, ScriptedModel};
    use chainrun_core::ports::{Claim, Lease};
    let api = Api::new();
    let id = api.workflow("PUBLIC").await;
    let a = api.send(Caller::Anonymous, "POST", &format!("/workflows/{id}/runs"), Some(json!({ "input": { "q": "?" } })), true).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    let run = RunId::parse(a.body["run_id"].as_str().unwrap()).unwrap();
    // The runner runs it to its end, publishing to its feeds (its starter has none).
    let model = Arc::new(ScriptedModel::new(vec![Script::reply("Answer", "42")]));
    let engine = Engine::new(
        model,
        api.store.clone(),
        api.progress.clone(),
        Arc::new(chainrun_core::pricing::ModelRegistry::builtin()),
        EngineConfig::default(),
    );
    let lease = Lease { holder: "r".into(), expires_at: chrono::Utc::now() + chrono::Duration::minutes(5) };
    let Claim::Acquired(claimed) = api.store.claim(&run, &lease, chrono::Utc::now()).await.unwrap() else { panic!("not claimed") };
    engine.execute(*claimed, lease, None).await.unwrap();

    // Its end is on the feeds it has, so the owner's retry starts revision 1 (not a 409 waiting
    // for an end on the feed of a starter who has none).
    let a = api.send(Caller::Owner, "POST", &format!("/runs/{run}/steps/answer/retry"), None, false).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    assert_eq!(a.body["revision"], 1);
}
