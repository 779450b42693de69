//! Where the API applies `chainrun_core::access`: which role a caller holds on a stored
//! workflow or a run, and the one answer for each refusal.
//!
//! What a caller may not see does not exist for them: `404`, with the same words as for an
//! id that was never used, so ids cannot be probed. What they may see but not do (a viewer
//! cancelling a run) is a `403` naming the role it takes.

use crate::AppState;
use crate::auth::Identity;
use crate::error::ApiError;
use chainrun_core::access::{Access, Role, effective, run_role};
use chainrun_core::graph::validate_json;
use chainrun_core::ids::Principal;
use chainrun_core::run::RunRecord;
use chainrun_core::stored::StoredWorkflow;

/// The role `identity` holds on a stored workflow: its owner and admins every one, the
/// others what its access gives them.
pub(crate) fn workflow_role(head: &StoredWorkflow, identity: &Identity) -> Option<Role> {
    if identity.is_admin() || (!identity.is_anonymous() && head.owner == identity.user) {
        return Some(Role::Control);
    }
    head.access.role_of(&identity.viewer())
}

/// Whether `identity` may change who sees the workflow, or delete it: its owner and admins.
pub(crate) fn may_administer(head: &StoredWorkflow, identity: &Identity) -> bool {
    identity.is_admin() || (!identity.is_anonymous() && head.owner == identity.user)
}

/// `Ok` if `held` is at least `needed`; a `403` naming what the act takes otherwise.
pub(crate) fn require(held: Role, needed: Role, what: &str) -> Result<(), ApiError> {
    if held >= needed {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!("{what} takes the {} role; you have {}", role_name(needed), role_name(held))))
    }
}

pub(crate) fn role_name(role: Role) -> &'static str {
    match role {
        Role::View => "view",
        Role::Run => "run",
        Role::Edit => "edit",
        Role::Control => "control",
    }
}

/// The run's access now: as it started, narrowed by its workflow's current one (a
/// workflow made narrower narrows its runs at once; one deleted leaves them as they were).
pub(crate) async fn run_access(state: &AppState, run: &RunRecord) -> Result<Access, ApiError> {
    let started = run.access.clone().unwrap_or_default();
    let Some(pinned) = &run.pinned else { return Ok(started) };
    match state.workflows.head(&pinned.workflow_id).await? {
        Some(head) if run.inherits_access => Ok(head.access),
        Some(head) => Ok(effective(Some(&started), Some(&head.access))),
        None => Ok(started),
    }
}

/// Everyone a run's person steps (reviews, inputs) ask, at any escalation: they read it.
pub(crate) fn people_of(state: &AppState, run: &RunRecord) -> Vec<Principal> {
    let Ok(graph) = validate_json(&run.definition, &state.models) else { return Vec::new() };
    graph.people(&run.caller).into_iter().flat_map(|(_, people)| people).collect()
}

/// The role `identity` holds on `run` now; `None`: they may not see it.
pub(crate) async fn role_on_run(state: &AppState, run: &RunRecord, identity: &Identity) -> Result<Option<Role>, ApiError> {
    let viewer = identity.viewer();
    // The cheap answers first: most reads are by the run's starter or an admin.
    if viewer.admin || (!identity.is_anonymous() && run.caller == identity.user) {
        return Ok(Some(Role::Control));
    }
    let access = run_access(state, run).await?;
    let role = run_role(&access, &run.caller, run.workflow_owner.as_ref(), &[], &viewer);
    if role.is_some() || identity.is_anonymous() {
        return Ok(role);
    }
    // Only now can the run's person steps matter (they read it): validating its definition
    // to find them is the costly part of this check, so polls by shares never pay it.
    Ok(run_role(&access, &run.caller, run.workflow_owner.as_ref(), &people_of(state, run), &viewer))
}
