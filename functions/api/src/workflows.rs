//! Stored workflows: `POST/GET /workflows`, `GET/PUT/DELETE /workflows/{id}`, and running,
//! estimating and duplicating one (`POST /workflows/{id}/runs|estimate|duplicate`).
//!
//! Every write validates the definition exactly as `POST /runs` does (the same `400`), and
//! writes a new immutable version (see `chainrun_core::stored`). A run started from a
//! stored workflow remembers the workflow and the version it ran, and keeps its own
//! snapshot of the definition, so neither a later version nor a delete changes it.
//!
//! Updates are optimistic and the check is not optional. `PUT` must say which version it
//! read — `If-Match: "<version>"` (the `ETag` of `GET`) or `"version"` in the body — and a
//! stale one is a `409` naming the current version. A `PUT` that says neither is a `428
//! Precondition Required`: Step Functions' UpdateStateMachine lets the last writer win,
//! but a silent lost update of a definition other people run is the failure this API is
//! meant to prevent, and making the check opt-in would leave every naive client exposed. A
//! client that means to overwrite whatever is there says so with `If-Match: *`.
//!
//! Access (see `chainrun_core::access`): reading takes `view`, running and estimating
//! `run`, writing a version `edit`; changing who sees it (`PUT /workflows/{id}/access`) and
//! deleting it are for its owner and admins. To a caller who may not see it every route
//! answers `404`, as for an id that does not exist, so ids cannot be probed. Reading,
//! running and estimating are also served under `/public/` for callers without a token.
//!
//! `DELETE` takes no `Idempotency-Key` (the middleware keys only `POST` and `PUT`): it is
//! idempotent by itself — a repeat deletes nothing more, and answers `404`.

use crate::access::{may_administer, require, workflow_role};
use crate::auth::Identity;
use crate::error::ApiError;
use crate::history::bounded;
use crate::{AppState, empty_object, estimate_of, method_not_allowed, parse_body, queue_run, validated_definition};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chainrun_core::access::{Access, Role};
use chainrun_core::ids::{WorkflowId, WorkflowName};
use chainrun_core::ports::{SaveOutcome, StoreError, WorkflowCursor};
use chainrun_core::stored::{MAX_VERSION, StoredWorkflow, WorkflowVersion};
use chainrun_core::wire::views::Page;
use chainrun_core::wire::workflows::{WorkflowSummaryView, WorkflowView};
use chrono::{DateTime, SubsecRound, Utc};
use http::{HeaderMap, HeaderValue, StatusCode};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use std::ops::RangeInclusive;
use tracing::info;

const DEFAULT_LIST_LIMIT: u32 = 20;
const LIST_LIMITS: RangeInclusive<u32> = 1..=100;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/workflows", get(list).post(create).fallback(method_not_allowed))
        .route("/workflows/{id}", get(read).put(update).delete(delete).fallback(method_not_allowed))
        .route("/workflows/{id}/runs", post(run).fallback(method_not_allowed))
        .route("/workflows/{id}/estimate", post(estimate).fallback(method_not_allowed))
        .route("/workflows/{id}/duplicate", post(duplicate).fallback(method_not_allowed))
        .route("/workflows/{id}/access", axum::routing::put(set_access).fallback(method_not_allowed))
}

/// What callers without a token may do with a `PUBLIC` workflow (mounted under `/public`).
pub fn public_routes() -> Router<AppState> {
    Router::new()
        .route("/workflows/{id}", get(read).fallback(method_not_allowed))
        .route("/workflows/{id}/runs", post(run).fallback(method_not_allowed))
        .route("/workflows/{id}/estimate", post(estimate).fallback(method_not_allowed))
}

/// Now, to the millisecond: what the store keeps, so an answer shows what a read returns.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

fn no_workflow(raw_id: &str) -> ApiError {
    ApiError::NotFound(format!("no workflow {raw_id:?}"))
}

/// A store error of a workflow write: one that does not fit an item is the client's to fix.
fn write_failed(e: StoreError) -> ApiError {
    match e {
        StoreError::TooLarge(detail) => ApiError::bad_request("Workflow too large", detail),
        e => e.into(),
    }
}

/// The workflow `raw_id` at `version` (default: its latest), if the caller may see it
/// (anything else is the same `404`) and holds `needed` on it (`403` naming `what` if not).
async fn visible(
    state: &AppState,
    identity: &Identity,
    raw_id: &str,
    version: Option<u32>,
    needed: Role,
    what: &str,
) -> Result<(StoredWorkflow, WorkflowVersion), ApiError> {
    let id = WorkflowId::parse(raw_id).map_err(|_| no_workflow(raw_id))?;
    let (head, latest) = state.workflows.get(&id, None).await?.ok_or_else(|| no_workflow(raw_id))?;
    let role = workflow_role(&head, identity).ok_or_else(|| no_workflow(raw_id))?;
    require(role, needed, what)?;
    match version {
        None => Ok((head, latest)),
        Some(n) if n == head.version => Ok((head, latest)),
        Some(n) if n == 0 || n > head.version => {
            Err(ApiError::NotFound(format!("workflow {id} has no version {n}; its versions are 1 to {}", head.version)))
        }
        Some(n) => state.workflows.get(&id, Some(n)).await?.ok_or_else(|| no_workflow(raw_id)),
    }
}

/// A workflow version as the routes answer it, with its version as the `ETag`.
fn answer(status: StatusCode, head: &StoredWorkflow, version: &WorkflowVersion, location: bool) -> Response {
    let mut response = (status, axum::Json(WorkflowView::new(head, version))).into_response();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", version.version)) {
        response.headers_mut().insert(http::header::ETAG, etag);
    }
    if location && let Ok(href) = HeaderValue::from_str(&format!("/workflows/{}", head.id)) {
        response.headers_mut().insert(http::header::LOCATION, href);
    }
    response
}

/// The name of a definition that passed validation.
fn name_of(state: &AppState, definition: &Value) -> Result<WorkflowName, ApiError> {
    Ok(validated_definition(state, definition)?.name().clone())
}

/// Stores `definition` as a new workflow owned by the caller, at version 1.
async fn store_new(state: &AppState, identity: &Identity, definition: Value, access: Access) -> Result<(StoredWorkflow, WorkflowVersion), ApiError> {
    let name = name_of(state, &definition)?;
    let at = now();
    let head = StoredWorkflow { access, ..StoredWorkflow::new(identity.user.clone(), name, at) };
    let first = WorkflowVersion { version: 1, definition, written_by: identity.user.clone(), written_at: at };
    state.workflows.create(&head, &first).await.map_err(write_failed)?;
    info!(workflow_id = %head.id, user = %identity.user, "workflow created");
    Ok((head, first))
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBody {
    #[serde(default)]
    #[schemars(with = "Option<chainrun_core::workflow::WorkflowDef>")]
    workflow: Option<Value>,
    /// A template's id, instead of a definition (see `crate::templates`).
    #[serde(default)]
    template: Option<String>,
    /// With `template`: the new workflow's name.
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    visibility: chainrun_core::access::Visibility,
    #[serde(default)]
    shares: Vec<chainrun_core::access::Share>,
}

/// `POST /workflows` `{ workflow, visibility?, shares? }`: `201` with the new workflow at
/// version 1 (`PRIVATE` unless said otherwise), and its `Location`.
async fn create(State(state): State<AppState>, identity: Identity, body: Bytes) -> Result<Response, ApiError> {
    let request: CreateBody = parse_body(&body)?;
    let access = Access { visibility: request.visibility, shares: request.shares };
    checked_access(&access, &identity)?;
    let definition = crate::templates::definition_to_create(&state, &identity, request.workflow, request.template, request.name).await?;
    let (head, first) = store_new(&state, &identity, definition, access).await?;
    Ok(answer(StatusCode::CREATED, &head, &first, true))
}

/// [`visible`] with the role duplicating needs (`view`: a template copies the definition,
/// as a duplicate does), for saving a version as a template, so one access rule covers both.
pub(crate) async fn readable(
    state: &AppState,
    identity: &Identity,
    raw_id: &str,
    version: Option<u32>,
) -> Result<(StoredWorkflow, WorkflowVersion), ApiError> {
    visible(state, identity, raw_id, version, Role::View, "saving a workflow as a template").await
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    #[schemars(with = "Option<u32>")]
    limit: Option<String>,
    next: Option<String>,
}

fn encode_cursor(cursor: &WorkflowCursor) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}|{}", cursor.updated_at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true), cursor.id))
}

fn decode_cursor(raw: &str) -> Result<WorkflowCursor, ApiError> {
    let bad = || ApiError::bad_request("Invalid query", "next: not a cursor this API returned; pass the `next` of the previous page unchanged");
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(raw.trim()).map_err(|_| bad())?).map_err(|_| bad())?;
    let (at, id) = text.split_once('|').ok_or_else(bad)?;
    let updated_at = DateTime::parse_from_rfc3339(at).map_err(|_| bad())?.with_timezone(&Utc);
    Ok(WorkflowCursor { updated_at, id: WorkflowId::parse(id).map_err(|_| bad())? })
}

/// `GET /workflows?limit=N&next=CURSOR`: the workflows the caller may see (their own,
/// shared with them or their groups, `AUTHED`, `PUBLIC`; admins: all), most recently
/// updated first.
async fn list(State(state): State<AppState>, identity: Identity, params: Result<Query<ListParams>, QueryRejection>) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request("Invalid query", e.body_text()))?;
    let limit = bounded("limit", params.limit.as_deref(), DEFAULT_LIST_LIMIT, LIST_LIMITS)?;
    let after = params.next.as_deref().map(decode_cursor).transpose()?;
    let page = state.workflows.list(&identity.principals(), limit, after.as_ref()).await?;
    let items = page.items.iter().map(WorkflowSummaryView::from).collect();
    Ok(axum::Json(Page { items, next: page.next.as_ref().map(encode_cursor) }).into_response())
}

#[derive(Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct VersionQuery {
    #[schemars(with = "Option<u32>")]
    version: Option<String>,
}

/// `?version=N`: a version number, or none (the latest).
fn version_param(query: Result<Query<VersionQuery>, QueryRejection>) -> Result<Option<u32>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("Invalid query", e.body_text()))?;
    query.version.as_deref().map(|raw| bounded("version", Some(raw), 1, 1..=MAX_VERSION)).transpose()
}

/// `GET /workflows/{id}[?version=N]`: the definition and what is known of it, `ETag` the
/// version shown.
async fn read(
    State(state): State<AppState>,
    identity: Identity,
    Path(id): Path<String>,
    query: Result<Query<VersionQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let version = version_param(query)?;
    let (head, shown) = visible(&state, &identity, &id, version, Role::View, "reading a workflow").await?;
    Ok(answer(StatusCode::OK, &head, &shown, false))
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateBody {
    #[schemars(with = "chainrun_core::workflow::WorkflowDef")]
    workflow: Value,
    /// The version the writer read (or `If-Match`).
    #[serde(default)]
    version: Option<u32>,
}

/// What a `PUT` expects to replace.
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    Version(u32),
    /// `If-Match: *`: whatever is latest (a deliberate overwrite).
    Any,
}

/// The version `If-Match` names: `"3"` (or `W/"3"`), or `*`.
fn if_match(headers: &HeaderMap) -> Result<Option<Expected>, ApiError> {
    let Some(raw) = headers.get(http::header::IF_MATCH) else { return Ok(None) };
    let bad = || ApiError::bad_request("Invalid header", "If-Match: the ETag of the version you read (\"3\"), or * to replace whatever is latest");
    let raw = raw.to_str().map_err(|_| bad())?.trim();
    if raw == "*" {
        return Ok(Some(Expected::Any));
    }
    let tag = raw.strip_prefix("W/").unwrap_or(raw);
    let number = tag.strip_prefix('"').and_then(|t| t.strip_suffix('"')).ok_or_else(bad)?;
    number.parse::<u32>().ok().filter(|n| (1..=MAX_VERSION).contains(n)).map(|n| Some(Expected::Version(n))).ok_or_else(bad)
}

/// `PUT /workflows/{id}`: writes the definition as the next version, if the writer read
/// the latest (see the module docs): `200` with it, `409` on a lost update.
async fn update(
    State(state): State<AppState>,
    identity: Identity,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let header = if_match(&headers)?;
    let request: UpdateBody = parse_body(&body)?;
    if let Some(n) = request.version.filter(|n| !(1..=MAX_VERSION).contains(n)) {
        return Err(ApiError::bad_request("Invalid request body", format!("version: the version you read, 1 to {MAX_VERSION}; got {n}")));
    }
    let (head, _) = visible(&state, &identity, &id, None, Role::Edit, "writing a workflow's new version").await?;
    let expected = match (header, request.version) {
        (Some(Expected::Version(h)), Some(b)) if h != b => {
            return Err(ApiError::bad_request(
                "Invalid request",
                format!("If-Match names version {h} but the body's version is {b}; send one, or both the same"),
            ));
        }
        (Some(expected), _) => expected,
        (None, Some(b)) => Expected::Version(b),
        (None, None) => {
            return Err(ApiError::PreconditionRequired(
                "say which version you are replacing: If-Match: \"<version>\" (the ETag of GET /workflows/{id}) or \"version\" in the body; If-Match: * replaces whatever is latest".into(),
            ));
        }
    };
    let name = name_of(&state, &request.workflow)?;
    let expected = match expected {
        Expected::Version(n) => n,
        Expected::Any => head.version,
    };
    if expected >= MAX_VERSION {
        return Err(ApiError::Conflict(format!("workflow {id} has reached its last version ({MAX_VERSION}); duplicate it to go on")));
    }
    let next = WorkflowVersion { version: expected + 1, definition: request.workflow, written_by: identity.user.clone(), written_at: now() };
    match state.workflows.save_version(&head.id, expected, &name, &next).await.map_err(write_failed)? {
        SaveOutcome::Saved(head) => {
            info!(workflow_id = %head.id, version = head.version, user = %identity.user, "workflow version written");
            Ok(answer(StatusCode::OK, &head, &next, false))
        }
        SaveOutcome::Stale { current } => Err(ApiError::Conflict(format!(
            "workflow {id} is at version {current}, not {expected}: someone wrote it since you read it; read version {current}, merge, and send it with If-Match: \"{current}\""
        ))),
        SaveOutcome::NotFound => Err(no_workflow(&id)),
    }
}

/// `DELETE /workflows/{id}`: `204`. Runs that ran it keep their snapshots.
async fn delete(State(state): State<AppState>, identity: Identity, Path(id): Path<String>) -> Result<Response, ApiError> {
    let (head, _) = visible(&state, &identity, &id, None, Role::View, "deleting a workflow").await?;
    if !may_administer(&head, &identity) {
        return Err(ApiError::Forbidden("only a workflow's owner and admins delete it".into()));
    }
    if !state.workflows.delete(&head.id, now()).await? {
        return Err(no_workflow(&id));
    }
    info!(workflow_id = %head.id, user = %identity.user, "workflow deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RunBody {
    #[serde(default = "empty_object")]
    #[schemars(with = "serde_json::Map<String, Value>")]
    input: Value,
    #[serde(default)]
    version: Option<u32>,
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::StartOptions>")]
    options: Option<Value>,
}

/// `POST /workflows/{id}/runs`: starts a run of the version asked for (default: the
/// latest), exactly as `POST /runs` would with its definition, pinned to that version.
async fn run(State(state): State<AppState>, identity: Identity, Path(id): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let request: RunBody = parse_body(&body)?;
    let (head, version) = visible(&state, &identity, &id, request.version, Role::Run, "running a workflow").await?;
    queue_run(&state, &identity, version.definition, request.input, request.options, Some((&head, version.version))).await
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct EstimateBody {
    #[serde(default = "empty_object")]
    #[schemars(with = "serde_json::Map<String, Value>")]
    input: Value,
    #[serde(default)]
    version: Option<u32>,
}

/// `POST /workflows/{id}/estimate`: `POST /workflows/estimate` for a stored version.
async fn estimate(State(state): State<AppState>, identity: Identity, Path(id): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let request: EstimateBody = parse_body(&body)?;
    let (_, version) = visible(&state, &identity, &id, request.version, Role::Run, "estimating a workflow's runs").await?;
    estimate_of(&state, &identity, &version.definition, &request.input).await
}

#[derive(Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct DuplicateBody {
    #[serde(default)]
    name: Option<String>,
}

/// `POST /workflows/{id}/duplicate`: a copy of its latest version (renamed to `name` if
/// given) as a new workflow the caller owns, at version 1.
async fn duplicate(State(state): State<AppState>, identity: Identity, Path(id): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let request: DuplicateBody = if body.iter().all(u8::is_ascii_whitespace) { DuplicateBody::default() } else { parse_body(&body)? };
    let (_, source) = visible(&state, &identity, &id, None, Role::View, "duplicating a workflow").await?;
    let mut definition = source.definition;
    // A stored definition passed validation, so it is an object with a name to replace.
    if let (Some(name), Some(object)) = (request.name, definition.as_object_mut()) {
        object.insert("name".into(), Value::String(name));
    }
    // A copy is the caller's own, private until they share it.
    let (head, first) = store_new(&state, &identity, definition, Access::private()).await?;
    Ok(answer(StatusCode::CREATED, &head, &first, true))
}

/// `400` naming what is wrong with an access a client sent.
fn checked_access(access: &Access, identity: &Identity) -> Result<(), ApiError> {
    access.validate(identity.is_admin()).map_err(|e| ApiError::bad_request("Invalid request body", e.0))
}

/// `PUT /workflows/{id}/access` `{ visibility, shares? }`: who else may see, run, edit or
/// control the workflow and its runs, from now on (runs started narrower stay narrower).
/// Its owner and admins only; `200` with the workflow.
async fn set_access(State(state): State<AppState>, identity: Identity, Path(id): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let access: Access = parse_body(&body)?;
    let (head, _) = visible(&state, &identity, &id, None, Role::View, "changing a workflow's access").await?;
    if !may_administer(&head, &identity) {
        return Err(ApiError::Forbidden("only a workflow's owner and admins change who may see it".into()));
    }
    checked_access(&access, &identity)?;
    if !state.workflows.set_access(&head.id, &access).await? {
        return Err(no_workflow(&id));
    }
    info!(workflow_id = %head.id, user = %identity.user, visibility = access.visibility.name(), shares = access.shares.len(), "workflow access changed");
    let (head, latest) = state.workflows.get(&head.id, None).await?.ok_or_else(|| no_workflow(&id))?;
    Ok(answer(StatusCode::OK, &head, &latest, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_if_match(raw: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::IF_MATCH, HeaderValue::from_str(raw).unwrap());
        headers
    }

    #[test]
    fn if_match_names_a_version_or_anything() {
        assert_eq!(if_match(&HeaderMap::new()).unwrap(), None);
        assert_eq!(if_match(&with_if_match("\"3\"")).unwrap(), Some(Expected::Version(3)));
        assert_eq!(if_match(&with_if_match("W/\"12\"")).unwrap(), Some(Expected::Version(12)));
        assert_eq!(if_match(&with_if_match("*")).unwrap(), Some(Expected::Any));
        for bad in ["3", "\"0\"", "\"x\"", "\"3", "\"1000000\""] {
            assert!(if_match(&with_if_match(bad)).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn list_cursors_round_trip_and_garbage_is_refused() {
        let cursor = WorkflowCursor { updated_at: Utc::now(), id: WorkflowId::new() };
        assert_eq!(decode_cursor(&encode_cursor(&cursor)).unwrap(), cursor);
        for bad in ["", "!!", "bm90IGEgY3Vyc29y"] {
            assert!(decode_cursor(bad).is_err(), "{bad:?} accepted");
        }
    }
}
