//! The OpenAPI document: it lists exactly what the router serves, it is OpenAPI 3.1 whose
//! schemas compile, and the README's request examples are valid requests by it.
#![allow(clippy::unwrap_used)] // a panic is the failure report

mod support;

use axum::body::Body;
use chainrun_api::app;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::Path;
use support::{SECRET, local_ports, token_signed};
use tower::ServiceExt;

/// What a path parameter is set to when a route is probed: a well-formed id nobody has.
const SAMPLE_ID: &str = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
const METHODS: [Method; 5] = [Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::PATCH];

fn document() -> Value {
    chainrun_api::openapi::document()
}

/// Every (method, path) of the document.
fn documented(doc: &Value) -> Vec<(Method, String)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            ops.push((method.to_uppercase().parse().unwrap(), path.clone()));
        }
    }
    ops
}

/// The path templates the router holds, read from its `Debug` (axum keeps no other list
/// it would give out): the router is the truth, not a list kept beside it.
fn router_paths() -> BTreeSet<String> {
    let debug = format!("{:?}", app(local_ports().state));
    let mut paths = BTreeSet::new();
    let mut rest = debug.as_str();
    while let Some(start) = rest.find("\"/") {
        let tail = &rest[start + 1..];
        let end = tail.find('"').unwrap();
        let path = &tail[..end];
        if !path.contains("__private__") {
            paths.insert(path.to_owned());
        }
        rest = &tail[end..];
    }
    assert!(paths.len() > 10, "the router's paths could not be read from its Debug output (has axum changed it?): {paths:?}");
    paths
}

/// `path` with every `{parameter}` set to a sample id.
fn concrete(path: &str) -> String {
    path.split('/').map(|s| if s.starts_with('{') { SAMPLE_ID } else { s }).collect::<Vec<_>>().join("/")
}

/// Whether the template `a` and the template `b` can name the same path (a parameter
/// segment matches anything).
fn overlaps(a: &str, b: &str) -> bool {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.split('/').collect(), b.split('/').collect());
    a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x == y || x.starts_with('{') || y.starts_with('{'))
}

/// Status and body of `method path` sent with `token`.
async fn probe(method: Method, path: &str, token: Option<&str>) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = app(local_ports().state).oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// The router answers `method path` itself: not `405`, not "no such route".
fn routed(status: StatusCode, body: &Value) -> bool {
    let detail = body["detail"].as_str().unwrap_or_default();
    status != StatusCode::METHOD_NOT_ALLOWED
        && !(status == StatusCode::NOT_FOUND && (detail == "no such route" || detail.starts_with("no route for")))
}

#[tokio::test]
async fn every_route_of_the_router_is_in_the_document() {
    let documented = documented(&document());
    let mut missing = Vec::new();
    for path in router_paths() {
        for method in METHODS {
            // Without a token a route answers 401 before its handler runs; the fallback's
            // catch-all paths answer "no such route".
            let (status, body) = probe(method.clone(), &concrete(&path), None).await;
            if !routed(status, &body) {
                continue;
            }
            if !documented.iter().any(|(m, p)| *m == method && overlaps(p, &path)) {
                missing.push(format!("{method} {path}"));
            }
        }
    }
    assert!(missing.is_empty(), "routed but not in the OpenAPI document (add them to openapi::operations): {missing:?}");
}

#[tokio::test]
async fn every_operation_in_the_document_is_routed() {
    let token = token_signed(SECRET, "alice", &[], 300);
    let mut unrouted = Vec::new();
    for (method, path) in documented(&document()) {
        let (status, body) = probe(method.clone(), &concrete(&path), Some(&token)).await;
        if !routed(status, &body) {
            unrouted.push(format!("{method} {path}: {status} {body}"));
        }
    }
    assert!(unrouted.is_empty(), "in the OpenAPI document but not routed: {unrouted:?}");
}

#[tokio::test]
async fn the_documents_are_served_without_a_token() {
    let (status, served) = probe(Method::GET, "/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(served, document());
    let (status, schema) = probe(Method::GET, "/schemas/workflow.json", None).await;
    assert_eq!(status, StatusCode::OK);
    let published: Value = serde_json::from_str(&std::fs::read_to_string(repo().join("schemas/workflow.schema.json")).unwrap()).unwrap();
    assert_eq!(schema, published, "GET /schemas/workflow.json is schemas/workflow.schema.json");
    let (status, _) = probe(Method::POST, "/openapi.json", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

/// Every `$ref` in `value`.
fn refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

/// Every schema the operations hold inline: parameters', bodies' and answers'.
fn operation_schemas(doc: &Value) -> Vec<(String, Value)> {
    let mut schemas = Vec::new();
    for (method, path) in documented(doc) {
        let op = &doc["paths"][&path][method.as_str().to_lowercase()];
        let at = format!("{method} {path}");
        for p in op["parameters"].as_array().unwrap() {
            schemas.push((format!("{at} parameter {}", p["name"]), p["schema"].clone()));
        }
        for (kind, content) in op["requestBody"]["content"].as_object().into_iter().flatten() {
            schemas.push((format!("{at} body {kind}"), content["schema"].clone()));
        }
        for (status, response) in op["responses"].as_object().unwrap() {
            for (kind, content) in response["content"].as_object().into_iter().flatten() {
                schemas.push((format!("{at} {status} {kind}"), content["schema"].clone()));
            }
        }
    }
    schemas
}

/// A validator of `schema` whose `#/components/schemas/…` refs resolve in `doc`.
fn validator(doc: &Value, schema: &Value) -> jsonschema::Validator {
    let mut root = json!({ "$schema": "https://json-schema.org/draft/2020-12/schema", "components": doc["components"] });
    if let Value::Object(keywords) = schema {
        for (k, v) in keywords {
            root[k] = v.clone();
        }
    } else {
        root["allOf"] = json!([schema]);
    }
    jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("schema does not compile: {e}\n{schema:#}"))
}

#[test]
fn the_document_is_openapi_3_1() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    let name = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    let components = doc["components"]["schemas"].as_object().unwrap();
    for (key, schema) in components {
        assert!(name(key), "component name {key:?} is not ^[a-zA-Z0-9._-]+$");
        jsonschema::meta::validate(schema).unwrap_or_else(|e| panic!("components.schemas.{key} is not a JSON Schema 2020-12: {e}"));
        validator(&doc, schema);
    }
    let mut ids = BTreeSet::new();
    for (method, path) in documented(&doc) {
        assert!(path.starts_with('/'), "{path}");
        assert!(["GET", "PUT", "POST", "DELETE", "PATCH"].contains(&method.as_str()), "{method} {path}");
        let op = &doc["paths"][&path][method.as_str().to_lowercase()];
        assert!(ids.insert(op["operationId"].as_str().unwrap().to_owned()), "operationId of {method} {path} is not unique");
        assert!(op["summary"].is_string());
        let declared: BTreeSet<&str> =
            op["parameters"].as_array().unwrap().iter().filter(|p| p["in"] == "path").map(|p| p["name"].as_str().unwrap()).collect();
        let templated: BTreeSet<&str> = path.split('/').filter_map(|s| s.strip_prefix('{')?.strip_suffix('}')).collect();
        assert_eq!(declared, templated, "path parameters of {method} {path}");
        for p in op["parameters"].as_array().unwrap() {
            assert!(p["name"].is_string() && ["path", "query", "header"].contains(&p["in"].as_str().unwrap()), "{method} {path}: {p}");
            assert!(p["in"] != "path" || p["required"] == true, "{method} {path}: a path parameter is required");
        }
        let responses = op["responses"].as_object().unwrap();
        assert!(responses.keys().any(|s| s.starts_with('2')), "{method} {path} has no success answer");
        for (status, response) in responses {
            let code: u16 = status.parse().unwrap_or_else(|_| panic!("{method} {path}: status {status:?}"));
            assert!((100..600).contains(&code) && response["description"].is_string(), "{method} {path} {status}");
            if (400..500).contains(&code) {
                let schema = &response["content"]["application/problem+json"]["schema"];
                assert_eq!(schema["$ref"], "#/components/schemas/ProblemDocument", "{method} {path} {status} is a problem document");
            }
        }
        let public = op["security"] == json!([]);
        let anonymous = path.starts_with("/public/")
            || ["/openapi.json", "/schemas/workflow.json", "/runs/{id}/view", "/analytics/view"].contains(&path.as_str());
        assert_eq!(public, anonymous, "{method} {path}: who needs a token");
        assert_eq!(responses.contains_key("401"), !public, "{method} {path}: a 401 exactly when a token is needed");
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in all {
        let key = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("$ref {r} is not to a component"));
        assert!(components.contains_key(key), "$ref {r} names no component");
    }
    for (at, schema) in operation_schemas(&doc) {
        jsonschema::meta::validate(&schema).unwrap_or_else(|e| panic!("{at}: not a JSON Schema 2020-12: {e}"));
        validator(&doc, &schema);
    }
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().parent().unwrap()
}

/// A request the README shows: where it is, and its method, path and JSON body.
#[derive(Debug)]
struct Example {
    at: String,
    method: Method,
    path: String,
    body: Value,
}

/// The README's `## API` section, up to the next `## ` heading.
fn api_section(readme: &str) -> &str {
    let start = if readme.starts_with("## API\n") { 0 } else { readme.find("\n## API\n").expect("README.md has an `## API` section") + 1 };
    let rest = &readme[start..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    &rest[..end]
}

/// `` `POST /runs/{id}/cancel` `` → (POST, "/runs/{id}/cancel"), the first such in `text`.
fn named_route(text: &str) -> Option<(Method, String)> {
    text.split('`').skip(1).step_by(2).find_map(|code| {
        let (method, path) = code.trim().split_once(' ')?;
        let method: Method = method.parse().ok().filter(|m| METHODS.contains(m))?;
        path.starts_with('/').then(|| (method, path.split(['?', ',']).next().unwrap_or(path).trim().to_owned()))
    })
}

/// Every request example of the API section: `curl … -d` bodies (inline, or `@file` read
/// from the repository), fenced `json` blocks whose preceding line names the route in
/// backticks, and in the route table the JSON objects a row shows before its `→`.
fn readme_examples(readme: &str) -> Vec<Example> {
    let section = api_section(readme);
    let mut examples = Vec::new();
    // curl commands, their continuation lines joined.
    let joined = section.replace("\\\n", " ");
    for (n, line) in joined.lines().enumerate() {
        let Some(curl) = line.trim_start().strip_prefix("curl ") else { continue };
        let words = shell_words(curl);
        let Some(body) = words.iter().position(|w| w == "-d" || w == "--data").and_then(|i| words.get(i + 1)) else { continue };
        let method = words.iter().position(|w| w == "-X").and_then(|i| words.get(i + 1)).map_or(Method::POST, |m| m.parse().unwrap());
        let url = words.iter().find(|w| w.contains("$API_URL")).unwrap();
        let path = url.split("$API_URL").nth(1).unwrap().split('?').next().unwrap().to_owned();
        let text = match body.strip_prefix('@') {
            Some(file) => std::fs::read_to_string(repo().join(file)).unwrap(),
            None => body.clone(),
        };
        let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("README curl example {line:?}: its body is not JSON: {e}"));
        examples.push(Example { at: format!("curl, line {} of the section", n + 1), method, path, body });
    }
    // ```json blocks under a line naming their route.
    let lines: Vec<&str> = section.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim() != "```json" {
            continue;
        }
        let Some((method, path)) = lines[..i].iter().rev().find(|l| !l.trim().is_empty()).and_then(|l| named_route(l)) else { continue };
        let end = lines[i + 1..].iter().position(|l| l.trim() == "```").unwrap() + i + 1;
        let body = serde_json::from_str(&lines[i + 1..end].join("\n")).unwrap_or_else(|e| panic!("README json block at {line:?}: {e}"));
        examples.push(Example { at: format!("json block, line {} of the section", i + 1), method, path, body });
    }
    // Table rows: `| `METHOD /path` | … body … → answer |`.
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split(" | ").collect();
        let (Some((method, path)), Some(what)) = (named_route(cells[0]), cells.get(1)) else { continue };
        let request = what.split('→').next().unwrap_or_default();
        for code in request.split('`').skip(1).step_by(2) {
            if let Ok(body @ Value::Object(_)) = serde_json::from_str::<Value>(code) {
                examples.push(Example {
                    at: format!("table row {}", cells[0].trim_matches(['|', ' '])),
                    method: method.clone(),
                    path: path.clone(),
                    body,
                });
            }
        }
    }
    examples
}

/// Splits a shell command line on blanks, honouring '…' and "…" quotes.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote = None;
    for c in line.chars() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            (_, c) => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

#[test]
fn the_readmes_request_examples_are_valid_requests() {
    let doc = document();
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let examples = readme_examples(&readme);
    assert!(examples.iter().any(|e| e.at.starts_with("curl")), "no curl example with a body found in the README's API section");
    for example in &examples {
        let ops = documented(&doc);
        let (_, path) = ops
            .iter()
            .find(|(m, p)| *m == example.method && overlaps(p, &example.path))
            .unwrap_or_else(|| panic!("README {}: {} {} is not in the OpenAPI document", example.at, example.method, example.path));
        let op = &doc["paths"][path][example.method.as_str().to_lowercase()];
        let schema = &op["requestBody"]["content"]["application/json"]["schema"];
        assert!(!schema.is_null(), "README {}: {} {} takes no body", example.at, example.method, path);
        let errors: Vec<String> = validator(&doc, schema).iter_errors(&example.body).map(|e| format!("{} at {}", e, e.instance_path())).collect();
        assert!(errors.is_empty(), "README {} ({} {}) is not a valid request: {errors:?}", example.at, example.method, path);
    }
}

#[test]
fn an_invalid_example_is_caught() {
    // The extraction and the check find a wrong body, not only pass right ones.
    let readme = "## API\n\n```sh\ncurl -s -X POST \"$API_URL/runs/$RUN/cancel\" -d '{\"reason\": 7}'\n```\n\n| `POST /workflows` | body `{ \"workflow\": 1 }` → `201` |\n\n## Next\n";
    let examples = readme_examples(readme);
    assert_eq!(examples.len(), 2, "{examples:?}");
    let doc = document();
    for example in examples {
        let (_, path) = documented(&doc).into_iter().find(|(m, p)| *m == example.method && overlaps(p, &example.path)).unwrap();
        let schema = &doc["paths"][&path][example.method.as_str().to_lowercase()]["requestBody"]["content"]["application/json"]["schema"];
        assert!(!validator(&doc, schema).is_valid(&example.body), "{example:?} passed");
    }
}
