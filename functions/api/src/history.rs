//! Run history (`GET /runs`) and cost analytics (`GET /analytics/costs`).
//!
//! History walks the runs table's indexes newest first and shows only runs the caller may
//! see; its `next` cursor is opaque to clients (base64url of the index position).
//! Analytics reads per-owner daily rollups, never the runs themselves. It reports on one
//! principal (`scope`) at a time: the caller's own runs by default, or a group's, the
//! admin feed's or the public one's. Summing several principals' rollups would count a run
//! once per principal that owns it.

use crate::AppState;
use crate::auth::Identity;
use crate::error::ApiError;
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chainrun_core::analytics::merge_by_workflow;
use chainrun_core::ids::{Principal, RunId};
use chainrun_core::money::Usd;
use chainrun_core::ports::{RunCursor, RunIndex, RunQuery};
use chainrun_core::wire::views::{CostsReport, DayCostsView, MaybeMoney, Page, RunSummaryView, SpendToday, WorkflowCostsView};
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::Deserialize;
use std::ops::RangeInclusive;

pub const DEFAULT_HISTORY_LIMIT: u32 = 20;
pub const HISTORY_LIMITS: RangeInclusive<u32> = 1..=100;
pub const DEFAULT_DAYS: u32 = 7;
pub const DAYS: RangeInclusive<u32> = 1..=90;
/// Workflow names are 1–128 characters (see the workflow language).
const MAX_WORKFLOW_NAME: usize = 128;

fn invalid(detail: impl Into<String>) -> ApiError {
    ApiError::bad_request("Invalid query", detail)
}

/// An optional integer query parameter in `range`; the problem names the parameter.
pub(crate) fn bounded(name: &str, raw: Option<&str>, default: u32, range: RangeInclusive<u32>) -> Result<u32, ApiError> {
    let Some(raw) = raw else { return Ok(default) };
    raw.trim()
        .parse::<u32>()
        .ok()
        .filter(|v| range.contains(v))
        .ok_or_else(|| invalid(format!("{name}: expected an integer from {} to {}, got {:?}", range.start(), range.end(), truncate(raw))))
}

fn truncate(raw: &str) -> String {
    raw.chars().take(40).collect()
}

pub fn encode_cursor(cursor: &RunCursor) -> String {
    let raw = format!("{}|{}", cursor.created_at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true), cursor.run_id);
    URL_SAFE_NO_PAD.encode(raw)
}

fn decode_cursor(raw: &str) -> Result<RunCursor, ApiError> {
    let bad = || invalid("next: not a cursor this API returned; pass the `next` of the previous page unchanged");
    let bytes = URL_SAFE_NO_PAD.decode(raw.trim()).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (at, id) = text.split_once('|').ok_or_else(bad)?;
    let created_at = DateTime::parse_from_rfc3339(at).map_err(|_| bad())?.with_timezone(&Utc);
    Ok(RunCursor { created_at, run_id: RunId::parse(id).map_err(|_| bad())? })
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HistoryParams {
    workflow: Option<String>,
    #[schemars(with = "Option<u32>")]
    limit: Option<String>,
    next: Option<String>,
}

/// `GET /runs?workflow=NAME&limit=N&next=CURSOR`: runs of that workflow the caller may see,
/// or without `workflow` the caller's own runs; newest first.
pub async fn list_runs(
    State(state): State<AppState>,
    identity: Identity,
    params: Result<Query<HistoryParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| invalid(e.body_text()))?;
    let limit = bounded("limit", params.limit.as_deref(), DEFAULT_HISTORY_LIMIT, HISTORY_LIMITS)?;
    let index = match params.workflow {
        None => RunIndex::Caller(identity.user.to_string()),
        Some(name) if name.is_empty() || name.chars().count() > MAX_WORKFLOW_NAME => {
            return Err(invalid(format!("workflow: a workflow name is 1 to {MAX_WORKFLOW_NAME} characters")));
        }
        Some(name) => RunIndex::Workflow(name),
    };
    let after = params.next.as_deref().map(decode_cursor).transpose()?;
    let page = state.history.list_runs(&RunQuery { index, visible_to: identity.principals(), limit, after }).await?;
    Ok(Json(Page { items: page.items.iter().map(RunSummaryView::from).collect(), next: page.next.as_ref().map(encode_cursor) }).into_response())
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CostParams {
    #[schemars(with = "Option<u32>")]
    days: Option<String>,
    scope: Option<String>,
}

/// Whose rollups to read: `me` (default), `group:<name>` for a group the caller is in,
/// `admin` for admins, `authed` (runs every signed-in caller may see), `public`.
fn scope(identity: &Identity, raw: Option<&str>) -> Result<Principal, ApiError> {
    let principal = match raw.unwrap_or("me") {
        "me" => Principal::User(identity.user.to_string()),
        "admin" => Principal::Admin,
        "public" => Principal::Public,
        "authed" => Principal::Authed,
        other => match other.strip_prefix("group:") {
            Some(group) if !group.is_empty() => Principal::Group(group.to_owned()),
            _ => return Err(invalid(format!("scope: expected me, group:<name>, admin, authed or public, got {:?}", truncate(other)))),
        },
    };
    if !identity.principals().contains(&principal) {
        return Err(invalid(format!("scope: you are not {principal}; use me, or a group:<name> of your token's groups")));
    }
    Ok(principal)
}

/// `GET /analytics/costs?days=N&scope=S`: per workflow and per step, over the last `days`
/// UTC days (today included), and per workflow and day, from the rollups of one principal
/// (read once, by day, and merged here for the period).
pub async fn costs(
    State(state): State<AppState>,
    identity: Identity,
    params: Result<Query<CostParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| invalid(e.body_text()))?;
    let days = bounded("days", params.days.as_deref(), DEFAULT_DAYS, DAYS)?;
    let principal = scope(&identity, params.scope.as_deref())?;
    let to = Utc::now().date_naive();
    let from = to - chrono::Days::new(u64::from(days - 1));
    let daily = state.analytics.costs_by_day(&principal, from, to).await?;
    let workflows = merge_by_workflow(daily.iter().map(|d| d.costs.clone()));
    Ok(Json(CostsReport {
        days,
        from,
        to,
        scope: principal.key(),
        workflows: workflows.iter().map(WorkflowCostsView::from).collect(),
        daily: daily.iter().map(DayCostsView::from).collect(),
    })
    .into_response())
}

/// `GET /analytics/spend`: the caller's spend today (UTC) against their daily cap: what was
/// charged, what calls in flight hold, what lost calls count, the cap and what is left
/// (`null` without a cap).
pub async fn spend_today(State(state): State<AppState>, identity: Identity) -> Result<Response, ApiError> {
    let day = Utc::now().date_naive();
    let counter = state.daily.day(identity.user.as_str(), day).await?;
    let cap = state.daily_caps.cap_for(identity.user.as_str());
    let remaining = cap.map(|cap| Usd::from_pico(cap.pico().saturating_sub(counter.committed.pico())));
    Ok(Json(SpendToday {
        owner: identity.user.as_str(),
        day,
        cap: MaybeMoney(cap.map(Into::into)),
        charged: counter.charged.into(),
        held: counter.held().into(),
        lost: counter.lost.into(),
        remaining: MaybeMoney(remaining.map(Into::into)),
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let cursor = RunCursor { created_at: Utc::now(), run_id: RunId::new() };
        assert_eq!(decode_cursor(&encode_cursor(&cursor)).unwrap(), cursor);
        let forged = URL_SAFE_NO_PAD.encode(format!("yesterday|{}", RunId::new()));
        for bad in ["", "!!", "bm90IGEgY3Vyc29y", forged.as_str()] {
            assert!(decode_cursor(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_scope_must_be_one_of_the_callers_principals() {
        let alice = Identity { user: "alice".parse().unwrap(), groups: vec!["eng".into()] };
        assert_eq!(scope(&alice, None).unwrap(), Principal::User("alice".into()));
        assert_eq!(scope(&alice, Some("group:eng")).unwrap(), Principal::Group("eng".into()));
        assert_eq!(scope(&alice, Some("public")).unwrap(), Principal::Public);
        for bad in ["group:ops", "admin", "group:", "USER#bob", "bob"] {
            assert!(scope(&alice, Some(bad)).is_err(), "{bad:?} accepted");
        }
        let root = Identity { user: "root".parse().unwrap(), groups: vec![crate::auth::ADMIN_GROUP.into()] };
        assert_eq!(scope(&root, Some("admin")).unwrap(), Principal::Admin);
    }
}
