//! Templates: `GET /templates` (built-ins, then the caller's saved ones), `GET` and
//! `DELETE /templates/{id}`, and `POST /templates`, which saves a version of one of the
//! caller's stored workflows as a template. `POST /workflows` with `{ "template": <id> }`
//! creates a workflow from one ([`definition_of`]).
//!
//! Access: built-ins are everyone's; a saved template is seen by its owner only, and to
//! anyone else every route answers `404`, as for an id that does not exist. The rule is
//! [`may_see`], the one place to widen when workflows get visibility and shares.
//!
//! The list is one sequence, built-ins first (in their fixed order), then saved templates
//! newest first, paged with `?limit=` and an opaque `next` like every list; a cursor says
//! which half it points into, so a page may hold the last built-ins and the first saved.

use crate::auth::Identity;
use crate::error::ApiError;
use crate::history::bounded;
use crate::{AppState, method_not_allowed, parse_body};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chainrun_core::ids::WorkflowName;
use chainrun_core::ports::TemplateCursor;
use chainrun_core::stored::{MAX_VERSION, Pinned};
use chainrun_core::templates::{BUILTINS, Builtin, SavedTemplate, TemplateId, builtin};
use chainrun_core::wire::templates::TemplateView;
use chainrun_core::wire::views::Page;
use chrono::{DateTime, SubsecRound, Utc};
use http::{HeaderValue, StatusCode};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use std::ops::RangeInclusive;
use tracing::info;

const DEFAULT_LIST_LIMIT: u32 = 20;
const LIST_LIMITS: RangeInclusive<u32> = 1..=100;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/templates", get(list).post(save).fallback(method_not_allowed))
        .route("/templates/{id}", get(read).delete(delete).fallback(method_not_allowed))
}

/// Who may see a saved template: for now its owner only (see the module docs).
fn may_see(identity: &Identity, template: &SavedTemplate) -> bool {
    template.owner == identity.user
}

fn no_template(raw_id: &str) -> ApiError {
    ApiError::NotFound(format!("no template {raw_id:?}; GET /templates lists the ones you may use"))
}

/// A template the caller may use.
enum Found {
    Builtin(&'static Builtin),
    Saved(SavedTemplate),
}

/// The template `raw_id`, if the caller may see it; anything else is the same `404`.
async fn visible(state: &AppState, identity: &Identity, raw_id: &str) -> Result<Found, ApiError> {
    if let Some(b) = builtin(raw_id) {
        return Ok(Found::Builtin(b));
    }
    let id = TemplateId::parse(raw_id).map_err(|_| no_template(raw_id))?;
    match state.templates.get(&id).await? {
        Some(template) if may_see(identity, &template) => Ok(Found::Saved(template)),
        _ => Err(no_template(raw_id)),
    }
}

/// The definition of template `raw_id`, for `POST /workflows` (`404` if the caller may not
/// use it). The caller validates it as any write is validated.
pub(crate) async fn definition_of(state: &AppState, identity: &Identity, raw_id: &str) -> Result<Value, ApiError> {
    Ok(match visible(state, identity, raw_id).await? {
        Found::Builtin(b) => b.definition().clone(),
        Found::Saved(t) => t.definition,
    })
}

/// The definition `POST /workflows` stores: the `workflow` it was given, or the
/// definition of `template` (named `name`, if given). Exactly one of the two; `name` only
/// with a template (a definition carries its own).
pub(crate) async fn definition_to_create(
    state: &AppState,
    identity: &Identity,
    workflow: Option<Value>,
    template: Option<String>,
    name: Option<String>,
) -> Result<Value, ApiError> {
    let invalid = |detail: &str| ApiError::bad_request("Invalid request body", detail.to_owned());
    match (workflow, template) {
        (Some(_), Some(_)) => Err(invalid("send either `workflow` (a definition) or `template` (a template id), not both")),
        (Some(_), None) if name.is_some() => Err(invalid("name: only with `template`; a definition carries its own `name`")),
        (Some(definition), None) => Ok(definition),
        (None, None) => Err(invalid("missing field `workflow`: send a definition, or `template` with the id of a template (GET /templates)")),
        (None, Some(id)) => {
            let mut definition = definition_of(state, identity, &id).await?;
            // A template's definition passed validation, so it is an object with a name to replace.
            if let (Some(name), Some(object)) = (name, definition.as_object_mut()) {
                object.insert("name".into(), Value::String(name));
            }
            Ok(definition)
        }
    }
}

/// Where a page of `GET /templates` starts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cursor {
    /// At the built-in with this index.
    Builtin(usize),
    /// Among the saved templates: after this one, or at the first.
    Saved(Option<TemplateCursor>),
}

fn encode_cursor(cursor: &Cursor) -> String {
    let text = match cursor {
        Cursor::Builtin(i) => format!("b|{i}"),
        Cursor::Saved(None) => "s|".to_owned(),
        Cursor::Saved(Some(c)) => format!("s|{}|{}", c.created_at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true), c.id),
    };
    URL_SAFE_NO_PAD.encode(text)
}

fn decode_cursor(raw: &str) -> Result<Cursor, ApiError> {
    let bad = || ApiError::bad_request("Invalid query", "next: not a cursor this API returned; pass the `next` of the previous page unchanged");
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(raw.trim()).map_err(|_| bad())?).map_err(|_| bad())?;
    match text.split_once('|').ok_or_else(bad)? {
        ("b", i) => i.parse().ok().filter(|i| *i < BUILTINS.len()).map(Cursor::Builtin).ok_or_else(bad),
        ("s", "") => Ok(Cursor::Saved(None)),
        ("s", rest) => {
            let (at, id) = rest.split_once('|').ok_or_else(bad)?;
            let created_at = DateTime::parse_from_rfc3339(at).map_err(|_| bad())?.with_timezone(&Utc);
            Ok(Cursor::Saved(Some(TemplateCursor { created_at, id: TemplateId::parse(id).map_err(|_| bad())? })))
        }
        _ => Err(bad()),
    }
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    #[schemars(with = "Option<u32>")]
    limit: Option<String>,
    next: Option<String>,
}

/// `GET /templates?limit=N&next=CURSOR`: built-ins, then the caller's saved templates
/// newest first.
async fn list(State(state): State<AppState>, identity: Identity, params: Result<Query<ListParams>, QueryRejection>) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request("Invalid query", e.body_text()))?;
    let limit = bounded("limit", params.limit.as_deref(), DEFAULT_LIST_LIMIT, LIST_LIMITS)? as usize;
    let cursor = params.next.as_deref().map(decode_cursor).transpose()?.unwrap_or(Cursor::Builtin(0));
    let mut builtins: Vec<&'static Builtin> = Vec::new();
    let after = match cursor {
        Cursor::Builtin(start) => {
            builtins.extend(BUILTINS.iter().skip(start).take(limit));
            let end = start + builtins.len();
            if end < BUILTINS.len() {
                let items = builtins.into_iter().map(TemplateView::builtin).collect();
                return Ok(axum::Json(Page { items, next: Some(encode_cursor(&Cursor::Builtin(end))) }).into_response());
            }
            None
        }
        Cursor::Saved(after) => after,
    };
    // The rest of the page is saved templates. A page the built-ins filled still asks for
    // one, only to say whether a next page exists: a client never gets a cursor to nothing.
    let room = limit - builtins.len();
    let page = state.templates.list(&identity.user, room.max(1) as u32, after.as_ref()).await?;
    let (saved, next) = if room == 0 {
        (Vec::new(), (!page.items.is_empty()).then_some(Cursor::Saved(None)))
    } else {
        (page.items, page.next.map(|c| Cursor::Saved(Some(c))))
    };
    let items: Vec<TemplateView<'_>> = builtins.into_iter().map(TemplateView::builtin).chain(saved.iter().map(TemplateView::saved)).collect();
    Ok(axum::Json(Page { items, next: next.as_ref().map(encode_cursor) }).into_response())
}

/// `GET /templates/{id}`: the template with its definition.
async fn read(State(state): State<AppState>, identity: Identity, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(match visible(&state, &identity, &id).await? {
        Found::Builtin(b) => axum::Json(TemplateView::builtin_whole(b)).into_response(),
        Found::Saved(t) => axum::Json(TemplateView::saved_whole(&t)).into_response(),
    })
}

/// `DELETE /templates/{id}`: `204`; workflows created from it are unchanged. Built-ins
/// cannot be deleted (`405`).
async fn delete(State(state): State<AppState>, identity: Identity, Path(id): Path<String>) -> Result<Response, ApiError> {
    match visible(&state, &identity, &id).await? {
        Found::Builtin(b) => Err(ApiError::MethodNotAllowed(format!("{} is a built-in template; it cannot be deleted", b.id))),
        Found::Saved(t) => {
            if !state.templates.delete(&t.id).await? {
                return Err(no_template(&id));
            }
            info!(template_id = %t.id, user = %identity.user, "template deleted");
            Ok(StatusCode::NO_CONTENT.into_response())
        }
    }
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SaveBody {
    workflow_id: String,
    /// Default: the latest.
    #[serde(default)]
    version: Option<u32>,
    /// Default: the workflow's name.
    #[serde(default)]
    title: Option<String>,
    /// Default: the definition's `description`, if any.
    #[serde(default)]
    description: Option<String>,
}

fn invalid_field(e: chainrun_core::templates::InvalidField) -> ApiError {
    ApiError::bad_request("Invalid request body", e.to_string())
}

/// `POST /templates`: saves a version of one of the caller's stored workflows as a
/// template: `201` with it whole, and its `Location`. A workflow the caller may not see is
/// the same `404` as one that does not exist; nothing is written on any refusal.
async fn save(State(state): State<AppState>, identity: Identity, body: Bytes) -> Result<Response, ApiError> {
    let request: SaveBody = parse_body(&body)?;
    if let Some(n) = request.version.filter(|n| !(1..=MAX_VERSION).contains(n)) {
        return Err(ApiError::bad_request("Invalid request body", format!("version: a version of the workflow, 1 to {MAX_VERSION}; got {n}")));
    }
    let title = request.title.as_deref().map(chainrun_core::templates::title).transpose().map_err(invalid_field)?;
    let description = request.description.as_deref().map(chainrun_core::templates::description).transpose().map_err(invalid_field)?;
    let (head, version) = crate::workflows::readable(&state, &identity, &request.workflow_id, request.version).await?;
    // A stored version passed validation when it was written, so it has a valid name.
    let name = version.definition.get("name").and_then(Value::as_str).and_then(|n| n.parse::<WorkflowName>().ok()).unwrap_or(head.name);
    let description = match description {
        Some(given) => given,
        None => version.definition.get("description").and_then(Value::as_str).and_then(|d| chainrun_core::templates::description(d).ok()).flatten(),
    };
    let template = SavedTemplate {
        id: TemplateId::new(),
        owner: identity.user.clone(),
        title: title.unwrap_or_else(|| name.as_str().to_owned()),
        description,
        name,
        source: Pinned { workflow_id: head.id, version: version.version },
        definition: version.definition,
        created_at: Utc::now().trunc_subsecs(3),
    };
    state.templates.save(&template).await.map_err(|e| match e {
        chainrun_core::ports::StoreError::TooLarge(detail) => ApiError::bad_request("Template too large", detail),
        e => e.into(),
    })?;
    info!(template_id = %template.id, workflow_id = %template.source.workflow_id, version = template.source.version, user = %identity.user, "template saved");
    let mut response = (StatusCode::CREATED, axum::Json(TemplateView::saved_whole(&template))).into_response();
    if let Ok(href) = HeaderValue::from_str(&format!("/templates/{}", template.id)) {
        response.headers_mut().insert(http::header::LOCATION, href);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_cursors_round_trip_and_garbage_is_refused() {
        let saved = Cursor::Saved(Some(TemplateCursor { created_at: Utc::now(), id: TemplateId::new() }));
        for cursor in [Cursor::Builtin(0), Cursor::Builtin(BUILTINS.len() - 1), Cursor::Saved(None), saved] {
            assert_eq!(decode_cursor(&encode_cursor(&cursor)).unwrap(), cursor);
        }
        let past_the_builtins = URL_SAFE_NO_PAD.encode(format!("b|{}", BUILTINS.len()));
        for bad in ["", "!!", "bm90IGEgY3Vyc29y", past_the_builtins.as_str(), &URL_SAFE_NO_PAD.encode("s|x|y")] {
            assert!(decode_cursor(bad).is_err(), "{bad:?} accepted");
        }
    }
}
