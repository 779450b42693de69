//! Fair limits per tenant through the real router (`app(state).oneshot`) with in-memory
//! ports: starts per minute and concurrent runs answer `429` with `Retry-After` and store
//! nothing, another tenant is unaffected, an ended run's slot comes back, and oversize
//! bodies and definitions answer `413`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is the failure report

use axum::body::Body;
use chainrun_api::app;
use chainrun_core::ids::{Principal, RunId};
use chainrun_core::memory::{MemoryDispatcher, MemoryQuota, MemoryStore};
use chainrun_core::ports::{Claim, Lease, RunStore};
use chainrun_core::quota::{Slots, TenantLimits};
use chainrun_core::run::RunStatus;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::sync::Arc;
use tower::ServiceExt;

mod support;

struct Api {
    store: Arc<MemoryStore>,
    progress: Arc<chainrun_core::memory::MemoryProgress>,
    dispatcher: Arc<MemoryDispatcher>,
    quota: Arc<MemoryQuota>,
    state: chainrun_api::AppState,
}

fn api(limits: TenantLimits) -> Api {
    let mut p = support::local_ports();
    p.state.limits = Arc::new(limits);
    Api { store: p.store, progress: p.progress, dispatcher: p.dispatcher, quota: p.quota, state: p.state }
}

fn limits(starts: Option<u64>, concurrent: Option<u64>) -> TenantLimits {
    TenantLimits { starts_per_minute: starts, concurrent_runs: concurrent, ..TenantLimits::default() }
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Value,
}

impl Api {
    async fn raw(&self, user: &str, method: &str, path: &str, body: Body) -> Answer {
        let token = support::token_signed(support::SECRET, user, &[], 3600);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(body)
            .unwrap();
        let res = app(self.state.clone()).oneshot(req).await.unwrap();
        let (status, headers) = (res.status(), res.headers().clone());
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
        Answer { status, headers, body }
    }

    async fn call(&self, user: &str, method: &str, path: &str, body: Value) -> Answer {
        self.raw(user, method, path, Body::from(body.to_string())).await
    }

    async fn start(&self, user: &str) -> Answer {
        self.call(user, "POST", "/runs", json!({ "workflow": workflow("x"), "input": {} })).await
    }

    /// The runs `user` started, as `GET /runs` lists them.
    async fn started(&self, user: &str) -> usize {
        let a = self.raw(user, "GET", "/runs?limit=100", Body::empty()).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        a.body["items"].as_array().unwrap().len()
    }

    /// Ends `run` as a runner would (claim, then finish `COMPLETED`), without releasing its slot.
    async fn end(&self, run: &RunId) {
        let lease = Lease { holder: "test".into(), expires_at: chrono::Utc::now() + chrono::Duration::minutes(1) };
        let Claim::Acquired(mut record) = self.store.claim(run, &lease, chrono::Utc::now()).await.unwrap() else { panic!("not claimed") };
        record.status = RunStatus::Completed;
        record.finished_at = Some(chrono::Utc::now());
        self.store.finish_run(&record, &lease).await.unwrap();
    }
}

fn workflow(prompt: &str) -> Value {
    json!({ "name": "w", "defaults": { "model": "amazon.nova-micro-v1:0" }, "steps": [{ "id": "a", "type": "llm", "prompt": prompt, "max_tokens": 20 }] })
}

fn assert_too_many(a: &Answer, max_retry_after: u64) -> u64 {
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
    assert_eq!(a.headers["content-type"], "application/problem+json");
    let retry_after: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=max_retry_after).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(a.body["retry_after"], json!(retry_after));
    assert_eq!(a.body["status"], 429);
    retry_after
}

#[tokio::test]
async fn starts_past_the_minutes_limit_answer_429_with_retry_after_and_store_nothing() {
    let api = api(limits(Some(3), None));
    for _ in 0..3 {
        assert_eq!(api.start("alice").await.status, StatusCode::ACCEPTED);
    }
    let refused = api.start("alice").await;
    assert_too_many(&refused, 60);
    assert!(refused.body["detail"].as_str().unwrap().contains("3 runs a minute"), "{}", refused.body);
    assert_eq!(api.started("alice").await, 3, "the refused start stored no run");
    assert_eq!(api.dispatcher.dispatched().len(), 3, "and dispatched none");
    // The other route that starts runs counts against the same limit.
    let created = api.call("alice", "POST", "/workflows", json!({ "workflow": workflow("stored") })).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.body["id"].as_str().unwrap();
    assert_too_many(&api.call("alice", "POST", &format!("/workflows/{id}/runs"), json!({ "input": {} })).await, 60);
}

#[tokio::test]
async fn another_tenant_is_unaffected_by_one_that_is_refused() {
    let api = api(limits(Some(2), Some(2)));
    for _ in 0..2 {
        assert_eq!(api.start("alice").await.status, StatusCode::ACCEPTED);
    }
    assert_too_many(&api.start("alice").await, 60);
    for _ in 0..2 {
        assert_eq!(api.start("bob").await.status, StatusCode::ACCEPTED, "bob has his own limits");
    }
    assert_eq!((api.started("alice").await, api.started("bob").await), (2, 2));
}

#[tokio::test]
async fn concurrent_runs_past_the_limit_answer_429_and_an_ended_runs_slot_comes_back() {
    let api = api(limits(None, Some(2)));
    let first = api.start("alice").await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    assert_eq!(api.start("alice").await.status, StatusCode::ACCEPTED);
    let refused = api.start("alice").await;
    let retry_after = assert_too_many(&refused, 60);
    assert_eq!(retry_after, 10);
    assert!(refused.body["detail"].as_str().unwrap().contains("concurrent runs"), "{}", refused.body);
    assert_eq!(api.started("alice").await, 2);

    // The first run ends without giving its slot back (its runner died at the very end):
    // the next start finds the set full, sees the run ended, and reclaims its slot.
    let run = RunId::parse(first.body["run_id"].as_str().unwrap()).unwrap();
    api.end(&run).await;
    let slots = Slots { tenant: Principal::User("alice".into()), shard: 0 };
    assert!(api.quota.holders(&slots).contains(&run));
    assert_eq!(api.start("alice").await.status, StatusCode::ACCEPTED, "the ended run's slot was reclaimed");
    assert!(!api.quota.holders(&slots).contains(&run));
    assert_eq!(api.quota.holders(&slots).len(), 2);
}

#[tokio::test]
async fn a_start_refused_for_its_rate_gives_its_slot_back() {
    let api = api(limits(Some(1), Some(5)));
    assert_eq!(api.start("alice").await.status, StatusCode::ACCEPTED);
    assert_too_many(&api.start("alice").await, 60);
    let slots = Slots { tenant: Principal::User("alice".into()), shard: 0 };
    assert_eq!(api.quota.holders(&slots).len(), 1, "only the admitted run holds a slot");
}

#[tokio::test]
async fn a_definition_over_its_limit_answers_413_on_every_route_that_takes_one_and_stores_nothing() {
    let api = api(TenantLimits { max_definition_bytes: 2048, ..limits(None, None) });
    let big = workflow(&"x".repeat(3000));
    for (path, body) in [
        ("/runs", json!({ "workflow": big, "input": {} })),
        ("/workflows", json!({ "workflow": big })),
        ("/workflows/estimate", json!({ "workflow": big, "input": {} })),
    ] {
        let a = api.call("alice", "POST", path, body).await;
        assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE, "{path}: {}", a.body);
        assert_eq!(a.body["type"], "urn:chainrun:problem:definition-too-large");
        assert!(a.body["detail"].as_str().unwrap().contains("at most 2048"), "{}", a.body);
    }
    // An update too.
    let created = api.call("alice", "POST", "/workflows", json!({ "workflow": workflow("small") })).await;
    let id = created.body["id"].as_str().unwrap().to_owned();
    let token = support::token_signed(support::SECRET, "alice", &[], 3600);
    let req = Request::builder()
        .method("PUT")
        .uri(format!("/workflows/{id}"))
        .header("authorization", format!("Bearer {token}"))
        .header("if-match", "\"1\"")
        .body(Body::from(json!({ "workflow": big }).to_string()))
        .unwrap();
    assert_eq!(app(api.state.clone()).oneshot(req).await.unwrap().status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(api.started("alice").await, 0);
    assert!(api.dispatcher.dispatched().is_empty());
    // At the limit, it runs.
    assert_eq!(api.start("alice").await.status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn a_body_over_the_request_limit_answers_413_before_anything_reads_it() {
    let api = api(TenantLimits { max_request_bytes: 4096, max_definition_bytes: 4096, ..limits(None, None) });
    let body = json!({ "workflow": workflow("x"), "input": { "pad": "y".repeat(5000) } });
    let a = api.call("alice", "POST", "/runs", body).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", a.body);
    assert_eq!(a.body["type"], "urn:chainrun:problem:payload-too-large");
    // The body above came without a Content-Length, and was measured as it was read; one
    // that declares too much is refused before it is read at all.
    let token = support::token_signed(support::SECRET, "alice", &[], 3600);
    let req = Request::builder()
        .method("POST")
        .uri("/workflows")
        .header("authorization", format!("Bearer {token}"))
        .header("content-length", "999999")
        .body(Body::from("{}"))
        .unwrap();
    assert_eq!(app(api.state.clone()).oneshot(req).await.unwrap().status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(api.started("alice").await, 0);
}

#[tokio::test]
async fn anonymous_callers_share_the_public_tenant_whose_limit_holds_across_its_shards() {
    // The public tenant's limit is split over 8 shards; whichever shards starts land on, no
    // more than the limit are admitted in a minute.
    let quota = MemoryQuota::new();
    let limits = limits(Some(20), Some(12));
    let public = Principal::Public;
    let now = chrono::Utc::now();
    let mut admitted = 0;
    for _ in 0..200 {
        if chainrun_core::quota::gate::take_start(&quota, &limits, &public, now).await.unwrap().is_ok() {
            admitted += 1;
        }
    }
    // Each refusal tries two shards, so the last few starts may find room left on none of
    // the two they try: at most the limit, and nearly all of it.
    assert!((14..=20).contains(&admitted), "admitted {admitted}");
    let mut slots = 0;
    for _ in 0..100 {
        if chainrun_core::quota::gate::occupy_slot(&quota, &limits, &public, &RunId::new()).await.unwrap().is_ok() {
            slots += 1;
        }
    }
    assert!((8..=12).contains(&slots), "slots {slots}");
}

#[tokio::test]
async fn a_429_does_not_keep_its_idempotency_key_so_the_retry_after_it_acts() {
    let api = api(limits(None, Some(1)));
    let first = api.start("alice").await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let token = support::token_signed(support::SECRET, "alice", &[], 3600);
    let keyed = || {
        Request::builder()
            .method("POST")
            .uri("/runs")
            .header("authorization", format!("Bearer {token}"))
            .header("idempotency-key", "retry-me")
            .body(Body::from(json!({ "workflow": workflow("x"), "input": {} }).to_string()))
            .unwrap()
    };
    let refused = app(api.state.clone()).oneshot(keyed()).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    api.end(&RunId::parse(first.body["run_id"].as_str().unwrap()).unwrap()).await;
    let retried = app(api.state.clone()).oneshot(keyed()).await.unwrap();
    assert_eq!(retried.status(), StatusCode::ACCEPTED, "the retry was handled anew, not the 429 replayed");
    assert!(retried.headers().get("idempotent-replayed").is_none());
}

#[tokio::test]
async fn a_revision_runs_again_so_it_needs_a_slot_and_is_refused_without_one() {
    use chainrun_core::engine::{Engine, EngineConfig};
    use chainrun_core::memory::{Script, ScriptedModel};
    let api = api(limits(None, Some(1)));
    let first = api.start("alice").await;
    let id = RunId::parse(first.body["run_id"].as_str().unwrap()).unwrap();
    // Run it to its end (the engine alone: its slot is not given back, as if the release was lost).
    let model = Arc::new(ScriptedModel::new(vec![Script::reply("x", "ok")]));
    let registry = Arc::new(chainrun_core::pricing::ModelRegistry::builtin());
    let engine = Engine::new(model, api.store.clone(), api.progress.clone(), registry, EngineConfig::default());
    let lease = Lease { holder: "r".into(), expires_at: chrono::Utc::now() + chrono::Duration::minutes(5) };
    let Claim::Acquired(run) = api.store.claim(&id, &lease, chrono::Utc::now()).await.unwrap() else { panic!("not claimed") };
    engine.execute(*run, lease, None).await.unwrap();
    // Another run takes the tenant's one slot (reclaiming the ended run's).
    let second = api.start("alice").await;
    assert_eq!(second.status, StatusCode::ACCEPTED, "{}", second.body);
    let retry = format!("/runs/{id}/steps/a/retry");
    assert_too_many(&api.call("alice", "POST", &retry, json!({})).await, 60);
    assert_eq!(api.store.get_run(&id).await.unwrap().unwrap().revision, 0, "no revision started");
    // Once the other run has ended, the revision starts.
    api.end(&RunId::parse(second.body["run_id"].as_str().unwrap()).unwrap()).await;
    let started = api.call("alice", "POST", &retry, json!({})).await;
    assert_eq!(started.status, StatusCode::ACCEPTED, "{}", started.body);
    assert_eq!(api.store.get_run(&id).await.unwrap().unwrap().revision, 1);
}
