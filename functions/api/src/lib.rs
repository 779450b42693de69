//! chainrun's HTTP API: access checks, stored workflows, starting runs, reading runs and their progress,
//! run history, cost analytics, the caller's daily spend and cost estimates.
//!
//! [`app`] builds an axum `Router` from ports, so tests call it with `oneshot` and
//! in-memory adapters, and `main` hands the same router to `lambda_http`.

mod access;
mod answer;
pub mod auth;
pub mod error;
mod graph;
mod history;
pub mod idempotency;
mod limits;
pub mod openapi;
mod pages;
mod revisions;
mod templates;
mod workflows;

use auth::{Authenticator, Identity};
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chainrun_core::access::{Access, Role};
use chainrun_core::budget::BudgetLimits;
use chainrun_core::config::{ConfigError, CoreConfig, Source};
use chainrun_core::graph::{OnTimeout, StepKind, ValidatedGraph, reviewer_name, validate_json};
use chainrun_core::ids::{Principal, RunId, StepId};
use chainrun_core::ports::{
    Analytics, ControlOutcome, DailySpend, DecideOutcome, Dispatcher, Idempotency, MAX_OWNERS, ProgressReader, ResumeOutcome, RunHistory, RunStore,
    WorkflowStore,
};
use chainrun_core::pricing::ModelRegistry;
use chainrun_core::run::{
    BudgetRaise, Cause, ControlKind, ControlRequest, Resumption, ReviewDecision, ReviewWait, RunOptions, RunRecord, RunStatus, RunnerEvent,
    StepStatus, Verdict, WaitKind,
};
use chainrun_core::spend::DailyCaps;
use chainrun_core::wire::steering::{ControlAccepted, DecisionAccepted, ResumeAccepted};
use chainrun_core::wire::views::{EstimateView, EventsPage, Page, ProgressRowView, RunAccepted, RunLinks, RunView};
use chainrun_core::workflow::Budget;
use error::ApiError;
use http::StatusCode;
use http::request::Parts;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use tracing::{info, warn};

/// Requests larger than this are refused before parsing (a run record must fit one
/// DynamoDB item, together with its definition).
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// Everything the API reads from the environment, once.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub core: CoreConfig,
    pub runner_function: String,
    pub auth: Authenticator,
}

impl ApiConfig {
    pub fn from_source(env: &impl Source) -> Result<Self, ConfigError> {
        Ok(Self {
            core: CoreConfig::from_source(env)?,
            runner_function: env.required("CHAINRUN_RUNNER_FUNCTION")?,
            auth: Authenticator::from_source(env)?,
        })
    }
}

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn RunStore>,
    pub progress: Arc<dyn ProgressReader>,
    pub history: Arc<dyn RunHistory>,
    pub analytics: Arc<dyn Analytics>,
    pub dispatcher: Arc<dyn Dispatcher>,
    pub models: Arc<ModelRegistry>,
    pub auth: Authenticator,
    /// The daily spend counters the runner keeps, and the caps it enforces.
    pub daily: Arc<dyn DailySpend>,
    pub daily_caps: Arc<DailyCaps>,
    /// `Idempotency-Key`s and the answers they replay.
    pub idempotency: Arc<dyn Idempotency>,
    /// Stored workflows and their versions.
    pub workflows: Arc<dyn WorkflowStore>,
    /// Saved templates (built-ins are compiled in).
    pub templates: Arc<dyn chainrun_core::ports::TemplateStore>,
    /// Fair limits per tenant (see `limits`) and the counters they are checked against.
    pub limits: Arc<chainrun_core::quota::TenantLimits>,
    pub quota: Arc<dyn chainrun_core::ports::TenantQuota>,
}

pub fn app(state: AppState) -> Router {
    let routes = Router::new()
        .route("/runs", get(history::list_runs).post(start_run).fallback(method_not_allowed))
        .route("/runs/{id}", get(get_run).fallback(method_not_allowed))
        .route("/runs/{id}/events", get(get_events).fallback(method_not_allowed))
        .route("/runs/{id}/graph", get(graph::get_graph).fallback(method_not_allowed))
        .route("/runs/{id}/view", get(pages::run_view).fallback(method_not_allowed))
        .route("/runs/{id}/output", get(get_run_output).fallback(method_not_allowed))
        .route("/runs/{id}/cancel", post(cancel_run).fallback(method_not_allowed))
        .route("/runs/{id}/pause", post(pause_run).fallback(method_not_allowed))
        .route("/runs/{id}/resume", post(resume_run).fallback(method_not_allowed))
        .route("/runs/{id}/steps/{step}/{part}", get(get_step_document).post(post_step).put(put_step).fallback(method_not_allowed))
        .route("/progress", get(get_progress).fallback(method_not_allowed))
        .route("/analytics/costs", get(history::costs).fallback(method_not_allowed))
        .route("/analytics/spend", get(history::spend_today).fallback(method_not_allowed))
        .route("/analytics/view", get(pages::cost_view).fallback(method_not_allowed))
        .route("/workflows/estimate", post(estimate_run).fallback(method_not_allowed))
        .merge(workflows::routes())
        .merge(templates::routes())
        .merge(openapi::routes())
        .nest("/public", public_routes())
        .fallback(not_found);
    routes
        .layer(axum::middleware::from_fn_with_state(state.clone(), idempotency::keyed))
        .layer(axum::middleware::from_fn(error::problem_documents))
        .layer(axum::middleware::from_fn_with_state(state.clone(), limits::body_size))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

/// What a caller without a token may do: read and run `PUBLIC` workflows, read the runs
/// they may see (a `PUBLIC` run's id is its capability) and the public feed. Every request
/// here is anonymous whatever it carries: in AWS these routes have no authorizer, so a
/// token on them is vouched for by nobody.
fn public_routes() -> Router<AppState> {
    Router::new()
        .route("/runs/{id}", get(get_run).fallback(method_not_allowed))
        .route("/runs/{id}/events", get(get_events).fallback(method_not_allowed))
        .route("/runs/{id}/graph", get(graph::get_graph).fallback(method_not_allowed))
        .route("/runs/{id}/output", get(get_run_output).fallback(method_not_allowed))
        .route("/runs/{id}/steps/{step}/{part}", get(get_step_document).fallback(method_not_allowed))
        .route("/progress", get(get_progress).fallback(method_not_allowed))
        .merge(workflows::public_routes())
        .layer(axum::middleware::map_request(|mut request: axum::extract::Request| async move {
            request.extensions_mut().insert(auth::Anonymous);
            request
        }))
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed("this route does not accept that method".into())
}

impl FromRequestParts<AppState> for Identity {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        if parts.extensions.get::<auth::Anonymous>().is_some() {
            return Ok(Identity::anonymous());
        }
        state.auth.identify(parts).map_err(|e| ApiError::Unauthorized(e.to_string()))
    }
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartRun {
    #[schemars(with = "chainrun_core::workflow::WorkflowDef")]
    workflow: Value,
    #[serde(default = "empty_object")]
    #[schemars(with = "serde_json::Map<String, Value>")]
    input: Value,
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::StartOptions>")]
    options: Option<Value>,
}

pub(crate) fn empty_object() -> Value {
    json!({})
}

/// Parses a JSON body ourselves so every malformed body gets a problem that says where.
pub(crate) fn parse_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(ApiError::PayloadTooLarge { limit: MAX_BODY_BYTES });
    }
    if body.is_empty() {
        return Err(ApiError::bad_request("Malformed request body", "the request body is empty; send a JSON object"));
    }
    serde_json::from_slice(body).map_err(|e| {
        let title = if e.is_syntax() || e.is_eof() { "Malformed JSON" } else { "Invalid request body" };
        ApiError::bad_request(title, format!("{e}"))
    })
}

async fn start_run(State(state): State<AppState>, identity: Identity, body: Bytes) -> Result<Response, ApiError> {
    let request: StartRun = parse_body(&body)?;
    queue_run(&state, &identity, request.workflow, request.input, request.options, None).await
}

/// Validates and stores a run of `workflow` on `input` and hands it to the runner: `202`
/// with its id and links. `stored`: the stored workflow and the version it runs, if any.
pub(crate) async fn queue_run(
    state: &AppState,
    identity: &Identity,
    workflow: Value,
    input: Value,
    options: Option<Value>,
    stored: Option<(&chainrun_core::stored::StoredWorkflow, u32)>,
) -> Result<Response, ApiError> {
    let invalid_options = |detail: String| ApiError::bad_request("Invalid request body", format!("options: {detail}"));
    // `visibility` and `shares` say who sees the run; the rest is how it runs.
    let (chosen, options) = match options {
        None => (None, RunOptions::default()),
        Some(Value::Object(mut fields)) => {
            let visibility = fields.remove("visibility");
            let shares = fields.remove("shares");
            let chosen = match (visibility, shares) {
                (None, None) => None,
                (None, Some(_)) => return Err(invalid_options("shares: only with \"visibility\": \"SHARED\"".into())),
                (Some(visibility), shares) => Some(Access {
                    visibility: serde_json::from_value(visibility).map_err(|e| invalid_options(format!("visibility: {e}")))?,
                    shares: serde_json::from_value(shares.unwrap_or_else(|| json!([]))).map_err(|e| invalid_options(format!("shares: {e}")))?,
                }),
            };
            (chosen, serde_json::from_value(Value::Object(fields)).map_err(|e| invalid_options(e.to_string()))?)
        }
        Some(_) => return Err(invalid_options("an object".into())),
    };
    if let Some(chosen) = &chosen {
        chosen.validate(identity.is_admin()).map_err(|e| invalid_options(e.0))?;
    }
    let graph = validated(state, &workflow, &input)?;
    // A stored workflow's runs inherit its access; one may be narrower, never wider.
    let (access, inherits) = match (stored, chosen) {
        (Some((head, _)), Some(chosen)) => {
            chosen.within(&head.access).map_err(|e| invalid_options(e.0))?;
            (chosen, false)
        }
        (Some((head, _)), None) => (head.access.clone(), true),
        (None, chosen) => (chosen.unwrap_or_default(), false),
    };
    if identity.is_anonymous() && access.visibility != chainrun_core::access::Visibility::Public {
        return Err(invalid_options(format!(
            "visibility: a run started without a token must be PUBLIC, or no one could read it (asked for {})",
            access.visibility.name()
        )));
    }
    // The run is seen by its starter, its workflow's owner, everyone who may decide one of
    // its reviews or answer one of its input steps, and the feeds its access names.
    let mut people = Vec::new();
    for (step, asked) in graph.people(&identity.user) {
        if identity.is_anonymous() && asked.iter().any(|p| matches!(p, Principal::User(u) if *u == identity.user.as_str())) {
            return Err(ApiError::bad_request(
                "Invalid workflow",
                format!("step {step}: it asks the run's starter, and a caller without a token cannot answer; name its reviewers"),
            ));
        }
        people.extend(asked);
    }
    let owners = chainrun_core::access::run_owners(&identity.user, stored.map(|(head, _)| &head.owner), &people, &access);
    if owners.len() > MAX_OWNERS {
        return Err(ApiError::bad_request(
            "Invalid workflow",
            format!("reviewers and shares: {} people, groups and feeds would see this run; at most {MAX_OWNERS} may", owners.len()),
        ));
    }
    let mut run = RunRecord::new(graph.name().clone(), workflow, input, identity.user.clone(), owners, chrono::Utc::now());
    run.step_order = graph.step_order();
    run.options = options;
    run.pinned = stored.map(|(head, version)| chainrun_core::stored::Pinned { workflow_id: head.id.clone(), version });
    run.workflow_owner = stored.map(|(head, _)| head.owner.clone());
    run.access = Some(access);
    run.inherits_access = inherits;
    // 429 when the caller's tenant has no slot or no start left this minute: nothing stored.
    let admitted = limits::admit_start(state, &run).await?;
    if let Err(e) = state.store.create_run(&run).await {
        admitted.abandon(state).await;
        return Err(e.into());
    }
    // The run is stored: it will run even if this hand-over fails, because the sweeper
    // dispatches a run still queued after the grace period. Failing the request now would
    // only make the client start it twice.
    if let Err(e) = state.dispatcher.dispatch(&RunnerEvent::new(run.id.clone(), Cause::Start)).await {
        warn!(run_id = %run.id, error = %e, "dispatch failed; the sweeper will start the run");
    }
    info!(run_id = %run.id, workflow = %run.workflow, user = %identity.user, steps = graph.steps().len(), "run queued");
    let location = format!("/runs/{}", run.id);
    let accepted = RunAccepted { warnings: model_warnings(state, &graph), ..RunAccepted::new(run.id) };
    Ok((StatusCode::ACCEPTED, [(http::header::LOCATION, location)], Json(accepted)).into_response())
}

/// Validates a definition and an input as every route that takes them must: `400` with
/// every problem of the definition, or with where the input breaks it.
pub(crate) fn validated(state: &AppState, workflow: &Value, input: &Value) -> Result<ValidatedGraph, ApiError> {
    let graph = validated_definition(state, workflow)?;
    if !input.is_object() {
        return Err(ApiError::bad_request("Invalid input", "input must be a JSON object"));
    }
    if let Err(violations) = graph.check_input(input) {
        return Err(ApiError::bad_request("Invalid input", format!("input does not match the workflow's input_schema: {}", violations.join("; "))));
    }
    Ok(graph)
}

/// Validates a definition as every route that takes one must: `400` naming every problem.
pub(crate) fn validated_definition(state: &AppState, workflow: &Value) -> Result<ValidatedGraph, ApiError> {
    limits::check_definition_size(state, workflow)?;
    let graph = validate_json(workflow, &state.models).map_err(|invalid| ApiError::BadRequest {
        title: "Invalid workflow",
        detail: invalid.to_string(),
        problems: invalid.problems,
    })?;
    let retired = graph.lifecycle(&state.models, chrono::Utc::now().date_naive()).retired;
    if !retired.is_empty() {
        let detail = retired.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
        return Err(ApiError::BadRequest { title: "Invalid workflow", detail, problems: retired });
    }
    Ok(graph)
}

/// The warnings a run of `graph` starts with today: models that are legacy on Bedrock or
/// near their end of life.
pub(crate) fn model_warnings(state: &AppState, graph: &ValidatedGraph) -> Vec<chainrun_core::graph::Problem> {
    graph.lifecycle(&state.models, chrono::Utc::now().date_naive()).warnings
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct EstimateRun {
    #[schemars(with = "chainrun_core::workflow::WorkflowDef")]
    workflow: Value,
    #[serde(default = "empty_object")]
    #[schemars(with = "serde_json::Map<String, Value>")]
    input: Value,
}

/// How far back `POST /workflows/estimate` looks for earlier runs of the workflow.
pub const ESTIMATE_HISTORY_DAYS: u64 = 30;

/// `POST /workflows/estimate`: per step and in total, `{min, expected, max}` tokens and cost
/// of running the definition on the input (see `chainrun_core::estimate`). `expected` comes
/// from the caller's own runs of a workflow of that name in the last 30 days when there are any.
async fn estimate_run(State(state): State<AppState>, identity: Identity, body: Bytes) -> Result<Response, ApiError> {
    let request: EstimateRun = parse_body(&body)?;
    estimate_of(&state, &identity, &request.workflow, &request.input).await
}

/// The estimate of running `workflow` on `input`, for `identity`.
pub(crate) async fn estimate_of(state: &AppState, identity: &Identity, workflow: &Value, input: &Value) -> Result<Response, ApiError> {
    let graph = validated(state, workflow, input)?;
    let to = chrono::Utc::now().date_naive();
    let from = to - chrono::Days::new(ESTIMATE_HISTORY_DAYS - 1);
    let history = state.analytics.costs(&Principal::User(identity.user.to_string()), from, to).await?;
    let history = history.into_iter().find(|w| graph.name() == w.workflow.as_str());
    let estimate = chainrun_core::estimate::estimate(&graph, input, &state.models, history.as_ref());
    let view = EstimateView { warnings: model_warnings(state, &graph), ..EstimateView::from(&estimate) };
    Ok(Json(view).into_response())
}

/// How much of a run a route reads.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// With its output (which may be kept in S3).
    Whole,
    /// Without it: access, status and what it waits for.
    Head,
}

/// Loads a run the caller may see; anything else is a 404, so ids of other people's runs
/// cannot be probed.
pub(crate) async fn visible_run(state: &AppState, identity: &Identity, raw_id: &str, part: Part) -> Result<RunRecord, ApiError> {
    Ok(run_with_role(state, identity, raw_id, part).await?.0)
}

/// [`visible_run`] and the role the caller holds on it.
async fn run_with_role(state: &AppState, identity: &Identity, raw_id: &str, part: Part) -> Result<(RunRecord, Role), ApiError> {
    let not_found = || ApiError::NotFound(format!("no run {raw_id:?}"));
    let id = RunId::parse(raw_id).map_err(|_| not_found())?;
    let run = match part {
        Part::Whole => state.store.get_run(&id).await?,
        Part::Head => state.store.get_run_head(&id).await?,
    };
    let run = run.ok_or_else(not_found)?;
    let role = access::role_on_run(state, &run, identity).await?.ok_or_else(not_found)?;
    Ok((run, role))
}

/// A run the caller may steer (cancel, pause, resume, retry, override): `control` on it.
pub(crate) async fn controlled_run(state: &AppState, identity: &Identity, raw_id: &str, what: &str) -> Result<RunRecord, ApiError> {
    let (run, role) = run_with_role(state, identity, raw_id, Part::Head).await?;
    access::require(role, Role::Control, what)?;
    Ok(run)
}

/// `?revision=N`: which revision of the run to show (default: the one it runs now).
#[derive(Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RevisionQuery {
    revision: Option<u32>,
}

fn revision_query(query: Result<Query<RevisionQuery>, axum::extract::rejection::QueryRejection>) -> Result<Option<u32>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("Invalid query", e.body_text()))?;
    Ok(query.revision)
}

/// The revision `asked` of `run` (default: its current one); `404` if it has none such.
fn revision_of(run: &RunRecord, asked: Option<u32>) -> Result<u32, ApiError> {
    match asked {
        Some(n) if n > run.revision => Err(ApiError::NotFound(format!("run {} has no revision {n} (it is at revision {})", run.id, run.revision))),
        Some(n) => Ok(n),
        None => Ok(run.revision),
    }
}

async fn get_run(
    State(state): State<AppState>,
    identity: Identity,
    Path(id): Path<String>,
    query: Result<Query<RevisionQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let asked = revision_query(query)?;
    let mut run = visible_run(&state, &identity, &id, Part::Whole).await?;
    let view = revision_of(&run, asked)?;
    let steps = run.records_at(state.store.get_steps(&run.id).await?, view);
    if view < run.revision {
        run = as_of(&state, run, view, &steps);
    }
    let legacy_order;
    let order = if run.step_order.is_empty() {
        // Runs stored before the order was: validate the snapshot once more for it.
        legacy_order = match validate_json(&run.definition, &state.models) {
            Ok(graph) => graph.step_order(),
            Err(_) => steps.iter().map(|r| r.step_id.clone()).collect(),
        };
        &legacy_order
    } else {
        &run.step_order
    };
    let mut body = RunView::new(&run, order, &steps);
    if view == run.revision && !run.status.is_terminal() {
        // In flight or waiting, the owners' progress row has the journal's ledger: every
        // charge so far, those of steps and map items not settled yet included.
        if let Some(feed) = run.steady_feed()
            && let Some(row) = live_row(&state, feed, &run.id).await?
        {
            body.summary.totals = (&row.totals).into();
        }
    }
    Ok(Json(body).into_response())
}

/// The progress row of a run in flight, for its live totals. One that does not read back
/// is read once more (a store that lets a read see a row mid-update, as moto does, heals
/// at once), then left out: the view falls back to the settled checkpoints' totals rather
/// than failing, and the row is logged.
pub(crate) async fn live_row(state: &AppState, feed: &Principal, run: &RunId) -> Result<Option<chainrun_core::run::ProgressRow>, ApiError> {
    for attempt in 1..=2 {
        match state.progress.progress_of(feed, run).await {
            Err(chainrun_core::ports::ProgressError::Corrupt(why)) if attempt == 1 => {
                warn!(run_id = %run, %why, "a progress row did not read back; reading it again");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(chainrun_core::ports::ProgressError::Corrupt(why)) => {
                warn!(run_id = %run, %why, "a progress row did not read back twice; the view shows the settled checkpoints' totals");
            }
            other => return Ok(other?),
        }
    }
    Ok(None)
}

/// `run` as it stood at the end of its earlier revision `view`: its end as the next
/// revision recorded it, and its output computed again from that revision's checkpoints
/// (the output template is a pure function of them), so no output is ever stored twice.
fn as_of(state: &AppState, run: RunRecord, view: u32, steps: &[chainrun_core::run::StepRecord]) -> RunRecord {
    let Some(end) = run.revisions.get(view as usize).map(|next| next.previous.clone()) else { return run };
    let output = match (end.status, validate_json(&run.definition, &state.models)) {
        (RunStatus::Completed, Ok(graph)) => {
            let by_step: std::collections::HashMap<&StepId, &chainrun_core::run::StepRecord> = steps.iter().map(|r| (&r.step_id, r)).collect();
            let records: Vec<_> = graph.steps().iter().map(|s| by_step.get(&s.id).map(|r| Arc::new((*r).clone()))).collect();
            chainrun_core::engine::run_output(&Arc::new(run.input.clone()), &graph, &records).ok()
        }
        _ => None,
    };
    RunRecord {
        status: end.status,
        finished_at: end.finished_at,
        error: end.error,
        totals: end.totals,
        output,
        revision: view,
        control: None,
        waiting: None,
        ..run
    }
}

#[derive(Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct ControlBody {
    #[serde(default)]
    reason: Option<String>,
}

/// The longest `reason` a control request keeps.
const MAX_REASON_CHARS: usize = 1000;

/// An optional JSON body `{ "reason": … }`; none at all is fine.
fn control_body(body: &Bytes) -> Result<ControlBody, ApiError> {
    let request: ControlBody = if body.iter().all(u8::is_ascii_whitespace) { ControlBody::default() } else { parse_body(body)? };
    if request.reason.as_ref().is_some_and(|r| r.chars().count() > MAX_REASON_CHARS) {
        return Err(ApiError::bad_request("Invalid request body", format!("reason: at most {MAX_REASON_CHARS} characters")));
    }
    Ok(request)
}

/// `POST /runs/{id}/cancel` (body optional: `{ "reason": … }`): asks the run to stop. The
/// request is recorded on the run at once; the runner holding it stops its steps within a
/// heartbeat, and a run no runner holds is ended by the runner this hands it to.
async fn cancel_run(State(state): State<AppState>, identity: Identity, Path(id): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    control_run(&state, &identity, &id, ControlKind::Cancel, control_body(&body)?).await
}

/// `POST /runs/{id}/pause` (body optional: `{ "reason": … }`): asks the run to wait. Steps
/// in flight finish, nothing new starts, and the run waits (`AWAITING_INPUT`) holding no
/// runner until `POST /runs/{id}/resume`.
async fn pause_run(State(state): State<AppState>, identity: Identity, Path(id): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    control_run(&state, &identity, &id, ControlKind::Pause, control_body(&body)?).await
}

/// Records a control request and hands the run to the runner. `202` with the request
/// standing on the run (again for a repeat); `409` if the run has ended, already waits, or
/// has another request standing.
async fn control_run(state: &AppState, identity: &Identity, id: &str, kind: ControlKind, body: ControlBody) -> Result<Response, ApiError> {
    let what = match kind {
        ControlKind::Cancel => "cancelling a run",
        ControlKind::Pause => "pausing a run",
    };
    let run = controlled_run(state, identity, id, what).await?;
    let control = ControlRequest { kind, by: identity.user.clone(), at: chrono::Utc::now(), reason: body.reason };
    let verb = match kind {
        ControlKind::Cancel => "cancel",
        ControlKind::Pause => "pause",
    };
    let standing = match state.store.request_control(&run.id, &control).await? {
        ControlOutcome::Recorded => {
            info!(run_id = %run.id, user = %identity.user, ?kind, "control requested");
            // A runner holding the run sees the request at its next heartbeat; otherwise
            // this hand-over (or, if it is lost, the sweeper) acts on it.
            if let Err(e) = state.dispatcher.dispatch(&RunnerEvent::new(run.id.clone(), Cause::Control)).await {
                warn!(run_id = %run.id, error = %e, "dispatch failed; the sweeper will hand the run over");
            }
            control
        }
        ControlOutcome::AlreadyRequested(standing) if standing.kind == kind => standing,
        ControlOutcome::AlreadyRequested(standing) => {
            return Err(ApiError::Conflict(format!(
                "run {id} already has a {:?} request standing (by {} at {}); it is acted on first",
                standing.kind, standing.by, standing.at
            )));
        }
        ControlOutcome::Finished(status) => {
            return Err(ApiError::Conflict(format!("run {id} has already ended ({}); there is nothing to {verb}", status.as_str())));
        }
        ControlOutcome::AlreadyWaiting => {
            return Err(ApiError::Conflict(format!("run {id} is already paused; resume it with POST /runs/{id}/resume")));
        }
        ControlOutcome::NotFound => return Err(ApiError::NotFound(format!("no run {id:?}"))),
    };
    let body = ControlAccepted { links: RunLinks::of(&run.id), run_id: run.id, status: run.status, control: standing };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

#[derive(Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResumeBody {
    step: Option<String>,
    decision: Option<Verdict>,
    output: Option<Value>,
    comment: Option<String>,
    /// A larger budget, for a run waiting on its budget: `{ max_cost_usd, max_total_tokens }`.
    #[schemars(with = "Option<Budget>")]
    budget: Option<Value>,
    /// An input step's field values (with `step`).
    #[schemars(with = "Option<serde_json::Map<String, Value>>")]
    values: Option<Value>,
    /// Free text an input step's `extract` model reads its values from (with `step`).
    text: Option<String>,
}

/// `POST /runs/{id}/resume`. With no body (or `{}`): continues a paused run on any runner.
/// With `{ "step", "decision": "approve" | "reject" | "edit", "output"?, "comment"? }`:
/// decides a review step waiting for it (`output` only with `edit`). With `{ "step",
/// "values": {…} }` or `{ "step", "text": "…" }`: answers an input step (see [`answer`]).
/// `202`; `409` saying what the run or step is doing if it does not wait.
async fn resume_run(State(state): State<AppState>, identity: Identity, Path(id): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let request: ResumeBody = if body.iter().all(u8::is_ascii_whitespace) { ResumeBody::default() } else { parse_body(&body)? };
    // Deciding a review or answering an input is for the people the step asks (checked
    // there); a plain resume or a budget raise steers the run.
    let (run, role) = run_with_role(&state, &identity, &id, Part::Head).await?;
    match request.step {
        Some(_) if request.budget.is_some() => Err(ApiError::bad_request("Invalid request body", "budget: raise it without a `step`")),
        Some(_)
            if (request.values.is_some() || request.text.is_some())
                && (request.decision.is_some() || request.output.is_some() || request.comment.is_some()) =>
        {
            Err(ApiError::bad_request("Invalid request body", "values and text answer an input step; decision, output and comment decide a review"))
        }
        Some(step) if request.values.is_some() || request.text.is_some() => {
            answer::answer_input(&state, &identity, run, answer::Answer { step, values: request.values, text: request.text }).await
        }
        Some(step) => {
            let decision = Decision { step, decision: request.decision, output: request.output, comment: request.comment };
            decide_review(&state, &identity, run, decision).await
        }
        None if request.decision.is_some() || request.output.is_some() || request.comment.is_some() => {
            Err(ApiError::bad_request("Invalid request body", "decision, output and comment decide a review: name its `step`"))
        }
        None if request.values.is_some() || request.text.is_some() => {
            Err(ApiError::bad_request("Invalid request body", "values and text answer an input step: name its `step`"))
        }
        None => {
            access::require(role, Role::Control, "resuming a run")?;
            resume_paused(&state, &identity, run, request.budget).await
        }
    }
}

async fn resume_paused(state: &AppState, identity: &Identity, run: RunRecord, budget: Option<Value>) -> Result<Response, ApiError> {
    let id = &run.id;
    let at = chrono::Utc::now();
    let waits_for_budget = run.waiting.as_ref().is_some_and(|w| w.kind == WaitKind::Budget);
    let raise = match budget {
        None if waits_for_budget => {
            let why = run.waiting.as_ref().and_then(|w| w.reason.clone()).unwrap_or_default();
            return Err(ApiError::Conflict(format!("run {id} waits for a larger budget ({why}); resume it with `budget`")));
        }
        None => None,
        Some(_) if !waits_for_budget => {
            return Err(ApiError::Conflict(format!("run {id} does not wait for its budget ({}); send no `budget`", run.status.as_str())));
        }
        Some(raw) => Some(budget_raise(identity, &run, raw, at)?),
    };
    if let Some(waiting) = run.waiting.as_ref().filter(|w| w.kind == WaitKind::Review) {
        let steps: Vec<&str> = waiting.steps.iter().map(StepId::as_str).collect();
        return Err(ApiError::Conflict(format!("run {id} waits for review decisions on {}: resume it with `step` and `decision`", steps.join(", "))));
    }
    if let Some(waiting) = run.waiting.as_ref().filter(|w| w.kind == WaitKind::Input) {
        let steps: Vec<&str> = waiting.steps.iter().map(StepId::as_str).collect();
        return Err(ApiError::Conflict(format!("run {id} waits for input on {}: resume it with `step` and `values` or `text`", steps.join(", "))));
    }
    if let Some(waiting) = run.waiting.as_ref().filter(|w| w.kind == WaitKind::Batch) {
        let steps: Vec<&str> = waiting.steps.iter().map(StepId::as_str).collect();
        return Err(ApiError::Conflict(format!(
            "run {id} waits for the batch inference job of {}: it continues by itself when the job ends (cancel it to stop)",
            steps.join(", ")
        )));
    }
    let resumption = Resumption { by: identity.user.clone(), at, budget: raise };
    match state.store.resume(id, &resumption).await? {
        ResumeOutcome::Resumed => {}
        ResumeOutcome::NotWaiting(status) => {
            return Err(ApiError::Conflict(format!("run {id} is not waiting ({}); only a paused run can be resumed", status.as_str())));
        }
        ResumeOutcome::NotFound => return Err(ApiError::NotFound(format!("no run {id:?}"))),
    }
    info!(run_id = %id, user = %identity.user, "run resumed");
    if let Err(e) = state.dispatcher.dispatch(&RunnerEvent::new(id.clone(), Cause::Resume)).await {
        warn!(run_id = %id, error = %e, "dispatch failed; the sweeper will continue the run");
    }
    let body = ResumeAccepted { run_id: id.clone(), status: RunStatus::Queued, resumed: resumption, links: RunLinks::of(id) };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// The budget a resume raises `run`'s to: parsed like a definition's, and no lower than
/// the one it runs under in any limit.
fn budget_raise(identity: &Identity, run: &RunRecord, raw: Value, at: chrono::DateTime<chrono::Utc>) -> Result<BudgetRaise, ApiError> {
    let invalid = |detail: String| ApiError::bad_request("Invalid request body", detail);
    let names = |key: &str| raw.as_object().is_some_and(|o| o.contains_key(key));
    if names("on_exceeded") {
        return Err(invalid("budget.on_exceeded: a raise changes the limits only".into()));
    }
    let (cost_named, tokens_named) = (names("max_cost_usd"), names("max_total_tokens"));
    if raw.is_object() && !cost_named && !tokens_named {
        return Err(invalid("budget: name the limits to raise (max_cost_usd, max_total_tokens), or set one to null to lift it".into()));
    }
    let def: Budget = serde_json::from_value(raw).map_err(|e| invalid(format!("budget: {e}")))?;
    let given = BudgetLimits::from_def(Some(&def))
        .map_err(|problems| invalid(problems.into_iter().map(|p| format!("{}: {}", p.field, p.message)).collect::<Vec<_>>().join("; ")))?;
    // The snapshot was validated at start: its budget parses (no need to validate it all again).
    let defined = run.definition.get("budget").and_then(|b| serde_json::from_value::<Budget>(b.clone()).ok());
    let defined = defined.and_then(|b| BudgetLimits::from_def(Some(&b)).ok()).unwrap_or(BudgetLimits::UNLIMITED);
    let from = run.budget(defined);
    // A limit the raise does not name stays as it was: raising the cost never silently
    // lifts the token limit. `null` lifts one.
    let to = BudgetLimits {
        max_cost: if cost_named { given.max_cost } else { from.max_cost },
        max_total_tokens: if tokens_named { given.max_total_tokens } else { from.max_total_tokens },
    };
    // Unset is unlimited: a raise may lift a limit, never lower or add one.
    let lower = |new: Option<u64>, old: Option<u64>| match (new, old) {
        (Some(new), Some(old)) => new < old,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if lower(to.max_cost.map(|u| u.pico()), from.max_cost.map(|u| u.pico())) || lower(to.max_total_tokens, from.max_total_tokens) {
        return Err(invalid("budget: a resume may only raise the budget (or lift a limit), not lower it".into()));
    }
    Ok(BudgetRaise { by: identity.user.clone(), at, from: from.into(), to: to.into() })
}

/// A reviewer's answer to a review step, as the resume body gives it.
struct Decision {
    step: String,
    decision: Option<Verdict>,
    output: Option<Value>,
    comment: Option<String>,
}

/// Records a reviewer's decision on a review step that waits for one.
async fn decide_review(state: &AppState, identity: &Identity, run: RunRecord, answer: Decision) -> Result<Response, ApiError> {
    let Decision { step, decision, output, comment } = answer;
    let invalid = |detail: String| ApiError::bad_request("Invalid request body", detail);
    let decision = decision.ok_or_else(|| invalid("decision: required with a step: approve, reject or edit".into()))?;
    match (decision, &output) {
        (Verdict::Edit, None) => return Err(invalid("output: an edit needs the output that replaces the step's".into())),
        (Verdict::Approve | Verdict::Reject, Some(_)) => return Err(invalid("output: only an edit has one".into())),
        _ => {}
    }
    if comment.as_ref().is_some_and(|c| c.chars().count() > MAX_REASON_CHARS) {
        return Err(invalid(format!("comment: at most {MAX_REASON_CHARS} characters")));
    }
    let id = run.id.clone();
    // Who may decide: the step's reviewers (default: the run's starter). Anyone else is
    // told there is no such review, as for a run they may not see.
    let no_review = || ApiError::NotFound(format!("run {id} has no review step {step:?} that you may decide"));
    let graph = validate_json(&run.definition, &state.models).map_err(|_| no_review())?;
    let spec = graph.steps().iter().find(|s| s.id.as_str() == step).and_then(|s| match &s.kind {
        StepKind::Review(spec) => Some(spec),
        _ => None,
    });
    let spec = spec.ok_or_else(no_review)?;
    let step_id = StepId::parse(&step).map_err(|_| no_review())?;
    let decided = ReviewDecision { decision, output, comment, by: identity.user.clone(), at: chrono::Utc::now() };
    // Admins control everything, reviews included.
    let may_decide = |level: Option<u32>| identity.is_admin() || identity.principals().iter().any(|p| spec.deciders(&run.caller, level).contains(p));
    if run.decisions.contains_key(&step_id) {
        // Decided: anyone it could ever have been handed to may hear so.
        if !may_decide(None) {
            return Err(no_review());
        }
    } else {
        let steps = run.records_at(state.store.get_steps(&id).await?, run.revision);
        let record = steps.iter().find(|r| r.step_id == step_id);
        let wait: Option<ReviewWait> = record.and_then(|r| r.detail.clone()).and_then(|d| serde_json::from_value(d).ok());
        // Waiting: its reviewers, and those its deadlines have escalated it to so far.
        if !may_decide(Some(wait.as_ref().map_or(0, |w| w.level))) {
            return Err(no_review());
        }
        let status = record.map_or(StepStatus::Pending, |r| r.status);
        if status != StepStatus::Waiting {
            return Err(ApiError::Conflict(format!("step {step} of run {id} is not waiting for a decision (it is {})", status.as_str())));
        }
        if let Some(deadline) = wait.as_ref().and_then(|w| w.deadline).filter(|d| *d <= decided.at) {
            // Too late: the deadline decides. Hand the run over so it does so now.
            if let Err(e) = state.dispatcher.dispatch(&RunnerEvent::new(id.clone(), Cause::Sweep)).await {
                warn!(run_id = %id, error = %e, "dispatch failed; the sweeper will apply the deadline");
            }
            let what = match spec.timeout.as_ref().map(|(_, on_timeout)| on_timeout.at_level(wait.as_ref().map_or(0, |w| w.level)).0) {
                Some(OnTimeout::Approve) => "it approves the review".to_owned(),
                Some(OnTimeout::Escalate { to, .. }) => {
                    format!("it hands the review to {}", to.iter().map(reviewer_name).collect::<Vec<_>>().join(", "))
                }
                _ => "it rejects the review".to_owned(),
            };
            return Err(ApiError::Conflict(format!("step {step} of run {id}: its deadline passed at {deadline}, and {what}")));
        }
    }
    let standing = match state.store.decide(&id, &step_id, &decided).await? {
        DecideOutcome::Recorded { requeued } => {
            info!(run_id = %id, step_id = %step_id, decision = ?decided.decision, user = %identity.user, requeued, "review decided");
            if requeued && let Err(e) = state.dispatcher.dispatch(&RunnerEvent::new(id.clone(), Cause::Resume)).await {
                warn!(run_id = %id, error = %e, "dispatch failed; the sweeper will continue the run");
            }
            decided
        }
        // The same decision again (a retry, a double click) is answered as the first.
        DecideOutcome::AlreadyDecided(existing)
            if existing.decision == decided.decision && existing.output == decided.output && existing.by == decided.by =>
        {
            existing
        }
        DecideOutcome::AlreadyDecided(existing) => {
            return Err(ApiError::Conflict(format!(
                "step {step} of run {id} was already decided: {:?} by {} at {}",
                existing.decision, existing.by, existing.at
            )));
        }
        DecideOutcome::Finished(status) => {
            return Err(ApiError::Conflict(format!("run {id} has already ended ({}); its reviews are closed", status.as_str())));
        }
        DecideOutcome::NotFound => return Err(ApiError::NotFound(format!("no run {id:?}"))),
    };
    let body = DecisionAccepted { links: RunLinks::of(&id), run_id: id, step: step_id, decision: standing };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// `GET /runs/{id}/output`: the run's output, whole — what `GET /runs/{id}` and
/// `RUN_COMPLETED` link to when it is too large to inline.
async fn get_run_output(State(state): State<AppState>, identity: Identity, Path(id): Path<String>) -> Result<Response, ApiError> {
    let run = visible_run(&state, &identity, &id, Part::Whole).await?;
    match run.output {
        Some(output) => Ok(Json(output).into_response()),
        None => Err(ApiError::NotFound(format!("run {id} has no output (it is {})", run.status.as_str()))),
    }
}

/// `GET /runs/{id}/steps/{step}/output` (JSON) or `…/text` (plain text): one step's
/// document, whole — what `GET /runs/{id}` links to when it is too large to inline.
async fn get_step_document(
    State(state): State<AppState>,
    identity: Identity,
    Path((id, step, part)): Path<(String, String, String)>,
    query: Result<Query<RevisionQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    if part != "output" && part != "text" {
        return Err(ApiError::NotFound(format!("no route for {part:?}: a step has an `output` and a `text`")));
    }
    let run = visible_run(&state, &identity, &id, Part::Head).await?;
    let view = revision_of(&run, revision_query(query)?)?;
    let steps = run.records_at(state.store.get_steps(&run.id).await?, view);
    let no_step = || ApiError::NotFound(format!("run {id} has no checkpoint of step {step:?}"));
    let record = steps.into_iter().find(|r| r.step_id.as_str() == step).ok_or_else(no_step)?;
    let missing = || ApiError::NotFound(format!("step {step} of run {id} has no {part} (it is {})", record.status.as_str()));
    if part == "text" {
        let text = record.text.clone().ok_or_else(missing)?;
        return Ok(([(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response());
    }
    let output = record.output.clone().ok_or_else(missing)?;
    Ok(Json(output).into_response())
}

/// `POST /runs/{id}/steps/{step}/retry`: re-runs the step of a finished run and exactly
/// its dependents, as the run's next revision.
async fn post_step(
    State(state): State<AppState>,
    identity: Identity,
    Path((id, step, action)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    match action.as_str() {
        "retry" => revisions::retry_step(&state, &identity, &id, step, &body).await,
        _ => Err(ApiError::NotFound(format!("no route for POST …/steps/{step}/{action}: a step is retried with POST …/steps/{step}/retry"))),
    }
}

/// `PUT /runs/{id}/steps/{step}/output`: sets the step's output by hand and re-runs
/// exactly its dependents, as the run's next revision.
async fn put_step(
    State(state): State<AppState>,
    identity: Identity,
    Path((id, step, part)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    match part.as_str() {
        "output" => revisions::override_output(&state, &identity, &id, step, &body).await,
        _ => Err(ApiError::NotFound(format!("no route for PUT …/steps/{step}/{part}: a step's output is set with PUT …/steps/{step}/output"))),
    }
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsQuery {
    #[serde(default)]
    after: u64,
    #[serde(default = "default_limit")]
    limit: u32,
    /// Only the events of this revision of the run (the cursor still moves over all).
    revision: Option<u32>,
}

fn default_limit() -> u32 {
    100
}

async fn get_events(
    State(state): State<AppState>,
    identity: Identity,
    Path(id): Path<String>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("Invalid query", e.body_text()))?;
    if !(1..=1000).contains(&query.limit) {
        return Err(ApiError::bad_request("Invalid query", "limit must be 1 to 1000"));
    }
    let run = visible_run(&state, &identity, &id, Part::Head).await?;
    let only = query.revision.map(|n| revision_of(&run, Some(n))).transpose()?;
    let mut events = state.progress.events_after(&run.id, query.after, query.limit).await?;
    let last_seq = events.last().map_or(query.after, |e| e.seq);
    if let Some(n) = only {
        events.retain(|e| e.revision == n);
    }
    Ok(Json(EventsPage { run_id: &run.id, status: run.status, events: &events, last_seq, revision: run.revision }).into_response())
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProgressQuery {
    #[serde(default = "default_limit")]
    limit: u32,
    /// The `next` of the previous page: rows of runs older than it.
    next: Option<String>,
    /// `shared`: the `AUTHED` and `PUBLIC` feeds too (every run anyone made visible to all).
    include: Option<String>,
}

/// `GET /progress?limit=N&next=CURSOR[&include=shared]`: one row per run the caller may
/// see, merged from the feeds of every principal they act as (their own, their groups',
/// the admin feed for admins), each run once, newest first, in pages.
async fn get_progress(
    State(state): State<AppState>,
    identity: Identity,
    query: Result<Query<ProgressQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("Invalid query", e.body_text()))?;
    if !(1..=1000).contains(&query.limit) {
        return Err(ApiError::bad_request("Invalid query", "limit must be 1 to 1000"));
    }
    let before = match &query.next {
        None => None,
        Some(raw) => {
            Some(RunId::parse(raw).map_err(|_| ApiError::bad_request("Invalid query", "next: pass the `next` of the previous page unchanged"))?)
        }
    };
    let feeds = match query.include.as_deref() {
        None => identity.own_feeds(),
        Some("shared") => identity.principals(),
        Some(other) => return Err(ApiError::bad_request("Invalid query", format!("include: {other:?}; the only value is \"shared\""))),
    };
    // One more row than asked per feed says whether a next page exists.
    let reads = feeds.iter().map(|principal| state.progress.feed(principal, query.limit + 1, before.as_ref()));
    let mut rows: Vec<_> = futures::future::try_join_all(reads).await?.into_iter().flatten().collect();
    // A run shared with several of the caller's principals appears once, newest first.
    rows.sort_by(|a, b| b.run_id.cmp(&a.run_id).then(b.last_seq.cmp(&a.last_seq)));
    rows.dedup_by(|a, b| a.run_id == b.run_id);
    let more = rows.len() > query.limit as usize;
    rows.truncate(query.limit as usize);
    let next = if more { rows.last().map(|r| r.run_id.to_string()) } else { None };
    Ok(Json(Page { items: rows.iter().map(ProgressRowView::from).collect(), next }).into_response())
}
