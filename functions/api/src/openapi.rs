//! The API's OpenAPI 3.1 document, served at `GET /openapi.json`, and the workflow
//! language's JSON Schema, served at `GET /schemas/workflow.json`.
//!
//! Every operation is one entry of [`operations`]: method, path, summary, and the Rust
//! types of its query, body and answer. Their schemas come from those types through
//! `schemars` (JSON Schema 2020-12, the dialect OpenAPI 3.1 uses), so the document cannot
//! drift from what the handlers parse and serialize; only the prose is written here.
//!
//! Why not `utoipa` or `aide`: utoipa derives its own schemas (`ToSchema`), so the
//! workflow language, already published from `schemars`, would be described twice; aide
//! uses `schemars` 1 only in a pre-release, and infers nothing here anyway, because the
//! handlers read raw `Bytes` (to word their own `400`s) and answer `Response`. A table
//! over `schemars` is the small part those crates would add.
//!
//! A route added to the router must be added here: `tests/openapi.rs` fails until it is
//! (it reads the router's paths and probes their methods).

use crate::error::ProblemDocument;
use crate::{AppState, method_not_allowed};
use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chainrun_core::wire::graph::GraphView;
use chainrun_core::wire::views::{CostsReport, EstimateView, EventsPage, Page, ProgressRowView, RunAccepted, RunSummaryView, RunView, SpendToday};
use chainrun_core::wire::workflows::{WorkflowSummaryView, WorkflowView};
use http::{Method, StatusCode, header};
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{Map, Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

/// Where the document's schemas live, as `$ref`s name them.
const COMPONENTS: &str = "/components/schemas";

/// The OpenAPI and JSON Schema documents: static, so they need no token.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/openapi.json", get(openapi_json).fallback(method_not_allowed))
        .route("/schemas/workflow.json", get(workflow_schema).fallback(method_not_allowed))
}

async fn openapi_json() -> Response {
    static DOCUMENT: LazyLock<String> = LazyLock::new(|| document().to_string());
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT.as_str()).into_response()
}

async fn workflow_schema() -> Response {
    static SCHEMA: LazyLock<String> = LazyLock::new(chainrun_core::workflow::schema_json);
    ([(header::CONTENT_TYPE, "application/schema+json")], SCHEMA.as_str()).into_response()
}

/// A run start's `options` as the handlers read them: how the run runs, and who sees it
/// (`visibility`, `shares`; taken out before the rest is read as `RunOptions`). Only its
/// schema is used.
#[derive(JsonSchema)]
#[allow(dead_code)]
pub(crate) struct StartOptions {
    #[serde(flatten)]
    options: chainrun_core::run::RunOptions,
    /// Who sees the run: no wider than its stored workflow's.
    visibility: Option<chainrun_core::access::Visibility>,
    /// With `SHARED`: whom it is shared with, and in which role.
    shares: Option<Vec<chainrun_core::access::Share>>,
}

type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

fn schema<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<T>()
}

/// `T`'s own schema, never a `$ref` (a query type's properties are its parameters).
fn inline<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    T::json_schema(generator)
}

/// What a success answers with.
#[derive(Clone, Copy)]
enum Answer {
    /// JSON of a Rust type.
    Json(SchemaFn),
    /// A JSON object the handler builds without a type yet; the words say what it holds.
    Object(&'static str),
    /// Any JSON value (a run's or a step's output).
    AnyJson,
    /// `text/plain`.
    Text,
    /// A JSON Schema (the workflow language's).
    JsonSchema,
    /// No body.
    Empty,
}

/// One operation of the API, as the document describes it.
#[derive(Clone)]
pub struct Operation {
    pub method: Method,
    /// The path as OpenAPI writes it: `/runs/{id}`.
    pub path: &'static str,
    pub summary: &'static str,
    /// Answered without a token.
    pub public: bool,
    query: Option<SchemaFn>,
    /// The body's schema, and whether one must be sent.
    body: Option<(SchemaFn, bool)>,
    headers: Vec<(&'static str, &'static str)>,
    status: u16,
    answer: Answer,
    /// Refusals besides the ones every operation of its kind may get (see [`refusals`]).
    refuses: &'static [u16],
}

fn op(method: Method, path: &'static str, summary: &'static str) -> Operation {
    let status = if method == Method::DELETE { 204 } else { 200 };
    let answer = if method == Method::DELETE { Answer::Empty } else { Answer::AnyJson };
    Operation { method, path, summary, public: false, query: None, body: None, headers: Vec::new(), status, answer, refuses: &[] }
}

impl Operation {
    fn query<T: JsonSchema>(mut self) -> Self {
        self.query = Some(inline::<T>);
        self
    }

    fn body<T: JsonSchema>(mut self) -> Self {
        self.body = Some((schema::<T>, true));
        self
    }

    /// A body that may be left out (or empty).
    fn optional_body<T: JsonSchema>(mut self) -> Self {
        self.body = Some((schema::<T>, false));
        self
    }

    fn header(mut self, name: &'static str, description: &'static str) -> Self {
        self.headers.push((name, description));
        self
    }

    fn answers<T: JsonSchema>(mut self, status: u16) -> Self {
        (self.status, self.answer) = (status, Answer::Json(schema::<T>));
        self
    }

    fn answers_object(mut self, status: u16, what: &'static str) -> Self {
        (self.status, self.answer) = (status, Answer::Object(what));
        self
    }

    fn answers_text(mut self) -> Self {
        self.answer = Answer::Text;
        self
    }

    fn answers_schema(mut self) -> Self {
        self.answer = Answer::JsonSchema;
        self
    }

    fn refuses(mut self, statuses: &'static [u16]) -> Self {
        self.refuses = statuses;
        self
    }

    fn public(mut self) -> Self {
        self.public = true;
        self
    }
}

/// Every operation of the API. A new route is one more line here.
pub fn operations() -> Vec<Operation> {
    use crate::history::{CostParams, HistoryParams};
    use crate::revisions::{OverrideBody, RetryBody};
    use crate::templates::SaveBody;
    use crate::workflows::{CreateBody, DuplicateBody, EstimateBody, ListParams, RunBody, UpdateBody, VersionQuery};
    use crate::{ControlBody, EstimateRun, EventsQuery, ProgressQuery, ResumeBody, RevisionQuery, StartRun};
    use Method as M;
    use chainrun_core::wire::steering::{ControlAccepted, ResumeAnswer, RevisionAccepted};
    use chainrun_core::wire::templates::TemplateView;
    vec![
        op(M::POST, "/runs", "Start a run of an inline definition").body::<StartRun>().answers::<RunAccepted>(202).refuses(&[429]),
        op(M::GET, "/runs", "Runs you may see, newest first").query::<HistoryParams>().answers::<Page<RunSummaryView<'static>>>(200),
        op(M::GET, "/runs/{id}", "A run: status, totals, and every step").query::<RevisionQuery>().answers::<RunView<'static>>(200),
        op(M::GET, "/runs/{id}/events", "Progress events after a cursor").query::<EventsQuery>().answers::<EventsPage<'static>>(200),
        op(M::GET, "/runs/{id}/graph", "A run's steps and the edges between them, to draw it").answers::<GraphView>(200),
        op(M::GET, "/runs/{id}/output", "A run's output, whole"),
        op(M::POST, "/runs/{id}/cancel", "Ask a run to stop").optional_body::<ControlBody>().answers::<ControlAccepted>(202).refuses(&[409]),
        op(M::POST, "/runs/{id}/pause", "Ask a run to wait").optional_body::<ControlBody>().answers::<ControlAccepted>(202).refuses(&[409]),
        op(M::POST, "/runs/{id}/resume", "Resume a paused run, decide a review, or answer an input step")
            .optional_body::<ResumeBody>()
            .answers::<ResumeAnswer>(202)
            .refuses(&[409]),
        op(M::GET, "/runs/{id}/steps/{step}/output", "A step's output, whole").query::<RevisionQuery>(),
        op(M::GET, "/runs/{id}/steps/{step}/text", "A step's text, whole").query::<RevisionQuery>().answers_text(),
        op(M::POST, "/runs/{id}/steps/{step}/retry", "Run a step of an ended run and its dependents again")
            .optional_body::<RetryBody>()
            .answers::<RevisionAccepted>(202)
            .refuses(&[409, 429]),
        op(M::PUT, "/runs/{id}/steps/{step}/output", "Set a step's output by hand and run its dependents again")
            .body::<OverrideBody>()
            .answers::<RevisionAccepted>(202)
            .refuses(&[409, 429]),
        op(M::GET, "/progress", "Your progress rows, newest run first").query::<ProgressQuery>().answers::<Page<ProgressRowView<'static>>>(200),
        op(M::GET, "/analytics/costs", "Cost, latency and failures per workflow and step").query::<CostParams>().answers::<CostsReport<'static>>(200),
        op(M::GET, "/analytics/spend", "Your spend today against your daily cap").answers::<SpendToday<'static>>(200),
        op(M::POST, "/workflows/estimate", "Estimate a run of an inline definition").body::<EstimateRun>().answers::<EstimateView<'static>>(200),
        op(M::POST, "/workflows", "Store a workflow").body::<CreateBody>().answers::<WorkflowView<'static>>(201),
        op(M::GET, "/workflows", "Your stored workflows, most recently updated first")
            .query::<ListParams>()
            .answers::<Page<WorkflowSummaryView<'static>>>(200),
        op(M::GET, "/workflows/{id}", "A stored workflow's definition").query::<VersionQuery>().answers::<WorkflowView<'static>>(200),
        op(M::PUT, "/workflows/{id}", "Write a stored workflow's next version")
            .header("If-Match", "the version you read, `\"N\"` (the `ETag` of GET), or `*` to replace whatever is latest")
            .body::<UpdateBody>()
            .answers::<WorkflowView<'static>>(200)
            .refuses(&[409, 428]),
        op(M::DELETE, "/workflows/{id}", "Delete a stored workflow"),
        op(M::POST, "/workflows/{id}/runs", "Start a run of a stored workflow").body::<RunBody>().answers::<RunAccepted>(202).refuses(&[429]),
        op(M::POST, "/workflows/{id}/estimate", "Estimate a run of a stored workflow").body::<EstimateBody>().answers::<EstimateView<'static>>(200),
        op(M::POST, "/workflows/{id}/duplicate", "Copy a stored workflow").optional_body::<DuplicateBody>().answers::<WorkflowView<'static>>(201),
        op(M::PUT, "/workflows/{id}/access", "Set who may see, run, edit or control a stored workflow")
            .body::<chainrun_core::access::Access>()
            .answers::<WorkflowView<'static>>(200),
        op(M::GET, "/templates", "Built-in templates, then your saved ones")
            .query::<crate::templates::ListParams>()
            .answers::<Page<TemplateView<'static>>>(200),
        op(M::POST, "/templates", "Save a version of a stored workflow as a template").body::<SaveBody>().answers::<TemplateView<'static>>(201),
        op(M::GET, "/templates/{id}", "A template, with its definition").answers::<TemplateView<'static>>(200),
        op(M::DELETE, "/templates/{id}", "Delete a saved template"),
        // Without a token: what anyone may do with `PUBLIC` workflows and runs.
        op(M::GET, "/public/runs/{id}", "A public run").public().query::<RevisionQuery>().answers::<RunView<'static>>(200),
        op(M::GET, "/public/runs/{id}/events", "A public run's progress events").public().query::<EventsQuery>().answers::<EventsPage<'static>>(200),
        op(M::GET, "/public/runs/{id}/graph", "A public run's steps and edges").public().answers::<GraphView>(200),
        op(M::GET, "/public/runs/{id}/output", "A public run's output, whole").public(),
        op(M::GET, "/public/runs/{id}/steps/{step}/output", "A public run's step output, whole").public().query::<RevisionQuery>(),
        op(M::GET, "/public/runs/{id}/steps/{step}/text", "A public run's step text, whole").public().query::<RevisionQuery>().answers_text(),
        op(M::GET, "/public/progress", "The public progress feed").public().query::<ProgressQuery>().answers::<Page<ProgressRowView<'static>>>(200),
        op(M::GET, "/public/workflows/{id}", "A public stored workflow").public().query::<VersionQuery>().answers::<WorkflowView<'static>>(200),
        op(M::POST, "/public/workflows/{id}/runs", "Start a run of a public stored workflow")
            .public()
            .body::<RunBody>()
            .answers::<RunAccepted>(202)
            .refuses(&[429]),
        op(M::POST, "/public/workflows/{id}/estimate", "Estimate a run of a public stored workflow")
            .public()
            .body::<EstimateBody>()
            .answers::<EstimateView<'static>>(200),
        op(M::GET, "/openapi.json", "This document").public().answers_object(200, "the OpenAPI 3.1 document of this API"),
        op(M::GET, "/schemas/workflow.json", "The workflow language's JSON Schema").public().answers_schema(),
    ]
}

/// The refusals an operation may answer: those of its kind, and its own.
fn refusals(op: &Operation) -> Vec<u16> {
    let mut statuses = Vec::new();
    if op.query.is_some() || op.body.is_some() || !op.headers.is_empty() || is_write(&op.method) {
        statuses.push(400);
    }
    if !op.public {
        statuses.push(401);
    }
    if op.path.contains('{') {
        statuses.push(404);
        if !op.public {
            // Seen, but not to be done by this caller (its role does not allow it).
            statuses.push(403);
        }
    }
    if is_write(&op.method) {
        // A reused Idempotency-Key: still in flight (409), or for another request (422).
        statuses.extend([409, 413, 422]);
    }
    statuses.extend(op.refuses);
    statuses.sort_unstable();
    statuses.dedup();
    statuses
}

/// Takes a body and an `Idempotency-Key`.
fn is_write(method: &Method) -> bool {
    *method == Method::POST || *method == Method::PUT
}

/// The OpenAPI 3.1 document of every operation in [`operations`].
pub fn document() -> Value {
    // What a client may send and what it gets differ (a field the server always fills is
    // optional in a request; one it leaves out when empty is optional in an answer), so
    // requests and answers are described by two generators, one per serde contract.
    let settings = |path: &str| SchemaSettings::draft2020_12().with(|s| s.definitions_path = path.to_owned().into());
    let mut generators =
        Generators { requests: settings(COMPONENTS).for_deserialize().into_generator(), answers: settings(ANSWERS).for_serialize().into_generator() };
    let problem = schema::<ProblemDocument>(&mut generators.answers);
    let mut paths = Map::new();
    for op in operations() {
        let item = paths.entry(op.path).or_insert_with(|| json!({}));
        item[op.method.as_str().to_ascii_lowercase()] = operation(&op, &mut generators, &problem);
    }
    let mut schemas: Map<String, Value> = generators.requests.take_definitions(true).into_iter().collect();
    // An answer's schema keeps its name unless a request's differs under the same name
    // (or it refers to one that does): then it is `<name>.answer`.
    let answers: Map<String, Value> = generators.answers.take_definitions(true).into_iter().collect();
    let as_request = |schema: &Value| {
        let mut schema = schema.clone();
        let every: HashMap<String, String> = answers.keys().map(|n| (format!("#{ANSWERS}/{n}"), format!("#{COMPONENTS}/{n}"))).collect();
        rename_refs(&mut schema, &every);
        schema
    };
    let mut apart: HashSet<&String> = answers.iter().filter(|(n, v)| schemas.get(*n).is_some_and(|r| *r != as_request(v))).map(|(n, _)| n).collect();
    loop {
        let refers = |v: &Value| apart.iter().any(|a| v.to_string().contains(&format!("\"#{ANSWERS}/{a}\"")));
        let more: Vec<&String> =
            answers.iter().filter(|(n, v)| schemas.contains_key(*n) && !apart.contains(n) && refers(v)).map(|(n, _)| n).collect();
        if more.is_empty() {
            break;
        }
        apart.extend(more);
    }
    let mut renamed = HashMap::new();
    for (original, schema) in &answers {
        let name = if apart.contains(original) { format!("{original}.answer") } else { original.clone() };
        renamed.insert(format!("#{ANSWERS}/{original}"), format!("#{COMPONENTS}/{name}"));
        schemas.entry(name).or_insert_with(|| schema.clone());
    }
    let mut document = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "chainrun",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Runs multi-step LLM workflows. Errors are problem documents (RFC 9457). Generated from the API's Rust types.",
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "security": [{ "bearer": [] }],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "In AWS, verified by the HTTP API's JWT authorizer; locally, an HS256 token signed with the stack's dev key (`make token`).",
                },
            },
        },
    });
    rename_refs(&mut document, &renamed);
    document
}

/// Where the answers' generator puts its schemas until they join the requests'.
const ANSWERS: &str = "/components/answers";

struct Generators {
    requests: SchemaGenerator,
    answers: SchemaGenerator,
}

/// Points every `$ref` into [`ANSWERS`] at the schema's place in the document.
fn rename_refs(value: &mut Value, renamed: &HashMap<String, String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    Value::String(r) if key == "$ref" => {
                        if let Some(to) = renamed.get(r.as_str()) {
                            *r = to.clone();
                        }
                    }
                    v => rename_refs(v, renamed),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rename_refs(v, renamed)),
        _ => {}
    }
}

fn operation(op: &Operation, generators: &mut Generators, problem: &Schema) -> Value {
    let generator = &mut generators.requests;
    let mut parameters = Vec::new();
    for name in op.path.split('/').filter_map(|s| s.strip_prefix('{')?.strip_suffix('}')) {
        parameters.push(json!({ "name": name, "in": "path", "required": true, "schema": path_parameter(op.path, name, generator) }));
    }
    if let Some(query) = op.query {
        // A query type is an object; each of its properties is one parameter.
        let object = query(generator);
        let required: Vec<&str> = object.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
        for (name, schema) in object.get("properties").and_then(Value::as_object).into_iter().flatten() {
            let description = schema.get("description").cloned().unwrap_or(Value::Null);
            let mut parameter = json!({ "name": name, "in": "query", "required": required.contains(&name.as_str()), "schema": schema });
            if let Some(text) = description.as_str() {
                parameter["description"] = json!(text);
            }
            parameters.push(parameter);
        }
    }
    for (name, description) in &op.headers {
        parameters.push(json!({ "name": name, "in": "header", "required": false, "description": description, "schema": { "type": "string" } }));
    }
    if is_write(&op.method) {
        parameters.push(json!({
            "name": "Idempotency-Key",
            "in": "header",
            "required": false,
            "description": "1 to 255 visible ASCII characters: a repeat of the request with the same key gets the first one's answer and acts once",
            "schema": { "type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$" },
        }));
    }
    let mut responses = Map::new();
    let generator = &mut generators.answers;
    let success = match op.answer {
        Answer::Json(schema) => json!({ "description": reason(op.status), "content": { "application/json": { "schema": schema(generator) } } }),
        Answer::Object(what) => json!({ "description": what, "content": { "application/json": { "schema": { "type": "object" } } } }),
        Answer::AnyJson => json!({ "description": "any JSON value", "content": { "application/json": { "schema": {} } } }),
        Answer::Text => json!({ "description": reason(op.status), "content": { "text/plain": { "schema": { "type": "string" } } } }),
        Answer::JsonSchema => {
            json!({ "description": "a JSON Schema (2020-12)", "content": { "application/schema+json": { "schema": { "type": "object" } } } })
        }
        Answer::Empty => json!({ "description": reason(op.status) }),
    };
    responses.insert(op.status.to_string(), success);
    for status in refusals(op) {
        let content = json!({ "application/problem+json": { "schema": problem } });
        responses.insert(status.to_string(), json!({ "description": reason(status), "content": content }));
    }
    let mut operation = json!({
        "summary": op.summary,
        "operationId": operation_id(op),
        "parameters": parameters,
        "responses": responses,
    });
    if let Some((body, required)) = op.body {
        let schema = body(&mut generators.requests);
        operation["requestBody"] = json!({ "required": required, "content": { "application/json": { "schema": schema } } });
    }
    if op.public {
        operation["security"] = json!([]);
    }
    operation
}

/// The id parameters are the ids of what the path names.
fn path_parameter(path: &str, name: &str, generator: &mut SchemaGenerator) -> Schema {
    use chainrun_core::ids::{RunId, StepId, WorkflowId};
    let path = path.strip_prefix("/public").unwrap_or(path);
    match name {
        "step" => schema::<StepId>(generator),
        "id" if path.starts_with("/workflows") => schema::<WorkflowId>(generator),
        "id" if path.starts_with("/runs") => schema::<RunId>(generator),
        _ => schema::<String>(generator),
    }
}

/// `POST /runs/{id}/cancel` → `post_runs_id_cancel`: unique, and stable while the route is.
fn operation_id(op: &Operation) -> String {
    let words: Vec<String> = op.path.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_owned).collect();
    format!("{}_{}", op.method.as_str().to_ascii_lowercase(), words.join("_"))
}

fn reason(status: u16) -> &'static str {
    StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("answer")
}
