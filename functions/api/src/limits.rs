//! Fair limits per tenant at the API (see `chainrun_core::quota`): a start is admitted only
//! with a slot among its tenant's concurrent runs and room in its tenant's starts for the
//! minute (`429` with `Retry-After` otherwise, nothing stored), and bodies and definitions
//! over their sizes are refused (`413`) before anything else reads them.

use crate::AppState;
use crate::error::ApiError;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chainrun_core::ids::{Principal, RunId};
use chainrun_core::quota::gate;
use chainrun_core::run::RunRecord;
use serde_json::Value;
use tracing::{info, warn};

/// `Retry-After` of a start refused for concurrency. A slot comes back when one of the
/// tenant's runs ends, which nothing predicts; a short, fixed wait keeps clients polite.
pub const CONCURRENCY_RETRY_AFTER_SECS: u64 = 10;

/// How many of a full slot set's holders a refused start checks for runs that ended
/// without giving their slot back (a runner that died at the very end, a release that
/// failed). Bounded, so a flood of refused starts costs a bounded number of reads each.
const RECLAIM_CHECKS: usize = 5;

/// A start admitted against its tenant's limits: its slot is taken. If the run is then not
/// stored, [`Admitted::abandon`] gives the slot back.
pub(crate) struct Admitted {
    tenant: Principal,
    run: RunId,
}

impl Admitted {
    pub(crate) async fn abandon(self, state: &AppState) {
        if let Err(e) = gate::vacate_slot(state.quota.as_ref(), &state.limits, &self.tenant, &self.run).await {
            // The slot is reclaimed when a later start finds the set full (the run never existed).
            warn!(run_id = %self.run, error = %e, "could not give back the slot of a run that was not stored");
        }
    }
}

/// Admits `run`'s start for its caller's tenant, or refuses it with `429` and `Retry-After`.
/// The slot first (idempotent, and given back if the rate refuses), then the minute's count,
/// so a start refused for either leaves nothing taken.
pub(crate) async fn admit_start(state: &AppState, run: &RunRecord) -> Result<Admitted, ApiError> {
    let tenant = run.caller.tenant();
    let quota = state.quota.as_ref();
    let limits = state.limits.as_ref();
    if let Err(holders) = gate::occupy_slot(quota, limits, &tenant, &run.id).await? {
        let freed = reclaim(state, &tenant, holders).await?;
        let again = if freed > 0 { gate::occupy_slot(quota, limits, &tenant, &run.id).await? } else { Err(Vec::new()) };
        if again.is_err() {
            let limit = limits.concurrent_runs.unwrap_or_default();
            info!(tenant = %tenant.key(), limit, "start refused: concurrent runs limit reached");
            return Err(ApiError::TooManyRequests {
                detail: format!("{} has {limit} runs that have not ended, its limit of concurrent runs; start this one when one ends", who(&tenant)),
                retry_after: CONCURRENCY_RETRY_AFTER_SECS,
            });
        }
    }
    let admitted = Admitted { tenant: tenant.clone(), run: run.id.clone() };
    match gate::take_start(quota, limits, &tenant, chrono::Utc::now()).await {
        Ok(Ok(())) => Ok(admitted),
        Ok(Err(retry_after)) => {
            admitted.abandon(state).await;
            let limit = limits.starts_per_minute.unwrap_or_default();
            info!(tenant = %tenant.key(), limit, retry_after, "start refused: starts per minute limit reached");
            Err(ApiError::TooManyRequests {
                detail: format!("{} may start {limit} runs a minute; this minute's are used up", who(&tenant)),
                retry_after,
            })
        }
        Err(e) => {
            admitted.abandon(state).await;
            Err(e.into())
        }
    }
}

/// Gives back the slots of runs among `holders` that have ended (or were never stored);
/// how many. Checks at most [`RECLAIM_CHECKS`].
async fn reclaim(state: &AppState, tenant: &Principal, holders: Vec<RunId>) -> Result<usize, ApiError> {
    let mut freed = 0;
    for run in holders.into_iter().take(RECLAIM_CHECKS) {
        let ended = state.store.get_run_head(&run).await?.is_none_or(|r| r.status.is_terminal());
        if ended && gate::vacate_slot(state.quota.as_ref(), &state.limits, tenant, &run).await? {
            info!(run_id = %run, tenant = %tenant.key(), "reclaimed the slot of a run that had ended");
            freed += 1;
        }
    }
    Ok(freed)
}

fn who(tenant: &Principal) -> String {
    match tenant {
        Principal::Public => "the public (anonymous callers together)".to_owned(),
        Principal::User(user) => format!("user {user}"),
        other => other.key(),
    }
}

/// `413` for a definition larger than its limit, measured as compact JSON (what is stored).
pub(crate) fn check_definition_size(state: &AppState, workflow: &Value) -> Result<(), ApiError> {
    let size = chainrun_core::output::json_len(workflow);
    let limit = state.limits.max_definition_bytes;
    if size > limit { Err(ApiError::DefinitionTooLarge { size, limit }) } else { Ok(()) }
}

/// Refuses a request body over the configured size with `413` before any route reads it.
/// The body is read once here (bounded) and handed on.
pub(crate) async fn body_size(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limit = state.limits.max_request_bytes;
    let declared = request.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return ApiError::PayloadTooLarge { limit }.into_response();
    }
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, limit).await else {
        return ApiError::PayloadTooLarge { limit }.into_response();
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await
}
