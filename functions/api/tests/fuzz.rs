//! Hostile requests to every route of the OpenAPI document (so a new route is fuzzed as
//! soon as it is documented), and wrong methods to each path: malformed and mistyped JSON,
//! deep nesting, oversize bodies, hostile path segments, query strings and headers, with
//! the owner's token, another user's, an admin's, a broken one, and none.
//!
//! Whatever is sent: no 5xx; every 4xx is a problem document; and a refused request
//! writes nothing (the in-memory stores hold the same before and after). Cases come from
//! a seeded RNG: a failure names its seed and case, and `FUZZ_SEED=<seed>` replays it;
//! `FUZZ_SCALE=<n>` sends n times as many (for a longer hunt than `make test` affords).
#![allow(clippy::unwrap_used)] // a panic is the failure report

mod support;

use axum::body::Body;
use chainrun_api::app;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use support::{Ports, SECRET, local_ports, token_signed};
use tower::ServiceExt;

/// Cases per documented operation, and per method a path does not take.
const CASES_PER_OPERATION: usize = 32;
const CASES_PER_WRONG_METHOD: usize = 6;
const DEFAULT_SEED: u64 = 0x00C4_A1A5;

/// A definition every seeded run and workflow uses: one cheap step.
fn definition() -> Value {
    json!({ "name": "fuzzed", "steps": [{ "id": "only", "type": "llm", "model": "amazon.nova-micro-v1:0", "prompt": "hi {{ input.who }}" }] })
}

/// A fresh API with a run and a stored workflow of alice's: ids a request can hit.
struct World {
    ports: Ports,
    run_id: String,
    workflow_id: String,
}

async fn send(ports: &Ports, request: Request<Body>) -> (StatusCode, http::HeaderMap, Vec<u8>) {
    let response = app(ports.state.clone()).oneshot(request).await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    (status, headers, response.into_body().collect().await.unwrap().to_bytes().to_vec())
}

fn token(sub: &str, groups: &[&str]) -> String {
    token_signed(SECRET, sub, groups, 3600)
}

async fn seeded_world() -> World {
    let ports = local_ports();
    let alice = format!("Bearer {}", token("alice", &[]));
    let post = |path: &str, body: Value| {
        Request::post(path).header("authorization", &alice).header("content-type", "application/json").body(Body::from(body.to_string())).unwrap()
    };
    let (status, _, body) = send(&ports, post("/runs", json!({ "workflow": definition(), "input": { "who": "bob" } }))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&body));
    let run_id = serde_json::from_slice::<Value>(&body).unwrap()["run_id"].as_str().unwrap().to_owned();
    let (status, _, body) = send(&ports, post("/workflows", json!({ "workflow": definition() }))).await;
    assert_eq!(status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&body));
    let workflow_id = serde_json::from_slice::<Value>(&body).unwrap()["id"].as_str().unwrap().to_owned();
    World { ports, run_id, workflow_id }
}

/// What the stores hold: equal before and after a request that wrote nothing. Idempotency
/// keys are left out: a refused request's answer is kept under its key on purpose (to be
/// replayed), and it names nothing but that key.
fn written(ports: &Ports) -> String {
    format!("{}\n{}\n{}\n{:?}", ports.store.snapshot(), ports.progress.snapshot(), ports.workflows.snapshot(), ports.dispatcher.events())
}

/// Path segments no id has: traversal, NUL and control characters, percent-encoding
/// tricks, unicode, and very long ones. All are valid in a URI (percent-encoded).
const HOSTILE_SEGMENTS: &[&str] = &[
    "..",
    "%2e%2e",
    "..%2f..%2fetc%2fpasswd",
    "%2F",
    "%00",
    "a%00b",
    "%0d%0aSet-Cookie:%20x",
    "%1b%5b31m",
    "%ff%fe",
    "%E2%80%AE",
    "%F0%9F%92%A9",
    "%C0%AE%C0%AE",
    "%25",
    "%252e",
    "~alice",
    "*",
    "null",
    "-1",
    "0",
    "18446744073709551616",
    "01arz3ndektsv4rrffq69g5fav",
    "01ARZ3NDEKTSV4RRFFQ69G5FA",
    "01ARZ3NDEKTSV4RRFFQ69G5FAVV",
    "ZZZZZZZZZZZZZZZZZZZZZZZZZZ",
    "only%20",
    "steps.only",
];

/// Query strings: unknown, repeated, negative, huge, non-numeric, NUL, very long.
const HOSTILE_QUERIES: &[&str] = &[
    "unknown=1",
    "limit=-1",
    "limit=0",
    "limit=99999999999999999999999",
    "limit=1&limit=2",
    "limit=abc",
    "limit=%00",
    "limit=1e3",
    "limit=%201",
    "after=-5",
    "after=18446744073709551616",
    "revision=4294967296",
    "revision=-1",
    "version=0",
    "version=4294967295",
    "days=0",
    "days=91",
    "scope=admin",
    "scope=group:",
    "scope=%00",
    "workflow=",
    "next=garbage",
    "next=MjAyNS0wMS0wMVQwMDowMDowMFp8Li4v",
    "%00=1",
    "a[b]=1",
    "&&&",
    "=",
];

/// Long strings are built per case; these are the fixed ones.
const HOSTILE_STRINGS: &[&str] =
    &["", " ", "\u{0}", "\u{202e}txt.exe", "💩", "../../etc/passwd", "${jndi:ldap://x}", "{{ 7 * 7 }}", "' OR 1=1 --", "\r\n"];

fn hostile_string(rng: &mut StdRng) -> Value {
    match rng.random_range(0..4) {
        0 => json!("A".repeat(rng.random_range(1_000..100_000))),
        1 => json!("\u{10FFFF}".repeat(rng.random_range(1..5_000))),
        _ => json!(*HOSTILE_STRINGS.choose(rng).unwrap()),
    }
}

/// A value of a type a schema is unlikely to want.
fn wrong_value(rng: &mut StdRng) -> Value {
    match rng.random_range(0..12) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(u64::MAX),
        4 => json!(-9.5e300),
        5 => json!([]),
        6 => json!({}),
        7 => json!([1, "two", null]),
        8 => json!({ "name": 1, "steps": "x" }),
        9 => json!({ "max_cost_usd": "-1", "max_total_tokens": -1 }),
        _ => hostile_string(rng),
    }
}

/// Nesting `depth` levels deep, of arrays or objects.
fn nested(depth: usize, objects: bool) -> String {
    let (open, close) = if objects { ("{\"a\":", "}") } else { ("[", "]") };
    format!("{}1{}", open.repeat(depth), close.repeat(depth))
}

/// A body built from the operation's request schema: its properties, each given a wrong
/// value, some left out, some unknown added.
fn mistyped(rng: &mut StdRng, schema: &Value, doc: &Value) -> Value {
    let resolved = match schema["$ref"].as_str().and_then(|r| r.strip_prefix("#/components/schemas/")) {
        Some(name) => &doc["components"]["schemas"][name],
        None => schema,
    };
    let mut body = serde_json::Map::new();
    for name in resolved["properties"].as_object().into_iter().flatten().map(|(k, _)| k) {
        if rng.random_bool(0.8) {
            body.insert(name.clone(), wrong_value(rng));
        }
    }
    if rng.random_bool(0.3) {
        body.insert("unknown_field".into(), json!(1));
    }
    Value::Object(body)
}

/// A hostile body, as bytes.
fn hostile_body(rng: &mut StdRng, schema: &Value, doc: &Value, world: &World) -> Vec<u8> {
    match rng.random_range(0..18) {
        0 => Vec::new(),
        1 => b"{".to_vec(),
        2 => b"{\"workflow\": ".to_vec(),
        3 => b"null".to_vec(),
        4 => b"[]".to_vec(),
        5 => b"\"just a string\"".to_vec(),
        6 => b"{\"a\":1,\"a\":2}".to_vec(),
        7 => vec![0xff, 0xfe, b'{', 0x00, b'}'],
        8 => nested(rng.random_range(100..20_000), rng.random_bool(0.5)).into_bytes(),
        9 => {
            // Valid JSON past the body limit.
            let filler = "x".repeat(300 * 1024);
            json!({ "workflow": definition(), "input": { "who": filler } }).to_string().into_bytes()
        }
        10 => vec![b' '; rng.random_range(256 * 1024..300 * 1024)],
        11 => json!({ "workflow": nested_value(rng.random_range(50..200)), "input": {} }).to_string().into_bytes(),
        12 => {
            // A definition that nearly works, with one part hostile.
            let mut def = definition();
            def["steps"][0]["id"] = hostile_string(rng);
            json!({ "workflow": def, "input": { "who": hostile_string(rng) }, "step": world.run_id }).to_string().into_bytes()
        }
        13 => {
            // Deep inside what parses: an input schema and an input near serde_json's depth limit.
            let depth = rng.random_range(60..126);
            let schema = (0..depth).fold(json!({ "type": "integer" }), |inner, _| json!({ "type": "object", "properties": { "a": inner } }));
            let mut def = definition();
            def["input_schema"] = schema;
            json!({ "workflow": def, "input": nested_value(depth) }).to_string().into_bytes()
        }
        14 => {
            // Many steps, each after the one before.
            let steps: Vec<Value> = (0..rng.random_range(50..300))
                .map(|i| json!({ "id": format!("s{i}"), "type": "llm", "model": "amazon.nova-micro-v1:0", "prompt": format!("{{{{ steps.s{}.text }}}}", i.max(1) - 1) }))
                .collect();
            json!({ "workflow": { "name": "long", "steps": steps }, "input": {} }).to_string().into_bytes()
        }
        _ => mistyped(rng, schema, doc).to_string().into_bytes(),
    }
}

/// `{"a": {"a": … }}` as a value (serde_json's own nesting limit does not apply to it).
fn nested_value(depth: usize) -> Value {
    (0..depth).fold(json!(1), |inner, _| json!({ "a": inner }))
}

/// The path with each `{parameter}` set: usually to a real id, sometimes to a hostile one.
fn path_for(rng: &mut StdRng, template: &str, world: &World) -> String {
    let segments: Vec<String> = template
        .split('/')
        .map(|segment| match segment {
            "{id}" | "{step}" if rng.random_bool(0.5) => {
                let real = match segment {
                    "{step}" => "only",
                    _ if template.starts_with("/workflows") => &world.workflow_id,
                    _ => &world.run_id,
                };
                real.to_owned()
            }
            s if s.starts_with('{') => match rng.random_range(0..5) {
                0 => "A".repeat(rng.random_range(300..20_000)),
                _ => (*HOSTILE_SEGMENTS.choose(rng).unwrap()).to_owned(),
            },
            s => s.to_owned(),
        })
        .collect();
    let mut path = segments.join("/");
    if rng.random_bool(0.5) {
        path.push('?');
        path.push_str(HOSTILE_QUERIES.choose(rng).unwrap());
    }
    path
}

fn authorization(rng: &mut StdRng) -> Option<String> {
    Some(match rng.random_range(0..12) {
        0..=2 => format!("Bearer {}", token("alice", &[])),
        3 | 4 => format!("Bearer {}", token("bob", &[])),
        5 => format!("Bearer {}", token("root", &["admin"])),
        6 => return None,
        7 => "Bearer garbage".into(),
        8 => format!("Basic {}", "YWxpY2U6c2VjcmV0"),
        9 => format!("Bearer {}", token_signed("another-secret-another-secret-another!", "alice", &[], 3600)),
        10 => format!("Bearer {}", token_signed(SECRET, "alice", &[], -3600)),
        _ => format!("Bearer {}", "e".repeat(rng.random_range(1_000..8_000))),
    })
}

fn idempotency_key(rng: &mut StdRng) -> Option<Vec<u8>> {
    match rng.random_range(0..8) {
        0 => Some(b"".to_vec()),
        1 => Some(vec![b'k'; 300]),
        2 => Some(b"key with spaces".to_vec()),
        3 => Some(vec![0xc3, 0xa9, b'k']),
        4 => Some(b"\tkey".to_vec()),
        5 => Some(format!("key-{}", rng.random::<u32>()).into_bytes()),
        _ => None,
    }
}

fn content_type(rng: &mut StdRng) -> Option<&'static str> {
    [
        Some("application/json"),
        Some("application/json"),
        None,
        Some("text/plain"),
        Some("application/xml"),
        Some("application/json; charset=utf-16"),
        Some("multipart/form-data; boundary=x"),
    ]
    .choose(rng)
    .copied()
    .flatten()
}

/// One hostile request to `method template`.
fn hostile_request(rng: &mut StdRng, method: &Method, template: &str, body_schema: &Value, doc: &Value, world: &World) -> Request<Body> {
    let mut request = Request::builder().method(method.clone()).uri(path_for(rng, template, world));
    if let Some(auth) = authorization(rng) {
        request = request.header("authorization", auth);
    }
    if let Some(key) = idempotency_key(rng) {
        request = request.header("idempotency-key", http::HeaderValue::from_bytes(&key).unwrap());
    }
    if let Some(kind) = content_type(rng) {
        request = request.header("content-type", kind);
    }
    if rng.random_bool(0.2) {
        request = request.header("if-match", *["\"0\"", "*", "W/\"x\"", "\"99999999999\"", "garbage"].choose(rng).unwrap());
    }
    let body = if body_schema.is_null() && rng.random_bool(0.7) { Vec::new() } else { hostile_body(rng, body_schema, doc, world) };
    request.body(Body::from(body)).unwrap()
}

/// Checks one answer: no 5xx, a 4xx is a problem document and wrote nothing.
fn check(what: &str, status: StatusCode, headers: &http::HeaderMap, body: &[u8], before: &str, after: &str) -> Result<(), String> {
    if status.is_server_error() {
        return Err(format!("{what}: {status} {}", String::from_utf8_lossy(body)));
    }
    if !status.is_client_error() {
        return Ok(());
    }
    let kind = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if kind != "application/problem+json" {
        return Err(format!("{what}: {status} with content-type {kind:?}"));
    }
    let problem: Value = serde_json::from_slice(body).map_err(|e| format!("{what}: {status} body is not JSON: {e}"))?;
    let fields_ok =
        problem["type"].is_string() && problem["title"].is_string() && problem["detail"].is_string() && problem["status"] == status.as_u16();
    if !fields_ok {
        return Err(format!("{what}: {status} is not a problem document: {problem}"));
    }
    if before != after {
        return Err(format!("{what}: refused with {status}, yet the stores changed"));
    }
    Ok(())
}

fn describe(request: &Request<Body>) -> String {
    let uri = request.uri().to_string();
    let shown: String = uri.chars().take(120).collect();
    let headers: Vec<String> = request
        .headers()
        .iter()
        .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes()).chars().take(40).collect::<String>()))
        .collect();
    format!("{} {shown} {headers:?}", request.method())
}

#[tokio::test]
async fn hostile_requests_get_problem_documents_and_change_nothing() {
    let seed = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_SEED);
    let doc = chainrun_api::openapi::document();
    let mut operations: Vec<(Method, String, Value, usize)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let schema = op["requestBody"]["content"]["application/json"]["schema"].clone();
            operations.push((method.to_uppercase().parse().unwrap(), path.clone(), schema, CASES_PER_OPERATION));
        }
        // The methods the path does not take: each must be a 405 problem, writing nothing.
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            if !item.as_object().unwrap().contains_key(&method.to_lowercase()) {
                operations.push((method.parse().unwrap(), path.clone(), Value::Null, CASES_PER_WRONG_METHOD));
            }
        }
    }
    let scale: usize = std::env::var("FUZZ_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut failures = Vec::new();
    let (mut answered, mut sent) = (std::collections::BTreeMap::<u16, usize>::new(), 0);
    // One world until a request changes it (an accepted write): the next case starts as the first did.
    let mut world = seeded_world().await;
    for (method, template, schema, cases) in &operations {
        for case in 0..cases * scale {
            let request = hostile_request(&mut rng, method, template, schema, &doc, &world);
            let what = format!("seed {seed}, {method} {template} case {case}: {}", describe(&request));
            let before = written(&world.ports);
            let (status, headers, body) = send(&world.ports, request).await;
            *answered.entry(status.as_u16()).or_default() += 1;
            sent += 1;
            let after = written(&world.ports);
            if let Err(failure) = check(&what, status, &headers, &body, &before, &after) {
                failures.push(failure);
            }
            if before != after {
                world = seeded_world().await;
            }
        }
    }
    eprintln!("fuzz seed {seed}: {sent} requests, answers by status {answered:?}");
    assert!(failures.is_empty(), "{} of the hostile requests failed:\n{}", failures.len(), failures.join("\n"));
    // The fuzzing reached the handlers, not only the front door.
    let refused: usize = answered.iter().filter(|(s, _)| (400..500).contains(*s)).map(|(_, n)| n).sum();
    assert!(refused > sent / 2, "answers by status: {answered:?}");
    assert!(answered.contains_key(&400) && answered.contains_key(&401) && answered.contains_key(&404), "answers by status: {answered:?}");
}
