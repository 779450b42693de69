//! Who a run's progress goes to, brought up to date when an invocation takes the run.
//!
//! A run of a stored workflow is seen by whoever the workflow's access lets see it now,
//! not when the run started (see [`crate::access::effective`]): a workflow shared later
//! shows its running runs to the new audience, and one made narrower stops showing them.
//! Each invocation reads the workflow's head once and, if the owners differ from the
//! run's, records the new ones (fenced by the lease, like every write of the run) and
//! removes the run's rows from the feeds that lost it. The events after that go to the
//! new owners. Within one invocation (at most Lambda's 15 minutes) the owners stay those
//! read at its start; a run that waits for a person gets a new invocation when it resumes.

use super::EngineError;
use crate::access::{effective, run_owners};
use crate::graph::ValidatedGraph;
use crate::ports::{Lease, ProgressSink, RunStore, WorkflowStore};
use crate::run::RunRecord;
use tracing::info;

/// Brings `run.owners` up to date with its workflow's access.
pub(super) async fn retarget(
    workflows: &dyn WorkflowStore,
    store: &dyn RunStore,
    sink: &dyn ProgressSink,
    run: &mut RunRecord,
    graph: &ValidatedGraph,
    lease: &Lease,
) -> Result<(), EngineError> {
    let Some(pinned) = &run.pinned else { return Ok(()) };
    // A deleted workflow leaves its runs as they were.
    let Some(head) = workflows.head(&pinned.workflow_id).await? else { return Ok(()) };
    let access = if run.inherits_access { head.access.clone() } else { effective(run.access.as_ref(), Some(&head.access)) };
    let people: Vec<_> = graph.people(&run.caller).into_iter().flat_map(|(_, people)| people).collect();
    let owners = run_owners(&run.caller, run.workflow_owner.as_ref(), &people, &access);
    if owners == run.owners {
        return Ok(());
    }
    let gone: Vec<_> = run.owners.iter().filter(|o| !owners.contains(o)).cloned().collect();
    store.set_owners(&run.id, lease, &owners).await?;
    if !gone.is_empty() {
        sink.forget(&run.id, &gone).await?;
    }
    info!(run_id = %run.id, visibility = access.visibility.name(), owners = owners.len(), removed = gone.len(), "the run's audience follows its workflow's access");
    run.owners = owners;
    Ok(())
}
