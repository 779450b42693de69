//! The run view and the cost page as the router serves them: HTML to anyone, with headers
//! that keep the page to itself (its own inline script and style, calls to its own origin
//! only, no referrer), the same bytes whoever asks and for whichever run.
//!
//! What the pages draw is tested in a real browser, against a local stack
//! (`tests/e2e/test_views.py`).
#![allow(clippy::unwrap_used)] // a panic is the failure report

mod support;

use axum::body::Body;
use chainrun_api::app;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use support::{SECRET, local_ports, token_signed};
use tower::ServiceExt;

const SOME_RUN: &str = "01ARZ3NDEKTSV4RRFFQ69G5FAV";

async fn get(path: &str, token: Option<&str>) -> (StatusCode, HeaderMap, String) {
    get_from(&local_ports(), path, token).await
}

async fn get_from(ports: &support::Ports, path: &str, token: Option<&str>) -> (StatusCode, HeaderMap, String) {
    let mut request = Request::get(path);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = app(ports.state.clone()).oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8(body.to_vec()).unwrap())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or_else(|| panic!("no {name} header"))
}

/// The `sha256-…` sources a policy lists for `directive`.
fn hashes<'a>(policy: &'a str, directive: &str) -> Vec<&'a str> {
    let clause =
        policy.split(';').map(str::trim).find(|c| c.starts_with(&format!("{directive} "))).unwrap_or_else(|| panic!("no {directive} in {policy}"));
    clause.split_whitespace().skip(1).collect()
}

/// The contents of each `<tag>…</tag>` of `html`.
fn blocks<'a>(html: &'a str, tag: &str) -> Vec<&'a str> {
    html.split(&format!("<{tag}>")).skip(1).map(|rest| rest.split(&format!("</{tag}>")).next().unwrap()).collect()
}

fn sha256_source(block: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(block)))
}

#[tokio::test]
async fn both_pages_are_html_served_without_a_token() {
    for path in [format!("/runs/{SOME_RUN}/view"), "/analytics/view".to_owned()] {
        let (status, headers, body) = get(&path, None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert_eq!(header(&headers, "content-type"), "text/html; charset=utf-8", "{path}");
        assert!(body.starts_with("<!doctype html>"), "{path}");
        assert!(body.contains("<svg"), "{path}: the charts are inline SVG");
        assert_eq!(header(&headers, "referrer-policy"), "no-referrer");
        assert_eq!(header(&headers, "x-content-type-options"), "nosniff");
    }
}

#[tokio::test]
async fn the_policy_allows_exactly_the_pages_own_inline_script_and_style_and_calls_to_its_own_origin() {
    for path in [format!("/runs/{SOME_RUN}/view"), "/analytics/view".to_owned()] {
        let (_, headers, body) = get(&path, None).await;
        let policy = header(&headers, "content-security-policy");
        for directive in ["default-src 'none'", "connect-src 'self'", "img-src data:", "base-uri 'none'", "frame-ancestors 'none'"] {
            assert!(policy.split(';').any(|c| c.trim() == directive), "{path}: no `{directive}` in {policy}");
        }
        assert!(!policy.contains("unsafe-inline") && !policy.contains("unsafe-eval"), "{path}: {policy}");
        for tag in ["script", "style"] {
            let mine: Vec<String> = blocks(&body, tag).into_iter().map(sha256_source).collect();
            assert!(!mine.is_empty(), "{path} has no inline {tag}");
            assert_eq!(hashes(policy, &format!("{tag}-src")), mine, "{path}: {tag}-src lists the hash of each inline {tag}, and nothing else");
        }
        // Nothing comes from elsewhere: no external script, stylesheet, image or font.
        for outside in ["src=\"http", "href=\"http", "src=\"//", "href=\"//", "@import", "url(http"] {
            assert!(!body.contains(outside), "{path} loads something from elsewhere: {outside}");
        }
    }
}

#[tokio::test]
async fn a_run_page_is_the_same_for_every_run_and_caller_and_reveals_nothing() {
    let ports = local_ports();
    // A run alice started: the page for it, to her and to anyone, is the page for no run.
    let alice = token_signed(SECRET, "alice", &[], 300);
    let start = json!({ "workflow": { "name": "secret-plans", "steps": [{ "id": "only", "type": "transform", "template": "hidden" }] }, "input": { "x": "confidential" } });
    let request = Request::post("/runs").header("authorization", format!("Bearer {alice}")).header("content-type", "application/json");
    let response = app(ports.state.clone()).oneshot(request.body(Body::from(start.to_string())).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let accepted: Value = serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let run = accepted["run_id"].as_str().unwrap();

    let (_, _, nobody) = get_from(&ports, &format!("/runs/{SOME_RUN}/view"), None).await;
    let (status, _, anonymous) = get_from(&ports, &format!("/runs/{run}/view"), None).await;
    assert_eq!(status, StatusCode::OK, "whether the run exists is for the API to tell an identified caller");
    let (_, _, as_alice) = get_from(&ports, &format!("/runs/{run}/view"), Some(&alice)).await;
    assert_eq!(anonymous, nobody);
    assert_eq!(as_alice, nobody);
    for secret in ["secret-plans", "confidential", run] {
        assert!(!anonymous.contains(secret), "the page holds {secret:?}");
    }
}

#[tokio::test]
async fn a_malformed_run_id_is_a_404_problem_and_other_methods_are_405() {
    for id in ["not-a-run", "..", "01ARZ3NDEKTSV4RRFFQ69G5FA", "%3Cscript%3E"] {
        let (status, headers, body) = get(&format!("/runs/{id}/view"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{id}: {body}");
        // A JSON problem, never a page: whatever the id holds is not rendered as markup.
        assert_eq!(header(&headers, "content-type"), "application/problem+json", "{id}: {body}");
    }
    for path in [format!("/runs/{SOME_RUN}/view"), "/analytics/view".to_owned()] {
        let request = Request::post(&path).body(Body::empty()).unwrap();
        let response = app(local_ports().state).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED, "POST {path}");
    }
}

#[tokio::test]
async fn a_broken_or_expired_token_does_not_stop_the_page_from_loading() {
    // The page's script, not the route, deals with the token: a browser may carry anything.
    let expired = token_signed(SECRET, "alice", &[], -3600);
    for token in ["garbage", expired.as_str()] {
        for path in [format!("/runs/{SOME_RUN}/view"), "/analytics/view".to_owned()] {
            let (status, _, _) = get(&path, Some(token)).await;
            assert_eq!(status, StatusCode::OK, "{path} with {token:.12}…");
        }
    }
}
